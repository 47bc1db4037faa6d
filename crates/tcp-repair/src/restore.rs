//! Restore: rebuild a dumped connection in a fresh socket.
//!
//! Theory of operation (reference `tcp-repair.md` §1.1 and §2.4):
//!
//! ```text
//!  pre-bind   IPV6_V6ONLY, IP_TRANSPARENT if the owner set FREEBIND (a source address
//!             that arrives later), SO_MARK (route lookup), SO_*BUFFORCE (queue room),
//!             TCP_MAXSEG = clamp, at most 32767 (else mss_cache stays 524 after
//!             restore, E14; see "Segment size" below)
//!  repair on  before bind: SK_FORCE_REUSE lets us bind next to a listener
//!  bind       local address
//!  seqs       TCP_QUEUE_SEQ(recv) and (send): only possible in CLOSE, i.e. before connect
//!  connect    in repair: no SYN, straight to ESTABLISHED (needs a route)
//!  options    TCP_REPAIR_OPTIONS at once (refused once anything was sent), TCP_TIMESTAMP
//!             after connect (connect re-derives the µs flag from the route, E12)
//!  recv queue written with the receive queue selected, in chunks
//!  sent part  the sent-but-unacked bytes, written with the send queue selected: queued
//!             and marked sent, not transmitted, so SND.NXT is exactly the source's
//!  our FIN    if the source had transmitted it: shutdown(SHUT_WR), send queue selected,
//!             which marks it sent as well (the state becomes FIN_WAIT1)
//!  window     TCP_REPAIR_WINDOW, only after the receive queue (rcv_wup <= rcv_nxt check)
//!  repair off NO_QUEUE first; then OFF *with* the window probe (also when the window was
//!             restored): in ESTABLISHED the kernel sends an ACK with seq SND.UNA-1 and
//!             accepts the next window unconditionally; the peer answers at once with
//!             its current ACK and window
//!  unsent     the never-transmitted tail, as ordinary data: it goes out at once.
//!             Non-blocking: what does not fit is left to the caller (see the report)
//!  our FIN    if it was not transmitted yet: shutdown(SHUT_WR) once all data is
//!             written; else the caller sends it
//!  options    SO_REUSEADDR (repair off cleared it), SO_PEEK_OFF, keepalive, ...
//! ```
//!
//! Why the sent part is restored as sent. In a migration the peer usually *has* the
//! bytes that were in flight at the dump: its ACKs went to the frozen source, which
//! never saw them. Linux discards an ACK beyond SND.NXT as an "ACK of unsent data"
//! (`tcp_ack`, SKB_DROP_REASON_TCP_ACK_UNSENT_DATA), together with any data in that
//! segment. An earlier version (reference E25) wrote the whole send queue as fresh data
//! after repair off, so that lost in-flight bytes would go out at once instead of
//! waiting for a retransmission timer. But then SND.NXT starts at SND.UNA and the
//! resend is limited to one initial congestion window (10 segments); when more than
//! that was in flight, every answer of the peer (ACK = its RCV.NXT, further ahead) is
//! discarded, the congestion window never opens and the connection stalls for good.
//! (E25 measured less than one window in flight, which the first burst covers.) With
//! the sent part marked sent, SND.NXT covers everything the peer can have: the answer
//! to the window probe is accepted at once (SND.UNA jumps to the peer's RCV.NXT), and
//! the unsent tail follows. If that answer cannot reach us (the address has not moved
//! yet), the peer's next segment or our tail-loss probe brings the same ACK later.
//! In-flight bytes the peer really lost wait for a timer of a socket with no RTT
//! estimate: the tail-loss probe after 1 s, which is enough for one lost segment;
//! with more, the probe's resend of the last one does not count for loss detection
//! (restored segments count as retransmitted, RACK has no RTT yet) and the hole waits
//! for the 3 s fallback RTO, about 4.2 s in all (`kernel_facts_inflight` measures
//! both). That is the rarer case, and it recovers by itself.
//!
//! Segment size. connect() in repair mode computes `mss_cache` from the default clamp
//! (536) and `TCP_REPAIR_OPTIONS` does not recompute it, so without a preset every
//! segment of a restored socket is 524 bytes until an ACK raises the window above the
//! restored maximum (reference §3.7). `TCP_MAXSEG` before connect fixes that, but it
//! takes at most 32767 (`MAX_TCP_WINDOW`): a path with a larger MTU (loopback: 65536)
//! gets 32767 then, not nothing. `TCP_REPAIR_OPTIONS` puts the true clamp back, so the
//! next resynchronisation reaches the full size. The size matters beyond throughput:
//! the sent part is queued in segments of `mss_cache`, and the tail-loss probe resends
//! only the *last* segment; if the peer lost a sent part of several segments, that one
//! lands in its out-of-order queue and the rest waits for the retransmission timeout
//! (3 s, then backing off). At 524 bytes a lost 4 KiB was 8 segments and waited 3 s;
//! at the right size it is one, and the probe after 1 s recovers it
//! (`tests/lost_sent_part.rs`).
//!
//! Our FIN. When the source had transmitted it, the peer may have acknowledged it too,
//! so it is marked sent in repair mode for the same reason as the data. That leaves the
//! socket in FIN_WAIT1 at repair off, where the kernel sends no window probe; the
//! acknowledgement then comes with the peer's next segment or after the tail-loss probe
//! retransmits the FIN. Nothing waits for it: our side of the stream is finished, and
//! every segment of the peer is accepted meanwhile. The dump cannot tell "FIN sent" from
//! "only the FIN unsent" (`send_unsent` counts data bytes), so both are restored as sent:
//! a FIN marked sent that the peer lacks is retransmitted by the timer, whereas a FIN
//! the peer has but SND.NXT does not cover would get every answer discarded until it
//! goes out.
//!
//! A received FIN (CLOSE_WAIT, LAST_ACK) cannot be put back without forging a segment
//! through a raw socket (CAP_NET_RAW, which the helper does not hold). The documented
//! approximation: place the receive queue so that `rcv_nxt` includes the FIN (the
//! queued bytes sit one sequence number later than they did on the wire, which nothing
//! observes: they are already acknowledged), so our ACKs keep covering the FIN; then
//! `shutdown(SHUT_RD)` so the owner reads the queued data and then end-of-file. The
//! socket's state is ESTABLISHED (resp. FIN_WAIT1 after our FIN) rather than CLOSE_WAIT
//! (LAST_ACK); after our FIN is acknowledged it waits in FIN_WAIT2 for a FIN the peer
//! already sent, until the orphan timeout (tcp_fin_timeout) once closed.

