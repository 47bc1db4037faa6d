//! Guest UDP over ordinary host UDP sockets: outbound flows, inbound `-u` forwards, DNS
//! forwarding, and ICMP errors for unreachable destinations.
//!
//! # Theory of operation
//!
//! A *UDP flow* is identified by the guest's view of the 4-tuple ([`FlowKey`]: the
//! guest's address and port, and the remote address and port as the guest sees them).
//! Every flow lives in one table with O(1) lookup both by that key (a guest datagram)
//! and by epoll token (a host socket that became ready), and the table never holds more
//! than its capacity ([`MAX_FLOWS`] in baton): a datagram that would need a new flow
//! while the table is full is dropped (UDP may drop), rate-limited in the log.
//!
//! Outbound (the guest sends first):
//!
//! ```text
//!  guest G:gp ─▶ R:rp ── key (G:gp, R:rp) ── miss ─▶ socket(), IP_RECVERR, connect(host_dst)
//!                                            hit ──▶ send() on the flow's connected socket
//!  guest ◀── R:rp ─▶ G:gp (UDP checksum computed) ◀── recv() on that socket
//! ```
//!
//! `host_dst` is `R:rp` after the passt address mapping: the gateway (and the IPv6
//! router's link-local address) and the `--map-host-loopback` address reach the host's
//! loopback (127.0.0.1 / ::1), the `--map-guest-addr` address reaches the host's address
//! the guest was given, and a datagram to port 53 of the DNS forwarding address
//! (`dns_forward`) goes to `dns_host:53` instead. Replies come from the connected
//! socket, so they always go back to the guest from `R:rp`, whatever `host_dst` was.
//! Broadcast, multicast and unspecified addresses are not forwarded
//! ([`FrameError::Unhandled`], logged at trace level: normal LAN chatter), nor are
//! loopback and link-local destinations ([`FrameError::UnroutableDestination`]).
//!
//! Inbound (`-u` forwards): at start, one host socket is bound per forwarded port and
//! address family (both families when the rule names no address). A datagram from host
//! sender `S` to forwarded port `hp` goes to the guest's address (or the rule's) on the
//! mapped port `gp`, from `S` as the guest should see it (loopback senders appear as
//! the `--map-host-loopback` address, the gateway by default; the host's own address,
//! which the guest shares, as the `--map-guest-addr` address or the gateway). That
//! creates a *forwarded* flow keyed like an outbound one, whose host side is "the
//! listening socket, towards `S`": the guest's replies to that key leave through
//! `sendto(listener, S)`, so they come from the port `S` sent to.
//!
//! ICMP errors: flow sockets have `IP_RECVERR`/`IPV6_RECVERR` set. The kernel then
//! queues ICMP errors about our datagrams (port unreachable from the destination, host
//! or net unreachable and time exceeded from a router, packet too big) on the socket's
//! error queue and reports `EPOLLERR`; each is read with `MSG_ERRQUEUE` (which also
//! returns the payload of the offending datagram) and turned into the matching ICMP or
//! ICMPv6 error to the guest, quoting the guest's datagram: its IP header rebuilt from
//! the flow's key (plus the hop limit it used), the UDP header of the last datagram the
//! guest sent on the flow (kept, 8 bytes), and the payload the kernel returned.
//!
//! Flows expire after [`IDLE_TIMEOUT`] (passt's 180 s) without a datagram in either
//! direction; idle flows are looked for at most once per second, from the UDP entry
//! points and [`crate::net::GuestNet::expire_idle_flows`].
//!
//! When the guest has no receive buffers, a datagram read from a host socket is dropped
//! (it was read: no busy loop on a level-triggered socket). At most
//! [`MAX_DATAGRAMS_PER_EVENT`] datagrams are read per socket per readiness event, so one
//! busy flow cannot starve the others. Datagrams that would not fit the guest's MTU are
//! dropped (baton does not fragment).
//!
//! Epoll event data: [`EPOLL_OWNER_UDP`] in the top byte; below it a flow token, or
//! [`LISTENER_BIT`] plus the index of a forwarded-port socket.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder,
};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::socket::{
    bind, connect, recv, recvfrom, recvmsg, send, sendto, setsockopt, socket, sockopt,
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrStorage,
};

use crate::config::{MacAddr, NetConfig};
use crate::net::icmp::EPOLL_OWNER_SHIFT;
use crate::net::{
    deliver, FrameError, FrameSink, Ipv4Packet, Ipv6Packet, Layer, ObservedGuest, ReplyContext,
    UdpDatagram, UnhandledTraffic,
};

/// Owner tag of UDP sockets in `GuestNet`'s epoll event data (ping is 1, TCP 2).
pub(crate) const EPOLL_OWNER_UDP: u8 = 3;
const TOKEN_MASK: u64 = (1 << EPOLL_OWNER_SHIFT) - 1;
/// Set in the token of a forwarded-port (listening) socket; the index is below it.
pub(crate) const LISTENER_BIT: u64 = 1 << 48;
const FLOW_TOKEN_MASK: u64 = LISTENER_BIT - 1;

/// A flow without datagrams in either direction for this long is closed (passt's
/// `UDP_CONN_TIMEOUT`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// At most this many UDP flows (each outbound one holds a host socket) exist at a time.
pub const MAX_FLOWS: usize = 8192;
/// Idle flows are looked for at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Datagrams read from one socket per readiness event (the epoll instance is
/// level-triggered: the rest wait for the next round).
pub const MAX_DATAGRAMS_PER_EVENT: usize = 32;
/// Queued errors read from one socket per readiness event.
const MAX_ERRORS_PER_EVENT: usize = 8;
/// Largest UDP payload (IPv4 total length limit minus the headers).
const RECV_BUFFER_LEN: usize = 65_535;
/// The DNS port, redirected for the DNS forwarding address.
pub const DNS_PORT: u16 = 53;
/// TTL/hop limit of the datagrams baton sends to the guest.
const HOP_LIMIT: u8 = 64;
/// TTL assumed for the guest's datagram when quoting it in an ICMPv4 error (the parsed
/// packet does not carry it; receivers do not look at it).
const QUOTED_TTL: u8 = 64;
/// Largest ICMPv4 error (RFC 1812 4.3.2.3) and ICMPv6 error (RFC 4443 2.4) packets.
const ICMPV4_ERROR_MAX: usize = 576;
const ICMPV6_ERROR_MAX: usize = 1280;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;
const UDP_HEADER_LEN: usize = 8;
const ICMP_HEADER_LEN: usize = 8;

/// `SO_EE_ORIGIN_ICMP` / `SO_EE_ORIGIN_ICMP6` (linux/errqueue.h).
const EE_ORIGIN_ICMP: u8 = 2;
const EE_ORIGIN_ICMP6: u8 = 3;
const ICMPV4_DEST_UNREACHABLE: u8 = 3;
const ICMPV4_FRAG_NEEDED: u8 = 4;
const ICMPV4_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;

