//! DHCPv4 server for the one guest: hands it the configured address.
//!
//! Theory of operation: there is exactly one client and one lease (the configured
//! IPv4 address), so there is no lease table and no state between messages. The
//! server identifies itself with the gateway address and answers:
//!
//! ```text
//!   DISCOVER ─▶ OFFER  (yiaddr = configured address)
//!   REQUEST  ─▶ ACK    (or NAK when the requested address / ciaddr is another one;
//!                       silence when the client chose another server)
//!   INFORM   ─▶ ACK    (configuration only: no yiaddr, no lease time)
//!   RELEASE, DECLINE ─▶ nothing to free: logged and ignored
//! ```
//!
//! Every positive answer carries: subnet mask, router (the gateway), DNS servers and
//! domain search list (option 119) unless their advertising is turned off, interface
//! MTU (option 26, only when not 1500), host name (option 12, `-H`) and FQDN (option 81,
//! `--fqdn`) when configured, and an infinite lease (the address never changes while
//! baton runs). With `services.dhcp` off the dispatcher hands port 67 traffic to the
//! UDP flows instead. Answers come from
//! the gateway address, UDP 67 → 68, and go to the client's hardware address; the IP
//! destination follows RFC 2131 section 4.1: `ciaddr` when the client has one, the
//! broadcast address when the client set the BROADCAST flag (or for a NAK), otherwise
//! the offered address. Relayed requests (giaddr set) and requests from ports other
//! than 68 are not ours to answer.
//!
//! Untrusted input: only the options the server reads (message type, requested
//! address, server identifier, parameter request list, maximum message size, client
//! identifier) are passed on to dhcproto; the rest are skipped by a bounds-checked walk.

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::fqdn::{ClientFQDN, FqdnFlags};
use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder, Name};

use super::frame::{udp4_frame, LinkEnds};
use super::{deliver, FrameError, FrameSink, GuestEvent, Layer, ReplyContext, UdpDatagram};
use crate::config::{MacAddr, NetConfig, V4Config};

/// UDP port of the DHCP server.
pub(crate) const SERVER_PORT: u16 = 67;
/// UDP port of the DHCP client.
pub(crate) const CLIENT_PORT: u16 = 68;

/// Offset of the magic cookie in a BOOTP/DHCP message (after the fixed fields).
const MAGIC_COOKIE_OFFSET: usize = 236;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Lease time meaning "infinite" (RFC 2131 section 3.3).
pub(crate) const INFINITE_LEASE: u32 = u32::MAX;
/// Minimum BOOTP message length (RFC 1542 section 2.1); some clients drop shorter ones.
const MIN_MESSAGE_LEN: usize = 300;
/// The MTU every Ethernet client assumes; option 26 is sent only for other values.
const ETHERNET_MTU: u16 = 1500;

/// What kind of answer a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Offer,
    Ack,
    /// ACK to an INFORM: configuration only.
    InformAck,
    Nak,
}

/// The DHCPv4 server. Holds only what is derived once from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct DhcpServer {
    /// The domain search list as DNS names (invalid entries dropped at start-up; empty
    /// when search list advertising is off).
    search_list: Vec<Name>,
    /// Option 81 (`--fqdn`), as a DNS name.
    fqdn: Option<Name>,
}

/// `domain` as a fully qualified DNS name; `None` (and a warning naming `what`) if it
/// is not a valid name.
pub(crate) fn dns_name(domain: &str, what: &str) -> Option<Name> {
    match Name::from_ascii(domain) {
        Ok(mut name) => {
            name.set_fqdn(true);
            Some(name)
        }
        Err(err) => {
            tracing::warn!("{what} {domain:?} is not a valid DNS name ({err}); not advertised");
            None
        }
    }
}

/// The configured search domains to advertise (none when `advertise_search` is off),
/// skipping invalid ones with a warning.
pub(crate) fn search_domain_names(config: &NetConfig) -> Vec<Name> {
    if !config.services.advertise_search {
        return Vec::new();
    }
    config
        .dns_search
        .iter()
        .filter_map(|domain| dns_name(domain, "DNS search domain"))
        .collect()
}

