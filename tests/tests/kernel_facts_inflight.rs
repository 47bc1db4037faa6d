//! Kernel facts: bytes in flight across a restore — what a restored socket does with
//! data the source had sent but never saw acknowledged. They pin the order
//! `baton-tcp-repair` restores the send queue in (the sent part written in repair mode,
//! so it is marked sent; repair off *with* the window probe; the unsent tail as ordinary
//! data) and refute the order it replaced (reference addendum E25: the whole queue as
//! fresh data after repair off).
//!
//! Every test builds a loopback pair A–P in a private network namespace, freezes and
//! dumps A the way the helper does (deaf filter, then repair mode), closes A in repair
//! mode (silently) and rebuilds it from the dump in a fresh socket B. Two kinds of
//! in-flight data:
//! * "the peer has it": A is deaf while it writes, so P receives and acknowledges the
//!   bytes and A never sees the ACKs — the normal case in a migration, where the peer's
//!   ACKs go to the frozen source;
//! * "lost": P is deaf while A writes, and hears again once A is closed.
//!
//! The delays are printed (`--nocapture`); the tests assert mechanisms (what was
//! acknowledged, whether anything had to be retransmitted) and only generous time bounds.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use baton_testkit::pattern::{Pattern, Reader, Writer};
use baton_testkit::tcp::{self, SocketState};
use common::*;
use libc::c_int;

const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

/// A restored socket's congestion window, in segments (`tcp_init_cwnd`; reference E23).
const INITIAL_CWND: usize = 10;
/// A socket restored without an RTT estimate retransmits lost bytes after its tail-loss
/// probe (1 s) and, here, the 3 s fallback RTO (E23): about 4.2 s measured. Generous.
const RETRANSMIT_BOUND: Duration = Duration::from_secs(8);
/// Longer than the restored socket's tail-loss probe (1 s): a stall that survives it
/// does not end by itself.
const PAST_THE_LOSS_PROBE: Duration = Duration::from_millis(1500);

/// What a restore needs of A (its receive queue is empty in these tests).
struct Dump {
    local: SocketAddr,
    peer: SocketAddr,
    snd_una: u32,
    rcv_nxt: u32,
    /// Every unacknowledged byte, from snd_una.
    send_queue: Vec<u8>,
    /// How many bytes at the tail of `send_queue` were never transmitted.
    unsent: usize,
    /// Our FIN is queued, unacknowledged (FIN_WAIT1): it follows `send_queue`.
    fin: bool,
    window: Vec<u8>,
    mss_clamp: c_int,
    options: u8,
    wscale: u8,
    timestamp: u32,
}

impl Dump {
    /// Bytes sent but not acknowledged (as far as A knew).
    fn sent(&self) -> usize {
        self.send_queue.len() - self.unsent
    }
}

/// How the restore puts the send queue back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendQueue {
    /// baton's order: the sent part written with the send queue selected in repair mode
    /// (marked sent), repair off with the window probe, then the unsent tail.
    SentAsSent,
    /// The superseded E25 order: nothing in repair mode; repair off with the window
    /// probe, then the whole queue as fresh data.
    ResendAll,
}

/// A pair `(a, p)`: P (the accepted end) with `peer_rcvbuf` set on the listener (so the
/// accepted socket inherits it and its window scale fits), A with `a_sndbuf` and its
/// MSS clamped to `mss` before connecting. Both blocking.
fn connected(
    peer_rcvbuf: Option<c_int>,
    a_sndbuf: Option<c_int>,
    mss: Option<c_int>,
) -> (TcpStream, TcpStream) {
    let listener = tcp_socket(libc::AF_INET);
    if let Some(size) = peer_rcvbuf {
        setsockopt_int(&listener, libc::SOL_SOCKET, libc::SO_RCVBUF, size).expect("SO_RCVBUF");
    }
    bind(&listener, "127.0.0.1:0".parse().expect("addr")).expect("bind listener");
    listen(&listener).expect("listen");
    let listener = TcpListener::from(listener);
    listener.set_nonblocking(false).expect("blocking listener");
    let target = listener.local_addr().expect("listener address");

    let a = tcp_socket(libc::AF_INET);
    if let Some(size) = a_sndbuf {
        setsockopt_int(&a, libc::SOL_SOCKET, libc::SO_SNDBUF, size).expect("SO_SNDBUF");
    }
    if let Some(mss) = mss {
        setsockopt_int(&a, libc::IPPROTO_TCP, libc::TCP_MAXSEG, mss).expect("TCP_MAXSEG");
    }
    match connect(&a, target) {
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        other => other.expect("connect"),
    }
    let (p, _) = listener.accept().expect("accept");
    let a = TcpStream::from(a);
    wait_for("A established", || {
        tcp::state(&a).ok() == Some(SocketState::Established)
    });
    for s in [&a, &p] {
        s.set_nonblocking(false).expect("blocking");
        s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
        s.set_write_timeout(Some(DEADLINE)).expect("write timeout");
    }
    (a, p)
}

