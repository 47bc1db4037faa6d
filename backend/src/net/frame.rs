//! Building frames for the guest, and the Internet checksum.
//!
//! Theory of operation: every answer baton gives the guest is an Ethernet II frame
//! from `our_mac` to the guest, carrying ARP, IPv4 or IPv6. The protocol modules build
//! their payload (an ARP packet, a DHCP message, an ICMPv6 message with its checksum
//! already set) and hand it to one of the functions here, which add the UDP, IP and
//! Ethernet headers with etherparse's header types and fill in the UDP and IPv4 header
//! checksums. Frames are built into a fresh `Vec` each: these are control-plane answers
//! (a handful per second), not the data path.
//!
//! [`internet_checksum`] is the RFC 1071 one's-complement sum, computed over the
//! concatenation of the given parts (pseudo-header, then message): a result of zero over
//! a received message (checksum field included) means the checksum is valid.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, UdpHeader,
};

use super::FrameError;
use crate::config::MacAddr;

/// TTL / hop limit of the IP packets baton originates (other than NDP, which needs 255).
pub(crate) const DEFAULT_HOP_LIMIT: u8 = 64;

/// Source and destination MAC of a frame towards the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkEnds {
    pub(crate) src: MacAddr,
    pub(crate) dst: MacAddr,
}

/// An Ethernet II frame carrying `payload`.
pub(crate) fn ethernet_frame(link: LinkEnds, ether_type: EtherType, payload: &[u8]) -> Vec<u8> {
    let header = Ethernet2Header {
        source: link.src,
        destination: link.dst,
        ether_type,
    };
    let mut frame = Vec::with_capacity(Ethernet2Header::LEN + payload.len());
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn too_large(what: &'static str) -> FrameError {
    FrameError::ReplyTooLarge(what)
}

fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpNumber,
    payload_len: usize,
) -> Result<Ipv4Header, FrameError> {
    let payload_len = u16::try_from(payload_len).map_err(|_| too_large("IPv4 payload"))?;
    let mut header = Ipv4Header::new(
        payload_len,
        DEFAULT_HOP_LIMIT,
        protocol,
        src.octets(),
        dst.octets(),
    )
    .map_err(|_| too_large("IPv4 payload"))?;
    header.header_checksum = header.calc_header_checksum();
    Ok(header)
}

fn ipv6_header(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: IpNumber,
    hop_limit: u8,
    payload_len: usize,
) -> Result<Ipv6Header, FrameError> {
    let payload_length = u16::try_from(payload_len).map_err(|_| too_large("IPv6 payload"))?;
    Ok(Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length,
        next_header,
        hop_limit,
        source: src.octets(),
        destination: dst.octets(),
    })
}

/// Ethernet + IPv4 around a complete transport message `l4` (its checksum already set).
pub(crate) fn ipv4_frame(
    link: LinkEnds,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpNumber,
    l4: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let ip = ipv4_header(src, dst, protocol, l4.len())?;
    let mut packet = Vec::with_capacity(ip.header_len() + l4.len());
    packet.extend_from_slice(&ip.to_bytes());
    packet.extend_from_slice(l4);
    Ok(ethernet_frame(link, EtherType::IPV4, &packet))
}

/// Ethernet + IPv6 around a complete transport message `l4` (its checksum already set).
pub(crate) fn ipv6_frame(
    link: LinkEnds,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: IpNumber,
    hop_limit: u8,
    l4: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let ip = ipv6_header(src, dst, next_header, hop_limit, l4.len())?;
    let mut packet = Vec::with_capacity(Ipv6Header::LEN + l4.len());
    packet.extend_from_slice(&ip.to_bytes());
    packet.extend_from_slice(l4);
    Ok(ethernet_frame(link, EtherType::IPV6, &packet))
}

/// Ethernet + IPv4 + UDP (with checksum) around `payload`.
pub(crate) fn udp4_frame(
    link: LinkEnds,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let ip = ipv4_header(
        *src.ip(),
        *dst.ip(),
        IpNumber::UDP,
        UdpHeader::LEN + payload.len(),
    )?;
    let udp = UdpHeader::with_ipv4_checksum(src.port(), dst.port(), &ip, payload)
        .map_err(|_| too_large("UDP payload"))?;
    let mut packet = Vec::with_capacity(ip.header_len() + UdpHeader::LEN + payload.len());
    packet.extend_from_slice(&ip.to_bytes());
    packet.extend_from_slice(&udp.to_bytes());
    packet.extend_from_slice(payload);
    Ok(ethernet_frame(link, EtherType::IPV4, &packet))
}

/// Ethernet + IPv6 + UDP (with checksum) around `payload`.
pub(crate) fn udp6_frame(
    link: LinkEnds,
    src: SocketAddrV6,
    dst: SocketAddrV6,
    payload: &[u8],
) -> Result<Vec<u8>, FrameError> {
    let ip = ipv6_header(
        *src.ip(),
        *dst.ip(),
        IpNumber::UDP,
        DEFAULT_HOP_LIMIT,
        UdpHeader::LEN + payload.len(),
    )?;
    let udp = UdpHeader::with_ipv6_checksum(src.port(), dst.port(), &ip, payload)
        .map_err(|_| too_large("UDP payload"))?;
    let mut packet = Vec::with_capacity(Ipv6Header::LEN + UdpHeader::LEN + payload.len());
    packet.extend_from_slice(&ip.to_bytes());
    packet.extend_from_slice(&udp.to_bytes());
    packet.extend_from_slice(payload);
    Ok(ethernet_frame(link, EtherType::IPV6, &packet))
}

