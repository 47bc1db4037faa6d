//! One TCP connection: the guest-facing endpoint ([`GuestSide`], plain data) and the
//! host socket it is mapped onto ([`TcpConn`]). See the parent module for the sequence
//! number mapping.
//!
//! SACK (RFC 2018), when the guest offers it (its SYN, or its SYN-ACK to ours, which
//! always offers it): the blocks in the guest's ACKs fill a [`Scoreboard`], and a
//! retransmission resends only what the guest does not hold. Fast retransmission (the
//! third duplicate ACK, and each later one that reports more) resends the holes below
//! the highest reported block, each once per recovery; a timeout resends every hole
//! up to SND.NXT. Neither moves SND.NXT: a hole is peeked with `SO_PEEK_OFF` set to its
//! offset from SND.UNA (one `setsockopt` and one `MSG_PEEK` per hole, plus one
//! `setsockopt` to put the offset back — the kernel walks the receive queue to the
//! offset as it does for every peek), so the peek model's invariant holds again after.
//! A scoreboard the guest stops honouring (it may renege, RFC 2018 §8) is dropped: when
//! a cumulative ACK stops at a byte it had reported holding, and after
//! [`SACK_TRUSTED_TIMEOUTS`] timeouts without progress; retransmission then goes back
//! to SND.UNA as without SACK. baton sends no SACK blocks itself: it keeps no
//! out-of-order data from the guest.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_proto::migration::{FlowOrigin, GuestTcpSide};
use baton_proto::tcp::Endpoint;
use nix::errno::Errno;
use nix::sys::epoll::EpollFlags;
use nix::sys::socket::{recv, send, shutdown, MsgFlags, Shutdown};

use super::sack::Scoreboard;
use super::segment::{self, OutSegment, Segment, SynOffer, ACK, FIN, PSH, RST, SYN};
use super::seq::Seq;
use super::sock;
use crate::config::MacAddr;
use crate::net::FrameSink;

/// Window scale baton offers the guest (when the guest offers one): windows up to 8 MiB.
pub const OUR_WINDOW_SCALE: u8 = 7;
/// First retransmission timeout (RFC 6298 without an RTT sample).
pub const INITIAL_RTO: Duration = Duration::from_secs(1);
/// Longest retransmission timeout.
pub const MAX_RTO: Duration = Duration::from_secs(30);
/// Retransmissions without progress before the connection is reset.
pub const MAX_RETRIES: u8 = 8;
/// Duplicate ACKs that trigger a fast retransmission.
const DUP_ACK_THRESHOLD: u8 = 3;
/// Consecutive retransmission timeouts that still resend only the SACK holes; from the
/// next one on the scoreboard is dropped (the guest may have discarded what it
/// reported) and everything from SND.UNA is resent.
pub const SACK_TRUSTED_TIMEOUTS: u8 = 2;
/// Peeks per [`TcpConn::push_data`] call at most (each up to one peek buffer), so that
/// one fast flow does not hold up the others.
pub(crate) const PUSH_ROUNDS: usize = 16;
/// Default MSS when the guest sends none (RFC 9293: 536 for IPv4, 1220 for IPv6).
const DEFAULT_MSS_V4: u16 = 536;
const DEFAULT_MSS_V6: u16 = 1220;

/// The guest's view of a connection's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// Outbound: the guest's SYN arrived, the socket is connecting.
    Connecting,
    /// Outbound: connected; SYN-ACK sent to the guest, its ACK awaited.
    SynAckSent,
    /// Inbound: accepted on a forward; SYN sent to the guest, its SYN-ACK awaited.
    SynSent,
    /// Handshake done (FINs are tracked separately, see [`GuestSide`]).
    Established,
}

/// Who opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The guest connected out.
    Guest,
    /// A host peer connected to a `-t` forward.
    Host,
}

/// The guest-facing TCP endpoint: plain data, everything the migration stream needs
/// besides the kernel socket itself. Its wire form is
/// [`baton_proto::migration::GuestTcpSide`]; the conversions are below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestSide {
    pub origin: Origin,
    pub guest_addr: IpAddr,
    pub guest_port: u16,
    /// The remote end as the guest sees it.
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    pub state: TcpState,
    /// Our initial sequence number towards the guest.
    pub isn: Seq,
    /// SND.NXT: next sequence number we send the guest.
    pub seq_to_guest: Seq,
    /// Highest sequence number sent so far (SND.MAX; above `seq_to_guest` after a
    /// retransmission rewind).
    pub seq_max_to_guest: Seq,
    /// SND.UNA: oldest byte the guest has not acknowledged = the head of the socket's
    /// receive queue.
    pub seq_ack_from_guest: Seq,
    /// RCV.NXT: next byte expected from the guest (everything before it is in the socket).
    pub seq_from_guest: Seq,
    /// Sequence number of our FIN, once the socket reported end of stream.
    pub fin_to_guest: Option<Seq>,
    /// The guest's FIN was received and passed on (`shutdown(SHUT_WR)`).
    pub fin_from_guest: bool,
    /// The guest's receive window in bytes (scaled).
    pub guest_window: u32,
    pub guest_window_scale: u8,
    /// Our window scale (0 unless both sides use the option).
    pub our_window_scale: u8,
    /// Largest payload per segment towards the guest.
    pub mss: u16,
    /// Window (bytes) in the last segment we sent.
    pub window_to_guest: u32,
    /// SACK negotiated: the guest's ACKs may carry SACK blocks, and retransmissions
    /// use them.
    pub sack_permitted: bool,
}

/// What the caller must do with the flow after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Keep,
    /// Both directions finished: close the socket normally.
    Close,
    /// Abort: close the socket with a RST towards the host peer.
    Reset,
}

/// Buffers and context shared by every connection's event handling.
pub struct Io<'a> {
    pub our_mac: MacAddr,
    pub guest_mac: MacAddr,
    pub sink: &'a mut dyn FrameSink,
    pub peek_buf: &'a mut [u8],
    pub frame_buf: &'a mut Vec<u8>,
    pub now: Instant,
    /// Largest TCP payload the link (MTU) allows for this family.
    pub link_mss: u16,
}

