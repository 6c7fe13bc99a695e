//! odissey-bench: pgbench-driven comparison of odissey, PgBouncer and direct
//! PostgreSQL on a throwaway cluster. Run it through `bench/run`; see the
//! README's "Benchmarks" section and `--help`.

mod flood;
mod perf;
mod pgbench;
mod procs;
mod report;
mod saturation;
mod scrape;
mod wire;

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use odissey_harness::PgCluster;
use pgbench::{DB, USER};
use procs::{check_interrupted, ChildGuard};
use report::{Cell, Sample};

const USAGE: &str = "\
usage: bench/run [options]      (or: cargo run --release -p odissey-bench -- [options])

  --workers N         odissey worker threads (default 1)
  --clients LIST      pgbench clients for the select-only workloads (default 32,256)
  --duration SECS     seconds per pgbench run (default 10)
  --rounds R          rounds; targets alternate A B C A B C..., medians reported (default 3)
  --pool-size N       server connections per pool, both poolers (default 16)
  --scale S           pgbench -i scale (default 10)
  --idle K            idle clients for the idle workload (default 10000)
  --large-rows N      rows of 1000 bytes for the large-result workload (default 100000)
  --odissey PATH      odissey binary (default: `odissey` next to this binary)
  --pgbouncer PATH    PgBouncer binary (default: pgbouncer on PATH, else /usr/sbin/pgbouncer;
                      without one its columns are marked absent)
  --no-pgbouncer      leave PgBouncer out
  --out DIR           where <UTC timestamp>.md and .csv go (default bench/results)
  --only LIST         workloads to run: select-simple, select-extended, select-prepared,
                      tpcb, churn, idle, large-result (or `select` for all three selects),
                      flood, saturation (the last not in the default set)
  --flood-clients C   flood: admitted clients, the route's client_max and queue_max
                      (default 2 x --pool-size)
  --flooders F        flood: clients of the flood, each retrying once refused
                      (default 10 x C)
  --flood-rate N      flood: login attempts per second of all flooders together
                      (default 1000; 0 = no cap)
  --flood-tps N       flood: SELECT 1 per second of all admitted clients together
                      (default 2000; 0 = back to back)
  --sat-clients LIST  saturation: pgbench -S clients (default 64,512)
  --sat-pools LIST    saturation: pool sizes, both poolers (default 8,32)
  --sat-workers LIST  saturation: odissey worker counts, one odissey each (default 1,2,4)
  --no-perf           no `perf stat` syscall counts (the syscalls/tx columns read absent)
  --perf-inline       count syscalls during the measured runs (perf then slows them: its
                      cost is in their CPU and tps) instead of in one more run of
                      min(3, --duration) s per pooler cell after its rounds (smoke: inline)
  --smoke             CI mode: 1 round of 2 s, 8 clients, 200 idle clients, 5 MB result,
                      scale 1, one small saturation row; exits non-zero only when something
                      is broken
  -h, --help          this text

