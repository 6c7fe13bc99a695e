//! `cargo +nightly fuzz run framing`: see odissey_protocol::fuzzing::framing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| odissey_protocol::fuzzing::framing(data));