/// The netmask for `prefix_len` (values above 32 count as 32).
pub(crate) fn netmask(prefix_len: u8) -> Ipv4Addr {
    let host_bits = 32 - u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(host_bits).unwrap_or(0))
}

impl DhcpServer {
    pub(crate) fn new(config: &NetConfig) -> Self {
        Self {
            search_list: search_domain_names(config),
            fqdn: config
                .fqdn
                .as_deref()
                .and_then(|fqdn| dns_name(fqdn, "--fqdn")),
        }
    }

    /// Whether a datagram to UDP port 67 at `dst` is for this server (broadcast, or
    /// unicast to the gateway, which is our server identifier) rather than for some
    /// DHCP server elsewhere.
    pub(crate) fn is_addressed_to_server(config: &NetConfig, dst: Ipv4Addr) -> bool {
        dst.is_broadcast() || config.v4.as_ref().is_some_and(|v4| dst == v4.gateway)
    }

    /// Answer one DHCP message the guest sent to UDP port 67.
    pub(crate) fn handle_dhcp(
        &self,
        ctx: &ReplyContext<'_>,
        udp: &UdpDatagram<'_>,
        sink: &mut dyn FrameSink,
    ) -> Result<(), FrameError> {
        let Some(v4) = ctx.config.v4.as_ref() else {
            guest_log!(
                ctx,
                GuestEvent::Dhcp,
                TRACE,
                "DHCP request ignored: IPv4 is disabled"
            );
            return Ok(());
        };
        if udp.src_port != CLIENT_PORT {
            guest_log!(
                ctx,
                GuestEvent::Dhcp,
                TRACE,
                "DHCP message from port {} (relay?) ignored",
                udp.src_port
            );
            return Ok(());
        }
        let request = decode_request(udp.payload)?;
        let Some(message_type) = request.opts().msg_type() else {
            return Err(FrameError::Malformed {
                layer: Layer::Dhcpv4,
                reason: "no message type option (plain BOOTP is not served)",
            });
        };
        if !request.giaddr().is_unspecified() {
            guest_log!(ctx, GuestEvent::Dhcp, TRACE, "relayed DHCP request ignored");
            return Ok(());
        }
        let answer = match message_type {
            MessageType::Discover => Answer::Offer,
            MessageType::Request => {
                if let Some(DhcpOption::ServerIdentifier(server)) =
                    request.opts().get(OptionCode::ServerIdentifier)
                {
                    if *server != v4.gateway {
                        guest_log!(
                            ctx,
                            GuestEvent::Dhcp,
                            TRACE,
                            "DHCP REQUEST for server {server} ignored"
                        );
                        return Ok(());
                    }
                }
                let requested = match request.opts().get(OptionCode::RequestedIpAddress) {
                    Some(DhcpOption::RequestedIpAddress(addr)) => Some(*addr),
                    _ => Some(request.ciaddr()).filter(|addr| !addr.is_unspecified()),
                };
                match requested {
                    Some(addr) if addr != v4.addr => {
                        guest_log!(
                            ctx,
                            GuestEvent::Dhcp,
                            DEBUG,
                            "DHCP REQUEST for {addr}, but the guest's address is {}: NAK",
                            v4.addr
                        );
                        Answer::Nak
                    }
                    _ => Answer::Ack,
                }
            }
            MessageType::Inform => Answer::InformAck,
            MessageType::Release => {
                guest_log!(
                    ctx,
                    GuestEvent::Dhcp,
                    DEBUG,
                    "guest released its DHCP lease"
                );
                return Ok(());
            }
            MessageType::Decline => {
                guest_log!(
                    ctx,
                    GuestEvent::Dhcp,
                    DEBUG,
                    "guest declined {} (it says the address is in use)",
                    v4.addr
                );
                return Ok(());
            }
            other => {
                guest_log!(
                    ctx,
                    GuestEvent::Dhcp,
                    TRACE,
                    "DHCP {other:?} from the guest ignored"
                );
                return Ok(());
            }
        };
        let reply = self.build_reply(ctx.config, v4, &request, answer);
        let mut payload = Vec::with_capacity(MIN_MESSAGE_LEN);
        reply
            .encode(&mut Encoder::new(&mut payload))
            .map_err(|_| FrameError::ReplyTooLarge("DHCP options"))?;
        if payload.len() < MIN_MESSAGE_LEN {
            payload.resize(MIN_MESSAGE_LEN, 0);
        }
        let client_mac = client_mac(&request)?;
        let dst = reply_destination(&request, v4, answer);
        let frame = udp4_frame(
            LinkEnds {
                src: ctx.config.our_mac,
                dst: client_mac,
            },
            SocketAddrV4::new(v4.gateway, SERVER_PORT),
            SocketAddrV4::new(dst, CLIENT_PORT),
            &payload,
        )?;
        guest_log!(
            ctx,
            GuestEvent::Dhcp,
            DEBUG,
            "DHCP {message_type:?} from {} answered with {answer:?} to {dst}",
            super::format_mac(client_mac)
        );
        deliver(sink, &frame, "DHCP reply");
        Ok(())
    }

