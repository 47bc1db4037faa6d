//! Dump: freeze a live connection and read its complete state; thaw: undo that.
//!
//! Theory of operation. The order matters, and each step has a kernel reason:
//! 1. Read `SO_REUSEADDR` and `SO_PEEK_OFF` first: repair mode makes the former read 2
//!    (SK_FORCE_REUSE), and the latter shifts every peek.
//! 2. Make the socket deaf (module `deaf`: a TCP-MD5 key the peer does not have, or the
//!    drop-all filter where the kernel refuses keys), *then* enter repair mode. From
//!    here on no incoming segment is processed, so nothing we read can change under us
//!    and the kernel acknowledges nothing more (repair mode alone would keep ACKing, E5).
//! 3. `TCP_INFO` gives the state and the negotiated options; `SIOCINQ` the receive
//!    queue length. Neither changes when a timer transmits (step 6).
//! 4. Receive queue: select it, read `rcv_nxt` with `TCP_QUEUE_SEQ`, peek `SIOCINQ` bytes.
//!    `SIOCINQ` does not count a received FIN (E7), so nothing is subtracted for it.
//! 5. Send queue: select it, *then* read everything a transmission can change: its
//!    lengths (`SIOCOUTQ`, `SIOCOUTQNSD`), `write_seq`, the window (`TCP_REPAIR_WINDOW`:
//!    every segment sent updates rcv_wnd/rcv_wup), and peek the queue. Also `TCP_MAXSEG`
//!    (in repair mode: the MSS clamp) and `TCP_TIMESTAMP` (the TS clock with its µs
//!    flag). The peek returns the whole queue length even when the buffer is smaller
//!    (E18) and may start with bytes the peer has already acknowledged (a partially
//!    acked head skb is not trimmed, E21), so grow the buffer if needed and drop the
//!    surplus at the *front*.
//! 6. Why the send queue is selected last and stays selected. A frozen socket still runs
//!    its timers, and its tail-loss probe sends *new* data when the window allows
//!    (kernel-facts suite `kernel_facts_inflight`): the peer would then hold bytes beyond
//!    the dumped SND.NXT, and a socket restored from the dump would have every answer of
//!    the peer discarded as an ACK of unsent data — a stall for good. With the send
//!    queue selected, `tcp_write_xmit` only marks such data sent, nothing leaves. Before
//!    step 5 (no queue or the receive queue selected) a timer may still transmit; that
//!    is harmless because everything such a transmission changes is read in step 5.
//!    (If the socket is thawed instead, bytes marked sent that way are recovered like any
//!    lost segment.) The selection grants nothing while the socket is in repair mode (any
//!    holder may select a queue then), and every way out of repair mode — thaw,
//!    set-repair, rollback — selects no queue first (a stale selection after repair off
//!    lets an unprivileged holder read or set sequence numbers, E16).
//! 7. Urgent data cannot be restored (no API sets urg_seq/urg_data): refuse the flow.
//! 8. Put `SO_PEEK_OFF` back; read the endpoints and the plain socket options.
//!
//! Each step is one system call per socket and batches hold thousands of sockets, so the
//! sequence reads nothing twice: the caller that validated the socket passes its family
//! ([`dump_as`]), the queue is selected twice, not more.
//!
//! The socket stays frozen (deaf, repair on) after a successful dump. On any error it is
//! rolled back to live, so a failed dump never leaves a deaf socket behind. Thaw and
//! rollback make the socket hear *before* leaving repair mode with a window probe: with
//! the key still installed the probe would go out signed and the peer drop it.
//!
//! The reads of steps 3 to 8 ([`dump_frozen`]) are shared with the pre-dump of a live
//! socket and the freeze check (module `predump`); a pre-dump selects the send queue
//! only around the two calls that need it ([`SendQueue::Briefly`]).

use std::os::fd::BorrowedFd;

use baton_proto::repair::RepairMode;
use baton_proto::tcp::{
    Endpoint, NegotiatedOptions, RepairWindow, SocketFamily, TcpConnState, TcpState, WindowScale,
};
use nix::errno::Errno;
use tracing::warn;

