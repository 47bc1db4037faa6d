//! The smoltcp guest of the migration tests and benches: one IPv4 interface
//! (10.77.0.2/24 via 10.77.0.1, as [`super::V4_ONLY`] and [`super::DUAL_STACK`] tell
//! baton) on the test frontend. Its device can be taken away and replaced while the
//! stack and its sockets stay — a VM that stops on one backend and runs on another
//! keeps its TCP state, which is what migration tests need. Also the QEMU-side steps
//! of a migration that every such test repeats (LOAD before the rings) and the path of
//! the repair helper.
#![allow(dead_code)] // every test binary uses a different part of this module

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use baton_testkit::pattern::Pattern;
use baton_vu_harness::smol::GuestNic;
use baton_vu_harness::{FrontendOptions, HarnessError, NetFrontend};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use super::Baton;

pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// baton's default MAC towards the guest.
pub const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
pub const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const GUEST_MTU: usize = 9014;
pub const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 2);
/// The router's link-local address (baton's default IPv6 gateway).
pub const GW_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The guest's interface on `nic`: [`GUEST_MAC`], [`GUEST_V4`]/24, default route via
/// [`GW_V4`].
pub fn interface<D: Device + ?Sized>(nic: &mut D) -> Interface {
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC))),
        nic,
        smoltcp::time::Instant::now(),
    );
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::Ipv4(GUEST_V4), 24))
            .expect("v4");
    });
    iface
        .routes_mut()
        .add_default_ipv4_route(GW_V4)
        .expect("v4 route");
    iface
}

/// [`interface`] with IPv6 too: [`GUEST_V6`]/64, default route via [`GW_V6`] (for
/// baton started with `common::DUAL_STACK`).
pub fn dual_stack_interface<D: Device + ?Sized>(nic: &mut D) -> Interface {
    let mut iface = interface(nic);
    iface.update_ip_addrs(|a| {
        a.push(IpCidr::new(IpAddress::Ipv6(GUEST_V6), 64))
            .expect("v6");
    });
    iface
        .routes_mut()
        .add_default_ipv6_route(GW_V6)
        .expect("v6 route");
    iface
}

/// A smoltcp TCP socket with `rx` and `tx` bytes of buffer.
pub fn tcp_socket(rx: usize, tx: usize) -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; rx]),
        tcp::SocketBuffer::new(vec![0; tx]),
    )
}

/// How long the guest may sleep before smoltcp wants to be polled again: at most 5 ms,
/// so that frames from the backend are not left waiting long.
pub fn poll_delay(iface: &mut Interface, sockets: &SocketSet<'_>) -> Duration {
    iface
        .poll_delay(smoltcp::time::Instant::now(), sockets)
        .map(|d| Duration::from_micros(d.total_micros()))
        .unwrap_or(Duration::from_millis(5))
        .min(Duration::from_millis(5))
}

/// The smoltcp guest on the test frontend's polled NIC.
pub struct Guest {
    /// `None` while the VM is stopped between two backends.
    pub nic: Option<GuestNic>,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
}

impl Guest {
    pub fn new(dev: NetFrontend) -> Self {
        let mut nic = GuestNic::new(dev, GUEST_MTU);
        let iface = interface(&mut nic);
        Guest {
            nic: Some(nic),
            iface,
            sockets: SocketSet::new(vec![]),
        }
    }

    pub fn dev(&mut self) -> &mut NetFrontend {
        &mut self.nic.as_mut().expect("the VM runs").dev
    }

    /// The VM stops: its device goes away, the stack and its sockets stay.
    pub fn stop(&mut self) -> NetFrontend {
        self.nic.take().expect("the VM runs").dev
    }

    /// The VM runs (again) on `dev`.
    pub fn start(&mut self, dev: NetFrontend) {
        self.nic = Some(GuestNic::new(dev, GUEST_MTU));
    }

    pub fn poll(&mut self) {
        let nic = self.nic.as_mut().expect("the VM runs");
        self.iface
            .poll(smoltcp::time::Instant::now(), nic, &mut self.sockets);
    }

