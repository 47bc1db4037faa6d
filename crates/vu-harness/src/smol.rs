//! smoltcp on top of the harness: the guest's TCP/IP stack in user space.

use std::time::Duration;

use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use crate::frontend::NetFrontend;

/// A smoltcp device whose wire is the vhost-user device under test.
pub struct GuestNic {
    pub dev: NetFrontend,
    pub mtu: usize,
}

impl GuestNic {
    pub fn new(dev: NetFrontend, mtu: usize) -> Self {
        GuestNic { dev, mtu }
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
        if let Err(e) = self.0.send_frame(&buf) {
            eprintln!("guest NIC: transmit failed: {e}");
        }
        r
    }
}

impl Device for GuestNic {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        match self.dev.try_recv_frame() {
            Ok(Some(frame)) => Some((RxToken(frame), TxToken(&mut self.dev))),
            Ok(None) => None,
            Err(e) => {
                eprintln!("guest NIC: receive failed: {e}");
                None
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
        caps
    }
}
