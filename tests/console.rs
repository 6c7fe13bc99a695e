//! The admin console as an operator uses it, through a real client: every
//! SHOW with its columns, RELOAD, KILL, PAUSE/RESUME under load, SHUTDOWN,
//! and the same data through the facade's inspect.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use odissey::ConfigSource;
use odissey_harness::{PgCluster, TRUST_USER};
use postgres::error::SqlState;
use postgres::SimpleQueryMessage;

const ADMIN_PASS: &str = "console-secret";

/// A config with the console at database "console", user "admin", and a
/// transaction-pooled route for trust_user with `pool_size`.
fn console_toml(pg_port: u16, pool_size: usize) -> String {
    let mut text = Config::new(pg_port)
        .route(
            Route::new("test", TRUST_USER)
                .transaction()
                .pool_size(pool_size),
        )
        .toml();
    text.push_str(&format!(
        "\n[storage.local]\ntype = \"local\"\n\n\
         [database.console.user.admin]\nauthentication = \"scram-sha-256\"\n\
         password = \"{ADMIN_PASS}\"\nstorage = \"local\"\n"
    ));
    text
}

fn console(port: u16) -> Client {
    connect(port, "console", "admin", Some(ADMIN_PASS))
}

/// A SHOW's column names and rows, as text.
fn show(c: &mut Client, sql: &str) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let mut cols = Vec::new();
    let mut rows = Vec::new();
    for m in c
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("{sql}: {}", describe(&e)))
    {
        if let SimpleQueryMessage::Row(r) = m {
            cols = r.columns().iter().map(|c| c.name().to_string()).collect();
            rows.push(
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| (col.name().to_string(), r.get(i).unwrap_or("").to_string()))
                    .collect(),
            );
        }
    }
    (cols, rows)
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn show_commands_list_pools_clients_and_servers() {
    let _w = watchdog("console show", Duration::from_secs(60));
    let pg = PgCluster::start();
    let (h, port) = start_pooler_from(ConfigSource::Toml(console_toml(pg.port(), 1)));
    // One client holds the only server in a transaction; another waits.
    let mut holder = connect(port, "test", TRUST_USER, None);
    holder.batch_execute("BEGIN; SELECT 1").unwrap();
    let waiter = std::thread::spawn(move || {
        let mut c = connect(port, "test", TRUST_USER, None);
        c.simple_query("SELECT 2").unwrap();
    });
    let mut admin = console(port);
    wait_until("a waiting client", Duration::from_secs(10), || {
        show(&mut admin, "show pools")
            .1
            .iter()
            .any(|r| r["cl_waiting"] == "1")
    });

    let (cols, pools) = show(&mut admin, "SHOW POOLS;");
    for c in [
        "database",
        "user",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "sv_used",
        "sv_tested",
        "sv_login",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ] {
        assert!(
            cols.iter().any(|x| x == c),
            "SHOW POOLS lacks {c}: {cols:?}"
        );
    }
    let p = pools
        .iter()
        .find(|r| r["database"] == "test")
        .expect("the test pool");
    assert_eq!(
        (
            &*p["user"],
            &*p["cl_active"],
            &*p["cl_waiting"],
            &*p["sv_active"],
            &*p["pool_mode"]
        ),
        (TRUST_USER, "1", "1", "1", "transaction")
    );

    let (cols, clients) = show(&mut admin, "show clients");
    for c in [
        "type", "user", "database", "state", "addr", "port", "wait", "wait_us", "id", "worker",
        "tls", "link",
    ] {
        assert!(
            cols.iter().any(|x| x == c),
            "SHOW CLIENTS lacks {c}: {cols:?}"
        );
    }
    let state_of = |s: &str| clients.iter().filter(|r| r["state"] == s).count();
    assert_eq!(
        (state_of("active"), state_of("waiting"), state_of("console")),
        (1, 1, 1)
    );
    let active = clients.iter().find(|r| r["state"] == "active").unwrap();
    assert!(active["id"].starts_with('c'), "{active:?}");
    assert_eq!(active["addr"], "127.0.0.1");

    let (_, servers) = show(&mut admin, "show servers");
    assert_eq!(servers.len(), 1, "{servers:?}");
    let s = &servers[0];
    assert_eq!((&*s["state"], &*s["database"]), ("active", "test"));
    assert_eq!(s["link"], active["id"], "the server names its client");
    assert_eq!(active["link"], s["id"], "the client names its server");
    let pid: i32 = s["remote_pid"].parse().unwrap();
    assert_eq!(pid, backend_pid(&mut holder));

    // The facade sees the same, typed.
    let ins = h.inspect().unwrap();
    assert_eq!(ins.server_list.len(), 1);
    assert_eq!(ins.server_list[0].id, s["id"]);
    assert_eq!(ins.server_list[0].remote_pid, Some(pid as u32));
    assert!(ins
        .client_list
        .iter()
        .any(|c| c.id == active["id"] && c.state == "active"));
    assert!(ins
        .client_list
        .iter()
        .any(|c| c.state == "waiting" && c.database == "test"));

    let (_, lists) = show(&mut admin, "show lists");
    let item = |l: &str| {
        lists
            .iter()
            .find(|r| r["list"] == l)
            .map(|r| r["items"].clone())
    };
    assert_eq!(item("waiting_clients").as_deref(), Some("1"));
    assert_eq!(item("active_servers").as_deref(), Some("1"));

    let (_, version) = show(&mut admin, "show version");
    assert!(version[0]["version"].starts_with("odissey "));

    let (_, config) = show(&mut admin, "show config");
    let secret = config
        .iter()
        .find(|r| r["key"] == "database.console.user.admin.password")
        .expect("the console password key");
    assert_eq!(secret["value"], "********");
    assert!(!config.iter().any(|r| r["value"] == ADMIN_PASS));

    let (_, dbs) = show(&mut admin, "show databases");
    assert!(dbs
        .iter()
        .any(|r| r["database"] == "test" && r["pool_size"] == "1"));

    // Unknown commands and the extended protocol get errors; the
    // connection stays usable.
    let e = admin.simple_query("show nonsense").unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::SYNTAX_ERROR), "{}", describe(&e));
    let e = admin.query("show pools", &[]).unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::FEATURE_NOT_SUPPORTED),
        "{}",
        describe(&e)
    );
    assert!(!show(&mut admin, "show version").1.is_empty());

    holder.batch_execute("COMMIT").unwrap();
    waiter.join().unwrap();
    // A wrong console password is refused like any other.
    expect_code(
        try_connect(port, "console", "admin", Some("wrong")),
        &SqlState::INVALID_PASSWORD,
        "a wrong console password",
    );
}

