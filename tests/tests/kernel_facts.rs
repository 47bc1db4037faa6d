//! Kernel facts: the TCP_REPAIR behaviours baton relies on, each pinned by one test.
//!
//! Every test is named after the fact it pins and cites where the fact was measured:
//! a section of `shared/reference/tcp-repair.md` and the experiment (`E<n>`) in
//! `shared/reference/tcp-repair-lab/`. When a kernel changes one of these behaviours, the
//! failing test names the broken assumption; fix the code that relies on it (and the
//! reference), not the test.
//!
//! Each test enters a private network namespace of its own (loopback only), so tests run
//! in parallel without seeing each other's ports, and they need root. They talk to the
//! kernel through `libc` directly (no baton code under test), assert exact errno values
//! and queue lengths, and never block: sockets made here are non-blocking and every wait
//! has a deadline. The libc wrappers they share with `kernel_facts_inflight` are in
//! `common`.

mod common;

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use baton_testkit::pattern::{Pattern, Reader, Writer};
use baton_testkit::tcp::{self, SocketState};
use common::*;

// ---------------------------------------------------------------------------------------
// Addresses: bind and connect in repair mode.

/// Reference §1 row 2 and §3.9, E6: in repair mode bind() uses SK_FORCE_REUSE and
/// ignores every address conflict, with a LISTEN socket or with a live connection;
/// without repair the same binds fail with EADDRINUSE (even with SO_REUSEADDR).
#[test]
fn repair_bind_ignores_address_conflicts() {
    private_netns();
    // A listener without SO_REUSEADDR (std's TcpListener would set it).
    let listener = tcp_socket(libc::AF_INET);
    bind(&listener, "127.0.0.1:0".parse().expect("addr")).expect("bind listener");
    listen(&listener).expect("listen");
    let listener = TcpListener::from(listener);
    let listen_addr = listener.local_addr().expect("listener address");
    let client = TcpStream::connect(listen_addr).expect("connect");
    let original = client.local_addr().expect("client address");

    for (what, addr) in [
        ("a LISTEN socket", listen_addr),
        ("a live connection", original),
    ] {
        let plain = tcp_socket(libc::AF_INET);
        assert_eq!(
            errno_of(bind(&plain, addr)),
            libc::EADDRINUSE,
            "plain bind next to {what}"
        );
        let reuse = tcp_socket(libc::AF_INET);
        setsockopt_int(&reuse, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).expect("SO_REUSEADDR");
        assert_eq!(
            errno_of(bind(&reuse, addr)),
            libc::EADDRINUSE,
            "SO_REUSEADDR bind next to {what}"
        );
        let repaired = tcp_socket(libc::AF_INET);
        repair(&repaired, REPAIR_ON).expect("TCP_REPAIR on");
        bind(&repaired, addr).unwrap_or_else(|e| panic!("repair-mode bind next to {what}: {e}"));
    }
}

/// Reference §1 row 3 and §3.9, E6/E19: a repair-mode connect onto a 4-tuple that a
/// live socket holds fails with EADDRNOTAVAIL (the ehash uniqueness check still applies,
/// also when the original is in repair mode itself). Once the original was closed in
/// repair mode, the same connect succeeds and gives ESTABLISHED without a handshake.
#[test]
fn repair_connect_with_live_duplicate_four_tuple_fails_eaddrnotavail() {
    private_netns();
    let (client, _server) = pair();
    let local = client.local_addr().expect("local");
    let peer = client.peer_addr().expect("peer");

    let attempt = || {
        let s = tcp_socket(libc::AF_INET);
        repair(&s, REPAIR_ON).expect("TCP_REPAIR on");
        bind(&s, local).expect("repair-mode bind to the original's address");
        connect(&s, peer).map(|()| s)
    };
    assert_eq!(errno_of(attempt()), libc::EADDRNOTAVAIL, "original open");
    repair(&client, REPAIR_ON).expect("TCP_REPAIR on the original");
    assert_eq!(
        errno_of(attempt()),
        libc::EADDRNOTAVAIL,
        "original open in repair mode"
    );

    drop(client); // closed in repair mode: no FIN, no TIME_WAIT
    let restored = attempt().expect("repair connect after the original was closed in repair");
    assert_eq!(
        tcp::state(&restored).expect("state"),
        SocketState::Established
    );
}