/// Stream `bytes` from A to P while P reads: the connection's congestion window grows.
fn warm_up(a: &TcpStream, p: &TcpStream, up: &mut Writer, up_reader: &mut Reader, bytes: u64) {
    let end = up.offset() + bytes;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            up_reader
                .read_until(&mut &*p, end, DEADLINE)
                .expect("P reads the warm-up")
        });
        up.write_until(&mut &*a, end, DEADLINE)
            .expect("A writes the warm-up");
    });
}

/// Write as much of the stream as A's send buffer takes without blocking.
fn write_nonblocking(a: &TcpStream, up: &mut Writer, max: u64) -> u64 {
    a.set_nonblocking(true).expect("non-blocking");
    let n = up.write_available(&mut &*a, max).expect("A writes");
    a.set_nonblocking(false).expect("blocking");
    n
}

/// Freeze A (deaf filter, then repair mode) and read what the restore needs.
fn freeze_and_dump(a: &TcpStream) -> Dump {
    let tcp_level = libc::IPPROTO_TCP;
    tcp::deafen(a).expect("deafen A");
    repair(a, REPAIR_ON).expect("TCP_REPAIR on");
    assert_eq!(
        tcp::inq(a).expect("SIOCINQ"),
        0,
        "A has no unread data here"
    );
    // SIOCOUTQ and SIOCOUTQNSD count an unacknowledged / unsent FIN (reference §3.1).
    let fin = tcp::state(a).ok() == Some(SocketState::FinWait1);
    let outq = tcp::outq(a).expect("SIOCOUTQ") as usize - usize::from(fin);
    let nsd = tcp::outq_nsd(a).expect("SIOCOUTQNSD") as usize;
    let unsent = nsd - usize::from(fin && nsd > 0);
    select_queue(a, SEND_QUEUE).expect("select SEND");
    let write_seq = queue_seq(a).expect("write_seq");
    let mut send_queue = vec![0u8; outq];
    if outq > 0 {
        assert_eq!(
            peek(a, &mut send_queue).expect("peek SEND"),
            outq,
            "A heard no ACK for these bytes, so no acknowledged head is left (E21)"
        );
    }
    select_queue(a, RECV_QUEUE).expect("select RECV");
    let rcv_nxt = queue_seq(a).expect("rcv_nxt");
    select_queue(a, NO_QUEUE).expect("select none");
    let info = tcp_info(a);
    Dump {
        local: a.local_addr().expect("A's address"),
        peer: a.peer_addr().expect("P's address"),
        snd_una: write_seq.wrapping_sub(outq as u32 + u32::from(fin)),
        rcv_nxt,
        send_queue,
        unsent,
        fin,
        window: getsockopt_bytes(a, tcp_level, TCP_REPAIR_WINDOW, 20).expect("window"),
        mss_clamp: getsockopt_int(a, tcp_level, libc::TCP_MAXSEG).expect("TCP_MAXSEG"),
        options: info.tcpi_options,
        wscale: info.tcpi_snd_rcv_wscale,
        timestamp: timestamp(a).expect("TCP_TIMESTAMP"),
    }
}

/// send() in repair mode, all of `data` (the forced send buffer has room).
fn send_in_repair(fd: &OwnedFd, data: &[u8]) {
    let mut off = 0;
    while off < data.len() {
        // SAFETY: send() reads at most `data.len() - off` bytes from a live slice.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data[off..].as_ptr().cast(),
                data.len() - off,
                libc::MSG_DONTWAIT,
            )
        };
        assert!(
            n > 0,
            "send in repair at {off} of {}: {}",
            data.len(),
            std::io::Error::last_os_error()
        );
        off += n as usize;
    }
}

