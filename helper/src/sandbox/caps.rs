//! Capabilities: `CAP_NET_ADMIN` and nothing else.
//!
//! Theory of operation:
//! * Setuid root (effective uid 0, real uid not 0): set `PR_SET_KEEPCAPS`, switch every
//!   gid and uid to the real ones (the kernel then clears the effective set but keeps the
//!   permitted one), and clear `PR_SET_KEEPCAPS` again.
//! * Bounding set: drop every capability but `CAP_NET_ADMIN`, by number up to the last
//!   one the kernel knows (also ones newer than the `caps` crate). That needs
//!   `CAP_SETPCAP`; a helper installed with only `cap_net_admin+ep` does not have it and
//!   keeps its inherited bounding set — harmless, as no_new_privs and seccomp forbid
//!   execve.
//! * Effective and permitted sets become exactly `{CAP_NET_ADMIN}`; inheritable and
//!   ambient become empty. Effective first: the kernel requires it to stay a subset of
//!   permitted.

use ::caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{getresgid, getresuid, setresgid, setresuid};

use super::SandboxError;

fn caps_error(step: &'static str) -> impl FnOnce(::caps::errors::CapsError) -> SandboxError {
    move |source| SandboxError::Caps { step, source }
}

fn sys_error(step: &'static str) -> impl FnOnce(nix::errno::Errno) -> SandboxError {
    move |errno| SandboxError::Sys { step, errno }
}

/// Whether `CAP_NET_ADMIN` is in the permitted set (so that it can be kept).
pub fn net_admin_permitted() -> Result<bool, SandboxError> {
    ::caps::has_cap(None, CapSet::Permitted, Capability::CAP_NET_ADMIN)
        .map_err(caps_error("read the permitted set"))
}

/// Become the real user if setuid, then keep `CAP_NET_ADMIN` only.
pub fn keep_only_net_admin() -> Result<(), SandboxError> {
    let uids = getresuid().map_err(sys_error("getresuid"))?;
    if uids.effective.is_root() && !uids.real.is_root() {
        let gids = getresgid().map_err(sys_error("getresgid"))?;
        nix::sys::prctl::set_keepcaps(true).map_err(sys_error("PR_SET_KEEPCAPS"))?;
        if gids.effective != gids.real || gids.saved != gids.real {
            setresgid(gids.real, gids.real, gids.real).map_err(sys_error("setresgid"))?;
        }
        setresuid(uids.real, uids.real, uids.real).map_err(sys_error("setresuid"))?;
        nix::sys::prctl::set_keepcaps(false).map_err(sys_error("PR_SET_KEEPCAPS off"))?;
        tracing::debug!(uid = uids.real.as_raw(), "setuid: switched to the real uid");
    }

    let permitted =
        ::caps::read(None, CapSet::Permitted).map_err(caps_error("read the permitted set"))?;
    if permitted.contains(&Capability::CAP_SETPCAP) {
        ::caps::raise(None, CapSet::Effective, Capability::CAP_SETPCAP)
            .map_err(caps_error("raise CAP_SETPCAP"))?;
        drop_bounding_set_except(Capability::CAP_NET_ADMIN)?;
    } else {
        tracing::debug!(
            "no CAP_SETPCAP: the bounding set stays as inherited (execve is forbidden anyway)"
        );
    }

    let only_net_admin: CapsHashSet = [Capability::CAP_NET_ADMIN].into_iter().collect();
    ::caps::set(None, CapSet::Effective, &only_net_admin)
        .map_err(caps_error("set the effective set"))?;
    ::caps::set(None, CapSet::Permitted, &only_net_admin)
        .map_err(caps_error("set the permitted set"))?;
    ::caps::clear(None, CapSet::Inheritable).map_err(caps_error("clear the inheritable set"))?;
    ::caps::clear(None, CapSet::Ambient).map_err(caps_error("clear the ambient set"))?;
    Ok(())
}

/// Drop every capability but `keep` from the bounding set, by number, up to the last
/// capability the kernel knows (`PR_CAPBSET_READ` answers `EINVAL` past it).
fn drop_bounding_set_except(keep: Capability) -> Result<(), SandboxError> {
    for number in 0..64u8 {
        if number == keep.index() {
            continue;
        }
        // SAFETY: PR_CAPBSET_READ takes a capability number and no pointers.
        let present =
            unsafe { libc::prctl(libc::PR_CAPBSET_READ, libc::c_ulong::from(number), 0, 0, 0) };
        if present < 0 {
            break;
        }
        if present == 1 {
            // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
            let rc =
                unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(number), 0, 0, 0) };
            if rc != 0 {
                return Err(SandboxError::Sys {
                    step: "PR_CAPBSET_DROP",
                    errno: nix::errno::Errno::last(),
                });
            }
        }
    }
    Ok(())
}
