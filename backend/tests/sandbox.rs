//! The backend's sandbox, observed from outside: what /proc says about every thread of a
//! serving baton, that baton still serves a vhost-user frontend under it and exits
//! cleanly on SIGTERM; and, in forked children, what the seccomp filters and the Landlock
//! ruleset do to calls they forbid, and that threads started before the sandbox get it
//! too. Run as root (network namespaces, switching to nobody).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use baton::sandbox::landlock::{self, RuntimePaths};
use baton::sandbox::{seccomp, threads};
use baton_vu_harness::{FrontendOptions, NetFrontend};
use dhcproto::v4::{DhcpOption, Flags, Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid, User};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// `CAP_NET_ADMIN` (not in the libc crate).
const CAP_NET_ADMIN: libc::c_ulong = 12;

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("baton-sandbox-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// A baton process started as root, in the foreground, in the calling thread's private
/// network namespace.
struct Baton {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Baton {
    fn start(name: &str) -> Baton {
        Baton::start_with(name, &[])
    }

    /// Start baton logging to a file (`-l`), with `extra` arguments.
    fn start_with(name: &str, extra: &[&str]) -> Baton {
        baton_testkit::netns::enter_private_netns().expect("private netns (run as root)");
        let dir = scratch_dir(name);
        let socket = dir.join("vu.sock");
        let log = dir.join("baton.log");
        let stderr = File::create(dir.join("stderr")).expect("stderr file");
        let child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .arg("-f")
            .arg("--socket")
            .arg(&socket)
            .arg("--log-file")
            .arg(&log)
            .args(["-a", "10.77.0.2/24", "-g", "10.77.0.1", "--debug"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start baton");
        let mut baton = Baton {
            child,
            dir,
            socket,
            log,
        };
        baton.wait_until(|b| b.socket.exists(), "the vhost-user socket");
        baton.wait_until(
            |b| {
                b.thread_statuses()
                    .iter()
                    .all(|s| field(s, "Seccomp:") == "2")
            },
            "the sandbox on every thread",
        );
        baton
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// The log file, and whatever reached stderr (start-up errors).
    fn log(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let stderr = std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
        format!("{log}{stderr}")
    }

    fn wait_until(&mut self, done: impl Fn(&Baton) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("baton exited ({status}) before {what}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// /proc/<pid>/task/<tid>/status of every thread.
    fn thread_statuses(&self) -> Vec<String> {
        let tasks = format!("/proc/{}/task", self.child.id());
        let Ok(entries) = std::fs::read_dir(&tasks) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_to_string(e.path().join("status")).ok())
            .collect()
    }

    /// SIGTERM, then the exit status.
    fn terminate(&mut self) -> ExitStatus {
        kill(self.pid(), Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "baton ignored SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name).map(str::trim))
        .unwrap_or_else(|| panic!("no {name} in /proc status:\n{status}"))
}

fn assert_exit_0(baton: &mut Baton) {
    let status = baton.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "baton under the sandbox must exit 0 on SIGTERM ({status}):\n{}",
        baton.log()
    );
}

#[test]
fn every_thread_runs_as_nobody_without_capabilities_under_seccomp() {
    let mut baton = Baton::start("status");
    let nobody = User::from_name("nobody")
        .expect("user database")
        .expect("a nobody user");
    let (uid, gid) = (nobody.uid.to_string(), nobody.gid.to_string());
    let statuses = baton.thread_statuses();
    assert!(
        statuses.len() >= 2,
        "the main thread and the signal thread at least"
    );
    const NONE: &str = "0000000000000000";
    for status in &statuses {
        let name = field(status, "Name:");
        assert_eq!(
            field(status, "Seccomp:"),
            "2",
            "{name}: seccomp filter mode"
        );
        assert_eq!(field(status, "NoNewPrivs:"), "1", "{name}");
        for set in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
            assert_eq!(field(status, set), NONE, "{name}: {set}");
        }
        let uids: Vec<&str> = field(status, "Uid:").split_whitespace().collect();
        assert_eq!(
            uids,
            [uid.as_str(); 4],
            "{name}: real/effective/saved/fs uid"
        );
        let gids: Vec<&str> = field(status, "Gid:").split_whitespace().collect();
        assert_eq!(gids, [gid.as_str(); 4], "{name}: gids");
        assert_eq!(field(status, "Groups:"), "", "{name}: supplementary groups");
    }
    let log = baton.log();
    assert!(log.contains("switching to nobody"), "{log}");
    assert!(
        log.contains("landlock"),
        "the Landlock level is logged:\n{log}"
    );
    assert!(log.contains("sandbox entered"), "{log}");
    assert_exit_0(&mut baton);
}

fn dhcp_discover() -> Vec<u8> {
    let mut message = Message::new_with_id(
        0x0bad_cafe,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &GUEST_MAC,
    );
    message.set_flags(Flags::default().set_broadcast());
    message
        .opts_mut()
        .insert(DhcpOption::MessageType(MessageType::Discover));
    let mut payload = Vec::new();
    message
        .encode(&mut Encoder::new(&mut payload))
        .expect("encode DHCP");
    let builder = PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6])
        .ipv4([0; 4], [255; 4], 64)
        .udp(68, 67);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, &payload).expect("build frame");
    frame
}

/// The DHCP message in `frame`, if it is one for the client port.
fn dhcp_reply(frame: &[u8]) -> Option<Message> {
    let packet = SlicedPacket::from_ethernet(frame).ok()?;
    match packet.transport? {
        TransportSlice::Udp(udp) if udp.destination_port() == 68 => {
            Message::decode(&mut Decoder::new(udp.payload())).ok()
        }
        _ => None,
    }
}

fn arp_request_for_gateway() -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]); // Ethernet/IPv4 request
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&GUEST.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&GATEWAY.octets());
    frame
}

