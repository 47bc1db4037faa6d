//! The guest network services end to end: the real `baton` binary serves the test
//! frontend over its socket (shared memory, real virtqueues), and the guest is smoltcp
//! (DHCP, ARP, ping) or hand-built frames (NDP, DHCPv6, hostile input). baton runs in a
//! private network namespace made by the test thread, with explicit addresses, so
//! nothing leaves this machine.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use baton_vu_harness::smol::GuestNic;
use baton_vu_harness::NetFrontend;
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, NetSlice, PacketBuilder, SlicedPacket,
    TransportSlice,
};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::{dhcpv4, icmp};
use smoltcp::wire::{
    EthernetAddress, HardwareAddress, IcmpRepr, Icmpv4Packet, Icmpv4Repr, IpAddress, IpCidr,
};

mod common;
use common::Baton;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 53);
const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 2);
const GUEST_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);

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

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &GUEST_MAC,
        &GUEST_V4.octets(),
        &[0; 6],
        &target.octets(),
    )
    .expect("arp");
    let builder = PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6]).arp(arp);
    let mut out = Vec::new();
    builder.write(&mut out).expect("arp frame");
    out
}

fn arp_reply_for(frame: &[u8], target: Ipv4Addr) -> bool {
    match SlicedPacket::from_ethernet(frame) {
        Ok(p) => matches!(p.net, Some(NetSlice::Arp(ref a)) if a.operation() == ArpOperation::REPLY
            && a.sender_protocol_addr() == target.octets()
            && a.sender_hw_addr() == OUR_MAC
            && a.target_hw_addr() == GUEST_MAC),
        Err(_) => false,
    }
}

#[test]
fn dhcp_lease_arp_and_ping_through_a_guest_tcpip_stack() {
    let baton = Baton::start("dhcp", &[]);
    let mut nic = GuestNic::new(baton.connect(), 1500);
    let mut iface = Interface::new(
        Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC))),
        &mut nic,
        smoltcp::time::Instant::now(),
    );
    let mut sockets = SocketSet::new(vec![]);
    let dhcp = sockets.add(dhcpv4::Socket::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    let (addr, router, dns) = loop {
        assert!(
            Instant::now() < deadline,
            "no DHCP lease; baton log:\n{}",
            baton.log()
        );
        iface.poll(smoltcp::time::Instant::now(), &mut nic, &mut sockets);
        if let Some(dhcpv4::Event::Configured(cfg)) = sockets.get_mut::<dhcpv4::Socket>(dhcp).poll()
        {
            break (cfg.address, cfg.router, cfg.dns_servers.to_vec());
        }
        nic.wait(Duration::from_millis(20));
    };
    assert_eq!(addr.address(), GUEST_V4);
    assert_eq!(addr.prefix_len(), 24);
    assert_eq!(router, Some(GW_V4));
    assert_eq!(dns, vec![DNS_V4]);
    iface.update_ip_addrs(|a| a.push(IpCidr::Ipv4(addr)).expect("address"));
    iface
        .routes_mut()
        .add_default_ipv4_route(GW_V4)
        .expect("route");

    // Ping the gateway: smoltcp resolves it with ARP first, then baton forwards the echo
    // through a ping socket to the host's loopback (the gateway maps to the host).
    let icmp_socket = icmp::Socket::new(
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 1024]),
        icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 1024]),
    );
    let ping = sockets.add(icmp_socket);
    sockets
        .get_mut::<icmp::Socket>(ping)
        .bind(icmp::Endpoint::Ident(0x4242))
        .expect("bind");
    let echo = Icmpv4Repr::EchoRequest {
        ident: 0x4242,
        seq_no: 7,
        data: b"baton ping payload",
    };
    let mut bytes = vec![0u8; echo.buffer_len()];
    echo.emit(
        &mut Icmpv4Packet::new_unchecked(&mut bytes),
        &smoltcp::phy::ChecksumCapabilities::default(),
    );
    sockets
        .get_mut::<icmp::Socket>(ping)
        .send_slice(&bytes, IpAddress::Ipv4(GW_V4))
        .expect("send");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "no echo reply; baton log:\n{}",
            baton.log()
        );
        iface.poll(smoltcp::time::Instant::now(), &mut nic, &mut sockets);
        let s = sockets.get_mut::<icmp::Socket>(ping);
        if s.can_recv() {
            let (data, from) = s.recv().expect("recv");
            assert_eq!(from, IpAddress::Ipv4(GW_V4));
            let packet = Icmpv4Packet::new_checked(data).expect("icmp");
            let repr = IcmpRepr::Ipv4(
                Icmpv4Repr::parse(&packet, &smoltcp::phy::ChecksumCapabilities::default())
                    .expect("valid checksum"),
            );
            assert!(
                matches!(repr, IcmpRepr::Ipv4(Icmpv4Repr::EchoReply { ident: 0x4242, seq_no: 7, data }) if data == b"baton ping payload"),
                "{repr:?}"
            );
            break;
        }
        nic.wait(Duration::from_millis(20));
    }
}

