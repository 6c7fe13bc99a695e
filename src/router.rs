//! Pools and the router: who gets which server connection.
//!
//! The router runs on the system thread and only does bookkeeping: it never
//! touches a socket. Workers ask it for a server (`attach`) and give servers
//! back (`release`); it answers with [`Action`]s that the system thread
//! turns into commands for the workers. A route's `pool_size` is global
//! across workers because only the router hands out servers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use odissey_reactor::Key;

use crate::config::{Config, ResolvedRoute};

/// Index of a worker thread.
pub(crate) type WorkerId = usize;

/// Which pool a client belongs to: its real database and user, plus where
/// and as whom the server connections log in (so a reload that moves a route
/// to another server starts a fresh pool instead of reusing old servers).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) database: String,
    pub(crate) user: String,
    server: String,
}

impl PoolKey {
    pub(crate) fn new(database: &str, user: &str, route: &ResolvedRoute) -> Self {
        let s = &route.storage;
        Self {
            database: database.to_string(),
            user: user.to_string(),
            server: format!(
                "{}:{}:{:?}:{}:{}:{:?}",
                s.host,
                s.port,
                s.unix_socket_dir,
                route.server_db,
                route.server_user,
                route.server_password
            ),
        }
    }
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.database, self.user)
    }
}

/// How a waiting client gets its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lease {
    /// Open a new connection (already counted against pool_size).
    New,
    /// Take this idle server, which lives on the client's own worker.
    Local(Key),
}

/// What the system thread must do after a router call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Tell `worker` that `client` got a server.
    Grant {
        worker: WorkerId,
        client: Key,
        lease: Lease,
    },
    /// Tell worker `from` to hand its idle `server` to `client` on `to`.
    Ship {
        from: WorkerId,
        server: Key,
        to: WorkerId,
        client: Key,
    },
    /// The client waits; time it out at the deadline (if any), and ask
    /// these workers for the idle servers they keep.
    Wait {
        deadline: Option<Instant>,
        reclaim: Vec<WorkerId>,
    },
    /// Tell `worker` to close its idle `server` (the pool was retired).
    Close { worker: WorkerId, server: Key },
    /// Tell every worker to close the idle servers it keeps for `pool`.
    Retire { pool: PoolKey },
}

/// What the router and the workers share about one pool, as atomics so
/// that the hot path needs neither a lock nor a message.
///
/// The two counters form a handshake: a worker about to keep a released
/// server increments its `idle` count *then* reads `waiting`; the router
/// about to queue a client increments `waiting` *then* reads the `idle`
/// counts. With sequentially consistent atomics at least one of them sees
/// the other, so a queued client is never left waiting beside an idle
/// server.
#[derive(Debug)]
pub(crate) struct PoolShared {
    /// Clients queued at the router.
    pub(crate) waiting: AtomicUsize,
    /// The pool was retired by a reload: close its servers as they free up.
    pub(crate) retired: AtomicBool,
    /// Idle servers each worker keeps for itself.
    pub(crate) idle: Box<[AtomicUsize]>,
}