/// A connection: guest endpoint + host socket + timers.
#[derive(Debug)]
pub struct TcpConn {
    pub guest: GuestSide,
    pub socket: OwnedFd,
    /// Events the socket is registered for (`None`: not registered).
    pub registered: Option<EpollFlags>,
    /// Guest data could not all be written: waiting for EPOLLOUT to update the window.
    pub send_blocked: bool,
    /// A pure ACK (acknowledgement or window update) found the guest's receive queue
    /// full: send it as soon as buffers come (a lost window update would leave the guest
    /// waiting for a window that never opens).
    pub ack_pending: bool,
    /// The guest's receive queue was full: waiting for RX buffers.
    pub rx_blocked: bool,
    /// The socket hung up (both directions): never poll it again.
    pub hung_up: bool,
    /// [`Self::push_data`] stopped at its round limit with data and window left: the
    /// socket's edge-triggered EPOLLIN will not report that data again, so the flow
    /// must be given another turn (see [`Self::wanted_events`]).
    pub push_again: bool,
    pub deadline: Option<Instant>,
    /// Deadline this flow has in the timer queue.
    pub scheduled: Option<Instant>,
    pub rto: Duration,
    pub retries: u8,
    dup_acks: u8,
    /// What the guest reported holding beyond SND.UNA (not migrated: advisory, and
    /// rebuilt from the guest's next ACKs).
    sacked: Scoreboard,
    /// During a SACK recovery: the holes below this were already resent.
    rexmit_high: Option<Seq>,
}

fn default_mss(addr: IpAddr) -> u16 {
    if addr.is_ipv4() {
        DEFAULT_MSS_V4
    } else {
        DEFAULT_MSS_V6
    }
}

impl TcpConn {
    /// Outbound: the guest's SYN (`seg`) for a socket that is connecting.
    pub fn outbound(
        ends: (IpAddr, u16, IpAddr, u16),
        seg: &Segment<'_>,
        socket: OwnedFd,
        isn: Seq,
        link_mss: u16,
    ) -> Self {
        let (guest_addr, guest_port, remote_addr, remote_port) = ends;
        let (guest_scale, our_scale) = match seg.options.window_scale {
            Some(scale) => (scale, OUR_WINDOW_SCALE),
            None => (0, 0),
        };
        let mss = seg
            .options
            .mss
            .unwrap_or(default_mss(guest_addr))
            .clamp(64, link_mss.max(64));
        TcpConn {
            guest: GuestSide {
                origin: Origin::Guest,
                guest_addr,
                guest_port,
                remote_addr,
                remote_port,
                state: TcpState::Connecting,
                isn,
                seq_to_guest: isn,
                seq_max_to_guest: isn,
                seq_ack_from_guest: isn,
                seq_from_guest: seg.seq.plus(1),
                fin_to_guest: None,
                fin_from_guest: false,
                guest_window: u32::from(seg.window),
                guest_window_scale: guest_scale,
                our_window_scale: our_scale,
                mss,
                window_to_guest: 0,
                sack_permitted: seg.options.sack_permitted,
            },
            socket,
            registered: None,
            send_blocked: false,
            rx_blocked: false,
            hung_up: false,
            push_again: false,
            deadline: None,
            scheduled: None,
            rto: INITIAL_RTO,
            retries: 0,
            dup_acks: 0,
            ack_pending: false,
            sacked: Scoreboard::default(),
            rexmit_high: None,
        }
    }

    /// Inbound: a connection accepted on a forward; the SYN to the guest is sent by
    /// [`TcpConn::send_syn`].
    pub fn inbound(ends: (IpAddr, u16, IpAddr, u16), socket: OwnedFd, isn: Seq) -> Self {
        let (guest_addr, guest_port, remote_addr, remote_port) = ends;
        TcpConn {
            guest: GuestSide {
                origin: Origin::Host,
                guest_addr,
                guest_port,
                remote_addr,
                remote_port,
                state: TcpState::SynSent,
                isn,
                seq_to_guest: isn.plus(1),
                seq_max_to_guest: isn.plus(1),
                seq_ack_from_guest: isn,
                seq_from_guest: Seq(0),
                fin_to_guest: None,
                fin_from_guest: false,
                guest_window: 0,
                guest_window_scale: 0,
                our_window_scale: OUR_WINDOW_SCALE,
                mss: default_mss(guest_addr),
                window_to_guest: 0,
                // Offered in our SYN; the guest's SYN-ACK decides.
                sack_permitted: false,
            },
            socket,
            registered: None,
            send_blocked: false,
            rx_blocked: false,
            hung_up: false,
            push_again: false,
            deadline: None,
            scheduled: None,
            rto: INITIAL_RTO,
            retries: 0,
            dup_acks: 0,
            ack_pending: false,
            sacked: Scoreboard::default(),
            rexmit_high: None,
        }
    }

    /// A connection taken over from a migration source: the guest side as the stream
    /// recorded it, the live socket the source handed over (its filter detached, its
    /// `SO_PEEK_OFF` and queues intact, so the peek model's invariant still holds).
    ///
    /// Nothing is sent now (the rings may not run yet): the connection waits as if the
    /// guest's receive queue had been full ([`TcpConn::rx_blocked`]), so the table
    /// resumes it once it is safe to send (see `AdoptHold` in the parent module). Unacknowledged data gets a
    /// retransmission deadline: frames in flight at the switch may be lost.
    pub fn adopt(guest: GuestSide, socket: OwnedFd, now: Instant) -> Self {
        tracing::trace!("adopting {guest:?}");
        let unacked = guest.seq_to_guest != guest.seq_ack_from_guest
            || guest.seq_max_to_guest != guest.seq_to_guest;
        TcpConn {
            guest,
            socket,
            registered: None,
            send_blocked: false,
            ack_pending: true,
            rx_blocked: true,
            hung_up: false,
            push_again: false,
            deadline: unacked.then(|| now + INITIAL_RTO),
            scheduled: None,
            rto: INITIAL_RTO,
            retries: 0,
            dup_acks: 0,
            sacked: Scoreboard::default(),
            rexmit_high: None,
        }
    }

    /// Send an ACK with the current window now, or as soon as the guest has buffers.
    pub fn ack(&mut self, io: &mut Io<'_>) {
        if self.send_flags(io, ACK) {
            self.ack_pending = false;
        } else {
            self.ack_pending = true;
            self.rx_blocked = true;
        }
    }

    /// Retry what a full guest receive queue held back: a pending ACK first, then data.
    pub fn resume_rx(&mut self, io: &mut Io<'_>) -> Outcome {
        if self.ack_pending {
            self.ack(io);
            if self.ack_pending {
                return Outcome::Keep;
            }
            if self.check_done() == Outcome::Close {
                // That was the last ACK of a connection closed both ways.
                return Outcome::Close;
            }
        }
        self.push_data(io)
    }

    /// Data may wait in the socket, but other flows already wait for the guest's
    /// receive buffers: wait behind them (see [`Self::resume_rx`]) instead of peeking.
    pub fn wait_for_rx(&mut self) {
        if self.guest.state == TcpState::Established {
            self.rx_blocked = true;
        }
    }

