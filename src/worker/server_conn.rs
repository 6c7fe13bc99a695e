//! A server connection's own transitions, while no client drives it:
//! `drive_server` (connecting, logging in, idle, being reset),
//! `server_ready` and `fail_login` (how a login ends), `fail_first_waiter`
//! (a failed login tells the first queued client), `close_server` and
//! `close_server_telling`; and the free helpers of a server login,
//! `step_login`/`LoginStep` and `unconnected`, which the probes share.
//! Failures are `ServerFailure`s.

use std::sync::Arc;

use log::info;
use odissey_protocol::backend::TransactionStatus;
use odissey_protocol::{codec, frontend};
use odissey_reactor::{Context, Key};

use crate::auth::Fatal;
use crate::backend_login::{AskTls, BackendLogin, Progress};
use crate::client::ClientState;
use crate::cmd::SysCmd;
use crate::io::Io;
use crate::ratelimit::limited;
use crate::router::{PoolKey, ServerWas};
use crate::server::{Recovered, ServerState};
use crate::session::Greeting;
use crate::tls::StorageTlsConfig;

use super::failure::ServerFailure;
use super::{Conn, Worker, WorkerTimer, MAX_ROUNDS};

impl Worker {
    /// Drives a server that is not linked: connecting, logging in, idle or
    /// being reset.
    pub(super) fn drive_server(&mut self, cx: &mut Context<'_, WorkerTimer>, sk: Key) {
        for _ in 0..MAX_ROUNDS {
            let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
                return;
            };
            let mut progress = s.io.flush();
            let state = std::mem::replace(&mut s.state, ServerState::Idle);
            match state {
                ServerState::Connecting(login) => match s.io.stream.take_error() {
                    Ok(None) if s.io.stream.is_connected() => {
                        s.io.writable = true;
                        s.state = ServerState::LoggingIn(login);
                        progress = true;
                    }
                    Ok(None) if !s.io.eof => s.state = ServerState::Connecting(login),
                    Ok(Some(e)) | Err(e) => {
                        let failure = ServerFailure::Connect {
                            host: s.route.storage.host.clone(),
                            port: s.route.storage.port,
                            error: e.to_string(),
                        };
                        self.fail_login(cx, sk, failure);
                        return;
                    }
                    Ok(None) => {
                        let failure = unconnected(&s.io, &s.route.storage);
                        self.fail_login(cx, sk, failure);
                        return;
                    }
                },
                ServerState::LoggingIn(mut login) => {
                    let tls = self.w.tls.storage.get(&s.route.route.storage);
                    let host = &s.route.storage.host;
                    let (moved, step) =
                        step_login(&mut s.io, &mut login, tls, host, self.w.cfg.readahead);
                    progress |= moved;
                    match step {
                        LoginStep::Pending => s.state = ServerState::LoggingIn(login),
                        LoginStep::Ready => {
                            self.server_ready(cx, sk, login);
                            return;
                        }
                        LoginStep::Failed(failure) => {
                            self.fail_login(cx, sk, failure);
                            return;
                        }
                    }
                }
                ServerState::Idle => {
                    s.state = ServerState::Idle;
                    progress |= s.io.fill(self.w.cfg.readahead);
                    let why = crate::server::idle_input(&mut s.io.rx, s.io.eof);
                    if let Some(why) = why {
                        self.close_server(cx, sk, &why);
                        return;
                    }
                }
                ServerState::Linked => {
                    s.state = ServerState::Linked;
                    if let Some(ck) = s.client {
                        self.drive_client(cx, ck);
                    }
                    return;
                }
                ServerState::Recovering(r) => {
                    progress |= s.io.fill(self.w.cfg.readahead);
                    let (moved, next) = r.step(s, self.w.max_len());
                    progress |= moved;
                    match next {
                        Recovered::Pending(r) => {
                            progress |= s.io.flush();
                            s.state = ServerState::Recovering(r);
                        }
                        Recovered::Clean(timer) => {
                            if let Some(t) = timer {
                                cx.cancel_timer(t);
                            }
                            self.release_server(cx, sk);
                            return;
                        }
                        Recovered::Close(r, why) => {
                            s.state = ServerState::Recovering(r);
                            self.close_server(cx, sk, why);
                            return;
                        }
                    }
                }
            }
            if !progress {
                return;
            }
        }
        self.w.again.push(sk);
        cx.again();
    }

    fn server_ready(&mut self, cx: &mut Context<'_, WorkerTimer>, sk: Key, login: BackendLogin) {
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        info!(
            "{}: logged in to {} as {}",
            s.id, s.route.server_db, s.route.server_user
        );
        s.state = ServerState::Idle;
        s.status = TransactionStatus::Idle;
        s.key = login.key;
        s.params.clone_from(&login.params);
        s.defaults = Arc::new(login.params);
        let pool = s.pool.clone();
        self.w.send(SysCmd::ServerUp { pool: pool.clone() });
        let defaults = Greeting::Ready(Arc::clone(&s.defaults));
        let route = Arc::clone(&s.route);
        let lp = self.w.local(&pool, &route);
        lp.shared.greetings.put(Default::default(), defaults);
        self.offer(cx, sk, true);
    }

    /// A server opened for a client could not log in: the client hears why.
    pub(super) fn fail_login(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        sk: Key,
        failure: ServerFailure,
    ) {
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        let code = failure.code();
        // 08006 is odissey's own (no connection, TLS failed): a retry would
        // meet the same. Anything else is the server refusing the login.
        if s.tls_retry && code != "08006" {
            info!(
                "{}: {failure} ({code}); trying again over TLS (tls = allow)",
                s.id
            );
            let (pool, route) = (s.pool.clone(), Arc::clone(&s.route));
            self.kill(sk);
            // The router's slot for this connection carries over.
            self.open_server_asking(cx, pool, route, AskTls::Require, false);
            return;
        }
        limited!(warn, "{}: {failure} ({code})", s.id);
        let pool = s.pool.clone();
        self.kill(sk);
        self.w.send(SysCmd::ServerClosed {
            pool: pool.clone(),
            worker: self.w.id,
            server: Some(sk),
            was: ServerWas::Opening,
        });
        self.fail_first_waiter(cx, &pool, failure.fatal());
    }

    /// A server opened for this worker's queue failed: the first client in
    /// the queue hears why (as PgBouncer tells its waiting clients); the
    /// others keep waiting for another try.
    pub(super) fn fail_first_waiter(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        pool: &PoolKey,
        fatal: Fatal,
    ) {
        // Paused (an operator restarting the server), the clients are held,
        // not failed: RESUME asks for servers again.
        let paused = self.w.paused.holds(&pool.database);
        let first = self
            .w
            .local
            .get(pool)
            .filter(|_| !paused)
            .and_then(|lp| lp.queue.front().copied());
        match first {
            Some(ck) => self.close_client(cx, ck, Some(fatal)),
            None => self.w.balance_needs(pool),
        }
    }

    pub(super) fn close_server(&mut self, cx: &mut Context<'_, WorkerTimer>, sk: Key, why: &str) {
        let f = Fatal::new("08006", "server connection closed");
        self.close_server_telling(cx, sk, why, f);
    }

    /// Closes a server; its client, if it has one, hears `fatal`.
    pub(super) fn close_server_telling(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        sk: Key,
        why: &str,
        fatal: Fatal,
    ) {
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        if !s.counters.is_empty() {
            let counters = std::mem::take(&mut s.counters);
            if let Some(lp) = self.w.local.get_mut(&s.pool) {
                lp.totals.merge(&counters);
            }
        }
        info!("{}: closing ({}): {why}", s.id, s.state.name());
        if matches!(s.state, ServerState::Idle) {
            if let Some(lp) = self.w.local.get_mut(&s.pool) {
                if let Some(i) = lp.idle.iter().position(|k| *k == sk) {
                    lp.idle.swap_remove(i);
                    lp.shared.taken(self.w.id);
                }
            }
        }
        let was = match s.state {
            ServerState::Connecting(_) | ServerState::LoggingIn(_) => ServerWas::Opening,
            ServerState::Idle => ServerWas::Idle,
            ServerState::Linked | ServerState::Recovering(_) => ServerWas::Active,
        };
        if !s.io.eof {
            frontend::terminate(&mut s.io.out);
            s.io.writable = true;
            s.io.flush();
        }
        let pool = s.pool.clone();
        let client = s.client.take();
        self.kill(sk);
        self.w.send(SysCmd::ServerClosed {
            pool,
            worker: self.w.id,
            server: Some(sk),
            was,
        });
        if let Some(ck) = client {
            if matches!(self.conns.get(ck), Some(Conn::Client(c)) if c.server == Some(sk)) {
                if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                    c.server = None;
                    c.state = ClientState::Idle;
                }
                self.close_client(cx, ck, Some(fatal));
            }
        }
    }
}

