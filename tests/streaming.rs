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

/// The state letter of process `pid` in /proc ('T' when stopped).
fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A PostgreSQL backend stopped with SIGSTOP, continued when dropped, so
/// that a failing test never leaves it stopped (the cluster could not be
/// shut down).
struct StoppedBackend(i32);

impl StoppedBackend {
    fn stop(pid: i32) -> Self {
        signal(pid.unsigned_abs(), "STOP");
        let stopped = Self(pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        while proc_state(pid) != Some('T') {
            assert!(
                Instant::now() < deadline,
                "backend {pid} did not stop: state {:?}",
                proc_state(pid)
            );
            thread::sleep(Duration::from_millis(10));
        }
        stopped
    }
}

impl Drop for StoppedBackend {
    fn drop(&mut self) {
        try_signal(self.0.unsigned_abs(), "CONT");
    }
}

/// The kernel's send and receive queues (bytes) of the IPv4 TCP socket
/// from 127.0.0.1:`local` to 127.0.0.1:`remote`, from /proc/net/tcp.
fn tcp_queues(local: u16, remote: u16) -> (usize, usize) {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let (l, r) = (
        format!("0100007F:{local:04X}"),
        format!("0100007F:{remote:04X}"),
    );
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 4 && f[1] == l && f[2] == r {
            let (tx, rx) = f[4].split_once(':').expect("tx_queue:rx_queue");
            let hex = |v: &str| usize::from_str_radix(v, 16).expect("a hex queue size");
            return (hex(tx), hex(rx));
        }
    }
    panic!("no socket 127.0.0.1:{local} -> 127.0.0.1:{remote} in /proc/net/tcp");
}

/// Rows of the COPY, all alike: 64 bytes each.
const COPY_ROW: &[u8; 64] = b"7\txxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n";
const ROWS_PER_FRAME: usize = 1024;
/// What the writer tries to hand over while its server is stopped: far
/// more than any buffering on the way could hold.
const COPY_ATTEMPT: usize = 256 << 20;
/// What the way to a stopped server may hold: odissey reads at most
/// `readahead` (256 KiB) from the client and keeps at most that for the
/// server (plus one frame), and the kernel buffers the rest: the client's
/// send buffer and odissey's receive buffer on one leg, odissey's send
/// buffer and the backend's receive buffer on the other (a few MiB each
/// on loopback).
const COPY_BOUND: usize = 32 << 20;
/// What odissey itself may hold of a stalled COPY: its receive buffer
/// for the client stops at `readahead` (256 KiB), and its send buffer for
/// the server takes runs of what was read while it holds under
/// `readahead`, so under 2 x `readahead`: under 768 KiB in all (measured:
/// 512 to 735 KiB).
const POOLER_BOUND: usize = 1 << 20;
/// No byte accepted for this long: the writer is stalled.
const STALL: Duration = Duration::from_secs(1);

