//! A worker thread: one reactor hosting client connections and the server
//! connections they use, and the code that drives both.
//!
//! Everything that touches a socket runs here. The worker asks the router
//! (system thread) for servers and reports to it; between a client and its
//! server, bytes move without leaving the thread.
//!
//! This module holds `Worker`, `Shared`, its `Handler` impl (dispatch and
//! panic containment) and, for now, the client's transitions (driving,
//! relaying, linking, login, greeting, session checks, closing). Beside
//! it: `accept` (listeners, accepting in batches), `cancel` (cancel keys
//! and the connections that carry CancelRequests), `pool` (`LocalPool`,
//! needs, attaching and queueing clients, grants, offering, shipping and
//! adopting servers, opening new ones), `probe` (passthrough and
//! auth_query logins on a client's behalf), `servers` (a server
//! connection's own transitions: connecting, login, reset, closing; not
//! `server`, which would read as `crate::server`'s `Server` struct) and
//! `sweep` (tick, drain, kill, snapshot, pool counters, PAUSE checks).

mod accept;
mod cancel;
pub(crate) mod client;
mod clients;
mod cx;
mod failure;
mod follow;
mod health;
mod hosting;
mod link;
mod listen;
mod opening;
mod pool;
mod probe;
pub(crate) mod server;
mod servers;
mod sweep;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use log::{debug, error, info, warn};
use odissey_protocol::backend::{self, TransactionStatus};
use odissey_reactor::{Context, Handler, Interest, Key, Machines, Ready, Sender, TimerId, Token};
use odissey_transport::Listener;

use crate::auth::Fatal;
use crate::backend_login::AskTls;
use crate::cmd::{SysCmd, WorkerCmd};
use crate::config::{Config, ResolvedRoute, RouteCache, StorageTls};
use crate::io::Io;
use crate::pool_shared::LEND_AFTER;
use crate::resolver::{Dns, LOOKUP_TIMEOUT};
use crate::router::{GiveUp, PoolKey, Registry, ServerWas, WorkerId};
use crate::tls::TlsSet;
use crate::worker::client::{Client, ClientNext, ClientState};
use crate::worker::server::{Server, ServerState};

use accept::{listener_index, listener_token};
use cancel::{CancelDrops, Canceller};
use cx::{Cx, Evt};
pub(crate) use link::{Conversation, Owed};
use opening::{lookups_for, Resume};
use pool::LocalPool;
use probe::Probe;

/// Rounds of read/relay/write per wake-up before yielding to others.
const MAX_ROUNDS: usize = 32;

/// A slot of the worker's slab.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // on purpose: see `Client`
pub(crate) enum Conn {
    /// Inline, not boxed: idle clients are the bulk of all connections, and
    /// a slab of them costs less memory than one heap block each.
    Client(Client),
    Server(Box<Server>),
    /// A CancelRequest on its way to a server.
    Cancel(Box<Canceller>),
    /// A login on a client's behalf (passthrough check, auth_query).
    Probe(Box<Probe>),
    /// A host's health check connection (`health`).
    Check(Box<health::Check>),
    /// Worker 0's LISTEN connection of a hub (`listen`).
    Upstream(Box<listen::Upstream>),
    /// Closed during this batch; freed after it so the slot is not reused
    /// while events for the old socket may still be queued.
    Dead,
}

/// Deadlines of a worker.
#[derive(Debug)]
pub(crate) enum WorkerTimer {
    /// The graceful-shutdown grace period is over.
    DrainDeadline,
    /// Close the clients that finished their transactions while draining.
    DrainSweep,
    /// A server left by its client did not come back clean in time.
    Recover(Key),
    /// A CancelRequest connection took too long.
    CancelTimeout(Key),
    /// A client waited pool_timeout for a server.
    PoolTimeout(Key),
    /// A client closed with an error has lingered long enough.
    Linger(Key),
    /// A client did not finish logging in within auth_timeout.
    AuthTimeout(Key),
    /// A probe (passthrough check, auth_query) took too long.
    ProbeTimeout(Key),
    /// Once a second: pool_ttl, server_lifetime, client and query timeouts.
    Tick,
    /// Withdraw needs and lend idle servers (`Worker::balance`).
    Balance,
    /// A host name lookup took too long: what waits for it fails
    /// (`resolver::Dns::timed_out`).
    ResolveTimeout(u64),
    /// Health check `.0` of `health::Checks` (under epoch `.1`) is due.
    HealthDue(usize, u64),
    /// A health check connection did not answer in time.
    HealthTimeout(Key),
    /// Open a lost LISTEN connection again.
    UpstreamRetry(Arc<crate::notify::Hub>, Arc<ResolvedRoute>),
}

