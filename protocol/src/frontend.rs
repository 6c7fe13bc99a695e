//! Messages a client sends to the server: typed parsing and builders.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{Frame, CANCEL_REQUEST_CODE, PROTOCOL_3_0, SSL_REQUEST_CODE};
use crate::error::{Error, Result};
use crate::util::{message, put_count, put_cstr, put_nullable, untagged, Reader};

/// Typed view of a frontend [`Frame`]. Byte fields are zero-copy slices of
/// the frame body, so relaying a parsed message costs no copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    /// 'Q' simple query (sql without the trailing NUL).
    Query {
        /// The query text.
        sql: Bytes,
    },
    /// 'P' Parse.
    Parse {
        /// Prepared statement name (empty = unnamed).
        name: Bytes,
        /// The query text.
        sql: Bytes,
        /// Parameter type OIDs (0 = unspecified).
        param_types: Vec<u32>,
    },
    /// 'B' Bind; `body` is the whole message body, the rest decoded lazily.
    Bind {
        /// Destination portal name.
        portal: Bytes,
        /// Source prepared statement name.
        statement: Bytes,
        /// The whole message body.
        body: Bytes,
    },
    /// 'D' Describe.
    Describe {
        /// b'S' for a statement, b'P' for a portal.
        kind: u8,
        /// Statement or portal name.
        name: Bytes,
    },
    /// 'E' Execute.
    Execute {
        /// Portal name.
        portal: Bytes,
        /// Row limit (0 = no limit).
        max_rows: u32,
    },
    /// 'S' Sync.
    Sync,
    /// 'H' Flush.
    Flush,
    /// 'X' Terminate.
    Terminate,
    /// 'c' CopyDone.
    CopyDone,
    /// 'C' Close.
    Close {
        /// b'S' for a statement, b'P' for a portal.
        kind: u8,
        /// Statement or portal name.
        name: Bytes,
    },
    /// 'd' CopyData.
    CopyData {
        /// The data.
        data: Bytes,
    },
    /// 'f' CopyFail.
    CopyFail {
        /// The error message.
        message: Bytes,
    },
    /// 'p' PasswordMessage / SASLInitialResponse / SASLResponse; decode by
    /// context with [`parse_password`] or [`parse_sasl_initial_response`].
    Password {
        /// The whole message body.
        body: Bytes,
    },
    /// 'F' FunctionCall.
    FunctionCall {
        /// The whole message body.
        body: Bytes,
    },
}

impl FrontendMessage {
    /// Decodes a frame; an unknown tag is `Unexpected`.
    pub fn parse(frame: &Frame) -> Result<Self> {
        let body = &frame.body;
        let mut r = Reader::new(body);
        // Zero-copy: sub-slices of the body become Bytes sharing its buffer.
        let sub = |s: &[u8]| body.slice_ref(s);
        let msg = match frame.tag {
            b'Q' => Self::Query {
                sql: sub(r.cstr("Query text is not NUL-terminated")?),
            },
            b'P' => {
                let name = sub(r.cstr("Parse statement name")?);
                let sql = sub(r.cstr("Parse query text")?);
                let n = r.u16("Parse parameter count")?;
                let mut param_types = Vec::with_capacity(usize::from(n).min(r.rest_len() / 4));
                for _ in 0..n {
                    param_types.push(r.u32("Parse parameter types")?);
                }
                Self::Parse {
                    name,
                    sql,
                    param_types,
                }
            }
            b'B' => {
                let portal = sub(r.cstr("Bind portal name")?);
                let statement = sub(r.cstr("Bind statement name")?);
                // The remainder is relayed as is; skip validating it here.
                r.rest();
                Self::Bind {
                    portal,
                    statement,
                    body: body.clone(),
                }
            }
            b'D' | b'C' => {
                let kind = r.u8("Describe/Close kind")?;
                if kind != b'S' && kind != b'P' {
                    return Err(Error::Malformed {
                        what: "Describe/Close kind is not 'S' or 'P'",
                    });
                }
                let name = sub(r.cstr("Describe/Close name")?);
                if frame.tag == b'D' {
                    Self::Describe { kind, name }
                } else {
                    Self::Close { kind, name }
                }
            }
            b'E' => Self::Execute {
                portal: sub(r.cstr("Execute portal name")?),
                max_rows: r.u32("Execute row limit")?,
            },
            b'S' => Self::Sync,
            b'H' => Self::Flush,
            b'X' => Self::Terminate,
            b'c' => Self::CopyDone,
            b'd' => Self::CopyData { data: body.clone() },
            b'f' => Self::CopyFail {
                message: sub(r.cstr("CopyFail message")?),
            },
            b'p' => Self::Password { body: body.clone() },
            b'F' => Self::FunctionCall { body: body.clone() },
            got => {
                return Err(Error::Unexpected {
                    expected: "frontend message",
                    got,
                })
            }
        };
        if matches!(
            msg,
            Self::CopyData { .. } | Self::Password { .. } | Self::FunctionCall { .. }
        ) {
            return Ok(msg);
        }
        r.finish("frontend message has trailing bytes")?;
        Ok(msg)
    }
}

