//! NDP (RFC 4861): router advertisements and neighbour advertisements for the guest.
//!
//! Theory of operation: baton is the guest's only router and its only neighbour.
//!
//! * Router Solicitation → Router Advertisement, from the router's link-local address
//!   (`V6Config::router_link_local`) to the soliciting address (all-nodes when the
//!   guest solicited from `::`). The advertisement carries the M and O flags when the
//!   DHCPv6 server runs (so the guest also asks it for its address and DNS servers), a
//!   prefix information option for the /64 around the guest's configured address
//!   (on-link, autonomous, infinite lifetimes: SLAAC gives the guest an address in the
//!   same /64; left out in local mode, where there is no global address), an MTU option
//!   (MTU ≥ 1280), RDNSS (RFC 8106) with the DNS servers and DNSSL with the search
//!   domains (each unless turned off), and our link-layer address. It is built once,
//!   at start-up; only the checksum depends on the destination.
//! * Neighbor Solicitation → Neighbor Advertisement (solicited, override, router) with
//!   `our_mac` as the target link-layer address, for every target except the guest's
//!   own addresses (configured, or seen as its sources). Duplicate address detection
//!   probes (source `::`) are never answered: answering would tell the guest that its
//!   tentative address is taken.
//!
//! Input validation follows RFC 4861 sections 6.1.1 and 7.1.1: hop limit 255 (the
//! packet cannot have been forwarded), code 0, minimum length, well-formed options
//! (no zero length), and the `::`-source rules. The ICMPv6 checksum was already
//! checked by the dispatcher. baton sends no unsolicited advertisements: guests solicit
//! when their interface comes up.
//!
//! Switches (`NetConfig::services`): `ndp` off (`--no-ndp`, `--no-icmp`) drops
//! solicitations unanswered; `router_advertisements` off (`--no-ra`) still answers
//! neighbour solicitations.

use std::net::Ipv6Addr;

use etherparse::IpNumber;

use super::frame::{ipv6_frame, set_icmpv6_checksum};
use super::{deliver, FrameError, FrameSink, GuestEvent, Ipv6Packet, Layer, ReplyContext};
use crate::config::{NetConfig, V6Config, IPV6_MIN_MTU};

pub(crate) const TYPE_ROUTER_SOLICITATION: u8 = 133;
pub(crate) const TYPE_ROUTER_ADVERTISEMENT: u8 = 134;
pub(crate) const TYPE_NEIGHBOR_SOLICITATION: u8 = 135;
pub(crate) const TYPE_NEIGHBOR_ADVERTISEMENT: u8 = 136;

/// NDP messages must carry (and are sent with) this hop limit.
pub(crate) const NDP_HOP_LIMIT: u8 = 255;

const OPTION_SOURCE_LINK_ADDR: u8 = 1;
const OPTION_TARGET_LINK_ADDR: u8 = 2;
const OPTION_PREFIX_INFO: u8 = 3;
const OPTION_MTU: u8 = 5;
const OPTION_RDNSS: u8 = 25;
const OPTION_DNSSL: u8 = 31;

/// RA flags: managed address configuration, other configuration.
pub(crate) const RA_FLAG_MANAGED: u8 = 0x80;
pub(crate) const RA_FLAG_OTHER: u8 = 0x40;
/// Prefix information flags: on-link, autonomous address configuration.
pub(crate) const PREFIX_FLAG_ON_LINK: u8 = 0x80;
pub(crate) const PREFIX_FLAG_AUTONOMOUS: u8 = 0x40;
/// NA flags: router, solicited, override.
pub(crate) const NA_FLAG_ROUTER: u8 = 0x80;
pub(crate) const NA_FLAG_SOLICITED: u8 = 0x40;
pub(crate) const NA_FLAG_OVERRIDE: u8 = 0x20;

