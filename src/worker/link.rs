//! The hot path: one linked pair's conversation.
//!
//! While a client holds a server, bytes move between them here. `pump`
//! forwards what the client sent (`forward`), reads the server, passes its
//! replies back (`backward`) and says what the worker is to do next
//! (`Next`). What the two owe each other is counted in one place,
//! `Conversation`, which lives on the client: `pump` keeps it, `is_clean`
//! reads it, and when a client leaves mid-conversation its server's
//! recovery starts from `Conversation::owed`.
//!
//! The session follows the client from here too: requests are scanned for
//! what may change it (`note_scan`), a server that changes hands gets the
//! client's settings first (`begin`), a transaction that may have changed
//! them is read back before the server can go (`settle`), and what the
//! check finds becomes both sides' record (`checked`).
//!
//! Nothing here reads a clock, touches a poll or calls into another
//! machine: the time comes in `Cx`; what others must do goes out as the
//! returned `Next` or as `Evt`s (a greeting's cancel key, a greeting to
//! share with later logins). The sockets are reached only through the
//! pair's `Io` buffers, so the unit tests below run the whole conversation
//! over in-memory streams.

use bytes::BytesMut;
use log::{debug, info, warn};
use odissey_protocol::backend::{self, BackendMessage, TransactionStatus};
use odissey_protocol::frontend;

use crate::auth::Fatal;
use crate::config::{PoolMode, SessionCheck};
use crate::ratelimit::limited;
use crate::relay::{frame_of, Step};
use crate::session::Greeting;
use crate::worker::client::Client;
use crate::worker::server::Server;

use super::client::{greet_linked, write_error};
use super::cx::{Cx, Evt};
use super::follow::{
    checked, drops_statements, note_bound_name, note_scan, note_unnamed_param, scan_into, SCAN_MAX,
};

/// What a client's requests are owed by its server, and where the pair
/// stands in the protocol. Kept on the client (its counts outlive a server:
/// a client answered once may be closed between transactions); reset by
/// nothing but the messages themselves.
#[derive(Debug, Default)]
pub(crate) struct Conversation {
    /// ReadyForQuery messages the server owes for the client's requests
    /// (one per Query, FunctionCall and Sync forwarded).
    pending: u32,
    /// ReadyForQuery messages owed for odissey's own queries on the
    /// client's server (settings, session checks, a statement-mode
    /// rollback): their replies are the pooler's, never the client's.
    own: u32,
    /// Syncs forwarded since the last Execute or Query: if that Execute
    /// starts a COPY IN, the server ignores them.
    syncs_since_execute: u32,
    /// Extended-protocol messages forwarded since the last Sync: the
    /// server is mid-pipeline even if its last status was idle.
    unsynced: bool,
    /// The client is in COPY IN until it sends CopyDone or CopyFail; the
    /// Syncs and Flushes it sends meanwhile are ignored by the server.
    copy_mode: bool,
    /// The server expects COPY data (as far as its own messages say).
    copy_in: bool,
    /// The client has had at least one ReadyForQuery: between its
    /// transactions it may be closed (draining) without cutting a reply.
    answered_once: bool,
}

/// What a message from the client is to the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// A request the server answers with ReadyForQuery (Query,
    /// FunctionCall, Sync).
    Request,
    /// A Sync or Flush during COPY IN, which the server ignores.
    Ignored,
    /// Anything else.
    Other,
}

/// What a client that left owed its server's conversation: replies to
/// wait for, and what to send so that they come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owed {
    /// ReadyForQuery messages to wait for (the Sync's, when `sync`).
    pub(crate) replies: usize,
    /// A Sync must close the extended-protocol messages already sent.
    pub(crate) sync: bool,
    /// A CopyFail must end the COPY IN the server is in.
    pub(crate) copy_fail: bool,
}

impl Conversation {
    /// Counts a message header from the client, as it is forwarded.
    pub(crate) fn client_message(&mut self, tag: u8) -> Sent {
        if self.copy_mode && matches!(tag, b'S' | b'H') {
            return Sent::Ignored;
        }
        match tag {
            b'Q' | b'F' | b'S' => {
                self.pending += 1;
                self.unsynced = false;
                if tag == b'S' {
                    self.syncs_since_execute += 1;
                } else {
                    self.syncs_since_execute = 0;
                }
                Sent::Request
            }
            b'E' => {
                self.unsynced = true;
                self.syncs_since_execute = 0;
                Sent::Other
            }
            b'P' | b'B' | b'D' | b'C' | b'H' => {
                self.unsynced = true;
                Sent::Other
            }
            b'c' | b'f' => {
                self.copy_mode = false;
                Sent::Other
            }
            _ => Sent::Other,
        }
    }

    /// Counts a message header from the server in reply to the client.
    /// Returns how many Syncs just stopped being owed a reply: COPY IN
    /// began, and the server ignores the Syncs sent after its Execute
    /// (ReadyForQuery numbering moves on as if their replies came).
    pub(crate) fn server_message(&mut self, tag: u8) -> u32 {
        match tag {
            b'G' | b'W' => {
                let ignored = std::mem::take(&mut self.syncs_since_execute);
                self.pending = self.pending.saturating_sub(ignored);
                self.answered_once |= ignored > 0;
                self.copy_mode = true;
                self.copy_in = true;
                return ignored;
            }
            b'E' => {
                self.copy_in = false;
                self.copy_mode = false;
            }
            b'C' | b'Z' => self.copy_in = false,
            _ => {}
        }
        0
    }

