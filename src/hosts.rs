//! The hosts of a storage as the router sees them: each one's role
//! (primary or standby, as its health check or its server logins found
//! it), whether it is banned and why, its replica lag, its connections;
//! and the choice, per transaction, of the host that serves a route
//! (`target_session_attrs`, `load_balance`).
//!
//! A [`HostState`] is shared by every thread of an instance: the health
//! check (worker 0, `worker::health`) and the server logins write it, the
//! workers read it when a client needs a server, the system thread shows
//! it (SHOW HOSTS, `inspect`, `/metrics`). Its fields are atomics: a
//! transaction reads a few of them, never a lock. Any change of role or
//! ban bumps [`Hosts::generation`], which tells the workers to look again
//! (re-route the clients waiting for a host, close the servers of a host
//! that lost its role).
//!
//! The decisions are sans-IO and take the time as an argument:
//! [`choose`], [`lag_of`], [`HostState::fail`]/[`HostState::checked`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::{Endpoint, LoadBalance, TargetSessionAttrs};

/// What a host is, as last found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Not checked yet (or the check cannot log in).
    Unknown,
    /// Not in recovery: takes writes.
    Primary,
    /// In recovery (hot standby): reads only.
    Standby,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Primary => "primary",
            Self::Standby => "standby",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Primary,
            2 => Self::Standby,
            _ => Self::Unknown,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Primary => 1,
            Self::Standby => 2,
        }
    }
}

/// One host of a storage, shared by the threads of an instance.
#[derive(Debug)]
pub(crate) struct HostState {
    /// The `[storage.<name>]` it belongs to.
    pub(crate) storage: Arc<str>,
    pub(crate) endpoint: Endpoint,
    /// `endpoint.label()`, made once.
    pub(crate) label: Arc<str>,
    role: AtomicU8,
    /// When it last became primary, in the order of [`Hosts::seq`]: of two
    /// hosts that both say they are primary (a promotion while the old
    /// primary still runs), the newer one takes the writes.
    promoted: AtomicU64,
    /// Banned until then, in ms on the instance's clock (0: not banned).
    banned_until: AtomicU64,
    /// The lag, as last measured (standbys only; 0 on a primary).
    lag_bytes: AtomicU64,
    lag_ms: AtomicU64,
    /// Further behind than `max_replica_lag_*`: no new work.
    lagging: AtomicBool,
    /// Server connections open or opening to it, all workers together.
    pub(crate) connections: AtomicUsize,
    /// Unix time in ms of its last role change (0: none yet).
    role_changed_at: AtomicU64,
    /// Unix time in ms of its last good check.
    checked_at: AtomicU64,
    /// Bans so far.
    bans: AtomicU64,
    /// Why it was last banned, or how its last check failed.
    why: Mutex<String>,
    /// The WAL position of its last check: the current LSN on a primary,
    /// the replayed one on a standby.
    lsn: AtomicU64,
}

/// A server connection's place on its host: counted in
/// `HostState::connections` while it lives (least_connections, the
/// console), whichever worker holds it, and what role the host had when it
/// logged in (a host that changed since is not trusted with new work).
#[derive(Debug)]
pub(crate) struct HostSlot {
    pub(crate) host: Arc<HostState>,
    /// The host's role (as `Hosts::effective`) when the server logged in.
    pub(crate) role: Role,
}

