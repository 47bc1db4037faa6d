//! Identity and capabilities: the user baton serves as, and no capability at all.
//!
//! Theory of operation:
//! * Who ([`target_identity`]): the `--runas` user if given. Otherwise root in the
//!   initial user namespace becomes `nobody` (passt's rule, [`RunAs::nobody`]); root in
//!   another user namespace (a rootless container) stays uid 0 there, as with passt,
//!   since such a namespace rarely maps `nobody` and its root is unprivileged on the host;
//!   anyone else stays who they are. Names are resolved through the user and group
//!   databases, which is why this runs before Landlock and seccomp.
//! * What must stay reachable after the switch — the vhost-user listener, the log and
//!   pid files — was opened before it: descriptors keep working whoever owns them.
//! * Credentials belong to a thread in the kernel; libc's setresuid(3) and friends only
//!   look process-wide because glibc signals every thread to repeat the call. baton makes
//!   the raw system calls instead, in [`enter_thread`], and runs that same function on
//!   every thread ([`super::threads`]), so the order of the steps is the same everywhere:
//!   1. Bounding set: drop every capability, by number up to the last one the kernel
//!      knows. That needs `CAP_SETPCAP` (root has it, so this happens before the uid
//!      switch); without it the set stays as inherited — harmless, as no_new_privs and
//!      seccomp forbid execve, the only place it matters.
//!   2. `setgroups(0)` (no supplementary groups; `EPERM` without `CAP_SETGID` is
//!      tolerated, as passt does), `setresgid`, `setresuid`. Leaving uid 0 makes the
//!      kernel clear the permitted, effective and ambient sets.
//!   3. Ambient set cleared, then effective, permitted and inheritable emptied with
//!      capset(2), and checked with capget(2).
//! * [`enter_thread`] makes raw system calls only — no allocation, no lock — because it
//!   also runs in a signal handler.

use std::io::Read;

use nix::unistd::{geteuid, Gid, Uid};

use super::{SandboxError, Step, StepFailure};
use crate::cli::RunAs;

/// The uid and gid to serve as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

impl From<(Uid, Gid)> for Identity {
    fn from((uid, gid): (Uid, Gid)) -> Identity {
        Identity {
            uid: uid.as_raw(),
            gid: gid.as_raw(),
        }
    }
}

/// Whom to become: `None` keeps the current user.
pub fn target_identity(runas: Option<&RunAs>) -> Result<Option<Identity>, SandboxError> {
    let (identity, why) = choose_identity(runas)?;
    match (identity, why) {
        (Some(id), Why::RunAs) => tracing::info!(
            "--runas {}: switching to uid {} gid {}",
            runas.map(ToString::to_string).unwrap_or_default(),
            id.uid,
            id.gid
        ),
        (Some(id), Why::RootToNobody) => tracing::info!(
            "started as root: switching to nobody (uid {} gid {})",
            id.uid,
            id.gid
        ),
        (None, Why::RootInUserNamespace) => tracing::info!(
            "running as root in a user namespace: staying uid 0 there, without capabilities"
        ),
        _ => {}
    }
    Ok(identity)
}

/// [`target_identity`] without the log line (for the helper launcher, which must end up
/// as the same user as the sandboxed backend, see [`crate::launcher`]).
pub fn target_identity_quiet(runas: Option<&RunAs>) -> Result<Option<Identity>, SandboxError> {
    Ok(choose_identity(runas)?.0)
}

/// Why [`choose_identity`] chose what it chose (for the log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    RunAs,
    RootToNobody,
    RootInUserNamespace,
    NotRoot,
}

fn choose_identity(runas: Option<&RunAs>) -> Result<(Option<Identity>, Why), SandboxError> {
    if let Some(runas) = runas {
        return Ok((Some(Identity::from(runas.resolve()?)), Why::RunAs));
    }
    if !geteuid().is_root() {
        return Ok((None, Why::NotRoot));
    }
    if !in_initial_user_namespace() {
        return Ok((None, Why::RootInUserNamespace));
    }
    Ok((
        Some(Identity::from(RunAs::nobody().resolve()?)),
        Why::RootToNobody,
    ))
}

