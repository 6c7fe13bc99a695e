//! What the router and the workers share about each pool, as atomics, so
//! that the hot path needs neither a lock nor a message: `PoolShared`
//! (found through the `Registry`), and how a worker that frees a server
//! decides whether another worker should have it (`PoolShared::gives_way`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::router::{PoolKey, WorkerId};

/// Another worker's first queued client gets the server a worker frees,
/// regardless of shares, once it has waited more than twice as long as
/// this worker's first plus this (see `gives_way`): the bound on how
/// unfair the split between workers may be to a client, and what lets a
/// worker whose share is a fraction of a server take turns with the others.
/// Relative, because under a long queue the first clients' waits differ
/// between workers by more than any fixed margin (at 512 clients on 32
/// servers they wait ~40 ms, give or take tens of ms).
pub(crate) const STARVE_US: u64 = 10_000;

/// How long a worker keeps a server idle for its own clients while
/// another worker's clients wait before it lends it (and how long its
/// needs stay asked for after its queue empties). Demand comes in bursts
/// shorter than this; moving a server costs three messages and an epoll
/// registration, so a server is not moved for a gap between two of its
/// own clients' transactions. The bound on how long a client waits while
/// an idle server of its pool sits on another worker.
pub(crate) const LEND_AFTER: std::time::Duration = std::time::Duration::from_millis(2);

/// How far (in servers) a worker must be above its share, and another
/// below its own, before a server moves between them (`gives_way`). A move
/// shifts both by one; with more than half a server each way the move can
/// only be undone after demand itself shifted by half a server, so noise
/// in the smoothed demand around a share of n.5 does not send a server
/// back and forth (at exactly 0.5 it did: about a message per
/// transaction in some runs).
const SHARE_SLACK: f64 = 0.75;

/// The time constant of each worker's smoothed demand: shares follow
/// demand that holds for tens of milliseconds, not each transaction.
const DEMAND_TAU_US: f64 = 50_000.0;

/// What one worker holds and wants of a pool, written only by that worker
/// (plain stores, on a cache line of its own so the workers writing their
/// loads do not slow each other) and read by the others when they free a
/// server.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct WorkerLoad {
    /// Its server connections of the pool: opening, linked, idle, being
    /// reset.
    held: AtomicUsize,
    /// Its clients queued for one.
    queued: AtomicUsize,
    /// When its first queued client began to wait (`PoolShared::clock`),
    /// 0 when none waits.
    since: AtomicU64,
    /// Its smoothed demand (`Demand`), as `f64` bits.
    demand: AtomicU64,
}

/// A worker's demand for a pool's servers: its busy servers plus its
/// queued clients, smoothed over time (an exponential moving average
/// weighted by how long each value held, time constant `DEMAND_TAU_US`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Demand {
    avg: f64,
    last: usize,
    at: u64,
}

impl Demand {
    /// The demand is `now_is` from `now` on (`PoolShared::clock`);
    /// returns the smoothed value.
    pub(crate) fn observe(&mut self, now: u64, now_is: usize) -> f64 {
        let dt = now.saturating_sub(self.at) as f64;
        let alpha = -(-dt / DEMAND_TAU_US).exp_m1();
        self.avg += (self.last as f64 - self.avg) * alpha;
        self.last = now_is;
        self.at = now;
        self.avg
    }
}

/// A worker's own view of its load, exact, as it frees a server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Mine {
    pub(crate) worker: WorkerId,
    /// Servers it holds, the one being freed included.
    pub(crate) held: usize,
    /// Its smoothed demand.
    pub(crate) demand: f64,
    /// Clients queued there (at least one, or nothing is to be given).
    pub(crate) queued: usize,
    /// When the first of them began to wait (`PoolShared::clock`).
    pub(crate) since: u64,
    /// Now, on the same clock.
    pub(crate) now: u64,
    /// It gave a server within the last `IN_FLIGHT_US` (which the other
    /// worker may not have yet).
    pub(crate) gave_recently: bool,
}

/// How long a server given to another worker is taken to be on its way
/// (three messages between threads, on a loaded machine): a worker gives
/// no other meanwhile (at 512 clients on 32 servers, giving while the
/// last one was in flight moved a server every other transaction).
pub(crate) const IN_FLIGHT_US: u64 = 2_000;