use std::os::fd::BorrowedFd;

use baton_proto::repair::{RepairMode, RestoreReport};
use baton_proto::tcp::{SocketFamily, TcpConnState};
use nix::errno::Errno;
use tracing::warn;

use crate::error::{RepairError, Result};
use crate::sys::{self, TcpRepairOpt, TcpRepairWindow};
use crate::{set_repair_in, sockopts};

/// `tcp_send_rcvq` takes at most 17 pages plus the linear part per call (69632 bytes
/// with 4 KiB pages, E11); it returns short counts beyond that.
const RECV_CHUNK: usize = 64 << 10;
/// Smallest chunk tried after ENOBUFS/ENOMEM before giving up.
const RECV_CHUNK_MIN: usize = 1024;
/// Headroom added to forced buffer sizes beyond the queue bytes.
const BUF_SLACK: usize = 256 << 10;
/// `TCP_MAXSEG` accepts 88 ..= 32767 (`TCP_MIN_MSS ..= MAX_TCP_WINDOW`, E3).
const MAXSEG_MIN: u32 = 88;
const MAXSEG_MAX: u32 = 32767;

/// See [`crate::restore`].
pub fn restore(fd: BorrowedFd<'_>, s: &TcpConnState) -> Result<RestoreReport> {
    restore_as(fd, sys::family(fd, "restore: SO_DOMAIN")?, s)
}

