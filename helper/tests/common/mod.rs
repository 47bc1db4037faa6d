//! Shared pieces of the helper's integration tests: start the real `baton-repair` binary,
//! talk to it with raw or well-formed frames, and wait for it to exit.
//!
//! These tests run as root. Tests that use kernel TCP first move their thread into a
//! private network namespace (`baton_testkit::netns::enter_private_netns`); the helper
//! they spawn inherits it.

#![allow(dead_code)]

use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use baton_proto::frame::FrameHeader;
use baton_proto::repair::{caps, Hello, ProtocolErrorKind, Reply, Request, PROTOCOL_VERSION_MAX};
use baton_repair_ipc::transport;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

/// The helper binary cargo built for these tests.
pub const HELPER: &str = env!("CARGO_BIN_EXE_baton-repair");

/// How long any single step may take before the test gives up.
pub const STEP: Duration = Duration::from_secs(10);

pub fn deadline() -> Option<Instant> {
    transport::deadline_after(STEP)
}

/// A running helper and our end of its connection.
pub struct Helper {
    pub stream: UnixStream,
    pub child: Child,
}

/// Start the helper on a socketpair (`--fd N`) with `extra_args`, stderr captured.
pub fn spawn_on_socketpair(extra_args: &[&str]) -> Helper {
    spawn_on_socketpair_as(std::path::Path::new(HELPER), None, extra_args)
}

