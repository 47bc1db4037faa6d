//! The resolved network configuration the guest sees.
//!
//! Built once at start-up from the command line and the host's own configuration, then
//! shared read-only (`Arc<NetConfig>`) by every part of the backend.
//!
//! # How defaults are chosen (as passt does)
//!
//! [`NetConfig::resolve`] is a pure function of the parsed command line ([`Cli`]) and a
//! snapshot of the host ([`HostInfo`]), so every rule below has a unit test with a fake
//! host:
//!
//! * **Template interface**, per IP version: `-i`, else `--outbound-if4`/`6`, else the
//!   interface of the host's default route, else the first interface with any route.
//! * **Addresses and gateways**: `-a`/`-g` win; otherwise the template interface's first
//!   global address and the default route's gateway. The guest shares the host's
//!   address. IPv4 prefix: `-a …/LEN`, else `-n`, else the host's prefix (or the address
//!   class for an `-a` without one). IPv6 prefix: `-a …/LEN`, else 64 (passt always uses
//!   64; baton honours an explicit one).
//! * **Local mode**: a family for which the host has no usable address and default route
//!   (a fresh network namespace) gets passt's link-local set-up: IPv4 169.254.2.1/16
//!   via 169.254.2.2; IPv6 with no global address (the guest's is learned from its
//!   traffic, DHCPv6 is off) via fe80::1. Explicit `-a ADDR -g GW` need no host route at
//!   all; `-a` without any gateway (or `-g` without any address) for IPv4 is an error,
//!   since a guest address with a made-up gateway would not work.
//! * **`--map-host-loopback`**: defaults to the gateway address (guest traffic to the
//!   gateway reaches the host's loopback) unless `--no-map-gw` or
//!   `--map-host-loopback none`. `--map-guest-addr` defaults to none.
//! * **DNS**: `-D` addresses are advertised as given. Otherwise the host's
//!   `/etc/resolv.conf` nameservers of each family are advertised, except loopback ones
//!   (such as systemd-resolved's 127.0.0.53) and one equal to the mapped gateway, which
//!   the guest cannot reach directly: for those baton advertises the
//!   `--map-host-loopback` address (the gateway, by default) and records it as the
//!   `dns_forward` address, so that the guest's DNS traffic to it (UDP and TCP, ports 53
//!   and 853) is redirected to `dns_host` — `--dns-host`, or the first nameserver of
//!   `/etc/resolv.conf`. With `--no-map-gw` and no `--dns-forward`, loopback resolvers
//!   are skipped. At most three servers per family are advertised.
//! * **Search list**: `-S`, else the last `search`/`domain` line of `/etc/resolv.conf`.
//! * **MTU** 65520, **our MAC** 9a:55:9a:55:9a:55 (`-M` overrides it: like passt's `-M`,
//!   it is the source address of frames sent to the guest, not the guest's address).
//!
//! Process-level settings (vhost-user socket, logging, migration policy) are resolved
//! separately by [`RuntimeConfig::from_cli`], which needs no host information.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use crate::cli::{
    AddrOrNone, Cli, CliError, LogLevel, RepairPathArg, RunAs, SearchList, DEFAULT_LINGER_SECS,
    DEFAULT_LOG_FILE_SIZE,
};
use crate::hostinfo::{is_ipv6_link_local, HostInfo, IpFamily};
use crate::ports::{PortForwardError, PortForwards};

/// An Ethernet address.
pub type MacAddr = [u8; 6];

/// The MAC address baton answers with for the gateway and every other address the guest
/// reaches (the guest only ever talks to "the router"). passt uses the same value.
pub const DEFAULT_OUR_MAC: MacAddr = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

/// Default MTU offered to the guest (DHCP option 26, RA MTU option), as passt.
pub const DEFAULT_MTU: u16 = 65520;

/// Smallest MTU IPv6 works with; a smaller `-m` with IPv6 enabled is logged as a
/// warning (as passt does).
pub const IPV6_MIN_MTU: u16 = 1280;

/// passt's local-mode guest address, for a host without usable IPv4.
pub const LOCAL_MODE_ADDR_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 2, 1);
/// passt's local-mode IPv4 gateway.
pub const LOCAL_MODE_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 2, 2);
/// passt's local-mode IPv4 prefix length.
pub const LOCAL_MODE_PREFIX_V4: u8 = 16;
/// passt's local-mode IPv6 gateway (and router link-local address).
pub const LOCAL_MODE_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// IPv6 prefix length handed to the guest unless `-a ADDR/LEN` says otherwise.
pub const DEFAULT_PREFIX_V6: u8 = 64;
/// Nameservers advertised per family (glibc's `MAXNS`, as passt).
pub const MAX_DNS_SERVERS: usize = 3;

/// IPv4 side of the guest's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V4Config {
    /// The address handed to the guest (DHCP), normally the host's own.
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// The gateway the guest routes through; baton answers ARP for it.
    pub gateway: Ipv4Addr,
    /// DNS servers advertised to the guest.
    pub dns: Vec<Ipv4Addr>,
    /// Traffic from the guest to this address goes to the host's loopback
    /// (`--map-host-loopback`); `None` disables the mapping.
    pub map_host_loopback: Option<Ipv4Addr>,
    /// Traffic from the guest to this address goes to the guest's own address as seen
    /// from the host (`--map-guest-addr`).
    pub map_guest_addr: Option<Ipv4Addr>,
    /// Guest DNS traffic (UDP/TCP to port 53 or 853) to this address is redirected to
    /// [`Self::dns_host`] (`--dns-forward`, or set when a loopback resolver is replaced).
    pub dns_forward: Option<Ipv4Addr>,
    /// The host nameserver `dns_forward` traffic goes to.
    pub dns_host: Option<Ipv4Addr>,
    /// Source address for outbound sockets (`-o`); `None`: chosen by routing.
    pub outbound_addr: Option<Ipv4Addr>,
    /// Interface outbound sockets are bound to (`--outbound-if4`).
    pub outbound_interface: Option<String>,
    /// Host interface the defaults came from; `None` in local mode without `-i`.
    pub template_interface: Option<String>,
}

/// IPv6 side of the guest's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V6Config {
    /// The global address the guest gets (DHCPv6 / SLAAC prefix), normally the host's.
    /// `::` in local mode: no global address is assigned, the guest's is learned from
    /// its traffic, and DHCPv6 is off.
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
    /// The gateway address (`-g`, the host's default route, or fe80::1). Normally
    /// link-local; see [`Self::router_link_local`].
    pub gateway: Ipv6Addr,
    pub dns: Vec<Ipv6Addr>,
    pub map_host_loopback: Option<Ipv6Addr>,
    pub map_guest_addr: Option<Ipv6Addr>,
    /// Source of router advertisements, NDP and DHCPv6 replies: the gateway if it is
    /// link-local, else the template interface's link-local address, else fe80::1.
    pub router_link_local: Ipv6Addr,
    pub dns_forward: Option<Ipv6Addr>,
    pub dns_host: Option<Ipv6Addr>,
    pub outbound_addr: Option<Ipv6Addr>,
    pub outbound_interface: Option<String>,
    pub template_interface: Option<String>,
}

