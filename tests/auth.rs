//! Client authentication as users meet it: every method, with the right
//! and a wrong secret, through a real driver; secrets in every form
//! PostgreSQL stores them; passthrough against a real server; auth_timeout
//! against a client that stalls; and logs that never show a secret.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use odissey_harness::{PgCluster, MD5_PASS, MD5_USER, SCRAM_PASS, SCRAM_USER, TRUST_USER};
use postgres::error::SqlState;

const BIN: &str = env!("CARGO_BIN_EXE_odissey");

/// The secret PostgreSQL stores for `role` (md5 hash or SCRAM verifier).
fn stored_secret(pg: &PgCluster, role: &str) -> String {
    pg_scalar(
        pg,
        "postgres",
        &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"),
    )
    .expect("the role has a password")
}

fn route(user: &str, method: &str, password: Option<&str>) -> Route {
    Route {
        authentication: method.into(),
        password: password.map(str::to_string),
        ..Route::new("test", user)
    }
    .transaction()
}

/// Waits for a freshly started binary to serve a login.
fn wait_served(port: u16, db: &str, user: &str, password: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_connect(port, db, user, Some(password)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(describe(&e)),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn one(port: u16, user: &str, password: Option<&str>) -> Result<i32, postgres::Error> {
    let mut c = try_connect(port, "test", user, password)?;
    Ok(c.query_one("SELECT 1", &[])?.get(0))
}

#[test]
fn scram_clients_with_plain_passwords_and_verifiers() {
    let _w = watchdog("scram", Duration::from_secs(60));
    let pg = PgCluster::start();
    let verifier = stored_secret(&pg, SCRAM_USER);
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    // A plain password serves both legs; a verifier serves the client leg,
    // so the server leg needs storage_password.
    for (user, secret, storage_password) in [
        (SCRAM_USER, SCRAM_PASS.to_string(), None),
        (SCRAM_USER, verifier.clone(), Some(SCRAM_PASS)),
    ] {
        let mut r = route(user, "scram-sha-256", Some(&secret));
        r.storage_password = storage_password.map(str::to_string);
        let (_h, port) = start_pooler(&Config::new(pg.port()).route(r));
        assert_eq!(one(port, user, Some(SCRAM_PASS)).unwrap(), 1);
        let e = expect_code(
            one(port, user, Some("wrong")),
            &SqlState::INVALID_PASSWORD,
            "a wrong SCRAM password",
        );
        assert!(
            describe(&e).contains(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{}",
            describe(&e)
        );
    }
}

#[test]
fn md5_and_clear_text_against_every_secret_that_can_serve_them() {
    let _w = watchdog("md5", Duration::from_secs(60));
    let pg = PgCluster::start();
    let md5_hash = stored_secret(&pg, MD5_USER);
    let scram_verifier = stored_secret(&pg, SCRAM_USER);
    let cases = [
        // (user, method, secret, the right password)
        (MD5_USER, "md5", MD5_PASS.to_string(), MD5_PASS),
        (MD5_USER, "md5", md5_hash.clone(), MD5_PASS),
        (MD5_USER, "clear_text", md5_hash, MD5_PASS),
        (SCRAM_USER, "clear_text", scram_verifier, SCRAM_PASS),
        (SCRAM_USER, "clear_text", SCRAM_PASS.to_string(), SCRAM_PASS),
    ];
    for (user, method, secret, right) in cases {
        let mut r = route(user, method, Some(&secret));
        // Hashes and verifiers can't log in to the server.
        r.storage_password = Some(right.to_string());
        let (_h, port) = start_pooler(&Config::new(pg.port()).route(r));
        assert_eq!(
            one(port, user, Some(right)).unwrap(),
            1,
            "{method} {secret}"
        );
        expect_code(
            one(port, user, Some("wrong")),
            &SqlState::INVALID_PASSWORD,
            &format!("{method} with a wrong password against {secret}"),
        );
    }
}

#[test]
fn secrets_that_cannot_serve_a_method_are_refused_at_check() {
    let verifier =
        odissey_protocol::scram::ScramSecret::from_password("pw", b"0123456789abcdef", 4096)
            .to_string_pg();
    let md5_hash = odissey_protocol::md5::hash_password("u", "pw");
    let dir = tempfile::tempdir().unwrap();
    for (method, secret, needle) in [
        (
            "md5",
            verifier.as_str(),
            "a SCRAM verifier cannot check md5",
        ),
        (
            "scram-sha-256",
            md5_hash.as_str(),
            "an md5 hash cannot check SCRAM",
        ),
        ("cert", "", "\"cert\" needs a [[listen]] with tls"),
    ] {
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            Config::new(5432)
                .route(route("u", method, Some(secret).filter(|s| !s.is_empty())))
                .toml(),
        )
        .unwrap();
        let out = Command::new(BIN)
            .arg("--check")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{method} with {secret} passed --check"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
        assert!(err.contains("database.test.user.u"), "{err}");
    }
}

#[test]
fn a_blocked_route_is_refused_and_others_are_served() {
    let _w = watchdog("block", Duration::from_secs(30));
    let pg = PgCluster::start();
    let cfg = Config::new(pg.port())
        .route(route(MD5_USER, "block", None))
        .route(route(TRUST_USER, "none", None));
    let (_h, port) = start_pooler(&cfg);
    let e = expect_code(
        one(port, MD5_USER, Some(MD5_PASS)),
        &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "a blocked user",
    );
    assert!(describe(&e).contains("blocked"), "{}", describe(&e));
    assert_eq!(one(port, TRUST_USER, None).unwrap(), 1);
}

#[test]
fn passthrough_checks_passwords_on_the_server_and_follows_changes() {
    let _w = watchdog("passthrough", Duration::from_secs(90));
    let pg = PgCluster::start();
    let cfg = Config::new(pg.port())
        .route(route(MD5_USER, "passthrough", None))
        .route(route(SCRAM_USER, "passthrough", None));
    let (_h, port) = start_pooler(&cfg);
    for (user, right) in [(MD5_USER, MD5_PASS), (SCRAM_USER, SCRAM_PASS)] {
        expect_code(
            one(port, user, Some("wrong")),
            &SqlState::INVALID_PASSWORD,
            &format!("passthrough {user} with a wrong password"),
        );
        assert_eq!(one(port, user, Some(right)).unwrap(), 1);
        // The pool logs in with the proved password: several clients at
        // once need several server connections.
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let mut c = connect(port, "test", user, Some(right));
                c.batch_execute("BEGIN; SELECT pg_sleep(0.05)").unwrap();
                c
            })
            .collect();
        assert!(pg.backends(user) >= 3, "{user}: {}", pg.backends(user));
        for mut c in clients {
            c.batch_execute("COMMIT").unwrap();
        }
        // A wrong password after a right one is still wrong.
        expect_code(
            one(port, user, Some("wrong")),
            &SqlState::INVALID_PASSWORD,
            &format!("passthrough {user} with a wrong password after a right one"),
        );
    }
    // The password changes on the server: the new one is checked there
    // (the cached one no longer matches) and the old one stops working.
    pg.sql(
        "postgres",
        "SET password_encryption = 'md5'; ALTER ROLE md5_user PASSWORD 'changed'",
    );
    assert_eq!(one(port, MD5_USER, Some("changed")).unwrap(), 1);
    expect_code(
        one(port, MD5_USER, Some(MD5_PASS)),
        &SqlState::INVALID_PASSWORD,
        "the old password after a change",
    );
}

