//! The system thread: listeners, the router, and the facade's requests.
//!
//! It accepts connections and deals them round-robin to the workers, keeps
//! the pools' books (see [`crate::router`]), and answers start, reload,
//! inspect and shutdown.

mod console;
mod gather;
mod http;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::BytesMut;
use log::{error, info, warn};
use odissey_facade::{Call, ConfigSource, Error, Reply, Request, Started};
use odissey_protocol::backend;
use odissey_reactor::{Context, Handler, Key, Reactor, Ready, Sender, TimerId, Token};
use odissey_transport::{Listener, ListenerAddr};

use crate::cmd::{SysCmd, WorkerCmd};
use crate::config::{resolve, Config};
use crate::metrics;
use crate::router::{Action, PoolKey, Registry, Router, WorkerId};
use crate::tls::TlsSet;
use crate::worker::Worker;

use console::{kill_answer, KillWait};
use gather::{Gather, Purpose, GATHER_TIMEOUT};
use http::{MetricsServer, METRICS_LISTENER};

/// Deadlines of the system thread.
#[derive(Debug)]
pub(crate) enum SysTimer {
    /// Workers had their grace period and a bit more: stop regardless.
    ShutdownDeadline,
    /// A reload's workers took too long to apply it: answer anyway.
    Reloaded(u64),
    /// A gathering of connection lists waited long enough for workers
    /// (one stopped, or is stuck): answer with what came.
    Gather(u64),
    /// Time for the `stats_interval` summary.
    Stats,
    /// Time to top pools up to `min_pool_size`.
    Warm,
    /// Time to close the metrics endpoint's HTTP connections past their
    /// deadline.
    HttpSweep,
}

/// How often pools are topped up to `min_pool_size`.
const WARM_EVERY: Duration = Duration::from_secs(1);

struct Running {
    cfg: Arc<Config>,
    /// The TLS material the workers use.
    tls: Arc<TlsSet>,
    source: ConfigSource,
    listeners: Vec<Listener>,
    started: Started,
    workers: Vec<Sender<WorkerCmd>>,
    threads: Vec<JoinHandle<()>>,
}

/// The system thread's handler.
pub(crate) struct System {
    me: Sender<SysCmd>,
    running: Option<Running>,
    router: Router,
    /// Clients connected, counted by the workers (client_max).
    clients: Arc<AtomicUsize>,

    /// Shutdown in progress: the calls to answer once every worker has
    /// drained (none when the console asked), and the workers left.
    stopping: Option<(Vec<Call>, usize)>,
    /// Connection lists being gathered, by id.
    gathers: HashMap<u64, Gather>,
    /// PAUSE commands waiting for workers: id → (workers left, the
    /// console client's worker and key).
    pauses: HashMap<u64, (usize, WorkerId, Key)>,
    /// KILL commands waiting for workers, by id.
    kills: HashMap<u64, KillWait>,
    /// What the console paused (all, and databases by name), so that a
    /// RESUME of something not paused is answered with an error.
    paused_all: bool,
    paused_dbs: std::collections::HashSet<String>,
    /// Facade reloads waiting for every worker to apply the new config:
    /// id → (workers left, the call, its answer). A login that starts
    /// after `reload` returns sees the new config on any worker.
    reloads: HashMap<u64, (usize, Call, Reply)>,
    metrics: Option<MetricsServer>,
    /// The totals of the last `stats_interval` summary, and when.
    stats_prev: HashMap<(String, String), metrics::Totals>,
    stats_at: std::time::Instant,
    stats_timer: Option<TimerId>,
    /// Commands received, by `SysCmd::kind`.
    commands: [u64; SysCmd::KINDS.len()],
    next_gather: u64,
}

