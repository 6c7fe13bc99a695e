//! What a worker does over all its connections rather than for one: the
//! once-a-second `tick` (timeouts, lifetimes, summaries), graceful `drain`,
//! `kill`/`kill_target`, the `snapshot` and pool counters the console and
//! facade read, and the PAUSE/RESUME checks.

use std::collections::HashMap;
use std::time::Instant;

use log::{debug, info, warn};
use odissey_facade::{ClientInfo, ServerInfo};
use odissey_protocol::backend::TransactionStatus;
use odissey_reactor::{Context, Key};

use crate::auth::Fatal;
use crate::cmd::SysCmd;
use crate::config::{PoolMode, StorageType};
use crate::router::PoolKey;
use crate::stats::Counters;
use crate::worker::client::ClientState;
use crate::worker::server::ServerState;

use super::failure::ServerFailure;
use super::{since_start_us, Conn, Worker, WorkerTimer};

impl Worker {
    /// Reports the PAUSEs whose scope has no transaction running here any
    /// more. Session-pooled clients keep their servers through a pause, so
    /// only transaction and statement pooling are waited for.
    pub(super) fn check_pauses(&mut self) {
        let waits = std::mem::take(&mut self.w.pause_waits);
        for (id, scope) in waits {
            let busy = self.conns.iter().any(|(_, conn)| {
                matches!(conn, Conn::Client(c)
                if matches!(c.state, ClientState::Linked)
                    // A pinned client holds its server like a session one.
                    && c.pinned.is_none()
                    && c.route.as_ref().is_some_and(|r| r.route.pool != PoolMode::Session)
                    && c.pool.as_ref().is_some_and(|p| {
                        scope.as_deref().is_none_or(|db| &*p.database == db)
                    }))
            });
            if busy {
                self.w.pause_waits.push((id, scope));
            } else {
                self.w.send(SysCmd::Paused { id });
            }
        }
    }

