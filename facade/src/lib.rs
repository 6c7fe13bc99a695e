//! The public, blocking API of the odissey pooler.
//!
//! A [`Handle`] is a thin RPC client: every method wraps a [`Request`] in a
//! [`Call`], hands it to the backend's polled channel (the system thread's
//! reactor), and blocks until the matching [`Reply`] comes back. Programs
//! that embed odissey, the `odissey` binary and the integration tests all
//! drive the pooler through this one type; `odissey::spawn()` or
//! `odissey::start()` give you one.
//!
//! Dropping a handle shuts the pooler down (immediately) and joins its
//! threads; call [`Handle::shutdown`] for a graceful stop.
#![deny(missing_docs)]

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Where a configuration comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// TOML text.
    Toml(String),
    /// A TOML file, re-read on every reload.
    File(PathBuf),
}

/// What a caller asks of the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Parse and validate the config, bind the listeners, start the workers.
    Start(ConfigSource),
    /// Apply a new config (`None`: re-read the file given at start). New
    /// settings apply to new work; what is running keeps its settings.
    Reload(Option<ConfigSource>),
    /// Report listeners and per-route counters.
    Inspect,
    /// Stop accepting, let running transactions finish for up to `grace`,
    /// then close everything and stop the threads.
    Shutdown {
        /// How long running transactions get to finish.
        grace: Duration,
    },
}

/// What the backend answers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// The pooler runs and listens on these addresses.
    Started(Started),
    /// The new config is in place; `notes` name what it changes that
    /// takes effect only at restart (listen addresses, workers, logging).
    Reloaded {
        /// One line per setting that needs a restart.
        notes: Vec<String>,
    },
    /// A snapshot of the pooler's state.
    Inspected(Inspection),
    /// Everything is closed; the backend thread is about to exit.
    ShutDown,
    /// The request failed.
    Failed(Error),
}

/// One request in flight: the backend answers on `reply` with the same id.
#[derive(Debug)]
pub struct Call {
    /// Echoed in the reply so a stray reply is detected, not trusted.
    pub id: u64,
    /// What is asked.
    pub request: Request,
    /// Where the answer goes.
    pub reply: mpsc::Sender<(u64, Reply)>,
}

impl Call {
    /// Sends the answer; the caller may have given up, which is fine.
    pub fn answer(self, reply: Reply) {
        let _ = self.reply.send((self.id, reply));
    }
}

/// The result of a successful start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    /// The metrics endpoint's address, when `[metrics] listen` is set.
    pub metrics: Option<SocketAddr>,
    /// TCP addresses actually bound (port 0 resolved).
    pub tcp: Vec<SocketAddr>,
    /// Unix-domain socket paths bound.
    pub unix: Vec<PathBuf>,
    /// Worker threads hosting clients.
    pub workers: usize,
}

/// A snapshot of the pooler.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inspection {
    /// The metrics endpoint's address, when `[metrics] listen` is set.
    pub metrics: Option<SocketAddr>,
    /// TCP addresses bound.
    pub tcp: Vec<SocketAddr>,
    /// Unix-domain socket paths bound.
    pub unix: Vec<PathBuf>,
    /// Worker threads.
    pub workers: usize,
    /// Clients connected, in total.
    pub clients: usize,
    /// One entry per route that has had clients or servers.
    pub routes: Vec<RouteStats>,
    /// Every client connection, on every worker.
    pub client_list: Vec<ClientInfo>,
    /// Every server connection, on every worker.
    pub server_list: Vec<ServerInfo>,
    /// One entry per `[storage.<name>]` that pools have used.
    pub storages: Vec<StorageStats>,
    /// Each host of the storages that choose among hosts (several
    /// `hosts`, or a `target_session_attrs`), by storage and host.
    pub hosts: Vec<HostStats>,
    /// The system thread's and each worker's command channel: what other
    /// threads sent it. The cost of coordination, to be divided by the
    /// transactions served in the same time.
    pub threads: Vec<ThreadStats>,
    /// What the system thread was sent, by kind (`need`, `cancel_need`,
    /// `release`, `server_closed`, `facade`, ...), since it started: which
    /// coordination the workers ask for.
    pub system_commands: Vec<(String, u64)>,
}

