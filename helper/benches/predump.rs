//! Pre-dump and freeze-check cost per connection through a real `baton-repair` process,
//! next to today's dump.
//!
//! Run with `cargo bench -p baton-repair --bench predump` as root (it enters a private
//! network namespace itself). For each N (1,000 and 10,000 unless given as arguments)
//! it builds N idle loopback connections whose far ends live in a peer process (this
//! executable, re-executed; see `baton_testkit::peer`): the peer's header and `K` bytes
//! unread in our receive queue, acknowledged, nothing in flight. Then, through one
//! helper process, per run:
//!
//! * pre-dump: `RepairClient::pre_dump` of all N live sockets;
//! * check, unchanged: `RepairClient::freeze_check` with the pre-dump's marks (the
//!   sockets end frozen; thawed afterwards, untimed);
//! * check, changed: the same marks again, now stale (the thaw's window probe moved
//!   every connection's `segs_out`), so every socket is dumped in full by the check;
//! * dump: today's `RepairClient::dump` of all N sockets.
//!
//! Each result's receive queue is checked against the peer's stream, and at the end the
//! peer hears again, both sides send more, and every connection's bytes are checked both
//! ways (not timed), so a fast but wrong helper fails the bench. The table shows wall time per
//! connection and the CPU time of the helper process (both threads) and of the client
//! thread (from `/proc/.../schedstat`; meaningful when other work shares the machine),
//! medians of several runs, and how many sockets came out unchanged / dumped / moved.
//!
//! Optional arguments: the list of N to run (e.g. `cargo bench ... -- 1000`).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use baton_proto::repair::{FreezeCheck, ProgressMark};
use baton_proto::tcp::TcpConnState;
use baton_repair_ipc::RepairClient;
use baton_testkit::peer::{self, PeerProcess, Seeds, HEADER_LEN};
use baton_testkit::{netns, tcp};
use common::{
    median, process_cpu_time, raise_nofile_for, sizes_from_args, spawn_helper, thread_cpu_time,
};

/// Bytes the peer queues in each connection's receive queue (after its header).
const K: usize = 4 << 10;
/// Bytes the peer sends after the measurements, to show the connections still work.
const EXTRA: usize = 1000;
const SEEDS: Seeds = Seeds {
    peer: 0xBE4C_0000_0000_0011,
    parent: 0xBE4C_0000_0000_0012,
};
const STEP: Duration = Duration::from_secs(120);
/// Long enough for any delayed ACK of the peer's data to have gone out, so that the
/// connections are idle when pre-dumped.
const SETTLE: Duration = Duration::from_millis(300);

/// Wall time and the CPU time of the helper and of this thread, for one phase.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    wall: Duration,
    helper: Duration,
    client: Duration,
}

/// Run `phase` and measure it.
fn timed<T>(helper: u32, phase: impl FnOnce() -> T) -> (T, Cost) {
    let h0 = process_cpu_time(helper);
    let c0 = thread_cpu_time();
    let t = Instant::now();
    let out = phase();
    let wall = t.elapsed();
    let cost = Cost {
        wall,
        helper: process_cpu_time(helper) - h0,
        client: thread_cpu_time() - c0,
    };
    (out, cost)
}

/// How the sockets of one phase came out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Outcome {
    unchanged: usize,
    dumped: usize,
    /// Pre-dump only: moved while being read (no state).
    moved: usize,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    pre_dump: (Cost, Outcome),
    unchanged: (Cost, Outcome),
    changed: (Cost, Outcome),
    dump: (Cost, Outcome),
}

fn check_recv_queue(i: usize, state: &TcpConnState) {
    assert_eq!(state.recv_queue.len(), HEADER_LEN + K, "connection {i}");
    peer::verify_peer_stream(SEEDS, i, 0, &state.recv_queue)
        .unwrap_or_else(|e| panic!("connection {i}: {e}"));
}

