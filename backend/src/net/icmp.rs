//! ICMP and ICMPv6 echo ("ping") through unprivileged ping sockets.
//!
//! Theory of operation: an echo request from the guest is sent by the host kernel from
//! a ping socket (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`, or `AF_INET6` /
//! `IPPROTO_ICMPV6`), which needs no privilege, only a group listed in
//! `net.ipv4.ping_group_range` (that sysctl governs both families). Each
//! (guest source, guest destination, guest echo id) triple is one *ping flow* with its
//! own socket, registered in `GuestNet`'s epoll instance:
//!
//! ```text
//!   guest ── echo(id=G, seq=S) to D ──▶ flow (src, D, G) ── sendto(host_dst(D)) ──▶ host
//!   guest ◀── echo reply(id=G, seq=S) from D ── flow ◀── recv: reply(id=K, seq=S) ──┘
//! ```
//!
//! The kernel rewrites the echo identifier to the socket's own "port" K and only
//! delivers replies carrying K, so the reply's identifier is set back to G and the
//! checksum recomputed before the reply goes to the guest, from D to the guest's source.
//!
//! Destination mapping (`host_dst`): the gateway address (and, for IPv6, the router's
//! link-local address) and the `--map-host-loopback` address reach the host's loopback
//! (127.0.0.1 / ::1), so pinging the gateway always works; the `--map-guest-addr`
//! address reaches the host's address that the guest was given; unspecified,
//! loopback, multicast, broadcast and (other) link-local destinations are refused
//! ([`FrameError::UnroutableDestination`]); everything else goes out as is.
//!
//! Flows expire after [`IDLE_TIMEOUT`] without requests or replies (checked at most
//! once per second, from the frame and event handlers), and at most [`MAX_FLOWS`]
//! exist at a time (the least recently used one makes room), so a guest cannot make
//! baton hold an unbounded number of sockets. Epoll event data: the owner tag
//! `EPOLL_OWNER_PING` in the top byte, a flow token below.
//!
//! When the kernel refuses ping sockets (EACCES/EPERM: our group is outside
//! `net.ipv4.ping_group_range`), one warning says what to set, and guest pings are
//! dropped from then on (each attempt still tries again, so fixing the sysctl at run
//! time works).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use etherparse::IpNumber;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
    SockaddrIn6,
};

use super::frame::{
    internet_checksum, ipv4_frame, ipv6_frame, set_icmpv4_checksum, set_icmpv6_checksum, LinkEnds,
    DEFAULT_HOP_LIMIT,
};
use super::ratelimit::LogLimiter;
use super::{deliver, FrameError, FrameSink, Ipv4Packet, Ipv6Packet, Layer, ReplyContext};
use super::{ndp::router_link_local, UnhandledTraffic};
use crate::config::{MacAddr, NetConfig, V4Config, V6Config};

pub(crate) const ICMPV4_ECHO_REPLY: u8 = 0;
pub(crate) const ICMPV4_ECHO_REQUEST: u8 = 8;
pub(crate) const ICMPV6_ECHO_REQUEST: u8 = 128;
pub(crate) const ICMPV6_ECHO_REPLY: u8 = 129;
/// Type, code, checksum, identifier, sequence number.
const ECHO_HEADER_LEN: usize = 8;

/// Epoll event data: owner tag in bits 56..64.
pub(crate) const EPOLL_OWNER_SHIFT: u32 = 56;
/// Owner tag of ping sockets.
pub(crate) const EPOLL_OWNER_PING: u8 = 1;
const TOKEN_MASK: u64 = (1 << EPOLL_OWNER_SHIFT) - 1;

/// A ping flow without requests or replies for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many ping sockets are open at a time.
pub const MAX_FLOWS: usize = 1024;
/// Idle flows are looked for at most this often.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Replies read from one socket per readiness event (the rest wait for the next call:
/// the epoll instance is level-triggered).
const MAX_REPLIES_PER_EVENT: usize = 64;
/// Largest ICMP message a ping socket can return.
const RECV_BUFFER_LEN: usize = 65535;

/// Log classes for host-side socket errors.
const LOG_SOCKET: usize = 0;
const LOG_SEND: usize = 1;
const LOG_RECV: usize = 2;
/// Log class for guest-triggered flow events (opened, dropped).
const LOG_FLOW: usize = 3;

/// What identifies a ping flow, as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PingKey {
    guest_src: IpAddr,
    guest_dst: IpAddr,
    guest_id: u16,
}

