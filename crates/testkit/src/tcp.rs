//! Loopback TCP connections and the kernel-side views tests assert on.
//!
//! * Pairs: [`pair`] and [`many_pairs`] return `(client, server)` where `server` is the
//!   socket `accept()` returned, over a listener on port 0 that is closed afterwards.
//!   [`pair_v4_mapped`] gives a v4-mapped IPv6 connection (both ends `AF_INET6`, the
//!   addresses `::ffff:127.0.0.1`). Every stream is returned in blocking mode.
//! * A deaf peer: [`deafen`] attaches a classic BPF socket filter that drops every
//!   incoming segment before TCP sees it, so the socket never ACKs, never queues data and
//!   never answers with RST. Deafening the *peer* of a socket leaves everything that
//!   socket sends sent-but-unacknowledged, which is how tests build in-flight data on
//!   loopback without traffic control. [`undeafen`] removes the filter; the peer's
//!   retransmissions then get through.
//! * Kernel views: [`inq`], [`outq`] and [`outq_nsd`] (the `SIOCINQ`, `SIOCOUTQ`,
//!   `SIOCOUTQNSD` ioctls) and [`state`] (`tcpi_state` from `TCP_INFO`).
//! * Polling: [`wait_until`] (a condition becomes true before a deadline) and
//!   [`holds_for`] (a condition stays true for a whole period). Tests use them instead of
//!   fixed sleeps so nothing hangs and nothing waits longer than needed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::netns::context;

const SO_ATTACH_FILTER: libc::c_int = 26;
const SO_DETACH_FILTER: libc::c_int = 27;
/// `SIOCINQ` (= `FIONREAD`): bytes in the receive queue the owner can read.
const SIOCINQ: libc::c_ulong = 0x541B;
/// `SIOCOUTQ` (= `TIOCOUTQ`): `write_seq − snd_una`.
const SIOCOUTQ: libc::c_ulong = 0x5411;
/// `SIOCOUTQNSD`: `write_seq − snd_nxt`.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// A connected pair over a fresh listener on port 0 at `addr`: `(client, server)`, where
/// `server` is the accepted socket.
///
/// `addr` may be `127.0.0.1` (or any local IPv4 address), `::1`, or a v4-mapped IPv6
/// address such as `::ffff:127.0.0.1`, which gives the same as [`pair_v4_mapped`].
pub fn pair(addr: IpAddr) -> io::Result<(TcpStream, TcpStream)> {
    let (listener, target) = listen_for(addr)?;
    connect_accept(&listener, target)
}

/// A v4-mapped pair: the client is an `AF_INET6` socket connected to `::ffff:127.0.0.1`,
/// the listener is dual-stack on `::`, so the accepted socket is `AF_INET6` too and both
/// see `::ffff:127.0.0.1` addresses.
pub fn pair_v4_mapped() -> io::Result<(TcpStream, TcpStream)> {
    pair(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()))
}

/// `n` connected pairs over one listener at `addr` (same address rules as [`pair`]).
///
/// All clients connect to the same server port, so `n` is bounded by the ephemeral port
/// range (28,232 ports by default). Each pair costs two descriptors: call
/// [`crate::netns::raise_nofile`] first for large `n`, and mind the hard limit (on
/// baton's CI machines it is 20,000 and cannot be raised, so one process holds at most
/// about 9,990 pairs; put the server ends in a child process for more).
pub fn many_pairs(addr: IpAddr, n: usize) -> io::Result<Vec<(TcpStream, TcpStream)>> {
    let (listener, target) = listen_for(addr)?;
    let mut pairs = Vec::with_capacity(n);
    for _ in 0..n {
        pairs.push(connect_accept(&listener, target)?);
    }
    Ok(pairs)
}

/// The listener for `addr` and the address clients connect to.
fn listen_for(addr: IpAddr) -> io::Result<(TcpListener, SocketAddr)> {
    let mapped = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(|_| v6),
        IpAddr::V4(_) => None,
    };
    // A v4-mapped client needs a listener that accepts IPv4 on an AF_INET6 socket: a
    // dual-stack one on "::" (std never sets IPV6_V6ONLY, and bindv6only defaults to 0).
    let bind_ip = match mapped {
        Some(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        None => addr,
    };
    let listener = TcpListener::bind(SocketAddr::new(bind_ip, 0))
        .map_err(|e| context(e, &format!("binding a listener at {bind_ip} port 0")))?;
    let port = listener
        .local_addr()
        .map_err(|e| context(e, "getsockname on the listener"))?
        .port();
    Ok((listener, SocketAddr::new(addr, port)))
}

