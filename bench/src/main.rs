//! odissey-bench: pgbench-driven comparison of odissey, PgBouncer and direct
//! PostgreSQL on a throwaway cluster. Run it through `bench/run`; see the
//! README's "Benchmarks" section and `--help`.

mod flood;
mod measure;
mod options;
mod perf;
mod pgbench;
mod procs;
mod report;
mod saturation;
mod scrape;
mod targets;
mod wire;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) use measure::{
    jobs, measured_pgbench, run_one, summary, syscall_pass, Ctx, PERF_PASS_SECS,
};
use odissey_harness::PgCluster;
use options::parse_options;
use procs::check_interrupted;
use report::Cell;
pub(crate) use targets::{
    pgbouncer_version, start_odissey, start_pgbouncer, which, OdisseySetup, Target,
};

/// The flood workload's name for `--only`. It runs after the others, on an
/// odissey of its own, and has its own report section (see `flood`).
const FLOOD: &str = "flood";
/// The saturation workload's name for `--only`: only run when named there
/// (or, small, in smoke mode). Its own odisseys and PgBouncers, its own
/// report section (see `saturation`).
const SATURATION: &str = "saturation";

/// Every workload of the main table, in the order they run.
const WORKLOADS: [Workload; 7] = [
    Workload::Large,
    Workload::Select("simple"),
    Workload::Select("extended"),
    Workload::Select("prepared"),
    Workload::Tpcb,
    Workload::Churn,
    Workload::Idle,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Workload {
    /// `pgbench -S -M <mode>`.
    Select(&'static str),
    /// `pgbench` (TPC-B-like), simple protocol.
    Tpcb,
    /// `pgbench -C -S`: a new connection per transaction.
    Churn,
    /// K idle clients held open while pgbench -S runs.
    Idle,
    /// A large result read slowly.
    Large,
}

impl Workload {
    pub(crate) fn name(self) -> String {
        match self {
            Self::Select(mode) => format!("select-{mode}"),
            Self::Tpcb => "tpcb".into(),
            Self::Churn => "churn".into(),
            Self::Idle => "idle".into(),
            Self::Large => "large-result".into(),
        }
    }
}

/// A row of the table: a workload at one client count.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Row {
    pub(crate) workload: Workload,
    /// pgbench clients (large result: rows read).
    pub(crate) clients: usize,
}

impl Row {
    pub(crate) fn label(&self) -> String {
        match self.workload {
            Workload::Select(mode) => format!("select-only -M {mode}"),
            Workload::Tpcb => "TPC-B".into(),
            Workload::Churn => "churn -C -S".into(),
            Workload::Idle => "idle + -S".into(),
            Workload::Large => "large result".into(),
        }
    }

    pub(crate) fn clients_label(&self) -> String {
        match self.workload {
            Workload::Large => format!("1 ({} MB)", self.clients / 1000),
            _ => self.clients.to_string(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Direct,
    Odissey,
    PgBouncer,
}

pub(crate) const KINDS: [Kind; 3] = [Kind::Direct, Kind::Odissey, Kind::PgBouncer];

impl Kind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Direct => "PostgreSQL",
            Self::Odissey => "odissey",
            Self::PgBouncer => "PgBouncer",
        }
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("odissey-bench: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode, String> {
    let o = parse_options()?;
    procs::install_signal_handler()?;
    let cores = thread::available_parallelism().map_or(1, usize::from);

    // Binaries.
    let odissey = match &o.odissey {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("odissey")))
            .ok_or("cannot locate this binary's directory; pass --odissey PATH")?,
    };
    if !odissey.is_file() {
        return Err(format!(
            "odissey binary {} not found: run `cargo build --release` or pass --odissey PATH",
            odissey.display()
        ));
    }
    let pgbouncer = if o.no_pgbouncer {
        None
    } else {
        match &o.pgbouncer {
            Some(p) if p.is_file() => Some(p.clone()),
            Some(p) => return Err(format!("--pgbouncer {}: no such file", p.display())),
            None => which("pgbouncer").or_else(|| {
                let p = PathBuf::from("/usr/sbin/pgbouncer");
                p.is_file().then_some(p)
            }),
        }
    };
    let pgbouncer_ver = pgbouncer
        .as_deref()
        .map(|p| procs::first_line(p, &["--version"]));
    let pgbouncer_prepared = pgbouncer_ver
        .as_deref()
        .and_then(pgbouncer_version)
        .is_some_and(|v| v >= (1, 21));

    // Rows.
    let wanted = |w: Workload| match &o.only {
        None => true,
        Some(list) => list
            .iter()
            .any(|x| *x == w.name() || (x == "select" && matches!(w, Workload::Select(_)))),
    };
    let fixed_clients = if o.smoke { o.clients[0] } else { 32 };
    let mut rows: Vec<Row> = Vec::new();
    for w in WORKLOADS.into_iter().filter(|&w| wanted(w)) {
        match w {
            Workload::Select(_) => rows.extend(o.clients.iter().map(|&c| Row {
                workload: w,
                clients: c,
            })),
            Workload::Large => rows.push(Row {
                workload: w,
                clients: o.large_rows,
            }),
            _ => rows.push(Row {
                workload: w,
                clients: fixed_clients,
            }),
        }
    }
    let flood_wanted = match &o.only {
        None => true,
        Some(list) => list.iter().any(|x| x == FLOOD),
    };
    let flood_spec = flood_wanted.then(|| {
        let admitted = o.flood_clients.unwrap_or(2 * o.pool_size);
        flood::Spec {
            admitted,
            flooders: o.flooders.unwrap_or(10 * admitted),
            flood_rate: o.flood_rate,
            tx_rate: o.flood_tps,
            duration: Duration::from_secs(o.duration),
            rounds: o.rounds,
        }
    });
    // Saturation: only when named in --only, or small in smoke mode.
    let sat_wanted = match &o.only {
        None => o.smoke,
        Some(list) => list.iter().any(|x| x == SATURATION),
    };
    let sat_spec = sat_wanted.then(|| saturation::Spec {
        clients: o.sat_clients.clone(),
        pools: o.sat_pools.clone(),
        workers: o.sat_workers.clone(),
        rounds: o.rounds,
    });
    if rows.is_empty() && flood_spec.is_none() && sat_spec.is_none() {
        return Err("no workload selected".into());
    }
    let perf = perf::probe(o.no_perf);

    let (stamp, when) = report::utc_now();
    let pg_bindir = odissey_harness::bindir().to_path_buf();
    let pgbench_bin = odissey_harness::pg_bin("pgbench");
    let git = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into());
    let header = report::Header {
        title: format!("odissey benchmark, {when}"),
        lines: vec![
            format!("machine: {}", report::machine()),
            format!(
                "PostgreSQL: {} ({}); {}",
                procs::first_line(&pg_bindir.join("postgres"), &["--version"]),
                pg_bindir.display(),
                procs::first_line(&pgbench_bin, &["--version"])
            ),
            format!(
                "odissey: {} ({}), source tree {git}",
                procs::first_line(&odissey, &["--version"]),
                odissey.display()
            ),
            match (&pgbouncer, &pgbouncer_ver) {
                (Some(p), Some(v)) => format!("PgBouncer: {v} ({})", p.display()),
                _ => "PgBouncer: absent".into(),
            },
            format!(
                "settings: odissey workers = {}; both poolers transaction pooling, pool size {}, \
                 trust auth; pgbench scale {}, {} s per run, {} round(s) (medians), \
                 pgbench -j ≤ {} (-M prepared: -j = clients ≤ 64); idle K = {}; large result {} rows × 1000 B{}",
                o.workers,
                o.pool_size,
                o.scale,
                o.duration,
                o.rounds,
                2 * cores,
                o.idle,
                o.large_rows,
                if o.smoke { "; SMOKE mode" } else { "" }
            ),
            match &flood_spec {
                Some(f) => format!(
                    "flood: an odissey of its own, route client_max = queue_max = {} (global \
                     client_max unset), pool size {}; {} admitted clients run SELECT 1 at {}; \
                     {} flood clients try to log in at {}; rounds of an unloaded and a flooded \
                     phase of {} s each; then the same against a PgBouncer with max_client_conn = C",
                    f.admitted,
                    o.pool_size,
                    f.admitted,
                    if f.tx_rate > 0 {
                        format!("{} tx/s in all", f.tx_rate)
                    } else {
                        "full speed (back to back)".into()
                    },
                    f.flooders,
                    if f.flood_rate > 0 {
                        format!("≤ {} attempts/s in all", f.flood_rate)
                    } else {
                        "full speed (each again once refused)".into()
                    },
                    o.duration
                ),
                None => "flood: not run".into(),
            },
            match &sat_spec {
                Some(s) => format!(
                    "saturation: pgbench -S -M simple, clients {:?} × pool size {:?}; odissey \
                     workers {:?} (an odissey each, metrics endpoint on) and PgBouncer, started \
                     per pool size",
                    s.clients, s.pools, s.workers
                ),
                None => "saturation: not run".into(),
            },
            match &perf {
                Ok(p) => format!(
                    "syscalls: `{} stat -e raw_syscalls:sys_enter -p PID`, from 0.5 s after \
                     pgbench starts to 0.5 s before it ends, over the transactions that ended \
                     in that window; {}",
                    p.display(),
                    if o.perf_inline {
                        "inline: during the measured runs (perf's cost is in their CPU and tps)".to_owned()
                    } else {
                        format!(
                            "in one more run of {} s per pooler cell after its rounds (the \
                             measured rounds run without perf)",
                            o.duration.min(PERF_PASS_SECS)
                        )
                    }
                ),
                Err(e) => format!("syscalls: not counted ({e})"),
            },
            format!(
                "command: bench/run {}",
                std::env::args().skip(1).collect::<Vec<_>>().join(" ")
            ),
        ],
    };
    for l in &header.lines {
        eprintln!("{l}");
    }

    // PostgreSQL and data.
    let started = Instant::now();
    eprintln!("starting PostgreSQL...");
    let cluster = PgCluster::start();
    // (Direct PostgreSQL runs only in the main table's rows.)
    let max_clients = if rows.is_empty() {
        0
    } else {
        o.clients
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .max(fixed_clients)
    };
    let poolers = 2 + usize::from(flood_spec.is_some());
    let needed = (max_clients + poolers * o.pool_size)
        .max(sat_spec.as_ref().map_or(0, |s| s.server_connections()))
        + 20;
    if needed > 297 {
        eprintln!(
            "raising max_connections to {needed} for {max_clients} direct clients and the \
             poolers' servers..."
        );
        cluster.sql(
            "postgres",
            &format!("ALTER SYSTEM SET max_connections = {needed}"),
        );
        cluster.stop();
        cluster.restart();
    }
    if !rows.is_empty() || sat_spec.is_some() {
        eprintln!("pgbench -i -s {}...", o.scale);
        pgbench::init(cluster.port(), o.scale)?;
        check_interrupted()?;
    }

    // Scratch dir, readable and writable by `postgres` (PgBouncer).
    let scratch = tempfile::Builder::new()
        .prefix("odissey-bench-")
        .tempdir()
        .map_err(|e| format!("cannot create a temp dir: {e}"))?;
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o777))
        .map_err(|e| format!("chmod {}: {e}", scratch.path().display()))?;
    let logs = scratch.path().join("pgbench-logs");
    fs::create_dir(&logs).map_err(|e| format!("mkdir {}: {e}", logs.display()))?;

    // The targets of the main table (none when only the flood runs).
    let mut targets: Vec<Option<Target>> = Vec::new();
    if !rows.is_empty() {
        targets.push(Some(Target {
            kind: Kind::Direct,
            port: cluster.port(),
            process: None,
            metrics: None,
        }));
        eprintln!("starting odissey...");
        targets.push(Some(start_odissey(
            &odissey,
            scratch.path(),
            cluster.port(),
            "odissey",
            &OdisseySetup {
                workers: o.workers,
                pool_size: o.pool_size,
                route_extra: "",
                metrics: false,
            },
        )?));
        match &pgbouncer {
            Some(bin) => {
                eprintln!("starting PgBouncer...");
                targets.push(Some(start_pgbouncer(
                    bin,
                    scratch.path(),
                    cluster.port(),
                    o.pool_size,
                    pgbouncer_prepared,
                    30_000,
                )?));
            }
            None => targets.push(None),
        }
    }
    eprintln!("setup done in {:.1} s", started.elapsed().as_secs_f64());

    let ctx = Ctx {
        logs,
        cores,
        duration: o.duration,
        idle: o.idle,
        fixed_clients,
        perf: perf.as_ref().ok().cloned(),
        perf_inline: o.perf_inline,
    };
    let mut results: Vec<(Row, [Cell; 3])> = Vec::new();
    for row in &rows {
        let mut cells: [Cell; 3] = Default::default();
        for (i, cell) in cells.iter_mut().enumerate() {
            cell.skipped = match (KINDS[i], row.workload, &targets[i]) {
                (Kind::PgBouncer, _, None) => Some("PgBouncer absent".into()),
                (Kind::Direct, Workload::Idle | Workload::Large, _) => {
                    Some("pooler workloads; not run against PostgreSQL directly".into())
                }
                (Kind::PgBouncer, Workload::Select("prepared"), _) if !pgbouncer_prepared => {
                    Some(format!(
                        "{} has no protocol-level prepared statements in transaction pooling \
                         (max_prepared_statements needs PgBouncer ≥ 1.21): not run",
                        pgbouncer_ver.as_deref().unwrap_or("PgBouncer")
                    ))
                }
                _ => None,
            };
        }
        for round in 1..=o.rounds {
            for (i, cell) in cells.iter_mut().enumerate() {
                let Some(target) = targets[i].as_mut().filter(|_| cell.skipped.is_none()) else {
                    continue;
                };
                check_interrupted()?;
                let t = Instant::now();
                let result = run_one(row, target, &ctx);
                check_interrupted()?;
                let head = format!(
                    "[{round}/{}] {} c={} {}",
                    o.rounds,
                    row.label(),
                    row.clients_label(),
                    target.kind.label()
                );
                match result {
                    Ok(s) => {
                        eprintln!(
                            "{head}: {} ({:.1} s)",
                            summary(&s),
                            t.elapsed().as_secs_f64()
                        );
                        cell.samples.push(s);
                    }
                    Err(e) => {
                        eprintln!("{head}: FAILED\n{e}");
                        cell.errors.push(e);
                    }
                }
            }
        }
        if row.workload != Workload::Large {
            for (i, cell) in cells.iter_mut().enumerate() {
                let Some(target) = targets[i].as_mut().filter(|t| t.process.is_some()) else {
                    continue;
                };
                let head = format!(
                    "[syscalls] {} c={} {}",
                    row.label(),
                    row.clients_label(),
                    target.kind.label()
                );
                syscall_pass(&ctx, cell, &head, |c| run_one(row, target, c))?;
            }
        }
        results.push((*row, cells));
    }
    drop(targets);
    // Saturation, on odisseys and PgBouncers of its own.
    let sat = match &sat_spec {
        Some(spec) => Some(saturation::run(
            spec,
            &saturation::Env {
                odissey: &odissey,
                pgbouncer: pgbouncer.as_deref(),
                pgbouncer_prepared,
                scratch: scratch.path(),
                pg_port: cluster.port(),
                ctx: &ctx,
            },
        )?),
        None => None,
    };
    // The flood, on an odissey of its own, with the other poolers stopped.
    let flood = match &flood_spec {
        Some(spec) => {
            eprintln!(
                "starting odissey for the flood (route client_max = queue_max = {})...",
                spec.admitted
            );
            let limits = format!("client_max = {0}\nqueue_max = {0}\n", spec.admitted);
            let outcome = match start_odissey(
                &odissey,
                scratch.path(),
                cluster.port(),
                "odissey-flood",
                &OdisseySetup {
                    workers: o.workers,
                    pool_size: o.pool_size,
                    route_extra: &limits,
                    metrics: false,
                },
            ) {
                Ok(mut target) => flood::run(&mut target, spec),
                Err(e) => flood::Outcome {
                    errors: vec![e],
                    ..flood::Outcome::default()
                },
            };
            check_interrupted()?;
            // The same flood against PgBouncer, whose only client limit is
            // the whole process's max_client_conn: with one database and
            // user here, it admits the same clients.
            let bouncer = match &pgbouncer {
                Some(bin) => {
                    eprintln!(
                        "starting PgBouncer for the flood (max_client_conn = {})...",
                        spec.admitted
                    );
                    let dir = scratch.path().join("pgbouncer-flood");
                    let started = fs::create_dir_all(&dir)
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
                        .and_then(|()| {
                            start_pgbouncer(
                                bin,
                                &dir,
                                cluster.port(),
                                o.pool_size,
                                pgbouncer_prepared,
                                spec.admitted,
                            )
                        });
                    let outcome = match started {
                        Ok(mut target) => flood::run(&mut target, spec),
                        Err(e) => flood::Outcome {
                            errors: vec![e],
                            ..flood::Outcome::default()
                        },
                    };
                    check_interrupted()?;
                    Some(outcome)
                }
                None => None,
            };
            Some((spec, outcome, bouncer))
        }
        None => None,
    };
    eprintln!("runs done in {:.1} s", started.elapsed().as_secs_f64());

    let mut md = report::markdown(&header, &results, o.idle);
    let mut csv = report::csv(&results, o.pool_size, o.workers);
    if let (Some(spec), Some(groups)) = (&sat_spec, &sat) {
        md.push_str(&report::saturation_markdown(spec, groups, o.duration));
        csv.push_str(&report::saturation_csv(groups));
    }
    if let Some((spec, outcome, bouncer)) = &flood {
        md.push_str(&report::flood_markdown(
            spec,
            outcome,
            o.pool_size,
            Kind::Odissey,
        ));
        csv.push_str(&report::flood_csv(spec, outcome, Kind::Odissey));
        if let Some(b) = bouncer {
            md.push_str(&report::flood_markdown(
                spec,
                b,
                o.pool_size,
                Kind::PgBouncer,
            ));
            md.push_str(&report::flood_compare(outcome, b));
            csv.push_str(&report::flood_csv(spec, b, Kind::PgBouncer));
        }
    }
    println!("{md}");
    let out_dir = o.out.clone().unwrap_or_else(|| {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        if manifest.is_dir() {
            manifest.join("results")
        } else {
            PathBuf::from("bench/results")
        }
    });
    let name = if o.smoke {
        format!("{stamp}-smoke")
    } else {
        stamp
    };
    let written = report::write(&out_dir, &name, &md, &csv)?;
    eprintln!("wrote {}", written.join(" and "));

    drop(cluster);
    let failed = results
        .iter()
        .any(|(_, cells)| cells.iter().any(Cell::failed))
        || sat.as_ref().is_some_and(|groups| {
            groups
                .iter()
                .any(|g| g.cells.iter().any(|(_, c)| c.failed()))
        })
        // (PgBouncer's flood run is a reference: only odissey's fails it.)
        || flood.is_some_and(|(_, outcome, _)| !outcome.errors.is_empty());
    if failed {
        eprintln!("odissey-bench: some runs failed (see Failures in the report)");
        Ok(ExitCode::from(1))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}