#[test]
fn arp_is_answered_for_every_address_but_the_guests_own() {
    let baton = Baton::start("arp", &[]);
    let mut dev = baton.connect();
    for target in [
        GW_V4,
        Ipv4Addr::new(10, 77, 0, 99),
        Ipv4Addr::new(192, 0, 2, 1),
    ] {
        dev.send_frame(&arp_request(target)).expect("send");
        expect_frame(&mut dev, "ARP reply", |f| arp_reply_for(f, target));
    }
    // The guest probing its own address (duplicate address detection) gets no answer.
    dev.send_frame(&arp_request(GUEST_V4)).expect("send");
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        if let Some(f) = dev.recv_frame(Duration::from_millis(50)).expect("recv") {
            assert!(
                !arp_reply_for(&f, GUEST_V4),
                "baton must not claim the guest's address"
            );
        }
    }
}

fn icmpv6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    dst_mac: [u8; 6],
    icmp_type: u8,
    rest: &[u8],
) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(GUEST_MAC, dst_mac)
        .ipv6(src.octets(), dst.octets(), 255)
        .icmpv6_raw(icmp_type, 0, [0; 4]);
    let mut out = Vec::new();
    builder.write(&mut out, rest).expect("icmpv6 frame");
    out
}

/// (ICMPv6 type, message body after the 4-byte type/code/checksum) if `frame` is ICMPv6.
fn icmpv6_of(frame: &[u8]) -> Option<(u8, Vec<u8>, Ipv6Addr, Ipv6Addr)> {
    let p = SlicedPacket::from_ethernet(frame).ok()?;
    let Some(NetSlice::Ipv6(ip)) = &p.net else {
        return None;
    };
    let (src, dst) = (ip.header().source_addr(), ip.header().destination_addr());
    let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else {
        return None;
    };
    let slice = icmp.slice();
    Some((slice[0], slice[4..].to_vec(), src, dst))
}

#[test]
fn router_solicitation_gets_an_advertisement_and_neighbours_are_answered() {
    let baton = Baton::start("ndp", &[]);
    let mut dev = baton.connect();
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    // RS with a source link-layer address option.
    let mut rs = vec![0u8; 4];
    rs.extend_from_slice(&[1, 1]);
    rs.extend_from_slice(&GUEST_MAC);
    dev.send_frame(&icmpv6_frame(
        GUEST_LL,
        all_routers,
        [0x33, 0x33, 0, 0, 0, 2],
        133,
        &rs[4..],
    ))
    .expect("send RS");
    let ra = expect_frame(&mut dev, "router advertisement", |f| {
        icmpv6_of(f).is_some_and(|(t, ..)| t == 134)
    });
    let (_, body, src, _) = icmpv6_of(&ra).unwrap();
    assert_eq!(
        src,
        "fe80::1".parse::<Ipv6Addr>().unwrap(),
        "RA from the gateway's link-local address"
    );
    // body: cur hop limit, flags, router lifetime(2), reachable(4), retrans(4), options.
    let flags = body[1];
    assert!(
        flags & 0x80 != 0 && flags & 0x40 != 0,
        "M and O flags: use DHCPv6 too (flags {flags:#x})"
    );
    let mut options = &body[12..];
    let (mut prefix, mut rdnss, mut mtu) = (None, None, None);
    while options.len() >= 8 {
        let (kind, len) = (options[0], usize::from(options[1]) * 8);
        assert!(len > 0 && len <= options.len(), "malformed option");
        match kind {
            3 => {
                prefix = Some((
                    options[2],
                    Ipv6Addr::from(<[u8; 16]>::try_from(&options[16..32]).unwrap()),
                ))
            }
            25 => {
                rdnss = Some(Ipv6Addr::from(
                    <[u8; 16]>::try_from(&options[8..24]).unwrap(),
                ))
            }
            5 => mtu = Some(u32::from_be_bytes(options[4..8].try_into().unwrap())),
            _ => {}
        }
        options = &options[len..];
    }
    assert_eq!(prefix, Some((64, "2001:db8:77::".parse().unwrap())));
    assert_eq!(rdnss, Some("2001:db8:77::53".parse().unwrap()));
    assert_eq!(mtu, Some(65520));

    // Neighbour solicitation for the gateway's link-local address.
    let target: Ipv6Addr = "fe80::1".parse().unwrap();
    let mut ns = vec![0u8; 4];
    ns.extend_from_slice(&target.octets());
    ns.extend_from_slice(&[1, 1]);
    ns.extend_from_slice(&GUEST_MAC);
    let snm: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
    dev.send_frame(&icmpv6_frame(
        GUEST_LL,
        snm,
        [0x33, 0x33, 0xff, 0, 0, 1],
        135,
        &ns[4..],
    ))
    .expect("send NS");
    let na = expect_frame(&mut dev, "neighbour advertisement", |f| {
        icmpv6_of(f).is_some_and(|(t, ..)| t == 136)
    });
    let (_, body, _, dst) = icmpv6_of(&na).unwrap();
    assert_eq!(dst, GUEST_LL);
    assert!(body[0] & 0x40 != 0, "solicited flag");
    assert_eq!(&body[4..20], &target.octets());
    assert_eq!(&body[22..28], &OUR_MAC, "target link-layer address option");
}

