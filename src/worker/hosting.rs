//! Routes with several hosts (or a role to ask for): which host serves a
//! client's next transaction, and what a worker does when hosts change.
//!
//! Each host of a storage is a pool of its own (`PoolKey::host`). A
//! routed client carries its route's [`Family`]: the pool key of each
//! host, their shared states and the rule to choose by. `attach` asks
//! [`Shared::choose_host`] each time the client needs a server (each
//! transaction in transaction pooling, once in session pooling), so an
//! idle client follows a failover at its next transaction without an
//! error. When no host qualifies the client waits for one
//! (`wait_for_host`), at most its pool_timeout.
//!
//! When a host's role or ban changes (`Hosts::generation`; the health
//! check or a failed login tells every worker with
//! `WorkerCmd::HostsMoved`), `hosts_moved` closes the servers whose host is
//! not what it was when they logged in (a demoted or superseded primary:
//! its clients mid-transaction hear 08006) and the idle ones of banned
//! hosts, then sends the clients waiting on a host that no longer
//! qualifies, and those waiting for any, to choose again.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;

use log::{debug, info, warn};
use odissey_reactor::{Context, Key};

use crate::auth::Fatal;
use crate::cmd::WorkerCmd;
use crate::config::{
    LoadBalance, PoolMode, ReadOnlyTransactions, ResolvedRoute, TargetSessionAttrs,
};
use crate::hosts::{self, Change, HostState, NoHost, Role};
use crate::router::PoolKey;
use crate::worker::client::ClientState;
use crate::worker::server::ServerState;

use super::{Conn, Shared, Worker, WorkerTimer};

/// A routed route as its clients see it: a pool per host, and how to
/// choose among them.
#[derive(Debug)]
pub(crate) struct Family {
    /// The pool of each host, in the order of the route's endpoints.
    pub(crate) keys: Box<[PoolKey]>,
    pub(crate) hosts: Box<[Arc<HostState>]>,
    pub(crate) tsa: TargetSessionAttrs,
    pub(crate) lb: LoadBalance,
    /// The storage's name.
    pub(crate) storage: Arc<str>,
}

/// How long a client waits for a host to qualify when its route has no
/// pool_timeout.
const HOST_WAIT_MS: u64 = 10_000;

impl Shared {
    /// The family of a client of `route` logged in as `database`/`user`,
    /// asking for `tsa` (the listener's, else the route's); shared by every
    /// client of the same.
    pub(super) fn family(
        &mut self,
        database: &str,
        user: &str,
        route: &Arc<ResolvedRoute>,
        tsa: TargetSessionAttrs,
    ) -> Arc<Family> {
        let first = PoolKey::new(database, user, route, 0);
        if let Some(f) = self.families.get(&(first.clone(), tsa)) {
            return Arc::clone(f);
        }
        let storage = route.route.storage.as_str();
        let hosts = self.registry.hosts.of(storage, &route.endpoints);
        let keys: Box<[PoolKey]> = (0..route.endpoints.len())
            .map(|i| {
                let key = if i == 0 {
                    first.clone()
                } else {
                    PoolKey::new(database, user, route, i)
                };
                // Every client shares the local map's copy of the strings.
                self.local(&key, route);
                match self.local.get_key_value(&key) {
                    Some((k, _)) => k.clone(),
                    None => key,
                }
            })
            .collect();
        // Past a bound the cache starts over (names are the clients').
        if self.families.len() >= 10_000 {
            self.families.clear();
        }
        let f = Arc::new(Family {
            keys,
            hosts: hosts.into(),
            tsa,
            lb: route.storage.load_balance,
            storage: storage.into(),
        });
        self.families.insert((first, tsa), Arc::clone(&f));
        f
    }

