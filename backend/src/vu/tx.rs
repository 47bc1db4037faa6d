//! Frames from the guest: draining the transmit queue.
//!
//! Each chain holds a 12-byte `virtio_net_hdr_v1` followed by one Ethernet frame. baton
//! offers no offloads, so the header carries nothing we need and is skipped. Chains are
//! untrusted: a chain that is malformed (bad addresses, loops, writable descriptors), too
//! short or too long is logged and returned to the guest, and draining goes on.

use std::io::Read;

use tracing::debug;
use vhost_user_backend::VringT;
use virtio_queue::{QueueT, Reader};
use vm_memory::GuestAddressSpace;

use super::device::{GuestMem, Vring};
use super::{MAX_FRAME_LEN, VNET_HDR_LEN};

/// Hand every frame the guest queued to `handle`, return the chains, notify if needed.
pub fn drain(vring: &Vring, mem: &GuestMem, mut handle: impl FnMut(&[u8])) {
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
                        Ok(()) => handle(&buf[VNET_HDR_LEN..len]),
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