fn connect_accept(
    listener: &TcpListener,
    target: SocketAddr,
) -> io::Result<(TcpStream, TcpStream)> {
    let client =
        TcpStream::connect(target).map_err(|e| context(e, &format!("connecting to {target}")))?;
    let (server, peer) = listener
        .accept()
        .map_err(|e| context(e, &format!("accepting the connection to {target}")))?;
    let client_addr = client
        .local_addr()
        .map_err(|e| context(e, "getsockname on the client"))?;
    if peer != client_addr {
        return Err(io::Error::other(format!(
            "accepted a connection from {peer}, expected the client at {client_addr}"
        )));
    }
    Ok((client, server))
}

/// Make `sock` deaf: attach a classic BPF filter (`ret #0`) that drops every incoming
/// packet for it, so it sends no ACK, queues no data and sends no RST. Any process may
/// do this to its own sockets; no privilege is needed.
pub fn deafen(sock: impl AsFd) -> io::Result<()> {
    let mut drop_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: drop_all.as_mut_ptr(),
    };
    // SAFETY: prog points at a one-instruction program that lives until the call
    // returns; the kernel copies the program, so nothing refers to it afterwards. The fd
    // is borrowed for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Remove the socket filter [`deafen`] attached (`SO_DETACH_FILTER`). Fails with
/// `ENOENT` if no filter is attached.
pub fn undeafen(sock: impl AsFd) -> io::Result<()> {
    let unused: libc::c_int = 0;
    // SAFETY: SO_DETACH_FILTER ignores its argument; we pass a valid int anyway. The
    // fd is borrowed for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_DETACH_FILTER,
            (&unused as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_int(sock: impl AsFd, request: libc::c_ulong, name: &str) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: these ioctls write one int into `value`, which we own; the fd is
    // borrowed for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_fd().as_raw_fd(), request as _, &mut value) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(value).map_err(|_| io::Error::other(format!("{name} returned {value}")))
}

/// `SIOCINQ`: bytes the owner can read now. On Linux 6.18 a received FIN is not counted,
/// and with urgent data pending only the bytes before the mark are.
pub fn inq(sock: impl AsFd) -> io::Result<u32> {
    ioctl_int(sock, SIOCINQ, "SIOCINQ")
}

/// `SIOCOUTQ`: `write_seq − snd_una`, i.e. bytes not yet acknowledged by the peer (sent
/// and unsent), plus one for our FIN while it is unacknowledged.
pub fn outq(sock: impl AsFd) -> io::Result<u32> {
    ioctl_int(sock, SIOCOUTQ, "SIOCOUTQ")
}

/// `SIOCOUTQNSD`: `write_seq − snd_nxt`, i.e. bytes never transmitted.
pub fn outq_nsd(sock: impl AsFd) -> io::Result<u32> {
    ioctl_int(sock, SIOCOUTQNSD, "SIOCOUTQNSD")
}

/// A TCP socket state as the kernel reports it in `tcpi_state` (`include/net/tcp_states.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SocketState {
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    NewSynRecv = 12,
    BoundInactive = 13,
}

impl SocketState {
    /// The state for a `tcpi_state` value, if it is one the kernel defines.
    pub fn from_raw(raw: u8) -> Option<Self> {
        use SocketState::*;
        Some(match raw {
            1 => Established,
            2 => SynSent,
            3 => SynRecv,
            4 => FinWait1,
            5 => FinWait2,
            6 => TimeWait,
            7 => Close,
            8 => CloseWait,
            9 => LastAck,
            10 => Listen,
            11 => Closing,
            12 => NewSynRecv,
            13 => BoundInactive,
            _ => return None,
        })
    }
}

/// The socket's `TCP_INFO` (the fields glibc's `struct tcp_info` has: state, timers,
/// retransmission counters, segment size, ...).
pub fn info(sock: impl AsFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is a plain C struct of integers; all-zero bytes are valid.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, which we own, and
    // updates `len`; the fd is borrowed for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len < 1 {
        return Err(io::Error::other("TCP_INFO returned no bytes"));
    }
    Ok(info)
}

/// The socket's TCP state (`tcpi_state` from `TCP_INFO`).
pub fn state(sock: impl AsFd) -> io::Result<SocketState> {
    let info = info(sock)?;
    SocketState::from_raw(info.tcpi_state).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TCP_INFO reported unknown state {}", info.tcpi_state),
        )
    })
}

/// A one-line summary of a socket's `TCP_INFO` for failure messages: state, segments
/// and bytes in flight, retransmission state and timers (what tells "waiting for a
/// timer" from "never sent" from "the peer drops it").
pub fn describe(sock: impl AsFd) -> String {
    let fd = sock.as_fd();
    let info = match info(fd) {
        Ok(info) => info,
        Err(e) => return format!("TCP_INFO: {e}"),
    };
    let queue = |r: io::Result<u32>| r.map_or_else(|e| format!("? ({e})"), |v| v.to_string());
    let state = SocketState::from_raw(info.tcpi_state).map_or_else(
        || format!("state {}", info.tcpi_state),
        |s| format!("{s:?}"),
    );
    format!(
        "{state}, ca_state {}, outq {} (unsent {}), segments unacked {} lost {} \
         retransmitted {} (total {}), retransmits {} backoff {} probes {}, rto {} ms, \
         mss {}, cwnd {}, last data sent {} ms ago, last ack received {} ms ago",
        info.tcpi_ca_state,
        queue(outq(fd)),
        queue(outq_nsd(fd)),
        info.tcpi_unacked,
        info.tcpi_lost,
        info.tcpi_retrans,
        info.tcpi_total_retrans,
        info.tcpi_retransmits,
        info.tcpi_backoff,
        info.tcpi_probes,
        info.tcpi_rto / 1000,
        info.tcpi_snd_mss,
        info.tcpi_snd_cwnd,
        info.tcpi_last_data_sent,
        info.tcpi_last_ack_recv,
    )
}

