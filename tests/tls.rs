//! End-to-end tests of TLS with real clients.
//!
//! Towards clients: psql (libpq 15), psycopg 3 (its own libpq) and a small
//! rustls client of the raw protocol, through `[[listen]]` tls modes, client
//! certificates (chains, bundles, expired, wrong CA, wrong CN), the `cert`
//! authentication method, reloaded certificates, PostgreSQL 17's direct
//! TLS, protocol versions, cancel, and handshakes that stall. Towards
//! PostgreSQL: `[storage] tls` modes against a cluster that serves TLS and
//! refuses plaintext TCP logins (`hostssl` lines only), a client
//! certificate for its `cert` method, and one without TLS. Both legs at
//! once: SCRAM, passthrough, transaction pooling, large data, clients that
//! vanish and servers that close.
//!
//! Certificates are made at test time with rcgen: a CA, a server
//! certificate for "localhost" and 127.0.0.1, client certificates whose
//! common name is a role, and an unrelated CA whose certificates nobody
//! trusts.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use odissey_harness::{Options, PgTls};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedProtocolVersion,
};

/// Per test; the file as a whole takes far less.
const LIMIT: Duration = Duration::from_secs(90);
/// Per psql / python3 run.
const TOOL_LIMIT: Duration = Duration::from_secs(20);
/// A path that does not exist: libpq's default certificate files
/// (~/.postgresql/...) must never be picked up by accident.
const NO_FILE: &str = "/nonexistent/odissey-tls-test";

const SQLSTATE_28000: &str = "28000";

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

/// A certificate authority (a root, or an intermediate with its chain up
/// to the root, the root left out).
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// Certificates above this one, up to (not including) the root.
    chain: Vec<CertificateDer<'static>>,
    chain_pem: String,
}

impl Ca {
    fn ca_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
    }

    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("generate a CA key");
        let cert = Self::ca_params(name)
            .self_signed(&key)
            .expect("self-sign the CA");
        Self {
            cert,
            key,
            chain: Vec::new(),
            chain_pem: String::new(),
        }
    }

    /// An intermediate CA signed by this one.
    fn intermediate(&self, name: &str) -> Self {
        let key = KeyPair::generate().expect("generate a CA key");
        let cert = Self::ca_params(name)
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the intermediate CA");
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let chain_pem = format!("{}{}", cert.pem(), self.chain_pem);
        Self {
            cert,
            key,
            chain,
            chain_pem,
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A leaf certificate signed by this CA. `sans` that parse as IP
    /// addresses become IP SANs; `cn` None leaves the subject empty.
    fn issue_with(
        &self,
        cn: Option<&str>,
        sans: &[&str],
        eku: ExtendedKeyUsagePurpose,
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> Leaf {
        let key = KeyPair::generate().expect("generate a leaf key");
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.extended_key_usages = vec![eku];
        tweak(&mut params);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the leaf");
        let mut chain_der = vec![cert.der().clone()];
        chain_der.extend(self.chain.iter().cloned());
        Leaf {
            cert_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
            chain_der,
            key_der: key.serialize_der(),
        }
    }

    fn issue(&self, cn: &str, sans: &[&str], eku: ExtendedKeyUsagePurpose) -> Leaf {
        self.issue_with(Some(cn), sans, eku, |_| {})
    }

    /// A server certificate for `sans` (CN: the first of them).
    fn server(&self, sans: &[&str]) -> Leaf {
        self.issue(sans[0], sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose common name is `cn`.
    fn client(&self, cn: &str) -> Leaf {
        self.issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A certificate and its key, as PEM (for files) and DER (for rustls).
/// Certified by an intermediate CA, both forms hold the chain: the leaf,
/// then the intermediates.
#[derive(Clone)]
struct Leaf {
    cert_pem: String,
    key_pem: String,
    chain_der: Vec<CertificateDer<'static>>,
    /// PKCS#8.
    key_der: Vec<u8>,
}

/// A leaf written to `<name>.crt` / `<name>.key`.
struct Issued {
    leaf: Leaf,
    cert: PathBuf,
    key: PathBuf,
}

/// A temporary directory of PEM files: the CA, an unrelated CA, and what
/// the tests issue.
struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
    /// Trusted nowhere unless a test says so (a CA bundle, the reloaded
    /// certificate's issuer).
    other: Ca,
    ca_file: PathBuf,
    other_ca_file: PathBuf,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("odissey-tls-")
            .tempdir()
            .expect("create a temp dir");
        let ca = Ca::new("odissey test CA");
        let other = Ca::new("some other CA");
        let mut pki = Self {
            dir,
            ca,
            other,
            ca_file: PathBuf::new(),
            other_ca_file: PathBuf::new(),
        };
        pki.ca_file = pki.save("ca.crt", &pki.ca.cert.pem());
        pki.other_ca_file = pki.save("other-ca.crt", &pki.other.cert.pem());
        pki
    }

    /// Writes `text` to `name` in the directory, mode 0600 (libpq refuses
    /// group- or world-readable keys).
    fn save(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
        path
    }

    fn save_leaf(&self, name: &str, leaf: Leaf) -> Issued {
        let cert = self.save(&format!("{name}.crt"), &leaf.cert_pem);
        let key = self.save(&format!("{name}.key"), &leaf.key_pem);
        Issued { leaf, cert, key }
    }

    /// The server certificate for "localhost" and 127.0.0.1, signed by the
    /// CA, saved as `server.crt` / `server.key`.
    fn server(&self) -> Issued {
        self.save_leaf("server", self.ca.server(&["localhost", "127.0.0.1"]))
    }

    /// A client certificate for `cn` signed by the CA.
    fn client(&self, cn: &str) -> Issued {
        self.save_leaf(&format!("client-{cn}"), self.ca.client(cn))
    }

    /// A client certificate for `cn` signed by the unrelated CA.
    fn stranger(&self, cn: &str) -> Issued {
        self.save_leaf(&format!("stranger-{cn}"), self.other.client(cn))
    }
}

/// A path as a TOML string.
fn tv(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// `config` with its listener's TLS set: `mode`, the server certificate,
/// and a CA for client certificates when given.
fn listener_tls(config: Config, mode: &str, server: &Issued, client_ca: Option<&Path>) -> Config {
    let config = config
        .listen("tls", &format!("{mode:?}"))
        .listen("tls_cert_file", &tv(&server.cert))
        .listen("tls_key_file", &tv(&server.key));
    match client_ca {
        Some(ca) => config.listen("tls_ca_file", &tv(ca)),
        None => config,
    }
}

/// A route with `authentication = "cert"`.
fn cert_route(db: &str, user: &str) -> Route {
    Route {
        authentication: "cert".into(),
        ..Route::new(db, user)
    }
}

/// A route with `authentication = "scram-sha-256"`; odissey logs in to
/// PostgreSQL with the same password.
fn scram_route(db: &str, user: &str, password: &str) -> Route {
    Route {
        authentication: "scram-sha-256".into(),
        password: Some(password.into()),
        ..Route::new(db, user)
    }
}

// ---------------------------------------------------------------------------
// libpq clients: psql and psycopg
// ---------------------------------------------------------------------------

/// libpq connection parameters for odissey: `host` is the name the
/// certificate is checked against, the connection always goes to
/// 127.0.0.1 (`hostaddr`). No certificate file is read unless set.
#[derive(Debug, Clone)]
struct Libpq(Vec<(&'static str, String)>);

impl Libpq {
    fn new(port: u16, host: &str, user: &str, sslmode: &str) -> Self {
        Self(Vec::new())
            .set("host", host)
            .set("hostaddr", "127.0.0.1")
            .set("port", port)
            .set("dbname", "test")
            .set("user", user)
            .set("sslmode", sslmode)
            .set("sslrootcert", NO_FILE)
            .set("sslcert", NO_FILE)
            .set("sslkey", NO_FILE)
            .set("gssencmode", "disable")
            .set("connect_timeout", 10)
    }

    fn set(mut self, key: &'static str, value: impl ToString) -> Self {
        let value = value.to_string();
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(kv) => kv.1 = value,
            None => self.0.push((key, value)),
        }
        self
    }

    fn root(self, ca: &Path) -> Self {
        self.set("sslrootcert", ca.display())
    }

    fn cert(self, issued: &Issued) -> Self {
        self.set("sslcert", issued.cert.display())
            .set("sslkey", issued.key.display())
    }

    /// `key='value' ...`.
    fn conninfo(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// psql running `select 41 + 1` and `\conninfo`.
fn psql(params: &Libpq) -> Output {
    psql_commands(params, &["select 41 + 1", "\\conninfo"])
}

/// psql running each of `commands` (`-c`), stopping at the first error.
fn psql_commands(params: &Libpq, commands: &[&str]) -> Output {
    let mut cmd = pg_tool("psql");
    cmd.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(params.conninfo());
    for c in commands {
        cmd.args(["-c", c]);
    }
    run_tool(cmd, TOOL_LIMIT)
}

/// Asserts that psql was served over TLS; returns its output.
#[track_caller]
fn psql_tls_ok(params: &Libpq, what: &str) -> String {
    let out = psql(params);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{what}: psql failed ({}):\n{stderr}{stdout}\nconninfo: {}",
        out.status,
        params.conninfo()
    );
    assert!(
        stdout.lines().any(|l| l.trim() == "42"),
        "{what}: no query result in psql's output:\n{stdout}"
    );
    assert!(
        stdout.contains("SSL connection (protocol: TLSv1."),
        "{what}: psql's \\conninfo reports no SSL connection:\n{stdout}"
    );
    stdout
}

/// Asserts that psql could not connect; returns its stderr.
#[track_caller]
fn psql_refused(params: &Libpq, what: &str) -> String {
    let out = psql(params);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: psql should fail to connect (exit 2), got {}:\n{stdout}{stderr}\nconninfo: {}",
        out.status,
        params.conninfo()
    );
    assert!(
        !stdout.lines().any(|l| l.trim() == "42"),
        "{what}: psql ran the query:\n{stdout}"
    );
    stderr
}

/// A psycopg 3 client: connects with a conninfo, runs one query, prints
/// whether TLS is in use and the value.
const PSYCOPG: &str = r#"
import sys
import psycopg
try:
    with psycopg.connect(sys.argv[1]) as conn:
        value = conn.execute(sys.argv[2]).fetchone()[0]
        print("ssl_in_use=%s value=%s" % (conn.pgconn.ssl_in_use, value))
except psycopg.Error as e:
    print("error: %s" % e)
    sys.exit(3)
"#;

fn psycopg(params: &Libpq, sql: &str) -> Output {
    python(PSYCOPG, &[&params.conninfo(), sql])
}

/// `python3 -c script args...` without the PG* environment.
fn python(script: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new("python3");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("PG") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["-c", script])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_tool(cmd, TOOL_LIMIT)
}

/// Asserts that psycopg ran `sql` over TLS and got `value`.
#[track_caller]
fn psycopg_tls_ok(params: &Libpq, sql: &str, value: &str, what: &str) {
    let out = psycopg(params, sql);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "{what}: psycopg failed ({}):\n{stdout}{stderr}\nconninfo: {}",
        out.status,
        params.conninfo()
    );
    assert_eq!(
        stdout.trim(),
        format!("ssl_in_use=True value={value}"),
        "{what}: psycopg's result"
    );
}

/// Asserts that psycopg could not connect; returns the error it printed.
#[track_caller]
fn psycopg_refused(params: &Libpq, what: &str) -> String {
    let out = psycopg(params, "select 1");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{what}: psycopg should fail to connect:\n{stdout}{stderr}"
    );
    stdout
}

#[track_caller]
fn require_psycopg() {
    let have = Command::new("python3")
        .args(["-c", "import psycopg"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have,
        "psycopg 3 is missing: install it with `python3 -m pip install 'psycopg[binary]'`"
    );
}

// ---------------------------------------------------------------------------
// A rustls client of the raw protocol (routes without passwords)
// ---------------------------------------------------------------------------

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];

type TlsStream = StreamOwned<ClientConnection, TcpStream>;

/// How a TLS login was refused.
#[derive(Debug)]
enum Refusal {
    /// An ErrorResponse.
    Error(ErrorFields),
    /// No ErrorResponse: the handshake failed, an alert came, or the
    /// connection closed.
    Tls(String),
}

impl Refusal {
    /// Asserts an ErrorResponse with `code` whose message contains
    /// `needle`.
    #[track_caller]
    fn expect_error(&self, code: &str, needle: &str, what: &str) {
        match self {
            Self::Error(e) => {
                assert_eq!(e.code, code, "{what}: SQLSTATE of {e:?}");
                assert!(
                    e.message.contains(needle),
                    "{what}: the message should contain {needle:?}: {e:?}"
                );
            }
            Self::Tls(t) => panic!("{what}: expected SQLSTATE {code}, got a TLS failure: {t}"),
        }
    }

    /// Asserts a TLS-level refusal (no ErrorResponse) whose description
    /// contains `needle`.
    #[track_caller]
    fn expect_tls(&self, needle: &str, what: &str) {
        match self {
            Self::Tls(t) => assert!(
                t.contains(needle),
                "{what}: the TLS failure should mention {needle:?}: {t}"
            ),
            Self::Error(e) => panic!("{what}: expected a TLS failure, got {e:?}"),
        }
    }
}

/// The client side of one TLS connection attempt.
#[derive(Clone)]
struct TlsClient {
    roots: Vec<CertificateDer<'static>>,
    identity: Option<Leaf>,
    server_name: String,
    /// PostgreSQL 17's direct TLS: ClientHello first, no SSLRequest.
    direct: bool,
    /// A GSSENCRequest (answered 'N') before the SSLRequest.
    gss_first: bool,
    /// Send this many bytes of the ClientHello, pause, then the rest.
    split_hello: Option<usize>,
    alpn: bool,
    versions: Vec<&'static SupportedProtocolVersion>,
}

impl TlsClient {
    /// Trusts `ca`, checks the name "localhost", offers ALPN "postgresql"
    /// and TLS 1.2 and 1.3, presents no certificate.
    fn trusting(ca: &Ca) -> Self {
        Self {
            roots: vec![ca.der()],
            identity: None,
            server_name: "localhost".into(),
            direct: false,
            gss_first: false,
            split_hello: None,
            alpn: true,
            versions: vec![&rustls::version::TLS13, &rustls::version::TLS12],
        }
    }

    fn cert(mut self, leaf: &Leaf) -> Self {
        self.identity = Some(leaf.clone());
        self
    }

    fn server_name(mut self, name: &str) -> Self {
        self.server_name = name.into();
        self
    }

    /// Direct TLS, offering ALPN "postgresql" or no ALPN at all.
    fn direct(mut self, alpn: bool) -> Self {
        self.direct = true;
        self.alpn = alpn;
        self
    }

    fn split_hello(mut self, first: usize) -> Self {
        self.split_hello = Some(first);
        self
    }

    fn gss_first(mut self) -> Self {
        self.gss_first = true;
        self
    }

    fn versions(mut self, versions: &[&'static SupportedProtocolVersion]) -> Self {
        self.versions = versions.to_vec();
        self
    }

    fn config(&self) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        for r in &self.roots {
            roots.add(r.clone()).expect("add a root certificate");
        }
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&self.versions)
                .expect("protocol versions")
                .with_root_certificates(roots);
        let mut config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some(leaf) => builder
                .with_client_auth_cert(
                    leaf.chain_der.clone(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone())),
                )
                .expect("client certificate"),
        };
        if self.alpn {
            config.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        config
    }

    /// Connects to odissey on `port` and does TLS: SSLRequest first
    /// unless `direct`, and `gss_first` sends a GSSENCRequest before that
    /// (as libpq does with gssencmode=prefer).
    fn handshake(&self, port: u16) -> Result<TlsStream, Refusal> {
        let mut tcp = TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"));
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set_read_timeout");
        tcp.set_nodelay(true).expect("set_nodelay");
        let mut requests: Vec<(&str, &[u8], u8)> = Vec::new();
        if self.gss_first {
            requests.push(("GSSENCRequest", &GSSENC_REQUEST, b'N'));
        }
        if !self.direct {
            requests.push(("SSLRequest", &SSL_REQUEST, b'S'));
        }
        for (name, request, expected) in requests {
            tcp.write_all(request)
                .expect("write SSLRequest / GSSENCRequest");
            let mut answer = [0u8; 1];
            tcp.read_exact(&mut answer)
                .map_err(|e| Refusal::Tls(format!("no answer to {name}: {e}")))?;
            if answer[0] != expected {
                return Err(Refusal::Tls(format!(
                    "{name} answered {:?}",
                    answer[0] as char
                )));
            }
        }
        let name = ServerName::try_from(self.server_name.clone()).expect("a valid server name");
        let mut conn =
            ClientConnection::new(Arc::new(self.config()), name).expect("a TLS client connection");
        if let Some(first) = self.split_hello {
            let mut hello = Vec::new();
            conn.write_tls(&mut hello).expect("the ClientHello");
            assert!(first < hello.len());
            tcp.write_all(&hello[..first])
                .expect("write a ClientHello's start");
            std::thread::sleep(Duration::from_millis(100));
            tcp.write_all(&hello[first..])
                .expect("write a ClientHello's rest");
        }
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .map_err(|e| Refusal::Tls(format!("handshake: {e}")))?;
        }
        Ok(StreamOwned::new(conn, tcp))
    }

    /// [`handshake`](Self::handshake), then a login as `user` on `db` (no
    /// password).
    fn login(&self, port: u16, user: &str, db: &str) -> Result<TlsSession, Refusal> {
        let mut stream = self.handshake(port)?;
        stream
            .write_all(&startup_message(user, db))
            .map_err(|e| Refusal::Tls(format!("writing the startup message: {e}")))?;
        let mut cancel_key = (0, 0);
        loop {
            match read_msg(&mut stream) {
                Err(e) => return Err(Refusal::Tls(format!("during login: {e}"))),
                Ok((b'E', body)) => return Err(Refusal::Error(parse_error_fields(&body))),
                Ok((b'R', body)) => assert_eq!(
                    &body[..4],
                    &[0, 0, 0, 0],
                    "the rustls test client only logs in without a password"
                ),
                Ok((b'K', body)) => {
                    let word = |i: usize| {
                        u32::from_be_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]])
                    };
                    cancel_key = (word(0), word(4));
                }
                Ok((b'Z', _)) => return Ok(TlsSession { stream, cancel_key }),
                Ok(_) => {}
            }
        }
    }

    /// [`login`](Self::login) that must work.
    #[track_caller]
    fn served(&self, port: u16, user: &str, db: &str, what: &str) -> TlsSession {
        self.login(port, user, db)
            .unwrap_or_else(|r| panic!("{what}: the TLS login as {user} was refused: {r:?}"))
    }

    /// [`login`](Self::login) that must fail.
    #[track_caller]
    fn refused(&self, port: u16, user: &str, db: &str, what: &str) -> Refusal {
        match self.login(port, user, db) {
            Ok(_) => panic!("{what}: the TLS login as {user} was served"),
            Err(r) => r,
        }
    }
}

