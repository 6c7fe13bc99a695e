//! A server (backend) connection and its states.

use std::sync::Arc;

use bytes::BytesMut;
use odissey_protocol::backend::TransactionStatus;
use odissey_protocol::codec;
use odissey_reactor::{Key, TimerId};

use crate::backend_login::BackendLogin;
use crate::config::ResolvedRoute;
use crate::ids::ConnId;
use crate::io::Io;
use crate::params::Params;
use crate::prepared::ServerStatements;
use crate::relay::Relay;
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
    /// ReadyForQuery messages of odissey's own queries (settings, session
    /// checks, statement-mode rollback) whose replies the client must not see.
    pub(crate) swallow: usize,
    /// A session check is in flight (the last of the swallowed queries):
    /// its rows are read here.
    pub(crate) check: Option<Box<Check>>,
    /// The server expects COPY data from the client.
    pub(crate) copy_in: bool,
    /// A CancelRequest for it is on its way: it goes to no other client
    /// (and no second cancel is sent) until the postmaster has taken it,
    /// or the signal could hit another client's query.
    pub(crate) cancel_inflight: bool,
    /// Named statements odissey prepared on it.
    pub(crate) stmts: ServerStatements,
}

/// How long a server must have sat idle before it is handed out only
/// after a look at its socket ([`Server::gone_while_idle`]).
pub(crate) const IDLE_PROBE_AFTER: std::time::Duration = std::time::Duration::from_millis(1);

impl Server {
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
}
