//! Why a server connection could not be made, told as such: a name server
//! that does not answer (it must not stall the worker's other clients), a
//! name that does not resolve, a closed port, a host that does not accept,
//! a server that accepts and says nothing; and a client that stops half-way
//! through its own message is blamed for it. Each runs the `odissey` binary
//! and reads both the client's error and the log (stderr).
//!
//! The DNS cases run odissey as root in a private mount namespace
//! (`unshare --mount`) with a resolv.conf of their own bound over
//! /etc/resolv.conf, pointing at a loopback address where nothing answers.

mod common;

use std::fs::File;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use odissey_harness::TRUST_USER;

const BIN: &str = env!("CARGO_BIN_EXE_odissey");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A config with one listener on `port`, one worker, the given top-level
/// lines, storages (name, host, port) and routes (database, storage, extra
/// route lines); every route lets `trust_user` in with transaction pooling.
fn config(
    port: u16,
    globals: &[&str],
    storages: &[(&str, &str, u16)],
    routes: &[(&str, &str, &[&str])],
) -> String {
    let mut out = String::from("workers = 1\nlog_debug = false\n");
    for g in globals {
        out.push_str(&format!("{g}\n"));
    }
    out.push_str(&format!(
        "\n[[listen]]\nhost = \"127.0.0.1\"\nport = {port}\n"
    ));
    for (name, host, p) in storages {
        out.push_str(&format!(
            "\n[storage.{name}]\ntype = \"remote\"\nhost = \"{host}\"\nport = {p}\n"
        ));
    }
    for (db, storage, extra) in routes {
        out.push_str(&format!(
            "\n[database.{db}.user.{TRUST_USER}]\nauthentication = \"none\"\nstorage = \"{storage}\"\nstorage_db = \"test\"\npool = \"transaction\"\n"
        ));
        for l in *extra {
            out.push_str(&format!("{l}\n"));
        }
    }
    out
}

/// The running binary (stderr to `<dir>/stderr`); killed when dropped.
struct Pooler {
    child: Child,
    port: u16,
    stderr: std::path::PathBuf,
}

impl Pooler {
    /// Runs odissey on `config`; with `resolv_conf`, in a private mount
    /// namespace where that file is /etc/resolv.conf.
    fn start(dir: &Path, port: u16, config: &str, resolv_conf: Option<&Path>) -> Self {
        let path = dir.join("odissey.toml");
        std::fs::write(&path, config).unwrap();
        let stderr = dir.join("stderr");
        let mut cmd = match resolv_conf {
            None => Command::new(BIN),
            Some(rc) => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg("mount --bind \"$1\" /etc/resolv.conf && exec \"$2\" \"$3\"")
                    .arg("sh")
                    .arg(rc)
                    .arg(BIN);
                c
            }
        };
        cmd.arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap());
        let child = cmd.spawn().expect("spawn odissey");
        let mut p = Self {
            child,
            port,
            stderr,
        };
        p.wait_listening();
        p
    }

    /// Polls until the listener accepts; fails if odissey exited.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("odissey exited ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "odissey never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Polls the log until a line holds every one of `needles`.
    fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(l) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needles:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A resolv.conf naming `ns` as the only name server, asked `attempts`
/// times with `timeout` seconds each.
fn resolv_conf(dir: &Path, ns: &str, timeout: u32, attempts: u32) -> std::path::PathBuf {
    let path = dir.join("resolv.conf");
    let mut f = File::create(&path).unwrap();
    writeln!(
        f,
        "nameserver {ns}\noptions timeout:{timeout} attempts:{attempts}"
    )
    .unwrap();
    path
}

/// A name that /etc/hosts does not know: it must go to the name server.
const DNS_HOST: &str = "db.invalid.test";

