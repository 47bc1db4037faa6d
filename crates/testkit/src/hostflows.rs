//! Many verified TCP streams on the host side of a test, all driven from one thread.
//!
//! Theory of operation. Tests with hundreds or thousands of connections must not spawn a
//! thread per connection: CI environments cap a process's tasks (systemd's TasksMax,
//! container pids limits), and a test that needed 4,000 threads failed there when a
//! spawn was refused. [`HostFlows`] instead keeps every socket nonblocking and runs one
//! poll(2) loop over all of them:
//!
//! * it accepts a given number of connections on each listener it was handed (make
//!   them with [`listen`], whose backlog is 4,096 rather than std's 128, so a burst of
//!   connections is not dropped at the accept queue), and/or opens nonblocking
//!   connections to a list of addresses, at most [`HostFlows::max_connecting`] of them in
//!   their handshake at a time;
//! * every connection starts with its index, 4 bytes big-endian, sent by the side that
//!   connected; the index names the connection's [`FlowPlan`] (two [`Pattern`]s and their
//!   lengths), so data that crosses between connections is caught as well as data that
//!   is lost;
//! * each flow then sends its pattern, shuts its write side down when all is sent, and
//!   reads and verifies the other direction to end of stream; a flow is complete when
//!   both are done, and its socket is closed at once;
//! * a flow that makes no progress for the stall timeout fails, as does one that sees
//!   corrupt, surplus or missing data, an error or a reset; the engine carries on with
//!   the others and reports every flow's fate in the [`Report`] that
//!   [`Running::join`] returns — nothing panics in the background thread.
//!
//! Sending can be paused ([`HostFlows::paused`], [`Running::set_paused`]): index
//! handshakes and receiving go on, pattern data waits, and no flow counts as stalled
//! while paused. Tests use it to have every connection established before data moves.
//! [`Running::progress`] gives live counters for tests that wait for a phase (all
//! accepted, all indexed, bytes moved). One loop round costs O(flows), which is fine for
//! tens of thousands of flows.
//!
//! Two behaviours for migration tests, both off by default:
//! * [`HostFlows::close_after_peer`]: a flow sends its FIN only once the peer's arrived
//!   (a host application that answers the other side's close), instead of as soon as
//!   all is sent;
//! * [`HostFlows::recv_hold`]: while the receive hold is on ([`Running::set_recv_held`]),
//!   a flow stops reading once it has received a given number of bytes, so that what
//!   the other side sends beyond that piles up in the queues (data in flight). No flow
//!   counts as stalled while the hold is on. The report gives each flow's longest gap
//!   between two reads, the time held excepted, and the same counted from its first
//!   hold only ([`FlowReport::longest_read_gap`]).

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage,
};

use crate::pattern::{Mismatch, Pattern};

/// How long one poll(2) waits at most, so that pause, resume and stop take effect soon.
const TICK: Duration = Duration::from_millis(20);
/// Bytes one flow may move per direction per loop round, so busy flows do not starve the
/// others.
const ROUND_BUDGET: usize = 256 << 10;
/// Scratch buffer for reads and writes, shared by all flows.
const CHUNK: usize = 64 << 10;
/// Default [`HostFlows::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(90);

/// A TCP listener on `addr` with an accept backlog of 4,096 (the kernel also caps it at
/// `net.core.somaxconn`), so thousands of connections arriving at once wait in the
/// queue instead of having their SYNs dropped.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| errno_context(e, &format!("socket for a listener on {addr}")))?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)
        .map_err(|e| errno_context(e, &format!("SO_REUSEADDR for {addr}")))?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .map_err(|e| errno_context(e, &format!("bind {addr}")))?;
    // libc's SOMAXCONN is 4,096 on Linux/glibc: the deepest queue Backlog admits.
    socket::listen(&fd, Backlog::MAXCONN)
        .map_err(|e| errno_context(e, &format!("listen on {addr}")))?;
    Ok(TcpListener::from(fd))
}

fn errno_context(e: Errno, what: &str) -> io::Error {
    let e = io::Error::from(e);
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// What one connection carries, as named by its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowPlan {
    /// What this side sends, and how many bytes of it.
    pub send: Pattern,
    pub send_len: u64,
    /// What this side expects to receive, and how many bytes of it.
    pub recv: Pattern,
    pub recv_len: u64,
}

/// How a flow came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Accepted on the listener bound to this address; the peer sends the index.
    Accepted { listener: SocketAddr },
    /// Opened by the engine to this address; the engine sends `index`.
    Connected { to: SocketAddr },
}

/// Why a flow failed.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("{op}: {err}")]
    Io { op: &'static str, err: io::Error },
    #[error("corrupt data received: {0}")]
    Corrupt(Mismatch),
    #[error("received more than the {expected} bytes expected")]
    TooLong { expected: u64 },
    #[error("end of stream after {received} of {expected} bytes")]
    Short { received: u64, expected: u64 },
    #[error("end of stream after {0} of the 4 index bytes")]
    ShortIndex(usize),
    #[error("connection hung up (POLLHUP) before this side shut down")]
    Hangup,
    #[error("no progress for {0:?}")]
    Stalled(Duration),
    #[error("stopped before it finished")]
    Stopped,
}

/// The fate of one flow.
#[derive(Debug)]
pub struct FlowReport {
    /// The connection's index, once the handshake got that far.
    pub index: Option<u32>,
    pub origin: Origin,
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// (send, receive) lengths from the plan, once the index was known.
    pub expected: Option<(u64, u64)>,
    /// Pattern bytes sent and verified-received (the index is not counted).
    pub sent: u64,
    pub received: u64,
    /// This side shut its write side down (everything sent).
    pub shut_write: bool,
    /// The peer's end of stream was seen.
    pub eof: bool,
    /// The peer reset the connection (ECONNRESET or EPIPE).
    pub reset: bool,
    /// `None` when the flow completed both ways.
    pub error: Option<FlowError>,
    /// Longest time between two successive reads (from the index on), the time the
    /// flow was held at its receive hold excepted.
    pub longest_read_gap: Duration,
    /// The same, counted only from when the flow was first held; zero for a flow that
    /// never was.
    pub longest_read_gap_after_hold: Duration,
}

