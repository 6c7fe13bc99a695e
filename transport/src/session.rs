//! The TLS half of a [`Stream`](crate::Stream): a rustls connection driven
//! over the stream's own socket, with the same `(bytes, SocketResult)`
//! contract as plaintext.
//!
//! Reading: plaintext rustls already holds goes out first; then ciphertext
//! handed over earlier (`staged`); then the socket, read in 16 KiB chunks
//! into the thread's scratch buffer and fed to rustls. Feeding stops as soon
//! as rustls has plaintext, which is moved into the caller's buffer before
//! more is fed, so rustls never holds more than about one record of
//! plaintext. Ciphertext read but not fed when the caller's limit is reached
//! is kept in `staged` (an allocation only then) and fed first next time.
//!
//! Writing: pending TLS records go to the socket first; then plaintext is
//! encrypted, as much as rustls's bounded buffer takes.

use std::io::{self, BufRead, Read, Write};

use bytes::{Buf, BytesMut};
use rustls::Connection;

use crate::stream::{classify, Plain};
use crate::SocketResult;

/// The most rustls buffers per direction (plaintext queued during the
/// handshake, TLS records not yet written), so a slow peer costs bounded
/// memory: the rest stays in the caller's buffer, where backpressure
/// already applies.
pub(crate) const TLS_BUFFER_LIMIT: usize = 64 * 1024;

/// A TLS connection over a socket it does not own.
#[derive(Debug)]
pub(crate) struct TlsSession {
    conn: Connection,
    /// Ciphertext received but not yet fed to rustls.
    staged: BytesMut,
    /// The last TLS error, for logs; once set, the session is dead.
    error: Option<String>,
}

/// What plaintext rustls had for the caller.
enum Taken {
    Got(usize),
    Nothing,
    Closed,
}

