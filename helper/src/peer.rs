//! Who is on the other end: `SO_PEERCRED`.
//!
//! The helper serves only a backend running as the helper's own real uid (the user who
//! started it, also when it is setuid) or as a uid the operator listed with
//! `--allow-uid`. The credentials are those the kernel recorded when the peer called
//! `listen()` or `connect()` (or `socketpair()`), so they cannot be forged by the peer
//! afterwards. The check happens before anything is read from the connection.

use std::os::fd::BorrowedFd;

use nix::errno::Errno;
use nix::sys::socket::{getsockopt, sockopt};

/// The peer's credentials as the kernel recorded them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCreds {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("SO_PEERCRED: {0}")]
    Sys(Errno),
    #[error("refusing the backend (pid {pid}): uid {uid} is neither ours ({ours}) nor allowed with --allow-uid")]
    NotAllowed { uid: u32, pid: i32, ours: u32 },
}

/// Read the peer's credentials and check its uid against our real uid and `allowed`.
pub fn check_peer(sock: BorrowedFd<'_>, allowed: &[u32]) -> Result<PeerCreds, PeerError> {
    let creds = getsockopt(&sock, sockopt::PeerCredentials).map_err(PeerError::Sys)?;
    let creds = PeerCreds {
        uid: creds.uid(),
        gid: creds.gid(),
        pid: creds.pid(),
    };
    let ours = nix::unistd::getuid().as_raw();
    if creds.uid == ours || allowed.contains(&creds.uid) {
        Ok(creds)
    } else {
        Err(PeerError::NotAllowed {
            uid: creds.uid,
            pid: creds.pid,
            ours,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn own_uid_is_accepted() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let creds = check_peer(a.as_fd(), &[]).expect("own uid");
        assert_eq!(creds.uid, nix::unistd::getuid().as_raw());
        assert_eq!(creds.pid, std::process::id() as i32);
    }
}
