//! The configuration: TOML, parsed and validated outside the reactors.
//!
//! Names follow Odyssey's. A route is `[database.<db>.user.<user>]`; the name
//! `default` matches any database or user. Validation errors name the key at
//! fault and, where it can be found in the source, its line.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a config was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// `workers = 4` or `workers = "auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Workers {
    /// A fixed count.
    Count(usize),
    /// `"auto"`: one per core.
    Auto(AutoWord),
}

/// The word "auto".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AutoWord {
    /// one per core
    #[serde(rename = "auto")]
    Auto,
}

impl Default for Workers {
    fn default() -> Self {
        Self::Auto(AutoWord::Auto)
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Reactor threads hosting clients.
    #[serde(default)]
    pub workers: Workers,
    /// Clients in total; beyond it new clients get SQLSTATE 53300. 0 = no limit.
    #[serde(default)]
    pub client_max: usize,
    /// Debug logging.
    #[serde(default)]
    pub log_debug: bool,
    /// Milliseconds a graceful shutdown waits for running transactions.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: u64,
    /// Seconds of TCP idleness before keepalive probes (0 = off).
    #[serde(default = "default_keepalive")]
    pub keepalive: u64,
    /// Bytes read ahead per connection before relaying waits for the other
    /// side (a slow client stops its server from being read).
    #[serde(default = "default_readahead")]
    pub readahead: usize,
    /// Largest protocol message accepted from a client, in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_size: usize,
    /// Milliseconds a client has to finish TLS, startup and authentication
    /// before it is dropped (0 = no limit).
    #[serde(default = "default_auth_timeout")]
    pub auth_timeout: u64,
    /// Milliseconds a new server connection has to connect and log in
    /// (0 = no limit); beyond it the connection is dropped and the client
    /// it was opened for hears why.
    #[serde(default = "default_server_connect_timeout")]
    pub server_connect_timeout: u64,
    /// CancelRequests odissey may have in flight to servers at once, all
    /// workers together (0 = no limit); beyond it cancels are dropped and
    /// counted, so a client cancelling in a loop cannot open a server
    /// connection per cancel.
    #[serde(default = "default_cancel_max")]
    pub cancel_max: usize,
    /// Also (or only, with `log_to_stdout = false` and no stderr) write
    /// the log to this file; reopened on SIGHUP and SIGUSR1 (logrotate).
    pub log_file: Option<String>,
    /// Send the log to syslog (`/dev/log`).
    #[serde(default)]
    pub log_syslog: bool,
    /// The syslog tag.
    #[serde(default = "default_syslog_ident")]
    pub log_syslog_ident: String,
    /// The syslog facility: "daemon", "user", "local0" … "local7".
    #[serde(default = "default_syslog_facility")]
    pub log_syslog_facility: String,
    /// Write the log to stdout instead of stderr.
    #[serde(default)]
    pub log_to_stdout: bool,
    /// "text" or "json" (one object per line).
    #[serde(default)]
    pub log_format: LogFormat,
    /// A line per client connect and disconnect.
    #[serde(default = "yes")]
    pub log_session: bool,
    /// A line per query a client sends (simple protocol text, extended
    /// protocol Parse text).
    #[serde(default)]
    pub log_query: bool,
    /// Write the process id here while running (removed at exit).
    pub pid_file: Option<String>,
    /// Seconds between one-line summaries per pool in the log (0 = none).
    #[serde(default)]
    pub stats_interval: u64,
    /// Notifications kept per channel for transaction-pooled listeners (a
    /// client further behind is told what it lost).
    #[serde(default = "default_notify_buffer")]
    pub notify_buffer: usize,
    /// The same bound in bytes.
    #[serde(default = "default_notify_buffer_bytes")]
    pub notify_buffer_bytes: usize,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: Metrics,
    /// Listening sockets.
    #[serde(default)]
    pub listen: Vec<Listen>,
    /// Named backends.
    #[serde(default)]
    pub storage: BTreeMap<String, Storage>,
    /// Routes: database name -> users.
    #[serde(default)]
    pub database: BTreeMap<String, Database>,
}

fn default_shutdown_timeout() -> u64 {
    30_000
}
fn default_keepalive() -> u64 {
    60
}
fn default_readahead() -> usize {
    256 * 1024
}
fn default_max_message() -> usize {
    64 * 1024 * 1024
}
fn default_notify_buffer() -> usize {
    1024
}
fn default_notify_buffer_bytes() -> usize {
    1 << 20
}
fn default_cancel_max() -> usize {
    64
}
fn default_server_connect_timeout() -> u64 {
    15_000
}
fn default_auth_timeout() -> u64 {
    10_000
}
fn default_syslog_ident() -> String {
    "odissey".into()
}
fn default_syslog_facility() -> String {
    "daemon".into()
}

/// `log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `<time> <LEVEL> [<thread>] <message>`.
    #[default]
    Text,
    /// One JSON object per line: `time`, `level`, `thread`, `message`.
    Json,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// `host:port` to serve Prometheus metrics on (`GET /metrics`); none
    /// when unset.
    pub listen: Option<String>,
}

