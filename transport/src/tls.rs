//! TLS configuration: what the pooler presents to its clients
//! ([`ServerTls`]) and how it checks the PostgreSQL servers it connects to
//! ([`ClientTls`]).
//!
//! Both are built once from file paths, outside the reactor, and then
//! shared by every connection through an `Arc`. A build that fails returns a
//! [`TlsError`] naming the file and what is wrong with it, so a config reload
//! can keep the configuration that runs and log why the new one was refused.
//!
//! The crypto provider is *ring*, passed explicitly to every builder: no
//! process-wide default provider has to be installed first.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};

/// The ALPN protocol name of PostgreSQL (17 and later). Direct-TLS clients
/// must offer it; clients that negotiate TLS after an SSLRequest may offer
/// it or offer nothing.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// Why a TLS configuration could not be built, or TLS could not be started
/// on a stream.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// A file holds a PEM section that does not decode.
    BadPem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        detail: String,
    },
    /// A certificate (or CA) file holds no certificate.
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key (PKCS#8, PKCS#1 or SEC1 PEM).
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// A private key the crypto provider cannot use (unsupported algorithm,
    /// malformed DER).
    BadPrivateKey {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        detail: String,
    },
    /// The private key does not belong to the certificate.
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A CA file whose certificates cannot serve as trust anchors.
    BadCa {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        detail: String,
    },
    /// A setting that needs a CA file was given none.
    CaFileRequired {
        /// The setting, e.g. "verify-full".
        what: &'static str,
    },
    /// A client certificate without its key, or a key without certificate.
    IncompleteClientCert,
    /// A protocol name other than `tlsv1.2` and `tlsv1.3`.
    UnknownProtocol(String),
    /// A server name that is neither a DNS name nor an IP address.
    BadServerName(String),
    /// TLS was started on a stream that already speaks it.
    AlreadyTls,
    /// rustls refused the configuration or the new connection.
    Rustls(rustls::Error),
    /// A socket error while sending the first handshake message.
    Io(io::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Self::BadPem { path, detail } => {
                write!(f, "{}: malformed PEM: {detail}", path.display())
            }
            Self::NoCertificate { path } => {
                write!(f, "{}: no certificate found", path.display())
            }
            Self::NoPrivateKey { path } => write!(
                f,
                "{}: no private key found (expected PKCS#8, PKCS#1 or SEC1 PEM)",
                path.display()
            ),
            Self::BadPrivateKey { path, detail } => {
                write!(f, "{}: unusable private key: {detail}", path.display())
            }
            Self::KeyMismatch { cert, key } => write!(
                f,
                "private key {} does not match certificate {}",
                key.display(),
                cert.display()
            ),
            Self::BadCa { path, detail } => {
                write!(f, "{}: unusable CA certificate: {detail}", path.display())
            }
            Self::CaFileRequired { what } => write!(f, "{what} needs a CA file"),
            Self::IncompleteClientCert => {
                f.write_str("a client certificate and its key must be given together")
            }
            Self::UnknownProtocol(p) => write!(
                f,
                "unknown TLS protocol {p:?} (expected tlsv1.2 and/or tlsv1.3)"
            ),
            Self::BadServerName(n) => {
                write!(f, "{n:?} is neither a DNS name nor an IP address")
            }
            Self::AlreadyTls => f.write_str("TLS is already on for this stream"),
            Self::Rustls(e) => write!(f, "TLS: {e}"),
            Self::Io(e) => write!(f, "TLS socket error: {e}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::Rustls(e) => Some(e),
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Which TLS versions to speak. The default is both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocols {
    /// TLS 1.2.
    pub tls12: bool,
    /// TLS 1.3.
    pub tls13: bool,
}

impl Default for Protocols {
    fn default() -> Self {
        Self {
            tls12: true,
            tls13: true,
        }
    }
}

impl Protocols {
    /// Parses a comma-separated list of `tlsv1.2` and `tlsv1.3` (any case,
    /// spaces allowed); an empty list means both.
    pub fn parse(s: &str) -> Result<Self, TlsError> {
        let mut p = Self {
            tls12: false,
            tls13: false,
        };
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name.to_ascii_lowercase().as_str() {
                "tlsv1.2" => p.tls12 = true,
                "tlsv1.3" => p.tls13 = true,
                _ => return Err(TlsError::UnknownProtocol(name.to_owned())),
            }
        }
        if !p.tls12 && !p.tls13 {
            return Ok(Self::default());
        }
        Ok(p)
    }

    fn versions(self) -> Vec<&'static SupportedProtocolVersion> {
        let mut v = Vec::with_capacity(2);
        if self.tls13 {
            v.push(&rustls::version::TLS13);
        }
        if self.tls12 {
            v.push(&rustls::version::TLS12);
        }
        v
    }
}

impl FromStr for Protocols {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, TlsError> {
        Self::parse(s)
    }
}

impl fmt::Display for Protocols {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.tls12, self.tls13) {
            (true, false) => f.write_str("tlsv1.2"),
            (false, true) => f.write_str("tlsv1.3"),
            _ => f.write_str("tlsv1.2,tlsv1.3"),
        }
    }
}

/// Whether the pooler asks its clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// Never ask.
    #[default]
    None,
    /// Ask; a client may present none, but one it presents must verify
    /// against the CA.
    Optional,
    /// A client must present a certificate that verifies against the CA.
    Required,
}