/// What the router and the workers share about one pool, as atomics so that
/// the hot path needs neither a lock nor a message.
///
/// `keep` and the router's queueing form a handshake: a worker about to
/// keep a released server increments its `idle` count *then* reads the
/// other workers' `waiting`; the router about to queue a need increments
/// `waiting` *then* reads the `idle` counts. With sequentially consistent
/// atomics at least one of them sees the other, so a queued need is never
/// left beside an idle server: the worker lends it (`wants_lend`, within
/// `LEND_AFTER`), or the router asks for it (`Reclaim`).
#[derive(Debug)]
pub(crate) struct PoolShared {
    /// Needs queued at the router, per worker.
    pub(crate) waiting: Box<[AtomicUsize]>,
    /// Idle servers each worker keeps for itself.
    pub(crate) idle: Box<[AtomicUsize]>,
    /// Clients logged in on the pool (for inspect).
    pub(crate) clients: AtomicUsize,
    /// Clients queued in the workers for a server (for inspect).
    pub(crate) clients_waiting: AtomicUsize,
    /// The pool was retired by a reload: close its servers as they free up.
    pub(crate) retired: AtomicBool,
    /// Logins in the current second (client_rate): the second in the high
    /// 32 bits, the count in the low 32.
    logins: std::sync::atomic::AtomicU64,
    /// Servers the pool should give up as they are released, because it
    /// holds more than its share of a full storage (storage_max) while
    /// another route waits. Read once per release; zero but for that.
    pub(crate) shrink: AtomicUsize,
    /// What logins are told (ParameterStatus), by startup settings.
    pub(crate) greetings: crate::session::Greetings,
    /// Servers the pool should give up because a reload lowered its
    /// pool_size below what it holds. Whoever closes one for it (a worker
    /// releasing or keeping it idle, the router holding it) takes one off
    /// first, so each excess server closes once. Zero but after such a
    /// reload.
    pub(crate) oversize: AtomicUsize,
    /// Each worker's load (see `gives_way`).
    load: Box<[WorkerLoad]>,
    /// The origin of `clock`, the same for every worker.
    epoch: Instant,
}

/// Why a released server is closed instead of reused (`give_up_one`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GiveUp {
    /// Its slot goes to another route of a full storage (storage_max).
    StorageShare,
    /// A reload lowered the pool's pool_size below what it holds.
    PoolSize,
}

impl GiveUp {
    /// Why, for the log.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::StorageShare => "its storage_max slot goes to another route",
            Self::PoolSize => "a reload lowered its pool_size",
        }
    }
}

/// Takes one off `n` unless it is zero; true when it did.
fn take_one(n: &AtomicUsize) -> bool {
    n.load(Ordering::Relaxed) > 0
        && n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
            .is_ok()
}

impl PoolShared {
    pub(crate) fn new(workers: usize) -> Self {
        let n = workers.max(1);
        Self {
            waiting: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            idle: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            clients: AtomicUsize::new(0),
            clients_waiting: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            logins: std::sync::atomic::AtomicU64::new(0),
            shrink: AtomicUsize::new(0),
            greetings: crate::session::Greetings::default(),
            oversize: AtomicUsize::new(0),
            load: (0..n).map(|_| WorkerLoad::default()).collect(),
            epoch: Instant::now(),
        }
    }

    /// Microseconds since the pool was made, plus one (so 0 can mean
    /// "nobody"): the clock `WorkerLoad::since` is kept on, comparable
    /// between workers.
    pub(crate) fn clock(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_micros() as u64 + 1
    }

    /// `worker` now holds `held` servers of the pool.
    pub(crate) fn publish_held(&self, worker: WorkerId, held: usize) {
        if let Some(l) = self.load.get(worker) {
            l.held.store(held, Ordering::Relaxed);
        }
    }

    /// `worker` now has `queued` clients waiting, the first since `since`
    /// (0 when none), and a smoothed demand of `demand`.
    pub(crate) fn publish_queue(&self, worker: WorkerId, queued: usize, since: u64, demand: f64) {
        if let Some(l) = self.load.get(worker) {
            l.queued.store(queued, Ordering::Relaxed);
            l.since.store(since, Ordering::Relaxed);
            l.demand.store(demand.to_bits(), Ordering::Relaxed);
        }
    }