fn is_arp_reply_from_gateway(frame: &[u8]) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0x00, 0x02]
        && frame[28..32] == GATEWAY.octets()
        && frame[38..42] == GUEST.octets()
}

/// Send `frame` and return the first answer `pick` accepts.
fn ask<T>(dev: &mut NetFrontend, frame: &[u8], pick: impl Fn(&[u8]) -> Option<T>) -> Option<T> {
    dev.send_frame(frame).expect("send");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(reply) = dev.recv_frame(Duration::from_millis(200)).expect("receive") {
            if let Some(answer) = pick(&reply) {
                return Some(answer);
            }
        }
    }
    None
}

#[test]
fn sandboxed_baton_serves_a_frontend_and_exits_cleanly() {
    let mut baton = Baton::start("serve");
    // Two connections one after the other: each starts new threads and a new epoll
    // under the filter; the second one also turns on the dirty log (SET_LOG_BASE).
    for round in 0..2 {
        let mut dev = NetFrontend::connect(&baton.socket, FrontendOptions::default())
            .unwrap_or_else(|e| panic!("round {round}: frontend set-up: {e}\n{}", baton.log()));
        if round == 1 {
            dev.start_dirty_log().expect("dirty log under the sandbox");
        }
        let offer = ask(&mut dev, &dhcp_discover(), dhcp_reply)
            .unwrap_or_else(|| panic!("round {round}: no DHCP answer:\n{}", baton.log()));
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), GUEST);
        assert!(
            ask(&mut dev, &arp_request_for_gateway(), |f| {
                is_arp_reply_from_gateway(f).then_some(())
            })
            .is_some(),
            "round {round}: no ARP reply for the gateway:\n{}",
            baton.log()
        );
        // Threads started after the sandbox inherit all of it.
        for status in baton.thread_statuses() {
            assert_eq!(field(&status, "Seccomp:"), "2");
            assert_eq!(field(&status, "CapEff:"), "0000000000000000");
        }
        drop(dev);
    }
    assert_exit_0(&mut baton);
    let log = baton.log();
    assert!(log.contains("vhost-user frontend disconnected"), "{log}");
    // The socket appears under a temporary name first, renamed once it listens: no
    // temporary name is left behind. (The socket itself stays here: started as root,
    // baton runs as nobody and may not remove it from this root-owned directory.)
    let left: Vec<_> = std::fs::read_dir(&baton.dir)
        .expect("read the directory")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".binding"))
        .collect();
    assert!(
        left.is_empty(),
        "temporary socket names left behind: {left:?}"
    );
}

