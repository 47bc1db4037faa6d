//! Dump and restore cost per connection through a real `baton-repair` process.
//!
//! Run with `cargo bench -p baton-repair --bench repair` as root (it enters a private
//! network namespace itself). For each N in 1, 100, 1,000 and 10,000 it builds N
//! loopback connections whose far ends live in a peer process (this executable,
//! re-executed; see `baton_testkit::peer`), each with `K` bytes queued each way: the
//! peer's header and `K` bytes unread in our receive queue, `K` bytes we sent that the
//! deaf peer has not acknowledged. It then measures, through one helper process:
//!
//! * dump: `RepairClient::dump` of all N sockets (wall time);
//! * restore: creating N fresh sockets plus `RepairClient::restore` of all N states.
//!
//! Between the two the dumped sockets are closed and the peer hears again; after the
//! restore every byte is checked in both directions (not timed), so a fast but wrong
//! helper fails the bench.
//!
//! That check also covers the peer's side of a lost in-flight segment: the peer was
//! deaf while A sent, so it lacks every sent part the restored sockets hold as "sent",
//! and only their timers resend it. Each run's namespace keeps no TCP metrics (every
//! restore starts without an RTT estimate, like a migration target that never talked to
//! the peer), so the tail-loss probe resends each part about 1 s after the restore.
//! The bench first waits until the peer has acknowledged every restored send queue and
//! prints how that went (loss probes, retransmission timeouts, loopback drops); a
//! connection that does not get there fails the bench with its TCP state and the
//! namespace's counters. Two things made that step time out at 10,000 before: the
//! restore left 524-byte segments on loopback, so the probe resent only the last of 8
//! and every part waited for the 3 s retransmission timeout (fixed in
//! `baton_tcp_repair::restore`); and 10,000 timeouts expiring in the same timer-wheel
//! slot overflow the loopback's receive backlog (`net.core.netdev_max_backlog`, 1000
//! packets per CPU, host-wide), after which the losers back off to 6, 12, 24 s. The
//! probes themselves still overflow it when the restore is fast (more than 1000
//! connections restored per 32 ms slot and CPU: 2,300 drops seen at 31 µs/conn), a
//! loss of the bench's own making, silent to TCP (the packet left the socket). So,
//! after the timed restore, the bench caps the restored sockets' retransmission
//! timeout at 1 s (`TCP_RTO_MAX_MS`, Linux 6.15+): the dropped probes are resent a
//! second later, spread like the probes were, instead of in ever longer, ever more
//! synchronised rounds. Nothing is resent that TCP would not resend anyway, and a
//! socket that never resends still fails the check.
//!
//! Each N is repeated (5 times, 3 for 10,000) and the median is reported, with the
//! number of helper round trips (requests; the client batches at most 253 descriptors
//! per request). A second table does the same in-process
//! (`baton_tcp_repair` called directly, no helper, no IPC) to separate the kernel work
//! from the transport, and another one goes through a helper started with
//! `--single-thread`, to show what splitting batches over two threads brings.
//!
//! Besides wall time per connection, the table shows the CPU time the helper process
//! (both its threads) and the client thread spent in each phase (from
//! `/proc/.../schedstat`), which tells the kernel work in the helper from the transport
//! and decoding in the client, and stays meaningful when other work shares the machine
//! (wall time then does not). The total is also given as best and worst of the runs.
//!
//! Optional arguments: the list of N to run (e.g. `cargo bench ... -- 1000 10000`).

mod common;

use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_proto::frame::MAX_FDS;
use baton_proto::tcp::TcpConnState;
use baton_repair_ipc::client::plan_batches;
use baton_repair_ipc::RepairClient;
use baton_testkit::netstat::Counters;
use baton_testkit::peer::{self, PeerProcess, Seeds, HEADER_LEN};
use baton_testkit::{netns, tcp};
use common::{
    median, process_cpu_time, raise_nofile_for, sizes_from_args, spawn_helper, thread_cpu_time,
};

