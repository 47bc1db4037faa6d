//! The link to the `baton-repair` helper: who provides it, whether it is alive, and how
//! the network engine gets it.
//!
//! # Theory of operation
//!
//! A migration source needs the privileged helper for its TCP sockets (freeze, dump,
//! and a silent close in repair mode at the end). The helper comes from one of two places:
//!
//! * `--helper PATH`: baton has it started on a socketpair when one is wanted (see
//!   below; the sandbox forbids baton itself to fork and exec);
//! * `--repair-path` (default: the vhost-user socket path plus `.repair`): baton listens
//!   there and a helper started by the management layer (`baton-repair PATH`, the
//!   KubeVirt/libvirt way) connects. [`RepairListener::accept`] accepts only peers whose
//!   `SO_PEERCRED` uid is ours or root, and does the hello.
//!
//! One thread (`baton-repair-link`, started before the sandbox so that the sandbox's
//! per-thread steps cover it) waits in `poll` on the listener and on a duplicate of the
//! current helper's socket (for its hang-up). It never blocks the vhost-user thread or
//! the device worker:
//!
//! * a helper that attaches becomes *pending* here; the engine picks it up the next time
//!   it needs one ([`RepairLink::update`]), under its own lock — the link never takes the
//!   engine's lock, so the engine may wait here (bounded) at SAVE while holding it;
//! * while a helper is alive, further ones are accepted and closed at once (as passt
//!   does): one helper serves one backend;
//! * a helper whose socket hangs up is logged; the engine drops its client at the next
//!   [`RepairLink::update`], and a new helper may attach.
//!
//! `LOG_ALL` (a migration starts) asks [`RepairLink::migration_starting`], which logs
//! what will happen, and starts the pre-dump pass ([`crate::predump`]), whose thread
//! waits here for a helper ([`RepairLink::wait_for_fresh_helper`]) without holding the
//! engine's lock; the bounded wait for a late helper at SAVE happens on the transfer
//! thread ([`SAVE_WAIT`]).
//!
//! With `--helper PATH` the helper is not started at start-up but whenever one is wanted
//! and none is attached — at `LOG_ALL`, when a LOAD begins, when the engine asks
//! ([`RepairLink::update`]) — by the launcher process forked before the sandbox
//! ([`crate::launcher`]): [`RepairLink::set_spawner`]. Its thread attaches the helper it
//! started ([`RepairLink::attach_spawned`]) and reports its hang-up
//! ([`RepairLink::helper_gone`]); a helper that died is replaced at the next need.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use baton_repair_ipc::{ClientError, RepairClient, RepairListener};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{accept4, getsockopt, sockopt, SockFlag};
use tracing::{debug, info, warn};

/// How long a connecting helper may take for its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long SAVE waits for a helper to attach when none is there and TCP connections
/// exist. The VM is stopped meanwhile, so this is downtime — but only when the operator
/// ignored the warning logged at `LOG_ALL`, which comes a whole RAM pre-copy earlier.
pub const SAVE_WAIT: Duration = Duration::from_secs(2);

/// Pause after an unexpected accept failure, so that a persistent one does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(200);

/// Starting the link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("starting the repair link thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("watching the repair helper's socket: duplicating it: {0}")]
    Dup(#[source] std::io::Error),
}

/// What the engine should do with its helper after [`RepairLink::update`].
#[derive(Debug)]
pub enum Update {
    /// Keep what it has (or go on without one).
    Unchanged,
    /// A new helper attached: use it from now on (attachment number inside).
    Attached(RepairClient, u64),
    /// The helper the engine holds went away: drop it.
    Gone,
}

#[derive(Debug, Default)]
struct LinkState {
    /// A helper that attached and was not handed to the engine yet.
    pending: Option<RepairClient>,
    /// Helpers attached so far; each gets the next number.
    attachments: u64,
    /// The number of the helper connected now, if any.
    alive: Option<u64>,
    /// A helper start through the spawner was asked for and is not over yet.
    spawning: bool,
}

/// Shared between the link thread, the device (for `LOG_ALL`) and the engine.
#[derive(Debug)]
pub struct RepairLink {
    /// The `--repair-path` socket, if baton listens on one.
    path: Option<PathBuf>,
    /// A helper was started with `--helper` (for messages).
    spawned: bool,
    state: Mutex<LinkState>,
    changed: Condvar,
    /// Starts helpers on request (`--helper`), see [`crate::launcher`].
    spawner: OnceLock<Arc<crate::launcher::Spawner>>,
}

impl RepairLink {
    /// A link with no helper and no way to get one (`--repair-path none`, no `--helper`).
    pub fn none() -> Arc<RepairLink> {
        Arc::new(RepairLink {
            path: None,
            spawned: false,
            state: Mutex::new(LinkState::default()),
            changed: Condvar::new(),
            spawner: OnceLock::new(),
        })
    }

