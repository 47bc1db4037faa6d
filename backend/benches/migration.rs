//! Device-state SAVE and LOAD time of a live migration with many TCP connections: two
//! real `baton` processes with `--helper`, the vhost-user test frontend and smoltcp as
//! the guest (as in `tests/migrate_faults.rs`), placed (`BATON_BENCH_PLACE`) either
//!
//! * **same**: both in one private network namespace (same host): the target takes the
//!   live sockets over from the source through its handover socket — in the qemu
//!   transfer mode it comes for them as soon as it reads the stream's Source record, and
//!   the source skips the dump (README "Same host: the target comes for the stream"); or
//! * **hosts**: on the two simulated hosts of `tests/migrate_hosts.rs`
//!   (`tests/common/hosts.rs`: source and target each in a namespace of its own, joined
//!   by veth to the peers' namespace): every socket is frozen and dumped (or checked
//!   against its pre-dump) through the source's `baton-repair` at SAVE, travels in the
//!   stream with its queues, and is restored through the target's `baton-repair` at
//!   LOAD. The guest's address moves from the source host to the target after LOAD.
//!
//! For each connection count N:
//!
//! 1. the guest opens N connections to a peer (same host: on the loopback, through the
//!    gateway address; hosts: at the peers' namespace); the peer writes
//!    `BATON_BENCH_INFLIGHT` bytes (default 4 KiB) into
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
//!    over from the source through its handover socket, or restoring them through the
//!    target's `baton-repair`);
//! 5. untimed: the guest runs on the target (hosts: then the address moves) and every
//!    connection must carry data both ways — the guest receives the queued bytes and
//!    8 more the peer writes in answer to 8 bytes of the guest's; the time this took
//!    is printed with the target's lines ("after the migration").
//!
//! Printed as a table (SAVE and LOAD apart; counts of 10,000 and more are measured
//! `BATON_BENCH_RUNS` times, default 3, and the table shows the best run and the spread),
//! with the backends' own breakdown lines: the helper's dump, freezing and offering,
//! writing the stream (SAVE); reading and validating the stream, receiving the sockets
//! through the handover or restoring them through `baton-repair`, rebuilding the flows
//! (LOAD). Run as root: `cargo bench -p baton --bench migration`.
//! Env: `BATON_BENCH_CONNS` (default `1,100,1000,10000`), `BATON_BENCH_RUNS`,
//! `BATON_BENCH_INFLIGHT` (bytes per connection, default 4096), `BATON_BENCH_LOG=DIR`
//! keeps both backends' logs there, `BATON_BENCH_PREDUMP` (`both`, the default, `on`,
//! `off`) and `BATON_BENCH_TRANSFER` (`both`, the default, `qemu`, `sequential`): which
//! rows; `BATON_BENCH_PLACE` (`both`, the default, `same`, `hosts`): which placements.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_proto::migration::decode_stream;
use baton_vu_harness::{FrontendOptions, NetFrontend};

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;

#[path = "../tests/common/mod.rs"]
mod common;
use common::guest::{v4_pair_with_helper, Guest, GW_V4};
use common::hosts::{Hosts, Logs, Target, PEER};
use common::Baton;

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

/// Where the target runs, relative to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Both backends in one network namespace: the target takes the live sockets over
    /// (and, coming early, lets the source skip the dump).
    Same,
    /// Two simulated hosts (`tests/common/hosts.rs`): every socket is dumped through
    /// the source's `baton-repair` at SAVE and restored through the target's at LOAD.
    Hosts,
}

impl Place {
    fn label(self) -> &'static str {
        match self {
            Place::Same => "same",
            Place::Hosts => "hosts",
        }
    }
}

/// The backends of one migration and where the peers listen.
enum Backends {
    Same { a: Baton, b: Baton },
    Hosts(Box<Hosts>),
}

impl Backends {
    /// A fresh network namespace for the calling thread (the peers'), the backends
    /// wired as `place` says, and the address the guest connects to.
    fn start(place: Place, label: &str) -> (Self, Ipv4Addr, Ipv4Addr) {
        match place {
            Place::Same => {
                baton_testkit::netns::enter_private_netns()
                    .expect("private network namespace (run as root)");
                let (a, b) = v4_pair_with_helper(label);
                // The gateway address reaches the host's loopback.
                (Backends::Same { a, b }, Ipv4Addr::LOCALHOST, GW_V4)
            }
            Place::Hosts => {
                let hosts = Hosts::build_logging(label, Target::OtherHost, Logs::Info);
                (Backends::Hosts(Box::new(hosts)), PEER, PEER)
            }
        }
    }

