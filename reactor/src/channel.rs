//! A polled channel: `std::sync::mpsc` plus a shared [`mio::Waker`].
//!
//! Senders wake the reactor only when it is not already due to drain the
//! queue, so a burst of commands costs one wake-up (one eventfd write) rather
//! than one per command.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

struct Shared {
    waker: mio::Waker,
    /// True while a wake-up is pending; the receiver clears it before draining.
    pending: AtomicBool,
}

/// The sending half; cheap to clone, usable from any thread.
pub struct Sender<C> {
    tx: mpsc::Sender<C>,
    shared: Arc<Shared>,
}

impl<C> Clone for Sender<C> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C> fmt::Debug for Sender<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sender")
    }
}

/// The command could not be delivered: the reactor is gone.
pub struct SendError<C>(pub C);

impl<C> fmt::Debug for SendError<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SendError(..)")
    }
}

impl<C> fmt::Display for SendError<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the reactor thread has stopped")
    }
}

impl<C> std::error::Error for SendError<C> {}

impl<C> Sender<C> {
    /// Queues `cmd` and wakes the reactor if it is not already due to drain.
    pub fn send(&self, cmd: C) -> Result<(), SendError<C>> {
        self.tx.send(cmd).map_err(|e| SendError(e.0))?;
        if !self.shared.pending.swap(true, Ordering::AcqRel) {
            // A failed wake means the poll is gone; the send itself succeeded
            // into a queue nobody will read, which the next send reports.
            let _ = self.shared.waker.wake();
        }
        Ok(())
    }
}

/// The receiving half, owned by the reactor.
pub struct Receiver<C> {
    rx: mpsc::Receiver<C>,
    shared: Arc<Shared>,
}

impl<C> Receiver<C> {
    /// Called when the waker's token fires: re-arms the wake-up, then takes
    /// everything queued (several wake-ups may have arrived as one event).
    pub fn drain(&self) -> impl Iterator<Item = C> + '_ {
        self.shared.pending.store(false, Ordering::Release);
        self.rx.try_iter()
    }
}

/// Creates a channel whose receiver is polled on `token` of `registry`.
pub fn channel<C>(
    registry: &mio::Registry,
    token: mio::Token,
) -> std::io::Result<(Sender<C>, Receiver<C>)> {
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        waker: mio::Waker::new(registry, token)?,
        pending: AtomicBool::new(false),
    });
    Ok((
        Sender {
            tx,
            shared: Arc::clone(&shared),
        },
        Receiver { rx, shared },
    ))
}
