//! Client login, sans-IO: the startup packet, SSL/GSS refusals and the
//! password exchange, up to the point where the client is authenticated
//! and routed. The worker feeds it the client's bytes and writes out what it
//! appends to `out`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::BytesMut;
use odissey_protocol::scram::{
    hmac_sha256, ScramCredential, ScramSecret, ScramServer, SCRAM_SHA_256,
};
use odissey_protocol::{backend, codec, frontend, md5, Error as ProtoError, Startup};

use crate::config::{is_md5_hash, Authentication, Config, ListenTls, ResolvedRoute, RouteCache};

/// A login-ending error: sent as a FATAL ErrorResponse, then the
/// connection closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fatal {
    pub(crate) code: std::borrow::Cow<'static, str>,
    pub(crate) message: String,
    /// PostgreSQL's own words (e.g. a startup parameter it refused): sent
    /// as they are, without odissey's prefix.
    pub(crate) verbatim: bool,
    /// What the log says instead of `message`: the real reason for a
    /// refusal the client must not learn (a user no route admits is told
    /// its password was wrong).
    pub(crate) log: Option<String>,
}

impl Fatal {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: std::borrow::Cow::Borrowed(code),
            message: message.into(),
            verbatim: false,
            log: None,
        }
    }

    /// The reason to log: the real one where the client is told another.
    pub(crate) fn logged(&self) -> &str {
        self.log.as_deref().unwrap_or(&self.message)
    }

    /// A logged-in client broke the protocol. An unknown message type is
    /// worded as PostgreSQL words it (`invalid frontend message type N`).
    pub(crate) fn violation(e: ProtoError) -> Self {
        match e {
            ProtoError::UnknownFrontendType { .. } => Self::new("08P01", e.to_string()),
            other => Self::new("08P01", format!("protocol violation: {other}")),
        }
    }

    /// An error PostgreSQL raised, passed on as it said it.
    pub(crate) fn from_server(code: String, message: String) -> Self {
        Self {
            code: std::borrow::Cow::Owned(code),
            message,
            verbatim: true,
            log: None,
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
    /// The secret the client is checked against: the route's `password`,
    /// or what `auth_query` fetched (None: the user has none, and every
    /// check fails).
    pub(crate) secret: Option<String>,
    /// The SCRAM keys its proof revealed, for logging in to the server as
    /// that user without a password.
    pub(crate) keys: Option<ScramCredential>,
}

/// What the login needs to know about its connection's TLS.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TlsView<'a> {
    /// The listener's mode; `Disable` when it has no usable TLS config.
    pub(crate) mode: ListenTls,
    /// TLS is on for this connection.
    pub(crate) on: bool,
    /// It began with a ClientHello instead of an SSLRequest (PostgreSQL
    /// 17's direct TLS).
    pub(crate) direct: bool,
    /// The client and odissey agreed on ALPN "postgresql".
    pub(crate) alpn_postgresql: bool,
    /// The common name of the client's verified certificate.
    pub(crate) peer_cn: Option<&'a str>,
}

/// Everything a login step looks at besides the bytes.
pub(crate) struct Ctx<'a, 'b> {
    pub(crate) cfg: &'a Config,
    pub(crate) routes: &'a mut RouteCache,
    pub(crate) tls: TlsView<'b>,
}

/// A client whose (database, user) no route admits, while it is taken
/// through a password exchange no answer passes (see [`decoy_method`]).
#[derive(Debug)]
pub(crate) struct Unrouted {
    user: String,
    /// Why it is refused, for the log only.
    why: String,
}

impl Unrouted {
    /// The end of every decoy exchange: the wrong password's answer, with
    /// the real reason for the log.
    fn failed(&self) -> Fatal {
        Fatal {
            log: Some(format!(
                "{}: asked for a password all the same, refused as a wrong one",
                self.why
            )),
            ..password_failed(&self.user)
        }
    }
}

/// Where the login stands.
#[derive(Debug)]
pub(crate) enum Login {
    /// Waiting for the startup packet (or SSLRequest/GSSENCRequest first).
    Startup,
    /// Waiting for the PasswordMessage answering our challenge.
    Password {
        who: Box<Identity>,
        md5_salt: Option<[u8; 4]>,
    },
    /// SASL offered; waiting for SASLInitialResponse (client-first).
    SaslInitial {
        who: Box<Identity>,
        secret: Box<ScramSecret>,
    },
    /// server-first sent; waiting for SASLResponse (client-final).
    SaslFinal {
        who: Box<Identity>,
        scram: Box<ScramServer>,
    },
    /// No route: asked for a password in clear text or md5 as a user with
    /// one would be; waiting for the PasswordMessage, which fails whatever
    /// it says.
    DecoyPassword { who: Box<Unrouted> },
    /// No route, SASL offered with a mock secret; waiting for
    /// SASLInitialResponse.
    DecoySaslInitial {
        who: Box<Unrouted>,
        secret: Box<ScramSecret>,
    },
    /// No route, server-first sent; waiting for SASLResponse, whose proof
    /// cannot match the mock secret.
    DecoySaslFinal {
        who: Box<Unrouted>,
        scram: Box<ScramServer>,
    },
}

/// What one step produced.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// More bytes are needed; `out` may hold a reply (e.g. 'N' to SSL).
    NeedMore,
    /// A CancelRequest: nothing more will come on this connection.
    Cancel { pid: u32, key: u32 },
    /// Start TLS on the connection now, feeding it `already_read` first
    /// (the start of a direct-TLS ClientHello), then read on.
    StartTls {
        already_read: BytesMut,
        direct: bool,
    },
    /// The client is who it says; AuthenticationOk is already in `out`.
    Authenticated(Box<Identity>),
    /// `auth_query`: fetch the user's secret from the server into
    /// `who.secret`, then go on with [`Login::challenge`].
    FetchSecret(Box<Identity>),
    /// `passthrough`, before anything is asked of the client: if the server
    /// lets the client's user in without a password, so does odissey (as
    /// PostgreSQL would); else the client is asked for one
    /// ([`Login::ask_password`]). Nothing is in `out`.
    AskServer(Box<Identity>),
    /// `passthrough`: the client sent this password; it is right if the
    /// server accepts it for the client's user.
    Verify {
        who: Box<Identity>,
        password: String,
    },
}

