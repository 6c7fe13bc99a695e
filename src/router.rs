//! Pools and the router: who may hold which server connection.
//!
//! The router runs on the system thread and only keeps books: it never
//! touches a socket. A route's `pool_size` is global across workers because
//! only the router creates server connections. The common transaction never
//! reaches it, though:
//!
//! - A worker keeps the servers its clients release in a local idle list and
//!   hands them to its own clients, which queue locally (FIFO) when none is
//!   free. No message, no lock: see [`PoolShared`].
//! - A worker whose queue outgrows its servers asks the router for *one more
//!   server* (`need`), once per queued client. The router answers with a
//!   server from its own idle list, a new connection within `pool_size`, or
//!   queues the need (FIFO across workers) and asks the workers that keep
//!   idle servers to hand one over (`reclaim`).
//! - A worker that frees a server while its own clients wait keeps serving
//!   them unless another worker waiting at the router should have it
//!   (`PoolShared::gives_way`: servers in proportion to demand, or that
//!   worker's first client waited much longer); one with nobody waiting
//!   keeps it idle and lends it after `LEND_AFTER` if another worker's
//!   clients still wait. So no worker starves while another one keeps all
//!   the servers, and a saturated pool's transactions send no message.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use odissey_reactor::Key;

use crate::config::{Config, ResolvedRoute};
pub(crate) use crate::pool_shared::{GiveUp, PoolShared, Registry};

/// Index of a worker thread.
pub(crate) type WorkerId = usize;

/// Which pool a client belongs to: its real database and user, plus where
/// and as whom the server connections log in (so a reload that moves a route
/// to another server starts a fresh pool instead of reusing old servers).
///
/// Cloned on every transaction (a server's release names its pool), so
/// the parts are shared strings: a clone is three reference counts, not
/// three allocations. Looked up several times per transaction (the
/// worker's `local` map), so its hash is computed once, at `new`, and
/// equality first compares pointers: hashing the ~100-byte server string
/// each time was a fifth of the instructions of a prepared transaction.
#[derive(Clone)]
pub(crate) struct PoolKey {
    pub(crate) database: Arc<str>,
    pub(crate) user: Arc<str>,
    /// Which of the route's `endpoints` its servers connect to (each host
    /// of a storage is a pool of its own: `pool_size` is per host).
    pub(crate) host: u16,
    server: Arc<str>,
    hash: u64,
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        let same = |a: &Arc<str>, b: &Arc<str>| Arc::ptr_eq(a, b) || a == b;
        self.hash == other.hash
            && self.host == other.host
            && same(&self.server, &other.server)
            && same(&self.database, &other.database)
            && same(&self.user, &other.user)
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PoolKey {
    /// The pool of `database` and `user` on host `host` of `route`.
    pub(crate) fn new(database: &str, user: &str, route: &ResolvedRoute, host: usize) -> Self {
        let s = &route.storage;
        let endpoint = route.endpoints.get(host);
        let mut key = Self {
            database: database.into(),
            user: user.into(),
            host: u16::try_from(host).unwrap_or(u16::MAX),
            // How its connections are made, TLS included: a reload that
            // changes any of it retires the pool's connections.
            server: Arc::from(format!(
                "{}:{}:{:?}:{}:{}:{:?}:{:?}",
                endpoint.map_or("(gone)", |e| e.host.as_str()),
                endpoint.map_or(0, |e| e.port),
                endpoint.and_then(|e| e.unix_socket_dir.as_deref()),
                route.server_db,
                route.server_user,
                route.server_password,
                (
                    s.tls,
                    &s.tls_ca_file,
                    &s.tls_cert_file,
                    &s.tls_key_file,
                    &s.tls_protocols
                )
            )),
            hash: 0,
        };
        // One random key per process, so every thread computes the same
        // value and a client cannot choose database names that collide.
        static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let keys = KEYS.get_or_init(Default::default);
        key.hash = std::hash::BuildHasher::hash_one(
            keys,
            (&key.database, &key.user, key.host, &key.server),
        );
        key
    }
}

impl std::fmt::Debug for PoolKey {
    // Not derived: the server part holds the server password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolKey({}.{})", self.database, self.user)
    }
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.database, self.user)
    }
}

/// How a worker gets the server it needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lease {
    /// Open a new connection (already counted against pool_size).
    New,
    /// Take this idle server, which lives on the worker already.
    Local(Key),
}

/// What the system thread must do after a router call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Tell `worker` its need is met.
    Grant { worker: WorkerId, lease: Lease },
    /// Tell worker `from` to hand its idle `server` to worker `to`.
    Ship {
        from: WorkerId,
        server: Key,
        to: WorkerId,
    },
    /// The need waits; ask these workers for the idle servers they keep.
    Wait { reclaim: Vec<WorkerId> },
    /// Tell `worker` to close its idle `server` (the pool was retired).
    Close { worker: WorkerId, server: Key },
    /// Tell every worker to close the idle servers it keeps for `pool`.
    Retire { pool: PoolKey },
    /// Tell every worker to close idle servers it keeps for `pool` while
    /// the pool holds more than its (lowered) pool_size.
    Shrink { pool: PoolKey },
}

