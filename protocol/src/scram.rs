//! SCRAM-SHA-256 (RFC 5802 / RFC 7677) without channel binding.
//!
//! Both sides are here: [`ScramClient`] for logging in to PostgreSQL,
//! [`ScramServer`] (with a stored [`ScramSecret`]) for authenticating
//! clients. Passwords are used as raw UTF-8 bytes; PostgreSQL applies
//! SASLprep first, which is the identity for ASCII passwords.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::util::ct_eq;

/// The SASL mechanism name.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Upper bound on the iteration count a server may demand, so a hostile
/// server cannot make the client burn CPU for minutes.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// Raw nonce length before base64, as libpq and the PostgreSQL server use.
const NONCE_LEN: usize = 18;

/// GS2 header of a client that does not use channel binding; its base64
/// ("biws") is the c= attribute of client-final.
const GS2_HEADER: &str = "n,,";

/// Shorthand for an authentication error.
fn auth(what: &'static str) -> Error {
    Error::Auth { what }
}

/// HMAC-SHA-256 over the concatenation of `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// SHA-256 of `data`.
/// HMAC-SHA-256 of `data` under `key`, for callers that derive their own
/// values (e.g. a stable salt for a verifier made from a plain password).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    hmac(key, &[data])
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Hi(password, salt, i) from RFC 5802, i.e. PBKDF2-HMAC-SHA-256.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out);
    out
}

/// A fresh base64 nonce from the OS RNG.
fn random_nonce() -> Result<String> {
    let mut raw = [0u8; NONCE_LEN];
    getrandom::getrandom(&mut raw)
        .map_err(|_| auth("no randomness available for a SCRAM nonce"))?;
    Ok(BASE64.encode(raw))
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E (no comma).
fn is_printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Takes attribute `name` ("x=value") from the next comma-separated part.
fn attr<'a>(part: Option<&'a str>, name: u8, what: &'static str) -> Result<&'a str> {
    let part = part.ok_or(auth(what))?;
    match part.as_bytes() {
        [n, b'=', ..] if *n == name => Ok(&part[2..]),
        _ => Err(auth(what)),
    }
}

/// Decodes a base64 32-byte value (proof, signature, key).
fn decode_32(s: &str, what: &'static str) -> Result<[u8; 32]> {
    let v = BASE64.decode(s).map_err(|_| auth(what))?;
    v.try_into().map_err(|_| auth(what))
}

/// Escapes a username as an RFC 5802 saslname.
fn saslname(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// Where the client is in the exchange.
enum ClientState {
    /// client-first produced, waiting for server-first.
    Initial,
    /// client-final sent; the server must prove it knows the password.
    SentFinal { server_signature: [u8; 32] },
}

/// What a client proves its identity with.
#[derive(Clone, PartialEq, Eq)]
pub enum ScramCredential {
    /// The password.
    Password(String),
    /// The keys derived from it (ClientKey, ServerKey): enough to log in
    /// to a server whose verifier they match, without the password. A
    /// pooler learns them from a client's SCRAM proof.
    Keys {
        /// HMAC(SaltedPassword, "Client Key").
        client_key: [u8; 32],
        /// HMAC(SaltedPassword, "Server Key").
        server_key: [u8; 32],
    },
}

impl fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets stay out of logs.
        f.write_str(match self {
            Self::Password(_) => "Password(..)",
            Self::Keys { .. } => "Keys{..}",
        })
    }
}

/// Client side of a SCRAM-SHA-256 exchange, for logging in to PostgreSQL.
pub struct ScramClient {
    credential: ScramCredential,
    nonce: String,
    client_first_bare: String,
    state: ClientState,
}

impl fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password.
        f.debug_struct("ScramClient")
            .field("client_first_bare", &self.client_first_bare)
            .finish_non_exhaustive()
    }
}

impl ScramClient {
    /// Starts an exchange with a random nonce (getrandom, 18 bytes base64).
    /// Username in client-first is empty, as libpq does ("n,,n=,r=...").
    ///
    /// # Panics
    /// Only if the OS has no randomness to give; see [`Self::try_new`].
    pub fn new(password: &str) -> Self {
        Self::try_new(password).expect("OS random number generator failed")
    }

