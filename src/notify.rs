//! LISTEN/NOTIFY in transaction pooling, the shared part (sans-IO).
//!
//! A client's LISTEN cannot live on the server it holds for one
//! transaction: the next transaction runs elsewhere. So odissey listens
//! itself. Per (storage, host, database) with at least one listening
//! client there is one [`Hub`]: worker 0 keeps one dedicated server
//! connection for it (`worker::listen`, outside every pool) that LISTENs to
//! every channel some client listens to. What it receives goes into the
//! channel's [`Ring`], a bounded buffer with one producer (that
//! connection) and one cursor per listening client, on whatever worker:
//! a client ten notifications behind and one caught up share one copy.
//! A client whose cursor falls out of the ring (it does not read) is told
//! how many it missed, never holds memory beyond the ring's bounds.
//!
//! Also here: reading a client's `LISTEN`/`UNLISTEN` statements
//! ([`parse_listen`]) so that they are answered without a server.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};

/// Which upstream a listening client's channels live on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct HubKey {
    pub(crate) storage: Arc<str>,
    /// The host's label (`host:port`).
    pub(crate) host: Arc<str>,
    /// The server database.
    pub(crate) database: Arc<str>,
}

/// One upstream's channels.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) key: HubKey,
    channels: Mutex<HashMap<Arc<str>, Arc<Channel>>>,
    workers: usize,
    max_items: usize,
    max_bytes: usize,
}

/// One channel of a hub.
#[derive(Debug)]
pub(crate) struct Channel {
    pub(crate) name: Arc<str>,
    ring: Mutex<Ring>,
    /// Clients listening, per worker (the producer wakes only workers with
    /// some).
    listeners: Box<[AtomicUsize]>,
    /// The upstream LISTEN is in effect: notifications are being received.
    pub(crate) active: AtomicBool,
    /// A LISTEN was asked of worker 0 and not yet confirmed.
    pub(crate) requested: AtomicBool,
    /// Notifications delivered to clients, and clients that fell behind.
    pub(crate) delivered: AtomicU64,
    pub(crate) overrun: AtomicU64,
}

/// Notifications of a channel, oldest first, as whole NotificationResponse
/// frames; `next` numbers the next one pushed.
#[derive(Debug)]
pub(crate) struct Ring {
    items: VecDeque<Bytes>,
    bytes: usize,
    next: u64,
    max_items: usize,
    max_bytes: usize,
}

impl Ring {
    pub(crate) fn new(max_items: usize, max_bytes: usize) -> Self {
        Self {
            items: VecDeque::new(),
            bytes: 0,
            next: 0,
            max_items: max_items.max(1),
            max_bytes: max_bytes.max(1),
        }
    }

    /// The number the next notification will get.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// The oldest number still held.
    fn first(&self) -> u64 {
        self.next - self.items.len() as u64
    }

    /// Adds a notification; the oldest go when the bounds are passed.
    pub(crate) fn push(&mut self, frame: Bytes) {
        self.bytes += frame.len();
        self.items.push_back(frame);
        self.next += 1;
        while self.items.len() > self.max_items
            || (self.bytes > self.max_bytes && self.items.len() > 1)
        {
            if let Some(old) = self.items.pop_front() {
                self.bytes -= old.len();
            }
        }
    }

    /// Copies the notifications from `cursor` on into `out`, while `out`
    /// stays under `limit` bytes. Returns the new cursor and how many
    /// were lost before `cursor` could read them (they left the ring).
    pub(crate) fn read(&self, cursor: u64, out: &mut BytesMut, limit: usize) -> (u64, u64) {
        let first = self.first();
        let (mut at, missed) = if cursor < first {
            (first, first - cursor)
        } else {
            (cursor, 0)
        };
        while at < self.next && out.len() < limit {
            let i = usize::try_from(at - first).unwrap_or(usize::MAX);
            let Some(frame) = self.items.get(i) else {
                break;
            };
            out.extend_from_slice(frame);
            at += 1;
        }
        (at, missed)
    }
}

impl Hub {
    pub(crate) fn new(key: HubKey, workers: usize, max_items: usize, max_bytes: usize) -> Self {
        Self {
            key,
            channels: Mutex::default(),
            workers: workers.max(1),
            max_items,
            max_bytes,
        }
    }

