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
//! auth_query logins on a client's behalf), `server_conn` (a server
//! connection's own transitions: connecting, login, reset, closing; not
//! `server`, which would read as `crate::server`'s `Server` struct) and
//! `sweep` (tick, drain, kill, snapshot, pool counters, PAUSE checks).

mod accept;
mod cancel;
mod cx;
mod failure;
mod link;
mod pool;
mod probe;
mod server_conn;
mod sweep;
#[cfg(test)]
pub(crate) mod testkit;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use log::{debug, error, info, warn};
use odissey_protocol::backend::{self, TransactionStatus};
use odissey_protocol::codec;
use odissey_reactor::{Context, Handler, Interest, Key, Machines, Ready, Sender, TimerId, Token};
use odissey_transport::{connect, connect_unix, Listener, Stream, ALPN_POSTGRESQL};

use crate::auth::{Ctx, Fatal, Identity, Outcome, TlsView};
use crate::backend_login::AskTls;
use crate::client::{Client, ClientState};
use crate::cmd::{SysCmd, WorkerCmd};
use crate::config::{
    is_md5_hash, Config, ListenTls, PoolMode, ResolvedRoute, RouteCache, StorageTls, StorageType,
};
use crate::credentials;
use crate::io::Io;
use crate::resolver::{resolve_blocking, Dns, Lookup, Start, LOOKUP_TIMEOUT};
use crate::router::{GiveUp, PoolKey, Registry, ServerWas, WorkerId};
use crate::server::{Recovery, Server, ServerState};
use crate::session::Greeting;
use crate::tls::TlsSet;
use odissey_protocol::scram::ScramCredential;

use accept::{listener_index, listener_token};
use cancel::{CancelDrops, Canceller};
use cx::{Cx, Evt};
use link::{write_error, Next, Settle};
pub(crate) use link::{Conversation, Owed};
use pool::LocalPool;
use probe::{Job, Probe};

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
    /// A host name lookup took too long: what waits for it fails
    /// (`resolver::Dns::timed_out`).
    ResolveTimeout(u64),
}

/// What waits for a storage's host name to be resolved, to be run again
/// once it is (or to fail with the lookup's error).
#[derive(Debug)]
pub(crate) enum Resume {
    /// `open_server_asking`.
    Server {
        pool: PoolKey,
        route: Arc<ResolvedRoute>,
        ask: AskTls,
        tls_retry: bool,
    },
    /// `send_cancel` (a recovering server waits for it: `cancelling`);
    /// otherwise only while the server still runs the request that started
    /// at `request` (a late cancel must not hit the next client's query).
    Cancel {
        server: Key,
        recovering: bool,
        request: Option<Instant>,
    },
    /// `start_probe`, for a client still `Verifying`.
    Probe {
        client: Key,
        who: Box<Identity>,
        route: Arc<ResolvedRoute>,
        credential: Option<ScramCredential>,
        job: Job,
        ask: Option<AskTls>,
    },
}

/// A storage connection as far as it could be started now.
enum Opened {
    Stream(Stream),
    /// Why not, for the client and the log (names the host and port).
    Failed(failure::ServerFailure),
    /// The host name is being resolved: park the caller.
    Wait,
}

/// What `relay_pair` does once a pump's borrows end.
enum After {
    /// The pair goes on; whether anything moved.
    Stay(bool),
    Close(Option<Fatal>),
    /// The server goes back to the pool; the client waits idle.
    Release,
    /// Draining: the server goes, and the client is closed shortly.
    Drain,
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
    /// Cancels dropped since the last summary line.
    cancel_drops: CancelDrops,
    /// What the machines raised during the event being handled (reused;
    /// applied before the event returns: `Worker::apply`).
    evts: Vec<Evt>,
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
                cancel_drops: CancelDrops::default(),
                evts: Vec::new(),
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

    fn max_len(&self) -> usize {
        self.cfg.max_message_size
    }
}