    /// Like [`Self::new`] but reports an RNG failure instead of panicking.
    pub fn try_new(password: &str) -> Result<Self> {
        Ok(Self::with_nonce(password, &random_nonce()?))
    }

    /// Starts an exchange with a given nonce (for known-answer tests).
    pub fn with_nonce(password: &str, nonce: &str) -> Self {
        Self::with_nonce_and_user(password, nonce, "")
    }

    /// Like [`Self::with_nonce`] with a username in client-first, so tests
    /// can replay RFC vectors (PostgreSQL ignores the SCRAM username).
    #[doc(hidden)]
    pub fn with_nonce_and_user(password: &str, nonce: &str, user: &str) -> Self {
        Self::with_credential(ScramCredential::Password(password.to_owned()), nonce, user)
    }

    /// Starts an exchange with keys instead of a password (see
    /// [`ScramCredential::Keys`]), with a random nonce.
    pub fn try_with_keys(client_key: [u8; 32], server_key: [u8; 32]) -> Result<Self> {
        Ok(Self::with_credential(
            ScramCredential::Keys {
                client_key,
                server_key,
            },
            &random_nonce()?,
            "",
        ))
    }

    fn with_credential(credential: ScramCredential, nonce: &str, user: &str) -> Self {
        Self {
            credential,
            nonce: nonce.to_owned(),
            client_first_bare: format!("n={},r={}", saslname(user), nonce),
            state: ClientState::Initial,
        }
    }

    /// The client-first message for the SASLInitialResponse.
    pub fn client_first(&self) -> Vec<u8> {
        format!("{GS2_HEADER}{}", self.client_first_bare).into_bytes()
    }

    /// Takes server-first (r=..,s=..,i=..), checks the nonce extends ours and
    /// 1 <= iterations <= [`MAX_ITERATIONS`], returns client-final
    /// (c=biws,r=..,p=..).
    pub fn handle_server_first(&mut self, server_first: &[u8]) -> Result<Vec<u8>> {
        if !matches!(self.state, ClientState::Initial) {
            return Err(auth("SCRAM exchange out of order"));
        }
        let msg = std::str::from_utf8(server_first)
            .map_err(|_| auth("server-first-message is not UTF-8"))?;
        if msg.starts_with("m=") {
            return Err(auth("unsupported SCRAM mandatory extension"));
        }
        let mut parts = msg.split(',');
        let nonce = attr(parts.next(), b'r', "server-first-message has no nonce")?;
        let salt = attr(parts.next(), b's', "server-first-message has no salt")?;
        let iterations = attr(
            parts.next(),
            b'i',
            "server-first-message has no iteration count",
        )?;
        // Anything after i= is an extension we may ignore.

        if nonce.len() <= self.nonce.len()
            || !nonce.starts_with(&self.nonce)
            || !is_printable(nonce)
        {
            return Err(auth("server nonce does not extend the client nonce"));
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| auth("invalid SCRAM salt"))?;
        if salt.is_empty() {
            return Err(auth("empty SCRAM salt"));
        }
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| auth("invalid SCRAM iteration count"))?;
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return Err(auth("SCRAM iteration count out of range"));
        }

        let (client_key, server_key) = match &self.credential {
            ScramCredential::Password(p) => {
                let salted = salted_password(p.as_bytes(), &salt, iterations);
                (
                    hmac(&salted, &[b"Client Key"]),
                    hmac(&salted, &[b"Server Key"]),
                )
            }
            // The server's salt and count must be those the keys were
            // made with; if not, the server refuses the proof.
            ScramCredential::Keys {
                client_key,
                server_key,
            } => (*client_key, *server_key),
        };
        let stored_key = sha256(&client_key);

        let without_proof = format!("c={},r={nonce}", BASE64.encode(GS2_HEADER));
        let auth_message = [
            self.client_first_bare.as_bytes(),
            b",",
            server_first,
            b",",
            without_proof.as_bytes(),
        ];
        let client_signature = hmac(&stored_key, &auth_message);
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(client_signature) {
            *p ^= s;
        }
        self.state = ClientState::SentFinal {
            server_signature: hmac(&server_key, &auth_message),
        };
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks server-final (v=...) against the expected ServerSignature;
    /// e=... -> Err(Auth).
    pub fn handle_server_final(&self, server_final: &[u8]) -> Result<()> {
        let ClientState::SentFinal { server_signature } = &self.state else {
            return Err(auth("SCRAM exchange out of order"));
        };
        let msg = std::str::from_utf8(server_final)
            .map_err(|_| auth("server-final-message is not UTF-8"))?;
        if msg.starts_with("e=") {
            return Err(auth("server reported a SCRAM error"));
        }
        let v = attr(
            msg.split(',').next(),
            b'v',
            "server-final-message has no verifier",
        )?;
        let got = decode_32(v, "invalid server signature")?;
        if ct_eq(&got, server_signature) {
            Ok(())
        } else {
            Err(auth("server signature does not match"))
        }
    }
}

