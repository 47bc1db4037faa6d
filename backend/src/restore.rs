//! TCP connections to another host or network namespace: dumped through `baton-repair`
//! at SAVE, restored through it into fresh sockets at LOAD (issue 5).
//!
//! # Theory of operation
//!
//! ```text
//!  source SAVE (VM stopped)                      target LOAD (rings not started)
//!  Dump ≤ 253 sockets per request:               fresh socket per flow (family of the
//!   filter (deaf) + repair on, state read         state, IP_FREEBIND / IPV6_FREEBIND:
//!   → TcpFlowRecord.kernel                        the address may arrive late)
//!  sockets stay deaf and in repair mode          Restore ≤ 253 per request (bind,
//!  (see handover::Repaired for why)               sequences, queues, options, repair
//!                                                 off, send queue written at once)
//!                                                SO_PEEK_OFF as the source had it
//!                                                TcpFlows::adopt (guest side waits
//!                                                for the rings)
//! ```
//!
//! * Connections pre-dumped while the VM still ran ([`crate::predump`]) get a freeze
//!   check instead of a dump at SAVE: frozen exactly the same way, and their pre-dumped
//!   state is used only if the kernel's progress counters did not move since (else the
//!   helper dumps them in full in the same request). Either way every socket ends
//!   frozen as after a dump, so everything below applies unchanged. Both lists go to
//!   the client whole, which keeps requests in flight.
//! * The source cannot know where the target is, so in a migration it dumps every
//!   socket *and* offers them for a same-host handover (`crate::handover`); the target
//!   decides ([`crate::migrate`]): same host and namespace → take the live sockets, the
//!   kernel states are ignored; otherwise → restore them here.
//! * A dump that fails for a connection fails SAVE (the source keeps everything) unless
//!   `--migrate-drop-tcp`; then that connection travels without kernel state and only a
//!   same-host target can take it.
//! * On the target, a connection that cannot be restored is logged and left out: the
//!   guest's next segment for it is answered with a RST; the others go on. A restored
//!   socket that cannot be used as it is (its send queue did not fit, so bytes the
//!   guest was promised would be lost) goes back into repair mode and is closed
//!   silently (no FIN or RST for a peer that may still be talking to the source), and
//!   its flow is reset the same way. Only when *nothing* could be restored because the
//!   helper failed as a whole does LOAD fail (the source then resumes with everything):
//!   sockets restored before a later failure are live and are kept.
//!
//! # Re-probing after the switch-over ([`Reprobe`])
//!
//! The source's address moves to this host late (only once the target VM runs). Until
//! then every answer of the peer — to the window probe that leaving repair mode sends
//! at LOAD, and its ACKs for whatever the restored socket sends — goes to the frozen,
//! deaf source. Measured (`migrate_hosts`, packet capture at the peer): the restored
//! socket sends a congestion window of data the peer receives, hears nothing, and then
//! waits for its own loss probe / retransmission timeout, about 1 s after its last
//! transmission (a restored socket has no RTT estimate), however early the address
//! moved. So, once the guest runs, the helper takes every restored connection that
//! still has unacknowledged data and has heard nothing from the peer since LOAD
//! (`tcpi_segs_in` 0) briefly into repair mode and out again: leaving repair mode sends
//! a window probe (an old sequence number), which the peer answers with an ACK for all
//! it holds. Once the address has moved that ACK arrives, releases the congestion
//! window, and the stream goes on without any retransmission. Rounds follow a bounded
//! schedule ([`REPROBE_SCHEDULE`]); a connection leaves it as soon as it hears from the
//! peer. The peer answers such probes (out-of-window segments without data) at most
//! once per `tcp_invalid_ratelimit` (500 ms by default) per connection, so a move can
//! still cost up to about that much; probing more often than the schedule buys little.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_proto::frame::MAX_FDS;
use baton_proto::migration::TcpFlowRecord;
use baton_proto::repair::{FreezeCheck, ProgressMark, RepairMode};
use baton_proto::tcp::{SocketFamily, TcpConnState};
use baton_repair_ipc::{ClientError, RepairClient};
use tracing::{debug, error, info, warn};

use crate::flow::FlowId;
use crate::tcp::{tcp_info, TcpFlows};

