//! Same-host live migration at scale (issue 5): SAVE from one `baton`, LOAD into
//! another, with N = 1, 100, 1,000 and 10,000 TCP connections, data in flight both ways
//! at SAVE, half-closed flows in both directions, and UDP flows; every byte is checked
//! after the migration.
//!
//! Both backends run with `--helper` in a private network namespace, so SAVE takes the
//! whole production path (dump through `baton-repair` *and* the handover offer) and the
//! target takes the live sockets over. The source's descriptors are counted while its
//! offer is open: one per connection (the flow's own socket is offered, not a
//! duplicate); at 10,000 connections two per connection would not even fit under this
//! machine's hard limit of 20,000.
//!
//! Everything runs on the test's one thread, driven by poll(2): a compact guest TCP
//! ([`Guest`], raw frames through the vhost-user test frontend; smoltcp scans every
//! socket for every frame, too slow for 10,000) and the host peers ([`Host`], non-blocking
//! sockets). Each connection's guest sends a 4-byte index, then its own pattern
//! (`baton_testkit::pattern`, seeded per connection and direction) in phases:
//!
//! 1. *before*: some bytes each way, all acknowledged; flows of kind `GuestClosed` send
//!    their FIN, flows of kind `HostClosed` get the peer's FIN (half-closed at SAVE);
//! 2. *in flight*: the guest stops reading its receive ring (nothing acknowledged) and
//!    the host peer stops reading; both write more. At SAVE the host's bytes sit
//!    unacknowledged in baton's sockets and the guest's partly in baton's send queues
//!    (the peer's small receive buffer is full) and partly unacknowledged in the guest;
//! 3. SAVE on the source, LOAD on the target, the guest continues on the target: the
//!    guest retransmits what it never saw acknowledged, the host reads again, both send
//!    the rest and close. Every byte is verified where it arrives, both ends see exactly
//!    the planned length and an orderly close. No RST may reach the guest: not even
//!    when a full receive ring held back baton's ACKs of the guest's last segments and
//!    FIN and the guest retransmitted them after baton had closed the connection (one
//!    flow in ten at 10,000 did, before baton remembered closed connections for a few
//!    seconds, see `tcp::closed`).
//!
//! UDP: 16 flows (fewer for N < 16), each sends a datagram before SAVE (answered), one
//! just before SAVE (carried in flight), and one after LOAD (answered through the
//! target); the guest sends a datagram again while its answer is missing, as an
//! application would (a full receive ring drops datagrams).
//!
//! N = 10,000 runs in optimized builds only (a few seconds there, minutes in a debug
//! build): `cargo test --release -p baton --test migrate_scale`.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use baton_proto::migration::decode_stream;
use baton_testkit::pattern::Pattern;
use baton_vu_harness::{FrontendOptions, NetFrontend};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

mod common;
use common::guest::v4_pair_with_helper;
use common::Baton;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// baton's default MAC towards the guest.
const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Guest ports: connection `i` uses `FIRST_PORT + i`, UDP flow `j` `UDP_FIRST_PORT + j`.
const FIRST_PORT: u16 = 20000;
const UDP_FIRST_PORT: u16 = 40000;
const MSS: u16 = 1460;
const GUEST_WINDOW: u16 = 65535;
const GUEST_ISN: u32 = 0x4000_0000;
/// Handshakes in progress at a time: thousands of SYNs at once only overflow queues.
const SYN_WINDOW: usize = 256;
/// The guest goes back to its oldest unacknowledged byte after this long without
/// progress (and probes a closed window).
const GUEST_RTO: Duration = Duration::from_millis(400);
/// How long the in-flight phase runs before SAVE.
const SETTLE: Duration = Duration::from_millis(500);
/// Peer receive buffer: small, so that what the guest sends while the peer does not
/// read stays in baton's send queue.
const PEER_RCVBUF: libc::c_int = 4096;
/// Descriptors a backend holds besides its connections (epoll, eventfds, vhost-user,
/// helper, listeners, UDP flows, logs): generous, far below one per connection.
const FD_SLACK: usize = 96;

// ---------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Data both ways until the end.
    Both,
    /// The guest sent its FIN before SAVE; the host still sends.
    GuestClosed,
    /// The host sent its FIN before SAVE; the guest still sends.
    HostClosed,
}

fn kind_of(i: usize) -> Kind {
    match i % 5 {
        1 => Kind::GuestClosed,
        3 => Kind::HostClosed,
        _ => Kind::Both,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Before,
    InFlight,
    After,
}

/// Bytes per connection and direction in each phase.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    before: u64,
    in_flight: u64,
    after: u64,
}

impl Sizes {
    fn for_count(n: usize) -> Self {
        match n {
            0..=10 => Sizes {
                before: 100_000,
                in_flight: 60_000,
                after: 300_000,
            },
            11..=1000 => Sizes {
                before: 3000,
                in_flight: 12_000,
                after: 6000,
            },
            _ => Sizes {
                before: 300,
                in_flight: 6000,
                after: 700,
            },
        }
    }

    /// Pattern bytes a direction carries up to the end of `phase` (`closed`: that
    /// direction ends after the first phase).
    fn limit(&self, phase: Phase, closed: bool) -> u64 {
        match (phase, closed) {
            (Phase::Before, _) | (_, true) => self.before,
            (Phase::InFlight, false) => self.before + self.in_flight,
            (Phase::After, false) => self.before + self.in_flight + self.after,
        }
    }
}

fn up_pattern(index: u32) -> Pattern {
    Pattern::new(0x7_0000_0000 + u64::from(index))
}

fn down_pattern(index: u32) -> Pattern {
    Pattern::new(0x8_0000_0000 + u64::from(index))
}