/// One `[[listen]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Address to bind; default 127.0.0.1. Omit with `unix_socket` only.
    pub host: Option<String>,
    /// TCP port (0 = any free port).
    pub port: Option<u16>,
    /// Path of a Unix-domain socket to listen on.
    pub unix_socket: Option<String>,
    /// listen(2) backlog.
    #[serde(default = "default_backlog")]
    pub backlog: i32,
    /// TLS towards clients.
    #[serde(default)]
    pub tls: ListenTls,
    /// Certificate chain (PEM) presented to clients.
    pub tls_cert_file: Option<String>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: Option<String>,
    /// CA certificates (PEM) that client certificates are checked against.
    pub tls_ca_file: Option<String>,
    /// TLS versions offered: "tlsv1.2", "tlsv1.3" or both, comma-separated
    /// (default both).
    pub tls_protocols: Option<String>,
    /// Which hosts serve the clients of this listener, over what their
    /// route and storage say (e.g. a read-only port).
    pub target_session_attrs: Option<TargetSessionAttrs>,
}

/// Client-facing TLS of a listener, weakest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenTls {
    /// Refuse TLS (answer 'N' to SSLRequest).
    #[default]
    Disable,
    /// TLS when the client asks; plaintext clients welcome.
    Allow,
    /// Only TLS clients.
    Require,
    /// Only TLS clients with a certificate signed by `tls_ca_file`.
    VerifyCa,
    /// As `verify_ca`, and the certificate's common name must equal the
    /// user name.
    VerifyFull,
}

/// Server-facing TLS of a storage, as libpq's sslmode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageTls {
    /// Plaintext only.
    #[default]
    Disable,
    /// Plaintext first; TLS when the server refuses the plaintext login.
    Allow,
    /// TLS when the server offers it, else plaintext.
    Prefer,
    /// TLS, without checking the server's certificate.
    Require,
    /// TLS with a certificate signed by `tls_ca_file`.
    VerifyCa,
    /// As `verify_ca`, and the certificate must name the host.
    VerifyFull,
}

fn default_backlog() -> i32 {
    1024
}

/// The kind of a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageType {
    /// A PostgreSQL server.
    Remote,
    /// odissey itself: routes to it reach the admin console.
    Local,
}

/// One `[storage.<name>]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Storage {
    /// "remote" (a PostgreSQL server) or "local" (the admin console).
    #[serde(rename = "type")]
    pub kind: StorageType,
    /// Server host name or address; default 127.0.0.1.
    #[serde(default = "default_host")]
    pub host: String,
    /// Server port; default 5432.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Connect through this Unix-socket directory instead of TCP
    /// (the socket is `<dir>/.s.PGSQL.<port>`).
    pub unix_socket_dir: Option<String>,
    /// Several servers of one cluster (a primary and its standbys), instead
    /// of `host`: each `"host:port"`, `"[v6addr]:port"`, `"host"` (on
    /// `port`), or a Unix-socket directory `"/dir"` or `"/dir:port"`. Each
    /// host has its own pools (`pool_size` is per host); which one serves
    /// a transaction follows `target_session_attrs` and `load_balance`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Which hosts may serve a route of this storage (libpq's values; a
    /// route or a `[[listen]]` may say otherwise): `any`, `read-write`,
    /// `primary`, `read-only`, `standby`, `prefer-standby`. A host's role is
    /// found by the health check (`pg_is_in_recovery()`), never declared.
    #[serde(default)]
    pub target_session_attrs: TargetSessionAttrs,
    /// How a transaction picks among the hosts that qualify.
    #[serde(default)]
    pub load_balance: LoadBalance,
    /// How often each host is checked, in ms (role, lag, health), when the
    /// storage has several hosts or a `target_session_attrs` other than
    /// `any` (0 = never; then the role is what server logins report).
    #[serde(default = "default_health_interval")]
    pub health_check_interval: u64,
    /// A check not answered within this many ms fails (a hung host).
    #[serde(default = "default_health_timeout")]
    pub health_check_timeout: u64,
    /// A host whose check or server login failed takes no new work for
    /// this many ms, then comes back at its first good check.
    #[serde(default = "default_ban_time")]
    pub ban_time: u64,
    /// A standby whose replay is more than this many bytes of WAL behind
    /// the primary takes no new work until it is back within (0 = no limit).
    #[serde(default)]
    pub max_replica_lag_bytes: u64,
    /// Likewise in ms of replay delay (0 = no limit).
    #[serde(default)]
    pub max_replica_lag_ms: u64,
    /// Who the health check logs in as; default the `storage_user` (or
    /// user) of the first route to this storage with a known password.
    pub health_check_user: Option<String>,
    /// Its database; default that route's.
    pub health_check_database: Option<String>,
    /// Its password; default that route's server password.
    pub health_check_password: Option<String>,
    /// TLS towards the server.
    #[serde(default)]
    pub tls: StorageTls,
    /// CA certificates (PEM) the server's certificate is checked against.
    pub tls_ca_file: Option<String>,
    /// Client certificate (PEM) presented to the server, for `cert` auth.
    pub tls_cert_file: Option<String>,
    /// Its private key.
    pub tls_key_file: Option<String>,
    /// TLS versions offered (as for `[[listen]]`).
    pub tls_protocols: Option<String>,
    /// Server connections to this storage, all its pools together (0 = no
    /// limit). When they are all taken, the routes that wait for one get
    /// the freed connections in turn, and busier routes give some back.
    #[serde(default)]
    pub storage_max: usize,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_health_interval() -> u64 {
    1_000
}
fn default_health_timeout() -> u64 {
    1_000
}
fn default_ban_time() -> u64 {
    5_000
}

