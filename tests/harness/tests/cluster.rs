//! Tests of the cluster harness itself.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use odissey_harness::{pg_bin, PgCluster};

/// How long a standby may take to replay what its primary committed.
const CATCH_UP: Duration = Duration::from_secs(30);

fn one(cluster: &PgCluster, db: &str, sql: &str) -> Option<String> {
    let rows = cluster.sql(db, sql);
    assert_eq!(rows.len(), 1, "expected one row from {sql}: {rows:?}");
    assert_eq!(rows[0].len(), 1, "expected one column from {sql}: {rows:?}");
    rows[0][0].clone()
}

#[test]
fn sql_roles_and_databases() {
    let pg = PgCluster::start();
    assert_eq!(pg.host(), "127.0.0.1");
    assert_ne!(pg.port(), 0);
    assert!(pg.bindir().join("pg_ctl").is_file());

    assert_eq!(
        pg.sql("postgres", "SELECT 1, NULL::text, 'x'"),
        vec![vec![Some("1".to_owned()), None, Some("x".to_owned())]]
    );
    assert_eq!(
        one(&pg, "postgres", "SHOW max_connections").as_deref(),
        Some("300")
    );
    assert_eq!(one(&pg, "postgres", "SHOW fsync").as_deref(), Some("off"));
    assert_eq!(
        one(&pg, "postgres", "SHOW port"),
        Some(pg.port().to_string())
    );

    // Password storage formats.
    assert_eq!(
        one(
            &pg,
            "postgres",
            "SELECT rolpassword LIKE 'md5%' FROM pg_authid WHERE rolname = 'md5_user'"
        )
        .as_deref(),
        Some("t")
    );
    for role in ["scram_user", "app"] {
        assert_eq!(
            one(
                &pg,
                "postgres",
                &format!(
                    "SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid \
                     WHERE rolname = '{role}'"
                )
            )
            .as_deref(),
            Some("t"),
            "{role}"
        );
    }

    // Databases and owners.
    assert_eq!(
        one(
            &pg,
            "postgres",
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'"
        )
        .as_deref(),
        Some("app")
    );
    assert_eq!(
        one(
            &pg,
            "postgres",
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'test'"
        )
        .as_deref(),
        Some("postgres")
    );

    // Every role can create objects in `test`.
    let mut c = pg.connect("test", "trust_user", None);
    c.batch_execute("CREATE TABLE t_trust (id int); CREATE SCHEMA s_trust")
        .unwrap();
    let mut c = pg.connect("test", "md5_user", Some("md5_pass"));
    c.batch_execute("CREATE TABLE t_md5 (id int); INSERT INTO t_md5 VALUES (1)")
        .unwrap();
    let mut c = pg.connect("app", "app", Some("app_pass"));
    c.batch_execute("CREATE TABLE t_app (id int)").unwrap();

    assert!(pg_bin("pgbench").is_file());
    assert!(pg_bin("psql").is_file());
}

#[test]
fn authentication() {
    let pg = PgCluster::start();

    for (user, pass) in [
        ("md5_user", "md5_pass"),
        ("scram_user", "scram_pass"),
        ("app", "app_pass"),
    ] {
        let mut c = pg
            .try_connect("test", user, Some(pass))
            .unwrap_or_else(|e| panic!("{user} with the right password: {e}"));
        let row = c.query_one("SELECT current_user::text", &[]).unwrap();
        assert_eq!(row.get::<_, String>(0), user);

        let err = pg
            .try_connect("test", user, Some("wrong"))
            .err()
            .unwrap_or_else(|| panic!("{user} with a wrong password must fail"));
        let db = err.as_db_error().expect("server-side auth error");
        assert_eq!(db.code().code(), "28P01", "{user}: {db:?}");

        assert!(
            pg.try_connect("test", user, None).is_err(),
            "{user} without a password must fail"
        );
    }

    let mut c = pg.connect("test", "trust_user", None);
    let row = c.query_one("SELECT current_user::text", &[]).unwrap();
    assert_eq!(row.get::<_, String>(0), "trust_user");
    // trust ignores whatever password is sent.
    pg.connect("test", "trust_user", Some("anything"));
    pg.connect("postgres", "postgres", None);
}

#[test]
fn backends_counts_connections() {
    let pg = PgCluster::start();
    assert_eq!(pg.backends("scram_user"), 0);

    let c1 = pg.connect("test", "scram_user", Some("scram_pass"));
    assert_eq!(pg.backends("scram_user"), 1);
    let c2 = pg.connect("app", "scram_user", Some("scram_pass"));
    assert_eq!(pg.backends("scram_user"), 2);
    assert_eq!(pg.backends("trust_user"), 0);
    // The connection used by backends() itself is not counted.
    assert_eq!(pg.backends("postgres"), 0);

    drop(c1);
    drop(c2);
    assert_eq!(
        pg.wait_for_backends("scram_user", 0, Duration::from_secs(10)),
        0
    );
}

