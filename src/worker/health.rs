//! Health checks of the hosts of routed storages (several `hosts`, or a
//! `target_session_attrs` other than `any`), run by worker 0.
//!
//! Each host has one check connection of its own, logged in once and kept:
//! every `health_check_interval` it runs one query that says the host's
//! role (`pg_is_in_recovery()`) and WAL position (on a standby also what
//! it received and how long ago it replayed its last transaction, for the
//! lag). A check not answered within `health_check_timeout` (a host that
//! hangs), a connection or login that fails, or an error, bans the host
//! for `ban_time` (`Hosts::fail`) and drops the connection; the next check
//! connects again, and the first good one after the ban lifts it. What a
//! check finds goes into the host's shared state, and a change (role,
//! ban, lag) is logged and sent to every worker (`hosts_moved`).
//!
//! A check is a small state machine on the worker's slab, `Conn::Check`:
//! connecting, logging in (`BackendLogin`, shared with the pooled servers
//! and probes), idle, querying.

use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};
use odissey_protocol::scram::ScramCredential;
use odissey_protocol::{backend, codec, frontend};
use odissey_reactor::{Context, Key, TimerId};

use crate::backend_login::{AskTls, BackendLogin};
use crate::config::{Config, Endpoint, StorageTls, StorageType, TargetSessionAttrs};
use crate::credentials;
use crate::hosts::{self, Change, HostState, Role};
use crate::io::Io;

use super::opening::Opened;
use super::server::{connect_step, step_login, Connect, LoginStep};
use super::{insert_registered, Conn, Worker, WorkerTimer, MAX_ROUNDS};

/// What a check asks. One row: in recovery, the WAL position (current on
/// a primary, replayed on a standby), the position received (standby),
/// ms since the last replayed transaction (standby).
const QUERY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     pg_last_wal_receive_lsn(), \
     COALESCE((EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint, 0)";

/// The checks a worker runs.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    hosts: Vec<Checked>,
    /// Bumped by each reconfiguration: timers of an older one are void.
    epoch: u64,
}

/// One host's checking.
#[derive(Debug)]
struct Checked {
    host: Arc<HostState>,
    /// How it logs in.
    database: String,
    user: String,
    password: Option<String>,
    tls: bool,
    interval: Duration,
    timeout: Duration,
    ban_ms: u64,
    max_lag_bytes: u64,
    max_lag_ms: u64,
    /// Its connection (`Conn::Check`), while it has one.
    conn: Option<Key>,
}

/// A check connection.
#[derive(Debug)]
pub(crate) struct Check {
    pub(super) io: Io,
    phase: Phase,
    /// Which `Checks::hosts` entry, under `epoch`.
    index: usize,
    epoch: u64,
    /// The deadline of the check in flight.
    pub(super) timer: Option<TimerId>,
    /// The row of the check in flight.
    row: Option<Vec<Option<String>>>,
    error: Option<String>,
}

#[derive(Debug)]
enum Phase {
    Connecting(BackendLogin),
    LoggingIn(BackendLogin),
    Idle,
    Querying,
}

/// The host a check's connection goes to, from its host state.
fn endpoint_of(c: &Checked) -> &Endpoint {
    &c.host.endpoint
}

/// Who checks the hosts of storage `name`: its `health_check_*` settings,
/// else the server user, database and password of its first route that
/// names them (a `default` database or user stands for any, so it names
/// none), else `postgres` into `postgres` without a password.
fn credentials_for(cfg: &Config, name: &str) -> (String, String, Option<String>) {
    let st = &cfg.storage[name];
    let mut from_route = None;
    'found: for (db, d) in &cfg.database {
        for (user, r) in &d.user {
            if r.storage != name {
                continue;
            }
            let server_user = r
                .storage_user
                .clone()
                .or_else(|| (user != "default").then(|| user.clone()));
            let server_db = r
                .storage_db
                .clone()
                .or_else(|| (db != "default").then(|| db.clone()));
            if let (Some(u), Some(d)) = (server_user, server_db) {
                let password = r.storage_password.clone().or_else(|| {
                    r.password.clone().filter(|p| {
                        r.storage_user.is_none()
                            && !crate::config::is_md5_hash(p)
                            && !crate::config::is_scram_verifier(p)
                    })
                });
                from_route = Some((u, d, password));
                break 'found;
            }
        }
    }
    let (ru, rd, rp) = from_route.unwrap_or_else(|| ("postgres".into(), "postgres".into(), None));
    (
        st.health_check_user.clone().unwrap_or(ru),
        st.health_check_database.clone().unwrap_or(rd),
        st.health_check_password.clone().or(rp),
    )
}

