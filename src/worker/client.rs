//! A client (frontend) connection and its states.

use odissey_reactor::Key;

use bytes::BytesMut;
use log::{debug, info};
use odissey_protocol::backend::{self, TransactionStatus};
use odissey_protocol::codec;
use odissey_transport::ALPN_POSTGRESQL;

use crate::auth::{Ctx, Fatal, Identity, Login, Outcome, TlsView};
use crate::config::ListenTls;
use crate::config::ResolvedRoute;
use crate::ids::ConnId;
use crate::io::Io;
use crate::tls::TlsSet;
use std::sync::Arc;

use crate::prepared::{ClientStatements, Pipeline};
use crate::relay::Relay;
use crate::router::PoolKey;
use crate::session::{Pin, Settings};
use crate::worker::Conversation;

use super::cx::Cx;
use super::cx::Evt;
use super::server::Server;
use crate::config::PoolMode;
use crate::session::Greeting;

/// What a client connection waits for.
#[derive(Debug)]
pub(crate) enum ClientState {
    /// Its startup packet and password.
    Login(Login),
    /// Its password is being tried on the server (`passthrough`).
    Verifying,
    /// Its next request; it holds no server (transaction pooling).
    Idle,
    /// A server from the router.
    Waiting,
    /// Traffic to and from its server.
    Linked,
    /// Closed with an error; the socket lingers so the error is read
    /// before the end of the stream.
    Closing,
    /// A console client (its route's storage is `local`); `busy` while its
    /// command is being answered by the system thread, `skipping` after an
    /// extended-protocol message, up to the next Sync (as PostgreSQL skips
    /// after an error).
    Console { busy: bool, skipping: bool },
    /// Not a state: what the slot holds while `on_io` runs a transition,
    /// which takes the old state by value and always puts the next one
    /// back before it returns. Never seen outside it.
    Moving,
}