/// Run `body` in a forked child and return how the child ended; `body`'s result is the
/// exit code.
fn in_child(body: impl FnOnce() -> i32) -> WaitStatus {
    // SAFETY: the child runs `body` (sandbox set-up and the calls under test; glibc keeps
    // malloc usable after fork) and leaves with _exit, never returning into the harness.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(99);
            // SAFETY: _exit is async-signal-safe and ends the child at once.
            unsafe { libc::_exit(code) };
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
    }
}

/// A named system call to try under the filters; returns the child's exit code.
type Probe = (&'static str, fn() -> i32);

fn under_filters(call: fn() -> i32) -> WaitStatus {
    let filters = seccomp::build_filters().expect("build filters");
    in_child(move || {
        if filters.apply_to_this_thread().is_err() {
            return 3;
        }
        call()
    })
}

#[test]
fn seccomp_kills_forbidden_calls() {
    fn netlink_socket() -> i32 {
        // SAFETY: socket(2) takes integers only.
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) };
        0
    }
    fn raw_socket() -> i32 {
        // SAFETY: socket(2) takes integers only.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        0
    }
    fn executable_memory() -> i32 {
        // SAFETY: an anonymous private mapping; nothing is executed.
        unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        0
    }
    fn new_process() -> i32 {
        // SAFETY: clone(SIGCHLD) is fork(); should it ever succeed, the copy leaves at
        // once through _exit.
        let rc = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
        if rc == 0 {
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        0
    }
    fn new_user_namespace() -> i32 {
        // SAFETY: unshare(2) takes a flag word.
        unsafe { libc::unshare(libc::CLONE_NEWUSER) };
        0
    }
    fn terminal_ioctl() -> i32 {
        // SAFETY: TCGETS writes a termios into a zeroed local of the right type.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::ioctl(0, libc::TCGETS, &mut termios as *mut libc::termios) };
        0
    }
    fn file_lock() -> i32 {
        // SAFETY: F_GETLK on a zeroed flock owned by this frame.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::fcntl(0, libc::F_GETLK, &mut lock as *mut libc::flock) };
        0
    }
    fn become_dumpable() -> i32 {
        // SAFETY: PR_SET_DUMPABLE takes integers only.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
        0
    }
    fn exec() -> i32 {
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated path and argument/environment arrays.
        unsafe { libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        0
    }
    fn signal_a_process() -> i32 {
        // SAFETY: kill(2) with signal 0 only checks permissions.
        unsafe { libc::kill(libc::getppid(), 0) };
        0
    }
    fn change_a_file_mode() -> i32 {
        // SAFETY: a valid NUL-terminated path that does not exist.
        unsafe { libc::syscall(libc::SYS_chmod, c"/nonexistent-baton".as_ptr(), 0o777) };
        0
    }
    let forbidden: [Probe; 11] = [
        ("socket(AF_NETLINK)", netlink_socket),
        ("socket(SOCK_RAW)", raw_socket),
        ("mmap(PROT_EXEC)", executable_memory),
        ("clone(SIGCHLD)", new_process),
        ("unshare(CLONE_NEWUSER)", new_user_namespace),
        ("ioctl(TCGETS)", terminal_ioctl),
        ("fcntl(F_GETLK)", file_lock),
        ("prctl(PR_SET_DUMPABLE)", become_dumpable),
        ("execve", exec),
        ("kill", signal_a_process),
        ("chmod", change_a_file_mode),
    ];
    for (name, call) in forbidden {
        match under_filters(call) {
            WaitStatus::Signaled(_, Signal::SIGSYS, _) => {}
            other => panic!("{name}: expected death by SIGSYS, got {other:?}"),
        }
    }
}

#[test]
fn seccomp_lets_the_serving_calls_through() {
    fn sockets_baton_uses() -> i32 {
        let kinds = [
            (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
            (libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6),
            (libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0),
            (libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0),
            (libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
        ];
        for (domain, kind, protocol) in kinds {
            // SAFETY: socket(2) takes integers only; ping sockets may be refused
            // (ping_group_range), which is fine: the call must not be killed.
            let fd = unsafe { libc::socket(domain, kind, protocol) };
            if fd >= 0 {
                // SAFETY: closing the descriptor just created.
                unsafe { libc::close(fd) };
            }
        }
        0
    }
    fn queue_size_ioctl() -> i32 {
        let mut bytes: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through a pointer to a live local.
        unsafe { libc::ioctl(2, libc::FIONREAD, &mut bytes as *mut libc::c_int) };
        0
    }
    fn a_thread() -> i32 {
        // clone3 is answered ENOSYS, glibc falls back to clone with thread flags.
        match std::thread::spawn(|| 7).join() {
            Ok(7) => 0,
            _ => 1,
        }
    }
    fn openat_says_enosys() -> i32 {
        // SAFETY: a valid NUL-terminated path.
        let rc =
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0) };
        if rc == -1 && nix::errno::Errno::last() == nix::errno::Errno::ENOSYS {
            0
        } else {
            1
        }
    }
    fn clone3_says_enosys() -> i32 {
        // SAFETY: a null clone_args of size 0; the filter answers before the kernel
        // would read anything (and the kernel would refuse it with EINVAL).
        let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
        if rc == -1 && nix::errno::Errno::last() == nix::errno::Errno::ENOSYS {
            0
        } else {
            1
        }
    }
    fn log_write() -> i32 {
        // SAFETY: writing 0 bytes from a valid pointer.
        unsafe { libc::write(2, c"".as_ptr().cast(), 0) };
        0
    }
    let allowed: [Probe; 6] = [
        ("sockets", sockets_baton_uses),
        ("ioctl(FIONREAD)", queue_size_ioctl),
        ("thread", a_thread),
        ("clone3", clone3_says_enosys),
        ("openat", openat_says_enosys),
        ("write", log_write),
    ];
    for (name, call) in allowed {
        match under_filters(call) {
            WaitStatus::Exited(_, 0) => {}
            other => panic!("{name}: expected exit 0, got {other:?}"),
        }
    }
}

fn errno_of(rc: libc::c_int) -> i32 {
    if rc == -1 {
        nix::errno::Errno::last_raw()
    } else {
        0
    }
}

/// Bind a UNIX socket at `path`; 0 or the errno.
fn bind_unix(path: &Path) -> i32 {
    let Ok(socket) = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return -1;
    };
    let Ok(addr) = nix::sys::socket::UnixAddr::new(path) else {
        return -1;
    };
    match nix::sys::socket::bind(socket.as_raw_fd(), &addr) {
        Ok(()) => 0,
        Err(errno) => errno as i32,
    }
}

