//! The command line: `--help`'s text and the options it parses into.

use std::path::PathBuf;

use crate::{FLOOD, SATURATION, WORKLOADS};

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

pub(crate) struct Options {
    pub(crate) workers: usize,
    pub(crate) clients: Vec<usize>,
    pub(crate) duration: u64,
    pub(crate) rounds: usize,
    pub(crate) pool_size: usize,
    pub(crate) scale: u32,
    pub(crate) idle: usize,
    pub(crate) large_rows: usize,
    pub(crate) odissey: Option<PathBuf>,
    pub(crate) pgbouncer: Option<PathBuf>,
    pub(crate) no_pgbouncer: bool,
    pub(crate) out: Option<PathBuf>,
    pub(crate) only: Option<Vec<String>>,
    pub(crate) smoke: bool,
    pub(crate) flood_clients: Option<usize>,
    pub(crate) flooders: Option<usize>,
    pub(crate) flood_rate: u32,
    pub(crate) flood_tps: u32,
    pub(crate) sat_clients: Vec<usize>,
    pub(crate) sat_pools: Vec<usize>,
    pub(crate) sat_workers: Vec<usize>,
    pub(crate) no_perf: bool,
    pub(crate) perf_inline: bool,
}

pub(crate) fn parse_options() -> Result<Options, String> {
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
