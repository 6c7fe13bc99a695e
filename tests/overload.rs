//! Overload and fairness with real PostgreSQL: routes sharing a storage
//! capped by `storage_max`, and the order in which waiting clients are
//! served.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use odissey_harness::{PgCluster, TRUST_USER};

/// A flood of clients on one route of a storage capped at three server
/// connections cannot starve another route of that storage: the other
/// route's client is served within its pool_timeout while the flood goes
/// on, and the storage never holds more than three connections.
#[test]
fn storage_max_is_shared_between_routes() {
    let _w = watchdog("storage_max fairness", Duration::from_secs(90));
    let pg = PgCluster::start();
    // Both routes log in to database `test` as trust_user: PostgreSQL's
    // count of that user's backends is the storage's connections.
    let flood = Route::new("flood", TRUST_USER)
        .storage_db("test")
        .transaction()
        .pool_size(10)
        .pool_timeout_ms(30_000);
    let quiet = Route::new("test", TRUST_USER)
        .transaction()
        .pool_size(10)
        .pool_timeout_ms(5_000);
    let cfg = Config::new(pg.port())
        .storage("storage_max", "3")
        .route(flood)
        .route(quiet);
    let (h, port) = start_pooler(&cfg);
    let stop = AtomicBool::new(false);
    let flood_done = AtomicUsize::new(0);
    let monitor = Monitor::new();
    thread::scope(|s| {
        s.spawn(|| monitor.run(&pg, TRUST_USER, Some(&h)));
        let floods: Vec<_> = (0..12)
            .map(|_| {
                s.spawn(|| {
                    let mut c = connect(port, "flood", TRUST_USER, None);
                    while !stop.load(Ordering::SeqCst) {
                        c.simple_query("select pg_sleep(0.02)")
                            .unwrap_or_else(|e| panic!("flood client: {}", describe(&e)));
                        flood_done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        // Let the flood take the whole storage first.
        let t = Instant::now();
        while flood_done.load(Ordering::SeqCst) < 50 && t.elapsed() < Duration::from_secs(20) {
            thread::sleep(Duration::from_millis(10));
        }
        let before = flood_done.load(Ordering::SeqCst);
        assert!(
            before >= 50,
            "the flood did not get going: {before} queries"
        );
        // The flood holds the whole storage.
        let full = h.inspect().expect("inspect").storages;
        assert_eq!(full.len(), 1, "{full:?}");
        assert_eq!(
            (full[0].storage_max, full[0].connections),
            (3, 3),
            "{full:?}"
        );
        // The quiet route logs in and runs queries while the flood goes
        // on; a starved request would end in pool_timeout's error.
        let t = Instant::now();
        let mut c = connect(port, "test", TRUST_USER, None);
        for i in 0..20 {
            let got = scalar(&mut c, &format!("select {i}"));
            assert_eq!(got.as_deref(), Some(i.to_string().as_str()));
        }
        let quiet_took = t.elapsed();
        let during = flood_done.load(Ordering::SeqCst) - before;
        stop.store(true, Ordering::SeqCst);
        for f in floods {
            f.join().expect("flood client");
        }
        monitor.stop();
        eprintln!("quiet route: 20 queries in {quiet_took:?} while the flood ran {during} queries");
        assert!(during > 0, "the flood was stopped rather than shared");
    });
    assert!(monitor.samples() > 10, "the monitor took too few samples");
    assert!(
        monitor.max_backends() <= 3,
        "storage_max = 3, yet PostgreSQL saw {} backends of the routes",
        monitor.max_backends()
    );
    assert!(
        monitor.max_servers() <= 3,
        "storage_max = 3, yet the pooler held {} servers",
        monitor.max_servers()
    );
    // Nobody waits on the storage any more.
    let storages = h.inspect().expect("inspect").storages;
    assert_eq!(storages[0].routes_waiting, 0, "{storages:?}");
    assert!(storages[0].connections <= 3, "{storages:?}");
    // With the flood gone the quiet route may use the whole storage.
    let mut clients: Vec<_> = (0..3)
        .map(|_| connect(port, "test", TRUST_USER, None))
        .collect();
    for c in &mut clients {
        c.batch_execute("BEGIN; SELECT 1").expect("begin");
    }
    for c in &mut clients {
        c.batch_execute("COMMIT").expect("commit");
    }
}

/// Clients waiting for a route's only server are served in the order they
/// asked: PostgreSQL's clock at each query's run puts them in that order.
#[test]
fn waiting_clients_are_served_first_come_first_served() {
    let _w = watchdog("FIFO", Duration::from_secs(60));
    let pg = PgCluster::start();
    let route = Route::new("test", TRUST_USER)
        .transaction()
        .pool_size(1)
        .pool_timeout_ms(30_000);
    let (_h, port) = start_pooler(&Config::new(pg.port()).workers(1).route(route));
    let mut holder = connect(port, "test", TRUST_USER, None);
    let mut waiters: Vec<_> = (0..6)
        .map(|_| connect(port, "test", TRUST_USER, None))
        .collect();
    // The only server is held by an open transaction: every query below
    // queues, in the order sent (50 ms apart).
    holder.batch_execute("BEGIN; SELECT 1").expect("begin");
    let ran: Vec<(usize, String)> = thread::scope(|s| {
        let handles: Vec<_> = waiters
            .iter_mut()
            .enumerate()
            .map(|(i, c)| {
                thread::sleep(Duration::from_millis(50));
                s.spawn(move || {
                    (
                        i,
                        scalar(c, "select clock_timestamp()::text").expect("time"),
                    )
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(200));
        holder.batch_execute("COMMIT").expect("commit");
        handles
            .into_iter()
            .map(|h| h.join().expect("waiter"))
            .collect()
    });
    let mut by_time = ran.clone();
    by_time.sort_by(|a, b| a.1.cmp(&b.1));
    let order: Vec<usize> = by_time.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        order,
        (0..6).collect::<Vec<_>>(),
        "served out of order: {by_time:?}"
    );
}
