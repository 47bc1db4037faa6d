//! A hostile or broken backend: every malformed frame gets a typed refusal and the helper
//! keeps serving, except when the stream is out of sync (bad header: refusal, then exit
//! 1), when no version is common (refusal, then exit 1), or when the peer disappears in
//! the middle of a frame (exit 1: an incomplete request is an error, not a clean close).
//! The helper never panics.
//!
//! Tests that hand over real sockets go through `baton-tcp-repair`'s validation.

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use baton_proto::frame::MAX_BODY_LEN;
use baton_proto::repair::{caps, Hello, ProtocolErrorKind, Reply, Request};
use common::*;

/// Chosen behaviour: a frame cut short by the peer closing is an error (exit 1), logged
/// with how much arrived.
#[test]
fn truncated_frame_then_close_exits_1_without_panic() {
    let mut helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    send_raw(&helper.stream, &header_bytes(100, 0), &[0u8; 10], &[]);
    drop(helper.stream);
    let (status, stderr) = wait_exit(&mut helper.child);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("mid-frame"), "{stderr}");
}

fn bad_header_closes_with_bad_frame(header: &[u8]) {
    let mut helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    send_raw(&helper.stream, header, &[], &[]);
    expect_refusal(read_reply(&helper.stream), ProtocolErrorKind::BadFrame);
    let end = baton_repair_ipc::transport::recv_frame(helper.stream.as_fd(), deadline())
        .expect("clean close after BadFrame");
    assert!(end.is_none(), "nothing after the BadFrame refusal");
    let (status, stderr) = wait_exit(&mut helper.child);
    assert_eq!(status.code(), Some(1), "{stderr}");
}

#[test]
fn oversized_frame_header_is_refused_and_closes() {
    bad_header_closes_with_bad_frame(&header_bytes(MAX_BODY_LEN + 1, 0));
}

#[test]
fn wrong_magic_is_refused_and_closes() {
    let mut header = header_bytes(4, 0);
    header[..4].copy_from_slice(b"HTTP");
    bad_header_closes_with_bad_frame(&header);
}

#[test]
fn nonzero_reserved_field_is_refused_and_closes() {
    let mut header = header_bytes(4, 0);
    header[10] = 1;
    bad_header_closes_with_bad_frame(&header);
}

#[test]
fn too_many_fds_announced_is_refused_and_closes() {
    bad_header_closes_with_bad_frame(&header_bytes(4, 254));
}

#[test]
fn hello_without_a_common_version_is_refused_and_exits_1() {
    let mut helper = spawn_on_socketpair(&[]);
    let mut hello = Hello::ours(caps::ALL_V1);
    hello.min_version = 50;
    hello.max_version = 60;
    let reply = request(&helper.stream, &Request::Hello(hello), &[]);
    expect_refusal(reply, ProtocolErrorKind::IncompatibleVersion);
    let (status, stderr) = wait_exit(&mut helper.child);
    assert_eq!(status.code(), Some(1), "{stderr}");
}

#[test]
fn request_before_hello_is_out_of_order_and_hello_still_works() {
    let helper = spawn_on_socketpair(&[]);
    let reply = request(&helper.stream, &Request::Dump, &[]);
    expect_refusal(reply, ProtocolErrorKind::OutOfOrder);
    hello(&helper.stream);
    assert_still_serving(&helper.stream);
    let again = request(
        &helper.stream,
        &Request::Hello(Hello::ours(caps::ALL_V1)),
        &[],
    );
    expect_refusal(again, ProtocolErrorKind::OutOfOrder);
    assert_still_serving(&helper.stream);
    finish_cleanly(helper);
}

#[test]
fn fd_count_mismatch_is_refused_and_serving_continues() {
    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    let body = baton_proto::encode(&Request::Dump).expect("encode");
    let (one, _other) = std::os::unix::net::UnixStream::pair().expect("pair");
    // Header says 2, one is attached.
    send_raw(
        &helper.stream,
        &header_bytes(body.len() as u32, 2),
        &body,
        &[one.as_raw_fd()],
    );
    let message = expect_refusal(
        read_reply(&helper.stream),
        ProtocolErrorKind::FdCountMismatch,
    );
    assert!(message.contains('2') && message.contains('1'), "{message}");
    assert_still_serving(&helper.stream);
    finish_cleanly(helper);
}

#[test]
fn hello_with_descriptors_is_a_count_mismatch() {
    let helper = spawn_on_socketpair(&[]);
    let (one, _other) = std::os::unix::net::UnixStream::pair().expect("pair");
    let reply = request(
        &helper.stream,
        &Request::Hello(Hello::ours(caps::ALL_V1)),
        &[one.as_fd()],
    );
    expect_refusal(reply, ProtocolErrorKind::FdCountMismatch);
    hello(&helper.stream);
    finish_cleanly(helper);
}

