//! A server (backend) connection and its states.

use std::sync::Arc;

use bytes::BytesMut;
use odissey_protocol::backend::TransactionStatus;
use odissey_protocol::codec;
use odissey_reactor::{Key, TimerId};

use std::borrow::Cow;

use log::{debug, info};
use odissey_protocol::backend::BackendMessage;
use odissey_protocol::frontend;

use crate::backend_login::{BackendLogin, Progress};
use crate::config::Config;
use crate::tls::StorageTlsConfig;

use super::failure::ServerFailure;
use crate::config::ResolvedRoute;
use crate::ids::ConnId;
use crate::io::Io;
use crate::params::Params;
use crate::prepared::ServerStatements;
use crate::relay::Relay;
use crate::relay::{frame_of, Step};
use crate::router::PoolKey;
use crate::session::{Check, Settings};

/// What a server connection waits for.
#[derive(Debug)]
pub(crate) enum ServerState {
    /// The TCP connect to finish (writability).
    Connecting(BackendLogin),
    /// The login exchange up to ReadyForQuery.
    LoggingIn(BackendLogin),
    /// A client to be granted it; it sits in the router's idle list.
    Idle,
    /// Its client's traffic.
    Linked,
    /// Its client left: odissey brings it back to a clean idle state
    /// (cancel, drain, ROLLBACK, DISCARD ALL) before it is reused.
    Recovering(Recovery),
    /// Not a state: what the slot holds while `on_io` runs a transition,
    /// which takes the old state by value and always puts the next one
    /// back before it returns. Never seen outside it.
    Moving,
}

/// Where the recovery of a server connection stands.
#[derive(Debug)]
pub(crate) struct Recovery {
    /// ReadyForQuery messages still owed for requests already sent.
    pub(crate) replies: usize,
    /// ROLLBACK may be sent (route's pool_rollback).
    pub(crate) may_rollback: bool,
    /// DISCARD ALL is due once idle (session pooling).
    pub(crate) discard: bool,
    /// DEALLOCATE ALL is due once idle: the client left with
    /// prepared-statement work in flight, so the server's statements may no
    /// longer be what odissey believes.
    pub(crate) deallocate: bool,
    /// Closes the connection if it doesn't come back in time.
    pub(crate) timer: Option<TimerId>,
    /// A CancelRequest for it is on its way: don't reuse the connection
    /// before the postmaster has taken it, or it could hit the next query.
    pub(crate) cancelling: bool,
}

impl ServerState {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Connecting(_) => "Connecting",
            Self::LoggingIn(_) => "LoggingIn",
            Self::Idle => "Idle",
            Self::Linked => "Linked",
            Self::Recovering(_) => "Recovering",
            Self::Moving => "Moving",
        }
    }
}

