//! TCP segments: parsing the guest's (untrusted) and building ours.
//!
//! Parsing validates the header length, the options and the checksum (over the IPv4
//! or IPv6 pseudo-header); anything wrong is a [`SegmentError`], never a panic.
//! Building writes Ethernet, IP and TCP headers by hand into one `Vec` with complete
//! checksums (baton offers the guest no checksum offload).

use std::net::IpAddr;

use etherparse::{TcpOptionElement, TcpSlice};

use super::seq::Seq;
use crate::config::MacAddr;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
/// MSS (4 bytes) + NOP + window scale (3 bytes).
const SYN_OPTIONS_LEN: usize = 8;
const HOP_LIMIT: u8 = 64;

/// Why a guest segment was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SegmentError {
    #[error("TCP header truncated or bad data offset")]
    Header,
    #[error("bad TCP checksum")]
    Checksum,
    #[error("malformed TCP options")]
    Options,
    #[error("source and destination address families differ")]
    Families,
}

/// What the guest offered in its SYN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SynOptions {
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
}

/// A validated guest segment.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: Seq,
    pub ack: Seq,
    pub flags: u8,
    pub window: u16,
    pub options: SynOptions,
    pub payload: &'a [u8],
}

impl Segment<'_> {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Sequence space the segment occupies (payload, SYN and FIN).
    pub fn seq_len(&self) -> u32 {
        let len = u32::try_from(self.payload.len()).unwrap_or(u32::MAX);
        len + u32::from(self.has(SYN)) + u32::from(self.has(FIN))
    }
}

/// One's-complement sum of `data` added to `sum` (not folded, not inverted).
fn sum_words(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let v = u64::from_be_bytes(word);
        sum += (v >> 32) + (v & 0xffff_ffff);
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for pair in &mut pairs {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sum of the pseudo-header for a TCP message of `len` bytes between `src` and `dst`.
fn pseudo_sum(src: IpAddr, dst: IpAddr, len: usize) -> Result<u64, SegmentError> {
    let len = len as u64;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Ok(sum_words(sum_words(0, &s.octets()), &d.octets()) + 6 + len)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Ok(sum_words(sum_words(0, &s.octets()), &d.octets()) + 6 + len)
        }
        _ => Err(SegmentError::Families),
    }
}

/// Parse and validate the TCP message `l4` sent from `src` to `dst`.
pub fn parse(src: IpAddr, dst: IpAddr, l4: &[u8]) -> Result<Segment<'_>, SegmentError> {
    let tcp = TcpSlice::from_slice(l4).map_err(|_| SegmentError::Header)?;
    if fold(sum_words(pseudo_sum(src, dst, l4.len())?, l4)) != 0 {
        return Err(SegmentError::Checksum);
    }
    let mut options = SynOptions::default();
    if tcp.syn() {
        for option in tcp.options_iterator() {
            match option.map_err(|_| SegmentError::Options)? {
                TcpOptionElement::MaximumSegmentSize(mss) => options.mss = Some(mss),
                TcpOptionElement::WindowScale(scale) => options.window_scale = Some(scale.min(14)),
                TcpOptionElement::SelectiveAcknowledgementPermitted => {
                    options.sack_permitted = true
                }
                _ => {}
            }
        }
    }
    let mut flags = 0;
    for (set, bit) in [
        (tcp.fin(), FIN),
        (tcp.syn(), SYN),
        (tcp.rst(), RST),
        (tcp.psh(), PSH),
        (tcp.ack(), ACK),
    ] {
        if set {
            flags |= bit;
        }
    }
    Ok(Segment {
        src_port: tcp.source_port(),
        dst_port: tcp.destination_port(),
        seq: Seq(tcp.sequence_number()),
        ack: Seq(tcp.acknowledgment_number()),
        flags,
        window: tcp.window_size(),
        options,
        payload: tcp.payload(),
    })
}

/// Everything about one segment towards the guest.
#[derive(Debug, Clone, Copy)]
pub struct OutSegment<'a> {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    /// Our end as the guest sees it (the remote peer's mapped address and port).
    pub src: (IpAddr, u16),
    /// The guest's end.
    pub dst: (IpAddr, u16),
    pub seq: Seq,
    pub ack: Seq,
    pub flags: u8,
    pub window: u16,
    /// MSS and window scale, for SYN segments (window scale `None`: not offered).
    pub syn_options: Option<(u16, Option<u8>)>,
    pub payload: &'a [u8],
}

/// Bytes of Ethernet, IP and TCP headers (no options) for this address family.
pub fn header_overhead(ipv4: bool) -> usize {
    ETH_LEN + if ipv4 { IPV4_LEN } else { IPV6_LEN } + TCP_LEN
}

