//! The flood workload: admission control under a login flood, against
//! odissey and then, for reference, PgBouncer. A route whose `client_max`
//! is C (PgBouncer: `max_client_conn`) admits C clients, which run
//! `SELECT 1` (simple protocol) and time each transaction. After a warm-up
//! that opens the pool's servers, each round has two phases of
//! `--duration`: unloaded, then flooded, where F more clients keep trying
//! to log in, are refused and try again. Per phase: the admitted clients'
//! latency, the time of each refusal, and the CPU of the pooler and of
//! this process (the clients).

use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::pgbench::{DB, USER};
use crate::procs::{self, check_interrupted};
use crate::wire::{self, Refusal, Session};
use crate::{Kind, Target};

/// What the admitted clients run.
const SQL: &str = "SELECT 1";
/// A flood login with no answer within this is counted as hung.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Lead time to start a phase's threads before its clock starts.
const LEAD: Duration = Duration::from_millis(300);
/// Pause after each phase, so that its connections are gone before the next.
const GAP: Duration = Duration::from_millis(500);
/// Stack of each client thread: a socket, a buffer and a vector of times.
const STACK: usize = 256 * 1024;
/// Problems kept per phase (the counts are complete).
const KEEP: usize = 3;
/// The warm-up before the first round: every admitted client back to back,
/// so that the pool has opened its servers before anything is measured.
const WARMUP: Duration = Duration::from_secs(1);

/// What the flood workload runs.
#[derive(Clone, Debug)]
pub(crate) struct Spec {
    /// Admitted clients: the route's `client_max` (and `queue_max`).
    pub(crate) admitted: usize,
    /// Clients of the flood.
    pub(crate) flooders: usize,
    /// Login attempts per second of all flooders together; 0 = no cap (each
    /// tries again as soon as it is refused).
    pub(crate) flood_rate: u32,
    /// Transactions per second of all admitted clients together; 0 = each
    /// as fast as it can (a closed loop).
    pub(crate) tx_rate: u32,
    /// Length of each phase.
    pub(crate) duration: Duration,
    pub(crate) rounds: usize,
}

/// Order statistics of a set of durations, in ms (nearest rank).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Dist {
    pub(crate) n: u64,
    pub(crate) mean: f64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    /// How many were under 1 ms.
    pub(crate) under_1ms: u64,
}

impl Dist {
    /// From nanoseconds; `None` when there are none.
    fn of(mut ns: Vec<u64>) -> Option<Self> {
        if ns.is_empty() {
            return None;
        }
        ns.sort_unstable();
        let n = ns.len();
        let rank = |q: f64| ns[((n as f64 * q).ceil() as usize).clamp(1, n) - 1] as f64 / 1e6;
        Some(Self {
            n: n as u64,
            mean: ns.iter().sum::<u64>() as f64 / n as f64 / 1e6,
            p50: rank(0.50),
            p99: rank(0.99),
            max: ns[n - 1] as f64 / 1e6,
            under_1ms: ns.partition_point(|&v| v < 1_000_000) as u64,
        })
    }
}

/// What one phase measured.
#[derive(Clone, Debug, Default)]
pub(crate) struct Phase {
    pub(crate) round: usize,
    pub(crate) flooded: bool,
    /// Wall time from the phase's start until its last client thread ended.
    pub(crate) seconds: f64,
    /// Admitted clients at the start of the phase.
    pub(crate) admitted: usize,
    /// The admitted clients' transactions that worked.
    pub(crate) latency: Option<Dist>,
    /// Admitted clients' queries that failed (an error or a lost connection).
    pub(crate) admitted_errors: u64,
    /// Flood logins tried, and how they ended.
    pub(crate) attempts: u64,
    pub(crate) refused: u64,
    pub(crate) not_refused: u64,
    pub(crate) other: u64,
    /// Refusal times: from the start of connect(), and from the send of the
    /// startup packet, until the ErrorResponse was read.
    pub(crate) refusal: Option<Dist>,
    pub(crate) refusal_from_startup: Option<Dist>,
    /// The text of the first refusal (which limit answered).
    pub(crate) refusal_text: Option<String>,
    /// CPU seconds (user + system) over the phase: odissey, and this
    /// process (the admitted clients and the flood).
    pub(crate) odissey_cpu: f64,
    pub(crate) bench_cpu: f64,
    /// The whole machine's busy share over the phase, in % of all cores
    /// (the other processes of the box included).
    pub(crate) box_busy_pct: f64,
    pub(crate) rss_mb: f64,
    /// The first few problems: admitted-client errors, flood logins that
    /// were not refused, other outcomes.
    pub(crate) problems: Vec<String>,
}

