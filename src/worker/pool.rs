//! The worker's side of the pools: `LocalPool` (a pool as one worker sees
//! it: idle servers, the FIFO queue of waiting clients, needs asked of the
//! router), `Shared::local`/`balance_needs`, and the transitions that move
//! servers between clients, this worker, the router and other workers:
//! `attach`/`dequeue` (a client asks for a server or stops waiting),
//! `granted` (the router's answer), `offer`/`release_server`/
//! `unlink_and_release` (a free server finds its next client), `ship`/
//! `adopt` (a server moves between workers), `balance`/`reclaim`/`lend`
//! (needs withdrawn and idle servers lent once `LEND_AFTER` has passed)
//! and `open_server`/`open_server_asking` (a new server connection is
//! started).

use std::collections::VecDeque;
use std::sync::Arc;

use log::{debug, warn};
use odissey_protocol::scram::ScramCredential;
use odissey_reactor::{Context, Interest, Key};

use crate::auth::Fatal;
use crate::backend_login::{AskTls, BackendLogin};
use crate::cmd::{SysCmd, WorkerCmd};
use crate::config::ResolvedRoute;
use crate::credentials;
use crate::ids::ConnId;
use crate::io::Io;
use crate::pool_shared::{Demand, Mine, IN_FLIGHT_US, LEND_AFTER};
use crate::router::{Lease, PoolKey, PoolShared, ServerWas, WorkerId};
use crate::stats::Counters;
use crate::worker::client::ClientState;
use crate::worker::server::{Server, ServerState};

use super::failure::ServerFailure;
use super::opening::{Opened, Resume};
use super::{insert_registered, us_since_start_at, Conn, Shared, Worker, WorkerTimer};

/// A pool as one worker sees it.
pub(super) struct LocalPool {
    pub(super) shared: Arc<PoolShared>,
    /// Servers kept idle here, most recently used last.
    pub(super) idle: Vec<Key>,
    /// Clients of this worker waiting for a server, FIFO, with when each
    /// began to wait (`PoolShared::clock`). Changed only through
    /// `enqueue`/`pop_waiter`/`remove_waiter`, which publish it.
    queue: VecDeque<(Key, u64)>,
    /// Server connections of the pool on this worker (`Conn::Server`s in
    /// the slab: opening, linked, idle, being reset), published.
    held: usize,
    /// Servers asked of the router and not yet granted.
    asked: usize,
    /// Its demand (busy servers and queued clients), smoothed, published.
    demand: Demand,
    /// When the queue last became empty (`PoolShared::clock`): its needs
    /// are withdrawn `LEND_AFTER` later if it stays empty.
    empty_since: u64,
    /// When it last gave a server to another worker (`PoolShared::clock`;
    /// see `Mine::gave_recently`).
    gave_at: u64,
    /// Reclaims the router sent while every idle server here was younger
    /// than `LEND_AFTER`: given when they are old enough (`Worker::lend`).
    owed: usize,
    /// The route as of the latest client, for new servers.
    route: Arc<ResolvedRoute>,
    /// What this worker's servers did for the pool (see `stats`).
    pub(super) totals: Counters,
    /// Its host, when its route chooses among hosts (`hosting`).
    pub(super) host: Option<Arc<crate::hosts::HostState>>,
}

impl LocalPool {
    /// True when no client of this worker waits.
    pub(super) fn nobody_waits(&self) -> bool {
        self.queue.is_empty()
    }

