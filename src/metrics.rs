//! Metrics, sans-IO: the Prometheus text exposition of an [`Inspection`],
//! the minimal HTTP/1.x request parsing and response framing the metrics
//! endpoint needs (one GET, no web framework), and the periodic one-line
//! summaries of `stats_interval`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use odissey_facade::{HostStats, Inspection, RouteStats, StorageStats, ThreadStats};

/// The Prometheus text format (version 0.0.4) of a snapshot.
pub(crate) fn render(ins: &Inspection) -> String {
    let mut out = String::with_capacity(4096);
    for (name, help, value) in [
        ("odissey_up", "1 while odissey runs.", 1),
        ("odissey_workers", "Worker threads.", ins.workers),
        (
            "odissey_clients_connected",
            "Client connections, all states.",
            ins.clients,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    for (name, help, value) in [
        (
            "odissey_storage_connections",
            "Server connections of a storage, all its pools.",
            (|s| s.connections) as fn(&StorageStats) -> usize,
        ),
        (
            "odissey_storage_max",
            "The storage's storage_max (0 = unlimited).",
            |s| s.storage_max,
        ),
        (
            "odissey_storage_routes_waiting",
            "Routes waiting for a connection of the full storage.",
            |s| s.routes_waiting,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in &ins.storages {
            let _ = writeln!(
                out,
                "{name}{{storage=\"{}\"}} {}",
                escape(&s.name),
                value(s)
            );
        }
    }
    for (name, kind, help, value) in [
        (
            "odissey_host_up",
            "gauge",
            "1 while a host is in rotation (not banned).",
            (|h| u64::from(!h.banned)) as fn(&HostStats) -> u64,
        ),
        (
            "odissey_host_primary",
            "gauge",
            "1 while a host is the primary its storage writes to.",
            |h| u64::from(h.role == "primary"),
        ),
        (
            "odissey_host_lag_bytes",
            "gauge",
            "A standby's replay lag in bytes of WAL behind the primary.",
            |h| h.lag_bytes,
        ),
        (
            "odissey_host_lag_ms",
            "gauge",
            "A standby's replay delay in ms.",
            |h| h.lag_ms,
        ),
        (
            "odissey_host_lagging",
            "gauge",
            "1 while a standby is past max_replica_lag (no new work).",
            |h| u64::from(h.lagging),
        ),
        (
            "odissey_host_connections",
            "gauge",
            "Server connections open to a host.",
            |h| h.connections as u64,
        ),
        (
            "odissey_host_bans_total",
            "counter",
            "Times a host was banned (failed check, connection or login).",
            |h| h.bans,
        ),
        (
            "odissey_host_role_changed_at_ms",
            "gauge",
            "Unix time in ms of a host's last role change (0: none).",
            |h| h.role_changed_at_ms,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for h in &ins.hosts {
            let _ = writeln!(
                out,
                "{name}{{storage=\"{}\",host=\"{}\",role=\"{}\"}} {}",
                escape(&h.storage),
                escape(&h.host),
                escape(&h.role),
                value(h)
            );
        }
    }
    for (name, help, value) in [
        (
            "odissey_thread_messages_total",
            "Commands sent to a thread by the others (coordination between threads).",
            (|t| t.messages) as fn(&ThreadStats) -> u64,
        ),
        (
            "odissey_thread_wakeups_total",
            "Times a thread woke up to take the commands sent to it.",
            |t| t.wakeups,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for t in &ins.threads {
            let _ = writeln!(out, "{name}{{thread=\"{}\"}} {}", escape(&t.name), value(t));
        }
    }
    let _ = writeln!(
        out,
        "# HELP odissey_system_commands_total Commands the system thread was sent, by kind.\n# TYPE odissey_system_commands_total counter"
    );
    for (kind, n) in &ins.system_commands {
        let _ = writeln!(
            out,
            "odissey_system_commands_total{{kind=\"{}\"}} {n}",
            escape(kind)
        );
    }
    type Value = fn(&RouteStats) -> String;
    let per_pool: &[(&str, &str, &str, Value)] = &[
        (
            "odissey_pool_size",
            "gauge",
            "The pool's pool_size (0 = unlimited).",
            |r| r.pool_size.to_string(),
        ),
        (
            "odissey_transactions_total",
            "counter",
            "Transactions completed.",
            |r| r.xact_count.to_string(),
        ),
        (
            "odissey_queries_total",
            "counter",
            "Requests answered (ReadyForQuery).",
            |r| r.query_count.to_string(),
        ),
        (
            "odissey_received_bytes_total",
            "counter",
            "Bytes from clients to servers.",
            |r| r.bytes_received.to_string(),
        ),
        (
            "odissey_sent_bytes_total",
            "counter",
            "Bytes from servers to clients.",
            |r| r.bytes_sent.to_string(),
        ),
        (
            "odissey_transaction_seconds_total",
            "counter",
            "Time spent in transactions.",
            |r| secs(r.xact_time_us),
        ),
        (
            "odissey_query_seconds_total",
            "counter",
            "Time from request to ReadyForQuery.",
            |r| secs(r.query_time_us),
        ),
    ];
    for (name, kind, help, value) in per_pool {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for r in &ins.routes {
            let _ = writeln!(out, "{name}{{{}}} {}", pool_labels(r), value(r));
        }
    }
    let _ = writeln!(
        out,
        "# HELP odissey_clients Clients by state.\n# TYPE odissey_clients gauge"
    );
    for r in &ins.routes {
        for (state, n) in [("active", r.clients_active), ("waiting", r.clients_waiting)] {
            let _ = writeln!(
                out,
                "odissey_clients{{{},state=\"{state}\"}} {n}",
                pool_labels(r)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP odissey_clients_pinned Clients keeping their server connection between transactions.\n# TYPE odissey_clients_pinned gauge"
    );
    for r in &ins.routes {
        let _ = writeln!(
            out,
            "odissey_clients_pinned{{{}}} {}",
            pool_labels(r),
            r.clients_pinned
        );
    }
    let _ = writeln!(
        out,
        "# HELP odissey_servers Server connections by state.\n# TYPE odissey_servers gauge"
    );
    for r in &ins.routes {
        for (state, n) in [
            ("active", r.servers_active),
            ("idle", r.servers_idle),
            ("login", r.servers_login),
        ] {
            let _ = writeln!(
                out,
                "odissey_servers{{{},state=\"{state}\"}} {n}",
                pool_labels(r)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP odissey_wait_seconds Time clients waited for a server connection.\n# TYPE odissey_wait_seconds summary"
    );
    for r in &ins.routes {
        let l = pool_labels(r);
        for (q, v) in [
            ("0.5", r.wait_p50_us),
            ("0.95", r.wait_p95_us),
            ("0.99", r.wait_p99_us),
        ] {
            let _ = writeln!(
                out,
                "odissey_wait_seconds{{{l},quantile=\"{q}\"}} {}",
                secs(v)
            );
        }
        let _ = writeln!(
            out,
            "odissey_wait_seconds_sum{{{l}}} {}",
            secs(r.wait_time_us)
        );
        let _ = writeln!(out, "odissey_wait_seconds_count{{{l}}} {}", r.wait_count);
    }
    let _ = writeln!(
        out,
        "# HELP odissey_server_errors_total ErrorResponses from servers by SQLSTATE class.\n# TYPE odissey_server_errors_total counter"
    );
    for r in &ins.routes {
        for (class, n) in &r.errors {
            let _ = writeln!(
                out,
                "odissey_server_errors_total{{{},class=\"{}\"}} {n}",
                pool_labels(r),
                escape(class)
            );
        }
    }
    out
}

fn pool_labels(r: &RouteStats) -> String {
    // A storage with several hosts has a pool per host: the host tells
    // their series apart.
    format!(
        "database=\"{}\",user=\"{}\",pool_mode=\"{}\",host=\"{}\"",
        escape(&r.database),
        escape(&r.user),
        escape(&r.pool_mode),
        escape(&r.host)
    )
}

fn secs(us: u64) -> String {
    format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
}

/// A label value: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// What an HTTP request asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HttpRequest {
    /// `GET /metrics` (a query string is ignored).
    Metrics,
    /// Any other path.
    NotFound,
    /// Any other method.
    NotAllowed,
    /// Not HTTP.
    Bad,
}

/// The most an HTTP request head may take.
pub(crate) const MAX_REQUEST: usize = 8192;

/// The request, once its head is complete in `buf`; None until then.
pub(crate) fn parse_request(buf: &[u8]) -> Option<HttpRequest> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok();
    let Some(line) = head.and_then(|h| h.lines().next()) else {
        return Some(HttpRequest::Bad);
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Some(HttpRequest::Bad);
    };
    if !version.starts_with("HTTP/1.") {
        return Some(HttpRequest::Bad);
    }
    let path = target.split('?').next().unwrap_or("");
    Some(match (method, path) {
        ("GET" | "HEAD", "/metrics") => HttpRequest::Metrics,
        ("GET" | "HEAD", _) => HttpRequest::NotFound,
        _ => HttpRequest::NotAllowed,
    })
}

/// A whole response; the connection closes after it.
pub(crate) fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The totals a summary line compares against.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Totals {
    xacts: u64,
    queries: u64,
    bytes_in: u64,
    bytes_out: u64,
    xact_us: u64,
    query_us: u64,
    waits: u64,
    wait_us: u64,
}

impl Totals {
    fn of(r: &RouteStats) -> Self {
        Self {
            xacts: r.xact_count,
            queries: r.query_count,
            bytes_in: r.bytes_received,
            bytes_out: r.bytes_sent,
            xact_us: r.xact_time_us,
            query_us: r.query_time_us,
            waits: r.wait_count,
            wait_us: r.wait_time_us,
        }
    }
}

/// One line per pool about the last `elapsed`: rates and averages against
/// `prev`, which is updated.
pub(crate) fn summaries(
    ins: &Inspection,
    prev: &mut HashMap<(String, String), Totals>,
    elapsed: Duration,
) -> Vec<String> {
    let secs = elapsed.as_secs_f64().max(0.001);
    let mut lines = Vec::new();
    for r in &ins.routes {
        let key = (r.database.clone(), r.user.clone());
        let now = Totals::of(r);
        let before = prev.insert(key, now).unwrap_or_default();
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let (xacts, queries) = (d(now.xacts, before.xacts), d(now.queries, before.queries));
        let avg = |total: u64, n: u64| total.checked_div(n).unwrap_or(0);
        lines.push(format!(
            "stats {}.{}: {:.1} xact/s, {:.1} query/s, in {:.0} B/s, out {:.0} B/s, \
             xact {} us, query {} us, wait {} us; clients {} active {} waiting, servers {} active {} idle",
            r.database,
            r.user,
            xacts as f64 / secs,
            queries as f64 / secs,
            d(now.bytes_in, before.bytes_in) as f64 / secs,
            d(now.bytes_out, before.bytes_out) as f64 / secs,
            avg(d(now.xact_us, before.xact_us), xacts),
            avg(d(now.query_us, before.query_us), queries),
            avg(d(now.wait_us, before.wait_us), d(now.waits, before.waits)),
            r.clients_active,
            r.clients_waiting,
            r.servers_active,
            r.servers_idle,
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> RouteStats {
        RouteStats {
            database: "app".into(),
            user: "we\"ird\\".into(),
            pool_mode: "transaction".into(),
            clients_active: 2,
            xact_count: 10,
            query_count: 12,
            xact_time_us: 1_500_000,
            wait_count: 4,
            wait_time_us: 40,
            wait_p99_us: 20,
            errors: vec![("23".into(), 3)],
            ..RouteStats::default()
        }
    }

    #[test]
    fn the_exposition_has_help_type_and_escaped_labels() {
        let text = render(&Inspection {
            workers: 2,
            routes: vec![route()],
            storages: vec![StorageStats {
                name: "main".into(),
                storage_max: 3,
                connections: 2,
                routes_waiting: 0,
            }],
            threads: vec![ThreadStats {
                name: "odissey-system".into(),
                messages: 7,
                wakeups: 5,
            }],
            system_commands: vec![("need".into(), 3)],
            ..Inspection::default()
        });
        assert!(
            text.contains("odissey_thread_messages_total{thread=\"odissey-system\"} 7"),
            "{text}"
        );
        assert!(
            text.contains("odissey_thread_wakeups_total{thread=\"odissey-system\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("odissey_system_commands_total{kind=\"need\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("odissey_storage_connections{storage=\"main\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("odissey_storage_max{storage=\"main\"} 3"),
            "{text}"
        );
        // Every sample belongs to a family announced before it.
        let mut families = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                families.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let base = name.trim_end_matches("_sum").trim_end_matches("_count");
                assert!(
                    families.contains(name) || families.contains(base),
                    "{line}\n{text}"
                );
            }
        }
        assert!(text.contains(r#"user="we\"ird\\""#), "{text}");
        assert!(
            text.contains("odissey_transactions_total{database=\"app\""),
            "{text}"
        );
        assert!(text.contains("odissey_transaction_seconds_total{database=\"app\",user=\"we\\\"ird\\\\\",pool_mode=\"transaction\",host=\"\"} 1.500000"), "{text}");
        assert!(text.contains("quantile=\"0.99\"} 0.000020"), "{text}");
        assert!(text.contains("class=\"23\"} 3"), "{text}");
        assert!(text.contains("odissey_workers 2"), "{text}");
    }

    #[test]
    fn requests_are_recognized_once_complete() {
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(HttpRequest::Metrics)
        );
        assert_eq!(
            parse_request(b"GET / HTTP/1.0\r\n\r\n"),
            Some(HttpRequest::NotFound)
        );
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(HttpRequest::NotAllowed)
        );
        assert_eq!(
            parse_request(b"\x16\x03\x01garbage\r\n\r\n"),
            Some(HttpRequest::Bad)
        );
        let r = String::from_utf8(response("200 OK", "text/plain", "hi")).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nhi"));
        assert!(r.contains("Content-Length: 2\r\n"));
    }

    #[test]
    fn summaries_report_rates_since_the_last_one() {
        let mut prev = HashMap::new();
        let mut ins = Inspection {
            routes: vec![route()],
            ..Inspection::default()
        };
        let first = summaries(&ins, &mut prev, Duration::from_secs(10));
        assert!(first[0].contains("1.0 xact/s"), "{}", first[0]);
        ins.routes[0].xact_count += 50;
        let second = summaries(&ins, &mut prev, Duration::from_secs(10));
        assert!(second[0].contains("5.0 xact/s"), "{}", second[0]);
    }
}
