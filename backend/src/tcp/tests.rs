//! The table driven as the device drives it (epoll rounds, `after_events`), with real
//! loopback sockets as the host side and a counting sink as the guest: how often the
//! engine is woken, not how long it takes.

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollTimeout};

use super::conn::GuestSide;
use super::{Env, TcpFlows, ADOPT_QUIET, KIND_FLOW, KIND_SHIFT};
use crate::config::NetConfig;
use crate::net::testing::{config, established_guest_side};
use crate::net::FrameSink;

/// The guest: takes every frame and notes, per guest port, how far the data it got
/// reaches (a retransmission — after a retransmission timeout on a slow machine — adds
/// nothing).
#[derive(Default)]
struct Guest {
    received: HashMap<u16, usize>,
    /// Frames the receive queue still takes (`None`: any number).
    room: Option<usize>,
    /// Frames offered while the receive queue was full.
    refused: usize,
}

impl FrameSink for Guest {
    fn send_frame(&mut self, frame: &[u8]) -> bool {
        match &mut self.room {
            Some(0) => {
                self.refused += 1;
                return false;
            }
            Some(room) => *room -= 1,
            None => {}
        }
        let packet = etherparse::SlicedPacket::from_ethernet(frame).expect("a frame we built");
        if let Some(etherparse::TransportSlice::Tcp(tcp)) = packet.transport {
            if !tcp.payload().is_empty() {
                // Data starts at `seq_to_guest` of `established_guest_side`.
                let first = established_guest_side(0).seq_to_guest.0;
                let end = tcp.sequence_number().wrapping_sub(first) as usize + tcp.payload().len();
                let reached = self.received.entry(tcp.destination_port()).or_default();
                *reached = (*reached).max(end);
            }
        }
        true
    }
}

struct Table {
    config: NetConfig,
    epoll: Epoll,
    tcp: TcpFlows,
    /// Flow events handled so far.
    flow_events: usize,
}

impl Table {
    fn new() -> Self {
        let config = config();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
        let tcp = TcpFlows::new(&config, &epoll, 256, Instant::now()).expect("table");
        Table {
            config,
            epoll,
            tcp,
            flow_events: 0,
        }
    }

    fn parts(&mut self) -> (&mut TcpFlows, Env<'_>) {
        let env = Env {
            config: &self.config,
            epoll: &self.epoll,
            guest_mac: None,
        };
        (&mut self.tcp, env)
    }

    /// Established connections to local servers, guest ports `40000..40000 + n`, with
    /// `guest`'s windows; returns the servers. The hold after adopting is over.
    fn connections(&mut self, n: u16, guest: impl Fn(GuestSide) -> GuestSide) -> Vec<TcpStream> {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let mut servers = Vec::new();
        let mut flows = Vec::new();
        for i in 0..n {
            let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
            client.set_nonblocking(true).expect("nonblocking");
            // As baton's own sockets (and those a source hands over) have it.
            super::sock::enable_peek_offset(std::os::fd::AsFd::as_fd(&client))
                .expect("SO_PEEK_OFF");
            servers.push(listener.accept().expect("accept").0);
            flows.push((
                guest(established_guest_side(40000 + i)),
                OwnedFd::from(client),
            ));
        }
        let now = Instant::now();
        assert_eq!(self.tcp.adopt(flows, now), usize::from(n));
        // Adopted flows keep quiet until the guest speaks or ADOPT_QUIET has passed.
        let mut guest = Guest::default();
        let (tcp, env) = self.parts();
        tcp.after_events(&env, &mut guest, now);
        tcp.after_events(&env, &mut guest, now + ADOPT_QUIET);
        servers
    }

    /// One round as the device runs it: the ready events (waiting up to `timeout` for
    /// the first), then `after_events`. Returns how many flow events were ready.
    fn round(&mut self, guest: &mut Guest, timeout: Duration) -> usize {
        let mut events = [EpollEvent::empty(); 64];
        let timeout = EpollTimeout::try_from(timeout).expect("timeout");
        let ready = self.epoll.wait(&mut events, timeout).expect("epoll_wait");
        let env = Env {
            config: &self.config,
            epoll: &self.epoll,
            guest_mac: None,
        };
        let now = Instant::now();
        let mut flow_events = 0;
        for event in &events[..ready] {
            if (event.data() >> KIND_SHIFT) & 0xff == KIND_FLOW {
                flow_events += 1;
            }
            self.tcp
                .handle_event(&env, event.data(), event.events(), guest, now);
        }
        self.tcp.after_events(&env, guest, now);
        self.flow_events += flow_events;
        flow_events
    }

