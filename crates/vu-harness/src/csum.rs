//! Checksum offload as a virtio-net driver does it, for Ethernet frames carrying IPv4 or
//! IPv6 (no extension headers) with TCP or UDP.
//!
//! * Transmit with `VIRTIO_NET_F_CSUM`: [`make_partial`] turns a frame's L4 checksum
//!   into a partial one the way Linux leaves it for the device (`CHECKSUM_PARTIAL`): the
//!   field holds the folded, *not* inverted, pseudo-header sum, and the virtio-net
//!   header says `NEEDS_CSUM` with `csum_start` at the L4 header and `csum_offset` at
//!   the field (16 for TCP, 6 for UDP).
//! * Receive: [`l4_checksum_valid`] verifies a frame's TCP or UDP checksum, what a driver
//!   has to do itself for frames the device did not mark `DATA_VALID`.

use crate::frontend::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_LEN};

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Where a frame's L4 message and its checksum field are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4Location {
    /// Offset of the TCP or UDP header from the start of the frame.
    pub start: usize,
    /// Offset of the checksum field from `start`.
    pub field: usize,
    /// Length of the L4 message (header and payload).
    pub len: usize,
    /// One's-complement sum (unfolded) of the pseudo-header.
    pseudo_sum: u64,
}

/// One's-complement sum of `data` (big-endian 16-bit words, odd byte padded) added to
/// `sum`; not folded.
pub fn sum_words(mut sum: u64, data: &[u8]) -> u64 {
    let mut pairs = data.chunks_exact(2);
    for pair in &mut pairs {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = pairs.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Fold a one's-complement sum into 16 bits (not inverted).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Locate the TCP or UDP message of an Ethernet + IPv4/IPv6 frame; `None` for anything
/// else (other protocols, IPv6 extension headers, truncated frames).
pub fn locate_l4(frame: &[u8]) -> Option<L4Location> {
    let ether_type = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(ETH_LEN..)?;
    let (start, protocol, len, pseudo_sum) = match ether_type {
        ETHERTYPE_IPV4 => {
            let header_len = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if header_len < 20 || total < header_len || total > ip.len() {
                return None;
            }
            let protocol = ip[9];
            let len = total - header_len;
            let sum = sum_words(0, &ip[12..20]) + u64::from(protocol) + len as u64;
            (ETH_LEN + header_len, protocol, len, sum)
        }
        ETHERTYPE_IPV6 => {
            if ip.len() < 40 {
                return None;
            }
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 40 + len > ip.len() {
                return None;
            }
            let protocol = ip[6];
            let sum = sum_words(0, &ip[8..40]) + u64::from(protocol) + len as u64;
            (ETH_LEN + 40, protocol, len, sum)
        }
        _ => return None,
    };
    let field = match protocol {
        PROTO_TCP if len >= 20 => 16,
        PROTO_UDP if len >= 8 => 6,
        _ => return None,
    };
    Some(L4Location {
        start,
        field,
        len,
        pseudo_sum,
    })
}

/// Turn the frame's TCP or UDP checksum into a partial one (see the module
/// documentation) and return the virtio-net header that goes with it; `None` (frame
/// unchanged) for frames without TCP or UDP.
pub fn make_partial(frame: &mut [u8]) -> Option<[u8; VNET_HDR_LEN]> {
    let at = locate_l4(frame)?;
    let field = at.start + at.field;
    frame[field..field + 2].copy_from_slice(&fold(at.pseudo_sum).to_be_bytes());
    Some(partial_header(at.start as u16, at.field as u16))
}

/// A virtio-net header with `NEEDS_CSUM` and the given offsets.
pub fn partial_header(csum_start: u16, csum_offset: u16) -> [u8; VNET_HDR_LEN] {
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    hdr[6..8].copy_from_slice(&csum_start.to_le_bytes());
    hdr[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    hdr
}

/// Whether the frame's TCP or UDP checksum is correct (`true` for frames without TCP or
/// UDP, and for UDP over IPv4 without a checksum).
pub fn l4_checksum_valid(frame: &[u8]) -> bool {
    let Some(at) = locate_l4(frame) else {
        return true;
    };
    let l4 = &frame[at.start..at.start + at.len];
    if at.field == 6 && l4[6..8] == [0, 0] && frame[12..14] == ETHERTYPE_IPV4.to_be_bytes() {
        return true;
    }
    fold(sum_words(at.pseudo_sum, l4)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet + IPv4 + UDP with a correct checksum.
    fn udp_v4(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_LEN];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = 20 + 8 + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_UDP, 0, 0];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        let at = locate_l4(&f).expect("UDP");
        let sum = !fold(sum_words(at.pseudo_sum, &f[at.start..]));
        f[at.start + 6..at.start + 8].copy_from_slice(&sum.to_be_bytes());
        f
    }

    #[test]
    fn a_partial_checksum_completes_to_the_full_one() {
        let full = udp_v4(b"hello, odd length");
        assert!(l4_checksum_valid(&full));
        let mut partial = full.clone();
        let hdr = make_partial(&mut partial).expect("UDP frame");
        assert_eq!(hdr[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
        let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        let offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
        assert_eq!((start, offset), (34, 6));
        assert!(!l4_checksum_valid(&partial));
        // What the device would do: sum from csum_start to the end, store inverted.
        let sum = !fold(sum_words(0, &partial[start..]));
        partial[start + offset..start + offset + 2].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(partial, full);
    }
}
