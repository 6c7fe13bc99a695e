//! Small helpers shared by the parsers and builders.

use bytes::{BufMut, BytesMut};

use crate::error::{Error, Result};

/// Bounds-checked cursor over a message body; every read fails with
/// `Malformed` instead of panicking, because bodies come from peers.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading at the front of `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Takes exactly `n` bytes.
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Malformed { what });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Reads one byte.
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8> {
        let b = self.take(1, what)?;
        Ok(b[0])
    }

    /// Reads a big-endian 16-bit integer.
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Reads a big-endian 32-bit integer.
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a big-endian signed 32-bit integer.
    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32> {
        self.u32(what).map(|v| v as i32)
    }

    /// Reads a NUL-terminated string, returning it without the NUL.
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(Error::Malformed { what })?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// Reads a NUL-terminated UTF-8 string.
    pub(crate) fn cstr_utf8(&mut self, what: &'static str) -> Result<&'a str> {
        let s = self.cstr(what)?;
        std::str::from_utf8(s).map_err(|_| Error::Malformed { what })
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Number of bytes not read yet; caps pre-allocation by declared counts.
    pub(crate) fn rest_len(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless everything has been read: PostgreSQL rejects messages
    /// with trailing garbage too (pq_getmsgend), and so do we.
    pub(crate) fn finish(&self, what: &'static str) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::Malformed { what })
        }
    }
}

/// Appends a tagged message: tag, then a length back-patched once `body`
/// has written the payload, so callers never compute lengths by hand.
pub(crate) fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    untagged(buf, body);
}

/// Appends an untagged (startup-phase) packet with a back-patched length.
pub(crate) fn untagged(buf: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let start = buf.len();
    buf.put_u32(0);
    body(buf);
    // Lengths beyond i32 are not representable on the wire; saturating keeps
    // the builder panic-free and the peer will reject the frame.
    let len = u32::try_from(buf.len() - start)
        .unwrap_or(u32::MAX)
        .min(i32::MAX as u32);
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a NUL-terminated string. An interior NUL would make the frame
/// misparse on the other side, so the string is cut at the first NUL: the
/// peer would have stopped reading there anyway.
pub(crate) fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    buf.put_slice(&s[..end]);
    buf.put_u8(0);
}

/// Appends an int32 length (-1 for NULL) followed by the value.
pub(crate) fn put_nullable(buf: &mut BytesMut, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            buf.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
            buf.put_slice(v);
        }
        None => buf.put_i32(-1),
    }
}

/// Appends an int16 count; counts above the wire limit are clamped (the
/// server rejects such messages anyway) rather than wrapping silently.
pub(crate) fn put_count(buf: &mut BytesMut, n: usize) {
    buf.put_u16(u16::try_from(n).unwrap_or(u16::MAX));
}

/// Compares two byte strings without an early exit, so timing does not
/// reveal how many leading bytes of a secret matched.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimizer from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Lower-case hex encoding.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_is_bounds_checked() {
        let mut r = Reader::new(b"ab\0\x00\x01");
        assert_eq!(r.cstr("s").unwrap(), b"ab");
        assert!(r.u32("n").is_err());
        assert_eq!(r.u16("n").unwrap(), 1);
        assert_eq!(r.rest_len(), 0);
        assert!(r.u8("b").is_err());
        assert!(Reader::new(b"no nul").cstr("s").is_err());
    }

    #[test]
    fn ct_eq_and_hex() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert_eq!(hex(&[0x00, 0xaf, 0x10]), "00af10");
    }

    #[test]
    fn cstr_cut_at_interior_nul() {
        let mut b = BytesMut::new();
        put_cstr(&mut b, b"a\0b");
        assert_eq!(&b[..], b"a\0");
    }
}
