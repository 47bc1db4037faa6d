//! TCP connections migrated to a *different* host (issue 5): two real `baton` processes
//! with `--helper`, each in its own network namespace ("host"), both joined by a veth
//! to a peer namespace where the test's server runs. The source dumps every socket
//! through `baton-repair` at SAVE; the target restores them into fresh sockets at LOAD.
//!
//! ```text
//!   source ns S            peer ns P                        target ns T
//!   10.88.0.2 (moves) vS ── pS   10.88.0.1 (lo), server   pT ── vT 10.88.0.3 (own)
//!   baton A + helper        route 10.88.0.2 → pS, later pT      baton B + helper
//! ```
//!
//! The guest (smoltcp, driven by the test frontend) streams a verifiable pattern both
//! ways on every connection; some connections are half-closed (one side finished and
//! sent its FIN) before the migration. The guest stops mid-stream (data in flight both
//! ways), SAVE on A, LOAD on B, B's rings start and the guest runs there; only then does
//! the address move from S to T, as real networks do. Until then the peer's segments
//! still reach S, whose frozen sockets must neither acknowledge nor reset them (S's
//! `OutRsts` counter is checked, and every byte at both ends). A is stopped before the
//! transfers finish: its frozen sockets must close silently. Every byte is checked.
//!
//! And the failure path: a target without a helper fails LOAD, the source VM resumes
//! (a new frontend connection to A), A thaws its sockets and every connection carries on.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_proto::migration::decode_stream;
use baton_testkit::hostflows::{self, FlowPlan, HostFlows, Running};
use baton_testkit::pattern::Pattern;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;

mod common;
use common::guest::{connect_loading, helper_binary, recv_verified, send_indexed, Guest};
use common::{Baton, V4_ONLY};

const PEER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The source host's address: the connections' local address, moved to T late.
const MOVING: &str = "10.88.0.2";
/// The target host's own address.
const TARGET_OWN: &str = "10.88.0.3";
const SERVER_PORT: u16 = 5000;
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------
// Namespaces ("hosts") and the network between them
// ---------------------------------------------------------------------------------------

/// A network namespace, held open by a descriptor; commands run in it through
/// `nsenter --net=/proc/<pid>/fd/<fd>`.
struct Netns {
    handle: File,
}

impl Netns {
    /// The calling thread's namespace.
    fn current() -> Self {
        Netns {
            handle: File::open("/proc/thread-self/ns/net").expect("open own netns"),
        }
    }

    fn path(&self) -> String {
        format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.handle.as_raw_fd()
        )
    }

    /// Run `cmd` (a program and its arguments) in this namespace; panics on failure.
    fn run(&self, cmd: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .args(cmd)
            .output()
            .expect("run nsenter");
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ip(&self, args: &str) {
        let mut cmd = vec!["ip"];
        cmd.extend(args.split_whitespace());
        self.run(&cmd);
    }

    /// Reverse-path filtering off: the peer sees the moving address on either link.
    fn no_rp_filter(&self, devices: &[&str]) {
        let mut script = String::from(
            "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; \
             echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter;",
        );
        for dev in devices {
            script.push_str(&format!(
                " echo 0 > /proc/sys/net/ipv4/conf/{dev}/rp_filter;"
            ));
        }
        self.run(&["sh", "-c", &script]);
    }

    /// `Tcp: OutRsts` of this namespace.
    fn out_rsts(&self) -> u64 {
        let snmp = self.run(&["cat", "/proc/net/snmp"]);
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let names: Vec<&str> = tcp.next().expect("Tcp names").split_whitespace().collect();
        let values: Vec<&str> = tcp.next().expect("Tcp values").split_whitespace().collect();
        let at = names.iter().position(|n| *n == "OutRsts").expect("OutRsts");
        values[at].parse().expect("OutRsts value")
    }

    /// How often this namespace's TCP had to fall back on a timer to recover data
    /// nobody acknowledged: `(TcpExtTCPLossProbes, TcpExtTCPTimeouts)` — tail-loss probes
    /// and retransmission timeouts.
    fn timer_recoveries(&self) -> (u64, u64) {
        let out = self.run(&["nstat", "-asz", "TcpExtTCPLossProbes", "TcpExtTCPTimeouts"]);
        let counter = |name: &str| -> u64 {
            out.lines()
                .find_map(|line| {
                    let mut fields = line.split_whitespace();
                    (fields.next() == Some(name)).then(|| fields.next())?
                })
                .unwrap_or_else(|| panic!("{name} missing from nstat: {out}"))
                .parse()
                .expect("counter value")
        };
        (counter("TcpExtTCPLossProbes"), counter("TcpExtTCPTimeouts"))
    }
}

