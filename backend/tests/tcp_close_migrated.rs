//! Orderly close of TCP connections that moved in a same-host live migration: two real
//! `baton` processes in one private network namespace, a smoltcp guest that keeps its
//! TCP state across the switch (as a migrated VM does), and a host peer. The guest's
//! connection streams a pattern both ways on the source, the source's rings stop and its
//! state is saved (the socket is frozen and offered), the target loads it (and takes
//! the live socket over), and the guest carries on against the target. Then both
//! directions close, guest first or host first, with or without data in flight at the
//! switch: every byte must arrive and both ends must see the end of the stream.
//!
//! The guest's NIC behaves like Linux's virtio-net driver: it looks at its receive
//! queue only when interrupted (EVENT_IDX re-armed as it consumes), and the target's
//! start emulates QEMU's, which discards interrupts raised while it starts the rings.
//! A backend that writes to the receive queue in that window leaves the guest deaf for
//! good — the close after a migration then hangs (the VM check saw it in half its runs).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_testkit::pattern::Pattern;
use baton_vu_harness::NetFrontend;

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;

mod common;
use common::guest::{connect_loading, helper_binary, interface, poll_delay, GUEST_MTU, GW_V4};
use common::{Baton, DUAL_STACK};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);
const GUEST_SEED: u64 = 7;
const HOST_SEED: u64 = 8;

/// Receive queue index.
const RX: usize = 0;

/// A guest NIC driven by interrupts, as Linux's virtio-net is: the receive queue is read
/// only after its interrupt (the call eventfd) fired, until it is empty; then the
/// driver waits for the next interrupt (the harness keeps EVENT_IDX's `used_event` at
/// the last entry consumed, so the backend interrupts for the next one).
struct IrqNic {
    dev: NetFrontend,
    /// Interrupted and not yet drained.
    polling: bool,
}

impl IrqNic {
    /// Consume a pending receive interrupt.
    fn take_interrupt(&self) -> bool {
        let mut value = [0u8; 8];
        nix::unistd::read(
            std::os::fd::AsRawFd::as_raw_fd(&self.dev.call_fd(RX)),
            &mut value,
        )
        .is_ok()
    }

    /// Block up to `timeout` for a receive interrupt.
    fn wait(&self, timeout: Duration) {
        let mut fds = [nix::poll::PollFd::new(
            self.dev.call_fd(RX),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
    }
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut NetFrontend);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.send_frame(&buf).expect("guest transmit");
        r
    }
}

impl Device for IrqNic {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        if !self.polling {
            self.polling = self.take_interrupt();
        }
        if !self.polling {
            return None;
        }
        match self.dev.try_recv_frame().expect("guest receive") {
            Some(frame) => Some((RxToken(frame), TxToken(&mut self.dev))),
            None => {
                self.polling = false;
                None
            }
        }
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.dev))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = GUEST_MTU;
        caps
    }
}

/// The smoltcp guest; its device is swapped at the migration, its TCP state kept.
struct Guest {
    nic: IrqNic,
    iface: Interface,
    sockets: SocketSet<'static>,
}

impl Guest {
    fn new(dev: NetFrontend) -> Self {
        let mut nic = IrqNic {
            dev,
            // The harness posted the buffers and kicked: look once.
            polling: true,
        };
        let iface = interface(&mut nic);
        Guest {
            nic,
            iface,
            sockets: SocketSet::new(vec![]),
        }
    }

    fn poll(&mut self) {
        self.iface.poll(
            smoltcp::time::Instant::now(),
            &mut self.nic,
            &mut self.sockets,
        );
    }

    fn wait(&mut self) {
        let delay = poll_delay(&mut self.iface, &self.sockets);
        self.nic.wait(delay);
    }

    fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }
}

/// Which end closes first after the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum First {
    Guest,
    Host,
}

/// One scenario: bytes each way before and after the switch, who closes first, and
/// whether the switch happens in the middle of both streams (data in flight) or with
/// everything acknowledged.
#[derive(Debug, Clone, Copy)]
struct Scenario {
    name: &'static str,
    guest_len: u64,
    host_len: u64,
    first: First,
    in_flight: bool,
}

/// The guest application: writes its pattern, checks the host's, and closes its
/// sending side when everything is written (guest first) or once the host's FIN came
/// (host first).
struct GuestApp {
    handle: SocketHandle,
    send: Pattern,
    recv: Pattern,
    sent: u64,
    received: u64,
    /// The handshake is done (before it, `may_recv` is false too).
    established: bool,
    closed: bool,
}