impl fmt::Display for FlowReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "flow {i}")?,
            None => write!(f, "flow (index unknown)")?,
        }
        match self.origin {
            Origin::Accepted { listener } => write!(f, " accepted on {listener}")?,
            Origin::Connected { to } => write!(f, " connected to {to}")?,
        }
        if let (Some(l), Some(p)) = (self.local, self.peer) {
            write!(f, " ({l} <-> {p})")?;
        }
        let (want_out, want_in) = match self.expected {
            Some((s, r)) => (s.to_string(), r.to_string()),
            None => ("?".into(), "?".into()),
        };
        write!(
            f,
            ": sent {}/{want_out} B, received {}/{want_in} B, shut_write {}, eof {}, reset {}",
            self.sent, self.received, self.shut_write, self.eof, self.reset
        )?;
        match &self.error {
            Some(e) => write!(f, ": FAILED: {e}"),
            None => write!(f, ": ok"),
        }
    }
}

/// What became of one listener's expected connections.
#[derive(Debug)]
pub struct ListenerReport {
    pub addr: Option<SocketAddr>,
    pub expected: usize,
    pub accepted: usize,
    /// Why it stopped accepting short of `expected`.
    pub error: Option<FlowError>,
}

/// Everything a run did. [`Report::is_ok`] when every flow completed and every listener
/// accepted its count; its `Display` lists what failed.
#[derive(Debug)]
pub struct Report {
    pub flows: Vec<FlowReport>,
    pub listeners: Vec<ListenerReport>,
    pub elapsed: Duration,
}

/// How many failed flows `Display` lists one by one.
const LISTED_FAILURES: usize = 40;

impl Report {
    pub fn is_ok(&self) -> bool {
        self.failures().next().is_none() && self.listeners.iter().all(|l| l.error.is_none())
    }

    pub fn failures(&self) -> impl Iterator<Item = &FlowReport> {
        self.flows.iter().filter(|f| f.error.is_some())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let failed = self.failures().count();
        let resets = self.flows.iter().filter(|f| f.reset).count();
        writeln!(
            f,
            "host flows: {} of {} complete, {failed} failed ({resets} saw a reset), {:.1} s",
            self.flows.len() - failed,
            self.flows.len(),
            self.elapsed.as_secs_f64()
        )?;
        for l in &self.listeners {
            if let Some(e) = &l.error {
                let addr = l.addr.map_or("?".into(), |a| a.to_string());
                writeln!(
                    f,
                    "listener {addr}: accepted {} of {}: {e}",
                    l.accepted, l.expected
                )?;
            }
        }
        for flow in self.failures().take(LISTED_FAILURES) {
            writeln!(f, "{flow}")?;
        }
        if failed > LISTED_FAILURES {
            writeln!(f, "... and {} more failed flows", failed - LISTED_FAILURES)?;
        }
        Ok(())
    }
}

/// Live counters of a run (each only grows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub accepted: u64,
    /// Connections the engine opened that completed their handshake.
    pub connected: u64,
    /// Flows whose index is known (sent or received).
    pub indexed: u64,
    pub completed: u64,
    pub failed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Default)]
struct Control {
    paused: AtomicBool,
    recv_held: AtomicBool,
    stop: AtomicBool,
    accepted: AtomicU64,
    connected: AtomicU64,
    indexed: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

impl Control {
    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }
}

type PlanFn = Box<dyn Fn(u32) -> FlowPlan + Send>;
type HoldFn = Box<dyn Fn(u32) -> Option<u64> + Send>;

/// A set of host-side flows to run; see the module documentation.
pub struct HostFlows {
    plan: PlanFn,
    listeners: Vec<(TcpListener, usize)>,
    connects: VecDeque<(SocketAddr, u32)>,
    stall: Duration,
    max_connecting: usize,
    close_after_peer: bool,
    hold: Option<HoldFn>,
    control: Arc<Control>,
}

impl HostFlows {
    /// Flows whose index `i` carries `plan(i)`, seen from the host side.
    pub fn new(plan: impl Fn(u32) -> FlowPlan + Send + 'static) -> Self {
        HostFlows {
            plan: Box::new(plan),
            listeners: Vec::new(),
            connects: VecDeque::new(),
            stall: DEFAULT_STALL_TIMEOUT,
            max_connecting: usize::MAX,
            close_after_peer: false,
            hold: None,
            control: Arc::new(Control::default()),
        }
    }

    /// Accept `count` connections on `listener` (see [`listen`]).
    pub fn accept(mut self, listener: TcpListener, count: usize) -> Self {
        self.listeners.push((listener, count));
        self
    }

    /// Open a connection to `to` and send it `index`.
    pub fn connect(mut self, to: SocketAddr, index: u32) -> Self {
        self.connects.push_back((to, index));
        self
    }

    /// A flow (or a listener short of its count) fails after this long without progress.
    pub fn stall_timeout(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }

    /// Keep at most `n` outgoing connections in their handshake at a time.
    pub fn max_connecting(mut self, n: usize) -> Self {
        self.max_connecting = n.max(1);
        self
    }

    /// Start with pattern sending paused (handshakes and receiving still run).
    pub fn paused(self, paused: bool) -> Self {
        self.control.paused.store(paused, Ordering::Relaxed);
        self
    }

    /// Send each flow's FIN only after the peer's FIN arrived (and all is sent), not as
    /// soon as all is sent.
    pub fn close_after_peer(mut self, after: bool) -> Self {
        self.close_after_peer = after;
        self
    }

    /// While the receive hold is on, flow `i` reads nothing more once it has received
    /// `hold_at(i)` bytes or more (`None`: it is never held); a read may go up to one
    /// buffer (64 KiB) beyond that. `held` is the hold's initial state
    /// ([`Running::set_recv_held`] changes it).
    pub fn recv_hold(
        mut self,
        held: bool,
        hold_at: impl Fn(u32) -> Option<u64> + Send + 'static,
    ) -> Self {
        self.hold = Some(Box::new(hold_at));
        self.control.recv_held.store(held, Ordering::Relaxed);
        self
    }

