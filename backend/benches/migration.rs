//! Device-state SAVE and LOAD time of a same-host live migration with many TCP
//! connections: two real `baton` processes with `--helper` in a private network
//! namespace, the vhost-user test frontend and smoltcp as the guest (as in
//! `tests/migrate_faults.rs`). For each connection count N:
//!
//! 1. the guest opens N connections to a host peer on the loopback (through the
//!    gateway address); the peer writes `BATON_BENCH_INFLIGHT` bytes (default 4 KiB) into
//!    each, and the guest stops reading — so every socket holds that much data that the
//!    guest has not acknowledged (it is in the socket's receive queue, and in the dump);
//!    the source's CPU time while it moves that data towards the silent guest (and when
//!    it was last busy) is printed with its log lines ("towards the silent guest");
//! 2. the migration starts (`LOG_ALL`, the VM still runs). With pre-dump (the default
//!    row) the bench waits until the source has pre-dumped every connection through
//!    `baton-repair` (its "pre-dump pass over" line; `crate::predump`) and prints that
//!    time as its own column — it runs while the VM runs, so it is not downtime, but
//!    it costs CPU and helper work. Without (the row marked "no"), SAVE follows
//!    `LOG_ALL` at once, so (almost) nothing is pre-dumped;
//! 3. SAVE on the source (after `GET_VRING_BASE` on both rings): time from
//!    `SET_DEVICE_STATE_FD` to a successful `CHECK_DEVICE_STATE`, the stream read to EOF
//!    in between (freeze + dump through `baton-repair`, offer, stream);
//! 4. LOAD on the target, before its rings exist, as QEMU does: time from
//!    `SET_DEVICE_STATE_FD` to `CHECK_DEVICE_STATE` (validation + taking the live sockets
//!    over from the source through its handover socket).
//!
//! Printed as a table (SAVE and LOAD apart; counts of 10,000 and more are measured
//! `BATON_BENCH_RUNS` times, default 3, and the table shows the best run and the spread),
//! with the backends' own breakdown lines: the helper's dump, freezing and offering,
//! writing the stream (SAVE); reading and validating the stream, receiving the sockets
//! through the handover, rebuilding the flows (LOAD). Run as root:
//! `cargo bench -p baton --bench migration`.
//! Env: `BATON_BENCH_CONNS` (default `1,100,1000,10000`), `BATON_BENCH_RUNS`,
//! `BATON_BENCH_INFLIGHT` (bytes per connection, default 4096), `BATON_BENCH_LOG=DIR`
//! keeps both backends' logs there, `BATON_BENCH_PREDUMP` (`both`, the default, `on`,
//! `off`): which rows.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_proto::migration::decode_stream;
use baton_vu_harness::{FrontendOptions, NetFrontend};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

#[path = "../tests/common/mod.rs"]
mod common;
use common::guest::{v4_pair_with_helper, Guest, GW_V4};

const TIMEOUT: Duration = Duration::from_secs(120);
/// Guest-side ports: connection `i` uses `FIRST_PORT + i`.
const FIRST_PORT: u16 = 10000;
/// Connections opened at a time.
const WAVE: usize = 250;
/// How long the backends get to move the peer's data towards the (silent) guest.
const SETTLE: Duration = Duration::from_millis(2500);
/// How often the source's CPU time is sampled during [`SETTLE`].
const SETTLE_SAMPLE: Duration = Duration::from_millis(50);

/// CPU time (user + system) of every thread of process `pid` so far, from
/// `/proc/PID/task/*/schedstat` (nanoseconds, finer than `/proc/PID/stat`'s ticks).
fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// Accept `n` connections; keep them open.
fn accept_all(listener: TcpListener, n: usize) -> JoinHandle<Vec<TcpStream>> {
    std::thread::spawn(move || {
        (0..n)
            .map(|_| listener.accept().expect("accept").0)
            .collect()
    })
}

/// How the device state travels from the source to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    /// SAVE to the end, then LOAD of the whole stream: each side timed alone.
    Sequential,
    /// As QEMU does between two hosts (`baton_vu_harness::migrate_device_state`): the
    /// target's LOAD starts with the source's first bytes and the stream is passed on in
    /// 1 MiB chunks while the source writes it, so the target reads and validates it
    /// meanwhile. The total is from SAVE's start to the target's successful CHECK.
    Qemu,
}

