//! The backend's sandbox, entered once start-up is over: the vhost-user listener, the log
//! and pid files are open, the process is in the background and the signal thread runs.
//! From here on baton serves vhost-user connections and guest flows, and needs neither
//! privilege nor new files.
//!
//! Theory of operation — each step removes something a compromised baton could abuse, and
//! the order matters:
//!
//! 1. [`threads::others`]: list the threads that already exist (the signal thread) while
//!    /proc can still be read: the per-thread steps below must be repeated on them.
//! 2. [`caps`]: become the `--runas` user (root in the initial user namespace: `nobody`,
//!    as passt), after dropping the capability bounding set while `CAP_SETPCAP` is still
//!    there; then no capability in any set.
//! 3. `PR_SET_NO_NEW_PRIVS` (no privilege gained through exec) and `PR_SET_DUMPABLE` 0 (no
//!    ptrace by same-uid processes, no core dump, /proc files owned by root).
//! 4. [`landlock`]: a ruleset that handles every filesystem access right; the only rule is
//!    for the repair socket's directory (bound before the sandbox; its file is removed
//!    at exit).
//! 5. [`threads::enter_others`]: steps 2–4 are per thread in the kernel; the threads of
//!    step 1 run them on themselves from a signal handler.
//! 6. [`seccomp`]: an allow-list of the system calls of the serve loop and the network
//!    code, synchronised over all threads; anything else kills the process. Last, because
//!    the steps above need calls that are not on the list.
//!
//! A mechanism the kernel lacks is handled as follows: Landlock missing or older than the
//! ABI asked for → enforced as far as the kernel can, with a warning or a note in the log,
//! and baton goes on (seccomp still forbids opening files). Capabilities, no_new_privs
//! and seccomp have no fallback: failing to set them up is an error and baton exits.
//! There is deliberately no option to turn the sandbox off.

pub mod caps;
pub mod landlock;
pub mod seccomp;
pub mod threads;

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;

use crate::cli::RunAsError;
use crate::config::RuntimeConfig;

/// A sandbox step failed; baton must not serve.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    RunAs(#[from] RunAsError),
    #[error(
        "cannot switch to uid {uid} gid {gid} ({failure}): only root can change its user; \
         start baton as root, or drop --runas"
    )]
    SwitchUser {
        uid: u32,
        gid: u32,
        failure: StepFailure,
    },
    #[error("sandbox: {step}: {errno}")]
    Sys { step: &'static str, errno: Errno },
    #[error("sandbox: listing the threads in /proc/self/task: {0}")]
    ListThreads(#[source] std::io::Error),
    #[error("sandbox, {thread}: {failure}")]
    Thread {
        thread: ThreadId,
        failure: StepFailure,
    },
    #[error(
        "sandbox: {answered} of {signalled} threads applied the per-thread steps within \
         {timeout_ms} ms (a thread blocking real-time signals cannot be sandboxed)"
    )]
    ThreadsTimedOut {
        answered: usize,
        signalled: usize,
        timeout_ms: u128,
    },
    #[error("landlock: {0}")]
    Landlock(#[from] ::landlock::RulesetError),
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
}

/// Which thread a per-thread step failed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadId {
    /// The thread that called [`enter`].
    Caller,
    /// Another thread, by kernel thread id.
    Other(i32),
}

impl fmt::Display for ThreadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThreadId::Caller => f.write_str("main thread"),
            ThreadId::Other(tid) => write!(f, "thread {tid}"),
        }
    }
}

/// A per-thread step ([`caps::enter_thread`], no_new_privs, Landlock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    ReadCapabilities = 1,
    RaiseSetpcap,
    BoundingSet,
    Setgroups,
    Setresgid,
    Setresuid,
    AmbientSet,
    ClearCapabilities,
    CapabilitiesLeft,
    NoNewPrivs,
    LandlockRestrictSelf,
}

impl Step {
    const ALL: [Step; 11] = [
        Step::ReadCapabilities,
        Step::RaiseSetpcap,
        Step::BoundingSet,
        Step::Setgroups,
        Step::Setresgid,
        Step::Setresuid,
        Step::AmbientSet,
        Step::ClearCapabilities,
        Step::CapabilitiesLeft,
        Step::NoNewPrivs,
        Step::LandlockRestrictSelf,
    ];

    fn from_code(code: u8) -> Option<Step> {
        Step::ALL.into_iter().find(|step| *step as u8 == code)
    }