/// A logged-in TLS connection.
struct TlsSession {
    stream: TlsStream,
    /// BackendKeyData: (pid, secret key).
    cancel_key: (u32, u32),
}

impl TlsSession {
    /// Sends a simple query.
    fn send_query(&mut self, sql: &str) {
        let mut q = vec![b'Q'];
        q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        q.extend_from_slice(sql.as_bytes());
        q.push(0);
        self.stream.write_all(&q).expect("write Query over TLS");
    }

    /// Reads the reply to a simple query up to ReadyForQuery: the first
    /// column of every row, or the error.
    #[track_caller]
    fn read_reply(&mut self, sql: &str) -> Result<Vec<Option<String>>, ErrorFields> {
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let (tag, body) = read_msg(&mut self.stream)
                .unwrap_or_else(|e| panic!("reading the reply to {sql:.60?} over TLS: {e}"));
            match tag {
                b'D' => rows.push(first_column(&body)),
                b'E' => error = Some(parse_error_fields(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        error.map_or(Ok(rows), Err)
    }

    /// A simple query: the first column of every row, or the error.
    #[track_caller]
    fn query(&mut self, sql: &str) -> Result<Vec<Option<String>>, ErrorFields> {
        self.send_query(sql);
        self.read_reply(sql)
    }

    /// First column of the first row of a simple query.
    #[track_caller]
    fn scalar(&mut self, sql: &str) -> Option<String> {
        let rows = self
            .query(sql)
            .unwrap_or_else(|e| panic!("{sql:.60}: {e:?}"));
        rows.into_iter()
            .next()
            .unwrap_or_else(|| panic!("{sql:.60}: no row"))
    }

    fn protocol(&self) -> Option<rustls::ProtocolVersion> {
        self.stream.conn.protocol_version()
    }

    fn terminate(mut self) {
        let _ = self.stream.write_all(&[b'X', 0, 0, 0, 4]);
        self.stream.conn.send_close_notify();
        let _ = self.stream.flush();
    }
}

fn startup_message(user: &str, db: &str) -> Vec<u8> {
    startup_packet(&[("user", user), ("database", db)])
}

/// One backend message: (tag, body).
fn read_msg(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=(1 << 24)).contains(&len) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad message length {len} (tag {:?})", head[0] as char),
        ));
    }
    let mut body = vec![0u8; len - 4];
    r.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn first_column(row: &[u8]) -> Option<String> {
    let len = i32::from_be_bytes([row[2], row[3], row[4], row[5]]);
    let len = usize::try_from(len).ok()?;
    Some(text(&row[6..6 + len]))
}