    /// The channel `name`, created on first use.
    pub(crate) fn channel(&self, name: &str) -> Arc<Channel> {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(name) {
            return Arc::clone(c);
        }
        let name: Arc<str> = name.into();
        let c = Arc::new(Channel {
            name: Arc::clone(&name),
            ring: Mutex::new(Ring::new(self.max_items, self.max_bytes)),
            listeners: (0..self.workers).map(|_| AtomicUsize::new(0)).collect(),
            active: AtomicBool::new(false),
            requested: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            overrun: AtomicU64::new(0),
        });
        map.insert(name, Arc::clone(&c));
        c
    }

    /// The channel `name` if some client listens to it.
    pub(crate) fn find(&self, name: &str) -> Option<Arc<Channel>> {
        let map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(name).cloned()
    }

    /// Every channel, for the upstream to LISTEN again after a reconnect.
    pub(crate) fn channels(&self) -> Vec<Arc<Channel>> {
        let map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        map.values().cloned().collect()
    }

    /// Forgets `name` when nobody listens to it any more; true when it was
    /// forgotten (the upstream then UNLISTENs).
    pub(crate) fn forget_if_unheard(&self, name: &str) -> bool {
        let mut map = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(name) {
            Some(c) if c.listening() == 0 => {
                map.remove(name);
                true
            }
            _ => false,
        }
    }

    /// True when no channel is left.
    pub(crate) fn is_empty(&self) -> bool {
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }
}

impl Channel {
    /// Clients listening, all workers together.
    pub(crate) fn listening(&self) -> usize {
        self.listeners
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// One client of `worker` more (`true`) or less.
    pub(crate) fn count(&self, worker: usize, more: bool) {
        if let Some(n) = self.listeners.get(worker) {
            if more {
                n.fetch_add(1, Ordering::Relaxed);
            } else {
                let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
            }
        }
    }

    /// The workers with listening clients.
    pub(crate) fn workers(&self) -> impl Iterator<Item = usize> + '_ {
        self.listeners
            .iter()
            .enumerate()
            .filter(|(_, n)| n.load(Ordering::Relaxed) > 0)
            .map(|(i, _)| i)
    }

    pub(crate) fn push(&self, frame: Bytes) {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(frame);
    }

    /// Where a client that starts listening now begins.
    pub(crate) fn cursor_now(&self) -> u64 {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next()
    }

    pub(crate) fn read(&self, cursor: u64, out: &mut BytesMut, limit: usize) -> (u64, u64) {
        let (at, missed) = self
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read(cursor, out, limit);
        // Copied: from where it started reading (past what it missed).
        let copied = at.saturating_sub(cursor.saturating_add(missed));
        self.delivered.fetch_add(copied, Ordering::Relaxed);
        if missed > 0 {
            self.overrun.fetch_add(1, Ordering::Relaxed);
        }
        (at, missed)
    }
}

/// Every hub of an instance.
#[derive(Debug, Default)]
pub(crate) struct Notes {
    hubs: Mutex<HashMap<HubKey, Arc<Hub>>>,
}

impl Notes {
    /// The hub of `key`, created on first use.
    pub(crate) fn hub(
        &self,
        key: HubKey,
        workers: usize,
        max_items: usize,
        max_bytes: usize,
    ) -> Arc<Hub> {
        let mut map = self.hubs.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            map.entry(key.clone())
                .or_insert_with(|| Arc::new(Hub::new(key, workers, max_items, max_bytes))),
        )
    }

    /// Forgets a hub with no channel left.
    pub(crate) fn drop_if_empty(&self, key: &HubKey) -> bool {
        let mut map = self.hubs.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(key) {
            Some(h) if h.is_empty() => {
                map.remove(key);
                true
            }
            _ => false,
        }
    }
}

/// A LISTEN or UNLISTEN statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ListenStmt {
    Listen(String),
    Unlisten(String),
    UnlistenAll,
}

/// The statements of a simple query made only of LISTEN and UNLISTEN
/// (none else, no transaction control): what odissey answers itself.
/// None for anything else, which goes to a server as before.
pub(crate) fn parse_listen(sql: &str) -> Option<Vec<ListenStmt>> {
    let mut out = Vec::new();
    for stmt in sql.split(';') {
        let stmt = stmt.trim();
        if stmt.is_empty() {
            continue;
        }
        let (word, rest) = stmt.split_once(char::is_whitespace)?;
        let rest = rest.trim();
        let l = if word.eq_ignore_ascii_case("listen") {
            ListenStmt::Listen(identifier(rest)?)
        } else if word.eq_ignore_ascii_case("unlisten") {
            if rest == "*" {
                ListenStmt::UnlistenAll
            } else {
                ListenStmt::Unlisten(identifier(rest)?)
            }
        } else {
            return None;
        };
        out.push(l);
    }
    (!out.is_empty()).then_some(out)
}

