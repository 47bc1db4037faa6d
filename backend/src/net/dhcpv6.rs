//! DHCPv6 server (RFC 8415) for the one guest: the configured address and DNS.
//!
//! Theory of operation: like the DHCPv4 server, there is one client and one binding (the
//! configured IPv6 address), so no state is kept between messages. Router
//! advertisements set the M and O flags, so the guest asks here for its address and
//! its DNS configuration. The server identifies itself with a DUID-LL built from
//! `our_mac` and answers from the router's link-local address (see
//! `ndp::router_link_local`) to the client's source address, UDP 547 → 546:
//!
//! ```text
//!   SOLICIT             ─▶ ADVERTISE (preference 255), or REPLY with Rapid Commit
//!                          when the client asked for it
//!   REQUEST/RENEW/REBIND ─▶ REPLY with the address in every IA_NA the client sent
//!   CONFIRM             ─▶ REPLY Success, or NotOnLink for addresses off our /64
//!   INFORMATION-REQUEST ─▶ REPLY with DNS servers and domain list only
//!   RELEASE/DECLINE     ─▶ REPLY Success (nothing to free)
//! ```
//!
//! Every answer carries the client's identifier, our DUID, DNS recursive name servers
//! (option 23) and the domain search list (option 24) unless their advertising is
//! turned off, and the client FQDN (option 39) when `--fqdn` is set. With
//! `services.dhcpv6` off the dispatcher hands port 547 traffic to the UDP flows
//! instead; without a global address (local mode) no IA_NA is answered. Addresses are handed out with
//! infinite lifetimes and T1/T2 (they never change while baton runs); an address the
//! client asks for that is not ours is returned with zero lifetimes, which tells the
//! client to drop it.
//!
//! Untrusted input: before dhcproto decodes a message, the options are copied through
//! an allow-list (client and server identifier, IA_NA with its IA addresses, option
//! request, elapsed time, rapid commit) with a fixed nesting depth, and fixed-size
//! options are normalised to their size (dhcproto reads some of them without looking
//! at the length field, which would misalign the rest). The server reads nothing else,
//! and this keeps arbitrary nesting and dhcproto's length arithmetic on exotic options
//! (`len - 4` on a vendor option shorter than 4 bytes panics in debug builds) away from
//! guest bytes.

use std::net::{Ipv6Addr, SocketAddrV6};

use dhcproto::v6::{
    DhcpOption, DhcpOptions, IAAddr, Message, MessageType, OptionCode, Status, StatusCode,
    UnknownOption, IANA,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder, Name};

use super::frame::udp6_frame;
use super::ndp::{prefix_of, router_link_local, SLAAC_PREFIX_LEN};
use super::{
    deliver, FrameError, FrameSink, GuestEvent, Ipv6Packet, Layer, ReplyContext, UdpDatagram,
};
use crate::config::{MacAddr, NetConfig, V6Config};

/// UDP port of DHCPv6 servers and relay agents.
pub(crate) const SERVER_PORT: u16 = 547;
/// UDP port of DHCPv6 clients.
pub(crate) const CLIENT_PORT: u16 = 546;
/// Lifetimes and T1/T2 meaning "infinity".
pub(crate) const INFINITE: u32 = u32::MAX;
/// IA_NAs answered per message (a client normally sends one).
const MAX_IA_NA: usize = 8;

const OPTION_CLIENT_ID: u16 = 1;
const OPTION_SERVER_ID: u16 = 2;
const OPTION_IA_NA: u16 = 3;
const OPTION_IA_ADDR: u16 = 5;
const OPTION_ORO: u16 = 6;
const OPTION_ELAPSED_TIME: u16 = 8;
const OPTION_RAPID_COMMIT: u16 = 14;
/// RFC 4704 section 4.1, the N bit.
const FQDN_FLAG_NO_UPDATES: u8 = 0x04;
/// Fixed part of IA_NA (IAID, T1, T2) and IA Address (address, lifetimes).
const IA_NA_FIXED_LEN: usize = 12;
const IA_ADDR_FIXED_LEN: usize = 24;

/// All_DHCP_Relay_Agents_and_Servers (RFC 8415 section 7.1).
pub(crate) fn all_dhcp_servers() -> Ipv6Addr {
    Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2)
}

