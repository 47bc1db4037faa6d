//! Pre-dump during pre-copy: read every TCP connection's kernel state through
//! `baton-repair` while the VM still runs, so that SAVE (VM stopped) only has to check,
//! per socket, that nothing moved since.
//!
//! # Theory of operation
//!
//! ```text
//!  LOG_ALL on ──► pass thread (baton-predump)           SAVE (VM stopped, save thread)
//!                 ids of every flow now                 flows with a pre-dump of the
//!                 loop: engine lock                     same socket (SO_COOKIE)
//!                        ≤ 253 flows → PreDump          → FreezeCheck(mark): frozen as by
//!                        keep (state, mark, cookie)       Dump; Unchanged → pre-dumped
//!                       unlock (guest traffic runs)       state + fresh timestamp and
//!                 "moved while read" → once more at       SO_PEEK_OFF; else the full state
//!                  the end of the pass                  the others → Dump
//!  LOG_ALL off ──► pre-dumps dropped
//! ```
//!
//! * Most of a connection's state does not change while it is idle, and reading it is
//!   what makes a dump expensive (repair mode, a dozen reads, the queues). During the
//!   pre-copy phase the helper reads each live socket without making it deaf; the
//!   kernel's own progress counters ([`ProgressMark`]: state, segments in and out,
//!   both queue lengths), read before and after, tell whether the state was stable
//!   while it was read (see `baton_tcp_repair`'s pre-dump module for why those counters
//!   cover every field of the state). At SAVE the helper freezes each pre-dumped socket
//!   exactly as a dump does and compares the counters; only if none moved is the
//!   pre-dumped state used. Correctness never depends on a pre-dump being fresh: a
//!   moved socket is dumped in full, in the same request, and every socket ends frozen
//!   exactly as after a dump.
//! * The helper must be the only one touching a socket while it reads it: each chunk
//!   runs under the engine lock (the engine does all of baton's socket I/O under it).
//!   Chunks are one request of at most [`MAX_FDS`] sockets, so the guest's traffic
//!   goes on between them.
//! * The result is kept per [`FlowId`] together with the socket's `SO_COOKIE` (unique
//!   per socket for the life of the kernel): a flow id can be reused by a new
//!   connection (its generation wraps), a cookie cannot, so at SAVE a pre-dump is used
//!   only for the very socket it was read from.
//! * A pass covers the flows that exist when it starts; later ones are dumped in full
//!   at SAVE. A connection that moved while it was read is tried once more at the end
//!   of the pass, then left to SAVE. The pass ends early when SAVE begins (SAVE uses
//!   what exists) or when `LOG_ALL` goes off (a cancelled migration: everything is
//!   dropped). A pass never runs on frozen connections (after a SAVE, before the VM
//!   resumed): taking those out of repair mode would undo the freeze.
//! * A helper that fails a whole request (it died in the middle) may have left the
//!   sockets of that request in repair mode, where they cannot send. The pass stops; its
//!   thread waits for a fresh helper (`--helper` starts one) and thaws those sockets
//!   through it ([`PreDump::recover`]) — a thaw is harmless on a socket that is not
//!   frozen.

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_proto::frame::MAX_FDS;
use baton_proto::repair::PreDumped;
use baton_repair_ipc::RepairClient;
use tracing::{debug, error, info, warn};

use crate::flow::FlowId;
use crate::repair_link::RepairLink;
use crate::tcp::{socket_cookie, TcpFlows};
use crate::vu::NetworkEngine;

/// How long the pass thread waits for a helper to attach (at `LOG_ALL` with
/// `--helper` one is being started; after a helper died, a fresh one).
pub const HELPER_WAIT: Duration = Duration::from_secs(10);

/// A short pause between two chunks, so that the device worker waiting for the engine
/// lock gets it (a mutex does not queue its waiters fairly).
const BETWEEN_CHUNKS: Duration = Duration::from_micros(200);

/// One connection's pre-dump, for the socket it was read from.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// `SO_COOKIE` of the socket.
    pub cookie: u64,
    pub pre: PreDumped,
}