use crate::deaf::{make_deaf, make_hearing};
use crate::error::{RepairError, Result};
use crate::sys::{self, TcpRepairWindow};
use crate::{set_repair_in, sockopts};

/// See [`crate::dump`].
pub fn dump(fd: BorrowedFd<'_>) -> Result<TcpConnState> {
    dump_as(fd, sys::family(fd, "dump: SO_DOMAIN")?)
}

/// See [`crate::dump_as`]: `family` is the socket's, as its validation found it.
pub fn dump_as(fd: BorrowedFd<'_>, family: SocketFamily) -> Result<TcpConnState> {
    let before = freeze(fd)?;
    match dump_frozen(fd, family, before.peek_off, SendQueue::StaysSelected, None) {
        Ok(state) => Ok(before.apply(state)),
        Err(e) => {
            rollback(fd, before.reuseaddr, before.peek_off, true);
            Err(e)
        }
    }
}

/// What repair mode changes and a dump therefore reads before entering it (step 1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Untouched {
    pub reuseaddr: bool,
    pub peek_off: i32,
}

impl Untouched {
    pub(crate) fn read(fd: BorrowedFd<'_>) -> Result<Self> {
        let reuseaddr = sys::get_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            "dump: SO_REUSEADDR",
        )? != 0;
        let peek_off = sys::get_int(fd, libc::SOL_SOCKET, sys::SO_PEEK_OFF, "dump: SO_PEEK_OFF")?;
        Ok(Untouched {
            reuseaddr,
            peek_off,
        })
    }

    /// `state` with these values in place of what the frozen socket showed.
    pub(crate) fn apply(self, mut state: TcpConnState) -> TcpConnState {
        state.sockopts.reuseaddr = self.reuseaddr;
        state.sockopts.peek_off = self.peek_off;
        state
    }
}

/// Steps 1 and 2: read what repair mode changes, make the socket deaf, enter repair
/// mode (no queue selected). On error the socket is rolled back to live.
pub(crate) fn freeze(fd: BorrowedFd<'_>) -> Result<Untouched> {
    let before = Untouched::read(fd)?;
    make_deaf(fd)?;
    if let Err(e) = set_repair_in(fd, RepairMode::On, "dump") {
        rollback(fd, before.reuseaddr, before.peek_off, false);
        return Err(e);
    }
    Ok(before)
}

/// Put a socket whose dump failed back into live operation. Errors here are logged, not
/// returned: the dump error is the one the caller needs to see.
pub(crate) fn rollback(fd: BorrowedFd<'_>, reuseaddr: bool, peek_off: i32, repair_on: bool) {
    // Hearing first: repair off sends a window probe, which must go out unsigned.
    if let Err(e) = make_hearing(fd) {
        warn!("dump rollback: {e}");
    }
    if repair_on {
        let _ = sys::set_int(
            fd,
            libc::IPPROTO_TCP,
            sys::TCP_REPAIR_QUEUE,
            sys::TCP_NO_QUEUE,
            "rollback",
        );
        if let Err(e) = set_repair_in(fd, RepairMode::Off, "dump rollback") {
            warn!("dump rollback: {e}");
        }
    }
    let _ = sys::set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        i32::from(reuseaddr),
        "rollback",
    );
    let _ = sys::set_int(fd, libc::SOL_SOCKET, sys::SO_PEEK_OFF, peek_off, "rollback");
}

/// Where the send queue selection ends up after [`dump_frozen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendQueue {
    /// Selected before anything a transmission changes is read, and left selected: the
    /// socket is frozen and stays so (step 6).
    StaysSelected,
    /// Selected only around the two calls that need it (`TCP_QUEUE_SEQ` and the peek of
    /// the send queue), then no queue: the socket is live and only passing through
    /// repair mode for a pre-dump, whose progress marks catch any transmission.
    Briefly,
}