/// One connection to PostgreSQL. `Send`, so an idle one can move to
/// another worker.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) id: ConnId,
    pub(crate) io: Io,
    pub(crate) pool: PoolKey,
    pub(crate) route: Arc<ResolvedRoute>,
    pub(crate) state: ServerState,
    /// When it was opened.
    pub(crate) born: std::time::Instant,
    /// When it last became idle in the pool (pool_ttl).
    pub(crate) idle_since: std::time::Instant,
    /// The request start a query_timeout cancel was sent for (once each).
    pub(crate) cancelled: Option<std::time::Instant>,
    /// What it did for its pool since it was last counted in.
    pub(crate) counters: crate::stats::Counters,
    /// The first request not yet answered by a ReadyForQuery, and the
    /// start of the transaction in progress.
    pub(crate) query_start: Option<std::time::Instant>,
    pub(crate) xact_start: Option<std::time::Instant>,
    /// Opened in plaintext under `tls = "allow"`: a refused login is tried
    /// again over TLS (libpq's `sslmode=allow`).
    pub(crate) tls_retry: bool,
    /// The client it serves (while Linked), or the one it is opened for.
    pub(crate) client: Option<Key>,
    /// Walks the server's output to spot ReadyForQuery.
    pub(crate) relay: Relay,
    /// As of the last ReadyForQuery.
    pub(crate) status: TransactionStatus,
    /// The server's BackendKeyData, to cancel what runs on it.
    pub(crate) key: Option<(u32, u32)>,
    /// Reported parameters as they stand now.
    pub(crate) params: Params,
    /// Reported parameters as they stood after login.
    pub(crate) defaults: Arc<Params>,
    /// The session settings it carries, as far as odissey knows: what it
    /// set (`session::sync_queries`) and what checks found. A new owner
    /// with the same settings needs nothing sent.
    pub(crate) session: Settings,
    /// The last client that used it (`pool_discard` resets it for another).
    pub(crate) owner: Option<ConnId>,
    /// A session check is in flight (the last of odissey's own queries):
    /// its rows are read here.
    pub(crate) check: Option<Box<Check>>,
    /// A CancelRequest for it is on its way: it goes to no other client
    /// (and no second cancel is sent) until the postmaster has taken it,
    /// or the signal could hit another client's query.
    pub(crate) cancel_inflight: bool,
    /// Handed to the router (`Release`) and not given back: no longer
    /// counted among the servers its worker holds (`LocalPool::held`).
    pub(crate) lent: bool,
    /// Named statements odissey prepared on it.
    pub(crate) stmts: ServerStatements,
    /// Its host, when the route chooses among hosts (`hosts`).
    pub(crate) host: Option<crate::hosts::HostSlot>,
}

/// How long a server must have sat idle before it is handed out only
/// after a look at its socket ([`Server::gone_while_idle`]).
pub(crate) const IDLE_PROBE_AFTER: std::time::Duration = std::time::Duration::from_millis(1);

impl Server {
    /// A connection being opened for `pool`, its login started.
    pub(crate) fn new(
        id: ConnId,
        io: Io,
        pool: PoolKey,
        route: Arc<ResolvedRoute>,
        login: BackendLogin,
        tls_retry: bool,
    ) -> Self {
        let now = std::time::Instant::now();
        let stmts = ServerStatements::new(route.route.prepared_statements_max);
        Self {
            host: None,
            id,
            io,
            pool,
            route,
            state: ServerState::Connecting(login),
            born: now,
            idle_since: now,
            cancelled: None,
            counters: crate::stats::Counters::default(),
            query_start: None,
            xact_start: None,
            tls_retry,
            client: None,
            relay: Relay::for_server(),
            status: TransactionStatus::Idle,
            key: None,
            params: Vec::new(),
            defaults: Arc::default(),
            session: Settings::default(),
            owner: None,
            check: None,
            cancel_inflight: false,
            lent: false,
            stmts,
        }
    }

    /// Before an idle server is handed to a client: has it closed, or said
    /// something, since its socket was last read? A backend terminated
    /// while idle (`pg_terminate_backend`, `idle_session_timeout`, a
    /// restart) writes a FATAL error and closes; its readiness event may
    /// not have been dispatched yet (later in this batch, or after the
    /// last poll), and a request written to it would be lost with the
    /// client told 57P01. One non-blocking read (a `recv` that finds
    /// nothing, ~1 µs) tells, and is made only for a server idle for at
    /// least `IDLE_PROBE_AFTER` as of `now` (the batch's clock): at most
    /// 0.1% of the time it sat idle, so busy pools, whose servers go
    /// straight from one client to the next, pay nothing. The reason to
    /// close it, or `None` when it may be used; nothing was written to it.
    pub(crate) fn gone_while_idle(
        &mut self,
        now: std::time::Instant,
        readahead: usize,
    ) -> Option<String> {
        if now.saturating_duration_since(self.idle_since) < IDLE_PROBE_AFTER {
            return None;
        }
        probe_idle(&mut self.io, readahead)
    }
}

