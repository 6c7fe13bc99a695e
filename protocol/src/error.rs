//! The crate's error type.

use std::fmt;

/// Everything that can go wrong while decoding protocol bytes or running an
/// authentication exchange.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Declared length is smaller than the header itself (< 4, or < 8 for startup).
    BadLength {
        /// Message tag (0 for untagged startup packets).
        tag: u8,
        /// The declared length.
        len: u32,
    },
    /// Declared length is beyond the configured limit.
    TooLarge {
        /// Message tag (0 for untagged startup packets).
        tag: u8,
        /// The declared length.
        len: u32,
        /// The limit it exceeded.
        max: usize,
    },
    /// Startup packet with a protocol version other than 3.x or a known special code.
    UnsupportedProtocol {
        /// Major version requested.
        major: u16,
        /// Minor version requested.
        minor: u16,
    },
    /// A message body that does not parse.
    Malformed {
        /// What was wrong.
        what: &'static str,
    },
    /// A message tag that is not valid at this point.
    Unexpected {
        /// What was expected instead.
        expected: &'static str,
        /// The tag received.
        got: u8,
    },
    /// A message type PostgreSQL never accepts from a client after login
    /// (see [`crate::frontend::is_known_type`]).
    UnknownFrontendType {
        /// The tag received.
        tag: u8,
    },
    /// SCRAM or md5 exchange failure.
    Auth {
        /// What failed.
        what: &'static str,
    },
}

/// Result alias with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Renders a tag readably: printable ASCII as a quoted char, else as hex.
struct Tag(u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", self.0 as char)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadLength { tag, len } => {
                write!(f, "invalid message length {len} for message {}", Tag(*tag))
            }
            Self::TooLarge { tag, len, max } => write!(
                f,
                "message {} length {len} exceeds the limit of {max} bytes",
                Tag(*tag)
            ),
            Self::UnsupportedProtocol { major, minor } => {
                write!(f, "unsupported frontend protocol {major}.{minor}")
            }
            Self::Malformed { what } => write!(f, "malformed message: {what}"),
            Self::Unexpected { expected, got } => {
                write!(f, "unexpected message {}, expected {expected}", Tag(*got))
            }
            // PostgreSQL's own words (postgres.c), the type as a decimal
            // number, so clients see what a direct connection would say.
            Self::UnknownFrontendType { tag } => {
                write!(f, "invalid frontend message type {tag}")
            }
            Self::Auth { what } => write!(f, "authentication error: {what}"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_mentions_context() {
        let e = Error::TooLarge {
            tag: b'Q',
            len: 99,
            max: 10,
        };
        assert_eq!(
            e.to_string(),
            "message 'Q' length 99 exceeds the limit of 10 bytes"
        );
        let e = Error::Unexpected {
            expected: "frontend message",
            got: 0,
        };
        assert!(e.to_string().contains("0x00"));
        let e = Error::UnknownFrontendType { tag: 0xff };
        assert_eq!(e.to_string(), "invalid frontend message type 255");
    }
}
