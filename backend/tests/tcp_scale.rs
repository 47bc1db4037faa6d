//! TCP at scale through the device: the real `baton` binary in a private network
//! namespace, the test frontend, and smoltcp as the guest's TCP stack.
//!
//! * [`thousand_connections_each_way_ipv4_and_ipv6`]: 1,000 guest → host and 1,000
//!   host → guest connections (half IPv4, half IPv6), all established at the same time,
//!   then streaming both ways; every connection carries its own pattern seeds, so data
//!   that crosses between connections is caught as well as data that is lost.
//! * [`one_gib_transfer_is_exact`]: one connection carries 1 GiB from the guest to the
//!   host and 1 GiB back at the same time, every byte checked (optimized builds only).
//! * [`descriptor_limit_refuses_new_connections_only`]: baton's connections filled up to
//!   its descriptor limit by a raw handshake engine beside smoltcp; new guest
//!   connections are refused with a RST, the log says why, the connections that existed
//!   before stream on, and a freed slot is usable again.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_testkit::hostflows::{self, FlowPlan, HostFlows, Running};
use baton_testkit::pattern::Pattern;
use baton_vu_harness::{FrontendOptions, NetFrontend};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;

mod common;
use common::Baton;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 2);
const GW_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const GUEST_MTU: usize = 9014;
const TEST_TIMEOUT: Duration = Duration::from_secs(150);
/// Inbound connections are numbered from here, so their seeds never meet outbound ones.
const INBOUND_INDEX_BASE: u32 = 1 << 20;

/// The guest's wire: frames for smoltcp, except TCP frames to guest ports in `divert`,
/// which are set aside for [`RawFlows`] (smoltcp would answer them with a RST).
struct ScaleNic {
    dev: NetFrontend,
    divert: Option<std::ops::RangeInclusive<u16>>,
    diverted: Vec<Vec<u8>>,
    /// RSTs (guest sent, guest received), for failure reports.
    resets: (usize, usize),
}

fn is_rst(frame: &[u8]) -> bool {
    matches!(
        SlicedPacket::from_ethernet(frame),
        Ok(SlicedPacket {
            transport: Some(TransportSlice::Tcp(tcp)),
            ..
        }) if tcp.rst()
    )
}

impl ScaleNic {
    fn is_diverted(&self, frame: &[u8]) -> bool {
        let Some(range) = &self.divert else {
            return false;
        };
        match SlicedPacket::from_ethernet(frame) {
            Ok(SlicedPacket {
                transport: Some(TransportSlice::Tcp(tcp)),
                ..
            }) => range.contains(&tcp.destination_port()),
            _ => false,
        }
    }

    /// Block up to `timeout` for receive activity.
    fn wait(&mut self, timeout: Duration) {
        let fd = self.dev.call_fd(0);
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
    }
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut NetFrontend, &'a mut usize);

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
        if is_rst(&buf) {
            *self.1 += 1;
        }
        self.0.send_frame(&buf).expect("guest transmit");
        r
    }
}

impl Device for ScaleNic {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        loop {
            let frame = self.dev.try_recv_frame().expect("guest receive")?;
            if self.is_diverted(&frame) {
                self.diverted.push(frame);
                continue;
            }
            if is_rst(&frame) {
                self.resets.1 += 1;
            }
            return Some((RxToken(frame), TxToken(&mut self.dev, &mut self.resets.0)));
        }
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(TxToken(&mut self.dev, &mut self.resets.0))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = GUEST_MTU;
        caps
    }
}

/// The smoltcp guest: interface, sockets and the device under test.
struct Guest {
    nic: ScaleNic,
    iface: Interface,
    sockets: SocketSet<'static>,
}

impl Guest {
    fn new(dev: NetFrontend) -> Self {
        let mut nic = ScaleNic {
            dev,
            divert: None,
            diverted: Vec::new(),
            resets: (0, 0),
        };
        let iface = common::guest::dual_stack_interface(&mut nic);
        Guest {
            nic,
            iface,
            sockets: SocketSet::new(vec![]),
        }
    }

    fn socket(&mut self, buffer: usize) -> SocketHandle {
        self.sockets.add(common::guest::tcp_socket(buffer, buffer))
    }

    fn poll(&mut self) {
        self.iface.poll(
            smoltcp::time::Instant::now(),
            &mut self.nic,
            &mut self.sockets,
        );
    }

