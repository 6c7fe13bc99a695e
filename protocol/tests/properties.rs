//! Property tests: every message the crate can build parses back to what
//! was built, and framing gives the same frames however the bytes are
//! split on their way in.

use bytes::{Bytes, BytesMut};
use odissey_protocol::backend::{self, Authentication, BackendMessage, TransactionStatus};
use odissey_protocol::frontend::{self, FrontendMessage};
use odissey_protocol::{read_frame, read_startup, Frame, Startup};
use proptest::prelude::*;

/// Text the protocol carries as C strings: anything but NUL.
fn text() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,40}"
}

/// A frontend message, built with the crate's builders.
#[derive(Debug, Clone)]
enum Front {
    Query(String),
    Parse(String, String, Vec<u32>),
    Bind(String, String, Vec<Option<Vec<u8>>>),
    Describe(u8, String),
    Execute(String, u32),
    Close(u8, String),
    CopyData(Vec<u8>),
    CopyFail(String),
    Sync,
    Flush,
    CopyDone,
    Terminate,
}

fn front() -> impl Strategy<Value = Front> {
    let kind = prop_oneof![Just(b'S'), Just(b'P')];
    let param = prop::option::of(prop::collection::vec(any::<u8>(), 0..20));
    prop_oneof![
        text().prop_map(Front::Query),
        (text(), text(), prop::collection::vec(any::<u32>(), 0..4))
            .prop_map(|(n, s, t)| Front::Parse(n, s, t)),
        (text(), text(), prop::collection::vec(param, 0..4))
            .prop_map(|(p, s, v)| Front::Bind(p, s, v)),
        (kind.clone(), text()).prop_map(|(k, n)| Front::Describe(k, n)),
        (text(), any::<u32>()).prop_map(|(p, m)| Front::Execute(p, m)),
        (kind, text()).prop_map(|(k, n)| Front::Close(k, n)),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Front::CopyData),
        text().prop_map(Front::CopyFail),
        Just(Front::Sync),
        Just(Front::Flush),
        Just(Front::CopyDone),
        Just(Front::Terminate),
    ]
}

