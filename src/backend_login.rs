//! Logging in to PostgreSQL, sans-IO: TLS negotiation (SSLRequest and the
//! server's one-byte answer), the startup message, trust, cleartext, md5
//! and SCRAM-SHA-256, then the ParameterStatus and BackendKeyData that
//! precede the first ReadyForQuery.

use bytes::BytesMut;
use odissey_protocol::backend::{Authentication, BackendMessage, ErrorFields};
use odissey_protocol::scram::{ScramClient, ScramCredential, SCRAM_SHA_256};
use odissey_protocol::{frontend, md5, Frame};

/// Why a login failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoginError {
    /// The server said no (wrong password, no such database…).
    Server(ErrorFields),
    /// The server asked for a password and we have none (or only SCRAM
    /// keys, which serve SCRAM alone).
    NoPassword,
    /// The server wants something we don't speak (GSS, SSPI…).
    Unsupported(String),
    /// The server broke the protocol, or SCRAM didn't verify.
    Protocol(String),
    /// TLS was required and the server does not offer it.
    NoTls,
}

impl std::fmt::Display for LoginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Server(e) => write!(f, "{} ({})", e.message, e.code),
            Self::NoPassword => {
                f.write_str("the server asks for a password and none is configured")
            }
            Self::Unsupported(m) => write!(f, "unsupported authentication: {m}"),
            Self::Protocol(m) => write!(f, "protocol error during login: {m}"),
            Self::NoTls => f.write_str("TLS is required and the server does not support it"),
        }
    }
}

/// Whether to ask the server for TLS first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AskTls {
    /// Plaintext: no SSLRequest.
    No,
    /// SSLRequest; carry on in plaintext if the server says 'N'.
    Prefer,
    /// SSLRequest; fail if the server says 'N'.
    Require,
}

/// What the login waits for next.
#[derive(Debug)]
enum Expect {
    /// The server's one-byte answer to SSLRequest.
    SslAnswer,
    /// An authentication request (or AuthenticationOk).
    Auth,
    /// SASLContinue from the server.
    SaslContinue(Box<ScramClient>),
    /// SASLFinal from the server.
    SaslFinal(Box<ScramClient>),
    /// ParameterStatus/BackendKeyData until ReadyForQuery.
    Ready,
}

/// A login in progress.
#[derive(Debug)]
pub(crate) struct BackendLogin {
    user: String,
    /// The database, until the startup message is written.
    database: String,
    credential: Option<ScramCredential>,
    tls: AskTls,
    expect: Option<Expect>,
    /// ParameterStatus values reported by the server.
    pub(crate) params: Vec<(String, String)>,
    /// The server's cancel key.
    pub(crate) key: Option<(u32, u32)>,
    /// The server asked for proof of identity (any authentication request
    /// but AuthenticationOk).
    challenged: bool,
}

/// Progress of a login.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Keep feeding frames.
    Continue,
    /// ReadyForQuery arrived: the connection is usable.
    Ready,
}

impl BackendLogin {
    /// Writes the SSLRequest or the startup message into `out` and waits
    /// for the server.
    pub(crate) fn start(
        out: &mut BytesMut,
        database: &str,
        user: &str,
        credential: Option<ScramCredential>,
        tls: AskTls,
    ) -> Self {
        let mut login = Self {
            user: user.to_string(),
            database: database.to_string(),
            credential,
            tls,
            expect: Some(Expect::Auth),
            params: Vec::new(),
            key: None,
            challenged: false,
        };
        if tls == AskTls::No {
            login.write_startup(out);
        } else {
            frontend::ssl_request(out);
            login.expect = Some(Expect::SslAnswer);
        }
        login
    }

    fn write_startup(&mut self, out: &mut BytesMut) {
        frontend::startup(
            out,
            &[
                ("user", &self.user),
                ("database", &self.database),
                ("client_encoding", "UTF8"),
            ],
        );
        self.database = String::new();
    }

    /// True while the server's answer to SSLRequest is awaited: the next
    /// byte is that answer, not a message.
    pub(crate) fn awaits_tls_answer(&self) -> bool {
        matches!(self.expect, Some(Expect::SslAnswer))
    }