/// How often [`wait_until`] and [`holds_for`] evaluate their condition.
const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Poll `cond` until it returns true (then return true) or `timeout` has passed (then
/// return false, after one last evaluation).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Poll `cond` for `period`: true if it held at every evaluation (the first one
/// immediately, the last one after `period`), false as soon as it does not.
pub fn holds_for(period: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + period;
    loop {
        if !cond() {
            return false;
        }
        if Instant::now() >= end {
            return true;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A new socket of `domain`/`ty`, close-on-exec. Shared with [`crate::netns`].
pub(crate) fn socket(domain: libc::c_int, ty: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes only integers.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a descriptor socket() just returned; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::enter_private_netns;
    use std::io::{Read, Write};

    fn netns() {
        enter_private_netns().expect("private netns (run the tests as root)");
    }

    fn exchange(client: &mut TcpStream, server: &mut TcpStream) {
        client.write_all(b"ping").expect("client write");
        let mut buf = [0; 4];
        server.read_exact(&mut buf).expect("server read");
        assert_eq!(&buf, b"ping");
        server.write_all(b"pong").expect("server write");
        client.read_exact(&mut buf).expect("client read");
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn pairs_connect_in_each_family() {
        netns();
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        for (addr, (mut c, mut s)) in [
            (v4, pair(v4).expect("IPv4 pair")),
            (v6, pair(v6).expect("IPv6 pair")),
        ] {
            assert_eq!(c.peer_addr().expect("peer").ip(), addr);
            assert_eq!(s.local_addr().expect("local").ip(), addr);
            exchange(&mut c, &mut s);
        }
        let (mut c, mut s) = pair_v4_mapped().expect("v4-mapped pair");
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        for sa in [c.local_addr(), c.peer_addr(), s.local_addr(), s.peer_addr()] {
            assert_eq!(sa.expect("address").ip(), mapped);
        }
        exchange(&mut c, &mut s);
    }

    #[test]
    fn many_pairs_share_one_server_port() {
        netns();
        let pairs = many_pairs(IpAddr::V4(Ipv4Addr::LOCALHOST), 200).expect("200 pairs");
        assert_eq!(pairs.len(), 200);
        let port = pairs[0].1.local_addr().expect("local").port();
        for (c, s) in &pairs {
            assert_eq!(s.local_addr().expect("local").port(), port);
            assert_eq!(c.local_addr().expect("local"), s.peer_addr().expect("peer"));
            assert_eq!(state(c).expect("state"), SocketState::Established);
        }
    }

    #[test]
    fn deaf_peer_leaves_data_unacknowledged_until_undeafened() {
        netns();
        let (mut c, mut s) = pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
        deafen(&s).expect("deafen");
        c.write_all(&[7; 100]).expect("write");
        assert!(
            holds_for(Duration::from_millis(200), || outq(&c).ok() == Some(100)
                && inq(&s).ok() == Some(0)),
            "a deaf peer must neither ACK nor queue"
        );
        assert_eq!(
            outq_nsd(&c).expect("outq_nsd"),
            0,
            "the data was transmitted"
        );
        assert_eq!(info(&c).expect("TCP_INFO").tcpi_unacked, 1);
        let told = describe(&c);
        assert!(
            told.starts_with("Established,") && told.contains("outq 100 (unsent 0)"),
            "{told}"
        );
        undeafen(&s).expect("undeafen");
        assert_eq!(
            undeafen(&s).expect_err("second undeafen").raw_os_error(),
            Some(libc::ENOENT)
        );
        assert!(
            wait_until(Duration::from_secs(5), || outq(&c).ok() == Some(0)),
            "retransmission acknowledged after undeafen"
        );
        let mut buf = [0; 100];
        s.read_exact(&mut buf).expect("read");
        assert_eq!(buf, [7; 100]);
    }

    #[test]
    fn polling_helpers_time_out() {
        assert!(!wait_until(Duration::from_millis(20), || false));
        assert!(wait_until(Duration::ZERO, || true));
        assert!(holds_for(Duration::from_millis(20), || true));
        let mut n = 0;
        assert!(!holds_for(Duration::from_secs(10), || {
            n += 1;
            n < 3
        }));
    }
}