    /// The host for a transaction of `f`'s route now.
    ///
    /// Round robin goes by the client's own turn (`Client::turn`, which
    /// starts where the worker's count of logins is): a shared counter
    /// would move by the same steps for every client that does the same
    /// (log in, prepare, execute) and could land them all on one host.
    pub(super) fn choose_host(
        &mut self,
        f: &Family,
        now: std::time::Instant,
        turn: u16,
    ) -> Result<usize, NoHost> {
        self.choose_host_as(f, f.tsa, now, turn)
    }

    /// As `choose_host`, asking for `tsa`.
    pub(super) fn choose_host_as(
        &mut self,
        f: &Family,
        tsa: TargetSessionAttrs,
        now: std::time::Instant,
        turn: u16,
    ) -> Result<usize, NoHost> {
        let now_ms = self.registry.hosts.now_ms(now);
        let views: Vec<_> = f.hosts.iter().map(|h| h.view(now_ms)).collect();
        let turn = match f.lb {
            LoadBalance::Random => {
                // xorshift: cheap, and good enough to spread load.
                let mut x = self.rng;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.rng = x;
                usize::try_from(x >> 1).unwrap_or(usize::from(turn))
            }
            _ => usize::from(turn),
        };
        hosts::choose(&views, tsa, f.lb, turn)
    }

    /// A host of `route` to log in to on a client's behalf (passthrough,
    /// auth_query): the first that is up, the primary first.
    pub(super) fn any_host<'r>(
        &self,
        route: &'r ResolvedRoute,
        now: std::time::Instant,
    ) -> &'r crate::config::Endpoint {
        if route.endpoints.len() == 1 {
            return route.endpoint(0);
        }
        let hosts = self
            .registry
            .hosts
            .of(&route.route.storage, &route.endpoints);
        let now_ms = self.registry.hosts.now_ms(now);
        let views: Vec<_> = hosts.iter().map(|h| h.view(now_ms)).collect();
        let i = hosts::choose(
            &views,
            TargetSessionAttrs::Primary,
            LoadBalance::RoundRobin,
            0,
        )
        .or_else(|_| hosts::choose(&views, TargetSessionAttrs::Any, LoadBalance::RoundRobin, 0))
        .unwrap_or(0);
        route.endpoint(u16::try_from(i).unwrap_or(0))
    }

    /// Whether host `i` of `f` may still serve its clients.
    fn still_qualifies(&self, f: &Family, i: usize, now: std::time::Instant) -> bool {
        let now_ms = self.registry.hosts.now_ms(now);
        let views: Vec<_> = f.hosts.iter().map(|h| h.view(now_ms)).collect();
        hosts::qualifies(&views, f.tsa, i)
    }

    /// Tells the other workers that a host changed.
    pub(super) fn announce_hosts(&self) {
        for (i, peer) in self.peers.iter().enumerate() {
            if i != self.id {
                // A worker that stopped has nobody to re-route.
                let _ = peer.send(WorkerCmd::HostsMoved);
            }
        }
    }
}