fn udp_pattern(flow: u16, datagram: u8, reply: bool) -> Pattern {
    Pattern::new(
        0x9_0000_0000 + (u64::from(flow) << 9) + (u64::from(datagram) << 1) + u64::from(reply),
    )
}

/// Pattern bytes per datagram, after a 3-byte header (datagram number, flow number).
const UDP_LEN: usize = 700;

fn udp_payload(flow: u16, datagram: u8, reply: bool) -> Vec<u8> {
    let mut payload = vec![datagram];
    payload.extend_from_slice(&flow.to_be_bytes());
    payload.extend_from_slice(&udp_pattern(flow, datagram, reply).bytes(0, UDP_LEN));
    payload
}

/// Check a datagram built by [`udp_payload`]; returns (flow, datagram).
fn udp_check(payload: &[u8], reply: bool) -> (u16, u8) {
    assert_eq!(payload.len(), UDP_LEN + 3, "datagram size");
    let datagram = payload[0];
    let flow = u16::from_be_bytes([payload[1], payload[2]]);
    udp_pattern(flow, datagram, reply)
        .verify(0, &payload[3..])
        .unwrap_or_else(|m| panic!("UDP flow {flow} datagram {datagram} (reply {reply}): {m}"));
    (flow, datagram)
}

// ---------------------------------------------------------------------------------------
// The guest: a compact TCP over raw frames
// ---------------------------------------------------------------------------------------

const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const ACK: u8 = 0x10;

fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

fn seq_le(a: u32, b: u32) -> bool {
    a == b || seq_lt(a, b)
}

/// The guest's end of one connection. Stream offsets count the 4-byte index header:
/// up byte `k` has sequence number `GUEST_ISN + 1 + k`.
#[derive(Debug)]
struct GuestConn {
    index: u32,
    kind: Kind,
    established: bool,
    /// Offsets into the up stream.
    snd_una: u64,
    snd_nxt: u64,
    snd_max: u64,
    /// Highest up offset the window allows (snd_una + window).
    wnd_edge: u64,
    fin_sent: bool,
    /// A FIN went out at least once (at offset `snd_max`).
    fin_ever: bool,
    fin_acked: bool,
    last_progress: Instant,
    irs: u32,
    /// Down pattern bytes received and verified.
    received: u64,
    fin_received: bool,
    need_ack: bool,
    /// RSTs that mean something went wrong.
    resets: usize,
    /// Segments received from the backend (since the last migration), for reports.
    segments_in: usize,
    /// The last one: (sequence, acknowledgement offset, flags, payload length).
    last_in: (u32, u64, u8, usize),
    error: Option<String>,
}

impl GuestConn {
    fn up_limit(&self, sizes: &Sizes, phase: Phase) -> u64 {
        4 + sizes.limit(phase, self.kind == Kind::GuestClosed)
    }

    fn down_limit(&self, sizes: &Sizes, phase: Phase) -> u64 {
        sizes.limit(phase, self.kind == Kind::HostClosed)
    }

    /// The guest sends its FIN once everything it has is sent.
    fn wants_fin(&self, phase: Phase) -> bool {
        self.kind == Kind::GuestClosed || phase == Phase::After
    }

    fn rcv_nxt(&self) -> u32 {
        self.irs
            .wrapping_add(1)
            .wrapping_add(self.received as u32)
            .wrapping_add(u32::from(self.fin_received))
    }

    fn up_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let header = self.index.to_be_bytes();
        let mut k = offset;
        while k < 4 && out.len() < len {
            out.push(header[k as usize]);
            k += 1;
        }
        let rest = len - out.len();
        if rest > 0 {
            out.extend_from_slice(&up_pattern(self.index).bytes(k - 4, rest));
        }
        out
    }
}

struct Guest {
    dev: NetFrontend,
    conns: Vec<GuestConn>,
    /// Connections opened so far and handshakes in progress.
    opened: usize,
    pending: usize,
    /// Received UDP replies, verified: (flow, datagram).
    udp_replies: Vec<(u16, u8)>,
    udp_port: u16,
    tcp_port: u16,
    /// While true, frames from the backend are read and dropped (the VM is about to stop:
    /// nothing is acknowledged).
    deaf: bool,
    next_send: usize,
}

fn tcp_frame(src: u16, dst: u16, seq: u32, ack: Option<u32>, flags: u8, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
        .ipv4(GUEST_V4.octets(), GW_V4.octets(), 64)
        .tcp(src, dst, seq, GUEST_WINDOW);
    let mut builder = match ack {
        Some(ack) => builder.ack(ack),
        None => builder,
    };
    if flags & SYN != 0 {
        builder = builder
            .syn()
            .options(&[TcpOptionElement::MaximumSegmentSize(MSS)])
            .expect("MSS option");
    }
    if flags & FIN != 0 {
        builder = builder.fin();
    }
    if !payload.is_empty() {
        builder = builder.psh();
    }
    let mut frame = Vec::with_capacity(64 + payload.len());
    builder.write(&mut frame, payload).expect("build TCP frame");
    frame
}

fn udp_frame(src: u16, dst: u16, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
        .ipv4(GUEST_V4.octets(), GW_V4.octets(), 64)
        .udp(src, dst);
    let mut frame = Vec::with_capacity(64 + payload.len());
    builder.write(&mut frame, payload).expect("build UDP frame");
    frame
}

