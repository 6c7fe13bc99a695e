//! Probes: throwaway server logins on behalf of a client that is logging
//! in. A `passthrough` client's password (or the server's trust) is tried
//! against the server; an `auth_query` client's secret is fetched with the
//! route's query. Also what follows from their outcome: the client is
//! verified, challenged with the secret found, or refused.

use std::sync::Arc;

use log::{debug, info, warn};
use odissey_protocol::backend;
use odissey_protocol::scram::ScramCredential;
use odissey_protocol::{codec, frontend};
use odissey_reactor::{Context, Key, TimerId};

use crate::auth::{Fatal, Identity, Login, Outcome};
use crate::backend_login::{AskTls, BackendLogin};
use crate::config::ResolvedRoute;
use crate::credentials;
use crate::io::Io;
use crate::worker::client::ClientState;

use super::client::tls_view;
use super::failure::ServerFailure;
use super::opening::{Opened, Resume};
use super::server::{step_login, unconnected, LoginStep};
use super::{insert_registered, Conn, Worker, WorkerTimer, MAX_ROUNDS};

/// A throwaway server login on behalf of a client that is logging in: it
/// tries a `passthrough` client's password, or runs `auth_query` for the
/// client's secret.
#[derive(Debug)]
pub(crate) struct Probe {
    pub(super) io: Io,
    login: BackendLogin,
    /// The TCP connect has completed.
    connected: bool,
    /// The client waiting for the outcome.
    client: Key,
    who: Box<Identity>,
    pub(super) timer: Option<TimerId>,
    job: Job,
    /// Where and as whom it logs in, to try again over TLS under
    /// `tls = "allow"` (then set).
    retry: Option<(Arc<ResolvedRoute>, Option<ScramCredential>)>,
    /// The server it logs in to (a host that is up, of several).
    endpoint: crate::config::Endpoint,
}

/// What a probe is for.
#[derive(Debug)]
pub(crate) enum Job {
    /// Log in with no password (`passthrough`): getting in without being
    /// asked for one means the server trusts the user.
    Trust,
    /// Log in with the client's password: getting in proves it.
    Verify { password: String },
    /// Log in as the auth_query route's user and run the query.
    Fetch {
        /// The query went out.
        sent: bool,
        /// The last column of the first row (None: no row, or NULL).
        secret: Option<String>,
        /// The query failed with this message.
        error: Option<String>,
    },
}