impl System {
    pub(crate) fn new(me: Sender<SysCmd>) -> Self {
        Self {
            me,
            running: None,
            router: Router::new(Arc::new(Registry::new(1))),
            clients: Arc::new(AtomicUsize::new(0)),
            gathers: HashMap::new(),
            reloads: HashMap::new(),
            pauses: HashMap::new(),
            kills: HashMap::new(),
            paused_all: false,
            paused_dbs: std::collections::HashSet::new(),
            metrics: None,
            stats_prev: HashMap::new(),
            stats_at: std::time::Instant::now(),
            stats_timer: None,
            commands: [0; SysCmd::KINDS.len()],
            next_gather: 1,

            stopping: None,
        }
    }

    fn load(source: &ConfigSource) -> Result<Config, Error> {
        match source {
            ConfigSource::Toml(t) => Config::parse(t),
            ConfigSource::File(p) => Config::load(p),
        }
        .map_err(|e| Error::Config(e.0))
    }

    fn start(
        &mut self,
        cx: &mut Context<'_, SysTimer>,
        source: ConfigSource,
    ) -> Result<Started, Error> {
        if self.running.is_some() {
            return Err(Error::AlreadyStarted);
        }
        let cfg = Arc::new(Self::load(&source)?);
        let (tls, errors) = TlsSet::load(&cfg, None);
        if !errors.is_empty() {
            return Err(Error::Config(errors.join("; ")));
        }
        let tls = Arc::new(tls);
        let mut listeners = Vec::new();
        let mut started = Started {
            tcp: Vec::new(),
            unix: Vec::new(),
            workers: cfg.worker_count(),
            metrics: None,
        };
        for l in &cfg.listen {
            if let Some(port) = l.port {
                let host = l.host.as_deref().unwrap_or("127.0.0.1");
                let addr = resolve(host, port)
                    .map_err(|e| Error::Io(format!("listen {host}:{port}: {e}")))?;
                let listener = Listener::bind_tcp(addr, l.backlog)
                    .and_then(|l| l.tune(cfg.keepalive()).map(|()| l))
                    .map_err(|e| Error::Io(format!("cannot listen on {addr}: {e}")))?;
                listeners.push(listener);
            }
            if let Some(path) = &l.unix_socket {
                let listener = Listener::bind_unix(std::path::Path::new(path))
                    .map_err(|e| Error::Io(format!("cannot listen on {path}: {e}")))?;
                listeners.push(listener);
            }
        }
        for l in &listeners {
            match l.local_addr() {
                Ok(ListenerAddr::Tcp(a)) => started.tcp.push(a),
                Ok(ListenerAddr::Unix(p)) => started.unix.push(p),
                Err(e) => return Err(Error::Io(e.to_string())),
            }
        }
        let registry = Arc::new(Registry::new(cfg.worker_count()));
        self.router = Router::new(Arc::clone(&registry));
        let (workers, threads) = spawn_workers(&cfg, &tls, &self.me, &registry, &self.clients)
            .map_err(|e| Error::Io(e.to_string()))?;
        // Every worker accepts from its own clone of each listener: a new
        // client never crosses a thread. The system thread keeps the
        // originals (and closes them first at shutdown).
        for w in &workers {
            let mut clones = Vec::with_capacity(listeners.len());
            for l in &listeners {
                clones.push(l.try_clone().map_err(|e| Error::Io(e.to_string()))?);
            }
            let _ = w.send(WorkerCmd::Listen {
                listeners: clones,
                keepalive: cfg.keepalive(),
            });
        }
        for a in &started.tcp {
            info!("listening on {a}");
        }
        for p in &started.unix {
            info!("listening on {}", p.display());
        }
        info!("{} worker(s) started", started.workers);
        if let Some(addr) = &cfg.metrics.listen {
            let bound = crate::config::resolve_host_port(addr)
                .and_then(|a| Listener::bind_tcp(a, 128))
                .and_then(|mut l| {
                    cx.registry()
                        .register(&mut l, METRICS_LISTENER, mio::Interest::READABLE)
                        .map(|()| l)
                });
            match bound {
                Ok(listener) => {
                    if let Ok(a) = listener.local_addr() {
                        info!("metrics on http://{a}/metrics");
                        if let ListenerAddr::Tcp(a) = a {
                            started.metrics = Some(a);
                        }
                    }
                    self.metrics = Some(MetricsServer {
                        listener,
                        conns: slab::Slab::new(),
                        next_serial: 0,
                        sweep: None,
                    });
                }
                // Like a [[listen]] that can't bind: the start fails.
                Err(e) => return Err(Error::Io(format!("cannot serve metrics on {addr}: {e}"))),
            }
        }
        self.stats_at = std::time::Instant::now();
        self.arm_stats(cx, &cfg);
        self.warm();
        cx.set_timer(cx.now() + WARM_EVERY, SysTimer::Warm);
        self.running = Some(Running {
            cfg,
            tls,
            source,
            listeners,
            started: started.clone(),
            workers,
            threads,
        });
        Ok(started)
    }

