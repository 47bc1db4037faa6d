//! TCP: the guest's connections, each mapped onto one host socket.
//!
//! Theory of operation. baton is a real TCP endpoint towards the guest (handshake,
//! sequence and acknowledgement tracking, the guest's window, retransmission, FIN and
//! RST) and an ordinary socket user towards the host. It never buffers payload:
//!
//! * guest → host: a data segment that starts at or before RCV.NXT (`seq_from_guest`)
//!   has its new part written straight into the socket (`send`, non-blocking). What the
//!   socket does not take is not acknowledged, so the guest sends it again. The window we
//!   advertise is the socket's free send space, scaled.
//! * host → guest: data stays in the socket's receive queue until the guest
//!   acknowledges it. It is read with `MSG_PEEK` at the offset `SO_PEEK_OFF`, which the
//!   kernel advances by what each peek returned, straight into segments for the guest;
//!   an ACK from the guest consumes the acknowledged bytes (`recv(MSG_TRUNC)`), which
//!   moves the peek offset back by as much. So at any time:
//!
//! ```text
//!   socket receive queue:  [ acked by nobody yet ........................ | not yet peeked ... ]
//!                          ^ head                                          ^ head + SO_PEEK_OFF
//!   guest sequence space:  seq_ack_from_guest (SND.UNA)                    seq_to_guest (SND.NXT)
//!
//!   SO_PEEK_OFF == seq_to_guest - seq_ack_from_guest   (minus our FIN once it is sent)
//!   guest ACK a:   recv(MSG_TRUNC, a - seq_ack_from_guest); seq_ack_from_guest = a
//!   retransmit:    seq_to_guest = seq_ack_from_guest; SO_PEEK_OFF = 0; peek again
//!   SACK hole h:   SO_PEEK_OFF = h - seq_ack_from_guest; peek the hole; SO_PEEK_OFF back
//!   guest RX full: SO_PEEK_OFF = seq_to_guest - seq_ack_from_guest (undo the unsent peek)
//! ```
//!
//! A peek that returns 0 bytes means the peer closed and everything before its FIN was
//! sent: we send our FIN at `seq_to_guest`. A guest FIN at RCV.NXT becomes
//! `shutdown(SHUT_WR)`. When both FINs are through and ours is acknowledged the socket is
//! closed; a RST from the guest (at exactly RCV.NXT, RFC 5961) closes the socket with
//! `SO_LINGER` 0 so the host peer gets a RST too; a socket error sends the guest a RST.
//! A connect that fails for lack of a route (`ENETUNREACH`, `EHOSTUNREACH`) answers the
//! guest's SYN with an ICMP/ICMPv6 destination unreachable instead, as a router would;
//! a refused one with a RST. A guest keepalive or window probe (an old sequence number,
//! no new data) gets an ACK.
//!
//! State per connection: [`conn::GuestSide`] (plain data: addresses, sequence numbers,
//! windows, scales, MSS, FIN flags — what the migration stream will carry besides the
//! kernel socket) and the host side in [`conn::TcpConn`]. Options: MSS, window scale
//! and SACK-permitted as the guest offers them (SACK lets retransmissions towards the
//! guest skip what it holds, see [`conn`]; baton never sends SACK blocks, holding no
//! out-of-order data); timestamps are not offered. Host sockets have keepalive on
//! (see `sock`).
//!
//! Flows live in a bounded [`FlowTable`] keyed by the guest's 4-tuple; a socket's epoll
//! event data carries the flow id (owner tag [`EPOLL_OWNER_TCP`] in the top byte, a kind
//! byte, the id below). A SYN beyond the table's capacity gets a RST and a rate-limited
//! warning. Timers: each flow has one deadline (retransmission, zero-window probe,
//! handshake retry); a binary heap orders them lazily and one [`alarm::AlarmClock`] in
//! the same epoll wakes the device for the earliest one — no thread per flow.
//!
//! Flow control towards the socket: a connection polls EPOLLIN only while the guest's
//! window has room, the guest's receive queue took our last frame, and no FIN was sent;
//! so a readable socket with nowhere to send never spins. Established connections are
//! polled edge-triggered: the socket stays readable while data sent to the guest awaits
//! its ACK, so level-triggered EPOLLIN would report it in every round with nothing new
//! to peek (see [`TcpConn::wanted_events`]). When the receive queue is full the flow
//! waits in a queue; every `handle_host_events` (which the device runs when the guest
//! posts receive buffers) retries the oldest waiter, and the others only if it went
//! through; a flow with new data while others wait queues behind them without peeking.
//! A stuck guest costs one retry per round, not work for every flow with data.
//!
//! Migration (same host, see [`crate::handover`]): [`TcpFlows::freeze_for_handover`]
//! makes every socket deaf (drop-all filter) and turns each established connection into
//! a [`TcpFlowRecord`] plus its socket, lent to the offer (no duplicate: one descriptor
//! per connection; so no offered flow is closed before the offer has settled, see
//! [`crate::handover::LentSocket`]). Edge-triggered
//! registrations stay in the epoll set while frozen (a deaf socket reports nothing new,
//! and events are ignored); a flow leaves the set when it is released — before its
//! descriptor closes, as a target may hold the same socket — and a thaw polls the others
//! afresh. While frozen nothing is sent to the guest (no timers, no waiters, no accepts).
//! Two things end it: the offer is taken ([`TcpFlows::collect_handover`] drops those
//! flows without a sound — the target holds the same sockets — and never thaws them),
//! or the guest talks again on this side (the source VM resumed:
//! [`TcpFlows::handle_guest_segment`] withdraws the offer, detaches the filters and
//! carries on). A target rebuilds flows with [`TcpFlows::adopt`]; they wait silently
//! until the guest sends a TCP segment, or [`ADOPT_QUIET`] after the rings first run
//! (a frame sent while QEMU is still starting the rings can lose its interrupt, which
//! with EVENT_IDX silences the guest's receive queue for good: see [`AdoptHold`]).
//! Connections restored from another host ([`TcpFlows::adopt_restored`]) are also
//! re-probed through the helper from the first round of events on, until the peer's
//! answers reach this host ([`crate::restore::Reprobe`]).
//!
//! Addresses: the guest's destination `map_host_loopback` (default: the gateway; for
//! IPv6 also the router's link-local address) reaches the host's loopback, and
//! connections from the host's loopback through a `-t` forward appear to come from it.

pub mod alarm;
mod closed;
pub mod conn;
mod sack;
pub mod segment;
pub mod seq;
mod sock;
#[cfg(test)]
mod tests;
pub(crate) use sock::{
    is_closed as socket_is_closed, netns_cookie, set_int_option, set_peek_offset,
    set_reset_on_close, socket_cookie, tcp_info,
};

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::hash::BuildHasher;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use baton_proto::migration::{FlowId as WireFlowId, HostSocketEnds, TcpFlowRecord};
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};