impl Default for V4Config {
    /// All addresses unspecified, no DNS, no mappings: a base for struct-update syntax
    /// in tests (`V4Config { addr, gateway, ..V4Config::default() }`), not a usable
    /// configuration.
    fn default() -> Self {
        V4Config {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
            gateway: Ipv4Addr::UNSPECIFIED,
            dns: Vec::new(),
            map_host_loopback: None,
            map_guest_addr: None,
            dns_forward: None,
            dns_host: None,
            outbound_addr: None,
            outbound_interface: None,
            template_interface: None,
        }
    }
}

impl Default for V6Config {
    /// Local-mode addresses (no global address, fe80::1 as gateway and router), no
    /// DNS, no mappings: a base for struct-update syntax in tests.
    fn default() -> Self {
        V6Config {
            addr: Ipv6Addr::UNSPECIFIED,
            prefix_len: DEFAULT_PREFIX_V6,
            gateway: LOCAL_MODE_GATEWAY_V6,
            dns: Vec::new(),
            map_host_loopback: None,
            map_guest_addr: None,
            router_link_local: LOCAL_MODE_GATEWAY_V6,
            dns_forward: None,
            dns_host: None,
            outbound_addr: None,
            outbound_interface: None,
            template_interface: None,
        }
    }
}

impl V6Config {
    /// Whether a global address is assigned (false in local mode).
    pub fn has_global_addr(&self) -> bool {
        !self.addr.is_unspecified()
    }
}

/// Which built-in servers answer the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestServices {
    /// `--no-dhcp` turns it off; needs IPv4.
    pub dhcp: bool,
    /// `--no-dhcpv6`; needs IPv6 with a global address.
    pub dhcpv6: bool,
    /// Neighbour discovery: `--no-ndp` or `--no-icmp` turn it off; needs IPv6.
    pub ndp: bool,
    /// Router advertisements: `--no-ra`; needs NDP.
    pub router_advertisements: bool,
    /// DNS servers in DHCP, NDP and DHCPv6 (`--no-dhcp-dns` turns it off).
    pub advertise_dns: bool,
    /// Search list in DHCP, NDP and DHCPv6 (`--no-dhcp-search`).
    pub advertise_search: bool,
}

impl Default for GuestServices {
    /// Everything on, as passt without any `--no-*` option.
    fn default() -> Self {
        GuestServices {
            dhcp: true,
            dhcpv6: true,
            ndp: true,
            router_advertisements: true,
            advertise_dns: true,
            advertise_search: true,
        }
    }
}

/// Which transport handlers run; a disabled one drops the guest's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolHandlers {
    pub tcp: bool,
    pub udp: bool,
    /// ICMP/ICMPv6 echo.
    pub icmp: bool,
}

impl Default for ProtocolHandlers {
    /// All handlers on.
    fn default() -> Self {
        ProtocolHandlers {
            tcp: true,
            udp: true,
            icmp: true,
        }
    }
}

/// Everything about the guest-facing network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address baton uses as the source of every frame towards the guest (`-M`,
    /// as in passt).
    pub our_mac: MacAddr,
    /// The guest's MAC address if known in advance; `resolve` leaves it `None` (passt
    /// has no option for it): it is learned from the guest's first frame.
    pub guest_mac: Option<MacAddr>,
    pub mtu: u16,
    pub v4: Option<V4Config>,
    pub v6: Option<V6Config>,
    /// DNS search domains (DHCP option 119, DHCPv6 domain list).
    pub dns_search: Vec<String>,
    /// Host interface the defaults were taken from (`-i`), for logs.
    pub interface: Option<String>,
    pub services: GuestServices,
    pub handlers: ProtocolHandlers,
    /// Host-to-guest TCP forwarding (`-t`).
    pub tcp_forwards: PortForwards,
    /// Host-to-guest UDP forwarding (`-u`).
    pub udp_forwards: PortForwards,
    /// Listen on forwarding addresses not configured on the host (`IP_FREEBIND`).
    pub freebind: bool,
    /// Bound of the TCP flow table and, separately, of the UDP flow table
    /// (`--max-flows`).
    pub max_flows: usize,
    /// A UDP flow without datagrams for this long is closed (`--udp-timeout`).
    pub udp_idle_timeout: Duration,
    /// DHCP option 12 (`-H`).
    pub hostname: Option<String>,
    /// DHCP option 81 / DHCPv6 option 39 (`--fqdn`).
    pub fqdn: Option<String>,
}

impl Default for NetConfig {
    /// passt's fixed defaults (our MAC, MTU 65520, every service and handler on, no
    /// forwarding) with neither IPv4 nor IPv6 configured: a base for struct-update
    /// syntax in tests. Real configurations come from [`NetConfig::resolve`].
    fn default() -> Self {
        NetConfig {
            our_mac: DEFAULT_OUR_MAC,
            guest_mac: None,
            mtu: DEFAULT_MTU,
            v4: None,
            v6: None,
            dns_search: Vec::new(),
            interface: None,
            services: GuestServices::default(),
            handlers: ProtocolHandlers::default(),
            tcp_forwards: PortForwards::none(),
            udp_forwards: PortForwards::none(),
            freebind: false,
            max_flows: crate::flow::DEFAULT_MAX_FLOWS,
            udp_idle_timeout: crate::udp::IDLE_TIMEOUT,
            hostname: None,
            fqdn: None,
        }
    }
}

/// Why the command line and the host do not make a usable configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error(transparent)]
    Cli(#[from] CliError),
    #[error("{option} {name}: no such interface on this host")]
    UnknownInterface { option: &'static str, name: String },
    #[error(
        "-a {addr}: no IPv4 gateway (the host has no IPv4 default route{context}); \
         give one with -g"
    )]
    Ipv4AddressWithoutGateway { addr: Ipv4Addr, context: String },
    #[error(
        "-g {gateway}: no IPv4 address to go with it (the host has none{context}); \
         give one with -a"
    )]
    Ipv4GatewayWithoutAddress { gateway: Ipv4Addr, context: String },
    #[error("-t/--tcp-ports: {0}")]
    TcpForwards(#[source] PortForwardError),
    #[error("-u/--udp-ports: {0}")]
    UdpForwards(#[source] PortForwardError),
    #[error("{option} given, but {disabled_by} disables that protocol")]
    ForwardingDisabled {
        option: &'static str,
        disabled_by: &'static str,
    },
}

fn on_interface(interface: Option<&str>) -> String {
    interface.map_or_else(String::new, |name| format!(" on {name}"))
}

/// passt's prefix length for an IPv4 address given without one: its class.
fn classful_prefix_len(addr: Ipv4Addr) -> u8 {
    match addr.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        192..=223 => 24,
        _ => 32,
    }
}