impl HostSlot {
    pub(crate) fn new(host: Arc<HostState>) -> Self {
        host.connections.fetch_add(1, Ordering::Relaxed);
        let role = host.role();
        Self { host, role }
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        self.host.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of a host for [`choose`] and the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HostView {
    pub(crate) role: Role,
    pub(crate) banned: bool,
    pub(crate) lagging: bool,
    pub(crate) connections: usize,
    pub(crate) promoted: u64,
}

impl HostState {
    fn new(storage: Arc<str>, endpoint: Endpoint) -> Self {
        Self {
            storage,
            label: endpoint.label().into(),
            endpoint,
            role: AtomicU8::new(Role::Unknown.to_u8()),
            promoted: AtomicU64::new(0),
            banned_until: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            lagging: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            role_changed_at: AtomicU64::new(0),
            checked_at: AtomicU64::new(0),
            bans: AtomicU64::new(0),
            why: Mutex::new(String::new()),
            lsn: AtomicU64::new(0),
        }
    }

    pub(crate) fn role(&self) -> Role {
        Role::from_u8(self.role.load(Ordering::Relaxed))
    }

    pub(crate) fn banned(&self, now_ms: u64) -> bool {
        self.banned_until.load(Ordering::Relaxed) > now_ms
    }

    pub(crate) fn view(&self, now_ms: u64) -> HostView {
        HostView {
            role: self.role(),
            banned: self.banned(now_ms),
            lagging: self.lagging.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            promoted: self.promoted.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn lag(&self) -> (u64, u64) {
        (
            self.lag_bytes.load(Ordering::Relaxed),
            self.lag_ms.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn lsn(&self) -> u64 {
        self.lsn.load(Ordering::Relaxed)
    }

    pub(crate) fn why(&self) -> String {
        self.why
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn bans(&self) -> u64 {
        self.bans.load(Ordering::Relaxed)
    }

    pub(crate) fn role_changed_at(&self) -> u64 {
        self.role_changed_at.load(Ordering::Relaxed)
    }

    pub(crate) fn checked_at(&self) -> u64 {
        self.checked_at.load(Ordering::Relaxed)
    }

    pub(crate) fn banned_until(&self) -> u64 {
        self.banned_until.load(Ordering::Relaxed)
    }
}

/// Hosts by storage and label.
type ByName = HashMap<(Arc<str>, Arc<str>), Arc<HostState>>;

/// Every host of an instance, by storage and label.
#[derive(Debug)]
pub(crate) struct Hosts {
    started: Instant,
    by_name: Mutex<ByName>,
    /// Bumped by every change of role or ban.
    generation: AtomicU64,
    /// Orders promotions (see `HostState::promoted`).
    seq: AtomicU64,
}

impl Default for Hosts {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            by_name: Mutex::default(),
            generation: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        }
    }
}

/// What happened to a host, for the log line and for the workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing the router needs to hear of.
    None,
    /// It took a new role.
    Role { from: Role, to: Role },
    /// It came back from a ban.
    Unbanned,
    /// It was banned (it was not before).
    Banned,
    /// It went past, or back within, the lag limit.
    Lag { lagging: bool },
}

impl Hosts {
    /// Milliseconds on the instance's clock (bans are kept on it).
    pub(crate) fn now_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The hosts of `storage`, in the order of `endpoints` (created on
    /// first use; a host keeps its state across reloads while it is listed).
    pub(crate) fn of(&self, storage: &str, endpoints: &[Endpoint]) -> Vec<Arc<HostState>> {
        let mut map = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        let storage: Arc<str> = storage.into();
        endpoints
            .iter()
            .map(|e| {
                let key = (Arc::clone(&storage), Arc::<str>::from(e.label()));
                Arc::clone(
                    map.entry(key).or_insert_with(|| {
                        Arc::new(HostState::new(Arc::clone(&storage), e.clone()))
                    }),
                )
            })
            .collect()
    }

    /// Every host known, by storage then label (the console, metrics).
    pub(crate) fn all(&self) -> Vec<Arc<HostState>> {
        let map = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<_> = map.values().cloned().collect();
        v.sort_by(|a, b| (&a.storage, &a.label).cmp(&(&b.storage, &b.label)));
        v
    }

    /// Every host known, as the console and `inspect` show them.
    pub(crate) fn stats(&self, now: Instant) -> Vec<odissey_facade::HostStats> {
        let now_ms = self.now_ms(now);
        self.all()
            .iter()
            .map(|h| {
                let (lag_bytes, lag_ms) = h.lag();
                let v = h.view(now_ms);
                odissey_facade::HostStats {
                    storage: h.storage.to_string(),
                    host: h.label.to_string(),
                    role: self.effective_name(h),
                    banned: v.banned,
                    banned_for_ms: h.banned_until().saturating_sub(now_ms),
                    why: h.why(),
                    bans: h.bans(),
                    lag_bytes,
                    lag_ms,
                    lagging: v.lagging,
                    connections: v.connections,
                    role_changed_at_ms: h.role_changed_at(),
                    checked_at_ms: h.checked_at(),
                }
            })
            .collect()
    }

    /// The role as shown: a superseded primary says so.
    fn effective_name(&self, h: &HostState) -> String {
        match (h.role(), self.effective(h)) {
            (Role::Primary, Role::Unknown) => "primary (superseded)".into(),
            (r, _) => r.as_str().into(),
        }
    }

    /// Forgets the hosts no longer listed by `keep` (storage, label).
    pub(crate) fn retain(&self, keep: &std::collections::HashSet<(String, String)>) {
        let mut map = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|(s, l), _| keep.contains(&(s.to_string(), l.to_string())));
    }

    /// What `host` is for new work: its role, except that a primary
    /// superseded by a newer one (promoted later, not banned) counts as
    /// `Unknown`: it takes no writes, and servers that logged in while it
    /// was the primary are not trusted.
    pub(crate) fn effective(&self, host: &HostState) -> Role {
        let role = host.role();
        if role != Role::Primary {
            return role;
        }
        let mine = host.promoted.load(Ordering::Relaxed);
        let map = self.by_name.lock().unwrap_or_else(PoisonError::into_inner);
        let now_ms = self.now_ms(Instant::now());
        let newer = map.values().any(|o| {
            o.storage == host.storage
                && o.role() == Role::Primary
                && !o.banned(now_ms)
                && o.promoted.load(Ordering::Relaxed) > mine
        });
        if newer {
            Role::Unknown
        } else {
            role
        }
    }

    /// `host` said what it is (a health check, or a server login's
    /// `in_hot_standby`).
    pub(crate) fn set_role(&self, host: &HostState, role: Role) -> Change {
        let from = Role::from_u8(host.role.swap(role.to_u8(), Ordering::AcqRel));
        if from == role {
            return Change::None;
        }
        if role == Role::Primary {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
            host.promoted.store(seq, Ordering::Relaxed);
        }
        host.role_changed_at.store(unix_ms(), Ordering::Relaxed);
        if role != Role::Standby {
            host.lagging.store(false, Ordering::Relaxed);
        }
        self.bump();
        Change::Role { from, to: role }
    }

    /// A check of `host` answered at `now_ms`: its role and WAL position.
    /// A banned host whose ban is over comes back.
    pub(crate) fn checked(&self, host: &HostState, role: Role, lsn: u64, now_ms: u64) -> Change {
        host.checked_at.store(unix_ms(), Ordering::Relaxed);
        host.lsn.store(lsn, Ordering::Relaxed);
        let change = self.set_role(host, role);
        let until = host.banned_until.load(Ordering::Relaxed);
        if until != 0 && until <= now_ms {
            host.banned_until.store(0, Ordering::Relaxed);
            self.bump();
            if change == Change::None {
                return Change::Unbanned;
            }
        }
        change
    }

    /// `host` failed (its check, a connection or a login): banned for
    /// `ban_ms` from `now_ms`. Only the first failure of a ban is news.
    pub(crate) fn fail(&self, host: &HostState, why: &str, now_ms: u64, ban_ms: u64) -> Change {
        *host.why.lock().unwrap_or_else(PoisonError::into_inner) = why.to_string();
        let until = now_ms.saturating_add(ban_ms.max(1));
        let was = host.banned_until.swap(until, Ordering::AcqRel);
        if was > now_ms {
            return Change::None;
        }
        host.bans.fetch_add(1, Ordering::Relaxed);
        self.bump();
        Change::Banned
    }

    /// A standby's lag as measured now; past the limits it takes no new
    /// work, back within them it does.
    pub(crate) fn set_lag(&self, host: &HostState, bytes: u64, ms: u64, lagging: bool) -> Change {
        host.lag_bytes.store(bytes, Ordering::Relaxed);
        host.lag_ms.store(ms, Ordering::Relaxed);
        if host.lagging.swap(lagging, Ordering::AcqRel) == lagging {
            return Change::None;
        }
        self.bump();
        Change::Lag { lagging }
    }
}

/// Unix time in ms (for the console; decisions use the instance's clock).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A standby's lag from its check and the primary's: bytes of WAL the
/// standby has not replayed (`primary_lsn` minus its replay position),
/// and ms of replay delay (time since the last transaction it replayed,
/// counted only while it has received WAL it has not replayed: an idle
/// primary sends nothing, and a standby with nothing to replay is not
/// behind).
pub(crate) fn lag_of(
    primary_lsn: Option<u64>,
    replay: u64,
    receive: Option<u64>,
    delay_ms: u64,
) -> (u64, u64) {
    let bytes = primary_lsn.map_or(0, |p| p.saturating_sub(replay));
    let behind = receive.is_some_and(|r| r > replay) || bytes > 0;
    (bytes, if behind { delay_ms } else { 0 })
}

/// Parses an LSN as PostgreSQL prints it (`16/B374D848`).
pub(crate) fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some((hi << 32) | lo)
}

/// Why no host may serve a route now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoHost {
    /// Every host is banned (down, or refusing logins).
    AllDown,
    /// None has the role asked for (no primary; no standby within lag).
    NoRole,
    /// The roles are not known yet (the first checks have not answered).
    Unknown,
}

/// Which host serves the next transaction of a route whose hosts are
/// `hosts` (the index), asking for `tsa`, picking among those that
/// qualify by `lb`; `turn` is a counter (round robin) or a random number.
///
/// - Banned hosts never qualify.
/// - `read-write`/`primary`: the primary; of two that say so, the one
///   promoted last (the old one is about to be demoted or fenced).
/// - `read-only`/`standby`: a standby not `lagging`.
/// - `prefer-standby`: as `read-only`, else as `read-write`.
/// - `any`: every host up, its role known or not.
pub(crate) fn choose(
    hosts: &[HostView],
    tsa: TargetSessionAttrs,
    lb: LoadBalance,
    turn: usize,
) -> Result<usize, NoHost> {
    use TargetSessionAttrs as T;
    let up = || hosts.iter().enumerate().filter(|(_, h)| !h.banned);
    let primary = || {
        up().filter(|(_, h)| h.role == Role::Primary)
            .max_by_key(|(_, h)| h.promoted)
            .map(|(i, _)| i)
    };
    let why = || {
        if up().next().is_none() {
            NoHost::AllDown
        } else if up().all(|(_, h)| h.role == Role::Unknown) {
            NoHost::Unknown
        } else {
            NoHost::NoRole
        }
    };
    let standbys = || up().filter(|(_, h)| h.role == Role::Standby && !h.lagging);
    match tsa {
        T::ReadWrite | T::Primary => primary().ok_or_else(why),
        T::ReadOnly | T::Standby => pick(standbys(), lb, turn).ok_or_else(why),
        T::PreferStandby => pick(standbys(), lb, turn).or_else(primary).ok_or_else(why),
        T::Any => pick(up(), lb, turn).ok_or_else(why),
    }
}

/// Whether host `i` may serve a client asking for `tsa` now (a client
/// waiting on it stays; otherwise it chooses again).
pub(crate) fn qualifies(hosts: &[HostView], tsa: TargetSessionAttrs, i: usize) -> bool {
    use TargetSessionAttrs as T;
    let Some(h) = hosts.get(i) else {
        return false;
    };
    if h.banned {
        return false;
    }
    let standby = |h: &HostView| h.role == Role::Standby && !h.lagging;
    match tsa {
        T::Any => true,
        T::ReadOnly | T::Standby => standby(h),
        T::ReadWrite | T::Primary => choose(hosts, tsa, LoadBalance::RoundRobin, 0) == Ok(i),
        T::PreferStandby => {
            standby(h)
                || (!hosts.iter().any(|o| !o.banned && standby(o))
                    && choose(hosts, T::Primary, LoadBalance::RoundRobin, 0) == Ok(i))
        }
    }
}

fn pick<'a>(
    candidates: impl Iterator<Item = (usize, &'a HostView)> + Clone,
    lb: LoadBalance,
    turn: usize,
) -> Option<usize> {
    let n = candidates.clone().count();
    if n == 0 {
        return None;
    }
    match lb {
        LoadBalance::RoundRobin | LoadBalance::Random => candidates.map(|(i, _)| i).nth(turn % n),
        LoadBalance::LeastConnections => {
            // Ties go in turn, so equal hosts share the new work.
            let least = candidates.clone().map(|(_, h)| h.connections).min()?;
            let tied = candidates.filter(|(_, h)| h.connections == least);
            let m = tied.clone().count();
            tied.map(|(i, _)| i).nth(turn % m)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use TargetSessionAttrs as T;

    fn host(role: Role) -> HostView {
        HostView {
            role,
            banned: false,
            lagging: false,
            connections: 0,
            promoted: 0,
        }
    }

    fn endpoint(port: u16) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port,
            unix_socket_dir: None,
        }
    }

    #[test]
    fn writes_go_to_the_primary_and_reads_to_standbys() {
        let hosts = [
            host(Role::Standby),
            host(Role::Primary),
            host(Role::Standby),
        ];
        for turn in 0..4 {
            assert_eq!(
                choose(&hosts, T::ReadWrite, LoadBalance::RoundRobin, turn),
                Ok(1)
            );
            assert_eq!(
                choose(&hosts, T::Primary, LoadBalance::RoundRobin, turn),
                Ok(1)
            );
        }
        let reads: Vec<_> = (0..4)
            .map(|t| choose(&hosts, T::ReadOnly, LoadBalance::RoundRobin, t).unwrap())
            .collect();
        assert_eq!(reads, [0, 2, 0, 2]);
        let any: Vec<_> = (0..3)
            .map(|t| choose(&hosts, T::Any, LoadBalance::RoundRobin, t).unwrap())
            .collect();
        assert_eq!(any, [0, 1, 2]);
    }

    #[test]
    fn prefer_standby_falls_back_to_the_primary() {
        let mut hosts = [host(Role::Primary), host(Role::Standby)];
        assert_eq!(
            choose(&hosts, T::PreferStandby, LoadBalance::RoundRobin, 0),
            Ok(1)
        );
        hosts[1].banned = true;
        assert_eq!(
            choose(&hosts, T::PreferStandby, LoadBalance::RoundRobin, 0),
            Ok(0)
        );
        hosts[1].banned = false;
        hosts[1].lagging = true;
        assert_eq!(
            choose(&hosts, T::PreferStandby, LoadBalance::RoundRobin, 0),
            Ok(0)
        );
        assert_eq!(
            choose(&hosts, T::Standby, LoadBalance::RoundRobin, 0),
            Err(NoHost::NoRole)
        );
    }

    #[test]
    fn banned_and_unknown_hosts_say_why_none_qualifies() {
        let mut hosts = [host(Role::Unknown), host(Role::Unknown)];
        assert_eq!(
            choose(&hosts, T::ReadWrite, LoadBalance::RoundRobin, 0),
            Err(NoHost::Unknown)
        );
        // `any` takes a host whose role is not known yet.
        assert_eq!(choose(&hosts, T::Any, LoadBalance::RoundRobin, 1), Ok(1));
        hosts[0].banned = true;
        hosts[1].banned = true;
        assert_eq!(
            choose(&hosts, T::Any, LoadBalance::RoundRobin, 0),
            Err(NoHost::AllDown)
        );
        let hosts = [host(Role::Standby)];
        assert_eq!(
            choose(&hosts, T::ReadWrite, LoadBalance::RoundRobin, 0),
            Err(NoHost::NoRole)
        );
    }

    #[test]
    fn of_two_primaries_the_newer_takes_the_writes() {
        let hosts = Hosts::default();
        let hs = hosts.of("main", &[endpoint(1), endpoint(2)]);
        hosts.set_role(&hs[0], Role::Primary);
        hosts.set_role(&hs[1], Role::Standby);
        hosts.set_role(&hs[1], Role::Primary);
        let views: Vec<_> = hs.iter().map(|h| h.view(0)).collect();
        assert_eq!(
            choose(&views, T::ReadWrite, LoadBalance::RoundRobin, 0),
            Ok(1)
        );
        // The old one, demoted, serves reads.
        hosts.set_role(&hs[0], Role::Standby);
        let views: Vec<_> = hs.iter().map(|h| h.view(0)).collect();
        assert_eq!(
            choose(&views, T::ReadOnly, LoadBalance::RoundRobin, 5),
            Ok(0)
        );
    }

    #[test]
    fn a_waiting_client_stays_while_its_host_qualifies() {
        let mut hosts = [
            host(Role::Primary),
            host(Role::Standby),
            host(Role::Standby),
        ];
        assert!(qualifies(&hosts, T::ReadWrite, 0));
        assert!(!qualifies(&hosts, T::ReadWrite, 1));
        assert!(qualifies(&hosts, T::ReadOnly, 2));
        assert!(!qualifies(&hosts, T::PreferStandby, 0));
        hosts[1].lagging = true;
        hosts[2].banned = true;
        assert!(!qualifies(&hosts, T::ReadOnly, 1));
        // No standby left: prefer-standby's clients may wait on the primary.
        assert!(qualifies(&hosts, T::PreferStandby, 0));
        assert!(qualifies(&hosts, T::Any, 1));
        assert!(!qualifies(&hosts, T::Any, 2));
        assert!(!qualifies(&hosts, T::Any, 7));
    }

    #[test]
    fn a_superseded_primary_is_no_longer_effective() {
        let hosts = Hosts::default();
        let hs = hosts.of("main", &[endpoint(1), endpoint(2)]);
        hosts.set_role(&hs[0], Role::Primary);
        assert_eq!(hosts.effective(&hs[0]), Role::Primary);
        hosts.set_role(&hs[1], Role::Primary);
        assert_eq!(hosts.effective(&hs[0]), Role::Unknown);
        assert_eq!(hosts.effective(&hs[1]), Role::Primary);
        // The newer one down: the older is the primary again.
        hosts.fail(&hs[1], "gone", hosts.now_ms(Instant::now()), 60_000);
        assert_eq!(hosts.effective(&hs[0]), Role::Primary);
    }

    #[test]
    fn least_connections_takes_the_least_busy_and_shares_ties() {
        let mut hosts = [
            host(Role::Standby),
            host(Role::Standby),
            host(Role::Standby),
        ];
        hosts[0].connections = 5;
        hosts[1].connections = 2;
        hosts[2].connections = 2;
        let picks: Vec<_> = (0..4)
            .map(|t| choose(&hosts, T::ReadOnly, LoadBalance::LeastConnections, t).unwrap())
            .collect();
        assert_eq!(picks, [1, 2, 1, 2]);
    }

    #[test]
    fn a_ban_lasts_its_time_and_ends_at_the_next_good_check() {
        let hosts = Hosts::default();
        let h = &hosts.of("main", &[endpoint(1)])[0];
        let g = hosts.generation();
        assert_eq!(
            hosts.fail(h, "connection refused", 1_000, 5_000),
            Change::Banned
        );
        assert!(hosts.generation() > g);
        // Failing again while banned extends it, quietly.
        assert_eq!(
            hosts.fail(h, "connection refused", 2_000, 5_000),
            Change::None
        );
        assert!(h.banned(6_999));
        assert_eq!(h.bans(), 1);
        assert_eq!(h.why(), "connection refused");
        // A good check during the ban does not lift it ...
        assert_eq!(
            hosts.checked(h, Role::Primary, 0, 3_000),
            Change::Role {
                from: Role::Unknown,
                to: Role::Primary
            }
        );
        assert!(h.banned(3_000));
        // ... one after it does.
        assert_eq!(hosts.checked(h, Role::Primary, 0, 7_000), Change::Unbanned);
        assert!(!h.banned(7_000));
    }

    #[test]
    fn hosts_keep_their_state_across_lookups() {
        let hosts = Hosts::default();
        let a = hosts.of("main", &[endpoint(1), endpoint(2)]);
        hosts.set_role(&a[1], Role::Standby);
        let b = hosts.of("main", &[endpoint(2)]);
        assert!(Arc::ptr_eq(&a[1], &b[0]));
        assert_eq!(b[0].role(), Role::Standby);
        // Another storage's host of the same address is its own.
        let c = hosts.of("other", &[endpoint(2)]);
        assert_eq!(c[0].role(), Role::Unknown);
    }

    #[test]
    fn lag_is_bytes_behind_the_primary_and_delay_only_while_behind() {
        // Caught up: no delay however old the last replayed transaction.
        assert_eq!(lag_of(Some(100), 100, Some(100), 60_000), (0, 0));
        // Replay paused with WAL received: behind in bytes and in time.
        assert_eq!(lag_of(Some(500), 100, Some(500), 1_500), (400, 1_500));
        // No primary known: delay only from what it received.
        assert_eq!(lag_of(None, 100, Some(200), 30), (0, 30));
        // A standby ahead of the primary's last known position is not behind.
        assert_eq!(lag_of(Some(100), 150, Some(150), 10), (0, 0));
    }

    #[test]
    fn lsns_parse_as_postgresql_prints_them() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x0300_0060));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(parse_lsn("1/"), None);
    }

    #[test]
    fn lag_changes_are_news_once() {
        let hosts = Hosts::default();
        let h = &hosts.of("main", &[endpoint(1)])[0];
        hosts.set_role(h, Role::Standby);
        assert_eq!(hosts.set_lag(h, 10, 0, false), Change::None);
        assert_eq!(
            hosts.set_lag(h, 10_000, 0, true),
            Change::Lag { lagging: true }
        );
        assert_eq!(hosts.set_lag(h, 20_000, 0, true), Change::None);
        assert!(h.view(0).lagging);
        assert_eq!(
            hosts.set_lag(h, 0, 0, false),
            Change::Lag { lagging: false }
        );
    }
}
