//! Real drivers other than rust-postgres through transaction pooling.
//! psycopg 3 (installed by `.ci/run` from PyPI) must be present: the test
//! fails, it does not skip, when it is missing.

mod common;

use std::process::Command;

use common::*;

#[test]
fn psycopg3_prepared_statements_and_pipeline_mode() {
    let have = Command::new("python3")
        .args(["-c", "import psycopg"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have,
        "psycopg 3 is missing: install it with `python3 -m pip install 'psycopg[binary]'` (.ci/run does)"
    );
    let pg = PgCluster::start();
    let config =
        Config::new(pg.port()).route(Route::new("test", "trust_user").transaction().pool_size(2));
    let (_handle, port) = start_pooler(&config);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/drivers/psycopg_check.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "psycopg through odissey failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