    /// Takes the server's answer to SSLRequest. `Ok(true)`: start TLS, then
    /// call [`Self::tls_started`]; `Ok(false)`: the startup message went
    /// into `out` in plaintext.
    pub(crate) fn tls_answer(
        &mut self,
        answer: u8,
        out: &mut BytesMut,
    ) -> Result<bool, LoginError> {
        if !self.awaits_tls_answer() {
            return Err(LoginError::Protocol("unexpected TLS answer".into()));
        }
        match answer {
            b'S' => Ok(true),
            b'N' if self.tls == AskTls::Require => Err(LoginError::NoTls),
            b'N' => {
                self.expect = Some(Expect::Auth);
                self.write_startup(out);
                Ok(false)
            }
            other => Err(LoginError::Protocol(format!(
                "answer {other:#04x} to SSLRequest (expected 'S' or 'N')"
            ))),
        }
    }

    /// TLS is on: the startup message goes into `out` (to be encrypted).
    pub(crate) fn tls_started(&mut self, out: &mut BytesMut) {
        self.expect = Some(Expect::Auth);
        self.write_startup(out);
    }

    fn password(&self) -> Result<&str, LoginError> {
        match &self.credential {
            Some(ScramCredential::Password(p)) => Ok(p),
            _ => Err(LoginError::NoPassword),
        }
    }

    /// Feeds one frame from the server; answers go to `out`.
    pub(crate) fn handle(
        &mut self,
        frame: &Frame,
        out: &mut BytesMut,
    ) -> Result<Progress, LoginError> {
        let msg = BackendMessage::parse(frame).map_err(|e| LoginError::Protocol(e.to_string()))?;
        if let BackendMessage::ErrorResponse(e) = msg {
            return Err(LoginError::Server(e));
        }
        let expect = self
            .expect
            .take()
            .ok_or_else(|| LoginError::Protocol("message after login failed".into()))?;
        let next = match (expect, msg) {
            (Expect::Auth, BackendMessage::Authentication(a)) => self.on_auth(a, out)?,
            (
                Expect::SaslContinue(mut scram),
                BackendMessage::Authentication(Authentication::SaslContinue { data }),
            ) => {
                let reply = scram
                    .handle_server_first(&data)
                    .map_err(|e| LoginError::Protocol(e.to_string()))?;
                frontend::sasl_response(out, &reply);
                Expect::SaslFinal(scram)
            }
            (
                Expect::SaslFinal(scram),
                BackendMessage::Authentication(Authentication::SaslFinal { data }),
            ) => {
                scram
                    .handle_server_final(&data)
                    .map_err(|e| LoginError::Protocol(e.to_string()))?;
                Expect::Auth
            }
            (Expect::Ready, BackendMessage::ParameterStatus { name, value }) => {
                match self.params.iter_mut().find(|(n, _)| *n == name) {
                    Some(p) => p.1 = value,
                    None => self.params.push((name, value)),
                }
                Expect::Ready
            }
            (Expect::Ready, BackendMessage::BackendKeyData { pid, key }) => {
                self.key = Some((pid, key));
                Expect::Ready
            }
            (Expect::Ready, BackendMessage::ReadyForQuery(_)) => return Ok(Progress::Ready),
            (
                e @ Expect::Ready,
                BackendMessage::NoticeResponse(_) | BackendMessage::NegotiateProtocolVersion { .. },
            ) => e,
            (e, m) => {
                return Err(LoginError::Protocol(format!(
                    "unexpected {:?} while waiting for {}",
                    m,
                    match e {
                        Expect::SslAnswer => "the answer to SSLRequest",
                        Expect::Auth => "an authentication request",
                        Expect::SaslContinue(_) => "SASLContinue",
                        Expect::SaslFinal(_) => "SASLFinal",
                        Expect::Ready => "ReadyForQuery",
                    }
                )))
            }
        };
        self.expect = Some(next);
        Ok(Progress::Continue)
    }