impl Worker {
    /// A routed client about to ask for a server: on the pool of the host
    /// chosen for it now (moving its count there), or waiting for one.
    /// False when it waits (or was closed).
    pub(super) fn place(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key) -> bool {
        if self.w.registry.hosts.generation() != self.w.hosts_seen {
            self.hosts_moved(cx);
        }
        let Some(Conn::Client(c)) = self.conns.get(ck) else {
            return false;
        };
        if !matches!(c.state, ClientState::Waiting) {
            // Placed meanwhile by `hosts_moved` (it re-attached it).
            return false;
        }
        let (Some(f), Some(old), Some(route)) = (c.family.clone(), c.pool.clone(), c.route.clone())
        else {
            return true;
        };
        let turn = c.turn;
        // A read-only transaction of a read-write route may go to a
        // standby (`read_only_transactions`), when the client said so.
        let tsa = if route.route.read_only_transactions == ReadOnlyTransactions::Standby
            && matches!(
                f.tsa,
                TargetSessionAttrs::ReadWrite | TargetSessionAttrs::Primary
            )
            && route.route.pool != PoolMode::Session
            && declares_read_only(&c.io.rx, session_read_only(&c.session))
        {
            TargetSessionAttrs::PreferStandby
        } else {
            f.tsa
        };
        if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
            c.turn = c.turn.wrapping_add(1);
        }
        match self.w.choose_host_as(&f, tsa, cx.now(), turn) {
            Ok(i) => {
                let new = &f.keys[i];
                if log::log_enabled!(log::Level::Debug) {
                    if let Some(Conn::Client(c)) = self.conns.get(ck) {
                        debug!(
                            "{}: on host {} for this transaction",
                            c.id, f.hosts[i].label
                        );
                    }
                }
                if *new != old {
                    self.w
                        .local(&old, &route)
                        .shared
                        .clients
                        .fetch_sub(1, AtomicOrdering::Relaxed);
                    self.w
                        .local(new, &route)
                        .shared
                        .clients
                        .fetch_add(1, AtomicOrdering::Relaxed);
                    if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                        c.pool = Some(new.clone());
                    }
                }
                true
            }
            Err(why) => {
                self.wait_for_host(cx, ck, &f, why, &route);
                false
            }
        }
    }

    /// No host may serve `ck` now: it waits (a primary being promoted, the
    /// first checks not answered yet), at most its pool_timeout.
    fn wait_for_host(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        f: &Family,
        why: NoHost,
        route: &ResolvedRoute,
    ) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        debug!(
            "{}: no host of storage {} is {} ({why:?}): waiting for one",
            c.id,
            f.storage,
            f.tsa.as_str()
        );
        let ms = match route.route.pool_timeout {
            0 => HOST_WAIT_MS,
            t => t,
        };
        if c.deadline.is_none() {
            let t = cx.set_timer(
                cx.now() + std::time::Duration::from_millis(ms),
                WorkerTimer::PoolTimeout(ck),
            );
            c.deadline = Some(t);
        }
        self.w.homeless.push(ck);
    }

    /// A client waited for a host in vain: why none qualifies, naming the
    /// route and each host.
    pub(super) fn no_host_fatal(&self, ck: Key, now: std::time::Instant) -> Option<Fatal> {
        let Some(Conn::Client(c)) = self.conns.get(ck) else {
            return None;
        };
        let (f, route) = (c.family.as_ref()?, c.route.as_ref()?);
        let now_ms = self.w.registry.hosts.now_ms(now);
        let each: Vec<String> = f
            .hosts
            .iter()
            .map(|h| {
                if h.banned(now_ms) {
                    format!("{} down ({})", h.label, h.why())
                } else {
                    let (bytes, ms) = h.lag();
                    match h.view(now_ms) {
                        v if v.lagging => {
                            format!("{} standby, lagging ({bytes} bytes, {ms} ms)", h.label)
                        }
                        v => format!("{} {}", h.label, v.role.as_str()),
                    }
                }
            })
            .collect();
        Some(Fatal::new(
            "08006",
            format!(
                "no host of storage \"{}\" can serve route {}.{} (target_session_attrs {}): {}",
                f.storage,
                route.rule_db,
                route.rule_user,
                f.tsa.as_str(),
                each.join(", ")
            ),
        ))
    }

    /// `ck` stops waiting for a host (it is served, or closed).
    pub(super) fn leave_homeless(&mut self, ck: Key) -> bool {
        let before = self.w.homeless.len();
        self.w.homeless.retain(|&k| k != ck);
        before != self.w.homeless.len()
    }

    /// A server of `pool` could not connect or log in: its host is banned
    /// (when the pool is one of a routed route's) and the clients waiting
    /// on it choose again. False for a pool of a single-host route, whose
    /// first waiting client hears the failure, as before.
    pub(super) fn host_failed(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        pool: &PoolKey,
        why: &str,
    ) -> bool {
        let Some(host) = self.w.local.get(pool).and_then(|lp| lp.host.clone()) else {
            return false;
        };
        let hosts = &self.w.registry.hosts;
        let now_ms = hosts.now_ms(cx.now());
        let ban = self
            .w
            .cfg
            .storage
            .get(&*host.storage)
            .map_or(5_000, |s| s.ban_time);
        if hosts.fail(&host, why, now_ms, ban) == Change::Banned {
            warn!(
                "host {} of storage {} banned for {ban} ms: {why}",
                host.label, host.storage
            );
            self.w.announce_hosts();
        }
        self.hosts_moved(cx);
        true
    }

    /// A server logged in to a routed host and said what the host is
    /// (`in_hot_standby`, PostgreSQL 14 and later): a role the checks have
    /// not seen yet is taken at once.
    pub(super) fn login_reported(&mut self, cx: &mut Context<'_, WorkerTimer>, sk: Key) {
        let Some(Conn::Server(s)) = self.conns.get_mut(sk) else {
            return;
        };
        let Some(slot) = s.host.as_mut() else {
            return;
        };
        let role = match crate::params::get(&s.defaults, "in_hot_standby") {
            Some("on") => Role::Standby,
            Some("off") => Role::Primary,
            _ => slot.host.role(),
        };
        let host = Arc::clone(&slot.host);
        let hosts = &self.w.registry.hosts;
        let change = hosts.set_role(&host, role);
        slot.role = hosts.effective(&host);
        if let Change::Role { from, to } = change {
            info!(
                "host {} of storage {}: {} now (was {}), as a server login reports",
                host.label,
                host.storage,
                to.as_str(),
                from.as_str()
            );
            self.w.announce_hosts();
            self.hosts_moved(cx);
        }
    }

    /// Hosts changed: servers whose host is not what it was are closed,
    /// idle ones of banned hosts too, and the waiting clients choose again.
    pub(super) fn hosts_moved(&mut self, cx: &mut Context<'_, WorkerTimer>) {
        let hosts = &self.w.registry.hosts;
        self.w.hosts_seen = hosts.generation();
        let now_ms = hosts.now_ms(cx.now());
        let mut stale = Vec::new();
        let mut effective = std::collections::HashMap::new();
        for (k, conn) in self.conns.iter() {
            let Conn::Server(s) = conn else {
                continue;
            };
            let Some(slot) = &s.host else {
                continue;
            };
            let now_is = *effective
                .entry(Arc::as_ptr(&slot.host))
                .or_insert_with(|| hosts.effective(&slot.host));
            if slot.role != Role::Unknown && now_is != slot.role {
                let why = format!(
                    "its host {} is {} now, not {}",
                    slot.host.label,
                    match now_is {
                        Role::Unknown => "no longer the primary",
                        r => r.as_str(),
                    },
                    slot.role.as_str()
                );
                stale.push((k, why));
            } else if matches!(s.state, ServerState::Idle) && slot.host.banned(now_ms) {
                stale.push((k, format!("its host {} is banned", slot.host.label)));
            }
        }
        for (k, why) in stale {
            self.close_server(cx, k, &why);
        }
        self.reroute(cx);
    }

    /// The clients waiting on a host that no longer qualifies, and those
    /// waiting for a host, choose again.
    fn reroute(&mut self, cx: &mut Context<'_, WorkerTimer>) {
        let mut moves = Vec::new();
        for (key, lp) in &self.w.local {
            if lp.host.is_some() {
                moves.extend(lp.waiters().map(|ck| (ck, key.clone())));
            }
        }
        for (ck, key) in moves {
            let Some(Conn::Client(c)) = self.conns.get(ck) else {
                continue;
            };
            let Some(f) = c.family.clone() else {
                continue;
            };
            if !matches!(c.state, ClientState::Waiting) {
                continue;
            }
            if self.w.still_qualifies(&f, key.host.into(), cx.now()) {
                continue;
            }
            // Its pool_timeout runs on from when it began to wait.
            self.leave_queue(cx, ck, &key);
            self.attach(cx, ck);
        }
        for ck in std::mem::take(&mut self.w.homeless) {
            let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
                continue;
            };
            if !matches!(c.state, ClientState::Waiting) {
                continue;
            }
            // Its wait (and its deadline) goes on from when it began.
            let since = c.waiting_us;
            self.attach(cx, ck);
            if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                if matches!(c.state, ClientState::Waiting) {
                    c.waiting_us = since;
                }
            }
        }
    }
}

