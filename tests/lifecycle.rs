//! End-to-end tests of the pooler's life cycle: reloading the config (TOML
//! text and file) and shutting down (graceful and immediate).

mod common;

use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use odissey::ConfigSource;
use odissey_harness::TRUST_USER;

const LIMIT: Duration = Duration::from_secs(60);

/// One md5 route test/md5_user whose client password is `password`.
fn md5_config(pg: &PgCluster, password: &str) -> Config {
    Config::new(pg.port()).route(
        Route::new("test", "md5_user")
            .md5(password)
            .storage_password("md5_pass")
            .transaction(),
    )
}

#[track_caller]
fn assert_login_works(port: u16, password: &str, what: &str) {
    let mut c = try_connect(port, "test", "md5_user", Some(password))
        .unwrap_or_else(|e| panic!("{what}: password {password:?} refused: {}", describe(&e)));
    assert_eq!(
        scalar(&mut c, "select current_user").as_deref(),
        Some("md5_user"),
        "{what}"
    );
}

#[track_caller]
fn assert_login_refused(port: u16, password: &str, what: &str) {
    let e = expect_code(
        try_connect(port, "test", "md5_user", Some(password)),
        &SqlState::INVALID_PASSWORD,
        &format!("{what}: password {password:?}"),
    );
    assert_pooler_fatal(&e, what);
}

#[track_caller]
fn assert_config_error<T: std::fmt::Debug>(result: Result<T, odissey::Error>, what: &str) {
    match result {
        Err(odissey::Error::Config(msg)) => {
            assert!(!msg.is_empty(), "{what}: empty config error message");
        }
        Err(other) => panic!("{what}: expected Error::Config, got {other:?}"),
        Ok(_) => panic!("{what}: an invalid config was accepted"),
    }
}

/// Bullet 9 (TOML text): a reload changes the client password for new
/// clients; an invalid reload is refused with Error::Config and the old
/// config keeps working.
#[test]
fn reload_from_toml_text() {
    let _w = watchdog("reload_from_toml_text", LIMIT);
    let pg = PgCluster::start();
    let one = md5_config(&pg, "one");
    let two = md5_config(&pg, "two");
    let (handle, port) = start_pooler(&one);

    assert_login_works(port, "one", "before reload");
    assert_login_refused(port, "two", "before reload");
    // A client logged in before the reload.
    let mut old = connect(port, "test", "md5_user", Some("one"));

    handle
        .reload(Some(ConfigSource::Toml(two.toml())))
        .unwrap_or_else(|e| panic!("reload to password \"two\" failed: {e}"));
    assert_login_works(port, "two", "after reload");
    assert_login_refused(port, "one", "after reload");
    // The client already in keeps working.
    assert_eq!(scalar(&mut old, "select 'old'").as_deref(), Some("old"));

    // Invalid configs are refused, nothing changes.
    let bad_storage = two
        .toml()
        .replace("storage = \"main\"\n", "storage = \"nope\"\n");
    assert!(bad_storage.contains("\"nope\""));
    for (what, bad) in [
        ("a route naming a missing storage", bad_storage),
        ("text that is not TOML", "this is [not toml".to_string()),
        (
            "workers = 0",
            two.toml().replace("workers = 2", "workers = 0"),
        ),
        ("an unknown key", format!("no_such_key = 1\n{}", two.toml())),
        (
            "a bad pool mode",
            two.toml()
                .replace("pool = \"transaction\"", "pool = \"statementish\""),
        ),
    ] {
        assert_config_error(handle.reload(Some(ConfigSource::Toml(bad))), what);
        assert_login_works(port, "two", &format!("after refusing {what}"));
        assert_login_refused(port, "one", &format!("after refusing {what}"));
    }
    assert_eq!(scalar(&mut old, "select 'old'").as_deref(), Some("old"));

    // And back.
    handle
        .reload(Some(ConfigSource::Toml(one.toml())))
        .unwrap_or_else(|e| panic!("reload back to password \"one\" failed: {e}"));
    assert_login_works(port, "one", "after reloading back");
    assert_login_refused(port, "two", "after reloading back");

    // The listener did not move.
    let i = handle.inspect().expect("inspect");
    assert_eq!(i.tcp.first().map(|a| a.port()), Some(port), "{i:?}");
}

