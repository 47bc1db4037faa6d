//! Plain socket, IP and TCP options carried across a dump/restore.
//!
//! Read at dump time (no repair mode needed) and applied after the restored socket has
//! left repair mode: they do not influence the repair sequence, and `SO_REUSEADDR` must
//! be set after repair off anyway (repair off clears it, reference E6). The exceptions —
//! options that steer the route lookup done by the repair `connect()` (`SO_MARK`,
//! `IPV6_V6ONLY`) and the buffer sizes the queue writes need — are set by `restore`
//! before connect.

use std::os::fd::BorrowedFd;

use baton_proto::tcp::{SocketFamily, SocketOptions};
use nix::errno::Errno;

use crate::error::{RepairError, Result};
use crate::sys;

/// Read the carried options of a connected socket. `v4_flow` is true for IPv4 sockets
/// and for v4-mapped flows of dual-stack IPv6 sockets (their packets use IP_TOS/IP_TTL).
pub fn read(fd: BorrowedFd<'_>, family: SocketFamily, v4_flow: bool) -> Result<SocketOptions> {
    use libc::{IPPROTO_TCP, SOL_SOCKET};
    let get = |level, name, step| sys::get_int(fd, level, name, step);
    let mut congestion = [0u8; 16];
    let cc_len = sys::get_bytes(
        fd,
        IPPROTO_TCP,
        libc::TCP_CONGESTION,
        &mut congestion,
        "dump: TCP_CONGESTION",
    )?;
    let cc = congestion[..cc_len]
        .split(|&b| b == 0)
        .next()
        .unwrap_or(&[]);
    let congestion = String::from_utf8(cc.to_vec())
        .map_err(|_| RepairError::invalid("dump: TCP_CONGESTION", "name is not UTF-8"))?;
    let buf_lock = match get(SOL_SOCKET, sys::SO_BUF_LOCK, "dump: SO_BUF_LOCK") {
        Ok(v) => v as u8,
        // Before Linux 5.14 the lock bits cannot be read; treat as unlocked.
        Err(RepairError::Sys {
            errno: Errno::ENOPROTOOPT,
            ..
        }) => 0,
        Err(e) => return Err(e),
    };
    let (ip_tos, ip_ttl) = if v4_flow {
        (
            Some(get(libc::IPPROTO_IP, libc::IP_TOS, "dump: IP_TOS")? as u8),
            Some(get(libc::IPPROTO_IP, libc::IP_TTL, "dump: IP_TTL")? as u8),
        )
    } else {
        (None, None)
    };
    let (ipv6_tclass, ipv6_hops) = if family == SocketFamily::Inet6 && !v4_flow {
        (
            Some(get(
                libc::IPPROTO_IPV6,
                libc::IPV6_TCLASS,
                "dump: IPV6_TCLASS",
            )?),
            Some(get(
                libc::IPPROTO_IPV6,
                libc::IPV6_UNICAST_HOPS,
                "dump: IPV6_UNICAST_HOPS",
            )?),
        )
    } else {
        (None, None)
    };
    Ok(SocketOptions {
        sndbuf: get(SOL_SOCKET, libc::SO_SNDBUF, "dump: SO_SNDBUF")? as u32,
        rcvbuf: get(SOL_SOCKET, libc::SO_RCVBUF, "dump: SO_RCVBUF")? as u32,
        buf_lock,
        // Filled in by the dumper, which reads it before entering repair mode (repair
        // mode makes it read 2, SK_FORCE_REUSE).
        reuseaddr: false,
        reuseport: get(SOL_SOCKET, libc::SO_REUSEPORT, "dump: SO_REUSEPORT")? != 0,
        // Filled in by the dumper (it saves and disables the offset while peeking).
        peek_off: -1,
        nodelay: get(IPPROTO_TCP, libc::TCP_NODELAY, "dump: TCP_NODELAY")? != 0,
        keepalive: get(SOL_SOCKET, libc::SO_KEEPALIVE, "dump: SO_KEEPALIVE")? != 0,
        keepidle: get(IPPROTO_TCP, libc::TCP_KEEPIDLE, "dump: TCP_KEEPIDLE")? as u32,
        keepintvl: get(IPPROTO_TCP, libc::TCP_KEEPINTVL, "dump: TCP_KEEPINTVL")? as u32,
        keepcnt: get(IPPROTO_TCP, libc::TCP_KEEPCNT, "dump: TCP_KEEPCNT")? as u32,
        user_timeout: get(
            IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            "dump: TCP_USER_TIMEOUT",
        )? as u32,
        congestion,
        notsent_lowat: get(
            IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            "dump: TCP_NOTSENT_LOWAT",
        )? as u32,
        mark: get(SOL_SOCKET, libc::SO_MARK, "dump: SO_MARK")? as u32,
        priority: get(SOL_SOCKET, libc::SO_PRIORITY, "dump: SO_PRIORITY")? as u32,
        ip_tos,
        ip_ttl,
        ipv6_tclass,
        ipv6_hops,
    })
}