/// Backpressure on COPY FROM STDIN: a client that writes faster than its
/// server reads (here the server is stopped outright) is slowed down, not
/// buffered without limit, while the pooler goes on serving others; once
/// the server runs again, the COPY completes with every row.
#[test]
fn a_copy_writer_faster_than_its_server_is_held_back() {
    let _w = watchdog("a_copy_writer_faster_than_its_server_is_held_back", LIMIT);
    let pg = PgCluster::start();
    pg.sql(
        "test",
        "CREATE TABLE bp (i int, s text); GRANT ALL ON bp TO trust_user",
    );
    // One worker: the stalled writer and the other client share its loop.
    let config = Config::new(pg.port())
        .workers(1)
        .route(Route::new("test", "trust_user").transaction().pool_size(2));
    let (_handle, port) = start_pooler(&config);

    // The writer's transaction keeps its server; learn the backend first.
    let mut w = RawClient::login(port, "trust_user", "test").expect("login");
    let o = w.query("BEGIN");
    assert!(
        o.error.is_none() && o.status == b'T',
        "BEGIN: {:?}",
        o.error
    );
    let pid = w.backend_pid();
    // The pooler's end of the server connection, to find it in /proc.
    let server_leg_port: u16 = pg_scalar(
        &pg,
        "postgres",
        &format!("select client_port from pg_stat_activity where pid = {pid}"),
    )
    .expect("the backend's client_port")
    .parse()
    .expect("a port");
    w.send_query("COPY bp FROM STDIN");
    let msgs = w.read_until_tag(b'G');
    assert_eq!(tags(&msgs), "G", "CopyInResponse expected");

    let mut frame = bytes::BytesMut::new();
    odissey_protocol::frontend::copy_data(&mut frame, &COPY_ROW.repeat(ROWS_PER_FRAME));
    let frame = frame.freeze();

    let stopped = StoppedBackend::stop(pid);
    w.stream.set_nonblocking(true).expect("set_nonblocking");
    let t0 = Instant::now();
    let mut accepted = 0usize;
    let mut last_progress = Instant::now();
    while accepted < COPY_ATTEMPT {
        match w.stream.write(&frame[accepted % frame.len()..]) {
            Ok(n) => {
                accepted += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if last_progress.elapsed() >= STALL {
                    break;
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("COPY writer: write after {accepted} bytes: {e}"),
        }
    }
    let stalled_after = last_progress.duration_since(t0);
    // Where the accepted bytes are: in the kernel's queues on both legs
    // (the backend, stopped before the first row, read none), or in odissey.
    let client_port = w.stream.local_addr().expect("local_addr").port();
    let (client_tx, _) = tcp_queues(client_port, port);
    let (_, pooler_rx) = tcp_queues(port, client_port);
    let (pooler_tx, _) = tcp_queues(server_leg_port, pg.port());
    let (_, backend_rx) = tcp_queues(pg.port(), server_leg_port);
    let in_kernel = client_tx + pooler_rx + pooler_tx + backend_rx;
    let in_pooler = accepted.saturating_sub(in_kernel);
    let mib = |n: usize| n as f64 / (1 << 20) as f64;
    eprintln!(
        "COPY backpressure: {accepted} bytes ({:.1} MiB) accepted in {stalled_after:?}, then \
         the writes stalled; in the kernel: client send {client_tx}, odissey receive \
         {pooler_rx}, odissey send {pooler_tx}, backend receive {backend_rx}; in odissey: \
         {in_pooler} ({:.2} MiB)",
        mib(accepted),
        mib(in_pooler)
    );
    assert!(
        accepted < COPY_ATTEMPT,
        "all {accepted} bytes were accepted with the server stopped: nothing holds the writer back"
    );
    assert!(
        accepted <= COPY_BOUND,
        "{accepted} bytes were accepted with the server stopped (bound {COPY_BOUND})"
    );
    assert!(
        accepted >= frame.len(),
        "only {accepted} bytes went before the stall"
    );
    assert!(
        in_kernel <= accepted,
        "the kernel holds {in_kernel} bytes of the {accepted} written"
    );
    assert!(
        in_pooler <= POOLER_BOUND,
        "odissey holds {in_pooler} bytes of the stalled COPY (bound {POOLER_BOUND})"
    );

    // Meanwhile another client of the same pool and worker is served.
    let mut other = connect(port, "test", "trust_user", None);
    let mut worst = Duration::ZERO;
    for i in 0..20i32 {
        let t = Instant::now();
        let row = other
            .query_one("select $1::int + 1", &[&i])
            .unwrap_or_else(|e| panic!("the other client: {}", describe(&e)));
        assert_eq!(row.get::<_, i32>(0), i + 1);
        worst = worst.max(t.elapsed());
    }
    assert_eq!(
        scalar(&mut other, "select count(*) from bp").as_deref(),
        Some("0"),
        "the uncommitted COPY is invisible"
    );
    assert!(
        worst < Duration::from_secs(1),
        "the other client waited up to {worst:?} for one query"
    );
    assert_ne!(backend_pid(&mut other), pid, "the other client's server");
    drop(other);

    // Still held back: another second of tries gets (almost) nowhere.
    let before = accepted;
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        match w.stream.write(&frame[accepted % frame.len()..]) {
            Ok(n) => accepted += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("COPY writer: write after {accepted} bytes: {e}"),
        }
    }
    assert!(
        accepted <= COPY_BOUND,
        "the stalled writer got {} more bytes through, {accepted} in all (bound {COPY_BOUND})",
        accepted - before
    );

    // The server runs again: the COPY completes with exactly what was sent.
    drop(stopped);
    w.stream.set_nonblocking(false).expect("set_nonblocking");
    w.stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .expect("set_write_timeout");
    w.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set_read_timeout");
    let at = accepted % frame.len();
    if at != 0 {
        w.send(&frame[at..]);
        accepted += frame.len() - at;
    }
    let rows = accepted / frame.len() * ROWS_PER_FRAME;
    let mut done = bytes::BytesMut::new();
    odissey_protocol::frontend::copy_done(&mut done);
    w.send(&done);
    let msgs = w.read_until_tag(b'Z');
    assert_eq!(tags(&msgs), "CZ", "CommandComplete, ReadyForQuery");
    assert_eq!(msgs[0].1, format!("COPY {rows}\0").into_bytes());
    assert_eq!(msgs[1].1, vec![b'T'], "still in the transaction");
    let o = w.query("COMMIT");
    assert!(
        o.error.is_none() && o.status == b'I',
        "COMMIT: {:?}",
        o.error
    );
    w.terminate();
    assert_eq!(
        pg_scalar(&pg, "test", "select count(*) from bp"),
        Some(rows.to_string())
    );
}