/// Which hosts of a storage may serve a route, as libpq's
/// `target_session_attrs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrs {
    /// Any host that is up.
    #[default]
    Any,
    /// The primary (the newest one, should two claim it).
    #[serde(alias = "read_write")]
    ReadWrite,
    /// As `read-write`.
    Primary,
    /// A standby within `max_replica_lag`.
    #[serde(alias = "read_only")]
    ReadOnly,
    /// As `read-only`.
    Standby,
    /// A standby within `max_replica_lag`, else the primary.
    #[serde(alias = "prefer_standby")]
    PreferStandby,
}

impl TargetSessionAttrs {
    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::ReadWrite => "read-write",
            Self::Primary => "primary",
            Self::ReadOnly => "read-only",
            Self::Standby => "standby",
            Self::PreferStandby => "prefer-standby",
        }
    }
}

/// How a transaction picks among the hosts that qualify.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalance {
    /// In turn.
    #[default]
    RoundRobin,
    /// The one with the fewest server connections open.
    LeastConnections,
    /// At random.
    Random,
}

/// One server of a storage: a TCP host and port, or a Unix-socket
/// directory and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Host name or address (the directory, for a Unix socket).
    pub host: String,
    /// Port (for a Unix socket, the number in `.s.PGSQL.<port>`).
    pub port: u16,
    /// Connect through `<dir>/.s.PGSQL.<port>`.
    pub unix_socket_dir: Option<String>,
}

impl Endpoint {
    /// Parses one entry of `hosts`; `port` is the storage's, for entries
    /// without one.
    pub fn parse(s: &str, port: u16) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an empty host".into());
        }
        let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        let port_of = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("{s:?}: port {p:?} is not a number from 0 to 65535"))
        };
        if let Some(rest) = s.strip_prefix('[') {
            let Some((addr, tail)) = rest.split_once(']') else {
                return Err(format!("{s:?}: no closing ']'"));
            };
            let port = match tail.strip_prefix(':') {
                Some(p) => port_of(p)?,
                None if tail.is_empty() => port,
                None => return Err(format!("{s:?}: expected ':port' after ']'")),
            };
            return Ok(Self {
                host: addr.to_string(),
                port,
                unix_socket_dir: None,
            });
        }
        let (host, port) = match s.rsplit_once(':') {
            // A bare IPv6 address has colons but no port.
            Some((h, p)) if digits(p) && (s.starts_with('/') || !h.contains(':')) => {
                (h, port_of(p)?)
            }
            _ if !s.starts_with('/')
                && s.contains(':')
                && s.parse::<std::net::Ipv6Addr>().is_err() =>
            {
                return Err(format!(
                    "{s:?}: not \"host:port\", \"[v6addr]:port\" or a socket directory"
                ));
            }
            _ => (s, port),
        };
        let unix_socket_dir = host.starts_with('/').then(|| host.to_string());
        Ok(Self {
            host: host.to_string(),
            port,
            unix_socket_dir,
        })
    }

    /// How it is named in logs, the console and metrics.
    pub fn label(&self) -> String {
        match (&self.unix_socket_dir, self.host.contains(':')) {
            (Some(dir), _) => format!("{dir}:{}", self.port),
            (None, true) => format!("[{}]:{}", self.host, self.port),
            (None, false) => format!("{}:{}", self.host, self.port),
        }
    }
}

impl Storage {
    /// Its servers, in the order given.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, String> {
        if self.hosts.is_empty() {
            return Ok(vec![Endpoint {
                host: match &self.unix_socket_dir {
                    Some(dir) => dir.clone(),
                    None => self.host.clone(),
                },
                port: self.port,
                unix_socket_dir: self.unix_socket_dir.clone(),
            }]);
        }
        self.hosts
            .iter()
            .map(|h| Endpoint::parse(h, self.port))
            .collect()
    }
}
fn default_pg_port() -> u16 {
    5432
}

/// `[database.<db>]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// Users of that database.
    #[serde(default)]
    pub user: BTreeMap<String, Route>,
}

/// How clients of a route prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Authentication {
    /// No password asked.
    None,
    /// Refused, whoever asks.
    Block,
    /// Cleartext password.
    ClearText,
    /// md5 challenge.
    Md5,
    /// SCRAM-SHA-256.
    #[serde(rename = "scram-sha-256", alias = "scram_sha_256")]
    ScramSha256,
    /// A TLS client certificate whose common name is the user name.
    Cert,
    /// The client's password, checked by logging in to the server with it.
    Passthrough,
}

impl Authentication {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Block => "block",
            Self::ClearText => "clear_text",
            Self::Md5 => "md5",
            Self::ScramSha256 => "scram-sha-256",
            Self::Cert => "cert",
            Self::Passthrough => "passthrough",
        }
    }
}

/// Pool mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client keeps its server connection until it leaves.
    Session,
    /// The server connection returns to the pool after each transaction.
    Transaction,
    /// The server connection returns to the pool after each statement;
    /// multi-statement transactions are refused.
    Statement,
}

impl PoolMode {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
            Self::Statement => "statement",
        }
    }
}