    fn wait(&mut self) {
        let delay = common::guest::poll_delay(&mut self.iface, &self.sockets);
        self.nic.wait(delay);
    }

    fn connect(&mut self, handle: SocketHandle, dst: (IpAddress, u16), local_port: u16) {
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(cx, dst, local_port)
            .expect("connect");
    }

    fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Poll until `done`, failing with baton's log after `timeout`.
    fn poll_until(
        &mut self,
        baton: &Baton,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&mut Guest) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll();
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; baton log (tail):\n{}",
                log_tail(baton)
            );
            self.wait();
        }
    }
}

/// The device with a deep receive ring: thousands of connections answer in bursts, and
/// a frame that finds the ring full is dropped (and retransmitted a second later).
fn connect_device(baton: &Baton) -> NetFrontend {
    NetFrontend::connect(
        &baton.socket(),
        FrontendOptions {
            queue_size: 1024,
            ram_size: 64 << 20,
            ..FrontendOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("frontend: {e}; log:\n{}", baton.log()))
}

fn log_tail(baton: &Baton) -> String {
    let log = baton.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Seeds of connection `index`: (what the guest sends, what the host sends).
fn seeds(index: u32) -> (Pattern, Pattern) {
    let i = u64::from(index);
    (Pattern::new(2 * i), Pattern::new(2 * i + 1))
}

/// The guest end of one connection. The connection's index travels first, as 4 bytes
/// from whichever side opened it; the patterns follow from the index.
struct GuestStream {
    handle: SocketHandle,
    /// The connection's index, once known (for failure reports).
    index: Option<u32>,
    /// Outbound: the index still to send (4 bytes, sent before the pattern).
    index_out: Option<[u8; 4]>,
    /// Inbound: the index bytes received so far (the patterns are unknown until then).
    index_in: Option<Vec<u8>>,
    send: Pattern,
    send_len: u64,
    sent: u64,
    recv: Pattern,
    recv_len: u64,
    received: u64,
    closed_send: bool,
}

impl GuestStream {
    /// A connection the guest opened with index `index`.
    fn outbound(handle: SocketHandle, index: u32, lens: (u64, u64)) -> Self {
        let (send, recv) = seeds(index);
        GuestStream {
            handle,
            index: Some(index),
            index_out: Some(index.to_be_bytes()),
            index_in: None,
            send,
            send_len: lens.0,
            sent: 0,
            recv,
            recv_len: lens.1,
            received: 0,
            closed_send: false,
        }
    }

    /// A listening socket that will learn its connection's index from the host.
    fn inbound(handle: SocketHandle, lens: (u64, u64)) -> Self {
        GuestStream {
            index: None,
            index_out: None,
            index_in: Some(Vec::new()),
            ..Self::outbound(handle, 0, lens)
        }
    }

    /// Move data; true when both directions are complete (our FIN sent, theirs seen).
    /// Data that is not the pattern, or too much of it, is an error.
    fn step(&mut self, guest: &mut Guest) -> Result<bool, String> {
        let socket = guest.tcp(self.handle);
        if let Some(got) = &mut self.index_in {
            let mut rest = [0u8; 4];
            while got.len() < 4 && socket.can_recv() {
                let want = 4 - got.len();
                match socket.recv_slice(&mut rest[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&rest[..n]),
                }
            }
            if got.len() < 4 {
                return Ok(false);
            }
            let index = u32::from_be_bytes([got[0], got[1], got[2], got[3]]);
            (self.send, self.recv) = seeds(index);
            self.index = Some(index);
            self.index_in = None;
        }
        if let Some(index) = self.index_out {
            if !socket.can_send() {
                return Ok(false);
            }
            assert_eq!(
                socket.send_slice(&index),
                Ok(4),
                "index fits a fresh buffer"
            );
            self.index_out = None;
        }
        while socket.can_send() && self.sent < self.send_len {
            let want = (self.send_len - self.sent).min(16384) as usize;
            let chunk = self.send.bytes(self.sent, want);
            match socket.send_slice(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.sent += n as u64,
            }
        }
        if self.sent == self.send_len && !self.closed_send {
            socket.close();
            self.closed_send = true;
        }
        let mut buf = [0u8; 16384];
        while socket.can_recv() {
            match socket.recv_slice(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Err(m) = self.recv.verify(self.received, &buf[..n]) {
                        return Err(format!("guest received corrupt data: {m}"));
                    }
                    self.received += n as u64;
                }
            }
        }
        if self.received > self.recv_len {
            return Err(format!(
                "guest received {} B, more than the {} B expected",
                self.received, self.recv_len
            ));
        }
        Ok(self.closed_send && self.received == self.recv_len && !socket.may_recv())
    }
}

/// Drive the guest until every stream is complete; on timeout, say which are not.
fn drive(guest: &mut Guest, streams: &mut [GuestStream], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut done = vec![false; streams.len()];
    let mut remaining = streams.len();
    loop {
        guest.poll();
        for (s, done) in streams.iter_mut().zip(done.iter_mut()) {
            if *done {
                continue;
            }
            match s.step(guest) {
                Ok(true) => {
                    *done = true;
                    remaining -= 1;
                }
                Ok(false) => {}
                Err(e) => {
                    let state = guest.tcp(s.handle).state();
                    return Err(format!(
                        "guest stream {:?} ({}/{} B sent, {}/{} B received, {state}): {e}",
                        s.index, s.sent, s.send_len, s.received, s.recv_len
                    ));
                }
            }
        }
        if remaining == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut report = format!(
                "{remaining}/{} guest streams incomplete after {timeout:?}; the first \
                 (index, sent, received, guest socket state):",
                streams.len()
            );
            for s in streams
                .iter()
                .zip(&done)
                .filter(|(_, d)| !**d)
                .map(|(s, _)| s)
                .take(20)
            {
                let state = guest.tcp(s.handle).state();
                report += &format!(
                    "\n  {:?}: {}/{} B, {}/{} B, {state}",
                    s.index, s.sent, s.send_len, s.received, s.recv_len
                );
            }
            return Err(report);
        }
        guest.poll();
        guest.wait();
    }
}

