//! Messages a server sends to the client: typed parsing of the few the
//! pooler acts on, and builders for the ones it synthesizes.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::Frame;
use crate::error::{Error, Result};
use crate::util::{message, put_count, put_cstr, put_nullable, Reader};

/// Transaction state reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// 'I': not in a transaction block.
    Idle,
    /// 'T': in a transaction block.
    InTransaction,
    /// 'E': in a failed transaction block.
    Failed,
}

impl TransactionStatus {
    /// Decodes the ReadyForQuery status byte.
    pub fn from_byte(b: u8) -> Result<Self> {
        match b {
            b'I' => Ok(Self::Idle),
            b'T' => Ok(Self::InTransaction),
            b'E' => Ok(Self::Failed),
            _ => Err(Error::Malformed {
                what: "unknown transaction status",
            }),
        }
    }

    /// The status byte on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            Self::Idle => b'I',
            Self::InTransaction => b'T',
            Self::Failed => b'E',
        }
    }
}

/// Authentication request codes.
mod auth_code {
    pub(super) const OK: u32 = 0;
    pub(super) const CLEARTEXT: u32 = 3;
    pub(super) const MD5: u32 = 5;
    pub(super) const SASL: u32 = 10;
    pub(super) const SASL_CONTINUE: u32 = 11;
    pub(super) const SASL_FINAL: u32 = 12;
}

/// An 'R' message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// AuthenticationOk.
    Ok,
    /// AuthenticationCleartextPassword.
    CleartextPassword,
    /// AuthenticationMD5Password.
    Md5Password {
        /// Salt to hash with.
        salt: [u8; 4],
    },
    /// AuthenticationSASL with the offered mechanisms.
    Sasl {
        /// Mechanism names in the server's order of preference.
        mechanisms: Vec<String>,
    },
    /// AuthenticationSASLContinue.
    SaslContinue {
        /// Mechanism-specific data (SCRAM server-first).
        data: Bytes,
    },
    /// AuthenticationSASLFinal.
    SaslFinal {
        /// Mechanism-specific data (SCRAM server-final).
        data: Bytes,
    },
    /// Any other method (kerberos, GSS, SSPI...); the caller rejects it.
    Other {
        /// The request code.
        code: u32,
    },
}

/// The fields of an ErrorResponse/NoticeResponse the pooler cares about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    /// Severity: the non-localized 'V' field when sent, else 'S'.
    pub severity: String,
    /// SQLSTATE code ('C').
    pub code: String,
    /// Primary message ('M').
    pub message: String,
    /// Detail ('D').
    pub detail: Option<String>,
    /// Hint ('H').
    pub hint: Option<String>,
}

/// Typed view of a backend [`Frame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// 'R'.
    Authentication(Authentication),
    /// 'S'.
    ParameterStatus {
        /// Parameter name.
        name: String,
        /// Current value.
        value: String,
    },
    /// 'K'.
    BackendKeyData {
        /// Backend process id.
        pid: u32,
        /// Cancel secret key.
        key: u32,
    },
    /// 'Z'.
    ReadyForQuery(TransactionStatus),
    /// 'E'.
    ErrorResponse(ErrorFields),
    /// 'N'.
    NoticeResponse(ErrorFields),
    /// 'v'.
    NegotiateProtocolVersion {
        /// Newest minor version the server supports.
        minor: u32,
        /// Protocol options it did not recognize.
        options: Vec<String>,
    },
    /// Everything else (DataRow, RowDescription, CommandComplete,
    /// CopyInResponse...), relayed unparsed.
    Other {
        /// The message tag.
        tag: u8,
    },
}

