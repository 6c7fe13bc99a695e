use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};
use rustls::{ClientConnection, Connection, ServerConnection};

use crate::session::TlsSession;
use crate::tls::{ClientTls, ServerTls, TlsError};

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

/// A non-blocking connection of either kind, in plaintext or TLS.
///
/// TLS is started in place ([`Stream::start_tls_server`],
/// [`Stream::start_tls_client`]) on the socket already registered with mio,
/// after the plaintext SSLRequest exchange or on a direct-TLS ClientHello.
/// From then on [`read_into`](Stream::read_into) and
/// [`write_from`](Stream::write_from) carry plaintext in and out as before,
/// and drive the handshake as a side effect.
#[derive(Debug)]
pub struct Stream {
    plain: Plain,
    /// Boxed: a rustls connection is over a kilobyte, and most streams
    /// (Unix sockets, plaintext TCP) never have one.
    tls: Option<Box<TlsSession>>,
}

/// The socket under a [`Stream`].
#[derive(Debug)]
pub(crate) enum Plain {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// No socket at all: see [`Stream::memory`].
    Memory(Box<Memory>),
}

/// The far end of an in-memory [`Stream`] ([`Stream::memory`]): what the
/// stream will read, and what was written to it.
///
/// Made for tests of the state machines above this crate, in the manner of
/// quinn-proto's in-memory pairs: a machine runs its usual reads and writes
/// while the test plays its peer, with no socket, no poll and no timing.
#[derive(Debug, Default)]
pub struct Memory {
    /// Bytes the stream will read, in order; once empty a read would block,
    /// or ends the stream when `closed`.
    pub input: BytesMut,
    /// Everything written to the stream so far.
    pub output: BytesMut,
    /// The peer closed its side: reads end once `input` is drained.
    pub closed: bool,
    /// Writes would block (a peer that does not read).
    pub full: bool,
}

impl Read for Plain {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
            Self::Memory(m) => m.read(buf),
        }
    }
}

impl Memory {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return if self.closed {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input.advance(n);
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if self.full {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
}

impl Write for Plain {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
            Self::Memory(m) => m.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        // rustls writes its queued records with one writev.
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
            Self::Memory(m) => {
                let buf = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| b);
                m.write(buf)
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Self {
            plain: Plain::Tcp(s),
            tls: None,
        }
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Self {
            plain: Plain::Unix(s),
            tls: None,
        }
    }
}

impl Stream {
    /// A stream with no socket under it: reads take what the test put in
    /// [`Memory::input`], writes land in [`Memory::output`]
    /// ([`memory_mut`](Self::memory_mut)). It cannot be registered with a
    /// poll (`register` fails); nothing in the pooler makes one.
    pub fn memory() -> Self {
        Self {
            plain: Plain::Memory(Box::default()),
            tls: None,
        }
    }

    /// The TCP socket under it, for tests of its options.
    #[cfg(test)]
    pub(crate) fn tcp(&self) -> Option<&TcpStream> {
        match &self.plain {
            Plain::Tcp(s) => Some(s),
            _ => None,
        }
    }

