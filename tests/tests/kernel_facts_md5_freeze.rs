//! Kernel facts behind the freeze key: a TCP-MD5 key (RFC 2385) for a connection's own
//! peer, which the peer does not have, makes the socket deaf. `baton_tcp_repair`'s
//! `deaf` and `md5` modules rely on exactly these; if one fails, a frozen socket could
//! acknowledge data that is then lost with it, or a thawed one stay deaf.
//!
//! Pinned on IPv4, IPv6 and a v4-mapped peer of a dual-stack `AF_INET6` socket (the key
//! given as the `sockaddr_in6` getpeername returns, which the kernel files as an IPv4
//! key):
//! * with the key installed, everything from the peer is dropped before TCP sees it:
//!   data, a pure ACK of our data, FIN, RST — nothing acknowledged (the peer's SIOCOUTQ
//!   stays), nothing queued (our SIOCINQ stays), no state change, and `tcpi_segs_in`
//!   does not move (`tcp_inbound_hash` runs before `tcp_segs_in()`, which the progress
//!   mark of the pre-dump needs);
//! * installing and removing the key needs no capability;
//! * it holds in repair mode too, and a socket closed in repair mode with the key sends
//!   nothing;
//! * removing the key (key length 0) restores normal processing: the peer's
//!   retransmission is accepted; removing a key that is not there fails with ENOENT (so
//!   a thaw may remove unconditionally).
//!
//! Same rules as `kernel_facts`: a private network namespace per test, libc only (no
//! baton code under test), non-blocking waits with deadlines.

mod common;

use std::io::{self, Read, Write};
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};

use baton_testkit::netstat::Counters;
use baton_testkit::tcp::{self, SocketState};
use common::*;

/// `struct tcp_md5sig` (uapi/linux/tcp.h): the address (a `sockaddr_storage`, 128
/// bytes), flags, prefix length, key length (u16 at 130), ifindex, the key (80 bytes at
/// 136); 216 bytes in all.
const MD5SIG_LEN: usize = 216;
const MD5SIG_KEYLEN_AT: usize = 130;
const MD5SIG_KEY_AT: usize = 136;
/// A key the peer does not have (any bytes will do: the peer has none at all).
const KEY: &[u8; 32] = b"baton kernel facts: freeze key!!";
/// Bytes the peer writes while we are deaf.
const DATA: usize = 100;

#[derive(Debug, Clone, Copy)]
enum Family {
    V4,
    V6,
    V4Mapped,
}

const FAMILIES: [Family; 3] = [Family::V4, Family::V6, Family::V4Mapped];

/// A loopback pair of `family`: (ours, the peer), the peer being the accepted end.
fn pair_of(family: Family) -> (TcpStream, TcpStream) {
    let (ours, peer) = match family {
        Family::V4 => tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        Family::V6 => tcp::pair(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        Family::V4Mapped => tcp::pair_v4_mapped(),
    }
    .unwrap_or_else(|e| panic!("{family:?} pair: {e}"));
    if let Family::V4Mapped = family {
        let SocketAddr::V6(v6) = ours.peer_addr().expect("peer address") else {
            panic!("a v4-mapped pair has AF_INET6 addresses");
        };
        assert!(v6.ip().to_ipv4_mapped().is_some(), "{v6} is v4-mapped");
    }
    (ours, peer)
}

/// The option value that installs `key` for the socket's peer (an empty key removes
/// it), with the address as getpeername gives it.
fn md5sig(sock: &TcpStream, key: &[u8]) -> Vec<u8> {
    let (addr, _) = sockaddr(sock.peer_addr().expect("peer address"));
    let mut opt = vec![0u8; MD5SIG_LEN];
    // SAFETY: sockaddr_storage is plain bytes, 128 of them; we only read them.
    let addr_bytes = unsafe {
        std::slice::from_raw_parts(
            (&addr as *const libc::sockaddr_storage).cast::<u8>(),
            size_of::<libc::sockaddr_storage>(),
        )
    };
    opt[..addr_bytes.len()].copy_from_slice(addr_bytes);
    opt[MD5SIG_KEYLEN_AT..MD5SIG_KEYLEN_AT + 2].copy_from_slice(&(key.len() as u16).to_ne_bytes());
    opt[MD5SIG_KEY_AT..MD5SIG_KEY_AT + key.len()].copy_from_slice(key);
    opt
}

fn add_key(sock: &TcpStream) -> io::Result<()> {
    setsockopt_bytes(
        sock,
        libc::IPPROTO_TCP,
        libc::TCP_MD5SIG,
        &md5sig(sock, KEY),
    )
}

fn remove_key(sock: &TcpStream) -> io::Result<()> {
    setsockopt_bytes(
        sock,
        libc::IPPROTO_TCP,
        libc::TCP_MD5SIG,
        &md5sig(sock, &[]),
    )
}

/// What must not move on a deaf socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ours {
    state: u8,
    segs_in: u32,
    inq: u32,
}

