//! Helpers shared by odissey's end-to-end tests: a config builder, pooler
//! start-up, postgres-crate connections through the pooler, a tiny raw
//! protocol client (for abrupt disconnects and garbage input), a monitor of
//! server connection counts, and a per-test watchdog.
//!
//! Every test file does `mod common;` and uses a subset, hence the allow.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub(crate) use odissey::{ConfigSource, Handle, Inspection};
pub(crate) use odissey_harness::PgCluster;
pub(crate) use postgres::error::SqlState;
pub(crate) use postgres::{Client, NoTls};

// ---------------------------------------------------------------------------
// Configuration builder
// ---------------------------------------------------------------------------

/// One `[database.<db>.user.<user>]` section.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) db: String,
    pub(crate) user: String,
    pub(crate) authentication: String,
    pub(crate) password: Option<String>,
    pub(crate) storage_db: Option<String>,
    pub(crate) storage_user: Option<String>,
    pub(crate) storage_password: Option<String>,
    pub(crate) pool: String,
    pub(crate) pool_size: usize,
    pub(crate) pool_timeout: u64,
}

impl Route {
    /// A route with `authentication = "none"`, session pooling, unlimited
    /// pool and no pool timeout.
    pub(crate) fn new(db: &str, user: &str) -> Self {
        Self {
            db: db.into(),
            user: user.into(),
            authentication: "none".into(),
            password: None,
            storage_db: None,
            storage_user: None,
            storage_password: None,
            pool: "session".into(),
            pool_size: 0,
            pool_timeout: 0,
        }
    }

    /// Client authentication "md5" with `password`.
    pub(crate) fn md5(mut self, password: &str) -> Self {
        self.authentication = "md5".into();
        self.password = Some(password.into());
        self
    }

    /// Client authentication "clear_text" with `password`.
    pub(crate) fn clear_text(mut self, password: &str) -> Self {
        self.authentication = "clear_text".into();
        self.password = Some(password.into());
        self
    }

    pub(crate) fn storage_db(mut self, db: &str) -> Self {
        self.storage_db = Some(db.into());
        self
    }

    pub(crate) fn storage_user(mut self, user: &str) -> Self {
        self.storage_user = Some(user.into());
        self
    }

    pub(crate) fn storage_password(mut self, password: &str) -> Self {
        self.storage_password = Some(password.into());
        self
    }

    pub(crate) fn session(mut self) -> Self {
        self.pool = "session".into();
        self
    }

    pub(crate) fn transaction(mut self) -> Self {
        self.pool = "transaction".into();
        self
    }

    pub(crate) fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    pub(crate) fn pool_timeout_ms(mut self, ms: u64) -> Self {
        self.pool_timeout = ms;
        self
    }

    fn write_toml(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n[database.{}.user.{}]",
            key(&self.db),
            key(&self.user)
        );
        let _ = writeln!(out, "authentication = {}", s(&self.authentication));
        if let Some(p) = &self.password {
            let _ = writeln!(out, "password = {}", s(p));
        }
        let _ = writeln!(out, "storage = \"main\"");
        if let Some(v) = &self.storage_db {
            let _ = writeln!(out, "storage_db = {}", s(v));
        }
        if let Some(v) = &self.storage_user {
            let _ = writeln!(out, "storage_user = {}", s(v));
        }
        if let Some(v) = &self.storage_password {
            let _ = writeln!(out, "storage_password = {}", s(v));
        }
        let _ = writeln!(out, "pool = {}", s(&self.pool));
        let _ = writeln!(out, "pool_size = {}", self.pool_size);
        let _ = writeln!(out, "pool_timeout = {}", self.pool_timeout);
    }
}

/// A whole pooler config: one `[[listen]]` on 127.0.0.1 port 0, one
/// `[storage.main]` pointing at the test cluster, and the routes.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) pg_port: u16,
    pub(crate) workers: usize,
    pub(crate) client_max: usize,
    pub(crate) shutdown_timeout: Option<u64>,
    pub(crate) routes: Vec<Route>,
    /// Extra `key = value` lines at the top level, in `[[listen]]` and in
    /// `[storage.main]`.
    pub(crate) global_lines: Vec<String>,
    pub(crate) listen_lines: Vec<String>,
    pub(crate) storage_lines: Vec<String>,
}