    /// A ReadyForQuery for the client arrived.
    pub(crate) fn answered(&mut self) {
        self.pending = self.pending.saturating_sub(1);
        self.answered_once = true;
    }

    /// odissey sent `n` queries of its own on the client's server.
    pub(crate) fn sent_own(&mut self, n: usize) {
        self.own += u32::try_from(n).unwrap_or(u32::MAX);
    }

    /// Replies to odissey's own queries are still due: what the server
    /// sends now is the pooler's.
    pub(crate) fn awaits_own(&self) -> bool {
        self.own > 0
    }

    /// The ReadyForQuery of one of odissey's own queries arrived; true when
    /// it was the last one owed.
    pub(crate) fn own_answered(&mut self) -> bool {
        self.own = self.own.saturating_sub(1);
        self.own == 0
    }

    /// Every request answered, nothing of odissey's own in flight, no
    /// pipeline left open.
    pub(crate) fn settled(&self) -> bool {
        self.pending == 0 && self.own == 0 && !self.unsynced
    }

    /// A request of the client's is in flight (what a cancel may hit, what
    /// idle timeouts must not cut).
    pub(crate) fn busy(&self) -> bool {
        self.pending > 0 || self.unsynced
    }

    /// The client has had a ReadyForQuery since it logged in.
    pub(crate) fn answered_once(&self) -> bool {
        self.answered_once
    }

    /// What the client leaves owing if it goes now. `held` is the tag of a
    /// request still held in its buffer, counted when its header came but
    /// never sent (a short Query read whole for scanning, a tracked
    /// Parse): no reply is owed for it, and a Sync is sent in its place, so
    /// whatever extended messages went before are closed off either way.
    pub(crate) fn owed(&self, held: Option<u8>) -> Owed {
        let mut pending = self.pending;
        let mut sync = self.unsynced;
        if let Some(tag) = held {
            if matches!(tag, b'Q' | b'F') || (tag == b'S' && !self.copy_mode) {
                pending = pending.saturating_sub(1);
            }
            sync = true;
        }
        Owed {
            replies: (pending + self.own) as usize + usize::from(sync),
            sync,
            copy_fail: self.copy_in,
        }
    }
}

/// What the worker is to do with a pair after `pump`.
#[derive(Debug)]
pub(crate) enum Next {
    /// The conversation goes on; whether anything moved.
    Relaying(bool),
    /// Every request is answered and the server is idle and clean: it may
    /// go back to the pool (see `settle`); whether anything moved.
    Clean(bool),
    /// The client is to be closed, with a FATAL error first when given:
    /// it said Terminate or hung up, broke the protocol, its server went,
    /// or PostgreSQL refused one of its startup settings.
    Close(Option<Fatal>),
}

/// How the session follows a route's clients, read once per pump.
#[derive(Debug, Clone, Copy)]
struct Follow {
    mode: Option<PoolMode>,
    /// Transaction and statement pooling: requests are scanned for what
    /// may change the session.
    scanning: bool,
    /// The route checks after every transaction (`session_check`).
    always: bool,
    /// The route's pool_discard: nothing pins.
    discard: bool,
}

impl Follow {
    fn of(c: &Client) -> Self {
        let route = c.route.as_deref().map(|r| &r.route);
        let mode = route.map(|r| r.pool);
        let scanning = matches!(mode, Some(PoolMode::Transaction | PoolMode::Statement));
        Self {
            mode,
            scanning,
            always: scanning && route.map(|r| r.session_check) == Some(SessionCheck::Always),
            discard: route.is_some_and(|r| r.pool_discard),
        }
    }
}

/// Moves bytes both ways between a linked client and server until
/// neither side can move more for now, and says what comes next.
pub(crate) fn pump(c: &mut Client, s: &mut Server, cx: &mut Cx<'_>) -> Next {
    if c.track_prepared && c.prepared.is_none() {
        c.prepared = Some(Box::default());
    }
    let follow = Follow::of(c);
    let readahead = cx.cfg.readahead;
    let (mut progress, terminate) = match forward(c, s, cx, follow) {
        Ok(moved) => moved,
        Err(f) => return Next::Close(Some(f)),
    };
    progress |= s.io.flush();
    // Server -> client, only while the client keeps up.
    if c.io.out.len() < readahead {
        let limit = s
            .relay
            .wanted(&s.io.rx)
            .map_or(readahead, |w| w.max(readahead));
        progress |= s.io.fill(limit);
    }
    let refused = match backward(c, s, cx, follow) {
        Ok(moved) => {
            progress |= moved;
            None
        }
        Err(f) => Some(f),
    };
    progress |= c.io.flush();
    if s.io.eof {
        // Part of a message already went to the client: an error now
        // would land inside it, so the client is only disconnected.
        let id = s.id;
        let f = s.relay.at_boundary().then(|| {
            Fatal::new(
                "08006",
                format!("server connection {id} closed unexpectedly"),
            )
        });
        return Next::Close(f);
    }
    if terminate || c.io.eof || refused.is_some() {
        return Next::Close(refused);
    }
    if is_clean(c, s) {
        Next::Clean(progress)
    } else {
        Next::Relaying(progress)
    }
}

/// The pair is between transactions with nothing owed either way: the
/// server could serve anyone now.
pub(crate) fn is_clean(c: &Client, s: &Server) -> bool {
    c.conv.settled()
        && c.prepared.as_ref().is_none_or(|p| p.pipeline.is_idle())
        && c.relay.at_boundary()
        && s.relay.at_boundary()
        && s.io.rx.is_empty()
        && s.status == TransactionStatus::Idle
}