/// Errors setting up the forwarded ports.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("cannot bind UDP port {port} on {addr}{device}: {errno}")]
    Bind {
        addr: IpAddr,
        port: u16,
        /// `%DEV` or empty.
        device: String,
        errno: Errno,
    },
    #[error("cannot watch the UDP socket of port {port}: {errno}")]
    Epoll { port: u16, errno: Errno },
}

impl From<UdpError> for std::io::Error {
    fn from(err: UdpError) -> Self {
        std::io::Error::other(err)
    }
}

/// A flow as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    /// The guest's address and port.
    pub(crate) guest: SocketAddr,
    /// The other end, as the guest addresses it.
    pub(crate) remote: SocketAddr,
}

/// Where a flow's datagrams from the guest go on the host.
#[derive(Debug)]
enum HostSide {
    /// An outbound flow: a socket of its own, connected to `host_dst`.
    Connected {
        socket: OwnedFd,
        host_dst: SocketAddr,
    },
    /// A flow started by a datagram to a forwarded port: replies leave through that
    /// port's socket (`listeners[listener]`) towards the sender `peer`.
    Forwarded { listener: usize, peer: SocketAddr },
}

/// What is kept of the last datagram the guest sent on a flow, to quote it in ICMP
/// errors (headers only, never payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SentHeader {
    udp: [u8; UDP_HEADER_LEN],
    hop_limit: u8,
}

#[derive(Debug)]
struct UdpFlow {
    key: FlowKey,
    host: HostSide,
    guest_mac: MacAddr,
    last_used: Instant,
    last_sent: Option<SentHeader>,
}

/// The socket of one forwarded host port.
#[derive(Debug)]
struct Listener {
    socket: OwnedFd,
    /// Guest address from the rule (`None`: the guest's own address).
    guest_addr: Option<IpAddr>,
    guest_port: u16,
}

/// Log classes (each with its own budget).
const LOG_GUEST: usize = 0;
const LOG_SOCKET: usize = 1;
const LOG_SEND: usize = 2;
const LOG_RECV: usize = 3;
const LOG_CLASSES: usize = 4;
/// Messages per class per second.
const LOG_BURST: u32 = 10;

/// A fixed-window log limiter: at most [`LOG_BURST`] messages per class per second;
/// the next admitted message reports how many were suppressed.
#[derive(Debug)]
struct LogBudget {
    window_start: [Instant; LOG_CLASSES],
    count: [u32; LOG_CLASSES],
    suppressed: [u64; LOG_CLASSES],
}

impl LogBudget {
    fn new(now: Instant) -> Self {
        Self {
            window_start: [now; LOG_CLASSES],
            count: [0; LOG_CLASSES],
            suppressed: [0; LOG_CLASSES],
        }
    }

    fn admit(&mut self, class: usize, now: Instant) -> Option<u64> {
        let start = self.window_start.get_mut(class)?;
        let count = self.count.get_mut(class)?;
        let suppressed = self.suppressed.get_mut(class)?;
        if now.saturating_duration_since(*start) >= Duration::from_secs(1) {
            *start = now;
            *count = 0;
        }
        if *count >= LOG_BURST {
            *suppressed = suppressed.saturating_add(1);
            return None;
        }
        *count += 1;
        Some(std::mem::take(suppressed))
    }
}

/// `limited!(budget, CLASS, now, LEVEL, "format", args...)`.
macro_rules! limited {
    ($budget:expr, $class:expr, $now:expr, $level:ident, $($arg:tt)+) => {
        if tracing::enabled!(tracing::Level::$level) {
            if let Some(suppressed) = $budget.admit($class, $now) {
                tracing::event!(tracing::Level::$level, suppressed, $($arg)+);
            }
        }
    };
}

/// All UDP flows of the guest and the forwarded-port sockets.
#[derive(Debug)]
pub struct UdpFlows {
    enabled: bool,
    capacity: usize,
    flows: HashMap<u64, UdpFlow>,
    by_key: HashMap<FlowKey, u64>,
    listeners: Vec<Listener>,
    next_token: u64,
    last_sweep: Instant,
    log: LogBudget,
    buffer: Vec<u8>,
}

impl UdpFlows {
    /// The UDP handler for `config`: binds every forwarded port (`-u`) and registers
    /// it in `epoll`. Fails if a port of a rule that is not best-effort cannot be bound.
    pub(crate) fn new(config: &NetConfig, epoll: &Epoll, now: Instant) -> Result<Self, UdpError> {
        Self::with_capacity(config, epoll, now, MAX_FLOWS)
    }

    /// As [`UdpFlows::new`], with at most `capacity` flows.
    pub(crate) fn with_capacity(
        config: &NetConfig,
        epoll: &Epoll,
        now: Instant,
        capacity: usize,
    ) -> Result<Self, UdpError> {
        let mut flows = Self {
            enabled: config.handlers.udp,
            capacity: capacity.max(1),
            flows: HashMap::new(),
            by_key: HashMap::new(),
            listeners: Vec::new(),
            next_token: 0,
            last_sweep: now,
            log: LogBudget::new(now),
            buffer: vec![0; RECV_BUFFER_LEN],
        };
        if flows.enabled {
            flows.bind_forwards(config, epoll)?;
        }
        Ok(flows)
    }

    /// Number of flows (outbound and forwarded).
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Number of forwarded-port sockets.
    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    fn bind_forwards(&mut self, config: &NetConfig, epoll: &Epoll) -> Result<(), UdpError> {
        for rule in config.udp_forwards.rules() {
            let addrs: Vec<IpAddr> = match rule.bind_to.addr {
                None => [
                    config
                        .v4
                        .as_ref()
                        .map(|_| IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                    config
                        .v6
                        .as_ref()
                        .map(|_| IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                ]
                .into_iter()
                .flatten()
                .collect(),
                Some(addr) => vec![addr],
            };
            let device = rule.bind_to.device.as_deref();
            for host_port in rule.host_ports.ports() {
                let Some(guest_port) = rule.guest_port_for(host_port) else {
                    continue;
                };
                let mut bound = 0;
                let mut first_error = None;
                for &addr in &addrs {
                    let local = SocketAddr::new(addr, host_port);
                    match bind_listener(local, device, config.freebind) {
                        Ok(socket) => {
                            self.add_listener(epoll, socket, rule.guest_addr, guest_port)
                                .map_err(|errno| UdpError::Epoll {
                                    port: host_port,
                                    errno,
                                })?;
                            bound += 1;
                        }
                        Err(errno) => {
                            tracing::debug!("UDP port {local} not bound: {errno}");
                            first_error.get_or_insert((addr, errno));
                        }
                    }
                }
                if let (0, Some((addr, errno)), false) = (bound, first_error, rule.best_effort) {
                    return Err(UdpError::Bind {
                        addr,
                        port: host_port,
                        device: device.map(|d| format!("%{d}")).unwrap_or_default(),
                        errno,
                    });
                }
            }
        }
        if !self.listeners.is_empty() {
            tracing::info!("UDP: {} forwarded port sockets", self.listeners.len());
        }
        Ok(())
    }

    fn add_listener(
        &mut self,
        epoll: &Epoll,
        socket: OwnedFd,
        guest_addr: Option<IpAddr>,
        guest_port: u16,
    ) -> Result<(), Errno> {
        let index = self.listeners.len() as u64;
        let token = (u64::from(EPOLL_OWNER_UDP) << EPOLL_OWNER_SHIFT) | LISTENER_BIT | index;
        epoll.add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, token))?;
        self.listeners.push(Listener {
            socket,
            guest_addr,
            guest_port,
        });
        Ok(())
    }

