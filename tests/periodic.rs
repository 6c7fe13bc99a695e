//! Limits and periodic tasks as an operator sees them: idle server
//! connections closed by pool_ttl and server_lifetime (checked in
//! pg_stat_activity), client idle and idle-in-transaction timeouts, query
//! timeouts, per-route client_max; and the statistics they show up in
//! (SHOW STATS, SHOW ERRORS, the Prometheus endpoint).

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use odissey::ConfigSource;
use odissey_harness::{PgCluster, TRUST_USER};
use postgres::error::SqlState;
use postgres::SimpleQueryMessage;

fn route_with(keys: &[(&str, &str)]) -> (Route, RouteKeys) {
    let mut k = RouteKeys::new("test", TRUST_USER);
    for (key, value) in keys {
        k = k.raw(key, value);
    }
    (Route::new("test", TRUST_USER).transaction(), k)
}

fn start_with(pg: &PgCluster, keys: &[(&str, &str)]) -> (Handle, u16) {
    let (r, k) = route_with(keys);
    start_pooler_ext(&Config::new(pg.port()).route(r), &[k])
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    t0.elapsed()
}

#[test]
fn pool_ttl_and_server_lifetime_close_idle_servers() {
    let _w = watchdog("pool_ttl", Duration::from_secs(60));
    let pg = PgCluster::start();
    for key in ["pool_ttl", "server_lifetime"] {
        let (_h, port) = start_with(&pg, &[(key, "1")]);
        let mut c = connect(port, "test", TRUST_USER, None);
        c.simple_query("SELECT 1").unwrap();
        assert_eq!(pg.backends(TRUST_USER), 1);
        let took = wait_for(
            &format!("{key} to close the idle server"),
            Duration::from_secs(10),
            || pg.backends(TRUST_USER) == 0,
        );
        assert!(
            took >= Duration::from_millis(500),
            "{key}: closed after {took:?}"
        );
        // The pool opens a new one when needed.
        c.simple_query("SELECT 2").unwrap();
        assert_eq!(pg.backends(TRUST_USER), 1);
    }
}

#[test]
fn client_timeouts_end_idle_clients_with_their_sqlstate() {
    let _w = watchdog("client timeouts", Duration::from_secs(60));
    let pg = PgCluster::start();
    let (_h, port) = start_with(
        &pg,
        &[
            ("client_idle_timeout", "1"),
            ("idle_in_transaction_timeout", "1"),
        ],
    );
    let mut idle = connect(port, "test", TRUST_USER, None);
    idle.simple_query("SELECT 1").unwrap();
    let mut in_xact = connect(port, "test", TRUST_USER, None);
    in_xact.batch_execute("BEGIN; SELECT 1").unwrap();
    // A client that keeps working is left alone.
    let mut busy = connect(port, "test", TRUST_USER, None);
    for _ in 0..8 {
        busy.simple_query("SELECT 1").unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    for (c, code) in [(&mut idle, "57P05"), (&mut in_xact, "25P03")] {
        let e = c.simple_query("SELECT 1").unwrap_err();
        assert!(
            e.code().map(SqlState::code) == Some(code) || e.is_closed(),
            "expected {code}: {}",
            describe(&e)
        );
    }
    // The idle-in-transaction client's transaction was rolled back and its
    // server returned: the pool still serves.
    busy.simple_query("SELECT 1").unwrap();
}

#[test]
fn query_timeout_cancels_the_query_and_the_client_goes_on() {
    let _w = watchdog("query_timeout", Duration::from_secs(60));
    let pg = PgCluster::start();
    let (_h, port) = start_with(&pg, &[("query_timeout", "1")]);
    let mut c = connect(port, "test", TRUST_USER, None);
    let t0 = Instant::now();
    let e = c.simple_query("SELECT pg_sleep(10)").unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::QUERY_CANCELED),
        "{}",
        describe(&e)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "cancelled after {:?}",
        t0.elapsed()
    );
    assert_eq!(c.query_one("SELECT 7", &[]).unwrap().get::<_, i32>(0), 7);
}

