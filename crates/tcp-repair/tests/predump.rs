//! Pre-dump and freeze check in-process: a live connection is pre-dumped, later frozen
//! and checked, and restored from the pre-dumped state (unchanged) or from the state
//! dumped at the check (changed); every byte must arrive exactly once, in order, in both
//! directions. A pre-dump leaves the socket live as it found it.

mod scenario;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};

use baton_proto::repair::{FreezeCheck, PreDumped};
use baton_proto::tcp::{TcpConnState, TcpState};
use scenario::{
    enter_private_netns, get_sockopt_int, listener, outq, pair, pattern, sockopt_int, wait_until,
    Family, Scenario,
};

/// What the freeze check must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Unchanged,
    /// Wait for the connection's progress mark to move after the pre-dump (the
    /// scenario's deaf peer makes A retransmit), then expect a full dump.
    ChangedByRetransmission,
}

fn pre_dump(a: &TcpStream) -> PreDumped {
    baton_tcp_repair::pre_dump(a.as_fd())
        .expect("pre-dump")
        .expect("an idle connection does not move while it is read")
}

/// Pre-dump `a`, (maybe) wait for it to move, freeze-check it, close it frozen, restore
/// from the state the check says to use.
fn migrate_pre_dumped(
    expect: Expect,
) -> impl FnOnce(TcpStream, &dyn Fn()) -> (TcpStream, TcpConnState) {
    move |a, hear| {
        let pre = pre_dump(&a);
        assert_eq!(
            repair_flag(a.as_fd()),
            0,
            "pre-dumped socket is out of repair"
        );
        if expect == Expect::ChangedByRetransmission {
            wait_until("A to retransmit to its deaf peer", || {
                baton_tcp_repair::progress_mark(a.as_fd()).expect("mark") != pre.mark
            });
        }
        let check = baton_tcp_repair::freeze_check(a.as_fd(), &pre.mark).expect("freeze check");
        match (&check, expect) {
            (FreezeCheck::Unchanged { timestamp, .. }, Expect::Unchanged) => {
                // The clock ran on between the two readings (ms or µs ticks).
                assert!(
                    timestamp.wrapping_sub(pre.state.timestamp) < 1 << 30,
                    "fresh timestamp {timestamp} is behind the pre-dumped {}",
                    pre.state.timestamp
                );
            }
            (FreezeCheck::Dumped(_), Expect::ChangedByRetransmission) => {}
            (other, _) => panic!("expected {expect:?}, got {other:?}"),
        }
        assert_eq!(repair_flag(a.as_fd()), 1, "checked socket is frozen");
        let state = check.into_state(pre.state);
        scenario::restore_after_close(a, state, hear)
    }
}

fn run(family: Family, state: TcpState, send_bytes: usize, recv_bytes: usize, expect: Expect) {
    Scenario {
        family,
        state,
        send_bytes,
        recv_bytes,
    }
    .run(migrate_pre_dumped(expect));
}

// An idle connection has nothing in flight (else a timer would move it): data the peer
// sent and we did not read, our FIN or the peer's acknowledged.

#[test]
fn unchanged_established_ipv4_with_unread_data() {
    run(
        Family::V4,
        TcpState::Established,
        0,
        50_000,
        Expect::Unchanged,
    );
}

#[test]
fn unchanged_established_ipv6_with_unread_data() {
    run(
        Family::V6,
        TcpState::Established,
        0,
        50_000,
        Expect::Unchanged,
    );
}

#[test]
fn unchanged_established_v4_mapped_with_unread_data() {
    run(
        Family::V4Mapped,
        TcpState::Established,
        0,
        50_000,
        Expect::Unchanged,
    );
}

#[test]
fn unchanged_established_with_empty_queues() {
    run(Family::V4, TcpState::Established, 0, 0, Expect::Unchanged);
}

#[test]
fn unchanged_close_wait_with_unread_data() {
    run(
        Family::V4,
        TcpState::CloseWait,
        0,
        20_000,
        Expect::Unchanged,
    );
}

#[test]
fn unchanged_fin_wait2_with_data_the_peer_holds() {
    run(
        Family::V6,
        TcpState::FinWait2,
        30_000,
        20_000,
        Expect::Unchanged,
    );
}

// In flight to a deaf peer: the retransmission moves the mark, the check dumps in full.

#[test]
fn changed_established_ipv4_with_queues_both_ways() {
    run(
        Family::V4,
        TcpState::Established,
        200_000,
        50_000,
        Expect::ChangedByRetransmission,
    );
}