#[test]
fn two_clusters_at_once() {
    let handles: Vec<_> = (0..2).map(|_| thread::spawn(PgCluster::start)).collect();
    let clusters: Vec<PgCluster> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(clusters[0].port(), clusters[1].port());
    assert_ne!(clusters[0].datadir(), clusters[1].datadir());

    clusters[0].sql("test", "CREATE TABLE only_in_first (id int)");
    for (i, pg) in clusters.iter().enumerate() {
        let mut c = pg.connect("test", "scram_user", Some("scram_pass"));
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_first'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, i64::from(i == 0));
    }

    let datadirs: Vec<_> = clusters.iter().map(|c| c.datadir().to_owned()).collect();
    drop(clusters);
    for dir in datadirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn stop_and_restart() {
    let pg = PgCluster::start();
    let port = pg.port();
    pg.sql(
        "test",
        "CREATE TABLE survives (v text); INSERT INTO survives VALUES ('yes')",
    );

    let mut before = pg.connect("test", "trust_user", None);
    pg.stop();
    assert!(before.simple_query("SELECT 1").is_err());
    assert!(pg.try_connect("test", "trust_user", None).is_err());

    pg.restart();
    assert_eq!(pg.port(), port);
    assert_eq!(
        pg.sql("test", "SELECT v FROM survives"),
        vec![vec![Some("yes".to_owned())]]
    );
    pg.connect("test", "md5_user", Some("md5_pass"));
}

/// The SQLSTATE of a failed statement, or a panic saying what happened.
fn sqlstate(result: Result<(), odissey_harness::postgres::Error>, what: &str) -> String {
    let err = result.err().unwrap_or_else(|| panic!("{what} must fail"));
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{what}: not a server error: {err}"));
    db.code().code().to_owned()
}

fn count(cluster: &PgCluster, table: &str) -> i64 {
    one(cluster, "test", &format!("SELECT count(*) FROM {table}"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("count(*) of {table} on port {}", cluster.port()))
}

#[test]
fn a_standby_follows_its_primary_and_refuses_writes() {
    let primary = PgCluster::start();
    primary.sql(
        "test",
        "CREATE TABLE replicated (v int); INSERT INTO replicated VALUES (1)",
    );
    let standby = primary.start_standby();
    assert_ne!(standby.port(), primary.port());
    assert_ne!(standby.datadir(), primary.datadir());
    assert!(standby.is_in_recovery());
    assert!(!primary.is_in_recovery());
    assert_eq!(
        one(&standby, "postgres", "SHOW port"),
        Some(standby.port().to_string())
    );
    // The base backup brought the table along, and the roles.
    assert_eq!(count(&standby, "replicated"), 1);
    standby.connect("test", "scram_user", Some("scram_pass"));

    primary.sql(
        "test",
        "INSERT INTO replicated SELECT generate_series(2, 100)",
    );
    standby.wait_caught_up(&primary, CATCH_UP);
    assert_eq!(count(&standby, "replicated"), 100);

    let mut c = standby.connect("test", "trust_user", None);
    assert_eq!(
        sqlstate(
            c.batch_execute("INSERT INTO replicated VALUES (0)"),
            "a write on a standby"
        ),
        "25006", // read_only_sql_transaction
    );
    // The primary saw its standby connect (the walsender).
    assert_eq!(
        one(
            &primary,
            "postgres",
            "SELECT count(*) FROM pg_stat_replication"
        )
        .as_deref(),
        Some("1")
    );
}

#[test]
fn promote_makes_a_standby_writable() {
    let primary = PgCluster::start();
    let standby = primary.start_standby();
    standby.promote();
    assert!(!standby.is_in_recovery());
    let mut c = standby.connect("test", "trust_user", None);
    c.batch_execute("CREATE TABLE after_promote (v int); INSERT INTO after_promote VALUES (1)")
        .expect("a write on the promoted standby");
    // Its timeline left the primary's: nothing flows back.
    assert_eq!(
        one(
            &primary,
            "test",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'after_promote'"
        )
        .as_deref(),
        Some("0")
    );
}

#[test]
fn pause_replay_stops_applying() {
    let primary = PgCluster::start();
    primary.sql("test", "CREATE TABLE paused (v int)");
    let standby = primary.start_standby();
    standby.wait_caught_up(&primary, CATCH_UP);

    standby.pause_replay();
    primary.sql("test", "INSERT INTO paused VALUES (1)");
    thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&standby, "paused"), 0, "replay is paused");
    assert!(standby.is_in_recovery());

    standby.resume_replay();
    standby.wait_caught_up(&primary, CATCH_UP);
    assert_eq!(count(&standby, "paused"), 1);
}