    /// A UDP/IPv4 datagram from the guest (IP and UDP already validated), not for the
    /// DHCP server.
    pub(crate) fn handle_guest_v4(
        &mut self,
        ctx: &ReplyContext<'_>,
        epoll: &Epoll,
        ip: &Ipv4Packet<'_>,
        udp: &UdpDatagram<'_>,
        now: Instant,
    ) -> Result<(), FrameError> {
        let Some(v4) = ctx.config.v4.as_ref() else {
            return Ok(());
        };
        if ip.src.is_unspecified() || ip.dst.is_broadcast() || ip.dst.is_multicast() {
            return Err(FrameError::Unhandled(UnhandledTraffic::Udp {
                dst_port: udp.dst_port,
            }));
        }
        // Directed broadcast of the guest's subnet.
        let host_bits = u32::MAX.checked_shr(u32::from(v4.prefix_len)).unwrap_or(0);
        if v4.prefix_len < 31 && u32::from(ip.dst) & host_bits == host_bits {
            return Err(FrameError::Unhandled(UnhandledTraffic::Udp {
                dst_port: udp.dst_port,
            }));
        }
        let key = FlowKey {
            guest: SocketAddr::V4(SocketAddrV4::new(ip.src, udp.src_port)),
            remote: SocketAddr::V4(SocketAddrV4::new(ip.dst, udp.dst_port)),
        };
        let sent = sent_header(ip.payload, QUOTED_TTL)?;
        self.handle_guest(ctx, epoll, key, sent, udp.payload, now)
    }

    /// A UDP/IPv6 datagram from the guest, not for the DHCPv6 server.
    pub(crate) fn handle_guest_v6(
        &mut self,
        ctx: &ReplyContext<'_>,
        epoll: &Epoll,
        ip: &Ipv6Packet<'_>,
        udp: &UdpDatagram<'_>,
        now: Instant,
    ) -> Result<(), FrameError> {
        if ctx.config.v6.is_none() {
            return Ok(());
        }
        if ip.src.is_unspecified() || ip.dst.is_multicast() {
            return Err(FrameError::Unhandled(UnhandledTraffic::Udp {
                dst_port: udp.dst_port,
            }));
        }
        let key = FlowKey {
            guest: SocketAddr::V6(SocketAddrV6::new(ip.src, udp.src_port, 0, 0)),
            remote: SocketAddr::V6(SocketAddrV6::new(ip.dst, udp.dst_port, 0, 0)),
        };
        let sent = sent_header(ip.payload, ip.hop_limit)?;
        self.handle_guest(ctx, epoll, key, sent, udp.payload, now)
    }

    fn handle_guest(
        &mut self,
        ctx: &ReplyContext<'_>,
        epoll: &Epoll,
        key: FlowKey,
        sent: SentHeader,
        payload: &[u8],
        now: Instant,
    ) -> Result<(), FrameError> {
        self.expire_idle_throttled(epoll, now);
        if !self.enabled {
            limited!(
                self.log,
                LOG_GUEST,
                now,
                TRACE,
                "UDP disabled: datagram to {} dropped",
                key.remote
            );
            return Ok(());
        }
        if key.guest.port() == 0 || key.remote.port() == 0 {
            return Err(FrameError::Malformed {
                layer: Layer::Udp,
                reason: "port 0",
            });
        }
        let token = match self.by_key.get(&key) {
            Some(&token) => token,
            None => {
                let host_dst = host_destination(ctx.config, key.remote)
                    .ok_or(FrameError::UnroutableDestination(key.remote.ip()))?;
                match self.open_flow(ctx.config, epoll, key, host_dst, ctx.requester_mac, now) {
                    Some(token) => token,
                    None => return Ok(()),
                }
            }
        };
        let Some(flow) = self.flows.get_mut(&token) else {
            return Ok(());
        };
        flow.last_used = now;
        flow.guest_mac = ctx.requester_mac;
        flow.last_sent = Some(sent);
        let (result, to) = match &flow.host {
            HostSide::Connected { socket, host_dst } => {
                (send_connected(socket.as_raw_fd(), payload), *host_dst)
            }
            HostSide::Forwarded { listener, peer } => {
                let result = match self.listeners.get(*listener) {
                    Some(listener) => sendto(
                        listener.socket.as_raw_fd(),
                        payload,
                        &SockaddrStorage::from(*peer),
                        MsgFlags::MSG_DONTWAIT,
                    )
                    .map(drop),
                    None => Err(Errno::EBADF),
                };
                (result, *peer)
            }
        };
        if let Err(errno) = result {
            limited!(
                self.log,
                LOG_SEND,
                now,
                DEBUG,
                "UDP datagram to {to} not sent: {errno}"
            );
        }
        Ok(())
    }