/// When the session state of a server is read back (`session_check`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionCheck {
    /// After a transaction whose Query or Parse text holds a word that may
    /// change session state (SET, set_config, LISTEN, TEMP...).
    #[default]
    Auto,
    /// After every transaction.
    Always,
}

/// `[database.<db>.user.<user>]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Client authentication.
    pub authentication: Authentication,
    /// The client's secret: a plain password, an md5 hash (`md5…`) or a
    /// SCRAM verifier (`SCRAM-SHA-256$…`), as PostgreSQL stores them.
    pub password: Option<String>,
    /// SQL that fetches the client's secret from the server, with `$1` the
    /// user name, e.g. `SELECT usename, passwd FROM pg_shadow WHERE usename = $1`
    /// (the secret is the last column of the first row).
    pub auth_query: Option<String>,
    /// The route whose server credentials run `auth_query`: its user…
    pub auth_query_user: Option<String>,
    /// …and database (default: the client's database).
    pub auth_query_db: Option<String>,
    /// Name of the storage.
    pub storage: String,
    /// Database on the server; default: the client's.
    pub storage_db: Option<String>,
    /// User on the server; default: the client's.
    pub storage_user: Option<String>,
    /// Password on the server; default: `password` when that is plain text.
    pub storage_password: Option<String>,
    /// Pool mode.
    #[serde(default = "default_pool")]
    pub pool: PoolMode,
    /// Server connections in total for this route, across workers; 0 = no limit.
    #[serde(default)]
    pub pool_size: usize,
    /// Milliseconds a client may wait for a server connection before it is
    /// refused with 53300; 0 = forever. Default 120 000 (PgBouncer's
    /// query_wait_timeout): a saturated pool answers with an error rather
    /// than a silent hang.
    #[serde(default = "default_pool_timeout")]
    pub pool_timeout: u64,
    /// When a client leaves with a query running, cancel it on the server.
    #[serde(default = "yes")]
    pub pool_cancel: bool,
    /// When a client leaves inside a transaction, roll it back and reuse the
    /// server connection (false: close the connection instead).
    #[serde(default = "yes")]
    pub pool_rollback: bool,
    /// Run DISCARD ALL whenever a server connection changes owner.
    #[serde(default)]
    pub pool_discard: bool,
    /// When a server's session state is read back in transaction and
    /// statement pooling: after transactions whose text may change it, or
    /// after every transaction (for applications that change settings
    /// inside functions).
    #[serde(default)]
    pub session_check: SessionCheck,
    /// Milliseconds a server connection may take to come back clean after
    /// its client left (cancel, rollback, reset) before it is closed.
    #[serde(default = "default_reset_timeout")]
    pub pool_reset_timeout: u64,
    /// Track protocol-level prepared statements so they work across server
    /// connections in transaction and statement pooling.
    #[serde(default = "yes")]
    pub prepared_statements: bool,
    /// Prepared statements kept per server connection (least recently used
    /// ones are closed beyond it).
    #[serde(default = "default_prepared_max")]
    pub prepared_statements_max: usize,
    /// Seconds a server connection may sit idle in the pool before it is
    /// closed (0 = forever).
    #[serde(default)]
    pub pool_ttl: u64,
    /// Seconds after which a server connection is closed once idle (0 =
    /// forever).
    #[serde(default)]
    pub server_lifetime: u64,
    /// Seconds a client may stay idle (no transaction, no query) before it
    /// is disconnected (0 = forever).
    #[serde(default)]
    pub client_idle_timeout: u64,
    /// Seconds a client may stay idle inside a transaction before it is
    /// disconnected (0 = forever).
    #[serde(default)]
    pub idle_in_transaction_timeout: u64,
    /// Seconds a query may run before it is cancelled (0 = forever).
    #[serde(default)]
    pub query_timeout: u64,
    /// Clients of this route at once, across workers (0 = no limit).
    #[serde(default)]
    pub client_max: usize,
    /// Server connections kept open even when idle (warm), up to pool_size.
    #[serde(default)]
    pub min_pool_size: usize,
    /// New client logins per second allowed for this route (per pool, i.e.
    /// per database and user), across workers; beyond it a login is
    /// refused with 53300 (0 = no limit).
    #[serde(default)]
    pub client_rate: u32,
    /// Clients that may wait for a server connection at once, across
    /// workers; beyond it a request is refused at once with 53300 (0 = no
    /// limit).
    #[serde(default)]
    pub queue_max: usize,
    /// Which hosts of its storage serve it (default the storage's).
    pub target_session_attrs: Option<TargetSessionAttrs>,
    /// Where a read-write route sends a transaction the client declared
    /// read-only (`BEGIN READ ONLY`, `START TRANSACTION READ ONLY`, `SET
    /// TRANSACTION READ ONLY` first, or `default_transaction_read_only`
    /// on), in transaction pooling: `"primary"` (default) or `"standby"`
    /// (one within lag, else the primary).
    #[serde(default)]
    pub read_only_transactions: ReadOnlyTransactions,
}

/// See `Route::read_only_transactions`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadOnlyTransactions {
    /// With the rest of the route's work.
    #[default]
    Primary,
    /// To a standby within lag, else the primary.
    Standby,
}

