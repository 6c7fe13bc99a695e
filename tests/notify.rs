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

/// Runs a driver's listener script (`program args.. <port> <listeners>`)
/// against a pooler with pool_size 2 on 2 workers: once the script says
/// its listeners are set, none of them may hold a server of the pool (the
/// only server connection besides the pool's is odissey's own LISTEN
/// connection); then the script notifies and checks what each got.
fn listeners_of_a_driver(program: &str, args: &[&str], listeners: usize) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let pg = PgCluster::start();
    let (handle, port) = start_pooler(&pooled_config(&pg));
    let mut child = Command::new(program)
        .args(args)
        .arg(port.to_string())
        .arg(listeners.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} (installed by .ci/run): {e}"));
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut said = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("{program} ended before listening:\n{said}\n{err}");
        }
        said.push_str(&line);
        if line.trim() == "listening" {
            break;
        }
    }
    let ins = handle.inspect().unwrap();
    let active: usize = ins.routes.iter().map(|r| r.servers_active).sum();
    assert_eq!(
        active, 0,
        "{listeners} listeners hold servers: {:?}",
        ins.routes
    );
    assert!(
        ins.clients >= listeners,
        "{} clients for {listeners} listeners",
        ins.clients
    );
    // The pool's two at most, and the LISTEN connection.
    let backends = pg.backends(TRUST_USER);
    assert!(
        backends <= 3,
        "{backends} server connections for the listeners"
    );
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(status.success(), "{program} failed:\n{said}{rest}\n{err}");
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

fn driver(name: &str) -> String {
    format!("{}/tests/drivers/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn psycopg_listeners_get_their_notifications_through_transaction_pooling() {
    let _w = watchdog("psycopg_listeners", Duration::from_secs(120));
    listeners_of_a_driver("python3", &[&driver("notify_psycopg.py")], 50);
}

#[test]
fn asyncpg_listeners_get_their_notifications_through_transaction_pooling() {
    let _w = watchdog("asyncpg_listeners", Duration::from_secs(120));
    listeners_of_a_driver("python3", &[&driver("notify_asyncpg.py")], 50);
}

#[test]
fn node_postgres_listeners_get_their_notifications_through_transaction_pooling() {
    let _w = watchdog("node_postgres_listeners", Duration::from_secs(120));
    listeners_of_a_driver("node", &[&driver("node/notify.js")], 50);
}

fn notify(n: &mut Client, what: &str) {
    n.simple_query(&format!("NOTIFY blk, '{what}'")).unwrap();
}

/// How many pool servers are held by clients now.
fn servers_active(handle: &Handle) -> usize {
    let ins = handle.inspect().unwrap();
    ins.routes.iter().map(|r| r.servers_active).sum()
}

#[test]
fn listen_in_a_transaction_block_takes_effect_at_commit_not_at_rollback() {
    let _w = watchdog("listen_in_a_transaction_block", Duration::from_secs(120));
    let pg = PgCluster::start();
    let (handle, port) = start_pooler(&pooled_config(&pg));
    let mut notifier = connect(port, "test", TRUST_USER, None);

    // Rolled back: nothing registered (and no server kept after).
    let mut rolled = connect(port, "test", TRUST_USER, None);
    rolled.simple_query("BEGIN").unwrap();
    rolled.simple_query("LISTEN blk").unwrap();
    rolled.simple_query("ROLLBACK").unwrap();
    // A failed transaction's COMMIT is a ROLLBACK too.
    let mut failed = connect(port, "test", TRUST_USER, None);
    failed.simple_query("BEGIN").unwrap();
    failed.simple_query("LISTEN blk").unwrap();
    assert!(failed.simple_query("SELECT 1/0").is_err());
    // LISTEN in a failed transaction: PostgreSQL's own answer (25P02).
    let e = failed.simple_query("LISTEN blk").unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("25P02"), "{e}");
    failed.simple_query("COMMIT").unwrap();

    // Committed: registered at COMMIT; the server goes back to the pool.
    let mut committed = connect(port, "test", TRUST_USER, None);
    committed.simple_query("BEGIN").unwrap();
    committed.simple_query("LISTEN blk").unwrap();
    committed.simple_query("SELECT 1").unwrap();
    // Notified before the COMMIT: PostgreSQL's listener would not get it
    // either (its LISTEN is not in effect yet).
    notify(&mut notifier, "before commit");
    committed.simple_query("COMMIT").unwrap();
    // A committed UNLISTEN in a block takes effect; a rolled-back one does not.
    let mut stays = connect(port, "test", TRUST_USER, None);
    stays.simple_query("LISTEN blk").unwrap();
    stays.simple_query("BEGIN; SELECT 1").unwrap();
    stays.simple_query("UNLISTEN blk").unwrap();
    stays.simple_query("ROLLBACK").unwrap();
    let mut leaves = connect(port, "test", TRUST_USER, None);
    leaves.simple_query("LISTEN blk").unwrap();
    leaves.simple_query("START TRANSACTION").unwrap();
    leaves.simple_query("UNLISTEN *").unwrap();
    leaves.simple_query("END").unwrap();
    // COMMIT AND CHAIN commits the LISTEN; the chained transaction goes on.
    let mut chained = connect(port, "test", TRUST_USER, None);
    chained.simple_query("BEGIN").unwrap();
    chained.simple_query("LISTEN blk").unwrap();
    chained.simple_query("COMMIT AND CHAIN").unwrap();
    chained.simple_query("COMMIT").unwrap();
    assert_eq!(servers_active(&handle), 0, "a listener holds a server");

    notify(&mut notifier, "after");
    let want = vec![("blk".to_string(), "after".to_string())];
    assert_eq!(received(&mut committed, 1, Duration::from_secs(5)), want);
    assert_eq!(received(&mut stays, 1, Duration::from_secs(5)), want);
    assert_eq!(received(&mut chained, 1, Duration::from_secs(5)), want);
    for (name, c) in [
        ("rolled back", &mut rolled),
        ("failed", &mut failed),
        ("unlistened", &mut leaves),
    ] {
        let got = received(c, 1, Duration::from_millis(500));
        assert!(got.is_empty(), "{name} got {got:?}");
    }
    handle.shutdown(Duration::from_secs(5)).unwrap();
}

