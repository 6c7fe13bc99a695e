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

use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use crate::backend::{self, Authentication, BackendMessage, ErrorFields, TransactionStatus};
use crate::codec::{
    self, peek_header, read_frame, read_startup, Frame, Startup, DEFAULT_MAX_MESSAGE_LEN,
    MAX_STARTUP_LEN,
};
use crate::error::Error;
use crate::frontend::{self, FrontendMessage};
use crate::scram::{
    hmac_sha256, ScramClient, ScramCredential, ScramSecret, ScramServer, MAX_ITERATIONS,
};

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

// ---------------------------------------------------------------------------
// Frontend messages

/// A byte stream from a client, after startup: framing as in [`framing`],
/// then every frame through [`FrontendMessage::parse`]. What parses must
/// re-encode to the frame's body, through the crate's builders where the
/// fields are text; Bind and password-type bodies are decoded further and
/// re-encoded too.
pub fn frontend_message(data: &[u8]) {
    for frame in check_stream(data, DEFAULT_MAX_MESSAGE_LEN, &some_cuts(data.len())) {
        check_frontend_frame(&frame);
    }
}

/// Tag and body of a typed frontend message, encoded by hand.
fn encode_frontend(msg: &FrontendMessage) -> (u8, BytesMut) {
    let mut b = BytesMut::new();
    let cstr = |b: &mut BytesMut, s: &[u8]| {
        b.put_slice(s);
        b.put_u8(0);
    };
    let tag = match msg {
        FrontendMessage::Query { sql } => {
            cstr(&mut b, sql);
            b'Q'
        }
        FrontendMessage::Parse {
            name,
            sql,
            param_types,
        } => {
            cstr(&mut b, name);
            cstr(&mut b, sql);
            b.put_u16(u16::try_from(param_types.len()).expect("at most u16::MAX types"));
            for &t in param_types {
                b.put_u32(t);
            }
            b'P'
        }
        FrontendMessage::Bind { body, .. } => {
            b.put_slice(body);
            b'B'
        }
        FrontendMessage::Describe { kind, name } | FrontendMessage::Close { kind, name } => {
            b.put_u8(*kind);
            cstr(&mut b, name);
            if matches!(msg, FrontendMessage::Describe { .. }) {
                b'D'
            } else {
                b'C'
            }
        }
        FrontendMessage::Execute { portal, max_rows } => {
            cstr(&mut b, portal);
            b.put_u32(*max_rows);
            b'E'
        }
        FrontendMessage::Sync => b'S',
        FrontendMessage::Flush => b'H',
        FrontendMessage::Terminate => b'X',
        FrontendMessage::CopyDone => b'c',
        FrontendMessage::CopyData { data } => {
            b.put_slice(data);
            b'd'
        }
        FrontendMessage::CopyFail { message } => {
            cstr(&mut b, message);
            b'f'
        }
        FrontendMessage::Password { body } => {
            b.put_slice(body);
            b'p'
        }
        FrontendMessage::FunctionCall { body } => {
            b.put_slice(body);
            b'F'
        }
    };
    (tag, b)
}

/// The same message through the crate's builders, where it has one and the
/// fields are text (the builders take `&str`).
fn build_frontend(msg: &FrontendMessage) -> Option<BytesMut> {
    fn text(b: &Bytes) -> Option<&str> {
        std::str::from_utf8(b).ok()
    }
    let mut b = BytesMut::new();
    match msg {
        FrontendMessage::Query { sql } => frontend::query(&mut b, text(sql)?),
        FrontendMessage::Parse {
            name,
            sql,
            param_types,
        } => frontend::parse(&mut b, text(name)?, text(sql)?, param_types),
        FrontendMessage::Bind {
            portal,
            statement,
            body,
        } => {
            let details = frontend::parse_bind_details(body).ok()?;
            if !details.param_formats.is_empty() || !details.result_formats.is_empty() {
                return None;
            }
            let params: Vec<Option<&[u8]>> = details.params.iter().map(|p| p.as_deref()).collect();
            frontend::bind(&mut b, text(portal)?, text(statement)?, &params);
        }
        FrontendMessage::Describe { kind, name } => frontend::describe(&mut b, *kind, text(name)?),
        FrontendMessage::Close { kind, name } => frontend::close(&mut b, *kind, text(name)?),
        FrontendMessage::Execute { portal, max_rows } => {
            frontend::execute(&mut b, text(portal)?, *max_rows);
        }
        FrontendMessage::Sync => frontend::sync(&mut b),
        FrontendMessage::Flush => frontend::flush(&mut b),
        FrontendMessage::Terminate => frontend::terminate(&mut b),
        FrontendMessage::CopyDone => frontend::copy_done(&mut b),
        FrontendMessage::CopyData { data } => frontend::copy_data(&mut b, data),
        FrontendMessage::CopyFail { message } => frontend::copy_fail(&mut b, text(message)?),
        FrontendMessage::Password { body } => frontend::sasl_response(&mut b, body),
        FrontendMessage::FunctionCall { .. } => return None,
    }
    Some(b)
}

