//! Protocol-level prepared statements in transaction pooling (sans-IO).
//!
//! A client's named statements must work on whichever server connection it
//! holds at the moment, so odissey keeps them itself, PgBouncer-style:
//!
//! - A named Parse is remembered in the client's [`ClientStatements`]
//!   (client name -> [`Statement`]). The statement is sent to servers under
//!   a name derived from its text and parameter types
//!   (`odissey_<16 hex digits>`, FNV-1a 64), so identical statements of
//!   different clients share one server-side statement.
//! - Each server connection has [`ServerStatements`]: the server-side names
//!   prepared on it, LRU-bounded. Evicting one sends a `Close` whose
//!   CloseComplete the client never sees.
//! - Parse of a statement the server already has is not sent; the client
//!   gets a synthesized ParseComplete. Bind/Describe of a statement the
//!   server lacks first send the stored Parse (its ParseComplete swallowed),
//!   then the message renamed. Close of a named statement only forgets the
//!   client's name (CloseComplete synthesized); the server keeps its copy.
//! - Unnamed statements, portals, simple Query, FunctionCall and the COPY
//!   messages pass untouched. SQL-level PREPARE/EXECUTE/DEALLOCATE keep
//!   their session semantics (that is, they are unreliable in transaction
//!   mode). A `DISCARD ALL` or `DEALLOCATE ALL` run on the server drops its
//!   statements: the caller must then call [`ServerStatements::clear`].
//!
//! Errors PostgreSQL would raise for a client's messages that never reach
//! the server as such (Bind/Describe of an unknown name: 26000; a Parse
//! reusing a name for a different statement: 42P05) are produced by sending
//! the server a Describe of a statement that does not exist
//! ([`MISSING`]): the server fails it and skips to the next Sync exactly as
//! it would have for the client's message, and its ErrorResponse is replaced
//! by the one the client should see. A re-Parse of an existing name with the
//! *same* statement is accepted (PostgreSQL would refuse it with 42P05).
//!
//! [`Pipeline`] is the queue of what the server owes, in request order: it
//! decides, from each server message header, whether the message streams
//! through or must be handed over whole, to be swallowed or preceded or
//! followed by synthesized messages. It also rolls back the bookkeeping of
//! messages the server skipped after an error (a Parse that failed or was
//! skipped is not prepared; a skipped Close did not close anything). Keep
//! one `Pipeline` per client (it is idle whenever the client may be
//! unlinked); a few rollbacks of the client's names are applied at its next
//! [`client_frame`].
//!
//! Known limits: a client that pipelines past a Sync whose batch fails may
//! see its later messages judged with names that the failure undid (they
//! then fail at the server with the server-side name in the message);
//! statements are shared by text only, so clients that differ in
//! `search_path` share plans like they do in PgBouncer.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use odissey_protocol::codec::Frame;
use odissey_protocol::frontend::{self, FrontendMessage};
use odissey_protocol::{backend, Error};

/// Default bound of [`ServerStatements`] (route option `prepared_statements_max`).
pub(crate) const DEFAULT_MAX: usize = 256;

/// A statement name no server has (server-side names are `odissey_` and 16
/// hex digits): describing it makes the server fail with 26000.
const MISSING: &str = "odissey_missing";

const PARSE_COMPLETE: &[u8] = b"1\0\0\0\x04";
const CLOSE_COMPLETE: &[u8] = b"3\0\0\0\x04";

/// FNV-1a, 64 bits: stable across processes, no dependency.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// One statement as odissey sends it to servers.
#[derive(Debug)]
pub(crate) struct Statement {
    /// `odissey_<hash>`: the name on every server.
    pub(crate) server_name: String,
    /// A complete Parse message (tag, length, body) naming `server_name`.
    pub(crate) parse: Bytes,
    /// Its text may change the session (`session::scan`): each execution
    /// has its server checked afterwards.
    pub(crate) marks: bool,
    /// It calls `set_config($n, ...)`: the parameter whose value names the
    /// setting (`session::Scan::name_param`).
    pub(crate) name_param: Option<u16>,
}

impl Statement {
    /// From the part of a Parse body after the client's name (query text,
    /// NUL, parameter count and types), which also identifies the statement.
    fn new(rest: &[u8]) -> Result<Self, Error> {
        let server_name = format!("odissey_{:016x}", fnv1a(rest));
        let text = &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())];
        let scan = crate::session::scan(text, &mut Vec::new());
        let len = 4 + server_name.len() + 1 + rest.len();
        let len = u32::try_from(len).map_err(|_| Error::Malformed {
            what: "Parse message too long",
        })?;
        let mut b = BytesMut::with_capacity(1 + len as usize);
        b.put_u8(b'P');
        b.put_u32(len);
        b.put_slice(server_name.as_bytes());
        b.put_u8(0);
        b.put_slice(rest);
        Ok(Self {
            server_name,
            parse: b.freeze(),
            marks: scan.any(),
            name_param: scan.name_param,
        })
    }
}

/// A client's named statements: client name -> statement.
#[derive(Debug, Default)]
pub(crate) struct ClientStatements {
    map: HashMap<Bytes, Arc<Statement>>,
    /// One of its statements ever had `marks`: only then is a Bind looked
    /// up for it (`bind_marks`), so that the common Bind costs no second
    /// lookup.
    any_marks: bool,
}

impl ClientStatements {
    /// Number of named statements the client has.
    #[cfg_attr(not(test), allow(dead_code))] // inspection and tests
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// True when the client has no named statement.
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The server-side statements prepared on one server connection, LRU-bounded.
#[derive(Debug)]
pub(crate) struct ServerStatements {
    max: usize,
    tick: u64,
    /// Name -> last use.
    names: HashMap<String, u64>,
    /// Last use -> name, oldest first.
    ages: BTreeMap<u64, String>,
}

impl ServerStatements {
    /// An empty set holding at most `max` statements (at least one).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            tick: 0,
            names: HashMap::new(),
            ages: BTreeMap::new(),
        }
    }

    /// Forgets everything (after `DISCARD ALL` / `DEALLOCATE ALL`).
    pub(crate) fn clear(&mut self) {
        self.names.clear();
        self.ages.clear();
    }

    /// True when `server_name` is prepared on this server.
    #[cfg_attr(not(test), allow(dead_code))] // inspection and tests
    pub(crate) fn contains(&self, server_name: &str) -> bool {
        self.names.contains_key(server_name)
    }

    /// Number of statements prepared on this server.
    #[cfg_attr(not(test), allow(dead_code))] // inspection and tests
    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }

    /// Marks `name` as just used; false when it is not there.
    fn touch(&mut self, name: &str) -> bool {
        let Some(age) = self.names.get_mut(name) else {
            return false;
        };
        self.tick += 1;
        if let Some(s) = self.ages.remove(age) {
            self.ages.insert(self.tick, s);
        }
        *age = self.tick;
        true
    }

    /// Adds `name` without evicting anything.
    fn put(&mut self, name: String) {
        if self.touch(&name) {
            return;
        }
        self.tick += 1;
        self.names.insert(name.clone(), self.tick);
        self.ages.insert(self.tick, name);
    }

    /// Adds `name`, returning the least recently used names evicted to make
    /// room (the caller closes them on the server).
    fn insert(&mut self, name: String) -> Vec<String> {
        let mut evicted = Vec::new();
        if self.touch(&name) {
            return evicted;
        }
        while self.names.len() >= self.max {
            let Some((_, old)) = self.ages.pop_first() else {
                break;
            };
            self.names.remove(&old);
            evicted.push(old);
        }
        self.put(name);
        evicted
    }

    fn remove(&mut self, name: &str) {
        if let Some(age) = self.names.remove(name) {
            self.ages.remove(&age);
        }
    }
}