/// Apply the options that do not affect the repair sequence, on a socket that has left
/// repair mode. Buffer sizes go last: `restore` raised them for the queue writes.
pub fn apply_after_repair(fd: BorrowedFd<'_>, o: &SocketOptions) -> Result<()> {
    use libc::{IPPROTO_TCP, SOL_SOCKET};
    let set = |level, name, value: i32, step| sys::set_int(fd, level, name, value, step);
    // Only what differs from a fresh socket's defaults is written: each call is a syscall,
    // and restores come in batches of thousands.
    if o.reuseaddr {
        set(SOL_SOCKET, libc::SO_REUSEADDR, 1, "restore: SO_REUSEADDR")?;
    }
    if o.reuseport {
        set(SOL_SOCKET, libc::SO_REUSEPORT, 1, "restore: SO_REUSEPORT")?;
    }
    if o.peek_off >= 0 {
        set(
            SOL_SOCKET,
            sys::SO_PEEK_OFF,
            o.peek_off,
            "restore: SO_PEEK_OFF",
        )?;
    }
    if o.keepalive {
        set(SOL_SOCKET, libc::SO_KEEPALIVE, 1, "restore: SO_KEEPALIVE")?;
    }
    // Kernel defaults (tcp_keepalive_time/intvl/probes) read back as these when unset.
    if (o.keepidle, o.keepintvl, o.keepcnt) != (7200, 75, 9) {
        set(
            IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            o.keepidle as i32,
            "restore: TCP_KEEPIDLE",
        )?;
        set(
            IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            o.keepintvl as i32,
            "restore: TCP_KEEPINTVL",
        )?;
        set(
            IPPROTO_TCP,
            libc::TCP_KEEPCNT,
            o.keepcnt as i32,
            "restore: TCP_KEEPCNT",
        )?;
    }
    if o.user_timeout != 0 {
        set(
            IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            o.user_timeout as i32,
            "restore: TCP_USER_TIMEOUT",
        )?;
    }
    if o.notsent_lowat != u32::MAX {
        set(
            IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            o.notsent_lowat as i32,
            "restore: TCP_NOTSENT_LOWAT",
        )?;
    }
    if !o.congestion.is_empty() {
        let mut current = [0u8; 16];
        let len = sys::get_bytes(
            fd,
            IPPROTO_TCP,
            libc::TCP_CONGESTION,
            &mut current,
            "restore: TCP_CONGESTION",
        )?;
        let current = current[..len].split(|&b| b == 0).next().unwrap_or(&[]);
        if current != o.congestion.as_bytes() {
            sys::set_slice(
                fd,
                IPPROTO_TCP,
                libc::TCP_CONGESTION,
                o.congestion.as_bytes(),
                "restore: TCP_CONGESTION",
            )?;
        }
    }
    if let Some(tos) = o.ip_tos.filter(|&t| t != 0) {
        set(
            libc::IPPROTO_IP,
            libc::IP_TOS,
            i32::from(tos),
            "restore: IP_TOS",
        )?;
    }
    // IP_TTL and IPV6_UNICAST_HOPS read back the route default (64) when unset: carrying
    // that value over would pin it; only other values were set by the owner.
    if let Some(ttl) = o.ip_ttl.filter(|&t| t != 64) {
        set(
            libc::IPPROTO_IP,
            libc::IP_TTL,
            i32::from(ttl),
            "restore: IP_TTL",
        )?;
    }
    if let Some(tclass) = o.ipv6_tclass.filter(|&t| t != 0) {
        set(
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            tclass,
            "restore: IPV6_TCLASS",
        )?;
    }
    if let Some(hops) = o.ipv6_hops.filter(|&h| h != 64 && h != -1) {
        set(
            libc::IPPROTO_IPV6,
            libc::IPV6_UNICAST_HOPS,
            hops,
            "restore: IPV6_UNICAST_HOPS",
        )?;
    }
    // After IP_TOS/IPV6_TCLASS: setting the TOS also resets the priority.
    if o.priority != 0 {
        set(
            SOL_SOCKET,
            libc::SO_PRIORITY,
            o.priority as i32,
            "restore: SO_PRIORITY",
        )?;
    }
    // Buffer sizes: the kernel doubles what SO_SNDBUF/SO_RCVBUF are given, and reports
    // the doubled value, so halve what was read. Only sizes the owner had locked are put
    // back; autotuned ones stay as restore raised them and keep autotuning from there.
    const SNDBUF_LOCK: u8 = 1;
    const RCVBUF_LOCK: u8 = 2;
    if o.buf_lock & SNDBUF_LOCK != 0 {
        set(
            SOL_SOCKET,
            libc::SO_SNDBUF,
            (o.sndbuf / 2) as i32,
            "restore: SO_SNDBUF",
        )?;
    }
    if o.buf_lock & RCVBUF_LOCK != 0 {
        set(
            SOL_SOCKET,
            libc::SO_RCVBUF,
            (o.rcvbuf / 2) as i32,
            "restore: SO_RCVBUF",
        )?;
    }
    match set(
        SOL_SOCKET,
        sys::SO_BUF_LOCK,
        i32::from(o.buf_lock),
        "restore: SO_BUF_LOCK",
    ) {
        Err(RepairError::Sys {
            errno: Errno::ENOPROTOOPT,
            ..
        }) if o.buf_lock == 0 => Ok(()),
        other => other,
    }
}
