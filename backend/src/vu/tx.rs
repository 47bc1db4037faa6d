//! Frames from the guest: draining the transmit queue.
//!
//! Each chain holds a 12-byte `virtio_net_hdr_v1` followed by one Ethernet frame. The only
//! offload baton offers the driver is `VIRTIO_NET_F_CSUM`, so of the header only the
//! checksum fields matter: with CSUM negotiated, `NEEDS_CSUM` and its
//! `csum_start`/`csum_offset` become a [`TxChecksum::Partial`] for the engine, which
//! validates the offsets against the frame (they are the guest's word, like everything
//! else here). Without CSUM the flag is ignored and the checksum is verified as usual.
//! `DATA_VALID` is ignored too: the virtio spec forbids drivers to set it on transmit, so
//! it vouches for nothing. GSO fields are ignored (no GSO feature is offered; a frame is
//! never larger than [`MAX_FRAME_LEN`] anyway). Chains are untrusted: a chain that is
//! malformed (bad addresses, loops, writable descriptors), too short or too long is
//! logged and returned to the guest, and draining goes on.

use std::io::Read;

use tracing::debug;
use vhost_user_backend::VringT;
use virtio_queue::{QueueT, Reader};
use vm_memory::GuestAddressSpace;

use super::device::{GuestMem, Vring};
use super::{TxChecksum, MAX_FRAME_LEN, VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_LEN};

/// Offsets of `csum_start` and `csum_offset` in `virtio_net_hdr_v1` (little endian).
const CSUM_START_OFFSET: usize = 6;
const CSUM_OFFSET_OFFSET: usize = 8;

/// What the header `hdr` says about its frame's checksum; `csum_offload`: the driver
/// negotiated `VIRTIO_NET_F_CSUM`.
pub fn header_checksum(hdr: &[u8; VNET_HDR_LEN], csum_offload: bool) -> TxChecksum {
    if !csum_offload || hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM == 0 {
        return TxChecksum::Complete;
    }
    let field = |at: usize| u16::from_le_bytes([hdr[at], hdr[at + 1]]);
    TxChecksum::Partial {
        start: field(CSUM_START_OFFSET),
        offset: field(CSUM_OFFSET_OFFSET),
    }
}

/// Hand every frame the guest queued to `handle` with what its header says about the
/// checksum, return the chains, notify if needed. `csum_offload`: the driver negotiated
/// `VIRTIO_NET_F_CSUM`.
pub fn drain(
    vring: &Vring,
    mem: &GuestMem,
    csum_offload: bool,
    mut handle: impl FnMut(&[u8], TxChecksum),
) {
    let mem = mem.memory();
    let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN];
    let mut used_any = false;
    loop {
        let chain = {
            let mut state = vring.get_mut();
            if !state.get_queue().ready() || !state.is_enabled() {
                break;
            }
            state.get_queue_mut().pop_descriptor_chain(mem.clone())
        };
        let Some(chain) = chain else {
            break;
        };
        let head = chain.head_index();
        if let Err(why) = super::check_chain(&chain, false) {
            debug!("transmit queue: chain {head} dropped: {why}");
            if let Err(e) = vring.get_mut().get_queue_mut().add_used(&*mem, head, 0) {
                debug!("transmit queue: add_used({head}): {e}");
            }
            used_any = true;
            continue;
        }
        match Reader::new(&*mem, chain) {
            Ok(mut reader) => {
                let len = reader.available_bytes();
                if len < VNET_HDR_LEN || len > buf.len() {
                    debug!("transmit queue: chain {head} of {len} bytes dropped (frame size out of range)");
                } else {
                    match reader.read_exact(&mut buf[..len]) {
                        Ok(()) => {
                            let (hdr, frame) = buf[..len].split_at(VNET_HDR_LEN);
                            let checksum = match <&[u8; VNET_HDR_LEN]>::try_from(hdr) {
                                Ok(hdr) => header_checksum(hdr, csum_offload),
                                Err(_) => TxChecksum::Complete,
                            };
                            handle(frame, checksum)
                        }
                        Err(e) => debug!("transmit queue: reading chain {head}: {e}"),
                    }
                }
            }
            Err(e) => debug!("transmit queue: bad descriptor chain {head}: {e}"),
        }
        if let Err(e) = vring.get_mut().get_queue_mut().add_used(&*mem, head, 0) {
            debug!("transmit queue: add_used({head}): {e}");
        }
        used_any = true;
    }
    if used_any && vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            debug!("transmit queue: notifying the guest failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u8, start: u16, offset: u16) -> [u8; VNET_HDR_LEN] {
        let mut hdr = [0u8; VNET_HDR_LEN];
        hdr[0] = flags;
        hdr[CSUM_START_OFFSET..CSUM_START_OFFSET + 2].copy_from_slice(&start.to_le_bytes());
        hdr[CSUM_OFFSET_OFFSET..CSUM_OFFSET_OFFSET + 2].copy_from_slice(&offset.to_le_bytes());
        hdr
    }

    #[test]
    fn needs_csum_is_partial_only_when_csum_was_negotiated() {
        let hdr = header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 34, 16);
        assert_eq!(
            header_checksum(&hdr, true),
            TxChecksum::Partial {
                start: 34,
                offset: 16
            }
        );
        assert_eq!(header_checksum(&hdr, false), TxChecksum::Complete);
    }

    #[test]
    fn other_flags_leave_the_checksum_to_be_verified() {
        // DATA_VALID must not be set by a driver; it vouches for nothing here.
        for flags in [0, super::super::VIRTIO_NET_HDR_F_DATA_VALID, 0x80] {
            assert_eq!(
                header_checksum(&header(flags, 34, 16), true),
                TxChecksum::Complete
            );
        }
    }
}