/// What the dump at SAVE produced.
#[derive(Debug, Default)]
pub struct DumpOutcome {
    /// Kernel state of every socket the helper dumped (now deaf and in repair mode).
    pub states: HashMap<FlowId, TcpConnState>,
    /// Sockets the helper could not dump (left live by the helper).
    pub failed: usize,
    /// Sockets the helper may have left frozen without telling us their state (a
    /// request failed as a whole); thawed at once, best effort.
    pub unknown: usize,
    /// Flows whose connection is already over in the kernel (CLOSE: both FINs went
    /// through) while the guest still has data or our FIN to receive. Nothing can be
    /// dumped and nothing can reach them (a CLOSE socket is in no lookup table), so they
    /// need no freezing: they travel without kernel state, a same-host target takes the
    /// socket with its unread data, another host resets them towards the guest.
    pub closed: Vec<FlowId>,
    /// The flows of the requests that failed as a whole (counted in `unknown`).
    pub unknown_flows: Vec<FlowId>,
    /// Sockets not dumped at all, left live, because `stop` said so (see [`dump_all`]).
    pub not_dumped: usize,
}

/// SAVE: freeze every TCP socket of `tcp` through the helper and get its state. A
/// socket with a pre-dump of this very socket in `pre` ([`crate::predump`]) gets a
/// freeze check (its pre-dumped state, with the fresh timestamp clock and
/// `SO_PEEK_OFF`, if nothing moved since; else the full state); the others a dump.
/// The flows go to the client in slices, which it batches, keeping requests in flight.
/// A socket the helper refuses because its connection is already over in the kernel
/// (CLOSE) is told apart afterwards, so that live sockets cost no extra check.
///
/// `stop` is asked before each slice of [`DUMP_SLICE`] sockets: once it says so (a
/// target on this host came for the stream, which takes the live sockets), the rest is
/// left as it is — live, not dumped, counted in [`DumpOutcome::not_dumped`].
pub(crate) fn dump_all(
    tcp: &TcpFlows,
    helper: &mut RepairClient,
    pre: HashMap<FlowId, crate::predump::Entry>,
    stop: &dyn Fn() -> bool,
) -> DumpOutcome {
    dump_flows(tcp, helper, pre, None, stop)
}

/// How many sockets go to the helper between two looks at `stop` in [`dump_all`]: small
/// enough that a target arriving early saves most of the work, large enough that the
/// client keeps several requests in flight (each one drains at a slice's end).
const DUMP_SLICE: usize = 512;

/// After the helper died in the middle of SAVE's dump (`--migrate-drop-tcp`; without
/// it SAVE fails): `helper` is a fresh one. The sockets of the failed requests
/// (`outcome.unknown_flows`) may be deaf and in repair mode: thaw them (back to live)
/// and dump them again, so that they move like the others. What still fails stays
/// live (the thaw) and is counted in `outcome` as before.
pub(crate) fn redump_interrupted(
    tcp: &TcpFlows,
    helper: &mut RepairClient,
    outcome: &mut DumpOutcome,
) {
    let ids = std::mem::take(&mut outcome.unknown_flows);
    thaw_flows(tcp, helper, &ids, "of a dump the helper died in");
    let set: std::collections::HashSet<FlowId> = ids.iter().copied().collect();
    let again = dump_flows(tcp, helper, HashMap::new(), Some(&set), &|| false);
    info!(
        "the repair helper died during SAVE: {} TCP socket(s) of the interrupted dump thawed \
         and dumped again through a fresh baton-repair ({} dumped)",
        ids.len(),
        again.states.len()
    );
    outcome.unknown = again.unknown;
    outcome.unknown_flows = again.unknown_flows;
    outcome.failed += again.failed;
    outcome.closed.extend(again.closed);
    outcome.states.extend(again.states);
}