    /// Rounds until every guest port in `want` received its bytes.
    fn until_received(&mut self, guest: &mut Guest, want: &HashMap<u16, usize>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while want
            .iter()
            .any(|(port, len)| guest.received.get(port) < Some(len))
        {
            assert!(
                Instant::now() < deadline,
                "data missing after {} flow events: {:?}",
                self.flow_events,
                guest.received
            );
            self.round(guest, Duration::from_millis(100));
        }
    }

    /// Flow events ready now (handled like any others).
    fn ready_flow_events(&mut self, guest: &mut Guest) -> usize {
        self.round(guest, Duration::ZERO)
    }
}

/// Wait until the client end of `server` has all `len` bytes it sent in its receive
/// queue (its kernel acknowledged them).
fn delivered(server: &TcpStream, len: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = super::sock::tcp_info(std::os::fd::AsFd::as_fd(server)).expect("TCP_INFO");
        if info.tcpi_bytes_acked >= len as u64 {
            return;
        }
        assert!(Instant::now() < deadline, "{len} bytes not delivered");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Data sent to a guest that does not acknowledge it stays in the socket (peeked, not
/// read), so the socket stays readable. With room left in the guest's window the engine
/// must still go quiet once everything was sent: a level-triggered EPOLLIN reported
/// each of these sockets in every round with nothing to peek (a silent guest with
/// thousands of connections kept baton busy until the retransmission timeouts).
#[test]
fn sent_but_unacknowledged_data_does_not_wake_the_engine() {
    const FLOWS: u16 = 50;
    const DATA: usize = 4096;
    let mut table = Table::new();
    let mut servers = table.connections(FLOWS, |g| g);
    for server in &mut servers {
        server.write_all(&[0x5a; DATA]).expect("write");
    }
    let mut guest = Guest::default();
    let want: HashMap<u16, usize> = (0..FLOWS).map(|i| (40000 + i, DATA)).collect();
    table.until_received(&mut guest, &want);
    // The window (64 KiB) has room for more, but there is nothing new to peek.
    assert_eq!(table.ready_flow_events(&mut guest), 0);
    assert_eq!(table.ready_flow_events(&mut guest), 0);
    assert!(
        table.flow_events <= 2 * usize::from(FLOWS),
        "{} flow events for {FLOWS} flows",
        table.flow_events
    );
    assert_eq!(guest.received, want, "nothing beyond the data");

    // New data still gets through.
    servers[7].write_all(&[0x5a; 100]).expect("write");
    let mut more = want.clone();
    more.insert(40007, DATA + 100);
    table.until_received(&mut guest, &more);
    assert_eq!(guest.received, more);
}

/// A flow stops after `PUSH_ROUNDS` peeks per turn; with edge-triggered polling nothing
/// would report the rest of what the socket already holds, so the table gives the flow
/// more turns by itself.
#[test]
fn a_flow_at_its_round_limit_gets_another_turn() {
    // Fewer bytes than the socket holds, many peeks: a small peek buffer.
    const PEEK: usize = 1000;
    const DATA: usize = 3 * super::conn::PUSH_ROUNDS * PEEK + 500;
    let mut table = Table::new();
    table.tcp.peek_buf = vec![0; PEEK];
    let mut servers = table.connections(1, |g| GuestSide {
        guest_window: 1 << 20,
        guest_window_scale: 7,
        ..g
    });
    let mut guest = Guest::default();
    let want = HashMap::from([(40000, DATA)]);
    // All the data is in the socket before the flow hears of it: one edge.
    servers[0].write_all(&[0x5a; DATA]).expect("write");
    delivered(&servers[0], DATA);
    table.until_received(&mut guest, &want);
    assert_eq!(guest.received, want);
    assert_eq!(table.ready_flow_events(&mut guest), 0);
}

/// Established connections stay registered while frozen (one `epoll_ctl` per
/// connection less at SAVE): a frozen table must not be woken by its sockets, and a
/// thaw must find what arrived before the freeze but was never handled.
#[test]
fn a_frozen_table_stays_quiet_and_a_thaw_polls_afresh() {
    const FLOWS: u16 = 10;
    const DATA: usize = 2000;
    let mut table = Table::new();
    let mut servers = table.connections(FLOWS, |g| g);
    let mut guest = Guest::default();
    // Half the flows have data in flight (their sockets stay readable)...
    for server in &mut servers[..usize::from(FLOWS / 2)] {
        server.write_all(&[0x5a; DATA]).expect("write");
    }
    let sent: HashMap<u16, usize> = (0..FLOWS / 2).map(|i| (40000 + i, DATA)).collect();
    table.until_received(&mut guest, &sent);
    // ... and the other half data that arrives but is not handled before the freeze.
    for server in &mut servers[usize::from(FLOWS / 2)..] {
        server.write_all(&[0x5a; DATA]).expect("write");
        delivered(server, DATA);
    }
    let (tcp, env) = table.parts();
    let frozen = tcp.freeze_for_handover(&env, &HashMap::new(), true);
    assert_eq!(frozen.records.len(), usize::from(FLOWS));
    assert_eq!(frozen.left_behind, 0);
    // What the sockets report while frozen changes nothing, and it is reported once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut reported = 0;
    while reported < usize::from(FLOWS / 2) && Instant::now() < deadline {
        reported += table.round(&mut guest, Duration::from_millis(100));
    }
    assert_eq!(reported, usize::from(FLOWS / 2), "the unhandled arrivals");
    assert_eq!(table.ready_flow_events(&mut guest), 0);
    assert_eq!(table.ready_flow_events(&mut guest), 0);
    assert_eq!(guest.received, sent, "nothing sent while frozen");

    // The source resumes: the data that arrived before the freeze goes to the guest.
    let (tcp, env) = table.parts();
    assert!(tcp.source_resumed(&env));
    let all: HashMap<u16, usize> = (0..FLOWS).map(|i| (40000 + i, DATA)).collect();
    table.until_received(&mut guest, &all);
    assert_eq!(guest.received, all);
    assert_eq!(table.ready_flow_events(&mut guest), 0);
}

/// A guest whose receive queue is full: the first flow that finds it full waits for
/// buffers, and the flows whose data comes after queue behind it without peeking or
/// building frames (each retry is one attempt per round, not one per flow with data).
/// Once buffers come, the waiters get their data, oldest first.
#[test]
fn a_full_receive_queue_costs_one_attempt_per_round() {
    const FLOWS: u16 = 30;
    const ROOM: usize = 4;
    const DATA: usize = 1000;
    let mut table = Table::new();
    let mut servers = table.connections(FLOWS, |g| g);
    for server in &mut servers {
        server.write_all(&[0x5a; DATA]).expect("write");
        delivered(server, DATA);
    }
    let mut guest = Guest {
        room: Some(ROOM),
        ..Guest::default()
    };
    let mut rounds = 0;
    while table.tcp.rx_waiters.order.len() < usize::from(FLOWS) - ROOM {
        assert!(
            rounds < 100,
            "{} flows wait",
            table.tcp.rx_waiters.order.len()
        );
        table.round(&mut guest, Duration::from_millis(100));
        rounds += 1;
    }
    assert_eq!(table.ready_flow_events(&mut guest), 0);
    rounds += 1;
    assert_eq!(guest.received.len(), ROOM);
    // The flow that found the queue full, then the oldest waiter once per round.
    assert!(
        guest.refused <= 1 + rounds,
        "{} frames refused in {rounds} rounds",
        guest.refused
    );

    // Buffers come: everything goes, oldest waiter first.
    guest.room = None;
    let all: HashMap<u16, usize> = (0..FLOWS).map(|i| (40000 + i, DATA)).collect();
    table.until_received(&mut guest, &all);
    assert_eq!(guest.received, all);
    assert!(table.tcp.rx_waiters.order.is_empty());
}