fn first_v4(values: impl IntoIterator<Item = IpAddr>) -> Option<Ipv4Addr> {
    values.into_iter().find_map(|addr| match addr {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    })
}

fn first_v6(values: impl IntoIterator<Item = IpAddr>) -> Option<Ipv6Addr> {
    values.into_iter().find_map(|addr| match addr {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    })
}

/// `--map-host-loopback`/`--map-guest-addr` for one family: `Some(None)` for `none`,
/// `Some(Some(addr))` for an address of the family, `None` if not given.
fn mapping_option(values: &[AddrOrNone], family: IpFamily) -> Option<Option<IpAddr>> {
    if values.contains(&AddrOrNone::None) {
        return Some(None);
    }
    values
        .iter()
        .filter_map(AddrOrNone::addr)
        .find(|addr| IpFamily::of(*addr) == family)
        .map(Some)
}

fn map_host_loopback(cli: &Cli, family: IpFamily, gateway: IpAddr) -> Option<IpAddr> {
    match mapping_option(&cli.map_host_loopback, family) {
        Some(explicit) => explicit,
        None if cli.no_map_gw => None,
        None => Some(gateway),
    }
}

/// The DNS part of one family: advertised servers, forwarding address, host resolver.
struct DnsSetup {
    servers: Vec<IpAddr>,
    forward: Option<IpAddr>,
    host: Option<IpAddr>,
}

fn resolve_dns(
    cli: &Cli,
    host: &HostInfo,
    family: IpFamily,
    map_host_loopback: Option<IpAddr>,
) -> DnsSetup {
    let of_family = |addr: &IpAddr| IpFamily::of(*addr) == family;
    let resolvers: Vec<IpAddr> = host
        .resolv_conf
        .nameservers
        .iter()
        .copied()
        .filter(of_family)
        .collect();
    let mut forward = cli.dns_forward.iter().copied().find(of_family);
    let host_resolver = cli
        .dns_host
        .iter()
        .copied()
        .find(of_family)
        .or_else(|| resolvers.first().copied());
    if cli.dns.contains(&AddrOrNone::None) {
        return DnsSetup {
            servers: Vec::new(),
            forward,
            host: host_resolver,
        };
    }
    let explicit: Vec<IpAddr> = cli
        .dns
        .iter()
        .filter_map(AddrOrNone::addr)
        .filter(of_family)
        .collect();
    let mut servers = Vec::new();
    if !explicit.is_empty() {
        servers = explicit;
    } else {
        for resolver in resolvers {
            let advertised = if resolver.is_loopback() || Some(resolver) == map_host_loopback {
                match (forward, map_host_loopback) {
                    (Some(forward), _) => forward,
                    (None, Some(mapped)) => {
                        forward = Some(mapped);
                        mapped
                    }
                    (None, None) => continue,
                }
            } else {
                resolver
            };
            servers.push(advertised);
        }
    }
    let mut unique: Vec<IpAddr> = Vec::new();
    for server in servers {
        if !unique.contains(&server) && unique.len() < MAX_DNS_SERVERS {
            unique.push(server);
        }
    }
    DnsSetup {
        servers: unique,
        forward,
        host: host_resolver,
    }
}

fn as_v4(addr: Option<IpAddr>) -> Option<Ipv4Addr> {
    first_v4(addr)
}

fn as_v6(addr: Option<IpAddr>) -> Option<Ipv6Addr> {
    first_v6(addr)
}

fn resolve_v4(cli: &Cli, host: &HostInfo) -> Result<V4Config, ConfigError> {
    let template = cli
        .interface
        .as_deref()
        .or(cli.outbound_if4.as_deref())
        .or_else(|| host.template_interface(IpFamily::V4));
    let explicit_addr = cli.address_v4();
    let explicit_gateway = first_v4(cli.gateways.iter().copied());
    let host_gateway = template.and_then(|name| as_v4(host.default_gateway(name, IpFamily::V4)));
    let host_addr = template.and_then(|name| host.global_address(name, IpFamily::V4));

    let local_mode = (
        LOCAL_MODE_ADDR_V4,
        cli.netmask.unwrap_or(LOCAL_MODE_PREFIX_V4),
        LOCAL_MODE_GATEWAY_V4,
    );
    let (addr, prefix_len, gateway) = match (explicit_addr, explicit_gateway.or(host_gateway)) {
        (Some(explicit), Some(gateway)) => {
            let addr = first_v4([explicit.addr]).unwrap_or(LOCAL_MODE_ADDR_V4);
            let prefix_len = explicit
                .prefix_len
                .or(cli.netmask)
                .unwrap_or_else(|| classful_prefix_len(addr));
            (addr, prefix_len, gateway)
        }
        (Some(explicit), None) => {
            return Err(ConfigError::Ipv4AddressWithoutGateway {
                addr: first_v4([explicit.addr]).unwrap_or(LOCAL_MODE_ADDR_V4),
                context: on_interface(template),
            })
        }
        (None, Some(gateway)) => match host_addr {
            Some((IpAddr::V4(addr), host_prefix)) => {
                (addr, cli.netmask.unwrap_or(host_prefix), gateway)
            }
            _ if explicit_gateway.is_some() => {
                return Err(ConfigError::Ipv4GatewayWithoutAddress {
                    gateway,
                    context: on_interface(template),
                })
            }
            _ => local_mode,
        },
        (None, None) => local_mode,
    };
    let dns_mapping = map_host_loopback(cli, IpFamily::V4, IpAddr::V4(gateway));
    let dns = resolve_dns(cli, host, IpFamily::V4, dns_mapping);
    Ok(V4Config {
        addr,
        prefix_len,
        gateway,
        dns: dns
            .servers
            .into_iter()
            .filter_map(|a| as_v4(Some(a)))
            .collect(),
        map_host_loopback: as_v4(dns_mapping),
        map_guest_addr: as_v4(mapping_option(&cli.map_guest_addr, IpFamily::V4).flatten()),
        dns_forward: as_v4(dns.forward),
        dns_host: as_v4(dns.host),
        outbound_addr: first_v4(cli.outbound.iter().copied()),
        outbound_interface: cli.outbound_if4.clone(),
        template_interface: template.map(str::to_owned),
    })
}

