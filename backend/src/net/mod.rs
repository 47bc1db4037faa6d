//! Everything baton does with the guest's frames, one module per protocol.
//!
//! Theory of operation: the vhost-user device hands each frame the guest transmits to
//! [`GuestNet::handle_frame`], which parses it (untrusted input: every error is a
//! [`FrameError`], never a panic) and dispatches on EtherType and protocol. Answers to the
//! guest (ARP replies, DHCP offers, router advertisements, echo replies, ...) are handed to
//! a [`FrameSink`], which the device backs with the guest's receive queue. Host sockets
//! owned by protocol handlers (ping sockets now, TCP/UDP flows later) are registered in
//! one epoll instance owned by `GuestNet`; the device polls its fd and calls
//! [`GuestNet::handle_host_events`] when it is readable.
//!
//! ```text
//!  guest frame ─▶ handle_frame ─┬─ ARP ──────────────────────────▶ arp     ─┐
//!                               ├─ IPv4 ─┬─ UDP :67 ─────────────▶ dhcp    ─┤
//!                               │        ├─ ICMP echo ───────────▶ icmp ─┐  ├─▶ FrameSink
//!                               │        ├─ TCP ─────────────────▶ tcp  ─┤  │   (guest rx)
//!                               │        └─ other UDP ───────▶ Unhandled │  │
//!                               └─ IPv6 ─┬─ UDP :547 ────────────▶ dhcpv6  ─┤
//!                                        ├─ ICMPv6 RS / NS ──────▶ ndp     ─┤
//!                                        ├─ ICMPv6 echo ─────────▶ icmp ─┤  │
//!                                        ├─ TCP ─────────────────▶ tcp  ─┤  │
//!                                        └─ other UDP ───────▶ Unhandled │  │
//!  epoll fd readable ─▶ handle_host_events ─▶ ping socket replies ◀──────┘ ─┘
//! ```
//!
//! The guest's world: the guest sits alone on a link whose only other member is "the
//! router" (`our_mac`). baton answers ARP and neighbour solicitations for every address
//! except the guest's own, so every packet the guest sends reaches us.
//!
//! What `GuestNet` remembers about the guest ([`ObservedGuest`]): its MAC (configured,
//! or learned from the source of the first frame with a valid Ethernet header, and
//! followed if the guest changes it) and the IPv4, IPv6 global and IPv6 link-local
//! source addresses it uses. The migration stream carries this record
//! ([`GuestNet::observed`], [`GuestNet::restore_observed`]).
//!
//! TCP goes to [`crate::tcp`] (its sockets share the epoll instance, owner tag
//! [`crate::tcp::EPOLL_OWNER_TCP`]) unless `config.handlers.tcp` is off.
//! Traffic that is not ours: TCP when disabled, UDP other than DHCP/DHCPv6 to our server (port 67 to
//! the broadcast or gateway address, port 547 to ff02::1:2 or the router's link-local
//! address, each only while that server is enabled in `NetConfig::services`), and ICMP
//! errors belong to the flow tables (a later module). `handle_frame` returns
//! [`FrameError::Unhandled`] for them (logged at trace level only), so the caller can
//! tell "not implemented here" from "the guest sent garbage"
//! ([`FrameError::is_guest_fault`]); the flow-table dispatch will replace those returns.
//! Legitimate traffic that needs no answer (gratuitous ARP, MLD and IGMP reports, the
//! guest's own neighbour advertisements, DHCP releases, echo requests while ICMP is
//! disabled, ...) returns `Ok(())`.
//!
//! Logging: `handle_frame` logs each error itself at debug level (trace for
//! `Unhandled`) through a per-error-kind token bucket (see `ratelimit`), and the
//! protocol modules log what they answer or ignore through per-protocol buckets
//! (`guest_log!`), so a hostile guest cannot flood the log. Callers should count
//! errors, not log them again. `GuestNet` implements the device's
//! [`crate::vu::NetworkEngine`] on top of this.

/// Log a guest-triggered event at `LEVEL`, rate-limited per [`GuestEvent`] class:
/// `guest_log!(ctx, GuestEvent::Dhcp, DEBUG, "format", args...)`. Tokens are spent
/// only when the level is enabled.
macro_rules! guest_log {
    ($ctx:expr, $event:expr, $level:ident, $($arg:tt)+) => {
        if tracing::enabled!(tracing::Level::$level) {
            if let Some(suppressed) = $ctx.log_budget($event) {
                tracing::event!(tracing::Level::$level, suppressed, $($arg)+);
            }
        }
    };
}

pub mod arp;
pub mod dhcp;
pub mod dhcpv6;
mod frame;
pub mod icmp;
pub mod ndp;
pub(crate) mod ratelimit;

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::{EtherType, Ethernet2Slice, IpNumber, Ipv4Slice, Ipv6Slice, UdpSlice};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollTimeout};

use crate::config::{MacAddr, NetConfig};
use crate::vu::TxChecksum;

use self::frame::internet_checksum;
use self::ratelimit::LogLimiter;

/// Where frames for the guest go. Returns false when the frame was dropped (no receive
/// buffers available); protocols with their own retransmission (all of these) just let
/// the guest retry.
pub trait FrameSink {
    fn send_frame(&mut self, frame: &[u8]) -> bool;
}

/// The protocol layer a [`FrameError`] refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    Ethernet,
    Arp,
    Ipv4,
    Ipv6,
    Udp,
    Tcp,
    Icmpv4,
    Icmpv6,
    Ndp,
    Dhcpv4,
    Dhcpv6,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::Ethernet => "Ethernet",
            Layer::Arp => "ARP",
            Layer::Ipv4 => "IPv4",
            Layer::Ipv6 => "IPv6",
            Layer::Udp => "UDP",
            Layer::Tcp => "TCP",
            Layer::Icmpv4 => "ICMP",
            Layer::Icmpv6 => "ICMPv6",
            Layer::Ndp => "NDP",
            Layer::Dhcpv4 => "DHCP",
            Layer::Dhcpv6 => "DHCPv6",
        })
    }
}

/// Guest traffic that is valid but handled elsewhere (the TCP/UDP flow tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnhandledTraffic {
    Tcp,
    Udp {
        dst_port: u16,
    },
    /// ICMP/ICMPv6 errors the guest sends about flows (port unreachable, ...).
    IcmpError {
        icmp_type: u8,
    },
}

impl fmt::Display for UnhandledTraffic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UnhandledTraffic::Tcp => f.write_str("TCP"),
            UnhandledTraffic::Udp { dst_port } => write!(f, "UDP to port {dst_port}"),
            UnhandledTraffic::IcmpError { icmp_type } => {
                write!(f, "ICMP error message (type {icmp_type})")
            }
        }
    }
}

/// Why a guest frame was not processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{layer} truncated: {len} bytes where {needed} are needed")]
    TooShort {
        layer: Layer,
        len: usize,
        needed: usize,
    },
    #[error("EtherType {0:#06x} is not ARP, IPv4 or IPv6")]
    UnsupportedEtherType(u16),
    #[error("malformed {layer}: {reason}")]
    Malformed { layer: Layer, reason: &'static str },
    #[error("bad {layer} checksum")]
    BadChecksum { layer: Layer },
    #[error("IP fragments are not supported")]
    Fragmented,
    #[error("{layer} protocol/type {number} is not supported")]
    UnsupportedProtocol { layer: Layer, number: u8 },
    #[error("NDP message with hop limit {hop_limit} (RFC 4861 requires 255)")]
    NdpHopLimit { hop_limit: u8 },
    #[error("destination {0} is not reachable from the guest")]
    UnroutableDestination(IpAddr),
    #[error("{0} is not handled by the guest services")]
    Unhandled(UnhandledTraffic),
    #[error("reply does not fit: {0} too large")]
    ReplyTooLarge(&'static str),
    #[error(
        "partial checksum (virtio NEEDS_CSUM) with csum_start {start} and csum_offset {offset} \
         does not name this frame's TCP or UDP checksum field"
    )]
    PartialChecksum { start: u16, offset: u16 },
}

impl FrameError {
    /// False for [`FrameError::Unhandled`] (valid traffic for another module) and
    /// [`FrameError::ReplyTooLarge`] (our limit); true when the guest sent something
    /// invalid or unsupported.
    pub fn is_guest_fault(&self) -> bool {
        !matches!(
            self,
            FrameError::Unhandled(_) | FrameError::ReplyTooLarge(_)
        )
    }

    /// Index of this error's log rate-limit bucket.
    fn log_class(&self) -> usize {
        match self {
            FrameError::TooShort { .. } => 0,
            FrameError::UnsupportedEtherType(_) => 1,
            FrameError::Malformed { .. } => 2,
            FrameError::BadChecksum { .. } => 3,
            FrameError::Fragmented => 4,
            FrameError::UnsupportedProtocol { .. } => 5,
            FrameError::NdpHopLimit { .. } => 6,
            FrameError::UnroutableDestination(_) => 7,
            FrameError::Unhandled(_) => 8,
            FrameError::ReplyTooLarge(_) => 9,
            FrameError::PartialChecksum { .. } => 10,
        }
    }