/// What to put back if the server never carries out a message.
#[derive(Debug, Default)]
struct Undo {
    client: Option<ClientUndo>,
    server: Option<ServerUndo>,
}

/// The client's `name` went from `before` to `after`.
#[derive(Debug)]
struct ClientUndo {
    name: Bytes,
    before: Option<Arc<Statement>>,
    after: Option<Arc<Statement>>,
}

#[derive(Debug)]
enum ServerUndo {
    /// A Parse of this name failed or was skipped: not prepared.
    Remove(String),
    /// A Close of this evicted name was skipped: still prepared.
    Restore(String),
}

/// The shape of the server's answer to one client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Parse, Bind, Close: one message ('1', '2', '3' or 'E').
    One,
    /// Describe: ['t'] then 'T' or 'n' (or 'E').
    Describe,
    /// Execute: anything up to 'C', 'I', 's' or 'E'.
    Execute,
    /// Sync: anything up to 'Z'; ends a skip after an error.
    Sync,
    /// Query, FunctionCall: anything up to 'Z'.
    UntilZ,
}

impl Shape {
    fn ends_with(self, tag: u8) -> bool {
        match self {
            Self::One => matches!(tag, b'1' | b'2' | b'3' | b'E'),
            Self::Describe => matches!(tag, b'T' | b'n' | b'E'),
            Self::Execute => matches!(tag, b'C' | b'I' | b's' | b'E'),
            Self::Sync | Self::UntilZ => tag == b'Z',
        }
    }

    /// Whether `tag` is part of the answer to this shape.
    fn owns(self, tag: u8) -> bool {
        match self {
            Self::One => self.ends_with(tag),
            Self::Describe => tag == b't' || self.ends_with(tag),
            Self::Execute | Self::Sync | Self::UntilZ => true,
        }
    }

    /// An error answering this makes the server skip to the next Sync.
    fn extended(self) -> bool {
        matches!(self, Self::One | Self::Describe | Self::Execute)
    }
}

/// Whether the client sees the server's answer.
#[derive(Debug)]
enum Mode {
    /// It does.
    Pass,
    /// It does not, unless it is an ErrorResponse.
    Swallow,
    /// It does not; these bytes (an ErrorResponse) take its last message's place.
    Replace(Bytes),
}

#[derive(Debug)]
enum Item {
    /// The server answers a message we sent.
    Expect {
        shape: Shape,
        mode: Mode,
        undo: Undo,
    },
    /// The server sends nothing; the client gets `bytes` when this reaches
    /// the head of the queue.
    Synth { bytes: Bytes, undo: Undo },
}

/// What `server_frame` does with the frame whose header asked for it whole.
#[derive(Debug)]
struct Pending {
    /// Synthesized messages due before it.
    before: BytesMut,
    /// The frame reaches the client.
    frame: bool,
    /// Sent in the frame's place.
    replace: Option<Bytes>,
}

/// What the relay should do with a server message, decided from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Stream it through untouched.
    Pass,
    /// Hand the complete frame to [`Pipeline::server_frame`].
    Whole,
}

/// What the server owes, in request order.
#[derive(Debug, Default)]
pub(crate) struct Pipeline {
    queue: VecDeque<Item>,
    /// An error was answered and no Sync is queued yet: the server ignores
    /// every message up to the client's next Sync.
    skipping: bool,
    /// Set by a header that wants its frame whole.
    pending: Option<Pending>,
    /// Rollbacks owed, oldest first (applied newest first).
    client_undo: Vec<ClientUndo>,
    server_undo: Vec<ServerUndo>,
}

impl Pipeline {
    /// The server entered COPY IN for the Execute it is answering: it
    /// ignores Sync (and Flush) until CopyDone/CopyFail, so the `n` Syncs the
    /// client sent after that Execute will get no ReadyForQuery.
    pub(crate) fn ignore_syncs(&mut self, n: usize) {
        let mut left = n;
        let mut i = 1;
        while left > 0 && i < self.queue.len() {
            if matches!(
                self.queue.get(i),
                Some(Item::Expect {
                    shape: Shape::Sync,
                    ..
                })
            ) {
                self.queue.remove(i);
                left -= 1;
            } else {
                i += 1;
            }
        }
    }

    /// True when nothing is owed (the link may be released if the protocol
    /// state also says so).
    pub(crate) fn is_idle(&self) -> bool {
        self.queue.is_empty() && !self.skipping && self.pending.is_none()
    }

    /// Records a client message forwarded unchanged, by tag: `Q`, `F`
    /// (answered up to ReadyForQuery), `E`, `S`; `H`, `d`, `c`, `f`, `X`
    /// expect nothing. `P`, `B`, `D`, `C` normally go to [`client_frame`]
    /// (which handles unnamed ones too); given here they are taken as
    /// unnamed.
    pub(crate) fn client_passthrough(&mut self, tag: u8) {
        let shape = match tag {
            b'S' => {
                self.skipping = false;
                Shape::Sync
            }
            // The server ignores everything up to the Sync.
            _ if self.skipping => return,
            b'Q' | b'F' => Shape::UntilZ,
            b'E' => Shape::Execute,
            b'P' | b'B' | b'C' => Shape::One,
            b'D' => Shape::Describe,
            _ => return,
        };
        self.expect(shape, Mode::Pass, Undo::default());
    }

    fn expect(&mut self, shape: Shape, mode: Mode, undo: Undo) {
        self.queue.push_back(Item::Expect { shape, mode, undo });
    }

    fn synth(&mut self, bytes: &'static [u8], client: Option<ClientUndo>) {
        self.queue.push_back(Item::Synth {
            bytes: Bytes::from_static(bytes),
            undo: Undo {
                client,
                server: None,
            },
        });
    }