fn resolve_v6(cli: &Cli, host: &HostInfo) -> V6Config {
    let template = cli
        .interface
        .as_deref()
        .or(cli.outbound_if6.as_deref())
        .or_else(|| host.template_interface(IpFamily::V6));
    let explicit_addr = cli.address_v6();
    let host_gateway = template.and_then(|name| as_v6(host.default_gateway(name, IpFamily::V6)));
    let host_addr = template
        .filter(|_| host_gateway.is_some())
        .and_then(|name| host.global_address(name, IpFamily::V6))
        .and_then(|(addr, _)| as_v6(Some(addr)));

    let gateway = first_v6(cli.gateways.iter().copied())
        .or(host_gateway)
        .unwrap_or(LOCAL_MODE_GATEWAY_V6);
    let addr = explicit_addr
        .and_then(|explicit| as_v6(Some(explicit.addr)))
        .or(host_addr)
        .unwrap_or(Ipv6Addr::UNSPECIFIED);
    let prefix_len = explicit_addr
        .and_then(|explicit| explicit.prefix_len)
        .unwrap_or(DEFAULT_PREFIX_V6);
    let router_link_local = if is_ipv6_link_local(gateway) {
        gateway
    } else {
        template
            .and_then(|name| host.link_local_v6(name))
            .unwrap_or(LOCAL_MODE_GATEWAY_V6)
    };
    let mapping = map_host_loopback(cli, IpFamily::V6, IpAddr::V6(gateway));
    let dns = resolve_dns(cli, host, IpFamily::V6, mapping);
    V6Config {
        addr,
        prefix_len,
        gateway,
        dns: dns
            .servers
            .into_iter()
            .filter_map(|a| as_v6(Some(a)))
            .collect(),
        map_host_loopback: as_v6(mapping),
        map_guest_addr: as_v6(mapping_option(&cli.map_guest_addr, IpFamily::V6).flatten()),
        router_link_local,
        dns_forward: as_v6(dns.forward),
        dns_host: as_v6(dns.host),
        outbound_addr: first_v6(cli.outbound.iter().copied()),
        outbound_interface: cli.outbound_if6.clone(),
        template_interface: template.map(str::to_owned),
    }
}

fn resolve_forwards(
    cli: &Cli,
    host: &HostInfo,
    v4_enabled: bool,
    v6_enabled: bool,
) -> Result<(PortForwards, PortForwards), ConfigError> {
    let tcp = PortForwards::from_specs(&cli.tcp_ports, host.ephemeral_ports)
        .and_then(|table| table.check_families(v4_enabled, v6_enabled).map(|()| table))
        .map_err(ConfigError::TcpForwards)?;
    let udp = PortForwards::from_specs(&cli.udp_ports, host.ephemeral_ports)
        .and_then(|table| table.check_families(v4_enabled, v6_enabled).map(|()| table))
        .map_err(ConfigError::UdpForwards)?;
    if cli.no_tcp && !tcp.is_empty() {
        return Err(ConfigError::ForwardingDisabled {
            option: "-t/--tcp-ports",
            disabled_by: "--no-tcp",
        });
    }
    if cli.no_udp && !udp.is_empty() {
        return Err(ConfigError::ForwardingDisabled {
            option: "-u/--udp-ports",
            disabled_by: "--no-udp",
        });
    }
    Ok((tcp, udp))
}

impl NetConfig {
    /// Combines the command line with the host's configuration, filling every default
    /// the way passt does (see the module documentation). Pure: the host comes in as
    /// `host`, so tests can describe any host.
    pub fn resolve(cli: &Cli, host: &HostInfo) -> Result<NetConfig, ConfigError> {
        cli.validate()?;
        for (option, name) in [
            ("-i/--interface", &cli.interface),
            ("--outbound-if4", &cli.outbound_if4),
            ("--outbound-if6", &cli.outbound_if6),
        ] {
            if let Some(name) = name {
                if !host.has_interface(name) {
                    return Err(ConfigError::UnknownInterface {
                        option,
                        name: name.clone(),
                    });
                }
            }
        }

        let v4 = if cli.ipv6_only {
            None
        } else {
            Some(resolve_v4(cli, host)?)
        };
        let v6 = (!cli.ipv4_only).then(|| resolve_v6(cli, host));
        let (tcp_forwards, udp_forwards) = resolve_forwards(cli, host, v4.is_some(), v6.is_some())?;

        let dns_search = if cli.search.contains(&SearchList::None) {
            Vec::new()
        } else if cli.search.is_empty() {
            host.resolv_conf.search.clone()
        } else {
            cli.search
                .iter()
                .flat_map(|list| match list {
                    SearchList::Domains(domains) => domains.clone(),
                    SearchList::None => Vec::new(),
                })
                .collect()
        };

        let mtu = cli.mtu.unwrap_or(DEFAULT_MTU);
        if v6.is_some() && mtu < IPV6_MIN_MTU {
            tracing::warn!("MTU {mtu} is too small for IPv6 (minimum {IPV6_MIN_MTU})");
        }
        let ndp = v6.is_some() && !cli.no_ndp && !cli.no_icmp;
        let services = GuestServices {
            dhcp: v4.is_some() && !cli.no_dhcp,
            dhcpv6: v6.as_ref().is_some_and(V6Config::has_global_addr) && !cli.no_dhcpv6,
            ndp,
            router_advertisements: ndp && !cli.no_ra,
            advertise_dns: !cli.no_dhcp_dns,
            advertise_search: !cli.no_dhcp_search,
        };
        let interface = v4
            .as_ref()
            .and_then(|v4| v4.template_interface.clone())
            .or_else(|| v6.as_ref().and_then(|v6| v6.template_interface.clone()));

        Ok(NetConfig {
            our_mac: cli.mac_addr.unwrap_or(DEFAULT_OUR_MAC),
            guest_mac: None,
            mtu,
            v4,
            v6,
            dns_search,
            interface,
            services,
            handlers: ProtocolHandlers {
                tcp: !cli.no_tcp,
                udp: !cli.no_udp,
                icmp: !cli.no_icmp,
            },
            tcp_forwards,
            udp_forwards,
            freebind: cli.freebind,
            max_flows: cli
                .max_flows
                .map_or(crate::flow::DEFAULT_MAX_FLOWS, |n| n as usize),
            udp_idle_timeout: cli.udp_timeout.map_or(crate::udp::IDLE_TIMEOUT, |secs| {
                Duration::from_secs(u64::from(secs))
            }),
            hostname: cli.hostname.clone(),
            fqdn: cli.fqdn.clone(),
        })
    }
}

/// Where QEMU's vhost-user connection comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VhostUserEndpoint {
    /// Listen on this UNIX socket path (`-s`).
    Listen(PathBuf),
    /// Serve this inherited, connected socket (`--fd`).
    Inherited(RawFd),
    /// Listen on the first free path of [`default_socket_candidates`].
    ProbeDefault,
}

/// Where the repair helper's socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairSocket {
    /// `--repair-path none`, or `--fd` without `--repair-path` (as passt).
    Disabled,
    /// The default: the vhost-user socket path followed by `.repair`.
    NextToVhostUserSocket,
    /// `--repair-path PATH`.
    At(PathBuf),
}