    fn too_short(layer: Layer, err: &etherparse::err::LenError) -> Self {
        FrameError::TooShort {
            layer,
            len: err.len,
            needed: err.required_len,
        }
    }
}

/// Log class of epoll failures (after the [`FrameError::log_class`] values).
const HOST_EVENT_LOG_CLASS: usize = 11;
/// Number of log classes: every [`FrameError::log_class`] and [`HOST_EVENT_LOG_CLASS`].
const FRAME_ERROR_LOG_CLASSES: usize = 12;

/// Whether a guest frame's TCP or UDP checksum is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Checksum {
    /// It is complete: verify it.
    Verify,
    /// The guest's driver left it partial for the device (virtio `NEEDS_CSUM`, offsets
    /// checked against the frame): not verified. Nothing of the frame but its payload
    /// goes on (into a host socket), so no partial checksum ever leaves baton.
    Partial,
}

/// How to treat the L4 checksum of a frame whose transport header said `checksum`, for
/// an IP packet carrying `protocol` whose message starts `l4_start` bytes into the frame.
/// A partial checksum is accepted only where it names exactly the TCP or UDP checksum
/// field; the guest's offsets are never used for anything else.
fn l4_checksum(
    checksum: TxChecksum,
    protocol: IpNumber,
    l4_start: Option<usize>,
) -> Result<L4Checksum, FrameError> {
    /// Offsets of the checksum field in the TCP and UDP headers.
    const TCP_CHECKSUM_AT: u16 = 16;
    const UDP_CHECKSUM_AT: u16 = 6;
    let TxChecksum::Partial { start, offset } = checksum else {
        return Ok(L4Checksum::Verify);
    };
    let field = match protocol {
        IpNumber::TCP => Some(TCP_CHECKSUM_AT),
        IpNumber::UDP => Some(UDP_CHECKSUM_AT),
        _ => None,
    };
    if l4_start.is_some_and(|at| at == usize::from(start)) && field == Some(offset) {
        Ok(L4Checksum::Partial)
    } else {
        Err(FrameError::PartialChecksum { start, offset })
    }
}

/// Where `part` starts within `whole`, if it is a part of it.
fn offset_within(whole: &[u8], part: &[u8]) -> Option<usize> {
    let at = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    (at.checked_add(part.len())? <= whole.len()).then_some(at)
}

/// What baton has learned about the guest from its traffic. Carried by the migration
/// stream, because the target cannot learn it again before the guest sends something.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObservedGuest {
    /// The guest's MAC address (learned from frame sources when not configured).
    pub mac: Option<MacAddr>,
    /// The last IPv4 source address the guest used (not 0.0.0.0).
    pub ipv4: Option<Ipv4Addr>,
    /// The last global-scope IPv6 source address the guest used.
    pub ipv6: Option<Ipv6Addr>,
    /// The last link-local IPv6 source address the guest used.
    pub ipv6_link_local: Option<Ipv6Addr>,
}

impl ObservedGuest {
    fn note_ipv4_source(&mut self, src: Ipv4Addr) {
        if !src.is_unspecified() && !src.is_multicast() && !src.is_broadcast() {
            self.ipv4 = Some(src);
        }
    }

    fn note_ipv6_source(&mut self, src: Ipv6Addr) {
        if src.is_unspecified() || src.is_multicast() || src.is_loopback() {
            return;
        }
        if src.is_unicast_link_local() {
            self.ipv6_link_local = Some(src);
        } else {
            self.ipv6 = Some(src);
        }
    }
}

/// Classes of guest-triggered log messages other than frame errors (each gets its own
/// token bucket, see `ratelimit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuestEvent {
    Arp,
    Dhcp,
    Ndp,
    Dhcpv6,
    MacChange,
}

/// Number of [`GuestEvent`] values.
const GUEST_EVENT_CLASSES: usize = 5;

/// Token buckets for [`GuestEvent`] log messages.
pub(crate) type GuestEventLog = LogLimiter<GUEST_EVENT_CLASSES>;

/// What a protocol handler needs to answer one guest frame.
pub(crate) struct ReplyContext<'a> {
    pub(crate) config: &'a NetConfig,
    pub(crate) observed: &'a ObservedGuest,
    /// Source MAC of the frame being answered: answers go back to it.
    pub(crate) requester_mac: MacAddr,
    pub(crate) event_log: &'a RefCell<GuestEventLog>,
}

impl ReplyContext<'_> {
    /// Whether a log message of class `event` may be written now (see
    /// [`LogLimiter::admit`]); used by `guest_log!`.
    pub(crate) fn log_budget(&self, event: GuestEvent) -> Option<u64> {
        let mut log = self.event_log.try_borrow_mut().ok()?;
        log.admit(event as usize, Instant::now())
    }

    /// Ethernet ends of a reply to the requester.
    pub(crate) fn reply_link(&self) -> frame::LinkEnds {
        frame::LinkEnds {
            src: self.config.our_mac,
            dst: self.requester_mac,
        }
    }

    /// Whether `addr` is one of the guest's own IPv4 addresses (configured or seen).
    pub(crate) fn is_guest_ipv4(&self, addr: Ipv4Addr) -> bool {
        self.config.v4.as_ref().is_some_and(|v4| v4.addr == addr)
            || self.observed.ipv4 == Some(addr)
    }

    /// Whether `addr` is one of the guest's own IPv6 addresses (configured or seen).
    pub(crate) fn is_guest_ipv6(&self, addr: Ipv6Addr) -> bool {
        self.config.v6.as_ref().is_some_and(|v6| v6.addr == addr)
            || self.observed.ipv6 == Some(addr)
            || self.observed.ipv6_link_local == Some(addr)
    }
}

/// A validated IPv4 packet from the guest.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ipv4Packet<'a> {
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
    pub(crate) protocol: IpNumber,
    /// The transport message (IP padding and options removed).
    pub(crate) payload: &'a [u8],
}

/// A validated IPv6 packet from the guest (extension headers skipped).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ipv6Packet<'a> {
    pub(crate) src: Ipv6Addr,
    pub(crate) dst: Ipv6Addr,
    pub(crate) hop_limit: u8,
    /// The upper-layer protocol after the extension headers.
    pub(crate) next_header: IpNumber,
    pub(crate) payload: &'a [u8],
}

/// A UDP datagram whose length and checksum were checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UdpDatagram<'a> {
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    pub(crate) payload: &'a [u8],
}

/// Hand `frame` to the guest; a full receive queue only costs a trace line (every
/// protocol here retries on its own).
pub(crate) fn deliver(sink: &mut dyn FrameSink, frame: &[u8], what: &str) {
    if !sink.send_frame(frame) {
        tracing::trace!("guest receive queue full: dropped {what}");
    }
}

/// The guest-facing network services: ARP, DHCP, NDP, DHCPv6 and ICMP echo.
///
/// Single-threaded: owned by the device's queue worker, which calls every method.
pub struct GuestNet {
    config: Arc<NetConfig>,
    observed: ObservedGuest,
    dhcpv4: dhcp::DhcpServer,
    dhcpv6: dhcpv6::Dhcpv6Server,
    router_advert: ndp::RouterAdvertiser,
    ping: icmp::PingFlows,
    /// TCP connections and `-t` listeners (see [`crate::tcp`]).
    tcp: crate::tcp::TcpFlows,
    /// UDP flows and `-u` forwards (see [`crate::udp`]).
    udp: crate::udp::UdpFlows,
    /// `--migrate-drop-tcp`: a LOAD whose TCP connections cannot be taken over goes on
    /// without them (they are reset towards the guest) instead of failing.
    drop_unmigratable_tcp: bool,
    /// `baton-repair`, when one is connected: it freezes and dumps sockets on SAVE
    /// and puts them in repair mode for a silent close at the end.
    repair: Option<baton_repair_ipc::RepairClient>,
    /// Where helpers come from ([`crate::repair_link`]), and the attachment number of
    /// the one in `repair` (`None`: set directly with [`GuestNet::set_repair_client`]).
    repair_link: Option<Arc<crate::repair_link::RepairLink>>,
    repair_attachment: Option<u64>,
    /// After a migration SAVE that dumped connections through a helper: that helper's
    /// attachment number (`Some(None)` for one set directly). A source that resumes
    /// without it (it died since) thaws through a fresh one.
    dumped_by: Option<Option<u64>>,
    /// Pre-dumps of the TCP connections taken while `LOG_ALL` is on
    /// ([`crate::predump`]), used by the next migration SAVE.
    pre_dump: crate::predump::PreDump,
    /// Host sockets of all protocol handlers; event data = [`icmp::EPOLL_OWNER_PING`]
    /// (and later other owners) in the top byte, a per-owner token below.
    epoll: Epoll,
    error_log: LogLimiter<FRAME_ERROR_LOG_CLASSES>,
    event_log: RefCell<GuestEventLog>,
}

