//! Medians, the markdown table, the CSV, the flood section and the machine
//! description.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::flood::{self, Phase};
use crate::saturation::{self, Group, SatTarget};
use crate::{Kind, Row, Workload, KINDS};

/// What one run measured; `None` where a metric does not apply.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) tps: Option<f64>,
    pub(crate) lat_ms: Option<f64>,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) cpu_us_tx: Option<f64>,
    /// System calls of the pooler per transaction (perf, a window inside
    /// the run).
    pub(crate) syscalls_tx: Option<f64>,
    /// The system thread's share of the process's CPU over the run, %.
    pub(crate) system_cpu_pct: Option<f64>,
    /// Cross-thread messages per transaction, all threads (metrics).
    pub(crate) messages_tx: Option<f64>,
    /// Wake-ups per transaction, all threads (metrics).
    pub(crate) wakeups_tx: Option<f64>,
    /// Messages to the system thread per transaction (metrics).
    pub(crate) system_messages_tx: Option<f64>,
    pub(crate) rss_mb: Option<f64>,
    /// idle: RSS growth per idle client, bytes.
    pub(crate) idle_bytes: Option<f64>,
    /// idle: RSS growth per connection that sent nothing yet (no startup
    /// packet), opened beside the idle clients, bytes.
    pub(crate) silent_bytes: Option<f64>,
    /// large result: peak RSS minus RSS before, MB.
    pub(crate) peak_mb: Option<f64>,
}

/// All rounds of one workload row against one target.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cell {
    /// Why the cell was not run (n/a, absent, unsupported).
    pub(crate) skipped: Option<String>,
    pub(crate) samples: Vec<Sample>,
    pub(crate) errors: Vec<String>,
    /// Syscalls per transaction from the extra run under perf, where one
    /// ran (else the samples' own, when they were counted inline).
    pub(crate) syscalls_tx: Option<f64>,
}

