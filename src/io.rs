//! A socket with its receive and send buffers and its readiness, as the
//! state machines see it. Readiness is remembered because mio is
//! edge-triggered: a socket we stopped reading for backpressure gets no new
//! event, so we must know it still has data.

use bytes::BytesMut;
use odissey_reactor::Ready;
use odissey_transport::{SocketResult, Stream};

/// Buffered, readiness-tracking socket.
#[derive(Debug)]
pub(crate) struct Io {
    pub(crate) stream: Stream,
    pub(crate) rx: BytesMut,
    pub(crate) out: BytesMut,
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    /// The peer closed, or the socket failed: nothing more will be read.
    pub(crate) eof: bool,
    /// An event said the peer closed its side (or the socket failed): read
    /// to the end instead of stopping at a short read.
    pub(crate) hup: bool,
    /// The socket error that ended it, if one did (not a plain close): a
    /// refused connect shows as the first write failing, and the error
    /// must then be named, not taken for the peer closing.
    pub(crate) error: Option<std::io::ErrorKind>,
}

impl Io {
    pub(crate) fn new(stream: Stream, connected: bool) -> Self {
        Self {
            stream,
            rx: BytesMut::new(),
            out: BytesMut::new(),
            readable: connected,
            writable: connected,
            eof: false,
            hup: false,
            error: None,
        }
    }

    /// Gives the buffers' memory back when they are empty: an idle
    /// connection then costs little more than its socket (reads allocate
    /// what arrives; 10,000 idle clients must not hold 10,000 buffers).
    ///
    /// An empty buffer may still hold its allocation with no capacity left
    /// (everything was split off or advanced past), so emptiness, not
    /// capacity, decides.
    pub(crate) fn shrink(&mut self) {
        if self.rx.is_empty() {
            self.rx = BytesMut::new();
        }
        if self.out.is_empty() {
            self.out = BytesMut::new();
        }
    }

    /// Records an event's readiness.
    pub(crate) fn on_ready(&mut self, r: Ready) {
        self.readable |= r.readable || r.closed || r.error;
        self.hup |= r.closed || r.error;
        self.writable |= r.writable;
    }

    /// Reads while readable and `rx` is under `limit`. True on progress
    /// (bytes read or EOF seen).
    pub(crate) fn fill(&mut self, limit: usize) -> bool {
        if !self.readable || self.eof || self.rx.len() >= limit {
            return false;
        }
        let (n, r) = self.stream.read_into(&mut self.rx, limit, self.hup);
        match r {
            SocketResult::Continue => {}
            SocketResult::WouldBlock => self.readable = false,
            SocketResult::Closed | SocketResult::Error(_) => {
                if let SocketResult::Error(kind) = r {
                    self.error.get_or_insert(kind);
                }
                self.readable = false;
                self.eof = true;
                return true;
            }
        }
        n > 0
    }

    /// Writes what is pending while writable. True on progress.
    pub(crate) fn flush(&mut self) -> bool {
        // TLS may owe the socket records (handshake, encrypted data) even
        // when nothing of ours is pending.
        if !self.writable || (self.out.is_empty() && !self.stream.wants_write()) {
            return false;
        }
        let (n, r) = self.stream.write_from(&mut self.out);
        match r {
            SocketResult::Continue => {}
            SocketResult::WouldBlock => self.writable = false,
            SocketResult::Closed | SocketResult::Error(_) => {
                if let SocketResult::Error(kind) = r {
                    self.error.get_or_insert(kind);
                }
                self.writable = false;
                self.eof = true;
                self.out.clear();
                return true;
            }
        }
        n > 0
    }
}
