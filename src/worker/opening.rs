//! Opening connections to a storage: at once for a Unix socket, an IP
//! address or a host name already resolved; otherwise the opener parks
//! (`Resume`) until the lookup, run off the worker, answers.

/// A storage connection as far as it could be started now.
use std::sync::Arc;
use std::time::Instant;

use log::debug;
use odissey_protocol::scram::ScramCredential;
use odissey_reactor::Context;
use odissey_reactor::{Key, Sender};
use odissey_transport::{connect, connect_unix, Stream};

use crate::auth::Identity;
use crate::backend_login::AskTls;
use crate::cmd::WorkerCmd;
use crate::config::ResolvedRoute;
use crate::resolver::{resolve_blocking, Lookup, Start};
use crate::router::PoolKey;
use crate::worker::client::ClientState;

use super::failure::ServerFailure;
use super::probe::Job;
use super::{Conn, Worker, WorkerTimer};

pub(super) enum Opened {
    Stream(Stream),
    /// Why not, for the client and the log (names the host and port).
    Failed(ServerFailure),
    /// The host name is being resolved: park the caller.
    Wait,
}

impl Worker {
    /// Starts a non-blocking connection to storage `st`: its Unix socket
    /// (`<dir>/.s.PGSQL.<port>`, as libpq names it) or its TCP address. At
    /// once for a Unix socket, an IP address or a host name `Dns` knows;
    /// otherwise a lookup runs off this thread and the caller parks
    /// (`park`) until it ends.
    pub(super) fn open_storage(
        &mut self,
        cx: &mut Context<'_, WorkerTimer>,
        st: &crate::config::Endpoint,
    ) -> Opened {
        let cannot = |e: &dyn std::fmt::Display| ServerFailure::Connect {
            host: st.host.clone(),
            port: st.port,
            error: e.to_string(),
        };
        let opened = match &st.unix_socket_dir {
            Some(dir) => {
                let path = std::path::Path::new(dir).join(format!(".s.PGSQL.{}", st.port));
                connect_unix(&path)
            }
            None => match self.w.dns.lookup(&st.host, st.port, cx.now()) {
                Lookup::Ready(addr) => connect(addr),
                Lookup::Failed(e) => return Opened::Failed(cannot(&e)),
                Lookup::Wait => return Opened::Wait,
            },
        };
        match opened {
            Ok(s) => Opened::Stream(s),
            Err(e) => Opened::Failed(cannot(&e)),
        }
    }

    /// Parks `r` until `host` is resolved; the first to wait for it sets
    /// the lookup's deadline.
    pub(super) fn park(&mut self, cx: &mut Context<'_, WorkerTimer>, host: &str, r: Resume) {
        debug!(
            "worker {}: waiting for host {host:?} to be resolved",
            self.w.id
        );
        if let Some(id) = self.w.dns.park(host, r) {
            let at = cx.now() + self.w.lookup_timeout();
            cx.set_timer(at, WorkerTimer::ResolveTimeout(id));
        }
    }

    /// Runs again what waited for a host name (it finds the answer, or
    /// the failure, in `Dns` now).
    pub(super) fn resume(&mut self, cx: &mut Context<'_, WorkerTimer>, r: Resume) {
        match r {
            Resume::Server {
                pool,
                route,
                ask,
                tls_retry,
            } => self.open_server_asking(cx, pool, route, ask, tls_retry),
            Resume::Cancel {
                server,
                recovering,
                request,
            } => {
                let same = matches!(self.conns.get(server), Some(Conn::Server(s)) if s.query_start == request);
                if recovering || same {
                    self.send_cancel(cx, server, recovering);
                } else {
                    debug!(
                        "worker {}: a cancel waited for DNS past its request: dropped",
                        self.w.id
                    );
                }
            }
            Resume::Probe {
                client,
                who,
                route,
                credential,
                job,
                ask,
            } => {
                // A client that gave up (auth_timeout, EOF) needs no probe.
                if matches!(self.conns.get(client), Some(Conn::Client(c)) if matches!(c.state, ClientState::Verifying))
                {
                    self.start_probe(cx, client, who, route, credential, job, ask);
                }
            }
        }
    }
}

/// What waits for a storage's host name to be resolved, to be run again
/// once it is (or to fail with the lookup's error).
#[derive(Debug)]
pub(crate) enum Resume {
    /// `open_server_asking`.
    Server {
        pool: PoolKey,
        route: Arc<ResolvedRoute>,
        ask: AskTls,
        tls_retry: bool,
    },
    /// `send_cancel` (a recovering server waits for it: `cancelling`);
    /// otherwise only while the server still runs the request that started
    /// at `request` (a late cancel must not hit the next client's query).
    Cancel {
        server: Key,
        recovering: bool,
        request: Option<Instant>,
    },
    /// `start_probe`, for a client still `Verifying`.
    Probe {
        client: Key,
        who: Box<Identity>,
        route: Arc<ResolvedRoute>,
        credential: Option<ScramCredential>,
        job: Job,
        ask: Option<AskTls>,
    },
}

/// Starts the lookups of a worker's `Dns`: one thread per host name
/// (`Dns` runs one lookup per name at a time), which answers through the
/// worker's own channel.
pub(super) fn lookups_for(me: Option<Sender<WorkerCmd>>) -> Start {
    Box::new(move |host: &str| {
        let Some(me) = me.clone() else {
            return Err(std::io::Error::other("no channel to answer on"));
        };
        let host = host.to_string();
        std::thread::Builder::new()
            .name("odissey-resolve".into())
            .spawn(move || {
                let answer = resolve_blocking(&host);
                // The worker may have stopped meanwhile: nobody to tell.
                let _ = me.send(WorkerCmd::Resolved { host, answer });
            })
            .map(|_| ())
    })
}