/// See [`crate::restore_as`]: `family` is the socket's, as its validation found it.
pub fn restore_as(
    fd: BorrowedFd<'_>,
    family: SocketFamily,
    s: &TcpConnState,
) -> Result<RestoreReport> {
    s.validate()
        .map_err(|e| RepairError::invalid("restore: state", e.to_string()))?;
    if family != s.family {
        return Err(RepairError::invalid(
            "restore: socket family",
            format!("socket is {family:?}, state is {:?}", s.family),
        ));
    }
    pre_bind(fd, s)?;
    set_repair_in(fd, RepairMode::On, "restore")?;
    // On error the socket stays in repair mode: the caller closes it, and a socket
    // closed in repair mode goes silently (no FIN, no RST towards a peer that may still
    // be served by the source).
    in_repair(fd, s)?;
    // With the window probe even when the window was restored: its answer is what
    // acknowledges the in-flight bytes the peer already has (module comment).
    set_repair_in(fd, RepairMode::Off, "restore")?;
    let report = after_repair(fd, s)?;
    if let Err(e) = sockopts::apply_after_repair(fd, &s.sockopts) {
        // The connection itself is restored and live; an option the target host refuses
        // (a congestion module that is not loaded, say) should not kill it. Say so.
        warn!(
            "restore {} -> {}: {e}",
            s.local.to_socket_addr(),
            s.peer.to_socket_addr()
        );
    }
    Ok(report)
}

fn pre_bind(fd: BorrowedFd<'_>, s: &TcpConnState) -> Result<()> {
    use libc::SOL_SOCKET;
    if s.family == SocketFamily::Inet6 {
        sys::set_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            i32::from(s.v6only),
            "restore: IPV6_V6ONLY",
        )?;
    }
    allow_foreign_source(fd, s.family)?;
    if s.sockopts.mark != 0 {
        sys::set_int(
            fd,
            SOL_SOCKET,
            libc::SO_MARK,
            s.sockopts.mark as i32,
            "restore: SO_MARK",
        )?;
    }
    // Room for the queues: the receive queue is written in repair mode against
    // sk_rcvbuf; the send queue against sk_sndbuf, its sent part in repair mode (where
    // no ACK frees memory, so all of it must fit at once) and its unsent tail after
    // repair off. Forcing (needs CAP_NET_ADMIN) goes past net.core.*mem_max, which is
    // as small as 208 KiB on many distributions while autotuned queues reach 4 MiB and
    // more.
    let want_snd = (s.send_queue.len() + BUF_SLACK).max(s.sockopts.sndbuf as usize / 2);
    let want_rcv = (s.recv_queue.len() + BUF_SLACK).max(s.sockopts.rcvbuf as usize / 2);
    sys::set_int(
        fd,
        SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        clamp_i32(want_snd),
        "restore: SO_SNDBUFFORCE",
    )?;
    sys::set_int(
        fd,
        SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        clamp_i32(want_rcv),
        "restore: SO_RCVBUFFORCE",
    )?;
    if let Some(mss) = preset_mss(s.options.mss_clamp) {
        sys::set_int(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            mss as i32,
            "restore: TCP_MAXSEG",
        )?;
    }
    Ok(())
}

/// The `TCP_MAXSEG` to set before connect for a dumped clamp (module comment, "Segment
/// size"): the clamp, or the largest value the kernel takes when the clamp is larger.
/// None below the smallest it takes (no real path has such a clamp; the kernel's own
/// minimum then applies).
fn preset_mss(clamp: u32) -> Option<u32> {
    (clamp >= MAXSEG_MIN).then_some(clamp.min(MAXSEG_MAX))
}

/// A socket its owner marked `IP_FREEBIND`/`IPV6_FREEBIND` may carry an address this
/// host does not have yet (a migration target before the address has moved). Freebind
/// lets the bind through, but the repair `connect` then finds no route from a foreign
/// source (ENETUNREACH, reference E6) unless the socket is also transparent, which only
/// the helper may set (CAP_NET_ADMIN). Other sockets are left alone.
fn allow_foreign_source(fd: BorrowedFd<'_>, family: SocketFamily) -> Result<()> {
    let (level, freebind, transparent, step) = match family {
        SocketFamily::Inet => (
            libc::IPPROTO_IP,
            libc::IP_FREEBIND,
            libc::IP_TRANSPARENT,
            "restore: IP_TRANSPARENT",
        ),
        SocketFamily::Inet6 => (
            libc::IPPROTO_IPV6,
            libc::IPV6_FREEBIND,
            libc::IPV6_TRANSPARENT,
            "restore: IPV6_TRANSPARENT",
        ),
    };
    if sys::get_int(fd, level, freebind, "restore: FREEBIND")? == 0 {
        return Ok(());
    }
    sys::set_int(fd, level, transparent, 1, step)
}