/// A stored SCRAM secret
/// `SCRAM-SHA-256$<iter>:<salt b64>$<StoredKey b64>:<ServerKey b64>`
/// (PostgreSQL's format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: Vec<u8>,
    /// H(HMAC(SaltedPassword, "Client Key")).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

impl ScramSecret {
    /// Parses PostgreSQL's text form (as in pg_authid.rolpassword).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |what| Error::Malformed { what };
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(bad("SCRAM secret does not start with SCRAM-SHA-256$"))?;
        let (iter_salt, keys) = rest
            .split_once('$')
            .ok_or(bad("SCRAM secret has no key part"))?;
        let (iterations, salt) = iter_salt
            .split_once(':')
            .ok_or(bad("SCRAM secret has no salt"))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(bad("SCRAM secret has no server key"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| bad("invalid SCRAM secret iteration count"))?;
        if iterations == 0 {
            return Err(bad("invalid SCRAM secret iteration count"));
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| bad("invalid SCRAM secret salt"))?;
        let key = |k: &str| -> Result<[u8; 32]> {
            let v = BASE64
                .decode(k)
                .map_err(|_| bad("invalid SCRAM secret key"))?;
            v.try_into().map_err(|_| bad("invalid SCRAM secret key"))
        };
        Ok(Self {
            iterations,
            salt,
            stored_key: key(stored_key)?,
            server_key: key(server_key)?,
        })
    }

    /// Derives the secret from a password (SaltedPassword via
    /// PBKDF2-HMAC-SHA-256).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted = salted_password(password.as_bytes(), salt, iterations);
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&hmac(&salted, &[b"Client Key"])),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// PostgreSQL's text form.
    pub fn to_string_pg(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }
}

/// Where the server is in the exchange.
enum ServerState {
    /// Waiting for client-first.
    Initial,
    /// server-first sent; waiting for client-final.
    SentFirst {
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    /// Finished (successfully or not); no retries within one exchange.
    Done,
}

/// Server side of the exchange, for authenticating clients.
pub struct ScramServer {
    secret: ScramSecret,
    server_nonce: String,
    state: ServerState,
    /// The ClientKey a verified proof revealed.
    client_key: Option<[u8; 32]>,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys stay out of logs.
        f.debug_struct("ScramServer").finish_non_exhaustive()
    }
}

impl ScramServer {
    /// Starts an exchange with a random server nonce part.
    ///
    /// # Panics
    /// Only if the OS has no randomness to give; see [`Self::try_new`].
    pub fn new(secret: ScramSecret) -> Self {
        Self::try_new(secret).expect("OS random number generator failed")
    }

    /// Like [`Self::new`] but reports an RNG failure instead of panicking.
    pub fn try_new(secret: ScramSecret) -> Result<Self> {
        Ok(Self::with_nonce(secret, &random_nonce()?))
    }

    /// Starts an exchange with a given server nonce part (for tests).
    #[doc(hidden)]
    pub fn with_nonce(secret: ScramSecret, server_nonce: &str) -> Self {
        Self {
            secret,
            server_nonce: server_nonce.to_owned(),
            state: ServerState::Initial,
            client_key: None,
        }
    }

