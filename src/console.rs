//! The admin console, sans-IO: clients routed to a storage of
//! `type = "local"` talk to odissey itself. They send simple queries; this
//! module parses them into [`Command`]s and writes the answers as ordinary
//! result sets (so psql renders tables), from an [`Inspection`] of the
//! running pooler and its config.

use bytes::BytesMut;
use odissey_facade::{ClientInfo, Inspection, RouteStats, ServerInfo};
use odissey_protocol::backend;

use crate::config::{Config, StorageType};

/// What a console client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Show(Show),
    /// Re-read the config file.
    Reload,
    /// Stop handing out servers (for one database, or all), once running
    /// transactions are done.
    Pause(Option<String>),
    /// Undo `Pause`.
    Resume(Option<String>),
    /// Close a client (by id) or every client and server of a database.
    Kill(String),
    /// Graceful shutdown, as SIGTERM.
    Shutdown,
}

/// The `SHOW` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Show {
    Pools,
    Stats,
    Errors,
    Clients,
    Servers,
    Databases,
    Storages,
    Hosts,
    Config,
    Lists,
    Version,
    Help,
}

impl Show {
    /// Whether answering needs every worker's connection lists.
    pub(crate) fn needs_lists(self) -> bool {
        matches!(
            self,
            Self::Pools | Self::Stats | Self::Errors | Self::Clients | Self::Servers | Self::Lists
        )
    }
}

/// Parses one console query: case-insensitive words, an optional trailing
/// semicolon. The error is the message for the client.
pub(crate) fn parse(sql: &str) -> Result<Command, String> {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
    let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
    // The argument is the rest of the text after the command word, so a
    // quoted name may hold spaces.
    let rest = text
        .split_once(char::is_whitespace)
        .map(|(_, r)| r.trim())
        .unwrap_or("");
    let arg = || Some(unquote(rest));
    match lower.as_slice() {
        ["show", what] => Ok(Command::Show(match *what {
            "pools" => Show::Pools,
            "stats" => Show::Stats,
            "errors" => Show::Errors,
            "clients" => Show::Clients,
            "servers" => Show::Servers,
            "databases" => Show::Databases,
            "storages" => Show::Storages,
            "hosts" => Show::Hosts,
            "config" => Show::Config,
            "lists" => Show::Lists,
            "version" => Show::Version,
            "help" => Show::Help,
            _ => return Err(format!("unknown SHOW list {:?}; try SHOW HELP", words[1])),
        })),
        ["show"] => Ok(Command::Show(Show::Help)),
        ["reload"] => Ok(Command::Reload),
        ["pause"] => Ok(Command::Pause(None)),
        ["pause", ..] => Ok(Command::Pause(arg())),
        ["resume"] => Ok(Command::Resume(None)),
        ["resume", ..] => Ok(Command::Resume(arg())),
        ["kill", ..] => Ok(Command::Kill(unquote(rest))),
        ["shutdown"] => Ok(Command::Shutdown),
        [] => Err("empty query".into()),
        _ => Err(format!("unknown console command {text:?}; try SHOW HELP")),
    }
}

/// A database name may be quoted as an identifier.
fn unquote(w: &str) -> String {
    w.strip_prefix('"')
        .and_then(|w| w.strip_suffix('"'))
        .map_or_else(|| w.to_string(), |w| w.replace("\"\"", "\""))
}

/// Writes a whole result set: RowDescription (all columns text),
/// DataRows, CommandComplete.
pub(crate) fn result_set(out: &mut BytesMut, columns: &[&str], rows: &[Vec<String>]) {
    backend::row_description(out, columns);
    for row in rows {
        let values: Vec<Option<&str>> = row.iter().map(|v| Some(v.as_str())).collect();
        backend::data_row(out, &values);
    }
    backend::command_complete(out, &format!("SHOW {}", rows.len()));
}

/// Writes the answer to a `SHOW`.
pub(crate) fn show(out: &mut BytesMut, what: Show, ins: &Inspection, cfg: &Config) {
    match what {
        Show::Pools => pools(out, ins),
        Show::Stats => stats(out, ins),
        Show::Errors => errors(out, ins),
        Show::Clients => clients(out, &ins.client_list),
        Show::Servers => servers(out, &ins.server_list),
        Show::Databases => databases(out, cfg),
        Show::Storages => storages(out, ins),
        Show::Hosts => hosts(out, ins),
        Show::Config => config(out, cfg),
        Show::Lists => lists(out, ins, cfg),
        Show::Version => result_set(
            out,
            &["version"],
            &[vec![format!("odissey {}", env!("CARGO_PKG_VERSION"))]],
        ),
        Show::Help => result_set(
            out,
            &["command", "what it does"],
            &HELP
                .iter()
                .map(|(c, w)| vec![(*c).to_string(), (*w).to_string()])
                .collect::<Vec<_>>(),
        ),
    }
}