fn clamp_i32(v: usize) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn select_queue(fd: BorrowedFd<'_>, queue: i32, step: &'static str) -> Result<()> {
    sys::set_int(fd, libc::IPPROTO_TCP, sys::TCP_REPAIR_QUEUE, queue, step)
}

fn in_repair(fd: BorrowedFd<'_>, s: &TcpConnState) -> Result<()> {
    use libc::IPPROTO_TCP;
    sys::bind(fd, &s.local.to_socket_addr(), "restore: bind")?;

    // With a received FIN, rcv_nxt includes it; see the module comment.
    let recv_start = s.rcv_nxt.wrapping_sub(s.recv_queue.len() as u32);
    select_queue(fd, sys::TCP_RECV_QUEUE, "restore: TCP_REPAIR_QUEUE(recv)")?;
    sys::set::<u32>(
        fd,
        IPPROTO_TCP,
        sys::TCP_QUEUE_SEQ,
        &recv_start,
        "restore: TCP_QUEUE_SEQ(recv)",
    )?;
    select_queue(fd, sys::TCP_SEND_QUEUE, "restore: TCP_REPAIR_QUEUE(send)")?;
    sys::set::<u32>(
        fd,
        IPPROTO_TCP,
        sys::TCP_QUEUE_SEQ,
        &s.send_queue_start(),
        "restore: TCP_QUEUE_SEQ(send)",
    )?;

    sys::connect(fd, &s.peer.to_socket_addr(), "restore: connect")?;

    let mut opts = Vec::with_capacity(4);
    opts.push(TcpRepairOpt {
        opt_code: sys::TCPOPT_MSS,
        opt_val: s.options.mss_clamp,
    });
    if s.options.sack {
        opts.push(TcpRepairOpt {
            opt_code: sys::TCPOPT_SACK_PERM,
            opt_val: 0,
        });
    }
    if let Some(ws) = s.options.wscale {
        opts.push(TcpRepairOpt {
            opt_code: sys::TCPOPT_WINDOW,
            opt_val: u32::from(ws.snd) | (u32::from(ws.rcv) << 16),
        });
    }
    if s.options.timestamps {
        opts.push(TcpRepairOpt {
            opt_code: sys::TCPOPT_TIMESTAMP,
            opt_val: 0,
        });
    }
    sys::set_slice(
        fd,
        IPPROTO_TCP,
        sys::TCP_REPAIR_OPTIONS,
        &opts,
        "restore: TCP_REPAIR_OPTIONS",
    )?;
    if s.options.timestamps {
        sys::set::<u32>(
            fd,
            IPPROTO_TCP,
            sys::TCP_TIMESTAMP,
            &s.timestamp,
            "restore: TCP_TIMESTAMP",
        )?;
    }

    if !s.recv_queue.is_empty() {
        select_queue(fd, sys::TCP_RECV_QUEUE, "restore: TCP_REPAIR_QUEUE(recv)")?;
        write_recv_queue(fd, &s.recv_queue)?;
    }

    let sent = s.send_queue.len() - s.send_unsent as usize;
    if sent > 0 || fin_marked_sent(s) {
        select_queue(fd, sys::TCP_SEND_QUEUE, "restore: TCP_REPAIR_QUEUE(send)")?;
        write_sent_part(fd, &s.send_queue[..sent])?;
        if fin_marked_sent(s) {
            sys::shutdown(fd, libc::SHUT_WR, "restore: shutdown(SHUT_WR) in repair")?;
        }
    }

    if let Some(w) = s.window {
        let w = TcpRepairWindow {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        };
        sys::set(
            fd,
            IPPROTO_TCP,
            sys::TCP_REPAIR_WINDOW,
            &w,
            "restore: TCP_REPAIR_WINDOW",
        )?;
    }
    select_queue(fd, sys::TCP_NO_QUEUE, "restore: TCP_REPAIR_QUEUE(none)")
}