    /// The epoll events this connection wants now.
    ///
    /// Established connections are polled edge-triggered. Level-triggered EPOLLIN
    /// cannot work with the peek model: the kernel reports a socket readable while it
    /// holds unread data, and data sent to the guest but not yet acknowledged stays
    /// unread (peeked) — so every flow with data in flight and room left in the guest's
    /// window was reported on every round although there was nothing to peek, and a
    /// guest that stopped acknowledging kept the engine spinning until each flow's
    /// retransmission timeout. With EPOLLET an event means something happened (new
    /// data, the peer's FIN, free send space, an error); [`Self::push_data`] peeks until
    /// the socket has nothing new or stops for a reason that changes this mask (guest
    /// window full, receive queue full, our FIN sent) — registering the changed mask
    /// polls the socket again — or sets [`Self::push_again`]. The other paths that can
    /// send more (an ACK or window update from the guest, a timer, free receive buffers)
    /// call `push_data` themselves. A frozen socket (see [`super::TcpFlows`]) cannot
    /// make an edge-triggered registration spin either: it reports a change once, so
    /// established connections stay registered through a freeze.
    pub fn wanted_events(&self) -> EpollFlags {
        let g = &self.guest;
        match g.state {
            TcpState::Connecting => EpollFlags::EPOLLOUT,
            TcpState::SynSent | TcpState::SynAckSent => EpollFlags::empty(),
            TcpState::Established => {
                let mut events = EpollFlags::empty();
                let in_flight = g.seq_to_guest.since(g.seq_ack_from_guest);
                if g.fin_to_guest.is_none() && !self.rx_blocked && in_flight < g.guest_window {
                    events |= EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
                }
                if self.send_blocked {
                    events |= EpollFlags::EPOLLOUT;
                }
                // Even with nothing asked for: EPOLLERR and EPOLLHUP come regardless, and
                // once is enough (see `TcpFlows::flow_event`).
                events | EpollFlags::EPOLLET
            }
        }
    }

    /// Bytes of data (no FIN) sent to the guest and not acknowledged: the peek offset.
    fn data_in_flight(&self) -> u32 {
        let g = &self.guest;
        let mut n = g.seq_to_guest.since(g.seq_ack_from_guest);
        if let Some(fin) = g.fin_to_guest {
            if g.seq_to_guest.after(fin) && n > 0 {
                n -= 1;
            }
        }
        if g.state == TcpState::SynSent || g.state == TcpState::SynAckSent {
            // The SYN occupies the first sequence number.
            n = n.saturating_sub(1);
        }
        n
    }

    /// Our receive window for the guest: what the socket's send buffer can take.
    fn compute_window(&mut self) -> u16 {
        let space = sock::send_space(self.socket.as_fd()).unwrap_or(0);
        let max = 65535u32 << self.guest.our_window_scale;
        let window = space.min(max);
        let scaled = window >> self.guest.our_window_scale;
        self.guest.window_to_guest = scaled << self.guest.our_window_scale;
        if scaled == 0 {
            // A closed window must be reopened by us: the guest only probes it on its
            // own timer (0.2 s and more, doubling). Watch for the socket becoming
            // writable, as after a refused write ([`Self::on_writable`] announces the
            // window). Only for zero: EPOLLOUT is level-triggered and fires with free
            // space below one MSS, so a "small window" test would spin.
            self.send_blocked = true;
        }
        u16::try_from(scaled).unwrap_or(u16::MAX)
    }

