//! TCP segments: parsing the guest's (untrusted) and building ours.
//!
//! Parsing validates the header length, the options and the checksum (over the IPv4
//! or IPv6 pseudo-header); anything wrong is a [`SegmentError`], never a panic. Options
//! are read with etherparse: those of a SYN must be well-formed; in other segments only
//! SACK blocks matter, and a malformed option ends the list (what follows it cannot be
//! located) without dropping the segment.
//! Building writes Ethernet, IP and TCP headers by hand into one `Vec` with complete
//! checksums (baton offers the guest no checksum offload); SYN options are laid out by
//! etherparse. baton never sends SACK blocks: it holds no out-of-order data from the
//! guest (a segment beyond RCV.NXT is dropped, see `conn`), so it has nothing to report.

use std::net::IpAddr;

use etherparse::{TcpOptionElement, TcpOptions, TcpSlice};

use super::seq::Seq;
use crate::config::MacAddr;
use crate::net::L4Checksum;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
/// Most SACK blocks one segment carries (40 option bytes: 2 + 4 × 8).
pub const MAX_SACK_BLOCKS: usize = 4;
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

/// The SACK blocks of a guest segment (RFC 2018): `[left, right)` sequence ranges the
/// guest holds beyond its cumulative acknowledgement, as sent (not yet checked against
/// anything).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SackBlocks {
    blocks: [(Seq, Seq); MAX_SACK_BLOCKS],
    len: u8,
}