/// Bytes queued each way per connection ("a few KiB").
const K: usize = 4 << 10;
const SEEDS: Seeds = Seeds {
    peer: 0xBE4C_0000_0000_0001,
    parent: 0xBE4C_0000_0000_0002,
};
const STEP: Duration = Duration::from_secs(60);
/// Target for dump + restore per connection.
const TARGET_US: f64 = 20.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Helper,
    InProcess,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    dump: Duration,
    restore: Duration,
    /// Part of `restore` spent in socket(2) for the fresh sockets.
    sockets: Duration,
    /// CPU time of the helper process during the dump and the restore.
    dump_helper_cpu: Duration,
    restore_helper_cpu: Duration,
    /// CPU time of this (client) thread during the dump and the restore.
    dump_client_cpu: Duration,
    restore_client_cpu: Duration,
    /// How the restored sockets got their sent parts back to the peer (untimed check).
    resend: Resend,
}

/// From the end of the restore until the peer had acknowledged every restored send
/// queue: how long, and what it took, from the namespace's counters.
#[derive(Debug, Clone, Copy)]
struct Resend {
    /// Whether the retransmission timeouts were capped at [`RTO_CAP_MS`].
    capped: bool,
    took: Duration,
    loss_probes: i64,
    timeouts: i64,
    lo_dropped: i64,
}

/// `TCP_RTO_MAX_MS` (`include/uapi/linux/tcp.h`, Linux 6.15+; not in `libc` yet).
const TCP_RTO_MAX_MS: libc::c_int = 44;
/// The smallest cap it takes.
const RTO_CAP_MS: libc::c_int = 1000;

/// Cap the retransmission timeout of every socket at [`RTO_CAP_MS`] (module comment).
/// False if the kernel has no such option (before 6.15): the timeouts then back off as
/// usual.
fn cap_rto(socks: &[TcpStream]) -> bool {
    use std::os::fd::AsRawFd;
    for (i, s) in socks.iter().enumerate() {
        // SAFETY: setsockopt reads one int we own; the fd is borrowed for the call.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_TCP,
                TCP_RTO_MAX_MS,
                (&RTO_CAP_MS as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            assert!(
                i == 0 && err.raw_os_error() == Some(libc::ENOPROTOOPT),
                "connection {i}: TCP_RTO_MAX_MS {RTO_CAP_MS}: {err}"
            );
            return false;
        }
    }
    true
}

/// The counters that tell how lost segments were resent, for messages.
const RESEND_COUNTERS: [&str; 7] = [
    "TcpExt.TCPLossProbes",
    "TcpExt.TCPLossProbeRecovery",
    "TcpExt.TCPTimeouts",
    "TcpExt.TCPOFOQueue",
    "TcpExt.TCPOFODrop",
    "Tcp.RetransSegs",
    "lo.rx_dropped",
];