/// What one thread's command channel has carried since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadStats {
    /// The thread's name: `odissey-system` or `odissey-worker-<i>`.
    pub name: String,
    /// Commands other threads sent it (and a worker's resolver threads,
    /// and the facade, for the system thread).
    pub messages: u64,
    /// Times it woke up to take commands (one wake-up takes all queued).
    pub wakeups: u64,
}

/// One host of a storage, as its health checks and server logins found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostStats {
    /// The `[storage.<name>]` name.
    pub storage: String,
    /// `host:port` (or `/socket/dir:port`).
    pub host: String,
    /// "primary", "standby", or "unknown" (not checked yet).
    pub role: String,
    /// Taken out of rotation (a failed check, connection or login).
    pub banned: bool,
    /// For how much longer, in ms (0 when not banned).
    pub banned_for_ms: u64,
    /// Why it was last banned, or how its last check failed.
    pub why: String,
    /// Bans since start.
    pub bans: u64,
    /// Replay lag of a standby, in bytes of WAL behind the primary...
    pub lag_bytes: u64,
    /// ...and in ms of replay delay.
    pub lag_ms: u64,
    /// Further behind than `max_replica_lag_*`: it takes no new work.
    pub lagging: bool,
    /// Server connections open to it (pooled; not its health check).
    pub connections: usize,
    /// Unix time in ms of its last role change (0: none yet).
    pub role_changed_at_ms: u64,
    /// Unix time in ms of its last good check (0: none yet).
    pub checked_at_ms: u64,
}

/// The server connections of one storage, all its pools together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// The `[storage.<name>]` name.
    pub name: String,
    /// Its `storage_max` (0 = no limit).
    pub storage_max: usize,
    /// Connections counted against it: opening, idle and busy.
    pub connections: usize,
    /// Routes waiting for one of its connections (it is full).
    pub routes_waiting: usize,
}

/// One client connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// Its id as logs and errors show it (`c<hex>`).
    pub id: String,
    /// The worker thread it lives on.
    pub worker: usize,
    /// The database it logged in to (empty while logging in).
    pub database: String,
    /// The user it logged in as (empty while logging in).
    pub user: String,
    /// `login`, `verifying` (a server checks its password), `idle` (no
    /// server), `waiting` (for a server), `active` (linked to a server),
    /// `console`, `closing`.
    pub state: String,
    /// The peer's address (`unix` for a Unix-domain socket).
    pub addr: String,
    /// TLS version and cipher when TLS is on.
    pub tls: Option<String>,
    /// Seconds since it connected.
    pub connected_secs: u64,
    /// Microseconds it has been waiting for a server (0 unless waiting).
    pub wait_us: u64,
    /// The server connection it holds (`s<hex>`), if any.
    pub server: Option<String>,
    /// In transaction or statement pooling: why it keeps its server
    /// connection between transactions (a temporary table, LISTEN, a
    /// session advisory lock, an SQL PREPARE, a WITH HOLD cursor...).
    pub pinned: Option<String>,
}

/// One server connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerInfo {
    /// Its id as logs show it (`s<hex>`).
    pub id: String,
    /// The worker thread it lives on.
    pub worker: usize,
    /// The pool's (clients') database.
    pub database: String,
    /// The pool's (clients') user.
    pub user: String,
    /// `connecting`, `login`, `idle`, `active` (linked to a client),
    /// `recovering` (being cleaned after its client left).
    pub state: String,
    /// The server's address.
    pub addr: String,
    /// TLS version and cipher when TLS is on.
    pub tls: Option<String>,
    /// Seconds since it connected.
    pub connected_secs: u64,
    /// The client it serves (`c<hex>`), if any.
    pub client: Option<String>,
    /// The PostgreSQL backend's process id.
    pub remote_pid: Option<u32>,
}

