//! End-to-end tests of the pooler facing bad input: garbage bytes, broken
//! startup packets, wrong passwords, unknown routes, too many clients.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(60);

fn trust_config(pg: &PgCluster) -> Config {
    Config::new(pg.port()).route(Route::new("test", "trust_user").transaction().pool_size(2))
}

#[track_caller]
fn assert_still_serving(port: u16, what: &str) {
    let mut c = try_connect(port, "test", "trust_user", None)
        .unwrap_or_else(|e| panic!("after {what}: cannot connect: {}", describe(&e)));
    assert_eq!(
        scalar(&mut c, "select 'alive'").as_deref(),
        Some("alive"),
        "after {what}"
    );
}

/// Sends `bytes` on a fresh connection and reads until the pooler closes
/// it; returns what it sent back. Write errors are fine (the pooler may
/// close before reading everything).
fn send_and_read_until_closed(port: u16, bytes: &[u8], what: &str) -> Vec<u8> {
    let mut s =
        TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("{what}: connect: {e}"));
    let _ = s.write_all(bytes);
    let _ = s.flush();
    read_until_closed(&mut s, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Anything sent back must be an ErrorResponse.
#[track_caller]
fn assert_nothing_or_error(reply: &[u8], what: &str) {
    if let Some(&first) = reply.first() {
        assert_eq!(
            first,
            b'E',
            "{what}: the pooler answered something other than an ErrorResponse: {:?}",
            String::from_utf8_lossy(reply)
        );
    }
}

/// The reply must hold an ErrorResponse with one of `codes`. For protocol
/// 2.0, an old-style error ('E' and a NUL-terminated text, what PostgreSQL
/// itself sends to a 2.0 client) is accepted too.
#[track_caller]
fn assert_error_with_code(reply: &[u8], codes: &[&str], what: &str) -> ErrorFields {
    let msgs = split_messages(reply);
    if msgs.is_empty() && reply.first() == Some(&b'E') && reply.last() == Some(&0) {
        let text = String::from_utf8_lossy(&reply[1..reply.len() - 1]).into_owned();
        assert!(text.contains("odissey:"), "{what}: {text:?}");
        return ErrorFields {
            severity: "FATAL".into(),
            code: String::new(),
            message: text,
        };
    }
    let Some((tag, body)) = msgs.first() else {
        panic!(
            "{what}: expected an ErrorResponse before the close, got {:?}",
            String::from_utf8_lossy(reply)
        );
    };
    assert_eq!(*tag, b'E', "{what}: {:?}", String::from_utf8_lossy(reply));
    let f = parse_error_fields(body);
    assert!(
        codes.contains(&f.code.as_str()),
        "{what}: expected SQLSTATE in {codes:?}, got {f:?}"
    );
    assert!(f.message.starts_with("odissey:"), "{what}: {f:?}");
    assert_eq!(f.severity, "FATAL", "{what}: {f:?}");
    f
}

/// Bullet 7: garbage, HTTP, an oversized startup length and protocol 2.0
/// each get (at most) an ErrorResponse and a closed connection; the
/// pooler keeps serving.
#[test]
fn garbage_input_closes_the_connection() {
    let _w = watchdog("garbage_input_closes_the_connection", LIMIT);
    let pg = PgCluster::start();
    let (_handle, port) = start_pooler(&trust_config(&pg));
    assert_still_serving(port, "start");

    // 4 KB of pseudo-random bytes, with a few seeds.
    for seed in [0x0dd1_55e7_u64, 42, 0xdead_beef] {
        let what = format!("4 KB of random bytes (seed {seed:#x})");
        let reply = send_and_read_until_closed(port, &pseudo_random_bytes(4096, seed), &what);
        assert_nothing_or_error(&reply, &what);
        assert_still_serving(port, &what);
    }

    // HTTP.
    let what = "an HTTP request";
    let reply = send_and_read_until_closed(
        port,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n",
        what,
    );
    assert_nothing_or_error(&reply, what);
    assert!(
        !reply.starts_with(b"HTTP"),
        "the pooler must not speak HTTP: {:?}",
        String::from_utf8_lossy(&reply)
    );
    assert_still_serving(port, what);

    // An oversized startup packet length.
    let what = "a startup packet of length 0x7fffffff";
    let mut msg = 0x7fff_ffffu32.to_be_bytes().to_vec();
    msg.extend_from_slice(&196_608u32.to_be_bytes());
    let reply = send_and_read_until_closed(port, &msg, what);
    assert_error_with_code(&reply, &["0A000", "08P01"], what);
    assert_still_serving(port, what);

    // A startup packet too short to hold a protocol version.
    let what = "a startup packet of length 4";
    let reply = send_and_read_until_closed(port, &[0, 0, 0, 4], what);
    assert_nothing_or_error(&reply, what);
    assert_still_serving(port, what);

    // Protocol 2.0: the old fixed-size 296-byte startup packet.
    let what = "a protocol 2.0 startup packet";
    let mut msg = Vec::with_capacity(296);
    msg.extend_from_slice(&296u32.to_be_bytes());
    msg.extend_from_slice(&0x0002_0000u32.to_be_bytes());
    let mut field = |value: &str, size: usize| {
        let mut f = value.as_bytes().to_vec();
        f.resize(size, 0);
        msg.extend_from_slice(&f);
    };
    field("test", 64); // database
    field("trust_user", 32); // user
    field("", 64); // options
    field("", 64); // unused
    field("", 64); // tty
    assert_eq!(msg.len(), 296);
    let reply = send_and_read_until_closed(port, &msg, what);
    assert_error_with_code(&reply, &["0A000", "08P01"], what);
    assert_still_serving(port, what);

    // Protocol 3.0 startup, then garbage instead of a message.
    let what = "garbage after a good login";
    let mut c = RawClient::login(port, "trust_user", "test")
        .unwrap_or_else(|e| panic!("raw login refused: {e:?}"));
    // A message of type 0xff with a nonsensical length.
    let _ = c.stream.write_all(&[0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    let reply = read_until_closed(&mut c.stream, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_nothing_or_error(&reply, what);
    assert_still_serving(port, what);

    // A startup packet that is never completed must not block others.
    let mut half = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    half.write_all(&[0, 0, 0, 40, 0, 3])
        .expect("write half a startup");
    assert_still_serving(port, "a half-written startup packet on another connection");
    drop(half);
    assert_still_serving(port, "the half-written startup connection closing");
}

/// SSLRequest (what libpq sends first with the default sslmode=prefer) is
/// declined with 'N', and the login then proceeds in clear.
#[test]
fn ssl_request_is_declined_and_login_proceeds() {
    let _w = watchdog("ssl_request_is_declined_and_login_proceeds", LIMIT);
    let pg = PgCluster::start();
    let (_handle, port) = start_pooler(&trust_config(&pg));

    let mut c = RawClient::tcp(port);
    c.stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .expect("write SSLRequest");
    let mut answer = [0u8; 1];
    std::io::Read::read_exact(&mut c.stream, &mut answer).expect("read the SSLRequest answer");
    assert_eq!(answer[0], b'N', "expected 'N' to an SSLRequest");
    c.send_startup(&[("user", "trust_user"), ("database", "test")]);
    c.finish_login()
        .unwrap_or_else(|e| panic!("login after SSLRequest refused: {e:?}"));
    let out = c.query("select 40 + 2");
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.rows, vec![vec![Some("42".to_string())]]);
    assert_eq!(out.status, b'I');
    c.terminate();
}

/// Bullet 8: a wrong password gets 28P01, an unknown route 28000, and the
/// pooler keeps serving.
#[test]
fn wrong_password_and_unknown_route_are_refused() {
    let _w = watchdog("wrong_password_and_unknown_route_are_refused", LIMIT);
    let pg = PgCluster::start();
    let config = trust_config(&pg)
        .route(
            Route::new("test", "md5_user")
                .md5("client-pw")
                .storage_password("md5_pass")
                .transaction(),
        )
        .route(
            Route::new("test", "scram_user")
                .clear_text("client-pw")
                .storage_password("scram_pass")
                .session(),
        );
    let (handle, port) = start_pooler(&config);

    for (user, what) in [("md5_user", "md5"), ("scram_user", "clear text")] {
        for wrong in ["wrong", "", "client-pw ", "CLIENT-PW"] {
            let e = expect_code(
                try_connect(port, "test", user, Some(wrong)),
                &SqlState::INVALID_PASSWORD,
                &format!("{what} route {user} with password {wrong:?}"),
            );
            assert_pooler_fatal(&e, what);
        }
        // The right one still works.
        let mut c = connect(port, "test", user, Some("client-pw"));
        assert_eq!(scalar(&mut c, "select current_user").as_deref(), Some(user));
    }

    // No password at all where one is required.
    let e = try_connect(port, "test", "md5_user", None)
        .err()
        .expect("md5 route without a password must fail");
    // The postgres crate reports a missing password itself (not a db error).
    assert!(
        e.as_db_error().is_none() || e.code() == Some(&SqlState::INVALID_PASSWORD),
        "{}",
        describe(&e)
    );

    // Unknown user, unknown database, both: no default route configured.
    for (db, user) in [
        ("test", "nobody"),
        ("nodb", "trust_user"),
        ("nodb", "nobody"),
        ("test", "postgres"),
    ] {
        let what = format!("unknown route {db}/{user}");
        let e = expect_code(
            try_connect(port, db, user, None),
            &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            &what,
        );
        assert_pooler_fatal(&e, &what);
    }

    // The raw client sees the same, and the connection is then closed.
    let mut raw = RawClient::tcp(port);
    raw.send_startup(&[("user", "nobody"), ("database", "test")]);
    let err = raw
        .finish_login()
        .expect_err("unknown route must be refused");
    assert_eq!(err.code, "28000", "{err:?}");
    assert_eq!(err.severity, "FATAL", "{err:?}");
    read_until_closed(&mut raw.stream, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("after a refused login: {e}"));

    // No server connection was opened for refused clients.
    assert_eq!(pg.backends("nobody"), 0);
    assert_still_serving(port, "refused logins");
    let i = handle.inspect().expect("inspect");
    assert!(i.route("test", "nobody").is_none(), "{i:?}");
}

/// Bullet 10: client_max = 2: the third concurrent client gets 53300.
#[test]
fn client_max_refuses_the_extra_client() {
    let _w = watchdog("client_max_refuses_the_extra_client", LIMIT);
    let pg = PgCluster::start();
    let (handle, port) = start_pooler(&trust_config(&pg).client_max(2));

    let mut a = connect(port, "test", "trust_user", None);
    let mut b = connect(port, "test", "trust_user", None);
    assert_eq!(scalar(&mut a, "select 1").as_deref(), Some("1"));
    assert_eq!(scalar(&mut b, "select 2").as_deref(), Some("2"));
    assert_eq!(handle.inspect().expect("inspect").clients, 2);

    for attempt in 0..3 {
        let e = expect_code(
            try_connect(port, "test", "trust_user", None),
            &SqlState::TOO_MANY_CONNECTIONS,
            &format!("third client, attempt {attempt}"),
        );
        assert_pooler_fatal(&e, "client_max");
    }
    // The refused clients are not counted, the admitted ones still work.
    assert_eq!(handle.inspect().expect("inspect").clients, 2);
    assert_eq!(scalar(&mut a, "select 3").as_deref(), Some("3"));
    assert_eq!(scalar(&mut b, "select 4").as_deref(), Some("4"));

    // A slot frees up when a client leaves.
    drop(a);
    let mut c = connect_eventually(port, "test", "trust_user", None, Duration::from_secs(5));
    assert_eq!(scalar(&mut c, "select 5").as_deref(), Some("5"));
    expect_code(
        try_connect(port, "test", "trust_user", None),
        &SqlState::TOO_MANY_CONNECTIONS,
        "third client after a swap",
    );
    drop(b);
    drop(c);
}

/// Issue 7: every message type with its length off by one, zero, negative
/// and huge, after a good login: the pooler answers with an error or
/// closes the connection, and goes on serving everyone else.
#[test]
fn every_message_type_with_bad_lengths() {
    let _w = watchdog(
        "every_message_type_with_bad_lengths",
        Duration::from_secs(120),
    );
    let pg = PgCluster::start();
    let (_handle, port) = start_pooler(&trust_config(&pg));
    // A body that is well formed for most tags.
    let body: &[u8] = b"SELECT 1\0\0\0";
    for tag in *b"QPBDESHXCdcfFp" {
        let good_len = (body.len() + 4) as u32;
        for (what, len, send_body, then_eof) in [
            ("zero", 0u32, false, false),
            ("three", 3, false, false),
            ("negative", 0xffff_fff0, false, false),
            ("huge", 0x7fff_fff0, false, false),
            ("one short", good_len - 1, true, false),
            ("one long, then EOF", good_len + 1, true, true),
        ] {
            let label = format!("{:?} with length {what}", tag as char);
            let mut c = RawClient::login(port, "trust_user", "test")
                .unwrap_or_else(|e| panic!("raw login refused: {e:?}"));
            let mut msg = vec![tag];
            msg.extend_from_slice(&len.to_be_bytes());
            if send_body {
                msg.extend_from_slice(body);
            }
            // A correct query behind it must not be mistaken for part of it.
            msg.extend_from_slice(b"Q\0\0\0\x0dSELECT 2\0");
            let _ = c.stream.write_all(&msg);
            if then_eof {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
            // Whatever comes back ends with the connection closed or with
            // the connection still in protocol (an error, or replies); it
            // never hangs the pooler.
            c.stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut got = Vec::new();
            let mut chunk = [0u8; 4096];
            let closed = loop {
                match std::io::Read::read(&mut c.stream, &mut chunk) {
                    Ok(0) => break true,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                    Err(_) => break false,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            };
            let errors: Vec<_> = split_messages(&got)
                .into_iter()
                .filter(|(t, _)| *t == b'E')
                .map(|(_, b)| parse_error_fields(&b))
                .collect();
            // Every variant is malformed (a bad length, or a body that does
            // not fit it), so the client must hear of it or be let go.
            assert!(
                closed || !errors.is_empty(),
                "{label}: neither an error nor the end of the connection: {:?}",
                String::from_utf8_lossy(&got)
            );
            for e in &errors {
                assert_eq!(e.code.len(), 5, "{label}: {e:?}");
            }
            assert_still_serving(port, &label);
        }
    }
}