/// The first authentication request the pooler sends `user` (3 is
/// AuthenticationCleartextPassword, 0 AuthenticationOk).
fn first_auth_request(port: u16, user: &str) -> u32 {
    let mut c = RawClient::tcp(port);
    c.send_startup(&[("user", user), ("database", "test")]);
    let (tag, body) = c.read_msg().expect("the pooler's answer to a startup");
    assert_eq!(tag, b'R', "{user}: {:?}", String::from_utf8_lossy(&body));
    let code = body
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    c.vanish();
    code.unwrap_or_else(|| panic!("{user}: a short authentication request"))
}

/// Issue 12: passthrough against a server that lets the user in without a
/// password (pg_hba trust) asks the client for none, as PostgreSQL would
/// not; users the server asks a password of are asked for one, and when
/// the server starts asking (pg_hba changed), so does odissey.
#[test]
fn passthrough_asks_no_password_of_a_user_the_server_trusts() {
    let _w = watchdog("passthrough trust", Duration::from_secs(60));
    let pg = PgCluster::start();
    let cfg = Config::new(pg.port())
        .route(route(TRUST_USER, "passthrough", None))
        .route(route(MD5_USER, "passthrough", None))
        .route(route(SCRAM_USER, "passthrough", None));
    let (_h, port) = start_pooler(&cfg);
    // The raw client panics at any authentication request but Ok.
    let mut c = RawClient::login(port, TRUST_USER, "test").expect("trust_user, no password");
    let q = c.query("select current_user");
    assert_eq!(q.rows, vec![vec![Some(TRUST_USER.to_string())]], "{q:?}");
    c.terminate();
    assert_eq!(first_auth_request(port, TRUST_USER), 0);
    // A driver with no password at all.
    assert_eq!(one(port, TRUST_USER, None).unwrap(), 1);
    for (user, right) in [(MD5_USER, MD5_PASS), (SCRAM_USER, SCRAM_PASS)] {
        assert_eq!(first_auth_request(port, user), 3, "{user} is asked");
        assert!(one(port, user, None).is_err(), "{user} without a password");
        expect_code(
            one(port, user, Some("wrong")),
            &SqlState::INVALID_PASSWORD,
            &format!("passthrough {user} with a wrong password"),
        );
        assert_eq!(one(port, user, Some(right)).unwrap(), 1);
    }
    // The server starts asking trust_user (who has no password) for one.
    let hba = pg.datadir().join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    let line = "host    all       trust_user  127.0.0.1/32  trust";
    assert!(text.contains(line), "{text}");
    let asking = text.replace(line, "host    all       trust_user  127.0.0.1/32  md5");
    std::fs::write(&hba, asking).expect("rewrite pg_hba.conf");
    pg.sql("postgres", "SELECT pg_reload_conf()");
    // What odissey saw holds 2 s at most (credentials::TRUST_TTL).
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(first_auth_request(port, TRUST_USER), 3, "asked now");
    expect_code(
        one(port, TRUST_USER, Some("anything")),
        &SqlState::INVALID_PASSWORD,
        "trust_user once the server asks for a password",
    );
    assert!(one(port, TRUST_USER, None).is_err());
}