    /// Applies a new config; the notes say what needs a restart.
    /// Applies a new config (see `apply_config`); returns the notes and
    /// the id the workers acknowledge it with.
    fn reload(&mut self, source: Option<ConfigSource>) -> Result<(Vec<String>, u64), Error> {
        let id = self.next_gather;
        self.next_gather += 1;
        self.apply_config(source, id).map(|notes| (notes, id))
    }

    fn apply_config(
        &mut self,
        source: Option<ConfigSource>,
        id: u64,
    ) -> Result<Vec<String>, Error> {
        let Some(run) = &mut self.running else {
            return Err(Error::NotStarted);
        };
        let source = source.unwrap_or_else(|| run.source.clone());
        let cfg = Arc::new(Self::load(&source)?);
        // Addresses need a restart; TLS files and modes apply to new clients.
        let addrs = |c: &Config| -> Vec<_> {
            c.listen
                .iter()
                .map(|l| (l.host.clone(), l.port, l.unix_socket.clone(), l.backlog))
                .collect()
        };
        let mut notes = Vec::new();
        if addrs(&cfg) != addrs(&run.cfg) {
            notes.push("[[listen]] address changes take effect at restart".to_string());
        }
        if cfg.metrics != run.cfg.metrics {
            notes.push("[metrics] changes take effect at restart".to_string());
        }
        let logging = |c: &Config| {
            (
                c.log_debug,
                c.log_file.clone(),
                c.log_syslog,
                c.log_syslog_ident.clone(),
                c.log_syslog_facility.clone(),
                c.log_to_stdout,
                c.log_format,
            )
        };
        if logging(&cfg) != logging(&run.cfg) {
            notes.push("log_* changes take effect at restart".to_string());
        }
        let (tls, errors) = TlsSet::load(&cfg, Some(&run.tls));
        for e in errors {
            warn!("reload: {e}; keeping the previous TLS configuration there");
        }
        run.tls = Arc::new(tls);
        if cfg.worker_count() != run.cfg.worker_count() {
            notes.push("a new `workers` count takes effect at restart".to_string());
        }
        for n in &notes {
            warn!("reload: {n}");
        }
        for w in &run.workers {
            let _ = w.send(WorkerCmd::Configure {
                cfg: Arc::clone(&cfg),
                tls: Arc::clone(&run.tls),
                id,
            });
        }
        let actions = self.router.configure(&cfg);
        run.cfg = cfg;
        if let ConfigSource::File(_) = source {
            run.source = source;
        }
        for (pool, a) in actions {
            self.act(&pool, a);
        }
        info!("configuration reloaded");
        Ok(notes)
    }

    fn shutdown(&mut self, cx: &mut Context<'_, SysTimer>, call: Option<Call>, grace: Duration) {
        let Some(run) = &mut self.running else {
            if let Some(call) = call {
                call.answer(Reply::ShutDown);
            }
            cx.stop();
            return;
        };
        if let Some((calls, _)) = &mut self.stopping {
            // Already on its way (e.g. the console asked): answered when done.
            calls.extend(call);
            return;
        }
        info!("shutting down (grace {} ms)", grace.as_millis());
        // The workers drop their clones when they get Drain.
        run.listeners.clear();
        let deadline = cx.now() + grace;
        let mut alive = 0;
        for w in &run.workers {
            if w.send(WorkerCmd::Drain { deadline }).is_ok() {
                alive += 1;
            }
        }
        cx.set_timer(
            deadline + Duration::from_secs(2),
            SysTimer::ShutdownDeadline,
        );
        self.stopping = Some((call.into_iter().collect(), alive));
        if alive == 0 {
            self.finish(cx);
        }
    }

