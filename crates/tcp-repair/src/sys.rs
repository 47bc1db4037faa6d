//! Thin typed wrappers around the socket calls the repair code makes.
//!
//! Written by hand because neither nix nor rustix wraps the TCP_REPAIR family of options
//! (`TCP_REPAIR_QUEUE`, `TCP_QUEUE_SEQ`, `TCP_REPAIR_OPTIONS`, `TCP_REPAIR_WINDOW`) or the
//! `SIOCOUTQNSD` ioctl. Every wrapper takes the step name used in errors, so a failure
//! reads like "restore: TCP_QUEUE_SEQ(recv): EPERM". Steps are `&'static str` so the
//! success path allocates nothing.

use std::mem::{size_of, MaybeUninit};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

use baton_proto::tcp::SocketFamily;
use nix::errno::Errno;

use crate::error::{RepairError, Result};

// uapi/linux/tcp.h
pub const TCP_REPAIR: i32 = 19;
pub const TCP_REPAIR_QUEUE: i32 = 20;
pub const TCP_QUEUE_SEQ: i32 = 21;
pub const TCP_REPAIR_OPTIONS: i32 = 22;
pub const TCP_TIMESTAMP: i32 = 24;
pub const TCP_REPAIR_WINDOW: i32 = 29;
pub const TCP_ULP: i32 = 31;

pub const TCP_REPAIR_ON: i32 = 1;
pub const TCP_REPAIR_OFF: i32 = 0;
pub const TCP_REPAIR_OFF_NO_WP: i32 = -1;

pub const TCP_NO_QUEUE: i32 = 0;
pub const TCP_RECV_QUEUE: i32 = 1;
pub const TCP_SEND_QUEUE: i32 = 2;

pub const TCPOPT_MSS: u32 = 2;
pub const TCPOPT_WINDOW: u32 = 3;
pub const TCPOPT_SACK_PERM: u32 = 4;
pub const TCPOPT_TIMESTAMP: u32 = 8;

// tcpi_options bits
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
pub const TCPI_OPT_SACK: u8 = 2;
pub const TCPI_OPT_WSCALE: u8 = 4;

// Kernel TCP states (include/net/tcp_states.h)
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_SYN_RECV: u8 = 3;
pub const TCP_FIN_WAIT1: u8 = 4;
pub const TCP_FIN_WAIT2: u8 = 5;
pub const TCP_TIME_WAIT: u8 = 6;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_CLOSE_WAIT: u8 = 8;
pub const TCP_LAST_ACK: u8 = 9;
pub const TCP_LISTEN: u8 = 10;
pub const TCP_CLOSING: u8 = 11;

// asm-generic/socket.h, not all in every libc release
pub const SO_PEEK_OFF: i32 = 42;
pub const SO_BUF_LOCK: i32 = 72;
pub const SO_NETNS_COOKIE: i32 = 71;
pub const SIOCINQ: libc::c_ulong = 0x541B;
pub const SIOCOUTQ: libc::c_ulong = 0x5411;
pub const SIOCOUTQNSD: libc::c_ulong = 0x894B;
pub const SIOCATMARK: libc::c_ulong = 0x8905;
pub const IPPROTO_MPTCP: i32 = 262;

/// Name of a kernel TCP state, for messages.
pub fn state_name(state: u8) -> &'static str {
    match state {
        TCP_ESTABLISHED => "ESTABLISHED",
        TCP_SYN_SENT => "SYN_SENT",
        TCP_SYN_RECV => "SYN_RECV",
        TCP_FIN_WAIT1 => "FIN_WAIT1",
        TCP_FIN_WAIT2 => "FIN_WAIT2",
        TCP_TIME_WAIT => "TIME_WAIT",
        TCP_CLOSE => "CLOSE",
        TCP_CLOSE_WAIT => "CLOSE_WAIT",
        TCP_LAST_ACK => "LAST_ACK",
        TCP_LISTEN => "LISTEN",
        TCP_CLOSING => "CLOSING",
        _ => "UNKNOWN",
    }
}