/// What the host side of connection `index` carries, given `lens` (guest → host,
/// host → guest).
fn host_plan(lens: (u64, u64)) -> impl Fn(u32) -> FlowPlan + Send + 'static {
    move |index| {
        let (guest, host) = seeds(index);
        FlowPlan {
            send: host,
            send_len: lens.1,
            recv: guest,
            recv_len: lens.0,
        }
    }
}

/// The host side, run by one thread however many connections it has.
fn host_flows(lens: (u64, u64)) -> HostFlows {
    HostFlows::new(host_plan(lens)).stall_timeout(TEST_TIMEOUT)
}

fn spawn_host(flows: HostFlows) -> Running {
    flows.spawn().expect("spawn the host flows")
}

/// Everything known about a failure beyond the two sides' own reports: RSTs the guest
/// saw and baton's log lines about resets and errors.
fn failure_context(guest: &Guest, baton: &Baton) -> String {
    format!(
        "RSTs sent by the guest {}, received by the guest {}; baton log (resets, errors):\n{}",
        guest.nic.resets.0,
        guest.nic.resets.1,
        log_resets(baton)
    )
}

/// Poll until the guest's sockets `handles` are all established and the host side has
/// accepted `each` connections and opened `each`; on timeout, panic with both sides'
/// state and baton's log.
fn establish(
    guest: &mut Guest,
    baton: &Baton,
    host: Running,
    handles: &[SocketHandle],
    each: u64,
) -> Running {
    let deadline = Instant::now() + TEST_TIMEOUT;
    let established = |g: &mut Guest| {
        handles
            .iter()
            .filter(|&&h| g.tcp(h).state() == tcp::State::Established)
            .count()
    };
    loop {
        guest.poll();
        let p = host.progress();
        if p.accepted == each && p.connected == each && established(guest) == handles.len() {
            return host;
        }
        if Instant::now() >= deadline || p.failed > 0 {
            let guest_side = format!(
                "{} of {} guest connections established; host {p:?}",
                established(guest),
                handles.len()
            );
            let host_side = host.stop();
            panic!(
                "connections not established: {guest_side}\n{host_side}{}",
                failure_context(guest, baton)
            );
        }
        guest.wait();
    }
}