    fn build_reply(
        &self,
        config: &NetConfig,
        v4: &V4Config,
        request: &Message,
        answer: Answer,
    ) -> Message {
        let mut reply = Message::default();
        reply
            .set_opcode(Opcode::BootReply)
            .set_htype(HType::Eth)
            .set_hops(0)
            .set_xid(request.xid())
            .set_secs(0)
            .set_flags(request.flags())
            .set_chaddr(request.chaddr())
            .clear_addrs();
        let message_type = match answer {
            Answer::Offer => MessageType::Offer,
            Answer::Ack | Answer::InformAck => MessageType::Ack,
            Answer::Nak => MessageType::Nak,
        };
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::MessageType(message_type));
        opts.insert(DhcpOption::ServerIdentifier(v4.gateway));
        if answer == Answer::Nak {
            return reply;
        }
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::SubnetMask(netmask(v4.prefix_len)));
        opts.insert(DhcpOption::Router(vec![v4.gateway]));
        if config.services.advertise_dns && !v4.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(v4.dns.clone()));
        }
        if !self.search_list.is_empty() {
            opts.insert(DhcpOption::DomainSearch(self.search_list.clone()));
        }
        if config.mtu != ETHERNET_MTU {
            // RFC 2132 section 5.1: at least 68.
            opts.insert(DhcpOption::InterfaceMtu(config.mtu.max(68)));
        }
        if let Some(hostname) = config.hostname.as_ref() {
            opts.insert(DhcpOption::Hostname(hostname.clone()));
        }
        if let Some(fqdn) = self.fqdn.as_ref() {
            // RFC 4702: E (canonical wire format), N (the server updates no DNS
            // records); RCODE1/2 255.
            let flags = FqdnFlags::default().set_e(true).set_n(true);
            opts.insert(DhcpOption::ClientFQDN(ClientFQDN::new(flags, fqdn.clone())));
        }
        if answer != Answer::InformAck {
            opts.insert(DhcpOption::AddressLeaseTime(INFINITE_LEASE));
        }
        match answer {
            Answer::Offer => {
                reply.set_yiaddr(v4.addr);
            }
            Answer::Ack => {
                reply.set_yiaddr(v4.addr).set_ciaddr(request.ciaddr());
            }
            Answer::InformAck => {
                reply.set_ciaddr(request.ciaddr());
            }
            Answer::Nak => {}
        }
        reply
    }
}

