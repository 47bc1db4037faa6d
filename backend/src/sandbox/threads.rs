//! Per-thread sandbox steps, repeated on the threads that already exist.
//!
//! Theory of operation: uids, gids, capabilities, the bounding set, no_new_privs and the
//! Landlock domain belong to a *thread*, and a new thread copies them from the thread
//! that creates it. seccomp can install its filter on every thread at once (TSYNC);
//! Landlock only from ABI 8 (Linux 7.0), the rest not at all. When baton enters the
//! sandbox one other thread already runs — the signal thread of
//! [`crate::runtime::handle_signals`] — and every later thread (the vhost-user threads)
//! is created by a sandboxed one. So:
//! * [`others`] lists the other threads first, while /proc/self/task can still be read;
//! * [`enter_others`] makes each of them run [`caps::enter_thread`], `PR_SET_NO_NEW_PRIVS`
//!   and `landlock_restrict_self(2)` on itself, from the handler of a real-time signal
//!   sent with tgkill(2) — the way glibc applies setuid(2) to every thread. The handler
//!   makes raw system calls only and reports through atomics; the caller waits (bounded)
//!   for every thread to answer and fails if one did not, or if a step failed there.
//!
//! This runs before seccomp: tgkill and rt_sigaction are not on its allow-list.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::caps::{self, Identity};
use super::{SandboxError, Step, StepFailure, ThreadId};

/// How long the other threads get to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

// What the handler applies, and what it reports. Written before the signals are sent,
// read by the handlers; one broadcast at a time (BROADCAST).
static HAS_IDENTITY: AtomicBool = AtomicBool::new(false);
static IDENTITY: AtomicU64 = AtomicU64::new(0);
static LANDLOCK_FD: AtomicI32 = AtomicI32::new(-1);
static ANSWERS: AtomicUsize = AtomicUsize::new(0);
static FAILURE: AtomicU64 = AtomicU64::new(0);
static FAILED_TID: AtomicI32 = AtomicI32::new(0);
static BROADCAST: Mutex<()> = Mutex::new(());

/// The kernel thread ids of this process, except the calling thread.
pub fn others() -> Result<Vec<libc::pid_t>, SandboxError> {
    let me = nix::unistd::gettid().as_raw();
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").map_err(SandboxError::ListThreads)? {
        let entry = entry.map_err(SandboxError::ListThreads)?;
        if let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<libc::pid_t>().ok())
        {
            if tid != me {
                tids.push(tid);
            }
        }
    }
    Ok(tids)
}

/// The per-thread steps, on the calling thread, as the handler applies them.
/// Async-signal-safe.
fn enter_this_thread() -> Result<(), StepFailure> {
    let identity = HAS_IDENTITY.load(Ordering::SeqCst).then(|| {
        let word = IDENTITY.load(Ordering::SeqCst);
        Identity {
            uid: (word >> 32) as u32,
            gid: word as u32,
        }
    });
    caps::enter_thread(identity)?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integers only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(StepFailure::last(Step::NoNewPrivs));
    }
    let ruleset = LANDLOCK_FD.load(Ordering::SeqCst);
    if ruleset >= 0 {
        // SAFETY: landlock_restrict_self(2) takes a ruleset descriptor (kept open by
        // enter_others until every thread answered) and flags; no pointers.
        let rc = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) };
        if rc != 0 {
            return Err(StepFailure::last(Step::LandlockRestrictSelf));
        }
    }
    Ok(())
}

extern "C" fn on_signal(_signal: libc::c_int) {
    let saved_errno = Errno::last_raw();
    if let Err(failure) = enter_this_thread() {
        if FAILURE
            .compare_exchange(0, failure.pack(), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            // SAFETY: gettid(2) takes no arguments.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            FAILED_TID.store(tid as i32, Ordering::SeqCst);
        }
    }
    ANSWERS.fetch_add(1, Ordering::SeqCst);
    Errno::set_raw(saved_errno);
}

/// Make every thread in `tids` (from [`others`]) switch to `identity`, drop its
/// capabilities, set no_new_privs and enter the Landlock domain of `landlock_ruleset`.
pub fn enter_others(
    tids: &[libc::pid_t],
    identity: Option<Identity>,
    landlock_ruleset: Option<BorrowedFd<'_>>,
) -> Result<(), SandboxError> {
    if tids.is_empty() {
        return Ok(());
    }
    let _one_at_a_time = BROADCAST
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    HAS_IDENTITY.store(identity.is_some(), Ordering::SeqCst);
    if let Some(id) = identity {
        IDENTITY.store(
            (u64::from(id.uid) << 32) | u64::from(id.gid),
            Ordering::SeqCst,
        );
    }
    LANDLOCK_FD.store(
        landlock_ruleset.map_or(-1, |fd| fd.as_raw_fd()),
        Ordering::SeqCst,
    );
    ANSWERS.store(0, Ordering::SeqCst);
    FAILURE.store(0, Ordering::SeqCst);

    let signal = libc::SIGRTMIN();
    let sys = |step: &'static str| {
        move || SandboxError::Sys {
            step,
            errno: Errno::last(),
        }
    };
    // SAFETY: sigaction structs are plain C data for which all-zero bytes are valid.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = libc::SA_RESTART;
    // SAFETY: as above.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset writes the mask inside our struct; sigaction reads `action`
    // and writes `previous`, both owned by this frame. The handler is async-signal-safe.
    let installed = unsafe {
        libc::sigemptyset(&mut action.sa_mask) == 0
            && libc::sigaction(signal, &action, &mut previous) == 0
    };
    if !installed {
        return Err(sys("sigaction for the per-thread steps")());
    }

    let pid = nix::unistd::getpid().as_raw();
    let mut signalled = 0;
    for &tid in tids {
        // SAFETY: tgkill(2) takes integers only; it reaches only threads of this process.
        let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal) };
        if rc == 0 {
            signalled += 1;
        } else if Errno::last() != Errno::ESRCH {
            // Leave the handler installed: signals already sent may still arrive.
            return Err(sys("tgkill for the per-thread steps")());
        }
        // ESRCH: the thread has exited meanwhile.
    }

    let deadline = Instant::now() + ANSWER_TIMEOUT;
    while ANSWERS.load(Ordering::SeqCst) < signalled {
        if Instant::now() >= deadline {
            return Err(SandboxError::ThreadsTimedOut {
                answered: ANSWERS.load(Ordering::SeqCst),
                signalled,
                timeout_ms: ANSWER_TIMEOUT.as_millis(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Every handler has run: no signal is outstanding, the default action can return.
    // SAFETY: restores the action saved above from a struct owned by this frame.
    if unsafe { libc::sigaction(signal, &previous, std::ptr::null_mut()) } != 0 {
        return Err(sys("sigaction restore")());
    }
    LANDLOCK_FD.store(-1, Ordering::SeqCst);

    if let Some(failure) = StepFailure::unpack(FAILURE.load(Ordering::SeqCst)) {
        return Err(SandboxError::Thread {
            thread: ThreadId::Other(FAILED_TID.load(Ordering::SeqCst)),
            failure,
        });
    }
    tracing::debug!(
        threads = signalled,
        "per-thread sandbox steps applied to the other threads"
    );
    Ok(())
}
