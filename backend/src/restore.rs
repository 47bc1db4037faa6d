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

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Instant;

use baton_proto::frame::MAX_FDS;
use baton_proto::migration::TcpFlowRecord;
use baton_proto::repair::RepairMode;
use baton_proto::tcp::{SocketFamily, TcpConnState};
use baton_repair_ipc::{ClientError, RepairClient};
use tracing::{error, info, warn};

use crate::flow::FlowId;
use crate::tcp::TcpFlows;

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
}

/// SAVE: dump every TCP socket of `tcp` through the helper, in requests of at most
/// [`MAX_FDS`] sockets (the client splits further by queue bytes).
pub(crate) fn dump_all(tcp: &TcpFlows, helper: &mut RepairClient) -> DumpOutcome {
    let mut outcome = DumpOutcome::default();
    let flows: Vec<_> = tcp
        .flow_sockets()
        .into_iter()
        .filter(|(id, fd)| match crate::tcp::socket_is_closed(*fd) {
            Ok(true) => {
                outcome.closed.push(*id);
                false
            }
            Ok(false) => true,
            // Let the helper find out and say what is wrong.
            Err(_) => true,
        })
        .collect();
    if !outcome.closed.is_empty() {
        info!(
            "device state SAVE: {} TCP connection(s) already closed at the host, with data              or a FIN still due to the guest: moved without kernel state",
            outcome.closed.len()
        );
    }
    if flows.is_empty() {
        return outcome;
    }
    let started = Instant::now();
    let mut queued = 0usize;
    for chunk in flows.chunks(MAX_FDS) {
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| *fd).collect();
        match helper.dump(&fds) {
            Ok(results) => {
                for ((id, _), result) in chunk.iter().zip(results) {
                    match result {
                        Ok(state) => {
                            queued += state.send_queue.len() + state.recv_queue.len();
                            outcome.states.insert(*id, state);
                        }
                        Err(err) => {
                            warn!("{id}: baton-repair could not dump the socket: {err}");
                            outcome.failed += 1;
                        }
                    }
                }
            }
            Err(err) => {
                error!(
                    "baton-repair: dumping {} socket(s) failed: {err}",
                    fds.len()
                );
                // Some of them may be frozen now: give them back live if the helper
                // still answers.
                thaw_logged(helper, &fds, "after a failed dump");
                outcome.unknown += fds.len();
            }
        }
    }
    info!(
        "device state SAVE: {} TCP socket(s) dumped through baton-repair in {:.1} ms \
         ({queued} queued bytes, {} failed)",
        outcome.states.len(),
        started.elapsed().as_secs_f64() * 1e3,
        outcome.failed + outcome.unknown
    );
    outcome
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
    outcome.restored = tcp.adopt(rebuilt, Instant::now());
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
    use std::os::fd::AsRawFd;

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
