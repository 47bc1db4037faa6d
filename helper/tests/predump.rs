//! Pre-dump and freeze check through the real helper binary (sandboxed, under its
//! seccomp filter, with its worker thread), driven by the client library, on real TCP
//! connections in a private network namespace: batches larger than one frame, some
//! connections changed between pre-dump and check, every restored connection carrying
//! every byte both ways; and bad input answered per socket or refused as a whole.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use baton_proto::repair::{
    FreezeCheck, PreDumped, ProgressMark, ProtocolErrorKind, Reply, Request, SocketResult,
};
use baton_proto::tcp::{SocketFamily, TcpConnState};
use baton_testkit::pattern::Pattern;
use baton_testkit::tcp;
use common::*;

/// Bytes the peer of connection `i` sent before the pre-dump (left unread by us): a
/// different length per connection, some none.
fn unread_len(i: usize) -> usize {
    (i * 37) % 1500
}

fn fresh_socket(family: SocketFamily) -> TcpStream {
    let domain = match family {
        SocketFamily::Inet => libc::AF_INET,
        SocketFamily::Inet6 => libc::AF_INET6,
    };
    TcpStream::from(raw_socket(domain, libc::SOCK_STREAM, 0).expect("socket"))
}

fn read_exactly(sock: &mut TcpStream, len: usize) -> Vec<u8> {
    sock.set_read_timeout(Some(STEP)).expect("timeout");
    let mut buf = vec![0u8; len];
    sock.read_exact(&mut buf).expect("read");
    buf
}

