//! What the kernel-facts suites share: TCP_REPAIR constants, thin libc wrappers that
//! return the raw OS error (so tests can assert on errno), and the suites' time bounds.
//! No baton code: the facts are pinned against the kernel alone.
#![allow(dead_code)]

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use baton_testkit::netns;
use baton_testkit::tcp;
use libc::c_int;

pub const TCP_REPAIR: c_int = 19;
pub const TCP_REPAIR_QUEUE: c_int = 20;
pub const TCP_QUEUE_SEQ: c_int = 21;
pub const TCP_REPAIR_OPTIONS: c_int = 22;
pub const TCP_TIMESTAMP: c_int = 24;
pub const TCP_REPAIR_WINDOW: c_int = 29;

pub const REPAIR_ON: c_int = 1;
pub const REPAIR_OFF: c_int = 0;
pub const REPAIR_OFF_NO_WP: c_int = -1;

pub const NO_QUEUE: c_int = 0;
pub const RECV_QUEUE: c_int = 1;
pub const SEND_QUEUE: c_int = 2;

pub const TCPOPT_MSS: u32 = 2;
pub const TCPI_OPT_USEC_TS: u8 = 64;
pub const SO_PEEK_OFF: c_int = 42;

/// Upper bound for anything that should happen "at once" on loopback.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// How long "nothing happens" must hold (the reference measured ≥ 300 ms).
pub const QUIET: Duration = Duration::from_millis(300);

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

pub fn private_netns() {
    netns::enter_private_netns().expect("entering a private network namespace");
}

pub fn cvt(rc: c_int) -> io::Result<c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The errno of a call that must fail.
#[track_caller]
pub fn errno_of<T: std::fmt::Debug>(result: io::Result<T>) -> c_int {
    match result {
        Ok(v) => panic!("expected the call to fail, it returned {v:?}"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("expected an OS error, got {e}")),
    }
}

/// A non-blocking, close-on-exec TCP socket of `family`, unbound.
pub fn tcp_socket(family: c_int) -> OwnedFd {
    // SAFETY: socket() takes only integers.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })
    .expect("socket()");
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

pub fn setsockopt_bytes(fd: impl AsFd, level: c_int, opt: c_int, val: &[u8]) -> io::Result<()> {
    // SAFETY: the kernel reads `val.len()` bytes from `val`, which outlives the call.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            opt,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    })
    .map(drop)
}

pub fn setsockopt_int(fd: impl AsFd, level: c_int, opt: c_int, val: c_int) -> io::Result<()> {
    setsockopt_bytes(fd, level, opt, &val.to_ne_bytes())
}

/// getsockopt with a buffer of `len` bytes; returns the bytes the kernel reported.
pub fn getsockopt_bytes(
    fd: impl AsFd,
    level: c_int,
    opt: c_int,
    len: usize,
) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut optlen = len as libc::socklen_t;
    // SAFETY: the kernel writes at most `optlen` bytes into `buf`, which we own, and
    // updates `optlen`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            opt,
            buf.as_mut_ptr().cast(),
            &mut optlen,
        )
    })?;
    buf.truncate(optlen as usize);
    Ok(buf)
}

pub fn getsockopt_int(fd: impl AsFd, level: c_int, opt: c_int) -> io::Result<c_int> {
    let bytes = getsockopt_bytes(fd, level, opt, size_of::<c_int>())?;
    let arr: [u8; 4] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| io::Error::other(format!("option {opt} returned {} bytes", bytes.len())))?;
    Ok(c_int::from_ne_bytes(arr))
}

pub fn repair(fd: impl AsFd, value: c_int) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, value)
}

pub fn select_queue(fd: impl AsFd, queue: c_int) -> io::Result<()> {
    setsockopt_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
}

/// TCP_QUEUE_SEQ of the selected queue (write_seq for SEND, rcv_nxt for RECV).
pub fn queue_seq(fd: impl AsFd) -> io::Result<u32> {
    getsockopt_int(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ).map(|v| v as u32)
}

pub fn set_queue_seq(fd: impl AsFd, seq: u32) -> io::Result<()> {
    setsockopt_bytes(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, &seq.to_ne_bytes())
}

pub fn timestamp(fd: impl AsFd) -> io::Result<u32> {
    getsockopt_int(fd, libc::IPPROTO_TCP, TCP_TIMESTAMP).map(|v| v as u32)
}

pub fn tcp_info(fd: impl AsFd) -> libc::tcp_info {
    let bytes = getsockopt_bytes(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_INFO,
        size_of::<libc::tcp_info>(),
    )
    .expect("TCP_INFO");
    // SAFETY: tcp_info is plain integers, valid for any bit pattern (all-zero for the
    // tail an older kernel might not fill).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    // SAFETY: we copy at most size_of::<tcp_info>() bytes into `info`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut info as *mut libc::tcp_info).cast::<u8>(),
            bytes.len().min(size_of::<libc::tcp_info>()),
        )
    };
    info
}

/// recv(MSG_PEEK | MSG_DONTWAIT) into `buf`; returns what recv returned (which for the
/// send queue in repair mode may exceed `buf.len()`).
pub fn peek(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we own.
    let n = unsafe {
        libc::recv(
            fd.as_fd().as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain bytes; all-zero is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

pub fn bind(fd: impl AsFd, addr: SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` holds a valid sockaddr of `len` bytes for the duration of the call.
    cvt(unsafe {
        libc::bind(
            fd.as_fd().as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(drop)
}

pub fn connect(fd: impl AsFd, addr: SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr(addr);
    // SAFETY: as in bind().
    cvt(unsafe {
        libc::connect(
            fd.as_fd().as_raw_fd(),
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        )
    })
    .map(drop)
}

pub fn listen(fd: impl AsFd) -> io::Result<()> {
    // SAFETY: listen() takes only integers.
    cvt(unsafe { libc::listen(fd.as_fd().as_raw_fd(), 16) }).map(drop)
}

/// A loopback pair; the second element is the accepted (server) end.
pub fn pair() -> (TcpStream, TcpStream) {
    tcp::pair(LOCALHOST).expect("loopback TCP pair")
}

#[track_caller]
pub fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    assert!(
        tcp::wait_until(DEADLINE, cond),
        "timed out after {DEADLINE:?} waiting for {what}"
    );
}
