//! Landlock: the filesystem as baton still needs it after start-up — almost not at all.
//!
//! Theory of operation: the ruleset handles every filesystem access right of the newest
//! ABI this build knows ([`BEST_ABI`]), so everything not granted by a rule is denied.
//! Everything baton reads or writes by path it opens at start-up, before the sandbox:
//! the log file, the pid file, /etc/resolv.conf, /proc/net/*, the vhost-user listener.
//! Guest memory, the dirty log and the kick/call eventfds come over the vhost-user socket
//! as descriptors, guest flows are sockets. One path-based need remains:
//!
//! * **The repair socket's directory** — `--repair-path`, by default the vhost-user
//!   socket path plus `.repair`, unless `--repair-path none` or `--fd`. baton binds that
//!   listener (`baton_repair_ipc::RepairListener`, see [`crate::repair_link`]) at
//!   start-up, before the sandbox, so that a helper can attach before any migration; the
//!   rule lets it remove the socket file at exit and keeps a later re-bind possible.
//!   Rights on that directory, and nothing else ([`repair_dir_access`]):
//!   `MakeSock` (bind), `RemoveFile` (remove a stale socket file first, and the socket
//!   file when the listener goes away), `ResolveUnix` (ABI 9: the liveness probe connects
//!   to an existing socket file before calling it stale). No reading, writing or creating
//!   other files. A rule covers the whole tree beneath the directory, so a private
//!   directory for the sockets (libvirt uses one per VM) keeps it narrow; with the default
//!   /tmp/baton_N.socket the rule is on /tmp, where file permissions still apply (as
//!   `nobody`, baton can remove only files it owns). A side effect: the vhost-user
//!   socket file, removed when baton exits, goes only when it lives in that directory
//!   (the default layout); otherwise it stays behind and the next start replaces it.
//!
//! On a kernel older than [`BEST_ABI`] the `landlock` crate enforces the rights that
//! kernel knows (best effort) and the level reached is logged; without Landlock nothing is
//! enforced, which is logged as a warning, and baton goes on: seccomp still forbids
//! opening files. Network rights and scopes are not handled: guest flows connect to and
//! bind any port.

use std::path::{Path, PathBuf};

use ::landlock::{
    Access, AccessFs, BitFlags, LandlockStatus, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetStatus, ABI,
};

use super::SandboxError;
use crate::config::RuntimeConfig;

/// The newest Landlock ABI this build knows.
pub const BEST_ABI: ABI = ABI::V10;

/// Rights on the repair socket's directory: bind a socket there, remove it again, and
/// probe an existing socket file with connect().
pub fn repair_dir_access() -> BitFlags<AccessFs> {
    AccessFs::MakeSock | AccessFs::RemoveFile | AccessFs::ResolveUnix
}

/// The paths baton still uses after start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimePaths {
    /// Directory of the repair socket, when there is one.
    pub repair_socket_dir: Option<PathBuf>,
}

impl RuntimePaths {
    /// No path at all.
    pub fn none() -> RuntimePaths {
        RuntimePaths::default()
    }

    /// What `rt` needs, given the vhost-user socket path actually bound (if any).
    pub fn for_runtime(rt: &RuntimeConfig, vhost_user_socket: Option<&Path>) -> RuntimePaths {
        let repair_socket_dir = rt
            .repair_socket
            .path_for(vhost_user_socket)
            .map(|path| match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
                _ => PathBuf::from("."),
            });
        RuntimePaths { repair_socket_dir }
    }
}

/// Create the ruleset for `paths` (not yet enforced). A repair socket directory that
/// cannot be opened gets no rule, with a warning: the repair socket then cannot be
/// created there, which the migration code reports when it tries.
pub fn ruleset(paths: &RuntimePaths) -> Result<RulesetCreated, SandboxError> {
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(BEST_ABI))?
        .create()?;
    if let Some(dir) = &paths.repair_socket_dir {
        match PathFd::new(dir) {
            Ok(fd) => {
                ruleset = ruleset.add_rule(PathBeneath::new(fd, repair_dir_access()))?;
                tracing::debug!(
                    "landlock: repair socket directory {}: bind, remove and probe sockets only",
                    dir.display()
                );
            }
            Err(e) => tracing::warn!(
                "landlock: repair socket directory {} unavailable ({e}); no repair socket can be \
                 created there",
                dir.display()
            ),
        }
    }
    Ok(ruleset)
}

/// Enforce `ruleset` on the calling thread (and the threads it creates later), and log
/// how far the kernel enforces it.
pub fn restrict_this_thread(ruleset: RulesetCreated) -> Result<RulesetStatus, SandboxError> {
    let status = ruleset.restrict_self()?;
    let kernel = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => format!("kernel ABI {effective_abi:?}"),
        LandlockStatus::NotEnabled => "not enabled in this kernel".to_string(),
        LandlockStatus::NotImplemented => "not built into this kernel".to_string(),
    };
    match status.ruleset {
        RulesetStatus::FullyEnforced => {
            tracing::debug!("landlock: filesystem restricted, fully enforced ({kernel})")
        }
        RulesetStatus::PartiallyEnforced => tracing::info!(
            "landlock: filesystem restricted for every right the kernel knows ({kernel}; \
             baton asks for {BEST_ABI:?})"
        ),
        RulesetStatus::NotEnforced => tracing::warn!(
            "landlock: not enforced ({kernel}); continuing with seccomp, which forbids opening \
             files"
        ),
    }
    Ok(status.ruleset)
}

/// [`ruleset`] and [`restrict_this_thread`] in one go.
pub fn restrict(paths: &RuntimePaths) -> Result<RulesetStatus, SandboxError> {
    restrict_this_thread(ruleset(paths)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::try_parse_args_from;

    fn paths(args: &[&str], socket: Option<&str>) -> RuntimePaths {
        let cli = try_parse_args_from(std::iter::once("baton").chain(args.iter().copied()))
            .expect("command line");
        let rt = RuntimeConfig::from_cli(&cli).expect("runtime config");
        RuntimePaths::for_runtime(&rt, socket.map(Path::new))
    }

    #[test]
    fn the_only_rule_is_the_repair_socket_directory() {
        assert_eq!(
            paths(&["-s", "/run/vm/vu.sock"], Some("/run/vm/vu.sock")).repair_socket_dir,
            Some(PathBuf::from("/run/vm"))
        );
        assert_eq!(
            paths(
                &["--repair-path", "/run/r/x.repair"],
                Some("/tmp/baton_1.socket")
            )
            .repair_socket_dir,
            Some(PathBuf::from("/run/r"))
        );
        assert_eq!(
            paths(&["-s", "vu.sock"], Some("vu.sock")).repair_socket_dir,
            Some(PathBuf::from("."))
        );
        assert_eq!(
            paths(&["--repair-path", "none"], Some("/run/vm/vu.sock")),
            RuntimePaths::none()
        );
        assert_eq!(paths(&["--fd", "3"], None), RuntimePaths::none());
    }

    #[test]
    fn repair_directory_rights_are_minimal() {
        let rights = repair_dir_access();
        assert!(!rights.contains(AccessFs::ReadFile));
        assert!(!rights.contains(AccessFs::WriteFile));
        assert!(!rights.contains(AccessFs::MakeReg));
        assert!(!rights.contains(AccessFs::Execute));
        assert_eq!(rights.iter().count(), 3);
    }
}