fn yes() -> bool {
    true
}
fn default_pool_timeout() -> u64 {
    120_000
}
fn default_reset_timeout() -> u64 {
    5_000
}
fn default_prepared_max() -> usize {
    crate::prepared::DEFAULT_MAX
}

fn default_pool() -> PoolMode {
    PoolMode::Session
}

/// A matched route, resolved against its storage: everything a worker needs
/// to serve the client and open server connections for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedRoute {
    /// Database name of the rule that matched (may be "default").
    pub rule_db: String,
    /// User name of the rule that matched (may be "default").
    pub rule_user: String,
    /// The rule.
    pub route: Route,
    /// Its storage.
    pub storage: Storage,
    /// Database to open on the server.
    pub server_db: String,
    /// User to log in as on the server.
    pub server_user: String,
    /// Password to log in with, if any.
    pub server_password: Option<String>,
    /// Its storage's servers (one, unless the storage lists `hosts`).
    pub endpoints: Arc<[Endpoint]>,
    /// Which of them serve it: the route's, else the storage's (a
    /// `[[listen]]` may override it for its clients).
    pub target_session_attrs: TargetSessionAttrs,
}

impl ResolvedRoute {
    /// True when the host serving a transaction must be chosen (several
    /// hosts, or a role asked for): a single host with `any` is served
    /// as it always was, with no checks and no bans.
    /// The server of host `host` (its first, should the index be stale).
    pub fn endpoint(&self, host: u16) -> &Endpoint {
        // Never empty: a storage has one server or the `hosts` it lists.
        let last = self.endpoints.len().saturating_sub(1);
        &self.endpoints[usize::from(host).min(last)]
    }

    pub fn is_routed(&self, listener: Option<TargetSessionAttrs>) -> bool {
        self.endpoints.len() > 1
            || listener.unwrap_or(self.target_session_attrs) != TargetSessionAttrs::Any
    }
}

