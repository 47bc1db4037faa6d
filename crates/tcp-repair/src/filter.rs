//! The fallback freeze: a drop-all classic BPF socket filter.
//!
//! `tcp_v4_rcv` and `tcp_v6_rcv` run the socket filter (`tcp_filter()`) before any TCP
//! processing and before `tcp_segs_in()`; a filter that returns 0 discards every segment
//! for this socket: no ACK, no queueing, no RST. The peer sees silence and retransmits
//! later (reference E24). It is as deaf as the TCP-MD5 key (module `md5`) but costs
//! 9–12 µs per socket (the kernel JITs and vmallocs every program it is given) against
//! about 2 µs, and on recent kernels it needs `CAP_NET_ADMIN` (6.18 refuses it with EPERM
//! otherwise). So it is used only where the kernel refuses the key (module `deaf`), and
//! detached by every thaw, since an older helper froze with it.

use std::os::fd::BorrowedFd;

use nix::errno::Errno;

use crate::error::{RepairError, Result};
use crate::sys;

/// `BPF_RET | BPF_K`: return the constant `k` (0 = drop the packet).
const BPF_RET_K: u16 = 0x06;

/// Attach the drop-all filter.
pub fn attach_deaf_filter(fd: BorrowedFd<'_>) -> Result<()> {
    let program = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // The kernel copies the program during the call; `program` outlives it.
    sys::set(
        fd,
        libc::SOL_SOCKET,
        libc::SO_ATTACH_FILTER,
        &fprog,
        "freeze: SO_ATTACH_FILTER",
    )
}

/// Detach whatever filter is attached; no filter attached is fine.
pub fn detach_filter(fd: BorrowedFd<'_>) -> Result<()> {
    match sys::set_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_DETACH_FILTER,
        0,
        "thaw: SO_DETACH_FILTER",
    ) {
        Err(RepairError::Sys {
            errno: Errno::ENOENT,
            ..
        }) => Ok(()),
        other => other,
    }
}
