//! Scale: 10,000 connections dumped and restored through a real `baton-repair` process.
//!
//! Layout: the test thread enters a private network namespace and owns the "A" ends; a
//! peer process (this same test binary, re-executed; see `baton_testkit::peer`) owns the
//! other ends, because one process may not hold 20,000 descriptors on CI machines. Each
//! connection carries data both ways at dump time: the peer's header and `K` bytes sit
//! unread in A's receive queue, and `K2` bytes A sent sit unacknowledged in A's send
//! queue (the peer is deaf). After the dump the A sockets are closed (frozen, so
//! silently), the peer hears again, fresh sockets are restored, and every byte is
//! checked on both sides.

use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_proto::tcp::{SocketFamily, TcpConnState, TcpState};
use baton_repair_ipc::RepairClient;
use baton_testkit::peer::{self, PeerProcess, Seeds, HEADER_LEN};
use baton_testkit::{netns, tcp};

const N: usize = 10_000;
/// Peer → A bytes after the header, left unread in A's receive queue.
const K: usize = 2 << 10;
/// A → peer bytes, unacknowledged at dump time.
const K2: usize = 2 << 10;
/// Bytes each side sends after the restore.
const EXTRA: usize = 1 << 10;
const SEEDS: Seeds = Seeds {
    peer: 0x5CA1_E000_0000_0001,
    parent: 0x5CA1_E000_0000_0002,
};
/// Bound for every step (in debug builds the whole test takes a few seconds).
const STEP: Duration = Duration::from_secs(60);

/// The peer process's entry point: a no-op in a normal test run.
#[test]
fn peer_process_entry() {
    peer::run_if_peer();
}

fn fresh_socket() -> TcpStream {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[test]
fn ten_thousand_connections_through_the_helper() {
    netns::enter_private_netns().expect("private netns (run the tests as root)");
    let limit = netns::raise_nofile(1 << 20).expect("raise RLIMIT_NOFILE");
    assert!(
        limit >= N as u64 + 200,
        "RLIMIT_NOFILE {limit} is too low for {N} connections"
    );
    let started = Instant::now();

    let listener = peer::listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("listener");
    let addr = listener.local_addr().expect("listener address");
    let mut peer = PeerProcess::spawn(addr, N, K, SEEDS, &peer::LIBTEST_ENTRY_ARGS)
        .expect("spawn the peer process");
    let a = peer::accept_indexed(&listener, N, STEP).expect("accept the peer's connections");
    peer.wait_ready(STEP).expect("peer ready");
    peer::write_many(&a, STEP, |i| SEEDS.parent_pattern(i).bytes(0, K2))
        .expect("A writes to the deaf peer");
    let setup = started.elapsed();

    // Every batch is split: the worker thread's half of the dumps and restores runs
    // under the seccomp filter too.
    let (mut client, mut helper) = RepairClient::spawn(
        env!("CARGO_BIN_EXE_baton-repair"),
        std::iter::empty::<&str>(),
    )
    .expect("spawn baton-repair");
    client.set_timeout(STEP);

    let t = Instant::now();
    let fds: Vec<BorrowedFd<'_>> = a.iter().map(|s| s.as_fd()).collect();
    let dumped = client.dump(&fds).expect("dump request");
    let dump_time = t.elapsed();
    drop(fds);
    assert_eq!(dumped.len(), N);
    let states: Vec<TcpConnState> = dumped
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("dump of connection {i}: {e}")))
        .collect();
    for (i, s) in states.iter().enumerate() {
        assert_eq!(s.state, TcpState::Established, "connection {i}");
        assert_eq!(
            s.recv_queue.len(),
            HEADER_LEN + K,
            "connection {i}: recv queue"
        );
        assert_eq!(s.send_queue.len(), K2, "connection {i}: send queue");
        peer::verify_peer_stream(SEEDS, i, 0, &s.recv_queue)
            .unwrap_or_else(|e| panic!("dumped recv queue: {e}"));
        SEEDS
            .parent_pattern(i)
            .verify(0, &s.send_queue)
            .unwrap_or_else(|m| panic!("connection {i}: dumped send queue: {m}"));
    }

    // Frozen sockets close silently: the peer sees neither FIN nor RST.
    drop(a);
    peer.hear(STEP).expect("peer hears again");

    let t = Instant::now();
    let b: Vec<TcpStream> = states
        .iter()
        .map(|s| {
            assert_eq!(s.family, SocketFamily::Inet);
            fresh_socket()
        })
        .collect();
    let items: Vec<(BorrowedFd<'_>, &TcpConnState)> =
        b.iter().map(|s| s.as_fd()).zip(states.iter()).collect();
    let restored = client.restore(&items).expect("restore request");
    let restore_time = t.elapsed();
    drop(items);
    assert_eq!(restored.len(), N);
    let reports: Vec<_> = restored
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("restore of connection {i}: {e}")))
        .collect();
    assert!(reports.iter().all(|r| !r.fin_pending));
    let leftovers = reports
        .iter()
        .zip(&states)
        .filter(|(r, s)| (r.send_queue_written as usize) < s.send_queue.len())
        .count();

    // What the restore did not write of the send queue, then EXTRA new bytes.
    peer::write_many(&b, STEP, |i| {
        let mut out = states[i].send_queue[reports[i].send_queue_written as usize..].to_vec();
        out.extend_from_slice(&SEEDS.parent_pattern(i).bytes(K2 as u64, EXTRA));
        out
    })
    .expect("B finishes its send queue and writes more");
    peer.verify(K2, EXTRA, STEP)
        .expect("the peer got every byte of A's stream");
    peer::read_exact_many(&b, HEADER_LEN + K + EXTRA, STEP, |i, offset, bytes| {
        peer::verify_peer_stream(SEEDS, i, offset, bytes)
    })
    .expect("B got every byte of the peer's stream");
    for (i, s) in b.iter().enumerate().step_by(97) {
        assert_eq!(
            tcp::inq(s).expect("SIOCINQ"),
            0,
            "connection {i}: more data than sent"
        );
    }

    let status = peer.quit(STEP).expect("peer exits");
    assert!(status.success(), "peer process: {status}");
    drop(client);
    let status = helper.wait().expect("wait for the helper");
    assert!(status.success(), "baton-repair: {status}");
    eprintln!(
        "{N} connections: setup {setup:?}, dump {dump_time:?} ({:.1} µs/conn), \
         restore {restore_time:?} ({:.1} µs/conn, incl. socket()), \
         {leftovers} send queues finished by the caller, total {:?}",
        dump_time.as_secs_f64() * 1e6 / N as f64,
        restore_time.as_secs_f64() * 1e6 / N as f64,
        started.elapsed()
    );
}
