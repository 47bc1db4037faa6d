//! Guest UDP end to end: the real `baton` binary in a private network namespace, the
//! test frontend as the guest's NIC, hand-built etherparse frames as the guest, and
//! ordinary UDP sockets on the namespace's loopback as the host side.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use baton_vu_harness::NetFrontend;
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, NetSlice, PacketBuilder, SlicedPacket,
    TransportSlice,
};

mod common;
use common::Baton;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 2);
const GW_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
const DNS_FORWARD_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);

fn udp_frame(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let link = PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC);
    let mut out = Vec::new();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => link
            .ipv4(s.octets(), d.octets(), 64)
            .udp(src.port(), dst.port())
            .write(&mut out, payload),
        (IpAddr::V6(s), IpAddr::V6(d)) => link
            .ipv6(s.octets(), d.octets(), 64)
            .udp(src.port(), dst.port())
            .write(&mut out, payload),
        _ => panic!("mixed families"),
    }
    .expect("build");
    out
}

/// Tell baton the guest's MAC (learned from its first frame).
fn announce_guest(dev: &mut NetFrontend) {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &GUEST_MAC,
        &GUEST_V4.octets(),
        &[0; 6],
        &GW_V4.octets(),
    )
    .expect("arp");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6])
        .arp(arp)
        .write(&mut out)
        .expect("arp frame");
    dev.send_frame(&out).expect("send");
    expect_frame(dev, "ARP reply", |f| {
        SlicedPacket::from_ethernet(f).is_ok_and(|p| matches!(p.net, Some(NetSlice::Arp(_))))
    });
}

/// Wait for the first frame `want` accepts.
fn expect_frame(dev: &mut NetFrontend, what: &str, mut want: impl FnMut(&[u8]) -> bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(frame) = dev.recv_frame(Duration::from_millis(50)).expect("receive") {
            if want(&frame) {
                return frame;
            }
        }
    }
    panic!("no {what} within 5 s");
}

/// A UDP datagram to the guest, fully checked: Ethernet addresses, IPv4 header
/// checksum, UDP length and checksum. Returns (source, destination, payload).
fn parse_udp(frame: &[u8]) -> Option<(SocketAddr, SocketAddr, Vec<u8>)> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(etherparse::LinkSlice::Ethernet2(eth)) = &p.link else {
        return None;
    };
    assert_eq!(eth.source(), OUR_MAC);
    assert_eq!(eth.destination(), GUEST_MAC);
    let Some(TransportSlice::Udp(udp)) = &p.transport else {
        return None;
    };
    let header = udp.to_header();
    let (src, dst, checksum) = match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            assert_eq!(
                h.header_checksum(),
                h.to_header().calc_header_checksum(),
                "IPv4 header checksum"
            );
            let checksum = header
                .calc_checksum_ipv4_raw(h.source(), h.destination(), udp.payload())
                .expect("checksum");
            (
                IpAddr::V4(h.source_addr()),
                IpAddr::V4(h.destination_addr()),
                checksum,
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            let checksum = header
                .calc_checksum_ipv6_raw(h.source(), h.destination(), udp.payload())
                .expect("checksum");
            (
                IpAddr::V6(h.source_addr()),
                IpAddr::V6(h.destination_addr()),
                checksum,
            )
        }
        _ => return None,
    };
    assert_eq!(udp.checksum(), checksum, "UDP checksum");
    assert_eq!(usize::from(udp.length()), 8 + udp.payload().len());
    Some((
        SocketAddr::new(src, udp.source_port()),
        SocketAddr::new(dst, udp.destination_port()),
        udp.payload().to_vec(),
    ))
}

fn expect_udp(dev: &mut NetFrontend, what: &str) -> (SocketAddr, SocketAddr, Vec<u8>) {
    let frame = expect_frame(dev, what, |f| parse_udp(f).is_some());
    parse_udp(&frame).expect("udp")
}