// ---------------------------------------------------------------------------
// Plaintext clients (postgres crate)
// ---------------------------------------------------------------------------

/// Asserts that a plaintext login fails with SQLSTATE `code` and a message
/// containing `needle`.
#[track_caller]
fn plaintext_refused(port: u16, user: &str, password: Option<&str>, code: &str, needle: &str) {
    match try_connect(port, "test", user, password) {
        Ok(_) => panic!("a plaintext client {user} was served on port {port}"),
        Err(e) => {
            assert_eq!(
                e.code().map(SqlState::code),
                Some(code),
                "plaintext {user}: {}",
                describe(&e)
            );
            let message = e.as_db_error().map_or("", |d| d.message());
            assert!(
                message.contains(needle),
                "plaintext {user}: the message should contain {needle:?}: {}",
                describe(&e)
            );
        }
    }
}

/// Over a plaintext client leg: whether odissey's server connection uses
/// TLS, and the client certificate PostgreSQL saw ("true /CN=app", "true ").
fn server_leg(port: u16, user: &str) -> Result<String, postgres::Error> {
    let mut client = try_connect(port, "test", user, None)?;
    let v = scalar(
        &mut client,
        "select ssl::text || ' ' || coalesce(client_dn, '') \
         from pg_stat_ssl where pid = pg_backend_pid()",
    );
    Ok(v.unwrap_or_default())
}

// ---------------------------------------------------------------------------
// libpq clients and listener modes
// ---------------------------------------------------------------------------

