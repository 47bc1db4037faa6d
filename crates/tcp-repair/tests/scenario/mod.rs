//! A connection with data queued in both directions, put into a chosen TCP state,
//! migrated by the caller, then checked byte for byte in both directions.
//!
//! Roles: `A` is the socket to migrate, `P` its peer. To create data that `A` sent but
//! `P` has not acknowledged, `P` is made deaf (a drop-all socket filter) before `A`
//! writes. `P` hears again once `A` has been dumped and closed (`A` is frozen and closed
//! in repair mode, so `P` sees nothing in between).
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_proto::repair::RestoreReport;
use baton_proto::tcp::{TcpConnState, TcpState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
    /// An IPv6 socket talking to ::ffff:127.0.0.1.
    V4Mapped,
}

pub struct Scenario {
    pub family: Family,
    pub state: TcpState,
    /// Bytes A writes while P is deaf (A→P, unacknowledged or unsent at dump time).
    pub send_bytes: usize,
    /// Bytes P writes that A leaves unread (P→A, in A's receive queue at dump time).
    pub recv_bytes: usize,
}

const SEED_A_TO_P: u64 = 0xA11CE;
const SEED_P_TO_A: u64 = 0xB0B;
const EXTRA: usize = 100_000;
const TIMEOUT: Duration = Duration::from_secs(20);

/// Byte `i` of the stream with `seed`: depends on the position, so a lost, duplicated
/// or reordered byte shows up.
pub fn pattern_byte(seed: u64, i: usize) -> u8 {
    let x = (i as u64 ^ seed.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

pub fn pattern(seed: u64, offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| pattern_byte(seed, i))
        .collect()
}

/// Enter a private network namespace for this thread, with loopback up.
pub fn enter_private_netns() {
    baton_testkit::netns::enter_private_netns().expect("private network namespace (needs root)");
}

/// An int socket option's value; panics on failure.
pub fn get_sockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> i32 {
    let mut v: libc::c_int = -7;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt of an int into a live local, its size in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
    v
}

/// Set an int socket option; panics on failure.
pub fn sockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) {
    // SAFETY: setsockopt with a pointer to a live int.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            4,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt({level}, {name}): {}",
        std::io::Error::last_os_error()
    );
}

pub fn inq(fd: BorrowedFd<'_>) -> usize {
    baton_testkit::tcp::inq(fd).expect("SIOCINQ") as usize
}

pub fn outq(fd: BorrowedFd<'_>) -> usize {
    baton_testkit::tcp::outq(fd).expect("SIOCOUTQ") as usize
}

/// The kernel's TCP state number (TCP_INFO's first byte).
pub fn tcp_state(fd: BorrowedFd<'_>) -> u8 {
    baton_testkit::tcp::state(fd).expect("TCP_INFO") as u8
}

pub fn deafen(fd: BorrowedFd<'_>) {
    baton_tcp_repair::attach_deaf_filter(fd).expect("attach deaf filter");
}

pub fn undeafen(fd: BorrowedFd<'_>) {
    baton_tcp_repair::make_hearing(fd).expect("hear again");
}

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn new_socket(domain: i32) -> OwnedFd {
    // SAFETY: plain socket(2), checked below, then owned.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A listener for the family (dual-stack for v4-mapped).
pub fn listener(family: Family) -> TcpListener {
    match family {
        Family::V4 => TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind v4"),
        Family::V6 => TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).expect("bind v6"),
        Family::V4Mapped => {
            let fd = new_socket(libc::AF_INET6);
            sockopt_int(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0);
            let l = TcpListener::from(fd);
            let addr = socket2_bind_any6(&l);
            let _ = addr;
            l
        }
    }
}

fn socket2_bind_any6(l: &TcpListener) -> SocketAddr {
    // SAFETY: zeroed sockaddr_in6 = [::]:0.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    // SAFETY: bind/listen with a valid sockaddr_in6.
    unsafe {
        assert_eq!(
            libc::bind(
                l.as_raw_fd(),
                (&sa as *const libc::sockaddr_in6).cast(),
                std::mem::size_of_val(&sa) as u32
            ),
            0
        );
        assert_eq!(libc::listen(l.as_raw_fd(), 1024), 0);
    }
    l.local_addr().expect("local addr")
}

