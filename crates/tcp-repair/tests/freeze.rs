//! Freeze and thaw in-process: a dumped socket acknowledges nothing, a thawed one
//! carries on with nothing lost; dumps that must fail leave the socket live.

mod scenario;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use scenario::{enter_private_netns, listener, outq, pair, pattern, wait_until, Family};

fn repair_flag(s: &impl AsRawFd) -> i32 {
    let mut v: libc::c_int = -7;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: getsockopt of an int into a local.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            19,
            (&mut v as *mut i32).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    v
}

const FAMILIES: [Family; 3] = [Family::V4, Family::V6, Family::V4Mapped];

#[test]
fn dumped_socket_acknowledges_nothing_until_thawed() {
    enter_private_netns();
    for family in FAMILIES {
        dumped_socket_acknowledges_nothing_until_thawed_on(family);
    }
}

fn dumped_socket_acknowledges_nothing_until_thawed_on(family: Family) {
    let l = listener(family);
    let (mut a, mut p) = pair(family, &l, None);
    let state = baton_tcp_repair::dump(a.as_fd()).expect("dump");
    assert_eq!(state.send_queue.len(), 0);

    p.write_all(&pattern(7, 0, 1000))
        .expect("P writes while A is frozen");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        outq(p.as_fd()),
        1000,
        "a frozen socket must not acknowledge anything"
    );

    baton_tcp_repair::thaw(a.as_fd()).expect("thaw");
    assert_eq!(repair_flag(&a), 0, "thawed socket is out of repair mode");
    let mut got = vec![0u8; 1000];
    a.read_exact(&mut got)
        .expect("data sent while frozen arrives after thaw");
    assert_eq!(got, pattern(7, 0, 1000));
    wait_until("P's data acknowledged", || outq(p.as_fd()) == 0);

    a.write_all(b"still alive").expect("A writes after thaw");
    let mut back = [0u8; 11];
    p.read_exact(&mut back).expect("P reads");
    assert_eq!(&back, b"still alive");
}

#[test]
fn dump_refuses_pending_urgent_data_and_leaves_the_socket_live() {
    enter_private_netns();
    let l = listener(Family::V4);
    let (mut a, p) = pair(Family::V4, &l, None);
    // SAFETY: send one byte of urgent data on a connected socket.
    let rc = unsafe { libc::send(p.as_raw_fd(), b"!".as_ptr().cast(), 1, libc::MSG_OOB) };
    assert_eq!(rc, 1);
    wait_until("urgent byte acknowledged", || outq(p.as_fd()) == 0);

    let err = baton_tcp_repair::dump(a.as_fd()).expect_err("urgent data cannot be migrated");
    assert!(err.to_string().contains("urgent"), "{err}");
    assert_eq!(repair_flag(&a), 0, "rolled back out of repair mode");

    // The socket still hears: new data is acknowledged and readable.
    (&p).write_all(b"after").expect("P writes");
    wait_until("acknowledged after the failed dump", || {
        outq(p.as_fd()) == 0
    });
    a.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 5];
    a.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"after");
}

#[test]
fn dump_of_a_listening_socket_is_refused() {
    enter_private_netns();
    let l = listener(Family::V4);
    let err = baton_tcp_repair::dump(l.as_fd()).expect_err("LISTEN cannot be dumped");
    // A listener has no peer to be deaf to (getpeername: ENOTCONN).
    assert!(
        err.to_string().contains("ENOTCONN") || err.to_string().contains("LISTEN"),
        "{err}"
    );
    assert_eq!(repair_flag(&l), 0, "left out of repair mode");
}

/// The freeze is the TCP-MD5 key on this kernel, on every family (no fallback to the
/// filter); hearing again may be repeated, and it also ends a freeze by the filter (what
/// an older helper did).
#[test]
fn make_deaf_is_the_key_and_make_hearing_undoes_the_key_or_the_filter() {
    use baton_tcp_repair::{attach_deaf_filter, make_deaf, make_hearing, Deafness};
    enter_private_netns();
    for family in FAMILIES {
        let l = listener(family);
        let (mut a, p) = pair(family, &l, None);
        let mut sent = 0;
        for how in ["key", "filter"] {
            if how == "key" {
                assert_eq!(make_deaf(a.as_fd()).expect("deaf"), Deafness::Md5Key);
            } else {
                attach_deaf_filter(a.as_fd()).expect("filter");
            }
            (&p).write_all(&pattern(3, sent, 100)).expect("P writes");
            assert!(
                baton_testkit::tcp::holds_for(Duration::from_millis(300), || outq(p.as_fd())
                    == 100),
                "{family:?}, {how}: a deaf socket acknowledged"
            );
            make_hearing(a.as_fd()).expect("hear");
            make_hearing(a.as_fd()).expect("hear again: nothing to undo");
            let mut got = vec![0u8; 100];
            a.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            a.read_exact(&mut got).expect("P's retransmission arrives");
            assert_eq!(got, pattern(3, sent, 100), "{family:?}, {how}");
            sent += 100;
        }
    }
    // Not connected: nothing to be deaf to; hearing is trivially fine.
    let l = listener(Family::V4);
    assert!(make_deaf(l.as_fd()).is_err());
    make_hearing(l.as_fd()).expect("a listener hears");
}

#[test]
fn validate_checks_what_each_operation_expects() {
    use baton_tcp_repair::{validate_tcp_socket, Expect};
    enter_private_netns();
    let l = listener(Family::V6);
    let (a, _p) = pair(Family::V6, &l, None);
    validate_tcp_socket(a.as_fd(), Expect::Connected, None).expect("connected socket");
    assert!(validate_tcp_socket(a.as_fd(), Expect::Fresh, None).is_err());
    assert!(validate_tcp_socket(l.as_fd(), Expect::Connected, None).is_err());
    let cookie = baton_tcp_repair::netns_cookie(a.as_fd()).expect("cookie");
    validate_tcp_socket(a.as_fd(), Expect::Connected, Some(cookie)).expect("same netns");
    let err = validate_tcp_socket(a.as_fd(), Expect::Connected, Some(cookie ^ 1))
        .expect_err("other netns");
    assert!(err.to_string().contains("network namespace"), "{err}");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let err = validate_tcp_socket(udp.as_fd(), Expect::Connected, None).expect_err("udp");
    assert!(err.to_string().contains("SOCK_STREAM"), "{err}");
}
