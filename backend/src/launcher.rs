//! The helper launcher: a tiny process that starts `baton-repair` for the sandboxed
//! backend, on request, whenever a migration needs one (issue 5).
//!
//! # Theory of operation
//!
//! The sandbox forbids baton to fork or exec once it serves, yet a helper is wanted when
//! a migration starts (`LOG_ALL`), and again after the previous one died. So at start-up,
//! while baton is still one thread and before its sandbox, [`Launcher::start`] forks a
//! launcher process that keeps nothing but one end of a `SOCK_SEQPACKET` socketpair to
//! baton and the helper path named with `--helper`:
//!
//! ```text
//!  baton (sandboxed)                         launcher (forked at start-up)
//!  [REQUEST, seq] ──────────────────────────▶ kill + reap the helper it started before
//!                                            socketpair(); fork+exec
//!                                              `baton-repair --fd N` (clean environment)
//!  [seq, OK, 0] + baton's end (SCM_RIGHTS) ◀─ (or [seq, FAILED, errno])
//!  hello, attach (crate::repair_link)
//! ```
//!
//! What a compromised baton can do with it: have *the helper named at start-up* started
//! again, with no argument, environment or descriptor of baton's choosing — nothing it
//! could not do by waiting for a migration. One helper at a time: a request replaces the
//! helper started before (baton asks only when it has none it can use), so requests
//! cannot pile up processes. Any other message ends the launcher.
//!
//! What the launcher keeps ([`become_launcher`]): it dies with baton
//! (`PR_SET_PDEATHSIG`, and it exits when baton's end of the socketpair closes); every
//! descriptor but the standard ones, its socket and the helper binary is closed (the
//! binary is opened at start-up, still as the user baton started as, and executed by
//! descriptor: the user it switches to need not be able to reach the file's directory,
//! and the file it runs cannot be swapped under its name later); it runs as the backend's
//! user after its sandbox (`nobody` when started as root) with
//! [`caps::keep_net_admin_for_exec`]: `CAP_NET_ADMIN` alone in its permitted,
//! inheritable, ambient and bounding sets, so a plain helper binary gets exactly that
//! capability; then `no_new_privs` and not dumpable. When baton itself had no
//! `CAP_NET_ADMIN`, the helper must get it from its file (`setcap cap_net_admin+ep`, or
//! setuid root), which exec can only grant without `no_new_privs` — so then the
//! launcher holds no capability at all but keeps exec able to grant privilege. No
//! seccomp filter and no Landlock domain: the helper inherits both, and before its own
//! sandbox it needs program start-up (exec, dynamic loading, executable mappings; a
//! read-only Landlock domain made exec fail with `EACCES` on Linux 6.x, ABI 7). What
//! the launcher can be made to do is bounded by its two-byte protocol instead.
//!
//! In baton, [`Spawner`] serves the repair link ([`crate::repair_link`]): the link asks
//! for a helper when none is attached (at `LOG_ALL`, at a LOAD, when SAVE finds none);
//! the spawner's thread asks the launcher, does the hello, attaches the helper to the
//! link and watches it for its hang-up. A start that fails is logged loudly.

use std::ffi::CString;
use std::ffi::OsString;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use baton_repair_ipc::{ClientError, RepairClient};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::unistd::{fork, ForkResult, Pid};
use tracing::{info, warn};

use crate::repair_link::{RepairLink, HELLO_TIMEOUT};
use crate::sandbox::caps::{self, Identity, PassOn};

/// The one request: start a helper (second byte: a sequence number echoed in the reply).
const REQUEST_SPAWN: u8 = b'H';
/// Reply status: started; baton's end of its socketpair comes with the reply.
const STATUS_STARTED: u8 = 0;
/// Reply status: not started; an errno follows.
const STATUS_FAILED: u8 = 1;
/// `[seq, status, errno (4 bytes, little endian)]`.
const REPLY_LEN: usize = 6;
/// How long baton waits for the launcher's reply (it forks and execs, nothing more).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The launcher's descriptor for its socket (after it closed everything else).
const CONTROL_FD: RawFd = 3;
/// Where the launcher keeps the helper binary (an `O_PATH` descriptor).
const HELPER_FD: RawFd = 4;
/// The launcher's process name (`/proc/PID/comm`).
pub const LAUNCHER_NAME: &str = "baton-launcher";