    /// Called exactly once per server message header, in order. `Whole`
    /// means the relay must hand the complete frame to
    /// [`server_frame`](Self::server_frame) before the next header;
    /// `Pass` means it streams through untouched. `Whole` is asked for a
    /// message to swallow or replace, one with synthesized messages due
    /// before or after it, an error that undoes server-side bookkeeping,
    /// and the message after which nothing is owed (so that
    /// [`drain_due`](Self::drain_due) never lands inside a half-relayed
    /// frame). Rows and COPY data always stream.
    pub(crate) fn server_header(&mut self, tag: u8) -> Disposition {
        // A previous Whole frame never came (a caller bug): keep its bytes.
        let before = match self.pending.take() {
            Some(p) => {
                let mut b = p.before;
                if let Some(r) = p.replace {
                    b.extend_from_slice(&r);
                }
                b
            }
            None => BytesMut::new(),
        };
        let mut p = Pending {
            before,
            frame: true,
            replace: None,
        };
        self.take_due(&mut p.before);
        // NoticeResponse, ParameterStatus, NotificationResponse belong to
        // no request.
        if !matches!(tag, b'N' | b'S' | b'A') {
            self.answer(tag, &mut p);
        }
        let whole = !p.before.is_empty()
            || !p.frame
            || p.replace.is_some()
            || !self.server_undo.is_empty()
            || !matches!(self.queue.front(), Some(Item::Expect { .. }));
        if whole {
            self.pending = Some(p);
            Disposition::Whole
        } else {
            Disposition::Pass
        }
    }

    /// Moves the queue on for a server message `tag` (the head is not a Synth).
    fn answer(&mut self, tag: u8, p: &mut Pending) {
        let Some(Item::Expect { shape, mode, .. }) = self.queue.front() else {
            return; // nothing owed: pass it
        };
        let shape = *shape;
        if tag == b'Z' && !matches!(shape, Shape::Sync | Shape::UntilZ) {
            // Out of step with the server: the answers before the first
            // message answered by ReadyForQuery never came.
            let Some(at) = self.queue.iter().position(|i| {
                matches!(
                    i,
                    Item::Expect {
                        shape: Shape::Sync | Shape::UntilZ,
                        ..
                    }
                )
            }) else {
                return;
            };
            for _ in 0..=at {
                if let Some(item) = self.queue.pop_front() {
                    self.discard(item);
                }
            }
            return;
        }
        if !shape.owns(tag) {
            return; // unexpected: pass it
        }
        match mode {
            Mode::Pass => {}
            Mode::Swallow => p.frame = tag == b'E',
            Mode::Replace(_) => p.frame = false,
        }
        if !shape.ends_with(tag) {
            return;
        }
        let Some(Item::Expect { mode, undo, .. }) = self.queue.pop_front() else {
            return;
        };
        if let Mode::Replace(bytes) = mode {
            p.replace = Some(bytes);
        }
        if tag == b'E' && shape.extended() {
            // The message failed and the server skips to the next Sync.
            self.undo(undo);
            loop {
                match self.queue.front() {
                    None => {
                        self.skipping = true;
                        break;
                    }
                    Some(Item::Expect {
                        shape: Shape::Sync, ..
                    }) => break,
                    Some(_) => {
                        if let Some(item) = self.queue.pop_front() {
                            self.discard(item);
                        }
                    }
                }
            }
        }
    }

    /// An item the server will never carry out (synthesized bytes included).
    fn discard(&mut self, item: Item) {
        match item {
            Item::Expect { undo, .. } | Item::Synth { undo, .. } => self.undo(undo),
        }
    }

    fn undo(&mut self, undo: Undo) {
        self.client_undo.extend(undo.client);
        self.server_undo.extend(undo.server);
    }

    /// Synthesized messages at the head of the queue, now due.
    fn take_due(&mut self, out: &mut BytesMut) {
        while let Some(Item::Synth { .. }) = self.queue.front() {
            if let Some(Item::Synth { bytes, .. }) = self.queue.pop_front() {
                out.extend_from_slice(&bytes);
            }
        }
    }

    /// A complete server frame (tag, length, body) for which
    /// [`server_header`](Self::server_header) said `Whole`: appends what the
    /// client must see to `to_client` (synthesized messages due first, then
    /// the frame unless swallowed, then synthesized messages due after it)
    /// and updates `ss` for Parses that failed or were skipped. Given a
    /// frame whose header said `Pass`, it appends the frame unchanged.
    pub(crate) fn server_frame(
        &mut self,
        frame: BytesMut,
        ss: &mut ServerStatements,
        to_client: &mut BytesMut,
    ) {
        self.settle_server(ss);
        match self.pending.take() {
            None => to_client.unsplit(frame),
            Some(p) => {
                to_client.unsplit(p.before);
                if p.frame {
                    to_client.unsplit(frame);
                }
                if let Some(r) = p.replace {
                    to_client.extend_from_slice(&r);
                }
            }
        }
        self.take_due(to_client);
    }

    /// Synthesized messages due now without waiting for any server message
    /// (e.g. Parse of a cached statement and Close('S') then Flush: the
    /// server sends nothing, the client must get ParseComplete and
    /// CloseComplete at once). Call after feeding client messages (and
    /// after server messages if convenient); safe at any time, it holds
    /// back while a frame is owed to `server_frame`.
    pub(crate) fn drain_due(&mut self, to_client: &mut BytesMut) {
        if self.pending.is_none() {
            self.take_due(to_client);
        }
    }

    fn settle_server(&mut self, ss: &mut ServerStatements) {
        while let Some(u) = self.server_undo.pop() {
            match u {
                ServerUndo::Remove(name) => ss.remove(&name),
                ServerUndo::Restore(name) => ss.put(name),
            }
        }
    }

    fn settle_client(&mut self, cs: &mut ClientStatements) {
        while let Some(u) = self.client_undo.pop() {
            let now = cs.map.get(&u.name);
            let unchanged = match (now, &u.after) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !unchanged {
                continue; // the client has changed it since
            }
            match u.before {
                Some(s) => {
                    cs.map.insert(u.name, s);
                }
                None => {
                    cs.map.remove(&u.name);
                }
            }
        }
    }

    /// Makes the server fail here like it would have for the client's
    /// message, and shows the client `code`/`message` instead.
    fn fail(&mut self, to_server: &mut BytesMut, code: &str, message: &str) {
        let mut e = BytesMut::new();
        backend::error_response(&mut e, "ERROR", code, message, None);
        frontend::describe(to_server, b'S', MISSING);
        self.expect(Shape::Describe, Mode::Replace(e.freeze()), Undo::default());
    }
}

/// True for client tags that [`client_frame`] must see whole.
pub(crate) fn needs_whole(tag: u8) -> bool {
    matches!(tag, b'P' | b'B' | b'D' | b'C')
}

/// When `frame` is a Bind of a named statement of the client's whose text
/// may change the session (see `Statement::marks`): the parameter, if any,
/// that names a setting (`Statement::name_param`).
pub(crate) fn bind_marks(frame: &[u8], cs: &ClientStatements) -> Option<Option<u16>> {
    if !cs.any_marks || frame.first() != Some(&b'B') {
        return None;
    }
    let body = frame.get(5..).unwrap_or(&[]);
    let mut parts = body.splitn(3, |&b| b == 0);
    let (Some(_portal), Some(statement)) = (parts.next(), parts.next()) else {
        return None;
    };
    if statement.is_empty() {
        return None;
    }
    cs.map
        .get(statement)
        .filter(|s| s.marks)
        .map(|s| s.name_param)
}

