//! End-to-end tests of the pooler facing bad input: garbage bytes, broken
//! startup packets, wrong passwords, unknown routes, too many clients, and
//! a hostile server sending malformed messages.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

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

/// Bullet 8: a wrong password gets 28P01, and so does an unknown route
/// (issue 13: after the same password request, so that users cannot be
/// enumerated), and the pooler keeps serving.
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
    // Asked for a password like a known user (the method of the database's
    // first password route, md5 here), and refused like a wrong one.
    for (db, user) in [
        ("test", "nobody"),
        ("nodb", "trust_user"),
        ("nodb", "nobody"),
        ("test", "postgres"),
    ] {
        let what = format!("unknown route {db}/{user}");
        let e = expect_code(
            try_connect(port, db, user, Some("client-pw")),
            &SqlState::INVALID_PASSWORD,
            &what,
        );
        assert_pooler_fatal(&e, &what);
        assert!(
            describe(&e).contains(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{what}: {}",
            describe(&e)
        );
    }

    // The raw client sees the md5 request, then the same error, and the
    // connection is then closed.
    let mut raw = RawClient::tcp(port);
    raw.send_startup(&[("user", "nobody"), ("database", "test")]);
    let (tag, body) = raw.read_msg().expect("the password request");
    assert_eq!((tag, &body[..4]), (b'R', &5u32.to_be_bytes()[..]));
    let answer = b"md5000000000000000000000000000000000\0";
    let mut msg = vec![b'p'];
    msg.extend_from_slice(&(answer.len() as u32 + 4).to_be_bytes());
    msg.extend_from_slice(answer);
    raw.send(&msg);
    let err = raw
        .finish_login()
        .expect_err("unknown route must be refused");
    assert_eq!(err.code, "28P01", "{err:?}");
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

// ---------------------------------------------------------------------------
// The server side: a hostile fake backend
// ---------------------------------------------------------------------------
//
// PostgreSQL never sends a malformed message, so the hostile server is a
// listener in this process that logs the pooler in (or not) and answers
// with whatever a case asks for. It stands in for a broken or malicious
// server, not for PostgreSQL's behaviour.

/// The query the fake server answers with its hostile bytes.
const MARKER: &str = "select 'hostile'";
/// Filler sent after a huge length, to see whether the pooler takes it in:
/// a pooler that buffered the message would read all of it; one that
/// rejects the header closes the socket long before (the kernel buffers
/// a few MiB at most).
const FILL: usize = 32 << 20;
/// How soon the pooler must have told the client and dropped the server.
const QUICK: Duration = Duration::from_secs(2);
/// How long the fake server waits for the pooler to close a connection
/// it sent hostile bytes on.
const GIVE_UP: Duration = Duration::from_secs(3);
/// How long it waits when the pooler is expected to relay, not close.
const GIVE_UP_STREAMED: Duration = Duration::from_millis(300);

/// Bytes the fake server sends: `head`, then (with `fill`) [`FILL`] bytes
/// of filler, then `tail`.
#[derive(Debug, Clone, Default)]
struct Hostile {
    head: Vec<u8>,
    fill: bool,
    tail: Vec<u8>,
}

/// What one connection of the fake server does.
#[derive(Debug, Clone)]
struct Script {
    /// Sent in answer to the startup packet instead of a good login.
    login: Option<Hostile>,
    /// Sent in answer to [`MARKER`] instead of a good reply.
    reply: Option<Hostile>,
    /// Sent a moment after a good reply to [`MARKER`], while the connection
    /// sits idle in the pool.
    idle: Option<Vec<u8>>,
    /// How long to wait for the pooler to close after the hostile bytes.
    give_up: Duration,
}

impl Default for Script {
    /// A well-behaved server.
    fn default() -> Self {
        Self {
            login: None,
            reply: None,
            idle: None,
            give_up: GIVE_UP,
        }
    }
}

/// What the fake server saw after its hostile bytes.
#[derive(Debug)]
struct Seen {
    /// The pooler closed the connection before the fake server gave up.
    by_pooler: bool,
    /// The pooler stopped reading without closing (a write timed out).
    stalled: bool,
    /// From the first hostile byte to the close (or to giving up).
    after: Duration,
    /// Filler bytes written before the close.
    filled: usize,
}

/// A listener on 127.0.0.1 whose connections follow the queued scripts,
/// one each (a well-behaved server when none is queued). CancelRequests
/// are read and dropped without taking a script.
struct FakeServer {
    port: u16,
    scripts: Arc<Mutex<VecDeque<Script>>>,
    seen: mpsc::Receiver<Seen>,
    /// Connections that got past the startup packet.
    logins: Arc<AtomicUsize>,
}

impl FakeServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake server: bind");
        let port = listener.local_addr().expect("fake server: address").port();
        let scripts = Arc::new(Mutex::new(VecDeque::<Script>::new()));
        let logins = Arc::new(AtomicUsize::new(0));
        let (tx, seen) = mpsc::channel();
        let (queue, count) = (Arc::clone(&scripts), Arc::clone(&logins));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (queue, count, tx) = (Arc::clone(&queue), Arc::clone(&count), tx.clone());
                thread::spawn(move || serve_fake(stream, &queue, &count, &tx));
            }
        });
        Self {
            port,
            scripts,
            seen,
            logins,
        }
    }

    fn push(&self, script: Script) {
        self.scripts.lock().expect("scripts").push_back(script);
    }

    /// The report of the connection that ran a hostile script.
    fn wait_seen(&self, what: &str) -> Seen {
        self.seen
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{what}: the fake server reported nothing: {e}"))
    }

    fn logins(&self) -> usize {
        self.logins.load(Ordering::SeqCst)
    }
}