/// Stream both ways to completion: the guest's `streams` here, the host side in `host`.
/// A failure on either side panics with both sides' reports and baton's log.
fn stream_both_sides(
    guest: &mut Guest,
    streams: &mut [GuestStream],
    baton: &Baton,
    host: Running,
    timeout: Duration,
) {
    host.set_paused(false);
    if let Err(guest_side) = drive(guest, streams, timeout) {
        let host_side = host.stop();
        panic!("{guest_side}\n{host_side}{}", failure_context(guest, baton));
    }
    // The guest's stack keeps running while the host side finishes (a last segment or
    // FIN may still need a retransmission, which only happens while smoltcp is polled).
    let deadline = Instant::now() + TEST_TIMEOUT;
    while !host.is_finished() && Instant::now() < deadline {
        guest.poll();
        guest.wait();
    }
    let finished = host.is_finished();
    let report = host.stop();
    assert!(
        finished && report.is_ok(),
        "the host side {}:\n{report}{}",
        if finished { "failed" } else { "did not finish" },
        failure_context(guest, baton)
    );
}

/// baton's log lines about resets, refusals and errors (the last 60), without the
/// lines about frames dropped for want of receive buffers, which only say that the
/// guest was slow to post them and would drown the rest.
fn log_resets(baton: &Baton) -> String {
    let log = baton.log();
    let dropped = |l: &str| l.contains("frame(s) dropped") || l.contains("frame dropped");
    let omitted = log.lines().filter(|l| dropped(l)).count();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !dropped(l))
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            l.contains("WARN")
                || l.contains("ERROR")
                || l.contains("RST")
                || [
                    "reset",
                    "refus",
                    "error",
                    "fail",
                    "retransmi",
                    "timed out",
                    "timeout",
                    "stopped",
                    "full",
                ]
                .iter()
                .any(|w| lower.contains(w))
        })
        .collect();
    format!(
        "{}\n({omitted} lines about dropped frames left out)",
        lines[lines.len().saturating_sub(60)..].join("\n")
    )
}

fn port_of(listener: &TcpListener) -> u16 {
    listener.local_addr().expect("addr").port()
}