    fn open_flow(
        &mut self,
        config: &NetConfig,
        epoll: &Epoll,
        key: FlowKey,
        host_dst: SocketAddr,
        guest_mac: MacAddr,
        now: Instant,
    ) -> Option<u64> {
        if self.flows.len() >= self.capacity {
            limited!(
                self.log,
                LOG_GUEST,
                now,
                DEBUG,
                "UDP flow table full ({} flows): datagram {} -> {} dropped",
                self.capacity,
                key.guest,
                key.remote
            );
            return None;
        }
        let socket = match connected_socket(config, host_dst) {
            Ok(socket) => socket,
            Err(errno) => {
                limited!(
                    self.log,
                    LOG_SOCKET,
                    now,
                    DEBUG,
                    "UDP socket to {host_dst} failed: {errno}"
                );
                return None;
            }
        };
        let token = self.unused_token();
        if let Err(errno) = epoll.add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, token)) {
            limited!(
                self.log,
                LOG_SOCKET,
                now,
                WARN,
                "cannot watch a UDP socket: {errno}"
            );
            return None;
        }
        limited!(
            self.log,
            LOG_GUEST,
            now,
            TRACE,
            "UDP flow {} -> {} opened towards {host_dst}",
            key.guest,
            key.remote
        );
        self.insert(
            token,
            UdpFlow {
                key,
                host: HostSide::Connected { socket, host_dst },
                guest_mac,
                last_used: now,
                last_sent: None,
            },
        );
        Some(token)
    }

    fn insert(&mut self, token: u64, flow: UdpFlow) {
        self.by_key.insert(flow.key, token);
        self.flows.insert(token, flow);
    }

    /// A flow token (owner tag included) that no open flow uses.
    fn unused_token(&mut self) -> u64 {
        loop {
            let token = (u64::from(EPOLL_OWNER_UDP) << EPOLL_OWNER_SHIFT)
                | (self.next_token & FLOW_TOKEN_MASK);
            self.next_token = self.next_token.wrapping_add(1);
            if !self.flows.contains_key(&token) {
                return token;
            }
        }
    }

    fn close_flow(&mut self, epoll: &Epoll, token: u64) {
        let Some(flow) = self.flows.remove(&token) else {
            return;
        };
        if self.by_key.get(&flow.key) == Some(&token) {
            self.by_key.remove(&flow.key);
        }
        if let HostSide::Connected { socket, .. } = &flow.host {
            let _ = epoll.delete(socket);
        }
    }

    /// Close every flow idle for [`IDLE_TIMEOUT`] at `now`.
    pub(crate) fn expire_idle(&mut self, epoll: &Epoll, now: Instant) {
        self.last_sweep = now;
        let expired: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, flow)| now.saturating_duration_since(flow.last_used) >= IDLE_TIMEOUT)
            .map(|(&token, _)| token)
            .collect();
        for token in expired {
            self.close_flow(epoll, token);
        }
    }

    fn expire_idle_throttled(&mut self, epoll: &Epoll, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_INTERVAL {
            self.expire_idle(epoll, now);
        }
    }

    /// A UDP socket is ready (`events` as epoll reported them, `data` its event data):
    /// read its datagrams (and queued errors) and send them to the guest.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn handle_socket_ready(
        &mut self,
        events: EpollFlags,
        data: u64,
        config: &NetConfig,
        observed: &ObservedGuest,
        epoll: &Epoll,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        let token = data & TOKEN_MASK;
        if token & LISTENER_BIT != 0 {
            let index = usize::try_from(token & FLOW_TOKEN_MASK).unwrap_or(usize::MAX);
            self.read_listener(index, config, observed, sink, now);
        } else {
            self.read_flow(data, events, config, epoll, sink, now);
        }
        self.expire_idle_throttled(epoll, now);
    }

    fn read_flow(
        &mut self,
        token: u64,
        events: EpollFlags,
        config: &NetConfig,
        epoll: &Epoll,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        let Self {
            flows, buffer, log, ..
        } = self;
        // A stale event: the flow was closed earlier in this round.
        let Some(flow) = flows.get_mut(&token) else {
            return;
        };
        let HostSide::Connected { socket, .. } = &flow.host else {
            return;
        };
        let fd = socket.as_raw_fd();
        if events.contains(EpollFlags::EPOLLERR) {
            drain_error_queue(fd, flow, config, buffer, log, sink, now);
        }
        let mut failed = false;
        for _ in 0..MAX_DATAGRAMS_PER_EVENT {
            let len = match recv(fd, buffer, MsgFlags::MSG_DONTWAIT) {
                Ok(len) => len,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                // A pending ICMP error reported once more: the error queue has it.
                Err(errno) if is_transient_error(errno) => continue,
                Err(errno) => {
                    limited!(
                        log,
                        LOG_RECV,
                        now,
                        DEBUG,
                        "UDP flow to {} failed: {errno}",
                        flow.key.remote
                    );
                    failed = true;
                    break;
                }
            };
            flow.last_used = now;
            let Some(payload) = buffer.get(..len) else {
                continue;
            };
            match udp_frame(
                config,
                flow.guest_mac,
                flow.key.remote,
                flow.key.guest,
                payload,
            ) {
                Ok(frame) => deliver(sink, &frame, "UDP datagram"),
                Err(err) => {
                    limited!(
                        log,
                        LOG_RECV,
                        now,
                        DEBUG,
                        "UDP datagram from {} dropped: {err}",
                        flow.key.remote
                    );
                }
            }
        }
        if failed {
            self.close_flow(epoll, token);
        }
    }

    fn read_listener(
        &mut self,
        index: usize,
        config: &NetConfig,
        observed: &ObservedGuest,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        let Some(fd) = self.listeners.get(index).map(|l| l.socket.as_raw_fd()) else {
            return;
        };
        for _ in 0..MAX_DATAGRAMS_PER_EVENT {
            let (len, sender) = match recvfrom::<SockaddrStorage>(fd, &mut self.buffer) {
                Ok(received) => received,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(errno) if is_transient_error(errno) => continue,
                Err(errno) => {
                    limited!(
                        self.log,
                        LOG_RECV,
                        now,
                        DEBUG,
                        "forwarded UDP port: {errno}"
                    );
                    break;
                }
            };
            let Some(sender) = sender.as_ref().and_then(socket_addr) else {
                continue;
            };
            self.forward_inbound(index, sender, len, config, observed, sink, now);
        }
    }

    /// `len` bytes in the buffer from `sender` arrived on forwarded port `index`.
    #[allow(clippy::too_many_arguments)]
    fn forward_inbound(
        &mut self,
        index: usize,
        sender: SocketAddr,
        len: usize,
        config: &NetConfig,
        observed: &ObservedGuest,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        let Some(listener) = self.listeners.get(index) else {
            return;
        };
        let guest_ip = listener
            .guest_addr
            .or_else(|| guest_address(config, observed, sender.is_ipv4()));
        let remote_ip = guest_view_of_host(config, sender.ip());
        let (Some(guest_ip), Some(remote_ip), Some(guest_mac)) =
            (guest_ip, remote_ip, observed.mac)
        else {
            limited!(
                self.log,
                LOG_RECV,
                now,
                DEBUG,
                "UDP datagram from {sender} to a forwarded port dropped: guest address or MAC unknown"
            );
            return;
        };
        if guest_ip.is_ipv4() != remote_ip.is_ipv4() {
            limited!(self.log, LOG_RECV, now, DEBUG, "UDP datagram from {sender} dropped: forwarded to {guest_ip}, another address family");
            return;
        }
        let key = FlowKey {
            guest: SocketAddr::new(guest_ip, listener.guest_port),
            remote: SocketAddr::new(remote_ip, sender.port()),
        };
        let full = self.flows.len() >= self.capacity;
        let existing = self.by_key.get(&key).copied();
        let guest_mac = match existing.and_then(|t| self.flows.get_mut(&t)) {
            Some(flow) => {
                flow.last_used = now;
                if let HostSide::Forwarded { listener, peer } = &mut flow.host {
                    *listener = index;
                    *peer = sender;
                }
                flow.guest_mac
            }
            None if full => {
                limited!(
                    self.log,
                    LOG_GUEST,
                    now,
                    DEBUG,
                    "UDP flow table full ({} flows): datagram from {sender} dropped",
                    self.capacity
                );
                return;
            }
            None => {
                let token = self.unused_token();
                self.insert(
                    token,
                    UdpFlow {
                        key,
                        host: HostSide::Forwarded {
                            listener: index,
                            peer: sender,
                        },
                        guest_mac,
                        last_used: now,
                        last_sent: None,
                    },
                );
                guest_mac
            }
        };
        let Some(payload) = self.buffer.get(..len) else {
            return;
        };
        match udp_frame(config, guest_mac, key.remote, key.guest, payload) {
            Ok(frame) => deliver(sink, &frame, "forwarded UDP datagram"),
            Err(err) => {
                limited!(
                    self.log,
                    LOG_RECV,
                    now,
                    DEBUG,
                    "UDP datagram from {sender} dropped: {err}"
                );
            }
        }
    }
}