    fn out<'p>(
        &self,
        io: &Io<'_>,
        seq: Seq,
        flags: u8,
        window: u16,
        payload: &'p [u8],
    ) -> OutSegment<'p> {
        OutSegment {
            src_mac: io.our_mac,
            dst_mac: io.guest_mac,
            src: (self.guest.remote_addr, self.guest.remote_port),
            dst: (self.guest.guest_addr, self.guest.guest_port),
            seq,
            ack: if flags & ACK != 0 {
                self.guest.seq_from_guest
            } else {
                Seq(0)
            },
            flags,
            window,
            syn_options: None,
            payload,
        }
    }

    fn emit(io: &mut Io<'_>, seg: &OutSegment<'_>) -> bool {
        if segment::build(seg, io.frame_buf).is_err() {
            return false;
        }
        io.sink.send_frame(io.frame_buf)
    }

    /// A segment without payload at `seq_to_guest` (ACK, FIN, RST, window update).
    pub fn send_flags(&mut self, io: &mut Io<'_>, flags: u8) -> bool {
        let window = if flags & RST != 0 {
            0
        } else {
            self.compute_window()
        };
        let seg = self.out(io, self.guest.seq_to_guest, flags, window, &[]);
        Self::emit(io, &seg)
    }

    /// Inbound: the SYN towards the guest.
    pub fn send_syn(&mut self, io: &mut Io<'_>) -> bool {
        let window = self.compute_window();
        let mut seg = self.out(io, self.guest.isn, SYN, window, &[]);
        seg.syn_options = Some(SynOffer {
            mss: io.link_mss,
            window_scale: Some(OUR_WINDOW_SCALE),
            sack_permitted: true,
        });
        self.arm_rto(io.now);
        Self::emit(io, &seg)
    }

    /// Outbound: the SYN-ACK towards the guest once the socket is connected.
    fn send_syn_ack(&mut self, io: &mut Io<'_>) -> bool {
        // Windows in SYN segments are never scaled.
        let window = sock::send_space(self.socket.as_fd())
            .unwrap_or(0)
            .min(65535) as u16;
        let scale = (self.guest.our_window_scale > 0).then_some(self.guest.our_window_scale);
        let mut seg = self.out(io, self.guest.isn, SYN | ACK, window, &[]);
        seg.syn_options = Some(SynOffer {
            mss: io.link_mss,
            window_scale: scale,
            sack_permitted: self.guest.sack_permitted,
        });
        self.arm_rto(io.now);
        Self::emit(io, &seg)
    }

    fn arm_rto(&mut self, now: Instant) {
        self.deadline = Some(now + self.rto);
    }

    /// The connect finished (EPOLLOUT while connecting).
    pub fn on_connected(&mut self, io: &mut Io<'_>) -> Outcome {
        match sock::take_error(self.socket.as_fd()) {
            Ok(0) => {}
            Ok(errno) => {
                if let Some(reason) = crate::net::icmp::Unreachable::from_errno(errno) {
                    return self.unreachable(io, reason);
                }
                return self.reset_guest(io);
            }
            Err(_) => return self.reset_guest(io),
        }
        if sock::enable_peek_offset(self.socket.as_fd()).is_err() {
            return self.reset_guest(io);
        }
        self.guest.state = TcpState::SynAckSent;
        self.guest.seq_to_guest = self.guest.isn.plus(1);
        self.guest.seq_max_to_guest = self.guest.seq_to_guest;
        self.send_syn_ack(io);
        Outcome::Keep
    }

    /// The connect failed for lack of a route: answer the guest's SYN with the ICMP
    /// destination unreachable a router would send, and drop the connection.
    fn unreachable(&mut self, io: &mut Io<'_>, reason: crate::net::icmp::Unreachable) -> Outcome {
        let g = &self.guest;
        // The quote needs the SYN's ports and sequence number; baton kept those only.
        let mut syn = [0u8; 20];
        syn[0..2].copy_from_slice(&g.guest_port.to_be_bytes());
        syn[2..4].copy_from_slice(&g.remote_port.to_be_bytes());
        syn[4..8].copy_from_slice(&g.seq_from_guest.plus(u32::MAX).0.to_be_bytes());
        syn[12] = 5 << 4;
        syn[13] = SYN;
        let frame = crate::net::icmp::unreachable_frame(
            io.our_mac,
            io.guest_mac,
            g.guest_addr,
            g.remote_addr,
            etherparse::IpNumber::TCP,
            &syn,
            reason,
        );
        match frame {
            Some(frame) => {
                io.sink.send_frame(&frame);
                Outcome::Reset
            }
            None => self.reset_guest(io),
        }
    }

    /// Tell the guest the connection is gone, and drop it (the socket is reset).
    pub fn reset_guest(&mut self, io: &mut Io<'_>) -> Outcome {
        let g = &self.guest;
        let (seq, flags) = match g.state {
            // The guest has not seen our ISN: answer its SYN.
            TcpState::Connecting => (Seq(0), RST | ACK),
            _ => (g.seq_to_guest, RST | ACK),
        };
        let seg = self.out(io, seq, flags, 0, &[]);
        Self::emit(io, &seg);
        Outcome::Reset
    }

    /// A segment from the guest for this connection.
    pub fn on_segment(&mut self, seg: &Segment<'_>, io: &mut Io<'_>) -> Outcome {
        match self.guest.state {
            TcpState::Connecting => {
                if seg.has(RST) {
                    return Outcome::Reset;
                }
                // SYN retransmissions: the SYN-ACK follows when the connect completes.
                Outcome::Keep
            }
            TcpState::SynSent => self.on_syn_sent(seg, io),
            TcpState::SynAckSent => {
                if seg.has(RST) {
                    return if seg.seq == self.guest.seq_from_guest {
                        Outcome::Reset
                    } else {
                        Outcome::Keep
                    };
                }
                if seg.has(SYN) {
                    if seg.seq.plus(1) == self.guest.seq_from_guest {
                        self.send_syn_ack(io);
                    }
                    return Outcome::Keep;
                }
                if !seg.has(ACK) || seg.ack != self.guest.isn.plus(1) {
                    if seg.has(ACK) {
                        // RFC 9293: an unacceptable ACK in SYN-RECEIVED gets a RST.
                        let rst = OutSegment {
                            flags: RST,
                            ..self.out(io, seg.ack, RST, 0, &[])
                        };
                        Self::emit(io, &rst);
                    }
                    return Outcome::Keep;
                }
                self.establish(seg, io);
                self.on_established(seg, io)
            }
            TcpState::Established => self.on_established(seg, io),
        }
    }

    fn establish(&mut self, seg: &Segment<'_>, io: &mut Io<'_>) {
        let g = &mut self.guest;
        g.state = TcpState::Established;
        g.seq_ack_from_guest = seg.ack;
        g.guest_window = u32::from(seg.window) << g.guest_window_scale;
        self.deadline = None;
        self.retries = 0;
        self.rto = INITIAL_RTO;
        let _ = io;
    }

    fn on_syn_sent(&mut self, seg: &Segment<'_>, io: &mut Io<'_>) -> Outcome {
        let expected = self.guest.isn.plus(1);
        if seg.has(RST) {
            // Accept only a RST that acknowledges our SYN (RFC 9293 3.10.7.3).
            return if seg.has(ACK) && seg.ack == expected {
                Outcome::Reset
            } else {
                Outcome::Keep
            };
        }
        if !(seg.has(SYN) && seg.has(ACK)) || seg.ack != expected {
            return Outcome::Keep;
        }
        if sock::enable_peek_offset(self.socket.as_fd()).is_err() {
            return self.reset_guest(io);
        }
        let g = &mut self.guest;
        g.seq_from_guest = seg.seq.plus(1);
        g.sack_permitted = seg.options.sack_permitted;
        match seg.options.window_scale {
            Some(scale) => g.guest_window_scale = scale,
            None => {
                g.guest_window_scale = 0;
                g.our_window_scale = 0;
            }
        }
        g.mss = seg
            .options
            .mss
            .unwrap_or(default_mss(g.guest_addr))
            .clamp(64, io.link_mss.max(64));
        g.state = TcpState::Established;
        g.seq_ack_from_guest = expected;
        g.guest_window = u32::from(seg.window);
        self.deadline = None;
        self.retries = 0;
        self.rto = INITIAL_RTO;
        self.ack(io);
        self.push_data(io)
    }

    fn on_established(&mut self, seg: &Segment<'_>, io: &mut Io<'_>) -> Outcome {
        tracing::trace!(
            "guest segment seq {} ack {} flags {:#x} len {} window {}; SND.UNA {} SND.NXT {} SND.MAX {} RCV.NXT {}",
            seg.seq.0,
            seg.ack.0,
            seg.flags,
            seg.payload.len(),
            seg.window,
            self.guest.seq_ack_from_guest.0,
            self.guest.seq_to_guest.0,
            self.guest.seq_max_to_guest.0,
            self.guest.seq_from_guest.0
        );
        let rcv_nxt = self.guest.seq_from_guest;
        let rcv_wnd = self.guest.window_to_guest.max(1);
        if seg.has(RST) {
            // RFC 5961: exact match resets; inside the window earns a challenge ACK.
            if seg.seq == rcv_nxt {
                return Outcome::Reset;
            }
            if seg.seq.in_window(rcv_nxt, rcv_wnd) {
                self.ack(io);
            }
            return Outcome::Keep;
        }
        if seg.has(SYN) {
            // RFC 5961 challenge ACK; the guest resets if it really restarted.
            self.ack(io);
            return Outcome::Keep;
        }
        if !seg.has(ACK) {
            return Outcome::Keep;
        }
        // Acceptability of the sequence number (RFC 9293 3.10.7.4, simplified: the
        // segment must start no later than our window's right edge and end no earlier
        // than the previous window's left edge).
        let seg_end = seg.seq.plus(seg.seq_len());
        let acceptable = seg.seq.before_eq(rcv_nxt.plus(rcv_wnd))
            && seg_end.after(rcv_nxt.plus(0u32.wrapping_sub(rcv_wnd.min(1 << 30))));
        if !acceptable {
            tracing::debug!(
                "guest segment outside the window: seq {} len {} (RCV.NXT {}, window {})",
                seg.seq.0,
                seg.seq_len(),
                rcv_nxt.0,
                rcv_wnd
            );
            self.ack(io);
            return Outcome::Keep;
        }
        if let Some(outcome) = self.on_ack(seg, io) {
            return outcome;
        }
        let mut need_ack = false;
        if seg.payload.is_empty() && !seg.has(FIN) && seg.seq.before(rcv_nxt) {
            // A keepalive or window probe (RFC 9293 3.8.4: SND.NXT − 1, no data, the
            // one-byte form is covered below): it exists to get an ACK back.
            need_ack = true;
        }
        if !seg.payload.is_empty() && !self.guest.fin_from_guest {
            need_ack = true;
            if let Some(outcome) = self.write_guest_data(seg, io) {
                return outcome;
            }
        } else if !seg.payload.is_empty() {
            need_ack = true;
        }
        if seg.has(FIN) {
            need_ack = true;
            let fin_seq = seg
                .seq
                .plus(u32::try_from(seg.payload.len()).unwrap_or(u32::MAX));
            tracing::trace!(
                "guest FIN at {} (RCV.NXT {}, already {})",
                fin_seq.0,
                self.guest.seq_from_guest.0,
                self.guest.fin_from_guest
            );
            if !self.guest.fin_from_guest && fin_seq == self.guest.seq_from_guest {
                let _ = shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(&self.socket),
                    Shutdown::Write,
                );
                self.guest.fin_from_guest = true;
                self.guest.seq_from_guest = self.guest.seq_from_guest.plus(1);
            }
        }
        if need_ack {
            self.ack(io);
        }
        self.check_done()
    }

    /// Both FINs exchanged and ours acknowledged: the connection is over.
    fn check_done(&self) -> Outcome {
        let g = &self.guest;
        match g.fin_to_guest {
            // Not while our ACK of the guest's FIN is still waiting for receive
            // buffers: without it the guest retransmits its FIN, and a flow that is gone
            // answers that with a RST (baton keeps no TIME-WAIT). [`Self::resume_rx`]
            // closes once the ACK went out.
            Some(fin)
                if g.fin_from_guest && g.seq_ack_from_guest == fin.plus(1) && !self.ack_pending =>
            {
                Outcome::Close
            }
            _ => Outcome::Keep,
        }
    }

    /// Process the acknowledgement field; `Some` ends the connection.
    fn on_ack(&mut self, seg: &Segment<'_>, io: &mut Io<'_>) -> Option<Outcome> {
        let g = self.guest;
        if seg.ack.after(g.seq_max_to_guest) {
            // Acknowledges data we never sent.
            self.ack(io);
            return Some(Outcome::Keep);
        }
        let new_window = u32::from(seg.window) << g.guest_window_scale;
        if seg.ack.before(g.seq_ack_from_guest) {
            return None;
        }
        let acked = seg.ack.since(g.seq_ack_from_guest);
        self.note_sack(seg);
        if acked == 0 {
            let in_flight = g.seq_to_guest.since(g.seq_ack_from_guest);
            let duplicate = seg.payload.is_empty()
                && !seg.has(FIN)
                && new_window == g.guest_window
                && in_flight > 0;
            self.guest.guest_window = new_window;
            if g.guest_window == 0 && new_window > 0 && in_flight == 0 && g.fin_to_guest.is_none() {
                // The window reopened with nothing in flight: the deadline was the
                // zero-window probe's. Left armed it would fire shortly after the data
                // sent now and be taken for a retransmission timeout (a spurious
                // rewind that resends the whole window, and a doubled timeout).
                self.deadline = None;
                self.rto = INITIAL_RTO;
                self.retries = 0;
            }
            if duplicate {
                self.dup_acks = self.dup_acks.saturating_add(1);
                if self.dup_acks >= DUP_ACK_THRESHOLD && self.sack_in_use() {
                    let outcome = self.sack_recover(io);
                    if outcome != Outcome::Keep {
                        return Some(outcome);
                    }
                } else if self.dup_acks == DUP_ACK_THRESHOLD {
                    self.rewind();
                }
            }
            if new_window > 0 || duplicate {
                return match self.push_data(io) {
                    Outcome::Keep => None,
                    other => Some(other),
                };
            }
            return None;
        }
        // Consume the acknowledged data from the socket.
        let mut data_acked = acked;
        if let Some(fin) = g.fin_to_guest {
            if seg.ack.after(fin) {
                data_acked = data_acked.saturating_sub(1);
            }
        }
        if matches!(g.state, TcpState::SynAckSent | TcpState::SynSent) {
            data_acked = data_acked.saturating_sub(1);
        }
        if data_acked > 0 {
            if let Err(err) = discard(&self.socket, io.peek_buf, data_acked) {
                tracing::debug!("discarding acknowledged data: {err}");
                return Some(self.reset_guest(io));
            }
        }
        self.guest.seq_ack_from_guest = seg.ack;
        if self.guest.seq_to_guest.before(seg.ack) {
            // Acknowledges data sent before a rewind: skip ahead (the kernel clamps
            // the peek offset at 0 when the data is consumed).
            self.guest.seq_to_guest = seg.ack;
            if let Some(fin) = self.guest.fin_to_guest {
                if seg.ack.after(fin) {
                    self.guest.seq_to_guest = fin.plus(1);
                }
            }
        }
        self.guest.guest_window = new_window;
        self.dup_acks = 0;
        self.retries = 0;
        self.rto = INITIAL_RTO;
        self.deadline = None;
        match self.push_data(io) {
            Outcome::Keep => {
                // RFC 6298 (5.3): the timer restarts while data is outstanding, even
                // when this ACK let nothing new go (a lost tail would otherwise wait
                // for the host to send more).
                let g = &self.guest;
                let unacked =
                    g.seq_to_guest != g.seq_ack_from_guest || g.seq_max_to_guest != g.seq_to_guest;
                if unacked && self.deadline.is_none() {
                    self.arm_rto(io.now);
                }
                None
            }
            other => Some(other),
        }
    }

    /// Update the scoreboard from a (valid) ACK of the guest: forget what it
    /// acknowledges, or all of it if the ACK stops at a byte the guest had reported
    /// holding (it reneged), then add the ACK's blocks.
    fn note_sack(&mut self, seg: &Segment<'_>) {
        let g = &self.guest;
        if !g.sack_permitted || g.state != TcpState::Established {
            return;
        }
        if self.sacked.covers(seg.ack) {
            tracing::debug!(
                "{}:{} -> {}:{}: the guest dropped data it had reported holding (at {})",
                g.remote_addr,
                g.remote_port,
                g.guest_addr,
                g.guest_port,
                seg.ack.0
            );
            self.sacked.clear();
        } else {
            self.sacked.advance(seg.ack);
        }
        if self.rexmit_high.is_some_and(|high| !seg.ack.before(high)) {
            self.rexmit_high = None;
        }
        for (start, end) in seg.sack.iter() {
            self.sacked.add(start, end, seg.ack, g.seq_max_to_guest);
        }
    }

    fn sack_in_use(&self) -> bool {
        self.guest.sack_permitted && !self.sacked.is_empty()
    }

    /// Fast retransmission with SACK: resend the holes below the highest block the
    /// guest reported that this recovery has not resent yet.
    fn sack_recover(&mut self, io: &mut Io<'_>) -> Outcome {
        let Some(high) = self.sacked.highest() else {
            return Outcome::Keep;
        };
        let g = &self.guest;
        let una = g.seq_ack_from_guest;
        let from = match self.rexmit_high {
            Some(done) if done.after(una) => done,
            _ => una,
        };
        let to = if high.before(g.seq_to_guest) {
            high
        } else {
            g.seq_to_guest
        };
        if !from.before(to) {
            return Outcome::Keep;
        }
        let holes = self.sacked.holes(from, to);
        tracing::debug!(
            "{}:{} -> {}:{}: fast retransmission of {} hole(s) in {}..{} (SND.UNA {})",
            g.remote_addr,
            g.remote_port,
            g.guest_addr,
            g.guest_port,
            holes.len(),
            from.0,
            to.0,
            una.0
        );
        self.rexmit_high = Some(to);
        self.resend(io, &holes)
    }

    /// Send the ranges again (below SND.NXT; our FIN too if a range holds it), peeking
    /// each at its offset, then put `SO_PEEK_OFF` back at SND.NXT. Data beyond the
    /// guest's window is left for later. If the guest's receive queue fills up the rest
    /// waits for the next duplicate ACK or timeout (`rexmit_high` stops there).
    fn resend(&mut self, io: &mut Io<'_>, ranges: &[(Seq, Seq)]) -> Outcome {
        let una = self.guest.seq_ack_from_guest;
        let fin = self.guest.fin_to_guest;
        let window_end = una.plus(self.guest.guest_window);
        let mss = usize::from(self.guest.mss.min(io.link_mss)).max(1);
        let window = self.compute_window();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.socket);
        let mut frame = std::mem::take(io.frame_buf);
        let mut failed = false;
        'ranges: for &(start, end) in ranges {
            let mut data_end = end;
            for limit in fin.into_iter().chain([window_end]) {
                if limit.before(data_end) {
                    data_end = limit;
                }
            }
            let mut seq = start;
            while seq.before(data_end) {
                if let Err(err) = sock::set_peek_offset(self.socket.as_fd(), seq.since(una)) {
                    tracing::debug!("setting SO_PEEK_OFF for a retransmission: {err}");
                    failed = true;
                    break 'ranges;
                }
                let want = (data_end.since(seq) as usize).min(io.peek_buf.len());
                let peeked = match recv(
                    fd,
                    &mut io.peek_buf[..want],
                    MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(n) if n > 0 => n,
                    Ok(_) | Err(Errno::EAGAIN) => {
                        tracing::debug!("data to retransmit is missing from the socket");
                        failed = true;
                        break 'ranges;
                    }
                    Err(err) => {
                        tracing::debug!("peeking at data to retransmit: {err}");
                        failed = true;
                        break 'ranges;
                    }
                };
                let mut sent = 0;
                while sent < peeked {
                    let chunk = (peeked - sent).min(mss);
                    let seg = self.out(io, seq, ACK, window, &io.peek_buf[sent..sent + chunk]);
                    if segment::build(&seg, &mut frame).is_err() || !io.sink.send_frame(&frame) {
                        self.rx_blocked = true;
                        self.rexmit_high = Some(seq);
                        break 'ranges;
                    }
                    sent += chunk;
                    seq = seq.plus(chunk as u32);
                }
            }
            if let Some(fin) = fin {
                if !fin.before(start) && fin.before(end) {
                    let seg = self.out(io, fin, FIN | ACK, window, &[]);
                    if segment::build(&seg, &mut frame).is_err() || !io.sink.send_frame(&frame) {
                        self.rx_blocked = true;
                        self.rexmit_high = Some(fin);
                        break 'ranges;
                    }
                }
            }
        }
        *io.frame_buf = frame;
        let offset = self.data_in_flight();
        if let Err(err) = sock::set_peek_offset(self.socket.as_fd(), offset) {
            tracing::debug!("restoring SO_PEEK_OFF after a retransmission: {err}");
            failed = true;
        }
        if failed {
            return self.reset_guest(io);
        }
        Outcome::Keep
    }

    /// Write the new part of the guest's payload into the socket.
    fn write_guest_data(&mut self, seg: &Segment<'_>, io: &mut Io<'_>) -> Option<Outcome> {
        let rcv_nxt = self.guest.seq_from_guest;
        if seg.seq.after(rcv_nxt) {
            // Out of order: we keep no buffer; the duplicate ACK asks for the gap.
            return None;
        }
        let skip = rcv_nxt.since(seg.seq) as usize;
        let new = seg.payload.get(skip..)?;
        if new.is_empty() {
            return None;
        }
        match send(
            std::os::fd::AsRawFd::as_raw_fd(&self.socket),
            new,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(written) => {
                let written = u32::try_from(written).unwrap_or(0);
                self.guest.seq_from_guest = rcv_nxt.plus(written);
                if (written as usize) < new.len() {
                    self.refused(seg, new.len() - written as usize);
                }
                None
            }
            Err(Errno::EAGAIN) => {
                self.refused(seg, new.len());
                None
            }
            Err(err) => {
                tracing::debug!("writing guest data to the socket: {err}");
                Some(self.reset_guest(io))
            }
        }
    }

    /// The socket did not take `left` bytes of the guest's segment: they are not
    /// acknowledged, and the window is announced again once the socket is writable.
    fn refused(&mut self, seg: &Segment<'_>, left: usize) {
        tracing::trace!(
            "socket refused {left} of {} bytes at {} (advertised window {})",
            seg.payload.len(),
            seg.seq.0,
            self.guest.window_to_guest
        );
        self.send_blocked = true;
    }

    /// Go back to the oldest unacknowledged byte (retransmission).
    fn rewind(&mut self) {
        let g = &mut self.guest;
        if g.state != TcpState::Established {
            return;
        }
        // `fin_to_guest` stays: it records where our FIN sits in the sequence space,
        // and [`Conn::push_data`] sends it again once the data before it went again.
        // (Forgetting it made a late ACK of the first FIN count one byte of data too
        // many, and the flow was reset.)
        g.seq_to_guest = g.seq_ack_from_guest;
        if let Err(err) = sock::set_peek_offset(self.socket.as_fd(), 0) {
            tracing::debug!("resetting SO_PEEK_OFF: {err}");
        }
        self.dup_acks = 0;
        // Everything goes again: nothing to skip, no recovery in progress.
        self.sacked.clear();
        self.rexmit_high = None;
    }

    /// Send what the socket has, within the guest's window, straight from `MSG_PEEK`.
    pub fn push_data(&mut self, io: &mut Io<'_>) -> Outcome {
        if self.guest.state != TcpState::Established {
            return Outcome::Keep;
        }
        self.rx_blocked = self.ack_pending;
        self.push_again = false;
        let mss = usize::from(self.guest.mss.min(io.link_mss)).max(1);
        for round in 0..PUSH_ROUNDS {
            if let Some(fin) = self.guest.fin_to_guest {
                if self.guest.seq_to_guest == fin {
                    // Rewound up to our FIN (a retransmission): send it again.
                    if !self.send_flags(io, FIN | ACK) {
                        self.rx_blocked = true;
                        break;
                    }
                    self.guest.seq_to_guest = fin.plus(1);
                    if self.deadline.is_none() {
                        self.arm_rto(io.now);
                    }
                }
                if !self.guest.seq_to_guest.before(fin) {
                    break;
                }
            }
            let in_flight = self.guest.seq_to_guest.since(self.guest.seq_ack_from_guest);
            let room = self.guest.guest_window.saturating_sub(in_flight) as usize;
            if room == 0 {
                if self.guest.guest_window == 0 && self.deadline.is_none() {
                    // Zero window: probe it later.
                    self.deadline = Some(io.now + self.rto);
                }
                break;
            }
            let mut limit = room.min(io.peek_buf.len());
            if let Some(fin) = self.guest.fin_to_guest {
                // Resending the data before our FIN, not beyond it.
                limit = limit.min(fin.since(self.guest.seq_to_guest) as usize);
            }
            if limit > mss {
                // Whole segments only: a peek that ends just past a segment boundary
                // would cost the guest a tiny frame (with MTU 65520, 64 KiB peeks made
                // every other frame 56 bytes long), and per-frame work is what bounds
                // a guest's receive rate. The rest goes in the next round.
                limit -= limit % mss;
            }
            let fd = std::os::fd::AsRawFd::as_raw_fd(&self.socket);
            let peeked = match recv(
                fd,
                &mut io.peek_buf[..limit],
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => break,
                Err(err) => {
                    tracing::debug!("peeking at socket data: {err}");
                    return self.reset_guest(io);
                }
            };
            if peeked == 0 && self.guest.fin_to_guest.is_some() {
                // Data acknowledged to the host before our FIN is gone from the
                // socket: nothing consistent can be sent.
                tracing::debug!("data before our FIN is missing from the socket");
                return self.reset_guest(io);
            }
            if peeked == 0 {
                // End of stream, and everything before it was sent: FIN.
                let fin = self.guest.seq_to_guest;
                let sent = self.send_flags(io, FIN | ACK);
                tracing::trace!("FIN to the guest at {}: sent {sent}", fin.0);
                if !sent {
                    self.rx_blocked = true;
                    break;
                }
                self.guest.fin_to_guest = Some(fin);
                self.guest.seq_to_guest = fin.plus(1);
                if self.guest.seq_max_to_guest.before(self.guest.seq_to_guest) {
                    self.guest.seq_max_to_guest = self.guest.seq_to_guest;
                }
                if self.deadline.is_none() {
                    self.arm_rto(io.now);
                }
                return self.check_done();
            }
            let window = self.compute_window();
            let mut sent = 0usize;
            let mut blocked = false;
            let mut frame = std::mem::take(io.frame_buf);
            while sent < peeked {
                let end = (sent + mss).min(peeked);
                let flags = if end == peeked { ACK | PSH } else { ACK };
                let seq = self.guest.seq_to_guest;
                let seg = self.out(io, seq, flags, window, &io.peek_buf[sent..end]);
                if segment::build(&seg, &mut frame).is_err() || !io.sink.send_frame(&frame) {
                    blocked = true;
                    break;
                }
                self.guest.seq_to_guest = seq.plus((end - sent) as u32);
                sent = end;
                // Every data segment carries the current ACK and window.
                self.ack_pending = false;
            }
            *io.frame_buf = frame;
            if self.guest.seq_max_to_guest.before(self.guest.seq_to_guest) {
                self.guest.seq_max_to_guest = self.guest.seq_to_guest;
            }
            if sent > 0 && self.deadline.is_none() {
                self.arm_rto(io.now);
            }
            if blocked {
                // The rest stays in the socket; peek it again when buffers come.
                let offset = self.data_in_flight();
                if let Err(err) = sock::set_peek_offset(self.socket.as_fd(), offset) {
                    tracing::debug!("rolling back SO_PEEK_OFF: {err}");
                    return self.reset_guest(io);
                }
                self.rx_blocked = true;
                break;
            }
            if peeked < limit {
                break;
            }
            if round + 1 == PUSH_ROUNDS {
                // Fairness: other flows first. More may wait in the socket, and with
                // edge-triggered polling only a turn of our own brings it out.
                self.push_again = true;
            }
        }
        Outcome::Keep
    }

    /// The socket is writable again after guest data was refused: announce the window.
    pub fn on_writable(&mut self, io: &mut Io<'_>) -> Outcome {
        if self.send_blocked {
            self.send_blocked = false;
            self.ack(io);
        }
        Outcome::Keep
    }

    /// The flow's deadline passed.
    pub fn on_timer(&mut self, io: &mut Io<'_>) -> Outcome {
        self.deadline = None;
        let g = self.guest;
        let unacked = g.seq_to_guest.since(g.seq_ack_from_guest) > 0
            || g.seq_max_to_guest.after(g.seq_to_guest);
        match g.state {
            TcpState::Connecting => return Outcome::Keep,
            TcpState::SynSent | TcpState::SynAckSent => {
                self.retries += 1;
                if self.retries > MAX_RETRIES / 2 {
                    return self.reset_guest(io);
                }
                self.rto = (self.rto * 2).min(MAX_RTO);
                if g.state == TcpState::SynSent {
                    self.send_syn(io);
                } else {
                    self.send_syn_ack(io);
                }
                return Outcome::Keep;
            }
            TcpState::Established => {}
        }
        if unacked {
            self.retries += 1;
            if self.retries > MAX_RETRIES {
                tracing::debug!(
                    "{}:{} -> {}:{}: guest stopped acknowledging, resetting",
                    g.remote_addr,
                    g.remote_port,
                    g.guest_addr,
                    g.guest_port
                );
                return self.reset_guest(io);
            }
            tracing::debug!(
                "{}:{} -> {}:{}: retransmission timeout (try {}): resending from {} \
                 (SND.NXT {}, SND.MAX {}, guest window {}, receive queue full {}, ACK pending {})",
                g.remote_addr,
                g.remote_port,
                g.guest_addr,
                g.guest_port,
                self.retries,
                g.seq_ack_from_guest.0,
                g.seq_to_guest.0,
                g.seq_max_to_guest.0,
                g.guest_window,
                self.rx_blocked,
                self.ack_pending
            );
            self.rto = (self.rto * 2).min(MAX_RTO);
            let outcome = if self.sack_in_use() && self.retries <= SACK_TRUSTED_TIMEOUTS {
                // Every hole up to SND.NXT, nothing the guest reported holding.
                let (una, nxt) = (g.seq_ack_from_guest, self.guest.seq_to_guest);
                let holes = self.sacked.holes(una, nxt);
                tracing::debug!(
                    "resending {} SACK hole(s) in {}..{}",
                    holes.len(),
                    una.0,
                    nxt.0
                );
                self.rexmit_high = Some(nxt);
                match self.resend(io, &holes) {
                    Outcome::Keep => self.push_data(io),
                    other => other,
                }
            } else {
                self.rewind();
                self.push_data(io)
            };
            if self.deadline.is_none() {
                self.arm_rto(io.now);
            }
            return outcome;
        }
        if g.guest_window == 0 && g.fin_to_guest.is_none() {
            // Zero-window probe: an old sequence number makes the guest answer with
            // an ACK carrying its current window.
            let seg = self.out(io, g.seq_to_guest.plus(u32::MAX), ACK, 0, &[]);
            let window = self.compute_window();
            let seg = OutSegment { window, ..seg };
            Self::emit(io, &seg);
            self.rto = (self.rto * 2).min(MAX_RTO);
            self.arm_rto(io.now);
        }
        Outcome::Keep
    }
}

