//! Framing: cutting whole messages off a receive buffer.
//!
//! Every message after startup is `tag: u8, len: i32, body` where `len`
//! counts itself but not the tag. Startup-phase packets have no tag.

use bytes::{Bytes, BytesMut};

use crate::error::{Error, Result};
use crate::util::Reader;

/// Largest startup packet accepted, like PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Default limit on a tagged message's declared length (1 GiB, PostgreSQL's
/// own ceiling for a single field).
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 1 << 30;

/// Protocol 3.0 as sent in a startup packet.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// Startup code of an SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Startup code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Startup code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;

/// One complete tagged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The message type byte.
    pub tag: u8,
    /// The payload, excluding tag and length.
    pub body: Bytes,
}

impl Frame {
    /// Length of the frame on the wire (tag + length + body).
    pub fn wire_len(&self) -> usize {
        5 + self.body.len()
    }
}

/// Looks at the 5-byte header without consuming: `Ok(Some((tag,
/// total_len_including_tag)))` once 5 bytes are there; validates the length
/// like [`read_frame`].
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>> {
    let Some(&[tag, a, b, c, d]) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]);
    // Validate before the body arrives, so a hostile length is rejected
    // without buffering (or waiting for) anything more.
    if len < 4 {
        return Err(Error::BadLength { tag, len });
    }
    if len as usize > max_len {
        return Err(Error::TooLarge {
            tag,
            len,
            max: max_len,
        });
    }
    Ok(Some((tag, len as usize + 1)))
}

/// [`peek_header`] for a client's input after login: the type byte is
/// judged first, as PostgreSQL does (`SocketBackend` reads the type and
/// refuses an unknown one before it reads any length), so a client out of
/// step gets `UnknownFrontendType` as soon as one byte is there, and a
/// garbage length behind a garbage type is never believed.
pub fn peek_frontend_header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>> {
    if let Some(&tag) = buf.first() {
        if !crate::frontend::is_known_type(tag) {
            return Err(Error::UnknownFrontendType { tag });
        }
    }
    peek_header(buf, max_len)
}

/// Cuts one complete tagged message off the front of buf. Ok(None) = need
/// more bytes (buf untouched).
pub fn read_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>> {
    let Some((tag, total)) = peek_header(buf, max_len)? else {
        return Ok(None);
    };
    // No reserve() for the missing part: the length is peer-controlled and
    // up to max_len, so pre-allocating would let a peer make us allocate
    // without sending anything.
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let _ = frame.split_to(5);
    Ok(Some(Frame {
        tag,
        body: frame.freeze(),
    }))
}

/// A packet of the untagged startup phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// StartupMessage, protocol 3.x; params in wire order, always with "user".
    Startup {
        /// Major version (always 3).
        major: u16,
        /// Minor version requested (the server may negotiate it down).
        minor: u16,
        /// Parameter name/value pairs in the order sent.
        params: Vec<(String, String)>,
    },
    /// SSLRequest.
    SslRequest,
    /// GSSENCRequest.
    GssEncRequest,
    /// CancelRequest.
    Cancel {
        /// Process id of the backend to cancel.
        pid: u32,
        /// Secret key from BackendKeyData.
        key: u32,
    },
}