/// Where a server login stands after a step.
pub(super) enum LoginStep {
    Pending,
    Ready,
    Failed(ServerFailure),
}

/// Moves a server login on as far as the socket allows: the answer to
/// SSLRequest and the start of TLS, then the login messages. Shared by pooled
/// servers and passthrough checks. The bool says whether anything moved.
pub(super) fn step_login(
    io: &mut Io,
    login: &mut BackendLogin,
    tls: Option<&StorageTlsConfig>,
    host: &str,
    readahead: usize,
) -> (bool, LoginStep) {
    let ended = |io: &Io| {
        LoginStep::Failed(
            io.stream
                .tls_error()
                .map_or(ServerFailure::ClosedDuringLogin, ServerFailure::Tls),
        )
    };
    let mut progress = io.fill(readahead);
    if login.awaits_tls_answer() {
        let Some(&answer) = io.rx.first() else {
            return (
                progress,
                if io.eof {
                    ended(io)
                } else {
                    LoginStep::Pending
                },
            );
        };
        let _ = io.rx.split_to(1);
        progress = true;
        match login.tls_answer(answer, &mut io.out) {
            Ok(true) => {
                if !io.rx.is_empty() {
                    // Bytes before our ClientHello: a man in the middle's
                    // injection (CVE-2021-23222).
                    let failure = ServerFailure::InjectedBeforeTls;
                    return (progress, LoginStep::Failed(failure));
                }
                let started = match tls {
                    Some(t) => io
                        .stream
                        .start_tls_client(&t.client, host)
                        .map_err(|e| e.to_string()),
                    None => Err("no TLS configuration".into()),
                };
                if let Err(e) = started {
                    return (progress, LoginStep::Failed(ServerFailure::TlsStart(e)));
                }
                login.tls_started(&mut io.out);
                io.readable = true;
                io.writable = true;
                io.flush();
                io.fill(readahead);
            }
            Ok(false) => {}
            // No refusal by the server: odissey's own failure (08006).
            Err(e) => return (progress, LoginStep::Failed(ServerFailure::Login(e))),
        }
    }
    loop {
        match codec::read_frame(&mut io.rx, 1 << 20) {
            Ok(Some(f)) => {
                progress = true;
                match login.handle(&f, &mut io.out) {
                    Ok(Progress::Continue) => {}
                    Ok(Progress::Ready) => return (progress, LoginStep::Ready),
                    Err(e) => return (progress, LoginStep::Failed(ServerFailure::login(e))),
                }
            }
            Ok(None) => break,
            Err(e) => return (progress, LoginStep::Failed(ServerFailure::Protocol(e))),
        }
    }
    if io.eof {
        return (progress, ended(io));
    }
    progress |= io.flush();
    (progress, LoginStep::Pending)
}

/// Why a connect that had not completed ended: the socket error a write or
/// read met (ECONNREFUSED shows there once the startup message is sent),
/// named with the host and port.
pub(super) fn unconnected(io: &Io, st: &crate::config::Storage) -> ServerFailure {
    let (host, port) = (st.host.clone(), st.port);
    match io.error {
        Some(kind) => ServerFailure::Connect {
            host,
            port,
            error: std::io::Error::from(kind).to_string(),
        },
        None => ServerFailure::ClosedWhileConnecting { host, port },
    }
}
