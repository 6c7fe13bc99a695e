//! A client (frontend) connection and its states.

use odissey_reactor::Key;

use crate::auth::Login;
use crate::config::ResolvedRoute;
use crate::ids::ConnId;
use crate::io::Io;
use std::sync::Arc;

use crate::prepared::{ClientStatements, Pipeline};
use crate::relay::Relay;
use crate::router::PoolKey;
use crate::session::{Pin, Settings};
use crate::worker::Conversation;

/// What a client connection waits for.
#[derive(Debug)]
pub(crate) enum ClientState {
    /// Its startup packet and password.
    Login(Login),
    /// Its password is being tried on the server (`passthrough`).
    Verifying,
    /// Its next request; it holds no server (transaction pooling).
    Idle,
    /// A server from the router.
    Waiting,
    /// Traffic to and from its server.
    Linked,
    /// Closed with an error; the socket lingers so the error is read
    /// before the end of the stream.
    Closing,
    /// A console client (its route's storage is `local`); `busy` while its
    /// command is being answered by the system thread, `skipping` after an
    /// extended-protocol message, up to the next Sync (as PostgreSQL skips
    /// after an error).
    Console { busy: bool, skipping: bool },
}

impl ClientState {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Login(_) => "Login",
            Self::Verifying => "Verifying",
            Self::Idle => "Idle",
            Self::Waiting => "Waiting",
            Self::Linked => "Linked",
            Self::Closing => "Closing",
            Self::Console { .. } => "Console",
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) id: ConnId,
    /// Its own slot, to name it in commands.
    pub(crate) key: Key,
    pub(crate) io: Io,
    pub(crate) state: ClientState,
    /// When it connected, in seconds since its worker started (for the
    /// console; 4 bytes, not an `Instant`'s 16).
    pub(crate) born_s: u32,
    /// When it last sent anything, in ms since its worker started,
    /// wrapping every 49 days (client_idle_timeout,
    /// idle_in_transaction_timeout).
    pub(crate) active_ms: u32,
    /// When it began waiting for a server, in µs since its worker started
    /// (wrapping; see `worker::since_start_us`).
    pub(crate) waiting_us: u32,
    /// The route it logged in by (its names live on in `pool`).
    pub(crate) route: Option<Arc<ResolvedRoute>>,
    pub(crate) pool: Option<PoolKey>,
    pub(crate) server: Option<Key>,
    /// Walks the client's input to count requests and spot Terminate.
    pub(crate) relay: Relay,
    /// What it and its server owe each other (`worker::link`).
    pub(crate) conv: Conversation,
    /// Sent ParameterStatus/BackendKeyData/ReadyForQuery already.
    pub(crate) greeted: bool,
    /// Refuse after the startup packet (client_max reached).
    pub(crate) reject: bool,
    /// Its deadline: auth_timeout until it has logged in, then
    /// pool_timeout whenever it waits for a server (one field: the two
    /// never overlap, and every byte of an idle client counts).
    pub(crate) deadline: Option<odissey_reactor::TimerId>,
    /// Index of the listener it came from (for that listener's TLS).
    pub(crate) listener: u16,
    /// Its TLS began without an SSLRequest (PostgreSQL 17 direct TLS).
    pub(crate) tls_direct: bool,
    /// The session settings that follow this client (see `session`):
    /// its startup parameters, then what checks of its servers found.
    pub(crate) session: Settings,
    /// A request that may have changed its session went to its server
    /// since the last check: the server is checked before it is released.
    pub(crate) check_due: bool,
    /// It keeps its server (state that cannot be replayed elsewhere), and
    /// why; logged once when it begins.
    pub(crate) pinned: Option<Pin>,
    /// Custom variables (`a.b`) it was seen setting: PostgreSQL cannot
    /// list them, so checks ask for these by name.
    /// (Boxed: most clients have none, and every idle byte counts.)
    pub(crate) custom: Option<Box<crate::session::CustomNames>>,
    /// Named prepared statements follow this client across servers
    /// (transaction and statement pooling with `prepared_statements`).
    pub(crate) track_prepared: bool,
    /// The tracking state when `track_prepared`: made when the client is
    /// linked, and dropped again when it goes idle with nothing in it, so
    /// that an idle client costs as little memory as possible.
    pub(crate) prepared: Option<Box<Prepared>>,
    /// The BackendKeyData odissey gave it, for its CancelRequests.
    pub(crate) cancel_key: Option<(u32, u32)>,
}
impl Client {
    /// A client that just connected, logging in.
    pub(crate) fn new(
        id: ConnId,
        key: Key,
        io: Io,
        listener: u16,
        reject: bool,
        born_s: u32,
        active_ms: u32,
    ) -> Self {
        Self {
            id,
            key,
            io,
            state: ClientState::Login(Login::Startup),
            born_s,
            active_ms,
            waiting_us: 0,
            route: None,
            pool: None,
            server: None,
            relay: Relay::for_client(),
            conv: Conversation::default(),
            greeted: false,
            reject,
            session: Settings::default(),
            check_due: false,
            pinned: None,
            custom: None,
            deadline: None,
            listener,
            tls_direct: false,
            track_prepared: false,
            prepared: None,
            cancel_key: None,
        }
    }
}

/// A client's side of prepared-statement tracking.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// Its named prepared statements.
    pub(crate) stmts: ClientStatements,
    /// What the server owes it, for synthesized and swallowed replies.
    pub(crate) pipeline: Pipeline,
}

impl Prepared {
    /// Nothing to remember: no statements, no replies owed.
    pub(crate) fn is_pristine(&self) -> bool {
        self.stmts.is_empty() && self.pipeline.is_idle()
    }
}

#[cfg(test)]
mod tests {
    /// Every idle client is one slab slot of this size (see `Conn`): keep
    /// rarely used state boxed or lazily made, so that growing past this
    /// is a decision, not an accident.
    #[test]
    fn an_idle_client_stays_small() {
        let size = std::mem::size_of::<super::Client>();
        assert!(size <= 384, "Client is {size} bytes");
    }
}