const HELP: &[(&str, &str)] = &[
    (
        "SHOW POOLS",
        "one row per pool: clients and servers by state",
    ),
    (
        "SHOW STATS",
        "per pool: transactions, queries, bytes, times, waits",
    ),
    ("SHOW ERRORS", "server errors per pool by SQLSTATE class"),
    ("SHOW CLIENTS", "every client connection"),
    ("SHOW SERVERS", "every server connection"),
    ("SHOW DATABASES", "the routes of the config"),
    (
        "SHOW STORAGES",
        "per storage: storage_max, connections, routes waiting",
    ),
    (
        "SHOW HOSTS",
        "each host of a routed storage: role, ban, lag, connections",
    ),
    ("SHOW CONFIG", "every setting (secrets hidden)"),
    ("SHOW LISTS", "counts of routes, pools, clients, servers"),
    ("SHOW VERSION", "odissey's version"),
    ("RELOAD", "re-read the config file"),
    (
        "PAUSE [db]",
        "hold new transactions once running ones are done",
    ),
    ("RESUME [db]", "undo PAUSE"),
    (
        "KILL <client id | db>",
        "close a client, or a database's clients and servers",
    ),
    ("SHUTDOWN", "graceful shutdown"),
];

fn n(v: impl ToString) -> String {
    v.to_string()
}

fn pools(out: &mut BytesMut, ins: &Inspection) {
    let rows: Vec<Vec<String>> = ins
        .routes
        .iter()
        .map(|r| {
            // The longest wait of a client of this pool still waiting.
            let maxwait_us = ins
                .client_list
                .iter()
                .filter(|c| c.database == r.database && c.user == r.user && c.state == "waiting")
                .map(|c| c.wait_us)
                .max()
                .unwrap_or(0);
            vec![
                r.database.clone(),
                r.user.clone(),
                n(r.clients_active),
                n(r.clients_waiting),
                n(r.servers_active),
                n(r.servers_idle),
                // Recovering servers are counted as logging in by the router.
                n(0),
                n(0),
                n(r.servers_login),
                n(maxwait_us / 1_000_000),
                n(maxwait_us % 1_000_000),
                r.pool_mode.clone(),
                n(r.pool_size),
                r.host.clone(),
            ]
        })
        .collect();
    result_set(
        out,
        &[
            "database",
            "user",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "sv_used",
            "sv_tested",
            "sv_login",
            "maxwait",
            "maxwait_us",
            "pool_mode",
            "pool_size",
            "host",
        ],
        &rows,
    );
}

fn stats(out: &mut BytesMut, ins: &Inspection) {
    let avg = |total: u64, n: u64| total.checked_div(n).unwrap_or(0);
    // Every pool, then their sum.
    let mut total = RouteStats {
        database: "(total)".into(),
        ..RouteStats::default()
    };
    for r in &ins.routes {
        total.xact_count += r.xact_count;
        total.query_count += r.query_count;
        total.bytes_received += r.bytes_received;
        total.bytes_sent += r.bytes_sent;
        total.xact_time_us += r.xact_time_us;
        total.query_time_us += r.query_time_us;
        total.wait_time_us += r.wait_time_us;
        total.wait_count += r.wait_count;
        total.wait_p50_us = total.wait_p50_us.max(r.wait_p50_us);
        total.wait_p95_us = total.wait_p95_us.max(r.wait_p95_us);
        total.wait_p99_us = total.wait_p99_us.max(r.wait_p99_us);
        total.errors.extend(r.errors.iter().cloned());
    }
    let rows: Vec<Vec<String>> = ins
        .routes
        .iter()
        .chain(std::iter::once(&total))
        .map(|r| {
            vec![
                r.database.clone(),
                r.user.clone(),
                n(r.xact_count),
                n(r.query_count),
                n(r.bytes_received),
                n(r.bytes_sent),
                n(r.xact_time_us),
                n(r.query_time_us),
                n(r.wait_time_us),
                n(avg(r.xact_time_us, r.xact_count)),
                n(avg(r.query_time_us, r.query_count)),
                n(avg(r.wait_time_us, r.wait_count)),
                n(r.wait_p50_us),
                n(r.wait_p95_us),
                n(r.wait_p99_us),
                n(r.errors.iter().map(|(_, k)| k).sum::<u64>()),
                r.host.clone(),
            ]
        })
        .collect();
    result_set(
        out,
        &[
            "database",
            "user",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_xact_time",
            "total_query_time",
            "total_wait_time",
            "avg_xact_time",
            "avg_query_time",
            "avg_wait_time",
            "wait_p50_us",
            "wait_p95_us",
            "wait_p99_us",
            "total_errors",
            "host",
        ],
        &rows,
    );
}