impl fmt::Debug for GuestNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestNet")
            .field("observed", &self.observed)
            .field("ping_flows", &self.ping.len())
            .finish_non_exhaustive()
    }
}

impl GuestNet {
    /// Services for the network described by `config`. Fails only if the epoll
    /// instance cannot be created.
    pub fn new(config: Arc<NetConfig>) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        let now = Instant::now();
        let tcp = crate::tcp::TcpFlows::new(&config, &epoll, config.max_flows, now)?;
        let udp = crate::udp::UdpFlows::new(&config, &epoll, now)?;
        Ok(Self {
            tcp,
            udp,
            drop_unmigratable_tcp: false,
            repair: None,
            repair_link: None,
            repair_attachment: None,
            dumped_by: None,
            pre_dump: crate::predump::PreDump::default(),
            dhcpv4: dhcp::DhcpServer::new(&config),
            dhcpv6: dhcpv6::Dhcpv6Server::new(&config),
            router_advert: ndp::RouterAdvertiser::new(&config),
            ping: icmp::PingFlows::new(now, config.handlers.icmp),
            observed: ObservedGuest {
                mac: config.guest_mac,
                ..ObservedGuest::default()
            },
            config,
            epoll,
            error_log: LogLimiter::new(now),
            event_log: RefCell::new(LogLimiter::new(now)),
        })
    }

    /// `--migrate-drop-tcp`: see the field of the same name.
    pub fn set_drop_unmigratable_tcp(&mut self, drop: bool) {
        self.drop_unmigratable_tcp = drop;
    }

    /// Use `client` (a connected `baton-repair`) for the privileged steps of a migration.
    pub fn set_repair_client(&mut self, client: baton_repair_ipc::RepairClient) {
        self.repair = Some(client);
        self.repair_attachment = None;
    }

    /// Take helpers from `link` (started or attached at `--repair-path`) from now on.
    pub fn set_repair_link(&mut self, link: Arc<crate::repair_link::RepairLink>) {
        self.repair_link = Some(link);
    }

    /// Whether a helper is ready for the next migration step.
    pub fn has_repair_client(&self) -> bool {
        self.repair.is_some()
    }

    /// Pick up a helper that attached, or drop one that went away; with none, wait up
    /// to `wait` for one to attach (the link never takes our lock, so waiting here is
    /// safe).
    fn refresh_repair_client(&mut self, wait: Duration) {
        use crate::repair_link::Update;
        let Some(link) = &self.repair_link else {
            return;
        };
        let held = match (&self.repair, self.repair_attachment) {
            (Some(_), Some(number)) => Some(number),
            // Set directly: the link knows nothing of it, keep it unless one attaches.
            (Some(_), None) => {
                if let Update::Attached(client, number) = link.update(None, Duration::ZERO) {
                    self.repair = Some(client);
                    self.repair_attachment = Some(number);
                }
                return;
            }
            (None, _) => None,
        };
        let mut update = link.update(held, wait);
        if let Update::Gone = update {
            self.repair = None;
            self.repair_attachment = None;
            // The helper died since it was picked up: take (or have started) the next
            // one, within the same wait.
            update = link.update(None, wait);
        }
        if let Update::Attached(client, number) = update {
            self.repair = Some(client);
            self.repair_attachment = Some(number);
        }
    }

    /// How long to wait for a helper about to be needed: a while if none is held and
    /// one can be started on demand (`--helper`), else not at all.
    fn helper_start_wait(&self) -> Duration {
        let can_spawn = self
            .repair_link
            .as_ref()
            .is_some_and(|link| link.can_spawn());
        if self.repair.is_none() && can_spawn {
            crate::repair_link::SAVE_WAIT
        } else {
            Duration::ZERO
        }
    }

    /// After a failed migration SAVE: the migration code has thawed what the helper
    /// dumped — unless the helper died on the way (killed in the middle of a dump).
    /// Sockets it froze before dying are deaf and in repair mode, which only a
    /// privileged helper can end, so the connections would hang. Then a fresh helper
    /// thaws every socket ([`GuestNet::thaw_through_fresh_helper`]).
    fn thaw_after_helper_died(&mut self) {
        let Some(client) = &self.repair else {
            return;
        };
        if !hung_up(client.as_fd()) {
            return;
        }
        tracing::warn!(
            "the repair helper died during SAVE: sockets it froze stay deaf until a new \
             helper thaws them"
        );
        self.thaw_through_fresh_helper("after the helper died during SAVE");
    }

    /// Whether the helper that dumped the frozen connections at SAVE
    /// ([`GuestNet::dumped_by`]) is gone: its connection hung up, or another helper
    /// replaced it.
    fn dumping_helper_lost(&self) -> bool {
        let Some(dumped_by) = self.dumped_by else {
            return false;
        };
        match &self.repair {
            None => true,
            Some(client) => hung_up(client.as_fd()) || self.repair_attachment != dumped_by,
        }
    }

    /// Forget the current helper (dead, or out of sync) and wait, bounded, for a fresh
    /// one (`--helper` starts one; an attached helper may reconnect).
    fn take_fresh_helper(&mut self) {
        self.repair = None;
        self.repair_attachment = None;
        let wait = self.helper_start_wait().max(crate::repair_link::SAVE_WAIT);
        self.refresh_repair_client(wait);
    }

    /// Drop the helper (dead, or out of sync), take a fresh one (`--helper` starts
    /// one), and thaw every TCP socket through it: a thaw is harmless on a socket that
    /// was never frozen (no filter to detach, repair mode already off). Closed sockets
    /// (nothing to thaw, refused by the helper) are left.
    fn thaw_through_fresh_helper(&mut self, why: &str) {
        self.take_fresh_helper();
        let Some(helper) = self.repair.as_mut() else {
            tracing::error!(
                "no baton-repair helper to thaw the sockets of {} TCP connection(s) {why}: \
                 those in repair mode hang",
                self.tcp.len()
            );
            return;
        };
        let fds: Vec<BorrowedFd<'_>> = self
            .tcp
            .flow_sockets()
            .into_iter()
            .filter(|(_, fd)| !matches!(crate::tcp::socket_is_closed(*fd), Ok(true)))
            .map(|(_, fd)| fd)
            .collect();
        crate::restore::thaw_logged(helper, &fds, why);
        tracing::info!(
            "{} TCP socket(s) thawed through a fresh baton-repair {why}",
            fds.len()
        );
    }

    /// SAVE with `--migrate-drop-tcp` after a dump request failed as a whole: if the
    /// helper died in it, the sockets of that request may be deaf and in repair mode,
    /// where they could carry nothing even on a same-host target, and the dumped ones
    /// need a live helper to leave repair mode at the handover. So take a fresh helper
    /// (`--helper` starts one; bounded wait), which thaws and dumps them again
    /// ([`crate::restore::redump_interrupted`]) and serves the rest of the SAVE.
    pub(crate) fn redump_after_helper_died(&mut self, dump: &mut crate::restore::DumpOutcome) {
        let dead = self
            .repair
            .as_ref()
            .is_none_or(|client| hung_up(client.as_fd()));
        if !dead {
            // The helper answered the thaw right after the failure already.
            return;
        }
        self.take_fresh_helper();
        let Some(helper) = self.repair.as_mut() else {
            tracing::error!(
                "the repair helper died during SAVE and no fresh one came: {} TCP \
                 connection(s) of the interrupted dump may stay in repair mode",
                dump.unknown_flows.len()
            );
            return;
        };
        crate::restore::redump_interrupted(&self.tcp, helper, dump);
    }

    /// SAVE of a migration is about to dump the TCP connections: make sure the helper is
    /// the current one, waiting a little for a late one; say loudly if there is none.
    fn prepare_repair_for_save(&mut self) {
        let flows = self.tcp.len();
        let wait = if flows > 0 {
            crate::repair_link::SAVE_WAIT
        } else {
            Duration::ZERO
        };
        self.refresh_repair_client(wait);
        if flows > 0 && self.repair.is_none() {
            let path = self
                .repair_link
                .as_ref()
                .and_then(|link| link.path())
                .map_or_else(
                    || "(no --repair-path)".to_string(),
                    |p| p.display().to_string(),
                );
            tracing::error!(
                "TCP connections will not survive a migration to another host or network \
                 namespace: no baton-repair helper is attached at {path} (waited {wait:?}); \
                 {flows} connection(s) cannot be dumped (a target on this host can still \
                 take them over)"
            );
        }
    }

    /// TCP connections frozen by a migration SAVE and still ours: those a same-host
    /// target took over are let go first (the target holds the very same sockets, so
    /// lingering on them would protect nothing).
    pub fn frozen_tcp_flows(&mut self) -> usize {
        if !self.tcp.is_frozen() {
            return 0;
        }
        let env = crate::tcp::Env {
            config: &self.config,
            epoll: &self.epoll,
            guest_mac: self.observed.mac,
        };
        self.tcp.collect_handover(&env);
        self.tcp.len()
    }

    /// The end of a migration on the source (linger over, or exit): connections a
    /// same-host target took are left to it; every other frozen socket is put in repair
    /// mode through the helper and closed, so that the peer sees neither FIN nor RST
    /// (the target, on another host, carries on with it). Without a helper they close
    /// normally, with a warning. Returns how many were closed here.
    pub fn close_frozen_silently(&mut self) -> usize {
        if !self.tcp.is_frozen() {
            return 0;
        }
        // The helper may have died since SAVE: a fresh one closes them silently.
        self.refresh_repair_client(self.helper_start_wait());
        let env = crate::tcp::Env {
            config: &self.config,
            epoll: &self.epoll,
            guest_mac: self.observed.mac,
        };
        let repair = &mut self.repair;
        let (taken, closed) = self
            .tcp
            .close_frozen(&env, |sockets| silence_sockets(repair.as_mut(), sockets));
        tracing::info!(
            "migration over: {taken} TCP connection(s) belong to the target, {closed} \
             closed here"
        );
        closed
    }

    /// The TCP table, its environment and the helper (the current one: a helper that
    /// attached since is picked up, one that went away is dropped), for the migration
    /// code.
    pub(crate) fn tcp_and_repair(
        &mut self,
    ) -> (
        &mut crate::tcp::TcpFlows,
        crate::tcp::Env<'_>,
        Option<&mut baton_repair_ipc::RepairClient>,
    ) {
        self.refresh_repair_client(Duration::ZERO);
        self.tcp_and_held_repair()
    }

    /// [`GuestNet::tcp_and_repair`] with the helper held now, as it is: a SAVE that
    /// dumped through it must go on with the same one (if it died, its failure path
    /// knows what to thaw; see [`GuestNet::redump_after_helper_died`]).
    pub(crate) fn tcp_and_held_repair(
        &mut self,
    ) -> (
        &mut crate::tcp::TcpFlows,
        crate::tcp::Env<'_>,
        Option<&mut baton_repair_ipc::RepairClient>,
    ) {
        let env = crate::tcp::Env {
            config: &self.config,
            epoll: &self.epoll,
            guest_mac: self.observed.mac,
        };
        (&mut self.tcp, env, self.repair.as_mut())
    }

    /// The pre-dumps for a migration SAVE (the running pass, if any, stops).
    pub(crate) fn take_pre_dumps(
        &mut self,
    ) -> std::collections::HashMap<crate::flow::FlowId, crate::predump::Entry> {
        self.pre_dump.take_for_save()
    }

    /// The UDP flows with what loading them needs (configuration, epoll set, the
    /// guest's MAC), for the migration code.
    pub(crate) fn udp_parts(
        &mut self,
    ) -> (
        &mut crate::udp::UdpFlows,
        &NetConfig,
        &Epoll,
        Option<MacAddr>,
    ) {
        (&mut self.udp, &self.config, &self.epoll, self.observed.mac)
    }

    /// Whether a LOAD may go on without TCP connections it cannot take over.
    pub(crate) fn drop_unmigratable_tcp(&self) -> bool {
        self.drop_unmigratable_tcp
    }

    /// The configuration these services answer with.
    pub fn config(&self) -> &Arc<NetConfig> {
        &self.config
    }

    /// The guest's MAC address: configured, or learned from its frames.
    pub fn guest_mac(&self) -> Option<MacAddr> {
        self.observed.mac
    }

    /// What baton has learned about the guest (for the migration stream).
    pub fn observed(&self) -> &ObservedGuest {
        &self.observed
    }

    /// Adopt what the migration source had learned about the guest. A configured guest
    /// MAC still wins over the stream's.
    pub fn restore_observed(&mut self, observed: ObservedGuest) {
        self.observed = ObservedGuest {
            mac: self.config.guest_mac.or(observed.mac),
            ..observed
        };
    }

    /// Enable or disable answering ICMP echo through ping sockets. Starts as
    /// `config.handlers.icmp` (passt's `--no-icmp` clears it); disabling closes the
    /// existing ping sockets.
    pub fn set_icmp_echo_enabled(&mut self, enabled: bool) {
        self.ping.set_enabled(enabled, &self.epoll);
    }

    /// The epoll instance holding every host socket; readable when
    /// [`GuestNet::handle_host_events`] has work.
    pub fn epoll_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// Process one frame the guest sent (Ethernet header first, no virtio header).
    /// Answers go to `sink`. Errors are already logged (rate-limited); see the module
    /// documentation for which traffic returns [`FrameError::Unhandled`].
    pub fn handle_frame(
        &mut self,
        frame: &[u8],
        sink: &mut dyn FrameSink,
    ) -> Result<(), FrameError> {
        self.handle_offloaded_frame(frame, TxChecksum::Complete, sink)
    }

    /// [`GuestNet::handle_frame`] for a frame whose virtio-net header said `checksum`: a
    /// [`TxChecksum::Partial`] TCP or UDP checksum is not verified, once its offsets are
    /// found to name that checksum field; any other partial checksum is
    /// [`FrameError::PartialChecksum`].
    pub fn handle_offloaded_frame(
        &mut self,
        frame: &[u8],
        checksum: TxChecksum,
        sink: &mut dyn FrameSink,
    ) -> Result<(), FrameError> {
        let now = Instant::now();
        let result = self.dispatch_frame(frame, checksum, sink, now);
        if let Err(err) = &result {
            self.log_frame_error(err, now);
        }
        self.ping.expire_idle_throttled(&self.epoll, now);
        result
    }

    /// Read everything the host sockets have for the guest (echo replies) and send it to
    /// `sink`. Call when [`GuestNet::epoll_fd`] is readable. Errors are failures of the
    /// epoll instance itself; per-socket errors close that socket and are logged.
    pub fn handle_host_events(&mut self, sink: &mut dyn FrameSink) -> io::Result<()> {
        const EVENTS_PER_ROUND: usize = 64;
        let mut events = [EpollEvent::empty(); EVENTS_PER_ROUND];
        let now = Instant::now();
        let ready = self
            .epoll
            .wait(&mut events, EpollTimeout::ZERO)
            .map_err(io::Error::from)?;
        for event in events.iter().take(ready) {
            let data = event.data();
            match (data >> icmp::EPOLL_OWNER_SHIFT) as u8 {
                icmp::EPOLL_OWNER_PING => {
                    self.ping
                        .handle_socket_ready(data, &self.config, &self.epoll, sink, now);
                }
                crate::tcp::EPOLL_OWNER_TCP => {
                    let env = crate::tcp::Env {
                        config: &self.config,
                        epoll: &self.epoll,
                        guest_mac: self.observed.mac,
                    };
                    self.tcp.handle_event(&env, data, event.events(), sink, now);
                }
                crate::udp::EPOLL_OWNER_UDP => self.udp.handle_socket_ready(
                    event.events(),
                    data,
                    &self.config,
                    &self.observed,
                    &self.epoll,
                    sink,
                    now,
                ),
                owner => tracing::warn!("epoll event for unknown owner {owner}"),
            }
        }
        let env = crate::tcp::Env {
            config: &self.config,
            epoll: &self.epoll,
            guest_mac: self.observed.mac,
        };
        self.tcp.after_events(&env, sink, now);
        self.ping.expire_idle_throttled(&self.epoll, now);
        Ok(())
    }

    /// A TCP segment from the guest: to the flow table, unless TCP is disabled.
    fn dispatch_tcp(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        l4: &[u8],
        checksum: L4Checksum,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) -> Result<(), FrameError> {
        if !self.config.handlers.tcp {
            return Err(FrameError::Unhandled(UnhandledTraffic::Tcp));
        }
        let env = crate::tcp::Env {
            config: &self.config,
            epoll: &self.epoll,
            guest_mac: self.observed.mac,
        };
        self.tcp
            .handle_guest_segment(&env, src, dst, l4, checksum, sink, now)
            .map_err(|err| match err {
                crate::tcp::TcpError::Segment(crate::tcp::segment::SegmentError::Checksum) => {
                    FrameError::BadChecksum { layer: Layer::Tcp }
                }
                crate::tcp::TcpError::Segment(_) => FrameError::Malformed {
                    layer: Layer::Tcp,
                    reason: "bad header or options",
                },
                crate::tcp::TcpError::Unroutable(addr) => FrameError::UnroutableDestination(addr),
            })
    }

    /// Close host sockets idle longer than their timeout. `handle_frame` and
    /// `handle_host_events` already do this (at most once a second); a device with a
    /// periodic timer may call it too so sockets do not outlive a silent guest.
    pub fn expire_idle_flows(&mut self, now: Instant) {
        self.ping.expire_idle(&self.epoll, now);
        self.udp.expire_idle(&self.epoll, now);
    }

    fn log_frame_error(&mut self, err: &FrameError, now: Instant) {
        let Some(suppressed) = self.error_log.admit(err.log_class(), now) else {
            return;
        };
        match err {
            FrameError::Unhandled(_) => {
                tracing::trace!(suppressed, "guest frame not handled: {err}")
            }
            // Only a broken (or hostile) driver does this: worth seeing without debug logs.
            FrameError::PartialChecksum { .. } => {
                tracing::warn!(suppressed, "dropped guest frame: {err}")
            }
            _ => tracing::debug!(suppressed, "dropped guest frame: {err}"),
        }
    }

    fn learn_guest_mac(&mut self, src: MacAddr) {
        if self.observed.mac == Some(src) {
            return;
        }
        match self.observed.mac {
            None => tracing::info!("guest MAC address is {}", format_mac(src)),
            Some(old) => {
                let admitted = self
                    .event_log
                    .get_mut()
                    .admit(GuestEvent::MacChange as usize, Instant::now());
                if let Some(suppressed) = admitted {
                    tracing::info!(
                        suppressed,
                        "guest MAC address changed from {} to {}",
                        format_mac(old),
                        format_mac(src)
                    );
                }
            }
        }
        self.observed.mac = Some(src);
    }

    fn dispatch_frame(
        &mut self,
        frame: &[u8],
        checksum: TxChecksum,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) -> Result<(), FrameError> {
        let eth = Ethernet2Slice::from_slice_without_fcs(frame)
            .map_err(|e| FrameError::too_short(Layer::Ethernet, &e))?;
        let requester_mac = eth.source();
        if is_multicast_mac(requester_mac) || requester_mac == [0; 6] {
            return Err(FrameError::Malformed {
                layer: Layer::Ethernet,
                reason: "source MAC is multicast or zero",
            });
        }
        if requester_mac == self.config.our_mac {
            return Err(FrameError::Malformed {
                layer: Layer::Ethernet,
                reason: "source MAC is baton's own",
            });
        }
        if self.config.guest_mac.is_none() {
            self.learn_guest_mac(requester_mac);
        }
        let payload = eth.payload_slice();
        match eth.ether_type() {
            EtherType::ARP => {
                if let TxChecksum::Partial { start, offset } = checksum {
                    return Err(FrameError::PartialChecksum { start, offset });
                }
                let ctx = ReplyContext {
                    config: &self.config,
                    observed: &self.observed,
                    requester_mac,
                    event_log: &self.event_log,
                };
                arp::handle_arp(&ctx, payload, sink)
            }
            EtherType::IPV4 => {
                self.dispatch_ipv4(frame, payload, checksum, requester_mac, sink, now)
            }
            EtherType::IPV6 => {
                self.dispatch_ipv6(frame, payload, checksum, requester_mac, sink, now)
            }
            other => Err(FrameError::UnsupportedEtherType(other.0)),
        }
    }

    /// An IPv4 `packet`, the payload of the Ethernet `frame`.
    fn dispatch_ipv4(
        &mut self,
        frame: &[u8],
        packet: &[u8],
        checksum: TxChecksum,
        requester_mac: MacAddr,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) -> Result<(), FrameError> {
        let ip = parse_ipv4(packet)?;
        let l4 = l4_checksum(checksum, ip.protocol, offset_within(frame, ip.payload))?;
        self.observed.note_ipv4_source(ip.src);
        let ctx = ReplyContext {
            config: &self.config,
            observed: &self.observed,
            requester_mac,
            event_log: &self.event_log,
        };
        match ip.protocol {
            IpNumber::UDP => {
                let udp = parse_udp_v4_with(&ip, l4)?;
                if udp.dst_port == dhcp::SERVER_PORT
                    && self.config.services.dhcp
                    && dhcp::DhcpServer::is_addressed_to_server(&self.config, ip.dst)
                {
                    self.dhcpv4.handle_dhcp(&ctx, &udp, sink)
                } else {
                    self.udp.handle_guest_v4(&ctx, &self.epoll, &ip, &udp, now)
                }
            }
            IpNumber::ICMP => self.ping.handle_icmpv4(&ctx, &self.epoll, &ip, now),
            IpNumber::TCP => self.dispatch_tcp(
                IpAddr::V4(ip.src),
                IpAddr::V4(ip.dst),
                ip.payload,
                l4,
                sink,
                now,
            ),
            // Multicast group membership reports: nothing to answer.
            IpNumber::IGMP => Ok(()),
            other => Err(FrameError::UnsupportedProtocol {
                layer: Layer::Ipv4,
                number: other.0,
            }),
        }
    }

    /// An IPv6 `packet`, the payload of the Ethernet `frame`.
    fn dispatch_ipv6(
        &mut self,
        frame: &[u8],
        packet: &[u8],
        checksum: TxChecksum,
        requester_mac: MacAddr,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) -> Result<(), FrameError> {
        let ip = parse_ipv6(packet)?;
        let l4 = l4_checksum(checksum, ip.next_header, offset_within(frame, ip.payload))?;
        self.observed.note_ipv6_source(ip.src);
        let ctx = ReplyContext {
            config: &self.config,
            observed: &self.observed,
            requester_mac,
            event_log: &self.event_log,
        };
        match ip.next_header {
            IpNumber::UDP => {
                let udp = parse_udp_v6_with(&ip, l4)?;
                if udp.dst_port == dhcpv6::SERVER_PORT
                    && self.config.services.dhcpv6
                    && self.dhcpv6.is_addressed_to_server(ip.dst)
                {
                    self.dhcpv6.handle_dhcpv6(&ctx, &ip, &udp, sink)
                } else {
                    self.udp.handle_guest_v6(&ctx, &self.epoll, &ip, &udp, now)
                }
            }
            IpNumber::IPV6_ICMP => {
                let icmp_type = parse_icmpv6(&ip)?;
                match icmp_type {
                    ndp::TYPE_ROUTER_SOLICITATION => self
                        .router_advert
                        .handle_router_solicitation(&ctx, &ip, sink),
                    ndp::TYPE_NEIGHBOR_SOLICITATION => {
                        ndp::handle_neighbor_solicitation(&ctx, &ip, sink)
                    }
                    icmp::ICMPV6_ECHO_REQUEST => {
                        self.ping.handle_icmpv6_echo(&ctx, &self.epoll, &ip, now)
                    }
                    // Errors about flows: the flow tables' business.
                    1..=4 => Err(FrameError::Unhandled(UnhandledTraffic::IcmpError {
                        icmp_type,
                    })),
                    // Echo replies, MLD queries/reports (130-132, 143), router and
                    // neighbour advertisements and redirects (134, 136, 137) from the
                    // guest: nothing to answer.
                    icmp::ICMPV6_ECHO_REPLY | 130..=132 | 143 | 134 | 136 | 137 => Ok(()),
                    other => Err(FrameError::UnsupportedProtocol {
                        layer: Layer::Icmpv6,
                        number: other,
                    }),
                }
            }
            IpNumber::TCP => self.dispatch_tcp(
                IpAddr::V6(ip.src),
                IpAddr::V6(ip.dst),
                ip.payload,
                l4,
                sink,
                now,
            ),
            other => Err(FrameError::UnsupportedProtocol {
                layer: Layer::Ipv6,
                number: other.0,
            }),
        }
    }
}