/// Where a closed server was when it closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerWas {
    /// Connecting or logging in.
    Opening,
    /// Idle (on a worker or in the router's list).
    Idle,
    /// Attached to a client (or being reset).
    Active,
}

/// One storage's server connections, all its pools together (storage_max).
#[derive(Debug, Default)]
struct StorageBook {
    /// storage_max (0 = no limit).
    max: usize,
    /// Connections counted against it: opening, idle, active.
    total: usize,
    /// Pools whose need is held back by `max` (not by their own
    /// pool_size), in the order their turn comes: a freed connection goes
    /// to the first, which goes to the back if it still waits.
    starved: VecDeque<PoolKey>,
    /// Some pool of it was asked to give connections back (`shrink`).
    shrinking: bool,
}

impl StorageBook {
    fn has_room(&self) -> bool {
        self.max == 0 || self.total < self.max
    }
}

#[derive(Debug)]
struct Pool {
    route: Arc<ResolvedRoute>,
    /// The `[storage.<name>]` its connections count against.
    storage: Arc<str>,
    shared: Arc<PoolShared>,
    /// Server connections counted against pool_size: opening, idle, active.
    total: usize,
    opening: usize,
    /// Servers handed to the router, idle on the worker that holds them.
    idle: VecDeque<(WorkerId, Key)>,
    /// Needs queued, FIFO, one entry per server a worker asked for.
    needs: VecDeque<WorkerId>,
    /// The config moved this route elsewhere: close servers as they free up.
    retired: bool,
}

impl Pool {
    fn has_room(&self) -> bool {
        self.route.route.pool_size == 0 || self.total < self.route.route.pool_size
    }

    /// The first need queued by worker `w`, if any.
    fn pop_need_of(&mut self, w: WorkerId) -> Option<WorkerId> {
        let i = self.needs.iter().position(|&x| x == w)?;
        self.needs.remove(i)?;
        if let Some(n) = self.shared.waiting.get(w) {
            n.fetch_sub(1, Ordering::SeqCst);
        }
        Some(w)
    }

    fn pop_need(&mut self) -> Option<WorkerId> {
        let w = self.needs.pop_front()?;
        if let Some(n) = self.shared.waiting.get(w) {
            n.fetch_sub(1, Ordering::SeqCst);
        }
        Some(w)
    }
}

/// All pools.
#[derive(Debug)]
pub(crate) struct Router {
    pools: HashMap<PoolKey, Pool>,
    storages: HashMap<Arc<str>, StorageBook>,
    registry: Arc<Registry>,
    /// What a call decided about pools other than the one it was about
    /// (storage_max moves connections between routes); see `take_actions`.
    extra: Vec<(PoolKey, Action)>,
}

impl Router {
    pub(crate) fn new(registry: Arc<Registry>) -> Self {
        Self {
            pools: HashMap::new(),
            storages: HashMap::new(),
            registry,
            extra: Vec::new(),
        }
    }

    /// The actions on other pools that the latest calls decided; the
    /// system thread carries them out after each call.
    pub(crate) fn take_actions(&mut self) -> Vec<(PoolKey, Action)> {
        std::mem::take(&mut self.extra)
    }

    fn pool(&mut self, key: &PoolKey, route: &Arc<ResolvedRoute>) -> &mut Pool {
        let registry = &self.registry;
        let storage: Arc<str> = Arc::from(route.route.storage.as_str());
        self.storages
            .entry(Arc::clone(&storage))
            .or_insert_with(|| StorageBook {
                max: route.storage.storage_max,
                ..Default::default()
            });
        self.pools.entry(key.clone()).or_insert_with(|| Pool {
            route: Arc::clone(route),
            storage,
            shared: registry.get(key),
            total: 0,
            opening: 0,
            idle: VecDeque::new(),
            needs: VecDeque::new(),
            retired: false,
        })
    }

    /// Counts a new connection of `pool` against its pool and storage.
    fn open_one(pool: &mut Pool, book: Option<&mut StorageBook>) {
        pool.total += 1;
        pool.opening += 1;
        if let Some(b) = book {
            b.total += 1;
        }
    }

    /// `starving` waits on a full storage: frees a connection of another
    /// route for it, and asks the routes above their fair share to give
    /// some back as they release them.
    ///
    /// An idle connection of another route the router holds is closed at
    /// once (its close hands the slot over); else the workers keeping idle
    /// ones are asked for one (`release` closes it). The share is
    /// storage_max over the routes that hold or want connections.
    fn evict_for(&mut self, storage: &Arc<str>, starving: &PoolKey) {
        let Some(book) = self.storages.get(storage) else {
            return;
        };
        let same = |p: &Pool| Arc::ptr_eq(&p.storage, storage) || p.storage == *storage;
        let demand = self
            .pools
            .values()
            .filter(|p| same(p) && (p.total > 0 || !p.needs.is_empty()))
            .count()
            .max(1);
        let fair = (book.max / demand).max(1);
        if let Some(b) = self.storages.get_mut(storage) {
            b.shrinking = true;
        }
        let mut freed = false;
        for (k, p) in self.pools.iter_mut() {
            if !same(p) || k == starving {
                continue;
            }
            p.shared
                .shrink
                .store(p.total.saturating_sub(fair), Ordering::Relaxed);
            if freed {
                continue;
            }
            if let Some((worker, server)) = p.idle.pop_front() {
                self.extra
                    .push((k.clone(), Action::Close { worker, server }));
                freed = true;
            } else {
                let reclaim: Vec<_> = (0..p.shared.idle.len())
                    .filter(|&w| p.shared.idle[w].load(Ordering::SeqCst) > 0)
                    .collect();
                if !reclaim.is_empty() {
                    self.extra.push((k.clone(), Action::Wait { reclaim }));
                    freed = true;
                }
            }
        }
    }