impl ClientState {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Login(_) => "Login",
            Self::Verifying => "Verifying",
            Self::Idle => "Idle",
            Self::Waiting => "Waiting",
            Self::Linked => "Linked",
            Self::Closing => "Closing",
            Self::Console { .. } => "Console",
            Self::Moving => "Moving",
        }
    }
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) id: ConnId,
    /// Its own slot, to name it in commands.
    pub(crate) key: Key,
    pub(crate) io: Io,
    pub(crate) state: ClientState,
    /// When it connected, in seconds since its worker started (for the
    /// console; 4 bytes, not an `Instant`'s 16).
    pub(crate) born_s: u32,
    /// When it last sent anything, in ms since its worker started,
    /// wrapping every 49 days (client_idle_timeout,
    /// idle_in_transaction_timeout).
    pub(crate) active_ms: u32,
    /// When it began waiting for a server, in µs since its worker started
    /// (wrapping; see `worker::since_start_us`).
    pub(crate) waiting_us: u32,
    /// The route it logged in by (its names live on in `pool`).
    pub(crate) route: Option<Arc<ResolvedRoute>>,
    pub(crate) pool: Option<PoolKey>,
    /// Its route's pools by host, when the host is chosen per transaction
    /// (`hosting`); `pool` is then the one it was last placed on.
    pub(crate) family: Option<Arc<super::hosting::Family>>,
    /// Its round-robin turn among its route's hosts (`hosting`).
    pub(crate) turn: u16,
    /// The channels it LISTENs to in transaction pooling (`listen`).
    pub(crate) listens: Option<Box<super::listen::Listens>>,
    pub(crate) server: Option<Key>,
    /// Walks the client's input to count requests and spot Terminate.
    pub(crate) relay: Relay,
    /// What it and its server owe each other (`worker::link`).
    pub(crate) conv: Conversation,
    /// Sent ParameterStatus/BackendKeyData/ReadyForQuery already.
    pub(crate) greeted: bool,
    /// Refuse after the startup packet (client_max reached).
    pub(crate) reject: bool,
    /// Its deadline: auth_timeout until it has logged in, then
    /// pool_timeout whenever it waits for a server (one field: the two
    /// never overlap, and every byte of an idle client counts).
    pub(crate) deadline: Option<odissey_reactor::TimerId>,
    /// Index of the listener it came from (for that listener's TLS).
    pub(crate) listener: u16,
    /// Its TLS began without an SSLRequest (PostgreSQL 17 direct TLS).
    pub(crate) tls_direct: bool,
    /// The session settings that follow this client (see `session`):
    /// its startup parameters, then what checks of its servers found.
    pub(crate) session: Settings,
    /// A request that may have changed its session went to its server
    /// since the last check: the server is checked before it is released.
    pub(crate) check_due: bool,
    /// Its transaction may have opened a savepoint (`session::Scan`): a
    /// LISTEN then goes to the server (`listen`). Cleared when the server
    /// is idle again.
    pub(crate) savepoint: bool,
    /// It keeps its server (state that cannot be replayed elsewhere), and
    /// why; logged once when it begins.
    pub(crate) pinned: Option<Pin>,
    /// Custom variables (`a.b`) it was seen setting: PostgreSQL cannot
    /// list them, so checks ask for these by name.
    /// (Boxed: most clients have none, and every idle byte counts.)
    pub(crate) custom: Option<Box<crate::session::CustomNames>>,
    /// Named prepared statements follow this client across servers
    /// (transaction and statement pooling with `prepared_statements`).
    pub(crate) track_prepared: bool,
    /// The tracking state when `track_prepared`: made when the client is
    /// linked, and dropped again when it goes idle with nothing in it, so
    /// that an idle client costs as little memory as possible.
    pub(crate) prepared: Option<Box<Prepared>>,
    /// The BackendKeyData odissey gave it, for its CancelRequests.
    pub(crate) cancel_key: Option<(u32, u32)>,
}
/// What the worker is to do after a client's transition.
#[derive(Debug)]
pub(crate) enum ClientNext {
    /// Nothing for the worker; whether anything moved (then it runs again).
    Stay(bool),
    /// Close it, with a FATAL error first when given (`Worker::close_client`).
    Close(Option<Fatal>),
    /// It was lingering after an error and hung up: free its slot.
    Closed,
    /// `passthrough`: ask the server whether the user needs a password.
    AskServer(Box<Identity>),
    /// `passthrough`: try its password on the server.
    Verify {
        who: Box<Identity>,
        password: String,
    },
    /// `auth_query`: fetch the user's secret from the server.
    FetchSecret(Box<Identity>),
    /// It was a CancelRequest (already answered with nothing): close it,
    /// and cancel what runs for the key.
    Cancel { pid: u32, key: u32 },
    /// Authenticated: admit it (`Worker::logged_in`), then run it again.
    LoggedIn(Box<Identity>),
    /// Idle with a request in: it needs a server (`Worker::attach`).
    Attach,
    /// Linked: run the pair (`link::pump`).
    Relay,
    /// A console command for the system thread (it is busy until answered).
    Console(crate::console::Command),
}

