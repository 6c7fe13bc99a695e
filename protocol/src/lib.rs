//! PostgreSQL frontend/backend protocol v3, sans-IO.
//!
//! Everything here works on byte buffers: parsers take `&mut BytesMut` (or a
//! frame body) and return `Ok(None)` while a message is incomplete, builders
//! append complete messages to a `BytesMut`. No sockets, no clocks, so the
//! pooler's event loop decides when bytes move and the code is testable in
//! memory.

pub mod backend;
pub mod codec;
pub mod error;
pub mod frontend;
#[doc(hidden)]
pub mod fuzzing;
pub mod md5;
pub mod scram;

mod util;

pub use codec::{
    peek_header, read_frame, read_startup, Frame, Startup, DEFAULT_MAX_MESSAGE_LEN, MAX_STARTUP_LEN,
};
pub use error::{Error, Result};

#[cfg(test)]
mod fuzz_tests;
