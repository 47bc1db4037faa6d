//! Private network namespaces and resource limits for tests.
//!
//! Network namespaces belong to *threads*, not processes: [`enter_private_netns`] moves
//! only the calling thread into a fresh namespace. Cargo's test harness runs each test on
//! its own thread, so a test that calls it first gets a namespace of its own: its own
//! loopback, its own port space, its own sysctls (at their defaults), and nothing from the
//! host. Sockets created by that thread afterwards live in the new namespace; sockets it
//! created before stay in the old one. Processes spawned from that thread (and threads it
//! spawns afterwards) inherit the new namespace, which is how a test hands its namespace
//! to a helper binary. The namespace disappears when its last thread exits and its last
//! socket is closed.
//!
//! Creating a network namespace needs `CAP_SYS_ADMIN` (the suites run as root).

use std::io;

/// Move the calling thread into a new, private network namespace and bring its
/// loopback interface up (`127.0.0.1/8` and `::1` are then usable; there is no other
/// interface and no route off the host).
///
/// Fails when the caller lacks `CAP_SYS_ADMIN`; the error message says so. Each call
/// creates another fresh namespace.
pub fn enter_private_netns() -> io::Result<()> {
    // SAFETY: unshare() takes only a flag word and touches no memory of ours. With
    // CLONE_NEWNET alone it affects only the calling thread, which is allowed in a
    // multi-threaded process.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!(
                "unshare(CLONE_NEWNET) failed: {err}; baton's tests need root \
                 (CAP_SYS_ADMIN) to create a private network namespace"
            ),
        ));
    }
    set_loopback_up()
}

/// `ip link set lo up` through SIOCGIFFLAGS/SIOCSIFFLAGS on a datagram socket.
fn set_loopback_up() -> io::Result<()> {
    let sock = crate::tcp::socket(libc::AF_INET, libc::SOCK_DGRAM)
        .map_err(|e| context(e, "socket(AF_INET, SOCK_DGRAM) to configure lo"))?;
    // SAFETY: ifreq is a plain C struct (name array plus a union of integers and
    // addresses) for which all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name and writes ifru_flags inside
    // the ifreq we own; the fd is a valid socket for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) };
    if rc != 0 {
        return Err(context(io::Error::last_os_error(), "SIOCGIFFLAGS on lo"));
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so the flags member of the union is the one the
    // kernel initialised.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS only reads the ifreq we own; the fd is a valid socket.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) };
    if rc != 0 {
        return Err(context(
            io::Error::last_os_error(),
            "SIOCSIFFLAGS(IFF_UP) on lo (needs CAP_NET_ADMIN in the new namespace)",
        ));
    }
    Ok(())
}

/// Raise the soft `RLIMIT_NOFILE` to `wanted` open files. If the hard limit is lower,
/// first try to raise it too (root has `CAP_SYS_RESOURCE`; the kernel caps it at
/// `fs.nr_open`); if that is refused, settle for the hard limit. Never lowers a limit.
/// Returns the soft limit now in force, which may be below `wanted`: callers that need
/// the full amount check the result.
///
/// A test with 10,000 connections needs about 20,000 descriptors (both ends) plus slack.
pub fn raise_nofile(wanted: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct that we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(context(
            io::Error::last_os_error(),
            "getrlimit(RLIMIT_NOFILE)",
        ));
    }
    if wanted <= lim.rlim_cur {
        return Ok(lim.rlim_cur);
    }
    if wanted > lim.rlim_max {
        let both = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted,
        };
        // SAFETY: setrlimit reads one rlimit struct that we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &both) } == 0 {
            return Ok(wanted);
        }
        // Not privileged, or above fs.nr_open: fall back to the current hard limit.
    }
    lim.rlim_cur = wanted.min(lim.rlim_max);
    // SAFETY: setrlimit reads one rlimit struct that we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(context(
            io::Error::last_os_error(),
            "setrlimit(RLIMIT_NOFILE) raising the soft limit",
        ));
    }
    Ok(lim.rlim_cur)
}

/// Prefix an error with the step that produced it, keeping its kind.
pub(crate) fn context(err: io::Error, step: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{step}: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn each_thread_gets_its_own_port_space() {
        // Two threads bind the same fixed port: only possible in separate namespaces.
        let bind_fixed = || {
            enter_private_netns().expect("private netns (run the tests as root)");
            TcpListener::bind(("127.0.0.1", 5000)).map(|_| ())
        };
        let a = std::thread::spawn(bind_fixed);
        let b = std::thread::spawn(bind_fixed);
        let first = a.join().expect("thread a");
        let second = b.join().expect("thread b");
        first.expect("bind in namespace a");
        second.expect("bind in namespace b");
    }

    #[test]
    fn loopback_is_up_for_ipv4_and_ipv6() {
        enter_private_netns().expect("private netns");
        TcpListener::bind(("127.0.0.1", 0)).expect("IPv4 loopback");
        TcpListener::bind(("::1", 0)).expect("IPv6 loopback");
    }

    #[test]
    fn raise_nofile_never_lowers() {
        let now = raise_nofile(0).expect("getrlimit");
        assert!(now > 0);
        let raised = raise_nofile(4096).expect("raise");
        assert!(raised >= now.min(4096));
    }
}