    /// The far end of an in-memory stream; `None` for a socket.
    pub fn memory_mut(&mut self) -> Option<&mut Memory> {
        match &mut self.plain {
            Plain::Memory(m) => Some(m),
            _ => None,
        }
    }
}

/// Bytes requested from the kernel per read call.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Each thread reads into one zeroed-once scratch buffer and appends
    /// what arrived to the connection's buffer: no unsafe, and neither a
    /// 16 KiB memset per read nor 16 KiB kept per idle connection.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

pub(crate) fn classify(e: &io::Error) -> SocketResult {
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
    ///
    /// With TLS on, `buf` receives decrypted bytes, with the same meaning
    /// of the results: after `Continue` rustls may still hold plaintext,
    /// so call again once `buf` has room, without waiting for readiness.
    /// `Closed` covers both close_notify and a bare EOF; a TLS error is
    /// `Error(InvalidData)`, described by [`tls_error`](Self::tls_error).
    /// Handshake messages and alerts due in reply are written before
    /// returning; if the socket would block, they wait, and
    /// [`wants_write`](Self::wants_write) says so.
    pub fn read_into(
        &mut self,
        buf: &mut BytesMut,
        limit: usize,
        to_the_end: bool,
    ) -> (usize, SocketResult) {
        SCRATCH.with(|chunk| {
            let mut chunk = chunk.borrow_mut();
            match &mut self.tls {
                None => self.plain.read_with(buf, limit, &mut chunk[..], to_the_end),
                Some(tls) => tls.read_into(&mut self.plain, buf, limit, &mut chunk[..], to_the_end),
            }
        })
    }

    /// Writes from the front of `buf` until it is empty (`Continue`) or the
    /// kernel would block; written bytes are consumed from `buf`.
    ///
    /// With TLS on, TLS records still pending go out first (so call it
    /// with an empty `buf` too while [`wants_write`](Self::wants_write));
    /// then `buf` is encrypted, and consumed only as far as rustls took it.
    /// `Continue` means `buf` is empty and every record is written;
    /// `WouldBlock` that the socket is full, or, during the handshake, that
    /// 64 KiB of plaintext already wait for it to finish: call again after
    /// the next [`read_into`](Self::read_into).
    pub fn write_from(&mut self, buf: &mut BytesMut) -> (usize, SocketResult) {
        match &mut self.tls {
            None => self.plain.write_from(buf),
            Some(tls) => tls.write_from(&mut self.plain, buf),
        }
    }

    /// Turns this plaintext stream into the server side of a TLS
    /// connection, in place: the socket and its mio registration stay.
    ///
    /// `already_read` is the start of the handshake the caller has already
    /// taken from the socket (a direct-TLS ClientHello, recognised by its
    /// first byte 0x16); rustls gets it before anything else. Nothing is
    /// read here: call [`read_into`](Self::read_into) next even without a
    /// readiness event, since the rest of the ClientHello may already wait
    /// in the socket and edge-triggered polling will not signal it again.
    pub fn start_tls_server(
        &mut self,
        tls: &ServerTls,
        already_read: &[u8],
    ) -> Result<(), TlsError> {
        if self.tls.is_some() {
            return Err(TlsError::AlreadyTls);
        }
        let conn = ServerConnection::new(tls.config.clone()).map_err(TlsError::Rustls)?;
        self.tls = Some(Box::new(TlsSession::new(
            Connection::Server(conn),
            already_read,
        )));
        Ok(())
    }

    /// Turns this plaintext stream into the client side of a TLS
    /// connection to `server_name` (a DNS name or an IP address, checked
    /// against the certificate under [`Verify::Full`](crate::Verify::Full)),
    /// in place, and tries to send the ClientHello at once. If the socket
    /// would block, the rest waits: see [`wants_write`](Self::wants_write).
    pub fn start_tls_client(&mut self, tls: &ClientTls, server_name: &str) -> Result<(), TlsError> {
        if self.tls.is_some() {
            return Err(TlsError::AlreadyTls);
        }
        let name = crate::tls::server_name(server_name)?;
        let conn = ClientConnection::new(tls.config.clone(), name).map_err(TlsError::Rustls)?;
        let mut session = TlsSession::new(Connection::Client(conn), &[]);
        let r = session.flush(&mut self.plain);
        self.tls = Some(Box::new(session));
        match r {
            SocketResult::Continue | SocketResult::WouldBlock => Ok(()),
            SocketResult::Closed => Err(TlsError::Io(io::ErrorKind::BrokenPipe.into())),
            SocketResult::Error(kind) => Err(TlsError::Io(kind.into())),
        }
    }

    /// True while TLS records wait for the socket: keep write interest and
    /// call [`write_from`](Self::write_from) even with nothing of your own
    /// to send. Always false in plaintext.
    pub fn wants_write(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.conn().wants_write())
    }