/// Rebuild A from `d` in a fresh socket (reference §2.4, with the send queue put back
/// the way `how` says). Returns B, blocking, out of repair mode, everything written.
fn restore(d: &Dump, how: SendQueue) -> TcpStream {
    let tcp_level = libc::IPPROTO_TCP;
    let b = tcp_socket(libc::AF_INET);
    setsockopt_int(&b, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 16 << 20).expect("sndbuf");
    if d.mss_clamp <= 32767 {
        setsockopt_int(&b, tcp_level, libc::TCP_MAXSEG, d.mss_clamp).expect("TCP_MAXSEG");
    }
    repair(&b, REPAIR_ON).expect("TCP_REPAIR on");
    bind(&b, d.local).expect("repair bind");
    select_queue(&b, RECV_QUEUE).expect("select RECV");
    set_queue_seq(&b, d.rcv_nxt).expect("rcv_nxt");
    select_queue(&b, SEND_QUEUE).expect("select SEND");
    set_queue_seq(&b, d.snd_una).expect("send queue start");
    connect(&b, d.peer).expect("repair connect");

    let mut opts: Vec<[u32; 2]> = vec![[TCPOPT_MSS, d.mss_clamp as u32]];
    if d.options & TCPI_OPT_WSCALE != 0 {
        let (snd, rcv) = (u32::from(d.wscale & 0x0f), u32::from(d.wscale >> 4));
        opts.push([TCPOPT_WINDOW, snd | rcv << 16]);
    }
    if d.options & TCPI_OPT_SACK != 0 {
        opts.push([TCPOPT_SACK_PERM, 0]);
    }
    if d.options & TCPI_OPT_TIMESTAMPS != 0 {
        opts.push([TCPOPT_TIMESTAMP, 0]);
    }
    let raw: Vec<u8> = opts
        .iter()
        .flatten()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    setsockopt_bytes(&b, tcp_level, TCP_REPAIR_OPTIONS, &raw).expect("TCP_REPAIR_OPTIONS");
    if d.options & TCPI_OPT_TIMESTAMPS != 0 {
        // Without it the peer's PAWS check drops everything B sends (E25).
        setsockopt_bytes(&b, tcp_level, TCP_TIMESTAMP, &d.timestamp.to_ne_bytes())
            .expect("TCP_TIMESTAMP");
    }

    let (in_repair, after_off) = match how {
        SendQueue::SentAsSent => d.send_queue.split_at(d.sent()),
        SendQueue::ResendAll => (&[][..], &d.send_queue[..]),
    };
    let fin_as_sent = how == SendQueue::SentAsSent && d.fin && d.unsent == 0;
    if !in_repair.is_empty() || fin_as_sent {
        select_queue(&b, SEND_QUEUE).expect("select SEND");
        send_in_repair(&b, in_repair);
        if fin_as_sent {
            // SAFETY: shutdown() takes only integers.
            let rc = unsafe { libc::shutdown(b.as_raw_fd(), libc::SHUT_WR) };
            cvt(rc).expect("shutdown(SHUT_WR) in repair mode");
        }
        assert_eq!(
            tcp::outq_nsd(&b).expect("SIOCOUTQNSD"),
            0,
            "what was written in repair mode is marked sent, all of it"
        );
    }
    setsockopt_bytes(&b, tcp_level, TCP_REPAIR_WINDOW, &d.window).expect("window");
    select_queue(&b, NO_QUEUE).expect("select none");
    repair(&b, REPAIR_OFF).expect("TCP_REPAIR off, with the window probe");
    let b = TcpStream::from(b);
    b.set_nonblocking(true).expect("non-blocking");
    (&b).write_all(after_off)
        .expect("the rest fits the forced send buffer");
    if d.fin && !fin_as_sent {
        b.shutdown(std::net::Shutdown::Write)
            .expect("our FIN after the data");
    }
    b.set_nonblocking(false).expect("blocking");
    b.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    b.set_write_timeout(Some(DEADLINE)).expect("write timeout");
    b
}

fn total_retrans(s: &TcpStream) -> u32 {
    tcp_info(s).tcpi_total_retrans
}

