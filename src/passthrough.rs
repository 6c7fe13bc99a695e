//! Passwords that `passthrough` clients proved by logging in to the server
//! with them. Each is kept with a salted check value, so that later clients
//! are checked without a server round trip, and in plain text for one
//! reason: the pool's own server logins for that user need it. A password
//! that fails the check is tried on the server again (it may have changed
//! there), and forgotten when the server refuses it. Passwords never go to a
//! log line.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use odissey_protocol::scram::hmac_sha256;

/// Passwords for (storage, user): a role's password is the same in every
/// database of a server.
#[derive(Default)]
struct Cache {
    entries: HashMap<(String, String), Entry>,
}

struct Entry {
    salt: [u8; 16],
    check: [u8; 32],
    password: String,
}

/// Beyond this many users the cache starts over (a client can only add an
/// entry by knowing a real password, but memory stays bounded regardless).
const MAX_ENTRIES: usize = 100_000;

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn keyed(salt: &[u8; 16], password: &str) -> [u8; 32] {
    hmac_sha256(salt, password.as_bytes())
}

/// True when `password` is the one last proved for `user` on `storage`.
pub(crate) fn check(storage: &str, user: &str, password: &str) -> bool {
    let c = cache();
    let Some(e) = c.entries.get(&(storage.to_string(), user.to_string())) else {
        return false;
    };
    let got = keyed(&e.salt, password);
    got.iter()
        .zip(e.check)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// The server accepted `password` for `user`.
pub(crate) fn remember(storage: &str, user: &str, password: &str) {
    let mut salt = [0u8; 16];
    if getrandom::getrandom(&mut salt).is_err() {
        // Without randomness nothing is cached: every client goes to the
        // server, which is slower but still right.
        return;
    }
    let mut c = cache();
    if c.entries.len() >= MAX_ENTRIES {
        c.entries.clear();
    }
    c.entries.insert(
        (storage.to_string(), user.to_string()),
        Entry {
            salt,
            check: keyed(&salt, password),
            password: password.to_string(),
        },
    );
}

/// The server refused the password it had for `user`.
pub(crate) fn forget(storage: &str, user: &str) {
    cache()
        .entries
        .remove(&(storage.to_string(), user.to_string()));
}

/// The password to open `user`'s pooled server connections with.
pub(crate) fn password(storage: &str, user: &str) -> Option<String> {
    cache()
        .entries
        .get(&(storage.to_string(), user.to_string()))
        .map(|e| e.password.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_checks_and_forgets() {
        assert!(!check("s-test", "ann", "pw"));
        remember("s-test", "ann", "pw");
        assert!(check("s-test", "ann", "pw"));
        assert!(!check("s-test", "ann", "pW"));
        assert!(!check("other", "ann", "pw"));
        assert_eq!(password("s-test", "ann").as_deref(), Some("pw"));
        remember("s-test", "ann", "new");
        assert!(!check("s-test", "ann", "pw"));
        assert!(check("s-test", "ann", "new"));
        forget("s-test", "ann");
        assert!(!check("s-test", "ann", "new"));
        assert_eq!(password("s-test", "ann"), None);
    }
}