impl BackendMessage {
    /// Decodes a frame.
    pub fn parse(frame: &Frame) -> Result<Self> {
        let body = &frame.body;
        let mut r = Reader::new(body);
        let msg = match frame.tag {
            b'R' => Self::Authentication(parse_authentication(body, &mut r)?),
            b'S' => Self::ParameterStatus {
                name: r.cstr_utf8("ParameterStatus name")?.to_owned(),
                value: r.cstr_utf8("ParameterStatus value")?.to_owned(),
            },
            b'K' => Self::BackendKeyData {
                pid: r.u32("BackendKeyData pid")?,
                key: r.u32("BackendKeyData key")?,
            },
            b'Z' => {
                Self::ReadyForQuery(TransactionStatus::from_byte(r.u8("ReadyForQuery status")?)?)
            }
            b'E' => Self::ErrorResponse(parse_error_fields(r.rest())?),
            b'N' => Self::NoticeResponse(parse_error_fields(r.rest())?),
            b'v' => {
                let minor = r.u32("NegotiateProtocolVersion minor")?;
                let n = r.u32("NegotiateProtocolVersion option count")?;
                let mut options = Vec::new();
                for _ in 0..n {
                    options.push(r.cstr_utf8("NegotiateProtocolVersion option")?.to_owned());
                }
                Self::NegotiateProtocolVersion { minor, options }
            }
            tag => return Ok(Self::Other { tag }),
        };
        r.finish("backend message has trailing bytes")?;
        Ok(msg)
    }
}

/// Decodes an 'R' body; `r` is positioned at its start.
fn parse_authentication(body: &Bytes, r: &mut Reader<'_>) -> Result<Authentication> {
    Ok(match r.u32("authentication request code")? {
        auth_code::OK => Authentication::Ok,
        auth_code::CLEARTEXT => Authentication::CleartextPassword,
        auth_code::MD5 => {
            let s = r.take(4, "md5 salt")?;
            Authentication::Md5Password {
                salt: [s[0], s[1], s[2], s[3]],
            }
        }
        auth_code::SASL => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr_utf8("SASL mechanism list")?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m.to_owned());
            }
            Authentication::Sasl { mechanisms }
        }
        auth_code::SASL_CONTINUE => Authentication::SaslContinue {
            data: body.slice_ref(r.rest()),
        },
        auth_code::SASL_FINAL => Authentication::SaslFinal {
            data: body.slice_ref(r.rest()),
        },
        // Other methods may carry data we don't understand; drop it.
        code => {
            r.rest();
            Authentication::Other { code }
        }
    })
}

/// Decodes the field list of an ErrorResponse/NoticeResponse body. Values
/// are decoded lossily: a server's messages may be in a non-UTF-8
/// lc_messages encoding, and an error must never become unreadable.
pub fn parse_error_fields(body: &[u8]) -> Result<ErrorFields> {
    let mut r = Reader::new(body);
    let mut fields = ErrorFields::default();
    let mut saw_v = false;
    loop {
        let code = r.u8("error field list is not terminated")?;
        if code == 0 {
            break;
        }
        let value = String::from_utf8_lossy(r.cstr("error field value")?).into_owned();
        match code {
            // 'V' is never localized, so it wins over 'S' for matching FATAL/PANIC.
            b'V' => {
                fields.severity = value;
                saw_v = true;
            }
            b'S' if !saw_v => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            b'D' => fields.detail = Some(value),
            b'H' => fields.hint = Some(value),
            _ => {}
        }
    }
    r.finish("error response has bytes after its terminator")?;
    Ok(fields)
}

/// The largest length field PostgreSQL puts on a message: it builds each
/// one in a single buffer of at most `MaxAllocSize` (1 GiB − 1) bytes, so
/// no message it sends is longer than 1 GiB plus the length field itself.
pub const MAX_LEN: usize = (1 << 30) + 4;

/// The largest length field accepted on a message other than DataRow,
/// RowDescription, CopyData, ErrorResponse, NoticeResponse,
/// NotificationResponse and FunctionCallResponse: PostgreSQL sends the
/// others short (libpq itself refuses them beyond 30,000 bytes).
pub const MAX_SHORT_LEN: usize = 1 << 20;

