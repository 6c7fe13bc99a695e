//! Tests of the cluster harness itself.

use std::thread;
use std::time::Duration;

use odissey_harness::{pg_bin, PgCluster};

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
