//! The vhost-user-net device.
//!
//! Theory of operation:
//! * QEMU is the vhost-user frontend; it owns the virtio-net device model (config space,
//!   control queue) and hands baton one queue pair: ring 0 is the guest's receive queue
//!   (RX, frames *to* the guest), ring 1 its transmit queue (TX, frames *from* the guest).
//! * [`device::NetBackend`] implements `vhost_user_backend::VhostUserBackend`. One worker
//!   thread serves both rings plus the network engine's epoll fd: a TX kick drains the
//!   transmit queue into [`NetworkEngine::handle_frame`]; an RX kick (fresh buffers) and a
//!   readable engine fd run [`NetworkEngine::handle_host_events`]. Frames for the guest are
//!   written into RX buffers by [`rx::RxQueueSink`].
//! * Checksum offload, the only offload baton offers (under TCG the guest's CPU bounds
//!   throughput, and summing every 64 KiB frame is part of its work; from the guest it
//!   about doubled the VM bench's rate):
//!   - `VIRTIO_NET_F_GUEST_CSUM` (towards the guest): baton's frames always carry complete,
//!     correct checksums, so when the driver negotiated it every frame is marked
//!     `DATA_VALID` and the guest does not verify them again ([`rx`]).
//!   - `VIRTIO_NET_F_CSUM` (from the guest): the driver may leave a TCP or UDP checksum
//!     partial (`NEEDS_CSUM` with `csum_start`/`csum_offset`). The device would have to
//!     complete it only if the frame went on as it is; baton never forwards a guest frame
//!     (it writes the payload into a host socket), so the checksum is simply not verified.
//!     [`tx`] passes the header's claim on as [`TxChecksum`]; the engine checks that the
//!     offsets name the frame's L4 checksum field and drops the frame otherwise.
//! * Every write into guest memory goes through paths that mark the pages dirty in QEMU's
//!   log (`virtio_queue::Writer`, `add_used`), so live migration sees every RX write.
//! * A vhost-user connection gets a fresh `VhostUserDaemon` (the crates cannot reuse one);
//!   the network engine with its host sockets lives outside it ([`serve`]), so a QEMU that
//!   reconnects finds its flows intact.
//! * Device-state migration (`SET_DEVICE_STATE_FD`, `CHECK_DEVICE_STATE`) runs on a
//!   thread of its own ([`crate::migrate`]); the engine's part goes through
//!   [`NetworkEngine::save_state`] / [`NetworkEngine::load_state`].
//! * Handlers never return `Err` to the library for trouble caused by the guest or by a
//!   ring that is not ready yet: an `Err` from `handle_event` kills the worker thread for
//!   good. Such trouble is logged (rate-limited) instead.

pub mod device;
pub mod rx;
pub mod serve;
pub mod tx;

use std::os::fd::BorrowedFd;

pub use crate::migrate::{EngineState, EngineStateError, SaveMode};
pub use crate::net::FrameSink;

/// What the device needs from the network side. `GuestNet` implements it; tests can
/// plug in doubles.
pub trait NetworkEngine: Send {
    /// One Ethernet frame the guest transmitted (virtio-net header already removed;
    /// `checksum` is what that header said about the frame's L4 checksum).
    fn handle_frame(&mut self, frame: &[u8], checksum: TxChecksum, sink: &mut dyn FrameSink);
    /// The engine's host sockets (or timers) have something to do.
    fn handle_host_events(&mut self, sink: &mut dyn FrameSink);
    /// A pollable fd that becomes readable when `handle_host_events` has work.
    fn poll_fd(&self) -> BorrowedFd<'_>;

    /// Migration SAVE (device stopped): the engine's part of the device state. In
    /// [`SaveMode::Migration`] TCP connections are frozen first; in
    /// [`SaveMode::Snapshot`] they are left alone. `prefix` gets the state without its
    /// flows (MAC, MTU, source, guest, forwards) before anything is frozen, to write the
    /// stream's first records (see `migrate::save`). Engines without state to migrate
    /// refuse, which fails the migration cleanly.
    fn save_state(
        &mut self,
        mode: SaveMode,
        prefix: &mut dyn FnMut(&EngineState) -> std::io::Result<()>,
    ) -> Result<EngineState, EngineStateError> {
        let _ = (mode, prefix);
        Err(EngineStateError::Unsupported)
    }

    /// Migration LOAD: adopt a state that was read and validated completely. All or
    /// nothing: on `Err` the engine must be as before. Must not touch guest memory (the
    /// rings start later).
    fn load_state(&mut self, state: EngineState) -> Result<(), EngineStateError> {
        let _ = state;
        Err(EngineStateError::Unsupported)
    }

