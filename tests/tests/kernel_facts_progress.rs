//! Kernel facts behind the pre-dump's progress mark: `tcpi_state`, `tcpi_segs_in`,
//! `tcpi_segs_out` (TCP_INFO), `SIOCINQ` and `SIOCOUTQ` stay equal while nothing
//! happens to a connection — including a pass through repair mode that reads its
//! whole state — and at least one of them moves with every event that changes the state
//! a dump reads. `baton_tcp_repair`'s `predump` module relies on exactly these; if one
//! fails, the freeze check could take a stale pre-dump for a fresh one.
//!
//! Same rules as `kernel_facts`: a private network namespace per test, libc only (no
//! baton code under test), non-blocking waits with deadlines.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;

use baton_testkit::tcp::{self, SocketState};
use common::*;

/// The progress mark, read the way the helper reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mark {
    state: u8,
    segs_in: u32,
    segs_out: u32,
    inq: u32,
    outq: u32,
}

fn mark(fd: impl AsFd) -> Mark {
    let fd = fd.as_fd();
    let info = tcp_info(fd);
    Mark {
        state: info.tcpi_state,
        segs_in: info.tcpi_segs_in,
        segs_out: info.tcpi_segs_out,
        inq: tcp::inq(fd).expect("SIOCINQ"),
        outq: tcp::outq(fd).expect("SIOCOUTQ"),
    }
}

/// A pair whose client end holds `unread` bytes from the server, acknowledged, with
/// nothing in flight either way: an idle connection with a receive queue.
fn idle_pair(unread: usize) -> (TcpStream, TcpStream) {
    let (client, mut server) = pair();
    server
        .write_all(&vec![b'u'; unread])
        .expect("server writes");
    wait_for("data received and acknowledged", || {
        tcp::inq(&client).ok() == Some(unread as u32) && tcp::outq(&server).ok() == Some(0)
    });
    (client, server)
}

#[test]
fn idle_connection_keeps_its_mark() {
    private_netns();
    let (client, _server) = idle_pair(1000);
    let before = mark(&client);
    assert!(
        tcp::holds_for(QUIET, || mark(&client) == before),
        "an idle connection's mark moved: {before:?} → {:?}",
        mark(&client)
    );
}

/// The pre-dump's pass through repair mode: every read a dump makes (both queue
/// sequence numbers, both peeks, the window), then repair off *without* a window probe,
/// moves nothing. Repair off *with* the probe sends a segment, which segs_out counts.
#[test]
fn repair_mode_reads_and_repair_off_without_probe_move_nothing() {
    private_netns();
    let (client, _server) = idle_pair(3000);
    let before = mark(&client);
    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    select_queue(&client, RECV_QUEUE).expect("select RECV");
    queue_seq(&client).expect("rcv_nxt");
    let mut buf = vec![0u8; 4000];
    assert_eq!(peek(&client, &mut buf).expect("peek recv"), 3000);
    select_queue(&client, SEND_QUEUE).expect("select SEND");
    queue_seq(&client).expect("write_seq");
    // An empty send queue: what the peek answers does not matter here, only that it
    // changes nothing.
    let _ = peek(&client, &mut buf);
    select_queue(&client, NO_QUEUE).expect("select none");
    getsockopt_bytes(&client, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, 20).expect("window");
    timestamp(&client).expect("TCP_TIMESTAMP");
    repair(&client, REPAIR_OFF_NO_WP).expect("TCP_REPAIR off, no probe");
    assert_eq!(
        mark(&client),
        before,
        "a read-only pass through repair mode"
    );

    repair(&client, REPAIR_ON).expect("TCP_REPAIR on");
    repair(&client, REPAIR_OFF).expect("TCP_REPAIR off with a window probe");
    let after = mark(&client);
    assert_eq!(after.segs_out, before.segs_out.wrapping_add(1), "the probe");
}

#[test]
fn a_byte_from_the_peer_moves_segs_in_and_inq() {
    private_netns();
    let (client, mut server) = idle_pair(0);
    let before = mark(&client);
    server.write_all(b"x").expect("one byte");
    wait_for("the byte", || tcp::inq(&client).ok() == Some(1));
    let after = mark(&client);
    assert_ne!(after.segs_in, before.segs_in);
    assert_eq!(after.inq, before.inq + 1);
}