/// Start `binary` on a socketpair (`--fd N`) with `extra_args`, stderr captured, as the
/// user `uid` (all uids and gids, no supplementary groups) when given.
pub fn spawn_on_socketpair_as(
    binary: &std::path::Path,
    uid: Option<u32>,
    extra_args: &[&str],
) -> Helper {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let raw = theirs.as_raw_fd();
    let mut command = Command::new(binary);
    command
        .args(extra_args)
        .arg("--fd")
        .arg(raw.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: runs in the child between fork and exec; fcntl, setgroups, setresgid and
    // setresuid are async-signal-safe and take no pointers we do not own.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(uid) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(uid, uid, uid) != 0
                    || libc::setresuid(uid, uid, uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    // A freshly copied binary may still be open for writing in a child that another
    // test thread forked but has not exec'd yet (ETXTBSY): try again shortly.
    let mut attempts = 0;
    let child = loop {
        match command.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && attempts < 100 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => break other.expect("spawn baton-repair"),
        }
    };
    drop(theirs);
    Helper {
        stream: ours,
        child,
    }
}

/// Start the helper with the given arguments (no socketpair), stderr captured.
pub fn spawn_with_args(args: &[&std::ffi::OsStr]) -> Child {
    Command::new(HELPER)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn baton-repair")
}

/// Wait for `child` to exit (killing it after [`STEP`]); returns its status and stderr.
pub fn wait_exit(child: &mut Child) -> (ExitStatus, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > STEP {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            panic!("helper did not exit within {STEP:?} (killed: {status})");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(!stderr.contains("panicked"), "helper panicked:\n{stderr}");
    (status, stderr)
}

/// Send a request with descriptors and read the one reply.
pub fn request(stream: &UnixStream, request: &Request, fds: &[BorrowedFd<'_>]) -> Reply {
    transport::send_message(stream.as_fd(), request, fds, deadline()).expect("send request");
    read_reply(stream)
}

/// Read one reply frame (no descriptors expected).
pub fn read_reply(stream: &UnixStream) -> Reply {
    let frame = transport::recv_frame(stream.as_fd(), deadline())
        .expect("receive reply")
        .expect("helper closed instead of replying");
    assert_eq!(frame.fds_received(), 0, "a reply carries no descriptors");
    baton_proto::decode(&frame.body).expect("decode reply")
}

/// Do the hello and check the answer.
pub fn hello(stream: &UnixStream) {
    match request(stream, &Request::Hello(Hello::ours(caps::ALL_V2)), &[]) {
        Reply::Hello(theirs) => {
            assert_eq!(theirs.min_version, theirs.max_version);
            assert_eq!(theirs.max_version, PROTOCOL_VERSION_MAX);
            assert_eq!(theirs.capabilities, caps::ALL_V2);
        }
        other => panic!("hello answered with {other:?}"),
    }
}

/// Do the hello as a version-1 backend would and check the answer.
pub fn hello_v1(stream: &UnixStream) {
    let mut ours = Hello::ours(caps::ALL_V1);
    ours.max_version = 1;
    match request(stream, &Request::Hello(ours), &[]) {
        Reply::Hello(theirs) => {
            assert_eq!((theirs.min_version, theirs.max_version), (1, 1));
            assert_eq!(theirs.capabilities, caps::ALL_V1);
        }
        other => panic!("hello answered with {other:?}"),
    }
}

/// Assert that `reply` is a refusal of `kind`; returns its message.
pub fn expect_refusal(reply: Reply, kind: ProtocolErrorKind) -> String {
    match reply {
        Reply::Error(e) => {
            assert_eq!(e.kind, kind, "{e}");
            e.message
        }
        other => panic!("expected a {kind:?} refusal, got {other:?}"),
    }
}

/// The helper is alive and in sync: an empty dump is answered with an empty result.
pub fn assert_still_serving(stream: &UnixStream) {
    match request(stream, &Request::Dump, &[]) {
        Reply::Dumped(results) => assert!(results.is_empty()),
        other => panic!("expected an empty Dumped, got {other:?}"),
    }
}

/// Send raw header bytes and body in one sendmsg with `fds` attached.
pub fn send_raw(stream: &UnixStream, header: &[u8], body: &[u8], fds: &[RawFd]) {
    let iov = [IoSlice::new(header), IoSlice::new(body)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<UnixAddr>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .expect("sendmsg");
    assert_eq!(sent, header.len() + body.len());
}

/// A frame header with arbitrary fields.
pub fn header_bytes(body_len: u32, fd_count: u16) -> Vec<u8> {
    let mut bytes = FrameHeader {
        body_len: 0,
        fd_count: 0,
    }
    .to_bytes()
    .to_vec();
    bytes[4..8].copy_from_slice(&body_len.to_le_bytes());
    bytes[8..10].copy_from_slice(&fd_count.to_le_bytes());
    bytes
}

/// A fresh private directory under the system temp dir.
pub fn temp_dir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!("baton-repair-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    TempDir(dir)
}

/// A scratch directory removed when the test is done with it.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A socket of any kind, as an owned descriptor (raw `socket(2)`).
pub fn raw_socket(
    domain: libc::c_int,
    kind: libc::c_int,
    protocol: libc::c_int,
) -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) takes only integers; a non-negative result is a new descriptor
    // that nothing else owns.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Enter a private network namespace (root only) for this test thread.
pub fn private_netns() {
    baton_testkit::netns::enter_private_netns().expect("private network namespace");
}

/// The real helper spawned by the backend's client library (`--debug`), hello done.
pub fn spawn_client() -> (baton_repair_ipc::RepairClient, Child) {
    baton_repair_ipc::RepairClient::spawn(HELPER, ["--debug"])
        .expect("spawn the helper and say hello")
}

/// Close the client's end and check the helper exits 0, as it must when its backend
/// goes away.
pub fn finish(client: baton_repair_ipc::RepairClient, mut child: Child) {
    drop(client);
    let status = child.wait().expect("wait");
    assert_eq!(
        status.code(),
        Some(0),
        "helper must exit 0 when the backend closes"
    );
}

/// Hang up on a helper spawned on a socket pair and check it exits 0 (its stderr in the
/// failure message).
pub fn finish_cleanly(mut helper: Helper) {
    drop(helper.stream);
    let (status, stderr) = wait_exit(&mut helper.child);
    assert_eq!(status.code(), Some(0), "{stderr}");
}