/// The launcher could not be started, or did not start a helper.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("--helper {path}: {reason}", path = path.display())]
    Helper { path: PathBuf, reason: String },
    #[error("the helper launcher must be started before any thread (found {0} other threads)")]
    Threads(usize),
    #[error("helper launcher: {0}")]
    ListThreads(String),
    #[error("helper launcher: {step}: {errno}")]
    Sys { step: &'static str, errno: Errno },
    #[error("helper launcher: {0}")]
    Gone(&'static str),
    #[error("starting {path}: {errno}", path = path.display())]
    Spawn { path: PathBuf, errno: Errno },
    #[error("{path} did not answer the hello: {source}", path = path.display())]
    Hello {
        path: PathBuf,
        #[source]
        source: ClientError,
    },
    #[error("starting the helper spawner thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn sys(step: &'static str) -> impl FnOnce(Errno) -> LauncherError {
    move |errno| LauncherError::Sys { step, errno }
}

/// baton's handle on its launcher process.
#[derive(Debug)]
pub struct Launcher {
    control: Mutex<Control>,
    helper: PathBuf,
    pid: Pid,
}

#[derive(Debug)]
struct Control {
    socket: OwnedFd,
    seq: u8,
}

impl Launcher {
    /// Check `helper` and fork the launcher. Call while the process has a single thread
    /// (before the signal thread, the repair link and the sandbox); `identity` is the
    /// user the backend's sandbox will switch to.
    pub fn start(helper: &Path, identity: Option<Identity>) -> Result<Launcher, LauncherError> {
        let helper = resolve_helper(helper)?;
        let others = crate::sandbox::threads::others()
            .map_err(|e| LauncherError::ListThreads(e.to_string()))?
            .len();
        if others != 0 {
            return Err(LauncherError::Threads(others));
        }
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(sys("socketpair"))?;
        let parent = nix::unistd::getpid();
        // SAFETY: the process has a single thread (checked above), so the child is a
        // faithful copy and may allocate; it never returns from `launcher_main`.
        match unsafe { fork() }.map_err(sys("fork"))? {
            ForkResult::Child => {
                drop(ours);
                let code = launcher_main(theirs, &helper, identity, parent);
                // SAFETY: _exit ends the child at once, without running the parent's
                // atexit handlers or flushing its copies of buffers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                Ok(Launcher {
                    control: Mutex::new(Control {
                        socket: ours,
                        seq: 0,
                    }),
                    helper,
                    pid: child,
                })
            }
        }
    }

    /// The helper binary (absolute path).
    pub fn helper_path(&self) -> &Path {
        &self.helper
    }

    /// The launcher's process id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Have the launcher start a helper, then do the hello. Blocks up to a few seconds.
    pub fn spawn_helper(&self) -> Result<RepairClient, LauncherError> {
        let mut control = self.lock();
        // Never 0: a reply that cannot be read counts as sequence 0 and is skipped.
        control.seq = control.seq.checked_add(1).unwrap_or(1);
        let seq = control.seq;
        let request = [REQUEST_SPAWN, seq];
        let sent =
            nix::sys::socket::send(control.socket.as_raw_fd(), &request, MsgFlags::MSG_NOSIGNAL);
        match sent {
            Ok(2) => {}
            Ok(_) => return Err(LauncherError::Gone("request cut short")),
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(LauncherError::Gone("exited")),
            Err(errno) => return Err(sys("send the request")(errno)),
        }
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let (status, errno, fd) = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LauncherError::Gone("no reply in time"));
            }
            let mut fds = [PollFd::new(control.socket.as_fd(), PollFlags::POLLIN)];
            let millis = u16::try_from(left.as_millis().saturating_add(1)).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(millis)) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(errno) => return Err(sys("wait for the reply")(errno)),
            }
            let Some(reply) = receive_reply(control.socket.as_fd())? else {
                return Err(LauncherError::Gone("exited"));
            };
            // A reply to an earlier request that timed out: its helper (if any) goes
            // with the descriptor dropped here.
            if reply.0 == seq {
                break (reply.1, reply.2, reply.3);
            }
        };
        drop(control);
        match (status, fd) {
            (STATUS_STARTED, Some(fd)) => {
                RepairClient::from_stream(UnixStream::from(fd), HELLO_TIMEOUT).map_err(|source| {
                    LauncherError::Hello {
                        path: self.helper.clone(),
                        source,
                    }
                })
            }
            (STATUS_STARTED, None) => Err(LauncherError::Gone("reply without a socket")),
            _ => Err(LauncherError::Spawn {
                path: self.helper.clone(),
                errno: Errno::from_raw(errno),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One reply: (seq, status, errno, descriptor). `None` at EOF.
type Reply = (u8, u8, i32, Option<OwnedFd>);

fn receive_reply(socket: BorrowedFd<'_>) -> Result<Option<Reply>, LauncherError> {
    let mut buf = [0u8; REPLY_LEN];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = match recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    ) {
        Ok(msg) => msg,
        Err(Errno::EAGAIN | Errno::EINTR) => return Ok(Some((0, 0, 0, None))),
        Err(errno) => return Err(sys("receive the reply")(errno)),
    };
    let mut fd = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for r in raw {
                    // SAFETY: SCM_RIGHTS just installed this descriptor in our table;
                    // nothing else owns it. Extra ones are closed at once.
                    let owned = unsafe { OwnedFd::from_raw_fd(r) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
        }
    }
    let len = msg.bytes;
    if len == 0 && fd.is_none() {
        return Ok(None);
    }
    if len != REPLY_LEN {
        // Not ours (a launcher never sends this): treat like a stale reply.
        return Ok(Some((0, 0, 0, None)));
    }
    let errno = i32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]);
    Ok(Some((buf[0], buf[1], errno, fd)))
}