    /// Run on a thread of its own.
    pub fn spawn(self) -> io::Result<Running> {
        let control = self.control.clone();
        let thread = std::thread::Builder::new()
            .name("hostflows".into())
            .spawn(move || self.run())
            .map_err(|e| io::Error::new(e.kind(), format!("spawn the hostflows thread: {e}")))?;
        Ok(Running {
            control,
            thread: Some(thread),
        })
    }

    /// Run on the calling thread until every flow completed or failed.
    pub fn run(self) -> Report {
        Engine::new(self).run()
    }
}

/// A [`HostFlows`] running on its own thread. Dropping it stops the run.
pub struct Running {
    control: Arc<Control>,
    thread: Option<JoinHandle<Report>>,
}

impl Running {
    pub fn progress(&self) -> Progress {
        let c = &self.control;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Progress {
            accepted: get(&c.accepted),
            connected: get(&c.connected),
            indexed: get(&c.indexed),
            completed: get(&c.completed),
            failed: get(&c.failed),
            bytes_sent: get(&c.bytes_sent),
            bytes_received: get(&c.bytes_received),
        }
    }

    /// Pause or resume sending pattern data.
    pub fn set_paused(&self, paused: bool) {
        self.control.paused.store(paused, Ordering::Relaxed);
    }

    /// Turn the receive hold ([`HostFlows::recv_hold`]) on or off.
    pub fn set_recv_held(&self, held: bool) {
        self.control.recv_held.store(held, Ordering::Relaxed);
    }

    /// True once the run has ended (join will not block).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Wait for the run to end on its own.
    pub fn join(mut self) -> Report {
        self.wait()
    }