impl Config {
    /// Parses and validates TOML text.
    pub fn parse(src: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(src).map_err(|e| ConfigError(e.to_string()))?;
        cfg.validate(src)?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let src = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&src).map_err(|e| ConfigError(format!("{}: {}", path.display(), e.0)))
    }

    /// The built-in config of a start without a config file: listen on
    /// 127.0.0.1:6432 and route every database and user, in transaction
    /// mode with `passthrough` authentication, to the PostgreSQL that
    /// `PGHOST`/`PGPORT` name (else 127.0.0.1:5432). A `PGHOST` starting
    /// with `/` is a Unix-socket directory, as for libpq.
    pub fn zero_config_toml(env: impl Fn(&str) -> Option<String>) -> String {
        let host = env("PGHOST").filter(|h| !h.is_empty());
        let port = env("PGPORT")
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or(5432);
        let server = match host {
            Some(dir) if dir.starts_with('/') => {
                format!("unix_socket_dir = {}\nport = {port}", toml_str(&dir))
            }
            Some(h) => format!("host = {}\nport = {port}", toml_str(&h)),
            None => format!("host = \"127.0.0.1\"\nport = {port}"),
        };
        format!(
            "# odissey's built-in configuration (no config file given).\n\
             [[listen]]\nhost = \"127.0.0.1\"\nport = 6432\n\n\
             [storage.postgres]\ntype = \"remote\"\n{server}\n\n\
             [database.default.user.default]\nauthentication = \"passthrough\"\n\
             storage = \"postgres\"\npool = \"transaction\"\n"
        )
    }

    /// The config as TOML, every default filled in (`--print-config`).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError(format!("cannot print the config: {e}")))
    }

    /// TCP keepalive idle time, `None` when turned off.
    pub fn keepalive(&self) -> Option<std::time::Duration> {
        (self.keepalive > 0).then(|| std::time::Duration::from_secs(self.keepalive))
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            Workers::Count(n) => n,
            Workers::Auto(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    fn validate(&self, src: &str) -> Result<(), ConfigError> {
        let at = |needle: &str| match line_of(src, needle) {
            Some(l) => format!(" (line {l})"),
            None => String::new(),
        };
        if let Workers::Count(0) = self.workers {
            return Err(ConfigError(format!(
                "workers: must be at least 1 or \"auto\"{}",
                at("workers")
            )));
        }
        if self.listen.is_empty() {
            return Err(ConfigError(
                "listen: at least one [[listen]] section is required".into(),
            ));
        }
        for (i, l) in self.listen.iter().enumerate() {
            if l.port.is_none() && l.unix_socket.is_none() {
                return Err(ConfigError(format!(
                    "listen[{i}]: needs `port` or `unix_socket`"
                )));
            }
            if l.unix_socket.is_some() && l.port.is_none() && l.host.is_some() {
                return Err(ConfigError(format!(
                    "listen[{i}].host: set with `unix_socket` but no `port`"
                )));
            }
            if let Some(h) = &l.host {
                if resolve(h, l.port.unwrap_or(0)).is_err() {
                    return Err(ConfigError(format!(
                        "listen[{i}].host: cannot resolve {h:?}{}",
                        at(&format!("\"{h}\""))
                    )));
                }
            }
            crate::tls::listener_tls(l).map_err(|e| ConfigError(format!("listen[{i}]: {e}")))?;
        }
        crate::logging::syslog_facility(&self.log_syslog_facility).map_err(|e| {
            ConfigError(format!(
                "log_syslog_facility: {e}{}",
                at("log_syslog_facility")
            ))
        })?;
        if let Some(addr) = &self.metrics.listen {
            resolve_host_port(addr).map_err(|e| {
                ConfigError(format!(
                    "metrics.listen: {addr:?} is not a host:port that resolves ({e}){}",
                    at("[metrics]")
                ))
            })?;
        }
        for (name, st) in &self.storage {
            let line = at(&format!("storage.{name}]"));
            crate::tls::storage_tls(st)
                .map_err(|e| ConfigError(format!("storage.{name}: {e}{line}")))?;
            self.validate_hosts(name, st)
                .map_err(|e| ConfigError(format!("storage.{name}.{e}{line}")))?;
        }
        let client_certs = self
            .listen
            .iter()
            .any(|l| l.tls != ListenTls::Disable && l.tls_ca_file.is_some());
        if self.readahead < 4096 {
            return Err(ConfigError(format!(
                "readahead: at least 4096 bytes{}",
                at("readahead")
            )));
        }
        if self.max_message_size < 1024 {
            return Err(ConfigError(format!(
                "max_message_size: at least 1024 bytes{}",
                at("max_message_size")
            )));
        }
        for (db, d) in &self.database {
            for (user, r) in &d.user {
                let key = format!("database.{db}.user.{user}");
                let line = at(&format!("user.{user}]"));
                if !self.storage.contains_key(&r.storage) {
                    return Err(ConfigError(format!(
                        "{key}.storage: no storage named {:?}{line}",
                        r.storage
                    )));
                }
                if r.prepared_statements_max == 0 {
                    return Err(ConfigError(format!(
                        "{key}.prepared_statements_max: must be at least 1{line}"
                    )));
                }
                self.validate_auth(&key, r, client_certs)
                    .map_err(|e| ConfigError(format!("{e}{line}")))?;
            }
        }
        Ok(())
    }

    /// Refuses a storage's hosts and routing settings that cannot work.
    fn validate_hosts(&self, name: &str, st: &Storage) -> Result<(), String> {
        let not_any =
            |t: Option<TargetSessionAttrs>| t.is_some_and(|t| t != TargetSessionAttrs::Any);
        let routed = st.kind == StorageType::Remote
            && (st.hosts.len() > 1
                || not_any(Some(st.target_session_attrs))
                || self.listen.iter().any(|l| not_any(l.target_session_attrs))
                || self.database.values().any(|d| {
                    d.user
                        .values()
                        .any(|r| r.storage == name && not_any(r.target_session_attrs))
                }));
        if routed && st.health_check_interval == 0 {
            return Err("health_check_interval: must be above 0 for several hosts or a target_session_attrs other than \"any\" (roles and health are found by the check)".into());
        }
        if st.health_check_timeout == 0 {
            return Err("health_check_timeout: must be above 0".into());
        }
        if st.hosts.is_empty() {
            return Ok(());
        }
        if st.kind == StorageType::Local {
            return Err("hosts: a console storage (type \"local\") has no servers".into());
        }
        if st.host != default_host() || st.unix_socket_dir.is_some() {
            return Err("hosts: set either `hosts` or `host`/`unix_socket_dir`, not both".into());
        }
        let mut seen = std::collections::HashSet::new();
        for h in &st.hosts {
            let e = Endpoint::parse(h, st.port).map_err(|e| format!("hosts: {e}"))?;
            if !seen.insert(e.label()) {
                return Err(format!("hosts: {} is listed twice", e.label()));
            }
        }
        Ok(())
    }

    /// Refuses the combinations of method and secret that cannot work.
    fn validate_auth(&self, key: &str, r: &Route, client_certs: bool) -> Result<(), String> {
        let method = r.authentication.as_str();
        let secret = r.password.as_deref();
        if r.auth_query.is_some() {
            if !matches!(
                r.authentication,
                Authentication::ClearText | Authentication::Md5 | Authentication::ScramSha256
            ) {
                return Err(format!(
                    "{key}.auth_query: needs authentication = \"clear_text\", \"md5\" or \"scram-sha-256\", not {method:?}"
                ));
            }
            let Some(qu) = &r.auth_query_user else {
                return Err(format!("{key}.auth_query_user: required with auth_query"));
            };
            if let Some(qd) = &r.auth_query_db {
                if self.route(qd, qu).is_none() {
                    return Err(format!(
                        "{key}.auth_query_user: no route for database {qd:?} and user {qu:?} to run auth_query through"
                    ));
                }
            }
        } else if r.auth_query_user.is_some() || r.auth_query_db.is_some() {
            return Err(format!("{key}.auth_query_user: set without auth_query"));
        }
        let local = self
            .storage
            .get(&r.storage)
            .is_some_and(|s| s.kind == StorageType::Local);
        if local && (r.authentication == Authentication::Passthrough || r.auth_query.is_some()) {
            return Err(format!(
                "{key}.authentication: a console route (storage of type \"local\") has no server to check passwords with; use a password, cert or none"
            ));
        }
        match r.authentication {
            Authentication::ClearText | Authentication::Md5 | Authentication::ScramSha256
                if secret.is_none() && r.auth_query.is_none() =>
            {
                Err(format!(
                    "{key}.password: required by authentication = {method:?} (or set auth_query)"
                ))
            }
            Authentication::Md5 if secret.is_some_and(is_scram_verifier) => Err(format!(
                "{key}.password: a SCRAM verifier cannot check md5 logins; use authentication = \"scram-sha-256\", or a plain password or md5 hash"
            )),
            Authentication::ScramSha256 if secret.is_some_and(is_md5_hash) => Err(format!(
                "{key}.password: an md5 hash cannot check SCRAM logins; use authentication = \"md5\", or a plain password or SCRAM verifier"
            )),
            Authentication::Cert if !client_certs => Err(format!(
                "{key}.authentication: \"cert\" needs a [[listen]] with tls enabled and tls_ca_file set"
            )),
            Authentication::Passthrough if r.storage_user.is_some() => Err(format!(
                "{key}.storage_user: passthrough logs in to the server as the client's user; remove storage_user"
            )),
            _ => Ok(()),
        }
    }

    /// Finds the route for a client's (database, user): exact match first,
    /// then `default` user of that database, then the `default` database.
    pub fn route(&self, database: &str, user: &str) -> Option<Arc<ResolvedRoute>> {
        // (A worker asks through its `RouteCache`, so that the clients of
        // one pool share one resolution.)
        let candidates = [
            (database, user),
            (database, "default"),
            ("default", user),
            ("default", "default"),
        ];
        for (db, u) in candidates {
            if let Some(route) = self.database.get(db).and_then(|d| d.user.get(u)) {
                let storage = self.storage.get(&route.storage)?.clone();
                // A plain client password serves the server too, for the
                // same user; hashes and verifiers can't be logged in with.
                let server_password = route.storage_password.clone().or_else(|| {
                    route.password.clone().filter(|p| {
                        route.storage_user.is_none() && !is_md5_hash(p) && !is_scram_verifier(p)
                    })
                });
                // (Validated at load: a storage's hosts parse.)
                let endpoints: Arc<[Endpoint]> = storage.endpoints().ok()?.into();
                let target_session_attrs = route
                    .target_session_attrs
                    .unwrap_or(storage.target_session_attrs);
                return Some(Arc::new(ResolvedRoute {
                    rule_db: db.to_string(),
                    rule_user: u.to_string(),
                    route: route.clone(),
                    storage,
                    server_db: route.storage_db.clone().unwrap_or_else(|| database.into()),
                    server_user: route.storage_user.clone().unwrap_or_else(|| user.into()),
                    server_password,
                    endpoints,
                    target_session_attrs,
                }));
            }
        }
        None
    }
}

/// Resolves `host:port` (or `[v6]:port`) to one socket address.
pub fn resolve_host_port(s: &str) -> std::io::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{s} resolves to nothing"),
        )
    })
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// True for a SCRAM-SHA-256 verifier as PostgreSQL stores it.
pub fn is_scram_verifier(s: &str) -> bool {
    odissey_protocol::scram::ScramSecret::parse(s).is_ok()
}