/// What the console's PAUSE holds: every database, or some.
#[derive(Debug, Default)]
struct Paused {
    all: bool,
    dbs: std::collections::HashSet<String>,
}

impl Paused {
    fn holds(&self, db: &str) -> bool {
        self.all || (!self.dbs.is_empty() && self.dbs.contains(db))
    }
}

/// How long a client closed with an error keeps its socket open.
const LINGER: std::time::Duration = std::time::Duration::from_millis(100);

/// How often the timeouts of idle servers and clients are checked.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long after its last reply a client is closed while draining.
const DRAIN_SWEEP: std::time::Duration = std::time::Duration::from_millis(50);

/// State shared by all connections of a worker.
pub(crate) struct Shared {
    pub(crate) id: WorkerId,
    pub(crate) sys: Sender<SysCmd>,
    pub(crate) peers: Vec<Sender<WorkerCmd>>,
    pub(crate) cfg: Arc<Config>,
    /// Databases the console paused.
    paused: Paused,
    /// PAUSE commands waiting for this worker's transactions in their
    /// scope to end: (id, database or all).
    pause_waits: Vec<(u64, Option<String>)>,
    /// When this worker started.
    started: Instant,
    /// Tests only (`ODISSEY_FAILPOINT_PANIC`): a simple query with exactly
    /// this text makes the worker panic while relaying it, to prove that
    /// a panic costs one connection, not the worker.
    panic_on: Option<String>,
    /// TLS for clients (by listener) and servers (by storage).
    pub(crate) tls: Arc<TlsSet>,
    /// Routes resolved for this worker's clients under `cfg`.
    routes: RouteCache,
    /// Storage host names: cache, and connections waiting for a lookup.
    dns: Dns<Resume>,
    /// Per pool: the state shared with the router, and the idle servers
    /// this worker keeps for itself (most recently used last).
    local: HashMap<PoolKey, LocalPool>,
    registry: Arc<Registry>,
    /// Clients connected on all workers (client_max).
    clients: Arc<AtomicUsize>,
    /// This worker's clones of the listening sockets.
    listeners: Vec<Listener>,
    /// The keepalive the listeners were tuned with, once they came.
    listen_keepalive: Option<Option<std::time::Duration>>,
    /// Cancel keys of this worker's clients.
    cancel_keys: HashMap<(u32, u32), Key>,
    dead: Vec<Key>,
    /// Connections that hit MAX_ROUNDS with work left: driven again after
    /// the batch, since no new edge will announce them.
    again: Vec<Key>,
    /// Listeners that hit ACCEPT_BATCH with connections left, and those
    /// to accept from after the next batch: a flood of new connections
    /// waits its turn behind the clients already in.
    accept_later: Vec<usize>,
    accept_next: Vec<usize>,
    /// Clients still logging in that had an event in this batch: driven
    /// after the batch, so the clients already in go first (a login flood
    /// does not delay them by its own work).
    logins_later: Vec<Key>,
    draining: bool,
    sweep_set: bool,
    /// Some pool has needs to withdraw or idle servers to lend once
    /// `LEND_AFTER` has passed (`Worker::balance`), and whether that
    /// timer is set.
    balance_wanted: bool,
    balance_set: bool,
    /// Cancels dropped since the last summary line.
    cancel_drops: CancelDrops,
    /// What the machines raised during the event being handled (reused;
    /// applied before the event returns: `Worker::apply`).
    evts: Vec<Evt>,
    /// Routed routes as their clients see them (`hosting::Family`), by
    /// their first host's pool and the role asked for.
    families: HashMap<(PoolKey, crate::config::TargetSessionAttrs), Arc<hosting::Family>>,
    /// Clients waiting for a host of their route to qualify.
    homeless: Vec<Key>,
    /// `Hosts::generation` as last acted on (`hosting::hosts_moved`).
    hosts_seen: u64,
    /// Logins of routed clients (where each one's round robin starts), and
    /// the random state of `load_balance = "random"`.
    turn: u16,
    rng: u64,
    /// The health checks this worker runs (worker 0 runs them all).
    checks: health::Checks,
    /// Transaction-pooled listeners here, by channel (`listen`).
    listening: HashMap<usize, (Arc<crate::notify::Channel>, Vec<Key>)>,
    /// Clients whose LISTEN waits for the upstream's.
    listen_waits: Vec<(Arc<crate::notify::Channel>, Key)>,
    /// Worker 0: the LISTEN connection of each hub.
    upstreams: HashMap<crate::notify::HubKey, Key>,
}