    /// True when a route other than `key` waits for a connection of its
    /// (full) storage.
    fn others_starved(&self, key: &PoolKey, storage: &Arc<str>) -> bool {
        self.storages
            .get(storage)
            .is_some_and(|b| b.starved.iter().any(|k| k != key))
    }

    /// Drops from the storage's line the pools whose needs were met
    /// another way (a released server, a local one); when nobody waits any
    /// more, nobody needs to give back.
    fn settle(&mut self, storage: &Arc<str>) {
        let Some(b) = self.storages.get_mut(storage) else {
            return;
        };
        let pools = &self.pools;
        b.starved
            .retain(|k| pools.get(k).is_some_and(|p| !p.needs.is_empty()));
        // (Only then: this runs on every release through the router.)
        if b.starved.is_empty() && b.shrinking {
            b.shrinking = false;
            for p in self.pools.values().filter(|p| p.storage == *storage) {
                p.shared.shrink.store(0, Ordering::Relaxed);
            }
        }
    }

    /// `worker` needs one more server for its queued clients. Prefers a
    /// server the router holds on that worker, then one on another worker,
    /// then a new one within pool_size; otherwise the need queues (FIFO).
    pub(crate) fn need(
        &mut self,
        key: &PoolKey,
        route: &Arc<ResolvedRoute>,
        worker: WorkerId,
    ) -> Action {
        // A new pool takes the route it was asked with; an existing one
        // keeps the route `configure` gave it: clients that logged in
        // before a reload still carry the old one, which must not bring
        // the old pool_size back.
        let storage = Arc::clone(&self.pool(key, route).storage);
        let Some(pool) = self.pools.get_mut(key) else {
            return Action::Wait { reclaim: vec![] };
        };
        if let Some(i) = pool.idle.iter().rposition(|(w, _)| *w == worker) {
            if let Some((_, server)) = pool.idle.remove(i) {
                return Action::Grant {
                    worker,
                    lease: Lease::Local(server),
                };
            }
        }
        if let Some((from, server)) = pool.idle.pop_back() {
            return Action::Ship {
                from,
                server,
                to: worker,
            };
        }
        let book = self.storages.get_mut(&storage);
        let storage_full = book.as_ref().is_some_and(|b| !b.has_room());
        let room = pool.has_room();
        if pool.needs.is_empty() && room && !storage_full {
            Self::open_one(pool, book);
            return Action::Grant {
                worker,
                lease: Lease::New,
            };
        }
        pool.needs.push_back(worker);
        if let Some(n) = pool.shared.waiting.get(worker) {
            n.fetch_add(1, Ordering::SeqCst);
        }
        let reclaim = (0..pool.shared.idle.len())
            .filter(|&w| pool.shared.idle[w].load(Ordering::SeqCst) > 0)
            .collect();
        // Held back by the storage, not by its own pool_size: its turn
        // comes among the storage's routes, and another route makes room.
        if room && storage_full {
            if let Some(b) = book {
                if !b.starved.contains(key) {
                    b.starved.push_back(key.clone());
                }
            }
            self.evict_for(&storage, key);
        }
        Action::Wait { reclaim }
    }

    /// `worker` no longer needs `n` of the servers it asked for (its queue
    /// emptied): its latest queued needs go.
    pub(crate) fn cancel_need(&mut self, key: &PoolKey, worker: WorkerId, n: usize) {
        let Some(p) = self.pools.get_mut(key) else {
            return;
        };
        let mut left = n;
        let storage = Arc::clone(&p.storage);
        let mut i = p.needs.len();
        while left > 0 && i > 0 {
            i -= 1;
            if p.needs[i] == worker {
                p.needs.remove(i);
                left -= 1;
                if let Some(c) = p.shared.waiting.get(worker) {
                    c.fetch_sub(1, Ordering::SeqCst);
                }
            }
        }
        if p.needs.is_empty() {
            if let Some(b) = self.storages.get_mut(&storage) {
                b.starved.retain(|k| k != key);
            }
            self.settle(&storage);
        }
    }

    /// A new server finished logging in.
    pub(crate) fn server_up(&mut self, key: &PoolKey) {
        if let Some(p) = self.pools.get_mut(key) {
            p.opening = p.opening.saturating_sub(1);
        }
    }