/// Whether the hosts of storage `name` are checked.
fn checked_storage(cfg: &Config, name: &str) -> bool {
    let Some(st) = cfg.storage.get(name) else {
        return false;
    };
    let not_any = |t: Option<TargetSessionAttrs>| t.is_some_and(|t| t != TargetSessionAttrs::Any);
    st.kind == StorageType::Remote
        && st.health_check_interval > 0
        && (st.hosts.len() > 1
            || not_any(Some(st.target_session_attrs))
            || cfg.listen.iter().any(|l| not_any(l.target_session_attrs))
            || cfg.database.values().any(|d| {
                d.user
                    .values()
                    .any(|r| r.storage == name && not_any(r.target_session_attrs))
            }))
}

impl Worker {
    /// (Re)builds the checks from the config: worker 0 checks every host
    /// of every routed storage; a host checked as before keeps its
    /// connection, one no longer listed is forgotten.
    pub(super) fn configure_checks(&mut self, cx: &mut Context<'_, WorkerTimer>) {
        if self.w.id != 0 {
            return;
        }
        let cfg = Arc::clone(&self.w.cfg);
        let mut wanted = Vec::new();
        let mut listed = std::collections::HashSet::new();
        for (name, st) in &cfg.storage {
            let Ok(endpoints) = st.endpoints() else {
                continue;
            };
            for e in &endpoints {
                listed.insert((name.clone(), e.label()));
            }
            if !checked_storage(&cfg, name) {
                continue;
            }
            let (user, database, password) = credentials_for(&cfg, name);
            for host in self.w.registry.hosts.of(name, &endpoints) {
                wanted.push(Checked {
                    host,
                    database: database.clone(),
                    user: user.clone(),
                    password: password.clone(),
                    tls: !matches!(st.tls, StorageTls::Disable | StorageTls::Allow),
                    interval: Duration::from_millis(st.health_check_interval),
                    timeout: Duration::from_millis(st.health_check_timeout),
                    ban_ms: st.ban_time,
                    max_lag_bytes: st.max_replica_lag_bytes,
                    max_lag_ms: st.max_replica_lag_ms,
                    conn: None,
                });
            }
        }
        self.w.registry.hosts.retain(&listed);
        let old = std::mem::take(&mut self.w.checks.hosts);
        self.w.checks.epoch += 1;
        let epoch = self.w.checks.epoch;
        for mut c in old {
            let kept = wanted.iter_mut().find(|w| {
                Arc::ptr_eq(&w.host, &c.host)
                    && (&w.database, &w.user, &w.password, w.tls)
                        == (&c.database, &c.user, &c.password, c.tls)
            });
            match (kept, c.conn.take()) {
                (Some(w), Some(k)) => w.conn = Some(k),
                (_, Some(k)) => self.drop_check(cx, k),
                _ => {}
            }
        }
        for (i, w) in wanted.iter().enumerate() {
            if let Some(k) = w.conn {
                if let Some(Conn::Check(c)) = self.conns.get_mut(k) {
                    c.index = i;
                    c.epoch = epoch;
                }
            }
        }
        let n = wanted.len();
        self.w.checks.hosts = wanted;
        for i in 0..n {
            cx.set_timer(cx.now(), WorkerTimer::HealthDue(i, epoch));
        }
    }