    /// client-first (from SASLInitialResponse data) -> server-first. Rejects
    /// channel binding requests other than 'n'/'y' (p=... -> Err(Auth)).
    pub fn handle_client_first(&mut self, client_first: &[u8]) -> Result<Vec<u8>> {
        if !matches!(self.state, ServerState::Initial) {
            return Err(auth("SCRAM exchange out of order"));
        }
        self.state = ServerState::Done;
        let msg = std::str::from_utf8(client_first)
            .map_err(|_| auth("client-first-message is not UTF-8"))?;
        let mut gs2 = msg.splitn(3, ',');
        let cbind = gs2.next().unwrap_or_default();
        let authzid = gs2
            .next()
            .ok_or(auth("malformed SCRAM client-first-message"))?;
        let bare = gs2
            .next()
            .ok_or(auth("malformed SCRAM client-first-message"))?;
        match cbind {
            // 'y' means "I could bind but think you can't": fine, since we
            // never offer SCRAM-SHA-256-PLUS there is no downgrade to detect.
            "n" | "y" => {}
            c if c.starts_with("p=") => return Err(auth("channel binding is not supported")),
            _ => return Err(auth("malformed SCRAM channel binding flag")),
        }
        if !authzid.is_empty() {
            return Err(auth("SCRAM authorization identity is not supported"));
        }
        if bare.starts_with("m=") {
            return Err(auth("unsupported SCRAM mandatory extension"));
        }
        let mut parts = bare.split(',');
        // The SCRAM username is ignored, as PostgreSQL does: the startup
        // packet's user is authoritative.
        attr(parts.next(), b'n', "client-first-message has no username")?;
        let client_nonce = attr(parts.next(), b'r', "client-first-message has no nonce")?;
        if !is_printable(client_nonce) {
            return Err(auth("invalid SCRAM client nonce"));
        }
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&self.secret.salt),
            self.secret.iterations
        );
        self.state = ServerState::SentFirst {
            gs2_header: format!("{cbind},,"),
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok(server_first.into_bytes())
    }

    /// After a successful exchange: the client's keys (ClientKey from its
    /// proof, ServerKey from the secret), with which the same user can log
    /// in to a server holding the same verifier.
    pub fn client_keys(&self) -> Option<ScramCredential> {
        self.client_key.map(|client_key| ScramCredential::Keys {
            client_key,
            server_key: self.secret.server_key,
        })
    }

    /// client-final -> Ok(server-final "v=...") if the proof verifies,
    /// Err(Auth{what:"password authentication failed"}) otherwise
    /// (constant-time compare).
    pub fn handle_client_final(&mut self, client_final: &[u8]) -> Result<Vec<u8>> {
        let ServerState::SentFirst {
            gs2_header,
            client_first_bare,
            server_first,
            nonce,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(auth("SCRAM exchange out of order"));
        };
        let msg = std::str::from_utf8(client_final)
            .map_err(|_| auth("client-final-message is not UTF-8"))?;
        // The proof is the last attribute and is not part of AuthMessage.
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(auth("client-final-message has no proof"))?;
        let mut parts = without_proof.split(',');
        let cbind = attr(
            parts.next(),
            b'c',
            "client-final-message has no channel binding",
        )?;
        let cbind = BASE64
            .decode(cbind)
            .map_err(|_| auth("invalid SCRAM channel binding attribute"))?;
        if cbind != gs2_header.as_bytes() {
            return Err(auth("SCRAM channel binding does not match"));
        }
        let got_nonce = attr(parts.next(), b'r', "client-final-message has no nonce")?;
        if got_nonce != nonce {
            return Err(auth("SCRAM nonce does not match"));
        }
        let proof = decode_32(proof, "invalid SCRAM client proof")?;

        let auth_message = [
            client_first_bare.as_bytes(),
            b",",
            server_first.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        let client_signature = hmac(&self.secret.stored_key, &auth_message);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        if !ct_eq(&sha256(&client_key), &self.secret.stored_key) {
            return Err(auth("password authentication failed"));
        }
        self.client_key = Some(client_key);
        let server_signature = hmac(&self.secret.server_key, &auth_message);
        Ok(format!("v={}", BASE64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_secret() -> ScramSecret {
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        ScramSecret::from_password("pencil", &salt, 4096)
    }

    #[test]
    fn rfc7677_client_known_answer() {
        let mut c = ScramClient::with_nonce_and_user("pencil", CLIENT_NONCE, "user");
        assert_eq!(c.client_first(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let client_final = c.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(client_final).unwrap(), CLIENT_FINAL);
        c.handle_server_final(SERVER_FINAL.as_bytes()).unwrap();
        // A tampered signature is rejected.
        assert!(c
            .handle_server_final(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .is_err());
        assert!(matches!(
            c.handle_server_final(b"e=invalid-proof"),
            Err(Error::Auth { .. })
        ));
        // No second server-first.
        assert!(c.handle_server_first(SERVER_FIRST.as_bytes()).is_err());
    }

    #[test]
    fn rfc7677_server_known_answer() {
        let mut s = ScramServer::with_nonce(rfc_secret(), SERVER_NONCE);
        let server_first = s
            .handle_client_first(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
            .unwrap();
        assert_eq!(String::from_utf8(server_first).unwrap(), SERVER_FIRST);
        let server_final = s.handle_client_final(CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(String::from_utf8(server_final).unwrap(), SERVER_FINAL);
    }

    #[test]
    fn default_client_first_has_empty_user() {
        let c = ScramClient::with_nonce("pw", "abc");
        assert_eq!(c.client_first(), b"n,,n=,r=abc");
        let c = ScramClient::new("pw");
        let first = String::from_utf8(c.client_first()).unwrap();
        let nonce = first.strip_prefix("n,,n=,r=").unwrap();
        assert_eq!(BASE64.decode(nonce).unwrap().len(), NONCE_LEN);
        assert_ne!(
            ScramClient::new("pw").client_first(),
            ScramClient::new("pw").client_first()
        );
    }

    /// Runs a full in-memory exchange.
    fn exchange(client_password: &str, secret: &ScramSecret) -> Result<()> {
        let mut c = ScramClient::new(client_password);
        let mut s = ScramServer::new(secret.clone());
        let server_first = s.handle_client_first(&c.client_first())?;
        let client_final = c.handle_server_first(&server_first)?;
        let server_final = s.handle_client_final(&client_final)?;
        c.handle_server_final(&server_final)
    }

    #[test]
    fn client_server_pair() {
        let secret = ScramSecret::from_password("s3cret", b"0123456789abcdef", 16);
        assert_eq!(exchange("s3cret", &secret), Ok(()));
        assert_eq!(
            exchange("wrong", &secret),
            Err(Error::Auth {
                what: "password authentication failed"
            })
        );
    }

    #[test]
    fn server_rejects_bad_client_messages() {
        let secret = rfc_secret();
        let first =
            |msg: &[u8]| ScramServer::with_nonce(secret.clone(), "x").handle_client_first(msg);
        assert_eq!(
            first(b"p=tls-server-end-point,,n=,r=abc"),
            Err(Error::Auth {
                what: "channel binding is not supported"
            })
        );
        assert!(first(b"y,,n=,r=abc").is_ok());
        assert!(first(b"n,a=admin,n=,r=abc").is_err());
        assert!(first(b"n,,m=ext,n=,r=abc").is_err());
        assert!(first(b"n,,n=,r=").is_err());
        assert!(first(b"n,,n=").is_err());
        assert!(first(b"x,,n=,r=abc").is_err());
        assert!(first(b"").is_err());

        // Final with the wrong nonce / channel binding / no proof.
        let run_final = |msg: &str| {
            let mut s = ScramServer::with_nonce(secret.clone(), "SRV");
            s.handle_client_first(b"n,,n=,r=abc").unwrap();
            s.handle_client_final(msg.as_bytes())
        };
        let proof = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert!(run_final(&format!("c=biws,r=abcXXX,{proof}")).is_err());
        assert!(run_final(&format!("c=eSws,r=abcSRV,{proof}")).is_err());
        assert!(run_final("c=biws,r=abcSRV").is_err());
        assert!(run_final("c=biws,r=abcSRV,p=short").is_err());
        assert_eq!(
            run_final(&format!("c=biws,r=abcSRV,{proof}")),
            Err(Error::Auth {
                what: "password authentication failed"
            })
        );
        // Out of order.
        let mut s = ScramServer::with_nonce(secret, "SRV");
        assert!(s.handle_client_final(CLIENT_FINAL.as_bytes()).is_err());
    }

    #[test]
    fn client_rejects_bad_server_first() {
        let run = |msg: &str| {
            ScramClient::with_nonce("pencil", CLIENT_NONCE).handle_server_first(msg.as_bytes())
        };
        let cases = [
            // Nonce that does not extend ours, or equals it.
            "r=XXXXNGfwEbeRWgbNEkqO%hvY,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=10000001",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=!!!,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,i=4096",
            "m=ext,r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "",
        ];
        for case in cases {
            assert!(
                matches!(run(case), Err(Error::Auth { .. })),
                "accepted {case:?}"
            );
        }
        // Extensions after i= are ignored.
        assert!(run("r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=1,x=y").is_ok());
        // Final before first is out of order.
        let c = ScramClient::with_nonce("pencil", CLIENT_NONCE);
        assert!(c.handle_server_final(SERVER_FINAL.as_bytes()).is_err());
    }

    #[test]
    fn secret_roundtrip() {
        let secret = rfc_secret();
        let text = secret.to_string_pg();
        assert!(text.starts_with("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$"));
        assert_eq!(ScramSecret::parse(&text), Ok(secret));

        // Arbitrary valid keys in PostgreSQL's layout survive a parse/format cycle.
        let pg = "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$\
                  W5AEsbsqhXXAgV2ZSWP6k9l3Q3m7BuJtC4WQeiOF1bk=:\
                  GqAHD4mrAoqZgGVvRzkCqGvmnNpInvaDoekAZB9Vj4o=";
        let parsed = ScramSecret::parse(pg).unwrap();
        assert_eq!(parsed.to_string_pg(), pg);

        for bad in [
            "",
            "md5abc",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$0:c2FsdA==$W5AEsbsqhXXAgV2ZSWP6k9l3Q3m7BuJtC4WQeiOF1bk=:W5AEsbsqhXXAgV2ZSWP6k9l3Q3m7BuJtC4WQeiOF1bk=",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:!!$W5AEsbsqhXXAgV2ZSWP6k9l3Q3m7BuJtC4WQeiOF1bk=:W5AEsbsqhXXAgV2ZSWP6k9l3Q3m7BuJtC4WQeiOF1bk=",
        ] {
            assert!(ScramSecret::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_secret_authenticates_its_password() {
        // Server using a parsed text secret, client with the password.
        let text = ScramSecret::from_password("hunter2", b"salty", 8).to_string_pg();
        let secret = ScramSecret::parse(&text).unwrap();
        assert_eq!(exchange("hunter2", &secret), Ok(()));
    }

    #[test]
    fn keys_learned_from_a_proof_log_in_like_the_password() {
        let secret = ScramSecret::from_password("hunter2", b"pepper", 4096);
        // A client proves itself to the pooler…
        let mut pooler = ScramServer::new(secret.clone());
        let mut client = ScramClient::new("hunter2");
        let first = pooler.handle_client_first(&client.client_first()).unwrap();
        let last = client.handle_server_first(&first).unwrap();
        assert!(pooler.client_keys().is_none());
        pooler.handle_client_final(&last).unwrap();
        let Some(ScramCredential::Keys {
            client_key,
            server_key,
        }) = pooler.client_keys()
        else {
            panic!("no keys")
        };
        // …and the pooler logs in to the server with what it learned.
        let mut server = ScramServer::new(secret);
        let mut pooler_as_client = ScramClient::try_with_keys(client_key, server_key).unwrap();
        let first = server
            .handle_client_first(&pooler_as_client.client_first())
            .unwrap();
        let last = pooler_as_client.handle_server_first(&first).unwrap();
        let fin = server.handle_client_final(&last).unwrap();
        pooler_as_client.handle_server_final(&fin).unwrap();
        // A server with another verifier refuses those keys.
        let mut other = ScramServer::new(ScramSecret::from_password("hunter2", b"salt2", 4096));
        let mut c = ScramClient::try_with_keys(client_key, server_key).unwrap();
        let first = other.handle_client_first(&c.client_first()).unwrap();
        let last = c.handle_server_first(&first).unwrap();
        assert!(other.handle_client_final(&last).is_err());
        // A failed proof reveals nothing.
        let mut pooler = ScramServer::new(ScramSecret::from_password("x", b"s", 4096));
        let mut wrong = ScramClient::new("y");
        let first = pooler.handle_client_first(&wrong.client_first()).unwrap();
        let last = wrong.handle_server_first(&first).unwrap();
        assert!(pooler.handle_client_final(&last).is_err());
        assert!(pooler.client_keys().is_none());
    }
}