impl Config {
    /// `workers = 2`, no client limit, no routes yet.
    pub(crate) fn new(pg_port: u16) -> Self {
        Self {
            pg_port,
            workers: 2,
            client_max: 0,
            shutdown_timeout: None,
            routes: Vec::new(),
            global_lines: Vec::new(),
            listen_lines: Vec::new(),
            storage_lines: Vec::new(),
        }
    }

    /// A top-level `key = <toml value>` line.
    pub(crate) fn global(mut self, key: &str, toml_value: &str) -> Self {
        self.global_lines.push(format!("{key} = {toml_value}"));
        self
    }

    /// A `key = <toml value>` line in the `[[listen]]` section.
    pub(crate) fn listen(mut self, key: &str, toml_value: &str) -> Self {
        self.listen_lines.push(format!("{key} = {toml_value}"));
        self
    }

    /// A `key = <toml value>` line in the `[storage.main]` section.
    pub(crate) fn storage(mut self, key: &str, toml_value: &str) -> Self {
        self.storage_lines.push(format!("{key} = {toml_value}"));
        self
    }

    pub(crate) fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    pub(crate) fn client_max(mut self, n: usize) -> Self {
        self.client_max = n;
        self
    }

    pub(crate) fn shutdown_timeout_ms(mut self, ms: u64) -> Self {
        self.shutdown_timeout = Some(ms);
        self
    }

    pub(crate) fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    /// The TOML text. `log_debug` follows `$ODISSEY_TEST_DEBUG`.
    pub(crate) fn toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "workers = {}", self.workers);
        let _ = writeln!(out, "client_max = {}", self.client_max);
        let _ = writeln!(out, "log_debug = {}", debug_enabled());
        if let Some(ms) = self.shutdown_timeout {
            let _ = writeln!(out, "shutdown_timeout = {ms}");
        }
        for l in &self.global_lines {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(out, "\n[[listen]]\nhost = \"127.0.0.1\"\nport = 0");
        for l in &self.listen_lines {
            let _ = writeln!(out, "{l}");
        }
        let _ = writeln!(
            out,
            "\n[storage.main]\ntype = \"remote\"\nhost = \"127.0.0.1\"\nport = {}",
            self.pg_port
        );
        for l in &self.storage_lines {
            let _ = writeln!(out, "{l}");
        }
        for r in &self.routes {
            r.write_toml(&mut out);
        }
        out
    }
}