    /// Sleep until smoltcp has work or a frame arrives (at most 5 ms).
    pub fn wait(&mut self) {
        let delay = poll_delay(&mut self.iface, &self.sockets);
        self.nic.as_mut().expect("the VM runs").wait(delay);
    }

    pub fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// A TCP socket with `rx` and `tx` bytes of buffer.
    pub fn socket(&mut self, rx: usize, tx: usize) -> SocketHandle {
        self.sockets.add(tcp_socket(rx, tx))
    }

    /// Connect `handle` from `local_port` to `to`.
    pub fn connect(&mut self, handle: SocketHandle, to: (Ipv4Addr, u16), local_port: u16) {
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(cx, (IpAddress::Ipv4(to.0), to.1), local_port)
            .expect("connect");
    }

    /// A streaming connection as the migration tests open it: 64 KiB buffers each way,
    /// Nagle off, from `local_port` to `to`.
    pub fn open_stream(&mut self, to: (Ipv4Addr, u16), local_port: u16) -> SocketHandle {
        let handle = self.socket(65536, 65536);
        self.tcp(handle).set_nagle_enabled(false);
        self.connect(handle, to, local_port);
        handle
    }
}

/// The migration tests' outgoing stream on a guest connection: its index (4 bytes,
/// big-endian), then `up` pattern bytes. Queues what `socket` takes of it, up to
/// `limit` bytes (index included) in all; `sent` counts the bytes queued so far.
pub fn send_indexed(
    socket: &mut tcp::Socket<'_>,
    index: u32,
    up: &Pattern,
    sent: &mut u64,
    limit: u64,
) {
    while socket.can_send() && *sent < limit {
        let chunk = if *sent < 4 {
            index.to_be_bytes()[*sent as usize..].to_vec()
        } else {
            let want = (limit - *sent).min(16384) as usize;
            up.bytes(*sent - 4, want)
        };
        match socket.send_slice(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => *sent += n as u64,
        }
    }
}

/// Read connection `index`'s incoming `down` pattern from `socket` up to `limit` bytes
/// in all; `received` counts the bytes verified so far. Panics on a wrong byte.
pub fn recv_verified(
    socket: &mut tcp::Socket<'_>,
    index: u32,
    down: &Pattern,
    received: &mut u64,
    limit: u64,
) {
    let mut buf = [0u8; 16384];
    while socket.can_recv() && *received < limit {
        let room = (limit - *received).min(buf.len() as u64) as usize;
        match socket.recv_slice(&mut buf[..room]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Err(m) = down.verify(*received, &buf[..n]) {
                    panic!("connection {index}: guest received corrupt data: {m}");
                }
                *received += n as u64;
            }
        }
    }
}

/// One guest connection of the migration tests: its streams in the format of
/// [`send_indexed`] (up) and [`recv_verified`] (down), and how far each has come.
pub struct StreamPair {
    pub index: u32,
    pub handle: SocketHandle,
    /// Index header and pattern bytes queued so far (header included).
    pub sent: u64,
    /// Pattern bytes received and verified so far.
    pub received: u64,
    /// The guest closed its side (sent its FIN).
    pub closed: bool,
}

impl StreamPair {
    pub fn new(index: u32, handle: SocketHandle) -> Self {
        StreamPair {
            index,
            handle,
            sent: 0,
            received: 0,
            closed: false,
        }
    }

    /// Pattern bytes queued so far (without the header).
    pub fn up_done(&self) -> u64 {
        self.sent.saturating_sub(4)
    }

    /// One round on `socket`: queue `up` up to `up_gate` bytes (header included), close
    /// once `close` says so (asked after queuing, until closed), then read and verify
    /// `down` up to `down_gate` bytes. Panics on a wrong byte.
    pub fn exchange(
        &mut self,
        socket: &mut tcp::Socket<'_>,
        (up, up_gate): (&Pattern, u64),
        close: impl FnOnce(&Self) -> bool,
        (down, down_gate): (&Pattern, u64),
    ) {
        send_indexed(socket, self.index, up, &mut self.sent, up_gate);
        if !self.closed && close(self) {
            socket.close();
            self.closed = true;
        }
        recv_verified(socket, self.index, down, &mut self.received, down_gate);
    }

