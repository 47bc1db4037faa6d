//! The state matrix through a real, sandboxed `baton-repair` process: for ESTABLISHED,
//! FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT and LAST_ACK, over IPv4, IPv6 and v4-mapped, a
//! connection with data queued both ways (unacknowledged and unsent send data, unread
//! received data; over 1 MiB in one case) is dumped by the helper, closed while frozen,
//! restored by the helper into a new socket, and then streams on in both directions with
//! every byte checked (exactly once, in order, no reset).
//!
//! The scenario itself is shared with the library's in-process tests.

#[path = "../../crates/tcp-repair/tests/scenario/mod.rs"]
mod scenario;

use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Mutex;

use baton_proto::tcp::{TcpConnState, TcpState};
use baton_repair_ipc::RepairClient;
use scenario::{Family, Scenario};

/// Tests run in parallel threads of one process. A fork (spawning a helper) copies every
/// descriptor of the process until the child execs, so a test spawning its helper could
/// briefly hold another test's just-closed socket and make that test's restore of the
/// same 4-tuple fail with EADDRNOTAVAIL. Spawns and close→restore sections take turns.
static FORK_GUARD: Mutex<()> = Mutex::new(());

fn run(family: Family, state: TcpState, send_bytes: usize, recv_bytes: usize) {
    Scenario {
        family,
        state,
        send_bytes,
        recv_bytes,
    }
    .run(
        |a: TcpStream, hear: &dyn Fn()| -> (TcpStream, TcpConnState) {
            // Spawned from the test thread, so the helper lives in the test's namespace.
            let (mut helper, mut child) = {
                let _turn = FORK_GUARD.lock().unwrap_or_else(|p| p.into_inner());
                RepairClient::spawn(env!("CARGO_BIN_EXE_baton-repair"), Vec::<String>::new())
                    .expect("spawn baton-repair")
            };
            let dumped = helper
                .dump(&[a.as_fd()])
                .expect("dump request")
                .remove(0)
                .expect("dump");
            let turn = FORK_GUARD.lock().unwrap_or_else(|p| p.into_inner());
            drop(a);
            hear();
            let b = scenario::fresh_socket(dumped.family);
            let report = helper
                .restore(&[(b.as_fd(), &dumped)])
                .expect("restore request")
                .remove(0)
                .expect("restore");
            drop(turn);
            scenario::finish_send_queue(&b, &dumped, report);
            drop(helper);
            let status = child.wait().expect("helper exit");
            assert!(status.success(), "helper exit status {status:?}");
            (b, dumped)
        },
    );
}

#[test]
fn established_ipv4() {
    run(Family::V4, TcpState::Established, 200_000, 50_000);
}

#[test]
fn established_ipv6() {
    run(Family::V6, TcpState::Established, 200_000, 50_000);
}

#[test]
fn established_v4_mapped() {
    run(Family::V4Mapped, TcpState::Established, 200_000, 50_000);
}

#[test]
fn established_more_than_a_mebibyte_each_way() {
    run(Family::V4, TcpState::Established, 3 << 20, 1 << 20);
}

#[test]
fn fin_wait1_ipv4() {
    run(Family::V4, TcpState::FinWait1, 100_000, 20_000);
}

#[test]
fn fin_wait1_v4_mapped() {
    run(Family::V4Mapped, TcpState::FinWait1, 100_000, 20_000);
}

#[test]
fn fin_wait2_ipv6() {
    run(Family::V6, TcpState::FinWait2, 30_000, 20_000);
}

#[test]
fn close_wait_ipv4() {
    run(Family::V4, TcpState::CloseWait, 100_000, 20_000);
}

#[test]
fn close_wait_ipv6() {
    run(Family::V6, TcpState::CloseWait, 100_000, 20_000);
}

#[test]
fn last_ack_v4_mapped() {
    run(Family::V4Mapped, TcpState::LastAck, 100_000, 20_000);
}
