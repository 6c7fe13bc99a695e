//! A polled channel: `std::sync::mpsc` plus a shared [`mio::Waker`].
//!
//! Senders wake the reactor only when it is not already due to drain the
//! queue, so a burst of commands costs one wake-up (one eventfd write) rather
//! than one per command.
//!
//! Each channel counts what it carried ([`ChannelStats`]): the commands
//! received and the drains (wake-ups that found work), so the cost of
//! talking across threads can be measured per transaction. The counts are
//! kept by the receiving thread, added once per drain, and read by anyone.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

struct Shared {
    waker: mio::Waker,
    /// True while a wake-up is pending; the receiver clears it before draining.
    pending: AtomicBool,
    stats: Arc<ChannelStats>,
}

/// What one channel has carried since it was made. Written only by the
/// receiving thread (once per drain); read from any thread.
#[derive(Debug, Default)]
pub struct ChannelStats {
    received: AtomicU64,
    drains: AtomicU64,
}

impl ChannelStats {
    /// Commands taken off the queue so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Times the receiver was woken to drain the queue (a burst of
    /// commands sent while it was awake costs one).
    pub fn drains(&self) -> u64 {
        self.drains.load(Ordering::Relaxed)
    }
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

    /// The counts of the channel this sender feeds.
    pub fn stats(&self) -> Arc<ChannelStats> {
        Arc::clone(&self.shared.stats)
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
    pub fn drain(&self) -> Drain<'_, C> {
        self.shared.pending.store(false, Ordering::Release);
        let stats = &self.shared.stats;
        stats
            .drains
            .store(stats.drains.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        Drain {
            it: self.rx.try_iter(),
            stats,
            taken: 0,
        }
    }

    /// The counts of this channel.
    pub fn stats(&self) -> Arc<ChannelStats> {
        Arc::clone(&self.shared.stats)
    }
}

/// The commands queued when [`Receiver::drain`] was called, and those sent
/// while they are taken. Counts them once, when dropped (no atomic
/// operation per command).
pub struct Drain<'a, C> {
    it: mpsc::TryIter<'a, C>,
    stats: &'a ChannelStats,
    taken: u64,
}

impl<C> Iterator for Drain<'_, C> {
    type Item = C;

    fn next(&mut self) -> Option<C> {
        let c = self.it.next()?;
        self.taken += 1;
        Some(c)
    }
}

impl<C> Drop for Drain<'_, C> {
    fn drop(&mut self) {
        // Only the receiving thread writes the counts: a load and a store,
        // no read-modify-write.
        let r = &self.stats.received;
        r.store(r.load(Ordering::Relaxed) + self.taken, Ordering::Relaxed);
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
        stats: Arc::default(),
    });
    Ok((
        Sender {
            tx,
            shared: Arc::clone(&shared),
        },
        Receiver { rx, shared },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_counts_what_it_took_once() {
        let poll = mio::Poll::new().expect("poll");
        let (tx, rx) = channel::<u32>(poll.registry(), mio::Token(7)).expect("channel");
        for i in 0..3 {
            tx.send(i).expect("send");
        }
        let stats = tx.stats();
        assert_eq!((stats.received(), stats.drains()), (0, 0));
        let got: Vec<u32> = rx.drain().collect();
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!((stats.received(), stats.drains()), (3, 1));
        // A drain that finds nothing still counts as a wake-up.
        assert_eq!(rx.drain().count(), 0);
        assert_eq!((rx.stats().received(), rx.stats().drains()), (3, 2));
    }
}