    /// The connection ended before its streams did (a reset, or closed early).
    pub fn ended_early(&self, socket: &tcp::Socket<'_>, down_len: u64) -> bool {
        socket.state() == tcp::State::Closed && !self.done_with(socket, down_len)
    }

    /// Panics if the connection [ended early](Self::ended_early).
    pub fn assert_alive(&self, socket: &tcp::Socket<'_>, down_len: u64) {
        assert!(
            !self.ended_early(socket, down_len),
            "connection {}: reset or closed early (sent {}, received {})",
            self.index,
            self.sent,
            self.received
        );
    }

    /// Over: the guest closed, received all `down_len` bytes and the peer's FIN.
    pub fn done_with(&self, socket: &tcp::Socket<'_>, down_len: u64) -> bool {
        self.closed && self.received == down_len && !socket.may_recv()
    }
}

/// A guest connection that [`run_guest`] drives.
pub trait GuestConnection {
    /// Move data both ways as far as the connection's plan allows.
    fn step(&mut self, guest: &mut Guest);
    fn streams(&self) -> &StreamPair;
}

/// Run the guest and step every connection until `until` says stop (asked after each
/// round); panics after `timeout` with every connection's progress and `log()`.
pub fn run_guest<C: GuestConnection>(
    guest: &mut Guest,
    conns: &mut [C],
    what: &str,
    timeout: Duration,
    mut until: impl FnMut(&mut Guest, &[C]) -> bool,
    log: &dyn Fn() -> String,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        guest.poll();
        for conn in conns.iter_mut() {
            conn.step(guest);
        }
        guest.poll();
        if until(guest, conns) {
            return;
        }
        if std::time::Instant::now() > deadline {
            let progress: Vec<(u32, u64, u64)> = conns
                .iter()
                .map(|c| {
                    let s = c.streams();
                    (s.index, s.up_done(), s.received)
                })
                .collect();
            panic!("{what}: timed out; progress {progress:?}; log:\n{}", log());
        }
        guest.wait();
    }
}

/// A source and a target backend for `label` (IPv4 only), each starting
/// `baton-repair` on demand (`--helper`).
pub fn v4_pair_with_helper(label: &str) -> (super::Baton, super::Baton) {
    let helper = helper_binary();
    let args: Vec<&str> = super::V4_ONLY
        .iter()
        .copied()
        .chain(["--helper", helper.as_str()])
        .collect();
    (
        super::Baton::spawn(&format!("{label}-a"), &args),
        super::Baton::spawn(&format!("{label}-b"), &args),
    )
}

/// `baton-repair`, built next to `baton` (`scripts/test` builds both; benches want the
/// release build).
pub fn helper_binary() -> String {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_baton")).with_file_name("baton-repair");
    assert!(
        path.exists(),
        "{} missing: cargo build -p baton-repair (with --release for benches)",
        path.display()
    );
    path.display().to_string()
}

/// The VM stops on `source`: its rings stop (GET_VRING_BASE), then SAVE; the saved
/// device state (panics with `source`'s log if SAVE fails).
pub fn stop_and_save(dev: &mut NetFrontend, source: &Baton) -> Vec<u8> {
    dev.stop_rings().expect("GET_VRING_BASE");
    dev.save_state()
        .unwrap_or_else(|e| panic!("SAVE: {e}; log:\n{}", source.log()))
}

/// Connect as a migration target: LOAD `state` before the rings, as QEMU does.
pub fn connect_loading(baton: &Baton, state: &[u8]) -> (NetFrontend, Result<(), HarnessError>) {
    let mut loaded = None;
    let dev = NetFrontend::connect_with(&baton.socket(), FrontendOptions::default(), |dev| {
        loaded = Some(dev.load_state(state));
        Ok(())
    })
    .unwrap_or_else(|e| panic!("frontend: {e}; log:\n{}", baton.log()));
    (dev, loaded.expect("the hook ran"))
}