use crate::config::{MacAddr, NetConfig};
use crate::flow::{FlowId, FlowTable};
use crate::handover::{HandoverOffer, LentSocket, OfferStatus};
use crate::net::FrameSink;
use conn::{Io, Outcome, TcpConn, TcpState};
use segment::{Segment, ACK, RST, SYN};
use seq::Seq;

/// Owner tag of TCP sockets and timers in the shared epoll's event data (bits 56..64).
pub(crate) const EPOLL_OWNER_TCP: u8 = 2;
const OWNER_SHIFT: u32 = 56;
const KIND_SHIFT: u32 = 48;
const KIND_FLOW: u64 = 0;
const KIND_LISTENER: u64 = 1;
const KIND_ALARM: u64 = 2;
const PAYLOAD_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// Largest peek per round (one 64 KiB frame's worth; [`conn`] ends each peek on a
/// segment boundary). One buffer for the whole engine. Not larger: a 256 KiB buffer
/// made the device harness 3× slower, for short connections and host → guest streams
/// alike (`cargo bench -p baton --bench tcp_throughput`).
const PEEK_BUFFER_LEN: usize = 65536;
/// Connections accepted per listener event.
const ACCEPTS_PER_EVENT: usize = 64;

/// Flows waiting for a turn, each once, in the order they started waiting (the oldest
/// first). A set beside the queue: after a LOAD every adopted flow waits, and a
/// membership scan per flow made resuming 10,000 of them quadratic.
#[derive(Debug, Default)]
struct FlowQueue {
    order: VecDeque<FlowId>,
    members: HashSet<FlowId>,
}

impl FlowQueue {
    /// Queue `id` at the end unless it waits already; `true` if the queue was empty.
    fn push(&mut self, id: FlowId) -> bool {
        let was_empty = self.order.is_empty();
        if self.members.insert(id) {
            self.order.push_back(id);
        }
        was_empty
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The oldest waiting flow; it stays queued.
    fn front(&self) -> Option<FlowId> {
        self.order.front().copied()
    }

    /// Take the oldest waiting flow out of the queue.
    fn pop_front(&mut self) -> Option<FlowId> {
        let id = self.order.pop_front()?;
        self.members.remove(&id);
        Some(id)
    }

    /// All waiting flows, oldest first; the queue is empty afterwards.
    fn take(&mut self) -> VecDeque<FlowId> {
        self.members.clear();
        std::mem::take(&mut self.order)
    }

    fn retain(&mut self, mut keep: impl FnMut(FlowId) -> bool) {
        let members = &mut self.members;
        self.order.retain(|&id| {
            let kept = keep(id);
            if !kept {
                members.remove(&id);
            }
            kept
        });
    }
}

/// Log classes.
const LOG_FULL: usize = 0;
const LOG_SOCKET: usize = 1;
const LOG_CLASSES: usize = 2;

/// A connection as the guest sees it: (guest address, guest port, remote address,
/// remote port).
pub type FlowKey = (IpAddr, u16, IpAddr, u16);

/// Why a guest segment was not processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcpError {
    #[error(transparent)]
    Segment(#[from] segment::SegmentError),
    #[error("destination {0} is not reachable from the guest")]
    Unroutable(IpAddr),
}

/// What the TCP code needs from `GuestNet` for one call.
pub(crate) struct Env<'a> {
    pub(crate) config: &'a NetConfig,
    pub(crate) epoll: &'a Epoll,
    pub(crate) guest_mac: Option<MacAddr>,
}

#[derive(Debug)]
struct Listener {
    socket: OwnedFd,
    guest_port: u16,
    guest_addr: Option<IpAddr>,
}

/// Every TCP connection of the guest and the `-t` listeners.
#[derive(Debug)]
pub(crate) struct TcpFlows {
    flows: FlowTable<FlowKey, TcpConn>,
    listeners: Vec<Listener>,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    alarm: alarm::AlarmClock,
    /// Flows whose frames did not fit in the guest's receive queue.
    rx_waiters: FlowQueue,
    /// Flows that stopped sending at their round limit with more to send
    /// ([`TcpConn::push_again`]): their turn comes after the next round of events.
    push_again: FlowQueue,
    /// Connections closed both ways in the last seconds (see [`closed`]).
    closed: closed::ClosedFlows,
    isn_secret: RandomState,
    epoch: Instant,
    peek_buf: Vec<u8>,
    frame_buf: Vec<u8>,
    log: crate::net::ratelimit::LogLimiter<LOG_CLASSES>,
    /// Live, or frozen for a migration.
    freeze: Freeze,
    /// Adopted flows keep quiet until the guest has surely resumed.
    hold: AdoptHold,
    /// Flows restored from another host, re-probed once the guest runs
    /// ([`crate::restore::Reprobe`]).
    reprobe: Option<crate::restore::Reprobe>,
    /// A descriptor held in reserve: when the process runs out of descriptors, a
    /// connection waiting on a `-t` listener can only be refused by accepting it, which
    /// needs a free slot. Without one the level-triggered listener would wake the
    /// worker forever while the host's connection hangs.
    spare_fd: Option<OwnedFd>,
}

/// How long adopted connections wait, after the rings first run, for a segment from the
/// guest before they send anyway (see [`AdoptHold`]).
pub(crate) const ADOPT_QUIET: std::time::Duration = std::time::Duration::from_millis(200);

/// Migration target: the first frames adopted connections send must not race QEMU's
/// ring start. QEMU starts a ring with SET_VRING_KICK, then clears the ring's interrupt
/// eventfd ("discard previous events") before it installs the guest's own; the backend
/// may already run at the kick (vhost-user-backend reports a ring that becomes ready as
/// an event). A frame put in the receive queue inside that window has its interrupt
/// discarded, and with EVENT_IDX the guest is never interrupted for that queue again
/// (it asked to be told once, when that very entry was used): its receive path is dead
/// while its transmit path works — the data still reaches the host, but no ACK, FIN or
/// data ever reaches the guest. So adopted connections send nothing until the guest
/// speaks (its vCPUs run only after QEMU finished the rings) or, for a guest that has
/// nothing to say, [`ADOPT_QUIET`] after the rings first ran.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum AdoptHold {
    #[default]
    Off,
    /// Flows were adopted; no round of events has run yet.
    Adopted,
    /// The rings run: released by a guest segment or at this instant.
    Until(Instant),
}

/// The migration state of the table.
#[derive(Debug, Default)]
enum Freeze {
    #[default]
    Live,
    /// Frozen at SAVE: every socket deaf, and quiet in the epoll set (edge-triggered) or
    /// out of it.
    Frozen {
        /// Stream flow id → table flow id of the flows offered.
        offered: Vec<(WireFlowId, FlowId)>,
        offer: Option<HandoverOffer>,
    },
}

/// The flows frozen at SAVE: their records, and their sockets to lend to the offer.
#[derive(Debug, Default)]
pub(crate) struct FrozenFlows {
    pub(crate) records: Vec<TcpFlowRecord>,
    pub(crate) sockets: Vec<LentSocket>,
    /// Connections that cannot move (handshake in progress, socket trouble).
    pub(crate) left_behind: usize,
}

