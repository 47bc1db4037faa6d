//! Getting the one connection to the backend.
//!
//! Theory of operation:
//! * `PATH` is a socket: connect once; failure is fatal.
//! * `PATH` is a directory (the KubeVirt/libvirt case, where the backend is started as part
//!   of the migration and nobody can start the helper afterwards): watch it with inotify
//!   for created or moved-in entries, *then* list it (so a socket created before the watch
//!   was set is not missed), and connect to the first `*.repair` socket that accepts.
//!   A socket file exists from the backend's `bind()` on, but refuses connections until
//!   its `listen()`; a file left over by a dead backend refuses for ever. So a refusing
//!   candidate is retried every [`RETRY_INTERVAL`] until the deadline, while new entries
//!   keep being watched for.
//! * `--fd N`: adopt an inherited descriptor after checking that it is an open, connected
//!   UNIX stream socket.
//!
//! Arguments naming something unusable (no such path, not a socket or directory, `--fd`
//! not a UNIX stream socket) are usage errors (exit status 2).

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

/// How often a socket that refused the connection is tried again.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(10);
/// File-name suffix of a backend's repair socket.
pub const REPAIR_SUFFIX: &str = ".repair";

/// The connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{path}: {reason}", path = path.display())]
    UnusablePath { path: PathBuf, reason: String },
    #[error("--fd {fd}: {reason}")]
    UnusableFd { fd: i32, reason: String },
    #[error("connect to {path}: {source}", path = path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("wait for a *.repair socket in {dir}: {step}: {errno}", dir = dir.display())]
    Watch {
        dir: PathBuf,
        step: &'static str,
        errno: Errno,
    },
    #[error("no *.repair socket in {dir} accepted a connection within {timeout:?}", dir = dir.display())]
    TimedOut { dir: PathBuf, timeout: Duration },
}

impl ConnectError {
    /// Whether the error is the command line's fault (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ConnectError::UnusablePath { .. } | ConnectError::UnusableFd { .. }
        )
    }
}

