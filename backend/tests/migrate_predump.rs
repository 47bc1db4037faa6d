//! Pre-dump during pre-copy (`crate::predump`): `LOG_ALL` makes the source pre-dump
//! every TCP connection through `baton-repair` while the VM runs; SAVE then freezes
//! each one and uses the pre-dumped state only if the kernel's progress counters did
//! not move since (else it dumps it in full in the same request). Proven here end to
//! end through the *restore* path — the target in another network namespace restores
//! every connection from the stream's kernel states, so a stale pre-dump would lose or
//! corrupt bytes — and through the same-host handover.
//!
//! ```text
//!   source ns S            peer ns P                        target ns T
//!   10.88.0.2 (moves) vS ── pS   10.88.0.1 (lo), server   pT ── vT 10.88.0.3 (own)
//!   baton A + helper        route 10.88.0.2 → pS, later pT      baton B + helper
//! ```
//!
//! Connections 0–3 stay idle after the pre-dump (→ unchanged at SAVE; the peer's data
//! the guest has not read yet waits in their receive queues); 4 and 5 send more and 6
//! and 7 receive their first data (their peer was paused) after it (→ re-dumped, if
//! their pre-dump held); 8 is opened after the pre-dump (→ dumped in full). Then SAVE, LOAD, the address moves,
//! and every stream runs to its end with every byte checked at both ends. The hosts
//! (namespaces, veths, the moving address) are `common::hosts`, as in `migrate_hosts.rs`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_proto::migration::decode_stream;
use baton_testkit::hostflows::{self, FlowPlan, HostFlows, Running};
use baton_testkit::pattern::Pattern;

mod common;
use common::guest::{
    connect_loading, run_guest, stop_and_save, Guest, GuestConnection, StreamPair,
};
use common::hosts::{Hosts, Target, PEER};
/// The peer that sends at once, and the one that sends only after the pre-dump.
const SERVER_PORT: u16 = 5000;
const LATE_PORT: u16 = 5001;
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes each way per connection: small enough to sit in the socket buffers whole, so
/// that a connection at its gates is idle (nothing unacknowledged, no window probes).
const LEN: u64 = 64 << 10;
/// How far each direction goes before the pre-dump.
const FIRST_GATE: u64 = 16 << 10;
/// How far the connections that move go after the pre-dump.
const SECOND_GATE: u64 = 24 << 10;
/// The guest's receive buffer per connection.
const GUEST_RX: usize = 8 << 10;
/// Connections open before the pre-dump; one more comes after it.
const BEFORE: u32 = 8;

fn up_pattern(index: u32) -> Pattern {
    Pattern::new(0x7_1000 + u64::from(index))
}

fn down_pattern(index: u32) -> Pattern {
    Pattern::new(0x7_2000 + u64::from(index))
}

/// A peer on `port`: `count` connections, `LEN` bytes each way, every byte checked;
/// with `paused`, it sends nothing until told. Each side's FIN comes after the other's.
fn serve(port: u16, count: usize, paused: bool) -> Running {
    let listener = hostflows::listen(SocketAddr::from((PEER, port))).expect("server bind");
    HostFlows::new(|index| FlowPlan {
        send: down_pattern(index),
        send_len: LEN,
        recv: up_pattern(index),
        recv_len: LEN,
    })
    .accept(listener, count)
    .paused(paused)
    .close_after_peer(true)
    .stall_timeout(TEST_TIMEOUT)
    .spawn()
    .expect("server thread")
}

/// The guest's end of one connection, with a gate per direction.
struct GuestConn {
    io: StreamPair,
    /// How far the guest sends (header excluded) and reads for now.
    up_gate: u64,
    down_gate: u64,
}

impl GuestConn {
    fn open(guest: &mut Guest, index: u32, port: u16) -> Self {
        // A small receive buffer: what the guest has not read stays in the host
        // socket's receive queue, so reading more later moves the host socket.
        let handle = guest.socket(GUEST_RX, 65536);
        guest.tcp(handle).set_nagle_enabled(false);
        guest.connect(handle, (PEER, port), 41000 + index as u16);
        GuestConn {
            io: StreamPair::new(index, handle),
            up_gate: FIRST_GATE,
            down_gate: FIRST_GATE,
        }
    }

    fn done(&self, guest: &mut Guest) -> bool {
        self.io.done_with(guest.tcp(self.io.handle), LEN)
    }

    /// At both gates, with everything the guest queued acknowledged.
    fn at_gates(&self, guest: &mut Guest) -> bool {
        let socket = guest.tcp(self.io.handle);
        self.io.sent == 4 + self.up_gate
            && self.io.received == self.down_gate
            && socket.send_queue() == 0
    }
}

impl GuestConnection for GuestConn {
    fn step(&mut self, guest: &mut Guest) {
        let io = &mut self.io;
        let socket = guest.tcp(io.handle);
        io.assert_alive(socket, LEN);
        let index = io.index;
        io.exchange(
            socket,
            (&up_pattern(index), 4 + self.up_gate),
            |io| io.sent == 4 + LEN,
            (&down_pattern(index), self.down_gate),
        );
    }

    fn streams(&self) -> &StreamPair {
        &self.io
    }
}

/// The number right before `suffix` in `line`, e.g. 3 in `"3 re-dumped"`.
fn number_before(line: &str, suffix: &str) -> u64 {
    let at = line
        .find(suffix)
        .unwrap_or_else(|| panic!("{suffix:?} not in {line:?}"));
    let digits: String = line[..at]
        .trim_end()
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number before {suffix:?} in {line:?}"))
}

fn last_line_with(log: &str, needle: &str) -> Option<String> {
    log.lines()
        .rev()
        .find(|l| l.contains(needle))
        .map(str::to_owned)
}

