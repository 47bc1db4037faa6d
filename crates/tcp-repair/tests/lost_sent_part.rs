//! A sent part the peer lost goes out whole in the restored socket's loss probe.
//!
//! The sent-but-unacknowledged part of a send queue is restored as sent (see the
//! `restore` module), so if the peer really lost it, only the restored socket's timers
//! resend it: the tail-loss probe (1 s after the restore, there is no RTT estimate yet)
//! resends the *last* queued segment. That recovers the whole part only if the part is
//! one segment, i.e. if the restored socket queued it with its real segment size. On
//! loopback (clamp 65483, more than the 32767 `TCP_MAXSEG` takes) the restore used to
//! leave the segment size at 524 bytes: 4 KiB became 8 segments, the probe's last one
//! landed in the peer's out-of-order queue, and the data waited for the 3 s
//! retransmission timeout. With 10,000 connections restored at once those timeouts
//! expire together (same timer-wheel slot), overflow the loopback's receive backlog,
//! and back off to 6, 12, 24 s (the repair bench's 60 s failure).
//!
//! Many connections at once, from one thread: the peers are deaf while the sockets
//! send, the sockets are dumped and closed, the peers hear again, and fresh sockets are
//! restored from the dumps.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::time::Duration;

use baton_proto::tcp::SocketFamily;
use baton_testkit::netstat::Counters;
use baton_testkit::pattern::Pattern;
use baton_testkit::{netns, tcp};

/// Connections restored at once.
const N: usize = 200;
/// Bytes each socket sends to its deaf peer: more than the old 524-byte segments, less
/// than any real segment size on loopback.
const K: usize = 4096;
const STEP: Duration = Duration::from_secs(30);

fn fresh_socket(family: SocketFamily) -> TcpStream {
    let domain = match family {
        SocketFamily::Inet => libc::AF_INET,
        SocketFamily::Inet6 => libc::AF_INET6,
    };
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn run(ip: IpAddr) {
    netns::enter_private_netns().expect("private netns (run the tests as root)");
    let pairs = tcp::many_pairs(ip, N).expect("connections");
    let pattern = |i: usize| Pattern::new(0x5E57_0000 ^ i as u64);
    let peer_pattern = |i: usize| Pattern::new(0x9EE2_0000 ^ i as u64);
    let (a, peers): (Vec<TcpStream>, Vec<TcpStream>) = pairs.into_iter().unzip();
    // The peers talk first, as in a live flow: their segments bring the sockets' idea
    // of the peer's window up to date, so the answer to the restored socket's window
    // probe does not widen it (which would resize the segments before the loss probe
    // and hide the cause).
    for (i, (a, p)) in a.iter().zip(&peers).enumerate() {
        std::io::Write::write_all(&mut &*p, &peer_pattern(i).bytes(0, K)).expect("peer writes");
        let mut got = vec![0u8; K];
        (&*a).read_exact(&mut got).expect("read the peer's bytes");
        peer_pattern(i)
            .verify(0, &got)
            .unwrap_or_else(|m| panic!("connection {i}: {m}"));
    }
    for (i, (a, p)) in a.iter().zip(&peers).enumerate() {
        tcp::deafen(p).expect("deafen the peer");
        let sent = std::io::Write::write(&mut &*a, &pattern(i).bytes(0, K)).expect("write");
        assert_eq!(sent, K, "the send buffer takes {K} bytes at once");
    }
    assert!(
        tcp::wait_until(STEP, || a.iter().all(|s| tcp::outq_nsd(s).ok() == Some(0))),
        "the sockets did not transmit their data"
    );

    let states: Vec<_> = a
        .iter()
        .map(|s| baton_tcp_repair::dump(s.as_fd()).expect("dump"))
        .collect();
    for s in &states {
        assert_eq!(
            (s.send_queue.len(), s.send_unsent),
            (K, 0),
            "all sent, none acked"
        );
        assert!(
            s.options.mss_clamp > 32767,
            "loopback clamp {}",
            s.options.mss_clamp
        );
    }
    // Closed while frozen: silently. The peers never got a byte of it.
    drop(a);
    for p in &peers {
        tcp::undeafen(p).expect("undeafen the peer");
    }
    let before = Counters::read().expect("counters");
    let b: Vec<TcpStream> = states
        .iter()
        .map(|s| {
            let b = fresh_socket(s.family);
            let report = baton_tcp_repair::restore(b.as_fd(), s).expect("restore");
            assert_eq!(report.send_queue_written, K as u64);
            b
        })
        .collect();
    // The cause itself: the lost part is queued as one segment of a real size. (It
    // was 8 of 524 bytes; an ACK that widens the window may raise the size later, but
    // the queued segments stay as they were cut.)
    for (i, s) in b.iter().enumerate() {
        let info = tcp::info(s).expect("TCP_INFO");
        assert!(
            info.tcpi_unacked == 1 && info.tcpi_snd_mss as usize >= K,
            "connection {i}: the lost {K} bytes are queued as {} segment(s), segment size {}",
            info.tcpi_unacked,
            info.tcpi_snd_mss
        );
    }

    // Every peer gets every byte (acknowledged, then read and checked)...
    let delivered = tcp::wait_until(STEP, || b.iter().all(|s| tcp::outq(s).ok() == Some(0)));
    let counters = Counters::read().expect("counters").since(&before);
    let names = [
        "TcpExt.TCPLossProbes",
        "TcpExt.TCPTimeouts",
        "TcpExt.TCPOFOQueue",
        "Tcp.RetransSegs",
        "lo.rx_dropped",
    ];
    if !delivered {
        let stuck: Vec<String> = b
            .iter()
            .enumerate()
            .filter(|(_, s)| tcp::outq(s).ok() != Some(0))
            .take(5)
            .map(|(i, s)| format!("connection {i}: {}", tcp::describe(s)))
            .collect();
        panic!(
            "not every restored connection delivered its lost sent part within {STEP:?}; \
             counters since the restore: {}; first stuck: {stuck:#?}",
            counters.show(&names)
        );
    }
    for (i, p) in peers.iter().enumerate() {
        let mut got = vec![0u8; K];
        (&*p).read_exact(&mut got).expect("the peer reads");
        pattern(i)
            .verify(0, &got)
            .unwrap_or_else(|m| panic!("connection {i}: {m}"));
    }
    // ...in order: the retransmission started at the first lost byte, so nothing ever
    // waited in the peers' out-of-order queues (with 524-byte segments, every probe
    // did).
    assert_eq!(
        counters.get("TcpExt.TCPOFOQueue"),
        0,
        "counters since the restore: {}",
        counters.show(&names)
    );
}

#[test]
fn lost_sent_part_goes_out_whole_ipv4() {
    run(IpAddr::V4(Ipv4Addr::LOCALHOST));
}

#[test]
fn lost_sent_part_goes_out_whole_ipv6() {
    run(IpAddr::V6(Ipv6Addr::LOCALHOST));
}
