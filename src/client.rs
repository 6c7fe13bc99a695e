//! A client (frontend) connection and its states.

use odissey_reactor::Key;

use crate::auth::{Identity, Login};
use crate::ids::ConnId;
use crate::io::Io;
use std::collections::VecDeque;

use crate::params::{ClientParams, SetCommand};
use crate::prepared::{ClientStatements, Pipeline};
use crate::relay::Relay;
use crate::router::PoolKey;

/// What a client connection waits for.
#[derive(Debug)]
pub(crate) enum ClientState {
    /// Its startup packet and password.
    Login(Login),
    /// Its next request; it holds no server (transaction pooling).
    Idle,
    /// A server from the router.
    Waiting,
    /// Traffic to and from its server.
    Linked,
    /// Closed with an error; the socket lingers so the error is read
    /// before the end of the stream.
    Closing,
}

impl ClientState {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Login(_) => "Login",
            Self::Idle => "Idle",
            Self::Waiting => "Waiting",
            Self::Linked => "Linked",
            Self::Closing => "Closing",
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
    pub(crate) who: Option<Box<Identity>>,
    pub(crate) pool: Option<PoolKey>,
    pub(crate) server: Option<Key>,
    /// Walks the client's input to count requests and spot Terminate.
    pub(crate) relay: Relay,
    /// ReadyForQuery messages the server still owes (one per Query, Sync,
    /// FunctionCall forwarded).
    pub(crate) pending: usize,
    /// Extended-protocol messages forwarded since the last Sync: the server
    /// is mid-pipeline even if its last status was idle.
    pub(crate) unsynced: bool,
    /// Sent ParameterStatus/BackendKeyData/ReadyForQuery already.
    pub(crate) greeted: bool,
    /// Refuse after the startup packet (client_max reached).
    pub(crate) reject: bool,
    /// Its pool_timeout deadline while it waits for a server.
    pub(crate) wait_timer: Option<odissey_reactor::TimerId>,
    /// The session settings that follow this client (see `params`).
    pub(crate) params: ClientParams,
    /// SET/RESET queries in flight, with the number of the ReadyForQuery
    /// that ends each and whether it failed: applied to `params` when
    /// their ReadyForQuery reports success outside a transaction.
    pub(crate) sets: VecDeque<(u64, SetCommand, bool)>,
    /// Syncs forwarded since the last Execute or Query: if that Execute
    /// starts a COPY IN, the server ignores them.
    pub(crate) syncs_since_execute: usize,
    /// The server is in COPY IN for this client until it sends CopyDone or
    /// CopyFail; Sync and Flush meanwhile are ignored by the server.
    pub(crate) copy_mode: bool,
    /// ReadyForQuery messages owed in total, and received in total.
    pub(crate) z_sent: u64,
    pub(crate) z_seen: u64,
    /// Follow named prepared statements across servers (transaction and
    /// statement pooling with `prepared_statements`).
    pub(crate) prepared: bool,
    /// Its named prepared statements.
    pub(crate) stmts: ClientStatements,
    /// What the server owes it, for synthesized and swallowed replies.
    pub(crate) pipeline: Pipeline,
    /// The BackendKeyData odissey gave it, for its CancelRequests.
    pub(crate) cancel_key: Option<(u32, u32)>,
}