/// A fresh namespace with baton started in it (by a thread that entered it).
fn host_with_baton(name: &str, helper: bool) -> (Netns, Baton) {
    let name = name.to_string();
    std::thread::spawn(move || {
        baton_testkit::netns::enter_private_netns().expect("netns (run as root)");
        let ns = Netns::current();
        let helper_arg = helper_binary();
        let mut args: Vec<&str> = V4_ONLY.iter().copied().chain(["-d"]).collect();
        if helper {
            args.extend(["--helper", helper_arg.as_str()]);
        }
        let baton = Baton::spawn(&format!("hosts-{name}"), &args);
        (ns, baton)
    })
    .join()
    .expect("host thread")
}

/// Two hosts and the peer (the calling thread's new namespace), wired as in the module
/// comment.
struct Hosts {
    peer: Netns,
    source: Netns,
    target: Netns,
    a: Option<Baton>,
    b: Baton,
}

/// Where the target backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// In T, with a helper.
    OtherHost,
    /// In T, without a helper.
    OtherHostNoHelper,
    /// In S, next to the source, with a helper (a same-host migration).
    SameNamespace,
}

/// Start baton in `ns` (from a thread that joins it).
fn baton_in(ns: &Netns, name: &str) -> Baton {
    let handle = ns.handle.try_clone().expect("dup netns");
    let name = name.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let helper = helper_binary();
        let args: Vec<&str> = V4_ONLY
            .iter()
            .copied()
            .chain(["-d", "--helper", helper.as_str()])
            .collect();
        Baton::spawn(&format!("hosts-{name}"), &args)
    })
    .join()
    .expect("baton thread")
}

fn build_hosts(name: &str, target_kind: Target) -> Hosts {
    baton_testkit::netns::enter_private_netns().expect("peer netns (run as root)");
    let peer = Netns::current();
    let (source, a) = host_with_baton(&format!("{name}-a"), true);
    let (target, b) = host_with_baton(&format!("{name}-b"), target_kind == Target::OtherHost);
    let b = if target_kind == Target::SameNamespace {
        drop(b);
        baton_in(&source, &format!("{name}-b-same"))
    } else {
        b
    };
    peer.ip("link add pS type veth peer name vS");
    peer.ip(&format!("link set vS netns {}", source.path()));
    peer.ip("link add pT type veth peer name vT");
    peer.ip(&format!("link set vT netns {}", target.path()));
    peer.ip(&format!("addr add {PEER}/32 dev lo"));
    peer.ip("link set pS up");
    peer.ip("link set pT up");
    peer.ip(&format!("route add {MOVING}/32 dev pS"));
    peer.ip(&format!("route add {TARGET_OWN}/32 dev pT"));
    peer.no_rp_filter(&["pS", "pT", "lo"]);
    source.ip(&format!("addr add {MOVING}/32 dev vS"));
    source.ip("link set vS up");
    source.ip(&format!("route add {PEER}/32 dev vS"));
    source.no_rp_filter(&["vS"]);
    target.ip(&format!("addr add {TARGET_OWN}/32 dev vT"));
    target.ip("link set vT up");
    target.ip(&format!("route add {PEER}/32 dev vT"));
    target.no_rp_filter(&["vT"]);
    Hosts {
        peer,
        source,
        target,
        a: Some(a),
        b,
    }
}

