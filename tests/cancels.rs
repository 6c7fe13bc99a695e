//! Cancel requests never hurt another client (issue 13): a late cancel of
//! one client never reaches another's query, and a client cancelling in a
//! loop cannot exhaust the pooler or PostgreSQL.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

/// Runs `pg_sleep(0.2)` in a loop until `stop`; returns (queries, cancelled
/// ones, slowest).
fn sleeper(port: u16, stop: Arc<AtomicBool>) -> thread::JoinHandle<(usize, usize, Duration)> {
    thread::spawn(move || {
        let mut c = connect(port, "test", "trust_user", None);
        let (mut n, mut cancelled, mut slowest) = (0, 0, Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            match c.simple_query("select pg_sleep(0.2)") {
                Ok(_) => {}
                Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => cancelled += 1,
                Err(e) => panic!("a sleeper's query failed: {}", describe(&e)),
            }
            slowest = slowest.max(t.elapsed());
            n += 1;
        }
        (n, cancelled, slowest)
    })
}

/// The race PgBouncer fixed in 2022 (pgbouncer#717): a client sends a
/// short query and right after its own CancelRequest, as a driver does when
/// its timeout fires as the reply arrives. By then the server may run
/// another client's query; that query must never be cancelled.
#[test]
fn a_late_cancel_never_hits_another_clients_query() {
    let _w = watchdog("a_late_cancel_never_hits_another_clients_query", LIMIT);
    let pg = PgCluster::start();
    let config = Config::new(pg.port())
        .workers(2)
        .route(Route::new("test", "trust_user").transaction().pool_size(4));
    let (_handle, port) = start_pooler(&config);
    let stop = Arc::new(AtomicBool::new(false));
    let sleepers: Vec<_> = (0..3).map(|_| sleeper(port, Arc::clone(&stop))).collect();
    let canceller = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut a = connect(port, "test", "trust_user", None);
            let token = a.cancel_token();
            let mut own = 0;
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) {
                // Half the cancels race the reply, half come just after it.
                let racing = rounds % 2 == 0;
                let t = racing.then(|| {
                    let token = token.clone();
                    thread::spawn(move || token.cancel_query(NoTls))
                });
                match a.simple_query("select 1") {
                    Ok(_) => {}
                    Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => own += 1,
                    Err(e) => panic!("the cancelling client failed: {}", describe(&e)),
                }
                match t {
                    Some(t) => t.join().expect("cancel thread").expect("cancel_query"),
                    None => token.cancel_query(NoTls).expect("cancel_query"),
                }
                rounds += 1;
            }
            (rounds, own)
        })
    };
    thread::sleep(Duration::from_secs(8));
    stop.store(true, Ordering::Relaxed);
    let (rounds, own) = canceller.join().expect("canceller");
    let mut total = 0;
    for s in sleepers {
        let (n, cancelled, _) = s.join().expect("sleeper");
        total += n;
        assert_eq!(
            cancelled, 0,
            "{cancelled} of {n} pg_sleep(0.2) of a client that cancelled nothing were cancelled \
             (the cancelling client sent {rounds} cancels, {own} hit its own queries)"
        );
    }
    println!(
        "late cancels: {rounds} sent, {own} hit the client's own queries, \
         {total} sleeps of others ran, none cancelled"
    );
    assert!(
        rounds > 100,
        "only {rounds} cancels sent: the test proves little"
    );
    assert!(total > 30, "only {total} sleeps ran");
}