#[test]
fn client_max_per_route() {
    let _w = watchdog("client_max", Duration::from_secs(30));
    let pg = PgCluster::start();
    let (_h, port) = start_with(&pg, &[("client_max", "2")]);
    let a = connect(port, "test", TRUST_USER, None);
    let _b = connect(port, "test", TRUST_USER, None);
    expect_code(
        try_connect(port, "test", TRUST_USER, None),
        &SqlState::TOO_MANY_CONNECTIONS,
        "a third client of a route with client_max 2",
    );
    drop(a);
    wait_for("a slot to free up", Duration::from_secs(5), || {
        try_connect(port, "test", TRUST_USER, None).is_ok()
    });
}

/// GET /metrics over a plain socket.
fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// The value of one sample line `name{labels…} value` whose labels contain
/// every one of `labels`.
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn statistics_in_the_console_and_the_metrics_endpoint() {
    let _w = watchdog("stats", Duration::from_secs(60));
    let pg = PgCluster::start();
    pg.sql(
        "test",
        "CREATE TABLE uniq (id int PRIMARY KEY); GRANT ALL ON uniq TO trust_user",
    );
    let mut text = Config::new(pg.port())
        .route(Route::new("test", TRUST_USER).transaction().pool_size(1))
        .global("stats_interval", "1")
        .toml();
    text.push_str(
        "\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[storage.local]\ntype = \"local\"\n\n\
         [database.console.user.admin]\nauthentication = \"none\"\nstorage = \"local\"\n",
    );
    let (h, port) = start_pooler_from(ConfigSource::Toml(text));
    let metrics = h.inspect().unwrap().metrics.expect("the metrics address");

    let mut c = connect(port, "test", TRUST_USER, None);
    for i in 0..20 {
        c.simple_query(&format!("SELECT {i}")).unwrap();
    }
    c.batch_execute("BEGIN; SELECT 1; COMMIT").unwrap();
    c.batch_execute("INSERT INTO uniq VALUES (1)").unwrap();
    let e = c.batch_execute("INSERT INTO uniq VALUES (1)").unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::UNIQUE_VIOLATION));
    // A client that waits for the only server.
    c.batch_execute("BEGIN").unwrap();
    let waiter = std::thread::spawn(move || {
        let mut w = connect(port, "test", TRUST_USER, None);
        w.simple_query("SELECT 1").unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    c.batch_execute("COMMIT").unwrap();
    waiter.join().unwrap();

    // The facade.
    let ins = h.inspect().unwrap();
    let r = ins.route("test", TRUST_USER).expect("the pool");
    assert!(r.xact_count >= 23, "{r:?}");
    assert!(r.query_count >= r.xact_count, "{r:?}");
    assert!(
        r.bytes_received > 0 && r.bytes_sent > r.bytes_received,
        "{r:?}"
    );
    assert!(r.query_time_us > 0 && r.xact_time_us > 0, "{r:?}");
    assert!(r.wait_count >= 2, "{r:?}");
    assert!(
        r.wait_p99_us >= 200_000,
        "the 300 ms wait shows in p99: {r:?}"
    );
    assert!(r.errors.contains(&("23".to_string(), 1)), "{r:?}");

    // The console.
    let mut admin = connect(port, "console", "admin", None);
    let rows = |c: &mut Client, sql: &str| -> Vec<Vec<String>> {
        c.simple_query(sql)
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_string())
                        .collect(),
                ),
                _ => None,
            })
            .collect()
    };
    let stats = rows(&mut admin, "SHOW STATS");
    let row = stats.iter().find(|r| r[0] == "test").expect("a stats row");
    let xacts: u64 = row[2].parse().unwrap();
    assert!(xacts >= 23, "{row:?}");
    let errors = rows(&mut admin, "show errors");
    assert!(
        errors
            .iter()
            .any(|r| r[0] == "test" && r[2] == "23" && r[3] == "1"),
        "{errors:?}"
    );

    // Prometheus.
    let body = scrape(metrics);
    let pool = ["database=\"test\"", "user=\"trust_user\""];
    assert!(
        sample(&body, "odissey_transactions_total", &pool).unwrap() >= 23.0,
        "{body}"
    );
    assert_eq!(sample(&body, "odissey_up", &[]), Some(1.0));
    assert_eq!(
        sample(&body, "odissey_server_errors_total", &["class=\"23\""]),
        Some(1.0)
    );
    assert!(sample(&body, "odissey_wait_seconds_count", &pool).unwrap() >= 2.0);
    assert!(sample(&body, "odissey_wait_seconds", &["quantile=\"0.99\""]).unwrap() >= 0.2);
    assert_eq!(
        sample(&body, "odissey_servers", &["state=\"idle\""]),
        Some(1.0)
    );
    // The threads' channels: the facade's requests and the workers'
    // reports reached the system thread; every worker has its line.
    assert!(
        sample(
            &body,
            "odissey_thread_messages_total",
            &["thread=\"odissey-system\""]
        )
        .unwrap()
            >= 1.0,
        "{body}"
    );
    assert!(
        sample(
            &body,
            "odissey_thread_wakeups_total",
            &["thread=\"odissey-worker-0\""]
        )
        .is_some(),
        "{body}"
    );
    // Other paths and methods get HTTP errors, and the endpoint lives on.
    let mut s = std::net::TcpStream::connect(metrics).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(scrape(metrics).contains("odissey_up 1"));
}