impl Hosts {
    /// The address moves from S to T; the peer routes it to T from now on.
    fn move_address(&self) {
        self.source.ip(&format!("addr del {MOVING}/32 dev vS"));
        self.target.ip(&format!("addr add {MOVING}/32 dev vT"));
        self.peer.ip(&format!("route replace {MOVING}/32 dev pT"));
    }

    fn a(&self) -> &Baton {
        self.a.as_ref().expect("source baton")
    }
}

// ---------------------------------------------------------------------------------------
// The server at the peer
// ---------------------------------------------------------------------------------------

/// What each connection carries: the guest first sends its index (4 bytes), then
/// `up` pattern bytes; the peer sends `down` pattern bytes, then its FIN.
#[derive(Debug, Clone, Copy)]
struct Plan {
    up: u64,
    down: u64,
    /// How far the guest sends beyond what the peer reads before the migration (the
    /// peer stops at 40 %): data in flight at SAVE. Up to 32 KiB it fits the peer's
    /// advertised window; far more closes the window
    /// (`a_connection_with_the_peers_window_closed_moves_to_another_host`).
    beyond_hold: u64,
}

/// Data in flight towards the peer at SAVE that fits its receive window.
const IN_FLIGHT: u64 = 32 << 10;

fn up_pattern(index: u32) -> Pattern {
    Pattern::new(0x1000 + u64::from(index))
}

fn down_pattern(index: u32) -> Pattern {
    Pattern::new(0x2000 + u64::from(index))
}

/// Accept `plans.len()` connections and serve them all from one thread (`hostflows`):
/// every failure (RST, wrong byte, short stream) is in the report it returns, with the
/// longest time between two successive reads of each connection (the peer-visible
/// gap), the time the peer held its reads excepted, and the same counted only from
/// when the peer stopped holding (in a migration: after the address moved) — the part
/// a restore can lengthen. While the receive hold is on (it starts on;
/// [`Running::set_recv_held`]), the peer stops reading after 40 % of a long stream, so
/// that the guest's later bytes pile up in the host sockets' send queues (data in
/// flight at SAVE). `progress().bytes_received` counts the guest's bytes the peer
/// read, over all connections.
fn serve(plans: Vec<Plan>) -> Running {
    let listener = hostflows::listen(SocketAddr::from((PEER, SERVER_PORT))).expect("server bind");
    let count = plans.len();
    let holds: Vec<Option<u64>> = plans
        .iter()
        .map(|p| (p.up > 1000).then_some(p.up * 4 / 10))
        .collect();
    HostFlows::new(move |index| {
        // An index without a plan expects nothing: the guest's data fails it.
        let plan = plans.get(index as usize).copied().unwrap_or(Plan {
            up: 0,
            down: 0,
            beyond_hold: 0,
        });
        FlowPlan {
            send: down_pattern(index),
            send_len: plan.down,
            recv: up_pattern(index),
            recv_len: plan.up,
        }
    })
    .accept(listener, count)
    .recv_hold(true, move |index| {
        holds.get(index as usize).copied().flatten()
    })
    .stall_timeout(TEST_TIMEOUT)
    .spawn()
    .expect("server thread")
}

// ---------------------------------------------------------------------------------------
// The guest (smoltcp)
// ---------------------------------------------------------------------------------------

/// The guest's end of one connection.
struct GuestConn {
    index: u32,
    handle: SocketHandle,
    plan: Plan,
    /// Index header and pattern bytes sent so far (header included).
    sent: u64,
    received: u64,
    closed: bool,
    /// Before the migration the guest application stops at a gate in each long
    /// direction, so that no connection finishes before SAVE and data waits in the
    /// queues; after it, everything runs to the end.
    gated: bool,
}

impl GuestConn {
    fn open(guest: &mut Guest, index: u32, plan: Plan) -> Self {
        let handle = guest.open_stream((PEER, SERVER_PORT), 40000 + index as u16);
        GuestConn {
            index,
            handle,
            plan,
            sent: 0,
            received: 0,
            closed: false,
            gated: true,
        }
    }

    /// How far the guest sends before the migration (header included).
    fn up_gate(&self) -> u64 {
        if self.gated && self.plan.up > 1000 {
            4 + (self.plan.up * 6 / 10).min(self.plan.up * 4 / 10 + self.plan.beyond_hold)
        } else {
            4 + self.plan.up
        }
    }