/// One row of the table.
struct Row {
    conns: usize,
    /// Whether the pre-dump pass ran to its end before SAVE, and how long it took (from
    /// `LOG_ALL` to its log line).
    pre_dump: Option<Duration>,
    /// Sequential: SAVE alone. Qemu: until the source's CHECK.
    save: Duration,
    /// Sequential: LOAD alone. Qemu: from the source's CHECK to the target's.
    load: Duration,
    stream_bytes: usize,
    /// Queue bytes in the stream (decoded in the sequential mode only).
    queued: Option<usize>,
    source_lines: Vec<String>,
    target_lines: Vec<String>,
}

/// One migration of `conns` connections; `Err` with the source's reason if SAVE fails
/// (the table says so instead of stopping the run).
fn measure(
    conns: usize,
    inflight: usize,
    pre_dump: bool,
    transfer: Transfer,
    keep_logs: Option<&str>,
) -> Result<Row, String> {
    baton_testkit::netns::enter_private_netns().expect("private network namespace (run as root)");
    let (a, b) = v4_pair_with_helper(&format!("bench-migration-{conns}"));

    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let accepted = accept_all(listener, conns);

    let dev = a.connect();
    let mut guest = Guest::new(dev);
    // Open the connections in waves: thousands of SYNs at once overflow the guest's
    // receive ring and the peer's accept queue, and the retries take minutes.
    let mut handles: Vec<SocketHandle> = Vec::with_capacity(conns);
    let deadline = Instant::now() + TIMEOUT;
    while handles.len() < conns {
        let wave = (conns - handles.len()).min(WAVE);
        for _ in 0..wave {
            let i = handles.len();
            let handle = guest.socket(inflight.max(1024) * 2, 1024);
            guest.connect(handle, (GW_V4, port), FIRST_PORT + i as u16);
            handles.push(handle);
        }
        loop {
            guest.poll();
            let established = handles
                .iter()
                .filter(|h| {
                    guest.sockets.get::<tcp::Socket>(**h).state() == tcp::State::Established
                })
                .count();
            if established == handles.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{established} of {} connections established; log:\n{}",
                handles.len(),
                a.log()
            );
            guest.wait();
        }
    }
    let mut peers = accepted.join().expect("accept thread");
    assert_eq!(peers.len(), conns);

    // The peer writes; the guest stays silent, so nothing is acknowledged.
    let data = vec![0x5au8; inflight];
    let cpu_before = cpu_time(a.pid());
    let written = Instant::now();
    for peer in &mut peers {
        peer.write_all(&data).expect("peer write");
    }
    // The source's CPU time while it moves the data towards the silent guest, and when
    // it last used any (sampled: the engine should go idle once the guest's receive
    // queue is full, not keep working per flow).
    let mut last_busy = Duration::ZERO;
    let mut cpu_seen = cpu_time(a.pid());
    while written.elapsed() < SETTLE {
        std::thread::sleep(SETTLE_SAMPLE);
        let cpu = cpu_time(a.pid());
        if cpu > cpu_seen {
            last_busy = written.elapsed();
        }
        cpu_seen = cpu;
    }
    let settle_line = format!(
        "towards the silent guest: source CPU {:.1} ms in {:.1} s, last busy within {:.0} ms \
         of the peers' writes (sampled every {} ms)",
        cpu_seen.saturating_sub(cpu_before).as_secs_f64() * 1e3,
        SETTLE.as_secs_f64(),
        last_busy.as_secs_f64() * 1e3,
        SETTLE_SAMPLE.as_millis()
    );

    // The migration starts: LOG_ALL while the VM runs (QEMU's pre-copy).
    let log_all = Instant::now();
    guest.dev().start_dirty_log().expect("LOG_ALL");
    let pre_dump = pre_dump.then(|| {
        while !a.log().contains("pre-dump pass over") {
            assert!(
                log_all.elapsed() < TIMEOUT,
                "no pre-dump pass within {TIMEOUT:?}; log:\n{}",
                a.log()
            );
            // The guest stays silent (as during SETTLE): its ACKs would let the
            // backends consume the peer's data, and the connections would not be idle.
            std::thread::sleep(Duration::from_millis(5));
        }
        log_all.elapsed()
    });

    let dev = guest.dev();
    dev.stop_rings().expect("GET_VRING_BASE");
    let save_failed = |e: baton_vu_harness::HarnessError| {
        let log = a.log();
        let reason = log
            .lines()
            .find(|l| l.contains("device state SAVE failed"))
            .map_or_else(|| e.to_string(), |l| l.to_string());
        let first_warning = log
            .lines()
            .find(|l| l.contains("WARN"))
            .unwrap_or_default()
            .to_string();
        format!("{reason}\n          first warning: {first_warning}")
    };
    let (save, load, stream_bytes, queued, target) = match transfer {
        Transfer::Sequential => {
            let started = Instant::now();
            let stream = dev.save_state().map_err(save_failed)?;
            let save = started.elapsed();
            let state = decode_stream(&stream).expect("valid stream");
            assert_eq!(state.tcp_flows.len(), conns, "log:\n{}", a.log());
            let queued: usize = state
                .tcp_flows
                .iter()
                .filter_map(|f| f.kernel.as_ref())
                .map(|k| k.recv_queue.len() + k.send_queue.len())
                .sum();
            let mut load = None;
            let target =
                NetFrontend::connect_with(&b.socket(), FrontendOptions::default(), |dev| {
                    let started = Instant::now();
                    dev.load_state(&stream)?;
                    load = Some(started.elapsed());
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("LOAD: {e}; log:\n{}", b.log()));
            (
                save,
                load.expect("the hook ran"),
                stream.len(),
                Some(queued),
                target,
            )
        }
        Transfer::Qemu => {
            // The target connects first (QEMU's incoming side waits for the stream with
            // its device initialised but not started), then the state flows through.
            let mut times = None;
            let mut source_result = Ok(());
            let target =
                NetFrontend::connect_with(&b.socket(), FrontendOptions::default(), |target| {
                    match baton_vu_harness::migrate_device_state(&dev.fe, &target.fe) {
                        Ok(t) => times = Some(t),
                        Err(e) => source_result = Err(e),
                    }
                    Ok(())
                })
                .unwrap_or_else(|e| panic!("target: {e}; log:\n{}", b.log()));
            source_result.map_err(save_failed)?;
            let t = times.expect("the hook ran");
            (t.saved, t.loaded - t.saved, t.bytes as usize, None, target)
        }
    };
    let taken = format!("{conns} TCP connection(s) taken over from the source");
    assert!(b.log().contains(&taken), "{}", b.log());

    let pick = |log: String, words: &[&str]| -> Vec<String> {
        log.lines()
            .filter(|l| words.iter().any(|w| l.contains(w)))
            .map(|l| {
                l.split_once("Z ")
                    .map_or(l, |(_, rest)| rest)
                    .trim()
                    .to_string()
            })
            .collect()
    };
    let mut source_lines = vec![settle_line];
    source_lines.extend(pick(
        a.log(),
        &[
            "pre-dump pass over",
            "dumped through",
            "frozen (",
            "device state saved",
            "out of repair mode",
        ],
    ));
    let target_lines = pick(b.log(), &["taken over", "stream read and validated"]);
    if let Some(dir) = keep_logs {
        let mode = format!(
            "{}-{transfer:?}",
            if pre_dump.is_some() {
                "predump"
            } else {
                "nopredump"
            }
        );
        let _ = std::fs::write(
            format!("{dir}/migration-{conns}-{mode}-source.log"),
            a.log(),
        );
        let _ = std::fs::write(
            format!("{dir}/migration-{conns}-{mode}-target.log"),
            b.log(),
        );
    }
    drop(target);
    drop(guest);
    drop(peers);
    drop(a);
    drop(b);
    Ok(Row {
        conns,
        pre_dump,
        save,
        load,
        stream_bytes,
        queued,
        source_lines,
        target_lines,
    })
}

