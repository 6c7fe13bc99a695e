//! Fixtures for socket-free tests of the machines: a client and a server
//! over in-memory streams (`odissey_transport::Stream::memory`), whose far
//! ends the test plays (what PostgreSQL and a driver would send), with a
//! route parsed from a real configuration and no PostgreSQL anywhere.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use odissey_protocol::backend::{self, TransactionStatus};
use odissey_reactor::Key;
use odissey_transport::Stream;

use crate::backend_login::{AskTls, BackendLogin};
use crate::config::{Config, ResolvedRoute, RouteCache};
use crate::ids::ConnId;
use crate::io::Io;
use crate::router::PoolKey;
use crate::tls::TlsSet;
use crate::worker::client::Client;
use crate::worker::server::Server;

use super::cx::{Cx, Evt};
use super::link;
/// What `Pair::pump` returns, for tests outside the worker.
pub(crate) use super::link::Next;

/// A configuration with one route, d/u, in pool mode `mode`; `extra` is
/// appended to the route's table (e.g. `pool_discard = true`).
pub(crate) fn config(mode: &str, extra: &str) -> Config {
    Config::parse(&format!(
        "[[listen]]\nport = 0\n[storage.s]\ntype = \"remote\"\n\
         [database.d.user.u]\nauthentication = \"none\"\nstorage = \"s\"\n\
         pool = \"{mode}\"\n{extra}\n"
    ))
    .expect("a valid test configuration")
}

fn route(cfg: &Config) -> (PoolKey, Arc<ResolvedRoute>) {
    let r = cfg.route("d", "u").expect("the test route");
    (PoolKey::new("d", "u", &r, 0), r)
}

/// A logged-in server connection of the route, idle, over a memory stream.
pub(crate) fn server(cfg: &Config) -> Server {
    let (pool, route) = route(cfg);
    let mut scratch = BytesMut::new();
    let login = BackendLogin::start(&mut scratch, "d", "u", None, AskTls::No);
    let mut s = Server::new(
        ConnId::server(),
        Io::new(Stream::memory(), true),
        pool,
        route,
        login,
        false,
    );
    s.set_idle();
    s.key = Some((4242, 1));
    s
}

/// A client of the route, logged in and greeted, over a memory stream.
pub(crate) fn client(cfg: &Config) -> Client {
    let (pool, route) = route(cfg);
    let mut c = Client::new(
        ConnId::client(),
        Key::from_u64(1),
        Io::new(Stream::memory(), true),
        0,
        false,
        0,
        0,
    );
    c.track_prepared =
        route.route.prepared_statements && route.route.pool != crate::config::PoolMode::Session;
    c.route = Some(route);
    c.pool = Some(pool);
    c.unlink();
    c.greeted = true;
    c
}

/// A client and the server it was linked to, as the worker's `link` leaves
/// them, and the events they raised.
pub(crate) struct Pair {
    pub(crate) cfg: Config,
    pub(crate) tls: TlsSet,
    pub(crate) routes: RouteCache,
    pub(crate) c: Client,
    pub(crate) s: Server,
    pub(crate) evts: Vec<Evt>,
}

impl Pair {
    /// A greeted client linked to an idle server of the same settings.
    pub(crate) fn new(mode: &str, extra: &str) -> Self {
        let cfg = config(mode, extra);
        let c = client(&cfg);
        let s = server(&cfg);
        let mut p = Self {
            cfg,
            tls: TlsSet::default(),
            routes: RouteCache::default(),
            c,
            s,
            evts: Vec::new(),
        };
        p.link();
        p
    }

    /// Links the pair as the worker does (`link::begin`).
    pub(crate) fn link(&mut self) {
        self.c.link_to(Key::from_u64(2));
        self.s.link_to(self.c.key);
        let mut cx = test_cx(&self.cfg, &self.tls, &mut self.routes, &mut self.evts);
        link::begin(&mut self.c, &mut self.s, &mut cx);
    }

    /// A fresh logged-in server of the pair's route, idle.
    pub(crate) fn fresh_server(&self) -> Server {
        server(&self.cfg)
    }

