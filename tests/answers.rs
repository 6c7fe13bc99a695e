//! Issue 13, "silence where PostgreSQL answers": input PostgreSQL answers
//! (and odissey used to drop, pass on or accept silently) gets the answer
//! PostgreSQL gives. Where PostgreSQL is involved, the same raw bytes are
//! sent to the cluster directly and to odissey, and the SQLSTATE and
//! message compared.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Transaction pooling for trust_user on `test`, session pooling for
/// postgres on `test`, and a console (`console`/`admin`, no password).
fn config(pg: &PgCluster) -> String {
    let mut text = Config::new(pg.port())
        .route(Route::new("test", "trust_user").transaction().pool_size(2))
        .route(Route::new("test", "postgres").session().pool_size(2))
        .toml();
    text.push_str(
        "\n[storage.local]\ntype = \"local\"\n\n\
         [database.console.user.admin]\nauthentication = \"none\"\n\
         storage = \"local\"\n",
    );
    text
}

fn start(pg: &PgCluster) -> (Handle, u16) {
    start_pooler_from(ConfigSource::Toml(config(pg)))
}

/// Reads up to a FATAL ErrorResponse, which must be followed by the end of
/// the connection; returns it and the tags of what came before.
#[track_caller]
fn read_fatal(c: &mut RawClient, what: &str) -> (ErrorFields, String) {
    let mut before = String::new();
    loop {
        let (tag, body) = c
            .read_msg()
            .unwrap_or_else(|e| panic!("{what}: no FATAL error came: {e} (after {before:?})"));
        if tag == b'E' {
            let f = parse_error_fields(&body);
            if f.severity == "FATAL" {
                let mut rest = Vec::new();
                c.stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("set_read_timeout");
                let n = c
                    .stream
                    .read_to_end(&mut rest)
                    .unwrap_or_else(|e| panic!("{what}: the connection stayed open: {e}"));
                assert_eq!(n, 0, "{what}: bytes after the FATAL error: {rest:?}");
                return (f, before);
            }
        }
        before.push(tag as char);
    }
}

/// A message of type `tag` with an empty body.
fn empty(tag: u8) -> Vec<u8> {
    vec![tag, 0, 0, 0, 4]
}

fn query(sql: &str) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    odissey_protocol::frontend::query(&mut b, sql);
    b.to_vec()
}

/// What PostgreSQL says to `bytes` sent right after a login as `user`.
fn postgres_says(pg: &PgCluster, user: &str, bytes: &[u8], what: &str) -> ErrorFields {
    let mut c = RawClient::login(pg.port(), user, "test")
        .unwrap_or_else(|e| panic!("{what}: PostgreSQL refused the login: {e:?}"));
    c.send(bytes);
    read_fatal(&mut c, &format!("{what} (PostgreSQL)")).0
}

/// odissey's error has PostgreSQL's severity, SQLSTATE and words, after
/// odissey's own prefix.
#[track_caller]
fn assert_same(ours: &ErrorFields, theirs: &ErrorFields, what: &str) {
    assert_eq!(
        (&ours.severity, &ours.code),
        (&theirs.severity, &theirs.code),
        "{what}: odissey {ours:?}, PostgreSQL {theirs:?}"
    );
    assert!(
        ours.message.starts_with("odissey: c") && ours.message.ends_with(&theirs.message),
        "{what}: odissey {:?}, PostgreSQL {:?}",
        ours.message,
        theirs.message
    );
}