    /// Check `i` is due: query its connection, connecting first if needed.
    pub(super) fn check_due(&mut self, cx: &mut Context<'_, WorkerTimer>, i: usize, epoch: u64) {
        if epoch != self.w.checks.epoch || self.w.draining {
            return;
        }
        let Some(c) = self.w.checks.hosts.get(i) else {
            return;
        };
        let timeout = c.timeout;
        match c.conn {
            Some(k) => {
                let Some(Conn::Check(check)) = self.conns.get_mut(k) else {
                    // Its connection went without telling: start anew.
                    if let Some(c) = self.w.checks.hosts.get_mut(i) {
                        c.conn = None;
                    }
                    self.open_check(cx, i);
                    return;
                };
                if !matches!(check.phase, Phase::Idle) {
                    // Still logging in or answering: its deadline runs.
                    return;
                }
                frontend::query(&mut check.io.out, QUERY);
                check.phase = Phase::Querying;
                check.row = None;
                check.error = None;
                let t = cx.set_timer(cx.now() + timeout, WorkerTimer::HealthTimeout(k));
                check.timer = Some(t);
                self.drive_check(cx, k);
            }
            None => self.open_check(cx, i),
        }
    }

    fn open_check(&mut self, cx: &mut Context<'_, WorkerTimer>, i: usize) {
        let Some(c) = self.w.checks.hosts.get(i) else {
            return;
        };
        let endpoint = endpoint_of(c).clone();
        let (database, user) = (c.database.clone(), c.user.clone());
        let credential = c
            .password
            .clone()
            .map(ScramCredential::Password)
            .or_else(|| credentials::credential(&c.host.storage, &user));
        let ask = if c.tls && endpoint.unix_socket_dir.is_none() {
            AskTls::Prefer
        } else {
            AskTls::No
        };
        let timeout = c.timeout;
        let stream = match self.open_storage(cx, &endpoint) {
            Opened::Stream(s) => s,
            Opened::Failed(failure) => {
                self.check_failed(cx, i, &failure.to_string());
                return;
            }
            Opened::Wait => {
                // Resolved by the time of the next check (the lookup runs
                // meanwhile); this one counts as failed only if it fails.
                self.schedule_check(cx, i);
                return;
            }
        };
        let mut io = Io::new(stream, false);
        let login = BackendLogin::start(&mut io.out, &database, &user, credential, ask);
        let epoch = self.w.checks.epoch;
        let (k, failed) = insert_registered(&mut self.conns, cx.registry(), io, |_, io| {
            Conn::Check(Box::new(Check {
                io,
                phase: Phase::Connecting(login),
                index: i,
                epoch,
                timer: None,
                row: None,
                error: None,
            }))
        });
        if let Some(c) = self.w.checks.hosts.get_mut(i) {
            c.conn = Some(k);
        }
        if let Some(e) = failed {
            self.check_failed(cx, i, &format!("cannot poll the connection: {e}"));
            return;
        }
        let t = cx.set_timer(cx.now() + timeout, WorkerTimer::HealthTimeout(k));
        if let Some(Conn::Check(c)) = self.conns.get_mut(k) {
            c.timer = Some(t);
        }
    }

