//! The one error type of this crate: which step failed, and why.

use baton_proto::repair::SocketError;
use nix::errno::Errno;

/// A repair operation failed at `step` (e.g. "restore: TCP_QUEUE_SEQ(recv)").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepairError {
    /// The kernel refused a call.
    #[error("{step}: {errno:?}")]
    Sys { step: String, errno: Errno },
    /// The socket or the state is not one we can work with.
    #[error("{step}: {reason}")]
    Invalid { step: String, reason: String },
}

impl RepairError {
    pub fn sys(step: impl Into<String>, errno: Errno) -> Self {
        RepairError::Sys {
            step: step.into(),
            errno,
        }
    }

    pub fn invalid(step: impl Into<String>, reason: impl Into<String>) -> Self {
        RepairError::Invalid {
            step: step.into(),
            reason: reason.into(),
        }
    }

    /// The kernel's errno, when the kernel refused.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            RepairError::Sys { errno, .. } => Some(*errno),
            RepairError::Invalid { .. } => None,
        }
    }
}

impl From<RepairError> for SocketError {
    fn from(e: RepairError) -> Self {
        match e {
            RepairError::Sys { step, errno } => SocketError {
                step,
                errno: Some(errno as i32),
                detail: format!("{errno:?}"),
            },
            RepairError::Invalid { step, reason } => SocketError {
                step,
                errno: None,
                detail: reason,
            },
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, RepairError>;