    fn name(self) -> &'static str {
        match self {
            Step::ReadCapabilities => "capget",
            Step::RaiseSetpcap => "raise CAP_SETPCAP to drop the bounding set",
            Step::BoundingSet => "PR_CAPBSET_DROP",
            Step::Setgroups => "setgroups",
            Step::Setresgid => "setresgid",
            Step::Setresuid => "setresuid",
            Step::AmbientSet => "PR_CAP_AMBIENT_CLEAR_ALL",
            Step::ClearCapabilities => "capset (clear every set)",
            Step::CapabilitiesLeft => "capabilities still set after capset",
            Step::NoNewPrivs => "PR_SET_NO_NEW_PRIVS",
            Step::LandlockRestrictSelf => "landlock_restrict_self",
        }
    }
}

/// A per-thread step and the `errno` it failed with (0 when the failure is a check, not
/// a system call). Plain data, so that a signal handler can report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepFailure {
    pub step: Step,
    pub errno: i32,
}

impl StepFailure {
    /// `errno` of the calling thread, which the failed system call just set.
    fn last(step: Step) -> StepFailure {
        StepFailure {
            step,
            errno: Errno::last_raw(),
        }
    }

    /// Packed into one word for an atomic: never 0.
    fn pack(self) -> u64 {
        (u64::from(self.step as u8) << 32) | u64::from(self.errno as u32)
    }

    fn unpack(word: u64) -> Option<StepFailure> {
        let step = Step::from_code((word >> 32) as u8)?;
        Some(StepFailure {
            step,
            errno: word as u32 as i32,
        })
    }
}

impl fmt::Display for StepFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.errno == 0 {
            f.write_str(self.step.name())
        } else {
            write!(f, "{}: {}", self.step.name(), Errno::from_raw(self.errno))
        }
    }
}

/// Enter the whole sandbox (steps 1–6 above). `vhost_user_socket` is the path the
/// listener was bound to, if any (the repair socket's default location derives from it).
pub fn enter(rt: &RuntimeConfig, vhost_user_socket: Option<&Path>) -> Result<(), SandboxError> {
    let others = threads::others()?;

    let identity = caps::target_identity(rt.runas.as_ref())?;
    caps::enter_thread(identity).map_err(|failure| match (identity, failure.step) {
        (Some(id), Step::Setgroups | Step::Setresgid | Step::Setresuid) => {
            SandboxError::SwitchUser {
                uid: id.uid,
                gid: id.gid,
                failure,
            }
        }
        _ => SandboxError::Thread {
            thread: ThreadId::Caller,
            failure,
        },
    })?;
    nix::sys::prctl::set_no_new_privs().map_err(|errno| SandboxError::Sys {
        step: "PR_SET_NO_NEW_PRIVS",
        errno,
    })?;
    nix::sys::prctl::set_dumpable(false).map_err(|errno| SandboxError::Sys {
        step: "PR_SET_DUMPABLE",
        errno,
    })?;

    let paths = landlock::RuntimePaths::for_runtime(rt, vhost_user_socket);
    let ruleset = landlock::ruleset(&paths)?;
    // The same ruleset for the other threads (none if the kernel has no Landlock).
    let for_others: Option<OwnedFd> = ruleset
        .try_clone()
        .map_err(|e| SandboxError::Sys {
            step: "duplicate the Landlock ruleset",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?
        .into();
    let landlock_status = landlock::restrict_this_thread(ruleset)?;
    threads::enter_others(&others, identity, for_others.as_ref().map(|fd| fd.as_fd()))?;
    drop(for_others);

    // getuid/getgid are not on the allow-list: ask before.
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    let syscalls = seccomp::apply()?;
    tracing::info!(
        uid = uid.as_raw(),
        gid = gid.as_raw(),
        threads = others.len() + 1,
        seccomp_syscalls = syscalls,
        landlock = ?landlock_status,
        "sandbox entered: no capabilities, no_new_privs, Landlock, seccomp"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_failures_survive_packing() {
        for step in Step::ALL {
            for errno in [0, libc::EPERM, libc::EINVAL] {
                let failure = StepFailure { step, errno };
                assert_ne!(failure.pack(), 0);
                assert_eq!(StepFailure::unpack(failure.pack()), Some(failure));
            }
        }
        assert_eq!(StepFailure::unpack(0), None);
    }
}