/// Sends `stmt`'s Parse (after Closes for what it evicts) and records it.
fn prepare(
    stmt: &Statement,
    ss: &mut ServerStatements,
    pipe: &mut Pipeline,
    to_server: &mut BytesMut,
    mode: Mode,
    client: Option<ClientUndo>,
) {
    for old in ss.insert(stmt.server_name.clone()) {
        frontend::close(to_server, b'S', &old);
        let undo = Undo {
            client: None,
            server: Some(ServerUndo::Restore(old)),
        };
        pipe.expect(Shape::One, Mode::Swallow, undo);
    }
    to_server.extend_from_slice(&stmt.parse);
    let undo = Undo {
        client,
        server: Some(ServerUndo::Remove(stmt.server_name.clone())),
    };
    pipe.expect(Shape::One, mode, undo);
}

/// Makes sure the server has `stmt`, sending its Parse (answer swallowed).
fn ensure(
    stmt: &Statement,
    ss: &mut ServerStatements,
    pipe: &mut Pipeline,
    to_server: &mut BytesMut,
) {
    if !ss.touch(&stmt.server_name) {
        prepare(stmt, ss, pipe, to_server, Mode::Swallow, None);
    }
}

fn does_not_exist(name: &[u8]) -> String {
    format!(
        "prepared statement \"{}\" does not exist",
        String::from_utf8_lossy(name)
    )
}