fn debug_enabled() -> bool {
    std::env::var_os("ODISSEY_TEST_DEBUG").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A TOML basic string.
fn s(v: &str) -> String {
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A TOML key: bare when possible, quoted otherwise.
fn key(v: &str) -> String {
    if !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        v.to_string()
    } else {
        s(v)
    }
}

// ---------------------------------------------------------------------------
// Starting the pooler
// ---------------------------------------------------------------------------

/// Starts the pooler from TOML text; returns the handle and its TCP port.
pub(crate) fn start_pooler(config: &Config) -> (Handle, u16) {
    start_pooler_from(ConfigSource::Toml(config.toml()))
}

/// Starts the pooler from any config source; returns the handle and the
/// TCP port of its first listener.
pub(crate) fn start_pooler_from(source: ConfigSource) -> (Handle, u16) {
    if std::env::var_os("ODISSEY_TEST_DEBUG").is_some_and(|v| !v.is_empty() && v != "0") {
        odissey::logging::init(true);
    }
    let shown = format!("{source:?}");
    let handle = odissey::start(source)
        .unwrap_or_else(|e| panic!("odissey::start failed: {e}\nconfig: {shown}"));
    let inspection = handle
        .inspect()
        .unwrap_or_else(|e| panic!("inspect after start failed: {e}"));
    let addr = *inspection
        .tcp
        .first()
        .unwrap_or_else(|| panic!("the pooler bound no TCP listener: {inspection:?}"));
    assert_ne!(addr.port(), 0, "inspect() must report the real port");
    (handle, addr.port())
}

/// Server connections of all routes: active + idle + login.
pub(crate) fn servers_total(inspection: &Inspection) -> usize {
    inspection
        .routes
        .iter()
        .map(|r| r.servers_active + r.servers_idle + r.servers_login)
        .sum()
}

/// Server connections (active + idle + login) of the routes whose user is
/// `user` (whether the route is reported by the client's names or by the
/// configured names, the tests that use this have exact routes only).
pub(crate) fn servers_of_user(inspection: &Inspection, user: &str) -> usize {
    inspection
        .routes
        .iter()
        .filter(|r| r.user == user)
        .map(|r| r.servers_active + r.servers_idle + r.servers_login)
        .sum()
}

// ---------------------------------------------------------------------------
// postgres-crate clients through the pooler
// ---------------------------------------------------------------------------

/// Connection parameters for the pooler on `port`.
pub(crate) fn pg_config(
    port: u16,
    db: &str,
    user: &str,
    password: Option<&str>,
) -> postgres::Config {
    let mut config = postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .dbname(db)
        .user(user)
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = password {
        config.password(p);
    }
    config
}

pub(crate) fn try_connect(
    port: u16,
    db: &str,
    user: &str,
    password: Option<&str>,
) -> Result<Client, postgres::Error> {
    pg_config(port, db, user, password).connect(NoTls)
}

/// A client logged in through the pooler; panics with the server's error.
pub(crate) fn connect(port: u16, db: &str, user: &str, password: Option<&str>) -> Client {
    try_connect(port, db, user, password).unwrap_or_else(|e| {
        panic!(
            "cannot connect through the pooler (port {port}) db={db} user={user}: {}",
            describe(&e)
        )
    })
}

/// Retries `try_connect` until it works or `timeout` passes (for things
/// that settle asynchronously: a server going back to the pool, a client
/// slot being freed).
pub(crate) fn connect_eventually(
    port: u16,
    db: &str,
    user: &str,
    password: Option<&str>,
    timeout: Duration,
) -> Client {
    let deadline = Instant::now() + timeout;
    loop {
        match try_connect(port, db, user, password) {
            Ok(c) => return c,
            Err(e) if Instant::now() >= deadline => panic!(
                "still cannot connect through the pooler after {timeout:?}: {}",
                describe(&e)
            ),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// "message (SEVERITY: text [CODE])" for any postgres error.
pub(crate) fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{e} ({}: {} [{}])",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => format!("{e}"),
    }
}

/// Asserts that `result` failed with SQLSTATE `code`; returns the error.
#[track_caller]
pub(crate) fn expect_code<T>(
    result: Result<T, postgres::Error>,
    code: &SqlState,
    what: &str,
) -> postgres::Error {
    match result {
        Ok(_) => panic!("{what}: expected SQLSTATE {} but it succeeded", code.code()),
        Err(e) => {
            assert_eq!(
                e.code().map(SqlState::code),
                Some(code.code()),
                "{what}: expected SQLSTATE {}, got {}",
                code.code(),
                describe(&e)
            );
            e
        }
    }
}

/// Asserts that `e` is one of the pooler's own errors: FATAL, message
/// starting with "odissey:".
#[track_caller]
pub(crate) fn assert_pooler_fatal(e: &postgres::Error, what: &str) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("{what}: expected an ErrorResponse, got {}", describe(e)));
    assert_eq!(db.severity(), "FATAL", "{what}: {}", describe(e));
    assert!(
        db.message().starts_with("odissey:"),
        "{what}: the pooler's errors start with \"odissey:\": {}",
        describe(e)
    );
}

/// First column of the first row of a simple query, as text.
#[track_caller]
pub(crate) fn scalar(client: &mut Client, sql: &str) -> Option<String> {
    let messages = client
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)));
    for m in messages {
        if let postgres::SimpleQueryMessage::Row(row) = m {
            return row.get(0).map(str::to_owned);
        }
    }
    panic!("{sql}: no row returned");
}

/// `select pg_backend_pid()` through the simple protocol.
#[track_caller]
pub(crate) fn backend_pid(client: &mut Client) -> i32 {
    scalar(client, "select pg_backend_pid()")
        .expect("pid is not null")
        .parse()
        .expect("pid is an integer")
}

/// A single-value query straight on the cluster (as superuser).
#[track_caller]
pub(crate) fn pg_scalar(cluster: &PgCluster, db: &str, sql: &str) -> Option<String> {
    let rows = cluster.sql(db, sql);
    assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
    rows[0][0].clone()
}

// ---------------------------------------------------------------------------
// Monitor of server connection counts
// ---------------------------------------------------------------------------