/// A genuine cancel still arrives at once: a `pg_sleep(20)` is cancelled
/// within a second, from either worker.
#[test]
fn a_genuine_cancel_takes_under_a_second() {
    let _w = watchdog("a_genuine_cancel_takes_under_a_second", LIMIT);
    let pg = PgCluster::start();
    let config = Config::new(pg.port())
        .workers(2)
        .route(Route::new("test", "trust_user").transaction().pool_size(2));
    let (_handle, port) = start_pooler(&config);
    for round in 0..4 {
        let mut c = connect(port, "test", "trust_user", None);
        let token = c.cancel_token();
        let t = thread::spawn(move || {
            let r = c.simple_query("select pg_sleep(20)").map(drop);
            (r, Instant::now())
        });
        // The query must be running before the cancel is sent: a cancel for
        // a client with nothing running is dropped, as it should be.
        let started = Instant::now();
        loop {
            let rows = pg.sql(
                "postgres",
                "select count(*) from pg_stat_activity \
                 where query = 'select pg_sleep(20)' and state = 'active'",
            );
            let running = rows
                .first()
                .and_then(|r| r.first())
                .and_then(|v| v.as_deref());
            if running == Some("1") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "round {round}: the query never ran"
            );
            thread::sleep(Duration::from_millis(10));
        }
        let sent = Instant::now();
        token.cancel_query(NoTls).expect("cancel_query");
        let (r, done) = t.join().expect("query thread");
        let e = r.expect_err("a cancelled pg_sleep(20)");
        assert_eq!(
            e.code(),
            Some(&SqlState::QUERY_CANCELED),
            "round {round}: {}",
            describe(&e)
        );
        let took = done.saturating_duration_since(sent);
        assert!(
            took < Duration::from_secs(1),
            "round {round}: the cancel took {took:?}"
        );
    }
}

/// Open descriptors of this process (the pooler runs in it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// One client sends its own cancel key in a loop while it runs short
/// queries: odissey forwards at most one cancel per server at a time and
/// `cancel_max` in all, so descriptors and PostgreSQL backends stay
/// bounded and other clients are served as usual.
#[test]
fn a_cancel_flood_is_bounded_and_harms_nobody() {
    let _w = watchdog("a_cancel_flood_is_bounded_and_harms_nobody", LIMIT);
    let pg = PgCluster::start();
    let config = Config::new(pg.port())
        .workers(2)
        .route(Route::new("test", "trust_user").transaction().pool_size(4));
    let (_handle, port) = start_pooler(&config);
    let base_fds = open_fds();
    let stop = Arc::new(AtomicBool::new(false));
    let sleepers: Vec<_> = (0..2).map(|_| sleeper(port, Arc::clone(&stop))).collect();
    let (mut flooder, pid, key) = login_with_key(port, "trust_user", "test");
    let busy = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = flooder.query("select pg_sleep(0.01)");
            }
        })
    };
    let floods: Vec<_> = (0..4)
        .map(|_| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || flood_cancels(port, pid, key, &stop))
        })
        .collect();
    let mut peak_fds = 0;
    let mut peak_backends = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        peak_fds = peak_fds.max(open_fds());
        let backends = pg.sql(
            "postgres",
            "select count(*) from pg_stat_activity where backend_type = 'client backend'",
        );
        let n: usize = backends
            .first()
            .and_then(|r| r.first())
            .and_then(|v| v.as_deref()?.parse().ok())
            .unwrap_or(0);
        peak_backends = peak_backends.max(n);
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let sent: usize = floods
        .into_iter()
        .map(|f| f.join().expect("flood thread"))
        .sum();
    busy.join().expect("flooding client");
    for s in sleepers {
        let (n, cancelled, slowest) = s.join().expect("sleeper");
        println!("a sleeper ran {n} pg_sleep(0.2), the slowest in {slowest:?}");
        assert_eq!(cancelled, 0, "a sleeper was cancelled by another's flood");
        assert!(
            slowest < Duration::from_millis(500),
            "a 0.2 s query took {slowest:?} during the flood ({n} ran)"
        );
    }
    println!(
        "cancel flood: {sent} cancels in 6 s, peak {peak_fds} descriptors (from {base_fds}), \
         peak {peak_backends} PostgreSQL client backends"
    );
    assert!(
        sent > 2000,
        "only {sent} cancels sent: the flood proves little"
    );
    // The pool (4), the monitor's and the harness's connections, a few
    // cancels in flight (at most one per server): far from one per cancel.
    assert!(
        peak_backends <= 4 + 4 + 4,
        "{peak_backends} PostgreSQL backends during a flood of {sent} cancels"
    );
    assert!(
        peak_fds < base_fds + 300,
        "{peak_fds} descriptors open (from {base_fds}) during a flood of {sent} cancels"
    );
}
