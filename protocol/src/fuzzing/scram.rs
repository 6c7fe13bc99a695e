//! The SCRAM targets: a server and a client fed arbitrary messages, checked
//! against keys derived here independently.

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::error::Error;
use crate::scram::{
    hmac_sha256, ScramClient, ScramCredential, ScramSecret, ScramServer, MAX_ITERATIONS,
};

// ---------------------------------------------------------------------------
// SCRAM

/// The password both SCRAM targets use.
pub const SCRAM_PASSWORD: &str = "pencil";
/// The client nonce of [`scram_client`]'s client.
pub const SCRAM_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
/// The server nonce part of [`scram_server`]'s server.
pub const SCRAM_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
/// Salt and iteration count of [`scram_server`]'s stored secret.
const SCRAM_SALT: &[u8] = b"odissey fuzzing";
const SCRAM_ITERATIONS: u32 = 4096;
/// [`scram_client`] skips server-first messages asking for more iterations
/// than this (but not more than the client accepts), so one input costs
/// microseconds, not seconds; the parsing is the same either way.
const FUZZ_MAX_ITERATIONS: u32 = 64;

/// The keys RFC 5802 derives from a password, computed here independently
/// of the code under test.
pub(super) struct Keys {
    client_key: [u8; 32],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl Keys {
    fn derive(password: &str, salt: &[u8], iterations: u32) -> Self {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted);
        let client_key = hmac_sha256(&salted, b"Client Key");
        Self {
            client_key,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted, b"Server Key"),
        }
    }

    /// ClientProof for an AuthMessage.
    fn proof(&self, auth_message: &str) -> [u8; 32] {
        let mut proof = self.client_key;
        let signature = hmac_sha256(&self.stored_key, auth_message.as_bytes());
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        proof
    }

    /// ServerSignature for an AuthMessage.
    fn server_signature(&self, auth_message: &str) -> [u8; 32] {
        hmac_sha256(&self.server_key, auth_message.as_bytes())
    }
}

/// Cuts an input into two SCRAM messages at its first 0xff byte (a byte
/// no SCRAM message can hold: they are UTF-8).
pub(super) fn two_messages(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// `data` with one bit flipped, chosen by `seed`.
fn flip(mut data: [u8; 32], seed: usize) -> [u8; 32] {
    data[seed % 32] ^= 1 << (seed % 8);
    data
}

pub(super) fn server_secret() -> &'static (ScramSecret, Keys) {
    static SECRET: OnceLock<(ScramSecret, Keys)> = OnceLock::new();
    SECRET.get_or_init(|| {
        (
            ScramSecret::from_password(SCRAM_PASSWORD, SCRAM_SALT, SCRAM_ITERATIONS),
            Keys::derive(SCRAM_PASSWORD, SCRAM_SALT, SCRAM_ITERATIONS),
        )
    })
}