    /// Opens what `min_pool_size` asks for.
    fn warm(&mut self) {
        let Some(run) = &self.running else {
            return;
        };
        let opens = self.router.warm(&run.cfg, run.workers.len());
        for (pool, worker) in opens {
            let (Some(route), Some(w)) = (self.router.route_of(&pool), run.workers.get(worker))
            else {
                continue;
            };
            let _ = w.send(WorkerCmd::Warm { pool, route });
        }
    }

    /// After a reload: a newly set `stats_interval` starts.
    fn rearm_stats(&mut self, cx: &mut Context<'_, SysTimer>) {
        if let Some(run) = &self.running {
            let cfg = Arc::clone(&run.cfg);
            self.arm_stats(cx, &cfg);
        }
    }

    /// Sets the next `stats_interval` summary, unless one is set or the
    /// interval is 0.
    fn arm_stats(&mut self, cx: &mut Context<'_, SysTimer>, cfg: &Config) {
        if cfg.stats_interval > 0 && self.stats_timer.is_none() && self.stopping.is_none() {
            let at = cx.now() + Duration::from_secs(cfg.stats_interval);
            self.stats_timer = Some(cx.set_timer(at, SysTimer::Stats));
        }
    }

    fn finish(&mut self, cx: &mut Context<'_, SysTimer>) {
        if let Some(run) = &mut self.running {
            for t in run.threads.drain(..) {
                if t.join().is_err() {
                    error!("a worker thread panicked");
                }
            }
        }
        if let Some((calls, _)) = self.stopping.take() {
            for call in calls {
                call.answer(Reply::ShutDown);
            }
        }
        for (_, g) in self.gathers.drain() {
            if let Purpose::Inspect(call) = g.purpose {
                call.answer(Reply::Failed(Error::Stopped));
            }
        }
        info!("stopped");
        cx.stop();
    }

    /// Carries out what the router decided about other pools than the one
    /// a call was about (storage_max hands connections between routes).
    fn act_extra(&mut self) {
        for (pool, action) in self.router.take_actions() {
            self.act(&pool, action);
        }
    }

    /// Carries out what the router decided about `pool`.
    fn act(&self, pool: &PoolKey, action: Action) {
        let Some(run) = &self.running else {
            return;
        };
        let send = |w: WorkerId, cmd: WorkerCmd| {
            if let Some(tx) = run.workers.get(w) {
                let _ = tx.send(cmd);
            }
        };
        match action {
            Action::Grant { worker, lease } => {
                if let Some(route) = self.router.route_of(pool) {
                    send(
                        worker,
                        WorkerCmd::Granted {
                            lease,
                            pool: pool.clone(),
                            route,
                        },
                    );
                }
            }
            Action::Ship { from, server, to } => send(
                from,
                WorkerCmd::Ship {
                    server,
                    to,
                    pool: pool.clone(),
                },
            ),
            Action::Wait { reclaim } => {
                for w in reclaim {
                    send(w, WorkerCmd::Reclaim { pool: pool.clone() });
                }
            }
            Action::Close { worker, server } => send(worker, WorkerCmd::CloseIdle { server }),
            Action::Retire { pool } => {
                for w in &run.workers {
                    let _ = w.send(WorkerCmd::Retire { pool: pool.clone() });
                }
            }
            Action::Shrink { pool } => {
                for w in &run.workers {
                    let _ = w.send(WorkerCmd::Shrink { pool: pool.clone() });
                }
            }
        }
    }
}

impl Handler for System {
    type Cmd = SysCmd;
    type Timer = SysTimer;