/// What a console client hears after authentication. `server_version`
/// names odissey (as PgBouncer's console does); the rest are the settings
/// drivers check for.
fn console_greet(out: &mut BytesMut, application_name: &str) {
    let version = format!("odissey {}", env!("CARGO_PKG_VERSION"));
    for (name, value) in [
        ("server_version", version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", application_name),
    ] {
        backend::parameter_status(out, name, value);
    }
    let key = uuid::Uuid::new_v4().into_bytes();
    let pid = u32::from_be_bytes([key[0], key[1], key[2], key[3]]) & 0x7fff_ffff;
    let secret = u32::from_be_bytes([key[8], key[9], key[10], key[11]]);
    backend::backend_key_data(out, pid, secret);
    backend::ready_for_query(out, TransactionStatus::Idle);
}

/// Microseconds since `started`, in the 32 bits a client keeps: they wrap
/// every 71 minutes, and differences taken with `wrapping_sub` stay right
/// for waits shorter than that.
fn since_start_us(started: Instant) -> u32 {
    started.elapsed().as_micros() as u32
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
            WorkerCmd::Reclaim { pool } => {
                let id = self.w.id;
                if let Some(lp) = self.w.local.get_mut(&pool) {
                    if let Some(sk) = lp.idle.pop() {
                        lp.shared.taken(id);
                        self.w.send(SysCmd::Release {
                            pool,
                            worker: id,
                            server: sk,
                        });
                    }
                }
            }
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
                c.state = ClientState::Console {
                    busy: false,
                    skipping: false,
                };
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
    /// Runs a client (and its server, if linked) until nothing moves.
    fn drive_client(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key) {
        let readahead = self.w.cfg.readahead;
        for _ in 0..MAX_ROUNDS {
            let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
                return;
            };
            let mut progress = c.io.flush();
            let limit = c
                .relay
                .wanted(&c.io.rx)
                .map_or(readahead, |w| w.max(readahead));
            if c.io.fill(limit) {
                progress = true;
                // The batch's clock: no clock read per socket read.
                c.active_ms = cx
                    .now()
                    .saturating_duration_since(self.w.started)
                    .as_millis() as u32;
            }
            let state = std::mem::replace(&mut c.state, ClientState::Idle);
            match state {
                ClientState::Login(login) => {
                    let listener = self
                        .w
                        .tls
                        .listen
                        .get(usize::from(c.listener))
                        .and_then(Option::as_ref);
                    let peer_cn = c.io.stream.peer_common_name();
                    let mut lx = Ctx {
                        cfg: &self.w.cfg,
                        routes: &mut self.w.routes,
                        tls: tls_view(&self.w.tls, c, peer_cn.as_deref()),
                    };
                    match login.step(&mut c.io.rx, &mut c.io.out, &mut lx) {
                        Ok((login, Outcome::NeedMore)) => c.state = ClientState::Login(login),
                        Ok((
                            login,
                            Outcome::StartTls {
                                already_read,
                                direct,
                            },
                        )) => {
                            // The 'S' must leave in plaintext, before the
                            // stream turns to TLS.
                            c.io.writable = true;
                            c.io.flush();
                            let started = match listener {
                                Some(l) if c.io.out.is_empty() => {
                                    c.io.stream
                                        .start_tls_server(&l.server, &already_read)
                                        .map_err(|e| e.to_string())
                                }
                                Some(_) => Err("the client does not read".into()),
                                None => Err("TLS is not enabled".into()),
                            };
                            if let Err(e) = started {
                                info!("{}: cannot start TLS: {e}", c.id);
                                self.close_client(cx, ck, None);
                                return;
                            }
                            c.tls_direct = direct;
                            // The rest of a ClientHello may already be in the
                            // socket: read without waiting for an edge.
                            c.io.readable = true;
                            c.state = ClientState::Login(login);
                            progress = true;
                        }
                        Ok((_, Outcome::AskServer(who))) => {
                            c.state = ClientState::Verifying;
                            self.ask_server(cx, ck, who);
                            return;
                        }
                        Ok((_, Outcome::Verify { who, password })) => {
                            c.state = ClientState::Verifying;
                            self.verify_password(cx, ck, who, password);
                            return;
                        }
                        Ok((_, Outcome::FetchSecret(who))) => {
                            c.state = ClientState::Verifying;
                            self.fetch_secret(cx, ck, who);
                            return;
                        }
                        Ok((_, Outcome::Cancel { pid, key })) => {
                            // The client with that key lives here or on
                            // another worker; the protocol wants no answer.
                            debug!("{}: cancel request for pid {pid}", c.id);
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
                        Ok((_, Outcome::Authenticated(_))) if c.reject => {
                            let f = Fatal::new("53300", "too many clients: client_max reached");
                            self.close_client(cx, ck, Some(f));
                            return;
                        }
                        Ok((_, Outcome::Authenticated(who))) => {
                            self.logged_in(cx, ck, *who);
                            progress = true;
                        }
                        Err(f) => {
                            let why = c.io.stream.tls_error();
                            info!(
                                "{}: login refused: {} ({}){}",
                                c.id,
                                f.logged(),
                                f.code,
                                why.map(|w| format!("; TLS: {w}")).unwrap_or_default()
                            );
                            self.close_client(cx, ck, Some(f));
                            return;
                        }
                    }
                    if c_eof(&self.conns, ck) {
                        self.close_client(cx, ck, None);
                        return;
                    }
                }
                ClientState::Idle => {
                    c.state = ClientState::Idle;
                    if !c.io.rx.is_empty() {
                        match codec::peek_frontend_header(&c.io.rx, self.w.max_len()) {
                            Ok(Some((b'X', _))) => {
                                self.close_client(cx, ck, None);
                                return;
                            }
                            Ok(_) if self.w.draining && c.conv.answered_once() => {
                                let f = Fatal::new(
                                    "57P01",
                                    "terminating connection: odissey is shutting down",
                                );
                                self.close_client(cx, ck, Some(f));
                                return;
                            }
                            Ok(_) => {
                                self.attach(cx, ck);
                                progress = true;
                            }
                            Err(e) => {
                                self.close_client(cx, ck, Some(Fatal::violation(e)));
                                return;
                            }
                        }
                    } else if c.io.eof {
                        self.close_client(cx, ck, None);
                        return;
                    }
                }
                ClientState::Verifying => {
                    c.state = ClientState::Verifying;
                    // Nothing may come before the verdict; bytes that do
                    // wait (a pipelining client's first query).
                    if c.io.eof {
                        self.close_client(cx, ck, None);
                    }
                    return;
                }
                ClientState::Console { busy, skipping } => {
                    c.state = ClientState::Console { busy, skipping };
                    if c.io.eof {
                        self.close_client(cx, ck, None);
                        return;
                    }
                    if busy {
                        // One command at a time; what follows waits in rx.
                        return;
                    }
                    match self.console_input(ck) {
                        Ok(p) => progress |= p,
                        Err(fatal) => {
                            self.close_client(cx, ck, fatal);
                            return;
                        }
                    }
                }
                ClientState::Closing => {
                    c.state = ClientState::Closing;
                    c.io.rx.clear();
                    if c.io.eof {
                        self.finish_close(ck);
                    }
                    return;
                }
                ClientState::Waiting => {
                    c.state = ClientState::Waiting;
                    if c.io.eof {
                        self.close_client(cx, ck, None);
                        return;
                    }
                }
                ClientState::Linked => {
                    c.state = ClientState::Linked;
                    match self.relay_pair(cx, ck) {
                        Some(p) => progress |= p,
                        None => return,
                    }
                }
            }
            if !progress {
                if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                    if matches!(c.state, ClientState::Idle | ClientState::Waiting) {
                        c.io.shrink();
                        if c.prepared.as_ref().is_some_and(|p| p.is_pristine()) {
                            c.prepared = None;
                        }
                    }
                }
                return;
            }
        }
        self.w.again.push(ck);
        cx.again();
    }

    /// Moves bytes both ways between a linked client and server
    /// (`link::pump`) and does what comes of it. None when the pair was
    /// closed or split.
    fn relay_pair(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key) -> Option<bool> {
        let Some(Conn::Client(c)) = self.conns.get(ck) else {
            return None;
        };
        let sk = c.server?;
        let Some((Conn::Client(c), Conn::Server(s))) = self.conns.get2_mut(ck, sk) else {
            return None;
        };
        let mut lx = Cx {
            now: cx.now(),
            cfg: &self.w.cfg,
            panic_on: self.w.panic_on.as_deref(),
            evts: &mut self.w.evts,
        };
        let after = match link::pump(c, s, &mut lx) {
            Next::Relaying(progress) => After::Stay(progress),
            Next::Close(fatal) => After::Close(fatal),
            // A cancel for this server is on its way: nobody else may get
            // it before the postmaster has taken the cancel
            // (`finish_canceller` drives the pair again).
            Next::Clean(progress) if s.cancel_inflight && !self.w.draining => After::Stay(progress),
            Next::Clean(_) if self.w.draining => After::Drain,
            Next::Clean(progress) if link::follows_session(c) => match link::settle(c, s) {
                Settle::Checking => After::Stay(true),
                Settle::Keep => After::Stay(progress),
                Settle::Release => After::Release,
            },
            // Session pooling: the client keeps its server.
            Next::Clean(progress) => After::Stay(progress),
        };
        self.apply();
        match after {
            After::Stay(progress) => Some(progress),
            After::Close(fatal) => {
                self.close_client(cx, ck, fatal);
                None
            }
            After::Release => {
                self.unlink_and_release(cx, ck, sk);
                Some(true)
            }
            After::Drain => {
                // The transaction is over: the server goes, and the client
                // is told a moment later, so that the error does not arrive
                // in the same read as the reply (some drivers would take it
                // for the reply's).
                self.unlink_and_release(cx, ck, sk);
                if !self.w.sweep_set {
                    self.w.sweep_set = true;
                    cx.set_timer(cx.now() + DRAIN_SWEEP, WorkerTimer::DrainSweep);
                }
                Some(true)
            }
        }
    }

    /// Does what the machines raised (`Evt`), in order. Called before
    /// returning from the event that ran them.
    fn apply(&mut self) {
        if self.w.evts.is_empty() {
            return;
        }
        let mut evts = std::mem::take(&mut self.w.evts);
        for evt in evts.drain(..) {
            match evt {
                Evt::Greeted { client, cancel_key } => {
                    self.w.cancel_keys.insert(cancel_key, client);
                }
                Evt::Greeting {
                    pool,
                    key,
                    greeting,
                } => {
                    if let Some(lp) = self.w.local.get(&pool) {
                        lp.shared.greetings.put(key, greeting);
                    }
                }
            }
        }
        // The queue keeps its memory for the next event.
        self.w.evts = evts;
    }

    fn logged_in(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key, mut who: Identity) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        // SCRAM keys from the client's proof log the pool in as that user
        // when no server password is configured (the secret it was checked
        // against is the server's own, e.g. from auth_query).
        let r = &who.route;
        if r.server_password.is_none() && r.server_user == who.user {
            let learned = who.keys.take().or_else(|| {
                // An md5 hash the client proved knowledge of (auth_query).
                who.secret
                    .as_ref()
                    .filter(|s| r.route.auth_query.is_some() && is_md5_hash(s))
                    .map(|s| ScramCredential::Password(s.clone()))
            });
            if let Some(login) = learned {
                credentials::remember_login(&r.route.storage, &r.server_user, login);
            }
        }
        if who.route.storage.kind == StorageType::Local {
            info!("{}: console login as {}@{}", c.id, who.user, who.database);
            if let Some(t) = c.deadline.take() {
                cx.cancel_timer(t);
            }
            let app = who
                .params
                .iter()
                .find(|(n, _)| n == "application_name")
                .map_or("", |(_, v)| v.as_str());
            console_greet(&mut c.io.out, app);
            c.route = Some(who.route);
            c.state = ClientState::Console {
                busy: false,
                skipping: false,
            };
            return;
        }
        let pool = PoolKey::new(&who.database, &who.user, &who.route);
        // Every client of a pool shares the key's strings, not a copy each.
        self.w.local(&pool, &who.route);
        let pool = match self.w.local.get_key_value(&pool) {
            Some((shared, _)) => shared.clone(),
            None => pool,
        };
        if self.w.cfg.log_session {
            info!(
                "{}: login as {}@{} (route {}.{}, {} mode) from {}",
                c.id,
                who.user,
                who.database,
                who.route.rule_db,
                who.route.rule_user,
                who.route.route.pool.as_str(),
                c.io.stream.peer()
            );
        }
        let rate = who.route.route.client_rate;
        if rate > 0 {
            let now_s = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as u32);
            let n = self.w.local(&pool, &who.route).shared.count_login(now_s);
            if n > rate {
                let f = Fatal::new(
                    "53300",
                    format!(
                        "too many new connections for route {}.{}: more than {rate} per second (client_rate)",
                        who.route.rule_db, who.route.rule_user
                    ),
                );
                self.close_client(cx, ck, Some(f));
                return;
            }
        }
        let max = who.route.route.client_max;
        let n = self
            .w
            .local(&pool, &who.route)
            .shared
            .clients
            .fetch_add(1, AtomicOrdering::Relaxed);
        if max > 0 && n >= max {
            self.w
                .local(&pool, &who.route)
                .shared
                .clients
                .fetch_sub(1, AtomicOrdering::Relaxed);
            let f = Fatal::new(
                "53300",
                format!(
                    "too many clients for route {}.{} (client_max {max})",
                    who.route.rule_db, who.route.rule_user
                ),
            );
            self.close_client(cx, ck, Some(f));
            return;
        }
        c.pool = Some(pool.clone());
        // Every startup parameter is part of the session, `-c` options
        // first and the packet's own parameters over them, as PostgreSQL
        // applies them. A value the pool's servers start with anyway is
        // left out: nothing to send for it.
        let options = who
            .params
            .iter()
            .filter(|(n, _)| n == "options")
            .flat_map(|(_, v)| crate::params::parse_options(v));
        let plain = who
            .params
            .iter()
            .filter(|(n, _)| n != "options")
            .map(|(n, v)| (n.clone(), v.clone()));
        let defaults = self
            .w
            .local
            .get(&pool)
            .and_then(|lp| lp.shared.greetings.base());
        for (name, value) in options.chain(plain) {
            if !crate::session::valid_name(&name) {
                let f = Fatal::new(
                    "42704",
                    format!("unrecognized configuration parameter \"{name}\""),
                );
                self.close_client(cx, ck, Some(f));
                return;
            }
            let value = if name.eq_ignore_ascii_case("client_encoding") {
                crate::session::canonical_encoding(&value).map_or(value, str::to_string)
            } else {
                value
            };
            let default = defaults
                .as_deref()
                .and_then(|d| crate::params::get(d, &name));
            if default == Some(value.as_str()) {
                c.session.remove(&name);
            } else {
                c.session.set(&name, &value);
            }
        }
        let track = who.route.route.prepared_statements
            && matches!(
                who.route.route.pool,
                PoolMode::Transaction | PoolMode::Statement
            );
        c.track_prepared = track;
        // The startup parameters live on in `c.session`, the names in the
        // pool key: an idle client keeps nothing else of its login.
        c.route = Some(who.route);
        if let Some(t) = c.deadline.take() {
            cx.cancel_timer(t);
        }
        c.state = ClientState::Idle;
        // Session pooling greets with the client's own server (its pid
        // included); the other modes with what a server said to a login
        // with the same settings, if any worker has heard it yet.
        let session_mode = c.route.as_ref().map(|r| r.route.pool) == Some(PoolMode::Session);
        let known = if session_mode {
            None
        } else {
            let key = crate::session::greeting_key(&c.session);
            self.w
                .local
                .get(&pool)
                .and_then(|lp| lp.shared.greetings.get(&key))
        };
        match known {
            Some(Greeting::Ready(params)) => {
                let cancel_key = link::greet(c, &params, None);
                self.w.cancel_keys.insert(cancel_key, ck);
            }
            Some(Greeting::Refused { code, message, .. }) => {
                self.close_client(cx, ck, Some(Fatal::from_server(code, message)));
            }
            None => self.attach(cx, ck),
        }
    }

    /// Gives server `sk` to client `ck` (`link::begin` sends the server
    /// what the client's session needs first) and runs the pair.
    fn link(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key, sk: Key) {
        let Some((Conn::Client(c), Conn::Server(s))) = self.conns.get2_mut(ck, sk) else {
            return;
        };
        debug!("{}: linked to {}", c.id, s.id);
        if matches!(c.state, ClientState::Waiting) {
            let waited = since_start_us(self.w.started).wrapping_sub(c.waiting_us);
            if let Some(lp) = self.w.local.get_mut(&s.pool) {
                lp.totals.waited(u64::from(waited));
            }
        }
        c.server = Some(sk);
        c.state = ClientState::Linked;
        s.client = Some(ck);
        s.state = ServerState::Linked;
        let mut lx = Cx {
            now: cx.now(),
            cfg: &self.w.cfg,
            panic_on: self.w.panic_on.as_deref(),
            evts: &mut self.w.evts,
        };
        link::begin(c, s, &mut lx);
        self.apply();
        self.drive_client(cx, ck);
    }

    /// Closes a client, with a FATAL error first when given. Its server, if
    /// any, is reset and released when it is between requests, and closed
    /// when it is not: an abandoned transaction never reaches anyone else.
    fn close_client(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key, fatal: Option<Fatal>) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        if matches!(c.state, ClientState::Closing) {
            self.finish_close(ck);
            return;
        }
        if let Some(t) = c.deadline.take() {
            cx.cancel_timer(t);
        }
        if let Some(f) = &fatal {
            if f.verbatim {
                backend::error_response(&mut c.io.out, "FATAL", &f.code, &f.message, None);
            } else {
                write_error(&mut c.io.out, c.id, "FATAL", &f.code, &f.message);
            }
        }
        // Whatever is owed (a last reply, the error) goes out in one try,
        // even without a writable edge; a client that doesn't read it loses it.
        c.io.writable = true;
        c.io.flush();
        if self.w.cfg.log_session && c.route.is_some() {
            match &fatal {
                Some(f) => info!("{}: disconnected: {} ({})", c.id, f.message, f.code),
                None => info!("{}: disconnected", c.id),
            }
        } else {
            debug!("{}: closing ({})", c.id, c.state.name());
        }
        // After an error, the socket stays open a moment (or until the
        // client closes it): a driver that reads the error and the end of
        // the stream in one go may report "connection closed" instead of
        // the error (tokio-postgres does).
        let linger = fatal.is_some() && !c.io.eof && c.io.out.is_empty();
        if matches!(c.state, ClientState::Waiting) {
            if let Some(pool) = c.pool.clone() {
                self.dequeue(cx, ck, &pool);
            }
        }
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        let mid_message = !c.relay.at_boundary();
        let owed = c.conv.owed(c.relay.held(&c.io.rx));
        let statements_in_flight = c.prepared.as_ref().is_some_and(|p| !p.pipeline.is_idle());
        let mode = c.route.as_ref().map(|r| r.route.pool);
        // State only its server holds (pinned), or a change not yet read
        // back: the server is reset whole before anyone else gets it.
        let unknown_session = c.pinned.is_some() || c.check_due;
        if let Some(k) = c.cancel_key.take() {
            self.w.cancel_keys.remove(&k);
        }
        let server = c.server.take();
        let pool = c.pool.take();
        if linger {
            c.state = ClientState::Closing;
            c.io.rx.clear();
            cx.set_timer(cx.now() + LINGER, WorkerTimer::Linger(ck));
        } else {
            self.kill(ck);
        }
        self.w.clients.fetch_sub(1, AtomicOrdering::Relaxed);
        if let Some(lp) = pool.and_then(|p| self.w.local.get(&p)) {
            lp.shared.clients.fetch_sub(1, AtomicOrdering::Relaxed);
        }
        let Some(sk) = server else {
            return;
        };
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        s.client = None;
        if self.w.draining {
            self.close_server(cx, sk, "shutdown");
            return;
        }
        if mid_message || s.io.eof {
            // The server holds part of a message it can never complete.
            self.close_server(cx, sk, "its client left in the middle of a message");
            return;
        }
        // Bring the connection back to a clean idle state before anyone
        // else gets it: close a COPY, finish a pipeline, cancel what runs,
        // wait for every reply, roll back, reset.
        let route = Arc::clone(&s.route);
        let unknown_session = unknown_session || s.check.take().is_some();
        let timeout = std::time::Duration::from_millis(route.route.pool_reset_timeout.max(1));
        let timer = cx.set_timer(cx.now() + timeout, WorkerTimer::Recover(sk));
        let discard = mode == Some(PoolMode::Session) || unknown_session;
        let r = Recovery::start(s, owed, discard, statements_in_flight, Some(timer));
        let replies = r.replies;
        s.state = ServerState::Recovering(r);
        if replies > 0 {
            debug!(
                "{}: its client left with {replies} request(s) in flight",
                s.id
            );
            if route.route.pool_cancel {
                self.send_cancel(cx, sk, true);
            }
        }
        self.drive_server(cx, sk);
    }

    /// Starts a non-blocking connection to storage `st`: its Unix socket
    /// (`<dir>/.s.PGSQL.<port>`, as libpq names it) or its TCP address. At
    /// once for a Unix socket, an IP address or a host name `Dns` knows;
    /// otherwise a lookup runs off this thread and the caller parks
    /// (`park`) until it ends.
    fn open_storage(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        st: &crate::config::Storage,
    ) -> Opened {
        let cannot = |e: &dyn std::fmt::Display| failure::ServerFailure::Connect {
            host: st.host.clone(),
            port: st.port,
            error: e.to_string(),
        };
        let opened = match &st.unix_socket_dir {
            Some(dir) => {
                let path = std::path::Path::new(dir).join(format!(".s.PGSQL.{}", st.port));
                connect_unix(&path)
            }
            None => match self.w.dns.lookup(&st.host, st.port, cx.now()) {
                Lookup::Ready(addr) => connect(addr),
                Lookup::Failed(e) => return Opened::Failed(cannot(&e)),
                Lookup::Wait => return Opened::Wait,
            },
        };
        match opened {
            Ok(s) => Opened::Stream(s),
            Err(e) => Opened::Failed(cannot(&e)),
        }
    }

    /// Parks `r` until `host` is resolved; the first to wait for it sets
    /// the lookup's deadline.
    fn park(&mut self, cx: &mut Context<'_, WorkerTimer>, host: &str, r: Resume) {
        debug!(
            "worker {}: waiting for host {host:?} to be resolved",
            self.w.id
        );
        if let Some(id) = self.w.dns.park(host, r) {
            let at = cx.now() + self.w.lookup_timeout();
            cx.set_timer(at, WorkerTimer::ResolveTimeout(id));
        }
    }

    /// Runs again what waited for a host name (it finds the answer, or
    /// the failure, in `Dns` now).
    fn resume(&mut self, cx: &mut Context<'_, WorkerTimer>, r: Resume) {
        match r {
            Resume::Server {
                pool,
                route,
                ask,
                tls_retry,
            } => self.open_server_asking(cx, pool, route, ask, tls_retry),
            Resume::Cancel {
                server,
                recovering,
                request,
            } => {
                let same = matches!(self.conns.get(server), Some(Conn::Server(s)) if s.query_start == request);
                if recovering || same {
                    self.send_cancel(cx, server, recovering);
                } else {
                    debug!(
                        "worker {}: a cancel waited for DNS past its request: dropped",
                        self.w.id
                    );
                }
            }
            Resume::Probe {
                client,
                who,
                route,
                credential,
                job,
                ask,
            } => {
                // A client that gave up (auth_timeout, EOF) needs no probe.
                if matches!(self.conns.get(client), Some(Conn::Client(c)) if matches!(c.state, ClientState::Verifying))
                {
                    self.start_probe(cx, client, who, route, credential, job, ask);
                }
            }
        }
    }

    /// Ends a lingering client: free the slot, which closes the socket.
    fn finish_close(&mut self, ck: Key) {
        if let Some(Conn::Client(_)) = self.conns.get(ck) {
            self.kill(ck);
        }
    }

    /// Takes a console client's queries: each command goes to the system
    /// thread, one at a time. An error when the connection is to end: the
    /// client said Terminate (no error to send) or broke the protocol.
    ///
    /// Other messages are answered as PostgreSQL answers them: a
    /// FunctionCall is an error followed by ReadyForQuery; an extended
    /// protocol message is an error, after which everything up to the next
    /// Sync is ignored (`skipping` in its state marks that stretch), and
    /// the Sync gets
    /// ReadyForQuery; COPY messages outside COPY are ignored; a type
    /// PostgreSQL does not accept is FATAL.
    fn console_input(&mut self, ck: Key) -> Result<bool, Option<Fatal>> {
        let max_len = self.w.max_len();
        let worker = self.w.id;
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return Err(None);
        };
        let mut progress = false;
        let mut skipping = matches!(c.state, ClientState::Console { skipping: true, .. });
        loop {
            let frame = match codec::peek_frontend_header(&c.io.rx, max_len)
                .and_then(|_| codec::read_frame(&mut c.io.rx, max_len))
            {
                Ok(Some(f)) => f,
                Ok(None) => {
                    c.state = ClientState::Console {
                        busy: false,
                        skipping,
                    };
                    return Ok(progress);
                }
                Err(e) => return Err(Some(Fatal::violation(e))),
            };
            progress = true;
            match frame.tag {
                b'X' => return Err(None),
                b'S' => {
                    skipping = false;
                    backend::ready_for_query(&mut c.io.out, TransactionStatus::Idle);
                }
                // Skipping to the Sync after an extended-protocol error.
                _ if skipping => {}
                b'Q' => {
                    let sql = frame
                        .body
                        .strip_suffix(&[0u8])
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .unwrap_or("");
                    match crate::console::parse(sql) {
                        Ok(command) => {
                            debug!("{}: console command {command:?}", c.id);
                            c.state = ClientState::Console {
                                busy: true,
                                skipping: false,
                            };
                            self.w.send(SysCmd::Console {
                                worker,
                                client: ck,
                                command,
                            });
                            return Ok(true);
                        }
                        Err(message) => {
                            write_error(&mut c.io.out, c.id, "ERROR", "42601", &message);
                            backend::ready_for_query(&mut c.io.out, TransactionStatus::Idle);
                        }
                    }
                }
                // Flush, and COPY messages outside COPY: nothing to do.
                b'H' | b'd' | b'c' | b'f' => {}
                b'F' => {
                    write_error(
                        &mut c.io.out,
                        c.id,
                        "ERROR",
                        "0A000",
                        "the console speaks the simple query protocol only",
                    );
                    backend::ready_for_query(&mut c.io.out, TransactionStatus::Idle);
                }
                // Parse, Bind, Describe, Execute, Close.
                _ => {
                    write_error(
                        &mut c.io.out,
                        c.id,
                        "ERROR",
                        "0A000",
                        "the console speaks the simple query protocol only",
                    );
                    skipping = true;
                }
            }
        }
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