fn ours(sock: &TcpStream) -> Ours {
    let info = tcp_info(sock);
    Ours {
        state: info.tcpi_state,
        segs_in: info.tcpi_segs_in,
        inq: tcp::inq(sock).expect("SIOCINQ"),
    }
}

/// Segments the namespace dropped for want of an MD5 signature (`TCPMD5NotFound`).
fn md5_drops() -> i64 {
    Counters::read()
        .expect("the namespace's counters")
        .get("TcpExt.TCPMD5NotFound")
}

/// Over [`QUIET`]: `sock` shows exactly `before`, and `peer_ok` holds; and the key is
/// what dropped the peer's segments (`TCPMD5NotFound` grew since `drops`).
#[track_caller]
fn stays_deaf(
    what: &str,
    sock: &TcpStream,
    before: Ours,
    drops: i64,
    mut peer_ok: impl FnMut() -> bool,
) {
    assert!(
        tcp::holds_for(QUIET, || ours(sock) == before && peer_ok()),
        "{what}: {before:?} → {:?} ({})",
        ours(sock),
        tcp::describe(sock)
    );
    assert!(md5_drops() > drops, "{what}: no segment dropped by the key");
}

/// The peer's data with the key installed: not acknowledged, not queued, not counted.
/// Key removed: the peer's retransmission is accepted, traffic flows both ways.
#[track_caller]
fn peer_data_waits_for_the_key_to_go(
    family: Family,
    ours_sock: &mut TcpStream,
    peer: &mut TcpStream,
) {
    let before = ours(ours_sock);
    let drops = md5_drops();
    peer.write_all(&[b'p'; DATA]).expect("the peer writes");
    wait_for("the peer transmitted", || {
        tcp::outq_nsd(&*peer).ok() == Some(0)
    });
    stays_deaf(
        &format!("{family:?}: peer data"),
        ours_sock,
        before,
        drops,
        || tcp::outq(&*peer).ok() == Some(DATA as u32),
    );

    remove_key(ours_sock).expect("remove the key");
    wait_for("the peer's retransmission accepted", || {
        tcp::inq(&*ours_sock).ok() == Some(DATA as u32) && tcp::outq(&*peer).ok() == Some(0)
    });
    let mut got = [0u8; DATA];
    ours_sock
        .read_exact(&mut got)
        .expect("read the peer's data");
    assert_eq!(got, [b'p'; DATA]);
    ours_sock.write_all(b"back").expect("write after the key");
    let mut back = [0u8; 4];
    peer.read_exact(&mut back).expect("the peer reads");
    assert_eq!(&back, b"back");
}

#[test]
fn key_drops_the_peers_data_until_removed() {
    private_netns();
    for family in FAMILIES {
        let (mut ours_sock, mut peer) = pair_of(family);
        add_key(&ours_sock).unwrap_or_else(|e| panic!("{family:?}: add the key: {e}"));
        peer_data_waits_for_the_key_to_go(family, &mut ours_sock, &mut peer);
    }
}

/// Drop this thread's credentials to uid/gid 65534 (no capabilities left).
fn drop_to_nobody() {
    const NOBODY: libc::c_long = 65534;
    // SAFETY: raw syscalls with integer arguments; they change only this thread's
    // credentials (the libc wrappers would change every thread's).
    let rc = unsafe {
        libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY)
            | libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY)
    };
    assert_eq!(rc, 0, "drop to nobody: {}", io::Error::last_os_error());
}

