//! The source side's helper lifecycle and endgame (issue 5), with real `baton` and
//! `baton-repair` processes in a private network namespace and a smoltcp guest:
//!
//! * a helper started by someone else attaches at `--repair-path` and is what SAVE uses;
//! * `LOG_ALL` without a helper is a loud warning, and SAVE says which connections are
//!   lost;
//! * a helper with another uid is refused; one that dies is noticed and may be replaced;
//! * with `--helper`, the helper is started through the launcher when a migration
//!   starts (not before), and a helper that was killed is replaced at the next one;
//! * after the VM migrated away (no target took the sockets here: the "other host"
//!   case), the frozen sockets linger — the peer's segments get neither ACK nor RST —
//!   and are then closed without a FIN or RST; `--migrate-exit` exits after that.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_vu_harness::smol::GuestNic;
use baton_vu_harness::NetFrontend;
use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;

mod common;
use common::Baton;

const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const TIMEOUT: Duration = Duration::from_secs(30);
/// `TCP_ESTABLISHED` and `TCP_CLOSE_WAIT` in `tcp_info.tcpi_state`.
const TCP_ESTABLISHED: u8 = 1;

/// The smoltcp guest.
struct Guest {
    nic: GuestNic,
    iface: Interface,
    sockets: SocketSet<'static>,
}

impl Guest {
    fn new(dev: NetFrontend) -> Self {
        let mut nic = GuestNic::new(dev, 1514);
        let iface = common::guest::interface(&mut nic);
        Guest {
            nic,
            iface,
            sockets: SocketSet::new(vec![]),
        }
    }

    fn poll(&mut self) {
        self.iface.poll(
            smoltcp::time::Instant::now(),
            &mut self.nic,
            &mut self.sockets,
        );
        self.nic.wait(Duration::from_millis(5));
    }

    fn tcp(&mut self, handle: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(handle)
    }

    /// Connect to the host's `listener` (through the gateway address, which baton maps
    /// to the host's loopback), say hello both ways, and return the host's end once
    /// everything is acknowledged.
    fn connect(&mut self, listener: &TcpListener, local_port: u16, baton: &Baton) -> TcpStream {
        let port = listener.local_addr().expect("addr").port();
        let handle = self.sockets.add(tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; 16384]),
            tcp::SocketBuffer::new(vec![0; 16384]),
        ));
        let cx = self.iface.context();
        self.sockets
            .get_mut::<tcp::Socket>(handle)
            .connect(cx, (IpAddress::Ipv4(GW_V4), port), local_port)
            .expect("connect");
        listener.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + TIMEOUT;
        let mut peer = loop {
            self.poll();
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "no connection; log:\n{}",
                baton.log()
            );
        };
        peer.set_nonblocking(false).expect("blocking");
        peer.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        peer.write_all(b"from the host").expect("host writes");
        let mut got = Vec::new();
        let mut sent = false;
        loop {
            self.poll();
            let socket = self.tcp(handle);
            if socket.can_send() && !sent {
                socket.send_slice(b"from the guest").expect("guest writes");
                sent = true;
            }
            let mut buf = [0u8; 64];
            if socket.can_recv() {
                let n = socket.recv_slice(&mut buf).expect("guest reads");
                got.extend_from_slice(&buf[..n]);
            }
            if got == b"from the host" && socket.send_queue() == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no exchange; log:\n{}",
                baton.log()
            );
        }
        let mut buf = [0u8; 14];
        let deadline = Instant::now() + TIMEOUT;
        let mut read = 0;
        while read < buf.len() {
            self.poll();
            match peer.read(&mut buf[read..]) {
                Ok(0) => panic!("EOF from the guest"),
                Ok(n) => read += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("host read: {e}"),
            }
            assert!(
                Instant::now() < deadline,
                "the guest's bytes did not arrive"
            );
        }
        assert_eq!(&buf, b"from the guest");
        // Let the last ACKs settle on both sides.
        for _ in 0..20 {
            self.poll();
        }
        peer
    }
}

/// `baton-repair`, built next to `baton` (`scripts/test` builds both).
fn helper_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_baton")).with_file_name("baton-repair");
    assert!(
        path.exists(),
        "{} missing: cargo build -p baton-repair",
        path.display()
    );
    path
}