impl Inspection {
    /// The pool of clients that logged in to `database` as `user`.
    pub fn route(&self, database: &str, user: &str) -> Option<&RouteStats> {
        self.routes
            .iter()
            .find(|r| r.database == database && r.user == user)
    }
}

/// Counters of one route's pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// The clients' database name (a pool per real database and user,
    /// also under a `default` rule).
    pub database: String,
    /// The clients' user name.
    pub user: String,
    /// The server host of this pool (`host:port`): a storage with several
    /// `hosts` has a pool per host.
    pub host: String,
    /// "session" or "transaction".
    pub pool_mode: String,
    /// Clients of this route that are not waiting for a server.
    pub clients_active: usize,
    /// Clients waiting for a server connection.
    pub clients_waiting: usize,
    /// Clients that keep their server connection between transactions
    /// (see `ClientInfo::pinned`); counted only by inspections that gather
    /// the connection lists (`inspect`, the metrics endpoint, SHOW).
    pub clients_pinned: usize,
    /// Server connections attached to a client.
    pub servers_active: usize,
    /// Server connections idle in the pool.
    pub servers_idle: usize,
    /// Server connections being opened (connect, login, reset).
    pub servers_login: usize,
    /// The route's pool_size (0 = unlimited).
    pub pool_size: usize,
    /// Transactions completed (a ReadyForQuery reporting idle), since start.
    pub xact_count: u64,
    /// Requests answered (each ReadyForQuery).
    pub query_count: u64,
    /// Bytes from clients to servers.
    pub bytes_received: u64,
    /// Bytes from servers to clients.
    pub bytes_sent: u64,
    /// Microseconds spent in transactions, in total.
    pub xact_time_us: u64,
    /// Microseconds from request to ReadyForQuery, in total.
    pub query_time_us: u64,
    /// Times a client was given a server connection…
    pub wait_count: u64,
    /// …the microseconds it had waited for it, in total…
    pub wait_time_us: u64,
    /// …and the 50th, 95th and 99th percentile of those waits (to within
    /// a fifth).
    pub wait_p50_us: u64,
    /// See `wait_p50_us`.
    pub wait_p95_us: u64,
    /// See `wait_p50_us`.
    pub wait_p99_us: u64,
    /// ErrorResponses from servers, by SQLSTATE class ("23", "42", ...).
    pub errors: Vec<(String, u64)>,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the message names the key.
    Config(String),
    /// A socket or file operation failed.
    Io(String),
    /// `start` on a running pooler.
    AlreadyStarted,
    /// A request that needs a running pooler before `start`.
    NotStarted,
    /// The backend has stopped.
    Stopped,
    /// The backend answered something that doesn't fit the request.
    UnexpectedReply(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(m) => write!(f, "invalid configuration: {m}"),
            Self::Io(m) => write!(f, "I/O error: {m}"),
            Self::AlreadyStarted => f.write_str("the pooler is already started"),
            Self::NotStarted => f.write_str("the pooler is not started"),
            Self::Stopped => f.write_str("the pooler has stopped"),
            Self::UnexpectedReply(m) => write!(f, "unexpected reply from the pooler: {m}"),
        }
    }
}

impl std::error::Error for Error {}

/// Delivers a call to the backend; false when the backend is gone.
pub type Mailbox = Box<dyn Fn(Call) -> bool + Send + Sync>;

/// The blocking handle on a running (or about to run) pooler.
pub struct Handle {
    mailbox: Mailbox,
    thread: Option<JoinHandle<()>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle").finish_non_exhaustive()
    }
}