impl Client {
    /// Runs the transition its socket's readiness allows: reads and writes
    /// what it can, then, by state, the login exchange, an idle client's
    /// next request, a console command, its hanging up. What only the
    /// worker can do (pools, probes, closing) comes back as a `ClientNext`.
    pub(crate) fn on_io(&mut self, cx: &mut Cx<'_>) -> ClientNext {
        let readahead = cx.cfg.readahead;
        let mut progress = self.io.flush();
        let limit = self
            .relay
            .wanted(&self.io.rx)
            .map_or(readahead, |w| w.max(readahead));
        if self.io.fill(limit) {
            progress = true;
            // The batch's clock: no clock read per socket read.
            self.active_ms = cx.now.saturating_duration_since(cx.started).as_millis() as u32;
        }
        let old = std::mem::replace(&mut self.state, ClientState::Moving);
        let (next, then) = match old {
            ClientState::Login(login) => self.logging_in(login, cx, progress),
            ClientState::Idle => (ClientState::Idle, self.next_request(cx, progress)),
            // Nothing may come before the verdict; bytes that do wait (a
            // pipelining client's first query).
            ClientState::Verifying if self.io.eof => {
                (ClientState::Verifying, ClientNext::Close(None))
            }
            ClientState::Verifying => (ClientState::Verifying, ClientNext::Stay(false)),
            ClientState::Console { busy, skipping } if self.io.eof => (
                ClientState::Console { busy, skipping },
                ClientNext::Close(None),
            ),
            ClientState::Console {
                busy: true,
                skipping,
            } => (
                // One command at a time; what follows waits in rx.
                ClientState::Console {
                    busy: true,
                    skipping,
                },
                ClientNext::Stay(false),
            ),
            ClientState::Console {
                busy: false,
                skipping,
            } => self.console_input(skipping, cx, progress),
            ClientState::Closing => {
                self.io.rx.clear();
                let then = if self.io.eof {
                    ClientNext::Closed
                } else {
                    ClientNext::Stay(false)
                };
                (ClientState::Closing, then)
            }
            ClientState::Waiting if self.io.eof => (ClientState::Waiting, ClientNext::Close(None)),
            ClientState::Waiting => (ClientState::Waiting, ClientNext::Stay(progress)),
            ClientState::Linked => (ClientState::Linked, ClientNext::Relay),
            ClientState::Moving => (
                ClientState::Moving,
                ClientNext::Close(Some(Fatal::new(
                    "XX000",
                    "internal error: a transition did not finish",
                ))),
            ),
        };
        self.set_state(next);
        then
    }

    /// The one place a client's state changes: logs the change at debug.
    pub(crate) fn set_state(&mut self, next: ClientState) {
        if std::mem::discriminant(&self.state) != std::mem::discriminant(&next)
            && !matches!(self.state, ClientState::Moving)
        {
            debug!("{}: from {} to {}", self.id, self.state.name(), next.name());
        }
        self.state = next;
    }

    /// Given server `sk`.
    pub(crate) fn link_to(&mut self, sk: Key) {
        self.server = Some(sk);
        self.set_state(ClientState::Linked);
    }

    /// Between requests, holding no server.
    pub(crate) fn unlink(&mut self) {
        self.server = None;
        self.set_state(ClientState::Idle);
    }

    /// Waiting for a server since `since_us` (µs since its worker started).
    pub(crate) fn wait(&mut self, since_us: u32) {
        self.waiting_us = since_us;
        self.set_state(ClientState::Waiting);
    }

    /// Its login goes on (a probe's verdict, or a password to ask for).
    pub(crate) fn resume_login(&mut self, login: Login) {
        self.set_state(ClientState::Login(login));
    }

    /// Admitted to the console (its route's storage is `local`), or its
    /// command answered: ready for the next.
    pub(crate) fn enter_console(&mut self) {
        self.set_state(ClientState::Console {
            busy: false,
            skipping: false,
        });
    }

    /// Closed with an error; lingers until the client reads it and hangs
    /// up (or `LINGER` passes).
    pub(crate) fn linger(&mut self) {
        self.io.rx.clear();
        self.set_state(ClientState::Closing);
    }

    /// Nothing moved: an idle or waiting client gives back the memory it
    /// does not need (empty buffers, pristine statement tracking).
    pub(crate) fn rest(&mut self) {
        if matches!(self.state, ClientState::Idle | ClientState::Waiting) {
            self.io.shrink();
            if self.prepared.as_ref().is_some_and(|p| p.is_pristine()) {
                self.prepared = None;
            }
        }
    }