impl PoolShared {
    fn new(workers: usize) -> Self {
        Self {
            waiting: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            idle: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Idle servers kept by the workers, in total.
    pub(crate) fn idle_total(&self) -> usize {
        self.idle.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// A worker keeps a released server: true when it may (nobody queues
    /// at the router), false when it must hand it to the router instead.
    pub(crate) fn keep(&self, worker: WorkerId) -> bool {
        let Some(idle) = self.idle.get(worker) else {
            return false;
        };
        idle.fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 || self.retired.load(Ordering::SeqCst) {
            idle.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// A worker takes one of its kept servers back out of its idle list.
    pub(crate) fn taken(&self, worker: WorkerId) {
        if let Some(idle) = self.idle.get(worker) {
            let _ = idle.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Waiter {
    worker: WorkerId,
    client: Key,
}

/// Where a closed server was when it closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerWas {
    /// Connecting or logging in.
    Opening,
    /// Idle in the pool.
    Idle,
    /// Attached to a client (or being reset).
    Active,
}

#[derive(Debug)]
struct Pool {
    route: Arc<ResolvedRoute>,
    shared: Arc<PoolShared>,
    /// Server connections counted against pool_size: opening, idle, active.
    total: usize,
    opening: usize,
    idle: VecDeque<(WorkerId, Key)>,
    waiters: VecDeque<Waiter>,
    clients: usize,
    /// The config moved this route elsewhere: close servers as they free up.
    retired: bool,
}

impl Pool {
    fn has_room(&self) -> bool {
        self.route.route.pool_size == 0 || self.total < self.route.route.pool_size
    }

    fn pop_waiter(&mut self) -> Option<Waiter> {
        let w = self.waiters.pop_front()?;
        self.shared.waiting.fetch_sub(1, Ordering::SeqCst);
        Some(w)
    }

    fn remove_waiter(&mut self, worker: WorkerId, client: Key) -> bool {
        let before = self.waiters.len();
        self.waiters
            .retain(|w| !(w.worker == worker && w.client == client));
        let removed = before - self.waiters.len();
        self.shared.waiting.fetch_sub(removed, Ordering::SeqCst);
        removed > 0
    }
}

/// All pools.
#[derive(Debug, Default)]
pub(crate) struct Router {
    pools: HashMap<PoolKey, Pool>,
    workers: usize,
}

impl Router {
    /// A router for `workers` worker threads.
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            pools: HashMap::new(),
            workers,
        }
    }

    /// The state shared with the workers for a pool.
    pub(crate) fn shared(&self, key: &PoolKey) -> Option<Arc<PoolShared>> {
        self.pools.get(key).map(|p| Arc::clone(&p.shared))
    }

    fn pool(&mut self, key: &PoolKey, route: &Arc<ResolvedRoute>) -> &mut Pool {
        let workers = self.workers;
        self.pools.entry(key.clone()).or_insert_with(|| Pool {
            route: Arc::clone(route),
            shared: Arc::new(PoolShared::new(workers)),
            total: 0,
            opening: 0,
            idle: VecDeque::new(),
            waiters: VecDeque::new(),
            clients: 0,
            retired: false,
        })
    }

    /// A client logged in on a route.
    pub(crate) fn client_opened(&mut self, key: &PoolKey, route: &Arc<ResolvedRoute>) {
        self.pool(key, route).clients += 1;
    }

    /// A client of a route left.
    pub(crate) fn client_closed(&mut self, key: &PoolKey) {
        if let Some(p) = self.pools.get_mut(key) {
            p.clients = p.clients.saturating_sub(1);
        }
    }

    /// `client` on `worker` needs a server. Prefers an idle server on the
    /// same worker (no migration), then any idle server, then a new one
    /// within pool_size; otherwise the client queues, FIFO.
    pub(crate) fn attach(
        &mut self,
        key: &PoolKey,
        route: &Arc<ResolvedRoute>,
        worker: WorkerId,
        client: Key,
        now: Instant,
    ) -> Action {
        let pool = self.pool(key, route);
        if !pool.retired {
            pool.route = Arc::clone(route);
        }
        // Servers idle on this worker: the most recently used first.
        if let Some(i) = pool.idle.iter().rposition(|(w, _)| *w == worker) {
            if let Some((_, server)) = pool.idle.remove(i) {
                return Action::Grant {
                    worker,
                    client,
                    lease: Lease::Local(server),
                };
            }
        }
        if let Some((from, server)) = pool.idle.pop_back() {
            return Action::Ship {
                from,
                server,
                to: worker,
                client,
            };
        }
        // Clients already queued go first, even when room just appeared.
        if pool.waiters.is_empty() && pool.has_room() {
            pool.total += 1;
            pool.opening += 1;
            return Action::Grant {
                worker,
                client,
                lease: Lease::New,
            };
        }
        pool.waiters.push_back(Waiter { worker, client });
        pool.shared.waiting.fetch_add(1, Ordering::SeqCst);
        let reclaim = (0..pool.shared.idle.len())
            .filter(|&w| pool.shared.idle[w].load(Ordering::SeqCst) > 0)
            .collect();
        let timeout = pool.route.route.pool_timeout;
        Action::Wait {
            deadline: (timeout > 0).then(|| now + std::time::Duration::from_millis(timeout)),
            reclaim,
        }
    }

    /// A waiting client gave up or vanished.
    pub(crate) fn abandon(&mut self, key: &PoolKey, worker: WorkerId, client: Key) {
        if let Some(p) = self.pools.get_mut(key) {
            p.remove_waiter(worker, client);
        }
    }

    /// A pool_timeout deadline fired: true when the client was still waiting
    /// (and is now removed), false when it was served meanwhile.
    pub(crate) fn expire(&mut self, key: &PoolKey, worker: WorkerId, client: Key) -> bool {
        let Some(p) = self.pools.get_mut(key) else {
            return false;
        };
        p.remove_waiter(worker, client)
    }

    /// A new server finished logging in.
    pub(crate) fn server_up(&mut self, key: &PoolKey) {
        if let Some(p) = self.pools.get_mut(key) {
            p.opening = p.opening.saturating_sub(1);
        }
    }

    /// A server on `worker` is idle and clean: give it to the first waiter
    /// or keep it idle.
    pub(crate) fn release(
        &mut self,
        key: &PoolKey,
        worker: WorkerId,
        server: Key,
    ) -> Option<Action> {
        let Some(p) = self.pools.get_mut(key) else {
            // Unknown pool (cannot happen: servers are only granted from a
            // pool). Close rather than leak.
            return Some(Action::Close { worker, server });
        };
        if p.retired {
            return Some(Action::Close { worker, server });
        }
        match p.pop_waiter() {
            Some(w) if w.worker == worker => Some(Action::Grant {
                worker,
                client: w.client,
                lease: Lease::Local(server),
            }),
            Some(w) => Some(Action::Ship {
                from: worker,
                server,
                to: w.worker,
                client: w.client,
            }),
            None => {
                p.idle.push_back((worker, server));
                None
            }
        }
    }

    /// A server connection closed (or never opened): its slot frees up and
    /// may go to the first waiter as a new connection.
    pub(crate) fn server_closed(
        &mut self,
        key: &PoolKey,
        worker: WorkerId,
        server: Option<Key>,
        was: ServerWas,
    ) -> Option<Action> {
        let p = self.pools.get_mut(key)?;
        p.total = p.total.saturating_sub(1);
        match was {
            ServerWas::Opening => p.opening = p.opening.saturating_sub(1),
            ServerWas::Idle => {
                if let Some(s) = server {
                    p.idle.retain(|&(w, k)| !(w == worker && k == s));
                }
            }
            ServerWas::Active => {}
        }
        if p.has_room() && !p.retired {
            if let Some(w) = p.pop_waiter() {
                p.total += 1;
                p.opening += 1;
                return Some(Action::Grant {
                    worker: w.worker,
                    client: w.client,
                    lease: Lease::New,
                });
            }
        }
        None
    }

    /// Applies a new config: pools whose route now resolves elsewhere are
    /// retired (their idle servers closed, busy ones closed when released);
    /// the others take the new settings (pool_size, pool_timeout).
    pub(crate) fn configure(&mut self, cfg: &Config) -> Vec<Action> {
        let mut actions = Vec::new();
        for (key, pool) in &mut self.pools {
            match cfg.route(&key.database, &key.user) {
                Some(r) if PoolKey::new(&key.database, &key.user, &r) == *key => pool.route = r,
                _ => {
                    pool.retired = true;
                    pool.shared.retired.store(true, Ordering::SeqCst);
                    for (worker, server) in pool.idle.drain(..) {
                        actions.push(Action::Close { worker, server });
                    }
                    actions.push(Action::Retire { pool: key.clone() });
                }
            }
        }
        actions
    }

    /// The route a pool serves, as of the latest client.
    pub(crate) fn route_of(&self, key: &PoolKey) -> Option<Arc<ResolvedRoute>> {
        self.pools.get(key).map(|p| Arc::clone(&p.route))
    }

    /// Snapshot for inspect.
    pub(crate) fn stats(&self) -> Vec<odissey_facade::RouteStats> {
        let mut v: Vec<_> = self
            .pools
            .iter()
            .filter(|(_, p)| !(p.retired && p.total == 0 && p.clients == 0))
            .map(|(k, p)| (k, p, p.idle.len() + p.shared.idle_total()))
            .map(|(k, p, idle)| odissey_facade::RouteStats {
                database: k.database.clone(),
                user: k.user.clone(),
                pool_mode: p.route.route.pool.as_str().to_string(),
                clients_active: p.clients.saturating_sub(p.waiters.len()),
                clients_waiting: p.waiters.len(),
                servers_active: p.total.saturating_sub(idle).saturating_sub(p.opening),
                servers_idle: idle.min(p.total),
                servers_login: p.opening,
                pool_size: p.route.route.pool_size,
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

    fn route(size: usize, timeout: u64) -> (PoolKey, Arc<ResolvedRoute>) {
        let cfg = Config::parse(&format!(
            "[[listen]]\nport = 0\n[storage.s]\ntype = \"remote\"\n\
             [database.d.user.u]\nauthentication = \"none\"\nstorage = \"s\"\n\
             pool = \"transaction\"\npool_size = {size}\npool_timeout = {timeout}\n"
        ))
        .unwrap();
        let r = cfg.route("d", "u").unwrap();
        (PoolKey::new("d", "u", &r), r)
    }

    fn keys(n: usize) -> Vec<Key> {
        let mut m = Machines::default();
        (0..n).map(|i| m.insert_with(|_| i)).collect()
    }

    #[test]
    fn pool_size_is_global_and_waiters_are_fifo() {
        let (k, r) = route(2, 1000);
        let mut router = Router::new(2);
        let now = Instant::now();
        let c = keys(6);
        let new = |w, c| Action::Grant {
            worker: w,
            client: c,
            lease: Lease::New,
        };
        assert_eq!(router.attach(&k, &r, 0, c[0], now), new(0, c[0]));
        assert_eq!(router.attach(&k, &r, 1, c[1], now), new(1, c[1]));
        let wait = Action::Wait {
            deadline: Some(now + std::time::Duration::from_millis(1000)),
            reclaim: vec![],
        };
        assert_eq!(router.attach(&k, &r, 1, c[2], now), wait);
        assert_eq!(router.attach(&k, &r, 0, c[3], now), wait);
        router.server_up(&k);
        router.server_up(&k);
        let s0 = c[4];
        // Worker 0 releases its server: the first waiter is on worker 1.
        assert_eq!(
            router.release(&k, 0, s0),
            Some(Action::Ship {
                from: 0,
                server: s0,
                to: 1,
                client: c[2]
            })
        );
        // The second waiter is on worker 0, where the next release happens.
        let s1 = c[5];
        assert_eq!(
            router.release(&k, 0, s1),
            Some(Action::Grant {
                worker: 0,
                client: c[3],
                lease: Lease::Local(s1)
            })
        );
        assert_eq!(router.release(&k, 0, s1), None);
        let st = &router.stats()[0];
        assert_eq!(
            (st.servers_idle, st.servers_active, st.clients_waiting),
            (1, 1, 0)
        );
        // An idle server on the asking worker is preferred.
        assert_eq!(
            router.attach(&k, &r, 0, c[0], now),
            Action::Grant {
                worker: 0,
                client: c[0],
                lease: Lease::Local(s1)
            }
        );
    }

    #[test]
    fn timeouts_abandons_and_closes_free_slots() {
        let (k, r) = route(1, 0);
        let mut router = Router::new(2);
        let now = Instant::now();
        let c = keys(3);
        assert!(matches!(
            router.attach(&k, &r, 0, c[0], now),
            Action::Grant { .. }
        ));
        assert_eq!(
            router.attach(&k, &r, 0, c[1], now),
            Action::Wait {
                deadline: None,
                reclaim: vec![]
            }
        );
        assert_eq!(
            router.attach(&k, &r, 0, c[2], now),
            Action::Wait {
                deadline: None,
                reclaim: vec![]
            }
        );
        assert!(router.expire(&k, 0, c[1]));
        assert!(!router.expire(&k, 0, c[1]), "only once");
        // The server dies while opening: its slot goes to the next waiter.
        assert_eq!(
            router.server_closed(&k, 0, None, ServerWas::Opening),
            Some(Action::Grant {
                worker: 0,
                client: c[2],
                lease: Lease::New
            })
        );
        router.abandon(&k, 0, c[2]);
        assert_eq!(router.stats()[0].servers_login, 1);
    }
}
