//! `cargo +nightly fuzz run scram_client`: see odissey_protocol::fuzzing::scram_client.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| odissey_protocol::fuzzing::scram_client(data));