/// One ping socket and where its replies go.
#[derive(Debug)]
struct PingFlow {
    key: PingKey,
    /// Where the socket sends: `guest_dst` after the loopback/guest-address mapping.
    host_dst: IpAddr,
    socket: OwnedFd,
    /// The guest's MAC when it last sent on this flow.
    guest_mac: MacAddr,
    last_used: Instant,
}

/// All ping flows of the guest.
#[derive(Debug)]
pub(crate) struct PingFlows {
    enabled: bool,
    flows: HashMap<u64, PingFlow>,
    token_by_key: HashMap<PingKey, u64>,
    next_token: u64,
    last_sweep: Instant,
    permission_warned: bool,
    host_error_log: LogLimiter<4>,
    recv_buffer: Vec<u8>,
}

/// Where an IPv4 echo to `dst` goes on the host; `None`: not routable.
fn host_destination_v4(v4: &V4Config, dst: Ipv4Addr) -> Option<Ipv4Addr> {
    if dst == v4.gateway || Some(dst) == v4.map_host_loopback {
        return Some(Ipv4Addr::LOCALHOST);
    }
    if Some(dst) == v4.map_guest_addr {
        return Some(v4.addr);
    }
    let unroutable = dst.is_unspecified()
        || dst.is_loopback()
        || dst.is_multicast()
        || dst.is_broadcast()
        || dst.is_link_local();
    (!unroutable).then_some(dst)
}

/// Where an IPv6 echo to `dst` goes on the host; `None`: not routable.
fn host_destination_v6(config: &NetConfig, v6: &V6Config, dst: Ipv6Addr) -> Option<Ipv6Addr> {
    if dst == v6.gateway
        || Some(dst) == router_link_local(config)
        || Some(dst) == v6.map_host_loopback
    {
        return Some(Ipv6Addr::LOCALHOST);
    }
    if Some(dst) == v6.map_guest_addr {
        return Some(v6.addr);
    }
    let unroutable = dst.is_unspecified()
        || dst.is_loopback()
        || dst.is_multicast()
        || dst.is_unicast_link_local();
    (!unroutable).then_some(dst)
}

impl PingFlows {
    pub(crate) fn new(now: Instant, enabled: bool) -> Self {
        Self {
            enabled,
            flows: HashMap::new(),
            token_by_key: HashMap::new(),
            next_token: 0,
            last_sweep: now,
            permission_warned: false,
            host_error_log: LogLimiter::new(now),
            recv_buffer: vec![0; RECV_BUFFER_LEN],
        }
    }

    /// Number of open ping sockets.
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    pub(crate) fn set_enabled(&mut self, enabled: bool, epoll: &Epoll) {
        self.enabled = enabled;
        if !enabled {
            let tokens: Vec<u64> = self.flows.keys().copied().collect();
            for token in tokens {
                self.close_flow(epoll, token);
            }
        }
    }

    /// An ICMP message from the guest: echo requests are forwarded, echo replies
    /// ignored, errors left to the flow tables.
    pub(crate) fn handle_icmpv4(
        &mut self,
        ctx: &ReplyContext<'_>,
        epoll: &Epoll,
        ip: &Ipv4Packet<'_>,
        now: Instant,
    ) -> Result<(), FrameError> {
        let message = ip.payload;
        let (Some(&icmp_type), Some(&code)) = (message.first(), message.get(1)) else {
            return Err(FrameError::TooShort {
                layer: Layer::Icmpv4,
                len: message.len(),
                needed: ECHO_HEADER_LEN,
            });
        };
        if internet_checksum(&[message]) != 0 {
            return Err(FrameError::BadChecksum {
                layer: Layer::Icmpv4,
            });
        }
        match icmp_type {
            ICMPV4_ECHO_REQUEST => {}
            ICMPV4_ECHO_REPLY => return Ok(()),
            // Destination unreachable, source quench, redirect, time exceeded,
            // parameter problem: about flows.
            3 | 4 | 5 | 11 | 12 => {
                return Err(FrameError::Unhandled(UnhandledTraffic::IcmpError {
                    icmp_type,
                }))
            }
            other => {
                return Err(FrameError::UnsupportedProtocol {
                    layer: Layer::Icmpv4,
                    number: other,
                })
            }
        }
        let guest_id = echo_id(message, Layer::Icmpv4, code)?;
        let Some(v4) = ctx.config.v4.as_ref() else {
            return Ok(());
        };
        let host_dst = host_destination_v4(v4, ip.dst)
            .ok_or(FrameError::UnroutableDestination(IpAddr::V4(ip.dst)))?;
        let key = PingKey {
            guest_src: IpAddr::V4(ip.src),
            guest_dst: IpAddr::V4(ip.dst),
            guest_id,
        };
        self.send_echo(
            epoll,
            key,
            IpAddr::V4(host_dst),
            ctx.requester_mac,
            message,
            now,
        );
        Ok(())
    }

