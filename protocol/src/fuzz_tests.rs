//! Fuzz-ish robustness test: many pseudo-random inputs into every parser,
//! asserting only that nothing panics. Deterministic, so failures replay.

use bytes::{BufMut, Bytes, BytesMut};

use crate::backend::{self, BackendMessage};
use crate::codec::{read_frame, read_startup, Frame};
use crate::frontend::{self, FrontendMessage};
use crate::scram::{ScramClient, ScramSecret, ScramServer};

/// xorshift64*: tiny, deterministic, good enough to spray bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Random bytes, biased towards protocol-looking content (NULs, small
    /// lengths, tags, SCRAM punctuation) so parsers get past their first check.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        const INTERESTING: &[u8] = b"\0\0\0\x04\x08\xffQPBDESRKZENv,=rsivecnp";
        let len = self.below(max + 1);
        (0..len)
            .map(|_| {
                if self.below(3) == 0 {
                    INTERESTING[self.below(INTERESTING.len())]
                } else {
                    self.next() as u8
                }
            })
            .collect()
    }
}

const TAGS: &[u8] = b"QPBDESHXcCdfpFRKZNvTI1230";

#[test]
fn random_inputs_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let secret = ScramSecret::from_password("pw", b"salt", 1);
    for _ in 0..20_000 {
        let data = rng.bytes(64);

        // Framing: raw bytes and a valid header followed by random bodies.
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = read_frame(&mut buf, 1 << 12) {}
        let mut buf = BytesMut::from(&data[..]);
        let _ = read_startup(&mut buf);
        let mut buf = BytesMut::new();
        buf.put_u32(data.len() as u32 + 4);
        buf.put_slice(&data);
        let _ = read_startup(&mut buf);

        // Message parsers with every tag of interest.
        let tag = TAGS[rng.below(TAGS.len())];
        let frame = Frame {
            tag,
            body: Bytes::from(data.clone()),
        };
        let _ = BackendMessage::parse(&frame);
        let _ = FrontendMessage::parse(&frame);
        let _ = frontend::parse_password(&data);
        let _ = frontend::parse_sasl_initial_response(&data);
        let _ = frontend::parse_bind_details(&frame.body);
        let _ = backend::parse_error_fields(&data);
        let _ = backend::parse_data_row(&data);
        let _ = backend::parse_row_description(&data);

        // SCRAM, raw and with a plausible prefix so deeper checks run.
        let mut client = ScramClient::with_nonce("pw", "abc");
        let _ = client.handle_server_first(&data);
        let mut prefixed = b"r=abc".to_vec();
        prefixed.extend_from_slice(&data);
        let mut client = ScramClient::with_nonce("pw", "abc");
        if client.handle_server_first(&prefixed).is_ok() {
            let _ = client.handle_server_final(&data);
        }
        let mut server = ScramServer::with_nonce(secret.clone(), "srv");
        let _ = server.handle_client_first(&data);
        let mut server = ScramServer::with_nonce(secret.clone(), "srv");
        if server.handle_client_first(b"n,,n=,r=abc").is_ok() {
            let mut fin = b"c=biws,r=abcsrv,p=".to_vec();
            fin.extend_from_slice(&data);
            let _ = server.handle_client_final(&fin);
            let _ = server.handle_client_final(&data);
        }
        if let Ok(s) = std::str::from_utf8(&data) {
            let _ = ScramSecret::parse(s);
            let _ = ScramSecret::parse(&format!("SCRAM-SHA-256${s}"));
        }
    }
}

#[test]
fn mutated_valid_messages_never_panic() {
    // Flip bytes in real messages: catches length/count handling that purely
    // random input rarely reaches.
    let mut valid = BytesMut::new();
    frontend::parse(&mut valid, "s", "select $1", &[23, 25]);
    frontend::bind(&mut valid, "", "s", &[Some(b"1"), None]);
    frontend::sasl_initial_response(&mut valid, "SCRAM-SHA-256", b"n,,n=,r=abc");
    backend::authentication_sasl(&mut valid, &["SCRAM-SHA-256"]);
    backend::error_response(&mut valid, "ERROR", "42000", "m", Some("d"));
    backend::row_description(&mut valid, &["a", "b"]);
    backend::data_row(&mut valid, &[Some("x"), None]);
    let valid = valid.freeze();
    let mut rng = Rng(42);
    for _ in 0..20_000 {
        let mut m = valid.to_vec();
        for _ in 0..=rng.below(4) {
            let i = rng.below(m.len());
            m[i] = rng.next() as u8;
        }
        let mut buf = BytesMut::from(&m[..]);
        while let Ok(Some(frame)) = read_frame(&mut buf, 1 << 12) {
            let _ = BackendMessage::parse(&frame);
            if let Ok(FrontendMessage::Bind { body, .. }) = FrontendMessage::parse(&frame) {
                let _ = frontend::parse_bind_details(&body);
            }
            let _ = frontend::parse_sasl_initial_response(&frame.body);
            let _ = backend::parse_row_description(&frame.body);
            let _ = backend::parse_data_row(&frame.body);
        }
    }
}
