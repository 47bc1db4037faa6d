//! Frames towards the guest: writing into the receive queue.
//!
//! Each frame is preceded by a 12-byte `virtio_net_hdr_v1` and `num_buffers` = the number
//! of descriptor chains the frame spans. baton builds every frame with complete, correct
//! checksums, so the only flag it ever sets is `DATA_VALID`, on every frame, when the
//! driver negotiated `VIRTIO_NET_F_GUEST_CSUM`: the guest then skips verifying them
//! (under TCG, summing each 64 KiB frame again costs the guest's CPU, which bounds the
//! throughput). Without GUEST_CSUM the flags stay zero, as the virtio 1.x spec asks.
//! Never `NEEDS_CSUM`: no frame leaves baton with a partial checksum. With MRG_RXBUF a
//! frame may span several chains (Linux posts page-sized buffers, frames can be 64 KiB);
//! without it one chain must hold the whole frame. When the guest has not posted enough
//! buffers the frame is dropped and the popped chains are given back (the queue's
//! next-avail index is rewound), so no buffer is lost.
//!
//! All writes go through `virtio_queue::Writer` and `add_used`, which mark the written
//! guest pages dirty in QEMU's migration log.

use std::io::Write;

use tracing::{debug, trace};
use vhost_user_backend::VringT;
use virtio_queue::{QueueOwnedT, QueueT, Writer};
use vm_memory::GuestAddressSpace;

use super::device::{GuestMem, Vring};
use super::{FrameSink, VIRTIO_NET_HDR_F_DATA_VALID, VNET_HDR_LEN};

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// A [`FrameSink`] that writes into the guest's receive queue.
pub struct RxQueueSink<'a> {
    vring: &'a Vring,
    mem: &'a GuestMem,
    mrg_rxbuf: bool,
    /// `virtio_net_hdr_v1.flags` of every frame.
    header_flags: u8,
    /// Something was put in the used ring: the guest may need a notification.
    used_any: bool,
    /// Frames dropped for lack of buffers during this sink's life.
    pub dropped: u64,
    /// The guest's avail index when the last frame was dropped.
    avail_at_drop: Option<u16>,
}

impl<'a> RxQueueSink<'a> {
    /// A sink into `vring`; `mrg_rxbuf` and `guest_csum`: the driver negotiated
    /// `VIRTIO_NET_F_MRG_RXBUF` and `VIRTIO_NET_F_GUEST_CSUM`.
    pub fn new(vring: &'a Vring, mem: &'a GuestMem, mrg_rxbuf: bool, guest_csum: bool) -> Self {
        RxQueueSink {
            vring,
            mem,
            mrg_rxbuf,
            header_flags: if guest_csum {
                VIRTIO_NET_HDR_F_DATA_VALID
            } else {
                0
            },
            used_any: false,
            dropped: 0,
            avail_at_drop: None,
        }
    }

    /// Notify the guest if anything was delivered (respecting EVENT_IDX suppression).
    ///
    /// If a frame was dropped for lack of buffers, ask the guest to kick the receive
    /// queue as soon as it posts more. baton never does so otherwise: with EVENT_IDX
    /// the guest kicks only when its avail index passes the `avail_event` the device
    /// published, and a device that never publishes one gets (almost) no RX kicks — the
    /// engine would only retry on its next socket event or timer, which is what made
    /// transfers stall for a retransmission timeout. Returns `true` when buffers
    /// arrived while notifications were being re-enabled: the caller retries at once,
    /// since that guest will not kick for them.
    pub fn finish(self) -> bool {
        if self.used_any {
            let needs = self.vring.needs_notification().unwrap_or(true);
            if needs {
                if let Err(e) = self.vring.signal_used_queue() {
                    debug!("receive queue: notifying the guest failed: {e}");
                }
            }
        }
        if self.dropped == 0 {
            return false;
        }
        debug!(
            "receive queue: {} frame(s) dropped for lack of buffers",
            self.dropped
        );
        let before = self.avail_at_drop;
        if let Err(e) = self.vring.enable_notification() {
            debug!("receive queue: enabling notifications failed: {e}");
            return false;
        }
        // `enable_notification`'s own answer compares with the next-avail index, which
        // the dropped frame rewound; what matters is whether the guest added buffers
        // since the drop.
        let now = avail_idx(self.vring, self.mem);
        matches!((before, now), (Some(b), Some(n)) if b != n)
    }
}

impl FrameSink for RxQueueSink<'_> {
    fn send_frame(&mut self, frame: &[u8]) -> bool {
        let delivered = write_frame(
            self.vring,
            self.mem,
            self.mrg_rxbuf,
            self.header_flags,
            frame,
        );
        if delivered {
            self.used_any = true;
        } else {
            self.dropped += 1;
            self.avail_at_drop = avail_idx(self.vring, self.mem);
        }
        delivered
    }
}

/// The guest's current avail index of `vring`, if the ring is set up.
fn avail_idx(vring: &Vring, mem: &GuestMem) -> Option<u16> {
    let mem = mem.memory();
    let state = vring.get_ref();
    state
        .get_queue()
        .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
        .ok()
        .map(|idx| idx.0)
}

fn write_frame(
    vring: &Vring,
    mem: &GuestMem,
    mrg_rxbuf: bool,
    header_flags: u8,
    frame: &[u8],
) -> bool {
    let mem = mem.memory();
    let mut state = vring.get_mut();
    if !state.get_queue().ready() || !state.is_enabled() {
        trace!("receive queue not ready: frame dropped");
        return false;
    }
    let total = VNET_HDR_LEN + frame.len();
    let mut chains = Vec::new();
    let mut capacity = 0usize;
    {
        let queue = state.get_queue_mut();
        while capacity < total {
            let Some(chain) = queue.pop_descriptor_chain(mem.clone()) else {
                break;
            };
            let head = chain.head_index();
            if let Err(why) = super::check_chain(&chain, true) {
                debug!("receive queue: chain {head} returned unused: {why}");
                let _ = queue.add_used(&*mem, head, 0);
                continue;
            }
            match Writer::new(&*mem, chain) {
                Ok(writer) => {
                    capacity += writer.available_bytes();
                    chains.push((head, writer));
                }
                Err(e) => {
                    // A malformed chain: hand it back used with nothing written, so the
                    // guest gets it back, and keep looking.
                    debug!("receive queue: bad descriptor chain {head}: {e}");
                    let _ = queue.add_used(&*mem, head, 0);
                    continue;
                }
            }
            if !mrg_rxbuf {
                break;
            }
        }
        if capacity < total {
            for _ in 0..chains.len() {
                queue.go_to_previous_position();
            }
            trace!("receive queue: {capacity} bytes of buffers for a {total}-byte frame");
            return false;
        }
    }

    let mut header = [0u8; VNET_HDR_LEN];
    header[0] = header_flags;
    let num_buffers = chains.len() as u16;
    header[NUM_BUFFERS_OFFSET..].copy_from_slice(&num_buffers.to_le_bytes());
    let mut parts: [&[u8]; 2] = [&header, frame];
    for (head, mut writer) in chains {
        let mut written = 0usize;
        for part in parts.iter_mut() {
            let n = part.len().min(writer.available_bytes());
            if n == 0 {
                continue;
            }
            if let Err(e) = writer.write_all(&part[..n]) {
                debug!("receive queue: writing chain {head}: {e}");
                break;
            }
            written += n;
            *part = &part[n..];
        }
        if let Err(e) = state.get_queue_mut().add_used(&*mem, head, written as u32) {
            debug!("receive queue: add_used({head}): {e}");
        }
    }
    true
}
