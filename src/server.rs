//! A server (backend) connection and its states.

use std::sync::Arc;

use odissey_protocol::backend::TransactionStatus;
use odissey_reactor::Key;

use crate::backend_login::BackendLogin;
use crate::config::ResolvedRoute;
use crate::ids::ConnId;
use crate::io::Io;
use crate::relay::Relay;
use crate::router::PoolKey;

/// What a server connection waits for.
#[derive(Debug)]
pub(crate) enum ServerState {
    /// The TCP connect to finish (writability).
    Connecting(BackendLogin),
    /// The login exchange up to ReadyForQuery.
    LoggingIn(BackendLogin),
    /// A client to be granted it; it sits in the router's idle list.
    Idle,
    /// Its client's traffic.
    Linked,
    /// The replies to the reset queries (ROLLBACK, DISCARD ALL) we sent.
    Resetting { replies: usize },
}

impl ServerState {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Connecting(_) => "Connecting",
            Self::LoggingIn(_) => "LoggingIn",
            Self::Idle => "Idle",
            Self::Linked => "Linked",
            Self::Resetting { .. } => "Resetting",
        }
    }
}

/// One connection to PostgreSQL. `Send`, so an idle one can move to
/// another worker.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) id: ConnId,
    pub(crate) io: Io,
    pub(crate) pool: PoolKey,
    pub(crate) route: Arc<ResolvedRoute>,
    pub(crate) state: ServerState,
    /// The client it serves (while Linked), or the one it is opened for.
    pub(crate) client: Option<Key>,
    /// Walks the server's output to spot ReadyForQuery.
    pub(crate) relay: Relay,
    /// As of the last ReadyForQuery.
    pub(crate) status: TransactionStatus,
}