/// Polls, on its own scoped thread, PostgreSQL's count of backends of
/// `user` and the pooler's servers of all routes, keeping the maxima.
pub(crate) struct Monitor {
    stop: AtomicBool,
    pub(crate) max_backends: AtomicUsize,
    pub(crate) max_servers: AtomicUsize,
    pub(crate) samples: AtomicUsize,
}

impl Monitor {
    pub(crate) fn new() -> Self {
        Self {
            stop: AtomicBool::new(false),
            max_backends: AtomicUsize::new(0),
            max_servers: AtomicUsize::new(0),
            samples: AtomicUsize::new(0),
        }
    }

    /// The polling loop; run it in `thread::scope`. `handle` may be None to
    /// watch PostgreSQL only.
    pub(crate) fn run(&self, cluster: &PgCluster, user: &str, handle: Option<&Handle>) {
        while !self.stop.load(Ordering::SeqCst) {
            let b = cluster.backends(user);
            self.max_backends.fetch_max(b, Ordering::SeqCst);
            if let Some(h) = handle {
                if let Ok(i) = h.inspect() {
                    self.max_servers
                        .fetch_max(servers_total(&i), Ordering::SeqCst);
                }
            }
            self.samples.fetch_add(1, Ordering::SeqCst);
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub(crate) fn max_backends(&self) -> usize {
        self.max_backends.load(Ordering::SeqCst)
    }

    pub(crate) fn max_servers(&self) -> usize {
        self.max_servers.load(Ordering::SeqCst)
    }

    pub(crate) fn samples(&self) -> usize {
        self.samples.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// Watchdog
// ---------------------------------------------------------------------------

/// Aborts the whole test process when a test runs longer than `limit`
/// (the postgres client has no query timeout, and a hung pooler would hang
/// the test run forever). Keep the guard alive for the test's duration.
pub(crate) struct Watchdog {
    _done: mpsc::Sender<()>,
}

pub(crate) fn watchdog(name: &'static str, limit: Duration) -> Watchdog {
    let (tx, rx) = mpsc::channel::<()>();
    thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
            // Straight to the process's stderr: eprintln! output is captured
            // by the test harness and would be lost at exit.
            let _ = writeln!(
                io::stderr(),
                "test {name} is still running after {limit:?}: the pooler hangs; aborting"
            );
            std::process::exit(101);
        }
    });
    Watchdog { _done: tx }
}

// ---------------------------------------------------------------------------
// Raw protocol client
// ---------------------------------------------------------------------------

/// Fields of an ErrorResponse / NoticeResponse.
#[derive(Debug, Clone, Default)]
pub(crate) struct ErrorFields {
    pub(crate) severity: String,
    pub(crate) code: String,
    pub(crate) message: String,
}

/// Parses the body (after tag and length) of an ErrorResponse.
pub(crate) fn parse_error_fields(body: &[u8]) -> ErrorFields {
    let mut f = ErrorFields::default();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match kind {
            b'S' => f.severity = value,
            b'C' => f.code = value,
            b'M' => f.message = value,
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    f
}

/// Parses every complete message in `bytes`, returning (tag, body) pairs.
/// Stops at the first incomplete one.
pub(crate) fn split_messages(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        if len < 4 || rest.len() < 1 + len {
            break;
        }
        out.push((rest[0], rest[5..1 + len].to_vec()));
        rest = &rest[1 + len..];
    }
    out
}

/// The result of one simple query.
#[derive(Debug, Default)]
pub(crate) struct QueryOutcome {
    pub(crate) rows: Vec<Vec<Option<String>>>,
    pub(crate) error: Option<ErrorFields>,
    /// The ReadyForQuery status: b'I', b'T' or b'E'.
    pub(crate) status: u8,
}

/// A hand-written protocol v3 client (trust / authentication = "none"
/// routes only), able to leave without a Terminate.
pub(crate) struct RawClient {
    pub(crate) stream: TcpStream,
}

impl RawClient {
    /// A plain TCP connection to the pooler (nothing sent yet), with a 10 s
    /// read timeout.
    pub(crate) fn tcp(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set_read_timeout");
        stream.set_nodelay(true).expect("set_nodelay");
        Self { stream }
    }

    /// Connects and logs in as `user` on `db`; Err with the ErrorResponse
    /// when the pooler refuses.
    pub(crate) fn login(port: u16, user: &str, db: &str) -> Result<Self, ErrorFields> {
        let mut c = Self::tcp(port);
        c.send_startup(&[("user", user), ("database", db)]);
        c.finish_login()?;
        Ok(c)
    }