    fn ready(&mut self, cx: &mut Context<'_, SysTimer>, token: Token, ready: Ready) {
        // Workers accept the clients; only the metrics endpoint is here.
        if token == METRICS_LISTENER {
            self.accept_http(cx);
        } else {
            self.drive_http(cx, token.0, ready);
        }
    }

    fn command(&mut self, cx: &mut Context<'_, SysTimer>, cmd: SysCmd) {
        self.commands[cmd.kind()] += 1;
        match cmd {
            SysCmd::Facade(call) => match call.request.clone() {
                Request::Start(source) => {
                    let reply = match self.start(cx, source) {
                        Ok(s) => Reply::Started(s),
                        Err(e) => Reply::Failed(e),
                    };
                    call.answer(reply);
                }
                Request::Reload(source) => {
                    match self.reload(source) {
                        Ok((notes, id)) => {
                            self.rearm_stats(cx);
                            // Answered once every worker has applied it.
                            let workers = self.running.as_ref().map_or(0, |r| r.workers.len());
                            let reply = Reply::Reloaded { notes };
                            if workers == 0 {
                                call.answer(reply);
                            } else {
                                cx.set_timer(cx.now() + GATHER_TIMEOUT, SysTimer::Reloaded(id));
                                self.reloads.insert(id, (workers, call, reply));
                            }
                        }
                        Err(e) => {
                            warn!("reload refused: {e}");
                            call.answer(Reply::Failed(e));
                        }
                    }
                }
                Request::Inspect => self.gather(cx, Purpose::Inspect(call)),
                Request::Shutdown { grace } => self.shutdown(cx, Some(call), grace),
                _ => call.answer(Reply::Failed(Error::UnexpectedReply(
                    "unknown request".into(),
                ))),
            },

            SysCmd::Need {
                pool,
                route,
                worker,
            } => {
                let a = self.router.need(&pool, &route, worker);
                self.act(&pool, a);
                self.act_extra();
            }
            SysCmd::CancelNeed { pool, worker, n } => self.router.cancel_need(&pool, worker, n),
            SysCmd::ServerUp { pool } => self.router.server_up(&pool),
            SysCmd::Release {
                pool,
                worker,
                server,
                to,
            } => {
                if let Some(a) = self.router.release(&pool, worker, server, to) {
                    self.act(&pool, a);
                }
                self.act_extra();
            }
            SysCmd::ServerClosed {
                pool,
                worker,
                server,
                was,
            } => {
                if let Some(a) = self.router.server_closed(&pool, worker, server, was) {
                    self.act(&pool, a);
                }
                self.act_extra();
            }
            SysCmd::ShipFailed { pool, to } => {
                if let Some(route) = self.router.route_of(&pool) {
                    let a = self.router.need(&pool, &route, to);
                    self.act(&pool, a);
                    self.act_extra();
                }
            }
            SysCmd::Console {
                worker,
                client,
                command,
            } => self.console(cx, worker, client, command),
            SysCmd::Snapshot {
                id,
                clients,
                servers,
                pools,
            } => {
                let Some(g) = self.gathers.get_mut(&id) else {
                    return;
                };
                g.clients.extend(clients);
                g.servers.extend(servers);
                for (pool, c) in pools {
                    let k = (pool.database.to_string(), pool.user.to_string());
                    g.counters.entry(k).or_default().merge(&c);
                }
                g.left = g.left.saturating_sub(1);
                if g.left == 0 {
                    self.complete_gather(cx, id);
                }
            }
            SysCmd::Configured { id } => {
                if let Some((left, _, _)) = self.reloads.get_mut(&id) {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        if let Some((_, call, reply)) = self.reloads.remove(&id) {
                            call.answer(reply);
                        }
                    }
                }
            }
            SysCmd::Paused { id } => {
                if let Some((left, worker, client)) = self.pauses.get_mut(&id) {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        let (worker, client) = (*worker, *client);
                        self.pauses.remove(&id);
                        let mut out = BytesMut::new();
                        backend::command_complete(&mut out, "PAUSE");
                        self.console_reply(worker, client, out, false);
                    }
                }
            }
            SysCmd::Killed { id, closed } => {
                if let Some(k) = self.kills.get_mut(&id) {
                    k.left = k.left.saturating_sub(1);
                    k.closed += closed;
                    if k.left == 0 {
                        if let Some(k) = self.kills.remove(&id) {
                            let mut out = BytesMut::new();
                            kill_answer(&mut out, &k.target, k.known || k.closed > 0);
                            self.console_reply(k.worker, k.client, out, false);
                        }
                    }
                }
            }
            SysCmd::Drained { worker } => {
                info!("worker {worker} drained");
                if let Some((_, left)) = &mut self.stopping {
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        self.finish(cx);
                    }
                }
            }
        }
    }

    fn timeout(&mut self, cx: &mut Context<'_, SysTimer>, _id: TimerId, timer: SysTimer) {
        match timer {
            SysTimer::ShutdownDeadline => {
                if self.stopping.is_some() {
                    warn!("workers did not drain in time; stopping anyway");
                    if let Some(run) = &mut self.running {
                        run.threads.clear(); // detach: they stop on their own deadline
                    }
                    self.finish(cx);
                }
            }
            SysTimer::Warm => {
                if self.stopping.is_none() {
                    self.warm();
                    cx.set_timer(cx.now() + WARM_EVERY, SysTimer::Warm);
                }
            }
            SysTimer::HttpSweep => self.sweep_http(cx),
            SysTimer::Stats => {
                self.stats_timer = None;
                self.gather(cx, Purpose::Log);
            }
            SysTimer::Reloaded(id) => {
                if let Some((left, call, reply)) = self.reloads.remove(&id) {
                    warn!("{left} worker(s) did not confirm the reload in time");
                    call.answer(reply);
                }
            }
            SysTimer::Gather(id) => {
                if let Some(g) = self.gathers.get_mut(&id) {
                    g.timer = None;
                    warn!(
                        "{} worker(s) did not report their connections in time",
                        g.left
                    );
                    self.complete_gather(cx, id);
                }
            }
        }
    }
}

