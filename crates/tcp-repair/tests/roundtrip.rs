//! Dump and restore in-process (the test runs as root, so it holds CAP_NET_ADMIN), over
//! loopback in a private network namespace per test thread: every byte must arrive
//! exactly once, in order, in both directions, for every migratable state and family.

mod scenario;

use std::net::TcpStream;
use std::os::fd::AsFd;

use baton_proto::tcp::{TcpConnState, TcpState};
use scenario::{Family, Scenario};

/// Dump `a`, close it while frozen, restore into a fresh socket, finish the send queue.
fn migrate_in_process(a: TcpStream, hear: &dyn Fn()) -> (TcpStream, TcpConnState) {
    let state = baton_tcp_repair::dump(a.as_fd()).expect("dump");
    scenario::restore_after_close(a, state, hear)
}

fn run(family: Family, state: TcpState, send_bytes: usize, recv_bytes: usize) {
    Scenario {
        family,
        state,
        send_bytes,
        recv_bytes,
    }
    .run(migrate_in_process);
}

#[test]
fn established_ipv4_with_queues_both_ways() {
    run(Family::V4, TcpState::Established, 200_000, 50_000);
}

#[test]
fn established_ipv6_with_queues_both_ways() {
    run(Family::V6, TcpState::Established, 200_000, 50_000);
}

#[test]
fn established_v4_mapped_with_queues_both_ways() {
    run(Family::V4Mapped, TcpState::Established, 200_000, 50_000);
}

#[test]
fn established_ipv4_more_than_a_mebibyte_queued() {
    run(Family::V4, TcpState::Established, 3 << 20, 1 << 20);
}

#[test]
fn established_with_empty_queues() {
    run(Family::V4, TcpState::Established, 0, 0);
}

#[test]
fn fin_wait1_ipv4() {
    run(Family::V4, TcpState::FinWait1, 100_000, 20_000);
}

#[test]
fn fin_wait1_ipv6() {
    run(Family::V6, TcpState::FinWait1, 100_000, 20_000);
}

#[test]
fn fin_wait2_ipv4() {
    run(Family::V4, TcpState::FinWait2, 0, 20_000);
}

#[test]
fn fin_wait2_v4_mapped() {
    run(Family::V4Mapped, TcpState::FinWait2, 0, 20_000);
}

#[test]
fn close_wait_ipv4() {
    run(Family::V4, TcpState::CloseWait, 100_000, 20_000);
}

#[test]
fn close_wait_ipv6_without_unread_data() {
    run(Family::V6, TcpState::CloseWait, 100_000, 0);
}

#[test]
fn last_ack_ipv4() {
    run(Family::V4, TcpState::LastAck, 100_000, 20_000);
}
