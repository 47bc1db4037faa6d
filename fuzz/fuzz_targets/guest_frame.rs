//! Fuzz the guest services' frame path (`GuestNet::handle_frame`) with arbitrary
//! Ethernet frames. Each input is fed twice: as is, and with its IPv4 header, UDP,
//! ICMP and ICMPv6 checksums recomputed (so that the fuzzer gets past checksum
//! validation into ARP, DHCP, NDP, DHCPv6 and echo handling). Then twice more through
//! `GuestNet::handle_offloaded_frame` as if its virtio-net header said `NEEDS_CSUM`:
//! with the offsets of the frame's TCP/UDP checksum field (the path that skips
//! verification) and with offsets taken from the input's last four bytes (hostile
//! headers). Nothing may panic, and every frame sent back to the guest must at least
//! carry an Ethernet header.
//!
//! ICMP echo is disabled so the fuzzer never opens ping sockets or sends real pings.

#![no_main]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use baton::config::{
    GuestServices, NetConfig, ProtocolHandlers, V4Config, V6Config, DEFAULT_OUR_MAC,
};
use baton::net::{FrameSink, GuestNet};
use baton::ports::PortForwards;
use baton::vu::TxChecksum;
use libfuzzer_sys::fuzz_target;

struct CheckingSink;

impl FrameSink for CheckingSink {
    fn send_frame(&mut self, frame: &[u8]) -> bool {
        assert!(
            frame.len() >= 14,
            "frame to the guest without an Ethernet header"
        );
        assert_eq!(
            frame[6..12],
            DEFAULT_OUR_MAC,
            "frame to the guest not from our MAC"
        );
        true
    }
}

fn config() -> NetConfig {
    NetConfig {
        our_mac: DEFAULT_OUR_MAC,
        guest_mac: None,
        mtu: 65520,
        v4: Some(V4Config {
            addr: Ipv4Addr::new(192, 168, 10, 20),
            prefix_len: 24,
            gateway: Ipv4Addr::new(192, 168, 10, 1),
            dns: vec![Ipv4Addr::new(192, 168, 10, 1)],
            map_host_loopback: Some(Ipv4Addr::new(192, 168, 10, 1)),
            map_guest_addr: None,
            dns_forward: None,
            dns_host: None,
            outbound_addr: None,
            outbound_interface: None,
            template_interface: None,
        }),
        v6: Some(V6Config {
            addr: Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 0x20),
            prefix_len: 64,
            gateway: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
            dns: vec![Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x53)],
            map_host_loopback: None,
            map_guest_addr: None,
            router_link_local: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
            dns_forward: None,
            dns_host: None,
            outbound_addr: None,
            outbound_interface: None,
            template_interface: None,
        }),
        dns_search: vec!["example.com".into()],
        interface: None,
        services: GuestServices {
            dhcp: true,
            dhcpv6: true,
            ndp: true,
            router_advertisements: true,
            advertise_dns: true,
            advertise_search: true,
        },
        handlers: ProtocolHandlers {
            tcp: true,
            udp: true,
            icmp: false,
        },
        tcp_forwards: PortForwards::none(),
        udp_forwards: PortForwards::none(),
        freebind: false,
        max_flows: baton::flow::DEFAULT_MAX_FLOWS,
        udp_idle_timeout: baton::udp::IDLE_TIMEOUT,
        hostname: Some("guest".into()),
        fqdn: Some("guest.example.com".into()),
    }
}