/// What the pooler presents to its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsOptions {
    /// The certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// The private key of the leaf (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to; used
    /// only when `client_auth` is not `None`.
    pub ca_file: Option<PathBuf>,
    /// Whether clients are asked for a certificate.
    pub client_auth: ClientAuth,
    /// TLS versions accepted.
    pub protocols: Protocols,
}

/// A ready server-side TLS configuration, cheap to clone and share.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub(crate) config: Arc<ServerConfig>,
}

impl ServerTls {
    /// Loads the files and builds the configuration. Call it outside the
    /// reactor: it reads files.
    pub fn new(opts: &ServerTlsOptions) -> Result<Self, TlsError> {
        let provider = provider();
        let certs = load_certs(&opts.cert_file)?;
        let key = load_key(&provider, &opts.key_file)?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&opts.protocols.versions())
            .map_err(TlsError::Rustls)?;
        let builder = match opts.client_auth {
            ClientAuth::None => builder.with_no_client_auth(),
            mode => {
                let path = opts.ca_file.as_deref().ok_or(TlsError::CaFileRequired {
                    what: "client certificate authentication",
                })?;
                let roots = load_roots(path)?;
                let mut verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                if mode == ClientAuth::Optional {
                    verifier = verifier.allow_unauthenticated();
                }
                let verifier = verifier.build().map_err(|e| TlsError::BadCa {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: opts.cert_file.clone(),
                key: opts.key_file.clone(),
            },
            e => TlsError::Rustls(e),
        })?;
        // A client offering other protocols only is refused (as PostgreSQL
        // does); one offering none is served, as pre-17 clients offer none.
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        // PostgreSQL clients do not resume sessions (the server side of
        // PostgreSQL turns tickets and its session cache off): issuing
        // tickets would cost a write and memory per connection for nothing.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(NoServerSessionStorage {});
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// How the pooler checks a PostgreSQL server's certificate, after libpq's
/// `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Accept any certificate: encryption without authentication
    /// (`sslmode=require`). The handshake signature is still checked
    /// against the certificate's key.
    None,
    /// The chain must lead to the CA; the host name is not checked
    /// (`verify-ca`).
    Ca,
    /// The chain must lead to the CA and name the host (`verify-full`).
    Full,
}

/// How the pooler speaks TLS to PostgreSQL servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// How the server certificate is checked.
    pub verify: Verify,
    /// CA certificates (PEM); required by `Ca` and `Full`, unused by `None`.
    pub ca_file: Option<PathBuf>,
    /// A client certificate chain (PEM) to present, for servers that ask.
    pub cert_file: Option<PathBuf>,
    /// The key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// TLS versions offered.
    pub protocols: Protocols,
}

/// A ready client-side TLS configuration, cheap to clone and share.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub(crate) config: Arc<ClientConfig>,
}

impl ClientTls {
    /// Loads the files and builds the configuration. Call it outside the
    /// reactor: it reads files.
    pub fn new(opts: &ClientTlsOptions) -> Result<Self, TlsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&opts.protocols.versions())
            .map_err(TlsError::Rustls)?;
        let webpki = |what| -> Result<Arc<WebPkiServerVerifier>, TlsError> {
            let path = opts
                .ca_file
                .as_deref()
                .ok_or(TlsError::CaFileRequired { what })?;
            let roots = load_roots(path)?;
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| TlsError::BadCa {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                })
        };
        let builder = match opts.verify {
            Verify::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCert {
                    algorithms: provider.signature_verification_algorithms,
                })),
            Verify::Ca => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(CaOnly {
                    inner: webpki("verify-ca")?,
                })),
            Verify::Full => builder.with_webpki_verifier(webpki("verify-full")?),
        };
        let mut config = match (&opts.cert_file, &opts.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert_file), Some(key_file)) => {
                let certs = load_certs(cert_file)?;
                let key = load_key(&provider, key_file)?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| match e {
                        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                            cert: cert_file.clone(),
                            key: key_file.clone(),
                        },
                        e => TlsError::Rustls(e),
                    })?
            }
            _ => return Err(TlsError::IncompleteClientCert),
        };
        // PostgreSQL 17 requires it for direct TLS and accepts it after an
        // SSLRequest; older servers ignore the extension.
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        // PostgreSQL servers do not resume sessions; caching tickets per
        // server would only hold memory.
        config.resumption = Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
        })
    }
}

/// Parses a server name for a client connection: a DNS name or an IP
/// address (IPv6 without brackets).
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::BadServerName(name.to_owned()))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn bad_pem(path: &Path, e: &pem::Error) -> TlsError {
    TlsError::BadPem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Every certificate in a PEM file, in order; other sections are skipped.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(path, &e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file, checked to be usable by the
/// provider so that a bad key is reported against its file.
fn load_key(provider: &CryptoProvider, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_path_buf(),
        },
        e => bad_pem(path, &e),
    })?;
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::BadPrivateKey {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    Ok(key)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// `Verify::None`: any certificate is accepted, but the handshake must
/// still be signed by the key of the certificate presented, so the peer
/// holds that key.
#[derive(Debug)]
struct AnyServerCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `Verify::Ca`: full WebPKI verification, except that a certificate not
/// valid for the name asked is accepted. rustls checks the name only after
/// the chain, validity dates and key usage, so a name error means
/// everything else passed.
#[derive(Debug)]
struct CaOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
