//! ARP: make every IPv4 address except the guest's own resolve to baton.
//!
//! Theory of operation: the guest shares its link only with "the router". Whatever IPv4
//! address the guest asks for — the gateway, a neighbour in its subnet, an address it
//! believes is on-link because of an odd prefix — baton answers with `our_mac`, so every
//! IPv4 packet the guest sends arrives here (passt does the same). Two kinds of request
//! get no answer, because answering would make the guest believe its address is taken:
//!
//! * announcements (gratuitous ARP: sender address == target address), and
//! * requests for the guest's own address (the configured one or the one it was seen
//!   using), which covers RFC 5227 probes from 0.0.0.0 during address conflict
//!   detection.
//!
//! ARP replies the guest sends are ignored (baton never asks). There is no state.

use etherparse::{ArpEthIpv4Packet, ArpOperation, ArpPacket, EtherType};

use super::frame::ethernet_frame;
use super::{deliver, FrameError, FrameSink, GuestEvent, Layer, ReplyContext};

/// Answer an ARP request (`arp_bytes`: the Ethernet payload) if it asks for an address
/// baton stands in for.
pub(crate) fn handle_arp(
    ctx: &ReplyContext<'_>,
    arp_bytes: &[u8],
    sink: &mut dyn FrameSink,
) -> Result<(), FrameError> {
    let packet =
        ArpPacket::from_slice(arp_bytes).map_err(|e| FrameError::too_short(Layer::Arp, &e))?;
    let request = packet.try_eth_ipv4().map_err(|_| FrameError::Malformed {
        layer: Layer::Arp,
        reason: "not an Ethernet/IPv4 ARP packet",
    })?;
    if request.operation != ArpOperation::REQUEST {
        return Ok(());
    }
    if ctx.config.v4.is_none() {
        guest_log!(
            ctx,
            GuestEvent::Arp,
            TRACE,
            "ARP request ignored: IPv4 is disabled"
        );
        return Ok(());
    }
    let sender = request.sender_ipv4_addr();
    let target = request.target_ipv4_addr();
    if target.is_unspecified() || target.is_multicast() || target.is_broadcast() {
        return Err(FrameError::Malformed {
            layer: Layer::Arp,
            reason: "target address is not unicast",
        });
    }
    if sender == target {
        guest_log!(
            ctx,
            GuestEvent::Arp,
            TRACE,
            "ARP announcement for {target} ignored"
        );
        return Ok(());
    }
    if ctx.is_guest_ipv4(target) {
        guest_log!(
            ctx,
            GuestEvent::Arp,
            TRACE,
            "ARP request for the guest's own address {target} not answered"
        );
        return Ok(());
    }
    let reply = ArpEthIpv4Packet {
        operation: ArpOperation::REPLY,
        sender_mac: ctx.config.our_mac,
        sender_ipv4: target.octets(),
        target_mac: request.sender_mac,
        target_ipv4: request.sender_ipv4,
    };
    let frame = ethernet_frame(ctx.reply_link(), EtherType::ARP, &reply.to_bytes());
    deliver(sink, &frame, "ARP reply");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{FrameError, GuestNet, Layer};
    use etherparse::{ArpHardwareId, ArpPacket, Ethernet2Slice, PacketBuilder};
    use std::net::Ipv4Addr;

    fn arp_frame(operation: ArpOperation, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let packet = ArpEthIpv4Packet {
            operation,
            sender_mac: GUEST_MAC,
            sender_ipv4: sender.octets(),
            target_mac: [0; 6],
            target_ipv4: target.octets(),
        };
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6])
            .arp(packet.into())
            .write(&mut frame)
            .expect("build");
        frame
    }

    use super::*;

    fn ask(net: &mut GuestNet, frame: &[u8]) -> CapturedFrames {
        let mut sink = CapturedFrames::default();
        net.handle_frame(frame, &mut sink).expect("valid ARP");
        sink
    }

    #[test]
    fn answers_request_for_gateway_with_our_mac() {
        let mut net = guest_net();
        let frame = arp_frame(ArpOperation::REQUEST, guest_v4(), gateway_v4());
        let reply = ask(&mut net, &frame).take_one();
        let eth = Ethernet2Slice::from_slice_without_fcs(&reply).expect("eth");
        assert_eq!(eth.destination(), GUEST_MAC);
        assert_eq!(eth.source(), OUR_MAC);
        assert_eq!(eth.ether_type(), EtherType::ARP);
        let arp = ArpPacket::from_slice(eth.payload_slice()).expect("arp");
        assert_eq!(arp.hw_addr_type, ArpHardwareId::ETHERNET);
        let arp = arp.try_eth_ipv4().expect("eth/ipv4");
        assert_eq!(arp.operation, ArpOperation::REPLY);
        assert_eq!(arp.sender_mac, OUR_MAC);
        assert_eq!(arp.sender_ipv4_addr(), gateway_v4());
        assert_eq!(arp.target_mac, GUEST_MAC);
        assert_eq!(arp.target_ipv4_addr(), guest_v4());
    }

    #[test]
    fn answers_for_any_other_address_even_off_subnet() {
        let mut net = guest_net();
        for target in [Ipv4Addr::new(192, 168, 10, 77), Ipv4Addr::new(8, 8, 8, 8)] {
            let frame = arp_frame(ArpOperation::REQUEST, guest_v4(), target);
            let reply = ask(&mut net, &frame).take_one();
            let arp = ArpPacket::from_slice(&reply[14..])
                .expect("arp")
                .try_eth_ipv4()
                .expect("eth/ipv4");
            assert_eq!(arp.sender_ipv4_addr(), target);
            assert_eq!(arp.sender_mac, OUR_MAC);
        }
    }

    #[test]
    fn answers_probes_for_other_addresses() {
        // RFC 5227 probe (sender 0.0.0.0) for some other address: still answered, the
        // reply goes back to the prober's MAC and to 0.0.0.0.
        let mut net = guest_net();
        let frame = arp_frame(ArpOperation::REQUEST, Ipv4Addr::UNSPECIFIED, gateway_v4());
        let reply = ask(&mut net, &frame).take_one();
        let arp = ArpPacket::from_slice(&reply[14..])
            .expect("arp")
            .try_eth_ipv4()
            .expect("eth/ipv4");
        assert_eq!(arp.target_ipv4_addr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(arp.target_mac, GUEST_MAC);
    }

    #[test]
    fn no_reply_for_the_guests_own_address_or_announcements() {
        let mut net = guest_net();
        // Address conflict detection probe for its configured address.
        let probe = arp_frame(ArpOperation::REQUEST, Ipv4Addr::UNSPECIFIED, guest_v4());
        assert!(ask(&mut net, &probe).0.is_empty());
        // Gratuitous ARP announcement.
        let announce = arp_frame(ArpOperation::REQUEST, guest_v4(), guest_v4());
        assert!(ask(&mut net, &announce).0.is_empty());
        // An address the guest was seen using (not the configured one) is its own too.
        let other = Ipv4Addr::new(192, 168, 10, 99);
        let frame = guest_udp4(other, gateway_v4(), (1, 2), b"");
        let _ = net.handle_frame(&frame, &mut CapturedFrames::default());
        let probe = arp_frame(ArpOperation::REQUEST, Ipv4Addr::UNSPECIFIED, other);
        assert!(ask(&mut net, &probe).0.is_empty());
        // ARP replies from the guest are ignored.
        let reply = arp_frame(ArpOperation::REPLY, guest_v4(), gateway_v4());
        assert!(ask(&mut net, &reply).0.is_empty());
    }

    #[test]
    fn malformed_arp_is_rejected() {
        let mut net = guest_net();
        let frame = arp_frame(ArpOperation::REQUEST, guest_v4(), gateway_v4());
        assert_truncations_rejected(&mut net, &frame);
        // Wrong protocol address length.
        let mut bad = frame.clone();
        bad[14 + 5] = 16;
        assert!(net
            .handle_frame(&bad, &mut CapturedFrames::default())
            .is_err());
        // Hardware type other than Ethernet.
        let mut bad = frame;
        bad[14 + 1] = 6;
        assert_eq!(
            net.handle_frame(&bad, &mut CapturedFrames::default()),
            Err(FrameError::Malformed {
                layer: Layer::Arp,
                reason: "not an Ethernet/IPv4 ARP packet"
            })
        );
    }
}