/// How long a probe (passthrough check, auth_query) may take.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Worker {
    /// A `passthrough` client, before it is asked for anything: when the
    /// server lets its user into its database without a password (seen
    /// within `credentials::TRUST_TTL`, else asked now by a login with
    /// none), it is let in without one, as PostgreSQL would; otherwise it
    /// is asked for its password, which the server then judges.
    pub(super) fn ask_server(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        who: Box<Identity>,
    ) {
        let route = Arc::clone(&who.route);
        let (storage, db, user) = (&route.route.storage, &route.server_db, &route.server_user);
        match credentials::server_trusts(storage, db, user) {
            Some(true) => self.verified(cx, ck, *who),
            Some(false) => self.ask_client_password(cx, ck, who),
            None => self.start_probe(cx, ck, who, route, None, Job::Trust, None),
        }
    }

    /// A `passthrough` client is asked for its password after all.
    fn ask_client_password(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        who: Box<Identity>,
    ) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        if !matches!(c.state, ClientState::Verifying) {
            return;
        }
        let login = Login::ask_password(who, &mut c.io.out);
        c.resume_login(login);
        self.drive_client(cx, ck);
    }

    /// Checks a `passthrough` client's password: against what was proved
    /// before when there is that, else by logging in to the server with it.
    pub(super) fn verify_password(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        who: Box<Identity>,
        password: String,
    ) {
        if credentials::check(&who.route.route.storage, &who.route.server_user, &password) {
            self.verified(cx, ck, *who);
            return;
        }
        let route = Arc::clone(&who.route);
        let credential = Some(ScramCredential::Password(password.clone()));
        self.start_probe(
            cx,
            ck,
            who,
            route,
            credential,
            Job::Verify { password },
            None,
        );
    }

    /// Finds an auth_query client's secret: from the recent cache, else by
    /// running the query through its route's server credentials.
    pub(super) fn fetch_secret(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        mut who: Box<Identity>,
    ) {
        let storage = who.route.route.storage.clone();
        if let Some(secret) = credentials::cached_secret(&storage, &who.user) {
            who.secret = secret;
            self.secret_found(cx, ck, who);
            return;
        }
        let r = &who.route.route;
        let (qdb, quser) = (
            r.auth_query_db
                .clone()
                .unwrap_or_else(|| who.database.clone()),
            r.auth_query_user.clone().unwrap_or_default(),
        );
        let Some(qroute) = self.w.routes.route(&self.w.cfg, &qdb, &quser) else {
            let failure = ServerFailure::NoAuthQueryRoute {
                user: quser,
                database: qdb,
            };
            warn!("{failure}");
            self.refuse_unproved(cx, ck, &who, failure);
            return;
        };
        let credential = qroute
            .server_password
            .clone()
            .map(ScramCredential::Password);
        let job = Job::Fetch {
            sent: false,
            secret: None,
            error: None,
        };
        self.start_probe(cx, ck, who, qroute, credential, job, None);
    }

    /// Opens a probe's server connection: `route`'s storage, database and
    /// user, logging in with `credential`; `ask` overrides the storage's TLS
    /// (the retry of `tls = "allow"`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_probe(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        who: Box<Identity>,
        route: Arc<ResolvedRoute>,
        credential: Option<ScramCredential>,
        job: Job,
        ask: Option<AskTls>,
    ) {
        let asked = ask;
        let retry = (ask.is_none() && self.w.retries_with_tls(&route))
            .then(|| (Arc::clone(&route), credential.clone()));
        let ask = ask.unwrap_or_else(|| self.w.ask_tls(&route));
        let endpoint = self.w.any_host(&route, cx.now()).clone();
        let st = &endpoint;
        let stream = match self.open_storage(cx, st) {
            Opened::Stream(s) => s,
            Opened::Failed(failure) => {
                self.refuse_unproved(cx, ck, &who, failure);
                return;
            }
            Opened::Wait => {
                let host = st.host.clone();
                let r = Resume::Probe {
                    client: ck,
                    who,
                    route,
                    credential,
                    job,
                    ask: asked,
                };
                self.park(cx, &host, r);
                return;
            }
        };
        let _ = stream.tune(self.w.cfg.keepalive());
        let mut io = Io::new(stream, false);
        let login = BackendLogin::start(
            &mut io.out,
            &route.server_db,
            &route.server_user,
            credential,
            ask,
        );
        let (k, failed) = insert_registered(&mut self.conns, cx.registry(), io, |_, io| {
            Conn::Probe(Box::new(Probe {
                io,
                login,
                connected: false,
                client: ck,
                who,
                timer: None,
                job,
                retry,
                endpoint,
            }))
        });
        if let Some(e) = failed {
            let failure = ServerFailure::Register {
                error: e.to_string(),
                probe: true,
            };
            self.finish_probe(cx, k, Err(failure));
            return;
        }
        let t = cx.set_timer(cx.now() + PROBE_TIMEOUT, WorkerTimer::ProbeTimeout(k));
        if let Some(Conn::Probe(p)) = self.conns.get_mut(k) {
            p.timer = Some(t);
        }
    }

    pub(super) fn drive_probe(&mut self, cx: &mut Context<'_, WorkerTimer>, k: Key) {
        let readahead = self.w.cfg.readahead;
        for _ in 0..MAX_ROUNDS {
            let Some(Conn::Probe(p)) = self.conns.get_mut(k) else {
                return;
            };
            if !p.connected {
                match p.io.stream.take_error() {
                    Ok(None) if p.io.stream.is_connected() => {
                        p.connected = true;
                        p.io.writable = true;
                    }
                    Ok(None) if !p.io.eof => return,
                    Ok(Some(e)) | Err(e) => {
                        let st = &p.endpoint;
                        let failure = ServerFailure::Connect {
                            host: st.host.clone(),
                            port: st.port,
                            error: e.to_string(),
                        };
                        self.finish_probe(cx, k, Err(failure));
                        return;
                    }
                    Ok(None) => {
                        let failure = unconnected(&p.io, &p.endpoint);
                        self.finish_probe(cx, k, Err(failure));
                        return;
                    }
                }
            }
            let mut moved = p.io.flush();
            if let Job::Fetch {
                sent: true,
                secret,
                error,
            } = &mut p.job
            {
                // Logged in, query sent: read its answer to ReadyForQuery.
                moved |= p.io.fill(readahead);
                while let Ok(Some(f)) = codec::read_frame(&mut p.io.rx, 1 << 20) {
                    match f.tag {
                        b'D' if secret.is_none() => {
                            *secret = backend::parse_data_row(&f.body)
                                .ok()
                                .and_then(|row| row.last().copied().flatten())
                                .map(|v| String::from_utf8_lossy(v).into_owned());
                        }
                        b'E' => {
                            *error = Some(
                                backend::parse_error_fields(&f.body)
                                    .map_or_else(|e| e.to_string(), |e| e.message),
                            );
                        }
                        b'Z' => {
                            self.finish_probe(cx, k, Ok(()));
                            return;
                        }
                        _ => {}
                    }
                }
                if p.io.eof {
                    self.finish_probe(cx, k, Err(ServerFailure::ClosedAfterLogin));
                    return;
                }
                if !moved {
                    return;
                }
                continue;
            }
            let tls = self.w.tls.storage.get(&p.who.route.route.storage);
            let host = &p.endpoint.host;
            let (more, step) = step_login(&mut p.io, &mut p.login, tls, host, readahead);
            match step {
                LoginStep::Pending if moved || more => {}
                LoginStep::Pending => return,
                LoginStep::Ready => {
                    let Job::Fetch { sent, .. } = &mut p.job else {
                        self.finish_probe(cx, k, Ok(()));
                        return;
                    };
                    // The user name goes as a parameter, never into the SQL.
                    let query = p.who.route.route.auth_query.as_deref().unwrap_or_default();
                    frontend::parse(&mut p.io.out, "", query, &[]);
                    frontend::bind(&mut p.io.out, "", "", &[Some(p.who.user.as_bytes())]);
                    frontend::execute(&mut p.io.out, "", 1);
                    frontend::sync(&mut p.io.out);
                    *sent = true;
                }
                LoginStep::Failed(failure) => {
                    self.finish_probe(cx, k, Err(failure));
                    return;
                }
            }
        }
        self.w.again.push(k);
        cx.again();
    }

    /// Ends a probe and tells its client.
    pub(super) fn finish_probe(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        k: Key,
        outcome: Result<(), ServerFailure>,
    ) {
        let Some(Conn::Probe(p)) = self.conns.get_mut(k) else {
            return;
        };
        if let Some(t) = p.timer.take() {
            cx.cancel_timer(t);
        }
        if outcome.is_ok() && !p.io.eof {
            frontend::terminate(&mut p.io.out);
            p.io.writable = true;
            p.io.flush();
        }
        let Some(slot) = self.conns.get_mut(k) else {
            return;
        };
        let Conn::Probe(p) = std::mem::replace(slot, Conn::Dead) else {
            return;
        };
        self.w.dead.push(k);
        let Probe {
            client,
            mut who,
            job,
            retry,
            login,
            ..
        } = *p;
        let challenged = login.challenged();
        if let (Some((route, credential)), Err(failure)) = (retry, &outcome) {
            let code = failure.code();
            if code != "08006" {
                debug!("probe refused in plaintext ({failure}, {code}); trying again over TLS (tls = allow)");
                let job = match job {
                    Job::Trust => Job::Trust,
                    Job::Verify { password } => Job::Verify { password },
                    Job::Fetch { .. } => Job::Fetch {
                        sent: false,
                        secret: None,
                        error: None,
                    },
                };
                self.start_probe(
                    cx,
                    client,
                    who,
                    route,
                    credential,
                    job,
                    Some(AskTls::Require),
                );
                return;
            }
        }
        let storage = who.route.route.storage.clone();
        match (job, outcome) {
            (Job::Trust, outcome) => {
                let r = &who.route;
                let (db, user) = (&r.server_db, &r.server_user);
                if outcome.is_ok() && !challenged {
                    credentials::remember_trust(&storage, db, user, true);
                    self.verified(cx, client, *who);
                } else {
                    // Asked for a password: the client is, too. Any other
                    // failure (no such database, server down) is not
                    // remembered, and the client is asked as before: the
                    // login with its password meets the same and says so.
                    if challenged {
                        credentials::remember_trust(&storage, db, user, false);
                    }
                    self.ask_client_password(cx, client, who);
                }
            }
            (Job::Verify { password }, Ok(())) => {
                credentials::remember_password(&storage, &who.route.server_user, &password);
                self.verified(cx, client, *who);
            }
            (Job::Verify { .. }, Err(failure)) => {
                if matches!(failure.code(), "28P01" | "28000") {
                    credentials::forget(&storage, &who.route.server_user);
                }
                self.refuse_unproved(cx, client, &who, failure);
            }
            (Job::Fetch { error: Some(e), .. }, Ok(())) => {
                let failure = ServerFailure::AuthQuery(e);
                warn!("{failure}");
                self.refuse_unproved(cx, client, &who, failure);
            }
            (Job::Fetch { secret, .. }, Ok(())) => {
                credentials::remember_secret(&storage, &who.user, secret.clone());
                who.secret = secret;
                self.secret_found(cx, client, who);
            }
            (Job::Fetch { .. }, Err(failure)) => {
                // The server's own code, before `AuthQueryLogin` says a
                // wrong password as 08006: the query route's login failing
                // is not the client's wrong password.
                let code = failure.code().to_owned();
                let failure = ServerFailure::AuthQueryLogin(Box::new(failure));
                warn!("{failure} ({code})");
                self.refuse_unproved(cx, client, &who, failure);
            }
        }
    }

    /// auth_query found the client's secret (or that there is none): the
    /// login goes on as for a configured one.
    fn secret_found(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key, who: Box<Identity>) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        if !matches!(c.state, ClientState::Verifying) {
            return;
        }
        let peer_cn = c.io.stream.peer_common_name();
        let tls = tls_view(&self.w.tls, c, peer_cn.as_deref());
        match Login::challenge(who, &mut c.io.out, tls) {
            Ok((login, Outcome::NeedMore)) => {
                c.resume_login(login);
                self.drive_client(cx, ck);
            }
            Ok((_, other)) => {
                // The methods auth_query serves all ask the client first.
                warn!(
                    "{}: unexpected login step after auth_query: {other:?}",
                    c.id
                );
                let f = Fatal::new("XX000", "internal error during login");
                self.close_client(cx, ck, Some(f));
            }
            Err(f) => {
                info!("{}: login refused: {} ({})", c.id, f.message, f.code);
                self.close_client(cx, ck, Some(f));
            }
        }
    }

    /// A passthrough client's password is right: it is logged in.
    fn verified(&mut self, cx: &mut Context<'_, WorkerTimer>, ck: Key, who: Identity) {
        let Some(Conn::Client(c)) = self.conns.get_mut(ck) else {
            return;
        };
        if !matches!(c.state, ClientState::Verifying) {
            return;
        }
        backend::authentication_ok(&mut c.io.out);
        if c.reject {
            let f = Fatal::new("53300", "too many clients: client_max reached");
            self.close_client(cx, ck, Some(f));
            return;
        }
        self.logged_in(cx, ck, who);
        self.drive_client(cx, ck);
    }

    /// A client's login could not go on: a refusal by the server of a
    /// passthrough password reads as a wrong password; anything else
    /// (server down, auth_query failing) is said as it is.
    fn refuse_unproved(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        ck: Key,
        who: &Identity,
        failure: ServerFailure,
    ) {
        let code = failure.code();
        let f = if matches!(code, "28P01" | "28000") {
            crate::auth::password_failed(&who.user)
        } else {
            warn!(
                "login of user {:?} could not be checked: {failure} ({code})",
                who.user
            );
            failure.fatal()
        };
        if let Some(Conn::Client(c)) = self.conns.get(ck) {
            if matches!(c.state, ClientState::Verifying) {
                info!("{}: login refused: {} ({})", c.id, f.message, f.code);
                self.close_client(cx, ck, Some(f));
            }
        }
    }
}