/// What the worker is to do after a server connection's transition.
#[derive(Debug)]
pub(crate) enum ServerNext {
    /// Nothing for the worker; whether anything moved (then it runs again).
    Stay(bool),
    /// It logged in and is idle: it joins its pool (`Worker::server_ready`).
    Ready,
    /// Its login failed: whoever waits for it hears why.
    Failed(ServerFailure),
    /// It serves a client: the client drives the pair (`link::pump`).
    Linked(Key),
    /// Clean again after its client left: back to the pool (its recovery
    /// deadline, to cancel).
    Clean(Option<TimerId>),
    /// It must be closed, for this reason.
    Close(Cow<'static, str>),
}

impl Server {
    /// Runs the transition its socket's readiness allows, while no client
    /// drives it: the connect completing, the login exchange, an idle
    /// server's unexpected input, a departed client's recovery. `tls` is
    /// its storage's TLS, if any.
    pub(crate) fn on_io(&mut self, tls: Option<&StorageTlsConfig>, cfg: &Config) -> ServerNext {
        let progress = self.io.flush();
        let old = std::mem::replace(&mut self.state, ServerState::Moving);
        let (next, then) = match old {
            ServerState::Connecting(login) => self.connecting(login, progress),
            ServerState::LoggingIn(login) => self.logging_in(login, tls, cfg, progress),
            ServerState::Idle => {
                let progress = progress | self.io.fill(cfg.readahead);
                match idle_input(&mut self.io.rx, self.io.eof) {
                    Some(why) => (ServerState::Idle, ServerNext::Close(why.into())),
                    None => (ServerState::Idle, ServerNext::Stay(progress)),
                }
            }
            ServerState::Linked => {
                let then = match self.client {
                    Some(ck) => ServerNext::Linked(ck),
                    None => ServerNext::Stay(false),
                };
                (ServerState::Linked, then)
            }
            ServerState::Recovering(r) => {
                let progress = progress | self.io.fill(cfg.readahead);
                match r.step(self, cfg.max_message_size) {
                    (moved, Recovered::Pending(r)) => {
                        let flushed = self.io.flush();
                        (
                            ServerState::Recovering(r),
                            ServerNext::Stay(progress | moved | flushed),
                        )
                    }
                    (_, Recovered::Clean(timer)) => (ServerState::Idle, ServerNext::Clean(timer)),
                    (_, Recovered::Close(r, why)) => {
                        (ServerState::Recovering(r), ServerNext::Close(why.into()))
                    }
                }
            }
            ServerState::Moving => (
                ServerState::Moving,
                ServerNext::Close("internal error: a transition did not finish".into()),
            ),
        };
        self.set_state(next);
        then
    }

    /// The one place a server's state changes: logs the change at debug.
    pub(crate) fn set_state(&mut self, next: ServerState) {
        if std::mem::discriminant(&self.state) != std::mem::discriminant(&next)
            && !matches!(self.state, ServerState::Moving)
        {
            debug!("{}: from {} to {}", self.id, self.state.name(), next.name());
        }
        self.state = next;
    }

    /// Given to client `ck`.
    pub(crate) fn link_to(&mut self, ck: Key) {
        self.client = Some(ck);
        self.set_state(ServerState::Linked);
    }

    /// Idle in its pool, serving nobody.
    pub(crate) fn set_idle(&mut self) {
        self.client = None;
        self.set_state(ServerState::Idle);
    }

    /// Its client left owing `owed`: it recovers (`Recovery`). Returns how
    /// many replies it waits for.
    pub(crate) fn recover(
        &mut self,
        owed: crate::worker::Owed,
        discard: bool,
        deallocate: bool,
        timer: Option<TimerId>,
    ) -> usize {
        self.client = None;
        let r = Recovery::start(self, owed, discard, deallocate, timer);
        let replies = r.replies;
        self.set_state(ServerState::Recovering(r));
        replies
    }