/// psql with sslmode=require and verify-full (by name and by IP address)
/// and psycopg with verify-full, through a `tls = "require"` listener; a
/// plaintext client gets 28000 there, except on the listener's Unix socket.
#[test]
fn libpq_clients_over_tls_on_a_require_listener() {
    let _w = watchdog("libpq_clients_over_tls_on_a_require_listener", LIMIT);
    require_psycopg();
    let pg = PgCluster::start();
    let pki = Pki::new();
    let server = pki.server();
    let socket_dir = tempfile::tempdir().expect("a socket dir");
    let config = listener_tls(
        Config::new(pg.port()).route(Route::new("test", "trust_user")),
        "require",
        &server,
        None,
    )
    .listen("unix_socket", &tv(&socket_dir.path().join(".s.PGSQL.7432")));
    let (_handle, port) = start_pooler(&config);

    psql_tls_ok(
        &Libpq::new(port, "localhost", "trust_user", "require"),
        "psql sslmode=require",
    );
    let out = psql_tls_ok(
        &Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file),
        "psql sslmode=verify-full host=localhost",
    );
    assert!(out.contains("on host \"localhost\""), "{out}");
    psql_tls_ok(
        &Libpq::new(port, "127.0.0.1", "trust_user", "verify-full").root(&pki.ca_file),
        "psql sslmode=verify-full host=127.0.0.1",
    );
    psycopg_tls_ok(
        &Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file),
        "select current_user",
        "trust_user",
        "psycopg sslmode=verify-full",
    );
    // Verifying against a CA that did not sign the certificate fails.
    let err = psql_refused(
        &Libpq::new(port, "localhost", "trust_user", "verify-ca").root(&pki.other_ca_file),
        "psql verify-ca with the wrong CA",
    );
    assert!(err.contains("certificate verify failed"), "{err}");

    // sslmode=disable: FATAL 28000 from the pooler.
    plaintext_refused(
        port,
        "trust_user",
        None,
        SQLSTATE_28000,
        "TLS is required: connect with sslmode=require or stronger",
    );
    let err = psql_refused(
        &Libpq::new(port, "localhost", "trust_user", "disable"),
        "psql sslmode=disable on a require listener",
    );
    assert!(err.contains("TLS is required"), "{err}");
    // sslmode=prefer goes for TLS.
    psql_tls_ok(
        &Libpq::new(port, "localhost", "trust_user", "prefer"),
        "psql sslmode=prefer",
    );
    // The listener's Unix socket: libpq never asks for TLS there, and
    // `require` does not apply (as in PgBouncer).
    let out = psql(
        &Libpq::new(7432, "localhost", "trust_user", "prefer")
            .set("host", socket_dir.path().display())
            .set("hostaddr", ""),
    );
    assert!(
        out.status.success() && text(&out.stdout).contains("42"),
        "psql through the Unix socket of a require listener: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `tls = "allow"` serves plaintext and TLS clients; `tls = "disable"`
/// answers SSLRequest with 'N' (so sslmode=require fails and prefer carries
/// on in plaintext).
#[test]
fn allow_serves_both_and_disable_refuses_tls() {
    let _w = watchdog("allow_serves_both_and_disable_refuses_tls", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let server = pki.server();
    let base = Config::new(pg.port()).route(Route::new("test", "trust_user"));

    let (allow, port) = start_pooler(&listener_tls(base.clone(), "allow", &server, None));
    let mut plain = connect(port, "test", "trust_user", None);
    assert_eq!(scalar(&mut plain, "select 41 + 1").as_deref(), Some("42"));
    let out = psql(&Libpq::new(port, "localhost", "trust_user", "disable"));
    assert!(
        out.status.success() && text(&out.stdout).contains("42"),
        "psql sslmode=disable on allow: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains("SSL connection"));
    psql_tls_ok(
        &Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file),
        "psql verify-full on allow",
    );
    let mut s = TlsClient::trusting(&pki.ca).served(port, "trust_user", "test", "rustls on allow");
    assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"));
    s.terminate();
    drop(plain);
    drop(allow);

    let (_disable, port) = start_pooler(&base);
    let err = psql_refused(
        &Libpq::new(port, "localhost", "trust_user", "require"),
        "psql sslmode=require on a disabled listener",
    );
    assert!(err.contains("server does not support SSL"), "{err}");
    let out = psql(&Libpq::new(port, "localhost", "trust_user", "prefer"));
    assert!(
        out.status.success() && !text(&out.stdout).contains("SSL connection"),
        "psql sslmode=prefer on a disabled listener: plaintext expected: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    TlsClient::trusting(&pki.ca)
        .refused(port, "trust_user", "test", "rustls on disable")
        .expect_tls("SSLRequest answered 'N'", "rustls on disable");
}

// ---------------------------------------------------------------------------
// The listener's certificate must name the host
// ---------------------------------------------------------------------------

/// A listener whose certificate names only "otherhost": verify-full to
/// "localhost" fails on the client side, verify-ca (same CA) works.
#[test]
fn verify_full_refuses_a_certificate_for_another_host() {
    let _w = watchdog("verify_full_refuses_a_certificate_for_another_host", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let other_host = pki.save_leaf("otherhost", pki.ca.server(&["otherhost"]));
    let config = listener_tls(
        Config::new(pg.port()).route(Route::new("test", "trust_user")),
        "require",
        &other_host,
        None,
    );
    let (_handle, port) = start_pooler(&config);

    for host in ["localhost", "127.0.0.1"] {
        let err = psql_refused(
            &Libpq::new(port, host, "trust_user", "verify-full").root(&pki.ca_file),
            &format!("psql verify-full host={host}"),
        );
        assert!(
            err.contains("does not match host name") && err.contains("otherhost"),
            "psql verify-full host={host}: {err}"
        );
    }
    psql_tls_ok(
        &Libpq::new(port, "localhost", "trust_user", "verify-ca").root(&pki.ca_file),
        "psql verify-ca",
    );
    TlsClient::trusting(&pki.ca)
        .refused(port, "trust_user", "test", "rustls for localhost")
        .expect_tls("not valid for name \"localhost\"", "rustls for localhost");
    TlsClient::trusting(&pki.ca)
        .server_name("otherhost")
        .served(port, "trust_user", "test", "rustls for otherhost")
        .terminate();
}

// ---------------------------------------------------------------------------
// Listeners that verify client certificates
// ---------------------------------------------------------------------------

#[test]
fn verify_ca_listener_needs_a_certificate_from_its_ca() {
    let _w = watchdog("verify_ca_listener_needs_a_certificate_from_its_ca", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let server = pki.server();
    let good = pki.client("trust_user");
    let stranger = pki.stranger("trust_user");
    let config = listener_tls(
        Config::new(pg.port())
            .route(Route::new("test", "trust_user"))
            .route(Route::new("test", "postgres")),
        "verify_ca",
        &server,
        Some(&pki.ca_file),
    );
    let (_handle, port) = start_pooler(&config);
    let client = TlsClient::trusting(&pki.ca);

    // No certificate.
    let r = client.refused(port, "trust_user", "test", "no certificate");
    r.expect_tls("CertificateRequired", "no certificate");
    // An expired certificate from the right CA.
    let expired = pki.ca.issue_with(
        Some("trust_user"),
        &[],
        ExtendedKeyUsagePurpose::ClientAuth,
        |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        },
    );
    client
        .clone()
        .cert(&expired)
        .refused(port, "trust_user", "test", "an expired certificate")
        .expect_tls("CertificateExpired", "an expired certificate");
    let err = psql_refused(
        &Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file),
        "psql without a certificate",
    );
    assert!(
        err.contains("certificate required"),
        "psql without a certificate: {err}"
    );
    // A certificate from another CA.
    client
        .clone()
        .cert(&stranger.leaf)
        .refused(port, "trust_user", "test", "a stranger's certificate")
        .expect_tls("UnknownCA", "a stranger's certificate");
    let err = psql_refused(
        &Libpq::new(port, "localhost", "trust_user", "verify-full")
            .root(&pki.ca_file)
            .cert(&stranger),
        "psql with a stranger's certificate",
    );
    assert!(
        err.contains("unknown ca"),
        "psql with a stranger's certificate: {err}"
    );
    // The right CA: served, and verify_ca does not look at the name.
    let mut s =
        client
            .clone()
            .cert(&good.leaf)
            .served(port, "trust_user", "test", "good certificate");
    assert_eq!(
        s.scalar("select current_user").as_deref(),
        Some("trust_user")
    );
    s.terminate();
    client
        .clone()
        .cert(&good.leaf)
        .served(port, "postgres", "test", "good certificate, other user")
        .terminate();
    psql_tls_ok(
        &Libpq::new(port, "localhost", "trust_user", "verify-full")
            .root(&pki.ca_file)
            .cert(&good),
        "psql with a good certificate",
    );
    // Plaintext.
    plaintext_refused(port, "trust_user", None, SQLSTATE_28000, "TLS is required");
}

#[test]
fn verify_full_listener_needs_the_users_certificate() {
    let _w = watchdog("verify_full_listener_needs_the_users_certificate", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let server = pki.server();
    let trust_user = pki.client("trust_user");
    let stranger = pki.stranger("trust_user");
    let config = listener_tls(
        Config::new(pg.port())
            .route(Route::new("test", "trust_user"))
            .route(Route::new("test", "postgres")),
        "verify_full",
        &server,
        Some(&pki.ca_file),
    );
    let (_handle, port) = start_pooler(&config);
    let client = TlsClient::trusting(&pki.ca);

    client
        .refused(port, "trust_user", "test", "no certificate")
        .expect_tls("CertificateRequired", "no certificate");
    client
        .clone()
        .cert(&stranger.leaf)
        .refused(port, "trust_user", "test", "a stranger's certificate")
        .expect_tls("UnknownCA", "a stranger's certificate");
    let mut s =
        client
            .clone()
            .cert(&trust_user.leaf)
            .served(port, "trust_user", "test", "CN = user");
    assert_eq!(
        s.scalar("select current_user").as_deref(),
        Some("trust_user")
    );
    s.terminate();
    // The same over TLS 1.2, where the certificate is refused during the
    // handshake.
    let tls12 = client.clone().versions(&[&rustls::version::TLS12]);
    let s = tls12.clone().cert(&trust_user.leaf).served(
        port,
        "trust_user",
        "test",
        "TLS 1.2, CN = user",
    );
    assert_eq!(s.protocol(), Some(rustls::ProtocolVersion::TLSv1_2));
    s.terminate();
    tls12
        .clone()
        .cert(&trust_user.leaf)
        .refused(port, "postgres", "test", "TLS 1.2, CN != user")
        .expect_error(SQLSTATE_28000, "not for user", "TLS 1.2, CN != user");
    tls12
        .refused(port, "trust_user", "test", "TLS 1.2, no certificate")
        .expect_tls("handshake", "TLS 1.2, no certificate");
    // CN trust_user logging in as app: 28000.
    client
        .clone()
        .cert(&trust_user.leaf)
        .refused(port, "postgres", "test", "CN != user")
        .expect_error(
            SQLSTATE_28000,
            "the client certificate is not for user \"postgres\"",
            "CN != user",
        );

    let base = Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file);
    psql_tls_ok(&base.clone().cert(&trust_user), "psql, CN = user");
    let err = psql_refused(
        &base.clone().set("user", "postgres").cert(&trust_user),
        "psql, CN != user",
    );
    assert!(
        err.contains("the client certificate is not for user \"postgres\""),
        "psql, CN != user: {err}"
    );
    let err = psql_refused(&base, "psql without a certificate");
    assert!(err.contains("certificate required"), "{err}");
}

// ---------------------------------------------------------------------------
// authentication = "cert"
// ---------------------------------------------------------------------------

/// A `cert` route on an `allow` listener with a CA (certificates
/// optional): the certificate's CN must be the user.
#[test]
fn cert_authentication_route() {
    let _w = watchdog("cert_authentication_route", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let server = pki.server();
    let trust_user = pki.client("trust_user");
    let app = pki.client("app");
    let stranger = pki.stranger("trust_user");
    let config = listener_tls(
        Config::new(pg.port())
            .route(cert_route("test", "trust_user"))
            .route(Route::new("test", "postgres")),
        "allow",
        &server,
        Some(&pki.ca_file),
    );
    let (_handle, port) = start_pooler(&config);
    let client = TlsClient::trusting(&pki.ca);
    let refused = "certificate authentication failed for user \"trust_user\"";

    // CNs that are not exactly the user, and no CN at all (the name only
    // in a SAN).
    for (what, leaf) in [
        ("CN in other case", pki.ca.client("Trust_User")),
        ("CN with a suffix", pki.ca.client("trust_user2")),
        (
            "no CN",
            pki.ca.issue_with(
                None,
                &["trust_user"],
                ExtendedKeyUsagePurpose::ClientAuth,
                |_| {},
            ),
        ),
    ] {
        client
            .clone()
            .cert(&leaf)
            .refused(port, "trust_user", "test", what)
            .expect_error(SQLSTATE_28000, refused, what);
    }

    let mut s =
        client
            .clone()
            .cert(&trust_user.leaf)
            .served(port, "trust_user", "test", "right CN");
    assert_eq!(
        s.scalar("select current_user").as_deref(),
        Some("trust_user")
    );
    s.terminate();
    client
        .clone()
        .cert(&app.leaf)
        .refused(port, "trust_user", "test", "wrong CN")
        .expect_error(SQLSTATE_28000, refused, "wrong CN");
    client
        .refused(port, "trust_user", "test", "no certificate")
        .expect_error(SQLSTATE_28000, refused, "no certificate");
    plaintext_refused(port, "trust_user", None, SQLSTATE_28000, refused);
    // An unverifiable certificate is not an optional one: the handshake
    // fails.
    client
        .clone()
        .cert(&stranger.leaf)
        .refused(port, "trust_user", "test", "a stranger's certificate")
        .expect_tls("UnknownCA", "a stranger's certificate");
    // A certificate is optional on this listener: the `none` route of postgres
    // is served with or without one.
    client
        .clone()
        .served(port, "postgres", "test", "postgres without a certificate")
        .terminate();
    client
        .clone()
        .cert(&trust_user.leaf)
        .served(
            port,
            "postgres",
            "test",
            "postgres with trust_user's certificate",
        )
        .terminate();

    let base = Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file);
    psql_tls_ok(&base.clone().cert(&trust_user), "psql, right CN");
    let err = psql_refused(&base.clone().cert(&app), "psql, wrong CN");
    assert!(err.contains(refused), "psql, wrong CN: {err}");
    let err = psql_refused(&base, "psql, no certificate");
    assert!(err.contains(refused), "psql, no certificate: {err}");
}

// ---------------------------------------------------------------------------
// TLS towards PostgreSQL
// ---------------------------------------------------------------------------

/// A cluster that serves TLS with a certificate for "localhost" and
/// 127.0.0.1 from `pki`'s CA, refuses plaintext TCP logins, and logs `app`
/// in by client certificate only.
fn tls_cluster(pki: &Pki) -> PgCluster {
    tls_cluster_with(pki, true)
}

/// As [`tls_cluster`]; plaintext TCP logins are accepted unless
/// `hostssl_only`.
fn tls_cluster_with(pki: &Pki, hostssl_only: bool) -> PgCluster {
    tls_cluster_for(pki, &["localhost", "127.0.0.1"], hostssl_only)
}

/// As [`tls_cluster_with`], with a server certificate for `sans`.
fn tls_cluster_for(pki: &Pki, sans: &[&str], hostssl_only: bool) -> PgCluster {
    let server = pki.ca.server(sans);
    PgCluster::start_with(&Options {
        tls: Some(PgTls {
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
            ca_pem: Some(pki.ca.cert.pem()),
        }),
        hostssl_only,
        cert_users: vec!["app".into()],
    })
}

#[test]
fn storage_tls_modes_against_a_tls_only_server() {
    let _w = watchdog("storage_tls_modes_against_a_tls_only_server", LIMIT);
    let pki = Pki::new();
    let pg = tls_cluster(&pki);
    let app = pki.client("app");

    // The cluster itself: plaintext refused, TLS served (psql straight to
    // PostgreSQL), `app` only with its certificate.
    let direct = pg.try_connect("test", "trust_user", None);
    expect_code(
        direct,
        &SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "plaintext straight to the cluster",
    );
    let straight =
        Libpq::new(pg.port(), "localhost", "trust_user", "verify-full").root(&pki.ca_file);
    psql_tls_ok(&straight, "psql straight to the cluster");
    psql_tls_ok(
        &straight.clone().set("user", "app").cert(&app),
        "psql straight to the cluster as app",
    );

    let base = Config::new(pg.port())
        .route(Route::new("test", "trust_user"))
        .route(Route::new("test", "app"));
    let ca = tv(&pki.ca_file);
    let other_ca = tv(&pki.other_ca_file);
    let with =
        |lines: &[(&str, &str)]| lines.iter().fold(base.clone(), |c, (k, v)| c.storage(k, v));

    for (what, config) in [
        ("prefer", with(&[("tls", "\"prefer\"")])),
        ("require", with(&[("tls", "\"require\"")])),
        (
            "verify_ca",
            with(&[("tls", "\"verify_ca\""), ("tls_ca_file", &ca)]),
        ),
        (
            "verify_full",
            with(&[("tls", "\"verify_full\""), ("tls_ca_file", &ca)]),
        ),
        (
            "require, TLS 1.2 only",
            with(&[("tls", "\"require\""), ("tls_protocols", "\"tlsv1.2\"")]),
        ),
    ] {
        let (_handle, port) = start_pooler(&config);
        let leg = server_leg(port, "trust_user")
            .unwrap_or_else(|e| panic!("storage tls = {what}: {}", describe(&e)));
        assert_eq!(
            leg, "true ",
            "storage tls = {what}: pg_stat_ssl of the server leg"
        );
    }
    {
        let (_handle, port) = start_pooler(&with(&[
            ("tls", "\"require\""),
            ("tls_protocols", "\"tlsv1.2\""),
        ]));
        let mut c = connect(port, "test", "trust_user", None);
        assert_eq!(
            scalar(
                &mut c,
                "select version from pg_stat_ssl where pid = pg_backend_pid()"
            )
            .as_deref(),
            Some("TLSv1.2"),
            "tls_protocols = tlsv1.2 on the storage"
        );
    }

    // Plaintext towards a hostssl-only server: PostgreSQL's 28000 reaches
    // the client.
    {
        let (_handle, port) = start_pooler(&with(&[("tls", "\"disable\"")]));
        let e = server_leg(port, "trust_user")
            .expect_err("storage tls = disable against a hostssl-only server");
        assert_eq!(
            e.code().map(SqlState::code),
            Some(SQLSTATE_28000),
            "storage tls = disable: {}",
            describe(&e)
        );
        assert!(
            describe(&e).contains("pg_hba.conf"),
            "storage tls = disable: PostgreSQL's reason should reach the client: {}",
            describe(&e)
        );
    }
    // `allow`: refused in plaintext, then tried again over TLS.
    {
        let (_handle, port) = start_pooler(&with(&[("tls", "\"allow\"")]));
        for i in 0..3 {
            let leg = server_leg(port, "trust_user")
                .unwrap_or_else(|e| panic!("storage tls = allow, login {i}: {}", describe(&e)));
            assert_eq!(leg, "true ", "storage tls = allow, login {i}");
        }
    }

    // verify_* with a CA that did not sign the server's certificate.
    for mode in ["verify_ca", "verify_full"] {
        let (_handle, port) = start_pooler(&with(&[
            ("tls", &format!("{mode:?}")),
            ("tls_ca_file", &other_ca),
        ]));
        let e = server_leg(port, "trust_user").expect_err(&format!("storage {mode}, wrong CA"));
        assert_eq!(
            e.code().map(SqlState::code),
            Some("08006"),
            "storage {mode}, wrong CA: {}",
            describe(&e)
        );
        assert!(
            describe(&e).contains("TLS"),
            "storage {mode}, wrong CA: {}",
            describe(&e)
        );
    }

    // Never TLS over a Unix socket, whatever the mode.
    {
        let dir = tv(pg.datadir());
        let (_handle, port) = start_pooler(&with(&[
            ("tls", "\"verify_full\""),
            ("tls_ca_file", &ca),
            ("unix_socket_dir", &dir),
        ]));
        let leg = server_leg(port, "trust_user")
            .unwrap_or_else(|e| panic!("verify_full over a Unix socket: {}", describe(&e)));
        assert_eq!(leg, "false ", "verify_full over a Unix socket");
    }

    // A client certificate towards PostgreSQL (`cert` in pg_hba.conf).
    {
        let app_cert = tv(&app.cert);
        let app_key = tv(&app.key);
        let (_handle, port) = start_pooler(&with(&[
            ("tls", "\"verify_full\""),
            ("tls_ca_file", &ca),
            ("tls_cert_file", &app_cert),
            ("tls_key_file", &app_key),
        ]));
        let leg = server_leg(port, "app")
            .unwrap_or_else(|e| panic!("storage with app's certificate: {}", describe(&e)));
        assert_eq!(leg, "true /CN=app", "the certificate PostgreSQL saw");
    }
    {
        let (_handle, port) =
            start_pooler(&with(&[("tls", "\"verify_full\""), ("tls_ca_file", &ca)]));
        let e = server_leg(port, "app").expect_err("app without a certificate");
        assert_eq!(
            e.code().map(SqlState::code),
            Some(SQLSTATE_28000),
            "app without a certificate: {}",
            describe(&e)
        );
    }
}

/// The issue's "done when": psql and psycopg, sslmode=verify-full and
/// SCRAM, through odissey to a PostgreSQL that requires TLS (storage
/// verify_full).
#[test]
fn verify_full_and_scram_end_to_end() {
    let _w = watchdog("verify_full_and_scram_end_to_end", LIMIT);
    require_psycopg();
    let pki = Pki::new();
    let pg = tls_cluster(&pki);
    let server = pki.server();
    let config = listener_tls(
        Config::new(pg.port())
            .route(scram_route("test", "scram_user", "scram_pass"))
            .storage("tls", "\"verify_full\"")
            .storage("tls_ca_file", &tv(&pki.ca_file)),
        "require",
        &server,
        None,
    );
    let (_handle, port) = start_pooler(&config);
    let params = Libpq::new(port, "localhost", "scram_user", "verify-full")
        .root(&pki.ca_file)
        .set("password", "scram_pass");

    // The cluster refuses plaintext: being served means the server leg is
    // TLS too (psycopg checks it below).
    let out = psql_tls_ok(&params, "psql verify-full + SCRAM");
    assert!(out.contains("as user \"scram_user\""), "{out}");
    // psycopg's libpq (16+) can insist on SCRAM.
    psycopg_tls_ok(
        &params.clone().set("require_auth", "scram-sha-256"),
        "select current_user || ' ' || ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
        "scram_user true",
        "psycopg verify-full + SCRAM, server leg over TLS",
    );
    // Wrong password: refused by odissey's SCRAM.
    let err = psql_refused(
        &params.clone().set("password", "wrong"),
        "psql with a wrong password",
    );
    assert!(
        err.contains("password authentication failed for user \"scram_user\""),
        "{err}"
    );
    let err = psycopg_refused(
        &params.clone().set("password", "wrong"),
        "psycopg with a wrong password",
    );
    assert!(err.contains("password authentication failed"), "{err}");

    // passthrough: odissey checks the password by logging in to PostgreSQL
    // with it, over TLS.
    let config = listener_tls(
        Config::new(pg.port())
            .route(Route {
                authentication: "passthrough".into(),
                ..Route::new("test", "scram_user")
            })
            .storage("tls", "\"verify_full\"")
            .storage("tls_ca_file", &tv(&pki.ca_file)),
        "require",
        &server,
        None,
    );
    let (_passthrough, port) = start_pooler(&config);
    let params = params.set("port", port);
    psql_tls_ok(&params, "psql verify-full + passthrough");
    let err = psql_refused(
        &params.clone().set("password", "wrong"),
        "passthrough with a wrong password",
    );
    assert!(err.contains("password authentication failed"), "{err}");

    // passthrough with storage `allow`: the probe and the pooled login are
    // refused in plaintext and tried again over TLS.
    let config = listener_tls(
        Config::new(pg.port())
            .route(Route {
                authentication: "passthrough".into(),
                ..Route::new("test", "scram_user")
            })
            .storage("tls", "\"allow\""),
        "require",
        &server,
        None,
    );
    let (_allow, port) = start_pooler(&config);
    let params = params.set("port", port);
    psycopg_tls_ok(
        &params,
        "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()",
        "true",
        "psycopg, passthrough, storage allow",
    );
    let err = psql_refused(
        &params.clone().set("password", "wrong"),
        "passthrough with a wrong password, storage allow",
    );
    assert!(err.contains("password authentication failed"), "{err}");
}

// ---------------------------------------------------------------------------
// Negotiation: direct TLS (PostgreSQL 17), GSSENCRequest, versions
// ---------------------------------------------------------------------------

/// The ways a client may start TLS. Direct TLS (a ClientHello first) with
/// ALPN "postgresql": served; without ALPN: 08P01; psycopg's libpq (17+)
/// with sslnegotiation=direct. GSSENCRequest refused, then SSLRequest (as
/// libpq does with gssencmode=prefer): served. An SSLRequest inside TLS,
/// and bytes sent after an SSLRequest before its answer (CVE-2021-23214):
/// 08P01.
#[test]
fn tls_negotiation_variants() {
    let _w = watchdog("tls_negotiation_variants", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let server = pki.server();
    let config = listener_tls(
        Config::new(pg.port()).route(Route::new("test", "trust_user")),
        "require",
        &server,
        None,
    );
    let (_handle, port) = start_pooler(&config);
    let client = TlsClient::trusting(&pki.ca);

    let mut s =
        client
            .clone()
            .direct(true)
            .served(port, "trust_user", "test", "direct TLS with ALPN");
    assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"));
    s.terminate();
    client
        .clone()
        .direct(false)
        .refused(port, "trust_user", "test", "direct TLS without ALPN")
        .expect_error("08P01", "ALPN", "direct TLS without ALPN");
    let mut s =
        client
            .clone()
            .gss_first()
            .served(port, "trust_user", "test", "GSSENCRequest first");
    assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"));
    // A TLS 1.3 KeyUpdate mid-session.
    s.stream
        .conn
        .refresh_traffic_keys()
        .expect("refresh_traffic_keys");
    assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"));
    s.terminate();
    // A ClientHello that arrives in pieces, direct (first byte alone) and
    // after SSLRequest.
    for (what, c) in [
        ("direct, split", client.clone().direct(true).split_hello(1)),
        ("direct, split", client.clone().direct(true).split_hello(7)),
        ("SSLRequest, split", client.clone().split_hello(3)),
    ] {
        let mut s = c.served(port, "trust_user", "test", what);
        assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"), "{what}");
        s.terminate();
    }

    // SSLRequest again, inside TLS.
    let mut st = client
        .handshake(port)
        .unwrap_or_else(|r| panic!("handshake: {r:?}"));
    st.write_all(&SSL_REQUEST)
        .expect("write SSLRequest over TLS");
    let (tag, body) = read_msg(&mut st).expect("the answer to SSLRequest over TLS");
    assert_eq!(tag, b'E', "SSLRequest over TLS");
    let e = parse_error_fields(&body);
    assert_eq!(
        (
            e.code.as_str(),
            e.message.contains("SSLRequest on a TLS connection")
        ),
        ("08P01", true),
        "{e:?}"
    );

    // A ClientHello's first bytes right behind the SSLRequest, in one write.
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut eager = SSL_REQUEST.to_vec();
    eager.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x03]);
    tcp.write_all(&eager).expect("write");
    let got = read_until_closed(&mut tcp, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("data after SSLRequest: {e}"));
    let msgs = split_messages(&got);
    let e = match msgs.first() {
        Some((b'E', body)) => parse_error_fields(body),
        _ => panic!("data after SSLRequest: expected an ErrorResponse, got {got:?}"),
    };
    assert_eq!(
        (
            e.code.as_str(),
            e.message.contains("unexpected data after SSL request")
        ),
        ("08P01", true),
        "{e:?}"
    );

    let libpq_version = Command::new("python3")
        .args(["-c", "import psycopg; print(psycopg.pq.version())"])
        .output()
        .ok()
        .and_then(|o| text(&o.stdout).trim().parse::<u32>().ok())
        .unwrap_or(0);
    if libpq_version >= 170_000 {
        psycopg_tls_ok(
            &Libpq::new(port, "localhost", "trust_user", "verify-full")
                .root(&pki.ca_file)
                .set("sslnegotiation", "direct"),
            "select 41 + 1",
            "42",
            "psycopg sslnegotiation=direct",
        );
    }
}

/// `tls_protocols = "tlsv1.2"` on a listener: a TLS 1.3-only client fails
/// the handshake, others get TLS 1.2.
#[test]
fn listener_tls_protocols() {
    let _w = watchdog("listener_tls_protocols", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let server = pki.server();
    let config = listener_tls(
        Config::new(pg.port()).route(Route::new("test", "trust_user")),
        "require",
        &server,
        None,
    )
    .listen("tls_protocols", "\"tlsv1.2\"");
    let (_handle, port) = start_pooler(&config);
    let client = TlsClient::trusting(&pki.ca);

    client
        .clone()
        .versions(&[&rustls::version::TLS13])
        .refused(port, "trust_user", "test", "TLS 1.3 only")
        .expect_tls("ProtocolVersion", "TLS 1.3 only");
    let s = client.served(port, "trust_user", "test", "TLS 1.2 or 1.3");
    assert_eq!(s.protocol(), Some(rustls::ProtocolVersion::TLSv1_2));
    s.terminate();
    let params = Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file);
    let out = psql_tls_ok(&params, "psql, default versions");
    assert!(out.contains("protocol: TLSv1.2"), "{out}");
    psql_refused(
        &params.set("ssl_min_protocol_version", "TLSv1.3"),
        "psql, TLS 1.3 at least",
    );
}

// ---------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------

/// Certificates are re-read on reload; files that don't load leave the
/// previous certificate in place.
#[test]
fn reload_swaps_certificates_and_keeps_them_when_bad() {
    let _w = watchdog("reload_swaps_certificates_and_keeps_them_when_bad", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let server = pki.server();
    let config = listener_tls(
        Config::new(pg.port()).route(Route::new("test", "trust_user")),
        "require",
        &server,
        None,
    );
    let (handle, port) = start_pooler(&config);
    let by_a = Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file);
    let by_b = by_a.clone().root(&pki.other_ca_file);

    psql_tls_ok(&by_a, "CA A before the reload");
    psql_refused(&by_b, "CA B before the reload");
    let mut before = TlsClient::trusting(&pki.ca).served(port, "trust_user", "test", "before");

    // Certificate B, from the other CA, in the same files.
    let b = pki.other.server(&["localhost", "127.0.0.1"]);
    pki.save("server.crt", &b.cert_pem);
    pki.save("server.key", &b.key_pem);
    handle
        .reload(Some(ConfigSource::Toml(config.toml())))
        .unwrap_or_else(|e| panic!("reload with certificate B: {e}"));
    psql_tls_ok(&by_b, "CA B after the reload");
    let err = psql_refused(&by_a, "CA A after the reload");
    assert!(err.contains("certificate verify failed"), "{err}");
    TlsClient::trusting(&pki.other)
        .served(port, "trust_user", "test", "rustls, CA B")
        .terminate();
    // The connection made before the reload carries on.
    assert_eq!(before.scalar("select 41 + 1").as_deref(), Some("42"));

    // Garbage: the reload may be refused or warn, the pooler keeps serving
    // with certificate B.
    pki.save(
        "server.crt",
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    );
    let reloaded = handle.reload(Some(ConfigSource::Toml(config.toml())));
    assert_tls_reload_kept(reloaded, "a garbage certificate");
    handle
        .inspect()
        .unwrap_or_else(|e| panic!("the pooler after a bad reload: {e}"));
    psql_tls_ok(&by_b, "CA B after the bad reload");
    psql_refused(&by_a, "CA A after the bad reload");
    assert_eq!(before.scalar("select 41 + 1").as_deref(), Some("42"));
    before.terminate();

    // A key that doesn't match the certificate: same.
    pki.save("server.crt", &b.cert_pem);
    pki.save("server.key", &pki.ca.server(&["localhost"]).key_pem);
    let reloaded = handle.reload(Some(ConfigSource::Toml(config.toml())));
    assert_tls_reload_kept(reloaded, "a mismatched key");
    psql_tls_ok(&by_b, "CA B after the mismatched-key reload");
    psql_refused(&by_a, "CA A after the mismatched-key reload");

    // The listener's mode changes on reload too.
    pki.save("server.key", &b.key_pem);
    let plain = Config::new(pg.port()).route(Route::new("test", "trust_user"));
    handle
        .reload(Some(ConfigSource::Toml(plain.toml())))
        .unwrap_or_else(|e| panic!("reload to tls = disable: {e}"));
    let err = psql_refused(
        &by_b.clone().set("sslmode", "require"),
        "sslmode=require after the reload to disable",
    );
    assert!(err.contains("server does not support SSL"), "{err}");
    let mut c = connect(port, "test", "trust_user", None);
    assert_eq!(scalar(&mut c, "select 41 + 1").as_deref(), Some("42"));
    handle
        .reload(Some(ConfigSource::Toml(config.toml())))
        .unwrap_or_else(|e| panic!("reload back to tls = require: {e}"));
    plaintext_refused(port, "trust_user", None, SQLSTATE_28000, "TLS is required");
    psql_tls_ok(&by_b, "CA B after the reload back to require");
    // The plaintext client logged in meanwhile carries on.
    assert_eq!(scalar(&mut c, "select 41 + 1").as_deref(), Some("42"));
}

/// A reload whose TLS files don't load either is refused as a whole
/// (`Error::Config` naming the listener: "a failure leaves everything as
/// it was") or goes through keeping the listener's previous TLS; both
/// leave the pooler serving the old certificate.
#[track_caller]
fn assert_tls_reload_kept(reloaded: Result<Vec<String>, odissey::Error>, what: &str) {
    if let Err(e) = reloaded {
        let shown = e.to_string();
        assert!(
            shown.contains("listen[0]"),
            "reload with {what}: the error should name the listener: {shown}"
        );
    }
}

// ---------------------------------------------------------------------------
// A handshake that stalls
// ---------------------------------------------------------------------------

/// A client that sends SSLRequest, reads 'S' and then nothing, one that
/// stops in the middle of its ClientHello, and one that finishes TLS but
/// sends no startup packet are dropped after `auth_timeout`; others are
/// served meanwhile.
#[test]
fn stalled_tls_handshake_is_dropped_after_auth_timeout() {
    let _w = watchdog("stalled_tls_handshake_is_dropped_after_auth_timeout", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let server = pki.server();
    let config = listener_tls(
        Config::new(pg.port())
            .route(Route::new("test", "trust_user"))
            .global("auth_timeout", "500"),
        "require",
        &server,
        None,
    );
    let (_handle, port) = start_pooler(&config);

    let started = Instant::now();
    let mut after_s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    after_s.write_all(&SSL_REQUEST).expect("write SSLRequest");
    let mut answer = [0u8; 1];
    after_s
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set_read_timeout");
    after_s.read_exact(&mut answer).expect("read the answer");
    assert_eq!(answer[0], b'S');
    // Half a ClientHello record: header announcing 512 bytes, 5 sent.
    let mut half_hello = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    half_hello
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03])
        .expect("write half a ClientHello");
    // TLS done, no startup packet.
    let mut no_startup = TlsClient::trusting(&pki.ca)
        .handshake(port)
        .unwrap_or_else(|r| panic!("handshake: {r:?}"));

    // Meanwhile, other clients are served.
    let mut s = TlsClient::trusting(&pki.ca).served(port, "trust_user", "test", "meanwhile");
    assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"));
    let served_after = started.elapsed();

    for (what, stream) in [
        ("after 'S'", &mut after_s),
        ("half a ClientHello", &mut half_hello),
    ] {
        let got = read_until_closed(stream, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("stalled {what}: {e}"));
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(400),
            "stalled {what}: closed after {waited:?}, before auth_timeout (500 ms)"
        );
        assert!(
            got.is_empty() || got[0] == 0x15,
            "stalled {what}: nothing or a TLS alert expected, got {got:?}"
        );
    }
    match read_msg(&mut no_startup) {
        Ok((b'E', body)) => {
            let e = parse_error_fields(&body);
            assert_eq!(e.code, "08P01", "no startup after TLS: {e:?}");
        }
        Ok((tag, _)) => panic!("no startup after TLS: got message {:?}", tag as char),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            panic!("no startup after TLS: still open after 10 s")
        }
        Err(_) => {}
    }
    assert!(started.elapsed() >= Duration::from_millis(400));
    eprintln!(
        "served another client {served_after:?} in; stalled ones closed by {:?}",
        started.elapsed()
    );
    // Still serving, on the old connection and new ones.
    assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"));
    s.terminate();
    TlsClient::trusting(&pki.ca)
        .served(port, "trust_user", "test", "after the stalled ones")
        .terminate();
}