/// Whether PostgreSQL accepts a message of this type from a client once it
/// is logged in (the types `SocketBackend` in postgres.c lets through):
/// the simple and extended query messages, FunctionCall, Terminate and the
/// COPY messages. Anything else (a PasswordMessage `p` included) is
/// answered `FATAL 08P01 invalid frontend message type N` and the
/// connection closes. CopyData, CopyDone and CopyFail are accepted outside
/// COPY too, and ignored there.
pub fn is_known_type(tag: u8) -> bool {
    matches!(
        tag,
        b'Q' | b'F' | b'X' | b'B' | b'C' | b'D' | b'E' | b'H' | b'P' | b'S' | b'd' | b'c' | b'f'
    )
}

/// Decodes a PasswordMessage body: one NUL-terminated string.
pub fn parse_password(body: &[u8]) -> Result<&str> {
    let mut r = Reader::new(body);
    let s = r.cstr_utf8("password")?;
    r.finish("password packet has trailing bytes")?;
    Ok(s)
}

/// Decodes a SASLInitialResponse body: mechanism name, then int32 length
/// and data (-1 = no data, returned as empty).
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<(&str, &[u8])> {
    let mut r = Reader::new(body);
    let mechanism = r.cstr_utf8("SASL mechanism name")?;
    let len = r.i32("SASL initial response length")?;
    let data = match len {
        -1 => &[][..],
        n if n < 0 => {
            return Err(Error::Malformed {
                what: "negative SASL initial response length",
            })
        }
        n => r.take(n as usize, "SASL initial response data")?,
    };
    r.finish("SASL initial response has trailing bytes")?;
    Ok((mechanism, data))
}

/// One parameter value of a Bind message.
pub type BindParam = Option<Bytes>;

/// Decoded remainder of a Bind body, for callers that need the values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindDetails {
    /// Parameter format codes (empty = all text, one = applies to all).
    pub param_formats: Vec<u16>,
    /// Parameter values, `None` for NULL.
    pub params: Vec<BindParam>,
    /// Result column format codes.
    pub result_formats: Vec<u16>,
}

/// Decodes a whole Bind body (as kept in [`FrontendMessage::Bind`]).
pub fn parse_bind_details(body: &Bytes) -> Result<BindDetails> {
    let mut r = Reader::new(body);
    r.cstr("Bind portal name")?;
    r.cstr("Bind statement name")?;
    let read_formats = |r: &mut Reader<'_>| -> Result<Vec<u16>> {
        let n = r.u16("Bind format count")?;
        let mut v = Vec::with_capacity(usize::from(n).min(r.rest_len() / 2));
        for _ in 0..n {
            v.push(r.u16("Bind format codes")?);
        }
        Ok(v)
    };
    let param_formats = read_formats(&mut r)?;
    let n = r.u16("Bind parameter count")?;
    let mut params = Vec::with_capacity(usize::from(n).min(r.rest_len() / 4));
    for _ in 0..n {
        let len = r.i32("Bind parameter length")?;
        params.push(match len {
            -1 => None,
            n if n < 0 => {
                return Err(Error::Malformed {
                    what: "negative Bind parameter length",
                })
            }
            n => Some(body.slice_ref(r.take(n as usize, "Bind parameter value")?)),
        });
    }
    let result_formats = read_formats(&mut r)?;
    r.finish("Bind has trailing bytes")?;
    Ok(BindDetails {
        param_formats,
        params,
        result_formats,
    })
}

/// Appends a StartupMessage for protocol 3.0 with the given parameters.
pub fn startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    untagged(buf, |b| {
        b.put_u32(PROTOCOL_3_0);
        for (name, value) in params {
            put_cstr(b, name.as_bytes());
            put_cstr(b, value.as_bytes());
        }
        b.put_u8(0);
    });
}

/// Appends an SSLRequest.
pub fn ssl_request(buf: &mut BytesMut) {
    untagged(buf, |b| b.put_u32(SSL_REQUEST_CODE));
}