fn write_recv_queue(fd: BorrowedFd<'_>, data: &[u8]) -> Result<()> {
    let mut chunk = RECV_CHUNK;
    let mut off = 0;
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        match sys::send(fd, &data[off..end], libc::MSG_DONTWAIT) {
            Ok(0) => {
                return Err(RepairError::invalid(
                    "restore: receive queue",
                    format!("kernel accepted 0 bytes at offset {off} of {}", data.len()),
                ))
            }
            Ok(n) => off += n,
            Err(Errno::EINTR) => {}
            Err(Errno::ENOBUFS | Errno::ENOMEM) if chunk > RECV_CHUNK_MIN => chunk /= 2,
            Err(e) => return Err(RepairError::sys("restore: send(recv queue)", e)),
        }
    }
    Ok(())
}

/// Our FIN was transmitted by the source (or, indistinguishably, it is the only thing
/// left unsent): restore it as sent, in repair mode. See the module comment.
fn fin_marked_sent(s: &TcpConnState) -> bool {
    s.state.fin_sent() && s.send_unsent == 0
}

/// The sent-but-unacked part, with the send queue selected: the kernel queues it and
/// marks it sent without transmitting it (reference §1 row 7), whatever the congestion
/// or send window. No ACK can free memory in repair mode, so a short write is final:
/// `pre_bind` sized the send buffer for the whole queue, and if it still does not fit
/// the restore fails rather than restoring a SND.NXT short of what the peer may have.
fn write_sent_part(fd: BorrowedFd<'_>, data: &[u8]) -> Result<()> {
    let mut off = 0;
    while off < data.len() {
        match sys::send(fd, &data[off..], libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Ok(0) | Err(Errno::EAGAIN) => {
                return Err(RepairError::invalid(
                    "restore: send queue (sent part)",
                    format!(
                        "only {off} of {} sent-unacked bytes fit into the send buffer",
                        data.len()
                    ),
                ))
            }
            Ok(n) => off += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(RepairError::sys("restore: send(sent part)", e)),
        }
    }
    Ok(())
}

fn after_repair(fd: BorrowedFd<'_>, s: &TcpConnState) -> Result<RestoreReport> {
    if s.sockopts.nodelay {
        // Before the writes: the tail of the queue should not wait for Nagle.
        sys::set_int(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            1,
            "restore: TCP_NODELAY",
        )?;
    }
    // The sent part is in the socket already (written in repair mode).
    let mut written = s.send_queue.len() - s.send_unsent as usize;
    while written < s.send_queue.len() {
        match sys::send(
            fd,
            &s.send_queue[written..],
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        ) {
            Ok(n) => written += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(e) => return Err(RepairError::sys("restore: send(unsent part)", e)),
        }
    }
    let all_written = written == s.send_queue.len();
    let fin_to_send = s.state.fin_sent() && !fin_marked_sent(s);
    if fin_to_send && all_written {
        sys::shutdown(fd, libc::SHUT_WR, "restore: shutdown(SHUT_WR)")?;
    }
    if s.state.fin_received() {
        sys::shutdown(fd, libc::SHUT_RD, "restore: shutdown(SHUT_RD)")?;
    }
    Ok(RestoreReport {
        send_queue_written: written as u64,
        fin_pending: fin_to_send && !all_written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mss_preset_is_the_clamp_within_what_tcp_maxseg_takes() {
        assert_eq!(preset_mss(1460), Some(1460));
        assert_eq!(preset_mss(MAXSEG_MIN), Some(MAXSEG_MIN));
        assert_eq!(preset_mss(MAXSEG_MAX), Some(MAXSEG_MAX));
        // Loopback (MTU 65536): the largest value TCP_MAXSEG takes, not nothing.
        assert_eq!(preset_mss(65483), Some(MAXSEG_MAX));
        assert_eq!(preset_mss(MAXSEG_MIN - 1), None);
        assert_eq!(preset_mss(0), None);
    }
}