    pub(crate) fn send_startup(&mut self, params: &[(&str, &str)]) {
        self.stream
            .write_all(&startup_packet(params))
            .expect("write startup");
    }

    /// Reads the login exchange up to ReadyForQuery.
    pub(crate) fn finish_login(&mut self) -> Result<(), ErrorFields> {
        loop {
            let (tag, body) = self
                .read_msg()
                .unwrap_or_else(|e| panic!("raw client: reading the login reply: {e}"));
            match tag {
                b'R' => {
                    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    assert_eq!(
                        code, 0,
                        "the raw test client only supports routes without authentication"
                    );
                }
                b'S' | b'K' | b'N' => {}
                b'E' => return Err(parse_error_fields(&body)),
                b'Z' => return Ok(()),
                other => panic!(
                    "raw client: unexpected message {:?} during login",
                    other as char
                ),
            }
        }
    }

    /// One message: (tag, body).
    pub(crate) fn read_msg(&mut self) -> io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=(1 << 26)).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad message length {len} (tag {:?})", head[0] as char),
            ));
        }
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body)?;
        Ok((head[0], body))
    }

    /// Sends a simple Query and reads up to ReadyForQuery.
    pub(crate) fn query(&mut self, sql: &str) -> QueryOutcome {
        let mut msg = vec![b'Q'];
        msg.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        msg.extend_from_slice(sql.as_bytes());
        msg.push(0);
        self.stream.write_all(&msg).expect("write Query");
        let mut out = QueryOutcome::default();
        loop {
            let (tag, body) = self
                .read_msg()
                .unwrap_or_else(|e| panic!("raw client: reading the reply to {sql:?}: {e}"));
            match tag {
                b'D' => out.rows.push(parse_data_row(&body)),
                b'E' => out.error = Some(parse_error_fields(&body)),
                b'Z' => {
                    out.status = body[0];
                    return out;
                }
                _ => {}
            }
        }
    }

    /// Sends Terminate and closes.
    pub(crate) fn terminate(mut self) {
        let _ = self.stream.write_all(&[b'X', 0, 0, 0, 4]);
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Closes the socket without a Terminate message: the client vanishes.
    pub(crate) fn vanish(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        drop(self.stream);
    }
}

fn parse_data_row(body: &[u8]) -> Vec<Option<String>> {
    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
        at += 4;
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            row.push(Some(
                String::from_utf8_lossy(&body[at..at + len]).into_owned(),
            ));
            at += len;
        }
    }
    row
}

/// Reads from `stream` until the peer closes it (EOF or reset), returning
/// what was read; Err when it is still open after `timeout`.
pub(crate) fn read_until_closed(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the connection is still open after {timeout:?} (read {} bytes: {:?})",
                got.len(),
                String::from_utf8_lossy(&got)
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .expect("set_read_timeout");
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                return Ok(got)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read error: {e}")),
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
/// Sends `sig` ("TERM", "STOP", …) to process `pid` with kill(1); false
/// when it fails (for Drop guards, which must not panic).
pub(crate) fn try_signal(pid: u32, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends `sig` to process `pid`; panics when kill fails.
#[track_caller]
pub(crate) fn signal(pid: u32, sig: &str) {
    assert!(try_signal(pid, sig), "kill -{sig} {pid}");
}

/// Checks a pgbench run that must have gone through without an error;
/// returns its stdout.
#[track_caller]
pub(crate) fn assert_pgbench_clean(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}\n{err}");
    assert!(
        text.contains("number of failed transactions: 0"),
        "{text}\n{err}"
    );
    text
}

/// A protocol 3.0 StartupMessage with these parameters.
pub(crate) fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec(); // 3.0
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

pub(crate) fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Whether the pooler on `port` refuses a new trust client `user`/`db`:
/// Ok(how) when the TCP connect is refused or the login ends in an
/// ErrorResponse / close; Err(what happened) when the login is served or
/// left hanging for `timeout`.
pub(crate) fn login_refused(
    port: u16,
    user: &str,
    db: &str,
    timeout: Duration,
) -> Result<String, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Err(e) => return Ok(format!("connect failed: {e}")),
        Ok(s) => s,
    };
    let mut c = RawClient {
        stream: stream.try_clone().expect("try_clone"),
    };
    c.send_startup(&[("user", user), ("database", db)]);
    match read_until_closed(&mut stream, timeout) {
        Ok(bytes) if bytes.is_empty() => Ok("closed without a reply".into()),
        Ok(bytes) if bytes[0] == b'E' => {
            let msgs = split_messages(&bytes);
            Ok(format!(
                "refused: {:?}",
                msgs.first().map(|(_, body)| parse_error_fields(body))
            ))
        }
        Ok(bytes) => Err(format!(
            "the login was answered with {:?} before the close",
            String::from_utf8_lossy(&bytes)
        )),
        Err(e) => Err(format!("the login was served or hangs: {e}")),
    }
}

