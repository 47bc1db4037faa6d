//! Dump, thaw, restore and set-repair through the real helper binary (sandboxed, under
//! its seccomp filter), driven by the backend's client library, on real TCP connections
//! in a private network namespace. A system call missing from the allow-list shows up
//! here as a helper killed by SIGSYS.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};

use baton_proto::repair::RepairMode;
use baton_proto::tcp::{Endpoint, TcpConnState};
use baton_repair_ipc::RepairClient;
use baton_testkit::tcp;
use common::*;

fn read_exactly(sock: &mut TcpStream, len: usize) -> Vec<u8> {
    sock.set_read_timeout(Some(STEP)).expect("timeout");
    let mut buf = vec![0u8; len];
    sock.read_exact(&mut buf).expect("read");
    buf
}

fn dump_one(client: &mut RepairClient, sock: BorrowedFd<'_>) -> TcpConnState {
    let mut results = client.dump(&[sock]).expect("dump request");
    assert_eq!(results.len(), 1);
    results.remove(0).expect("dump of a live connection")
}

fn dump_and_thaw_keeps_the_connection(addr: IpAddr) {
    private_netns();
    let (mut near, mut far) = tcp::pair(addr).expect("pair");
    far.write_all(b"unread by near").expect("write");
    near.write_all(b"unread by far").expect("write");
    assert!(tcp::wait_until(STEP, || tcp::inq(&near).unwrap_or(0) == 14));

    let (mut client, child) = spawn_client();
    let state = dump_one(&mut client, near.as_fd());
    assert_eq!(state.recv_queue, b"unread by near");
    assert_eq!(
        state.local,
        Endpoint::from_socket_addr(near.local_addr().expect("addr"))
    );
    assert_eq!(
        state.peer,
        Endpoint::from_socket_addr(near.peer_addr().expect("addr"))
    );
    state.validate().expect("a dumped state validates");

    let thawed = client.thaw(&[near.as_fd()]).expect("thaw request");
    assert!(thawed[0].is_ok(), "{thawed:?}");

    assert_eq!(read_exactly(&mut near, 14), b"unread by near");
    near.write_all(b" and more").expect("write after thaw");
    assert_eq!(read_exactly(&mut far, 22), b"unread by far and more");
    finish(client, child);
}

#[test]
fn dump_and_thaw_through_the_helper_keeps_an_ipv4_connection() {
    dump_and_thaw_keeps_the_connection(IpAddr::V4(Ipv4Addr::LOCALHOST));
}

#[test]
fn dump_and_thaw_through_the_helper_keeps_an_ipv6_connection() {
    dump_and_thaw_keeps_the_connection(IpAddr::V6(Ipv6Addr::LOCALHOST));
}

fn restore_moves_the_connection(addr: IpAddr, domain: libc::c_int) {
    private_netns();
    let (near, mut far) = tcp::pair(addr).expect("pair");
    let mut near = near;
    far.write_all(b"A: far to near").expect("write");
    near.write_all(b"B: near to far, acked").expect("write");
    assert!(tcp::wait_until(STEP, || tcp::inq(&near).unwrap_or(0) == 14));
    // Data the peer never acknowledges stays in near's send queue.
    tcp::deafen(&far).expect("deafen far");
    near.write_all(b"C: unacked").expect("write");

    let (mut client, child) = spawn_client();
    let state = dump_one(&mut client, near.as_fd());
    assert_eq!(state.recv_queue, b"A: far to near");
    assert_eq!(state.send_queue, b"C: unacked");
    // Frozen and in repair mode: closing it sends nothing to the peer.
    drop(near);

    let fresh = raw_socket(domain, libc::SOCK_STREAM, 0).expect("fresh socket");
    let mut reports = client
        .restore(&[(fresh.as_fd(), &state)])
        .expect("restore request");
    let report = reports.remove(0).expect("restore into a fresh socket");
    let mut restored = TcpStream::from(fresh);
    let written = report.send_queue_written as usize;
    restored
        .write_all(&state.send_queue[written..])
        .expect("write the rest of the send queue");
    tcp::undeafen(&far).expect("undeafen far");

    assert_eq!(read_exactly(&mut restored, 14), b"A: far to near");
    assert_eq!(
        read_exactly(&mut far, 31),
        b"B: near to far, ackedC: unacked"
    );
    restored.write_all(b"D").expect("write");
    assert_eq!(read_exactly(&mut far, 1), b"D");
    far.write_all(b"E").expect("write");
    assert_eq!(read_exactly(&mut restored, 1), b"E");
    finish(client, child);
}

#[test]
fn restore_through_the_helper_moves_an_ipv4_connection_to_a_fresh_socket() {
    restore_moves_the_connection(IpAddr::V4(Ipv4Addr::LOCALHOST), libc::AF_INET);
}

#[test]
fn restore_through_the_helper_moves_an_ipv6_connection_to_a_fresh_socket() {
    restore_moves_the_connection(IpAddr::V6(Ipv6Addr::LOCALHOST), libc::AF_INET6);
}

