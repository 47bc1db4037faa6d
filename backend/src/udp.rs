//! Guest UDP over ordinary host UDP sockets: outbound flows, inbound `-u` forwards, DNS
//! forwarding, and ICMP errors for unreachable destinations.
//!
//! # Theory of operation
//!
//! A *UDP flow* is identified by the guest's view of the 4-tuple ([`FlowKey`]: the
//! guest's address and port, and the remote address and port as the guest sees them).
//! Every flow lives in the shared bounded [`FlowTable`] (see [`crate::flow`]): O(1) by
//! that key (a guest datagram) and by [`FlowId`], which the epoll event data of the
//! flow's socket carries (a host socket that became ready). The table holds at most
//! [`MAX_FLOWS`] (`--max-flows`); a datagram that would need a new flow while it is full is dropped (UDP
//! may drop) and a warning says so, rate-limited. Each outbound flow also holds a host
//! socket: when the process runs out of descriptors (`RLIMIT_NOFILE`, logged at start
//! when it is below the table size) the flow is refused the same way, with a warning
//! that names the limit, rather than failing somewhere else later.
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
//! `sendto(listener, S)`, so they come from the port `S` sent to. Forwarded flows hold
//! no socket of their own.
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
//! # Idle timers
//!
//! A flow expires `--udp-timeout` (default [`IDLE_TIMEOUT`], passt's fixed 180 s) after its last datagram in either
//! direction, and its socket is closed then, whether or not anything else happens: the
//! timers fire on their own. Every flow has one deadline (`expires`) and exactly one
//! entry in a binary heap of `(deadline, FlowId)`. A datagram only moves `expires`
//! forward (O(1), no heap operation); when an entry comes due it is checked against
//! the flow: expired → closed; refreshed meanwhile → pushed again with the new deadline
//! (so a busy flow costs one heap operation per timeout period, not per datagram).
//! Entries of flows closed for other reasons are skipped (the id's generation no longer
//! matches). The earliest entry is handed to one `AlarmClock` (`crate::tcp::alarm`'s: an
//! eventfd in the shared epoll set, made readable by one helper thread for all UDP
//! flows; a timerfd would need no thread but `timerfd_settime` is not on the seccomp
//! allow-list), armed `timer_slack` late so flows expiring close together are closed
//! in one wake-up. One round closes at most [`MAX_EXPIRIES_PER_ROUND`] flows, so a mass
//! expiry (a guest that opened 100k flows at once) cannot stall the worker: the rest
//! are left for the next round, for which the clock is re-armed at once.
//!
//! # Migration
//!
//! `UdpFlows::save_records` describes every flow as a [`UdpFlowRecord`]: its key, who
//! started it, the host address that must be kept (the outbound socket's bound address,
//! or the forwarded port the flow's replies leave from) and the idle time left.
//! `UdpFlows::load_records` rebuilds them: an outbound flow gets a new socket bound to
//! the recorded address when that is free on this host (else to the same port on any
//! address, else to a new port: UDP peers mostly cope, and the flow still works), a
//! forwarded flow is attached to this backend's socket of the same forwarded port, and
//! every flow gets its timer back with the idle time it had left.
//!
//! When the guest has no receive buffers, a datagram read from a host socket is dropped
//! (it was read: no busy loop on a level-triggered socket). At most
//! [`MAX_DATAGRAMS_PER_EVENT`] datagrams are read per socket per readiness event, so one
//! busy flow cannot starve the others. Datagrams that would not fit the guest's MTU are
//! dropped (baton does not fragment).
//!
//! Epoll event data: [`EPOLL_OWNER_UDP`] in the top byte; below it a [`FlowId`]
//! ([`FlowId::to_bits`], 40 bits), or [`LISTENER_BIT`] plus the index of a
//! forwarded-port socket, or [`ALARM_BIT`] for the timer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use baton_proto::migration::{FlowId as WireFlowId, FlowOrigin, UdpFlowRecord};
use baton_proto::tcp::Endpoint;
use etherparse::{
    Icmpv4Type, Icmpv6Type, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder,
};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use nix::sys::socket::{
    bind, connect, getsockname, recv, recvfrom, recvmsg, send, sendto, setsockopt, socket, sockopt,
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrStorage,
};

use crate::config::{MacAddr, NetConfig};
use crate::flow::{FlowId, FlowTable, DEFAULT_MAX_FLOWS};
use crate::net::icmp::EPOLL_OWNER_SHIFT;
use crate::net::ratelimit::LogLimiter;
use crate::net::{
    deliver, FrameError, FrameSink, Ipv4Packet, Ipv6Packet, Layer, ObservedGuest, ReplyContext,
    UdpDatagram, UnhandledTraffic,
};
use crate::tcp::alarm::AlarmClock;

/// Owner tag of UDP sockets in `GuestNet`'s epoll event data (ping is 1, TCP 2).
pub(crate) const EPOLL_OWNER_UDP: u8 = 3;
const TOKEN_MASK: u64 = (1 << EPOLL_OWNER_SHIFT) - 1;
/// Set in the token of a forwarded-port (listening) socket; the index is below it.
pub(crate) const LISTENER_BIT: u64 = 1 << 48;
/// The token of the idle-timer alarm.
pub(crate) const ALARM_BIT: u64 = 1 << 49;
const LISTENER_INDEX_MASK: u64 = LISTENER_BIT - 1;