// ---------------------------------------------------------------------------
// Route keys of transaction pooling (pool_cancel, pool_rollback, ...) and
// the statement pool mode
// ---------------------------------------------------------------------------

impl Route {
    /// `pool = "statement"`.
    pub(crate) fn statement(mut self) -> Self {
        self.pool = "statement".into();
        self
    }
}

/// Extra keys for the `[database.<db>.user.<user>]` section of one route,
/// added to a [`Config`]'s TOML by [`start_pooler_ext`].
#[derive(Debug, Clone)]
pub(crate) struct RouteKeys {
    pub(crate) db: String,
    pub(crate) user: String,
    pub(crate) lines: Vec<String>,
}

impl RouteKeys {
    pub(crate) fn new(db: &str, user: &str) -> Self {
        Self {
            db: db.into(),
            user: user.into(),
            lines: Vec::new(),
        }
    }

    /// Any `key = <toml value>` line.
    pub(crate) fn raw(mut self, key: &str, toml_value: &str) -> Self {
        self.lines.push(format!("{key} = {toml_value}"));
        self
    }

    pub(crate) fn pool_cancel(self, on: bool) -> Self {
        self.raw("pool_cancel", &on.to_string())
    }

    pub(crate) fn pool_rollback(self, on: bool) -> Self {
        self.raw("pool_rollback", &on.to_string())
    }

    pub(crate) fn pool_discard(self, on: bool) -> Self {
        self.raw("pool_discard", &on.to_string())
    }

    pub(crate) fn pool_reset_timeout_ms(self, ms: u64) -> Self {
        self.raw("pool_reset_timeout", &ms.to_string())
    }

    pub(crate) fn prepared_statements(self, on: bool) -> Self {
        self.raw("prepared_statements", &on.to_string())
    }

    pub(crate) fn prepared_statements_max(self, n: usize) -> Self {
        self.raw("prepared_statements_max", &n.to_string())
    }
}

/// The config's TOML with the extra route keys inserted right after their
/// section headers. Panics when a section is missing.
pub(crate) fn toml_with_keys(config: &Config, extra: &[RouteKeys]) -> String {
    let mut text = config.toml();
    for keys in extra {
        let header = format!("[database.{}.user.{}]\n", key(&keys.db), key(&keys.user));
        let at = text
            .find(&header)
            .unwrap_or_else(|| panic!("no section {header:?} in the config:\n{text}"))
            + header.len();
        let mut insert = String::new();
        for line in &keys.lines {
            insert.push_str(line);
            insert.push('\n');
        }
        text.insert_str(at, &insert);
    }
    text
}

/// [`start_pooler`] with extra route keys.
pub(crate) fn start_pooler_ext(config: &Config, extra: &[RouteKeys]) -> (Handle, u16) {
    start_pooler_from(ConfigSource::Toml(toml_with_keys(config, extra)))
}

// ---------------------------------------------------------------------------
// More raw-protocol helpers
// ---------------------------------------------------------------------------