// ---------------------------------------------------------------------------
// Pooling, large data and cancel over TLS on both legs
// ---------------------------------------------------------------------------

/// `pool_size = 1` in transaction mode with two workers: TLS clients on
/// both workers take turns on one TLS server connection (moved between
/// workers as the router sees fit).
#[test]
fn transaction_pooling_over_tls_on_both_legs() {
    let _w = watchdog("transaction_pooling_over_tls_on_both_legs", LIMIT);
    let pki = Pki::new();
    let pg = tls_cluster(&pki);
    let server = pki.server();
    let config = listener_tls(
        Config::new(pg.port())
            .workers(2)
            .route(Route::new("test", "trust_user").transaction().pool_size(1))
            .storage("tls", "\"verify_full\"")
            .storage("tls_ca_file", &tv(&pki.ca_file)),
        "require",
        &server,
        None,
    );
    let (handle, port) = start_pooler(&config);
    let sql = "select pg_backend_pid()::text || ' ' || ssl::text \
               from pg_stat_ssl where pid = pg_backend_pid()";

    let seen: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..6)
            .map(|i| {
                let client = TlsClient::trusting(&pki.ca);
                scope.spawn(move || {
                    let what = format!("client {i}");
                    let mut s = client.served(port, "trust_user", "test", &what);
                    let mut seen = Vec::new();
                    for _ in 0..25 {
                        seen.push(s.scalar(sql).unwrap_or_default());
                    }
                    s.terminate();
                    seen
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a client thread panicked"))
            .collect()
    });
    assert_eq!(seen.len(), 150);
    let mut distinct = seen.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        1,
        "one TLS server connection for everyone: {distinct:?}"
    );
    assert!(distinct[0].ends_with(" true"), "{distinct:?}");
    let i = handle.inspect().expect("inspect");
    assert!(servers_total(&i) <= 1, "{i:?}");
}