impl Cell {
    pub(crate) fn failed(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Median of each metric over the successful rounds.
    pub(crate) fn median(&self) -> Sample {
        let m = |f: fn(&Sample) -> Option<f64>| median(self.samples.iter().filter_map(f).collect());
        Sample {
            tps: m(|s| s.tps),
            lat_ms: m(|s| s.lat_ms),
            p50_ms: m(|s| s.p50_ms),
            p99_ms: m(|s| s.p99_ms),
            cpu_us_tx: m(|s| s.cpu_us_tx),
            syscalls_tx: self.syscalls_tx.or_else(|| m(|s| s.syscalls_tx)),
            system_cpu_pct: m(|s| s.system_cpu_pct),
            messages_tx: m(|s| s.messages_tx),
            wakeups_tx: m(|s| s.wakeups_tx),
            system_messages_tx: m(|s| s.system_messages_tx),
            rss_mb: m(|s| s.rss_mb),
            // Memory: the largest round. After the first round the
            // allocator keeps what the idle clients used, so later rounds
            // measure (almost) nothing new; the first one is the truth.
            idle_bytes: max(self.samples.iter().filter_map(|s| s.idle_bytes).collect()),
            silent_bytes: max(self.samples.iter().filter_map(|s| s.silent_bytes).collect()),
            peak_mb: max(self.samples.iter().filter_map(|s| s.peak_mb).collect()),
        }
    }
}

fn max(v: Vec<f64>) -> Option<f64> {
    v.into_iter().max_by(f64::total_cmp)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn num(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "–".to_owned(), |v| format!("{v:.decimals$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// The cells of one target in the main table.
fn target_cells(kind: Kind, cell: &Cell, notes: &mut Vec<String>) -> Vec<String> {
    let width = if kind == Kind::Direct { 3 } else { 6 };
    if cell.failed() && cell.samples.is_empty() {
        return vec!["FAIL".to_owned(); width];
    }
    if let Some(why) = &cell.skipped {
        let mark = match notes.iter().position(|n| n == why) {
            Some(i) => i + 1,
            None => {
                notes.push(why.clone());
                notes.len()
            }
        };
        let mut v = vec![format!("n/a[{mark}]")];
        v.resize(width, "–".to_owned());
        return v;
    }
    let m = cell.median();
    let partial = if cell.failed() { "!" } else { "" };
    let mut v = vec![
        format!("{}{partial}", num(m.tps, 0)),
        num(m.lat_ms, 2),
        num(m.p99_ms, 2),
    ];
    if kind != Kind::Direct {
        v.push(num(m.cpu_us_tx, 1));
        v.push(num(m.syscalls_tx, 2));
        v.push(match m.peak_mb {
            Some(p) => format!("+{p:.1} peak"),
            None => num(m.rss_mb, 1),
        });
    }
    v
}

/// Everything the report needs besides the results.
pub(crate) struct Header {
    pub(crate) title: String,
    pub(crate) lines: Vec<String>,
}

/// The markdown report (its header only when no row ran, e.g. `--only flood`).
pub(crate) fn markdown(header: &Header, rows: &[(Row, [Cell; 3])], idle_k: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}\n", header.title);
    for l in &header.lines {
        let _ = writeln!(out, "- {l}");
    }
    if rows.is_empty() {
        return out;
    }
    out.push('\n');
    let mut head = vec!["workload".to_owned(), "clients".to_owned()];
    for kind in KINDS {
        let l = kind.label();
        head.extend([
            format!("{l} tps"),
            format!("{l} lat ms"),
            format!("{l} p99 ms"),
        ]);
        if kind != Kind::Direct {
            head.extend([
                format!("{l} CPU µs/tx"),
                format!("{l} syscalls/tx"),
                format!("{l} RSS MB"),
            ]);
        }
    }
    head.extend(["tps o/B".to_owned(), "CPU o/B".to_owned()]);
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let aligns: Vec<&str> = head
        .iter()
        .enumerate()
        .map(|(i, _)| if i == 0 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "|{}|", aligns.join("|"));
    let mut notes = Vec::new();
    for (row, cells) in rows {
        let mut v = vec![row.label(), row.clients_label()];
        for (kind, cell) in KINDS.iter().zip(cells) {
            v.extend(target_cells(*kind, cell, &mut notes));
        }
        let (o, b) = (cells[1].median(), cells[2].median());
        let ok = |c: &Cell| c.skipped.is_none() && !c.samples.is_empty();
        let both = ok(&cells[1]) && ok(&cells[2]);
        v.push(num(ratio(o.tps, b.tps).filter(|_| both), 2));
        v.push(num(ratio(o.cpu_us_tx, b.cpu_us_tx).filter(|_| both), 2));
        let _ = writeln!(out, "| {} |", v.join(" | "));
    }
    out.push('\n');
    for (i, n) in notes.iter().enumerate() {
        let _ = writeln!(out, "[{}] {n}  ", i + 1);
    }
    let has = |w: Workload| rows.iter().any(|(r, _)| r.workload == w);
    let _ = write!(
        out,
        "Medians over the successful rounds (memory growth: the largest round, since \
         the allocator keeps memory between rounds); `!` = some rounds failed (see below). \
         CPU µs/tx = pooler CPU (user+system, all threads) over the run / transactions. \
         syscalls/tx = the pooler's system calls (`perf stat -e raw_syscalls:sys_enter`) \
         from 0.5 s after pgbench starts to 0.5 s before it ends / the transactions that \
         ended in that window, in one more run after the rounds unless the header says \
         inline (– where perf could not count). \
         RSS MB = pooler RSS after the run"
    );
    if has(Workload::Large) {
        let _ = write!(
            out,
            "; for `large result` it is the peak RSS growth during the slow read"
        );
    }
    if has(Workload::Idle) {
        let _ = write!(
            out,
            "; for `idle + -S`, the RSS with the {idle_k} idle clients held open while pgbench -S runs"
        );
    }
    let _ = writeln!(out, ". o/B = odissey / PgBouncer.");

    // Memory summary.
    let find = |w: Workload| rows.iter().find(|(r, _)| r.workload == w);
    let mut mem = Vec::new();
    if let Some((_, cells)) = find(Workload::Idle) {
        let (o, b) = (cells[1].median().idle_bytes, cells[2].median().idle_bytes);
        mem.push(format!(
            "| RSS per idle client ({idle_k} idle), bytes | {} | {} | {} |",
            num(o, 0),
            num(b, 0),
            num(ratio(o, b), 2)
        ));
        let (o, b) = (
            cells[1].median().silent_bytes,
            cells[2].median().silent_bytes,
        );
        mem.push(format!(
            "| RSS per silent connection (no startup packet; {} beside the idle clients), bytes | {} | {} | {} |",
            (idle_k / 2).max(1),
            num(o, 0),
            num(b, 0),
            num(ratio(o, b), 2)
        ));
    }
    if let Some((row, cells)) = find(Workload::Large) {
        let (o, b) = (cells[1].median().peak_mb, cells[2].median().peak_mb);
        mem.push(format!(
            "| peak RSS growth, {} slow reader, MB | {} | {} | {} |",
            row.clients_label(),
            num(o, 1),
            num(b, 1),
            num(ratio(o, b), 2)
        ));
    }
    if !mem.is_empty() {
        let _ = writeln!(
            out,
            "\n| memory | odissey | PgBouncer | o/B |\n|---|---:|---:|---:|"
        );
        for l in mem {
            let _ = writeln!(out, "{l}");
        }
    }

    let failures: Vec<String> = rows
        .iter()
        .flat_map(|(row, cells)| {
            KINDS.iter().zip(cells).flat_map(move |(kind, cell)| {
                cell.errors.iter().map(move |e| {
                    format!(
                        "### {} / {} / {}\n```\n{e}\n```",
                        row.label(),
                        row.clients_label(),
                        kind.label()
                    )
                })
            })
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## Failures\n");
        for f in failures {
            let _ = writeln!(out, "{f}\n");
        }
    }
    out
}

const CSV_HEAD: &str = "workload,clients,target,rounds_ok,rounds_failed,tps,lat_avg_ms,p99_ms,\
cpu_us_per_tx,rss_mb,idle_bytes_per_client,peak_rss_growth_mb,p50_ms,syscalls_per_tx,pool_size,\
workers,system_cpu_pct,messages_per_tx,wakeups_per_tx,system_messages_per_tx,note\n";

/// The identity of one CSV line.
struct CsvKey<'a> {
    workload: &'a str,
    clients: usize,
    target: &'a str,
    rounds_ok: usize,
    rounds_failed: usize,
    pool_size: Option<usize>,
    workers: Option<usize>,
}

/// One CSV line in the columns of [`CSV_HEAD`].
fn csv_line(out: &mut String, k: &CsvKey, m: &Sample, note: &str) {
    let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
    let n = |v: Option<usize>| v.map(|v| v.to_string()).unwrap_or_default();
    let _ = writeln!(
        out,
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\"",
        k.workload,
        k.clients,
        k.target,
        k.rounds_ok,
        k.rounds_failed,
        f(m.tps),
        f(m.lat_ms),
        f(m.p99_ms),
        f(m.cpu_us_tx),
        f(m.rss_mb),
        f(m.idle_bytes),
        f(m.peak_mb),
        f(m.p50_ms),
        f(m.syscalls_tx),
        n(k.pool_size),
        n(k.workers),
        f(m.system_cpu_pct),
        f(m.messages_tx),
        f(m.wakeups_tx),
        f(m.system_messages_tx),
        note.replace('"', "'"),
    );
}

/// Why a cell was skipped, else its first error's first line.
fn cell_note(cell: &Cell) -> String {
    cell.skipped
        .clone()
        .or_else(|| {
            cell.errors
                .first()
                .and_then(|e| e.lines().next().map(str::to_owned))
        })
        .unwrap_or_default()
}

/// One CSV line per workload row × target, with medians (`pool_size`:
/// the poolers' pool size, `workers`: odissey's workers).
pub(crate) fn csv(rows: &[(Row, [Cell; 3])], pool_size: usize, workers: usize) -> String {
    let mut out = String::from(CSV_HEAD);
    for (row, cells) in rows {
        for (kind, cell) in KINDS.iter().zip(cells) {
            csv_line(
                &mut out,
                &CsvKey {
                    workload: &row.workload.name(),
                    clients: row.clients,
                    target: kind.label(),
                    rounds_ok: cell.samples.len(),
                    rounds_failed: cell.errors.len(),
                    pool_size: (*kind != Kind::Direct).then_some(pool_size),
                    workers: (*kind == Kind::Odissey).then_some(workers),
                },
                &cell.median(),
                &cell_note(cell),
            );
        }
    }
    out
}

/// The saturation workload's CSV lines (workload `saturation`), in the
/// columns of [`csv`].
pub(crate) fn saturation_csv(groups: &[Group]) -> String {
    let mut out = String::new();
    for g in groups {
        for (t, cell) in &g.cells {
            let (target, workers) = match t {
                SatTarget::Odissey(w) => (Kind::Odissey.label(), Some(*w)),
                SatTarget::PgBouncer => (Kind::PgBouncer.label(), None),
            };
            csv_line(
                &mut out,
                &CsvKey {
                    workload: "saturation",
                    clients: g.clients,
                    target,
                    rounds_ok: cell.samples.len(),
                    rounds_failed: cell.errors.len(),
                    pool_size: Some(g.pool),
                    workers,
                },
                &cell.median(),
                &cell_note(cell),
            );
        }
    }
    out
}

/// The saturation section of the markdown report: a table per (clients,
/// pool size), the ratios the targets are stated in under each, then the
/// failures.
pub(crate) fn saturation_markdown(
    spec: &saturation::Spec,
    groups: &[Group],
    duration: u64,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Saturation: workers against a saturated pool\n\n\
         `pgbench -S -M simple` for {duration} s per run, {} round(s) (medians), through \
         odissey in transaction pooling at workers {} (an odissey process each, its \
         metrics endpoint on) and through PgBouncer, the single-threaded reference, both \
         with the table's pool size. Rounds alternate between the targets.\n",
        spec.rounds,
        spec.workers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    );
    let head = [
        "target",
        "tps",
        "CPU µs/tx",
        "system thread CPU %",
        "messages/tx",
        "system messages/tx",
        "wake-ups/tx",
        "syscalls/tx",
        "p50 ms",
        "p99 ms",
    ];
    let mut notes = Vec::new();
    for g in groups {
        let _ = writeln!(s, "### {} clients, pool size {}\n", g.clients, g.pool);
        let _ = writeln!(s, "| {} |", head.join(" | "));
        let _ = writeln!(s, "|---|{}", "---:|".repeat(head.len() - 1));
        for (t, cell) in &g.cells {
            let mut v = vec![t.label()];
            if cell.failed() && cell.samples.is_empty() {
                v.resize(head.len(), "FAIL".into());
            } else if let Some(why) = &cell.skipped {
                let mark = match notes.iter().position(|n| n == why) {
                    Some(i) => i + 1,
                    None => {
                        notes.push(why.clone());
                        notes.len()
                    }
                };
                v.push(format!("n/a[{mark}]"));
                v.resize(head.len(), "–".into());
            } else {
                let m = cell.median();
                let partial = if cell.failed() { "!" } else { "" };
                v.extend([
                    format!("{}{partial}", num(m.tps, 0)),
                    num(m.cpu_us_tx, 1),
                    num(m.system_cpu_pct, 1),
                    num(m.messages_tx, 3),
                    num(m.system_messages_tx, 3),
                    num(m.wakeups_tx, 3),
                    num(m.syscalls_tx, 2),
                    num(m.p50_ms, 2),
                    num(m.p99_ms, 2),
                ]);
            }
            let _ = writeln!(s, "| {} |", v.join(" | "));
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "{}", saturation_ratios(g));
    }
    for (i, n) in notes.iter().enumerate() {
        let _ = writeln!(s, "[{}] {n}  ", i + 1);
    }
    let _ = writeln!(
        s,
        "CPU µs/tx: the pooler's utime + stime (all threads, /proc/PID/stat) over the run / \
         transactions. System thread CPU %: the `odissey-system` thread's utime + stime \
         (/proc/PID/task/*/stat) over the run, as a share of the whole process's. \
         messages/tx and wake-ups/tx: the growth of `odissey_thread_messages_total` and \
         `odissey_thread_wakeups_total`, summed over all threads, between scrapes of \
         `GET /metrics` before and after the run, / transactions; system messages/tx: \
         the same for `thread=\"odissey-system\"` alone. syscalls/tx: `perf stat -e \
         raw_syscalls:sys_enter -p PID` from 0.5 s after pgbench starts to 0.5 s before it \
         ends / the transactions that ended in that window, in one more run after the \
         rounds unless the header says inline (perf slows the pooler, so the other columns \
         come from runs without it). p50/p99: from pgbench's \
         per-transaction logs. – = not measured (no such metric from this odissey, perf \
         absent, or PgBouncer: one thread, no metrics endpoint); `!` = some rounds failed."
    );
    let failures: Vec<String> = groups
        .iter()
        .flat_map(|g| {
            g.cells.iter().flat_map(move |(t, cell)| {
                cell.errors.iter().map(move |e| {
                    format!(
                        "### saturation / {} clients / pool {} / {}\n```\n{e}\n```",
                        g.clients,
                        g.pool,
                        t.label()
                    )
                })
            })
        })
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(s, "\n### Saturation failures\n");
        for f in failures {
            let _ = writeln!(s, "{f}\n");
        }
    }
    s
}

/// The ratios the saturation targets are stated in, for one group; with
/// the verdicts at 64 clients on pool size 8, where the targets are set.
fn saturation_ratios(g: &Group) -> String {
    let median = |w: usize| {
        g.cell(SatTarget::Odissey(w))
            .filter(|c| c.skipped.is_none() && !c.samples.is_empty())
            .map(Cell::median)
    };
    let (one, two) = (median(1), median(2));
    let judged = g.clients == 64 && g.pool == 8;
    let target = |ok: Option<bool>, what: &str| match ok {
        Some(ok) if judged => format!(" (target {what}: {})", verdict(ok)),
        _ if judged => format!(" (target {what})"),
        _ => String::new(),
    };
    let cpu = ratio(
        two.as_ref().and_then(|m| m.cpu_us_tx),
        one.as_ref().and_then(|m| m.cpu_us_tx),
    );
    let share = two.as_ref().and_then(|m| m.system_cpu_pct);
    let msgs = two.as_ref().and_then(|m| m.messages_tx);
    format!(
        "- CPU µs/tx workers=2 / workers=1: **{}**{}\n\
         - system thread share at workers=2: **{}**{}\n\
         - messages/tx at workers=2: **{}**{}\n",
        cpu.map_or_else(|| "–".into(), |r| format!("{r:.2}×")),
        target(cpu.map(|r| r <= 1.10), "≤ 1.10×"),
        share.map_or_else(|| "–".into(), |p| format!("{p:.2} %")),
        target(share.map(|p| p <= 2.0), "≤ 2 %"),
        num(msgs, 3),
        target(msgs.map(|m| m <= 0.05), "≤ 0.05"),
    )
}

/// `YYYY-MM-DDTHH-MM-SSZ` (file-name safe) and `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn utc_now() -> (String, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, mi, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}T{h:02}-{mi:02}-{s:02}Z"),
        format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC"),
    )
}