/// Read the complete state of a socket in repair mode (steps 3 to 8). `peek_off` is the
/// `SO_PEEK_OFF` read before repair mode was entered; the returned state carries the
/// values the socket shows now for `SO_REUSEADDR` and `SO_PEEK_OFF`, which the caller
/// replaces ([`Untouched::apply`]). `info`: the `TCP_INFO` head when the caller has just
/// read it (with a progress mark whose second reading catches any change since).
pub(crate) fn dump_frozen(
    fd: BorrowedFd<'_>,
    family: SocketFamily,
    peek_off: i32,
    send_queue: SendQueue,
    info: Option<sys::TcpInfoHead>,
) -> Result<TcpConnState> {
    let info = match info {
        Some(info) => info,
        None => sys::tcp_info_head(fd, "dump: TCP_INFO")?,
    };
    let state = match info.state {
        sys::TCP_ESTABLISHED => TcpState::Established,
        sys::TCP_FIN_WAIT1 => TcpState::FinWait1,
        sys::TCP_FIN_WAIT2 => TcpState::FinWait2,
        sys::TCP_CLOSE_WAIT => TcpState::CloseWait,
        sys::TCP_LAST_ACK => TcpState::LastAck,
        other => {
            return Err(RepairError::invalid(
                "dump: TCP_INFO",
                format!("state {} cannot be migrated", sys::state_name(other)),
            ))
        }
    };
    refuse_urgent_data(fd)?;
    let inq = sys::ioctl_int(fd, sys::SIOCINQ, "dump: SIOCINQ")? as usize;
    let options = NegotiatedOptions {
        // Read with the send queue selected (below); the clamp does not depend on it.
        mss_clamp: 0,
        sack: info.options & sys::TCPI_OPT_SACK != 0,
        wscale: (info.options & sys::TCPI_OPT_WSCALE != 0).then_some(WindowScale {
            snd: info.snd_wscale,
            rcv: info.rcv_wscale,
        }),
        timestamps: info.options & sys::TCPI_OPT_TIMESTAMPS != 0,
    };

    if peek_off >= 0 {
        sys::set_int(
            fd,
            libc::SOL_SOCKET,
            sys::SO_PEEK_OFF,
            -1,
            "dump: SO_PEEK_OFF",
        )?;
    }
    // Ends with the send queue selected, where it stays while frozen (step 6), unless
    // this is a pre-dump.
    let queues = read_queues(fd, state, inq, send_queue);
    if peek_off >= 0 {
        sys::set_int(
            fd,
            libc::SOL_SOCKET,
            sys::SO_PEEK_OFF,
            peek_off,
            "dump: SO_PEEK_OFF",
        )?;
    }
    let queues = queues?;

    let v6only = family == SocketFamily::Inet6
        && sys::get_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            "dump: IPV6_V6ONLY",
        )? != 0;
    let local = sys::local_addr(fd, "dump: getsockname")?;
    let peer = sys::peer_addr(fd, "dump: getpeername")?;
    let v4_flow = match peer {
        std::net::SocketAddr::V4(_) => true,
        std::net::SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let sockopts = sockopts::read(fd, family, v4_flow)?;

    let state = TcpConnState {
        family,
        v6only,
        local: Endpoint::from_socket_addr(local),
        peer: Endpoint::from_socket_addr(peer),
        state,
        snd_una: queues.write_seq.wrapping_sub(queues.outq),
        write_seq: queues.write_seq,
        rcv_nxt: queues.rcv_nxt,
        send_queue: queues.send,
        send_unsent: queues.send_unsent,
        recv_queue: queues.recv,
        options: NegotiatedOptions {
            mss_clamp: queues.mss_clamp,
            ..options
        },
        timestamp: queues.timestamp,
        window: queues.window,
        sockopts,
    };
    state
        .validate()
        .map_err(|e| RepairError::invalid("dump: consistency", e.to_string()))?;
    Ok(state)
}