/// Item 1: every type PostgreSQL refuses after login is FATAL 08P01
/// "invalid frontend message type N", from an idle client (no server), a
/// linked one (in a transaction, and in session pooling), one whose bad
/// type follows a query in the same write, and from a console client;
/// CopyData, CopyDone and CopyFail outside COPY are ignored, as PostgreSQL
/// ignores them.
#[test]
fn unknown_message_types_are_fatal_as_in_postgresql() {
    let _w = watchdog("unknown_message_types_are_fatal_as_in_postgresql", LIMIT);
    let pg = PgCluster::start();
    let (_handle, port) = start(&pg);
    for tag in [b'z', b'a', 0u8, b'W', 0xff, b'p', b'v', b'G'] {
        let what = format!("type {tag}");
        let theirs = postgres_says(&pg, "trust_user", &empty(tag), &what);
        assert_eq!(theirs.code, "08P01", "{what}: {theirs:?}");
        assert_eq!(
            theirs.message,
            format!("invalid frontend message type {tag}")
        );

        // Idle in transaction pooling: no server held.
        let mut c = RawClient::login(port, "trust_user", "test").expect("login");
        c.send(&empty(tag));
        let (ours, _) = read_fatal(&mut c, &format!("{what}, idle"));
        assert_same(&ours, &theirs, &format!("{what}, idle"));

        // The type byte alone is enough, as for PostgreSQL.
        let mut c = RawClient::login(port, "trust_user", "test").expect("login");
        c.send(&[tag]);
        let (ours, _) = read_fatal(&mut c, &format!("{what} alone, idle"));
        assert_same(&ours, &theirs, &format!("{what} alone, idle"));

        // Linked: inside a transaction.
        let mut c = RawClient::login(port, "trust_user", "test").expect("login");
        assert!(c.query("begin").error.is_none());
        c.send(&empty(tag));
        let (ours, _) = read_fatal(&mut c, &format!("{what}, in a transaction"));
        assert_same(&ours, &theirs, &format!("{what}, in a transaction"));

        // Linked in session pooling.
        let theirs_pg = postgres_says(&pg, "postgres", &empty(tag), &what);
        let mut c = RawClient::login(port, "postgres", "test").expect("login");
        assert!(c.query("select 1").error.is_none());
        c.send(&empty(tag));
        let (ours, _) = read_fatal(&mut c, &format!("{what}, session pooling"));
        assert_same(&ours, &theirs_pg, &format!("{what}, session pooling"));

        // Behind a query in the same write: never passed to the server.
        let mut c = RawClient::login(port, "trust_user", "test").expect("login");
        let mut bytes = query("select 1");
        bytes.extend(empty(tag));
        c.send(&bytes);
        let (ours, _) = read_fatal(&mut c, &format!("{what}, after a query"));
        assert_same(&ours, &theirs, &format!("{what}, after a query"));

        // The console.
        let mut c = RawClient::login(port, "admin", "console").expect("console login");
        c.send(&empty(tag));
        let (ours, _) = read_fatal(&mut c, &format!("{what}, console"));
        assert_same(&ours, &theirs, &format!("{what}, console"));
    }
    // No server was left broken: the pool still serves.
    let mut c = RawClient::login(port, "trust_user", "test").expect("login");
    assert!(c.query("select 1").error.is_none());

    // COPY messages outside COPY are ignored by PostgreSQL; so here, idle,
    // linked, and on the console.
    let mut copy_msgs = Vec::new();
    copy_msgs.extend([b'd', 0, 0, 0, 7, b'a', b'b', b'c']);
    copy_msgs.extend(empty(b'c'));
    copy_msgs.extend([b'f', 0, 0, 0, 7, b'n', b'o', 0]);
    for (user, db, sql) in [
        ("trust_user", "test", "select 1"),
        ("postgres", "test", "select 1"),
        ("admin", "console", "show version"),
    ] {
        for c_port in [pg.port(), port] {
            if db == "console" && c_port == pg.port() {
                continue;
            }
            let mut c = RawClient::login(c_port, user, db).expect("login");
            c.send(&copy_msgs);
            let o = c.query(sql);
            assert!(
                o.error.is_none() && o.rows.len() == 1,
                "{user}@{db} on port {c_port}: COPY messages outside COPY: {:?}",
                o.error
            );
            c.send(&empty(b'z'));
            read_fatal(&mut c, "after COPY messages");
        }
    }
}

