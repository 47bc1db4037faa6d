//! Process set-up around the device: logging, the vhost-user listener, running in the
//! background like passt (fork, then the pid file), and signals.
//!
//! Order matters for the tools that start baton: the listening socket exists before the
//! parent process returns, so a VM manager may start QEMU as soon as `baton` exits; the
//! pid file names the process that serves, so it is written after the fork.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{fork, setsid, ForkResult};
use tracing::{error, info};
use vhost::vhost_user::Listener;

use crate::cli::LogLevel;
use crate::config::{default_socket_candidates, LogConfig, VhostUserEndpoint};
use crate::vu::serve::Stopper;

/// Process set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("listening on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("no free socket path among /tmp/baton_1.socket … /tmp/baton_64.socket")]
    NoFreeSocketPath,
    #[error("--fd {fd}: {reason}")]
    InheritedFd { fd: RawFd, reason: String },
    #[error("opening log file {path}: {source}")]
    LogFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing pid file {path}: {source}")]
    PidFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("going to the background: {0}")]
    Daemonize(nix::errno::Errno),
    #[error("signal handling: {0}")]
    Signals(std::io::Error),
}

/// Set up `tracing` as the command line asks.
pub fn init_logging(log: &LogConfig) -> Result<(), RuntimeError> {
    let level = match log.level {
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_thread_names(false);
    match &log.file {
        Some(path) if !log.stderr => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| RuntimeError::LogFile {
                    path: path.clone(),
                    source,
                })?;
            let writer = CappedLog {
                file,
                limit: log.file_size_limit,
            };
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(writer))
                .init();
        }
        _ => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

/// A log file that never grows beyond `limit` bytes (`--log-size`): when the next entry
/// would cross it, the file is emptied first, so the oldest entries go and the newest
/// are kept. (passt keeps a sliding window; starting over is the simple bounded form.)
struct CappedLog {
    file: std::fs::File,
    limit: u64,
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let len = self.file.metadata()?.len();
        if len + buf.len() as u64 > self.limit {
            self.file.set_len(0)?;
            std::io::Seek::seek(&mut self.file, std::io::SeekFrom::Start(0))?;
            self.file
                .write_all(b"(log truncated: --log-size reached)\n")?;
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// The vhost-user listening socket, and its path if we created one.
pub fn open_listener(
    endpoint: &VhostUserEndpoint,
) -> Result<(Listener, Option<PathBuf>), RuntimeError> {
    match endpoint {
        VhostUserEndpoint::Listen(path) => {
            let listener = bind_listening(path).map_err(|source| RuntimeError::Listen {
                path: path.clone(),
                source: vhost::vhost_user::Error::SocketError(source),
            })?;
            Ok((listener, Some(path.clone())))
        }
        VhostUserEndpoint::ProbeDefault => {
            for path in default_socket_candidates() {
                if path_in_use(&path) {
                    continue;
                }
                if let Ok(listener) = bind_listening(&path) {
                    return Ok((listener, Some(path)));
                }
            }
            Err(RuntimeError::NoFreeSocketPath)
        }
        VhostUserEndpoint::Inherited(fd) => {
            let fd = *fd;
            let accepting = socket_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN).map_err(|e| {
                RuntimeError::InheritedFd {
                    fd,
                    reason: format!("not a socket: {e}"),
                }
            })?;
            if accepting == 0 {
                return Err(RuntimeError::InheritedFd {
                    fd,
                    reason: "baton needs a listening UNIX socket here; serving an already connected one is not supported yet (use --socket PATH)".into(),
                });
            }
            // SAFETY: the fd was handed to us for exactly this use and is a listening
            // socket (checked above); the Listener owns it from here on.
            let listener = unsafe { Listener::from_raw_fd(fd) };
            Ok((listener, None))
        }
    }
}

/// A listening UNIX socket at `path`, which appears only once it listens: bound under a
/// temporary name in the same directory, then renamed over `path` (replacing a stale
/// socket file). A frontend or test that waits for the file and then connects could
/// otherwise meet the moment between bind and listen ("connection refused").
///
/// The file is not removed when the listener is dropped (the caller removes it at exit,
/// see `main`), unlike `Listener::new`'s.
fn bind_listening(path: &Path) -> std::io::Result<Listener> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("the socket path has no file name"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(name);
    temporary_name.push(format!(".{}.binding", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    let _ = std::fs::remove_file(&temporary);
    let bound = std::os::unix::net::UnixListener::bind(&temporary)?;
    if let Err(e) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    // SAFETY: the descriptor is a listening UNIX socket we own; the Listener takes it
    // over (without a path, so it does not unlink anything on drop).
    Ok(unsafe { Listener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(bound)) })
}

fn path_in_use(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

fn socket_int(fd: RawFd, level: i32, name: i32) -> std::io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt of an int into a local of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, as passt does: every guest flow
/// holds a host socket, and the common soft default (1,024) would cap the guest far
/// below the flow tables. Returns the limit now in force. Must run before the sandbox
/// (its seccomp filter does not allow `setrlimit`). A limit still below the flow
/// tables is logged, so that refused connections later have an explanation.
pub fn raise_nofile(max_flows: usize) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!("reading RLIMIT_NOFILE: {e}");
            return 0;
        }
    };
    let limit = if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!("raising RLIMIT_NOFILE from {soft} to {hard}: {e}");
                soft
            }
        }
    } else {
        soft
    };
    // TCP and UDP tables each hold up to `max_flows` sockets.
    let wanted = (max_flows as u64).saturating_mul(2);
    if limit < wanted {
        tracing::info!(
            "RLIMIT_NOFILE is {limit}: fewer than {wanted} flows (--max-flows {max_flows} \
             TCP + UDP) fit; connections beyond it are refused and logged"
        );
    }
    presize_fd_table(limit.min(wanted).min(FD_TABLE_PRESIZE));
    limit
}

