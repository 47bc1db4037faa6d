//! The three ways to run the helper, seen from outside: as root (the other suites), setuid
//! root, and with the file capability `cap_net_admin+ep` — and what happens without any.
//! Each run as the unprivileged user 65534 from a copy of the binary.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use baton_proto::repair::{Reply, Request};
use common::*;

const NOBODY: u32 = 65534;

/// A copy of the helper in a fresh directory everybody may traverse (the directory
/// goes away with the returned guard).
fn helper_copy(name: &str) -> (TempDir, PathBuf) {
    let dir = temp_dir(name);
    std::fs::set_permissions(&*dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let copy = dir.join("baton-repair");
    std::fs::copy(HELPER, &copy).expect("copy helper");
    (dir, copy)
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {field}"))
}

/// Hello, then a dump of a live connection: the privileged operation works.
fn serves_a_dump(helper: &Helper) {
    hello(&helper.stream);
    let (near, _far) = baton_testkit::tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    match request(&helper.stream, &Request::Dump, &[near.as_fd()]) {
        Reply::Dumped(results) => assert!(results[0].is_ok(), "{results:?}"),
        other => panic!("expected Dumped, got {other:?}"),
    }
}

#[test]
fn without_net_admin_it_exits_1_and_says_how_to_install() {
    let (_dir, copy) = helper_copy("no-caps");
    let mut helper = spawn_on_socketpair_as(&copy, Some(NOBODY), &["--allow-uid", "0"]);
    let (status, stderr) = wait_exit(&mut helper.child);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("setcap cap_net_admin+ep"), "{stderr}");
}

#[test]
fn setuid_root_install_becomes_the_real_user_with_net_admin_only() {
    private_netns();
    let (_dir, copy) = helper_copy("setuid");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o4755)).expect("chmod u+s");
    let mut helper = spawn_on_socketpair_as(&copy, Some(NOBODY), &["--allow-uid", "0"]);
    serves_a_dump(&helper);
    let pid = helper.child.id();
    assert_eq!(status_field(pid, "Uid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "Gid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "CapEff:"), "0000000000001000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000001000");
    assert_eq!(status_field(pid, "CapBnd:"), "0000000000001000");
    assert_eq!(status_field(pid, "Seccomp:"), "2");
    drop(helper.stream);
    let (status, stderr) = wait_exit(&mut helper.child);
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn file_capability_install_keeps_net_admin_only() {
    private_netns();
    let (_dir, copy) = helper_copy("setcap");
    let setcap = Command::new("setcap")
        .arg("cap_net_admin+ep")
        .arg(&copy)
        .status();
    match setcap {
        Ok(status) if status.success() => {}
        other => {
            eprintln!("NOTE: setcap unavailable ({other:?}); skipping the file-capability case");
            return;
        }
    }
    let mut helper = spawn_on_socketpair_as(&copy, Some(NOBODY), &["--allow-uid", "0"]);
    serves_a_dump(&helper);
    let pid = helper.child.id();
    assert_eq!(status_field(pid, "Uid:"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(pid, "CapEff:"), "0000000000001000");
    assert_eq!(status_field(pid, "CapPrm:"), "0000000000001000");
    assert_eq!(status_field(pid, "CapInh:"), "0000000000000000");
    // Without CAP_SETPCAP the bounding set cannot shrink; no_new_privs and seccomp
    // (no execve) make it irrelevant.
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    drop(helper.stream);
    let (status, stderr) = wait_exit(&mut helper.child);
    assert_eq!(status.code(), Some(0), "{stderr}");
}
