//! Deadlines for one reactor thread.
//!
//! A binary heap ordered by deadline; cancelling removes the payload from a
//! map and leaves the heap entry to be skipped when it surfaces, which keeps
//! both operations O(log n) without a search. Cancelled entries are swept out
//! once they outnumber the live ones: a deadline set per connection and
//! cancelled a moment later (an auth timeout under connection churn) must
//! not pile up until it would have fired.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

/// Identifies one scheduled deadline; never reused within a reactor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(u64);

/// The deadlines of one reactor, each carrying a payload `T` for the handler.
#[derive(Debug)]
pub struct Timers<T> {
    heap: BinaryHeap<Reverse<(Instant, TimerId)>>,
    live: HashMap<TimerId, T>,
    next: u64,
}

impl<T> Default for Timers<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            live: HashMap::new(),
            next: 0,
        }
    }
}

impl<T> Timers<T> {
    /// Schedules `payload` to fire at `at`.
    pub fn schedule(&mut self, at: Instant, payload: T) -> TimerId {
        let id = TimerId(self.next);
        self.next += 1;
        self.heap.push(Reverse((at, id)));
        self.live.insert(id, payload);
        id
    }

    /// Cancels a deadline; a no-op when it already fired or was cancelled.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let payload = self.live.remove(&id);
        if self.heap.len() > 2 * self.live.len() + 1024 {
            // Amortized O(1): a sweep leaves at most half the entries dead.
            let live = &self.live;
            self.heap.retain(|Reverse((_, id))| live.contains_key(id));
        }
        payload
    }

    /// Number of live (not yet fired, not cancelled) deadlines.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// True when no deadline is pending.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// How long the poll may sleep: until the earliest live deadline.
    pub fn next_timeout(&mut self, now: Instant) -> Option<Duration> {
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if self.live.contains_key(&id) {
                return Some(at.saturating_duration_since(now));
            }
            self.heap.pop();
        }
        None
    }

    /// Removes and returns one deadline that is due at `now`, earliest first.
    pub fn pop_expired(&mut self, now: Instant) -> Option<(TimerId, T)> {
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if at > now {
                return None;
            }
            self.heap.pop();
            if let Some(payload) = self.live.remove(&id) {
                return Some((id, payload));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_deadline_order_and_skips_cancelled() {
        let mut t = Timers::default();
        let now = Instant::now();
        let a = t.schedule(now + Duration::from_millis(30), "a");
        t.schedule(now + Duration::from_millis(10), "b");
        let c = t.schedule(now + Duration::from_millis(20), "c");
        assert_eq!(t.cancel(c), Some("c"));
        assert_eq!(t.next_timeout(now), Some(Duration::from_millis(10)));
        assert!(t.pop_expired(now).is_none());
        let later = now + Duration::from_millis(40);
        assert_eq!(t.pop_expired(later).map(|x| x.1), Some("b"));
        assert_eq!(t.pop_expired(later), Some((a, "a")));
        assert!(t.pop_expired(later).is_none());
        assert!(t.is_empty());
        assert_eq!(t.next_timeout(later), None);
    }

    #[test]
    fn cancelled_deadlines_do_not_pile_up() {
        let mut t = Timers::default();
        let now = Instant::now();
        let keep = t.schedule(now + Duration::from_secs(60), 0);
        for i in 0..100_000 {
            let id = t.schedule(now + Duration::from_secs(10), i);
            t.cancel(id);
        }
        assert_eq!(t.len(), 1);
        assert!(
            t.heap.len() <= 2 + 1024 + 1,
            "{} entries kept",
            t.heap.len()
        );
        assert_eq!(
            t.pop_expired(now + Duration::from_secs(61)),
            Some((keep, 0))
        );
    }
}
