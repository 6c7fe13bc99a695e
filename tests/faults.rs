//! Faults on the server side, with real PostgreSQL: a backend killed in the
//! middle of a client's transaction, and the whole server stopped and
//! started again under load. The pooler must tell the affected clients,
//! leave the others alone, and serve again with no intervention.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use odissey_harness::{PgCluster, TRUST_USER};
use postgres::error::SqlState;

#[test]
fn a_backend_killed_mid_transaction_fails_only_its_client() {
    let _w = watchdog("killed backend", Duration::from_secs(60));
    let pg = PgCluster::start();
    let route = Route::new("test", TRUST_USER).transaction().pool_size(4);
    let (_h, port) = start_pooler(&Config::new(pg.port()).route(route));
    let mut victim = connect(port, "test", TRUST_USER, None);
    let mut bystander = connect(port, "test", TRUST_USER, None);
    victim.batch_execute("BEGIN; SELECT 1").unwrap();
    bystander.batch_execute("BEGIN; SELECT 1").unwrap();
    let pid = backend_pid(&mut victim);
    pg.sql("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    // The victim hears PostgreSQL's own reason (or sees the connection end).
    let e = victim.simple_query("SELECT 2").unwrap_err();
    assert!(
        e.code()
            .map(SqlState::code)
            .is_some_and(|c| ["57P01", "08006"].contains(&c))
            || e.is_closed(),
        "{}",
        describe(&e)
    );
    // The other transaction goes on, and commits.
    bystander.batch_execute("SELECT 3; COMMIT").unwrap();
    // New clients are served, and the dead backend's slot was given back.
    for _ in 0..6 {
        let mut c = connect(port, "test", TRUST_USER, None);
        assert_eq!(c.query_one("SELECT 4", &[]).unwrap().get::<_, i32>(0), 4);
    }
}

#[test]
fn postgresql_restarted_under_load_is_served_again() {
    let _w = watchdog("server restart under load", Duration::from_secs(120));
    let pg = PgCluster::start();
    let route = Route::new("test", TRUST_USER)
        .transaction()
        .pool_size(4)
        .pool_timeout_ms(2000);
    let (h, port) = start_pooler(&Config::new(pg.port()).route(route));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    // Eight clients in a loop; each reconnects after an error.
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
            std::thread::spawn(move || {
                let mut client = None;
                while !stop.load(Ordering::Relaxed) {
                    if client.is_none() {
                        client = try_connect(port, "test", TRUST_USER, None).ok();
                    }
                    let Some(c) = client.as_mut() else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    let t0 = Instant::now();
                    match c.simple_query("SELECT 1") {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            // An error, never a hang.
                            assert!(t0.elapsed() < Duration::from_secs(10), "a query hung");
                            failed.fetch_add(1, Ordering::Relaxed);
                            client = None;
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let before = ok.load(Ordering::Relaxed);
    assert!(before > 0, "the load runs");
    pg.stop();
    std::thread::sleep(Duration::from_millis(1500));
    let failed_while_down = failed.load(Ordering::Relaxed);
    assert!(
        failed_while_down > 0,
        "clients are told while the server is down"
    );
    pg.restart();
    // Served again, without touching the pooler.
    let served_again = ok.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ok.load(Ordering::Relaxed) < served_again + 200 {
        assert!(Instant::now() < deadline, "the pool did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    // No server connection is leaked or stuck: at most pool_size, all
    // usable now.
    let ins = h.inspect().unwrap();
    let r = ins.route("test", TRUST_USER).unwrap();
    assert!(
        r.servers_active + r.servers_idle + r.servers_login <= 4,
        "{r:?}"
    );
    assert_eq!(r.clients_waiting, 0, "{r:?}");
    assert!(pg.backends(TRUST_USER) <= 4);
}

/// The whole server stopped with SIGSTOP, as a network cut or a frozen
/// host looks from the pooler: the kernel still accepts connections, but
/// nothing answers. Clients get a clear error, not a hang.
#[test]
fn a_frozen_server_brings_clear_errors_not_a_hang() {
    let _w = watchdog("frozen server", Duration::from_secs(90));
    let pg = PgCluster::start();
    let (r, k) = (
        Route::new("test", TRUST_USER).transaction().pool_size(2),
        RouteKeys::new("test", TRUST_USER).raw("query_timeout", "1"),
    );
    let cfg = Config::new(pg.port())
        .global("server_connect_timeout", "1000")
        .route(r);
    let (_h, port) = start_pooler_ext(&cfg, &[k]);
    let mut running = connect(port, "test", TRUST_USER, None);
    let mut idle = connect(port, "test", TRUST_USER, None);
    idle.simple_query("SELECT 1").unwrap();
    // Every PostgreSQL process, postmaster first.
    let pid_file = std::fs::read_to_string(pg.datadir().join("postmaster.pid")).unwrap();
    let postmaster = pid_file.lines().next().unwrap().trim().to_string();
    let children = std::process::Command::new("pgrep")
        .args(["-P", &postmaster])
        .output()
        .expect("pgrep");
    let mut pids: Vec<u32> = vec![postmaster.parse().expect("postmaster pid")];
    pids.extend(
        String::from_utf8_lossy(&children.stdout)
            .split_whitespace()
            .map(|p| p.parse::<u32>().expect("pgrep prints pids")),
    );
    let frozen = Frozen::new(pids);

    // A query on a server that stops answering: query_timeout cancels it,
    // the cancel is not answered either, and the client is told.
    let t0 = Instant::now();
    let e = running
        .simple_query("SELECT 1")
        .expect_err("a frozen server answered");
    let took = t0.elapsed();
    assert_eq!(
        e.code().map(SqlState::code),
        Some("08006"),
        "{}",
        describe(&e)
    );
    assert!(
        describe(&e).contains("query_timeout"),
        "the error says why: {}",
        describe(&e)
    );
    assert!(took < Duration::from_secs(6), "told after {took:?}");

    // A client that needs a new server connection: server_connect_timeout.
    // (Two clients hold the route's pool_size = 2: the idle one's server
    // is frozen too, so close it first.)
    drop(idle);
    // (A login on a worker that has not greeted a server of this pool yet
    // needs one too, so the error may come at login.)
    let t0 = Instant::now();
    let mut told = 0;
    for _ in 0..2 {
        let outcome = try_connect(port, "test", TRUST_USER, None)
            .and_then(|mut c| c.simple_query("SELECT 1").map(|_| ()));
        if let Err(e) = outcome {
            eprintln!("told: {}", describe(&e));
            let code = e.code().map(SqlState::code);
            assert!(code == Some("08006") || e.is_closed(), "{}", describe(&e));
            told += 1;
        }
    }
    assert!(told > 0, "no client was told the server is gone");
    assert!(
        t0.elapsed() < Duration::from_secs(12),
        "told after {:?}",
        t0.elapsed()
    );

    // Thawed, the pool serves again with no intervention.
    drop(frozen);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = try_connect(port, "test", TRUST_USER, None) {
            if c.simple_query("SELECT 2").is_ok() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "not served after the thaw");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Processes held with SIGSTOP, sent SIGCONT when dropped (also when the
/// test fails).
struct Frozen(Vec<u32>);

impl Frozen {
    fn new(pids: Vec<u32>) -> Self {
        let frozen = Self(pids);
        for &pid in &frozen.0 {
            signal(pid, "STOP");
        }
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for &pid in &self.0 {
            try_signal(pid, "CONT");
        }
    }
}