/// The worker's handler.
pub(crate) struct Worker {
    conns: Machines<Conn>,
    w: Shared,
}

impl Worker {
    pub(crate) fn new(
        id: WorkerId,
        sys: Sender<SysCmd>,
        peers: Vec<Sender<WorkerCmd>>,
        cfg: Arc<Config>,
        tls: Arc<TlsSet>,
        registry: Arc<Registry>,
        clients: Arc<AtomicUsize>,
    ) -> Self {
        let lookups = lookups_for(peers.get(id).cloned());
        Self {
            conns: Machines::default(),
            w: Shared {
                id,
                sys,
                peers,
                cfg,
                paused: Paused::default(),
                pause_waits: Vec::new(),
                started: Instant::now(),
                panic_on: std::env::var("ODISSEY_FAILPOINT_PANIC").ok(),
                tls,
                local: HashMap::new(),
                registry,
                clients,
                listeners: Vec::new(),
                listen_keepalive: None,
                routes: RouteCache::default(),
                dns: Dns::new(lookups),
                cancel_keys: HashMap::new(),
                dead: Vec::new(),
                again: Vec::new(),
                accept_later: Vec::new(),
                accept_next: Vec::new(),
                logins_later: Vec::new(),
                draining: false,
                sweep_set: false,
                balance_wanted: false,
                balance_set: false,
                cancel_drops: CancelDrops::default(),
                evts: Vec::new(),
                families: HashMap::new(),
                homeless: Vec::new(),
                hosts_seen: 0,
                turn: u16::try_from(id).unwrap_or(0),
                rng: 0x9E37_79B9_7F4A_7C15 ^ (id as u64 + 1),
                checks: health::Checks::default(),
                listening: HashMap::new(),
                listen_waits: Vec::new(),
                upstreams: HashMap::new(),
            },
        }
    }
}

impl Shared {
    /// How long a connection waits for its host name:
    /// `resolver::LOOKUP_TIMEOUT`, or `server_connect_timeout` if shorter.
    fn lookup_timeout(&self) -> std::time::Duration {
        let connect = std::time::Duration::from_millis(self.cfg.server_connect_timeout);
        if connect.is_zero() {
            LOOKUP_TIMEOUT
        } else {
            connect.min(LOOKUP_TIMEOUT)
        }
    }

    fn send(&self, cmd: SysCmd) {
        if self.sys.send(cmd).is_err() {
            debug!("worker {}: system thread gone", self.id);
        }
    }

    /// Time since this worker started (connection ages are kept relative
    /// to it, in few bytes).
    fn since_start(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Whether to ask a route's storage for TLS (never over a Unix socket,
    /// where PostgreSQL does not offer it, as libpq does).
    fn ask_tls(&self, route: &ResolvedRoute) -> AskTls {
        if route.storage.unix_socket_dir.is_some() {
            return AskTls::No;
        }
        match self.tls.storage.get(&route.route.storage).map(|t| t.mode) {
            // `allow` starts in plaintext; see `retries_with_tls`.
            None | Some(StorageTls::Disable | StorageTls::Allow) => AskTls::No,
            Some(StorageTls::Prefer) => AskTls::Prefer,
            Some(StorageTls::Require | StorageTls::VerifyCa | StorageTls::VerifyFull) => {
                AskTls::Require
            }
        }
    }

    /// A plaintext login to this route's storage is tried again over TLS
    /// when the server refuses it (`tls = "allow"`).
    fn retries_with_tls(&self, route: &ResolvedRoute) -> bool {
        route.storage.unix_socket_dir.is_none()
            && self.tls.storage.get(&route.route.storage).map(|t| t.mode) == Some(StorageTls::Allow)
    }

    /// What a machine's transition may touch, at the batch's `now`.
    fn cx(&mut self, now: Instant) -> Cx<'_> {
        Cx {
            now,
            started: self.started,
            cfg: &self.cfg,
            tls: &self.tls,
            routes: &mut self.routes,
            draining: self.draining,
            panic_on: self.panic_on.as_deref(),
            evts: &mut self.evts,
        }
    }
}