impl Phase {
    pub(crate) fn name(&self) -> &'static str {
        if self.flooded {
            "flooded"
        } else {
            "unloaded"
        }
    }

    /// Admitted transactions per second.
    pub(crate) fn tps(&self) -> f64 {
        self.latency.map_or(0, |d| d.n) as f64 / self.seconds
    }

    /// CPU over the phase in % of one core: odissey, and this process.
    pub(crate) fn cpu_pct(&self) -> (f64, f64) {
        (
            100.0 * self.odissey_cpu / self.seconds,
            100.0 * self.bench_cpu / self.seconds,
        )
    }

    /// Whether the phase broke a rule: an admitted client failed, or a
    /// flood login ended other than refused with 53300.
    pub(crate) fn broken(&self) -> bool {
        self.admitted_errors > 0 || self.not_refused > 0 || self.other > 0
    }

    fn summary(&self) -> String {
        let (cpu, bench) = self.cpu_pct();
        let mut s = format!("{} admitted: {:.0} tx/s", self.admitted, self.tps());
        if let Some(d) = self.latency {
            s += &format!(
                ", p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms",
                d.p50, d.p99, d.max
            );
        }
        if self.admitted_errors > 0 {
            s += &format!(", {} ADMITTED ERRORS", self.admitted_errors);
        }
        if self.flooded {
            s += &format!(
                "; flood: {:.0} logins/s, {:.0} refused/s",
                self.attempts as f64 / self.seconds,
                self.refused as f64 / self.seconds
            );
            if let Some(d) = self.refusal {
                s += &format!(
                    ", refusal p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms",
                    d.p50, d.p99, d.max
                );
            }
            if self.not_refused + self.other > 0 {
                s += &format!(", {} NOT REFUSED, {} OTHER", self.not_refused, self.other);
            }
        }
        s + &format!(
            "; odissey CPU {cpu:.0} %, bench CPU {bench:.0} %, machine {:.0} % busy",
            self.box_busy_pct
        )
    }
}

/// Every phase that ran, and what went wrong.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) phases: Vec<Phase>,
    /// Setup failures, failed phases, and the problems of broken phases.
    pub(crate) errors: Vec<String>,
}

/// The SQLSTATEs a pooler refuses a login beyond its limit with.
fn refusal_codes(kind: Kind) -> &'static [&'static str] {
    match kind {
        // "no more connections allowed (max_client_conn)".
        Kind::PgBouncer => &["53300", "08P01"],
        _ => &["53300"],
    }
}

