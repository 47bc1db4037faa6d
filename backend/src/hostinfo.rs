//! What baton reads from the host at start-up to derive passt-like defaults.
//!
//! [`HostInfo`] is a plain snapshot: routes, interface addresses, the resolver
//! configuration and the ephemeral port range. [`HostInfo::detect`] fills it from the
//! running system (`/proc/net/route`, `/proc/net/ipv6_route`, `getifaddrs(3)`,
//! `/etc/resolv.conf`, `/proc/sys/net/ipv4/ip_local_port_range`); tests build one by
//! hand and hand it to [`crate::config::NetConfig::resolve`], which is pure.
//!
//! Missing files are not errors: a kernel without IPv6 has no `ipv6_route`, a fresh
//! container may have no `resolv.conf`. Files that exist but cannot be read or parsed
//! are.
//!
//! Template interface selection follows passt (`nl_get_ext_if`): the interface of the
//! default route (lowest metric first, then kernel order), else the first interface
//! with any route that is neither on `lo` nor towards a link-local prefix.

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::ports::{PortRange, RFC6335_EPHEMERAL_PORTS};

const PROC_NET_ROUTE: &str = "/proc/net/route";
const PROC_NET_IPV6_ROUTE: &str = "/proc/net/ipv6_route";
const RESOLV_CONF: &str = "/etc/resolv.conf";
const IP_LOCAL_PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Route flags shared by `/proc/net/route` and `/proc/net/ipv6_route`
/// (`include/uapi/linux/route.h`, `ipv6_route.h`).
const RTF_UP: u32 = 0x0001;
const RTF_GATEWAY: u32 = 0x0002;
const RTF_REJECT: u32 = 0x0200;
const RTF_CACHE: u32 = 0x0100_0000;
const RTF_ANYCAST: u32 = 0x0010_0000;
const RTF_LOCAL: u32 = 0x8000_0000;

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(addr: IpAddr) -> IpFamily {
        if addr.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }
}

/// One usable unicast route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoute {
    pub interface: String,
    pub destination: IpAddr,
    pub prefix_len: u8,
    /// Next hop, for routes through a gateway.
    pub gateway: Option<IpAddr>,
    pub metric: u32,
}

impl HostRoute {
    pub fn is_default(&self) -> bool {
        self.prefix_len == 0
    }

    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.destination)
    }

    fn is_towards_link_local(&self) -> bool {
        match self.destination {
            IpAddr::V4(dst) => self.prefix_len >= 16 && dst.is_link_local(),
            IpAddr::V6(dst) => self.prefix_len >= 10 && dst.segments()[0] & 0xffc0 == 0xfe80,
        }
    }
}

/// An address configured on a host interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    pub interface: String,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl HostAddress {
    /// Usable as the guest's address: not loopback, link-local, multicast or
    /// unspecified (IPv6 unique-local addresses count, as for the kernel's "global"
    /// scope).
    pub fn is_global(&self) -> bool {
        match self.addr {
            IpAddr::V4(addr) => {
                !(addr.is_loopback() || addr.is_link_local() || addr.is_unspecified())
            }
            IpAddr::V6(addr) => {
                !(addr.is_loopback()
                    || is_ipv6_link_local(addr)
                    || addr.is_multicast()
                    || addr.is_unspecified())
            }
        }
    }
}

/// Whether `addr` is in fe80::/10.
pub fn is_ipv6_link_local(addr: Ipv6Addr) -> bool {
    addr.segments()[0] & 0xffc0 == 0xfe80
}

/// The parts of `/etc/resolv.conf` baton uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` lines, in order (IPv6 zone suffixes dropped).
    pub nameservers: Vec<IpAddr>,
    /// The last `search` or `domain` line, as the resolver reads it.
    pub search: Vec<String>,
}

/// A snapshot of the host's network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// Every interface name, with or without addresses.
    pub interfaces: Vec<String>,
    pub routes: Vec<HostRoute>,
    pub addresses: Vec<HostAddress>,
    pub resolv_conf: ResolvConf,
    /// Ports the kernel picks for outgoing connections, left out of `-t all`.
    pub ephemeral_ports: PortRange,
}