fn flow_data(id: FlowId) -> u64 {
    (u64::from(EPOLL_OWNER_TCP) << OWNER_SHIFT) | (KIND_FLOW << KIND_SHIFT) | id.to_bits()
}

impl TcpFlows {
    /// Bind the `-t` listeners and register them and the timer in `epoll`. Fails when
    /// a listener that is not best-effort cannot be bound.
    pub(crate) fn new(
        config: &NetConfig,
        epoll: &Epoll,
        max_flows: usize,
        now: Instant,
    ) -> io::Result<Self> {
        let alarm = alarm::AlarmClock::new()?;
        epoll
            .add(
                alarm.fd(),
                EpollEvent::new(
                    EpollFlags::EPOLLIN,
                    (u64::from(EPOLL_OWNER_TCP) << OWNER_SHIFT) | (KIND_ALARM << KIND_SHIFT),
                ),
            )
            .map_err(io::Error::from)?;
        let mut flows = TcpFlows {
            flows: FlowTable::new(max_flows),
            listeners: Vec::new(),
            timers: BinaryHeap::new(),
            alarm,
            rx_waiters: FlowQueue::default(),
            push_again: FlowQueue::default(),
            closed: closed::ClosedFlows::default(),
            isn_secret: RandomState::new(),
            epoch: now,
            peek_buf: vec![0; PEEK_BUFFER_LEN],
            // One frame at a time: a segment of at most 64 KiB plus headers.
            frame_buf: Vec::with_capacity(65536 + 128),
            log: crate::net::ratelimit::LogLimiter::new(now),
            freeze: Freeze::Live,
            hold: AdoptHold::Off,
            reprobe: None,
            spare_fd: None,
        };
        flows.spare_fd = flows.alarm.fd().try_clone_to_owned().ok();
        if config.handlers.tcp {
            flows.bind_forwards(config, epoll)?;
        }
        Ok(flows)
    }

    fn bind_forwards(&mut self, config: &NetConfig, epoll: &Epoll) -> io::Result<()> {
        for rule in config.tcp_forwards.rules() {
            let addrs: Vec<IpAddr> = match rule.bind_to.addr {
                Some(addr) => vec![addr],
                None => {
                    let mut any = Vec::new();
                    if config.v4.is_some() {
                        any.push(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                    }
                    if config.v6.is_some() {
                        any.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
                    }
                    any
                }
            };
            for host_port in rule.host_ports.ports() {
                let Some(guest_port) = rule.guest_port_for(host_port) else {
                    continue;
                };
                for &addr in &addrs {
                    match sock::listener(SocketAddr::new(addr, host_port), config.freebind) {
                        Ok(socket) => {
                            let index = self.listeners.len() as u64;
                            epoll
                                .add(
                                    socket.as_fd(),
                                    EpollEvent::new(
                                        EpollFlags::EPOLLIN,
                                        (u64::from(EPOLL_OWNER_TCP) << OWNER_SHIFT)
                                            | (KIND_LISTENER << KIND_SHIFT)
                                            | index,
                                    ),
                                )
                                .map_err(io::Error::from)?;
                            self.listeners.push(Listener {
                                socket,
                                guest_port,
                                guest_addr: rule.guest_addr,
                            });
                        }
                        Err(err) if rule.best_effort => {
                            tracing::debug!("TCP forward {addr}:{host_port} skipped: {err}");
                        }
                        Err(err) => {
                            return Err(io::Error::new(
                                err.kind(),
                                format!("TCP forward: listening on {addr} port {host_port}: {err}"),
                            ))
                        }
                    }
                }
            }
        }
        if !self.listeners.is_empty() {
            tracing::info!("TCP: {} forwarding listener(s)", self.listeners.len());
        }
        Ok(())
    }

    /// Number of open connections.
    #[allow(dead_code)]
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Out of descriptors with a connection waiting on listener `index`: use the spare
    /// descriptor's slot to accept it and reset it at once (the host sees a refusal, not
    /// a hang), then take the spare back.
    fn refuse_without_descriptors(&mut self, index: usize, err: &io::Error, now: Instant) {
        let Some(listener) = self.listeners.get(index) else {
            return;
        };
        let refused = self.spare_fd.take().and_then(|spare| {
            drop(spare);
            let accepted = sock::accept(listener.socket.as_fd()).ok();
            if let Some((socket, _)) = &accepted {
                let _ = sock::set_reset_on_close(socket.as_fd());
            }
            accepted.map(|(_, peer)| peer)
        });
        self.spare_fd = self.alarm.fd().try_clone_to_owned().ok();
        if let Some(suppressed) = self.log_admit(LOG_FULL, now) {
            match refused {
                Some(peer) => tracing::warn!(
                    suppressed,
                    "TCP: out of file descriptors ({err}; {} connections open): \
                     connection from {peer} refused",
                    self.flows.len()
                ),
                None => tracing::warn!(
                    suppressed,
                    "TCP: out of file descriptors ({err}; {} connections open): a \
                     connection waits on a forwarded port",
                    self.flows.len()
                ),
            }
        }
    }

    fn isn(&self, key: &FlowKey, now: Instant) -> Seq {
        // RFC 6528: a keyed hash of the 4-tuple plus a 4-microsecond clock.
        let hash = self.isn_secret.hash_one(key) as u32;
        let ticks = (now.duration_since(self.epoch).as_micros() / 4) as u32;
        Seq(hash.wrapping_add(ticks))
    }

    fn log_admit(&mut self, class: usize, now: Instant) -> Option<u64> {
        self.log.admit(class, now)
    }

    /// A TCP segment from the guest (`l4` is the TCP message from `src` to `dst`).
    #[allow(clippy::too_many_arguments)] // the segment's parts, as the IP layer found them
    pub(crate) fn handle_guest_segment(
        &mut self,
        env: &Env<'_>,
        src: IpAddr,
        dst: IpAddr,
        l4: &[u8],
        checksum: crate::net::L4Checksum,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) -> Result<(), TcpError> {
        let seg = segment::parse_with(src, dst, l4, checksum)?;
        if !self.source_resumed(env) {
            // A handover is under way: drop the segment, the guest sends it again.
            return Ok(());
        }
        if self.hold != AdoptHold::Off {
            // The guest runs, so QEMU has finished starting the rings.
            tracing::debug!("TCP: the guest spoke; migrated connections resume");
            self.hold = AdoptHold::Off;
        }
        let key: FlowKey = (src, seg.src_port, dst, seg.dst_port);
        let guest_mac = env.guest_mac.unwrap_or([0xff; 6]);
        let link_mss = link_mss(env.config, dst.is_ipv4());
        let Some(id) = self.flows.lookup(&key) else {
            return self.new_segment(env, key, &seg, l4, sink, now);
        };
        let mut peek_buf = std::mem::take(&mut self.peek_buf);
        let mut frame_buf = std::mem::take(&mut self.frame_buf);
        let outcome = match self.flows.get_mut(id) {
            Some(conn) => {
                let mut io = Io {
                    our_mac: env.config.our_mac,
                    guest_mac,
                    sink,
                    peek_buf: &mut peek_buf,
                    frame_buf: &mut frame_buf,
                    now,
                    link_mss,
                };
                conn.on_segment(&seg, &mut io)
            }
            None => Outcome::Keep,
        };
        self.peek_buf = peek_buf;
        self.frame_buf = frame_buf;
        self.settle(env, id, outcome);
        Ok(())
    }

    /// A segment for no known connection: a SYN opens one, anything else but a RST is
    /// answered with a RST.
    fn new_segment(
        &mut self,
        env: &Env<'_>,
        key: FlowKey,
        seg: &Segment<'_>,
        l4: &[u8],
        sink: &mut dyn FrameSink,
        now: Instant,
    ) -> Result<(), TcpError> {
        if seg.has(RST) {
            self.closed.remove(&key);
            return Ok(());
        }
        if let Some(closed) = self.closed.get(&key, now) {
            if seg.has(SYN) {
                // The guest reuses the 4-tuple: a new connection.
                self.closed.remove(&key);
            } else if !seg.seq.plus(seg.seq_len()).after(closed.seq_from_guest) {
                if seg.seq_len() > 0 {
                    // Its last data or FIN again: our ACK of it came late (it waited
                    // for receive buffers). Acknowledge it again.
                    self.ack_closed(env, key, closed, sink);
                }
                // A late ACK needs no answer.
                return Ok(());
            }
        }
        if !seg.has(SYN) || seg.has(ACK) || seg.flags & (segment::FIN) != 0 {
            self.reset_unknown(env, key, seg, sink);
            return Ok(());
        }
        let Some(host_dst) = host_destination(env.config, key.2) else {
            self.reset_unknown(env, key, seg, sink);
            return Err(TcpError::Unroutable(key.2));
        };
        if self.flows.len() >= self.flows.capacity() {
            if let Some(suppressed) = self.log_admit(LOG_FULL, now) {
                tracing::warn!(
                    suppressed,
                    "TCP flow table full ({} connections): refusing {}:{} -> {}:{}",
                    self.flows.capacity(),
                    key.0,
                    key.1,
                    key.2,
                    key.3
                );
            }
            self.reset_unknown(env, key, seg, sink);
            return Ok(());
        }
        let socket = match sock::stream_socket(host_dst.is_ipv4())
            .and_then(|s| sock::connect(s.as_fd(), SocketAddr::new(host_dst, key.3)).map(|()| s))
        {
            Ok(socket) => socket,
            Err(err) => {
                if matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    // Not the destination's fault: say so where operators look.
                    if let Some(suppressed) = self.log_admit(LOG_FULL, now) {
                        tracing::warn!(
                            suppressed,
                            "TCP: out of file descriptors ({err}; {} connections open): \
                             guest connection to {host_dst}:{} refused",
                            self.flows.len(),
                            key.3
                        );
                    }
                } else if let Some(suppressed) = self.log_admit(LOG_SOCKET, now) {
                    tracing::debug!(suppressed, "TCP connect to {host_dst}:{}: {err}", key.3);
                }
                // No route: the guest learns it as a router would tell it, an ICMP
                // destination unreachable; anything else (refused...) is a RST.
                let unreachable = err
                    .raw_os_error()
                    .and_then(crate::net::icmp::Unreachable::from_errno);
                let frame = unreachable.and_then(|reason| {
                    crate::net::icmp::unreachable_frame(
                        env.config.our_mac,
                        env.guest_mac.unwrap_or([0xff; 6]),
                        key.0,
                        key.2,
                        etherparse::IpNumber::TCP,
                        l4,
                        reason,
                    )
                });
                match frame {
                    Some(frame) => {
                        sink.send_frame(&frame);
                    }
                    None => self.reset_unknown(env, key, seg, sink),
                }
                return Ok(());
            }
        };
        let isn = self.isn(&key, now);
        let conn = TcpConn::outbound(key, seg, socket, isn, link_mss(env.config, key.0.is_ipv4()));
        match self.flows.insert(key, conn) {
            Ok(id) => {
                tracing::trace!(
                    "{id}: guest {}:{} connects to {host_dst}:{}",
                    key.0,
                    key.1,
                    key.3
                );
                self.settle(env, id, Outcome::Keep);
            }
            Err(_) => self.reset_unknown(env, key, seg, sink),
        }
        Ok(())
    }

