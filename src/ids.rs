//! Connection ids: a uuid per client and server connection, shown as
//! `c<hex>` / `s<hex>` (Odyssey's style) in every log line and in every
//! error the pooler itself sends.

use std::fmt;

use uuid::Uuid;

/// The id of one connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnId {
    kind: u8,
    uuid: Uuid,
}

impl ConnId {
    /// A fresh client id.
    pub(crate) fn client() -> Self {
        Self {
            kind: b'c',
            uuid: Uuid::new_v4(),
        }
    }

    /// A fresh server id.
    pub(crate) fn server() -> Self {
        Self {
            kind: b's',
            uuid: Uuid::new_v4(),
        }
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.kind as char, self.uuid.simple())
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