/// The lookup of one storage's host name hangs (its name server never
/// answers): the worker's clients of another storage, at 127.0.0.1, are
/// served meanwhile with their usual latency, and the client that waits
/// for the name is told the lookup timed out, naming the host.
#[test]
fn a_silent_name_server_stalls_no_other_client() {
    let _w = watchdog("silent name server", Duration::from_secs(90));
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    // A name server that receives and never answers (no ICMP error
    // either: the port is bound).
    let ns = UdpSocket::bind("127.0.0.77:53").expect("bind 127.0.0.77:53 (run as root)");
    ns.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // glibc gives up after 2 x 2 s; odissey's own limit (the
    // server_connect_timeout of 3 s here) comes first.
    let rc = resolv_conf(dir.path(), "127.0.0.77", 2, 2);
    let port = free_port();
    let text = config(
        port,
        &["server_connect_timeout = 3000"],
        &[("near", "127.0.0.1", pg.port()), ("far", DNS_HOST, 5432)],
        &[("near", "near", &[]), ("far", "far", &[])],
    );
    let p = Pooler::start(dir.path(), port, &text, Some(&rc));
    let mut near = connect(port, "near", TRUST_USER, None);
    assert_eq!(scalar(&mut near, "select 1").as_deref(), Some("1"));

    // The far client's login needs a server: its host name is looked up.
    let t0 = Instant::now();
    let far = std::thread::spawn(move || {
        let outcome = try_connect(port, "far", TRUST_USER, None).map(|_| ());
        (outcome, t0.elapsed())
    });
    // The name server got the query: the lookup runs from now on.
    let mut buf = [0u8; 512];
    let (n, _) = ns.recv_from(&mut buf).expect("no DNS query arrived");
    assert!(n > 12, "a DNS query");

    let mut worst = Duration::ZERO;
    for i in 0..50 {
        let q0 = Instant::now();
        let got = scalar(&mut near, &format!("select {i}"));
        worst = worst.max(q0.elapsed());
        assert_eq!(got, Some(i.to_string()));
    }
    eprintln!("slowest of 50 queries during the lookup: {worst:?}");
    assert!(
        !far.is_finished(),
        "the far client was answered before the 50 queries ended: the lookup did not overlap them"
    );
    assert!(worst < Duration::from_millis(100), "a query took {worst:?}");

    let (outcome, took) = far.join().unwrap();
    let e = outcome.expect_err("a host name that does not resolve let a client in");
    let said = describe(&e);
    assert_eq!(e.code().map(SqlState::code), Some("08006"), "{said}");
    assert!(
        said.contains(DNS_HOST) && said.contains("DNS lookup timed out after 3000 ms"),
        "{said}"
    );
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(8),
        "told after {took:?}"
    );
    p.wait_for_log(&[DNS_HOST, "DNS lookup timed out"]);

    // The failure is remembered a moment: the next client is told at once.
    let t1 = Instant::now();
    let e = try_connect(port, "far", TRUST_USER, None)
        .map(|_| ())
        .expect_err("let in");
    assert!(
        describe(&e).contains("DNS lookup timed out"),
        "{}",
        describe(&e)
    );
    assert!(t1.elapsed() < Duration::from_secs(1), "{:?}", t1.elapsed());
    // And the other storage still serves.
    assert_eq!(scalar(&mut near, "select 2").as_deref(), Some("2"));
}

