//! The flow table: a bounded slab of flows with O(1) lookup by key and by id.
//!
//! Theory of operation: every guest flow a protocol module tracks (TCP connections now,
//! UDP flows later) lives in a [`FlowTable`]. A flow is stored in a slot of a `Vec`;
//! its [`FlowId`] is the slot index plus the slot's *generation*, bumped each time the
//! slot is freed, so a stale id (an epoll event that was already queued for a socket
//! closed in the same round, a timer entry of a flow that is gone) never reaches the
//! flow that reuses the slot. Lookups:
//!
//! ```text
//!   guest 4-tuple ──HashMap──▶ FlowId ──slot index + generation──▶ flow
//!   host socket ── epoll event data (owner tag | FlowId) ───────────┘
//! ```
//!
//! The table never grows beyond its capacity (fixed at creation; baton's default is
//! [`DEFAULT_MAX_FLOWS`]): [`FlowTable::insert`] returns [`FlowTableFull`] and the
//! caller refuses the flow (a TCP SYN gets a RST) and logs it, rate-limited. Freed
//! slots are reused from a free list, so insertion and removal are O(1).

use std::collections::HashMap;
use std::hash::Hash;

/// Default bound on the number of flows of one table.
pub const DEFAULT_MAX_FLOWS: usize = 131_072;

/// Largest capacity a table accepts (ids must fit the epoll event data).
pub const MAX_CAPACITY: usize = 1 << 24;

/// A flow's identity: slot index and the slot's generation at insertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId {
    index: u32,
    generation: u16,
}

impl FlowId {
    /// As 40 bits: generation above the 24-bit index.
    pub fn to_bits(self) -> u64 {
        (u64::from(self.generation) << 24) | u64::from(self.index)
    }

    /// The inverse of [`FlowId::to_bits`] (upper bits ignored).
    pub fn from_bits(bits: u64) -> Self {
        FlowId {
            index: (bits & 0xff_ffff) as u32,
            generation: ((bits >> 24) & 0xffff) as u16,
        }
    }

    /// The slot index (for logs).
    pub fn index(self) -> u32 {
        self.index
    }
}

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "flow {}.{}", self.index, self.generation)
    }
}

/// The table is at its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("flow table full ({capacity} flows)")]
pub struct FlowTableFull {
    pub capacity: usize,
}

#[derive(Debug)]
struct Slot<K, T> {
    generation: u16,
    entry: Option<(K, T)>,
}

/// A bounded table of flows of type `T`, keyed by `K` (the guest-side tuple).
#[derive(Debug)]
pub struct FlowTable<K, T> {
    slots: Vec<Slot<K, T>>,
    free: Vec<u32>,
    by_key: HashMap<K, FlowId>,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, T> FlowTable<K, T> {
    /// An empty table holding at most `capacity` flows (clamped to 1..=[`MAX_CAPACITY`]).
    pub fn new(capacity: usize) -> Self {
        FlowTable {
            slots: Vec::new(),
            free: Vec::new(),
            by_key: HashMap::new(),
            capacity: capacity.clamp(1, MAX_CAPACITY),
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Add a flow. The key must not be present (check with [`FlowTable::lookup`]); a
    /// duplicate replaces the key's mapping but not the old flow.
    pub fn insert(&mut self, key: K, value: T) -> Result<FlowId, FlowTableFull> {
        if self.len() >= self.capacity {
            return Err(FlowTableFull {
                capacity: self.capacity,
            });
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = u32::try_from(self.slots.len()).map_err(|_| FlowTableFull {
                    capacity: self.capacity,
                })?;
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                index
            }
        };
        let Some(slot) = self.slots.get_mut(index as usize) else {
            return Err(FlowTableFull {
                capacity: self.capacity,
            });
        };
        slot.entry = Some((key.clone(), value));
        let id = FlowId {
            index,
            generation: slot.generation,
        };
        self.by_key.insert(key, id);
        Ok(id)
    }

    /// The flow with this guest-side key.
    pub fn lookup(&self, key: &K) -> Option<FlowId> {
        self.by_key.get(key).copied()
    }

    pub fn get(&self, id: FlowId) -> Option<&T> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.entry.as_ref().map(|(_, value)| value)
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut T> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.entry.as_mut().map(|(_, value)| value)
    }

    /// Remove a flow; its id (and any copy of it) is dead from now on.
    pub fn remove(&mut self, id: FlowId) -> Option<T> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let (key, value) = slot.entry.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        if self.by_key.get(&key) == Some(&id) {
            self.by_key.remove(&key);
        }
        self.free.push(id.index);
        Some(value)
    }

    /// Every live flow id (for shutdown and migration), in slot order: a walk over many
    /// flows then touches memory in order (the key map's order scattered 10,000 flows
    /// over the cache at SAVE).
    pub fn ids(&self) -> Vec<FlowId> {
        let mut ids = Vec::with_capacity(self.len());
        ids.extend(self.slots.iter().zip(0u32..).filter_map(|(slot, index)| {
            slot.entry.as_ref().map(|_| FlowId {
                index,
                generation: slot.generation,
            })
        }));
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_remove() {
        let mut table = FlowTable::new(4);
        let a = table.insert("a", 1).expect("room");
        let b = table.insert("b", 2).expect("room");
        assert_eq!(table.lookup(&"a"), Some(a));
        assert_eq!(table.get(b), Some(&2));
        *table.get_mut(a).expect("a") += 10;
        assert_eq!(table.remove(a), Some(11));
        assert_eq!(table.lookup(&"a"), None);
        assert_eq!(table.get(a), None);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn stale_ids_do_not_reach_a_reused_slot() {
        let mut table = FlowTable::new(1);
        let old = table.insert(1u32, "old").expect("room");
        table.remove(old);
        let new = table.insert(2u32, "new").expect("room");
        assert_eq!(old.index(), new.index(), "the slot is reused");
        assert_eq!(table.get(old), None);
        assert_eq!(table.remove(old), None);
        assert_eq!(table.get(new), Some(&"new"));
    }

    #[test]
    fn refuses_flows_beyond_capacity_and_recovers() {
        let mut table = FlowTable::new(100_000);
        let ids: Vec<FlowId> = (0..100_000u32)
            .map(|k| table.insert(k, k).expect("room"))
            .collect();
        assert_eq!(
            table.insert(100_000, 0),
            Err(FlowTableFull { capacity: 100_000 })
        );
        table.remove(ids[500]);
        let id = table.insert(100_000, 7).expect("room after removal");
        assert_eq!(table.lookup(&100_000), Some(id));
        assert_eq!(table.len(), 100_000);
    }

    #[test]
    fn ids_survive_the_epoll_encoding() {
        let mut table = FlowTable::new(8);
        for k in 0..5u8 {
            let id = table.insert(k, ()).expect("room");
            table.remove(id);
        }
        let id = table.insert(9, ()).expect("room");
        assert_eq!(FlowId::from_bits(id.to_bits()), id);
        assert!(id.to_bits() < 1 << 40);
    }
}