fn serve_fake(
    mut s: TcpStream,
    queue: &Mutex<VecDeque<Script>>,
    logins: &AtomicUsize,
    seen: &mpsc::Sender<Seen>,
) {
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    // Startup packet; an SSLRequest gets 'N' first.
    let code = loop {
        let mut head = [0u8; 8];
        if s.read_exact(&mut head).is_err() {
            return;
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let mut rest = vec![0u8; len.saturating_sub(8).min(10_000)];
        if s.read_exact(&mut rest).is_err() {
            return;
        }
        if code == 80_877_103 {
            let _ = s.write_all(b"N");
            continue;
        }
        break code;
    };
    if code == 80_877_102 {
        return; // CancelRequest: nothing runs here to cancel.
    }
    logins.fetch_add(1, Ordering::SeqCst);
    let script = queue
        .lock()
        .expect("scripts")
        .pop_front()
        .unwrap_or_default();
    if let Some(h) = &script.login {
        let _ = seen.send(send_hostile(&mut s, h, script.give_up));
        return;
    }
    if s.write_all(&good_login()).is_err() {
        return;
    }
    let _ = s.set_read_timeout(None);
    loop {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).is_err() {
            return;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4).min(1 << 20)];
        if s.read_exact(&mut body).is_err() {
            return;
        }
        match head[0] {
            b'Q' if body.strip_suffix(b"\0") == Some(MARKER.as_bytes()) => {
                if let Some(h) = &script.reply {
                    let _ = seen.send(send_hostile(&mut s, h, script.give_up));
                    return;
                }
                if s.write_all(&good_reply()).is_err() {
                    return;
                }
                if let Some(garbage) = &script.idle {
                    // Transaction pooling has put the connection back in
                    // the pool by now.
                    thread::sleep(Duration::from_millis(200));
                    let h = Hostile {
                        head: garbage.clone(),
                        ..Hostile::default()
                    };
                    let _ = seen.send(send_hostile(&mut s, &h, script.give_up));
                    return;
                }
            }
            // odissey's own queries (settings for a new owner, resets).
            b'Q' => {
                let mut out = msg(b'C', b"SET\0");
                out.extend(msg(b'Z', b"I"));
                if s.write_all(&out).is_err() {
                    return;
                }
            }
            b'X' => return,
            _ => {}
        }
    }
}