#[test]
fn unknown_operation_tag_is_named_and_serving_continues() {
    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    let body = 99u32.to_le_bytes();
    send_raw(&helper.stream, &header_bytes(4, 0), &body, &[]);
    let message = expect_refusal(
        read_reply(&helper.stream),
        ProtocolErrorKind::UnknownOperation,
    );
    assert!(message.contains("99"), "{message}");
    assert_still_serving(&helper.stream);
    finish_cleanly(helper);
}

#[test]
fn undecodable_body_is_malformed_and_serving_continues() {
    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    // Tag 3 = Restore, then a vector length far beyond the bytes present.
    let mut body = 3u32.to_le_bytes().to_vec();
    body.extend_from_slice(&u64::MAX.to_le_bytes());
    send_raw(
        &helper.stream,
        &header_bytes(body.len() as u32, 0),
        &body,
        &[],
    );
    expect_refusal(read_reply(&helper.stream), ProtocolErrorKind::Malformed);
    // Empty body: not even a tag.
    send_raw(&helper.stream, &header_bytes(0, 0), &[], &[]);
    expect_refusal(read_reply(&helper.stream), ProtocolErrorKind::Malformed);
    // Trailing bytes after a valid Dump.
    let mut body = baton_proto::encode(&Request::Dump).expect("encode");
    body.push(0);
    send_raw(
        &helper.stream,
        &header_bytes(body.len() as u32, 0),
        &body,
        &[],
    );
    expect_refusal(read_reply(&helper.stream), ProtocolErrorKind::Malformed);
    assert_still_serving(&helper.stream);
    finish_cleanly(helper);
}

/// Dump one socket that is not an acceptable TCP connection: its slot fails, the helper
/// carries on.
fn dump_is_refused_per_socket(helper: &Helper, fd: std::os::fd::BorrowedFd<'_>, what: &str) {
    match request(&helper.stream, &Request::Dump, &[fd]) {
        Reply::Dumped(results) => {
            assert_eq!(results.len(), 1);
            let err = results[0].as_ref().expect_err(what);
            eprintln!("{what}: refused as expected: {err}");
        }
        other => panic!("{what}: expected Dumped, got {other:?}"),
    }
    assert_still_serving(&helper.stream);
}

#[test]
fn pipe_in_a_dump_fails_its_slot_only() {
    private_netns();
    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    let (read_end, _write_end) = nix::unistd::pipe().expect("pipe");
    dump_is_refused_per_socket(&helper, read_end.as_fd(), "pipe");
    finish_cleanly(helper);
}

#[test]
fn udp_socket_in_a_dump_fails_its_slot_only() {
    private_netns();
    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("udp");
    udp.connect(udp.local_addr().expect("addr"))
        .expect("connect");
    dump_is_refused_per_socket(&helper, udp.as_fd(), "UDP socket");
    finish_cleanly(helper);
}

#[test]
fn listening_tcp_socket_in_a_dump_fails_its_slot_only() {
    private_netns();
    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    dump_is_refused_per_socket(&helper, listener.as_fd(), "listening TCP socket");
    finish_cleanly(helper);
}

#[test]
fn mptcp_socket_in_a_dump_fails_its_slot_only() {
    private_netns();
    const IPPROTO_MPTCP: libc::c_int = 262;
    let mptcp = match raw_socket(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_MPTCP) {
        Ok(fd) => fd,
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EPROTONOSUPPORT), "{e}");
            eprintln!("NOTE: this kernel has no MPTCP; skipping the MPTCP case");
            return;
        }
    };
    // Connect it (MPTCP falls back to plain TCP underneath, the socket stays MPTCP).
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let target = nix::sys::socket::SockaddrIn::from(match listener.local_addr().expect("addr") {
        std::net::SocketAddr::V4(v4) => v4,
        other => panic!("unexpected {other}"),
    });
    nix::sys::socket::connect(mptcp.as_raw_fd(), &target).expect("connect MPTCP");
    let (_accepted, _) = listener.accept().expect("accept");

    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    dump_is_refused_per_socket(&helper, mptcp.as_fd(), "MPTCP socket");
    finish_cleanly(helper);
}

#[test]
fn socket_of_another_network_namespace_fails_its_slot_only() {
    // A connection made in this thread's namespace...
    private_netns();
    let (client, mut server) =
        baton_testkit::tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    server.write_all(b"x").expect("write");
    // ... handed to a helper whose connection lives in another namespace.
    private_netns();
    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    dump_is_refused_per_socket(&helper, client.as_fd(), "socket of another netns");
    finish_cleanly(helper);
}
