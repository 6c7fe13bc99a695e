//! Medians, the markdown table, the CSV, the flood section and the machine
//! description.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Kind, Row, Workload, KINDS};

mod flood_section;
mod saturation_section;

pub(crate) use flood_section::{flood_compare, flood_csv, flood_markdown};
pub(crate) use saturation_section::{saturation_csv, saturation_markdown};

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

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
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