/// "N cores, <model>, <RAM>, Linux <release>".
pub(crate) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gb = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or_else(|| "?".into(), |kb| format!("{:.1} GiB RAM", kb / 1048576.0));
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores (nproc), {model}, {mem_gb}, Linux {}",
        kernel.trim()
    )
}

/// Writes `<dir>/<stamp>.md` and `<dir>/<stamp>.csv`; returns their paths.
pub(crate) fn write(dir: &Path, stamp: &str, md: &str, csv: &str) -> Result<Vec<String>, String> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for (ext, text) in [("md", md), ("csv", csv)] {
        let path = dir.join(format!("{stamp}.{ext}"));
        fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

/// The flood numbers of a set of phases of one kind: medians over them,
/// counts summed (one phase: its own numbers).
#[derive(Default)]
struct FloodAgg {
    phases: usize,
    tps: Option<f64>,
    lat_mean: Option<f64>,
    lat_p50: Option<f64>,
    lat_p99: Option<f64>,
    lat_max: Option<f64>,
    admitted_errors: u64,
    logins_s: Option<f64>,
    refused_s: Option<f64>,
    refusal_p50: Option<f64>,
    refusal_p99: Option<f64>,
    refusal_max: Option<f64>,
    refusal_startup_p99: Option<f64>,
    refusals: u64,
    under_1ms_pct: Option<f64>,
    not_refused: u64,
    other: u64,
    cpu_pct: Option<f64>,
    bench_pct: Option<f64>,
    box_pct: Option<f64>,
    cpu_us_tx: Option<f64>,
    rss_mb: Option<f64>,
}

fn flood_agg(ps: &[&Phase]) -> FloodAgg {
    let m = |f: &dyn Fn(&Phase) -> Option<f64>| median(ps.iter().filter_map(|p| f(p)).collect());
    let flooded = ps.iter().any(|p| p.flooded);
    let fm = |f: &dyn Fn(&Phase) -> Option<f64>| if flooded { m(f) } else { None };
    let refusals: u64 = ps.iter().filter_map(|p| p.refusal.map(|d| d.n)).sum();
    let under: u64 = ps
        .iter()
        .filter_map(|p| p.refusal.map(|d| d.under_1ms))
        .sum();
    FloodAgg {
        phases: ps.len(),
        tps: m(&|p| Some(p.tps())),
        lat_mean: m(&|p| p.latency.map(|d| d.mean)),
        lat_p50: m(&|p| p.latency.map(|d| d.p50)),
        lat_p99: m(&|p| p.latency.map(|d| d.p99)),
        lat_max: m(&|p| p.latency.map(|d| d.max)),
        admitted_errors: ps.iter().map(|p| p.admitted_errors).sum(),
        logins_s: fm(&|p| Some(p.attempts as f64 / p.seconds)),
        refused_s: fm(&|p| Some(p.refused as f64 / p.seconds)),
        refusal_p50: fm(&|p| p.refusal.map(|d| d.p50)),
        refusal_p99: fm(&|p| p.refusal.map(|d| d.p99)),
        refusal_max: fm(&|p| p.refusal.map(|d| d.max)),
        refusal_startup_p99: fm(&|p| p.refusal_from_startup.map(|d| d.p99)),
        refusals,
        under_1ms_pct: (refusals > 0).then(|| 100.0 * under as f64 / refusals as f64),
        not_refused: ps.iter().map(|p| p.not_refused).sum(),
        other: ps.iter().map(|p| p.other).sum(),
        cpu_pct: m(&|p| Some(p.cpu_pct().0)),
        bench_pct: m(&|p| Some(p.cpu_pct().1)),
        box_pct: m(&|p| Some(p.box_busy_pct)),
        cpu_us_tx: m(&|p| {
            let n = p.latency.map_or(0, |d| d.n);
            (n > 0).then(|| p.odissey_cpu * 1e6 / n as f64)
        }),
        rss_mb: m(&|p| Some(p.rss_mb)),
    }
}

const FLOOD_HEAD: &str =
    "admitted tx/s | lat p50 ms | lat p99 ms | lat max ms | admitted errors | \
     logins tried/s | refused/s | refusal p50 ms | refusal p99 ms | refusal max ms | \
     refusals < 1 ms | not refused | other outcomes | pooler CPU % | bench CPU % | machine busy %";

/// The cells after the first one(s) of a flood table row.
fn flood_cells(a: &FloodAgg, flooded: bool) -> String {
    let dash = |v: String| if flooded { v } else { "–".into() };
    [
        num(a.tps, 0),
        num(a.lat_p50, 3),
        num(a.lat_p99, 3),
        num(a.lat_max, 2),
        a.admitted_errors.to_string(),
        num(a.logins_s, 0),
        num(a.refused_s, 0),
        num(a.refusal_p50, 3),
        num(a.refusal_p99, 3),
        num(a.refusal_max, 2),
        a.under_1ms_pct
            .map_or_else(|| "–".into(), |v| format!("{v:.2} %")),
        dash(a.not_refused.to_string()),
        dash(a.other.to_string()),
        num(a.cpu_pct, 0),
        num(a.bench_pct, 0),
        num(a.box_pct, 0),
    ]
    .join(" | ")
}

fn of_kind(out: &flood::Outcome, flooded: bool) -> Vec<&Phase> {
    out.phases.iter().filter(|p| p.flooded == flooded).collect()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// The flood section of the markdown report.
pub(crate) fn flood_markdown(
    spec: &flood::Spec,
    out: &flood::Outcome,
    pool_size: usize,
    kind: Kind,
) -> String {
    let mut s = String::new();
    let c = spec.admitted;
    let (title, setup, refused) = match kind {
        Kind::PgBouncer => (
            "PgBouncer",
            format!(
                "A PgBouncer of its own, transaction pooling with default_pool_size \
                 {pool_size} and max_client_conn = {c}: PgBouncer has no per-route client \
                 limit, but with one database and user here its process-wide limit admits \
                 the same {c} clients."
            ),
            "refused (max_client_conn)",
        ),
        _ => (
            "odissey",
            format!(
                "An odissey of its own, route `test.trust_user` in transaction pooling with \
                 pool_size {pool_size}, client_max = queue_max = {c}."
            ),
            "refused (53300, client_max)",
        ),
    };
    let _ = writeln!(
        s,
        "\n## Flood: admission control under a login flood ({title})\n\n\
         {setup} {c} admitted clients log in \
         first and stay; after a 1 s warm-up (back to back, not reported) that opens the \
         pool's servers, each round has an unloaded phase, then a flooded one, of {} s each, \
         in which {} more clients keep trying to log in{}, are {refused} and try again. \
         Admitted clients run `SELECT 1` (simple protocol) {}.\n",
        spec.duration.as_secs(),
        spec.flooders,
        if spec.flood_rate > 0 {
            format!(", at most {} attempts/s in all", spec.flood_rate)
        } else {
            ", each again as soon as it is refused".into()
        },
        if spec.tx_rate > 0 {
            format!("at {} transactions/s in all, evenly spread", spec.tx_rate)
        } else {
            "back to back".into()
        },
    );
    let (unloaded, flooded) = (of_kind(out, false), of_kind(out, true));
    let _ = writeln!(s, "| phase | rounds | {FLOOD_HEAD} |");
    let _ = writeln!(s, "|---|{}", "---:|".repeat(17));
    for (name, ps, f) in [("unloaded", &unloaded, false), ("flooded", &flooded, true)] {
        let a = flood_agg(ps);
        let _ = writeln!(s, "| {name} | {} | {} |", a.phases, flood_cells(&a, f));
    }
    let (u, f) = (flood_agg(&unloaded), flood_agg(&flooded));
    let _ = writeln!(s);
    match (u.lat_p99, f.lat_p99) {
        (Some(up), Some(fp)) => {
            let per_round: Vec<String> = flooded
                .iter()
                .filter_map(|fl| {
                    let un = unloaded.iter().find(|p| p.round == fl.round)?;
                    Some(format!("{:.2}×", fl.latency?.p99 / un.latency?.p99))
                })
                .collect();
            let r = fp / up;
            let _ = writeln!(
                s,
                "- Admitted clients' p99 latency, flooded / unloaded: {fp:.3} / {up:.3} ms = \
                 **{r:.2}×** (target ≤ 2×: {}); per round: {}.",
                verdict(r <= 2.0),
                per_round.join(", ")
            );
        }
        _ => {
            let _ = writeln!(
                s,
                "- Admitted clients' p99 latency: not measured (see failures)."
            );
        }
    }
    match (f.refusal_p99, f.refusal_max, f.under_1ms_pct) {
        (Some(p99), Some(max), Some(pct)) => {
            let _ = writeln!(
                s,
                "- Refusal time, from the start of connect() to the ErrorResponse read: p99 \
                 **{p99:.3} ms** (target < 1 ms: {}), max {max:.2} ms (medians over rounds); \
                 {pct:.2} % of all {} refusals took under 1 ms. From the startup packet's send \
                 instead: p99 {} ms.",
                verdict(p99 < 1.0),
                f.refusals,
                num(f.refusal_startup_p99, 3)
            );
        }
        _ => {
            let _ = writeln!(s, "- Refusal time: no refusal measured (see failures).");
        }
    }
    let _ = writeln!(
        s,
        "- Admitted-client errors: {} (must be 0); flood logins not refused: {} (must be 0); \
         other flood outcomes (connect errors, other errors, no reply within 5 s): {}.",
        u.admitted_errors + f.admitted_errors,
        f.not_refused,
        f.other
    );
    if let Some(text) = flooded.iter().find_map(|p| p.refusal_text.as_deref()) {
        let _ = writeln!(s, "- The refusal: `{text}`.");
    }
    let _ = writeln!(
        s,
        "- What the flood cost: {title} CPU {} % unloaded, {} % flooded; this process (the \
         admitted clients and the flood) {} % and {} % (100 % = one core). The machine was \
         {} % and {} % busy (100 % = all its cores, other processes included): near 100 %, \
         the flood measures the machine, not the pooler.",
        num(u.cpu_pct, 0),
        num(f.cpu_pct, 0),
        num(u.bench_pct, 0),
        num(f.bench_pct, 0),
        num(u.box_pct, 0),
        num(f.box_pct, 0)
    );
    let _ = writeln!(
        s,
        "\nLatency: per transaction, from just before the Query is written until \
         ReadyForQuery is read, timed in the client threads of this process (so it also \
         holds their own scheduling delays, which the flood's threads add to on a small \
         machine). Refusal time: likewise timed by the flooder, from the start of its \
         connect() (TCP handshake, accept, startup packet) until the ErrorResponse is read. \
         Latency and refusal columns are medians over the rounds of each round's percentile; \
         errors, refusals under 1 ms, not refused and other outcomes are totals. CPU %: \
         utime + stime over the phase / its wall time (100 % = one core); machine busy %: \
         all CPUs' non-idle time from /proc/stat over the phase (100 % = every core).\n"
    );
    let _ = writeln!(s, "Per round:\n");
    let _ = writeln!(s, "| round | phase | {FLOOD_HEAD} |");
    let _ = writeln!(s, "|---:|---|{}", "---:|".repeat(16));
    for p in &out.phases {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            p.round,
            p.name(),
            flood_cells(&flood_agg(&[p]), p.flooded)
        );
    }
    if !out.errors.is_empty() {
        let _ = writeln!(s, "\n### Flood failures\n");
        for e in &out.errors {
            let _ = writeln!(s, "```\n{e}\n```\n");
        }
    }
    s
}

/// odissey against PgBouncer under the same flood, as ratios.
pub(crate) fn flood_compare(odissey: &flood::Outcome, bouncer: &flood::Outcome) -> String {
    let (o, b) = (
        flood_agg(&of_kind(odissey, true)),
        flood_agg(&of_kind(bouncer, true)),
    );
    let (ou, bu) = (
        flood_agg(&of_kind(odissey, false)),
        flood_agg(&of_kind(bouncer, false)),
    );
    let growth = |f: Option<f64>, u: Option<f64>| Some(f? / u?);
    format!(
        "\n### Flood: odissey against PgBouncer\n\n\
         | flooded phase | odissey | PgBouncer | o/B |\n|---|---:|---:|---:|\n\
         | admitted p99 ms | {} | {} | {} |\n\
         | admitted p99, flooded / unloaded | {} | {} | |\n\
         | refusal p99 ms | {} | {} | {} |\n\
         | refused logins/s | {} | {} | {} |\n\
         | pooler CPU % | {} | {} | {} |\n",
        num(o.lat_p99, 3),
        num(b.lat_p99, 3),
        num(ratio(o.lat_p99, b.lat_p99), 2),
        num(growth(o.lat_p99, ou.lat_p99), 2),
        num(growth(b.lat_p99, bu.lat_p99), 2),
        num(o.refusal_p99, 3),
        num(b.refusal_p99, 3),
        num(ratio(o.refusal_p99, b.refusal_p99), 2),
        num(o.refused_s, 0),
        num(b.refused_s, 0),
        num(ratio(o.refused_s, b.refused_s), 2),
        num(o.cpu_pct, 0),
        num(b.cpu_pct, 0),
        num(ratio(o.cpu_pct, b.cpu_pct), 2),
    )
}

/// The flood's CSV lines (`flood-unloaded`, `flood-flooded`), in the
/// columns of [`csv`]; what has no column goes into the note as `key=value`
/// pairs separated by `;`.
pub(crate) fn flood_csv(spec: &flood::Spec, out: &flood::Outcome, kind: Kind) -> String {
    let f = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_default();
    let mut s = String::new();
    for flooded in [false, true] {
        let ps = of_kind(out, flooded);
        let a = flood_agg(&ps);
        let ok = ps.iter().filter(|p| !p.broken()).count();
        let mut note = vec![
            format!("lat_max_ms={}", f(a.lat_max)),
            format!("admitted_errors={}", a.admitted_errors),
            format!("pooler_cpu_pct={}", f(a.cpu_pct)),
            format!("bench_cpu_pct={}", f(a.bench_pct)),
            format!("machine_busy_pct={}", f(a.box_pct)),
        ];
        if flooded {
            note.extend([
                format!("flooders={}", spec.flooders),
                format!("logins_per_s={}", f(a.logins_s)),
                format!("refused_per_s={}", f(a.refused_s)),
                format!("refusal_p50_ms={}", f(a.refusal_p50)),
                format!("refusal_p99_ms={}", f(a.refusal_p99)),
                format!("refusal_max_ms={}", f(a.refusal_max)),
                format!("refusals_under_1ms_pct={}", f(a.under_1ms_pct)),
                format!("not_refused={}", a.not_refused),
                format!("other_outcomes={}", a.other),
            ]);
        }
        // The first problem of these phases, else what stopped the run
        // before all rounds of them ran.
        let error = match ps.iter().find_map(|p| p.problems.first()) {
            Some(e) => Some(e),
            None if ps.len() < spec.rounds => out.errors.last(),
            None => None,
        };
        if let Some(e) = error.and_then(|e| e.lines().next()) {
            note.push(format!("error={e}"));
        }
        csv_line(
            &mut s,
            &CsvKey {
                workload: if flooded {
                    "flood-flooded"
                } else {
                    "flood-unloaded"
                },
                clients: spec.admitted,
                target: kind.label(),
                rounds_ok: ok,
                rounds_failed: spec.rounds.saturating_sub(ok),
                pool_size: None,
                workers: None,
            },
            &Sample {
                tps: a.tps,
                lat_ms: a.lat_mean,
                p50_ms: a.lat_p50,
                p99_ms: a.lat_p99,
                cpu_us_tx: a.cpu_us_tx,
                rss_mb: a.rss_mb,
                ..Sample::default()
            },
            &note.join(";"),
        );
    }
    s
}