/// The vhost-user device drives `GuestNet` through this trait. Frame errors were already
/// logged (rate-limited) by [`GuestNet::handle_frame`]; an epoll failure in
/// `handle_host_events` is logged here (rate-limited as well).
impl crate::vu::NetworkEngine for GuestNet {
    fn handle_frame(&mut self, frame: &[u8], checksum: TxChecksum, sink: &mut dyn FrameSink) {
        let _ = GuestNet::handle_offloaded_frame(self, frame, checksum, sink);
    }

    fn handle_host_events(&mut self, sink: &mut dyn FrameSink) {
        if let Err(err) = GuestNet::handle_host_events(self, sink) {
            let now = Instant::now();
            if let Some(suppressed) = self.error_log.admit(HOST_EVENT_LOG_CLASS, now) {
                tracing::error!(suppressed, "waiting for host socket events failed: {err}");
            }
        }
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.epoll_fd()
    }

    fn save_state(
        &mut self,
        mode: crate::migrate::SaveMode,
        prefix: &mut dyn FnMut(&crate::migrate::EngineState) -> std::io::Result<()>,
    ) -> Result<crate::migrate::EngineState, crate::migrate::EngineStateError> {
        if mode == crate::migrate::SaveMode::Migration {
            self.prepare_repair_for_save();
        }
        let saved = self.save_engine_state(mode, prefix);
        if mode == crate::migrate::SaveMode::Migration {
            match &saved {
                Ok(state) if state.repaired => {
                    self.dumped_by = Some(self.repair_attachment);
                }
                Ok(_) => self.dumped_by = None,
                Err(_) => self.thaw_after_helper_died(),
            }
        }
        saved
    }