/// Microseconds since `started`, in the 32 bits a client keeps: they wrap
/// every 71 minutes, and differences taken with `wrapping_sub` stay right
/// for waits shorter than that.
fn since_start_us(started: Instant) -> u32 {
    started.elapsed().as_micros() as u32
}

/// `since_start_us` at `at` (a batch's clock): a wait timed from it is
/// never shorter than a deadline set from the same clock.
fn us_since_start_at(started: Instant, at: Instant) -> u32 {
    at.saturating_duration_since(started).as_micros() as u32
}

impl Handler for Worker {
    type Cmd = WorkerCmd;
    type Timer = WorkerTimer;

    fn ready(&mut self, cx: &mut Context<'_, WorkerTimer>, token: Token, ready: Ready) {
        if let Some(i) = listener_index(token) {
            self.accept_all(cx, i);
            return;
        }
        let Some(key) = self.conns.key_of(token) else {
            return;
        };
        // A bug in one connection's state machine must not take the worker
        // and every other connection down with it.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.on_ready(cx, key, ready);
        }));
        if ran.is_err() {
            self.contain_panic(cx, key);
        }
    }

    fn command(&mut self, cx: &mut Context<'_, WorkerTimer>, cmd: WorkerCmd) {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.on_command(cx, cmd);
        }));
        if ran.is_err() {
            error!(
                "worker {}: a command panicked; the worker goes on",
                self.w.id
            );
        }
    }

    fn timeout(&mut self, cx: &mut Context<'_, WorkerTimer>, id: TimerId, timer: WorkerTimer) {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.on_timeout(cx, id, timer);
        }));
        if ran.is_err() {
            error!(
                "worker {}: a deadline's handling panicked; the worker goes on",
                self.w.id
            );
        }
    }

    fn after_batch(&mut self, cx: &mut Context<'_, WorkerTimer>) {
        self.on_after_batch(cx);
    }
}