    /// End the run now; unfinished flows are reported as [`FlowError::Stopped`] with
    /// how far they got.
    pub fn stop(mut self) -> Report {
        self.control.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    fn wait(&mut self) -> Report {
        let thread = self.thread.take();
        match thread.map(|t| t.join()) {
            Some(Ok(report)) => report,
            Some(Err(panic)) => {
                // The engine has no panicking paths of its own; a panic would come from
                // the caller's plan function, and belongs to the test.
                std::panic::resume_unwind(panic)
            }
            None => Report {
                flows: Vec::new(),
                listeners: Vec::new(),
                elapsed: Duration::ZERO,
            },
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.control.stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nonblocking connect in progress.
    Connecting,
    /// Index handshake, then data.
    Open,
    Done,
}

struct Flow {
    stream: TcpStream,
    origin: Origin,
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    phase: Phase,
    index: Option<u32>,
    /// The index's bytes: to send (connected) or as received (accepted).
    index_bytes: [u8; 4],
    index_moved: usize,
    plan: Option<FlowPlan>,
    sent: u64,
    received: u64,
    shut_write: bool,
    eof: bool,
    reset: bool,
    error: Option<FlowError>,
    last_progress: Instant,
    /// Where the receive hold stops this flow's reading (from its index).
    hold_at: Option<u64>,
    /// The last read (or the index, or a round spent held), for the read gaps.
    last_read: Option<Instant>,
    was_held: bool,
    longest_read_gap: Duration,
    longest_read_gap_after_hold: Duration,
}

impl Flow {
    fn new(stream: TcpStream, origin: Origin, phase: Phase, index: Option<u32>) -> Self {
        Flow {
            stream,
            origin,
            local: None,
            peer: None,
            phase,
            index,
            index_bytes: index.unwrap_or(0).to_be_bytes(),
            index_moved: 0,
            plan: None,
            sent: 0,
            received: 0,
            shut_write: false,
            eof: false,
            reset: false,
            error: None,
            last_progress: Instant::now(),
            hold_at: None,
            last_read: None,
            was_held: false,
            longest_read_gap: Duration::ZERO,
            longest_read_gap_after_hold: Duration::ZERO,
        }
    }

    /// Reading stops here while the receive hold is on.
    fn at_hold(&self, recv_held: bool) -> bool {
        recv_held && self.hold_at.is_some_and(|at| self.received >= at)
    }

    /// A read returned (data or end of stream): note the gap since the last.
    fn note_read(&mut self, now: Instant) {
        if let Some(last) = self.last_read {
            let gap = now.duration_since(last);
            self.longest_read_gap = self.longest_read_gap.max(gap);
            if self.was_held {
                self.longest_read_gap_after_hold = self.longest_read_gap_after_hold.max(gap);
            }
        }
        self.last_read = Some(now);
    }

    fn finished(&self) -> bool {
        self.phase == Phase::Done || self.error.is_some()
    }

    fn fail(&mut self, error: FlowError) {
        if self.error.is_none() {
            self.error = Some(error);
        }
    }

    fn io_fail(&mut self, op: &'static str, mut err: io::Error) {
        // A call like shutdown() on a connection the peer reset says only ENOTCONN; the
        // socket's pending error says what happened.
        if let Ok(pending @ 1..) = socket::getsockopt(&self.stream, sockopt::SocketError) {
            let pending = io::Error::from_raw_os_error(pending);
            err = io::Error::new(
                pending.kind(),
                format!("{err}; pending socket error: {pending}"),
            );
        }
        if matches!(
            err.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        ) {
            self.reset = true;
        }
        self.fail(FlowError::Io { op, err });
    }

    /// The poll events this flow waits for now.
    fn interest(&self, paused: bool, recv_held: bool, close_after_peer: bool) -> PollFlags {
        let mut events = PollFlags::empty();
        match self.phase {
            Phase::Connecting => events |= PollFlags::POLLOUT,
            Phase::Open => {
                let connected = matches!(self.origin, Origin::Connected { .. });
                if connected && self.index_moved < 4 {
                    events |= PollFlags::POLLOUT;
                }
                if !connected && self.plan.is_none() {
                    events |= PollFlags::POLLIN;
                }
                if let Some(plan) = self.plan {
                    if !self.eof && !self.at_hold(recv_held) {
                        events |= PollFlags::POLLIN;
                    }
                    // Also when all is sent: the shutdown happens in the send step
                    // (unless it waits for the peer's FIN, which POLLIN brings).
                    let waits_for_peer =
                        close_after_peer && self.sent == plan.send_len && !self.eof;
                    if !paused && !self.shut_write && !waits_for_peer {
                        events |= PollFlags::POLLOUT;
                    }
                }
            }
            Phase::Done => {}
        }
        events
    }

    fn report(self) -> FlowReport {
        FlowReport {
            index: self.index.filter(|_| self.plan.is_some()),
            origin: self.origin,
            local: self.local,
            peer: self.peer,
            expected: self.plan.map(|p| (p.send_len, p.recv_len)),
            sent: self.sent,
            received: self.received,
            shut_write: self.shut_write,
            eof: self.eof,
            reset: self.reset,
            error: self.error,
            longest_read_gap: self.longest_read_gap,
            longest_read_gap_after_hold: self.longest_read_gap_after_hold,
        }
    }
}

struct Listener {
    listener: TcpListener,
    addr: Option<SocketAddr>,
    expected: usize,
    accepted: usize,
    error: Option<FlowError>,
    last_progress: Instant,
}

impl Listener {
    fn wants_more(&self) -> bool {
        self.accepted < self.expected && self.error.is_none()
    }
}

struct Engine {
    plan: PlanFn,
    hold: Option<HoldFn>,
    close_after_peer: bool,
    control: Arc<Control>,
    stall: Duration,
    max_connecting: usize,
    connects: VecDeque<(SocketAddr, u32)>,
    connecting: usize,
    listeners: Vec<Listener>,
    flows: Vec<Flow>,
    reports: Vec<FlowReport>,
    scratch: Vec<u8>,
    started: Instant,
}

/// Who a poll(2) entry belongs to.
#[derive(Debug, Clone, Copy)]
enum Ready {
    Listener(usize),
    Flow(usize),
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Engine {
    fn new(spec: HostFlows) -> Self {
        let now = Instant::now();
        let listeners = spec
            .listeners
            .into_iter()
            .map(|(listener, expected)| {
                let addr = listener.local_addr().ok();
                let error = listener
                    .set_nonblocking(true)
                    .err()
                    .map(|err| FlowError::Io {
                        op: "make the listener nonblocking",
                        err,
                    });
                Listener {
                    listener,
                    addr,
                    expected,
                    accepted: 0,
                    error,
                    last_progress: now,
                }
            })
            .collect();
        Engine {
            plan: spec.plan,
            hold: spec.hold,
            close_after_peer: spec.close_after_peer,
            control: spec.control,
            stall: spec.stall,
            max_connecting: spec.max_connecting,
            connects: spec.connects,
            connecting: 0,
            listeners,
            flows: Vec::new(),
            reports: Vec::new(),
            scratch: vec![0; CHUNK],
            started: now,
        }
    }

    fn run(mut self) -> Report {
        let mut was_paused = true;
        loop {
            let paused = self.control.paused.load(Ordering::Relaxed);
            let recv_held = self.control.recv_held.load(Ordering::Relaxed);
            let now = Instant::now();
            // No stall clock runs while paused or held: restart them all at the resume.
            let idle_ok = paused || (recv_held && self.hold.is_some());
            if idle_ok || was_paused {
                self.flows.iter_mut().for_each(|f| f.last_progress = now);
                self.listeners
                    .iter_mut()
                    .for_each(|l| l.last_progress = now);
            }
            was_paused = idle_ok;
            // Time spent held is no gap between reads.
            for f in self.flows.iter_mut().filter(|f| f.at_hold(recv_held)) {
                f.was_held = true;
                f.last_read = Some(now);
            }
            if self.control.stop.load(Ordering::Relaxed) {
                self.stop_all();
                break;
            }
            self.start_connects();
            if self.flows.is_empty()
                && self.connects.is_empty()
                && !self.listeners.iter().any(Listener::wants_more)
            {
                break;
            }
            self.round(paused, recv_held);
            self.check_stalls(idle_ok);
            self.retire();
        }
        self.retire();
        Report {
            flows: self.reports,
            listeners: self
                .listeners
                .into_iter()
                .map(|l| ListenerReport {
                    addr: l.addr,
                    expected: l.expected,
                    accepted: l.accepted,
                    error: l.error,
                })
                .collect(),
            elapsed: self.started.elapsed(),
        }
    }

    /// One poll(2) over everything, then service what is ready.
    fn round(&mut self, paused: bool, recv_held: bool) {
        let mut ready: Vec<(Ready, PollFlags)> = Vec::new();
        {
            let mut fds: Vec<PollFd<'_>> =
                Vec::with_capacity(self.listeners.len() + self.flows.len());
            let mut owners: Vec<Ready> = Vec::with_capacity(fds.capacity());
            for (i, l) in self.listeners.iter().enumerate() {
                if l.wants_more() {
                    fds.push(PollFd::new(l.listener.as_fd(), PollFlags::POLLIN));
                    owners.push(Ready::Listener(i));
                }
            }
            for (i, f) in self.flows.iter().enumerate() {
                let events = f.interest(paused, recv_held, self.close_after_peer);
                fds.push(PollFd::new(f.stream.as_fd(), events));
                owners.push(Ready::Flow(i));
            }
            let timeout = PollTimeout::try_from(TICK).unwrap_or(PollTimeout::ZERO);
            match nix::poll::poll(&mut fds, timeout) {
                Ok(0) => return,
                Ok(_) => {}
                Err(Errno::EINTR) => return,
                Err(e) => {
                    // poll(2) on valid descriptors fails only for lack of memory: fail
                    // the run rather than spin.
                    let err = errno_context(e, "poll");
                    for f in &mut self.flows {
                        f.fail(FlowError::Io {
                            op: "poll",
                            err: io::Error::new(err.kind(), err.to_string()),
                        });
                    }
                    return;
                }
            }
            for (pos, fd) in fds.iter().enumerate() {
                let revents = fd.revents().unwrap_or(PollFlags::empty());
                if revents.is_empty() {
                    continue;
                }
                ready.push((owners[pos], revents));
            }
        }
        // Accepting only appends flows, so the positions collected above stay valid.
        for (who, revents) in ready {
            match who {
                Ready::Flow(i) => self.service(i, revents, paused, recv_held),
                Ready::Listener(i) => self.accept_from(i),
            }
        }
    }

    fn start_connects(&mut self) {
        while self.connecting < self.max_connecting {
            let Some((to, index)) = self.connects.pop_front() else {
                return;
            };
            let origin = Origin::Connected { to };
            match start_connect(to) {
                Ok(stream) => {
                    self.connecting += 1;
                    let mut flow = Flow::new(stream, origin, Phase::Connecting, Some(index));
                    flow.peer = Some(to);
                    self.flows.push(flow);
                }
                Err(err) => {
                    Control::bump(&self.control.failed, 1);
                    self.reports.push(FlowReport {
                        index: Some(index),
                        origin,
                        local: None,
                        peer: Some(to),
                        expected: None,
                        sent: 0,
                        received: 0,
                        shut_write: false,
                        eof: false,
                        reset: false,
                        error: Some(FlowError::Connect(err)),
                        longest_read_gap: Duration::ZERO,
                        longest_read_gap_after_hold: Duration::ZERO,
                    });
                }
            }
        }
    }

    fn accept_from(&mut self, i: usize) {
        let l = &mut self.listeners[i];
        while l.wants_more() {
            match l.listener.accept() {
                Ok((stream, peer)) => {
                    l.accepted += 1;
                    l.last_progress = Instant::now();
                    Control::bump(&self.control.accepted, 1);
                    let origin = Origin::Accepted {
                        listener: l.addr.unwrap_or(peer),
                    };
                    let mut flow = Flow::new(stream, origin, Phase::Open, None);
                    flow.peer = Some(peer);
                    flow.local = flow.stream.local_addr().ok();
                    if let Err(err) = flow.stream.set_nonblocking(true) {
                        flow.io_fail("make the accepted socket nonblocking", err);
                    }
                    self.flows.push(flow);
                }
                Err(e) if would_block(&e) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // A connection reset while in the accept queue: the listener goes on.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(err) => {
                    l.error = Some(FlowError::Io { op: "accept", err });
                    return;
                }
            }
        }
    }

    fn service(&mut self, i: usize, revents: PollFlags, paused: bool, recv_held: bool) {
        let Engine {
            flows,
            plan,
            hold,
            close_after_peer,
            control,
            scratch,
            connecting,
            ..
        } = self;
        let close_after_peer = *close_after_peer;
        let flow = &mut flows[i];
        if flow.finished() {
            return;
        }
        if flow.phase == Phase::Connecting {
            *connecting -= 1;
            match socket::getsockopt(&flow.stream, sockopt::SocketError) {
                Ok(0) => {
                    flow.phase = Phase::Open;
                    flow.local = flow.stream.local_addr().ok();
                    flow.last_progress = Instant::now();
                    Control::bump(&control.connected, 1);
                }
                Ok(errno) => {
                    flow.fail(FlowError::Connect(io::Error::from_raw_os_error(errno)));
                    return;
                }
                Err(e) => {
                    flow.fail(FlowError::Connect(errno_context(e, "SO_ERROR")));
                    return;
                }
            }
        }
        if revents.contains(PollFlags::POLLERR) {
            // A pending socket error (a reset, typically): a read reports it.
            match socket::getsockopt(&flow.stream, sockopt::SocketError) {
                Ok(0) | Err(_) => {}
                Ok(errno) => {
                    flow.io_fail("socket error", io::Error::from_raw_os_error(errno));
                    return;
                }
            }
        }
        if flow.plan.is_none() && !handshake(flow, plan, hold, control) {
            return;
        }
        let Some(fp) = flow.plan else {
            return;
        };
        if !paused {
            send(flow, &fp, scratch, control, close_after_peer);
        }
        if flow.error.is_none() && !flow.eof {
            receive(flow, &fp, scratch, control, recv_held);
            // The peer's FIN may be what the shutdown waited for.
            if close_after_peer && flow.eof && flow.error.is_none() && !paused {
                send(flow, &fp, scratch, control, close_after_peer);
            }
        }
        // POLLHUP before this side shut its write side down means the connection is
        // gone (closed without a pending error): what is left to send cannot go.
        if flow.error.is_none() && revents.contains(PollFlags::POLLHUP) && !flow.shut_write {
            flow.fail(FlowError::Hangup);
        }
        if flow.error.is_none() && flow.shut_write && flow.eof {
            flow.phase = Phase::Done;
            Control::bump(&control.completed, 1);
        }
    }

    fn check_stalls(&mut self, idle_ok: bool) {
        if idle_ok {
            return;
        }
        let now = Instant::now();
        for f in &mut self.flows {
            let idle = now.duration_since(f.last_progress);
            if !f.finished() && idle > self.stall {
                if f.phase == Phase::Connecting {
                    self.connecting -= 1;
                }
                f.fail(FlowError::Stalled(idle));
            }
        }
        for l in &mut self.listeners {
            let idle = now.duration_since(l.last_progress);
            if l.wants_more() && idle > self.stall {
                l.error = Some(FlowError::Stalled(idle));
            }
        }
    }

    fn stop_all(&mut self) {
        for f in &mut self.flows {
            if !f.finished() {
                f.fail(FlowError::Stopped);
            }
        }
        for l in &mut self.listeners {
            if l.wants_more() {
                l.error = Some(FlowError::Stopped);
            }
        }
        self.connects.clear();
    }

    /// Move finished flows into the report; dropping them closes their sockets.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.flows.len() {
            if self.flows[i].finished() {
                let flow = self.flows.swap_remove(i);
                if flow.error.is_some() {
                    Control::bump(&self.control.failed, 1);
                }
                self.reports.push(flow.report());
            } else {
                i += 1;
            }
        }
    }
}

/// The index handshake; true once the flow's plan is known.
fn handshake(flow: &mut Flow, plan: &PlanFn, hold: &Option<HoldFn>, control: &Control) -> bool {
    while flow.index_moved < 4 {
        let result = match flow.origin {
            Origin::Connected { .. } => flow.stream.write(&flow.index_bytes[flow.index_moved..]),
            Origin::Accepted { .. } => {
                let at = flow.index_moved;
                flow.stream.read(&mut flow.index_bytes[at..])
            }
        };
        match result {
            Ok(0) => {
                flow.eof = true;
                flow.fail(FlowError::ShortIndex(flow.index_moved));
                return false;
            }
            Ok(n) => {
                flow.index_moved += n;
                flow.last_progress = Instant::now();
            }
            Err(e) if would_block(&e) => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                flow.io_fail("index handshake", e);
                return false;
            }
        }
    }
    let index = u32::from_be_bytes(flow.index_bytes);
    flow.index = Some(index);
    flow.plan = Some(plan(index));
    flow.hold_at = hold.as_ref().and_then(|h| h(index));
    flow.last_read = Some(Instant::now());
    Control::bump(&control.indexed, 1);
    true
}

