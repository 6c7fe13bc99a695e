//! Saturation across workers (issue 15): many more clients than servers on
//! several workers. Each worker serves its own queue from the servers it
//! holds, so the common transaction involves no other thread; servers are
//! split between workers by demand; no client starves; pool_size holds.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

/// Messages the threads of the pooler were sent, all threads together, and
/// those sent to the system thread.
fn messages(handle: &odissey_facade::Handle) -> (u64, u64) {
    let i = handle.inspect().expect("inspect");
    let all = i.threads.iter().map(|t| t.messages).sum();
    let system = i
        .threads
        .iter()
        .find(|t| t.name == "odissey-system")
        .map_or(0, |t| t.messages);
    (all, system)
}

/// What the system thread was sent, by kind.
fn commands(handle: &odissey_facade::Handle) -> Vec<(String, u64)> {
    handle.inspect().expect("inspect").system_commands
}

fn transactions(handle: &odissey_facade::Handle) -> u64 {
    let i = handle.inspect().expect("inspect");
    i.route("test", "trust_user").map_or(0, |r| r.xact_count)
}

#[test]
fn saturated_workers_share_the_pool_without_asking_the_system_thread() {
    let _w = watchdog(
        "saturated_workers_share_the_pool_without_asking_the_system_thread",
        LIMIT,
    );
    const CLIENTS: usize = 24;
    const POOL: usize = 4;
    const RUN: Duration = Duration::from_secs(4);
    let pg = PgCluster::start();
    let config = Config::new(pg.port()).workers(2).route(
        Route::new("test", "trust_user")
            .transaction()
            .pool_size(POOL),
    );
    let (handle, port) = start_pooler(&config);
    let monitor = Monitor::new();
    let warmed = Barrier::new(CLIENTS + 1);
    let measured = Barrier::new(CLIENTS + 1);
    let stop = AtomicBool::new(false);

    // Half the clients on each worker: a client that lands on a worker
    // that has its half already is let go and another connects (which
    // worker accepts is the kernel's choice).
    let mut conns = Vec::new();
    let mut per_worker = [0usize; 2];
    let mut seen = std::collections::HashSet::new();
    for _ in 0..400 {
        if conns.len() == CLIENTS {
            break;
        }
        let c = connect(port, "test", "trust_user", None);
        let i = handle.inspect().expect("inspect");
        let new: Vec<usize> = i
            .client_list
            .iter()
            .filter(|ci| seen.insert(ci.id.clone()))
            .map(|ci| ci.worker)
            .collect();
        assert_eq!(new.len(), 1, "one new client: {i:?}");
        if per_worker[new[0]] < CLIENTS / 2 {
            per_worker[new[0]] += 1;
            conns.push(c);
        }
    }
    assert_eq!(per_worker, [CLIENTS / 2; 2], "clients could not be spread");

    let (counts, before, after, workers_used) = thread::scope(|s| {
        // (PostgreSQL's backends only: the pooler's inspect is messages
        // between threads, which the test counts.)
        let mon = s.spawn(|| monitor.run(&pg, "trust_user", None));
        let clients: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(n, mut c)| {
                let (warmed, measured, stop) = (&warmed, &measured, &stop);
                s.spawn(move || {
                    // Warm up: servers opened and spread.
                    for _ in 0..50 {
                        assert_eq!(scalar(&mut c, "select 1").as_deref(), Some("1"));
                    }
                    warmed.wait();
                    measured.wait();
                    let mut done = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let v = scalar(&mut c, &format!("select {n}"));
                        assert_eq!(v, Some(n.to_string()), "client {n}");
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        warmed.wait();
        let workers_used = {
            let i = handle.inspect().expect("inspect");
            let mut w: Vec<usize> = i.client_list.iter().map(|c| c.worker).collect();
            w.sort_unstable();
            w.dedup();
            w.len()
        };
        let before = (messages(&handle), transactions(&handle), commands(&handle));
        measured.wait();
        let start = Instant::now();
        while start.elapsed() < RUN {
            thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        let counts: Vec<u64> = clients
            .into_iter()
            .map(|c| c.join().expect("client"))
            .collect();
        let after = (messages(&handle), transactions(&handle), commands(&handle));
        monitor.stop();
        mon.join().expect("monitor");
        (counts, before, after, workers_used)
    });

    let total: u64 = counts.iter().sum();
    let xacts = after.1 - before.1;
    let sent = after.0 .0 - before.0 .0;
    let to_system = after.0 .1 - before.0 .1;
    let (min, max) = (
        counts.iter().copied().min().unwrap_or(0),
        counts.iter().copied().max().unwrap_or(0),
    );
    let mean = total / CLIENTS as u64;
    let kinds: Vec<String> = after
        .2
        .iter()
        .zip(&before.2)
        .filter(|((_, a), (_, b))| a > b)
        .map(|((k, a), (_, b))| format!("{k} {}", a - b))
        .collect();
    println!(
        "{CLIENTS} clients on pool {POOL}, 2 workers ({workers_used} with clients): \
         {total} transactions by the clients ({xacts} counted by odissey), per client \
         min {min} mean {mean} max {max}; {sent} cross-thread messages ({:.4}/tx), \
         {to_system} to the system thread ({:.4}/tx: {})",
        sent as f64 / xacts.max(1) as f64,
        to_system as f64 / xacts.max(1) as f64,
        kinds.join(", "),
    );
    assert_eq!(workers_used, 2);
    assert!(total > 1000, "too few transactions to judge: {total}");
    // Nobody starves: every client got a fair part of the pool's time.
    assert!(
        min * 4 >= mean,
        "a client starved: min {min}, mean {mean} ({counts:?})"
    );
    // The steady state asks no other thread: what moves is the rare
    // rebalancing, not one message (or three) per transaction as before
    // (1.36 a transaction, and a quarter of the throughput, when every
    // freed server went through the router while another worker waited).
    // Measured 0.004-0.006 here; the bound (issue 15's target) leaves
    // room for a loaded machine.
    assert!(
        (sent as f64) <= 0.05 * xacts as f64,
        "{sent} messages for {xacts} transactions"
    );
    assert!(
        monitor.max_backends() <= POOL,
        "PostgreSQL saw {} backends",
        monitor.max_backends()
    );
}