fn thaw_all(client: &mut RepairClient, fds: &[BorrowedFd<'_>]) {
    for (i, r) in client.thaw(fds).expect("thaw request").iter().enumerate() {
        r.as_ref().unwrap_or_else(|e| panic!("thaw {i}: {e}"));
    }
}

fn freeze_check_all(
    client: &mut RepairClient,
    items: &[(BorrowedFd<'_>, ProgressMark)],
) -> Outcome {
    let checks = client.freeze_check(items).expect("freeze-check request");
    let mut outcome = Outcome::default();
    for (i, check) in checks.into_iter().enumerate() {
        match check.unwrap_or_else(|e| panic!("freeze check {i}: {e}")) {
            FreezeCheck::Unchanged { .. } => outcome.unchanged += 1,
            FreezeCheck::Dumped(state) => {
                check_recv_queue(i, &state);
                outcome.dumped += 1;
            }
        }
    }
    outcome
}

fn run_once(client: &mut RepairClient, helper: u32, n: usize) -> Sample {
    let listener = peer::listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("listener");
    let addr = listener.local_addr().expect("listener address");
    let mut peer = PeerProcess::spawn(addr, n, K, SEEDS, &[]).expect("spawn the peer process");
    let a = peer::accept_indexed(&listener, n, STEP).expect("accept");
    peer.wait_ready(STEP).expect("peer ready");
    assert!(
        tcp::wait_until(STEP, || a
            .iter()
            .all(|s| tcp::inq(s).ok() == Some((HEADER_LEN + K) as u32))),
        "the peer's data did not arrive"
    );
    std::thread::sleep(SETTLE);
    let fds: Vec<BorrowedFd<'_>> = a.iter().map(|s| s.as_fd()).collect();

    let (pre, pre_cost) = timed(helper, || client.pre_dump(&fds).expect("pre-dump request"));
    let mut pre_outcome = Outcome::default();
    // A connection that moved while read gets a mark no connection has: its check dumps.
    let stale = ProgressMark {
        state: 0,
        segs_in: 0,
        segs_out: 0,
        inq: u32::MAX,
        outq: u32::MAX,
    };
    let items: Vec<(BorrowedFd<'_>, ProgressMark)> = pre
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let mark = match r.unwrap_or_else(|e| panic!("pre-dump {i}: {e}")) {
                Some(p) => {
                    check_recv_queue(i, &p.state);
                    pre_outcome.dumped += 1;
                    p.mark
                }
                None => {
                    pre_outcome.moved += 1;
                    stale
                }
            };
            (fds[i], mark)
        })
        .collect();

    let (unchanged, unchanged_cost) = timed(helper, || freeze_check_all(client, &items));
    thaw_all(client, &fds);
    let (changed, changed_cost) = timed(helper, || freeze_check_all(client, &items));
    thaw_all(client, &fds);
    let (dumped, dump_cost) = timed(helper, || {
        client
            .dump(&fds)
            .expect("dump request")
            .into_iter()
            .enumerate()
            .map(|(i, r)| check_recv_queue(i, &r.unwrap_or_else(|e| panic!("dump {i}: {e}"))))
            .count()
    });
    thaw_all(client, &fds);

    // Untimed: the connections still carry every byte.
    peer.hear(STEP).expect("peer hears");
    peer::write_many(&a, STEP, |i| SEEDS.parent_pattern(i).bytes(0, EXTRA))
        .expect("we send after the measurements");
    peer.verify(0, EXTRA, STEP)
        .expect("the peer checks our bytes and sends more");
    peer::read_exact_many(&a, HEADER_LEN + K + EXTRA, STEP, |i, offset, bytes| {
        peer::verify_peer_stream(SEEDS, i, offset, bytes)
    })
    .expect("every byte of the peer's stream");
    let status = peer.quit(STEP).expect("peer quits");
    assert!(status.success(), "peer process: {status}");
    Sample {
        pre_dump: (pre_cost, pre_outcome),
        unchanged: (unchanged_cost, unchanged),
        changed: (changed_cost, changed),
        dump: (
            dump_cost,
            Outcome {
                dumped,
                ..Outcome::default()
            },
        ),
    }
}

fn print_phase(n: usize, name: &str, samples: &[(Cost, Outcome)]) {
    let per_conn = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let med = |f: &dyn Fn(&Cost) -> Duration| {
        median(samples.iter().map(|(c, _)| per_conn(f(c))).collect())
    };
    let outcomes: Vec<String> = samples
        .iter()
        .map(|(_, o)| format!("{}/{}/{}", o.unchanged, o.dumped, o.moved))
        .collect();
    println!(
        "{:>6} | {:<18} | {:>8.2} {:>8.2} {:>8.2} | {:>8.1} | {}",
        n,
        name,
        med(&|c| c.wall),
        med(&|c| c.helper),
        med(&|c| c.client),
        median(
            samples
                .iter()
                .map(|(c, _)| c.wall.as_secs_f64() * 1e3)
                .collect()
        ),
        outcomes.join(" ")
    );
}

fn main() {
    peer::run_if_peer();

    let sizes = sizes_from_args(&[1_000, 10_000]);
    netns::enter_private_netns().expect("private netns (run the bench as root)");
    raise_nofile_for(sizes.iter().copied().max().unwrap_or(0));
    let (mut client, mut helper) = spawn_helper(STEP);
    assert!(client.supports_pre_dump(), "this helper has no pre-dump");
    let helper_pid = helper.id();

    let results: Vec<(usize, Vec<Sample>)> = sizes
        .iter()
        .map(|&n| {
            let reps = if n >= 10_000 { 3 } else { 5 };
            let samples = (0..reps)
                .map(|_| run_once(&mut client, helper_pid, n))
                .collect();
            (n, samples)
        })
        .collect();
    drop(client);
    let status = helper.wait().expect("wait for the helper");
    assert!(status.success(), "baton-repair: {status}");

    println!();
    println!(
        "baton-repair pre-dump / freeze check vs dump: idle connections, {} bytes unread \
         each, medians (µs per connection; the batch in ms)",
        HEADER_LEN + K
    );
    println!(
        "{:>6} | {:<18} | {:>8} {:>8} {:>8} | {:>8} | unchanged/dumped/moved per run",
        "N", "phase", "wall", "helper", "client", "batch ms"
    );
    for (n, samples) in &results {
        print_phase(
            *n,
            "pre-dump (live)",
            &samples.iter().map(|s| s.pre_dump).collect::<Vec<_>>(),
        );
        print_phase(
            *n,
            "check, unchanged",
            &samples.iter().map(|s| s.unchanged).collect::<Vec<_>>(),
        );
        print_phase(
            *n,
            "check, changed",
            &samples.iter().map(|s| s.changed).collect::<Vec<_>>(),
        );
        print_phase(
            *n,
            "dump (today)",
            &samples.iter().map(|s| s.dump).collect::<Vec<_>>(),
        );
    }
    println!(
        "(wall: elapsed; helper: CPU of the helper process, both threads; client: CPU of \
         this thread, which sends, receives and decodes)"
    );
}