#[test]
fn landlock_denies_the_filesystem_except_sockets_in_the_repair_directory() {
    let repair_dir = scratch_dir("landlock-repair");
    let other_dir = scratch_dir("landlock-other");
    let paths = RuntimePaths {
        repair_socket_dir: Some(repair_dir.clone()),
    };
    let (repair, other) = (repair_dir.clone(), other_dir.clone());
    let status = in_child(move || {
        if landlock::restrict(&paths).is_err() {
            return 2;
        }
        // SAFETY: valid NUL-terminated path; the result is only compared.
        let read = errno_of(unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) });
        let new_file = std::fs::File::create(repair.join("file")).map_err(|e| e.raw_os_error());
        let socket_here = bind_unix(&repair.join("vu.sock.repair"));
        let removed = std::fs::remove_file(repair.join("vu.sock.repair")).is_ok();
        let socket_elsewhere = bind_unix(&other.join("x.sock"));
        let checks = [
            read == libc::EACCES,
            new_file.err() == Some(Some(libc::EACCES)),
            socket_here == 0,
            removed,
            socket_elsewhere == libc::EACCES,
        ];
        // Exit code: 0, or 10 + the index of the first failed check.
        checks
            .iter()
            .position(|ok| !ok)
            .map_or(0, |index| 10 + index as i32)
    });
    let _ = std::fs::remove_dir_all(&repair_dir);
    let _ = std::fs::remove_dir_all(&other_dir);
    match status {
        WaitStatus::Exited(_, 0) => {}
        // No Landlock in this kernel: nothing to observe.
        WaitStatus::Exited(_, 10) if !landlock_enforced() => {}
        other => {
            panic!("expected exit 0 (code 10+i: check i failed; 2: restrict failed), got {other:?}")
        }
    }
}

