//! The admin console's commands as the system thread carries them out:
//! SHOW, RELOAD, KILL, SHUTDOWN, PAUSE and RESUME.

use std::time::Duration;

use bytes::BytesMut;
use log::{info, warn};
use odissey_protocol::backend;
use odissey_reactor::{Context, Key};

use crate::cmd::WorkerCmd;
use crate::console::{self, Command};
use crate::router::WorkerId;

use super::gather::Purpose;
use super::{SysTimer, System};

/// A console KILL waiting for every worker to say how many connections
/// it closed.
pub(super) struct KillWait {
    pub(super) left: usize,
    pub(super) closed: usize,
    /// The target names a database of the config or of a pool: killing
    /// nothing there is no error (it had no connections).
    pub(super) known: bool,
    pub(super) worker: WorkerId,
    pub(super) client: Key,
    pub(super) target: String,
}

impl System {
    /// Carries out a console command; the answer goes back to the client's
    /// worker.
    pub(super) fn console(
        &mut self,
        cx: &mut Context<'_, SysTimer>,
        worker: WorkerId,
        client: Key,
        command: Command,
    ) {
        let mut out = BytesMut::new();
        match command {
            Command::Show(show) if show.needs_lists() => {
                self.gather(
                    cx,
                    Purpose::Console {
                        worker,
                        client,
                        show,
                    },
                );
                return;
            }
            Command::Show(show) => {
                if let Some(run) = &self.running {
                    console::show(&mut out, show, &self.inspect(), &run.cfg);
                }
            }
            Command::Reload => match self.reload(None) {
                Ok((notes, _)) => {
                    self.rearm_stats(cx);
                    for n in notes {
                        backend::notice_response(&mut out, "WARNING", "01000", &n);
                    }
                    backend::command_complete(&mut out, "RELOAD");
                }
                Err(e) => {
                    warn!("reload from the console refused: {e}");
                    backend::error_response(&mut out, "ERROR", "F0000", &e.to_string(), None);
                }
            },
            Command::Kill(target) => {
                let id = self.next_gather;
                self.next_gather += 1;
                let mut left = 0;
                if let Some(run) = &self.running {
                    for w in &run.workers {
                        let target = target.clone();
                        if w.send(WorkerCmd::Kill { id, target }).is_ok() {
                            left += 1;
                        }
                    }
                }
                info!("console: KILL {target}");
                let known = self.knows_database(&target);
                if left > 0 {
                    // Answered once every worker says what it closed.
                    self.kills.insert(
                        id,
                        KillWait {
                            left,
                            closed: 0,
                            known,
                            worker,
                            client,
                            target,
                        },
                    );
                    return;
                }
                kill_answer(&mut out, &target, known);
            }
            Command::Shutdown => {
                info!("console: SHUTDOWN");
                backend::command_complete(&mut out, "SHUTDOWN");
                self.console_reply(worker, client, out, true);
                let grace = self.running.as_ref().map_or(Duration::ZERO, |r| {
                    Duration::from_millis(r.cfg.shutdown_timeout)
                });
                self.shutdown(cx, None, grace);
                return;
            }
            Command::Pause(Some(db)) if !self.knows_database(&db) => {
                // PgBouncer's words.
                let message = format!("no such database: {db}");
                backend::error_response(&mut out, "ERROR", "3D000", &message, None);
            }
            Command::Resume(Some(db)) if !self.paused_dbs.contains(&db) => {
                let message = format!("database {db} is not paused");
                backend::error_response(&mut out, "ERROR", "55000", &message, None);
            }
            Command::Resume(None) if !self.paused_all && self.paused_dbs.is_empty() => {
                let message = "odissey is not paused";
                backend::error_response(&mut out, "ERROR", "55000", message, None);
            }
            Command::Pause(database) => {
                match &database {
                    Some(db) => {
                        self.paused_dbs.insert(db.clone());
                    }
                    None => self.paused_all = true,
                }
                let id = self.next_gather;
                self.next_gather += 1;
                let mut left = 0;
                if let Some(run) = &self.running {
                    for w in &run.workers {
                        let database = database.clone();
                        if w.send(WorkerCmd::Pause { id, database }).is_ok() {
                            left += 1;
                        }
                    }
                }
                info!("console: PAUSE {}", database.as_deref().unwrap_or("(all)"));
                if left > 0 {
                    // Answered when every worker's transactions are done.
                    self.pauses.insert(id, (left, worker, client));
                    return;
                }
                backend::command_complete(&mut out, "PAUSE");
            }
            Command::Resume(database) => {
                // As the workers do it: RESUME (all) lifts every pause.
                match &database {
                    Some(db) => {
                        self.paused_dbs.remove(db);
                    }
                    None => {
                        self.paused_all = false;
                        self.paused_dbs.clear();
                    }
                }
                if let Some(run) = &self.running {
                    for w in &run.workers {
                        let database = database.clone();
                        let _ = w.send(WorkerCmd::Resume { database });
                    }
                }
                info!("console: RESUME {}", database.as_deref().unwrap_or("(all)"));
                backend::command_complete(&mut out, "RESUME");
            }
        }
        self.console_reply(worker, client, out, false);
    }

    /// Whether `db` names a database: a route of the running config, or a
    /// pool (a default route's, or one kept by clients of an older config).
    fn knows_database(&self, db: &str) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.cfg.database.contains_key(db))
            || self.router.knows_database(db)
    }

    pub(super) fn console_reply(&self, worker: WorkerId, client: Key, data: BytesMut, close: bool) {
        if let Some(w) = self.running.as_ref().and_then(|r| r.workers.get(worker)) {
            let _ = w.send(WorkerCmd::ConsoleReply {
                client,
                data,
                close,
            });
        }
    }
}

/// The answer to a console KILL: done, or an error when the target named
/// no connection and no database (PgBouncer's "no such database").
pub(super) fn kill_answer(out: &mut BytesMut, target: &str, matched: bool) {
    if matched {
        backend::command_complete(out, "KILL");
    } else {
        let message = format!("no such client or database: {target}");
        backend::error_response(out, "ERROR", "42704", &message, None);
    }
}