/// Reference §3.9 and §1 row 22, E6: SO_REUSEADDR reads 2 (SK_FORCE_REUSE) in repair
/// mode and 0 after repair off — with or without the window probe, on a fresh or an
/// established socket — even though it was 1 before. A restorer must set it again.
#[test]
fn repair_off_clears_so_reuseaddr() {
    private_netns();
    let (established, _server) = pair();
    let fresh_a = tcp_socket(libc::AF_INET);
    let fresh_b = tcp_socket(libc::AF_INET);
    let cases = [
        ("fresh socket, OFF", fresh_a.as_fd(), REPAIR_OFF),
        ("fresh socket, OFF_NO_WP", fresh_b.as_fd(), REPAIR_OFF_NO_WP),
        ("established socket, OFF", established.as_fd(), REPAIR_OFF),
    ];
    for (what, fd, off) in cases {
        let reuse =
            || getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR).expect("SO_REUSEADDR");
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1).expect("set SO_REUSEADDR");
        assert_eq!(reuse(), 1, "{what}: before repair");
        repair(fd, REPAIR_ON).expect("TCP_REPAIR on");
        assert_eq!(reuse(), 2, "{what}: in repair");
        repair(fd, off).expect("TCP_REPAIR off");
        assert_eq!(reuse(), 0, "{what}: after repair off");
    }
}

// ---------------------------------------------------------------------------------------
// Queue lengths and sequence numbers.

/// Reference §1 (sequence model) and §3.1, E7: SIOCINQ does not count a received FIN.
/// After the peer sent 10 bytes and FIN, SIOCINQ is 10 while rcv_nxt (TCP_QUEUE_SEQ of
/// the receive queue) advanced by 11. (passt assumes the opposite and subtracts one.)
#[test]
fn siocinq_excludes_received_fin() {
    private_netns();
    let (client, mut server) = pair();
    let rcv_nxt = |s: &TcpStream| {
        repair(s, REPAIR_ON).expect("TCP_REPAIR on");
        select_queue(s, RECV_QUEUE).expect("select RECV");
        let seq = queue_seq(s).expect("TCP_QUEUE_SEQ(RECV)");
        select_queue(s, NO_QUEUE).expect("select NO_QUEUE");
        repair(s, REPAIR_OFF_NO_WP).expect("TCP_REPAIR off");
        seq
    };
    let before = rcv_nxt(&client);

    server.write_all(&[b'z'; 10]).expect("peer writes 10 bytes");
    server.shutdown(Shutdown::Write).expect("peer sends FIN");
    wait_for("CLOSE_WAIT", || {
        tcp::state(&client).ok() == Some(SocketState::CloseWait)
    });

    assert_eq!(
        tcp::inq(&client).expect("SIOCINQ"),
        10,
        "SIOCINQ with 10 bytes + FIN"
    );
    assert_eq!(
        rcv_nxt(&client).wrapping_sub(before),
        11,
        "rcv_nxt advance: data + FIN"
    );
}

/// Reference §1 (sequence model) and §3.1, E7: SIOCOUTQ (write_seq − snd_una) counts our
/// unacknowledged FIN. FIN_WAIT1 with 10 unacked bytes: SIOCOUTQ 11, SIOCOUTQNSD 0. The
/// peer is made deaf so it never ACKs (the lab used traffic control instead).
#[test]
fn siocoutq_counts_our_fin() {
    private_netns();
    let (mut client, server) = pair();
    tcp::deafen(&server).expect("deafen the peer");
    client.write_all(&[b'v'; 10]).expect("write 10 bytes");
    client.shutdown(Shutdown::Write).expect("send FIN");
    wait_for("FIN_WAIT1 with everything transmitted", || {
        tcp::state(&client).ok() == Some(SocketState::FinWait1)
            && tcp::outq_nsd(&client).ok() == Some(0)
    });
    assert_eq!(
        tcp::outq(&client).expect("SIOCOUTQ"),
        11,
        "10 data bytes + our FIN"
    );
    assert_eq!(tcp::outq(&server).expect("peer SIOCOUTQ"), 0);
}