    /// How far the guest reads before the migration.
    fn down_gate(&self) -> u64 {
        if self.gated && self.plan.down > 1000 {
            (self.plan.down / 2).min(1 << 20)
        } else {
            self.plan.down
        }
    }

    fn up_done(&self) -> u64 {
        self.sent.saturating_sub(4)
    }

    /// Move data both ways; panics on a wrong byte or a reset.
    fn step(&mut self, guest: &mut Guest) {
        let socket = guest.sockets.get_mut::<tcp::Socket>(self.handle);
        assert!(
            socket.state() != tcp::State::Closed || self.done_with(socket),
            "connection {}: reset or closed early (sent {}, received {})",
            self.index,
            self.sent,
            self.received
        );
        let total = self.plan.up + 4;
        let gate = self.up_gate();
        let down_gate = self.down_gate();
        send_indexed(
            socket,
            self.index,
            &up_pattern(self.index),
            &mut self.sent,
            gate,
        );
        if self.sent == total && !self.closed {
            socket.close();
            self.closed = true;
        }
        recv_verified(
            socket,
            self.index,
            &down_pattern(self.index),
            &mut self.received,
            down_gate,
        );
        assert!(self.received <= self.plan.down, "guest received too much");
    }

    fn done_with(&self, socket: &tcp::Socket<'_>) -> bool {
        self.closed && self.received == self.plan.down && !socket.may_recv()
    }

    fn done(&self, guest: &mut Guest) -> bool {
        let socket = guest.sockets.get_mut::<tcp::Socket>(self.handle);
        self.done_with(socket)
    }
}

/// Run the guest until `until` says stop (or the deadline passes: panic).
fn run_guest(
    guest: &mut Guest,
    conns: &mut [GuestConn],
    what: &str,
    mut until: impl FnMut(&mut Guest, &[GuestConn]) -> bool,
    log: &dyn Fn() -> String,
) {
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        guest.poll();
        for conn in conns.iter_mut() {
            conn.step(guest);
        }
        guest.poll();
        if until(guest, conns) {
            return;
        }
        if Instant::now() > deadline {
            let progress: Vec<(u32, u64, u64)> = conns
                .iter()
                .map(|c| (c.index, c.up_done(), c.received))
                .collect();
            panic!("{what}: timed out; progress {progress:?}; log:\n{}", log());
        }
        guest.wait();
    }
}

fn all_done(guest: &mut Guest, conns: &[GuestConn]) -> bool {
    conns.iter().all(|c| c.done(guest))
}

/// Connection plans: `n` streams of `len` bytes each way, of which (when there are at
/// least three) one has the guest's side finished early and one the peer's side, so
/// that both kinds of half-closed connection are migrated. The first one's other
/// direction is long (32 MiB, far more than the socket buffers hold beyond the gate) so that the peer's FIN
/// cannot have arrived at SAVE: with both FINs through, the host connection is over
/// (TIME_WAIT, the socket reads CLOSE) and cannot be dumped — see the report.
fn plans(n: usize, len: u64) -> Vec<Plan> {
    (0..n)
        .map(|i| match i {
            0 if n >= 3 => Plan {
                up: 1000,
                down: 32 << 20,
                beyond_hold: IN_FLIGHT,
            },
            1 if n >= 3 => Plan {
                up: len,
                down: 1000,
                beyond_hold: IN_FLIGHT,
            },
            _ => Plan {
                up: len,
                down: len,
                beyond_hold: IN_FLIGHT,
            },
        })
        .collect()
}

/// Every connection is at its gates, and the short directions are closed (FIN sent and
/// acknowledged, FIN received).
fn at_gates(guest: &mut Guest, conns: &[GuestConn]) -> bool {
    conns.iter().all(|c| {
        let socket = guest.sockets.get_mut::<tcp::Socket>(c.handle);
        let up = if c.plan.up > 1000 {
            c.sent >= c.up_gate()
        } else {
            socket.state() == tcp::State::FinWait2
        };
        let down = if c.plan.down > 1000 {
            c.received >= c.down_gate()
        } else {
            c.received == c.plan.down && !socket.may_recv()
        };
        up && down
    })
}