/// Client -> server: passes what the client sent while the server's
/// buffer has room (a server slower than its client leaves the input in
/// the client's buffer, which stops reading the client socket once full).
/// Returns whether anything moved and whether the client said Terminate;
/// an error closes the client.
fn forward(
    c: &mut Client,
    s: &mut Server,
    cx: &mut Cx<'_>,
    follow: Follow,
) -> Result<(bool, bool), Fatal> {
    let max_len = cx.cfg.max_message_size;
    let readahead = cx.cfg.readahead;
    let log_query = cx.cfg.log_query;
    let Follow {
        scanning,
        always,
        discard,
        ..
    } = follow;
    // Timings use the batch's clock: precise to the event loop's turn, and
    // no clock read per message.
    let now = cx.now;
    let out_before = s.io.out.len();
    let mut progress = false;
    let mut terminate = false;
    while s.io.out.len() < readahead {
        let (qstart, xstart) = (&mut s.query_start, &mut s.xact_start);
        let conv = &mut c.conv;
        let check_due = &mut c.check_due;
        let savepoint = &mut c.savepoint;
        let mut prepared = c.prepared.as_deref_mut();
        let step = c.relay.step(&mut c.io.rx, max_len, |tag, len| {
            if scanning {
                // Too long to hold for a scan, a function call, or a route
                // that checks always: check without reading.
                let long = matches!(tag, b'Q' | b'P') && len > SCAN_MAX;
                if long || tag == b'F' || (always && matches!(tag, b'Q' | b'S')) {
                    *check_due = true;
                }
                // Unread, it may open a savepoint.
                *savepoint |= long;
            }
            let sent = conv.client_message(tag);
            if sent == Sent::Request {
                // Its answer's ReadyForQuery ends the timing.
                if qstart.is_none() {
                    *qstart = Some(now);
                }
                if xstart.is_none() {
                    *xstart = *qstart;
                }
            }
            if let Some(p) = prepared.as_deref_mut() {
                if crate::prepared::needs_whole(tag) {
                    return true;
                }
                if sent != Sent::Ignored {
                    p.pipeline.client_passthrough(tag);
                }
            }
            // Query and Parse texts are looked at whole: they may change
            // the session. With log_query, every one is.
            tag == b'X'
                || (matches!(tag, b'Q' | b'P') && ((scanning && len <= SCAN_MAX) || log_query))
        });
        match step {
            Ok(Step::NeedMore) => break,
            Ok(Step::Pass(b)) => {
                s.io.out.unsplit(b);
                progress = true;
            }
            // Only asked for (needs_whole) when statements are tracked.
            Ok(Step::Inspect(b'P' | b'B' | b'D' | b'C', f)) if c.prepared.is_some() => {
                if log_query && f.first() == Some(&b'P') {
                    info!(
                        "{}: parse: {}",
                        c.id,
                        String::from_utf8_lossy(crate::session::parse_text(&f))
                    );
                }
                let p = c.prepared.as_deref_mut().expect("checked by the guard");
                if scanning {
                    match f.first() {
                        Some(b'P') => {
                            let sc = scan_into(&mut c.custom, crate::session::parse_text(&f));
                            c.savepoint |= sc.savepoint;
                            note_scan(&mut c.check_due, &mut c.pinned, c.id, sc, discard);
                            // A named statement keeps its own (`Statement`).
                            if crate::session::statement_name(&f).is_empty() {
                                note_unnamed_param(&mut c.custom, sc.name_param);
                            }
                        }
                        Some(b'B') => {
                            let param = if crate::session::statement_name(&f).is_empty() {
                                c.custom.as_deref().and_then(|n| n.unnamed_param)
                            } else if let Some(param) = crate::prepared::bind_marks(&f, &p.stmts) {
                                c.check_due = true;
                                param
                            } else {
                                None
                            };
                            if let Some(n) = param {
                                note_bound_name(&mut c.custom, &f, n);
                            }
                        }
                        _ => {}
                    }
                }
                if let Err(e) = crate::prepared::client_frame(
                    f,
                    &mut p.stmts,
                    &mut s.stmts,
                    &mut p.pipeline,
                    &mut s.io.out,
                ) {
                    return Err(Fatal::new("08P01", format!("protocol violation: {e}")));
                }
                progress = true;
            }
            Ok(Step::Inspect(b'P', f)) => {
                // Asked for whole by scanning or log_query.
                if log_query {
                    info!(
                        "{}: parse: {}",
                        c.id,
                        String::from_utf8_lossy(crate::session::parse_text(&f))
                    );
                }
                if scanning {
                    let mut sc = scan_into(&mut c.custom, crate::session::parse_text(&f));
                    // Without statement tracking the Binds go by unread: a
                    // name given as a parameter stays unknown.
                    sc.opaque |= sc.name_param.is_some();
                    c.savepoint |= sc.savepoint;
                    note_scan(&mut c.check_due, &mut c.pinned, c.id, sc, discard);
                }
                s.io.out.unsplit(f);
                progress = true;
            }
            Ok(Step::Inspect(b'Q', f)) => {
                let raw = crate::session::query_text(&f);
                if scanning {
                    // Bytes, whatever the client's encoding.
                    let sc = scan_into(&mut c.custom, raw);
                    c.savepoint |= sc.savepoint;
                    note_scan(&mut c.check_due, &mut c.pinned, c.id, sc, discard);
                }
                let sql = std::str::from_utf8(raw).unwrap_or("");
                if cx.panic_on == Some(sql) {
                    panic!("failpoint ODISSEY_FAILPOINT_PANIC reached");
                }
                if log_query {
                    info!("{}: query: {sql}", c.id);
                }
                if drops_statements(sql) {
                    s.stmts.clear();
                }
                s.io.out.unsplit(f);
                progress = true;
            }
            Ok(Step::Inspect(_, _)) => {
                terminate = true;
                break;
            }
            Err(e) => return Err(Fatal::violation(e)),
        }
    }
    if let Some(p) = c.prepared.as_deref_mut() {
        p.pipeline.drain_due(&mut c.io.out);
    }
    s.counters.bytes_in += s.io.out.len().saturating_sub(out_before) as u64;
    Ok((progress, terminate))
}