impl Default for HostInfo {
    /// A host with nothing: no interface, no route, no resolver (a fresh netns).
    fn default() -> Self {
        HostInfo {
            interfaces: Vec::new(),
            routes: Vec::new(),
            addresses: Vec::new(),
            resolv_conf: ResolvConf::default(),
            ephemeral_ports: RFC6335_EPHEMERAL_PORTS,
        }
    }
}

/// Why the host's configuration could not be read.
#[derive(Debug, Error)]
pub enum HostInfoError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}, line {line}: {reason}")]
    Parse {
        path: &'static str,
        line: usize,
        reason: String,
    },
    #[error("listing interface addresses: {0}")]
    InterfaceAddresses(#[source] nix::Error),
}

/// The file's contents, or `None` if it does not exist.
fn read_optional(path: &'static str) -> Result<Option<String>, HostInfoError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HostInfoError::Read { path, source }),
    }
}

impl HostInfo {
    /// Reads the running host's configuration.
    pub fn detect() -> Result<HostInfo, HostInfoError> {
        let mut routes = match read_optional(PROC_NET_ROUTE)? {
            Some(text) => parse_proc_net_route(&text)?,
            None => Vec::new(),
        };
        if let Some(text) = read_optional(PROC_NET_IPV6_ROUTE)? {
            routes.extend(parse_proc_net_ipv6_route(&text)?);
        }
        let (interfaces, addresses) = read_interface_addresses()?;
        let resolv_conf = read_optional(RESOLV_CONF)?
            .map(|text| parse_resolv_conf(&text))
            .unwrap_or_default();
        let ephemeral_ports = read_optional(IP_LOCAL_PORT_RANGE)?
            .and_then(|text| parse_ip_local_port_range(&text))
            .unwrap_or(RFC6335_EPHEMERAL_PORTS);
        Ok(HostInfo {
            interfaces,
            routes,
            addresses,
            resolv_conf,
            ephemeral_ports,
        })
    }

    pub fn has_interface(&self, name: &str) -> bool {
        self.interfaces.iter().any(|known| known == name)
            || self.routes.iter().any(|route| route.interface == name)
            || self
                .addresses
                .iter()
                .any(|address| address.interface == name)
    }

    /// The interface passt would take `family` defaults from: the default route's,
    /// else the first with any non-link-local route.
    pub fn template_interface(&self, family: IpFamily) -> Option<&str> {
        let routes = || {
            self.routes
                .iter()
                .filter(move |route| route.family() == family && route.interface != "lo")
        };
        routes()
            .filter(|route| route.is_default())
            .min_by_key(|route| route.metric)
            .or_else(|| routes().find(|route| !route.is_towards_link_local()))
            .map(|route| route.interface.as_str())
    }

    /// The gateway of the preferred `family` default route through `interface`.
    pub fn default_gateway(&self, interface: &str, family: IpFamily) -> Option<IpAddr> {
        self.routes
            .iter()
            .filter(|route| {
                route.family() == family && route.is_default() && route.interface == interface
            })
            .filter_map(|route| route.gateway.map(|gateway| (route.metric, gateway)))
            .min_by_key(|(metric, _)| *metric)
            .map(|(_, gateway)| gateway)
    }

    /// The first global `family` address on `interface`, with its prefix length.
    pub fn global_address(&self, interface: &str, family: IpFamily) -> Option<(IpAddr, u8)> {
        self.addresses
            .iter()
            .find(|address| {
                address.interface == interface
                    && IpFamily::of(address.addr) == family
                    && address.is_global()
            })
            .map(|address| (address.addr, address.prefix_len))
    }

    /// The first IPv6 link-local address on `interface`.
    pub fn link_local_v6(&self, interface: &str) -> Option<Ipv6Addr> {
        self.addresses
            .iter()
            .find_map(|address| match address.addr {
                IpAddr::V6(addr) if address.interface == interface && is_ipv6_link_local(addr) => {
                    Some(addr)
                }
                _ => None,
            })
    }
}