impl TlsSession {
    pub(crate) fn new(mut conn: Connection, already_read: &[u8]) -> Self {
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        Self {
            conn,
            staged: BytesMut::from(already_read),
            error: None,
        }
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// See [`Stream::read_into`](crate::Stream::read_into).
    pub(crate) fn read_into(
        &mut self,
        sock: &mut Plain,
        buf: &mut BytesMut,
        limit: usize,
        chunk: &mut [u8],
        to_the_end: bool,
    ) -> (usize, SocketResult) {
        if self.error.is_some() {
            return (0, SocketResult::Error(io::ErrorKind::InvalidData));
        }
        let mut total = 0;
        // Ciphertext read from the socket in this call, not yet fed.
        let (mut at, mut end) = (0, 0);
        // A short read emptied the socket (see Stream::read_with).
        let mut drained = false;
        // The socket reached EOF: rustls was told, nothing more will come.
        let mut eof = false;
        let result = loop {
            let room = limit.saturating_sub(buf.len());
            if room == 0 {
                break SocketResult::Continue;
            }
            match self.take_plaintext(buf, room) {
                Taken::Got(n) => {
                    total += n;
                    continue;
                }
                Taken::Closed => break SocketResult::Closed,
                Taken::Nothing => {}
            }
            let fed = if !self.staged.is_empty() {
                let fed = feed(&mut self.conn, &self.staged);
                if let Ok(n) = fed {
                    self.staged.advance(n);
                    if self.staged.is_empty() {
                        // Don't keep the allocation on an idle connection.
                        self.staged = BytesMut::new();
                    }
                }
                fed
            } else if at < end {
                let fed = feed(&mut self.conn, &chunk[at..end]);
                if let Ok(n) = fed {
                    at += n;
                }
                fed
            } else if eof {
                break SocketResult::Closed;
            } else if drained {
                break SocketResult::WouldBlock;
            } else {
                match sock.read(chunk) {
                    Ok(0) => {
                        // Tell rustls, so that its reader says whether the
                        // peer closed cleanly (close_notify) or not; both
                        // end the stream here.
                        let _ = self.conn.read_tls(&mut io::empty());
                        eof = true;
                        continue;
                    }
                    Ok(n) => {
                        (at, end) = (0, n);
                        drained = n < chunk.len() && !to_the_end;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break classify(&e),
                }
            };
            if let Err(e) = fed {
                log::debug!("TLS error: {e}");
                self.error = Some(e.to_string());
                break SocketResult::Error(io::ErrorKind::InvalidData);
            }
        };
        if at < end {
            // Only when stopping early (limit reached, close, error):
            // `staged` is empty whenever the socket is read.
            self.staged.extend_from_slice(&chunk[at..end]);
        }
        // Handshake messages and alerts produced while reading go out now.
        // Errors are left for write_from to report: what was read first
        // still reaches the caller.
        let _ = self.flush(sock);
        (total, result)
    }

    /// Moves plaintext rustls holds into `buf`, at most `room` bytes.
    fn take_plaintext(&mut self, buf: &mut BytesMut, room: usize) -> Taken {
        let mut reader = self.conn.reader();
        match reader.fill_buf() {
            // Empty but Ok: close_notify received and all data read.
            Ok([]) => Taken::Closed,
            Ok(data) => {
                let n = data.len().min(room);
                buf.extend_from_slice(&data[..n]);
                reader.consume(n);
                Taken::Got(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Taken::Nothing,
            // UnexpectedEof: the socket ended without close_notify.
            Err(_) => Taken::Closed,
        }
    }

    /// See [`Stream::write_from`](crate::Stream::write_from).
    pub(crate) fn write_from(
        &mut self,
        sock: &mut Plain,
        buf: &mut BytesMut,
    ) -> (usize, SocketResult) {
        let mut total = 0;
        loop {
            // Records already encrypted go first: their order matters, and
            // their buffer must drain before rustls accepts more plaintext.
            match self.flush(sock) {
                SocketResult::Continue => {}
                r => return (total, r),
            }
            if self.error.is_some() {
                return (total, SocketResult::Error(io::ErrorKind::InvalidData));
            }
            if buf.is_empty() {
                return (total, SocketResult::Continue);
            }
            match self.conn.writer().write(buf) {
                // Only while handshaking, once TLS_BUFFER_LIMIT bytes are
                // queued: the handshake must progress (by reading) first.
                Ok(0) => return (total, SocketResult::WouldBlock),
                Ok(n) => {
                    buf.advance(n);
                    total += n;
                }
                Err(e) => return (total, classify(&e)),
            }
        }
    }

    /// Writes pending TLS records until none is left (`Continue`) or the
    /// socket would block.
    pub(crate) fn flush(&mut self, sock: &mut Plain) -> SocketResult {
        while self.conn.wants_write() {
            match self.conn.write_tls(sock) {
                Ok(0) => return SocketResult::Closed,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return classify(&e),
            }
        }
        SocketResult::Continue
    }

    /// Queues a close_notify alert and tries to send it.
    pub(crate) fn close(&mut self, sock: &mut Plain) {
        self.conn.send_close_notify();
        let _ = self.flush(sock);
    }
}

/// Feeds ciphertext to rustls and processes it; returns how much was
/// consumed. Stops early once plaintext is available, so it is moved out
/// before more arrives (rustls refuses input past 16 KiB of unread
/// plaintext).
fn feed(conn: &mut Connection, mut input: &[u8]) -> Result<usize, rustls::Error> {
    let before = input.len();
    while !input.is_empty() {
        match conn.read_tls(&mut input) {
            // After close_notify rustls reads nothing more: drop the rest.
            Ok(0) => return Ok(before),
            Ok(_) => {}
            // Only "handshake message too large" can happen here (the
            // plaintext buffer is empty when we feed): a protocol error.
            Err(e) => return Err(rustls::Error::General(e.to_string())),
        }
        let state = conn.process_new_packets()?;
        if state.plaintext_bytes_to_read() > 0 {
            break;
        }
    }
    Ok(before - input.len())
}