/// Urgent (out-of-band) data cannot be restored: no API sets urg_seq/urg_data. An OOB
/// peek works even in repair mode (MSG_OOB is handled before the repair check): it
/// returns the byte when urgent data is pending, EAGAIN when the urgent pointer has been
/// seen but the byte has not arrived yet, EINVAL when there is none.
fn refuse_urgent_data(fd: BorrowedFd<'_>) -> Result<()> {
    let mut byte = [0u8; 1];
    match sys::recv(
        fd,
        &mut byte,
        libc::MSG_OOB | libc::MSG_PEEK | libc::MSG_DONTWAIT,
    ) {
        Ok(0) | Err(Errno::EINVAL) => {}
        Ok(_) | Err(Errno::EAGAIN) => {
            return Err(RepairError::invalid(
                "dump: urgent data",
                "pending urgent (out-of-band) data cannot be migrated",
            ))
        }
        Err(e) => return Err(RepairError::sys("dump: MSG_OOB peek", e)),
    }
    if sys::ioctl_int(fd, sys::SIOCATMARK, "dump: SIOCATMARK")? != 0 {
        return Err(RepairError::invalid(
            "dump: urgent data",
            "socket is at an urgent mark; urgent data cannot be migrated",
        ));
    }
    Ok(())
}

/// What is read with a queue selected (steps 4 and 5 of the module comment).
struct Queues {
    rcv_nxt: u32,
    /// SIOCOUTQ: write_seq − snd_una, our FIN included.
    outq: u32,
    write_seq: u32,
    recv: Vec<u8>,
    send: Vec<u8>,
    send_unsent: u32,
    mss_clamp: u32,
    timestamp: u32,
    window: Option<RepairWindow>,
}

fn select_queue(fd: BorrowedFd<'_>, queue: i32, step: &'static str) -> Result<()> {
    sys::set_int(fd, libc::IPPROTO_TCP, sys::TCP_REPAIR_QUEUE, queue, step)
}

/// Peek up to `len` bytes into a new buffer of that capacity (not zeroed first: the
/// kernel writes what it reports, and zeroing a buffer per queue costs more than the
/// peek itself). Returns the buffer, holding what was copied, and what the kernel
/// returned, which for the send queue may be larger (E18).
fn peek(fd: BorrowedFd<'_>, len: usize, step: &'static str) -> Result<(Vec<u8>, usize)> {
    let mut buf = Vec::with_capacity(len);
    let room = buf.capacity();
    match sys::recv_uninit(
        fd,
        buf.spare_capacity_mut(),
        libc::MSG_PEEK | libc::MSG_DONTWAIT,
    ) {
        Ok(reported) => {
            // SAFETY: the kernel initialised the first min(reported, room) bytes of the
            // spare capacity, which is `room` bytes long (it copies at most the buffer
            // length; `reported` may exceed it for the repair send-queue peek, E18).
            unsafe { buf.set_len(reported.min(room)) };
            Ok((buf, reported))
        }
        // An empty receive queue peeks as EAGAIN (E4).
        Err(Errno::EAGAIN) => Ok((buf, 0)),
        Err(e) => Err(RepairError::sys(step, e)),
    }
}