/// Interface names and their IPv4/IPv6 addresses, from `getifaddrs(3)`.
fn read_interface_addresses() -> Result<(Vec<String>, Vec<HostAddress>), HostInfoError> {
    let mut interfaces: Vec<String> = Vec::new();
    let mut addresses = Vec::new();
    for entry in nix::ifaddrs::getifaddrs().map_err(HostInfoError::InterfaceAddresses)? {
        if !interfaces.contains(&entry.interface_name) {
            interfaces.push(entry.interface_name.clone());
        }
        let Some(address) = entry.address else {
            continue;
        };
        let netmask = entry.netmask;
        let (addr, prefix_len) = if let Some(v4) = address.as_sockaddr_in() {
            let mask = netmask
                .as_ref()
                .and_then(|mask| mask.as_sockaddr_in())
                .map_or(32, |mask| u32::from(mask.ip()).count_ones());
            (IpAddr::V4(v4.ip()), mask)
        } else if let Some(v6) = address.as_sockaddr_in6() {
            let mask = netmask
                .as_ref()
                .and_then(|mask| mask.as_sockaddr_in6())
                .map_or(128, |mask| u128::from(mask.ip()).count_ones());
            (IpAddr::V6(v6.ip()), mask)
        } else {
            continue;
        };
        addresses.push(HostAddress {
            interface: entry.interface_name,
            addr,
            prefix_len: u8::try_from(prefix_len).unwrap_or(u8::MAX),
        });
    }
    Ok((interfaces, addresses))
}

fn parse_hex_u32(
    path: &'static str,
    line: usize,
    field: &str,
    what: &str,
) -> Result<u32, HostInfoError> {
    u32::from_str_radix(field, 16).map_err(|_| HostInfoError::Parse {
        path,
        line,
        reason: format!("{what} '{field}' is not hexadecimal"),
    })
}

/// Parses `/proc/net/route` (IPv4 main table; addresses are printed as the
/// native-endian value of the network-order bytes). Routes that are down, rejecting,
/// or on `lo` are left out.
pub fn parse_proc_net_route(text: &str) -> Result<Vec<HostRoute>, HostInfoError> {
    let path = PROC_NET_ROUTE;
    let mut routes = Vec::new();
    for (index, line) in text.lines().enumerate().skip(1) {
        let line_number = index + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let [interface, destination, gateway, flags, _refcnt, _use, metric, mask, ..] = fields[..]
        else {
            return Err(HostInfoError::Parse {
                path,
                line: line_number,
                reason: format!("expected at least 8 fields, found {}", fields.len()),
            });
        };
        let flags = parse_hex_u32(path, line_number, flags, "flags")?;
        let to_addr = |value: u32| Ipv4Addr::from(value.to_ne_bytes());
        let destination = to_addr(parse_hex_u32(
            path,
            line_number,
            destination,
            "destination",
        )?);
        let gateway = to_addr(parse_hex_u32(path, line_number, gateway, "gateway")?);
        let mask = parse_hex_u32(path, line_number, mask, "mask")?;
        let metric: u32 = metric.parse().map_err(|_| HostInfoError::Parse {
            path,
            line: line_number,
            reason: format!("metric '{metric}' is not a number"),
        })?;
        if flags & RTF_UP == 0 || flags & RTF_REJECT != 0 || interface == "lo" {
            continue;
        }
        let has_gateway = flags & RTF_GATEWAY != 0 && !gateway.is_unspecified();
        routes.push(HostRoute {
            interface: interface.to_owned(),
            destination: IpAddr::V4(destination),
            prefix_len: u8::try_from(mask.count_ones()).unwrap_or(32),
            gateway: has_gateway.then_some(IpAddr::V4(gateway)),
            metric,
        });
    }
    Ok(routes)
}

fn parse_hex_ipv6(path: &'static str, line: usize, field: &str) -> Result<Ipv6Addr, HostInfoError> {
    if field.len() != 32 {
        return Err(HostInfoError::Parse {
            path,
            line,
            reason: format!("'{field}' is not 32 hexadecimal digits"),
        });
    }
    u128::from_str_radix(field, 16)
        .map(Ipv6Addr::from)
        .map_err(|_| HostInfoError::Parse {
            path,
            line,
            reason: format!("'{field}' is not hexadecimal"),
        })
}

