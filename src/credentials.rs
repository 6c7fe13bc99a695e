//! What odissey learned about users' server credentials at run time, for
//! the routes that keep no server password in the config:
//!
//! - `passthrough`: a password a client proved by logging in to the server
//!   with it. Kept with a salted check value, so that later clients are
//!   checked without a server round trip, and in plain text for one reason:
//!   the pool's own server logins for that user need it. A password that
//!   fails the check is tried on the server again (it may have changed
//!   there), and forgotten when the server refuses it.
//! - SCRAM keys (ClientKey, ServerKey) learned from a client's SCRAM proof
//!   against the server's own verifier (from `auth_query`, or configured):
//!   enough for the pool to log in as that user, and no password at all;
//!   likewise an md5 hash from `auth_query`, which md5 logins take in place
//!   of the password.
//! - `auth_query` results: the secret the server holds for a user, cached
//!   for [`SECRET_TTL`] so a burst of logins runs the query once.
//! - `passthrough`: whether the server lets a user into a database without
//!   asking for a password (pg_hba `trust`), learned by logging in with
//!   none, and believed for [`TRUST_TTL`] only.
//!
//! Nothing here ever goes to a log line.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use odissey_protocol::scram::{hmac_sha256, ScramCredential};

/// How long a secret fetched by `auth_query` is trusted.
pub(crate) const SECRET_TTL: Duration = Duration::from_secs(30);

/// How long the server's answer to "does it let this user in without a
/// password?" holds. Short on purpose, and re-asked after: a server that
/// starts asking (pg_hba changed, then reloaded) is honoured within it; the
/// other way, clients are asked for a password a little longer than
/// needed. Within it, a burst of logins asks the server once.
pub(crate) const TRUST_TTL: Duration = Duration::from_secs(2);

/// Beyond this many users a table starts over: memory stays bounded
/// whatever clients try.
const MAX_ENTRIES: usize = 100_000;

/// Keyed by (storage, user): a role's credentials are the same in every
/// database of a server.
type UserKey = (String, String);

/// Keyed by (storage, database, user): pg_hba may trust a user in one
/// database and not in another.
type TrustKey = (String, String, String);

#[derive(Default)]
struct Tables {
    logins: HashMap<UserKey, Login>,
    secrets: HashMap<UserKey, (Option<String>, Instant)>,
    /// Whether the server let the user in without a password, and when
    /// that was seen.
    trusts: HashMap<TrustKey, (bool, Instant)>,
}

/// How the pool logs in as a user, and how to check a passthrough client.
struct Login {
    /// Salt and HMAC of a proved passthrough password.
    check: Option<([u8; 16], [u8; 32])>,
    credential: ScramCredential,
}

fn tables() -> MutexGuard<'static, Tables> {
    static TABLES: OnceLock<Mutex<Tables>> = OnceLock::new();
    TABLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn key(storage: &str, user: &str) -> UserKey {
    (storage.to_string(), user.to_string())
}

