//! Non-blocking byte streams and listeners on mio.
//!
//! TCP and Unix-domain sockets hide behind one [`Stream`] and one
//! [`Listener`] type. Socket calls return what happened as a value
//! ([`SocketResult`]) beside the byte count, so "would block" and "peer
//! closed" are ordinary outcomes for the state machines rather than errors.
//!
//! TLS (rustls, with the *ring* provider) is started in place on a
//! [`Stream`] that is already registered with mio: the server side for
//! clients of the pooler ([`Stream::start_tls_server`], after an SSLRequest
//! or on a PostgreSQL 17 direct-TLS ClientHello), the client side towards
//! PostgreSQL ([`Stream::start_tls_client`]). Reads and writes then carry
//! plaintext with the same contract, and drive the handshake as they go.
//! The configurations ([`ServerTls`], [`ClientTls`]) are built from PEM
//! files outside the reactor; rustls itself stays inside this crate.

mod der;
mod listener;
mod session;
mod stream;
mod tls;
#[cfg(test)]
mod tls_tests;

pub use listener::{Listener, ListenerAddr, UnixPath, ACCEPTED_INHERIT_OPTIONS};
pub use stream::{connect, connect_unix, Memory, Peer, SocketResult, Stream};
pub use tls::{
    ClientAuth, ClientTls, ClientTlsOptions, Protocols, ServerTls, ServerTlsOptions, TlsError,
    Verify, ALPN_POSTGRESQL,
};