/// The UDP header of a validated datagram (`l4` is the IP payload, at least 8 bytes).
fn sent_header(l4: &[u8], hop_limit: u8) -> Result<SentHeader, FrameError> {
    let udp = l4
        .get(..UDP_HEADER_LEN)
        .and_then(|h| <[u8; UDP_HEADER_LEN]>::try_from(h).ok())
        .ok_or(FrameError::TooShort {
            layer: Layer::Udp,
            len: l4.len(),
            needed: UDP_HEADER_LEN,
        })?;
    Ok(SentHeader { udp, hop_limit })
}

/// Errors a UDP socket reports once for an earlier ICMP error (`sk_err`).
fn is_transient_error(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::ECONNREFUSED
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
            | Errno::EHOSTDOWN
            | Errno::ENETDOWN
            | Errno::EMSGSIZE
            | Errno::EPROTO
            | Errno::ENOPROTOOPT
            | Errno::EACCES
            | Errno::EPERM
    )
}

/// `send` on a connected socket; a pending error from an earlier ICMP message makes
/// the first attempt fail without sending, so that one is retried once.
fn send_connected(fd: RawFd, payload: &[u8]) -> Result<(), Errno> {
    match send(fd, payload, MsgFlags::MSG_DONTWAIT) {
        Ok(_) => Ok(()),
        Err(errno) if is_transient_error(errno) && errno != Errno::EMSGSIZE => {
            send(fd, payload, MsgFlags::MSG_DONTWAIT).map(drop)
        }
        Err(errno) => Err(errno),
    }
}

fn socket_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    storage
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Where a guest datagram to `dst` goes on the host; `None`: not routable.
pub(crate) fn host_destination(config: &NetConfig, dst: SocketAddr) -> Option<SocketAddr> {
    let port = dst.port();
    match dst.ip() {
        IpAddr::V4(ip) => {
            let v4 = config.v4.as_ref()?;
            if port == DNS_PORT && Some(ip) == v4.dns_forward {
                if let Some(host) = v4.dns_host {
                    return Some(SocketAddr::new(IpAddr::V4(host), DNS_PORT));
                }
            }
            if ip == v4.gateway || Some(ip) == v4.map_host_loopback {
                return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
            }
            if Some(ip) == v4.map_guest_addr {
                return Some(SocketAddr::new(IpAddr::V4(v4.addr), port));
            }
            let unroutable = ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || ip.is_broadcast()
                || ip.is_link_local();
            (!unroutable).then_some(dst)
        }
        IpAddr::V6(ip) => {
            let v6 = config.v6.as_ref()?;
            if port == DNS_PORT && Some(ip) == v6.dns_forward {
                if let Some(host) = v6.dns_host {
                    return Some(SocketAddr::new(IpAddr::V6(host), DNS_PORT));
                }
            }
            if ip == v6.gateway || ip == v6.router_link_local || Some(ip) == v6.map_host_loopback {
                return Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port));
            }
            if Some(ip) == v6.map_guest_addr {
                return Some(SocketAddr::new(IpAddr::V6(v6.addr), port));
            }
            let unroutable = ip.is_unspecified()
                || ip.is_loopback()
                || ip.is_multicast()
                || ip.is_unicast_link_local()
                || ip.to_ipv4_mapped().is_some();
            (!unroutable).then_some(dst)
        }
    }
}

/// How the guest sees host address `addr` (the source of a forwarded datagram).
pub(crate) fn guest_view_of_host(config: &NetConfig, addr: IpAddr) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(ip) => {
            let v4 = config.v4.as_ref()?;
            let loopback = v4.map_host_loopback.unwrap_or(v4.gateway);
            if ip.is_loopback() {
                Some(IpAddr::V4(loopback))
            } else if ip == v4.addr {
                Some(IpAddr::V4(v4.map_guest_addr.unwrap_or(loopback)))
            } else {
                Some(addr)
            }
        }
        IpAddr::V6(ip) => {
            if let Some(mapped) = ip.to_ipv4_mapped() {
                return guest_view_of_host(config, IpAddr::V4(mapped));
            }
            let v6 = config.v6.as_ref()?;
            let loopback = v6.map_host_loopback.unwrap_or(v6.gateway);
            if ip.is_loopback() {
                Some(IpAddr::V6(loopback))
            } else if ip == v6.addr && v6.has_global_addr() {
                Some(IpAddr::V6(v6.map_guest_addr.unwrap_or(loopback)))
            } else {
                Some(addr)
            }
        }
    }
}

/// The guest's address of one family, for forwarded datagrams: the one it uses, else
/// the one it was given.
fn guest_address(config: &NetConfig, observed: &ObservedGuest, ipv4: bool) -> Option<IpAddr> {
    if ipv4 {
        let v4 = config.v4.as_ref()?;
        Some(IpAddr::V4(observed.ipv4.unwrap_or(v4.addr)))
    } else {
        let v6 = config.v6.as_ref()?;
        observed
            .ipv6
            .or_else(|| v6.has_global_addr().then_some(v6.addr))
            .or(observed.ipv6_link_local)
            .map(IpAddr::V6)
    }
}

/// A non-blocking UDP socket with error reporting, connected to `host_dst` (from the
/// `-o` address / `--outbound-if` interface when configured, except towards loopback).
fn connected_socket(config: &NetConfig, host_dst: SocketAddr) -> Result<OwnedFd, Errno> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let (socket, source, device) = match host_dst {
        SocketAddr::V4(_) => {
            let socket = socket(AddressFamily::Inet, SockType::Datagram, flags, None)?;
            setsockopt(&socket, sockopt::Ipv4RecvErr, &true)?;
            let v4 = config.v4.as_ref();
            let source = v4.and_then(|v4| v4.outbound_addr).map(IpAddr::V4);
            let device = v4.and_then(|v4| v4.outbound_interface.clone());
            (socket, source, device)
        }
        SocketAddr::V6(_) => {
            let socket = socket(AddressFamily::Inet6, SockType::Datagram, flags, None)?;
            setsockopt(&socket, sockopt::Ipv6RecvErr, &true)?;
            let v6 = config.v6.as_ref();
            let source = v6.and_then(|v6| v6.outbound_addr).map(IpAddr::V6);
            let device = v6.and_then(|v6| v6.outbound_interface.clone());
            (socket, source, device)
        }
    };
    if !host_dst.ip().is_loopback() {
        if let Some(device) = device {
            // Best effort: the kernel may refuse it without CAP_NET_RAW, and routing
            // still picks an interface.
            if let Err(errno) = setsockopt(
                &socket,
                sockopt::BindToDevice,
                &std::ffi::OsString::from(&device),
            ) {
                tracing::trace!("UDP socket not bound to {device}: {errno}");
            }
        }
        if let Some(source) = source {
            bind(
                socket.as_raw_fd(),
                &SockaddrStorage::from(SocketAddr::new(source, 0)),
            )?;
        }
    }
    connect(socket.as_raw_fd(), &SockaddrStorage::from(host_dst))?;
    Ok(socket)
}

