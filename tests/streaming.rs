//! End-to-end tests of data streaming through the pooler: COPY in both
//! directions in transaction and session pooling, errors inside COPY IN,
//! and a large result read slowly while other clients keep working.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(60);
const ROWS: i64 = 10_000;

/// `select count(*)` of `table`, panicking with `what` and the line.
#[track_caller]
fn count_rows(c: &mut Client, table: &str, what: &str) -> Option<String> {
    let sql = format!("select count(*) from {table}");
    let line = std::panic::Location::caller().line();
    match c.simple_query(&sql) {
        Ok(msgs) => msgs.into_iter().find_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        }),
        Err(e) => panic!("{what} (line {line}): {sql}: {}", describe(&e)),
    }
}

fn copy_both_ways(c: &mut Client, table: &str, what: &str) {
    c.batch_execute(&format!("CREATE TABLE {table} (i int, s text)"))
        .unwrap_or_else(|e| panic!("{what}: CREATE TABLE: {}", describe(&e)));

    // COPY IN, 10,000 rows written in uneven pieces.
    let mut sent = String::new();
    for i in 1..=ROWS {
        sent.push_str(&format!("{i}\trow-{i}-{}\n", "z".repeat((i % 50) as usize)));
    }
    let mut w = c
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .unwrap_or_else(|e| panic!("{what}: COPY FROM: {}", describe(&e)));
    for piece in sent.as_bytes().chunks(7_777) {
        w.write_all(piece).expect("copy data");
    }
    let n = w
        .finish()
        .unwrap_or_else(|e| panic!("{what}: COPY FROM finish: {}", describe(&e)));
    assert_eq!(n, ROWS as u64, "{what}: rows copied in");
    assert_eq!(
        count_rows(c, table, what).as_deref(),
        Some("10000"),
        "{what}"
    );

    // COPY OUT gives back exactly what went in.
    let mut got = String::new();
    c.copy_out(&format!(
        "COPY (select * from {table} order by i) TO STDOUT"
    ))
    .unwrap_or_else(|e| panic!("{what}: COPY TO: {}", describe(&e)))
    .read_to_string(&mut got)
    .unwrap_or_else(|e| panic!("{what}: reading COPY TO: {e}"));
    assert_eq!(
        got.lines().count(),
        ROWS as usize,
        "{what}: rows copied out"
    );
    assert!(
        got == sent,
        "{what}: COPY TO differs from what COPY FROM sent"
    );
    let mut got = Vec::new();
    c.copy_out(&format!("COPY {table} TO STDOUT"))
        .unwrap_or_else(|e| panic!("{what}: COPY TO: {}", describe(&e)))
        .read_to_end(&mut got)
        .unwrap_or_else(|e| panic!("{what}: reading COPY TO: {e}"));
    assert_eq!(got.len(), sent.len(), "{what}: bytes copied out");

    // A bad row: 22P02, nothing copied, the connection stays usable.
    let mut w = c
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .unwrap_or_else(|e| panic!("{what}: COPY FROM: {}", describe(&e)));
    w.write_all(b"1\tfine\nx\tbad\n2\tfine\n")
        .expect("copy data");
    expect_code(
        w.finish(),
        &SqlState::INVALID_TEXT_REPRESENTATION,
        &format!("{what}: a bad row in COPY FROM"),
    );
    assert_eq!(
        count_rows(c, table, what).as_deref(),
        Some("10000"),
        "{what}: the failed COPY added rows"
    );
    assert_eq!(scalar(c, "select 'usable'").as_deref(), Some("usable"));

    // COPY inside an explicit transaction, then rolled back.
    let mut tx = c.transaction().expect("BEGIN");
    let mut w = tx
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .unwrap_or_else(|e| panic!("{what}: COPY in a transaction: {}", describe(&e)));
    w.write_all(b"-1\tin tx\n").expect("copy data");
    assert_eq!(w.finish().expect("finish"), 1);
    let mut out = String::new();
    tx.copy_out(&format!(
        "COPY (select s from {table} where i = -1) TO STDOUT"
    ))
    .expect("COPY TO in a transaction")
    .read_to_string(&mut out)
    .expect("read");
    assert_eq!(out, "in tx\n", "{what}");
    tx.rollback().expect("ROLLBACK");
    assert_eq!(
        count_rows(c, table, what).as_deref(),
        Some("10000"),
        "{what}: after ROLLBACK"
    );

    // A COPY FROM that the client abandons with CopyFail (dropping the
    // writer without finish).
    let mut w = c
        .copy_in(&format!("COPY {table} FROM STDIN"))
        .expect("COPY FROM");
    w.write_all(b"5\tdropped\n").expect("copy data");
    drop(w);
    assert_eq!(
        count_rows(c, table, what).as_deref(),
        Some("10000"),
        "{what}: after CopyFail"
    );
}

