//! Running pgbench and reading its results (summary + per-transaction logs).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::procs::{run_with_timeout, tail_str};

pub(crate) const USER: &str = odissey_harness::TRUST_USER;
pub(crate) const DB: &str = "test";

/// A pgbench command for 127.0.0.1:`port` as trust_user on db test, with a
/// clean libpq environment.
pub(crate) fn command(port: u16) -> Command {
    let mut cmd = Command::new(odissey_harness::pg_bin("pgbench"));
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
        "PGAPPNAME",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("PGSSLMODE", "disable")
        .env("PGGSSENCMODE", "disable")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", USER]);
    cmd
}

/// `pgbench -i -s scale` on db test.
pub(crate) fn init(port: u16, scale: u32) -> Result<(), String> {
    let mut cmd = command(port);
    cmd.args(["-i", "-q", "-s", &scale.to_string(), DB]);
    let out = run_with_timeout(
        cmd,
        Duration::from_secs(600 + 60 * u64::from(scale)),
        "pgbench -i",
    )?;
    if !out.status.success() {
        return Err(format!(
            "pgbench -i -s {scale} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// One pgbench run.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    /// `-M`: simple, extended or prepared.
    pub(crate) mode: &'static str,
    /// `-S` (built-in select-only) instead of TPC-B.
    pub(crate) select_only: bool,
    /// `-C`: a new connection per transaction.
    pub(crate) reconnect: bool,
    pub(crate) clients: usize,
    pub(crate) jobs: usize,
    pub(crate) duration: u64,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub(crate) struct Measured {
    pub(crate) tps: f64,
    pub(crate) lat_avg_ms: f64,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) transactions: u64,
}

/// Runs `spec` against 127.0.0.1:`port`, with per-transaction logs in a
/// fresh directory under `logs`.
pub(crate) fn run(port: u16, spec: &Spec, logs: &Path) -> Result<Measured, String> {
    let dir = tempfile::Builder::new()
        .prefix("pgbench-")
        .tempdir_in(logs)
        .map_err(|e| format!("cannot create a log dir in {}: {e}", logs.display()))?;
    let prefix: PathBuf = dir.path().join("tx");
    let mut cmd = command(port);
    cmd.args([
        "-n",
        "-c",
        &spec.clients.to_string(),
        "-j",
        &spec.jobs.to_string(),
        "-T",
        &spec.duration.to_string(),
        "-M",
        spec.mode,
    ]);
    if spec.select_only {
        cmd.arg("-S");
    }
    if spec.reconnect {
        cmd.arg("-C");
    }
    cmd.arg("--log")
        .arg(format!("--log-prefix={}", prefix.display()));
    cmd.arg(DB);
    let shown = format!("{cmd:?}");
    // Generous: connection set-up of many clients, plus a hung pooler must
    // not hang the whole benchmark.
    let limit = Duration::from_secs(spec.duration + 60 + spec.clients as u64 / 10);
    let out = run_with_timeout(cmd, limit, "pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = || {
        format!(
            "--- command ---\n{shown}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
            tail_str(&stdout, 12),
            tail_str(&stderr, 20)
        )
    };
    if !out.status.success() {
        return Err(format!("pgbench failed ({})\n{}", out.status, report()));
    }
    let value = |prefix: &str| -> Option<String> {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.trim().to_owned())
    };
    let transactions: u64 = value("number of transactions actually processed:")
        .and_then(|v| v.split(['/', ' ']).next()?.parse().ok())
        .ok_or_else(|| format!("no transaction count in pgbench's output\n{}", report()))?;
    if transactions == 0 {
        return Err(format!("pgbench processed no transaction\n{}", report()));
    }
    if let Some(failed) = value("number of failed transactions:")
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    {
        if failed > 0 {
            return Err(format!("{failed} transactions failed\n{}", report()));
        }
    }
    let lat_avg_ms: f64 = value("latency average =")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no latency average in pgbench's output\n{}", report()))?;
    // PostgreSQL 14+ prints one tps line: "(without initial connection
    // time)", or with -C "(including reconnection times)". Older versions
    // print both "including" and "excluding connections establishing".
    let tps_lines: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tps ="))
        .collect();
    let wanted = if spec.reconnect {
        ["including", "including"]
    } else {
        ["without", "excluding"]
    };
    let tps: f64 = tps_lines
        .iter()
        .find(|l| wanted.iter().any(|w| l.contains(w)))
        .or(tps_lines.first())
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no tps in pgbench's output\n{}", report()))?;
    let p99_ms = p99_from_logs(dir.path())?;
    Ok(Measured {
        tps,
        lat_avg_ms,
        p99_ms,
        transactions,
    })
}

/// p99 of the latency column (third, µs) of every per-transaction log in
/// `dir`, in ms; `None` when the logs hold no transaction.
fn p99_from_logs(dir: &Path) -> Result<Option<f64>, String> {
    let mut lat: Vec<u64> = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let text = fs::read_to_string(entry.path())
            .map_err(|e| format!("reading {}: {e}", entry.path().display()))?;
        lat.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    if lat.is_empty() {
        return Ok(None);
    }
    let idx = ((lat.len() as f64 * 0.99).ceil() as usize).clamp(1, lat.len()) - 1;
    let (_, p99, _) = lat.select_nth_unstable(idx);
    Ok(Some(*p99 as f64 / 1000.0))
}
