//! The frontend and backend message targets: what clients and servers send
//! after startup, through the typed parsers and the builders.

use bytes::{BufMut, Bytes, BytesMut};

use crate::backend::{self, Authentication, BackendMessage, ErrorFields, TransactionStatus};
use crate::codec::{Frame, DEFAULT_MAX_MESSAGE_LEN};
use crate::frontend::{self, FrontendMessage};

#[cfg(doc)]
use super::framing;
use super::{check_stream, some_cuts, wire};

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

pub(super) fn frontend_seeds() -> Vec<Vec<u8>> {
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

pub(super) fn backend_seeds() -> Vec<Vec<u8>> {
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