/// The helper as the launcher will exec it: an absolute path to an executable file
/// (searched in `PATH` when it has no slash), checked now so that a typo is a start-up
/// error, not a failed migration.
fn resolve_helper(helper: &Path) -> Result<PathBuf, LauncherError> {
    let bad = |reason: String| LauncherError::Helper {
        path: helper.to_path_buf(),
        reason,
    };
    let found = if helper.as_os_str().as_bytes().contains(&b'/') {
        helper.to_path_buf()
    } else {
        let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
        std::env::split_paths(&path)
            .map(|dir| dir.join(helper))
            .find(|candidate| candidate.is_file())
            .ok_or_else(|| bad("not found in PATH".into()))?
    };
    let absolute = std::fs::canonicalize(&found).map_err(|e| bad(e.to_string()))?;
    let meta = std::fs::metadata(&absolute).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    nix::unistd::access(&absolute, nix::unistd::AccessFlags::X_OK)
        .map_err(|errno| bad(format!("not executable: {errno}")))?;
    Ok(absolute)
}

// ---------------------------------------------------------------------------------------
// The launcher process
// ---------------------------------------------------------------------------------------

/// The forked launcher: confine itself, then serve requests until baton goes away.
/// Returns the exit status. Logs nothing (the log file may be closed here); every
/// outcome goes back to baton in the reply, which logs it.
fn launcher_main(control: OwnedFd, helper: &Path, identity: Option<Identity>, parent: Pid) -> i32 {
    let Ok((control, binary)) = become_launcher(control, helper, identity, parent) else {
        return 1;
    };
    let Ok(program) = HelperProgram::new(helper, binary) else {
        return 1;
    };
    serve(&control, &program)
}