/// Sends `h` and waits up to `give_up` for the pooler to close the socket.
fn send_hostile(s: &mut TcpStream, h: &Hostile, give_up: Duration) -> Seen {
    let start = Instant::now();
    let gone = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
        )
    };
    let mut closed = false;
    let mut stalled = false;
    let mut filled = 0;
    match s.write_all(&h.head) {
        Ok(()) => {}
        Err(e) if gone(&e) => closed = true,
        Err(_) => stalled = true,
    }
    if h.fill && !closed && !stalled {
        let chunk = vec![b'x'; 1 << 20];
        while filled < FILL {
            match s.write(&chunk[..(FILL - filled).min(chunk.len())]) {
                Ok(n) => filled += n,
                Err(e) if gone(&e) => {
                    closed = true;
                    break;
                }
                Err(_) => {
                    stalled = true;
                    break;
                }
            }
        }
    }
    if !closed && !stalled {
        match s.write_all(&h.tail) {
            Ok(()) => {}
            Err(e) if gone(&e) => closed = true,
            Err(_) => stalled = true,
        }
    }
    if !closed {
        // Anything the pooler still sends (a Terminate) is read and
        // dropped until the end of the stream.
        let mut buf = [0u8; 4096];
        closed = loop {
            let left = give_up.saturating_sub(start.elapsed());
            if left.is_zero() {
                break false;
            }
            let _ = s.set_read_timeout(Some(left));
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => {}
                Err(e) if gone(&e) => break true,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
    }
    let seen = Seen {
        by_pooler: closed,
        stalled,
        after: start.elapsed(),
        filled,
    };
    let _ = s.shutdown(Shutdown::Both);
    seen
}

/// One backend message.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// AuthenticationOk.
fn auth_ok() -> Vec<u8> {
    msg(b'R', &0u32.to_be_bytes())
}

/// What follows AuthenticationOk in a good login.
fn login_rest() -> Vec<u8> {
    let mut m = msg(b'S', b"client_encoding\0UTF8\0");
    m.extend(msg(b'S', b"server_version\0hostile 1.0\0"));
    m.extend(msg(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]));
    m.extend(msg(b'Z', b"I"));
    m
}

fn good_login() -> Vec<u8> {
    let mut m = auth_ok();
    m.extend(login_rest());
    m
}

/// A one-row answer to [`MARKER`]: 'ok'.
fn good_reply() -> Vec<u8> {
    let mut m = msg(b'T', &real_body(b'T'));
    m.extend(msg(b'D', &[0, 1, 0, 0, 0, 2, b'o', b'k']));
    m.extend(msg(b'C', b"SELECT 1\0"));
    m.extend(msg(b'Z', b"I"));
    m
}

/// A well-formed body for each backend message type (and for the unknown
/// tag '!').
fn real_body(tag: u8) -> Vec<u8> {
    let mut b = Vec::new();
    match tag {
        b'R' => b.extend(0u32.to_be_bytes()),
        b'S' => b.extend(b"application_name\0hostile\0"),
        b'K' => b.extend([0, 0, 0, 42, 0, 0, 0, 7]),
        b'Z' => b.push(b'I'),
        b'T' => {
            b.extend(1u16.to_be_bytes());
            b.extend(b"x\0");
            b.extend(0u32.to_be_bytes()); // table
            b.extend(0u16.to_be_bytes()); // column
            b.extend(25u32.to_be_bytes()); // text
            b.extend((-1i16).to_be_bytes());
            b.extend((-1i32).to_be_bytes());
            b.extend(0u16.to_be_bytes());
        }
        b'D' => b.extend([0, 1, 0, 0, 0, 1, b'1']),
        b'C' => b.extend(b"SELECT 1\0"),
        b'E' => b.extend(b"SERROR\0VERROR\0C42000\0Mhostile error\0\0"),
        b'N' => b.extend(b"SNOTICE\0VNOTICE\0C00000\0Mhostile notice\0\0"),
        b'A' => {
            b.extend(42u32.to_be_bytes());
            b.extend(b"channel\0payload\0");
        }
        b'1' | b'2' | b'3' | b'n' | b's' | b'I' | b'c' => {}
        b't' => {
            b.extend(1u16.to_be_bytes());
            b.extend(25u32.to_be_bytes());
        }
        b'G' | b'H' | b'W' => {
            b.push(0);
            b.extend(1u16.to_be_bytes());
            b.extend(0u16.to_be_bytes());
        }
        b'd' => b.extend(b"1\n"),
        b'v' => {
            b.extend(0u32.to_be_bytes());
            b.extend(0u32.to_be_bytes());
        }
        _ => b.extend(b"unknown\0"),
    }
    b
}

/// Every backend message type the pooler may see, and one no server sends.
const BACKEND_TAGS: &[u8] = b"RSKZTDCENA123nstGHWdcIv!";

