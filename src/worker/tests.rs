//! The worker as a whole, without sockets or PostgreSQL: machines over
//! in-memory streams in its slab, its deadlines fired by a `TestLoop`
//! whose clock the test moves.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use odissey_protocol::frontend;
use odissey_reactor::channel::channel;
use odissey_reactor::{Handler, TestLoop, Token};

use super::cancel::CancelTarget;
use super::testkit::{self, memory, tags};
use super::*;

/// A worker of a one-route configuration (`extra` for the route), its
/// loop, and the system thread's end of its channel.
fn worker(
    extra: &str,
) -> (
    Worker,
    TestLoop<WorkerTimer>,
    odissey_reactor::Receiver<SysCmd>,
) {
    worker_of(extra, 1)
}

/// `worker` as worker 0 of `workers`.
fn worker_of(
    extra: &str,
    workers: usize,
) -> (
    Worker,
    TestLoop<WorkerTimer>,
    odissey_reactor::Receiver<SysCmd>,
) {
    let tl = TestLoop::new().expect("a poll");
    let (sys, sys_rx) = channel(tl.registry(), Token(7)).expect("a channel");
    let cfg = Arc::new(testkit::config("transaction", extra));
    let w = Worker::new(
        0,
        sys,
        Vec::new(),
        cfg,
        Arc::new(TlsSet::default()),
        Arc::new(Registry::new(workers)),
        Arc::new(AtomicUsize::new(1)),
    );
    (w, tl, sys_rx)
}

