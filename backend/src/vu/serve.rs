//! Serving vhost-user connections, one after the other.
//!
//! The crates cannot reuse a `VhostUserDaemon` for a second connection (SET_OWNER fails
//! with "already claimed"), so every connection gets a new daemon and a new
//! [`NetBackend`]; the network engine — flows, host sockets — is shared across them, so a
//! frontend that reconnects finds the guest's connections as it left them.
//!
//! Stopping: [`Stopper::stop`] (called from the signal thread on SIGTERM/SIGINT) wakes the
//! accept wait through an eventfd and shuts the current connection down, after which
//! [`serve`] returns.
//!
//! The source's endgame (architecture.md, "Migration lifecycle", Source 4): when a
//! frontend goes away after its VM migrated away ([`NetBackend::migrated_away`]), the
//! frozen, deaf TCP sockets stay for `--linger` — the guest's address may move to the
//! target later than the VM, and a closed socket would make this host answer the peer's
//! segments with RST — and are then closed in repair mode, silently
//! ([`NetworkEngine::close_frozen_silently`]). With `-1`/`--one-off` or `--migrate-exit`
//! baton exits after that, accepting no new frontend meanwhile; otherwise it goes on
//! serving (a frontend that connects during the linger is served, and the linger ends
//! at its deadline or when that frontend leaves, whichever is later).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::NetBackend;
use super::{NetworkEngine, ENGINE_EVENT};
use crate::repair_link::RepairLink;

/// Errors that end serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("creating the stop event: {0}")]
    StopEvent(std::io::Error),
    #[error("waiting for a vhost-user connection: {0}")]
    Poll(nix::errno::Errno),
    #[error("creating the vhost-user daemon: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("registering the network engine with the worker: {0}")]
    Register(std::io::Error),
    #[error("accepting a vhost-user connection: {0}")]
    Accept(vhost_user_backend::Error),
}

/// Asks a running [`serve`] to return.
pub struct Stopper {
    requested: AtomicBool,
    wake: EventFd,
    current: Mutex<Option<ShutdownHandle>>,
}

impl Stopper {
    pub fn new() -> Result<Arc<Self>, ServeError> {
        Ok(Arc::new(Stopper {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(ServeError::StopEvent)?,
            current: Mutex::new(None),
        }))
    }

    /// Stop accepting and end the current connection.
    pub fn stop(&self) {
        self.requested.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        if let Ok(mut current) = self.current.lock() {
            if let Some(handle) = current.take() {
                handle.shutdown();
            }
        }
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    fn set_current(&self, handle: Option<ShutdownHandle>) {
        if let Ok(mut current) = self.current.lock() {
            *current = handle;
        }
    }
}

/// Longest linger actually waited.
const LONGEST_LINGER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How [`serve_with`] behaves around connections and migrations.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `-1`: return after the first connection (after the linger, if it migrated).
    pub one_off: bool,
    /// `--linger`: how long frozen sockets stay after the VM migrated away.
    pub linger: Duration,
    /// `--migrate-exit`: return once the linger after a completed migration is over.
    pub exit_after_migration: bool,
    /// Where the repair helper comes from.
    pub repair: Arc<RepairLink>,
}

impl ServeOptions {
    /// No helper, no linger, no exit after a migration.
    pub fn plain(one_off: bool) -> Self {
        ServeOptions {
            one_off,
            linger: Duration::ZERO,
            exit_after_migration: false,
            repair: RepairLink::none(),
        }
    }
}

/// Serve vhost-user connections on `listener` until stopped (or after the first one
/// with `one_off`), with [`ServeOptions::plain`].
pub fn serve(
    listener: &mut Listener,
    engine: Arc<Mutex<dyn NetworkEngine>>,
    one_off: bool,
    stopper: &Stopper,
) -> Result<(), ServeError> {
    serve_with(listener, engine, &ServeOptions::plain(one_off), stopper)
}