/// DUID-LL (RFC 8415 section 11.4): type 3, hardware type 1 (Ethernet), the MAC.
pub(crate) fn duid_ll(mac: MacAddr) -> Vec<u8> {
    let mut duid = vec![0, 3, 0, 1];
    duid.extend_from_slice(&mac);
    duid
}

/// The DHCPv6 server. Holds only what is derived once from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Dhcpv6Server {
    server_duid: Vec<u8>,
    search_list: Vec<Name>,
    /// Client FQDN option body (RFC 4704: flags, wire-format name) for `--fqdn`.
    fqdn_option: Option<Vec<u8>>,
    /// Source of our answers; `None` when IPv6 is disabled.
    router: Option<Ipv6Addr>,
}

/// Where in the option tree the allow-list is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OptionScope {
    Message,
    IaNa,
}

/// Copy the options in `options` that the server reads into `out`, recursing into
/// IA_NA once and dropping IA Address sub-options.
fn copy_allowed_options(
    mut options: &[u8],
    scope: OptionScope,
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let truncated = |len: usize, needed: usize| FrameError::TooShort {
        layer: Layer::Dhcpv6,
        len,
        needed,
    };
    while !options.is_empty() {
        let header = options.get(..4).ok_or(truncated(options.len(), 4))?;
        let code = u16::from_be_bytes([header[0], header[1]]);
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let body = options
            .get(4..4 + len)
            .ok_or(truncated(options.len(), 4 + len))?;
        options = options.get(4 + len..).unwrap_or_default();
        match (scope, code) {
            // Variable length: dhcproto reads exactly `len` bytes.
            (OptionScope::Message, OPTION_CLIENT_ID | OPTION_SERVER_ID | OPTION_ORO) => {
                push_option(out, code, body);
            }
            // Fixed length: dhcproto reads the value without looking at `len`, so a
            // wrong length would shift every later option; such options are dropped.
            (OptionScope::Message, OPTION_ELAPSED_TIME) if body.len() == 2 => {
                push_option(out, code, body);
            }
            (OptionScope::Message, OPTION_RAPID_COMMIT) => push_option(out, code, &[]),
            (OptionScope::Message, OPTION_IA_NA) => {
                let fixed = body.get(..IA_NA_FIXED_LEN).ok_or(FrameError::Malformed {
                    layer: Layer::Dhcpv6,
                    reason: "IA_NA shorter than its fixed fields",
                })?;
                let mut inner = fixed.to_vec();
                copy_allowed_options(
                    body.get(IA_NA_FIXED_LEN..).unwrap_or_default(),
                    OptionScope::IaNa,
                    &mut inner,
                )?;
                push_option(out, OPTION_IA_NA, &inner);
            }
            (OptionScope::IaNa, OPTION_IA_ADDR) => {
                let fixed = body.get(..IA_ADDR_FIXED_LEN).ok_or(FrameError::Malformed {
                    layer: Layer::Dhcpv6,
                    reason: "IA Address shorter than its fixed fields",
                })?;
                push_option(out, OPTION_IA_ADDR, fixed);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Append option `code` with `body` (at most 65535 bytes: bodies here are slices of,
/// or shorter than, options that fitted in a 16-bit length).
fn push_option(out: &mut Vec<u8>, code: u16, body: &[u8]) {
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body.get(..usize::from(len)).unwrap_or(body));
}

/// Decode a client message through the option allow-list.
fn decode_client_message(payload: &[u8]) -> Result<Message, FrameError> {
    const HEADER_LEN: usize = 4; // message type, transaction id
    let header = payload.get(..HEADER_LEN).ok_or(FrameError::TooShort {
        layer: Layer::Dhcpv6,
        len: payload.len(),
        needed: HEADER_LEN,
    })?;
    let mut sanitized = header.to_vec();
    copy_allowed_options(
        payload.get(HEADER_LEN..).unwrap_or_default(),
        OptionScope::Message,
        &mut sanitized,
    )?;
    Message::decode(&mut Decoder::new(&sanitized)).map_err(|_| FrameError::Malformed {
        layer: Layer::Dhcpv6,
        reason: "undecodable message",
    })
}

fn malformed(reason: &'static str) -> FrameError {
    FrameError::Malformed {
        layer: Layer::Dhcpv6,
        reason,
    }
}

impl Dhcpv6Server {
    pub(crate) fn new(config: &NetConfig) -> Self {
        Self {
            server_duid: duid_ll(config.our_mac),
            search_list: super::dhcp::search_domain_names(config),
            fqdn_option: config.fqdn.as_deref().and_then(|fqdn| {
                let name = super::ndp::dns_wire_name(fqdn)?;
                // N: the server performs no DNS updates.
                Some([&[FQDN_FLAG_NO_UPDATES][..], &name].concat())
            }),
            router: router_link_local(config),
        }
    }

    /// Whether a datagram to UDP port 547 at `dst` is for this server
    /// (All_DHCP_Relay_Agents_and_Servers, or our link-local address) rather than for
    /// some DHCPv6 server elsewhere.
    pub(crate) fn is_addressed_to_server(&self, dst: Ipv6Addr) -> bool {
        dst == all_dhcp_servers() || Some(dst) == self.router
    }

    /// Answer one DHCPv6 message the guest sent to UDP port 547.
    pub(crate) fn handle_dhcpv6(
        &self,
        ctx: &ReplyContext<'_>,
        ip: &Ipv6Packet<'_>,
        udp: &UdpDatagram<'_>,
        sink: &mut dyn FrameSink,
    ) -> Result<(), FrameError> {
        let (Some(v6), Some(router)) = (ctx.config.v6.as_ref(), self.router) else {
            guest_log!(
                ctx,
                GuestEvent::Dhcpv6,
                TRACE,
                "DHCPv6 message ignored: IPv6 is disabled"
            );
            return Ok(());
        };
        if udp.src_port != CLIENT_PORT {
            guest_log!(
                ctx,
                GuestEvent::Dhcpv6,
                TRACE,
                "DHCPv6 message from port {} (relay?) ignored",
                udp.src_port
            );
            return Ok(());
        }
        if ip.src.is_unspecified() {
            return Err(malformed("client source address is ::"));
        }
        let request = decode_client_message(udp.payload)?;
        let message_type = request.msg_type();
        let client_id = match request.opts().get(OptionCode::ClientId) {
            Some(DhcpOption::ClientId(id)) => Some(id.clone()),
            _ => None,
        };
        let server_id = match request.opts().get(OptionCode::ServerId) {
            Some(DhcpOption::ServerId(id)) => Some(id.as_slice()),
            _ => None,
        };
        let for_us = server_id.map(|id| id == self.server_duid.as_slice());

        // RFC 8415 section 16: which messages need which identifiers.
        let reply_type = match message_type {
            MessageType::Solicit | MessageType::Confirm | MessageType::Rebind => {
                if for_us.is_some() {
                    return Err(malformed(
                        "server identifier in a message that must not carry one",
                    ));
                }
                if message_type == MessageType::Solicit {
                    if request.opts().get(OptionCode::RapidCommit).is_some() {
                        MessageType::Reply
                    } else {
                        MessageType::Advertise
                    }
                } else {
                    MessageType::Reply
                }
            }
            MessageType::Request
            | MessageType::Renew
            | MessageType::Release
            | MessageType::Decline => match for_us {
                None => return Err(malformed("no server identifier")),
                Some(false) => {
                    guest_log!(
                        ctx,
                        GuestEvent::Dhcpv6,
                        TRACE,
                        "DHCPv6 {message_type:?} for another server ignored"
                    );
                    return Ok(());
                }
                Some(true) => MessageType::Reply,
            },
            MessageType::InformationRequest => {
                if for_us == Some(false) {
                    guest_log!(
                        ctx,
                        GuestEvent::Dhcpv6,
                        TRACE,
                        "DHCPv6 information request for another server ignored"
                    );
                    return Ok(());
                }
                MessageType::Reply
            }
            other => {
                guest_log!(
                    ctx,
                    GuestEvent::Dhcpv6,
                    TRACE,
                    "DHCPv6 {other:?} from the guest ignored"
                );
                return Ok(());
            }
        };
        if client_id.is_none() && message_type != MessageType::InformationRequest {
            return Err(malformed("no client identifier"));
        }

        let mut reply = Message::new_with_id(reply_type, request.xid());
        let opts = reply.opts_mut();
        if let Some(client_id) = client_id {
            opts.insert(DhcpOption::ClientId(client_id));
        }
        opts.insert(DhcpOption::ServerId(self.server_duid.clone()));
        match message_type {
            MessageType::Solicit => {
                for ia in self.identity_associations(&request, v6, false) {
                    opts.insert(ia);
                }
                if reply_type == MessageType::Reply {
                    opts.insert(DhcpOption::RapidCommit);
                } else {
                    // Highest preference: the client need not wait for other servers.
                    opts.insert(DhcpOption::Preference(u8::MAX));
                }
            }
            MessageType::Request | MessageType::Renew | MessageType::Rebind => {
                for ia in self.identity_associations(&request, v6, true) {
                    opts.insert(ia);
                }
            }
            MessageType::Confirm => {
                let Some(status) = confirm_status(&request, v6) else {
                    guest_log!(
                        ctx,
                        GuestEvent::Dhcpv6,
                        TRACE,
                        "DHCPv6 CONFIRM without addresses: no reply (RFC 8415 18.3.3)"
                    );
                    return Ok(());
                };
                opts.insert(DhcpOption::StatusCode(status));
            }
            MessageType::Release | MessageType::Decline => {
                opts.insert(DhcpOption::StatusCode(StatusCode {
                    status: Status::Success,
                    msg: String::new(),
                }));
            }
            _ => {}
        }
        if ctx.config.services.advertise_dns && !v6.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServers(v6.dns.clone()));
        }
        if let Some(fqdn) = self.fqdn_option.as_ref() {
            opts.insert(DhcpOption::Unknown(UnknownOption::new(
                OptionCode::ClientFqdn,
                fqdn.clone(),
            )));
        }
        if !self.search_list.is_empty() {
            opts.insert(DhcpOption::DomainSearchList(self.search_list.clone()));
        }

        let mut payload = Vec::new();
        reply
            .encode(&mut Encoder::new(&mut payload))
            .map_err(|_| FrameError::ReplyTooLarge("DHCPv6 options"))?;
        let frame = udp6_frame(
            ctx.reply_link(),
            SocketAddrV6::new(router, SERVER_PORT, 0, 0),
            SocketAddrV6::new(ip.src, CLIENT_PORT, 0, 0),
            &payload,
        )?;
        guest_log!(
            ctx,
            GuestEvent::Dhcpv6,
            DEBUG,
            "DHCPv6 {message_type:?} from {} answered with {reply_type:?}",
            ip.src
        );
        deliver(sink, &frame, "DHCPv6 reply");
        Ok(())
    }

    /// One IA_NA answer per IA_NA in the request (same IAID), holding our address with
    /// infinite lifetimes; with `revoke_others`, addresses the client asked for that are
    /// not ours come back with zero lifetimes.
    fn identity_associations(
        &self,
        request: &Message,
        v6: &V6Config,
        revoke_others: bool,
    ) -> Vec<DhcpOption> {
        request
            .opts()
            .iter()
            .filter_map(|opt| match opt {
                DhcpOption::IANA(ia) => Some(ia),
                _ => None,
            })
            .take(if v6.has_global_addr() { MAX_IA_NA } else { 0 })
            .map(|ia| {
                let mut addrs = DhcpOptions::new();
                addrs.insert(DhcpOption::IAAddr(IAAddr {
                    addr: v6.addr,
                    preferred_life: INFINITE,
                    valid_life: INFINITE,
                    opts: DhcpOptions::new(),
                }));
                if revoke_others {
                    for requested in requested_addresses(ia).filter(|addr| *addr != v6.addr) {
                        addrs.insert(DhcpOption::IAAddr(IAAddr {
                            addr: requested,
                            preferred_life: 0,
                            valid_life: 0,
                            opts: DhcpOptions::new(),
                        }));
                    }
                }
                DhcpOption::IANA(IANA {
                    id: ia.id,
                    t1: INFINITE,
                    t2: INFINITE,
                    opts: addrs,
                })
            })
            .collect()
    }
}

/// Addresses listed in an IA_NA of the client.
fn requested_addresses(ia: &IANA) -> impl Iterator<Item = Ipv6Addr> + '_ {
    ia.opts.iter().filter_map(|opt| match opt {
        DhcpOption::IAAddr(addr) => Some(addr.addr),
        _ => None,
    })
}

/// RFC 8415 section 18.3.3: Success when every address in the CONFIRM is on our link
/// (the advertised /64), NotOnLink otherwise, `None` (no reply) without addresses.
fn confirm_status(request: &Message, v6: &V6Config) -> Option<StatusCode> {
    let link_prefix = prefix_of(v6.addr, SLAAC_PREFIX_LEN);
    let mut addresses = request
        .opts()
        .iter()
        .filter_map(|opt| match opt {
            DhcpOption::IANA(ia) => Some(ia),
            _ => None,
        })
        .flat_map(requested_addresses)
        .peekable();
    addresses.peek()?;
    let on_link = addresses.all(|addr| prefix_of(addr, SLAAC_PREFIX_LEN) == link_prefix);
    Some(if on_link {
        StatusCode {
            status: Status::Success,
            msg: String::new(),
        }
    } else {
        StatusCode {
            status: Status::NotOnLink,
            msg: "address not on this link".into(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{GuestNet, Layer};
    use super::*;

    const CLIENT_DUID: [u8; 10] = [0, 3, 0, 1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const IAID: u32 = 0x0a0b_0c0d;

    fn client_message(message_type: MessageType, addr: Option<Ipv6Addr>) -> Message {
        let mut message = Message::new_with_id(message_type, [1, 2, 3]);
        let opts = message.opts_mut();
        opts.insert(DhcpOption::ClientId(CLIENT_DUID.to_vec()));
        opts.insert(DhcpOption::ElapsedTime(0));
        let mut ia_opts = DhcpOptions::new();
        if let Some(addr) = addr {
            ia_opts.insert(DhcpOption::IAAddr(IAAddr {
                addr,
                preferred_life: 0,
                valid_life: 0,
                opts: DhcpOptions::new(),
            }));
        }
        opts.insert(DhcpOption::IANA(IANA {
            id: IAID,
            t1: 0,
            t2: 0,
            opts: ia_opts,
        }));
        opts.insert(DhcpOption::ORO(dhcproto::v6::ORO {
            opts: vec![OptionCode::DomainNameServers, OptionCode::DomainSearchList],
        }));
        message
    }

    fn with_server_id(mut message: Message, duid: Vec<u8>) -> Message {
        message.opts_mut().insert(DhcpOption::ServerId(duid));
        message
    }

    fn encode(message: &Message) -> Vec<u8> {
        let mut payload = Vec::new();
        message
            .encode(&mut Encoder::new(&mut payload))
            .expect("encode");
        payload
    }

    fn frame_for(message: &Message) -> Vec<u8> {
        guest_udp6(
            guest_ll(),
            all_dhcp_servers(),
            (CLIENT_PORT, SERVER_PORT),
            &encode(message),
        )
    }

    fn exchange(net: &mut GuestNet, message: &Message) -> Option<Message> {
        let mut sink = CapturedFrames::default();
        net.handle_frame(&frame_for(message), &mut sink)
            .expect("valid DHCPv6");
        if sink.0.is_empty() {
            return None;
        }
        let frame = sink.take_one();
        let (eth, ip) = reply_ipv6(&frame);
        assert_eq!(eth.destination(), GUEST_MAC);
        assert_eq!(ip.src, gateway_ll());
        assert_eq!(ip.dst, guest_ll());
        let udp = super::super::parse_udp_v6(&ip).expect("valid UDP with checksum");
        assert_eq!((udp.src_port, udp.dst_port), (SERVER_PORT, CLIENT_PORT));
        Some(Message::decode(&mut Decoder::new(udp.payload)).expect("decodable reply"))
    }

    fn assert_identifiers_and_dns(reply: &Message) {
        assert_eq!(reply.xid(), [1, 2, 3]);
        let opts = reply.opts();
        assert_eq!(
            opts.get(OptionCode::ClientId),
            Some(&DhcpOption::ClientId(CLIENT_DUID.to_vec()))
        );
        assert_eq!(
            opts.get(OptionCode::ServerId),
            Some(&DhcpOption::ServerId(vec![
                0, 3, 0, 1, 0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55
            ]))
        );
        assert_eq!(
            opts.get(OptionCode::DomainNameServers),
            Some(&DhcpOption::DomainNameServers(vec!["2001:db8::53"
                .parse()
                .expect("literal")]))
        );
        match opts.get(OptionCode::DomainSearchList) {
            Some(DhcpOption::DomainSearchList(names)) => {
                let names: Vec<String> = names.iter().map(|n| n.to_ascii()).collect();
                assert_eq!(names, ["example.com.", "lab.example.org."]);
            }
            other => panic!("no domain list: {other:?}"),
        }
    }

    /// The IA_NA of a reply: (IAID, T1, T2, [(address, preferred, valid)]).
    fn ia_na(reply: &Message) -> (u32, u32, u32, Vec<(Ipv6Addr, u32, u32)>) {
        match reply.opts().get(OptionCode::IANA) {
            Some(DhcpOption::IANA(ia)) => (
                ia.id,
                ia.t1,
                ia.t2,
                ia.opts
                    .iter()
                    .filter_map(|o| match o {
                        DhcpOption::IAAddr(a) => Some((a.addr, a.preferred_life, a.valid_life)),
                        _ => None,
                    })
                    .collect(),
            ),
            other => panic!("no IA_NA: {other:?}"),
        }
    }

    #[test]
    fn solicit_advertise_request_reply() {
        let mut net = guest_net();
        let advertise =
            exchange(&mut net, &client_message(MessageType::Solicit, None)).expect("an ADVERTISE");
        assert_eq!(advertise.msg_type(), MessageType::Advertise);
        assert_identifiers_and_dns(&advertise);
        assert_eq!(
            ia_na(&advertise),
            (
                IAID,
                INFINITE,
                INFINITE,
                vec![(guest_v6(), INFINITE, INFINITE)]
            )
        );
        assert_eq!(
            advertise.opts().get(OptionCode::Preference),
            Some(&DhcpOption::Preference(255))
        );
        assert_eq!(advertise.opts().get(OptionCode::RapidCommit), None);

        let server_duid = duid_ll(OUR_MAC);
        let request = with_server_id(
            client_message(MessageType::Request, Some(guest_v6())),
            server_duid.clone(),
        );
        let reply = exchange(&mut net, &request).expect("a REPLY");
        assert_eq!(reply.msg_type(), MessageType::Reply);
        assert_identifiers_and_dns(&reply);
        assert_eq!(
            ia_na(&reply),
            (
                IAID,
                INFINITE,
                INFINITE,
                vec![(guest_v6(), INFINITE, INFINITE)]
            )
        );

        for message_type in [MessageType::Renew, MessageType::Rebind] {
            let mut message = client_message(message_type, Some(guest_v6()));
            if message_type == MessageType::Renew {
                message = with_server_id(message, server_duid.clone());
            }
            let reply = exchange(&mut net, &message).expect("a REPLY");
            assert_eq!(reply.msg_type(), MessageType::Reply);
            assert_eq!(ia_na(&reply).3, vec![(guest_v6(), INFINITE, INFINITE)]);
        }
    }

    #[test]
    fn rapid_commit_solicit_gets_a_reply() {
        let mut net = guest_net();
        let mut solicit = client_message(MessageType::Solicit, None);
        solicit.opts_mut().insert(DhcpOption::RapidCommit);
        let reply = exchange(&mut net, &solicit).expect("a REPLY");
        assert_eq!(reply.msg_type(), MessageType::Reply);
        assert_eq!(
            reply.opts().get(OptionCode::RapidCommit),
            Some(&DhcpOption::RapidCommit)
        );
        assert_identifiers_and_dns(&reply);
        assert_eq!(ia_na(&reply).3, vec![(guest_v6(), INFINITE, INFINITE)]);
    }

    #[test]
    fn foreign_address_is_revoked_with_zero_lifetimes() {
        let mut net = guest_net();
        let stale: Ipv6Addr = "2001:db8:9::5".parse().expect("literal");
        let request = with_server_id(
            client_message(MessageType::Request, Some(stale)),
            duid_ll(OUR_MAC),
        );
        let reply = exchange(&mut net, &request).expect("a REPLY");
        let mut addrs = ia_na(&reply).3;
        addrs.sort();
        let mut expected = vec![(guest_v6(), INFINITE, INFINITE), (stale, 0, 0)];
        expected.sort();
        assert_eq!(addrs, expected);
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let mut net = guest_net();
        let request = with_server_id(
            client_message(MessageType::Request, Some(guest_v6())),
            vec![0, 3, 0, 1, 1, 2, 3, 4, 5, 6],
        );
        assert!(exchange(&mut net, &request).is_none());
    }

    #[test]
    fn confirm_reports_on_link_status() {
        let mut net = guest_net();
        let reply = exchange(
            &mut net,
            &client_message(MessageType::Confirm, Some(guest_v6())),
        )
        .expect("a REPLY");
        assert_eq!(reply.msg_type(), MessageType::Reply);
        assert_eq!(
            reply.opts().get(OptionCode::StatusCode),
            Some(&DhcpOption::StatusCode(StatusCode {
                status: Status::Success,
                msg: String::new()
            }))
        );
        assert_eq!(reply.opts().get(OptionCode::IANA), None);
        let elsewhere: Ipv6Addr = "2001:db8:99::1".parse().expect("literal");
        let reply = exchange(
            &mut net,
            &client_message(MessageType::Confirm, Some(elsewhere)),
        )
        .expect("a REPLY");
        match reply.opts().get(OptionCode::StatusCode) {
            Some(DhcpOption::StatusCode(code)) => assert_eq!(code.status, Status::NotOnLink),
            other => panic!("no status: {other:?}"),
        }
        // No addresses at all: no reply.
        assert!(exchange(&mut net, &client_message(MessageType::Confirm, None)).is_none());
    }

    #[test]
    fn information_request_gets_dns_only() {
        let mut net = guest_net();
        let mut message = Message::new_with_id(MessageType::InformationRequest, [1, 2, 3]);
        message
            .opts_mut()
            .insert(DhcpOption::ClientId(CLIENT_DUID.to_vec()));
        let reply = exchange(&mut net, &message).expect("a REPLY");
        assert_eq!(reply.msg_type(), MessageType::Reply);
        assert_identifiers_and_dns(&reply);
        assert_eq!(reply.opts().get(OptionCode::IANA), None);
    }

    #[test]
    fn release_is_acknowledged() {
        let mut net = guest_net();
        let release = with_server_id(
            client_message(MessageType::Release, Some(guest_v6())),
            duid_ll(OUR_MAC),
        );
        let reply = exchange(&mut net, &release).expect("a REPLY");
        match reply.opts().get(OptionCode::StatusCode) {
            Some(DhcpOption::StatusCode(code)) => assert_eq!(code.status, Status::Success),
            other => panic!("no status: {other:?}"),
        }
    }

    #[test]
    fn missing_identifiers_are_errors() {
        let mut net = guest_net();
        let mut solicit = Message::new_with_id(MessageType::Solicit, [1, 2, 3]);
        solicit.opts_mut().insert(DhcpOption::ElapsedTime(0));
        let result = net.handle_frame(&frame_for(&solicit), &mut CapturedFrames::default());
        assert_eq!(
            result,
            Err(FrameError::Malformed {
                layer: Layer::Dhcpv6,
                reason: "no client identifier"
            })
        );
        let request = client_message(MessageType::Request, Some(guest_v6()));
        let result = net.handle_frame(&frame_for(&request), &mut CapturedFrames::default());
        assert_eq!(
            result,
            Err(FrameError::Malformed {
                layer: Layer::Dhcpv6,
                reason: "no server identifier"
            })
        );
    }

    #[test]
    fn malformed_dhcpv6_is_rejected() {
        let mut net = guest_net();
        let solicit = client_message(MessageType::Solicit, Some(guest_v6()));
        assert_truncations_rejected(&mut net, &frame_for(&solicit));
        let payload = encode(&solicit);
        let send = |net: &mut GuestNet, payload: &[u8]| {
            let frame = guest_udp6(
                guest_ll(),
                all_dhcp_servers(),
                (CLIENT_PORT, SERVER_PORT),
                payload,
            );
            let mut sink = CapturedFrames::default();
            let result = net.handle_frame(&frame, &mut sink);
            (result, sink.0.len())
        };
        // Every cut of the DHCPv6 payload (UDP/IP lengths consistent): errors or
        // answers, never a panic.
        for len in 0..payload.len() {
            let _ = send(&mut net, &payload[..len]);
        }
        // Status code option too short for its status field, nested 100 deep in
        // IA_NAs, vendor options too short: all dropped by the allow-list.
        let mut hostile = payload[..4].to_vec();
        hostile.extend_from_slice(&[0, 13, 0, 1, 0]);
        hostile.extend_from_slice(&[0, 17, 0, 2, 0, 0]);
        let mut nested = vec![0u8; 0];
        for _ in 0..100 {
            let mut outer = vec![0, 3];
            outer.extend_from_slice(
                &u16::try_from(12 + nested.len())
                    .expect("fits")
                    .to_be_bytes(),
            );
            outer.extend_from_slice(&[0; 12]);
            outer.extend_from_slice(&nested);
            nested = outer;
        }
        hostile.extend_from_slice(&nested);
        hostile.extend_from_slice(&[0, 1, 0, 2, 9, 9]); // client id
        let (result, _) = send(&mut net, &hostile);
        assert!(result.is_ok(), "{result:?}");
        // An option running past the end of the message.
        let mut overlong = payload.clone();
        overlong.extend_from_slice(&[0, 1, 0, 50, 1]);
        let (result, answers) = send(&mut net, &overlong);
        assert!(matches!(
            result,
            Err(FrameError::TooShort {
                layer: Layer::Dhcpv6,
                ..
            })
        ));
        assert_eq!(answers, 0);
    }

    #[test]
    fn fqdn_option_is_sent_when_configured() {
        let mut config = config();
        config.fqdn = Some("guest1.example.com".into());
        let mut net = GuestNet::new(std::sync::Arc::new(config)).expect("new");
        let reply =
            exchange(&mut net, &client_message(MessageType::Solicit, None)).expect("an ADVERTISE");
        match reply.opts().get(OptionCode::ClientFqdn) {
            Some(DhcpOption::Unknown(option)) => {
                assert_eq!(option.data(), b"\x04\x06guest1\x07example\x03com\x00")
            }
            other => panic!("no FQDN option: {other:?}"),
        }
    }

    #[test]
    fn wrongly_sized_fixed_options_do_not_misalign_decoding() {
        // Found by fuzzing: a rapid commit option with a 12-byte body hiding a vendor
        // option of length 0 (dhcproto would compute 0 - 4 for it).
        let mut net = guest_net();
        let mut payload = vec![1, 1, 2, 3];
        payload.extend_from_slice(&[0, 1, 0, 2, 9, 9]); // client id
        payload.extend_from_slice(&[0, 14, 0, 12]); // rapid commit, 12 bytes
        payload.extend_from_slice(&[0, 17, 0, 0, 0, 17, 0, 1, 0, 8, 0, 0]);
        payload.extend_from_slice(&[0, 8, 0, 1, 0]); // elapsed time, 1 byte
        let frame = guest_udp6(
            guest_ll(),
            all_dhcp_servers(),
            (CLIENT_PORT, SERVER_PORT),
            &payload,
        );
        let mut sink = CapturedFrames::default();
        assert_eq!(net.handle_frame(&frame, &mut sink), Ok(()));
        let reply = sink.take_one();
        let (_, ip) = reply_ipv6(&reply);
        let udp = super::super::parse_udp_v6(&ip).expect("UDP");
        let reply = Message::decode(&mut Decoder::new(udp.payload)).expect("reply");
        assert_eq!(
            reply.msg_type(),
            MessageType::Reply,
            "rapid commit honoured"
        );
    }

    #[test]
    fn duid_ll_layout() {
        assert_eq!(
            duid_ll([1, 2, 3, 4, 5, 6]),
            vec![0, 3, 0, 1, 1, 2, 3, 4, 5, 6]
        );
    }
}