/// A writes with A deaf: P receives (and acknowledges) everything A transmits, A hears
/// none of it. Waits until P holds every byte A sent, then freezes and dumps A.
fn dump_with_acks_lost(a: &TcpStream, p: &TcpStream, up: &mut Writer, bytes: u64) -> Dump {
    let before = up.offset();
    // P may hold unread bytes from before: count only the new ones.
    let unread_before = tcp::inq(p).expect("P's SIOCINQ");
    tcp::deafen(a).expect("deafen A");
    write_nonblocking(a, up, bytes);
    let sent = || tcp::outq(a).unwrap_or(0) - tcp::outq_nsd(a).unwrap_or(0);
    let holds_all = tcp::wait_until(DEADLINE, || {
        tcp::inq(p).ok() == Some(unread_before + sent())
    });
    assert!(
        holds_all,
        "P holds {:?} B unread, A transmitted {} B ({unread_before} B were unread before)",
        tcp::inq(p),
        sent()
    );
    let d = freeze_and_dump(a);
    assert_eq!(
        d.send_queue.len() as u64,
        up.offset() - before,
        "A heard no ACK for anything written while deaf"
    );
    d
}

/// A connection A→P with more than one initial congestion window (plus a segment) of
/// A's data in flight when A is frozen and dumped; P has all of it, A heard no ACK for
/// it. One segment beyond the initial window is enough for the E25 stall: a resend
/// covers at most the initial window, so P's acknowledgement lies beyond the restored
/// SND.NXT. How much is in flight depends on the congestion window the warm-up reached,
/// which varies with machine load, hence a few attempts.
fn dump_beyond_initial_window(
    seed: u64,
    mss: c_int,
) -> (TcpStream, TcpStream, Writer, Reader, Dump) {
    let initial_window = INITIAL_CWND * mss as usize;
    let mut in_flight = Vec::new();
    for _ in 0..5 {
        let (a, p) = connected(None, Some(4 << 20), Some(mss));
        let up = Pattern::new(seed);
        let (mut w, mut r) = (Writer::new(up), Reader::new(up));
        warm_up(&a, &p, &mut w, &mut r, 4 << 20);
        let d = dump_with_acks_lost(&a, &p, &mut w, 300_000);
        if d.sent() > initial_window + mss as usize {
            return (a, p, w, r, d);
        }
        in_flight.push(d.sent());
    }
    panic!(
        "precondition: more than one initial window ({initial_window} B) in flight; got \
         {in_flight:?} B in five attempts"
    );
}

/// Both directions carry on after the restore: B→P `bytes` more, P→B `bytes`.
fn both_ways_continue(
    b: &TcpStream,
    p: &TcpStream,
    up: &mut Writer,
    up_reader: &mut Reader,
    bytes: u64,
) {
    warm_up(b, p, up, up_reader, bytes);
    let down = Pattern::new(0xD0);
    let (mut w, mut r) = (Writer::new(down), Reader::new(down));
    w.write_until(&mut &*p, bytes, DEADLINE).expect("P writes");
    r.read_until(&mut &*b, bytes, DEADLINE)
        .expect("B reads P's data intact");
}

/// The peer has the in-flight bytes, its ACKs were lost, its window is open: restored
/// as sent, the bytes are acknowledged without any retransmission (by the answer to the
/// window probe and the ACKs of the tail, all within SND.NXT), and the stream carries on.
#[test]
fn in_flight_bytes_the_peer_has_are_acknowledged_at_once_window_open() {
    private_netns();
    let (a, p) = connected(None, Some(1 << 20), None);
    let up = Pattern::new(0xA1);
    let (mut w, mut r) = (Writer::new(up), Reader::new(up));
    let d = dump_with_acks_lost(&a, &p, &mut w, 400_000);
    assert!(
        d.sent() > 0 && d.unsent > 0,
        "precondition: both sent ({}) and unsent ({}) bytes",
        d.sent(),
        d.unsent
    );
    drop(a);

    let b = restore(&d, SendQueue::SentAsSent);
    let t0 = Instant::now();
    wait_for("the sent part acknowledged", || {
        tcp::outq(&b).is_ok_and(|q| (q as usize) <= d.unsent)
    });
    let acked = t0.elapsed();
    let retrans = total_retrans(&b);
    r.read_until(&mut &p, w.offset(), DEADLINE)
        .expect("P reads everything, the tail intact");
    println!(
        "window open: {} B in flight (the peer had them) acknowledged {acked:?} after \
         repair off, {} B unsent delivered after {:?}; retransmissions {retrans}",
        d.sent(),
        d.unsent,
        t0.elapsed()
    );
    assert_eq!(retrans, 0, "acknowledged without a retransmission");
    both_ways_continue(&b, &p, &mut w, &mut r, 200_000);
}