// ---------------------------------------------------------------------------------------
// Wire form (migration stream)
// ---------------------------------------------------------------------------------------

/// A guest side that the migration stream cannot carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GuestSideError {
    /// Only established connections move; the guest restarts a handshake by itself.
    #[error("the connection is still in its handshake ({0:?})")]
    Handshake(TcpState),
    #[error("the guest and remote ends mix IPv4 and IPv6")]
    MixedFamilies,
}

fn endpoint(addr: IpAddr, port: u16) -> Endpoint {
    Endpoint::from_socket_addr(std::net::SocketAddr::new(addr, port))
}

impl From<Origin> for FlowOrigin {
    fn from(origin: Origin) -> Self {
        match origin {
            Origin::Guest => FlowOrigin::Guest,
            Origin::Host => FlowOrigin::Host,
        }
    }
}

impl From<FlowOrigin> for Origin {
    fn from(origin: FlowOrigin) -> Self {
        match origin {
            FlowOrigin::Guest => Origin::Guest,
            FlowOrigin::Host => Origin::Host,
        }
    }
}

impl TryFrom<&GuestSide> for GuestTcpSide {
    type Error = GuestSideError;

    fn try_from(g: &GuestSide) -> Result<Self, Self::Error> {
        if g.state != TcpState::Established {
            return Err(GuestSideError::Handshake(g.state));
        }
        if g.guest_addr.is_ipv4() != g.remote_addr.is_ipv4() {
            return Err(GuestSideError::MixedFamilies);
        }
        Ok(GuestTcpSide {
            origin: g.origin.into(),
            guest: endpoint(g.guest_addr, g.guest_port),
            remote: endpoint(g.remote_addr, g.remote_port),
            isn: g.isn.0,
            seq_to_guest: g.seq_to_guest.0,
            seq_max_to_guest: g.seq_max_to_guest.0,
            seq_acked_by_guest: g.seq_ack_from_guest.0,
            seq_from_guest: g.seq_from_guest.0,
            fin_to_guest: g.fin_to_guest.map(|s| s.0),
            fin_from_guest: g.fin_from_guest,
            wnd_from_guest: g.guest_window,
            wnd_to_guest: g.window_to_guest,
            ws_from_guest: g.guest_window_scale,
            ws_to_guest: g.our_window_scale,
            mss_to_guest: g.mss,
            sack_permitted: g.sack_permitted,
        })
    }
}

