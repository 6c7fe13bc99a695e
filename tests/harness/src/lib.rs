//! Throwaway PostgreSQL clusters for odissey's integration tests.
//!
//! [`PgCluster::start`] runs `initdb` into a fresh temporary directory, starts
//! a server on a free port of `127.0.0.1`, and creates the roles and databases
//! the tests rely on:
//!
//! | role         | password     | stored as     | pg_hba method  |
//! |--------------|--------------|---------------|----------------|
//! | `postgres`   | —            | superuser     | trust          |
//! | `trust_user` | —            | —             | trust          |
//! | `md5_user`   | `md5_pass`   | md5           | md5            |
//! | `scram_user` | `scram_pass` | SCRAM-SHA-256 | scram-sha-256  |
//! | `app`        | `app_pass`   | SCRAM-SHA-256 | scram-sha-256  |
//!
//! Databases: `postgres`, `app` (owner `app`) and `test` (owner `postgres`,
//! every role may connect and create objects in it).
//!
//! [`PgCluster::start_with`] takes [`Options`]: a cluster that serves TLS
//! with the given certificate ([`PgTls`]), whose TCP logins may be
//! restricted to TLS (`hostssl` lines only), and whose listed roles log in
//! by client certificate (`hostssl ... cert`). Such a cluster's own
//! connections (`sql`, `backends`, creating the roles) go through its Unix
//! socket, so they work whatever `pg_hba.conf` asks of TCP clients.
//!
//! Streaming replication, for tests of routing to a primary and its
//! standbys and of failover: `postgres` may open replication connections
//! (locally and from `127.0.0.1`, trust), and
//! [`PgCluster::start_standby`] makes a hot standby of a running cluster
//! (`pg_basebackup -R`, its own port and temporary directory, the same
//! settings, roles and databases). A standby can be
//! [promoted](PgCluster::promote), its replay
//! [paused](PgCluster::pause_replay) and [waited for](PgCluster::wait_caught_up);
//! any cluster can be [crashed](PgCluster::stop_immediate),
//! [frozen](PgCluster::freeze) (every server process stopped by `SIGSTOP`,
//! as a hung host would be) and, once its standby took over,
//! [rebuilt as a standby](PgCluster::rebuild_as_standby_of) of that one on
//! its old port.
//!
//! PostgreSQL refuses to run as root: when the effective uid is 0 the server
//! binaries are run as the `postgres` OS user through `runuser`.
//!
//! Server binaries are looked up in this order: `$PG_BINDIR`, `pg_ctl` on
//! `$PATH`, the highest version in `/usr/lib/postgresql/*/bin`. When none is
//! found the harness panics (tests fail, they are never skipped).

use std::collections::HashSet;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub use postgres;

/// Address every cluster listens on.
pub const HOST: &str = "127.0.0.1";
/// Superuser created by `initdb -U postgres`.
pub const SUPERUSER: &str = "postgres";
/// The application_name of the harness's own `sql` connections.
const HARNESS_APP: &str = "odissey-harness";

/// Role with trust authentication and no password.
pub const TRUST_USER: &str = "trust_user";
/// Role authenticated with md5 (password stored as md5).
pub const MD5_USER: &str = "md5_user";
/// Password of [`MD5_USER`].
pub const MD5_PASS: &str = "md5_pass";
/// Role authenticated with SCRAM-SHA-256.
pub const SCRAM_USER: &str = "scram_user";
/// Password of [`SCRAM_USER`].
pub const SCRAM_PASS: &str = "scram_pass";
/// Application role (SCRAM-SHA-256), owner of database `app`.
pub const APP_USER: &str = "app";
/// Password of [`APP_USER`].
pub const APP_PASS: &str = "app_pass";