    /// The clients waiting, first first.
    pub(super) fn waiters(&self) -> impl Iterator<Item = Key> + '_ {
        self.queue.iter().map(|&(k, _)| k)
    }

    /// `ck` queues; `now` on the pool's clock.
    fn enqueue(&mut self, me: WorkerId, ck: Key, now: u64) {
        self.queue.push_back((ck, now));
        self.publish(me, now);
    }

    /// The first waiting client leaves the queue (to be served).
    fn pop_waiter(&mut self, me: WorkerId, now: u64) -> Option<Key> {
        let (ck, _) = self.queue.pop_front()?;
        self.publish(me, now);
        Some(ck)
    }

    /// `ck` leaves the queue unserved; false when it was not in it.
    fn remove_waiter(&mut self, me: WorkerId, ck: Key, now: u64) -> bool {
        let Some(i) = self.queue.iter().position(|&(k, _)| k == ck) else {
            return false;
        };
        self.queue.remove(i);
        self.publish(me, now);
        true
    }

    /// Publishes the queue and the demand as they are now (after any
    /// change of the queue or of the servers busy here).
    fn publish(&mut self, me: WorkerId, now: u64) -> f64 {
        let busy = self.held.saturating_sub(self.idle.len());
        let demand = self.demand.observe(now, busy + self.queue.len());
        let since = match self.queue.front() {
            Some(&(_, t)) => t,
            None => {
                if self.empty_since == 0 {
                    self.empty_since = now;
                }
                0
            }
        };
        if since != 0 {
            self.empty_since = 0;
        }
        self.shared
            .publish_queue(me, self.queue.len(), since, demand);
        demand
    }

    /// One server of the pool more (`true`) or less on this worker.
    pub(super) fn count_held(&mut self, me: WorkerId, more: bool) {
        self.held = if more {
            self.held + 1
        } else {
            self.held.saturating_sub(1)
        };
        self.shared.publish_held(me, self.held);
    }
}

impl Shared {
    /// This worker's view of `pool`, created on first use.
    pub(super) fn local(&mut self, pool: &PoolKey, route: &Arc<ResolvedRoute>) -> &mut LocalPool {
        let registry = &self.registry;
        let routed = || {
            let listeners = self.cfg.listen.iter().map(|l| l.target_session_attrs);
            route.is_routed(None) || listeners.into_iter().any(|t| route.is_routed(t))
        };
        self.local.entry(pool.clone()).or_insert_with(|| LocalPool {
            host: routed().then(|| {
                let hosts = registry.hosts.of(&route.route.storage, &route.endpoints);
                let i = usize::from(pool.host).min(hosts.len().saturating_sub(1));
                Arc::clone(&hosts[i])
            }),
            shared: registry.get(pool),
            idle: Vec::new(),
            queue: VecDeque::new(),
            held: 0,
            asked: 0,
            demand: Demand::default(),
            empty_since: 0,
            gave_at: 0,
            owed: 0,
            route: Arc::clone(route),
            totals: Counters::default(),
        })
    }

    /// Asks the router for more servers while the queue outgrows what was
    /// asked; gives the needs back when the queue is empty.
    pub(super) fn balance_needs(&mut self, pool: &PoolKey) {
        let id = self.id;
        // A paused database's clients wait without asking for servers.
        let paused = self.paused.holds(&pool.database);
        let Some(lp) = self.local.get_mut(pool) else {
            return;
        };
        let mut msgs = Vec::new();
        // An emptied queue keeps its needs `LEND_AFTER` longer (withdrawn
        // by `Worker::balance` if it stays empty): the next burst of its
        // clients then costs no message. A paused one gives them back now.
        if lp.queue.is_empty() && !paused && lp.asked > 0 {
            self.balance_wanted = true;
        } else if paused && lp.asked > 0 {
            msgs.push(SysCmd::CancelNeed {
                pool: pool.clone(),
                worker: id,
                n: lp.asked,
            });
            lp.asked = 0;
        }
        while !paused && lp.asked < lp.queue.len() {
            lp.asked += 1;
            msgs.push(SysCmd::Need {
                pool: pool.clone(),
                route: Arc::clone(&lp.route),
                worker: id,
            });
        }
        for m in msgs {
            self.send(m);
        }
    }
}

impl Worker {
    pub(super) fn unlink_and_release(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        sk: Key,
    ) {
        let listens = match self.conns.get_mut(ck) {
            Some(Conn::Client(c)) => {
                c.unlink();
                c.listens.as_deref_mut().is_some_and(|l| {
                    // Its transaction is over.
                    l.direct = false;
                    true
                })
            }
            _ => false,
        };
        self.release_server(cx, sk);
        // Between transactions: what was notified meanwhile.
        if listens {
            self.deliver(cx, ck);
        }
    }