    /// Moves a check connection on: connect, log in, send the query, read
    /// its answer.
    pub(super) fn drive_check(&mut self, cx: &mut Context<'_, WorkerTimer>, k: Key) {
        let readahead = self.w.cfg.readahead;
        for _ in 0..MAX_ROUNDS {
            let Some(Conn::Check(c)) = self.conns.get_mut(k) else {
                return;
            };
            let (i, epoch) = (c.index, c.epoch);
            if epoch != self.w.checks.epoch {
                self.drop_check(cx, k);
                return;
            }
            let Some(checked) = self.w.checks.hosts.get(i) else {
                self.drop_check(cx, k);
                return;
            };
            let endpoint = endpoint_of(checked);
            let phase = std::mem::replace(&mut c.phase, Phase::Idle);
            match phase {
                Phase::Connecting(login) => match connect_step(&mut c.io, endpoint) {
                    Connect::Done => c.phase = Phase::LoggingIn(login),
                    Connect::Pending => {
                        c.phase = Phase::Connecting(login);
                        return;
                    }
                    Connect::Failed(why) => {
                        self.check_failed(cx, i, &why);
                        return;
                    }
                },
                Phase::LoggingIn(mut login) => {
                    let moved = c.io.flush();
                    let tls = self.w.tls.storage.get(&*checked.host.storage);
                    let (more, step) =
                        step_login(&mut c.io, &mut login, tls, &endpoint.host, readahead);
                    match step {
                        LoginStep::Pending => {
                            c.phase = Phase::LoggingIn(login);
                            if !(moved || more) {
                                return;
                            }
                        }
                        LoginStep::Ready => {
                            frontend::query(&mut c.io.out, QUERY);
                            c.phase = Phase::Querying;
                        }
                        LoginStep::Failed(failure) => {
                            let why = format!("{failure} ({})", failure.code());
                            self.check_failed(cx, i, &why);
                            return;
                        }
                    }
                }
                Phase::Idle => {
                    // Nothing asked: what the server says unasked (a
                    // notice, its end) is read and dropped.
                    c.phase = Phase::Idle;
                    c.io.fill(readahead);
                    while let Ok(Some(_)) = codec::read_frame(&mut c.io.rx, 1 << 20) {}
                    if c.io.eof {
                        debug!("health check of {}: connection closed", checked.host.label);
                        self.drop_check(cx, k);
                    }
                    return;
                }
                Phase::Querying => {
                    c.phase = Phase::Querying;
                    let mut moved = c.io.flush();
                    moved |= c.io.fill(readahead);
                    while let Ok(Some(f)) = codec::read_frame(&mut c.io.rx, 1 << 20) {
                        match f.tag {
                            b'D' if c.row.is_none() => {
                                c.row = backend::parse_data_row(&f.body).ok().map(|row| {
                                    row.iter()
                                        .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                                        .collect()
                                });
                            }
                            b'E' => {
                                c.error = Some(
                                    backend::parse_error_fields(&f.body)
                                        .map_or_else(|e| e.to_string(), |e| e.message),
                                );
                            }
                            b'Z' => {
                                c.phase = Phase::Idle;
                                if let Some(t) = c.timer.take() {
                                    cx.cancel_timer(t);
                                }
                                let (row, error) = (c.row.take(), c.error.take());
                                match (error, row) {
                                    (Some(e), _) => self.check_failed(cx, i, &e),
                                    (None, Some(row)) => self.check_answered(cx, i, &row),
                                    (None, None) => self.check_failed(cx, i, "no row"),
                                }
                                return;
                            }
                            _ => {}
                        }
                    }
                    if c.io.eof {
                        self.check_failed(cx, i, "the connection closed during the check");
                        return;
                    }
                    if !moved {
                        return;
                    }
                }
            }
        }
        self.w.again.push(k);
        cx.again();
    }

    /// A check took longer than health_check_timeout.
    pub(super) fn check_timed_out(&mut self, cx: &mut Context<'_, WorkerTimer>, k: Key) {
        let Some(Conn::Check(c)) = self.conns.get_mut(k) else {
            return;
        };
        c.timer = None;
        let (i, epoch) = (c.index, c.epoch);
        if epoch != self.w.checks.epoch {
            self.drop_check(cx, k);
            return;
        }
        let ms = self
            .w
            .checks
            .hosts
            .get(i)
            .map_or(0, |c| c.timeout.as_millis());
        self.check_failed(
            cx,
            i,
            &format!("no answer within {ms} ms (health_check_timeout)"),
        );
    }

    /// Closes a check connection (its entry, if any, forgets it).
    pub(super) fn drop_check(&mut self, cx: &mut Context<'_, WorkerTimer>, k: Key) {
        if let Some(Conn::Check(c)) = self.conns.get_mut(k) {
            if let Some(t) = c.timer.take() {
                cx.cancel_timer(t);
            }
            if !c.io.eof {
                frontend::terminate(&mut c.io.out);
                c.io.writable = true;
                c.io.flush();
            }
        }
        for c in &mut self.w.checks.hosts {
            if c.conn == Some(k) {
                c.conn = None;
            }
        }
        self.kill(k);
    }