/// Server -> client: passes the server's replies, reads those to
/// odissey's own queries, and keeps the books (timings, errors by
/// SQLSTATE, the server's status). Returns whether anything moved; an
/// error is a startup setting PostgreSQL refused, which ends the login as
/// PostgreSQL's would.
fn backward(
    c: &mut Client,
    s: &mut Server,
    cx: &mut Cx<'_>,
    follow: Follow,
) -> Result<bool, Fatal> {
    let max_len = cx.cfg.max_message_size;
    let now = cx.now;
    let out_before = c.io.out.len();
    let mut progress = false;
    let mut refused: Option<Fatal> = None;
    // LISTEN/UNLISTEN odissey answered inside this transaction take effect
    // as it ends: its closing command's tag says how.
    let pending = c.listens.as_ref().is_some_and(|l| l.pending());
    loop {
        let conv = &mut c.conv;
        let mut prepared = c.prepared.as_deref_mut().map(|p| &mut p.pipeline);
        let step = s.relay.step(&mut s.io.rx, max_len, |tag, total| {
            if conv.awaits_own() {
                return true;
            }
            let ignored = conv.server_message(tag);
            let whole = match prepared.as_deref_mut() {
                Some(pipeline) => {
                    if ignored > 0 {
                        pipeline.ignore_syncs(ignored as usize);
                    }
                    pipeline.server_header(tag) == crate::prepared::Disposition::Whole
                }
                None => false,
            };
            // ErrorResponses are counted by SQLSTATE class (one longer than
            // max_message_size passes uncounted, not held whole).
            whole
                || matches!(tag, b'Z' | b'S')
                || (tag == b'E' && total <= max_len + 1)
                || (tag == b'C' && pending)
        });
        match step {
            Ok(Step::NeedMore) => break,
            Ok(Step::Pass(b)) => c.io.out.unsplit(b),
            Ok(Step::Inspect(tag, f)) if c.conv.awaits_own() => {
                own_reply(c, s, cx, tag, &f, &mut refused);
            }
            Ok(Step::Inspect(tag, mut f)) => {
                match tag {
                    b'S' => {
                        if let Ok(BackendMessage::ParameterStatus { name, value }) =
                            BackendMessage::parse(&frame_of(b'S', &f))
                        {
                            crate::params::set(&mut s.params, &name, &value);
                            // A reported setting changed (SET, or a
                            // function): read the session back.
                            c.check_due |= follow.scanning;
                        }
                    }
                    b'E' => {
                        if let Some(code) = crate::stats::error_code(f.get(5..).unwrap_or(&[])) {
                            s.counters.error(code);
                        }
                    }
                    b'C' => {
                        if let Some(l) = c.listens.as_deref_mut() {
                            l.command_done(f.get(5..).unwrap_or(&[]));
                        }
                    }
                    b'Z' => {
                        if let Ok(st) = TransactionStatus::from_byte(f.get(5).copied().unwrap_or(0))
                        {
                            s.status = st;
                        }
                        if s.status == TransactionStatus::Idle {
                            c.savepoint = false;
                        }
                        if pending {
                            if let Some(l) = c.listens.as_deref_mut() {
                                l.ready(s.status, c.savepoint);
                            }
                        }
                        s.counters.queries += 1;
                        if let Some(t) = s.query_start.take() {
                            s.counters.query_us +=
                                now.saturating_duration_since(t).as_micros() as u64;
                        }
                        if s.status == TransactionStatus::Idle {
                            s.counters.xacts += 1;
                            if let Some(t) = s.xact_start.take() {
                                s.counters.xact_us +=
                                    now.saturating_duration_since(t).as_micros() as u64;
                            }
                        }
                        c.conv.answered();
                        if follow.mode == Some(PoolMode::Statement)
                            && s.status != TransactionStatus::Idle
                        {
                            // Statement pooling cannot keep a transaction
                            // open: roll it back and tell the client, who
                            // stays usable.
                            let msg =
                                "transaction blocks are not allowed in statement pooling mode";
                            f.clear();
                            write_error(&mut f, c.id, "ERROR", "0A000", msg);
                            backend::ready_for_query(&mut f, TransactionStatus::Idle);
                            frontend::query(&mut s.io.out, "ROLLBACK");
                            c.conv.sent_own(1);
                            s.io.flush();
                        }
                    }
                    _ => {}
                }
                if let Some(p) = c.prepared.as_deref_mut() {
                    p.pipeline.server_frame(f, &mut s.stmts, &mut c.io.out);
                } else {
                    c.io.out.unsplit(f);
                }
            }
            Err(e) => {
                limited!(warn, "{}: protocol violation from server: {e}", s.id);
                s.io.eof = true;
                break;
            }
        }
        progress = true;
    }
    if let Some(p) = c.prepared.as_deref_mut() {
        p.pipeline.drain_due(&mut c.io.out);
    }
    s.counters.bytes_out += c.io.out.len().saturating_sub(out_before) as u64;
    match refused {
        Some(f) => Err(f),
        None => Ok(progress),
    }
}