    /// The login exchange (`auth::Login`): TLS, startup, authentication.
    fn logging_in(
        &mut self,
        login: Login,
        cx: &mut Cx<'_>,
        mut progress: bool,
    ) -> (ClientState, ClientNext) {
        let listener = cx
            .tls
            .listen
            .get(usize::from(self.listener))
            .and_then(Option::as_ref);
        let peer_cn = self.io.stream.peer_common_name();
        let mut lx = Ctx {
            cfg: cx.cfg,
            routes: &mut *cx.routes,
            tls: tls_view(cx.tls, self, peer_cn.as_deref()),
        };
        let (login, outcome) = match login.step(&mut self.io.rx, &mut self.io.out, &mut lx) {
            Ok(stepped) => stepped,
            Err(f) => {
                let why = self.io.stream.tls_error();
                info!(
                    "{}: login refused: {} ({}){}",
                    self.id,
                    f.logged(),
                    f.code,
                    why.map(|w| format!("; TLS: {w}")).unwrap_or_default()
                );
                // The login is spent; the client is still logging in.
                return (
                    ClientState::Login(Login::Startup),
                    ClientNext::Close(Some(f)),
                );
            }
        };
        let then = match outcome {
            Outcome::NeedMore => ClientNext::Stay(progress),
            Outcome::StartTls {
                already_read,
                direct,
            } => {
                // The 'S' must leave in plaintext, before the stream turns
                // to TLS.
                self.io.writable = true;
                self.io.flush();
                let started = match listener {
                    Some(l) if self.io.out.is_empty() => self
                        .io
                        .stream
                        .start_tls_server(&l.server, &already_read)
                        .map_err(|e| e.to_string()),
                    Some(_) => Err("the client does not read".into()),
                    None => Err("TLS is not enabled".into()),
                };
                if let Err(e) = started {
                    info!("{}: cannot start TLS: {e}", self.id);
                    return (ClientState::Login(login), ClientNext::Close(None));
                }
                self.tls_direct = direct;
                // The rest of a ClientHello may already be in the socket:
                // read without waiting for an edge.
                self.io.readable = true;
                progress = true;
                ClientNext::Stay(progress)
            }
            Outcome::AskServer(who) => return (ClientState::Verifying, ClientNext::AskServer(who)),
            Outcome::Verify { who, password } => {
                return (ClientState::Verifying, ClientNext::Verify { who, password })
            }
            Outcome::FetchSecret(who) => {
                return (ClientState::Verifying, ClientNext::FetchSecret(who))
            }
            Outcome::Cancel { pid, key } => {
                // The protocol wants no answer.
                debug!("{}: cancel request for pid {pid}", self.id);
                return (ClientState::Login(login), ClientNext::Cancel { pid, key });
            }
            Outcome::Authenticated(_) if self.reject => {
                let f = Fatal::new("53300", "too many clients: client_max reached");
                return (ClientState::Login(login), ClientNext::Close(Some(f)));
            }
            // Admitted (or refused) by the worker at once.
            Outcome::Authenticated(who) => {
                return (ClientState::Login(login), ClientNext::LoggedIn(who))
            }
        };
        if self.io.eof {
            return (ClientState::Login(login), ClientNext::Close(None));
        }
        (ClientState::Login(login), then)
    }

    /// Between requests: a request in needs a server; Terminate or the end
    /// of the stream closes it, as does any request while draining once it
    /// has had an answer (it is told why).
    fn next_request(&mut self, cx: &Cx<'_>, progress: bool) -> ClientNext {
        if self.io.rx.is_empty() {
            return if self.io.eof {
                ClientNext::Close(None)
            } else {
                ClientNext::Stay(progress)
            };
        }
        match codec::peek_frontend_header(&self.io.rx, cx.cfg.max_message_size) {
            Ok(Some((b'X', _))) => ClientNext::Close(None),
            Ok(_) if cx.draining && self.conv.answered_once() => ClientNext::Close(Some(
                Fatal::new("57P01", "terminating connection: odissey is shutting down"),
            )),
            Ok(_) => ClientNext::Attach,
            Err(e) => ClientNext::Close(Some(Fatal::violation(e))),
        }
    }