impl Worker {
    /// After a panic while running `key`: that connection (and its partner,
    /// whose state may be half-updated) is closed through the usual paths,
    /// so counts and the router's books stay right; the client hears
    /// XX000. If closing panics too, the slots are freed as they are.
    fn contain_panic(&mut self, cx: &mut Context<'_, WorkerTimer>, key: Key) {
        let (id, partner) = match self.conns.get(key) {
            Some(Conn::Client(c)) => (c.id.to_string(), c.server),
            Some(Conn::Server(s)) => (s.id.to_string(), s.client),
            _ => (String::new(), None),
        };
        error!("{id}: its state machine panicked (a bug); closing it and its partner");
        for k in [Some(key), partner].into_iter().flatten() {
            let closed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match self.conns.get(k) {
                    Some(Conn::Client(_)) => {
                        let f = Fatal::new("XX000", "internal error in odissey: connection closed");
                        self.close_client(cx, k, Some(f));
                    }
                    Some(Conn::Server(_)) => self.close_server(cx, k, "internal error"),
                    Some(Conn::Cancel(_) | Conn::Probe(_)) => self.kill(k),
                    Some(Conn::Check(_)) => self.drop_check(cx, k),
                    Some(Conn::Upstream(_)) => self.drop_upstream(cx, k, "internal error"),
                    Some(Conn::Dead) | None => {}
                }
            }));
            if closed.is_err() {
                self.kill(k);
            }
        }
    }

    fn on_ready(&mut self, cx: &mut Context<'_, WorkerTimer>, key: Key, ready: Ready) {
        match self.conns.get_mut(key) {
            Some(Conn::Client(c)) => {
                c.io.on_ready(ready);
                if matches!(c.state, ClientState::Login(_)) {
                    self.w.logins_later.push(key);
                } else {
                    self.drive_client(cx, key);
                    // A listener whose output drained: the rest of what
                    // was notified.
                    if let Some(Conn::Client(c)) = self.conns.get(key) {
                        if c.listens.is_some()
                            && c.io.out.is_empty()
                            && matches!(c.state, ClientState::Idle)
                        {
                            self.deliver(cx, key);
                        }
                    }
                }
            }
            Some(Conn::Server(s)) => {
                s.io.on_ready(ready);
                match (&s.state, s.client) {
                    (ServerState::Linked, Some(ck)) => self.drive_client(cx, ck),
                    _ => self.drive_server(cx, key),
                }
            }
            Some(Conn::Cancel(k)) => {
                k.io.on_ready(ready);
                self.drive_canceller(cx, key);
            }
            Some(Conn::Probe(p)) => {
                p.io.on_ready(ready);
                self.drive_probe(cx, key);
            }
            Some(Conn::Check(c)) => {
                c.io.on_ready(ready);
                self.drive_check(cx, key);
            }
            Some(Conn::Upstream(u)) => {
                u.io.on_ready(ready);
                self.drive_upstream(cx, key);
            }
            Some(Conn::Dead) | None => {}
        }
    }

    fn on_command(&mut self, cx: &mut Context<'_, WorkerTimer>, cmd: WorkerCmd) {
        match cmd {
            WorkerCmd::Listen {
                mut listeners,
                keepalive,
            } => {
                for (i, l) in listeners.iter_mut().enumerate() {
                    if let Err(e) = cx
                        .registry()
                        .register(l, listener_token(i), Interest::READABLE)
                    {
                        error!("worker {}: cannot poll a listener: {e}", self.w.id);
                    }
                }
                self.w.listeners = listeners;
                self.w.listen_keepalive = Some(keepalive);
                cx.set_timer(cx.now() + TICK, WorkerTimer::Tick);
                self.configure_checks(cx);
            }
            WorkerCmd::Granted { lease, pool, route } => self.granted(cx, lease, pool, route),
            WorkerCmd::Warm { pool, route } => {
                if self.w.draining {
                    self.w.send(SysCmd::ServerClosed {
                        pool,
                        worker: self.w.id,
                        server: None,
                        was: ServerWas::Opening,
                    });
                } else {
                    self.w.local(&pool, &route);
                    self.open_server(cx, pool, route);
                }
            }
            WorkerCmd::Reclaim { pool } => self.reclaim(cx, &pool),
            WorkerCmd::Retire { pool } => {
                let idle = self
                    .w
                    .local
                    .get(&pool)
                    .map(|lp| lp.idle.clone())
                    .unwrap_or_default();
                for sk in idle {
                    self.close_server(cx, sk, "its route changed");
                }
            }
            WorkerCmd::Shrink { pool } => {
                // The least recently used go first. The excess is taken
                // one by one before each close, so the workers racing for
                // it close no more than it between them.
                let Some(lp) = self.w.local.get(&pool) else {
                    return;
                };
                let idle: Vec<Key> = lp.idle.clone();
                for sk in idle {
                    let idle = matches!(self.conns.get(sk), Some(Conn::Server(s)) if matches!(s.state, ServerState::Idle));
                    let give_up = idle
                        && self
                            .w
                            .local
                            .get(&pool)
                            .is_some_and(|lp| lp.shared.give_up_oversize());
                    if give_up {
                        self.close_server(cx, sk, GiveUp::PoolSize.reason());
                    }
                }
            }
            WorkerCmd::Ship { server, to, pool } => self.ship(cx, server, to, pool),
            WorkerCmd::Adopt { server } => self.adopt(cx, server),
            WorkerCmd::CloseIdle { server } => {
                if let Some(Conn::Server(s)) = self.conns.get(server) {
                    if matches!(s.state, ServerState::Idle) {
                        let why = "the router let it go (reload or storage_max)";
                        self.close_server(cx, server, why);
                    }
                }
            }
            WorkerCmd::Configure { cfg, tls, id } => {
                self.w.cfg = cfg;
                self.w.tls = tls;
                self.w.routes.clear();
                self.w.families.clear();
                self.configure_checks(cx);
                self.w.send(SysCmd::Configured { id });
            }
            WorkerCmd::Cancel { pid, key } => {
                self.cancel_for(cx, pid, key);
            }
            WorkerCmd::Drain { deadline } => self.drain(cx, deadline),
            WorkerCmd::Snapshot { id } => {
                let (clients, servers) = self.snapshot();
                let pools = self.pool_counters();
                self.w.send(SysCmd::Snapshot {
                    id,
                    clients,
                    servers,
                    pools,
                });
            }
            WorkerCmd::ConsoleReply {
                client,
                data,
                close,
            } => {
                let Some(Conn::Client(c)) = self.conns.get_mut(client) else {
                    return;
                };
                if !matches!(c.state, ClientState::Console { .. }) {
                    return;
                }
                c.io.out.extend_from_slice(&data);
                if close {
                    self.close_client(cx, client, None);
                    return;
                }
                backend::ready_for_query(&mut c.io.out, TransactionStatus::Idle);
                c.enter_console();
                self.drive_client(cx, client);
            }
            WorkerCmd::Kill { id, target } => {
                let closed = self.kill_target(cx, &target);
                self.w.send(SysCmd::Killed { id, closed });
            }
            WorkerCmd::Pause { id, database } => {
                match &database {
                    Some(db) => {
                        self.w.paused.dbs.insert(db.clone());
                    }
                    None => self.w.paused.all = true,
                }
                self.w.pause_waits.push((id, database));
                self.check_pauses();
            }
            WorkerCmd::Resume { database } => {
                match &database {
                    Some(db) => {
                        self.w.paused.dbs.remove(db);
                    }
                    None => {
                        self.w.paused.all = false;
                        self.w.paused.dbs.clear();
                    }
                }
                self.serve_resumed(cx);
            }
            WorkerCmd::HostsMoved => self.hosts_moved(cx),
            WorkerCmd::Subscribe { hub, route } => self.upstream_wants(cx, hub, route),
            WorkerCmd::Unsubscribe { channel } => self.upstream_unwanted(cx, &channel),
            WorkerCmd::Notified { channel } => self.notified(cx, &channel),
            WorkerCmd::Listening { channel } => self.listening(cx, &channel),
            WorkerCmd::ListenFailed { channel, why } => self.listen_failed(cx, &channel, &why),
            WorkerCmd::Relistened { hub } => self.relistened(cx, &hub),
            WorkerCmd::Resolved { host, answer } => {
                if let Err(why) = &answer {
                    warn!(
                        "worker {}: DNS lookup of host {host:?} failed: {why}",
                        self.w.id
                    );
                }
                for r in self.w.dns.answered(&host, answer, cx.now()) {
                    self.resume(cx, r);
                }
            }
        }
    }

    fn on_timeout(&mut self, cx: &mut Context<'_, WorkerTimer>, _id: TimerId, timer: WorkerTimer) {
        match timer {
            WorkerTimer::Linger(ck) => {
                if matches!(self.conns.get(ck), Some(Conn::Client(c)) if matches!(c.state, ClientState::Closing))
                {
                    self.finish_close(ck);
                }
            }
            WorkerTimer::AuthTimeout(ck) => {
                let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
                    return;
                };
                c.deadline = None;
                if matches!(c.state, ClientState::Login(_) | ClientState::Verifying) {
                    info!("{}: login not finished within auth_timeout", c.id);
                    let f = Fatal::new(
                        "08P01",
                        "startup and authentication not finished within auth_timeout",
                    );
                    self.close_client(cx, ck, Some(f));
                }
            }
            WorkerTimer::PoolTimeout(ck) => {
                let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
                    return;
                };
                c.deadline = None;
                if !matches!(c.state, ClientState::Waiting) {
                    return;
                }
                if self.leave_homeless(ck) {
                    let f = self.no_host_fatal(ck, cx.now());
                    if let Some(Conn::Client(c)) = self.conns.get(ck) {
                        if let Some(f) = &f {
                            warn!("{}: {} (08006)", c.id, f.message);
                        }
                    }
                    self.close_client(cx, ck, f);
                    return;
                }
                let Some(Conn::Client(c)) = self.conns.get(ck) else {
                    return;
                };
                let (pool, timeout) = match (&c.pool, &c.route) {
                    (Some(p), Some(r)) => (p.to_string(), r.route.pool_timeout),
                    _ => (String::new(), 0),
                };
                let waited_ms = since_start_us(self.w.started).wrapping_sub(c.waiting_us) / 1000;
                warn!(
                    "{}: waited {waited_ms} ms for a server of {pool} (pool_timeout {timeout} ms); refused with 53300",
                    c.id
                );
                let f = Fatal::new(
                    "53300",
                    format!("timed out waiting for a server connection for route {pool} (pool_timeout {timeout} ms)"),
                );
                self.close_client(cx, ck, Some(f));
            }
            WorkerTimer::Recover(sk) => {
                if let Some(Conn::Server(s)) = self.conns.get_mut(sk) {
                    if let ServerState::Recovering(r) = &mut s.state {
                        r.timer = None;
                        self.close_server(
                            cx,
                            sk,
                            "did not come back clean in time (pool_reset_timeout)",
                        );
                    }
                }
            }
            WorkerTimer::Balance => self.balance(cx),
            WorkerTimer::HealthDue(i, epoch) => self.check_due(cx, i, epoch),
            WorkerTimer::HealthTimeout(k) => self.check_timed_out(cx, k),
            WorkerTimer::UpstreamRetry(hub, route) => self.upstream_retry(cx, hub, route),
            WorkerTimer::Tick => {
                self.tick(cx);
                if !self.w.draining {
                    cx.set_timer(cx.now() + TICK, WorkerTimer::Tick);
                }
            }
            WorkerTimer::ProbeTimeout(k) => {
                if let Some(Conn::Probe(p)) = self.conns.get_mut(k) {
                    p.timer = None;
                    let failure = failure::ServerFailure::NoAnswer;
                    self.finish_probe(cx, k, Err(failure));
                }
            }
            WorkerTimer::CancelTimeout(k) => {
                if let Some(Conn::Cancel(c)) = self.conns.get_mut(k) {
                    c.timer = None;
                    self.finish_canceller(cx, k);
                }
            }
            WorkerTimer::ResolveTimeout(id) => {
                let after = self.w.lookup_timeout();
                if let Some((host, parked)) = self.w.dns.timed_out(id, after, cx.now()) {
                    warn!(
                        "worker {}: DNS lookup of host {host:?} timed out after {} ms",
                        self.w.id,
                        after.as_millis()
                    );
                    for r in parked {
                        self.resume(cx, r);
                    }
                }
            }
            WorkerTimer::DrainSweep => {
                self.w.sweep_set = false;
                let idle: Vec<Key> = self
                    .conns
                    .iter()
                    // A client that has not had its first request answered
                    // (accepted from the backlog while draining) is let
                    // finish it.
                    .filter(|(_, c)| matches!(c, Conn::Client(c) if matches!(c.state, ClientState::Idle) && c.conv.answered_once()))
                    .map(|(k, _)| k)
                    .collect();
                for k in idle {
                    let f = Fatal::new("57P01", "terminating connection: odissey is shutting down");
                    self.close_client(cx, k, Some(f));
                }
            }
            WorkerTimer::DrainDeadline => {
                let keys: Vec<Key> = self.conns.iter().map(|(k, _)| k).collect();
                for k in keys {
                    match self.conns.get(k) {
                        Some(Conn::Client(_)) => self.close_client(
                            cx,
                            k,
                            Some(Fatal::new(
                                "57P01",
                                "terminating connection: odissey is shutting down",
                            )),
                        ),
                        Some(Conn::Server(_)) => self.close_server(cx, k, "shutdown"),
                        Some(Conn::Cancel(_)) => self.finish_canceller(cx, k),
                        Some(Conn::Probe(_)) => {
                            let failure = failure::ServerFailure::ShuttingDown;
                            self.finish_probe(cx, k, Err(failure));
                        }
                        Some(Conn::Check(_)) => self.drop_check(cx, k),
                        Some(Conn::Upstream(_)) => self.drop_upstream(cx, k, "shutdown"),
                        _ => {}
                    }
                }
            }
        }
    }

    fn on_after_batch(&mut self, cx: &mut Context<'_, WorkerTimer>) {
        // (Connections driven here run under the same supervision as in
        // `ready`.)
        for k in std::mem::take(&mut self.w.logins_later) {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if matches!(self.conns.get(k), Some(Conn::Client(_))) {
                    self.drive_client(cx, k);
                }
            }));
            if ran.is_err() {
                self.contain_panic(cx, k);
            }
        }
        // Listeners left with connections in the previous turn; this
        // turn's leftovers wait for the next (the batch in between serves
        // the connections already in).
        for i in std::mem::take(&mut self.w.accept_next) {
            self.accept_all(cx, i);
        }
        self.w.accept_next = std::mem::take(&mut self.w.accept_later);
        if !self.w.accept_next.is_empty() {
            cx.again();
        }
        for k in std::mem::take(&mut self.w.again) {
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match self.conns.get(k) {
                    Some(Conn::Client(_)) => self.drive_client(cx, k),
                    Some(Conn::Server(_)) => self.drive_server(cx, k),
                    Some(Conn::Probe(_)) => self.drive_probe(cx, k),
                    _ => {}
                }
            }));
            if ran.is_err() {
                self.contain_panic(cx, k);
            }
        }
        for k in self.w.dead.drain(..) {
            self.conns.remove(k);
        }
        if self.w.balance_wanted && !self.w.balance_set {
            self.w.balance_set = true;
            cx.set_timer(cx.now() + LEND_AFTER, WorkerTimer::Balance);
        }
        if !self.w.pause_waits.is_empty() {
            self.check_pauses();
        }
        if self.w.draining && self.conns.is_empty() {
            info!("worker {}: drained", self.w.id);
            self.w.send(SysCmd::Drained { worker: self.w.id });
            cx.stop();
        }
    }
}