const INSTALL_HINT: &str = "\
PostgreSQL server binaries (initdb, pg_ctl, postgres) were not found.
Searched, in order: $PG_BINDIR, `pg_ctl` on $PATH, /usr/lib/postgresql/*/bin.
Install PostgreSQL; on Debian/Ubuntu run (as root):
    apt-get update && apt-get install -y postgresql postgresql-contrib
or set PG_BINDIR to a directory that contains initdb, pg_ctl and postgres.";

/// How many times `start` picks a new port when the chosen one got taken.
const START_ATTEMPTS: usize = 8;
/// Seconds `pg_ctl` waits for the server to start or stop.
const PG_CTL_TIMEOUT: &str = "60";
/// How long a started standby or a promoted one may take to report the
/// expected `pg_is_in_recovery()`.
const RECOVERY_STATE_TIMEOUT: Duration = Duration::from_secs(60);

const PG_HBA: &str = "\
# Written by odissey-harness.
# TYPE  DATABASE  USER        ADDRESS       METHOD
local   all       all                       trust
host    all       postgres    127.0.0.1/32  trust
host    all       trust_user  127.0.0.1/32  trust
host    all       md5_user    127.0.0.1/32  md5
host    all       scram_user  127.0.0.1/32  scram-sha-256
host    all       app         127.0.0.1/32  scram-sha-256
host    all       all         127.0.0.1/32  scram-sha-256
# `all` in the DATABASE column does not match replication connections.
local   replication  all                    trust
host    replication  postgres  127.0.0.1/32  trust
";

/// TLS served by a cluster: PEM texts, written into the data directory
/// (owned by the server's OS user, key mode 0600).
#[derive(Debug, Clone, Default)]
pub struct PgTls {
    /// The server's certificate chain (`ssl_cert_file`).
    pub cert_pem: String,
    /// The server's private key (`ssl_key_file`).
    pub key_pem: String,
    /// CA certificates that client certificates are checked against
    /// (`ssl_ca_file`); needed by [`Options::cert_users`].
    pub ca_pem: Option<String>,
}

/// How [`PgCluster::start_with`] sets a cluster up. The default is what
/// [`PgCluster::start`] does: no TLS, the `pg_hba.conf` of the table above.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Serve TLS (`ssl = on`) with these files.
    pub tls: Option<PgTls>,
    /// Every TCP line of `pg_hba.conf` is `hostssl`: PostgreSQL refuses
    /// plaintext TCP logins ("no pg_hba.conf entry ... no encryption").
    /// Replication connections too: a standby's `pg_basebackup` and
    /// walreceiver use TLS then (libpq's default `sslmode=prefer`).
    /// Needs `tls`.
    pub hostssl_only: bool,
    /// Roles that log in over TCP by TLS client certificate only
    /// (`hostssl all <role> 127.0.0.1/32 cert`, ahead of the other lines):
    /// the certificate must be signed by [`PgTls::ca_pem`] and its CN must
    /// be the role's name. Needs `tls` with `ca_pem`.
    pub cert_users: Vec<String>,
}

impl Options {
    /// The `pg_hba.conf` these options ask for.
    fn pg_hba(&self) -> String {
        let mut out = String::new();
        let mut cert_lines_written = false;
        for line in PG_HBA.lines() {
            // The cert lines go ahead of every TCP line, so that nothing
            // else admits those roles over TCP.
            if line.starts_with("host") && !cert_lines_written {
                for user in &self.cert_users {
                    out.push_str(&format!("hostssl all       {user}  127.0.0.1/32  cert\n"));
                }
                cert_lines_written = true;
            }
            match line.strip_prefix("host    ") {
                Some(rest) if self.hostssl_only => {
                    out.push_str("hostssl ");
                    out.push_str(rest);
                }
                _ => out.push_str(line),
            }
            out.push('\n');
        }
        out
    }

    /// The `ssl*` lines of `postgresql.conf` (empty without TLS).
    fn ssl_settings(&self) -> String {
        match &self.tls {
            None => String::new(),
            Some(tls) => {
                let mut out = String::from(
                    "ssl = on\n\
                     ssl_cert_file = 'server.crt'\n\
                     ssl_key_file = 'server.key'\n",
                );
                if tls.ca_pem.is_some() {
                    out.push_str("ssl_ca_file = 'root.crt'\n");
                }
                out
            }
        }
    }
}

/// A running, throwaway PostgreSQL cluster. Stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    datadir: PathBuf,
    port: u16,
    bindir: PathBuf,
    /// Extra `postgresql.conf` lines (TLS).
    settings: String,
    /// The harness's own connections go through the Unix socket.
    admin_socket: bool,
    /// Set by `freeze` (before the first `SIGSTOP`), cleared by `thaw`:
    /// a stopped server cannot act on `pg_ctl stop`, so Drop thaws it first.
    frozen: AtomicBool,
    // Declared last so it is removed after everything else is dropped.
    _tempdir: tempfile::TempDir,
}

impl PgCluster {
    /// Creates, starts and populates a new cluster.
    ///
    /// Panics with a descriptive message (including the tail of the server
    /// log) when anything fails.
    pub fn start() -> Self {
        Self::start_with(&Options::default())
    }

    /// As [`start`](Self::start), set up as `options` say.
    ///
    /// Panics when the options contradict each other (`hostssl_only` or
    /// `cert_users` without `tls`, `cert_users` without a CA).
    pub fn start_with(options: &Options) -> Self {
        assert!(
            options.tls.is_some() || (!options.hostssl_only && options.cert_users.is_empty()),
            "Options: hostssl_only and cert_users need tls"
        );
        assert!(
            options.cert_users.is_empty()
                || options.tls.as_ref().is_some_and(|t| t.ca_pem.is_some()),
            "Options: cert_users need tls.ca_pem"
        );
        let bindir = bindir().to_path_buf();
        let as_root = running_as_root();

        let tempdir = new_tempdir();
        let datadir = tempdir.path().join("data");
        if as_root {
            // The `postgres` OS user must own the data dir; initdb could not
            // create it in our root-owned temp dir.
            make_datadir(&datadir);
        }

        let mut initdb = pg_command(&bindir, "initdb");
        initdb.arg("-D").arg(&datadir).args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        ]);
        run_checked(&mut initdb, "initdb").unwrap_or_else(|e| panic!("{e}"));

        write_file(&datadir.join("pg_hba.conf"), &options.pg_hba());
        if let Some(tls) = &options.tls {
            let mut files = vec![
                ("server.crt", tls.cert_pem.as_str()),
                ("server.key", tls.key_pem.as_str()),
            ];
            if let Some(ca) = &tls.ca_pem {
                files.push(("root.crt", ca.as_str()));
            }
            for (name, pem) in files {
                let path = datadir.join(name);
                write_file(&path, pem);
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
                if as_root {
                    let mut chown = Command::new("chown");
                    chown.arg("postgres:").arg(&path);
                    run_checked(&mut chown, "chown of a TLS file to the postgres OS user")
                        .unwrap_or_else(|e| panic!("{e}"));
                }
            }
        }
        append_file(
            &datadir.join("postgresql.conf"),
            "\n# Added by odissey-harness.\ninclude 'odissey.conf'\n",
        );

        let mut cluster = Self {
            datadir,
            port: 0,
            bindir,
            settings: options.ssl_settings(),
            admin_socket: options.tls.is_some(),
            frozen: AtomicBool::new(false),
            _tempdir: tempdir,
        };

        // From here on `cluster`'s Drop stops the server should we panic.
        cluster.start_on_free_port();
        cluster.create_roles_and_databases();
        cluster
    }

    /// Makes, starts and returns a hot standby of this cluster, which must
    /// be running and accept connections: `pg_basebackup -R` into a new
    /// temporary directory, served on its own free port. It has the same
    /// settings (TLS included), `pg_hba.conf`, roles and databases, and
    /// streams from this cluster's TCP port. Returns once it accepts
    /// connections and `pg_is_in_recovery()` is true.
    ///
    /// Panics with a descriptive message (including the tail of the
    /// standby's server log) when anything fails.
    pub fn start_standby(&self) -> Self {
        let tempdir = new_tempdir();
        let datadir = tempdir.path().join("data");
        make_datadir(&datadir);
        let mut standby = Self {
            datadir,
            port: 0,
            bindir: self.bindir.clone(),
            settings: self.settings.clone(),
            admin_socket: self.admin_socket,
            frozen: AtomicBool::new(false),
            _tempdir: tempdir,
        };
        standby.base_backup_from(self);
        // From here on `standby`'s Drop stops the server should we panic.
        standby.start_on_free_port();
        standby.wait_for_recovery_state(true, "a started standby");
        standby
    }

    /// Turns this cluster into a hot standby of `primary`, on the same port:
    /// stops it (if it runs; `pg_ctl stop -m immediate`, failure ignored),
    /// deletes its data directory, takes a `pg_basebackup -R` of `primary`
    /// into it, starts it and waits until `pg_is_in_recovery()` is true.
    /// This is how a test brings an old primary back after failing over to
    /// its standby (`promote`). It takes `primary`'s data, `pg_hba.conf`
    /// and settings (TLS included).
    ///
    /// Panics on failure, as [`start_standby`](Self::start_standby) does.
    pub fn rebuild_as_standby_of(&mut self, primary: &Self) {
        assert!(
            primary.port != self.port,
            "rebuild_as_standby_of: a cluster cannot be a standby of itself (port {})",
            self.port
        );
        if self.frozen.load(Ordering::SeqCst) {
            self.thaw();
        }
        let mut stop = pg_command(&self.bindir, "pg_ctl");
        stop.arg("stop").arg("-D").arg(&self.datadir).args([
            "-m",
            "immediate",
            "-w",
            "-t",
            PG_CTL_TIMEOUT,
        ]);
        // Fails when the server is not running, which is what we want; a
        // server that is still running must not lose its data dir under it.
        if let (Err(e), Ok(pid)) = (
            run_checked(&mut stop, "pg_ctl stop"),
            self.try_postmaster_pid(),
        ) {
            panic!("rebuild_as_standby_of: the server (pid {pid}) did not stop: {e}");
        }
        fs::remove_dir_all(&self.datadir)
            .unwrap_or_else(|e| panic!("cannot delete {}: {e}", self.datadir.display()));
        make_datadir(&self.datadir);
        self.settings = primary.settings.clone();
        self.admin_socket = primary.admin_socket;
        self.base_backup_from(primary);
        self.write_settings();
        if let Err(e) = self.pg_ctl_start() {
            panic!(
                "failed to start the rebuilt standby on port {}: {e}\n\
                 --- server log tail ({}) ---\n{}",
                self.port,
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        self.wait_for_recovery_state(true, "a rebuilt standby");
    }

    /// Host the cluster listens on (`"127.0.0.1"`).
    pub fn host(&self) -> &str {
        HOST
    }

    /// TCP port the cluster listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the PostgreSQL binaries used for this cluster.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The cluster's data directory (also its unix socket directory).
    pub fn datadir(&self) -> &Path {
        &self.datadir
    }

    /// Path of the server log file.
    pub fn log_path(&self) -> PathBuf {
        self.datadir.join("log")
    }

    /// The last `lines` lines of the server log (empty when there is none).
    pub fn log_tail(&self, lines: usize) -> String {
        let log = read_log_from(&self.log_path(), 0);
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Connection parameters for this cluster (not yet connected): plaintext
    /// TCP, which a cluster started with `hostssl_only` refuses.
    pub fn config(&self, db: &str, user: &str, password: Option<&str>) -> postgres::Config {
        let mut config = postgres::Config::new();
        config
            .host(HOST)
            .port(self.port)
            .dbname(db)
            .user(user)
            .connect_timeout(Duration::from_secs(10));
        if let Some(password) = password {
            config.password(password);
        }
        config
    }

    /// Connects directly to the cluster, returning the error on failure.
    pub fn try_connect(
        &self,
        db: &str,
        user: &str,
        password: Option<&str>,
    ) -> Result<postgres::Client, postgres::Error> {
        self.config(db, user, password).connect(postgres::NoTls)
    }

    /// A client connected directly to the cluster. Panics on failure.
    pub fn connect(&self, db: &str, user: &str, password: Option<&str>) -> postgres::Client {
        self.try_connect(db, user, password).unwrap_or_else(|e| {
            panic!(
                "cannot connect to {HOST}:{} db={db} user={user}: {}",
                self.port,
                describe(&e)
            )
        })
    }

    /// Parameters of the harness's own superuser connections: TCP like
    /// [`config`](Self::config), or the Unix socket for a cluster started
    /// with TLS (whose `pg_hba.conf` may refuse plaintext TCP).
    fn admin_config(&self, db: &str) -> postgres::Config {
        if !self.admin_socket {
            return self.config(db, SUPERUSER, None);
        }
        let mut config = postgres::Config::new();
        config
            .host_path(&self.datadir)
            .port(self.port)
            .dbname(db)
            .user(SUPERUSER)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Runs `sql` (simple query protocol, may hold several statements) as
    /// superuser `postgres` on database `db` and returns every row of every
    /// statement as text. Panics on error.
    pub fn sql(&self, db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        // Named, so that `backends` can leave out the harness's own earlier
        // connections, whose backends may still be exiting.
        let mut client = self
            .admin_config(db)
            .application_name(HARNESS_APP)
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot connect to {HOST}:{} db={db} as {SUPERUSER}: {}",
                    self.port,
                    describe(&e)
                )
            });
        simple_query(&mut client, sql)
    }

    /// As [`sql`](Self::sql), returning the error instead of panicking.
    fn try_sql(&self, db: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>, postgres::Error> {
        let mut client = self
            .admin_config(db)
            .application_name(HARNESS_APP)
            .connect(postgres::NoTls)?;
        Ok(rows_of(client.simple_query(sql)?))
    }

    /// Number of client backends in `pg_stat_activity` logged in as `user`,
    /// not counting the connection used to ask.
    pub fn backends(&self, user: &str) -> usize {
        let rows = self.sql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = {} AND backend_type = 'client backend' \
                 AND pid <> pg_backend_pid() AND application_name <> {}",
                quote_literal(user),
                quote_literal(HARNESS_APP)
            ),
        );
        rows.first()
            .and_then(|row| row.first())
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("unexpected pg_stat_activity result: {rows:?}"))
    }

    /// Polls [`backends`](Self::backends) until it equals `expected` or
    /// `timeout` elapses; returns the last count seen. Backends exit
    /// asynchronously after a client disconnects, so use this rather than
    /// `backends` right after closing connections.
    pub fn wait_for_backends(&self, user: &str, expected: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.backends(user);
            if n == expected || Instant::now() >= deadline {
                return n;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (`pg_ctl stop -m fast`), thawing it first if it is
    /// [frozen](Self::freeze). Panics on failure.
    pub fn stop(&self) {
        self.pg_ctl_stop("fast");
    }

    /// Crashes the server: `pg_ctl stop -m immediate`, every server process
    /// quits at once, without a checkpoint; the next start runs crash
    /// recovery. Commits are asynchronous here (`synchronous_commit =
    /// off`), so those of the last moments (up to `wal_writer_delay`,
    /// 200 ms) are lost, as on a real crash with that setting; a test that
    /// needs a commit to survive makes it with `SET synchronous_commit =
    /// on`, or waits for a standby to replay it
    /// ([`wait_caught_up`](Self::wait_caught_up) flushes the primary's
    /// WAL). Thaws a [frozen](Self::freeze) server first. Panics on
    /// failure.
    pub fn stop_immediate(&self) {
        self.pg_ctl_stop("immediate");
    }

    fn pg_ctl_stop(&self, mode: &str) {
        if self.frozen.load(Ordering::SeqCst) {
            self.thaw();
        }
        let mut cmd = pg_command(&self.bindir, "pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.datadir)
            .args(["-m", mode, "-w", "-t", PG_CTL_TIMEOUT]);
        if let Err(e) = run_checked(&mut cmd, "pg_ctl stop") {
            panic!(
                "{e}\n--- server log tail ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(40)
            );
        }
    }

    /// Promotes a standby (`pg_ctl promote -w`) and returns once
    /// `pg_is_in_recovery()` is false: it accepts writes. Panics on failure
    /// (e.g. when this cluster is not a standby).
    pub fn promote(&self) {
        let mut cmd = pg_command(&self.bindir, "pg_ctl");
        cmd.arg("promote")
            .arg("-D")
            .arg(&self.datadir)
            .args(["-w", "-t", PG_CTL_TIMEOUT]);
        if let Err(e) = run_checked(&mut cmd, "pg_ctl promote") {
            panic!(
                "{e}\n--- server log tail ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(40)
            );
        }
        self.wait_for_recovery_state(false, "a promoted standby");
    }

    /// Whether the server is a standby (`pg_is_in_recovery()`). Panics when
    /// it cannot be asked.
    pub fn is_in_recovery(&self) -> bool {
        let rows = self.sql("postgres", "SELECT pg_is_in_recovery()");
        parse_bool(&rows)
    }

    /// Pauses WAL replay on a standby (`pg_wal_replay_pause()`): from now
    /// on no further record is applied, so what the primary commits next
    /// stays invisible here until [`resume_replay`](Self::resume_replay).
    /// WAL is still received. Panics on failure.
    pub fn pause_replay(&self) {
        self.sql("postgres", "SELECT pg_wal_replay_pause()");
    }

    /// Resumes WAL replay paused by [`pause_replay`](Self::pause_replay)
    /// (`pg_wal_replay_resume()`). Panics on failure.
    pub fn resume_replay(&self) {
        self.sql("postgres", "SELECT pg_wal_replay_resume()");
    }

    /// Waits until this standby has replayed everything `primary` had
    /// committed when this was called (its `pg_last_wal_replay_lsn()`
    /// reaches that WAL position), so that what was written there is
    /// visible here. Panics, with both positions and the log tail, when
    /// `timeout` elapses first (e.g. replay is paused).
    pub fn wait_caught_up(&self, primary: &Self, timeout: Duration) {
        let target = primary.wal_position_flushed();
        let deadline = Instant::now() + timeout;
        let query = format!(
            "SELECT coalesce(pg_last_wal_replay_lsn() >= {}::pg_lsn, false), \
                    pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text",
            quote_literal(&target)
        );
        loop {
            let rows = self.try_sql("postgres", &query);
            if let Ok(rows) = &rows {
                if matches!(rows.first().and_then(|r| r.first()), Some(Some(v)) if v == "t") {
                    return;
                }
            }
            if Instant::now() >= deadline {
                let seen = match &rows {
                    Ok(rows) => format!("received, replayed: {:?}", rows.first().map(|r| &r[1..])),
                    Err(e) => format!("cannot ask it: {}", describe(e)),
                };
                panic!(
                    "standby on port {} did not replay primary (port {})'s WAL up to {target} \
                     within {timeout:?}; {seen}\n--- standby log tail ({}) ---\n{}",
                    self.port,
                    primary.port,
                    self.log_path().display(),
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Hangs the whole server, as a host that stopped answering would:
    /// `SIGSTOP` to the postmaster and every process under it, so new
    /// connections get no answer (the kernel still completes their TCP
    /// handshake) and existing ones get no reply; [`sql`](Self::sql) and
    /// the other helpers that ask the server hang too (`connect_timeout`
    /// bounds the TCP connect only). Undone by
    /// [`thaw`](Self::thaw); [`stop`](Self::stop), `stop_immediate` and
    /// Drop thaw a frozen server first. Panics when the server is not
    /// running.
    pub fn freeze(&self) {
        let postmaster = self.postmaster_pid();
        // Set first, so that Drop thaws whatever got stopped should we panic.
        self.frozen.store(true, Ordering::SeqCst);
        // The postmaster first: once it is stopped it forks no child that
        // the list below would miss.
        signal(&[postmaster], "STOP").unwrap_or_else(|e| panic!("freeze: {e}"));
        // A child may exit before it is signalled; what remains is stopped.
        let _ = signal(&descendants(postmaster), "STOP");
    }

    /// Resumes a server hung by [`freeze`](Self::freeze) (`SIGCONT` to the
    /// postmaster and every process under it). Panics on failure.
    pub fn thaw(&self) {
        self.try_thaw().unwrap_or_else(|e| panic!("thaw: {e}"));
    }

    fn try_thaw(&self) -> Result<(), String> {
        let postmaster = self.try_postmaster_pid()?;
        let _ = signal(&descendants(postmaster), "CONT");
        signal(&[postmaster], "CONT")?;
        self.frozen.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The postmaster's pid, the first line of `postmaster.pid`. Panics when
    /// the server is not running.
    fn postmaster_pid(&self) -> u32 {
        self.try_postmaster_pid().unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_postmaster_pid(&self) -> Result<u32, String> {
        let path = self.datadir.join("postmaster.pid");
        let text = fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read {} (is the server running?): {e}",
                path.display()
            )
        })?;
        text.lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| format!("no pid on the first line of {}: {text:?}", path.display()))
    }

    /// Starts the server again (after [`stop`](Self::stop)) on the same port.
    /// Panics on failure.
    pub fn restart(&self) {
        if let Err(e) = self.pg_ctl_start() {
            panic!(
                "failed to restart PostgreSQL on port {}: {e}\n--- server log tail ({}) ---\n{}",
                self.port,
                self.log_path().display(),
                self.log_tail(40)
            );
        }
    }

    /// Picks a free port and starts the server on it, picking another when
    /// the port got taken meanwhile. Panics with the log tail on failure.
    fn start_on_free_port(&mut self) {
        for attempt in 1..=START_ATTEMPTS {
            self.port = pick_port();
            self.write_settings();
            let log_offset = fs::metadata(self.log_path()).map_or(0, |m| m.len());
            match self.pg_ctl_start() {
                Ok(()) => return,
                Err(err) => {
                    let new_log = read_log_from(&self.log_path(), log_offset);
                    if attempt < START_ATTEMPTS && is_port_conflict(&new_log) {
                        continue;
                    }
                    panic!(
                        "failed to start PostgreSQL (attempt {attempt}, port {}): {err}\n\
                         --- server log tail ({}) ---\n{}",
                        self.port,
                        self.log_path().display(),
                        self.log_tail(40)
                    );
                }
            }
        }
    }

    /// `pg_basebackup -R` of `primary` into this cluster's (empty) data
    /// directory: a standby that streams from `primary`'s TCP port.
    fn base_backup_from(&self, primary: &Self) {
        let mut cmd = pg_command(&self.bindir, "pg_basebackup");
        cmd.arg("-D")
            .arg(&self.datadir)
            .args(["-R", "-c", "fast", "-X", "stream", "--no-sync", "-h", HOST])
            .args(["-p", &primary.port.to_string(), "-U", SUPERUSER]);
        if let Err(e) = run_checked(&mut cmd, "pg_basebackup") {
            panic!(
                "{e}\n--- primary's server log tail ({}) ---\n{}",
                primary.log_path().display(),
                primary.log_tail(40)
            );
        }
        // The copy holds files of the primary's that are not the standby's:
        // its server log (the standby's starts afresh, so that its tail is
        // about the standby alone) and the lock files of its Unix sockets,
        // which live in its data dir. A stale lock for this cluster's own
        // port would stop it starting when its old postmaster's pid is
        // still taken (a zombie nobody reaped, a new process).
        let mut copied = vec![self.log_path()];
        let entries = fs::read_dir(&self.datadir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", self.datadir.display()));
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                copied.push(entry.path());
            }
        }
        for path in copied {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("cannot delete {}: {e}", path.display()),
            }
        }
    }

    /// Polls `pg_is_in_recovery()` until it is `expected`; panics with the
    /// log tail after [`RECOVERY_STATE_TIMEOUT`]. `what` names the cluster
    /// in that message.
    fn wait_for_recovery_state(&self, expected: bool, what: &str) {
        let deadline = Instant::now() + RECOVERY_STATE_TIMEOUT;
        loop {
            // Connections may be refused for a moment ("the database system
            // is starting up"), hence try_sql.
            let seen = self
                .try_sql("postgres", "SELECT pg_is_in_recovery()")
                .map(|rows| parse_bool(&rows));
            if matches!(seen, Ok(v) if v == expected) {
                return;
            }
            if Instant::now() >= deadline {
                let seen = match seen {
                    Ok(v) => format!("pg_is_in_recovery() is still {v}"),
                    Err(e) => format!("cannot ask it: {}", describe(&e)),
                };
                panic!(
                    "{what} on port {}: expected pg_is_in_recovery() = {expected} within \
                     {RECOVERY_STATE_TIMEOUT:?}; {seen}\n--- server log tail ({}) ---\n{}",
                    self.port,
                    self.log_path().display(),
                    self.log_tail(40)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A position in this (primary) cluster's WAL that a standby replays
    /// only after everything committed here before this call, and that is
    /// already flushed, so it reaches the standby without further activity.
    ///
    /// `pg_current_wal_lsn()` would not do: commits here are asynchronous
    /// (`synchronous_commit = off`), so what a test has just committed may
    /// not be written yet, and walsenders only send flushed WAL. Instead a
    /// transactional WAL message is logged and committed synchronously;
    /// its end position (what `pg_logical_emit_message` returns) is a
    /// record boundary after every earlier commit, flushed before the
    /// commit returns.
    fn wal_position_flushed(&self) -> String {
        let mut client = self
            .admin_config("postgres")
            .application_name(HARNESS_APP)
            .options("-c synchronous_commit=on")
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| {
                panic!(
                    "cannot connect to the primary on port {} as {SUPERUSER}: {}",
                    self.port,
                    describe(&e)
                )
            });
        let rows = simple_query(
            &mut client,
            "SELECT pg_logical_emit_message(true, 'odissey-harness', 'caught up?')::text",
        );
        rows.first()
            .and_then(|r| r.first())
            .cloned()
            .flatten()
            .unwrap_or_else(|| panic!("unexpected pg_logical_emit_message result: {rows:?}"))
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let mut cmd = pg_command(&self.bindir, "pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(&self.datadir)
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", PG_CTL_TIMEOUT]);
        run_checked(&mut cmd, "pg_ctl start").map(drop)
    }

    fn write_settings(&self) {
        let settings = format!(
            "# Written by odissey-harness.\n\
             listen_addresses = '{HOST}'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n\
             max_connections = 300\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             shared_buffers = 32MB\n\
             {}",
            self.port,
            self.datadir.display().to_string().replace('\'', "''"),
            self.settings,
        );
        write_file(&self.datadir.join("odissey.conf"), &settings);
    }

    fn create_roles_and_databases(&self) {
        let mut client = self
            .admin_config("postgres")
            .connect(postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect as {SUPERUSER}: {}", describe(&e)));
        for stmt in [
            "SET password_encryption = 'md5'; \
             CREATE ROLE md5_user LOGIN PASSWORD 'md5_pass'",
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scram_user LOGIN PASSWORD 'scram_pass'; \
             CREATE ROLE app LOGIN PASSWORD 'app_pass'; \
             CREATE ROLE trust_user LOGIN",
            // CREATE DATABASE cannot run inside a (implicit) transaction block.
            "CREATE DATABASE app OWNER app",
            "CREATE DATABASE test OWNER postgres",
            "GRANT ALL ON DATABASE test TO PUBLIC",
        ] {
            simple_query(&mut client, stmt);
        }
        drop(client);
        self.sql("test", "GRANT ALL ON SCHEMA public TO PUBLIC");
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Best effort, never panics: the server may already be stopped.
        if self.frozen.load(Ordering::SeqCst) {
            // A stopped postmaster would not act on `pg_ctl stop`.
            let _ = self.try_thaw();
        }
        let mut cmd = pg_command(&self.bindir, "pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.datadir)
            .args(["-m", "immediate", "-w", "-t", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = cmd.status();
        // `_tempdir` removes the directory when it is dropped right after this.
    }
}

/// Path of a PostgreSQL binary (e.g. `pgbench`, `psql`) from the directory
/// the harness uses; falls back to `$PATH`. Panics, with installation
/// instructions, when it cannot be found.
pub fn pg_bin(name: &str) -> PathBuf {
    let in_bindir = bindir().join(name);
    if in_bindir.is_file() {
        return in_bindir;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "PostgreSQL binary `{name}` not found in {} nor on $PATH.\n{INSTALL_HINT}",
        bindir().display()
    );
}

/// The directory holding the PostgreSQL server binaries. Panics, with
/// installation instructions, when PostgreSQL is not installed.
pub fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| find_bindir().unwrap_or_else(|| panic!("{INSTALL_HINT}")))
}

fn is_pg_bindir(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|bin| dir.join(bin).is_file())
}

fn find_bindir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BINDIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            is_pg_bindir(&dir),
            "PG_BINDIR={} does not contain initdb, pg_ctl and postgres.\n{INSTALL_HINT}",
            dir.display()
        );
        return Some(dir);
    }

    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let pg_ctl = dir.join("pg_ctl");
            if !pg_ctl.is_file() {
                continue;
            }
            // Prefer the real location (e.g. /usr/local/bin/pg_ctl may be a
            // symlink into /usr/lib/postgresql/15/bin).
            if let Some(real_dir) = fs::canonicalize(&pg_ctl)
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
            {
                if is_pg_bindir(&real_dir) {
                    return Some(real_dir);
                }
            }
            if is_pg_bindir(&dir) {
                return Some(dir);
            }
        }
    }

    let mut best: Option<(Vec<u64>, PathBuf)> = None;
    for entry in fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(version) = name
            .split('.')
            .map(str::parse::<u64>)
            .collect::<Result<Vec<_>, _>>()
        else {
            continue;
        };
        let bin = entry.path().join("bin");
        if is_pg_bindir(&bin) && !matches!(&best, Some((v, _)) if *v >= version) {
            best = Some((version, bin));
        }
    }
    best.map(|(_, bin)| bin)
}

/// A new temporary directory under `/tmp` (or the system's temp dir),
/// reachable by the `postgres` OS user when we are root.
fn new_tempdir() -> tempfile::TempDir {
    let parent = if Path::new("/tmp").is_dir() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let tempdir = tempfile::Builder::new()
        .prefix("odissey-pg-")
        .tempdir_in(&parent)
        .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", parent.display()));
    if running_as_root() {
        fs::set_permissions(tempdir.path(), fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod {}: {e}", tempdir.path().display()));
    }
    tempdir
}

/// Creates an empty data directory, mode 0700, owned by the `postgres` OS
/// user when we are root (the server refuses a data dir open to others).
fn make_datadir(datadir: &Path) {
    fs::create_dir(datadir).unwrap_or_else(|e| panic!("mkdir {}: {e}", datadir.display()));
    fs::set_permissions(datadir, fs::Permissions::from_mode(0o700))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", datadir.display()));
    if running_as_root() {
        let mut chown = Command::new("chown");
        chown.arg("postgres:").arg(datadir);
        run_checked(&mut chown, "chown of the data dir to the postgres OS user")
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// Every process under `root` (children, their children, ...), from
/// `/proc/<pid>/stat`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue; // exited meanwhile
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|&&(_, ppid)| ppid == parent)
                .map(|&(pid, _)| pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Sends `SIG<sig>` (e.g. `"STOP"`) to `pids` with kill(1).
fn signal(pids: &[u32], sig: &str) -> Result<(), String> {
    if pids.is_empty() {
        return Ok(());
    }
    let mut kill = Command::new("kill");
    kill.arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .stdin(Stdio::null());
    run_checked(&mut kill, &format!("kill -{sig}")).map(drop)
}

fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        // "Uid:	real	effective	saved	fs"
        if let Ok(status) = fs::read_to_string("/proc/self/status") {
            if let Some(euid) = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
            {
                return euid == "0";
            }
        }
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    })
}

/// A command running PostgreSQL binary `bin`, as the `postgres` OS user when
/// we are root.
fn pg_command(bindir: &Path, bin: &str) -> Command {
    let path = bindir.join(bin);
    let mut cmd = if running_as_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    };
    cmd.stdin(Stdio::null())
        // The current directory may not be accessible to `postgres`.
        .current_dir("/")
        // English messages, so that log checks work.
        .env("LC_ALL", "C")
        .env("LANG", "C");
    for var in [
        "PGDATA",
        "PGPORT",
        "PGHOST",
        "PGUSER",
        "PGDATABASE",
        "PGOPTIONS",
        // pg_basebackup and a standby's walreceiver connect with libpq.
        "PGSSLMODE",
        "PGSERVICE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<Output, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what} failed ({}): {cmd:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim_end(),
            String::from_utf8_lossy(&out.stderr).trim_end()
        ))
    }
}

fn write_file(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

fn append_file(path: &Path, contents: &str) {
    use std::io::Write;
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .unwrap_or_else(|e| panic!("cannot append to {}: {e}", path.display()));
}

fn read_log_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn is_port_conflict(log: &str) -> bool {
    log.contains("Address already in use")
        || log.contains("could not bind")
        || log.contains("could not create any TCP/IP sockets")
}

/// A free TCP port on 127.0.0.1, never handed out twice by this process.
fn pick_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let port = TcpListener::bind((HOST, 0))
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("cannot bind {HOST}:0 to pick a port: {e}"))
            .port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

fn simple_query(client: &mut postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    let messages = client
        .simple_query(sql)
        .unwrap_or_else(|e| panic!("query failed: {sql}\n{}", describe(&e)));
    rows_of(messages)
}

/// The rows of a simple query's result, as text.
fn rows_of(messages: Vec<postgres::SimpleQueryMessage>) -> Vec<Vec<Option<String>>> {
    messages
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// The single boolean of a one-row, one-column result.
fn parse_bool(rows: &[Vec<Option<String>>]) -> bool {
    match rows
        .first()
        .and_then(|r| r.first())
        .and_then(|v| v.as_deref())
    {
        Some("t") => true,
        Some("f") => false,
        _ => panic!("expected one boolean, got {rows:?}"),
    }
}

fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{e} ({}: {} [{}])",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => format!("{e}"),
    }
}

/// Quotes `s` as an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
