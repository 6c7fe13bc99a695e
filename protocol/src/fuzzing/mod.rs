//! Bodies of the cargo-fuzz targets in `protocol/fuzz`.
//!
//! They live here, not in the fuzz crate, so the fuzzers (nightly, libFuzzer)
//! and the corpus replay in `tests/fuzz_corpus.rs` (stable, part of `cargo
//! test`) run the very same checks. Each function takes arbitrary bytes,
//! must not panic on any of them, and asserts what must hold of what the
//! parsers accept: a frame re-encodes to the bytes it was cut from, the
//! result does not depend on how the bytes were split on their way in, a
//! typed message re-encodes to its body, and a SCRAM exchange succeeds
//! exactly when the proof (or server signature) is the right one. A failed
//! assertion is a bug in this crate, found by the fuzzer.
//!
//! Not an API: hidden from the docs, and it changes with the fuzzers.

mod messages;
mod scram;
mod startup;

use bytes::BytesMut;

use crate::backend;
use crate::codec::{peek_header, read_frame, Frame, DEFAULT_MAX_MESSAGE_LEN};
use crate::error::Error;
use crate::frontend;

pub use messages::{backend_message, frontend_message};
pub use scram::{
    scram_client, scram_server, SCRAM_CLIENT_NONCE, SCRAM_PASSWORD, SCRAM_SERVER_NONCE,
};
pub use startup::startup_packet;

use messages::{backend_seeds, frontend_seeds};
use scram::{scram_client_seeds, scram_server_seeds};
use startup::startup_seeds;

/// One fuzz target: the cargo-fuzz binary and corpus directory of that
/// name run `run`; `seeds` are valid inputs to start a corpus from.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Name of the fuzz target and of its corpus directory.
    pub name: &'static str,
    /// The checks, on one input.
    pub run: fn(&[u8]),
    /// A handful of well-formed inputs.
    pub seeds: fn() -> Vec<Vec<u8>>,
}

/// Every target, in the order the README lists them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "framing",
        run: framing,
        seeds: framing_seeds,
    },
    Target {
        name: "frontend_message",
        run: frontend_message,
        seeds: frontend_seeds,
    },
    Target {
        name: "backend_message",
        run: backend_message,
        seeds: backend_seeds,
    },
    Target {
        name: "startup_packet",
        run: startup_packet,
        seeds: startup_seeds,
    },
    Target {
        name: "scram_server",
        run: scram_server,
        seeds: scram_server_seeds,
    },
    Target {
        name: "scram_client",
        run: scram_client,
        seeds: scram_client_seeds,
    },
];

// ---------------------------------------------------------------------------
// Framing

/// What reading tagged frames off a byte stream gives: the frames, then
/// either how many bytes were left waiting for more or the error that ended
/// the stream.
#[derive(Debug, PartialEq, Eq)]
struct Framed {
    frames: Vec<Frame>,
    end: Result<usize, Error>,
}

/// Feeds `data` in pieces cut at `cuts` (ascending offsets), reading every
/// complete frame after each piece, as a connection's read loop does.
fn read_frames(data: &[u8], cuts: impl IntoIterator<Item = usize>, max_len: usize) -> Framed {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    for cut in cuts.into_iter().chain([data.len()]) {
        let cut = cut.clamp(at, data.len());
        buf.extend_from_slice(&data[at..cut]);
        at = cut;
        loop {
            let before = buf.len();
            match read_frame(&mut buf, max_len) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => {
                    assert_eq!(buf.len(), before, "an incomplete frame consumed bytes");
                    break;
                }
                Err(e) => {
                    assert_eq!(buf.len(), before, "a refused header consumed bytes");
                    return Framed {
                        frames,
                        end: Err(e),
                    };
                }
            }
        }
    }
    Framed {
        frames,
        end: Ok(buf.len()),
    }
}

/// A frame as it is on the wire.
fn wire(frame: &Frame) -> Vec<u8> {
    let mut b = Vec::with_capacity(frame.wire_len());
    b.push(frame.tag);
    let len = u32::try_from(frame.body.len() + 4).expect("frame bodies fit the length word");
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(&frame.body);
    b
}