#[test]
fn changed_fin_wait1_ipv6() {
    run(
        Family::V6,
        TcpState::FinWait1,
        100_000,
        20_000,
        Expect::ChangedByRetransmission,
    );
}

#[test]
fn changed_last_ack_v4_mapped() {
    run(
        Family::V4Mapped,
        TcpState::LastAck,
        50_000,
        20_000,
        Expect::ChangedByRetransmission,
    );
}

fn repair_flag(fd: BorrowedFd<'_>) -> i32 {
    get_sockopt_int(fd, libc::IPPROTO_TCP, 19)
}

const SO_PEEK_OFF: i32 = 42;

#[test]
fn pre_dump_leaves_the_socket_live_as_it_found_it() {
    enter_private_netns();
    let l = listener(Family::V4);
    let (mut a, mut p) = pair(Family::V4, &l, None);
    p.write_all(&pattern(3, 0, 3000)).expect("P writes");
    wait_until("P's data acknowledged", || outq(p.as_fd()) == 0);
    sockopt_int(a.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
    sockopt_int(a.as_fd(), libc::SOL_SOCKET, SO_PEEK_OFF, 1000);

    let pre = pre_dump(&a);
    assert_eq!(pre.state.recv_queue, pattern(3, 0, 3000), "whole queue");
    assert!(pre.state.sockopts.reuseaddr);
    assert_eq!(pre.state.sockopts.peek_off, 1000);
    assert_eq!(pre.mark.inq, 3000);
    assert_eq!(pre.mark.outq, 0);
    assert_eq!(pre.mark.state, 1);

    assert_eq!(repair_flag(a.as_fd()), 0, "out of repair mode");
    assert_eq!(
        get_sockopt_int(a.as_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR),
        1
    );
    assert_eq!(
        get_sockopt_int(a.as_fd(), libc::SOL_SOCKET, SO_PEEK_OFF),
        1000
    );
    // No queue is left selected: a send goes out as usual (with the send queue selected
    // it would be refused with EINVAL outside repair, or marked sent without leaving).
    a.write_all(b"after").expect("A writes");
    let mut five = [0u8; 5];
    p.read_exact(&mut five).expect("P reads");
    assert_eq!(&five, b"after");
    // Reading moves on from the peek offset and the queue is intact.
    sockopt_int(a.as_fd(), libc::SOL_SOCKET, SO_PEEK_OFF, -1);
    let mut got = vec![0u8; 3000];
    a.read_exact(&mut got).expect("A reads");
    assert_eq!(got, pattern(3, 0, 3000));
    assert_eq!(
        baton_tcp_repair::progress_mark(a.as_fd())
            .expect("mark")
            .inq,
        0
    );
}

#[test]
fn freeze_check_with_a_stale_mark_dumps_and_failure_rolls_back() {
    enter_private_netns();
    let l = listener(Family::V4);
    let (a, mut p) = pair(Family::V4, &l, None);
    let pre = pre_dump(&a);
    // The peer sends after the pre-dump: the check must see it and dump in full.
    p.write_all(&pattern(9, 0, 700)).expect("P writes");
    wait_until("P's data acknowledged", || outq(p.as_fd()) == 0);
    let check = baton_tcp_repair::freeze_check(a.as_fd(), &pre.mark).expect("check");
    let FreezeCheck::Dumped(state) = check else {
        panic!("expected a full dump, got {check:?}");
    };
    assert_eq!(state.recv_queue, pattern(9, 0, 700));
    assert_eq!(state.rcv_nxt, pre.state.rcv_nxt.wrapping_add(700));
    // Frozen as after a dump: thaw works and the connection carries on.
    baton_tcp_repair::thaw(a.as_fd()).expect("thaw");
    assert_eq!(repair_flag(a.as_fd()), 0);

    // A freeze check on a socket that cannot be migrated (listening) fails cleanly and
    // leaves it as it was.
    let err = baton_tcp_repair::freeze_check(l.as_fd(), &pre.mark).expect_err("listener");
    assert!(err.to_string().starts_with("freeze check: "), "{err}");
    assert_eq!(repair_flag(l.as_fd()), 0, "rolled back out of repair");
    let err = baton_tcp_repair::pre_dump(l.as_fd()).expect_err("listener");
    assert!(err.to_string().starts_with("pre-dump: "), "{err}");
    assert_eq!(repair_flag(l.as_fd()), 0, "left out of repair");
}