impl RepairSocket {
    /// The path to listen on, given the vhost-user socket path actually used.
    pub fn path_for(&self, vhost_user_socket: Option<&Path>) -> Option<PathBuf> {
        match self {
            RepairSocket::Disabled => None,
            RepairSocket::At(path) => Some(path.clone()),
            RepairSocket::NextToVhostUserSocket => vhost_user_socket.map(|socket| {
                let mut path = socket.as_os_str().to_owned();
                path.push(".repair");
                PathBuf::from(path)
            }),
        }
    }
}

/// Candidate vhost-user socket paths when `-s` is not given, in order (passt probes
/// `/tmp/passt_1.socket` to `/tmp/passt_64.socket` the same way).
pub fn default_socket_candidates() -> impl Iterator<Item = PathBuf> {
    (1..=64).map(|index| PathBuf::from(format!("/tmp/baton_{index}.socket")))
}

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub level: LogLevel,
    /// `-l`.
    pub file: Option<PathBuf>,
    /// `--log-size`: the file never grows beyond this; oldest entries go first.
    pub file_size_limit: u64,
    /// Log to standard error (`--stderr`, or no `-l`).
    pub stderr: bool,
}

/// What happens around a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationPolicy {
    /// `--helper`: baton-repair binary started through the launcher (forked at
    /// start-up, see `crate::launcher`) whenever a migration needs one; `None`: wait
    /// for one to connect to the repair socket.
    pub helper: Option<PathBuf>,
    /// `--migrate-drop-tcp`: if TCP connections cannot be dumped, reset them and
    /// migrate the rest instead of failing the migration (the default).
    pub drop_unmigratable_tcp: bool,
    /// `--linger`: how long a source keeps its frozen sockets after a completed
    /// migration (0 with `--migrate-no-linger`).
    pub linger: Duration,
    /// `--migrate-exit`: exit after a completed migration as source, once `linger`
    /// has passed.
    pub exit_after_source_migration: bool,
}

/// Process-level settings: everything on the command line that is not the guest's
/// network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub endpoint: VhostUserEndpoint,
    pub repair_socket: RepairSocket,
    /// `-f`: stay in the foreground (default: fork to the background, as passt).
    pub foreground: bool,
    /// `-1`, implied by `--fd`: exit when the first QEMU connection closes.
    pub one_off: bool,
    /// `-P`.
    pub pid_file: Option<PathBuf>,
    /// `--runas`; `None` means: stay, unless started as root (then [`RunAs::nobody`]).
    pub runas: Option<RunAs>,
    pub log: LogConfig,
    pub migration: MigrationPolicy,
}