    /// RST for a segment that belongs to no connection (RFC 9293 3.10.7.1).
    fn reset_unknown(
        &mut self,
        env: &Env<'_>,
        key: FlowKey,
        seg: &Segment<'_>,
        sink: &mut dyn FrameSink,
    ) {
        let (seq, ack, flags) = if seg.has(ACK) {
            (seg.ack, Seq(0), RST)
        } else {
            (Seq(0), seg.seq.plus(seg.seq_len()), RST | ACK)
        };
        let out = segment::OutSegment {
            src_mac: env.config.our_mac,
            dst_mac: env.guest_mac.unwrap_or([0xff; 6]),
            src: (key.2, key.3),
            dst: (key.0, key.1),
            seq,
            ack,
            flags,
            window: 0,
            syn_options: None,
            payload: &[],
        };
        if segment::build(&out, &mut self.frame_buf).is_ok() {
            sink.send_frame(&self.frame_buf);
        }
    }

    /// Acknowledge a segment of the connection `key`, closed both ways as `closed`.
    fn ack_closed(
        &mut self,
        env: &Env<'_>,
        key: FlowKey,
        closed: closed::ClosedFlow,
        sink: &mut dyn FrameSink,
    ) {
        let out = segment::OutSegment {
            src_mac: env.config.our_mac,
            dst_mac: env.guest_mac.unwrap_or([0xff; 6]),
            src: (key.2, key.3),
            dst: (key.0, key.1),
            seq: closed.seq_to_guest,
            ack: closed.seq_from_guest,
            flags: ACK,
            window: 0,
            syn_options: None,
            payload: &[],
        };
        if segment::build(&out, &mut self.frame_buf).is_ok() {
            sink.send_frame(&self.frame_buf);
        }
    }