fn migrate_with_pre_dump(name: &str, same_namespace: bool) {
    let target = if same_namespace {
        Target::SameNamespace
    } else {
        Target::OtherHost
    };
    let mut hosts = Hosts::build(&format!("predump-{name}"), target);
    let total = BEFORE as usize + 1;
    // 6 and 7 are served by the late peer, which sends only after the pre-dump.
    let late = |i: u32| (6..8).contains(&i);
    let server = serve(SERVER_PORT, total - 2, false);
    let late_server = serve(LATE_PORT, 2, true);
    let mut guest = Guest::new(hosts.a().connect());
    let mut conns: Vec<GuestConn> = (0..BEFORE)
        .map(|i| {
            let mut conn =
                GuestConn::open(&mut guest, i, if late(i) { LATE_PORT } else { SERVER_PORT });
            if late(i) {
                conn.down_gate = 0;
            }
            conn
        })
        .collect();
    let a_log = || hosts.a().log();
    run_guest(
        &mut guest,
        &mut conns,
        "before the pre-dump",
        TEST_TIMEOUT,
        |guest, conns| conns.iter().all(|c| c.at_gates(guest)),
        &a_log,
    );
    // Let the last ACKs settle (only decides how many pre-dumps hold, never the bytes).
    let settle = Instant::now();
    run_guest(
        &mut guest,
        &mut conns,
        "settling",
        TEST_TIMEOUT,
        |_, _| settle.elapsed() > Duration::from_millis(300),
        &a_log,
    );

    // The migration starts: LOG_ALL, and the source pre-dumps while the guest runs.
    guest.dev().start_dirty_log().expect("LOG_ALL");
    run_guest(
        &mut guest,
        &mut conns,
        "waiting for the pre-dump pass",
        TEST_TIMEOUT,
        |_, _| hosts.a().log().contains("pre-dump pass over"),
        &a_log,
    );
    let pass = last_line_with(&hosts.a().log(), "pre-dump pass over").expect("pass line");
    let pre_dumped = number_before(&pass, " of ");
    assert!(pre_dumped >= 1, "nothing pre-dumped: {pass}");

    // After the pre-dump: 4 and 5 send more, 6 and 7 receive (their peer starts
    // sending now), 8 is new.
    for conn in &mut conns[4..6] {
        conn.up_gate = SECOND_GATE;
    }
    late_server.set_paused(false);
    for conn in &mut conns[6..8] {
        conn.down_gate = SECOND_GATE;
    }
    conns.push(GuestConn::open(&mut guest, BEFORE, SERVER_PORT));
    run_guest(
        &mut guest,
        &mut conns,
        "after the pre-dump",
        TEST_TIMEOUT,
        |guest, conns| conns.iter().all(|c| c.at_gates(guest)),
        &a_log,
    );

    // SAVE on A.
    let stream = stop_and_save(guest.dev(), hosts.a());
    let state = decode_stream(&stream).expect("valid stream");
    assert_eq!(state.tcp_flows.len(), total, "log:\n{}", hosts.a().log());
    assert!(
        state.tcp_flows.iter().all(|f| f.kernel.is_some()),
        "every connection carries its kernel state"
    );
    let saved =
        last_line_with(&hosts.a().log(), "dumped through baton-repair in").expect("SAVE dump line");
    let unchanged = number_before(&saved, " unchanged since their pre-dump");
    let redumped = number_before(&saved, " re-dumped");
    let full = number_before(&saved, " without a pre-dump");
    println!("{name}: {pass}\n{name}: {saved}");
    assert_eq!(
        unchanged + redumped + full,
        total as u64,
        "every connection once: {saved}"
    );
    assert_eq!(
        unchanged + redumped,
        pre_dumped,
        "every pre-dump used, for its own socket: {pass} / {saved}"
    );
    assert!(
        unchanged >= 1,
        "idle connections use their pre-dump: {saved}"
    );
    assert!(
        full >= 1,
        "the connection opened after the pre-dump is dumped: {saved}"
    );
    // 4–7 moved after the pre-dump: each is re-dumped (or had no pre-dump).
    assert!(
        unchanged <= u64::from(BEFORE) - 4 && redumped + (u64::from(BEFORE) - pre_dumped) >= 4,
        "the connections that moved after their pre-dump are never 'unchanged': {saved}"
    );

    // LOAD on B; the VM runs there; the address moves; A goes away.
    let (dev_b, loaded) = connect_loading(&hosts.b, &stream);
    loaded.unwrap_or_else(|e| panic!("LOAD: {e}; log:\n{}", hosts.b.log()));
    let expected = if same_namespace {
        format!("{total} TCP connection(s) taken over from the source")
    } else {
        format!("{total} TCP connection(s) restored through baton-repair")
    };
    assert!(hosts.b.log().contains(&expected), "{}", hosts.b.log());
    drop(guest.stop());
    guest.start(dev_b);
    if !same_namespace {
        hosts.move_address();
    }
    drop(hosts.a.take());
    for conn in &mut conns {
        conn.up_gate = LEN;
        conn.down_gate = LEN;
    }
    let b_log = || hosts.b.log();
    run_guest(
        &mut guest,
        &mut conns,
        "after the migration",
        TEST_TIMEOUT,
        |guest, conns| conns.iter().all(|c| c.done(guest)),
        &b_log,
    );
    for (server, count) in [(server, total - 2), (late_server, 2)] {
        let report = server.join();
        assert!(
            report.is_ok() && report.flows.len() == count,
            "{report}; target log:\n{}",
            hosts.b.log()
        );
    }
}

#[test]
fn pre_dumped_connections_move_to_another_host() {
    migrate_with_pre_dump("hosts", false);
}

#[test]
fn pre_dumped_connections_move_within_the_host() {
    migrate_with_pre_dump("same", true);
}
