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
//! and every stream runs to its end with every byte checked at both ends. The
//! infrastructure (namespaces, veths) is a trimmed copy of `migrate_hosts.rs`'s.

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

mod common;
use common::guest::{connect_loading, helper_binary, recv_verified, send_indexed, Guest};
use common::{Baton, V4_ONLY};

const PEER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const MOVING: &str = "10.88.0.2";
const TARGET_OWN: &str = "10.88.0.3";
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

struct Netns {
    handle: File,
}

impl Netns {
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
}

fn baton_args() -> Vec<String> {
    V4_ONLY
        .iter()
        .map(|s| s.to_string())
        .chain(["-d".into(), "--helper".into(), helper_binary()])
        .collect()
}

/// A fresh namespace with baton (and `--helper`) started in it.
fn host_with_baton(name: &str) -> (Netns, Baton) {
    let name = name.to_string();
    std::thread::spawn(move || {
        baton_testkit::netns::enter_private_netns().expect("netns (run as root)");
        let ns = Netns::current();
        let args = baton_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (ns, Baton::spawn(&format!("predump-{name}"), &args))
    })
    .join()
    .expect("host thread")
}

/// Another baton in `ns`.
fn baton_in(ns: &Netns, name: &str) -> Baton {
    let handle = ns.handle.try_clone().expect("dup netns");
    let name = name.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let args = baton_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Baton::spawn(&format!("predump-{name}"), &args)
    })
    .join()
    .expect("baton thread")
}

struct Hosts {
    peer: Netns,
    source: Netns,
    target: Netns,
    a: Option<Baton>,
    b: Baton,
}

fn build_hosts(name: &str, same_namespace: bool) -> Hosts {
    baton_testkit::netns::enter_private_netns().expect("peer netns (run as root)");
    let peer = Netns::current();
    let (source, a) = host_with_baton(&format!("{name}-a"));
    let (target, b) = host_with_baton(&format!("{name}-b"));
    let b = if same_namespace {
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
    fn move_address(&self) {
        self.source.ip(&format!("addr del {MOVING}/32 dev vS"));
        self.target.ip(&format!("addr add {MOVING}/32 dev vT"));
        self.peer.ip(&format!("route replace {MOVING}/32 dev pT"));
    }

    fn a(&self) -> &Baton {
        self.a.as_ref().expect("source baton")
    }
}

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
    index: u32,
    handle: SocketHandle,
    /// Index header and pattern bytes queued so far (header included).
    sent: u64,
    received: u64,
    closed: bool,
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
            index,
            handle,
            sent: 0,
            received: 0,
            closed: false,
            up_gate: FIRST_GATE,
            down_gate: FIRST_GATE,
        }
    }

    fn step(&mut self, guest: &mut Guest) {
        let socket = guest.tcp(self.handle);
        assert!(
            socket.state() != tcp::State::Closed || self.done_with(socket),
            "connection {}: reset or closed early (sent {}, received {})",
            self.index,
            self.sent,
            self.received
        );
        send_indexed(
            socket,
            self.index,
            &up_pattern(self.index),
            &mut self.sent,
            4 + self.up_gate,
        );
        if self.sent == 4 + LEN && !self.closed {
            socket.close();
            self.closed = true;
        }
        recv_verified(
            socket,
            self.index,
            &down_pattern(self.index),
            &mut self.received,
            self.down_gate,
        );
    }

    fn done_with(&self, socket: &tcp::Socket<'_>) -> bool {
        self.closed && self.received == LEN && !socket.may_recv()
    }

    /// At both gates, with everything the guest queued acknowledged.
    fn at_gates(&self, guest: &mut Guest) -> bool {
        let socket = guest.tcp(self.handle);
        self.sent == 4 + self.up_gate && self.received == self.down_gate && socket.send_queue() == 0
    }
}

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
                .map(|c| (c.index, c.sent, c.received))
                .collect();
            panic!("{what}: timed out; progress {progress:?}; log:\n{}", log());
        }
        guest.wait();
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
    let mut hosts = build_hosts(name, same_namespace);
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
        |guest, conns| conns.iter().all(|c| c.at_gates(guest)),
        &a_log,
    );
    // Let the last ACKs settle (only decides how many pre-dumps hold, never the bytes).
    let settle = Instant::now();
    run_guest(
        &mut guest,
        &mut conns,
        "settling",
        |_, _| settle.elapsed() > Duration::from_millis(300),
        &a_log,
    );

    // The migration starts: LOG_ALL, and the source pre-dumps while the guest runs.
    guest.dev().start_dirty_log().expect("LOG_ALL");
    run_guest(
        &mut guest,
        &mut conns,
        "waiting for the pre-dump pass",
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
        |guest, conns| conns.iter().all(|c| c.at_gates(guest)),
        &a_log,
    );

    // SAVE on A.
    let dev = guest.dev();
    dev.stop_rings().expect("GET_VRING_BASE");
    let stream = dev
        .save_state()
        .unwrap_or_else(|e| panic!("SAVE: {e}; log:\n{}", hosts.a().log()));
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
        |guest, conns| {
            conns.iter().all(|c| {
                let socket = guest.tcp(c.handle);
                c.done_with(socket)
            })
        },
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