/// The peer has the in-flight bytes, its ACKs were lost, and its window is closed (it
/// stopped reading; its buffer is full): the answer to the window probe alone
/// acknowledges them (nothing else can be sent), the tail waits for the window, and
/// once the peer reads again everything arrives.
#[test]
fn in_flight_bytes_the_peer_has_are_acknowledged_at_once_window_closed() {
    private_netns();
    let (a, p) = connected(Some(16 << 10), Some(1 << 20), None);
    let up = Pattern::new(0xA2);
    let (mut w, mut r) = (Writer::new(up), Reader::new(up));
    let d = dump_with_acks_lost(&a, &p, &mut w, 400_000);
    assert!(
        d.sent() > 0 && d.unsent > 0,
        "precondition: both sent ({}) and unsent ({}) bytes",
        d.sent(),
        d.unsent
    );
    drop(a);

    let b = restore(&d, SendQueue::SentAsSent);
    let t0 = Instant::now();
    wait_for("the sent part acknowledged", || {
        tcp::outq(&b).is_ok_and(|q| (q as usize) <= d.unsent)
    });
    let acked = t0.elapsed();
    let retrans = total_retrans(&b);
    let stuck = tcp::holds_for(QUIET, || tcp::outq_nsd(&b).is_ok_and(|n| n > 0));
    println!(
        "window closed: {} B in flight (the peer had them) acknowledged {acked:?} after \
         repair off; retransmissions {retrans}; tail of {} B held back by the window: {stuck}",
        d.sent(),
        d.unsent,
    );
    assert_eq!(retrans, 0, "acknowledged without a retransmission");
    assert!(
        stuck,
        "precondition: the peer's window is closed (B sent its tail)"
    );

    let t1 = Instant::now();
    r.read_until(&mut &p, w.offset(), DEADLINE)
        .expect("P reads everything once it reads again");
    println!(
        "window closed: the peer read all {} B within {:?} of reading again",
        w.offset(),
        t1.elapsed()
    );
    both_ways_continue(&b, &p, &mut w, &mut r, 200_000);
}

/// Why E25 was abandoned. More than one initial congestion window was in flight and the
/// peer has it all; restored E25-style (the whole queue as fresh data after repair off)
/// B's SND.NXT starts at SND.UNA and advances one initial window, every answer of the
/// peer acknowledges its RCV.NXT, beyond B's SND.NXT, and Linux discards such an "ACK of
/// unsent data" (`tcp_ack`) together with any data the segment carries. Nothing is ever
/// acknowledged, the congestion window never opens: the connection stalls for good —
/// past the tail-loss probe, and the peer's data is dropped too.
#[test]
fn resending_bytes_the_peer_has_stalls_on_ack_of_unsent_data() {
    private_netns();
    const MSS: c_int = 1000;
    let (a, p, _w, _r, d) = dump_beyond_initial_window(0xA3, MSS);
    drop(a);

    let b = restore(&d, SendQueue::ResendAll);
    let unacked = d.send_queue.len() as u32;
    (&p).write_all(b"late").expect("P writes");
    let stalled = tcp::holds_for(PAST_THE_LOSS_PROBE, || {
        tcp::outq(&b).ok() == Some(unacked) && tcp::inq(&b).ok() == Some(0)
    });
    let info = tcp_info(&b);
    println!(
        "E25 resend: {} B in flight; after {PAST_THE_LOSS_PROBE:?} SIOCOUTQ {:?} of \
         {unacked}, SIOCINQ {:?}, cwnd {}, retransmissions {}",
        d.sent(),
        tcp::outq(&b),
        tcp::inq(&b),
        info.tcpi_snd_cwnd,
        info.tcpi_total_retrans
    );
    assert!(
        stalled,
        "an ACK beyond SND.NXT was accepted: SIOCOUTQ {:?} (stalled at {unacked}), \
         SIOCINQ {:?}",
        tcp::outq(&b),
        tcp::inq(&b)
    );
}