impl Worker {
    /// Runs a client (and its server, if linked) until nothing moves: its
    /// transitions (`Client::on_io`), and what each asks of the worker.
    fn drive_client(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key) {
        for _ in 0..MAX_ROUNDS {
            let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
                return;
            };
            let next = c.on_io(&mut self.w.cx(cx.now()));
            let progress = match next {
                ClientNext::Stay(progress) => progress,
                ClientNext::Close(fatal) => {
                    self.close_client(cx, ck, fatal);
                    return;
                }
                ClientNext::Closed => {
                    self.finish_close(ck);
                    return;
                }
                ClientNext::AskServer(who) => {
                    self.ask_server(cx, ck, who);
                    return;
                }
                ClientNext::Verify { who, password } => {
                    self.verify_password(cx, ck, who, password);
                    return;
                }
                ClientNext::FetchSecret(who) => {
                    self.fetch_secret(cx, ck, who);
                    return;
                }
                ClientNext::Cancel { pid, key } => {
                    // The client with that key lives here or on another
                    // worker.
                    self.close_client(cx, ck, None);
                    if !self.cancel_for(cx, pid, key) {
                        for (i, peer) in self.w.peers.iter().enumerate() {
                            if i != self.w.id {
                                let _ = peer.send(WorkerCmd::Cancel { pid, key });
                            }
                        }
                    }
                    return;
                }
                ClientNext::LoggedIn(who) => {
                    self.logged_in(cx, ck, *who);
                    true
                }
                ClientNext::Attach => match self.try_listen(cx, ck) {
                    listen::Listened::No => {
                        self.attach(cx, ck);
                        true
                    }
                    listen::Listened::Answered => true,
                    listen::Listened::Waiting => return,
                },
                ClientNext::Relay => match self.try_listen_linked(cx, ck) {
                    listen::Listened::No => match self.relay_pair(cx, ck) {
                        Some(progress) => progress,
                        None => return,
                    },
                    listen::Listened::Answered => true,
                    listen::Listened::Waiting => return,
                },
                ClientNext::Console(command) => {
                    self.w.send(SysCmd::Console {
                        worker: self.w.id,
                        client: ck,
                        command,
                    });
                    return;
                }
            };
            if !progress {
                if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                    c.rest();
                }
                return;
            }
        }
        self.w.again.push(ck);
        cx.again();
    }
}

/// Puts a connection in the slab and registers its socket under its key's
/// token. The error, if registering failed: the slot is taken all the same,
/// for the caller to close through its usual path.
fn insert_registered(
    conns: &mut Machines<Conn>,
    registry: &mio::Registry,
    mut io: Io,
    make: impl FnOnce(Key, Io) -> Conn,
) -> (Key, Option<std::io::Error>) {
    let mut failed = None;
    let key = conns.insert_with(|key| {
        if let Err(e) = registry.register(
            &mut io.stream,
            key.token(),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            failed = Some(e);
        }
        make(key, io)
    });
    (key, failed)
}