/// Item 2: the console answers FunctionCall with an error and
/// ReadyForQuery; an extended-protocol message with one error, after which
/// everything up to Sync is ignored, then ReadyForQuery (PostgreSQL's
/// error recovery); the connection stays usable.
#[test]
fn console_answers_other_messages_like_postgresql() {
    let _w = watchdog("console_answers_other_messages_like_postgresql", LIMIT);
    let pg = PgCluster::start();
    let (_handle, port) = start(&pg);
    let mut c = RawClient::login(port, "admin", "console").expect("console login");

    // FunctionCall: oid 1, no arguments, text result.
    c.send(&[b'F', 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    let got = c.read_until_tag(b'Z');
    assert_eq!(tags(&got), "EZ");
    let e = parse_error_fields(&got[0].1);
    assert_eq!((e.severity.as_str(), e.code.as_str()), ("ERROR", "0A000"));

    // Parse, Bind, a Query (skipped: it comes before the Sync), Execute,
    // Sync: one error, one ReadyForQuery.
    let mut b = bytes::BytesMut::new();
    odissey_protocol::frontend::parse(&mut b, "", "show version", &[]);
    odissey_protocol::frontend::bind(&mut b, "", "", &[]);
    odissey_protocol::frontend::query(&mut b, "show version");
    odissey_protocol::frontend::execute(&mut b, "", 0);
    odissey_protocol::frontend::sync(&mut b);
    c.send(&b);
    let got = c.read_until_tag(b'Z');
    assert_eq!(tags(&got), "EZ", "one error, then ReadyForQuery at Sync");
    // A Flush alone gets nothing; the next query is answered.
    c.send(&empty(b'H'));
    let o = c.query("show version");
    assert!(o.error.is_none() && o.rows.len() == 1, "{:?}", o.error);
    // The same recovery on PostgreSQL: a failing Parse, then everything
    // up to Sync skipped.
    let mut direct = RawClient::login(pg.port(), "trust_user", "test").expect("login");
    let mut b = bytes::BytesMut::new();
    odissey_protocol::frontend::parse(&mut b, "", "not sql", &[]);
    odissey_protocol::frontend::bind(&mut b, "", "", &[]);
    odissey_protocol::frontend::query(&mut b, "select 1");
    odissey_protocol::frontend::execute(&mut b, "", 0);
    odissey_protocol::frontend::sync(&mut b);
    direct.send(&b);
    assert_eq!(tags(&direct.read_until_tag(b'Z')), "EZ");
}

/// A StartupMessage for protocol 3.`minor` with `params`.
fn startup_v3(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, 0, 0, 0, 0, 3];
    p.extend(minor.to_be_bytes());
    for (name, value) in params {
        p.extend(name.as_bytes());
        p.push(0);
        p.extend(value.as_bytes());
        p.push(0);
    }
    p.push(0);
    let len = (p.len() as u32).to_be_bytes();
    p[..4].copy_from_slice(&len);
    p
}

/// Logs in with `packet`; returns the messages up to ReadyForQuery (or
/// the FATAL error) and the client.
fn login_with(port: u16, packet: &[u8]) -> (Vec<(u8, Vec<u8>)>, RawClient) {
    let mut c = RawClient::tcp(port);
    c.send(packet);
    let mut got = Vec::new();
    loop {
        let m = c.read_msg().unwrap_or_else(|e| {
            panic!("login on port {port}: {e} after {:?}", tags(&got));
        });
        let end = m.0 == b'Z' || m.0 == b'E';
        got.push(m);
        if end {
            return (got, c);
        }
    }
}

/// Item 3: a newer 3.x minor version or `_pq_.` options get the
/// NegotiateProtocolVersion PostgreSQL sends (the same bytes), then the
/// login goes on on 3.0. Another major version keeps its 0A000.
#[test]
fn newer_minor_versions_and_protocol_options_are_negotiated_as_postgresql_does() {
    let _w = watchdog("newer_minor_versions_are_negotiated", LIMIT);
    let pg = PgCluster::start();
    let (_handle, port) = start(&pg);
    let base = [("user", "trust_user"), ("database", "test")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = base.to_vec();
        v.extend_from_slice(extra);
        v
    };
    for (minor, params) in [
        (2u16, with(&[])),
        (2, with(&[("_pq_.command_compression", "on")])),
        (
            0,
            with(&[("_pq_.a", "1"), ("application_name", "x"), ("_pq_.b", "")]),
        ),
        (0xffff, with(&[])),
    ] {
        let what = format!("3.{minor} with {params:?}");
        let packet = startup_v3(minor, &params);
        let (theirs, mut direct) = login_with(pg.port(), &packet);
        let (ours, mut c) = login_with(port, &packet);
        assert_eq!(theirs[0].0, b'v', "{what}: PostgreSQL: {:?}", tags(&theirs));
        assert_eq!(ours[0].0, b'v', "{what}: odissey: {:?}", tags(&ours));
        assert_eq!(
            ours[0].1, theirs[0].1,
            "{what}: the same NegotiateProtocolVersion"
        );
        assert_eq!(
            ours.last().map(|m| m.0),
            Some(b'Z'),
            "{what}: {:?}",
            tags(&ours)
        );
        assert_eq!(theirs.last().map(|m| m.0), Some(b'Z'));
        // And both speak 3.0 from there on.
        assert!(direct.query("select 1").error.is_none());
        let o = c.query("select current_setting('application_name')");
        assert!(o.error.is_none(), "{what}: {:?}", o.error);
    }
    // 3.0 without options: no NegotiateProtocolVersion, from either.
    let packet = startup_v3(0, &base);
    for p in [pg.port(), port] {
        let (got, _) = login_with(p, &packet);
        assert!(!tags(&got).contains('v'), "port {p}: {:?}", tags(&got));
    }
    // Another major version: 0A000 from both.
    let mut packet = startup_v3(0, &base);
    packet[5] = 4;
    for p in [pg.port(), port] {
        let (got, _) = login_with(p, &packet);
        let e = parse_error_fields(&got.last().expect("a reply").1);
        assert_eq!((e.severity.as_str(), e.code.as_str()), ("FATAL", "0A000"));
        assert!(
            e.message.contains("unsupported frontend protocol 4.0"),
            "{e:?}"
        );
    }
}

/// Item 4: a replication startup is refused with 0A000 (odissey serves no
/// walsender), a false one logs in as usual, and an invalid value gets
/// PostgreSQL's own 22023.
#[test]
fn replication_startups_are_refused_clearly() {
    let _w = watchdog("replication_startups_are_refused_clearly", LIMIT);
    let pg = PgCluster::start();
    let (_handle, port) = start(&pg);
    let login = |value: &str| {
        let mut c = RawClient::tcp(port);
        c.send_startup(&[
            ("user", "trust_user"),
            ("database", "test"),
            ("replication", value),
        ]);
        c.finish_login().map(|()| c)
    };
    for value in ["database", "true", "on", "yes", "1", "t"] {
        let Err(e) = login(value) else {
            panic!("replication={value} was served as a normal session");
        };
        assert_eq!(
            (e.severity.as_str(), e.code.as_str()),
            ("FATAL", "0A000"),
            "replication={value}: {e:?}"
        );
        assert!(
            e.message
                .ends_with("replication connections are not supported by odissey"),
            "{e:?}"
        );
    }
    for value in ["false", "off", "no", "0", "FALSE"] {
        let mut c =
            login(value).unwrap_or_else(|e| panic!("replication={value} must log in: {e:?}"));
        let o = c.query("select 1");
        assert!(o.error.is_none(), "replication={value}: {:?}", o.error);
    }
    let Err(ours) = login("maybe") else {
        panic!("replication=maybe logged in");
    };
    let mut direct = RawClient::tcp(pg.port());
    direct.send_startup(&[
        ("user", "trust_user"),
        ("database", "test"),
        ("replication", "maybe"),
    ]);
    let theirs = direct
        .finish_login()
        .expect_err("PostgreSQL refuses replication=maybe");
    assert_same(&ours, &theirs, "replication=maybe");
}

/// Item 5: console commands that name nothing answer with an error (in
/// PgBouncer's words), and the console stays usable; those that name
/// something still succeed.
#[test]
fn console_commands_naming_nothing_are_errors() {
    let _w = watchdog("console_commands_naming_nothing_are_errors", LIMIT);
    let pg = PgCluster::start();
    let (_handle, port) = start(&pg);
    let mut admin = RawClient::login(port, "admin", "console").expect("console login");
    let mut error_of = |sql: &str| {
        let o = admin.query(sql);
        assert_eq!(o.status, b'I', "{sql}: ReadyForQuery follows");
        o.error
    };
    for (sql, code, text) in [
        (
            "KILL nosuchdb",
            "42704",
            "no such client or database: nosuchdb",
        ),
        (
            "KILL c0123456789abcdef0123456789abcdef",
            "42704",
            "no such client or database: c0123456789abcdef0123456789abcdef",
        ),
        ("PAUSE nosuchdb", "3D000", "no such database: nosuchdb"),
        ("RESUME test", "55000", "database test is not paused"),
        ("RESUME", "55000", "odissey is not paused"),
    ] {
        let e = error_of(sql).unwrap_or_else(|| panic!("{sql}: answered success"));
        assert_eq!(
            (e.severity.as_str(), e.code.as_str(), e.message.as_str()),
            ("ERROR", code, text),
            "{sql}"
        );
    }
    // A database of the config with no connection: KILL is no error.
    assert_eq!(error_of("KILL test").map(|e| e.message), None);
    // PAUSE and RESUME of a real database, then of all.
    assert_eq!(error_of("PAUSE test").map(|e| e.message), None);
    assert_eq!(error_of("RESUME test").map(|e| e.message), None);
    assert!(error_of("RESUME test").is_some(), "resumed already");
    assert_eq!(error_of("PAUSE").map(|e| e.message), None);
    assert_eq!(error_of("RESUME").map(|e| e.message), None);
    // KILL of a client by its id closes it.
    let mut victim = RawClient::login(port, "trust_user", "test").expect("login");
    assert!(victim.query("select 1").error.is_none());
    // SHOW CLIENTS: type, user, database, state, addr, port, connected_s,
    // wait, wait_us, id, ...
    let o = admin.query("show clients");
    assert!(o.error.is_none(), "{:?}", o.error);
    let ids: Vec<String> = o
        .rows
        .iter()
        .filter(|r| r[2].as_deref() == Some("test"))
        .filter_map(|r| r[9].clone())
        .collect();
    assert_eq!(ids.len(), 1, "one client of test: {:?}", o.rows);
    let o = admin.query(&format!("KILL {}", ids[0]));
    assert!(o.error.is_none(), "KILL {}: {:?}", ids[0], o.error);
    let (e, _) = read_fatal(&mut victim, "the killed client");
    assert_eq!(e.code, "57P01", "{e:?}");
}