    /// Apply an outcome: close the flow, or update its epoll interest and timer.
    fn settle(&mut self, env: &Env<'_>, id: FlowId, outcome: Outcome) {
        match outcome {
            Outcome::Keep => {}
            Outcome::Close | Outcome::Reset => {
                if let Some(conn) = self.flows.remove(id) {
                    if conn.registered.is_some() {
                        let _ = env.epoll.delete(conn.socket.as_fd());
                    }
                    if outcome == Outcome::Reset {
                        let _ = sock::set_reset_on_close(conn.socket.as_fd());
                    } else if let Some(fin) = conn.guest.fin_to_guest {
                        if conn.guest.fin_from_guest {
                            let g = &conn.guest;
                            let key = (g.guest_addr, g.guest_port, g.remote_addr, g.remote_port);
                            let flow = closed::ClosedFlow {
                                seq_to_guest: fin.plus(1),
                                seq_from_guest: g.seq_from_guest,
                            };
                            self.closed.insert(key, flow, Instant::now());
                        }
                    }
                    tracing::trace!("{id}: closed ({outcome:?})");
                }
                return;
            }
        }
        let Some(conn) = self.flows.get_mut(id) else {
            return;
        };
        if conn.rx_blocked {
            self.rx_waiters.push(id);
        } else if conn.push_again && self.push_again.push(id) {
            // Nothing else may wake the device for it (edge-triggered polling).
            self.alarm.ring_now();
        }
        if !conn.hung_up {
            let wanted = conn.wanted_events();
            if conn.registered != Some(wanted) {
                let mut event = EpollEvent::new(wanted, flow_data(id));
                let result = if conn.registered.is_some() {
                    env.epoll.modify(conn.socket.as_fd(), &mut event)
                } else {
                    env.epoll.add(conn.socket.as_fd(), event)
                };
                tracing::trace!("{id}: polling {wanted:?}");
                match result {
                    Ok(()) => conn.registered = Some(wanted),
                    Err(err) => tracing::debug!("{id}: epoll registration: {err}"),
                }
            }
        }
        if let Some(deadline) = conn.deadline {
            if conn.scheduled.is_none_or(|s| deadline < s) {
                conn.scheduled = Some(deadline);
                self.timers.push(Reverse((deadline, id)));
                self.alarm.arm(deadline);
            }
        }
    }

    /// An epoll event with the TCP owner tag.
    pub(crate) fn handle_event(
        &mut self,
        env: &Env<'_>,
        data: u64,
        events: EpollFlags,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        let payload = data & PAYLOAD_MASK;
        if self.is_frozen() && (data >> KIND_SHIFT) & 0xff != KIND_ALARM {
            // A frozen socket is deaf; what it still reports (a change from before the
            // freeze, a target's traffic on a socket handed over but not yet released)
            // changes nothing. `thaw` polls the sockets afresh.
            return;
        }
        match (data >> KIND_SHIFT) & 0xff {
            KIND_FLOW => self.flow_event(env, FlowId::from_bits(payload), events, sink, now),
            KIND_LISTENER => self.accept_connections(env, payload as usize, sink, now),
            KIND_ALARM => self.alarm.acknowledge(),
            other => tracing::warn!("TCP epoll event of unknown kind {other}"),
        }
    }

    fn with_io<R>(
        &mut self,
        env: &Env<'_>,
        id: FlowId,
        sink: &mut dyn FrameSink,
        now: Instant,
        f: impl FnOnce(&mut TcpConn, &mut Io<'_>) -> R,
    ) -> Option<R> {
        let mut peek_buf = std::mem::take(&mut self.peek_buf);
        let mut frame_buf = std::mem::take(&mut self.frame_buf);
        let result = self.flows.get_mut(id).map(|conn| {
            let ipv4 = conn.guest.guest_addr.is_ipv4();
            let mut io = Io {
                our_mac: env.config.our_mac,
                guest_mac: env.guest_mac.unwrap_or([0xff; 6]),
                sink,
                peek_buf: &mut peek_buf,
                frame_buf: &mut frame_buf,
                now,
                link_mss: link_mss(env.config, ipv4),
            };
            f(conn, &mut io)
        });
        self.peek_buf = peek_buf;
        self.frame_buf = frame_buf;
        result
    }

    fn flow_event(
        &mut self,
        env: &Env<'_>,
        id: FlowId,
        events: EpollFlags,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        tracing::trace!("{id}: socket events {events:?}");
        // Flows already wait for the guest's receive buffers: a flow with new data
        // queues behind them rather than peek and build frames for a receive queue that
        // is most likely still full (a stuck guest would cost that for every flow with
        // data). The waiters are retried, oldest first, at the end of this round.
        let queue_behind = !self.rx_waiters.is_empty() && self.hold == AdoptHold::Off;
        let outcome = self.with_io(env, id, sink, now, |conn, io| {
            if conn.guest.state == TcpState::Connecting {
                if events
                    .intersects(EpollFlags::EPOLLOUT | EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP)
                {
                    return conn.on_connected(io);
                }
                return Outcome::Keep;
            }
            if events.contains(EpollFlags::EPOLLERR) {
                let _ = sock::take_error(conn.socket.as_fd());
                return conn.reset_guest(io);
            }
            let mut outcome = Outcome::Keep;
            if events.contains(EpollFlags::EPOLLOUT) {
                outcome = conn.on_writable(io);
            }
            if outcome == Outcome::Keep
                && events
                    .intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP)
            {
                if queue_behind {
                    conn.wait_for_rx();
                } else {
                    outcome = conn.push_data(io);
                }
            }
            if outcome == Outcome::Keep && events.contains(EpollFlags::EPOLLHUP) {
                // Both directions are shut: nothing more to learn from polling (HUP is
                // reported whatever the interest mask, so stop polling for good).
                conn.hung_up = true;
            }
            outcome
        });
        let Some(outcome) = outcome else {
            return;
        };
        if let Some(conn) = self.flows.get_mut(id) {
            if conn.hung_up && conn.registered.is_some() {
                let _ = env.epoll.delete(conn.socket.as_fd());
                conn.registered = None;
            }
        }
        self.settle(env, id, outcome);
    }

