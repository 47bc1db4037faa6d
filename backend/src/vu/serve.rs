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

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tracing::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::NetBackend;
use super::{NetworkEngine, ENGINE_EVENT};

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

/// Serve vhost-user connections on `listener` until stopped (or after the first one
/// with `one_off`).
pub fn serve(
    listener: &mut Listener,
    engine: Arc<Mutex<dyn NetworkEngine>>,
    one_off: bool,
    stopper: &Stopper,
) -> Result<(), ServeError> {
    let engine_fd = {
        let guard = engine.lock().unwrap_or_else(|p| p.into_inner());
        guard.poll_fd().as_raw_fd()
    };
    loop {
        if !wait_for_connection(listener, stopper)? {
            info!("stopping: no longer accepting vhost-user connections");
            return Ok(());
        }
        let backend = Arc::new(NetBackend::new(engine.clone()));
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
        if one_off || stopper.requested() {
            return Ok(());
        }
    }
}

/// Wait until the listener has a connection (true) or a stop was requested (false).
fn wait_for_connection(listener: &Listener, stopper: &Stopper) -> Result<bool, ServeError> {
    loop {
        if stopper.requested() {
            return Ok(false);
        }
        // SAFETY: the listener and the eventfd stay open for the duration of these
        // borrows (both outlive this function call).
        let (listen_fd, wake_fd) = unsafe {
            (
                BorrowedFd::borrow_raw(listener.as_raw_fd()),
                BorrowedFd::borrow_raw(stopper.wake.as_raw_fd()),
            )
        };
        let mut fds = [
            PollFd::new(listen_fd, PollFlags::POLLIN),
            PollFd::new(wake_fd, PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ServeError::Poll(e)),
        }
        if stopper.requested() {
            return Ok(false);
        }
        let ready = fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        if ready {
            return Ok(true);
        }
    }
}
