//! Checks on every descriptor the helper is handed, before anything else touches it.
//!
//! The backend may be compromised, so the helper must not become a "toggle repair on
//! anything" primitive. An fd passes only if it is a socket (its first getsockopt does
//! not fail with ENOTSOCK), of domain AF_INET or AF_INET6, type SOCK_STREAM, protocol
//! IPPROTO_TCP (MPTCP sockets report 262 and are refused: TCP_REPAIR does not work on
//! them), has no upper-layer protocol attached (kTLS would need its crypto state
//! migrated), lives in the expected network namespace, and is in a state that suits the
//! operation.

use std::os::fd::BorrowedFd;

use baton_proto::tcp::SocketFamily;
use nix::errno::Errno;

use crate::error::{RepairError, Result};
use crate::sys;
use crate::Expect;

const STEP: &str = "validate";

/// Check `fd`; see [`crate::validate_tcp_socket`].
pub fn validate_tcp_socket(
    fd: BorrowedFd<'_>,
    expect: Expect,
    netns_cookie: Option<u64>,
) -> Result<SocketFamily> {
    // No fstat first: a getsockopt on anything that is not a socket fails with ENOTSOCK
    // before it looks at the level or option, which answers the same question for one
    // system call less per socket (batches hold thousands).
    let domain = match sys::get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN, "validate: SO_DOMAIN") {
        Err(RepairError::Sys {
            errno: Errno::ENOTSOCK,
            ..
        }) => return Err(RepairError::invalid(STEP, "not a socket")),
        other => other?,
    };
    let family = match domain {
        libc::AF_INET => SocketFamily::Inet,
        libc::AF_INET6 => SocketFamily::Inet6,
        other => {
            return Err(RepairError::invalid(
                STEP,
                format!("socket domain {other} is not AF_INET or AF_INET6"),
            ))
        }
    };
    let sock_type = sys::get_int(fd, libc::SOL_SOCKET, libc::SO_TYPE, "validate: SO_TYPE")?;
    if sock_type != libc::SOCK_STREAM {
        return Err(RepairError::invalid(
            STEP,
            format!("socket type {sock_type} is not SOCK_STREAM"),
        ));
    }
    let protocol = sys::get_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_PROTOCOL,
        "validate: SO_PROTOCOL",
    )?;
    if protocol == sys::IPPROTO_MPTCP {
        return Err(RepairError::invalid(
            STEP,
            "MPTCP socket (TCP_REPAIR unsupported)",
        ));
    }
    if protocol != libc::IPPROTO_TCP {
        return Err(RepairError::invalid(
            STEP,
            format!("socket protocol {protocol} is not TCP"),
        ));
    }
    let mut ulp = [0u8; 16];
    let ulp_len = sys::get_bytes(
        fd,
        libc::IPPROTO_TCP,
        sys::TCP_ULP,
        &mut ulp,
        "validate: TCP_ULP",
    )?;
    let ulp_name = ulp[..ulp_len].split(|&b| b == 0).next().unwrap_or(&[]);
    if !ulp_name.is_empty() {
        return Err(RepairError::invalid(
            STEP,
            format!(
                "upper-layer protocol {:?} attached",
                String::from_utf8_lossy(ulp_name)
            ),
        ));
    }
    if let Some(expected) = netns_cookie {
        let cookie = netns_cookie_of(fd)?;
        if cookie != expected {
            return Err(RepairError::invalid(
                STEP,
                format!(
                    "socket is in another network namespace (cookie {cookie}, expected {expected})"
                ),
            ));
        }
    }
    let info = sys::tcp_info_head(fd, "validate: TCP_INFO")?;
    match expect {
        Expect::Connected => {
            if matches!(info.state, sys::TCP_LISTEN | sys::TCP_CLOSE) {
                return Err(RepairError::invalid(
                    STEP,
                    format!(
                        "{} socket, expected a connected one",
                        sys::state_name(info.state)
                    ),
                ));
            }
        }
        Expect::Fresh => {
            if info.state != sys::TCP_CLOSE {
                return Err(RepairError::invalid(
                    STEP,
                    format!(
                        "{} socket, expected a fresh one",
                        sys::state_name(info.state)
                    ),
                ));
            }
            let local = sys::local_addr(fd, "validate: getsockname")?;
            if local.port() != 0 {
                return Err(RepairError::invalid(
                    STEP,
                    format!("socket already bound to {local}"),
                ));
            }
        }
    }
    Ok(family)
}

/// `SO_NETNS_COOKIE` (Linux 5.14+).
pub fn netns_cookie_of(fd: BorrowedFd<'_>) -> Result<u64> {
    match sys::get::<u64>(
        fd,
        libc::SOL_SOCKET,
        sys::SO_NETNS_COOKIE,
        "validate: SO_NETNS_COOKIE",
    ) {
        Err(RepairError::Sys {
            errno: Errno::ENOPROTOOPT,
            step,
        }) => Err(RepairError::invalid(
            step,
            "kernel lacks SO_NETNS_COOKIE (Linux 5.14+); run the helper with --any-netns",
        )),
        other => other,
    }
}