fn lift_gates(conns: &mut [GuestConn]) {
    for conn in conns {
        conn.gated = false;
    }
}

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

fn migrate_to_another_host(name: &str, n: usize, len: u64) {
    migrate(name, plans(n, len), Target::OtherHost);
}

/// What [`migrate_checking`] checks besides every byte at both ends and the source's
/// silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Bytes,
    /// Once the address moved, the guest's stream goes on without the target's TCP
    /// falling back on a timer (tail-loss probe or retransmission timeout) for the
    /// data it sent while the peer's ACKs still went to the source.
    NoTimerRecovery,
}

fn migrate(name: &str, plans: Vec<Plan>, target_kind: Target) {
    migrate_checking(name, plans, target_kind, Check::Bytes);
}

fn migrate_checking(name: &str, plans: Vec<Plan>, target_kind: Target, check: Check) {
    let n = plans.len();
    let len = plans.iter().map(|p| p.up.max(p.down)).max().unwrap_or(0);
    let mut hosts = build_hosts(name, target_kind);
    let server = serve(plans.clone());

    let mut dev = hosts.a().connect();
    dev.start_dirty_log().expect("LOG_ALL");
    let mut guest = Guest::new(dev);
    let mut conns: Vec<GuestConn> = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| GuestConn::open(&mut guest, i as u32, *plan))
        .collect();
    let a_log = || hosts.a().log();
    run_guest(
        &mut guest,
        &mut conns,
        "before the migration",
        at_gates,
        &a_log,
    );

    // The VM stops mid-stream: SAVE on A.
    let dev = guest.dev();
    dev.stop_rings().expect("GET_VRING_BASE");
    let saved_at = Instant::now();
    let stream = dev
        .save_state()
        .unwrap_or_else(|e| panic!("SAVE: {e}; log:\n{}", hosts.a().log()));
    let save_time = saved_at.elapsed();
    let rsts_before = hosts.source.out_rsts();
    let state = decode_stream(&stream).expect("valid stream");
    assert_eq!(state.tcp_flows.len(), n, "log:\n{}", hosts.a().log());
    assert!(
        state.tcp_flows.iter().all(|f| f.kernel.is_some()),
        "every connection carries its dumped kernel state"
    );
    assert!(
        state.source.handover.is_some(),
        "the handover is still offered"
    );

    // LOAD on B, B's rings start, the guest runs there.
    let loaded_at = Instant::now();
    let (dev_b, loaded) = connect_loading(&hosts.b, &stream);
    let load_time = loaded_at.elapsed();
    loaded.unwrap_or_else(|e| panic!("LOAD: {e}; log:\n{}", hosts.b.log()));
    let expected = if target_kind == Target::SameNamespace {
        format!("{n} TCP connection(s) taken over from the source")
    } else {
        format!("{n} TCP connection(s) restored through baton-repair")
    };
    assert!(hosts.b.log().contains(&expected), "{}", hosts.b.log());
    // QEMU on the source goes away; the VM runs on B.
    drop(guest.stop());
    guest.start(dev_b);
    lift_gates(&mut conns);
    // On a timeout: the target's log, and the kernel's view of the connections in the
    // target and at the peer.
    let b_log = || {
        format!(
            "{}\n--- ss in the target namespace:\n{}--- ss at the peer:\n{}--- counters at the peer:\n{}",
            hosts.b.log(),
            hosts.target.run(&["ss", "-tinoe"]),
            hosts.peer.run(&["ss", "-tinoe"]),
            hosts.peer.run(&["sh", "-c", "nstat -az | awk '$2 != 0'"])
        )
    };
    let ran_at = Instant::now();
    run_guest(
        &mut guest,
        &mut conns,
        "on the target, before the address moves",
        |_, _| ran_at.elapsed() > Duration::from_millis(300),
        &b_log,
    );

    // Only now does the address move. Until now the peer's segments reached S.
    if target_kind != Target::SameNamespace {
        hosts.move_address();
    }
    let moved_at = Instant::now();
    assert_eq!(
        hosts.source.out_rsts(),
        rsts_before,
        "the source answered the peer with RST while frozen"
    );
    // The source backend goes away before the streams end: its frozen sockets must
    // close without a sound (repair mode), or the peer would see a FIN or RST.
    drop(hosts.a.take());
    let timers_before = (check == Check::NoTimerRecovery).then(|| hosts.target.timer_recoveries());
    server.set_recv_held(false);
    if let Some(timers_before) = timers_before {
        // Everything the guest had written by now, and then some: more than the target
        // can have sent before an ACK reached it (one congestion window; a loss probe
        // adds one segment).
        let goal = conns.iter().map(GuestConn::up_done).sum::<u64>() + (256 << 10);
        run_guest(
            &mut guest,
            &mut conns,
            "after the address moved, until the stream goes on",
            |_, _| server.progress().bytes_received >= goal,
            &b_log,
        );
        println!(
            "{name}: 256 KiB beyond what the guest had written reached the peer {:.0} ms \
             after the address moved",
            moved_at.elapsed().as_secs_f64() * 1e3
        );
        let timers = hosts.target.timer_recoveries();
        assert_eq!(
            (timers.0 - timers_before.0, timers.1 - timers_before.1),
            (0, 0),
            "(loss probes, retransmission timeouts) in the target's namespace before the \
             stream went on; the target's sockets:\n{}",
            hosts.target.run(&["ss", "-tinoH"])
        );
    }

    run_guest(
        &mut guest,
        &mut conns,
        "after the migration",
        all_done,
        &b_log,
    );
    let report = server.join();
    assert!(
        report.is_ok() && report.flows.len() == n,
        "{report}; target log:\n{}",
        hosts.b.log()
    );
    let longest = report
        .flows
        .iter()
        .map(|f| f.longest_read_gap)
        .max()
        .unwrap_or_default();
    let longest_after_move = report
        .flows
        .iter()
        .map(|f| f.longest_read_gap_after_hold)
        .max()
        .unwrap_or_default();
    println!(
        "{name}: {n} connection(s), {len} bytes each way: SAVE {:.1} ms, LOAD {:.1} ms, \
         longest peer-visible gap {:.0} ms, after the address moved {:.0} ms",
        save_time.as_secs_f64() * 1e3,
        load_time.as_secs_f64() * 1e3,
        longest.as_secs_f64() * 1e3,
        longest_after_move.as_secs_f64() * 1e3
    );
    for line in hosts
        .b
        .log()
        .lines()
        .filter(|l| l.contains("baton-repair in") || l.contains("re-probing over"))
    {
        println!("target: {line}");
    }
}

