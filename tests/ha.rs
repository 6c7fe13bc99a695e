//! The request router against real streaming replication: a primary and
//! standbys made by the harness with `pg_basebackup -R`, all on loopback.
//! Routing by role (`target_session_attrs`), load balancing, the lag
//! limit, failover (stop the primary, promote the standby) under load,
//! a planned switchover with PAUSE/RESUME, and bans of hosts that refuse
//! connections, hang or refuse the login.

mod common;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use odissey_harness::TRUST_USER;

const ADMIN_PASS: &str = "console-secret";

/// A storage `main` over `hosts` (ports on 127.0.0.1) with the given
/// extra storage lines, the routes given as (database, target_session_attrs,
/// extra lines) for trust_user into database `test`, and the console.
fn ha_toml(hosts: &[u16], storage: &[&str], routes: &[(&str, &str, &[&str])]) -> String {
    let list: Vec<String> = hosts.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let mut out = format!(
        "workers = 2\nlog_debug = false\n\n[[listen]]\nhost = \"127.0.0.1\"\nport = 0\n\n\
         [storage.main]\ntype = \"remote\"\nhosts = [{}]\nhealth_check_interval = 200\n\
         health_check_timeout = 500\nban_time = 1000\n",
        list.join(", ")
    );
    for l in storage {
        out.push_str(l);
        out.push('\n');
    }
    for (db, tsa, extra) in routes {
        out.push_str(&format!(
            "\n[database.{db}.user.{TRUST_USER}]\nauthentication = \"none\"\nstorage = \"main\"\n\
             storage_db = \"test\"\ntarget_session_attrs = \"{tsa}\"\n"
        ));
        // Defaults, unless the extra lines set them.
        for (key, value) in [
            ("pool", "\"transaction\""),
            ("pool_size", "4"),
            ("pool_timeout", "3000"),
        ] {
            if !extra.iter().any(|l| l.starts_with(&format!("{key} ="))) {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        for l in *extra {
            out.push_str(l);
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "\n[storage.local]\ntype = \"local\"\n\n[database.console.user.admin]\n\
         authentication = \"scram-sha-256\"\npassword = \"{ADMIN_PASS}\"\nstorage = \"local\"\n"
    ));
    out
}

/// The first row of a simple query, as text (one round trip: one
/// transaction, so one choice of host).
fn row_of(c: &mut Client, sql: &str) -> Result<Vec<String>, String> {
    for m in c.simple_query(sql).map_err(|e| describe(&e))? {
        if let postgres::SimpleQueryMessage::Row(r) = m {
            return Ok((0..r.len())
                .map(|i| r.get(i).unwrap_or("").to_string())
                .collect());
        }
    }
    Err(format!("{sql}: no row"))
}

/// (in recovery, server port) of a transaction through `db`.
fn where_am_i(port: u16, db: &str) -> Result<(bool, u16), String> {
    let mut c = try_connect(port, db, TRUST_USER, None).map_err(|e| describe(&e))?;
    let row = row_of(&mut c, "select pg_is_in_recovery(), inet_server_port()")?;
    Ok((row[0] == "t", row[1].parse().unwrap_or(0)))
}

fn host(ins: &Inspection, port: u16) -> &odissey::HostStats {
    let label = format!("127.0.0.1:{port}");
    ins.hosts
        .iter()
        .find(|h| h.host == label)
        .unwrap_or_else(|| panic!("no host {label} in {:?}", ins.hosts))
}

/// Waits until `f` holds of an inspection, or panics with the last one.
fn wait_for(handle: &Handle, what: &str, timeout: Duration, f: impl Fn(&Inspection) -> bool) {
    let start = Instant::now();
    loop {
        let ins = handle.inspect().expect("inspect");
        if f(&ins) {
            return;
        }
        if start.elapsed() > timeout {
            panic!("not within {timeout:?}: {what}; hosts: {:#?}", ins.hosts);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn routes_by_role_and_spreads_reads() {
    let _w = watchdog("routes_by_role_and_spreads_reads", Duration::from_secs(180));
    let primary = PgCluster::start();
    let s1 = primary.start_standby();
    let s2 = primary.start_standby();
    let toml = ha_toml(
        &[primary.port(), s1.port(), s2.port()],
        &[],
        &[
            ("rw", "read-write", &[]),
            ("ro", "read-only", &[]),
            ("pref", "prefer-standby", &[]),
            ("anyhost", "any", &[]),
            (
                "rwro",
                "read-write",
                &["read_only_transactions = \"standby\""],
            ),
        ],
    );
    let (handle, port) = start_pooler_from(ConfigSource::Toml(toml));
    wait_for(&handle, "roles found", Duration::from_secs(10), |i| {
        i.hosts.len() == 3 && i.hosts.iter().all(|h| h.role != "unknown")
    });
    let ins = handle.inspect().unwrap();
    assert_eq!(host(&ins, primary.port()).role, "primary");
    assert_eq!(host(&ins, s1.port()).role, "standby");

    // Writes land on the primary, every time.
    for _ in 0..6 {
        assert_eq!(where_am_i(port, "rw").unwrap(), (false, primary.port()));
    }
    let mut c = connect(port, "rw", TRUST_USER, None);
    c.batch_execute("create table if not exists routed(x int); insert into routed values (1)")
        .expect("a write through read-write");
    drop(c);
    // Reads through read-only go to the standbys, in turn.
    let mut seen = std::collections::HashMap::new();
    for _ in 0..12 {
        let (recovery, p) = where_am_i(port, "ro").unwrap();
        assert!(recovery, "read-only landed on the primary");
        *seen.entry(p).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "round robin uses both standbys: {seen:?}");
    assert!(
        seen.values().all(|&n| n >= 3),
        "round robin spreads evenly: {seen:?}"
    );
    // Within one connection too: each transaction may go elsewhere.
    let mut c = connect(port, "ro", TRUST_USER, None);
    let ports: std::collections::HashSet<String> = (0..6)
        .map(|_| {
            row_of(&mut c, "select inet_server_port()")
                .unwrap()
                .remove(0)
        })
        .collect();
    assert_eq!(
        ports.len(),
        2,
        "one client's transactions spread: {ports:?}"
    );
    drop(c);
    // `any` uses all three.
    let anyhost: std::collections::HashSet<u16> = (0..9)
        .map(|_| where_am_i(port, "anyhost").unwrap().1)
        .collect();
    assert_eq!(anyhost.len(), 3, "any spreads over every host: {anyhost:?}");
    // SHOW HOSTS says the same as inspect.
    let mut admin = connect(port, "console", "admin", Some(ADMIN_PASS));
    let rows: Vec<_> = admin
        .simple_query("SHOW HOSTS")
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => {
                Some((r.get(1).unwrap().to_string(), r.get(2).unwrap().to_string()))
            }
            _ => None,
        })
        .collect();
    assert!(
        rows.contains(&(format!("127.0.0.1:{}", primary.port()), "primary".into())),
        "{rows:?}"
    );

    // read_only_transactions = "standby": a transaction the client
    // declared read-only goes to a standby, the rest to the primary.
    let mut c = connect(port, "rwro", TRUST_USER, None);
    for _ in 0..3 {
        let rows = c
            .simple_query("BEGIN READ ONLY; SELECT pg_is_in_recovery()::text; COMMIT")
            .unwrap();
        let ro = rows.iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(ro.as_deref(), Some("true"), "BEGIN READ ONLY on a standby");
        assert_eq!(
            row_of(&mut c, "select pg_is_in_recovery()").unwrap()[0],
            "f"
        );
    }
    c.batch_execute("SET default_transaction_read_only = on")
        .unwrap();
    // (A request sent while odissey still reads the session back after the
    // SET follows on the same server; the next one is routed anew.)
    row_of(&mut c, "select 1").unwrap();
    for _ in 0..2 {
        assert_eq!(
            row_of(&mut c, "select pg_is_in_recovery()").unwrap()[0],
            "t"
        );
    }
    drop(c);
    // A cancel reaches the host that runs the query (here a standby).
    let mut c = connect(port, "ro", TRUST_USER, None);
    let token = c.cancel_token();
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(500));
        token.cancel_query(NoTls)
    });
    let started = Instant::now();
    let err = c
        .simple_query("select pg_sleep(20)")
        .expect_err("the cancel did not arrive");
    assert_eq!(
        err.code(),
        Some(&SqlState::QUERY_CANCELED),
        "{}",
        describe(&err)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    canceller.join().unwrap().expect("cancel sent");
    drop(c);

    // prefer-standby reads a standby; with both standbys down, the primary.
    assert!(where_am_i(port, "pref").unwrap().0);
    s1.stop();
    s2.stop();
    wait_for(&handle, "standbys banned", Duration::from_secs(10), |i| {
        host(i, s1.port()).banned && host(i, s2.port()).banned
    });
    assert_eq!(where_am_i(port, "pref").unwrap(), (false, primary.port()));
    // read-only has nowhere to go: a clear error naming the route, after
    // its pool_timeout, not a hang.
    let started = Instant::now();
    let err = where_am_i(port, "ro").expect_err("read-only with no standby");
    assert!(
        err.contains("no host of storage \"main\" can serve route ro") && err.contains("read-only"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // A standby back: read-only is served again.
    s1.restart();
    wait_for(&handle, "standby back", Duration::from_secs(10), |i| {
        let h = host(i, s1.port());
        !h.banned && h.role == "standby"
    });
    assert_eq!(where_am_i(port, "ro").unwrap(), (true, s1.port()));
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn least_connections_balances_sessions() {
    let _w = watchdog(
        "least_connections_balances_sessions",
        Duration::from_secs(120),
    );
    let primary = PgCluster::start();
    let standby = primary.start_standby();
    let toml = ha_toml(
        &[primary.port(), standby.port()],
        &["load_balance = \"least_connections\""],
        &[("sess", "any", &["pool = \"session\"", "pool_size = 8"])],
    );
    let (handle, port) = start_pooler_from(ConfigSource::Toml(toml));
    wait_for(&handle, "roles found", Duration::from_secs(10), |i| {
        i.hosts.iter().all(|h| h.role != "unknown")
    });
    // Session clients hold their server: each new one goes to the host
    // with fewer connections.
    let mut clients = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..6 {
        let mut c = connect(port, "sess", TRUST_USER, None);
        let p: u16 = row_of(&mut c, "select inet_server_port()").unwrap()[0]
            .parse()
            .unwrap();
        ports.push(p);
        clients.push(c);
    }
    let on_primary = ports.iter().filter(|&&p| p == primary.port()).count();
    assert_eq!(on_primary, 3, "least_connections: 3 and 3, got {ports:?}");
    let ins = handle.inspect().unwrap();
    assert_eq!(host(&ins, primary.port()).connections, 3);
    assert_eq!(host(&ins, standby.port()).connections, 3);
    drop(clients);
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn a_lagging_standby_takes_no_reads_until_it_catches_up() {
    let _w = watchdog("a_lagging_standby", Duration::from_secs(120));
    let primary = PgCluster::start();
    let standby = primary.start_standby();
    let toml = ha_toml(
        &[primary.port(), standby.port()],
        &["max_replica_lag_bytes = 65536"],
        &[("ro", "read-only", &[]), ("pref", "prefer-standby", &[])],
    );
    let (handle, port) = start_pooler_from(ConfigSource::Toml(toml));
    wait_for(&handle, "roles found", Duration::from_secs(10), |i| {
        i.hosts.iter().all(|h| h.role != "unknown")
    });
    assert_eq!(where_am_i(port, "ro").unwrap(), (true, standby.port()));
    standby.pause_replay();
    primary.sql(
        "test",
        "create table filler as select g, repeat('x', 200) as pad from generate_series(1, 5000) g",
    );
    wait_for(&handle, "standby lagging", Duration::from_secs(10), |i| {
        host(i, standby.port()).lagging
    });
    let lag = host(&handle.inspect().unwrap(), standby.port()).lag_bytes;
    assert!(lag > 65536, "lag {lag}");
    // No new reads on it: prefer-standby reads the primary, read-only waits
    // and is told why.
    assert_eq!(where_am_i(port, "pref").unwrap(), (false, primary.port()));
    let err = where_am_i(port, "ro").expect_err("read-only while the only standby lags");
    assert!(err.contains("lagging"), "{err}");
    standby.resume_replay();
    standby.wait_caught_up(&primary, Duration::from_secs(30));
    wait_for(&handle, "standby caught up", Duration::from_secs(10), |i| {
        !host(i, standby.port()).lagging
    });
    assert_eq!(where_am_i(port, "ro").unwrap(), (true, standby.port()));
    assert_eq!(where_am_i(port, "pref").unwrap(), (true, standby.port()));
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

/// Clients writing in a loop, each on its own connection, reconnecting
/// after an error: how many transactions succeeded, which failed, and when
/// each write succeeded.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<Mutex<Vec<String>>>,
    oks: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, db: &'static str, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let oks = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|i| {
                let (stop, ok, failed, oks) =
                    (stop.clone(), ok.clone(), failed.clone(), oks.clone());
                thread::spawn(move || {
                    let mut client: Option<Client> = None;
                    while !stop.load(Ordering::Relaxed) {
                        let c = match &mut client {
                            Some(c) => c,
                            None => match try_connect(port, db, TRUST_USER, None) {
                                Ok(c) => client.insert(c),
                                Err(e) => {
                                    failed
                                        .lock()
                                        .unwrap()
                                        .push(format!("connect: {}", describe(&e)));
                                    thread::sleep(Duration::from_millis(50));
                                    continue;
                                }
                            },
                        };
                        let sql = format!("insert into ledger values ({i}, now())");
                        match c.simple_query(&sql) {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                oks.lock().unwrap().push(Instant::now());
                            }
                            Err(e) => {
                                failed.lock().unwrap().push(describe(&e));
                                client = None;
                            }
                        }
                        thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            oks,
            threads,
        }
    }

    fn finish(self) -> (u64, Vec<String>, Vec<Instant>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("a load thread panicked");
        }
        let failed = self.failed.lock().unwrap().clone();
        let oks = self.oks.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failed, oks)
    }
}

#[test]
fn failover_follows_the_promotion_under_load() {
    let _w = watchdog("failover_follows_the_promotion", Duration::from_secs(240));
    let mut primary = PgCluster::start();
    let standby = primary.start_standby();
    primary.sql("test", "create table ledger(client int, at timestamptz)");
    primary.sql("test", "grant all on ledger to public");
    standby.wait_caught_up(&primary, Duration::from_secs(30));
    let toml = ha_toml(
        &[primary.port(), standby.port()],
        &["health_check_interval = 500"],
        &[(
            "rw",
            "read-write",
            &["pool_timeout = 10000", "pool_size = 8"],
        )],
    )
    .replace("health_check_interval = 200\n", "");
    let (handle, port) = start_pooler_from(ConfigSource::Toml(toml));
    wait_for(&handle, "roles found", Duration::from_secs(10), |i| {
        i.hosts.iter().all(|h| h.role != "unknown")
    });
    let load = Load::start(port, "rw", 16);
    thread::sleep(Duration::from_secs(2));
    // The primary dies; the standby is promoted a moment later.
    primary.stop_immediate();
    let died = Instant::now();
    thread::sleep(Duration::from_millis(300));
    standby.promote();
    let promoted = Instant::now();
    thread::sleep(Duration::from_secs(3));
    let (ok, failed, oks) = load.finish();
    let first_after = oks
        .iter()
        .filter(|t| **t > promoted)
        .min()
        .copied()
        .expect("no write succeeded after the promotion");
    let switch = first_after.saturating_duration_since(promoted);
    eprintln!(
        "failover: {ok} transactions, {} failed, first write {switch:?} after promotion ({:?} after the crash); failures: {failed:?}",
        failed.len(),
        first_after.duration_since(died)
    );
    // (500 ms between checks: noticed within one interval and a probe.)
    assert!(switch < Duration::from_secs(2), "switch took {switch:?}");
    // Only what was in flight when the primary died fails: at most one per
    // client, with 08006.
    assert!(failed.len() <= 16, "{} failed: {failed:?}", failed.len());
    for f in &failed {
        assert!(f.contains("08006"), "an unexpected failure: {f}");
    }
    let ins = handle.inspect().unwrap();
    assert_eq!(host(&ins, standby.port()).role, "primary");
    // No leaked server connection: within pool_size on the new primary
    // (and the health check's own).
    thread::sleep(Duration::from_millis(300));
    let backends = standby.backends(TRUST_USER);
    assert!(
        backends <= 8 + 1,
        "{backends} backends of trust_user on the new primary"
    );
    // The old primary, rebuilt as a standby of the new one, rejoins as one.
    primary.rebuild_as_standby_of(&standby);
    wait_for(
        &handle,
        "old primary back as a standby",
        Duration::from_secs(15),
        |i| {
            let h = host(i, primary.port());
            h.role == "standby" && !h.banned
        },
    );
    assert_eq!(where_am_i(port, "rw").unwrap(), (false, standby.port()));
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn planned_switchover_with_pause_loses_nothing() {
    let _w = watchdog("planned_switchover_with_pause", Duration::from_secs(240));
    let primary = PgCluster::start();
    let standby = primary.start_standby();
    primary.sql("test", "create table ledger(client int, at timestamptz)");
    primary.sql("test", "grant all on ledger to public");
    standby.wait_caught_up(&primary, Duration::from_secs(30));
    let toml = ha_toml(
        &[primary.port(), standby.port()],
        &[],
        &[(
            "rw",
            "read-write",
            &["pool_timeout = 30000", "pool_size = 8"],
        )],
    );
    let (handle, port) = start_pooler_from(ConfigSource::Toml(toml));
    wait_for(&handle, "roles found", Duration::from_secs(10), |i| {
        i.hosts.iter().all(|h| h.role != "unknown")
    });
    let load = Load::start(port, "rw", 16);
    thread::sleep(Duration::from_secs(1));
    // The documented steps: PAUSE, stop the old primary, promote, wait for
    // odissey to see the new primary, RESUME.
    let mut admin = connect(port, "console", "admin", Some(ADMIN_PASS));
    admin.simple_query("PAUSE rw").expect("PAUSE");
    primary.stop();
    standby.promote();
    wait_for(&handle, "new primary seen", Duration::from_secs(10), |i| {
        host(i, standby.port()).role == "primary"
    });
    admin.simple_query("RESUME rw").expect("RESUME");
    thread::sleep(Duration::from_secs(2));
    let (ok, failed, _) = load.finish();
    assert!(ok > 100, "only {ok} transactions");
    assert!(
        failed.is_empty(),
        "a planned switchover failed transactions: {failed:?}"
    );
    let rows = pg_scalar(&standby, "test", "select count(*) from ledger").unwrap();
    assert_eq!(
        rows.parse::<u64>().unwrap(),
        ok,
        "every committed write is on the new primary"
    );
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn failing_hosts_are_banned_and_the_others_serve() {
    let _w = watchdog("failing_hosts_are_banned", Duration::from_secs(180));
    let primary = PgCluster::start();
    let standby = primary.start_standby();
    // A server whose `app` has another password: logins to it fail.
    let other = PgCluster::start();
    other.sql("postgres", "alter role app password 'not-the-same'");
    let closed = free_port();
    let toml = format!(
        "workers = 1\nlog_debug = false\n\n[[listen]]\nhost = \"127.0.0.1\"\nport = 0\n\n\
         [storage.main]\ntype = \"remote\"\n\
         hosts = [\"127.0.0.1:{}\", \"127.0.0.1:{}\", \"127.0.0.1:{closed}\", \"127.0.0.1:{}\"]\n\
         health_check_interval = 200\nhealth_check_timeout = 500\nban_time = 1000\n\n\
         [database.app.user.app]\nauthentication = \"scram-sha-256\"\npassword = \"app_pass\"\n\
         storage = \"main\"\npool = \"transaction\"\npool_timeout = 3000\n",
        primary.port(),
        standby.port(),
        other.port()
    );
    let (handle, port) = start_pooler_from(ConfigSource::Toml(toml));
    wait_for(
        &handle,
        "the bad hosts banned",
        Duration::from_secs(10),
        |i| host(i, closed).banned && host(i, other.port()).banned,
    );
    let ins = handle.inspect().unwrap();
    assert!(
        host(&ins, other.port()).why.contains("password"),
        "{:?}",
        host(&ins, other.port())
    );
    assert!(!host(&ins, primary.port()).banned);
    let serve = || {
        let mut c = try_connect(port, "app", "app", Some("app_pass")).map_err(|e| describe(&e))?;
        let p = row_of(&mut c, "select inet_server_port()")?.remove(0);
        Ok::<u16, String>(p.parse().unwrap())
    };
    let served: std::collections::HashSet<u16> = (0..8).map(|_| serve().unwrap()).collect();
    assert_eq!(
        served,
        [primary.port(), standby.port()].into_iter().collect(),
        "only the good hosts serve"
    );
    // A host that hangs: its checks time out, it is banned, the other serves.
    standby.freeze();
    wait_for(
        &handle,
        "the frozen host banned",
        Duration::from_secs(10),
        |i| host(i, standby.port()).banned,
    );
    assert!(host(&handle.inspect().unwrap(), standby.port())
        .why
        .contains("health_check_timeout"));
    for _ in 0..4 {
        assert_eq!(serve().unwrap(), primary.port());
    }
    standby.thaw();
    // None left: a clear error, not a hang.
    primary.stop();
    standby.stop();
    wait_for(&handle, "every host banned", Duration::from_secs(10), |i| {
        i.hosts.iter().all(|h| h.banned)
    });
    let started = Instant::now();
    let err = serve().expect_err("no host left");
    assert!(err.contains("no host of storage \"main\""), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    handle.shutdown(Duration::from_secs(5)).unwrap();
}