#[test]
fn freeze_hangs_the_server_and_thaw_resumes_it() {
    let pg = PgCluster::start();
    let mut before = pg.connect("test", "trust_user", None);

    pg.freeze();
    // A new connection: the kernel completes the TCP handshake, the
    // server never answers the startup packet; either it fails or it is
    // still waiting 3 s later.
    let mut config = pg.config("test", "trust_user", None);
    config.connect_timeout(Duration::from_secs(1));
    let (tx, connected) = mpsc::channel();
    let connecting = thread::spawn(move || {
        let _ = tx.send(config.connect(odissey_harness::postgres::NoTls).is_ok());
    });
    match connected.recv_timeout(Duration::from_secs(3)) {
        Ok(ok) => assert!(!ok, "a connection to a frozen server must not succeed"),
        Err(mpsc::RecvTimeoutError::Timeout) => {} // hangs, as a dead host would
        Err(e) => panic!("the connecting thread died: {e}"),
    }
    // An existing connection gets no answer either.
    let (tx, answered) = mpsc::channel();
    let querying = thread::spawn(move || {
        let ok = before.simple_query("SELECT 1").is_ok();
        let _ = tx.send(ok);
        before
    });
    assert!(
        answered.recv_timeout(Duration::from_secs(1)).is_err(),
        "a frozen server must not answer a query"
    );

    let thawed = Instant::now();
    pg.thaw();
    assert_eq!(
        answered.recv_timeout(Duration::from_secs(10)),
        Ok(true),
        "the query waiting on the frozen server is answered once it thaws"
    );
    let mut before = querying.join().expect("querying thread");
    before
        .simple_query("SELECT 1")
        .expect("the old connection works");
    connecting.join().expect("connecting thread");
    pg.connect("test", "trust_user", None);
    assert!(thawed.elapsed() < Duration::from_secs(10));
}

#[test]
fn drop_cleans_up_a_frozen_cluster() {
    let pg = PgCluster::start();
    let pid_file = pg.datadir().join("postmaster.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .expect("postmaster.pid")
        .lines()
        .next()
        .expect("a pid")
        .to_owned();
    let datadir = pg.datadir().to_owned();
    pg.freeze();
    drop(pg);
    assert!(!datadir.exists(), "{} left behind", datadir.display());
    // The postmaster exits (its zombie, if any, is reaped by its parent).
    let deadline = Instant::now() + Duration::from_secs(10);
    // A zombie's cmdline is empty.
    while std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()) {
        assert!(Instant::now() < deadline, "postmaster {pid} still runs");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stop_immediate_crashes_and_restart_recovers() {
    let pg = PgCluster::start();
    // Commits are asynchronous in these clusters: this one must survive.
    pg.sql(
        "test",
        "SET synchronous_commit = on; CREATE TABLE crash (v int); INSERT INTO crash VALUES (1)",
    );
    // This one may be lost, but the table is there after crash recovery.
    pg.sql("test", "INSERT INTO crash VALUES (2)");
    pg.stop_immediate();
    assert!(pg.try_connect("test", "trust_user", None).is_err());
    pg.restart();
    let n = count(&pg, "crash");
    assert!(n == 1 || n == 2, "{n} rows after crash recovery");
}

#[test]
fn an_old_primary_is_rebuilt_as_a_standby_of_the_promoted_one() {
    let mut old_primary = PgCluster::start();
    let old_port = old_primary.port();
    old_primary.sql(
        "test",
        "CREATE TABLE failover (v int); INSERT INTO failover VALUES (1)",
    );
    let new_primary = old_primary.start_standby();
    new_primary.wait_caught_up(&old_primary, CATCH_UP);

    old_primary.stop_immediate();
    new_primary.promote();
    new_primary.sql("test", "INSERT INTO failover VALUES (2)");

    old_primary.rebuild_as_standby_of(&new_primary);
    assert_eq!(old_primary.port(), old_port);
    assert!(old_primary.is_in_recovery());
    assert_eq!(count(&old_primary, "failover"), 2);

    new_primary.sql("test", "INSERT INTO failover VALUES (3)");
    old_primary.wait_caught_up(&new_primary, CATCH_UP);
    assert_eq!(count(&old_primary, "failover"), 3);
    let mut c = old_primary.connect("test", "trust_user", None);
    assert_eq!(
        sqlstate(
            c.batch_execute("INSERT INTO failover VALUES (0)"),
            "a write on the rebuilt standby"
        ),
        "25006"
    );
}

#[test]
fn a_running_primary_is_rebuilt_too() {
    // rebuild_as_standby_of stops a cluster that still runs (split brain
    // left behind by a failover).
    let mut a = PgCluster::start();
    let b = a.start_standby();
    b.promote();
    b.sql("test", "CREATE TABLE only_on_b (v int)");
    a.rebuild_as_standby_of(&b);
    assert_eq!(count(&a, "only_on_b"), 0);
}
