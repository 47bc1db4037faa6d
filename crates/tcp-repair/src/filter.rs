//! The freeze primitive: a drop-all classic BPF socket filter.
//!
//! Repair mode alone does not freeze a connection: the kernel keeps processing incoming
//! segments, acknowledges and queues them (reference E5), so data arriving after a dump
//! would be acknowledged to the peer and then lost with the source socket. `tcp_v4_rcv`
//! and `tcp_v6_rcv` run the socket filter before any TCP processing; a filter that
//! returns 0 discards every segment for this socket: no ACK, no queueing, no RST. The
//! peer sees silence and retransmits later (reference E24). Any process may attach a
//! filter to a socket it holds, so this needs no privilege.

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
