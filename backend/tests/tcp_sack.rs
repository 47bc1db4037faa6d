//! SACK towards the guest (RFC 2018), with a hand-made guest: raw segments built with
//! etherparse, so the test decides exactly which of baton's segments the guest "lost"
//! and sees every segment baton sends. SACK-permitted is negotiated iff the guest offers
//! it (its SYN; or its SYN-ACK to baton's SYN on a `-t` forward, which always offers
//! it); with SACK, a hole is retransmitted alone, on duplicate ACKs and on timeout;
//! without, SACK blocks are ignored and everything from the hole on is resent.
//!
//! The same raw guest also pins a window edge case: a window baton closed because the
//! host did not read is reopened by baton, without waiting for the guest to probe it.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use baton_vu_harness::NetFrontend;
use etherparse::{PacketBuilderStep, TcpHeader, TcpOptionElement};

mod common;
use common::Baton;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The guest's MSS: baton's data comes in segments of this size.
const MSS: u16 = 1000;
/// Segments the host sends in one write; the guest "loses" the second.
const SEGMENTS: u32 = 4;
/// The guest's window (no window scaling).
const WINDOW: u16 = 65535;

/// A TCP segment baton sent to the guest.
#[derive(Debug, Clone)]
struct Seen {
    seq: u32,
    ack: u32,
    syn: bool,
    ack_flag: bool,
    fin: bool,
    sack_permitted: bool,
    window: u16,
    payload: Vec<u8>,
}

/// The next segment to guest port `port` within `timeout` (other frames skipped).
fn next_segment(dev: &mut NetFrontend, port: u16, timeout: Duration) -> Option<Seen> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let Some(frame) = dev
            .recv_frame(left.min(Duration::from_millis(50)))
            .expect("receive")
        else {
            continue;
        };
        let Ok(packet) = etherparse::SlicedPacket::from_ethernet(&frame) else {
            continue;
        };
        let Some(etherparse::TransportSlice::Tcp(tcp)) = packet.transport else {
            continue;
        };
        if tcp.destination_port() != port {
            continue;
        }
        let sack_permitted = tcp
            .options_iterator()
            .any(|o| matches!(o, Ok(TcpOptionElement::SelectiveAcknowledgementPermitted)));
        return Some(Seen {
            seq: tcp.sequence_number(),
            ack: tcp.acknowledgment_number(),
            syn: tcp.syn(),
            ack_flag: tcp.ack(),
            fin: tcp.fin(),
            sack_permitted,
            window: tcp.window_size(),
            payload: tcp.payload().to_vec(),
        });
    }
}

fn expect_segment(dev: &mut NetFrontend, port: u16, what: &str, baton: &Baton) -> Seen {
    next_segment(dev, port, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no {what} to guest port {port}; log:\n{}", baton.log()))
}

/// One guest segment from `port` to the gateway's `remote_port`.
fn segment(
    port: u16,
    remote_port: u16,
    seq: u32,
    build: impl FnOnce(PacketBuilderStep<TcpHeader>) -> PacketBuilderStep<TcpHeader>,
    options: &[TcpOptionElement],
) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
        .ipv4(GUEST_V4.octets(), GW_V4.octets(), 64)
        .tcp(port, remote_port, seq, WINDOW);
    let builder = build(builder).options(options).expect("options fit");
    let mut frame = Vec::new();
    builder.write(&mut frame, &[]).expect("build");
    frame
}

/// The options of the guest's SYN or SYN-ACK.
fn syn_options(sack: bool) -> Vec<TcpOptionElement> {
    let mut options = vec![TcpOptionElement::MaximumSegmentSize(MSS)];
    if sack {
        options.extend([
            TcpOptionElement::Noop,
            TcpOptionElement::Noop,
            TcpOptionElement::SelectiveAcknowledgementPermitted,
        ]);
    }
    options
}

/// The byte at offset `i` of what the host sends.
fn pattern(i: u32) -> u8 {
    (i % 251) as u8
}

/// An established connection as the raw guest sees it.
struct RawConn {
    port: u16,
    remote_port: u16,
    /// The guest's next sequence number.
    snd_nxt: u32,
    /// baton's first data byte.
    base: u32,
    host: TcpStream,
}