    /// Waiting for the TCP connect: writability tells it is done.
    fn connecting(&mut self, login: BackendLogin, progress: bool) -> (ServerState, ServerNext) {
        match self.io.stream.take_error() {
            Ok(None) if self.io.stream.is_connected() => {
                self.io.writable = true;
                (ServerState::LoggingIn(login), ServerNext::Stay(true))
            }
            Ok(None) if !self.io.eof => {
                (ServerState::Connecting(login), ServerNext::Stay(progress))
            }
            Ok(Some(e)) | Err(e) => {
                let e_ = self.route.endpoint(self.pool.host);
                let failure = ServerFailure::Connect {
                    host: e_.host.clone(),
                    port: e_.port,
                    error: e.to_string(),
                };
                (ServerState::Connecting(login), ServerNext::Failed(failure))
            }
            Ok(None) => {
                let failure = unconnected(&self.io, self.route.endpoint(self.pool.host));
                (ServerState::Connecting(login), ServerNext::Failed(failure))
            }
        }
    }

    /// The login exchange; once PostgreSQL is ready, what it reported is
    /// kept (its key, its parameters as they stand and as defaults).
    fn logging_in(
        &mut self,
        mut login: BackendLogin,
        tls: Option<&StorageTlsConfig>,
        cfg: &Config,
        progress: bool,
    ) -> (ServerState, ServerNext) {
        let host = &self.route.endpoint(self.pool.host).host;
        let (moved, step) = step_login(&mut self.io, &mut login, tls, host, cfg.readahead);
        match step {
            LoginStep::Pending => (
                ServerState::LoggingIn(login),
                ServerNext::Stay(progress | moved),
            ),
            LoginStep::Failed(failure) => {
                (ServerState::LoggingIn(login), ServerNext::Failed(failure))
            }
            LoginStep::Ready => {
                info!(
                    "{}: logged in to {} as {}",
                    self.id, self.route.server_db, self.route.server_user
                );
                self.status = TransactionStatus::Idle;
                self.key = login.key;
                self.params.clone_from(&login.params);
                self.defaults = Arc::new(login.params);
                (ServerState::Idle, ServerNext::Ready)
            }
        }
    }
}

impl Recovery {
    /// Starts bringing back a server whose client left mid-conversation
    /// (`owed`, from `link::Conversation::owed`): a COPY IN the server is
    /// in gets CopyFail, extended-protocol messages left open get a Sync,
    /// and every reply still owed is waited for. `discard`: the session
    /// must be reset whole (session pooling, or state odissey cannot
    /// replay); `deallocate`: prepared-statement work was in flight.
    pub(crate) fn start(
        s: &mut Server,
        owed: crate::worker::Owed,
        discard: bool,
        deallocate: bool,
        timer: Option<TimerId>,
    ) -> Self {
        if owed.copy_fail {
            frontend::copy_fail(&mut s.io.out, "client disconnected");
        }
        if owed.sync {
            frontend::sync(&mut s.io.out);
        }
        Self {
            replies: owed.replies,
            may_rollback: s.route.route.pool_rollback,
            discard,
            deallocate,
            timer,
            // A cancel already on its way is waited for like ours.
            cancelling: s.cancel_inflight,
        }
    }