impl Handle {
    /// Wraps a backend: `mailbox` delivers calls to it and `thread` is the
    /// thread to join at shutdown. Backends call this; users get a handle
    /// from `odissey::spawn()`.
    pub fn new(mailbox: Mailbox, thread: JoinHandle<()>) -> Self {
        Self {
            mailbox,
            thread: Some(thread),
            next_id: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// True once the backend has stopped by itself (e.g. a console
    /// `SHUTDOWN`) or after `shutdown`.
    pub fn is_stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Sends one request and waits for its reply.
    pub fn call(&self, request: Request) -> Result<Reply, Error> {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        if !(self.mailbox)(Call {
            id,
            request,
            reply: tx,
        }) {
            return Err(Error::Stopped);
        }
        match rx.recv() {
            Ok((rid, reply)) if rid == id => Ok(reply),
            Ok((rid, _)) => Err(Error::UnexpectedReply(format!(
                "reply to request {rid} while waiting for {id}"
            ))),
            Err(_) => Err(Error::Stopped),
        }
    }

    /// Starts the pooler from a config; returns the addresses bound.
    pub fn start(&self, config: ConfigSource) -> Result<Started, Error> {
        match self.call(Request::Start(config))? {
            Reply::Started(s) => Ok(s),
            Reply::Failed(e) => Err(e),
            other => Err(Error::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Applies a new config, or re-reads the start file when `None`.
    /// Returns what the new config changes that needs a restart (empty
    /// when everything took effect).
    pub fn reload(&self, config: Option<ConfigSource>) -> Result<Vec<String>, Error> {
        match self.call(Request::Reload(config))? {
            Reply::Reloaded { notes } => Ok(notes),
            Reply::Failed(e) => Err(e),
            other => Err(Error::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// A snapshot of listeners and pools.
    pub fn inspect(&self) -> Result<Inspection, Error> {
        match self.call(Request::Inspect)? {
            Reply::Inspected(i) => Ok(i),
            Reply::Failed(e) => Err(e),
            other => Err(Error::UnexpectedReply(format!("{other:?}"))),
        }
    }

    /// Graceful shutdown: stop accepting, give running transactions up to
    /// `grace`, close everything, join the threads.
    pub fn shutdown(mut self, grace: Duration) -> Result<(), Error> {
        self.stop(grace)
    }

    fn stop(&mut self, grace: Duration) -> Result<(), Error> {
        let result = match self.call(Request::Shutdown { grace }) {
            Ok(Reply::ShutDown) | Err(Error::Stopped) => Ok(()),
            Ok(Reply::Failed(e)) => Err(e),
            Ok(other) => Err(Error::UnexpectedReply(format!("{other:?}"))),
            Err(e) => Err(e),
        };
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                return Err(Error::Stopped);
            }
        }
        result
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop(Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy backend answering on its own thread, to check the RPC plumbing.
    fn toy() -> Handle {
        let (tx, rx) = mpsc::channel::<Call>();
        let t = std::thread::spawn(move || {
            while let Ok(call) = rx.recv() {
                let reply = match &call.request {
                    Request::Inspect => Reply::Inspected(Inspection {
                        workers: 3,
                        ..Inspection::default()
                    }),
                    Request::Reload(_) => Reply::Failed(Error::Config("nope".into())),
                    Request::Shutdown { .. } => {
                        call.answer(Reply::ShutDown);
                        return;
                    }
                    Request::Start(_) => Reply::Reloaded { notes: Vec::new() }, // wrong on purpose
                };
                call.answer(reply);
            }
        });
        Handle::new(Box::new(move |c| tx.send(c).is_ok()), t)
    }

    #[test]
    fn replies_map_to_results() {
        let h = toy();
        assert_eq!(h.inspect().unwrap().workers, 3);
        assert_eq!(h.reload(None), Err(Error::Config("nope".into())));
        assert!(matches!(
            h.start(ConfigSource::Toml(String::new())),
            Err(Error::UnexpectedReply(_))
        ));
        h.shutdown(Duration::ZERO).unwrap();
    }

    #[test]
    fn drop_shuts_down_and_joins() {
        let h = toy();
        drop(h);
    }
}