    /// An ICMPv6 echo request from the guest (length and checksum already checked).
    pub(crate) fn handle_icmpv6_echo(
        &mut self,
        ctx: &ReplyContext<'_>,
        epoll: &Epoll,
        ip: &Ipv6Packet<'_>,
        now: Instant,
    ) -> Result<(), FrameError> {
        let message = ip.payload;
        let code = message.get(1).copied().unwrap_or_default();
        let guest_id = echo_id(message, Layer::Icmpv6, code)?;
        let Some(v6) = ctx.config.v6.as_ref() else {
            return Ok(());
        };
        if ip.src.is_unspecified() {
            return Err(FrameError::Malformed {
                layer: Layer::Icmpv6,
                reason: "echo request from ::",
            });
        }
        let host_dst = host_destination_v6(ctx.config, v6, ip.dst)
            .ok_or(FrameError::UnroutableDestination(IpAddr::V6(ip.dst)))?;
        let key = PingKey {
            guest_src: IpAddr::V6(ip.src),
            guest_dst: IpAddr::V6(ip.dst),
            guest_id,
        };
        self.send_echo(
            epoll,
            key,
            IpAddr::V6(host_dst),
            ctx.requester_mac,
            message,
            now,
        );
        Ok(())
    }

    fn send_echo(
        &mut self,
        epoll: &Epoll,
        key: PingKey,
        host_dst: IpAddr,
        guest_mac: MacAddr,
        message: &[u8],
        now: Instant,
    ) {
        if !self.enabled {
            if let Some(suppressed) = self.host_error_log.admit(LOG_FLOW, now) {
                tracing::trace!(
                    suppressed,
                    "ICMP echo disabled: request to {} dropped",
                    key.guest_dst
                );
            }
            return;
        }
        let token = match self.token_by_key.get(&key) {
            Some(&token) => token,
            None => match self.open_flow(epoll, key, host_dst, guest_mac, now) {
                Some(token) => token,
                None => return,
            },
        };
        let Some(flow) = self.flows.get_mut(&token) else {
            return;
        };
        flow.last_used = now;
        flow.guest_mac = guest_mac;
        let fd = flow.socket.as_raw_fd();
        // The kernel sets the identifier and the checksum; type, code, sequence number
        // and data go out as the guest sent them.
        let sent = match flow.host_dst {
            IpAddr::V4(addr) => {
                let dst = SockaddrIn::from(SocketAddrV4::new(addr, 0));
                sendto(fd, message, &dst, MsgFlags::MSG_DONTWAIT)
            }
            IpAddr::V6(addr) => {
                let dst = SockaddrIn6::from(SocketAddrV6::new(addr, 0, 0, 0));
                sendto(fd, message, &dst, MsgFlags::MSG_DONTWAIT)
            }
        };
        if let Err(errno) = sent {
            if let Some(suppressed) = self.host_error_log.admit(LOG_SEND, now) {
                tracing::debug!(suppressed, "echo request to {host_dst} not sent: {errno}");
            }
        }
    }