#[test]
fn min_pool_size_keeps_servers_warm() {
    let _w = watchdog("min_pool_size", Duration::from_secs(60));
    let pg = PgCluster::start();
    let (_h, port) = start_with(&pg, &[("min_pool_size", "2")]);
    // No client yet: the exact route's pool is opened by itself.
    wait_for("two warm servers", Duration::from_secs(10), || {
        pg.backends(TRUST_USER) == 2
    });
    // Clients use them; a server that dies is replaced.
    let mut c = connect(port, "test", TRUST_USER, None);
    c.simple_query("SELECT 1").unwrap();
    pg.sql(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'trust_user'",
    );
    wait_for("the pool to refill", Duration::from_secs(10), || {
        pg.backends(TRUST_USER) == 2
    });
    assert_eq!(c.query_one("SELECT 3", &[]).unwrap().get::<_, i32>(0), 3);
}

#[test]
fn an_unreachable_server_gives_clear_errors_and_the_pool_recovers() {
    let _w = watchdog("server down", Duration::from_secs(90));
    let pg = PgCluster::start();
    let route = Route::new("test", TRUST_USER)
        .transaction()
        .pool_timeout_ms(1000);
    let (_h, port) = start_pooler(&Config::new(pg.port()).route(route));
    let mut c = connect(port, "test", TRUST_USER, None);
    c.simple_query("SELECT 1").unwrap();
    pg.stop();
    // The idle server died with the cluster; the client's next query
    // finds no server to log in to and is told why, soon.
    let t0 = Instant::now();
    let e = c.simple_query("SELECT 1").unwrap_err();
    let text = describe(&e);
    assert!(
        e.code()
            .map(SqlState::code)
            .is_some_and(|c| ["08006", "53300", "57P01"].contains(&c))
            || e.is_closed(),
        "{text}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "{:?}: {text}",
        t0.elapsed()
    );
    // New clients while it is down: a clear error, not a hang.
    let t0 = Instant::now();
    let r = try_connect(port, "test", TRUST_USER, None)
        .and_then(|mut c| c.simple_query("SELECT 1").map(|_| ()));
    assert!(r.is_err());
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Back up: the pool serves again without a restart of odissey.
    pg.restart();
    wait_for("the pool to serve again", Duration::from_secs(20), || {
        try_connect(port, "test", TRUST_USER, None)
            .and_then(|mut c| c.simple_query("SELECT 1").map(|_| ()))
            .is_ok()
    });
}