/// The guest connects out to `listener`; returns the connection and whether baton's
/// SYN-ACK offered SACK.
fn connect_out(
    dev: &mut NetFrontend,
    baton: &Baton,
    listener: &TcpListener,
    port: u16,
    offer_sack: bool,
) -> (RawConn, bool) {
    let remote_port = listener.local_addr().expect("addr").port();
    let isn = 7000u32;
    dev.send_frame(&segment(
        port,
        remote_port,
        isn,
        |b| b.syn(),
        &syn_options(offer_sack),
    ))
    .expect("SYN");
    let syn_ack = expect_segment(dev, port, "SYN-ACK", baton);
    assert!(
        syn_ack.syn && syn_ack.ack_flag && syn_ack.ack == isn + 1,
        "{syn_ack:?}"
    );
    let base = syn_ack.seq.wrapping_add(1);
    dev.send_frame(&segment(port, remote_port, isn + 1, |b| b.ack(base), &[]))
        .expect("ACK");
    let (host, _) = listener.accept().expect("accept");
    let conn = RawConn {
        port,
        remote_port,
        snd_nxt: isn + 1,
        base,
        host,
    };
    (conn, syn_ack.sack_permitted)
}

/// A host peer connects to the `-t` forward on `forward_port`; the guest answers
/// baton's SYN (checked to offer SACK) with a SYN-ACK offering SACK or not.
fn connect_in(
    dev: &mut NetFrontend,
    baton: &Baton,
    forward_port: u16,
    offer_sack: bool,
) -> RawConn {
    let host = TcpStream::connect((Ipv4Addr::LOCALHOST, forward_port)).expect("connect");
    let syn = expect_segment(dev, forward_port, "SYN", baton);
    assert!(syn.syn && !syn.ack_flag, "{syn:?}");
    assert!(syn.sack_permitted, "baton's SYN offers SACK");
    let remote_port = host.local_addr().expect("addr").port();
    let isn = 9000u32;
    let base = syn.seq.wrapping_add(1);
    dev.send_frame(&segment(
        forward_port,
        remote_port,
        isn,
        |b| b.syn().ack(base),
        &syn_options(offer_sack),
    ))
    .expect("SYN-ACK");
    let ack = expect_segment(dev, forward_port, "ACK of the SYN-ACK", baton);
    assert_eq!(ack.ack, isn + 1);
    RawConn {
        port: forward_port,
        remote_port,
        snd_nxt: isn + 1,
        base,
        host,
    }
}

impl RawConn {
    fn ack(&self, dev: &mut NetFrontend, ack: u32, sack: Option<(u32, u32)>) {
        let options: Vec<TcpOptionElement> = sack
            .map(|(l, r)| {
                vec![
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                    TcpOptionElement::SelectiveAcknowledgement((l, r), [None, None, None]),
                ]
            })
            .unwrap_or_default();
        dev.send_frame(&segment(
            self.port,
            self.remote_port,
            self.snd_nxt,
            |b| b.ack(ack),
            &options,
        ))
        .expect("ACK");
    }

    fn seq_of_segment(&self, n: u32) -> u32 {
        self.base.wrapping_add(n * u32::from(MSS))
    }

    /// The host writes `SEGMENTS` full segments; the guest receives them all (and keeps
    /// them unacknowledged).
    fn receive_burst(&mut self, dev: &mut NetFrontend, baton: &Baton) {
        let data: Vec<u8> = (0..SEGMENTS * u32::from(MSS)).map(pattern).collect();
        self.host.write_all(&data).expect("host write");
        let mut got = 0u32;
        while got < SEGMENTS * u32::from(MSS) {
            let seg = expect_segment(dev, self.port, "data", baton);
            if seg.payload.is_empty() {
                continue;
            }
            assert_eq!(seg.seq, self.base.wrapping_add(got), "in order");
            assert_eq!(seg.payload.len(), usize::from(MSS), "full segments");
            got += seg.payload.len() as u32;
        }
    }

    /// Everything acknowledged: the host sends more and it comes at the right sequence
    /// number with the right bytes (so the peek offset was put back after a
    /// retransmission).
    fn finish(&mut self, dev: &mut NetFrontend, baton: &Baton) {
        let end = self.seq_of_segment(SEGMENTS);
        self.ack(dev, end, None);
        self.host.write_all(b"tail").expect("host write");
        loop {
            let seg = expect_segment(dev, self.port, "data after the recovery", baton);
            if seg.payload.is_empty() {
                continue;
            }
            assert_eq!(seg.seq, end, "new data at SND.NXT");
            assert_eq!(seg.payload, b"tail");
            break;
        }
        self.ack(dev, end.wrapping_add(4), None);
    }
}