PostgreSQL binaries come from $PG_BINDIR, then pg_ctl on $PATH, then
/usr/lib/postgresql/*/bin (pgbench: the same directory, else $PATH).";

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

struct Options {
    workers: usize,
    clients: Vec<usize>,
    duration: u64,
    rounds: usize,
    pool_size: usize,
    scale: u32,
    idle: usize,
    large_rows: usize,
    odissey: Option<PathBuf>,
    pgbouncer: Option<PathBuf>,
    no_pgbouncer: bool,
    out: Option<PathBuf>,
    only: Option<Vec<String>>,
    smoke: bool,
    flood_clients: Option<usize>,
    flooders: Option<usize>,
    flood_rate: u32,
    flood_tps: u32,
    sat_clients: Vec<usize>,
    sat_pools: Vec<usize>,
    sat_workers: Vec<usize>,
    no_perf: bool,
    perf_inline: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut o = Options {
        workers: 1,
        clients: vec![32, 256],
        duration: 10,
        rounds: 3,
        pool_size: 16,
        scale: 10,
        idle: 10_000,
        large_rows: 100_000,
        odissey: None,
        pgbouncer: None,
        no_pgbouncer: false,
        out: None,
        only: None,
        smoke: false,
        flood_clients: None,
        flooders: None,
        flood_rate: 1000,
        flood_tps: 2000,
        sat_clients: vec![64, 512],
        sat_pools: vec![8, 32],
        sat_workers: vec![1, 2, 4],
        no_perf: false,
        perf_inline: false,
    };
    let (mut clients, mut duration, mut rounds, mut scale, mut idle, mut large) =
        (None, None, None, None, None, None);
    let (mut sat_clients, mut sat_pools, mut sat_workers) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{key} needs a value"))
        };
        fn n<T: std::str::FromStr>(key: &str, v: String) -> Result<T, String> {
            v.trim()
                .parse()
                .map_err(|_| format!("{key}: not a number: {v}"))
        }
        fn list(key: &str, v: String) -> Result<Vec<usize>, String> {
            let v: Vec<usize> = v
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| n(key, s.to_owned()))
                .collect::<Result<_, _>>()?;
            if v.is_empty() || v.contains(&0) {
                return Err(format!(
                    "{key} needs a list of positive numbers, e.g. 1,2,4"
                ));
            }
            Ok(v)
        }
        match key.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--workers" => o.workers = n(&key, value()?)?,
            "--clients" => {
                clients = Some(
                    value()?
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(|s| n(&key, s.to_owned()))
                        .collect::<Result<Vec<usize>, _>>()?,
                )
            }
            "--duration" => duration = Some(n(&key, value()?)?),
            "--rounds" => rounds = Some(n(&key, value()?)?),
            "--pool-size" => o.pool_size = n(&key, value()?)?,
            "--scale" => scale = Some(n(&key, value()?)?),
            "--idle" => idle = Some(n(&key, value()?)?),
            "--large-rows" => large = Some(n(&key, value()?)?),
            "--odissey" => o.odissey = Some(value()?.into()),
            "--pgbouncer" => o.pgbouncer = Some(value()?.into()),
            "--no-pgbouncer" => o.no_pgbouncer = true,
            "--out" => o.out = Some(value()?.into()),
            "--only" => {
                o.only = Some(
                    value()?
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            "--smoke" => o.smoke = true,
            "--flood-clients" => o.flood_clients = Some(n(&key, value()?)?),
            "--flooders" => o.flooders = Some(n(&key, value()?)?),
            "--flood-rate" => o.flood_rate = n(&key, value()?)?,
            "--flood-tps" => o.flood_tps = n(&key, value()?)?,
            "--sat-clients" => sat_clients = Some(list(&key, value()?)?),
            "--sat-pools" => sat_pools = Some(list(&key, value()?)?),
            "--sat-workers" => sat_workers = Some(list(&key, value()?)?),
            "--no-perf" => o.no_perf = true,
            "--perf-inline" => o.perf_inline = true,
            _ => return Err(format!("unknown option {arg}\n\n{USAGE}")),
        }
    }
    if o.smoke {
        (
            o.clients,
            o.duration,
            o.rounds,
            o.scale,
            o.idle,
            o.large_rows,
        ) = (vec![8], 2, 1, 1, 200, 5_000);
        (o.sat_clients, o.sat_pools, o.sat_workers) = (vec![8], vec![4], vec![2]);
        o.perf_inline = true;
    }
    o.sat_clients = sat_clients.unwrap_or(o.sat_clients);
    o.sat_pools = sat_pools.unwrap_or(o.sat_pools);
    o.sat_workers = sat_workers.unwrap_or(o.sat_workers);
    o.clients = clients.unwrap_or(o.clients);
    o.duration = duration.unwrap_or(o.duration);
    o.rounds = rounds.unwrap_or(o.rounds);
    o.scale = scale.unwrap_or(o.scale);
    o.idle = idle.unwrap_or(o.idle);
    o.large_rows = large.unwrap_or(o.large_rows);
    if o.workers == 0 || o.rounds == 0 || o.duration == 0 || o.pool_size == 0 || o.scale == 0 {
        return Err("--workers, --rounds, --duration, --pool-size and --scale must be ≥ 1".into());
    }
    if o.flood_clients == Some(0) || o.flooders == Some(0) {
        return Err("--flood-clients and --flooders must be ≥ 1".into());
    }
    if o.clients.is_empty() || o.clients.contains(&0) {
        return Err("--clients needs a list of positive numbers, e.g. 32,256".into());
    }
    if let Some(only) = &o.only {
        let known: Vec<String> = WORKLOADS.iter().map(|w| w.name()).collect();
        for w in only {
            if w != "select" && w != FLOOD && w != SATURATION && !known.contains(w) {
                return Err(format!(
                    "--only: unknown workload {w} (known: select, {}, {FLOOD}, {SATURATION})",
                    known.join(", ")
                ));
            }
        }
    }
    Ok(o)
}

/// A target: direct PostgreSQL or a pooler process.
struct Target {
    kind: Kind,
    port: u16,
    process: Option<ChildGuard>,
    /// odissey's metrics endpoint (127.0.0.1), where the config enabled it.
    metrics: Option<u16>,
}

impl Target {
    /// The pooler's pid, after checking that it still runs.
    fn pid(&mut self) -> Result<Option<u32>, String> {
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
fn pgbouncer_version(line: &str) -> Option<(u32, u32)> {
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
const PERF_PASS_SECS: u64 = 3;

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

fn run_one(row: &Row, target: &mut Target, ctx: &Ctx) -> Result<Sample, String> {
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
