//! How the helper finds its backend and whom it agrees to serve: a socket path, a
//! directory to wait in, an inherited descriptor; the peer-uid check; exit statuses.

mod common;

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use baton_proto::repair::{caps, Hello, Request};
use baton_repair_ipc::{transport, RepairListener};
use common::*;
use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

/// A listening socket at `path` whose SO_PEERCRED says uid 65534: bound as root, but
/// `listen()` called by a thread whose effective uid is 65534 at that moment.
fn listen_as_nobody(path: &Path) -> std::os::fd::OwnedFd {
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(sock.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("bind");
    let sock = std::thread::spawn(move || {
        // The raw syscall changes this thread only (glibc's setresuid would change all).
        // SAFETY: setresuid takes integers only; -1 leaves the real and saved uids.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, -1, 65534, -1) };
        assert_eq!(rc, 0, "setresuid(-1, 65534, -1)");
        let listened = listen(&sock, Backlog::new(1).expect("backlog"));
        // SAFETY: as above; the saved uid 0 allows going back.
        let rc = unsafe { libc::syscall(libc::SYS_setresuid, -1, 0, -1) };
        assert_eq!(rc, 0, "setresuid(-1, 0, -1)");
        listened.expect("listen");
        sock
    })
    .join()
    .expect("listen thread");
    sock
}

fn accept_one(listener: &std::os::fd::OwnedFd) -> UnixStream {
    let raw = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC).expect("accept");
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    UnixStream::from(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

#[test]
fn backend_with_a_foreign_uid_is_refused_before_any_request_is_read() {
    let dir = temp_dir("foreign-uid");
    let path = dir.join("b.repair");
    let listener = listen_as_nobody(&path);
    let mut child = spawn_with_args(&[path.as_os_str()]);
    let stream = accept_one(&listener);

    // Whatever we send is never read: either the helper is already gone (EPIPE), or it
    // closes with our hello unread in its queue, which the kernel reports to us as
    // ECONNRESET instead of a clean end of stream.
    let hello = Request::Hello(Hello::ours(caps::ALL_V1));
    let sent = transport::send_message(std::os::fd::AsFd::as_fd(&stream), &hello, &[], deadline());
    match sent {
        Err(transport::TransportError::Sys {
            errno: nix::errno::Errno::EPIPE,
            ..
        }) => {}
        Ok(()) => {
            let mut buf = [0u8; 16];
            stream.set_read_timeout(Some(STEP)).expect("timeout");
            let read = std::io::Read::read(&mut &stream, &mut buf);
            match read {
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {}
                other => panic!("expected ECONNRESET (hello never read), got {other:?}"),
            }
        }
        Err(other) => panic!("expected EPIPE or success, got {other}"),
    }
    let (status, stderr) = wait_exit(&mut child);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("65534"), "{stderr}");
}

#[test]
fn backend_with_an_allowed_uid_is_served() {
    let dir = temp_dir("allowed-uid");
    let path = dir.join("b.repair");
    let listener = listen_as_nobody(&path);
    let mut child = spawn_with_args(&[
        OsStr::new("--allow-uid"),
        OsStr::new("65534"),
        path.as_os_str(),
    ]);
    let stream = accept_one(&listener);
    hello(&stream);
    assert_still_serving(&stream);
    drop(stream);
    let (status, stderr) = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn directory_mode_connects_once_a_repair_socket_appears() {
    let dir = temp_dir("dir-wait");
    // Something that is not a repair socket does not attract it.
    std::fs::write(dir.join("other.repair"), b"a regular file").expect("write");
    let _decoy = std::os::unix::net::UnixListener::bind(dir.join("decoy.socket")).expect("decoy");
    let mut child = spawn_with_args(&[OsStr::new("--timeout"), OsStr::new("20"), dir.as_os_str()]);
    std::thread::sleep(Duration::from_millis(300));
    let listener = RepairListener::bind(dir.join("x.repair")).expect("bind");
    let client = listener
        .accept(STEP)
        .expect("helper connects and says hello");
    assert_eq!(client.helper_capabilities(), caps::ALL_V2);
    drop(client);
    let (status, stderr) = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn directory_mode_uses_a_socket_that_already_exists() {
    let dir = temp_dir("dir-existing");
    let listener = RepairListener::bind(dir.join("vm.socket.repair")).expect("bind");
    let mut child = spawn_with_args(&[dir.as_os_str()]);
    let client = listener.accept(STEP).expect("helper connects");
    drop(client);
    let (status, stderr) = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn directory_mode_waits_past_a_stale_socket_for_the_live_one() {
    let dir = temp_dir("dir-stale");
    let path = dir.join("x.repair");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    let mut child = spawn_with_args(&[OsStr::new("--timeout"), OsStr::new("20"), dir.as_os_str()]);
    std::thread::sleep(Duration::from_millis(200));
    // The backend replaces the stale file with its live socket.
    let listener = RepairListener::bind(&path).expect("bind over stale");
    drop(listener.accept(STEP).expect("helper connects"));
    let (status, stderr) = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn directory_wait_gives_up_after_the_timeout() {
    let dir = temp_dir("dir-timeout");
    let start = Instant::now();
    let mut child = spawn_with_args(&[OsStr::new("--timeout"), OsStr::new("1"), dir.as_os_str()]);
    let (status, stderr) = wait_exit(&mut child);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(start.elapsed() >= Duration::from_secs(1));
}

#[test]
fn socket_path_mode_connects_and_exits_0_when_the_backend_closes() {
    let dir = temp_dir("path");
    let listener = RepairListener::bind(dir.join("x.repair")).expect("bind");
    let mut child = spawn_with_args(&[dir.join("x.repair").as_os_str()]);
    let client = listener.accept(STEP).expect("helper connects");
    drop(client);
    let (status, stderr) = wait_exit(&mut child);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let dir = temp_dir("usage");
    let regular = dir.join("file");
    std::fs::write(&regular, b"x").expect("write");
    let missing = dir.join("missing");
    let cases: Vec<Vec<&OsStr>> = vec![
        vec![],
        vec![OsStr::new("--no-such-option"), dir.as_os_str()],
        vec![regular.as_os_str()],
        vec![missing.as_os_str()],
        vec![OsStr::new("--fd"), OsStr::new("0")],
        vec![OsStr::new("--fd"), OsStr::new("3"), dir.as_os_str()],
    ];
    for args in cases {
        let mut child = spawn_with_args(&args);
        let (status, stderr) = wait_exit(&mut child);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
    }
}