    fn open_flow(
        &mut self,
        epoll: &Epoll,
        key: PingKey,
        host_dst: IpAddr,
        guest_mac: MacAddr,
        now: Instant,
    ) -> Option<u64> {
        if self.flows.len() >= MAX_FLOWS {
            self.close_least_recently_used(epoll);
        }
        let (family, protocol) = match host_dst {
            IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp),
            IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6),
        };
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        let socket = match socket(family, SockType::Datagram, flags, protocol) {
            Ok(socket) => socket,
            Err(Errno::EACCES | Errno::EPERM) => {
                self.warn_ping_not_permitted();
                return None;
            }
            Err(errno) => {
                if let Some(suppressed) = self.host_error_log.admit(LOG_SOCKET, now) {
                    tracing::warn!(
                        suppressed,
                        "cannot create a ping socket for {host_dst}: {errno}"
                    );
                }
                return None;
            }
        };
        let token = self.unused_token();
        if let Err(errno) = epoll.add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, token)) {
            if let Some(suppressed) = self.host_error_log.admit(LOG_SOCKET, now) {
                tracing::warn!(suppressed, "cannot watch a ping socket: {errno}");
            }
            return None;
        }
        if let Some(suppressed) = self.host_error_log.admit(LOG_FLOW, now) {
            tracing::trace!(
                suppressed,
                "ping flow {} -> {} (id {}) opened towards {host_dst}",
                key.guest_src,
                key.guest_dst,
                key.guest_id
            );
        }
        self.flows.insert(
            token,
            PingFlow {
                key,
                host_dst,
                socket,
                guest_mac,
                last_used: now,
            },
        );
        self.token_by_key.insert(key, token);
        Some(token)
    }

    /// A token (owner tag included) that no open flow uses.
    fn unused_token(&mut self) -> u64 {
        loop {
            let token =
                (u64::from(EPOLL_OWNER_PING) << EPOLL_OWNER_SHIFT) | (self.next_token & TOKEN_MASK);
            self.next_token = self.next_token.wrapping_add(1);
            if !self.flows.contains_key(&token) {
                return token;
            }
        }
    }

    fn warn_ping_not_permitted(&mut self) {
        if self.permission_warned {
            return;
        }
        self.permission_warned = true;
        let gid = nix::unistd::getegid();
        tracing::warn!(
            "guest pings are dropped: the kernel refuses unprivileged ICMP echo sockets \
             because net.ipv4.ping_group_range (which also governs ICMPv6) does not include \
             our group {gid}; allow it with: sysctl -w net.ipv4.ping_group_range=\"{gid} {gid}\" \
             (or \"0 2147483647\" for every group)"
        );
    }

    fn close_flow(&mut self, epoll: &Epoll, token: u64) {
        if let Some(flow) = self.flows.remove(&token) {
            self.token_by_key.remove(&flow.key);
            // Closing the socket removes it from the epoll set anyway; deleting first
            // keeps the set exact even if the fd were duplicated somewhere.
            let _ = epoll.delete(&flow.socket);
        }
    }

    fn close_least_recently_used(&mut self, epoll: &Epoll) {
        let oldest = self
            .flows
            .iter()
            .min_by_key(|(_, flow)| flow.last_used)
            .map(|(&token, _)| token);
        if let Some(token) = oldest {
            self.close_flow(epoll, token);
        }
    }

    /// Close flows idle for [`IDLE_TIMEOUT`], if the last sweep is a second old.
    pub(crate) fn expire_idle_throttled(&mut self, epoll: &Epoll, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_INTERVAL {
            self.expire_idle(epoll, now);
        }
    }

    /// Close flows idle for [`IDLE_TIMEOUT`].
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

    /// The socket of flow `token` is readable: forward its echo replies to the guest.
    pub(crate) fn handle_socket_ready(
        &mut self,
        token: u64,
        config: &NetConfig,
        epoll: &Epoll,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        let mut failed = false;
        {
            let Self {
                flows,
                recv_buffer,
                host_error_log,
                ..
            } = self;
            let Some(flow) = flows.get_mut(&token) else {
                return;
            };
            for _ in 0..MAX_REPLIES_PER_EVENT {
                let len = match recv(flow.socket.as_raw_fd(), recv_buffer, MsgFlags::MSG_DONTWAIT) {
                    Ok(len) => len,
                    Err(Errno::EAGAIN) => break,
                    Err(Errno::EINTR) => continue,
                    Err(errno) => {
                        if let Some(suppressed) = host_error_log.admit(LOG_RECV, now) {
                            tracing::debug!(
                                suppressed,
                                "ping socket to {} failed: {errno}",
                                flow.host_dst
                            );
                        }
                        failed = true;
                        break;
                    }
                };
                flow.last_used = now;
                let Some(reply) = recv_buffer.get_mut(..len) else {
                    continue;
                };
                match guest_reply_frame(config.our_mac, flow, reply) {
                    Ok(Some(frame)) => deliver(sink, &frame, "echo reply"),
                    Ok(None) => {}
                    Err(err) => {
                        if let Some(suppressed) = host_error_log.admit(LOG_RECV, now) {
                            tracing::debug!(suppressed, "echo reply not forwarded: {err}");
                        }
                    }
                }
            }
        }
        if failed {
            self.close_flow(epoll, token);
        }
    }
}