fn send(
    flow: &mut Flow,
    plan: &FlowPlan,
    scratch: &mut [u8],
    control: &Control,
    close_after_peer: bool,
) {
    let mut budget = ROUND_BUDGET;
    while flow.sent < plan.send_len && budget > 0 {
        let n = (plan.send_len - flow.sent).min(scratch.len().min(budget) as u64) as usize;
        plan.send.fill(flow.sent, &mut scratch[..n]);
        match flow.stream.write(&scratch[..n]) {
            Ok(0) => return,
            Ok(n) => {
                flow.sent += n as u64;
                budget -= n;
                flow.last_progress = Instant::now();
                Control::bump(&control.bytes_sent, n as u64);
            }
            Err(e) if would_block(&e) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return flow.io_fail("write", e),
        }
    }
    if flow.sent == plan.send_len && !flow.shut_write && (flow.eof || !close_after_peer) {
        match flow.stream.shutdown(Shutdown::Write) {
            Ok(()) => flow.shut_write = true,
            Err(e) => flow.io_fail("shutdown(Write)", e),
        }
    }
}

fn receive(
    flow: &mut Flow,
    plan: &FlowPlan,
    scratch: &mut [u8],
    control: &Control,
    recv_held: bool,
) {
    let mut budget = ROUND_BUDGET;
    while budget > 0 && !flow.at_hold(recv_held) {
        match flow.stream.read(scratch) {
            Ok(0) => {
                flow.eof = true;
                flow.last_progress = Instant::now();
                flow.note_read(flow.last_progress);
                if flow.received != plan.recv_len {
                    flow.fail(FlowError::Short {
                        received: flow.received,
                        expected: plan.recv_len,
                    });
                }
                return;
            }
            Ok(n) => {
                flow.last_progress = Instant::now();
                flow.note_read(flow.last_progress);
                let room = plan.recv_len - flow.received;
                let good = (n as u64).min(room) as usize;
                if let Err(m) = plan.recv.verify(flow.received, &scratch[..good]) {
                    flow.received = m.offset;
                    return flow.fail(FlowError::Corrupt(m));
                }
                flow.received += good as u64;
                Control::bump(&control.bytes_received, good as u64);
                if good < n {
                    return flow.fail(FlowError::TooLong {
                        expected: plan.recv_len,
                    });
                }
                budget = budget.saturating_sub(n);
            }
            Err(e) if would_block(&e) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return flow.io_fail("read", e),
        }
    }
}