/// Results of many megabytes, a slow reader, a large query text and COPY
/// FROM STDIN, through TLS on both legs.
#[test]
fn large_data_over_tls_on_both_legs() {
    let _w = watchdog("large_data_over_tls_on_both_legs", LIMIT);
    let pki = Pki::new();
    let pg = tls_cluster(&pki);
    pg.sql(
        "test",
        "create table tls_copy (n int, t text); grant all on tls_copy to public",
    );
    let server = pki.server();
    let config = listener_tls(
        Config::new(pg.port())
            .route(Route::new("test", "trust_user"))
            .storage("tls", "\"require\""),
        "require",
        &server,
        None,
    );
    let (_handle, port) = start_pooler(&config);
    let mut s = TlsClient::trusting(&pki.ca).served(port, "trust_user", "test", "large data");

    // 16 rows of 1 MiB.
    let rows = s
        .query("select repeat('x', 1048576) from generate_series(1, 16)")
        .unwrap_or_else(|e| panic!("16 MiB result: {e:?}"));
    assert_eq!(rows.len(), 16);
    assert!(rows
        .iter()
        .all(|r| r.as_deref().map(str::len) == Some(1_048_576)));
    // 32 MiB while the client does not read for a while: odissey's
    // buffers fill, then it must resume.
    let sql = "select repeat(md5(g::text), 32768) from generate_series(1, 32) g";
    s.send_query(sql);
    std::thread::sleep(Duration::from_millis(500));
    let rows = s
        .read_reply(sql)
        .unwrap_or_else(|e| panic!("slow reader: {e:?}"));
    assert_eq!(rows.len(), 32);
    assert!(rows
        .iter()
        .all(|r| r.as_deref().map(str::len) == Some(1_048_576)));
    // 2000 queries in one write, then their replies.
    let mut batch = Vec::new();
    for i in 0..2000 {
        let sql = format!("select repeat('q', 1000) || '{i}'");
        batch.push(b'Q');
        batch.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
        batch.extend_from_slice(sql.as_bytes());
        batch.push(0);
    }
    s.stream.write_all(&batch).expect("write 2000 queries");
    for i in 0..2000 {
        let rows = s
            .read_reply("pipelined")
            .unwrap_or_else(|e| panic!("pipelined query {i}: {e:?}"));
        assert_eq!(
            rows,
            vec![Some(format!("{}{i}", "q".repeat(1000)))],
            "pipelined query {i}"
        );
    }
    // 4 MiB of query text.
    let literal = "y".repeat(4 << 20);
    assert_eq!(
        s.scalar(&format!("select length('{literal}')")).as_deref(),
        Some("4194304")
    );
    assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"));
    s.terminate();

    // psql's \copy: COPY FROM STDIN of ~6 MB.
    let mut data = String::new();
    for n in 0..60_000 {
        data.push_str(&format!("{n}\t{}\n", "z".repeat(90)));
    }
    let file = pki.save("copy.tsv", &data);
    let out = psql_commands(
        &Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file),
        &[
            &format!("\\copy tls_copy from '{}'", file.display()),
            "select count(*) || ' ' || sum(n) || ' ' || sum(length(t)) from tls_copy",
            "\\conninfo",
        ],
    );
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "psql \\copy: {stdout}{}",
        text(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim() == "60000 1799970000 5400000"),
        "psql \\copy: {stdout}"
    );
    assert!(stdout.contains("SSL connection"), "{stdout}");
}

