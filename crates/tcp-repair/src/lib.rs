//! `baton-tcp-repair`: the TCP_REPAIR operations `baton-repair` runs on sockets it was
//! handed. Linux only. The repair toggles need `CAP_NET_ADMIN` in the user namespace that
//! owns the socket's network namespace; large queues also use `SO_*BUFFORCE` (same
//! capability). Nothing else is privileged: the freeze itself ([`make_deaf`], a TCP-MD5
//! key) needs no capability, except on a kernel without TCP-MD5, where it falls back to a
//! socket filter.
//!
//! What it is not: it knows nothing of the helper protocol framing or of the backend's
//! flows. It turns one socket into one [`TcpConnState`] and back.

mod deaf;
mod dump;
pub mod error;
mod filter;
mod md5;
mod predump;
mod restore;
mod sockopts;
mod sys;
mod validate;

use std::os::fd::BorrowedFd;

use baton_proto::repair::{FreezeCheck, PreDumped, ProgressMark, RepairMode, RestoreReport};
use baton_proto::tcp::{SocketFamily, TcpConnState};

pub use deaf::Deafness;
pub use error::{RepairError, Result};

/// What a socket handed to the helper must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A connected TCP socket (Dump, Thaw, SetRepair): any state but LISTEN and CLOSE.
    Connected,
    /// A fresh TCP socket for Restore: state CLOSE, not bound, not connected.
    Fresh,
}

/// Check that `fd` is a plain TCP socket of the expected kind: a socket, domain
/// AF_INET or AF_INET6, type SOCK_STREAM, protocol IPPROTO_TCP (MPTCP is refused), no
/// upper-layer protocol (kTLS) attached, in the network namespace whose cookie is
/// `netns_cookie` when given. Returns the socket's family.
pub fn validate_tcp_socket(
    fd: BorrowedFd<'_>,
    expect: Expect,
    netns_cookie: Option<u64>,
) -> Result<SocketFamily> {
    validate::validate_tcp_socket(fd, expect, netns_cookie)
}

/// The `SO_NETNS_COOKIE` of any socket (identifies its network namespace).
pub fn netns_cookie(fd: BorrowedFd<'_>) -> Result<u64> {
    validate::netns_cookie_of(fd)
}

/// Freeze the connection and read its complete state. Freezing = make it deaf
/// ([`make_deaf`]: the kernel stops processing, hence acknowledging, incoming segments)
/// and then enter repair mode, with the send queue selected (so that its timers cannot
/// transmit new data beyond the dumped state). On success the socket stays frozen; on
/// error it is rolled back to live (hearing again, repair off).
pub fn dump(fd: BorrowedFd<'_>) -> Result<TcpConnState> {
    dump::dump(fd)
}

/// [`dump`] of a socket whose family the caller already knows (from
/// [`validate_tcp_socket`]): one system call less per socket.
pub fn dump_as(fd: BorrowedFd<'_>, family: SocketFamily) -> Result<TcpConnState> {
    dump::dump_as(fd, family)
}

/// The connection's progress mark: `tcpi_state`, `tcpi_segs_in`, `tcpi_segs_out`,
/// `SIOCINQ`, `SIOCOUTQ`. Unprivileged. Two equal marks of one connection mean that
/// nothing in its dumpable state moved in between except the TCP timestamp clock and
/// `SO_PEEK_OFF` (the reasoning is in the `predump` module).
pub fn progress_mark(fd: BorrowedFd<'_>) -> Result<ProgressMark> {
    predump::progress_mark(fd)
}

/// Read the complete state of a *live* connection without freezing it: repair mode only
/// while reading (left without a window probe), never deaf; `SO_REUSEADDR` and
/// `SO_PEEK_OFF` are put back. `Ok(None)` when the connection moved while it was read
/// (its progress mark differs before and after). The caller must do no I/O on the
/// socket meanwhile. On error the socket is live and out of repair mode as far as the
/// kernel allowed.
pub fn pre_dump_as(fd: BorrowedFd<'_>, family: SocketFamily) -> Result<Option<PreDumped>> {
    predump::pre_dump_as(fd, family)
}

/// [`pre_dump_as`] of a socket whose family is read first.
pub fn pre_dump(fd: BorrowedFd<'_>) -> Result<Option<PreDumped>> {
    pre_dump_as(fd, sys::family(fd, "pre-dump: SO_DOMAIN")?)
}

/// Freeze the connection exactly as [`dump`] does, then compare its progress mark with
/// `mark` (from a pre-dump): equal → [`FreezeCheck::Unchanged`] with the fresh TCP
/// timestamp clock and `SO_PEEK_OFF`; different → [`FreezeCheck::Dumped`] with the
/// complete state. Either way the socket ends frozen as after [`dump`]; on error it is
/// rolled back to live.
pub fn freeze_check_as(
    fd: BorrowedFd<'_>,
    family: SocketFamily,
    mark: &ProgressMark,
) -> Result<FreezeCheck> {
    predump::freeze_check_as(fd, family, mark)
}

