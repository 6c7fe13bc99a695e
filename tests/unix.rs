//! Unix-domain sockets on both legs: clients connect to a socket odissey
//! listens on, and odissey reaches PostgreSQL through its socket directory.

mod common;

use common::*;

#[test]
fn unix_socket_listener_and_storage() {
    let pg = PgCluster::start();
    let dir = tempfile::tempdir().unwrap();
    // libpq and rust-postgres look for <dir>/.s.PGSQL.<port>.
    let socket = dir.path().join(".s.PGSQL.7432");
    let toml = Config::new(pg.port())
        .route(Route::new("test", "trust_user").transaction().pool_size(1))
        .toml()
        .replace(
            "[[listen]]\nhost = \"127.0.0.1\"\nport = 0",
            &format!("[[listen]]\nunix_socket = \"{}\"", socket.display()),
        )
        .replace(
            "[storage.main]\ntype = \"remote\"\nhost = \"127.0.0.1\"",
            &format!(
                "[storage.main]\ntype = \"remote\"\nunix_socket_dir = \"{}\"",
                pg.datadir().display()
            ),
        );
    let handle = odissey::start(ConfigSource::Toml(toml)).expect("start");
    assert_eq!(handle.inspect().unwrap().unix, vec![socket.clone()]);
    let mut c = postgres::Config::new()
        .host_path(dir.path())
        .port(7432)
        .user("trust_user")
        .dbname("test")
        .connect(NoTls)
        .expect("connect through the unix socket");
    let row = c
        .query_one(
            "select client_addr is null from pg_stat_activity where pid = pg_backend_pid()",
            &[],
        )
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "the server connection should be a unix socket too"
    );
    drop(c);
    handle.shutdown(std::time::Duration::from_secs(1)).unwrap();
    assert!(!socket.exists(), "the socket file is removed at shutdown");
}