/// The length fields tried: name, value (None: the real one plus or minus
/// one), whether filler follows the header.
fn bad_lengths(body_len: usize) -> Vec<(&'static str, u32, bool)> {
    let real = (body_len + 4) as u32;
    vec![
        ("zero", 0, false),
        ("three", 3, false),
        ("negative 0x80000000", 0x8000_0000, true),
        ("negative 0xffffffff", 0xffff_ffff, true),
        ("huge 0x7fffffff", 0x7fff_ffff, true),
        ("1 GiB", 1 << 30, true),
        ("one more", real + 1, false),
        ("one less", real - 1, false),
    ]
}

/// The message `tag` with length field `len`: the header alone, or with
/// the real body when the length is off by one.
fn bad_message(tag: u8, len: u32) -> Vec<u8> {
    let body = real_body(tag);
    let real = (body.len() + 4) as u32;
    let mut m = vec![tag];
    m.extend(len.to_be_bytes());
    if len == real + 1 || len == real - 1 {
        m.extend(body);
    }
    m
}

/// What a client through the pooler got.
#[derive(Debug, Default)]
struct Saw {
    /// Whole messages, up to the first one with an odd length.
    msgs: Vec<(u8, Vec<u8>)>,
    /// The first header whose length is under 4 or over 1 MiB, and how
    /// many bytes came after it.
    odd: Option<(u8, u32)>,
    after_odd: usize,
    /// The login was answered with ReadyForQuery (and the marker sent).
    logged_in: bool,
    /// The pooler closed the connection, or sent a FATAL error (the client
    /// then leaves, as libpq does, rather than wait out the pooler's
    /// linger); else the read timed out.
    ended: bool,
    elapsed: Duration,
}

impl Saw {
    /// The pooler's own errors ("odissey: ...").
    fn pooler_errors(&self) -> Vec<ErrorFields> {
        self.msgs
            .iter()
            .filter(|(t, _)| *t == b'E')
            .map(|(_, b)| parse_error_fields(b))
            .filter(|e| e.message.starts_with("odissey:"))
            .collect()
    }
}

/// Logs in to the hostile route, sends [`MARKER`] once logged in, and reads
/// until the pooler closes the connection or sends a FATAL error, or
/// `timeout` passes.
fn hostile_client(port: u16, timeout: Duration) -> Saw {
    let start = Instant::now();
    let mut c = RawClient::tcp(port);
    c.send_startup(&[("user", "evil"), ("database", "hostile")]);
    let mut saw = Saw::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    while !saw.ended {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        c.stream
            .set_read_timeout(Some(left))
            .expect("set_read_timeout");
        let n = match c.stream.read(&mut chunk) {
            Ok(0) => {
                saw.ended = true;
                break;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                saw.ended = true;
                break;
            }
            Err(_) => break,
        };
        if saw.odd.is_some() {
            saw.after_odd += n;
            continue;
        }
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            if !(4..=1 << 20).contains(&len) {
                saw.odd = Some((buf[0], len));
                saw.after_odd = buf.len() - 5;
                buf.clear();
                break;
            }
            let total = len as usize + 1;
            if buf.len() < total {
                break;
            }
            let m: Vec<u8> = buf.drain(..total).collect();
            if m[0] == b'Z' && !saw.logged_in {
                saw.logged_in = true;
                c.send_query(MARKER);
            }
            if m[0] == b'E' {
                let e = parse_error_fields(&m[5..]);
                saw.ended |= e.severity == "FATAL" && e.message.starts_with("odissey:");
            }
            saw.msgs.push((m[0], m[5..].to_vec()));
        }
    }
    saw.elapsed = start.elapsed();
    saw
}

/// The peak resident memory of this process (the pooler runs in it), KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The pooler with a route to a real PostgreSQL (`test`/`trust_user`) and a
/// route to the fake server (`hostile`/`evil`, transaction pooling, one
/// server connection at most).
fn hostile_pooler(pg: &PgCluster, fake: &FakeServer) -> (Handle, u16) {
    let mut toml = trust_config(pg).toml();
    toml.push_str(&format!(
        "\n[storage.fake]\ntype = \"remote\"\nhost = \"127.0.0.1\"\nport = {}\n\
         \n[database.hostile.user.evil]\nauthentication = \"none\"\nstorage = \"fake\"\n\
         pool = \"transaction\"\npool_size = 1\n",
        fake.port
    ));
    start_pooler_from(ConfigSource::Toml(toml))
}