/// A message in reply to odissey's own queries: the client never sees it,
/// but the server's state is noted (its status, what it reports, a
/// session check's rows); the last ReadyForQuery may complete a check and
/// greet a client still waiting for its greeting. A startup setting
/// PostgreSQL refuses goes to `refused`.
fn own_reply(
    c: &mut Client,
    s: &mut Server,
    cx: &mut Cx<'_>,
    tag: u8,
    f: &BytesMut,
    refused: &mut Option<Fatal>,
) {
    // A notification is the client's whenever it comes (a listening
    // server sends it when it likes, also while it answers odissey's own
    // session check): it goes on to the client, never swallowed.
    if tag == b'A' {
        c.io.out.extend_from_slice(f);
        return;
    }
    if tag == b'D' {
        if let Some(check) = s.check.as_deref_mut() {
            match backend::parse_data_row(f.get(5..).unwrap_or(&[])) {
                Ok(values) => check.row(&values),
                Err(_) => check.failed = true,
            }
        }
        return;
    }
    match BackendMessage::parse(&frame_of(tag, f)) {
        Ok(BackendMessage::ReadyForQuery(st)) => {
            s.status = st;
            if c.conv.own_answered() {
                if let Some(check) = s.check.take() {
                    checked(c, s, *check);
                }
                if !c.greeted && refused.is_none() {
                    greet_linked(c, s, cx);
                }
            }
        }
        Ok(BackendMessage::ParameterStatus { name, value }) => {
            crate::params::set(&mut s.params, &name, &value);
        }
        Ok(BackendMessage::ErrorResponse(e)) => {
            if let Some(check) = s.check.as_deref_mut() {
                warn!(
                    "{}: session check for {} failed: {} ({})",
                    s.id, c.id, e.message, e.code
                );
                check.failed = true;
            } else {
                debug!(
                    "{}: setting for {} failed: {} ({})",
                    s.id, c.id, e.message, e.code
                );
                // What the server carries is no longer what odissey
                // believes: check it.
                c.check_due = true;
                if !c.greeted && refused.is_none() {
                    // A startup setting PostgreSQL refuses: the login
                    // fails as PostgreSQL's would.
                    cx.evts.push(Evt::Greeting {
                        pool: s.pool.clone(),
                        key: crate::session::greeting_key(&c.session),
                        greeting: Greeting::Refused {
                            code: e.code.clone(),
                            message: e.message.clone(),
                            until: cx.now + crate::session::REFUSAL_TTL,
                        },
                    });
                    *refused = Some(Fatal::from_server(e.code, e.message));
                }
            }
        }
        _ => {}
    }
}

/// What to do with a clean pair's server (`Next::Clean`) in transaction
/// and statement pooling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// The transaction may have changed the session: a check was sent,
    /// and the pair waits for its answer.
    Checking,
    /// The client holds state only this server has (pinned): it keeps it.
    Keep,
    /// The server may go to anyone.
    Release,
}

/// Decides where a clean pair's server goes once its transaction is over:
/// a session that may have changed is read back first (`check_query`,
/// answered to odissey alone) before anyone else can get the server.
pub(crate) fn settle(c: &mut Client, s: &mut Server) -> Settle {
    if c.check_due {
        c.check_due = false;
        let q = crate::session::check_query(
            c.custom.as_deref().map_or(&[], |n| n.names.as_slice()),
            &s.route.server_user,
        );
        frontend::query(&mut s.io.out, &q);
        c.conv.sent_own(1);
        s.check = Some(Box::default());
        s.io.flush();
        return Settle::Checking;
    }
    if c.pinned.is_some() {
        return Settle::Keep;
    }
    Settle::Release
}

/// Whether a route's clients are followed by their session (transaction
/// and statement pooling): `settle` applies to them.
pub(crate) fn follows_session(c: &Client) -> bool {
    Follow::of(c).scanning
}