/// Reference §1 rows 5–6, E4/E9: TCP_QUEUE_SEQ sets the *start* of each queue, only
/// before connect (EPERM on an established socket); the repair connect keeps the values,
/// and bytes written to the SEND queue in repair mode advance write_seq.
#[test]
fn queue_seq_is_set_before_connect_only() {
    private_netns();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener");
    let s = tcp_socket(libc::AF_INET);
    repair(&s, REPAIR_ON).expect("TCP_REPAIR on");
    bind(&s, "127.0.0.1:0".parse().expect("addr")).expect("bind");
    select_queue(&s, RECV_QUEUE).expect("select RECV");
    set_queue_seq(&s, 1_000_000).expect("set rcv_nxt before connect");
    select_queue(&s, SEND_QUEUE).expect("select SEND");
    set_queue_seq(&s, 0xffff_fff0).expect("set write_seq before connect");
    connect(&s, listener.local_addr().expect("addr")).expect("repair connect");

    assert_eq!(queue_seq(&s).expect("write_seq"), 0xffff_fff0);
    assert_eq!(
        errno_of(set_queue_seq(&s, 5)),
        libc::EPERM,
        "set write_seq after connect"
    );
    // SAFETY: send() reads 32 bytes from a live array.
    let sent = unsafe { libc::send(s.as_raw_fd(), [b'q'; 32].as_ptr().cast(), 32, 0) };
    assert_eq!(sent, 32, "send in repair with SEND selected");
    assert_eq!(
        queue_seq(&s).expect("write_seq"),
        0x10,
        "write_seq advanced by 32, wrapping"
    );
    select_queue(&s, RECV_QUEUE).expect("select RECV");
    assert_eq!(queue_seq(&s).expect("rcv_nxt"), 1_000_000);
    assert_eq!(
        errno_of(set_queue_seq(&s, 5)),
        libc::EPERM,
        "set rcv_nxt after connect"
    );
}

/// Reference §1 row 7, E4: data written with the SEND queue selected in repair mode is
/// queued *and marked sent*: SIOCOUTQ grows, SIOCOUTQNSD stays 0.
#[test]
fn send_queue_write_in_repair_is_marked_sent() {
    private_netns();
    let (client, server) = pair();
    tcp::deafen(&server).expect("deafen the peer so nothing gets acknowledged");
    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    select_queue(&client, SEND_QUEUE).expect("select SEND");
    // SAFETY: send() reads 10 bytes from a live array.
    let sent = unsafe { libc::send(client.as_raw_fd(), [b'C'; 10].as_ptr().cast(), 10, 0) };
    assert_eq!(sent, 10);
    assert_eq!(tcp::outq(&client).expect("SIOCOUTQ"), 10);
    assert_eq!(
        tcp::outq_nsd(&client).expect("SIOCOUTQNSD"),
        0,
        "marked as already sent"
    );
}

/// Reference §3.8, E18 (and E4): a send-queue peek in repair mode returns the length of
/// the *whole* queue even when the buffer is smaller; only the buffer's worth is copied.
#[test]
fn send_queue_peek_returns_whole_queue_length() {
    private_netns();
    let (mut client, server) = pair();
    tcp::deafen(&server).expect("deafen the peer");
    let pattern = Pattern::new(18);
    Writer::new(pattern)
        .write_until(&mut client, 5000, DEADLINE)
        .expect("queue 5000 bytes");
    wait_for("SIOCOUTQ 5000", || tcp::outq(&client).ok() == Some(5000));

    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    select_queue(&client, SEND_QUEUE).expect("select SEND");
    let mut small = [0u8; 100];
    assert_eq!(
        peek(&client, &mut small).expect("peek 100"),
        5000,
        "peek with a 100-byte buffer"
    );
    pattern
        .verify(0, &small)
        .expect("the 100 bytes copied are the queue head");
    let mut big = vec![0u8; 5001];
    assert_eq!(
        peek(&client, &mut big).expect("peek 5001"),
        5000,
        "peek with room to spare"
    );
    pattern.verify(0, &big[..5000]).expect("whole queue");
}

/// Reference §1 row 19, E4: SO_PEEK_OFF applies to repair-mode peeks: the peek starts at
/// the offset and advances it. A dumper must set it to −1 before peeking.
#[test]
fn peek_off_shifts_repair_peek() {
    private_netns();
    let (client, mut server) = pair();
    let pattern = Pattern::new(4);
    Writer::new(pattern)
        .write_until(&mut server, 3000, DEADLINE)
        .expect("peer writes 3000 bytes");
    wait_for("3000 bytes queued", || tcp::inq(&client).ok() == Some(3000));

    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    select_queue(&client, RECV_QUEUE).expect("select RECV");
    setsockopt_int(&client, libc::SOL_SOCKET, SO_PEEK_OFF, 1000).expect("SO_PEEK_OFF 1000");
    let mut buf = vec![0u8; 5000];
    assert_eq!(
        peek(&client, &mut buf).expect("peek"),
        2000,
        "peek starts at offset 1000"
    );
    pattern
        .verify(1000, &buf[..2000])
        .expect("bytes 1000..3000");
    assert_eq!(
        getsockopt_int(&client, libc::SOL_SOCKET, SO_PEEK_OFF).expect("SO_PEEK_OFF"),
        3000,
        "the peek advanced SO_PEEK_OFF"
    );
    setsockopt_int(&client, libc::SOL_SOCKET, SO_PEEK_OFF, -1).expect("SO_PEEK_OFF -1");
    assert_eq!(
        peek(&client, &mut buf).expect("peek"),
        3000,
        "whole queue with SO_PEEK_OFF −1"
    );
    pattern.verify(0, &buf[..3000]).expect("bytes 0..3000");
}