    /// A server on `worker` is handed to the router: it goes to the first
    /// queued need of `to` (the worker `PoolShared::gives_way` chose), else
    /// to the first queued need, or into the router's idle list.
    pub(crate) fn release(
        &mut self,
        key: &PoolKey,
        worker: WorkerId,
        server: Key,
        to: Option<WorkerId>,
    ) -> Option<Action> {
        let Some(p) = self.pools.get(key) else {
            return Some(Action::Close { worker, server });
        };
        // A retired pool's servers still serve its remaining clients (those
        // that logged in before the reload) and close when none waits.
        // Another route waiting on the full storage takes the slot of a
        // server nobody here waits for.
        if p.needs.is_empty() && (p.retired || self.others_starved(key, &p.storage)) {
            return Some(Action::Close { worker, server });
        }
        // Above a pool_size that a reload lowered: it closes, whoever waits
        // (the needs are met once the pool is back under its size).
        if p.shared.give_up_oversize() {
            return Some(Action::Close { worker, server });
        }
        let p = self.pools.get_mut(key)?;
        let storage = Arc::clone(&p.storage);
        let need = match to {
            Some(w) => p.pop_need_of(w).or_else(|| p.pop_need()),
            None => p.pop_need(),
        };
        let action = match need {
            Some(w) if w == worker => Some(Action::Grant {
                worker,
                lease: Lease::Local(server),
            }),
            Some(to) => Some(Action::Ship {
                from: worker,
                server,
                to,
            }),
            None => {
                p.idle.push_back((worker, server));
                None
            }
        };
        self.settle(&storage);
        action
    }

