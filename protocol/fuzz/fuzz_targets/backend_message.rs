//! `cargo +nightly fuzz run backend_message`: see odissey_protocol::fuzzing::backend_message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| odissey_protocol::fuzzing::backend_message(data));
