//! The helper's sandbox, entered after connecting and before the first request is read.
//!
//! Theory of operation — each step removes something the next request could abuse, and
//! the order matters:
//!
//! 1. [`caps`]: when setuid, become the real user (keeping capabilities across the
//!    switch); then keep `CAP_NET_ADMIN` alone in every capability set and in the
//!    bounding set. Needs `CAP_SETPCAP` for the bounding set, so it runs while that is
//!    still available.
//! 2. `PR_SET_NO_NEW_PRIVS` (no privilege gained through exec) and `PR_SET_DUMPABLE` 0
//!    (no ptrace, no core dump, /proc files owned by root).
//! 3. [`landlock`]: a ruleset that handles every filesystem access right and allows none.
//!    The helper's only path-based action, connecting to the backend, is already done.
//! 4. [`seccomp`]: an allow-list of the system calls the serve loop and the repair
//!    library make; anything else kills the process. Last, because the steps above need
//!    calls that are not on the list. It is installed on every thread (TSYNC); the
//!    helper's worker thread is started just before it, after steps 1–3, which it
//!    inherits (see `crate::worker`).

pub mod caps;
pub mod landlock;
pub mod seccomp;

use nix::errno::Errno;

/// A sandbox step failed; the helper must not serve requests.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "CAP_NET_ADMIN is not in the permitted capability set. Run baton-repair as root, or \
         install it with `setcap cap_net_admin+ep {exe}` (or setuid root)"
    )]
    NoNetAdmin { exe: String },
    #[error("capabilities: {step}: {source}")]
    Caps {
        step: &'static str,
        #[source]
        source: ::caps::errors::CapsError,
    },
    #[error("sandbox: {step}: {errno}")]
    Sys { step: &'static str, errno: Errno },
    #[error("landlock: {0}")]
    Landlock(#[from] ::landlock::RulesetError),
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
}

/// Fail with a clear message when `CAP_NET_ADMIN` cannot be had at all.
pub fn require_net_admin() -> Result<(), SandboxError> {
    if caps::net_admin_permitted()? {
        Ok(())
    } else {
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "baton-repair".into());
        Err(SandboxError::NoNetAdmin { exe })
    }
}

/// Enter the whole sandbox (steps 1–4 above).
pub fn enter() -> Result<(), SandboxError> {
    restrict()?;
    lock_syscalls()
}

/// Steps 1–3. They act on the calling thread only (credentials, Landlock domain), so
/// the process must be single-threaded here; a thread started after this inherits them.
/// Threads the serve loop needs (they cannot be created under the filter, which forbids
/// `clone`) are started between this and [`lock_syscalls`].
pub fn restrict() -> Result<(), SandboxError> {
    caps::keep_only_net_admin()?;
    nix::sys::prctl::set_no_new_privs().map_err(|errno| SandboxError::Sys {
        step: "PR_SET_NO_NEW_PRIVS",
        errno,
    })?;
    nix::sys::prctl::set_dumpable(false).map_err(|errno| SandboxError::Sys {
        step: "PR_SET_DUMPABLE",
        errno,
    })?;
    landlock::deny_filesystem()?;
    Ok(())
}

/// Step 4: the seccomp filter, on every thread of the process at once.
pub fn lock_syscalls() -> Result<(), SandboxError> {
    seccomp::apply()?;
    tracing::debug!("sandbox entered");
    Ok(())
}