/// [`dump_all`] for the flows in `only` (all with `None`).
fn dump_flows(
    tcp: &TcpFlows,
    helper: &mut RepairClient,
    mut pre: HashMap<FlowId, crate::predump::Entry>,
    only: Option<&std::collections::HashSet<FlowId>>,
    stop: &dyn Fn() -> bool,
) -> DumpOutcome {
    let mut outcome = DumpOutcome::default();
    let mut flows = tcp.flow_sockets();
    if let Some(only) = only {
        flows.retain(|(id, _)| only.contains(id));
    }
    if flows.is_empty() {
        return outcome;
    }
    let started = Instant::now();
    let use_pre = helper.supports_pre_dump() && !pre.is_empty();
    let mut queued = 0usize;
    let mut unchanged = 0usize;
    let mut redumped = 0usize;
    let mut full = 0usize;
    for (at, slice) in flows.chunks(DUMP_SLICE).enumerate() {
        if stop() {
            outcome.not_dumped = flows.len() - at * DUMP_SLICE;
            break;
        }
        let mut checks: Vec<(FlowId, BorrowedFd<'_>, crate::predump::Entry)> = Vec::new();
        let mut plain: Vec<(FlowId, BorrowedFd<'_>)> = Vec::with_capacity(slice.len());
        for &(id, fd) in slice {
            let entry = if use_pre { pre.remove(&id) } else { None };
            match entry {
                Some(entry) if crate::tcp::socket_cookie(fd).is_ok_and(|c| c == entry.cookie) => {
                    checks.push((id, fd, entry))
                }
                // None, or another socket under a reused flow id.
                _ => plain.push((id, fd)),
            }
        }
        full += plain.len();
        if !checks.is_empty() {
            let items: Vec<(BorrowedFd<'_>, ProgressMark)> =
                checks.iter().map(|(_, fd, e)| (*fd, e.pre.mark)).collect();
            match helper.freeze_check(&items) {
                Ok(results) => {
                    for ((id, fd, entry), result) in checks.into_iter().zip(results) {
                        let state = match result {
                            Ok(FreezeCheck::Unchanged {
                                timestamp,
                                peek_off,
                            }) => {
                                unchanged += 1;
                                let mut state = entry.pre.state;
                                state.timestamp = timestamp;
                                state.sockopts.peek_off = peek_off;
                                Ok(state)
                            }
                            Ok(FreezeCheck::Dumped(state)) => {
                                redumped += 1;
                                Ok(state)
                            }
                            Err(err) => Err(err),
                        };
                        outcome.record(id, fd, state, &mut queued);
                    }
                }
                Err(err) => {
                    let fds: Vec<BorrowedFd<'_>> = checks.iter().map(|(_, fd, _)| *fd).collect();
                    let ids: Vec<FlowId> = checks.iter().map(|(id, _, _)| *id).collect();
                    outcome.whole_request_failed(helper, &fds, ids, &err);
                }
            }
        }
        if !plain.is_empty() {
            let fds: Vec<BorrowedFd<'_>> = plain.iter().map(|(_, fd)| *fd).collect();
            match helper.dump(&fds) {
                Ok(results) => {
                    for ((id, fd), result) in plain.into_iter().zip(results) {
                        outcome.record(id, fd, result, &mut queued);
                    }
                }
                Err(err) => {
                    let ids: Vec<FlowId> = plain.iter().map(|(id, _)| *id).collect();
                    outcome.whole_request_failed(helper, &fds, ids, &err)
                }
            }
        }
    }
    if !outcome.closed.is_empty() {
        info!(
            "device state SAVE: {} TCP connection(s) already closed at the host, with data \
             or a FIN still due to the guest: moved without kernel state",
            outcome.closed.len()
        );
    }
    let left_live = match outcome.not_dumped {
        0 => String::new(),
        n => format!("; {n} left live and not dumped: a target on this host came for them"),
    };
    info!(
        "device state SAVE: {} TCP socket(s) dumped through baton-repair in {:.1} ms \
         ({unchanged} unchanged since their pre-dump, {redumped} re-dumped, {} without a \
         pre-dump; {queued} queued bytes, {} failed{left_live})",
        outcome.states.len(),
        started.elapsed().as_secs_f64() * 1e3,
        full,
        outcome.failed + outcome.unknown,
    );
    outcome
}

impl DumpOutcome {
    /// The helper's answer for one socket.
    fn record(
        &mut self,
        id: FlowId,
        fd: BorrowedFd<'_>,
        result: Result<TcpConnState, baton_proto::repair::SocketError>,
        queued: &mut usize,
    ) {
        match result {
            Ok(state) => {
                *queued += state.send_queue.len() + state.recv_queue.len();
                self.states.insert(id, state);
            }
            // The helper left it live (as it was: nothing to freeze in a CLOSE socket).
            Err(_) if matches!(crate::tcp::socket_is_closed(fd), Ok(true)) => {
                self.closed.push(id);
            }
            Err(err) => {
                warn!("{id}: baton-repair could not dump the socket: {err}");
                self.failed += 1;
            }
        }
    }

    /// A request failed as a whole: some of `fds` may be frozen now; give them back
    /// live if the helper still answers (if it died, the engine thaws through a fresh
    /// one).
    fn whole_request_failed(
        &mut self,
        helper: &mut RepairClient,
        fds: &[BorrowedFd<'_>],
        ids: Vec<FlowId>,
        err: &ClientError,
    ) {
        error!(
            "baton-repair: dumping {} socket(s) failed: {err}",
            fds.len()
        );
        thaw_logged(helper, fds, "after a failed dump");
        self.unknown += fds.len();
        self.unknown_flows.extend(ids);
    }
}

/// Thaw `fds` through the helper (filter off, repair off), logging what fails.
pub fn thaw_logged(helper: &mut RepairClient, fds: &[BorrowedFd<'_>], why: &str) {
    if fds.is_empty() {
        return;
    }
    match helper.thaw(fds) {
        Ok(results) => {
            for result in results {
                if let Err(err) = result {
                    warn!("thawing a socket {why}: {err}");
                }
            }
        }
        Err(err) => error!("thawing {} socket(s) {why}: {err}", fds.len()),
    }
}

/// Thaw the sockets of `ids` through the helper (used when SAVE fails after the dump).
pub(crate) fn thaw_flows(tcp: &TcpFlows, helper: &mut RepairClient, ids: &[FlowId], why: &str) {
    // A set: a failed SAVE thaws every flow, and a scan of `ids` per socket made that
    // quadratic.
    let ids: std::collections::HashSet<FlowId> = ids.iter().copied().collect();
    let fds: Vec<BorrowedFd<'_>> = tcp
        .flow_sockets()
        .into_iter()
        .filter(|(id, _)| ids.contains(id))
        .map(|(_, fd)| fd)
        .collect();
    thaw_logged(helper, &fds, why);
}

/// The whole restore failed before anything was restored (LOAD may fail with it).
#[derive(Debug, thiserror::Error)]
#[error("restoring {flows} TCP connection(s) through baton-repair: {source}")]
pub struct RestoreFailed {
    pub flows: usize,
    #[source]
    pub source: ClientError,
}

/// What LOAD restored.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreOutcome {
    /// Connections restored and adopted.
    pub restored: usize,
    /// Connections left out (logged; the guest sees a RST for them).
    pub failed: usize,
}

/// LOAD from another host or namespace: restore every flow of `flows` that carries
/// kernel state into a fresh socket, and adopt it into `tcp`.
pub(crate) fn restore_all(
    tcp: &mut TcpFlows,
    helper: &mut RepairClient,
    flows: &[&TcpFlowRecord],
) -> Result<RestoreOutcome, RestoreFailed> {
    let started = Instant::now();
    let mut outcome = RestoreOutcome::default();
    let mut fresh: Vec<(&TcpFlowRecord, &TcpConnState, OwnedFd)> = Vec::with_capacity(flows.len());
    for record in flows {
        let Some(state) = &record.kernel else {
            warn!(
                "migration flow {}: no kernel state (the source could not dump it); reset",
                record.id.0
            );
            outcome.failed += 1;
            continue;
        };
        match fresh_socket(state.family) {
            Ok(socket) => fresh.push((record, state, socket)),
            Err(err) => {
                warn!("migration flow {}: {err}; reset", record.id.0);
                outcome.failed += 1;
            }
        }
    }
    // Which of `fresh` are restored and usable.
    let mut usable = vec![false; fresh.len()];
    let mut any_restored = false;
    for (chunk_index, chunk) in fresh.chunks(MAX_FDS).enumerate() {
        let items: Vec<(BorrowedFd<'_>, &TcpConnState)> =
            chunk.iter().map(|(_, s, fd)| (fd.as_fd(), *s)).collect();
        let results = match helper.restore(&items) {
            Ok(results) => results,
            Err(source) if !any_restored => {
                // Nothing is live yet: the fresh sockets close without a sound.
                return Err(RestoreFailed {
                    flows: fresh.len(),
                    source,
                });
            }
            Err(err) => {
                // Earlier batches are live connections now and stay; this one is lost.
                error!(
                    "baton-repair: restoring {} socket(s) failed: {err}; those connections \
                     are reset",
                    items.len()
                );
                outcome.failed += items.len();
                continue;
            }
        };
        any_restored = true;
        for (offset, ((record, state, socket), result)) in chunk.iter().zip(results).enumerate() {
            match result {
                Ok(report) => {
                    let complete = report.send_queue_written == state.send_queue.len() as u64
                        && !report.fin_pending;
                    if !complete {
                        error!(
                            "migration flow {}: only {} of {} send-queue bytes fit into the \
                             restored socket; the connection is dropped (reset towards the \
                             guest) rather than losing data",
                            record.id.0,
                            report.send_queue_written,
                            state.send_queue.len()
                        );
                        silence(helper, socket.as_fd());
                        outcome.failed += 1;
                        continue;
                    }
                    if state.sockopts.peek_off >= 0 {
                        // The peek model needs it; the helper sets it too, but only warns
                        // when it fails.
                        if let Err(err) = crate::tcp::set_peek_offset(
                            socket.as_fd(),
                            state.sockopts.peek_off.unsigned_abs(),
                        ) {
                            error!("migration flow {}: SO_PEEK_OFF: {err}; reset", record.id.0);
                            silence(helper, socket.as_fd());
                            outcome.failed += 1;
                            continue;
                        }
                    }
                    usable[chunk_index * MAX_FDS + offset] = true;
                }
                Err(err) => {
                    // The helper leaves a socket it failed on in repair mode: it closes
                    // silently.
                    warn!(
                        "migration flow {}: baton-repair could not restore it: {err}; reset",
                        record.id.0
                    );
                    outcome.failed += 1;
                }
            }
        }
    }
    // Unusable sockets close here: never restored, failed (repair mode) or silenced.
    let rebuilt: Vec<_> = fresh
        .into_iter()
        .zip(usable)
        .filter(|(_, usable)| *usable)
        .map(|((record, _, socket), _)| {
            (
                crate::tcp::conn::GuestSide::from(&record.guest_side),
                socket,
            )
        })
        .collect();
    let wanted = rebuilt.len();
    outcome.restored = tcp.adopt_restored(rebuilt, helper.share(), Instant::now());
    outcome.failed += wanted - outcome.restored;
    info!(
        "device state LOAD: {} TCP connection(s) restored through baton-repair in {:.1} ms \
         ({} failed)",
        outcome.restored,
        started.elapsed().as_secs_f64() * 1e3,
        outcome.failed
    );
    Ok(outcome)
}

/// A restored, live socket that will not be used: back into repair mode so that
/// closing it sends nothing; if even that fails, close it with a RST (honest, if the
/// connection cannot go on).
fn silence(helper: &mut RepairClient, socket: BorrowedFd<'_>) {
    let quiet = helper
        .set_repair(&[socket], RepairMode::On)
        .ok()
        .and_then(|mut results| results.pop())
        .is_some_and(|result| result.is_ok());
    if !quiet {
        warn!("a restored socket could not re-enter repair mode; it is closed with a RST");
        if let Err(err) = crate::tcp::set_reset_on_close(socket) {
            warn!("SO_LINGER on a restored socket: {err}");
        }
    }
}

/// When the re-probe rounds run, counted from the first round of events after LOAD
/// (the guest runs): dense at first (the address usually moves within a few hundred
/// milliseconds, e.g. when QEMU announces the guest), then every 250 ms up to 3 s.
/// Beyond that the kernel's own timers (retransmission timeout and its backoff) are no
/// worse than what a probe could do.
pub const REPROBE_SCHEDULE: [Duration; 20] = {
    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    [
        ms(0),
        ms(20),
        ms(50),
        ms(100),
        ms(200),
        ms(300),
        ms(400),
        ms(500),
        ms(600),
        ms(700),
        ms(850),
        ms(1000),
        ms(1250),
        ms(1500),
        ms(1750),
        ms(2000),
        ms(2250),
        ms(2500),
        ms(2750),
        ms(3000),
    ]
};

/// Connections restored at LOAD that have not heard from their peer yet, re-probed
/// through the helper on [`REPROBE_SCHEDULE`] (see the module documentation).
#[derive(Debug)]
pub(crate) struct Reprobe {
    /// A handle on the helper connection that restored them.
    helper: RepairClient,
    /// The connections still watched.
    flows: Vec<FlowId>,
    /// When the first round ran (the guest runs); `None` before it.
    started: Option<Instant>,
    /// The index in [`REPROBE_SCHEDULE`] of the next round.
    round: usize,
    /// Probes sent, for the final log line.
    probes: usize,
    /// Where the next round starts among the connections to probe, when there are more
    /// than [`MAX_PROBES_PER_ROUND`].
    turn: usize,
}

/// At most this many probes per round (four helper requests of [`MAX_FDS`] sockets, two
/// exchanges each): a round runs on the device's worker thread, which serves the guest
/// meanwhile, so with thousands of restored connections waiting they take turns.
const MAX_PROBES_PER_ROUND: usize = 4 * MAX_FDS;

/// What a round found for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeNeed {
    /// Unacknowledged data and not a segment from the peer since LOAD: probe.
    Probe,
    /// Nothing in flight now (it may send later): keep watching, no probe this round.
    Wait,
    /// The peer reaches this host, or the socket is gone or not established: done.
    Done,
}

/// Linux's `TCP_ESTABLISHED` (`include/net/tcp_states.h`): a window probe is sent only
/// in this state.
const TCP_STATE_ESTABLISHED: u8 = 1;

fn probe_need(fd: BorrowedFd<'_>) -> ProbeNeed {
    match tcp_info(fd) {
        Ok(info) if info.tcpi_state != TCP_STATE_ESTABLISHED => ProbeNeed::Done,
        Ok(info) if info.tcpi_segs_in > 0 => ProbeNeed::Done,
        Ok(info) if info.tcpi_unacked > 0 => ProbeNeed::Probe,
        Ok(_) => ProbeNeed::Wait,
        Err(err) => {
            debug!("TCP_INFO of a restored socket: {err}; no more re-probes for it");
            ProbeNeed::Done
        }
    }
}

impl Reprobe {
    pub(crate) fn new(helper: RepairClient, flows: Vec<FlowId>) -> Self {
        Reprobe {
            helper,
            flows,
            started: None,
            round: 0,
            probes: 0,
            turn: 0,
        }
    }

    /// When the next round is due (`None`: the schedule is over, drop it). Before the
    /// first round: now.
    pub(crate) fn next_round(&self, now: Instant) -> Option<Instant> {
        if self.flows.is_empty() {
            return None;
        }
        match self.started {
            None => Some(now),
            Some(started) => REPROBE_SCHEDULE
                .get(self.round)
                .map(|offset| started + *offset),
        }
    }

    /// Run the round that is due at `now`, if any: probe every watched connection
    /// (`socket` finds its socket) that still needs it, forget those that are done.
    /// Returns whether the schedule goes on.
    pub(crate) fn run_due<'a>(
        &mut self,
        now: Instant,
        socket: impl Fn(FlowId) -> Option<BorrowedFd<'a>>,
    ) -> bool {
        let Some(due) = self.next_round(now) else {
            return false;
        };
        if due > now {
            return true;
        }
        let started = *self.started.get_or_insert(now);
        // Skip rounds that are already past (a late wake-up): one probe now does.
        while REPROBE_SCHEDULE
            .get(self.round)
            .is_some_and(|offset| started + *offset <= now)
        {
            self.round += 1;
        }
        let mut probe = Vec::new();
        self.flows.retain(|id| {
            let Some(fd) = socket(*id) else {
                return false;
            };
            match probe_need(fd) {
                ProbeNeed::Probe => {
                    probe.push(fd);
                    true
                }
                ProbeNeed::Wait => true,
                ProbeNeed::Done => false,
            }
        });
        if probe.len() > MAX_PROBES_PER_ROUND {
            // Take turns: this round's share starts where the last one stopped.
            let start = self.turn % probe.len();
            probe.rotate_left(start);
            probe.truncate(MAX_PROBES_PER_ROUND);
            self.turn = start + MAX_PROBES_PER_ROUND;
        }
        if !probe.is_empty() {
            self.probe(&probe);
        }
        let more = self.next_round(now).is_some();
        if !more {
            info!(
                "restored TCP connections: re-probing over after {} probe(s); {} connection(s) \
                 never heard from their peer",
                self.probes,
                self.flows.len()
            );
        }
        more
    }

    /// Repair mode on and off again for each of `sockets` (in batches): the second step
    /// sends the window probe. Both run back to back on this thread, so nothing else
    /// uses a socket while it is in repair mode (a send there would fail with EINVAL).
    fn probe(&mut self, sockets: &[BorrowedFd<'_>]) {
        let into_repair = match self.helper.set_repair(sockets, RepairMode::On) {
            Ok(results) => results,
            Err(err) => {
                warn!(
                    "re-probing {} restored TCP connection(s): {err}",
                    sockets.len()
                );
                // The helper failed as a whole (maybe half-way): make sure none is left
                // in repair mode.
                self.leave_repair(sockets);
                self.flows.clear();
                return;
            }
        };
        let entered: Vec<BorrowedFd<'_>> = sockets
            .iter()
            .zip(&into_repair)
            .filter(|(_, result)| result.is_ok())
            .map(|(fd, _)| *fd)
            .collect();
        if let Some(Err(err)) = into_repair.iter().find(|r| r.is_err()) {
            debug!(
                "re-probe: {} restored socket(s) could not enter repair mode (first: {err})",
                sockets.len() - entered.len()
            );
        }
        self.probes += entered.len();
        self.leave_repair(&entered);
        debug!("re-probed {} restored TCP connection(s)", entered.len());
    }

    /// Repair mode off, with the window probe. A socket left in repair mode could not
    /// carry data any more: say so loudly.
    fn leave_repair(&mut self, sockets: &[BorrowedFd<'_>]) {
        if sockets.is_empty() {
            return;
        }
        match self.helper.set_repair(sockets, RepairMode::Off) {
            Ok(results) => {
                for (fd, result) in sockets.iter().zip(results) {
                    if let Err(err) = result {
                        error!(
                            "re-probe: restored socket {} stays in repair mode: {err}; its \
                             connection will fail",
                            fd.as_raw_fd()
                        );
                    }
                }
            }
            Err(err) => error!(
                "re-probe: taking {} restored socket(s) out of repair mode failed: {err}; \
                 their connections will fail",
                sockets.len()
            ),
        }
    }
}

/// A fresh non-blocking TCP socket of `family` that may bind an address this host does
/// not have yet (the source's address moves late, after the target VM runs).
pub fn fresh_socket(family: SocketFamily) -> io::Result<OwnedFd> {
    let (domain, level, freebind) = match family {
        SocketFamily::Inet => (libc::AF_INET, libc::IPPROTO_IP, libc::IP_FREEBIND),
        SocketFamily::Inet6 => (libc::AF_INET6, libc::IPPROTO_IPV6, libc::IPV6_FREEBIND),
    };
    // SAFETY: socket() takes no pointers; a valid descriptor is owned from here on.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("socket for a restore: {err}"),
        ));
    }
    // SAFETY: `raw` was just returned by socket() and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    crate::tcp::set_int_option(socket.as_fd(), level, freebind, 1)
        .map_err(|err| io::Error::new(err.kind(), format!("IP_FREEBIND: {err}")))?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_reprobe_schedule_is_increasing_and_bounded() {
        assert_eq!(
            REPROBE_SCHEDULE[0],
            Duration::ZERO,
            "the first round at once"
        );
        assert!(REPROBE_SCHEDULE.windows(2).all(|w| w[0] < w[1]));
        let last = REPROBE_SCHEDULE[REPROBE_SCHEDULE.len() - 1];
        assert!(last <= Duration::from_secs(3), "{last:?}");
    }

    /// A connection that heard from its peer, or a socket that is not connected, is done
    /// with re-probing.
    #[test]
    fn connections_that_heard_from_their_peer_or_are_not_connected_are_not_probed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut theirs, _) = listener.accept().unwrap();
        // Our end heard the SYN-ACK already; with data both ways it surely heard more.
        ours.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        theirs.read_exact(&mut buf).unwrap();
        theirs.write_all(b"pong").unwrap();
        ours.read_exact(&mut buf).unwrap();
        assert_eq!(probe_need(ours.as_fd()), ProbeNeed::Done);
        let fresh = fresh_socket(SocketFamily::Inet).unwrap();
        assert_eq!(
            probe_need(fresh.as_fd()),
            ProbeNeed::Done,
            "not established"
        );
        let info = tcp_info(ours.as_fd()).unwrap();
        assert!(info.tcpi_segs_in > 0 && info.tcpi_unacked == 0);
    }

    #[test]
    fn fresh_sockets_bind_addresses_this_host_does_not_have() {
        for (family, addr) in [
            (SocketFamily::Inet, "192.0.2.77:4000"),
            (SocketFamily::Inet6, "[2001:db8::77]:4000"),
        ] {
            let socket = fresh_socket(family).unwrap();
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            let sock = nix::sys::socket::SockaddrStorage::from(addr);
            nix::sys::socket::bind(socket.as_raw_fd(), &sock)
                .unwrap_or_else(|e| panic!("bind {addr} with freebind: {e}"));
        }
    }
}
