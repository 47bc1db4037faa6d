//! vhost-user device-state migration: `SET_DEVICE_STATE_FD` and `CHECK_DEVICE_STATE`.
//!
//! # Theory of operation
//!
//! QEMU drives the transfer (see `reference/rust-vmm.md` §1.6, §4.2–4.4):
//!
//! ```text
//!  source:  … GET_VRING_BASE ×2 ─ SET_DEVICE_STATE_FD(SAVE, fd) ─ QEMU reads fd to EOF ─ CHECK
//!                                   └─ save thread: engine.save_state → stream → fd, close
//!  target:  init ─ SET_DEVICE_STATE_FD(LOAD, fd) ─ QEMU writes, closes ─ CHECK ─ … rings start
//!                                   └─ load thread: read fd to EOF, validate all, engine.load_state
//! ```
//!
//! * `SET_DEVICE_STATE_FD` returns at once ([`DeviceStateTransfer::start`]): the transfer
//!   runs on its own thread, because QEMU only reads the pipe after the reply and a pipe
//!   holds 64 KiB. `CHECK_DEVICE_STATE` ([`DeviceStateTransfer::check`]) joins the thread
//!   and returns its result. QEMU drops the reason of a failure, so it is logged here,
//!   with context, before the bare error goes back.
//! * Only the STOPPED phase exists; anything else is refused. (The vhost crate already
//!   refuses unknown phase numbers itself, dropping the connection, so this only matters
//!   when the crate learns a new phase.) One transfer at a time: a new request while the
//!   previous thread still runs is refused; a finished but unchecked one is reaped and its
//!   result logged.
//! * SAVE: `LOG_ALL` acknowledged means a migration ([`SaveMode::Migration`]: every TCP
//!   connection is dumped through the helper *and* its own socket (no duplicate: one
//!   descriptor per connection) offered for a same-host handover, [`save_tcp_flows`]);
//!   without it, a snapshot
//!   (`savevm`, [`SaveMode::Snapshot`]): the source VM carries on, connections are neither
//!   frozen nor moved, and the stream's header says so
//!   ([`baton_proto::migration::HEADER_FLAG_SNAPSHOT`]). The engine lock is held only
//!   while the engine produces its [`EngineState`], not while the stream is written.
//! * LOAD: the whole stream is read and validated ([`baton_proto::migration::read_stream`])
//!   and checked against this device (feature bits) before the engine sees any of it; a
//!   bad stream fails CHECK and changes nothing. The engine applies the state when it gets
//!   it — nothing here touches guest memory, which QEMU has not even sent yet: guest-facing
//!   actions wait until the rings start.
//!
//! * LOAD, TCP ([`load_tcp_flows`]): the stream's [`SourceRecord`] (boot id, network
//!   namespace cookie) says whether the source ran in this very namespace: then the live
//!   sockets are taken over ([`crate::handover`]) and the dumped states ignored — the
//!   exchange starts as soon as the SOURCE record is read ([`EarlyTakeOver`]), so the
//!   sockets travel while the rest of the stream arrives, and the dumped states are
//!   dropped as they are read; ownership moves only after the whole stream validated;
//!   otherwise the states are restored through the helper ([`crate::restore`]). Without
//!   a helper, or when nothing could be restored, LOAD fails (the source resumes with
//!   everything) unless `--migrate-drop-tcp`.
//!
//! # The engine's part
//!
//! The device knows the network side only as `dyn NetworkEngine`. The trait's provided
//! methods [`crate::vu::NetworkEngine::save_state`] / `load_state` exchange an
//! [`EngineState`] (the stream's records other than the device's feature bits). Their
//! default implementations ([`default_save_state`], [`default_load_state`]) serve
//! [`GuestNet`] (implemented below, in its own impl block) and refuse any other engine
//! with [`EngineStateError::Unsupported`]; a test double can override them.
//!
//! Wire and live types stay apart: [`GuestRecord`] ↔ [`ObservedGuest`] and the forwarding
//! tables → [`ForwardsRecord`] convert explicitly here.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use baton_proto::migration::{
    read_stream_observed, DeviceRecord, ForwardRuleRecord, ForwardsRecord, GuestRecord, IpAddress,
    KernelStates, Limits, NetnsIdentity, ReadObserver, SourceRecord, StreamError, StreamWriter,
    TcpFlowRecord, UdpFlowRecord, HEADER_FLAG_SNAPSHOT, MAX_FORWARD_RULES, MAX_HOSTNAME,
};
use tracing::{error, info, warn};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostTransferStatePhase};

use crate::flow::FlowId;
use crate::handover::{
    take_over, ExpectedSocket, HandoverError, HandoverOffer, TakeOver, OFFER_LIFETIME,
};
use crate::net::{GuestNet, ObservedGuest};
use crate::ports::PortForwards;
use crate::tcp::{Env as TcpEnv, TcpFlows};
use crate::vu::device::OFFERED_FEATURES;
use crate::vu::NetworkEngine;

/// Why a SAVE happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMode {
    /// `LOG_ALL` was acknowledged: a live migration. TCP connections are frozen and
    /// their state (or the sockets themselves) moves to the target.
    Migration,
    /// No `LOG_ALL`: a snapshot. The source VM continues; TCP connections are neither
    /// frozen nor moved, and no kernel TCP state goes into the stream.
    Snapshot,
}

/// The network engine's part of the device state: everything in the stream except the
/// device's feature bits.
#[derive(Debug, Default)]
pub struct EngineState {
    /// The MAC baton uses towards the guest.
    pub our_mac: [u8; 6],
    /// The MTU advertised to the guest.
    pub mtu: u16,
    /// Where the source runs (host, namespace, handover socket).
    pub source: SourceRecord,
    pub guest: GuestRecord,
    pub forwards: Option<ForwardsRecord>,
    pub tcp_flows: Vec<TcpFlowRecord>,
    pub udp_flows: Vec<UdpFlowRecord>,
    /// SAVE only: sockets were left in repair mode by the helper's dump (they leave it
    /// through that helper when they go to a target or thaw).
    pub repaired: bool,
    /// LOAD only: the handover of the live sockets, started while the stream was read
    /// because its SOURCE record named this namespace ([`EarlyTakeOver`]); the TCP
    /// records then carry no kernel state.
    pub take_over: Option<TakeOver>,
}

