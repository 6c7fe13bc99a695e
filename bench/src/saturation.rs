//! The saturation workload (`--only saturation`): `pgbench -S` (simple
//! protocol) with many more clients than server connections, through
//! odissey in transaction pooling at several worker counts (one odissey
//! process each) and through PgBouncer, the single-threaded reference, at
//! each (clients, pool size). It measures what spreading a saturated pool
//! over workers costs: CPU per transaction, the system thread's share of
//! it, and the messages and wake-ups between threads per transaction
//! (odissey's metrics endpoint), besides tps, latency and system calls.

use std::fs;
use std::path::Path;
use std::time::Instant;

use crate::procs::check_interrupted;
use crate::report::Cell;
use crate::{pgbench, Ctx, OdisseySetup, Target};

/// What the saturation workload runs.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    pub(crate) clients: Vec<usize>,
    pub(crate) pools: Vec<usize>,
    pub(crate) workers: Vec<usize>,
    pub(crate) rounds: usize,
}

impl Spec {
    /// Server connections open at once at most: each pool size's poolers
    /// run together.
    pub(crate) fn server_connections(&self) -> usize {
        self.pools.iter().max().copied().unwrap_or(0) * (self.workers.len() + 1)
    }
}

/// A column of the saturation tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SatTarget {
    /// odissey with this many workers.
    Odissey(usize),
    PgBouncer,
}

impl SatTarget {
    pub(crate) fn label(self) -> String {
        match self {
            Self::Odissey(w) => format!("odissey workers={w}"),
            Self::PgBouncer => "PgBouncer".into(),
        }
    }
}

/// All rounds at one (clients, pool size), one cell per target.
#[derive(Clone, Debug)]
pub(crate) struct Group {
    pub(crate) clients: usize,
    pub(crate) pool: usize,
    pub(crate) cells: Vec<(SatTarget, Cell)>,
}

impl Group {
    pub(crate) fn cell(&self, t: SatTarget) -> Option<&Cell> {
        self.cells.iter().find(|(k, _)| *k == t).map(|(_, c)| c)
    }
}

/// What the workload needs of the run.
pub(crate) struct Env<'a> {
    pub(crate) odissey: &'a Path,
    pub(crate) pgbouncer: Option<&'a Path>,
    pub(crate) pgbouncer_prepared: bool,
    pub(crate) scratch: &'a Path,
    pub(crate) pg_port: u16,
    pub(crate) ctx: &'a Ctx,
}

/// Runs every (clients, pool size), pool sizes outermost: for each, one
/// odissey per worker count (metrics on) and a PgBouncer are started, run
/// every client count, rounds alternating between them, and are stopped.
/// `Err` only when interrupted; failures are in the cells.
pub(crate) fn run(spec: &Spec, env: &Env) -> Result<Vec<Group>, String> {
    let mut groups = Vec::new();
    for &pool in &spec.pools {
        let mut targets: Vec<(SatTarget, Result<Target, String>)> = Vec::new();
        for &w in &spec.workers {
            eprintln!("starting odissey for saturation (workers = {w}, pool size {pool})...");
            let started = crate::start_odissey(
                env.odissey,
                env.scratch,
                env.pg_port,
                &format!("odissey-sat-p{pool}-w{w}"),
                &OdisseySetup {
                    workers: w,
                    pool_size: pool,
                    route_extra: "",
                    metrics: true,
                },
            );
            targets.push((SatTarget::Odissey(w), started));
            check_interrupted()?;
        }
        if let Some(bin) = env.pgbouncer {
            eprintln!("starting PgBouncer for saturation (pool size {pool})...");
            let dir = env.scratch.join(format!("pgbouncer-sat-p{pool}"));
            let started = fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))
                .and_then(|()| {
                    crate::start_pgbouncer(
                        bin,
                        &dir,
                        env.pg_port,
                        pool,
                        env.pgbouncer_prepared,
                        30_000,
                    )
                });
            targets.push((SatTarget::PgBouncer, started));
            check_interrupted()?;
        }
        for &clients in &spec.clients {
            let mut cells: Vec<(SatTarget, Cell)> = spec
                .workers
                .iter()
                .map(|&w| SatTarget::Odissey(w))
                .chain(std::iter::once(SatTarget::PgBouncer))
                .map(|t| (t, Cell::default()))
                .collect();
            for (t, cell) in &mut cells {
                match targets.iter().find(|(k, _)| *k == *t) {
                    None => cell.skipped = Some("PgBouncer absent".into()),
                    Some((_, Err(e))) => cell.errors.push(e.clone()),
                    Some((_, Ok(_))) => {}
                }
            }
            let pg_spec = pgbench::Spec {
                mode: "simple",
                select_only: true,
                reconnect: false,
                clients,
                jobs: crate::jobs(clients, "simple", env.ctx.cores),
                duration: env.ctx.duration,
            };
            for round in 1..=spec.rounds {
                for (t, cell) in &mut cells {
                    let Some((_, Ok(target))) = targets.iter_mut().find(|(k, _)| *k == *t) else {
                        continue;
                    };
                    check_interrupted()?;
                    let started = Instant::now();
                    let result = crate::measured_pgbench(target, &pg_spec, env.ctx);
                    check_interrupted()?;
                    let head = format!(
                        "[{round}/{}] saturation c={clients} pool={pool} {}",
                        spec.rounds,
                        t.label()
                    );
                    match result {
                        Ok(s) => {
                            eprintln!(
                                "{head}: {} ({:.1} s)",
                                crate::summary(&s),
                                started.elapsed().as_secs_f64()
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
            for (t, cell) in &mut cells {
                let Some((_, Ok(target))) = targets.iter_mut().find(|(k, _)| *k == *t) else {
                    continue;
                };
                let head = format!(
                    "[syscalls] saturation c={clients} pool={pool} {}",
                    t.label()
                );
                crate::syscall_pass(env.ctx, cell, &head, |ctx| {
                    crate::measured_pgbench(
                        target,
                        &pgbench::Spec {
                            duration: ctx.duration,
                            ..pg_spec.clone()
                        },
                        ctx,
                    )
                })?;
            }
            groups.push(Group {
                clients,
                pool,
                cells,
            });
        }
    }
    groups.sort_by_key(|g| (g.clients, g.pool));
    Ok(groups)
}