/// Whether `/proc/self/uid_map` is the identity map of the initial user namespace. When
/// it cannot be read, assume it is: switching to nobody is the safe side.
fn in_initial_user_namespace() -> bool {
    let mut map = String::new();
    let read =
        std::fs::File::open("/proc/self/uid_map").and_then(|mut f| f.read_to_string(&mut map));
    if read.is_err() {
        return true;
    }
    let lines: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    lines == [["0", "0", "4294967295"]]
}

/// `CAP_SETPCAP`: needed to drop capabilities from the bounding set.
const CAP_SETPCAP: u32 = 8;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets as two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`; version 3 uses two of them (capabilities 0–31 and
/// 32–63).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn capget() -> Result<[CapData; 2], StepFailure> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) reads the header and writes two CapData structs (version 3) into
    // the array, both owned by this frame and laid out as the kernel's structs.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(StepFailure::last(Step::ReadCapabilities));
    }
    Ok(data)
}

fn capset(data: &[CapData; 2], step: Step) -> Result<(), StepFailure> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset(2) reads the header and two CapData structs (version 3), all owned
    // by the caller for the duration of the call; pid 0 is the calling thread.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if rc != 0 {
        return Err(StepFailure::last(step));
    }
    Ok(())
}

/// Drop every capability the kernel knows from the calling thread's bounding set.
fn drop_bounding_set() -> Result<(), StepFailure> {
    drop_bounding_set_except(None)
}

/// Drop every capability the kernel knows but `keep` from the calling thread's bounding
/// set.
fn drop_bounding_set_except(keep: Option<u32>) -> Result<(), StepFailure> {
    for number in 0..64 as libc::c_ulong {
        if keep.is_some_and(|keep| libc::c_ulong::from(keep) == number) {
            continue;
        }
        // SAFETY: PR_CAPBSET_READ takes a capability number and no pointers; it fails
        // with EINVAL past the last capability the kernel knows.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, number, 0, 0, 0) };
        if present < 0 {
            break;
        }
        if present == 1 {
            // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, number, 0, 0, 0) };
            if rc != 0 {
                return Err(StepFailure::last(Step::BoundingSet));
            }
        }
    }
    Ok(())
}

fn switch_identity(identity: Identity) -> Result<(), StepFailure> {
    // SAFETY: setgroups(2) with size 0 reads no list (a null pointer is allowed).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            0 as libc::size_t,
            std::ptr::null::<libc::gid_t>(),
        )
    };
    if rc != 0 {
        let failure = StepFailure::last(Step::Setgroups);
        if failure.errno != libc::EPERM {
            return Err(failure);
        }
    }
    let gid = identity.gid as libc::gid_t;
    // SAFETY: setresgid(2) takes integers only; the raw call changes this thread only.
    if unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) } != 0 {
        return Err(StepFailure::last(Step::Setresgid));
    }
    let uid = identity.uid as libc::uid_t;
    // SAFETY: setresuid(2) takes integers only; the raw call changes this thread only.
    if unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) } != 0 {
        return Err(StepFailure::last(Step::Setresuid));
    }
    Ok(())
}

/// The per-thread part of this module (steps 1–3 of the module documentation) for the
/// calling thread. Async-signal-safe.
pub fn enter_thread(identity: Option<Identity>) -> Result<(), StepFailure> {
    let mut caps = capget()?;
    let setpcap = 1u32 << CAP_SETPCAP;
    if caps[0].permitted & setpcap != 0 {
        if caps[0].effective & setpcap == 0 {
            caps[0].effective |= setpcap;
            capset(&caps, Step::RaiseSetpcap)?;
        }
        drop_bounding_set()?;
    }
    if let Some(identity) = identity {
        switch_identity(identity)?;
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        let failure = StepFailure::last(Step::AmbientSet);
        // EINVAL: a kernel older than 4.3 has no ambient set.
        if failure.errno != libc::EINVAL {
            return Err(failure);
        }
    }
    capset(&[CapData::default(); 2], Step::ClearCapabilities)?;
    if capget()? != [CapData::default(); 2] {
        return Err(StepFailure {
            step: Step::CapabilitiesLeft,
            errno: 0,
        });
    }
    Ok(())
}

/// `CAP_NET_ADMIN`: the one capability `baton-repair` needs.
pub const CAP_NET_ADMIN: u32 = 12;

/// How the helper launcher ([`crate::launcher`]) passes `CAP_NET_ADMIN` on to the
/// helpers it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassOn {
    /// Through the ambient set: the launcher holds `CAP_NET_ADMIN` in its permitted,
    /// inheritable and ambient sets (and nothing else anywhere, bounding set included),
    /// so a plain `baton-repair` binary gets exactly that capability at exec.
    Ambient,
    /// The launcher had no `CAP_NET_ADMIN` and holds no capability now: the helper must
    /// get it from the file (`setcap cap_net_admin+ep`, or setuid root), which needs
    /// exec to be able to grant privilege (no `no_new_privs` in the launcher).
    FromFile,
}

/// The launcher's privileges: what starting `baton-repair` with `CAP_NET_ADMIN` needs,
/// and nothing more. The bounding set loses every capability but `CAP_NET_ADMIN` (with
/// `CAP_SETPCAP`); the process becomes `identity` (the backend's user after its
/// sandbox) keeping its permitted set across the switch; then `CAP_NET_ADMIN`, if it
/// was permitted, stays permitted, inheritable and ambient (not effective: the launcher
/// itself never uses it), and every other capability goes. Single-threaded callers only
/// (the launcher process), so the raw per-thread calls cover the whole process.
pub fn keep_net_admin_for_exec(identity: Option<Identity>) -> Result<PassOn, StepFailure> {
    let mut caps = capget()?;
    let setpcap = 1u32 << CAP_SETPCAP;
    let net_admin = 1u32 << CAP_NET_ADMIN;
    if caps[0].permitted & setpcap != 0 {
        if caps[0].effective & setpcap == 0 {
            caps[0].effective |= setpcap;
            capset(&caps, Step::RaiseSetpcap)?;
        }
        drop_bounding_set_except(Some(CAP_NET_ADMIN))?;
    }
    let keep = caps[0].permitted & net_admin != 0;
    if let Some(identity) = identity {
        // Leaving uid 0 clears the permitted set unless KEEPCAPS is set.
        set_keepcaps(keep)?;
        switch_identity(identity)?;
        set_keepcaps(false)?;
    }
    let kept = if keep {
        CapData {
            effective: 0,
            permitted: net_admin,
            inheritable: net_admin,
        }
    } else {
        CapData::default()
    };
    capset(&[kept, CapData::default()], Step::ClearCapabilities)?;
    if !keep {
        return Ok(PassOn::FromFile);
    }
    // SAFETY: PR_CAP_AMBIENT_RAISE takes a capability number and no pointers.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            libc::c_ulong::from(CAP_NET_ADMIN),
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(StepFailure::last(Step::AmbientSet));
    }
    let now = capget()?;
    let expected = [kept, CapData::default()];
    if now != expected {
        return Err(StepFailure {
            step: Step::CapabilitiesLeft,
            errno: 0,
        });
    }
    Ok(PassOn::Ambient)
}

fn set_keepcaps(on: bool) -> Result<(), StepFailure> {
    // SAFETY: PR_SET_KEEPCAPS takes an integer and no pointers.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(on), 0, 0, 0) } != 0 {
        return Err(StepFailure::last(Step::Setresuid));
    }
    Ok(())
}
