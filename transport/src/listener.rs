use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mio::event::Source;
use mio::net::{TcpListener, UnixListener};
use mio::{Interest, Registry, Token};
use socket2::{Domain, Socket, Type};

use crate::stream::{Peer, Stream};

/// Whether a socket accepted from a [`Listener::tune`]d listener already has
/// its TCP_NODELAY and keepalive settings: Linux copies them from the
/// listening socket; elsewhere the accepted stream must be tuned itself.
pub const ACCEPTED_INHERIT_OPTIONS: bool = cfg!(target_os = "linux");

/// What a listener is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerAddr {
    /// A TCP address (with the real port when 0 was asked for).
    Tcp(SocketAddr),
    /// A Unix-domain socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A non-blocking listening socket of either kind.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix-domain socket (removes its file when dropped, if still its own).
    Unix(UnixListener, UnixPath),
    /// A clone of a Unix-domain listener (leaves the file alone).
    UnixClone(UnixListener),
}

impl Listener {
    /// Binds a TCP listener with SO_REUSEADDR (a restart must not wait for
    /// TIME_WAIT), SO_REUSEPORT (a successor binds the same address while
    /// this one drains: online restart) and the given backlog.
    pub fn bind_tcp(addr: SocketAddr, backlog: i32) -> io::Result<Self> {
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        if addr.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        sock.set_nonblocking(true)?;
        sock.bind(&addr.into())?;
        sock.listen(backlog)?;
        Ok(Self::Tcp(TcpListener::from_std(sock.into())))
    }

    /// Binds a Unix-domain listener, replacing a stale socket file.
    pub fn bind_unix(path: &Path) -> io::Result<Self> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        let p = UnixPath {
            path: path.to_path_buf(),
            id: file_id(path),
        };
        Ok(Self::Unix(l, p))
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> io::Result<ListenerAddr> {
        match self {
            Self::Tcp(l) => l.local_addr().map(ListenerAddr::Tcp),
            Self::Unix(_, p) => Ok(ListenerAddr::Unix(p.path.clone())),
            Self::UnixClone(l) => l.local_addr().map(|a| {
                ListenerAddr::Unix(a.as_pathname().map(PathBuf::from).unwrap_or_default())
            }),
        }
    }

    /// Another handle on the same listening socket (a dup'ed descriptor),
    /// so several reactors can accept from it. Only the original removes a
    /// Unix socket's file when dropped.
    pub fn try_clone(&self) -> io::Result<Self> {
        use std::os::fd::AsFd;
        match self {
            Self::Tcp(l) => {
                let fd = l.as_fd().try_clone_to_owned()?;
                let std = std::net::TcpListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(Self::Tcp(TcpListener::from_std(std)))
            }
            Self::Unix(l, _) => {
                let fd = l.as_fd().try_clone_to_owned()?;
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(Self::UnixClone(UnixListener::from_std(std)))
            }
            Self::UnixClone(l) => {
                let fd = l.as_fd().try_clone_to_owned()?;
                let std = std::os::unix::net::UnixListener::from(fd);
                std.set_nonblocking(true)?;
                Ok(Self::UnixClone(UnixListener::from_std(std)))
            }
        }
    }

    /// Gives a TCP listener the options of [`Stream::tune`] (a no-op for Unix
    /// sockets). Where [`ACCEPTED_INHERIT_OPTIONS`] holds, the sockets it
    /// accepts are born with them, which saves five `setsockopt` calls per
    /// client: a fifth of the system calls of a short-lived connection.
    pub fn tune(&self, keepalive: Option<std::time::Duration>) -> io::Result<()> {
        if let Self::Tcp(l) = self {
            crate::stream::tune_tcp(socket2::SockRef::from(l), keepalive)?;
        }
        Ok(())
    }

    /// Accepts one pending connection; `Ok(None)` when none is pending.
    pub fn accept(&self) -> io::Result<Option<(Stream, Peer)>> {
        let r = match self {
            Self::Tcp(l) => l.accept().map(|(s, a)| (Stream::from(s), Peer::Tcp(a))),
            Self::Unix(l, _) | Self::UnixClone(l) => {
                l.accept().map(|(s, _)| (Stream::from(s), Peer::Unix))
            }
        };
        match r {
            Ok(x) => Ok(Some(x)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            // Only our own socket file: a successor (online restart) may
            // have bound a new one at the same path since.
            if p.id.is_some() && file_id(&p.path) == p.id {
                let _ = std::fs::remove_file(&p.path);
            }
        }
    }
}

/// The (device, inode) of a file.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Where a Unix listener's socket file is, and which file it was.
#[derive(Debug)]
pub struct UnixPath {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl Source for Listener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Self::Tcp(l) => l.register(r, t, i),
            Self::Unix(l, _) | Self::UnixClone(l) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Self::Tcp(l) => l.reregister(r, t, i),
            Self::Unix(l, _) | Self::UnixClone(l) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Self::Tcp(l) => l.deregister(r),
            Self::Unix(l, _) | Self::UnixClone(l) => l.deregister(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_port_zero_reports_the_real_port() {
        let l = Listener::bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let ListenerAddr::Tcp(a) = l.local_addr().unwrap() else {
            panic!("tcp")
        };
        assert_ne!(a.port(), 0);
        assert!(l.accept().unwrap().is_none());
        let _c = std::net::TcpStream::connect(a).unwrap();
        // The connection may take a moment to be queued.
        let mut got = None;
        for _ in 0..100 {
            got = l.accept().unwrap();
            if got.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (s, peer) = got.expect("accepted");
        // A clone accepts from the same socket.
        let clone = l.try_clone().unwrap();
        let _c2 = std::net::TcpStream::connect(a).unwrap();
        let mut got2 = None;
        for _ in 0..100 {
            got2 = clone.accept().unwrap();
            if got2.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(got2.is_some());
        assert!(matches!(peer, Peer::Tcp(_)));
        s.tune(Some(std::time::Duration::from_secs(60))).unwrap();
    }

    #[test]
    fn accepted_sockets_inherit_a_tuned_listeners_options() {
        let l = Listener::bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        l.tune(Some(std::time::Duration::from_secs(61))).unwrap();
        let Ok(ListenerAddr::Tcp(a)) = l.local_addr() else {
            panic!("not tcp")
        };
        let _c = std::net::TcpStream::connect(a).unwrap();
        let mut got = None;
        for _ in 0..100 {
            got = l.accept().unwrap();
            if got.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (s, _) = got.expect("accepted");
        let sock = socket2::SockRef::from(s.tcp().expect("a TCP stream"));
        if ACCEPTED_INHERIT_OPTIONS {
            assert!(sock.nodelay().unwrap());
            assert!(sock.keepalive().unwrap());
            assert_eq!(
                sock.keepalive_time().unwrap(),
                std::time::Duration::from_secs(61)
            );
        }
    }
}