    /// The rings run (again) on this connection: the first ring event after the
    /// connection came up, or after `GET_VRING_BASE` stopped the rings. QEMU starts
    /// them only for a VM that runs here, so a migration source whose VM resumed (the
    /// migration failed or was cancelled) thaws its frozen connections now — also those
    /// of a guest that has nothing to send. Returns `false` to be asked again at the
    /// next ring event (a handover to a target is under way).
    fn rings_started(&mut self) -> bool {
        true
    }

    /// TCP connections frozen by a migration SAVE and still held here, not taken by a
    /// target (the source's linger decides their end, see [`serve`]).
    fn frozen_tcp_flows(&mut self) -> usize {
        0
    }

    /// `LOG_ALL` on (a migration starts, the VM still runs): start a pre-dump pass
    /// ([`crate::predump`]). Returns its number, or `None` if this engine has nothing
    /// to pre-dump.
    fn pre_dump_begin(&mut self) -> Option<u64> {
        None
    }

    /// One chunk of pre-dump pass `number` (called with the engine lock held, released
    /// between chunks).
    fn pre_dump_step(&mut self, number: u64) -> crate::predump::Step {
        let _ = number;
        crate::predump::Step::Done
    }

    /// No helper came for pass `number`: stop it.
    fn pre_dump_abandon(&mut self, number: u64) {
        let _ = number;
    }

    /// After a pre-dump request failed as a whole: take the fresh helper and thaw the
    /// sockets of that request.
    fn pre_dump_recover(&mut self) {}

    /// `LOG_ALL` off: the migration was cancelled; drop the pre-dumps.
    fn pre_dump_cancel(&mut self) {}

    /// End of a migration on the source: close every frozen connection without a FIN
    /// or RST (those a same-host target took are left to it). Returns how many.
    fn close_frozen_silently(&mut self) -> usize {
        0
    }
}

/// Check a descriptor chain the guest offered before using it: it must end (a loop or a
/// `next` index outside the table makes virtio-queue stop early, which would silently cut
/// the frame), and every descriptor must point the right way (`device_writes` for receive
/// buffers, read-only for transmit). virtio-queue itself bounds the walk to the queue size.
pub fn check_chain<M>(
    chain: &virtio_queue::DescriptorChain<M>,
    device_writes: bool,
) -> Result<(), &'static str>
where
    M: std::ops::Deref + Clone,
    M::Target: vm_memory::GuestMemory,
{
    let mut count = 0usize;
    let mut ends = false;
    for desc in chain.clone() {
        if desc.is_write_only() != device_writes {
            return Err(if device_writes {
                "read-only descriptor in a receive chain"
            } else {
                "device-writable descriptor in a transmit chain"
            });
        }
        count += 1;
        ends = !desc.has_next();
    }
    if count == 0 {
        return Err("empty or unreadable chain");
    }
    if !ends {
        return Err("chain does not end (a loop, or a next index outside the table)");
    }
    Ok(())
}

/// What a transmitted frame's virtio-net header says about its L4 checksum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TxChecksum {
    /// The checksums are complete: verify them (no `NEEDS_CSUM`, or `VIRTIO_NET_F_CSUM`
    /// was not negotiated, in which case the flag means nothing).
    #[default]
    Complete,
    /// `NEEDS_CSUM`: the checksum field at `start + offset` (bytes from the start of the
    /// Ethernet frame) holds only the pseudo-header sum; the sum over `start..` is left
    /// to the device. The offsets are the guest's, not checked yet.
    Partial { start: u16, offset: u16 },
}

/// `virtio_net_hdr_v1.flags`: the checksum is partial (`csum_start`, `csum_offset`).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr_v1.flags`: the device has validated the checksum (towards the guest).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;

/// Size of `struct virtio_net_hdr_v1` (VERSION_1 always uses it, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame baton accepts from or builds for the guest: the 65520-byte MTU
/// plus the Ethernet header (no VLAN tags: QEMU's device does not pass them to us).
pub const MAX_FRAME_LEN: usize = 65520 + 14;
/// Queue size limit: QEMU allows up to 1024 for vhost-user rx/tx queues; SET_VRING_NUM
/// beyond `max_queue_size` would drop the connection.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Ring indices.
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const NUM_QUEUES: usize = 2;
/// Worker epoll token of the engine's fd (tokens `0..=NUM_QUEUES` belong to the library).
pub const ENGINE_EVENT: u16 = NUM_QUEUES as u16 + 1;
