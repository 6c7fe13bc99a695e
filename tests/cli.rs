//! The `odissey` binary as an operator runs it: --version, --check, and a
//! foreground run that reloads on SIGHUP and stops gracefully on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_odissey");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn version_and_check() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("odissey "));

    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, Config::new(5432).route(Route::new("db", "u")).toml()).unwrap();
    let out = Command::new(BIN)
        .arg("--check")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let bad = dir.path().join("bad.toml");
    let text = Config::new(5432)
        .route(Route::new("db", "u"))
        .toml()
        .replace("storage = \"main\"", "storage = \"missing\"");
    std::fs::write(&bad, &text).unwrap();
    let out = Command::new(BIN).arg("--check").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("database.db.user.u.storage") && err.contains("line "),
        "{err}"
    );

    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "workers = 2\npool_sise = 3\n").unwrap();
    let out = Command::new(BIN)
        .arg("--check")
        .arg(&typo)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("pool_sise") && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn sighup_reloads_and_sigterm_stops() {
    let pg = PgCluster::start();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odissey.toml");
    let config = |password: &str| {
        Config::new(pg.port())
            .route(
                Route::new("test", "trust_user")
                    .transaction()
                    .md5(password)
                    .storage_password("unused"),
            )
            .toml()
            .replace("port = 0", &format!("port = {port}"))
    };
    std::fs::write(&path, config("one")).unwrap();
    let mut child = Command::new(BIN)
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = connect_eventually(
        port,
        "test",
        "trust_user",
        Some("one"),
        Duration::from_secs(10),
    );
    assert_eq!(scalar(&mut c, "select 7").as_deref(), Some("7"));

    std::fs::write(&path, config("two")).unwrap();
    signal(child.id(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if try_connect(port, "test", "trust_user", Some("two")).is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload the config"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client connected before the reload carries on.
    assert_eq!(scalar(&mut c, "select 8").as_deref(), Some("8"));
    drop(c);

    signal(child.id(), "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop odissey");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}
