//! The event loop of odissey: one [`mio::Poll`] per thread.
//!
//! A [`Reactor`] waits for readiness, commands and deadlines, and hands each to
//! its [`Handler`]: socket readiness by token, commands that other threads sent
//! through the polled [`channel`], and expired [`timer`]s. The handler keeps
//! its state machines in a [`Machines`] slab whose keys carry a generation, so
//! a stale token or deadline never reaches a slot that has been reused.
//!
//! The reactor knows nothing about PostgreSQL; it is the part of mio-extras
//! (pollable channel, timers) that mio 1.x lacks, plus the dispatch loop.

pub mod channel;
pub mod machines;
pub mod reactor;
pub mod timer;

pub use channel::{ChannelStats, Receiver, SendError, Sender};
pub use machines::{Key, Machines};
pub use reactor::{Context, Handler, Reactor, Ready, TestLoop, WAKER_TOKEN};
pub use timer::{TimerId, Timers};

pub use mio::{Interest, Registry, Token};
