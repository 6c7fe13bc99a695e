//! The Prometheus endpoint's HTTP side: its listener and connections, each
//! one request head in and one response out.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use log::{debug, warn};
use odissey_reactor::{Context, Ready, TimerId, Token};
use odissey_transport::{Listener, SocketResult, Stream};

use crate::metrics;

use super::gather::Purpose;
#[cfg(doc)]
use super::gather::GATHER_TIMEOUT;
use super::{SysTimer, System};

/// The Prometheus endpoint: a listener and its HTTP connections, polled by
/// this thread's reactor.
pub(super) struct MetricsServer {
    pub(super) listener: Listener,
    pub(super) conns: slab::Slab<HttpConn>,
    pub(super) next_serial: u64,
    /// The armed `HttpSweep` and when it fires: never later than the
    /// earliest deadline of an open connection.
    pub(super) sweep: Option<(TimerId, Instant)>,
}

/// One HTTP connection: a request head in, one response out, then closed.
pub(super) struct HttpConn {
    stream: Stream,
    rx: BytesMut,
    out: BytesMut,
    /// Tells a reused slot from the connection a gathering was started for.
    serial: u64,
    /// The metrics are being gathered for it.
    gathering: bool,
    /// Its response is in `out`: write it, then close.
    replied: bool,
    /// When it is closed if still open: [`HTTP_HEAD_TIMEOUT`] after the
    /// accept, then [`HTTP_ANSWER_TIMEOUT`] once its request head is whole.
    deadline: Instant,
}

impl HttpConn {
    /// Still waiting for its request head: what an idle or slow peer
    /// looks like, and what gives way first when the slots are full.
    fn waiting(&self) -> bool {
        !self.gathering && !self.replied
    }
}

/// Tokens of the system thread's reactor: the metrics listener, then its
/// connections by slab index (the waker has `usize::MAX`).
pub(super) const METRICS_LISTENER: Token = Token(usize::MAX - 1);

/// HTTP connections served at once. A connection accepted when all are
/// taken closes the oldest one still waiting for its request head (else
/// the oldest), so idle or slow peers cannot lock scrapers out.
const MAX_HTTP: usize = 64;

