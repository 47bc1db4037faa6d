//! smoltcp on top of the harness: the guest's TCP/IP stack in user space.
//!
//! Checksum offload follows what was negotiated, as Linux's virtio-net driver does:
//! with `VIRTIO_NET_F_CSUM` smoltcp computes no TCP/UDP checksums and every TCP or UDP
//! frame goes out partial ([`crate::csum::make_partial`]); with
//! `VIRTIO_NET_F_GUEST_CSUM` smoltcp verifies none, and the NIC verifies the frames the
//! device did not mark `DATA_VALID` itself (dropping bad ones, as smoltcp would).

use std::time::Duration;

use smoltcp::phy::{self, Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::csum;
use crate::frontend::{
    NetFrontend, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_HDR_F_DATA_VALID,
    VNET_HDR_LEN,
};

/// A smoltcp device whose wire is the vhost-user device under test.
pub struct GuestNic {
    pub dev: NetFrontend,
    pub mtu: usize,
    /// Received frames without `DATA_VALID` whose checksum was wrong (with GUEST_CSUM).
    pub bad_checksums: u64,
}

impl GuestNic {
    pub fn new(dev: NetFrontend, mtu: usize) -> Self {
        GuestNic {
            dev,
            mtu,
            bad_checksums: 0,
        }
    }

    /// Block up to `timeout` for receive activity (smoltcp polls afterwards).
    pub fn wait(&mut self, timeout: Duration) {
        let fd = self.dev.call_fd(0);
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
    }
}

pub struct RxToken(Vec<u8>);
pub struct TxToken<'a>(&'a mut NetFrontend);

impl phy::RxToken for RxToken {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        let mut hdr = [0u8; VNET_HDR_LEN];
        if self.0.negotiated(VIRTIO_NET_F_CSUM) {
            if let Some(partial) = csum::make_partial(&mut buf) {
                hdr = partial;
            }
        }
        if let Err(e) = self.0.send_frame_with_header(&hdr, &buf) {
            eprintln!("guest NIC: transmit failed: {e}");
        }
        r
    }
}

impl Device for GuestNic {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let guest_csum = self.dev.negotiated(VIRTIO_NET_F_GUEST_CSUM);
        loop {
            match self.dev.try_recv_frame_with_header() {
                Ok(Some((hdr, frame))) => {
                    // smoltcp verifies nothing with GUEST_CSUM: what the device did not
                    // vouch for is checked here.
                    if guest_csum
                        && hdr[0] & VIRTIO_NET_HDR_F_DATA_VALID == 0
                        && !csum::l4_checksum_valid(&frame)
                    {
                        self.bad_checksums += 1;
                        continue;
                    }
                    return Some((RxToken(frame), TxToken(&mut self.dev)));
                }
                Ok(None) => return None,
                Err(e) => {
                    eprintln!("guest NIC: receive failed: {e}");
                    return None;
                }
            }
        }
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken(&mut self.dev))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu;
        let tx = !self.dev.negotiated(VIRTIO_NET_F_CSUM);
        let rx = !self.dev.negotiated(VIRTIO_NET_F_GUEST_CSUM);
        let l4 = match (rx, tx) {
            (true, true) => Checksum::Both,
            (true, false) => Checksum::Rx,
            (false, true) => Checksum::Tx,
            (false, false) => Checksum::None,
        };
        caps.checksum.tcp = l4;
        caps.checksum.udp = l4;
        caps
    }
}
