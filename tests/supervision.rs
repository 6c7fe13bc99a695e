//! A panic in one connection's state machine (forced through the
//! `ODISSEY_FAILPOINT_PANIC` test hook) closes that connection with an
//! error to its client; the worker and every other connection live on, and
//! nothing is leaked.

mod common;

use std::time::Duration;

use common::*;
use odissey_harness::{PgCluster, TRUST_USER};

const BOOM: &str = "SELECT 'odissey failpoint'";

#[test]
fn a_panic_costs_one_connection_not_the_worker() {
    let _w = watchdog("supervision", Duration::from_secs(60));
    // Read by the workers when they start.
    std::env::set_var("ODISSEY_FAILPOINT_PANIC", BOOM);
    let pg = PgCluster::start();
    // One worker, one server: a leaked slot would starve the next client.
    let route = Route::new("test", TRUST_USER)
        .transaction()
        .pool_size(1)
        .pool_timeout_ms(3000);
    let (h, port) = start_pooler(&Config::new(pg.port()).route(route).workers(1));
    let mut bystander = connect(port, "test", TRUST_USER, None);
    bystander.simple_query("SELECT 1").unwrap();

    let mut victim = connect(port, "test", TRUST_USER, None);
    let e = victim.simple_query(BOOM).unwrap_err();
    assert!(
        e.code().map(|c| c.code()) == Some("XX000") || e.is_closed(),
        "{}",
        describe(&e)
    );
    // The worker lives on: the other client, and new ones, are served by
    // the one server slot, which was given back.
    for _ in 0..3 {
        assert_eq!(
            bystander
                .query_one("SELECT 2", &[])
                .unwrap()
                .get::<_, i32>(0),
            2
        );
        let mut c = connect(port, "test", TRUST_USER, None);
        assert_eq!(c.query_one("SELECT 3", &[]).unwrap().get::<_, i32>(0), 3);
    }
    let ins = h.inspect().unwrap();
    let r = ins.route("test", TRUST_USER).unwrap();
    assert!(
        r.servers_active + r.servers_idle + r.servers_login <= 1,
        "{r:?}"
    );
    std::env::remove_var("ODISSEY_FAILPOINT_PANIC");
}