/// A server holding the secret of [`SCRAM_PASSWORD`] fed a client-first,
/// then a client-final (the input cut at its first 0xff). It must never
/// panic; it must accept a client-final only if its proof is the one the
/// password gives; and the same client-final with that right proof put in
/// must be accepted exactly when its channel binding and nonce are right,
/// with a wrong proof never. The first part is also parsed as a stored
/// secret, which must survive a format/parse cycle.
pub fn scram_server(data: &[u8]) {
    let (first, last) = two_messages(data);
    let (secret, keys) = server_secret();
    if let Ok(Ok(parsed)) = std::str::from_utf8(first).map(ScramSecret::parse) {
        assert_eq!(ScramSecret::parse(&parsed.to_string_pg()), Ok(parsed));
    }

    let mut server = ScramServer::with_nonce(secret.clone(), SCRAM_SERVER_NONCE);
    let server_first = match server.handle_client_first(first) {
        Ok(m) => m,
        Err(e) => {
            assert!(matches!(e, Error::Auth { .. }), "{e:?}");
            assert!(
                server.handle_client_final(last).is_err(),
                "final after a refused first"
            );
            assert!(server.client_keys().is_none());
            return;
        }
    };
    assert!(
        server.handle_client_first(first).is_err(),
        "second client-first accepted"
    );
    // What was accepted is well-formed, and server-first answers it.
    let first = std::str::from_utf8(first).expect("accepted client-first is UTF-8");
    let mut gs2 = first.splitn(3, ',');
    let (cbind, authzid, bare) = match (gs2.next(), gs2.next(), gs2.next()) {
        (Some(c), Some(a), Some(b)) => (c, a, b),
        _ => panic!("accepted client-first without a GS2 header: {first:?}"),
    };
    assert!(
        matches!(cbind, "n" | "y") && authzid.is_empty(),
        "{first:?}"
    );
    let client_nonce = bare
        .split(',')
        .nth(1)
        .and_then(|a| a.strip_prefix("r="))
        .expect("accepted client-first has a nonce");
    let nonce = format!("{client_nonce}{SCRAM_SERVER_NONCE}");
    let server_first = String::from_utf8(server_first).expect("server-first is UTF-8");
    assert_eq!(
        server_first,
        format!(
            "r={nonce},s={},i={SCRAM_ITERATIONS}",
            BASE64.encode(SCRAM_SALT)
        )
    );
    let auth_message = |without_proof: &str| format!("{bare},{server_first},{without_proof}");

    // The client-final as it came: accepted only with the right proof.
    match server.handle_client_final(last) {
        Ok(server_final) => {
            let last = std::str::from_utf8(last).expect("accepted client-final is UTF-8");
            let (without_proof, proof) = last.rsplit_once(",p=").expect("accepted without a proof");
            let am = auth_message(without_proof);
            assert_eq!(
                BASE64.decode(proof).ok().as_deref(),
                Some(&keys.proof(&am)[..]),
                "accepted a wrong proof"
            );
            check_server_success(&server, &server_final, keys, &am);
        }
        Err(e) => {
            assert!(matches!(e, Error::Auth { .. }), "{e:?}");
            assert!(server.client_keys().is_none(), "keys after a refused proof");
        }
    }

    // The same attributes with the right proof, then with a wrong one.
    let Ok(last) = std::str::from_utf8(last) else {
        return;
    };
    let without_proof = last.rsplit_once(",p=").map_or(last, |(w, _)| w);
    let am = auth_message(without_proof);
    let mut attrs = without_proof.split(',');
    let cbind_attr = format!("c={}", BASE64.encode(format!("{cbind},,")));
    let well_formed =
        attrs.next() == Some(cbind_attr.as_str()) && attrs.next() == Some(&format!("r={nonce}"));
    let right = keys.proof(&am);
    for (proof, expect_ok) in [(right, well_formed), (flip(right, data.len()), false)] {
        let mut server = ScramServer::with_nonce(secret.clone(), SCRAM_SERVER_NONCE);
        server
            .handle_client_first(first.as_bytes())
            .expect("accepted before");
        let msg = format!("{without_proof},p={}", BASE64.encode(proof));
        match server.handle_client_final(msg.as_bytes()) {
            Ok(server_final) => {
                assert!(expect_ok, "accepted {msg:?}");
                check_server_success(&server, &server_final, keys, &am);
            }
            Err(e) => {
                assert!(!expect_ok, "refused {msg:?}: {e}");
                assert!(server.client_keys().is_none(), "keys after a refused proof");
            }
        }
    }
}

/// After a server accepted a proof: server-final proves the server knows
/// the secret, and the keys it learned are the password's.
fn check_server_success(server: &ScramServer, server_final: &[u8], keys: &Keys, am: &str) {
    let expected = format!("v={}", BASE64.encode(keys.server_signature(am)));
    assert_eq!(server_final, expected.as_bytes());
    assert_eq!(
        server.client_keys(),
        Some(ScramCredential::Keys {
            client_key: keys.client_key,
            server_key: keys.server_key,
        })
    );
}

/// Whether a server-first asks for an iteration count the client accepts
/// but that would make one input slow (see [`FUZZ_MAX_ITERATIONS`]).
fn costly(server_first: &[u8]) -> bool {
    std::str::from_utf8(server_first)
        .ok()
        .and_then(|m| m.split(',').nth(2))
        .and_then(|a| a.strip_prefix("i="))
        .and_then(|i| i.parse::<u32>().ok())
        .is_some_and(|i| (FUZZ_MAX_ITERATIONS + 1..=MAX_ITERATIONS).contains(&i))
}