    /// Start the link: `spawned` is a helper started with `--helper`, `listener` the
    /// `--repair-path` socket. Call before the sandbox (the thread must exist by then).
    pub fn start(
        listener: Option<RepairListener>,
        spawned: Option<RepairClient>,
    ) -> Result<Arc<RepairLink>, LinkError> {
        let link = Arc::new(RepairLink {
            path: listener.as_ref().map(|l| l.path().to_path_buf()),
            spawned: spawned.is_some(),
            state: Mutex::new(LinkState::default()),
            changed: Condvar::new(),
            spawner: OnceLock::new(),
        });
        if listener.is_none() && spawned.is_none() {
            return Ok(link);
        }
        let watch = match spawned {
            Some(client) => Some(link.attach(client).map_err(LinkError::Dup)?),
            None => None,
        };
        let thread_link = link.clone();
        std::thread::Builder::new()
            .name("baton-repair-link".into())
            .spawn(move || thread_link.run(listener, watch))
            .map_err(LinkError::Spawn)?;
        Ok(link)
    }

    /// The `--repair-path` socket, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether a helper is connected now.
    pub fn attached(&self) -> bool {
        self.lock().alive.is_some()
    }

    /// Start helpers through `spawner` from now on (once; later calls are ignored).
    pub fn set_spawner(&self, spawner: Arc<crate::launcher::Spawner>) {
        let _ = self.spawner.set(spawner);
    }

    /// Whether helpers can be started on demand (`--helper`).
    pub fn can_spawn(&self) -> bool {
        self.spawner.get().is_some()
    }

    /// A helper will be wanted soon (a LOAD begins): start one now if none is attached.
    pub fn want_helper(&self) {
        let mut state = self.lock();
        let _ = self.request_spawn(&mut state);
    }

    /// Ask the spawner for a helper, unless one is attached, waiting to be picked up, or
    /// being started. Returns whether a start was asked for (or is under way).
    fn request_spawn(&self, state: &mut LinkState) -> bool {
        let Some(spawner) = self.spawner.get() else {
            return false;
        };
        if state.alive.is_some() || state.pending.is_some() {
            return false;
        }
        if !state.spawning {
            state.spawning = true;
            spawner.wake();
        }
        true
    }

    /// For the spawner: whether a start is still wanted (nothing attached meanwhile).
    pub(crate) fn spawn_wanted(&self) -> bool {
        let state = self.lock();
        state.spawning && state.alive.is_none()
    }

    /// For the spawner: the start asked for is over (attached or failed).
    pub(crate) fn spawn_over(&self) {
        self.lock().spawning = false;
        self.changed.notify_all();
    }

    /// For the spawner: attach the helper it started, unless another one is alive (then
    /// `None`, and dropping `client` makes the newcomer exit). Returns a duplicate of
    /// its socket to watch, and its number.
    pub(crate) fn attach_spawned(
        &self,
        client: RepairClient,
    ) -> Option<std::io::Result<(OwnedFd, u64)>> {
        let watch = match client.as_fd().try_clone_to_owned() {
            Ok(watch) => watch,
            Err(e) => return Some(Err(e)),
        };
        let state = self.lock();
        if state.alive.is_some() {
            return None;
        }
        Some(Ok((watch, self.install(state, client))))
    }

    /// For the spawner: the helper it started (`number`) hung up.
    pub(crate) fn helper_gone(&self, number: u64) {
        self.gone(number);
    }

    /// `LOG_ALL`: a migration starts. Say loudly what happens without a helper, and how
    /// to provide one; SAVE waits for it ([`SAVE_WAIT`]).
    pub fn migration_starting(&self) {
        if self.attached() {
            info!("migration starting: repair helper attached");
            return;
        }
        if let Some(spawner) = self.spawner.get() {
            info!(
                "migration starting: starting the repair helper {}",
                spawner.helper_path().display()
            );
            self.want_helper();
            return;
        }
        match &self.path {
            Some(path) => warn!(
                "migration starting and no baton-repair helper is attached: start \
                 `baton-repair {}` (with CAP_NET_ADMIN) now; SAVE waits {:?} for it, \
                 then TCP connections will not survive this migration (unless the target runs \
                 on this host, in this network namespace)",
                path.display(),
                SAVE_WAIT
            ),
            None if self.spawned => warn!(
                "migration starting and the baton-repair helper started with --helper is \
                 gone (no --repair-path to attach another): TCP connections will not \
                 survive this migration (unless the target runs on this host, in this \
                 network namespace)"
            ),
            None => warn!(
                "migration starting without any repair helper (--repair-path none and no \
                 --helper): TCP connections will not survive this migration (unless the \
                 target runs on this host, in this network namespace)"
            ),
        }
    }