/// Whether the session's transactions are read-only by default.
fn session_read_only(session: &crate::session::Settings) -> bool {
    session
        .get("default_transaction_read_only")
        .is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1"))
}

/// Whether the request at the head of `rx` opens a transaction its client
/// declared read-only: a Query or Parse whose first statement is `BEGIN`
/// or `START TRANSACTION` with `READ ONLY`, or `SET TRANSACTION READ
/// ONLY`; or any other when `default_ro` and it does not say `READ WRITE`.
/// Nothing else of the SQL is guessed at.
pub(crate) fn declares_read_only(rx: &[u8], default_ro: bool) -> bool {
    let Some(sql) = first_sql(rx) else {
        return default_ro;
    };
    match read_only_start(sql) {
        Some(ro) => ro,
        None => default_ro,
    }
}

/// The SQL text of a complete Query or Parse at the head of `rx`.
fn first_sql(rx: &[u8]) -> Option<&str> {
    let (&tag, rest) = rx.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let body = rest.get(4..len.checked_sub(4)? + 4)?;
    let text = match tag {
        b'Q' => body,
        // Parse: statement name, then the query.
        b'P' => {
            let name_end = body.iter().position(|&b| b == 0)?;
            body.get(name_end + 1..)?
        }
        _ => return None,
    };
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    std::str::from_utf8(&text[..end]).ok()
}