/// Checks the header of a message from a server before anything more of
/// it is read: the tag must be one PostgreSQL sends, and the length field
/// (which counts itself) what a message of that type can hold. A server
/// that fails this is out of step with the protocol (a length off by one
/// puts the next header in the middle of a message) or hostile; checking
/// here means a huge or negative length is caught at its header, without
/// waiting for (or buffering) the body it announces.
///
/// `Unexpected` for an unknown tag; `BadLength` for a length below what
/// the message type holds; `TooLarge` above it.
pub fn check_header(tag: u8, len: u32) -> Result<()> {
    let (min, max) = match tag {
        // ParseComplete, BindComplete, CloseComplete, NoData,
        // PortalSuspended, EmptyQueryResponse, CopyDone: no body.
        b'1' | b'2' | b'3' | b'n' | b's' | b'I' | b'c' => (4, 4),
        // ReadyForQuery: the status byte.
        b'Z' => (5, 5),
        b'D' | b'T' | b'd' | b'E' | b'N' | b'A' | b'V' => (4, MAX_LEN),
        // Authentication, ParameterStatus, BackendKeyData, CommandComplete,
        // ParameterDescription, Copy{In,Out,Both}Response,
        // NegotiateProtocolVersion.
        b'R' | b'S' | b'K' | b'C' | b't' | b'G' | b'H' | b'W' | b'v' => (4, MAX_SHORT_LEN),
        got => {
            return Err(Error::Unexpected {
                expected: "a backend message type",
                got,
            })
        }
    };
    if len < min {
        return Err(Error::BadLength { tag, len });
    }
    if len as usize > max {
        return Err(Error::TooLarge { tag, len, max });
    }
    Ok(())
}

/// Decodes a CommandComplete body into its tag ("SELECT 1", ...).
pub fn parse_command_complete(body: &[u8]) -> Result<&str> {
    let mut r = Reader::new(body);
    let tag = r.cstr_utf8("CommandComplete tag")?;
    r.finish("CommandComplete has trailing bytes")?;
    Ok(tag)
}

/// Decodes a RowDescription body into its column names.
pub fn parse_row_description(body: &[u8]) -> Result<Vec<&str>> {
    let mut r = Reader::new(body);
    let n = r.u16("RowDescription column count")?;
    let mut names = Vec::with_capacity(usize::from(n).min(r.rest_len() / 19));
    for _ in 0..n {
        names.push(r.cstr_utf8("RowDescription column name")?);
        // table oid, attnum, type oid, typlen, typmod, format.
        r.take(4 + 2 + 4 + 2 + 4 + 2, "RowDescription column attributes")?;
    }
    r.finish("RowDescription has trailing bytes")?;
    Ok(names)
}

/// Decodes a DataRow body into its values (`None` for NULL).
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>> {
    let mut r = Reader::new(body);
    let n = r.u16("DataRow column count")?;
    let mut values = Vec::with_capacity(usize::from(n).min(r.rest_len() / 4));
    for _ in 0..n {
        let len = r.i32("DataRow value length")?;
        values.push(match len {
            -1 => None,
            n if n < 0 => {
                return Err(Error::Malformed {
                    what: "negative DataRow value length",
                })
            }
            n => Some(r.take(n as usize, "DataRow value")?),
        });
    }
    r.finish("DataRow has trailing bytes")?;
    Ok(values)
}

/// Appends an 'R' message with the given code and extra payload.
fn authentication(buf: &mut BytesMut, code: u32, rest: impl FnOnce(&mut BytesMut)) {
    message(buf, b'R', |b| {
        b.put_u32(code);
        rest(b);
    });
}

/// Appends AuthenticationOk.
pub fn authentication_ok(buf: &mut BytesMut) {
    authentication(buf, auth_code::OK, |_| {});
}

/// Appends AuthenticationCleartextPassword.
pub fn authentication_cleartext(buf: &mut BytesMut) {
    authentication(buf, auth_code::CLEARTEXT, |_| {});
}

