//! LISTEN/NOTIFY in transaction pooling, the worker's part (see `notify`
//! for the shared hubs, channels and rings).
//!
//! - A client between transactions whose request is a simple query made
//!   only of LISTEN/UNLISTEN statements is answered here (`try_listen`):
//!   CommandComplete per statement and ReadyForQuery, no server. A LISTEN
//!   of a channel not yet heard upstream asks worker 0 for it
//!   (`WorkerCmd::Subscribe`) and the client waits until the upstream's
//!   LISTEN is in effect (`WorkerCmd::Listening`), so that nothing
//!   notified after its LISTEN is answered can be missed.
//! - Notifications are written to a client only between transactions
//!   (`deliver`): at once when it is idle, else when its transaction ends
//!   (`unlink_and_release`); at most `DELIVER_LIMIT` bytes at a time, the
//!   rest when its socket has room again. A client that falls out of a
//!   channel's ring gets a WARNING notice saying how many it lost.
//! - Worker 0 keeps one upstream connection per hub (`Conn::Upstream`):
//!   LISTEN/UNLISTEN as clients come and go, NotificationResponses into
//!   the rings, the workers with listeners woken (`WorkerCmd::Notified`).
//!   When it fails it is opened again a second later, every channel is
//!   LISTENed again and the listeners are told that notifications may have
//!   been missed meanwhile.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use log::{debug, info, warn};
use odissey_protocol::backend::{self, TransactionStatus};
use odissey_protocol::scram::ScramCredential;
use odissey_protocol::{codec, frontend};
use odissey_reactor::{Context, Key};

use crate::backend_login::BackendLogin;
use crate::cmd::WorkerCmd;
use crate::config::{PoolMode, ResolvedRoute, StorageType};
use crate::credentials;
use crate::io::Io;
use crate::notify::{self, Channel, Hub, HubKey, ListenStmt};
use crate::worker::client::ClientState;

use super::opening::Opened;
use super::server::{connect_step, step_login, Connect, LoginStep};
use super::{insert_registered, Conn, Worker, WorkerTimer, MAX_ROUNDS};

/// Bytes of notifications written to a client per turn.
const DELIVER_LIMIT: usize = 256 * 1024;

/// How long a lost upstream waits before it is opened again.
const RETRY: Duration = Duration::from_secs(1);

/// A client's channels and where it is in each.
#[derive(Debug)]
pub(crate) struct Listens {
    hub: Arc<Hub>,
    channels: Vec<(Arc<Channel>, u64)>,
    /// The upstream was lost since: tell it notifications may be missing.
    missed: bool,
    /// LISTEN/UNLISTEN answered inside the transaction now open, applied
    /// when it commits.
    pending: Vec<ListenStmt>,
    /// LISTEN/UNLISTEN statements the client prepared (asyncpg prepares
    /// each statement, then binds it), by name: answered here when bound.
    statements: Vec<(Box<str>, Vec<ListenStmt>)>,
    /// The transaction's last closing tag: COMMIT (true) or ROLLBACK.
    end: Option<bool>,
    /// The transaction ended: committed (true) or not; for the worker to
    /// apply `pending` (`listen_block_ended`).
    pub(super) outcome: Option<bool>,
    /// The upstream failed a LISTEN of this transaction: its LISTENs go
    /// to the server instead (which then pins the client, as in session
    /// pooling). Cleared when the transaction ends.
    pub(super) direct: bool,
}

impl Listens {
    fn new(hub: &Arc<Hub>) -> Self {
        Self {
            hub: Arc::clone(hub),
            channels: Vec::new(),
            missed: false,
            pending: Vec::new(),
            statements: Vec::new(),
            end: None,
            outcome: None,
            direct: false,
        }
    }

    fn statement(&self, name: &str) -> Option<&[ListenStmt]> {
        self.statements
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, s)| s.as_slice())
    }

    fn prepare(&mut self, name: &str, stmts: &[ListenStmt]) {
        self.statements.retain(|(n, _)| &**n != name);
        self.statements.push((name.into(), stmts.to_vec()));
    }

    /// Statements wait for their transaction's end.
    pub(super) fn pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// A CommandComplete of the transaction (its body): COMMIT or ROLLBACK
    /// (also a COMMIT of a failed transaction, and ROLLBACK TO).
    pub(super) fn command_done(&mut self, body: &[u8]) {
        let tag = body.split(|&b| b == 0).next().unwrap_or(&[]);
        if tag == b"COMMIT" {
            self.end = Some(true);
        } else if tag == b"ROLLBACK" {
            self.end = Some(false);
        }
    }

    /// A ReadyForQuery with the server's `status`: did the transaction
    /// end, and how? Idle: committed only after a COMMIT (a ROLLBACK, a
    /// failed transaction's COMMIT, PREPARE TRANSACTION forget them).
    /// Still in a transaction: `COMMIT AND CHAIN` commits, `ROLLBACK AND
    /// CHAIN` does not, unless a savepoint was opened since (then the
    /// ROLLBACK was `ROLLBACK TO`, which does not reach back before it).
    pub(super) fn ready(&mut self, status: TransactionStatus, savepoint: bool) {
        let end = self.end.take();
        match status {
            TransactionStatus::Idle => self.outcome = Some(end == Some(true)),
            TransactionStatus::InTransaction => match end {
                Some(true) => self.outcome = Some(true),
                Some(false) if !savepoint => self.outcome = Some(false),
                _ => {}
            },
            TransactionStatus::Failed => {}
        }
    }
}

/// What `try_listen` did.
pub(super) enum Listened {
    /// Not a LISTEN/UNLISTEN query: it needs a server.
    No,
    /// Answered.
    Answered,
    /// Waits for the upstream's LISTEN.
    Waiting,
}