fn write_sysctl(path: &str, value: &str) {
    std::fs::write(path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
}

#[test]
fn thousand_connections_each_way_ipv4_and_ipv6() {
    let _serial = serial();
    const PER_FAMILY: u32 = 500;
    // (guest → host, host → guest) per connection.
    let lens: (u64, u64) = (32 << 10, 32 << 10);
    let nofile = baton_testkit::netns::raise_nofile(16384).expect("RLIMIT_NOFILE");
    assert!(nofile >= 16384, "need 16384 descriptors, have {nofile}");
    let baton = Baton::start("scale-1000", &["-t", "5000:6000"]);
    // Inbound connections queue at the forward's listener until the guest takes them.
    write_sysctl("/proc/sys/net/core/somaxconn", "4096");
    let mut guest = Guest::new(connect_device(&baton));

    // 1,000 outbound: 500 to the host's 127.0.0.1, 500 to ::1 (via the gateways). The
    // host side of all 2,000 connections is one thread with nonblocking sockets.
    let v4 = hostflows::listen((Ipv4Addr::LOCALHOST, 0).into()).expect("listen v4");
    let v6 = hostflows::listen((Ipv6Addr::LOCALHOST, 0).into()).expect("listen v6");
    let (p4, p6) = (port_of(&v4), port_of(&v6));
    let mut host = host_flows(lens)
        .accept(v4, PER_FAMILY as usize)
        .accept(v6, PER_FAMILY as usize)
        .paused(true);
    let mut streams = Vec::new();
    for i in 0..2 * PER_FAMILY {
        let (dst, local_port) = if i < PER_FAMILY {
            ((IpAddress::Ipv4(GW_V4), p4), 20000 + i as u16)
        } else {
            (
                (IpAddress::Ipv6(GW_V6), p6),
                20000 + (i - PER_FAMILY) as u16,
            )
        };
        let handle = guest.socket(16 << 10);
        guest.connect(handle, dst, local_port);
        streams.push(GuestStream::outbound(handle, i, lens));
    }

    // 1,000 inbound through the forward: 500 from 127.0.0.1, 500 from ::1. The guest
    // listens before the host connects (a SYN to a port nobody listens on is reset).
    for _ in 0..2 * PER_FAMILY {
        let handle = guest.socket(16 << 10);
        guest.tcp(handle).listen(6000).expect("listen");
        streams.push(GuestStream::inbound(handle, lens));
    }
    for j in 0..2 * PER_FAMILY {
        let forward: SocketAddr = if j < PER_FAMILY {
            (Ipv4Addr::LOCALHOST, 5000).into()
        } else {
            (Ipv6Addr::LOCALHOST, 5000).into()
        };
        host = host.connect(forward, INBOUND_INDEX_BASE + j);
    }
    let host = spawn_host(host);

    // Every one of the 2,000 connections is established at both ends before any data
    // moves: they are all open at once. (The host side only sends the inbound
    // connections' indices until it is resumed; the guest sends nothing before `drive`.)
    let handles: Vec<SocketHandle> = streams.iter().map(|s| s.handle).collect();
    let all = u64::from(2 * PER_FAMILY);
    let host = establish(&mut guest, &baton, host, &handles, all);
    let p = host.progress();
    assert_eq!(
        (p.failed, p.bytes_sent, p.bytes_received),
        (0, 0, 0),
        "host side before the data phase"
    );
    // Inbound connections arrive in the host connection's IP version.
    let families = handles[2 * PER_FAMILY as usize..]
        .iter()
        .map(|&h| guest.tcp(h).local_endpoint().map(|e| e.addr))
        .fold((0, 0), |(v4, v6), local| match local {
            Some(IpAddress::Ipv4(a)) if a == GUEST_V4 => (v4 + 1, v6),
            Some(IpAddress::Ipv6(a)) if a == GUEST_V6 => (v4, v6 + 1),
            other => panic!("inbound connection to unexpected guest address {other:?}"),
        });
    assert_eq!(families, (PER_FAMILY, PER_FAMILY), "inbound (IPv4, IPv6)");

    stream_both_sides(&mut guest, &mut streams, &baton, host, TEST_TIMEOUT);
}

/// In a debug build this takes longer than the file's budget (about 5 MB/s each way,
/// 1 GiB not done after 170 s), so it runs in optimized test builds only:
/// `cargo test --release -p baton --test tcp_scale` (about 13 s here).
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "1 GiB through a debug build takes minutes; run with cargo test --release"
)]
fn one_gib_transfer_is_exact() {
    let _serial = serial();
    const GIB: u64 = 1 << 30;
    let baton = Baton::start("scale-1gib", &[]);
    let mut guest = Guest::new(connect_device(&baton));
    let listener = hostflows::listen((Ipv4Addr::LOCALHOST, 0).into()).expect("listen");
    let port = port_of(&listener);
    let lens = (GIB, GIB);
    let server = spawn_host(host_flows(lens).accept(listener, 1));
    let handle = guest.socket(1 << 20);
    guest.connect(handle, (IpAddress::Ipv4(GW_V4), port), 20000);
    let mut streams = [GuestStream::outbound(handle, 7, lens)];
    let start = Instant::now();
    stream_both_sides(
        &mut guest,
        &mut streams,
        &baton,
        server,
        Duration::from_secs(170),
    );
    let secs = start.elapsed().as_secs_f64();
    // A figure for the log, not an assertion.
    eprintln!(
        "1 GiB each way in {secs:.1} s ({:.0} MiB/s per direction)",
        1024.0 / secs
    );
}

/// Guest ports [`RawFlows`] uses; smoltcp's sockets in the same test stay below.
const RAW_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;
/// Raw flows per host listener (the host side of each is one loopback connection, and
/// each listener's connections need distinct ephemeral ports).
const RAW_PER_LISTENER: usize = 25_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RawState {
    SynSent,
    Established { snd_nxt: u32, rcv_nxt: u32 },
    Refused,
}

/// A minimal guest TCP that only opens connections: SYN out, SYN-ACK in, ACK out. Enough
/// to occupy baton's flows by the thousand without smoltcp's per-packet socket scan, and
/// it sees exactly which handshake baton refused.
struct RawFlows {
    /// Host listener ports, as the guest reaches them through the gateway.
    dst_ports: Vec<u16>,
    next: usize,
    states: HashMap<(u16, u16), RawState>,
    pending: usize,
    established: usize,
    refused: usize,
}

const RAW_ISN: u32 = 0x1000_0000;

impl RawFlows {
    fn new(dst_ports: Vec<u16>) -> Self {
        RawFlows {
            dst_ports,
            next: 0,
            states: HashMap::new(),
            pending: 0,
            established: 0,
            refused: 0,
        }
    }

    fn tuple(&self, i: usize) -> (u16, u16) {
        let span = RAW_PORTS.end() - RAW_PORTS.start() + 1;
        let src = RAW_PORTS.start() + (i % usize::from(span)) as u16;
        let dst = self.dst_ports[i / RAW_PER_LISTENER];
        (src, dst)
    }