/// One count in one mode: (connections, pre-dump, transfer, the runs' results).
type TableEntry = (usize, bool, Transfer, Vec<Result<Row, String>>);

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let counts: Vec<usize> = std::env::var("BATON_BENCH_CONNS")
        .unwrap_or_else(|_| "1,100,1000,10000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("BATON_BENCH_CONNS: numbers"))
        .collect();
    let inflight: usize = std::env::var("BATON_BENCH_INFLIGHT")
        .ok()
        .map(|s| s.parse().expect("BATON_BENCH_INFLIGHT: a number"))
        .unwrap_or(4096);
    let keep_logs = std::env::var("BATON_BENCH_LOG").ok();
    let runs: usize = std::env::var("BATON_BENCH_RUNS")
        .ok()
        .map(|s| s.parse().expect("BATON_BENCH_RUNS: a number"))
        .unwrap_or(3)
        .max(1);
    let pre_dumps: Vec<bool> = match std::env::var("BATON_BENCH_PREDUMP").as_deref() {
        Ok("on") => vec![true],
        Ok("off") => vec![false],
        Ok("both") | Err(_) => vec![true, false],
        Ok(other) => panic!("BATON_BENCH_PREDUMP: both, on or off, not {other:?}"),
    };
    let transfers: Vec<Transfer> = match std::env::var("BATON_BENCH_TRANSFER").as_deref() {
        Ok("qemu") => vec![Transfer::Qemu],
        Ok("sequential") => vec![Transfer::Sequential],
        Ok("both") | Err(_) => vec![Transfer::Qemu, Transfer::Sequential],
        Ok(other) => panic!("BATON_BENCH_TRANSFER: both, qemu or sequential, not {other:?}"),
    };
    // Without a pre-dump only the sequential figures are shown unless asked for: the
    // pipelined transfer changes the same part of the time in both.
    let modes: Vec<(bool, Transfer)> = pre_dumps
        .iter()
        .flat_map(|&p| transfers.iter().map(move |&t| (p, t)))
        .filter(|&(p, t)| {
            p || t == Transfer::Sequential
                || std::env::var("BATON_BENCH_TRANSFER").as_deref() == Ok("qemu")
        })
        .collect();
    let largest = counts.iter().copied().max().unwrap_or(0) as u64;
    // The source holds one descriptor per connection (the offer lends the flows' own
    // sockets), the target as many, and this process the peer ends: each process needs
    // about N plus a few hundred.
    let nofile = baton_testkit::netns::raise_nofile(2 * largest + 1024).expect("RLIMIT_NOFILE");
    if nofile < largest + 512 {
        eprintln!(
            "warning: RLIMIT_NOFILE is {nofile} (hard limit; raising it needs \
             CAP_SYS_RESOURCE): {largest} connections need about {} descriptors per process",
            largest + 512
        );
    }

    let mut table: Vec<TableEntry> = Vec::new();
    for &n in &counts {
        for &(pre_dump, transfer) in &modes {
            let repeat = if n >= 10_000 { runs } else { 1 };
            let results = (0..repeat)
                .map(|_| measure(n, inflight, pre_dump, transfer, keep_logs.as_deref()))
                .collect();
            table.push((n, pre_dump, transfer, results));
        }
    }

    println!();
    println!("same-host migration, {inflight} bytes unacknowledged per connection");
    println!(
        "(transfer \"seq\": SAVE, then LOAD of the whole stream, each timed alone; \"qemu\": \
         the stream passed on while the source writes it, as QEMU does — SAVE until the \
         source's CHECK, LOAD what the target needed after that, total from SAVE's start \
         to the target's CHECK)"
    );
    println!(
        "{:>7} {:>5} {:>5} {:>12} {:>10} {:>10} {:>10} {:>12} {:>12} {:>13}",
        "conns",
        "runs",
        "xfer",
        "pre-dump ms",
        "SAVE ms",
        "LOAD ms",
        "total ms",
        "µs/conn",
        "stream B",
        "queued B"
    );
    for (n, _, transfer, results) in &table {
        let ok: Vec<&Row> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        for why in results.iter().filter_map(|r| r.as_ref().err()) {
            println!("{n:>7}   SAVE failed: {why}");
        }
        let Some(best) = ok.iter().min_by_key(|r| r.save + r.load) else {
            continue;
        };
        let total = best.save + best.load;
        let pre_dump = best.pre_dump.map_or_else(
            || "no".to_string(),
            |d| format!("{:.1}", d.as_secs_f64() * 1e3),
        );
        let xfer = match transfer {
            Transfer::Sequential => "seq",
            Transfer::Qemu => "qemu",
        };
        println!(
            "{:>7} {:>5} {:>5} {:>12} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>12} {:>13}",
            best.conns,
            ok.len(),
            xfer,
            pre_dump,
            best.save.as_secs_f64() * 1e3,
            best.load.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e6 / best.conns as f64,
            best.stream_bytes,
            best.queued
                .map_or_else(|| "–".to_string(), |q| q.to_string())
        );
        if ok.len() > 1 {
            let spread = |f: &dyn Fn(&Row) -> Duration| {
                let all: Vec<f64> = ok.iter().map(|r| f(r).as_secs_f64() * 1e3).collect();
                let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = all.iter().copied().fold(0.0, f64::max);
                format!("{lo:.1}–{hi:.1}")
            };
            println!(
                "{:>7} {:>5} {:>5} {:>12} {:>10} {:>10} {:>10}   (spread over the runs)",
                "",
                "",
                "",
                "",
                spread(&|r| r.save),
                spread(&|r| r.load),
                spread(&|r| r.save + r.load)
            );
        }
    }
    println!();
    for (_, pre_dump, transfer, results) in &table {
        let mode = format!(
            "{} {transfer:?}",
            if *pre_dump { "pre-dump" } else { "no pre-dump" }
        );
        for (run, r) in results.iter().filter_map(|r| r.as_ref().ok()).enumerate() {
            for line in &r.source_lines {
                println!("{:>7} {mode} #{run} source: {line}", r.conns);
            }
            for line in &r.target_lines {
                println!("{:>7} {mode} #{run} target: {line}", r.conns);
            }
        }
    }
}