/// A name server that refuses (nothing listens at its address: the
/// kernel answers with ICMP port unreachable) fails the lookup quickly,
/// and the client hears it was the DNS lookup of that host.
#[test]
fn a_name_that_does_not_resolve_is_named() {
    let _w = watchdog("unresolvable name", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let rc = resolv_conf(dir.path(), "127.0.0.78", 1, 1);
    let port = free_port();
    let text = config(
        port,
        &[],
        &[("far", DNS_HOST, 5432)],
        &[("far", "far", &[])],
    );
    let p = Pooler::start(dir.path(), port, &text, Some(&rc));
    let e = try_connect(port, "far", TRUST_USER, None)
        .map(|_| ())
        .expect_err("let in");
    let said = describe(&e);
    assert_eq!(e.code().map(SqlState::code), Some("08006"), "{said}");
    assert!(
        said.contains(&format!("{DNS_HOST}:5432")) && said.contains("DNS lookup failed"),
        "{said}"
    );
    p.wait_for_log(&[DNS_HOST, "DNS lookup failed"]);
}

/// PostgreSQL down (nothing listens on its port): "connection refused",
/// with the host and port, to the client and in the log.
#[test]
fn a_closed_port_is_connection_refused() {
    let _w = watchdog("connection refused", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let closed = free_port();
    let port = free_port();
    let text = config(
        port,
        &[],
        &[("down", "127.0.0.1", closed)],
        &[("down", "down", &[])],
    );
    let p = Pooler::start(dir.path(), port, &text, None);
    let e = try_connect(port, "down", TRUST_USER, None)
        .map(|_| ())
        .expect_err("let in");
    let said = describe(&e);
    let want = format!("cannot connect to the server 127.0.0.1:{closed}: connection refused");
    assert_eq!(e.code().map(SqlState::code), Some("08006"), "{said}");
    assert!(said.contains(&want), "{said}");
    p.wait_for_log(&[&want]);
}

/// A host whose kernel takes no more connections (its accept queue is
/// full: SYNs are dropped) and a server that accepts but never answers:
/// server_connect_timeout, named as a connect timeout and as a login
/// timeout, with the host and port.
#[test]
fn connect_and_login_timeouts_are_named() {
    let _w = watchdog("connect timeouts", Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    // Never accepted from: once its queue is full, connects hang.
    let full = TcpListener::bind("127.0.0.1:0").unwrap();
    let full_addr = full.local_addr().unwrap();
    let mut queued = Vec::new();
    loop {
        match TcpStream::connect_timeout(&full_addr, Duration::from_millis(200)) {
            Ok(s) => queued.push(s),
            Err(_) => break,
        }
        assert!(queued.len() < 10_000, "the accept queue never filled");
    }
    // Accepts (the kernel does) and says nothing.
    let mute = TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_port = mute.local_addr().unwrap().port();
    let port = free_port();
    let text = config(
        port,
        &["server_connect_timeout = 1000"],
        &[
            ("full", "127.0.0.1", full_addr.port()),
            ("mute", "127.0.0.1", mute_port),
        ],
        &[("full", "full", &[]), ("mute", "mute", &[])],
    );
    let p = Pooler::start(dir.path(), port, &text, None);
    let cases = [
        (
            "full",
            format!(
                "connecting to the server 127.0.0.1:{} timed out after 1000 ms (server_connect_timeout)",
                full_addr.port()
            ),
        ),
        (
            "mute",
            format!("the server 127.0.0.1:{mute_port} accepted the connection but did not complete the login within 1000 ms (server_connect_timeout)"),
        ),
    ];
    for (db, want) in cases {
        let t0 = Instant::now();
        let e = try_connect(port, db, TRUST_USER, None)
            .map(|_| ())
            .expect_err("let in");
        let said = describe(&e);
        assert_eq!(e.code().map(SqlState::code), Some("08006"), "{said}");
        assert!(said.contains(&want), "{said}");
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
        p.wait_for_log(&[&want]);
    }
    drop(queued);
}

/// A client that sends part of a Query and then nothing: its server waits
/// for the rest (PostgreSQL's backend would wait for ever), so at
/// query_timeout the client is closed with 08P01 and told it did not
/// finish its message; nothing blames the server.
#[test]
fn a_client_stalled_in_its_own_message_is_blamed() {
    let _w = watchdog("stalled client", Duration::from_secs(60));
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = config(
        port,
        &[],
        &[("main", "127.0.0.1", pg.port())],
        &[("stall", "main", &["query_timeout = 1"])],
    );
    let p = Pooler::start(dir.path(), port, &text, None);
    let mut c = RawClient::login(port, TRUST_USER, "stall").expect("login");
    assert_eq!(c.query("select 1").rows.len(), 1);
    // A Query announcing 100 bytes of text, of which 10 are sent.
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&104u32.to_be_bytes());
    msg.extend_from_slice(b"select 1; ");
    c.send(&msg);
    let t0 = Instant::now();
    let (tag, body) = c.read_msg().expect("an error before the end");
    assert_eq!(tag, b'E');
    let f = parse_error_fields(&body);
    assert_eq!(
        (f.severity.as_str(), f.code.as_str()),
        ("FATAL", "08P01"),
        "{f:?}"
    );
    assert!(
        f.message
            .contains("the client did not finish sending its message within query_timeout"),
        "{f:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    p.wait_for_log(&["did not finish sending its message"]);
    assert!(
        !p.log().contains("did not answer the query"),
        "the server was blamed:\n{}",
        p.log()
    );
    // The pool still serves.
    let mut other = RawClient::login(port, TRUST_USER, "stall").expect("login");
    assert_eq!(other.query("select 2").rows.len(), 1);
}
