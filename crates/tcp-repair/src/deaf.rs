//! Deafness: the freeze primitive. A deaf socket processes no incoming segment, so it
//! acknowledges nothing, queues nothing and changes no state while it is frozen.
//!
//! Theory of operation. Repair mode alone is not a freeze: the kernel keeps processing
//! incoming segments, acknowledges and queues them (reference E5), so data arriving
//! after a dump would be acknowledged to the peer and then lost with the source socket.
//! Two mechanisms drop every segment from the peer before TCP processes it, both before
//! `tcp_segs_in()` (so a progress mark does not move, module `predump`), both without a
//! trace on the wire: the peer sees silence and retransmits later.
//! 1. A TCP-MD5 key for the peer's address (module `md5`): about 2 µs per socket, no
//!    privilege. [`make_deaf`] uses it whenever the kernel takes it.
//! 2. A drop-all socket filter (module `filter`): 9–12 µs, `CAP_NET_ADMIN` on recent
//!    kernels. Only where the kernel refuses the key (built without
//!    `CONFIG_TCP_MD5SIG`: `ENOPROTOOPT`; any other refusal too, e.g. `ENOMEM` when the
//!    socket's option memory is exhausted), said once in the log.
//!
//! [`make_hearing`] undoes both, whichever was used (and a freeze by an older helper,
//! which always used the filter): remove the key (`ENOENT`: none), detach the filter
//! (`ENOENT`: none). So undo is idempotent and needs no record of how a socket was
//! frozen.
//!
//! Order on thaw: hear *before* leaving repair mode with a window probe. While the key is
//! installed every segment this socket sends is signed; a Linux peer drops a signed
//! segment it has no key for (`TCPMD5Unexpected`), and the answer would be dropped here.
//! The probe must go out plain and its answer be heard. (What a frozen socket sends
//! otherwise does not matter: a dumped socket sends nothing, its send queue being
//! selected, and a socket frozen only for a same-host handover retransmits as it did
//! under the filter, whose answers were dropped just the same.)
//!
//! Side effect of the key, documented because it outlives the freeze: the kernel
//! allocates the socket's MD5 state on the first key and disables GSO on the socket for
//! good (`sk_gso_disable`), the key's removal notwithstanding. Only a socket that stays
//! live after a freeze feels it — a same-host handover, a source that resumes — and
//! only in bulk throughput (measured over veth: 32 → 29 Gbit/s, +10 % sender CPU). A
//! socket restored on a target is a fresh socket without a key.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use tracing::{debug, info};

use crate::error::{RepairError, Result};
use crate::{filter, md5, sys};

/// How [`make_deaf`] made a socket deaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deafness {
    /// A TCP-MD5 key for the peer's address (the usual way).
    Md5Key,
    /// The drop-all socket filter: the kernel refused the key.
    Filter,
}

/// Whether the fallback to the filter has been logged (once per process).
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// See [`crate::make_deaf`].
pub fn make_deaf(fd: BorrowedFd<'_>) -> Result<Deafness> {
    let peer = sys::peer_storage(fd, "freeze: getpeername")?;
    let refused = match md5::add(fd, &peer, md5::key()?) {
        Ok(()) => return Ok(Deafness::Md5Key),
        Err(errno) => errno,
    };
    if FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        debug!("freeze: TCP-MD5 key refused ({refused}), drop-all filter instead");
    } else {
        info!(
            "freeze: the kernel refused a TCP-MD5 key ({refused}); freezing with a drop-all \
             socket filter instead (slower, and needs CAP_NET_ADMIN on recent kernels)"
        );
    }
    filter::attach_deaf_filter(fd)
        .map(|()| Deafness::Filter)
        .map_err(|e| match e {
            RepairError::Sys { errno, .. } => RepairError::sys(
                format!("freeze: TCP_MD5SIG refused ({refused}), then SO_ATTACH_FILTER"),
                errno,
            ),
            other => other,
        })
}

/// See [`crate::make_hearing`].
pub fn make_hearing(fd: BorrowedFd<'_>) -> Result<()> {
    let key = match sys::peer_storage(fd, "thaw: getpeername") {
        Ok(peer) => match md5::remove(fd, &peer) {
            Ok(()) | Err(Errno::ENOENT | Errno::ENOPROTOOPT) => Ok(()),
            Err(errno) => Err(RepairError::sys("thaw: TCP_MD5SIG(remove)", errno)),
        },
        // Not connected any more (closed by a timeout): no key can be named, and nothing
        // can arrive for it.
        Err(RepairError::Sys {
            errno: Errno::ENOTCONN,
            ..
        }) => Ok(()),
        Err(e) => Err(e),
    };
    // Both are tried whatever the first did.
    let filter = filter::detach_filter(fd);
    key.and(filter)
}