    /// Wait up to `timeout` for a helper that the engine has not picked up yet (one
    /// attaching, or with `--helper` one started for this call when none is alive).
    /// Used by the pre-dump pass ([`crate::predump`]), which must not wait under the
    /// engine lock. Returns whether one is waiting to be picked up.
    pub fn wait_for_fresh_helper(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.pending.is_some() {
                return true;
            }
            if state.alive.is_none() && !self.request_spawn(&mut state) && self.path.is_none() {
                // Nothing can bring one.
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = match self.changed.wait_timeout(state, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// What the engine should do with its helper. `held`: the attachment number of the
    /// helper it holds (`None`: it holds none). With no helper held and none pending,
    /// wait up to `wait` for one to attach.
    pub fn update(&self, held: Option<u64>, wait: Duration) -> Update {
        let deadline = Instant::now() + wait;
        let mut state = self.lock();
        let mut asked = false;
        loop {
            if let Some(client) = state.pending.take() {
                return Update::Attached(client, state.attachments);
            }
            match held {
                Some(number) if state.alive == Some(number) => return Update::Unchanged,
                Some(_) => return Update::Gone,
                None => {}
            }
            // Nothing attached (a helper that died may still count as alive until the
            // link notices): have one started (`--helper`), once per call; if that
            // failed and no socket can bring another, there is nothing to wait for.
            if !asked {
                asked = self.request_spawn(&mut state);
            }
            if self.can_spawn() && state.alive.is_none() && !state.spawning && self.path.is_none() {
                return Update::Unchanged;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Update::Unchanged;
            }
            state = match self.changed.wait_timeout(state, left) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Make `client` the pending helper; returns a duplicate of its socket to watch.
    fn attach(&self, client: RepairClient) -> std::io::Result<(OwnedFd, u64)> {
        let watch = client.as_fd().try_clone_to_owned()?;
        let state = self.lock();
        Ok((watch, self.install(state, client)))
    }

    /// Make `client` the pending helper (`state` is the link's, locked) and wake those
    /// waiting for one; returns its attachment number.
    fn install(&self, mut state: MutexGuard<'_, LinkState>, client: RepairClient) -> u64 {
        state.attachments += 1;
        let number = state.attachments;
        info!(
            attachment = number,
            "repair helper ready: {}",
            client.helper_software().escape_debug()
        );
        state.pending = Some(client);
        state.alive = Some(number);
        drop(state);
        self.changed.notify_all();
        number
    }

    /// Helper `number` hung up.
    fn gone(&self, number: u64) {
        let mut state = self.lock();
        if state.alive == Some(number) {
            state.alive = None;
            if state.attachments == number {
                // Not picked up yet: nobody should get a dead helper.
                state.pending = None;
            }
        }
        drop(state);
        self.changed.notify_all();
        if let Some(spawner) = self.spawner.get() {
            warn!(
                attachment = number,
                "the repair helper went away; {} is started again when a migration needs it",
                spawner.helper_path().display()
            );
            return;
        }
        match &self.path {
            Some(path) => warn!(
                attachment = number,
                "the repair helper went away; TCP connections cannot be migrated until \
                 another one attaches at {}",
                path.display()
            ),
            None => warn!(
                attachment = number,
                "the repair helper went away; TCP connections cannot be migrated (no \
                 --repair-path to attach another)"
            ),
        }
    }

    /// The link thread: accept helpers, watch the current one. Runs until the process
    /// exits.
    fn run(self: Arc<Self>, listener: Option<RepairListener>, mut watch: Option<(OwnedFd, u64)>) {
        loop {
            let mut fds = Vec::with_capacity(2);
            if let Some((fd, _)) = &watch {
                // No events asked: the hang-up (POLLHUP, which a UNIX stream socket
                // reports once its peer closed) is always reported. Asking for POLLIN
                // would wake on every reply the helper sends.
                fds.push(PollFd::new(fd.as_fd(), PollFlags::empty()));
            }
            if let Some(listener) = &listener {
                fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            }
            if fds.is_empty() {
                // The spawned helper went away and there is no socket to attach another.
                return;
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => {
                    warn!("repair link: poll: {errno}");
                    std::thread::sleep(ACCEPT_RETRY);
                    continue;
                }
            }
            let hangup = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
            let (helper_gone, incoming) = match (&watch, fds.as_slice()) {
                (Some(_), [helper, rest @ ..]) => (
                    helper.revents().is_some_and(|r| r.intersects(hangup)),
                    rest.first().and_then(|fd| fd.revents()),
                ),
                (_, fds) => (false, fds.first().and_then(|fd| fd.revents())),
            };
            drop(fds);
            if helper_gone {
                if let Some((_, number)) = watch.take() {
                    self.gone(number);
                }
            }
            let Some(listener) = &listener else { continue };
            if !incoming.is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR)) {
                continue;
            }
            if watch.is_some() || self.attached() {
                // `attached()`: a helper the spawner started is alive.
                refuse_another(listener);
                continue;
            }
            match listener.accept(HELLO_TIMEOUT) {
                Ok(client) => match self.attach(client) {
                    Ok(watched) => watch = Some(watched),
                    Err(e) => warn!("repair link: {}", LinkError::Dup(e)),
                },
                // Only peers that were refused (wrong uid) came; already logged.
                Err(ClientError::AcceptTimedOut { .. }) => {}
                Err(e) => {
                    warn!("repair socket {}: {e}", listener.path().display());
                    std::thread::sleep(ACCEPT_RETRY);
                }
            }
        }
    }
}

/// A helper is attached already: accept the newcomer and close it at once, so that it
/// exits instead of waiting forever.
fn refuse_another(listener: &RepairListener) {
    match accept4(listener.as_fd().as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
        Ok(raw) => {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            let peer = getsockopt(&conn, sockopt::PeerCredentials).ok();
            warn!(
                pid = peer.map(|c| c.pid()),
                uid = peer.map(|c| c.uid()),
                "repair socket {}: a helper is attached already; refusing another",
                listener.path().display()
            );
        }
        Err(Errno::EAGAIN | Errno::EINTR | Errno::ECONNABORTED) => {}
        Err(errno) => {
            debug!("repair socket: accept: {errno}");
            std::thread::sleep(ACCEPT_RETRY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A fake helper: answers the hello on `stream` like baton-repair does, then holds
    /// the connection until dropped.
    fn fake_helper(stream: UnixStream) -> std::thread::JoinHandle<UnixStream> {
        std::thread::spawn(move || {
            use baton_proto::repair::{Hello, Reply};
            let frame = baton_repair_ipc::transport::recv_frame(stream.as_fd(), None)
                .expect("hello frame")
                .expect("not EOF");
            let _: baton_proto::repair::Request =
                baton_proto::decode(&frame.body).expect("decodes");
            let mut hello = Hello::ours(baton_proto::repair::caps::ALL_V1);
            hello.min_version = hello.max_version;
            baton_repair_ipc::transport::send_message(
                stream.as_fd(),
                &Reply::Hello(hello),
                &[],
                None,
            )
            .expect("hello reply");
            stream
        })
    }

    fn spawned_pair() -> (RepairClient, UnixStream) {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let helper = fake_helper(theirs);
        let client = RepairClient::from_stream(ours, HELLO_TIMEOUT).expect("hello");
        (client, helper.join().expect("fake helper"))
    }

    #[test]
    fn a_spawned_helper_is_handed_over_once_and_its_death_is_noticed() {
        let (client, theirs) = spawned_pair();
        let link = RepairLink::start(None, Some(client)).expect("link");
        assert!(link.attached());
        let Update::Attached(_client, number) = link.update(None, Duration::ZERO) else {
            panic!("the spawned helper is handed to the engine");
        };
        assert!(matches!(
            link.update(Some(number), Duration::ZERO),
            Update::Unchanged
        ));
        drop(theirs);
        let deadline = Instant::now() + Duration::from_secs(10);
        while link.attached() {
            assert!(Instant::now() < deadline, "the hang-up was not noticed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(
            link.update(Some(number), Duration::ZERO),
            Update::Gone
        ));
    }

    #[test]
    fn without_any_helper_update_waits_only_as_long_as_asked() {
        let link = RepairLink::none();
        assert!(!link.attached());
        assert!(matches!(
            link.update(None, Duration::from_millis(20)),
            Update::Unchanged
        ));
    }

    #[test]
    fn a_helper_attaching_at_the_socket_wakes_a_waiting_save() {
        let dir = std::env::temp_dir().join(format!("baton-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("vu.sock.repair");
        let listener = RepairListener::bind(&path).expect("bind");
        let link = RepairLink::start(Some(listener), None).expect("link");
        assert!(!link.attached());
        let connecting = std::thread::spawn({
            let path = path.clone();
            move || {
                std::thread::sleep(Duration::from_millis(100));
                let stream = UnixStream::connect(&path).expect("connect");
                fake_helper(stream).join().expect("fake helper")
            }
        });
        let Update::Attached(_, first) = link.update(None, Duration::from_secs(20)) else {
            panic!("no helper within the wait");
        };
        let _held = connecting.join().expect("helper thread");
        // A second helper while the first is alive is closed at once (EOF, no hello).
        let mut second = UnixStream::connect(&path).expect("connect");
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut second, &mut buf).expect("EOF"), 0);
        assert!(matches!(
            link.update(Some(first), Duration::ZERO),
            Update::Unchanged
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