/// True when `password` is the passthrough password last proved for
/// `user` on `storage`.
pub(crate) fn check(storage: &str, user: &str, password: &str) -> bool {
    let t = tables();
    let Some((salt, mac)) = t.logins.get(&key(storage, user)).and_then(|l| l.check) else {
        return false;
    };
    let got = hmac_sha256(&salt, password.as_bytes());
    got.iter().zip(mac).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The server accepted `password` for `user`.
pub(crate) fn remember_password(storage: &str, user: &str, password: &str) {
    let mut salt = [0u8; 16];
    // Without randomness no check value is kept: every client then goes
    // to the server, which is slower but still right.
    let check = getrandom::getrandom(&mut salt)
        .ok()
        .map(|()| (salt, hmac_sha256(&salt, password.as_bytes())));
    insert(
        storage,
        user,
        Login {
            check,
            credential: ScramCredential::Password(password.to_string()),
        },
    );
}

/// A client proved it knows the server's secret for `user`: `login` is
/// what the pool can log in with (SCRAM keys from its proof, or the md5
/// hash, which md5 logins take in place of the password). It checks no
/// client; a proved passthrough password is kept rather than replaced.
pub(crate) fn remember_login(storage: &str, user: &str, login: ScramCredential) {
    let proved = tables()
        .logins
        .get(&key(storage, user))
        .is_some_and(|l| l.check.is_some());
    if !proved {
        insert(
            storage,
            user,
            Login {
                check: None,
                credential: login,
            },
        );
    }
}

fn insert(storage: &str, user: &str, login: Login) {
    let mut t = tables();
    if t.logins.len() >= MAX_ENTRIES {
        t.logins.clear();
    }
    t.logins.insert(key(storage, user), login);
}

/// The server refused what odissey had for `user`.
pub(crate) fn forget(storage: &str, user: &str) {
    let mut t = tables();
    t.logins.remove(&key(storage, user));
    t.secrets.remove(&key(storage, user));
    t.trusts.retain(|(s, _, u), _| !(s == storage && u == user));
}

/// Whether the server let `user` into `database` without a password
/// within [`TRUST_TTL`]; None when that is not known (any more).
pub(crate) fn server_trusts(storage: &str, database: &str, user: &str) -> Option<bool> {
    let mut t = tables();
    let k = (storage.to_string(), database.to_string(), user.to_string());
    match t.trusts.get(&k) {
        Some((trusted, at)) if at.elapsed() < TRUST_TTL => Some(*trusted),
        Some(_) => {
            t.trusts.remove(&k);
            None
        }
        None => None,
    }
}

/// The server let `user` into `database` without a password (`true`), or
/// asked for one (`false`).
pub(crate) fn remember_trust(storage: &str, database: &str, user: &str, trusted: bool) {
    let mut t = tables();
    if t.trusts.len() >= MAX_ENTRIES {
        t.trusts.clear();
    }
    let k = (storage.to_string(), database.to_string(), user.to_string());
    t.trusts.insert(k, (trusted, Instant::now()));
}

/// What the pool's server connections for `user` log in with.
pub(crate) fn credential(storage: &str, user: &str) -> Option<ScramCredential> {
    tables()
        .logins
        .get(&key(storage, user))
        .map(|l| l.credential.clone())
}

/// A secret `auth_query` fetched for `user` within [`SECRET_TTL`]: `Some(None)`
/// when the server said the user has none (or does not exist).
pub(crate) fn cached_secret(storage: &str, user: &str) -> Option<Option<String>> {
    let mut t = tables();
    let k = key(storage, user);
    match t.secrets.get(&k) {
        Some((s, at)) if at.elapsed() < SECRET_TTL => Some(s.clone()),
        Some(_) => {
            t.secrets.remove(&k);
            None
        }
        None => None,
    }
}

/// Keeps what `auth_query` returned for `user`.
pub(crate) fn remember_secret(storage: &str, user: &str, secret: Option<String>) {
    let mut t = tables();
    if t.secrets.len() >= MAX_ENTRIES {
        t.secrets.clear();
    }
    t.secrets
        .insert(key(storage, user), (secret, Instant::now()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_remembered_checked_and_forgotten() {
        assert!(!check("s-test", "ann", "pw"));
        remember_password("s-test", "ann", "pw");
        assert!(check("s-test", "ann", "pw"));
        assert!(!check("s-test", "ann", "pW"));
        assert!(!check("other", "ann", "pw"));
        assert_eq!(
            credential("s-test", "ann"),
            Some(ScramCredential::Password("pw".into()))
        );
        // Keys don't replace a proved password.
        let keys = ScramCredential::Keys {
            client_key: [1; 32],
            server_key: [2; 32],
        };
        remember_login("s-test", "ann", keys.clone());
        assert!(check("s-test", "ann", "pw"));
        remember_password("s-test", "ann", "new");
        assert!(!check("s-test", "ann", "pw"));
        assert!(check("s-test", "ann", "new"));
        forget("s-test", "ann");
        assert!(!check("s-test", "ann", "new"));
        assert_eq!(credential("s-test", "ann"), None);
        // Keys alone serve the pool, and check no password.
        remember_login("s-test", "bob", keys.clone());
        assert_eq!(credential("s-test", "bob"), Some(keys));
        assert!(!check("s-test", "bob", ""));
    }

    #[test]
    fn the_servers_trust_is_kept_briefly_per_database() {
        assert_eq!(server_trusts("s-test3", "db", "ann"), None);
        remember_trust("s-test3", "db", "ann", true);
        assert_eq!(server_trusts("s-test3", "db", "ann"), Some(true));
        assert_eq!(server_trusts("s-test3", "other", "ann"), None);
        assert_eq!(server_trusts("s-test3", "db", "bob"), None);
        remember_trust("s-test3", "db", "bob", false);
        assert_eq!(server_trusts("s-test3", "db", "bob"), Some(false));
        // Stale: asked again.
        tables()
            .trusts
            .get_mut(&("s-test3".into(), "db".into(), "ann".into()))
            .unwrap()
            .1 -= TRUST_TTL;
        assert_eq!(server_trusts("s-test3", "db", "ann"), None);
        // A refused login forgets it too.
        forget("s-test3", "bob");
        assert_eq!(server_trusts("s-test3", "db", "bob"), None);
    }

    #[test]
    fn fetched_secrets_are_cached() {
        assert_eq!(cached_secret("s-test2", "ann"), None);
        remember_secret("s-test2", "ann", Some("md5abc".into()));
        remember_secret("s-test2", "nobody", None);
        assert_eq!(cached_secret("s-test2", "ann"), Some(Some("md5abc".into())));
        assert_eq!(cached_secret("s-test2", "nobody"), Some(None));
        forget("s-test2", "ann");
        assert_eq!(cached_secret("s-test2", "ann"), None);
    }
}