/// The peer's ACK of our data is the only segment that moves snd_una; it counts in
/// segs_in (and SIOCOUTQ drops).
#[test]
fn the_peers_ack_of_our_data_moves_segs_in() {
    private_netns();
    let (mut client, server) = idle_pair(0);
    tcp::deafen(&server).expect("deafen the peer: nothing acknowledged yet");
    client.write_all(&[b'd'; 10]).expect("write");
    wait_for("our data transmitted", || {
        tcp::outq_nsd(&client).ok() == Some(0)
    });
    let sent = mark(&client);
    assert_eq!(sent.outq, 10);
    tcp::undeafen(&server).expect("the peer hears the retransmission");
    wait_for("our data acknowledged", || {
        tcp::outq(&client).ok() == Some(0)
    });
    let acked = mark(&client);
    assert_ne!(acked.segs_in, sent.segs_in, "the ACK counts");
    assert_eq!(acked.outq, 0);
}

/// A write moves SIOCOUTQ at once, before anything is transmitted (the peer's window is
/// not what decides this: the peer here is deaf and the data sits unacknowledged).
#[test]
fn our_write_moves_outq() {
    private_netns();
    let (mut client, server) = idle_pair(0);
    tcp::deafen(&server).expect("deafen the peer");
    let before = mark(&client);
    client.write_all(&[b'w'; 7]).expect("write");
    let after = mark(&client);
    assert_eq!(after.outq, before.outq + 7);
}

#[test]
fn our_read_moves_inq() {
    private_netns();
    let (mut client, _server) = idle_pair(100);
    let before = mark(&client);
    let mut five = [0u8; 5];
    client.read_exact(&mut five).expect("read");
    let after = mark(&client);
    assert_eq!(after.inq, before.inq - 5);
}

/// A peek (what baton does to hand data to the guest without consuming it) moves only
/// SO_PEEK_OFF, which the freeze check reads fresh.
#[test]
fn a_peek_moves_only_the_peek_offset() {
    private_netns();
    let (client, _server) = idle_pair(2000);
    setsockopt_int(&client, libc::SOL_SOCKET, SO_PEEK_OFF, 0).expect("SO_PEEK_OFF 0");
    let before = mark(&client);
    let mut buf = [0u8; 700];
    assert_eq!(peek(&client, &mut buf).expect("peek"), 700);
    assert_eq!(mark(&client), before);
    assert_eq!(
        getsockopt_int(&client, libc::SOL_SOCKET, SO_PEEK_OFF).expect("SO_PEEK_OFF"),
        700
    );
}

/// A keepalive probe on an idle connection is a transmitted segment: segs_out counts it
/// (and the peer's answer counts in segs_in).
#[test]
fn a_keepalive_probe_moves_segs_out() {
    private_netns();
    let (client, _server) = idle_pair(0);
    setsockopt_int(&client, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 1).expect("KEEPIDLE 1 s");
    setsockopt_int(&client, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 1).expect("KEEPINTVL");
    let before = mark(&client);
    setsockopt_int(&client, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1).expect("SO_KEEPALIVE");
    wait_for("a keepalive probe and its answer", || {
        let now = mark(&client);
        now.segs_out != before.segs_out && now.segs_in != before.segs_in
    });
    let after = mark(&client);
    assert_eq!((after.inq, after.outq, after.state), (0, 0, before.state));
}

#[test]
fn the_peers_fin_moves_state_and_segs_in() {
    private_netns();
    let (client, server) = idle_pair(10);
    let before = mark(&client);
    server.shutdown(Shutdown::Write).expect("peer FIN");
    wait_for("CLOSE_WAIT", || {
        tcp::state(&client).ok() == Some(SocketState::CloseWait)
    });
    let after = mark(&client);
    assert_ne!(after.state, before.state);
    assert_ne!(after.segs_in, before.segs_in);
    assert_eq!(after.inq, before.inq, "SIOCINQ does not count the FIN (E7)");
}

/// Segments the drop-all socket filter discards are not counted (tcp_segs_in comes
/// after tcp_filter): a frozen socket's mark stays put while its peer keeps sending,
/// so a freeze check finds an idle connection unchanged however busy the peer is. The
/// filter is the fallback freeze; the usual one, the TCP-MD5 key, drops even earlier
/// and is pinned the same way in `kernel_facts_md5_freeze`.
#[test]
fn segments_the_socket_filter_drops_count_nothing() {
    private_netns();
    let (client, mut server) = idle_pair(0);
    tcp::deafen(&client).expect("freeze our end");
    let before = mark(&client);
    server.write_all(b"dropped").expect("peer writes");
    wait_for("the peer transmitted", || {
        tcp::outq_nsd(&server).ok() == Some(0)
    });
    assert!(
        tcp::holds_for(QUIET, || mark(&client) == before),
        "a dropped segment moved the mark: {before:?} → {:?}",
        mark(&client)
    );
    assert_eq!(
        tcp::outq(&server).expect("peer SIOCOUTQ"),
        7,
        "nothing acknowledged"
    );
}