/// The workers' command channels and their threads.
type Workers = (Vec<Sender<WorkerCmd>>, Vec<JoinHandle<()>>);

fn spawn_workers(
    cfg: &Arc<Config>,
    tls: &Arc<TlsSet>,
    sys: &Sender<SysCmd>,
    registry: &Arc<Registry>,
    clients: &Arc<AtomicUsize>,
) -> std::io::Result<Workers> {
    let n = cfg.worker_count();
    let mut reactors = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let (r, tx) = Reactor::new()?;
        reactors.push(r);
        senders.push(tx);
    }
    let mut threads = Vec::with_capacity(n);
    for (id, mut reactor) in reactors.into_iter().enumerate() {
        let mut worker = Worker::new(
            id,
            sys.clone(),
            senders.clone(),
            Arc::clone(cfg),
            Arc::clone(tls),
            Arc::clone(registry),
            Arc::clone(clients),
        );
        let t = std::thread::Builder::new()
            .name(format!("odissey-worker-{id}"))
            .spawn(move || {
                if let Err(e) = reactor.run(&mut worker) {
                    error!("worker {id}: event loop failed: {e}");
                }
            })?;
        threads.push(t);
    }
    Ok((senders, threads))
}

/// Starts the system thread, idle until a `Start` request.
pub(crate) fn spawn_system() -> std::io::Result<odissey_facade::Handle> {
    let (mut reactor, tx) = Reactor::<SysCmd, SysTimer>::new()?;
    let me = tx.clone();
    let thread = std::thread::Builder::new()
        .name("odissey-system".into())
        .spawn(move || {
            let mut system = System::new(me);
            if let Err(e) = reactor.run(&mut system) {
                error!("system thread: event loop failed: {e}");
            }
        })?;
    Ok(odissey_facade::Handle::new(
        Box::new(move |call| tx.send(SysCmd::Facade(call)).is_ok()),
        thread,
    ))
}