/// A query cancelled through odissey, with TLS on both legs: a plaintext
/// CancelRequest (as libpq before 17 sends it) on a `require` listener,
/// and psycopg's cancel (libpq 17+ encrypts it).
#[test]
fn cancel_over_tls() {
    let _w = watchdog("cancel_over_tls", LIMIT);
    require_psycopg();
    let pki = Pki::new();
    let pg = tls_cluster(&pki);
    let server = pki.server();
    let config = listener_tls(
        Config::new(pg.port())
            .route(Route::new("test", "trust_user"))
            .storage("tls", "\"verify_full\"")
            .storage("tls_ca_file", &tv(&pki.ca_file)),
        "require",
        &server,
        None,
    );
    let (_handle, port) = start_pooler(&config);

    let mut s = TlsClient::trusting(&pki.ca).served(port, "trust_user", "test", "to cancel");
    let started = Instant::now();
    let sql = "select pg_sleep(20)";
    s.send_query(sql);
    std::thread::sleep(Duration::from_millis(300));
    let (pid, key) = s.cancel_key;
    send_cancel_request(port, pid, key);
    let e = s
        .read_reply(sql)
        .expect_err("pg_sleep(20) should be cancelled");
    assert_eq!(e.code, "57014", "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"));
    s.terminate();

    let script = r#"
import sys, threading, time
import psycopg
with psycopg.connect(sys.argv[1]) as conn:
    cancel = getattr(conn, "cancel_safe", None) or conn.cancel
    threading.Timer(0.3, cancel).start()
    started = time.time()
    try:
        conn.execute("select pg_sleep(20)")
        print("not cancelled")
    except psycopg.errors.QueryCanceled:
        print("cancelled ssl_in_use=%s in %.0f s" % (conn.pgconn.ssl_in_use, time.time() - started))
"#;
    let params = Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file);
    let out = python(script, &[&params.conninfo()]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success() && stdout.starts_with("cancelled ssl_in_use=True in "),
        "psycopg cancel: {stdout}{}",
        text(&out.stderr)
    );
}

// ---------------------------------------------------------------------------
// More storage TLS: a server without TLS, host checks, reload
// ---------------------------------------------------------------------------

/// `prefer` falls back to plaintext when the server answers 'N', `allow`
/// stays in plaintext; `require` and `verify_full` refuse to.
#[test]
fn storage_tls_against_a_server_without_tls() {
    let _w = watchdog("storage_tls_against_a_server_without_tls", LIMIT);
    let pki = Pki::new();
    let pg = PgCluster::start();
    let base = Config::new(pg.port()).route(Route::new("test", "trust_user"));

    for mode in ["prefer", "allow"] {
        let (_h, port) = start_pooler(&base.clone().storage("tls", &format!("{mode:?}")));
        let leg = server_leg(port, "trust_user")
            .unwrap_or_else(|e| panic!("{mode} without TLS: {}", describe(&e)));
        assert_eq!(leg, "false ", "{mode} without TLS: plaintext");
    }

    for (mode, extra) in [
        ("require", None),
        ("verify_full", Some(("tls_ca_file", tv(&pki.ca_file)))),
    ] {
        let mut config = base.clone().storage("tls", &format!("{mode:?}"));
        if let Some((k, v)) = &extra {
            config = config.storage(k, v);
        }
        let (_h, port) = start_pooler(&config);
        let e = server_leg(port, "trust_user").expect_err(mode);
        assert_eq!(
            e.code().map(SqlState::code),
            Some("08006"),
            "{mode}: {}",
            describe(&e)
        );
        assert!(
            describe(&e).contains("TLS is required and the server does not support it"),
            "{mode}: {}",
            describe(&e)
        );
    }
}

/// A reload that makes the storage's TLS stricter (here `disable` to
/// `verify_full`) must hold for every client that logs in after it, as
/// PgBouncer recycles its server connections when `server_tls_*` change.
/// odissey keeps handing out the servers it opened under the old settings.
#[test]
fn storage_tls_reload_applies_to_pooled_servers() {
    let _w = watchdog("storage_tls_reload_applies_to_pooled_servers", LIMIT);
    let pki = Pki::new();
    let pg = tls_cluster_with(&pki, false);
    let base = Config::new(pg.port())
        .workers(1)
        .route(Route::new("test", "trust_user").transaction());
    let (handle, port) = start_pooler(&base.clone().storage("tls", "\"disable\""));
    let leg = server_leg(port, "trust_user")
        .unwrap_or_else(|e| panic!("before the reload: {}", describe(&e)));
    assert_eq!(leg, "false ", "tls = disable: plaintext");

    handle
        .reload(Some(ConfigSource::Toml(
            base.clone()
                .storage("tls", "\"verify_full\"")
                .storage("tls_ca_file", &tv(&pki.ca_file))
                .toml(),
        )))
        .unwrap_or_else(|e| panic!("reload to verify_full: {e}"));
    for i in 0..3 {
        let leg = server_leg(port, "trust_user")
            .unwrap_or_else(|e| panic!("after the reload, client {i}: {}", describe(&e)));
        assert_eq!(
            leg, "true ",
            "after the reload to tls = verify_full, client {i}: the server leg must be TLS"
        );
    }
}

/// `verify_full` towards PostgreSQL checks that the certificate names the
/// storage's `host` (a DNS name or an IP address); `verify_ca` does not.
#[test]
fn storage_verify_full_checks_the_host() {
    let _w = watchdog("storage_verify_full_checks_the_host", LIMIT);
    let pki = Pki::new();
    let pg = tls_cluster_for(&pki, &["otherhost"], true);
    let ca = tv(&pki.ca_file);
    let base = Config::new(pg.port()).route(Route::new("test", "trust_user"));
    let by_name = |config: &Config| {
        config.toml().replace(
            "[storage.main]\ntype = \"remote\"\nhost = \"127.0.0.1\"",
            "[storage.main]\ntype = \"remote\"\nhost = \"localhost\"",
        )
    };

    let verify_ca = base
        .clone()
        .storage("tls", "\"verify_ca\"")
        .storage("tls_ca_file", &ca);
    let (_h, port) = start_pooler(&verify_ca);
    assert_eq!(
        server_leg(port, "trust_user").unwrap_or_else(|e| panic!("verify_ca: {}", describe(&e))),
        "true "
    );
    let verify_full = base
        .clone()
        .storage("tls", "\"verify_full\"")
        .storage("tls_ca_file", &ca);
    for (what, toml) in [
        ("host = 127.0.0.1", verify_full.toml()),
        ("host = localhost", by_name(&verify_full)),
    ] {
        assert!(
            toml.contains(&what.replace("host = ", "host = \"")),
            "{toml}"
        );
        let (_h, port) = start_pooler_from(ConfigSource::Toml(toml));
        let e = match server_leg(port, "trust_user") {
            Ok(v) => panic!("verify_full, {what}: served ({v}) by a certificate for otherhost"),
            Err(e) => e,
        };
        assert_eq!(
            e.code().map(SqlState::code),
            Some("08006"),
            "verify_full, {what}: {}",
            describe(&e)
        );
        assert!(
            describe(&e).contains("not valid for name"),
            "verify_full, {what}: {}",
            describe(&e)
        );
    }
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// TLS settings that cannot work are refused when the config is loaded.
#[test]
fn unusable_tls_settings_are_refused_at_start() {
    let _w = watchdog("unusable_tls_settings_are_refused_at_start", LIMIT);
    let pki = Pki::new();
    let server = pki.server();
    let other_key = pki.save("other.key", &pki.ca.server(&["localhost"]).key_pem);
    let garbage = pki.save("garbage.crt", "not a certificate\n");
    let base = Config::new(5432).route(Route::new("test", "trust_user"));
    let cert = tv(&server.cert);
    let key = tv(&server.key);
    let ca = tv(&pki.ca_file);
    let l = |lines: &[(&str, &str)]| lines.iter().fold(base.clone(), |c, (k, v)| c.listen(k, v));
    let st = |lines: &[(&str, &str)]| lines.iter().fold(base.clone(), |c, (k, v)| c.storage(k, v));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "tls without a certificate",
            l(&[("tls", "\"require\"")]).toml(),
            "tls_cert_file",
        ),
        (
            "verify_ca without a CA",
            l(&[
                ("tls", "\"verify_ca\""),
                ("tls_cert_file", &cert),
                ("tls_key_file", &key),
            ])
            .toml(),
            "tls_ca_file",
        ),
        (
            "a missing certificate file",
            l(&[
                ("tls", "\"require\""),
                ("tls_cert_file", "\"/nonexistent/server.crt\""),
                ("tls_key_file", &key),
            ])
            .toml(),
            "/nonexistent/server.crt",
        ),
        (
            "a certificate file without a certificate",
            l(&[
                ("tls", "\"require\""),
                ("tls_cert_file", &tv(&garbage)),
                ("tls_key_file", &key),
            ])
            .toml(),
            "listen[0]",
        ),
        (
            "a key that is not the certificate's",
            l(&[
                ("tls", "\"require\""),
                ("tls_cert_file", &cert),
                ("tls_key_file", &tv(&other_key)),
            ])
            .toml(),
            "does not match",
        ),
        (
            "an unknown protocol version",
            l(&[
                ("tls", "\"require\""),
                ("tls_cert_file", &cert),
                ("tls_key_file", &key),
                ("tls_protocols", "\"sslv3\""),
            ])
            .toml(),
            "tls_protocols",
        ),
        (
            "an unknown listener mode",
            l(&[("tls", "\"prefer\"")]).toml(),
            "tls",
        ),
        (
            "storage verify_full without a CA",
            st(&[("tls", "\"verify_full\"")]).toml(),
            "tls_ca_file",
        ),
        (
            "cert authentication without a listener CA",
            l(&[
                ("tls", "\"require\""),
                ("tls_cert_file", &cert),
                ("tls_key_file", &key),
            ])
            .route(cert_route("test", "app"))
            .toml(),
            "cert",
        ),
        (
            "cert authentication on a listener without TLS",
            l(&[("tls_ca_file", &ca)])
                .route(cert_route("test", "app"))
                .toml(),
            "cert",
        ),
    ];
    for (what, toml, needle) in cases {
        match odissey::start(ConfigSource::Toml(toml.clone())) {
            Ok(h) => {
                let _ = h.shutdown(Duration::from_secs(1));
                panic!("{what}: the config was accepted:\n{toml}");
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.contains(needle), "{what}: {needle:?} not in {e:?}");
            }
        }
    }
}