/// Router lifetime in seconds (the maximum, RFC 8319).
pub(crate) const ROUTER_LIFETIME: u16 = u16::MAX;
/// Hop limit the guest should use for its own packets.
const ADVERTISED_HOP_LIMIT: u8 = 64;
/// Lifetime meaning "infinity" in prefix, RDNSS and DNSSL options.
pub(crate) const INFINITE_LIFETIME: u32 = u32::MAX;
/// The advertised prefix length: SLAAC needs a /64.
pub(crate) const SLAAC_PREFIX_LEN: u8 = 64;

/// The link-local address baton speaks as a router from (RAs, NAs for the gateway,
/// DHCPv6 replies); `None` when IPv6 is disabled. The configuration chose it: the
/// gateway if it is link-local, else the template interface's link-local address, else
/// fe80::1 (receivers discard router advertisements from other sources).
pub(crate) fn router_link_local(config: &NetConfig) -> Option<Ipv6Addr> {
    config.v6.as_ref().map(|v6| v6.router_link_local)
}

/// The first `prefix_len` bits of `addr`.
pub(crate) fn prefix_of(addr: Ipv6Addr, prefix_len: u8) -> Ipv6Addr {
    let host_bits = 128 - u32::from(prefix_len.min(128));
    let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
    Ipv6Addr::from(u128::from(addr) & mask)
}

/// DNS wire format (RFC 1035 section 3.1) of a dotted name: `None` when a label is
/// empty or longer than 63 bytes, or the name longer than 255 bytes.
pub(crate) fn dns_wire_name(name: &str) -> Option<Vec<u8>> {
    let mut wire = Vec::with_capacity(name.len() + 2);
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|len| (1..=63).contains(len))?;
        wire.push(len);
        wire.extend_from_slice(label.as_bytes());
    }
    wire.push(0);
    (wire.len() <= 255).then_some(wire)
}

/// What the NDP options of a message told us.
#[derive(Debug, Default, Clone, Copy)]
struct NdpOptionsSeen {
    has_source_link_addr: bool,
}

/// Walk NDP options (RFC 4861 section 4.6): type, length in units of 8 bytes (never
/// zero), contents. The options must fill `options` exactly.
fn check_options(mut options: &[u8]) -> Result<NdpOptionsSeen, FrameError> {
    let mut seen = NdpOptionsSeen::default();
    while !options.is_empty() {
        let (Some(&option_type), Some(&units)) = (options.first(), options.get(1)) else {
            return Err(FrameError::TooShort {
                layer: Layer::Ndp,
                len: options.len(),
                needed: 2,
            });
        };
        let len = usize::from(units) * 8;
        if len == 0 {
            return Err(FrameError::Malformed {
                layer: Layer::Ndp,
                reason: "option with length zero",
            });
        }
        let Some(rest) = options.get(len..) else {
            return Err(FrameError::TooShort {
                layer: Layer::Ndp,
                len: options.len(),
                needed: len,
            });
        };
        if option_type == OPTION_SOURCE_LINK_ADDR {
            seen.has_source_link_addr = true;
        }
        options = rest;
    }
    Ok(seen)
}

/// Common RFC 4861 checks: hop limit 255, code 0, at least `min_len` bytes.
fn check_ndp_header(ip: &Ipv6Packet<'_>, min_len: usize) -> Result<(), FrameError> {
    if ip.hop_limit != NDP_HOP_LIMIT {
        return Err(FrameError::NdpHopLimit {
            hop_limit: ip.hop_limit,
        });
    }
    if ip.payload.len() < min_len {
        return Err(FrameError::TooShort {
            layer: Layer::Ndp,
            len: ip.payload.len(),
            needed: min_len,
        });
    }
    if ip.payload.get(1) != Some(&0) {
        return Err(FrameError::Malformed {
            layer: Layer::Ndp,
            reason: "non-zero code",
        });
    }
    Ok(())
}

/// Answers router solicitations; holds the advertisement built from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct RouterAdvertiser {
    /// Router link-local address and the RA message (checksum field zero); `None`
    /// when IPv6, NDP or router advertisements are disabled.
    advert: Option<(Ipv6Addr, Vec<u8>)>,
}