/// A flow without datagrams in either direction for this long is closed unless
/// `--udp-timeout` says otherwise (passt's `UDP_CONN_TIMEOUT`).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// At most this many UDP flows exist at a time (each outbound one holds a host socket).
pub const MAX_FLOWS: usize = DEFAULT_MAX_FLOWS;
/// Most flows one timer round closes (the rest wait for the next round, at once).
pub const MAX_EXPIRIES_PER_ROUND: usize = 1024;
/// Descriptors left for everything else (vhost-user, TCP, epoll) when comparing
/// `RLIMIT_NOFILE` with the table size at start.
const FD_RESERVE: u64 = 256;
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

/// How late the alarm may fire after a deadline, so that flows expiring close together
/// share a wake-up: a sixteenth of the timeout, at most a second.
fn timer_slack(idle_timeout: Duration) -> Duration {
    (idle_timeout / 16).min(Duration::from_secs(1))
}

/// Errors setting up the forwarded ports and the timer.
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
    #[error("cannot set up the UDP idle timer: {0}")]
    Timer(#[source] std::io::Error),
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
    /// When the flow expires unless a datagram comes first.
    expires: Instant,
    last_sent: Option<SentHeader>,
}

/// The socket of one forwarded host port.
#[derive(Debug)]
struct Listener {
    socket: OwnedFd,
    /// The address it is bound to (migration records name the port by it).
    local: SocketAddr,
    /// Guest address from the rule (`None`: the guest's own address).
    guest_addr: Option<IpAddr>,
    guest_port: u16,
}

/// Log classes (each with its own budget, see [`LogLimiter`]).
const LOG_GUEST: usize = 0;
const LOG_SOCKET: usize = 1;
const LOG_SEND: usize = 2;
const LOG_RECV: usize = 3;
/// Table full, descriptors exhausted: kept apart so chatter cannot hide them.
const LOG_FULL: usize = 4;
const LOG_CLASSES: usize = 5;

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

/// What [`UdpFlows::load_records`] made of the records it was given.
// Not called yet outside the tests: `migrate.rs` (save/load_engine_state) is to call them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RestoredFlows {
    /// Flows rebuilt (with their timers).
    pub(crate) restored: usize,
    /// Of those, outbound flows whose recorded source port could not be kept here.
    pub(crate) new_port: usize,
    /// Records not used (UDP disabled, guest MAC unknown, unroutable here, forwarded
    /// port not configured here, duplicate, table full, no socket); each is logged.
    pub(crate) skipped: usize,
}

/// All UDP flows of the guest and the forwarded-port sockets.
#[derive(Debug)]
pub struct UdpFlows {
    enabled: bool,
    idle_timeout: Duration,
    flows: FlowTable<FlowKey, UdpFlow>,
    /// One entry per flow (plus stale ones of closed flows), earliest deadline first.
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    alarm: AlarmClock,
    listeners: Vec<Listener>,
    /// The soft `RLIMIT_NOFILE` at start, named when descriptors run out.
    nofile_limit: Option<u64>,
    log: LogLimiter<LOG_CLASSES>,
    buffer: Vec<u8>,
}

fn flow_data(id: FlowId) -> u64 {
    (u64::from(EPOLL_OWNER_UDP) << EPOLL_OWNER_SHIFT) | id.to_bits()
}

impl UdpFlows {
    /// The UDP handler for `config`: binds every forwarded port (`-u`) and registers
    /// it and the idle timer in `epoll`. Fails if a port of a rule that is not
    /// best-effort cannot be bound. At most `config.max_flows` flows (`--max-flows`),
    /// closed after `config.udp_idle_timeout` idle (`--udp-timeout`).
    pub(crate) fn new(config: &NetConfig, epoll: &Epoll, now: Instant) -> Result<Self, UdpError> {
        Self::with_limits(
            config,
            epoll,
            now,
            config.max_flows,
            config.udp_idle_timeout,
        )
    }