/// What one step of a pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A chunk was done; more to do.
    More,
    /// No helper is held: wait for one to attach, then step again.
    NeedHelper,
    /// The pass is over (finished, stopped, or replaced by a newer one).
    Done,
    /// A request failed as a whole: wait for a fresh helper, then
    /// [`NetworkEngine::pre_dump_recover`].
    HelperFailed,
}

/// One pass over the flows that existed when it began.
#[derive(Debug)]
struct Pass {
    number: u64,
    queue: VecDeque<FlowId>,
    /// Moved while being read: tried once more when `queue` is empty.
    retry: Vec<FlowId>,
    retrying: bool,
    started: Instant,
    /// Flows in the pass (for the log).
    total: usize,
    /// Moved while being read, twice.
    moved: usize,
    /// Refused by the helper (a handshake, a closed socket, …): dumped in full at SAVE.
    refused: usize,
}

/// The engine's pre-dump state: at most one pass, and what passes produced.
#[derive(Debug, Default)]
pub struct PreDump {
    passes: u64,
    pass: Option<Pass>,
    entries: HashMap<FlowId, Entry>,
    /// Sockets of a request that failed as a whole (maybe left in repair mode).
    interrupted: Vec<FlowId>,
}

impl PreDump {
    /// `LOG_ALL` on: start a new pass over the flows of `tcp` (any older pass and its
    /// results are dropped). Returns its number, for [`PreDump::step`].
    pub(crate) fn begin(&mut self, tcp: &TcpFlows) -> u64 {
        self.passes += 1;
        self.entries.clear();
        let queue: VecDeque<FlowId> = tcp.flow_sockets().into_iter().map(|(id, _)| id).collect();
        self.pass = Some(Pass {
            number: self.passes,
            total: queue.len(),
            queue,
            retry: Vec::new(),
            retrying: false,
            started: Instant::now(),
            moved: 0,
            refused: 0,
        });
        self.passes
    }

    /// `LOG_ALL` off: the migration was cancelled; drop everything.
    pub(crate) fn cancel(&mut self) {
        if let Some(pass) = self.pass.take() {
            info!(
                "pre-dump: migration cancelled after {:.1} ms; pass stopped",
                pass.started.elapsed().as_secs_f64() * 1e3
            );
        }
        if !self.entries.is_empty() {
            debug!(
                "pre-dump: {} pre-dumped state(s) dropped",
                self.entries.len()
            );
        }
        self.entries.clear();
    }

    /// SAVE: the pass (if any) stops here; the pre-dumps go to the caller.
    pub(crate) fn take_for_save(&mut self) -> HashMap<FlowId, Entry> {
        if let Some(pass) = self.pass.take() {
            info!(
                "pre-dump: SAVE began before the pass was over ({} of {} connection(s) left)",
                pass.queue.len() + pass.retry.len(),
                pass.total
            );
        }
        // Interrupted sockets are dumped at SAVE like every other (a dump works on a
        // socket in repair mode), and thawed with them if SAVE fails.
        self.interrupted.clear();
        std::mem::take(&mut self.entries)
    }

    /// Whether a pass numbered `number` is the current one.
    pub(crate) fn is_current(&self, number: u64) -> bool {
        self.pass.as_ref().is_some_and(|p| p.number == number)
    }

    /// Stop pass `number` because no helper came.
    pub(crate) fn abandon(&mut self, number: u64) {
        if self.is_current(number) {
            self.pass = None;
            warn!(
                "pre-dump: no baton-repair helper within {HELPER_WAIT:?}; SAVE dumps every \
                 TCP connection"
            );
        }
    }