fn encode(m: &Front, out: &mut BytesMut) {
    match m {
        Front::Query(s) => frontend::query(out, s),
        Front::Parse(n, s, t) => frontend::parse(out, n, s, t),
        Front::Bind(p, s, v) => {
            let params: Vec<Option<&[u8]>> = v.iter().map(|x| x.as_deref()).collect();
            frontend::bind(out, p, s, &params);
        }
        Front::Describe(k, n) => frontend::describe(out, *k, n),
        Front::Execute(p, m) => frontend::execute(out, p, *m),
        Front::Close(k, n) => frontend::close(out, *k, n),
        Front::CopyData(d) => frontend::copy_data(out, d),
        Front::CopyFail(s) => frontend::copy_fail(out, s),
        Front::Sync => frontend::sync(out),
        Front::Flush => frontend::flush(out),
        Front::CopyDone => frontend::copy_done(out),
        Front::Terminate => frontend::terminate(out),
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn check_front(m: &Front, parsed: &FrontendMessage) {
    match (m, parsed) {
        (Front::Query(s), FrontendMessage::Query { sql }) => assert_eq!(sql, &b(s)),
        (
            Front::Parse(n, s, t),
            FrontendMessage::Parse {
                name,
                sql,
                param_types,
            },
        ) => assert_eq!((name, sql, param_types), (&b(n), &b(s), t)),
        (
            Front::Bind(p, s, v),
            FrontendMessage::Bind {
                portal,
                statement,
                body,
            },
        ) => {
            assert_eq!((portal, statement), (&b(p), &b(s)));
            let d = frontend::parse_bind_details(body).unwrap();
            let got: Vec<Option<Vec<u8>>> = d
                .params
                .iter()
                .map(|x| x.as_ref().map(|b| b.to_vec()))
                .collect();
            assert_eq!(&got, v);
        }
        (Front::Describe(k, n), FrontendMessage::Describe { kind, name }) => {
            assert_eq!((kind, name), (k, &b(n)));
        }
        (Front::Execute(p, m), FrontendMessage::Execute { portal, max_rows }) => {
            assert_eq!((portal, max_rows), (&b(p), m));
        }
        (Front::Close(k, n), FrontendMessage::Close { kind, name }) => {
            assert_eq!((kind, name), (k, &b(n)));
        }
        (Front::CopyData(d), FrontendMessage::CopyData { data }) => assert_eq!(&data[..], &d[..]),
        (Front::CopyFail(s), FrontendMessage::CopyFail { message }) => {
            assert_eq!(message, &b(s));
        }
        (Front::Sync, FrontendMessage::Sync)
        | (Front::Flush, FrontendMessage::Flush)
        | (Front::CopyDone, FrontendMessage::CopyDone)
        | (Front::Terminate, FrontendMessage::Terminate) => {}
        (m, p) => panic!("{m:?} parsed as {p:?}"),
    }
}

/// A backend message, built with the crate's builders.
#[derive(Debug, Clone)]
enum Back {
    Ok,
    Cleartext,
    Md5([u8; 4]),
    ParameterStatus(String, String),
    KeyData(u32, u32),
    Ready(u8),
    Error(String, String, String),
    CommandComplete(String),
    DataRow(Vec<Option<String>>),
}

fn back() -> impl Strategy<Value = Back> {
    prop_oneof![
        Just(Back::Ok),
        Just(Back::Cleartext),
        any::<[u8; 4]>().prop_map(Back::Md5),
        (text(), text()).prop_map(|(n, v)| Back::ParameterStatus(n, v)),
        (any::<u32>(), any::<u32>()).prop_map(|(p, k)| Back::KeyData(p, k)),
        prop_oneof![Just(b'I'), Just(b'T'), Just(b'E')].prop_map(Back::Ready),
        ("(ERROR|FATAL|PANIC)", "[0-9A-Z]{5}", text()).prop_map(|(s, c, m)| Back::Error(s, c, m)),
        text().prop_map(Back::CommandComplete),
        prop::collection::vec(prop::option::of(text()), 0..5).prop_map(Back::DataRow),
    ]
}

fn encode_back(m: &Back, out: &mut BytesMut) {
    match m {
        Back::Ok => backend::authentication_ok(out),
        Back::Cleartext => backend::authentication_cleartext(out),
        Back::Md5(salt) => backend::authentication_md5(out, *salt),
        Back::ParameterStatus(n, v) => backend::parameter_status(out, n, v),
        Back::KeyData(p, k) => backend::backend_key_data(out, *p, *k),
        Back::Ready(s) => {
            backend::ready_for_query(out, TransactionStatus::from_byte(*s).unwrap());
        }
        Back::Error(s, c, m) => backend::error_response(out, s, c, m, None),
        Back::CommandComplete(t) => backend::command_complete(out, t),
        Back::DataRow(v) => {
            let values: Vec<Option<&str>> = v.iter().map(|x| x.as_deref()).collect();
            backend::data_row(out, &values);
        }
    }
}

fn check_back(m: &Back, frame: &Frame) {
    match m {
        Back::DataRow(v) => {
            assert_eq!(frame.tag, b'D');
            let row = backend::parse_data_row(&frame.body).unwrap();
            let got: Vec<Option<String>> = row
                .iter()
                .map(|x| x.map(|b| String::from_utf8(b.to_vec()).unwrap()))
                .collect();
            assert_eq!(&got, v);
            return;
        }
        Back::CommandComplete(t) => {
            assert_eq!(backend::parse_command_complete(&frame.body).unwrap(), t);
            return;
        }
        _ => {}
    }
    let parsed = BackendMessage::parse(frame).unwrap();
    match (m, parsed) {
        (Back::Ok, BackendMessage::Authentication(Authentication::Ok))
        | (Back::Cleartext, BackendMessage::Authentication(Authentication::CleartextPassword)) => {}
        (Back::Md5(s), BackendMessage::Authentication(Authentication::Md5Password { salt })) => {
            assert_eq!(&salt, s);
        }
        (Back::ParameterStatus(n, v), BackendMessage::ParameterStatus { name, value }) => {
            assert_eq!((&name, &value), (n, v));
        }
        (Back::KeyData(p, k), BackendMessage::BackendKeyData { pid, key }) => {
            assert_eq!((pid, key), (*p, *k));
        }
        (Back::Ready(s), BackendMessage::ReadyForQuery(st)) => {
            assert_eq!(st, TransactionStatus::from_byte(*s).unwrap());
        }
        (Back::Error(s, c, msg), BackendMessage::ErrorResponse(e)) => {
            assert_eq!((&e.severity, &e.code, &e.message), (s, c, msg));
        }
        (m, p) => panic!("{m:?} parsed as {p:?}"),
    }
}

/// Reads every frame out of `bytes` fed in chunks of the given sizes.
fn frames_in_chunks(bytes: &[u8], chunks: &[usize]) -> Vec<Frame> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut sizes = chunks.iter().cycle();
    while at < bytes.len() {
        let n = (*sizes.next().unwrap()).clamp(1, bytes.len() - at);
        buf.extend_from_slice(&bytes[at..at + n]);
        at += n;
        while let Some(f) = read_frame(&mut buf, 1 << 20).unwrap() {
            frames.push(f);
        }
    }
    assert!(buf.is_empty(), "bytes left over");
    frames
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frontend_messages_round_trip(
        msgs in prop::collection::vec(front(), 1..8),
        chunks in prop::collection::vec(1usize..40, 1..6),
    ) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode(m, &mut wire);
        }
        let frames = frames_in_chunks(&wire, &chunks);
        prop_assert_eq!(frames.len(), msgs.len());
        for (m, f) in msgs.iter().zip(&frames) {
            check_front(m, &FrontendMessage::parse(f).unwrap());
        }
    }

    #[test]
    fn backend_messages_round_trip(
        msgs in prop::collection::vec(back(), 1..8),
        chunks in prop::collection::vec(1usize..40, 1..6),
    ) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode_back(m, &mut wire);
        }
        // The same frames whole and in pieces.
        let whole = frames_in_chunks(&wire, &[wire.len()]);
        let pieces = frames_in_chunks(&wire, &chunks);
        prop_assert_eq!(&whole, &pieces);
        prop_assert_eq!(pieces.len(), msgs.len());
        for (m, f) in msgs.iter().zip(&pieces) {
            check_back(m, f);
        }
    }

    #[test]
    fn startup_packets_round_trip(
        params in prop::collection::vec(("[a-z_]{1,12}", text()), 0..6),
        split in 1usize..30,
    ) {
        let mut all = vec![("user".to_string(), "u".to_string())];
        all.extend(params);
        let pairs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut wire = BytesMut::new();
        frontend::startup(&mut wire, &pairs);
        // Fed in pieces: incomplete until the last byte.
        let mut buf = BytesMut::new();
        let mut got = None;
        for chunk in wire.chunks(split) {
            prop_assert!(got.is_none());
            buf.extend_from_slice(chunk);
            got = read_startup(&mut buf).unwrap();
        }
        match got {
            Some(Startup::Startup { params: parsed, major: 3, .. }) => prop_assert_eq!(parsed, all),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(f)) = read_frame(&mut buf, 1 << 16) {
            let _ = FrontendMessage::parse(&f);
            let _ = BackendMessage::parse(&f);
            let _ = backend::parse_data_row(&f.body);
            let _ = frontend::parse_bind_details(&f.body);
        }
        let _ = read_startup(&mut BytesMut::from(&bytes[..]));
    }
}