/// Appends AuthenticationMD5Password.
pub fn authentication_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    authentication(buf, auth_code::MD5, |b| b.put_slice(&salt));
}

/// Appends AuthenticationSASL offering `mechanisms`.
pub fn authentication_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    authentication(buf, auth_code::SASL, |b| {
        for m in mechanisms {
            put_cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

/// Appends AuthenticationSASLContinue.
pub fn authentication_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    authentication(buf, auth_code::SASL_CONTINUE, |b| b.put_slice(data));
}

/// Appends AuthenticationSASLFinal.
pub fn authentication_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    authentication(buf, auth_code::SASL_FINAL, |b| b.put_slice(data));
}

/// Appends ParameterStatus.
pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

/// Appends BackendKeyData.
pub fn backend_key_data(buf: &mut BytesMut, pid: u32, key: u32) {
    message(buf, b'K', |b| {
        b.put_u32(pid);
        b.put_u32(key);
    });
}

/// Appends ReadyForQuery.
pub fn ready_for_query(buf: &mut BytesMut, status: TransactionStatus) {
    message(buf, b'Z', |b| b.put_u8(status.as_byte()));
}

/// Appends NegotiateProtocolVersion, what PostgreSQL 15+ answers a
/// startup packet asking for a newer minor version than it speaks, or with
/// protocol options (`_pq_.*`) it does not know, before it goes on with the
/// login on the version it offers. `version` is the newest version spoken,
/// as a whole version code (major in the high 16 bits: PostgreSQL sends
/// `PG_PROTOCOL_LATEST`, i.e. [`crate::codec::PROTOCOL_3_0`]); `options`
/// are the names it did not recognize, in the order they came.
pub fn negotiate_protocol_version(buf: &mut BytesMut, version: u32, options: &[&str]) {
    message(buf, b'v', |b| {
        b.put_u32(version);
        b.put_u32(u32::try_from(options.len()).unwrap_or(u32::MAX));
        for name in options {
            put_cstr(b, name.as_bytes());
        }
    });
}

/// Writes the common S/V/C/M fields of an error or notice.
fn put_error_fields(b: &mut BytesMut, severity: &str, code: &str, message_text: &str) {
    b.put_u8(b'S');
    put_cstr(b, severity.as_bytes());
    b.put_u8(b'V');
    put_cstr(b, severity.as_bytes());
    b.put_u8(b'C');
    put_cstr(b, code.as_bytes());
    b.put_u8(b'M');
    put_cstr(b, message_text.as_bytes());
}

/// ErrorResponse with S (and V) severity, C code, M message, optional D detail.
pub fn error_response(
    buf: &mut BytesMut,
    severity: &str,
    code: &str,
    message_text: &str,
    detail: Option<&str>,
) {
    message(buf, b'E', |b| {
        put_error_fields(b, severity, code, message_text);
        if let Some(d) = detail {
            b.put_u8(b'D');
            put_cstr(b, d.as_bytes());
        }
        b.put_u8(0);
    });
}

/// NoticeResponse with S (and V) severity, C code, M message.
pub fn notice_response(buf: &mut BytesMut, severity: &str, code: &str, message_text: &str) {
    message(buf, b'N', |b| {
        put_error_fields(b, severity, code, message_text);
        b.put_u8(0);
    });
}

/// Appends CommandComplete with the given tag ("SELECT 1", "SET"...).
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| put_cstr(b, tag.as_bytes()));
}

/// Appends ParseComplete.
pub fn parse_complete(buf: &mut BytesMut) {
    message(buf, b'1', |_| {});
}

/// Appends BindComplete.
pub fn bind_complete(buf: &mut BytesMut) {
    message(buf, b'2', |_| {});
}

/// Appends ParameterDescription with the given parameter type OIDs.
pub fn parameter_description(buf: &mut BytesMut, types: &[u32]) {
    message(buf, b't', |b| {
        b.put_u16(u16::try_from(types.len()).unwrap_or(u16::MAX));
        for t in types {
            b.put_u32(*t);
        }
    });
}

