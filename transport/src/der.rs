//! Just enough DER to read the common name out of an X.509 certificate:
//! the certificate has been verified by rustls already, so this only walks
//! to the subject and never trusts a length it has not checked.
//!
//! ```text
//! Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
//! TBSCertificate ::= SEQUENCE {
//!     version [0] EXPLICIT OPTIONAL, serialNumber INTEGER,
//!     signature SEQUENCE, issuer Name, validity SEQUENCE, subject Name, ... }
//! Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value DirectoryString }
//! ```

const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const TELETEX_STRING: u8 = 0x14;
const IA5_STRING: u8 = 0x16;
const UNIVERSAL_STRING: u8 = 0x1c;
const BMP_STRING: u8 = 0x1e;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const VERSION: u8 = 0xa0;
/// id-at-commonName, 2.5.4.3.
const CN_OID: &[u8] = &[0x55, 0x04, 0x03];

/// One tag-length-value from the front of `input`: (tag, value, rest).
/// `None` on truncation, on the indefinite length (BER, not DER), on
/// lengths past 4 bytes and on multi-byte tags (none is walked here).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    Some((tag, value, rest))
}

/// Like [`tlv`], but the tag must be `want`.
fn expect(input: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    match tlv(input)? {
        (tag, value, rest) if tag == want => Some((value, rest)),
        _ => None,
    }
}

/// The first common name (CN) in the subject of a DER certificate, as
/// PostgreSQL's `clientcert=verify-full` reads it. `None` when there is
/// none, when the certificate does not parse, or when the name holds a NUL
/// (which could make `"alice\0x"` pass for `"alice"` downstream).
pub(crate) fn common_name(cert: &[u8]) -> Option<String> {
    let (cert, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if let (VERSION, _, after) = tlv(rest)? {
        rest = after;
    }
    // serialNumber, signature, issuer, validity.
    for want in [INTEGER, SEQUENCE, SEQUENCE, SEQUENCE] {
        rest = expect(rest, want)?.1;
    }
    let (mut rdns, _) = expect(rest, SEQUENCE)?;
    while !rdns.is_empty() {
        let (mut attrs, after) = expect(rdns, SET)?;
        rdns = after;
        while !attrs.is_empty() {
            let (attr, after) = expect(attrs, SEQUENCE)?;
            attrs = after;
            let (oid, value) = expect(attr, OID)?;
            if oid == CN_OID {
                let (tag, value, _) = tlv(value)?;
                return directory_string(tag, value);
            }
        }
    }
    None
}

/// Decodes the string types a DirectoryString may be.
fn directory_string(tag: u8, value: &[u8]) -> Option<String> {
    let s = match tag {
        UTF8_STRING | PRINTABLE_STRING | IA5_STRING => String::from_utf8(value.to_vec()).ok()?,
        // T.61 is in practice Latin-1 (OpenSSL reads it so too).
        TELETEX_STRING => value.iter().map(|&b| char::from(b)).collect(),
        BMP_STRING => {
            let pairs = value.chunks_exact(2);
            if !pairs.remainder().is_empty() {
                return None;
            }
            let units = pairs.map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()?
        }
        UNIVERSAL_STRING => {
            let quads = value.chunks_exact(4);
            if !quads.remainder().is_empty() {
                return None;
            }
            quads
                .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                .collect::<Option<String>>()?
        }
        _ => return None,
    };
    if s.contains('\0') {
        return None;
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with_dn(dn: rcgen::DistinguishedName) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name = dn;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn finds_the_common_name_among_other_attributes() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CountryName, "FR");
        dn.push(rcgen::DnType::OrganizationName, "Odissey");
        dn.push(rcgen::DnType::CommonName, "alice");
        dn.push(rcgen::DnType::OrganizationalUnitName, "ops");
        assert_eq!(common_name(&cert_with_dn(dn)).as_deref(), Some("alice"));
    }

    #[test]
    fn reads_utf8_and_printable_names() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "Jérôme Ünïcødé");
        assert_eq!(
            common_name(&cert_with_dn(dn)).as_deref(),
            Some("Jérôme Ünïcødé")
        );
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(
            rcgen::DnType::CommonName,
            rcgen::DnValue::PrintableString("bob".try_into().unwrap()),
        );
        assert_eq!(common_name(&cert_with_dn(dn)).as_deref(), Some("bob"));
    }

    #[test]
    fn no_common_name_is_none() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, "Odissey");
        assert_eq!(common_name(&cert_with_dn(dn)), None);
        assert_eq!(
            common_name(&cert_with_dn(rcgen::DistinguishedName::new())),
            None
        );
    }

    #[test]
    fn truncated_or_garbled_certificates_do_not_panic() {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "alice");
        let der = cert_with_dn(dn);
        for len in 0..der.len() {
            // The outer lengths no longer fit: nothing may be read.
            assert_eq!(common_name(&der[..len]), None, "truncated at {len}");
        }
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            let _ = common_name(&bad);
        }
        assert_eq!(common_name(&[0x30, 0x80, 0x00, 0x00]), None);
        assert_eq!(common_name(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
    }

    #[test]
    fn decodes_wide_strings_and_refuses_nul() {
        assert_eq!(
            directory_string(BMP_STRING, &[0, b'a', 0x00, 0xe9]).as_deref(),
            Some("aé")
        );
        assert_eq!(directory_string(BMP_STRING, &[0, b'a', 0]), None);
        assert_eq!(
            directory_string(UNIVERSAL_STRING, &[0, 0, 0, b'z', 0, 1, 0xf6, 0x00]).as_deref(),
            Some("z\u{1f600}")
        );
        assert_eq!(
            directory_string(TELETEX_STRING, &[b'a', 0xe9]).as_deref(),
            Some("aé")
        );
        assert_eq!(directory_string(UTF8_STRING, b"ali\0ce"), None);
        assert_eq!(directory_string(UTF8_STRING, &[0xff]), None);
        assert_eq!(directory_string(0x04, b"octets"), None);
    }
}
