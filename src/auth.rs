//! Client login, sans-IO: the startup packet, SSL/GSS refusals and the
//! password exchange, up to the point where the client is authenticated
//! and routed. The worker feeds it the client's bytes and writes out what it
//! appends to `out`.

use std::sync::Arc;

use bytes::BytesMut;
use odissey_protocol::{backend, codec, frontend, md5, Error as ProtoError, Startup};

use crate::config::{is_md5_hash, Authentication, Config, ResolvedRoute, RouteCache};

/// A login-ending error: sent as a FATAL ErrorResponse, then the
/// connection closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fatal {
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl Fatal {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<ProtoError> for Fatal {
    fn from(e: ProtoError) -> Self {
        match e {
            ProtoError::UnsupportedProtocol { major, minor } => Self::new(
                "0A000",
                format!("unsupported frontend protocol {major}.{minor}: server supports 3.0"),
            ),
            ProtoError::TooLarge { .. } | ProtoError::BadLength { .. } => {
                Self::new("08P01", format!("invalid startup packet: {e}"))
            }
            other => Self::new("08P01", format!("protocol violation: {other}")),
        }
    }
}

/// Who the client is, once authenticated.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) database: String,
    pub(crate) user: String,
    pub(crate) params: Vec<(String, String)>,
    pub(crate) route: Arc<ResolvedRoute>,
}

/// Where the login stands.
#[derive(Debug)]
pub(crate) enum Login {
    /// Waiting for the startup packet (or SSLRequest/GSSENCRequest first).
    AwaitingStartup,
    /// Waiting for the PasswordMessage answering our challenge.
    AwaitingPassword {
        who: Box<Identity>,
        md5_salt: Option<[u8; 4]>,
    },
}

/// What one step produced.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// More bytes are needed; `out` may hold a reply (e.g. 'N' to SSL).
    NeedMore,
    /// A CancelRequest: nothing more will come on this connection.
    Cancel { pid: u32, key: u32 },
    /// The client is who it says; AuthenticationOk is already in `out`.
    Authenticated(Box<Identity>),
}

/// Which startup parameters a client sends that we keep for it.
const PASSED_PARAMS: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "extra_float_digits",
    "search_path",
    "options",
];

impl Login {
    /// Consumes input from `rx`; returns the next login state and what
    /// happened, or the error that ends the connection.
    pub(crate) fn step(
        self,
        rx: &mut BytesMut,
        out: &mut BytesMut,
        cfg: &Config,
        routes: &mut RouteCache,
    ) -> Result<(Self, Outcome), Fatal> {
        match self {
            Self::AwaitingStartup => Self::on_startup(rx, out, cfg, routes),
            Self::AwaitingPassword { who, md5_salt } => {
                let Some(frame) = codec::read_frame(rx, 4096)? else {
                    return Ok((Self::AwaitingPassword { who, md5_salt }, Outcome::NeedMore));
                };
                if frame.tag != b'p' {
                    return Err(Fatal::new(
                        "08P01",
                        format!(
                            "expected a password message, got message type {:?}",
                            frame.tag as char
                        ),
                    ));
                }
                let given = frontend::parse_password(&frame.body)?;
                let secret = who.route.route.password.as_deref().unwrap_or("");
                let ok = match md5_salt {
                    Some(salt) => md5::verify(&who.user, secret, salt, given),
                    None if is_md5_hash(secret) => ct_eq(
                        md5::hash_password(&who.user, given).as_bytes(),
                        secret.as_bytes(),
                    ),
                    None => ct_eq(given.as_bytes(), secret.as_bytes()),
                };
                if !ok {
                    return Err(Fatal::new(
                        "28P01",
                        format!("password authentication failed for user \"{}\"", who.user),
                    ));
                }
                backend::authentication_ok(out);
                Ok((Self::AwaitingStartup, Outcome::Authenticated(who)))
            }
        }
    }

    fn on_startup(
        rx: &mut BytesMut,
        out: &mut BytesMut,
        cfg: &Config,
        routes: &mut RouteCache,
    ) -> Result<(Self, Outcome), Fatal> {
        {
            let Some(startup) = codec::read_startup(rx)? else {
                return Ok((Self::AwaitingStartup, Outcome::NeedMore));
            };
            let (params, _) = match startup {
                // TLS and GSS encryption arrive with the TLS issue: refuse
                // them and let the client carry on in plaintext.
                Startup::SslRequest | Startup::GssEncRequest => {
                    out.extend_from_slice(b"N");
                    if !rx.is_empty() {
                        // Bytes sent before our answer would be a TLS
                        // ClientHello: a client that doesn't wait breaks
                        // the protocol (and is how CVE-2021-23214 worked).
                        return Err(Fatal::new("08P01", "unexpected data after SSL request"));
                    }
                    return Ok((Self::AwaitingStartup, Outcome::NeedMore));
                }
                Startup::Cancel { pid, key } => {
                    return Ok((Self::AwaitingStartup, Outcome::Cancel { pid, key }))
                }
                Startup::Startup {
                    params,
                    major,
                    minor,
                } => (params, (major, minor)),
            };
            let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let Some(user) = get("user").filter(|u| !u.is_empty()) else {
                return Err(Fatal::new(
                    "28000",
                    "no PostgreSQL user name specified in startup packet",
                ));
            };
            let database = get("database")
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| user.clone());
            let Some(route) = routes.route(cfg, &database, &user) else {
                return Err(Fatal::new(
                    "28000",
                    format!("no route for database \"{database}\" and user \"{user}\""),
                ));
            };
            let kept = params
                .iter()
                .filter(|(n, _)| PASSED_PARAMS.contains(&n.as_str()))
                .cloned()
                .collect();
            let who = Box::new(Identity {
                database,
                user,
                params: kept,
                route,
            });
            match who.route.route.authentication {
                Authentication::None => {
                    backend::authentication_ok(out);
                    Ok((Self::AwaitingStartup, Outcome::Authenticated(who)))
                }
                Authentication::ClearText => {
                    backend::authentication_cleartext(out);
                    Ok((
                        Self::AwaitingPassword {
                            who,
                            md5_salt: None,
                        },
                        Outcome::NeedMore,
                    ))
                }
                Authentication::Md5 => {
                    let mut salt = [0u8; 4];
                    getrandom::getrandom(&mut salt)
                        .map_err(|_| Fatal::new("58000", "no randomness for an md5 salt"))?;
                    backend::authentication_md5(out, salt);
                    Ok((
                        Self::AwaitingPassword {
                            who,
                            md5_salt: Some(salt),
                        },
                        Outcome::NeedMore,
                    ))
                }
            }
        }
    }
}

