//! LISTEN/NOTIFY in transaction pooling: listeners hold no server, every
//! notification reaches every listener once and in order, on any worker;
//! UNLISTEN stops them; a listener that does not read is told what it lost
//! and costs the others nothing; a restarted server is listened to again.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use odissey_harness::TRUST_USER;
use postgres::fallible_iterator::FallibleIterator;

fn pooled_config(pg: &PgCluster) -> Config {
    Config::new(pg.port())
        .workers(2)
        .route(Route::new("test", TRUST_USER).transaction().pool_size(2))
}

/// The notifications `c` receives within `wait`, as (channel, payload).
fn received(c: &mut Client, want: usize, wait: Duration) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let deadline = Instant::now() + wait;
    while got.len() < want && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut n = c.notifications();
        let mut it = n.timeout_iter(left.min(Duration::from_millis(200)));
        while let Ok(Some(m)) = it.next() {
            got.push((m.channel().to_string(), m.payload().to_string()));
        }
    }
    got
}

#[test]
fn listeners_in_transaction_pooling_get_every_notification_and_hold_no_server() {
    let _w = watchdog("listeners_in_transaction_pooling", Duration::from_secs(120));
    let pg = PgCluster::start();
    let (handle, port) = start_pooler(&pooled_config(&pg));
    let mut listeners: Vec<Client> = (0..20)
        .map(|_| {
            let mut c = connect(port, "test", TRUST_USER, None);
            c.simple_query("LISTEN jobs").expect("LISTEN");
            c
        })
        .collect();
    // Listening holds no server of the pool (only odissey's own LISTEN
    // connection is open besides the pool's).
    let ins = handle.inspect().unwrap();
    let active: usize = ins.routes.iter().map(|r| r.servers_active).sum();
    assert_eq!(active, 0, "a listener holds a server: {:?}", ins.routes);
    let mut notifier = connect(port, "test", TRUST_USER, None);
    for i in 0..5 {
        notifier
            .simple_query(&format!("NOTIFY jobs, 'n{i}'"))
            .expect("NOTIFY");
    }
    notifier
        .simple_query("SELECT pg_notify('jobs', 'from pg_notify')")
        .unwrap();
    notifier
        .simple_query("NOTIFY other, 'not listened'")
        .unwrap();
    let want: Vec<(String, String)> = (0..5)
        .map(|i| ("jobs".to_string(), format!("n{i}")))
        .chain(std::iter::once(("jobs".into(), "from pg_notify".into())))
        .collect();
    for (k, l) in listeners.iter_mut().enumerate() {
        let got = received(l, want.len(), Duration::from_secs(5));
        assert_eq!(got, want, "listener {k}");
    }
    // UNLISTEN stops them for that client; the others go on. A client's
    // own transactions go on meanwhile, and its notification comes too.
    listeners[0].simple_query("UNLISTEN jobs").unwrap();
    listeners[1].simple_query("SELECT 1").unwrap();
    listeners[1].simple_query("NOTIFY jobs, 'own'").unwrap();
    assert!(received(&mut listeners[0], 1, Duration::from_millis(700)).is_empty());
    for l in &mut listeners[1..] {
        assert_eq!(
            received(l, 1, Duration::from_secs(5)),
            [("jobs".to_string(), "own".to_string())]
        );
    }
    // Listeners that leave cost nothing further; with none left, the
    // LISTEN connection closes.
    listeners.clear();
    let start = Instant::now();
    loop {
        let n = pg.backends(TRUST_USER);
        if n <= 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{n} backends of trust_user left after every listener left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn a_listener_that_does_not_read_is_told_and_the_others_get_everything() {
    let _w = watchdog("a_listener_that_does_not_read", Duration::from_secs(120));
    let pg = PgCluster::start();
    let config = pooled_config(&pg).global("notify_buffer", "64");
    let (handle, port) = start_pooler(&config);
    // A raw client that LISTENs, then never reads again.
    let mut deaf = RawClient::login(port, TRUST_USER, "test").expect("login");
    let out = deaf.query("LISTEN flood");
    assert!(out.error.is_none(), "{out:?}");
    let mut reader = connect(port, "test", TRUST_USER, None);
    reader.simple_query("LISTEN flood").unwrap();
    let mut notifier = connect(port, "test", TRUST_USER, None);
    // In bursts the reader can keep up with (each well within the ring).
    // 3,000 of 2 kB: more than the kernel buffers hold for the deaf one.
    let total = 3_000;
    let mut got = Vec::new();
    for burst in 0..(total / 20) {
        notifier
            .simple_query(&format!(
                "SELECT pg_notify('flood', (g + {})::text || repeat('x', 2000)) FROM generate_series(0, 19) g",
                burst * 20
            ))
            .unwrap();
        got.extend(received(&mut reader, 20, Duration::from_secs(5)));
    }
    let payloads: Vec<String> = got
        .into_iter()
        .map(|(_, p)| p.trim_end_matches('x').to_string())
        .collect();
    let want: Vec<String> = (0..total).map(|i| i.to_string()).collect();
    assert_eq!(payloads.len(), want.len(), "the reader lost notifications");
    assert_eq!(payloads, want, "out of order");
    // The deaf client, read now: it was told what it lost, and what it
    // holds is bounded by the ring (64), not by the 2,000 sent.
    let mut buf = vec![0u8; 1 << 20];
    let mut all = Vec::new();
    deaf.stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = deaf.stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    let msgs = split_messages(&all);
    let notes = msgs.iter().filter(|(t, _)| *t == b'A').count();
    let warned = msgs
        .iter()
        .any(|(t, body)| *t == b'N' && String::from_utf8_lossy(body).contains("were dropped"));
    assert!(
        warned,
        "the deaf client was not told ({notes} notifications)"
    );
    assert!(
        notes < total,
        "{notes} notifications held for a client that does not read"
    );
    let _ = deaf.stream.write_all(b"X\0\0\0\x04");
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn listening_resumes_after_the_server_restarts() {
    let _w = watchdog("listening_resumes", Duration::from_secs(120));
    let pg = PgCluster::start();
    let (handle, port) = start_pooler(&pooled_config(&pg));
    let mut l = connect(port, "test", TRUST_USER, None);
    l.simple_query("LISTEN jobs").unwrap();
    pg.stop();
    pg.restart();
    // The LISTEN connection comes back by itself within a few seconds.
    let mut notifier = connect_eventually(port, "test", TRUST_USER, None, Duration::from_secs(10));
    let start = Instant::now();
    let got = loop {
        let _ = notifier.simple_query("NOTIFY jobs, 'after'");
        let got = received(&mut l, 1, Duration::from_millis(500));
        if !got.is_empty() || start.elapsed() > Duration::from_secs(10) {
            break got;
        }
    };
    assert!(
        got.contains(&("jobs".to_string(), "after".to_string())),
        "no notification after the restart: {got:?}"
    );
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn psycopg_listeners_get_their_notifications_through_transaction_pooling() {
    let _w = watchdog("psycopg_listeners", Duration::from_secs(120));
    let pg = PgCluster::start();
    let (handle, port) = start_pooler(&pooled_config(&pg));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/drivers/notify_psycopg.py"
    );
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .arg(pg.port().to_string())
        .output()
        .expect("run python3 (psycopg 3 is installed by .ci/run)");
    assert!(
        out.status.success(),
        "psycopg listeners failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The listeners held no server of the pool.
    let ins = handle.inspect().unwrap();
    assert_eq!(
        ins.routes.iter().map(|r| r.servers_active).sum::<usize>(),
        0
    );
    handle.shutdown(Duration::from_secs(5)).unwrap();
}