#[test]
fn one_bad_socket_costs_only_its_own_slot() {
    private_netns();
    let (near, _far) = tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    let (pipe_read, _pipe_write) = nix::unistd::pipe().expect("pipe");
    let (mut client, child) = spawn_client();
    let results = client
        .dump(&[pipe_read.as_fd(), near.as_fd()])
        .expect("dump request");
    assert!(results[0].is_err(), "a pipe is not a TCP socket");
    assert!(results[1].is_ok(), "{:?}", results[1]);
    let thawed = client.thaw(&[near.as_fd()]).expect("thaw");
    assert!(thawed[0].is_ok(), "{thawed:?}");
    finish(client, child);
}

#[test]
fn set_repair_on_and_off_through_the_helper() {
    private_netns();
    let (mut near, mut far) = tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    let (mut client, child) = spawn_client();
    for mode in [RepairMode::On, RepairMode::Off] {
        let results = client
            .set_repair(&[near.as_fd()], mode)
            .expect("set repair");
        assert!(results[0].is_ok(), "{mode:?}: {results:?}");
    }
    near.write_all(b"still alive").expect("write");
    assert_eq!(read_exactly(&mut far, 11), b"still alive");
    finish(client, child);
}

#[test]
fn more_sockets_than_one_frame_holds_are_batched() {
    private_netns();
    baton_testkit::netns::raise_nofile(4096).expect("raise RLIMIT_NOFILE");
    let pairs = tcp::many_pairs(IpAddr::V4(Ipv4Addr::LOCALHOST), 300).expect("pairs");
    for (i, (_, far)) in pairs.iter().enumerate() {
        let mut far = far;
        far.write_all(&(i as u32).to_le_bytes()).expect("write");
    }
    let nears: Vec<BorrowedFd<'_>> = pairs.iter().map(|(near, _)| near.as_fd()).collect();
    assert!(tcp::wait_until(STEP, || nears
        .iter()
        .all(|s| tcp::inq(s).unwrap_or(0) == 4)));

    let (mut client, child) = spawn_client();
    let states = client.dump(&nears).expect("dump 300");
    assert_eq!(states.len(), 300);
    for (i, state) in states.iter().enumerate() {
        let state = state.as_ref().expect("dump");
        assert_eq!(
            state.recv_queue,
            (i as u32).to_le_bytes(),
            "results keep the order"
        );
    }
    let thawed = client.thaw(&nears).expect("thaw 300");
    assert!(thawed.iter().all(Result::is_ok));
    finish(client, child);
}

#[test]
fn megabytes_of_queued_data_cross_the_helper_intact() {
    private_netns();
    let (mut near, mut far) = tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    // Fill near's receive queue as far as the kernel lets us (a few MiB).
    far.set_nonblocking(true).expect("nonblocking");
    let pattern: Vec<u8> = (0..(16u32 << 20)).map(|i| (i % 253) as u8).collect();
    let mut sent = 0;
    let mut idle_rounds = 0;
    while sent < pattern.len() && idle_rounds < 50 {
        match far.write(&pattern[sent..]) {
            Ok(n) => {
                sent += n;
                idle_rounds = 0;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                idle_rounds += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    assert!(sent > 1 << 20, "only {sent} bytes queued");
    assert!(tcp::wait_until(STEP, || tcp::inq(&near).unwrap_or(0)
        as usize
        + tcp::outq(&far).unwrap_or(0) as usize
        == sent));
    let queued = tcp::inq(&near).expect("inq") as usize;

    let (mut client, child) = spawn_client();
    let state = dump_one(&mut client, near.as_fd());
    assert_eq!(state.recv_queue.len(), queued);
    assert!(
        state.recv_queue == pattern[..queued],
        "dumped receive queue is the data sent"
    );
    assert!(client.thaw(&[near.as_fd()]).expect("thaw")[0].is_ok());
    finish(client, child);

    far.set_nonblocking(false).expect("blocking");
    let received = read_exactly(&mut near, sent);
    assert!(received == pattern[..sent], "data intact after thaw");
}

#[test]
fn freeze_through_the_helper_stops_acks_and_an_unprivileged_detach_resumes() {
    private_netns();
    let (mut near, mut far) = tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    let (mut client, child) = spawn_client();
    let frozen = client.freeze(&[near.as_fd()]).expect("freeze request");
    assert!(frozen[0].is_ok(), "{frozen:?}");
    let mut repair: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt of an int into a local of the right size.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&near),
            libc::IPPROTO_TCP,
            19, // TCP_REPAIR
            (&mut repair as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!((rc, repair), (0, 0), "freeze must not enter repair mode");

    far.write_all(b"sent while frozen").expect("write");
    assert!(
        tcp::holds_for(std::time::Duration::from_millis(300), || tcp::outq(&far)
            .unwrap_or(0)
            == 17),
        "a frozen socket must not acknowledge anything"
    );
    // Hearing again needs no privilege: the receiving side of a handover does it.
    baton_tcp_repair::make_hearing(near.as_fd()).expect("hear again");
    assert_eq!(read_exactly(&mut near, 17), b"sent while frozen");
    finish(client, child);
}
