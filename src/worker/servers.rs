//! A server connection's own transitions, while no client drives it:
//! `drive_server` (connecting, logging in, idle, being reset),
//! `server_ready` and `fail_login` (how a login ends), `fail_first_waiter`
//! (a failed login tells the first queued client), `close_server` and
//! `close_server_telling`; and the free helpers of a server login,
//! `step_login`/`LoginStep` and `unconnected`, which the probes share.
//! Failures are `ServerFailure`s.

use std::sync::Arc;

use log::info;
use odissey_protocol::frontend;
use odissey_reactor::{Context, Key};

use crate::auth::Fatal;
use crate::backend_login::AskTls;
use crate::cmd::SysCmd;
use crate::ratelimit::limited;
use crate::router::{PoolKey, ServerWas};
use crate::session::Greeting;
use crate::worker::server::{ServerNext, ServerState};

use super::failure::ServerFailure;
use super::{Conn, Worker, WorkerTimer, MAX_ROUNDS};

impl Worker {
    /// Runs a server connection's transitions (`Server::on_io`) until it
    /// has nothing more to do, and does what each asks of the worker.
    pub(super) fn drive_server(&mut self, cx: &mut Context<'_, WorkerTimer>, sk: Key) {
        for _ in 0..MAX_ROUNDS {
            let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
                return;
            };
            let tls = self.w.tls.storage.get(&s.route.route.storage);
            match s.on_io(tls, &self.w.cfg) {
                ServerNext::Stay(true) => {}
                ServerNext::Stay(false) => return,
                ServerNext::Ready => {
                    self.server_ready(cx, sk);
                    return;
                }
                ServerNext::Failed(failure) => {
                    self.fail_login(cx, sk, failure);
                    return;
                }
                ServerNext::Linked(ck) => {
                    self.drive_client(cx, ck);
                    return;
                }
                ServerNext::Clean(timer) => {
                    if let Some(t) = timer {
                        cx.cancel_timer(t);
                    }
                    self.release_server(cx, sk);
                    return;
                }
                ServerNext::Close(why) => {
                    self.close_server(cx, sk, &why);
                    return;
                }
            }
        }
        self.w.again.push(sk);
        cx.again();
    }

    /// A server logged in (`Server::on_io` recorded what it reported): it
    /// joins its pool, and its reported values greet the pool's logins
    /// that asked for no setting of their own.
    fn server_ready(&mut self, cx: &mut Context<'_, WorkerTimer>, sk: Key) {
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        let pool = s.pool.clone();
        self.w.send(SysCmd::ServerUp { pool: pool.clone() });
        let defaults = Greeting::Ready(Arc::clone(&s.defaults));
        let route = Arc::clone(&s.route);
        let lp = self.w.local(&pool, &route);
        lp.shared.greetings.put(Default::default(), defaults);
        // What the server says of its host may re-route the queue first.
        self.login_reported(cx, sk);
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
        // A host of a routed route is banned and its clients go elsewhere.
        if !self.host_failed(cx, &pool, &format!("{failure} ({code})")) {
            self.fail_first_waiter(cx, &pool, failure.fatal());
        }
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
            .and_then(|lp| lp.waiters().next());
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
            ServerState::Linked | ServerState::Recovering(_) | ServerState::Moving => {
                ServerWas::Active
            }
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
                    c.unlink();
                }
                self.close_client(cx, ck, Some(fatal));
            }
        }
    }
}
