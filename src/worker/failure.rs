//! `ServerFailure`: why a server connection (pooled, a probe's, a cancel's)
//! could not be opened or logged in to. It names the SQLSTATE its client
//! hears (`code`) and says the message, as the log and the client read it
//! (`Display`).

use std::fmt;

use crate::auth::Fatal;
use crate::backend_login::LoginError;

/// Why a server connection failed before it could serve.
#[derive(Debug)]
pub(crate) enum ServerFailure {
    /// The connect failed: the socket's error, or the host name's lookup.
    Connect {
        host: String,
        port: u16,
        error: String,
    },
    /// The connection ended before the TCP connect completed, with no
    /// socket error to tell why.
    ClosedWhileConnecting { host: String, port: u16 },
    /// The TCP connect did not complete within `server_connect_timeout`.
    ConnectTimeout {
        host: String,
        port: u16,
        after_ms: u64,
    },
    /// Connected, but no login within `server_connect_timeout`.
    LoginTimeout {
        host: String,
        port: u16,
        after_ms: u64,
    },
    /// The new socket could not be registered with the poller; `probe`
    /// says whose it was (a probe's, else a pooled server's).
    Register { error: String, probe: bool },
    /// The server closed the connection in the middle of the login.
    ClosedDuringLogin,
    /// TLS with the server failed once started.
    Tls(String),
    /// TLS with the server could not be started.
    TlsStart(String),
    /// Bytes arrived before our ClientHello: a man in the middle's
    /// injection (CVE-2021-23222).
    InjectedBeforeTls,
    /// The server refused the login with an ErrorResponse: its SQLSTATE
    /// as it came, and its message.
    Refused { code: String, message: String },
    /// The login failed on our side of it (no password to give, an
    /// unsupported method, TLS required and refused, SCRAM not verified…).
    Login(LoginError),
    /// The server's login reply was not a well-formed message.
    Protocol(odissey_protocol::Error),
    /// A probe got no answer within its time.
    NoAnswer,
    /// A probe's server closed the connection after the login (while
    /// auth_query ran).
    ClosedAfterLogin,
    /// The worker is shutting down: the probe is abandoned.
    ShuttingDown,
    /// No route serves the auth_query user on its database.
    NoAuthQueryRoute { user: String, database: String },
    /// The auth_query ran and the server answered it with an error.
    AuthQuery(String),
    /// The auth_query route's own login failed.
    AuthQueryLogin(Box<Self>),
}

/// odissey's own code for a connection that failed (and for a server's code
/// that is no SQLSTATE).
const CONNECTION_FAILURE: &str = "08006";