/// An SQL identifier, as PostgreSQL reads it: quoted (`""` for `"`), or
/// plain and folded to lower case. None for anything else (a channel name
/// odissey cannot read goes to the server, which answers it).
fn identifier(s: &str) -> Option<String> {
    if let Some(q) = s.strip_prefix('"') {
        let inner = q.strip_suffix('"')?;
        if inner.is_empty() {
            return None;
        }
        let mut out = String::new();
        let mut chars = inner.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' && chars.next() != Some('"') {
                return None;
            }
            out.push(c);
        }
        // PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes.
        return Some(truncate(out));
    }
    let ok = s
        .chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
        && s.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$');
    ok.then(|| truncate(s.to_lowercase()))
}

fn truncate(mut s: String) -> String {
    while s.len() > 63 {
        s.pop();
    }
    s
}

/// `LISTEN "name"` (or UNLISTEN) for the upstream connection.
pub(crate) fn statement(verb: &str, channel: &str) -> String {
    format!("{verb} \"{}\"", channel.replace('"', "\"\""))
}

/// The channel of a NotificationResponse body (pid, channel, payload).
pub(crate) fn channel_of(body: &[u8]) -> Option<&str> {
    let rest = body.get(4..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![b'A', 0, 0, 0, 5, n])
    }

    #[test]
    fn listen_statements_are_read_as_postgresql_reads_them() {
        assert_eq!(
            parse_listen("LISTEN Jobs"),
            Some(vec![ListenStmt::Listen("jobs".into())])
        );
        assert_eq!(
            parse_listen("listen \"Mixed Case\"; unlisten other;"),
            Some(vec![
                ListenStmt::Listen("Mixed Case".into()),
                ListenStmt::Unlisten("other".into())
            ])
        );
        assert_eq!(
            parse_listen("UNLISTEN *"),
            Some(vec![ListenStmt::UnlistenAll])
        );
        assert_eq!(
            parse_listen(r#"LISTEN "a""b""#),
            Some(vec![ListenStmt::Listen("a\"b".into())])
        );
        for other in [
            "SELECT 1",
            "LISTEN a; SELECT 1",
            "BEGIN; LISTEN a; COMMIT",
            "LISTEN",
            "LISTEN 1abc",
            "LISTEN \"\"",
            "",
        ] {
            assert_eq!(parse_listen(other), None, "{other}");
        }
    }

    #[test]
    fn a_ring_keeps_its_bounds_and_each_cursor_reads_on_its_own() {
        let mut r = Ring::new(3, 1 << 20);
        let slow = r.next();
        for n in 0..2 {
            r.push(frame(n));
        }
        let mut out = BytesMut::new();
        let (fast, missed) = r.read(slow, &mut out, 1 << 20);
        assert_eq!((fast, missed, out.len()), (2, 0, 12));
        for n in 2..6 {
            r.push(frame(n));
        }
        // The slow cursor lost three (0, 1, 2) and reads 3, 4, 5.
        let mut out = BytesMut::new();
        let (at, missed) = r.read(slow, &mut out, 1 << 20);
        assert_eq!((at, missed), (6, 3));
        assert_eq!(out[5], 3);
        // The fast one lost 2 of 2..6, reads 3..6.
        let mut out = BytesMut::new();
        assert_eq!(r.read(fast, &mut out, 1 << 20), (6, 1));
        // A limit stops the copy; the cursor says where to go on.
        let mut out = BytesMut::new();
        assert_eq!(r.read(3, &mut out, 1), (4, 0));
        // The byte bound holds too.
        let mut r = Ring::new(100, 10);
        for n in 0..5 {
            r.push(frame(n));
        }
        assert!(r.bytes <= 12 && r.items.len() == 1, "{r:?}");
    }

    #[test]
    fn channels_count_their_listeners_by_worker() {
        let hub = Hub::new(
            HubKey {
                storage: "s".into(),
                host: "h:1".into(),
                database: "d".into(),
            },
            2,
            10,
            1000,
        );
        let c = hub.channel("jobs");
        c.count(1, true);
        c.count(1, true);
        assert_eq!(c.workers().collect::<Vec<_>>(), [1]);
        assert!(!hub.forget_if_unheard("jobs"));
        c.count(1, false);
        c.count(1, false);
        c.count(1, false);
        assert_eq!(c.listening(), 0);
        assert!(hub.forget_if_unheard("jobs"));
        assert!(hub.is_empty());
        assert_eq!(channel_of(b"\0\0\0\x07jobs\0pay\0"), Some("jobs"));
    }
}