    fn frame(src: u16, dst: u16, seq: u32, flags: u8, ack: u32) -> Vec<u8> {
        let builder = etherparse::PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
            .ipv4(GUEST_V4.octets(), GW_V4.octets(), 64)
            .tcp(src, dst, seq, 65535);
        let builder = match flags {
            SYN => builder.syn(),
            ACK => builder.ack(ack),
            RST => builder.rst().ack(ack),
            _ => unreachable!("flags"),
        };
        let mut frame = Vec::new();
        builder.write(&mut frame, &[]).expect("build");
        frame
    }

    /// Open up to `count` more connections, keeping at most `window` in their handshake.
    fn open(&mut self, nic: &mut ScaleNic, count: usize, window: usize) -> usize {
        let mut opened = 0;
        while opened < count && self.pending < window {
            let (src, dst) = self.tuple(self.next);
            self.next += 1;
            self.states.insert((src, dst), RawState::SynSent);
            nic.dev
                .send_frame(&Self::frame(src, dst, RAW_ISN, SYN, 0))
                .expect("send SYN");
            self.pending += 1;
            opened += 1;
        }
        opened
    }

    /// Answer what baton sent to the raw ports.
    fn handle(&mut self, nic: &mut ScaleNic) {
        for frame in std::mem::take(&mut nic.diverted) {
            let Ok(SlicedPacket {
                net: Some(NetSlice::Ipv4(_)),
                transport: Some(TransportSlice::Tcp(tcp)),
                ..
            }) = SlicedPacket::from_ethernet(&frame)
            else {
                panic!("unexpected frame to a raw port: {frame:x?}");
            };
            let key = (tcp.destination_port(), tcp.source_port());
            let state = self.states.get(&key).copied();
            match state {
                Some(RawState::SynSent) if tcp.syn() && tcp.ack() => {
                    assert_eq!(tcp.acknowledgment_number(), RAW_ISN + 1, "SYN-ACK's ack");
                    let rcv_nxt = tcp.sequence_number().wrapping_add(1);
                    nic.dev
                        .send_frame(&Self::frame(key.0, key.1, RAW_ISN + 1, ACK, rcv_nxt))
                        .expect("send ACK");
                    self.states.insert(
                        key,
                        RawState::Established {
                            snd_nxt: RAW_ISN + 1,
                            rcv_nxt,
                        },
                    );
                    self.pending -= 1;
                    self.established += 1;
                }
                Some(RawState::SynSent) if tcp.rst() => {
                    self.states.insert(key, RawState::Refused);
                    self.pending -= 1;
                    self.refused += 1;
                }
                // A retransmitted SYN-ACK (our ACK crossed it): acknowledge again.
                Some(RawState::Established { snd_nxt, rcv_nxt }) if tcp.syn() => {
                    nic.dev
                        .send_frame(&Self::frame(key.0, key.1, snd_nxt, ACK, rcv_nxt))
                        .expect("send ACK");
                }
                other => panic!(
                    "raw flow {key:?} in state {other:?} got an unexpected segment \
                     (syn {} ack {} rst {} fin {})",
                    tcp.syn(),
                    tcp.ack(),
                    tcp.rst(),
                    tcp.fin()
                ),
            }
        }
    }

    /// Reset `count` established raw connections (as a guest abort would), freeing their
    /// slots in baton's table.
    fn reset(&mut self, nic: &mut ScaleNic, count: usize) {
        let victims: Vec<((u16, u16), u32, u32)> = self
            .states
            .iter()
            .filter_map(|(&key, &state)| match state {
                RawState::Established { snd_nxt, rcv_nxt } => Some((key, snd_nxt, rcv_nxt)),
                _ => None,
            })
            .take(count)
            .collect();
        for (key, snd_nxt, rcv_nxt) in victims {
            nic.dev
                .send_frame(&Self::frame(key.0, key.1, snd_nxt, RST, rcv_nxt))
                .expect("send RST");
            self.states.insert(key, RawState::Refused);
            self.established -= 1;
        }
    }
}

const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// Host listeners that accept everything, keep the connections open, and count them.
struct HostAcceptors {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Vec<TcpStream>>>,
}

