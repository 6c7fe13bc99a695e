//! Commands between threads. `SysCmd` goes to the system thread (facade
//! calls, and workers' requests and reports to the router); `WorkerCmd` goes
//! to a worker (new clients, grants, migrations, lifecycle).

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use odissey_facade::{Call, ClientInfo, ServerInfo};
use odissey_reactor::Key;
use odissey_transport::Listener;

use crate::config::{Config, ResolvedRoute};
use crate::console::Command;
use crate::router::{Lease, PoolKey, ServerWas, WorkerId};
use crate::worker::server::Server;

/// To the system thread.
pub(crate) enum SysCmd {
    /// A facade request.
    Facade(Call),

    /// A worker's queued clients need one more server.
    Need {
        pool: PoolKey,
        route: Arc<ResolvedRoute>,
        worker: WorkerId,
    },
    /// A worker's queue emptied: `n` of its needs are void.
    CancelNeed {
        pool: PoolKey,
        worker: WorkerId,
        n: usize,
    },
    /// A new server finished its login.
    ServerUp { pool: PoolKey },
    /// A server is idle and clean on `worker`: for `to`'s need if it has
    /// one (`PoolShared::gives_way`), else for the first need queued.
    Release {
        pool: PoolKey,
        worker: WorkerId,
        server: Key,
        to: Option<WorkerId>,
    },
    /// A server closed.
    ServerClosed {
        pool: PoolKey,
        worker: WorkerId,
        server: Option<Key>,
        was: ServerWas,
    },
    /// A ship request found its server gone: meet worker `to`'s need
    /// another way.
    ShipFailed { pool: PoolKey, to: WorkerId },
    /// A draining worker has no connections left and has stopped.
    Drained { worker: WorkerId },
    /// A console client's command, to be answered with `ConsoleReply`.
    Console {
        worker: WorkerId,
        client: Key,
        command: Command,
    },
    /// No transaction of PAUSE `id`'s scope runs on this worker any more.
    Paused { id: u64 },
    /// A worker carried out KILL `id`: it closed `closed` connections.
    Killed { id: u64, closed: usize },
    /// A worker applied the config of reload `id` (`WorkerCmd::Configure`).
    Configured { id: u64 },
    /// A worker's part of gathering `id` (see `WorkerCmd::Snapshot`).
    Snapshot {
        id: u64,
        clients: Vec<ClientInfo>,
        servers: Vec<ServerInfo>,
        pools: Vec<(PoolKey, crate::stats::Counters)>,
    },
}

impl SysCmd {
    /// The kinds, as `kind` numbers them (metrics label values).
    pub(crate) const KINDS: [&'static str; 13] = [
        "facade",
        "need",
        "cancel_need",
        "server_up",
        "release",
        "server_closed",
        "ship_failed",
        "drained",
        "console",
        "paused",
        "killed",
        "configured",
        "snapshot",
    ];

    /// Which of `KINDS` this is (counted by the system thread: what the
    /// workers ask of it, and how often).
    pub(crate) fn kind(&self) -> usize {
        match self {
            Self::Facade(_) => 0,
            Self::Need { .. } => 1,
            Self::CancelNeed { .. } => 2,
            Self::ServerUp { .. } => 3,
            Self::Release { .. } => 4,
            Self::ServerClosed { .. } => 5,
            Self::ShipFailed { .. } => 6,
            Self::Drained { .. } => 7,
            Self::Console { .. } => 8,
            Self::Paused { .. } => 9,
            Self::Killed { .. } => 10,
            Self::Configured { .. } => 11,
            Self::Snapshot { .. } => 12,
        }
    }
}