impl Startup {
    /// Value of a startup parameter, if present (first occurrence).
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Self::Startup { params, .. } => params
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    /// The protocol options of a StartupMessage: its parameters named
    /// `_pq_.*`, in the order sent. PostgreSQL knows none of them (up to
    /// 17) and lists them in its NegotiateProtocolVersion.
    pub fn protocol_options(&self) -> Vec<&str> {
        match self {
            Self::Startup { params, .. } => params
                .iter()
                .map(|(n, _)| n.as_str())
                .filter(|n| n.starts_with("_pq_."))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Untagged startup-phase packet (int32 length incl. itself, int32 code).
/// len < 8 -> BadLength{tag:0,..}; len > MAX_STARTUP_LEN -> TooLarge{tag:0,..};
/// version major != 3 (and not a special code) -> UnsupportedProtocol.
pub fn read_startup(buf: &mut BytesMut) -> Result<Option<Startup>> {
    let Some(&[a, b, c, d]) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]);
    if len < 8 {
        return Err(Error::BadLength { tag: 0, len });
    }
    if len as usize > MAX_STARTUP_LEN {
        return Err(Error::TooLarge {
            tag: 0,
            len,
            max: MAX_STARTUP_LEN,
        });
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let packet = buf.split_to(len).freeze();
    parse_startup_body(&packet[4..]).map(Some)
}

/// Decodes a startup packet after its length word.
fn parse_startup_body(body: &[u8]) -> Result<Startup> {
    let mut r = Reader::new(body);
    let code = r.u32("startup packet code")?;
    match code {
        SSL_REQUEST_CODE => {
            r.finish("SSLRequest has trailing bytes")?;
            return Ok(Startup::SslRequest);
        }
        GSSENC_REQUEST_CODE => {
            r.finish("GSSENCRequest has trailing bytes")?;
            return Ok(Startup::GssEncRequest);
        }
        CANCEL_REQUEST_CODE => {
            let pid = r.u32("CancelRequest must be 16 bytes")?;
            let key = r.u32("CancelRequest must be 16 bytes")?;
            r.finish("CancelRequest must be 16 bytes")?;
            return Ok(Startup::Cancel { pid, key });
        }
        _ => {}
    }
    let major = (code >> 16) as u16;
    let minor = (code & 0xffff) as u16;
    if major != 3 {
        return Err(Error::UnsupportedProtocol { major, minor });
    }
    // Pairs of NUL-terminated name/value, ended by an empty name; PostgreSQL
    // requires that terminator to be the packet's last byte.
    let mut params = Vec::new();
    loop {
        let name = r.cstr_utf8("startup parameter name")?;
        if name.is_empty() {
            break;
        }
        let value = r.cstr_utf8("startup parameter value")?;
        params.push((name.to_owned(), value.to_owned()));
    }
    r.finish("startup packet has bytes after its terminator")?;
    if !params.iter().any(|(n, _)| n == "user") {
        return Err(Error::Malformed {
            what: "startup packet has no user",
        });
    }
    Ok(Startup::Startup {
        major,
        minor,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend;
    use bytes::BufMut;

    fn messages() -> BytesMut {
        let mut b = BytesMut::new();
        frontend::query(&mut b, "select 1");
        frontend::sync(&mut b);
        frontend::parse(&mut b, "s1", "select $1", &[23]);
        frontend::copy_data(&mut b, b"");
        b
    }

    #[test]
    fn frontend_header_judges_the_type_before_the_length() {
        // One byte is enough to refuse, whatever length would follow.
        assert_eq!(
            peek_frontend_header(b"z", 100),
            Err(Error::UnknownFrontendType { tag: b'z' })
        );
        assert_eq!(
            peek_frontend_header(b"\xff\0\0\0\0", 100),
            Err(Error::UnknownFrontendType { tag: 0xff })
        );
        // A password message is a login-phase message only.
        assert!(peek_frontend_header(b"p\0\0\0\x05x", 100).is_err());
        assert_eq!(peek_frontend_header(b"S", 100), Ok(None));
        assert_eq!(
            peek_frontend_header(b"d\0\0\0\x04", 100),
            Ok(Some((b'd', 5)))
        );
        // A known type still has its length checked.
        assert_eq!(
            peek_frontend_header(b"Q\0\0\0\x01", 100),
            Err(Error::BadLength { tag: b'Q', len: 1 })
        );
    }

    #[test]
    fn several_messages_in_one_buffer() {
        let mut b = messages();
        let f = read_frame(&mut b, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(&f.body[..], b"select 1\0");
        assert_eq!(f.wire_len(), 14);
        let f = read_frame(&mut b, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert_eq!((f.tag, f.body.len()), (b'S', 0));
        let f = read_frame(&mut b, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(f.tag, b'P');
        let f = read_frame(&mut b, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert_eq!((f.tag, f.body.len()), (b'd', 0));
        assert!(b.is_empty());
        assert_eq!(read_frame(&mut b, DEFAULT_MAX_MESSAGE_LEN).unwrap(), None);
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let all = messages().freeze();
        let expected: Vec<Frame> = {
            let mut b = BytesMut::from(&all[..]);
            std::iter::from_fn(|| read_frame(&mut b, 1024).unwrap()).collect()
        };
        assert_eq!(expected.len(), 4);
        for cut in 0..=all.len() {
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for chunk in [&all[..cut], &all[cut..]] {
                buf.extend_from_slice(chunk);
                loop {
                    let before = buf.len();
                    match read_frame(&mut buf, 1024).unwrap() {
                        Some(f) => got.push(f),
                        None => {
                            // Incomplete frames must leave the buffer untouched.
                            assert_eq!(buf.len(), before);
                            break;
                        }
                    }
                }
            }
            assert_eq!(got, expected, "cut at {cut}");
            assert!(buf.is_empty());
        }
        // And byte by byte.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &byte in all.iter() {
            buf.put_u8(byte);
            while let Some(f) = read_frame(&mut buf, 1024).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, expected);
    }

    #[test]
    fn bad_lengths_rejected_from_header_alone() {
        for len in 0..4u32 {
            let mut b = BytesMut::new();
            b.put_u8(b'Q');
            b.put_u32(len);
            assert_eq!(
                read_frame(&mut b, 1024),
                Err(Error::BadLength { tag: b'Q', len })
            );
        }
        // Oversized: only the header is present, the error comes at once.
        let mut b = BytesMut::new();
        b.put_u8(b'd');
        b.put_u32(1025);
        assert_eq!(
            read_frame(&mut b, 1024),
            Err(Error::TooLarge {
                tag: b'd',
                len: 1025,
                max: 1024
            })
        );
        assert_eq!(
            peek_header(&b, 1024),
            Err(Error::TooLarge {
                tag: b'd',
                len: 1025,
                max: 1024
            })
        );
        // u32::MAX must not overflow anything.
        let mut b = BytesMut::from(&[b'd', 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            read_frame(&mut b, DEFAULT_MAX_MESSAGE_LEN),
            Err(Error::TooLarge { .. })
        ));
        // Exactly at the limit is fine, and just waits for the body.
        let mut b = BytesMut::new();
        b.put_u8(b'd');
        b.put_u32(1024);
        assert_eq!(read_frame(&mut b, 1024), Ok(None));
        assert_eq!(peek_header(&b, 1024), Ok(Some((b'd', 1025))));
        assert_eq!(peek_header(&b[..4], 1024), Ok(None));
    }

    fn startup_bytes(params: &[(&str, &str)]) -> BytesMut {
        let mut b = BytesMut::new();
        frontend::startup(&mut b, params);
        b
    }

    #[test]
    fn startup_normal() {
        let all = startup_bytes(&[("user", "alice"), ("database", "db"), ("options", "")]);
        let expected = Startup::Startup {
            major: 3,
            minor: 0,
            params: vec![
                ("user".into(), "alice".into()),
                ("database".into(), "db".into()),
                ("options".into(), String::new()),
            ],
        };
        for cut in 0..all.len() {
            let mut b = BytesMut::from(&all[..cut]);
            assert_eq!(read_startup(&mut b), Ok(None));
            assert_eq!(b.len(), cut);
        }
        let mut b = all.clone();
        b.extend_from_slice(b"Qtrailing");
        let s = read_startup(&mut b).unwrap().unwrap();
        assert_eq!(s, expected);
        assert_eq!(s.param("database"), Some("db"));
        assert_eq!(&b[..], b"Qtrailing");
    }

    #[test]
    fn startup_special_codes() {
        let mut b = BytesMut::new();
        frontend::ssl_request(&mut b);
        b.put_u32(8);
        b.put_u32(GSSENC_REQUEST_CODE);
        frontend::cancel_request(&mut b, 42, 0xdead_beef);
        assert_eq!(read_startup(&mut b), Ok(Some(Startup::SslRequest)));
        assert_eq!(read_startup(&mut b), Ok(Some(Startup::GssEncRequest)));
        assert_eq!(
            read_startup(&mut b),
            Ok(Some(Startup::Cancel {
                pid: 42,
                key: 0xdead_beef
            }))
        );
        assert!(b.is_empty());

        // A cancel request of the wrong size is malformed.
        let mut b = BytesMut::new();
        b.put_u32(12);
        b.put_u32(CANCEL_REQUEST_CODE);
        b.put_u32(1);
        assert!(matches!(read_startup(&mut b), Err(Error::Malformed { .. })));
    }

    #[test]
    fn startup_wrong_versions() {
        let mut b = BytesMut::new();
        b.put_u32(8);
        b.put_u32(2 << 16);
        assert_eq!(
            read_startup(&mut b),
            Err(Error::UnsupportedProtocol { major: 2, minor: 0 })
        );
        let mut b = BytesMut::new();
        b.put_u32(8);
        // 1234.5679 itself is the SSLRequest code; any other 1234.x is not
        // a special code and must be refused as a protocol version.
        b.put_u32((1234 << 16) | 5681);
        assert_eq!(
            read_startup(&mut b),
            Err(Error::UnsupportedProtocol {
                major: 1234,
                minor: 5681
            })
        );
        // The SSLRequest code with a body is not an SSLRequest.
        let mut b = BytesMut::new();
        b.put_u32(12);
        b.put_u32((1234 << 16) | 5679);
        b.put_u32(0);
        assert!(matches!(read_startup(&mut b), Err(Error::Malformed { .. })));
        // 3.2 is passed through for the caller to negotiate, with its
        // protocol options.
        let mut b = BytesMut::new();
        b.put_u32(35);
        b.put_u32((3 << 16) | 2);
        b.put_slice(b"user\0bob\0_pq_.a\0x\0_pq_.b\0\0\0");
        let s = read_startup(&mut b).unwrap().unwrap();
        assert!(matches!(
            s,
            Startup::Startup {
                major: 3,
                minor: 2,
                ..
            }
        ));
        assert_eq!(s.protocol_options(), vec!["_pq_.a", "_pq_.b"]);
        assert!(Startup::SslRequest.protocol_options().is_empty());
    }

    #[test]
    fn startup_bad_bodies() {
        let mut b = startup_bytes(&[("database", "db")]);
        assert_eq!(
            read_startup(&mut b),
            Err(Error::Malformed {
                what: "startup packet has no user"
            })
        );
        // Missing final terminator.
        let mut b = BytesMut::new();
        b.put_u32(17);
        b.put_u32(PROTOCOL_3_0);
        b.put_slice(b"user\0bob\0");
        assert!(matches!(read_startup(&mut b), Err(Error::Malformed { .. })));
        // Bytes after the terminator.
        let mut b = BytesMut::new();
        b.put_u32(19);
        b.put_u32(PROTOCOL_3_0);
        b.put_slice(b"user\0bob\0\0x");
        assert!(matches!(read_startup(&mut b), Err(Error::Malformed { .. })));
        // Invalid UTF-8.
        let mut b = BytesMut::new();
        b.put_u32(17);
        b.put_u32(PROTOCOL_3_0);
        b.put_slice(b"user\0b\xff\0\0");
        assert!(matches!(read_startup(&mut b), Err(Error::Malformed { .. })));
    }

    #[test]
    fn startup_bad_lengths() {
        for len in 0..8u32 {
            let mut b = BytesMut::new();
            b.put_u32(len);
            assert_eq!(read_startup(&mut b), Err(Error::BadLength { tag: 0, len }));
        }
        let mut b = BytesMut::new();
        b.put_u32(10_001);
        assert_eq!(
            read_startup(&mut b),
            Err(Error::TooLarge {
                tag: 0,
                len: 10_001,
                max: MAX_STARTUP_LEN
            })
        );
        // A big but legal packet is accepted.
        let long = "x".repeat(9_000);
        let mut b = startup_bytes(&[("user", "u"), ("application_name", &long)]);
        assert!(read_startup(&mut b).unwrap().is_some());
        let long = "x".repeat(10_000);
        let mut b = startup_bytes(&[("user", "u"), ("application_name", &long)]);
        assert!(matches!(read_startup(&mut b), Err(Error::TooLarge { .. })));
    }
}
