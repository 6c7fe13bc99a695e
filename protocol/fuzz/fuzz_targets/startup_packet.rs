//! `cargo +nightly fuzz run startup_packet`: see odissey_protocol::fuzzing::startup_packet.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| odissey_protocol::fuzzing::startup_packet(data));