    fn a(&self) -> &Baton {
        match self {
            Backends::Same { a, .. } => a,
            Backends::Hosts(hosts) => hosts.a(),
        }
    }

    fn b(&self) -> &Baton {
        match self {
            Backends::Same { b, .. } => b,
            Backends::Hosts(hosts) => &hosts.b,
        }
    }
}

/// The guest's bytes on connection `index` after the migration; the peer that reads
/// them answers with [`reply`] — so both directions are checked on every connection,
/// whichever order the peer accepted them in.
fn hello(index: usize) -> [u8; 8] {
    (index as u64 | 0x4845_4c4c_0000_0000).to_be_bytes()
}

fn reply(hello: [u8; 8]) -> [u8; 8] {
    (u64::from_be_bytes(hello) ^ 0xffff_ffff_0000_0000).to_be_bytes()
}

/// After the migration, with the guest running on the target: every connection still
/// works — the guest receives the `inflight` bytes the peer wrote before it (which
/// travelled in the sockets' queues) and sends [`hello`], the peer answers with
/// [`reply`], and the guest receives that too. One thread drives the guest and the
/// (nonblocking) peer ends. The time it took, or what went wrong.
fn check_alive(
    guest: &mut Guest,
    handles: &[SocketHandle],
    peers: &mut [TcpStream],
    inflight: usize,
) -> Result<Duration, String> {
    struct GuestEnd {
        sent: bool,
        received: Vec<u8>,
    }
    struct PeerEnd {
        hello: Vec<u8>,
        replied: bool,
    }
    let started = Instant::now();
    let mut guest_ends: Vec<GuestEnd> = handles
        .iter()
        .map(|_| GuestEnd {
            sent: false,
            received: Vec::with_capacity(inflight + 8),
        })
        .collect();
    let mut peer_ends: Vec<PeerEnd> = peers
        .iter()
        .map(|_| PeerEnd {
            hello: Vec::with_capacity(8),
            replied: false,
        })
        .collect();
    for peer in peers.iter() {
        peer.set_nonblocking(true)
            .map_err(|e| format!("peer nonblocking: {e}"))?;
    }
    let mut buf = vec![0u8; inflight + 8];
    loop {
        guest.poll();
        let mut guest_done = 0;
        for (i, (handle, end)) in handles.iter().zip(&mut guest_ends).enumerate() {
            let socket = guest.tcp(*handle);
            if !matches!(
                socket.state(),
                tcp::State::Established | tcp::State::CloseWait
            ) {
                return Err(format!(
                    "connection {i}: {} after the migration ({} of {} bytes received)",
                    socket.state(),
                    end.received.len(),
                    inflight + 8
                ));
            }
            if !end.sent && socket.send_slice(&hello(i)) == Ok(8) {
                end.sent = true;
            }
            while socket.can_recv() && end.received.len() < inflight + 8 {
                let room = inflight + 8 - end.received.len();
                match socket.recv_slice(&mut buf[..room]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => end.received.extend_from_slice(&buf[..n]),
                }
            }
            if end.received.len() == inflight + 8 {
                let (old, new) = end.received.split_at(inflight);
                if old.iter().any(|&b| b != 0x5a) || new != reply(hello(i)) {
                    return Err(format!("connection {i}: the guest received wrong bytes"));
                }
                guest_done += 1;
            }
        }
        guest.poll();
        for (peer, end) in peers.iter_mut().zip(&mut peer_ends) {
            if end.replied {
                continue;
            }
            if end.hello.len() < 8 {
                let mut got = [0u8; 8];
                let want = 8 - end.hello.len();
                match peer.read(&mut got[..want]) {
                    Ok(0) => return Err("a peer saw its connection closed".into()),
                    Ok(n) => end.hello.extend_from_slice(&got[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(format!("peer read: {e}")),
                }
            }
            if let Ok(hello) = <[u8; 8]>::try_from(end.hello.as_slice()) {
                // 8 bytes into an idle socket's empty send buffer: written whole.
                match peer.write(&reply(hello)) {
                    Ok(8) => end.replied = true,
                    Ok(n) => return Err(format!("peer wrote {n} of 8 bytes")),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(format!("peer write: {e}")),
                }
            }
        }
        if guest_done == handles.len() {
            return Ok(started.elapsed());
        }
        if started.elapsed() > TIMEOUT {
            let peers_done = peer_ends.iter().filter(|e| e.replied).count();
            return Err(format!(
                "after {TIMEOUT:?}: {guest_done} of {} connections done at the guest,                  {peers_done} peers got the guest's bytes",
                handles.len()
            ));
        }
        guest.wait();
    }
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
    place: Place,
    keep_logs: Option<&str>,
) -> Result<Row, String> {
    let (backends, listen_on, connect_to) =
        Backends::start(place, &format!("bench-migration-{}-{conns}", place.label()));
    let (a, b) = (backends.a(), backends.b());

    // A deep accept queue: std's 128 overflows while a wave of SYNs comes in over the
    // veth, and a connection whose handshake then completed through a SYN cookie is
    // lost at the peer while the guest thinks it is established.
    let listener = baton_testkit::hostflows::listen((listen_on, 0).into()).expect("listen");
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
            guest.connect(handle, (connect_to, port), FIRST_PORT + i as u16);
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
    let moved = match place {
        Place::Same => format!("{conns} TCP connection(s) taken over from the source"),
        Place::Hosts => format!("{conns} TCP connection(s) restored through baton-repair"),
    };
    assert!(b.log().contains(&moved), "{}", b.log());

    // The VM runs on the target; between hosts the source's address moves there after
    // that, as in `tests/migrate_hosts.rs`. Then every connection must still carry data
    // both ways (not timed with the migration).
    drop(guest.stop());
    guest.start(target);
    if let Backends::Hosts(hosts) = &backends {
        hosts.move_address();
    }
    let alive = check_alive(&mut guest, &handles, &mut peers, inflight).unwrap_or_else(|e| {
        panic!(
            "{} after the migration: {e}\n--- target log:\n{}",
            place.label(),
            b.log()
        )
    });

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
            "came for the stream",
            "device state saved",
            "out of repair mode",
        ],
    ));
    let mut target_lines = pick(
        b.log(),
        &[
            "taken over",
            "stream read and validated",
            "restored through baton-repair",
            "re-probing over",
        ],
    );
    target_lines.push(format!(
        "after the migration, every connection carried data both ways (the {inflight} \
         queued bytes and 8 more to the guest, 8 to the peer) within {:.1} ms",
        alive.as_secs_f64() * 1e3
    ));
    if let Some(dir) = keep_logs {
        let mode = format!(
            "{}-{}-{transfer:?}",
            place.label(),
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
    drop(guest);
    drop(peers);
    drop(backends);
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

/// One count in one mode: (connections, pre-dump, transfer, placement, the runs' results).
type TableEntry = (usize, bool, Transfer, Place, Vec<Result<Row, String>>);

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
    let places: Vec<Place> = match std::env::var("BATON_BENCH_PLACE").as_deref() {
        Ok("same") => vec![Place::Same],
        Ok("hosts") => vec![Place::Hosts],
        Ok("both") | Err(_) => vec![Place::Same, Place::Hosts],
        Ok(other) => panic!("BATON_BENCH_PLACE: both, same or hosts, not {other:?}"),
    };
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
        for &place in &places {
            for &(pre_dump, transfer) in &modes {
                let repeat = if n >= 10_000 { runs } else { 1 };
                let results = (0..repeat)
                    .map(|_| measure(n, inflight, pre_dump, transfer, place, keep_logs.as_deref()))
                    .collect();
                table.push((n, pre_dump, transfer, place, results));
            }
        }
    }

    println!();
    println!(
        "live migration, {inflight} bytes unacknowledged per connection (place \"same\": \
         both backends on one host, the target takes the live sockets over; \"hosts\": \
         source and target on two hosts, every socket dumped through baton-repair at SAVE \
         and restored through the target's at LOAD)"
    );
    println!(
        "(transfer \"seq\": SAVE, then LOAD of the whole stream, each timed alone; \"qemu\": \
         the stream passed on while the source writes it, as QEMU does — SAVE until the \
         source's CHECK, LOAD what the target needed after that, total from SAVE's start \
         to the target's CHECK)"
    );
    println!(
        "{:>7} {:>6} {:>5} {:>5} {:>12} {:>10} {:>10} {:>10} {:>12} {:>12} {:>13}",
        "conns",
        "place",
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
    for (n, _, transfer, place, results) in &table {
        let ok: Vec<&Row> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        for why in results.iter().filter_map(|r| r.as_ref().err()) {
            println!("{n:>7} {:>6}   SAVE failed: {why}", place.label());
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
            "{:>7} {:>6} {:>5} {:>5} {:>12} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>12} {:>13}",
            best.conns,
            place.label(),
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
                "{:>7} {:>6} {:>5} {:>5} {:>12} {:>10} {:>10} {:>10}   (spread over the runs)",
                "",
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
    for (_, pre_dump, transfer, place, results) in &table {
        let mode = format!(
            "{} {} {transfer:?}",
            place.label(),
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
