//! Pre-dump (read a live connection's state ahead of time) and freeze-check (freeze it
//! later and confirm with the kernel's own counters that nothing moved since).
//!
//! Theory of operation. Most of a connection's state does not change while it is idle,
//! and a migration's pre-copy phase gives time to read it while the VM still runs. At the
//! stop, freezing stays as it is (every socket is frozen and deaf exactly as after
//! [`crate::dump`]); only the reading is replaced by a handful of cheap calls, and only
//! when they prove the pre-dumped state still holds. Correctness never depends on the
//! pre-dump being fresh: any doubt means a full dump of the (already frozen) socket.
//!
//! "Nothing moved" is decided by a [`ProgressMark`]: `tcpi_state`, `tcpi_segs_in`,
//! `tcpi_segs_out` (from `TCP_INFO`), `SIOCINQ` and `SIOCOUTQ`. Why that is sufficient
//! (Linux 4.2+ source):
//! * Every incoming segment that reaches TCP increments `segs_in`: `tcp_v4_rcv` and
//!   `tcp_v6_rcv` call `tcp_segs_in()` right after `tcp_filter()` and before any TCP
//!   processing, whether the segment is processed at once or queued to the backlog. A
//!   segment a deaf socket drops (module `deaf`: the TCP-MD5 check, `tcp_inbound_hash`,
//!   runs even before `tcp_filter()`, and so does the fallback filter) changes nothing
//!   and counts nothing. Everything an incoming segment can change — `rcv_nxt`, the
//!   receive queue, `snd_una`, the peer's window (`snd_wl1`, `snd_wnd`, `max_window`),
//!   SACK and timestamp state (`ts_recent`), the state machine (a FIN, a RST) —
//!   therefore comes with a `segs_in` step.
//! * Every transmitted segment, data, pure ACK, retransmission, window or keepalive
//!   probe alike, goes through `__tcp_transmit_skb`, which increments `segs_out`.
//!   Everything a transmission changes — `snd_nxt`, our advertised window (`rcv_wnd`,
//!   `rcv_wup`) — therefore comes with a `segs_out` step.
//! * The application changes the rest: a write moves `write_seq` and `SIOCOUTQ` (and
//!   `shutdown(SHUT_WR)` the state); a read moves `SIOCINQ`. A peek moves only
//!   `SO_PEEK_OFF`, which the freeze check reads fresh. (The caller of a pre-dump does
//!   no I/O on the socket while it runs.)
//! * The TCP timestamp clock runs with time: the freeze check reads `TCP_TIMESTAMP` fresh.
//! * One transition moves no counter: with the send queue selected in repair mode,
//!   `tcp_write_xmit` marks unsent data sent without transmitting it (the frozen socket
//!   of step 6 in `dump`). The bytes are the same; only `SIOCOUTQNSD` differs, and the
//!   pre-dumped value (more unsent) is the true one, since nothing left the host.
//! * Options the kernel tunes by itself move with traffic (the send buffer grows on
//!   ACKs, the receive buffer on reads), the ones baton sets are set at connect time.
//!   Buffer sizes carried from a pre-dump could at worst be slightly stale, which costs
//!   throughput, never bytes: no acknowledged byte depends on them.
//!
//! The kernel-facts tests `tests/tests/kernel_facts_progress.rs` pin each of these
//! (idle → equal; a byte from the peer, an ACK of our data, our write, our read, a
//! keepalive probe, the peer's FIN → different).
//!
//! Pre-dump of a live socket ([`pre_dump_as`]): mark, read `SO_REUSEADDR`/`SO_PEEK_OFF`,
//! repair on, the same reads as a dump ([`dump::dump_frozen`] with
//! [`SendQueue::Briefly`]), no queue, repair off *without* a window probe, put back
//! `SO_REUSEADDR` (repair off clears it) and `SO_PEEK_OFF`, mark again. Two different
//! marks mean the connection moved while being read: no state (`None`). The send queue
//! is selected only around `TCP_QUEUE_SEQ` and the send-queue peek: during those few
//! microseconds a transmission attempt by a timer would only mark data sent (above). Its
//! data then stays unsent on the wire although the kernel thinks it sent; that needs a
//! timer to fire within that window, and is recovered like a lost segment by the
//! retransmission timer (RTO), as any dump that ends in a thaw is. The mark cannot see it
//! (no segment), so the pre-dumped `send_unsent` may be larger than what the kernel
//! believes; restoring it as unsent is right, since it never left.
//!
//! Freeze check at the stop ([`freeze_check_as`]): freeze as a dump does (deaf, repair
//! on), select the send queue (and leave it selected, as a dump does), then read the mark
//! and `TCP_TIMESTAMP`. Equal → [`FreezeCheck::Unchanged`] with the fresh timestamp and
//! the `SO_PEEK_OFF` read before freezing; different → the full dump of the frozen
//! socket ([`FreezeCheck::Dumped`]). On error the socket is rolled back to live, as a
//! failed dump is. Either way a checked socket ends exactly as after a dump, so thaw,
//! handover and close work unchanged.
//!
//! A limit shared with [`crate::dump`]: a segment that passed the MD5 check (or the
//! filter) on another CPU just before the key was installed reaches `tcp_segs_in()` a few
//! instructions later (same softirq, no sleeping in between), and repair-on, the queue
//! selection and `TCP_INFO` each take the socket lock first, so in practice the count is
//! in before the mark is read.

use std::os::fd::BorrowedFd;

use baton_proto::repair::{FreezeCheck, PreDumped, ProgressMark, RepairMode};
use baton_proto::tcp::SocketFamily;
use tracing::warn;

use crate::dump::{self, SendQueue, Untouched};
use crate::error::{RepairError, Result};
use crate::{set_repair_in, sys};