    fn rings_started(&mut self) -> bool {
        if !self.tcp.is_frozen() {
            return true;
        }
        let env = crate::tcp::Env {
            config: &self.config,
            epoll: &self.epoll,
            guest_mac: self.observed.mac,
        };
        // Dumped sockets are in repair mode, which the helper of the SAVE ends when the
        // offer is cancelled; if it died since, a fresh one has to.
        let helper_lost = self.dumping_helper_lost();
        let done = self.tcp.source_resumed(&env);
        if done {
            tracing::info!("the rings run again here: the migration is off, connections resume");
            if helper_lost {
                self.thaw_through_fresh_helper(
                    "after the VM resumed without the helper of its SAVE",
                );
            }
            self.dumped_by = None;
        }
        done
    }

    fn frozen_tcp_flows(&mut self) -> usize {
        GuestNet::frozen_tcp_flows(self)
    }

    fn close_frozen_silently(&mut self) -> usize {
        GuestNet::close_frozen_silently(self)
    }

    fn pre_dump_begin(&mut self) -> Option<u64> {
        Some(self.pre_dump.begin(&self.tcp))
    }

    fn pre_dump_step(&mut self, number: u64) -> crate::predump::Step {
        if !self.pre_dump.is_current(number) {
            return crate::predump::Step::Done;
        }
        self.refresh_repair_client(Duration::ZERO);
        self.pre_dump.step(number, &self.tcp, self.repair.as_mut())
    }