fn check_frontend_frame(frame: &Frame) {
    let Ok(msg) = FrontendMessage::parse(frame) else {
        return;
    };
    let (tag, body) = encode_frontend(&msg);
    assert_eq!((tag, &body[..]), (frame.tag, &frame.body[..]), "{msg:?}");
    let bytes = wire(frame);
    if let Some(built) = build_frontend(&msg) {
        assert_eq!(&built[..], &bytes[..], "builder for {msg:?}");
    }
    match &msg {
        FrontendMessage::Bind {
            portal,
            statement,
            body,
        } => {
            let Ok(details) = frontend::parse_bind_details(body) else {
                return;
            };
            let mut b = BytesMut::new();
            for s in [portal, statement] {
                b.put_slice(s);
                b.put_u8(0);
            }
            let formats = |b: &mut BytesMut, f: &[u16]| {
                b.put_u16(u16::try_from(f.len()).expect("at most u16::MAX formats"));
                for &x in f {
                    b.put_u16(x);
                }
            };
            formats(&mut b, &details.param_formats);
            b.put_u16(u16::try_from(details.params.len()).expect("at most u16::MAX params"));
            for p in &details.params {
                match p {
                    Some(v) => {
                        b.put_i32(i32::try_from(v.len()).expect("values fit the length word"));
                        b.put_slice(v);
                    }
                    None => b.put_i32(-1),
                }
            }
            formats(&mut b, &details.result_formats);
            assert_eq!(&b[..], &body[..], "Bind details of {msg:?}");
        }
        FrontendMessage::Password { body } => {
            if let Ok(password) = frontend::parse_password(body) {
                let mut b = BytesMut::new();
                frontend::password(&mut b, password);
                assert_eq!(&b[..], &bytes[..], "PasswordMessage");
            }
            if let Ok((mechanism, data)) = frontend::parse_sasl_initial_response(body) {
                let mut b = BytesMut::new();
                frontend::sasl_initial_response(&mut b, mechanism, data);
                if b[..] != bytes[..] {
                    // The one other encoding: no data, sent as length -1.
                    assert!(data.is_empty(), "SASLInitialResponse");
                    assert_eq!(&body[mechanism.len() + 1..], &(-1i32).to_be_bytes()[..]);
                }
            }
        }
        _ => {}
    }
}

fn frontend_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let mut one = |f: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        f(&mut b);
        seeds.push(b.to_vec());
    };
    one(&|b| frontend::query(b, "select 1"));
    one(&|b| {
        frontend::parse(b, "s1", "select $1, $2", &[23, 0]);
        frontend::bind(b, "", "s1", &[Some(b"42"), None]);
        frontend::describe(b, b'P', "");
        frontend::execute(b, "", 0);
        frontend::sync(b);
    });
    one(&|b| {
        frontend::close(b, b'S', "s1");
        frontend::flush(b);
        frontend::terminate(b);
    });
    one(&|b| {
        frontend::copy_data(b, b"1\tone\n");
        frontend::copy_done(b);
        frontend::copy_fail(b, "stop");
    });
    one(&|b| frontend::password(b, "md5a3556571e93b0d20722ba62be61e8c2d"));
    one(&|b| frontend::sasl_initial_response(b, "SCRAM-SHA-256", b"n,,n=,r=abc"));
    one(&|b| frontend::sasl_response(b, b"c=biws,r=abcdef,p=AAAA"));
    // Bind with binary formats, a SASLInitialResponse with length -1 and a
    // FunctionCall, none of which the builders write.
    seeds.push(b"B\0\0\0\x19\0s\0\0\x01\0\x01\0\x01\0\0\0\x04\0\0\0\x07\0\x01\0\x01".to_vec());
    seeds.push(b"p\0\0\0\x16SCRAM-SHA-256\0\xff\xff\xff\xff".to_vec());
    seeds.push(b"F\0\0\0\x0e\0\0\x04\xd2\0\0\0\0\0\0".to_vec());
    seeds
}