/// Wait until the peer has acknowledged every byte queued on `b` (SIOCOUTQ 0), `since`
/// being the counters at the end of the restore. Panics after `timeout` with the stuck
/// connections' TCP state and the counters.
fn await_acknowledged(b: &[TcpStream], since: &Counters, timeout: Duration) -> Resend {
    let start = Instant::now();
    let mut pending: Vec<usize> = (0..b.len()).collect();
    loop {
        pending.retain(|&i| tcp::outq(&b[i]).map_or(true, |q| q > 0));
        let took = start.elapsed();
        let counters = Counters::read().expect("namespace counters").since(since);
        if pending.is_empty() {
            return Resend {
                capped: false,
                took,
                loss_probes: counters.get("TcpExt.TCPLossProbes"),
                timeouts: counters.get("TcpExt.TCPTimeouts"),
                lo_dropped: counters.get("lo.rx_dropped"),
            };
        }
        if took >= timeout {
            let stuck: Vec<String> = pending
                .iter()
                .take(10)
                .map(|&i| format!("connection {i}: {}", tcp::describe(&b[i])))
                .collect();
            panic!(
                "{} of {} restored connections still had unacknowledged data {timeout:?} \
                 after the restore (the peer lost their sent parts, only their timers \
                 resend them); counters since the restore: {}. lo.rx_dropped: the \
                 loopback's per-CPU backlog (net.core.netdev_max_backlog) overflowed \
                 when many timers expired together; TcpExt.TCPOFOQueue: resent \
                 segments did not start at the peer's next byte. First stuck: {stuck:#?}",
                pending.len(),
                b.len(),
                counters.show(&RESEND_COUNTERS)
            );
        }
        // A sweep is one ioctl per connection; the resends need whole timer ticks.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU clocks of the helper and of this thread.
#[derive(Clone, Copy)]
struct Clocks {
    helper: Duration,
    client: Duration,
}

impl Clocks {
    fn now(helper: u32) -> Self {
        Clocks {
            helper: process_cpu_time(helper),
            client: thread_cpu_time(),
        }
    }

    fn since(&self, earlier: Clocks) -> (Duration, Duration) {
        (self.helper - earlier.helper, self.client - earlier.client)
    }
}

fn fresh_socket() -> TcpStream {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One full cycle for `n` connections; returns the timings.
fn run_once(client: &mut RepairClient, helper: u32, n: usize, via: Via) -> Sample {
    let listener = peer::listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("listener");
    let addr = listener.local_addr().expect("listener address");
    let mut peer = PeerProcess::spawn(addr, n, K, SEEDS, &[]).expect("spawn the peer process");
    let a = peer::accept_indexed(&listener, n, STEP).expect("accept");
    peer.wait_ready(STEP).expect("peer ready");
    peer::write_many(&a, STEP, |i| SEEDS.parent_pattern(i).bytes(0, K)).expect("A writes");
    // Sent (not merely queued) and unacknowledged, as in a live flow.
    assert!(
        tcp::wait_until(STEP, || a.iter().all(|s| tcp::outq_nsd(s).ok() == Some(0))),
        "A's data was not transmitted"
    );

    let c0 = Clocks::now(helper);
    let t = Instant::now();
    let states: Vec<TcpConnState> = match via {
        Via::Helper => {
            let fds: Vec<BorrowedFd<'_>> = a.iter().map(|s| s.as_fd()).collect();
            client
                .dump(&fds)
                .expect("dump request")
                .into_iter()
                .map(|r| r.expect("dump"))
                .collect()
        }
        Via::InProcess => a
            .iter()
            .map(|s| baton_tcp_repair::dump(s.as_fd()).expect("dump"))
            .collect(),
    };
    let dump = t.elapsed();
    let (dump_helper_cpu, dump_client_cpu) = Clocks::now(helper).since(c0);
    for s in &states {
        assert_eq!(s.recv_queue.len(), HEADER_LEN + K);
        assert_eq!(s.send_queue.len(), K);
    }

    drop(a);
    peer.hear(STEP).expect("peer hears");

    let c0 = Clocks::now(helper);
    let t = Instant::now();
    let b: Vec<TcpStream> = states.iter().map(|_| fresh_socket()).collect();
    let sockets = t.elapsed();
    let reports: Vec<_> = match via {
        Via::Helper => {
            let items: Vec<(BorrowedFd<'_>, &TcpConnState)> =
                b.iter().map(|s| s.as_fd()).zip(states.iter()).collect();
            client
                .restore(&items)
                .expect("restore request")
                .into_iter()
                .map(|r| r.expect("restore"))
                .collect()
        }
        Via::InProcess => b
            .iter()
            .zip(&states)
            .map(|(s, st)| baton_tcp_repair::restore(s.as_fd(), st).expect("restore"))
            .collect(),
    };
    let restore = t.elapsed();
    let (restore_helper_cpu, restore_client_cpu) = Clocks::now(helper).since(c0);
    let restored = Counters::read().expect("namespace counters");

    // Untimed: finish the send queues, wait until the peer has all of it, and check
    // every byte both ways.
    let capped = cap_rto(&b);
    peer::write_many(&b, STEP, |i| {
        states[i].send_queue[reports[i].send_queue_written as usize..].to_vec()
    })
    .expect("finish send queues");
    let resend = Resend {
        capped,
        ..await_acknowledged(&b, &restored, STEP)
    };
    peer.verify(K, 0, STEP).expect("peer verifies A's stream");
    peer::read_exact_many(&b, HEADER_LEN + K, STEP, |i, offset, bytes| {
        peer::verify_peer_stream(SEEDS, i, offset, bytes)
    })
    .expect("B verifies the peer's stream");
    let status = peer.quit(STEP).expect("peer quits");
    assert!(status.success(), "peer process: {status}");
    Sample {
        dump,
        restore,
        sockets,
        dump_helper_cpu,
        restore_helper_cpu,
        dump_client_cpu,
        restore_client_cpu,
        resend,
    }
}

struct Row {
    n: usize,
    reps: usize,
    dump_us: f64,
    dump_helper_us: f64,
    dump_client_us: f64,
    restore_us: f64,
    restore_helper_us: f64,
    restore_client_us: f64,
    sockets_us: f64,
    total_us: f64,
    total_best_us: f64,
    total_worst_us: f64,
    round_trips: usize,
    /// Worst run: time until the peer had every sent part, and the counters of that
    /// run (maximum of each over the runs).
    resend_worst: Resend,
}

fn measure(client: &mut RepairClient, helper: u32, n: usize, via: Via) -> Row {
    let reps = if n >= 10_000 { 3 } else { 5 };
    let samples: Vec<Sample> = (0..reps)
        .map(|_| run_once(client, helper, n, via))
        .collect();
    let per_conn = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    let med =
        |f: &dyn Fn(&Sample) -> Duration| median(samples.iter().map(|s| per_conn(f(s))).collect());
    let round_trips = match via {
        // What the client sends: one request per batch, for dump and for restore.
        Via::Helper => {
            let sizes = vec![HEADER_LEN + 2 * K; n];
            2 * plan_batches(&sizes).len()
        }
        Via::InProcess => 0,
    };
    Row {
        n,
        reps,
        dump_us: med(&|s| s.dump),
        dump_helper_us: med(&|s| s.dump_helper_cpu),
        dump_client_us: med(&|s| s.dump_client_cpu),
        restore_us: med(&|s| s.restore),
        restore_helper_us: med(&|s| s.restore_helper_cpu),
        restore_client_us: med(&|s| s.restore_client_cpu),
        sockets_us: med(&|s| s.sockets),
        total_us: med(&|s| s.dump + s.restore),
        total_best_us: samples
            .iter()
            .map(|s| per_conn(s.dump + s.restore))
            .fold(f64::INFINITY, f64::min),
        total_worst_us: samples
            .iter()
            .map(|s| per_conn(s.dump + s.restore))
            .fold(0.0, f64::max),
        round_trips,
        resend_worst: Resend {
            capped: samples.iter().all(|s| s.resend.capped),
            took: samples
                .iter()
                .map(|s| s.resend.took)
                .max()
                .unwrap_or_default(),
            loss_probes: samples
                .iter()
                .map(|s| s.resend.loss_probes)
                .max()
                .unwrap_or(0),
            timeouts: samples.iter().map(|s| s.resend.timeouts).max().unwrap_or(0),
            lo_dropped: samples
                .iter()
                .map(|s| s.resend.lo_dropped)
                .max()
                .unwrap_or(0),
        },
    }
}

fn print_table(title: &str, rows: &[Row]) {
    println!("{title}");
    let head = |a: [&str; 13]| {
        println!(
            "{:>6} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>6} | {:>4}",
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11], a[12]
        )
    };
    head([
        "", "dump", "helper", "client", "restore", "helper", "client", "socket()", "total",
        "total", "total", "round", "",
    ]);
    head([
        "N", "µs/conn", "cpu", "cpu", "µs/conn", "cpu", "cpu", "part", "µs/conn", "best", "worst",
        "trips", "reps",
    ]);
    for r in rows {
        println!(
            "{:>6} | {:>8.2} {:>8.2} {:>8.2} | {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>8.2} {:>8.2} {:>8.2} | {:>6} | {:>4}",
            r.n,
            r.dump_us,
            r.dump_helper_us,
            r.dump_client_us,
            r.restore_us,
            r.restore_helper_us,
            r.restore_client_us,
            r.sockets_us,
            r.total_us,
            r.total_best_us,
            r.total_worst_us,
            r.round_trips,
            r.reps
        );
    }
    println!(
        "(µs per connection, medians; wall time, then the CPU time of the helper process and \
         of the client thread in that phase; restore includes creating the fresh sockets)"
    );
    for r in rows {
        let w = &r.resend_worst;
        println!(
            "N = {}: the peer had every lost sent part back {:.2} s after the restore \
             (worst run); per run at most {} loss probes, {} retransmission timeouts{}, \
             {} loopback drops",
            r.n,
            w.took.as_secs_f64(),
            w.loss_probes,
            w.timeouts,
            if w.capped {
                format!(" (capped at {RTO_CAP_MS} ms)")
            } else {
                " (not capped: kernel without TCP_RTO_MAX_MS)".to_string()
            },
            w.lo_dropped
        );
    }
}

fn main() {
    peer::run_if_peer();

    let sizes = sizes_from_args(&[1, 100, 1_000, 10_000]);
    netns::enter_private_netns().expect("private netns (run the bench as root)");
    // No RTT carried from one run's connections to the next run's restored sockets:
    // every run resends its lost sent parts the same way (module comment).
    std::fs::write("/proc/sys/net/ipv4/tcp_no_metrics_save", "1")
        .expect("net.ipv4.tcp_no_metrics_save in the bench's namespace");
    raise_nofile_for(sizes.iter().copied().max().unwrap_or(0));
    let (mut client, mut helper) = spawn_helper(STEP);
    let helper_pid = helper.id();

    let rows: Vec<Row> = sizes
        .iter()
        .map(|&n| measure(&mut client, helper_pid, n, Via::Helper))
        .collect();
    let local: Vec<Row> = sizes
        .iter()
        .filter(|&&n| n >= 1_000)
        .map(|&n| measure(&mut client, helper_pid, n, Via::InProcess))
        .collect();
    drop(client);
    let status = helper.wait().expect("wait for the helper");
    assert!(status.success(), "baton-repair: {status}");

    // The same through a helper that does not split batches over two threads.
    let (mut client, mut helper) = RepairClient::spawn(
        env!("CARGO_BIN_EXE_baton-repair"),
        ["--quiet", "--single-thread"],
    )
    .expect("spawn baton-repair");
    client.set_timeout(STEP);
    let helper_pid = helper.id();
    let single: Vec<Row> = sizes
        .iter()
        .filter(|&&n| n >= 1_000)
        .map(|&n| measure(&mut client, helper_pid, n, Via::Helper))
        .collect();
    drop(client);
    let status = helper.wait().expect("wait for the helper");
    assert!(status.success(), "baton-repair --single-thread: {status}");

    println!();
    print_table(
        &format!(
            "baton-repair dump/restore, {K} bytes queued each way per connection, \
             ≤{MAX_FDS} sockets per request (medians)"
        ),
        &rows,
    );
    if let Some(big) = rows.iter().max_by_key(|r| r.n) {
        println!(
            "target: dump + restore < {TARGET_US} µs/conn; at N = {}: {:.2} µs/conn ({})",
            big.n,
            big.total_us,
            if big.total_us < TARGET_US {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    if !single.is_empty() {
        println!();
        print_table(
            "for comparison, baton-repair --single-thread (batches not split over two threads)",
            &single,
        );
    }
    if !local.is_empty() {
        println!();
        print_table(
            "for comparison, in-process (baton_tcp_repair called directly: no helper, no IPC)",
            &local,
        );
    }
}