/// From a record the stream reader has validated
/// ([`GuestTcpSide::validate`]): always an established connection.
impl From<&GuestTcpSide> for GuestSide {
    fn from(r: &GuestTcpSide) -> Self {
        let guest = r.guest.to_socket_addr();
        let remote = r.remote.to_socket_addr();
        GuestSide {
            origin: r.origin.into(),
            guest_addr: guest.ip(),
            guest_port: guest.port(),
            remote_addr: remote.ip(),
            remote_port: remote.port(),
            state: TcpState::Established,
            isn: Seq(r.isn),
            seq_to_guest: Seq(r.seq_to_guest),
            seq_max_to_guest: Seq(r.seq_max_to_guest),
            seq_ack_from_guest: Seq(r.seq_acked_by_guest),
            seq_from_guest: Seq(r.seq_from_guest),
            fin_to_guest: r.fin_to_guest.map(Seq),
            fin_from_guest: r.fin_from_guest,
            guest_window: r.wnd_from_guest,
            guest_window_scale: r.ws_from_guest,
            our_window_scale: r.ws_to_guest,
            mss: r.mss_to_guest,
            window_to_guest: r.wnd_to_guest,
            sack_permitted: r.sack_permitted,
        }
    }
}

/// Drop `len` acknowledged bytes from the head of the socket's receive queue.
fn discard(socket: &OwnedFd, scratch: &mut [u8], len: u32) -> io::Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(socket);
    let mut left = len as usize;
    while left > 0 {
        let chunk = left.min(scratch.len());
        // MSG_TRUNC on a TCP socket discards without copying.
        match recv(
            fd,
            &mut scratch[..chunk],
            MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "acknowledged data missing from the socket",
                ))
            }
            Ok(n) => left = left.saturating_sub(n),
            Err(Errno::EINTR) => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}