/// See [`crate::progress_mark`].
pub fn progress_mark(fd: BorrowedFd<'_>) -> Result<ProgressMark> {
    Ok(read_mark(fd)?.0)
}

/// The mark, and the `TCP_INFO` head read with it (for a dump that follows).
fn read_mark(fd: BorrowedFd<'_>) -> Result<(ProgressMark, sys::TcpInfoHead)> {
    let info = sys::tcp_info_progress(fd, "progress mark: TCP_INFO")?;
    let inq = sys::ioctl_int(fd, sys::SIOCINQ, "progress mark: SIOCINQ")?;
    let outq = sys::ioctl_int(fd, sys::SIOCOUTQ, "progress mark: SIOCOUTQ")?;
    let mark = ProgressMark {
        state: info.head.state,
        segs_in: info.segs_in,
        segs_out: info.segs_out,
        inq: inq as u32,
        outq: outq as u32,
    };
    Ok((mark, info.head))
}

/// See [`crate::pre_dump_as`].
pub fn pre_dump_as(fd: BorrowedFd<'_>, family: SocketFamily) -> Result<Option<PreDumped>> {
    pre_dump_live(fd, family).map_err(named("pre-dump"))
}

fn pre_dump_live(fd: BorrowedFd<'_>, family: SocketFamily) -> Result<Option<PreDumped>> {
    // The state and options in `info` are those of the `before` mark; if they change
    // while the state is read, the `after` mark shows it.
    let (before, info) = read_mark(fd)?;
    let untouched = Untouched::read(fd)?;
    set_repair_in(fd, RepairMode::On, "pre-dump")?;
    let read = dump::dump_frozen(
        fd,
        family,
        untouched.peek_off,
        SendQueue::Briefly,
        Some(info),
    );
    let left = leave_repair(fd, untouched);
    let state = read?;
    left?;
    let after = progress_mark(fd)?;
    if after != before {
        return Ok(None);
    }
    Ok(Some(PreDumped {
        state: untouched.apply(state),
        mark: before,
    }))
}

/// Back to live after a pre-dump, successful or not: no queue (a stale selection after
/// repair off would let an unprivileged holder read or set sequence numbers, E16), repair
/// off without a window probe (the connection was never stopped, so there is nothing to
/// announce), then what repair mode changed. Every step is tried; the first error is
/// returned.
fn leave_repair(fd: BorrowedFd<'_>, untouched: Untouched) -> Result<()> {
    let no_queue = sys::set_int(
        fd,
        libc::IPPROTO_TCP,
        sys::TCP_REPAIR_QUEUE,
        sys::TCP_NO_QUEUE,
        "pre-dump: TCP_REPAIR_QUEUE(none)",
    );
    let off = set_repair_in(fd, RepairMode::OffNoWindowProbe, "pre-dump");
    let reuse = sys::set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        i32::from(untouched.reuseaddr),
        "pre-dump: SO_REUSEADDR",
    );
    let peek = sys::set_int(
        fd,
        libc::SOL_SOCKET,
        sys::SO_PEEK_OFF,
        untouched.peek_off,
        "pre-dump: SO_PEEK_OFF",
    );
    if let Err(e) = &no_queue {
        // Repair off must still happen (and did, or failed on its own).
        warn!("{e}");
    }
    no_queue.and(off).and(reuse).and(peek)
}

/// See [`crate::freeze_check_as`].
pub fn freeze_check_as(
    fd: BorrowedFd<'_>,
    family: SocketFamily,
    mark: &ProgressMark,
) -> Result<FreezeCheck> {
    let untouched = dump::freeze(fd).map_err(named("freeze check"))?;
    check_frozen(fd, family, mark, untouched).map_err(|e| {
        dump::rollback(fd, untouched.reuseaddr, untouched.peek_off, true);
        named("freeze check")(e)
    })
}

fn check_frozen(
    fd: BorrowedFd<'_>,
    family: SocketFamily,
    mark: &ProgressMark,
    untouched: Untouched,
) -> Result<FreezeCheck> {
    // Selected first, so that no timer transmits between the mark and the end (step 6
    // of `dump`).
    sys::set_int(
        fd,
        libc::IPPROTO_TCP,
        sys::TCP_REPAIR_QUEUE,
        sys::TCP_SEND_QUEUE,
        "freeze check: TCP_REPAIR_QUEUE(send)",
    )?;
    let (now, info) = read_mark(fd)?;
    if now == *mark {
        let timestamp = sys::get::<u32>(
            fd,
            libc::IPPROTO_TCP,
            sys::TCP_TIMESTAMP,
            "freeze check: TCP_TIMESTAMP",
        )?;
        return Ok(FreezeCheck::Unchanged {
            timestamp,
            peek_off: untouched.peek_off,
        });
    }
    // `info` was read frozen, with the send queue selected: as the dump's own read.
    let state = dump::dump_frozen(
        fd,
        family,
        untouched.peek_off,
        SendQueue::StaysSelected,
        Some(info),
    )?;
    Ok(FreezeCheck::Dumped(untouched.apply(state)))
}

/// Name errors of shared steps after the operation they happened in: "dump: SIOCINQ"
/// during a pre-dump reads "pre-dump: SIOCINQ".
fn named(op: &'static str) -> impl Fn(RepairError) -> RepairError {
    move |e| {
        let rename = |step: String| match step.split_once(": ") {
            Some((_, rest)) => format!("{op}: {rest}"),
            None => format!("{op}: {step}"),
        };
        match e {
            RepairError::Sys { step, errno } => RepairError::Sys {
                step: rename(step),
                errno,
            },
            RepairError::Invalid { step, reason } => RepairError::Invalid {
                step: rename(step),
                reason,
            },
        }
    }
}
