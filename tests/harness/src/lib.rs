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
        for line in PG_HBA.lines() {
            if line.starts_with("local") {
                out.push_str(line);
                out.push('\n');
                for user in &self.cert_users {
                    out.push_str(&format!("hostssl all       {user}  127.0.0.1/32  cert\n"));
                }
                continue;
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

        let parent = if Path::new("/tmp").is_dir() {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let tempdir = tempfile::Builder::new()
            .prefix("odissey-pg-")
            .tempdir_in(&parent)
            .unwrap_or_else(|e| panic!("cannot create a temp dir in {}: {e}", parent.display()));
        let datadir = tempdir.path().join("data");

        if as_root {
            // The `postgres` OS user must be able to reach and own the data dir.
            fs::set_permissions(tempdir.path(), fs::Permissions::from_mode(0o755))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", tempdir.path().display()));
            fs::create_dir(&datadir).unwrap_or_else(|e| panic!("mkdir {}: {e}", datadir.display()));
            let mut chown = Command::new("chown");
            chown.arg("postgres:").arg(&datadir);
            run_checked(&mut chown, "chown of the data dir to the postgres OS user")
                .unwrap_or_else(|e| panic!("{e}"));
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
            _tempdir: tempdir,
        };

        // From here on `cluster`'s Drop stops the server should we panic.
        for attempt in 1..=START_ATTEMPTS {
            cluster.port = pick_port();
            cluster.write_settings();
            let log_offset = fs::metadata(cluster.log_path()).map_or(0, |m| m.len());
            match cluster.pg_ctl_start() {
                Ok(()) => break,
                Err(err) => {
                    let new_log = read_log_from(&cluster.log_path(), log_offset);
                    if attempt < START_ATTEMPTS && is_port_conflict(&new_log) {
                        continue;
                    }
                    panic!(
                        "failed to start PostgreSQL (attempt {attempt}, port {}): {err}\n\
                         --- server log tail ({}) ---\n{}",
                        cluster.port,
                        cluster.log_path().display(),
                        cluster.log_tail(40)
                    );
                }
            }
        }

        cluster.create_roles_and_databases();
        cluster
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

    /// Stops the server (`pg_ctl stop -m fast`). Panics on failure.
    pub fn stop(&self) {
        let mut cmd = pg_command(&self.bindir, "pg_ctl");
        cmd.arg("stop").arg("-D").arg(&self.datadir).args([
            "-m",
            "fast",
            "-w",
            "-t",
            PG_CTL_TIMEOUT,
        ]);
        if let Err(e) = run_checked(&mut cmd, "pg_ctl stop") {
            panic!(
                "{e}\n--- server log tail ({}) ---\n{}",
                self.log_path().display(),
                self.log_tail(40)
            );
        }
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
