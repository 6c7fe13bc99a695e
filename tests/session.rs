//! Session fidelity (issue 12): in transaction pooling no client ever sees
//! another's session, whatever way its driver sets it; in session pooling
//! the driver talks to its own backend.
//!
//! Each test starts a fresh PostgreSQL cluster (schemas `s_0` .. `s_7` in
//! database `test`, created directly) and odissey with 2 workers and a route
//! `test`/`trust_user` in transaction pooling with pool_size 2 for 8
//! clients (unless said otherwise), then runs a driver script from
//! `tests/drivers/` that exits non-zero with every wrong read (how many,
//! what was read, what was expected) on failure:
//!
//! - `session_psycopg.py CASE POOLER_PORT PG_PORT` (psycopg 3),
//! - `session_asyncpg.py CASE POOLER_PORT PG_PORT` (asyncpg),
//! - `Session.java PORT MODE AUTOCOMMIT` (pgjdbc, compiled here with javac
//!   against `/usr/share/java/postgresql.jar` into a temporary directory).
//!
//! The readers check that server connections were really shared between
//! clients during the reads, so that a pass means something. A missing
//! driver is a failure telling how to install it (`.ci/run` does).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const DB: &str = "test";
const USER: &str = "trust_user";
const CLIENTS: usize = 8;
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// A fresh cluster with schemas s_0 .. s_7 that every role may use.
fn cluster() -> PgCluster {
    let pg = PgCluster::start();
    let mut sql = String::new();
    for k in 0..CLIENTS {
        sql.push_str(&format!(
            "CREATE SCHEMA s_{k}; GRANT ALL ON SCHEMA s_{k} TO PUBLIC; "
        ));
    }
    pg.sql(DB, &sql);
    pg
}

/// odissey with 2 workers and `route`.
fn pooler(pg: &PgCluster, route: Route) -> (Handle, u16) {
    start_pooler(&Config::new(pg.port()).workers(2).route(route))
}

fn transaction_route(pool_size: usize) -> Route {
    Route::new(DB, USER).transaction().pool_size(pool_size)
}

fn drivers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

fn require_python_module(module: &str, install: &str) {
    let have = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have,
        "the Python module {module} is missing: install it with {install} (.ci/run does)"
    );
}

/// Runs a driver script (killed after 3 minutes); panics with its output
/// when it fails.
fn run_driver(mut cmd: Command, what: &str) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = run_tool(cmd, Duration::from_secs(180));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    eprintln!("{what}: {stdout}");
}

fn python(script: &str, case: &str, pooler_port: u16, pg: &PgCluster) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(drivers_dir().join(script))
        .arg(case)
        .arg(pooler_port.to_string())
        .arg(pg.port().to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONUNBUFFERED", "1")
        .env_remove("PGOPTIONS")
        .env_remove("PGCLIENTENCODING");
    cmd
}

fn psycopg(case: &str, pooler_port: u16, pg: &PgCluster) {
    require_python_module("psycopg", "`python3 -m pip install 'psycopg[binary]'`");
    run_driver(
        python("session_psycopg.py", case, pooler_port, pg),
        &format!("psycopg case {case}"),
    );
}

fn asyncpg(case: &str, pooler_port: u16, pg: &PgCluster) {
    require_python_module("asyncpg", "`python3 -m pip install asyncpg`");
    run_driver(
        python("session_asyncpg.py", case, pooler_port, pg),
        &format!("asyncpg case {case}"),
    );
}