    fn schedule_check(&mut self, cx: &mut Context<'_, WorkerTimer>, i: usize) {
        if let Some(c) = self.w.checks.hosts.get(i) {
            let epoch = self.w.checks.epoch;
            cx.set_timer(cx.now() + c.interval, WorkerTimer::HealthDue(i, epoch));
        }
    }

    /// Check `i` failed: its connection goes, its host is banned.
    fn check_failed(&mut self, cx: &mut Context<'_, WorkerTimer>, i: usize, why: &str) {
        if let Some(k) = self.w.checks.hosts.get_mut(i).and_then(|c| c.conn.take()) {
            self.drop_check(cx, k);
        }
        let Some(c) = self.w.checks.hosts.get(i) else {
            return;
        };
        let hosts = &self.w.registry.hosts;
        let now_ms = hosts.now_ms(cx.now());
        let host = Arc::clone(&c.host);
        if hosts.fail(&host, why, now_ms, c.ban_ms) == Change::Banned {
            warn!(
                "host {} of storage {} banned for {} ms: health check failed: {why}",
                host.label, host.storage, c.ban_ms
            );
            self.w.announce_hosts();
            self.hosts_moved(cx);
        } else {
            debug!("health check of {} failed: {why}", host.label);
        }
        self.schedule_check(cx, i);
    }

    /// Check `i` answered with `row`: the host's role, position and lag.
    fn check_answered(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        i: usize,
        row: &[Option<String>],
    ) {
        let Some(c) = self.w.checks.hosts.get(i) else {
            return;
        };
        let col = |n: usize| row.get(n).and_then(|v| v.as_deref());
        let role = match col(0) {
            Some("t") => Role::Standby,
            Some("f") => Role::Primary,
            other => {
                let why = format!("unexpected answer {other:?}");
                self.check_failed(cx, i, &why);
                return;
            }
        };
        let lsn = col(1).and_then(hosts::parse_lsn).unwrap_or(0);
        let hosts = &self.w.registry.hosts;
        let now_ms = hosts.now_ms(cx.now());
        let host = Arc::clone(&c.host);
        let was_banned = host.banned(now_ms);
        let mut changes = vec![hosts.checked(&host, role, lsn, now_ms)];
        if role == Role::Standby {
            let receive = col(2).and_then(hosts::parse_lsn);
            let delay: u64 = col(3).and_then(|v| v.parse().ok()).unwrap_or(0);
            // The primary's position as of its own last check.
            let primary_lsn = self
                .w
                .checks
                .hosts
                .iter()
                .filter(|o| {
                    o.host.storage == host.storage && hosts.effective(&o.host) == Role::Primary
                })
                .map(|o| o.host.lsn())
                .max();
            let (bytes, ms) = hosts::lag_of(primary_lsn, lsn, receive, delay);
            let lagging = (c.max_lag_bytes > 0 && bytes > c.max_lag_bytes)
                || (c.max_lag_ms > 0 && ms > c.max_lag_ms);
            changes.push(hosts.set_lag(&host, bytes, ms, lagging));
        } else {
            changes.push(hosts.set_lag(&host, 0, 0, false));
        }
        let mut news = false;
        for change in changes {
            match change {
                Change::None => continue,
                Change::Role { from, to } => info!(
                    "host {} of storage {}: {} now (was {})",
                    host.label,
                    host.storage,
                    to.as_str(),
                    from.as_str()
                ),
                Change::Unbanned => info!(
                    "host {} of storage {}: back in rotation ({}; ban over)",
                    host.label,
                    host.storage,
                    role.as_str()
                ),
                Change::Banned => {}
                Change::Lag { lagging: true } => {
                    let (bytes, ms) = host.lag();
                    warn!(
                        "host {} of storage {}: replica lag {bytes} bytes, {ms} ms, past max_replica_lag: no new work",
                        host.label, host.storage
                    );
                }
                Change::Lag { lagging: false } => info!(
                    "host {} of storage {}: back within max_replica_lag",
                    host.label, host.storage
                ),
            }
            news = true;
        }
        if was_banned && !host.banned(now_ms) {
            news = true;
        }
        if news {
            self.w.announce_hosts();
            self.hosts_moved(cx);
        }
        self.schedule_check(cx, i);
    }
}