/// Starts a pair: a server whose last owner was someone else first gets
/// the client's session settings (and DISCARD ALL with pool_discard), sent
/// ahead of the client's own messages and answered to odissey alone. A
/// client not yet greeted is greeted at once when nothing had to be sent,
/// else when the settings are answered (`own_reply`).
pub(crate) fn begin(c: &mut Client, s: &mut Server, cx: &mut Cx<'_>) {
    if s.route.route.pool_discard && s.owner != Some(c.id) {
        frontend::query(&mut s.io.out, "DISCARD ALL");
        s.stmts.clear();
        s.session.clear();
        c.conv.sent_own(1);
    }
    s.owner = Some(c.id);
    // The server carries what its last owners left (as far as odissey saw:
    // every change it could not see pins or was checked); what differs
    // from this client's session is reset or set. Clients with the same
    // settings (pgbench's, an application's pool) need nothing.
    if s.session != c.session {
        let queries = crate::session::sync_queries(&c.session, &s.session);
        for q in &queries {
            frontend::query(&mut s.io.out, q);
        }
        c.conv.sent_own(queries.len());
        s.session.clone_from(&c.session);
        debug!("{}: {} setting(s) sent for {}", s.id, queries.len(), c.id);
    }
    if !c.greeted && !c.conv.awaits_own() {
        // Nothing to apply: the server's values are the client's.
        greet_linked(c, s, cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::testkit::{bare, done, error, queries, ready, tags, Pair};
    use odissey_protocol::backend::TransactionStatus::{Idle, InTransaction};

    fn frontend_msgs(build: impl FnOnce(&mut BytesMut)) -> BytesMut {
        let mut b = BytesMut::new();
        build(&mut b);
        b
    }

    fn clean(n: &Next) -> bool {
        matches!(n, Next::Clean(_))
    }

    #[test]
    fn pipelined_requests_are_owed_until_each_ready_for_query() {
        let mut conv = Conversation::default();
        for tag in *b"PBES" {
            conv.client_message(tag);
        }
        assert!(!conv.settled(), "a Sync is owed its ReadyForQuery");
        conv.client_message(b'Q');
        assert!(conv.busy());
        conv.answered();
        assert!(!conv.settled(), "the Query's reply is still owed");
        conv.answered();
        assert!(conv.settled());
        assert!(conv.answered_once());
    }

    #[test]
    fn extended_messages_without_sync_leave_the_pair_unsettled() {
        let mut conv = Conversation::default();
        for tag in *b"PBE" {
            assert_eq!(conv.client_message(tag), Sent::Other);
        }
        assert!(
            conv.busy() && !conv.settled(),
            "mid-pipeline, nothing owed yet"
        );
        let owed = conv.owed(None);
        assert_eq!(
            owed,
            Owed {
                replies: 1,
                sync: true,
                copy_fail: false
            },
            "a departed client's open pipeline is closed with a Sync"
        );
    }

    #[test]
    fn syncs_after_an_execute_that_starts_copy_in_are_not_owed() {
        let mut conv = Conversation::default();
        for tag in *b"PBESS" {
            conv.client_message(tag);
        }
        // The server answers the Execute with CopyInResponse: it ignores
        // both Syncs until the COPY ends.
        assert_eq!(conv.server_message(b'G'), 2);
        assert!(conv.settled() || !conv.busy(), "no reply owed for them");
        // Sync and Flush during COPY IN go by unanswered.
        assert_eq!(conv.client_message(b'S'), Sent::Ignored);
        assert_eq!(conv.client_message(b'H'), Sent::Ignored);
        assert_eq!(conv.client_message(b'd'), Sent::Other);
        assert_eq!(conv.client_message(b'c'), Sent::Other);
        assert_eq!(conv.client_message(b'S'), Sent::Request);
        conv.server_message(b'C');
        conv.server_message(b'Z');
        conv.answered();
        assert!(conv.settled());
    }

    #[test]
    fn a_held_request_owes_no_reply_but_closes_the_pipeline() {
        let mut conv = Conversation::default();
        conv.client_message(b'Q');
        // Counted when its header came, but still in the client's buffer.
        let owed = conv.owed(Some(b'Q'));
        assert_eq!(
            (owed.replies, owed.sync),
            (1, true),
            "only the Sync's reply"
        );
        let mut conv = Conversation::default();
        conv.client_message(b'P');
        let owed = conv.owed(Some(b'P'));
        assert_eq!((owed.replies, owed.sync), (1, true));
        let mut conv = Conversation::default();
        conv.client_message(b'S');
        conv.sent_own(2);
        let owed = conv.owed(None);
        assert_eq!(owed.replies, 3, "odissey's own queries are waited for too");
    }

    #[test]
    fn a_client_gone_in_copy_in_owes_a_copy_fail() {
        let mut conv = Conversation::default();
        conv.client_message(b'Q');
        conv.server_message(b'G');
        conv.client_message(b'd');
        let owed = conv.owed(None);
        assert!(owed.copy_fail);
        assert_eq!(
            owed.replies, 1,
            "the COPY's Query still gets its ReadyForQuery"
        );
        conv.server_message(b'E');
        assert!(!conv.owed(None).copy_fail, "an error ended the COPY");
    }

    #[test]
    fn a_query_goes_through_and_its_ready_for_query_makes_the_pair_clean() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&frontend_msgs(|b| frontend::query(b, "SELECT 1")));
        assert!(!clean(&p.pump()), "the reply is owed");
        assert_eq!(queries(&p.server_got()), ["SELECT 1"]);
        assert!(p.s.query_start.is_some(), "timed from its request");
        p.server_sends(&done("SELECT 1", Idle));
        assert!(clean(&p.pump()));
        assert_eq!(tags(&p.client_got()), "CZ");
        assert_eq!((p.s.counters.queries, p.s.counters.xacts), (1, 1));
        assert!(p.evts.is_empty(), "a steady round raises no event");
        assert_eq!(settle(&mut p.c, &mut p.s), Settle::Release);
    }

    #[test]
    fn a_pipeline_is_clean_only_after_its_last_sync_is_answered() {
        let mut p = Pair::new("transaction", "prepared_statements = false");
        p.client_sends(&frontend_msgs(|b| {
            frontend::parse(b, "", "SELECT 1", &[]);
            frontend::bind(b, "", "", &[]);
            frontend::execute(b, "", 0);
            frontend::sync(b);
            frontend::parse(b, "", "SELECT 2", &[]);
            frontend::bind(b, "", "", &[]);
            frontend::execute(b, "", 0);
            frontend::sync(b);
        }));
        p.pump();
        assert_eq!(tags(&p.server_got()), "PBESPBES");
        let mut first = BytesMut::new();
        first.extend_from_slice(&bare(b'1'));
        first.extend_from_slice(&bare(b'2'));
        first.extend_from_slice(&done("SELECT 1", Idle));
        p.server_sends(&first);
        assert!(!clean(&p.pump()), "the second Sync is still owed");
        let mut second = BytesMut::new();
        second.extend_from_slice(&bare(b'1'));
        second.extend_from_slice(&bare(b'2'));
        second.extend_from_slice(&done("SELECT 1", Idle));
        p.server_sends(&second);
        assert!(clean(&p.pump()));
        assert_eq!(tags(&p.client_got()), "12CZ12CZ");
    }

    #[test]
    fn a_transaction_keeps_the_server_until_it_ends() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&frontend_msgs(|b| frontend::query(b, "BEGIN")));
        p.pump();
        p.server_sends(&done("BEGIN", InTransaction));
        assert!(!clean(&p.pump()), "inside a transaction");
        p.client_sends(&frontend_msgs(|b| frontend::query(b, "COMMIT")));
        p.pump();
        p.server_sends(&done("COMMIT", Idle));
        assert!(clean(&p.pump()));
        assert_eq!(p.s.counters.xacts, 1, "one transaction of two queries");
    }

    #[test]
    fn statement_pooling_refuses_a_transaction_block_and_rolls_it_back() {
        let mut p = Pair::new("statement", "");
        p.client_sends(&frontend_msgs(|b| frontend::query(b, "BEGIN")));
        p.pump();
        p.server_got();
        p.server_sends(&done("BEGIN", InTransaction));
        assert!(!clean(&p.pump()), "the rollback is in flight");
        let out = p.client_got();
        assert_eq!(tags(&out), "CEZ", "the error replaces its ReadyForQuery");
        assert!(String::from_utf8_lossy(&out).contains("0A000"));
        assert_eq!(
            *out.last().expect("a status byte"),
            b'I',
            "the client stays usable"
        );
        assert_eq!(queries(&p.server_got()), ["ROLLBACK"]);
        p.server_sends(&done("ROLLBACK", Idle));
        assert!(clean(&p.pump()));
        assert_eq!(tags(&p.client_got()), "", "the rollback is odissey's");
    }

    /// The rows a session check returns: (kind, name, value).
    fn check_rows(rows: &[(&str, &str, Option<&str>)]) -> BytesMut {
        let mut b = BytesMut::new();
        backend::row_description(&mut b, &["?column?", "name", "setting"]);
        for (kind, name, value) in rows {
            backend::data_row(&mut b, &[Some(kind), Some(name), *value]);
        }
        b.extend_from_slice(&done("SELECT", Idle));
        b
    }

    #[test]
    fn a_set_is_read_back_after_its_transaction_before_the_server_goes() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&frontend_msgs(|b| {
            frontend::query(b, "SET search_path = app")
        }));
        p.pump();
        p.server_got();
        assert!(p.c.check_due, "a SET may change the session");
        assert!(
            p.c.session.get("search_path").is_none(),
            "not before it ran"
        );
        p.server_sends(&done("SET", Idle));
        assert!(clean(&p.pump()));
        assert_eq!(tags(&p.client_got()), "CZ");
        assert_eq!(settle(&mut p.c, &mut p.s), Settle::Checking);
        assert!(queries(&p.server_got())[0].contains("pg_settings"));
        p.server_sends(&check_rows(&[("s", "search_path", Some("app"))]));
        assert!(clean(&p.pump()));
        assert_eq!(
            tags(&p.client_got()),
            "",
            "the check is answered to odissey alone"
        );
        assert_eq!(p.c.session.get("search_path"), Some("app"));
        assert_eq!(p.s.session.get("search_path"), Some("app"));
        assert_eq!(settle(&mut p.c, &mut p.s), Settle::Release);
    }

    #[test]
    fn a_notification_during_a_session_check_reaches_the_client() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&frontend_msgs(|b| frontend::query(b, "LISTEN jobs")));
        p.pump();
        p.server_got();
        p.server_sends(&done("LISTEN", Idle));
        assert!(clean(&p.pump()));
        assert_eq!(tags(&p.client_got()), "CZ");
        assert_eq!(settle(&mut p.c, &mut p.s), Settle::Checking);
        p.server_got();
        // The server notifies in the middle of the check's answer.
        let mut reply = BytesMut::new();
        reply.extend_from_slice(b"A\0\0\0\x10\0\0\0\x07jobs\0hi\0");
        reply.extend_from_slice(&check_rows(&[("p", "listen", None)]));
        p.server_sends(&reply);
        assert!(clean(&p.pump()));
        assert_eq!(
            tags(&p.client_got()),
            "A",
            "the notification is the client's"
        );
        assert_eq!(settle(&mut p.c, &mut p.s), Settle::Keep);
    }

    #[test]
    fn a_failed_set_is_not_applied() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&frontend_msgs(|b| frontend::query(b, "SET nosuch = 1")));
        p.pump();
        let mut reply = error("42704", "unrecognized configuration parameter \"nosuch\"");
        reply.extend_from_slice(&ready(Idle));
        p.server_sends(&reply);
        assert!(clean(&p.pump()));
        assert_eq!(tags(&p.client_got()), "EZ");
        assert_eq!(settle(&mut p.c, &mut p.s), Settle::Checking);
        p.server_sends(&check_rows(&[]));
        p.pump();
        assert!(p.c.session.get("nosuch").is_none());
        assert!(p.c.pinned.is_none());
        assert_eq!(settle(&mut p.c, &mut p.s), Settle::Release);
    }

    #[test]
    fn a_temporary_table_pins_the_client_to_its_server() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&frontend_msgs(|b| {
            frontend::query(b, "CREATE TEMP TABLE t (a int)")
        }));
        p.pump();
        p.server_sends(&done("CREATE TABLE", Idle));
        p.pump();
        assert_eq!(settle(&mut p.c, &mut p.s), Settle::Checking);
        p.server_sends(&check_rows(&[("p", "temp", None)]));
        p.pump();
        assert!(p.c.pinned.is_some());
        assert_eq!(settle(&mut p.c, &mut p.s), Settle::Keep);
    }

    #[test]
    fn a_server_with_other_settings_gets_the_clients_first_answered_to_odissey() {
        let cfg = crate::worker::testkit::config("transaction", "");
        let mut c = crate::worker::testkit::client(&cfg);
        c.greeted = false;
        c.session.set("application_name", "app1");
        let s = crate::worker::testkit::server(&cfg);
        let mut p = Pair {
            cfg,
            tls: Default::default(),
            routes: Default::default(),
            c,
            s,
            evts: Vec::new(),
        };
        p.link();
        p.pump();
        let sent = queries(&p.server_got());
        assert_eq!(sent.len(), 1);
        assert!(sent[0].contains("application_name") && sent[0].contains("app1"));
        assert!(
            p.evts.is_empty(),
            "greeted only once the setting is applied"
        );
        let mut reply = BytesMut::new();
        backend::row_description(&mut reply, &["set_config"]);
        backend::data_row(&mut reply, &[Some("app1")]);
        backend::parameter_status(&mut reply, "application_name", "app1");
        reply.extend_from_slice(&done("SELECT 1", Idle));
        p.server_sends(&reply);
        assert!(clean(&p.pump()));
        let greeting = p.client_got();
        assert_eq!(
            tags(&greeting),
            "SKZ",
            "ParameterStatus, BackendKeyData, ReadyForQuery"
        );
        assert!(p.c.greeted);
        assert!(matches!(p.evts[0], Evt::Greeted { client, .. } if client == p.c.key));
        assert!(matches!(
            p.evts[1],
            Evt::Greeting {
                greeting: Greeting::Ready(_),
                ..
            }
        ));
    }

    #[test]
    fn a_refused_startup_setting_fails_the_login_as_postgresql_would() {
        let cfg = crate::worker::testkit::config("transaction", "");
        let mut c = crate::worker::testkit::client(&cfg);
        c.greeted = false;
        c.session.set("work_mem", "lots");
        let s = crate::worker::testkit::server(&cfg);
        let mut p = Pair {
            cfg,
            tls: Default::default(),
            routes: Default::default(),
            c,
            s,
            evts: Vec::new(),
        };
        p.link();
        p.server_got();
        let mut reply = error(
            "22023",
            "invalid value for parameter \"work_mem\": \"lots\"",
        );
        reply.extend_from_slice(&ready(Idle));
        p.server_sends(&reply);
        match p.pump() {
            Next::Close(Some(f)) => {
                assert_eq!(f.code, "22023");
                assert!(f.verbatim, "PostgreSQL's own words");
            }
            other => panic!("expected the login to fail, got {other:?}"),
        }
        assert!(!p.c.greeted);
        assert!(matches!(
            p.evts[0],
            Evt::Greeting {
                greeting: Greeting::Refused { .. },
                ..
            }
        ));
    }

    #[test]
    fn terminate_closes_the_client_without_an_error() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&frontend_msgs(frontend::terminate));
        assert!(matches!(p.pump(), Next::Close(None)));
        assert!(
            p.server_got().is_empty(),
            "Terminate is the pooler's, not the server's"
        );
    }

    #[test]
    fn a_bad_header_from_the_server_closes_its_client_with_08006() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&frontend_msgs(|b| frontend::query(b, "SELECT 1")));
        p.pump();
        p.server_sends(&[b'Z', 0xff, 0xff, 0xff, 0xff]);
        match p.pump() {
            Next::Close(Some(f)) => assert_eq!(f.code, "08006"),
            other => panic!("expected the client closed, got {other:?}"),
        }
        assert!(p.s.io.eof, "the server connection is done for");
    }

    #[test]
    fn a_server_gone_mid_message_cuts_its_client_without_an_error() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&frontend_msgs(|b| frontend::query(b, "SELECT 1")));
        p.pump();
        let mut row = BytesMut::new();
        backend::data_row(&mut row, &[Some("a long value")]);
        p.server_sends(&row[..8]);
        crate::worker::testkit::memory(&mut p.s.io).closed = true;
        // What the poll reports with the bytes: the peer hung up.
        p.s.io.hup = true;
        assert!(
            matches!(p.pump(), Next::Close(None)),
            "an error would land inside the row"
        );
    }

    #[test]
    fn a_protocol_violation_from_the_client_closes_it_with_08p01() {
        let mut p = Pair::new("transaction", "");
        p.client_sends(&[b'Q', 0, 0, 0, 2]);
        match p.pump() {
            Next::Close(Some(f)) => assert_eq!(f.code, "08P01"),
            other => panic!("expected a violation, got {other:?}"),
        }
    }
}
