//! The socket calls of TCP flows that nix does not wrap (or wraps with more work than
//! needed): `SO_PEEK_OFF`, `SIOCOUTQ`, `accept4` with the peer address, keepalive.
//!
//! Every host socket has TCP keepalive on ([`KEEPALIVE_IDLE_SECS`] and friends): a
//! host peer that vanished (crashed, unplugged, its NAT state gone) while the connection
//! was idle would otherwise hold a flow-table slot and a descriptor for as long as baton
//! runs, since nothing towards that peer ever fails. With keepalive the kernel probes
//! it, the socket reports `ETIMEDOUT`, and the guest gets a RST. The probes cost nothing
//! on a live connection (they only start after the idle time and a live peer's kernel
//! answers them whatever its application does). passt sets no keepalive; it resets a
//! connection after two hours without activity in either direction instead, which also
//! cuts live but quiet connections. Outbound sockets get keepalive when created
//! ([`stream_socket`]); accepted ones inherit it from their listener (also a
//! [`stream_socket`]). A migrated socket carries these options in its dumped state.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `SIOCOUTQ`: bytes in a socket's send queue (not yet acknowledged by the peer).
const SIOCOUTQ: libc::c_ulong = 0x5411;

/// Seconds a host connection is idle before the kernel starts keepalive probes.
pub(crate) const KEEPALIVE_IDLE_SECS: i32 = 300;
/// Seconds between keepalive probes.
pub(crate) const KEEPALIVE_INTERVAL_SECS: i32 = 30;
/// Unanswered probes after which the connection is dropped (so a dead peer is noticed
/// about 5 + 6 × 0.5 = 8 minutes after the connection went quiet).
pub(crate) const KEEPALIVE_PROBES: i32 = 6;

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

pub(crate) fn set_int_option(
    fd: BorrowedFd<'_>,
    level: i32,
    name: i32,
    value: i32,
) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed; the kernel only
    // reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

/// Option values read with [`get_option`]: plain C data for which all-zero bytes are a
/// valid value and any bytes the kernel writes are too.
trait OptionValue: Copy {}
impl OptionValue for i32 {}
impl OptionValue for u64 {}
impl OptionValue for u8 {}
impl OptionValue for libc::tcp_info {}

/// `getsockopt` into a `T`. The kernel copies at most `size_of::<T>()` bytes (a shorter
/// `T` reads the head of a larger struct, as [`is_closed`] does with `tcp_info`).
fn get_option<T: OptionValue>(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<T> {
    // SAFETY: `OptionValue` types are plain C data; all-zero bytes are a valid value.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` and `len` live across the call; the kernel writes at most `len`
    // bytes into `value` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut T).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(last_error())
    }
}

fn get_int_option(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    get_option(fd, level, name)
}

/// `SO_COOKIE`: the kernel's unique number of this socket (never reused while the
/// system runs, unlike descriptor numbers and flow ids).
pub(crate) fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    get_option(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// `SO_NETNS_COOKIE`: the unique number of the network namespace the socket lives in.
pub(crate) fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    get_option(fd, libc::SOL_SOCKET, libc::SO_NETNS_COOKIE)
}

/// `TCP_INFO` of a socket (no privilege needed).
pub(crate) fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    get_option(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Where the next `MSG_PEEK` read starts, in bytes from the head of the receive queue.
pub(crate) fn set_peek_offset(fd: BorrowedFd<'_>, offset: u32) -> io::Result<()> {
    let offset = i32::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    set_int_option(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, offset)
}

/// The pending socket error (`SO_ERROR`), cleared by reading it.
pub(crate) fn take_error(fd: BorrowedFd<'_>) -> io::Result<i32> {
    get_int_option(fd, libc::SOL_SOCKET, libc::SO_ERROR)
}

/// Bytes the socket's send buffer can still take (a conservative estimate: three
/// quarters of `SO_SNDBUF`, which counts buffer overhead too, minus the queued bytes).
pub(crate) fn send_space(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let sndbuf = get_int_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)?;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `queued`, which lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCOUTQ, &mut queued as *mut libc::c_int) };
    if rc != 0 {
        return Err(last_error());
    }
    let usable = u64::try_from(sndbuf).unwrap_or(0) * 3 / 4;
    let free = usable.saturating_sub(u64::try_from(queued).unwrap_or(0));
    Ok(u32::try_from(free).unwrap_or(u32::MAX))
}

/// Make `close` send a RST instead of a FIN (`SO_LINGER` with a zero timeout).
pub(crate) fn set_reset_on_close(fd: BorrowedFd<'_>) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` lives across the call and its size is passed; read only.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

/// A non-blocking stream socket of the family (`ipv4` or IPv6) with keepalive on.
pub(crate) fn stream_socket(ipv4: bool) -> io::Result<OwnedFd> {
    let family = if ipv4 { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: socket() takes no pointers; a valid descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: `fd` was just returned by socket() and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_keepalive(std::os::fd::AsFd::as_fd(&fd))?;
    Ok(fd)
}

/// Turn on TCP keepalive with baton's timing (see the module documentation).
fn set_keepalive(fd: BorrowedFd<'_>) -> io::Result<()> {
    for (level, name, value) in [
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            KEEPALIVE_INTERVAL_SECS,
        ),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES),
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
    ] {
        set_int_option(fd, level, name, value)?;
    }
    Ok(())
}