fn host_socket(addr: &str) -> UdpSocket {
    let socket = UdpSocket::bind(addr).expect("bind host socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    socket
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// One round trip guest → host echo server → guest.
fn echo_round_trip(
    dev: &mut NetFrontend,
    echo: &UdpSocket,
    guest: SocketAddr,
    remote: SocketAddr,
    host_ip: IpAddr,
) {
    dev.send_frame(&udp_frame(guest, remote, b"hello from the guest"))
        .expect("send");
    let mut buf = [0u8; 2048];
    let (len, from) = echo
        .recv_from(&mut buf)
        .expect("datagram at the echo server");
    assert_eq!(&buf[..len], b"hello from the guest");
    assert_eq!(from.ip(), host_ip);
    echo.send_to(b"hello from the host", from).expect("reply");
    let (src, dst, payload) = expect_udp(dev, "echo reply");
    assert_eq!((src, dst), (remote, guest));
    assert_eq!(payload, b"hello from the host");
}

#[test]
fn datagrams_to_the_gateway_reach_host_loopback_and_replies_come_back() {
    let baton = Baton::start("loopback", &[]);
    let mut dev = baton.connect();
    let echo4 = host_socket("127.0.0.1:7777");
    echo_round_trip(
        &mut dev,
        &echo4,
        sa(GUEST_V4, 40000),
        sa(GW_V4, 7777),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );
    // The same flow again, and a second flow.
    echo_round_trip(
        &mut dev,
        &echo4,
        sa(GUEST_V4, 40000),
        sa(GW_V4, 7777),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );
    echo_round_trip(
        &mut dev,
        &echo4,
        sa(GUEST_V4, 40001),
        sa(GW_V4, 7777),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );
    let echo6 = host_socket("[::1]:7777");
    echo_round_trip(
        &mut dev,
        &echo6,
        sa(GUEST_V6, 40000),
        sa(GW_V6, 7777),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    );
}

#[test]
fn forwarded_port_reaches_the_guest_and_replies_reach_the_sender() {
    let baton = Baton::start("forward", &["-u", "5353:6363"]);
    let mut dev = baton.connect();
    announce_guest(&mut dev);
    for (local, forwarded, gateway, guest) in [
        (
            "127.0.0.1:0",
            "127.0.0.1:5353",
            IpAddr::V4(GW_V4),
            IpAddr::V4(GUEST_V4),
        ),
        (
            "[::1]:0",
            "[::1]:5353",
            IpAddr::V6(GW_V6),
            IpAddr::V6(GUEST_V6),
        ),
    ] {
        let sender = host_socket(local);
        let sender_port = sender.local_addr().expect("addr").port();
        sender
            .send_to(b"query from the host", forwarded)
            .expect("send to the forwarded port");
        let (src, dst, payload) = expect_udp(&mut dev, "forwarded datagram");
        assert_eq!(
            src,
            sa(gateway, sender_port),
            "loopback appears as the gateway"
        );
        assert_eq!(dst, sa(guest, 6363));
        assert_eq!(payload, b"query from the host");
        // The guest answers the address it saw.
        dev.send_frame(&udp_frame(dst, src, b"answer from the guest"))
            .expect("send");
        let mut buf = [0u8; 256];
        let (len, from) = sender.recv_from(&mut buf).expect("reply at the sender");
        assert_eq!(&buf[..len], b"answer from the guest");
        assert_eq!(
            from,
            forwarded.parse().expect("addr"),
            "from the forwarded port"
        );
    }
}

#[test]
fn dns_to_the_forwarding_address_goes_to_the_host_resolver() {
    let baton = Baton::start(
        "dns",
        &["--dns-forward", "10.77.0.3", "--dns-host", "127.0.0.1"],
    );
    let mut dev = baton.connect();
    let resolver = host_socket("127.0.0.1:53");
    let guest = sa(GUEST_V4, 33333);
    let forward = sa(DNS_FORWARD_V4, 53);
    let query =
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
    dev.send_frame(&udp_frame(guest, forward, query))
        .expect("send");
    let mut buf = [0u8; 512];
    let (len, from) = resolver.recv_from(&mut buf).expect("query at the resolver");
    assert_eq!(&buf[..len], query);
    let mut answer = buf[..len].to_vec();
    answer[2] = 0x81;
    answer[3] = 0x80;
    resolver.send_to(&answer, from).expect("answer");
    let (src, dst, payload) = expect_udp(&mut dev, "DNS answer");
    assert_eq!(
        (src, dst),
        (forward, guest),
        "answer from the forwarding address"
    );
    assert_eq!(payload, answer);
}

/// Internet checksum over `data` (0 when a checksum inside is valid).
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[test]
fn closed_host_port_gives_the_guest_a_port_unreachable() {
    let baton = Baton::start("unreachable", &[]);
    let mut dev = baton.connect();
    // IPv4: type 3 code 3 from the gateway, quoting the guest's datagram.
    let sent = udp_frame(sa(GUEST_V4, 41000), sa(GW_V4, 9), b"anyone there?");
    dev.send_frame(&sent).expect("send");
    let frame = expect_frame(&mut dev, "ICMP port unreachable", |f| {
        SlicedPacket::from_ethernet(f)
            .is_ok_and(|p| matches!(p.transport, Some(TransportSlice::Icmpv4(_))))
    });
    let ip = &frame[14..];
    assert_eq!(checksum(&[&ip[..20]]), 0, "IPv4 header checksum");
    assert_eq!(&ip[12..16], &GW_V4.octets());
    assert_eq!(&ip[16..20], &GUEST_V4.octets());
    let icmp = &ip[20..];
    assert_eq!((icmp[0], icmp[1]), (3, 3));
    assert_eq!(checksum(&[icmp]), 0, "ICMP checksum");
    // The quoted IP header and UDP header are the guest's (checksums included), then
    // the payload.
    let quoted = &icmp[8..];
    let original = &sent[14..];
    assert_eq!(&quoted[12..20], &original[12..20], "quoted addresses");
    assert_eq!(
        &quoted[20..],
        &original[20..],
        "quoted UDP header and payload"
    );

    // IPv6: type 1 code 4 from the gateway.
    let sent = udp_frame(sa(GUEST_V6, 41000), sa(GW_V6, 9), b"anyone there?");
    dev.send_frame(&sent).expect("send");
    let frame = expect_frame(&mut dev, "ICMPv6 port unreachable", |f| {
        SlicedPacket::from_ethernet(f).is_ok_and(
            |p| matches!(&p.transport, Some(TransportSlice::Icmpv6(i)) if i.type_u8() == 1),
        )
    });
    let p = SlicedPacket::from_ethernet(&frame).expect("parse");
    let (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Icmpv6(icmp))) = (&p.net, &p.transport)
    else {
        panic!("not ICMPv6");
    };
    assert_eq!(ip.header().source_addr(), GW_V6);
    assert_eq!(ip.header().destination_addr(), GUEST_V6);
    assert!(icmp.is_checksum_valid(GW_V6.octets(), GUEST_V6.octets()));
    assert_eq!(icmp.code_u8(), 4, "port unreachable");
    let quoted = &icmp.slice()[8..];
    let original = &sent[14..];
    assert_eq!(&quoted[8..40], &original[8..40], "quoted addresses");
    assert_eq!(
        &quoted[40..],
        &original[40..],
        "quoted UDP header and payload"
    );
}

#[test]
fn two_thousand_flows() {
    const FLOWS: u16 = 2000;
    const BATCH: u16 = 50;
    let baton = Baton::start("many", &[]);
    let mut dev = baton.connect();
    let echo = host_socket("127.0.0.1:7777");
    let fds_before = open_fds(&baton);
    let mut seen = vec![false; usize::from(FLOWS)];
    for batch in (0..FLOWS).step_by(usize::from(BATCH)) {
        for k in batch..batch + BATCH {
            let payload = k.to_be_bytes();
            dev.send_frame(&udp_frame(
                sa(GUEST_V4, 20000 + k),
                sa(GW_V4, 7777),
                &payload,
            ))
            .expect("send");
        }
        let mut buf = [0u8; 16];
        for _ in 0..BATCH {
            let (len, from) = echo
                .recv_from(&mut buf)
                .expect("datagram at the echo server");
            echo.send_to(&buf[..len], from).expect("echo");
        }
        for _ in 0..BATCH {
            let (src, dst, payload) = expect_udp(&mut dev, "echo");
            assert_eq!(src, sa(GW_V4, 7777));
            let k = u16::from_be_bytes([payload[0], payload[1]]);
            assert_eq!(dst, sa(GUEST_V4, 20000 + k), "each reply to its own flow");
            seen[usize::from(k)] = true;
        }
    }
    assert!(seen.iter().all(|&s| s), "every flow answered");
    let fds = open_fds(&baton);
    // A few descriptors of baton's may come and go between the two counts (one did in
    // a CI run: 32 -> 2031), so allow a handful; a shared socket would add one, not 2,000.
    assert!(
        fds + 8 >= fds_before + usize::from(FLOWS),
        "one socket per flow: {fds_before} -> {fds}"
    );
}

#[test]
fn hostile_datagrams_are_dropped_without_harming_other_flows() {
    let baton = Baton::start("hostile", &[]);
    let mut dev = baton.connect();
    let echo = host_socket("127.0.0.1:7777");
    let guest = sa(GUEST_V4, 40000);
    let remote = sa(GW_V4, 7777);
    echo_round_trip(
        &mut dev,
        &echo,
        guest,
        remote,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );

    let good = udp_frame(guest, remote, b"hostile payload");
    let mut bad_checksum = good.clone();
    let last = bad_checksum.len() - 1;
    bad_checksum[last] ^= 0xff;
    let mut bad_length = good.clone();
    bad_length[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&500u16.to_be_bytes());
    let mut short_length = good.clone();
    short_length[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&4u16.to_be_bytes());
    let v6 = udp_frame(sa(GUEST_V6, 40000), sa(GW_V6, 7777), b"no checksum");
    let mut v6_zero_checksum = v6.clone();
    v6_zero_checksum[14 + 40 + 6..14 + 40 + 8].copy_from_slice(&[0, 0]);
    let mut frames = vec![bad_checksum, bad_length, short_length, v6_zero_checksum];
    for len in [14 + 20 + 4, 14 + 20 + 8 + 3, 14 + 19] {
        frames.push(good[..len].to_vec());
    }
    for frame in &frames {
        dev.send_frame(frame).expect("send");
    }
    dev.wait_tx_done(Duration::from_secs(5)).expect("tx done");
    echo.set_nonblocking(true).expect("nonblocking");
    std::thread::sleep(Duration::from_millis(200));
    let mut buf = [0u8; 64];
    match echo.recv_from(&mut buf) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("a hostile datagram got through: {other:?}"),
    }
    echo.set_nonblocking(false).expect("blocking");
    // The flow still works, and so does a new one.
    echo_round_trip(
        &mut dev,
        &echo,
        guest,
        remote,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );
    echo_round_trip(
        &mut dev,
        &echo,
        sa(GUEST_V4, 40002),
        remote,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );
}