/// Appends a CancelRequest.
pub fn cancel_request(buf: &mut BytesMut, pid: u32, key: u32) {
    untagged(buf, |b| {
        b.put_u32(CANCEL_REQUEST_CODE);
        b.put_u32(pid);
        b.put_u32(key);
    });
}

/// Appends a PasswordMessage.
pub fn password(buf: &mut BytesMut, password: &str) {
    message(buf, b'p', |b| put_cstr(b, password.as_bytes()));
}

/// Appends a SASLInitialResponse.
pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    message(buf, b'p', |b| {
        put_cstr(b, mechanism.as_bytes());
        put_nullable(b, Some(data));
    });
}

/// Appends a SASLResponse.
pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'p', |b| b.put_slice(data));
}

/// Appends a simple Query.
pub fn query(buf: &mut BytesMut, sql: &str) {
    message(buf, b'Q', |b| put_cstr(b, sql.as_bytes()));
}

/// Appends a Sync.
pub fn sync(buf: &mut BytesMut) {
    message(buf, b'S', |_| {});
}

/// Appends a Terminate.
pub fn terminate(buf: &mut BytesMut) {
    message(buf, b'X', |_| {});
}

/// Appends a Parse.
pub fn parse(buf: &mut BytesMut, name: &str, sql: &str, param_types: &[u32]) {
    message(buf, b'P', |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, sql.as_bytes());
        put_count(b, param_types.len());
        for &oid in param_types.iter().take(usize::from(u16::MAX)) {
            b.put_u32(oid);
        }
    });
}

/// Appends a Bind with all parameters in text format and no result formats
/// (= all results in text).
pub fn bind(buf: &mut BytesMut, portal: &str, statement: &str, params: &[Option<&[u8]>]) {
    message(buf, b'B', |b| {
        put_cstr(b, portal.as_bytes());
        put_cstr(b, statement.as_bytes());
        b.put_u16(0);
        put_count(b, params.len());
        for p in params.iter().take(usize::from(u16::MAX)) {
            put_nullable(b, *p);
        }
        b.put_u16(0);
    });
}

/// Appends a Describe (kind b'S' statement or b'P' portal).
pub fn describe(buf: &mut BytesMut, kind: u8, name: &str) {
    message(buf, b'D', |b| {
        b.put_u8(kind);
        put_cstr(b, name.as_bytes());
    });
}

/// Appends an Execute.
pub fn execute(buf: &mut BytesMut, portal: &str, max_rows: u32) {
    message(buf, b'E', |b| {
        put_cstr(b, portal.as_bytes());
        b.put_u32(max_rows);
    });
}

/// Appends a Flush.
pub fn flush(buf: &mut BytesMut) {
    message(buf, b'H', |_| {});
}

/// Appends a Close (kind b'S' statement or b'P' portal).
pub fn close(buf: &mut BytesMut, kind: u8, name: &str) {
    message(buf, b'C', |b| {
        b.put_u8(kind);
        put_cstr(b, name.as_bytes());
    });
}

/// Appends a CopyData.
pub fn copy_data(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'd', |b| b.put_slice(data));
}

/// Appends a CopyDone.
pub fn copy_done(buf: &mut BytesMut) {
    message(buf, b'c', |_| {});
}