#[test]
fn queue_max_refuses_at_once_when_too_many_wait() {
    let _w = watchdog("queue_max", Duration::from_secs(60));
    let pg = PgCluster::start();
    let route = Route::new("test", TRUST_USER).transaction().pool_size(1);
    let keys = RouteKeys::new("test", TRUST_USER).raw("queue_max", "2");
    // One worker: a login on a worker that has not met the pool yet needs
    // a server for its greeting, and would count against queue_max too.
    let cfg = Config::new(pg.port()).route(route).workers(1);
    let (h, port) = start_pooler_ext(&cfg, &[keys]);
    let mut holder = connect(port, "test", TRUST_USER, None);
    holder.batch_execute("BEGIN; SELECT 1").unwrap();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = connect(port, "test", TRUST_USER, None);
                c.simple_query("SELECT 1").map(|_| ())
            })
        })
        .collect();
    let waiting = || {
        h.inspect()
            .unwrap()
            .route("test", TRUST_USER)
            .map_or(0, |r| r.clients_waiting)
    };
    wait_for("two waiting clients", Duration::from_secs(10), || {
        waiting() == 2
    });
    // The third request is refused at once.
    let mut third = connect(port, "test", TRUST_USER, None);
    let t0 = Instant::now();
    let e = third.simple_query("SELECT 1").unwrap_err();
    assert_eq!(
        e.code(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "{}",
        describe(&e)
    );
    assert!(describe(&e).contains("busy"), "{}", describe(&e));
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    // The admitted ones are served once the server frees up.
    holder.batch_execute("COMMIT").unwrap();
    for w in waiters {
        w.join().unwrap().unwrap();
    }
}

#[test]
fn client_rate_limits_new_connections_per_second() {
    let _w = watchdog("client_rate", Duration::from_secs(30));
    let pg = PgCluster::start();
    let (_h, port) = start_with(&pg, &[("client_rate", "3")]);
    let mut ok = 0;
    let mut refused = 0;
    let t0 = Instant::now();
    for _ in 0..10 {
        match try_connect(port, "test", TRUST_USER, None) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(
                    e.code(),
                    Some(&SqlState::TOO_MANY_CONNECTIONS),
                    "{}",
                    describe(&e)
                );
                assert!(describe(&e).contains("client_rate"), "{}", describe(&e));
                refused += 1;
            }
        }
    }
    // The burst may straddle two one-second windows: at most 3 in each.
    let windows = if t0.elapsed() < Duration::from_secs(1) {
        2
    } else {
        3
    };
    assert!(
        ok >= 3 && ok <= 3 * windows,
        "{ok} served, {refused} refused"
    );
    assert!(refused > 0);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(
        try_connect(port, "test", TRUST_USER, None).is_ok(),
        "a new second, a new allowance"
    );
}

/// Issue 13: idle connections cannot starve the metrics endpoint. More
/// idle connections than it has slots (64) still leave a scrape served at
/// once (the oldest idle one gives way), and a connection that does not
/// send a whole request head is closed about 5 s after it came.
#[test]
fn idle_connections_do_not_starve_the_metrics_endpoint() {
    let _w = watchdog("metrics idle", Duration::from_secs(60));
    // No server is needed for metrics.
    let mut text = Config::new(1).route(Route::new("test", TRUST_USER)).toml();
    text.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let (h, _) = start_pooler_from(ConfigSource::Toml(text));
    let metrics = h.inspect().unwrap().metrics.expect("the metrics address");

    let idle: Vec<std::net::TcpStream> = (0..80)
        .map(|_| std::net::TcpStream::connect(metrics).unwrap())
        .collect();
    // Half a request, then silence: a slow peer.
    let mut slow = std::net::TcpStream::connect(metrics).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let slow_since = Instant::now();
    for _ in 0..3 {
        let t0 = Instant::now();
        assert!(scrape(metrics).contains("odissey_up 1"));
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "a scrape behind idle connections took {:?}",
            t0.elapsed()
        );
    }

    // The slow one is closed by the server at its head timeout, not
    // before, and every idle one by then too.
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut buf = [0u8; 256];
    let n = slow.read(&mut buf).unwrap_or(0);
    let waited = slow_since.elapsed();
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(8),
        "closed after {waited:?}"
    );
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection still open: {other:?}"),
        }
    }
    assert!(scrape(metrics).contains("odissey_up 1"));
}