/// RFC 1071 checksum over the concatenation of `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut high: Option<u8> = None;
    for byte in parts.iter().flat_map(|part| part.iter().copied()) {
        match high.take() {
            Some(h) => sum += u64::from(u16::from_be_bytes([h, byte])),
            None => high = Some(byte),
        }
    }
    if let Some(h) = high {
        sum += u64::from(u16::from_be_bytes([h, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Recompute the checksum at `at` (offset into `l4`) over pseudo-header + `l4`.
fn fix_l4(l4: &mut [u8], at: usize, pseudo: &[u8]) {
    if l4.len() < at + 2 {
        return;
    }
    l4[at..at + 2].copy_from_slice(&[0, 0]);
    let sum = checksum(&[pseudo, l4]);
    l4[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// Best-effort checksum repair of an Ethernet/IPv4 or Ethernet/IPv6 frame (no
/// extension headers); leaves anything it does not understand alone.
fn fix_checksums(frame: &mut [u8]) {
    if frame.len() < 14 {
        return;
    }
    let ether_type = u16::from_be_bytes([frame[12], frame[13]]);
    let packet = &mut frame[14..];
    match ether_type {
        0x0800 if packet.len() >= 20 => {
            let header_len = usize::from(packet[0] & 0x0f) * 4;
            if header_len < 20 || header_len > packet.len() {
                return;
            }
            packet[10..12].copy_from_slice(&[0, 0]);
            let sum = checksum(&[&packet[..header_len]]);
            packet[10..12].copy_from_slice(&sum.to_be_bytes());
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]))
                .clamp(header_len, packet.len());
            let protocol = packet[9];
            let mut pseudo = [0u8; 12];
            pseudo[0..8].copy_from_slice(&packet[12..20]);
            pseudo[9] = protocol;
            let l4 = &mut packet[header_len..total];
            match protocol {
                1 => fix_l4(l4, 2, &[]),
                17 if l4.len() >= 8 => {
                    let len = usize::from(u16::from_be_bytes([l4[4], l4[5]])).min(l4.len());
                    pseudo[10..12].copy_from_slice(&(len as u16).to_be_bytes());
                    fix_l4(&mut l4[..len], 6, &pseudo);
                }
                _ => {}
            }
        }
        0x86dd if packet.len() >= 40 => {
            let next_header = packet[6];
            let payload_len = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            let end = (40 + payload_len).min(packet.len());
            let mut pseudo = [0u8; 40];
            pseudo[0..32].copy_from_slice(&packet[8..40]);
            pseudo[39] = next_header;
            let l4 = &mut packet[40..end];
            match next_header {
                58 => {
                    pseudo[32..36].copy_from_slice(&(l4.len() as u32).to_be_bytes());
                    fix_l4(l4, 2, &pseudo);
                }
                17 if l4.len() >= 8 => {
                    let len = usize::from(u16::from_be_bytes([l4[4], l4[5]])).min(l4.len());
                    pseudo[32..36].copy_from_slice(&(len as u32).to_be_bytes());
                    fix_l4(&mut l4[..len], 6, &pseudo);
                }
                _ => {}
            }
        }
        _ => {}
    }
}

/// The `NEEDS_CSUM` offsets a driver would use for this frame's TCP or UDP checksum
/// (IPv4 with options, IPv6 without extension headers), or `None`.
fn guessed_partial(frame: &[u8]) -> Option<TxChecksum> {
    let ether_type = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let (start, protocol) = match ether_type {
        0x0800 => (14 + usize::from(frame.get(14)? & 0x0f) * 4, *frame.get(14 + 9)?),
        0x86dd => (14 + 40, *frame.get(14 + 6)?),
        _ => return None,
    };
    let offset = match protocol {
        6 => 16,
        17 => 6,
        _ => return None,
    };
    Some(TxChecksum::Partial {
        start: u16::try_from(start).ok()?,
        offset,
    })
}

fuzz_target!(|data: &[u8]| {
    let config = Arc::new(config());
    let Ok(mut net) = GuestNet::new(config) else {
        return;
    };
    let _ = net.handle_frame(data, &mut CheckingSink);
    let mut fixed = data.to_vec();
    fix_checksums(&mut fixed);
    if let Err(err) = net.handle_frame(&fixed, &mut CheckingSink) {
        // Exercise the error's formatting too.
        let _ = err.to_string();
        let _ = err.is_guest_fault();
    }
    if let Some(partial) = guessed_partial(data) {
        let _ = net.handle_offloaded_frame(data, partial, &mut CheckingSink);
    }
    if let [.., a, b, c, d] = *data {
        let hostile = TxChecksum::Partial {
            start: u16::from_le_bytes([a, b]),
            offset: u16::from_le_bytes([c, d]),
        };
        if let Err(err) = net.handle_offloaded_frame(&fixed, hostile, &mut CheckingSink) {
            let _ = err.to_string();
        }
    }
});