    fn accept_connections(
        &mut self,
        env: &Env<'_>,
        index: usize,
        sink: &mut dyn FrameSink,
        now: Instant,
    ) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let Some(listener) = self.listeners.get(index) else {
                return;
            };
            let (socket, peer) = match sock::accept(listener.socket.as_fd()) {
                Ok(accepted) => accepted,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    self.refuse_without_descriptors(index, &err, now);
                    return;
                }
                Err(err) => {
                    if let Some(suppressed) = self.log_admit(LOG_SOCKET, now) {
                        tracing::debug!(suppressed, "TCP accept: {err}");
                    }
                    return;
                }
            };
            let guest_port = listener.guest_port;
            let guest_addr = listener.guest_addr.or_else(|| match peer {
                SocketAddr::V4(_) => env.config.v4.as_ref().map(|v4| IpAddr::V4(v4.addr)),
                SocketAddr::V6(_) => env.config.v6.as_ref().map(|v6| IpAddr::V6(v6.addr)),
            });
            let Some(guest_addr) = guest_addr else {
                let _ = sock::set_reset_on_close(socket.as_fd());
                continue;
            };
            let remote = guest_view_of_peer(env.config, peer.ip());
            let key: FlowKey = (guest_addr, guest_port, remote, peer.port());
            if self.flows.lookup(&key).is_some() || self.flows.len() >= self.flows.capacity() {
                if let Some(suppressed) = self.log_admit(LOG_FULL, now) {
                    tracing::warn!(
                        suppressed,
                        "TCP flow table full or duplicate ({} connections): refusing {peer}",
                        self.flows.len()
                    );
                }
                let _ = sock::set_reset_on_close(socket.as_fd());
                continue;
            }
            let isn = self.isn(&key, now);
            let conn = TcpConn::inbound(key, socket, isn);
            let Ok(id) = self.flows.insert(key, conn) else {
                continue;
            };
            tracing::trace!("{id}: {peer} connects to guest port {guest_port}");
            self.with_io(env, id, sink, now, |conn, io| conn.send_syn(io));
            self.settle(env, id, Outcome::Keep);
        }
    }

    /// After a round of events: retry flows waiting for receive buffers, run due timers.
    pub(crate) fn after_events(&mut self, env: &Env<'_>, sink: &mut dyn FrameSink, now: Instant) {
        if self.is_frozen() {
            self.collect_handover(env);
            return;
        }
        self.run_reprobe(now);
        match self.hold {
            AdoptHold::Off => {}
            AdoptHold::Adopted => {
                self.hold = AdoptHold::Until(now + ADOPT_QUIET);
                self.run_timers(env, sink, now);
                return;
            }
            AdoptHold::Until(until) if now < until => {
                self.run_timers(env, sink, now);
                return;
            }
            AdoptHold::Until(_) => {
                tracing::debug!("TCP: the guest is silent; migrated connections resume");
                self.hold = AdoptHold::Off;
            }
        }
        // The oldest waiter first; once one finds the receive queue still full the
        // others keep their places untouched (retrying them, or even re-queueing them,
        // would be work per waiting flow in every round while the guest is stuck).
        while let Some(id) = self.rx_waiters.front() {
            tracing::trace!("{id}: retrying after a full receive queue");
            let outcome = self.with_io(env, id, sink, now, |conn, io| {
                if conn.rx_blocked {
                    conn.resume_rx(io)
                } else {
                    Outcome::Keep
                }
            });
            if let Some(outcome) = outcome {
                // A flow still waiting is queued already: `settle` leaves it in place.
                self.settle(env, id, outcome);
            }
            if self.flows.get(id).is_some_and(|c| c.rx_blocked) {
                break;
            }
            self.rx_waiters.pop_front();
        }
        // Flows that stopped at their round limit; those that stop there again wait for
        // the next round (the alarm makes sure there is one).
        for id in self.push_again.take() {
            let outcome = self.with_io(env, id, sink, now, |conn, io| {
                if conn.push_again && !conn.rx_blocked {
                    conn.push_data(io)
                } else {
                    Outcome::Keep
                }
            });
            if let Some(outcome) = outcome {
                self.settle(env, id, outcome);
            }
        }
        self.run_timers(env, sink, now);
    }

    fn run_timers(&mut self, env: &Env<'_>, sink: &mut dyn FrameSink, now: Instant) {
        while let Some(Reverse((when, id))) = self.timers.peek().copied() {
            if when > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.flows.get_mut(id) else {
                continue;
            };
            if conn.scheduled != Some(when) {
                continue;
            }
            conn.scheduled = None;
            match conn.deadline {
                Some(deadline) if deadline <= now => {
                    let outcome = self
                        .with_io(env, id, sink, now, |conn, io| conn.on_timer(io))
                        .unwrap_or(Outcome::Keep);
                    self.settle(env, id, outcome);
                }
                Some(_) => self.settle(env, id, Outcome::Keep),
                None => {}
            }
        }
        self.alarm.expired(now);
        if let Some(Reverse((when, _))) = self.timers.peek() {
            self.alarm.arm(*when);
        }
        if let AdoptHold::Until(until) = self.hold {
            self.alarm.arm(until);
        }
        if let Some(next) = self.reprobe.as_ref().and_then(|r| r.next_round(now)) {
            self.alarm.arm(next);
        }
    }

    /// A due round of [`crate::restore::Reprobe`] (the first one as soon as events run
    /// after LOAD: the guest runs).
    fn run_reprobe(&mut self, now: Instant) {
        let Some(reprobe) = self.reprobe.as_mut() else {
            return;
        };
        let flows = &self.flows;
        if !reprobe.run_due(now, |id| flows.get(id).map(|conn| conn.socket.as_fd())) {
            self.reprobe = None;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Migration: freeze, hand over, thaw, adopt
// ---------------------------------------------------------------------------------------

impl TcpFlows {
    /// Frozen for a migration (nothing goes to the guest).
    pub(crate) fn is_frozen(&self) -> bool {
        matches!(self.freeze, Freeze::Frozen { .. })
    }

    /// Every flow with its socket, for freezing through `baton-repair` in one batch.
    pub(crate) fn flow_sockets(&self) -> Vec<(FlowId, std::os::fd::BorrowedFd<'_>)> {
        self.flows
            .ids()
            .into_iter()
            .filter_map(|id| self.flow_socket(id).map(|fd| (id, fd)))
            .collect()
    }

    /// The socket of flow `id`, if it still exists.
    pub(crate) fn flow_socket(&self, id: FlowId) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.flows.get(id).map(|conn| conn.socket.as_fd())
    }

    /// SAVE of a migration (the VM is stopped): make every socket deaf (out of the epoll
    /// set unless polled edge-triggered), and describe each established connection. A
    /// connection whose socket cannot be frozen or described stays live and is counted
    /// in `left_behind` (as are handshakes in progress, which the guest restarts on the
    /// target).
    /// `pre_frozen`: flows whose sockets `baton-repair` already froze (attaching the
    /// filter needs `CAP_NET_ADMIN` on some kernels), with their host ends when its dump
    /// read them (the same `getsockname`/`getpeername` of the same socket: two system
    /// calls less per connection here); the others are frozen here.
    /// `deafen`: make the others deaf; not when a target on this host has come for the
    /// stream (it takes the live sockets: nothing for deafness to protect).
    pub(crate) fn freeze_for_handover(
        &mut self,
        env: &Env<'_>,
        pre_frozen: &std::collections::HashMap<FlowId, Option<HostSocketEnds>>,
        deafen: bool,
    ) -> FrozenFlows {
        self.unfreeze_offer(env.epoll);
        let ids = self.flows.ids();
        let mut frozen = FrozenFlows {
            records: Vec::with_capacity(ids.len()),
            sockets: Vec::with_capacity(ids.len()),
            left_behind: 0,
        };
        let mut offered = Vec::with_capacity(ids.len());
        let mut next_id: u32 = 0;
        for id in ids {
            let Some(conn) = self.flows.get_mut(id) else {
                continue;
            };
            let known = pre_frozen.get(&id);
            if known.is_some() || !deafen {
                // Frozen by the helper, or nothing to freeze for.
            } else if let Err(err) = crate::handover::attach_deaf_filter(conn.socket.as_fd()) {
                tracing::warn!("{id}: cannot freeze the socket, it stays here: {err}");
                frozen.left_behind += 1;
                continue;
            }
            // An edge-triggered registration stays: the socket is deaf, so it reports
            // at most a change it already had (ignored while frozen), and one system
            // call per connection less at SAVE (taking 10,000 sockets out of the epoll
            // set was most of the time spent here). It leaves the set in `release`, or
            // is polled afresh in `thaw`. A level-triggered one (handshakes) could
            // report a writable or failed socket over and over: out with it.
            if conn
                .registered
                .is_some_and(|events| !events.contains(EpollFlags::EPOLLET))
            {
                conn.registered = None;
                let _ = env.epoll.delete(conn.socket.as_fd());
            }
            let guest_side = match baton_proto::migration::GuestTcpSide::try_from(&conn.guest) {
                Ok(side) => side,
                Err(err) => {
                    tracing::info!("{id}: not migrated: {err}");
                    frozen.left_behind += 1;
                    continue;
                }
            };
            let host = match known
                .copied()
                .flatten()
                .map_or_else(|| crate::handover::socket_ends(conn.socket.as_fd()), Ok)
            {
                Ok(host) => host,
                Err(err) => {
                    tracing::warn!("{id}: not migrated: {err}");
                    frozen.left_behind += 1;
                    continue;
                }
            };
            next_id += 1;
            let wire = WireFlowId(next_id);
            let record = TcpFlowRecord {
                id: wire,
                guest_side,
                host,
                kernel: None,
            };
            if let Err(err) = record.validate(false) {
                tracing::warn!("{id}: not migrated: {err}");
                frozen.left_behind += 1;
                continue;
            }
            frozen.records.push(record);
            // SAFETY: the flow's socket stays open until its offer has settled: flows
            // offered are closed only by `release`, which runs after the offer's outcome
            // is final (`collect_handover`, `source_resumed`, `close_frozen`,
            // `unfreeze_offer`), and `Drop` drops the offer before the table.
            frozen
                .sockets
                .push(unsafe { LentSocket::new(wire, conn.socket.as_fd()) });
            offered.push((wire, id));
        }
        for listener in &self.listeners {
            let _ = env.epoll.delete(listener.socket.as_fd());
        }
        self.freeze = Freeze::Frozen {
            offered,
            offer: None,
        };
        frozen
    }

    /// The flows offered at the last freeze: stream flow id → table flow id (empty
    /// when live). The migration code pairs them with the kernel states it dumped.
    pub(crate) fn offered_flows(&self) -> &[(WireFlowId, FlowId)] {
        match &self.freeze {
            Freeze::Frozen { offered, .. } => offered,
            Freeze::Live => &[],
        }
    }

    /// Keep the offer made for the frozen flows (its status decides their fate).
    pub(crate) fn set_offer(&mut self, new: HandoverOffer) {
        if let Freeze::Frozen { offer, .. } = &mut self.freeze {
            *offer = Some(new);
        }
    }

    /// Withdraw a previous offer (a second SAVE); its outcome is applied first (waiting
    /// out a transfer under way: the new offer lends the same sockets).
    fn unfreeze_offer(&mut self, epoll: &Epoll) {
        if let Freeze::Frozen { offer, offered } = &mut self.freeze {
            if let Some(old) = offer.take() {
                if let OfferStatus::Taken(flows) = old.settle() {
                    let ids = taken_ids(offered, &flows);
                    self.release(epoll, &ids);
                }
            }
        }
    }

    /// If the target took flows, drop them here: no FIN, no RST (the target holds the
    /// same sockets), never thawed. Returns how many.
    pub(crate) fn collect_handover(&mut self, env: &Env<'_>) -> usize {
        let Freeze::Frozen {
            offer: Some(offer),
            offered,
        } = &self.freeze
        else {
            return 0;
        };
        let OfferStatus::Taken(flows) = offer.status() else {
            return 0;
        };
        let ids = taken_ids(offered, &flows);
        self.release(env.epoll, &ids);
        tracing::info!("TCP: {} connection(s) handed over to the target", ids.len());
        ids.len()
    }

    /// Drop flows of a frozen table without a sound (their sockets are deaf, or the
    /// target's now).
    fn release(&mut self, epoll: &Epoll, ids: &[FlowId]) {
        for &id in ids {
            if let Some(conn) = self.flows.remove(id) {
                // Out of the epoll set first: closing our descriptor does not end a
                // registration while the socket is open elsewhere — a target holds it
                // — and ours would keep reporting the target's traffic.
                if conn.registered.is_some() {
                    let _ = epoll.delete(conn.socket.as_fd());
                }
                // Closing our descriptor leaves the connection to the target's.
                drop(conn);
            }
        }
        let flows = &self.flows;
        self.rx_waiters.retain(|id| flows.get(id).is_some());
        self.push_again.retain(|id| flows.get(id).is_some());
    }

    /// The guest talks on this side. If frozen, the source VM has resumed: withdraw the
    /// offer and thaw what is still ours. `false` while a handover is under way (the
    /// caller drops the guest's segment and asks again with the next one).
    pub(crate) fn source_resumed(&mut self, env: &Env<'_>) -> bool {
        let Freeze::Frozen { offer, offered } = &self.freeze else {
            return true;
        };
        let taken: Vec<FlowId> = match offer.as_ref().map(HandoverOffer::cancel) {
            None | Some(OfferStatus::Closed) | Some(OfferStatus::Waiting) => Vec::new(),
            Some(OfferStatus::Busy) => return false,
            Some(OfferStatus::Taken(flows)) => taken_ids(offered, &flows),
        };
        if !taken.is_empty() {
            tracing::warn!(
                "TCP: the VM resumed here after {} connection(s) moved to the target; \
                 the guest's segments for them are answered with RST",
                taken.len()
            );
            self.release(env.epoll, &taken);
        }
        self.thaw(env);
        true
    }

    /// Detach the filters and go back to normal operation (dropping the offer, which
    /// [`TcpFlows::source_resumed`] has withdrawn first).
    fn thaw(&mut self, env: &Env<'_>) {
        self.freeze = Freeze::Live;
        let mut thawed = 0usize;
        for id in self.flows.ids() {
            let Some(conn) = self.flows.get(id) else {
                continue;
            };
            if let Err(err) = crate::handover::detach_filter(conn.socket.as_fd()) {
                tracing::warn!("{id}: detaching the freeze filter: {err}");
            }
            if let Some(events) = conn.registered {
                // Still registered (edge-triggered, see `freeze_for_handover`): what the
                // socket reported while frozen was ignored, so have it polled afresh.
                let mut event = EpollEvent::new(events, flow_data(id));
                if let Err(err) = env.epoll.modify(conn.socket.as_fd(), &mut event) {
                    tracing::debug!("{id}: epoll registration: {err}");
                }
            }
            thawed += 1;
            self.settle(env, id, Outcome::Keep);
        }
        for (index, listener) in self.listeners.iter().enumerate() {
            let event = EpollEvent::new(
                EpollFlags::EPOLLIN,
                (u64::from(EPOLL_OWNER_TCP) << OWNER_SHIFT)
                    | (KIND_LISTENER << KIND_SHIFT)
                    | index as u64,
            );
            if let Err(err) = env.epoll.add(listener.socket.as_fd(), event) {
                tracing::warn!("TCP forward listener back to epoll: {err}");
            }
        }
        if thawed > 0 {
            tracing::info!("TCP: {thawed} connection(s) thawed, carrying on here");
        }
    }

    /// The end of a migration on the source (linger over, or baton exits): settle the
    /// offer — flows a target took are dropped as in [`TcpFlows::collect_handover`],
    /// their sockets untouched (the target uses them) — then let `silence` put the
    /// sockets of every remaining flow in repair mode and close them all, so that no
    /// FIN or RST leaves (a socket in repair mode closes silently). The table is live
    /// and empty afterwards. Returns (taken by a target, closed here).
    pub(crate) fn close_frozen(
        &mut self,
        env: &Env<'_>,
        silence: impl FnOnce(&[std::os::fd::BorrowedFd<'_>]),
    ) -> (usize, usize) {
        let Freeze::Frozen { offer, offered } = &self.freeze else {
            return (0, 0);
        };
        // A handover under way finishes within its step timeouts; wait it out rather
        // than put the target's sockets in repair mode (or close sockets it is sending).
        let status = offer.as_ref().map(HandoverOffer::settle);
        let taken: Vec<FlowId> = match &status {
            Some(OfferStatus::Taken(flows)) => taken_ids(offered, flows),
            _ => Vec::new(),
        };
        self.release(env.epoll, &taken);
        let rest = self.flows.ids();
        let sockets: Vec<_> = rest
            .iter()
            .filter_map(|id| self.flows.get(*id).map(|conn| conn.socket.as_fd()))
            .collect();
        silence(&sockets);
        self.release(env.epoll, &rest);
        // Back to live with no flows: the forwarding listeners return to the epoll set.
        self.thaw(env);
        (taken.len(), rest.len())
    }

    /// LOAD on a target: rebuild connections around sockets taken over from the
    /// source (filters already detached). Nothing reaches the guest now, nor before
    /// the guest speaks or [`ADOPT_QUIET`] passed (see [`AdoptHold`]). Returns how many were
    /// rebuilt; the others (table full, duplicate 4-tuple) are reset towards the host.
    pub(crate) fn adopt(&mut self, flows: Vec<(conn::GuestSide, OwnedFd)>, now: Instant) -> usize {
        let mut adopted = 0;
        for (guest, socket) in flows {
            let key: FlowKey = (
                guest.guest_addr,
                guest.guest_port,
                guest.remote_addr,
                guest.remote_port,
            );
            if self.flows.lookup(&key).is_some() {
                tracing::warn!("TCP: migrated connection {key:?} already exists here; reset");
                let _ = sock::set_reset_on_close(socket.as_fd());
                continue;
            }
            match self.flows.insert(key, TcpConn::adopt(guest, socket, now)) {
                Ok(id) => {
                    self.rx_waiters.push(id);
                    self.hold = AdoptHold::Adopted;
                    adopted += 1;
                }
                Err(_) => tracing::warn!("TCP: flow table full; migrated connection {key:?} reset"),
            }
        }
        adopted
    }
}

/// The table's ids of the offered flows a target took (`offered` pairs stream and
/// table ids).
fn taken_ids(offered: &[(WireFlowId, FlowId)], taken: &[WireFlowId]) -> Vec<FlowId> {
    let taken: std::collections::HashSet<WireFlowId> = taken.iter().copied().collect();
    offered
        .iter()
        .filter(|(wire, _)| taken.contains(wire))
        .map(|(_, id)| *id)
        .collect()
}

impl Drop for TcpFlows {
    fn drop(&mut self) {
        // The offer may be sending the flows' own sockets (lent, not duplicated): let it
        // settle before the table closes them (fields drop in declaration order).
        if let Freeze::Frozen { offer, .. } = &mut self.freeze {
            drop(offer.take());
        }
    }
}

impl TcpFlows {
    /// LOAD from another host: [`TcpFlows::adopt`] sockets the helper restored, and
    /// re-probe them through `helper` once the guest runs ([`crate::restore::Reprobe`]).
    pub(crate) fn adopt_restored(
        &mut self,
        flows: Vec<(conn::GuestSide, OwnedFd)>,
        helper: baton_repair_ipc::RepairClient,
        now: Instant,
    ) -> usize {
        use std::os::fd::AsRawFd;
        let restored: Vec<(FlowKey, i32)> = flows
            .iter()
            .map(|(guest, socket)| {
                let key: FlowKey = (
                    guest.guest_addr,
                    guest.guest_port,
                    guest.remote_addr,
                    guest.remote_port,
                );
                (key, socket.as_raw_fd())
            })
            .collect();
        let adopted = self.adopt(flows, now);
        // The flows that hold the very sockets restored (not an older flow that had the
        // same 4-tuple).
        let ids: Vec<FlowId> = restored
            .iter()
            .filter_map(|(key, fd)| {
                let id = self.flows.lookup(key)?;
                let conn = self.flows.get(id)?;
                (conn.socket.as_raw_fd() == *fd).then_some(id)
            })
            .collect();
        if !ids.is_empty() {
            self.reprobe = Some(crate::restore::Reprobe::new(helper, ids));
        }
        adopted
    }
}

/// Largest TCP payload for the link MTU.
fn link_mss(config: &NetConfig, ipv4: bool) -> u16 {
    let overhead = if ipv4 { 40 } else { 60 };
    config.mtu.saturating_sub(overhead).max(536)
}

/// Where a guest connection to `dst` goes on the host; `None`: not routable.
pub(crate) fn host_destination(config: &NetConfig, dst: IpAddr) -> Option<IpAddr> {
    match dst {
        IpAddr::V4(d) => {
            let v4 = config.v4.as_ref()?;
            if Some(d) == v4.map_host_loopback {
                return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
            }
            if Some(d) == v4.map_guest_addr {
                return Some(IpAddr::V4(v4.addr));
            }
            let bad = d.is_unspecified()
                || d.is_loopback()
                || d.is_multicast()
                || d.is_broadcast()
                || d == v4.addr;
            (!bad).then_some(dst)
        }
        IpAddr::V6(d) => {
            let v6 = config.v6.as_ref()?;
            let router = crate::net::ndp::router_link_local(config);
            if Some(d) == v6.map_host_loopback
                || (v6.map_host_loopback == Some(v6.gateway) && Some(d) == router)
            {
                return Some(IpAddr::V6(Ipv6Addr::LOCALHOST));
            }
            if Some(d) == v6.map_guest_addr {
                return Some(IpAddr::V6(v6.addr));
            }
            let bad = d.is_unspecified()
                || d.is_loopback()
                || d.is_multicast()
                || d.is_unicast_link_local()
                || d == v6.addr;
            (!bad).then_some(dst)
        }
    }
}

/// The address a host peer has in the guest's eyes: the host's loopback appears as the
/// `map_host_loopback` address (the gateway by default).
fn guest_view_of_peer(config: &NetConfig, peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(p) if p.is_loopback() => config
            .v4
            .as_ref()
            .map(|v4| IpAddr::V4(v4.map_host_loopback.unwrap_or(v4.gateway)))
            .unwrap_or(peer),
        IpAddr::V6(p) if p.is_loopback() => config
            .v6
            .as_ref()
            .map(|v6| IpAddr::V6(v6.map_host_loopback.unwrap_or(v6.gateway)))
            .unwrap_or(peer),
        _ => peer,
    }
}