impl GuestApp {
    fn step(&mut self, guest: &mut Guest, s: &Scenario, send_limit: u64) {
        let socket = guest.tcp(self.handle);
        self.established |= socket.may_send();
        while socket.can_send() && self.sent < send_limit {
            let want = (send_limit - self.sent).min(16384) as usize;
            match socket.send_slice(&self.send.bytes(self.sent, want)) {
                Ok(0) | Err(_) => break,
                Ok(n) => self.sent += n as u64,
            }
        }
        let mut buf = [0u8; 16384];
        while socket.can_recv() {
            match socket.recv_slice(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Err(m) = self.recv.verify(self.received, &buf[..n]) {
                        panic!("guest received corrupt data: {m}");
                    }
                    self.received += n as u64;
                }
            }
        }
        assert!(self.received <= s.host_len, "guest received too much");
        let all_sent = self.sent == s.guest_len;
        let may_close = match s.first {
            First::Guest => all_sent,
            First::Host => all_sent && self.established && !socket.may_recv(),
        };
        if may_close && !self.closed {
            socket.close();
            self.closed = true;
        }
    }

    /// Both FINs exchanged and acknowledged (TIME-WAIT for the first closer, CLOSED
    /// for the last; smoltcp reports both only once its FIN is acknowledged).
    fn finished(&self, guest: &mut Guest) -> bool {
        matches!(
            guest.tcp(self.handle).state(),
            tcp::State::TimeWait | tcp::State::Closed
        )
    }
}

/// The host peer: writes `host_len` pattern bytes (only the first half before
/// `migrated` is signalled), checks the guest's, and shuts its sending side down once
/// everything is written (host first) or once the guest's FIN came (guest first).
fn host_peer(
    listener: TcpListener,
    s: Scenario,
    migrated: mpsc::Receiver<()>,
) -> JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(TEST_TIMEOUT))
            .expect("timeout");
        let mut reader = stream.try_clone().expect("clone");
        let (eof_tx, eof_rx) = mpsc::channel();
        let checker = std::thread::spawn(move || {
            let recv = Pattern::new(GUEST_SEED);
            let mut received = 0u64;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = reader.read(&mut buf).expect("host read");
                if n == 0 {
                    break;
                }
                recv.verify(received, &buf[..n])
                    .unwrap_or_else(|m| panic!("host received corrupt data: {m}"));
                received += n as u64;
            }
            let _ = eof_tx.send(());
            received
        });
        let send = Pattern::new(HOST_SEED);
        let half = s.host_len / 2;
        let mut sent = 0u64;
        let mut write_until = |stream: &mut TcpStream, end: u64| {
            while sent < end {
                let n = (end - sent).min(65536) as usize;
                stream.write_all(&send.bytes(sent, n)).expect("host write");
                sent += n as u64;
            }
        };
        write_until(&mut stream, half);
        migrated.recv().expect("migration signal");
        write_until(&mut stream, s.host_len);
        if s.first == First::Guest {
            eof_rx.recv().expect("the guest's FIN");
        }
        stream.shutdown(Shutdown::Write).expect("shutdown");
        let received = checker.join().expect("host checker");
        // Keep the socket until the guest acknowledged our FIN (the reader saw EOF
        // already; dropping now could only turn a late segment into a RST).
        (sent, received)
    })
}

/// How long after the target's rings start QEMU may still discard their interrupts
/// (emulated: in QEMU it is the time between SET_VRING_KICK and the end of the ring's
/// start, usually far shorter).
const RING_START_WINDOW: Duration = Duration::from_millis(50);

/// QEMU's order on both sides: the source's rings stop (dirty logging was on, so SAVE
/// is a migration), its device state is saved; the target loads it before its rings
/// exist. Then the target's rings start, and whatever interrupt the backend raised
/// while they started is discarded, as QEMU's `vhost_virtqueue_start` does. The guest
/// keeps its TCP state and now talks to the target.
fn migrate(guest: &mut Guest, source: &Baton, target: &Baton) {
    let dev = &mut guest.nic.dev;
    dev.stop_rings().expect("GET_VRING_BASE");
    let state = dev
        .save_state()
        .unwrap_or_else(|e| panic!("SAVE: {e}; source log:\n{}", source.log()));
    let (new, loaded) = connect_loading(target, &state);
    loaded.unwrap_or_else(|e| panic!("LOAD: {e}; target log:\n{}", target.log()));
    std::thread::sleep(RING_START_WINDOW);
    let discarded = IrqNic {
        dev: new,
        polling: false,
    };
    let _ = discarded.take_interrupt();
    let old = std::mem::replace(&mut guest.nic.dev, discarded.dev);
    guest.nic.polling = false;
    // The source QEMU goes away after a completed migration.
    drop(old);
}