/// Data segments baton sends to the connection from now until it has been quiet for a
/// while, at least until one arrives (retransmissions), as (segment index, checked
/// payload).
fn retransmissions(dev: &mut NetFrontend, conn: &RawConn, baton: &Baton) -> Vec<u32> {
    let mut seen = Vec::new();
    let mut wait = Duration::from_secs(10);
    while let Some(seg) = next_segment(dev, conn.port, wait) {
        if seg.payload.is_empty() || seg.fin {
            continue;
        }
        let offset = seg.seq.wrapping_sub(conn.base);
        assert_eq!(offset % u32::from(MSS), 0, "{seg:?}");
        for (i, &byte) in seg.payload.iter().enumerate() {
            assert_eq!(byte, pattern(offset + i as u32), "retransmitted byte {i}");
        }
        seen.push(offset / u32::from(MSS));
        // Whatever else one retransmission sends comes at once.
        wait = Duration::from_millis(300);
    }
    assert!(!seen.is_empty(), "no retransmission; log:\n{}", baton.log());
    seen
}

/// The guest lost segment 1 and holds 2 and 3: it acknowledges segment 0, then sends
/// three duplicate ACKs reporting segments 2..4 in a SACK block. Returns the segments
/// baton sent again.
fn lose_one_with_dup_acks(dev: &mut NetFrontend, conn: &RawConn, baton: &Baton) -> Vec<u32> {
    let hole = conn.seq_of_segment(1);
    let held = (conn.seq_of_segment(2), conn.seq_of_segment(SEGMENTS));
    conn.ack(dev, hole, None);
    for _ in 0..3 {
        conn.ack(dev, hole, Some(held));
    }
    retransmissions(dev, conn, baton)
}

#[test]
fn sack_is_negotiated_as_the_guest_offers_and_fills_only_holes() {
    let baton = Baton::start("sack", &["-t", "5000", "-t", "5001"]);
    let mut dev = baton.connect();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");

    // Outbound, SACK offered: negotiated, and only the hole is resent.
    let (mut conn, sack) = connect_out(&mut dev, &baton, &listener, 30000, true);
    assert!(sack, "SYN-ACK offers SACK to a guest that offered it");
    conn.receive_burst(&mut dev, &baton);
    assert_eq!(
        lose_one_with_dup_acks(&mut dev, &conn, &baton),
        [1],
        "only the hole; log:\n{}",
        baton.log()
    );
    assert!(baton.log().contains("fast retransmission of 1 hole(s)"));
    conn.finish(&mut dev, &baton);

    // Outbound, no SACK offered: none in the SYN-ACK, and SACK blocks the guest sends
    // anyway are ignored: everything from the hole on goes again.
    let (mut conn, sack) = connect_out(&mut dev, &baton, &listener, 30001, false);
    assert!(
        !sack,
        "SYN-ACK without SACK for a guest that did not offer it"
    );
    conn.receive_burst(&mut dev, &baton);
    assert_eq!(lose_one_with_dup_acks(&mut dev, &conn, &baton), [1, 2, 3]);
    conn.finish(&mut dev, &baton);

    // Inbound (`-t`): baton's SYN offers SACK; the guest's SYN-ACK decides.
    let mut conn = connect_in(&mut dev, &baton, 5000, true);
    conn.receive_burst(&mut dev, &baton);
    assert_eq!(lose_one_with_dup_acks(&mut dev, &conn, &baton), [1]);
    conn.finish(&mut dev, &baton);

    let mut conn = connect_in(&mut dev, &baton, 5001, false);
    conn.receive_burst(&mut dev, &baton);
    assert_eq!(lose_one_with_dup_acks(&mut dev, &conn, &baton), [1, 2, 3]);
    conn.finish(&mut dev, &baton);
}

/// An outbound connection with SACK (guest port `port`) that received a burst, and one
/// guest ACK reporting segment 1 lost and the rest held (a SACK block). The listener is
/// returned to keep the host's end of the connection open.
fn burst_with_first_segment_lost(
    name: &str,
    port: u16,
) -> (Baton, NetFrontend, TcpListener, RawConn) {
    let baton = Baton::start(name, &[]);
    let mut dev = baton.connect();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let (mut conn, sack) = connect_out(&mut dev, &baton, &listener, port, true);
    assert!(sack);
    conn.receive_burst(&mut dev, &baton);
    let hole = conn.seq_of_segment(1);
    conn.ack(
        &mut dev,
        hole,
        Some((conn.seq_of_segment(2), conn.seq_of_segment(SEGMENTS))),
    );
    (baton, dev, listener, conn)
}