/// Bullet 9 (file): start from a file, edit it, `reload(None)` re-reads it.
#[test]
fn reload_from_file() {
    let _w = watchdog("reload_from_file", LIMIT);
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("odissey.toml");
    std::fs::write(&path, md5_config(&pg, "one").toml()).expect("write config");

    let (handle, port) = start_pooler_from(ConfigSource::File(path.clone()));
    assert_login_works(port, "one", "started from file");
    assert_login_refused(port, "two", "started from file");

    std::fs::write(&path, md5_config(&pg, "two").toml()).expect("rewrite config");
    // Nothing changes until the reload.
    assert_login_works(port, "one", "file edited, not reloaded");
    handle
        .reload(None)
        .unwrap_or_else(|e| panic!("reload(None) of the edited file failed: {e}"));
    assert_login_works(port, "two", "after reload(None)");
    assert_login_refused(port, "one", "after reload(None)");

    // An invalid file is refused and the running config stays.
    std::fs::write(&path, "workers = \"many\"\n[[listen]]\n").expect("write bad config");
    assert_config_error(handle.reload(None), "reload(None) of an invalid file");
    assert_login_works(port, "two", "after refusing the invalid file");

    // A file that disappeared cannot be reloaded either; an Error::Config
    // or Error::Io is fine, the running config stays.
    std::fs::remove_file(&path).expect("remove config");
    assert!(
        handle.reload(None).is_err(),
        "reload of a missing file succeeded"
    );
    assert_login_works(port, "two", "after failing to reload a missing file");

    // Reloading from another file given explicitly.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, md5_config(&pg, "three").toml()).expect("write other config");
    handle
        .reload(Some(ConfigSource::File(other)))
        .unwrap_or_else(|e| panic!("reload(Some(File)) failed: {e}"));
    assert_login_works(port, "three", "after reloading another file");
    assert_login_refused(port, "two", "after reloading another file");
}

/// Bullet 12: a graceful shutdown lets a client inside a transaction
/// commit, refuses new clients, and returns once the client has left.
#[test]
fn graceful_shutdown_waits_for_the_running_transaction() {
    let _w = watchdog("graceful_shutdown_waits_for_the_running_transaction", LIMIT);
    let pg = PgCluster::start();
    pg.sql("test", "CREATE TABLE t (v int); GRANT ALL ON t TO PUBLIC");
    let config =
        Config::new(pg.port()).route(Route::new("test", "trust_user").transaction().pool_size(2));
    let (handle, port) = start_pooler(&config);

    let mut a = connect(port, "test", "trust_user", None);
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .expect("BEGIN; INSERT");

    let grace = Duration::from_secs(5);
    let started = Instant::now();
    let shutdown = thread::spawn(move || {
        let result = handle.shutdown(grace);
        (result, started.elapsed())
    });
    thread::sleep(Duration::from_millis(300));

    // New clients are refused once the shutdown has started.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match login_refused(port, "trust_user", "test", Duration::from_secs(2)) {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "new clients are still accepted 2 s into the shutdown: {e}"
            ),
        }
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !shutdown.is_finished(),
        "shutdown returned while a client was inside a transaction"
    );

    // The client in the transaction can finish it.
    a.batch_execute("INSERT INTO t VALUES (2)")
        .unwrap_or_else(|e| {
            panic!(
                "statement in the transaction during shutdown: {}",
                describe(&e)
            )
        });
    a.batch_execute("COMMIT")
        .unwrap_or_else(|e| panic!("COMMIT during shutdown: {}", describe(&e)));
    assert_eq!(
        pg_scalar(&pg, "test", "select count(*) from t").as_deref(),
        Some("2"),
        "the transaction committed during the shutdown is not there"
    );
    let committed_at = started.elapsed();
    drop(a);

    let (result, elapsed) = shutdown.join().expect("shutdown thread panicked");
    result.unwrap_or_else(|e| panic!("graceful shutdown failed: {e}"));
    assert!(elapsed >= committed_at.saturating_sub(Duration::from_millis(50)));
    assert!(
        elapsed < grace - Duration::from_millis(500),
        "shutdown took {elapsed:?}: it waited for the grace period instead of the client"
    );

    // Nothing listens any more, and the server connections are closed.
    if let Err(e) = login_refused(port, "trust_user", "test", Duration::from_secs(2)) {
        panic!("a client logged in after the shutdown: {e}");
    }
    assert_eq!(
        pg.wait_for_backends("trust_user", 0, Duration::from_secs(5)),
        0,
        "server connections left open after the shutdown"
    );
}