    /// The workers other than `worker` whose needs wait at the router,
    /// with how many of their clients are queued now.
    fn asking(&self, worker: WorkerId) -> impl Iterator<Item = (WorkerId, usize)> + '_ {
        self.load.iter().enumerate().filter_map(move |(w, l)| {
            let asks = w != worker
                && self
                    .waiting
                    .get(w)
                    .is_some_and(|n| n.load(Ordering::SeqCst) > 0);
            asks.then(|| (w, l.queued.load(Ordering::Relaxed)))
        })
    }

    /// Clients queued on the workers other than `worker` whose needs wait
    /// at the router: how many servers lending could serve.
    pub(crate) fn queued_elsewhere(&self, worker: WorkerId) -> usize {
        self.asking(worker).map(|(_, q)| q).sum()
    }

    /// The worker (other than `worker`) whose needs wait at the router and
    /// whose clients are queued now, the most of them: the one to lend an
    /// idle server to. A need whose clients were served meanwhile (its
    /// withdrawal waits `LEND_AFTER`) attracts nothing.
    pub(crate) fn wants_lend(&self, worker: WorkerId) -> Option<WorkerId> {
        self.asking(worker)
            .filter(|&(_, q)| q > 0)
            .max_by_key(|&(w, q)| (q, std::cmp::Reverse(w)))
            .map(|(w, _)| w)
    }

    /// A worker frees a server while clients of its own wait: the worker
    /// that should have it instead, if any. Without this the freed server
    /// serves the worker's own queue (no message: the saturated steady
    /// state), which alone would let the worker that got the servers first
    /// keep them.
    ///
    /// Only a worker whose needs wait at the router and whose clients are
    /// queued can be given one (the router hands it over). It gets it when
    /// either
    /// - **shares**: servers should be split in proportion to the workers'
    ///   smoothed demand, and this worker holds more than `SHARE_SLACK`
    ///   above its share while the other holds more than that below its
    ///   own; the move brings both closer, and no move can undo it until
    ///   demand shifts by half a server, so a steady split stays put; or
    /// - **age**: its first queued client has waited more than twice as
    ///   long as this worker's first plus `STARVE_US`, which bounds the
    ///   unfairness and lets a worker whose share is a fraction of a server
    ///   take turns.
    ///
    /// Neither, within `IN_FLIGHT_US` of the last server this worker gave
    /// (`Mine::gave_recently`): one move at a time, each judged on counts
    /// that include the one before.
    ///
    /// Relaxed loads: a stale value costs one move too many or too few,
    /// corrected at a later release; `pool_size` is the router's and holds
    /// whatever this decides.
    pub(crate) fn gives_way(&self, mine: Mine) -> Option<WorkerId> {
        // Not while a server this worker gave may still be on its way:
        // neither side counts it meanwhile, so shares and the other's
        // first client would ask for another one.
        if self.load.len() < 2 || mine.queued == 0 || mine.gave_recently {
            return None;
        }
        let (mut servers, mut demand) = (mine.held as f64, mine.demand);
        // The candidates, on the stack (no allocation per release; past
        // eight workers waiting at once, the first eight are considered).
        let mut others: [(WorkerId, f64, f64, u64); 8] = [(0, 0.0, 0.0, 0); 8];
        let mut n = 0;
        for (w, l) in self.load.iter().enumerate() {
            if w == mine.worker {
                continue;
            }
            let held = l.held.load(Ordering::Relaxed) as f64;
            let d = f64::from_bits(l.demand.load(Ordering::Relaxed));
            servers += held;
            demand += d;
            let asks = self
                .waiting
                .get(w)
                .is_some_and(|x| x.load(Ordering::Relaxed) > 0);
            if asks && l.queued.load(Ordering::Relaxed) > 0 && n < others.len() {
                others[n] = (w, held, d, l.since.load(Ordering::Relaxed));
                n += 1;
            }
        }
        let others = &others[..n];
        if others.is_empty() {
            return None;
        }
        if demand > 0.0 && mine.held as f64 - servers * mine.demand / demand > SHARE_SLACK {
            let short = others
                .iter()
                .map(|&(w, held, d, _)| (w, servers * d / demand - held))
                .filter(|&(_, short)| short > SHARE_SLACK)
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((w, _)) = short {
                return Some(w);
            }
        }
        let waited = |since: u64| mine.now.saturating_sub(since);
        let bar = 2 * waited(mine.since) + STARVE_US;
        others
            .iter()
            .filter(|&&(_, _, _, since)| since > 0 && waited(since) > bar)
            .max_by_key(|&&(_, _, _, since)| waited(since))
            .map(|&(w, ..)| w)
    }

    /// Idle servers kept by the workers, in total.
    pub(crate) fn idle_total(&self) -> usize {
        self.idle.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// True when a worker other than `worker` has a need queued.
    pub(crate) fn others_waiting(&self, worker: WorkerId) -> bool {
        self.waiting
            .iter()
            .enumerate()
            .any(|(w, n)| w != worker && n.load(Ordering::SeqCst) > 0)
    }

    /// A worker keeps a released server idle: `None` when it may not
    /// (the pool was retired), else whether another worker's clients wait
    /// for one (then it lends it if none of its own came within
    /// `LEND_AFTER`).
    pub(crate) fn keep(&self, worker: WorkerId) -> Option<bool> {
        let idle = self.idle.get(worker)?;
        idle.fetch_add(1, Ordering::SeqCst);
        if self.retired.load(Ordering::SeqCst) {
            idle.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(self.wants_lend(worker).is_some())
    }

    /// Counts a login in second `now_s`; returns the logins of that second
    /// so far, this one included (a fixed one-second window, lock-free).
    pub(crate) fn count_login(&self, now_s: u32) -> u32 {
        let mut cur = self.logins.load(Ordering::Relaxed);
        loop {
            let (sec, n) = ((cur >> 32) as u32, cur as u32);
            let next_n = if sec == now_s { n.saturating_add(1) } else { 1 };
            let next = (u64::from(now_s) << 32) | u64::from(next_n);
            match self
                .logins
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next_n,
                Err(seen) => cur = seen,
            }
        }
    }

    /// A worker about to reuse a released server: `Some` when it must close
    /// it instead (two relaxed loads when nothing is to be given up).
    pub(crate) fn give_up_one(&self) -> Option<GiveUp> {
        if take_one(&self.oversize) {
            Some(GiveUp::PoolSize)
        } else if take_one(&self.shrink) {
            Some(GiveUp::StorageShare)
        } else {
            None
        }
    }

    /// A worker about to keep or hand out an idle server: true when it
    /// must close it instead, the pool being above its pool_size.
    pub(crate) fn give_up_oversize(&self) -> bool {
        take_one(&self.oversize)
    }

    /// A worker takes one of its kept servers out of its idle list.
    pub(crate) fn taken(&self, worker: WorkerId) {
        if let Some(idle) = self.idle.get(worker) {
            let _ = idle.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
    }
}

/// Every pool's shared state, found by key. Locked only the first time a
/// worker meets a pool (it keeps the `Arc`), never per message.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    workers: usize,
    pools: Mutex<HashMap<PoolKey, Arc<PoolShared>>>,
    /// CancelRequests in flight to servers, all workers together
    /// (`cancel_max`).
    pub(crate) cancels: Arc<AtomicUsize>,
    /// The storages' hosts: roles, bans, lag (`hosts`).
    pub(crate) hosts: crate::hosts::Hosts,
    /// LISTEN/NOTIFY hubs of transaction-pooled listeners (`notify`).
    pub(crate) notes: crate::notify::Notes,
}