/// The same in-flight bytes the E25 resend stalls on, restored as sent: acknowledged at
/// once, without a retransmission, and the stream carries on.
#[test]
fn restoring_more_than_an_initial_window_as_sent_does_not_stall() {
    private_netns();
    const MSS: c_int = 1000;
    let (a, p, mut w, mut r, d) = dump_beyond_initial_window(0xA4, MSS);
    let initial_window = INITIAL_CWND * MSS as usize;
    drop(a);

    let b = restore(&d, SendQueue::SentAsSent);
    let t0 = Instant::now();
    wait_for("the sent part acknowledged", || {
        tcp::outq(&b).is_ok_and(|q| (q as usize) <= d.unsent)
    });
    let acked = t0.elapsed();
    let retrans = total_retrans(&b);
    println!(
        "as sent: {} B in flight ({} initial windows) acknowledged {acked:?} after repair \
         off; retransmissions {retrans}",
        d.sent(),
        d.sent() / initial_window
    );
    assert_eq!(retrans, 0, "acknowledged without a retransmission");
    r.read_until(&mut &p, w.offset(), DEADLINE)
        .expect("P reads everything");
    both_ways_continue(&b, &p, &mut w, &mut r, 200_000);
}

/// In-flight bytes the peer really lost: restored as sent, B has no RTT estimate, so
/// they go out again only when a retransmission timer fires (tail-loss probe, RTO).
/// They arrive intact, by a retransmission, within a generous bound.
#[test]
fn in_flight_bytes_the_peer_lost_arrive_after_a_retransmission() {
    private_netns();
    let (a, p) = connected(None, Some(1 << 20), None);
    let up = Pattern::new(0xA5);
    let (mut w, mut r) = (Writer::new(up), Reader::new(up));
    tcp::deafen(&p).expect("deafen P");
    // P's whole initial window (64 KiB) in flight: two segments with the timestamp
    // option, and a loss probe resends only the last one, so the hole before it waits
    // for the RTO — the slow case.
    write_nonblocking(&a, &mut w, 400_000);
    wait_for("A to transmit what the window allows", || {
        tcp::outq(&a).unwrap_or(0) - tcp::outq_nsd(&a).unwrap_or(0) >= 65_000
    });
    let d = freeze_and_dump(&a);
    drop(a);
    tcp::undeafen(&p).expect("P hears again");

    let b = restore(&d, SendQueue::SentAsSent);
    let t0 = Instant::now();
    r.read_until(&mut &p, w.offset(), RETRANSMIT_BOUND)
        .expect("P receives the lost bytes intact");
    let delivered = t0.elapsed();
    let retrans = total_retrans(&b);
    println!(
        "lost: {} B in flight (the peer lost them) and {} B unsent delivered \
         {delivered:?} after repair off; retransmissions {retrans}",
        d.sent(),
        d.unsent
    );
    assert!(retrans > 0, "delivered by a retransmission");
    both_ways_continue(&b, &p, &mut w, &mut r, 200_000);
}

/// Our FIN the peer already has, with the data before it (ACKs lost): restored as sent
/// (shutdown(SHUT_WR) in repair mode with the send queue selected, E8), B is in
/// FIN_WAIT1 with SND.NXT past the FIN, so the peer's next segment — which acknowledges
/// the FIN — is accepted at once: B reads the peer's data and reaches FIN_WAIT2 without
/// a retransmission. (Repair off sends no window probe outside ESTABLISHED, so it is
/// the peer's data that brings the acknowledgement here.)
#[test]
fn our_fin_the_peer_has_restored_as_sent_keeps_the_peers_data_flowing() {
    private_netns();
    let (a, p) = connected(None, Some(1 << 20), None);
    let up = Pattern::new(0xA6);
    let (mut w, mut r) = (Writer::new(up), Reader::new(up));
    tcp::deafen(&a).expect("deafen A");
    write_nonblocking(&a, &mut w, 20_000);
    a.shutdown(std::net::Shutdown::Write).expect("A's FIN");
    wait_for("P to hold A's data and FIN", || {
        tcp::inq(&p).ok() == Some(20_000) && tcp::state(&p).ok() == Some(SocketState::CloseWait)
    });
    let d = freeze_and_dump(&a);
    assert!(d.fin, "A is in FIN_WAIT1");
    assert_eq!(d.unsent, 0, "precondition: data and FIN transmitted");
    drop(a);

    let b = restore(&d, SendQueue::SentAsSent);
    assert_eq!(
        tcp::state(&b).ok(),
        Some(SocketState::FinWait1),
        "FIN restored as sent"
    );
    let t0 = Instant::now();
    let down = Pattern::new(0xD1);
    let (mut dw, mut dr) = (Writer::new(down), Reader::new(down));
    dw.write_until(&mut &p, 10_000, DEADLINE).expect("P writes");
    dr.read_until(&mut &b, 10_000, DEADLINE)
        .expect("B reads P's data intact");
    wait_for("FIN_WAIT2", || {
        tcp::state(&b).ok() == Some(SocketState::FinWait2)
    });
    let retrans = total_retrans(&b);
    println!(
        "FIN as sent: the peer's data read and FIN_WAIT2 reached {:?} after repair off; \
         retransmissions {retrans}",
        t0.elapsed()
    );
    assert_eq!(retrans, 0, "acknowledged by the peer's data, not a timer");
    r.read_until(&mut &p, w.offset(), DEADLINE)
        .expect("P reads A's data");
    p.shutdown(std::net::Shutdown::Write).expect("P's FIN");
    wait_for("B sees P's FIN", || {
        matches!(
            tcp::state(&b),
            Ok(SocketState::TimeWait) | Ok(SocketState::Close)
        )
    });
}