/// The key is per address and per socket, so any holder of a socket may set it: no
/// capability is involved. A thread that dropped root (raw setresuid, so only that thread
/// changes; leaving uid 0 clears its capabilities) installs the key, and cannot enter
/// repair mode, which shows that it is unprivileged.
#[test]
fn key_needs_no_capability() {
    private_netns();
    for family in FAMILIES {
        let (mut ours_sock, mut peer) = pair_of(family);
        let (added, repair_refused) = std::thread::scope(|s| {
            s.spawn(|| {
                drop_to_nobody();
                let repair_refused = errno_of(repair(&ours_sock, REPAIR_ON));
                (add_key(&ours_sock), repair_refused)
            })
            .join()
            .expect("the unprivileged thread")
        });
        assert_eq!(
            repair_refused,
            libc::EPERM,
            "{family:?}: the thread is unprivileged"
        );
        added.unwrap_or_else(|e| panic!("{family:?}: add the key as nobody: {e}"));
        let removed = std::thread::scope(|s| {
            s.spawn(|| {
                drop_to_nobody();
                // Deaf first, as nobody; then the key goes, as nobody.
                let before = ours(&ours_sock);
                let drops = md5_drops();
                peer.write_all(&[b'n'; DATA]).expect("the peer writes");
                stays_deaf(
                    &format!("{family:?}: as nobody"),
                    &ours_sock,
                    before,
                    drops,
                    || tcp::outq(&peer).ok() == Some(DATA as u32),
                );
                remove_key(&ours_sock)
            })
            .join()
            .expect("the unprivileged thread")
        });
        removed.unwrap_or_else(|e| panic!("{family:?}: remove the key as nobody: {e}"));
        wait_for("the peer's retransmission accepted", || {
            tcp::inq(&ours_sock).ok() == Some(DATA as u32) && tcp::outq(&peer).ok() == Some(0)
        });
        let mut got = [0u8; DATA];
        ours_sock.read_exact(&mut got).expect("read");
    }
}

/// A pure ACK of our data is dropped too: snd_una stays (our SIOCOUTQ), nothing counted.
/// The ACK must leave the peer after the key is in: the peer acknowledges late (delayed
/// ACK, TCP_QUICKACK off), and the byte is written just before the key goes in. Should
/// the ACK have come first anyway, that attempt proves nothing and is repeated.
#[test]
fn key_drops_a_pure_ack_of_our_data() {
    private_netns();
    const ATTEMPTS: usize = 20;
    for family in FAMILIES {
        let (mut ours_sock, peer) = pair_of(family);
        let mut done = false;
        for _ in 0..ATTEMPTS {
            setsockopt_int(&peer, libc::IPPROTO_TCP, libc::TCP_QUICKACK, 0).expect("QUICKACK 0");
            let peer_inq = tcp::inq(&peer).expect("peer SIOCINQ");
            let peer_out = tcp_info(&peer).tcpi_segs_out;
            let drops = md5_drops();
            ours_sock.write_all(b"a").expect("write one byte");
            add_key(&ours_sock).expect("add the key");
            let before = ours(&ours_sock);
            if tcp::outq(&ours_sock).expect("SIOCOUTQ") == 0 {
                // The ACK was faster than the key: try again.
                remove_key(&ours_sock).expect("remove the key");
                continue;
            }
            // The byte went out before the key (unsigned) and reached the peer, whose
            // ACK leaves when its delayed-ACK timer fires.
            wait_for("the peer received our byte and sent its ACK", || {
                tcp::inq(&peer).ok() == Some(peer_inq + 1)
                    && tcp_info(&peer).tcpi_segs_out != peer_out
            });
            stays_deaf(
                &format!("{family:?}: pure ACK"),
                &ours_sock,
                before,
                drops,
                || tcp::outq(&ours_sock).ok() == Some(1),
            );
            remove_key(&ours_sock).expect("remove the key");
            wait_for("our retransmission acknowledged", || {
                tcp::outq(&ours_sock).ok() == Some(0)
            });
            done = true;
            break;
        }
        assert!(
            done,
            "{family:?}: the peer's ACK beat the key {ATTEMPTS} times"
        );
    }
}

/// The peer's FIN is dropped: we stay ESTABLISHED, the peer stays in FIN_WAIT1 with its
/// FIN unacknowledged. Key removed: the FIN is retransmitted and accepted.
#[test]
fn key_drops_the_peers_fin() {
    private_netns();
    for family in FAMILIES {
        let (ours_sock, peer) = pair_of(family);
        add_key(&ours_sock).expect("add the key");
        let before = ours(&ours_sock);
        let drops = md5_drops();
        peer.shutdown(Shutdown::Write).expect("the peer's FIN");
        stays_deaf(
            &format!("{family:?}: FIN"),
            &ours_sock,
            before,
            drops,
            || tcp::state(&peer).ok() == Some(SocketState::FinWait1),
        );
        assert_eq!(before.state, SocketState::Established as u8);
        remove_key(&ours_sock).expect("remove the key");
        wait_for("the FIN accepted", || {
            tcp::state(&ours_sock).ok() == Some(SocketState::CloseWait)
        });
    }
}