/// The engine cannot produce or take a state.
#[derive(Debug, thiserror::Error)]
pub enum EngineStateError {
    #[error("this network engine does not support migration")]
    Unsupported,
    #[error("offering the TCP connections for a handover: {0}")]
    Offer(#[source] HandoverError),
    #[error("writing the stream's first records: {0}")]
    Prefix(#[source] io::Error),
    #[error(
        "taking over {flows} TCP connection(s) from the source failed \
         (use --migrate-drop-tcp to migrate without them): {source}"
    )]
    Handover {
        flows: usize,
        #[source]
        source: HandoverError,
    },
    #[error(
        "{0} TCP connection(s) could not be frozen for the migration (the source keeps \
         them all; use --migrate-drop-tcp to migrate without them)"
    )]
    CannotFreeze(usize),
    #[error(
        "the stream carries {0} TCP connection(s) without kernel state (the source had no \
         baton-repair) and the source's handover socket is not reachable from here \
         (another host or network namespace); use --migrate-drop-tcp to migrate without them"
    )]
    NoHandover(usize),
    #[error(
        "{0} TCP connection(s) could not be dumped through baton-repair (the source keeps \
         them all; use --migrate-drop-tcp to migrate without them)"
    )]
    CannotDump(usize),
    #[error(
        "the stream carries {0} TCP connection(s) from another host or network namespace, \
         but no baton-repair helper is connected here to restore them (start baton with \
         --helper, or use --migrate-drop-tcp to migrate without them)"
    )]
    NoHelper(usize),
    #[error("{0} (use --migrate-drop-tcp to migrate without them)")]
    Restore(#[source] crate::restore::RestoreFailed),
}

/// A device-state transfer failed (the message is what baton logs; QEMU only learns
/// "failed").
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("migration phase {0:?} is not supported (only STOPPED)")]
    Phase(VhostTransferStatePhase),
    #[error("a {0} transfer is still running (no CHECK_DEVICE_STATE for it yet)")]
    Busy(Direction),
    #[error("CHECK_DEVICE_STATE without a transfer (no SET_DEVICE_STATE_FD before it)")]
    NoTransfer,
    #[error("starting the transfer thread: {0}")]
    Spawn(io::Error),
    #[error("the transfer thread panicked")]
    Panicked,
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("writing the stream: {0}")]
    Write(io::Error),
    #[error("network engine: {0}")]
    Engine(#[from] EngineStateError),
    #[error("the source device used feature bits {0:#x} this backend does not offer")]
    Features(u64),
}

/// Direction of a transfer, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Save,
    Load,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Save => "SAVE",
            Direction::Load => "LOAD",
        })
    }
}

/// What the transfer thread needs from the device.
pub struct DeviceSide {
    pub engine: Arc<Mutex<dyn NetworkEngine>>,
    /// Features the frontend acknowledged last.
    pub acked_features: u64,
    /// `LOG_ALL` is acknowledged (a migration, not a snapshot).
    pub logging: bool,
}

struct Running {
    direction: Direction,
    thread: JoinHandle<Result<(), TransferError>>,
}

/// The device-state transfer of one vhost-user connection: at most one thread, started
/// by `SET_DEVICE_STATE_FD` and joined by `CHECK_DEVICE_STATE`.
///
/// Locking: `running` is only taken by the vhost-user protocol thread, briefly.
#[derive(Default)]
pub struct DeviceStateTransfer {
    running: Mutex<Option<Running>>,
}

impl DeviceStateTransfer {
    /// `SET_DEVICE_STATE_FD`: start the transfer on its own thread and return at once.
    pub fn start(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
        device: DeviceSide,
    ) -> io::Result<()> {
        let direction = match direction {
            VhostTransferStateDirection::SAVE => Direction::Save,
            VhostTransferStateDirection::LOAD => Direction::Load,
        };
        self.try_start(direction, phase, file, device)
            .map_err(|err| {
                error!("device state {direction}: refused: {err}");
                io::Error::other(err)
            })
    }

    fn try_start(
        &self,
        direction: Direction,
        phase: VhostTransferStatePhase,
        file: File,
        device: DeviceSide,
    ) -> Result<(), TransferError> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(TransferError::Phase(phase));
        }
        let mut running = lock(&self.running);
        if let Some(previous) = running.take() {
            if !previous.thread.is_finished() {
                let busy = previous.direction;
                *running = Some(previous);
                return Err(TransferError::Busy(busy));
            }
            // QEMU gave up on it (a cancelled migration): log what became of it.
            match join(previous.thread) {
                Ok(()) => info!(
                    "earlier device state {} was never checked; it had succeeded",
                    previous.direction
                ),
                Err(err) => warn!(
                    "earlier device state {} was never checked; it had failed: {err}",
                    previous.direction
                ),
            }
        }
        let mode = if device.logging {
            SaveMode::Migration
        } else {
            SaveMode::Snapshot
        };
        match direction {
            Direction::Save => info!("device state SAVE started ({mode:?})"),
            Direction::Load => info!("device state LOAD started"),
        }
        let thread = std::thread::Builder::new()
            .name(format!("baton-{}", direction.to_string().to_lowercase()))
            .spawn(move || match direction {
                Direction::Save => save(file, &device, mode),
                Direction::Load => load(file, &device),
            })
            .map_err(TransferError::Spawn)?;
        *running = Some(Running { direction, thread });
        Ok(())
    }

    /// `CHECK_DEVICE_STATE`: wait for the transfer and return its result, logging the
    /// reason of a failure (QEMU drops it).
    pub fn check(&self) -> io::Result<()> {
        let Some(running) = lock(&self.running).take() else {
            let err = TransferError::NoTransfer;
            error!("device state check failed: {err}");
            return Err(io::Error::other(err));
        };
        let direction = running.direction;
        match join(running.thread) {
            Ok(()) => {
                info!("device state {direction}: done");
                Ok(())
            }
            Err(err) => {
                error!("device state {direction} failed: {err}");
                Err(io::Error::other(err))
            }
        }
    }
}

fn join(thread: JoinHandle<Result<(), TransferError>>) -> Result<(), TransferError> {
    thread.join().unwrap_or(Err(TransferError::Panicked))
}

/// A duration in milliseconds, for the timing logs.
fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Lock, carrying on if a panicking thread poisoned the mutex (as the device does).
fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What [`widen_pipe`] asks for: the default `fs.pipe-max-size`, which an unprivileged
/// process may use.
const PIPE_BYTES: libc::c_int = 1 << 20;
/// The smallest pipe (a page), for the stream's prefix (see [`save`]).
const PIPE_PREFIX_BYTES: libc::c_int = 4096;

/// QEMU passes the stream through a pipe, which holds 64 KiB by default: tens of
/// megabytes (10,000 connections with 4 KiB queued each) then cost a wake-up of each
/// side every 64 KiB. A pipe of 1 MiB lets both sides work in larger steps.
fn widen_pipe(fd: std::os::fd::RawFd) {
    set_pipe_size(fd, PIPE_BYTES);
}