/// Compares without an early exit, so timing doesn't reveal how much of a
/// password matched.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use odissey_protocol::backend::BackendMessage;
    use odissey_protocol::read_frame;

    fn cfg(auth: &str, password: &str) -> Config {
        Config::parse(&format!(
            "[[listen]]\nport = 0\n[storage.s]\ntype = \"remote\"\n\
             [database.db.user.alice]\nauthentication = \"{auth}\"\npassword = \"{password}\"\nstorage = \"s\"\n"
        ))
        .unwrap()
    }

    fn startup(user: &str, db: &str) -> BytesMut {
        let mut b = BytesMut::new();
        frontend::startup(
            &mut b,
            &[("user", user), ("database", db), ("application_name", "t")],
        );
        b
    }

    fn salt_of(out: &mut BytesMut) -> [u8; 4] {
        let f = read_frame(out, 1024).unwrap().unwrap();
        match BackendMessage::parse(&f).unwrap() {
            BackendMessage::Authentication(backend::Authentication::Md5Password { salt }) => salt,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn md5_login_with_the_right_and_the_wrong_password() {
        let c = cfg("md5", "secret");
        for (password, ok) in [("secret", true), ("wrong", false)] {
            let mut rx = startup("alice", "db");
            let mut out = BytesMut::new();
            let (login, o) = Login::AwaitingStartup
                .step(&mut rx, &mut out, &c, &mut RouteCache::default())
                .unwrap();
            assert!(matches!(o, Outcome::NeedMore));
            let salt = salt_of(&mut out);
            frontend::password(&mut rx, &md5::client_response("alice", password, salt));
            match login.step(&mut rx, &mut out, &c, &mut RouteCache::default()) {
                Ok((_, Outcome::Authenticated(who))) => {
                    assert!(ok);
                    assert_eq!(who.params, vec![("application_name".into(), "t".into())]);
                    assert_eq!(&out[..], b"R\0\0\0\x08\0\0\0\0");
                }
                Err(f) => {
                    assert!(!ok);
                    assert_eq!(f.code, "28P01");
                }
                Ok(other) => panic!("{:?}", other.1),
            }
        }
    }

    #[test]
    fn cleartext_against_an_md5_hash_and_byte_by_byte_input() {
        let c = cfg("clear_text", &md5::hash_password("alice", "pw"));
        let mut all = startup("alice", "db");
        frontend::password(&mut all, "pw");
        let mut rx = BytesMut::new();
        let mut out = BytesMut::new();
        let mut login = Login::AwaitingStartup;
        let mut done = false;
        for b in all.iter() {
            rx.extend_from_slice(&[*b]);
            let (next, o) = login
                .step(&mut rx, &mut out, &c, &mut RouteCache::default())
                .unwrap();
            login = next;
            done |= matches!(o, Outcome::Authenticated(_));
        }
        assert!(done);
    }

    #[test]
    fn bad_startups_get_the_right_sqlstate() {
        let c = cfg("none", "x");
        let mut out = BytesMut::new();
        let e = Login::AwaitingStartup
            .step(
                &mut startup("bob", "db"),
                &mut out,
                &c,
                &mut RouteCache::default(),
            )
            .unwrap_err();
        assert_eq!(e.code, "28000");
        let mut v2 = BytesMut::from(&b"\0\0\0\x08\0\x02\0\0"[..]);
        assert_eq!(
            Login::AwaitingStartup
                .step(&mut v2, &mut out, &c, &mut RouteCache::default())
                .unwrap_err()
                .code,
            "0A000"
        );
        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert_eq!(
            Login::AwaitingStartup
                .step(&mut garbage, &mut out, &c, &mut RouteCache::default())
                .unwrap_err()
                .code,
            "08P01"
        );
        let mut ssl = BytesMut::new();
        frontend::ssl_request(&mut ssl);
        let (_, o) = Login::AwaitingStartup
            .step(&mut ssl, &mut out, &c, &mut RouteCache::default())
            .unwrap();
        assert!(matches!(o, Outcome::NeedMore));
        assert_eq!(&out[..], b"N");
    }
}