impl RawClient {
    /// Writes raw bytes (one or more whole messages).
    pub(crate) fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("raw client: write");
    }

    /// Sends a simple Query without reading the reply.
    pub(crate) fn send_query(&mut self, sql: &str) {
        let mut buf = bytes::BytesMut::new();
        odissey_protocol::frontend::query(&mut buf, sql);
        self.send(&buf);
    }

    /// Reads messages up to and including the one tagged `tag`.
    pub(crate) fn read_until_tag(&mut self, tag: u8) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let m = self.read_msg().unwrap_or_else(|e| {
                panic!(
                    "raw client: waiting for {:?}, got {:?} then: {e}",
                    tag as char,
                    tags(&out)
                )
            });
            let done = m.0 == tag;
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Reads messages up to and including `count` ReadyForQuery.
    pub(crate) fn read_ready(&mut self, count: usize) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        for _ in 0..count {
            out.extend(self.read_until_tag(b'Z'));
        }
        out
    }

    /// `select pg_backend_pid()` on the raw client.
    pub(crate) fn backend_pid(&mut self) -> i32 {
        let o = self.query("select pg_backend_pid()");
        assert!(o.error.is_none(), "select pg_backend_pid(): {:?}", o.error);
        o.rows[0][0]
            .as_deref()
            .expect("pid is not null")
            .parse()
            .expect("pid is an integer")
    }
}

/// The tags of messages, as a string ("12EZ").
pub(crate) fn tags(msgs: &[(u8, Vec<u8>)]) -> String {
    msgs.iter().map(|(t, _)| *t as char).collect()
}

/// Sends a CancelRequest for (pid, key) on a fresh connection to `port`
/// and waits (up to 5 s) for the pooler to close it.
/// Logs in a raw client as `user` on `db` and returns it with the
/// BackendKeyData it was given.
pub(crate) fn login_with_key(port: u16, user: &str, db: &str) -> (RawClient, u32, u32) {
    let mut c = RawClient::tcp(port);
    c.send_startup(&[("user", user), ("database", db)]);
    let mut key = None;
    loop {
        let (tag, body) = c.read_msg().expect("login reply");
        match tag {
            b'K' if body.len() >= 8 => {
                let word =
                    |i: usize| u32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
                key = Some((word(0), word(4)));
            }
            b'Z' => break,
            b'E' => panic!("login refused: {:?}", parse_error_fields(&body)),
            _ => {}
        }
    }
    let (pid, secret) = key.expect("a BackendKeyData at login");
    (c, pid, secret)
}

/// Sends CancelRequests for (pid, key) on new connections to `port`, as
/// fast as they go, until `stop`; returns how many were sent.
pub(crate) fn flood_cancels(port: u16, pid: u32, key: u32, stop: &AtomicBool) -> usize {
    let mut packet = bytes::BytesMut::new();
    odissey_protocol::frontend::cancel_request(&mut packet, pid, key);
    let mut sent = 0;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            if s.write_all(&packet).is_ok() {
                sent += 1;
            }
        }
    }
    sent
}

pub(crate) fn send_cancel_request(port: u16, pid: u32, key: u32) {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"));
    let mut buf = bytes::BytesMut::new();
    odissey_protocol::frontend::cancel_request(&mut buf, pid, key);
    assert_eq!(&buf[..8], &[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e]);
    stream.write_all(&buf).expect("write CancelRequest");
    let got = read_until_closed(&mut stream, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the CancelRequest connection: {e}"));
    assert!(
        got.is_empty(),
        "a CancelRequest gets no reply, got {:?}",
        String::from_utf8_lossy(&got)
    );
}

// ---------------------------------------------------------------------------
// PostgreSQL's command-line tools (pgbench, psql)
// ---------------------------------------------------------------------------

/// A libpq tool with a clean environment. SSL and GSS negotiation are
/// switched off so that these tests are about pooling only (SSLRequest is
/// covered by tests/robustness.rs).
pub(crate) fn pg_tool(name: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(odissey_harness::pg_bin(name));
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGOPTIONS",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGSSLMODE",
        "PGAPPNAME",
        "PSQLRC",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PGSSLMODE", "disable")
        .env("PGGSSENCMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

/// Runs `cmd`, killing it after `limit`.
/// pgbench's tables (scale 1) in database `test` of `pg`, usable by
/// trust_user.
pub(crate) fn pgbench_init(pg: &PgCluster) {
    let mut init = pg_tool("pgbench");
    let port = pg.port().to_string();
    init.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
        .args(["-i", "-s", "1", "test"]);
    let out = run_tool(init, Duration::from_secs(60));
    assert!(out.status.success(), "pgbench -i: {out:?}");
    pg.sql(
        "test",
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO trust_user",
    );
}

pub(crate) fn run_tool(mut cmd: std::process::Command, limit: Duration) -> std::process::Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "{shown} still running after {limit:?}; killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    std::process::Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}