    /// After a RESUME: the clients queued for databases no longer paused
    /// are served again (idle servers here first, then the router).
    pub(super) fn serve_resumed(&mut self, cx: &mut Context<'_, WorkerTimer>) {
        let pools: Vec<PoolKey> = self
            .w
            .local
            .iter()
            .filter(|(k, lp)| !lp.nobody_waits() && !self.w.paused.holds(&k.database))
            .map(|(k, _)| k.clone())
            .collect();
        for pool in pools {
            let queued: Vec<Key> = match self.w.local.get(&pool) {
                Some(lp) => lp.waiters().collect(),
                None => continue,
            };
            for ck in queued {
                self.dequeue(cx, ck, &pool);
                if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                    if matches!(c.state, ClientState::Waiting) {
                        c.unlink();
                        self.attach(cx, ck);
                    }
                }
            }
        }
    }

    /// This worker's connections, for `SHOW CLIENTS`/`SERVERS` and the
    /// facade's inspect.
    pub(super) fn snapshot(&self) -> (Vec<ClientInfo>, Vec<ServerInfo>) {
        let now_s = self.w.since_start().as_secs();
        let now_us = since_start_us(self.w.started);
        let id_of = |k: Option<Key>| match k.and_then(|k| self.conns.get(k)) {
            Some(Conn::Client(c)) => Some(c.id.to_string()),
            Some(Conn::Server(s)) => Some(s.id.to_string()),
            _ => None,
        };
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for (_, conn) in self.conns.iter() {
            match conn {
                Conn::Client(c) => {
                    let (database, user) = match (&c.pool, &c.route) {
                        (Some(p), _) => (p.database.to_string(), p.user.to_string()),
                        (None, Some(r)) if r.storage.kind == StorageType::Local => {
                            (r.rule_db.clone(), r.rule_user.clone())
                        }
                        _ => (String::new(), String::new()),
                    };
                    let state = match c.state {
                        ClientState::Login(_) | ClientState::Moving => "login",
                        ClientState::Verifying => "verifying",
                        ClientState::Idle => "idle",
                        ClientState::Waiting => "waiting",
                        ClientState::Linked => "active",
                        ClientState::Closing => "closing",
                        ClientState::Console { .. } => "console",
                    };
                    let wait_us = if matches!(c.state, ClientState::Waiting) {
                        u64::from(now_us.wrapping_sub(c.waiting_us))
                    } else {
                        0
                    };
                    clients.push(ClientInfo {
                        id: c.id.to_string(),
                        worker: self.w.id,
                        database,
                        user,
                        state: state.into(),
                        addr: c.io.stream.peer().to_string(),
                        tls: c.io.stream.tls_description(),
                        connected_secs: now_s.saturating_sub(u64::from(c.born_s)),
                        wait_us,
                        server: id_of(c.server),
                        pinned: c.pinned.map(str::to_string),
                    });
                }
                Conn::Server(s) => {
                    let state = match s.state {
                        ServerState::Connecting(_) => "connecting",
                        ServerState::LoggingIn(_) => "login",
                        ServerState::Idle => "idle",
                        ServerState::Linked => "active",
                        ServerState::Recovering(_) | ServerState::Moving => "recovering",
                    };
                    servers.push(ServerInfo {
                        id: s.id.to_string(),
                        worker: self.w.id,
                        database: s.pool.database.to_string(),
                        user: s.pool.user.to_string(),
                        state: state.into(),
                        addr: s.io.stream.peer().to_string(),
                        tls: s.io.stream.tls_description(),
                        connected_secs: s.born.elapsed().as_secs(),
                        client: if matches!(s.state, ServerState::Linked) {
                            id_of(s.client)
                        } else {
                            None
                        },
                        remote_pid: s.key.map(|(pid, _)| pid),
                    });
                }
                Conn::Cancel(_)
                | Conn::Probe(_)
                | Conn::Check(_)
                | Conn::Upstream(_)
                | Conn::Dead => {}
            }
        }
        (clients, servers)
    }

    /// The once-a-second sweep: idle servers past `pool_ttl` or
    /// `server_lifetime` close; clients idle past `client_idle_timeout`, or
    /// idle inside a transaction past `idle_in_transaction_timeout`, are
    /// disconnected; a query running past `query_timeout` is cancelled.
    pub(super) fn tick(&mut self, cx: &mut Context<'_, WorkerTimer>) {
        let drops = std::mem::take(&mut self.w.cancel_drops);
        if drops.busy + drops.full + drops.failed > 0 {
            warn!(
                "{} cancel request(s) not forwarded in the last second: {} for no running request, \
                 {} with one already in flight for that server, {} beyond cancel_max, {} failed to connect",
                drops.total(),
                drops.idle,
                drops.busy,
                drops.full,
                drops.failed
            );
        } else if drops.total() > 0 {
            // Late cancels (the reply won the race) are normal.
            debug!(
                "{} cancel request(s) for no running request dropped",
                drops.idle
            );
        }
        let now_ms = self.w.since_start().as_millis() as u32;
        let mut old_servers = Vec::new();
        let mut idle_clients = Vec::new();
        let mut idle_in_xact = Vec::new();
        let mut slow = Vec::new();
        let mut hung = Vec::new();
        let mut unanswered = Vec::new();
        let mut stalled = Vec::new();
        let connect_timeout = self.w.cfg.server_connect_timeout;
        for (k, conn) in self.conns.iter() {
            match conn {
                Conn::Server(s)
                    if matches!(
                        s.state,
                        ServerState::Connecting(_) | ServerState::LoggingIn(_)
                    ) && connect_timeout > 0
                        && s.born.elapsed().as_millis() >= connect_timeout.into() =>
                {
                    let st = s.route.endpoint(s.pool.host);
                    let (host, port) = (st.host.clone(), st.port);
                    let after_ms = connect_timeout;
                    let failure = if matches!(s.state, ServerState::Connecting(_)) {
                        ServerFailure::ConnectTimeout {
                            host,
                            port,
                            after_ms,
                        }
                    } else {
                        ServerFailure::LoginTimeout {
                            host,
                            port,
                            after_ms,
                        }
                    };
                    unanswered.push((k, failure));
                }
                Conn::Server(s) if matches!(s.state, ServerState::Idle) => {
                    let r = &s.route.route;
                    if r.pool_ttl > 0 && s.idle_since.elapsed().as_secs() >= r.pool_ttl {
                        old_servers.push((k, "idle longer than pool_ttl"));
                    } else if r.server_lifetime > 0
                        && s.born.elapsed().as_secs() >= r.server_lifetime
                    {
                        old_servers.push((k, "older than server_lifetime"));
                    }
                }
                Conn::Client(c) => {
                    let Some(r) = c.route.as_ref().map(|r| &r.route) else {
                        continue;
                    };
                    let quiet = u64::from(now_ms.wrapping_sub(c.active_ms)) / 1000;
                    let server = c.server.and_then(|sk| match self.conns.get(sk) {
                        Some(Conn::Server(s)) => Some((sk, s)),
                        _ => None,
                    });
                    let in_xact = server.is_some_and(|(_, s)| s.status != TransactionStatus::Idle);
                    let busy = c.conv.busy();
                    match c.state {
                        ClientState::Idle | ClientState::Linked
                            if !busy
                                && !in_xact
                                && r.client_idle_timeout > 0
                                && quiet >= r.client_idle_timeout =>
                        {
                            idle_clients.push(k);
                        }
                        ClientState::Linked
                            if !busy
                                && in_xact
                                && r.idle_in_transaction_timeout > 0
                                && quiet >= r.idle_in_transaction_timeout =>
                        {
                            idle_in_xact.push(k);
                        }
                        // The client itself stopped half-way through a
                        // message: the server waits for the rest (as
                        // PostgreSQL's backend would, for ever), so it is
                        // the client's fault, not the server's.
                        ClientState::Linked
                            if busy
                                && r.query_timeout > 0
                                && quiet >= r.query_timeout
                                && c.relay.unfinished(&c.io.rx) =>
                        {
                            stalled.push(k);
                        }
                        ClientState::Linked if busy && r.query_timeout > 0 => {
                            if let Some((sk, s)) = server {
                                let started = s.query_start;
                                let ran = started.map_or(0, |t| t.elapsed().as_secs());
                                if ran >= r.query_timeout && s.cancelled != started {
                                    slow.push((sk, started));
                                } else if ran >= 2 * r.query_timeout && s.cancelled == started {
                                    // Cancelled a query_timeout ago and still
                                    // running: the server is gone (a network
                                    // cut, a stopped host), not just slow.
                                    hung.push(sk);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        for (sk, why) in old_servers {
            self.close_server(cx, sk, why);
        }
        for ck in idle_clients {
            let f = Fatal::new(
                "57P05",
                "terminating connection due to idle timeout (client_idle_timeout)",
            );
            self.close_client(cx, ck, Some(f));
        }
        for ck in idle_in_xact {
            let f = Fatal::new(
                "25P03",
                "terminating connection due to idle-in-transaction timeout (idle_in_transaction_timeout)",
            );
            self.close_client(cx, ck, Some(f));
        }
        for (sk, failure) in unanswered {
            self.fail_login(cx, sk, failure);
        }
        for ck in stalled {
            let f = Fatal::new(
                "08P01",
                "the client did not finish sending its message within query_timeout: connection closed",
            );
            self.close_client(cx, ck, Some(f));
        }
        for sk in hung {
            let f = Fatal::new(
                "08006",
                "the server did not answer the query nor its cancel request within query_timeout: connection closed",
            );
            self.close_server_telling(
                cx,
                sk,
                "no answer to a query nor to its cancel (query_timeout)",
                f,
            );
        }
        for (sk, started) in slow {
            if let Some(Conn::Server(s)) = self.conns.get_mut(sk) {
                info!(
                    "{}: query running longer than query_timeout: cancelling it",
                    s.id
                );
                s.cancelled = started;
            }
            self.send_cancel(cx, sk, false);
        }
    }

    /// Each pool's counters on this worker: what released servers brought
    /// in, plus what busy ones have done so far.
    pub(super) fn pool_counters(&self) -> Vec<(PoolKey, Counters)> {
        let mut by_pool: HashMap<PoolKey, Counters> = self
            .w
            .local
            .iter()
            .map(|(k, lp)| (k.clone(), lp.totals.clone()))
            .collect();
        for (_, conn) in self.conns.iter() {
            if let Conn::Server(s) = conn {
                if !s.counters.is_empty() {
                    by_pool
                        .entry(s.pool.clone())
                        .or_default()
                        .merge(&s.counters);
                }
            }
        }
        by_pool.into_iter().collect()
    }

    /// The console's KILL: the client with that id, or every client and
    /// server of the database of that name. Returns how many were closed
    /// (the console answers a KILL that matched nothing with an error).
    pub(super) fn kill_target(&mut self, cx: &mut Context<'_, WorkerTimer>, target: &str) -> usize {
        let mut clients = Vec::new();
        let mut servers = Vec::new();
        for (k, conn) in self.conns.iter() {
            match conn {
                Conn::Client(c) => {
                    let of_db = c.pool.as_ref().is_some_and(|p| &*p.database == target);
                    if of_db || c.id.to_string() == target {
                        clients.push(k);
                    }
                }
                Conn::Server(s) if &*s.pool.database == target => servers.push(k),
                _ => {}
            }
        }
        let closed = clients.len() + servers.len();
        for k in clients {
            if let Some(Conn::Client(c)) = self.conns.get(k) {
                info!("{}: killed from the console", c.id);
            }
            let f = Fatal::new(
                "57P01",
                "terminating connection due to administrator command (KILL)",
            );
            self.close_client(cx, k, Some(f));
        }
        for k in servers {
            self.close_server(cx, k, "killed from the console");
        }
        closed
    }

    /// Frees a connection's slot. Dropping its stream closes the socket
    /// (no shutdown(2) first) and closing removes it from the poll, so no
    /// `epoll_ctl(DEL)` is needed either: two system calls less per
    /// connection. Only a stream that lives on (moved to another worker)
    /// must be deregistered.
    pub(super) fn kill(&mut self, k: Key) {
        if let Some(slot) = self.conns.get_mut(k) {
            if let Conn::Server(s) = slot {
                // (One handed to the router left the count already.)
                if let (false, Some(lp)) = (s.lent, self.w.local.get_mut(&s.pool)) {
                    lp.count_held(self.w.id, false);
                }
            }
            if !matches!(slot, Conn::Dead) {
                *slot = Conn::Dead;
                self.w.dead.push(k);
            }
        }
    }

    pub(super) fn drain(&mut self, cx: &mut Context<'_, WorkerTimer>, deadline: Instant) {
        // Connections already queued to the listeners are taken and served
        // (their first request), not reset with the socket: with a
        // successor bound to the same address (SO_REUSEPORT) no connection
        // attempt fails during a handover.
        for i in 0..self.w.listeners.len() {
            loop {
                self.w.accept_later.clear();
                self.accept_all(cx, i);
                if self.w.accept_later.is_empty() {
                    break;
                }
            }
        }
        self.w.accept_next.clear();
        self.w.draining = true;
        for mut l in self.w.listeners.drain(..) {
            let _ = cx.registry().deregister(&mut l);
        }
        cx.set_timer(deadline, WorkerTimer::DrainDeadline);
        let keys: Vec<Key> = self.conns.iter().map(|(k, _)| k).collect();
        for k in keys {
            match self.conns.get(k) {
                Some(Conn::Client(c)) => match c.state {
                    ClientState::Linked => self.drive_client(cx, k),
                    // Still logging in, or holding a request: let it through
                    // (closed at its next clean point, or at the deadline).
                    ClientState::Login(_) | ClientState::Verifying | ClientState::Waiting => {}
                    ClientState::Idle if !c.conv.answered_once() => {}
                    _ => {
                        let f =
                            Fatal::new("57P01", "terminating connection: odissey is shutting down");
                        self.close_client(cx, k, Some(f));
                    }
                },
                Some(Conn::Server(s)) if matches!(s.state, ServerState::Idle) => {
                    self.close_server(cx, k, "shutdown")
                }
                // Health checks and LISTEN connections end with the worker.
                Some(Conn::Check(_)) => self.drop_check(cx, k),
                Some(Conn::Upstream(_)) => self.drop_upstream(cx, k, "shutdown"),
                _ => {}
            }
        }
    }
}