impl RuntimeConfig {
    /// The process settings the command line asks for.
    pub fn from_cli(cli: &Cli) -> Result<RuntimeConfig, ConfigError> {
        cli.validate()?;
        let endpoint = match (&cli.socket, cli.fd) {
            (Some(path), _) => VhostUserEndpoint::Listen(path.clone()),
            (None, Some(fd)) => VhostUserEndpoint::Inherited(fd),
            (None, None) => VhostUserEndpoint::ProbeDefault,
        };
        let repair_socket = match &cli.repair_path {
            Some(RepairPathArg::None) => RepairSocket::Disabled,
            Some(RepairPathArg::Path(path)) => RepairSocket::At(path.clone()),
            None if cli.fd.is_some() => RepairSocket::Disabled,
            None => RepairSocket::NextToVhostUserSocket,
        };
        let linger_secs = if cli.migrate_no_linger {
            0
        } else {
            cli.linger.unwrap_or(DEFAULT_LINGER_SECS)
        };
        Ok(RuntimeConfig {
            endpoint,
            repair_socket,
            foreground: cli.foreground,
            one_off: cli.one_off || cli.fd.is_some(),
            pid_file: cli.pid_file.clone(),
            runas: cli.runas.clone(),
            log: LogConfig {
                level: cli.log_level(),
                file: cli.log_file.clone(),
                file_size_limit: cli.log_size.unwrap_or(DEFAULT_LOG_FILE_SIZE),
                stderr: cli.stderr || cli.log_file.is_none(),
            },
            migration: MigrationPolicy {
                helper: cli.helper.clone(),
                drop_unmigratable_tcp: cli.migrate_drop_tcp,
                linger: Duration::from_secs(linger_secs),
                exit_after_source_migration: cli.migrate_exit,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::try_parse_args_from;
    use crate::hostinfo::{HostAddress, HostRoute, ResolvConf};
    use crate::ports::PortRange;

    fn cli(args: &[&str]) -> Cli {
        try_parse_args_from(std::iter::once("baton").chain(args.iter().copied()))
            .unwrap_or_else(|error| panic!("{args:?}: {error}"))
    }

    fn v4(text: &str) -> Ipv4Addr {
        text.parse().expect("IPv4 address")
    }

    fn v6(text: &str) -> Ipv6Addr {
        text.parse().expect("IPv6 address")
    }

    fn route(
        interface: &str,
        destination: &str,
        prefix_len: u8,
        gateway: Option<&str>,
    ) -> HostRoute {
        HostRoute {
            interface: interface.into(),
            destination: destination.parse().expect("address"),
            prefix_len,
            gateway: gateway.map(|gw| gw.parse().expect("address")),
            metric: 100,
        }
    }

    fn address(interface: &str, addr: &str, prefix_len: u8) -> HostAddress {
        HostAddress {
            interface: interface.into(),
            addr: addr.parse().expect("address"),
            prefix_len,
        }
    }

    /// A typical IPv4-only host: 192.168.1.118/24 via 192.168.1.1 on eth0.
    fn host_v4() -> HostInfo {
        HostInfo {
            interfaces: vec!["lo".into(), "eth0".into()],
            routes: vec![
                route("eth0", "0.0.0.0", 0, Some("192.168.1.1")),
                route("eth0", "192.168.1.0", 24, None),
            ],
            addresses: vec![
                address("lo", "127.0.0.1", 8),
                address("eth0", "192.168.1.118", 24),
            ],
            resolv_conf: ResolvConf {
                nameservers: vec!["192.168.1.1".parse().expect("address")],
                search: vec!["example.com".into()],
            },
            ephemeral_ports: PortRange::new(32768, 60999).expect("range"),
        }
    }

    /// A typical IPv6-only host: 2001:db8::118 with a link-local default router.
    fn host_v6() -> HostInfo {
        HostInfo {
            interfaces: vec!["lo".into(), "eth0".into()],
            routes: vec![
                route("eth0", "::", 0, Some("fe80::62e3:27ff:fe33:2b01")),
                route("eth0", "2001:db8::", 64, None),
            ],
            addresses: vec![
                address("eth0", "fe80::5c90:2ff:feeb:b02a", 64),
                address("eth0", "2001:db8::118", 128),
            ],
            resolv_conf: ResolvConf {
                nameservers: vec!["2001:db8::53".parse().expect("address")],
                search: vec![],
            },
            ..HostInfo::default()
        }
    }

    fn host_dual() -> HostInfo {
        let (a, b) = (host_v4(), host_v6());
        HostInfo {
            interfaces: a.interfaces,
            routes: [a.routes, b.routes].concat(),
            addresses: [a.addresses, b.addresses].concat(),
            resolv_conf: ResolvConf {
                nameservers: [a.resolv_conf.nameservers, b.resolv_conf.nameservers].concat(),
                search: a.resolv_conf.search,
            },
            ephemeral_ports: a.ephemeral_ports,
        }
    }

    fn resolve(args: &[&str], host: &HostInfo) -> NetConfig {
        NetConfig::resolve(&cli(args), host).unwrap_or_else(|error| panic!("{args:?}: {error}"))
    }

    #[test]
    fn dual_stack_host_defaults_follow_the_host() {
        let config = resolve(&[], &host_dual());
        let ipv4 = config.v4.as_ref().expect("IPv4");
        assert_eq!((ipv4.addr, ipv4.prefix_len), (v4("192.168.1.118"), 24));
        assert_eq!(ipv4.gateway, v4("192.168.1.1"));
        assert_eq!(ipv4.map_host_loopback, Some(v4("192.168.1.1")));
        assert_eq!(ipv4.map_guest_addr, None);
        assert_eq!(ipv4.template_interface.as_deref(), Some("eth0"));
        let ipv6 = config.v6.as_ref().expect("IPv6");
        assert_eq!(ipv6.addr, v6("2001:db8::118"));
        assert_eq!(ipv6.prefix_len, 64);
        assert_eq!(ipv6.gateway, v6("fe80::62e3:27ff:fe33:2b01"));
        assert_eq!(ipv6.router_link_local, ipv6.gateway);
        assert_eq!(ipv6.map_host_loopback, Some(ipv6.gateway));
        assert_eq!(ipv6.dns, vec![v6("2001:db8::53")]);
        assert_eq!(config.mtu, DEFAULT_MTU);
        assert_eq!(config.our_mac, DEFAULT_OUR_MAC);
        assert_eq!(config.guest_mac, None);
        assert_eq!(config.interface.as_deref(), Some("eth0"));
        assert_eq!(config.dns_search, vec!["example.com".to_owned()]);
        assert!(config.services.dhcp && config.services.dhcpv6 && config.services.ndp);
        assert!(config.services.router_advertisements);
        assert!(config.handlers.tcp && config.handlers.udp && config.handlers.icmp);
        assert!(config.tcp_forwards.is_empty() && config.udp_forwards.is_empty());
    }

    #[test]
    fn gateway_that_is_also_the_resolver_is_forwarded() {
        let ipv4 = resolve(&[], &host_v4()).v4.expect("IPv4");
        assert_eq!(ipv4.dns, vec![v4("192.168.1.1")]);
        assert_eq!(ipv4.dns_forward, Some(v4("192.168.1.1")));
        assert_eq!(ipv4.dns_host, Some(v4("192.168.1.1")));
    }

    #[test]
    fn ipv4_only_host_gets_ipv6_local_mode() {
        let config = resolve(&[], &host_v4());
        let ipv6 = config.v6.expect("IPv6 stays on, link-local only");
        assert!(!ipv6.has_global_addr());
        assert_eq!(ipv6.gateway, LOCAL_MODE_GATEWAY_V6);
        assert_eq!(ipv6.router_link_local, LOCAL_MODE_GATEWAY_V6);
        assert_eq!(ipv6.dns, Vec::<Ipv6Addr>::new());
        assert!(!config.services.dhcpv6);
        assert!(config.services.ndp);
    }

    #[test]
    fn ipv6_only_host_gets_ipv4_local_mode() {
        let config = resolve(&[], &host_v6());
        let ipv4 = config.v4.expect("IPv4 stays on in local mode");
        assert_eq!(ipv4.addr, LOCAL_MODE_ADDR_V4);
        assert_eq!(ipv4.prefix_len, LOCAL_MODE_PREFIX_V4);
        assert_eq!(ipv4.gateway, LOCAL_MODE_GATEWAY_V4);
        assert_eq!(ipv4.map_host_loopback, Some(LOCAL_MODE_GATEWAY_V4));
        assert_eq!(ipv4.template_interface, None);
        assert_eq!(config.interface.as_deref(), Some("eth0"));
    }

    #[test]
    fn host_without_routes_uses_local_mode_for_both() {
        let config = resolve(&[], &HostInfo::default());
        assert_eq!(config.v4.as_ref().map(|c| c.addr), Some(LOCAL_MODE_ADDR_V4));
        assert_eq!(
            config.v6.as_ref().map(|c| c.gateway),
            Some(LOCAL_MODE_GATEWAY_V6)
        );
        assert_eq!(config.interface, None);
        assert!(config.dns_search.is_empty());
    }

    #[test]
    fn explicit_address_and_gateway_need_no_host_route() {
        let config = resolve(
            &[
                "-a",
                "10.0.0.2/24",
                "-g",
                "10.0.0.1",
                "-a",
                "2001:db8::2",
                "-g",
                "fe80::1",
            ],
            &HostInfo::default(),
        );
        let ipv4 = config.v4.expect("IPv4");
        assert_eq!(
            (ipv4.addr, ipv4.prefix_len, ipv4.gateway),
            (v4("10.0.0.2"), 24, v4("10.0.0.1"))
        );
        assert_eq!(ipv4.map_host_loopback, Some(v4("10.0.0.1")));
        let ipv6 = config.v6.expect("IPv6");
        assert_eq!((ipv6.addr, ipv6.prefix_len), (v6("2001:db8::2"), 64));
        assert!(config.services.dhcpv6);
    }

    #[test]
    fn ipv4_address_without_any_gateway_is_an_error() {
        let error = NetConfig::resolve(&cli(&["-a", "10.0.0.2"]), &HostInfo::default())
            .expect_err("no gateway");
        assert!(matches!(
            error,
            ConfigError::Ipv4AddressWithoutGateway { .. }
        ));
        assert!(error.to_string().contains("give one with -g"), "{error}");
        let error = NetConfig::resolve(&cli(&["-g", "10.0.0.1"]), &HostInfo::default())
            .expect_err("no address");
        assert!(matches!(
            error,
            ConfigError::Ipv4GatewayWithoutAddress { .. }
        ));
    }

    #[test]
    fn explicit_values_override_the_host() {
        let config = resolve(
            &[
                "-a",
                "10.1.2.3",
                "-g",
                "10.1.2.254",
                "-m",
                "1500",
                "-M",
                "02:00:00:00:00:01",
                "-D",
                "9.9.9.9",
                "-S",
                "corp.example lab.example",
                "-H",
                "vm1",
                "--fqdn",
                "vm1.corp.example",
            ],
            &host_dual(),
        );
        let ipv4 = config.v4.expect("IPv4");
        assert_eq!((ipv4.addr, ipv4.prefix_len), (v4("10.1.2.3"), 8));
        assert_eq!(ipv4.gateway, v4("10.1.2.254"));
        assert_eq!(ipv4.dns, vec![v4("9.9.9.9")]);
        assert_eq!(config.v6.expect("IPv6").dns, vec![v6("2001:db8::53")]);
        assert_eq!(config.mtu, 1500);
        assert_eq!(config.our_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(
            config.dns_search,
            vec!["corp.example".to_owned(), "lab.example".to_owned()]
        );
        assert_eq!(config.hostname.as_deref(), Some("vm1"));
        assert_eq!(config.fqdn.as_deref(), Some("vm1.corp.example"));
    }

    #[test]
    fn netmask_and_classful_prefixes() {
        let prefix = |args: &[&str]| resolve(args, &host_v4()).v4.expect("IPv4").prefix_len;
        assert_eq!(prefix(&["-n", "16"]), 16);
        assert_eq!(prefix(&["-a", "172.16.0.5"]), 16);
        assert_eq!(prefix(&["-a", "192.0.2.5"]), 24);
        assert_eq!(prefix(&["-a", "192.0.2.5", "-n", "255.255.255.128"]), 25);
        assert_eq!(prefix(&["-a", "10.0.0.5/30"]), 30);
    }

    #[test]
    fn ipv4_only_and_ipv6_only() {
        let config = resolve(&["-4"], &host_dual());
        assert!(config.v4.is_some() && config.v6.is_none());
        assert!(!config.services.ndp && !config.services.dhcpv6 && config.services.dhcp);
        let config = resolve(&["-6"], &host_dual());
        assert!(config.v4.is_none() && config.v6.is_some());
        assert!(!config.services.dhcp && config.services.ndp);
        assert_eq!(config.interface.as_deref(), Some("eth0"));
    }

    #[test]
    fn no_map_gw_disables_the_loopback_mapping() {
        let config = resolve(&["--no-map-gw"], &host_dual());
        assert_eq!(config.v4.as_ref().and_then(|c| c.map_host_loopback), None);
        assert_eq!(config.v6.as_ref().and_then(|c| c.map_host_loopback), None);
        let config = resolve(&["--map-host-loopback", "none"], &host_dual());
        assert_eq!(config.v4.as_ref().and_then(|c| c.map_host_loopback), None);
        assert_eq!(config.v6.as_ref().and_then(|c| c.map_host_loopback), None);
    }

    #[test]
    fn explicit_mappings() {
        let config = resolve(
            &[
                "--map-host-loopback",
                "10.0.2.2",
                "--map-guest-addr",
                "10.0.2.15",
            ],
            &host_dual(),
        );
        let ipv4 = config.v4.expect("IPv4");
        assert_eq!(ipv4.map_host_loopback, Some(v4("10.0.2.2")));
        assert_eq!(ipv4.map_guest_addr, Some(v4("10.0.2.15")));
        let ipv6 = config.v6.expect("IPv6");
        assert_eq!(ipv6.map_host_loopback, Some(ipv6.gateway));
        assert_eq!(ipv6.map_guest_addr, None);
    }

    fn host_with_stub_resolver() -> HostInfo {
        let mut host = host_v4();
        host.resolv_conf.nameservers = vec![
            "127.0.0.53".parse().expect("address"),
            "192.0.2.53".parse().expect("address"),
        ];
        host
    }

    #[test]
    fn loopback_resolver_is_replaced_by_the_gateway_and_forwarded() {
        let ipv4 = resolve(&[], &host_with_stub_resolver()).v4.expect("IPv4");
        assert_eq!(ipv4.dns, vec![v4("192.168.1.1"), v4("192.0.2.53")]);
        assert_eq!(ipv4.dns_forward, Some(v4("192.168.1.1")));
        assert_eq!(ipv4.dns_host, Some(v4("127.0.0.53")));
    }

    #[test]
    fn loopback_resolver_without_mapping_is_skipped() {
        let ipv4 = resolve(&["--no-map-gw"], &host_with_stub_resolver())
            .v4
            .expect("IPv4");
        assert_eq!(ipv4.dns, vec![v4("192.0.2.53")]);
        assert_eq!(ipv4.dns_forward, None);
    }

    #[test]
    fn loopback_resolver_with_dns_forward_advertises_the_forward_address() {
        let ipv4 = resolve(
            &[
                "--no-map-gw",
                "--dns-forward",
                "10.0.2.3",
                "--dns-host",
                "192.0.2.99",
            ],
            &host_with_stub_resolver(),
        )
        .v4
        .expect("IPv4");
        assert_eq!(ipv4.dns, vec![v4("10.0.2.3"), v4("192.0.2.53")]);
        assert_eq!(ipv4.dns_forward, Some(v4("10.0.2.3")));
        assert_eq!(ipv4.dns_host, Some(v4("192.0.2.99")));
    }

    #[test]
    fn dns_none_advertises_nothing() {
        let config = resolve(&["-D", "none"], &host_dual());
        assert!(config
            .v4
            .as_ref()
            .is_some_and(|c| c.dns.is_empty() && c.dns_forward.is_none()));
        assert!(config.v6.as_ref().is_some_and(|c| c.dns.is_empty()));
        assert_eq!(config.dns_search, vec!["example.com".to_owned()]);
        let config = resolve(&["-S", "none"], &host_dual());
        assert!(config.dns_search.is_empty());
    }

    #[test]
    fn at_most_three_distinct_servers_per_family() {
        let mut host = host_v4();
        host.resolv_conf.nameservers = [
            "192.0.2.1",
            "192.0.2.2",
            "192.0.2.1",
            "192.0.2.3",
            "192.0.2.4",
        ]
        .iter()
        .map(|text| text.parse().expect("address"))
        .collect();
        let dns = resolve(&[], &host).v4.expect("IPv4").dns;
        assert_eq!(dns, vec![v4("192.0.2.1"), v4("192.0.2.2"), v4("192.0.2.3")]);
    }

    #[test]
    fn interface_option_selects_the_template() {
        let mut host = host_v4();
        host.interfaces.push("wlan0".into());
        host.routes
            .push(route("wlan0", "0.0.0.0", 0, Some("10.9.0.1")));
        host.addresses.push(address("wlan0", "10.9.0.7", 16));
        let ipv4 = resolve(&["-i", "wlan0"], &host).v4.expect("IPv4");
        assert_eq!(
            (ipv4.addr, ipv4.prefix_len, ipv4.gateway),
            (v4("10.9.0.7"), 16, v4("10.9.0.1"))
        );
        let ipv4 = resolve(&["--outbound-if4", "wlan0"], &host)
            .v4
            .expect("IPv4");
        assert_eq!(ipv4.outbound_interface.as_deref(), Some("wlan0"));
        assert_eq!(ipv4.addr, v4("10.9.0.7"));
        let error = NetConfig::resolve(&cli(&["-i", "eth9"]), &host).expect_err("unknown");
        assert_eq!(
            error,
            ConfigError::UnknownInterface {
                option: "-i/--interface",
                name: "eth9".into()
            }
        );
    }

    #[test]
    fn ipv6_router_link_local_comes_from_the_interface_for_a_global_gateway() {
        let config = resolve(&["-g", "2001:db8::1"], &host_v6());
        let ipv6 = config.v6.expect("IPv6");
        assert_eq!(ipv6.gateway, v6("2001:db8::1"));
        assert_eq!(ipv6.router_link_local, v6("fe80::5c90:2ff:feeb:b02a"));
    }

    #[test]
    fn explicit_ipv6_prefix_is_honoured() {
        let ipv6 = resolve(&["-a", "2001:db8::7/56"], &host_v6())
            .v6
            .expect("IPv6");
        assert_eq!((ipv6.addr, ipv6.prefix_len), (v6("2001:db8::7"), 56));
    }

    #[test]
    fn protocol_switches() {
        let config = resolve(
            &[
                "--no-icmp",
                "--no-dhcp",
                "--no-dhcp-dns",
                "--no-dhcp-search",
                "--no-udp",
            ],
            &host_dual(),
        );
        assert!(!config.handlers.icmp && !config.handlers.udp && config.handlers.tcp);
        assert!(!config.services.ndp && !config.services.router_advertisements);
        assert!(!config.services.dhcp && config.services.dhcpv6);
        assert!(!config.services.advertise_dns && !config.services.advertise_search);
        let config = resolve(&["--no-ra", "--no-dhcpv6"], &host_dual());
        assert!(config.services.ndp && !config.services.router_advertisements);
        assert!(!config.services.dhcpv6);
    }

    #[test]
    fn port_forwards_use_the_hosts_ephemeral_range() {
        let config = resolve(
            &["-t", "all", "-u", "53,5353:53535", "--freebind"],
            &host_v4(),
        );
        assert_eq!(config.tcp_forwards.guest_port_for(32767), Some(32767));
        assert_eq!(config.tcp_forwards.guest_port_for(32768), None);
        assert_eq!(config.tcp_forwards.guest_port_for(61000), Some(61000));
        assert_eq!(config.udp_forwards.guest_port_for(5353), Some(53535));
        assert!(config.freebind);
    }

    #[test]
    fn udp_timeout_defaults_to_passts_and_can_be_set() {
        let config = resolve(&[], &host_dual());
        assert_eq!(config.udp_idle_timeout, Duration::from_secs(180));
        let config = resolve(&["--udp-timeout", "3"], &host_dual());
        assert_eq!(config.udp_idle_timeout, Duration::from_secs(3));
        for bad in ["0", "86401", "-1", "1.5"] {
            assert!(
                crate::cli::try_parse_args_from(["baton", "--udp-timeout", bad]).is_err(),
                "--udp-timeout {bad} accepted"
            );
        }
    }

    #[test]
    fn port_forward_errors() {
        let error =
            |args: &[&str]| NetConfig::resolve(&cli(args), &host_dual()).expect_err("refused");
        assert!(matches!(
            error(&["-t", "22", "-t", "20-30"]),
            ConfigError::TcpForwards(_)
        ));
        assert!(matches!(
            error(&["-4", "-u", "[::1]/53"]),
            ConfigError::UdpForwards(_)
        ));
        assert_eq!(
            error(&["--no-tcp", "-t", "22"]),
            ConfigError::ForwardingDisabled {
                option: "-t/--tcp-ports",
                disabled_by: "--no-tcp"
            }
        );
        assert!(resolve(&["--no-tcp", "-t", "none"], &host_dual())
            .tcp_forwards
            .is_empty());
    }

    #[test]
    fn resolve_rejects_an_unvalidated_conflicting_command_line() {
        let conflicting = Cli {
            ipv4_only: true,
            ipv6_only: true,
            ..Cli::default()
        };
        assert!(matches!(
            NetConfig::resolve(&conflicting, &host_dual()),
            Err(ConfigError::Cli(CliError::Conflict { .. }))
        ));
    }

    #[test]
    fn runtime_defaults() {
        let runtime = RuntimeConfig::from_cli(&cli(&["-s", "/run/vm.socket"])).expect("valid");
        assert_eq!(
            runtime.endpoint,
            VhostUserEndpoint::Listen("/run/vm.socket".into())
        );
        assert_eq!(runtime.repair_socket, RepairSocket::NextToVhostUserSocket);
        assert_eq!(
            runtime
                .repair_socket
                .path_for(Some(Path::new("/run/vm.socket"))),
            Some(PathBuf::from("/run/vm.socket.repair"))
        );
        assert_eq!(
            runtime.migration.linger,
            Duration::from_secs(DEFAULT_LINGER_SECS)
        );
        assert!(!runtime.migration.drop_unmigratable_tcp);
        assert_eq!(runtime.log.level, LogLevel::Info);
        assert!(runtime.log.stderr);
        assert_eq!(runtime.log.file_size_limit, DEFAULT_LOG_FILE_SIZE);
        assert!(!runtime.one_off && !runtime.foreground);
        assert_eq!(
            RuntimeConfig::from_cli(&cli(&[])).expect("valid").endpoint,
            VhostUserEndpoint::ProbeDefault
        );
        assert_eq!(
            default_socket_candidates().next(),
            Some(PathBuf::from("/tmp/baton_1.socket"))
        );
        assert_eq!(default_socket_candidates().count(), 64);
    }

    #[test]
    fn runtime_options() {
        let runtime = RuntimeConfig::from_cli(&cli(&["--fd", "5"])).expect("valid");
        assert_eq!(runtime.endpoint, VhostUserEndpoint::Inherited(5));
        assert!(runtime.one_off);
        assert_eq!(runtime.repair_socket, RepairSocket::Disabled);
        let runtime = RuntimeConfig::from_cli(&cli(&[
            "--repair-path",
            "/run/r.sock",
            "--migrate-no-linger",
            "--migrate-exit",
            "--migrate-drop-tcp",
            "--helper",
            "/usr/bin/baton-repair",
            "-l",
            "/tmp/log",
            "--trace",
        ]))
        .expect("valid");
        assert_eq!(
            runtime.repair_socket.path_for(None),
            Some(PathBuf::from("/run/r.sock"))
        );
        assert_eq!(runtime.migration.linger, Duration::ZERO);
        assert!(runtime.migration.exit_after_source_migration);
        assert!(runtime.migration.drop_unmigratable_tcp);
        assert_eq!(
            runtime.migration.helper,
            Some(PathBuf::from("/usr/bin/baton-repair"))
        );
        assert!(!runtime.log.stderr);
        assert_eq!(runtime.log.level, LogLevel::Trace);
        let runtime = RuntimeConfig::from_cli(&cli(&["--repair-path", "none"])).expect("valid");
        assert_eq!(runtime.repair_socket.path_for(Some(Path::new("/x"))), None);
    }
}
