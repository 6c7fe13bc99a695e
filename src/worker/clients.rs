//! The worker's side of a client's life: admitting one that logged in
//! (`logged_in`: its pool, its limits, its session from the startup
//! packet, its greeting) and closing one (`close_client`: the FATAL it is
//! told, its cancel key, its counts, and its server handed to recovery
//! with what the client left owing). The client's own transitions are in
//! `client`.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use bytes::BytesMut;
use log::{debug, info};
use odissey_protocol::backend::{self, TransactionStatus};
use odissey_protocol::scram::ScramCredential;
use odissey_reactor::{Context, Key};

use crate::auth::{Fatal, Identity};
use crate::config::{is_md5_hash, PoolMode, StorageType};
use crate::credentials;
use crate::router::PoolKey;
use crate::session::Greeting;

use super::client::{self, write_error, ClientState};
use super::cx::Evt;
use super::link::{self, Next, Settle};
use super::{since_start_us, Conn, Worker, WorkerTimer, DRAIN_SWEEP, LINGER};

impl Worker {
    /// Gives server `sk` to client `ck` (`link::begin` sends the server
    /// what the client's session needs first) and runs the pair.
    pub(super) fn link(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key, sk: Key) {
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
        c.link_to(sk);
        s.link_to(ck);
        link::begin(c, s, &mut self.w.cx(cx.now()));
        self.apply();
        self.drive_client(cx, ck);
    }

    /// Moves bytes both ways between a linked client and server
    /// (`link::pump`) and does what comes of it. None when the pair was
    /// closed or split.
    pub(super) fn relay_pair(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
    ) -> Option<bool> {
        let Some(Conn::Client(c)) = self.conns.get(ck) else {
            return None;
        };
        let sk = c.server?;
        let Some((Conn::Client(c), Conn::Server(s))) = self.conns.get2_mut(ck, sk) else {
            return None;
        };
        let after = match link::pump(c, s, &mut self.w.cx(cx.now())) {
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
        let listen_ended = c.listens.as_ref().is_some_and(|l| l.outcome.is_some());
        self.apply();
        if listen_ended {
            self.listen_block_ended(cx, ck);
        }
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
    pub(super) fn apply(&mut self) {
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

    pub(super) fn logged_in(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        mut who: Identity,
    ) {
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
            c.enter_console();
            return;
        }
        // A route with several hosts (or a role to ask for) chooses the
        // host per transaction; the client starts on the one it would get
        // now (its greeting comes from that pool).
        let listener_tsa = self
            .w
            .cfg
            .listen
            .get(usize::from(c.listener))
            .and_then(|l| l.target_session_attrs);
        let family = who.route.is_routed(listener_tsa).then(|| {
            let tsa = listener_tsa.unwrap_or(who.route.target_session_attrs);
            self.w.family(&who.database, &who.user, &who.route, tsa)
        });
        let pool = match &family {
            Some(f) => {
                // Each client's round robin starts one further.
                self.w.turn = self.w.turn.wrapping_add(1);
                c.turn = self.w.turn;
                let i = self.w.choose_host(f, cx.now(), c.turn).unwrap_or(0);
                f.keys[i].clone()
            }
            None => {
                let pool = PoolKey::new(&who.database, &who.user, &who.route, 0);
                // Every client of a pool shares the key's strings, not a
                // copy each.
                self.w.local(&pool, &who.route);
                match self.w.local.get_key_value(&pool) {
                    Some((shared, _)) => shared.clone(),
                    None => pool,
                }
            }
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
        let mut n = self
            .w
            .local(&pool, &who.route)
            .shared
            .clients
            .fetch_add(1, AtomicOrdering::Relaxed);
        // client_max counts the route's clients on all its hosts.
        for k in family
            .iter()
            .flat_map(|f| f.keys.iter())
            .filter(|&k| *k != pool)
        {
            n += self
                .w
                .local(k, &who.route)
                .shared
                .clients
                .load(AtomicOrdering::Relaxed);
        }
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
        c.family = family;
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
        c.unlink();
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
                let cancel_key = client::greet(c, &params, None);
                self.w.cancel_keys.insert(cancel_key, ck);
            }
            Some(Greeting::Refused { code, message, .. }) => {
                self.close_client(cx, ck, Some(Fatal::from_server(code, message)));
            }
            None => self.attach(cx, ck),
        }
    }

    /// Closes a client, with a FATAL error first when given. Its server, if
    /// any, is reset and released when it is between requests, and closed
    /// when it is not: an abandoned transaction never reaches anyone else.
    pub(super) fn close_client(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        fatal: Option<Fatal>,
    ) {
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
        self.stop_listening(cx, ck);
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
            c.linger();
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
        let replies = s.recover(owed, discard, statements_in_flight, Some(timer));
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

    /// Ends a lingering client: free the slot, which closes the socket.
    pub(super) fn finish_close(&mut self, ck: Key) {
        if let Some(Conn::Client(_)) = self.conns.get(ck) {
            self.kill(ck);
        }
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