/// A non-blocking UDP socket bound to forwarded port `local`.
fn bind_listener(
    local: SocketAddr,
    device: Option<&str>,
    freebind: bool,
) -> Result<OwnedFd, Errno> {
    let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
    let family = match local {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let socket = socket(family, SockType::Datagram, flags, None)?;
    setsockopt(&socket, sockopt::ReuseAddr, &true)?;
    if local.is_ipv6() {
        setsockopt(&socket, sockopt::Ipv6V6Only, &true)?;
    }
    if let Some(device) = device {
        setsockopt(
            &socket,
            sockopt::BindToDevice,
            &std::ffi::OsString::from(device),
        )?;
    }
    if freebind {
        setsockopt(&socket, sockopt::IpFreebind, &true)?;
    }
    bind(socket.as_raw_fd(), &SockaddrStorage::from(local))?;
    Ok(socket)
}

/// An Ethernet + IP + UDP frame for the guest (UDP checksum computed), if it fits the
/// guest's MTU.
fn udp_frame(
    config: &NetConfig,
    guest_mac: MacAddr,
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let ip_header_len = if from.is_ipv4() {
        IPV4_HEADER_LEN
    } else {
        IPV6_HEADER_LEN
    };
    if ip_header_len + UDP_HEADER_LEN + payload.len() > usize::from(config.mtu) {
        return Err(FrameError::ReplyTooLarge(
            "UDP datagram beyond the guest MTU",
        ));
    }
    let link = PacketBuilder::ethernet2(config.our_mac, guest_mac);
    let mut frame = Vec::new();
    let written = match (from, to) {
        (SocketAddr::V4(from), SocketAddr::V4(to)) => {
            let builder = link
                .ipv4(from.ip().octets(), to.ip().octets(), HOP_LIMIT)
                .udp(from.port(), to.port());
            frame.reserve(builder.size(payload.len()));
            builder.write(&mut frame, payload)
        }
        (SocketAddr::V6(from), SocketAddr::V6(to)) => {
            let builder = link
                .ipv6(from.ip().octets(), to.ip().octets(), HOP_LIMIT)
                .udp(from.port(), to.port());
            frame.reserve(builder.size(payload.len()));
            builder.write(&mut frame, payload)
        }
        _ => {
            return Err(FrameError::Malformed {
                layer: Layer::Udp,
                reason: "address families differ",
            })
        }
    };
    written.map_err(|_| FrameError::ReplyTooLarge("UDP datagram"))?;
    Ok(frame)
}

/// An ICMP error the kernel queued on a flow socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QueuedError {
    origin: u8,
    icmp_type: u8,
    code: u8,
    /// Next-hop MTU for "fragmentation needed" / "packet too big".
    info: u32,
    /// Who sent the ICMP message.
    offender: Option<IpAddr>,
}

/// Read the socket's error queue and send the guest an ICMP error for each entry.
fn drain_error_queue(
    fd: RawFd,
    flow: &UdpFlow,
    config: &NetConfig,
    buffer: &mut [u8],
    log: &mut LogBudget,
    sink: &mut dyn FrameSink,
    now: Instant,
) {
    for _ in 0..MAX_ERRORS_PER_EVENT {
        let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
        let (len, queued) = {
            let mut iov = [IoSliceMut::new(buffer)];
            let msg = match recvmsg::<SockaddrStorage>(
                fd,
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(msg) => msg,
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR) => continue,
                Err(errno) => {
                    limited!(log, LOG_RECV, now, DEBUG, "UDP error queue: {errno}");
                    return;
                }
            };
            let mut queued = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for cmsg in cmsgs {
                    let (ee, offender) = match cmsg {
                        ControlMessageOwned::Ipv4RecvErr(ee, offender) => (
                            ee,
                            offender.map(|sin| {
                                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
                            }),
                        ),
                        ControlMessageOwned::Ipv6RecvErr(ee, offender) => (
                            ee,
                            offender.map(|sin6| IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))),
                        ),
                        _ => continue,
                    };
                    queued = Some(QueuedError {
                        origin: ee.ee_origin,
                        icmp_type: ee.ee_type,
                        code: ee.ee_code,
                        info: ee.ee_info,
                        offender,
                    });
                }
            }
            (msg.bytes, queued)
        };
        let Some(queued) = queued else {
            continue;
        };
        let quoted = buffer.get(..len).unwrap_or_default();
        match icmp_error_frame(config, flow, &queued, quoted) {
            Some(frame) => {
                limited!(
                    log,
                    LOG_RECV,
                    now,
                    TRACE,
                    "ICMP error (type {}, code {}) for UDP flow {} -> {}",
                    queued.icmp_type,
                    queued.code,
                    flow.key.guest,
                    flow.key.remote
                );
                deliver(sink, &frame, "ICMP error");
            }
            None => {
                limited!(
                    log,
                    LOG_RECV,
                    now,
                    TRACE,
                    "queued socket error {queued:?} not reported to the guest"
                );
            }
        }
    }
}