/// True for PostgreSQL's md5 password hash form (`md5` + 32 hex digits).
pub fn is_md5_hash(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Resolves a host and port to one socket address.
pub fn resolve(host: &str, port: u16) -> std::io::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
}

fn line_of(src: &str, needle: &str) -> Option<usize> {
    src.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// The routes one worker has resolved, so that the clients of a pool share
/// one `ResolvedRoute` instead of holding a few hundred bytes each: idle
/// clients are what a pooler has most of. Emptied when the config changes.
#[derive(Debug, Default)]
pub(crate) struct RouteCache {
    by_db: HashMap<Box<str>, HashMap<Box<str>, Arc<ResolvedRoute>>>,
    len: usize,
}

impl RouteCache {
    /// Past this many (database, user) pairs the cache starts over: names
    /// are the client's choice, and a wildcard route must not let a stream
    /// of made-up ones grow memory without bound.
    const MAX: usize = 10_000;

    /// `cfg.route(database, user)`, resolved once per pair.
    pub(crate) fn route(
        &mut self,
        cfg: &Config,
        database: &str,
        user: &str,
    ) -> Option<Arc<ResolvedRoute>> {
        if let Some(r) = self.by_db.get(database).and_then(|u| u.get(user)) {
            return Some(Arc::clone(r));
        }
        let r = cfg.route(database, user)?;
        if self.len >= Self::MAX {
            self.clear();
        }
        self.by_db
            .entry(database.into())
            .or_default()
            .insert(user.into(), Arc::clone(&r));
        self.len += 1;
        Some(r)
    }

    /// Forgets every resolution (the config changed).
    pub(crate) fn clear(&mut self) {
        self.by_db.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
workers = 2
client_max = 10000
log_debug = false

[[listen]]
host = "127.0.0.1"
port = 6432

[storage.main]
type = "remote"
host = "127.0.0.1"
port = 5432

[database.app.user.app]
authentication = "md5"
password = "client-password"
storage = "main"
storage_db = "app"
storage_user = "app"
storage_password = "server-password"
pool = "transaction"
pool_size = 20
pool_timeout = 4000

[database.default.user.default]
authentication = "none"
storage = "main"
"#;

    #[test]
    fn hosts_parse_as_libpq_writes_them() {
        let e = |s: &str| Endpoint::parse(s, 5432);
        assert_eq!(e("10.0.0.1:6000").unwrap().label(), "10.0.0.1:6000");
        assert_eq!(e("db.example").unwrap().label(), "db.example:5432");
        assert_eq!(e("[::1]:5433").unwrap().label(), "[::1]:5433");
        assert_eq!(e("::1").unwrap().label(), "[::1]:5432");
        let unix = e("/run/postgresql:5433").unwrap();
        assert_eq!(unix.unix_socket_dir.as_deref(), Some("/run/postgresql"));
        assert_eq!(unix.port, 5433);
        assert_eq!(e("/tmp").unwrap().label(), "/tmp:5432");
        assert!(e("host:99999").unwrap_err().contains("port"));
        assert!(e("[::1").is_err());
        assert!(e(" ").is_err());
    }

    #[test]
    fn routed_storages_are_checked_at_load() {
        let base = |storage: &str, route: &str| {
            format!(
                "[[listen]]\nport = 1\n[storage.main]\ntype = \"remote\"\n{storage}\n\
                 [database.app.user.app]\nauthentication = \"none\"\nstorage = \"main\"\n{route}\n"
            )
        };
        let ok = Config::parse(&base(
            "hosts = [\"a:1\", \"b:2\"]\ntarget_session_attrs = \"read-write\"\nload_balance = \"least_connections\"",
            "target_session_attrs = \"prefer-standby\"",
        ))
        .unwrap();
        let r = ok.route("app", "app").unwrap();
        assert_eq!(r.endpoints.len(), 2);
        assert_eq!(r.target_session_attrs, TargetSessionAttrs::PreferStandby);
        assert!(r.is_routed(None));
        // One host and `any`: served as ever, no checks.
        let plain = Config::parse(&base("host = \"a\"", "")).unwrap();
        assert!(!plain.route("app", "app").unwrap().is_routed(None));
        assert!(plain
            .route("app", "app")
            .unwrap()
            .is_routed(Some(TargetSessionAttrs::ReadOnly)));
        for (storage, route, says) in [
            ("hosts = [\"a:1\", \"a:1\"]", "", "listed twice"),
            ("hosts = [\"a:x1\"]", "", "hosts"),
            ("hosts = [\"a:1\"]\nhost = \"b\"", "", "not both"),
            (
                "hosts = [\"a:1\", \"b:1\"]\nhealth_check_interval = 0",
                "",
                "health_check_interval",
            ),
            (
                "health_check_interval = 0",
                "target_session_attrs = \"read-only\"",
                "health_check_interval",
            ),
            ("target_session_attrs = \"writable\"", "", "unknown variant"),
        ] {
            let err = Config::parse(&base(storage, route)).unwrap_err().0;
            assert!(err.contains(says), "{storage} / {route}: {err}");
        }
    }

    #[test]
    fn the_documented_example_parses() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.worker_count(), 2);
        assert_eq!(c.client_max, 10000);
        let r = c.route("app", "app").unwrap();
        assert_eq!(r.route.pool, PoolMode::Transaction);
        assert_eq!(r.route.pool_size, 20);
        assert_eq!(r.server_password.as_deref(), Some("server-password"));
        let d = c.route("other", "bob").unwrap();
        assert_eq!(
            (d.rule_db.as_str(), d.rule_user.as_str()),
            ("default", "default")
        );
        assert_eq!(
            (d.server_db.as_str(), d.server_user.as_str()),
            ("other", "bob")
        );
        assert_eq!(d.route.pool, PoolMode::Session);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let bad = EXAMPLE.replace(
            "storage = \"main\"\nstorage_db",
            "storage = \"nope\"\nstorage_db",
        );
        let e = Config::parse(&bad).unwrap_err().0;
        assert!(e.contains("database.app.user.app.storage"), "{e}");
        assert!(e.contains("line 15"), "{e}");

        let e = Config::parse(&EXAMPLE.replace("pool_size = 20", "pool_size = \"x\""))
            .unwrap_err()
            .0;
        assert!(e.contains("pool_size") && e.contains("line 23"), "{e}");

        let e = Config::parse(&EXAMPLE.replace("log_debug", "log_debugg"))
            .unwrap_err()
            .0;
        assert!(e.contains("log_debugg"), "{e}");

        let e = Config::parse(&EXAMPLE.replace("workers = 2", "workers = \"many\""))
            .unwrap_err()
            .0;
        assert!(e.contains("workers"), "{e}");

        let e = Config::parse("workers = 1\n").unwrap_err().0;
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn pool_timeout_defaults_to_two_minutes_and_0_waits_forever() {
        let c = Config::parse(EXAMPLE).unwrap();
        // Unset (the default route): a finite wait, PgBouncer's 120 s.
        assert_eq!(c.route("other", "bob").unwrap().route.pool_timeout, 120_000);
        assert_eq!(c.route("app", "app").unwrap().route.pool_timeout, 4000);
        let forever = EXAMPLE.replace("pool_timeout = 4000", "pool_timeout = 0");
        let c = Config::parse(&forever).unwrap();
        assert_eq!(c.route("app", "app").unwrap().route.pool_timeout, 0);
    }

    #[test]
    fn md5_route_needs_a_password() {
        let bad = EXAMPLE.replace("password = \"client-password\"\n", "");
        let e = Config::parse(&bad).unwrap_err().0;
        assert!(e.contains("database.app.user.app.password"), "{e}");
    }
}
