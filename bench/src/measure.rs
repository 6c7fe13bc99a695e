//! Measuring one run against a target: pgbench with the pooler's CPU, RSS,
//! system calls and counters around it, the other workloads of the main
//! table, and the extra run under perf.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::pgbench::{self, DB, USER};
use crate::procs::{self, check_interrupted};
use crate::report::{Cell, Sample};
use crate::targets::Target;
use crate::{perf, scrape, wire, Kind, Row, Workload};

#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) logs: PathBuf,
    pub(crate) cores: usize,
    pub(crate) duration: u64,
    pub(crate) idle: usize,
    /// pgbench clients for TPC-B, churn and the idle workload's load.
    pub(crate) fixed_clients: usize,
    /// perf, where it can count system calls here.
    pub(crate) perf: Option<PathBuf>,
    /// Count them during the measured runs themselves, instead of in one
    /// more run per cell ([`syscall_pass`]).
    pub(crate) perf_inline: bool,
}

/// Length of the extra run under perf, at most.
pub(crate) const PERF_PASS_SECS: u64 = 3;

/// The syscalls/tx of `cell`, from one more run (`run`, at most
/// [`PERF_PASS_SECS`]) with perf counting alongside, after its rounds.
/// perf's tracepoint costs the pooler CPU on every system call (about a µs
/// each on the development machine: 13 % more CPU per select-only
/// transaction, and as much less tps),
/// so the measured rounds run without it and only the count is kept from
/// this run. Nothing to do without perf, with `perf_inline` (the rounds
/// counted), or for a cell that did not run.
pub(crate) fn syscall_pass(
    ctx: &Ctx,
    cell: &mut Cell,
    head: &str,
    run: impl FnOnce(&Ctx) -> Result<Sample, String>,
) -> Result<(), String> {
    if ctx.perf.is_none() || ctx.perf_inline || cell.skipped.is_some() || cell.samples.is_empty() {
        return Ok(());
    }
    check_interrupted()?;
    let pass = Ctx {
        duration: ctx.duration.min(PERF_PASS_SECS),
        perf_inline: true,
        ..ctx.clone()
    };
    let t = Instant::now();
    let result = run(&pass);
    check_interrupted()?;
    match result {
        Ok(s) => {
            eprintln!(
                "{head}: {} syscalls/tx ({:.1} s)",
                s.syscalls_tx
                    .map_or_else(|| "–".into(), |v| format!("{v:.2}")),
                t.elapsed().as_secs_f64()
            );
            cell.syscalls_tx = s.syscalls_tx;
        }
        Err(e) => {
            eprintln!("{head}: FAILED\n{e}");
            cell.errors
                .push(format!("the extra run under perf (syscalls/tx): {e}"));
        }
    }
    Ok(())
}

/// pgbench `-j`: at most 2·cores threads; for `-M prepared` one thread per
/// client up to 64, because pgbench prepares synchronously per client and a
/// thread blocked there can wait on servers held by its own clients (a
/// transaction pooler then deadlocks).
pub(crate) fn jobs(clients: usize, mode: &str, cores: usize) -> usize {
    let cap = if mode == "prepared" { 64 } else { 2 * cores };
    clients.min(cap.max(1))
}