/// The ICMP/ICMPv6 error for the guest about its last datagram on `flow`, quoting
/// `payload` (what the kernel returned of the offending datagram). `None` for errors
/// that have no guest-side equivalent (local errors, other ICMP types).
fn icmp_error_frame(
    config: &NetConfig,
    flow: &UdpFlow,
    queued: &QueuedError,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let sent = flow.last_sent?;
    let HostSide::Connected { host_dst, .. } = &flow.host else {
        return None;
    };
    let udp_len = u16::from_be_bytes([sent.udp[4], sent.udp[5]]);
    // The ICMP message comes from the destination as the guest addressed it, unless a
    // router on the way (a real address, not the mapped one) sent it.
    let from = match queued.offender {
        Some(addr)
            if addr != host_dst.ip()
                && !addr.is_loopback()
                && !addr.is_unspecified()
                && addr.is_ipv4() == flow.key.remote.is_ipv4() =>
        {
            addr
        }
        _ => flow.key.remote.ip(),
    };
    let link = PacketBuilder::ethernet2(config.our_mac, flow.guest_mac);
    let mut frame = Vec::new();
    match (flow.key.guest.ip(), flow.key.remote.ip(), from) {
        (IpAddr::V4(guest), IpAddr::V4(remote), IpAddr::V4(from)) => {
            if queued.origin != EE_ORIGIN_ICMP {
                return None;
            }
            let bytes5to8 = match (queued.icmp_type, queued.code) {
                (ICMPV4_DEST_UNREACHABLE, ICMPV4_FRAG_NEEDED) => {
                    let [_, _, hi, lo] = queued.info.min(0xffff).to_be_bytes();
                    [0, 0, hi, lo]
                }
                (ICMPV4_DEST_UNREACHABLE | ICMPV4_TIME_EXCEEDED, _) => [0; 4],
                _ => return None,
            };
            let mut inner = Ipv4Header::new(
                udp_len,
                QUOTED_TTL,
                IpNumber::UDP,
                guest.octets(),
                remote.octets(),
            )
            .ok()?;
            inner.header_checksum = inner.calc_header_checksum();
            let room = ICMPV4_ERROR_MAX
                - IPV4_HEADER_LEN
                - ICMP_HEADER_LEN
                - IPV4_HEADER_LEN
                - UDP_HEADER_LEN;
            let mut quoted = Vec::with_capacity(IPV4_HEADER_LEN + UDP_HEADER_LEN + room);
            quoted.extend_from_slice(&inner.to_bytes());
            quoted.extend_from_slice(&sent.udp);
            quoted.extend_from_slice(payload.get(..room.min(payload.len()))?);
            link.ipv4(from.octets(), guest.octets(), HOP_LIMIT)
                .icmpv4(Icmpv4Type::Unknown {
                    type_u8: queued.icmp_type,
                    code_u8: queued.code,
                    bytes5to8,
                })
                .write(&mut frame, &quoted)
                .ok()?;
        }
        (IpAddr::V6(guest), IpAddr::V6(remote), IpAddr::V6(from)) => {
            if queued.origin != EE_ORIGIN_ICMP6 {
                return None;
            }
            let bytes5to8 = match queued.icmp_type {
                ICMPV6_PACKET_TOO_BIG => queued.info.to_be_bytes(),
                ICMPV6_DEST_UNREACHABLE | ICMPV6_TIME_EXCEEDED => [0; 4],
                _ => return None,
            };
            let inner = Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: udp_len,
                next_header: IpNumber::UDP,
                hop_limit: sent.hop_limit,
                source: guest.octets(),
                destination: remote.octets(),
            };
            let room = ICMPV6_ERROR_MAX
                - IPV6_HEADER_LEN
                - ICMP_HEADER_LEN
                - IPV6_HEADER_LEN
                - UDP_HEADER_LEN;
            let mut quoted = Vec::with_capacity(IPV6_HEADER_LEN + UDP_HEADER_LEN + room);
            quoted.extend_from_slice(&inner.to_bytes());
            quoted.extend_from_slice(&sent.udp);
            quoted.extend_from_slice(payload.get(..room.min(payload.len()))?);
            link.ipv6(from.octets(), guest.octets(), HOP_LIMIT)
                .icmpv6(Icmpv6Type::Unknown {
                    type_u8: queued.icmp_type,
                    code_u8: queued.code,
                    bytes5to8,
                })
                .write(&mut frame, &quoted)
                .ok()?;
        }
        _ => return None,
    }
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::testing::*;
    use crate::net::{parse_ipv4, parse_udp_v4, GuestEventLog};
    use std::cell::RefCell;
    use std::net::UdpSocket;

    struct Harness {
        config: NetConfig,
        observed: ObservedGuest,
        event_log: RefCell<GuestEventLog>,
        epoll: Epoll,
    }

    impl Harness {
        fn new(config: NetConfig) -> Self {
            Harness {
                config,
                observed: ObservedGuest::default(),
                event_log: RefCell::new(GuestEventLog::new(Instant::now())),
                epoll: Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll"),
            }
        }

        fn send_v4(
            &self,
            flows: &mut UdpFlows,
            dst: Ipv4Addr,
            ports: (u16, u16),
            payload: &[u8],
            now: Instant,
        ) -> Result<(), FrameError> {
            let frame = guest_udp4(guest_v4(), dst, ports, payload);
            let ip = parse_ipv4(&frame[14..]).expect("ip");
            let udp = parse_udp_v4(&ip).expect("udp");
            let ctx = ReplyContext {
                config: &self.config,
                observed: &self.observed,
                requester_mac: GUEST_MAC,
                event_log: &self.event_log,
            };
            flows.handle_guest_v4(&ctx, &self.epoll, &ip, &udp, now)
        }

        /// Wait up to 5 s for `expected` frames from the host sockets.
        fn collect(&self, flows: &mut UdpFlows, expected: usize) -> Vec<Vec<u8>> {
            let mut sink = CapturedFrames::default();
            let deadline = Instant::now() + Duration::from_secs(5);
            while sink.0.len() < expected && Instant::now() < deadline {
                let mut events = [EpollEvent::empty(); 16];
                let ready = self.epoll.wait(&mut events, 200u16).expect("wait");
                for event in events.iter().take(ready) {
                    flows.handle_socket_ready(
                        event.events(),
                        event.data(),
                        &self.config,
                        &self.observed,
                        &self.epoll,
                        &mut sink,
                        Instant::now(),
                    );
                }
            }
            sink.0
        }
    }

    fn netns() {
        baton_testkit::netns::enter_private_netns().expect("private netns (run as root)");
    }

    #[test]
    fn destination_mapping_follows_passt() {
        let mut config = config();
        if let Some(v4) = config.v4.as_mut() {
            v4.map_host_loopback = Some(Ipv4Addr::new(192, 168, 10, 2));
            v4.map_guest_addr = Some(Ipv4Addr::new(192, 168, 10, 3));
            v4.dns_forward = Some(Ipv4Addr::new(192, 168, 10, 53));
            v4.dns_host = Some(Ipv4Addr::new(127, 0, 0, 53));
        }
        let sa = |ip: [u8; 4], port| SocketAddr::from((Ipv4Addr::from(ip), port));
        let lo = |port| sa([127, 0, 0, 1], port);
        assert_eq!(
            host_destination(&config, sa([192, 168, 10, 1], 9)),
            Some(lo(9))
        );
        assert_eq!(
            host_destination(&config, sa([192, 168, 10, 2], 9)),
            Some(lo(9))
        );
        assert_eq!(
            host_destination(&config, sa([192, 168, 10, 3], 9)),
            Some(SocketAddr::new(IpAddr::V4(guest_v4()), 9))
        );
        assert_eq!(
            host_destination(&config, sa([192, 168, 10, 53], 53)),
            Some(sa([127, 0, 0, 53], 53))
        );
        // Only port 53 is redirected.
        assert_eq!(
            host_destination(&config, sa([192, 168, 10, 53], 54)),
            Some(sa([192, 168, 10, 53], 54))
        );
        assert_eq!(host_destination(&config, sa([127, 0, 0, 1], 9)), None);
        assert_eq!(host_destination(&config, sa([169, 254, 1, 1], 9)), None);
        let v6 = |s: &str, port| SocketAddr::new(IpAddr::V6(s.parse().expect("addr")), port);
        assert_eq!(
            host_destination(&config, v6("fe80::1", 5)),
            Some(v6("::1", 5))
        );
        assert_eq!(host_destination(&config, v6("fe80::7", 5)), None);
        assert_eq!(
            host_destination(&config, v6("2001:db8:9::1", 5)),
            Some(v6("2001:db8:9::1", 5))
        );
        // Host senders as the guest sees them.
        assert_eq!(
            guest_view_of_host(&config, IpAddr::V4(Ipv4Addr::LOCALHOST)),
            Some(IpAddr::V4(Ipv4Addr::new(192, 168, 10, 2)))
        );
        assert_eq!(
            guest_view_of_host(&config, IpAddr::V4(guest_v4())),
            Some(IpAddr::V4(Ipv4Addr::new(192, 168, 10, 3)))
        );
        assert_eq!(
            guest_view_of_host(&config, IpAddr::V6(Ipv6Addr::LOCALHOST)),
            Some(IpAddr::V6(gateway_ll()))
        );
    }

    #[test]
    fn table_is_bounded_and_idle_flows_expire() {
        netns();
        let h = Harness::new(config());
        let t0 = Instant::now();
        let mut flows = UdpFlows::with_capacity(&h.config, &h.epoll, t0, 4).expect("flows");
        for port in 0..10u16 {
            h.send_v4(&mut flows, gateway_v4(), (1000 + port, 9), b"x", t0)
                .expect("dropped quietly when full");
        }
        assert_eq!(flows.len(), 4, "bounded");
        // An existing flow still works.
        h.send_v4(&mut flows, gateway_v4(), (1000, 9), b"x", t0)
            .expect("existing");
        assert_eq!(flows.len(), 4);
        // Refresh one flow later; expiry is relative to each flow's last datagram.
        let t1 = t0 + Duration::from_secs(100);
        h.send_v4(&mut flows, gateway_v4(), (1001, 9), b"x", t1)
            .expect("refresh");
        flows.expire_idle(&h.epoll, t0 + IDLE_TIMEOUT - Duration::from_millis(1));
        assert_eq!(flows.len(), 4);
        flows.expire_idle(&h.epoll, t0 + IDLE_TIMEOUT);
        assert_eq!(flows.len(), 1, "only the refreshed flow is left");
        flows.expire_idle(&h.epoll, t1 + IDLE_TIMEOUT);
        assert!(flows.is_empty());
        assert!(flows.by_key.is_empty());
        // Room again.
        h.send_v4(&mut flows, gateway_v4(), (2000, 9), b"x", t1 + IDLE_TIMEOUT)
            .expect("new flow");
        assert_eq!(flows.len(), 1);
    }

    #[test]
    fn broadcast_and_unroutable_destinations_open_no_flow() {
        let h = Harness::new(config());
        let now = Instant::now();
        let mut flows = UdpFlows::new(&h.config, &h.epoll, now).expect("flows");
        for dst in [Ipv4Addr::BROADCAST, Ipv4Addr::new(192, 168, 10, 255)] {
            assert!(matches!(
                h.send_v4(&mut flows, dst, (68, 67), b"x", now),
                Err(FrameError::Unhandled(_))
            ));
        }
        let dst = Ipv4Addr::new(127, 0, 0, 1);
        assert_eq!(
            h.send_v4(&mut flows, dst, (1000, 9), b"x", now),
            Err(FrameError::UnroutableDestination(IpAddr::V4(dst)))
        );
        assert!(flows.is_empty());
    }

    #[test]
    fn reply_and_port_unreachable_reach_the_guest() {
        netns();
        let h = Harness::new(config());
        let now = Instant::now();
        let mut flows = UdpFlows::new(&h.config, &h.epoll, now).expect("flows");
        let echo = UdpSocket::bind("127.0.0.1:0").expect("echo");
        let echo_port = echo.local_addr().expect("addr").port();
        h.send_v4(&mut flows, gateway_v4(), (4000, echo_port), b"ping", now)
            .expect("send");
        let mut buf = [0u8; 64];
        echo.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (len, from) = echo.recv_from(&mut buf).expect("datagram on the host");
        assert_eq!(&buf[..len], b"ping");
        echo.send_to(b"pong", from).expect("reply");
        let frames = h.collect(&mut flows, 1);
        assert_eq!(frames.len(), 1);
        let (_, ip) = reply_ipv4(&frames[0]);
        assert_eq!((ip.src, ip.dst), (gateway_v4(), guest_v4()));
        let udp = parse_udp_v4(&ip).expect("valid UDP checksum");
        assert_eq!((udp.src_port, udp.dst_port), (echo_port, 4000));
        assert_eq!(udp.payload, b"pong");

        // Nothing listens on the echo port any more: port unreachable.
        drop(echo);
        h.send_v4(&mut flows, gateway_v4(), (4000, echo_port), b"again", now)
            .expect("send");
        let frames = h.collect(&mut flows, 1);
        assert_eq!(frames.len(), 1, "ICMP error");
        let (_, ip) = reply_ipv4(&frames[0]);
        assert_eq!((ip.src, ip.dst), (gateway_v4(), guest_v4()));
        assert_eq!(ip.protocol, IpNumber::ICMP);
        let icmp = ip.payload;
        assert_eq!((icmp[0], icmp[1]), (3, 3), "port unreachable");
        let quoted = parse_ipv4(&icmp[8..]).expect("quoted IPv4 header");
        assert_eq!((quoted.src, quoted.dst), (guest_v4(), gateway_v4()));
        let quoted_udp = parse_udp_v4(&quoted).expect("quoted datagram, checksum intact");
        assert_eq!(
            (quoted_udp.src_port, quoted_udp.dst_port),
            (4000, echo_port)
        );
        assert_eq!(quoted_udp.payload, b"again");
    }

    #[test]
    fn forwarded_ports_are_bound_at_start_and_a_taken_port_is_an_error() {
        use crate::ports::{parse_port_spec, PortForwards, RFC6335_EPHEMERAL_PORTS};
        netns();
        let forwards = |spec: &str| {
            let spec = parse_port_spec(spec).expect("spec");
            PortForwards::from_specs(&[spec], RFC6335_EPHEMERAL_PORTS).expect("forwards")
        };
        let mut config = config();
        config.udp_forwards = forwards("5353-5354:6363-6364");
        let h = Harness::new(config.clone());
        let flows = UdpFlows::new(&h.config, &h.epoll, Instant::now()).expect("bound");
        assert_eq!(flows.listener_count(), 4, "two ports, both families");
        drop(flows);
        let _taken = UdpSocket::bind("127.0.0.1:7000").expect("take the port");
        config.udp_forwards = forwards("127.0.0.1/7000");
        let h = Harness::new(config);
        assert!(matches!(
            UdpFlows::new(&h.config, &h.epoll, Instant::now()),
            Err(UdpError::Bind { port: 7000, .. })
        ));
    }
}