/// Decode and sanity-check a client message: magic cookie, BOOTREQUEST, Ethernet
/// hardware address.
fn decode_request(payload: &[u8]) -> Result<Message, FrameError> {
    let needed = MAGIC_COOKIE_OFFSET + MAGIC_COOKIE.len();
    let Some(cookie) = payload.get(MAGIC_COOKIE_OFFSET..needed) else {
        return Err(FrameError::TooShort {
            layer: Layer::Dhcpv4,
            len: payload.len(),
            needed,
        });
    };
    if cookie != MAGIC_COOKIE {
        return Err(FrameError::Malformed {
            layer: Layer::Dhcpv4,
            reason: "no DHCP magic cookie",
        });
    }
    let sanitized = copy_allowed_options(payload)?;
    let message =
        Message::decode(&mut Decoder::new(&sanitized)).map_err(|_| FrameError::Malformed {
            layer: Layer::Dhcpv4,
            reason: "undecodable options",
        })?;
    if message.opcode() != Opcode::BootRequest {
        return Err(FrameError::Malformed {
            layer: Layer::Dhcpv4,
            reason: "not a BOOTREQUEST",
        });
    }
    // Checked before anything calls `chaddr()`, which slices by the untrusted hlen.
    if message.htype() != HType::Eth || message.hlen() != 6 {
        return Err(FrameError::Malformed {
            layer: Layer::Dhcpv4,
            reason: "hardware address is not Ethernet",
        });
    }
    Ok(message)
}

/// Options the server reads: message type, requested address, server identifier,
/// parameter request list, maximum message size, client identifier.
const ALLOWED_OPTIONS: [u8; 6] = [53, 50, 54, 55, 57, 61];
const OPTION_PAD: u8 = 0;
const OPTION_END: u8 = 255;

/// The fixed fields and cookie of `payload` followed by only the allowed options and an
/// End option. dhcproto then never sees the options the server ignores (some of which
/// it decodes with length arithmetic that assumes well-formed input).
fn copy_allowed_options(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let fixed_len = MAGIC_COOKIE_OFFSET + MAGIC_COOKIE.len();
    let (Some(fixed), Some(mut options)) = (payload.get(..fixed_len), payload.get(fixed_len..))
    else {
        return Err(FrameError::TooShort {
            layer: Layer::Dhcpv4,
            len: payload.len(),
            needed: fixed_len,
        });
    };
    let mut sanitized = fixed.to_vec();
    while let Some((&code, rest)) = options.split_first() {
        match code {
            OPTION_PAD => {
                options = rest;
                continue;
            }
            OPTION_END => break,
            _ => {}
        }
        let Some((&len_byte, rest)) = rest.split_first() else {
            return Err(FrameError::TooShort {
                layer: Layer::Dhcpv4,
                len: options.len(),
                needed: 2,
            });
        };
        let len = usize::from(len_byte);
        let Some(body) = rest.get(..len) else {
            return Err(FrameError::TooShort {
                layer: Layer::Dhcpv4,
                len: options.len(),
                needed: 2 + len,
            });
        };
        if ALLOWED_OPTIONS.contains(&code) {
            sanitized.extend_from_slice(&[code, len_byte]);
            sanitized.extend_from_slice(body);
        }
        options = rest.get(len..).unwrap_or_default();
    }
    sanitized.push(OPTION_END);
    Ok(sanitized)
}

/// The client's MAC from `chaddr` (the request was checked to have hlen 6).
fn client_mac(request: &Message) -> Result<MacAddr, FrameError> {
    request
        .chaddr()
        .get(..6)
        .and_then(|mac| MacAddr::try_from(mac).ok())
        .ok_or(FrameError::Malformed {
            layer: Layer::Dhcpv4,
            reason: "hardware address is not Ethernet",
        })
}

/// RFC 2131 section 4.1 (giaddr is always zero here).
fn reply_destination(request: &Message, v4: &V4Config, answer: Answer) -> Ipv4Addr {
    if answer == Answer::Nak {
        Ipv4Addr::BROADCAST
    } else if !request.ciaddr().is_unspecified() {
        request.ciaddr()
    } else if request.flags().broadcast() {
        Ipv4Addr::BROADCAST
    } else {
        v4.addr
    }
}

