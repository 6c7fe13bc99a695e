//! The flood section of the report: odissey's and PgBouncer's tables, the
//! comparison of the two, and the flood's CSV lines.

use std::fmt::Write as _;

use super::{csv_line, median, num, ratio, verdict, CsvKey, Sample};
use crate::flood::{self, Phase};
use crate::Kind;

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