/// The echo identifier of an echo request, after checking its length and code.
fn echo_id(message: &[u8], layer: Layer, code: u8) -> Result<u16, FrameError> {
    let Some(id) = message.get(4..6) else {
        return Err(FrameError::TooShort {
            layer,
            len: message.len(),
            needed: ECHO_HEADER_LEN,
        });
    };
    if message.len() < ECHO_HEADER_LEN {
        return Err(FrameError::TooShort {
            layer,
            len: message.len(),
            needed: ECHO_HEADER_LEN,
        });
    }
    if code != 0 {
        return Err(FrameError::Malformed {
            layer,
            reason: "echo request with a non-zero code",
        });
    }
    Ok(u16::from_be_bytes([id[0], id[1]]))
}

/// Turn an echo reply read from `flow`'s socket into a frame for the guest: the guest's
/// identifier restored, the checksum recomputed, from the address the guest pinged to
/// the address it pinged from. `Ok(None)` for anything that is not an echo reply.
fn guest_reply_frame(
    our_mac: MacAddr,
    flow: &PingFlow,
    reply: &mut [u8],
) -> Result<Option<Vec<u8>>, FrameError> {
    if reply.len() < ECHO_HEADER_LEN {
        return Ok(None);
    }
    let link = LinkEnds {
        src: our_mac,
        dst: flow.guest_mac,
    };
    let id = flow.key.guest_id.to_be_bytes();
    match (flow.key.guest_src, flow.key.guest_dst) {
        (IpAddr::V4(guest), IpAddr::V4(pinged)) => {
            if reply.first() != Some(&ICMPV4_ECHO_REPLY) {
                return Ok(None);
            }
            if let Some(field) = reply.get_mut(4..6) {
                field.copy_from_slice(&id);
            }
            set_icmpv4_checksum(reply);
            ipv4_frame(link, pinged, guest, IpNumber::ICMP, reply).map(Some)
        }
        (IpAddr::V6(guest), IpAddr::V6(pinged)) => {
            if reply.first() != Some(&ICMPV6_ECHO_REPLY) {
                return Ok(None);
            }
            if let Some(field) = reply.get_mut(4..6) {
                field.copy_from_slice(&id);
            }
            set_icmpv6_checksum(pinged, guest, reply);
            ipv6_frame(
                link,
                pinged,
                guest,
                IpNumber::IPV6_ICMP,
                DEFAULT_HOP_LIMIT,
                reply,
            )
            .map(Some)
        }
        _ => Ok(None),
    }
}

/// Why a guest's packet could not be delivered, as a destination unreachable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unreachable {
    /// No route to the destination's network (`ENETUNREACH`): ICMP code 0 "net
    /// unreachable", ICMPv6 code 0 "no route to destination".
    Net,
    /// The destination did not answer neighbour resolution (`EHOSTUNREACH`): ICMP code 1
    /// "host unreachable", ICMPv6 code 3 "address unreachable".
    Host,
}

impl Unreachable {
    /// The reason for a failed host-side `connect`, if the guest should learn it as an
    /// ICMP error (anything else is answered as the protocol does, e.g. a TCP RST).
    pub(crate) fn from_errno(errno: i32) -> Option<Self> {
        match errno {
            libc::ENETUNREACH => Some(Unreachable::Net),
            libc::EHOSTUNREACH => Some(Unreachable::Host),
            _ => None,
        }
    }
}

/// ICMP destination unreachable type (IPv4) and ICMPv6 destination unreachable type.
const ICMPV4_DEST_UNREACHABLE: u8 = 3;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
/// Bytes of the offending transport header an ICMP error quotes (RFC 792: 64 bits,
/// which hold the ports and, for TCP, the sequence number).
const QUOTED_L4_LEN: usize = 8;