    /// One step of the recovery, after the server's socket was read into
    /// `s.io.rx`: everything the server says now was meant for the client
    /// that left and is dropped, noting the server's state; once every
    /// reply is in (and no cancel is on its way), an open transaction gets
    /// ROLLBACK, then the session DISCARD ALL or DEALLOCATE ALL as due.
    /// This is where an abandoned transaction is rolled back.
    pub(crate) fn step(mut self, s: &mut Server, max_len: usize) -> (bool, Recovered) {
        let mut progress = false;
        loop {
            let step = s.relay.step(&mut s.io.rx, max_len, |tag, total| {
                matches!(tag, b'Z' | b'S' | b'G' | b'W') || (tag == b'E' && total <= max_len + 1)
            });
            match step {
                Ok(Step::NeedMore) => break,
                Ok(Step::Pass(_)) => {}
                Ok(Step::Inspect(tag, f)) => {
                    match BackendMessage::parse(&frame_of(tag, &f)) {
                        Ok(BackendMessage::ReadyForQuery(st)) => {
                            self.replies = self.replies.saturating_sub(1);
                            s.status = st;
                        }
                        Ok(BackendMessage::ParameterStatus { name, value }) => {
                            crate::params::set(&mut s.params, &name, &value);
                        }
                        Ok(BackendMessage::ErrorResponse(e)) => {
                            debug!("{}: while recovering: {} ({})", s.id, e.message, e.code);
                        }
                        _ if tag == b'G' => {
                            frontend::copy_fail(&mut s.io.out, "client disconnected");
                        }
                        // COPY BOTH (replication) cannot be wound down from
                        // here.
                        _ => return (true, Recovered::Close(self, "client left during COPY BOTH")),
                    }
                }
                Err(_) => {
                    s.io.eof = true;
                    break;
                }
            }
            progress = true;
        }
        if s.io.eof {
            return (progress, Recovered::Close(self, "closed while recovering"));
        }
        if self.replies == 0 && !self.cancelling && s.relay.at_boundary() {
            if s.status != TransactionStatus::Idle {
                if !self.may_rollback {
                    let why = "its client left inside a transaction (pool_rollback = false)";
                    return (progress, Recovered::Close(self, why));
                }
                debug!("{}: rolling back its departed client's transaction", s.id);
                frontend::query(&mut s.io.out, "ROLLBACK");
                self.replies = 1;
                self.may_rollback = false;
                progress = true;
            } else if self.discard || self.deallocate {
                // DISCARD ALL deallocates too.
                let q = if self.discard {
                    "DISCARD ALL"
                } else {
                    "DEALLOCATE ALL"
                };
                frontend::query(&mut s.io.out, q);
                s.stmts.clear();
                if self.discard {
                    s.session.clear();
                }
                self.replies = 1;
                self.discard = false;
                self.deallocate = false;
                progress = true;
            } else if s.io.out.is_empty() {
                debug!("{}: clean again", s.id);
                return (progress, Recovered::Clean(self.timer));
            }
        }
        (progress, Recovered::Pending(self))
    }
}

/// Where a recovery stands after a step.
#[derive(Debug)]
pub(crate) enum Recovered {
    /// Still under way.
    Pending(Recovery),
    /// Clean and idle: it may serve anyone (its deadline, to cancel).
    Clean(Option<TimerId>),
    /// It cannot be brought back: close it, for this reason.
    Close(Recovery, &'static str),
}

/// Where a server login stands after a step.
pub(crate) enum LoginStep {
    Pending,
    Ready,
    Failed(ServerFailure),
}

/// Moves a server login on as far as the socket allows: the answer to
/// SSLRequest and the start of TLS, then the login messages. Shared by pooled
/// servers and passthrough checks. The bool says whether anything moved.
pub(crate) fn step_login(
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

/// How a non-blocking connect stands, for the machines that open their
/// own connections (health checks, LISTEN connections).
pub(crate) enum Connect {
    /// Connected: go on to the login.
    Done,
    /// Still connecting.
    Pending,
    /// It failed; why, named with the host.
    Failed(String),
}

/// Where `io`'s connect to `endpoint` stands (as `Server::connecting`
/// reads it).
pub(crate) fn connect_step(io: &mut Io, endpoint: &crate::config::Endpoint) -> Connect {
    match io.stream.take_error() {
        Ok(None) if io.stream.is_connected() => {
            io.writable = true;
            Connect::Done
        }
        Ok(None) if !io.eof => {
            io.flush();
            Connect::Pending
        }
        Ok(Some(e)) | Err(e) => Connect::Failed(format!("cannot connect: {e}")),
        Ok(None) => Connect::Failed(unconnected(io, endpoint).to_string()),
    }
}

/// Why a connect that had not completed ended: the socket error a write or
/// read met (ECONNREFUSED shows there once the startup message is sent),
/// named with the host and port.
pub(crate) fn unconnected(io: &Io, st: &crate::config::Endpoint) -> ServerFailure {
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

/// One look at an idle server's socket without waiting for an edge: what
/// the kernel holds is read and judged as [`idle_input`] judges it.
fn probe_idle(io: &mut Io, readahead: usize) -> Option<String> {
    io.readable = true;
    io.fill(readahead);
    idle_input(&mut io.rx, io.eof)
}

/// Reads what an idle server sent (`rx`, with `eof` once it closed): the
/// reason to close it, or `None` while it is fine. An idle server may send
/// notices, parameter changes and notifications (consumed here); an error
/// means it is going away; anything else (another message, a bad header)
/// that it is out of step, and its next client must not get it.
pub(crate) fn idle_input(rx: &mut BytesMut, eof: bool) -> Option<String> {
    loop {
        match codec::read_frame(rx, 1 << 20) {
            Ok(Some(f)) if matches!(f.tag, b'N' | b'S' | b'A') => {}
            Ok(Some(f)) if f.tag == b'E' => return Some("closed by the server while idle".into()),
            Ok(Some(f)) => {
                return Some(format!(
                    "protocol violation from the server while idle: unexpected message {:?}",
                    char::from(f.tag)
                ))
            }
            Err(e) => {
                return Some(format!(
                    "protocol violation from the server while idle: {e}"
                ))
            }
            Ok(None) if eof => return Some("closed by the server while idle".into()),
            Ok(None) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use odissey_protocol::backend;

    /// A connected pair of streams over loopback TCP: (ours, the peer's).
    fn pair() -> (Io, odissey_transport::Stream) {
        let addr = "127.0.0.1:0".parse().expect("address");
        let l = odissey_transport::Listener::bind_tcp(addr, 8).expect("bind");
        let odissey_transport::ListenerAddr::Tcp(addr) = l.local_addr().expect("local_addr") else {
            panic!("a TCP listener has a TCP address");
        };
        let ours = odissey_transport::connect(addr).expect("connect");
        let start = std::time::Instant::now();
        let peer = loop {
            if let Some((s, _)) = l.accept().expect("accept") {
                break s;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        (Io::new(ours, true), peer)
    }

    #[test]
    fn a_probe_finds_a_fatal_error_queued_without_an_event() {
        let (mut io, mut peer) = pair();
        // Nothing there: the server may be used, and nothing is consumed.
        io.readable = false;
        assert_eq!(probe_idle(&mut io, 1 << 16), None);
        assert!(!io.eof && io.rx.is_empty());
        // A backend terminated while idle: FATAL 57P01, then the end.
        let mut fatal = BytesMut::new();
        backend::error_response(
            &mut fatal,
            "FATAL",
            "57P01",
            "terminating connection due to administrator command",
            None,
        );
        while !fatal.is_empty() {
            peer.write_from(&mut fatal);
        }
        drop(peer);
        // No readiness was reported (`readable` is false): the probe reads
        // anyway. Loopback delivers at once; allow the kernel a moment.
        let start = std::time::Instant::now();
        let why = loop {
            io.readable = false;
            if let Some(why) = probe_idle(&mut io, 1 << 16) {
                break why;
            }
            assert!(start.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(why, "closed by the server while idle");
    }

    #[test]
    fn an_idle_server_may_send_notices_and_nothing_else() {
        let mut rx = BytesMut::new();
        backend::notice_response(&mut rx, "NOTICE", "00000", "hello");
        backend::parameter_status(&mut rx, "TimeZone", "UTC");
        assert_eq!(idle_input(&mut rx, false), None);
        assert!(rx.is_empty());
        // Half a message waits for the rest.
        rx.extend_from_slice(b"N\0\0\0\x20S");
        assert_eq!(idle_input(&mut rx, false), None);
        assert_eq!(rx.len(), 6);
        // ...unless the server is gone.
        assert!(idle_input(&mut rx, true).is_some());

        // A valid message that no idle server sends, garbage after a
        // notice, an error.
        let mut rx = BytesMut::new();
        backend::data_row(&mut rx, &[Some("1")]);
        let why = idle_input(&mut rx, false).expect("a DataRow while idle");
        assert!(why.contains("unexpected message 'D'"), "{why}");
        let mut rx = BytesMut::new();
        backend::notice_response(&mut rx, "NOTICE", "00000", "hello");
        rx.extend_from_slice(b"\xff\xff\xff\xff\xffjunk");
        let why = idle_input(&mut rx, false).expect("garbage after a notice");
        assert!(why.contains("protocol violation"), "{why}");
        let mut rx = BytesMut::new();
        backend::error_response(&mut rx, "FATAL", "57P01", "terminating", None);
        assert_eq!(
            idle_input(&mut rx, false).as_deref(),
            Some("closed by the server while idle")
        );
    }

    mod recovery {
        //! A server whose client left, brought back (or not) by
        //! `Recovery::step`, over an in-memory stream.

        use super::super::*;
        use crate::worker::testkit::{
            bare, config, copy_response, done, error, memory, queries, ready, server, tags,
        };
        use crate::worker::Owed;
        use odissey_protocol::backend;
        use odissey_protocol::backend::TransactionStatus::{Failed, Idle, InTransaction};

        const MAX: usize = 1 << 20;

        fn owed(replies: usize) -> Owed {
            Owed {
                replies,
                sync: false,
                copy_fail: false,
            }
        }

        /// Reads what PostgreSQL sent and takes one step, as `drive_server`.
        fn step(s: &mut Server, r: Recovery, from_server: &[u8]) -> Recovered {
            memory(&mut s.io).input.extend_from_slice(from_server);
            s.io.readable = true;
            s.io.fill(MAX);
            let (_, next) = r.step(s, MAX);
            if matches!(next, Recovered::Pending(_)) {
                s.io.flush();
            }
            next
        }

        fn sent(s: &mut Server) -> Vec<String> {
            queries(&std::mem::take(&mut memory(&mut s.io).output))
        }

        fn pending(next: Recovered) -> Recovery {
            match next {
                Recovered::Pending(r) => r,
                other => panic!("expected the recovery to go on, got {other:?}"),
            }
        }

        #[test]
        fn an_idle_server_owing_nothing_is_clean_at_once() {
            let mut s = server(&config("transaction", ""));
            let r = Recovery::start(&mut s, owed(0), false, false, None);
            assert!(matches!(step(&mut s, r, &[]), Recovered::Clean(None)));
            assert!(sent(&mut s).is_empty());
        }

        #[test]
        fn the_replies_still_owed_are_drained_unseen() {
            let mut s = server(&config("transaction", ""));
            let r = Recovery::start(&mut s, owed(1), false, false, None);
            let mut rows = BytesMut::new();
            backend::row_description(&mut rows, &["a"]);
            backend::data_row(&mut rows, &[Some("1")]);
            let r = pending(step(&mut s, r, &rows));
            assert!(matches!(
                step(&mut s, r, &done("SELECT 1", Idle)),
                Recovered::Clean(_)
            ));
        }

        #[test]
        fn an_abandoned_transaction_is_rolled_back() {
            let mut s = server(&config("transaction", ""));
            s.status = InTransaction;
            let r = Recovery::start(&mut s, owed(0), false, false, None);
            let r = pending(step(&mut s, r, &[]));
            assert_eq!(sent(&mut s), ["ROLLBACK"]);
            assert!(matches!(
                step(&mut s, r, &done("ROLLBACK", Idle)),
                Recovered::Clean(_)
            ));
            assert_eq!(s.status, Idle);
        }

        #[test]
        fn a_failed_transaction_is_rolled_back_after_its_last_reply() {
            let mut s = server(&config("transaction", ""));
            let r = Recovery::start(&mut s, owed(1), false, false, None);
            let r = pending(step(&mut s, r, &[]));
            assert!(sent(&mut s).is_empty(), "the reply in flight comes first");
            let mut reply = error("22012", "division by zero");
            reply.extend_from_slice(&ready(Failed));
            let r = pending(step(&mut s, r, &reply));
            assert_eq!(sent(&mut s), ["ROLLBACK"]);
            assert!(matches!(
                step(&mut s, r, &done("ROLLBACK", Idle)),
                Recovered::Clean(_)
            ));
        }

        #[test]
        fn without_pool_rollback_a_transaction_closes_the_server() {
            let mut s = server(&config("transaction", "pool_rollback = false"));
            s.status = InTransaction;
            let r = Recovery::start(&mut s, owed(0), false, false, None);
            assert!(matches!(step(&mut s, r, &[]), Recovered::Close(..)));
        }

        #[test]
        fn a_copy_in_left_open_gets_copy_fail() {
            let mut s = server(&config("transaction", ""));
            let left = Owed {
                replies: 1,
                sync: false,
                copy_fail: true,
            };
            let r = Recovery::start(&mut s, left, false, false, None);
            s.io.flush();
            assert_eq!(tags(&memory(&mut s.io).output), "f", "CopyFail");
            memory(&mut s.io).output.clear();
            let mut reply = error("57014", "COPY from stdin failed: client disconnected");
            reply.extend_from_slice(&ready(Idle));
            assert!(matches!(step(&mut s, r, &reply), Recovered::Clean(_)));
        }

        #[test]
        fn a_copy_out_is_drained_to_its_end() {
            let mut s = server(&config("transaction", ""));
            let r = Recovery::start(&mut s, owed(1), false, false, None);
            let mut copy = copy_response(true);
            for _ in 0..3 {
                copy.extend_from_slice(&[b'd', 0, 0, 0, 6, b'1', b'\n']);
            }
            let r = pending(step(&mut s, r, &copy));
            let mut end = BytesMut::from(&bare(b'c')[..]);
            end.extend_from_slice(&done("COPY 3", Idle));
            assert!(matches!(step(&mut s, r, &end), Recovered::Clean(_)));
            assert!(sent(&mut s).is_empty(), "nothing to send for a COPY OUT");
        }

        #[test]
        fn session_pooling_discards_the_session() {
            let mut s = server(&config("session", ""));
            s.session.set("search_path", "app");
            let r = Recovery::start(&mut s, owed(0), true, false, None);
            let r = pending(step(&mut s, r, &[]));
            assert_eq!(sent(&mut s), ["DISCARD ALL"]);
            assert!(s.session.get("search_path").is_none());
            assert!(matches!(
                step(&mut s, r, &done("DISCARD ALL", Idle)),
                Recovered::Clean(_)
            ));
        }

        #[test]
        fn statements_in_flight_are_deallocated() {
            let mut s = server(&config("transaction", ""));
            let r = Recovery::start(&mut s, owed(0), false, true, None);
            let r = pending(step(&mut s, r, &[]));
            assert_eq!(sent(&mut s), ["DEALLOCATE ALL"]);
            assert!(matches!(
                step(&mut s, r, &done("DEALLOCATE ALL", Idle)),
                Recovered::Clean(_)
            ));
        }

        #[test]
        fn a_cancel_on_its_way_is_waited_for() {
            let mut s = server(&config("transaction", ""));
            s.cancel_inflight = true;
            s.status = InTransaction;
            let r = Recovery::start(&mut s, owed(0), false, false, None);
            let mut r = pending(step(&mut s, r, &[]));
            assert!(sent(&mut s).is_empty(), "no ROLLBACK the cancel could hit");
            r.cancelling = false;
            pending(step(&mut s, r, &[]));
            assert_eq!(sent(&mut s), ["ROLLBACK"]);
        }

        #[test]
        fn a_server_that_closes_while_recovering_is_closed() {
            let mut s = server(&config("transaction", ""));
            let r = Recovery::start(&mut s, owed(1), false, false, None);
            memory(&mut s.io).closed = true;
            s.io.hup = true;
            assert!(matches!(step(&mut s, r, &[]), Recovered::Close(..)));
        }
    }
}
