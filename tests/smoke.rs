//! The shortest end-to-end path: one PostgreSQL, one pooler, one client.

use odissey::ConfigSource;
use odissey_harness::PgCluster;

#[test]
fn a_query_goes_through_in_both_pool_modes() {
    let pg = PgCluster::start();
    for mode in ["session", "transaction"] {
        let cfg = format!(
            r#"
workers = 2
[[listen]]
host = "127.0.0.1"
port = 0
[storage.main]
type = "remote"
host = "127.0.0.1"
port = {}
[database.default.user.default]
authentication = "none"
storage = "main"
pool = "{mode}"
pool_size = 2
"#,
            pg.port()
        );
        let h = odissey::start(ConfigSource::Toml(cfg)).unwrap();
        let port = h.inspect().unwrap().tcp[0].port();
        let mut c = postgres::Client::connect(
            &format!("host=127.0.0.1 port={port} user=trust_user dbname=test"),
            postgres::NoTls,
        )
        .unwrap();
        let row = c.query_one("select $1::int + 1", &[&41i32]).unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
        let rows = c.simple_query("select 1; select 2").unwrap();
        let values: Vec<&str> = rows
            .iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => r.get(0),
                _ => None,
            })
            .collect();
        assert_eq!(values, ["1", "2"]);
        drop(c);
        h.shutdown(std::time::Duration::from_secs(1)).unwrap();
    }
}