/// Whether `code` has the shape of an SQLSTATE: five of [0-9A-Z].
fn is_sqlstate(code: &str) -> bool {
    code.len() == 5
        && code
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

impl ServerFailure {
    /// From a login's error: the server's refusal keeps its code and
    /// message; anything else is odissey's.
    pub(crate) fn login(e: LoginError) -> Self {
        match e {
            LoginError::Server(f) => Self::Refused {
                code: f.code,
                message: f.message,
            },
            other => Self::Login(other),
        }
    }

    /// The SQLSTATE the client hears: the server's own when it refused
    /// (08006 when what it sent is no SQLSTATE); 08006 when there is no
    /// connection to speak of.
    pub(crate) fn code(&self) -> &str {
        match self {
            Self::Refused { code, .. } if is_sqlstate(code) => code,
            Self::ShuttingDown => "57P01",
            Self::NoAuthQueryRoute { .. } => "28000",
            // The query route's login failing is not the client's wrong
            // password: it is said as a connection failure.
            Self::AuthQueryLogin(inner) => match inner.code() {
                "28P01" | "28000" => CONNECTION_FAILURE,
                code => code,
            },
            _ => CONNECTION_FAILURE,
        }
    }

    /// What the client is told: `code` and this message.
    pub(crate) fn fatal(&self) -> Fatal {
        Fatal {
            code: std::borrow::Cow::Owned(self.code().to_owned()),
            message: self.to_string(),
            verbatim: false,
            log: None,
        }
    }
}

impl fmt::Display for ServerFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect { host, port, error } => {
                write!(f, "cannot connect to the server {host}:{port}: {error}")
            }
            Self::ClosedWhileConnecting { host, port } => write!(
                f,
                "the server {host}:{port} closed the connection while it was being connected"
            ),
            Self::ConnectTimeout {
                host,
                port,
                after_ms,
            } => write!(
                f,
                "connecting to the server {host}:{port} timed out after {after_ms} ms (server_connect_timeout)"
            ),
            Self::LoginTimeout {
                host,
                port,
                after_ms,
            } => write!(
                f,
                "the server {host}:{port} accepted the connection but did not complete the login within {after_ms} ms (server_connect_timeout)"
            ),
            Self::Register { error, probe: true } => {
                write!(f, "cannot register a socket: {error}")
            }
            Self::Register { error, probe: false } => {
                write!(f, "cannot register the server socket: {error}")
            }
            Self::ClosedDuringLogin => f.write_str("the server closed the connection during login"),
            Self::Tls(e) => write!(f, "TLS with the server failed: {e}"),
            Self::TlsStart(e) => write!(f, "cannot start TLS with the server: {e}"),
            Self::InjectedBeforeTls => f.write_str("the server sent data before the TLS handshake"),
            // The server's code travels beside the message, not in it:
            // whoever logs or relays the two adds it once.
            Self::Refused { message, .. } => write!(f, "server login failed: {message}"),
            Self::Login(e) => write!(f, "server login failed: {e}"),
            Self::Protocol(e) => write!(f, "server login failed: {e}"),
            Self::NoAnswer => f.write_str("the server did not answer in time"),
            Self::ClosedAfterLogin => f.write_str("the server closed the connection"),
            Self::ShuttingDown => f.write_str("odissey is shutting down"),
            Self::NoAuthQueryRoute { user, database } => write!(
                f,
                "no route for auth_query as {user:?} on database {database:?}"
            ),
            Self::AuthQuery(e) => write!(f, "auth_query failed: {e}"),
            Self::AuthQueryLogin(inner) => write!(f, "auth_query could not run: {inner}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: &str) -> ServerFailure {
        ServerFailure::Refused {
            code: code.into(),
            message: "no".into(),
        }
    }

    #[test]
    fn a_servers_sqlstate_is_kept_when_it_is_one() {
        for code in ["28P01", "3D000", "53400", "42501", "57P03", "08P01"] {
            assert_eq!(refused(code).code(), code);
        }
    }

    #[test]
    fn a_malformed_code_becomes_08006() {
        for code in ["x", "", "12345678", "2800", "28p01", "28P0!", "２8000"] {
            assert_eq!(refused(code).code(), "08006", "{code:?}");
        }
    }

    #[test]
    fn odissey_own_failures_say_08006() {
        let all = [
            ServerFailure::Connect {
                host: "h".into(),
                port: 1,
                error: "e".into(),
            },
            ServerFailure::ClosedDuringLogin,
            ServerFailure::Tls("e".into()),
            ServerFailure::InjectedBeforeTls,
            ServerFailure::Login(LoginError::NoPassword),
            ServerFailure::NoAnswer,
            ServerFailure::AuthQuery("e".into()),
        ];
        for f in all {
            assert_eq!(f.code(), "08006", "{f}");
        }
        assert_eq!(ServerFailure::ShuttingDown.code(), "57P01");
    }

    #[test]
    fn the_auth_query_routes_wrong_password_is_no_clients() {
        let inner = |code| ServerFailure::AuthQueryLogin(Box::new(refused(code)));
        assert_eq!(inner("28P01").code(), "08006");
        assert_eq!(inner("28000").code(), "08006");
        assert_eq!(inner("3D000").code(), "3D000");
        let route = ServerFailure::NoAuthQueryRoute {
            user: "q".into(),
            database: "d".into(),
        };
        assert_eq!(route.code(), "28000");
    }

    #[test]
    fn a_login_error_from_the_server_is_a_refusal() {
        let e = LoginError::Server(odissey_protocol::backend::ErrorFields {
            code: "53400".into(),
            message: "too many".into(),
            ..Default::default()
        });
        let f = ServerFailure::login(e);
        assert!(matches!(&f, ServerFailure::Refused { code, .. } if code == "53400"));
        assert_eq!(f.to_string(), "server login failed: too many");
        let f = ServerFailure::login(LoginError::NoPassword);
        assert_eq!(
            f.to_string(),
            "server login failed: the server asks for a password and none is configured"
        );
    }

    #[test]
    fn messages_read_as_before() {
        let (host, port) = (String::from("db"), 5432);
        let cases = [
            (
                ServerFailure::Connect {
                    host: host.clone(),
                    port,
                    error: "Connection refused (os error 111)".into(),
                },
                "cannot connect to the server db:5432: Connection refused (os error 111)",
            ),
            (
                ServerFailure::ClosedWhileConnecting {
                    host: host.clone(),
                    port,
                },
                "the server db:5432 closed the connection while it was being connected",
            ),
            (
                ServerFailure::ConnectTimeout {
                    host: host.clone(),
                    port,
                    after_ms: 1000,
                },
                "connecting to the server db:5432 timed out after 1000 ms (server_connect_timeout)",
            ),
            (
                ServerFailure::LoginTimeout {
                    host: host.clone(),
                    port,
                    after_ms: 1000,
                },
                "the server db:5432 accepted the connection but did not complete the login within 1000 ms (server_connect_timeout)",
            ),
            (
                ServerFailure::Register {
                    error: "e".into(),
                    probe: true,
                },
                "cannot register a socket: e",
            ),
            (
                ServerFailure::Register {
                    error: "e".into(),
                    probe: false,
                },
                "cannot register the server socket: e",
            ),
            (
                ServerFailure::ClosedDuringLogin,
                "the server closed the connection during login",
            ),
            (
                ServerFailure::Tls("bad certificate".into()),
                "TLS with the server failed: bad certificate",
            ),
            (
                ServerFailure::TlsStart("no TLS configuration".into()),
                "cannot start TLS with the server: no TLS configuration",
            ),
            (
                ServerFailure::InjectedBeforeTls,
                "the server sent data before the TLS handshake",
            ),
            (
                refused("28P01"),
                "server login failed: no",
            ),
            (
                ServerFailure::NoAnswer,
                "the server did not answer in time",
            ),
            (
                ServerFailure::ClosedAfterLogin,
                "the server closed the connection",
            ),
            (ServerFailure::ShuttingDown, "odissey is shutting down"),
            (
                ServerFailure::NoAuthQueryRoute {
                    user: "q".into(),
                    database: "d".into(),
                },
                "no route for auth_query as \"q\" on database \"d\"",
            ),
            (
                ServerFailure::AuthQuery("relation \"x\" does not exist".into()),
                "auth_query failed: relation \"x\" does not exist",
            ),
            (
                ServerFailure::AuthQueryLogin(Box::new(ServerFailure::ClosedDuringLogin)),
                "auth_query could not run: the server closed the connection during login",
            ),
        ];
        for (f, text) in cases {
            assert_eq!(f.to_string(), text);
        }
    }

    #[test]
    fn the_client_hears_the_code_and_the_message() {
        let f = refused("42501").fatal();
        assert_eq!(f.code, "42501");
        assert_eq!(f.message, "server login failed: no");
        assert!(!f.verbatim);
        let f = refused("bogus").fatal();
        assert_eq!(f.code, "08006");
    }
}
