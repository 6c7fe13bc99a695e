//! New client connections: the listeners' tokens, and accepting in
//! batches so a flood of new connections waits its turn behind the clients
//! already in.

use std::sync::atomic::Ordering as AtomicOrdering;

use log::{debug, warn};
use odissey_reactor::{Context, Interest, Token};
use odissey_transport::{Stream, ACCEPTED_INHERIT_OPTIONS};

use crate::ids::ConnId;
use crate::io::Io;
use crate::ratelimit::limited;
use crate::worker::client::Client;

use super::{Conn, Worker, WorkerTimer};

/// New connections accepted per listener per turn of the event loop.
const ACCEPT_BATCH: usize = 64;

/// Listeners use the top of the token space; slab keys stay far below.
const LISTENER_TOKENS: usize = 1 << 20;

pub(super) fn listener_token(i: usize) -> Token {
    Token(usize::MAX - 1 - i)
}

pub(super) fn listener_index(token: Token) -> Option<usize> {
    let i = (usize::MAX - 1).checked_sub(token.0)?;
    (i < LISTENER_TOKENS).then_some(i)
}

impl Worker {
    /// Accepts the pending connections on listener `i`, up to
    /// ACCEPT_BATCH; the rest are accepted a turn later.
    pub(super) fn accept_all(&mut self, cx: &mut Context<'_, WorkerTimer>, i: usize) {
        for _ in 0..ACCEPT_BATCH {
            let Some(listener) = self.w.listeners.get(i) else {
                return;
            };
            match listener.accept() {
                Ok(Some((stream, peer))) => {
                    let max = self.w.cfg.client_max;
                    let n = self.w.clients.fetch_add(1, AtomicOrdering::Relaxed) + 1;
                    self.accept(cx, stream, peer, i, max > 0 && n > max);
                }
                // Another worker took it (they all poll the same socket).
                Ok(None) => return,
                Err(e) => {
                    // EMFILE and friends: the connection stays queued in the
                    // kernel; say so once per wake-up, not per attempt.
                    limited!(warn, "worker {}: accept failed: {e}", self.w.id);
                    return;
                }
            }
        }
        if !self.w.accept_later.contains(&i) {
            self.w.accept_later.push(i);
        }
        cx.again();
    }

    /// Puts a client just accepted from listener `listener` in the slab and
    /// starts its login; with `reject` (client_max reached) it is refused
    /// once it has logged in.
    fn accept(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        stream: Stream,
        peer: odissey_transport::Peer,
        listener: usize,
        reject: bool,
    ) {
        let keepalive = self.w.cfg.keepalive();
        let inherited = ACCEPTED_INHERIT_OPTIONS && self.w.listen_keepalive == Some(keepalive);
        if !inherited {
            if let Err(e) = stream.tune(keepalive) {
                debug!("tuning a client socket: {e}");
            }
        }
        let id = ConnId::client();
        let registry = cx.registry();
        let mut failed = None;
        let key = self.conns.insert_with(|key| {
            let mut io = Io::new(stream, true);
            if let Err(e) = registry.register(
                &mut io.stream,
                key.token(),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                failed = Some(e);
            }
            Conn::Client(Client::new(
                id,
                key,
                io,
                u16::try_from(listener).unwrap_or(u16::MAX),
                reject,
                self.w.since_start().as_secs() as u32,
                self.w.since_start().as_millis() as u32,
            ))
        });
        if let Some(e) = failed {
            warn!("{id}: cannot register: {e}");
            self.conns.remove(key);
            self.w.clients.fetch_sub(1, AtomicOrdering::Relaxed);
            return;
        }
        debug!("{id}: new client from {peer} on worker {}", self.w.id);
        let timeout = self.w.cfg.auth_timeout;
        if timeout > 0 {
            // Slowloris: TLS, startup and authentication all count.
            let t = cx.set_timer(
                cx.now() + std::time::Duration::from_millis(timeout),
                WorkerTimer::AuthTimeout(key),
            );
            if let Some(Conn::Client(c)) = self.conns.get_mut(key) {
                c.deadline = Some(t);
            }
        }
        self.drive_client(cx, key);
    }
}