/// Runs pgbench, with the pooler's CPU, RSS and (where perf can count
/// them) system calls measured around it; for odissey also its system
/// thread's CPU and, where the target serves metrics, its cross-thread
/// counters.
pub(crate) fn measured_pgbench(
    target: &mut Target,
    spec: &pgbench::Spec,
    ctx: &Ctx,
) -> Result<Sample, String> {
    let odissey = target.kind == Kind::Odissey;
    let pid = target.pid()?;
    let scrape = |port: Option<u16>| {
        port.and_then(|p| match scrape::thread_counters(p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("    metrics: {e}");
                None
            }
        })
    };
    let metrics0 = scrape(target.metrics);
    let threads0 = pid.filter(|_| odissey).map(procs::thread_cpu).transpose()?;
    let cpu0 = pid.map(procs::cpu_seconds).transpose()?;
    let counting = pid
        .zip(ctx.perf.as_deref().filter(|_| ctx.perf_inline))
        .map(|(pid, bin)| perf::start(bin, pid, spec.duration));
    let m = pgbench::run(target.port, spec, &ctx.logs);
    let count = counting.map(perf::Counting::finish);
    let m = m?;
    let pid = target.pid()?;
    let cpu1 = pid.map(procs::cpu_seconds).transpose()?;
    let threads1 = pid.filter(|_| odissey).map(procs::thread_cpu).transpose()?;
    let metrics1 = scrape(target.metrics);
    let rss = pid.map(procs::rss_kb).transpose()?;
    let tx = m.transactions as f64;
    let cpu = cpu0.zip(cpu1).map(|(a, b)| b - a);
    let syscalls_tx = match count {
        Some(Ok(c)) => match m.ended_between(c.from, c.to) {
            0 => None,
            n => Some(c.syscalls as f64 / n as f64),
        },
        Some(Err(e)) => {
            eprintln!(
                "    syscalls not counted: {}",
                e.lines().next().unwrap_or("")
            );
            None
        }
        None => None,
    };
    let system_cpu_pct = threads0
        .zip(threads1)
        .and_then(|(a, b)| procs::thread_cpu_delta(&a, &b, scrape::SYSTEM_THREAD))
        .zip(cpu)
        .and_then(|(sys, all)| (all > 0.0).then(|| 100.0 * sys / all));
    let per_tx = |f: fn(&scrape::ThreadCounters) -> Option<f64>| {
        let (a, b) = (metrics0.as_ref()?, metrics1.as_ref()?);
        scrape::delta(f(a), f(b)).map(|d| d / tx)
    };
    Ok(Sample {
        tps: Some(m.tps),
        lat_ms: Some(m.lat_avg_ms),
        p50_ms: m.p50_ms,
        p99_ms: m.p99_ms,
        cpu_us_tx: cpu.map(|c| c * 1e6 / tx),
        syscalls_tx,
        system_cpu_pct,
        messages_tx: per_tx(|c| c.messages),
        wakeups_tx: per_tx(|c| c.wakeups),
        system_messages_tx: per_tx(|c| c.system_messages),
        rss_mb: rss.map(|kb| kb as f64 / 1024.0),
        ..Sample::default()
    })
}