/// No duplicate ACKs, only one ACK reporting the hole: the retransmission timeout
/// resends the hole alone (not what the guest holds, not the tail it holds).
#[test]
fn a_timeout_resends_only_the_holes() {
    let (baton, mut dev, _listener, mut conn) = burst_with_first_segment_lost("sack-rto", 30010);
    assert_eq!(
        retransmissions(&mut dev, &conn, &baton),
        [1],
        "log:\n{}",
        baton.log()
    );
    assert!(baton.log().contains("resending 1 SACK hole(s)"));
    conn.finish(&mut dev, &baton);
}

/// A guest may drop data it reported holding (RFC 2018 §8). After a timeout resent the
/// hole, the guest acknowledges only up to the data it had SACKed: baton forgets the
/// scoreboard at once, and the next duplicate ACKs get everything from there again
/// (not nothing, which would leave the connection to a chain of timeouts).
#[test]
fn a_guest_that_drops_sacked_data_gets_it_again() {
    let (baton, mut dev, _listener, mut conn) = burst_with_first_segment_lost("sack-renege", 30020);
    assert_eq!(retransmissions(&mut dev, &conn, &baton), [1], "the hole");
    // The hole arrived, but segments 2 and 3 are gone from the guest.
    let reneged = conn.seq_of_segment(2);
    conn.ack(&mut dev, reneged, None);
    for _ in 0..3 {
        conn.ack(&mut dev, reneged, None);
    }
    assert_eq!(
        retransmissions(&mut dev, &conn, &baton),
        [2, 3],
        "log:\n{}",
        baton.log()
    );
    let log = baton.log();
    assert!(log.contains("the guest dropped data it had reported holding"));
    assert_eq!(
        log.matches("retransmission timeout").count(),
        1,
        "only the first retransmission waited for the timer; log:\n{log}"
    );
    conn.finish(&mut dev, &baton);
}

/// The guest fills the window baton advertises, exactly, while the host does not read:
/// baton's ACK closes the window (0). Then the host reads everything. baton must reopen
/// the window itself (a window update) — the guest sends nothing more, so a baton that
/// waits for the guest's zero-window probe never does. (It did: nothing watched the
/// socket for space unless a write had been refused, and a guest that respects the
/// window is never refused.)
#[test]
fn a_window_closed_by_a_slow_host_reader_is_reopened_by_baton() {
    use std::io::Read;
    let baton = Baton::start("window-reopen", &[]);
    let mut dev = baton.connect();
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let (mut conn, _) = connect_out(&mut dev, &baton, &listener, 30030, false);
    // Without window scaling (the guest offered none) baton advertises at most 64 KiB.
    const CHUNK: u32 = 16_000;
    const LIMIT: u32 = 64 << 20;
    let start = conn.snd_nxt;
    let mut acked = start;
    let mut window = u32::from(WINDOW);
    let mut data = Vec::new();
    loop {
        let sent = conn.snd_nxt.wrapping_sub(start);
        assert!(
            sent < LIMIT,
            "the window never closed after {sent} B; log:\n{}",
            baton.log()
        );
        // Send what the window allows, in chunks; then wait for the ACK of all of it.
        let mut room = window.saturating_sub(conn.snd_nxt.wrapping_sub(acked));
        while room > 0 {
            let n = room.min(CHUNK);
            let offset = conn.snd_nxt.wrapping_sub(start);
            let payload: Vec<u8> = (offset..offset + n).map(pattern).collect();
            let mut frame = Vec::new();
            etherparse::PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
                .ipv4(GUEST_V4.octets(), GW_V4.octets(), 64)
                .tcp(conn.port, conn.remote_port, conn.snd_nxt, WINDOW)
                .ack(conn.base)
                .write(&mut frame, &payload)
                .expect("build");
            dev.send_frame(&frame).expect("data");
            data.extend_from_slice(&payload);
            conn.snd_nxt = conn.snd_nxt.wrapping_add(n);
            room -= n;
        }
        while acked != conn.snd_nxt {
            let seg = expect_segment(&mut dev, conn.port, "ACK of the guest's data", &baton);
            acked = seg.ack;
            window = u32::from(seg.window);
        }
        if window == 0 {
            break;
        }
    }
    // The host reads all of it; the guest stays silent.
    let mut got = vec![0u8; data.len()];
    conn.host.read_exact(&mut got).expect("host read");
    assert!(got == data, "the host received the guest's bytes in order");
    let update = loop {
        let seg = next_segment(&mut dev, conn.port, Duration::from_secs(10)).unwrap_or_else(|| {
            panic!(
                "baton never reopened the window it closed; log:\n{}",
                baton.log()
            )
        });
        if seg.window > 0 {
            break seg;
        }
    };
    assert_eq!(
        update.ack, conn.snd_nxt,
        "a window update acknowledges everything"
    );
}
