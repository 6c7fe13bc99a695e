use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

/// How one socket call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketResult {
    /// The call did all it could; more may be possible (e.g. buffer full).
    Continue,
    /// The kernel has nothing more for now: wait for readiness.
    WouldBlock,
    /// The peer closed the connection (EOF on read, EPIPE/ECONNRESET).
    Closed,
    /// Any other socket error.
    Error(io::ErrorKind),
}

/// Where the other end of a stream is, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A Unix-domain peer (usually unnamed).
    Unix,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix => f.write_str("unix socket"),
        }
    }
}

/// A non-blocking connection of either kind.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix-domain socket.
    Unix(UnixStream),
}

/// Bytes requested from the kernel per read call.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Each thread reads into one zeroed-once scratch buffer and appends
    /// what arrived to the connection's buffer: no unsafe, and neither a
    /// 16 KiB memset per read nor 16 KiB kept per idle connection.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

fn classify(e: &io::Error) -> SocketResult {
    match e.kind() {
        io::ErrorKind::WouldBlock => SocketResult::WouldBlock,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => SocketResult::Closed,
        kind => SocketResult::Error(kind),
    }
}

impl Stream {
    /// Reads until the kernel would block, the peer closes, or `buf` holds
    /// `limit` bytes (then `Continue`: the caller stops reading until the
    /// buffer drains, which is how backpressure reaches the kernel).
    ///
    /// A short read counts as would-block (see `read_with`) unless
    /// `to_the_end`: set it once the peer is known to have closed its side,
    /// so the end of the stream is read rather than waited for.
    pub fn read_into(
        &mut self,
        buf: &mut BytesMut,
        limit: usize,
        to_the_end: bool,
    ) -> (usize, SocketResult) {
        SCRATCH.with(|chunk| {
            let mut chunk = chunk.borrow_mut();
            self.read_with(buf, limit, &mut chunk[..], to_the_end)
        })
    }

    fn read_with(
        &mut self,
        buf: &mut BytesMut,
        limit: usize,
        chunk: &mut [u8],
        to_the_end: bool,
    ) -> (usize, SocketResult) {
        let mut total = 0;
        loop {
            let room = limit.saturating_sub(buf.len());
            if room == 0 {
                return (total, SocketResult::Continue);
            }
            let want = room.min(READ_CHUNK);
            let r = match self {
                Self::Tcp(s) => s.read(&mut chunk[..want]),
                Self::Unix(s) => s.read(&mut chunk[..want]),
            };
            match r {
                Ok(0) => return (total, SocketResult::Closed),
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    total += n;
                    if n < want && !to_the_end {
                        // A short read emptied the socket's receive queue.
                        // Reporting WouldBlock now saves the read that would
                        // only say so: epoll (edge-triggered) signals every
                        // later arrival of data anew, so nothing is missed.
                        return (total, SocketResult::WouldBlock);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (total, classify(&e)),
            }
        }
    }

    /// Writes from the front of `buf` until it is empty (`Continue`) or the
    /// kernel would block; written bytes are consumed from `buf`.
    pub fn write_from(&mut self, buf: &mut BytesMut) -> (usize, SocketResult) {
        let mut total = 0;
        while !buf.is_empty() {
            let r = match self {
                Self::Tcp(s) => s.write(buf),
                Self::Unix(s) => s.write(buf),
            };
            match r {
                Ok(0) => return (total, SocketResult::Closed),
                Ok(n) => {
                    buf.advance(n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (total, classify(&e)),
            }
        }
        (total, SocketResult::Continue)
    }

    /// The pending socket error, if any; used to learn whether a
    /// non-blocking connect succeeded once the socket turns writable.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Self::Tcp(s) => s.take_error(),
            Self::Unix(s) => s.take_error(),
        }
    }

    /// True once a non-blocking TCP connect has completed (peer is known).
    pub fn is_connected(&self) -> bool {
        match self {
            Self::Tcp(s) => s.peer_addr().is_ok(),
            Self::Unix(s) => s.peer_addr().is_ok(),
        }
    }

    /// The remote end, for logs.
    pub fn peer(&self) -> Peer {
        match self {
            Self::Tcp(s) => s.peer_addr().map_or(Peer::Unix, Peer::Tcp),
            Self::Unix(_) => Peer::Unix,
        }
    }

    /// Sets TCP_NODELAY and TCP keepalive (a no-op for Unix sockets):
    /// small protocol messages must not wait for Nagle, and a dead peer
    /// must eventually be noticed even when nobody writes.
    pub fn tune(&self, keepalive: Option<Duration>) -> io::Result<()> {
        if let Self::Tcp(s) = self {
            tune_tcp(socket2::SockRef::from(s), keepalive)?;
        }
        Ok(())
    }

    /// Shuts both directions down, ignoring errors (the peer may be gone).
    pub fn shutdown(&self) {
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// TCP_NODELAY, and keepalive after `keepalive` of idleness (probes every
/// 10 s, 5 of them), on a TCP socket, connected or listening.
pub(crate) fn tune_tcp(sock: socket2::SockRef<'_>, keepalive: Option<Duration>) -> io::Result<()> {
    sock.set_nodelay(true)?;
    if let Some(idle) = keepalive {
        let ka = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10))
            .with_retries(5);
        sock.set_tcp_keepalive(&ka)?;
    }
    Ok(())
}

/// Starts a non-blocking TCP connect; completion shows as writability.
pub fn connect(addr: SocketAddr) -> io::Result<Stream> {
    Ok(Stream::Tcp(TcpStream::connect(addr)?))
}

/// Connects to a Unix-domain socket.
pub fn connect_unix(path: &Path) -> io::Result<Stream> {
    Ok(Stream::Unix(UnixStream::connect(path)?))
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.register(r, t, i),
            Self::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.reregister(r, t, i),
            Self::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.deregister(r),
            Self::Unix(s) => s.deregister(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_and_write_report_would_block_and_close() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut a = Stream::Unix(UnixStream::from_std(a));
        let mut b = Stream::Unix(UnixStream::from_std(b));
        let mut buf = BytesMut::new();
        assert_eq!(
            b.read_into(&mut buf, 1024, false),
            (0, SocketResult::WouldBlock)
        );
        let mut out = BytesMut::from(&b"hello world"[..]);
        assert_eq!(a.write_from(&mut out), (11, SocketResult::Continue));
        assert!(out.is_empty());
        // A limit below the available bytes stops early with Continue.
        assert_eq!(b.read_into(&mut buf, 5, false), (5, SocketResult::Continue));
        assert_eq!(&buf[..], b"hello");
        assert_eq!(
            b.read_into(&mut buf, 1024, false),
            (6, SocketResult::WouldBlock)
        );
        assert_eq!(&buf[..], b"hello world");
        drop(a);
        assert_eq!(b.read_into(&mut buf, 1024, true), (0, SocketResult::Closed));
    }
}
