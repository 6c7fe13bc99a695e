//! Gathering the workers' connection lists and counters, and what is made
//! of them: an inspection, a console SHOW, the metrics, the stats summary.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use log::info;
use odissey_facade::{Call, ClientInfo, Inspection, Reply, ServerInfo, ThreadStats};
use odissey_reactor::{Context, Key, TimerId};

use crate::cmd::{SysCmd, WorkerCmd};
use crate::console::{self, Show};
use crate::metrics;
use crate::router::WorkerId;
use crate::stats::Counters;

use super::{SysTimer, System};

/// Connection lists being collected from the workers, and who asked.
pub(super) struct Gather {
    /// Workers yet to answer.
    pub(super) left: usize,
    pub(super) clients: Vec<ClientInfo>,
    pub(super) servers: Vec<ServerInfo>,
    /// Counters by (database, user), summed over workers.
    pub(super) counters: HashMap<(String, String), Counters>,
    pub(super) purpose: Purpose,
    pub(super) timer: Option<TimerId>,
}

/// Who a gathering is for.
pub(super) enum Purpose {
    /// A facade `inspect`.
    Inspect(Call),
    /// A console client's `SHOW`.
    Console {
        worker: WorkerId,
        client: Key,
        show: Show,
    },
    /// A `GET /metrics` on HTTP connection `conn`.
    Metrics { conn: usize, serial: u64 },
    /// The `stats_interval` summary.
    Log,
}

/// How long a gathering waits for the workers.
pub(super) const GATHER_TIMEOUT: Duration = Duration::from_secs(2);

impl System {
    pub(super) fn inspect(&self) -> Inspection {
        let mut i = Inspection {
            clients: self.clients.load(std::sync::atomic::Ordering::Relaxed),
            routes: self.router.stats(),
            storages: self.router.storage_stats(),
            hosts: self.router.host_stats(),
            ..Inspection::default()
        };
        if let Some(run) = &self.running {
            i.tcp.clone_from(&run.started.tcp);
            i.unix.clone_from(&run.started.unix);
            i.workers = run.started.workers;
            i.metrics = run.started.metrics;
            let thread = |name: String, c: &odissey_reactor::ChannelStats| ThreadStats {
                name,
                messages: c.received(),
                wakeups: c.drains(),
            };
            i.threads
                .push(thread("odissey-system".into(), &self.me.stats()));
            i.system_commands = SysCmd::KINDS
                .iter()
                .zip(self.commands)
                .map(|(k, n)| ((*k).to_string(), n))
                .collect();
            for (w, tx) in run.workers.iter().enumerate() {
                i.threads
                    .push(thread(format!("odissey-worker-{w}"), &tx.stats()));
            }
        }
        i
    }

    /// Asks every worker for its connections; `purpose` is served when all
    /// have answered (or after `GATHER_TIMEOUT`).
    pub(super) fn gather(&mut self, cx: &mut Context<'_, SysTimer>, purpose: Purpose) {
        let id = self.next_gather;
        self.next_gather += 1;
        let mut left = 0;
        if let Some(run) = &self.running {
            for w in &run.workers {
                if w.send(WorkerCmd::Snapshot { id }).is_ok() {
                    left += 1;
                }
            }
        }
        let timer =
            (left > 0).then(|| cx.set_timer(cx.now() + GATHER_TIMEOUT, SysTimer::Gather(id)));
        self.gathers.insert(
            id,
            Gather {
                left,
                clients: Vec::new(),
                servers: Vec::new(),
                counters: HashMap::new(),
                purpose,
                timer,
            },
        );
        if left == 0 {
            self.complete_gather(cx, id);
        }
    }

    pub(super) fn complete_gather(&mut self, cx: &mut Context<'_, SysTimer>, id: u64) {
        let Some(mut g) = self.gathers.remove(&id) else {
            return;
        };
        if let Some(t) = g.timer.take() {
            cx.cancel_timer(t);
        }
        let mut ins = self.inspect();
        g.clients
            .sort_by(|a, b| (&a.database, &a.user, &a.id).cmp(&(&b.database, &b.user, &b.id)));
        g.servers
            .sort_by(|a, b| (&a.database, &a.user, &a.id).cmp(&(&b.database, &b.user, &b.id)));
        ins.client_list = g.clients;
        ins.server_list = g.servers;
        for r in &mut ins.routes {
            r.clients_pinned = ins
                .client_list
                .iter()
                .filter(|c| c.pinned.is_some() && c.database == r.database && c.user == r.user)
                .count();
            if let Some(c) = g.counters.get(&(r.database.clone(), r.user.clone())) {
                r.xact_count = c.xacts;
                r.query_count = c.queries;
                r.bytes_received = c.bytes_in;
                r.bytes_sent = c.bytes_out;
                r.xact_time_us = c.xact_us;
                r.query_time_us = c.query_us;
                r.wait_count = c.waits;
                r.wait_time_us = c.wait_us;
                r.wait_p50_us = c.wait_hist.quantile(0.50);
                r.wait_p95_us = c.wait_hist.quantile(0.95);
                r.wait_p99_us = c.wait_hist.quantile(0.99);
                r.errors = c
                    .errors
                    .iter()
                    .map(|(class, n)| (String::from_utf8_lossy(class).into_owned(), *n))
                    .collect();
                r.errors.sort();
            }
        }
        match g.purpose {
            Purpose::Inspect(call) => call.answer(Reply::Inspected(ins)),
            Purpose::Console {
                worker,
                client,
                show,
            } => {
                let mut out = BytesMut::new();
                if let Some(run) = &self.running {
                    console::show(&mut out, show, &ins, &run.cfg);
                }
                self.console_reply(worker, client, out, false);
            }
            Purpose::Metrics { conn, serial } => {
                let body = metrics::render(&ins);
                let reply =
                    metrics::response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &body);
                self.answer_http(cx, conn, serial, reply);
            }
            Purpose::Log => {
                let now = std::time::Instant::now();
                for line in metrics::summaries(&ins, &mut self.stats_prev, now - self.stats_at) {
                    info!("{line}");
                }
                self.stats_at = now;
                if let Some(run) = &self.running {
                    let cfg = Arc::clone(&run.cfg);
                    self.arm_stats(cx, &cfg);
                }
            }
        }
    }
}