/// The peer's RST is dropped: the connection stays ESTABLISHED here.
#[test]
fn key_drops_the_peers_rst() {
    private_netns();
    for family in FAMILIES {
        let (ours_sock, peer) = pair_of(family);
        add_key(&ours_sock).expect("add the key");
        let before = ours(&ours_sock);
        // SO_LINGER with a zero timeout: close() sends RST instead of FIN.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `linger` is a plain C struct; the kernel reads size_of::<linger>() bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&linger as *const libc::linger).cast::<u8>(),
                size_of::<libc::linger>(),
            )
        };
        setsockopt_bytes(&peer, libc::SOL_SOCKET, libc::SO_LINGER, bytes).expect("SO_LINGER 0");
        let rsts = Counters::read().expect("counters").get("Tcp.OutRsts");
        let drops = md5_drops();
        drop(peer);
        stays_deaf(
            &format!("{family:?}: RST"),
            &ours_sock,
            before,
            drops,
            || true,
        );
        assert_eq!(before.state, SocketState::Established as u8);
        assert!(
            Counters::read().expect("counters").get("Tcp.OutRsts") > rsts,
            "{family:?}: the peer did send its RST"
        );
    }
}

/// Repair mode does not change any of this: a socket in repair mode with the key
/// acknowledges and queues nothing (repair mode alone would, E5), and after the key is
/// removed and repair mode left (with the window probe) the data arrives.
#[test]
fn key_drops_in_repair_mode_too() {
    private_netns();
    for family in FAMILIES {
        let (mut ours_sock, mut peer) = pair_of(family);
        // The order a dump uses: deaf first, then repair mode.
        add_key(&ours_sock).expect("add the key");
        repair(&ours_sock, REPAIR_ON).expect("TCP_REPAIR on");
        let before = ours(&ours_sock);
        let drops = md5_drops();
        peer.write_all(&[b'r'; DATA]).expect("the peer writes");
        stays_deaf(
            &format!("{family:?}: repair mode"),
            &ours_sock,
            before,
            drops,
            || tcp::outq(&peer).ok() == Some(DATA as u32),
        );
        // The thaw's order: key removed, then repair off with the probe.
        remove_key(&ours_sock).expect("remove the key");
        repair(&ours_sock, REPAIR_OFF).expect("TCP_REPAIR off");
        wait_for("the peer's data after the thaw", || {
            tcp::inq(&ours_sock).ok() == Some(DATA as u32) && tcp::outq(&peer).ok() == Some(0)
        });
        let mut got = [0u8; DATA];
        ours_sock.read_exact(&mut got).expect("read");
        assert_eq!(got, [b'r'; DATA]);
        // Installing the key in repair mode works as well.
        repair(&ours_sock, REPAIR_ON).expect("TCP_REPAIR on");
        add_key(&ours_sock).expect("add the key in repair mode");
        repair(&ours_sock, REPAIR_OFF_NO_WP).expect("TCP_REPAIR off");
        peer_data_waits_for_the_key_to_go(family, &mut ours_sock, &mut peer);
    }
}

/// Removing a key that is not there: ENOENT, on a socket that never had one and after
/// the key is gone. A thaw removes unconditionally and treats ENOENT as done.
#[test]
fn removing_a_missing_key_is_enoent() {
    private_netns();
    for family in FAMILIES {
        let (ours_sock, _peer) = pair_of(family);
        assert_eq!(
            errno_of(remove_key(&ours_sock)),
            libc::ENOENT,
            "{family:?}: never had a key"
        );
        add_key(&ours_sock).expect("add the key");
        add_key(&ours_sock).expect("adding it again replaces it");
        remove_key(&ours_sock).expect("remove the key");
        assert_eq!(
            errno_of(remove_key(&ours_sock)),
            libc::ENOENT,
            "{family:?}: removed twice"
        );
    }
}

/// A socket with the key, in repair mode, closed with unread data (which would
/// otherwise send RST): nothing reaches the peer, which stays ESTABLISHED and counts no
/// segment (E2 holds with the key).
#[test]
fn closing_with_the_key_in_repair_mode_sends_nothing() {
    private_netns();
    for family in FAMILIES {
        let (ours_sock, mut peer) = pair_of(family);
        peer.write_all(b"unread").expect("the peer writes");
        wait_for("the data queued here", || {
            tcp::inq(&ours_sock).ok() == Some(6)
        });
        add_key(&ours_sock).expect("add the key");
        repair(&ours_sock, REPAIR_ON).expect("TCP_REPAIR on");
        let peer_in = tcp_info(&peer).tcpi_segs_in;
        drop(ours_sock);
        assert!(
            tcp::holds_for(QUIET, || tcp_info(&peer).tcpi_segs_in == peer_in
                && tcp::state(&peer).ok() == Some(SocketState::Established)),
            "{family:?}: the peer heard the close: {}",
            tcp::describe(&peer)
        );
    }
}