/// Parses `/proc/net/ipv6_route`. Local, anycast, cached, rejecting and multicast
/// routes, those that are down and those on `lo` are left out.
pub fn parse_proc_net_ipv6_route(text: &str) -> Result<Vec<HostRoute>, HostInfoError> {
    let path = PROC_NET_IPV6_ROUTE;
    let mut routes = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        let [destination, prefix_len, _source, _source_len, next_hop, metric, _refcnt, _use, flags, interface] =
            fields[..]
        else {
            return Err(HostInfoError::Parse {
                path,
                line: line_number,
                reason: format!("expected 10 fields, found {}", fields.len()),
            });
        };
        let destination = parse_hex_ipv6(path, line_number, destination)?;
        let prefix_len = parse_hex_u32(path, line_number, prefix_len, "prefix length")?;
        let next_hop = parse_hex_ipv6(path, line_number, next_hop)?;
        let metric = parse_hex_u32(path, line_number, metric, "metric")?;
        let flags = parse_hex_u32(path, line_number, flags, "flags")?;
        let unusable = RTF_REJECT | RTF_LOCAL | RTF_ANYCAST | RTF_CACHE;
        if flags & RTF_UP == 0
            || flags & unusable != 0
            || interface == "lo"
            || destination.is_multicast()
            || prefix_len > 128
        {
            continue;
        }
        let has_gateway = flags & RTF_GATEWAY != 0 && !next_hop.is_unspecified();
        routes.push(HostRoute {
            interface: interface.to_owned(),
            destination: IpAddr::V6(destination),
            prefix_len: u8::try_from(prefix_len).unwrap_or(128),
            gateway: has_gateway.then_some(IpAddr::V6(next_hop)),
            metric,
        });
    }
    Ok(routes)
}

/// Parses `resolv.conf(5)`: `nameserver` lines in order, and the last `search` or
/// `domain` line. Comments (`#`, `;`) and unparsable addresses are skipped, as the
/// resolver does.
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut resolv_conf = ResolvConf::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                let Some(server) = words.next() else {
                    continue;
                };
                let server = server.split('%').next().unwrap_or_default();
                if let Ok(addr) = server.parse::<IpAddr>() {
                    resolv_conf.nameservers.push(addr);
                }
            }
            Some("search") | Some("domain") => {
                resolv_conf.search = words.map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    resolv_conf
}