/// The most descriptor slots [`presize_fd_table`] reserves (8 bytes each).
const FD_TABLE_PRESIZE: u64 = 1 << 16;

/// Grow the descriptor table to `slots` now. The kernel grows it by doubling, and in a
/// process with more than one thread every growth waits for an RCU grace period
/// (`expand_fdtable` calls `synchronize_rcu`): thousands of descriptors arriving at once
/// — a migration target taking 10,000 sockets over `SCM_RIGHTS`, or restoring them —
/// paid several grace periods, 50-100 ms here (measured: 6,000 descriptors received in
/// 2 ms by a single-threaded process, 17 ms by one with a second thread). Done once at
/// start, the table costs `slots` × 8 bytes. Best effort.
fn presize_fd_table(slots: u64) {
    let Some(highest) = slots
        .checked_sub(1)
        .and_then(|s| libc::c_int::try_from(s).ok())
    else {
        return;
    };
    let probe = match std::fs::File::open("/dev/null") {
        Ok(file) => file,
        Err(err) => {
            tracing::debug!("descriptor table not pre-sized: /dev/null: {err}");
            return;
        }
    };
    // SAFETY: F_DUPFD_CLOEXEC duplicates `probe` (or fails) onto the lowest free number
    // >= `highest`; the new descriptor is closed at once and owned by nobody else.
    let dup = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest) };
    if dup < 0 {
        tracing::debug!(
            "descriptor table not pre-sized to {slots}: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: `dup` is a descriptor this function just created.
    unsafe { libc::close(dup) };
}

/// Fork to the background like passt: the parent exits at once (the socket already
/// exists), the child starts a new session and drops its terminal. Must run before any
/// thread is started.
pub fn daemonize() -> Result<(), RuntimeError> {
    // SAFETY: no other thread exists yet (called before logging threads, the signal
    // thread and the device threads), so the child is a faithful copy.
    match unsafe { fork() }.map_err(RuntimeError::Daemonize)? {
        ForkResult::Parent { .. } => std::process::exit(0),
        ForkResult::Child => {}
    }
    setsid().map_err(RuntimeError::Daemonize)?;
    let devnull = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| {
            RuntimeError::Daemonize(nix::errno::Errno::from_raw(
                e.raw_os_error().unwrap_or(libc::EIO),
            ))
        })?;
    for target in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors of this process.
        unsafe { libc::dup2(devnull.as_raw_fd(), target) };
    }
    Ok(())
}

/// Write our pid to `path`.
pub fn write_pid_file(path: &Path) -> Result<(), RuntimeError> {
    let mut file = std::fs::File::create(path).map_err(|source| RuntimeError::PidFile {
        path: path.to_path_buf(),
        source,
    })?;
    writeln!(file, "{}", std::process::id()).map_err(|source| RuntimeError::PidFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Block SIGTERM, SIGINT and SIGHUP in the calling thread (and every thread it starts
/// later; spawned programs start unblocked). Called first thing: the socket exists before the
/// signal thread does, and a manager that sees the socket and stops baton at once must
/// get an orderly shutdown (the signal stays pending until [`handle_signals`] waits for
/// it), not death by the default action.
pub fn block_stop_signals() -> Result<SigSet, RuntimeError> {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(sig);
    }
    set.thread_block()
        .map_err(|e| RuntimeError::Signals(std::io::Error::from(e)))?;
    Ok(set)
}

/// Block SIGTERM, SIGINT and SIGHUP in every thread and handle them on one thread of
/// their own: the first stops serving cleanly.
pub fn handle_signals(stopper: Arc<Stopper>) -> Result<(), RuntimeError> {
    let set = block_stop_signals()?;
    std::thread::Builder::new()
        .name("baton-signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(sig) => {
                    info!("{sig:?}: shutting down");
                    stopper.stop();
                }
                Err(e) => {
                    error!("waiting for signals: {e}");
                    return;
                }
            }
        })
        .map_err(RuntimeError::Signals)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_file_never_grows_beyond_its_limit_and_keeps_the_newest_entries() {
        let path = std::env::temp_dir().join(format!("baton-capped-log-{}", std::process::id()));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut log = CappedLog { file, limit: 1000 };
        for i in 0..100 {
            writeln!(log, "entry {i:03} ............................").unwrap();
            assert!(std::fs::metadata(&path).unwrap().len() <= 1000);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("entry 099"), "the newest entry is kept");
        assert!(!text.contains("entry 000"), "the oldest entries go");
        std::fs::remove_file(&path).unwrap();
    }
}