/// Reads `data` whole and checks the frames against the bytes: each
/// re-encodes to what it was cut from, `peek_header` agrees, what is left
/// is an incomplete frame, and an error is the header's fault. Then reads
/// it again cut at `cuts` (one cut per read) and expects the same outcome.
/// Returns the frames.
fn check_stream(data: &[u8], max_len: usize, cuts: &[usize]) -> Vec<Frame> {
    let whole = read_frames(data, [], max_len);
    let mut at = 0;
    for frame in &whole.frames {
        let bytes = wire(frame);
        assert!(bytes.len() - 1 <= max_len, "frame longer than the limit");
        assert_eq!(&data[at..at + bytes.len()], &bytes[..], "frame at {at}");
        assert_eq!(
            peek_header(&data[at..], max_len),
            Ok(Some((frame.tag, bytes.len()))),
            "peek_header at {at}"
        );
        at += bytes.len();
    }
    let rest = &data[at..];
    match &whole.end {
        Ok(left) => {
            assert_eq!(*left, rest.len(), "bytes lost between frames");
            match peek_header(rest, max_len) {
                Ok(None) => assert!(rest.len() < 5),
                Ok(Some((_, total))) => assert!(total > rest.len(), "a complete frame was left"),
                Err(e) => panic!("read_frame waited on a header peek_header refuses: {e}"),
            }
        }
        Err(e) => {
            assert_eq!(peek_header(rest, max_len).as_ref(), Err(e));
            match *e {
                Error::BadLength { tag, len } => assert!(tag == rest[0] && len < 4),
                Error::TooLarge { tag, len, max } => {
                    assert!(tag == rest[0] && len as usize > max_len && max == max_len);
                }
                _ => panic!("read_frame failed with {e:?}"),
            }
        }
    }
    for &cut in cuts {
        assert_eq!(
            read_frames(data, [cut], max_len),
            whole,
            "split at {cut} of {}",
            data.len()
        );
    }
    whole.frames
}

/// A few cut points worth trying: inside and at the end of the first
/// header, the middle, one byte short of the end.
fn some_cuts(len: usize) -> [usize; 4] {
    [1, 5, len / 2, len.saturating_sub(1)]
}

/// Framing alone: byte 0 picks the length limit and a chunk size, the rest
/// is a stream of frames, read whole, in chunks of that size, and at a few
/// single cuts; all must give the same frames and the same end.
pub fn framing(data: &[u8]) {
    let Some((&ctrl, stream)) = data.split_first() else {
        return;
    };
    const LIMITS: [usize; 5] = [4, 5, 64, 1024, DEFAULT_MAX_MESSAGE_LEN];
    let max_len = LIMITS[usize::from(ctrl) % LIMITS.len()];
    let chunk = usize::from(ctrl) / LIMITS.len() + 1;
    let frames = check_stream(stream, max_len, &some_cuts(stream.len()));
    let chunked = read_frames(stream, (chunk..stream.len()).step_by(chunk), max_len);
    assert_eq!(chunked.frames, frames, "read in chunks of {chunk}");
}

fn framing_seeds() -> Vec<Vec<u8>> {
    let mut stream = BytesMut::new();
    frontend::query(&mut stream, "select 1");
    frontend::sync(&mut stream);
    backend::data_row(&mut stream, &[Some("1"), None]);
    frontend::copy_data(&mut stream, &[0; 70]);
    let mut seeds = Vec::new();
    for ctrl in [0u8, 2, 3, 9, 14, 255] {
        let mut s = vec![ctrl];
        s.extend_from_slice(&stream);
        seeds.push(s);
    }
    // A header alone, a length of zero, a huge length.
    seeds.push(b"\x04Q\0\0\0\x10sel".to_vec());
    seeds.push(b"\x04Q\0\0\0\0".to_vec());
    seeds.push(b"\x04d\x7f\xff\xff\xff".to_vec());
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::backend::BackendMessage;
    use crate::frontend::FrontendMessage;
    use crate::scram::{ScramClient, ScramServer};

    use super::scram::{server_secret, two_messages};

    #[test]
    fn seeds_pass_their_targets() {
        for t in TARGETS {
            let seeds = (t.seeds)();
            assert!(!seeds.is_empty(), "{}", t.name);
            for s in seeds {
                (t.run)(&s);
            }
        }
    }

    #[test]
    fn message_seeds_are_whole_valid_messages() {
        for s in frontend_seeds() {
            let framed = read_frames(&s, [], DEFAULT_MAX_MESSAGE_LEN);
            assert_eq!(framed.end, Ok(0), "{s:?}");
            for f in framed.frames {
                FrontendMessage::parse(&f).unwrap();
            }
        }
        for s in backend_seeds() {
            let framed = read_frames(&s, [], DEFAULT_MAX_MESSAGE_LEN);
            assert_eq!(framed.end, Ok(0), "{s:?}");
            for f in framed.frames {
                BackendMessage::parse(&f).unwrap();
            }
        }
    }

    #[test]
    fn seeds_reach_success_paths() {
        // The SCRAM seeds must include a full, successful exchange, or the
        // fuzzer starts far from the interesting checks.
        let seeds = scram_server_seeds();
        let (first, last) = two_messages(&seeds[0]);
        let mut s = ScramServer::with_nonce(server_secret().0.clone(), SCRAM_SERVER_NONCE);
        s.handle_client_first(first).unwrap();
        assert!(s.handle_client_final(last).is_ok());
        let seeds = scram_client_seeds();
        let (first, last) = two_messages(&seeds[0]);
        let mut c = ScramClient::with_nonce(SCRAM_PASSWORD, SCRAM_CLIENT_NONCE);
        c.handle_server_first(first).unwrap();
        assert_eq!(c.handle_server_final(last), Ok(()));
    }
}