/// A client with [`SCRAM_PASSWORD`] and [`SCRAM_CLIENT_NONCE`] fed a
/// server-first, then a server-final (the input cut at its first 0xff). It
/// must never panic; a server-first it accepts must be well-formed and its
/// client-final must carry the proof the password gives; it must accept a
/// server-final only with the right server signature, always accept the
/// right one and refuse a wrong one.
pub fn scram_client(data: &[u8]) {
    let (first, last) = two_messages(data);
    if costly(first) {
        return;
    }
    let mut client = ScramClient::with_nonce(SCRAM_PASSWORD, SCRAM_CLIENT_NONCE);
    let client_final = match client.handle_server_first(first) {
        Ok(m) => m,
        Err(e) => {
            assert!(matches!(e, Error::Auth { .. }), "{e:?}");
            assert!(
                client.handle_server_final(last).is_err(),
                "final after a refused first"
            );
            return;
        }
    };
    assert!(
        client.handle_server_first(first).is_err(),
        "second server-first accepted"
    );
    let server_first = std::str::from_utf8(first).expect("accepted server-first is UTF-8");
    let mut attrs = server_first.split(',');
    let mut attr = |name: &str| {
        attrs
            .next()
            .and_then(|a| a.strip_prefix(name))
            .unwrap_or_else(|| panic!("accepted server-first without {name}: {server_first:?}"))
    };
    let nonce = attr("r=");
    let salt = BASE64.decode(attr("s=")).expect("accepted salt is base64");
    let iterations: u32 = attr("i=").parse().expect("accepted iteration count");
    assert!(nonce.len() > SCRAM_CLIENT_NONCE.len() && nonce.starts_with(SCRAM_CLIENT_NONCE));
    assert!(nonce
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b','));
    assert!(!salt.is_empty() && (1..=MAX_ITERATIONS).contains(&iterations));

    let keys = Keys::derive(SCRAM_PASSWORD, &salt, iterations);
    let without_proof = format!("c=biws,r={nonce}");
    let am = format!("n=,r={SCRAM_CLIENT_NONCE},{server_first},{without_proof}");
    let expected = format!("{without_proof},p={}", BASE64.encode(keys.proof(&am)));
    assert_eq!(
        String::from_utf8(client_final).as_deref(),
        Ok(&expected[..])
    );

    let signature = keys.server_signature(&am);
    if client.handle_server_final(last).is_ok() {
        let last = std::str::from_utf8(last).expect("accepted server-final is UTF-8");
        let v = last.split(',').next().and_then(|a| a.strip_prefix("v="));
        let v = v.expect("accepted server-final without v=");
        assert_eq!(
            BASE64.decode(v).ok().as_deref(),
            Some(&signature[..]),
            "accepted a wrong server signature"
        );
    }
    let right = format!("v={}", BASE64.encode(signature));
    let wrong = format!("v={}", BASE64.encode(flip(signature, data.len())));
    assert_eq!(client.handle_server_final(right.as_bytes()), Ok(()));
    assert!(client.handle_server_final(wrong.as_bytes()).is_err());
    assert!(client.handle_server_final(b"e=invalid-proof").is_err());
}

/// Joins two SCRAM messages the way the SCRAM targets cut them.
fn join(first: &[u8], last: &[u8]) -> Vec<u8> {
    let mut v = first.to_vec();
    v.push(0xff);
    v.extend_from_slice(last);
    v
}

pub(super) fn scram_server_seeds() -> Vec<Vec<u8>> {
    let (secret, _) = server_secret();
    let mut seeds = Vec::new();
    for (password, user, cbind) in [
        (SCRAM_PASSWORD, "", "n"),
        ("wrong", "", "n"),
        (SCRAM_PASSWORD, "alice", "y"),
    ] {
        let mut client = ScramClient::with_nonce_and_user(password, SCRAM_CLIENT_NONCE, user);
        let mut first = client.client_first();
        first[0] = cbind.as_bytes()[0];
        let mut server = ScramServer::with_nonce(secret.clone(), SCRAM_SERVER_NONCE);
        let server_first = server
            .handle_client_first(&first)
            .expect("seed client-first");
        let last = client
            .handle_server_first(&server_first)
            .expect("seed server-first");
        seeds.push(join(&first, &last));
    }
    seeds.push(b"p=tls-server-end-point,,n=,r=abc".to_vec());
    seeds.push(secret.to_string_pg().into_bytes());
    seeds
}

pub(super) fn scram_client_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (password, iterations) in [(SCRAM_PASSWORD, 1), ("other", FUZZ_MAX_ITERATIONS)] {
        let secret = ScramSecret::from_password(password, b"salt", iterations);
        let mut client = ScramClient::with_nonce(SCRAM_PASSWORD, SCRAM_CLIENT_NONCE);
        let mut server = ScramServer::with_nonce(secret, SCRAM_SERVER_NONCE);
        let first = server
            .handle_client_first(&client.client_first())
            .expect("seed client-first");
        let last = client
            .handle_server_first(&first)
            .expect("seed server-first");
        let fin = server.handle_client_final(&last).unwrap_or_default();
        seeds.push(join(&first, &fin));
    }
    let first = format!("r={SCRAM_CLIENT_NONCE}xyz,s=c2FsdA==,i=2,ext=1");
    seeds.push(join(first.as_bytes(), b"e=invalid-proof"));
    seeds.push(format!("r={SCRAM_CLIENT_NONCE}xyz,s=c2FsdA==,i=10000001").into_bytes());
    seeds
}