impl Guest {
    fn new(dev: NetFrontend, n: usize, tcp_port: u16, udp_port: u16) -> Self {
        let now = Instant::now();
        let conns = (0..n)
            .map(|i| GuestConn {
                index: i as u32,
                kind: kind_of(i),
                established: false,
                snd_una: 0,
                snd_nxt: 0,
                snd_max: 0,
                wnd_edge: 0,
                fin_sent: false,
                fin_ever: false,
                fin_acked: false,
                last_progress: now,
                irs: 0,
                received: 0,
                fin_received: false,
                need_ack: false,
                resets: 0,
                segments_in: 0,
                last_in: (0, 0, 0, 0),
                error: None,
            })
            .collect();
        Guest {
            dev,
            conns,
            opened: 0,
            pending: 0,
            udp_replies: Vec::new(),
            udp_port,
            tcp_port,
            deaf: false,
            next_send: 0,
        }
    }

    fn port(i: usize) -> u16 {
        FIRST_PORT + i as u16
    }

    fn send(&mut self, frame: &[u8]) {
        self.dev.send_frame(frame).expect("guest transmit");
    }

    /// Open more connections, keeping at most [`SYN_WINDOW`] handshakes in progress.
    fn open_more(&mut self) {
        while self.opened < self.conns.len() && self.pending < SYN_WINDOW {
            let i = self.opened;
            let frame = tcp_frame(Self::port(i), self.tcp_port, GUEST_ISN, None, SYN, &[]);
            self.send(&frame);
            self.conns[i].last_progress = Instant::now();
            self.opened += 1;
            self.pending += 1;
        }
    }

    /// Read every frame the backend has for us; returns how many.
    fn receive(&mut self, sizes: &Sizes) -> usize {
        let mut count = 0;
        while let Some(frame) = self.dev.try_recv_frame().expect("guest receive") {
            count += 1;
            if !self.deaf {
                self.handle(&frame, sizes);
            }
        }
        count
    }

    fn handle(&mut self, frame: &[u8], sizes: &Sizes) {
        let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
            return;
        };
        let Some(NetSlice::Ipv4(_)) = packet.net else {
            return;
        };
        match packet.transport {
            Some(TransportSlice::Udp(udp)) => {
                assert_eq!(udp.source_port(), self.udp_port, "UDP reply's source port");
                let (flow, datagram) = udp_check(udp.payload(), true);
                assert_eq!(
                    udp.destination_port(),
                    UDP_FIRST_PORT + flow,
                    "UDP reply's port"
                );
                if !self.udp_replies.contains(&(flow, datagram)) {
                    self.udp_replies.push((flow, datagram));
                }
            }
            Some(TransportSlice::Tcp(tcp)) => {
                let port = tcp.destination_port();
                let Some(i) = port
                    .checked_sub(FIRST_PORT)
                    .map(usize::from)
                    .filter(|i| *i < self.opened)
                else {
                    panic!("TCP segment for guest port {port}, no connection there");
                };
                let was_pending = !self.conns[i].established;
                self.conns[i].segments_in += 1;
                handle_segment(&mut self.conns[i], &tcp, sizes);
                if was_pending && self.conns[i].established {
                    self.pending -= 1;
                }
            }
            _ => {}
        }
    }

    /// Send what the windows allow (at most `budget` segments), retransmit what waited
    /// too long, and acknowledge what arrived. Returns the segments sent.
    fn transmit(&mut self, sizes: &Sizes, phase: Phase, budget: usize) -> usize {
        let now = Instant::now();
        let mut sent = 0;
        let n = self.opened;
        let mut frames = Vec::new();
        for step in 0..n {
            if sent >= budget {
                break;
            }
            let i = (self.next_send + step) % n;
            let c = &mut self.conns[i];
            let src = Self::port(i);
            if !c.established {
                if now.duration_since(c.last_progress) > GUEST_RTO * 2 {
                    c.last_progress = now;
                    frames.push(tcp_frame(src, self.tcp_port, GUEST_ISN, None, SYN, &[]));
                    sent += 1;
                }
                continue;
            }
            let limit = c.up_limit(sizes, phase);
            let outstanding = c.snd_una < c.snd_max || (c.fin_sent && !c.fin_acked);
            let window_closed = c.snd_nxt < limit && c.wnd_edge <= c.snd_nxt;
            let mut force = false;
            if (outstanding || window_closed) && now.duration_since(c.last_progress) > GUEST_RTO {
                // Retransmission (back to the oldest unacknowledged byte), or a probe of a
                // closed window: one segment goes out whatever the window says.
                c.last_progress = now;
                c.snd_nxt = c.snd_una;
                if !c.fin_acked {
                    c.fin_sent = false;
                }
                force = true;
            }
            while sent < budget && c.snd_nxt < limit && (force || c.snd_nxt < c.wnd_edge) {
                let room = if c.snd_nxt < c.wnd_edge {
                    c.wnd_edge - c.snd_nxt
                } else {
                    1
                };
                let len = (limit - c.snd_nxt).min(room).min(u64::from(MSS)) as usize;
                let seq = GUEST_ISN.wrapping_add(1).wrapping_add(c.snd_nxt as u32);
                let data = c.up_bytes(c.snd_nxt, len);
                frames.push(tcp_frame(
                    src,
                    self.tcp_port,
                    seq,
                    Some(c.rcv_nxt()),
                    ACK,
                    &data,
                ));
                c.snd_nxt += len as u64;
                c.snd_max = c.snd_max.max(c.snd_nxt);
                c.need_ack = false;
                force = false;
                sent += 1;
            }
            if c.snd_nxt == limit && c.wants_fin(phase) && !c.fin_sent && sent < budget {
                let seq = GUEST_ISN.wrapping_add(1).wrapping_add(c.snd_nxt as u32);
                frames.push(tcp_frame(
                    src,
                    self.tcp_port,
                    seq,
                    Some(c.rcv_nxt()),
                    FIN | ACK,
                    &[],
                ));
                c.fin_sent = true;
                c.fin_ever = true;
                c.need_ack = false;
                sent += 1;
            }
            if c.need_ack {
                let seq = GUEST_ISN
                    .wrapping_add(1)
                    .wrapping_add(c.snd_nxt as u32)
                    .wrapping_add(u32::from(c.fin_sent));
                frames.push(tcp_frame(
                    src,
                    self.tcp_port,
                    seq,
                    Some(c.rcv_nxt()),
                    ACK,
                    &[],
                ));
                c.need_ack = false;
                sent += 1;
            }
        }
        if n > 0 {
            self.next_send = (self.next_send + 1) % n;
        }
        for frame in &frames {
            self.send(frame);
        }
        sent
    }

    fn send_udp(&mut self, flows: u16, datagram: u8) {
        for flow in 0..flows {
            if self.udp_replies.contains(&(flow, datagram)) {
                continue;
            }
            let frame = udp_frame(
                UDP_FIRST_PORT + flow,
                self.udp_port,
                &udp_payload(flow, datagram, false),
            );
            self.send(&frame);
        }
    }

    fn udp_replied(&self, flows: u16, datagram: u8) -> bool {
        self.udp_replies
            .iter()
            .filter(|(_, d)| *d == datagram)
            .count()
            == usize::from(flows)
    }
}