fn errors(out: &mut BytesMut, ins: &Inspection) {
    let mut rows = Vec::new();
    for r in &ins.routes {
        for (class, count) in &r.errors {
            rows.push(vec![
                r.database.clone(),
                r.user.clone(),
                class.clone(),
                n(count),
            ]);
        }
    }
    result_set(out, &["database", "user", "sqlstate_class", "count"], &rows);
}

/// "host:port" → ("host", "port"); Unix sockets have no port.
fn split_addr(addr: &str) -> (String, String) {
    match addr.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => {
            (h.trim_matches(['[', ']']).to_string(), p.to_string())
        }
        _ => (addr.to_string(), String::new()),
    }
}

fn clients(out: &mut BytesMut, list: &[ClientInfo]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|c| {
            let (addr, port) = split_addr(&c.addr);
            vec![
                "C".into(),
                c.user.clone(),
                c.database.clone(),
                c.state.clone(),
                addr,
                port,
                n(c.connected_secs),
                n(c.wait_us / 1_000_000),
                n(c.wait_us % 1_000_000),
                c.id.clone(),
                n(c.worker),
                c.tls.clone().unwrap_or_default(),
                c.server.clone().unwrap_or_default(),
                c.pinned.clone().unwrap_or_default(),
            ]
        })
        .collect();
    result_set(
        out,
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connected_s",
            "wait",
            "wait_us",
            "id",
            "worker",
            "tls",
            "link",
            "pinned",
        ],
        &rows,
    );
}

fn servers(out: &mut BytesMut, list: &[ServerInfo]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            let (addr, port) = split_addr(&s.addr);
            vec![
                "S".into(),
                s.user.clone(),
                s.database.clone(),
                s.state.clone(),
                addr,
                port,
                n(s.connected_secs),
                s.id.clone(),
                n(s.worker),
                s.tls.clone().unwrap_or_default(),
                s.client.clone().unwrap_or_default(),
                s.remote_pid.map(n).unwrap_or_default(),
            ]
        })
        .collect();
    result_set(
        out,
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connected_s",
            "id",
            "worker",
            "tls",
            "link",
            "remote_pid",
        ],
        &rows,
    );
}

fn databases(out: &mut BytesMut, cfg: &Config) {
    let mut rows = Vec::new();
    for (db, d) in &cfg.database {
        for (user, r) in &d.user {
            let st = cfg.storage.get(&r.storage);
            let (host, port) = match st {
                Some(s) if s.kind == StorageType::Local => ("(console)".to_string(), String::new()),
                Some(s) => (
                    s.unix_socket_dir.clone().unwrap_or_else(|| s.host.clone()),
                    n(s.port),
                ),
                None => (String::new(), String::new()),
            };
            rows.push(vec![
                db.clone(),
                user.clone(),
                r.storage.clone(),
                host,
                port,
                r.storage_db.clone().unwrap_or_default(),
                r.storage_user.clone().unwrap_or_default(),
                r.authentication.as_str().to_string(),
                r.pool.as_str().to_string(),
                n(r.pool_size),
            ]);
        }
    }
    result_set(
        out,
        &[
            "database",
            "user",
            "storage",
            "host",
            "port",
            "storage_db",
            "storage_user",
            "authentication",
            "pool_mode",
            "pool_size",
        ],
        &rows,
    );
}

/// Keys whose values are secrets: never shown.
fn is_secret(key: &str) -> bool {
    key.ends_with("password")
}

fn config(out: &mut BytesMut, cfg: &Config) {
    let mut rows = Vec::new();
    if let Ok(v) = toml::Value::try_from(cfg) {
        flatten("", &v, &mut rows);
    }
    result_set(out, &["key", "value"], &rows);
}

