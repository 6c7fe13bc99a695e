//! CancelRequests: the cancel keys of this worker's clients, and the
//! `Canceller` connections that carry a CancelRequest to a server.

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;

use log::debug;
use odissey_protocol::frontend;
use odissey_reactor::{Context, Key, TimerId};

use crate::io::Io;
use crate::worker::server::ServerState;

use super::opening::{Opened, Resume};
use super::{insert_registered, Conn, Worker, WorkerTimer};

/// A connection that carries one CancelRequest to a server.
#[derive(Debug)]
pub(crate) struct Canceller {
    pub(super) io: Io,
    /// The server it cancels for, held back (neither given to another
    /// client nor released by recovery) until this cancel is delivered.
    server: Option<Key>,
    pub(super) timer: Option<TimerId>,
    /// Its place among the cancels in flight (`cancel_max`), given back
    /// however the canceller ends.
    _slot: CancelSlot,
}

/// One cancel in flight, counted in the registry's `cancels` until dropped.
#[derive(Debug)]
struct CancelSlot(Arc<AtomicUsize>);

impl Drop for CancelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, AtomicOrdering::Relaxed);
    }
}

/// CancelRequests a worker did not forward since its last summary line
/// (one line a second at most, however many: a cancel flood must not
/// flood the log).
#[derive(Debug, Default)]
pub(super) struct CancelDrops {
    /// The client held no server, or its request was already answered.
    pub(super) idle: u64,
    /// A cancel for the same server was still in flight.
    pub(super) busy: u64,
    /// cancel_max cancels were in flight.
    pub(super) full: u64,
    /// The cancel connection could not be opened.
    pub(super) failed: u64,
}

impl CancelDrops {
    pub(super) fn total(&self) -> u64 {
        self.idle + self.busy + self.full + self.failed
    }
}

/// Where a CancelRequest goes (`Worker::cancel_target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CancelTarget {
    /// No client of this worker holds the key: another worker may.
    NotHere,
    /// The client holds it but runs nothing now: nothing to cancel.
    Nothing,
    /// The server running the client's request.
    Server(Key),
}