impl RouterAdvertiser {
    pub(crate) fn new(config: &NetConfig) -> Self {
        let services = config.services;
        let advert = config
            .v6
            .as_ref()
            .filter(|_| services.ndp && services.router_advertisements)
            .map(|v6| (v6.router_link_local, build_router_advertisement(config, v6)));
        Self { advert }
    }

    /// Answer a router solicitation (RFC 4861 section 6.2.6).
    pub(crate) fn handle_router_solicitation(
        &self,
        ctx: &ReplyContext<'_>,
        ip: &Ipv6Packet<'_>,
        sink: &mut dyn FrameSink,
    ) -> Result<(), FrameError> {
        const RS_HEADER_LEN: usize = 8;
        if !ctx.config.services.ndp {
            guest_log!(
                ctx,
                GuestEvent::Ndp,
                TRACE,
                "router solicitation ignored: NDP is disabled"
            );
            return Ok(());
        }
        check_ndp_header(ip, RS_HEADER_LEN)?;
        let options = check_options(ip.payload.get(RS_HEADER_LEN..).unwrap_or_default())?;
        if ip.src.is_unspecified() && options.has_source_link_addr {
            return Err(FrameError::Malformed {
                layer: Layer::Ndp,
                reason: "solicitation from :: with a source link-layer address",
            });
        }
        let Some((router, advert)) = self.advert.as_ref() else {
            guest_log!(
                ctx,
                GuestEvent::Ndp,
                TRACE,
                "router solicitation ignored: IPv6 or router advertisements disabled"
            );
            return Ok(());
        };
        let dst = if ip.src.is_unspecified() {
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1)
        } else {
            ip.src
        };
        let mut message = advert.clone();
        set_icmpv6_checksum(*router, dst, &mut message);
        let frame = ipv6_frame(
            ctx.reply_link(),
            *router,
            dst,
            IpNumber::IPV6_ICMP,
            NDP_HOP_LIMIT,
            &message,
        )?;
        guest_log!(
            ctx,
            GuestEvent::Ndp,
            DEBUG,
            "router solicitation from {} answered",
            ip.src
        );
        deliver(sink, &frame, "router advertisement");
        Ok(())
    }
}

fn build_router_advertisement(config: &NetConfig, v6: &V6Config) -> Vec<u8> {
    let services = config.services;
    let flags = if services.dhcpv6 {
        RA_FLAG_MANAGED | RA_FLAG_OTHER
    } else {
        0
    };
    let mut message = vec![
        TYPE_ROUTER_ADVERTISEMENT,
        0,
        0,
        0,
        ADVERTISED_HOP_LIMIT,
        flags,
    ];
    message.extend_from_slice(&ROUTER_LIFETIME.to_be_bytes());
    message.extend_from_slice(&0u32.to_be_bytes()); // reachable time: unspecified
    message.extend_from_slice(&0u32.to_be_bytes()); // retransmission timer: unspecified

    // Prefix information (RFC 4861 section 4.6.2).
    if v6.has_global_addr() {
        message.extend_from_slice(&[
            OPTION_PREFIX_INFO,
            4,
            SLAAC_PREFIX_LEN,
            PREFIX_FLAG_ON_LINK | PREFIX_FLAG_AUTONOMOUS,
        ]);
        message.extend_from_slice(&INFINITE_LIFETIME.to_be_bytes()); // valid
        message.extend_from_slice(&INFINITE_LIFETIME.to_be_bytes()); // preferred
        message.extend_from_slice(&[0; 4]);
        message.extend_from_slice(&prefix_of(v6.addr, SLAAC_PREFIX_LEN).octets());
    }

    if config.mtu >= IPV6_MIN_MTU {
        message.extend_from_slice(&[OPTION_MTU, 1, 0, 0]);
        message.extend_from_slice(&u32::from(config.mtu).to_be_bytes());
    }

    // RDNSS (RFC 8106 section 5.1): length 1 + 2 per address, at most 255 units.
    let servers: Vec<Ipv6Addr> = if services.advertise_dns {
        v6.dns.iter().copied().take(127).collect()
    } else {
        Vec::new()
    };
    if !servers.is_empty() {
        let units = 1 + 2 * servers.len();
        // At most 127 servers: units <= 255.
        message.extend_from_slice(&[OPTION_RDNSS, units as u8, 0, 0]);
        message.extend_from_slice(&INFINITE_LIFETIME.to_be_bytes());
        for server in &servers {
            message.extend_from_slice(&server.octets());
        }
    }

    // DNSSL (RFC 8106 section 5.2): names in wire format, zero-padded to 8 bytes.
    let mut names = Vec::new();
    let search = if services.advertise_search {
        config.dns_search.as_slice()
    } else {
        &[]
    };
    for domain in search {
        match dns_wire_name(domain) {
            Some(wire) if names.len() + wire.len() <= 254 * 8 - 8 => names.extend(wire),
            Some(_) => {
                tracing::warn!("DNS search list too long for an RA; {domain:?} and later omitted")
            }
            None => {
                tracing::warn!("DNS search domain {domain:?} is not a valid name; not advertised")
            }
        }
    }
    if !names.is_empty() {
        let len = (8 + names.len()).div_ceil(8) * 8;
        // The names were capped above: len / 8 <= 254.
        message.extend_from_slice(&[OPTION_DNSSL, (len / 8) as u8, 0, 0]);
        message.extend_from_slice(&INFINITE_LIFETIME.to_be_bytes());
        names.resize(len - 8, 0);
        message.extend_from_slice(&names);
    }

    message.extend_from_slice(&[OPTION_SOURCE_LINK_ADDR, 1]);
    message.extend_from_slice(&config.our_mac);
    message
}

