//! Landlock: no filesystem access at all.
//!
//! The ruleset handles every filesystem access right of the newest ABI this build knows
//! and adds no rule, so every handled access is denied. On an older kernel Landlock
//! enforces what it can (best effort, the `landlock` crate's default) and the level
//! reached is logged; on a kernel without Landlock nothing is enforced and that is
//! logged too. Network rights are not handled: restore binds and connects TCP sockets.

use ::landlock::{Access, AccessFs, LandlockStatus, Ruleset, RulesetAttr, RulesetStatus, ABI};

use super::SandboxError;

/// The newest Landlock ABI this build knows.
pub const BEST_ABI: ABI = ABI::V10;

/// Restrict this process (and any future child) to no filesystem access.
pub fn deny_filesystem() -> Result<RulesetStatus, SandboxError> {
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(BEST_ABI))?
        .create()?
        .restrict_self()?;
    let kernel = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => format!("kernel ABI {effective_abi:?}"),
        LandlockStatus::NotEnabled => "not enabled in this kernel".to_string(),
        LandlockStatus::NotImplemented => "not built into this kernel".to_string(),
    };
    match status.ruleset {
        RulesetStatus::FullyEnforced => {
            tracing::debug!("landlock: no filesystem access, fully enforced ({kernel})")
        }
        RulesetStatus::PartiallyEnforced => tracing::info!(
            "landlock: no filesystem access, enforced for every right the kernel knows ({kernel})"
        ),
        RulesetStatus::NotEnforced => {
            tracing::warn!("landlock: not enforced ({kernel}); seccomp still applies")
        }
    }
    Ok(status.ruleset)
}