/// A destination unreachable error for the guest about a packet it sent from `guest` to
/// `remote` (protocol `protocol`, transport message `l4`, of which the first 8 bytes are
/// quoted), coming from `remote`. baton keeps no copy of the guest's IP header, so the
/// quoted one is rebuilt (what the guest matches on is there: addresses, protocol,
/// ports, sequence number). `None` for mixed address families or an `l4` shorter than
/// the quote.
pub(crate) fn unreachable_frame(
    our_mac: MacAddr,
    guest_mac: MacAddr,
    guest: IpAddr,
    remote: IpAddr,
    protocol: IpNumber,
    l4: &[u8],
    reason: Unreachable,
) -> Option<Vec<u8>> {
    let head = l4.get(..QUOTED_L4_LEN)?;
    let link = LinkEnds {
        src: our_mac,
        dst: guest_mac,
    };
    let l4_len = u16::try_from(l4.len()).ok()?;
    match (guest, remote) {
        (IpAddr::V4(guest), IpAddr::V4(remote)) => {
            let code = match reason {
                Unreachable::Net => 0,
                Unreachable::Host => 1,
            };
            let mut inner = etherparse::Ipv4Header::new(
                l4_len,
                DEFAULT_HOP_LIMIT,
                protocol,
                guest.octets(),
                remote.octets(),
            )
            .ok()?;
            inner.header_checksum = inner.calc_header_checksum();
            let mut message = vec![ICMPV4_DEST_UNREACHABLE, code, 0, 0, 0, 0, 0, 0];
            message.extend_from_slice(&inner.to_bytes());
            message.extend_from_slice(head);
            set_icmpv4_checksum(&mut message);
            ipv4_frame(link, remote, guest, IpNumber::ICMP, &message).ok()
        }
        (IpAddr::V6(guest), IpAddr::V6(remote)) => {
            let code = match reason {
                Unreachable::Net => 0,
                Unreachable::Host => 3,
            };
            let inner = etherparse::Ipv6Header {
                traffic_class: 0,
                flow_label: etherparse::Ipv6FlowLabel::ZERO,
                payload_length: l4_len,
                next_header: protocol,
                hop_limit: DEFAULT_HOP_LIMIT,
                source: guest.octets(),
                destination: remote.octets(),
            };
            let mut message = vec![ICMPV6_DEST_UNREACHABLE, code, 0, 0, 0, 0, 0, 0];
            message.extend_from_slice(&inner.to_bytes());
            message.extend_from_slice(head);
            set_icmpv6_checksum(remote, guest, &mut message);
            ipv6_frame(
                link,
                remote,
                guest,
                IpNumber::IPV6_ICMP,
                DEFAULT_HOP_LIMIT,
                &message,
            )
            .ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{FrameError, GuestNet, Layer};
    use super::*;
    use etherparse::{Icmpv4Slice, Icmpv6Slice, PacketBuilder};
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;

    /// A private network namespace for this test thread in which root may open ping
    /// sockets (`ping_group_range` is per namespace and excludes everyone by default).
    fn enter_netns_with_ping_range(range: &str) {
        baton_testkit::netns::enter_private_netns().expect("private netns (run as root)");
        std::fs::write("/proc/sys/net/ipv4/ping_group_range", range)
            .expect("write ping_group_range in the new netns");
    }

    fn echo_request_v4(dst: Ipv4Addr, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
            .ipv4(guest_v4().octets(), dst.octets(), 64)
            .icmpv4_echo_request(id, seq)
            .write(&mut frame, payload)
            .expect("build");
        frame
    }

    fn echo_request_v6(src: Ipv6Addr, dst: Ipv6Addr, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
            .ipv6(src.octets(), dst.octets(), 64)
            .icmpv6_echo_request(id, seq)
            .write(&mut frame, payload)
            .expect("build");
        frame
    }

    /// Wait (up to 5 s) for the epoll fd, then collect what the host sockets have.
    fn collect_host_replies(net: &mut GuestNet, expected: usize) -> Vec<Vec<u8>> {
        let mut sink = CapturedFrames::default();
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.0.len() < expected && Instant::now() < deadline {
            let mut fds = [PollFd::new(net.epoll_fd(), PollFlags::POLLIN)];
            poll(&mut fds, PollTimeout::from(200u16)).expect("poll");
            net.handle_host_events(&mut sink).expect("host events");
        }
        sink.0
    }

    fn assert_echo_reply_v4(frame: &[u8], from: Ipv4Addr, id: u16, seq: u16, payload: &[u8]) {
        let (eth, ip) = reply_ipv4(frame);
        assert_eq!(eth.destination(), GUEST_MAC);
        assert_eq!(ip.src, from);
        assert_eq!(ip.dst, guest_v4());
        assert_eq!(ip.protocol, IpNumber::ICMP);
        assert_eq!(internet_checksum(&[ip.payload]), 0, "ICMP checksum");
        let icmp = Icmpv4Slice::from_slice(ip.payload).expect("icmp");
        assert_eq!(icmp.type_u8(), ICMPV4_ECHO_REPLY);
        let bytes5to8 = icmp.bytes5to8();
        assert_eq!(u16::from_be_bytes([bytes5to8[0], bytes5to8[1]]), id);
        assert_eq!(u16::from_be_bytes([bytes5to8[2], bytes5to8[3]]), seq);
        assert_eq!(icmp.payload(), payload);
    }

    #[test]
    fn echo_to_gateway_is_answered_through_host_loopback() {
        enter_netns_with_ping_range("0 2147483647");
        let mut net = guest_net();
        let request = echo_request_v4(gateway_v4(), 0x4242, 7, b"ping payload 0123456789");
        let mut sink = CapturedFrames::default();
        net.handle_frame(&request, &mut sink).expect("echo request");
        assert!(sink.0.is_empty(), "the reply comes from the host socket");
        assert_eq!(net.ping.len(), 1);
        let replies = collect_host_replies(&mut net, 1);
        assert_eq!(replies.len(), 1);
        assert_echo_reply_v4(
            &replies[0],
            gateway_v4(),
            0x4242,
            7,
            b"ping payload 0123456789",
        );
    }

    #[test]
    fn each_guest_echo_id_gets_its_own_socket_and_its_id_back() {
        enter_netns_with_ping_range("0 2147483647");
        let mut config = config();
        if let Some(v4) = config.v4.as_mut() {
            v4.map_host_loopback = Some(Ipv4Addr::new(192, 168, 10, 2));
        }
        let mut net = GuestNet::new(std::sync::Arc::new(config)).expect("new");
        let mut sink = CapturedFrames::default();
        net.handle_frame(&echo_request_v4(gateway_v4(), 1, 1, b"a"), &mut sink)
            .expect("first");
        net.handle_frame(&echo_request_v4(gateway_v4(), 2, 1, b"b"), &mut sink)
            .expect("second");
        let mapped = Ipv4Addr::new(192, 168, 10, 2);
        net.handle_frame(&echo_request_v4(mapped, 1, 5, b"c"), &mut sink)
            .expect("third");
        // Same flow again: no new socket.
        net.handle_frame(&echo_request_v4(gateway_v4(), 1, 2, b"d"), &mut sink)
            .expect("fourth");
        assert_eq!(net.ping.len(), 3);
        let mut replies = collect_host_replies(&mut net, 4);
        assert_eq!(replies.len(), 4);
        replies.sort_by_key(|frame| frame[frame.len() - 1]);
        assert_echo_reply_v4(&replies[0], gateway_v4(), 1, 1, b"a");
        assert_echo_reply_v4(&replies[1], gateway_v4(), 2, 1, b"b");
        assert_echo_reply_v4(&replies[2], mapped, 1, 5, b"c");
        assert_echo_reply_v4(&replies[3], gateway_v4(), 1, 2, b"d");

        // Idle flows are closed.
        net.expire_idle_flows(Instant::now() + IDLE_TIMEOUT);
        assert_eq!(net.ping.len(), 0);
    }

    #[test]
    fn echo_v6_to_gateway_is_answered_through_host_loopback() {
        enter_netns_with_ping_range("0 2147483647");
        let mut net = guest_net();
        let request = echo_request_v6(guest_ll(), gateway_ll(), 0x0102, 9, b"v6 payload");
        net.handle_frame(&request, &mut CapturedFrames::default())
            .expect("echo request");
        let replies = collect_host_replies(&mut net, 1);
        assert_eq!(replies.len(), 1);
        let (eth, ip) = reply_ipv6(&replies[0]);
        assert_eq!(eth.destination(), GUEST_MAC);
        assert_eq!(ip.src, gateway_ll());
        assert_eq!(ip.dst, guest_ll());
        let icmp = Icmpv6Slice::from_slice(ip.payload).expect("icmpv6");
        assert!(icmp.is_checksum_valid(ip.src.octets(), ip.dst.octets()));
        assert_eq!(icmp.type_u8(), ICMPV6_ECHO_REPLY);
        assert_eq!(icmp.bytes5to8(), [0x01, 0x02, 0, 9]);
        assert_eq!(icmp.payload(), b"v6 payload");
    }

    #[test]
    fn refused_ping_sockets_warn_once_and_drop() {
        // The default range "1 0" includes no group at all.
        enter_netns_with_ping_range("1 0");
        let mut net = guest_net();
        for seq in 0..3 {
            let request = echo_request_v4(gateway_v4(), 5, seq, b"x");
            let mut sink = CapturedFrames::default();
            assert_eq!(net.handle_frame(&request, &mut sink), Ok(()));
            assert!(sink.0.is_empty());
        }
        assert!(net.ping.permission_warned);
        assert_eq!(net.ping.len(), 0);
    }

    #[test]
    fn disabled_echo_opens_no_socket() {
        let mut net = guest_net();
        net.set_icmp_echo_enabled(false);
        let request = echo_request_v4(gateway_v4(), 5, 1, b"x");
        assert_eq!(
            net.handle_frame(&request, &mut CapturedFrames::default()),
            Ok(())
        );
        assert_eq!(net.ping.len(), 0);
    }

    #[test]
    fn unroutable_destinations_are_refused() {
        let mut net = guest_net();
        net.set_icmp_echo_enabled(false);
        for dst in [
            Ipv4Addr::new(127, 0, 0, 5),
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
        ] {
            let request = echo_request_v4(dst, 5, 1, b"x");
            assert_eq!(
                net.handle_frame(&request, &mut CapturedFrames::default()),
                Err(FrameError::UnroutableDestination(IpAddr::V4(dst)))
            );
        }
        let dst: Ipv6Addr = "fe80::99".parse().expect("literal");
        let request = echo_request_v6(guest_ll(), dst, 1, 1, b"x");
        assert_eq!(
            net.handle_frame(&request, &mut CapturedFrames::default()),
            Err(FrameError::UnroutableDestination(IpAddr::V6(dst)))
        );
    }

    #[test]
    fn destination_mapping() {
        let config = config();
        let v4 = config.v4.clone().expect("v4");
        assert_eq!(
            host_destination_v4(&v4, gateway_v4()),
            Some(Ipv4Addr::LOCALHOST)
        );
        let remote = Ipv4Addr::new(198, 51, 100, 7);
        assert_eq!(host_destination_v4(&v4, remote), Some(remote));
        let mapped = V4Config {
            map_guest_addr: Some(Ipv4Addr::new(192, 0, 2, 1)),
            ..v4
        };
        assert_eq!(
            host_destination_v4(&mapped, Ipv4Addr::new(192, 0, 2, 1)),
            Some(guest_v4())
        );
        let v6 = config.v6.clone().expect("v6");
        assert_eq!(
            host_destination_v6(&config, &v6, gateway_ll()),
            Some(Ipv6Addr::LOCALHOST)
        );
        let remote: Ipv6Addr = "2001:db8:77::1".parse().expect("literal");
        assert_eq!(host_destination_v6(&config, &v6, remote), Some(remote));
    }

    #[test]
    fn malformed_echo_requests_are_rejected() {
        let mut net = guest_net();
        net.set_icmp_echo_enabled(false);
        let request = echo_request_v4(gateway_v4(), 1, 1, b"abc");
        assert_truncations_rejected(&mut net, &request);
        let mut bad_checksum = request.clone();
        let last = bad_checksum.len() - 1;
        bad_checksum[last] ^= 0xff;
        assert_eq!(
            net.handle_frame(&bad_checksum, &mut CapturedFrames::default()),
            Err(FrameError::BadChecksum {
                layer: Layer::Icmpv4
            })
        );
        // Non-zero code (checksum fixed up).
        let mut bad_code = request.clone();
        bad_code[34 + 1] = 1;
        bad_code[34 + 2..34 + 4].copy_from_slice(&[0, 0]);
        let sum = internet_checksum(&[&bad_code[34..]]);
        bad_code[34 + 2..34 + 4].copy_from_slice(&sum.to_be_bytes());
        assert!(matches!(
            net.handle_frame(&bad_code, &mut CapturedFrames::default()),
            Err(FrameError::Malformed {
                layer: Layer::Icmpv4,
                ..
            })
        ));
        let request = echo_request_v6(guest_ll(), gateway_ll(), 1, 1, b"abc");
        assert_truncations_rejected(&mut net, &request);
        let mut bad_checksum = request;
        let last = bad_checksum.len() - 1;
        bad_checksum[last] ^= 0xff;
        assert_eq!(
            net.handle_frame(&bad_checksum, &mut CapturedFrames::default()),
            Err(FrameError::BadChecksum {
                layer: Layer::Icmpv6
            })
        );
    }

    #[test]
    fn guest_echo_replies_are_ignored() {
        let mut net = guest_net();
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
            .ipv4(guest_v4().octets(), gateway_v4().octets(), 64)
            .icmpv4_echo_reply(1, 1)
            .write(&mut frame, b"x")
            .expect("build");
        let mut sink = CapturedFrames::default();
        assert_eq!(net.handle_frame(&frame, &mut sink), Ok(()));
        assert!(sink.0.is_empty());
        let _ = net.epoll_fd().as_fd();
    }
}