/// The upstream connection of a hub, on worker 0.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(super) io: Io,
    phase: Phase,
    hub: Arc<Hub>,
    route: Arc<ResolvedRoute>,
    /// Channels LISTENed (confirmed).
    heard: Vec<Arc<str>>,
    /// Statements sent and not yet answered: (channel, LISTEN?).
    sent: VecDeque<(Arc<str>, bool)>,
    /// Reconnected after a loss: tell the listeners once LISTENing again.
    reconnected: bool,
}

#[derive(Debug)]
enum Phase {
    Connecting(BackendLogin),
    LoggingIn(BackendLogin),
    Ready,
}

/// A request at the head of `rx` that may be LISTEN/UNLISTEN, whole (up
/// to its Sync in the extended protocol), and its length.
#[derive(Debug, PartialEq, Eq)]
struct Head<'a> {
    /// A Query's text, or its Parse's.
    sql: Option<&'a str>,
    len: usize,
    /// The extended protocol's messages; None for a simple Query.
    ext: Option<Ext<'a>>,
}

/// What an extended-protocol LISTEN request is made of, in this order:
/// Parse, Describe statement, Bind, Describe portal, Execute, Sync (or
/// Flush).
/// psycopg sends the unnamed Parse/Bind/Describe/Execute/Sync at once;
/// asyncpg prepares a named statement (Parse/Describe/Flush), then binds
/// and executes it (Bind/Execute/Sync).
#[derive(Debug, Default, PartialEq, Eq)]
struct Ext<'a> {
    /// The statement named by its Parse.
    parse: Option<&'a str>,
    describe_statement: bool,
    /// The statement its Bind binds (to the unnamed portal).
    bind: Option<&'a str>,
    describe_portal: bool,
    execute: bool,
    /// It ends with a Flush, not a Sync.
    flush: bool,
}

/// One complete frame at `rx[at..]`: (tag, body, next offset).
fn frame_at(rx: &[u8], at: usize) -> Option<(u8, &[u8], usize)> {
    let tag = *rx.get(at)?;
    let len = u32::from_be_bytes(rx.get(at + 1..at + 5)?.try_into().ok()?) as usize;
    let body = rx.get(at + 5..at + 1 + len.max(4))?;
    Some((tag, body, at + 1 + len.max(4)))
}

fn cstr(b: &[u8]) -> Option<(&str, &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((std::str::from_utf8(&b[..end]).ok()?, &b[end + 1..]))
}

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes(
        b.get(at..at + 2)?.try_into().ok()?,
    )))
}

/// A request at the head of `rx` that may be LISTEN/UNLISTEN: a Query, or
/// extended-protocol messages up to a Sync with no parameters. `binds`:
/// the client has LISTEN statements prepared, so a request that starts
/// with a Bind may be one.
fn head_query(rx: &[u8], binds: bool) -> Option<Head<'_>> {
    // Every request's first message comes here: anything whose text
    // cannot start with LISTEN or UNLISTEN is let go before it is read.
    let text_at = match rx.first()? {
        b'Q' => 5,
        // Parse: the statement's name, then the query.
        b'P' => 6 + rx.get(5..)?.iter().take(256).position(|&b| b == 0)?,
        b'B' if binds => 0,
        _ => return None,
    };
    if text_at > 0 {
        let first = rx
            .get(text_at..)?
            .iter()
            .take(64)
            .find(|b| !b.is_ascii_whitespace())?;
        if !matches!(first, b'l' | b'L' | b'u' | b'U') {
            return None;
        }
    }
    let (mut tag, mut body, mut next) = frame_at(rx, 0)?;
    if tag == b'Q' {
        return Some(Head {
            sql: Some(cstr(body)?.0),
            len: next,
            ext: None,
        });
    }
    let mut ext = Ext::default();
    let mut sql = None;
    if tag == b'P' {
        let (name, rest) = cstr(body)?;
        let (text, rest) = cstr(rest)?;
        // No parameter types: LISTEN has no parameters.
        if u16_at(rest, 0)? != 0 {
            return None;
        }
        ext.parse = Some(name);
        sql = Some(text);
        (tag, body, next) = frame_at(rx, next)?;
        if tag == b'D' && body.first() == Some(&b'S') {
            if cstr(&body[1..])?.0 != name {
                return None;
            }
            ext.describe_statement = true;
            (tag, body, next) = frame_at(rx, next)?;
        }
    }
    if tag == b'B' {
        let (portal, rest) = cstr(body)?;
        let (stmt, rest) = cstr(rest)?;
        // Parameter formats may be given; no parameters may (result
        // formats do not matter: there is no result).
        let formats = u16_at(rest, 0)?;
        if !portal.is_empty()
            || ext.parse.is_some_and(|p| p != stmt)
            || u16_at(rest, 2 + 2 * formats)? != 0
        {
            return None;
        }
        ext.bind = Some(stmt);
        (tag, body, next) = frame_at(rx, next)?;
        if tag == b'D' {
            if body.first() != Some(&b'P') || !cstr(&body[1..])?.0.is_empty() {
                return None;
            }
            ext.describe_portal = true;
            (tag, body, next) = frame_at(rx, next)?;
        }
        if tag != b'E' || !cstr(body)?.0.is_empty() {
            return None;
        }
        ext.execute = true;
        (tag, _, next) = frame_at(rx, next)?;
    }
    // A Sync, or (asyncpg's prepare) a Flush after a Parse that nothing
    // executes: answered without a ReadyForQuery.
    ext.flush = tag == b'H' && !ext.execute;
    (tag == b'S' || ext.flush).then_some(Head {
        sql,
        len: next,
        ext: Some(ext),
    })
}