    /// Takes a console client's queries: each command goes to the system
    /// thread, one at a time.
    ///
    /// Other messages are answered as PostgreSQL answers them: a
    /// FunctionCall is an error followed by ReadyForQuery; an extended
    /// protocol message is an error, after which everything up to the next
    /// Sync is ignored (`skipping`), and the Sync gets ReadyForQuery; COPY
    /// messages outside COPY are ignored; Terminate closes it; a type
    /// PostgreSQL does not accept is FATAL.
    fn console_input(
        &mut self,
        mut skipping: bool,
        cx: &Cx<'_>,
        mut progress: bool,
    ) -> (ClientState, ClientNext) {
        let max_len = cx.cfg.max_message_size;
        loop {
            let state = ClientState::Console {
                busy: false,
                skipping,
            };
            let frame = match codec::peek_frontend_header(&self.io.rx, max_len)
                .and_then(|_| codec::read_frame(&mut self.io.rx, max_len))
            {
                Ok(Some(f)) => f,
                Ok(None) => return (state, ClientNext::Stay(progress)),
                Err(e) => return (state, ClientNext::Close(Some(Fatal::violation(e)))),
            };
            progress = true;
            const SIMPLE_ONLY: &str = "the console speaks the simple query protocol only";
            match frame.tag {
                b'X' => return (state, ClientNext::Close(None)),
                b'S' => {
                    skipping = false;
                    backend::ready_for_query(&mut self.io.out, TransactionStatus::Idle);
                }
                // Skipping to the Sync after an extended-protocol error.
                _ if skipping => {}
                b'Q' => {
                    let sql = frame
                        .body
                        .strip_suffix(&[0u8])
                        .and_then(|b| std::str::from_utf8(b).ok())
                        .unwrap_or("");
                    match crate::console::parse(sql) {
                        Ok(command) => {
                            debug!("{}: console command {command:?}", self.id);
                            let busy = ClientState::Console {
                                busy: true,
                                skipping: false,
                            };
                            return (busy, ClientNext::Console(command));
                        }
                        Err(message) => {
                            write_error(&mut self.io.out, self.id, "ERROR", "42601", &message);
                            backend::ready_for_query(&mut self.io.out, TransactionStatus::Idle);
                        }
                    }
                }
                // Flush, and COPY messages outside COPY: nothing to do.
                b'H' | b'd' | b'c' | b'f' => {}
                b'F' => {
                    write_error(&mut self.io.out, self.id, "ERROR", "0A000", SIMPLE_ONLY);
                    backend::ready_for_query(&mut self.io.out, TransactionStatus::Idle);
                }
                // Parse, Bind, Describe, Execute, Close.
                _ => {
                    write_error(&mut self.io.out, self.id, "ERROR", "0A000", SIMPLE_ONLY);
                    skipping = true;
                }
            }
        }
    }

    /// A client that just connected, logging in.
    pub(crate) fn new(
        id: ConnId,
        key: Key,
        io: Io,
        listener: u16,
        reject: bool,
        born_s: u32,
        active_ms: u32,
    ) -> Self {
        Self {
            id,
            key,
            io,
            state: ClientState::Login(Login::Startup),
            born_s,
            active_ms,
            waiting_us: 0,
            route: None,
            pool: None,
            family: None,
            turn: 0,
            listens: None,
            server: None,
            relay: Relay::for_client(),
            conv: Conversation::default(),
            greeted: false,
            reject,
            session: Settings::default(),
            check_due: false,
            savepoint: false,
            pinned: None,
            custom: None,
            deadline: None,
            listener,
            tls_direct: false,
            track_prepared: false,
            prepared: None,
            cancel_key: None,
        }
    }
}

/// Appends a pooler-made error for `id`'s client.
pub(crate) fn write_error(
    out: &mut BytesMut,
    id: ConnId,
    severity: &str,
    code: &str,
    message: &str,
) {
    let text = format!("odissey: {id}: {message}");
    backend::error_response(out, severity, code, &text, None);
}