    fn pre_dump_abandon(&mut self, number: u64) {
        self.pre_dump.abandon(number);
    }

    fn pre_dump_recover(&mut self) {
        self.refresh_repair_client(Duration::ZERO);
        self.pre_dump.recover(&self.tcp, self.repair.as_mut());
    }

    fn pre_dump_cancel(&mut self) {
        self.pre_dump.cancel();
    }

    fn load_state(
        &mut self,
        state: crate::migrate::EngineState,
    ) -> Result<(), crate::migrate::EngineStateError> {
        if state.tcp_flows.iter().any(|f| f.kernel.is_some()) {
            // Restoring dumped connections needs the helper: pick up one that attached,
            // or wait for the one being started (`--helper`, asked for when LOAD began).
            self.refresh_repair_client(self.helper_start_wait());
        }
        self.load_engine_state(state)
    }
}

/// Whether the peer of `socket` hung up (a helper that died: the kernel closed its end).
fn hung_up(socket: BorrowedFd<'_>) -> bool {
    let mut fds = [nix::poll::PollFd::new(
        socket,
        nix::poll::PollFlags::empty(),
    )];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0].revents().is_some_and(|r| {
            r.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR)
        })
}

/// Put `sockets` in repair mode through `repair` so that closing them sends nothing.
/// What cannot be silenced is logged: those sockets close normally (FIN, or RST with
/// unread data), which the peer of a migrated connection may take as its end.
fn silence_sockets(
    repair: Option<&mut baton_repair_ipc::RepairClient>,
    sockets: &[BorrowedFd<'_>],
) {
    if sockets.is_empty() {
        return;
    }
    let Some(client) = repair else {
        tracing::warn!(
            "no baton-repair helper to close {} frozen TCP socket(s) silently: their peers \
             see them closed",
            sockets.len()
        );
        return;
    };
    match client.set_repair(sockets, baton_proto::repair::RepairMode::On) {
        Ok(results) => {
            let failed = results.iter().filter(|r| r.is_err()).count();
            if let Some(Err(err)) = results.iter().find(|r| r.is_err()) {
                tracing::warn!(
                    "{failed} of {} frozen TCP socket(s) could not enter repair mode and \
                     close normally (first: {err})",
                    sockets.len()
                );
            }
        }
        Err(err) => tracing::warn!(
            "baton-repair: repair mode for {} frozen TCP socket(s): {err}; they close normally",
            sockets.len()
        ),
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub(crate) fn format_mac(mac: MacAddr) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

fn is_multicast_mac(mac: MacAddr) -> bool {
    mac[0] & 1 == 1
}

/// Validate an IPv4 packet: header, total length, header checksum, no fragments, no
/// authentication header, a unicast source.
pub(crate) fn parse_ipv4(packet: &[u8]) -> Result<Ipv4Packet<'_>, FrameError> {
    use etherparse::err::ipv4::SliceError;
    let ip = Ipv4Slice::from_slice(packet).map_err(|err| match err {
        SliceError::Len(len) => FrameError::too_short(Layer::Ipv4, &len),
        SliceError::Header(_) => FrameError::Malformed {
            layer: Layer::Ipv4,
            reason: "bad version or header length",
        },
        SliceError::Exts(_) => FrameError::Malformed {
            layer: Layer::Ipv4,
            reason: "bad authentication header",
        },
    })?;
    let header = ip.header();
    if internet_checksum(&[header.slice()]) != 0 {
        return Err(FrameError::BadChecksum { layer: Layer::Ipv4 });
    }
    if ip.extensions().auth.is_some() {
        return Err(FrameError::UnsupportedProtocol {
            layer: Layer::Ipv4,
            number: IpNumber::AUTHENTICATION_HEADER.0,
        });
    }
    if ip.payload().fragmented {
        return Err(FrameError::Fragmented);
    }
    let src = header.source_addr();
    if src.is_multicast() || src.is_broadcast() {
        return Err(FrameError::Malformed {
            layer: Layer::Ipv4,
            reason: "source address is multicast or broadcast",
        });
    }
    Ok(Ipv4Packet {
        src,
        dst: header.destination_addr(),
        protocol: ip.payload().ip_number,
        payload: ip.payload().payload,
    })
}

/// Validate an IPv6 packet: header, payload length, extension headers, no fragments, a
/// non-multicast source.
pub(crate) fn parse_ipv6(packet: &[u8]) -> Result<Ipv6Packet<'_>, FrameError> {
    use etherparse::err::ipv6::SliceError;
    let ip = Ipv6Slice::from_slice(packet).map_err(|err| match err {
        SliceError::Len(len) => FrameError::too_short(Layer::Ipv6, &len),
        SliceError::Header(_) => FrameError::Malformed {
            layer: Layer::Ipv6,
            reason: "bad version",
        },
        SliceError::Exts(_) => FrameError::Malformed {
            layer: Layer::Ipv6,
            reason: "bad extension header",
        },
    })?;
    if ip.is_payload_fragmented() {
        return Err(FrameError::Fragmented);
    }
    let header = ip.header();
    let src = header.source_addr();
    if src.is_multicast() {
        return Err(FrameError::Malformed {
            layer: Layer::Ipv6,
            reason: "source address is multicast",
        });
    }
    Ok(Ipv6Packet {
        src,
        dst: header.destination_addr(),
        hop_limit: header.hop_limit(),
        next_header: ip.payload().ip_number,
        payload: ip.payload().payload,
    })
}

fn parse_udp(payload: &[u8]) -> Result<UdpSlice<'_>, FrameError> {
    let udp = UdpSlice::from_slice(payload).map_err(|e| FrameError::too_short(Layer::Udp, &e))?;
    // A zero length field means "jumbogram" (RFC 2675), which needs a jumbo payload
    // option we do not accept.
    if udp.length() == 0 {
        return Err(FrameError::Malformed {
            layer: Layer::Udp,
            reason: "length field is zero",
        });
    }
    Ok(udp)
}

/// Validate a UDP datagram in IPv4: length, and the checksum unless it is 0 (none).
#[cfg(test)]
pub(crate) fn parse_udp_v4<'a>(ip: &Ipv4Packet<'a>) -> Result<UdpDatagram<'a>, FrameError> {
    parse_udp_v4_with(ip, L4Checksum::Verify)
}

/// [`parse_udp_v4`], verifying the checksum only if `checksum` says so.
fn parse_udp_v4_with<'a>(
    ip: &Ipv4Packet<'a>,
    checksum: L4Checksum,
) -> Result<UdpDatagram<'a>, FrameError> {
    let udp = parse_udp(ip.payload)?;
    if checksum == L4Checksum::Verify && udp.checksum() != 0 {
        let pseudo = frame::ipv4_pseudo_header(ip.src, ip.dst, IpNumber::UDP, udp.length());
        if internet_checksum(&[&pseudo, udp.slice()]) != 0 {
            return Err(FrameError::BadChecksum { layer: Layer::Udp });
        }
    }
    Ok(UdpDatagram {
        src_port: udp.source_port(),
        dst_port: udp.destination_port(),
        payload: udp.payload(),
    })
}