/// Issue 7, server side: every backend message type with lengths zero,
/// three, negative, huge, 1 GiB and off by one, during the server login
/// and as the reply to a query. The client gets a FATAL error of class 08
/// within seconds, the pooler drops that server connection without reading
/// a huge message in, and a client of a real PostgreSQL on another route
/// is served throughout. The exception: a DataRow, RowDescription,
/// CopyData, error, notice or notification of 1 GiB may be real, and is
/// relayed as it comes (not buffered); when that server then goes away,
/// the client's connection just ends (an error would land inside the
/// message).
#[test]
fn every_server_message_type_with_bad_lengths() {
    let _w = watchdog(
        "every_server_message_type_with_bad_lengths",
        Duration::from_secs(120),
    );
    let started = Instant::now();
    let pg = PgCluster::start();
    let fake = FakeServer::start();
    let (_handle, port) = hostile_pooler(&pg, &fake);
    let mut before = connect(port, "test", "trust_user", None);
    assert_eq!(
        scalar(&mut before, "select 'alive'").as_deref(),
        Some("alive")
    );
    let rss_before = peak_rss_kib();

    // Outcome -> cases, for the report.
    let mut outcomes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    for phase in ["login", "reply"] {
        for &tag in BACKEND_TAGS {
            for (what, len, fill) in bad_lengths(real_body(tag).len()) {
                let label = format!("{phase}: {:?} with length {what}", tag as char);
                let bad = bad_message(tag, len);
                let h = if phase == "login" {
                    // AuthenticationOk first, except when it is the bad one.
                    let mut head = if tag == b'R' { Vec::new() } else { auth_ok() };
                    head.extend(bad);
                    Hostile {
                        head,
                        fill,
                        tail: login_rest(),
                    }
                } else {
                    Hostile {
                        head: bad,
                        fill,
                        tail: msg(b'Z', b"I"),
                    }
                };
                // A DataRow, RowDescription, CopyData, error, notice or
                // notification of 1 GiB is within what PostgreSQL may send:
                // the pooler relays it as it comes instead of closing.
                let streamed = phase == "reply" && len == 1 << 30 && b"DTdENA".contains(&tag);
                let logins = fake.logins();
                fake.push(Script {
                    login: (phase == "login").then(|| h.clone()),
                    reply: (phase == "reply").then(|| h.clone()),
                    give_up: if streamed { GIVE_UP_STREAMED } else { GIVE_UP },
                    ..Script::default()
                });
                let saw = hostile_client(port, Duration::from_secs(8));
                let seen = fake.wait_seen(&label);
                let errors = saw.pooler_errors();
                let outcome = match errors.last() {
                    Some(e) => format!("{phase}: {} {}", e.severity, e.code),
                    None if saw.odd.is_some() && streamed => {
                        format!("{phase}: streamed, then close")
                    }
                    None => format!("{phase}: close without an error"),
                };
                outcomes.entry(outcome).or_default().push(label.clone());
                let mut problems = Vec::new();
                if !saw.ended {
                    problems.push(format!("the client is still open after {:?}", saw.elapsed));
                }
                for e in &errors {
                    if !["08", "58", "XX"].contains(&e.code.get(..2).unwrap_or(""))
                        || e.severity != "FATAL"
                    {
                        problems.push(format!("unexpected error {e:?}"));
                    }
                }
                if streamed {
                    if saw.after_odd != FILL + h.tail.len() {
                        problems.push(format!(
                            "{} bytes relayed after the 1 GiB header, expected {} and the end of the connection",
                            saw.after_odd,
                            FILL + h.tail.len()
                        ));
                    }
                } else {
                    if errors.is_empty() {
                        problems.push("no error from the pooler".to_string());
                    }
                    if saw.elapsed > QUICK {
                        problems.push(format!("the client waited {:?}", saw.elapsed));
                    }
                    if !seen.by_pooler || seen.after > QUICK {
                        problems.push(format!(
                            "the pooler kept the server connection (stalled: {}, {} filler bytes taken in {:?})",
                            seen.stalled, seen.filled, seen.after
                        ));
                    }
                    if fill && seen.filled >= FILL {
                        problems.push(format!("the pooler read all {FILL} filler bytes"));
                    }
                }
                if fake.logins() != logins + 1 {
                    problems.push(format!(
                        "{} server logins instead of one",
                        fake.logins() - logins
                    ));
                }
                if let Err(e) = try_connect(port, "test", "trust_user", None)
                    .and_then(|mut c| c.simple_query("select 1"))
                {
                    problems.push(format!("a new PostgreSQL client failed: {}", describe(&e)));
                }
                if let Err(e) = before.simple_query("select 1") {
                    problems.push(format!(
                        "the PostgreSQL client connected before failed: {}",
                        describe(&e)
                    ));
                }
                if !problems.is_empty() {
                    let failure = format!(
                        "{label}: {}\n    client saw {saw:?}\n    server saw {seen:?}",
                        problems.join("; ")
                    );
                    // At once too: a watchdog abort would lose the list.
                    eprintln!("FAILED {failure}");
                    failures.push(failure);
                }
            }
        }
    }
    let rss_growth = peak_rss_kib().saturating_sub(rss_before);
    for (outcome, cases) in &outcomes {
        eprintln!("{outcome}: {} case(s): {}", cases.len(), cases.join(", "));
    }
    eprintln!(
        "{} cases in {:?}; peak RSS grew by {rss_growth} KiB",
        outcomes.values().map(Vec::len).sum::<usize>(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} failing case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        rss_growth < 256 * 1024,
        "peak RSS grew by {rss_growth} KiB: the pooler buffered a huge message"
    );
}