/// RFC 1071 Internet checksum over the concatenation of `parts`, as the value to put in a
/// checksum field (big-endian on the wire: write it with `to_be_bytes`). Over a received
/// message whose checksum field is included, a valid checksum gives 0.
pub(crate) fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    // An odd byte at the end of one part pairs with the first byte of the next one.
    let mut pending_high: Option<u8> = None;
    for part in parts {
        for &byte in part.iter() {
            match pending_high.take() {
                Some(high) => sum += u64::from(u16::from_be_bytes([high, byte])),
                None => pending_high = Some(byte),
            }
        }
    }
    if let Some(high) = pending_high {
        sum += u64::from(u16::from_be_bytes([high, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves sum <= 0xffff.
    !(sum as u16)
}

/// The IPv4 pseudo-header (RFC 768 / RFC 793) for a transport message of `len` bytes.
pub(crate) fn ipv4_pseudo_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpNumber,
    len: u16,
) -> [u8; 12] {
    let mut header = [0u8; 12];
    header[0..4].copy_from_slice(&src.octets());
    header[4..8].copy_from_slice(&dst.octets());
    header[9] = protocol.0;
    header[10..12].copy_from_slice(&len.to_be_bytes());
    header
}

/// The IPv6 pseudo-header (RFC 8200 section 8.1) for an upper-layer message of `len`
/// bytes.
pub(crate) fn ipv6_pseudo_header(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: IpNumber,
    len: u32,
) -> [u8; 40] {
    let mut header = [0u8; 40];
    header[0..16].copy_from_slice(&src.octets());
    header[16..32].copy_from_slice(&dst.octets());
    header[32..36].copy_from_slice(&len.to_be_bytes());
    header[39] = next_header.0;
    header
}

/// The ICMPv6 checksum of `message` (whose checksum field, bytes 2..4, must be zero) sent
/// from `src` to `dst`.
pub(crate) fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    let pseudo = ipv6_pseudo_header(src, dst, IpNumber::IPV6_ICMP, len);
    internet_checksum(&[&pseudo, message])
}

/// Whether the ICMPv6 `message` (checksum field included) carries a valid checksum.
pub(crate) fn icmpv6_checksum_valid(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> bool {
    icmpv6_checksum(src, dst, message) == 0
}

/// Set the checksum field (bytes 2..4) of an ICMPv6 message. Messages shorter than the
/// 4-byte ICMP header are left alone (callers only pass messages they built).
pub(crate) fn set_icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &mut [u8]) {
    if let Some(field) = message.get_mut(2..4) {
        field.copy_from_slice(&[0, 0]);
    } else {
        return;
    }
    let checksum = icmpv6_checksum(src, dst, message).to_be_bytes();
    if let Some(field) = message.get_mut(2..4) {
        field.copy_from_slice(&checksum);
    }
}

/// Set the checksum field (bytes 2..4) of an ICMPv4 message.
pub(crate) fn set_icmpv4_checksum(message: &mut [u8]) {
    if let Some(field) = message.get_mut(2..4) {
        field.copy_from_slice(&[0, 0]);
    } else {
        return;
    }
    let checksum = internet_checksum(&[message]).to_be_bytes();
    if let Some(field) = message.get_mut(2..4) {
        field.copy_from_slice(&checksum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{Icmpv6Slice, Ipv4HeaderSlice};

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (one's
        // complement: 220d).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&[&data]), !0xddf2);
        // Splitting the data at an odd offset gives the same sum.
        assert_eq!(internet_checksum(&[&data[..3], &data[3..]]), !0xddf2);
    }

    #[test]
    fn ipv4_frame_has_a_valid_header_checksum() {
        let link = LinkEnds {
            src: [2, 0, 0, 0, 0, 1],
            dst: [2, 0, 0, 0, 0, 2],
        };
        let frame = ipv4_frame(
            link,
            Ipv4Addr::new(10, 0, 2, 2),
            Ipv4Addr::new(10, 0, 2, 15),
            IpNumber::ICMP,
            &[0, 0, 0xff, 0xff, 0, 0, 0, 0],
        )
        .expect("frame");
        let header = Ipv4HeaderSlice::from_slice(&frame[14..]).expect("header");
        assert_eq!(
            header.header_checksum(),
            header.to_header().calc_header_checksum()
        );
        assert_eq!(internet_checksum(&[header.slice()]), 0);
    }

    #[test]
    fn icmpv6_checksum_agrees_with_etherparse() {
        let src: Ipv6Addr = "fe80::1".parse().expect("addr");
        let dst: Ipv6Addr = "fe80::2".parse().expect("addr");
        let mut message = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1, b'h', b'i', b'!'];
        set_icmpv6_checksum(src, dst, &mut message);
        let slice = Icmpv6Slice::from_slice(&message).expect("icmpv6");
        assert!(slice.is_checksum_valid(src.octets(), dst.octets()));
        assert!(icmpv6_checksum_valid(src, dst, &message));
        message[9] ^= 1;
        assert!(!icmpv6_checksum_valid(src, dst, &message));
    }
}