fn read_queues(
    fd: BorrowedFd<'_>,
    state: TcpState,
    inq: usize,
    send_queue: SendQueue,
) -> Result<Queues> {
    let frozen = send_queue == SendQueue::StaysSelected;
    select_queue(fd, sys::TCP_RECV_QUEUE, "dump: TCP_REPAIR_QUEUE(recv)")?;
    let rcv_nxt = sys::get::<u32>(
        fd,
        libc::IPPROTO_TCP,
        sys::TCP_QUEUE_SEQ,
        "dump: TCP_QUEUE_SEQ(recv)",
    )?;
    // One byte of room beyond SIOCINQ, so that a queue that grew shows as a mismatch.
    let (recv, got) = peek(fd, inq + 1, "dump: peek(recv)")?;
    if got != inq {
        return Err(RepairError::invalid(
            "dump: peek(recv)",
            format!("peeked {got} bytes but SIOCINQ says {inq}"),
        ));
    }

    // Frozen: from here on nothing leaves (step 6), so what follows is final. Pre-dump:
    // no queue while the lengths are read, so that a transmission in the meantime is a
    // real one (and moves the progress mark) rather than data silently marked sent.
    select_queue(
        fd,
        if frozen {
            sys::TCP_SEND_QUEUE
        } else {
            sys::TCP_NO_QUEUE
        },
        "dump: TCP_REPAIR_QUEUE(send)",
    )?;
    let outq = sys::ioctl_int(fd, sys::SIOCOUTQ, "dump: SIOCOUTQ")? as u32;
    let nsd = sys::ioctl_int(fd, sys::SIOCOUTQNSD, "dump: SIOCOUTQNSD")? as u32;
    // Our FIN takes one sequence number; SIOCOUTQ and SIOCOUTQNSD count it while it is
    // unacknowledged / unsent. Data bytes are what remains.
    let fin_in = |n: u32| u32::from(state.fin_sent() && n > 0);
    let send_len = (outq - fin_in(outq)) as usize;
    let send_unsent = nsd - fin_in(nsd);

    if !frozen {
        select_queue(fd, sys::TCP_SEND_QUEUE, "dump: TCP_REPAIR_QUEUE(send)")?;
    }
    let write_seq = sys::get::<u32>(
        fd,
        libc::IPPROTO_TCP,
        sys::TCP_QUEUE_SEQ,
        "dump: TCP_QUEUE_SEQ(send)",
    )?;
    // Peek into a buffer of exactly the expected size: the kernel reports the whole
    // queue length even when the buffer is smaller (E18), so a partially acked head (E21)
    // shows up as a larger return value, and only then is a second, larger peek needed.
    let (mut send, mut got) = peek(fd, send_len.max(1), "dump: peek(send)")?;
    if got > send.capacity() {
        (send, got) = peek(fd, got, "dump: peek(send)")?;
        if got > send.capacity() {
            return Err(RepairError::invalid(
                "dump: peek(send)",
                format!("send queue kept growing ({got} bytes) while frozen"),
            ));
        }
    }
    if got < send_len {
        return Err(RepairError::invalid(
            "dump: peek(send)",
            format!("peeked {got} bytes but SIOCOUTQ says {send_len} data bytes"),
        ));
    }
    if !frozen {
        select_queue(fd, sys::TCP_NO_QUEUE, "dump: TCP_REPAIR_QUEUE(none)")?;
    }
    // Bytes in front of snd_una that the kernel has not trimmed yet (E21).
    let acked_head = got - send_len;
    send.drain(..acked_head);

    let mss_clamp =
        sys::get_int(fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG, "dump: TCP_MAXSEG")? as u32;
    let timestamp = sys::get::<u32>(
        fd,
        libc::IPPROTO_TCP,
        sys::TCP_TIMESTAMP,
        "dump: TCP_TIMESTAMP",
    )?;
    let window = match sys::get::<TcpRepairWindow>(
        fd,
        libc::IPPROTO_TCP,
        sys::TCP_REPAIR_WINDOW,
        "dump: TCP_REPAIR_WINDOW",
    ) {
        Ok(w) => Some(RepairWindow {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        }),
        // Kernels before 4.8 have no window repair: restore then falls back to a probe.
        Err(RepairError::Sys {
            errno: Errno::ENOPROTOOPT,
            ..
        }) => None,
        Err(e) => return Err(e),
    };
    Ok(Queues {
        rcv_nxt,
        outq,
        write_seq,
        recv,
        send,
        send_unsent: send_unsent.min(send_len as u32),
        mss_clamp,
        timestamp,
        window,
    })
}

/// See [`crate::thaw`].
pub fn thaw(fd: BorrowedFd<'_>) -> Result<()> {
    // Before repair off: its window probe must go out unsigned, and its answer be heard.
    make_hearing(fd)?;
    // Selecting no queue needs repair mode; a socket that is not in repair is fine.
    match sys::set_int(
        fd,
        libc::IPPROTO_TCP,
        sys::TCP_REPAIR_QUEUE,
        sys::TCP_NO_QUEUE,
        "thaw: TCP_REPAIR_QUEUE",
    ) {
        Ok(())
        | Err(RepairError::Sys {
            errno: Errno::EPERM,
            ..
        }) => {}
        Err(e) => return Err(e),
    }
    set_repair_in(fd, RepairMode::Off, "thaw")
}