/// Best effort: a descriptor that is not a pipe, or a lower system limit, keeps its
/// size (only speed depends on it).
fn set_pipe_size(fd: std::os::fd::RawFd, bytes: libc::c_int) {
    if let Err(err) = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(bytes)) {
        tracing::debug!("device state: pipe size left as it is, not {bytes} ({err})");
    }
}

/// Padding after the stream's prefix: more than QEMU's migration buffer (32 KiB) after
/// the chunk that holds the prefix, so that QEMU sends that chunk on to the target at
/// once (see [`save`]).
const PREFIX_PADDING: u32 = 40 << 10;

/// The SAVE thread: snapshot the engine, write the stream, close the fd (EOF for QEMU).
///
/// The stream's prefix (Device, Source, Guest, Forwards) goes out first, before the
/// engine freezes anything: a target on this host reads the Source record, connects to
/// the handover offer named there and so tells the engine, while it is still freezing,
/// that the sockets move live — no dump needed ([`HandoverOffer::target_waiting`]).
///
/// Getting the prefix to the target takes care with QEMU in between (QEMU 10,
/// `vhost_save_backend_state` / `vhost_load_backend_state`): the source QEMU reads the
/// pipe in chunks of whatever it holds (at most 1 MiB) and puts each into its migration
/// stream, which it sends 32 KiB at a time, when its buffer is full; the target QEMU
/// passes a chunk on only once all of it arrived. So the chunk holding the prefix must
/// be small and followed by more than 32 KiB: with offered connections, the pipe is cut
/// to one page while the prefix and [`PREFIX_PADDING`] go through it (QEMU reads at
/// most a page per chunk then), and widened to 1 MiB for the rest.
fn save(file: File, device: &DeviceSide, mode: SaveMode) -> Result<(), TransferError> {
    let fd = file.as_raw_fd();
    let started = std::time::Instant::now();
    let flags = if mode == SaveMode::Snapshot {
        HEADER_FLAG_SNAPSHOT
    } else {
        0
    };
    let mut writer = StreamWriter::new(BufWriter::with_capacity(1 << 16, file), flags)?;
    let acked_features = device.acked_features;
    let mut prefix_done = None;
    let mut write_prefix = |state: &EngineState| -> io::Result<()> {
        let device = DeviceRecord {
            acked_features,
            our_mac: state.our_mac,
            mtu: state.mtu,
        };
        writer
            .write_prefix(
                &device,
                &state.source,
                &state.guest,
                state.forwards.as_ref(),
            )
            .map_err(io::Error::other)?;
        if state.source.handover.is_some() {
            set_pipe_size(fd, PIPE_PREFIX_BYTES);
            writer
                .write_padding(PREFIX_PADDING)
                .and_then(|()| writer.flush())
                .map_err(io::Error::other)?;
            prefix_done = Some(started.elapsed());
        }
        widen_pipe(fd);
        Ok(())
    };
    // The guard is dropped at the end of this statement: writing the flows does not
    // hold the lock.
    let engine = lock(&device.engine).save_state(mode, &mut write_prefix)?;
    let engine_done = started.elapsed();
    for flow in &engine.tcp_flows {
        writer.write_tcp_flow(flow)?;
    }
    for flow in &engine.udp_flows {
        writer.write_udp_flow(flow)?;
    }
    writer.finish()?;
    info!(
        snapshot = mode == SaveMode::Snapshot,
        tcp_flows = engine.tcp_flows.len(),
        udp_flows = engine.udp_flows.len(),
        "device state saved (prefix out after {:.1} ms, engine {:.1} ms, stream {:.1} ms)",
        ms(prefix_done.unwrap_or_default()),
        ms(engine_done),
        ms(started.elapsed() - engine_done)
    );
    Ok(())
    // The writer (and the fd) closes here.
}

/// Starts the same-host handover as soon as the stream's SOURCE record shows that the
/// source runs in this network namespace, so that the sockets travel (and are inspected)
/// while the rest of the stream is still being read; the kernel states in the stream,
/// which a handover does not use, are then dropped as they are read. Nothing is taken
/// before the whole stream is valid ([`TakeOver`]); if it is not, dropping the handover
/// refuses it and the source keeps everything.
#[derive(Default)]
struct EarlyTakeOver {
    started: Option<TakeOver>,
}

impl ReadObserver for EarlyTakeOver {
    fn source(&mut self, source: &SourceRecord) -> KernelStates {
        let Some(endpoint) = &source.handover else {
            return KernelStates::Keep;
        };
        if placement(source, &local_source_record()) != Placement::SameNamespace {
            return KernelStates::Keep;
        }
        match TakeOver::start(endpoint) {
            Ok(started) => {
                self.started = Some(started);
                KernelStates::Drop
            }
            Err(err) => {
                // The TCP part tries once more after the stream, and fails with this.
                warn!("device state LOAD: cannot start the TCP handover early: {err}");
                KernelStates::Keep
            }
        }
    }
}