#[test]
fn one_connection_moves_to_another_host() {
    migrate_to_another_host("one", 1, 4 << 20);
}

#[test]
fn a_hundred_connections_move_to_another_host() {
    migrate_to_another_host("hundred", 100, 256 << 10);
}

#[test]
fn a_target_without_helper_fails_load_and_the_source_carries_on() {
    let hosts = build_hosts("nohelper", Target::OtherHostNoHelper);
    let plans = plans(4, 1 << 20);
    let server = serve(plans.clone());
    let mut dev = hosts.a().connect();
    dev.start_dirty_log().expect("LOG_ALL");
    let mut guest = Guest::new(dev);
    let mut conns: Vec<GuestConn> = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| GuestConn::open(&mut guest, i as u32, *plan))
        .collect();
    let a_log = || hosts.a().log();
    run_guest(
        &mut guest,
        &mut conns,
        "before the migration",
        at_gates,
        &a_log,
    );

    let dev = guest.dev();
    dev.stop_rings().expect("GET_VRING_BASE");
    let stream = dev
        .save_state()
        .unwrap_or_else(|e| panic!("SAVE: {e}; log:\n{}", hosts.a().log()));
    let rsts_before = hosts.source.out_rsts();
    let (dev_b, loaded) = connect_loading(&hosts.b, &stream);
    assert!(loaded.is_err(), "B has no helper: LOAD must fail");
    assert!(
        hosts
            .b
            .log()
            .contains("no baton-repair helper is connected here"),
        "{}",
        hosts.b.log()
    );
    drop(dev_b);

    // The migration failed: the source VM resumes (here: the frontend reconnects, the
    // network engine and its frozen flows are still there).
    drop(guest.stop());
    guest.start(hosts.a().connect());
    lift_gates(&mut conns);
    server.set_recv_held(false);
    // The TCP table learns that the VM resumed from the guest's next TCP segment (there
    // is no "rings started" signal for the engine yet): a receive-only connection would
    // wait for it. A connection attempt to a closed port is such a segment (the peer
    // refuses it; nothing else changes).
    let mut probe = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 1024]),
        tcp::SocketBuffer::new(vec![0; 1024]),
    );
    probe
        .connect(
            guest.iface.context(),
            (IpAddress::Ipv4(PEER), SERVER_PORT + 1),
            39999,
        )
        .expect("probe connect");
    let probe = guest.sockets.add(probe);
    guest.poll();
    run_guest(
        &mut guest,
        &mut conns,
        "after the source resumed",
        all_done,
        &a_log,
    );
    let report = server.join();
    assert!(
        report.is_ok() && report.flows.len() == plans.len(),
        "{report}; source log:\n{}",
        hosts.a().log()
    );
    guest.sockets.remove(probe);
    assert_eq!(
        hosts.source.out_rsts(),
        rsts_before,
        "no RST from the source"
    );
    assert!(
        hosts
            .a()
            .log()
            .contains("dumped socket(s) thawed through baton-repair (0 failed)"),
        "{}",
        hosts.a().log()
    );
}