/// Descriptors the baton process holds (a socket per flow shows up here).
fn open_fds(baton: &Baton) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", baton.pid()))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// A flow idle for the timeout is closed by baton's timer alone (no traffic, no other
/// event): its host port becomes free, and the guest's next datagram opens a new flow.
/// Before that, datagrams at intervals shorter than the timeout keep the flow (and its
/// host port) alive for several timeout periods. Uses `--udp-timeout` (3 s) rather
/// than the default 180 s.
#[test]
fn an_idle_flow_closes_its_host_socket() {
    const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
    let baton = Baton::start("idle", &["--udp-timeout", "3"]);
    let mut dev = baton.connect();
    let echo = host_socket("127.0.0.1:7777");
    let guest = sa(GUEST_V4, 40000);
    let remote = sa(GW_V4, 7777);
    dev.send_frame(&udp_frame(guest, remote, b"ping"))
        .expect("send");
    let mut buf = [0u8; 64];
    let (_, flow_port) = echo.recv_from(&mut buf).expect("datagram at the echo");
    let fds_with_flow = open_fds(&baton);

    // Activity keeps the flow: a datagram every half timeout, alternating directions,
    // for three timeout periods, all through the same host socket (same source port,
    // which stays bound), and baton closes no idle flow meanwhile.
    let active_until = Instant::now() + 3 * IDLE_TIMEOUT;
    let mut round = 0u32;
    while Instant::now() < active_until {
        std::thread::sleep(IDLE_TIMEOUT / 2);
        round += 1;
        if round % 2 == 0 {
            dev.send_frame(&udp_frame(guest, remote, b"ping"))
                .expect("send");
            let (_, from) = echo.recv_from(&mut buf).expect("datagram at the echo");
            assert_eq!(from, flow_port, "round {round}: the same flow's socket");
        } else {
            echo.send_to(b"pong", flow_port).expect("reply");
            let (src, dst, _) = expect_udp(&mut dev, "reply of an active flow");
            assert_eq!((src, dst), (remote, guest));
        }
        let err = UdpSocket::bind(flow_port).expect_err("the active flow holds its port");
        assert_eq!(err.kind(), ErrorKind::AddrInUse);
    }
    assert!(
        !baton.log().contains("idle flow(s) closed"),
        "an active flow was closed; log:\n{}",
        tail(&baton.log())
    );

    // The last datagram of the flow: the idle time counts from when baton reads it,
    // which is after this instant.
    let last_datagram = Instant::now();
    echo.send_to(b"pong", flow_port).expect("reply");
    let (src, dst, _) = expect_udp(&mut dev, "reply");
    assert_eq!((src, dst), (remote, guest));
    let err = UdpSocket::bind(flow_port).expect_err("the flow's socket holds its port");
    assert_eq!(err.kind(), ErrorKind::AddrInUse);

    let deadline = last_datagram + IDLE_TIMEOUT + Duration::from_secs(30);
    let freed = loop {
        match UdpSocket::bind(flow_port) {
            Ok(socket) => break socket,
            Err(err) if err.kind() == ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(err) => panic!("{flow_port} still held after the idle timeout: {err}"),
        }
    };
    assert!(
        last_datagram.elapsed() >= IDLE_TIMEOUT,
        "closed before the idle timeout"
    );
    assert!(
        open_fds(&baton) < fds_with_flow,
        "the socket is closed, not only unbound"
    );
    // The timer closed it (logged just after the socket closed).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !baton.log().contains("1 idle flow(s) closed") {
        assert!(
            Instant::now() < deadline,
            "no idle expiry logged:\n{}",
            tail(&baton.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(freed);
    // A fresh flow for the same addresses.
    echo_round_trip(
        &mut dev,
        &echo,
        guest,
        remote,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    );
}

/// The default table (131,072 flows) filled with forwarded flows (they need no host
/// socket, so RLIMIT_NOFILE is not what stops them): the next new flow is refused,
/// inbound and outbound, with a warning in the log; existing flows keep working.
#[test]
fn a_full_flow_table_refuses_new_flows_and_says_so() {
    const TABLE: usize = 131_072;
    const BATCH: usize = 64;
    let baton = Baton::start("full", &["-u", "5000-5001"]);
    let mut dev = baton.connect();
    announce_guest(&mut dev);
    let targets = |v6: bool| -> [SocketAddr; 2] {
        let lo = if v6 {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        };
        [sa(lo, 5000), sa(lo, 5001)]
    };
    // Each sender port on each loopback address gives two flows (one per forwarded
    // port); senders are bound, used and closed in batches (the test's own descriptors
    // are limited too).
    let mut flows = 0;
    let mut pending = 0;
    let mut senders = Vec::new();
    let mut last_sender = None;
    'fill: for v6 in [false, true] {
        for port in 1024..=u16::MAX {
            if flows == TABLE {
                break 'fill;
            }
            let local = if v6 {
                sa(Ipv6Addr::LOCALHOST, port)
            } else {
                sa(Ipv4Addr::LOCALHOST, port)
            };
            let Ok(sender) = UdpSocket::bind(local) else {
                continue; // a port baton uses
            };
            for target in targets(v6) {
                sender.send_to(b"fill", target).expect("send");
                flows += 1;
                pending += 1;
            }
            last_sender = Some(local);
            senders.push(sender);
            if pending >= BATCH || flows == TABLE {
                for _ in 0..pending {
                    let (_, dst, payload) = expect_udp(&mut dev, "forwarded datagram");
                    assert_eq!(payload, b"fill");
                    assert!(matches!(dst.port(), 5000 | 5001));
                }
                pending = 0;
                senders.clear();
            }
        }
    }
    assert_eq!(flows, TABLE);
    assert!(
        !baton.log().contains("flow table full"),
        "not full before the last flow"
    );

    // One more sender: refused. Then an existing flow (same forwarded socket, so baton
    // reads the refused datagram first) still gets through.
    let existing = last_sender.expect("senders");
    // Senders went up from port 1024: ports above the last one were never seen.
    let refused = (existing.port() + 1..=u16::MAX)
        .map(|port| sa(Ipv6Addr::LOCALHOST, port))
        .find_map(|local| UdpSocket::bind(local).ok())
        .expect("a free IPv6 port");
    refused
        .send_to(b"one too many", sa(Ipv6Addr::LOCALHOST, 5000))
        .expect("send");
    let old = UdpSocket::bind(existing).expect("rebind an existing sender");
    old.send_to(b"existing", sa(Ipv6Addr::LOCALHOST, 5000))
        .expect("send");
    let (src, dst, payload) = expect_udp(&mut dev, "datagram of an existing flow");
    assert_eq!(
        payload, b"existing",
        "the refused datagram was not delivered"
    );
    assert_eq!((src.port(), dst), (existing.port(), sa(GUEST_V6, 5000)));

    // Outbound: refused too, and no socket is opened for it.
    let fds = open_fds(&baton);
    dev.send_frame(&udp_frame(
        sa(GUEST_V4, 45000),
        sa(GW_V4, 7777),
        b"new outbound",
    ))
    .expect("send");
    let deadline = Instant::now() + Duration::from_secs(5);
    let wanted = "new flow 10.77.0.2:45000 -> 10.77.0.1:7777 refused";
    while !baton.log().contains(wanted) {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            tail(&baton.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(open_fds(&baton), fds, "no socket for a refused flow");
    let log = baton.log();
    assert!(
        log.contains("UDP flow table full (131072 flows)"),
        "log:\n{}",
        tail(&log)
    );
    assert!(log.contains("WARN"), "a warning, not a debug line");
}

/// The last lines of a log, for assertion messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
