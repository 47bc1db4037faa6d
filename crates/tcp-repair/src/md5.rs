//! The freeze key: a TCP-MD5 (RFC 2385) key for the connection's own peer, which the
//! peer does not have.
//!
//! Why it deafens. Once a socket holds a key for an address, `tcp_v4_rcv` and
//! `tcp_v6_rcv` require a valid MD5 signature option on every segment from that address
//! (`tcp_inbound_hash`) and drop the others before anything else looks at them: before
//! the socket filter, before `tcp_segs_in()`, before any state change. The peer signs
//! nothing, so everything it sends — data, the ACK of our data, FIN, RST — is dropped
//! there: nothing is acknowledged, queued or counted. Removing the key (a key length of
//! 0) ends that at once; the peer's next retransmission is accepted. The kernel-facts
//! suite `kernel_facts_md5_freeze` pins all of this, v4, v6 and v4-mapped.
//!
//! The key is 32 bytes from the kernel's CSPRNG, drawn once per process and never
//! written anywhere: the peer cannot produce a valid signature. The address comes
//! straight from getpeername(2) in the form the option takes (`sockaddr_in6` with a
//! v4-mapped address on a dual-stack socket, which the kernel files as an IPv4 key).
//! Keys are per socket, so one key for the peer's address touches no other connection.
//! Setting or removing one needs no privilege.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::OnceLock;

use nix::errno::Errno;

use crate::error::{RepairError, Result};

/// `TCP_MD5SIG_MAXKEYLEN` (uapi/linux/tcp.h).
const MAX_KEY_LEN: usize = 80;
/// Length of the freeze key (at least 16 bytes would do; the cost does not depend on it).
const KEY_LEN: usize = 32;

/// `struct tcp_md5sig` (uapi/linux/tcp.h). With plain `TCP_MD5SIG` (not `_EXT`) the
/// kernel ignores `flags`, `prefixlen` and `ifindex`: the key is for the exact address,
/// on any interface.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: i32,
    key: [u8; MAX_KEY_LEN],
}

// The kernel refuses any shorter option (EINVAL); the uapi layout is 216 bytes.
const _: () = assert!(std::mem::size_of::<TcpMd5Sig>() == 216);

static KEY: OnceLock<[u8; KEY_LEN]> = OnceLock::new();

/// This process's freeze key, drawn on first use.
pub fn key() -> Result<&'static [u8; KEY_LEN]> {
    if let Some(key) = KEY.get() {
        return Ok(key);
    }
    let mut fresh = [0u8; KEY_LEN];
    getrandom::fill(&mut fresh).map_err(|e| {
        RepairError::sys(
            "freeze: getrandom",
            e.raw_os_error()
                .map_or(Errno::UnknownErrno, Errno::from_raw),
        )
    })?;
    // Two threads racing here both drew a key; one wins and both use it.
    Ok(KEY.get_or_init(|| fresh))
}

/// Install `key` for `peer` (as getpeername returned it). The errno is the kernel's
/// refusal: `ENOPROTOOPT` on a kernel without `CONFIG_TCP_MD5SIG`.
pub fn add(
    fd: BorrowedFd<'_>,
    peer: &libc::sockaddr_storage,
    key: &[u8; KEY_LEN],
) -> std::result::Result<(), Errno> {
    let mut sig = sig_for(peer);
    sig.keylen = KEY_LEN as u16;
    sig.key[..KEY_LEN].copy_from_slice(key);
    set(fd, &sig)
}

/// Remove the key for `peer`. `ENOENT`: there was none (`ENOPROTOOPT`: no TCP-MD5 in
/// this kernel, so there cannot be one).
pub fn remove(fd: BorrowedFd<'_>, peer: &libc::sockaddr_storage) -> std::result::Result<(), Errno> {
    set(fd, &sig_for(peer))
}

fn sig_for(peer: &libc::sockaddr_storage) -> TcpMd5Sig {
    TcpMd5Sig {
        addr: *peer,
        flags: 0,
        prefixlen: 0,
        keylen: 0,
        ifindex: 0,
        key: [0; MAX_KEY_LEN],
    }
}

fn set(fd: BorrowedFd<'_>, sig: &TcpMd5Sig) -> std::result::Result<(), Errno> {
    // SAFETY: `sig` is a readable `struct tcp_md5sig` of the length passed, alive for
    // the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            (sig as *const TcpMd5Sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}