/// To a worker.
pub(crate) enum WorkerCmd {
    /// Listening sockets to accept clients from (clones of the system
    /// thread's, so every worker accepts directly).
    Listen {
        /// The sockets, in the order of the config's `[[listen]]` entries.
        listeners: Vec<Listener>,
        /// The keepalive the TCP ones were tuned with (see
        /// `Listener::tune`): accepted sockets need no tuning of their own
        /// while the config still asks for it.
        keepalive: Option<std::time::Duration>,
    },
    /// The router met one of this worker's needs.
    Granted {
        lease: Lease,
        pool: PoolKey,
        route: Arc<ResolvedRoute>,
    },
    /// Another worker's need for `pool` waits: hand the router an idle
    /// server kept for it, if any.
    Reclaim { pool: PoolKey },
    /// `pool` was retired by a reload: close the idle servers kept for it.
    Retire { pool: PoolKey },
    /// A reload lowered `pool`'s pool_size: close idle servers kept for it
    /// while it holds more than that (`PoolShared::give_up_oversize`).
    Shrink { pool: PoolKey },
    /// Open a server for `pool` though no client waits (`min_pool_size`);
    /// the router has counted it.
    Warm {
        pool: PoolKey,
        route: Arc<ResolvedRoute>,
    },
    /// Hand idle `server` to worker `to`.
    Ship {
        server: Key,
        to: WorkerId,
        pool: PoolKey,
    },
    /// A server moved here from another worker, for this worker's queue.
    Adopt { server: Box<Server> },
    /// Close idle `server` (its pool was retired or shrunk by a reload, or
    /// its slot goes to another route of a full storage).
    CloseIdle { server: Key },
    /// A new config (and the TLS material it names) for new clients.
    Configure {
        cfg: Arc<Config>,
        tls: Arc<crate::tls::TlsSet>,
        /// Acknowledged with `SysCmd::Configured`.
        id: u64,
    },
    /// A CancelRequest with this key arrived on another worker: cancel
    /// what runs for the client it names, if it lives here.
    Cancel { pid: u32, key: u32 },
    /// Graceful shutdown: close clients between transactions, everything
    /// at the deadline, then stop.
    Drain { deadline: Instant },
    /// Report this worker's connections (`SysCmd::Snapshot`).
    Snapshot { id: u64 },
    /// The answer to a console client's command: result sets and a final
    /// CommandComplete or ErrorResponse, to be followed by ReadyForQuery
    /// (or by the end of the connection, with `close`).
    ConsoleReply {
        client: Key,
        data: BytesMut,
        close: bool,
    },
    /// Close the client with this id, or every client and server of the
    /// database of that name (the console's KILL); answer
    /// `SysCmd::Killed { id, .. }` with how many were closed.
    Kill { id: u64, target: String },
    /// Hold new transactions of `database` (all when None); answer
    /// `SysCmd::Paused { id }` once none runs here.
    Pause { id: u64, database: Option<String> },
    /// Serve `database` (all when None) again.
    Resume { database: Option<String> },
    /// Worker 0: LISTEN upstream to the channels of `hub` some client
    /// wants (`worker::listen`), logging in as `route` if it must connect.
    Subscribe {
        hub: Arc<crate::notify::Hub>,
        route: Arc<ResolvedRoute>,
    },
    /// Worker 0: the last listener of `channel` (as far as a worker saw)
    /// left.
    Unsubscribe {
        channel: Arc<crate::notify::Channel>,
    },
    /// New notifications on `channel`: deliver to its listeners here.
    Notified {
        channel: Arc<crate::notify::Channel>,
    },
    /// The upstream LISTENs to `channel` now: its waiting clients go on.
    Listening {
        channel: Arc<crate::notify::Channel>,
    },
    /// The upstream of `channel` could not be opened: its waiting clients
    /// hear `why`.
    ListenFailed {
        channel: Arc<crate::notify::Channel>,
        why: String,
    },
    /// The upstream of `hub` was lost and is back: its listeners hear that
    /// notifications may have been missed.
    Relistened { hub: Arc<crate::notify::Hub> },
    /// A host changed role or was banned or unbanned (`hosts::Hosts`):
    /// close what its change made stale, re-route waiting clients.
    HostsMoved,
    /// A lookup this worker started ended (`resolver::Dns`): the
    /// addresses of `host`, or why there are none.
    Resolved {
        host: String,
        answer: crate::resolver::Answer,
    },
}
