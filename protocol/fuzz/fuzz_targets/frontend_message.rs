//! `cargo +nightly fuzz run frontend_message`: see odissey_protocol::fuzzing::frontend_message.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| odissey_protocol::fuzzing::frontend_message(data));