/// The same-host path with a helper: the source dumped its sockets (repair mode), the
/// target in the same namespace takes the live sockets without privilege — the source
/// ends repair mode through its helper right before handing them over.
#[test]
fn a_target_in_the_same_namespace_takes_the_dumped_sockets_live() {
    migrate("same", plans(8, 1 << 20), Target::SameNamespace);
}

/// Much data in flight towards the peer at SAVE (the peer stopped reading with 256 KiB
/// more on the way, so its window is closed). The peer received and acknowledged bytes
/// whose ACKs the frozen source never saw, so they are in the dumped send queue. This
/// used to stall (one run in two): the restore wrote that queue as fresh data after
/// repair off (reference E25), the target's SND.NXT started at SND.UNA, and Linux
/// discarded every answer of the peer as an ACK of unsent data. `baton-tcp-repair` now
/// restores the sent part as sent (kernel-facts suite `kernel_facts_inflight`), and the
/// source's frozen socket can no longer send new data on a loss probe.
/// 256 KiB beyond the hold: far more than one initial congestion window (the amount at
/// which the old restore stalled), and small enough to fit the buffers on the way
/// (512 KiB did not always, and the guest then never reached its gate).
#[test]
fn a_connection_with_the_peers_window_closed_moves_to_another_host() {
    migrate(
        "zerowin",
        vec![Plan {
            up: 4 << 20,
            down: 4 << 20,
            beyond_hold: 256 << 10,
        }],
        Target::OtherHost,
    );
}

/// The peer's ACKs for what the restored socket sends are lost at the switch-over: the
/// address moves only after the target VM runs, and until then they go to the frozen
/// source. The peer's own direction is finished before the migration, so nothing but
/// the target can get the stream going again. A restored socket has no RTT estimate:
/// left alone it waits for its tail-loss probe or retransmission timeout (about 1 s
/// after its last transmission) however early the address moved. Re-probed through the
/// helper (`restore::Reprobe`), the peer's answer acknowledges everything and the
/// stream goes on with no timer involved.
#[test]
fn in_flight_data_is_acknowledged_without_a_timer_once_the_address_moves() {
    migrate_checking(
        "reprobe",
        vec![Plan {
            up: 4 << 20,
            down: 1000,
            beyond_hold: IN_FLIGHT,
        }],
        Target::OtherHost,
        Check::NoTimerRecovery,
    );
}