// ---------------------------------------------------------------------------
// Backend messages

/// A byte stream from a server: framing as in [`framing`], then every frame
/// through [`BackendMessage::parse`] and the body helpers the pooler calls
/// on relayed messages (`parse_error_fields`, `parse_command_complete`,
/// `parse_row_description`, `parse_data_row`), whatever the tag. What they
/// accept must re-encode to the same bytes, or for error fields, build into
/// an error that parses back to the same fields.
pub fn backend_message(data: &[u8]) {
    for frame in check_stream(data, DEFAULT_MAX_MESSAGE_LEN, &some_cuts(data.len())) {
        check_backend_frame(&frame);
    }
}

fn check_backend_frame(frame: &Frame) {
    let bytes = wire(frame);
    let body = &frame.body;
    let built = |f: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        f(&mut b);
        b
    };
    if let Ok(msg) = BackendMessage::parse(frame) {
        let again = match &msg {
            BackendMessage::Authentication(a) => match a {
                Authentication::Ok => Some(built(&backend::authentication_ok)),
                Authentication::CleartextPassword => {
                    Some(built(&backend::authentication_cleartext))
                }
                Authentication::Md5Password { salt } => {
                    Some(built(&|b| backend::authentication_md5(b, *salt)))
                }
                Authentication::Sasl { mechanisms } => {
                    let names: Vec<&str> = mechanisms.iter().map(String::as_str).collect();
                    assert!(names.iter().all(|n| !n.is_empty()));
                    Some(built(&|b| backend::authentication_sasl(b, &names)))
                }
                Authentication::SaslContinue { data } => {
                    Some(built(&|b| backend::authentication_sasl_continue(b, data)))
                }
                Authentication::SaslFinal { data } => {
                    Some(built(&|b| backend::authentication_sasl_final(b, data)))
                }
                Authentication::Other { code } => {
                    assert!(![0, 3, 5, 10, 11, 12].contains(code), "known code {code}");
                    assert_eq!(&body[..4], &code.to_be_bytes()[..]);
                    None
                }
            },
            BackendMessage::ParameterStatus { name, value } => {
                Some(built(&|b| backend::parameter_status(b, name, value)))
            }
            BackendMessage::BackendKeyData { pid, key } => {
                Some(built(&|b| backend::backend_key_data(b, *pid, *key)))
            }
            BackendMessage::ReadyForQuery(status) => {
                assert_eq!(TransactionStatus::from_byte(status.as_byte()), Ok(*status));
                Some(built(&|b| backend::ready_for_query(b, *status)))
            }
            BackendMessage::ErrorResponse(fields) | BackendMessage::NoticeResponse(fields) => {
                check_error_fields(fields);
                None
            }
            BackendMessage::NegotiateProtocolVersion { minor, options } => {
                let mut b = BytesMut::new();
                b.put_u32(*minor);
                b.put_u32(u32::try_from(options.len()).expect("count came from a u32"));
                for o in options {
                    b.put_slice(o.as_bytes());
                    b.put_u8(0);
                }
                assert_eq!(&b[..], &body[..], "NegotiateProtocolVersion");
                None
            }
            BackendMessage::Other { tag } => {
                assert!(!b"RSKZENv".contains(tag), "typed tag {tag} parsed as Other");
                None
            }
        };
        if let Some(again) = again {
            assert_eq!(&again[..], &bytes[..], "builder for {msg:?}");
            // What the builders make, the relay's per-type check lets by.
            let len = u32::try_from(body.len() + 4).expect("bounded by the frame limit");
            assert!(
                backend::check_header(frame.tag, len).is_ok(),
                "check_header refuses a well-formed {msg:?}"
            );
        }
    }
    // The per-type check never panics, and refuses what it must.
    let len = u32::try_from(body.len() + 4).expect("bounded by the frame limit");
    if let Ok(()) = backend::check_header(frame.tag, len) {
        assert!(
            frame.tag != b'Z' || body.len() == 1,
            "ReadyForQuery of {len}"
        );
    }
    // The body helpers, on every body: they see whatever a server relays.
    if let Ok(fields) = backend::parse_error_fields(body) {
        check_error_fields(&fields);
    }
    if let Ok(tag) = backend::parse_command_complete(body) {
        let again = built(&|b| backend::command_complete(b, tag));
        assert_eq!(&again[5..], &body[..], "CommandComplete");
    }
    if let Ok(names) = backend::parse_row_description(body) {
        assert_eq!(&body[..2], &(names.len() as u16).to_be_bytes()[..]);
        let again = built(&|b| backend::row_description(b, &names));
        assert_eq!(backend::parse_row_description(&again[5..]), Ok(names));
    }
    if let Ok(values) = backend::parse_data_row(body) {
        let mut b = BytesMut::new();
        b.put_u16(u16::try_from(values.len()).expect("count came from a u16"));
        for v in &values {
            match v {
                Some(v) => {
                    b.put_i32(i32::try_from(v.len()).expect("values fit the length word"));
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        assert_eq!(&b[..], &body[..], "DataRow");
        let text: Option<Vec<Option<&str>>> = values
            .iter()
            .map(|v| v.map_or(Some(None), |v| std::str::from_utf8(v).ok().map(Some)))
            .collect();
        if let Some(text) = text {
            let again = built(&|b| backend::data_row(b, &text));
            assert_eq!(&again[5..], &body[..], "data_row builder");
        }
    }
}

/// Fields decoded from an error build into an error that decodes to the
/// same fields (less the hint, which the builder does not write).
fn check_error_fields(fields: &ErrorFields) {
    let mut b = BytesMut::new();
    backend::error_response(
        &mut b,
        &fields.severity,
        &fields.code,
        &fields.message,
        fields.detail.as_deref(),
    );
    let again = backend::parse_error_fields(&b[5..]).expect("a built error parses");
    assert_eq!(
        again,
        ErrorFields {
            hint: None,
            ..fields.clone()
        }
    );
}

fn backend_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let mut one = |f: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        f(&mut b);
        seeds.push(b.to_vec());
    };
    one(&|b| {
        backend::authentication_ok(b);
        backend::parameter_status(b, "server_version", "16.2");
        backend::backend_key_data(b, 4242, 0xdead_beef);
        backend::ready_for_query(b, TransactionStatus::Idle);
    });
    one(&|b| backend::authentication_md5(b, [1, 2, 3, 4]));
    one(&|b| backend::authentication_cleartext(b));
    one(&|b| backend::authentication_sasl(b, &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]));
    one(&|b| backend::authentication_sasl_continue(b, b"r=abcdef,s=c2FsdA==,i=4096"));
    one(&|b| backend::authentication_sasl_final(b, b"v=AAAA"));
    one(&|b| {
        backend::row_description(b, &["a", "b"]);
        backend::data_row(b, &[Some("1"), None]);
        backend::command_complete(b, "SELECT 1");
        backend::ready_for_query(b, TransactionStatus::InTransaction);
    });
    one(&|b| {
        backend::error_response(b, "FATAL", "28P01", "password authentication failed", None);
        backend::notice_response(b, "NOTICE", "00000", "hello");
        backend::empty_query_response(b);
        backend::ready_for_query(b, TransactionStatus::Failed);
    });
    // NegotiateProtocolVersion, an error with a hint and non-UTF-8 text, GSS.
    seeds.push(b"v\0\0\0\x15\0\0\0\0\0\0\0\x01_pq_.foo\0".to_vec());
    seeds.push(b"E\0\0\0\x21SERROR\0VERROR\0C42P01\0Mx\xff\0Hh\0\0".to_vec());
    seeds.push(b"R\0\0\0\x0b\0\0\0\x07abc".to_vec());
    seeds
}