/// How long a CancelRequest may take to be delivered.
const CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Worker {
    /// Cancels what the client with this key runs, if it lives here; false
    /// when no client here has that key.
    pub(super) fn cancel_for(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        pid: u32,
        key: u32,
    ) -> bool {
        match self.cancel_target(pid, key) {
            CancelTarget::NotHere => return false,
            CancelTarget::Server(sk) => self.send_cancel(cx, sk, false),
            CancelTarget::Nothing => self.w.cancel_drops.idle += 1,
        }
        true
    }

    /// Where a CancelRequest with this key goes from this worker: the
    /// server of the client that holds the key, only while it runs that
    /// client's request (a cancel arriving after the reply would hit
    /// whatever the server runs next).
    pub(super) fn cancel_target(&self, pid: u32, key: u32) -> CancelTarget {
        let Some(&ck) = self.w.cancel_keys.get(&(pid, key)) else {
            return CancelTarget::NotHere;
        };
        match self.conns.get(ck) {
            Some(Conn::Client(c)) => match c.server {
                Some(sk) if c.conv.busy() => CancelTarget::Server(sk),
                _ => CancelTarget::Nothing,
            },
            _ => CancelTarget::NotHere,
        }
    }

    /// Sends a CancelRequest for what server `sk` runs, on a new connection
    /// to its storage. With `recovering`, the server waits for the cancel to
    /// be delivered before it can be reused.
    pub(super) fn send_cancel(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        sk: Key,
        recovering: bool,
    ) {
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        let Some((pid, secret)) = s.key else {
            return;
        };
        if s.cancel_inflight {
            // One at a time per server: the one in flight will do, and
            // recovery waits for it too.
            if let ServerState::Recovering(r) = &mut s.state {
                r.cancelling = true;
            }
            if !recovering {
                self.w.cancel_drops.busy += 1;
            }
            return;
        }
        let max = self.w.cfg.cancel_max;
        let cancels = &self.w.registry.cancels;
        let slot = CancelSlot(Arc::clone(cancels));
        if cancels.fetch_add(1, AtomicOrdering::Relaxed) >= max && max > 0 {
            self.w.cancel_drops.full += 1;
            return;
        }
        let (id, route, request) = (s.id, Arc::clone(&s.route), s.query_start);
        // The host that runs the query: each host is a pool of its own.
        let endpoint = route.endpoint(s.pool.host).clone();
        let stream = match self.open_storage(cx, &endpoint) {
            Opened::Stream(x) => x,
            Opened::Failed(why) => {
                self.w.cancel_drops.failed += 1;
                debug!("{id}: cannot send a cancel request: {why}");
                // A recovering server may have waited for this cancel
                // while its host name was looked up.
                if let Some(Conn::Server(s)) = self.conns.get_mut(sk) {
                    if let ServerState::Recovering(r) = &mut s.state {
                        if r.cancelling {
                            r.cancelling = false;
                            self.drive_server(cx, sk);
                        }
                    }
                }
                return;
            }
            Opened::Wait => {
                // The recovering server must not be reused before the
                // cancel is delivered: it waits from now on.
                if let Some(Conn::Server(s)) = self.conns.get_mut(sk) {
                    if let ServerState::Recovering(r) = &mut s.state {
                        r.cancelling |= recovering;
                    }
                }
                let r = Resume::Cancel {
                    server: sk,
                    recovering,
                    request,
                };
                self.park(cx, &endpoint.host, r);
                return;
            }
        };
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        debug!("{}: sending a cancel request", s.id);
        s.cancel_inflight = true;
        if let ServerState::Recovering(r) = &mut s.state {
            r.cancelling = true;
        }
        let mut io = Io::new(stream, false);
        frontend::cancel_request(&mut io.out, pid, secret);
        let (k, failed) = insert_registered(&mut self.conns, cx.registry(), io, |_, io| {
            Conn::Cancel(Box::new(Canceller {
                io,
                server: Some(sk),
                timer: None,
                _slot: slot,
            }))
        });
        if failed.is_some() {
            self.finish_canceller(cx, k);
            return;
        }
        let t = cx.set_timer(cx.now() + CANCEL_TIMEOUT, WorkerTimer::CancelTimeout(k));
        if let Some(Conn::Cancel(c)) = self.conns.get_mut(k) {
            c.timer = Some(t);
        }
    }

    /// Writes the CancelRequest once connected, then waits for the
    /// postmaster to close the connection (it has signalled the backend).
    pub(super) fn drive_canceller(&mut self, cx: &mut Context<'_, WorkerTimer>, k: Key) {
        let Some(Conn::Cancel(c)) = self.conns.get_mut(k) else {
            return;
        };
        if !c.io.out.is_empty() {
            if !c.io.writable {
                return;
            }
            if !c.io.stream.is_connected() {
                self.finish_canceller(cx, k);
                return;
            }
            c.io.flush();
        }
        while c.io.fill(1024) {
            c.io.rx.clear();
        }
        if c.io.eof {
            self.finish_canceller(cx, k);
        }
    }

    pub(super) fn finish_canceller(&mut self, cx: &mut Context<'_, WorkerTimer>, k: Key) {
        let Some(Conn::Cancel(c)) = self.conns.get_mut(k) else {
            return;
        };
        if let Some(t) = c.timer.take() {
            cx.cancel_timer(t);
        }
        let server = c.server.take();
        self.kill(k);
        if let Some(sk) = server {
            if let Some(Conn::Server(s)) = self.conns.get_mut(sk) {
                s.cancel_inflight = false;
                match (&mut s.state, s.client) {
                    (ServerState::Recovering(r), _) => {
                        r.cancelling = false;
                        self.drive_server(cx, sk);
                    }
                    // Held at its clean point while the cancel was out:
                    // it may be released now.
                    (ServerState::Linked, Some(ck)) => self.drive_client(cx, ck),
                    _ => {}
                }
            }
        }
    }
}