#[test]
fn a_client_that_stalls_in_startup_is_dropped_after_auth_timeout() {
    let _w = watchdog("auth_timeout", Duration::from_secs(30));
    let pg = PgCluster::start();
    let cfg = Config::new(pg.port())
        .global("auth_timeout", "400")
        .route(route(TRUST_USER, "none", None))
        .route(route(MD5_USER, "md5", Some(MD5_PASS)));
    let (_h, port) = start_pooler(&cfg);
    let t0 = Instant::now();
    // One sends nothing at all; one sends half a startup packet; one is
    // asked for a password and never answers.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut half = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(&[0, 0, 0, 40, 0, 3]).unwrap();
    let mut mute = RawClient::tcp(port);
    mute.send_startup(&[("user", MD5_USER), ("database", "test")]);
    let (tag, _) = mute.read_msg().unwrap();
    assert_eq!(tag, b'R', "asked for a password");
    // Others are served meanwhile.
    assert_eq!(one(port, TRUST_USER, None).unwrap(), 1);
    for s in [&mut silent, &mut half, &mut mute.stream] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        // The pooler says why (FATAL 08P01), then closes.
        let _ = s.read_to_end(&mut got);
        let msgs = split_messages(&got);
        let err = msgs
            .iter()
            .find(|(t, _)| *t == b'E')
            .map(|(_, b)| parse_error_fields(b));
        let err = err.unwrap_or_else(|| panic!("no error before the close: {got:?}"));
        assert_eq!(err.code, "08P01", "{err:?}");
        assert!(err.message.contains("auth_timeout"), "{err:?}");
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(4),
        "dropped after {took:?}"
    );
    assert_eq!(one(port, TRUST_USER, None).unwrap(), 1);
}