fn handle_segment(c: &mut GuestConn, tcp: &etherparse::TcpSlice<'_>, sizes: &Sizes) {
    c.last_in = (
        tcp.sequence_number().wrapping_sub(c.irs),
        u64::from(
            tcp.acknowledgment_number()
                .wrapping_sub(GUEST_ISN.wrapping_add(1)),
        ),
        tcp.slice()[13],
        tcp.payload().len(),
    );
    if tcp.rst() {
        // Every RST fails the test, also one answering a retransmission after baton
        // closed the connection (its late ACKs are answered again instead).
        c.resets += 1;
        let state = format!(
            "reset by baton (ack {}; guest una {} max {} fin {}/{}/{} rcvd {} fin_in {})",
            tcp.acknowledgment_number()
                .wrapping_sub(GUEST_ISN.wrapping_add(1)),
            c.snd_una,
            c.snd_max,
            c.fin_ever,
            c.fin_sent,
            c.fin_acked,
            c.received,
            c.fin_received
        );
        c.error.get_or_insert(state);
        return;
    }
    if tcp.syn() {
        if !c.established {
            assert!(tcp.ack(), "connection {}: SYN without ACK", c.index);
            assert_eq!(tcp.acknowledgment_number(), GUEST_ISN.wrapping_add(1));
            c.irs = tcp.sequence_number();
            c.established = true;
            c.wnd_edge = u64::from(tcp.window_size());
            c.last_progress = Instant::now();
        }
        c.need_ack = true;
        return;
    }
    if !c.established {
        c.error
            .get_or_insert_with(|| "segment before the handshake".into());
        return;
    }
    if tcp.ack() {
        // Acknowledged offset in the up stream (a FIN counts one beyond `snd_max`).
        let acked = u64::from(
            tcp.acknowledgment_number()
                .wrapping_sub(GUEST_ISN.wrapping_add(1)),
        );
        let fin_end = c.snd_max + u64::from(c.fin_ever);
        if acked >= c.snd_una && acked <= fin_end {
            if acked > c.snd_una {
                c.last_progress = Instant::now();
            }
            if c.fin_ever && acked == fin_end {
                c.fin_acked = true;
                c.fin_sent = true;
            }
            c.snd_una = acked.min(c.snd_max);
            c.snd_nxt = c.snd_nxt.max(c.snd_una);
            let edge = c.snd_una + u64::from(tcp.window_size());
            if edge > c.wnd_edge {
                c.last_progress = Instant::now();
            }
            c.wnd_edge = edge;
        } else if acked > fin_end && acked.wrapping_sub(fin_end) < 1 << 30 {
            c.error
                .get_or_insert_with(|| format!("ACK of {acked}, beyond what was sent ({fin_end})"));
        }
    }
    let payload = tcp.payload();
    let seq = tcp.sequence_number();
    let rcv_nxt = c.rcv_nxt();
    if !payload.is_empty() {
        c.need_ack = true;
        let end = seq.wrapping_add(payload.len() as u32);
        if !c.fin_received && seq_le(seq, rcv_nxt) && seq_lt(rcv_nxt, end) {
            let new = &payload[rcv_nxt.wrapping_sub(seq) as usize..];
            let limit = sizes.limit(Phase::After, c.kind == Kind::HostClosed);
            if c.received + new.len() as u64 > limit {
                c.error
                    .get_or_insert_with(|| format!("more than {limit} bytes from the host"));
                return;
            }
            if let Err(m) = down_pattern(c.index).verify(c.received, new) {
                c.error
                    .get_or_insert_with(|| format!("corrupt data from the host: {m}"));
                return;
            }
            c.received += new.len() as u64;
        }
    }
    if tcp.fin() {
        c.need_ack = true;
        let fin_seq = seq.wrapping_add(payload.len() as u32);
        if !c.fin_received && fin_seq == c.rcv_nxt() {
            c.fin_received = true;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The host peers
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
struct HostConn {
    stream: TcpStream,
    index: Option<u32>,
    header: Vec<u8>,
    /// Up pattern bytes received and verified.
    received: u64,
    eof: bool,
    sent: u64,
    shut: bool,
}

struct Host {
    listener: TcpListener,
    conns: Vec<HostConn>,
    /// Connection index → position in `conns`.
    by_index: HashMap<u32, usize>,
    udp: UdpSocket,
    /// Datagrams received: (flow, datagram) → the address baton sent it from.
    udp_seen: HashMap<(u16, u8), SocketAddr>,
    /// The peer does not read while true (phase 2).
    paused: bool,
    errors: Vec<String>,
    buf: Vec<u8>,
}

impl Host {
    fn new() -> Self {
        // A backlog of 4,096, not std's 128: a burst of handshakes must not overflow the
        // accept queue (the peer's kernel would drop the final ACKs and later reset
        // connections baton already counts as established).
        let listener = baton_testkit::peer::listen(Ipv4Addr::LOCALHOST.into()).expect("listen");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        // Accepted sockets inherit it: a small window for the guest's data.
        set_rcvbuf(listener.as_fd(), PEER_RCVBUF);
        let udp = UdpSocket::bind("127.0.0.1:0").expect("UDP bind");
        udp.set_nonblocking(true).expect("non-blocking UDP");
        Host {
            listener,
            conns: Vec::new(),
            by_index: HashMap::new(),
            udp,
            udp_seen: HashMap::new(),
            paused: false,
            errors: Vec::new(),
            buf: vec![0; 65536],
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(true).expect("non-blocking");
                    self.conns.push(HostConn {
                        stream,
                        index: None,
                        header: Vec::new(),
                        received: 0,
                        eof: false,
                        sent: 0,
                        shut: false,
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Read what `conns[k]` has (unless paused).
    fn read(&mut self, k: usize, sizes: &Sizes) {
        let c = &mut self.conns[k];
        while !c.eof {
            match c.stream.read(&mut self.buf) {
                Ok(0) => c.eof = true,
                Ok(n) => {
                    let mut data = &self.buf[..n];
                    if c.index.is_none() {
                        let take = (4 - c.header.len()).min(data.len());
                        c.header.extend_from_slice(&data[..take]);
                        data = &data[take..];
                        if c.header.len() == 4 {
                            let index = u32::from_be_bytes(c.header[..].try_into().expect("4"));
                            c.index = Some(index);
                            assert!(
                                self.by_index.insert(index, k).is_none(),
                                "index {index} twice"
                            );
                        }
                    }
                    let Some(index) = c.index else { continue };
                    let total =
                        sizes.limit(Phase::After, kind_of(index as usize) == Kind::GuestClosed);
                    if c.received + data.len() as u64 > total {
                        self.errors
                            .push(format!("connection {index}: more than {total} bytes"));
                        c.eof = true;
                        return;
                    }
                    if let Err(m) = up_pattern(index).verify(c.received, data) {
                        self.errors.push(format!(
                            "connection {index}: corrupt data from the guest: {m}"
                        ));
                        c.eof = true;
                        return;
                    }
                    c.received += data.len() as u64;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.errors
                        .push(format!("connection {:?}: read: {e}", c.index));
                    c.eof = true;
                }
            }
        }
    }

    /// Does `conns[k]` have bytes to write in `phase`?
    fn wants_write(&self, k: usize, sizes: &Sizes, phase: Phase) -> bool {
        let c = &self.conns[k];
        c.index.is_some_and(|index| {
            c.sent < sizes.limit(phase, kind_of(index as usize) == Kind::HostClosed)
        })
    }

    /// Write what `conns[k]` may send in `phase`, and close it when it is done: a
    /// `HostClosed` connection at once, the others in the last phase after the guest's
    /// FIN (as an application answering a request would).
    fn write(&mut self, k: usize, sizes: &Sizes, phase: Phase) {
        let c = &mut self.conns[k];
        let Some(index) = c.index else { return };
        let kind = kind_of(index as usize);
        let limit = sizes.limit(phase, kind == Kind::HostClosed);
        while c.sent < limit {
            let len = (limit - c.sent).min(32768) as usize;
            match c.stream.write(&down_pattern(index).bytes(c.sent, len)) {
                Ok(n) => c.sent += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.errors.push(format!("connection {index}: write: {e}"));
                    return;
                }
            }
        }
        let closes = kind == Kind::HostClosed || (phase == Phase::After && c.eof);
        if closes && !c.shut && c.sent == sizes.limit(Phase::After, kind == Kind::HostClosed) {
            if let Err(e) = c.stream.shutdown(Shutdown::Write) {
                self.errors
                    .push(format!("connection {index}: shutdown: {e}"));
            }
            c.shut = true;
        }
    }

    /// Take the guest's datagrams; answer the first and third of each flow at once
    /// (the second arrives just before SAVE: its source port moves with the flow).
    fn udp_receive(&mut self) {
        loop {
            match self.udp.recv_from(&mut self.buf) {
                Ok((n, from)) => {
                    let (flow, datagram) = udp_check(&self.buf[..n], false);
                    // A datagram sent again comes from the same flow, so the same port.
                    let first = *self.udp_seen.entry((flow, datagram)).or_insert(from);
                    assert_eq!(
                        first, from,
                        "UDP flow {flow} datagram {datagram}: source moved"
                    );
                    if datagram != 2 {
                        self.udp
                            .send_to(&udp_payload(flow, datagram, true), from)
                            .expect("UDP reply");
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => panic!("UDP receive: {e}"),
            }
        }
    }
}

fn set_rcvbuf(fd: BorrowedFd<'_>, bytes: libc::c_int) {
    // SAFETY: `bytes` lives across the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------
// The loop: guest and host on one thread
// ---------------------------------------------------------------------------------------

struct World {
    guest: Guest,
    host: Host,
    sizes: Sizes,
    phase: Phase,
    /// Both backends' logs, for failure reports.
    logs: Vec<std::path::PathBuf>,
    /// UDP datagram the guest wants answered on each of its flows (sent again, as an
    /// application would, while a reply is missing: a full receive ring drops
    /// datagrams), and when it last sent.
    udp_wanted: Option<(u16, u8, Instant)>,
}

impl World {
    /// One round: wait (poll) for the guest's receive ring or any host socket, then let
    /// everyone move.
    fn round(&mut self, wait: Duration) {
        let sizes = self.sizes;
        let phase = self.phase;
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(self.host.conns.len() + 3);
        fds.push(PollFd::new(self.guest.dev.call_fd(0), PollFlags::POLLIN));
        fds.push(PollFd::new(self.host.listener.as_fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(self.host.udp.as_fd(), PollFlags::POLLIN));
        for k in 0..self.host.conns.len() {
            let c = &self.host.conns[k];
            let mut events = PollFlags::empty();
            if !self.host.paused && !c.eof {
                events |= PollFlags::POLLIN;
            }
            if self.host.wants_write(k, &sizes, phase) {
                events |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(c.stream.as_fd(), events));
        }
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        poll(&mut fds, PollTimeout::from(ms)).expect("poll");
        let ready: Vec<(usize, PollFlags)> = fds
            .iter()
            .enumerate()
            .skip(3)
            .filter_map(|(k, fd)| fd.revents().filter(|r| !r.is_empty()).map(|r| (k - 3, r)))
            .collect();
        let call_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        drop(fds);
        if call_ready {
            let mut counter = [0u8; 8];
            // SAFETY: reading 8 bytes into our buffer from the eventfd we polled.
            unsafe {
                libc::read(
                    self.guest.dev.call_fd(0).as_raw_fd(),
                    counter.as_mut_ptr().cast(),
                    8,
                )
            };
        }
        let before = self.host.conns.len();
        self.host.accept();
        self.host.udp_receive();
        for (k, revents) in ready {
            if !self.host.paused
                && revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR)
            {
                self.host.read(k, &sizes);
            }
            // After a read too: the index may be known now, or the guest's FIN in.
            self.host.write(k, &sizes, phase);
        }
        for k in before..self.host.conns.len() {
            if !self.host.paused {
                self.host.read(k, &sizes);
            }
            self.host.write(k, &sizes, phase);
        }
        self.guest.receive(&sizes);
        self.guest.open_more();
        if let Some((flows, datagram, last)) = self.udp_wanted {
            if last.elapsed() > GUEST_RTO {
                self.guest.send_udp(flows, datagram);
                self.udp_wanted = Some((flows, datagram, Instant::now()));
            }
        }
        for _ in 0..8 {
            if self.guest.transmit(&sizes, phase, 128) == 0 {
                break;
            }
            self.guest.receive(&sizes);
        }
        self.guest.receive(&sizes);
    }

    /// Run rounds until `done`, failing after `timeout` with `what` and a summary.
    fn run_until(&mut self, what: &str, timeout: Duration, done: impl Fn(&World) -> bool) {
        let started = Instant::now();
        let deadline = started + timeout;
        while !done(self) {
            self.check_errors();
            assert!(
                Instant::now() < deadline,
                "{what}: timed out; {}",
                self.summary()
            );
            self.round(Duration::from_millis(5));
        }
        self.check_errors();
        eprintln!(
            "{} connections: {what} took {:.1} s",
            self.guest.conns.len(),
            started.elapsed().as_secs_f64()
        );
    }

    /// Newly written host connections need a write round even when not polled ready.
    fn kick_host_writes(&mut self) {
        let sizes = self.sizes;
        let phase = self.phase;
        for k in 0..self.host.conns.len() {
            self.host.write(k, &sizes, phase);
        }
    }

    fn logs(&self) -> String {
        self.logs
            .iter()
            .map(|path| {
                let log = std::fs::read_to_string(path).unwrap_or_default();
                let _ = std::fs::write(
                    format!(
                        "/tmp/msdbg-{}.log",
                        path.parent()
                            .unwrap()
                            .file_name()
                            .unwrap()
                            .to_string_lossy()
                    ),
                    &log,
                );
                let warnings: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .filter(|l| {
                        !l.contains("DEBUG")
                            || l.contains(":20003")
                            || l.contains("RST")
                            || l.contains("reset")
                    })
                    .take(40)
                    .collect();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- {} (first warnings, then the end):\n{}\n...\n{}",
                    path.display(),
                    warnings.join("\n"),
                    lines[lines.len().saturating_sub(20)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn check_errors(&self) {
        assert!(
            self.host.errors.is_empty(),
            "phase {:?}, host: {:?}\n{}",
            self.phase,
            &self.host.errors[..self.host.errors.len().min(10)],
            self.logs()
        );
        let bad: Vec<String> = self
            .guest
            .conns
            .iter()
            .filter_map(|c| {
                c.error
                    .as_ref()
                    .map(|e| format!("connection {}: {e}", c.index))
            })
            .take(10)
            .collect();
        assert!(
            bad.is_empty(),
            "phase {:?}, guest: {bad:?}\n{}",
            self.phase,
            self.logs()
        );
    }

    /// Every connection reached the end of `phase` on both sides.
    fn phase_done(&self) -> bool {
        self.host.by_index.len() >= self.guest.conns.len()
            && self.guest.conns.iter().all(|c| self.flow_done(c))
    }

    fn flow_done(&self, c: &GuestConn) -> bool {
        let phase = self.phase;
        let sizes = &self.sizes;
        let Some(&k) = self.host.by_index.get(&c.index) else {
            return false;
        };
        let h = &self.host.conns[k];
        let up = c.up_limit(sizes, phase);
        let down = c.down_limit(sizes, phase);
        let guest_fin = c.wants_fin(phase);
        let host_fin = c.kind == Kind::HostClosed || phase == Phase::After;
        let guest_sent = c.snd_una == up && (!guest_fin || c.fin_acked);
        c.established
            && guest_sent
            && c.received == down
            && c.fin_received == host_fin
            && h.received + 4 == up
            && h.eof == guest_fin
            && h.sent == down
            && h.shut == host_fin
    }

    fn summary(&self) -> String {
        let g = &self.guest;
        let established = g.conns.iter().filter(|c| c.established).count();
        let fins = g.conns.iter().filter(|c| c.fin_received).count();
        let acked = g.conns.iter().filter(|c| c.fin_acked).count();
        let resets: usize = g.conns.iter().map(|c| c.resets).sum();
        let lagging: Vec<String> = g
            .conns
            .iter()
            .filter(|c| !self.flow_done(c))
            .take(3)
            .map(|c| {
                let h = self
                    .host
                    .by_index
                    .get(&c.index)
                    .map(|&k| &self.host.conns[k]);
                format!(
                    "#{} {:?}: guest una {} nxt {} edge {} fin {}/{} rcvd {} fin_in {} segments in {} last {:?}; host {:?}",
                    c.index,
                    c.kind,
                    c.snd_una,
                    c.snd_nxt,
                    c.wnd_edge,
                    c.fin_sent,
                    c.fin_acked,
                    c.received,
                    c.fin_received,
                    c.segments_in,
                    c.last_in,
                    h.map(|h| (h.received, h.eof, h.sent, h.shut))
                )
            })
            .collect();
        format!(
            "phase {:?}: {} of {} opened, {established} established, {} accepted, \
             {fins} FINs in, {acked} FINs acked, {resets} RSTs; lagging: {lagging:?}",
            self.phase,
            g.opened,
            g.conns.len(),
            self.host.by_index.len(),
        )
    }
}

/// Descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

/// How the target comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// After SAVE is over, with the whole stream (every socket dumped, then handed over).
    Late,
    /// While SAVE still freezes: the target reads the stream's Source record as soon as
    /// it is written and connects to the offer; the source then skips the dump and the
    /// sockets move live, without kernel state in the stream.
    Early,
}

fn migrate(n: usize) {
    migrate_with(n, Arrival::Late);
}

fn migrate_with(n: usize, arrival: Arrival) {
    baton_testkit::netns::enter_private_netns().expect("private network namespace (run as root)");
    // This process holds the peers' ends.
    let nofile = baton_testkit::netns::raise_nofile(n as u64 + 1024).expect("RLIMIT_NOFILE");
    assert!(
        nofile >= n as u64 + 256,
        "RLIMIT_NOFILE {nofile} too low for {n}"
    );
    let (source, target) = v4_pair_with_helper(&format!("scale-{n}"));
    let host = Host::new();
    let tcp_port = host.listener.local_addr().expect("addr").port();
    let udp_port = host.udp.local_addr().expect("addr").port();
    let udp_flows = n.min(16) as u16;

    let mut dev = NetFrontend::connect(&source.socket(), frontend_options())
        .unwrap_or_else(|e| panic!("frontend: {e}; log:\n{}", log_tail(&source)));
    dev.start_dirty_log().expect("LOG_ALL");
    let source_base = open_fds(source.pid());
    let target_base = open_fds(target.pid());
    let mut world = World {
        guest: Guest::new(dev, n, tcp_port, udp_port),
        host,
        sizes: Sizes::for_count(n),
        phase: Phase::Before,
        logs: [&source, &target]
            .iter()
            .map(|b| b.socket().with_file_name("baton.log"))
            .collect(),
        udp_wanted: None,
    };
    let timeout = Duration::from_secs(60 + n as u64 / 40);

    // 1. The connections, their first bytes both ways, the early FINs; UDP both ways.
    world.guest.send_udp(udp_flows, 1);
    world.udp_wanted = Some((udp_flows, 1, Instant::now()));
    world.run_until("before SAVE", timeout, |w| {
        w.phase_done() && w.guest.udp_replied(udp_flows, 1)
    });

    // 2. In flight: the guest reads nothing more (acknowledges nothing), the peer reads
    // nothing more; both write.
    world.phase = Phase::InFlight;
    world.guest.deaf = true;
    world.host.paused = true;
    world.udp_wanted = None;
    world.guest.send_udp(udp_flows, 2);
    world.kick_host_writes();
    let settled = Instant::now() + SETTLE;
    world.run_until("in flight", timeout, |w| {
        let sizes = w.sizes;
        Instant::now() >= settled
            && (0..w.host.conns.len()).all(|k| !w.host.wants_write(k, &sizes, Phase::InFlight))
            && (0..udp_flows).all(|f| w.host.udp_seen.contains_key(&(f, 2)))
    });

    // 3. SAVE on the source, as QEMU does after stopping the VM (and, with a target
    // that comes early, LOAD on the target meanwhile).
    world.guest.dev.stop_rings().expect("GET_VRING_BASE");
    let (stream, early_target) = match arrival {
        Arrival::Late => {
            let stream = world
                .guest
                .dev
                .save_state()
                .unwrap_or_else(|e| panic!("SAVE: {e}; log:\n{}", log_tail(&source)));
            (stream, None)
        }
        Arrival::Early => {
            let mut stream = None;
            let target_dev = NetFrontend::connect_with(&target.socket(), frontend_options(), |t| {
                stream = Some(baton_vu_harness::migrate_device_state_early(
                    &world.guest.dev.fe,
                    &t.fe,
                    || {
                        source.wait_for_log(&[
                            "a target on this host presented the token while SAVE prepares",
                        ]);
                    },
                ));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("target frontend: {e}; log:\n{}", log_tail(&target)));
            let stream = stream.expect("the hook ran").unwrap_or_else(|e| {
                panic!(
                    "SAVE+LOAD: {e}; source:\n{}\ntarget:\n{}",
                    log_tail(&source),
                    log_tail(&target)
                )
            });
            (stream, Some(target_dev))
        }
    };
    let state = decode_stream(&stream).expect("valid stream");
    assert_eq!(state.tcp_flows.len(), n, "flows in the stream");
    assert_eq!(
        state.udp_flows.len(),
        usize::from(udp_flows),
        "UDP flows in the stream"
    );
    let with_kernel = state
        .tcp_flows
        .iter()
        .filter(|f| f.kernel.is_some())
        .count();
    let (host_unacked, guest_queued) = match arrival {
        Arrival::Late => {
            assert_eq!(with_kernel, n, "every connection dumped through the helper");
            // Data in flight both ways: the peer's bytes the guest never acknowledged
            // (every connection the peer still writes to), the guest's bytes the peer
            // did not take.
            let host_unacked = state
                .tcp_flows
                .iter()
                .filter(|f| f.kernel.as_ref().is_some_and(|k| !k.recv_queue.is_empty()))
                .count();
            let guest_queued = state
                .tcp_flows
                .iter()
                .filter(|f| f.kernel.as_ref().is_some_and(|k| !k.send_queue.is_empty()))
                .count();
            let still_down = (0..n).filter(|i| kind_of(*i) != Kind::HostClosed).count();
            assert_eq!(
                host_unacked, still_down,
                "connections with host data unacknowledged"
            );
            assert!(
                guest_queued > 0,
                "no guest data queued towards the peer at SAVE"
            );
            (host_unacked, guest_queued)
        }
        Arrival::Early => {
            assert_eq!(
                with_kernel, 0,
                "no kernel state for a target that takes the sockets"
            );
            let text = source.log();
            assert!(
                text.contains("a target on this host came for the stream")
                    && text.contains("they move live, without their kernel state"),
                "{}",
                log_tail(&source)
            );
            (0, 0)
        }
    };
    // One descriptor per connection while the offer is open (not two).
    let source_fds = open_fds(source.pid());
    assert!(
        source_fds <= source_base + n + FD_SLACK,
        "the source holds {source_fds} descriptors for {n} connections (base {source_base})"
    );

    // 4. LOAD on the target before its rings start (done already for an early target);
    // the guest runs on there.
    let target_dev = match early_target {
        Some(target_dev) => target_dev,
        None => {
            let mut loaded = None;
            let target_dev = NetFrontend::connect_with(&target.socket(), frontend_options(), |d| {
                loaded = Some(d.load_state(&stream));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("target frontend: {e}; log:\n{}", log_tail(&target)));
            loaded
                .expect("the hook ran")
                .unwrap_or_else(|e| panic!("LOAD: {e}; log:\n{}", log_tail(&target)));
            target_dev
        }
    };
    let taken = format!("{n} TCP connection(s) taken over from the source");
    assert!(target.log().contains(&taken), "{}", log_tail(&target));
    let target_fds = open_fds(target.pid());
    assert!(
        target_fds <= target_base + n + FD_SLACK,
        "the target holds {target_fds} descriptors for {n} connections (base {target_base})"
    );
    world.guest.dev = target_dev;
    for c in &mut world.guest.conns {
        c.segments_in = 0;
    }

    // 5. Everything else, every byte checked on arrival, and an orderly close.
    world.phase = Phase::After;
    world.guest.deaf = false;
    world.host.paused = false;
    world.guest.send_udp(udp_flows, 3);
    world.udp_wanted = Some((udp_flows, 3, Instant::now()));
    world.kick_host_writes();
    world.run_until("after LOAD", timeout, |w| {
        w.phase_done() && w.guest.udp_replied(udp_flows, 3)
    });
    let resets: usize = world.guest.conns.iter().map(|c| c.resets).sum();
    assert_eq!(resets, 0, "RSTs towards the guest");
    // Nothing was lost on the way: both ends saw exactly the planned bytes (checked by
    // `phase_done`), each byte verified where it arrived.
    let down: u64 = world.guest.conns.iter().map(|c| c.received).sum();
    let up: u64 = world.host.conns.iter().map(|c| c.received).sum();
    eprintln!(
        "{n} connections: {up} bytes up and {down} down verified; {host_unacked} with host \
         data and {guest_queued} with guest data in flight at SAVE; descriptors: source \
         {source_fds} (base {source_base}) with its offer open, target {target_fds} (base \
         {target_base})"
    );
    // The source let the taken connections go without a sound (no FIN or RST reached
    // the peers: they saw an orderly close only after all data, checked above).
    drop(world);
    drop(source);
    drop(target);
}

/// The largest rings baton takes: thousands of flows burst more frames than 256
/// receive buffers hold.
fn frontend_options() -> FrontendOptions {
    FrontendOptions {
        queue_size: 1024,
        ram_size: 32 << 20,
        ..FrontendOptions::default()
    }
}

fn log_tail(baton: &Baton) -> String {
    let log = baton.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// One test at a time: each brings two backends and thousands of sockets.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn one_connection_migrates() {
    let _one = serial();
    migrate(1);
}

#[test]
fn a_hundred_connections_migrate() {
    let _one = serial();
    migrate(100);
}

/// A target that comes for the stream while SAVE still freezes: no dump, the live
/// sockets move (deterministic: the source waits in its prefix until the test has seen
/// the target come).
#[test]
fn a_thousand_connections_migrate_to_a_target_that_comes_early() {
    let _one = serial();
    migrate_with(1000, Arrival::Early);
}

#[test]
fn a_thousand_connections_migrate() {
    let _one = serial();
    migrate(1000);
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "slow in a debug build: cargo test --release -p baton --test migrate_scale"
)]
fn ten_thousand_connections_migrate() {
    let _one = serial();
    migrate(10_000);
}