/// Where the client connects for `family`.
pub fn connect_addr(family: Family, l: &TcpListener) -> SocketAddr {
    let port = l.local_addr().expect("listener addr").port();
    match family {
        Family::V4 => (Ipv4Addr::LOCALHOST, port).into(),
        Family::V6 => (Ipv6Addr::LOCALHOST, port).into(),
        Family::V4Mapped => (Ipv4Addr::LOCALHOST.to_ipv6_mapped(), port).into(),
    }
}

/// A connected pair `(a, p)`; `a_rcvbuf` sets A's receive buffer before connecting.
pub fn pair(family: Family, l: &TcpListener, a_rcvbuf: Option<i32>) -> (TcpStream, TcpStream) {
    let domain = if family == Family::V4 {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = new_socket(domain);
    if let Some(size) = a_rcvbuf {
        sockopt_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, size);
    }
    let a = TcpStream::from(fd);
    let dest = connect_addr(family, l);
    connect_fd(a.as_fd(), dest);
    let (p, _) = l.accept().expect("accept");
    for s in [&a, &p] {
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(TIMEOUT)).expect("timeout");
    }
    (a, p)
}

fn connect_fd(fd: BorrowedFd<'_>, dest: SocketAddr) {
    let addr = nix::sys::socket::SockaddrStorage::from(dest);
    nix::sys::socket::connect(fd.as_raw_fd(), &addr)
        .unwrap_or_else(|e| panic!("connect {dest}: {e}"));
}

/// A fresh, unbound TCP socket of `family` to restore into.
pub fn fresh_socket(family: baton_proto::tcp::SocketFamily) -> TcpStream {
    let domain = match family {
        baton_proto::tcp::SocketFamily::Inet => libc::AF_INET,
        baton_proto::tcp::SocketFamily::Inet6 => libc::AF_INET6,
    };
    TcpStream::from(new_socket(domain))
}

/// The usual end of a migration after the caller dumped `a` into `state`: close `a`
/// while frozen, let the peer hear again, restore into a fresh socket and finish its
/// send queue.
pub fn restore_after_close(
    a: TcpStream,
    state: TcpConnState,
    hear: &dyn Fn(),
) -> (TcpStream, TcpConnState) {
    drop(a);
    hear();
    let b = fresh_socket(state.family);
    let report = baton_tcp_repair::restore(b.as_fd(), &state).expect("restore");
    finish_send_queue(&b, &state, report);
    (b, state)
}

/// Write what the restore left of the send queue, then our FIN if it is pending.
pub fn finish_send_queue(b: &TcpStream, state: &TcpConnState, report: RestoreReport) {
    let rest = &state.send_queue[report.send_queue_written as usize..];
    (&*b).write_all(rest).expect("write rest of send queue");
    if report.fin_pending {
        b.shutdown(Shutdown::Write).expect("send pending FIN");
    }
}

/// Write as much as the socket takes without blocking.
fn write_nonblocking(s: &TcpStream, data: &[u8]) -> usize {
    s.set_nonblocking(true).expect("nonblocking");
    let mut done = 0;
    while done < data.len() {
        match (&*s).write(&data[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    s.set_nonblocking(false).expect("blocking");
    done
}

/// Read the stream to its end and check it is exactly `pattern(seed, 0, total)`.
fn read_and_verify(mut s: &TcpStream, seed: u64, total: usize, who: &str) {
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e) => panic!("{who}: read after {got} of {total} bytes: {e}"),
        };
        if n == 0 {
            break;
        }
        for (k, &byte) in buf[..n].iter().enumerate() {
            let i = got + k;
            assert!(i < total, "{who}: more than the {total} bytes sent");
            assert_eq!(
                byte,
                pattern_byte(seed, i),
                "{who}: wrong byte at offset {i}"
            );
        }
        got += n;
    }
    assert_eq!(got, total, "{who}: stream ended early");
}