/// Parses `ip_local_port_range` ("FIRST<tab>LAST").
pub fn parse_ip_local_port_range(text: &str) -> Option<PortRange> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    let first = numbers.next()?.ok()?;
    let last = numbers.next()?.ok()?;
    if numbers.next().is_some() {
        return None;
    }
    PortRange::new(first, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE_V4: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
wlan0\t00000000\t0101000A\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth1\t0000FEA9\t00000000\t0001\t0\t0\t1000\t0000FFFF\t0\t0\t0
";

    const ROUTE_V6: &str = "\
20010db8000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe80000000000000022a10fffe000001 00000400 00000001 00000000 00450003 eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo
20010db8000000000000000000000005 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001 eth0
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001 eth0
";

    #[test]
    fn ipv4_routes_are_decoded_in_network_order() {
        let routes = parse_proc_net_route(ROUTE_V4).expect("parses");
        assert_eq!(routes.len(), 4);
        assert_eq!(
            routes[0],
            HostRoute {
                interface: "eth0".into(),
                destination: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                prefix_len: 0,
                gateway: Some(IpAddr::V4(Ipv4Addr::new(192, 168, 2, 1))),
                metric: 100,
            }
        );
        assert_eq!(
            routes[1].destination,
            IpAddr::V4(Ipv4Addr::new(192, 168, 2, 0))
        );
        assert_eq!(routes[1].prefix_len, 24);
        assert_eq!(routes[1].gateway, None);
    }

    #[test]
    fn ipv6_routes_skip_local_multicast_and_reject() {
        let routes = parse_proc_net_ipv6_route(ROUTE_V6).expect("parses");
        assert_eq!(routes.len(), 3);
        let default = routes
            .iter()
            .find(|r| r.is_default())
            .expect("default route");
        assert_eq!(default.interface, "eth0");
        assert_eq!(
            default.gateway,
            Some(IpAddr::V6("fe80::22a:10ff:fe00:1".parse().expect("addr")))
        );
        assert_eq!(default.metric, 0x400);
    }

    #[test]
    fn malformed_route_files_are_errors() {
        assert!(matches!(
            parse_proc_net_route("header\neth0 zz 0 0003 0 0 0 0\n"),
            Err(HostInfoError::Parse { line: 2, .. })
        ));
        assert!(parse_proc_net_route("header\neth0 00000000\n").is_err());
        assert!(parse_proc_net_ipv6_route("0000 00 eth0\n").is_err());
        assert_eq!(
            parse_proc_net_route("header only\n").expect("empty"),
            vec![]
        );
    }

    fn host_from_routes() -> HostInfo {
        let mut routes = parse_proc_net_route(ROUTE_V4).expect("v4");
        routes.extend(parse_proc_net_ipv6_route(ROUTE_V6).expect("v6"));
        HostInfo {
            routes,
            ..HostInfo::default()
        }
    }

    #[test]
    fn template_interface_prefers_lowest_metric_default_route() {
        let host = host_from_routes();
        assert_eq!(host.template_interface(IpFamily::V4), Some("eth0"));
        assert_eq!(host.template_interface(IpFamily::V6), Some("eth0"));
        assert_eq!(
            host.default_gateway("wlan0", IpFamily::V4),
            Some(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)))
        );
        assert_eq!(host.default_gateway("eth1", IpFamily::V4), None);
    }

    #[test]
    fn template_interface_falls_back_to_any_non_link_local_route() {
        let routes = parse_proc_net_route(
            "h\neth1\t0000FEA9\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
             eth2\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n",
        )
        .expect("parses");
        let host = HostInfo {
            routes,
            ..HostInfo::default()
        };
        assert_eq!(host.template_interface(IpFamily::V4), Some("eth2"));
        assert_eq!(HostInfo::default().template_interface(IpFamily::V4), None);
    }

    #[test]
    fn address_selection() {
        let host = HostInfo {
            addresses: vec![
                HostAddress {
                    interface: "eth0".into(),
                    addr: "fe80::1".parse().expect("addr"),
                    prefix_len: 64,
                },
                HostAddress {
                    interface: "eth0".into(),
                    addr: "2001:db8::5".parse().expect("addr"),
                    prefix_len: 64,
                },
                HostAddress {
                    interface: "eth0".into(),
                    addr: "192.0.2.5".parse().expect("addr"),
                    prefix_len: 24,
                },
                HostAddress {
                    interface: "lo".into(),
                    addr: "127.0.0.1".parse().expect("addr"),
                    prefix_len: 8,
                },
            ],
            ..HostInfo::default()
        };
        assert_eq!(
            host.global_address("eth0", IpFamily::V6),
            Some(("2001:db8::5".parse().expect("addr"), 64))
        );
        assert_eq!(
            host.global_address("eth0", IpFamily::V4),
            Some(("192.0.2.5".parse().expect("addr"), 24))
        );
        assert_eq!(host.global_address("lo", IpFamily::V4), None);
        assert_eq!(
            host.link_local_v6("eth0"),
            Some("fe80::1".parse().expect("addr"))
        );
        assert!(host.has_interface("lo"));
        assert!(!host.has_interface("eth9"));
    }

    #[test]
    fn resolv_conf_parsing() {
        let conf = parse_resolv_conf(
            "# generated\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\n\
             nameserver not-an-address\nnameserver 192.0.2.53 # comment\n\
             domain first.example\nsearch a.example b.example\noptions edns0\n",
        );
        assert_eq!(
            conf.nameservers,
            vec![
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 53)),
                "fe80::1".parse::<IpAddr>().expect("addr"),
                IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)),
            ]
        );
        assert_eq!(
            conf.search,
            vec!["a.example".to_owned(), "b.example".to_owned()]
        );
        assert_eq!(parse_resolv_conf(""), ResolvConf::default());
    }

    #[test]
    fn ephemeral_range_parsing() {
        assert_eq!(
            parse_ip_local_port_range("32768\t60999\n"),
            PortRange::new(32768, 60999)
        );
        assert_eq!(parse_ip_local_port_range("60999 32768"), None);
        assert_eq!(parse_ip_local_port_range("garbage"), None);
        assert_eq!(parse_ip_local_port_range("1 2 3"), None);
    }

    #[test]
    fn detect_reads_this_host() {
        let host = HostInfo::detect().expect("the host is readable");
        assert!(host.has_interface("lo"));
    }
}
