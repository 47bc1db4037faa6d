//! Connections closed both ways, remembered for a few seconds: baton's TIME-WAIT.
//!
//! Theory of operation: when both FINs are through and acknowledged the flow and its
//! host socket go away at once. The guest may still send a segment for it: a FIN it
//! retransmitted because our ACK of it waited for receive buffers (a full ring under
//! load: one flow in ten at 10,000 connections), or a late duplicate ACK. Without a
//! memory of the connection such a segment found no flow and was answered with a RST.
//! Here each closed connection leaves its final sequence numbers for [`LINGER`]; a
//! retransmitted FIN gets the ACK again, a bare ACK is ignored, a new SYN on the same
//! 4-tuple forgets the entry (the guest is the one that decides when to reuse a port).
//!
//! This is not a full TIME-WAIT: there is no host-side connection left to protect from
//! old duplicates (the host socket is closed; the kernel keeps its own TIME-WAIT), only
//! the guest to answer consistently. Bounded: at most [`MAX_ENTRIES`], the oldest
//! forgotten first; expired entries are purged as new ones come.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::seq::Seq;
use super::FlowKey;

/// How long a closed connection is remembered: long enough for a guest's FIN
/// retransmissions (its RTO, 200 ms and up, doubling), short enough not to matter.
pub const LINGER: Duration = Duration::from_secs(10);
/// Entries at most (about 100 bytes each).
pub const MAX_ENTRIES: usize = 32_768;

/// Where a closed connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedFlow {
    /// Our next sequence number (after our FIN).
    pub seq_to_guest: Seq,
    /// The guest's next sequence number (after its FIN).
    pub seq_from_guest: Seq,
}

#[derive(Debug, Default)]
pub struct ClosedFlows {
    entries: HashMap<FlowKey, (ClosedFlow, Instant)>,
    /// Insertion order with each entry's expiry, for purging. A key may appear more
    /// than once (closed, reopened, closed again): only the entry whose expiry matches
    /// is removed.
    order: VecDeque<(Instant, FlowKey)>,
}

impl ClosedFlows {
    /// Remember `key` as closed at `now`.
    pub fn insert(&mut self, key: FlowKey, flow: ClosedFlow, now: Instant) {
        self.purge(now);
        while self.entries.len() >= MAX_ENTRIES {
            if !self.pop_oldest() {
                break;
            }
        }
        let until = now + LINGER;
        self.entries.insert(key, (flow, until));
        self.order.push_back((until, key));
    }

    /// The closed connection `key`, if it closed less than [`LINGER`] ago.
    pub fn get(&self, key: &FlowKey, now: Instant) -> Option<ClosedFlow> {
        match self.entries.get(key) {
            Some(&(flow, until)) if until > now => Some(flow),
            _ => None,
        }
    }

    pub fn remove(&mut self, key: &FlowKey) {
        self.entries.remove(key);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn purge(&mut self, now: Instant) {
        while self.order.front().is_some_and(|&(until, _)| until <= now) {
            self.pop_oldest();
        }
    }

    /// Forget the oldest entry; `false` if there was none.
    fn pop_oldest(&mut self) -> bool {
        let Some((until, key)) = self.order.pop_front() else {
            return false;
        };
        if self.entries.get(&key).is_some_and(|&(_, u)| u == until) {
            self.entries.remove(&key);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn key(port: u16) -> FlowKey {
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        (a, port, b, 80)
    }

    const FLOW: ClosedFlow = ClosedFlow {
        seq_to_guest: Seq(100),
        seq_from_guest: Seq(200),
    };

    #[test]
    fn remembered_for_the_linger_time_only() {
        let now = Instant::now();
        let mut closed = ClosedFlows::default();
        closed.insert(key(1), FLOW, now);
        assert_eq!(closed.get(&key(1), now + LINGER / 2), Some(FLOW));
        assert_eq!(closed.get(&key(1), now + LINGER), None);
        assert_eq!(closed.get(&key(2), now), None);
        // Expired entries go when new ones come.
        closed.insert(key(2), FLOW, now + LINGER);
        assert_eq!(closed.len(), 1);
    }

    #[test]
    fn bounded_oldest_first() {
        let now = Instant::now();
        let mut closed = ClosedFlows::default();
        for i in 0..MAX_ENTRIES + 10 {
            closed.insert(key(i as u16), FLOW, now);
        }
        assert_eq!(closed.len(), MAX_ENTRIES);
        assert_eq!(closed.get(&key(0), now), None, "the oldest went first");
        assert!(closed.get(&key((MAX_ENTRIES + 9) as u16), now).is_some());
    }

    #[test]
    fn a_reopened_and_closed_key_keeps_its_newer_entry() {
        let now = Instant::now();
        let mut closed = ClosedFlows::default();
        closed.insert(key(1), FLOW, now);
        closed.remove(&key(1));
        let later = now + Duration::from_secs(5);
        closed.insert(key(1), FLOW, later);
        // The first insertion's expiry passes: the newer entry stays.
        closed.insert(key(2), FLOW, now + LINGER);
        assert_eq!(closed.get(&key(1), now + LINGER), Some(FLOW));
    }
}