/// The LOAD thread: read and validate everything, check it fits this device, then hand
/// it to the engine.
fn load(file: File, device: &DeviceSide) -> Result<(), TransferError> {
    widen_pipe(file.as_raw_fd());
    let started = std::time::Instant::now();
    let mut early = EarlyTakeOver::default();
    let state = read_stream_observed(file, &Limits::DEFAULT, &mut early)?;
    let read = started.elapsed();
    let foreign = state.device.acked_features & !OFFERED_FEATURES;
    if foreign != 0 {
        return Err(TransferError::Features(foreign));
    }
    for skipped in &state.skipped {
        warn!(
            "device state LOAD: skipped record #{} of unknown type {:#06x} ({} bytes)",
            skipped.index, skipped.record_type, skipped.len
        );
    }
    let engine_state = EngineState {
        our_mac: state.device.our_mac,
        mtu: state.device.mtu,
        source: state.source,
        guest: state.guest,
        forwards: state.forwards,
        tcp_flows: state.tcp_flows,
        udp_flows: state.udp_flows,
        repaired: false,
        take_over: early.started.take(),
    };
    lock(&device.engine).load_state(engine_state)?;
    info!(
        "device state LOAD: stream read and validated in {:.1} ms, engine state applied \
         in {:.1} ms",
        ms(read),
        ms(started.elapsed() - read)
    );
    info!(
        snapshot = state.snapshot,
        acked_features = format_args!("{:#x}", state.device.acked_features),
        "device state loaded"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The engine side
// ---------------------------------------------------------------------------------------

impl GuestNet {
    /// The engine's part of the device state. In a migration every TCP connection is
    /// frozen and offered for a same-host handover ([`freeze_and_offer_tcp_flows`]); a
    /// snapshot leaves them alone. UDP flows are carried in both (they hold no kernel
    /// state worth freezing: the record keeps the source port and the idle time left).
    pub fn save_engine_state(
        &mut self,
        mode: SaveMode,
        prefix: &mut dyn FnMut(&EngineState) -> io::Result<()>,
    ) -> Result<EngineState, EngineStateError> {
        let config = self.config().clone();
        let forwards = forwards_record(&config.tcp_forwards, &config.udp_forwards);
        if forwards.is_none() {
            warn!("device state SAVE: more than {MAX_FORWARD_RULES} forward rules; not recorded");
        }
        let mut state = EngineState {
            our_mac: config.our_mac,
            mtu: config.mtu,
            source: local_source_record(),
            guest: GuestRecord::from(*self.observed()),
            forwards,
            ..EngineState::default()
        };
        // The offer listens before anything is frozen, so that its endpoint is in the
        // prefix and a target on this host can come while the sockets are frozen.
        let offer = if mode == SaveMode::Migration && self.tcp_and_repair().0.len() > 0 {
            let offer = HandoverOffer::listen(OFFER_LIFETIME).map_err(EngineStateError::Offer)?;
            state.source.handover = Some(offer.endpoint().clone());
            Some(offer)
        } else {
            None
        };
        prefix(&state).map_err(EngineStateError::Prefix)?;
        if let Some(offer) = offer {
            let drop = self.drop_unmigratable_tcp();
            let pre_dumps = self.take_pre_dumps();
            let mut dump = {
                let (tcp, _env, repair) = self.tcp_and_repair();
                let stop = || offer.target_waiting();
                repair.map(|helper| crate::restore::dump_all(tcp, helper, pre_dumps, &stop))
            };
            if let Some(dump) = dump
                .as_mut()
                .filter(|d| drop && !d.unknown_flows.is_empty())
            {
                self.redump_after_helper_died(dump);
            }
            let (tcp, env, repair) = self.tcp_and_held_repair();
            let saved = save_tcp_flows(tcp, &env, repair, offer, drop, dump)?;
            state.tcp_flows = saved.records;
            state.repaired = saved.repaired;
        }
        // Flow ids are unique across TCP and UDP in one stream.
        let first_udp_id = state
            .tcp_flows
            .iter()
            .map(|r| r.id.0)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        state.udp_flows = self
            .udp_parts()
            .0
            .save_records(std::time::Instant::now(), first_udp_id);
        Ok(state)
    }

    /// Adopt a validated state. Differences in configuration are logged, not fatal: the
    /// target's own command line decides its MAC, MTU and forwards (as passt does).
    ///
    /// TCP connections come first ([`load_tcp_flows`]: taken over from a source in this
    /// namespace, or restored through the helper from a source elsewhere); if that fails
    /// as a whole (and `--migrate-drop-tcp` was not given) nothing has changed: the
    /// migration fails and the source keeps its connections.
    pub fn load_engine_state(&mut self, state: EngineState) -> Result<(), EngineStateError> {
        let drop = self.drop_unmigratable_tcp();
        {
            let (tcp, _env, repair) = self.tcp_and_repair();
            load_tcp_flows(
                tcp,
                repair,
                &state.source,
                &state.tcp_flows,
                drop,
                state.take_over,
            )?;
        }
        let config = self.config().clone();
        if state.our_mac != config.our_mac {
            warn!(
                "migration source used MAC {} towards the guest, this backend uses {}: \
                 the guest's neighbour cache is stale until it resolves the gateway again",
                crate::net::format_mac(state.our_mac),
                crate::net::format_mac(config.our_mac)
            );
        }
        if state.mtu != config.mtu {
            warn!(
                "migration source advertised MTU {}, this backend advertises {}",
                state.mtu, config.mtu
            );
        }
        if let Some(theirs) = &state.forwards {
            let ours = forwards_record(&config.tcp_forwards, &config.udp_forwards);
            if ours.as_ref() != Some(theirs) {
                warn!("migration source forwarded other ports than this backend (-t/-u differ)");
            }
        }
        self.restore_observed(ObservedGuest::from(state.guest));
        if !state.udp_flows.is_empty() {
            // After the guest's MAC is known: restored flows address frames to it.
            let (udp, config, epoll, mac) = self.udp_parts();
            let udp_result = udp.load_records(
                &state.udp_flows,
                config,
                mac,
                epoll,
                std::time::Instant::now(),
            );
            info!(
                "device state LOAD: {} UDP flow(s) restored ({} with a new source port), \
                 {} skipped",
                udp_result.restored, udp_result.new_port, udp_result.skipped
            );
        }
        let observed = self.observed();
        info!(
            "guest state restored: MAC {}, IPv4 {:?}, IPv6 {:?}, link-local {:?}",
            observed
                .mac
                .map_or_else(|| "unknown".to_string(), crate::net::format_mac),
            observed.ipv4,
            observed.ipv6,
            observed.ipv6_link_local
        );
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// TCP connections: same-host handover
// ---------------------------------------------------------------------------------------

/// What SAVE's TCP part produced.
#[derive(Debug, Default)]
pub(crate) struct SavedTcp {
    pub records: Vec<TcpFlowRecord>,
    /// Sockets were left in repair mode (see [`EngineState::repaired`]).
    pub repaired: bool,
}

/// SAVE of a migration, TCP part. The source cannot know where the target is, so with
/// a helper every socket is dumped through it (`dump`, from
/// [`crate::restore::dump_all`]: frozen, deaf and in repair mode, its kernel state goes
/// into the record) and is *also* offered for a same-host handover on `offer` (listening
/// since before the freeze; its endpoint is in the stream's prefix); the target picks
/// one. A target on this host that presented the token meanwhile tells that it picks
/// the handover: the dump stopped when it came, and no kernel state goes into the stream
/// ([`freeze_and_offer_tcp_flows`]). Without a helper the sockets are only frozen and
/// offered: a target on this host and in this namespace takes them, any other target
/// fails LOAD (so the source resumes with everything) unless it runs with
/// `--migrate-drop-tcp`.
///
/// `repair` is the helper held now: after a helper died in the middle of the dump
/// (`--migrate-drop-tcp` only; otherwise SAVE fails) a fresh one, which dumped the
/// sockets of the interrupted request again ([`GuestNet::redump_after_helper_died`])
/// and ends repair mode for the dumped ones at the handover.
pub(crate) fn save_tcp_flows(
    tcp: &mut TcpFlows,
    env: &TcpEnv<'_>,
    repair: Option<&mut baton_repair_ipc::RepairClient>,
    offer: HandoverOffer,
    drop_unmigratable: bool,
    dump: Option<crate::restore::DumpOutcome>,
) -> Result<SavedTcp, EngineStateError> {
    let (Some(helper), Some(dump)) = (repair, dump) else {
        if tcp.len() > 0 && !offer.target_waiting() {
            warn!(
                "device state SAVE: no baton-repair helper: the {} TCP connection(s) can only \
                 move to a target on this host, in this network namespace",
                tcp.len()
            );
        }
        return freeze_and_offer_tcp_flows(tcp, env, offer, drop_unmigratable, None);
    };
    let failed = dump.failed + dump.unknown;
    // A target on this host takes the sockets live: one the helper could not dump (and
    // rolled back to live) moves as well as any. Not so one whose helper died under
    // it (`unknown`): it may be left in repair mode, which the target cannot end.
    let live_only = offer.target_waiting() && dump.unknown == 0;
    if failed > 0 && !drop_unmigratable && !live_only {
        let dumped: Vec<FlowId> = dump.states.keys().copied().collect();
        crate::restore::thaw_flows(tcp, helper, &dumped, "after a failed SAVE");
        return Err(EngineStateError::CannotDump(failed));
    }
    if failed > 0 && !live_only {
        warn!(
            "device state SAVE: {failed} TCP connection(s) could not be dumped; \
             --migrate-drop-tcp: they move only to a target on this host (elsewhere the \
             guest sees them reset)"
        );
    }
    freeze_and_offer_tcp_flows(
        tcp,
        env,
        offer,
        drop_unmigratable,
        Some(Dumped {
            helper,
            states: dump.states,
            closed: dump.closed,
        }),
    )
}

/// Sockets the helper dumped at SAVE: in repair mode, with their kernel state.
pub(crate) struct Dumped<'a> {
    pub helper: &'a mut baton_repair_ipc::RepairClient,
    pub states: HashMap<FlowId, baton_proto::tcp::TcpConnState>,
    /// Flows already closed in the kernel: nothing to freeze (see
    /// [`crate::restore::DumpOutcome::closed`]).
    pub closed: Vec<FlowId>,
}

/// Freeze every connection (those in `dumped` already are), give the sockets to `offer`
/// (see [`crate::handover`]); each record carries its kernel state from `dumped` —
/// unless a target on this host has come for the stream by now
/// ([`HandoverOffer::target_waiting`]): it takes the live sockets, so the records go
/// without (and the stream without megabytes of queue data nobody reads). The frozen
/// flows' fate is decided later by the table itself: taken by a same-host target, or
/// thawed when the guest talks here again. If the sockets cannot be offered the flows
/// are thawed at once and SAVE fails, so that the source keeps everything (the
/// design's default policy).
pub(crate) fn freeze_and_offer_tcp_flows(
    tcp: &mut TcpFlows,
    env: &TcpEnv<'_>,
    offer: HandoverOffer,
    drop_unmigratable: bool,
    dumped: Option<Dumped<'_>>,
) -> Result<SavedTcp, EngineStateError> {
    let (mut helper, mut states, closed) = match dumped {
        Some(d) => (Some(d.helper), d.states, d.closed),
        None => (None, HashMap::new(), Vec::new()),
    };
    let started = std::time::Instant::now();
    let dumped_ids: Vec<FlowId> = states.keys().copied().collect();
    // The helper's dump froze those sockets and read their addresses; closed ones need
    // no freezing.
    let mut pre_frozen: HashMap<FlowId, Option<baton_proto::migration::HostSocketEnds>> = states
        .iter()
        .map(|(id, state)| {
            let ends = baton_proto::migration::HostSocketEnds {
                local: state.local,
                peer: state.peer,
            };
            (*id, Some(ends))
        })
        .collect();
    pre_frozen.extend(closed.iter().map(|id| (*id, None)));
    // Decided once: a target that comes from now on still takes the sockets, but they
    // are frozen and the records written as if none had come.
    let live_only = offer.target_waiting();
    let mut frozen = tcp.freeze_for_handover(env, &pre_frozen, !live_only);
    drop(pre_frozen);
    // Fail SAVE: thaw what the helper dumped (repair mode needs it), then the rest.
    let give_up = |tcp: &mut TcpFlows, helper: Option<&mut baton_repair_ipc::RepairClient>| {
        if let Some(helper) = helper {
            crate::restore::thaw_flows(tcp, helper, &dumped_ids, "after a failed SAVE");
        }
        tcp.source_resumed(env);
    };
    if frozen.left_behind > 0 && !drop_unmigratable {
        // The design's default: a connection that cannot move fails the migration, so
        // that the source continues with everything intact.
        give_up(tcp, helper.as_deref_mut());
        return Err(EngineStateError::CannotFreeze(frozen.left_behind));
    }
    if frozen.left_behind > 0 {
        warn!(
            "device state SAVE: {} TCP connection(s) cannot move (handshake in progress or \
             socket trouble); --migrate-drop-tcp: the guest will see them reset on the target",
            frozen.left_behind
        );
    }
    // Pair the records with the dumped states (records and offered flows come in the
    // same order, one pair per record); dumped sockets that are not offered stay here
    // and must leave repair mode now.
    let mut in_repair = Vec::new();
    for (record, (wire, id)) in frozen.records.iter_mut().zip(tcp.offered_flows()) {
        if record.id != *wire {
            continue;
        }
        if let Some(state) = states.remove(id) {
            in_repair.push(record.id);
            if live_only {
                continue;
            }
            record.kernel = Some(state);
            if let Err(err) = record.validate(false) {
                warn!("{id}: dumped state not usable ({err}); it moves only within this host");
                record.kernel = None;
            }
        }
    }
    if let Some(helper) = helper.as_deref_mut() {
        let left: Vec<FlowId> = states.keys().copied().collect();
        crate::restore::thaw_flows(tcp, helper, &left, "of a connection that stays here");
    }
    if frozen.records.is_empty() {
        // Nothing to offer: a target waiting is refused (the stream lists no flow).
        drop(offer);
        return Ok(SavedTcp::default());
    }
    let sockets = std::mem::take(&mut frozen.sockets);
    let repaired = !in_repair.is_empty();
    let lent_repaired = helper.as_deref().map(|h| (h.share(), in_repair));
    // The flows' own sockets are lent to the offer (one descriptor per connection); the
    // table keeps them open until the offer has settled (see `TcpFlows`).
    match offer.provide(sockets, lent_repaired, !live_only) {
        Ok(()) => {
            tcp.set_offer(offer);
            let with_state = frozen.records.iter().filter(|r| r.kernel.is_some()).count();
            if live_only {
                info!(
                    "device state SAVE: a target on this host came for the stream: {} TCP \
                     connection(s) frozen and offered in {:.1} ms; they move live, without \
                     their kernel state in the stream",
                    frozen.records.len(),
                    ms(started.elapsed())
                );
            } else {
                info!(
                    "device state SAVE: {} TCP connection(s) frozen ({with_state} with kernel \
                     state) and offered for a handover in {:.1} ms",
                    frozen.records.len(),
                    ms(started.elapsed())
                );
            }
            Ok(SavedTcp {
                records: frozen.records,
                repaired,
            })
        }
        Err(err) => {
            give_up(tcp, helper);
            Err(EngineStateError::Offer(err))
        }
    }
}

/// Where the source ran, seen from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// Same boot of the same host, same network namespace: take the live sockets.
    SameNamespace,
    /// Another host, or another namespace: restore the dumped states.
    Elsewhere,
    /// The record does not say (no boot id or cookie): try the handover socket, which is
    /// reachable only from the same namespace.
    Unknown,
}

fn placement(source: &SourceRecord, here: &SourceRecord) -> Placement {
    match (source.boot_id, here.boot_id) {
        (Some(a), Some(b)) if a != b => return Placement::Elsewhere,
        (Some(_), Some(_)) => {}
        _ => return Placement::Unknown,
    }
    // Network namespace cookies are unique within one boot.
    match (source.netns.cookie, here.netns.cookie) {
        (Some(a), Some(b)) if a == b => Placement::SameNamespace,
        (Some(_), Some(_)) => Placement::Elsewhere,
        _ => Placement::Unknown,
    }
}

/// LOAD, TCP part: same host and namespace as the source → take the live sockets over
/// ([`take_over_tcp_flows`]); otherwise → restore the dumped states through the helper
/// ([`crate::restore::restore_all`]). `started`: the handover begun while the stream
/// was read ([`EarlyTakeOver`]), if any. Returns how many connections were rebuilt.
pub(crate) fn load_tcp_flows(
    tcp: &mut TcpFlows,
    repair: Option<&mut baton_repair_ipc::RepairClient>,
    source: &SourceRecord,
    flows: &[TcpFlowRecord],
    drop_unmigratable: bool,
    started: Option<TakeOver>,
) -> Result<usize, EngineStateError> {
    if flows.is_empty() {
        return Ok(0);
    }
    let place = placement(source, &local_source_record());
    let handover_failed = match place {
        Placement::SameNamespace => {
            return take_over_tcp_flows(tcp, source, flows, drop_unmigratable, started)
        }
        Placement::Unknown if source.handover.is_some() => {
            match take_over_tcp_flows(tcp, source, flows, false, started) {
                Ok(taken) => return Ok(taken),
                // Not reachable: not this namespace; restore instead.
                Err(EngineStateError::Handover {
                    source: crate::handover::HandoverError::Unreachable(_),
                    ..
                }) => None,
                Err(err) => Some(err),
            }
        }
        Placement::Unknown | Placement::Elsewhere => None,
    };
    let failure = |err: EngineStateError| {
        if drop_unmigratable {
            warn!("device state LOAD: {err}; --migrate-drop-tcp: those connections are reset");
            Ok(0)
        } else {
            Err(err)
        }
    };
    if let Some(err) = handover_failed {
        return failure(err);
    }
    let dumped: Vec<&TcpFlowRecord> = flows.iter().filter(|f| f.kernel.is_some()).collect();
    if dumped.is_empty() {
        return failure(EngineStateError::NoHandover(flows.len()));
    }
    let Some(helper) = repair else {
        return failure(EngineStateError::NoHelper(dumped.len()));
    };
    let all: Vec<&TcpFlowRecord> = flows.iter().collect();
    match crate::restore::restore_all(tcp, helper, &all) {
        Ok(outcome) => {
            if outcome.failed > 0 {
                warn!(
                    "device state LOAD: {} TCP connection(s) could not be restored; the guest \
                     sees them reset",
                    outcome.failed
                );
            }
            Ok(outcome.restored)
        }
        Err(err) => failure(EngineStateError::Restore(err)),
    }
}

/// LOAD, TCP part: take the stream's connections over from the source on this host and
/// rebuild them in `tcp`. With `drop_unmigratable`, connections that cannot be taken
/// are left out (logged): the guest's next segment for one of them is answered with a
/// RST, the others continue. Without it, any failure fails LOAD and nothing changed.
/// `started`: the handover begun while the stream was read, finished here; without
/// one, the whole exchange happens here. Returns how many connections were rebuilt.
pub(crate) fn take_over_tcp_flows(
    tcp: &mut TcpFlows,
    source: &SourceRecord,
    flows: &[TcpFlowRecord],
    drop_unmigratable: bool,
    started: Option<TakeOver>,
) -> Result<usize, EngineStateError> {
    if flows.is_empty() {
        return Ok(0);
    }
    let failure = |err: EngineStateError| {
        if drop_unmigratable {
            warn!("device state LOAD: {err}; --migrate-drop-tcp: those connections are reset");
            Ok(0)
        } else {
            Err(err)
        }
    };
    let Some(endpoint) = &source.handover else {
        return failure(EngineStateError::NoHandover(flows.len()));
    };
    let expected: Vec<ExpectedSocket> = flows
        .iter()
        .map(|f| ExpectedSocket {
            flow: f.id,
            host: f.host,
        })
        .collect();
    let timer = std::time::Instant::now();
    let result = match started {
        Some(early) => early.finish(&expected),
        None => take_over(endpoint, &expected),
    };
    let sockets = match result {
        Ok(sockets) => sockets,
        Err(source) => {
            return failure(EngineStateError::Handover {
                flows: flows.len(),
                source,
            })
        }
    };
    let received = timer.elapsed();
    // The sockets arrive in the stream's order (the source offers them in the order of
    // its records): pair them in one pass; any other order goes through a map.
    let in_order =
        sockets.len() == flows.len() && sockets.iter().zip(flows).all(|((id, _), f)| *id == f.id);
    let rebuilt: Vec<_> = if in_order {
        sockets
            .into_iter()
            .zip(flows)
            .map(|((_, socket), record)| {
                (
                    crate::tcp::conn::GuestSide::from(&record.guest_side),
                    socket,
                )
            })
            .collect()
    } else {
        let by_id: HashMap<baton_proto::migration::FlowId, &TcpFlowRecord> =
            flows.iter().map(|f| (f.id, f)).collect();
        sockets
            .into_iter()
            .filter_map(|(id, socket)| {
                let record = by_id.get(&id)?;
                Some((
                    crate::tcp::conn::GuestSide::from(&record.guest_side),
                    socket,
                ))
            })
            .collect()
    };
    let adopted = tcp.adopt(rebuilt, std::time::Instant::now());
    info!(
        "device state LOAD: {adopted} TCP connection(s) taken over from the source \
         (handover {:.1} ms, rebuild {:.1} ms)",
        ms(received),
        ms(timer.elapsed() - received)
    );
    Ok(adopted)
}

impl From<ObservedGuest> for GuestRecord {
    fn from(o: ObservedGuest) -> Self {
        GuestRecord {
            mac: o.mac,
            ipv4: o.ipv4.map(|a| a.octets()),
            ipv6: o.ipv6.map(|a| a.octets()),
            ipv6_link_local: o.ipv6_link_local.map(|a| a.octets()),
        }
    }
}

impl From<GuestRecord> for ObservedGuest {
    fn from(r: GuestRecord) -> Self {
        ObservedGuest {
            mac: r.mac,
            ipv4: r.ipv4.map(Ipv4Addr::from),
            ipv6: r.ipv6.map(Ipv6Addr::from),
            ipv6_link_local: r.ipv6_link_local.map(Ipv6Addr::from),
        }
    }
}

/// The forwarding tables as a record; `None` if one has more rules than the stream allows.
pub fn forwards_record(tcp: &PortForwards, udp: &PortForwards) -> Option<ForwardsRecord> {
    let rules = |table: &PortForwards| -> Option<Vec<ForwardRuleRecord>> {
        if table.rules().len() > MAX_FORWARD_RULES {
            return None;
        }
        Some(
            table
                .rules()
                .iter()
                .map(|rule| ForwardRuleRecord {
                    bind_addr: rule.bind_to.addr.map(IpAddress::from),
                    bind_device: rule.bind_to.device.clone(),
                    host_first: rule.host_ports.first(),
                    host_last: rule.host_ports.last(),
                    guest_first: rule.guest_ports.first(),
                    guest_last: rule.guest_ports.last(),
                    guest_addr: rule.guest_addr.map(IpAddress::from),
                })
                .collect(),
        )
    };
    Some(ForwardsRecord {
        tcp: rules(tcp)?,
        udp: rules(udp)?,
    })
}

// ---------------------------------------------------------------------------------------
// Where the source runs
// ---------------------------------------------------------------------------------------

/// Host facts that need files or system calls the sandbox forbids.
#[derive(Debug, Clone, Default)]
struct HostIdentity {
    hostname: Option<String>,
    boot_id: Option<[u8; 16]>,
    netns_dev: Option<u64>,
    netns_inode: Option<u64>,
}

static HOST_IDENTITY: OnceLock<HostIdentity> = OnceLock::new();

/// Read the hostname, boot id and network namespace inode now, for later SAVEs. Call it
/// before entering the sandbox (it opens files); without it the
/// stream's [`SourceRecord`] carries only what the sandbox allows (uid, netns cookie).
pub fn remember_host_identity() {
    let _ = HOST_IDENTITY.get_or_init(|| {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty() && h.len() <= MAX_HOSTNAME && !h.contains('\0'));
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .and_then(|s| parse_uuid(s.trim()));
        let ns = std::fs::metadata("/proc/self/ns/net").ok();
        use std::os::unix::fs::MetadataExt;
        HostIdentity {
            hostname,
            boot_id,
            netns_dev: ns.as_ref().map(|m| m.dev()),
            netns_inode: ns.as_ref().map(|m| m.ino()),
        }
    });
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// `SO_NETNS_COOKIE` of a throw-away UNIX socket: identifies this network namespace.
/// Uses only calls on the sandbox's allow-list (socket, getsockopt, close).
fn netns_cookie() -> Option<u64> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `sock` is an open socket we own; `cookie` and `len` are valid for writes of
    // the sizes given, and the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<u64>()).then_some(cookie)
}

/// The [`SourceRecord`] of this process. No handover endpoint yet: the same-host
/// handover listener comes with the TCP engine.
pub fn local_source_record() -> SourceRecord {
    let host = HOST_IDENTITY.get().cloned().unwrap_or_default();
    SourceRecord {
        hostname: host.hostname,
        boot_id: host.boot_id,
        netns: NetnsIdentity {
            cookie: netns_cookie(),
            dev: host.netns_dev,
            inode: host.netns_inode,
        },
        uid: nix::unistd::geteuid().as_raw(),
        handover: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_guest_converts_both_ways() {
        let observed = ObservedGuest {
            mac: Some([0x52, 0x54, 0, 1, 2, 3]),
            ipv4: Some(Ipv4Addr::new(10, 0, 2, 15)),
            ipv6: Some("2001:db8::2".parse().unwrap()),
            ipv6_link_local: Some("fe80::1:2".parse().unwrap()),
        };
        let record = GuestRecord::from(observed);
        record.validate().unwrap();
        assert_eq!(ObservedGuest::from(record), observed);
        assert_eq!(
            ObservedGuest::from(GuestRecord::default()),
            ObservedGuest::default()
        );
    }

    #[test]
    fn boot_id_parses() {
        assert_eq!(
            parse_uuid("01234567-89ab-cdef-0123-456789abcdef"),
            Some([
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ])
        );
        assert_eq!(parse_uuid("xyz"), None);
    }

    mod tcp_handover {

        /// SAVE's TCP part with no helper: an offer listening, its endpoint in `record`.
        fn save_flows(
            tcp: &mut TcpFlows,
            env: &TcpEnv<'_>,
            record: &mut SourceRecord,
        ) -> Vec<TcpFlowRecord> {
            let offer = HandoverOffer::listen(OFFER_LIFETIME).unwrap();
            record.handover = Some(offer.endpoint().clone());
            freeze_and_offer_tcp_flows(tcp, env, offer, false, None)
                .unwrap()
                .records
        }
        use super::super::*;
        use crate::net::testing::{config, established_guest_side as established, CapturedFrames};
        use crate::tcp::conn::{GuestSide, TcpState};
        use nix::sys::epoll::{Epoll, EpollCreateFlags};
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::time::Instant;

        struct Side {
            config: crate::config::NetConfig,
            epoll: Epoll,
            tcp: TcpFlows,
        }

        impl Side {
            fn new() -> Self {
                let config = config();
                let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
                let tcp = TcpFlows::new(&config, &epoll, 16, Instant::now()).unwrap();
                Side { config, epoll, tcp }
            }
            fn parts(&mut self) -> (&mut TcpFlows, TcpEnv<'_>) {
                let env = TcpEnv {
                    config: &self.config,
                    epoll: &self.epoll,
                    guest_mac: None,
                };
                (&mut self.tcp, env)
            }
        }

        /// A source table holding one established connection to a local server.
        fn source_with_flow() -> (Side, TcpStream) {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            let mut source = Side::new();
            let adopted = source
                .tcp
                .adopt(vec![(established(40000), client.into())], Instant::now());
            assert_eq!(adopted, 1);
            (source, server)
        }

        #[test]
        fn guest_side_converts_both_ways() {
            let live = established(40000);
            let wire = baton_proto::migration::GuestTcpSide::try_from(&live).unwrap();
            wire.validate().unwrap();
            assert_eq!(GuestSide::from(&wire), live);
            let handshake = GuestSide {
                state: TcpState::SynAckSent,
                ..live
            };
            assert!(baton_proto::migration::GuestTcpSide::try_from(&handshake).is_err());
        }

        #[test]
        fn flows_move_to_a_target_on_the_same_host() {
            let (mut source, mut server) = source_with_flow();
            let mut record = SourceRecord::default();
            let (tcp, env) = source.parts();
            let flows = save_flows(tcp, &env, &mut record);
            assert_eq!(flows.len(), 1);
            assert!(record.handover.is_some());
            assert!(tcp.is_frozen());
            // The stream round trip validates the records.
            for flow in &flows {
                flow.validate(false).unwrap();
            }

            let mut target = Side::new();
            let taken = take_over_tcp_flows(&mut target.tcp, &record, &flows, false, None).unwrap();
            assert_eq!(taken, 1);
            assert_eq!(target.tcp.len(), 1);
            let (tcp, env) = source.parts();
            assert_eq!(tcp.collect_handover(&env), 1);
            assert_eq!(tcp.len(), 0);

            // The connection is alive (not reset, not closed by the source's close).
            server.write_all(b"still here").unwrap();
            server
                .set_read_timeout(Some(std::time::Duration::from_millis(200)))
                .unwrap();
            let mut buf = [0u8; 1];
            let err = server.read(&mut buf).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");

            // The guest resuming on the source afterwards finds nothing to thaw.
            let (tcp, env) = source.parts();
            assert!(tcp.source_resumed(&env));
            assert_eq!(tcp.len(), 0);
        }

        /// A source with one flow after SAVE, and a target that started taking its
        /// sockets (given 100 ms to get them).
        fn saved_and_target_started(
        ) -> (Side, TcpStream, SourceRecord, Vec<TcpFlowRecord>, TakeOver) {
            let (mut source, server) = source_with_flow();
            let mut record = SourceRecord::default();
            let (tcp, env) = source.parts();
            let flows = save_flows(tcp, &env, &mut record);
            let early = TakeOver::start(record.handover.as_ref().unwrap()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            (source, server, record, flows, early)
        }

        /// The target starts taking the sockets while it still reads the stream; they
        /// move only once it finishes with the validated records.
        #[test]
        fn a_handover_started_early_moves_the_sockets_when_finished() {
            let (mut source, mut server, record, flows, early) = saved_and_target_started();
            // Every socket is on its way, yet nothing is decided.
            let (tcp, env) = source.parts();
            assert_eq!(tcp.collect_handover(&env), 0);
            let mut target = Side::new();
            let taken =
                take_over_tcp_flows(&mut target.tcp, &record, &flows, false, Some(early)).unwrap();
            assert_eq!(taken, 1);
            let (tcp, env) = source.parts();
            assert_eq!(tcp.collect_handover(&env), 1);
            server.write_all(b"still here").unwrap();
        }

        /// A LOAD that fails after the handover started (a bad stream) refuses it: the
        /// source keeps its sockets, thaws them when its guest resumes, and the
        /// connection goes on.
        #[test]
        fn a_handover_started_early_and_abandoned_leaves_the_source_owner() {
            let (mut source, mut server, record, flows, early) = saved_and_target_started();
            drop(early);
            // Refused: the offer is over and cannot be taken any more.
            let mut target = Side::new();
            let err =
                take_over_tcp_flows(&mut target.tcp, &record, &flows, false, None).unwrap_err();
            assert!(matches!(err, EngineStateError::Handover { .. }), "{err}");
            assert_eq!(target.tcp.len(), 0);
            let (tcp, env) = source.parts();
            assert_eq!(tcp.collect_handover(&env), 0);
            assert!(tcp.source_resumed(&env));
            assert!(!tcp.is_frozen());
            assert_eq!(tcp.len(), 1);
            // Thawed: the peer's bytes reach the source's socket again.
            server.write_all(b"after").unwrap();
            let (tcp, _env) = source.parts();
            assert_eq!(tcp.len(), 1);
        }

        #[test]
        fn a_resumed_source_thaws_and_withdraws_its_offer() {
            let (mut source, _server) = source_with_flow();
            let mut record = SourceRecord::default();
            let (tcp, env) = source.parts();
            let flows = save_flows(tcp, &env, &mut record);
            assert!(tcp.source_resumed(&env));
            assert!(!tcp.is_frozen());
            assert_eq!(tcp.len(), 1);
            let mut target = Side::new();
            let err =
                take_over_tcp_flows(&mut target.tcp, &record, &flows, false, None).unwrap_err();
            assert!(matches!(err, EngineStateError::Handover { .. }), "{err}");
            assert_eq!(target.tcp.len(), 0);
            // With --migrate-drop-tcp the target goes on without them.
            assert_eq!(
                take_over_tcp_flows(&mut target.tcp, &record, &flows, true, None).unwrap(),
                0
            );
            let mut sink = CapturedFrames::default();
            tcp.after_events(&env, &mut sink, Instant::now());
            assert_eq!(tcp.len(), 1);
        }

        #[test]
        fn a_stream_without_handover_socket_fails_load() {
            let (mut source, _server) = source_with_flow();
            let mut record = SourceRecord::default();
            let (tcp, env) = source.parts();
            let flows = save_flows(tcp, &env, &mut record);
            record.handover = None;
            let mut target = Side::new();
            let err =
                take_over_tcp_flows(&mut target.tcp, &record, &flows, false, None).unwrap_err();
            assert!(matches!(err, EngineStateError::NoHandover(1)), "{err}");
        }
    }

    #[test]
    fn placement_follows_boot_id_and_netns_cookie() {
        let here = SourceRecord {
            boot_id: Some([1; 16]),
            netns: NetnsIdentity {
                cookie: Some(7),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut source = here.clone();
        assert_eq!(placement(&source, &here), Placement::SameNamespace);
        source.netns.cookie = Some(8);
        assert_eq!(placement(&source, &here), Placement::Elsewhere);
        source.boot_id = Some([2; 16]);
        source.netns.cookie = Some(7);
        assert_eq!(placement(&source, &here), Placement::Elsewhere);
        source.boot_id = None;
        assert_eq!(placement(&source, &here), Placement::Unknown);
        source.boot_id = here.boot_id;
        source.netns.cookie = None;
        assert_eq!(placement(&source, &here), Placement::Unknown);
    }

    #[test]
    fn netns_cookie_is_stable_in_one_namespace() {
        let a = netns_cookie();
        assert!(a.is_some(), "SO_NETNS_COOKIE (Linux 5.14+)");
        assert_eq!(a, netns_cookie());
    }
}