/// `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpRepairOpt {
    pub opt_code: u32,
    pub opt_val: u32,
}

/// `struct tcp_repair_window`: exactly 20 bytes on Linux 4.8 … 6.18 (the kernel refuses
/// any other length there; newer kernels may accept longer variants too).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TcpRepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

fn last_errno() -> Errno {
    Errno::last()
}

/// getsockopt into a plain-data `T`, requiring the kernel to fill exactly `size_of::<T>()`.
pub fn get<T: Copy>(fd: BorrowedFd<'_>, level: i32, name: i32, step: &'static str) -> Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a writable buffer of `len` bytes that outlives the call; the
    // kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(RepairError::sys(step, last_errno()));
    }
    if len as usize != size_of::<T>() {
        return Err(RepairError::invalid(
            step,
            format!("kernel returned {len} bytes, expected {}", size_of::<T>()),
        ));
    }
    // SAFETY: the kernel filled all size_of::<T>() bytes (checked above), and T is a
    // plain-data type for which every bit pattern is valid (only integers and C structs
    // of integers are used with this function).
    Ok(unsafe { value.assume_init() })
}

/// getsockopt of an `int`.
pub fn get_int(fd: BorrowedFd<'_>, level: i32, name: i32, step: &'static str) -> Result<i32> {
    get::<i32>(fd, level, name, step)
}

/// getsockopt into a byte buffer; returns the length the kernel reported.
pub fn get_bytes(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    buf: &mut [u8],
    step: &'static str,
) -> Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is writable for `len` bytes for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(RepairError::sys(step, last_errno()));
    }
    Ok((len as usize).min(buf.len()))
}

/// setsockopt from a plain-data value.
pub fn set<T: Copy>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: &T,
    step: &'static str,
) -> Result<()> {
    set_bytes_raw(
        fd,
        level,
        name,
        (value as *const T).cast(),
        size_of::<T>(),
        step,
    )
}

/// setsockopt of an `int`.
pub fn set_int(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: i32,
    step: &'static str,
) -> Result<()> {
    set(fd, level, name, &value, step)
}

/// setsockopt from a byte slice (strings, arrays of options).
pub fn set_slice<T: Copy>(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: &[T],
    step: &'static str,
) -> Result<()> {
    set_bytes_raw(
        fd,
        level,
        name,
        value.as_ptr().cast(),
        std::mem::size_of_val(value),
        step,
    )
}

fn set_bytes_raw(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    ptr: *const libc::c_void,
    len: usize,
    step: &'static str,
) -> Result<()> {
    // SAFETY: `ptr` points to `len` readable bytes owned by the caller for the duration
    // of the call (callers pass a reference or a slice).
    let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, ptr, len as libc::socklen_t) };
    if rc < 0 {
        return Err(RepairError::sys(step, last_errno()));
    }
    Ok(())
}

/// An ioctl that writes one `int` (SIOCINQ, SIOCOUTQ, SIOCOUTQNSD, SIOCATMARK).
pub fn ioctl_int(fd: BorrowedFd<'_>, request: libc::c_ulong, step: &'static str) -> Result<i32> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write a single int to the pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, &mut value as *mut libc::c_int) };
    if rc < 0 {
        return Err(RepairError::sys(step, last_errno()));
    }
    Ok(value)
}

/// recv(2) with flags into `buf`; returns what the kernel returned (which, for the
/// repair send-queue peek, may exceed `buf.len()`).
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: i32) -> std::result::Result<usize, Errno> {
    // SAFETY: `buf` is writable for its length for the duration of the call.
    let rc = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if rc < 0 {
        return Err(last_errno());
    }
    Ok(rc as usize)
}