/// Appends a CopyFail.
pub fn copy_fail(buf: &mut BytesMut, message_text: &str) {
    message(buf, b'f', |b| put_cstr(b, message_text.as_bytes()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{read_frame, DEFAULT_MAX_MESSAGE_LEN};

    /// Builds with `f`, cuts exactly one frame and parses it.
    fn roundtrip(f: impl FnOnce(&mut BytesMut)) -> (Frame, FrontendMessage) {
        let mut b = BytesMut::new();
        f(&mut b);
        let frame = read_frame(&mut b, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert!(b.is_empty(), "builder wrote exactly one frame");
        let msg = FrontendMessage::parse(&frame).unwrap();
        (frame, msg)
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn simple_messages_roundtrip() {
        assert_eq!(
            roundtrip(|x| query(x, "select 1")).1,
            FrontendMessage::Query { sql: b("select 1") }
        );
        assert_eq!(roundtrip(sync).1, FrontendMessage::Sync);
        assert_eq!(roundtrip(flush).1, FrontendMessage::Flush);
        assert_eq!(roundtrip(terminate).1, FrontendMessage::Terminate);
        assert_eq!(roundtrip(copy_done).1, FrontendMessage::CopyDone);
        assert_eq!(
            roundtrip(|x| copy_data(x, b"a\tb\n")).1,
            FrontendMessage::CopyData { data: b("a\tb\n") }
        );
        assert_eq!(
            roundtrip(|x| copy_fail(x, "boom")).1,
            FrontendMessage::CopyFail { message: b("boom") }
        );
    }

    #[test]
    fn extended_messages_roundtrip() {
        assert_eq!(
            roundtrip(|x| parse(x, "s1", "select $1, $2", &[23, 25])).1,
            FrontendMessage::Parse {
                name: b("s1"),
                sql: b("select $1, $2"),
                param_types: vec![23, 25]
            }
        );
        let (frame, msg) = roundtrip(|x| bind(x, "p1", "s1", &[Some(b"42"), None]));
        assert_eq!(
            msg,
            FrontendMessage::Bind {
                portal: b("p1"),
                statement: b("s1"),
                body: frame.body.clone()
            }
        );
        let details = parse_bind_details(&frame.body).unwrap();
        assert_eq!(
            details,
            BindDetails {
                param_formats: vec![],
                params: vec![Some(b("42")), None],
                result_formats: vec![],
            }
        );
        assert_eq!(
            roundtrip(|x| describe(x, b'S', "s1")).1,
            FrontendMessage::Describe {
                kind: b'S',
                name: b("s1")
            }
        );
        assert_eq!(
            roundtrip(|x| close(x, b'P', "")).1,
            FrontendMessage::Close {
                kind: b'P',
                name: b("")
            }
        );
        assert_eq!(
            roundtrip(|x| execute(x, "p1", 100)).1,
            FrontendMessage::Execute {
                portal: b("p1"),
                max_rows: 100
            }
        );
    }

    #[test]
    fn password_messages_roundtrip() {
        let (frame, msg) = roundtrip(|x| password(x, "secret"));
        assert_eq!(
            msg,
            FrontendMessage::Password {
                body: frame.body.clone()
            }
        );
        assert_eq!(parse_password(&frame.body), Ok("secret"));

        let (frame, _) = roundtrip(|x| sasl_initial_response(x, "SCRAM-SHA-256", b"n,,n=,r=abc"));
        assert_eq!(
            parse_sasl_initial_response(&frame.body),
            Ok(("SCRAM-SHA-256", &b"n,,n=,r=abc"[..]))
        );

        let (frame, _) = roundtrip(|x| sasl_response(x, b"c=biws"));
        assert_eq!(&frame.body[..], b"c=biws");

        // -1 length means no data.
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            parse_sasl_initial_response(&body),
            Ok(("SCRAM-SHA-256", &b""[..]))
        );
        // Length beyond the body.
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&10i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert!(parse_sasl_initial_response(&body).is_err());
        assert!(parse_password(b"no nul").is_err());
        assert!(parse_password(b"a\0b").is_err());
    }

    #[test]
    fn startup_packets_roundtrip() {
        use crate::codec::{read_startup, Startup};
        let mut x = BytesMut::new();
        startup(&mut x, &[("user", "u"), ("database", "d")]);
        ssl_request(&mut x);
        cancel_request(&mut x, 7, 9);
        assert_eq!(
            read_startup(&mut x).unwrap().unwrap(),
            Startup::Startup {
                major: 3,
                minor: 0,
                params: vec![("user".into(), "u".into()), ("database".into(), "d".into())]
            }
        );
        assert_eq!(read_startup(&mut x).unwrap(), Some(Startup::SslRequest));
        assert_eq!(
            read_startup(&mut x).unwrap(),
            Some(Startup::Cancel { pid: 7, key: 9 })
        );
    }

    #[test]
    fn malformed_and_unknown() {
        let frame = |tag: u8, body: &[u8]| Frame {
            tag,
            body: Bytes::copy_from_slice(body),
        };
        assert_eq!(
            FrontendMessage::parse(&frame(b'Z', b"")),
            Err(Error::Unexpected {
                expected: "frontend message",
                got: b'Z'
            })
        );
        assert!(FrontendMessage::parse(&frame(b'Q', b"select 1")).is_err());
        assert!(FrontendMessage::parse(&frame(b'Q', b"a\0b")).is_err());
        assert!(FrontendMessage::parse(&frame(b'D', b"Xname\0")).is_err());
        assert!(FrontendMessage::parse(&frame(b'E', b"p\0\0\0")).is_err());
        assert!(FrontendMessage::parse(&frame(b'S', b"x")).is_err());
        // Parse claiming more parameter types than present.
        assert!(FrontendMessage::parse(&frame(b'P', b"\0q\0\xff\xff\0\0\0\x17")).is_err());
        assert!(parse_bind_details(&Bytes::from_static(b"\0\0\0\0\0\x01\0\0\0\x09ab")).is_err());
    }
}