    /// A server connection closed (or never opened): its slot frees up and
    /// goes to the first queued need as a new connection.
    pub(crate) fn server_closed(
        &mut self,
        key: &PoolKey,
        worker: WorkerId,
        server: Option<Key>,
        was: ServerWas,
    ) -> Option<Action> {
        let p = self.pools.get_mut(key)?;
        p.total = p.total.saturating_sub(1);
        // A server that closed for another reason (an error, pool_ttl)
        // while the pool was above a lowered pool_size counts towards the
        // excess. Only ever lowered here: `total` still counts the servers
        // the workers gave up but whose close is not reported yet.
        let size = p.route.route.pool_size;
        let over = if size == 0 {
            0
        } else {
            p.total.saturating_sub(size)
        };
        let _ = p
            .shared
            .oversize
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n > over).then_some(over)
            });
        let storage = Arc::clone(&p.storage);
        let book = self.storages.get_mut(&storage);
        match was {
            ServerWas::Opening => p.opening = p.opening.saturating_sub(1),
            ServerWas::Idle => {
                if let Some(s) = server {
                    p.idle.retain(|&(w, k)| !(w == worker && k == s));
                }
            }
            ServerWas::Active => {}
        }
        let own_turn = !p.needs.is_empty() && p.has_room();
        // The freed connection goes to the storage's routes in turn: the
        // first starved one, this pool going to the back of the line if it
        // waits too; else this pool's own first need.
        let mut none = StorageBook::default();
        let book = match book {
            Some(b) => {
                b.total = b.total.saturating_sub(1);
                b
            }
            None => &mut none,
        };
        while let Some(next) = book.starved.pop_front() {
            if next == *key {
                continue;
            }
            let Some(np) = self.pools.get_mut(&next) else {
                continue;
            };
            if np.needs.is_empty() || !np.has_room() {
                continue;
            }
            let Some(w) = np.pop_need() else {
                continue;
            };
            Self::open_one(np, Some(&mut *book));
            if !np.needs.is_empty() {
                book.starved.push_back(next.clone());
            }
            if own_turn && !book.starved.contains(key) {
                book.starved.push_back(key.clone());
            }
            self.extra.push((
                next,
                Action::Grant {
                    worker: w,
                    lease: Lease::New,
                },
            ));
            self.settle(&storage);
            return None;
        }
        let p = self.pools.get_mut(key)?;
        let mut grant = None;
        if own_turn {
            if let Some(w) = p.pop_need() {
                Self::open_one(p, self.storages.get_mut(&storage));
                grant = Some(Action::Grant {
                    worker: w,
                    lease: Lease::New,
                });
            }
        }
        // Needs left with room in the pool wait for the storage only: they
        // are in its line.
        if !p.needs.is_empty() && p.has_room() {
            if let Some(b) = self.storages.get_mut(&storage) {
                if b.max > 0 && !b.starved.contains(key) {
                    b.starved.push_back(key.clone());
                }
            }
        }
        self.settle(&storage);
        grant
    }

    /// Applies a new config: pools whose route now resolves elsewhere are
    /// retired (their idle servers closed, busy ones closed when released);
    /// the others take the new settings (pool_size, pool_timeout).
    pub(crate) fn configure(&mut self, cfg: &Config) -> Vec<(PoolKey, Action)> {
        let mut actions = Vec::new();
        for (name, st) in &cfg.storage {
            if let Some(b) = self.storages.get_mut(name.as_str()) {
                b.max = st.storage_max;
            }
        }
        for (key, pool) in &mut self.pools {
            match cfg.route(&key.database, &key.user) {
                Some(r) if PoolKey::new(&key.database, &key.user, &r, key.host.into()) == *key => {
                    // Renamed storage, same server: its connections count
                    // against the new name from now on.
                    if *pool.storage != *r.route.storage {
                        let to: Arc<str> = Arc::from(r.route.storage.as_str());
                        if let Some(b) = self.storages.get_mut(&pool.storage) {
                            b.total = b.total.saturating_sub(pool.total);
                            b.starved.retain(|k| k != key);
                        }
                        let b =
                            self.storages
                                .entry(Arc::clone(&to))
                                .or_insert_with(|| StorageBook {
                                    max: r.storage.storage_max,
                                    ..Default::default()
                                });
                        b.total += pool.total;
                        pool.storage = to;
                    }
                    let resized = r.route.pool_size != pool.route.route.pool_size;
                    pool.route = r;
                    if resized {
                        let book = self.storages.get_mut(&pool.storage);
                        Self::resize(key, pool, book, &mut actions);
                    }
                }
                _ => {
                    pool.retired = true;
                    pool.shared.retired.store(true, Ordering::SeqCst);
                    for (worker, server) in pool.idle.drain(..) {
                        actions.push((key.clone(), Action::Close { worker, server }));
                    }
                    actions.push((key.clone(), Action::Retire { pool: key.clone() }));
                }
            }
        }
        actions
    }

    /// A reload gave `pool` a new pool_size (already in `pool.route`).
    ///
    /// Lowered: the servers it holds above it go. Those idle in the
    /// router's list close now; the workers close the ones they keep idle
    /// (`Shrink`) and give up the busy ones as they are released
    /// (`oversize`), so no transaction is cut short. `total` may still
    /// count servers given up for an earlier lowering whose close is not
    /// reported yet; `server_closed` lowers the excess as those come in.
    ///
    /// Raised (or 0, unlimited): what a lower size still had to close
    /// stays, and the needs queued for want of room get new connections
    /// now rather than at the next close.
    fn resize(
        key: &PoolKey,
        pool: &mut Pool,
        mut book: Option<&mut StorageBook>,
        actions: &mut Vec<(PoolKey, Action)>,
    ) {
        let size = pool.route.route.pool_size;
        let mut excess = if size == 0 {
            0
        } else {
            pool.total.saturating_sub(size)
        };
        while excess > 0 {
            let Some((worker, server)) = pool.idle.pop_front() else {
                break;
            };
            actions.push((key.clone(), Action::Close { worker, server }));
            excess -= 1;
        }
        pool.shared.oversize.store(excess, Ordering::SeqCst);
        if excess > 0 {
            actions.push((key.clone(), Action::Shrink { pool: key.clone() }));
        }
        while pool.has_room() && book.as_ref().is_none_or(|b| b.has_room()) {
            let Some(worker) = pool.pop_need() else {
                break;
            };
            Self::open_one(pool, book.as_deref_mut());
            let lease = Lease::New;
            actions.push((key.clone(), Action::Grant { worker, lease }));
        }
    }

    /// Pools short of their route's `min_pool_size` get new connections,
    /// dealt round-robin to the workers (each counted as opening). Pools of
    /// exact routes (neither name `default`) exist from the start, so they
    /// are kept warm before any client comes.
    pub(crate) fn warm(&mut self, cfg: &Config, workers: usize) -> Vec<(PoolKey, WorkerId)> {
        for (db, d) in &cfg.database {
            for (user, r) in &d.user {
                if r.min_pool_size == 0 || db == "default" || user == "default" {
                    continue;
                }
                if let Some(route) = cfg.route(db, user) {
                    // min_pool_size holds on every host.
                    for host in 0..route.endpoints.len() {
                        let key = PoolKey::new(db, user, &route, host);
                        self.pool(&key, &route);
                    }
                }
            }
        }
        let mut out = Vec::new();
        let workers = workers.max(1);
        for (key, p) in &mut self.pools {
            let min = p.route.route.min_pool_size;
            let cap = match p.route.route.pool_size {
                0 => min,
                n => min.min(n),
            };
            let mut book = self.storages.get_mut(&p.storage);
            while !p.retired && p.total < cap && book.as_ref().is_none_or(|b| b.has_room()) {
                Self::open_one(p, book.as_deref_mut());
                out.push((key.clone(), (p.total + out.len()) % workers));
            }
        }
        out
    }

    /// The route a pool serves, as of the latest need.
    pub(crate) fn route_of(&self, key: &PoolKey) -> Option<Arc<ResolvedRoute>> {
        self.pools.get(key).map(|p| Arc::clone(&p.route))
    }

    /// The storages' books, for inspect.
    pub(crate) fn storage_stats(&self) -> Vec<odissey_facade::StorageStats> {
        let mut v: Vec<_> = self
            .storages
            .iter()
            .map(|(name, b)| odissey_facade::StorageStats {
                name: name.to_string(),
                storage_max: b.max,
                connections: b.total,
                routes_waiting: b.starved.len(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The hosts of routed storages (`hosts::Hosts::stats`).
    pub(crate) fn host_stats(&self) -> Vec<odissey_facade::HostStats> {
        self.registry.hosts.stats(std::time::Instant::now())
    }

    /// Whether some pool (current or retired) serves database `db`.
    pub(crate) fn knows_database(&self, db: &str) -> bool {
        self.pools.keys().any(|k| &*k.database == db)
    }

    /// Snapshot for inspect.
    pub(crate) fn stats(&self) -> Vec<odissey_facade::RouteStats> {
        let mut v: Vec<_> = self
            .pools
            .iter()
            .map(|(k, p)| (k, p, p.shared.clients.load(Ordering::Relaxed)))
            .filter(|(_, p, clients)| !(p.retired && p.total == 0 && *clients == 0))
            .map(|(k, p, clients)| {
                let idle = (p.idle.len() + p.shared.idle_total()).min(p.total);
                let waiting = p
                    .shared
                    .clients_waiting
                    .load(Ordering::Relaxed)
                    .min(clients);
                odissey_facade::RouteStats {
                    database: k.database.to_string(),
                    user: k.user.to_string(),
                    host: p.route.endpoint(k.host).label(),
                    pool_mode: p.route.route.pool.as_str().to_string(),
                    clients_active: clients - waiting,
                    clients_waiting: waiting,
                    servers_active: p.total.saturating_sub(idle).saturating_sub(p.opening),
                    servers_idle: idle,
                    servers_login: p.opening,
                    pool_size: p.route.route.pool_size,
                    // Filled in from the workers' counters by a gathering.
                    ..Default::default()
                }
            })
            .collect();
        v.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use odissey_reactor::Machines;

    fn route(size: usize) -> (PoolKey, Arc<ResolvedRoute>) {
        let cfg = Config::parse(&format!(
            "[[listen]]\nport = 0\n[storage.s]\ntype = \"remote\"\n\
             [database.d.user.u]\nauthentication = \"none\"\nstorage = \"s\"\n\
             pool = \"transaction\"\npool_size = {size}\n"
        ))
        .unwrap();
        let r = cfg.route("d", "u").unwrap();
        (PoolKey::new("d", "u", &r, 0), r)
    }

    /// Two routes (users a and b) on one storage capped at `max`.
    fn shared_storage(max: usize, pool_size: usize) -> [(PoolKey, Arc<ResolvedRoute>); 2] {
        let cfg = Config::parse(&format!(
            "[[listen]]\nport = 0\n[storage.s]\ntype = \"remote\"\nstorage_max = {max}\n\
             [database.d.user.a]\nauthentication = \"none\"\nstorage = \"s\"\n\
             pool = \"transaction\"\npool_size = {pool_size}\n\
             [database.d.user.b]\nauthentication = \"none\"\nstorage = \"s\"\n\
             pool = \"transaction\"\npool_size = {pool_size}\n"
        ))
        .unwrap();
        ["a", "b"].map(|u| {
            let r = cfg.route("d", u).unwrap();
            (PoolKey::new("d", u, &r, 0), r)
        })
    }

    #[test]
    fn a_full_storage_hands_freed_connections_to_the_waiting_route() {
        let [(a, ra), (b, rb)] = shared_storage(2, 10);
        let registry = Arc::new(Registry::new(1));
        let mut router = Router::new(Arc::clone(&registry));
        let new = |w| Action::Grant {
            worker: w,
            lease: Lease::New,
        };
        // Route a takes the whole storage and wants more.
        assert_eq!(router.need(&a, &ra, 0), new(0));
        assert_eq!(router.need(&a, &ra, 0), new(0));
        assert_eq!(router.need(&a, &ra, 0), Action::Wait { reclaim: vec![] });
        assert!(
            router.take_actions().is_empty(),
            "a waits on its own storage: nobody to evict"
        );
        // Route b finds the storage full: a is over its share (2 / 2
        // routes = 1) and must give one back as it releases.
        assert_eq!(router.need(&b, &rb, 0), Action::Wait { reclaim: vec![] });
        let sa = registry.get(&a);
        assert_eq!(
            sa.give_up_one(),
            Some(GiveUp::StorageShare),
            "a gives up one connection"
        );
        assert_eq!(sa.give_up_one(), None, "and only one");
        // The connection a gives up goes to b, not to a's own queued need.
        router.server_up(&a);
        router.server_up(&a);
        assert_eq!(router.server_closed(&a, 0, None, ServerWas::Idle), None);
        assert_eq!(router.take_actions(), vec![(b.clone(), new(0))]);
        // The next freed connection is a's turn again.
        assert_eq!(
            router.server_closed(&a, 0, None, ServerWas::Active),
            Some(new(0))
        );
        assert!(router.take_actions().is_empty());
        // Nobody starves any more: nothing more to give up.
        assert_eq!(sa.give_up_one(), None);
    }

    #[test]
    fn idle_connections_of_other_routes_are_closed_for_a_starved_one() {
        let [(a, ra), (b, rb)] = shared_storage(1, 10);
        let registry = Arc::new(Registry::new(2));
        let mut router = Router::new(Arc::clone(&registry));
        let s = keys(1);
        assert!(matches!(router.need(&a, &ra, 0), Action::Grant { .. }));
        router.server_up(&a);
        // Idle in the router's list: closed at once for b.
        assert_eq!(router.release(&a, 0, s[0], None), None);
        assert_eq!(router.need(&b, &rb, 1), Action::Wait { reclaim: vec![] });
        assert_eq!(
            router.take_actions(),
            vec![(
                a.clone(),
                Action::Close {
                    worker: 0,
                    server: s[0]
                }
            )]
        );
        assert_eq!(
            router.server_closed(&a, 0, Some(s[0]), ServerWas::Idle),
            None
        );
        assert_eq!(
            router.take_actions(),
            vec![(
                b.clone(),
                Action::Grant {
                    worker: 1,
                    lease: Lease::New
                }
            )]
        );
        // Kept idle on a worker: that worker is asked for it, and what it
        // hands back closes (b waits for the storage, a for nothing).
        router.server_up(&b);
        let sb = registry.get(&b);
        assert!(sb.keep(1).is_some());
        assert_eq!(router.need(&a, &ra, 0), Action::Wait { reclaim: vec![] });
        assert_eq!(
            router.take_actions(),
            vec![(b.clone(), Action::Wait { reclaim: vec![1] })]
        );
        sb.taken(1);
        // (a waits, so a released b is closed, its slot going to a.)
        assert_eq!(
            router.release(&b, 1, s[0], None),
            Some(Action::Close {
                worker: 1,
                server: s[0]
            })
        );
        // a gives up waiting: nobody starves, b's connections stay.
        router.cancel_need(&a, 0, 1);
        assert_eq!(router.release(&b, 1, s[0], None), None);
    }

    #[test]
    fn a_need_met_by_a_release_leaves_the_storage_line() {
        let [(a, ra), (b, rb)] = shared_storage(2, 10);
        let registry = Arc::new(Registry::new(2));
        let mut router = Router::new(Arc::clone(&registry));
        let s = keys(1);
        assert!(matches!(router.need(&a, &ra, 0), Action::Grant { .. }));
        assert!(matches!(router.need(&a, &ra, 0), Action::Grant { .. }));
        // Both routes wait on the full storage.
        assert_eq!(router.need(&b, &rb, 1), Action::Wait { reclaim: vec![] });
        assert_eq!(router.need(&a, &ra, 1), Action::Wait { reclaim: vec![] });
        router.take_actions();
        assert_eq!(router.storage_stats()[0].routes_waiting, 2);
        // a's need is met by one of its own servers, released on worker 0.
        assert_eq!(
            router.release(&a, 0, s[0], None),
            Some(Action::Ship {
                from: 0,
                server: s[0],
                to: 1
            })
        );
        assert_eq!(router.storage_stats()[0].routes_waiting, 1, "b only");
        // b gives up: nobody waits, nobody gives back.
        router.cancel_need(&b, 1, 1);
        assert_eq!(router.storage_stats()[0].routes_waiting, 0);
        assert_eq!(registry.get(&a).give_up_one(), None);
    }

    fn keys(n: usize) -> Vec<Key> {
        let mut m = Machines::default();
        (0..n).map(|i| m.insert_with(|_| i)).collect()
    }

    #[test]
    fn pool_size_is_global_and_needs_are_fifo() {
        let (k, r) = route(2);
        let registry = Arc::new(Registry::new(2));
        let mut router = Router::new(Arc::clone(&registry));
        let s = keys(2);
        let new = |w| Action::Grant {
            worker: w,
            lease: Lease::New,
        };
        assert_eq!(router.need(&k, &r, 0), new(0));
        assert_eq!(router.need(&k, &r, 1), new(1));
        assert_eq!(router.need(&k, &r, 1), Action::Wait { reclaim: vec![] });
        assert_eq!(router.need(&k, &r, 0), Action::Wait { reclaim: vec![] });
        let shared = registry.get(&k);
        assert!(shared.others_waiting(0) && shared.others_waiting(1));
        // Worker 0 keeps what it releases while worker 1's clients wait,
        // but is told to lend it (after LEND_AFTER, if none of its own
        // came).
        shared.publish_queue(1, 1, 1, 1.0);
        assert_eq!(shared.keep(0), Some(true));
        shared.taken(0);
        router.server_up(&k);
        router.server_up(&k);
        assert_eq!(
            router.release(&k, 0, s[0], None),
            Some(Action::Ship {
                from: 0,
                server: s[0],
                to: 1
            })
        );
        assert_eq!(
            router.release(&k, 0, s[1], None),
            Some(Action::Grant {
                worker: 0,
                lease: Lease::Local(s[1])
            })
        );
        assert!(!shared.others_waiting(0) && !shared.others_waiting(1));
        assert_eq!(
            shared.keep(0),
            Some(false),
            "nobody waits: the worker keeps it"
        );
        assert_eq!(router.stats()[0].servers_idle, 1);
        shared.taken(0);
        assert_eq!(router.release(&k, 1, s[0], None), None);
        // A server the router holds on the asking worker is preferred.
        assert_eq!(
            router.need(&k, &r, 1),
            Action::Grant {
                worker: 1,
                lease: Lease::Local(s[0])
            }
        );
    }

    #[test]
    fn a_lowered_pool_size_closes_the_servers_above_it_as_they_free_up() {
        let (k, r) = route(4);
        let registry = Arc::new(Registry::new(2));
        let mut router = Router::new(Arc::clone(&registry));
        let s = keys(4);
        for w in [0, 0, 1, 1] {
            assert!(matches!(router.need(&k, &r, w), Action::Grant { .. }));
            router.server_up(&k);
        }
        // One idle in the router's list, the other three busy or kept.
        assert_eq!(router.release(&k, 0, s[0], None), None);
        let cfg = Config::parse(&cfg_text(2)).unwrap();
        let actions = router.configure(&cfg);
        assert_eq!(
            actions,
            vec![
                (
                    k.clone(),
                    Action::Close {
                        worker: 0,
                        server: s[0]
                    }
                ),
                (k.clone(), Action::Shrink { pool: k.clone() }),
            ],
            "the router's idle server closes now, the workers are asked for one more"
        );
        let shared = registry.get(&k);
        // A busy one handed to the router is the other excess server.
        assert_eq!(
            router.release(&k, 1, s[1], None),
            Some(Action::Close {
                worker: 1,
                server: s[1]
            })
        );
        assert_eq!(shared.give_up_one(), None, "4 - 2 = 2: both are going");
        // Until both closes are reported the pool is full: a need waits.
        assert_eq!(router.need(&k, &r, 1), Action::Wait { reclaim: vec![] });
        router.cancel_need(&k, 1, 1);
        assert_eq!(
            router.server_closed(&k, 0, Some(s[0]), ServerWas::Idle),
            None
        );
        assert_eq!(
            router.server_closed(&k, 1, Some(s[1]), ServerWas::Active),
            None
        );
        assert_eq!(router.stats()[0].pool_size, 2);
        // Two left, both busy: a third need still waits.
        assert_eq!(router.need(&k, &r, 1), Action::Wait { reclaim: vec![] });
        router.cancel_need(&k, 1, 1);

        // Lowered again (2 -> 1) while a server dies on its own: the
        // excess shrinks with it, so the pool does not fall below its size.
        let cfg1 = Config::parse(&cfg_text(1)).unwrap();
        assert_eq!(
            router.configure(&cfg1),
            vec![(k.clone(), Action::Shrink { pool: k.clone() })]
        );
        assert_eq!(router.server_closed(&k, 1, None, ServerWas::Active), None);
        assert_eq!(shared.give_up_one(), None, "already down to 1");
        // Raised again: the need queued for want of room is met at once.
        assert!(matches!(router.need(&k, &r, 0), Action::Wait { .. }));
        assert_eq!(
            router.configure(&Config::parse(&cfg_text(4)).unwrap()),
            vec![(
                k.clone(),
                Action::Grant {
                    worker: 0,
                    lease: Lease::New
                }
            )]
        );
        assert!(!shared.others_waiting(1), "the need left the queue");
        router.server_up(&k);
        // Lowered to 1 with 2 open, then unlimited: nothing goes.
        router.configure(&Config::parse(&cfg_text(1)).unwrap());
        assert!(router
            .configure(&Config::parse(&cfg_text(0)).unwrap())
            .is_empty());
        assert_eq!(shared.give_up_one(), None, "unlimited: nothing to give up");
        assert_eq!(
            router.release(&k, 0, s[2], None),
            None,
            "kept in the router's list"
        );
    }

    fn cfg_text(size: usize) -> String {
        format!(
            "[[listen]]\nport = 0\n[storage.s]\ntype = \"remote\"\n\
             [database.d.user.u]\nauthentication = \"none\"\nstorage = \"s\"\n\
             pool = \"transaction\"\npool_size = {size}\n"
        )
    }

    #[test]
    fn waiting_needs_reclaim_kept_servers_and_closes_free_slots() {
        let (k, r) = route(1);
        let registry = Arc::new(Registry::new(2));
        let mut router = Router::new(Arc::clone(&registry));
        let shared = registry.get(&k);
        assert!(matches!(router.need(&k, &r, 0), Action::Grant { .. }));
        assert!(shared.keep(0).is_some());
        assert_eq!(router.need(&k, &r, 1), Action::Wait { reclaim: vec![0] });
        assert_eq!(router.need(&k, &r, 1), Action::Wait { reclaim: vec![0] });
        router.cancel_need(&k, 1, 1);
        // The server dies while idle on worker 0: the slot goes to worker 1.
        assert_eq!(
            router.server_closed(&k, 0, None, ServerWas::Idle),
            Some(Action::Grant {
                worker: 1,
                lease: Lease::New
            })
        );
        assert!(
            !shared.others_waiting(0),
            "both of worker 1's needs are settled"
        );
    }
}
