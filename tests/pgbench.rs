//! End-to-end tests with PostgreSQL's own clients: pgbench (select-only
//! and TPC-B) and psql, through the pooler.

mod common;

use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Checks a pgbench run: exit 0, transactions processed, none failed, no
/// client aborted. Returns the number of transactions.
#[track_caller]
fn check_pgbench(o: &Output, what: &str) -> u64 {
    let (stdout, stderr) = text(o);
    let report = format!("{what}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(
        o.status.success(),
        "pgbench exited with {}: {report}",
        o.status
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("number of transactions actually processed:")
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in the output: {report}"));
    assert!(processed > 0, "no transaction processed: {report}");
    if let Some(failed) = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("number of failed transactions:"))
    {
        assert!(
            failed.trim().starts_with("0 ") || failed.trim() == "0",
            "failed transactions: {report}"
        );
    }
    assert!(
        !stderr.contains("aborted"),
        "a pgbench client aborted: {report}"
    );
    processed
}

fn pgbench_args(cmd: &mut Command, port: u16) {
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "trust_user",
    ]);
}

/// Bullet 13: pgbench -S and TPC-B with 32 clients through a transaction
/// pool of 4: no failure, never more than 4 backends.
#[test]
fn pgbench_through_a_transaction_pool() {
    let _w = watchdog(
        "pgbench_through_a_transaction_pool",
        Duration::from_secs(120),
    );
    const POOL: usize = 4;
    let pg = PgCluster::start();

    // Initialise directly against PostgreSQL.
    let mut init = pg_tool("pgbench");
    pgbench_args(&mut init, pg.port());
    init.args(["-i", "-s", "1", "test"]);
    let o = run_tool(init, Duration::from_secs(60));
    let (stdout, stderr) = text(&o);
    assert!(
        o.status.success(),
        "pgbench -i failed ({}):\n{stdout}\n{stderr}",
        o.status
    );
    assert_eq!(
        pg.wait_for_backends("trust_user", 0, Duration::from_secs(5)),
        0,
        "pgbench -i left backends behind"
    );

    let config = Config::new(pg.port()).route(
        Route::new("test", "trust_user")
            .transaction()
            .pool_size(POOL),
    );
    let (handle, port) = start_pooler(&config);
    let monitor = Monitor::new();

    let history_before: u64 = pg_scalar(&pg, "test", "select count(*) from pgbench_history")
        .and_then(|v| v.parse().ok())
        .expect("history count");

    let tpcb = thread::scope(|s| {
        let mon = s.spawn(|| monitor.run(&pg, "trust_user", Some(&handle)));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Select-only, simple protocol.
            let mut cmd = pg_tool("pgbench");
            pgbench_args(&mut cmd, port);
            cmd.args(["-c", "32", "-j", "2", "-T", "5", "-S", "test"]);
            check_pgbench(&run_tool(cmd, Duration::from_secs(60)), "pgbench -S");

            // Select-only, extended protocol (unnamed statements).
            let mut cmd = pg_tool("pgbench");
            pgbench_args(&mut cmd, port);
            cmd.args([
                "-c", "32", "-j", "2", "-T", "3", "-S", "-M", "extended", "test",
            ]);
            check_pgbench(
                &run_tool(cmd, Duration::from_secs(60)),
                "pgbench -S -M extended",
            );

            // TPC-B: multi-statement transactions.
            let mut cmd = pg_tool("pgbench");
            pgbench_args(&mut cmd, port);
            cmd.args(["-c", "32", "-j", "2", "-T", "5", "test"]);
            check_pgbench(&run_tool(cmd, Duration::from_secs(60)), "pgbench (TPC-B)")
        }));
        monitor.stop();
        mon.join().expect("monitor thread");
        result.unwrap_or_else(|p| std::panic::resume_unwind(p))
    });

    assert!(monitor.samples() > 0, "the monitor never sampled");
    assert!(
        monitor.max_backends() <= POOL,
        "PostgreSQL saw {} trust_user backends, pool_size is {POOL}",
        monitor.max_backends()
    );
    assert!(
        monitor.max_servers() <= POOL,
        "the pooler reported {} servers, pool_size is {POOL}",
        monitor.max_servers()
    );
    // Every TPC-B transaction counted inserted one history row and
    // committed (pgbench truncates the history before each run; a client
    // cut off by -T at its very COMMIT may leave one uncounted row).
    let history_after: u64 = pg_scalar(&pg, "test", "select count(*) from pgbench_history")
        .and_then(|v| v.parse().ok())
        .expect("history count");
    assert_eq!(history_before, 0, "pgbench -i leaves an empty history");
    assert!(
        (tpcb..=tpcb + 32).contains(&history_after),
        "pgbench_history has {history_after} rows for {tpcb} committed TPC-B transactions"
    );
    // The balances are consistent (TPC-B invariant).
    assert_eq!(
        pg_scalar(
            &pg,
            "test",
            "select (select sum(abalance) from pgbench_accounts) = \
                    (select sum(bbalance) from pgbench_branches) \
                and (select sum(bbalance) from pgbench_branches) = \
                    (select sum(tbalance) from pgbench_tellers)"
        )
        .as_deref(),
        Some("t")
    );
    // pgbench disconnected: no client left.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let i = handle.inspect().expect("inspect");
        if i.clients == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "clients still counted: {i:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Bullet 13 (psql): psql works through the pooler in session and in
/// transaction mode.
#[test]
fn psql_through_the_pooler() {
    let _w = watchdog("psql_through_the_pooler", Duration::from_secs(60));
    let pg = PgCluster::start();
    let config = Config::new(pg.port())
        .route(Route::new("test", "trust_user").session().pool_size(2))
        .route(
            Route::new("txdb", "trust_user")
                .storage_db("test")
                .transaction()
                .pool_size(2),
        );
    let (_handle, port) = start_pooler(&config);

    for (db, mode) in [("test", "session"), ("txdb", "transaction")] {
        let psql = |args: &[&str]| {
            let mut cmd = pg_tool("psql");
            cmd.args(["-X", "-w", "-v", "ON_ERROR_STOP=1"])
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-U", "trust_user", "-d", db])
                .args(args);
            run_tool(cmd, Duration::from_secs(30))
        };

        let o = psql(&["-c", "select 42"]);
        let (stdout, stderr) = text(&o);
        assert!(
            o.status.success(),
            "{mode}: psql failed ({}): {stdout}\n{stderr}",
            o.status
        );
        assert!(stdout.contains("42"), "{mode}: {stdout}\n{stderr}");

        // Tuples only, several commands, a transaction.
        let o = psql(&[
            "-At",
            "-c",
            "begin",
            "-c",
            "select current_database()",
            "-c",
            "select 40 + 3",
            "-c",
            "commit",
        ]);
        let (stdout, stderr) = text(&o);
        assert!(
            o.status.success(),
            "{mode}: psql failed ({}): {stdout}\n{stderr}",
            o.status
        );
        assert!(
            stdout.lines().any(|l| l.trim() == "test") && stdout.lines().any(|l| l.trim() == "43"),
            "{mode}: {stdout}\n{stderr}"
        );

        // An SQL error is reported and psql exits with 3 (ON_ERROR_STOP).
        let o = psql(&["-c", "select 1/0"]);
        let (stdout, stderr) = text(&o);
        assert!(!o.status.success(), "{mode}: 1/0 succeeded: {stdout}");
        assert!(stderr.contains("division by zero"), "{mode}: {stderr}");
        let o = psql(&["-At", "-c", "select 44"]);
        assert!(text(&o).0.contains("44"), "{mode}: {:?}", text(&o));
    }
}