/// Sends a client what PostgreSQL sends after authentication: the
/// ParameterStatus values (the server's, with the client's own settings
/// where it asked for some), a BackendKeyData of odissey's own (the
/// server's key must never reach a client that may hold another server
/// next) and ReadyForQuery. Returns the cancel key given, for the worker
/// to route CancelRequests carrying it.
///
/// `params` are the ParameterStatus values a server reported for the
/// client's settings (or for a login with the same ones); `pid`, in session
/// pooling, the pid of the client's own server.
pub(crate) fn greet(c: &mut Client, params: &[(String, String)], pid: Option<u32>) -> (u32, u32) {
    for (name, value) in params {
        // The settings odissey knows PostgreSQL reports as sent.
        let value = match c.session.get(name) {
            Some(v) if crate::session::reported_locally(name, v) => v,
            _ => value.as_str(),
        };
        backend::parameter_status(&mut c.io.out, name, value);
    }
    // From the uuid crate's thread-local CSPRNG: unguessable, no syscall.
    let key = uuid::Uuid::new_v4().into_bytes();
    let pid = pid.unwrap_or(u32::from_be_bytes([key[0], key[1], key[2], key[3]]) & 0x7fff_ffff);
    let secret = u32::from_be_bytes([key[8], key[9], key[10], key[11]]);
    backend::backend_key_data(&mut c.io.out, pid, secret);
    backend::ready_for_query(&mut c.io.out, TransactionStatus::Idle);
    c.cancel_key = Some((pid, secret));
    c.greeted = true;
    (pid, secret)
}

/// Greets `c` with what its server `s` reports now that the client's
/// settings are applied, and offers it for later logins with the same
/// settings (the values reported as sent are the pool's in the copy kept).
pub(crate) fn greet_linked(c: &mut Client, s: &Server, cx: &mut Cx<'_>) {
    let session_mode = s.route.route.pool == PoolMode::Session;
    let pid = s.key.map(|(pid, _)| pid).filter(|_| session_mode);
    let cancel_key = greet(c, &s.params, pid);
    cx.evts.push(Evt::Greeted {
        client: c.key,
        cancel_key,
    });
    let mut kept = s.params.clone();
    for (name, value) in &mut kept {
        if c.session
            .get(name)
            .is_some_and(|v| crate::session::reported_locally(name, v))
        {
            if let Some(d) = crate::params::get(&s.defaults, name) {
                d.clone_into(value);
            }
        }
    }
    cx.evts.push(Evt::Greeting {
        pool: s.pool.clone(),
        key: crate::session::greeting_key(&c.session),
        greeting: Greeting::Ready(std::sync::Arc::new(kept)),
    });
}

/// How a client's connection stands with TLS, for its login.
pub(crate) fn tls_view<'a>(tls: &TlsSet, c: &Client, peer_cn: Option<&'a str>) -> TlsView<'a> {
    let listener = tls
        .listen
        .get(usize::from(c.listener))
        .and_then(Option::as_ref);
    TlsView {
        mode: listener.map_or(ListenTls::Disable, |l| l.mode),
        on: c.io.stream.is_tls(),
        direct: c.tls_direct,
        alpn_postgresql: c.io.stream.alpn().as_deref() == Some(ALPN_POSTGRESQL),
        peer_cn,
    }
}

/// A client's side of prepared-statement tracking.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// Its named prepared statements.
    pub(crate) stmts: ClientStatements,
    /// What the server owes it, for synthesized and swallowed replies.
    pub(crate) pipeline: Pipeline,
}

impl Prepared {
    /// Nothing to remember: no statements, no replies owed.
    pub(crate) fn is_pristine(&self) -> bool {
        self.stmts.is_empty() && self.pipeline.is_idle()
    }
}

#[cfg(test)]
mod tests {
    /// Every idle client is one slab slot of this size (see `Conn`): keep
    /// rarely used state boxed or lazily made, so that growing past this
    /// is a decision, not an accident.
    #[test]
    fn an_idle_client_stays_small() {
        let size = std::mem::size_of::<super::Client>();
        // 392: 384, plus the pointer to a transaction-pooled listener's
        // channels (`listens`, boxed and None for every other client).
        assert!(size <= 392, "Client is {size} bytes");
    }
}