/// A server that answers well, then sends something while it sits idle in
/// the pool: garbage, or a message no idle server sends. The pooler closes
/// it, and the next client (and the same one) gets a fresh server that
/// works.
#[test]
fn garbage_from_an_idle_server_closes_it() {
    let _w = watchdog(
        "garbage_from_an_idle_server_closes_it",
        Duration::from_secs(60),
    );
    let pg = PgCluster::start();
    let fake = FakeServer::start();
    let (handle, port) = hostile_pooler(&pg, &fake);
    let mut before = connect(port, "test", "trust_user", None);
    let mut notice_then_garbage = msg(b'N', &real_body(b'N'));
    notice_then_garbage.extend(b"\xff\xff\xff\xff\xffgarbage");
    // What closes the fresh servers again, so that each round starts with
    // none in the pool: PostgreSQL's own way of leaving an idle session.
    let shutdown = msg(
        b'E',
        b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0",
    );
    let ok = vec![vec![Some("ok".to_string())]];
    for (what, garbage) in [
        (
            "a notice, then a header of length 0xffffffff",
            notice_then_garbage,
        ),
        ("a DataRow nobody asked for", msg(b'D', &real_body(b'D'))),
        ("a ReadyForQuery nobody asked for", msg(b'Z', b"I")),
        ("64 random bytes", pseudo_random_bytes(64, 7)),
    ] {
        let logins = fake.logins();
        fake.push(Script {
            idle: Some(garbage),
            ..Script::default()
        });
        let mut c = RawClient::login(port, "evil", "hostile")
            .unwrap_or_else(|e| panic!("{what}: login refused: {e:?}"));
        assert_eq!(c.query(MARKER).rows, ok, "{what}");
        let seen = fake.wait_seen(what);
        assert!(
            seen.by_pooler && seen.after < Duration::from_secs(2),
            "{what}: the pooler kept the idle server: {seen:?}"
        );

        // A new client, then the first one again: each gets a fresh server
        // (the fake's connection count says so) that answers.
        for (i, client) in ["a new client", "the same client"].into_iter().enumerate() {
            fake.push(Script {
                idle: Some(shutdown.clone()),
                ..Script::default()
            });
            let out = if i == 0 {
                let mut d = RawClient::login(port, "evil", "hostile")
                    .unwrap_or_else(|e| panic!("{what}: {client}: login refused: {e:?}"));
                let out = d.query(MARKER);
                d.terminate();
                out
            } else {
                c.query(MARKER)
            };
            assert!(out.error.is_none(), "{what}: {client}: {:?}", out.error);
            assert_eq!(out.rows, ok, "{what}: {client}");
            let seen = fake.wait_seen(what);
            assert!(
                seen.by_pooler,
                "{what}: {client}: an idle server's FATAL error did not close it: {seen:?}"
            );
            assert_eq!(
                fake.logins(),
                logins + 2 + i,
                "{what}: {client}: not served by a fresh server"
            );
        }
        c.terminate();
        assert_eq!(
            scalar(&mut before, "select 'alive'").as_deref(),
            Some("alive"),
            "{what}"
        );
        assert_still_serving(port, what);
    }
    // The pooler counts no server of the hostile route any more.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let i = handle.inspect().expect("inspect");
        if servers_of_user(&i, "evil") == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "servers left: {i:?}");
        thread::sleep(Duration::from_millis(20));
    }
}