impl HostAcceptors {
    fn start(listeners: Vec<TcpListener>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let threads = listeners
            .into_iter()
            .map(|listener| {
                let (stop, accepted) = (stop.clone(), accepted.clone());
                listener.set_nonblocking(true).expect("nonblocking");
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    loop {
                        match listener.accept() {
                            Ok((stream, _)) => {
                                held.push(stream);
                                accepted.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                if stop.load(Ordering::Relaxed) {
                                    return held;
                                }
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            Err(e) => panic!("accept: {e}"),
                        }
                    }
                })
            })
            .collect();
        HostAcceptors {
            stop,
            accepted,
            threads,
        }
    }

    fn finish(self) -> Vec<TcpStream> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().expect("acceptor"))
            .collect()
    }
}

/// The tests in this file run one at a time: each is heavy enough to use both cores of
/// a CI machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Descriptors baton may hold in [`descriptor_limit_refuses_new_connections_only`].
const BATON_NOFILE: u64 = 1024;

/// Which bound a [`limit_refuses_new_connections_only`] run reaches.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// baton's descriptor limit: one socket per connection.
    Descriptors(u64),
    /// The flow table's own bound (`--max-flows`).
    Table(usize),
}

/// With the descriptor limit reached, a new guest connection is refused with a RST
/// (IPv4 and IPv6), the log says why, the connections that existed before stream on
/// unharmed, and a slot freed by the guest is usable again.
#[test]
fn descriptor_limit_refuses_new_connections_only() {
    limit_refuses_new_connections_only(Bound::Descriptors(BATON_NOFILE));
}

/// The same at the flow table's bound: exactly `--max-flows` connections are open, the
/// next ones get a RST and the log says "flow table full". (The default bound, 131,072,
/// is above the hard descriptor limit of most machines, so it is tested scaled down.)
#[test]
fn full_flow_table_refuses_new_connections_only() {
    limit_refuses_new_connections_only(Bound::Table(1000));
}