// ---------------------------------------------------------------------------------------
// Options, window and timestamps.

/// Reference §1 row 14 and §3.5, E12: TCP_TIMESTAMP must be set *after* connect. Set
/// before, the repair connect re-derives the µs-clock flag from the route and the value
/// read back is garbage (the offset was computed for the other clock). Set after, it
/// reads back as set (µs clock, ± a few ms) with bit 0 — the µs flag — kept.
#[test]
fn tcp_timestamp_must_be_set_after_connect() {
    private_netns();
    const TS: u32 = 123_457; // odd: bit 0 asks for the µs clock
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener");
    let target = listener.local_addr().expect("addr");
    let restore = |before_connect: bool| {
        let s = tcp_socket(libc::AF_INET);
        repair(&s, REPAIR_ON).expect("TCP_REPAIR on");
        bind(&s, "127.0.0.1:0".parse().expect("addr")).expect("bind");
        if before_connect {
            setsockopt_bytes(&s, libc::IPPROTO_TCP, TCP_TIMESTAMP, &TS.to_ne_bytes())
                .expect("set TS");
        }
        connect(&s, target).expect("repair connect");
        if !before_connect {
            setsockopt_bytes(&s, libc::IPPROTO_TCP, TCP_TIMESTAMP, &TS.to_ne_bytes())
                .expect("set TS");
        }
        let usec = tcp_info(&s).tcpi_options & TCPI_OPT_USEC_TS != 0;
        (timestamp(&s).expect("get TCP_TIMESTAMP"), usec)
    };
    // 5 ms in µs units: the time between the set and the get.
    let close_to_ts = |v: u32| v.wrapping_sub(TS) <= 5_000;

    let (after, usec) = restore(false);
    assert!(
        close_to_ts(after),
        "set after connect: read {after}, expected {TS} + a few µs"
    );
    assert_eq!(after & 1, 1, "set after connect: bit 0 (µs clock) kept");
    assert!(usec, "set after connect: tcpi_options has USEC_TS");

    let (before, usec) = restore(true);
    assert_eq!(
        before & 1,
        0,
        "set before connect: connect cleared the µs flag (read {before})"
    );
    assert!(!usec, "set before connect: tcpi_options lost USEC_TS");
    assert!(
        !close_to_ts(before),
        "set before connect: read {before}, expected garbage"
    );
}

/// Reference §1 row 15, E9: struct tcp_repair_window is exactly 20 bytes on this kernel;
/// get and set with any other length give EINVAL, and both need repair mode (EPERM).
/// (Patches under review for 7.x would accept longer variants: then this test fails and
/// the helper may dump more.)
#[test]
fn tcp_repair_window_is_20_bytes() {
    private_netns();
    let (client, _server) = pair();
    let tcp = libc::IPPROTO_TCP;
    assert_eq!(
        errno_of(getsockopt_bytes(&client, tcp, TCP_REPAIR_WINDOW, 20)),
        libc::EPERM,
        "get outside repair mode"
    );
    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    let window = getsockopt_bytes(&client, tcp, TCP_REPAIR_WINDOW, 20).expect("get, 20 bytes");
    assert_eq!(window.len(), 20);
    for len in [16, 24, 32] {
        assert_eq!(
            errno_of(getsockopt_bytes(&client, tcp, TCP_REPAIR_WINDOW, len)),
            libc::EINVAL,
            "get with {len} bytes"
        );
    }
    let mut longer = window.clone();
    longer.extend_from_slice(&[0; 4]);
    assert_eq!(
        errno_of(setsockopt_bytes(&client, tcp, TCP_REPAIR_WINDOW, &longer)),
        libc::EINVAL
    );
    assert_eq!(
        errno_of(setsockopt_bytes(
            &client,
            tcp,
            TCP_REPAIR_WINDOW,
            &window[..16]
        )),
        libc::EINVAL
    );
    setsockopt_bytes(&client, tcp, TCP_REPAIR_WINDOW, &window).expect("set the 20 bytes read");
}