/// Serve vhost-user connections on `listener` until stopped, or until `options` say
/// to return (see the module documentation for the linger).
pub fn serve_with(
    listener: &mut Listener,
    engine: Arc<Mutex<dyn NetworkEngine>>,
    options: &ServeOptions,
    stopper: &Stopper,
) -> Result<(), ServeError> {
    let engine_fd = {
        let guard = engine.lock().unwrap_or_else(|p| p.into_inner());
        guard.poll_fd().as_raw_fd()
    };
    // Set while frozen sockets of a VM that migrated away wait for their silent close.
    let mut linger_until: Option<Instant> = None;
    // After a completed migration with -1 or --migrate-exit: no new frontend.
    let mut exiting = false;
    loop {
        match wait_for_connection(listener, stopper, linger_until, !exiting)? {
            Waited::Stop => {
                info!("stopping: no longer accepting vhost-user connections");
                return Ok(());
            }
            Waited::Deadline => {
                end_linger(&engine);
                linger_until = None;
                if exiting {
                    info!("migration complete and linger over: exiting");
                    return Ok(());
                }
                continue;
            }
            Waited::Connection => {}
        }
        let backend = Arc::new(NetBackend::with_repair_link(
            engine.clone(),
            options.repair.clone(),
        ));
        let device = backend.clone();
        let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("baton-vhost-user".to_string(), backend, memory)
            .map_err(ServeError::Daemon)?;
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(engine_fd, EventSet::IN, u64::from(ENGINE_EVENT))
                .map_err(ServeError::Register)?;
        }
        daemon.start(listener).map_err(ServeError::Accept)?;
        info!("vhost-user frontend connected");
        stopper.set_current(daemon.shutdown_handle());
        if stopper.requested() {
            daemon.request_shutdown();
        }
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("vhost-user frontend disconnected"),
            Err(e) => warn!("vhost-user connection ended: {e}"),
        }
        stopper.set_current(None);
        drop(daemon);
        if device.migrated_away() {
            let frozen = lock(&engine).frozen_tcp_flows();
            let linger = if frozen > 0 {
                options.linger
            } else {
                Duration::ZERO
            };
            info!(
                "the VM migrated away: keeping {frozen} frozen TCP connection(s) for \
                 {linger:?} (--linger), then closing them silently"
            );
            // Capped so that an absurd --linger cannot overflow the clock: ten years
            // is "until stopped" in practice.
            let until = Instant::now() + linger.min(LONGEST_LINGER);
            linger_until = Some(linger_until.map_or(until, |earlier| earlier.max(until)));
            exiting = options.one_off || options.exit_after_migration;
        } else if options.one_off && linger_until.is_none() {
            return Ok(());
        }
        if stopper.requested() {
            return Ok(());
        }
    }
}

/// The linger is over: close the frozen sockets silently.
fn end_linger(engine: &Mutex<dyn NetworkEngine + 'static>) {
    let closed = lock(engine).close_frozen_silently();
    info!("linger over: {closed} frozen TCP connection(s) closed silently");
}

fn lock<'a>(
    engine: &'a Mutex<dyn NetworkEngine + 'static>,
) -> std::sync::MutexGuard<'a, dyn NetworkEngine + 'static> {
    engine.lock().unwrap_or_else(|p| p.into_inner())
}

/// What [`wait_for_connection`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    Connection,
    Stop,
    Deadline,
}

/// Wait until the listener has a connection (only if `accept`), a stop was requested,
/// or `deadline` passed.
fn wait_for_connection(
    listener: &Listener,
    stopper: &Stopper,
    deadline: Option<Instant>,
    accept: bool,
) -> Result<Waited, ServeError> {
    loop {
        if stopper.requested() {
            return Ok(Waited::Stop);
        }
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Waited::Deadline);
                }
                // Rounded up, so that the deadline has passed when poll times out.
                let millis = left.as_millis().saturating_add(1);
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
            }
        };
        // SAFETY: the listener and the eventfd stay open for the duration of these
        // borrows (both outlive this function call).
        let (listen_fd, wake_fd) = unsafe {
            (
                BorrowedFd::borrow_raw(listener.as_raw_fd()),
                BorrowedFd::borrow_raw(stopper.wake.as_raw_fd()),
            )
        };
        let listen_events = if accept {
            PollFlags::POLLIN
        } else {
            PollFlags::empty()
        };
        let mut fds = [
            PollFd::new(listen_fd, listen_events),
            PollFd::new(wake_fd, PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ServeError::Poll(e)),
        }
        if stopper.requested() {
            return Ok(Waited::Stop);
        }
        let ready = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if accept && ready {
            return Ok(Waited::Connection);
        }
    }
}