impl Registry {
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            workers,
            pools: Mutex::new(HashMap::new()),
            cancels: Arc::default(),
            hosts: crate::hosts::Hosts::default(),
            notes: crate::notify::Notes::default(),
        }
    }

    /// The shared state of `key`, created on first use.
    pub(crate) fn get(&self, key: &PoolKey) -> Arc<PoolShared> {
        let mut pools = self
            .pools
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            pools
                .entry(key.clone())
                .or_insert_with(|| Arc::new(PoolShared::new(self.workers))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Worker 1 holds `held` servers, all busy, has `queued` clients
    /// waiting since `since` and as many needs at the router; its demand
    /// has been that for long.
    fn other(p: &PoolShared, held: usize, queued: usize, since: u64) {
        p.publish_held(1, held);
        p.publish_queue(1, queued, since, (held + queued) as f64);
        p.waiting[1].store(queued, Ordering::SeqCst);
    }

    fn mine(held: usize, queued: usize, since: u64, now: u64) -> Mine {
        Mine {
            worker: 0,
            held,
            demand: (held + queued) as f64,
            queued,
            since,
            now,
            gave_recently: false,
        }
    }

    #[test]
    fn a_balanced_split_stays_put() {
        let p = PoolShared::new(2);
        // 32 clients on each worker, 4 servers each: each release serves
        // its own queue, whatever the ages (within STARVE_US).
        other(&p, 4, 28, 1_000);
        assert_eq!(p.gives_way(mine(4, 28, 1_000, 5_000)), None);
        assert_eq!(p.gives_way(mine(4, 27, 1_500, 5_000)), None);
        // A few clients more or less on either side change nothing.
        other(&p, 4, 30, 900);
        assert_eq!(p.gives_way(mine(4, 25, 1_000, 5_000)), None);
    }

    #[test]
    fn servers_follow_demand_until_shares_are_met_then_stop() {
        let p = PoolShared::new(2);
        // Worker 0 got all 8 servers first; worker 1's 32 clients wait.
        let mut held = [8usize, 0];
        let mut moves = 0;
        for _ in 0..20 {
            other(&p, held[1], 32 - held[1], 1_000);
            match p.gives_way(mine(held[0], 32 - held[0], 1_000, 2_000)) {
                Some(1) => {
                    held[0] -= 1;
                    held[1] += 1;
                    moves += 1;
                }
                None => {}
                w => panic!("gave to {w:?}"),
            }
        }
        assert_eq!(held, [4, 4]);
        assert_eq!(moves, 4);
        // Demand 48 against 16: worker 0, under its share, gives nothing;
        // worker 1 (seen from itself) gives until the split is 6 and 2.
        other(&p, 4, 12, 1_000);
        assert_eq!(p.gives_way(mine(4, 44, 1_000, 2_000)), None);
        let q = PoolShared::new(2);
        let (mut h0, mut h1) = (4, 4);
        loop {
            other(&q, h0, 48 - h0, 1_000);
            if q.gives_way(mine(h1, 16 - h1, 1_000, 2_000)) != Some(1) {
                break;
            }
            h1 -= 1;
            h0 += 1;
        }
        assert_eq!((h0, h1), (6, 2));
    }

    #[test]
    fn a_fraction_of_a_server_is_had_by_waiting_longest() {
        let p = PoolShared::new(2);
        // 63 clients here on 8 servers, 1 on worker 1 with none: its
        // share is an eighth of a server, never half of one.
        other(&p, 0, 1, 1_000);
        assert_eq!(
            p.gives_way(mine(8, 55, 1_000 + STARVE_US, 1_000 + STARVE_US)),
            None
        );
        // Its client (waiting since 1_000) waited more than twice as long
        // as our first plus STARVE_US: it has it, once.
        let now = 1_000 + 3 * STARVE_US;
        let ours_since = |waited: u64| now - waited;
        assert_eq!(p.gives_way(mine(8, 55, ours_since(STARVE_US), now)), None);
        let m = mine(8, 55, ours_since(STARVE_US - 1), now);
        assert_eq!(p.gives_way(m), Some(1));
        let again = Mine {
            gave_recently: true,
            ..m
        };
        assert_eq!(p.gives_way(again), None, "the first is on its way");
        // Long queues on both sides: waits of 40 and 70 ms are no reason.
        let now = 100_000;
        other(&p, 0, 1, now - 70_000);
        assert_eq!(p.gives_way(mine(8, 55, now - 40_000, now)), None);
    }

    #[test]
    fn nothing_is_given_or_lent_to_a_worker_not_asking() {
        let p = PoolShared::new(2);
        // Worker 1 has queued clients but no need at the router (its own
        // servers will serve them, or its need was met already).
        p.publish_held(1, 0);
        p.publish_queue(1, 30, 1, 30.0);
        assert_eq!(p.gives_way(mine(8, 30, 50_000, 60_000)), None);
        assert_eq!(p.wants_lend(0), None);
        assert_eq!(p.queued_elsewhere(0), 0);
        // Needs at the router but nobody queued (served meanwhile; the
        // needs are withdrawn LEND_AFTER later): nothing lent either.
        p.waiting[1].store(3, Ordering::SeqCst);
        p.publish_queue(1, 0, 0, 2.0);
        assert_eq!(p.wants_lend(0), None);
        // Asking and queued: lent to it, and counted.
        other(&p, 0, 30, 1);
        assert_eq!(p.wants_lend(0), Some(1));
        assert_eq!(p.queued_elsewhere(0), 30);
        assert_eq!(p.wants_lend(1), None, "nobody else asks");
        // Not by a worker whose own queue is empty (it keeps or lends).
        assert_eq!(p.gives_way(mine(8, 0, 0, 60_000)), None);
        // One worker: nobody to give to.
        let one = PoolShared::new(1);
        assert_eq!(one.gives_way(mine(8, 30, 1, 60_000)), None);
    }

    #[test]
    fn demand_is_smoothed_over_time() {
        let mut d = Demand::default();
        // 10 for a long time, then a burst of 0 for 1 ms: still about 10.
        d.observe(1, 10);
        let settled = d.observe(1_000_000, 10);
        assert!(settled > 9.99, "{settled}");
        let after_gap = d.observe(1_001_000, 0);
        assert!(after_gap > 9.99, "{after_gap}");
        let burst = d.observe(1_002_000, 10);
        assert!(burst > 9.7 && burst < 10.0, "{burst}");
        // Demand that holds for a few time constants is followed.
        d.observe(1_300_000, 2);
        let moved = d.observe(1_600_000, 2);
        assert!(moved > 2.0 && moved < 2.1, "{moved}");
    }
}