/// Reference §1 rows 10–13 and §5.1, E9/E10: TCP_REPAIR_OPTIONS works only in repair
/// mode (EINVAL otherwise), only on an ESTABLISHED socket (EPERM before the repair
/// connect) that has never sent a byte (EPERM on a socket that has).
#[test]
fn repair_options_need_nothing_sent() {
    private_netns();
    let mss_1000: Vec<u8> = [TCPOPT_MSS, 1000]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let set_options = |fd: &dyn AsFd| {
        setsockopt_bytes(fd.as_fd(), libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, &mss_1000)
    };

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener");
    let s = tcp_socket(libc::AF_INET);
    assert_eq!(
        errno_of(set_options(&s)),
        libc::EINVAL,
        "outside repair mode"
    );
    repair(&s, REPAIR_ON).expect("TCP_REPAIR on");
    bind(&s, "127.0.0.1:0".parse().expect("addr")).expect("bind");
    assert_eq!(
        errno_of(set_options(&s)),
        libc::EPERM,
        "before connect (state CLOSE)"
    );
    connect(&s, listener.local_addr().expect("addr")).expect("repair connect");
    set_options(&s).expect("after the repair connect, nothing sent");
    assert_eq!(
        getsockopt_int(&s, libc::IPPROTO_TCP, libc::TCP_MAXSEG).expect("TCP_MAXSEG"),
        1000,
        "TCP_MAXSEG in repair reports the restored clamp"
    );

    let (mut client, _server) = pair();
    client.write_all(&[b'x'; 10]).expect("send 10 bytes");
    wait_for("the 10 bytes acknowledged", || {
        tcp::outq(&client).ok() == Some(0)
    });
    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    assert_eq!(
        errno_of(set_options(&client)),
        libc::EPERM,
        "on a socket that has sent data"
    );
}

// ---------------------------------------------------------------------------------------
// Freezing: what repair mode does and does not stop.

/// Reference §3.2 and §2.4 step 1, E5: repair mode is not a freeze. Data the peer sends
/// to a socket in repair mode is queued and ACKed (the peer's SIOCOUTQ drops to 0). This
/// is why the dumper needs the deaf filter.
#[test]
fn repair_mode_alone_still_acks() {
    private_netns();
    let (mut client, mut server) = pair();
    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    let pattern = Pattern::new(5);
    Writer::new(pattern)
        .write_until(&mut server, 1000, DEADLINE)
        .expect("peer writes 1000 bytes");
    wait_for("the repair-mode socket to queue and ACK the data", || {
        tcp::inq(&client).ok() == Some(1000) && tcp::outq(&server).ok() == Some(0)
    });
    repair(&client, REPAIR_OFF).expect("TCP_REPAIR off");
    client.set_nonblocking(true).expect("non-blocking");
    Reader::new(pattern)
        .read_until(&mut client, 1000, DEADLINE)
        .expect("the data arrives intact");
}

/// Addendum E24: a drop-all socket filter plus repair mode does freeze a socket: the
/// peer's 1000 bytes are neither queued (our SIOCINQ stays 0) nor ACKed (the peer's
/// SIOCOUTQ stays 1000). After detaching the filter and repair off (with the window
/// probe) the peer retransmits and everything arrives intact; traffic flows both ways.
#[test]
fn deaf_filter_stops_acks() {
    private_netns();
    let (mut client, mut server) = pair();
    tcp::deafen(&client).expect("attach the drop-all filter");
    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    let pattern = Pattern::new(24);
    Writer::new(pattern)
        .write_until(&mut server, 1000, DEADLINE)
        .expect("peer writes 1000 bytes");
    assert!(
        tcp::holds_for(QUIET, || tcp::inq(&client).ok() == Some(0)
            && tcp::outq(&server).ok() == Some(1000)),
        "deaf socket in repair: SIOCINQ {:?} (want 0), peer SIOCOUTQ {:?} (want 1000)",
        tcp::inq(&client),
        tcp::outq(&server)
    );
    assert_eq!(
        tcp::outq_nsd(&server).expect("peer SIOCOUTQNSD"),
        0,
        "the peer did transmit"
    );

    tcp::undeafen(&client).expect("detach the filter");
    repair(&client, REPAIR_OFF).expect("TCP_REPAIR off");
    client.set_nonblocking(true).expect("non-blocking");
    Reader::new(pattern)
        .read_until(&mut client, 1000, DEADLINE)
        .expect("the retransmitted data arrives intact");
    wait_for("the peer's data acknowledged", || {
        tcp::outq(&server).ok() == Some(0)
    });

    client.write_all(b"hello").expect("write after thaw");
    let mut buf = [0u8; 5];
    server.set_read_timeout(Some(DEADLINE)).expect("timeout");
    server.read_exact(&mut buf).expect("peer reads");
    assert_eq!(&buf, b"hello");
}