impl SackBlocks {
    fn push(&mut self, left: u32, right: u32) {
        if let Some(slot) = self.blocks.get_mut(usize::from(self.len)) {
            *slot = (Seq(left), Seq(right));
            self.len += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (Seq, Seq)> + '_ {
        self.blocks.iter().take(usize::from(self.len)).copied()
    }
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
    /// SACK blocks (segments other than SYNs).
    pub sack: SackBlocks,
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
    parse_with(src, dst, l4, L4Checksum::Verify)
}

/// [`parse`], verifying the checksum only if `checksum` says so (the guest's driver may
/// leave it partial under virtio checksum offload; see [`crate::vu`]).
pub fn parse_with(
    src: IpAddr,
    dst: IpAddr,
    l4: &[u8],
    checksum: L4Checksum,
) -> Result<Segment<'_>, SegmentError> {
    let tcp = TcpSlice::from_slice(l4).map_err(|_| SegmentError::Header)?;
    let pseudo = pseudo_sum(src, dst, l4.len())?;
    if checksum == L4Checksum::Verify && fold(sum_words(pseudo, l4)) != 0 {
        return Err(SegmentError::Checksum);
    }
    let mut options = SynOptions::default();
    let mut sack = SackBlocks::default();
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
    } else if !tcp.options().is_empty() {
        for option in tcp.options_iterator() {
            match option {
                Ok(TcpOptionElement::SelectiveAcknowledgement(first, rest)) => {
                    sack.push(first.0, first.1);
                    for (left, right) in rest.into_iter().flatten() {
                        sack.push(left, right);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
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
        sack,
        payload: tcp.payload(),
    })
}

/// The options of a SYN or SYN-ACK towards the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynOffer {
    pub mss: u16,
    /// `None`: window scaling not offered.
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
}

impl SynOffer {
    /// Laid out as Linux does without timestamps: MSS, then NOP NOP SACK-permitted,
    /// then NOP window scale (each option word-aligned).
    fn encode(&self) -> Result<TcpOptions, SegmentError> {
        use TcpOptionElement::{
            MaximumSegmentSize, Noop, SelectiveAcknowledgementPermitted, WindowScale,
        };
        let mut elements = vec![MaximumSegmentSize(self.mss)];
        if self.sack_permitted {
            elements.extend([Noop, Noop, SelectiveAcknowledgementPermitted]);
        }
        if let Some(scale) = self.window_scale {
            elements.extend([Noop, WindowScale(scale)]);
        }
        TcpOptions::try_from_elements(&elements).map_err(|_| SegmentError::Options)
    }
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
    /// Options of SYN segments.
    pub syn_options: Option<SynOffer>,
    pub payload: &'a [u8],
}

/// Bytes of Ethernet, IP and TCP headers (no options) for this address family.
pub fn header_overhead(ipv4: bool) -> usize {
    ETH_LEN + if ipv4 { IPV4_LEN } else { IPV6_LEN } + TCP_LEN
}

/// Build the frame; fails only if the families differ or the payload does not fit.
pub fn build(seg: &OutSegment<'_>, out: &mut Vec<u8>) -> Result<(), SegmentError> {
    let options = seg.syn_options.map(|offer| offer.encode()).transpose()?;
    let options = options
        .as_ref()
        .map(TcpOptions::as_slice)
        .unwrap_or_default();
    let options_len = options.len();
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
    out.extend_from_slice(options);
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
            syn_options: syn.then_some(SynOffer {
                mss: 1460,
                window_scale: Some(7),
                sack_permitted: true,
            }),
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
                    assert!(seg.options.sack_permitted);
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

    /// Every combination of SYN options: what is offered parses back, and nothing else.
    #[test]
    fn syn_offers_parse_back() {
        let src: IpAddr = "10.0.0.1".parse().expect("addr");
        let dst: IpAddr = "10.0.0.2".parse().expect("addr");
        for window_scale in [None, Some(7)] {
            for sack_permitted in [false, true] {
                let offer = SynOffer {
                    mss: 1400,
                    window_scale,
                    sack_permitted,
                };
                let seg = OutSegment {
                    src_mac: [2, 0, 0, 0, 0, 1],
                    dst_mac: [2, 0, 0, 0, 0, 2],
                    src: (src, 80),
                    dst: (dst, 40000),
                    seq: Seq(1),
                    ack: Seq(2),
                    flags: SYN | ACK,
                    window: 1000,
                    syn_options: Some(offer),
                    payload: &[],
                };
                let mut frame = Vec::new();
                build(&seg, &mut frame).expect("build");
                let parsed = parse(src, dst, &frame[ETH_LEN + IPV4_LEN..]).expect("valid");
                assert_eq!(
                    parsed.options,
                    SynOptions {
                        mss: Some(1400),
                        window_scale,
                        sack_permitted,
                    },
                    "{offer:?}"
                );
            }
        }
    }

    fn ack_with_options(options: &[TcpOptionElement]) -> (IpAddr, IpAddr, Vec<u8>) {
        let src: IpAddr = "10.0.0.2".parse().expect("addr");
        let dst: IpAddr = "10.0.0.1".parse().expect("addr");
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .tcp(40000, 80, 5, 1000)
            .ack(100)
            .options(options)
            .expect("options fit")
            .write(&mut frame, &[])
            .expect("build");
        (src, dst, frame[ETH_LEN + IPV4_LEN..].to_vec())
    }

    #[test]
    fn sack_blocks_are_parsed_from_acks() {
        let (src, dst, l4) = ack_with_options(&[
            TcpOptionElement::Noop,
            TcpOptionElement::Noop,
            TcpOptionElement::SelectiveAcknowledgement(
                (200, 300),
                [Some((400, 500)), Some((0xffff_fff0, 8)), None],
            ),
        ]);
        let seg = parse(src, dst, &l4).expect("valid");
        let blocks: Vec<_> = seg.sack.iter().collect();
        assert_eq!(
            blocks,
            [
                (Seq(200), Seq(300)),
                (Seq(400), Seq(500)),
                (Seq(0xffff_fff0), Seq(8))
            ]
        );
        let (src, dst, l4) = ack_with_options(&[]);
        assert!(parse(src, dst, &l4).expect("valid").sack.is_empty());
    }

    /// A malformed option in a non-SYN segment ends the option list; the segment stays.
    #[test]
    fn malformed_options_after_the_handshake_do_not_drop_the_segment() {
        // SACK block, then an option whose length runs past the header.
        let (src, dst, mut l4) = ack_with_options(&[
            TcpOptionElement::SelectiveAcknowledgement((200, 300), [None, None, None]),
            TcpOptionElement::Noop,
            TcpOptionElement::Noop,
        ]);
        l4[TCP_LEN + 10] = 8; // kind 8 (timestamps)...
        l4[TCP_LEN + 11] = 40; // ...claiming 40 bytes
        l4[16] = 0;
        l4[17] = 0;
        let checksum = fold(sum_words(pseudo_sum(src, dst, l4.len()).expect("sum"), &l4));
        l4[16..18].copy_from_slice(&checksum.to_be_bytes());
        let seg = parse(src, dst, &l4).expect("kept");
        assert_eq!(seg.sack.iter().collect::<Vec<_>>(), [(Seq(200), Seq(300))]);
    }
}
