//! The driver side of a split virtqueue (virtio 1.x §2.7), in guest memory.
//!
//! Layout: descriptor table (16 bytes per entry), available ring (flags, idx, ring[],
//! used_event), used ring (flags, idx, ring[] of {id, len}, avail_event), each at the
//! guest-physical address given. Index updates are published with release/acquire
//! ordering, as a real driver does with memory barriers.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// One descriptor as the driver writes it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Driver state of one split virtqueue.
pub struct DriverQueue {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    avail_idx: u16,
    last_used: u16,
}

impl DriverQueue {
    /// A queue of `size` entries at `base` (needs `3 * 4096` bytes for size ≤ 256,
    /// `6 * 4096` for 1024).
    pub fn new(base: u64, size: u16) -> Self {
        let desc_bytes = 16 * u64::from(size);
        let avail_bytes = 6 + 2 * u64::from(size);
        let align = |v: u64| (v + 4095) & !4095;
        let desc_table = base;
        let avail_ring = align(desc_table + desc_bytes);
        let used_ring = align(avail_ring + avail_bytes);
        DriverQueue {
            size,
            desc_table,
            avail_ring,
            used_ring,
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Bytes of guest memory the queue occupies from its base.
    pub fn footprint(size: u16) -> u64 {
        let q = Self::new(0, size);
        let used_bytes = 6 + 8 * u64::from(size);
        (q.used_ring + used_bytes + 4095) & !4095
    }

    pub fn write_desc(&self, mem: &GuestMemoryMmap<()>, index: u16, desc: Desc) {
        let at = self.desc_table + 16 * u64::from(index);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&desc.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&desc.len.to_le_bytes());
        raw[12..14].copy_from_slice(&desc.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&desc.next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at))
            .expect("descriptor table in guest memory");
    }

    /// Make the chain starting at `head` available to the device.
    pub fn push_avail(&mut self, mem: &GuestMemoryMmap<()>, head: u16) {
        let slot = self.avail_ring + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.avail_ring + 2),
            Ordering::Release,
        )
        .expect("avail idx");
    }

    /// Ask for a notification on every new used entry (EVENT_IDX's `used_event`).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap<()>) {
        let at = self.avail_ring + 4 + 2 * u64::from(self.size);
        mem.write_obj(self.last_used.to_le(), GuestAddress(at))
            .expect("used_event");
    }

    /// Next entry the device put in the used ring: (descriptor head, bytes written).
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap<()>) -> Option<(u16, u32)> {
        let idx: u16 = mem
            .load(GuestAddress(self.used_ring + 2), Ordering::Acquire)
            .expect("used idx");
        if u16::from_le(idx) == self.last_used {
            return None;
        }
        let elem = self.used_ring + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = mem.read_obj(GuestAddress(elem)).expect("used elem id");
        let len: u32 = mem.read_obj(GuestAddress(elem + 4)).expect("used elem len");
        self.last_used = self.last_used.wrapping_add(1);
        self.set_used_event(mem);
        Some((u32::from_le(id) as u16, u32::from_le(len)))
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    pub fn last_used(&self) -> u16 {
        self.last_used
    }
}