/// [`freeze_check_as`] of a socket whose family is read first.
pub fn freeze_check(fd: BorrowedFd<'_>, mark: &ProgressMark) -> Result<FreezeCheck> {
    freeze_check_as(fd, sys::family(fd, "freeze check: SO_DOMAIN")?, mark)
}

/// Undo [`dump`]: hear again ([`make_hearing`], first: the window probe must go out
/// unsigned and its answer be heard), select no queue, leave repair mode with a window
/// probe, and put back `SO_REUSEADDR`/`SO_PEEK_OFF` as the dump found them.
pub fn thaw(fd: BorrowedFd<'_>) -> Result<()> {
    dump::thaw(fd)
}

/// Rebuild `state` in the fresh socket `fd` (same family as the state). On return the
/// socket is out of repair mode and live. The sent-but-unacked part of the send queue is
/// in the socket, marked sent (all of it, or the restore fails); the unsent tail was
/// written after repair off as far as it would go without blocking: the report's
/// `send_queue_written` counts both, and the caller still owns the rest.
pub fn restore(fd: BorrowedFd<'_>, state: &TcpConnState) -> Result<RestoreReport> {
    restore::restore(fd, state)
}

/// [`restore`] into a socket whose family the caller already knows (from
/// [`validate_tcp_socket`]): one system call less per socket. A state of another
/// family is refused.
pub fn restore_as(
    fd: BorrowedFd<'_>,
    family: SocketFamily,
    state: &TcpConnState,
) -> Result<RestoreReport> {
    restore::restore_as(fd, family, state)
}

/// Set `TCP_REPAIR` to `mode`. Leaving repair mode first selects no queue again, so
/// that no stale queue selection survives (reference E16).
pub fn set_repair(fd: BorrowedFd<'_>, mode: RepairMode) -> Result<()> {
    if mode != RepairMode::On {
        // Fails with EPERM when the socket is not in repair mode: nothing to clear then.
        let _ = sys::set_int(
            fd,
            libc::IPPROTO_TCP,
            sys::TCP_REPAIR_QUEUE,
            sys::TCP_NO_QUEUE,
            "",
        );
    }
    set_repair_in(fd, mode, "set-repair")
}

/// `TCP_REPAIR` as a step of operation `op` (for error messages such as
/// "restore: TCP_REPAIR(on): EPERM").
pub(crate) fn set_repair_in(fd: BorrowedFd<'_>, mode: RepairMode, op: &str) -> Result<()> {
    let (value, what) = match mode {
        RepairMode::On => (sys::TCP_REPAIR_ON, "TCP_REPAIR(on)"),
        RepairMode::Off => (sys::TCP_REPAIR_OFF, "TCP_REPAIR(off)"),
        RepairMode::OffNoWindowProbe => (sys::TCP_REPAIR_OFF_NO_WP, "TCP_REPAIR(off-no-wp)"),
    };
    sys::set_int(fd, libc::IPPROTO_TCP, sys::TCP_REPAIR, value, what).map_err(|e| match e {
        RepairError::Sys { errno, .. } => RepairError::sys(format!("{op}: {what}"), errno),
        other => other,
    })
}

/// Make the socket deaf: every segment from its peer is dropped before TCP processes
/// it — no ACK, no queueing, no state change, nothing counted in `tcpi_segs_in`; the
/// peer retransmits later. A TCP-MD5 key for the peer's address that the peer does not
/// have (unprivileged, about 2 µs); where the kernel refuses the key, a drop-all socket
/// filter (needs `CAP_NET_ADMIN` on recent kernels), said once in the log. The socket
/// must be connected (getpeername). Returns which of the two it got. The key disables
/// GSO on the socket for the rest of its life (see the `deaf` module).
pub fn make_deaf(fd: BorrowedFd<'_>) -> Result<Deafness> {
    deaf::make_deaf(fd)
}

/// Undo [`make_deaf`], whichever way it went, or a freeze by an older helper (filter):
/// remove the key and detach the filter; either one absent is fine, so this may be
/// repeated. Unprivileged. Leave repair mode with a window probe only after this.
pub fn make_hearing(fd: BorrowedFd<'_>) -> Result<()> {
    deaf::make_hearing(fd)
}

/// Attach the drop-all socket filter itself, without trying the key first: for tests
/// that need a deaf socket whose own segments go out unsigned (a deaf *peer*). Needs
/// `CAP_NET_ADMIN` on recent kernels. [`make_hearing`] detaches it.
pub fn attach_deaf_filter(fd: BorrowedFd<'_>) -> Result<()> {
    filter::attach_deaf_filter(fd)
}