/// `Flags` with the BROADCAST bit as given.
#[cfg(test)]
fn flags(broadcast: bool) -> dhcproto::v4::Flags {
    use dhcproto::v4::Flags;
    if broadcast {
        Flags::default().set_broadcast()
    } else {
        Flags::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{GuestNet, Layer};
    use super::*;
    use std::sync::Arc;

    fn client_message(message_type: MessageType, broadcast: bool) -> Message {
        let mut message = Message::new_with_id(
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &GUEST_MAC,
        );
        message.set_flags(flags(broadcast));
        message
            .opts_mut()
            .insert(DhcpOption::MessageType(message_type));
        message
            .opts_mut()
            .insert(DhcpOption::ParameterRequestList(vec![
                OptionCode::SubnetMask,
                OptionCode::Router,
                OptionCode::DomainNameServer,
                OptionCode::DomainSearch,
                OptionCode::InterfaceMtu,
            ]));
        message
    }

    fn frame_for(message: &Message, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut payload = Vec::new();
        message
            .encode(&mut Encoder::new(&mut payload))
            .expect("encode");
        guest_udp4(src, dst, (CLIENT_PORT, SERVER_PORT), &payload)
    }

    fn exchange(net: &mut GuestNet, message: &Message) -> Option<(Vec<u8>, Message)> {
        exchange_from(net, message, Ipv4Addr::UNSPECIFIED)
    }

    fn exchange_from(
        net: &mut GuestNet,
        message: &Message,
        src: Ipv4Addr,
    ) -> Option<(Vec<u8>, Message)> {
        let dst = if src.is_unspecified() {
            Ipv4Addr::BROADCAST
        } else {
            gateway_v4()
        };
        let frame = frame_for(message, src, dst);
        let mut sink = CapturedFrames::default();
        net.handle_frame(&frame, &mut sink).expect("valid DHCP");
        if sink.0.is_empty() {
            return None;
        }
        let reply_frame = sink.take_one();
        let (eth, ip) = reply_ipv4(&reply_frame);
        assert_eq!(eth.destination(), GUEST_MAC);
        assert_eq!(ip.src, gateway_v4());
        let udp = super::super::parse_udp_v4(&ip).expect("valid UDP");
        assert_eq!((udp.src_port, udp.dst_port), (SERVER_PORT, CLIENT_PORT));
        assert!(udp.payload.len() >= MIN_MESSAGE_LEN);
        let reply = Message::decode(&mut Decoder::new(udp.payload)).expect("decodable reply");
        Some((ip.dst.octets().to_vec(), reply))
    }

    fn assert_full_configuration(reply: &Message, mtu: Option<u16>) {
        let opts = reply.opts();
        assert_eq!(
            opts.get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(gateway_v4()))
        );
        assert_eq!(
            opts.get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            opts.get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![gateway_v4()]))
        );
        assert_eq!(
            opts.get(OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![
                Ipv4Addr::new(192, 168, 10, 53),
                Ipv4Addr::new(9, 9, 9, 9)
            ]))
        );
        match opts.get(OptionCode::DomainSearch) {
            Some(DhcpOption::DomainSearch(names)) => {
                let names: Vec<String> = names.iter().map(|n| n.to_ascii()).collect();
                assert_eq!(names, ["example.com.", "lab.example.org."]);
            }
            other => panic!("no domain search option: {other:?}"),
        }
        match mtu {
            Some(mtu) => assert_eq!(
                opts.get(OptionCode::InterfaceMtu),
                Some(&DhcpOption::InterfaceMtu(mtu))
            ),
            None => assert_eq!(opts.get(OptionCode::InterfaceMtu), None),
        }
    }

    #[test]
    fn discover_offer_request_ack() {
        let mut net = guest_net();
        let discover = client_message(MessageType::Discover, false);
        let (dst, offer) = exchange(&mut net, &discover).expect("an OFFER");
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.opcode(), Opcode::BootReply);
        assert_eq!(offer.xid(), 0x1234_5678);
        assert_eq!(offer.chaddr(), GUEST_MAC);
        assert_eq!(offer.yiaddr(), guest_v4());
        assert_eq!(offer.ciaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(offer.giaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(!offer.flags().broadcast());
        // Unicast to the offered address (no BROADCAST flag).
        assert_eq!(dst, guest_v4().octets());
        assert_full_configuration(&offer, Some(65520));
        assert_eq!(
            offer.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(INFINITE_LEASE))
        );

        let mut request = client_message(MessageType::Request, false);
        request
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(guest_v4()));
        request
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(gateway_v4()));
        let (dst, ack) = exchange(&mut net, &request).expect("an ACK");
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), guest_v4());
        assert_eq!(ack.xid(), 0x1234_5678);
        assert_eq!(dst, guest_v4().octets());
        assert_full_configuration(&ack, Some(65520));
        assert_eq!(
            ack.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(INFINITE_LEASE))
        );
    }

    #[test]
    fn broadcast_flag_gets_a_broadcast_reply_to_the_guest_mac() {
        let mut net = guest_net();
        let discover = client_message(MessageType::Discover, true);
        let (dst, offer) = exchange(&mut net, &discover).expect("an OFFER");
        assert_eq!(dst, Ipv4Addr::BROADCAST.octets());
        assert!(offer.flags().broadcast());
    }

    #[test]
    fn request_for_another_address_is_nakked() {
        let mut net = guest_net();
        let mut request = client_message(MessageType::Request, false);
        request
            .opts_mut()
            .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 5)));
        let (dst, nak) = exchange(&mut net, &request).expect("a NAK");
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(dst, Ipv4Addr::BROADCAST.octets());
        assert_eq!(nak.opts().get(OptionCode::AddressLeaseTime), None);
        assert_eq!(nak.opts().get(OptionCode::Router), None);

        // Renewing with a wrong ciaddr: NAK too.
        let mut renew = client_message(MessageType::Request, false);
        renew.set_ciaddr(Ipv4Addr::new(10, 0, 0, 5));
        let (_, nak) = exchange_from(&mut net, &renew, Ipv4Addr::new(10, 0, 0, 5)).expect("NAK");
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    }

    #[test]
    fn renewal_is_acked_unicast_to_ciaddr() {
        let mut net = guest_net();
        let mut renew = client_message(MessageType::Request, false);
        renew.set_ciaddr(guest_v4());
        let (dst, ack) = exchange_from(&mut net, &renew, guest_v4()).expect("an ACK");
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.ciaddr(), guest_v4());
        assert_eq!(ack.yiaddr(), guest_v4());
        assert_eq!(dst, guest_v4().octets());
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let mut net = guest_net();
        let mut request = client_message(MessageType::Request, false);
        request
            .opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(
                192, 168, 10, 254,
            )));
        assert!(exchange(&mut net, &request).is_none());
    }

    #[test]
    fn inform_gets_configuration_without_lease() {
        let mut net = guest_net();
        let mut inform = client_message(MessageType::Inform, false);
        inform.set_ciaddr(guest_v4());
        let (dst, ack) = exchange_from(&mut net, &inform, guest_v4()).expect("an ACK");
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(ack.ciaddr(), guest_v4());
        assert_eq!(dst, guest_v4().octets());
        assert_eq!(ack.opts().get(OptionCode::AddressLeaseTime), None);
        assert_full_configuration(&ack, Some(65520));
    }

    #[test]
    fn release_and_decline_get_no_answer() {
        let mut net = guest_net();
        for message_type in [MessageType::Release, MessageType::Decline] {
            let mut message = client_message(message_type, false);
            message.set_ciaddr(guest_v4());
            assert!(exchange_from(&mut net, &message, guest_v4()).is_none());
        }
    }

    #[test]
    fn standard_mtu_is_not_advertised() {
        let mut net = GuestNet::new(Arc::new(config_with(1500, None))).expect("new");
        let discover = client_message(MessageType::Discover, false);
        let (_, offer) = exchange(&mut net, &discover).expect("an OFFER");
        assert_full_configuration(&offer, None);
    }

    #[test]
    fn malformed_dhcp_is_rejected() {
        let mut net = guest_net();
        let discover = client_message(MessageType::Discover, false);
        let frame = frame_for(&discover, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
        assert_truncations_rejected(&mut net, &frame);

        let mut payload = Vec::new();
        discover
            .encode(&mut Encoder::new(&mut payload))
            .expect("encode");
        let send = |net: &mut GuestNet, payload: &[u8]| {
            let frame = guest_udp4(
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                (CLIENT_PORT, SERVER_PORT),
                payload,
            );
            let mut sink = CapturedFrames::default();
            let result = net.handle_frame(&frame, &mut sink);
            // An answer only ever comes with Ok.
            assert!(result.is_ok() || sink.0.is_empty());
            result
        };
        let mut bad_cookie = payload.clone();
        bad_cookie[MAGIC_COOKIE_OFFSET] = 0;
        assert_eq!(
            send(&mut net, &bad_cookie),
            Err(FrameError::Malformed {
                layer: Layer::Dhcpv4,
                reason: "no DHCP magic cookie"
            })
        );
        let mut reply_op = payload.clone();
        reply_op[0] = 2;
        assert!(send(&mut net, &reply_op).is_err());
        let mut long_hlen = payload.clone();
        long_hlen[2] = 200;
        assert!(send(&mut net, &long_hlen).is_err());
        // Every cut of the DHCP payload itself (UDP/IP lengths consistent).
        for len in 0..payload.len() {
            let _ = send(&mut net, &payload[..len]);
        }
        // An option claiming more bytes than there are.
        let mut overlong_option = payload.clone();
        let end = overlong_option.len() - 1;
        overlong_option[end] = 12; // host name option ...
        overlong_option.push(200); // ... of 200 bytes, none present
        assert!(matches!(
            send(&mut net, &overlong_option),
            Err(FrameError::TooShort {
                layer: Layer::Dhcpv4,
                ..
            })
        ));
        // Options dhcproto would mis-handle (client FQDN shorter than its 3 fixed
        // bytes, a bulk lease query status code with length 0) are skipped.
        let mut exotic = payload.clone();
        let end = exotic.len() - 1;
        exotic.truncate(end);
        exotic.extend_from_slice(&[81, 1, 0, 151, 0, 255]);
        assert_eq!(send(&mut net, &exotic), Ok(()));
    }

    #[test]
    fn hostname_fqdn_and_switches() {
        let mut config = config_with(1500, None);
        config.hostname = Some("guest1".into());
        config.fqdn = Some("guest1.example.com".into());
        config.services.advertise_dns = false;
        config.services.advertise_search = false;
        let mut net = GuestNet::new(Arc::new(config)).expect("new");
        let (_, offer) =
            exchange(&mut net, &client_message(MessageType::Discover, false)).expect("OFFER");
        let opts = offer.opts();
        assert_eq!(
            opts.get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("guest1".into()))
        );
        match opts.get(OptionCode::ClientFQDN) {
            Some(DhcpOption::ClientFQDN(fqdn)) => {
                assert_eq!(fqdn.domain().to_ascii(), "guest1.example.com.");
                assert!(fqdn.flags().e() && fqdn.flags().n() && !fqdn.flags().s());
            }
            other => panic!("no FQDN option: {other:?}"),
        }
        assert_eq!(opts.get(OptionCode::DomainNameServer), None);
        assert_eq!(opts.get(OptionCode::DomainSearch), None);
        assert_eq!(opts.get(OptionCode::InterfaceMtu), None);
    }

    #[test]
    fn disabled_dhcp_leaves_port_67_to_the_udp_flows() {
        let mut config = config();
        config.services.dhcp = false;
        let mut net = GuestNet::new(Arc::new(config)).expect("new");
        let frame = frame_for(
            &client_message(MessageType::Discover, false),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
        );
        assert_eq!(
            net.handle_frame(&frame, &mut CapturedFrames::default()),
            Err(super::super::FrameError::Unhandled(
                super::super::UnhandledTraffic::Udp { dst_port: 67 }
            ))
        );
    }

    #[test]
    fn netmask_from_prefix() {
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(netmask(99), Ipv4Addr::BROADCAST);
    }
}