pub(crate) fn run_one(row: &Row, target: &mut Target, ctx: &Ctx) -> Result<Sample, String> {
    match row.workload {
        Workload::Select(mode) => {
            let spec = pgbench::Spec {
                mode,
                select_only: true,
                reconnect: false,
                clients: row.clients,
                jobs: jobs(row.clients, mode, ctx.cores),
                duration: ctx.duration,
            };
            measured_pgbench(target, &spec, ctx)
        }
        Workload::Tpcb | Workload::Churn => {
            let churn = row.workload == Workload::Churn;
            let spec = pgbench::Spec {
                mode: "simple",
                select_only: churn,
                reconnect: churn,
                clients: row.clients,
                jobs: jobs(row.clients, "simple", ctx.cores),
                duration: ctx.duration,
            };
            measured_pgbench(target, &spec, ctx)
        }
        Workload::Idle => {
            let pid = target.pid()?.ok_or("idle: not a pooler")?;
            let before = procs::rss_kb(pid)?;
            let t = Instant::now();
            let conns = wire::open_idle(target.port, USER, DB, ctx.idle, Duration::from_secs(20))?;
            let opened_in = t.elapsed();
            thread::sleep(Duration::from_millis(500));
            let held = procs::rss_kb(pid)?;
            eprintln!(
                "    {} idle clients opened in {:.2} s; RSS {:.1} → {:.1} MB",
                conns.len(),
                opened_in.as_secs_f64(),
                before as f64 / 1024.0,
                held as f64 / 1024.0
            );
            // As many connections again that send nothing, beside the idle
            // clients (so the allocator cannot hand them memory the idle
            // clients gave back): what a silent flood costs before
            // auth_timeout (client_login_timeout) drops it.
            // (Half as many: the descriptors of both sets must fit this
            // process's limit.)
            let silent_k = (ctx.idle / 2).max(1);
            let silent = wire::open_silent(target.port, silent_k, Duration::from_secs(20))?;
            thread::sleep(Duration::from_millis(500));
            let with_silent = procs::rss_kb(pid)?;
            eprintln!(
                "    {} silent connections: RSS {:.1} → {:.1} MB",
                silent.len(),
                held as f64 / 1024.0,
                with_silent as f64 / 1024.0
            );
            for c in silent {
                wire::close(c);
            }
            let spec = pgbench::Spec {
                mode: "simple",
                select_only: true,
                reconnect: false,
                clients: ctx.fixed_clients,
                jobs: jobs(ctx.fixed_clients, "simple", ctx.cores),
                duration: ctx.duration,
            };
            let result = measured_pgbench(target, &spec, ctx);
            for c in conns {
                wire::close(c);
            }
            thread::sleep(Duration::from_millis(500));
            let mut sample = result?;
            sample.idle_bytes = Some((held as f64 - before as f64) * 1024.0 / ctx.idle as f64);
            sample.silent_bytes =
                Some((with_silent as f64 - held as f64) * 1024.0 / silent_k as f64);
            sample.rss_mb = Some(held as f64 / 1024.0);
            Ok(sample)
        }
        Workload::Large => {
            let pid = target.pid()?.ok_or("large result: not a pooler")?;
            let before = procs::rss_kb(pid)?;
            let hwm_reset = procs::reset_hwm(pid);
            let stop = Arc::new(AtomicBool::new(false));
            let sampler = {
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    let mut peak = 0;
                    while !stop.load(Ordering::Relaxed) {
                        peak = peak.max(procs::rss_kb(pid).unwrap_or(0));
                        thread::sleep(Duration::from_millis(20));
                    }
                    peak
                })
            };
            let sql = format!(
                "select repeat('x', 1000) from generate_series(1, {})",
                row.clients
            );
            let read = wire::slow_read(
                target.port,
                USER,
                DB,
                &sql,
                64 * 1024,
                Duration::from_millis(2),
                Duration::from_secs(600),
            );
            stop.store(true, Ordering::Relaxed);
            let mut peak = sampler.join().unwrap_or(0);
            if hwm_reset {
                peak = peak.max(procs::status_kb(pid, "VmHWM").unwrap_or(0));
            }
            let read = read?;
            if read.rows != row.clients as u64 {
                return Err(format!("read {} rows, expected {}", read.rows, row.clients));
            }
            eprintln!(
                "    read {:.1} MB in {:.2} s; RSS before {:.1} MB, peak {:.1} MB",
                read.bytes as f64 / 1e6,
                read.elapsed.as_secs_f64(),
                before as f64 / 1024.0,
                peak as f64 / 1024.0
            );
            Ok(Sample {
                peak_mb: Some(peak.saturating_sub(before) as f64 / 1024.0),
                rss_mb: Some(peak as f64 / 1024.0),
                ..Sample::default()
            })
        }
    }
}

pub(crate) fn summary(s: &Sample) -> String {
    let mut parts = Vec::new();
    if let Some(v) = s.tps {
        parts.push(format!("{v:.0} tps"));
    }
    if let Some(v) = s.lat_ms {
        parts.push(format!("lat {v:.2} ms"));
    }
    if let Some(v) = s.p99_ms {
        parts.push(format!("p99 {v:.2} ms"));
    }
    if let Some(v) = s.cpu_us_tx {
        parts.push(format!("{v:.1} CPU µs/tx"));
    }
    if let Some(v) = s.system_cpu_pct {
        parts.push(format!("system thread {v:.1} % of it"));
    }
    if let Some(v) = s.messages_tx {
        parts.push(format!("{v:.3} messages/tx"));
    }
    if let Some(v) = s.syscalls_tx {
        parts.push(format!("{v:.2} syscalls/tx"));
    }
    if let Some(v) = s.idle_bytes {
        parts.push(format!("{v:.0} B/idle client"));
    }
    if let Some(v) = s.silent_bytes {
        parts.push(format!("{v:.0} B/silent connection"));
    }
    if let Some(v) = s.peak_mb {
        parts.push(format!("peak +{v:.1} MB"));
    } else if let Some(v) = s.rss_mb {
        parts.push(format!("RSS {v:.1} MB"));
    }
    parts.join(", ")
}