/// Whether `addr` is a solicited-node multicast address (ff02::1:ffXX:XXXX).
fn is_solicited_node_multicast(addr: Ipv6Addr) -> bool {
    let octets = addr.octets();
    octets[..13] == [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff]
}

/// Answer a neighbour solicitation (RFC 4861 section 7.2.4) unless it concerns one of
/// the guest's own addresses or is a duplicate address detection probe.
pub(crate) fn handle_neighbor_solicitation(
    ctx: &ReplyContext<'_>,
    ip: &Ipv6Packet<'_>,
    sink: &mut dyn FrameSink,
) -> Result<(), FrameError> {
    const NS_LEN: usize = 24;
    if !ctx.config.services.ndp {
        guest_log!(
            ctx,
            GuestEvent::Ndp,
            TRACE,
            "neighbour solicitation ignored: NDP is disabled"
        );
        return Ok(());
    }
    check_ndp_header(ip, NS_LEN)?;
    let target_bytes: [u8; 16] = ip
        .payload
        .get(8..NS_LEN)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(FrameError::TooShort {
            layer: Layer::Ndp,
            len: ip.payload.len(),
            needed: NS_LEN,
        })?;
    let target = Ipv6Addr::from(target_bytes);
    if target.is_multicast() {
        return Err(FrameError::Malformed {
            layer: Layer::Ndp,
            reason: "solicitation for a multicast target",
        });
    }
    let options = check_options(ip.payload.get(NS_LEN..).unwrap_or_default())?;
    if ip.src.is_unspecified() {
        if !is_solicited_node_multicast(ip.dst) || options.has_source_link_addr {
            return Err(FrameError::Malformed {
                layer: Layer::Ndp,
                reason: "solicitation from :: not sent as duplicate address detection",
            });
        }
        guest_log!(
            ctx,
            GuestEvent::Ndp,
            TRACE,
            "duplicate address detection for {target}: not answered"
        );
        return Ok(());
    }
    if ctx.config.v6.is_none() {
        guest_log!(
            ctx,
            GuestEvent::Ndp,
            TRACE,
            "neighbour solicitation ignored: IPv6 is disabled"
        );
        return Ok(());
    }
    if target == ip.src || ctx.is_guest_ipv6(target) {
        guest_log!(
            ctx,
            GuestEvent::Ndp,
            TRACE,
            "neighbour solicitation for the guest's own {target}: not answered"
        );
        return Ok(());
    }
    let mut message = vec![
        TYPE_NEIGHBOR_ADVERTISEMENT,
        0,
        0,
        0,
        NA_FLAG_ROUTER | NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE,
        0,
        0,
        0,
    ];
    message.extend_from_slice(&target.octets());
    message.extend_from_slice(&[OPTION_TARGET_LINK_ADDR, 1]);
    message.extend_from_slice(&ctx.config.our_mac);
    set_icmpv6_checksum(target, ip.src, &mut message);
    let frame = ipv6_frame(
        ctx.reply_link(),
        target,
        ip.src,
        IpNumber::IPV6_ICMP,
        NDP_HOP_LIMIT,
        &message,
    )?;
    deliver(sink, &frame, "neighbour advertisement");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{FrameError, GuestNet, Layer};
    use super::*;
    use etherparse::Icmpv6Slice;

    fn router_solicitation(with_source_link_addr: bool) -> Vec<u8> {
        let mut message = vec![TYPE_ROUTER_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
        if with_source_link_addr {
            message.extend_from_slice(&[OPTION_SOURCE_LINK_ADDR, 1]);
            message.extend_from_slice(&GUEST_MAC);
        }
        message
    }

    fn neighbor_solicitation(target: Ipv6Addr, with_source_link_addr: bool) -> Vec<u8> {
        let mut message = vec![TYPE_NEIGHBOR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0];
        message.extend_from_slice(&target.octets());
        if with_source_link_addr {
            message.extend_from_slice(&[OPTION_SOURCE_LINK_ADDR, 1]);
            message.extend_from_slice(&GUEST_MAC);
        }
        message
    }

    fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
        let o = addr.octets();
        Ipv6Addr::from([
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
        ])
    }

    fn all_routers() -> Ipv6Addr {
        "ff02::2".parse().expect("literal")
    }

    fn send(net: &mut GuestNet, frame: &[u8]) -> Result<CapturedFrames, FrameError> {
        let mut sink = CapturedFrames::default();
        net.handle_frame(frame, &mut sink).map(|()| sink)
    }

    /// Options of an NDP message as (type, body without type/length).
    fn options(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut found = Vec::new();
        while bytes.len() >= 2 {
            let len = usize::from(bytes[1]) * 8;
            assert!(len >= 8 && len <= bytes.len(), "bad option length");
            found.push((bytes[0], bytes[2..len].to_vec()));
            bytes = &bytes[len..];
        }
        assert!(bytes.is_empty());
        found
    }

    #[test]
    fn router_solicitation_gets_a_complete_advertisement() {
        let mut net = guest_net();
        let frame = guest_icmpv6(guest_ll(), all_routers(), 255, router_solicitation(true));
        let reply = send(&mut net, &frame).expect("valid RS").take_one();
        let (eth, ip) = reply_ipv6(&reply);
        assert_eq!(eth.destination(), GUEST_MAC);
        assert_eq!(ip.src, gateway_ll());
        assert_eq!(ip.dst, guest_ll());
        assert_eq!(ip.hop_limit, 255);
        assert_eq!(ip.next_header, IpNumber::IPV6_ICMP);
        let icmp = Icmpv6Slice::from_slice(ip.payload).expect("icmpv6");
        assert!(icmp.is_checksum_valid(ip.src.octets(), ip.dst.octets()));
        let ra = ip.payload;
        assert_eq!(ra[0], TYPE_ROUTER_ADVERTISEMENT);
        assert_eq!(ra[1], 0);
        assert_eq!(ra[4], 64, "current hop limit");
        assert_eq!(ra[5], RA_FLAG_MANAGED | RA_FLAG_OTHER);
        assert_eq!(u16::from_be_bytes([ra[6], ra[7]]), ROUTER_LIFETIME);
        let options = options(&ra[16..]);

        let prefix = &options
            .iter()
            .find(|(t, _)| *t == OPTION_PREFIX_INFO)
            .expect("PIO")
            .1;
        assert_eq!(prefix[0], 64, "prefix length");
        assert_eq!(prefix[1], PREFIX_FLAG_ON_LINK | PREFIX_FLAG_AUTONOMOUS);
        assert_eq!(prefix[2..6], INFINITE_LIFETIME.to_be_bytes());
        assert_eq!(prefix[6..10], INFINITE_LIFETIME.to_be_bytes());
        let advertised: [u8; 16] = prefix[14..30].try_into().expect("16 bytes");
        assert_eq!(
            Ipv6Addr::from(advertised),
            "2001:db8:1:2::".parse::<Ipv6Addr>().expect("literal")
        );

        let mtu = &options
            .iter()
            .find(|(t, _)| *t == OPTION_MTU)
            .expect("MTU")
            .1;
        assert_eq!(mtu[2..6], 65520u32.to_be_bytes());

        let rdnss = &options
            .iter()
            .find(|(t, _)| *t == OPTION_RDNSS)
            .expect("RDNSS")
            .1;
        assert_eq!(rdnss.len(), 6 + 16);
        assert_eq!(rdnss[2..6], INFINITE_LIFETIME.to_be_bytes());
        let server: [u8; 16] = rdnss[6..22].try_into().expect("16 bytes");
        assert_eq!(
            Ipv6Addr::from(server),
            "2001:db8::53".parse::<Ipv6Addr>().expect("literal")
        );

        let dnssl = &options
            .iter()
            .find(|(t, _)| *t == OPTION_DNSSL)
            .expect("DNSSL")
            .1;
        let mut expected = b"\x07example\x03com\x00\x03lab\x07example\x03org\x00".to_vec();
        expected.resize(dnssl.len() - 6, 0);
        assert_eq!(dnssl[6..], expected[..]);

        let source = &options
            .iter()
            .find(|(t, _)| *t == OPTION_SOURCE_LINK_ADDR)
            .expect("SLLA")
            .1;
        assert_eq!(source[..], OUR_MAC);
    }

    #[test]
    fn solicitation_from_unspecified_is_answered_to_all_nodes() {
        let mut net = guest_net();
        let frame = guest_icmpv6(
            Ipv6Addr::UNSPECIFIED,
            all_routers(),
            255,
            router_solicitation(false),
        );
        let reply = send(&mut net, &frame).expect("valid RS").take_one();
        let (_, ip) = reply_ipv6(&reply);
        assert_eq!(ip.dst, "ff02::1".parse::<Ipv6Addr>().expect("literal"));
        let icmp = Icmpv6Slice::from_slice(ip.payload).expect("icmpv6");
        assert!(icmp.is_checksum_valid(ip.src.octets(), ip.dst.octets()));

        // From :: with a source link-layer address option: invalid (RFC 4861 6.1.1).
        let frame = guest_icmpv6(
            Ipv6Addr::UNSPECIFIED,
            all_routers(),
            255,
            router_solicitation(true),
        );
        assert!(matches!(
            send(&mut net, &frame),
            Err(FrameError::Malformed {
                layer: Layer::Ndp,
                ..
            })
        ));
    }

    #[test]
    fn switches_shape_the_advertisement() {
        // No DHCPv6: no M/O flags. No DNS/search advertising: no RDNSS/DNSSL. Local
        // mode (no global address): no prefix information.
        let mut config = config();
        config.services.dhcpv6 = false;
        config.services.advertise_dns = false;
        config.services.advertise_search = false;
        if let Some(v6) = config.v6.as_mut() {
            v6.addr = Ipv6Addr::UNSPECIFIED;
        }
        let mut net = GuestNet::new(std::sync::Arc::new(config)).expect("new");
        let frame = guest_icmpv6(guest_ll(), all_routers(), 255, router_solicitation(true));
        let reply = send(&mut net, &frame).expect("valid RS").take_one();
        let (_, ip) = reply_ipv6(&reply);
        assert_eq!(ip.payload[5], 0, "no M/O flags");
        let types: Vec<u8> = options(&ip.payload[16..]).iter().map(|(t, _)| *t).collect();
        assert_eq!(types, [OPTION_MTU, OPTION_SOURCE_LINK_ADDR]);
    }

    #[test]
    fn disabled_ndp_or_ra_answers_nothing() {
        let mut config = config();
        config.services.router_advertisements = false;
        let mut net = GuestNet::new(std::sync::Arc::new(config.clone())).expect("new");
        let rs = guest_icmpv6(guest_ll(), all_routers(), 255, router_solicitation(true));
        assert!(send(&mut net, &rs).expect("valid RS").0.is_empty());
        let ns = guest_icmpv6(
            guest_ll(),
            gateway_ll(),
            255,
            neighbor_solicitation(gateway_ll(), true),
        );
        assert_eq!(send(&mut net, &ns).expect("valid NS").0.len(), 1);

        config.services.ndp = false;
        let mut net = GuestNet::new(std::sync::Arc::new(config)).expect("new");
        assert!(send(&mut net, &rs).expect("ignored").0.is_empty());
        assert!(send(&mut net, &ns).expect("ignored").0.is_empty());
    }

    #[test]
    fn ndp_requires_hop_limit_255_and_valid_checksum() {
        let mut net = guest_net();
        let frame = guest_icmpv6(guest_ll(), all_routers(), 64, router_solicitation(true));
        assert_eq!(
            send(&mut net, &frame).err(),
            Some(FrameError::NdpHopLimit { hop_limit: 64 })
        );
        let mut frame = guest_icmpv6(guest_ll(), all_routers(), 255, router_solicitation(true));
        let last = frame.len() - 1;
        frame[last] ^= 0x10;
        assert_eq!(
            send(&mut net, &frame).err(),
            Some(FrameError::BadChecksum {
                layer: Layer::Icmpv6
            })
        );
        let frame = guest_icmpv6(
            guest_ll(),
            gateway_ll(),
            64,
            neighbor_solicitation(gateway_ll(), true),
        );
        assert_eq!(
            send(&mut net, &frame).err(),
            Some(FrameError::NdpHopLimit { hop_limit: 64 })
        );
    }

    #[test]
    fn zero_length_option_is_rejected() {
        let mut net = guest_net();
        let mut message = router_solicitation(false);
        message.extend_from_slice(&[OPTION_SOURCE_LINK_ADDR, 0, 0, 0, 0, 0, 0, 0]);
        let frame = guest_icmpv6(guest_ll(), all_routers(), 255, message);
        assert!(matches!(
            send(&mut net, &frame),
            Err(FrameError::Malformed {
                layer: Layer::Ndp,
                ..
            })
        ));
    }

    fn assert_neighbor_advertisement(reply: &[u8], target: Ipv6Addr) {
        let (eth, ip) = reply_ipv6(reply);
        assert_eq!(eth.destination(), GUEST_MAC);
        assert_eq!(ip.src, target);
        assert_eq!(ip.dst, guest_ll());
        assert_eq!(ip.hop_limit, 255);
        let icmp = Icmpv6Slice::from_slice(ip.payload).expect("icmpv6");
        assert!(icmp.is_checksum_valid(ip.src.octets(), ip.dst.octets()));
        let na = ip.payload;
        assert_eq!(na[0], TYPE_NEIGHBOR_ADVERTISEMENT);
        assert_eq!(na[4], NA_FLAG_ROUTER | NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE);
        let advertised: [u8; 16] = na[8..24].try_into().expect("16 bytes");
        assert_eq!(Ipv6Addr::from(advertised), target);
        assert_eq!(
            options(&na[24..]),
            vec![(OPTION_TARGET_LINK_ADDR, OUR_MAC.to_vec())]
        );
    }

    #[test]
    fn neighbor_solicitation_for_gateway_and_others_is_answered() {
        let mut net = guest_net();
        let targets: [Ipv6Addr; 3] = [
            gateway_ll(),
            "2001:db8:1:2::99".parse().expect("literal"),
            "fe80::77".parse().expect("literal"),
        ];
        for target in targets {
            let frame = guest_icmpv6(
                guest_ll(),
                solicited_node(target),
                255,
                neighbor_solicitation(target, true),
            );
            let reply = send(&mut net, &frame).expect("valid NS").take_one();
            assert_neighbor_advertisement(&reply, target);
        }
        // Unicast neighbour unreachability detection probe (no options).
        let frame = guest_icmpv6(
            guest_ll(),
            gateway_ll(),
            255,
            neighbor_solicitation(gateway_ll(), false),
        );
        let reply = send(&mut net, &frame).expect("valid NS").take_one();
        assert_neighbor_advertisement(&reply, gateway_ll());
    }

    #[test]
    fn no_advertisement_for_guest_addresses_or_dad() {
        let mut net = guest_net();
        // Duplicate address detection for the guest's link-local and global address.
        for target in [guest_ll(), guest_v6(), gateway_ll()] {
            let frame = guest_icmpv6(
                Ipv6Addr::UNSPECIFIED,
                solicited_node(target),
                255,
                neighbor_solicitation(target, false),
            );
            assert!(send(&mut net, &frame).expect("valid DAD").0.is_empty());
        }
        // The guest resolving its configured address.
        let frame = guest_icmpv6(
            guest_ll(),
            solicited_node(guest_v6()),
            255,
            neighbor_solicitation(guest_v6(), true),
        );
        assert!(send(&mut net, &frame).expect("valid NS").0.is_empty());
        // An address the guest was seen using (e.g. a privacy address).
        let privacy: Ipv6Addr = "2001:db8:1:2:abcd::1".parse().expect("literal");
        let frame = guest_udp6(
            privacy,
            "2001:db8::1".parse().expect("literal"),
            (1, 2),
            b"",
        );
        let _ = net.handle_frame(&frame, &mut CapturedFrames::default());
        let frame = guest_icmpv6(
            guest_ll(),
            solicited_node(privacy),
            255,
            neighbor_solicitation(privacy, true),
        );
        assert!(send(&mut net, &frame).expect("valid NS").0.is_empty());
        // DAD with a source link-layer address option, or not to a solicited-node
        // address: invalid.
        let frame = guest_icmpv6(
            Ipv6Addr::UNSPECIFIED,
            solicited_node(guest_ll()),
            255,
            neighbor_solicitation(guest_ll(), true),
        );
        assert!(send(&mut net, &frame).is_err());
    }

    #[test]
    fn multicast_target_is_rejected() {
        let mut net = guest_net();
        let target: Ipv6Addr = "ff02::1".parse().expect("literal");
        let frame = guest_icmpv6(
            guest_ll(),
            solicited_node(gateway_ll()),
            255,
            neighbor_solicitation(target, false),
        );
        assert!(matches!(
            send(&mut net, &frame),
            Err(FrameError::Malformed {
                layer: Layer::Ndp,
                ..
            })
        ));
    }

    #[test]
    fn truncated_ndp_is_rejected() {
        let mut net = guest_net();
        let frame = guest_icmpv6(guest_ll(), all_routers(), 255, router_solicitation(true));
        assert_truncations_rejected(&mut net, &frame);
        let frame = guest_icmpv6(
            guest_ll(),
            gateway_ll(),
            255,
            neighbor_solicitation(gateway_ll(), true),
        );
        assert_truncations_rejected(&mut net, &frame);
        // Consistent lengths, but an NS body shorter than 24 bytes.
        let frame = guest_icmpv6(
            guest_ll(),
            gateway_ll(),
            255,
            vec![TYPE_NEIGHBOR_SOLICITATION, 0, 0, 0, 0, 0, 0, 0, 1, 2],
        );
        assert!(matches!(
            send(&mut net, &frame),
            Err(FrameError::TooShort {
                layer: Layer::Ndp,
                ..
            })
        ));
    }

    #[test]
    fn dns_names_in_wire_format() {
        assert_eq!(dns_wire_name("a.bc."), Some(b"\x01a\x02bc\x00".to_vec()));
        assert_eq!(dns_wire_name("a..b"), None);
        assert_eq!(dns_wire_name(&"x".repeat(64)), None);
    }
}