/// How long a metrics connection has to send a whole request head after
/// its accept (not reset by partial data, so a trickle doesn't extend it).
const HTTP_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long it then has for its answer: the gathering (at most
/// [`GATHER_TIMEOUT`]) and reading the response.
const HTTP_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

impl System {
    pub(super) fn accept_http(&mut self, cx: &mut Context<'_, SysTimer>) {
        let Some(m) = &mut self.metrics else {
            return;
        };
        loop {
            match m.listener.accept() {
                Ok(Some((mut stream, _))) => {
                    if m.conns.len() >= MAX_HTTP {
                        // Serials grow with each accept: the smallest is
                        // the oldest.
                        let oldest = m
                            .conns
                            .iter()
                            .min_by_key(|(_, c)| (!c.waiting(), c.serial))
                            .map(|(i, c)| (i, c.waiting()));
                        if let Some((i, waiting)) = oldest {
                            debug!(
                                "metrics: {MAX_HTTP} connections open; closing the oldest {}",
                                if waiting {
                                    "one still waiting for its request"
                                } else {
                                    "one being answered"
                                }
                            );
                            m.conns.remove(i);
                        }
                    }
                    let deadline = cx.now() + HTTP_HEAD_TIMEOUT;
                    let entry = m.conns.vacant_entry();
                    let token = Token(entry.key());
                    if cx
                        .registry()
                        .register(
                            &mut stream,
                            token,
                            mio::Interest::READABLE | mio::Interest::WRITABLE,
                        )
                        .is_err()
                    {
                        continue;
                    }
                    m.next_serial += 1;
                    entry.insert(HttpConn {
                        stream,
                        rx: BytesMut::new(),
                        out: BytesMut::new(),
                        serial: m.next_serial,
                        gathering: false,
                        replied: false,
                        deadline,
                    });
                    if !matches!(m.sweep, Some((_, at)) if at <= deadline) {
                        if let Some((id, _)) = m.sweep.take() {
                            cx.cancel_timer(id);
                        }
                        m.sweep = Some((cx.set_timer(deadline, SysTimer::HttpSweep), deadline));
                    }
                    // Its request may already be there.
                    self.drive_http(cx, token.0, Ready::default());
                    return self.accept_http(cx);
                }
                Ok(None) => return,
                Err(e) => {
                    warn!("metrics: accept failed: {e}");
                    return;
                }
            }
        }
    }

    pub(super) fn drive_http(&mut self, cx: &mut Context<'_, SysTimer>, i: usize, _ready: Ready) {
        let Some(m) = &mut self.metrics else {
            return;
        };
        let Some(conn) = m.conns.get_mut(i) else {
            return;
        };
        if conn.replied {
            let (_, r) = conn.stream.write_from(&mut conn.out);
            if conn.out.is_empty() || matches!(r, SocketResult::Closed | SocketResult::Error(_)) {
                m.conns.remove(i);
            }
            return;
        }
        if !conn.gathering {
            let (_, r) = conn
                .stream
                .read_into(&mut conn.rx, metrics::MAX_REQUEST, false);
            let request = metrics::parse_request(&conn.rx);
            let closed = matches!(r, SocketResult::Closed | SocketResult::Error(_));
            if request.is_some() {
                // The sweep armed for the head timeout comes no later
                // than this: it re-arms for the rest.
                conn.deadline = cx.now() + HTTP_ANSWER_TIMEOUT;
            }
            let reply = match request {
                Some(metrics::HttpRequest::Metrics) => {
                    conn.gathering = true;
                    let serial = conn.serial;
                    self.gather(cx, Purpose::Metrics { conn: i, serial });
                    return;
                }
                Some(metrics::HttpRequest::NotFound) => {
                    metrics::response("404 Not Found", "text/plain", "try /metrics\n")
                }
                Some(metrics::HttpRequest::NotAllowed) => {
                    metrics::response("405 Method Not Allowed", "text/plain", "GET only\n")
                }
                Some(metrics::HttpRequest::Bad) => {
                    metrics::response("400 Bad Request", "text/plain", "bad request\n")
                }
                None if conn.rx.len() >= metrics::MAX_REQUEST => {
                    metrics::response("431 Request Header Fields Too Large", "text/plain", "")
                }
                None if closed => {
                    m.conns.remove(i);
                    return;
                }
                None => return,
            };
            let serial = conn.serial;
            self.answer_http(cx, i, serial, reply);
        }
    }

    /// Closes the HTTP connections past their deadline (an idle or slow
    /// peer, or one that does not read its answer) and arms the next sweep.
    pub(super) fn sweep_http(&mut self, cx: &mut Context<'_, SysTimer>) {
        let Some(m) = &mut self.metrics else {
            return;
        };
        m.sweep = None;
        let now = cx.now();
        let before = m.conns.len();
        m.conns.retain(|_, c| c.deadline > now);
        if m.conns.len() < before {
            debug!(
                "metrics: closed {} connection(s) past their deadline",
                before - m.conns.len()
            );
        }
        if let Some(at) = m.conns.iter().map(|(_, c)| c.deadline).min() {
            m.sweep = Some((cx.set_timer(at, SysTimer::HttpSweep), at));
        }
    }

    /// Sends connection `i` its response (if it is still the connection
    /// `serial` names) and closes it once written.
    pub(super) fn answer_http(
        &mut self,
        _cx: &mut Context<'_, SysTimer>,
        i: usize,
        serial: u64,
        reply: Vec<u8>,
    ) {
        let Some(m) = &mut self.metrics else {
            return;
        };
        let Some(conn) = m.conns.get_mut(i).filter(|c| c.serial == serial) else {
            return;
        };
        conn.replied = true;
        conn.out.extend_from_slice(&reply);
        let (_, r) = conn.stream.write_from(&mut conn.out);
        if conn.out.is_empty() || matches!(r, SocketResult::Closed | SocketResult::Error(_)) {
            m.conns.remove(i);
        }
    }
}
