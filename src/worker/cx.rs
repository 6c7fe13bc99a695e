//! What a machine may touch while it runs a transition (`Cx`), and what it
//! raises for others (`Evt`).
//!
//! A machine never calls into another one: it changes its own state and
//! pushes an `Evt` for whatever the rest of the worker must do about it.
//! The worker applies the queue (`Worker::apply`) before it returns from
//! the event that ran the machine, so the effect lands in the same turn
//! of the loop, as a direct call would have. The queue is the worker's,
//! reused from one event to the next; a steady relay round raises none.

use std::time::Instant;

use odissey_reactor::Key;

use crate::config::{Config, RouteCache};
use crate::router::PoolKey;
use crate::session::{Greeting, Settings};
use crate::tls::TlsSet;

/// What a transition may read and where it reports.
pub(crate) struct Cx<'a> {
    /// The batch's clock (no clock read per message).
    pub(crate) now: Instant,
    /// When the worker started (ages are kept relative to it).
    pub(crate) started: Instant,
    pub(crate) cfg: &'a Config,
    /// TLS for clients (by listener) and servers (by storage).
    pub(crate) tls: &'a TlsSet,
    /// Routes resolved for the worker's clients (logins look theirs up).
    pub(crate) routes: &'a mut RouteCache,
    /// The worker is shutting down gracefully.
    pub(crate) draining: bool,
    /// Tests only (`ODISSEY_FAILPOINT_PANIC`): a simple query with exactly
    /// this text panics while it is relayed.
    pub(crate) panic_on: Option<&'a str>,
    /// Where the machine's events go.
    pub(crate) evts: &'a mut Vec<Evt>,
}

/// Something a machine did that the rest of the worker must know.
#[derive(Debug)]
pub(crate) enum Evt {
    /// A client was greeted with this BackendKeyData: CancelRequests that
    /// carry it are for that client.
    Greeted { client: Key, cancel_key: (u32, u32) },
    /// What a login with these settings is to be answered, kept per pool
    /// for the logins that follow (any worker).
    Greeting {
        pool: PoolKey,
        key: Settings,
        greeting: Greeting,
    },
}