    /// The client moves to `s` between transactions, as the worker
    /// releases a clean pair's server and links the client to another
    /// (`unlink`, then `link`); returns the server it had, idle.
    pub(crate) fn relink(&mut self, s: Server) -> Server {
        self.c.unlink();
        let mut old = std::mem::replace(&mut self.s, s);
        old.set_idle();
        self.link();
        old
    }

    /// The driver sends `bytes` to the pooler.
    pub(crate) fn client_sends(&mut self, bytes: &[u8]) {
        memory(&mut self.c.io).input.extend_from_slice(bytes);
        self.c.io.readable = true;
    }

    /// PostgreSQL sends `bytes` to the pooler.
    pub(crate) fn server_sends(&mut self, bytes: &[u8]) {
        memory(&mut self.s.io).input.extend_from_slice(bytes);
        self.s.io.readable = true;
    }

    /// One round as the worker runs a linked client: read it, then pump.
    pub(crate) fn pump(&mut self) -> Next {
        self.c.io.fill(self.cfg.readahead);
        let mut cx = test_cx(&self.cfg, &self.tls, &mut self.routes, &mut self.evts);
        link::pump(&mut self.c, &mut self.s, &mut cx)
    }

    /// What reached PostgreSQL since the last call, as message tags.
    pub(crate) fn server_got(&mut self) -> BytesMut {
        std::mem::take(&mut memory(&mut self.s.io).output)
    }

    /// What reached the driver since the last call.
    pub(crate) fn client_got(&mut self) -> BytesMut {
        std::mem::take(&mut memory(&mut self.c.io).output)
    }
}

/// The far end of an in-memory `Io`.
pub(crate) fn memory(io: &mut Io) -> &mut odissey_transport::Memory {
    io.stream.memory_mut().expect("an in-memory stream")
}

/// The tags of the whole messages in `bytes`, in order ("QPBES").
pub(crate) fn tags(bytes: &[u8]) -> String {
    let mut out = String::new();
    let mut at = 0;
    while at + 5 <= bytes.len() {
        out.push(char::from(bytes[at]));
        let len = u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]]);
        at += 1 + len as usize;
    }
    out
}

/// The simple-query texts in `bytes`, in order.
pub(crate) fn queries(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 5 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]])
            as usize;
        if bytes[at] == b'Q' {
            let body = &bytes[at + 5..at + 1 + len];
            out.push(String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned());
        }
        at += 1 + len;
    }
    out
}

/// What PostgreSQL answers a simple query that ran: CommandComplete and
/// ReadyForQuery with `status`.
pub(crate) fn done(tag: &str, status: TransactionStatus) -> BytesMut {
    let mut b = BytesMut::new();
    backend::command_complete(&mut b, tag);
    backend::ready_for_query(&mut b, status);
    b
}

/// ReadyForQuery alone.
pub(crate) fn ready(status: TransactionStatus) -> BytesMut {
    let mut b = BytesMut::new();
    backend::ready_for_query(&mut b, status);
    b
}

/// An ErrorResponse with `code`.
pub(crate) fn error(code: &str, message: &str) -> BytesMut {
    let mut b = BytesMut::new();
    backend::error_response(&mut b, "ERROR", code, message, None);
    b
}

/// CopyInResponse (text, no columns) or, with `out`, CopyOutResponse.
pub(crate) fn copy_response(out: bool) -> BytesMut {
    let mut b = BytesMut::new();
    b.extend_from_slice(&[if out { b'H' } else { b'G' }, 0, 0, 0, 7, 0, 0, 0]);
    b
}

/// A bare message with no body (ParseComplete `1`, BindComplete `2`,
/// CopyDone `c`, NoData `n`...).
pub(crate) fn bare(tag: u8) -> [u8; 5] {
    [tag, 0, 0, 0, 4]
}

/// What a machine gets in a test: now, no failpoint, not draining.
fn test_cx<'a>(
    cfg: &'a Config,
    tls: &'a TlsSet,
    routes: &'a mut RouteCache,
    evts: &'a mut Vec<Evt>,
) -> Cx<'a> {
    Cx {
        now: Instant::now(),
        started: Instant::now(),
        cfg,
        tls,
        routes,
        draining: false,
        panic_on: None,
        evts,
    }
}