/// Keys in SEC1 ("EC PRIVATE KEY") and PKCS#1 ("RSA PRIVATE KEY") PEM, as
/// openssl writes them, serve psql.
#[test]
fn listener_keys_in_sec1_and_pkcs1() {
    let _w = watchdog("listener_keys_in_sec1_and_pkcs1", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            text(&out.stderr)
        );
    };
    let dir = pki.dir.path();
    let path = |name: &str| dir.join(name).display().to_string();

    // SEC1: the server certificate's own key, rewritten.
    let ec = pki.server();
    openssl(&["ec", "-in", &path("server.key"), "-out", &path("sec1.key")]);
    // PKCS#1: a fresh RSA key, certified by the CA through rcgen.
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        &path("rsa-pkcs8.key"),
    ]);
    openssl(&[
        "pkey",
        "-in",
        &path("rsa-pkcs8.key"),
        "-traditional",
        "-out",
        &path("pkcs1.key"),
    ]);
    let rsa_pem = std::fs::read_to_string(path("rsa-pkcs8.key")).expect("read the RSA key");
    let rsa = KeyPair::from_pem(&rsa_pem).expect("the RSA key for rcgen");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let rsa_cert = params
        .signed_by(&rsa, &pki.ca.cert, &pki.ca.key)
        .expect("sign the RSA certificate");
    let rsa_cert = pki.save("rsa.crt", &rsa_cert.pem());

    for (what, cert, key, header) in [
        (
            "SEC1",
            ec.cert.clone(),
            dir.join("sec1.key"),
            "BEGIN EC PRIVATE KEY",
        ),
        (
            "PKCS#1",
            rsa_cert,
            dir.join("pkcs1.key"),
            "BEGIN RSA PRIVATE KEY",
        ),
    ] {
        let pem = std::fs::read_to_string(&key).expect("read the key");
        assert!(pem.contains(header), "{what}: {pem}");
        let config = Config::new(pg.port())
            .route(Route::new("test", "trust_user"))
            .listen("tls", "\"require\"")
            .listen("tls_cert_file", &tv(&cert))
            .listen("tls_key_file", &tv(&key));
        let (_h, port) = start_pooler(&config);
        psql_tls_ok(
            &Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file),
            what,
        );
    }
}

// ---------------------------------------------------------------------------
// Certificate chains, CA bundles
// ---------------------------------------------------------------------------

/// A server certificate from an intermediate CA (the file holds leaf and
/// intermediate) verifies against the root alone; client certificates from
/// the intermediate (sent with it) and from a second root of a CA bundle
/// are accepted, on a `verify_full` listener (the CN is the leaf's, not the
/// intermediate's).
#[test]
fn certificate_chains_and_ca_bundles() {
    let _w = watchdog("certificate_chains_and_ca_bundles", LIMIT);
    let pg = PgCluster::start();
    let pki = Pki::new();
    let inter = pki.ca.intermediate("odissey intermediate CA");
    let server = pki.save_leaf("chained-server", inter.server(&["localhost", "127.0.0.1"]));
    let bundle = pki.save(
        "bundle.crt",
        &format!("{}{}", pki.ca.cert.pem(), pki.other.cert.pem()),
    );
    let config = listener_tls(
        Config::new(pg.port()).route(Route::new("test", "trust_user")),
        "verify_full",
        &server,
        Some(&bundle),
    );
    let (_handle, port) = start_pooler(&config);
    let client = TlsClient::trusting(&pki.ca);

    let chained = pki.save_leaf("chained-client", inter.client("trust_user"));
    assert_eq!(chained.leaf.chain_der.len(), 2);
    let mut s =
        client
            .clone()
            .cert(&chained.leaf)
            .served(port, "trust_user", "test", "a client chain");
    assert_eq!(s.scalar("select 41 + 1").as_deref(), Some("42"));
    s.terminate();
    let params = Libpq::new(port, "localhost", "trust_user", "verify-full").root(&pki.ca_file);
    psql_tls_ok(&params.clone().cert(&chained), "psql with a client chain");
    // The other root of the bundle.
    let stranger = pki.stranger("trust_user");
    client
        .clone()
        .cert(&stranger.leaf)
        .served(port, "trust_user", "test", "the bundle's second root")
        .terminate();
    // The leaf alone cannot be tied to a root.
    let mut alone = chained.leaf.clone();
    alone.chain_der.truncate(1);
    client
        .cert(&alone)
        .refused(port, "trust_user", "test", "leaf without its intermediate")
        .expect_tls("UnknownCA", "leaf without its intermediate");
}

// ---------------------------------------------------------------------------
// Connections that end
// ---------------------------------------------------------------------------

/// Transaction pooling over TLS on both legs, `pool_size = 1`: a client
/// that vanishes mid-transaction (TCP gone, or only a TLS close_notify)
/// gives the server back rolled back; a server that PostgreSQL ends while
/// it is idle in the pool is replaced; one ended under a session client
/// reports 57P01 to that client; at shutdown an idle TLS client hears
/// 57P01.
#[test]
fn tls_clients_that_vanish_and_servers_that_close() {
    let _w = watchdog("tls_clients_that_vanish_and_servers_that_close", LIMIT);
    let pki = Pki::new();
    let pg = tls_cluster(&pki);
    let server = pki.server();
    let config = listener_tls(
        Config::new(pg.port())
            .route(Route::new("test", "trust_user").transaction().pool_size(1))
            .route(Route::new("test", "postgres").session())
            .storage("tls", "\"verify_full\"")
            .storage("tls_ca_file", &tv(&pki.ca_file)),
        "require",
        &server,
        None,
    );
    let (handle, port) = start_pooler(&config);
    let client = TlsClient::trusting(&pki.ca);
    let pid_sql = "select pg_backend_pid()";

    // TCP gone mid-transaction, without close_notify.
    let mut s1 = client.served(port, "trust_user", "test", "s1");
    s1.scalar("begin; create table vanish_a (x int); select 1");
    let _ = s1.stream.sock.shutdown(std::net::Shutdown::Both);
    drop(s1);
    let mut s2 = client.served(port, "trust_user", "test", "s2");
    assert_eq!(
        s2.scalar("select (to_regclass('vanish_a') is null)::text")
            .as_deref(),
        Some("true"),
        "the vanished client's transaction must be rolled back"
    );

    // close_notify mid-transaction, the socket left open.
    s2.scalar("begin; create table vanish_b (x int); select 1");
    s2.stream.conn.send_close_notify();
    s2.stream.flush().expect("send close_notify");
    let mut s3 = client.served(port, "trust_user", "test", "s3");
    assert_eq!(
        s3.scalar("select (to_regclass('vanish_b') is null)::text")
            .as_deref(),
        Some("true"),
        "a client that sent close_notify has left: its server comes back"
    );
    drop(s2);

    // The idle pooled server is ended by PostgreSQL.
    let pid: i32 = s3
        .scalar(pid_sql)
        .and_then(|p| p.parse().ok())
        .expect("a pid");
    pg.sql("postgres", &format!("select pg_terminate_backend({pid})"));
    assert_eq!(
        pg.wait_for_backends("trust_user", 0, Duration::from_secs(5)),
        0
    );
    std::thread::sleep(Duration::from_millis(200));
    let next: i32 = s3
        .scalar(pid_sql)
        .and_then(|p| p.parse().ok())
        .expect("a pid");
    assert_ne!(next, pid, "a new server replaces the ended one");
    s3.terminate();

    // A session client's server is ended under it.
    let mut s4 = client.served(port, "postgres", "test", "s4");
    let pid = s4.scalar(pid_sql).expect("a pid");
    pg.sql("postgres", &format!("select pg_terminate_backend({pid})"));
    let mut seen = None;
    for _ in 0..20 {
        s4.send_query("select 1");
        match read_msg(&mut s4.stream) {
            Ok((b'E', body)) => {
                seen = Some(parse_error_fields(&body));
                break;
            }
            Ok(_) => {
                let _ = s4.read_reply("select 1");
            }
            Err(e) => panic!("s4: the connection ended without an error: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = seen.expect("s4 should hear that its server was terminated");
    assert_eq!(e.code, "57P01", "{e:?}");
    client
        .served(port, "postgres", "test", "after the terminated session")
        .terminate();

    // Shutdown: an idle TLS client hears 57P01, encrypted, then the end.
    let mut idle = client.served(port, "trust_user", "test", "idle at shutdown");
    handle
        .shutdown(Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
    match read_msg(&mut idle.stream) {
        Ok((b'E', body)) => {
            let e = parse_error_fields(&body);
            assert_eq!(e.code, "57P01", "at shutdown: {e:?}");
        }
        other => panic!("at shutdown: expected 57P01, got {other:?}"),
    }
    assert!(
        read_msg(&mut idle.stream).is_err(),
        "the connection ends after the shutdown error"
    );
}