/// Logs in the admitted clients, then runs the rounds: unloaded, flooded,
/// unloaded, flooded... against odissey at `target`, whose route for
/// trust_user@test has `client_max` = `spec.admitted`.
pub(crate) fn run(target: &mut Target, spec: &Spec) -> Outcome {
    let mut out = Outcome::default();
    let mut sessions = Vec::with_capacity(spec.admitted);
    for i in 0..spec.admitted {
        match Session::login(target.port, USER, DB, Duration::from_secs(10)) {
            Ok(s) => sessions.push(s),
            Err(e) => {
                out.errors.push(format!(
                    "admitted client {} of {} could not log in: {e}",
                    i + 1,
                    spec.admitted
                ));
                sessions.into_iter().for_each(Session::close);
                return out;
            }
        }
    }
    // Warm-up (not reported): the pool opens its servers here, not in the
    // first measured phase.
    match phase(target, sessions, spec, false, WARMUP, 0) {
        Ok((p, left)) if !p.broken() => sessions = left,
        Ok((p, left)) => {
            out.errors
                .push(format!("warm-up: {}", p.problems.join("\n")));
            left.into_iter().for_each(Session::close);
            return out;
        }
        Err(e) => {
            out.errors.push(format!("warm-up: {e}"));
            return out;
        }
    }
    thread::sleep(GAP);
    for round in 1..=spec.rounds {
        for flooded in [false, true] {
            let head = format!(
                "[{round}/{}] flood c={} {}",
                spec.rounds,
                spec.admitted,
                if flooded { "flooded" } else { "unloaded" }
            );
            if let Err(e) = check_interrupted() {
                out.errors.push(e);
                return out;
            }
            let t = Instant::now();
            let taken = std::mem::take(&mut sessions);
            match phase(target, taken, spec, flooded, spec.duration, spec.tx_rate) {
                Ok((mut p, left)) => {
                    p.round = round;
                    eprintln!(
                        "{head}: {} ({:.1} s)",
                        p.summary(),
                        t.elapsed().as_secs_f64()
                    );
                    if p.broken() {
                        out.errors.push(format!(
                            "round {round}, {} phase: {} admitted-client errors, {} flood \
                             logins admitted, {} other flood outcomes; first:\n{}",
                            p.name(),
                            p.admitted_errors,
                            p.not_refused,
                            p.other,
                            p.problems.join("\n")
                        ));
                    }
                    out.phases.push(p);
                    sessions = left;
                }
                Err(e) => {
                    eprintln!("{head}: FAILED\n{e}");
                    out.errors.push(format!("round {round}: {e}"));
                    return out;
                }
            }
            thread::sleep(GAP);
        }
    }
    sessions.into_iter().for_each(Session::close);
    out
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

fn spawn<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, String> {
    thread::Builder::new()
        .name(name)
        .stack_size(STACK)
        .spawn(f)
        .map_err(|e| format!("cannot start a client thread: {e}"))
}

/// One phase: the admitted clients at `tx_rate` (0 = back to back), and
/// in a flooded phase the flood, from `LEAD` from now for `duration`. Gives
/// back the sessions still alive.
fn phase(
    target: &mut Target,
    sessions: Vec<Session>,
    spec: &Spec,
    flooded: bool,
    duration: Duration,
    tx_rate: u32,
) -> Result<(Phase, Vec<Session>), String> {
    let pid = target.pid()?.ok_or("flood: the target is not a pooler")?;
    let port = target.port;
    let codes = refusal_codes(target.kind);
    let start = Instant::now() + LEAD;
    let end = start + duration;
    let mut p = Phase {
        flooded,
        admitted: sessions.len(),
        ..Phase::default()
    };

    // Admitted clients: at tx_rate in all, each its share, staggered.
    let c = sessions.len().max(1);
    let interval = (tx_rate > 0).then(|| Duration::from_secs_f64(c as f64 / f64::from(tx_rate)));
    let mut admitted = Vec::with_capacity(sessions.len());
    for (i, s) in sessions.into_iter().enumerate() {
        let offset = interval.map_or(Duration::ZERO, |iv| iv.mul_f64(i as f64 / c as f64));
        admitted.push(spawn(format!("admitted-{i}"), move || {
            admitted_client(s, start + offset, end, interval)
        })?);
    }
    // The flood: at flood_rate in all, each flooder its share, staggered.
    let mut flood = Vec::new();
    if flooded {
        let f = spec.flooders.max(1);
        let period = (spec.flood_rate > 0)
            .then(|| Duration::from_secs_f64(f as f64 / f64::from(spec.flood_rate)));
        for i in 0..f {
            let offset = period.map_or(Duration::ZERO, |pe| pe.mul_f64(i as f64 / f as f64));
            flood.push(spawn(format!("flood-{i}"), move || {
                flooder(port, codes, start + offset, end, period)
            })?);
        }
    }

    sleep_until(start);
    let me = std::process::id();
    let (cpu0, me0) = (procs::cpu_seconds(pid)?, procs::cpu_seconds(me)?);
    let box0 = procs::box_ticks()?;
    let mut lat = Vec::new();
    let mut left = Vec::new();
    for h in admitted {
        let r = h
            .join()
            .map_err(|_| "an admitted client's thread panicked")?;
        lat.extend(r.lat);
        p.admitted_errors += r.errors;
        keep(&mut p.problems, r.problems);
        left.extend(r.session);
    }
    let (mut from_connect, mut from_startup) = (Vec::new(), Vec::new());
    for h in flood {
        let r = h.join().map_err(|_| "a flood client's thread panicked")?;
        p.attempts += r.attempts;
        p.refused += r.from_connect.len() as u64;
        p.not_refused += r.not_refused;
        p.other += r.other;
        from_connect.extend(r.from_connect);
        from_startup.extend(r.from_startup);
        if p.refusal_text.is_none() {
            p.refusal_text = r.text;
        }
        keep(&mut p.problems, r.problems);
    }
    p.seconds = start.elapsed().as_secs_f64();
    p.odissey_cpu = procs::cpu_seconds(pid)? - cpu0;
    p.bench_cpu = procs::cpu_seconds(me)? - me0;
    let box1 = procs::box_ticks()?;
    p.box_busy_pct = 100.0 * (box1.0 - box0.0) as f64 / (box1.1 - box0.1).max(1) as f64;
    target.pid()?;
    p.rss_mb = procs::rss_kb(pid)? as f64 / 1024.0;
    p.latency = Dist::of(lat);
    p.refusal = Dist::of(from_connect);
    p.refusal_from_startup = Dist::of(from_startup);
    check_interrupted()?;
    Ok((p, left))
}

/// Adds `more` to `problems`, up to `KEEP` different ones.
fn keep(problems: &mut Vec<String>, more: Vec<String>) {
    for p in more {
        if problems.len() < KEEP && !problems.contains(&p) {
            problems.push(p);
        }
    }
}

/// What one admitted client did in a phase.
struct AdmittedRun {
    /// The session, unless its connection failed.
    session: Option<Session>,
    /// Latency of each transaction that worked, ns: from just before the
    /// Query is written until ReadyForQuery is read.
    lat: Vec<u64>,
    errors: u64,
    problems: Vec<String>,
}

/// Runs `SELECT 1` from `start` until `end`: back to back, or one every
/// `interval` (a late one starts at once; missed slots are not made up).
fn admitted_client(
    mut s: Session,
    start: Instant,
    end: Instant,
    interval: Option<Duration>,
) -> AdmittedRun {
    let query = wire::query_message(SQL);
    let mut r = AdmittedRun {
        session: None,
        lat: Vec::new(),
        errors: 0,
        problems: Vec::new(),
    };
    let mut next = start;
    loop {
        sleep_until(next.min(end));
        let t = Instant::now();
        if t >= end || procs::interrupted() {
            break;
        }
        match s.query(&query) {
            Ok(None) => r.lat.push(t.elapsed().as_nanos() as u64),
            Ok(Some(e)) => {
                r.errors += 1;
                keep(&mut r.problems, vec![format!("admitted client: {e}")]);
            }
            Err(e) => {
                r.errors += 1;
                keep(&mut r.problems, vec![format!("admitted client: {e}")]);
                return r;
            }
        }
        if let Some(iv) = interval {
            next = (next + iv).max(Instant::now());
        }
    }
    r.session = Some(s);
    r
}

/// What one flooder did in a phase.
#[derive(Default)]
struct FloodRun {
    attempts: u64,
    /// Refusal times, ns.
    from_connect: Vec<u64>,
    from_startup: Vec<u64>,
    not_refused: u64,
    other: u64,
    text: Option<String>,
    problems: Vec<String>,
}

/// Tries to log in from `start` until `end`, again as soon as refused, or
/// at most one attempt every `period`.
fn flooder(
    port: u16,
    codes: &'static [&'static str],
    start: Instant,
    end: Instant,
    period: Option<Duration>,
) -> FloodRun {
    let mut r = FloodRun::default();
    let mut next = start;
    loop {
        sleep_until(next.min(end));
        if Instant::now() >= end || procs::interrupted() {
            break;
        }
        r.attempts += 1;
        match wire::refused_login(port, USER, DB, ATTEMPT_TIMEOUT, codes) {
            Refusal::Refused {
                from_connect,
                from_startup,
                text,
            } => {
                r.from_connect.push(from_connect.as_nanos() as u64);
                r.from_startup.push(from_startup.as_nanos() as u64);
                r.text.get_or_insert(text);
            }
            Refusal::Admitted => {
                r.not_refused += 1;
                keep(
                    &mut r.problems,
                    vec!["flood login admitted (client_max not enforced)".into()],
                );
            }
            Refusal::Other(e) => {
                r.other += 1;
                keep(&mut r.problems, vec![format!("flood login: {e}")]);
            }
        }
        if let Some(pe) = period {
            next = (next + pe).max(Instant::now());
        }
    }
    r
}
