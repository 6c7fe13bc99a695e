//! Non-blocking byte streams and listeners on mio.
//!
//! TCP and Unix-domain sockets hide behind one [`Stream`] and one
//! [`Listener`] type. Socket calls return what happened as a value
//! ([`SocketResult`]) beside the byte count, so "would block" and "peer
//! closed" are ordinary outcomes for the state machines rather than errors.
//! TLS (rustls) joins here later, behind the same `Stream`.

mod listener;
mod stream;

pub use listener::{Listener, ListenerAddr, ACCEPTED_INHERIT_OPTIONS};
pub use stream::{connect, connect_unix, Peer, SocketResult, Stream};