fn landlock_enforced() -> bool {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only
    // returns the ABI version.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        ) > 0
    }
}

#[test]
fn threads_started_before_the_sandbox_get_it_too() {
    let status = in_child(|| {
        // A thread that waits, then reports what it may still do.
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let early = std::thread::spawn(move || {
            if go_rx.recv().is_err() {
                return 1;
            }
            // SAFETY: PR_GET_NO_NEW_PRIVS and PR_CAPBSET_READ take integers only.
            let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
            // SAFETY: as above.
            let net_admin = unsafe { libc::prctl(libc::PR_CAPBSET_READ, CAP_NET_ADMIN, 0, 0, 0) };
            // SAFETY: valid NUL-terminated path.
            let read = errno_of(unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) });
            let landlocked = read == libc::EACCES || !landlock_enforced();
            if nnp == 1 && net_admin == 0 && landlocked {
                0
            } else {
                20 + i32::from(nnp != 1)
                    + 2 * i32::from(net_admin != 0)
                    + 4 * i32::from(!landlocked)
            }
        });
        let Ok(others) = threads::others() else {
            return 2;
        };
        let Ok(ruleset) = landlock::ruleset(&RuntimePaths::none()) else {
            return 3;
        };
        let Ok(for_others) = ruleset.try_clone().map(Option::<OwnedFd>::from) else {
            return 4;
        };
        if baton::sandbox::caps::enter_thread(None).is_err() {
            return 5;
        }
        if landlock::restrict_this_thread(ruleset).is_err() {
            return 6;
        }
        if threads::enter_others(&others, None, for_others.as_ref().map(|fd| fd.as_fd())).is_err() {
            return 7;
        }
        if go_tx.send(()).is_err() {
            return 8;
        }
        early.join().unwrap_or(9)
    });
    match status {
        WaitStatus::Exited(_, 0) => {}
        other => panic!("expected exit 0 (20+bits: no_new_privs, bounding set, Landlock missing on the early thread), got {other:?}"),
    }
}

#[test]
fn the_log_file_is_capped_under_the_sandbox() {
    // --log-size empties the file when full: metadata, ftruncate and lseek on a file
    // opened before the sandbox. Every connection logs a few lines.
    let mut baton = Baton::start_with("log-size", &["--log-size", "40960"]);
    let mut connections = 0;
    while !baton.log().contains("log truncated") {
        connections += 1;
        assert!(connections < 2000, "the log never reached 40960 bytes");
        drop(NetFrontend::connect(&baton.socket, FrontendOptions::default()).expect("frontend"));
    }
    assert!(std::fs::metadata(&baton.log).expect("log file").len() <= 40960);
    let mut dev =
        NetFrontend::connect(&baton.socket, FrontendOptions::default()).expect("frontend");
    assert!(
        ask(&mut dev, &dhcp_discover(), dhcp_reply).is_some(),
        "no DHCP answer after {connections} connections:\n{}",
        baton.log()
    );
    drop(dev);
    assert_exit_0(&mut baton);
}