/// Pooler with a transaction route "txdb" and a session route "sess", both
/// on database test.
fn copy_pooler(pg: &PgCluster) -> (Handle, u16) {
    let config = Config::new(pg.port())
        .route(
            Route::new("txdb", "trust_user")
                .storage_db("test")
                .transaction()
                .pool_size(2),
        )
        .route(
            Route::new("sess", "trust_user")
                .storage_db("test")
                .session()
                .pool_size(2),
        );
    start_pooler(&config)
}

#[test]
fn copy_in_and_out_in_transaction_pooling() {
    let _w = watchdog("copy_in_and_out_in_transaction_pooling", LIMIT);
    let pg = PgCluster::start();
    let (_handle, port) = copy_pooler(&pg);
    let mut c = connect(port, "txdb", "trust_user", None);
    copy_both_ways(&mut c, "copy_tx", "transaction mode");
    drop(c);
    assert_eq!(
        pg_scalar(&pg, "test", "select count(*) from copy_tx").as_deref(),
        Some("10000")
    );
}

#[test]
fn copy_in_and_out_in_session_pooling() {
    let _w = watchdog("copy_in_and_out_in_session_pooling", LIMIT);
    let pg = PgCluster::start();
    let (_handle, port) = copy_pooler(&pg);
    let mut c = connect(port, "sess", "trust_user", None);
    copy_both_ways(&mut c, "copy_sess", "session mode");
    drop(c);
    assert_eq!(
        pg_scalar(&pg, "test", "select count(*) from copy_sess").as_deref(),
        Some("10000")
    );
}

