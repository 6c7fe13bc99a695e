//! TLS over real loopback sockets: both ends non-blocking, driven by one
//! mio `Poll` with edge-triggered discipline (act on readiness until
//! WouldBlock, then wait for the next event), so a result that claims
//! WouldBlock while data is still due would stall a test rather than pass.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Interest, Poll, Token};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::{
    connect, ClientAuth, ClientTls, ClientTlsOptions, Listener, ListenerAddr, Protocols, ServerTls,
    ServerTlsOptions, SocketResult, Stream, TlsError, Verify,
};

// ---- certificates ---------------------------------------------------------

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ca {
        cert: params.self_signed(&key).unwrap(),
        key,
    }
}

/// A leaf signed by `ca`, written as `<name>.crt` / `<name>.key` in `dir`.
fn leaf(
    dir: &Path,
    name: &str,
    ca: &Ca,
    cn: &str,
    sans: &[&str],
    eku: ExtendedKeyUsagePurpose,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![eku];
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    write_pair(dir, name, &cert.pem(), &key.serialize_pem())
}

fn write_pair(dir: &Path, name: &str, cert: &str, key: &str) -> (PathBuf, PathBuf) {
    let c = dir.join(format!("{name}.crt"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

/// A CA, a server certificate for db.example.com and 127.0.0.1, a client
/// certificate for "alice", and an unrelated CA with a client of its own.
struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    stranger: (PathBuf, PathBuf),
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let main = ca("Odissey Test CA");
    let other = ca("Other CA");
    let ca_path = d.join("ca.crt");
    std::fs::write(&ca_path, main.cert.pem()).unwrap();
    let other_path = d.join("other-ca.crt");
    std::fs::write(&other_path, other.cert.pem()).unwrap();
    let server = leaf(
        d,
        "server",
        &main,
        "db.example.com",
        &["db.example.com", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let client = leaf(
        d,
        "client",
        &main,
        "alice",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let stranger = leaf(
        d,
        "stranger",
        &other,
        "mallory",
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    Pki {
        dir,
        ca: ca_path,
        other_ca: other_path,
        server,
        client,
        stranger,
    }
}

impl Pki {
    fn server_opts(&self) -> ServerTlsOptions {
        ServerTlsOptions {
            cert_file: self.server.0.clone(),
            key_file: self.server.1.clone(),
            ca_file: Some(self.ca.clone()),
            client_auth: ClientAuth::None,
            protocols: Protocols::default(),
        }
    }

    fn client_opts(&self, verify: Verify) -> ClientTlsOptions {
        ClientTlsOptions {
            verify,
            ca_file: Some(self.ca.clone()),
            cert_file: None,
            key_file: None,
            protocols: Protocols::default(),
        }
    }
}

// ---- sockets and the event loop -------------------------------------------

/// (accepted, connecting) ends of a loopback TCP connection.
fn tcp_pair() -> (Stream, Stream) {
    let l = Listener::bind_tcp("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let Ok(ListenerAddr::Tcp(addr)) = l.local_addr() else {
        panic!("not tcp")
    };
    let client = connect(addr).unwrap();
    for _ in 0..200 {
        if let Some((server, _)) = l.accept().unwrap() {
            return (server, client);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no connection accepted");
}

/// One end as an edge-triggered reactor sees it.
struct End {
    s: Stream,
    /// Plaintext received, not yet consumed by the test.
    inbuf: BytesMut,
    /// Plaintext to send.
    out: BytesMut,
    limit: usize,
    readable: bool,
    writable: bool,
    closed: bool,
    failed: Option<SocketResult>,
}

impl End {
    fn new(s: Stream, limit: usize) -> Self {
        Self {
            s,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            limit,
            readable: true,
            writable: true,
            closed: false,
            failed: None,
        }
    }

    fn done(&self) -> bool {
        self.closed || self.failed.is_some()
    }

    /// Reads and writes as far as readiness allows; true if anything moved.
    fn service(&mut self) -> bool {
        let mut progress = false;
        if self.done() {
            return false;
        }
        if self.writable && (!self.out.is_empty() || self.s.wants_write()) {
            let (n, r) = self.s.write_from(&mut self.out);
            progress |= n > 0;
            match r {
                SocketResult::Continue => {}
                SocketResult::WouldBlock => self.writable = false,
                r => self.failed = Some(r),
            }
        }
        if self.readable && self.inbuf.len() < self.limit && !self.done() {
            let was_handshaking = self.s.is_handshaking();
            let (n, r) = self.s.read_into(&mut self.inbuf, self.limit, false);
            progress |= n > 0;
            match r {
                SocketResult::Continue => {}
                SocketResult::WouldBlock => self.readable = false,
                SocketResult::Closed => self.closed = true,
                r => self.failed = Some(r),
            }
            if was_handshaking && !self.s.is_handshaking() {
                // As documented on write_from: plaintext refused during the
                // handshake is retried once it is over.
                self.writable = true;
                progress = true;
            }
        }
        progress
    }
}

struct Pair {
    poll: Poll,
    events: Events,
    /// [server, client].
    ends: [End; 2],
}

impl Pair {
    fn new(server: Stream, client: Stream, server_limit: usize, client_limit: usize) -> Self {
        let poll = Poll::new().unwrap();
        let mut ends = [
            End::new(server, server_limit),
            End::new(client, client_limit),
        ];
        for (i, e) in ends.iter_mut().enumerate() {
            poll.registry()
                .register(&mut e.s, Token(i), Interest::READABLE | Interest::WRITABLE)
                .unwrap();
        }
        Self {
            poll,
            events: Events::with_capacity(16),
            ends,
        }
    }

    fn server(&mut self) -> &mut End {
        &mut self.ends[0]
    }

    fn client(&mut self) -> &mut End {
        &mut self.ends[1]
    }

    /// Services both ends and waits for readiness until `done` holds;
    /// `done` may also play the application (consume and produce data).
    fn run_until(&mut self, mut done: impl FnMut(&mut [End; 2]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut progress = false;
            for e in &mut self.ends {
                progress |= e.service();
            }
            if done(&mut self.ends) {
                return;
            }
            assert!(Instant::now() < deadline, "stalled");
            // After progress, poll without waiting: the test may have
            // consumed data or queued more, which no event will announce.
            let wait = if progress {
                Duration::ZERO
            } else {
                Duration::from_millis(200)
            };
            self.poll.poll(&mut self.events, Some(wait)).unwrap();
            for ev in self.events.iter() {
                let e = &mut self.ends[ev.token().0];
                e.readable |= ev.is_readable() || ev.is_read_closed() || ev.is_error();
                e.writable |= ev.is_writable() || ev.is_write_closed() || ev.is_error();
            }
        }
    }

    fn failed(&mut self) {
        self.run_until(|e| e.iter().all(End::done));
    }
}

fn tls_pair(server: &ServerTls, client: &ClientTls, name: &str) -> Pair {
    let (mut s, mut c) = tcp_pair();
    s.start_tls_server(server, &[]).unwrap();
    c.start_tls_client(client, name).unwrap();
    Pair::new(s, c, 64 * 1024, 64 * 1024)
}

fn exchange(p: &mut Pair) {
    p.client().out.extend_from_slice(b"ping from client");
    p.server().out.extend_from_slice(b"hello from server");
    p.run_until(|e| {
        &e[0].inbuf[..] == b"ping from client" && &e[1].inbuf[..] == b"hello from server"
    });
}

// ---- tests ------------------------------------------------------------------

#[test]
fn handshake_and_echo_both_ways() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let client = ClientTls::new(&pki.client_opts(Verify::Full)).unwrap();
    let (mut s, mut c) = tcp_pair();
    assert!(!s.is_tls() && !s.wants_write() && s.tls_description().is_none());
    s.start_tls_server(&server, &[]).unwrap();
    c.start_tls_client(&client, "db.example.com").unwrap();
    assert!(s.is_tls() && c.is_tls() && c.is_handshaking());
    let mut p = Pair::new(s, c, 64 * 1024, 64 * 1024);
    // Written before the handshake is over: queued by rustls meanwhile.
    p.client().out.extend_from_slice(b"ping");
    p.run_until(|e| &e[0].inbuf[..] == b"ping");
    p.server().inbuf.clear();
    p.server().out.extend_from_slice(b"pong");
    p.run_until(|e| &e[1].inbuf[..] == b"pong");
    for e in &p.ends {
        assert!(!e.s.is_handshaking());
        let d = e.s.tls_description().unwrap();
        assert!(d.starts_with("TLSv1.3 TLS13_"), "{d}");
        assert_eq!(e.s.alpn().as_deref(), Some(&b"postgresql"[..]));
        assert_eq!(e.s.tls_error(), None);
    }
    assert_eq!(
        p.ends[1].s.peer_common_name().as_deref(),
        Some("db.example.com")
    );
    assert_eq!(p.ends[0].s.peer_common_name(), None);
    // A clean close reaches the other end as Closed.
    p.client().s.send_close_notify();
    p.run_until(|e| e[0].closed);
    assert_eq!(p.ends[0].failed, None);
}

#[test]
fn tls12_is_spoken_when_asked() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let mut opts = pki.client_opts(Verify::Full);
    opts.protocols = Protocols::parse("tlsv1.2").unwrap();
    let client = ClientTls::new(&opts).unwrap();
    let mut p = tls_pair(&server, &client, "db.example.com");
    exchange(&mut p);
    let d = p.ends[0].s.tls_description().unwrap();
    assert!(d.starts_with("TLSv1.2 TLS_ECDHE_ECDSA_"), "{d}");
}

#[test]
fn large_transfers_both_ways_with_small_limits() {
    const TOTAL: usize = 3 << 20;
    fn byte(i: usize) -> u8 {
        (i % 251) as u8 ^ (i >> 12) as u8
    }
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let client = ClientTls::new(&pki.client_opts(Verify::Full)).unwrap();
    let (mut s, mut c) = tcp_pair();
    s.start_tls_server(&server, &[]).unwrap();
    c.start_tls_client(&client, "db.example.com").unwrap();
    // Limits far below a TLS record: rustls must keep plaintext, and
    // ciphertext already read must wait in `staged`, across calls.
    let mut p = Pair::new(s, c, 1000, 3001);
    let mut sent = [0usize; 2];
    let mut received = [0usize; 2];
    // More than rustls queues during the handshake (64 KiB): write_from
    // must refuse the rest until the handshake is over, then take it.
    while sent[1] < 200 * 1024 {
        p.client().out.extend_from_slice(&[byte(sent[1])]);
        sent[1] += 1;
    }
    p.run_until(|ends| {
        for (i, e) in ends.iter_mut().enumerate() {
            // The application: keep at most 40 KiB queued, check and
            // consume what arrived.
            while e.out.len() < 40 * 1024 && sent[i] < TOTAL {
                e.out.extend_from_slice(&[byte(sent[i])]);
                sent[i] += 1;
            }
            for (k, &b) in e.inbuf.iter().enumerate() {
                assert_eq!(b, byte(received[i] + k), "end {i} at {}", received[i] + k);
            }
            received[i] += e.inbuf.len();
            e.inbuf.clear();
            assert!(
                !e.done(),
                "end {i} ended: {:?} {:?}",
                e.failed,
                e.s.tls_error()
            );
        }
        received == [TOTAL, TOTAL]
    });
}

#[test]
fn verify_full_checks_names_and_addresses() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let client = ClientTls::new(&pki.client_opts(Verify::Full)).unwrap();
    let mut p = tls_pair(&server, &client, "127.0.0.1");
    exchange(&mut p);

    let mut p = tls_pair(&server, &client, "other.example.com");
    p.failed();
    assert_eq!(
        p.ends[1].failed,
        Some(SocketResult::Error(std::io::ErrorKind::InvalidData))
    );
    let e = p.ends[1].s.tls_error().unwrap();
    assert!(e.contains("not valid for name"), "{e}");
    // The server hears why, as an alert.
    let e = p.ends[0].s.tls_error().unwrap();
    assert!(e.contains("alert"), "{e}");
}

#[test]
fn verify_ca_ignores_the_name_but_not_the_chain() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let client = ClientTls::new(&pki.client_opts(Verify::Ca)).unwrap();
    let mut p = tls_pair(&server, &client, "other.example.com");
    exchange(&mut p);

    let mut opts = pki.client_opts(Verify::Ca);
    opts.ca_file = Some(pki.other_ca.clone());
    let client = ClientTls::new(&opts).unwrap();
    let mut p = tls_pair(&server, &client, "db.example.com");
    p.failed();
    let e = p.ends[1].s.tls_error().unwrap();
    assert!(
        e.contains("UnknownIssuer") || e.contains("unknown issuer"),
        "{e}"
    );
}

#[test]
fn verify_none_accepts_a_self_signed_certificate() {
    let pki = pki();
    let self_signed = rcgen::generate_simple_self_signed(vec!["anything".to_owned()]).unwrap();
    let (cert, key) = write_pair(
        pki.dir.path(),
        "self",
        &self_signed.cert.pem(),
        &self_signed.key_pair.serialize_pem(),
    );
    let mut opts = pki.server_opts();
    (opts.cert_file, opts.key_file) = (cert, key);
    let server = ServerTls::new(&opts).unwrap();
    let mut copts = pki.client_opts(Verify::None);
    copts.ca_file = None;
    let client = ClientTls::new(&copts).unwrap();
    let mut p = tls_pair(&server, &client, "db.example.com");
    exchange(&mut p);

    // The same server fails verification with a CA.
    let client = ClientTls::new(&pki.client_opts(Verify::Full)).unwrap();
    let mut p = tls_pair(&server, &client, "anything");
    p.failed();
    assert!(p.ends[1].s.tls_error().is_some());
}

#[test]
fn client_certificates_required_optional_and_refused() {
    let pki = pki();
    let mut sopts = pki.server_opts();
    sopts.client_auth = ClientAuth::Required;
    let required = ServerTls::new(&sopts).unwrap();
    sopts.client_auth = ClientAuth::Optional;
    let optional = ServerTls::new(&sopts).unwrap();
    let anonymous = ClientTls::new(&pki.client_opts(Verify::Full)).unwrap();
    let mut copts = pki.client_opts(Verify::Full);
    (copts.cert_file, copts.key_file) = (Some(pki.client.0.clone()), Some(pki.client.1.clone()));
    let alice = ClientTls::new(&copts).unwrap();
    (copts.cert_file, copts.key_file) =
        (Some(pki.stranger.0.clone()), Some(pki.stranger.1.clone()));
    let mallory = ClientTls::new(&copts).unwrap();

    let mut p = tls_pair(&required, &alice, "db.example.com");
    exchange(&mut p);
    assert_eq!(p.ends[0].s.peer_common_name().as_deref(), Some("alice"));

    let mut p = tls_pair(&optional, &anonymous, "db.example.com");
    exchange(&mut p);
    assert_eq!(p.ends[0].s.peer_common_name(), None);

    let mut p = tls_pair(&optional, &alice, "db.example.com");
    exchange(&mut p);
    assert_eq!(p.ends[0].s.peer_common_name().as_deref(), Some("alice"));

    for (server, client) in [
        (&required, &anonymous),
        (&required, &mallory),
        (&optional, &mallory),
    ] {
        let mut p = tls_pair(server, client, "db.example.com");
        // In TLS 1.3 the client is done before the server has checked its
        // certificate: it learns of the refusal from the alert when it
        // reads next.
        p.client().out.extend_from_slice(b"startup");
        p.failed();
        assert!(p.ends[0].failed.is_some(), "server accepted");
        assert!(p.ends[0].s.tls_error().is_some());
        assert!(p.ends[0].inbuf.is_empty());
        assert!(p.ends[1].s.tls_error().is_some() || p.ends[1].closed);
    }
}

#[test]
fn direct_tls_hands_over_bytes_already_read() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let client = ClientTls::new(&pki.client_opts(Verify::Full)).unwrap();
    // The pooler peeks at one byte, or at all that came, before deciding.
    for peek in [1, 5, 64 * 1024] {
        let (mut s, mut c) = tcp_pair();
        c.start_tls_client(&client, "db.example.com").unwrap();
        let mut first = BytesMut::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while first.is_empty() {
            let (_, r) = s.read_into(&mut first, peek, false);
            assert!(matches!(
                r,
                SocketResult::WouldBlock | SocketResult::Continue
            ));
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(first[0], 0x16, "a TLS handshake record");
        s.start_tls_server(&server, &first).unwrap();
        let mut p = Pair::new(s, c, 64 * 1024, 64 * 1024);
        exchange(&mut p);
    }
}

#[test]
fn protocol_mismatch_is_an_error_not_a_panic() {
    let pki = pki();
    let mut sopts = pki.server_opts();
    sopts.protocols = Protocols::parse("tlsv1.3").unwrap();
    let server = ServerTls::new(&sopts).unwrap();
    let mut copts = pki.client_opts(Verify::Full);
    copts.protocols = Protocols::parse("TLSv1.2").unwrap();
    let client = ClientTls::new(&copts).unwrap();
    let mut p = tls_pair(&server, &client, "db.example.com");
    p.failed();
    for e in &p.ends {
        assert_eq!(
            e.failed,
            Some(SocketResult::Error(std::io::ErrorKind::InvalidData))
        );
        assert!(e.s.tls_error().is_some());
    }
    // Once failed, the stream stays failed.
    let mut buf = BytesMut::new();
    assert_eq!(
        p.server().s.read_into(&mut buf, 100, false),
        (0, SocketResult::Error(std::io::ErrorKind::InvalidData))
    );
}

#[test]
fn garbage_instead_of_a_client_hello_fails_cleanly() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let (mut s, c) = tcp_pair();
    s.start_tls_server(&server, b"\x16\x03\x01\x00\x05hello")
        .unwrap();
    let mut p = Pair::new(s, c, 1024, 1024);
    p.run_until(|e| e[0].done());
    assert!(p.ends[0].s.tls_error().is_some());
    assert!(matches!(p.ends[0].failed, Some(SocketResult::Error(_))));
}

#[test]
fn a_peer_that_hangs_up_mid_handshake_reads_as_closed() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let (mut s, c) = tcp_pair();
    s.start_tls_server(&server, &[]).unwrap();
    drop(c);
    let mut p_s = End::new(s, 1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p_s.done() {
        p_s.readable = true;
        p_s.service();
        assert!(Instant::now() < deadline);
    }
    assert!(p_s.closed);
}

#[test]
fn starting_tls_twice_or_with_a_bad_name_is_refused() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let client = ClientTls::new(&pki.client_opts(Verify::Full)).unwrap();
    let (mut s, mut c) = tcp_pair();
    assert!(matches!(
        c.start_tls_client(&client, "not a host name!"),
        Err(TlsError::BadServerName(_))
    ));
    assert!(!c.is_tls());
    s.start_tls_server(&server, &[]).unwrap();
    assert!(matches!(
        s.start_tls_server(&server, &[]),
        Err(TlsError::AlreadyTls)
    ));
    c.start_tls_client(&client, "db.example.com").unwrap();
    assert!(matches!(
        c.start_tls_client(&client, "db.example.com"),
        Err(TlsError::AlreadyTls)
    ));
}

#[test]
fn loader_errors_name_the_file_and_the_fault() {
    let pki = pki();
    let d = pki.dir.path();
    let base = pki.server_opts();
    let with = |f: &dyn Fn(&mut ServerTlsOptions)| {
        let mut o = base.clone();
        f(&mut o);
        ServerTls::new(&o).unwrap_err()
    };

    let missing = d.join("missing.crt");
    let e = with(&|o| o.cert_file = missing.clone());
    assert!(matches!(e, TlsError::Read { .. }), "{e:?}");
    assert!(e.to_string().contains("missing.crt"), "{e}");

    let garbage = d.join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM at all\n").unwrap();
    let e = with(&|o| o.cert_file = garbage.clone());
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
    assert!(e.to_string().contains("garbage.pem"), "{e}");
    let e = with(&|o| o.key_file = garbage.clone());
    assert!(matches!(e, TlsError::NoPrivateKey { .. }), "{e:?}");

    let broken = d.join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = with(&|o| o.cert_file = broken.clone());
    assert!(matches!(e, TlsError::BadPem { .. }), "{e:?}");

    // A key in the certificate's place, and a certificate in the key's.
    let e = with(&|o| o.cert_file = pki.server.1.clone());
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
    let e = with(&|o| o.key_file = pki.server.0.clone());
    assert!(matches!(e, TlsError::NoPrivateKey { .. }), "{e:?}");

    let e = with(&|o| o.key_file = pki.client.1.clone());
    assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("client.key") && msg.contains("server.crt"),
        "{msg}"
    );

    let e = with(&|o| {
        o.client_auth = ClientAuth::Required;
        o.ca_file = None;
    });
    assert!(matches!(e, TlsError::CaFileRequired { .. }), "{e:?}");
    let e = with(&|o| {
        o.client_auth = ClientAuth::Optional;
        o.ca_file = Some(garbage.clone());
    });
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");

    let mut c = pki.client_opts(Verify::Full);
    c.ca_file = None;
    let e = ClientTls::new(&c).unwrap_err();
    assert!(e.to_string().contains("verify-full needs a CA file"), "{e}");
    let mut c = pki.client_opts(Verify::Ca);
    c.cert_file = Some(pki.client.0.clone());
    assert!(matches!(
        ClientTls::new(&c),
        Err(TlsError::IncompleteClientCert)
    ));
    c.key_file = Some(pki.server.1.clone());
    assert!(matches!(
        ClientTls::new(&c),
        Err(TlsError::KeyMismatch { .. })
    ));
}

#[test]
fn pkcs1_sec1_and_pkcs8_keys_load() {
    let pki = pki();
    let d = pki.dir.path();
    let cases = [
        (
            include_str!("../testdata/rsa-pkcs8.key"),
            include_str!("../testdata/rsa-pkcs1.key"),
        ),
        (
            include_str!("../testdata/ec-pkcs8.key"),
            include_str!("../testdata/ec-sec1.key"),
        ),
    ];
    for (i, (pkcs8, other_form)) in cases.into_iter().enumerate() {
        let key = KeyPair::from_pem(pkcs8).unwrap();
        let cert = CertificateParams::new(vec!["db.example.com".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        for (j, key_pem) in [pkcs8, other_form].into_iter().enumerate() {
            let (cert_file, key_file) = write_pair(d, &format!("k{i}{j}"), &cert.pem(), key_pem);
            let server = ServerTls::new(&ServerTlsOptions {
                cert_file,
                key_file,
                ca_file: None,
                client_auth: ClientAuth::None,
                protocols: Protocols::default(),
            })
            .unwrap_or_else(|e| panic!("case {i}/{j}: {e}"));
            let client = ClientTls::new(&ClientTlsOptions {
                verify: Verify::None,
                ca_file: None,
                cert_file: None,
                key_file: None,
                protocols: Protocols::default(),
            })
            .unwrap();
            let mut p = tls_pair(&server, &client, "db.example.com");
            exchange(&mut p);
        }
    }
}

#[test]
fn protocol_lists_parse() {
    let both = Protocols {
        tls12: true,
        tls13: true,
    };
    assert_eq!(Protocols::parse("").unwrap(), both);
    assert_eq!(Protocols::parse("tlsv1.2, TLSv1.3").unwrap(), both);
    assert_eq!(
        "tlsv1.3".parse::<Protocols>().unwrap(),
        Protocols {
            tls12: false,
            tls13: true
        }
    );
    assert_eq!(Protocols::parse("tlsv1.2").unwrap().to_string(), "tlsv1.2");
    let e = Protocols::parse("tlsv1.2,sslv3").unwrap_err();
    assert!(
        matches!(&e, TlsError::UnknownProtocol(p) if p == "sslv3"),
        "{e:?}"
    );
}

#[test]
fn unix_sockets_carry_tls_too() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let client = ClientTls::new(&pki.client_opts(Verify::Full)).unwrap();
    let (a, b) = mio::net::UnixStream::pair().unwrap();
    let (mut s, mut c) = (Stream::from(a), Stream::from(b));
    s.start_tls_server(&server, &[]).unwrap();
    c.start_tls_client(&client, "db.example.com").unwrap();
    let mut p = Pair::new(s, c, 4096, 4096);
    exchange(&mut p);
}

#[test]
fn clients_without_alpn_are_served_and_other_protocols_refused() {
    let pki = pki();
    let server = ServerTls::new(&pki.server_opts()).unwrap();
    let base = ClientTls::new(&pki.client_opts(Verify::Full)).unwrap();
    let with_alpn = |protocols: Vec<Vec<u8>>| {
        let mut config = (*base.config).clone();
        config.alpn_protocols = protocols;
        ClientTls {
            config: std::sync::Arc::new(config),
        }
    };

    // A pre-17 client (libpq 16, JDBC) offers no ALPN.
    let mut p = tls_pair(&server, &with_alpn(Vec::new()), "db.example.com");
    exchange(&mut p);
    assert_eq!(p.ends[0].s.alpn(), None);

    let mut p = tls_pair(&server, &with_alpn(vec![b"h2".to_vec()]), "db.example.com");
    p.failed();
    let e = p.ends[0].s.tls_error().unwrap();
    assert!(e.to_lowercase().contains("protocol"), "{e}");
}