/// Handles a whole client frame (`P`, `B`, `D` or `C`; tag, length, body):
/// writes what the server must get to `to_server`, records what it owes in
/// `pipe`, updates `cs` and `ss`. Other tags are forwarded and passed to
/// [`Pipeline::client_passthrough`]. Errors only for malformed frames (the
/// caller closes the client with 08P01).
pub(crate) fn client_frame(
    frame: BytesMut,
    cs: &mut ClientStatements,
    ss: &mut ServerStatements,
    pipe: &mut Pipeline,
    to_server: &mut BytesMut,
) -> Result<(), Error> {
    pipe.settle_client(cs);
    pipe.settle_server(ss);
    let Some(&[tag, a, b, c, d]) = frame.get(..5) else {
        return Err(Error::Malformed {
            what: "truncated message header",
        });
    };
    let len = u32::from_be_bytes([a, b, c, d]);
    if len < 4 || len as usize != frame.len() - 1 {
        return Err(Error::BadLength { tag, len });
    }
    let raw = frame.freeze();
    let body = raw.slice(5..);
    let msg = FrontendMessage::parse(&Frame {
        tag,
        body: body.clone(),
    })?;
    if !needs_whole(tag) {
        to_server.extend_from_slice(&raw);
        pipe.client_passthrough(tag);
        return Ok(());
    }
    if pipe.skipping {
        // The server would ignore it: so do we (no bookkeeping either).
        return Ok(());
    }
    match msg {
        FrontendMessage::Parse { name, .. } if !name.is_empty() => {
            let rest = &body[name.len() + 1..];
            let stmt = Statement::new(rest)?;
            let before = cs.map.get(&name).cloned();
            let stmt = match before {
                Some(old) if old.server_name != stmt.server_name => {
                    let m = format!(
                        "prepared statement \"{}\" already exists",
                        String::from_utf8_lossy(&name)
                    );
                    pipe.fail(to_server, "42P05", &m);
                    return Ok(());
                }
                // The same statement again: keep it.
                Some(old) => old,
                None => Arc::new(stmt),
            };
            let client = if cs.map.contains_key(&name) {
                None
            } else {
                cs.any_marks |= stmt.marks;
                cs.map.insert(name.clone(), Arc::clone(&stmt));
                Some(ClientUndo {
                    name,
                    before: None,
                    after: Some(Arc::clone(&stmt)),
                })
            };
            if ss.touch(&stmt.server_name) {
                pipe.synth(PARSE_COMPLETE, client);
            } else {
                prepare(&stmt, ss, pipe, to_server, Mode::Pass, client);
            }
        }
        FrontendMessage::Bind {
            portal, statement, ..
        } if !statement.is_empty() => {
            let Some(stmt) = cs.map.get(&statement).cloned() else {
                pipe.fail(to_server, "26000", &does_not_exist(&statement));
                return Ok(());
            };
            ensure(&stmt, ss, pipe, to_server);
            let tail = &body[portal.len() + 1 + statement.len() + 1..];
            let name = stmt.server_name.as_bytes();
            let len = 4 + portal.len() + 1 + name.len() + 1 + tail.len();
            let len = u32::try_from(len).map_err(|_| Error::Malformed {
                what: "Bind message too long",
            })?;
            to_server.reserve(1 + len as usize);
            to_server.put_u8(b'B');
            to_server.put_u32(len);
            to_server.put_slice(&portal);
            to_server.put_u8(0);
            to_server.put_slice(name);
            to_server.put_u8(0);
            to_server.put_slice(tail);
            pipe.expect(Shape::One, Mode::Pass, Undo::default());
        }
        FrontendMessage::Describe { kind: b'S', name } if !name.is_empty() => {
            let Some(stmt) = cs.map.get(&name).cloned() else {
                pipe.fail(to_server, "26000", &does_not_exist(&name));
                return Ok(());
            };
            ensure(&stmt, ss, pipe, to_server);
            frontend::describe(to_server, b'S', &stmt.server_name);
            pipe.expect(Shape::Describe, Mode::Pass, Undo::default());
        }
        FrontendMessage::Close { kind: b'S', name } if !name.is_empty() => {
            // Closing an unknown name is no error in PostgreSQL either.
            let client = cs.map.remove(&name).map(|old| ClientUndo {
                name,
                before: Some(old),
                after: None,
            });
            pipe.synth(CLOSE_COMPLETE, client);
        }
        _ => {
            // Unnamed statements and portals pass untouched.
            to_server.extend_from_slice(&raw);
            pipe.client_passthrough(tag);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::testkit::{Next, Pair};
    use odissey_protocol::backend::{parse_error_fields, TransactionStatus};
    use odissey_protocol::codec::peek_header;

    /// One client linked to one server (`testkit::Pair`, transaction
    /// pooling), driven through the real relay (`link::pump`); the far
    /// ends are the test's.
    struct Link {
        p: Pair,
    }

    /// The pair's own prepared-statement state and buffers, for the tests
    /// that call the `Pipeline` API directly.
    struct Parts<'a> {
        /// The client's named statements.
        cs: &'a mut ClientStatements,
        /// The server's statements.
        ss: &'a mut ServerStatements,
        /// What the server owes the client.
        pipe: &'a mut Pipeline,
        /// The server's output buffer (what `sent` reads once flushed).
        to_server: &'a mut BytesMut,
        /// The client's output buffer (what `seen` reads once flushed).
        to_client: &'a mut BytesMut,
    }

    impl Link {
        fn new(max: usize) -> Self {
            let p = Pair::new(
                "transaction",
                &format!("prepared_statements = true\nprepared_statements_max = {max}"),
            );
            assert!(p.c.track_prepared, "statements are tracked");
            Self { p }
        }

        /// The driver sends what `build` writes; the relay runs.
        fn client(&mut self, build: impl FnOnce(&mut BytesMut)) {
            let mut b = BytesMut::new();
            build(&mut b);
            self.p.client_sends(&b);
            self.pump();
        }

        /// PostgreSQL sends what `build` writes; the relay runs.
        fn server(&mut self, build: impl FnOnce(&mut BytesMut)) {
            let mut b = BytesMut::new();
            build(&mut b);
            self.p.server_sends(&b);
            self.pump();
        }

        /// Pumps until nothing moves; the client must stay linked.
        fn pump(&mut self) {
            for _ in 0..100 {
                match self.p.pump() {
                    Next::Relaying(true) | Next::Clean(true) => {}
                    Next::Relaying(false) | Next::Clean(false) => return,
                    Next::Close(f) => panic!("the relay closed the client: {f:?}"),
                }
            }
            panic!("the relay never settles");
        }

        fn parts(&mut self) -> Parts<'_> {
            let prepared = self.p.c.prepared.get_or_insert_with(Box::default);
            Parts {
                cs: &mut prepared.stmts,
                ss: &mut self.p.s.stmts,
                pipe: &mut prepared.pipeline,
                to_server: &mut self.p.s.io.out,
                to_client: &mut self.p.c.io.out,
            }
        }

        fn cs(&mut self) -> &mut ClientStatements {
            self.parts().cs
        }

        fn ss(&mut self) -> &mut ServerStatements {
            &mut self.p.s.stmts
        }

        fn pipe(&mut self) -> &mut Pipeline {
            self.parts().pipe
        }

        /// What reached the server since the last call.
        fn sent(&mut self) -> Vec<(u8, Bytes)> {
            self.p.s.io.flush();
            frames(&mut self.p.server_got())
        }

        /// What reached the client since the last call.
        fn seen_frames(&mut self) -> Vec<(u8, Bytes)> {
            self.p.c.io.flush();
            frames(&mut self.p.client_got())
        }

        /// The tags of what reached the client since the last call.
        fn seen(&mut self) -> String {
            tags(&self.seen_frames())
        }

        /// Forgets whatever either side was sent.
        fn clear(&mut self) {
            self.p.s.io.out.clear();
            self.p.c.io.out.clear();
            self.p.server_got();
            self.p.client_got();
        }
    }

    /// The messages in `bytes`, each whole (tag, length, body).
    fn split(mut bytes: BytesMut) -> Vec<BytesMut> {
        let mut out = Vec::new();
        while let Some((_, total)) = peek_header(&bytes, 1 << 20).unwrap() {
            out.push(bytes.split_to(total));
        }
        assert!(bytes.is_empty(), "whole frames only");
        out
    }

    fn frames(buf: &mut BytesMut) -> Vec<(u8, Bytes)> {
        let mut out = Vec::new();
        while let Some(f) = odissey_protocol::read_frame(buf, 1 << 20).unwrap() {
            out.push((f.tag, f.body));
        }
        assert!(buf.is_empty(), "whole frames only");
        out
    }

    fn tags(f: &[(u8, Bytes)]) -> String {
        f.iter().map(|(t, _)| *t as char).collect()
    }

    fn msg(b: &mut BytesMut, tag: u8, body: &[u8]) {
        b.put_u8(tag);
        b.put_u32(4 + body.len() as u32);
        b.put_slice(body);
    }

    fn server_name(sql: &str, types: &[u32]) -> String {
        let mut b = BytesMut::new();
        frontend::parse(&mut b, "x", sql, types);
        Statement::new(&b[7..]).unwrap().server_name
    }

    /// Statement name of a Parse/Bind/Describe/Close body.
    fn named(tag: u8, body: &[u8]) -> String {
        let skip = match tag {
            b'B' => body.iter().position(|&c| c == 0).unwrap() + 1,
            b'D' | b'C' => 1,
            _ => 0,
        };
        let rest = &body[skip..];
        let end = rest.iter().position(|&c| c == 0).unwrap();
        String::from_utf8(rest[..end].to_vec()).unwrap()
    }

    const SQL: &str = "select $1::int";

    fn batch(b: &mut BytesMut, name: &str, sql: &str) {
        frontend::parse(b, name, sql, &[23]);
        frontend::bind(b, "", name, &[Some(b"1")]);
        frontend::execute(b, "", 0);
        frontend::sync(b);
    }

    fn replies(b: &mut BytesMut, parse: bool) {
        if parse {
            msg(b, b'1', b"");
        }
        msg(b, b'2', b"");
        backend::data_row(b, &[Some("1")]);
        backend::command_complete(b, "SELECT 1");
        backend::ready_for_query(b, TransactionStatus::Idle);
    }

    fn error(b: &mut BytesMut, code: &str) {
        backend::error_response(b, "ERROR", code, "boom", None);
    }

    fn error_code(body: &[u8]) -> (String, String) {
        let f = parse_error_fields(body).unwrap();
        (f.code, f.message)
    }

    #[test]
    fn first_use_is_renamed_and_relayed() {
        let mut l = Link::new(DEFAULT_MAX);
        l.client(|b| batch(b, "s1", SQL));
        let sent = l.sent();
        assert_eq!(tags(&sent), "PBES");
        let srv = server_name(SQL, &[23]);
        assert!(srv.starts_with("odissey_") && srv.len() == 24);
        assert_eq!(named(b'P', &sent[0].1), srv);
        assert_eq!(named(b'B', &sent[1].1), srv);
        // The rest of the Parse and Bind bodies is the client's.
        let mut orig = BytesMut::new();
        frontend::bind(&mut orig, "", "s1", &[Some(b"1")]);
        assert_eq!(&sent[1].1[2 + srv.len()..], &orig[5 + 4..]);
        assert!(sent[0].1.ends_with(b"select $1::int\0\0\x01\0\0\0\x17"));
        assert!(l.ss().contains(&srv) && l.cs().len() == 1);
        assert_eq!(l.seen(), "");
        l.server(|b| replies(b, true));
        assert_eq!(l.seen(), "12DCZ");
        assert!(l.pipe().is_idle());

        // Well-behaved clients never make the queue grow.
        for _ in 0..1000 {
            l.client(|b| {
                frontend::bind(b, "", "s1", &[Some(b"2")]);
                frontend::execute(b, "", 0);
                frontend::sync(b);
            });
            assert_eq!(tags(&l.sent()), "BES");
            l.server(|b| replies(b, false));
            assert_eq!(l.seen(), "2DCZ");
            assert!(l.pipe().is_idle() && l.pipe().queue.is_empty());
        }
    }

    #[test]
    fn second_client_shares_the_server_statement() {
        let mut a = Link::new(DEFAULT_MAX);
        a.client(|b| batch(b, "s1", SQL));
        a.server(|b| replies(b, true));
        a.sent();
        // Client b on the same server, under another name.
        let mut b = Link::new(DEFAULT_MAX);
        let fresh = a.p.fresh_server();
        let shared = a.p.relink(fresh);
        b.p.relink(shared);
        b.client(|x| batch(x, "mine", SQL));
        assert_eq!(tags(&b.sent()), "BES", "no Parse sent");
        // ParseComplete is due at once (nothing before it).
        assert_eq!(b.seen(), "1");
        b.server(|x| replies(x, false));
        assert_eq!(b.seen(), "2DCZ");
        assert!(b.pipe().is_idle());

        // Same, without the drain after the client messages: the
        // ParseComplete comes right before BindComplete.
        let mut c = Link::new(DEFAULT_MAX);
        let fresh = b.p.fresh_server();
        let shared = b.p.relink(fresh);
        c.p.relink(shared);
        let mut rx = BytesMut::new();
        batch(&mut rx, "other", SQL);
        for f in split(rx) {
            let x = c.parts();
            client_frame(f, x.cs, x.ss, x.pipe, x.to_server).unwrap();
        }
        assert_eq!(c.pipe().server_header(b'2'), Disposition::Whole);
        let mut f = BytesMut::new();
        msg(&mut f, b'2', b"");
        let x = c.parts();
        x.pipe.server_frame(f, x.ss, x.to_client);
        assert_eq!(c.seen(), "12");
        assert_eq!(c.pipe().server_header(b'D'), Disposition::Pass);
        assert_eq!(c.pipe().server_header(b'C'), Disposition::Pass);
        assert_eq!(c.pipe().server_header(b'Z'), Disposition::Whole);
    }

    #[test]
    fn moving_to_a_new_server_prepares_again() {
        let mut l = Link::new(DEFAULT_MAX);
        l.client(|b| batch(b, "s1", SQL));
        l.server(|b| replies(b, true));
        l.sent();
        l.seen();
        // New server.
        let fresh = l.p.fresh_server();
        l.p.relink(fresh);
        l.client(|b| {
            frontend::bind(b, "", "s1", &[Some(b"1")]);
            frontend::execute(b, "", 0);
            frontend::sync(b);
        });
        let sent = l.sent();
        assert_eq!(tags(&sent), "PBES");
        let srv = server_name(SQL, &[23]);
        assert_eq!(named(b'P', &sent[0].1), srv);
        assert_eq!(named(b'B', &sent[1].1), srv);
        assert_eq!(l.pipe().server_header(b'1'), Disposition::Whole);
        let mut f = BytesMut::new();
        msg(&mut f, b'1', b"");
        let x = l.parts();
        x.pipe.server_frame(f, x.ss, x.to_client);
        assert_eq!(l.seen(), "", "swallowed");
        l.server(|b| replies(b, false));
        assert_eq!(l.seen(), "2DCZ");
        assert!(l.pipe().is_idle() && l.ss().contains(&srv));
    }

    #[test]
    fn close_forgets_the_name() {
        let mut l = Link::new(DEFAULT_MAX);
        l.client(|b| batch(b, "s1", SQL));
        l.server(|b| replies(b, true));
        l.sent();
        l.seen();
        l.client(|b| {
            frontend::close(b, b'S', "s1");
            frontend::sync(b);
        });
        assert_eq!(tags(&l.sent()), "S", "the server keeps its copy");
        assert_eq!(l.seen(), "3");
        assert!(l.cs().is_empty() && l.ss().len() == 1);
        l.server(|b| backend::ready_for_query(b, TransactionStatus::Idle));
        assert_eq!(l.seen(), "Z");
        // Closing an unknown name is fine too.
        l.client(|b| {
            frontend::close(b, b'S', "nope");
            frontend::flush(b);
        });
        assert_eq!(l.seen(), "3");
        assert_eq!(tags(&l.sent()), "H");
        assert!(l.pipe().is_idle());

        // Binding it now fails like PostgreSQL would, and the server skips
        // the Execute.
        l.client(|b| {
            frontend::bind(b, "", "s1", &[Some(b"1")]);
            frontend::execute(b, "", 0);
            frontend::sync(b);
        });
        let sent = l.sent();
        assert_eq!(tags(&sent), "DES");
        assert_eq!(named(b'D', &sent[0].1), MISSING);
        l.server(|b| {
            error(b, "26000");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        let seen = l.seen_frames();
        assert_eq!(tags(&seen), "EZ");
        assert_eq!(
            error_code(&seen[0].1),
            (
                "26000".into(),
                "prepared statement \"s1\" does not exist".into()
            )
        );
        assert!(l.pipe().is_idle());

        // Describe of an unknown name, the error coming before the Sync.
        l.client(|b| {
            frontend::describe(b, b'S', "s2");
            frontend::flush(b);
        });
        l.sent();
        assert!(!l.pipe().is_idle());
        l.server(|b| error(b, "26000"));
        assert_eq!(l.seen(), "E");
        assert!(!l.pipe().is_idle(), "the server skips to the Sync");
        // Whatever comes before the Sync is ignored by the server: dropped.
        l.client(|b| {
            batch(b, "s3", "select 3");
        });
        assert_eq!(tags(&l.sent()), "ES");
        assert!(l.cs().is_empty(), "the skipped Parse did not happen");
        l.server(|b| backend::ready_for_query(b, TransactionStatus::Idle));
        assert_eq!(l.seen(), "Z");
        assert!(l.pipe().is_idle());
    }

    #[test]
    fn error_mid_pipeline_drops_what_follows() {
        let mut l = Link::new(DEFAULT_MAX);
        l.client(|b| batch(b, "cached", SQL));
        l.server(|b| replies(b, true));
        l.sent();
        l.seen();
        // P(cached)/B/E/S then P(new)/B/E/S; the first Execute fails.
        l.client(|b| {
            batch(b, "cached", SQL);
            batch(b, "new", "select 2");
        });
        assert_eq!(tags(&l.sent()), "BESPBES");
        l.server(|b| {
            msg(b, b'2', b"");
            error(b, "22012");
            backend::ready_for_query(b, TransactionStatus::Idle);
            replies(b, true);
        });
        assert_eq!(l.seen(), "12EZ12DCZ");
        assert!(l.pipe().is_idle());

        // A Bind fails: the ParseComplete due after it is never shown and
        // the Parse behind it is rolled back.
        let srv_y = server_name("select 'y'", &[23]);
        l.client(|b| {
            frontend::parse(b, "x", "select 'x'", &[23]);
            frontend::bind(b, "", "x", &[Some(b"bad")]);
            frontend::parse(b, "new", "select 2", &[23]); // cached: synthesized
            frontend::parse(b, "y", "select 'y'", &[23]); // sent
            frontend::bind(b, "", "y", &[Some(b"1")]);
            frontend::execute(b, "", 0);
            frontend::sync(b);
        });
        assert_eq!(tags(&l.sent()), "PBPBES");
        assert!(l.ss().contains(&srv_y) && l.cs().len() == 4);
        l.server(|b| {
            msg(b, b'1', b"");
            error(b, "22P02");
        });
        assert_eq!(l.seen(), "1E");
        assert!(
            !l.ss().contains(&srv_y),
            "the skipped Parse is not prepared"
        );
        l.server(|b| backend::ready_for_query(b, TransactionStatus::Idle));
        assert_eq!(l.seen(), "Z");
        assert!(l.pipe().is_idle());
        // The client's names roll back at its next message.
        l.client(|b| {
            frontend::bind(b, "", "y", &[Some(b"1")]);
            frontend::sync(b);
        });
        assert_eq!(l.cs().len(), 3);
        assert_eq!(tags(&l.sent()), "DS");
        l.server(|b| {
            error(b, "26000");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        let seen = l.seen_frames();
        assert_eq!(
            error_code(&seen[0].1).1,
            "prepared statement \"y\" does not exist"
        );

        // A Parse the server refuses is not prepared, and the name is free.
        l.client(|b| {
            frontend::parse(b, "bad", "selec 1", &[]);
            frontend::sync(b);
        });
        let srv_bad = server_name("selec 1", &[]);
        assert!(l.ss().contains(&srv_bad));
        l.server(|b| {
            error(b, "42601");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        assert_eq!(l.seen(), "EZ");
        assert!(!l.ss().contains(&srv_bad));
        l.client(|b| {
            frontend::parse(b, "bad", "select 1", &[]);
            frontend::sync(b);
        });
        assert_eq!(tags(&l.sent()), "PSPS");
        l.server(|b| {
            msg(b, b'1', b"");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        assert_eq!(l.seen(), "1Z");
    }

    #[test]
    fn reusing_a_name_for_another_statement_fails() {
        let mut l = Link::new(DEFAULT_MAX);
        l.client(|b| batch(b, "s1", SQL));
        l.server(|b| replies(b, true));
        l.sent();
        l.seen();
        // Same statement again: accepted.
        l.client(|b| {
            frontend::parse(b, "s1", SQL, &[23]);
            frontend::sync(b);
        });
        assert_eq!(tags(&l.sent()), "S");
        l.server(|b| backend::ready_for_query(b, TransactionStatus::Idle));
        assert_eq!(l.seen(), "1Z");
        // Another one: 42P05, and the server skips the rest.
        l.client(|b| batch(b, "s1", "select 2"));
        assert_eq!(tags(&l.sent()), "DBES");
        l.server(|b| {
            error(b, "26000");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        let seen = l.seen_frames();
        assert_eq!(tags(&seen), "EZ");
        assert_eq!(
            error_code(&seen[0].1),
            (
                "42P05".into(),
                "prepared statement \"s1\" already exists".into()
            )
        );
        assert_eq!(l.ss().len(), 1);
    }

    #[test]
    fn lru_eviction_closes_the_oldest() {
        let mut l = Link::new(2);
        l.client(|b| {
            frontend::parse(b, "a", "select 'a'", &[]);
            frontend::parse(b, "b", "select 'b'", &[]);
            frontend::parse(b, "c", "select 'c'", &[]);
            frontend::sync(b);
        });
        let sent = l.sent();
        assert_eq!(tags(&sent), "PPCPS");
        let srv_a = server_name("select 'a'", &[]);
        assert_eq!(named(b'C', &sent[2].1), srv_a);
        assert_eq!(sent[2].1[0], b'S');
        assert!(!l.ss().contains(&srv_a) && l.ss().len() == 2);
        l.server(|b| {
            msg(b, b'1', b"");
            msg(b, b'1', b"");
            msg(b, b'3', b"");
            msg(b, b'1', b"");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        assert_eq!(l.seen(), "111Z");
        // Using "a" again prepares it again, evicting "b" (least recent).
        l.client(|b| {
            frontend::bind(b, "", "a", &[]);
            frontend::sync(b);
        });
        let sent = l.sent();
        assert_eq!(tags(&sent), "CPBS");
        assert_eq!(named(b'C', &sent[0].1), server_name("select 'b'", &[]));
        l.server(|b| {
            msg(b, b'3', b"");
            msg(b, b'1', b"");
            msg(b, b'2', b"");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        assert_eq!(l.seen(), "2Z");

        // A skipped eviction leaves the statement on the server.
        let srv_c = server_name("select 'c'", &[]);
        l.client(|b| {
            frontend::execute(b, "", 0);
            frontend::bind(b, "", "b", &[]); // evicts "c"
            frontend::sync(b);
        });
        assert!(!l.ss().contains(&srv_c));
        l.server(|b| {
            error(b, "34000");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        assert_eq!(l.seen(), "EZ");
        assert!(l.ss().contains(&srv_c));
        assert!(!l.ss().contains(&server_name("select 'b'", &[])));
    }

    #[test]
    fn describe_statement_is_renamed() {
        let mut l = Link::new(DEFAULT_MAX);
        l.client(|b| {
            frontend::parse(b, "s1", SQL, &[23]);
            frontend::describe(b, b'S', "s1");
            frontend::describe(b, b'P', "");
            frontend::sync(b);
        });
        let sent = l.sent();
        assert_eq!(tags(&sent), "PDDS");
        let srv = server_name(SQL, &[23]);
        assert_eq!(named(b'D', &sent[1].1), srv);
        assert_eq!(&sent[2].1[..], b"P\0");
        l.server(|b| {
            msg(b, b'1', b"");
            msg(b, b't', b"\0\x01\0\0\0\x17");
            backend::row_description(b, &["int4"]);
            backend::notice_response(b, "NOTICE", "00000", "hi");
            msg(b, b'n', b"");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        assert_eq!(l.seen(), "1tTNnZ");
        // On a fresh server, the Describe first prepares it.
        let fresh = l.p.fresh_server();
        l.p.relink(fresh);
        l.client(|b| {
            frontend::describe(b, b'S', "s1");
            frontend::sync(b);
        });
        assert_eq!(tags(&l.sent()), "PDS");
        l.server(|b| {
            msg(b, b'1', b"");
            msg(b, b't', b"\0\x01\0\0\0\x17");
            msg(b, b'n', b"");
            backend::ready_for_query(b, TransactionStatus::Idle);
        });
        assert_eq!(l.seen(), "tnZ");
    }

    #[test]
    fn cached_parse_then_flush_answers_at_once() {
        let mut l = Link::new(DEFAULT_MAX);
        l.client(|b| batch(b, "s1", SQL));
        l.server(|b| replies(b, true));
        l.sent();
        l.seen();
        let mut other = Link::new(DEFAULT_MAX);
        let fresh = l.p.fresh_server();
        let shared = l.p.relink(fresh);
        other.p.relink(shared);
        other.client(|b| {
            frontend::parse(b, "p", SQL, &[23]);
            frontend::close(b, b'S', "p");
            frontend::flush(b);
        });
        assert_eq!(tags(&other.sent()), "H");
        assert_eq!(other.seen(), "13");
        assert!(other.pipe().is_idle() && other.cs().is_empty());

        // Behind an Execute still running, it waits for its end.
        other.client(|b| {
            frontend::bind(b, "", "", &[]);
            frontend::execute(b, "", 0);
            frontend::parse(b, "p", SQL, &[23]);
            frontend::flush(b);
        });
        assert_eq!(tags(&other.sent()), "BEH");
        assert_eq!(other.seen(), "");
        other.server(|b| {
            msg(b, b'2', b"");
            backend::data_row(b, &[Some("1")]);
        });
        assert_eq!(other.seen(), "2D");
        // A half-arrived CommandComplete: its header was seen, nothing due yet.
        assert_eq!(other.pipe().server_header(b'C'), Disposition::Whole);
        let x = other.parts();
        x.pipe.drain_due(x.to_client);
        assert_eq!(other.seen(), "");
        let mut f = BytesMut::new();
        backend::command_complete(&mut f, "SELECT 1");
        let x = other.parts();
        x.pipe.server_frame(f, x.ss, x.to_client);
        assert_eq!(other.seen(), "C1");
        assert!(other.pipe().is_idle());
    }

    #[test]
    fn the_relay_holds_what_is_due_behind_a_half_arrived_frame() {
        let mut l = Link::new(DEFAULT_MAX);
        l.client(|b| batch(b, "s1", SQL));
        l.server(|b| replies(b, true));
        l.sent();
        l.seen();
        let mut other = Link::new(DEFAULT_MAX);
        let fresh = l.p.fresh_server();
        let shared = l.p.relink(fresh);
        other.p.relink(shared);
        other.client(|b| {
            frontend::bind(b, "", "", &[]);
            frontend::execute(b, "", 0);
            frontend::parse(b, "p", SQL, &[23]);
            frontend::flush(b);
        });
        assert_eq!(tags(&other.sent()), "BEH");
        let mut reply = BytesMut::new();
        msg(&mut reply, b'2', b"");
        backend::data_row(&mut reply, &[Some("1")]);
        backend::command_complete(&mut reply, "SELECT 1");
        let cut = reply.len() - 3;
        other.server(|b| b.extend_from_slice(&reply[..cut]));
        assert_eq!(
            other.seen(),
            "2D",
            "nothing lands inside the CommandComplete"
        );
        other.server(|b| b.extend_from_slice(&reply[cut..]));
        assert_eq!(other.seen(), "C1");
        assert!(other.pipe().is_idle());
    }

    #[test]
    fn simple_query_and_copy_pass_through() {
        let mut l = Link::new(DEFAULT_MAX);
        l.client(|b| frontend::query(b, "copy t from stdin; select 1"));
        let mut dispositions = Vec::new();
        for tag in *b"GCTDCEZ" {
            dispositions.push(l.pipe().server_header(tag));
            if tag == b'G' {
                l.client(|b| {
                    frontend::copy_data(b, b"1\n");
                    frontend::copy_done(b);
                });
            }
        }
        use Disposition::{Pass, Whole};
        assert_eq!(dispositions, [Pass, Pass, Pass, Pass, Pass, Pass, Whole]);
        let mut f = BytesMut::new();
        backend::ready_for_query(&mut f, TransactionStatus::Idle);
        let x = l.parts();
        x.pipe.server_frame(f, x.ss, x.to_client);
        assert!(l.pipe().is_idle());
        // Stray or async messages with nothing owed pass.
        for tag in *b"NASEZ1" {
            assert_eq!(l.pipe().server_header(tag), Whole);
            let mut f = BytesMut::new();
            msg(&mut f, tag, b"");
            let x = l.parts();
            x.pipe.server_frame(f, x.ss, x.to_client);
        }
        assert_eq!(l.seen(), "ZNASEZ1");
        assert!(l.pipe().is_idle());
    }

    #[test]
    fn malformed_client_frames_are_errors() {
        let mut l = Link::new(DEFAULT_MAX);
        for bad in [
            &b""[..],
            b"P\0\0\0",
            b"P\0\0\0\x03",
            b"P\0\0\0\x09ab\0",
            b"P\0\0\0\x04",
            b"B\0\0\0\x06\0x",
            b"D\0\0\0\x07Xa\0",
            b"C\0\0\0\x05S",
        ] {
            let x = l.parts();
            let r = client_frame(BytesMut::from(bad), x.cs, x.ss, x.pipe, x.to_server);
            assert!(r.is_err(), "{bad:?}");
        }
        assert!(l.parts().to_server.is_empty() && l.pipe().is_idle());
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_input_never_panics() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let names = ["", "a", "b", "c"];
        let sqls = ["select 1", "select 2", "select $1"];
        for round in 0..300 {
            let mut l = Link::new(1 + round % 3);
            for _ in 0..200 {
                match rng.below(4) {
                    // Random bytes as a client frame.
                    0 => {
                        let tag = *b"PBDCSEQHdx".get(rng.below(10)).unwrap_or(&b'P');
                        let n = rng.below(24);
                        let mut body: Vec<u8> = (0..n)
                            .map(|_| match rng.below(4) {
                                0 => 0,
                                1 => b'S',
                                2 => b'P',
                                _ => rng.next() as u8,
                            })
                            .collect();
                        if rng.below(2) == 0 {
                            body.push(0);
                        }
                        let mut f = BytesMut::new();
                        msg(&mut f, tag, &body);
                        if rng.below(8) == 0 {
                            let cut = rng.below(f.len() + 1);
                            f.truncate(cut);
                        }
                        let x = l.parts();
                        let _ = client_frame(f, x.cs, x.ss, x.pipe, x.to_server);
                    }
                    // A well-formed client message.
                    1 => {
                        let name = names[rng.below(names.len())];
                        let sql = sqls[rng.below(sqls.len())];
                        let k = rng.below(8);
                        l.client(|b| match k {
                            0 => frontend::parse(b, name, sql, &[]),
                            1 => frontend::bind(b, "", name, &[]),
                            2 => frontend::describe(b, b'S', name),
                            3 => frontend::close(b, b'S', name),
                            4 => frontend::execute(b, "", 0),
                            5 => frontend::sync(b),
                            6 => frontend::flush(b),
                            _ => frontend::query(b, sql),
                        });
                    }
                    // A server message, whole or not, sometimes skipping
                    // the frame (a caller bug must not panic either).
                    _ => {
                        let tag = *b"123tTnCDIsEZNSAGHdc?".get(rng.below(20)).unwrap_or(&b'?');
                        let d = l.pipe().server_header(tag);
                        if d == Disposition::Whole && rng.below(10) != 0 {
                            let mut f = BytesMut::new();
                            let n = rng.below(8);
                            msg(&mut f, tag, &vec![0; n]);
                            let x = l.parts();
                            x.pipe.server_frame(f, x.ss, x.to_client);
                        }
                        if rng.below(3) == 0 {
                            let x = l.parts();
                            x.pipe.drain_due(x.to_client);
                        }
                    }
                }
                assert!(l.ss().len() <= 1 + round % 3 || l.ss().len() <= 4);
                l.clear();
            }
        }
    }
}