fn flatten(prefix: &str, v: &toml::Value, rows: &mut Vec<Vec<String>>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else if k.contains('.') || k.contains(' ') {
                    format!("{prefix}.\"{k}\"")
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, rows);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, rows);
            }
        }
        _ if is_secret(prefix) => rows.push(vec![prefix.to_string(), "********".into()]),
        toml::Value::String(s) => rows.push(vec![prefix.to_string(), s.clone()]),
        other => rows.push(vec![prefix.to_string(), other.to_string()]),
    }
}

fn storages(out: &mut BytesMut, ins: &Inspection) {
    let rows: Vec<Vec<String>> = ins
        .storages
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                n(s.storage_max),
                n(s.connections),
                n(s.routes_waiting),
            ]
        })
        .collect();
    result_set(
        out,
        &["storage", "storage_max", "connections", "routes_waiting"],
        &rows,
    );
}

fn hosts(out: &mut BytesMut, ins: &Inspection) {
    let time = |ms: u64| {
        if ms == 0 {
            String::new()
        } else {
            crate::logging::rfc3339_ms(ms)
        }
    };
    let rows: Vec<Vec<String>> = ins
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.storage.clone(),
                h.host.clone(),
                h.role.clone(),
                if h.banned {
                    format!("banned {} ms", h.banned_for_ms)
                } else if h.lagging {
                    "lagging".into()
                } else {
                    "up".into()
                },
                h.why.clone(),
                h.bans.to_string(),
                h.lag_bytes.to_string(),
                h.lag_ms.to_string(),
                n(h.connections),
                time(h.role_changed_at_ms),
                time(h.checked_at_ms),
            ]
        })
        .collect();
    result_set(
        out,
        &[
            "storage",
            "host",
            "role",
            "state",
            "why",
            "bans",
            "lag_bytes",
            "lag_ms",
            "connections",
            "role_changed",
            "checked",
        ],
        &rows,
    );
}

fn lists(out: &mut BytesMut, ins: &Inspection, cfg: &Config) {
    let clients = |state: &str| ins.client_list.iter().filter(|c| c.state == state).count();
    let servers = |state: &str| ins.server_list.iter().filter(|s| s.state == state).count();
    let routes: usize = cfg.database.values().map(|d| d.user.len()).sum();
    let rows = vec![
        vec!["routes".into(), n(routes)],
        vec!["pools".into(), n(ins.routes.len())],
        vec!["workers".into(), n(ins.workers)],
        vec!["clients".into(), n(ins.client_list.len())],
        vec![
            "login_clients".into(),
            n(clients("login") + clients("verifying")),
        ],
        vec!["idle_clients".into(), n(clients("idle"))],
        vec!["waiting_clients".into(), n(clients("waiting"))],
        vec!["active_clients".into(), n(clients("active"))],
        vec!["console_clients".into(), n(clients("console"))],
        vec!["servers".into(), n(ins.server_list.len())],
        vec![
            "login_servers".into(),
            n(servers("connecting") + servers("login")),
        ],
        vec!["idle_servers".into(), n(servers("idle"))],
        vec!["active_servers".into(), n(servers("active"))],
        vec!["recovering_servers".into(), n(servers("recovering"))],
    ];
    result_set(out, &["list", "items"], &rows);
}

#[cfg(test)]
mod tests {
    use super::*;
    use odissey_facade::RouteStats;
    use odissey_protocol::read_frame;

    #[test]
    fn commands_parse_in_any_case_with_or_without_semicolon() {
        assert_eq!(parse("show pools;"), Ok(Command::Show(Show::Pools)));
        assert_eq!(parse("  SHOW   Clients "), Ok(Command::Show(Show::Clients)));
        assert_eq!(parse("Reload;"), Ok(Command::Reload));
        assert_eq!(parse("pause"), Ok(Command::Pause(None)));
        assert_eq!(parse("PAUSE app;"), Ok(Command::Pause(Some("app".into()))));
        assert_eq!(
            parse("resume \"My Db\""),
            Ok(Command::Resume(Some("My Db".into())))
        );
        assert_eq!(parse("kill c0123"), Ok(Command::Kill("c0123".into())));
        assert_eq!(parse("shutdown"), Ok(Command::Shutdown));
        assert!(parse("show nonsense").unwrap_err().contains("SHOW HELP"));
        assert!(parse("select 1").is_err());
        assert!(parse(";").is_err());
    }