/// Reference §3.9 and §2.1 step 8, E2: the last close() of a socket in repair mode sends
/// no FIN and no RST — even with unread data, which would otherwise cause an RST. The
/// peer's read keeps returning WouldBlock (not EOF, not ECONNRESET).
#[test]
fn close_in_repair_sends_nothing() {
    private_netns();
    let connected_with_unread_data = || {
        let (client, mut server) = pair();
        server.write_all(&[b'u'; 10]).expect("peer writes");
        wait_for("unread data at the closing end", || {
            tcp::inq(&client).ok() == Some(10)
        });
        server.set_nonblocking(true).expect("non-blocking");
        (client, server)
    };
    let mut buf = [0u8; 16];

    // Control: the same close outside repair mode resets the connection, and the peer's
    // read sees it — so the silence below is not an artefact of how we look.
    let (client, mut server) = connected_with_unread_data();
    drop(client);
    wait_for(
        "ECONNRESET after a plain close with unread data",
        || matches!(server.read(&mut buf), Err(e) if e.raw_os_error() == Some(libc::ECONNRESET)),
    );

    let (client, mut server) = connected_with_unread_data();
    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    drop(client);
    let mut last = None;
    let silent = tcp::holds_for(QUIET, || {
        let r = server.read(&mut buf);
        let quiet = matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        last = Some(format!("{r:?}"));
        quiet
    });
    assert!(silent, "peer saw something after close in repair: {last:?}");
    assert_eq!(
        tcp::state(&server).expect("peer state"),
        SocketState::Established
    );
}

/// Addendum E24 (third bullet): once a socket was closed in repair mode, the next
/// segment from the peer is answered with RST — so a source must keep frozen sockets
/// open (deaf) until the flow has moved instead of closing them.
#[test]
fn peer_data_after_close_in_repair_is_answered_with_rst() {
    private_netns();
    let (client, mut server) = pair();
    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    drop(client);
    server.write_all(b"late").expect("peer writes");
    server.set_nonblocking(true).expect("non-blocking");
    let mut buf = [0u8; 16];
    let mut last = String::new();
    let reset = tcp::wait_until(DEADLINE, || {
        let r = server.read(&mut buf);
        last = format!("{r:?}");
        matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ECONNRESET))
    });
    assert!(reset, "peer never saw ECONNRESET; last read: {last}");
}

// ---------------------------------------------------------------------------------------
// Sockets that cannot be repaired.

/// Reference §3.1, E7/E1: TCP_REPAIR is refused on a LISTEN socket with EPERM, even for
/// root.
#[test]
fn listen_socket_refuses_repair() {
    private_netns();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listener");
    assert_eq!(errno_of(repair(&listener, REPAIR_ON)), libc::EPERM);
}

/// Reference §3.6 and §5.3, E15: MPTCP sockets refuse TCP_REPAIR: setsockopt gives
/// ENOPROTOOPT, getsockopt EOPNOTSUPP. They are recognised by SO_PROTOCOL 262.
#[test]
fn mptcp_refuses_repair() {
    private_netns();
    // SAFETY: socket() takes only integers.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_MPTCP,
        )
    };
    if fd < 0 {
        eprintln!(
            "SKIPPED mptcp_refuses_repair: MPTCP sockets unavailable ({})",
            io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    let mptcp = unsafe { OwnedFd::from_raw_fd(fd) };
    assert_eq!(
        getsockopt_int(&mptcp, libc::SOL_SOCKET, libc::SO_PROTOCOL).expect("SO_PROTOCOL"),
        libc::IPPROTO_MPTCP
    );
    assert_eq!(
        errno_of(repair(&mptcp, REPAIR_ON)),
        libc::ENOPROTOOPT,
        "set TCP_REPAIR"
    );
    assert_eq!(
        errno_of(getsockopt_int(&mptcp, libc::IPPROTO_TCP, TCP_REPAIR)),
        libc::EOPNOTSUPP,
        "get TCP_REPAIR"
    );
}