/// How a client's connection stands with TLS, for its login.
fn tls_view<'a>(tls: &TlsSet, c: &Client, peer_cn: Option<&'a str>) -> TlsView<'a> {
    let listener = tls
        .listen
        .get(usize::from(c.listener))
        .and_then(Option::as_ref);
    TlsView {
        mode: listener.map_or(ListenTls::Disable, |l| l.mode),
        on: c.io.stream.is_tls(),
        direct: c.tls_direct,
        alpn_postgresql: c.io.stream.alpn().as_deref() == Some(ALPN_POSTGRESQL),
        peer_cn,
    }
}

/// Starts the lookups of a worker's `Dns`: one thread per host name
/// (`Dns` runs one lookup per name at a time), which answers through the
/// worker's own channel.
fn lookups_for(me: Option<Sender<WorkerCmd>>) -> Start {
    Box::new(move |host: &str| {
        let Some(me) = me.clone() else {
            return Err(std::io::Error::other("no channel to answer on"));
        };
        let host = host.to_string();
        std::thread::Builder::new()
            .name("odissey-resolve".into())
            .spawn(move || {
                let answer = resolve_blocking(&host);
                // The worker may have stopped meanwhile: nobody to tell.
                let _ = me.send(WorkerCmd::Resolved { host, answer });
            })
            .map(|_| ())
    })
}

fn c_eof(conns: &Machines<Conn>, ck: Key) -> bool {
    matches!(conns.get(ck), Some(Conn::Client(c)) if c.io.eof && matches!(c.state, ClientState::Login(_)))
}
