//! `cargo +nightly fuzz run scram_server`: see odissey_protocol::fuzzing::scram_server.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| odissey_protocol::fuzzing::scram_server(data));
