//! `NetBackend`: the `VhostUserBackend` implementation for one vhost-user connection.
//!
//! Locking rule: `state` (features, memory, flags) is taken briefly by the protocol
//! thread and by the worker; the engine mutex is taken only by the worker and, briefly, by
//! a device-state transfer thread ([`crate::migrate`]), never while holding `state`'s
//! write lock.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::rx::RxQueueSink;
use super::{tx, NetworkEngine, ENGINE_EVENT, MAX_QUEUE_SIZE, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::migrate::{DeviceSide, DeviceStateTransfer};
use crate::repair_link::RepairLink;

/// Guest memory with QEMU's dirty log attached.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
/// One virtqueue as the library hands it to us.
pub type Vring = VringRwLock<GuestMem>;

/// Virtio features baton offers. Checksum offload both ways (see [`super`]), no
/// segmentation offloads. MTU and STATUS are left out on purpose: QEMU implements them
/// itself, and vhost 0.18 would drop the connection on their messages.
pub const OFFERED_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    | VhostUserVirtioFeatures::LOG_ALL.bits();

/// vhost-user protocol features baton offers. Never RARP (vhost 0.18 has no handler for
/// SEND_RARP and would drop the connection; GUEST_ANNOUNCE covers it), never INFLIGHT.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::DEVICE_STATE
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// How often one event retries the receive path at once when the guest posted buffers
/// while it was full (beyond that, the guest's next kick or a socket event retries).
const RX_STARVED_RETRIES: usize = 4;

/// The device for one connection.
pub struct NetBackend {
    engine: Arc<Mutex<dyn NetworkEngine>>,
    mem: RwLock<Option<GuestMem>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// LOG_ALL acknowledged: QEMU is migrating (or dirty-tracking) right now.
    logging: AtomicBool,
    /// The device-state transfer (`SET_DEVICE_STATE_FD` … `CHECK_DEVICE_STATE`).
    device_state: DeviceStateTransfer,
    /// Where the repair helper comes from; asked when `LOG_ALL` arrives.
    repair: Arc<RepairLink>,
    /// The transfer started last is a migration SAVE (not a snapshot, not a LOAD).
    saving_for_migration: AtomicBool,
    /// A migration SAVE was checked successfully and the guest has not run here since:
    /// this connection's VM has moved away (see [`NetBackend::migrated_away`]).
    migrated: AtomicBool,
    /// The rings have not run since the connection came up or since `GET_VRING_BASE`
    /// stopped them: the next ring event tells the engine that they run
    /// ([`NetworkEngine::rings_started`]).
    rings_stopped: AtomicBool,
    /// Set when a SAVE starts: the pre-dump pass (if one runs) takes no further chunk, so
    /// that SAVE waits for the engine for at most the chunk in progress (the pass would
    /// otherwise win the engine lock again and again on a busy machine).
    pre_dump_yield: Arc<AtomicBool>,
}

impl NetBackend {
    pub fn new(engine: Arc<Mutex<dyn NetworkEngine>>) -> Self {
        Self::with_repair_link(engine, RepairLink::none())
    }

    /// A device whose migrations get their helper from `repair`.
    pub fn with_repair_link(
        engine: Arc<Mutex<dyn NetworkEngine>>,
        repair: Arc<RepairLink>,
    ) -> Self {
        NetBackend {
            engine,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            logging: AtomicBool::new(false),
            device_state: DeviceStateTransfer::default(),
            repair,
            saving_for_migration: AtomicBool::new(false),
            migrated: AtomicBool::new(false),
            rings_stopped: AtomicBool::new(true),
            pre_dump_yield: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether this connection's VM migrated away: a migration SAVE passed
    /// `CHECK_DEVICE_STATE` and the rings have not been kicked since (a source VM that
    /// resumes after a failed switch-over kicks them again). Decides the linger when
    /// the frontend goes away ([`super::serve`]).
    pub fn migrated_away(&self) -> bool {
        self.migrated.load(Ordering::SeqCst)
    }

    /// Features the frontend acknowledged last.
    pub fn acked(&self) -> u64 {
        self.acked_features.load(Ordering::Relaxed)
    }

    /// Whether QEMU asked for dirty logging (a migration is in progress).
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::Relaxed)
    }

    fn memory(&self) -> Option<GuestMem> {
        self.mem.read().ok().and_then(|m| m.clone())
    }

    fn with_engine(&self, f: impl FnOnce(&mut dyn NetworkEngine)) {
        match self.engine.lock() {
            Ok(mut engine) => f(&mut *engine),
            Err(poisoned) => {
                // A panic elsewhere must not stop the network for good; the engine's own
                // invariants are per-flow, so carry on with what is there.
                warn!("network engine lock was poisoned; continuing");
                f(&mut *poisoned.into_inner())
            }
        }
    }

    /// Run `f` with a sink into the RX ring, then notify the guest if needed.
    fn with_rx_sink(
        &self,
        vrings: &[Vring],
        f: impl FnOnce(&mut dyn NetworkEngine, &mut RxQueueSink<'_>),
    ) {
        let Some(mem) = self.memory() else {
            return;
        };
        let Some(rx) = vrings.get(RX_QUEUE) else {
            return;
        };
        let acked = self.acked();
        let mrg_rxbuf = acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let guest_csum = acked & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0;
        let mut sink = RxQueueSink::new(rx, &mem, mrg_rxbuf, guest_csum);
        self.with_engine(|engine| f(engine, &mut sink));
        // Buffers the guest posted while the queue was full, just before notifications
        // were re-enabled, bring no kick: use them now (bounded, the guest may keep
        // posting a few at a time).
        let mut retries = 0;
        while sink.finish() && retries < RX_STARVED_RETRIES {
            retries += 1;
            sink = RxQueueSink::new(rx, &mem, mrg_rxbuf, guest_csum);
            self.with_engine(|engine| engine.handle_host_events(&mut sink));
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn acked_features(&self, features: u64) {
        let before = self.acked_features.swap(features, Ordering::Relaxed);
        let log_all_bit = VhostUserVirtioFeatures::LOG_ALL.bits();
        if (before ^ features) & !log_all_bit != 0 {
            info!(
                features = format_args!("{features:#x}"),
                csum = features & (1 << VIRTIO_NET_F_CSUM) != 0,
                guest_csum = features & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0,
                "virtio features negotiated"
            );
        }
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        if self.logging.swap(log_all, Ordering::Relaxed) != log_all {
            if log_all {
                info!("dirty logging on: a migration is starting");
                self.repair.migration_starting();
                // Pre-dump the TCP connections while the VM still runs (see
                // `crate::predump`); SAVE stops the pass and uses what it found.
                self.pre_dump_yield.store(false, Ordering::SeqCst);
                if let Err(err) = crate::predump::spawn_pass(
                    self.engine.clone(),
                    self.repair.clone(),
                    self.pre_dump_yield.clone(),
                ) {
                    warn!("starting the TCP pre-dump thread: {err}; SAVE dumps everything");
                }
            } else {
                info!("dirty logging off");
                self.with_engine(|engine| engine.pre_dump_cancel());
            }
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        offered_protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        let mut slot = self
            .mem
            .write()
            .map_err(|_| io::Error::other("guest memory lock poisoned"))?;
        *slot = Some(mem);
        Ok(())
    }

    /// Returns at once; the transfer runs on its own thread (see [`crate::migrate`]).
    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        let device = DeviceSide {
            engine: self.engine.clone(),
            acked_features: self.acked(),
            logging: self.logging(),
        };
        let migration_save =
            matches!(direction, VhostTransferStateDirection::SAVE) && self.logging();
        if migration_save {
            self.pre_dump_yield.store(true, Ordering::SeqCst);
        }
        if matches!(direction, VhostTransferStateDirection::LOAD) {
            // Restoring connections from another host needs the helper: have it started
            // (`--helper`) while QEMU sends the stream.
            self.repair.want_helper();
        }
        let started = self.device_state.start(direction, phase, file, device);
        self.saving_for_migration
            .store(migration_save && started.is_ok(), Ordering::SeqCst);
        started?;
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        let result = self.device_state.check();
        let was_migration_save = self.saving_for_migration.swap(false, Ordering::SeqCst);
        if result.is_ok() && was_migration_save {
            info!("migration complete as source: the VM's state went to the target");
            self.migrated.store(true, Ordering::SeqCst);
        }
        result
    }

    /// `GET_VRING_BASE`: the ring stops (before a SAVE, or when QEMU stops the VM).
    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.rings_stopped.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create the worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            debug!("event {device_event}: unexpected event set {evset:?}");
        }
        if device_event as usize == TX_QUEUE || device_event as usize == RX_QUEUE {
            // A kick: the guest runs here. After a completed migration this means QEMU
            // resumed the source VM (the switch-over failed later on).
            if self.migrated.swap(false, Ordering::SeqCst) {
                info!("the VM runs here again after its migration completed");
            }
            // The first ring event after a start is vhost-user-backend's own (it reports
            // a ring that becomes ready as an event), so this does not wait for the
            // guest to kick: a guest with nothing to send gets its connections back too.
            if self.rings_stopped.swap(false, Ordering::SeqCst) {
                let mut done = true;
                self.with_engine(|engine| done = engine.rings_started());
                if !done {
                    self.rings_stopped.store(true, Ordering::SeqCst);
                }
            }
        }
        match device_event {
            e if e as usize == TX_QUEUE => {
                let event_idx = self.event_idx.load(Ordering::Relaxed);
                let Some(mem) = self.memory() else {
                    return Ok(());
                };
                let Some(tx_ring) = vrings.get(TX_QUEUE) else {
                    return Ok(());
                };
                let csum_offload = self.acked() & (1 << VIRTIO_NET_F_CSUM) != 0;
                loop {
                    // With EVENT_IDX, keep draining until re-enabling notifications finds
                    // no new buffers (the guest may add some in between).
                    if event_idx {
                        let _ = tx_ring.disable_notification();
                    }
                    self.with_rx_sink(vrings, |engine, sink| {
                        tx::drain(tx_ring, &mem, csum_offload, |frame, checksum| {
                            engine.handle_frame(frame, checksum, sink)
                        });
                    });
                    // A ring stopped by GET_VRING_BASE is not drained, so its pending
                    // buffers would make this loop spin forever.
                    let stopped = !virtio_queue::QueueT::ready(tx_ring.get_ref().get_queue());
                    if !event_idx || stopped || !tx_ring.enable_notification().unwrap_or(false) {
                        break;
                    }
                }
            }
            e if e as usize == RX_QUEUE || e == ENGINE_EVENT => {
                // Fresh receive buffers, or host sockets with work: let the engine move
                // whatever it has towards the guest.
                self.with_rx_sink(vrings, |engine, sink| engine.handle_host_events(sink));
            }
            other => debug!("event {other}: not ours"),
        }
        Ok(())
    }
}