    /// True once TLS has been started on this stream.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// True while the TLS handshake is not finished.
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.conn().is_handshaking())
    }

    /// The negotiated version and cipher suite, e.g.
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384", once the handshake is done.
    pub fn tls_description(&self) -> Option<String> {
        let conn = self.tls.as_ref()?.conn();
        let version = match conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
            rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
            v => format!("{v:?}"),
        };
        let suite = conn.negotiated_cipher_suite()?.suite();
        Some(match suite.as_str() {
            Some(name) => format!("{version} {name}"),
            None => format!("{version} {suite:?}"),
        })
    }

    /// The ALPN protocol agreed on, if any (`b"postgresql"` or nothing).
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.tls
            .as_ref()?
            .conn()
            .alpn_protocol()
            .map(<[u8]>::to_vec)
    }

    /// The common name (CN) in the subject of the peer's certificate. On
    /// the server side the certificate has been verified against the CA
    /// (client_auth `Optional` or `Required`); on the client side it is
    /// verified unless [`Verify::None`](crate::Verify::None). `None`
    /// without a certificate, a CN, or with a CN holding a NUL.
    pub fn peer_common_name(&self) -> Option<String> {
        let certs = self.tls.as_ref()?.conn().peer_certificates()?;
        crate::der::common_name(certs.first()?)
    }

    /// The TLS error that ended this stream (a bad certificate, an alert
    /// from the peer, a protocol violation), for logs.
    pub fn tls_error(&self) -> Option<String> {
        self.tls.as_ref()?.error().map(str::to_owned)
    }

    /// Queues a TLS close_notify and tries to send it, so the peer can tell
    /// a deliberate close from a cut connection. A no-op in plaintext.
    pub fn send_close_notify(&mut self) {
        if let Some(tls) = &mut self.tls {
            tls.close(&mut self.plain);
        }
    }

    /// The pending socket error, if any; used to learn whether a
    /// non-blocking connect succeeded once the socket turns writable.
    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match &self.plain {
            Plain::Tcp(s) => s.take_error(),
            Plain::Unix(s) => s.take_error(),
            Plain::Memory(_) => Ok(None),
        }
    }

    /// True once a non-blocking TCP connect has completed (peer is known).
    pub fn is_connected(&self) -> bool {
        match &self.plain {
            Plain::Tcp(s) => s.peer_addr().is_ok(),
            Plain::Unix(s) => s.peer_addr().is_ok(),
            Plain::Memory(m) => !m.closed,
        }
    }

    /// The remote end, for logs.
    pub fn peer(&self) -> Peer {
        match &self.plain {
            Plain::Tcp(s) => s.peer_addr().map_or(Peer::Unix, Peer::Tcp),
            Plain::Unix(_) | Plain::Memory(_) => Peer::Unix,
        }
    }

    /// Sets TCP_NODELAY and TCP keepalive (a no-op for Unix sockets):
    /// small protocol messages must not wait for Nagle, and a dead peer
    /// must eventually be noticed even when nobody writes.
    pub fn tune(&self, keepalive: Option<Duration>) -> io::Result<()> {
        if let Plain::Tcp(s) = &self.plain {
            tune_tcp(socket2::SockRef::from(s), keepalive)?;
        }
        Ok(())
    }

    /// Shuts both directions down, ignoring errors (the peer may be gone).
    /// With TLS on, [`send_close_notify`](Self::send_close_notify) first if
    /// the peer should see a clean close.
    pub fn shutdown(&self) {
        let _ = match &self.plain {
            Plain::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Plain::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Plain::Memory(_) => Ok(()),
        };
    }
}

impl Plain {
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
            match self.read(&mut chunk[..want]) {
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

    fn write_from(&mut self, buf: &mut BytesMut) -> (usize, SocketResult) {
        let mut total = 0;
        while !buf.is_empty() {
            match self.write(buf) {
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
    Ok(TcpStream::connect(addr)?.into())
}

/// Connects to a Unix-domain socket.
pub fn connect_unix(path: &Path) -> io::Result<Stream> {
    Ok(UnixStream::connect(path)?.into())
}

impl Source for Stream {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match &mut self.plain {
            Plain::Tcp(s) => s.register(r, t, i),
            Plain::Unix(s) => s.register(r, t, i),
            Plain::Memory(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an in-memory stream cannot be polled",
            )),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match &mut self.plain {
            Plain::Tcp(s) => s.reregister(r, t, i),
            Plain::Unix(s) => s.reregister(r, t, i),
            Plain::Memory(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "an in-memory stream cannot be polled",
            )),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match &mut self.plain {
            Plain::Tcp(s) => s.deregister(r),
            Plain::Unix(s) => s.deregister(r),
            Plain::Memory(_) => Ok(()),
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
        let mut a = Stream::from(UnixStream::from_std(a));
        let mut b = Stream::from(UnixStream::from_std(b));
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
