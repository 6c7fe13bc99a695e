//! The saturation section of the report: its markdown tables with the
//! ratios its targets are stated in, and its CSV lines.

use std::fmt::Write as _;

use super::{cell_note, csv_line, num, ratio, verdict, Cell, CsvKey};
use crate::saturation::{self, Group, SatTarget};
use crate::Kind;

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
