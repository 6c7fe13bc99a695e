//! The startup packet target: the bytes a client sends first.

use bytes::{BufMut, BytesMut};

use crate::codec::{self, read_startup, Startup, MAX_STARTUP_LEN};
use crate::error::Error;
use crate::frontend;

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

pub(super) fn startup_seeds() -> Vec<Vec<u8>> {
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