/// Some(true) when the first statement of `sql` opens a read-only
/// transaction, Some(false) when it opens a read-write one, None when it
/// is something else.
fn read_only_start(sql: &str) -> Option<bool> {
    let first = sql.split(';').next()?;
    let words: Vec<String> = first
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_uppercase)
        .collect();
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let modes = match w.as_slice() {
        ["BEGIN", "WORK" | "TRANSACTION", rest @ ..] | ["BEGIN", rest @ ..] => rest,
        ["START", "TRANSACTION", rest @ ..] => rest,
        ["SET", "TRANSACTION", rest @ ..] => rest,
        _ => return None,
    };
    modes.windows(2).find_map(|p| match p {
        ["READ", "ONLY"] => Some(true),
        ["READ", "WRITE"] => Some(false),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(sql: &str) -> Vec<u8> {
        let mut b = bytes::BytesMut::new();
        odissey_protocol::frontend::query(&mut b, sql);
        b.to_vec()
    }

    #[test]
    fn only_declared_read_only_transactions_count() {
        for sql in [
            "BEGIN READ ONLY",
            "begin transaction isolation level repeatable read, read only",
            "START TRANSACTION READ ONLY; SELECT 1",
            "  set transaction read only; select 2",
        ] {
            assert!(declares_read_only(&query(sql), false), "{sql}");
        }
        for sql in [
            "BEGIN",
            "SELECT 1",
            "BEGIN READ WRITE",
            "select 'BEGIN READ ONLY'",
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        ] {
            assert!(!declares_read_only(&query(sql), false), "{sql}");
        }
        // default_transaction_read_only: every transaction, unless it says
        // READ WRITE.
        assert!(declares_read_only(&query("SELECT 1"), true));
        assert!(!declares_read_only(&query("BEGIN READ WRITE"), true));
        // The extended protocol's Parse.
        let mut b = bytes::BytesMut::new();
        odissey_protocol::frontend::parse(&mut b, "s1", "BEGIN READ ONLY", &[]);
        assert!(declares_read_only(&b, false));
        // A message not in whole yet is not guessed at.
        let q = query("BEGIN READ ONLY");
        assert!(!declares_read_only(&q[..q.len() - 3], false));
    }
}