/// Reads a reply slowly (16 KiB, then 5 ms of sleep) up to ReadyForQuery.
fn read_slowly(c: &mut RawClient) -> Vec<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = c
            .stream
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("slow reader: read after {} bytes: {e}", buf.len()));
        assert!(
            n > 0,
            "the pooler closed the slow reader after {} bytes",
            buf.len()
        );
        buf.extend_from_slice(&chunk[..n]);
        // The reply ends with ReadyForQuery: 'Z', length 5, status.
        if buf.len() >= 6 && buf[buf.len() - 6..buf.len() - 1] == [b'Z', 0, 0, 0, 5] {
            let msgs = split_messages(&buf);
            let parsed: usize = msgs.iter().map(|(_, b)| b.len() + 5).sum();
            if parsed == buf.len() {
                return msgs;
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_large_result_read_slowly_arrives_whole_while_others_work() {
    let _w = watchdog(
        "a_large_result_read_slowly_arrives_whole_while_others_work",
        LIMIT,
    );
    let pg = PgCluster::start();
    // One worker: the slow client and the other one share its event loop.
    let config = Config::new(pg.port())
        .workers(1)
        .route(
            Route::new("slow", "trust_user")
                .storage_db("test")
                .transaction()
                .pool_size(1),
        )
        .route(
            Route::new("other", "trust_user")
                .storage_db("test")
                .transaction()
                .pool_size(1),
        );
    let (_handle, port) = start_pooler(&config);

    let stop = AtomicBool::new(false);
    let (msgs, took, (queries, worst)) = thread::scope(|s| {
        let other = s.spawn(|| {
            let mut c = connect(port, "other", "trust_user", None);
            let mut queries = 0i32;
            let mut worst = Duration::ZERO;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let row = c
                    .query_one("select $1::int + 1", &[&queries])
                    .unwrap_or_else(|e| panic!("the other client: {}", describe(&e)));
                assert_eq!(row.get::<_, i32>(0), queries + 1);
                worst = worst.max(t.elapsed());
                queries += 1;
                thread::sleep(Duration::from_millis(20));
            }
            (queries, worst)
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut c = RawClient::login(port, "trust_user", "slow").expect("login");
            let t = Instant::now();
            c.send_query("select repeat('x', 1000) from generate_series(1, 10000)");
            let msgs = read_slowly(&mut c);
            let took = t.elapsed();
            // The slow client is fine afterwards.
            let o = c.query("select 'after'");
            assert_eq!(o.rows, vec![vec![Some("after".to_string())]]);
            c.terminate();
            (msgs, took)
        }));
        stop.store(true, Ordering::SeqCst);
        let other = other.join();
        let (msgs, took) = result.unwrap_or_else(|p| std::panic::resume_unwind(p));
        let other = other.unwrap_or_else(|p| std::panic::resume_unwind(p));
        (msgs, took, other)
    });

    let value = "x".repeat(1000);
    assert_eq!(msgs.len(), 10_003, "T + 10,000 D + C + Z");
    assert_eq!(msgs[0].0, b'T', "RowDescription first");
    for (i, (tag, body)) in msgs[1..10_001].iter().enumerate() {
        assert_eq!(*tag, b'D', "message {} is not a DataRow", i + 1);
        assert_eq!(body.len(), 2 + 4 + 1000, "DataRow {i}");
        assert_eq!(&body[..6], &[0, 1, 0, 0, 3, 0xe8], "DataRow {i}");
        assert!(body[6..] == *value.as_bytes(), "DataRow {i}: wrong value");
    }
    assert_eq!(msgs[10_001].0, b'C');
    assert_eq!(&msgs[10_001].1[..], b"SELECT 10000\0");
    assert_eq!(msgs[10_002], (b'Z', vec![b'I']));
    assert!(
        took >= Duration::from_secs(1),
        "the slow read took only {took:?}"
    );
    assert!(
        queries >= 10,
        "the other client ran {queries} queries in {took:?}"
    );
    assert!(
        worst < Duration::from_secs(1),
        "the other client waited up to {worst:?} for one query"
    );
}

/// Backpressure: while a client reads a large result slowly, odissey stops
/// reading the server, so the backend waits on the socket (`ClientWrite`)
/// instead of pouring the whole result into the pooler's memory.
#[test]
fn a_slow_reader_holds_its_server_back() {
    let _w = watchdog("a_slow_reader_holds_its_server_back", LIMIT);
    let pg = PgCluster::start();
    let config =
        Config::new(pg.port()).route(Route::new("test", "trust_user").transaction().pool_size(1));
    let (_handle, port) = start_pooler(&config);
    let mut c = RawClient::login(port, "trust_user", "test").expect("login");
    // 64 MB: well beyond what the kernel's socket buffers on both legs and
    // odissey's read-ahead can hold.
    c.send_query("select repeat('x', 1000) from generate_series(1, 64000)");
    let seen_waiting = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let total = thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                let rows = pg.sql(
                    "postgres",
                    "select 1 from pg_stat_activity where usename = 'trust_user' \
                     and wait_event = 'ClientWrite' and query like 'select repeat%'",
                );
                if !rows.is_empty() {
                    seen_waiting.store(true, Ordering::SeqCst);
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let mut total = 0usize;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = c.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "closed after {total} bytes");
            total += n;
            tail.extend_from_slice(&chunk[..n]);
            if tail.len() > 6 {
                tail.drain(..tail.len() - 6);
            }
            if tail.len() == 6 && tail[..5] == [b'Z', 0, 0, 0, 5] {
                break;
            }
            // About 12 MB/s: slow next to what PostgreSQL sends on loopback.
            thread::sleep(Duration::from_millis(5));
        }
        done.store(true, Ordering::SeqCst);
        total
    });
    assert!(
        total > 64_000 * 1000,
        "the whole result arrived ({total} bytes)"
    );
    assert!(
        seen_waiting.load(Ordering::SeqCst),
        "the backend never waited on ClientWrite: the pooler read the result faster than its client"
    );
    let o = c.query("select 'after'");
    assert_eq!(o.rows, vec![vec![Some("after".to_string())]]);
}