/// The repair socket next to baton's vhost-user socket (the default `--repair-path`),
/// once it exists (with `-f` it is bound just after the vhost-user socket).
fn repair_path(baton: &Baton) -> PathBuf {
    let mut path = baton.socket().into_os_string();
    path.push(".repair");
    let path = PathBuf::from(path);
    let deadline = Instant::now() + TIMEOUT;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no repair socket; log:\n{}",
            baton.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    path
}

/// A `baton-repair PATH` started "by the management layer", logging every request.
struct Helper {
    child: Child,
    log: PathBuf,
}

impl Helper {
    fn attach(path: &Path, name: &str) -> Helper {
        let log =
            std::env::temp_dir().join(format!("baton-it-{}-helper-{name}.log", std::process::id()));
        let child = Command::new(helper_binary())
            .arg("--debug")
            .arg(path)
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("helper log"))
            .spawn()
            .expect("start baton-repair");
        Helper { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // SAFETY: signalling the child we started, by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Wait until baton's log contains `needle`.
fn wait_for_log(baton: &Baton, needle: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while !baton.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            baton.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The kernel's view of a socket: (state, unacknowledged segments).
fn tcp_state(stream: &TcpStream) -> (u8, u32) {
    // SAFETY: zeroed is a valid tcp_info (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    (info.tcpi_state, info.tcpi_unacked)
}

/// Neither data, nor EOF (a FIN), nor an error (a RST) on `peer`.
fn assert_untouched(peer: &mut TcpStream, what: &str, baton: &Baton) {
    let mut buf = [0u8; 16];
    match peer.read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("{what}: the peer read {other:?}; log:\n{}", baton.log()),
    }
    let (state, _) = tcp_state(peer);
    assert_eq!(
        state,
        TCP_ESTABLISHED,
        "{what}: the peer's socket left ESTABLISHED; log:\n{}",
        baton.log()
    );
}

/// QEMU's order at the end of a migration on the source: rings stopped, SAVE, CHECK.
fn save(dev: &mut NetFrontend, baton: &Baton) -> Vec<u8> {
    dev.stop_rings().expect("GET_VRING_BASE");
    dev.save_state()
        .unwrap_or_else(|e| panic!("SAVE: {e}; log:\n{}", baton.log()))
}

/// A source with an attached helper and two TCP connections, saved for a migration
/// (the sockets are frozen). Returns the host ends of the connections.
fn frozen_source(
    name: &str,
    args: &[&str],
) -> (Baton, Helper, Guest, TcpStream, TcpStream, Vec<u8>) {
    let baton = Baton::start(name, args);
    let helper = Helper::attach(&repair_path(&baton), name);
    wait_for_log(&baton, "repair helper ready");

    let mut guest = Guest::new(baton.connect());
    guest.nic.dev.start_dirty_log().expect("LOG_ALL");
    wait_for_log(&baton, "migration starting: repair helper attached");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let first = guest.connect(&listener, 40001, &baton);
    let second = guest.connect(&listener, 40002, &baton);
    let stream = save(&mut guest.nic.dev, &baton);
    (baton, helper, guest, first, second, stream)
}

#[test]
fn a_helper_at_the_repair_path_serves_save_and_the_linger_ends_silently() {
    // Two connections: one whose peer talks during the linger, one that stays idle.
    let (baton, helper, guest, mut talking, mut idle, stream) =
        frozen_source("attach", &["--linger", "4", "--migrate-exit"]);
    let state = baton_proto::migration::decode_stream(&stream).expect("valid stream");
    assert_eq!(state.tcp_flows.len(), 2, "log:\n{}", baton.log());
    // The attached helper did the privileged part of SAVE.
    let helper_log = helper.log();
    assert!(
        helper_log.contains("Freeze") || helper_log.contains("Dump"),
        "the helper was not asked to freeze or dump: {helper_log}\nbaton log:\n{}",
        baton.log()
    );
    assert!(!baton.log().contains("TCP connections will not survive"));

    // The source QEMU goes away; no target took the sockets here (another host).
    drop(guest);
    wait_for_log(&baton, "keeping 2 frozen TCP connection(s)");
    talking
        .write_all(b"late segment")
        .expect("the peer writes during the linger");
    // Several retransmission timeouts of the peer (200 ms at least each).
    std::thread::sleep(Duration::from_millis(1200));
    assert_untouched(&mut talking, "during the linger", &baton);
    let (_, unacked) = tcp_state(&talking);
    assert!(
        unacked > 0,
        "the frozen socket acknowledged the peer's data; log:\n{}",
        baton.log()
    );
    assert_untouched(&mut idle, "during the linger", &baton);
    assert!(
        !baton.log().contains("linger over"),
        "the checks above were meant to run during the linger; log:\n{}",
        baton.log()
    );

    // After the linger: closed here in repair mode, so the idle peer got nothing (the
    // talking one will be answered with RST by this host on its next retransmission —
    // in real life its address has moved to the target by then).
    wait_for_log(
        &baton,
        "linger over: 2 frozen TCP connection(s) closed silently",
    );
    wait_for_log(&baton, "migration complete and linger over: exiting");
    std::thread::sleep(Duration::from_millis(300));
    assert_untouched(&mut idle, "after the silent close", &baton);
}

#[test]
fn frozen_sockets_close_silently_when_baton_exits() {
    // Stopped (SIGTERM) right after SAVE, the frontend still connected, long before
    // any linger: the process exit must not close the frozen sockets with FIN or RST.
    let (baton, _helper, guest, mut first, mut second, _) =
        frozen_source("exit", &["--linger", "600"]);
    let pid = baton.pid();
    // SAFETY: signalling the child the fixture started, by its PID.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + TIMEOUT;
    while !baton.log().contains("closed silently at exit") {
        assert!(
            Instant::now() < deadline,
            "no silent close at exit; log:\n{}",
            baton.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        baton
            .log()
            .contains("2 frozen TCP connection(s) closed silently at exit"),
        "{}",
        baton.log()
    );
    drop(guest);
    std::thread::sleep(Duration::from_millis(300));
    assert_untouched(&mut first, "after baton exited", &baton);
    assert_untouched(&mut second, "after baton exited", &baton);
}

#[test]
fn sockets_a_same_host_target_took_need_no_linger() {
    // -1 and a linger far beyond the test: the source must still exit at once, since
    // the target holds the very same sockets.
    let (source, _helper, mut guest, mut first, _second, stream) =
        frozen_source("taken", &["-1", "--linger", "600"]);
    let args: Vec<&str> = common::DUAL_STACK.iter().copied().chain(["-d"]).collect();
    let target = Baton::spawn("taken-dst", &args);
    let mut loaded = None;
    let new = NetFrontend::connect_with(
        &target.socket(),
        baton_vu_harness::FrontendOptions::default(),
        |dev| {
            loaded = Some(dev.load_state(&stream));
            Ok(())
        },
    )
    .unwrap_or_else(|e| panic!("target frontend: {e}; log:\n{}", target.log()));
    loaded
        .expect("the hook ran")
        .unwrap_or_else(|e| panic!("LOAD: {e}; target log:\n{}", target.log()));
    // The source QEMU goes away after the completed migration.
    drop(std::mem::replace(&mut guest.nic.dev, new));
    wait_for_log(&source, "keeping 0 frozen TCP connection(s)");
    wait_for_log(&source, "migration complete and linger over: exiting");

    // The connection carries on at the target: host → guest.
    first.write_all(b"after the move").expect("host writes");
    let handle = guest
        .sockets
        .iter()
        .find_map(|(handle, socket)| match socket {
            smoltcp::socket::Socket::Tcp(tcp)
                if tcp.local_endpoint().map(|e| e.port) == Some(40001) =>
            {
                Some(handle)
            }
            _ => None,
        })
        .expect("the guest's first connection");
    let mut got = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while got != b"after the move" {
        guest.poll();
        let socket = guest.tcp(handle);
        let mut buf = [0u8; 64];
        if socket.can_recv() {
            let n = socket.recv_slice(&mut buf).expect("guest reads");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            Instant::now() < deadline,
            "nothing at the target; got {got:?}; target log:\n{}",
            target.log()
        );
    }
}

#[test]
fn log_all_without_a_helper_warns_and_save_says_what_is_lost() {
    let baton = Baton::start("nohelper", &[]);
    let mut guest = Guest::new(baton.connect());
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let _peer = guest.connect(&listener, 40003, &baton);
    guest.nic.dev.start_dirty_log().expect("LOG_ALL");
    let path = repair_path(&baton);
    wait_for_log(
        &baton,
        &format!(
            "no baton-repair helper is attached: start `baton-repair {}`",
            path.display()
        ),
    );
    guest.nic.dev.stop_rings().expect("GET_VRING_BASE");
    // SAVE goes on (baton freezes the sockets itself, for a target on this host), but
    // the loss for any other target was announced.
    let _ = guest.nic.dev.save_state();
    wait_for_log(
        &baton,
        &format!(
            "TCP connections will not survive a migration to another host or network \
             namespace: no baton-repair helper is attached at {}",
            path.display()
        ),
    );
}

#[test]
fn a_helper_with_another_uid_is_refused_and_a_dead_one_can_be_replaced() {
    let baton = Baton::start("uid", &[]);
    let path = repair_path(&baton);

    // A peer whose effective uid is neither baton's (nobody, after the sandbox) nor
    // root. Credentials are per thread in the kernel; raw system calls change only this
    // thread's, and the thread ends right after.
    let refused = std::thread::spawn({
        let path = path.clone();
        move || {
            // SAFETY: raw setresuid/setfsuid on this thread only (no glibc broadcast);
            // the thread does nothing else that depends on its credentials.
            unsafe {
                assert_eq!(
                    libc::syscall(libc::SYS_setresuid, -1i64, 12345i64, -1i64),
                    0
                );
                // Keep file access as root so the 0600 socket file can be opened: the
                // uid that counts is the effective one, which SO_PEERCRED reports.
                libc::syscall(libc::SYS_setfsuid, 0i64);
            }
            let mut stream = UnixStream::connect(&path).expect("connect");
            stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            let mut buf = [0u8; 1];
            stream.read(&mut buf).expect("closed by baton")
        }
    })
    .join()
    .expect("uid thread");
    assert_eq!(refused, 0, "baton must close a foreign peer without a word");
    wait_for_log(&baton, "uid=12345");
    assert!(baton.log().contains("refusing a peer"), "{}", baton.log());
    assert!(
        !baton.log().contains("repair helper ready"),
        "{}",
        baton.log()
    );

    // A real helper attaches afterwards; when it dies, baton notices; another attaches.
    let first = Helper::attach(&path, "first");
    wait_for_log(&baton, "repair helper ready");
    drop(first);
    wait_for_log(&baton, "the repair helper went away");
    let _second = Helper::attach(&path, "second");
    wait_for_log(&baton, "attachment=2");
    let mut dev = baton.connect();
    dev.start_dirty_log().expect("LOG_ALL");
    wait_for_log(&baton, "migration starting: repair helper attached");
}

#[test]
fn a_migrated_source_exits_only_with_migrate_exit_or_one_off() {
    // Without either: after the VM migrated away, baton serves the next frontend.
    let staying = Baton::start("stay", &["--linger", "0"]);
    let mut dev = staying.connect();
    dev.start_dirty_log().expect("LOG_ALL");
    save(&mut dev, &staying);
    wait_for_log(&staying, "migration complete as source");
    drop(dev);
    wait_for_log(&staying, "the VM migrated away");
    wait_for_log(&staying, "linger over");
    let mut again = staying.connect();
    again.stop_rings().expect("a new frontend is served");
    drop(again);

    // A snapshot (no LOG_ALL) is not a migration: -1 ends with the connection as usual,
    // a migration with -1 ends after the linger.
    for (name, migrating) in [("oneoff-snapshot", false), ("oneoff-migration", true)] {
        let baton = Baton::start(name, &["-1", "--linger", "1"]);
        let mut dev = baton.connect();
        if migrating {
            dev.start_dirty_log().expect("LOG_ALL");
        }
        save(&mut dev, &baton);
        drop(dev);
        let exited = Instant::now() + TIMEOUT;
        while !baton.log().contains("exiting") {
            assert!(
                Instant::now() < exited,
                "{name}: no exit; log:\n{}",
                baton.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            baton.log().contains("the VM migrated away"),
            migrating,
            "{name}: log:\n{}",
            baton.log()
        );
    }
}

/// Wait until exactly one live `baton-repair` runs below baton; its pid.
fn the_helper(baton: &Baton) -> i32 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let helpers = common::descendants_named(baton.pid(), "baton-repair");
        if let [pid] = helpers.as_slice() {
            return *pid;
        }
        assert!(
            Instant::now() < deadline,
            "helpers below baton: {helpers:?}; log:\n{}",
            baton.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SAVE's stream carries the connection's kernel state: the helper dumped it.
fn assert_dumped(stream: &[u8], flows: usize, baton: &Baton) {
    let state = baton_proto::migration::decode_stream(stream).expect("valid stream");
    assert_eq!(state.tcp_flows.len(), flows, "log:\n{}", baton.log());
    assert!(
        state.tcp_flows.iter().all(|f| f.kernel.is_some()),
        "SAVE did not dump through the helper; log:\n{}",
        baton.log()
    );
}

#[test]
fn the_helper_named_with_helper_starts_when_a_migration_starts_not_before() {
    let helper = helper_binary();
    let baton = Baton::start("lazy", &["--helper", helper.to_str().expect("UTF-8 path")]);
    wait_for_log(&baton, "helper launcher started");
    let mut guest = Guest::new(baton.connect());
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let _peer = guest.connect(&listener, 40011, &baton);
    // Serving, with a TCP connection, before any migration: the launcher waits, no
    // helper runs.
    assert_eq!(
        common::descendants_named(baton.pid(), baton::launcher::LAUNCHER_NAME).len(),
        1,
        "one launcher; log:\n{}",
        baton.log()
    );
    assert!(
        common::descendants_named(baton.pid(), "baton-repair").is_empty(),
        "a helper runs before the migration; log:\n{}",
        baton.log()
    );
    assert!(
        !baton.log().contains("repair helper ready"),
        "{}",
        baton.log()
    );

    guest.nic.dev.start_dirty_log().expect("LOG_ALL");
    wait_for_log(&baton, "migration starting: starting the repair helper");
    wait_for_log(&baton, "repair helper ready");
    the_helper(&baton);
    let stream = save(&mut guest.nic.dev, &baton);
    assert_dumped(&stream, 1, &baton);
}

/// baton, started as root, runs as `nobody`, and so does its launcher; the helper binary
/// sits in a directory only root may enter (as a package's libexec directory, or a
/// build tree, may be). The launcher opened the binary at start-up and executes it by
/// descriptor, so the helper still starts. (By path it failed with EACCES.)
#[test]
fn a_helper_in_a_directory_nobody_cannot_enter_still_starts() {
    use std::os::unix::fs::PermissionsExt;
    let private = std::env::temp_dir().join(format!("baton-private-helper-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::create_dir_all(&private).expect("private directory");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod 700");
    let helper = private.join("baton-repair");
    std::fs::copy(helper_binary(), &helper).expect("copy the helper");
    let baton = Baton::start(
        "private-helper",
        &["--helper", helper.to_str().expect("UTF-8 path")],
    );
    let mut guest = Guest::new(baton.connect());
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let _peer = guest.connect(&listener, 40013, &baton);
    guest.nic.dev.start_dirty_log().expect("LOG_ALL");
    wait_for_log(&baton, "repair helper ready");
    the_helper(&baton);
    let stream = save(&mut guest.nic.dev, &baton);
    assert_dumped(&stream, 1, &baton);
    drop(guest);
    drop(baton);
    let _ = std::fs::remove_dir_all(&private);
}

#[test]
fn a_killed_helper_is_replaced_when_the_next_migration_starts() {
    let helper = helper_binary();
    let baton = Baton::start(
        "respawn",
        &["--helper", helper.to_str().expect("UTF-8 path")],
    );
    let mut guest = Guest::new(baton.connect());
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let _peer = guest.connect(&listener, 40012, &baton);
    guest.nic.dev.start_dirty_log().expect("LOG_ALL");
    wait_for_log(&baton, "attachment=1");
    let first = the_helper(&baton);

    // SAFETY: signalling the helper our baton started, by its PID.
    unsafe { libc::kill(first, libc::SIGKILL) };
    wait_for_log(&baton, "the repair helper went away");
    let deadline = Instant::now() + TIMEOUT;
    while !common::descendants_named(baton.pid(), "baton-repair").is_empty() {
        assert!(Instant::now() < deadline, "the dead helper lingers");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!baton.log().contains("attachment=2"), "{}", baton.log());

    // That migration was cancelled (dirty logging off); the next one starts.
    let dev = &mut guest.nic.dev;
    let without_log_all =
        dev.acked_features & !vhost::vhost_user::message::VhostUserVirtioFeatures::LOG_ALL.bits();
    vhost::VhostBackend::set_features(&dev.fe, without_log_all).expect("SET_FEATURES");
    dev.acked_features = without_log_all;
    wait_for_log(&baton, "dirty logging off");
    dev.start_dirty_log().expect("LOG_ALL again");
    wait_for_log(&baton, "attachment=2");
    let second = the_helper(&baton);
    assert_ne!(first, second);
    let stream = save(&mut guest.nic.dev, &baton);
    assert_dumped(&stream, 1, &baton);
}