/// Validate a UDP datagram in IPv6: length, and the checksum (mandatory in IPv6).
#[cfg(test)]
pub(crate) fn parse_udp_v6<'a>(ip: &Ipv6Packet<'a>) -> Result<UdpDatagram<'a>, FrameError> {
    parse_udp_v6_with(ip, L4Checksum::Verify)
}

/// [`parse_udp_v6`], verifying the checksum only if `checksum` says so (a partial one
/// holds the pseudo-header sum, so its zero test does not apply either).
fn parse_udp_v6_with<'a>(
    ip: &Ipv6Packet<'a>,
    checksum: L4Checksum,
) -> Result<UdpDatagram<'a>, FrameError> {
    let udp = parse_udp(ip.payload)?;
    if checksum == L4Checksum::Verify {
        let pseudo =
            frame::ipv6_pseudo_header(ip.src, ip.dst, IpNumber::UDP, u32::from(udp.length()));
        if udp.checksum() == 0 || internet_checksum(&[&pseudo, udp.slice()]) != 0 {
            return Err(FrameError::BadChecksum { layer: Layer::Udp });
        }
    }
    Ok(UdpDatagram {
        src_port: udp.source_port(),
        dst_port: udp.destination_port(),
        payload: udp.payload(),
    })
}

/// Validate the length and checksum of the ICMPv6 message in `ip`; returns its type.
fn parse_icmpv6(ip: &Ipv6Packet<'_>) -> Result<u8, FrameError> {
    const HEADER_LEN: usize = 4;
    let Some(&icmp_type) = ip
        .payload
        .first()
        .filter(|_| ip.payload.len() >= HEADER_LEN)
    else {
        return Err(FrameError::TooShort {
            layer: Layer::Icmpv6,
            len: ip.payload.len(),
            needed: HEADER_LEN,
        });
    };
    if !frame::icmpv6_checksum_valid(ip.src, ip.dst, ip.payload) {
        return Err(FrameError::BadChecksum {
            layer: Layer::Icmpv6,
        });
    }
    Ok(icmp_type)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Shared helpers for the protocol modules' tests: a configuration, a capturing
    //! sink, and guest frame builders.

    use super::*;
    use crate::config::{GuestServices, ProtocolHandlers, V4Config, V6Config};
    use crate::ports::PortForwards;
    use etherparse::PacketBuilder;

    pub(crate) const GUEST_MAC: MacAddr = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    pub(crate) const OUR_MAC: MacAddr = crate::config::DEFAULT_OUR_MAC;

    /// The guest side of an established guest-initiated connection from
    /// `guest_v4():port` to 192.0.2.1:80, nothing in flight (migration tests).
    pub(crate) fn established_guest_side(port: u16) -> crate::tcp::conn::GuestSide {
        use crate::tcp::conn::{GuestSide, Origin, TcpState};
        use crate::tcp::seq::Seq;
        GuestSide {
            origin: Origin::Guest,
            guest_addr: IpAddr::V4(guest_v4()),
            guest_port: port,
            remote_addr: "192.0.2.1".parse().unwrap(),
            remote_port: 80,
            state: TcpState::Established,
            isn: Seq(1000),
            seq_to_guest: Seq(1001),
            seq_max_to_guest: Seq(1001),
            seq_ack_from_guest: Seq(1001),
            seq_from_guest: Seq(5000),
            fin_to_guest: None,
            fin_from_guest: false,
            guest_window: 65535,
            guest_window_scale: 0,
            our_window_scale: 0,
            mss: 1460,
            window_to_guest: 65535,
            sack_permitted: true,
        }
    }

    pub(crate) fn guest_v4() -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 10, 20)
    }
    pub(crate) fn gateway_v4() -> Ipv4Addr {
        Ipv4Addr::new(192, 168, 10, 1)
    }
    pub(crate) fn guest_v6() -> Ipv6Addr {
        "2001:db8:1:2::20".parse().expect("literal")
    }
    pub(crate) fn guest_ll() -> Ipv6Addr {
        "fe80::5054:ff:fe12:3456".parse().expect("literal")
    }
    pub(crate) fn gateway_ll() -> Ipv6Addr {
        "fe80::1".parse().expect("literal")
    }

    pub(crate) fn config_with(mtu: u16, guest_mac: Option<MacAddr>) -> NetConfig {
        NetConfig {
            our_mac: OUR_MAC,
            guest_mac,
            mtu,
            v4: Some(V4Config {
                addr: guest_v4(),
                prefix_len: 24,
                gateway: gateway_v4(),
                dns: vec![Ipv4Addr::new(192, 168, 10, 53), Ipv4Addr::new(9, 9, 9, 9)],
                map_host_loopback: None,
                map_guest_addr: None,
                dns_forward: None,
                dns_host: None,
                outbound_addr: None,
                outbound_interface: None,
                template_interface: None,
            }),
            v6: Some(V6Config {
                addr: guest_v6(),
                prefix_len: 64,
                gateway: gateway_ll(),
                dns: vec!["2001:db8::53".parse().expect("literal")],
                map_host_loopback: None,
                map_guest_addr: None,
                router_link_local: gateway_ll(),
                dns_forward: None,
                dns_host: None,
                outbound_addr: None,
                outbound_interface: None,
                template_interface: None,
            }),
            dns_search: vec!["example.com".into(), "lab.example.org".into()],
            interface: None,
            services: GuestServices {
                dhcp: true,
                dhcpv6: true,
                ndp: true,
                router_advertisements: true,
                advertise_dns: true,
                advertise_search: true,
            },
            handlers: ProtocolHandlers {
                tcp: true,
                udp: true,
                icmp: true,
            },
            tcp_forwards: PortForwards::none(),
            udp_forwards: PortForwards::none(),
            freebind: false,
            max_flows: crate::flow::DEFAULT_MAX_FLOWS,
            udp_idle_timeout: crate::udp::IDLE_TIMEOUT,
            hostname: None,
            fqdn: None,
        }
    }

    pub(crate) fn config() -> NetConfig {
        config_with(65520, None)
    }

    pub(crate) fn guest_net() -> GuestNet {
        GuestNet::new(Arc::new(config())).expect("GuestNet::new")
    }

    /// A sink that keeps every frame.
    #[derive(Default)]
    pub(crate) struct CapturedFrames(pub(crate) Vec<Vec<u8>>);

    impl FrameSink for CapturedFrames {
        fn send_frame(&mut self, frame: &[u8]) -> bool {
            self.0.push(frame.to_vec());
            true
        }
    }

    impl CapturedFrames {
        pub(crate) fn take_one(&mut self) -> Vec<u8> {
            assert_eq!(self.0.len(), 1, "expected exactly one frame to the guest");
            self.0.remove(0)
        }
    }

    /// A UDP/IPv4 frame from the guest.
    pub(crate) fn guest_udp4(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ports: (u16, u16),
        payload: &[u8],
    ) -> Vec<u8> {
        let dst_mac = if dst.is_broadcast() {
            [0xff; 6]
        } else {
            OUR_MAC
        };
        let builder = PacketBuilder::ethernet2(GUEST_MAC, dst_mac)
            .ipv4(src.octets(), dst.octets(), 64)
            .udp(ports.0, ports.1);
        let mut frame = Vec::new();
        builder.write(&mut frame, payload).expect("build");
        frame
    }

    /// A UDP/IPv6 frame from the guest.
    pub(crate) fn guest_udp6(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        ports: (u16, u16),
        payload: &[u8],
    ) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2(GUEST_MAC, [0x33, 0x33, 0, 1, 0, 2])
            .ipv6(src.octets(), dst.octets(), 1)
            .udp(ports.0, ports.1);
        let mut frame = Vec::new();
        builder.write(&mut frame, payload).expect("build");
        frame
    }

    /// An ICMPv6 frame from the guest: `message` is type, code, checksum (filled in
    /// here), body.
    pub(crate) fn guest_icmpv6(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        hop_limit: u8,
        mut message: Vec<u8>,
    ) -> Vec<u8> {
        frame::set_icmpv6_checksum(src, dst, &mut message);
        let link = frame::LinkEnds {
            src: GUEST_MAC,
            dst: OUR_MAC,
        };
        frame::ipv6_frame(link, src, dst, IpNumber::IPV6_ICMP, hop_limit, &message).expect("build")
    }

    /// Parse a frame baton sent to the guest down to its IPv4 packet.
    pub(crate) fn reply_ipv4(frame: &[u8]) -> (Ethernet2Slice<'_>, Ipv4Packet<'_>) {
        let eth = Ethernet2Slice::from_slice_without_fcs(frame).expect("ethernet");
        assert_eq!(eth.ether_type(), EtherType::IPV4);
        assert_eq!(eth.source(), OUR_MAC);
        let ip = parse_ipv4(&frame[14..]).expect("valid IPv4 reply");
        (eth, ip)
    }

    /// Parse a frame baton sent to the guest down to its IPv6 packet.
    pub(crate) fn reply_ipv6(frame: &[u8]) -> (Ethernet2Slice<'_>, Ipv6Packet<'_>) {
        let eth = Ethernet2Slice::from_slice_without_fcs(frame).expect("ethernet");
        assert_eq!(eth.ether_type(), EtherType::IPV6);
        assert_eq!(eth.source(), OUR_MAC);
        let ip = parse_ipv6(&frame[14..]).expect("valid IPv6 reply");
        (eth, ip)
    }

    /// Feed every strict prefix of `frame` and a few corruptions: each must be an
    /// error or silently ignored, never a panic, and never an answer built from
    /// garbage (a truncated frame gets no reply).
    pub(crate) fn assert_truncations_rejected(net: &mut GuestNet, frame: &[u8]) {
        for len in 0..frame.len() {
            let mut sink = CapturedFrames::default();
            let result = net.handle_frame(&frame[..len], &mut sink);
            assert!(result.is_err(), "truncated to {len} bytes was accepted");
            assert!(sink.0.is_empty(), "truncated to {len} bytes got an answer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use etherparse::PacketBuilder;

    #[test]
    fn learns_guest_mac_and_addresses_from_traffic() {
        let mut net = guest_net();
        assert_eq!(net.guest_mac(), None);
        let frame = guest_udp4(guest_v4(), Ipv4Addr::new(1, 1, 1, 1), (1000, 53), b"q");
        let mut sink = CapturedFrames::default();
        let _ = net.handle_frame(&frame, &mut sink);
        assert_eq!(net.guest_mac(), Some(GUEST_MAC));
        assert_eq!(net.observed().ipv4, Some(guest_v4()));

        let frame = guest_udp6(
            guest_ll(),
            "ff02::1:2".parse().expect("addr"),
            (546, 5000),
            b"x",
        );
        let _ = net.handle_frame(&frame, &mut sink);
        assert_eq!(net.observed().ipv6_link_local, Some(guest_ll()));
        let frame = guest_udp6(
            guest_v6(),
            "2001:db8::1".parse().expect("addr"),
            (1, 2),
            b"x",
        );
        let _ = net.handle_frame(&frame, &mut sink);
        assert_eq!(net.observed().ipv6, Some(guest_v6()));
        assert!(sink.0.is_empty());
    }

    #[test]
    fn configured_guest_mac_is_not_overridden() {
        let configured = [0x02, 0, 0, 0, 0, 0x42];
        let mut net = GuestNet::new(Arc::new(config_with(1500, Some(configured)))).expect("new");
        let frame = guest_udp4(guest_v4(), gateway_v4(), (1, 2), b"");
        let _ = net.handle_frame(&frame, &mut CapturedFrames::default());
        assert_eq!(net.guest_mac(), Some(configured));
        net.restore_observed(ObservedGuest {
            mac: Some(GUEST_MAC),
            ipv4: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..ObservedGuest::default()
        });
        assert_eq!(net.guest_mac(), Some(configured));
        assert_eq!(net.observed().ipv4, Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn tcp_is_reported_unhandled_not_as_a_guest_fault_when_disabled() {
        let mut config = config();
        config.handlers.tcp = false;
        let mut net = GuestNet::new(Arc::new(config)).expect("GuestNet::new");
        let builder = PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
            .ipv4(guest_v4().octets(), [1, 1, 1, 1], 64)
            .tcp(40000, 80, 1, 65535)
            .syn();
        let mut frame = Vec::new();
        builder.write(&mut frame, &[]).expect("build");
        let err = net
            .handle_frame(&frame, &mut CapturedFrames::default())
            .expect_err("tcp is not ours");
        assert_eq!(err, FrameError::Unhandled(UnhandledTraffic::Tcp));
        assert!(!err.is_guest_fault());
    }

    #[test]
    fn rejects_wrong_ethertype_and_bad_source_macs() {
        let mut net = guest_net();
        let mut frame = guest_udp4(guest_v4(), gateway_v4(), (1, 2), b"");
        frame[6] = 0x01; // multicast source
        assert!(matches!(
            net.handle_frame(&frame, &mut CapturedFrames::default()),
            Err(FrameError::Malformed {
                layer: Layer::Ethernet,
                ..
            })
        ));
        let mut frame = guest_udp4(guest_v4(), gateway_v4(), (1, 2), b"");
        frame[6..12].copy_from_slice(&OUR_MAC);
        assert!(matches!(
            net.handle_frame(&frame, &mut CapturedFrames::default()),
            Err(FrameError::Malformed {
                layer: Layer::Ethernet,
                ..
            })
        ));
        assert_eq!(net.guest_mac(), None, "invalid sources are not learned");
        let mut frame = guest_udp4(guest_v4(), gateway_v4(), (1, 2), b"");
        frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        assert_eq!(
            net.handle_frame(&frame, &mut CapturedFrames::default()),
            Err(FrameError::UnsupportedEtherType(0x88b5))
        );
    }

    #[test]
    fn rejects_bad_ipv4_header_checksum_and_lengths() {
        let mut net = guest_net();
        let good = guest_udp4(guest_v4(), gateway_v4(), (1000, 2000), b"payload");
        let mut bad_checksum = good.clone();
        bad_checksum[14 + 10] ^= 0x55;
        assert_eq!(
            net.handle_frame(&bad_checksum, &mut CapturedFrames::default()),
            Err(FrameError::BadChecksum { layer: Layer::Ipv4 })
        );
        // Total length beyond the frame.
        let mut too_long = good.clone();
        let total = u16::from_be_bytes([too_long[16], too_long[17]]) + 10;
        too_long[16..18].copy_from_slice(&total.to_be_bytes());
        too_long[24..26].copy_from_slice(&[0, 0]);
        let sum = internet_checksum(&[&too_long[14..34]]);
        too_long[24..26].copy_from_slice(&sum.to_be_bytes());
        assert!(matches!(
            net.handle_frame(&too_long, &mut CapturedFrames::default()),
            Err(FrameError::TooShort {
                layer: Layer::Ipv4,
                ..
            })
        ));
        // Header length below 5 words.
        let mut short_ihl = good.clone();
        short_ihl[14] = 0x44;
        assert!(matches!(
            net.handle_frame(&short_ihl, &mut CapturedFrames::default()),
            Err(FrameError::Malformed {
                layer: Layer::Ipv4,
                ..
            })
        ));
        // UDP checksum wrong.
        let mut bad_udp = good.clone();
        let last = bad_udp.len() - 1;
        bad_udp[last] ^= 1;
        assert_eq!(
            net.handle_frame(&bad_udp, &mut CapturedFrames::default()),
            Err(FrameError::BadChecksum { layer: Layer::Udp })
        );
        // UDP length field beyond the IP payload.
        let mut bad_udp_len = good;
        bad_udp_len[34 + 4..34 + 6].copy_from_slice(&200u16.to_be_bytes());
        assert!(matches!(
            net.handle_frame(&bad_udp_len, &mut CapturedFrames::default()),
            Err(FrameError::TooShort {
                layer: Layer::Udp,
                ..
            })
        ));
    }

    #[test]
    fn rejects_fragments() {
        let mut net = guest_net();
        let mut frame = guest_udp4(guest_v4(), gateway_v4(), (1000, 67), b"payload");
        frame[14 + 6] = 0x20; // more fragments
        frame[24..26].copy_from_slice(&[0, 0]);
        let sum = internet_checksum(&[&frame[14..34]]);
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            net.handle_frame(&frame, &mut CapturedFrames::default()),
            Err(FrameError::Fragmented)
        );
    }

    #[test]
    fn ipv6_udp_without_checksum_is_rejected() {
        let mut net = guest_net();
        let mut frame = guest_udp6(guest_ll(), gateway_ll(), (546, 547), b"abc");
        frame[14 + 40 + 6..14 + 40 + 8].copy_from_slice(&[0, 0]);
        assert_eq!(
            net.handle_frame(&frame, &mut CapturedFrames::default()),
            Err(FrameError::BadChecksum { layer: Layer::Udp })
        );
    }

    #[test]
    fn truncated_frames_are_errors() {
        let mut net = guest_net();
        let frame = guest_udp4(guest_v4(), gateway_v4(), (1000, 2000), b"0123456789");
        assert_truncations_rejected(&mut net, &frame);
    }

    #[test]
    fn errors_are_logged_at_a_bounded_rate() {
        let mut net = guest_net();
        let now = Instant::now();
        let err = FrameError::Fragmented;
        let admitted = (0..1000)
            .filter(|_| net.error_log.admit(err.log_class(), now).is_some())
            .count();
        assert_eq!(admitted, ratelimit::BURST as usize);
    }
}