/// Everything the launcher gives up before it serves (see the module documentation).
fn become_launcher(
    control: OwnedFd,
    helper: &Path,
    identity: Option<Identity>,
    parent: Pid,
) -> Result<(OwnedFd, OwnedFd), ()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(());
    }
    // The parent may have died before the line above: then nobody would kill us.
    if nix::unistd::getppid() != parent {
        return Err(());
    }
    let _ = nix::sys::prctl::set_name(c"baton-launcher");
    // The socket at a known number, everything else above the standard descriptors
    // closed: the vhost-user and repair listeners, the log file, the pid file.
    // SAFETY: dup2 onto a descriptor number this process owns from here on.
    if control.as_raw_fd() != CONTROL_FD
        && unsafe { libc::dup2(control.as_raw_fd(), CONTROL_FD) } != CONTROL_FD
    {
        return Err(());
    }
    std::mem::forget(control);
    // SAFETY: CONTROL_FD was just made (or already was) the socket; this is its owner.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    // SAFETY: F_SETFD takes an integer flag; the helper must not inherit the socket.
    if unsafe { libc::fcntl(CONTROL_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(());
    }
    // The helper binary, opened while we are still who baton started as.
    let binary = nix::fcntl::open(
        helper,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|_| ())?;
    // SAFETY: dup2 onto a descriptor number this process owns from here on (whatever
    // was there is closed with the rest just below).
    if binary != HELPER_FD && unsafe { libc::dup2(binary, HELPER_FD) } != HELPER_FD {
        return Err(());
    }
    // SAFETY: F_SETFD takes an integer flag. Close-on-exec: execveat(2) with
    // AT_EMPTY_PATH reads the program before it closes the descriptor.
    if unsafe { libc::fcntl(HELPER_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(());
    }
    // SAFETY: HELPER_FD holds the binary now; this is its owner.
    let binary = unsafe { OwnedFd::from_raw_fd(HELPER_FD) };
    close_other_descriptors()?;
    let pass_on = caps::keep_net_admin_for_exec(identity).map_err(|_| ())?;
    if pass_on == PassOn::Ambient {
        nix::sys::prctl::set_no_new_privs().map_err(|_| ())?;
    }
    nix::sys::prctl::set_dumpable(false).map_err(|_| ())?;
    // SIGTERM, SIGINT and SIGHUP stay blocked, as baton blocked them for its signal
    // thread: the launcher ends with baton, not on its own. (A helper starts with an
    // empty signal mask: [`start_helper`] resets it.)
    Ok((control, binary))
}

/// Close every descriptor above [`HELPER_FD`].
fn close_other_descriptors() -> Result<(), ()> {
    // SAFETY: close_range(2) takes integers only; the range holds nothing we keep.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (HELPER_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // Kernels before 5.9: list them.
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(|_| ())?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd: &RawFd| fd > HELPER_FD)
        .collect();
    for fd in open {
        // SAFETY: closing descriptors this process no longer uses (the directory
        // listing's own descriptor is already closed and fails harmlessly).
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// The launcher's loop: one helper at a time, started on request.
fn serve(control: &OwnedFd, helper: &HelperProgram) -> i32 {
    let mut current: Option<(HelperProcess, Option<OwnedFd>)> = None;
    loop {
        let mut fds = vec![PollFd::new(control.as_fd(), PollFlags::POLLIN)];
        if let Some((_, Some(pidfd))) = &current {
            fds.push(PollFd::new(pidfd.as_fd(), PollFlags::POLLIN));
        }
        // Without a pidfd (kernels before 5.3), reap the helper now and then.
        let timeout = match &current {
            Some((_, None)) => PollTimeout::from(1000u16),
            _ => PollTimeout::NONE,
        };
        let control_events = match poll(&mut fds, timeout) {
            Ok(_) => fds[0].revents().unwrap_or(PollFlags::empty()),
            Err(Errno::EINTR) => continue,
            Err(_) => return 1,
        };
        drop(fds);
        if let Some((child, _)) = &mut current {
            if child.exited() {
                current = None;
            }
        }
        if !control_events.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            continue;
        }
        let mut request = [0u8; 4];
        let seq =
            match nix::sys::socket::recv(control.as_raw_fd(), &mut request, MsgFlags::MSG_DONTWAIT)
            {
                // baton went away.
                Ok(0) => return 0,
                Ok(2) if request[0] == REQUEST_SPAWN => request[1],
                // Not baton's protocol: a bug or a compromised backend; stop serving it.
                Ok(_) => return 1,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(_) => return 1,
            };
        if let Some((child, _)) = current.take() {
            child.end();
        }
        let (reply, fd) = match start_helper(helper) {
            Ok((child, baton_end)) => {
                let pidfd = pidfd_open(child.pid.as_raw() as u32);
                current = Some((child, pidfd));
                ([seq, STATUS_STARTED, 0, 0, 0, 0], Some(baton_end))
            }
            Err(errno) => {
                let e = (errno as i32).to_le_bytes();
                ([seq, STATUS_FAILED, e[0], e[1], e[2], e[3]], None)
            }
        };
        let raw: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
        let sent = sendmsg::<()>(
            control.as_raw_fd(),
            &[IoSlice::new(&reply)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        // Our copy of baton's end goes now: the helper's connection is baton's alone.
        drop(fd);
        if sent.is_err() {
            return 0;
        }
    }
}

/// The helper binary (by descriptor) and the name it runs under.
struct HelperProgram {
    binary: OwnedFd,
    /// `argv[0]`: the binary's file name.
    name: CString,
}

impl HelperProgram {
    fn new(path: &Path, binary: OwnedFd) -> Result<Self, ()> {
        let name = path
            .file_name()
            .map(OsStrExt::as_bytes)
            .unwrap_or(b"baton-repair");
        let name = CString::new(name).map_err(|_| ())?;
        Ok(HelperProgram { binary, name })
    }
}

/// A running helper, the launcher's child.
struct HelperProcess {
    pid: Pid,
}

impl HelperProcess {
    /// Whether it has exited (reaped if so).
    fn exited(&self) -> bool {
        !matches!(
            nix::sys::wait::waitpid(self.pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)),
            Ok(nix::sys::wait::WaitStatus::StillAlive)
        )
    }

    /// Kill and reap it.
    fn end(self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

/// Start `helper --fd N` on a fresh socketpair; returns the child and baton's end.
///
/// By hand rather than with `std::process::Command`, which can only exec a path: the
/// program is executed from its descriptor (`execveat` with `AT_EMPTY_PATH`). A
/// close-on-exec pipe carries the errno of a failed exec back, as `Command` does.
fn start_helper(helper: &HelperProgram) -> Result<(HelperProcess, OwnedFd), Errno> {
    let (baton_end, helper_end) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    let raw = helper_end.as_raw_fd();
    let fd_arg = CString::new(raw.to_string()).map_err(|_| Errno::EINVAL)?;
    let argv: [*const libc::c_char; 4] = [
        helper.name.as_ptr(),
        c"--fd".as_ptr(),
        fd_arg.as_ptr(),
        std::ptr::null(),
    ];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let binary = helper.binary.as_raw_fd();
    // SAFETY: the launcher has a single thread; the child only makes async-signal-safe
    // calls (sigprocmask, fcntl, prctl, open, dup2, execveat, write, _exit) on memory
    // prepared before the fork.
    match unsafe { fork() }? {
        ForkResult::Child => {
            let errno = exec_helper(binary, raw, &argv, &envp);
            let bytes = errno.to_le_bytes();
            // SAFETY: write(2) of a local buffer to our end of the pipe, then _exit.
            unsafe {
                libc::write(report_write.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
                libc::_exit(127)
            }
        }
        ForkResult::Parent { child } => {
            drop(report_write);
            drop(helper_end);
            let mut errno = [0u8; 4];
            let read = loop {
                match nix::unistd::read(report_read.as_raw_fd(), &mut errno) {
                    Err(Errno::EINTR) => continue,
                    other => break other,
                }
            };
            let process = HelperProcess { pid: child };
            match read {
                // The pipe closed on exec: the helper runs.
                Ok(0) => Ok((process, baton_end)),
                Ok(4) => {
                    process.end();
                    Err(Errno::from_raw(i32::from_le_bytes(errno)))
                }
                Ok(_) => {
                    process.end();
                    Err(Errno::EIO)
                }
                Err(e) => {
                    process.end();
                    Err(e)
                }
            }
        }
    }
}

/// In the forked child: prepare and exec the helper; returns the errno of the step that
/// failed.
fn exec_helper(
    binary: RawFd,
    helper_end: RawFd,
    argv: &[*const libc::c_char; 4],
    envp: &[*const libc::c_char; 1],
) -> i32 {
    // SAFETY: only async-signal-safe calls with integer arguments or pointers to
    // NUL-terminated strings and NULL-terminated arrays that outlive the calls.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0
            || libc::fcntl(helper_end, libc::F_SETFD, 0) == -1
            || libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
        {
            return *libc::__errno_location();
        }
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null < 0 || libc::dup2(null, 0) < 0 || libc::dup2(null, 1) < 0 {
            return *libc::__errno_location();
        }
        if null > 2 {
            libc::close(null);
        }
        libc::syscall(
            libc::SYS_execveat,
            binary,
            c"".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
        *libc::__errno_location()
    }
}

/// A descriptor that becomes readable when process `pid` exits (Linux 5.3).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags; it returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    // SAFETY: a non-negative return is a fresh descriptor nothing else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

// ---------------------------------------------------------------------------------------
// In baton: the spawner thread
// ---------------------------------------------------------------------------------------

/// Starts helpers through the [`Launcher`] when the repair link wants one, and watches
/// the helper it started (see the module documentation).
#[derive(Debug)]
pub struct Spawner {
    launcher: Launcher,
    wake: EventFd,
}

impl Spawner {
    /// Serve `link` from a thread of its own (call before the sandbox, so that its
    /// per-thread steps cover the thread).
    pub fn start(launcher: Launcher, link: &Arc<RepairLink>) -> Result<(), LauncherError> {
        let wake = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|errno| LauncherError::Thread(errno.into()))?;
        let spawner = Arc::new(Spawner { launcher, wake });
        link.set_spawner(Arc::clone(&spawner));
        let link = Arc::clone(link);
        std::thread::Builder::new()
            .name("baton-spawner".into())
            .spawn(move || spawner.run(&link))
            .map_err(LauncherError::Thread)?;
        Ok(())
    }

    /// The helper binary.
    pub fn helper_path(&self) -> &Path {
        self.launcher.helper_path()
    }

    /// Ask the thread for a helper (the link has marked the start as under way).
    pub fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            warn!("waking the helper spawner: {e}");
        }
    }

    fn run(&self, link: &RepairLink) {
        let mut watch: Option<(OwnedFd, u64)> = None;
        loop {
            let mut fds = vec![PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
            if let Some((fd, _)) = &watch {
                // No events asked: a hang-up is always reported (see repair_link).
                fds.push(PollFd::new(fd.as_fd(), PollFlags::empty()));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => {
                    warn!("helper spawner: poll: {errno}");
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            }
            let hangup = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
            let gone = fds
                .get(1)
                .and_then(|fd| fd.revents())
                .is_some_and(|r| r.intersects(hangup));
            let woken = fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN));
            drop(fds);
            if gone {
                if let Some((_, number)) = watch.take() {
                    link.helper_gone(number);
                }
            }
            if !woken {
                continue;
            }
            let _ = self.wake.read();
            if watch.is_none() && link.spawn_wanted() {
                watch = self.spawn(link);
            }
            link.spawn_over();
        }
    }

    /// Start one helper and attach it; returns what to watch.
    fn spawn(&self, link: &RepairLink) -> Option<(OwnedFd, u64)> {
        let started = Instant::now();
        match self.launcher.spawn_helper() {
            Ok(client) => {
                info!(
                    "{} started through the launcher in {:.1} ms",
                    self.helper_path().display(),
                    started.elapsed().as_secs_f64() * 1e3
                );
                match link.attach_spawned(client) {
                    Some(Ok(watched)) => Some(watched),
                    Some(Err(e)) => {
                        warn!("watching the started helper: {e}");
                        None
                    }
                    // Another helper attached meanwhile; ours exits with its socket.
                    None => None,
                }
            }
            Err(e) => {
                warn!(
                    "could not start the repair helper: {e}; TCP connections cannot be \
                     migrated until a baton-repair helper is available{}",
                    link.path()
                        .map(|p| format!(" (or attaches at {})", p.display()))
                        .unwrap_or_default()
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helper_path_is_checked_at_start_up() {
        assert!(resolve_helper(Path::new("/nonexistent/baton-repair")).is_err());
        assert!(resolve_helper(Path::new("/etc/passwd")).is_err());
        assert!(resolve_helper(Path::new("/")).is_err());
        let sh = resolve_helper(Path::new("sh")).expect("sh in PATH");
        assert!(sh.is_absolute());
    }
}