/// recv(2) with flags into uninitialised memory; returns what the kernel returned, of
/// which at most `buf.len()` bytes at the start of `buf` are initialised (the repair
/// send-queue peek reports the whole queue length, E18).
pub fn recv_uninit(
    fd: BorrowedFd<'_>,
    buf: &mut [MaybeUninit<u8>],
    flags: i32,
) -> std::result::Result<usize, Errno> {
    // SAFETY: `buf` is writable for its length for the duration of the call; the kernel
    // only writes to it.
    let rc = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if rc < 0 {
        return Err(last_errno());
    }
    Ok(rc as usize)
}

/// The socket's family from `SO_DOMAIN` (anything but AF_INET is taken as AF_INET6:
/// callers have validated the socket or will find out at the next call).
pub fn family(fd: BorrowedFd<'_>, step: &'static str) -> Result<SocketFamily> {
    Ok(
        match get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, step)? {
            libc::AF_INET => SocketFamily::Inet,
            _ => SocketFamily::Inet6,
        },
    )
}

/// send(2) with flags; returns the bytes accepted.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8], flags: i32) -> std::result::Result<usize, Errno> {
    // SAFETY: `buf` is readable for its length for the duration of the call.
    let rc = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
    if rc < 0 {
        return Err(last_errno());
    }
    Ok(rc as usize)
}

/// A socket address in the kernel's layout.
pub struct RawAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl RawAddr {
    pub fn from_socket_addr(addr: &SocketAddr) -> Self {
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
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
                // SAFETY: sockaddr_storage is larger than and suitably aligned for
                // sockaddr_in.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin)
                };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: v6.flowinfo().to_be(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: v6.scope_id(),
                };
                // SAFETY: sockaddr_storage is larger than and suitably aligned for
                // sockaddr_in6.
                unsafe {
                    std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6)
                };
                size_of::<libc::sockaddr_in6>()
            }
        };
        RawAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }

    fn to_socket_addr(&self, step: &'static str) -> Result<SocketAddr> {
        match i32::from(self.storage.ss_family) {
            libc::AF_INET if self.len as usize >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says the storage holds a sockaddr_in, and the
                // kernel wrote at least that many bytes.
                let sin: libc::sockaddr_in = unsafe {
                    std::ptr::read((&self.storage as *const libc::sockaddr_storage).cast())
                };
                Ok(SocketAddr::from((
                    std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if self.len as usize >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6: libc::sockaddr_in6 = unsafe {
                    std::ptr::read((&self.storage as *const libc::sockaddr_storage).cast())
                };
                Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    u32::from_be(sin6.sin6_flowinfo),
                    sin6.sin6_scope_id,
                )))
            }
            family => Err(RepairError::invalid(
                step,
                format!("unexpected address family {family} ({} bytes)", self.len),
            )),
        }
    }
}

fn name_call(
    fd: BorrowedFd<'_>,
    peer: bool,
    step: &'static str,
) -> std::result::Result<SocketAddr, RepairError> {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut raw = RawAddr {
        storage: unsafe { std::mem::zeroed() },
        len: size_of::<libc::sockaddr_storage>() as libc::socklen_t,
    };
    let ptr = (&mut raw.storage as *mut libc::sockaddr_storage).cast();
    // SAFETY: `ptr` is writable for `raw.len` bytes; the kernel updates `raw.len`.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), ptr, &mut raw.len)
        } else {
            libc::getsockname(fd.as_raw_fd(), ptr, &mut raw.len)
        }
    };
    if rc < 0 {
        return Err(RepairError::sys(step, last_errno()));
    }
    raw.to_socket_addr(step)
}

