//! PostgreSQL's md5 password scheme.
//!
//! The stored secret is `"md5" + hex(md5(password + user))`; on the wire the
//! client answers `"md5" + hex(md5(hex(md5(password + user)) + salt))`.
//! Because the inner hash is all the server keeps, a pooler holding only the
//! stored "md5..." string can still both check clients and log in upstream.

use ::md5::{Digest, Md5};

use crate::util::{ct_eq, hex};

/// Hex md5 of the concatenation of `parts`.
fn md5_hex(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    hex(&h.finalize())
}

/// If `secret` is a stored md5 hash ("md5" + 32 lowercase hex digits, the
/// same test PostgreSQL applies), returns its hex part.
fn stored_hash(secret: &str) -> Option<&str> {
    let hex_part = secret.strip_prefix("md5")?;
    (hex_part.len() == 32
        && hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex_part)
}

/// "md5" + hex(md5(password + user)) as PostgreSQL stores it.
pub fn hash_password(user: &str, password: &str) -> String {
    format!("md5{}", md5_hex(&[password.as_bytes(), user.as_bytes()]))
}

/// The PasswordMessage content a client sends for AuthenticationMD5Password:
/// "md5" + hex(md5(hex(md5(password+user)) + salt)). `secret` may be a plain
/// password or an already-hashed "md5..." string (35 chars, then used as is).
pub fn client_response(user: &str, secret: &str, salt: [u8; 4]) -> String {
    let inner = match stored_hash(secret) {
        Some(h) => h.to_owned(),
        None => md5_hex(&[secret.as_bytes(), user.as_bytes()]),
    };
    format!("md5{}", md5_hex(&[inner.as_bytes(), &salt]))
}

/// Server-side check of a client's md5 response against a plain or
/// md5-hashed secret (constant-time comparison).
pub fn verify(user: &str, secret: &str, salt: [u8; 4], response: &str) -> bool {
    let expected = client_response(user, secret, salt);
    ct_eq(expected.as_bytes(), response.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_stored_hash() {
        assert_eq!(
            hash_password("postgres", "postgres"),
            "md53175bce1d3201d16594cebf9d7eb3f9d"
        );
    }

    /// The salted response, composed by hand from raw md5 calls.
    fn by_hand(user: &str, password: &str, salt: [u8; 4]) -> String {
        let inner = Md5::digest(format!("{password}{user}").as_bytes());
        let inner_hex: String = inner.iter().map(|b| format!("{b:02x}")).collect();
        let mut outer_input = inner_hex.into_bytes();
        outer_input.extend_from_slice(&salt);
        let outer = Md5::digest(&outer_input);
        let outer_hex: String = outer.iter().map(|b| format!("{b:02x}")).collect();
        format!("md5{outer_hex}")
    }

    #[test]
    fn salted_response_matches_independent_computation() {
        let salt = [0x01, 0x9a, 0xff, 0x00];
        let expected = by_hand("postgres", "postgres", salt);
        assert_eq!(expected.len(), 35);
        assert_eq!(client_response("postgres", "postgres", salt), expected);
        // The stored hash works in place of the password.
        let stored = hash_password("postgres", "postgres");
        assert_eq!(client_response("postgres", &stored, salt), expected);
        assert!(verify("postgres", "postgres", salt, &expected));
        assert!(verify("postgres", &stored, salt, &expected));
        assert!(!verify("postgres", "wrong", salt, &expected));
        assert!(!verify("postgres", "postgres", [0, 0, 0, 0], &expected));
        assert!(!verify("other", "postgres", salt, &expected));
        assert!(!verify("postgres", "postgres", salt, ""));
        assert!(!verify("postgres", "postgres", salt, &expected[..34]));
    }

    #[test]
    fn md5_lookalike_password_is_a_password() {
        // Not 32 hex digits after "md5": treated as a plain password.
        let salt = [1, 2, 3, 4];
        assert_eq!(
            client_response("u", "md5short", salt),
            by_hand("u", "md5short", salt)
        );
        let upper = format!("md5{}", "A".repeat(32));
        assert_eq!(
            client_response("u", &upper, salt),
            by_hand("u", &upper, salt)
        );
    }
}