    /// As [`UdpFlows::new`], with at most `capacity` flows expiring after
    /// `idle_timeout`.
    pub(crate) fn with_limits(
        config: &NetConfig,
        epoll: &Epoll,
        now: Instant,
        capacity: usize,
        idle_timeout: Duration,
    ) -> Result<Self, UdpError> {
        let alarm = AlarmClock::new().map_err(UdpError::Timer)?;
        epoll
            .add(
                alarm.fd(),
                EpollEvent::new(
                    EpollFlags::EPOLLIN,
                    (u64::from(EPOLL_OWNER_UDP) << EPOLL_OWNER_SHIFT) | ALARM_BIT,
                ),
            )
            .map_err(|errno| UdpError::Timer(errno.into()))?;
        let mut flows = Self {
            enabled: config.handlers.udp,
            idle_timeout,
            flows: FlowTable::new(capacity),
            timers: BinaryHeap::new(),
            alarm,
            listeners: Vec::new(),
            nofile_limit: nofile_soft_limit(),
            log: LogLimiter::new(now),
            buffer: vec![0; RECV_BUFFER_LEN],
        };
        if flows.enabled {
            flows.bind_forwards(config, epoll)?;
            if let Some(limit) = flows.nofile_limit {
                let capacity = flows.flows.capacity() as u64;
                if limit < capacity.saturating_add(FD_RESERVE) {
                    tracing::info!(
                        "UDP: RLIMIT_NOFILE is {limit}: fewer outbound UDP flows than the \
                         table's {capacity} can have a host socket; beyond that new flows \
                         are refused (raise the limit to allow more)"
                    );
                }
            }
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

    /// Most flows the table holds.
    pub fn capacity(&self) -> usize {
        self.flows.capacity()
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
                            self.add_listener(epoll, socket, local, rule.guest_addr, guest_port)
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
        local: SocketAddr,
        guest_addr: Option<IpAddr>,
        guest_port: u16,
    ) -> Result<(), Errno> {
        let index = self.listeners.len() as u64;
        let token = (u64::from(EPOLL_OWNER_UDP) << EPOLL_OWNER_SHIFT) | LISTENER_BIT | index;
        epoll.add(&socket, EpollEvent::new(EpollFlags::EPOLLIN, token))?;
        self.listeners.push(Listener {
            socket,
            local,
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
        self.run_due_timers(epoll, now);
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
        let id = match self.flows.lookup(&key) {
            Some(id) => id,
            None => {
                let host_dst = host_destination(ctx.config, key.remote)
                    .ok_or(FrameError::UnroutableDestination(key.remote.ip()))?;
                match self.open_flow(ctx.config, epoll, key, host_dst, ctx.requester_mac, now) {
                    Some(id) => id,
                    None => return Ok(()),
                }
            }
        };
        let expires = now + self.idle_timeout;
        let Some(flow) = self.flows.get_mut(id) else {
            return Ok(());
        };
        flow.expires = expires;
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

    /// Whether a new flow fits; logs the refusal (a warning, rate-limited) if not.
    fn has_room(&mut self, now: Instant, what: std::fmt::Arguments<'_>) -> bool {
        if self.flows.len() < self.flows.capacity() {
            return true;
        }
        limited!(
            self.log,
            LOG_FULL,
            now,
            WARN,
            "UDP flow table full ({} flows): new flow {what} refused, datagram dropped",
            self.flows.capacity()
        );
        false
    }

    fn open_flow(
        &mut self,
        config: &NetConfig,
        epoll: &Epoll,
        key: FlowKey,
        host_dst: SocketAddr,
        guest_mac: MacAddr,
        now: Instant,
    ) -> Option<FlowId> {
        if !self.has_room(now, format_args!("{} -> {}", key.guest, key.remote)) {
            return None;
        }
        let socket = match connected_socket(config, host_dst, None) {
            Ok(socket) => socket,
            Err(errno) => {
                self.log_socket_failure(errno, &key, host_dst, now);
                return None;
            }
        };
        let flow = UdpFlow {
            key,
            host: HostSide::Connected { socket, host_dst },
            guest_mac,
            expires: now + self.idle_timeout,
            last_sent: None,
        };
        let id = self.add_flow(epoll, flow, now)?;
        limited!(
            self.log,
            LOG_GUEST,
            now,
            TRACE,
            "UDP flow {} -> {} opened towards {host_dst}",
            key.guest,
            key.remote
        );
        Some(id)
    }

    fn log_socket_failure(
        &mut self,
        errno: Errno,
        key: &FlowKey,
        host_dst: SocketAddr,
        now: Instant,
    ) {
        if matches!(errno, Errno::EMFILE | Errno::ENFILE) {
            let limit = self
                .nofile_limit
                .map_or_else(|| "unknown".to_string(), |l| l.to_string());
            limited!(
                self.log,
                LOG_FULL,
                now,
                WARN,
                "out of file descriptors ({errno}; RLIMIT_NOFILE {limit}, {} UDP flows open): \
                 new UDP flow {} -> {} refused, datagram dropped",
                self.flows.len(),
                key.guest,
                key.remote
            );
        } else {
            limited!(
                self.log,
                LOG_SOCKET,
                now,
                DEBUG,
                "UDP socket to {host_dst} failed: {errno}"
            );
        }
    }

    /// Put `flow` in the table, watch its socket (if it has one) and start its timer.
    /// `None` (logged) if the table is full or epoll refuses the socket.
    fn add_flow(&mut self, epoll: &Epoll, flow: UdpFlow, now: Instant) -> Option<FlowId> {
        let key = flow.key;
        let expires = flow.expires;
        let id = match self.flows.insert(key, flow) {
            Ok(id) => id,
            Err(full) => {
                limited!(
                    self.log,
                    LOG_FULL,
                    now,
                    WARN,
                    "UDP {full}: new flow {} -> {} refused",
                    key.guest,
                    key.remote
                );
                return None;
            }
        };
        if let Some(HostSide::Connected { socket, .. }) = self.flows.get(id).map(|f| &f.host) {
            if let Err(errno) =
                epoll.add(socket, EpollEvent::new(EpollFlags::EPOLLIN, flow_data(id)))
            {
                limited!(
                    self.log,
                    LOG_SOCKET,
                    now,
                    WARN,
                    "cannot watch a UDP socket: {errno}"
                );
                self.flows.remove(id);
                return None;
            }
        }
        self.schedule(id, expires);
        Some(id)
    }

    /// Add the timer entry of flow `id` (each flow has exactly one).
    fn schedule(&mut self, id: FlowId, deadline: Instant) {
        // Entries of flows closed early (socket errors) stay until they come due; if
        // there are many, rebuild the heap from the live flows (O(n), rarely).
        if self.timers.len() >= 2 * self.flows.len() + 1024 {
            let live: Vec<Reverse<(Instant, FlowId)>> = self
                .flows
                .ids()
                .into_iter()
                .filter(|&live| live != id)
                .filter_map(|live| self.flows.get(live).map(|f| Reverse((f.expires, live))))
                .collect();
            self.timers = BinaryHeap::from(live);
        }
        self.timers.push(Reverse((deadline, id)));
        self.alarm.arm(deadline + timer_slack(self.idle_timeout));
    }

    fn close_flow(&mut self, epoll: &Epoll, id: FlowId) {
        let Some(flow) = self.flows.remove(id) else {
            return;
        };
        if let HostSide::Connected { socket, .. } = &flow.host {
            let _ = epoll.delete(socket);
        }
        // The socket (if any) closes here.
    }

    /// Close the flows idle for their timeout at `now` (at most
    /// [`MAX_EXPIRIES_PER_ROUND`]; the alarm is re-armed at once for the rest). The
    /// alarm calls this on its own; `GuestNet::expire_idle_flows` may too.
    pub(crate) fn expire_idle(&mut self, epoll: &Epoll, now: Instant) {
        let mut closed = 0;
        let mut checked = 0;
        while let Some(&Reverse((when, id))) = self.timers.peek() {
            if when > now
                || checked >= 4 * MAX_EXPIRIES_PER_ROUND
                || closed >= MAX_EXPIRIES_PER_ROUND
            {
                break;
            }
            self.timers.pop();
            checked += 1;
            let Some(flow) = self.flows.get(id) else {
                continue; // closed earlier
            };
            if flow.expires <= now {
                self.close_flow(epoll, id);
                closed += 1;
            } else {
                // Refreshed since the entry was made.
                let expires = flow.expires;
                self.timers.push(Reverse((expires, id)));
            }
        }
        if closed > 0 {
            tracing::debug!(
                "UDP: {closed} idle flow(s) closed, {} left",
                self.flows.len()
            );
        }
        self.alarm.expired(now);
        match self.timers.peek() {
            Some(&Reverse((when, _))) if when <= now => self.alarm.arm(now),
            Some(&Reverse((when, _))) => self.alarm.arm(when + timer_slack(self.idle_timeout)),
            None => {}
        }
    }

    /// [`UdpFlows::expire_idle`] if an entry is due (cheap otherwise): the entry points
    /// call it so expiry does not depend on the alarm thread alone.
    fn run_due_timers(&mut self, epoll: &Epoll, now: Instant) {
        if self
            .timers
            .peek()
            .is_some_and(|&Reverse((when, _))| when + timer_slack(self.idle_timeout) <= now)
        {
            self.expire_idle(epoll, now);
        }
    }

    /// A UDP socket (or the idle timer) is ready (`events` as epoll reported them,
    /// `data` its event data): read its datagrams (and queued errors) and send them to
    /// the guest, or close the flows that expired.
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
        if token & ALARM_BIT != 0 {
            self.alarm.acknowledge();
            self.expire_idle(epoll, now);
            return;
        }
        if token & LISTENER_BIT != 0 {
            let index = usize::try_from(token & LISTENER_INDEX_MASK).unwrap_or(usize::MAX);
            self.read_listener(index, config, observed, epoll, sink, now);
        } else {
            self.read_flow(FlowId::from_bits(token), events, config, epoll, sink, now);
        }
        self.run_due_timers(epoll, now);
    }

    fn read_flow(
        &mut self,
        id: FlowId,
        events: EpollFlags,
        config: &NetConfig,
        epoll: &Epoll,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        let expires = now + self.idle_timeout;
        let Self {
            flows, buffer, log, ..
        } = self;
        // A stale event: the flow was closed earlier in this round (the id's
        // generation no longer matches).
        let Some(flow) = flows.get_mut(id) else {
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
            flow.expires = expires;
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
            self.close_flow(epoll, id);
        }
    }

    fn read_listener(
        &mut self,
        index: usize,
        config: &NetConfig,
        observed: &ObservedGuest,
        epoll: &Epoll,
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
            self.forward_inbound(index, sender, len, config, observed, epoll, sink, now);
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
        epoll: &Epoll,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        let Some(listener) = self.listeners.get(index) else {
            return;
        };
        let guest_ip = listener
            .guest_addr
            .or_else(|| guest_address(config, observed, sender.is_ipv4()));
        let guest_port = listener.guest_port;
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
            guest: SocketAddr::new(guest_ip, guest_port),
            remote: SocketAddr::new(remote_ip, sender.port()),
        };
        let expires = now + self.idle_timeout;
        let existing = self.flows.lookup(&key);
        let guest_mac = match existing.and_then(|id| self.flows.get_mut(id)) {
            Some(flow) => {
                flow.expires = expires;
                if let HostSide::Forwarded { listener, peer } = &mut flow.host {
                    *listener = index;
                    *peer = sender;
                }
                flow.guest_mac
            }
            None => {
                if !self.has_room(now, format_args!("from {sender}")) {
                    return;
                }
                let flow = UdpFlow {
                    key,
                    host: HostSide::Forwarded {
                        listener: index,
                        peer: sender,
                    },
                    guest_mac,
                    expires,
                    last_sent: None,
                };
                if self.add_flow(epoll, flow, now).is_none() {
                    return;
                }
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

// ---------------------------------------------------------------------------------------
// Migration
// ---------------------------------------------------------------------------------------

// Not called yet outside the tests: `migrate.rs` (save/load_engine_state) is to call them.
impl UdpFlows {
    /// Every flow as a migration record, with ids `first_id`, `first_id + 1`, … (flow
    /// ids must be unique across the stream's flow types: pass one above the last TCP
    /// id). `idle_left_ms` is counted from `now`. A flow whose socket address cannot be
    /// read is left out (logged): the guest re-creates it with its next datagram.
    pub(crate) fn save_records(&self, now: Instant, first_id: u32) -> Vec<UdpFlowRecord> {
        let mut records = Vec::with_capacity(self.flows.len());
        let mut next = Some(first_id);
        for id in self.flows.ids() {
            let Some(flow) = self.flows.get(id) else {
                continue;
            };
            let Some(wire) = next else {
                tracing::warn!("UDP: flow ids exhausted, {id} not saved");
                break;
            };
            let (origin, host_local) = match &flow.host {
                HostSide::Connected { socket, .. } => match local_addr(socket.as_fd()) {
                    Ok(local) => (FlowOrigin::Guest, local),
                    Err(errno) => {
                        tracing::debug!("UDP {id}: not saved, no local address: {errno}");
                        continue;
                    }
                },
                HostSide::Forwarded { listener, .. } => match self.listeners.get(*listener) {
                    Some(listener) => (FlowOrigin::Host, listener.local),
                    None => continue,
                },
            };
            let idle_left = flow.expires.saturating_duration_since(now).as_millis();
            let record = UdpFlowRecord {
                id: WireFlowId(wire),
                origin,
                guest: Endpoint::from_socket_addr(flow.key.guest),
                remote: Endpoint::from_socket_addr(flow.key.remote),
                host_local: Some(Endpoint::from_socket_addr(host_local)),
                idle_left_ms: u32::try_from(idle_left).unwrap_or(u32::MAX),
            };
            if let Err(err) = record.validate() {
                tracing::debug!("UDP {id}: not saved: {err}");
                continue;
            }
            records.push(record);
            next = wire.checked_add(1);
        }
        records
    }

    /// Rebuild the flows of a migration stream (see the module documentation), each
    /// with the idle time it had left from `now`. `guest_mac` is the guest's MAC as
    /// restored from the same stream (call after the guest record is applied). Records
    /// that cannot be used are logged and counted, never fatal.
    pub(crate) fn load_records(
        &mut self,
        records: &[UdpFlowRecord],
        config: &NetConfig,
        guest_mac: Option<MacAddr>,
        epoll: &Epoll,
        now: Instant,
    ) -> RestoredFlows {
        let mut result = RestoredFlows::default();
        if records.is_empty() {
            return result;
        }
        let guest_mac = match (self.enabled, guest_mac) {
            (true, Some(mac)) => mac,
            (enabled, _) => {
                tracing::warn!(
                    "UDP: {} migrated flow(s) dropped ({})",
                    records.len(),
                    if enabled {
                        "the guest's MAC is unknown"
                    } else {
                        "UDP is disabled here"
                    }
                );
                result.skipped = records.len();
                return result;
            }
        };
        for record in records {
            match self.restore(record, config, guest_mac, epoll, now) {
                Ok(port_kept) => {
                    result.restored += 1;
                    if !port_kept {
                        result.new_port += 1;
                    }
                }
                Err(reason) => {
                    result.skipped += 1;
                    tracing::debug!(
                        "UDP flow {} -> {} (stream {:?}) not restored: {reason}",
                        record.guest.to_socket_addr(),
                        record.remote.to_socket_addr(),
                        record.id
                    );
                }
            }
        }
        if result.skipped > 0 || result.new_port > 0 {
            tracing::info!(
                "UDP: {} migrated flow(s) restored ({} on a new source port), {} not \
                 restored (see debug log)",
                result.restored,
                result.new_port,
                result.skipped
            );
        }
        result
    }

    /// One record → one flow; `Ok(port_kept)`, or why not.
    fn restore(
        &mut self,
        record: &UdpFlowRecord,
        config: &NetConfig,
        guest_mac: MacAddr,
        epoll: &Epoll,
        now: Instant,
    ) -> Result<bool, RestoreError> {
        record.validate().map_err(|_| RestoreError::Invalid)?;
        // Keys carry neither scope nor flow label (as built from guest frames).
        let plain = |e: &Endpoint| {
            let sa = e.to_socket_addr();
            SocketAddr::new(sa.ip(), sa.port())
        };
        let key = FlowKey {
            guest: plain(&record.guest),
            remote: plain(&record.remote),
        };
        if self.flows.lookup(&key).is_some() {
            return Err(RestoreError::Duplicate);
        }
        if self.flows.len() >= self.flows.capacity() {
            return Err(RestoreError::TableFull(self.flows.capacity()));
        }
        let host_local = record.host_local.as_ref().map(plain);
        let host_dst =
            host_destination(config, key.remote).ok_or(RestoreError::Unroutable(key.remote))?;
        let (host, port_kept) = match record.origin {
            FlowOrigin::Guest => {
                let (socket, kept) =
                    restored_socket(config, host_dst, host_local).map_err(RestoreError::Socket)?;
                (HostSide::Connected { socket, host_dst }, kept)
            }
            FlowOrigin::Host => {
                let local = host_local.ok_or(RestoreError::NoForward(None))?;
                let listener = self
                    .listeners
                    .iter()
                    .position(|l| l.local == local)
                    .ok_or(RestoreError::NoForward(Some(local)))?;
                (
                    HostSide::Forwarded {
                        listener,
                        // The sender as the host sees it: the inverse of
                        // `guest_view_of_host` (loopback shows as the gateway).
                        peer: host_dst,
                    },
                    true,
                )
            }
        };
        let idle_left = Duration::from_millis(u64::from(record.idle_left_ms));
        let flow = UdpFlow {
            key,
            host,
            guest_mac,
            expires: now + idle_left.min(self.idle_timeout),
            last_sent: None,
        };
        self.add_flow(epoll, flow, now)
            .ok_or(RestoreError::TableFull(self.flows.capacity()))?;
        Ok(port_kept)
    }
}

/// Why one migrated flow was not restored (logged at debug level).
// Not called yet outside the tests: `migrate.rs` (save/load_engine_state) is to call them.
#[derive(Debug, thiserror::Error)]
enum RestoreError {
    #[error("invalid record")]
    Invalid,
    #[error("a flow with the same addresses exists")]
    Duplicate,
    #[error("flow table full ({0} flows)")]
    TableFull(usize),
    #[error("{0} is not routable with this configuration")]
    Unroutable(SocketAddr),
    #[error("no forwarded UDP port {0:?} here")]
    NoForward(Option<SocketAddr>),
    #[error("no socket: {0}")]
    Socket(Errno),
}

/// The soft `RLIMIT_NOFILE` (read at start: the sandbox later forbids it).
fn nofile_soft_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _hard)| soft)
}

/// The address a socket is bound to.
// Not called yet outside the tests: `migrate.rs` (save/load_engine_state) is to call them.
fn local_addr(fd: std::os::fd::BorrowedFd<'_>) -> Result<SocketAddr, Errno> {
    let storage: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    socket_addr(&storage).ok_or(Errno::EAFNOSUPPORT)
}

/// A socket for a migrated outbound flow: bound to `local` (the source's address and
/// port) if that is free here, else to the same port on any address (the source's
/// address may not exist on this host), else to whatever port the kernel picks.
/// Returns the socket and whether the port was kept.
// Not called yet outside the tests: `migrate.rs` (save/load_engine_state) is to call them.
fn restored_socket(
    config: &NetConfig,
    host_dst: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<(OwnedFd, bool), Errno> {
    if let Some(local) = local.filter(|l| l.is_ipv4() == host_dst.is_ipv4() && l.port() != 0) {
        let any = match local.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let mut candidates = vec![local];
        if local.ip() != any {
            candidates.push(SocketAddr::new(any, local.port()));
        }
        for candidate in candidates {
            match connected_socket(config, host_dst, Some(candidate)) {
                Ok(socket) => return Ok((socket, true)),
                Err(errno) => {
                    tracing::trace!("UDP: restoring a flow bound to {candidate}: {errno}")
                }
            }
        }
    }
    connected_socket(config, host_dst, None).map(|socket| (socket, false))
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

/// A non-blocking UDP socket with error reporting, connected to `host_dst`: bound to
/// `local` when given (a migrated flow keeping its source port), else from the `-o`
/// address / `--outbound-if` interface when configured, except towards loopback.
fn connected_socket(
    config: &NetConfig,
    host_dst: SocketAddr,
    local: Option<SocketAddr>,
) -> Result<OwnedFd, Errno> {
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
    }
    let bind_to = match (local, source) {
        (Some(local), _) => Some(local),
        (None, Some(source)) if !host_dst.ip().is_loopback() => Some(SocketAddr::new(source, 0)),
        (None, _) => None,
    };
    if let Some(bind_to) = bind_to {
        bind(socket.as_raw_fd(), &SockaddrStorage::from(bind_to))?;
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
    log: &mut LogLimiter<LOG_CLASSES>,
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
                // Known MAC: forwarded datagrams need it.
                observed: ObservedGuest {
                    mac: Some(GUEST_MAC),
                    ..ObservedGuest::default()
                },
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
        let mut flows =
            UdpFlows::with_limits(&h.config, &h.epoll, t0, 4, IDLE_TIMEOUT).expect("flows");
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
        flows.expire_idle(&h.epoll, t1 + IDLE_TIMEOUT - Duration::from_millis(1));
        assert_eq!(flows.len(), 1, "its timer was moved, not lost");
        flows.expire_idle(&h.epoll, t1 + IDLE_TIMEOUT);
        assert!(flows.is_empty());
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
        netns();
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

    /// Dispatch epoll events (and nothing else) until `done` holds, for at most 10 s.
    fn pump(h: &Harness, flows: &mut UdpFlows, done: impl Fn(&UdpFlows) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sink = CapturedFrames::default();
        while !done(flows) && Instant::now() < deadline {
            let mut events = [EpollEvent::empty(); 16];
            let ready = h.epoll.wait(&mut events, 100u16).expect("wait");
            for event in events.iter().take(ready) {
                flows.handle_socket_ready(
                    event.events(),
                    event.data(),
                    &h.config,
                    &h.observed,
                    &h.epoll,
                    &mut sink,
                    Instant::now(),
                );
            }
        }
    }

    fn forwards(spec: &str) -> crate::ports::PortForwards {
        use crate::ports::{parse_port_spec, PortForwards, RFC6335_EPHEMERAL_PORTS};
        let spec = parse_port_spec(spec).expect("spec");
        PortForwards::from_specs(&[spec], RFC6335_EPHEMERAL_PORTS).expect("forwards")
    }

    fn echo_server() -> (UdpSocket, u16) {
        let echo = UdpSocket::bind("127.0.0.1:0").expect("echo");
        echo.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let port = echo.local_addr().expect("addr").port();
        (echo, port)
    }

    fn endpoint(ip: impl Into<IpAddr>, port: u16) -> Endpoint {
        Endpoint::from_socket_addr(SocketAddr::new(ip.into(), port))
    }

    #[test]
    fn idle_flows_are_closed_by_the_timer_alone() {
        netns();
        let h = Harness::new(config());
        let timeout = Duration::from_millis(300);
        let mut flows =
            UdpFlows::with_limits(&h.config, &h.epoll, Instant::now(), 16, timeout).expect("flows");
        let (echo, echo_port) = echo_server();
        h.send_v4(
            &mut flows,
            gateway_v4(),
            (4000, echo_port),
            b"ping",
            Instant::now(),
        )
        .expect("send");
        let mut buf = [0u8; 16];
        let (_, source) = echo.recv_from(&mut buf).expect("datagram on the host");
        assert!(
            UdpSocket::bind(source).is_err(),
            "the flow's socket holds {source}"
        );
        // No datagram, no lookup, no explicit sweep: only the alarm's epoll event.
        pump(&h, &mut flows, UdpFlows::is_empty);
        assert!(flows.is_empty(), "the idle flow was closed");
        UdpSocket::bind(source).expect("the flow's host port is free again");
    }

    #[test]
    fn one_round_closes_a_bounded_number_of_flows() {
        netns();
        let h = Harness::new(config());
        let t0 = Instant::now();
        let extra = 100;
        let n = MAX_EXPIRIES_PER_ROUND + extra;
        let mut flows =
            UdpFlows::with_limits(&h.config, &h.epoll, t0, n, IDLE_TIMEOUT).expect("flows");
        for k in 0..n {
            let port = 10_000 + u16::try_from(k).expect("port");
            h.send_v4(&mut flows, gateway_v4(), (port, 9), b"x", t0)
                .expect("send");
        }
        assert_eq!(flows.len(), n);
        flows.expire_idle(&h.epoll, t0 + IDLE_TIMEOUT);
        assert_eq!(flows.len(), extra, "one round is bounded");
        flows.expire_idle(&h.epoll, t0 + IDLE_TIMEOUT);
        assert!(flows.is_empty(), "the next round closes the rest");
    }

    #[test]
    fn forwarded_flows_count_against_the_bound() {
        netns();
        let mut config = config();
        config.udp_forwards = forwards("127.0.0.1/5310:6310");
        let h = Harness::new(config);
        let mut flows = UdpFlows::with_limits(&h.config, &h.epoll, Instant::now(), 2, IDLE_TIMEOUT)
            .expect("flows");
        let senders: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("sender"))
            .collect();
        for (k, sender) in senders.iter().enumerate() {
            sender.send_to(&[k as u8], "127.0.0.1:5310").expect("send");
        }
        // The first sender again, through the same socket: read after the third.
        senders[0]
            .send_to(b"again", "127.0.0.1:5310")
            .expect("send");
        let frames = h.collect(&mut flows, 3);
        let payloads: Vec<Vec<u8>> = frames
            .iter()
            .map(|frame| {
                let (_, ip) = reply_ipv4(frame);
                parse_udp_v4(&ip).expect("udp").payload.to_vec()
            })
            .collect();
        assert_eq!(
            payloads,
            vec![vec![0], vec![1], b"again".to_vec()],
            "the third sender needed a third flow: dropped"
        );
        assert_eq!(flows.len(), 2);
    }

    #[test]
    fn flows_survive_save_and_load() {
        netns();
        let mut config = config();
        config.udp_forwards = forwards("127.0.0.1/5300:6300");
        let h = Harness::new(config);
        let t0 = Instant::now();
        let mut source_flows = UdpFlows::new(&h.config, &h.epoll, t0).expect("flows");
        let (echo, echo_port) = echo_server();
        h.send_v4(
            &mut source_flows,
            gateway_v4(),
            (4000, echo_port),
            b"out",
            t0,
        )
        .expect("send");
        let mut buf = [0u8; 64];
        let (_, host_local) = echo.recv_from(&mut buf).expect("datagram at the echo");
        let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
        sender
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let sender_port = sender.local_addr().expect("addr").port();
        sender.send_to(b"in", "127.0.0.1:5300").expect("send");
        assert_eq!(h.collect(&mut source_flows, 1).len(), 1, "forwarded");
        assert_eq!(source_flows.len(), 2);

        let saved_at = t0 + Duration::from_secs(30);
        let mut records = source_flows.save_records(saved_at, 7);
        records.sort_by_key(|r| r.id.0);
        assert_eq!(
            records.iter().map(|r| r.id.0).collect::<Vec<_>>(),
            vec![7, 8]
        );
        let out = *records
            .iter()
            .find(|r| r.origin == FlowOrigin::Guest)
            .expect("outbound record");
        assert_eq!(out.guest, endpoint(guest_v4(), 4000));
        assert_eq!(out.remote, endpoint(gateway_v4(), echo_port));
        assert_eq!(out.host_local, Some(Endpoint::from_socket_addr(host_local)));
        assert_eq!(out.idle_left_ms, 150_000);
        let fwd = *records
            .iter()
            .find(|r| r.origin == FlowOrigin::Host)
            .expect("forwarded record");
        assert_eq!(fwd.guest, endpoint(guest_v4(), 6300));
        assert_eq!(fwd.remote, endpoint(gateway_v4(), sender_port));
        assert_eq!(fwd.host_local, Some(endpoint(Ipv4Addr::LOCALHOST, 5300)));
        assert!((150_000..=155_000).contains(&fwd.idle_left_ms));

        // Another host: the source's sockets are gone, its ports free.
        drop(source_flows);
        let t1 = Instant::now();
        let mut flows = UdpFlows::new(&h.config, &h.epoll, t1).expect("target");
        let restored = flows.load_records(&records, &h.config, Some(GUEST_MAC), &h.epoll, t1);
        assert_eq!(
            restored,
            RestoredFlows {
                restored: 2,
                new_port: 0,
                skipped: 0
            }
        );
        // Same addresses and the idle time they had left, counted from the load.
        let mut again = flows.save_records(t1, 7);
        again.sort_by_key(|r| r.origin == FlowOrigin::Host);
        assert_eq!(again[0].host_local, out.host_local, "source port kept");
        assert_eq!(again[0].idle_left_ms, out.idle_left_ms);
        assert_eq!(again[1].host_local, fwd.host_local);
        assert_eq!(again[1].idle_left_ms, fwd.idle_left_ms);
        flows.expire_idle(&h.epoll, t1 + Duration::from_millis(149_999));
        assert_eq!(flows.len(), 2, "not idle long enough yet");

        // The echo server's next datagram to the old port reaches the guest.
        echo.send_to(b"still there", host_local).expect("send");
        let frames = h.collect(&mut flows, 1);
        assert_eq!(frames.len(), 1);
        let (_, ip) = reply_ipv4(&frames[0]);
        assert_eq!((ip.src, ip.dst), (gateway_v4(), guest_v4()));
        let udp = parse_udp_v4(&ip).expect("udp");
        assert_eq!((udp.src_port, udp.dst_port), (echo_port, 4000));
        assert_eq!(udp.payload, b"still there");
        // And the guest's next datagram leaves from it.
        h.send_v4(&mut flows, gateway_v4(), (4000, echo_port), b"more", t1)
            .expect("send");
        let (len, from) = echo.recv_from(&mut buf).expect("datagram at the echo");
        assert_eq!((&buf[..len], from), (&b"more"[..], host_local));
        // The guest's reply on the forwarded flow leaves from the forwarded port.
        h.send_v4(&mut flows, gateway_v4(), (6300, sender_port), b"reply", t1)
            .expect("send");
        let (len, from) = sender.recv_from(&mut buf).expect("reply at the sender");
        assert_eq!(&buf[..len], b"reply");
        assert_eq!(from, SocketAddr::from((Ipv4Addr::LOCALHOST, 5300)));
        assert_eq!(flows.len(), 2, "no new flow was needed");

        // Loading the same records again: duplicates.
        let twice = flows.load_records(&records, &h.config, Some(GUEST_MAC), &h.epoll, t1);
        assert_eq!(twice.skipped, 2);
        assert_eq!(flows.len(), 2);
    }

    #[test]
    fn a_source_port_in_use_here_is_replaced() {
        netns();
        let h = Harness::new(config());
        let now = Instant::now();
        let mut source_flows = UdpFlows::new(&h.config, &h.epoll, now).expect("flows");
        let (echo, echo_port) = echo_server();
        h.send_v4(
            &mut source_flows,
            gateway_v4(),
            (4000, echo_port),
            b"out",
            now,
        )
        .expect("send");
        let mut buf = [0u8; 64];
        let (_, host_local) = echo.recv_from(&mut buf).expect("datagram at the echo");
        let records = source_flows.save_records(now, 1);
        // The same host, the source still holding its socket.
        let mut flows = UdpFlows::new(&h.config, &h.epoll, now).expect("target");
        let restored = flows.load_records(&records, &h.config, Some(GUEST_MAC), &h.epoll, now);
        assert_eq!(
            restored,
            RestoredFlows {
                restored: 1,
                new_port: 1,
                skipped: 0
            }
        );
        h.send_v4(&mut flows, gateway_v4(), (4000, echo_port), b"moved", now)
            .expect("send");
        let (len, from) = echo.recv_from(&mut buf).expect("datagram at the echo");
        assert_eq!(&buf[..len], b"moved");
        assert_ne!(from, host_local, "a new source port");
        echo.send_to(b"back", from).expect("send");
        assert_eq!(h.collect(&mut flows, 1).len(), 1, "replies reach the guest");
    }

    #[test]
    fn restored_flows_expire_after_the_time_they_had_left() {
        netns();
        let h = Harness::new(config());
        let now = Instant::now();
        let mut flows = UdpFlows::new(&h.config, &h.epoll, now).expect("flows");
        let record = |id, port, idle_left_ms| UdpFlowRecord {
            id: WireFlowId(id),
            origin: FlowOrigin::Guest,
            guest: endpoint(guest_v4(), port),
            remote: endpoint(gateway_v4(), 9),
            host_local: None,
            idle_left_ms,
        };
        let records = [record(1, 4001, 1_000), record(2, 4002, 60_000)];
        let restored = flows.load_records(&records, &h.config, Some(GUEST_MAC), &h.epoll, now);
        assert_eq!(restored.restored, 2);
        assert_eq!(restored.new_port, 2, "no address recorded");
        flows.expire_idle(&h.epoll, now + Duration::from_millis(999));
        assert_eq!(flows.len(), 2);
        flows.expire_idle(&h.epoll, now + Duration::from_millis(1_000));
        assert_eq!(flows.len(), 1);
        flows.expire_idle(&h.epoll, now + Duration::from_millis(60_000));
        assert!(flows.is_empty());
    }

    #[test]
    fn records_that_do_not_fit_here_are_skipped() {
        netns();
        let h = Harness::new(config());
        let now = Instant::now();
        let mut flows = UdpFlows::new(&h.config, &h.epoll, now).expect("flows");
        let forwarded = UdpFlowRecord {
            id: WireFlowId(1),
            origin: FlowOrigin::Host,
            guest: endpoint(guest_v4(), 6300),
            remote: endpoint(gateway_v4(), 40000),
            host_local: Some(endpoint(Ipv4Addr::LOCALHOST, 5300)),
            idle_left_ms: 1000,
        };
        let unroutable = UdpFlowRecord {
            id: WireFlowId(2),
            origin: FlowOrigin::Guest,
            remote: endpoint(Ipv4Addr::LOCALHOST, 9),
            host_local: None,
            ..forwarded
        };
        let records = [forwarded, unroutable];
        let restored = flows.load_records(&records, &h.config, Some(GUEST_MAC), &h.epoll, now);
        assert_eq!(
            restored,
            RestoredFlows {
                restored: 0,
                new_port: 0,
                skipped: 2
            },
            "no -u 5300 here; loopback is not routable"
        );
        let no_mac = flows.load_records(&records, &h.config, None, &h.epoll, now);
        assert_eq!(no_mac.skipped, 2);
        assert!(flows.is_empty());
    }
}