/// Runs the binary with `log_debug`, logs in every way with right and
/// wrong passwords, and checks that no secret reached the log.
#[test]
fn no_secret_appears_in_the_debug_log() {
    let _w = watchdog("secrets in logs", Duration::from_secs(90));
    let pg = PgCluster::start();
    let md5_hash = stored_secret(&pg, MD5_USER);
    let verifier = stored_secret(&pg, SCRAM_USER);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut md5_route = route(MD5_USER, "md5", Some(&md5_hash));
    md5_route.storage_password = Some(MD5_PASS.into());
    let mut scram_route = route(SCRAM_USER, "scram-sha-256", Some(&verifier));
    scram_route.storage_password = Some(SCRAM_PASS.into());
    let text = Config::new(pg.port())
        .global("log_debug", "true")
        .route(md5_route)
        .route(scram_route)
        .route(Route {
            db: "app".into(),
            ..route(MD5_USER, "passthrough", None)
        })
        .toml()
        .replacen("log_debug = false\n", "", 1)
        .replace("port = 0", &format!("port = {port}"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odissey.toml");
    std::fs::write(&path, text).unwrap();
    let child = Command::new(BIN)
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let served = (|| {
        wait_served(port, "test", MD5_USER, MD5_PASS)?;
        let attempts = [
            ("test", MD5_USER, MD5_PASS),
            ("test", MD5_USER, "md5-wrong-secret"),
            ("test", SCRAM_USER, SCRAM_PASS),
            ("test", SCRAM_USER, "scram-wrong-secret"),
            ("app", MD5_USER, MD5_PASS),
            ("app", MD5_USER, "passthrough-wrong-secret"),
        ];
        for (db, user, password) in attempts {
            if let Ok(mut c) = try_connect(port, db, user, Some(password)) {
                c.simple_query("SELECT 1")
                    .map_err(|e| format!("{user}: {e}"))?;
            }
        }
        Ok::<(), String>(())
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    served.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("DEBUG"), "debug logging was on: {log}");
    assert!(log.contains("password authentication failed"), "{log}");
    for secret in [
        MD5_PASS,
        SCRAM_PASS,
        "md5-wrong-secret",
        "scram-wrong-secret",
        "passthrough-wrong-secret",
        &md5_hash,
        &verifier,
    ] {
        assert!(!log.contains(secret), "{secret:?} is in the log:\n{log}");
    }
}

#[test]
fn zero_config_start_and_print_config() {
    let _w = watchdog("zero-config", Duration::from_secs(60));
    let pg = PgCluster::start();
    // --print-config prints a config that loads back as itself.
    let out = Command::new(BIN)
        .arg("--print-config")
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port().to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let cfg = odissey::config::Config::parse(&printed).unwrap();
    assert_eq!(cfg.to_toml().unwrap(), printed);
    assert_eq!(cfg.listen[0].port, Some(6432));
    assert_eq!(cfg.storage["postgres"].port, pg.port());

    // `odissey` alone, then psql with the user's own password.
    let busy = std::net::TcpListener::bind("127.0.0.1:6432").is_err();
    assert!(
        !busy,
        "port 6432 is taken on this machine (a PgBouncer?); the zero-config test needs it"
    );
    let child = Command::new(BIN)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let result = (|| {
        wait_served(6432, "test", SCRAM_USER, SCRAM_PASS)?;
        let psql = |password: &str| {
            let mut cmd = pg_tool("psql");
            cmd.args([
                "-h",
                "127.0.0.1",
                "-p",
                "6432",
                "-U",
                SCRAM_USER,
                "-d",
                "test",
            ])
            .args(["-tA", "-c", "SELECT current_user"])
            .env("PGPASSWORD", password);
            cmd.output().map_err(|e| e.to_string())
        };
        let ok = psql(SCRAM_PASS)?;
        let wrong = psql("wrong")?;
        Ok::<_, String>((ok, wrong))
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let (ok, wrong) = result.unwrap_or_else(|e| {
        panic!(
            "{e}\nodissey said:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), SCRAM_USER);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"),
        "{wrong:?}"
    );
}

/// The route that runs auth_query: the superuser, trusted by the server.
fn query_route() -> Route {
    route("postgres", "none", None)
}

fn auth_query_route(user: &str, method: &str) -> (Route, RouteKeys) {
    (
        route(user, method, None),
        RouteKeys::new("test", user)
            .raw(
                "auth_query",
                "\"SELECT usename, passwd FROM pg_shadow WHERE usename = $1\"",
            )
            .raw("auth_query_user", "\"postgres\""),
    )
}

#[test]
fn auth_query_logs_users_in_with_no_password_in_the_config() {
    let _w = watchdog("auth_query", Duration::from_secs(90));
    let pg = PgCluster::start();
    let (scram, scram_keys) = auth_query_route(SCRAM_USER, "scram-sha-256");
    let (md5, md5_keys) = auth_query_route(MD5_USER, "md5");
    let (nobody, nobody_keys) = auth_query_route("nobody", "scram-sha-256");
    let cfg = Config::new(pg.port())
        .route(scram)
        .route(md5)
        .route(nobody)
        .route(query_route());
    let (_h, port) = start_pooler_ext(&cfg, &[scram_keys, md5_keys, nobody_keys]);
    for (user, right) in [(SCRAM_USER, SCRAM_PASS), (MD5_USER, MD5_PASS)] {
        // The pool logs in to the server with what the client's proof
        // taught it (SCRAM keys, or the md5 hash): several clients at once
        // need several server logins.
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let mut c = connect(port, "test", user, Some(right));
                c.batch_execute("BEGIN; SELECT pg_sleep(0.05)").unwrap();
                c
            })
            .collect();
        assert!(pg.backends(user) >= 3, "{user}: {}", pg.backends(user));
        for mut c in clients {
            c.batch_execute("COMMIT").unwrap();
        }
        expect_code(
            one(port, user, Some("wrong")),
            &SqlState::INVALID_PASSWORD,
            &format!("auth_query {user} with a wrong password"),
        );
    }
    // A user the server doesn't know fails exactly like a wrong password.
    let e = expect_code(
        one(port, "nobody", Some("anything")),
        &SqlState::INVALID_PASSWORD,
        "auth_query for an unknown user",
    );
    assert!(
        describe(&e).contains("password authentication failed for user \"nobody\""),
        "{}",
        describe(&e)
    );
}

#[test]
fn a_broken_auth_query_is_reported_not_mistaken_for_a_wrong_password() {
    let _w = watchdog("auth_query errors", Duration::from_secs(60));
    let pg = PgCluster::start();
    let cfg = Config::new(pg.port())
        .route(route(SCRAM_USER, "scram-sha-256", None))
        .route(query_route());
    let keys = RouteKeys::new("test", SCRAM_USER)
        .raw(
            "auth_query",
            "\"SELECT passwd FROM no_such_table WHERE usename = $1\"",
        )
        .raw("auth_query_user", "\"postgres\"");
    let (_h, port) = start_pooler_ext(&cfg, &[keys]);
    let e = one(port, SCRAM_USER, Some(SCRAM_PASS)).unwrap_err();
    let text = describe(&e);
    assert!(text.contains("auth_query failed"), "{text}");
    assert!(text.contains("no_such_table"), "{text}");
    assert_ne!(e.code(), Some(&SqlState::INVALID_PASSWORD), "{text}");
}

/// What a failed login told the client, without odissey's `odissey: c…: `
/// prefix (the connection id differs from one connection to the next).
fn refusal(e: &postgres::Error) -> (String, String) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not an error from the pooler: {e}"));
    let message = db.message();
    let message = match message.strip_prefix("odissey: ") {
        Some(rest) => rest.split_once(": ").map_or(rest, |(_, m)| m),
        None => message,
    };
    (db.code().code().to_string(), message.to_string())
}

/// Issue 13: a user no route admits (or a database no route names) is asked
/// for a password like a known user and told exactly what a known user
/// with a wrong password is told, for SCRAM and md5 routes alike; the
/// right password still gets in.
#[test]
fn unknown_users_cannot_be_told_from_wrong_passwords() {
    let _w = watchdog("enumeration", Duration::from_secs(60));
    let pg = PgCluster::start();
    for (user, method, right) in [
        (SCRAM_USER, "scram-sha-256", SCRAM_PASS),
        (MD5_USER, "md5", MD5_PASS),
    ] {
        let cfg = Config::new(pg.port()).route(route(user, method, Some(right)));
        let (_h, port) = start_pooler(&cfg);
        assert_eq!(one(port, user, Some(right)).unwrap(), 1, "{method}");
        let wrong = refusal(&expect_code(
            one(port, user, Some("wrong")),
            &SqlState::INVALID_PASSWORD,
            "a wrong password",
        ));
        assert_eq!(
            wrong.1,
            format!("password authentication failed for user \"{user}\"")
        );
        // The same user name, so that the texts can match whole.
        for (db, who) in [("nodb", user), ("test", "nobody"), ("nodb", "nobody")] {
            // Even the known user's right password: there is no route.
            let unknown = refusal(&expect_code(
                try_connect(port, db, who, Some(right)),
                &SqlState::INVALID_PASSWORD,
                &format!("{method}: {who}@{db}"),
            ));
            let want = (
                wrong.0.clone(),
                format!("password authentication failed for user \"{who}\""),
            );
            assert_eq!(unknown, want, "{method}: {who}@{db}");
        }
        // The pooler is unharmed, and so is the known user.
        assert_eq!(one(port, user, Some(right)).unwrap(), 1, "{method}");
    }
}