    fn rows_of(out: &mut BytesMut) -> (Vec<String>, Vec<Vec<Option<String>>>, String) {
        let mut cols = Vec::new();
        let mut rows = Vec::new();
        let mut tag = String::new();
        while let Some(f) = read_frame(out, 1 << 20).unwrap() {
            match f.tag {
                b'T' => {
                    cols = backend::parse_row_description(&f.body)
                        .unwrap()
                        .into_iter()
                        .map(str::to_string)
                        .collect()
                }
                b'D' => rows.push(
                    backend::parse_data_row(&f.body)
                        .unwrap()
                        .into_iter()
                        .map(|v| v.map(|v| String::from_utf8_lossy(v).into_owned()))
                        .collect(),
                ),
                b'C' => {
                    tag = backend::parse_command_complete(&f.body)
                        .unwrap()
                        .to_string()
                }
                other => panic!("unexpected {}", other as char),
            }
        }
        (cols, rows, tag)
    }

    fn cfg() -> Config {
        Config::parse(
            "[[listen]]\nport = 0\n[storage.s]\ntype = \"remote\"\n[storage.local]\ntype = \"local\"\n\
             [database.app.user.bob]\nauthentication = \"md5\"\npassword = \"hunter2\"\nstorage = \"s\"\n\
             [database.console.user.admin]\nauthentication = \"none\"\nstorage = \"local\"\n",
        )
        .unwrap()
    }

    #[test]
    fn pools_follow_pgbouncers_columns() {
        let ins = Inspection {
            routes: vec![RouteStats {
                database: "app".into(),
                user: "bob".into(),
                pool_mode: "transaction".into(),
                clients_active: 3,
                clients_waiting: 1,
                servers_active: 2,
                servers_idle: 1,
                servers_login: 0,
                pool_size: 3,
                ..RouteStats::default()
            }],
            client_list: vec![ClientInfo {
                database: "app".into(),
                user: "bob".into(),
                state: "waiting".into(),
                wait_us: 2_500_000,
                ..ClientInfo::default()
            }],
            ..Inspection::default()
        };
        let mut out = BytesMut::new();
        show(&mut out, Show::Pools, &ins, &cfg());
        let (cols, rows, tag) = rows_of(&mut out);
        assert_eq!(
            &cols[..6],
            [
                "database",
                "user",
                "cl_active",
                "cl_waiting",
                "sv_active",
                "sv_idle"
            ]
        );
        assert_eq!(tag, "SHOW 1");
        let row: Vec<&str> = rows[0].iter().map(|v| v.as_deref().unwrap()).collect();
        assert_eq!(&row[..6], ["app", "bob", "3", "1", "2", "1"]);
        let at = |name: &str| row[cols.iter().position(|c| c == name).unwrap()];
        assert_eq!((at("maxwait"), at("maxwait_us")), ("2", "500000"));
        assert_eq!(at("pool_mode"), "transaction");
    }

    #[test]
    fn config_hides_secrets_and_databases_lists_routes() {
        let mut out = BytesMut::new();
        show(&mut out, Show::Config, &Inspection::default(), &cfg());
        let (cols, rows, _) = rows_of(&mut out);
        assert_eq!(cols, ["key", "value"]);
        let get = |k: &str| {
            rows.iter()
                .find(|r| r[0].as_deref() == Some(k))
                .and_then(|r| r[1].clone())
        };
        assert_eq!(
            get("database.app.user.bob.password").as_deref(),
            Some("********")
        );
        assert_eq!(get("auth_timeout").as_deref(), Some("10000"));
        assert!(!rows.iter().any(|r| r[1].as_deref() == Some("hunter2")));

        let mut out = BytesMut::new();
        show(&mut out, Show::Databases, &Inspection::default(), &cfg());
        let (_, rows, tag) = rows_of(&mut out);
        assert_eq!(tag, "SHOW 2");
        assert!(rows.iter().any(|r| r[3].as_deref() == Some("(console)")));
    }

    #[test]
    fn storages_list_their_connections() {
        assert_eq!(parse("show Storages;"), Ok(Command::Show(Show::Storages)));
        let ins = Inspection {
            storages: vec![odissey_facade::StorageStats {
                name: "main".into(),
                storage_max: 3,
                connections: 3,
                routes_waiting: 1,
            }],
            ..Inspection::default()
        };
        let mut out = BytesMut::new();
        show(&mut out, Show::Storages, &ins, &cfg());
        let (columns, rows, tag) = rows_of(&mut out);
        assert_eq!(
            columns,
            ["storage", "storage_max", "connections", "routes_waiting"]
        );
        assert_eq!(tag, "SHOW 1");
        let want = ["main", "3", "3", "1"].map(|v| Some(v.to_string()));
        assert_eq!(rows, vec![want.to_vec()]);
    }
}
