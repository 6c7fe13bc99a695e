//! The targets: direct PostgreSQL, and odissey and PgBouncer started on
//! free ports with configs of their own.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::pgbench::{DB, USER};
use crate::procs::{self, ChildGuard};
use crate::wire;
use crate::Kind;

/// A target: direct PostgreSQL or a pooler process.
pub(crate) struct Target {
    pub(crate) kind: Kind,
    pub(crate) port: u16,
    pub(crate) process: Option<ChildGuard>,
    /// odissey's metrics endpoint (127.0.0.1), where the config enabled it.
    pub(crate) metrics: Option<u16>,
}

impl Target {
    /// The pooler's pid, after checking that it still runs.
    pub(crate) fn pid(&mut self) -> Result<Option<u32>, String> {
        match &mut self.process {
            Some(p) => {
                p.check_alive()?;
                Ok(Some(p.pid()))
            }
            None => Ok(None),
        }
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot pick a free port: {e}"))
}

pub(crate) fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `(major, minor)` from "PgBouncer 1.18.0".
pub(crate) fn pgbouncer_version(line: &str) -> Option<(u32, u32)> {
    let v = line.split_whitespace().nth(1)?;
    let mut it = v.split('.');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

const LOGIN_WAIT: Duration = Duration::from_secs(30);

fn startup_error(name: &str, bin: &Path, e: &str, guard: &ChildGuard) -> String {
    if e.contains(" exited (") {
        // check_alive's message already holds the log tail.
        format!("{name} ({}) did not start: {e}", bin.display())
    } else {
        format!(
            "{name} ({}) did not accept logins: {e}\n--- its log (tail) ---\n{}",
            bin.display(),
            guard.log_tail(30)
        )
    }
}

/// How an odissey is configured.
pub(crate) struct OdisseySetup<'a> {
    /// `workers`.
    pub(crate) workers: usize,
    /// The route's `pool_size`.
    pub(crate) pool_size: usize,
    /// TOML lines added to its one route.
    pub(crate) route_extra: &'a str,
    /// Whether to serve `[metrics]` on a free port of 127.0.0.1.
    pub(crate) metrics: bool,
}

/// Starts odissey as `name` (its config `<name>.toml` and log `<name>.log`
/// in `dir`).
pub(crate) fn start_odissey(
    bin: &Path,
    dir: &Path,
    pg_port: u16,
    name: &str,
    setup: &OdisseySetup,
) -> Result<Target, String> {
    let port = free_port()?;
    let mut config = format!(
        "# Written by odissey-bench.\n\
         workers = {workers}\n\n\
         [[listen]]\nhost = \"127.0.0.1\"\nport = {port}\n\n\
         [storage.pg]\ntype = \"remote\"\nhost = \"127.0.0.1\"\nport = {pg_port}\n\n\
         [database.{DB}.user.{USER}]\n\
         authentication = \"none\"\nstorage = \"pg\"\npool = \"transaction\"\n\
         pool_size = {pool}\npool_timeout = 120000\n{route_extra}",
        workers = setup.workers,
        pool = setup.pool_size,
        route_extra = setup.route_extra,
    );
    let metrics = if setup.metrics {
        let m = free_port()?;
        config.push_str(&format!("\n[metrics]\nlisten = \"127.0.0.1:{m}\"\n"));
        Some(m)
    } else {
        None
    };
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, config).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg(&path);
    let mut guard = ChildGuard::spawn(name, cmd, &dir.join(format!("{name}.log")))?;
    wire::wait_for_login(port, USER, DB, LOGIN_WAIT, || guard.check_alive())
        .map_err(|e| startup_error(name, bin, &e, &guard))?;
    Ok(Target {
        kind: Kind::Odissey,
        port,
        process: Some(guard),
        metrics,
    })
}

/// Starts PgBouncer (its files in `dir`) with `default_pool_size` =
/// `pool_size`.
pub(crate) fn start_pgbouncer(
    bin: &Path,
    dir: &Path,
    pg_port: u16,
    pool_size: usize,
    prepared: bool,
    max_client_conn: usize,
) -> Result<Target, String> {
    let port = free_port()?;
    let userlist = dir.join("userlist.txt");
    fs::write(&userlist, format!("\"{USER}\" \"\"\n"))
        .map_err(|e| format!("cannot write {}: {e}", userlist.display()))?;
    let mut ini = format!(
        ";; Written by odissey-bench.\n\
         [databases]\n\
         {DB} = host=127.0.0.1 port={pg_port} dbname={DB}\n\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = trust\n\
         auth_file = {userlist}\n\
         pool_mode = transaction\n\
         default_pool_size = {pool}\n\
         max_client_conn = {max_client_conn}\n\
         server_reset_query =\n\
         ignore_startup_parameters = extra_float_digits,options\n",
        userlist = userlist.display(),
        pool = pool_size,
    );
    if prepared {
        ini.push_str("max_prepared_statements = 256\n");
    }
    let path = dir.join("pgbouncer.ini");
    fs::write(&path, ini).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg(&path).current_dir("/");
    if procs::running_as_root() {
        // PgBouncer refuses to run as root; run it as `postgres` (like
        // `runuser -u postgres --`, but without a wrapper process, so that
        // the pid is PgBouncer's own for /proc).
        let (uid, gid) = procs::os_user_ids("postgres")
            .ok_or("running as root, and there is no `postgres` OS user to run PgBouncer as")?;
        cmd.uid(uid).gid(gid);
    }
    let mut guard = ChildGuard::spawn("PgBouncer", cmd, &dir.join("pgbouncer.log"))?;
    wire::wait_for_login(port, USER, DB, LOGIN_WAIT, || guard.check_alive())
        .map_err(|e| startup_error("PgBouncer", bin, &e, &guard))?;
    Ok(Target {
        kind: Kind::PgBouncer,
        port,
        process: Some(guard),
        metrics: None,
    })
}