fn run(s: Scenario) {
    // With a helper, as deployed: its dump freezes the sockets (repair mode too) and the
    // handover ends repair mode. (Without one baton freezes them itself: migrate_faults.)
    let helper = helper_binary();
    let source = Baton::start(&format!("{}-src", s.name), &["--helper", &helper]);
    let args: Vec<&str> = DUAL_STACK.iter().copied().chain(["-d"]).collect();
    let target = Baton::spawn(&format!("{}-dst", s.name), &args);

    let mut guest = Guest::new(source.connect());
    guest
        .nic
        .dev
        .start_dirty_log()
        .expect("LOG_ALL: a migration is coming");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let (migrated_tx, migrated_rx) = mpsc::channel();
    let host = host_peer(listener, s, migrated_rx);

    let handle = guest.sockets.add(tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 64 << 10]),
        tcp::SocketBuffer::new(vec![0; 64 << 10]),
    ));
    let cx = guest.iface.context();
    guest
        .sockets
        .get_mut::<tcp::Socket>(handle)
        .connect(cx, (smoltcp::wire::IpAddress::Ipv4(GW_V4), port), 40000)
        .expect("connect");
    let mut app = GuestApp {
        handle,
        send: Pattern::new(GUEST_SEED),
        recv: Pattern::new(HOST_SEED),
        sent: 0,
        received: 0,
        established: false,
        closed: false,
    };

    // On the source: half of each stream.
    let half = (s.guest_len / 2, s.host_len / 2);
    let deadline = Instant::now() + TEST_TIMEOUT;
    loop {
        guest.poll();
        app.step(&mut guest, &s, half.0);
        let socket = guest.tcp(handle);
        let ready = if s.in_flight {
            // Switch while both directions are busy: the guest has unacknowledged data
            // queued and the host's data is still coming.
            app.sent == half.0 && app.received >= half.1 / 2 && socket.send_queue() > 0
        } else {
            // Switch when everything so far is delivered and acknowledged.
            app.sent == half.0 && app.received == half.1 && socket.send_queue() == 0
        };
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "before the migration: sent {} received {}; source log:\n{}",
            app.sent,
            app.received,
            source.log()
        );
        guest.wait();
    }
    if !s.in_flight {
        // Let the last ACKs settle on both sides.
        for _ in 0..20 {
            guest.poll();
            guest.wait();
        }
    }

    migrate(&mut guest, &source, &target);
    migrated_tx.send(()).expect("signal the host");

    let deadline = Instant::now() + TEST_TIMEOUT;
    while !(app.finished(&mut guest) && host.is_finished()) {
        guest.poll();
        app.step(&mut guest, &s, s.guest_len);
        assert!(
            Instant::now() < deadline,
            "after the migration ({:?} closes first, in flight: {}): guest sent {} of {}, \
             received {} of {}, closed {}, state {}, host done {}; target log:\n{}",
            s.first,
            s.in_flight,
            app.sent,
            s.guest_len,
            app.received,
            s.host_len,
            app.closed,
            guest.tcp(handle).state(),
            host.is_finished(),
            target.log()
        );
        guest.wait();
    }
    let (host_sent, host_received) = host.join().expect("host peer");
    assert_eq!(host_sent, s.host_len);
    assert_eq!(
        host_received, s.guest_len,
        "the host got the guest's stream"
    );
    assert_eq!(app.received, s.host_len, "the guest got the host's stream");
    let log = target.log();
    assert!(log.contains("1 TCP connection(s) taken over"), "{log}");
}

#[test]
fn guest_closes_first_after_a_quiet_switch() {
    run(Scenario {
        name: "close-guest-quiet",
        guest_len: 200_000,
        host_len: 200_000,
        first: First::Guest,
        in_flight: false,
    });
}

#[test]
fn host_closes_first_after_a_quiet_switch() {
    run(Scenario {
        name: "close-host-quiet",
        guest_len: 200_000,
        host_len: 200_000,
        first: First::Host,
        in_flight: false,
    });
}

#[test]
fn guest_closes_first_with_data_in_flight() {
    run(Scenario {
        name: "close-guest-busy",
        guest_len: 4 << 20,
        host_len: 4 << 20,
        first: First::Guest,
        in_flight: true,
    });
}

#[test]
fn host_closes_first_with_data_in_flight() {
    run(Scenario {
        name: "close-host-busy",
        guest_len: 4 << 20,
        host_len: 4 << 20,
        first: First::Host,
        in_flight: true,
    });
}

/// The guest has nothing to say after the switch (it only receives): the target must
/// not wait for it forever.
#[test]
fn a_silent_guest_still_gets_the_rest() {
    run(Scenario {
        name: "close-silent-guest",
        guest_len: 0,
        host_len: 400_000,
        first: First::Host,
        in_flight: false,
    });
}

/// The VM check's workload: the guest only sends (little, in small writes), the host
/// only reads; the guest's FIN comes first and the host's answer must reach it.
#[test]
fn guest_only_sends_then_closes() {
    run(Scenario {
        name: "close-guest-only",
        guest_len: 20_000,
        host_len: 0,
        first: First::Guest,
        in_flight: false,
    });
}