fn limit_refuses_new_connections_only(bound: Bound) {
    let _serial = serial();
    let (baton, capacity) = match bound {
        Bound::Descriptors(limit) => (
            Baton::start_with_nofile("scale-fds", &["-t", "5000:900"], limit),
            limit as usize,
        ),
        Bound::Table(flows) => {
            let max = flows.to_string();
            (
                Baton::start("scale-table", &["-t", "5000:900", "--max-flows", &max]),
                flows,
            )
        }
    };
    write_sysctl("/proc/sys/net/core/somaxconn", "4096");
    let mut guest = Guest::new(connect_device(&baton));
    guest.nic.divert = Some(RAW_PORTS);
    let lens: (u64, u64) = (2 << 20, 2 << 20);

    // Four connections that exist before the limit is reached: outbound and inbound,
    // v4 and v6. They exchange their indices now and stream once the limit is reached.
    let v4 = hostflows::listen((Ipv4Addr::LOCALHOST, 0).into()).expect("listen v4");
    let v6 = hostflows::listen((Ipv6Addr::LOCALHOST, 0).into()).expect("listen v6");
    let (p4, p6) = (port_of(&v4), port_of(&v6));
    let mut host = host_flows(lens).accept(v4, 1).accept(v6, 1).paused(true);
    let mut streams = Vec::new();
    for (i, dst) in [(IpAddress::Ipv4(GW_V4), p4), (IpAddress::Ipv6(GW_V6), p6)]
        .into_iter()
        .enumerate()
    {
        let handle = guest.socket(64 << 10);
        guest.connect(handle, dst, 100 + i as u16);
        streams.push(GuestStream::outbound(handle, i as u32, lens));
    }
    let forwards: [SocketAddr; 2] = [
        (Ipv4Addr::LOCALHOST, 5000).into(),
        (Ipv6Addr::LOCALHOST, 5000).into(),
    ];
    for (j, forward) in forwards.into_iter().enumerate() {
        let handle = guest.socket(64 << 10);
        guest.tcp(handle).listen(900).expect("listen");
        streams.push(GuestStream::inbound(handle, lens));
        host = host.connect(forward, INBOUND_INDEX_BASE + j as u32);
    }
    let host = spawn_host(host);
    let handles: Vec<SocketHandle> = streams.iter().map(|s| s.handle).collect();
    let host = establish(&mut guest, &baton, host, &handles, 2);

    // Open raw connections until baton refuses one and let the handshakes in flight
    // finish; then `extra` more, which must all be refused.
    let extra = 50;
    // A deep accept queue: baton connects faster than one thread accepts.
    let listener = hostflows::listen((Ipv4Addr::LOCALHOST, 0).into()).expect("listen");
    let mut raw = RawFlows::new(vec![port_of(&listener)]);
    let acceptors = HostAcceptors::start(vec![listener]);
    let deadline = Instant::now() + TEST_TIMEOUT;
    let accepted = acceptors.accepted.clone();
    let settle = |raw: &mut RawFlows, guest: &mut Guest, more: bool| {
        if more {
            raw.open(&mut guest.nic, 32, 64);
        }
        guest.poll();
        raw.handle(&mut guest.nic);
        assert!(
            raw.next < 2 * capacity && Instant::now() < deadline,
            "{} opened, {} established, {} refused, {} pending, {} accepted by the host; \
             baton log (tail):\n{}",
            raw.next,
            raw.established,
            raw.refused,
            raw.pending,
            accepted.load(Ordering::Relaxed),
            log_tail(&baton)
        );
        if raw.pending > 0 {
            guest.wait();
        }
    };
    while raw.refused == 0 || raw.pending > 0 {
        let more = raw.refused == 0;
        settle(&mut raw, &mut guest, more);
    }
    let (established, refused) = (raw.established, raw.refused);
    raw.open(&mut guest.nic, extra, extra);
    while raw.pending > 0 {
        settle(&mut raw, &mut guest, false);
    }
    assert_eq!(
        (raw.established, raw.refused - refused),
        (established, extra),
        "(established, refused) after the limit was reached"
    );
    let open = raw.established + streams.len();
    let reason = match bound {
        Bound::Descriptors(limit) => {
            // One descriptor per connection: all but baton's fixed few went to
            // connections.
            assert!(
                open > capacity - 64 && open < capacity,
                "{open} connections open under a limit of {limit} descriptors"
            );
            "Too many open files"
        }
        Bound::Table(flows) => {
            assert_eq!(open, flows, "connections open with --max-flows {flows}");
            "TCP flow table full"
        }
    };
    assert!(
        baton.log().contains(reason),
        "baton's log does not say why it refused ({reason:?}): {}",
        log_tail(&baton)
    );

    // New connections from the guest: refused with a RST, v4 and v6.
    for (i, dst) in [(IpAddress::Ipv4(GW_V4), p4), (IpAddress::Ipv6(GW_V6), p6)]
        .into_iter()
        .enumerate()
    {
        let handle = guest.socket(4 << 10);
        guest.connect(handle, dst, 200 + i as u16);
        guest.poll_until(
            &baton,
            "the refusal of a guest connection",
            TEST_TIMEOUT,
            |g| g.tcp(handle).state() == tcp::State::Closed,
        );
        guest.sockets.remove(handle);
    }

    // A host connecting to the forwarded port is refused with a RST, not left hanging
    // (baton has no descriptor for it, or no table slot).
    for forward in ["127.0.0.1:5000", "[::1]:5000"] {
        let mut host = std::net::TcpStream::connect(forward).expect("connect to the forward");
        host.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        match std::io::Read::read(&mut host, &mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!(
                "a host connection to {forward} at the limit: {other:?} instead of a reset; \
                 baton log (tail):\n{}",
                log_tail(&baton)
            ),
        }
    }

    // The connections that existed before stream both ways, every byte checked.
    stream_both_sides(&mut guest, &mut streams, &baton, host, TEST_TIMEOUT);
    raw.handle(&mut guest.nic);

    // Slots freed by the guest (ten raw connections reset) admit new connections again.
    raw.reset(&mut guest.nic, 10);
    let v4 = hostflows::listen((Ipv4Addr::LOCALHOST, 0).into()).expect("listen v4");
    let p4 = port_of(&v4);
    let small = (64 << 10, 64 << 10);
    let server = spawn_host(host_flows(small).accept(v4, 1));
    let handle = guest.socket(64 << 10);
    guest.connect(handle, (IpAddress::Ipv4(GW_V4), p4), 300);
    let mut again = [GuestStream::outbound(handle, 9, small)];
    stream_both_sides(&mut guest, &mut again, &baton, server, TEST_TIMEOUT);
    raw.handle(&mut guest.nic);
    let held = acceptors.finish();
    assert_eq!(
        held.len(),
        raw.established + 10,
        "host connections accepted"
    );
    drop(baton);
    drop(held);
}