/// Build the frame; fails only if the families differ or the payload does not fit.
pub fn build(seg: &OutSegment<'_>, out: &mut Vec<u8>) -> Result<(), SegmentError> {
    let options_len = if seg.syn_options.is_some() {
        SYN_OPTIONS_LEN
    } else {
        0
    };
    let tcp_len = TCP_LEN + options_len + seg.payload.len();
    out.clear();
    out.extend_from_slice(&seg.dst_mac);
    out.extend_from_slice(&seg.src_mac);
    match (seg.src.0, seg.dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(IPV4_LEN + tcp_len).map_err(|_| SegmentError::Header)?;
            out.extend_from_slice(&[0x08, 0x00]);
            let mut ip = [0u8; IPV4_LEN];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = HOP_LIMIT;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let checksum = fold(sum_words(0, &ip));
            ip[10..12].copy_from_slice(&checksum.to_be_bytes());
            out.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = u16::try_from(tcp_len).map_err(|_| SegmentError::Header)?;
            out.extend_from_slice(&[0x86, 0xdd]);
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&[6, HOP_LIMIT]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => return Err(SegmentError::Families),
    }
    let tcp_start = out.len();
    out.extend_from_slice(&seg.src.1.to_be_bytes());
    out.extend_from_slice(&seg.dst.1.to_be_bytes());
    out.extend_from_slice(&seg.seq.0.to_be_bytes());
    out.extend_from_slice(&seg.ack.0.to_be_bytes());
    let data_offset = ((TCP_LEN + options_len) / 4) as u8;
    out.extend_from_slice(&[data_offset << 4, seg.flags]);
    out.extend_from_slice(&seg.window.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    if let Some((mss, scale)) = seg.syn_options {
        out.extend_from_slice(&[2, 4]);
        out.extend_from_slice(&mss.to_be_bytes());
        match scale {
            Some(scale) => out.extend_from_slice(&[1, 3, 3, scale]),
            None => out.extend_from_slice(&[1, 1, 1, 1]),
        }
    }
    out.extend_from_slice(seg.payload);
    let sum = sum_words(
        pseudo_sum(seg.src.0, seg.dst.0, tcp_len)?,
        out.get(tcp_start..).unwrap_or_default(),
    );
    let checksum = fold(sum).to_be_bytes();
    if let Some(field) = out.get_mut(tcp_start + 16..tcp_start + 18) {
        field.copy_from_slice(&checksum);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn out(src: IpAddr, dst: IpAddr, payload: &[u8], syn: bool) -> Vec<u8> {
        let seg = OutSegment {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: (src, 80),
            dst: (dst, 40000),
            seq: Seq(0xffff_fff0),
            ack: Seq(7),
            flags: if syn { SYN | ACK } else { ACK | PSH },
            window: 1234,
            syn_options: syn.then_some((1460, Some(7))),
            payload,
        };
        let mut frame = Vec::new();
        build(&seg, &mut frame).expect("build");
        frame
    }

    #[test]
    fn built_segments_parse_back_with_valid_checksums() {
        for (src, dst) in [("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "fe80::2")] {
            let src: IpAddr = src.parse().expect("addr");
            let dst: IpAddr = dst.parse().expect("addr");
            for (payload, syn) in [(&b"hello, odd length"[..], false), (&[][..], true)] {
                let frame = out(src, dst, payload, syn);
                let packet = SlicedPacket::from_ethernet(&frame).expect("parse");
                let l4 = match packet.net {
                    Some(NetSlice::Ipv4(ref ip)) => ip.payload().payload,
                    Some(NetSlice::Ipv6(ref ip)) => ip.payload().payload,
                    _ => panic!("not IP"),
                };
                let Some(TransportSlice::Tcp(tcp)) = packet.transport else {
                    panic!("not TCP");
                };
                assert_eq!(tcp.payload(), payload);
                // Our parser sees it from the other direction's point of view.
                let seg = parse(src, dst, l4).expect("valid");
                assert_eq!(seg.seq, Seq(0xffff_fff0));
                assert_eq!(seg.window, 1234);
                if syn {
                    assert_eq!(seg.options.mss, Some(1460));
                    assert_eq!(seg.options.window_scale, Some(7));
                }
            }
        }
    }

    #[test]
    fn corrupted_segments_are_rejected() {
        let src: IpAddr = "10.0.0.1".parse().expect("addr");
        let dst: IpAddr = "10.0.0.2".parse().expect("addr");
        let frame = out(src, dst, b"data", false);
        let l4 = &frame[ETH_LEN + IPV4_LEN..];
        let mut bad = l4.to_vec();
        bad[TCP_LEN] ^= 1;
        assert_eq!(parse(src, dst, &bad).err(), Some(SegmentError::Checksum));
        for len in 0..TCP_LEN {
            assert!(parse(src, dst, &l4[..len]).is_err());
        }
        let mut bad_offset = l4.to_vec();
        bad_offset[12] = 0xf0;
        assert!(parse(src, dst, &bad_offset).is_err());
    }
}