/// The client has LISTEN statements prepared: a Bind may be of one.
fn binds(c: &super::client::Client) -> bool {
    c.listens.as_ref().is_some_and(|l| !l.statements.is_empty())
}

impl Worker {
    /// A request of an idle client: answered here when it is only LISTEN
    /// and UNLISTEN statements (transaction and statement pooling).
    pub(super) fn try_listen(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key) -> Listened {
        self.listen_request(cx, ck, false)
    }

    /// The same for a client inside a transaction on its server: answered
    /// here (its ReadyForQuery says "in transaction"), and the statements
    /// take effect when the transaction commits (`listen_block_ended`),
    /// as in PostgreSQL. Left to the server when it cannot be done so: a
    /// request of the client's still in flight, a failed transaction (the
    /// server's error is the right answer), a savepoint that a `ROLLBACK
    /// TO` could undo, or a channel the upstream could not LISTEN to.
    pub(super) fn try_listen_linked(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
    ) -> Listened {
        let Some(Conn::Client(c)) = self.conns.get(ck) else {
            return Listened::No;
        };
        // Cheap tests first: this runs before every linked pump.
        if !c.io.rx.is_empty() && head_query(&c.io.rx, binds(c)).is_none() {
            self.forget_unnamed(ck);
            return Listened::No;
        }
        if c.io.rx.is_empty()
            || c.savepoint
            || c.listens.as_ref().is_some_and(|l| l.direct)
            || !c.conv.settled()
            || !c.relay.at_boundary()
            || c.prepared.as_ref().is_some_and(|p| !p.pipeline.is_idle())
        {
            return Listened::No;
        }
        let Some(Conn::Server(s)) = c.server.and_then(|sk| self.conns.get(sk)) else {
            return Listened::No;
        };
        if s.status != TransactionStatus::InTransaction
            || !s.relay.at_boundary()
            || !s.io.rx.is_empty()
        {
            return Listened::No;
        }
        self.listen_request(cx, ck, true)
    }