    /// True once the server asked for a password or any other proof; a
    /// login that got in without it is one the server trusts (`trust` in
    /// pg_hba, or a client certificate odissey presents).
    pub(crate) fn challenged(&self) -> bool {
        self.challenged
    }

    fn on_auth(&mut self, auth: Authentication, out: &mut BytesMut) -> Result<Expect, LoginError> {
        if !matches!(auth, Authentication::Ok) {
            self.challenged = true;
        }
        Ok(match auth {
            Authentication::Ok => Expect::Ready,
            Authentication::CleartextPassword => {
                frontend::password(out, self.password()?);
                Expect::Auth
            }
            Authentication::Md5Password { salt } => {
                let response = md5::client_response(&self.user, self.password()?, salt);
                frontend::password(out, &response);
                Expect::Auth
            }
            Authentication::Sasl { mechanisms } => {
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(LoginError::Unsupported(format!(
                        "SASL mechanisms {mechanisms:?}"
                    )));
                }
                let scram = match &self.credential {
                    Some(ScramCredential::Password(p)) => ScramClient::try_new(p),
                    Some(ScramCredential::Keys {
                        client_key,
                        server_key,
                    }) => ScramClient::try_with_keys(*client_key, *server_key),
                    None => return Err(LoginError::NoPassword),
                }
                .map_err(|e| LoginError::Protocol(e.to_string()))?;
                frontend::sasl_initial_response(out, SCRAM_SHA_256, &scram.client_first());
                Expect::SaslContinue(Box::new(scram))
            }
            Authentication::SaslContinue { .. } | Authentication::SaslFinal { .. } => {
                return Err(LoginError::Protocol(
                    "SASL message outside a SASL exchange".into(),
                ))
            }
            Authentication::Other { code } => {
                return Err(LoginError::Unsupported(format!(
                    "authentication request {code}"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use odissey_protocol::backend::{self, TransactionStatus};
    use odissey_protocol::scram::{ScramSecret, ScramServer};
    use odissey_protocol::{read_frame, read_startup, Startup};

    fn frames(buf: &mut BytesMut) -> Vec<Frame> {
        let mut v = Vec::new();
        while let Some(f) = read_frame(buf, 1 << 20).unwrap() {
            v.push(f);
        }
        v
    }

    fn finish(login: &mut BackendLogin, out: &mut BytesMut) {
        let mut srv = BytesMut::new();
        backend::authentication_ok(&mut srv);
        backend::parameter_status(&mut srv, "server_version", "15.0");
        backend::backend_key_data(&mut srv, 42, 7);
        backend::ready_for_query(&mut srv, TransactionStatus::Idle);
        let fs = frames(&mut srv);
        for (i, f) in fs.iter().enumerate() {
            let p = login.handle(f, out).unwrap();
            assert_eq!(p == Progress::Ready, i == fs.len() - 1);
        }
        assert_eq!(login.key, Some((42, 7)));
        assert_eq!(login.params, vec![("server_version".into(), "15.0".into())]);
    }

    #[test]
    fn md5_login() {
        let mut out = BytesMut::new();
        let mut l = BackendLogin::start(
            &mut out,
            "db",
            "bob",
            Some(ScramCredential::Password("pw".into())),
            AskTls::No,
        );
        let Some(Startup::Startup { params, .. }) = read_startup(&mut out).unwrap() else {
            panic!()
        };
        assert!(params.contains(&("user".into(), "bob".into())));
        let mut srv = BytesMut::new();
        backend::authentication_md5(&mut srv, [1, 2, 3, 4]);
        l.handle(&frames(&mut srv)[0], &mut out).unwrap();
        let f = read_frame(&mut out, 1024).unwrap().unwrap();
        assert_eq!(
            frontend::parse_password(&f.body).unwrap(),
            md5::client_response("bob", "pw", [1, 2, 3, 4])
        );
        finish(&mut l, &mut out);
        assert!(l.challenged());
    }

    #[test]
    fn a_login_without_a_challenge_is_trusted() {
        let mut out = BytesMut::new();
        let mut l = BackendLogin::start(&mut out, "db", "bob", None, AskTls::No);
        finish(&mut l, &mut out);
        assert!(!l.challenged(), "AuthenticationOk at once: trust");
    }

    #[test]
    fn scram_login_against_an_in_memory_server() {
        let mut out = BytesMut::new();
        let mut l = BackendLogin::start(
            &mut out,
            "db",
            "bob",
            Some(ScramCredential::Password("pencil".into())),
            AskTls::No,
        );
        out.clear();
        let mut server = ScramServer::new(ScramSecret::from_password("pencil", b"salty", 4096));
        let mut srv = BytesMut::new();
        backend::authentication_sasl(&mut srv, &[SCRAM_SHA_256]);
        l.handle(&frames(&mut srv)[0], &mut out).unwrap();
        let f = read_frame(&mut out, 1024).unwrap().unwrap();
        let (mech, first) = frontend::parse_sasl_initial_response(&f.body).unwrap();
        assert_eq!(mech, SCRAM_SHA_256);
        let server_first = server.handle_client_first(first).unwrap();
        backend::authentication_sasl_continue(&mut srv, &server_first);
        l.handle(&frames(&mut srv)[0], &mut out).unwrap();
        let f = read_frame(&mut out, 1024).unwrap().unwrap();
        let server_final = server.handle_client_final(&f.body).unwrap();
        backend::authentication_sasl_final(&mut srv, &server_final);
        l.handle(&frames(&mut srv)[0], &mut out).unwrap();
        finish(&mut l, &mut out);
    }

    #[test]
    fn errors_and_missing_passwords() {
        let mut out = BytesMut::new();
        let mut l = BackendLogin::start(&mut out, "db", "bob", None, AskTls::No);
        let mut srv = BytesMut::new();
        backend::authentication_cleartext(&mut srv);
        assert_eq!(
            l.handle(&frames(&mut srv)[0], &mut out),
            Err(LoginError::NoPassword)
        );
        assert!(l.challenged(), "asked for a password");
        let mut l = BackendLogin::start(&mut out, "db", "bob", None, AskTls::No);
        backend::error_response(
            &mut srv,
            "FATAL",
            "3D000",
            "database \"db\" does not exist",
            None,
        );
        assert!(
            matches!(l.handle(&frames(&mut srv)[0], &mut out), Err(LoginError::Server(e)) if e.code == "3D000")
        );
    }

    #[test]
    fn tls_negotiation_comes_first() {
        let mut out = BytesMut::new();
        let mut l = BackendLogin::start(&mut out, "db", "bob", None, AskTls::Prefer);
        assert!(matches!(
            read_startup(&mut out).unwrap(),
            Some(Startup::SslRequest)
        ));
        assert!(l.awaits_tls_answer());
        // 'N' under prefer: plaintext startup follows at once.
        assert_eq!(l.tls_answer(b'N', &mut out), Ok(false));
        let Some(Startup::Startup { params, .. }) = read_startup(&mut out).unwrap() else {
            panic!()
        };
        assert!(params.contains(&("database".into(), "db".into())));
        finish(&mut l, &mut out);

        // 'S': the startup waits for TLS.
        let mut l = BackendLogin::start(&mut out, "db", "bob", None, AskTls::Require);
        out.clear();
        assert_eq!(l.tls_answer(b'S', &mut out), Ok(true));
        assert!(out.is_empty());
        l.tls_started(&mut out);
        assert!(matches!(
            read_startup(&mut out).unwrap(),
            Some(Startup::Startup { .. })
        ));
        finish(&mut l, &mut out);

        // 'N' under require, or garbage: refused.
        let mut l = BackendLogin::start(&mut out, "db", "bob", None, AskTls::Require);
        assert_eq!(l.tls_answer(b'N', &mut out), Err(LoginError::NoTls));
        let mut l = BackendLogin::start(&mut out, "db", "bob", None, AskTls::Prefer);
        assert!(matches!(
            l.tls_answer(b'E', &mut out),
            Err(LoginError::Protocol(_))
        ));
    }
}
