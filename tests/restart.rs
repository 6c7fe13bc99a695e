//! The binary's lifecycle as an operator drives it: an online restart
//! (SIGUSR2) under pgbench without a failed connection, a handover through
//! SO_REUSEPORT and SIGTERM, --daemonize with a pid file.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use odissey_harness::{PgCluster, TRUST_USER};

const BIN: &str = env!("CARGO_BIN_EXE_odissey");

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.split(") ").nth(1).is_some_and(|r| r.starts_with('Z')))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_pid(path: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A config on a fixed port with a pid file, the log in a file.
fn config(pg_port: u16, port: u16, dir: &std::path::Path) -> std::path::PathBuf {
    let text = Config::new(pg_port)
        .route(Route::new("test", TRUST_USER).transaction().pool_size(4))
        .global("pid_file", &format!("{:?}", dir.join("odissey.pid")))
        .global("log_file", &format!("{:?}", dir.join("odissey.log")))
        .global("shutdown_timeout", "5000")
        .toml()
        .replace("port = 0", &format!("port = {port}"));
    let path = dir.join("odissey.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn online_restart_under_pgbench_fails_no_connection() {
    let _w = watchdog("online restart", Duration::from_secs(120));
    let pg = PgCluster::start();
    pgbench_init(&pg);

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = config(pg.port(), port, dir.path());
    let pid_file = dir.path().join("odissey.pid");
    let mut first = Command::new(BIN)
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the first to write its pid",
        Duration::from_secs(10),
        || read_pid(&pid_file) == Some(first.id()),
    );

    // A new connection for every transaction: the handover must not fail
    // one of them.
    let mut bench = pg_tool("pgbench");
    bench
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", TRUST_USER])
        .args(["-C", "-c", "4", "-j", "2", "-T", "6", "-S", "test"]);
    let load = std::thread::spawn(move || run_tool(bench, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_millis(1500));
    signal(first.id(), "USR2");
    // The successor takes over: its pid in the file, the first gone.
    wait_until("the successor's pid", Duration::from_secs(15), || {
        read_pid(&pid_file).is_some_and(|p| p != first.id())
    });
    let status = first.wait().unwrap();
    assert!(status.success(), "the first exited with {status}");
    let second = read_pid(&pid_file).unwrap();
    assert!(alive(second));

    let out = load.join().unwrap();
    assert_pgbench_clean(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("connection to server"), "{err}");

    // The successor serves, and stops on SIGTERM, removing its pid file.
    let mut c = connect(port, "test", TRUST_USER, None);
    assert_eq!(c.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0), 1);
    drop(c);
    signal(second, "TERM");
    wait_until("the successor to stop", Duration::from_secs(15), || {
        !alive(second)
    });
    assert!(!pid_file.exists(), "the pid file is removed at exit");
    let log = std::fs::read_to_string(dir.path().join("odissey.log")).unwrap();
    assert!(log.contains("online restart: successor"), "{log}");
    assert!(log.contains("asking"), "{log}");
}

#[test]
fn daemonize_runs_in_the_background_with_a_pid_file() {
    let _w = watchdog("daemonize", Duration::from_secs(60));
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let path = config(pg.port(), port, dir.path());
    let out = Command::new(BIN)
        .arg("--daemonize")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(read_pid(&dir.path().join("odissey.pid")), Some(pid));
    let mut c = connect(port, "test", TRUST_USER, None);
    assert_eq!(c.query_one("SELECT 1", &[]).unwrap().get::<_, i32>(0), 1);
    drop(c);
    signal(pid, "TERM");
    wait_until("the daemon to stop", Duration::from_secs(15), || {
        !alive(pid)
    });
    // A config that can't start reports failure to the caller.
    std::fs::write(&path, "workers = 0\n").unwrap();
    let out = Command::new(BIN)
        .arg("--daemonize")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