/// Which startup parameters a client sends that we keep for it.
/// Startup parameters that are not session settings: who and where the
/// client is, and protocol options (`_pq_.*`). Every other parameter is
/// part of the client's session, as in PostgreSQL.
fn is_session_param(name: &str) -> bool {
    !matches!(name, "user" | "database" | "replication") && !name.starts_with("_pq_.")
}

/// The `replication` startup parameter as PostgreSQL reads it: `database`
/// or a boolean in `parse_bool`'s spellings (any prefix of true, false,
/// yes, no; on, off from two letters; 1, 0; any case). Some(true) asks for
/// a walsender, which odissey does not offer; None is not a valid value.
fn replication(value: &str) -> Option<bool> {
    if value == "database" {
        return Some(true);
    }
    let v = value.to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || v == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || v == "0" {
        Some(false)
    } else {
        None
    }
}

/// The first byte of a TLS handshake record: a direct-TLS client.
const TLS_HANDSHAKE: u8 = 0x16;

/// The answer to a wrong password, whatever the method and whether or not
/// the user exists: one shape, so that failures reveal nothing.
pub(crate) fn password_failed(user: &str) -> Fatal {
    Fatal::new(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
}

impl Login {
    /// Consumes input from `rx`; returns the next login state and what
    /// happened, or the error that ends the connection.
    pub(crate) fn step(
        self,
        rx: &mut BytesMut,
        out: &mut BytesMut,
        cx: &mut Ctx<'_, '_>,
    ) -> Result<(Self, Outcome), Fatal> {
        match self {
            Self::Startup => Self::on_startup(rx, out, cx),
            Self::Password { who, md5_salt } => {
                let Some(body) = auth_message(rx)? else {
                    return Ok((Self::Password { who, md5_salt }, Outcome::NeedMore));
                };
                let given = frontend::parse_password(&body)?;
                if who.route.route.authentication == Authentication::Passthrough {
                    let password = given.to_string();
                    return Ok((Self::Startup, Outcome::Verify { who, password }));
                }
                let ok = match (Secret::of_option(who.secret.as_deref()), md5_salt) {
                    (Some(secret), Some(salt)) => secret.check_md5(&who.user, salt, given),
                    (Some(secret), None) => secret.check_plain(&who.user, given),
                    // No secret (auth_query found none): nothing matches.
                    (None, _) => false,
                };
                if !ok {
                    return Err(password_failed(&who.user));
                }
                backend::authentication_ok(out);
                Ok((Self::Startup, Outcome::Authenticated(who)))
            }
            Self::SaslInitial { who, secret } => {
                let Some(body) = auth_message(rx)? else {
                    return Ok((Self::SaslInitial { who, secret }, Outcome::NeedMore));
                };
                let scram = sasl_first(&body, *secret, out)?;
                Ok((Self::SaslFinal { who, scram }, Outcome::NeedMore))
            }
            Self::SaslFinal { mut who, mut scram } => {
                let Some(body) = auth_message(rx)? else {
                    return Ok((Self::SaslFinal { who, scram }, Outcome::NeedMore));
                };
                // A wrong proof and a malformed one end alike: the client
                // learns only that it failed.
                let server_final = scram
                    .handle_client_final(&body)
                    .map_err(|_| password_failed(&who.user))?;
                backend::authentication_sasl_final(out, &server_final);
                backend::authentication_ok(out);
                who.keys = scram.client_keys();
                Ok((Self::Startup, Outcome::Authenticated(who)))
            }
            // The decoy states read and check what they are sent exactly as
            // the real ones do (a malformed message gets the same 08P01),
            // and end where a wrong password ends.
            Self::DecoyPassword { who } => {
                let Some(body) = auth_message(rx)? else {
                    return Ok((Self::DecoyPassword { who }, Outcome::NeedMore));
                };
                frontend::parse_password(&body)?;
                Err(who.failed())
            }
            Self::DecoySaslInitial { who, secret } => {
                let Some(body) = auth_message(rx)? else {
                    return Ok((Self::DecoySaslInitial { who, secret }, Outcome::NeedMore));
                };
                let scram = sasl_first(&body, *secret, out)?;
                Ok((Self::DecoySaslFinal { who, scram }, Outcome::NeedMore))
            }
            Self::DecoySaslFinal { who, mut scram } => {
                let Some(body) = auth_message(rx)? else {
                    return Ok((Self::DecoySaslFinal { who, scram }, Outcome::NeedMore));
                };
                // No proof matches a mock secret (its stored key is no
                // hash anyone knows a preimage of); the check runs anyway,
                // so that it costs what a real one does.
                let _ = scram.handle_client_final(&body);
                Err(who.failed())
            }
        }
    }

    /// A client no route admits: put through the exchange a wrong password
    /// gets, if any route asks for a password (see [`decoy_method`]);
    /// else refused with 28000 at once, as PostgreSQL refuses a client no
    /// pg_hba.conf line admits.
    fn decoy(
        database: &str,
        user: String,
        out: &mut BytesMut,
        cfg: &Config,
    ) -> Result<(Self, Outcome), Fatal> {
        let why = format!("no route for database \"{database}\" and user \"{user}\"");
        let Some(method) = decoy_method(cfg, database) else {
            return Err(Fatal::new("28000", why));
        };
        let who = Box::new(Unrouted { user, why });
        match method {
            Authentication::ScramSha256 => {
                // Stable per user name, as a real user's salt is.
                let secret = Box::new(mock_scram_secret(&who.user));
                backend::authentication_sasl(out, &[SCRAM_SHA_256]);
                Ok((Self::DecoySaslInitial { who, secret }, Outcome::NeedMore))
            }
            Authentication::Md5 => {
                backend::authentication_md5(out, md5_salt()?);
                Ok((Self::DecoyPassword { who }, Outcome::NeedMore))
            }
            _ => {
                backend::authentication_cleartext(out);
                Ok((Self::DecoyPassword { who }, Outcome::NeedMore))
            }
        }
    }

    fn on_startup(
        rx: &mut BytesMut,
        out: &mut BytesMut,
        cx: &mut Ctx<'_, '_>,
    ) -> Result<(Self, Outcome), Fatal> {
        let tls = cx.tls;
        if !tls.on && rx.first() == Some(&TLS_HANDSHAKE) {
            if tls.mode == ListenTls::Disable {
                return Err(Fatal::new("08P01", "TLS is not enabled on this listener"));
            }
            let already_read = rx.split();
            return Ok((
                Self::Startup,
                Outcome::StartTls {
                    already_read,
                    direct: true,
                },
            ));
        }
        let Some(startup) = codec::read_startup(rx)? else {
            return Ok((Self::Startup, Outcome::NeedMore));
        };
        if let Startup::Startup { minor, params, .. } = &startup {
            // Checked as PostgreSQL checks it, while it reads the packet.
            if let Some(value) = crate::params::get(params, "replication") {
                match replication(value) {
                    Some(false) => {}
                    Some(true) => {
                        return Err(Fatal::new(
                            "0A000",
                            "replication connections are not supported by odissey",
                        ))
                    }
                    None => {
                        return Err(Fatal::new(
                            "22023",
                            format!("invalid value for parameter \"replication\": \"{value}\""),
                        ))
                    }
                }
            }
            // PostgreSQL 15+ tells a client asking for a newer minor
            // version, or for protocol options, what it speaks (3.0, no
            // options) and goes on: libpq 18 asks for 3.2 and would
            // otherwise believe it got it.
            let options = startup.protocol_options();
            if *minor > 0 || !options.is_empty() {
                backend::negotiate_protocol_version(out, codec::PROTOCOL_3_0, &options);
            }
        }
        let params = match startup {
            Startup::SslRequest | Startup::GssEncRequest if !rx.is_empty() => {
                // Bytes sent before our answer would be a TLS ClientHello:
                // a client that doesn't wait breaks the protocol (and is how
                // CVE-2021-23214 worked).
                return Err(Fatal::new("08P01", "unexpected data after SSL request"));
            }
            Startup::SslRequest if tls.on => {
                return Err(Fatal::new("08P01", "SSLRequest on a TLS connection"));
            }
            Startup::SslRequest if tls.mode != ListenTls::Disable => {
                out.extend_from_slice(b"S");
                return Ok((
                    Self::Startup,
                    Outcome::StartTls {
                        already_read: BytesMut::new(),
                        direct: false,
                    },
                ));
            }
            // GSS encryption is not offered: the client carries on.
            Startup::SslRequest | Startup::GssEncRequest => {
                out.extend_from_slice(b"N");
                return Ok((Self::Startup, Outcome::NeedMore));
            }
            Startup::Cancel { pid, key } => {
                return Ok((Self::Startup, Outcome::Cancel { pid, key }))
            }
            Startup::Startup { params, .. } => params,
        };
        if !tls.on && tls.mode >= ListenTls::Require {
            return Err(Fatal::new(
                "28000",
                "TLS is required: connect with sslmode=require or stronger",
            ));
        }
        if tls.direct && !tls.alpn_postgresql {
            return Err(Fatal::new(
                "08P01",
                "direct TLS connections need the ALPN protocol \"postgresql\"",
            ));
        }
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
        if tls.mode == ListenTls::VerifyFull && tls.peer_cn != Some(user.as_str()) {
            return Err(Fatal::new(
                "28000",
                format!("the client certificate is not for user \"{user}\""),
            ));
        }
        let Some(route) = cx.routes.route(cx.cfg, &database, &user) else {
            return Self::decoy(&database, user, out, cx.cfg);
        };
        let kept = params
            .iter()
            .filter(|(n, _)| is_session_param(n))
            .cloned()
            .collect();
        let secret = route.route.password.clone();
        let who = Box::new(Identity {
            database,
            user,
            params: kept,
            route,
            secret,
            keys: None,
        });
        let fetch = who.route.route.auth_query.is_some()
            && matches!(
                who.route.route.authentication,
                Authentication::ClearText | Authentication::Md5 | Authentication::ScramSha256
            );
        if fetch {
            return Ok((Self::Startup, Outcome::FetchSecret(who)));
        }
        Self::challenge(who, out, tls)
    }

    /// Asks the client to prove who it is the way its route says (with
    /// `who.secret` as the route's secret).
    pub(crate) fn challenge(
        who: Box<Identity>,
        out: &mut BytesMut,
        tls: TlsView<'_>,
    ) -> Result<(Self, Outcome), Fatal> {
        match who.route.route.authentication {
            Authentication::None => {
                backend::authentication_ok(out);
                Ok((Self::Startup, Outcome::Authenticated(who)))
            }
            Authentication::Block => Err(Fatal::new(
                "28000",
                format!(
                    "user \"{}\" is blocked from database \"{}\"",
                    who.user, who.database
                ),
            )),
            Authentication::Cert => {
                if tls.on && tls.peer_cn == Some(who.user.as_str()) {
                    backend::authentication_ok(out);
                    Ok((Self::Startup, Outcome::Authenticated(who)))
                } else {
                    Err(Fatal::new(
                        "28000",
                        format!(
                            "certificate authentication failed for user \"{}\"",
                            who.user
                        ),
                    ))
                }
            }
            Authentication::ClearText => Ok((Self::ask_password(who, out), Outcome::NeedMore)),
            Authentication::Passthrough => Ok((Self::Startup, Outcome::AskServer(who))),
            Authentication::Md5 => {
                let salt = md5_salt()?;
                backend::authentication_md5(out, salt);
                Ok((
                    Self::Password {
                        who,
                        md5_salt: Some(salt),
                    },
                    Outcome::NeedMore,
                ))
            }
            Authentication::ScramSha256 => {
                let secret = match Secret::of_option(who.secret.as_deref()) {
                    Some(Secret::Scram(s)) => s,
                    Some(Secret::Plain(p)) => scram_secret_for(p),
                    // Refused at load for a configured secret; from
                    // auth_query it can only fail, like an unknown user,
                    // and after the same exchange.
                    Some(Secret::Md5(_)) => {
                        log::warn!(
                            "user {:?} has an md5 secret on the server, which cannot check a SCRAM login",
                            who.user
                        );
                        mock_scram_secret(&who.user)
                    }
                    None => mock_scram_secret(&who.user),
                };
                backend::authentication_sasl(out, &[SCRAM_SHA_256]);
                Ok((
                    Self::SaslInitial {
                        who,
                        secret: Box::new(secret),
                    },
                    Outcome::NeedMore,
                ))
            }
        }
    }
}

impl Login {
    /// Asks the client for its password in clear text (`clear_text`, and
    /// `passthrough` once the server asked for one): the state that waits
    /// for the answer.
    pub(crate) fn ask_password(who: Box<Identity>, out: &mut BytesMut) -> Self {
        backend::authentication_cleartext(out);
        Self::Password {
            who,
            md5_salt: None,
        }
    }
}

/// A fresh random md5 salt.
fn md5_salt() -> Result<[u8; 4], Fatal> {
    let mut salt = [0u8; 4];
    getrandom::getrandom(&mut salt)
        .map_err(|_| Fatal::new("58000", "no randomness for an md5 salt"))?;
    Ok(salt)
}

/// Reads a SASLInitialResponse and answers it with server-first: the
/// server's side of SCRAM up to the client's proof.
fn sasl_first(
    body: &[u8],
    secret: ScramSecret,
    out: &mut BytesMut,
) -> Result<Box<ScramServer>, Fatal> {
    let (mechanism, data) = frontend::parse_sasl_initial_response(body)?;
    if mechanism != SCRAM_SHA_256 {
        return Err(Fatal::new(
            "08P01",
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    let mut scram = ScramServer::try_new(secret)
        .map_err(|_| Fatal::new("58000", "no randomness for a SCRAM nonce"))?;
    let server_first = scram
        .handle_client_first(data)
        .map_err(|e| Fatal::new("08P01", format!("malformed SCRAM message: {e}")))?;
    backend::authentication_sasl_continue(out, &server_first);
    Ok(Box::new(scram))
}

/// The password method a client no route admits is asked for, so that an
/// unknown user (or database) cannot be told from a known user with a
/// wrong password: that of the first route that asks for a password among
/// the routes of the client's database, else of the `default` database,
/// else of the whole config (each in name order), as the client would
/// meet it (`passthrough` asks in clear text, `auth_query` as its method
/// says). None when no route asks for a password (only `none`, `cert`,
/// `block`): every user there gets in, or not, without one, so there is
/// nothing a decoy would hide, and the client is told 28000 as PostgreSQL
/// tells one that no pg_hba.conf line admits.
fn decoy_method(cfg: &Config, database: &str) -> Option<Authentication> {
    let asks = |r: &crate::config::Route| match r.authentication {
        Authentication::ClearText | Authentication::Passthrough => Some(Authentication::ClearText),
        Authentication::Md5 => Some(Authentication::Md5),
        Authentication::ScramSha256 => Some(Authentication::ScramSha256),
        Authentication::None | Authentication::Block | Authentication::Cert => None,
    };
    let of_db = |db: &str| {
        cfg.database
            .get(db)
            .and_then(|d| d.user.values().find_map(asks))
    };
    of_db(database).or_else(|| of_db("default")).or_else(|| {
        cfg.database
            .values()
            .find_map(|d| d.user.values().find_map(asks))
    })
}

/// The body of the next PasswordMessage (or SASL response, which shares
/// its tag), or None while incomplete.
fn auth_message(rx: &mut BytesMut) -> Result<Option<bytes::Bytes>, Fatal> {
    let Some(frame) = codec::read_frame(rx, 8192)? else {
        return Ok(None);
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
    Ok(Some(frame.body))
}

/// A route's `password`, by what PostgreSQL would store.
#[derive(Debug)]
pub(crate) enum Secret<'a> {
    /// Plain text.
    Plain(&'a str),
    /// `md5` + md5(password + user), hex.
    Md5(&'a str),
    /// A SCRAM-SHA-256 verifier.
    Scram(ScramSecret),
}

impl<'a> Secret<'a> {
    /// [`Self::of`], or None without a secret.
    pub(crate) fn of_option(s: Option<&'a str>) -> Option<Self> {
        s.map(Self::of)
    }

    /// Reads a secret; text that merely looks like a verifier but does not
    /// parse is a plain password (PostgreSQL does the same).
    pub(crate) fn of(s: &'a str) -> Self {
        if is_md5_hash(s) {
            return Self::Md5(s);
        }
        match ScramSecret::parse(s) {
            Ok(v) => Self::Scram(v),
            Err(_) => Self::Plain(s),
        }
    }

    /// Does the cleartext password `given` match?
    pub(crate) fn check_plain(&self, user: &str, given: &str) -> bool {
        match self {
            Self::Plain(p) => ct_eq(given.as_bytes(), p.as_bytes()),
            Self::Md5(h) => ct_eq(md5::hash_password(user, given).as_bytes(), h.as_bytes()),
            Self::Scram(v) => {
                let d = ScramSecret::from_password(given, &v.salt, v.iterations);
                ct_eq(&d.stored_key, &v.stored_key) & ct_eq(&d.server_key, &v.server_key)
            }
        }
    }

    /// Does the md5 answer `given` to `salt` match? (A SCRAM verifier
    /// cannot tell: refused when the config is loaded.)
    pub(crate) fn check_md5(&self, user: &str, salt: [u8; 4], given: &str) -> bool {
        match self {
            Self::Plain(p) | Self::Md5(p) => md5::verify(user, p, salt, given),
            Self::Scram(_) => false,
        }
    }
}

/// The SCRAM verifier of a plain password. Derived once per password for
/// the life of the process (PBKDF2 costs milliseconds, and a wildcard route
/// must not pay it per user name), with a salt that is stable within the
/// process but unknowable from outside it.
fn scram_secret_for(password: &str) -> ScramSecret {
    static MEMO: OnceLock<Mutex<HashMap<String, ScramSecret>>> = OnceLock::new();
    let memo = MEMO.get_or_init(Default::default);
    let mut memo = memo.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = memo.get(password) {
        return s.clone();
    }
    let salt = &hmac_sha256(salt_key(), password.as_bytes())[..16];
    let secret = ScramSecret::from_password(password, salt, SCRAM_ITERATIONS);
    if memo.len() >= 1024 {
        // Passwords come from the config, so this is only reload churn.
        memo.clear();
    }
    memo.insert(password.to_string(), secret.clone());
    secret
}

/// A SCRAM secret that no password matches, for users without one: the
/// exchange runs to its end and fails like a wrong password, with a salt
/// that is stable per user (so probing can't tell real users from others).
fn mock_scram_secret(user: &str) -> ScramSecret {
    let key = salt_key();
    let salt = &hmac_sha256(key, format!("salt:{user}").as_bytes())[..16];
    ScramSecret {
        iterations: SCRAM_ITERATIONS,
        salt: salt.to_vec(),
        stored_key: hmac_sha256(key, format!("stored:{user}").as_bytes()),
        server_key: hmac_sha256(key, format!("server:{user}").as_bytes()),
    }
}

/// A random key, fixed for the life of the process, for derived salts.
fn salt_key() -> &'static [u8; 32] {
    static SALT_KEY: OnceLock<[u8; 32]> = OnceLock::new();
    SALT_KEY.get_or_init(|| {
        let mut k = [0u8; 32];
        // Without randomness the derived salts are still distinct.
        let _ = getrandom::getrandom(&mut k);
        k
    })
}

/// PostgreSQL's default `scram_iterations`.
const SCRAM_ITERATIONS: u32 = 4096;

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
    use odissey_protocol::scram::ScramClient;

    fn cfg(auth: &str, password: &str) -> Config {
        Config::parse(&format!(
            "[[listen]]\nport = 0\n[storage.s]\ntype = \"remote\"\n\
             [database.db.user.alice]\nauthentication = \"{auth}\"\npassword = \"{password}\"\nstorage = \"s\"\n"
        ))
        .unwrap()
    }

    /// One step with no TLS on the connection.
    fn step(
        login: Login,
        rx: &mut BytesMut,
        out: &mut BytesMut,
        c: &Config,
    ) -> Result<(Login, Outcome), Fatal> {
        step_tls(login, rx, out, c, TlsView::default())
    }

    fn step_tls(
        login: Login,
        rx: &mut BytesMut,
        out: &mut BytesMut,
        c: &Config,
        tls: TlsView<'_>,
    ) -> Result<(Login, Outcome), Fatal> {
        let mut routes = RouteCache::default();
        let mut cx = Ctx {
            cfg: c,
            routes: &mut routes,
            tls,
        };
        login.step(rx, out, &mut cx)
    }

    fn startup(user: &str, db: &str) -> BytesMut {
        let mut b = BytesMut::new();
        frontend::startup(
            &mut b,
            &[("user", user), ("database", db), ("application_name", "t")],
        );
        b
    }

    fn auth_of(out: &mut BytesMut) -> backend::Authentication {
        let f = read_frame(out, 1024).unwrap().unwrap();
        match BackendMessage::parse(&f).unwrap() {
            BackendMessage::Authentication(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn salt_of(out: &mut BytesMut) -> [u8; 4] {
        match auth_of(out) {
            backend::Authentication::Md5Password { salt } => salt,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn md5_login_with_the_right_and_the_wrong_password() {
        for secret in ["secret", &md5::hash_password("alice", "secret")] {
            let c = cfg("md5", secret);
            for (password, ok) in [("secret", true), ("wrong", false)] {
                let mut rx = startup("alice", "db");
                let mut out = BytesMut::new();
                let (login, o) = step(Login::Startup, &mut rx, &mut out, &c).unwrap();
                assert!(matches!(o, Outcome::NeedMore));
                let salt = salt_of(&mut out);
                frontend::password(&mut rx, &md5::client_response("alice", password, salt));
                match step(login, &mut rx, &mut out, &c) {
                    Ok((_, Outcome::Authenticated(who))) => {
                        assert!(ok);
                        assert_eq!(who.params, vec![("application_name".into(), "t".into())]);
                        assert_eq!(&out[..], b"R\0\0\0\x08\0\0\0\0");
                    }
                    Err(f) => {
                        assert!(!ok);
                        assert_eq!(f, password_failed("alice"));
                    }
                    Ok(other) => panic!("{:?}", other.1),
                }
            }
        }
    }

    /// Runs a whole SCRAM exchange as a client would.
    fn scram_login(c: &Config, password: &str) -> Result<BytesMut, Fatal> {
        let mut rx = startup("alice", "db");
        let mut out = BytesMut::new();
        let (login, _) = step(Login::Startup, &mut rx, &mut out, c)?;
        match auth_of(&mut out) {
            backend::Authentication::Sasl { mechanisms } => {
                assert_eq!(mechanisms, vec![SCRAM_SHA_256.to_string()]);
            }
            other => panic!("{other:?}"),
        }
        let mut client = ScramClient::new(password);
        frontend::sasl_initial_response(&mut rx, SCRAM_SHA_256, &client.client_first());
        let (login, o) = step(login, &mut rx, &mut out, c)?;
        assert!(matches!(o, Outcome::NeedMore));
        let backend::Authentication::SaslContinue { data } = auth_of(&mut out) else {
            panic!("no SASLContinue")
        };
        let last = client.handle_server_first(&data).unwrap();
        frontend::sasl_response(&mut rx, &last);
        let (_, o) = step(login, &mut rx, &mut out, c)?;
        assert!(matches!(o, Outcome::Authenticated(_)));
        let backend::Authentication::SaslFinal { data } = auth_of(&mut out) else {
            panic!("no SASLFinal")
        };
        client.handle_server_final(&data).unwrap();
        assert!(matches!(auth_of(&mut out), backend::Authentication::Ok));
        Ok(out)
    }

    #[test]
    fn scram_with_a_plain_password_and_with_a_verifier() {
        let verifier = ScramSecret::from_password("secret", b"some salt", 4096).to_string_pg();
        for secret in ["secret", verifier.as_str()] {
            let c = cfg("scram-sha-256", secret);
            scram_login(&c, "secret").unwrap();
            assert_eq!(
                scram_login(&c, "wrong").unwrap_err(),
                password_failed("alice")
            );
        }
    }

    #[test]
    fn cleartext_against_every_kind_of_secret() {
        let verifier = ScramSecret::from_password("pw", b"salt!", 4096).to_string_pg();
        for secret in [
            "pw".to_string(),
            md5::hash_password("alice", "pw"),
            verifier,
        ] {
            let c = cfg("clear_text", &secret);
            for (given, ok) in [("pw", true), ("pW", false)] {
                let mut rx = startup("alice", "db");
                let mut out = BytesMut::new();
                let (login, _) = step(Login::Startup, &mut rx, &mut out, &c).unwrap();
                assert!(matches!(
                    auth_of(&mut out),
                    backend::Authentication::CleartextPassword
                ));
                frontend::password(&mut rx, given);
                let r = step(login, &mut rx, &mut out, &c);
                assert_eq!(r.is_ok(), ok, "{secret} / {given}");
            }
        }
    }

    #[test]
    fn byte_by_byte_input() {
        let c = cfg("clear_text", &md5::hash_password("alice", "pw"));
        let mut all = startup("alice", "db");
        frontend::password(&mut all, "pw");
        let mut rx = BytesMut::new();
        let mut out = BytesMut::new();
        let mut login = Login::Startup;
        let mut done = false;
        for b in all.iter() {
            rx.extend_from_slice(&[*b]);
            let (next, o) = step(login, &mut rx, &mut out, &c).unwrap();
            login = next;
            done |= matches!(o, Outcome::Authenticated(_));
        }
        assert!(done);
    }

    #[test]
    fn block_and_passthrough() {
        let c = cfg("block", "x");
        let mut out = BytesMut::new();
        let e = step(Login::Startup, &mut startup("alice", "db"), &mut out, &c).unwrap_err();
        assert_eq!(e.code, "28000");
        assert!(e.message.contains("blocked"), "{}", e.message);

        let c = cfg("passthrough", "unused");
        let mut rx = startup("alice", "db");
        // The server is asked first, before the client is.
        out.clear();
        let (_, o) = step(Login::Startup, &mut rx, &mut out, &c).unwrap();
        let Outcome::AskServer(who) = o else {
            panic!("{o:?}")
        };
        assert!(out.is_empty(), "nothing asked of the client yet");
        // It asked for a password: so is the client, in clear text.
        let login = Login::ask_password(who, &mut out);
        let f = codec::read_frame(&mut out, 1024).unwrap().unwrap();
        assert_eq!((f.tag, &f.body[..]), (b'R', &3u32.to_be_bytes()[..]));
        frontend::password(&mut rx, "what the server will judge");
        let (_, o) = step(login, &mut rx, &mut out, &c).unwrap();
        let Outcome::Verify { who, password } = o else {
            panic!("{o:?}")
        };
        assert_eq!(
            (who.user.as_str(), password.as_str()),
            ("alice", "what the server will judge")
        );
    }

    #[test]
    fn tls_negotiation_by_listener_mode() {
        let c = cfg("none", "x");
        let mut out = BytesMut::new();
        let ssl = || {
            let mut b = BytesMut::new();
            frontend::ssl_request(&mut b);
            b
        };
        // Disabled: 'N', and the client carries on.
        let (_, o) = step(Login::Startup, &mut ssl(), &mut out, &c).unwrap();
        assert!(matches!(o, Outcome::NeedMore));
        assert_eq!(&out.split()[..], b"N");
        // Enabled: 'S', then TLS.
        let allow = TlsView {
            mode: ListenTls::Allow,
            ..TlsView::default()
        };
        let (_, o) = step_tls(Login::Startup, &mut ssl(), &mut out, &c, allow).unwrap();
        assert!(matches!(o, Outcome::StartTls { direct: false, .. }));
        assert_eq!(&out.split()[..], b"S");
        // A second SSLRequest inside TLS is a violation.
        let on = TlsView { on: true, ..allow };
        let e = step_tls(Login::Startup, &mut ssl(), &mut out, &c, on).unwrap_err();
        assert_eq!(e.code, "08P01");
        // Direct TLS: the ClientHello's first bytes are handed over.
        let mut hello = BytesMut::from(&[0x16u8, 3, 1, 0, 5][..]);
        let (_, o) = step_tls(Login::Startup, &mut hello, &mut out, &c, allow).unwrap();
        let Outcome::StartTls {
            already_read,
            direct,
        } = o
        else {
            panic!("{o:?}")
        };
        assert!(direct);
        assert_eq!(&already_read[..], &[0x16, 3, 1, 0, 5]);
        // …which needs ALPN once TLS is up.
        let direct_no_alpn = TlsView {
            on: true,
            direct: true,
            ..allow
        };
        let e = step_tls(
            Login::Startup,
            &mut startup("alice", "db"),
            &mut out,
            &c,
            direct_no_alpn,
        )
        .unwrap_err();
        assert_eq!(e.code, "08P01");
        // Required: plaintext startups are refused.
        let require = TlsView {
            mode: ListenTls::Require,
            ..TlsView::default()
        };
        let e = step_tls(
            Login::Startup,
            &mut startup("alice", "db"),
            &mut out,
            &c,
            require,
        )
        .unwrap_err();
        assert_eq!(e.code, "28000");
        let on = TlsView {
            on: true,
            ..require
        };
        assert!(step_tls(
            Login::Startup,
            &mut startup("alice", "db"),
            &mut out,
            &c,
            on
        )
        .is_ok());
        // verify_full: the certificate must be the user's.
        let full = |cn| TlsView {
            mode: ListenTls::VerifyFull,
            on: true,
            peer_cn: cn,
            ..TlsView::default()
        };
        for (cn, ok) in [(Some("alice"), true), (Some("bob"), false), (None, false)] {
            let r = step_tls(
                Login::Startup,
                &mut startup("alice", "db"),
                &mut out,
                &c,
                full(cn),
            );
            assert_eq!(r.is_ok(), ok, "{cn:?}");
        }
    }

    #[test]
    fn cert_authentication_wants_the_users_certificate() {
        let c = Config::parse(
            "[[listen]]\nport = 0\ntls = \"allow\"\ntls_cert_file = \"/nonexistent\"\n",
        );
        // (Files that don't load are refused at parse time; the login
        // itself only looks at what the connection presents.)
        assert!(c.is_err());
        let mut c = cfg("none", "x");
        c.database
            .get_mut("db")
            .unwrap()
            .user
            .get_mut("alice")
            .unwrap()
            .authentication = Authentication::Cert;
        let mut out = BytesMut::new();
        let tls = |on, cn| TlsView {
            mode: ListenTls::Allow,
            on,
            peer_cn: cn,
            ..TlsView::default()
        };
        for (on, cn, ok) in [
            (true, Some("alice"), true),
            (true, Some("mallory"), false),
            (true, None, false),
            (false, None, false),
        ] {
            let r = step_tls(
                Login::Startup,
                &mut startup("alice", "db"),
                &mut out,
                &c,
                tls(on, cn),
            );
            match r {
                Ok((_, o)) => assert!(ok && matches!(o, Outcome::Authenticated(_))),
                Err(f) => assert!(!ok && f.code == "28000", "{f:?}"),
            }
        }
    }

    /// A SCRAM exchange as `user` on `db` with `password`, to its end:
    /// the server-first's salt and iteration count, and how it ended.
    fn scram_as(
        c: &Config,
        db: &str,
        user: &str,
        password: &str,
    ) -> (String, Result<Outcome, Fatal>) {
        let mut rx = startup(user, db);
        let mut out = BytesMut::new();
        let (login, o) = step(Login::Startup, &mut rx, &mut out, c).unwrap();
        assert!(matches!(o, Outcome::NeedMore));
        let backend::Authentication::Sasl { mechanisms } = auth_of(&mut out) else {
            panic!("no SASL offer for {user}@{db}")
        };
        assert_eq!(mechanisms, vec![SCRAM_SHA_256.to_string()]);
        let mut client = ScramClient::new(password);
        frontend::sasl_initial_response(&mut rx, SCRAM_SHA_256, &client.client_first());
        let (login, o) = step(login, &mut rx, &mut out, c).unwrap();
        assert!(matches!(o, Outcome::NeedMore));
        let backend::Authentication::SaslContinue { data } = auth_of(&mut out) else {
            panic!("no SASLContinue")
        };
        let text = String::from_utf8(data.to_vec()).unwrap();
        // r=<nonce>,s=<salt>,i=<iterations>: the part after the nonce.
        let salt_and_count = text[text.find(",s=").unwrap()..].to_string();
        let last = client.handle_server_first(&data).unwrap();
        frontend::sasl_response(&mut rx, &last);
        (
            salt_and_count,
            step(login, &mut rx, &mut out, c).map(|(_, o)| o),
        )
    }

    #[test]
    fn an_unknown_user_runs_the_scram_exchange_to_a_wrong_passwords_end() {
        let c = cfg("scram-sha-256", "secret");
        let (_, known) = scram_as(&c, "db", "alice", "wrong");
        let known = known.unwrap_err();
        assert_eq!(known, password_failed("alice"));
        // Unknown user, unknown database: the same exchange, the same end.
        for (db, user) in [("db", "mallory"), ("nodb", "alice"), ("nodb", "eve")] {
            let (salt, unknown) = scram_as(&c, db, user, "secret");
            let unknown = unknown.unwrap_err();
            let told = password_failed(user);
            assert_eq!(
                (&unknown.code, &unknown.message, unknown.verbatim),
                (&told.code, &told.message, told.verbatim)
            );
            assert_eq!(unknown.code, known.code);
            // Only the log hears why.
            let logged = unknown.logged();
            assert!(
                logged.contains(&format!(
                    "no route for database \"{db}\" and user \"{user}\""
                )),
                "{logged}"
            );
            assert!(!unknown.message.contains("route"), "{}", unknown.message);
            // The fake salt is stable per user, as a real one is, and
            // differs between users.
            let (again, _) = scram_as(&c, db, user, "other");
            assert_eq!(salt, again);
            assert!(salt.ends_with(&format!(",i={SCRAM_ITERATIONS}")), "{salt}");
            let (someone_else, _) = scram_as(&c, db, &format!("{user}2"), "x");
            assert_ne!(salt, someone_else);
        }
    }

    #[test]
    fn an_unknown_user_gets_the_md5_or_cleartext_request_a_known_one_would() {
        // md5: a challenge with a fresh salt each time, then 28P01.
        let c = cfg("md5", "secret");
        let mut salts = Vec::new();
        for user in ["alice", "mallory", "mallory"] {
            let mut rx = startup(user, "db");
            let mut out = BytesMut::new();
            let (login, o) = step(Login::Startup, &mut rx, &mut out, &c).unwrap();
            assert!(matches!(o, Outcome::NeedMore));
            let salt = salt_of(&mut out);
            salts.push(salt);
            frontend::password(&mut rx, &md5::client_response(user, "wrong", salt));
            let f = step(login, &mut rx, &mut out, &c).unwrap_err();
            assert_eq!(
                (f.code.as_ref(), f.message.as_str()),
                ("28P01", password_failed(user).message.as_str())
            );
            assert!(out.is_empty(), "nothing but the error: {out:?}");
        }
        assert_ne!(salts[1], salts[2], "md5 salts are random");
        // Even the right password of another user does not pass.
        let mut rx = startup("mallory", "db");
        let mut out = BytesMut::new();
        let (login, _) = step(Login::Startup, &mut rx, &mut out, &c).unwrap();
        let salt = salt_of(&mut out);
        frontend::password(&mut rx, &md5::client_response("mallory", "secret", salt));
        assert_eq!(
            step(login, &mut rx, &mut out, &c).unwrap_err().code,
            "28P01"
        );

        // clear_text and passthrough ask in clear text; a malformed answer
        // gets the same 08P01 as a known user's would.
        for method in ["clear_text", "passthrough"] {
            let c = cfg(method, "secret");
            let mut rx = startup("mallory", "db");
            let mut out = BytesMut::new();
            let (login, _) = step(Login::Startup, &mut rx, &mut out, &c).unwrap();
            assert!(matches!(
                auth_of(&mut out),
                backend::Authentication::CleartextPassword
            ));
            frontend::password(&mut rx, "secret");
            let f = step(login, &mut rx, &mut out, &c).unwrap_err();
            assert_eq!(f.message, password_failed("mallory").message, "{method}");
            let mut rx = startup("mallory", "db");
            let (login, _) = step(Login::Startup, &mut rx, &mut out, &c).unwrap();
            out.clear();
            rx.extend_from_slice(b"Q\0\0\0\x05\0");
            assert_eq!(
                step(login, &mut rx, &mut out, &c).unwrap_err().code,
                "08P01"
            );
        }
    }

    #[test]
    fn the_decoy_method_is_the_databases_then_the_defaults_then_any() {
        let c = Config::parse(
            "[[listen]]\nport = 0\n[storage.s]\ntype = \"remote\"\n\
             [database.a.user.trusted]\nauthentication = \"none\"\nstorage = \"s\"\n\
             [database.a.user.zed]\nauthentication = \"md5\"\npassword = \"p\"\nstorage = \"s\"\n\
             [database.b.user.bob]\nauthentication = \"scram-sha-256\"\npassword = \"p\"\nstorage = \"s\"\n\
             [database.c.user.carol]\nauthentication = \"none\"\nstorage = \"s\"\n",
        )
        .unwrap();
        assert_eq!(decoy_method(&c, "a"), Some(Authentication::Md5));
        assert_eq!(decoy_method(&c, "b"), Some(Authentication::ScramSha256));
        // A database whose routes ask for nothing, or one with no route:
        // the first route that asks, in name order.
        assert_eq!(decoy_method(&c, "c"), Some(Authentication::Md5));
        assert_eq!(decoy_method(&c, "nowhere"), Some(Authentication::Md5));
        // The trusted user still gets in without a password.
        let mut out = BytesMut::new();
        let (_, o) = step(Login::Startup, &mut startup("trusted", "a"), &mut out, &c).unwrap();
        assert!(matches!(o, Outcome::Authenticated(_)));

        // Only routes that ask for no password: nothing to hide, and the
        // refusal says what it is, as PostgreSQL's pg_hba one does.
        let c = cfg("none", "x");
        assert_eq!(decoy_method(&c, "db"), None);
        let e = step(Login::Startup, &mut startup("bob", "db"), &mut out, &c).unwrap_err();
        assert_eq!(e.code, "28000");
        assert!(e.message.contains("no route"), "{}", e.message);
    }

    #[test]
    fn bad_startups_get_the_right_sqlstate() {
        let c = cfg("none", "x");
        let mut out = BytesMut::new();
        let e = step(Login::Startup, &mut startup("bob", "db"), &mut out, &c).unwrap_err();
        assert_eq!(e.code, "28000");
        let mut v2 = BytesMut::from(&b"\0\0\0\x08\0\x02\0\0"[..]);
        assert_eq!(
            step(Login::Startup, &mut v2, &mut out, &c)
                .unwrap_err()
                .code,
            "0A000"
        );
        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert_eq!(
            step(Login::Startup, &mut garbage, &mut out, &c)
                .unwrap_err()
                .code,
            "08P01"
        );
    }

    #[test]
    fn replication_is_read_like_postgresql_and_refused() {
        for (v, want) in [
            ("database", Some(true)),
            ("true", Some(true)),
            ("TRUE", Some(true)),
            ("t", Some(true)),
            ("yes", Some(true)),
            ("on", Some(true)),
            ("1", Some(true)),
            ("false", Some(false)),
            ("f", Some(false)),
            ("no", Some(false)),
            ("of", Some(false)),
            ("off", Some(false)),
            ("0", Some(false)),
            ("o", None),
            ("", None),
            ("Database", None),
            ("truest", None),
            ("2", None),
        ] {
            assert_eq!(replication(v), want, "{v:?}");
        }
        let c = cfg("none", "x");
        let mut out = BytesMut::new();
        for (v, code) in [("database", "0A000"), ("on", "0A000"), ("maybe", "22023")] {
            let mut rx = BytesMut::new();
            frontend::startup(
                &mut rx,
                &[("user", "alice"), ("database", "db"), ("replication", v)],
            );
            let e = step(Login::Startup, &mut rx, &mut out, &c).unwrap_err();
            assert_eq!(e.code, code, "{v}: {e:?}");
        }
        let mut rx = BytesMut::new();
        frontend::startup(
            &mut rx,
            &[
                ("user", "alice"),
                ("database", "db"),
                ("replication", "off"),
            ],
        );
        out.clear();
        let (_, o) = step(Login::Startup, &mut rx, &mut out, &c).unwrap();
        let Outcome::Authenticated(who) = o else {
            panic!("replication=off logs in");
        };
        assert!(who.params.is_empty(), "{:?}", who.params);
        assert_eq!(
            out.first(),
            Some(&b'R'),
            "no NegotiateProtocolVersion for 3.0"
        );
    }

    #[test]
    fn newer_minor_versions_and_protocol_options_are_negotiated() {
        let c = cfg("none", "x");
        let mut rx = BytesMut::new();
        rx.extend_from_slice(&[0, 0, 0, 0, 0, 3, 0, 2]);
        rx.extend_from_slice(b"user\0alice\0database\0db\0_pq_.x\0y\0\0");
        let len = (rx.len() as u32).to_be_bytes();
        rx[..4].copy_from_slice(&len);
        let mut out = BytesMut::new();
        let (_, o) = step(Login::Startup, &mut rx, &mut out, &c).unwrap();
        let Outcome::Authenticated(who) = o else {
            panic!("3.2 logs in on 3.0");
        };
        assert!(who.params.is_empty(), "{:?}", who.params);
        let f = read_frame(&mut out, 1 << 20).unwrap().unwrap();
        assert_eq!(
            BackendMessage::parse(&f).unwrap(),
            BackendMessage::NegotiateProtocolVersion {
                minor: codec::PROTOCOL_3_0,
                options: vec!["_pq_.x".into()],
            }
        );
        // Then the login goes on: AuthenticationOk.
        assert_eq!(read_frame(&mut out, 1 << 20).unwrap().unwrap().tag, b'R');
    }
}