#[test]
fn listen_after_a_savepoint_is_left_to_the_server_which_knows_rollback_to() {
    let _w = watchdog("listen_after_a_savepoint", Duration::from_secs(120));
    let pg = PgCluster::start();
    let (handle, port) = start_pooler(&pooled_config(&pg));
    // ROLLBACK TO the savepoint undoes the LISTEN, as in PostgreSQL.
    let mut undone = connect(port, "test", TRUST_USER, None);
    undone
        .simple_query("BEGIN; SAVEPOINT s; LISTEN sp; ROLLBACK TO s; COMMIT")
        .unwrap();
    undone.simple_query("BEGIN").unwrap();
    undone.simple_query("SAVEPOINT s").unwrap();
    undone.simple_query("LISTEN sp").unwrap();
    undone.simple_query("ROLLBACK TO SAVEPOINT s").unwrap();
    undone.simple_query("COMMIT").unwrap();
    // Released and committed: in effect (on its server, which it keeps).
    let mut kept = connect(port, "test", TRUST_USER, None);
    kept.simple_query("BEGIN").unwrap();
    kept.simple_query("SAVEPOINT s").unwrap();
    kept.simple_query("LISTEN sp").unwrap();
    kept.simple_query("RELEASE s").unwrap();
    kept.simple_query("COMMIT").unwrap();
    // A LISTEN before the savepoint is odissey's, and survives ROLLBACK TO.
    let mut before = connect(port, "test", TRUST_USER, None);
    before.simple_query("BEGIN").unwrap();
    before.simple_query("LISTEN sp").unwrap();
    before.simple_query("SAVEPOINT s").unwrap();
    before.simple_query("ROLLBACK TO s").unwrap();
    before.simple_query("COMMIT").unwrap();
    let mut notifier = connect(port, "test", TRUST_USER, None);
    notifier.simple_query("NOTIFY sp, 'x'").unwrap();
    let want = vec![("sp".to_string(), "x".to_string())];
    assert_eq!(received(&mut kept, 1, Duration::from_secs(5)), want);
    assert_eq!(received(&mut before, 1, Duration::from_secs(5)), want);
    assert!(received(&mut undone, 1, Duration::from_millis(500)).is_empty());
    // Only the client whose server ran the LISTEN keeps one.
    assert_eq!(servers_active(&handle), 1);
    handle.shutdown(Duration::from_secs(5)).unwrap();
}