/// The launcher's process below baton (`--helper`), once it runs.
fn launcher_of(baton: &Baton) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_dir(format!("/proc/{}/task", baton.child.id()))
            .map(|tasks| {
                tasks
                    .flatten()
                    .flat_map(|t| {
                        std::fs::read_to_string(t.path().join("children"))
                            .unwrap_or_default()
                            .split_whitespace()
                            .filter_map(|c| c.parse::<i32>().ok())
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if let Some(pid) = children.into_iter().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim_end()
                == baton::launcher::LAUNCHER_NAME
        }) {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "no launcher below baton:\n{}",
            baton.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_helper_launcher_keeps_only_what_starting_the_helper_needs() {
    let helper = Path::new(env!("CARGO_BIN_EXE_baton")).with_file_name("baton-repair");
    let mut baton = Baton::start_with(
        "launcher",
        &["--helper", helper.to_str().expect("UTF-8 path")],
    );
    let launcher = launcher_of(&baton);
    let status = std::fs::read_to_string(format!("/proc/{launcher}/status")).expect("status");
    let nobody = User::from_name("nobody")
        .expect("user database")
        .expect("a nobody user");
    let uid = nobody.uid.to_string();
    let uids: Vec<&str> = field(&status, "Uid:").split_whitespace().collect();
    assert_eq!(uids, [uid.as_str(); 4], "the launcher runs as baton will");
    assert_eq!(field(&status, "Groups:"), "", "no supplementary groups");
    // CAP_NET_ADMIN, to pass on through the ambient set; nothing else, not even in
    // the bounding set; not effective (the launcher never uses it itself).
    let net_admin = format!("{:016x}", 1u64 << CAP_NET_ADMIN);
    for set in ["CapPrm:", "CapInh:", "CapAmb:", "CapBnd:"] {
        assert_eq!(field(&status, set), net_admin, "{set}");
    }
    assert_eq!(field(&status, "CapEff:"), "0000000000000000");
    assert_eq!(field(&status, "NoNewPrivs:"), "1");
    // Standard descriptors, its socket to baton and the helper binary (opened at start,
    // executed by descriptor): no listener, log or pid file.
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{launcher}/fd"))
        .expect("fd directory")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    assert_eq!(fds, [0, 1, 2, 3, 4], "the launcher's descriptors");
    assert_eq!(
        std::fs::read_link(format!("/proc/{launcher}/fd/4")).expect("fd 4"),
        std::fs::canonicalize(&helper).expect("helper path"),
        "descriptor 4 is the helper binary"
    );

    // It dies with baton, even when baton cannot say goodbye.
    kill(baton.pid(), Signal::SIGKILL).expect("SIGKILL baton");
    let _ = baton.child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{launcher}/stat")).unwrap_or_default();
        let alive = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'));
        if !alive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the launcher outlived baton: {stat}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_stopped_and_continued_baton_keeps_serving() {
    // SIGSTOP interrupts the threads' waits (poll, epoll_wait, futex); SIGCONT resumes
    // them through restart_syscall, which seccomp must let through.
    let mut baton = Baton::start("stopcont");
    kill(baton.pid(), Signal::SIGSTOP).expect("SIGSTOP");
    std::thread::sleep(Duration::from_millis(200));
    kill(baton.pid(), Signal::SIGCONT).expect("SIGCONT");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        matches!(baton.child.try_wait(), Ok(None)),
        "baton died after SIGSTOP/SIGCONT:\n{}",
        baton.log()
    );
    let mut dev = NetFrontend::connect(&baton.socket, FrontendOptions::default())
        .unwrap_or_else(|e| panic!("frontend after SIGCONT: {e}\n{}", baton.log()));
    dev.stop_rings().expect("served");
    drop(dev);
    assert_exit_0(&mut baton);
}