/// A transaction still running when the grace period ends is cut off and
/// rolled back; shutdown returns about when the grace period ends.
#[test]
fn shutdown_grace_expires_and_rolls_back() {
    let _w = watchdog("shutdown_grace_expires_and_rolls_back", LIMIT);
    let pg = PgCluster::start();
    pg.sql("test", "CREATE TABLE t (v int); GRANT ALL ON t TO PUBLIC");
    let config =
        Config::new(pg.port()).route(Route::new("test", "trust_user").transaction().pool_size(1));
    let (handle, port) = start_pooler(&config);

    let mut a = connect(port, "test", "trust_user", None);
    a.batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .expect("BEGIN; INSERT");

    let grace = Duration::from_secs(1);
    let started = Instant::now();
    handle
        .shutdown(grace)
        .unwrap_or_else(|e| panic!("shutdown failed: {e}"));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= grace - Duration::from_millis(100),
        "shutdown returned after {elapsed:?}, before the {grace:?} grace period"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "shutdown took {elapsed:?}"
    );

    // The client was disconnected, its transaction never committed.
    assert!(
        a.batch_execute("COMMIT").is_err(),
        "COMMIT succeeded after the grace period ended"
    );
    assert_eq!(
        pg.wait_for_backends("trust_user", 0, Duration::from_secs(5)),
        0,
        "server connections left open after the shutdown"
    );
    assert_eq!(
        pg_scalar(&pg, "test", "select count(*) from t").as_deref(),
        Some("0")
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening"
    );
}

/// Dropping the handle shuts the pooler down at once.
#[test]
fn dropping_the_handle_stops_the_pooler() {
    let _w = watchdog("dropping_the_handle_stops_the_pooler", LIMIT);
    let pg = PgCluster::start();
    let config = Config::new(pg.port()).route(Route::new("test", "trust_user").session());
    let (handle, port) = start_pooler(&config);
    let mut a = connect(port, "test", "trust_user", None);
    a.batch_execute("BEGIN").expect("BEGIN");

    let started = Instant::now();
    drop(handle);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "dropping the handle took {:?}",
        started.elapsed()
    );
    assert!(
        a.simple_query("select 1").is_err(),
        "client still served after drop"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still listening"
    );
    assert_eq!(
        pg.wait_for_backends("trust_user", 0, Duration::from_secs(5)),
        0
    );
}