#[test]
fn dhcpv6_solicit_with_rapid_commit_gets_the_address() {
    use dhcproto::v6::{DhcpOption, Message, MessageType, OptionCode, IANA};
    use dhcproto::{Decodable, Decoder, Encodable, Encoder};
    let baton = Baton::start("dhcpv6", &[]);
    let mut dev = baton.connect();
    let mut msg = Message::new(MessageType::Solicit);
    let mut duid = vec![0, 3, 0, 1];
    duid.extend_from_slice(&GUEST_MAC);
    msg.opts_mut().insert(DhcpOption::ClientId(duid));
    msg.opts_mut().insert(DhcpOption::RapidCommit);
    msg.opts_mut().insert(DhcpOption::IANA(IANA {
        id: 1,
        t1: 0,
        t2: 0,
        opts: Default::default(),
    }));
    msg.opts_mut().insert(DhcpOption::ORO(dhcproto::v6::ORO {
        opts: vec![OptionCode::DomainNameServers],
    }));
    let mut payload = Vec::new();
    msg.encode(&mut Encoder::new(&mut payload)).expect("encode");
    let builder = PacketBuilder::ethernet2(GUEST_MAC, [0x33, 0x33, 0, 1, 0, 2])
        .ipv6(
            GUEST_LL.octets(),
            "ff02::1:2".parse::<Ipv6Addr>().unwrap().octets(),
            1,
        )
        .udp(546, 547);
    let mut frame = Vec::new();
    builder.write(&mut frame, &payload).expect("frame");
    dev.send_frame(&frame).expect("send");
    let reply = expect_frame(
        &mut dev,
        "DHCPv6 reply",
        |f| matches!(SlicedPacket::from_ethernet(f), Ok(p) if matches!(p.transport, Some(TransportSlice::Udp(ref u)) if u.source_port() == 547)),
    );
    let p = SlicedPacket::from_ethernet(&reply).unwrap();
    let Some(TransportSlice::Udp(udp)) = p.transport else {
        unreachable!()
    };
    let answer = Message::decode(&mut Decoder::new(udp.payload())).expect("DHCPv6 decodes");
    assert_eq!(
        answer.msg_type(),
        MessageType::Reply,
        "rapid commit: Reply at once"
    );
    let Some(DhcpOption::IANA(iana)) = answer.opts().get(OptionCode::IANA) else {
        panic!("no IA_NA: {answer:?}")
    };
    let Some(DhcpOption::IAAddr(addr)) = iana.opts.get(OptionCode::IAAddr) else {
        panic!("no IA address: {iana:?}")
    };
    assert_eq!(addr.addr, GUEST_V6);
    let Some(DhcpOption::DomainNameServers(dns)) = answer.opts().get(OptionCode::DomainNameServers)
    else {
        panic!("no DNS")
    };
    assert_eq!(dns, &vec!["2001:db8:77::53".parse::<Ipv6Addr>().unwrap()]);
}

#[test]
fn hostile_frames_are_survived() {
    let baton = Baton::start("hostile", &[]);
    let mut dev = baton.connect();
    let good = arp_request(GW_V4);
    let mut ipv4_bad_checksum = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, OUR_MAC)
        .ipv4(GUEST_V4.octets(), GW_V4.octets(), 64)
        .udp(68, 67)
        .write(&mut ipv4_bad_checksum, b"xxxx")
        .unwrap();
    ipv4_bad_checksum[14 + 10] ^= 0xff;
    let mut bad_len = ipv4_bad_checksum.clone();
    bad_len[14 + 2] = 0xff;
    let mut frames: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
    frames.extend([ipv4_bad_checksum, bad_len, vec![0xff; 64], vec![0; 1514]]);
    for f in frames.iter().filter(|f| !f.is_empty()) {
        dev.send_frame(f).expect("send");
    }
    dev.send_frame(&good).expect("send");
    expect_frame(&mut dev, "ARP reply after the garbage", |f| {
        arp_reply_for(f, GW_V4)
    });
}
