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

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_proto::migration::decode_stream;
use baton_testkit::hostflows::{self, FlowPlan, HostFlows, Running};
use baton_testkit::pattern::Pattern;
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;

mod common;
use common::guest::{
    connect_loading, run_guest, stop_and_save, Guest, GuestConnection, StreamPair,
};
use common::hosts::{Hosts, Target, PEER};
const SERVER_PORT: u16 = 5000;
const TEST_TIMEOUT: Duration = Duration::from_secs(180);

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
    io: StreamPair,
    plan: Plan,
    /// Before the migration the guest application stops at a gate in each long
    /// direction, so that no connection finishes before SAVE and data waits in the
    /// queues; after it, everything runs to the end.
    gated: bool,
}

impl GuestConn {
    fn open(guest: &mut Guest, index: u32, plan: Plan) -> Self {
        let handle = guest.open_stream((PEER, SERVER_PORT), 40000 + index as u16);
        GuestConn {
            io: StreamPair::new(index, handle),
            plan,
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
        self.io.up_done()
    }

    fn done(&self, guest: &mut Guest) -> bool {
        self.io.done_with(guest.tcp(self.io.handle), self.plan.down)
    }
}

impl GuestConnection for GuestConn {
    /// Move data both ways; panics on a wrong byte or a reset.
    fn step(&mut self, guest: &mut Guest) {
        let (up_gate, down_gate) = (self.up_gate(), self.down_gate());
        let plan = self.plan;
        let io = &mut self.io;
        let socket = guest.tcp(io.handle);
        io.assert_alive(socket, plan.down);
        let index = io.index;
        io.exchange(
            socket,
            (&up_pattern(index), up_gate),
            |io| io.sent == plan.up + 4,
            (&down_pattern(index), down_gate),
        );
        assert!(io.received <= plan.down, "guest received too much");
    }

    fn streams(&self) -> &StreamPair {
        &self.io
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
        let socket = guest.tcp(c.io.handle);
        let up = if c.plan.up > 1000 {
            c.io.sent >= c.up_gate()
        } else {
            socket.state() == tcp::State::FinWait2
        };
        let down = if c.plan.down > 1000 {
            c.io.received >= c.down_gate()
        } else {
            c.io.received == c.plan.down && !socket.may_recv()
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
    let mut hosts = Hosts::build(&format!("hosts-{name}"), target_kind);
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
        TEST_TIMEOUT,
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
        TEST_TIMEOUT,
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
            TEST_TIMEOUT,
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
        TEST_TIMEOUT,
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
    let hosts = Hosts::build("hosts-nohelper", Target::OtherHostNoHelper);
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
        TEST_TIMEOUT,
        at_gates,
        &a_log,
    );

    let stream = stop_and_save(guest.dev(), hosts.a());
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
        TEST_TIMEOUT,
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