/// Connect to `path`, a socket or a directory to wait in (at most `timeout`, if given).
pub fn connect_path(path: &Path, timeout: Option<Duration>) -> Result<UnixStream, ConnectError> {
    let meta = std::fs::metadata(path).map_err(|e| ConnectError::UnusablePath {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if meta.is_dir() {
        tracing::info!(
            "waiting for a *{REPAIR_SUFFIX} socket in {}",
            path.display()
        );
        return wait_in_directory(path, timeout);
    }
    if !meta.file_type().is_socket() {
        return Err(ConnectError::UnusablePath {
            path: path.to_path_buf(),
            reason: "neither a socket nor a directory".into(),
        });
    }
    UnixStream::connect(path).map_err(|source| ConnectError::Connect {
        path: path.to_path_buf(),
        source,
    })
}

fn is_repair_name(name: &OsStr) -> bool {
    let bytes = name.as_bytes();
    bytes.len() > REPAIR_SUFFIX.len() && bytes.ends_with(REPAIR_SUFFIX.as_bytes())
}

/// What one connection attempt to a candidate found.
enum Attempt {
    Connected(UnixStream),
    /// Bound but not listening yet, or stale: try again later.
    Refused,
    /// Gone, or not a socket: forget it.
    NotACandidate,
}

fn try_candidate(path: &Path) -> Attempt {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        _ => return Attempt::NotACandidate,
    }
    match UnixStream::connect(path) {
        Ok(stream) => Attempt::Connected(stream),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Attempt::Refused,
        Err(e) => {
            tracing::warn!("connect to {}: {e}", path.display());
            Attempt::NotACandidate
        }
    }
}

/// Wait (inotify) for a `*.repair` socket in `dir` that accepts a connection.
pub fn wait_in_directory(
    dir: &Path,
    timeout: Option<Duration>,
) -> Result<UnixStream, ConnectError> {
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let watch_error = |step: &'static str| {
        move |errno: Errno| ConnectError::Watch {
            dir: dir.to_path_buf(),
            step,
            errno,
        }
    };
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
        .map_err(watch_error("inotify_init1"))?;
    inotify
        .add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        .map_err(watch_error("inotify_add_watch"))?;

    // Listed after the watch is set: nothing created in between is missed.
    let mut candidates: BTreeSet<OsString> = std::fs::read_dir(dir)
        .map_err(|e| ConnectError::UnusablePath {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?
        .filter_map(|entry| entry.ok().map(|e| e.file_name()))
        .filter(|name| is_repair_name(name))
        .collect();
    let mut refused_logged = BTreeSet::new();

    loop {
        let mut any_refused = false;
        let names: Vec<OsString> = candidates.iter().cloned().collect();
        for name in names {
            let path = dir.join(&name);
            match try_candidate(&path) {
                Attempt::Connected(stream) => {
                    tracing::info!("connected to {}", path.display());
                    return Ok(stream);
                }
                Attempt::Refused => {
                    any_refused = true;
                    if refused_logged.insert(name.clone()) {
                        tracing::debug!("{} refuses connections (yet); retrying", path.display());
                    }
                }
                Attempt::NotACandidate => {
                    candidates.remove(&name);
                }
            }
        }

        let now = Instant::now();
        let left = match deadline {
            Some(deadline) if now >= deadline => {
                return Err(ConnectError::TimedOut {
                    dir: dir.to_path_buf(),
                    timeout: timeout.unwrap_or_default(),
                })
            }
            Some(deadline) => Some(deadline - now),
            None => None,
        };
        let wait = match (any_refused, left) {
            (true, Some(left)) => Some(left.min(RETRY_INTERVAL)),
            (true, None) => Some(RETRY_INTERVAL),
            (false, left) => left,
        };
        let poll_timeout = match wait {
            None => PollTimeout::NONE,
            Some(wait) => PollTimeout::try_from(wait.as_millis().saturating_add(1))
                .unwrap_or(PollTimeout::MAX),
        };
        let mut pollfds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut pollfds, poll_timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(errno) => return Err(watch_error("poll")(errno)),
        }
        loop {
            match inotify.read_events() {
                Ok(events) => {
                    for event in events {
                        if let Some(name) = event.name.filter(|n| is_repair_name(n)) {
                            refused_logged.remove(&name);
                            candidates.insert(name);
                        }
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(watch_error("read")(errno)),
            }
        }
    }
}

/// Adopt the inherited descriptor `fd`: it must be an open, connected UNIX stream socket.
/// It is made close-on-exec.
pub fn adopt_fd(fd: i32) -> Result<UnixStream, ConnectError> {
    let unusable = |reason: String| ConnectError::UnusableFd { fd, reason };
    fcntl(fd, FcntlArg::F_GETFD)
        .map_err(|errno| unusable(format!("not an open descriptor ({errno})")))?;
    // SAFETY: `fd` is open (F_GETFD succeeded) and was inherited through exec: nothing
    // in this process owns it, so it may be wrapped (and closed) exactly once, here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|errno| unusable(format!("F_SETFD: {errno}")))?;
    let domain = getsockname::<SockaddrStorage>(fd)
        .map_err(|errno| unusable(format!("not a socket ({errno})")))?
        .family();
    let kind = getsockopt(&owned, sockopt::SockType)
        .map_err(|errno| unusable(format!("not a socket ({errno})")))?;
    if domain != Some(AddressFamily::Unix) || kind != SockType::Stream {
        return Err(unusable(format!(
            "a {domain:?} {kind:?} socket, not a UNIX stream socket"
        )));
    }
    let stream = UnixStream::from(owned);
    if let Err(e) = stream.peer_addr() {
        return Err(unusable(format!("not connected ({e})")));
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repair_names() {
        assert!(is_repair_name(OsStr::new("vm1.socket.repair")));
        assert!(is_repair_name(OsStr::new("x.repair")));
        assert!(!is_repair_name(OsStr::new(".repair")));
        assert!(!is_repair_name(OsStr::new("x.repair.tmp")));
        assert!(!is_repair_name(OsStr::new("x.socket")));
    }

    #[test]
    fn adopting_a_pipe_is_a_usage_error() {
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let raw = std::os::fd::IntoRawFd::into_raw_fd(r);
        let err = adopt_fd(raw).expect_err("pipe");
        assert!(err.is_usage(), "{err}");
    }

    #[test]
    fn adopting_a_closed_descriptor_is_a_usage_error() {
        let err = adopt_fd(1_000_000).expect_err("closed");
        assert!(err.is_usage(), "{err}");
    }
}
