//! A slab of state machines whose keys are protected against reuse.
//!
//! mio reports readiness by [`mio::Token`], which is the slot index; the
//! [`Key`] adds the slot's generation so that commands and deadlines aimed at
//! a machine that has since gone never reach its successor in the same slot.

use slab::Slab;

/// The address of one machine: slot index plus generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    index: u32,
    gen: u32,
}

impl Key {
    /// The mio token that the machine's socket is registered with.
    pub fn token(self) -> mio::Token {
        mio::Token(self.index as usize)
    }

    /// Packs the key into a u64, e.g. to carry it in a foreign message.
    pub fn to_u64(self) -> u64 {
        (u64::from(self.gen) << 32) | u64::from(self.index)
    }

    /// The inverse of [`Key::to_u64`].
    pub fn from_u64(v: u64) -> Self {
        Self {
            index: v as u32,
            gen: (v >> 32) as u32,
        }
    }
}

struct Slot<M> {
    gen: u32,
    machine: M,
}

/// Machines addressed by [`Key`].
pub struct Machines<M> {
    slab: Slab<Slot<M>>,
    next_gen: u32,
}

impl<M> Default for Machines<M> {
    fn default() -> Self {
        Self {
            slab: Slab::new(),
            next_gen: 1,
        }
    }
}

impl<M> Machines<M> {
    /// Stores a machine built from its own key (so it can register its
    /// socket with `key.token()`), and returns the key.
    pub fn insert_with(&mut self, build: impl FnOnce(Key) -> M) -> Key {
        let entry = self.slab.vacant_entry();
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        let key = Key {
            index: entry.key() as u32,
            gen,
        };
        entry.insert(Slot {
            gen,
            machine: build(key),
        });
        key
    }

    /// The key currently living at `token`'s slot, if any.
    pub fn key_of(&self, token: mio::Token) -> Option<Key> {
        self.slab.get(token.0).map(|s| Key {
            index: token.0 as u32,
            gen: s.gen,
        })
    }

    /// The machine at `key`, unless it has gone.
    pub fn get(&self, key: Key) -> Option<&M> {
        match self.slab.get(key.index as usize) {
            Some(s) if s.gen == key.gen => Some(&s.machine),
            _ => None,
        }
    }

    /// The machine at `key`, mutably, unless it has gone.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut M> {
        match self.slab.get_mut(key.index as usize) {
            Some(s) if s.gen == key.gen => Some(&mut s.machine),
            _ => None,
        }
    }

    /// Two distinct machines at once (e.g. a client and its server).
    pub fn get2_mut(&mut self, a: Key, b: Key) -> Option<(&mut M, &mut M)> {
        if a.index == b.index {
            return None; // slab would panic on aliasing slots
        }
        match self.slab.get2_mut(a.index as usize, b.index as usize) {
            Some((x, y)) if x.gen == a.gen && y.gen == b.gen => {
                Some((&mut x.machine, &mut y.machine))
            }
            _ => None,
        }
    }

    /// Removes the machine at `key`, unless it has gone already.
    pub fn remove(&mut self, key: Key) -> Option<M> {
        match self.slab.get(key.index as usize) {
            Some(s) if s.gen == key.gen => Some(self.slab.remove(key.index as usize).machine),
            _ => None,
        }
    }

    /// Number of machines.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Every live machine with its key.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &M)> {
        self.slab.iter().map(|(i, s)| {
            (
                Key {
                    index: i as u32,
                    gen: s.gen,
                },
                &s.machine,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_keys_miss_reused_slots() {
        let mut m = Machines::default();
        let a = m.insert_with(|_| "a");
        assert_eq!(m.get(a), Some(&"a"));
        assert_eq!(m.remove(a), Some("a"));
        let b = m.insert_with(|_| "b");
        assert_eq!(a.token(), b.token(), "slot is reused");
        assert_eq!(m.get(a), None);
        assert_eq!(m.remove(a), None);
        assert_eq!(m.get(b), Some(&"b"));
        assert_eq!(m.key_of(b.token()), Some(b));
        assert_eq!(Key::from_u64(b.to_u64()), b);
    }

    #[test]
    fn get2_mut_needs_two_live_distinct_keys() {
        let mut m = Machines::default();
        let a = m.insert_with(|_| 1);
        let b = m.insert_with(|_| 2);
        let (x, y) = m.get2_mut(a, b).expect("both live");
        std::mem::swap(x, y);
        assert_eq!(m.get(a), Some(&2));
        assert!(m.get2_mut(a, a).is_none());
        m.remove(b);
        assert!(m.get2_mut(a, b).is_none());
    }
}