#[test]
fn reload_under_load_changes_pool_size_and_storage_without_client_errors() {
    let _w = watchdog("reload under load", Duration::from_secs(120));
    let pg = PgCluster::start();
    pgbench_init(&pg);

    let base = |pool_size: usize| {
        let mut text = Config::new(pg.port())
            .route(
                Route::new("test", TRUST_USER)
                    .transaction()
                    .pool_size(pool_size),
            )
            .toml();
        // A second storage: the same server by another name.
        text.push_str(&format!(
            "\n[storage.alt]\ntype = \"remote\"\nhost = \"localhost\"\nport = {}\n",
            pg.port()
        ));
        text
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odissey.toml");
    std::fs::write(&path, base(4)).unwrap();
    let (h, port) = start_pooler_from(ConfigSource::File(path.clone()));

    let mut bench = pg_tool("pgbench");
    bench
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", TRUST_USER])
        .args(["-c", "8", "-j", "2", "-T", "6", "test"]);
    let load = std::thread::spawn(move || run_tool(bench, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(1500));
    // A smaller pool…
    std::fs::write(&path, base(2)).unwrap();
    assert_eq!(h.reload(None).unwrap(), Vec::<String>::new());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        h.inspect()
            .unwrap()
            .route("test", TRUST_USER)
            .unwrap()
            .pool_size
            == 2
    );
    // …then another storage for the route: its old connections retire.
    std::fs::write(
        &path,
        base(2).replace("storage = \"main\"", "storage = \"alt\""),
    )
    .unwrap();
    h.reload(None).unwrap();
    let out = load.join().unwrap();
    assert_pgbench_clean(&out);
    // The servers now are the new storage's (localhost), at most 2.
    let ins = h.inspect().unwrap();
    assert!(ins.server_list.len() <= 2, "{:?}", ins.server_list);

    // Settings that need a restart are named in the reply.
    std::fs::write(&path, base(2).replace("workers = 2", "workers = 3")).unwrap();
    let notes = h.reload(None).unwrap();
    assert!(notes.iter().any(|n| n.contains("workers")), "{notes:?}");
}

/// Issue 12: a reload that lowers a route's pool_size (4 -> 2) keeps its
/// pool but closes the servers above the new size as they are released,
/// never under a running transaction: pgbench sees no error, and once the
/// transactions in flight at the reload are over PostgreSQL never holds
/// more than 2 backends of the route.
#[test]
fn reload_lowering_pool_size_closes_the_servers_above_it_under_load() {
    let _w = watchdog(
        "reload lowering pool_size under load",
        Duration::from_secs(120),
    );
    let pg = PgCluster::start();
    pgbench_init(&pg);
    let config = |pool_size| {
        Config::new(pg.port()).route(
            Route::new("test", TRUST_USER)
                .transaction()
                .pool_size(pool_size),
        )
    };
    let (h, port) = start_pooler(&config(4));

    let mut bench = pg_tool("pgbench");
    bench
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", TRUST_USER])
        .args(["-c", "10", "-j", "2", "-T", "10", "test"]);
    let started = Instant::now();
    let load = thread::spawn(move || run_tool(bench, Duration::from_secs(60)));
    // Ten clients on a pool of 4: all 4 open.
    assert_eq!(
        pg.wait_for_backends(TRUST_USER, 4, Duration::from_secs(4)),
        4,
        "pool_size 4 under 10 clients"
    );
    h.reload(Some(ConfigSource::Toml(config(2).toml())))
        .expect("reload to pool_size 2");
    // The transactions running at the reload end within milliseconds;
    // their servers close as they are released (and their backends take
    // a moment to exit).
    let n = pg.wait_for_backends(TRUST_USER, 2, Duration::from_secs(3));
    assert!(n <= 2, "{n} backends 3 s after lowering pool_size to 2");
    // From then on (the second half of the run), never more than 2.
    let mut samples = 0;
    let mut max = 0;
    let mut max_servers = 0;
    while started.elapsed() < Duration::from_secs(9) {
        max = max.max(pg.backends(TRUST_USER));
        max_servers = max_servers.max(servers_total(&h.inspect().expect("inspect")));
        samples += 1;
        thread::sleep(Duration::from_millis(20));
    }
    assert!(samples >= 20, "only {samples} samples: the run ended early");
    assert!(max <= 2, "{max} backends after the reload to pool_size 2");
    assert!(max_servers <= 2, "the pooler counted {max_servers} servers");
    let out = load.join().expect("pgbench thread");
    let text = assert_pgbench_clean(&out);
    assert!(started.elapsed() >= Duration::from_secs(9), "{text}");
    assert!(pg.backends(TRUST_USER) <= 2);
    assert_eq!(
        h.inspect()
            .unwrap()
            .route("test", TRUST_USER)
            .unwrap()
            .pool_size,
        2
    );
}

/// Issue 12: after a reload that lowers pool_size, the servers workers
/// keep idle above the new size close at once, not at their next use.
#[test]
fn reload_lowering_pool_size_closes_idle_servers_at_once() {
    let _w = watchdog("reload lowering pool_size, idle", LIMIT);
    let pg = PgCluster::start();
    let config = |pool_size| {
        Config::new(pg.port()).route(
            Route::new("test", TRUST_USER)
                .transaction()
                .pool_size(pool_size),
        )
    };
    let (h, port) = start_pooler(&config(4));
    // Four transactions at once open four servers...
    let mut clients: Vec<Client> = (0..4)
        .map(|_| connect(port, "test", TRUST_USER, None))
        .collect();
    for c in &mut clients {
        c.batch_execute("begin; select 1").expect("begin");
    }
    // ...which stay idle on the workers once they end.
    for c in &mut clients {
        c.batch_execute("commit").expect("commit");
    }
    assert_eq!(pg.backends(TRUST_USER), 4);
    h.reload(Some(ConfigSource::Toml(config(2).toml())))
        .expect("reload to pool_size 2");
    // No client does anything: the idle ones above 2 close on their own.
    assert_eq!(
        pg.wait_for_backends(TRUST_USER, 2, Duration::from_secs(3)),
        2,
        "idle servers above the lowered pool_size"
    );
    // The two left serve the clients, and no third opens.
    for c in &mut clients {
        assert_eq!(scalar(c, "select 'ok'").as_deref(), Some("ok"));
    }
    let i = h.inspect().unwrap();
    assert_eq!(servers_total(&i), 2, "{:?}", i.routes);
    assert_eq!(pg.backends(TRUST_USER), 2);
}