/// 300 connections (two batches, each split with the worker thread): pre-dump all,
/// change every third one (its peer sends one more byte), freeze-check all, close the
/// frozen originals, restore all, and check every connection's bytes both ways.
#[test]
fn pre_dumped_connections_migrate_with_every_byte() {
    const N: usize = 300;
    private_netns();
    baton_testkit::netns::raise_nofile(4 * N as u64 + 100).expect("raise RLIMIT_NOFILE");
    let pairs = tcp::many_pairs(IpAddr::V4(Ipv4Addr::LOCALHOST), N).expect("pairs");
    let (ours, mut peers): (Vec<TcpStream>, Vec<TcpStream>) = pairs.into_iter().unzip();
    for (i, peer) in peers.iter_mut().enumerate() {
        peer.write_all(&Pattern::new(i as u64).bytes(0, unread_len(i)))
            .expect("peer writes");
    }
    for (i, (s, peer)) in ours.iter().zip(&peers).enumerate() {
        assert!(
            tcp::wait_until(STEP, || tcp::inq(s).ok() == Some(unread_len(i) as u32)
                && tcp::outq(peer).ok() == Some(0)),
            "connection {i}: data received and acknowledged"
        );
    }

    let (mut client, child) = spawn_client();
    assert!(client.supports_pre_dump());
    let fds: Vec<BorrowedFd<'_>> = ours.iter().map(|s| s.as_fd()).collect();
    let pre: Vec<PreDumped> = client
        .pre_dump(&fds)
        .expect("pre-dump request")
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|e| panic!("pre-dump {i}: {e}"))
                .unwrap_or_else(|| panic!("pre-dump {i}: an idle connection moved"))
        })
        .collect();
    for (i, p) in pre.iter().enumerate() {
        assert_eq!(
            p.state.recv_queue,
            Pattern::new(i as u64).bytes(0, unread_len(i)),
            "connection {i}"
        );
        assert_eq!(p.mark.inq as usize, unread_len(i));
    }

    // Every third connection moves: its peer sends one more byte, which we receive and
    // acknowledge before the check.
    let changed = |i: usize| i % 3 == 0;
    for (i, peer) in peers.iter_mut().enumerate().filter(|(i, _)| changed(*i)) {
        peer.write_all(&Pattern::new(i as u64).bytes(unread_len(i) as u64, 1))
            .expect("peer writes one more byte");
    }
    for (i, (s, peer)) in ours.iter().zip(&peers).enumerate() {
        let want = unread_len(i) + usize::from(changed(i));
        assert!(
            tcp::wait_until(STEP, || tcp::inq(s).ok() == Some(want as u32)
                && tcp::outq(peer).ok() == Some(0)),
            "connection {i}: the extra byte received and acknowledged"
        );
    }

    let items: Vec<(BorrowedFd<'_>, ProgressMark)> =
        fds.iter().zip(&pre).map(|(fd, p)| (*fd, p.mark)).collect();
    let checks = client.freeze_check(&items).expect("freeze-check request");
    assert_eq!(checks.len(), N);
    let states: Vec<TcpConnState> = checks
        .into_iter()
        .zip(pre)
        .enumerate()
        .map(|(i, (check, pre))| {
            let check = check.unwrap_or_else(|e| panic!("freeze check {i}: {e}"));
            match (&check, changed(i)) {
                (FreezeCheck::Unchanged { .. }, false) | (FreezeCheck::Dumped(_), true) => {}
                (other, changed) => panic!("connection {i} (changed: {changed}): {other:?}"),
            }
            check.into_state(pre.state)
        })
        .collect();

    // Close the frozen originals (in repair mode: no FIN, no RST) and restore.
    drop(fds);
    drop(items);
    drop(ours);
    let fresh: Vec<TcpStream> = states.iter().map(|s| fresh_socket(s.family)).collect();
    let restore_items: Vec<(BorrowedFd<'_>, &TcpConnState)> =
        fresh.iter().map(|s| s.as_fd()).zip(&states).collect();
    let reports = client.restore(&restore_items).expect("restore request");
    for (i, report) in reports.iter().enumerate() {
        let report = report
            .as_ref()
            .unwrap_or_else(|e| panic!("restore {i}: {e}"));
        assert_eq!(report.send_queue_written, 0);
        assert!(!report.fin_pending);
    }
    drop(restore_items);

    // Every byte both ways: what was queued (plus the extra byte), then a new message
    // each way and an orderly close.
    for (i, (mut b, mut peer)) in fresh.into_iter().zip(peers).enumerate() {
        let queued = unread_len(i) + usize::from(changed(i));
        assert_eq!(
            read_exactly(&mut b, queued),
            Pattern::new(i as u64).bytes(0, queued),
            "connection {i}: the queued bytes"
        );
        let later = Pattern::new(i as u64).bytes(queued as u64, 100);
        peer.write_all(&later)
            .expect("peer writes after the migration");
        peer.shutdown(Shutdown::Write).expect("peer FIN");
        let mut rest = Vec::new();
        b.set_read_timeout(Some(STEP)).expect("timeout");
        b.read_to_end(&mut rest).expect("read to FIN");
        assert_eq!(rest, later, "connection {i}: bytes after the migration");
        let back = Pattern::new(!(i as u64)).bytes(0, 200);
        b.write_all(&back).expect("write back");
        b.shutdown(Shutdown::Write).expect("FIN back");
        let mut got = Vec::new();
        peer.set_read_timeout(Some(STEP)).expect("timeout");
        peer.read_to_end(&mut got).expect("peer reads to FIN");
        assert_eq!(got, back, "connection {i}: bytes back");
    }
    finish(client, child);
}

/// The per-socket answers of a raw request, or a panic naming what came instead.
fn pre_dump_raw(helper: &Helper, fds: &[BorrowedFd<'_>]) -> Vec<SocketResult<Option<PreDumped>>> {
    match request(&helper.stream, &Request::PreDump, fds) {
        Reply::PreDumped(results) => results,
        other => panic!("expected PreDumped, got {other:?}"),
    }
}

fn freeze_check_raw(
    helper: &Helper,
    fds: &[BorrowedFd<'_>],
    marks: Vec<ProgressMark>,
) -> Vec<SocketResult<FreezeCheck>> {
    match request(&helper.stream, &Request::FreezeCheck(marks), fds) {
        Reply::FreezeChecked(results) => results,
        other => panic!("expected FreezeChecked, got {other:?}"),
    }
}

#[test]
fn bad_sockets_fail_their_own_slot_with_a_clear_error() {
    private_netns();
    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    let (good, _good_peer) = tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    let (unix, _unix_peer) = UnixStream::pair().expect("unix pair");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("listen");
    let unconnected = raw_socket(libc::AF_INET, libc::SOCK_STREAM, 0).expect("socket");
    // A connection the peer reset: CLOSE.
    let (reset, reset_peer) = tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    nix::sys::socket::setsockopt(
        &reset_peer,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .expect("SO_LINGER 0");
    drop(reset_peer);
    assert!(tcp::wait_until(STEP, || tcp::state(&reset).ok()
        == Some(tcp::SocketState::Close)));

    let fds = [
        good.as_fd(),
        unix.as_fd(),
        listener.as_fd(),
        unconnected.as_fd(),
        reset.as_fd(),
    ];
    let what = ["good", "UNIX socket", "LISTEN", "unconnected", "reset"];
    let pre = pre_dump_raw(&helper, &fds);
    assert_eq!(pre.len(), fds.len());
    let mark = pre[0]
        .as_ref()
        .expect("the good socket pre-dumps")
        .as_ref()
        .expect("idle")
        .mark;
    for (i, result) in pre.iter().enumerate().skip(1) {
        let err = result.as_ref().expect_err(what[i]);
        assert!(err.step.starts_with("validate"), "{}: {err}", what[i]);
        eprintln!("pre-dump of {}: {err}", what[i]);
    }
    let checks = freeze_check_raw(&helper, &fds, vec![mark; fds.len()]);
    assert!(
        matches!(checks[0], Ok(FreezeCheck::Unchanged { .. })),
        "{checks:?}"
    );
    for (i, result) in checks.iter().enumerate().skip(1) {
        let err = result.as_ref().expect_err(what[i]);
        assert!(err.step.starts_with("validate"), "{}: {err}", what[i]);
    }
    // The good socket is frozen as after a dump: a thaw brings it back.
    match request(&helper.stream, &Request::Thaw, &[good.as_fd()]) {
        Reply::Thawed(results) => assert!(results[0].is_ok(), "{results:?}"),
        other => panic!("expected Thawed, got {other:?}"),
    }
    assert_still_serving(&helper.stream);
    finish_cleanly(helper);
}

#[test]
fn mark_count_other_than_socket_count_is_refused_as_a_whole() {
    private_netns();
    let helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    let (a, _pa) = tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    let mark = match &pre_dump_raw(&helper, &[a.as_fd()])[0] {
        Ok(Some(p)) => p.mark,
        other => panic!("pre-dump: {other:?}"),
    };
    for marks in [vec![], vec![mark, mark]] {
        let message = expect_refusal(
            request(&helper.stream, &Request::FreezeCheck(marks), &[a.as_fd()]),
            ProtocolErrorKind::FdCountMismatch,
        );
        assert!(message.contains("marks for 1 sockets"), "{message}");
    }
    // Nothing was done to the socket: it is live (not frozen, not in repair).
    assert_eq!(
        tcp::state(&a).expect("state"),
        tcp::SocketState::Established
    );
    let (mut a, mut pa) = (a, _pa);
    a.write_all(b"live").expect("write");
    let mut got = [0u8; 4];
    pa.set_read_timeout(Some(STEP)).expect("timeout");
    pa.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"live");
    assert_still_serving(&helper.stream);
    finish_cleanly(helper);
}

#[test]
fn a_version_1_session_refuses_the_version_2_requests() {
    private_netns();
    let helper = spawn_on_socketpair(&[]);
    hello_v1(&helper.stream);
    let (a, _pa) = tcp::pair(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("pair");
    let message = expect_refusal(
        request(&helper.stream, &Request::PreDump, &[a.as_fd()]),
        ProtocolErrorKind::Unsupported,
    );
    assert!(message.contains("version 2"), "{message}");
    let mark = ProgressMark {
        state: 1,
        segs_in: 0,
        segs_out: 0,
        inq: 0,
        outq: 0,
    };
    expect_refusal(
        request(
            &helper.stream,
            &Request::FreezeCheck(vec![mark]),
            &[a.as_fd()],
        ),
        ProtocolErrorKind::Unsupported,
    );
    assert_eq!(
        tcp::state(&a).expect("state"),
        tcp::SocketState::Established
    );
    assert_still_serving(&helper.stream);
    finish_cleanly(helper);
}