#[test]
fn reload_and_kill_from_the_console() {
    let _w = watchdog("console reload/kill", Duration::from_secs(60));
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odissey.toml");
    std::fs::write(&path, console_toml(pg.port(), 2)).unwrap();
    let (_h, port) = start_pooler_from(ConfigSource::File(path.clone()));
    let mut admin = console(port);
    let mut a = connect(port, "test", TRUST_USER, None);
    a.simple_query("SELECT 1").unwrap();

    // RELOAD picks up the file's new pool_size.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("pool_size = 2", "pool_size = 5");
    std::fs::write(&path, text).unwrap();
    admin.simple_query("RELOAD").unwrap();
    let (_, pools) = show(&mut admin, "show pools");
    assert_eq!(
        pools.iter().find(|r| r["database"] == "test").unwrap()["pool_size"],
        "5"
    );
    // A broken file is refused and said so; the running config stays.
    std::fs::write(&path, "workers = 0\n").unwrap();
    let e = admin.simple_query("reload").unwrap_err();
    assert!(describe(&e).contains("workers"), "{}", describe(&e));
    std::fs::write(&path, console_toml(pg.port(), 5)).unwrap();

    // KILL <client id>: that client only.
    let mut b = connect(port, "test", TRUST_USER, None);
    b.simple_query("SELECT 1").unwrap();
    let pid_b = backend_pid(&mut b);
    let (_, clients) = show(&mut admin, "show clients");
    let ids: Vec<String> = clients
        .iter()
        .filter(|r| r["database"] == "test")
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(ids.len(), 2, "{clients:?}");
    admin.simple_query(&format!("KILL {}", ids[0])).unwrap();
    wait_until("one client left", Duration::from_secs(5), || {
        show(&mut admin, "show clients")
            .1
            .iter()
            .filter(|r| r["database"] == "test")
            .count()
            == 1
    });
    // KILL <db>: every client and server of it.
    admin.simple_query("kill test").unwrap();
    wait_until("no client of test", Duration::from_secs(5), || {
        let (_, c) = show(&mut admin, "show clients");
        let (_, s) = show(&mut admin, "show servers");
        !c.iter().any(|r| r["database"] == "test") && s.is_empty()
    });
    for c in [&mut a, &mut b] {
        let e = c.simple_query("SELECT 1").unwrap_err();
        assert!(
            e.code() == Some(&SqlState::ADMIN_SHUTDOWN) || e.is_closed(),
            "{}",
            describe(&e)
        );
    }
    let _ = pid_b;
    // The console itself is still there, and new clients are served.
    assert_eq!(
        connect(port, "test", TRUST_USER, None)
            .query_one("SELECT 1", &[])
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[test]
fn pause_and_resume_under_pgbench_without_errors() {
    let _w = watchdog("console pause", Duration::from_secs(120));
    let pg = PgCluster::start();
    let (_h, port) = start_pooler_from(ConfigSource::Toml(console_toml(pg.port(), 4)));
    pgbench_init(&pg);

    let mut bench = pg_tool("pgbench");
    bench
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", TRUST_USER])
        .args(["-c", "8", "-j", "2", "-T", "6", "-S", "test"]);
    let load = std::thread::spawn(move || run_tool(bench, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(1500));

    let mut admin = console(port);
    let t0 = Instant::now();
    admin.simple_query("PAUSE test").unwrap();
    // Paused: no transaction runs, so no server is linked, and pgbench's
    // clients wait.
    let (_, servers) = show(&mut admin, "show servers");
    assert!(
        servers.iter().all(|s| s["state"] != "active"),
        "{servers:?}"
    );
    std::thread::sleep(Duration::from_millis(800));
    let (_, pools) = show(&mut admin, "show pools");
    let p = pools.iter().find(|r| r["database"] == "test").unwrap();
    assert_eq!(p["sv_active"], "0", "{p:?}");
    assert!(p["cl_waiting"].parse::<usize>().unwrap() > 0, "{p:?}");
    let waited: u64 =
        p["maxwait_us"].parse::<u64>().unwrap() + p["maxwait"].parse::<u64>().unwrap() * 1_000_000;
    assert!(waited >= 500_000, "the longest wait is shown: {p:?}");
    admin.simple_query("RESUME test").unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5));

    let out = load.join().unwrap();
    assert_pgbench_clean(&out);
}

#[test]
fn shutdown_from_the_console_stops_the_pooler() {
    let _w = watchdog("console shutdown", Duration::from_secs(60));
    let pg = PgCluster::start();
    let (h, port) = start_pooler_from(ConfigSource::Toml(console_toml(pg.port(), 2)));
    let mut admin = console(port);
    // The command completes, then the pooler drains and stops.
    let r = admin.simple_query("SHUTDOWN");
    assert!(
        r.is_ok() || r.as_ref().is_err_and(|e| e.is_closed()),
        "{:?}",
        r.map_err(|e| describe(&e))
    );
    wait_until("the pooler to stop", Duration::from_secs(10), || {
        h.is_stopped()
    });
    assert!(try_connect(port, "test", TRUST_USER, None).is_err());
}

#[test]
fn pause_restart_postgresql_resume_without_client_errors() {
    let _w = watchdog("pause for a restart", Duration::from_secs(120));
    let pg = PgCluster::start();
    let (_h, port) = start_pooler_from(ConfigSource::Toml(console_toml(pg.port(), 4)));
    pgbench_init(&pg);

    let mut bench = pg_tool("pgbench");
    bench
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", TRUST_USER])
        .args(["-c", "6", "-j", "2", "-T", "8", "-S", "test"]);
    let load = std::thread::spawn(move || run_tool(bench, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(1500));
    let mut admin = console(port);
    // The operator's routine: PAUSE, restart the server, RESUME.
    admin.simple_query("PAUSE").unwrap();
    pg.stop();
    pg.restart();
    admin.simple_query("RESUME").unwrap();

    let out = load.join().unwrap();
    assert_pgbench_clean(&out);
}