/// A nonblocking connect to `to`, in progress.
fn start_connect(to: SocketAddr) -> io::Result<TcpStream> {
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| errno_context(e, &format!("socket to connect to {to}")))?;
    match socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(to)) {
        Ok(()) | Err(Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
        Err(e) => Err(errno_context(e, &format!("connect to {to}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Connection `i`: the connecting side sends seed 2i, the accepting side 2i + 1;
    /// lengths vary per connection so a flow's data cannot pass for another's.
    fn plan(i: u32, connecting: bool) -> FlowPlan {
        let (a, b) = (
            Pattern::new(2 * u64::from(i)),
            Pattern::new(2 * u64::from(i) + 1),
        );
        let (a_len, b_len) = (20_000 + u64::from(i) * 37, 30_000 + u64::from(i) * 11);
        if connecting {
            FlowPlan {
                send: a,
                send_len: a_len,
                recv: b,
                recv_len: b_len,
            }
        } else {
            FlowPlan {
                send: b,
                send_len: b_len,
                recv: a,
                recv_len: a_len,
            }
        }
    }

    fn loopback_v4() -> SocketAddr {
        (Ipv4Addr::LOCALHOST, 0).into()
    }

    fn local(listener: &TcpListener) -> SocketAddr {
        listener.local_addr().expect("listener address")
    }

    /// Hundreds of flows each way between two engines, IPv4 and IPv6, all complete
    /// with every byte checked; the counters add up; two threads carry it all.
    #[test]
    fn hundreds_of_flows_between_two_engines() {
        let n: u32 = 300;
        let v4 = listen(loopback_v4()).expect("listen v4");
        let v6 = listen((Ipv6Addr::LOCALHOST, 0).into()).expect("listen v6");
        let (a4, a6) = (local(&v4), local(&v6));
        let server = HostFlows::new(|i| plan(i, false))
            .accept(v4, n as usize)
            .accept(v6, n as usize)
            .stall_timeout(Duration::from_secs(30))
            .spawn()
            .expect("spawn server");
        let mut client = HostFlows::new(|i| plan(i, true))
            .stall_timeout(Duration::from_secs(30))
            .max_connecting(64);
        for i in 0..2 * n {
            client = client.connect(if i < n { a4 } else { a6 }, i);
        }
        let client = client.spawn().expect("spawn client");
        let client_report = client.join();
        let server_report = server.join();
        assert!(client_report.is_ok(), "client: {client_report}");
        assert!(server_report.is_ok(), "server: {server_report}");
        assert_eq!(server_report.flows.len(), 2 * n as usize);
        let mut seen: Vec<u32> = server_report
            .flows
            .iter()
            .map(|f| f.index.expect("index"))
            .collect();
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..2 * n).collect::<Vec<_>>(),
            "server saw each index once"
        );
        let total: u64 = (0..2 * n)
            .map(|i| plan(i, true).send_len + plan(i, true).recv_len)
            .sum();
        let moved: u64 = client_report
            .flows
            .iter()
            .map(|f| f.sent + f.received)
            .sum();
        assert_eq!(moved, total, "bytes the client moved");
        assert!(client_report
            .flows
            .iter()
            .all(|f| f.shut_write && f.eof && !f.reset));
    }

    /// Thousands of flows at once, on the way to the 10,000 the migration tests need:
    /// one engine accepts them all, another opens them all, every byte checked. Both
    /// ends live in this process, so 8,000 flows take 16,000 descriptors (the hard
    /// limit here is 20,000, and the other tests in this binary run beside this one).
    #[test]
    fn eight_thousand_flows() {
        let n: u32 = 8_000;
        let wanted = 2 * u64::from(n) + 2048;
        let nofile = crate::netns::raise_nofile(wanted).expect("RLIMIT_NOFILE");
        assert!(nofile >= wanted, "need {wanted} descriptors, have {nofile}");
        let small = |i: u32, connecting: bool| FlowPlan {
            send_len: 1000 + u64::from(i % 7),
            recv_len: 1000 + u64::from(i % 5),
            ..plan(i, connecting)
        };
        let small = move |i: u32, connecting: bool| {
            let p = small(i, connecting);
            if connecting {
                p
            } else {
                FlowPlan {
                    send_len: p.recv_len,
                    recv_len: p.send_len,
                    ..p
                }
            }
        };
        let listener = listen(loopback_v4()).expect("listen");
        let to = local(&listener);
        let server = HostFlows::new(move |i| small(i, false))
            .accept(listener, n as usize)
            .stall_timeout(Duration::from_secs(60))
            .spawn()
            .expect("spawn server");
        let mut client = HostFlows::new(move |i| small(i, true))
            .stall_timeout(Duration::from_secs(60))
            .max_connecting(1024);
        for i in 0..n {
            client = client.connect(to, i);
        }
        let client = client.spawn().expect("spawn client");
        let (c, s) = (client.join(), server.join());
        assert!(c.is_ok() && s.is_ok(), "client: {c}\nserver: {s}");
        assert_eq!((c.flows.len(), s.flows.len()), (n as usize, n as usize));
        eprintln!("{n} flows each way in {:.1} s", c.elapsed.as_secs_f64());
    }

    /// A blocking test-side peer connecting to `to` as connection `index`.
    fn peer(to: SocketAddr, index: u32) -> TcpStream {
        let mut s = TcpStream::connect(to).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        s.write_all(&index.to_be_bytes()).expect("index");
        s
    }

    /// Read everything up to end of stream (or an error).
    fn drain(s: &mut TcpStream) -> u64 {
        let mut buf = vec![0; CHUNK];
        let mut n = 0;
        while let Ok(k @ 1..) = s.read(&mut buf) {
            n += k as u64;
        }
        n
    }

    fn only_failure(report: &Report) -> &FlowReport {
        let failed: Vec<&FlowReport> = report.failures().collect();
        assert_eq!(failed.len(), 1, "{report}");
        failed[0]
    }

    /// A flipped byte in the middle of a stream fails that flow at exactly that offset;
    /// the flows beside it complete.
    #[test]
    fn corrupt_data_is_caught_at_its_offset() {
        let listener = listen(loopback_v4()).expect("listen");
        let to = local(&listener);
        let run = HostFlows::new(|i| plan(i, false))
            .accept(listener, 3)
            .stall_timeout(Duration::from_secs(30))
            .spawn()
            .expect("spawn");
        let flip_at = 12_345;
        for i in 0..3u32 {
            let p = plan(i, true);
            let mut s = peer(to, i);
            let mut data = p.send.bytes(0, p.send_len as usize);
            if i == 1 {
                data[flip_at] ^= 0x40;
            }
            s.write_all(&data).expect("data");
            s.shutdown(Shutdown::Write).expect("shutdown");
            drain(&mut s);
        }
        let report = run.join();
        let bad = only_failure(&report);
        assert_eq!(bad.index, Some(1));
        assert_eq!(bad.received, flip_at as u64, "{bad}");
        assert!(
            matches!(bad.error, Some(FlowError::Corrupt(m)) if m.offset == flip_at as u64),
            "{bad}"
        );
    }

    /// A peer that resets the connection half way is reported as reset, with the bytes
    /// that did arrive; a peer that ends its stream early is reported short.
    #[test]
    fn early_reset_and_short_stream_are_reported() {
        let listener = listen(loopback_v4()).expect("listen");
        let to = local(&listener);
        let run = HostFlows::new(|i| plan(i, false))
            .accept(listener, 2)
            .stall_timeout(Duration::from_secs(30))
            .spawn()
            .expect("spawn");
        let half = 10_000u64;

        // Connection 0: half the data, then a close with unread data queued, which the
        // kernel turns into a RST.
        let p = plan(0, true);
        let mut s = peer(to, 0);
        s.write_all(&p.send.bytes(0, half as usize)).expect("data");
        let mut byte = [0u8; 1];
        s.peek(&mut byte).expect("wait for the engine's data");
        drop(s);

        // Connection 1: half the data, then end of stream.
        let p = plan(1, true);
        let mut s = peer(to, 1);
        s.write_all(&p.send.bytes(0, half as usize)).expect("data");
        s.shutdown(Shutdown::Write).expect("shutdown");
        drain(&mut s);

        let report = run.join();
        assert_eq!(report.failures().count(), 2, "{report}");
        for f in report.failures() {
            match f.index {
                Some(0) => {
                    assert!(f.reset && !f.eof, "{f}");
                    assert!(matches!(f.error, Some(FlowError::Io { .. })), "{f}");
                }
                Some(1) => {
                    assert!(f.eof && !f.reset && f.received == half, "{f}");
                    assert!(
                        matches!(f.error, Some(FlowError::Short { received, .. }) if received == half),
                        "{f}"
                    );
                }
                other => panic!("unexpected flow {other:?}: {f}"),
            }
        }
    }

    /// With `close_after_peer`, a flow that has sent everything keeps its write side
    /// open until the peer's FIN arrived, then closes and completes.
    #[test]
    fn close_after_peer_waits_for_the_peers_fin() {
        let listener = listen(loopback_v4()).expect("listen");
        let to = local(&listener);
        let run = HostFlows::new(|i| plan(i, false))
            .accept(listener, 1)
            .close_after_peer(true)
            .stall_timeout(Duration::from_secs(30))
            .spawn()
            .expect("spawn");
        let p = plan(3, true);
        let mut s = peer(to, 3);
        s.write_all(&p.send.bytes(0, p.send_len as usize))
            .expect("data");
        let mut got = vec![0; p.recv_len as usize];
        s.read_exact(&mut got).expect("the engine's data");
        assert!(p.recv.verify(0, &got).is_ok());
        let deadline = Instant::now() + Duration::from_secs(30);
        while run.progress().bytes_received < p.send_len {
            assert!(Instant::now() < deadline, "{:?}", run.progress());
            std::thread::sleep(Duration::from_millis(5));
        }
        // Everything went both ways, and the engine's FIN waits for ours.
        s.set_nonblocking(true).expect("nonblocking");
        let mut byte = [0u8; 1];
        let early = s.read(&mut byte);
        assert!(
            matches!(&early, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "the engine ended its stream before the peer's FIN: {early:?}"
        );
        assert_eq!(run.progress().completed, 0);
        s.set_nonblocking(false).expect("blocking");
        s.shutdown(Shutdown::Write).expect("shutdown");
        assert_eq!(drain(&mut s), 0, "end of stream after the peer's FIN");
        let report = run.join();
        assert!(report.is_ok(), "{report}");
        let f = &report.flows[0];
        assert!(f.shut_write && f.eof && f.sent == p.recv_len, "{f}");
    }

    /// The receive hold stops a flow's reading at its mark (one read may pass it) while
    /// other flows read on; released, everything completes, and no flow stalled
    /// meanwhile.
    #[test]
    fn receive_hold_stops_reading_at_the_mark() {
        let mark = 10_000u64;
        // Flow 0's peer sends 1 MiB: far more than one read takes.
        let big = |i: u32, connecting: bool| {
            let mut p = plan(i, connecting);
            if i == 0 && connecting {
                p.send_len = 1 << 20;
            } else if i == 0 {
                p.recv_len = 1 << 20;
            }
            p
        };
        let listener = listen(loopback_v4()).expect("listen");
        let to = local(&listener);
        let run = HostFlows::new(move |i| big(i, false))
            .accept(listener, 2)
            .recv_hold(true, move |i| (i == 0).then_some(mark))
            .stall_timeout(Duration::from_millis(300))
            .spawn()
            .expect("spawn");
        // Blocking peers on threads of their own: flow 0's cannot finish writing while
        // the engine holds.
        let peers: Vec<_> = (0..2u32)
            .map(|i| {
                let p = big(i, true);
                let mut s = peer(to, i);
                std::thread::spawn(move || {
                    s.write_all(&p.send.bytes(0, p.send_len as usize))
                        .expect("data");
                    s.shutdown(Shutdown::Write).expect("shutdown");
                    drain(&mut s)
                })
            })
            .collect();
        // Flow 1 is not held: it reads everything; flow 0 stops at its mark.
        let unheld = big(1, true).send_len;
        let deadline = Instant::now() + Duration::from_secs(30);
        while run.progress().bytes_received < unheld + mark {
            assert!(Instant::now() < deadline, "{:?}", run.progress());
            std::thread::sleep(Duration::from_millis(5));
        }
        // Longer than the stall timeout: a held flow does not stall.
        std::thread::sleep(Duration::from_millis(600));
        let held = run.progress().bytes_received - unheld;
        assert!(
            (mark..mark + CHUNK as u64).contains(&held),
            "flow 0 read {held} bytes while held at {mark}"
        );
        run.set_recv_held(false);
        for p in peers {
            p.join().expect("peer thread");
        }
        let report = run.join();
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.flows.len(), 2);
    }

    /// While paused, handshakes complete and nothing is sent; after the resume all
    /// flows complete. A silent peer stalls its flow, and a listener short of its count
    /// stalls too.
    #[test]
    fn pause_gate_and_stalls() {
        let n = 20u32;
        let listener = listen(loopback_v4()).expect("listen");
        let to = local(&listener);
        let server = HostFlows::new(|i| plan(i, false))
            .accept(listener, n as usize)
            .spawn()
            .expect("spawn server");
        let mut client = HostFlows::new(|i| plan(i, true)).paused(true);
        for i in 0..n {
            client = client.connect(to, i);
        }
        let client = client.spawn().expect("spawn client");
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.progress().indexed < u64::from(n) {
            assert!(Instant::now() < deadline, "{:?}", server.progress());
            std::thread::sleep(Duration::from_millis(5));
        }
        // Every index has arrived, so the client has passed its handshakes; the server
        // has sent its data, the paused client none.
        let p = client.progress();
        assert_eq!(
            (p.connected, p.indexed, p.bytes_sent),
            (u64::from(n), u64::from(n), 0)
        );
        client.set_paused(false);
        let (c, s) = (client.join(), server.join());
        assert!(c.is_ok() && s.is_ok(), "client: {c}\nserver: {s}");

        // Stalls: one peer that sends its index and then nothing; a second expected
        // connection that never comes.
        let listener = listen(loopback_v4()).expect("listen");
        let to = local(&listener);
        let run = HostFlows::new(|i| plan(i, false))
            .accept(listener, 2)
            .stall_timeout(Duration::from_millis(300))
            .spawn()
            .expect("spawn");
        let mut silent = peer(to, 5);
        let report = run.join();
        let f = only_failure(&report);
        assert!(matches!(f.error, Some(FlowError::Stalled(_))), "{f}");
        assert_eq!(
            (f.index, f.sent, f.received),
            (Some(5), plan(5, false).send_len, 0)
        );
        assert!(
            matches!(
                report.listeners[0],
                ListenerReport {
                    accepted: 1,
                    expected: 2,
                    error: Some(FlowError::Stalled(_)),
                    ..
                }
            ),
            "{report}"
        );
        drain(&mut silent);
    }
}