impl Scenario {
    /// Build the connection, hand A to `migrate` (which must return the restored socket
    /// and the state it dumped; it calls `hear` once A is dumped and closed), and check
    /// both streams end to end.
    pub fn run(self, migrate: impl FnOnce(TcpStream, &dyn Fn()) -> (TcpStream, TcpConnState)) {
        enter_private_netns();
        let l = listener(self.family);
        let big_recv =
            (self.recv_bytes > 32 << 10).then(|| (self.recv_bytes * 2 + (1 << 20)) as i32);
        let (a, p) = pair(self.family, &l, big_recv);

        // P→A data that A leaves unread.
        (&p).write_all(&pattern(SEED_P_TO_A, 0, self.recv_bytes))
            .expect("P writes");
        wait_until("A to receive P's data", || {
            inq(a.as_fd()) == self.recv_bytes
        });
        wait_until("P's data to be acknowledged", || outq(p.as_fd()) == 0);
        if self.state.fin_received() {
            p.shutdown(Shutdown::Write).expect("P sends FIN");
            wait_until("CLOSE_WAIT", || tcp_state(a.as_fd()) == 8);
        }

        // A→P data.
        let a_written;
        if self.state == TcpState::FinWait2 {
            // Our FIN must be acknowledged, so the data is too: P holds it unread.
            (&a).write_all(&pattern(SEED_A_TO_P, 0, self.send_bytes))
                .expect("A writes");
            a_written = self.send_bytes;
            a.shutdown(Shutdown::Write).expect("A sends FIN");
            wait_until("FIN_WAIT2", || tcp_state(a.as_fd()) == 5);
            deafen(p.as_fd());
        } else {
            deafen(p.as_fd());
            a_written = write_nonblocking(&a, &pattern(SEED_A_TO_P, 0, self.send_bytes));
            assert_eq!(
                a_written, self.send_bytes,
                "A's send buffer took only {a_written} bytes"
            );
            if self.state.fin_sent() {
                a.shutdown(Shutdown::Write).expect("A sends FIN");
            }
            // Let A transmit what the window allows (those bytes become sent-unacked).
            std::thread::sleep(Duration::from_millis(30));
        }
        let want_state = match self.state {
            TcpState::Established => 1,
            TcpState::FinWait1 => 4,
            TcpState::FinWait2 => 5,
            TcpState::CloseWait => 8,
            TcpState::LastAck => 9,
        };
        assert_eq!(
            tcp_state(a.as_fd()),
            want_state,
            "A is not in {:?}",
            self.state
        );

        let hear = || undeafen(p.as_fd());
        let (b, dumped) = migrate(a, &hear);
        assert_eq!(dumped.state, self.state);
        assert_eq!(
            dumped.recv_queue.len(),
            self.recv_bytes,
            "dumped receive queue"
        );
        if self.state != TcpState::FinWait2 {
            assert_eq!(
                dumped.send_queue.len(),
                self.send_bytes,
                "dumped send queue"
            );
            assert_eq!(dumped.send_queue, pattern(SEED_A_TO_P, 0, self.send_bytes));
        }
        if self.state == TcpState::Established && self.send_bytes >= 200_000 {
            let unacked = dumped.send_queue.len() - dumped.send_unsent as usize;
            assert!(
                unacked > 0 && dumped.send_unsent > 0,
                "want both sent-unacked and unsent data, got {unacked} + {}",
                dumped.send_unsent
            );
        }
        b.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        b.set_write_timeout(Some(TIMEOUT)).expect("timeout");

        // After the migration both sides keep streaming where the state allows.
        let b_can_send = !self.state.fin_sent();
        let p_can_send = !self.state.fin_received();
        let a_total = a_written + if b_can_send { EXTRA } else { 0 };
        let p_total = self.recv_bytes + if p_can_send { EXTRA } else { 0 };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                if b_can_send {
                    (&b).write_all(&pattern(SEED_A_TO_P, a_written, EXTRA))
                        .expect("B writes");
                    b.shutdown(Shutdown::Write).expect("B sends FIN");
                }
            });
            scope.spawn(|| {
                if p_can_send {
                    (&p).write_all(&pattern(SEED_P_TO_A, self.recv_bytes, EXTRA))
                        .expect("P writes");
                    p.shutdown(Shutdown::Write).expect("P sends FIN");
                }
            });
            scope.spawn(|| read_and_verify(&p, SEED_A_TO_P, a_total, "P"));
            scope.spawn(|| read_and_verify(&b, SEED_P_TO_A, p_total, "B"));
        });
    }
}