    /// One chunk of pass `number`: at most [`MAX_FDS`] flows of `tcp`, pre-dumped
    /// through `helper`. The caller holds the engine lock (nothing else uses the
    /// sockets meanwhile).
    pub(crate) fn step(
        &mut self,
        number: u64,
        tcp: &TcpFlows,
        helper: Option<&mut RepairClient>,
    ) -> Step {
        let Some(pass) = self.pass.as_mut().filter(|p| p.number == number) else {
            return Step::Done;
        };
        if tcp.is_frozen() {
            info!("pre-dump: the TCP connections are frozen (after a SAVE); no pre-dump");
            self.pass = None;
            return Step::Done;
        }
        if pass.queue.is_empty() && !pass.retrying && !pass.retry.is_empty() {
            pass.retrying = true;
            pass.queue.extend(pass.retry.drain(..));
        }
        if pass.queue.is_empty() {
            let pass = self.pass.take();
            if let Some(pass) = pass {
                pass.log_end(self.entries.len());
            }
            return Step::Done;
        }
        let Some(helper) = helper else {
            return Step::NeedHelper;
        };
        if !helper.supports_pre_dump() {
            info!(
                "pre-dump: the baton-repair helper speaks protocol version {} (no pre-dump); \
                 SAVE dumps every TCP connection",
                helper.version()
            );
            self.pass = None;
            return Step::Done;
        }
        let taken = pass.queue.len().min(MAX_FDS);
        let mut chunk: Vec<(FlowId, BorrowedFd<'_>, u64)> = Vec::with_capacity(taken);
        // Looked up by id: a flow closed since the pass began is simply skipped.
        for id in pass.queue.drain(..taken) {
            let Some(fd) = tcp.flow_socket(id) else {
                continue;
            };
            match socket_cookie(fd) {
                Ok(cookie) => chunk.push((id, fd, cookie)),
                Err(err) => debug!("{id}: SO_COOKIE: {err}; no pre-dump"),
            }
        }
        if chunk.is_empty() {
            return Step::More;
        }
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd, _)| *fd).collect();
        let results = match helper.pre_dump(&fds) {
            Ok(results) => results,
            Err(err) => {
                error!(
                    "pre-dump: baton-repair failed on {} socket(s): {err}; pass stopped",
                    fds.len()
                );
                self.interrupted = chunk.iter().map(|(id, _, _)| *id).collect();
                self.pass = None;
                return Step::HelperFailed;
            }
        };
        for ((id, _, cookie), result) in chunk.into_iter().zip(results) {
            match result {
                Ok(Some(pre)) => {
                    self.entries.insert(id, Entry { cookie, pre });
                }
                Ok(None) if !pass.retrying => pass.retry.push(id),
                Ok(None) => pass.moved += 1,
                Err(err) => {
                    debug!("{id}: no pre-dump: {err}");
                    pass.refused += 1;
                }
            }
        }
        Step::More
    }

    /// After [`Step::HelperFailed`]: thaw the sockets of the failed request through
    /// `helper` (a fresh one), so that none stays in repair mode.
    pub(crate) fn recover(&mut self, tcp: &TcpFlows, helper: Option<&mut RepairClient>) {
        if self.interrupted.is_empty() {
            return;
        }
        let Some(helper) = helper else {
            error!(
                "pre-dump: no baton-repair helper to thaw the {} socket(s) of the failed \
                 request: those left in repair mode hang until a SAVE",
                self.interrupted.len()
            );
            return;
        };
        let ids: Vec<FlowId> = std::mem::take(&mut self.interrupted);
        crate::restore::thaw_flows(tcp, helper, &ids, "after a failed pre-dump");
        info!(
            "pre-dump: {} socket(s) of the failed request thawed through a fresh baton-repair",
            ids.len()
        );
    }
}

impl Pass {
    fn log_end(&self, kept: usize) {
        info!(
            "pre-dump pass over: {kept} of {} TCP connection(s) pre-dumped in {:.1} ms \
             ({} moved while being read, {} refused)",
            self.total,
            self.started.elapsed().as_secs_f64() * 1e3,
            self.moved,
            self.refused
        );
    }
}

/// Run one pass on a thread of its own (`LOG_ALL` arrived): chunks under the engine
/// lock until the engine says it is over or `save` is set (a SAVE started: it takes
/// the engine next and uses what the pass found); helpers come from `link`.
pub fn spawn_pass(
    engine: Arc<Mutex<dyn NetworkEngine>>,
    link: Arc<RepairLink>,
    save: Arc<AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("baton-predump".into())
        .spawn(move || run_pass(&engine, &link, &save))
        .map(|_| ())
}