/// Appends NoData.
pub fn no_data(buf: &mut BytesMut) {
    message(buf, b'n', |_| {});
}

/// Appends EmptyQueryResponse.
pub fn empty_query_response(buf: &mut BytesMut) {
    message(buf, b'I', |_| {});
}

/// Appends a RowDescription with all columns of type text (oid 25), format 0.
pub fn row_description(buf: &mut BytesMut, columns: &[&str]) {
    message(buf, b'T', |b| {
        put_count(b, columns.len());
        for name in columns.iter().take(usize::from(u16::MAX)) {
            put_cstr(b, name.as_bytes());
            b.put_u32(0); // table oid: not from a table
            b.put_u16(0); // column attribute number
            b.put_u32(25); // type oid: text
            b.put_i16(-1); // typlen: variable
            b.put_i32(-1); // typmod: none
            b.put_u16(0); // format: text
        }
    });
}

/// Appends a DataRow of text values (`None` = NULL).
pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    message(buf, b'D', |b| {
        put_count(b, values.len());
        for v in values.iter().take(usize::from(u16::MAX)) {
            put_nullable(b, v.map(str::as_bytes));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{read_frame, DEFAULT_MAX_MESSAGE_LEN};

    fn roundtrip(f: impl FnOnce(&mut BytesMut)) -> (Frame, BackendMessage) {
        let mut b = BytesMut::new();
        f(&mut b);
        let frame = read_frame(&mut b, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert!(b.is_empty(), "builder wrote exactly one frame");
        let msg = BackendMessage::parse(&frame).unwrap();
        (frame, msg)
    }

    #[test]
    fn negotiate_protocol_version_is_what_postgresql_sends() {
        // PostgreSQL 15 to a 3.2 startup with one `_pq_.` option.
        let (frame, msg) = roundtrip(|b| {
            super::negotiate_protocol_version(b, crate::codec::PROTOCOL_3_0, &["_pq_.x"])
        });
        assert_eq!(frame.tag, b'v');
        assert_eq!(&frame.body[..], b"\0\x03\0\0\0\0\0\x01_pq_.x\0");
        assert_eq!(
            msg,
            BackendMessage::NegotiateProtocolVersion {
                minor: crate::codec::PROTOCOL_3_0,
                options: vec!["_pq_.x".into()],
            }
        );
        let mut b = BytesMut::new();
        super::negotiate_protocol_version(&mut b, crate::codec::PROTOCOL_3_0, &[]);
        assert_eq!(&b[..], b"v\0\0\0\x0c\0\x03\0\0\0\0\0\0");
        check_header(b'v', 12).unwrap();
    }

    #[test]
    fn check_header_knows_each_types_lengths() {
        // What the builders write passes.
        let mut b = BytesMut::new();
        authentication_ok(&mut b);
        parameter_status(&mut b, "client_encoding", "UTF8");
        backend_key_data(&mut b, 1, 2);
        ready_for_query(&mut b, TransactionStatus::Idle);
        row_description(&mut b, &["a"]);
        data_row(&mut b, &[Some("1"), None]);
        command_complete(&mut b, "SELECT 1");
        empty_query_response(&mut b);
        error_response(&mut b, "ERROR", "42000", "no", None);
        notice_response(&mut b, "NOTICE", "00000", "hm");
        while !b.is_empty() {
            let frame = read_frame(&mut b, DEFAULT_MAX_MESSAGE_LEN)
                .unwrap()
                .unwrap();
            let len = frame.body.len() as u32 + 4;
            assert_eq!(check_header(frame.tag, len), Ok(()), "{}", frame.tag);
        }
        // Fixed sizes are exact.
        assert_eq!(check_header(b'Z', 5), Ok(()));
        assert_eq!(
            check_header(b'Z', 4),
            Err(Error::BadLength { tag: b'Z', len: 4 })
        );
        assert_eq!(
            check_header(b'Z', 6),
            Err(Error::TooLarge {
                tag: b'Z',
                len: 6,
                max: 5
            })
        );
        for tag in *b"123nsIc" {
            assert_eq!(check_header(tag, 4), Ok(()));
            assert!(matches!(check_header(tag, 5), Err(Error::TooLarge { .. })));
        }
        // Long types up to PostgreSQL's ceiling, short ones to 1 MiB.
        assert_eq!(check_header(b'D', 1 << 30), Ok(()));
        assert_eq!(check_header(b'D', MAX_LEN as u32), Ok(()));
        for len in [MAX_LEN as u32 + 1, 0x7fff_ffff, 0x8000_0000, u32::MAX] {
            assert!(matches!(
                check_header(b'D', len),
                Err(Error::TooLarge { .. })
            ));
        }
        assert_eq!(check_header(b'C', MAX_SHORT_LEN as u32), Ok(()));
        assert!(matches!(
            check_header(b'C', 1 << 30),
            Err(Error::TooLarge { .. })
        ));
        // Below the length field itself, and unknown tags.
        assert_eq!(
            check_header(b'D', 3),
            Err(Error::BadLength { tag: b'D', len: 3 })
        );
        for tag in [0u8, b'!', b'Q', b'X', 0xff] {
            assert!(matches!(
                check_header(tag, 8),
                Err(Error::Unexpected { got, .. }) if got == tag
            ));
        }
    }

    fn auth(f: impl FnOnce(&mut BytesMut)) -> Authentication {
        match roundtrip(f).1 {
            BackendMessage::Authentication(a) => a,
            other => panic!("not authentication: {other:?}"),
        }
    }

    #[test]
    fn authentication_roundtrip() {
        assert_eq!(auth(authentication_ok), Authentication::Ok);
        assert_eq!(
            auth(authentication_cleartext),
            Authentication::CleartextPassword
        );
        assert_eq!(
            auth(|b| authentication_md5(b, [1, 2, 3, 4])),
            Authentication::Md5Password { salt: [1, 2, 3, 4] }
        );
        assert_eq!(
            auth(|b| authentication_sasl(b, &["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"])),
            Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()]
            }
        );
        assert_eq!(
            auth(|b| authentication_sasl_continue(b, b"r=x,s=y,i=1")),
            Authentication::SaslContinue {
                data: Bytes::from_static(b"r=x,s=y,i=1")
            }
        );
        assert_eq!(
            auth(|b| authentication_sasl_final(b, b"v=abc")),
            Authentication::SaslFinal {
                data: Bytes::from_static(b"v=abc")
            }
        );
        // GSS (7) with some continuation data.
        let frame = Frame {
            tag: b'R',
            body: Bytes::from_static(b"\0\0\0\x07abc"),
        };
        assert_eq!(
            BackendMessage::parse(&frame),
            Ok(BackendMessage::Authentication(Authentication::Other {
                code: 7
            }))
        );
    }

    #[test]
    fn status_messages_roundtrip() {
        assert_eq!(
            roundtrip(|b| parameter_status(b, "server_version", "16.2")).1,
            BackendMessage::ParameterStatus {
                name: "server_version".into(),
                value: "16.2".into()
            }
        );
        assert_eq!(
            roundtrip(|b| backend_key_data(b, 1234, 0xffff_ffff)).1,
            BackendMessage::BackendKeyData {
                pid: 1234,
                key: 0xffff_ffff
            }
        );
        for s in [
            TransactionStatus::Idle,
            TransactionStatus::InTransaction,
            TransactionStatus::Failed,
        ] {
            assert_eq!(TransactionStatus::from_byte(s.as_byte()), Ok(s));
            assert_eq!(
                roundtrip(|b| ready_for_query(b, s)).1,
                BackendMessage::ReadyForQuery(s)
            );
        }
        assert!(TransactionStatus::from_byte(b'X').is_err());
    }

    #[test]
    fn error_and_notice_roundtrip() {
        assert_eq!(
            roundtrip(|b| error_response(b, "FATAL", "28P01", "bad password", Some("why"))).1,
            BackendMessage::ErrorResponse(ErrorFields {
                severity: "FATAL".into(),
                code: "28P01".into(),
                message: "bad password".into(),
                detail: Some("why".into()),
                hint: None,
            })
        );
        assert_eq!(
            roundtrip(|b| notice_response(b, "NOTICE", "00000", "hello")).1,
            BackendMessage::NoticeResponse(ErrorFields {
                severity: "NOTICE".into(),
                code: "00000".into(),
                message: "hello".into(),
                detail: None,
                hint: None,
            })
        );
        // Localized S, non-localized V, hint, unknown fields, bad UTF-8.
        let body = b"SFATAL-ish\0VFATAL\0C57P01\0Mbye \xff\0Hhint\0Xignored\0\0";
        let f = parse_error_fields(body).unwrap();
        assert_eq!(f.severity, "FATAL");
        assert_eq!(f.message, "bye \u{fffd}");
        assert_eq!(f.hint.as_deref(), Some("hint"));
        assert!(parse_error_fields(b"SERROR\0").is_err());
        assert!(parse_error_fields(b"SERROR").is_err());
    }

    #[test]
    fn negotiate_protocol_version() {
        let mut body = Vec::new();
        body.extend_from_slice(&0u32.to_be_bytes());
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(b"_pq_.foo\0");
        let frame = Frame {
            tag: b'v',
            body: body.into(),
        };
        assert_eq!(
            BackendMessage::parse(&frame),
            Ok(BackendMessage::NegotiateProtocolVersion {
                minor: 0,
                options: vec!["_pq_.foo".into()]
            })
        );
        // A huge declared option count with no data must fail, not allocate.
        let frame = Frame {
            tag: b'v',
            body: Bytes::from_static(b"\0\0\0\0\xff\xff\xff\xff"),
        };
        assert!(BackendMessage::parse(&frame).is_err());
    }

    #[test]
    fn relayed_messages_roundtrip() {
        let (f, m) = roundtrip(|b| command_complete(b, "SELECT 1"));
        assert_eq!(m, BackendMessage::Other { tag: b'C' });
        assert_eq!(parse_command_complete(&f.body), Ok("SELECT 1"));

        let (f, m) = roundtrip(empty_query_response);
        assert_eq!((m, f.body.len()), (BackendMessage::Other { tag: b'I' }, 0));

        let (f, m) = roundtrip(|b| row_description(b, &["a", "bb"]));
        assert_eq!(m, BackendMessage::Other { tag: b'T' });
        assert_eq!(parse_row_description(&f.body), Ok(vec!["a", "bb"]));

        let (f, m) = roundtrip(|b| data_row(b, &[Some("1"), None, Some("")]));
        assert_eq!(m, BackendMessage::Other { tag: b'D' });
        assert_eq!(
            parse_data_row(&f.body),
            Ok(vec![Some(&b"1"[..]), None, Some(&b""[..])])
        );
    }

    #[test]
    fn malformed_bodies() {
        let frame = |tag: u8, body: &'static [u8]| Frame {
            tag,
            body: Bytes::from_static(body),
        };
        for (tag, body) in [
            (b'R', &b"\0\0"[..]),
            (b'R', b"\0\0\0\x05\x01"),
            (b'R', b"\0\0\0\x00x"),
            (b'R', b"\0\0\0\x0aSCRAM"),
            (b'S', b"name\0"),
            (b'K', b"\0\0\0\x01"),
            (b'K', b"\0\0\0\x01\0\0\0\x02\0"),
            (b'Z', b""),
            (b'Z', b"Q"),
            (b'E', b""),
        ] {
            assert!(
                BackendMessage::parse(&frame(tag, body)).is_err(),
                "{} {body:?}",
                tag as char
            );
        }
    }
}