/// Why the dumper leaves the send queue selected while a socket is frozen. A frozen
/// socket (deaf filter, repair mode) still runs its timers. With no queue selected, its
/// tail-loss probe transmits *new* data when the window allows, and the peer takes it:
/// bytes beyond the dumped SND.NXT, so a socket restored from the dump would stall as in
/// `resending_bytes_the_peer_has_stalls_on_ack_of_unsent_data`. With the send queue
/// selected, the same probe only marks data sent (SIOCOUTQNSD drops) and nothing
/// reaches the peer.
#[test]
fn a_frozen_socket_sends_new_data_on_its_loss_probe_unless_the_send_queue_is_selected() {
    private_netns();
    for send_selected in [false, true] {
        // The loss probe fires a few ms after the last transmission; freezing must come
        // first. A trial where it did not (A had sent more than its initial window) is
        // repeated.
        let mut trials = 0;
        let (a, p, nsd_at_freeze, inq_at_freeze) = loop {
            trials += 1;
            assert!(trials <= 5, "could not freeze A before its loss probe");
            // Small segments: the initial congestion window limits A, not P's window,
            // so unsent data remains that a loss probe may send.
            let (a, p) = connected(None, Some(1 << 20), Some(1000));
            let mut w = Writer::new(Pattern::new(0xA7));
            tcp::deafen(&a).expect("deafen A");
            write_nonblocking(&a, &mut w, 100_000);
            repair(&a, REPAIR_ON).expect("TCP_REPAIR on");
            if send_selected {
                select_queue(&a, SEND_QUEUE).expect("select SEND");
            }
            let outq = tcp::outq(&a).expect("SIOCOUTQ");
            let nsd = tcp::outq_nsd(&a).expect("SIOCOUTQNSD");
            let initial_window = INITIAL_CWND as u32 * tcp_info(&a).tcpi_snd_mss;
            if outq - nsd == initial_window {
                wait_for("P to hold A's initial window", || {
                    tcp::inq(&p).ok() == Some(initial_window)
                });
                break (a, p, nsd, initial_window);
            }
        };
        if send_selected {
            wait_for("the loss probe to mark data sent", || {
                tcp::outq_nsd(&a).is_ok_and(|n| n < nsd_at_freeze)
            });
            assert!(
                tcp::holds_for(PAST_THE_LOSS_PROBE, || tcp::inq(&p).ok()
                    == Some(inq_at_freeze)),
                "send queue selected: P received {:?} B, {inq_at_freeze} at the freeze",
                tcp::inq(&p)
            );
        } else {
            wait_for("new data from the frozen socket to reach P", || {
                tcp::inq(&p).is_ok_and(|n| n > inq_at_freeze)
            });
        }
        println!(
            "frozen, send queue selected {send_selected}: SIOCOUTQNSD {nsd_at_freeze} -> {:?}, \
             P holds {inq_at_freeze} -> {:?} B",
            tcp::outq_nsd(&a),
            tcp::inq(&p)
        );
    }
}