// ---------------------------------------------------------------------------
// Startup packets

/// What `read_startup` gives and how many bytes it leaves in the buffer,
/// the bytes fed as `data[..cut]` and then the rest.
fn read_startup_in_two(
    data: &[u8],
    cut: usize,
) -> (Result<Option<Startup>, Error>, usize, &'static str) {
    let cut = cut.min(data.len());
    let mut buf = BytesMut::from(&data[..cut]);
    match read_startup(&mut buf) {
        Ok(None) => assert_eq!(buf.len(), cut, "an incomplete packet consumed bytes"),
        done => return (done, buf.len() + data.len() - cut, "first piece"),
    }
    buf.extend_from_slice(&data[cut..]);
    let before = buf.len();
    let got = read_startup(&mut buf);
    if got == Ok(None) {
        assert_eq!(buf.len(), before, "an incomplete packet consumed bytes");
    }
    (got, buf.len(), "second piece")
}

/// The bytes a client sends first: `read_startup` on them whole and in two
/// pieces cut at a few places must agree; a packet it accepts re-encodes
/// (through the crate's builders) to exactly the bytes it was cut from, and
/// its parameters come back in order, with `user` among them.
pub fn startup_packet(data: &[u8]) {
    let (whole, left, _) = read_startup_in_two(data, data.len());
    let declared = data
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]));
    match &whole {
        Ok(None) => {
            assert_eq!(left, data.len());
            if let Some(len) = declared {
                assert!(len as usize > data.len(), "a whole packet was left waiting");
            }
        }
        Ok(Some(packet)) => {
            let len = declared.expect("a packet has a length") as usize;
            assert_eq!(left, data.len() - len, "bytes after the packet");
            let mut b = BytesMut::new();
            match packet {
                Startup::Startup {
                    major,
                    minor,
                    params,
                } => {
                    assert_eq!(*major, 3);
                    let pairs: Vec<(&str, &str)> = params
                        .iter()
                        .map(|(n, v)| (n.as_str(), v.as_str()))
                        .collect();
                    assert!(pairs.iter().all(|(n, _)| !n.is_empty()), "empty name");
                    let user = pairs.iter().find(|(n, _)| *n == "user");
                    let user = user.expect("a packet without user was accepted").1;
                    assert_eq!(packet.param("user"), Some(user));
                    frontend::startup(&mut b, &pairs);
                    // The builder writes 3.0; the packet may ask for 3.x.
                    b[4..8].copy_from_slice(&((3u32 << 16) | u32::from(*minor)).to_be_bytes());
                }
                Startup::SslRequest => frontend::ssl_request(&mut b),
                Startup::GssEncRequest => {
                    b.put_u32(8);
                    b.put_u32(codec::GSSENC_REQUEST_CODE);
                }
                Startup::Cancel { pid, key } => frontend::cancel_request(&mut b, *pid, *key),
            }
            assert_eq!(&b[..], &data[..len], "{packet:?}");
        }
        Err(Error::BadLength { tag: 0, len }) => {
            assert!(*len < 8 && declared == Some(*len));
        }
        Err(Error::TooLarge { tag: 0, len, max }) => {
            assert!(*len as usize > MAX_STARTUP_LEN && *max == MAX_STARTUP_LEN);
        }
        Err(Error::UnsupportedProtocol { major, .. }) => assert_ne!(*major, 3),
        Err(Error::Malformed { .. }) => {}
        Err(e) => panic!("read_startup failed with {e:?}"),
    }
    let end = declared.map_or(0, |l| (l as usize).min(data.len()));
    for cut in [1, 4, 7, 8, data.len() / 2, end.saturating_sub(1)] {
        let (got, got_left, piece) = read_startup_in_two(data, cut);
        assert_eq!(
            (&got, got_left),
            (&whole, left),
            "split at {cut}, done at the {piece}"
        );
    }
}

fn startup_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let mut one = |f: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        f(&mut b);
        seeds.push(b.to_vec());
    };
    one(&|b| frontend::startup(b, &[("user", "alice")]));
    one(&|b| {
        frontend::startup(
            b,
            &[
                ("user", "alice"),
                ("database", "db"),
                ("application_name", "psql"),
                ("options", "-c search_path=x"),
            ],
        );
    });
    one(&|b| frontend::ssl_request(b));
    one(&|b| frontend::cancel_request(b, 42, 0xdead_beef));
    one(&|b| {
        b.put_u32(8);
        b.put_u32(codec::GSSENC_REQUEST_CODE);
    });
    // A startup packet followed by a query, and protocol 3.2.
    one(&|b| {
        frontend::startup(b, &[("user", "u"), ("database", "d")]);
        frontend::query(b, "select 1");
    });
    seeds.push(b"\0\0\0\x12\0\x03\0\x02user\0bob\0\0".to_vec());
    seeds
}

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
struct Keys {
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
fn two_messages(data: &[u8]) -> (&[u8], &[u8]) {
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

fn server_secret() -> &'static (ScramSecret, Keys) {
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

fn scram_server_seeds() -> Vec<Vec<u8>> {
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

fn scram_client_seeds() -> Vec<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