/// Session.java compiled once per test process; the directory holding
/// Session.class.
fn jdbc_classes() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        assert!(
            Path::new(JDBC_JAR).is_file(),
            "{JDBC_JAR} is missing: install it with `apt-get install -y libpostgresql-jdbc-java` (.ci/run does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("odissey-session-java")
            .tempdir()
            .expect("temporary directory");
        let mut javac = Command::new("javac");
        javac
            .arg("-d")
            .arg(dir.path())
            .args(["-cp", JDBC_JAR])
            .arg(drivers_dir().join("Session.java"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = match javac.spawn() {
            Ok(child) => child.wait_with_output().expect("javac output"),
            Err(e) => panic!(
                "cannot run javac ({e}): install a JDK with `apt-get install -y default-jdk-headless` (.ci/run does)"
            ),
        };
        assert!(
            out.status.success(),
            "javac Session.java failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

fn jdbc(mode: &str, autocommit: bool) {
    let _guard = watchdog("jdbc", Duration::from_secs(240));
    let classes = jdbc_classes();
    let pg = cluster();
    let (_handle, port) = pooler(&pg, transaction_route(2));
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{}:{JDBC_JAR}", classes.display()))
        .arg("Session")
        .arg(port.to_string())
        .arg(mode)
        .arg(autocommit.to_string());
    run_driver(cmd, &format!("JDBC {mode} autoCommit={autocommit}"));
}

/// A transaction-pooling test: fresh cluster, pooler with pool_size 2, the
/// psycopg script's `case`.
fn psycopg_transaction_case(case: &str) {
    psycopg_transaction_case_with_pool_size(case, 2);
}

fn psycopg_transaction_case_with_pool_size(case: &str, pool_size: usize) {
    let _guard = watchdog("psycopg", Duration::from_secs(240));
    let pg = cluster();
    let (_handle, port) = pooler(&pg, transaction_route(pool_size));
    psycopg(case, port, &pg);
}

// ---------------------------------------------------------------------------
// 1. search_path set with SET, psycopg
// ---------------------------------------------------------------------------

/// psycopg's default: `SET search_path TO s_k` runs inside the transaction
/// psycopg opens, then `conn.commit()`; 8 clients read it back 40 times.
#[test]
fn psycopg_search_path_set_in_transaction_then_commit() {
    psycopg_transaction_case("search_path_transaction");
}

/// The same in autocommit mode.
#[test]
fn psycopg_search_path_set_in_autocommit() {
    psycopg_transaction_case("search_path_autocommit");
}

/// The same through the extended protocol: the SET and the reads as named
/// prepared statements (`prepare=True`) or unnamed ones (binary cursor).
#[test]
fn psycopg_search_path_set_through_extended_protocol() {
    psycopg_transaction_case("search_path_extended");
}

// ---------------------------------------------------------------------------
// 2. set_config
// ---------------------------------------------------------------------------

/// `SELECT set_config('search_path', 's_k', false)` (simple query) and
/// `SELECT set_config('app.tenant', %s, false)` (extended protocol), read
/// back with current_setting.
#[test]
fn psycopg_set_config_search_path_and_custom_variable() {
    psycopg_transaction_case("set_config");
}

// ---------------------------------------------------------------------------
// 3. SET SESSION CHARACTERISTICS
// ---------------------------------------------------------------------------

/// Half the clients make their session SERIALIZABLE, the others keep read
/// committed; each reads `SHOW transaction_isolation` in 40 transactions.
#[test]
fn psycopg_session_characteristics_isolation_level() {
    psycopg_transaction_case("isolation");
}

// ---------------------------------------------------------------------------
// 4. statement_timeout
// ---------------------------------------------------------------------------

/// statement_timeout '1500' of client 0 (set inside a transaction) and of
/// client 1 (autocommit) is never seen by the 6 others.
#[test]
fn psycopg_statement_timeout_stays_with_its_client() {
    psycopg_transaction_case("statement_timeout");
}

// ---------------------------------------------------------------------------
// 5. JDBC
// ---------------------------------------------------------------------------

#[test]
fn jdbc_statement_set_search_path_autocommit_off() {
    jdbc("set", false);
}

#[test]
fn jdbc_statement_set_search_path_autocommit_on() {
    jdbc("set", true);
}

#[test]
fn jdbc_set_schema_autocommit_off() {
    jdbc("setSchema", false);
}

#[test]
fn jdbc_set_schema_autocommit_on() {
    jdbc("setSchema", true);
}

#[test]
fn jdbc_set_transaction_isolation_serializable_autocommit_off() {
    jdbc("isolation", false);
}

#[test]
fn jdbc_set_transaction_isolation_serializable_autocommit_on() {
    jdbc("isolation", true);
}

// ---------------------------------------------------------------------------
// 6. A departed client leaves nothing
// ---------------------------------------------------------------------------

/// pool_size 1: a client sets search_path, statement_timeout and a custom
/// variable, LISTENs, creates a temp table, takes an advisory lock and
/// PREPAREs, then leaves; the next client, on the same server connection,
/// finds none of it.
#[test]
fn departed_client_leaves_nothing_behind() {
    psycopg_transaction_case_with_pool_size("departed", 1);
}

// ---------------------------------------------------------------------------
// 7. asyncpg server_settings
// ---------------------------------------------------------------------------

/// asyncpg `server_settings={'statement_timeout': '1500', 'jit': 'off'}`
/// (startup parameters) reach the server for the 4 clients that send them;
/// the 4 others read PostgreSQL's defaults.
#[test]
fn asyncpg_server_settings_reach_the_server() {
    let _guard = watchdog("asyncpg_server_settings", Duration::from_secs(240));
    let pg = cluster();
    let (_handle, port) = pooler(&pg, transaction_route(2));
    asyncpg("server_settings", port, &pg);
}

/// asyncpg's `timeout=` cancels (racing their replies) cancel only the
/// query of the client whose timeout fired, never another's.
#[test]
fn asyncpg_timeouts_cancel_only_their_own_query() {
    let _guard = watchdog("asyncpg_timeouts", Duration::from_secs(240));
    let pg = cluster();
    let (_handle, port) = pooler(&pg, transaction_route(2));
    asyncpg("timeouts", port, &pg);
}

// ---------------------------------------------------------------------------
// 8. Session pooling: the driver's pid, cancel
// ---------------------------------------------------------------------------

fn session_pooler(pg: &PgCluster) -> (Handle, u16) {
    pooler(pg, Route::new(DB, USER).session().pool_size(CLIENTS))
}

/// psycopg's `conn.info.backend_pid` (from BackendKeyData) equals
/// `SELECT pg_backend_pid()`.
#[test]
fn session_pooling_psycopg_backend_pid_is_the_servers() {
    let _guard = watchdog("session_psycopg_pid", Duration::from_secs(120));
    let pg = cluster();
    let (_handle, port) = session_pooler(&pg);
    psycopg("session_pid", port, &pg);
}

/// asyncpg's `conn.get_server_pid()` equals `SELECT pg_backend_pid()`.
#[test]
fn session_pooling_asyncpg_backend_pid_is_the_servers() {
    let _guard = watchdog("session_asyncpg_pid", Duration::from_secs(120));
    let pg = cluster();
    let (_handle, port) = session_pooler(&pg);
    asyncpg("session_pid", port, &pg);
}

/// psycopg `conn.cancel()` from another thread during `pg_sleep(10)`:
/// QueryCanceled within 2 s.
#[test]
fn session_pooling_psycopg_cancel_works() {
    let _guard = watchdog("session_psycopg_cancel", Duration::from_secs(120));
    let pg = cluster();
    let (_handle, port) = session_pooler(&pg);
    psycopg("session_cancel", port, &pg);
}

// ---------------------------------------------------------------------------
// 9. Logins while every server connection is held
// ---------------------------------------------------------------------------

/// A raw login: connect, StartupMessage, read to ReadyForQuery. Returns the
/// client and how long the greeting took.
fn timed_login(port: u16) -> Result<(RawClient, Duration), String> {
    let start = Instant::now();
    let mut c = RawClient::tcp(port);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    c.send_startup(&[("user", USER), ("database", DB)]);
    loop {
        let (tag, body) = c
            .read_msg()
            .map_err(|e| format!("reading the login reply: {e}"))?;
        match tag {
            b'E' => return Err(format!("refused: {:?}", parse_error_fields(&body))),
            b'Z' => return Ok((c, start.elapsed())),
            _ => {}
        }
    }
}

/// How many clients other than `except` (client ids) each worker hosts,
/// and the worker of each such client by its address.
fn workers_of_clients(
    handle: &Handle,
    except: &[String],
) -> (BTreeMap<usize, usize>, BTreeMap<String, usize>) {
    let inspection = handle.inspect().unwrap_or_else(|e| panic!("inspect: {e}"));
    let mut by_worker = BTreeMap::new();
    let mut by_addr = BTreeMap::new();
    for c in &inspection.client_list {
        if !except.contains(&c.id) {
            *by_worker.entry(c.worker).or_insert(0) += 1;
            by_addr.insert(c.addr.clone(), c.worker);
        }
    }
    (by_worker, by_addr)
}

/// A fresh pooler with 4 workers; both server connections of the pool
/// (pool_size 2) are held by clients inside open transactions; new clients
/// (8, and more until every worker hosts one, since a worker that never
/// had a server for the pool is the case that matters) must each be
/// greeted within 2 s; they run a query once the holders commit.
#[test]
fn logins_are_greeted_while_every_server_is_held() {
    const WORKERS: usize = 4;
    const MAX_CLIENTS: usize = 32;
    let _guard = watchdog("logins_while_held", Duration::from_secs(120));
    let pg = cluster();
    let (handle, port) = start_pooler(
        &Config::new(pg.port())
            .workers(WORKERS)
            .route(transaction_route(2)),
    );

    let mut holders: Vec<Client> = (0..2).map(|_| connect(port, DB, USER, None)).collect();
    let mut held = Vec::new();
    for h in &mut holders {
        h.simple_query("BEGIN; SELECT 1")
            .unwrap_or_else(|e| panic!("holder BEGIN: {}", describe(&e)));
        held.push(backend_pid(h));
    }
    assert_ne!(
        held[0], held[1],
        "setup: the two holders must hold both server connections of the pool"
    );
    let in_transaction = pg_scalar(
        &pg,
        DB,
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'trust_user' \
         AND state = 'idle in transaction'",
    );
    assert_eq!(
        in_transaction.as_deref(),
        Some("2"),
        "setup: PostgreSQL should show both server connections idle in transaction"
    );
    let inspection = handle.inspect().expect("inspect");
    let holder_ids: Vec<String> = inspection
        .client_list
        .iter()
        .map(|c| c.id.clone())
        .collect();
    let holder_workers: BTreeSet<usize> = inspection.client_list.iter().map(|c| c.worker).collect();
    let server_workers: BTreeSet<usize> = inspection.server_list.iter().map(|s| s.worker).collect();

    // New clients one by one (each accept a wake-up of its own, so they
    // spread over the workers), until every worker hosts one.
    let limit = Duration::from_secs(2);
    let (tx, rx) = mpsc::channel();
    let mut spawned = 0;
    let mut by_worker = BTreeMap::new();
    while spawned < CLIENTS || (by_worker.len() < WORKERS && spawned < MAX_CLIENTS) {
        let tx = tx.clone();
        let k = spawned;
        thread::spawn(move || {
            let _ = tx.send((k, timed_login(port)));
        });
        spawned += 1;
        thread::sleep(Duration::from_millis(30));
        by_worker = workers_of_clients(&handle, &holder_ids).0;
    }
    drop(tx);
    thread::sleep(limit);
    let (by_worker, by_addr) = workers_of_clients(&handle, &holder_ids);
    for h in &mut holders {
        h.simple_query("COMMIT")
            .unwrap_or_else(|e| panic!("holder COMMIT: {}", describe(&e)));
    }
    let mut done = Vec::new();
    while done.len() < spawned {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(r) => done.push(r),
            Err(_) => break,
        }
    }
    let mut failures = Vec::new();
    if done.len() < spawned {
        failures.push(format!(
            "{} of {spawned} clients were never greeted, even 30 s after the holders committed",
            spawned - done.len()
        ));
    }
    done.sort_by_key(|(k, _)| *k);
    let mut late = Vec::new();
    for (k, result) in done {
        match result {
            Err(e) => failures.push(format!("client {k}: login failed: {e}")),
            Ok((mut c, took)) => {
                if took > limit {
                    let addr = c.stream.local_addr().map(|a| a.to_string());
                    let worker = addr
                        .ok()
                        .and_then(|a| by_addr.get(&a).copied())
                        .map_or_else(|| "?".to_string(), |w| w.to_string());
                    late.push(format!("client {k} (worker {worker}) after {took:.2?}"));
                }
                let o = c.query("SELECT 1");
                if o.error.is_some() || o.rows != vec![vec![Some("1".to_string())]] {
                    failures.push(format!("client {k}: SELECT 1 gave {o:?}"));
                }
                c.terminate();
            }
        }
    }
    if !late.is_empty() {
        failures.insert(
            0,
            format!(
                "{} of {spawned} logins were not greeted within {limit:?} while every server \
                 connection was held (the holders committed {limit:?} after the last login \
                 began; greeted: {})",
                late.len(),
                late.join(", ")
            ),
        );
    }
    if by_worker.len() < WORKERS {
        failures.push(format!(
            "setup: after {spawned} logins not every worker hosts a new client \
             ({by_worker:?}): the test could not reach a worker without a server"
        ));
    }
    assert!(
        failures.is_empty(),
        "{}\n(new clients per worker: {by_worker:?}; holders on workers {holder_workers:?}; \
         server connections on workers {server_workers:?})",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 10. ParameterStatus at login; a startup parameter PostgreSQL refuses
// ---------------------------------------------------------------------------

/// `client_encoding=utf-8` (4 clients) and `euc_jp` (4 clients): the
/// ParameterStatus psycopg gets at login is what PostgreSQL reports (UTF8 /
/// EUC_JP, checked on a direct connection), and so is every
/// `SHOW client_encoding`.
#[test]
fn psycopg_parameter_status_client_encoding() {
    psycopg_transaction_case("encoding");
}

/// psycopg `options='-c statement_timeout=abc'`: the login fails with
/// PostgreSQL's own FATAL message (compared with a direct connection).
#[test]
fn refused_startup_option_fails_the_login_psycopg() {
    psycopg_transaction_case("bad_option");
}

/// asyncpg `server_settings={'statement_timeout': 'abc'}`: the login fails
/// with PostgreSQL's own SQLSTATE and message (compared with a direct
/// connection).
#[test]
fn refused_startup_parameter_fails_the_login_asyncpg() {
    let _guard = watchdog("asyncpg_bad_setting", Duration::from_secs(120));
    let pg = cluster();
    let (_handle, port) = pooler(&pg, transaction_route(2));
    asyncpg("bad_setting", port, &pg);
}