    fn listen_request(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        in_block: bool,
    ) -> Listened {
        let Some(Conn::Client(c)) = self.conns.get(ck) else {
            return Listened::No;
        };
        let (Some(route), Some(pool)) = (&c.route, &c.pool) else {
            return Listened::No;
        };
        if route.route.pool == PoolMode::Session || route.storage.kind == StorageType::Local {
            return Listened::No;
        }
        let Some(head) = head_query(&c.io.rx, binds(c)) else {
            self.forget_unnamed(ck);
            return Listened::No;
        };
        let Some(stmts) = (match (head.sql, &head.ext) {
            (Some(sql), _) => notify::parse_listen(sql),
            // A Bind of a statement prepared earlier.
            (
                None,
                Some(Ext {
                    bind: Some(name), ..
                }),
            ) => c
                .listens
                .as_ref()
                .and_then(|l| l.statement(name))
                .map(<[ListenStmt]>::to_vec),
            _ => None,
        }) else {
            self.forget_unnamed(ck);
            return Listened::No;
        };
        // One statement only through the extended protocol, as PostgreSQL.
        if head.ext.is_some() && stmts.len() != 1 {
            return Listened::No;
        }
        let len = head.len;
        let flush = head.ext.as_ref().is_some_and(|e| e.flush);
        let ext = head.ext.map(|e| {
            (
                e.parse.map(str::to_string),
                e.describe_statement,
                e.bind.is_some(),
                e.describe_portal,
                e.execute,
            )
        });
        // Only an executed statement takes effect (a Parse alone prepares it).
        let executes = ext.as_ref().is_none_or(|e| e.4);
        let route = Arc::clone(route);
        let key = HubKey {
            storage: route.route.storage.as_str().into(),
            host: route.endpoint(pool.host).label().into(),
            database: route.server_db.as_str().into(),
        };
        let hub = match &c.listens {
            Some(l) if l.hub.key == key => Arc::clone(&l.hub),
            _ => {
                let cfg = &self.w.cfg;
                self.w.registry.notes.hub(
                    key,
                    self.w.peers.len().max(1),
                    cfg.notify_buffer,
                    cfg.notify_buffer_bytes,
                )
            }
        };
        // Every channel it LISTENs to must be heard upstream first.
        let mut missing = None;
        for s in stmts.iter().filter(|_| executes) {
            if let ListenStmt::Listen(name) = s {
                let ch = hub.channel(name);
                if !ch.active.load(Ordering::Acquire) {
                    if !ch.requested.swap(true, Ordering::AcqRel) {
                        self.subscribe_upstream(cx, &hub, &route);
                    }
                    missing = Some(ch);
                }
            }
        }
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return Listened::No;
        };
        let listens = c
            .listens
            .get_or_insert_with(|| Box::new(Listens::new(&hub)));
        if let Some(ch) = missing {
            debug!("waiting for LISTEN {} upstream", ch.name);
            self.w.listen_waits.push((ch, ck));
            return Listened::Waiting;
        }
        if let Some((Some(name), ..)) = &ext {
            listens.prepare(name, &stmts);
        }
        if executes {
            if in_block {
                listens.pending.extend(stmts.iter().cloned());
            } else if !self.register(cx, ck, &hub, &route, &stmts, true) {
                return Listened::Waiting;
            }
        }
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return Listened::No;
        };
        let _ = c.io.rx.split_to(len.min(c.io.rx.len()));
        let out = &mut c.io.out;
        let (parse, describe_statement, bind, describe_portal, execute) =
            ext.map_or((None, false, false, false, true), |e| e);
        if parse.is_some() {
            backend::parse_complete(out);
        }
        if describe_statement {
            backend::parameter_description(out, &[]);
            backend::no_data(out);
        }
        if bind {
            backend::bind_complete(out);
        }
        if describe_portal {
            backend::no_data(out);
        }
        for s in stmts.iter().filter(|_| execute) {
            let tag = if matches!(s, ListenStmt::Listen(_)) {
                "LISTEN"
            } else {
                "UNLISTEN"
            };
            backend::command_complete(out, tag);
        }
        let status = if in_block {
            TransactionStatus::InTransaction
        } else {
            TransactionStatus::Idle
        };
        if !flush {
            backend::ready_for_query(out, status);
        }
        c.io.flush();
        // Notifications wait for a ReadyForQuery, as PostgreSQL's do.
        if !in_block && !flush {
            self.deliver(cx, ck);
        }
        Listened::Answered
    }

    /// A request that is not a LISTEN of odissey's replaces the client's
    /// unnamed statement (a Parse) or drops it (a Query), as PostgreSQL's
    /// would: a LISTEN prepared unnamed is forgotten.
    fn forget_unnamed(&mut self, ck: Key) {
        if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
            if matches!(c.io.rx.first(), Some(b'P' | b'Q')) {
                if let Some(l) = c.listens.as_deref_mut() {
                    l.statements.retain(|(n, _)| !n.is_empty());
                }
            }
        }
    }

    /// Makes `stmts` the client's: LISTENs counted on their channels (read
    /// from now on), UNLISTENs left. A channel worker 0 forgot meanwhile
    /// is asked for again: with `can_wait` the client waits for it (false
    /// returned, nothing changed), else it is listened to at once and gets
    /// what comes once the upstream hears it.
    fn register(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        hub: &Arc<Hub>,
        route: &Arc<ResolvedRoute>,
        stmts: &[ListenStmt],
        can_wait: bool,
    ) -> bool {
        let me = self.w.id;
        let mut left = Vec::new();
        let mut added: Vec<Arc<Channel>> = Vec::new();
        for s in stmts {
            let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
                return true;
            };
            let listens = c.listens.get_or_insert_with(|| Box::new(Listens::new(hub)));
            match s {
                ListenStmt::Listen(name) => {
                    if listens.channels.iter().any(|(ch, _)| &*ch.name == name) {
                        continue;
                    }
                    let mut ch = hub.channel(name);
                    ch.count(me, true);
                    // Worker 0 forgets a channel whose count it saw at 0
                    // under the hub's lock: counted first, then looked up
                    // again, this LISTEN either kept it or sees it gone
                    // (and waits for a fresh one, as on a first LISTEN).
                    let kept = hub.find(name).is_some_and(|c| Arc::ptr_eq(&c, &ch))
                        && ch.active.load(Ordering::Acquire);
                    if !kept {
                        ch.count(me, false);
                        let fresh = hub.channel(name);
                        if !fresh.requested.swap(true, Ordering::AcqRel) {
                            self.subscribe_upstream(cx, hub, route);
                        }
                        if can_wait {
                            self.w.listen_waits.push((fresh, ck));
                            // Undone: the request is answered whole later.
                            for ch in added {
                                self.leave_channel(cx, ck, &ch);
                            }
                            return false;
                        }
                        fresh.count(me, true);
                        ch = fresh;
                    }
                    let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
                        return true;
                    };
                    let listens = c.listens.get_or_insert_with(|| Box::new(Listens::new(hub)));
                    let at = ch.cursor_now();
                    self.w
                        .listening
                        .entry(Arc::as_ptr(&ch) as usize)
                        .or_insert_with(|| (Arc::clone(&ch), Vec::new()))
                        .1
                        .push(ck);
                    listens.channels.push((Arc::clone(&ch), at));
                    added.push(ch);
                }
                ListenStmt::Unlisten(name) => {
                    if let Some(i) = listens
                        .channels
                        .iter()
                        .position(|(ch, _)| &*ch.name == name)
                    {
                        left.push(listens.channels.swap_remove(i).0);
                    }
                }
                ListenStmt::UnlistenAll => {
                    left.extend(listens.channels.drain(..).map(|(ch, _)| ch))
                }
            }
        }
        for ch in left {
            self.leave_channel(cx, ck, &ch);
        }
        true
    }

    /// The transaction of a client that LISTENed or UNLISTENed in it
    /// ended (`Listens::ready`): committed, what it asked takes effect now;
    /// rolled back, it is forgotten.
    pub(super) fn listen_block_ended(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        let Some(l) = c.listens.as_deref_mut() else {
            return;
        };
        let Some(committed) = l.outcome.take() else {
            return;
        };
        let stmts = std::mem::take(&mut l.pending);
        let hub = Arc::clone(&l.hub);
        let Some(route) = c.route.clone() else {
            return;
        };
        debug!(
            "{}: transaction with {} LISTEN/UNLISTEN {}",
            c.id,
            stmts.len(),
            if committed {
                "committed"
            } else {
                "rolled back"
            }
        );
        if committed {
            self.register(cx, ck, &hub, &route, &stmts, false);
        }
    }

    /// Asks worker 0 to LISTEN upstream to the channels of `hub` it does
    /// not yet.
    fn subscribe_upstream(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        hub: &Arc<Hub>,
        route: &Arc<ResolvedRoute>,
    ) {
        if self.w.id == 0 {
            self.upstream_wants(cx, Arc::clone(hub), Arc::clone(route));
        } else if let Some(zero) = self.w.peers.first() {
            let _ = zero.send(WorkerCmd::Subscribe {
                hub: Arc::clone(hub),
                route: Arc::clone(route),
            });
        }
    }

    /// `ck` stops listening to `ch` (UNLISTEN, or it left).
    fn leave_channel(&mut self, _cx: &mut Context<'_, WorkerTimer>, ck: Key, ch: &Arc<Channel>) {
        ch.count(self.w.id, false);
        let ptr = Arc::as_ptr(ch) as usize;
        if let Some((_, keys)) = self.w.listening.get_mut(&ptr) {
            keys.retain(|&k| k != ck);
            if keys.is_empty() {
                self.w.listening.remove(&ptr);
            }
        }
        if ch.listening() == 0 {
            // Worker 0 UNLISTENs upstream if nobody listens by then.
            if let Some(zero) = self.w.peers.first() {
                let _ = zero.send(WorkerCmd::Unsubscribe {
                    channel: Arc::clone(ch),
                });
            }
        }
    }

    /// A client closes: its channels go.
    pub(super) fn stop_listening(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        let Some(l) = c.listens.take() else {
            self.w.listen_waits.retain(|(_, k)| *k != ck);
            return;
        };
        self.w.listen_waits.retain(|(_, k)| *k != ck);
        for (ch, _) in l.channels {
            self.leave_channel(cx, ck, &ch);
        }
    }

    /// Writes what `ck`'s channels hold for it, if it is between
    /// transactions and its output has room.
    pub(super) fn deliver(&mut self, _cx: &mut Context<'_, WorkerTimer>, ck: Key) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        if !matches!(c.state, ClientState::Idle) || c.io.out.len() >= DELIVER_LIMIT {
            return;
        }
        let Some(l) = c.listens.as_mut() else {
            return;
        };
        if std::mem::take(&mut l.missed) {
            backend::notice_response(
                &mut c.io.out,
                "WARNING",
                "01000",
                "notifications may have been missed: odissey lost its connection to the server that listens for them and listens again now",
            );
        }
        for (ch, cursor) in &mut l.channels {
            let (at, missed) = ch.read(*cursor, &mut c.io.out, DELIVER_LIMIT);
            *cursor = at;
            if missed > 0 {
                backend::notice_response(
                    &mut c.io.out,
                    "WARNING",
                    "54000",
                    &format!(
                        "{missed} notification(s) on channel \"{}\" were dropped: this client did not read them in time (notify_buffer)",
                        ch.name
                    ),
                );
            }
        }
        c.io.flush();
    }

    /// New notifications on `ch`: its listeners here get them.
    pub(super) fn notified(&mut self, cx: &mut Context<'_, WorkerTimer>, ch: &Channel) {
        let ptr = ch as *const Channel as usize;
        let keys = match self.w.listening.get(&ptr) {
            Some((_, keys)) => keys.clone(),
            None => return,
        };
        for ck in keys {
            self.deliver(cx, ck);
        }
    }

    /// The clients waiting for `ch` to be heard upstream, out of the list.
    fn take_waits(&mut self, ch: &Channel) -> Vec<Key> {
        let (go, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut self.w.listen_waits)
            .into_iter()
            .partition(|(c, _)| std::ptr::eq(Arc::as_ptr(c), ch));
        self.w.listen_waits = stay;
        go.into_iter().map(|(_, ck)| ck).collect()
    }

    /// The upstream LISTENs to `ch` now: the clients waiting for it go on.
    pub(super) fn listening(&mut self, cx: &mut Context<'_, WorkerTimer>, ch: &Channel) {
        for ck in self.take_waits(ch) {
            self.drive_client(cx, ck);
        }
    }

    /// The upstream of `hub` was lost and is back: its listeners here hear
    /// that notifications may have been missed.
    pub(super) fn relistened(&mut self, cx: &mut Context<'_, WorkerTimer>, hub: &Hub) {
        let keys: Vec<Key> = self
            .w
            .listening
            .values()
            .filter(|(ch, _)| hub.find(&ch.name).is_some_and(|c| Arc::ptr_eq(&c, ch)))
            .flat_map(|(_, keys)| keys.iter().copied())
            .collect();
        for ck in keys {
            if let Some(Conn::Client(c)) = self.conns.get_mut(ck) {
                if let Some(l) = c.listens.as_mut() {
                    l.missed = true;
                }
            }
            self.deliver(cx, ck);
        }
    }

    /// Worker 0: `hub` needs its channels heard; opens its upstream if it
    /// has none, and LISTENs to what it does not hear yet.
    pub(super) fn upstream_wants(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        hub: Arc<Hub>,
        route: Arc<ResolvedRoute>,
    ) {
        match self.w.upstreams.get(&hub.key) {
            Some(&k) => {
                self.send_listens(k);
                self.drive_upstream(cx, k);
            }
            None => self.open_upstream(cx, hub, route, false),
        }
    }

    fn open_upstream(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        hub: Arc<Hub>,
        route: Arc<ResolvedRoute>,
        reconnected: bool,
    ) {
        let Some(endpoint) = route
            .endpoints
            .iter()
            .find(|e| *e.label() == *hub.key.host)
            .cloned()
        else {
            return;
        };
        let stream = match self.open_storage(cx, &endpoint) {
            Opened::Stream(s) => s,
            Opened::Failed(f) => {
                warn!("LISTEN connection to {}: {f}", hub.key.host);
                self.upstream_failed(cx, &hub, &f.to_string());
                return;
            }
            Opened::Wait => {
                // Tried again once the name is resolved.
                cx.set_timer(
                    cx.now() + RETRY,
                    WorkerTimer::UpstreamRetry(Arc::clone(&hub), route),
                );
                return;
            }
        };
        let mut io = Io::new(stream, false);
        let credential = route
            .server_password
            .clone()
            .map(ScramCredential::Password)
            .or_else(|| credentials::credential(&route.route.storage, &route.server_user));
        let ask = self.w.ask_tls(&route);
        let login = BackendLogin::start(
            &mut io.out,
            &route.server_db,
            &route.server_user,
            credential,
            ask,
        );
        let key = hub.key.clone();
        let (k, failed) = insert_registered(&mut self.conns, cx.registry(), io, |_, io| {
            Conn::Upstream(Box::new(Upstream {
                io,
                phase: Phase::Connecting(login),
                hub,
                route,
                heard: Vec::new(),
                sent: VecDeque::new(),
                reconnected,
            }))
        });
        info!(
            "LISTEN connection to {} (database {}) opened for transaction-pooled listeners",
            key.host, key.database
        );
        self.w.upstreams.insert(key, k);
        if failed.is_some() {
            self.drop_upstream(cx, k, "cannot poll the connection");
        }
    }

    /// LISTEN/UNLISTEN what the hub's channels ask and the upstream does
    /// not have (once logged in).
    fn send_listens(&mut self, k: Key) {
        let Some(Conn::Upstream(u)) = self.conns.get_mut(k) else {
            return;
        };
        if !matches!(u.phase, Phase::Ready) {
            return;
        }
        for ch in u.hub.channels() {
            let heard = u.heard.iter().any(|n| *n == ch.name)
                || u.sent.iter().any(|(n, l)| *n == ch.name && *l);
            if !heard && ch.listening() + usize::from(ch.requested.load(Ordering::Acquire)) > 0 {
                frontend::query(&mut u.io.out, &notify::statement("LISTEN", &ch.name));
                u.sent.push_back((Arc::clone(&ch.name), true));
            }
        }
        u.io.writable = true;
        u.io.flush();
    }

    /// Worker 0: nobody listens to `ch` any more (as far as a worker saw):
    /// UNLISTEN it upstream, and close the upstream when no channel is left.
    pub(super) fn upstream_unwanted(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ch: &Arc<Channel>,
    ) {
        let hubs: Vec<(HubKey, Key)> = self
            .w
            .upstreams
            .iter()
            .map(|(h, k)| (h.clone(), *k))
            .collect();
        for (key, k) in hubs {
            let Some(Conn::Upstream(u)) = self.conns.get_mut(k) else {
                continue;
            };
            if !u.hub.find(&ch.name).is_some_and(|c| Arc::ptr_eq(&c, ch)) {
                continue;
            }
            if !u.hub.forget_if_unheard(&ch.name) {
                return;
            }
            ch.active.store(false, Ordering::Release);
            ch.requested.store(false, Ordering::Release);
            u.heard.retain(|n| *n != ch.name);
            if matches!(u.phase, Phase::Ready) {
                frontend::query(&mut u.io.out, &notify::statement("UNLISTEN", &ch.name));
                u.sent.push_back((Arc::clone(&ch.name), false));
                u.io.writable = true;
                u.io.flush();
            }
            if u.hub.is_empty() {
                self.w.registry.notes.drop_if_empty(&key);
                self.drop_upstream(cx, k, "no client listens any more");
            }
            return;
        }
    }

    /// Moves an upstream on: login, LISTEN answers, notifications.
    pub(super) fn drive_upstream(&mut self, cx: &mut Context<'_, WorkerTimer>, k: Key) {
        let readahead = self.w.cfg.readahead;
        for _ in 0..MAX_ROUNDS {
            let Some(Conn::Upstream(u)) = self.conns.get_mut(k) else {
                return;
            };
            let phase = std::mem::replace(&mut u.phase, Phase::Ready);
            match phase {
                Phase::Connecting(login) => {
                    let endpoint = u.route.endpoint(0).clone();
                    match connect_step(&mut u.io, &endpoint) {
                        Connect::Done => u.phase = Phase::LoggingIn(login),
                        Connect::Pending => {
                            u.phase = Phase::Connecting(login);
                            return;
                        }
                        Connect::Failed(why) => {
                            self.drop_upstream(cx, k, &why);
                            return;
                        }
                    }
                }
                Phase::LoggingIn(mut login) => {
                    let moved = u.io.flush();
                    let tls = self.w.tls.storage.get(&u.route.route.storage);
                    let host = u.route.endpoint(0).host.clone();
                    let (more, step) = step_login(&mut u.io, &mut login, tls, &host, readahead);
                    match step {
                        LoginStep::Pending => {
                            u.phase = Phase::LoggingIn(login);
                            if !(moved || more) {
                                return;
                            }
                        }
                        LoginStep::Ready => {
                            u.phase = Phase::Ready;
                            self.send_listens(k);
                        }
                        LoginStep::Failed(f) => {
                            let why = format!("{f} ({})", f.code());
                            self.drop_upstream(cx, k, &why);
                            return;
                        }
                    }
                }
                Phase::Ready => {
                    let mut moved = u.io.flush();
                    moved |= u.io.fill(readahead);
                    let mut touched: Vec<Arc<Channel>> = Vec::new();
                    let mut confirmed: Vec<Arc<Channel>> = Vec::new();
                    while let Ok(Some(f)) = codec::read_frame(&mut u.io.rx, 1 << 30) {
                        match f.tag {
                            b'A' => {
                                let Some(ch) =
                                    notify::channel_of(&f.body).and_then(|n| u.hub.find(n))
                                else {
                                    continue;
                                };
                                let mut frame = bytes::BytesMut::with_capacity(f.body.len() + 5);
                                frame.extend_from_slice(b"A");
                                frame.extend_from_slice(&((f.body.len() + 4) as u32).to_be_bytes());
                                frame.extend_from_slice(&f.body);
                                ch.push(Bytes::from(frame));
                                if !touched.iter().any(|c| Arc::ptr_eq(c, &ch)) {
                                    touched.push(ch);
                                }
                            }
                            b'E' => {
                                let why = backend::parse_error_fields(&f.body)
                                    .map_or_else(|e| e.to_string(), |e| e.message);
                                warn!("LISTEN connection to {}: {why}", u.hub.key.host);
                            }
                            b'Z' => {
                                if let Some((name, listen)) = u.sent.pop_front() {
                                    if listen {
                                        u.heard.push(Arc::clone(&name));
                                        if let Some(ch) = u.hub.find(&name) {
                                            ch.active.store(true, Ordering::Release);
                                            confirmed.push(ch);
                                        }
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    let eof = u.io.eof;
                    let reconnected = u.sent.is_empty() && std::mem::take(&mut u.reconnected);
                    let hub = Arc::clone(&u.hub);
                    for ch in &confirmed {
                        for (i, peer) in self.w.peers.iter().enumerate() {
                            if i != self.w.id {
                                let _ = peer.send(WorkerCmd::Listening {
                                    channel: Arc::clone(ch),
                                });
                            }
                        }
                        self.listening(cx, ch);
                    }
                    for ch in &touched {
                        for w in ch.workers() {
                            if w == self.w.id {
                                continue;
                            }
                            if let Some(peer) = self.w.peers.get(w) {
                                let _ = peer.send(WorkerCmd::Notified {
                                    channel: Arc::clone(ch),
                                });
                            }
                        }
                        self.notified(cx, ch);
                    }
                    if reconnected {
                        for (i, peer) in self.w.peers.iter().enumerate() {
                            if i != self.w.id {
                                let _ = peer.send(WorkerCmd::Relistened {
                                    hub: Arc::clone(&hub),
                                });
                            }
                        }
                        self.relistened(cx, &hub);
                    }
                    if eof {
                        self.drop_upstream(cx, k, "the server closed the connection");
                        return;
                    }
                    if !moved {
                        return;
                    }
                }
            }
        }
        self.w.again.push(k);
        cx.again();
    }

    /// An upstream is gone: opened again in a second while its hub has
    /// listeners (every channel LISTENed anew), else forgotten.
    pub(super) fn drop_upstream(&mut self, cx: &mut Context<'_, WorkerTimer>, k: Key, why: &str) {
        let Some(Conn::Upstream(u)) = self.conns.get_mut(k) else {
            return;
        };
        if !u.io.eof {
            frontend::terminate(&mut u.io.out);
            u.io.writable = true;
            u.io.flush();
        }
        let (hub, route) = (Arc::clone(&u.hub), Arc::clone(&u.route));
        let was_ready = !u.heard.is_empty();
        self.kill(k);
        if self.w.upstreams.get(&hub.key) == Some(&k) {
            self.w.upstreams.remove(&hub.key);
        }
        for ch in hub.channels() {
            ch.active.store(false, Ordering::Release);
        }
        if hub.is_empty() || self.w.draining {
            info!("LISTEN connection to {} closed: {why}", hub.key.host);
            return;
        }
        warn!(
            "LISTEN connection to {} lost: {why}; opening it again in {} ms",
            hub.key.host,
            RETRY.as_millis()
        );
        if !was_ready {
            // Never listened: the clients waiting for it hear why.
            self.upstream_failed(cx, &hub, why);
        }
        cx.set_timer(cx.now() + RETRY, WorkerTimer::UpstreamRetry(hub, route));
    }

    /// Worker 0, a second after a loss: the upstream again.
    pub(super) fn upstream_retry(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        hub: Arc<Hub>,
        route: Arc<ResolvedRoute>,
    ) {
        if self.w.upstreams.contains_key(&hub.key) || hub.is_empty() || self.w.draining {
            return;
        }
        self.open_upstream(cx, hub, route, true);
    }

    /// The upstream could not be opened: every client waiting for one of
    /// its channels gets an ErrorResponse (its connection stays).
    fn upstream_failed(&mut self, cx: &mut Context<'_, WorkerTimer>, hub: &Arc<Hub>, why: &str) {
        for ch in hub.channels() {
            ch.requested.store(false, Ordering::Release);
            for (i, peer) in self.w.peers.iter().enumerate() {
                if i != self.w.id {
                    let _ = peer.send(WorkerCmd::ListenFailed {
                        channel: Arc::clone(&ch),
                        why: why.to_string(),
                    });
                }
            }
            self.listen_failed(cx, &ch, why);
        }
    }

    /// The clients waiting for `ch` to be heard hear why it is not.
    pub(super) fn listen_failed(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ch: &Channel,
        why: &str,
    ) {
        for ck in self.take_waits(ch) {
            let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
                continue;
            };
            if c.server.is_some() {
                // Inside a transaction: its server runs the LISTEN (and
                // keeps the client, as in session pooling) rather than an
                // error the server's transaction would not share.
                if let Some(l) = c.listens.as_deref_mut() {
                    l.direct = true;
                }
                self.drive_client(cx, ck);
                continue;
            }
            if let Some(head) = head_query(&c.io.rx, true) {
                let len = head.len;
                let _ = c.io.rx.split_to(len.min(c.io.rx.len()));
            }
            backend::error_response(
                &mut c.io.out,
                "ERROR",
                "08006",
                &format!(
                    "odissey could not LISTEN to channel \"{}\" on the server: {why}",
                    ch.name
                ),
                None,
            );
            backend::ready_for_query(&mut c.io.out, TransactionStatus::Idle);
            c.io.flush();
            self.drive_client(cx, ck);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use odissey_protocol::frontend;

    fn listens() -> Listens {
        let hub = Arc::new(Hub::new(
            HubKey {
                storage: "s".into(),
                host: "h:1".into(),
                database: "d".into(),
            },
            1,
            8,
            1024,
        ));
        let mut l = Listens::new(&hub);
        l.pending.push(ListenStmt::Listen("a".into()));
        l
    }

    #[test]
    fn a_transaction_block_ends_as_its_closing_tag_and_status_say() {
        use TransactionStatus::{Failed, Idle, InTransaction};
        // (tags before the ReadyForQuery, its status, a savepoint opened
        // since the LISTEN) -> committed?
        type Case = (
            &'static [&'static [u8]],
            TransactionStatus,
            bool,
            Option<bool>,
        );
        let cases: &[Case] = &[
            (&[b"COMMIT\0"], Idle, false, Some(true)),
            (&[b"ROLLBACK\0"], Idle, false, Some(false)),
            // COMMIT of a failed transaction answers ROLLBACK.
            (&[b"ROLLBACK\0"], Idle, true, Some(false)),
            (&[b"PREPARE TRANSACTION\0"], Idle, false, Some(false)),
            (&[b"SELECT 1\0"], InTransaction, false, None),
            (&[b"SELECT 1\0"], Failed, false, None),
            (&[b"COMMIT\0"], InTransaction, false, Some(true)),
            (&[b"ROLLBACK\0"], InTransaction, false, Some(false)),
            // ROLLBACK TO a savepoint opened after the LISTEN.
            (&[b"ROLLBACK\0"], InTransaction, true, None),
            (&[b"SAVEPOINT\0", b"RELEASE\0"], InTransaction, true, None),
        ];
        for (tags, status, savepoint, want) in cases {
            let mut l = listens();
            for t in *tags {
                l.command_done(t);
            }
            l.ready(*status, *savepoint);
            assert_eq!(l.outcome, *want, "{tags:?} {status:?} {savepoint}");
            // The tag does not outlive its ReadyForQuery.
            l.outcome = None;
            l.ready(InTransaction, false);
            assert_eq!(l.outcome, None);
        }
    }

    #[test]
    fn listen_requests_are_found_in_both_protocols() {
        let mut b = BytesMut::new();
        frontend::query(&mut b, "LISTEN a");
        let h = head_query(&b, false).unwrap();
        assert_eq!((h.sql, h.len, h.ext), (Some("LISTEN a"), b.len(), None));
        // psycopg's execute(): Parse, Bind, Describe portal, Execute, Sync.
        let mut b = BytesMut::new();
        frontend::parse(&mut b, "", "LISTEN a", &[]);
        frontend::bind(&mut b, "", "", &[]);
        frontend::describe(&mut b, b'P', "");
        frontend::execute(&mut b, "", 0);
        frontend::sync(&mut b);
        let h = head_query(&b, false).unwrap();
        let ext = Ext {
            parse: Some(""),
            bind: Some(""),
            describe_portal: true,
            execute: true,
            ..Ext::default()
        };
        assert_eq!(
            (h.sql, h.len, h.ext),
            (Some("LISTEN a"), b.len(), Some(ext))
        );
        // asyncpg's fetch(): a named statement prepared and described...
        let mut b = BytesMut::new();
        frontend::parse(&mut b, "__asyncpg_stmt_1__", "LISTEN \"a\"", &[]);
        frontend::describe(&mut b, b'S', "__asyncpg_stmt_1__");
        frontend::flush(&mut b);
        let h = head_query(&b, false).unwrap();
        let ext = Ext {
            parse: Some("__asyncpg_stmt_1__"),
            describe_statement: true,
            flush: true,
            ..Ext::default()
        };
        assert_eq!((h.sql, h.ext), (Some("LISTEN \"a\""), Some(ext)));
        // ...then bound and executed, looked at only when the client has
        // LISTENs prepared.
        let mut b = BytesMut::new();
        frontend::bind(&mut b, "", "__asyncpg_stmt_1__", &[]);
        frontend::execute(&mut b, "", 0);
        frontend::sync(&mut b);
        assert!(head_query(&b, false).is_none());
        let h = head_query(&b, true).unwrap();
        let ext = Ext {
            bind: Some("__asyncpg_stmt_1__"),
            execute: true,
            ..Ext::default()
        };
        assert_eq!((h.sql, h.len, h.ext), (None, b.len(), Some(ext)));
        // Not yet all in, bound to another statement, or with parameters:
        // not a LISTEN request.
        let mut b = BytesMut::new();
        frontend::parse(&mut b, "", "LISTEN a", &[]);
        frontend::bind(&mut b, "", "", &[]);
        frontend::execute(&mut b, "", 0);
        frontend::sync(&mut b);
        assert!(head_query(&b[..b.len() - 1], false).is_none());
        let mut b = BytesMut::new();
        frontend::parse(&mut b, "s1", "LISTEN a", &[]);
        frontend::bind(&mut b, "", "s2", &[]);
        frontend::execute(&mut b, "", 0);
        frontend::sync(&mut b);
        assert!(head_query(&b, true).is_none());
        let mut b = BytesMut::new();
        frontend::parse(&mut b, "", "LISTEN a", &[]);
        frontend::bind(&mut b, "", "", &[Some(b"x")]);
        frontend::execute(&mut b, "", 0);
        frontend::sync(&mut b);
        assert!(head_query(&b, false).is_none());
        let mut b = BytesMut::new();
        frontend::parse(&mut b, "", "SELECT 1", &[]);
        frontend::sync(&mut b);
        assert!(head_query(&b, true).is_none());
    }
}