/// Enable `SO_PEEK_OFF` (offset 0) on a connected or accepted socket.
pub(crate) fn enable_peek_offset(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_peek_offset(fd, 0)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin);
            }
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6);
            }
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::new(
                IpAddr::V6(ip),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// Start a non-blocking connect; `Ok` also when it is in progress.
pub(crate) fn connect(fd: BorrowedFd<'_>, addr: SocketAddr) -> io::Result<()> {
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid address of `len` bytes and lives across the call.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = last_error();
    if err.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(())
    } else {
        Err(err)
    }
}

/// A listening socket on `addr` (IPv6 sockets are IPv6-only).
pub(crate) fn listener(addr: SocketAddr, freebind: bool) -> io::Result<OwnedFd> {
    let fd = stream_socket(addr.is_ipv4())?;
    let borrowed = std::os::fd::AsFd::as_fd(&fd);
    set_int_option(borrowed, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        set_int_option(borrowed, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    if freebind {
        let (level, name) = if addr.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_FREEBIND)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_FREEBIND)
        };
        set_int_option(borrowed, level, name, 1)?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid address of `len` bytes and lives across the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&storage as *const libc::sockaddr_storage).cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(last_error());
    }
    // SAFETY: listen() takes no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
        return Err(last_error());
    }
    Ok(fd)
}

/// Accept one connection: the non-blocking socket and the peer's address.
pub(crate) fn accept(fd: BorrowedFd<'_>) -> io::Result<(OwnedFd, SocketAddr)> {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `storage` and updates `len`;
    // both live across the call.
    let conn = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if conn < 0 {
        return Err(last_error());
    }
    // SAFETY: accept4 returned a new descriptor nothing else owns.
    let conn = unsafe { OwnedFd::from_raw_fd(conn) };
    let peer =
        from_sockaddr(&storage).ok_or_else(|| io::Error::from_raw_os_error(libc::EAFNOSUPPORT))?;
    Ok((conn, peer))
}

/// Linux's `TCP_CLOSE` state number (`include/net/tcp_states.h`).
const TCP_STATE_CLOSE: u8 = 7;

/// Whether the socket's connection is over in the kernel (state CLOSE: both FINs went
/// through, or it was reset), though unread data may remain in its receive queue.
/// Such a socket has nothing the repair interface can dump.
pub(crate) fn is_closed(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // The first byte of `struct tcp_info` is `tcpi_state`; the kernel copies at most
    // the length asked for.
    let state: u8 = get_option(fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(state == TCP_STATE_CLOSE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn keepalive_settings(fd: BorrowedFd<'_>) -> [i32; 4] {
        let get = |level, name| get_int_option(fd, level, name).expect("getsockopt");
        [
            get(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
            get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
        ]
    }

    const WANTED: [i32; 4] = [
        1,
        KEEPALIVE_IDLE_SECS,
        KEEPALIVE_INTERVAL_SECS,
        KEEPALIVE_PROBES,
    ];

    /// Outbound sockets are created with keepalive on; connections accepted on a
    /// forward's listener inherit it (loopback only).
    #[test]
    fn host_sockets_have_keepalive() {
        for ipv4 in [true, false] {
            let outbound = stream_socket(ipv4).expect("socket");
            assert_eq!(keepalive_settings(outbound.as_fd()), WANTED);
            let loopback: IpAddr = if ipv4 {
                Ipv4Addr::LOCALHOST.into()
            } else {
                Ipv6Addr::LOCALHOST.into()
            };
            let Ok(listening) = listener(SocketAddr::new(loopback, 0), false) else {
                // No IPv6 loopback in this environment.
                assert!(!ipv4, "IPv4 loopback listener");
                continue;
            };
            let addr = {
                let std_listener = std::net::TcpListener::from(
                    listening.try_clone().expect("duplicate the listener"),
                );
                std_listener.local_addr().expect("local address")
            };
            let client = std::net::TcpStream::connect(addr).expect("connect");
            // A plain std socket: keepalive off, so what the accepted one has comes
            // from the listener, not from the peer.
            assert_eq!(
                get_int_option(client.as_fd(), libc::SOL_SOCKET, libc::SO_KEEPALIVE)
                    .expect("getsockopt"),
                0
            );
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let accepted = loop {
                match accept(listening.as_fd()) {
                    Ok((socket, _)) => break socket,
                    Err(err)
                        if err.kind() == io::ErrorKind::WouldBlock
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(err) => panic!("accept: {err}"),
                }
            };
            assert_eq!(keepalive_settings(accepted.as_fd()), WANTED);
        }
    }
}