/// The peer's address as getpeername(2) writes it (`sockaddr_in`, or `sockaddr_in6` on an
/// `AF_INET6` socket, v4-mapped peers included): the form options such as `TCP_MD5SIG`
/// take, so nothing is converted in between.
pub fn peer_storage(fd: BorrowedFd<'_>, step: &'static str) -> Result<libc::sockaddr_storage> {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` is writable for `len` bytes; the kernel updates `len`.
    let rc = unsafe {
        libc::getpeername(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(RepairError::sys(step, last_errno()));
    }
    Ok(storage)
}

pub fn local_addr(fd: BorrowedFd<'_>, step: &'static str) -> Result<SocketAddr> {
    name_call(fd, false, step)
}

pub fn peer_addr(fd: BorrowedFd<'_>, step: &'static str) -> Result<SocketAddr> {
    name_call(fd, true, step)
}

pub fn bind(fd: BorrowedFd<'_>, addr: &SocketAddr, step: &'static str) -> Result<()> {
    let raw = RawAddr::from_socket_addr(addr);
    // SAFETY: `raw.storage` holds a valid sockaddr of `raw.len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw.storage as *const libc::sockaddr_storage).cast(),
            raw.len,
        )
    };
    if rc < 0 {
        return Err(RepairError::sys(step, last_errno()));
    }
    Ok(())
}

pub fn connect(fd: BorrowedFd<'_>, addr: &SocketAddr, step: &'static str) -> Result<()> {
    let raw = RawAddr::from_socket_addr(addr);
    // SAFETY: `raw.storage` holds a valid sockaddr of `raw.len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw.storage as *const libc::sockaddr_storage).cast(),
            raw.len,
        )
    };
    if rc < 0 {
        return Err(RepairError::sys(step, last_errno()));
    }
    Ok(())
}

pub fn shutdown(fd: BorrowedFd<'_>, how: i32, step: &'static str) -> Result<()> {
    // SAFETY: plain syscall on a borrowed fd.
    let rc = unsafe { libc::shutdown(fd.as_raw_fd(), how) };
    if rc < 0 {
        return Err(RepairError::sys(step, last_errno()));
    }
    Ok(())
}

/// The first bytes of `struct tcp_info` that repair needs.
#[derive(Debug, Clone, Copy)]
pub struct TcpInfoHead {
    pub state: u8,
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
}

pub fn tcp_info_head(fd: BorrowedFd<'_>, step: &'static str) -> Result<TcpInfoHead> {
    let mut buf = [0u8; 8];
    let len = get_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf, step)?;
    if len < 7 {
        return Err(RepairError::invalid(
            step,
            format!("tcp_info of {len} bytes"),
        ));
    }
    Ok(TcpInfoHead::parse(&buf))
}

impl TcpInfoHead {
    /// From the first 7 bytes of a `struct tcp_info` (the caller checked the length).
    fn parse(buf: &[u8]) -> Self {
        TcpInfoHead {
            state: buf[0],
            options: buf[5],
            snd_wscale: buf[6] & 0x0f,
            rcv_wscale: buf[6] >> 4,
        }
    }
}

/// Offsets in `struct tcp_info` (uapi/linux/tcp.h) of `tcpi_segs_out` and
/// `tcpi_segs_in` (both `__u32`, there since Linux 4.2; libc's struct mirrors the uapi
/// layout).
const TCPI_SEGS_OUT: usize = std::mem::offset_of!(libc::tcp_info, tcpi_segs_out);
const TCPI_SEGS_IN: usize = std::mem::offset_of!(libc::tcp_info, tcpi_segs_in);

/// The fields of `struct tcp_info` a progress mark needs, and those a dump needs (one
/// `TCP_INFO` call costs as much as several plain socket options: the kernel fills the
/// whole structure whatever the length asked for).
pub struct TcpInfoProgress {
    pub head: TcpInfoHead,
    pub segs_out: u32,
    pub segs_in: u32,
}

pub fn tcp_info_progress(fd: BorrowedFd<'_>, step: &'static str) -> Result<TcpInfoProgress> {
    let mut buf = [0u8; TCPI_SEGS_IN + 4];
    let len = get_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf, step)?;
    if len < buf.len() {
        return Err(RepairError::invalid(
            step,
            format!("tcp_info of {len} bytes has no segment counters (Linux 4.2 or later)"),
        ));
    }
    let u32_at = |at: usize| u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    Ok(TcpInfoProgress {
        head: TcpInfoHead::parse(&buf),
        segs_out: u32_at(TCPI_SEGS_OUT),
        segs_in: u32_at(TCPI_SEGS_IN),
    })
}