fn lock<'a>(
    engine: &'a Mutex<dyn NetworkEngine + 'static>,
) -> std::sync::MutexGuard<'a, dyn NetworkEngine + 'static> {
    engine
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sleep for `time` without `nanosleep`, which the sandbox's seccomp allow-list does
/// not have: a timed wait on a condition variable nobody signals is a `futex` call.
fn pause(time: Duration) {
    let mutex = Mutex::new(());
    let guard = mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let _ = std::sync::Condvar::new().wait_timeout(guard, time);
}

fn run_pass(engine: &Mutex<dyn NetworkEngine>, link: &RepairLink, save: &AtomicBool) {
    let Some(number) = lock(engine).pre_dump_begin() else {
        return;
    };
    let mut waited = false;
    loop {
        // Checked before each chunk, not only by the engine inside it: a mutex does not
        // queue its waiters, and this thread would take the lock again before a SAVE
        // thread that is not scheduled at once.
        if save.load(Ordering::SeqCst) {
            return;
        }
        let step = lock(engine).pre_dump_step(number);
        match step {
            Step::More => pause(BETWEEN_CHUNKS),
            Step::Done => return,
            Step::NeedHelper if waited => {
                lock(engine).pre_dump_abandon(number);
                return;
            }
            Step::NeedHelper => {
                waited = true;
                link.wait_for_fresh_helper(HELPER_WAIT);
            }
            Step::HelperFailed => {
                // The link notices the dead helper's hang-up, then `--helper` starts a
                // fresh one when the engine asks.
                link.wait_for_fresh_helper(HELPER_WAIT);
                lock(engine).pre_dump_recover();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::testing::{config, established_guest_side as established};
    use nix::sys::epoll::{Epoll, EpollCreateFlags};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    /// A table with `n` established connections to a local server (and their peers).
    fn table(n: u16) -> (TcpFlows, Vec<TcpStream>) {
        let config = config();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        let mut tcp = TcpFlows::new(&config, &epoll, 64, Instant::now()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peers = Vec::new();
        let mut adopted = Vec::new();
        for i in 0..n {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            peers.push(listener.accept().unwrap().0);
            adopted.push((established(40000 + i), client.into()));
        }
        assert_eq!(tcp.adopt(adopted, Instant::now()), usize::from(n));
        (tcp, peers)
    }

    #[test]
    fn socket_cookies_tell_sockets_apart() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let b = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let cookie = socket_cookie(a.as_fd()).unwrap();
        assert_eq!(cookie, socket_cookie(a.as_fd()).unwrap(), "stable");
        assert_ne!(cookie, socket_cookie(b.as_fd()).unwrap());
        // A duplicate descriptor is the same socket.
        let dup = a.as_fd().try_clone_to_owned().unwrap();
        assert_eq!(cookie, socket_cookie(dup.as_fd()).unwrap());
    }

    #[test]
    fn an_empty_pass_is_over_at_once() {
        let (tcp, _peers) = table(0);
        let mut pre = PreDump::default();
        let number = pre.begin(&tcp);
        assert!(pre.is_current(number));
        assert_eq!(pre.step(number, &tcp, None), Step::Done);
        assert!(!pre.is_current(number));
        assert!(pre.take_for_save().is_empty());
    }

    #[test]
    fn without_a_helper_the_pass_waits_and_can_be_abandoned() {
        let (tcp, _peers) = table(3);
        let mut pre = PreDump::default();
        let number = pre.begin(&tcp);
        assert_eq!(pre.step(number, &tcp, None), Step::NeedHelper);
        assert_eq!(
            pre.step(number, &tcp, None),
            Step::NeedHelper,
            "nothing lost"
        );
        pre.abandon(number);
        assert_eq!(pre.step(number, &tcp, None), Step::Done);
    }

    #[test]
    fn a_newer_pass_or_a_cancel_ends_the_older_one() {
        let (tcp, _peers) = table(2);
        let mut pre = PreDump::default();
        let first = pre.begin(&tcp);
        let second = pre.begin(&tcp);
        assert_ne!(first, second);
        assert_eq!(pre.step(first, &tcp, None), Step::Done, "replaced");
        assert_eq!(pre.step(second, &tcp, None), Step::NeedHelper);
        pre.cancel();
        assert_eq!(pre.step(second, &tcp, None), Step::Done, "cancelled");
        // SAVE after a cancel finds nothing to use.
        assert!(pre.take_for_save().is_empty());
    }
}