/// A logged-in, greeted client of the route, in the worker's slab, with
/// its pool known to the worker.
fn admit(w: &mut Worker) -> Key {
    let cfg = Arc::clone(&w.w.cfg);
    let ck = w.conns.insert_with(|key| {
        let mut c = testkit::client(&cfg);
        c.key = key;
        Conn::Client(c)
    });
    if let Some(Conn::Client(c)) = w.conns.get(ck) {
        let (pool, route) = (c.pool.clone(), c.route.clone());
        if let (Some(pool), Some(route)) = (pool, route) {
            w.w.local(&pool, &route)
                .shared
                .clients
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    ck
}

fn client(w: &mut Worker, ck: Key) -> &mut Client {
    match w.conns.get_mut(ck) {
        Some(Conn::Client(c)) => c,
        _ => panic!("no client at {ck:?}"),
    }
}

fn query(sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    frontend::query(&mut b, sql);
    b
}

#[test]
fn a_client_waiting_past_pool_timeout_is_refused_with_53300() {
    let (mut w, mut tl, sys) = worker("pool_size = 1\npool_timeout = 250");
    let ck = admit(&mut w);
    memory(&mut client(&mut w, ck).io)
        .input
        .extend_from_slice(&query("SELECT 1"));
    client(&mut w, ck).io.readable = true;
    w.ready(&mut tl.context(), ck.token(), Ready::default());
    assert!(matches!(client(&mut w, ck).state, ClientState::Waiting));
    assert!(
        sys.drain().any(|c| matches!(c, SysCmd::Need { .. })),
        "no server here: the router is asked for one"
    );
    // Not yet.
    tl.advance(Duration::from_millis(200));
    tl.fire(&mut w);
    assert!(matches!(client(&mut w, ck).state, ClientState::Waiting));
    tl.advance(Duration::from_millis(60));
    assert_eq!(tl.fire(&mut w), 1, "its pool_timeout");
    let c = client(&mut w, ck);
    assert!(
        matches!(c.state, ClientState::Closing),
        "it lingers after the error"
    );
    let out = std::mem::take(&mut memory(&mut c.io).output);
    assert_eq!(tags(&out), "E");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("53300") && text.contains("pool_timeout 250 ms"),
        "{text}"
    );
    // Its need is kept LEND_AFTER longer (another client may come), then
    // withdrawn.
    assert!(!sys.drain().any(|c| matches!(c, SysCmd::CancelNeed { .. })));
    tl.advance(crate::pool_shared::LEND_AFTER);
    assert_eq!(tl.fire(&mut w), 1, "the balance pass");
    assert!(
        sys.drain()
            .any(|c| matches!(c, SysCmd::CancelNeed { n: 1, .. })),
        "the need it left is withdrawn"
    );
}

#[test]
fn a_client_that_gets_a_server_in_time_has_no_deadline_left() {
    let (mut w, mut tl, _sys) = worker("pool_size = 1\npool_timeout = 250");
    let ck = admit(&mut w);
    memory(&mut client(&mut w, ck).io)
        .input
        .extend_from_slice(&query("SELECT 1"));
    client(&mut w, ck).io.readable = true;
    w.ready(&mut tl.context(), ck.token(), Ready::default());
    assert_eq!(tl.timers(), 1, "its pool_timeout");
    // A server of the pool is granted to this worker's queue (as the
    // router's grant would): it goes to the client waiting first.
    let cfg = Arc::clone(&w.w.cfg);
    let sk = w
        .conns
        .insert_with(|_| Conn::Server(Box::new(testkit::server(&cfg))));
    w.offer(&mut tl.context(), sk, true);
    assert_eq!(client(&mut w, ck).server, Some(sk));
    match w.conns.get_mut(sk) {
        Some(Conn::Server(s)) => {
            assert_eq!(tags(&memory(&mut s.io).output), "Q", "its query went on")
        }
        _ => panic!("the server is gone"),
    }
    assert!(matches!(client(&mut w, ck).state, ClientState::Linked));
    assert_eq!(tl.timers(), 0, "pool_timeout cancelled");
    tl.advance(Duration::from_millis(300));
    tl.fire(&mut w);
    assert!(matches!(client(&mut w, ck).state, ClientState::Linked));
}

#[test]
fn a_cancel_goes_to_the_server_running_its_clients_request() {
    let (mut w, mut tl, _sys) = worker("");
    let cfg = Arc::clone(&w.w.cfg);
    let mut pairs = Vec::new();
    for i in 0..3 {
        let ck = admit(&mut w);
        let c = client(&mut w, ck);
        let key = client::greet(c, &[], None);
        memory(&mut c.io).output.clear();
        w.w.cancel_keys.insert(key, ck);
        // The first two run a query when their server comes; the third
        // has nothing to run, and its server goes back to the pool.
        if i < 2 {
            memory(&mut client(&mut w, ck).io)
                .input
                .extend_from_slice(&query("SELECT pg_sleep(10)"));
            client(&mut w, ck).io.readable = true;
        }
        let sk = w
            .conns
            .insert_with(|_| Conn::Server(Box::new(testkit::server(&cfg))));
        w.link(&mut tl.context(), ck, sk);
        pairs.push((ck, sk, key));
    }
    let [(_, a_server, a_key), (_, b_server, b_key), (_, _, idle_key)] = pairs[..] else {
        unreachable!()
    };
    assert_eq!(
        w.cancel_target(b_key.0, b_key.1),
        CancelTarget::Server(b_server)
    );
    assert_eq!(
        w.cancel_target(a_key.0, a_key.1),
        CancelTarget::Server(a_server)
    );
    assert_eq!(
        w.cancel_target(idle_key.0, idle_key.1),
        CancelTarget::Nothing,
        "a late cancel must not hit the next request"
    );
    assert_eq!(
        w.cancel_target(a_key.0, a_key.1 ^ 1),
        CancelTarget::NotHere,
        "a forged key"
    );
}

/// Worker 0 of 2 with one server of the pool, just freed with nobody of
/// its own waiting, while worker 1 has a client queued and its need waits
/// at the router. Returns the worker, its loop, the system thread's end,
/// the server and the pool's shared state.
fn freed_beside_a_waiting_worker() -> (
    Worker,
    TestLoop<WorkerTimer>,
    odissey_reactor::Receiver<SysCmd>,
    Key,
    Arc<crate::pool_shared::PoolShared>,
) {
    let (mut w, mut tl, sys) = worker_of("pool_size = 1", 2);
    let cfg = Arc::clone(&w.w.cfg);
    let sk = w
        .conns
        .insert_with(|_| Conn::Server(Box::new(testkit::server(&cfg))));
    let (pool, route) = match w.conns.get(sk) {
        Some(Conn::Server(s)) => (s.pool.clone(), Arc::clone(&s.route)),
        _ => unreachable!(),
    };
    let lp = w.w.local(&pool, &route);
    lp.count_held(0, true);
    let shared = Arc::clone(&lp.shared);
    shared.waiting[1].store(1, std::sync::atomic::Ordering::SeqCst);
    shared.publish_queue(1, 1, shared.clock(tl.now()), 1.0);
    // Kept idle (one of this worker's clients may come), nothing sent yet.
    w.offer(&mut tl.context(), sk, false);
    assert_eq!(tl.fire(&mut w), 0);
    assert_eq!(idle_of(&w, sk), vec![sk]);
    assert_eq!(sys.drain().count(), 0, "no message before LEND_AFTER");
    (w, tl, sys, sk, shared)
}

/// The idle list of `sk`'s pool on the worker.
fn idle_of(w: &Worker, sk: Key) -> Vec<Key> {
    let Some(Conn::Server(s)) = w.conns.get(sk) else {
        return Vec::new();
    };
    w.w.local
        .get(&s.pool)
        .map(|lp| lp.idle.clone())
        .unwrap_or_default()
}

#[test]
fn an_idle_server_is_lent_to_another_workers_waiting_clients_after_lend_after() {
    use crate::pool_shared::LEND_AFTER;
    let (mut w, mut tl, sys, sk, shared) = freed_beside_a_waiting_worker();
    tl.advance(LEND_AFTER / 2);
    assert_eq!(tl.fire(&mut w), 0);
    // Still idle LEND_AFTER later, with worker 1's client still queued:
    // lent, through the router, for worker 1's need.
    tl.advance(LEND_AFTER / 2);
    assert_eq!(tl.fire(&mut w), 1, "the balance pass");
    let sent: Vec<SysCmd> = sys.drain().collect();
    assert!(
        matches!(sent[..], [SysCmd::Release { server, to: Some(1), .. }] if server == sk),
        "{} messages",
        sent.len()
    );
    assert!(idle_of(&w, sk).is_empty());
    assert_eq!(shared.idle_total(), 0);
}

#[test]
fn an_idle_server_stays_when_the_other_workers_clients_were_served_meanwhile() {
    use crate::pool_shared::LEND_AFTER;
    let (mut w, mut tl, sys, sk, shared) = freed_beside_a_waiting_worker();
    // Worker 1's own server served its client; its need is not yet
    // withdrawn (that waits LEND_AFTER too).
    shared.publish_queue(1, 0, 0, 1.0);
    tl.advance(LEND_AFTER);
    assert_eq!(tl.fire(&mut w), 1, "the balance pass");
    assert_eq!(sys.drain().count(), 0, "nothing lent to nobody");
    assert_eq!(idle_of(&w, sk), vec![sk]);
    assert_eq!(shared.idle_total(), 1);
}