    /// A server is idle and clean: to the first client queued here unless
    /// another worker should have it (`PoolShared::gives_way`; then the
    /// router hands it over), else kept idle here for the next one (lent
    /// after `LEND_AFTER` if another worker's clients wait). No message to
    /// anyone in the common case. Closed when draining or retired.
    pub(super) fn release_server(&mut self, cx: &mut Context<'_, WorkerTimer>, sk: Key) {
        self.offer(cx, sk, false);
    }

    /// `granted`: the router gave it to this worker's queue (its turn), so
    /// other workers' needs are not considered.
    pub(super) fn offer(&mut self, cx: &mut Context<'_, WorkerTimer>, sk: Key, granted: bool) {
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        s.set_idle();
        // Draining, a server still serves the clients queued here (they
        // are let finish a request), and closes when none waits. (Its
        // counters stay on it until it closes or a snapshot reads them:
        // nothing per transaction.)
        if self.w.draining
            && self
                .w
                .local
                .get(&s.pool)
                .is_none_or(LocalPool::nobody_waits)
        {
            self.close_server(cx, sk, "shutdown");
            return;
        }
        // Granted from the router's books (idle here, or moved from another
        // worker): it may have been terminated while idle, as in `attach`.
        if granted {
            if let Some(why) = s.gone_while_idle(cx.now(), self.w.cfg.readahead) {
                let pool = s.pool.clone();
                self.close_server(cx, sk, &why);
                self.w.balance_needs(&pool);
                return;
            }
        }
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        let id = self.w.id;
        let pool = s.pool.clone();
        let route = Arc::clone(&s.route);
        let lp = self.w.local(&pool, &route);
        // A retired pool (its route changed in a reload) still serves the
        // clients that logged in before; its servers close when none waits.
        if lp.shared.retired.load(std::sync::atomic::Ordering::SeqCst) && lp.queue.is_empty() {
            self.close_server(cx, sk, "its route changed");
            return;
        }
        // A reload lowered the pool_size below what the pool holds, or its
        // storage is full (storage_max) and this route holds more than its
        // share while another waits: the server closes instead of serving.
        if !granted {
            if let Some(why) = lp.shared.give_up_one() {
                self.close_server(cx, sk, why.reason());
                self.w.balance_needs(&pool);
                return;
            }
        }
        // A paused database's queue waits: the server is kept (or given
        // back), not handed to the next client.
        let paused = self.w.paused.holds(&pool.database);
        let lp = self.w.local(&pool, &route);
        // Another worker's need waits at the router: the server still
        // serves this worker's queue unless that worker should have it
        // (`gives_way`: shares or age); then the router hands it over.
        // Saturated and balanced, nothing leaves the worker.
        let now = lp.shared.clock(cx.now());
        let mut to = None;
        if !granted && !paused && !lp.queue.is_empty() && lp.shared.others_waiting(id) {
            // (Only here is the demand needed before the queue's own
            // publication below.)
            let demand = lp.publish(id, now);
            let mine = Mine {
                worker: id,
                held: lp.held,
                demand,
                queued: lp.queue.len(),
                since: lp.queue.front().map_or(0, |&(_, t)| t),
                now,
                gave_recently: now.saturating_sub(lp.gave_at) < IN_FLIGHT_US,
            };
            to = lp.shared.gives_way(mine);
        }
        if to.is_none() {
            while let Some(ck) = if paused { None } else { lp.pop_waiter(id, now) } {
                lp.shared
                    .clients_waiting
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                let waiting = matches!(self.conns.get(ck), Some(Conn::Client(c)) if matches!(c.state, ClientState::Waiting));
                if waiting {
                    self.w.balance_needs(&pool);
                    if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                        if let Some(t) = c.deadline.take() {
                            cx.cancel_timer(t);
                        }
                    }
                    self.link(cx, ck, sk);
                    return;
                }
            }
            // Kept idle for this worker's next client; lent after
            // LEND_AFTER if another worker's clients wait meanwhile
            // (`Worker::balance`). A retired pool's goes to the router,
            // which closes it.
            let lp = self.w.local(&pool, &route);
            if let Some(lend) = lp.shared.keep(id) {
                lp.idle.push(sk);
                lp.publish(id, now);
                if let Some(Conn::Server(s)) = self.conns.get_mut(sk) {
                    s.idle_since = cx.now();
                }
                if lend {
                    self.w.balance_wanted = true;
                }
                self.w.balance_needs(&pool);
                return;
            }
        }
        self.hand_to_router(cx, sk, pool, to);
    }

    /// Hands idle server `sk` to the router (`Release`), for worker `to`'s
    /// need if it names one. From then on the server is not this worker's
    /// (`Server::lent`): it leaves the published `held` at once, so the
    /// next release here judges shares without it, though it sits in this
    /// slab until the router's `Ship` (or its grant back) arrives.
    fn hand_to_router(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        sk: Key,
        pool: PoolKey,
        to: Option<WorkerId>,
    ) {
        let id = self.w.id;
        if let Some(Conn::Server(s)) = self.conns.get_mut(sk) {
            if !s.lent {
                s.lent = true;
                if let Some(lp) = self.w.local.get_mut(&pool) {
                    lp.count_held(id, false);
                    if to.is_some() {
                        lp.gave_at = lp.shared.clock(cx.now());
                    }
                }
            }
        }
        self.w.send(SysCmd::Release {
            pool,
            worker: id,
            server: sk,
            to,
        });
    }

    /// `WorkerTimer::Balance`, `LEND_AFTER` after something asked for it:
    /// for each pool, the needs of a queue that stayed empty are withdrawn,
    /// and servers idle here that long are lent to other workers whose
    /// clients wait (or given for the reclaims owed). Re-arms itself while
    /// anything is left to do.
    pub(super) fn balance(&mut self, cx: &mut Context<'_, WorkerTimer>) {
        self.w.balance_set = false;
        self.w.balance_wanted = false;
        let id = self.w.id;
        let pools: Vec<PoolKey> = self.w.local.keys().cloned().collect();
        for pool in pools {
            let Some(lp) = self.w.local.get_mut(&pool) else {
                continue;
            };
            let now = lp.shared.clock(cx.now());
            if lp.queue.is_empty() && lp.asked > 0 {
                let after = LEND_AFTER.as_micros() as u64;
                if now.saturating_sub(lp.empty_since) >= after {
                    let n = std::mem::take(&mut lp.asked);
                    self.w.send(SysCmd::CancelNeed {
                        pool: pool.clone(),
                        worker: id,
                        n,
                    });
                } else {
                    self.w.balance_wanted = true;
                }
            }
            self.lend(cx, &pool, false);
        }
    }

    /// The router asks for one of the idle servers kept here (another
    /// worker's need waits, or another route needs the storage slot).
    pub(super) fn reclaim(&mut self, cx: &mut Context<'_, WorkerTimer>, pool: &PoolKey) {
        match self.w.local.get_mut(pool) {
            Some(lp) if !lp.idle.is_empty() => lp.owed += 1,
            _ => return,
        }
        self.lend(cx, pool, true);
    }

    /// Hands the router the idle servers of `pool` that have waited
    /// `LEND_AFTER` here for a client of this worker: one for each reclaim
    /// owed, and one for each client queued on the other workers whose
    /// needs wait. Younger ones are looked at again later (`balance`).
    /// `now_only`: a reclaim, answered at once if a server is old enough.
    fn lend(&mut self, cx: &mut Context<'_, WorkerTimer>, pool: &PoolKey, now_only: bool) {
        let id = self.w.id;
        let Some(lp) = self.w.local.get_mut(pool) else {
            return;
        };
        // A reclaim that found nothing idle (or whose servers this
        // worker's clients took since) is owed nothing.
        lp.owed = lp.owed.min(lp.idle.len());
        let mut left = lp.owed + lp.shared.queued_elsewhere(id);
        while left > 0 {
            let Some(lp) = self.w.local.get_mut(pool) else {
                return;
            };
            // The least recently used first (the list is MRU last).
            let old = lp.idle.first().copied().filter(|&sk| {
                matches!(self.conns.get(sk), Some(Conn::Server(s))
                    if cx.now().saturating_duration_since(s.idle_since) >= LEND_AFTER)
            });
            let Some(sk) = old else {
                if !lp.idle.is_empty() {
                    self.w.balance_wanted = true;
                }
                return;
            };
            let to = lp.shared.wants_lend(id);
            if lp.owed > 0 {
                lp.owed -= 1;
            } else if to.is_none() {
                // Nobody waits any more: it stays.
                return;
            }
            lp.idle.remove(0);
            lp.shared.taken(id);
            let now = lp.shared.clock(cx.now());
            lp.publish(id, now);
            self.hand_to_router(cx, sk, pool.clone(), to);
            left -= 1;
            if now_only && self.w.local.get(pool).is_some_and(|lp| lp.owed == 0) {
                return;
            }
        }
    }

    /// Finds `ck` a server: one this worker keeps idle for its pool (the
    /// common case: no other thread involved), else it queues here and the
    /// router is asked for one more.
    pub(super) fn attach(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        let (Some(pool), Some(route)) = (c.pool.clone(), &c.route) else {
            return;
        };
        let route = Arc::clone(route);
        let cid = c.id;
        // Timed from the batch's clock, as the pool_timeout deadline is.
        c.wait(us_since_start_at(self.w.started, cx.now()));
        let pool = if c.family.is_some() {
            // The host for this transaction (or it waits for one).
            if !self.place(cx, ck) {
                return;
            }
            match self.conns.get(ck) {
                Some(Conn::Client(c)) => c.pool.clone().unwrap_or(pool),
                _ => return,
            }
        } else {
            pool
        };
        let id = self.w.id;
        let paused = self.w.paused.holds(&pool.database);
        let readahead = self.w.cfg.readahead;
        let mut lp = self.w.local(&pool, &route);
        lp.route = Arc::clone(&route);
        while let Some(sk) = if paused { None } else { lp.idle.pop() } {
            lp.shared.taken(id);
            let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
                continue;
            };
            if !matches!(s.state, ServerState::Idle) {
                continue;
            }
            // Terminated while idle, its end not yet read: take another
            // (nothing was sent to it, so nothing can have run).
            if let Some(why) = s.gone_while_idle(cx.now(), readahead) {
                self.close_server(cx, sk, &why);
                lp = self.w.local(&pool, &route);
                continue;
            }
            let lp = self.w.local(&pool, &route);
            let now = lp.shared.clock(cx.now());
            lp.publish(id, now);
            // A client re-routed after waiting for a host has a deadline.
            if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                if let Some(t) = c.deadline.take() {
                    cx.cancel_timer(t);
                }
            }
            self.link(cx, ck, sk);
            return;
        }
        // Admission control: with queue_max clients already waiting (on
        // every worker), the request is refused here and now, without the
        // router.
        let max = route.route.queue_max;
        if max > 0
            && lp
                .shared
                .clients_waiting
                .load(std::sync::atomic::Ordering::Relaxed)
                >= max
        {
            let f = Fatal::new(
                "53300",
                format!(
                    "route {}.{} is busy: {max} clients already wait for a server connection (queue_max)",
                    route.rule_db, route.rule_user
                ),
            );
            self.close_client(cx, ck, Some(f));
            return;
        }
        let now = lp.shared.clock(cx.now());
        lp.enqueue(id, ck, now);
        let waiting = lp
            .shared
            .clients_waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        // (The macro tests the level first: nothing is formatted without
        // log_debug.)
        debug!("{cid}: waiting for a server of {pool} ({waiting} waiting)");
        let timeout = route.route.pool_timeout;
        // A client re-routed while waiting keeps its first deadline.
        let waiting = matches!(self.conns.get(ck), Some(Conn::Client(c)) if c.family.is_some() && c.deadline.is_some());
        if timeout > 0 && !waiting {
            let t = cx.set_timer(
                cx.now() + std::time::Duration::from_millis(timeout),
                WorkerTimer::PoolTimeout(ck),
            );
            if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                c.deadline = Some(t);
            }
        }
        self.w.balance_needs(&pool);
    }

    /// A client leaves this worker's queue without a server.
    pub(super) fn dequeue(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key, pool: &PoolKey) {
        if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
            if let Some(t) = c.deadline.take() {
                cx.cancel_timer(t);
            }
        }
        if self.leave_homeless(ck) {
            return;
        }
        self.leave_queue(cx, ck, pool);
    }

    /// `ck` leaves `pool`'s queue here, its deadline kept (it is re-routed,
    /// or `dequeue` took care of it).
    pub(super) fn leave_queue(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        pool: &PoolKey,
    ) {
        if let Some(lp) = self.w.local.get_mut(pool) {
            let now = lp.shared.clock(cx.now());
            if lp.remove_waiter(self.w.id, ck, now) {
                lp.shared
                    .clients_waiting
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.w.balance_needs(pool);
    }

    /// The router met one of this worker's needs.
    pub(super) fn granted(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        lease: Lease,
        pool: PoolKey,
        route: Arc<ResolvedRoute>,
    ) {
        let lp = self.w.local(&pool, &route);
        lp.asked = lp.asked.saturating_sub(1);
        // A paused database opens nothing (its server may be restarting).
        let queued = !lp.nobody_waits() && !self.w.paused.holds(&pool.database);
        match lease {
            Lease::New if queued => self.open_server(cx, pool, route),
            Lease::New => {
                // The queue emptied before the grant arrived: give the slot back.
                self.w.send(SysCmd::ServerClosed {
                    pool: pool.clone(),
                    worker: self.w.id,
                    server: None,
                    was: ServerWas::Opening,
                });
                self.w.balance_needs(&pool);
            }
            Lease::Local(sk) => {
                let idle = matches!(self.conns.get(sk), Some(Conn::Server(s)) if matches!(s.state, ServerState::Idle));
                // Handed to the router earlier, it is this worker's again.
                if let Some(Conn::Server(s)) = self.conns.get_mut(sk) {
                    if std::mem::take(&mut s.lent) {
                        if let Some(lp) = self.w.local.get_mut(&pool) {
                            lp.count_held(self.w.id, true);
                        }
                    }
                }
                if idle {
                    self.offer(cx, sk, true);
                } else {
                    // It died meanwhile (the router knows): ask again.
                    self.w.balance_needs(&pool);
                }
            }
        }
    }

    /// Opens a new server connection for this worker's queue.
    pub(super) fn open_server(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        pool: PoolKey,
        route: Arc<ResolvedRoute>,
    ) {
        let ask = self.w.ask_tls(&route);
        let tls_retry = self.w.retries_with_tls(&route);
        self.open_server_asking(cx, pool, route, ask, tls_retry);
    }

    pub(super) fn open_server_asking(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        pool: PoolKey,
        route: Arc<ResolvedRoute>,
        ask: AskTls,
        tls_retry: bool,
    ) {
        let st = route.endpoint(pool.host);
        let stream = match self.open_storage(cx, st) {
            Opened::Stream(s) => s,
            Opened::Failed(failure) => {
                warn!("pool {pool}: {failure}");
                self.w.send(SysCmd::ServerClosed {
                    pool: pool.clone(),
                    worker: self.w.id,
                    server: None,
                    was: ServerWas::Opening,
                });
                if !self.host_failed(cx, &pool, &failure.to_string()) {
                    self.fail_first_waiter(cx, &pool, failure.fatal());
                }
                return;
            }
            Opened::Wait => {
                let host = st.host.clone();
                let r = Resume::Server {
                    pool,
                    route,
                    ask,
                    tls_retry,
                };
                self.park(cx, &host, r);
                return;
            }
        };
        let _ = stream.tune(self.w.cfg.keepalive());
        let id = ConnId::server();
        let mut io = Io::new(stream, false);
        // A configured password, else what clients proved for this user
        // (passthrough, or SCRAM keys learned against the server's
        // verifier).
        let credential = match &route.server_password {
            Some(p) => Some(ScramCredential::Password(p.clone())),
            None => credentials::credential(&route.route.storage, &route.server_user),
        };
        let login = BackendLogin::start(
            &mut io.out,
            &route.server_db,
            &route.server_user,
            credential,
            ask,
        );
        let host = self
            .w
            .local
            .get(&pool)
            .and_then(|lp| lp.host.clone())
            .map(crate::hosts::HostSlot::new);
        let (sk, failed) = insert_registered(&mut self.conns, cx.registry(), io, |_, io| {
            let mut s = Server::new(id, io, pool.clone(), Arc::clone(&route), login, tls_retry);
            s.host = host;
            Conn::Server(Box::new(s))
        });
        let me = self.w.id;
        if let Some(lp) = self.w.local.get_mut(&pool) {
            lp.count_held(me, true);
        }
        debug!(
            "{id}: connecting to {} for pool {pool}",
            route.endpoint(pool.host).label()
        );
        if let Some(e) = failed {
            let failure = ServerFailure::Register {
                error: e.to_string(),
                probe: false,
            };
            self.fail_login(cx, sk, failure);
        }
    }

    pub(super) fn ship(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        sk: Key,
        to: WorkerId,
        pool: PoolKey,
    ) {
        let idle = matches!(self.conns.get(sk), Some(Conn::Server(s)) if matches!(s.state, ServerState::Idle));
        if !idle || to >= self.w.peers.len() {
            self.w.send(SysCmd::ShipFailed { pool, to });
            return;
        }
        if let Some(lp) = self.w.local.get_mut(&pool) {
            if let Some(i) = lp.idle.iter().position(|k| *k == sk) {
                lp.idle.swap_remove(i);
                lp.shared.taken(self.w.id);
            }
            let lent = matches!(self.conns.get(sk), Some(Conn::Server(s)) if s.lent);
            if !lent {
                lp.count_held(self.w.id, false);
            }
        }
        let Some(Conn::Server(mut s)) = self
            .conns
            .get_mut(sk)
            .map(|c| std::mem::replace(c, Conn::Dead))
        else {
            return;
        };
        self.w.dead.push(sk);
        let _ = cx.registry().deregister(&mut s.io.stream);
        s.client = None;
        // The worker adopting it counts it.
        s.lent = false;
        debug!("{}: moving to worker {to}", s.id);
        if let Err(e) = self.w.peers[to].send(WorkerCmd::Adopt { server: s }) {
            if let WorkerCmd::Adopt { server, .. } = e.0 {
                self.w.send(SysCmd::ServerClosed {
                    pool: server.pool.clone(),
                    worker: self.w.id,
                    server: None,
                    was: ServerWas::Active,
                });
            }
        }
    }

    /// A server shipped here meets one of this worker's needs.
    pub(super) fn adopt(&mut self, cx: &mut Context<'_, WorkerTimer>, mut server: Box<Server>) {
        let me = self.w.id;
        let lp = self.w.local(&server.pool, &server.route);
        lp.asked = lp.asked.saturating_sub(1);
        lp.count_held(me, true);
        let registry = cx.registry();
        let mut failed = None;
        // Readiness is unknown after the move: assume both, the calls will
        // find out (and mio re-arms edges on registration).
        server.io.readable = true;
        server.io.writable = true;
        let sk = self.conns.insert_with(|key| {
            if let Err(e) = registry.register(
                &mut server.io.stream,
                key.token(),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                failed = Some(e);
            }
            Conn::Server(server)
        });
        if failed.is_some() {
            self.close_server(cx, sk, "cannot register after moving");
            return;
        }
        self.offer(cx, sk, true);
    }
}
