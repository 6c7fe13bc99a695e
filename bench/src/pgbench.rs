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
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) transactions: u64,
    /// When each logged transaction ended (Unix time, s), sorted.
    pub(crate) ends: Vec<f64>,
}

impl Measured {
    /// Logged transactions that ended within `[from, to]` (Unix time, s).
    pub(crate) fn ended_between(&self, from: f64, to: f64) -> u64 {
        let a = self.ends.partition_point(|&t| t < from);
        let b = self.ends.partition_point(|&t| t <= to);
        b.saturating_sub(a) as u64
    }
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
    let logs = read_logs(dir.path())?;
    Ok(Measured {
        tps,
        lat_avg_ms,
        p50_ms: logs.percentile_ms(0.50),
        p99_ms: logs.percentile_ms(0.99),
        transactions,
        ends: logs.ends,
    })
}

/// What the per-transaction logs hold.
struct Logs {
    /// Latency of each transaction, µs.
    lat_us: Vec<u64>,
    /// When each ended (Unix time, s), sorted.
    ends: Vec<f64>,
}

impl Logs {
    /// The `q` quantile (nearest rank) of the latencies, in ms; `None` when
    /// the logs hold no transaction.
    fn percentile_ms(&self, q: f64) -> Option<f64> {
        let n = self.lat_us.len();
        if n == 0 {
            return None;
        }
        let idx = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
        let mut lat = self.lat_us.clone();
        let (_, v, _) = lat.select_nth_unstable(idx);
        Some(*v as f64 / 1000.0)
    }
}

/// Every per-transaction log in `dir`. A line is `client_id transaction_no
/// time script_no time_epoch time_us [...]`: the latency (µs) is the third
/// field, the end of the transaction the fifth (s) and sixth (µs).
fn read_logs(dir: &Path) -> Result<Logs, String> {
    let mut logs = Logs {
        lat_us: Vec::new(),
        ends: Vec::new(),
    };
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let text = fs::read_to_string(entry.path())
            .map_err(|e| format!("reading {}: {e}", entry.path().display()))?;
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let Some(lat) = f.get(2).and_then(|v| v.parse::<u64>().ok()) else {
                continue;
            };
            logs.lat_us.push(lat);
            let end = f
                .get(4)
                .and_then(|v| v.parse::<u64>().ok())
                .zip(f.get(5).and_then(|v| v.parse::<u64>().ok()));
            if let Some((s, us)) = end {
                logs.ends.push(s as f64 + us as f64 / 1e6);
            }
        }
    }
    logs.ends.sort_by(f64::total_cmp);
    Ok(logs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_give_percentiles_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("tx.1"),
            "0 0 100 0 1700000000 500000\n0 1 300 0 1700000001 0\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("tx.2"),
            "1 0 200 0 1700000000 900000\n1 1 failed 0 1700000001 100\n",
        )
        .unwrap();
        let logs = read_logs(dir.path()).unwrap();
        assert_eq!(logs.percentile_ms(0.5), Some(0.2));
        assert_eq!(logs.percentile_ms(0.99), Some(0.3));
        let m = Measured {
            tps: 0.0,
            lat_avg_ms: 0.0,
            p50_ms: None,
            p99_ms: None,
            transactions: 3,
            ends: logs.ends,
        };
        assert_eq!(m.ended_between(1_700_000_000.6, 1_700_000_001.0), 2);
        assert_eq!(m.ended_between(1_699_999_999.0, 1_700_000_000.5), 1);
    }
}
