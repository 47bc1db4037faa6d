//! The command line: a drop-in for passt's in vhost-user mode.
//!
//! libvirt, KubeVirt and podman start passt with a fixed set of options; baton accepts
//! the same spelling and meaning for everything that makes sense for a vhost-user
//! backend, plus its own migration options (`--helper`, `--linger`,
//! `--migrate-drop-tcp`). Options of passt that baton does not implement (pasta-only
//! options, `--pcap`, `--stats`, …) are refused like any unknown option: exit status 2
//! and a usage message, never silently ignored.
//!
//! Three layers, each usable on its own:
//! * [`Cli`]: the clap definition. Every value is parsed into a typed form as the
//!   command line is read (addresses, MAC, port specs, MTU range), so a malformed value
//!   is a usage error naming the option.
//! * [`Cli::validate`]: combinations that cannot work (`-4` with `-6`, `--socket` with
//!   `--fd`, two IPv4 addresses, an IPv6 value with `-4`, …). passt often lets the last
//!   option win; baton refuses the combination instead.
//! * [`parse_args`]: what `main` calls: parse, answer `--help`/`--version`/
//!   `--print-capabilities`, validate, and exit with status 2 on any usage error.
//!
//! Host-dependent defaults are not applied here: see [`crate::config`].

use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use thiserror::Error;

use crate::config::MacAddr;
use crate::ports::{is_valid_interface_name, PortSpec};

/// What `--print-capabilities` prints: the vhost-user backend program convention
/// (QEMU's docs/interop/vhost-user.rst) for a net device, which has no optional
/// features to advertise.
pub const CAPABILITIES_JSON: &str = "{\n  \"type\": \"net\"\n}\n";

/// Smallest log file size passt accepts for `--log-size` (5 × max(BUFSIZ, page size)).
pub const MIN_LOG_FILE_SIZE: u64 = 40960;

/// Log file size limit when `--log-size` is not given (passt's default, 1 MiB).
pub const DEFAULT_LOG_FILE_SIZE: u64 = 1024 * 1024;

/// Seconds a migration source keeps its frozen sockets when `--linger` is not given.
pub const DEFAULT_LINGER_SECS: u64 = 30;

/// Longest `--udp-timeout` (one day; a migration stream counts a flow's idle time left
/// in `u32` milliseconds, which this stays well inside).
pub const MAX_UDP_TIMEOUT_SECS: u32 = 86_400;

/// Smallest and largest MTU accepted by `-m` (IPv4's minimum; passt's maximum).
pub const MTU_RANGE: std::ops::RangeInclusive<i64> = 68..=65520;

/// The longest DNS name (RFC 1035), for `--search`, `--hostname` and `--fqdn`.
const MAX_DOMAIN_NAME_LEN: usize = 253;

/// baton: an unprivileged vhost-user-net backend for QEMU, a drop-in for passt in
/// vhost-user mode that also migrates the guest's TCP connections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Parser)]
#[command(name = "baton", version, max_term_width = 100)]
pub struct Cli {
    /// Accepted for compatibility with passt: baton always runs in vhost-user mode.
    #[arg(long, help_heading = "vhost-user")]
    pub vhost_user: bool,

    /// UNIX domain socket QEMU connects to. Default: the first unused path among
    /// /tmp/baton_1.socket to /tmp/baton_64.socket.
    #[arg(
        short = 's',
        long = "socket",
        visible_alias = "socket-path",
        value_name = "PATH",
        help_heading = "vhost-user"
    )]
    pub socket: Option<PathBuf>,

    /// Serve an already connected vhost-user socket inherited as file descriptor FD.
    /// Implies --one-off.
    #[arg(
        short = 'F',
        long = "fd",
        value_name = "FD",
        value_parser = clap::value_parser!(i32).range(0..),
        help_heading = "vhost-user"
    )]
    pub fd: Option<i32>,

    /// Print the vhost-user back-end capabilities as JSON and exit; all other options
    /// are ignored.
    #[arg(long, help_heading = "vhost-user")]
    pub print_capabilities: bool,

    /// Do not fork to the background.
    #[arg(short = 'f', long, help_heading = "Process")]
    pub foreground: bool,

    /// Exit once the first QEMU connection closes.
    #[arg(short = '1', long, help_heading = "Process")]
    pub one_off: bool,

    /// Write the process ID to FILE once initialised.
    #[arg(
        short = 'P',
        long = "pid",
        value_name = "FILE",
        help_heading = "Process"
    )]
    pub pid_file: Option<PathBuf>,

    /// Switch to this user (and group) after opening files. Default when started as
    /// root: nobody.
    #[arg(
        long,
        value_name = "UID|UID:GID|LOGIN|LOGIN:GROUP",
        help_heading = "Process"
    )]
    pub runas: Option<RunAs>,

    /// Log to PATH.
    #[arg(short = 'l', long, value_name = "PATH", help_heading = "Logging")]
    pub log_file: Option<PathBuf>,

    /// Cap the log file at BYTES, dropping the oldest entries. Default: 1048576.
    #[arg(
        long,
        value_name = "BYTES",
        value_parser = parse_log_size,
        help_heading = "Logging"
    )]
    pub log_size: Option<u64>,

    /// Log to standard error as well (the default without --log-file).
    #[arg(short = 'e', long, help_heading = "Logging")]
    pub stderr: bool,

    /// Log warnings and errors only.
    #[arg(short = 'q', long, help_heading = "Logging")]
    pub quiet: bool,

    /// Log debugging messages.
    #[arg(short = 'd', long, help_heading = "Logging")]
    pub debug: bool,

    /// Log every packet (implies --debug).
    #[arg(long, help_heading = "Logging")]
    pub trace: bool,

    /// Guest address (DHCP, DHCPv6, NDP), at most one IPv4 and one IPv6. Default: the
    /// host's address on the template interface.
    #[arg(
        short = 'a',
        long = "address",
        value_name = "ADDR[/PREFIX]",
        help_heading = "Guest network"
    )]
    pub addresses: Vec<GuestAddress>,

    /// IPv4 netmask, dotted or as a prefix length. Default: the host's, or the
    /// address class for -a without a prefix.
    #[arg(
        short = 'n',
        long,
        value_name = "MASK|PREFIX",
        value_parser = parse_netmask,
        help_heading = "Guest network"
    )]
    pub netmask: Option<u8>,

    /// Default gateway, at most one IPv4 and one IPv6. Default: the host's.
    #[arg(
        short = 'g',
        long = "gateway",
        value_name = "ADDR",
        value_parser = parse_gateway,
        help_heading = "Guest network"
    )]
    pub gateways: Vec<IpAddr>,

    /// Do not map the gateway address to the host's loopback.
    #[arg(long, help_heading = "Guest network")]
    pub no_map_gw: bool,

    /// Guest traffic to ADDR goes to the host's loopback (one IPv4, one IPv6).
    /// Default: the gateway address unless --no-map-gw.
    #[arg(
        long,
        value_name = "ADDR|none",
        value_parser = parse_mapped_addr,
        help_heading = "Guest network"
    )]
    pub map_host_loopback: Vec<AddrOrNone>,

    /// Guest traffic to ADDR goes to the guest's own address as seen on the host (one
    /// IPv4, one IPv6). Default: none.
    #[arg(
        long,
        value_name = "ADDR|none",
        value_parser = parse_mapped_addr,
        help_heading = "Guest network"
    )]
    pub map_guest_addr: Vec<AddrOrNone>,

    /// MAC address baton uses as the source of frames to the guest. Default:
    /// 9a:55:9a:55:9a:55.
    #[arg(
        short = 'M',
        long,
        value_name = "MAC",
        value_parser = parse_mac,
        help_heading = "Guest network"
    )]
    pub mac_addr: Option<MacAddr>,

    /// MTU advertised to the guest (DHCP, NDP), 68 to 65520. Default: 65520.
    #[arg(
        short = 'm',
        long,
        value_name = "MTU",
        value_parser = clap::value_parser!(u16).range(MTU_RANGE),
        help_heading = "Guest network"
    )]
    pub mtu: Option<u16>,

    /// Host interface to take addresses and routes from. Default: the interface of
    /// the default route, per IP version.
    #[arg(
        short = 'i',
        long,
        value_name = "NAME",
        value_parser = parse_interface_name,
        help_heading = "Guest network"
    )]
    pub interface: Option<String>,

    /// Source address for outbound sockets, at most one IPv4 and one IPv6. Default:
    /// chosen by the host's routing.
    #[arg(
        short = 'o',
        long = "outbound",
        value_name = "ADDR",
        value_parser = parse_outbound_addr,
        help_heading = "Guest network"
    )]
    pub outbound: Vec<IpAddr>,

    /// Bind IPv4 outbound sockets to interface NAME (and take IPv4 defaults from it
    /// unless -i).
    #[arg(
        long,
        value_name = "NAME",
        value_parser = parse_interface_name,
        help_heading = "Guest network"
    )]
    pub outbound_if4: Option<String>,

    /// Bind IPv6 outbound sockets to interface NAME (and take IPv6 defaults from it
    /// unless -i).
    #[arg(
        long,
        value_name = "NAME",
        value_parser = parse_interface_name,
        help_heading = "Guest network"
    )]
    pub outbound_if6: Option<String>,

    /// IPv4 only: ignore IPv6 traffic.
    #[arg(short = '4', long, help_heading = "Guest network")]
    pub ipv4_only: bool,

    /// IPv6 only: ignore IPv4 traffic.
    #[arg(short = '6', long, help_heading = "Guest network")]
    pub ipv6_only: bool,

    /// DNS server advertised to the guest, repeatable; 'none' advertises none. Default:
    /// from /etc/resolv.conf.
    #[arg(
        short = 'D',
        long = "dns",
        value_name = "ADDR|none",
        value_parser = parse_dns_server,
        help_heading = "DNS"
    )]
    pub dns: Vec<AddrOrNone>,

    /// Redirect guest DNS traffic (UDP and TCP, ports 53 and 853) sent to ADDR to the
    /// host's nameserver (one IPv4, one IPv6).
    #[arg(
        long,
        value_name = "ADDR",
        value_parser = parse_dns_forward,
        help_heading = "DNS"
    )]
    pub dns_forward: Vec<IpAddr>,

    /// Host nameserver that --dns-forward traffic goes to (one IPv4, one IPv6).
    /// Default: the first nameserver of /etc/resolv.conf.
    #[arg(
        long,
        value_name = "ADDR",
        value_parser = parse_dns_host,
        help_heading = "DNS"
    )]
    pub dns_host: Vec<IpAddr>,

    /// DNS search domains (space-separated, repeatable); 'none' sends none. Default:
    /// from /etc/resolv.conf.
    #[arg(
        short = 'S',
        long = "search",
        value_name = "LIST|none",
        help_heading = "DNS"
    )]
    pub search: Vec<SearchList>,

    /// Do not advertise DNS servers (DHCP, NDP, DHCPv6).
    #[arg(long, help_heading = "DNS")]
    pub no_dhcp_dns: bool,

    /// Do not advertise the DNS search list (DHCP, NDP, DHCPv6).
    #[arg(long, help_heading = "DNS")]
    pub no_dhcp_search: bool,

    /// Host name sent to the guest (DHCP option 12).
    #[arg(
        short = 'H',
        long,
        value_name = "NAME",
        value_parser = parse_domain_name,
        help_heading = "DNS"
    )]
    pub hostname: Option<String>,

    /// FQDN sent to the guest (DHCP option 81, DHCPv6 option 39).
    #[arg(
        long,
        value_name = "NAME",
        value_parser = parse_domain_name,
        help_heading = "DNS"
    )]
    pub fqdn: Option<String>,

    /// Drop TCP: no forwarding, guest TCP segments are discarded.
    #[arg(long, help_heading = "Protocols")]
    pub no_tcp: bool,

    /// Drop UDP: no forwarding, guest UDP datagrams are discarded.
    #[arg(long, help_heading = "Protocols")]
    pub no_udp: bool,

    /// Drop ICMP and ICMPv6 echo requests (implies --no-ndp).
    #[arg(long, help_heading = "Protocols")]
    pub no_icmp: bool,

    /// Disable the DHCP server.
    #[arg(long, help_heading = "Protocols")]
    pub no_dhcp: bool,

    /// Disable the DHCPv6 server.
    #[arg(long, help_heading = "Protocols")]
    pub no_dhcpv6: bool,

    /// Disable neighbour discovery (and with it router advertisements).
    #[arg(long, help_heading = "Protocols")]
    pub no_ndp: bool,

    /// Disable router advertisements.
    #[arg(long, help_heading = "Protocols")]
    pub no_ra: bool,

    /// Forward TCP ports from the host to the guest (repeatable). Default: none.
    #[arg(
        short = 't',
        long = "tcp-ports",
        value_name = "SPEC",
        help_heading = "Port forwarding"
    )]
    pub tcp_ports: Vec<PortSpec>,

    /// Forward UDP ports from the host to the guest (repeatable). Default: none.
    #[arg(
        short = 'u',
        long = "udp-ports",
        value_name = "SPEC",
        help_heading = "Port forwarding"
    )]
    pub udp_ports: Vec<PortSpec>,

    /// Allow listening addresses that are not (yet) configured on the host.
    #[arg(long, help_heading = "Port forwarding")]
    pub freebind: bool,

    /// Most TCP connections, and separately most UDP flows, tracked at once (each
    /// holds a host socket, so RLIMIT_NOFILE bounds them too). Default: 131072.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=(1 << 24)),
          help_heading = "Port forwarding")]
    pub max_flows: Option<u32>,

    /// Close a UDP flow after this many seconds without a datagram in either
    /// direction (a baton extension; passt's timeout is fixed). Default: 180.
    #[arg(long, value_name = "SECONDS",
          value_parser = clap::value_parser!(u32).range(1..=MAX_UDP_TIMEOUT_SECS as i64),
          help_heading = "Port forwarding")]
    pub udp_timeout: Option<u32>,

    /// UNIX socket a baton-repair helper (ours or root's uid) connects to; 'none'
    /// disables it. Default: the vhost-user socket path followed by .repair.
    #[arg(long, value_name = "PATH|none", help_heading = "Migration")]
    pub repair_path: Option<RepairPathArg>,

    /// baton-repair binary to start (through a launcher forked at start-up) whenever
    /// a migration needs a helper and none is connected. Default: wait for a helper to
    /// connect to the repair socket.
    #[arg(long, value_name = "PATH", help_heading = "Migration")]
    pub helper: Option<PathBuf>,

    /// If TCP connections cannot be dumped (no helper, dump error), reset those and
    /// migrate the rest instead of failing the migration.
    #[arg(long, help_heading = "Migration")]
    pub migrate_drop_tcp: bool,

    /// Seconds a migration source keeps its frozen sockets once QEMU left after a
    /// completed migration, so that late packets get no RST; then they close
    /// silently. Default: 30.
    #[arg(long, value_name = "SECS", help_heading = "Migration")]
    pub linger: Option<u64>,

    /// Deprecated passt option, same as --linger 0.
    #[arg(long, help_heading = "Migration")]
    pub migrate_no_linger: bool,

    /// Deprecated passt option: exit after a completed migration as source, once
    /// QEMU left and the linger time is over.
    #[arg(long, help_heading = "Migration")]
    pub migrate_exit: bool,
}

/// Log verbosity chosen by `-q`, `-d` and `--trace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// `-q`: warnings and errors.
    Warn,
    /// The default.
    Info,
    /// `-d`.
    Debug,
    /// `--trace`.
    Trace,
}

impl Cli {
    /// The log level the flags select.
    pub fn log_level(&self) -> LogLevel {
        if self.trace {
            LogLevel::Trace
        } else if self.debug {
            LogLevel::Debug
        } else if self.quiet {
            LogLevel::Warn
        } else {
            LogLevel::Info
        }
    }

    /// The IPv4 and IPv6 entries of `-a`.
    pub fn address_v4(&self) -> Option<GuestAddress> {
        self.addresses.iter().copied().find(|a| a.addr.is_ipv4())
    }

    pub fn address_v6(&self) -> Option<GuestAddress> {
        self.addresses.iter().copied().find(|a| a.addr.is_ipv6())
    }

    /// Checks combinations of options that cannot work together.
    pub fn validate(&self) -> Result<(), CliError> {
        let conflicts: [(bool, &'static str, &'static str); 7] = [
            (
                self.ipv4_only && self.ipv6_only,
                "-4/--ipv4-only",
                "-6/--ipv6-only",
            ),
            (
                self.socket.is_some() && self.fd.is_some(),
                "-s/--socket",
                "-F/--fd",
            ),
            (self.quiet && self.debug, "-q/--quiet", "-d/--debug"),
            (self.quiet && self.trace, "-q/--quiet", "--trace"),
            (
                self.linger.is_some() && self.migrate_no_linger,
                "--linger",
                "--migrate-no-linger",
            ),
            (
                self.netmask.is_some() && self.ipv6_only,
                "-n/--netmask",
                "-6/--ipv6-only",
            ),
            (
                self.outbound_if4.is_some() && self.ipv6_only,
                "--outbound-if4",
                "-6/--ipv6-only",
            ),
        ];
        for (conflicting, first, second) in conflicts {
            if conflicting {
                return Err(CliError::Conflict { first, second });
            }
        }
        if self.outbound_if6.is_some() && self.ipv4_only {
            return Err(CliError::Conflict {
                first: "--outbound-if6",
                second: "-4/--ipv4-only",
            });
        }

        let addresses: Vec<IpAddr> = self.addresses.iter().map(|a| a.addr).collect();
        self.check_families("-a/--address", &addresses)?;
        self.check_families("-g/--gateway", &self.gateways)?;
        self.check_families("-o/--outbound", &self.outbound)?;
        self.check_families("--dns-forward", &self.dns_forward)?;
        self.check_families("--dns-host", &self.dns_host)?;
        self.check_families_or_none("--map-host-loopback", &self.map_host_loopback)?;
        self.check_families_or_none("--map-guest-addr", &self.map_guest_addr)?;
        self.check_dns_servers()?;

        if let (Some(_), Some(address)) = (self.netmask, self.address_v4()) {
            if address.prefix_len.is_some() {
                return Err(CliError::RedundantPrefix {
                    address: address.to_string(),
                });
            }
        }
        let search_none = self.search.contains(&SearchList::None);
        if search_none && self.search.len() > 1 {
            return Err(CliError::NoneMixed {
                option: "-S/--search",
            });
        }
        for (option, specs) in [
            ("-t/--tcp-ports", &self.tcp_ports),
            ("-u/--udp-ports", &self.udp_ports),
        ] {
            if specs.len() > 1 && specs.contains(&PortSpec::None) {
                return Err(CliError::NoneMixed { option });
            }
        }
        Ok(())
    }

    /// At most one address per family, and none of a family that -4/-6 disables.
    fn check_families(&self, option: &'static str, values: &[IpAddr]) -> Result<(), CliError> {
        for (index, value) in values.iter().enumerate() {
            self.check_family_enabled(option, *value)?;
            if let Some(earlier) = values[..index]
                .iter()
                .find(|earlier| earlier.is_ipv4() == value.is_ipv4())
            {
                return Err(CliError::DuplicateFamily {
                    option,
                    family: family_name(*value),
                    first: earlier.to_string(),
                    second: value.to_string(),
                });
            }
        }
        Ok(())
    }

    fn check_families_or_none(
        &self,
        option: &'static str,
        values: &[AddrOrNone],
    ) -> Result<(), CliError> {
        if values.contains(&AddrOrNone::None) {
            return if values.len() > 1 {
                Err(CliError::NoneMixed { option })
            } else {
                Ok(())
            };
        }
        let addresses: Vec<IpAddr> = values.iter().filter_map(AddrOrNone::addr).collect();
        self.check_families(option, &addresses)
    }

    fn check_dns_servers(&self) -> Result<(), CliError> {
        if self.dns.contains(&AddrOrNone::None) && self.dns.len() > 1 {
            return Err(CliError::NoneMixed { option: "-D/--dns" });
        }
        for server in self.dns.iter().filter_map(AddrOrNone::addr) {
            self.check_family_enabled("-D/--dns", server)?;
        }
        Ok(())
    }

    fn check_family_enabled(&self, option: &'static str, value: IpAddr) -> Result<(), CliError> {
        let disabled_by = match value {
            IpAddr::V4(_) if self.ipv6_only => "-6/--ipv6-only",
            IpAddr::V6(_) if self.ipv4_only => "-4/--ipv4-only",
            _ => return Ok(()),
        };
        Err(CliError::FamilyDisabled {
            option,
            value: value.to_string(),
            family: family_name(value),
            disabled_by,
        })
    }
}

fn family_name(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// A combination of options that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CliError {
    #[error("{first} and {second} cannot be used together")]
    Conflict {
        first: &'static str,
        second: &'static str,
    },
    #[error("{option} accepts one {family} value, got {first} and {second}")]
    DuplicateFamily {
        option: &'static str,
        family: &'static str,
        first: String,
        second: String,
    },
    #[error("{option} {value}: {family} is disabled by {disabled_by}")]
    FamilyDisabled {
        option: &'static str,
        value: String,
        family: &'static str,
        disabled_by: &'static str,
    },
    #[error("{option}: 'none' cannot be combined with other values")]
    NoneMixed { option: &'static str },
    #[error("-n/--netmask given, but -a {address} already carries a prefix length")]
    RedundantPrefix { address: String },
}

/// An `-a` value: an address with an optional CIDR prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestAddress {
    pub addr: IpAddr,
    pub prefix_len: Option<u8>,
}

impl FromStr for GuestAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr = parse_ip(addr_text)?;
        let is_broadcast = matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
        if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() || is_broadcast {
            return Err(format!(
                "{addr} cannot be a guest address (unspecified, multicast, loopback or broadcast)"
            ));
        }
        let max_prefix = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix_text {
            None => None,
            Some(prefix) => match prefix.parse::<u8>() {
                Ok(len) if len <= max_prefix && prefix.bytes().all(|b| b.is_ascii_digit()) => {
                    Some(len)
                }
                _ => {
                    return Err(format!(
                        "'{prefix}' is not a prefix length from 0 to {max_prefix}"
                    ))
                }
            },
        };
        Ok(GuestAddress { addr, prefix_len })
    }
}

impl fmt::Display for GuestAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if let Some(len) = self.prefix_len {
            write!(f, "/{len}")?;
        }
        Ok(())
    }
}

/// An address, or the literal `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrOrNone {
    None,
    Addr(IpAddr),
}

impl AddrOrNone {
    pub fn addr(&self) -> Option<IpAddr> {
        match self {
            AddrOrNone::None => None,
            AddrOrNone::Addr(addr) => Some(*addr),
        }
    }
}

/// An `-S` value: `none`, or whitespace-separated domains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SearchList {
    None,
    Domains(Vec<String>),
}

impl FromStr for SearchList {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "none" {
            return Ok(SearchList::None);
        }
        let domains = text
            .split_whitespace()
            .map(parse_domain_name)
            .collect::<Result<Vec<_>, _>>()?;
        if domains.is_empty() {
            return Err("empty search list (use 'none' to send none)".to_owned());
        }
        Ok(SearchList::Domains(domains))
    }
}

/// A `--repair-path` value. `none` disables the socket; `./none` names a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairPathArg {
    None,
    Path(PathBuf),
}

impl FromStr for RepairPathArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "" => Err("empty path".to_owned()),
            "none" => Ok(RepairPathArg::None),
            path => Ok(RepairPathArg::Path(PathBuf::from(path))),
        }
    }
}

/// A user or group, by number or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdOrName {
    Id(u32),
    Name(String),
}

impl IdOrName {
    fn parse(text: &str) -> IdOrName {
        match text.parse::<u32>() {
            Ok(id) if text.bytes().all(|b| b.is_ascii_digit()) => IdOrName::Id(id),
            _ => IdOrName::Name(text.to_owned()),
        }
    }
}

impl fmt::Display for IdOrName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdOrName::Id(id) => write!(f, "{id}"),
            IdOrName::Name(name) => f.write_str(name),
        }
    }
}

/// A `--runas` value: `UID`, `UID:GID`, `LOGIN` or `LOGIN:GROUP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: IdOrName,
    /// The group; without it, the user's primary group (or GID = UID for a numeric
    /// user unknown to the system).
    pub group: Option<IdOrName>,
}

/// Why `--runas` cannot be turned into IDs.
#[derive(Debug, Error)]
pub enum RunAsError {
    #[error("--runas: no user named '{0}'")]
    UnknownUser(String),
    #[error("--runas: no group named '{0}'")]
    UnknownGroup(String),
    #[error("--runas: looking up '{name}' failed: {source}")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
}

impl RunAs {
    /// passt's default when started as root without `--runas`.
    pub fn nobody() -> RunAs {
        RunAs {
            user: IdOrName::Name("nobody".to_owned()),
            group: None,
        }
    }

    /// Looks the user and group up in the system databases.
    pub fn resolve(&self) -> Result<(nix::unistd::Uid, nix::unistd::Gid), RunAsError> {
        use nix::unistd::{Gid, Group, Uid, User};

        let lookup_error = |name: &dyn fmt::Display| {
            let name = name.to_string();
            move |source| RunAsError::Lookup { name, source }
        };
        let user = match &self.user {
            IdOrName::Id(id) => User::from_uid(Uid::from_raw(*id)).map_err(lookup_error(id))?,
            IdOrName::Name(name) => Some(
                User::from_name(name)
                    .map_err(lookup_error(name))?
                    .ok_or_else(|| RunAsError::UnknownUser(name.clone()))?,
            ),
        };
        let uid = match (&self.user, &user) {
            (_, Some(user)) => user.uid,
            (IdOrName::Id(id), None) => Uid::from_raw(*id),
            (IdOrName::Name(name), None) => return Err(RunAsError::UnknownUser(name.clone())),
        };
        let gid = match &self.group {
            Some(IdOrName::Id(id)) => Gid::from_raw(*id),
            Some(IdOrName::Name(name)) => {
                Group::from_name(name)
                    .map_err(lookup_error(name))?
                    .ok_or_else(|| RunAsError::UnknownGroup(name.clone()))?
                    .gid
            }
            None => user.map_or(Gid::from_raw(uid.as_raw()), |user| user.gid),
        };
        Ok((uid, gid))
    }
}

impl FromStr for RunAs {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (user, group) = match text.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (text, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(format!(
                "'{text}' is not UID, UID:GID, LOGIN or LOGIN:GROUP"
            ));
        }
        Ok(RunAs {
            user: IdOrName::parse(user),
            group: group.map(IdOrName::parse),
        })
    }
}

impl fmt::Display for RunAs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.user)?;
        if let Some(group) = &self.group {
            write!(f, ":{group}")?;
        }
        Ok(())
    }
}

/// An IPv4 or IPv6 address, optionally in brackets.
fn parse_ip(text: &str) -> Result<IpAddr, String> {
    let inner = text
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(text);
    IpAddr::from_str(inner).map_err(|_| format!("'{text}' is not an IPv4 or IPv6 address"))
}

fn parse_gateway(text: &str) -> Result<IpAddr, String> {
    let addr = parse_ip(text)?;
    let is_broadcast = matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || is_broadcast {
        return Err(format!(
            "{addr} cannot be a gateway (unspecified, loopback, multicast or broadcast)"
        ));
    }
    Ok(addr)
}

fn parse_outbound_addr(text: &str) -> Result<IpAddr, String> {
    let addr = parse_ip(text)?;
    let is_broadcast = matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
    let is_v4_in_v6 = matches!(addr, IpAddr::V6(v6) if v6.to_ipv4().is_some());
    if addr.is_unspecified() || addr.is_multicast() || is_broadcast || is_v4_in_v6 {
        return Err(format!("{addr} cannot be an outbound source address"));
    }
    Ok(addr)
}

/// `--map-host-loopback`/`--map-guest-addr`: `none`, or a unicast, non-loopback address.
fn parse_mapped_addr(text: &str) -> Result<AddrOrNone, String> {
    if text == "none" {
        return Ok(AddrOrNone::None);
    }
    let addr = parse_ip(text)?;
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() {
        return Err(format!(
            "{addr} cannot be mapped (unspecified, loopback or multicast)"
        ));
    }
    Ok(AddrOrNone::Addr(addr))
}

/// `-D`: `none`, or any address: it is given to the guest as is.
fn parse_dns_server(text: &str) -> Result<AddrOrNone, String> {
    if text == "none" {
        return Ok(AddrOrNone::None);
    }
    let addr = parse_ip(text)?;
    if addr.is_unspecified() || addr.is_multicast() {
        return Err(format!("{addr} cannot be a DNS server"));
    }
    Ok(AddrOrNone::Addr(addr))
}

fn parse_dns_forward(text: &str) -> Result<IpAddr, String> {
    let addr = parse_ip(text)?;
    let is_broadcast = matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || is_broadcast {
        return Err(format!(
            "{addr} cannot be a DNS forwarding address (unspecified, loopback, multicast or broadcast)"
        ));
    }
    Ok(addr)
}

fn parse_dns_host(text: &str) -> Result<IpAddr, String> {
    let addr = parse_ip(text)?;
    let is_broadcast = matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
    if addr.is_unspecified() || addr.is_multicast() || is_broadcast {
        return Err(format!("{addr} cannot be a host nameserver"));
    }
    Ok(addr)
}

/// `-n`: a dotted netmask with contiguous ones, or a prefix length 0..=32.
fn parse_netmask(text: &str) -> Result<u8, String> {
    if text.contains('.') {
        let mask: std::net::Ipv4Addr = text
            .parse()
            .map_err(|_| format!("'{text}' is not a netmask"))?;
        let bits = u32::from(mask);
        let ones = bits.leading_ones();
        if bits.checked_shl(ones).unwrap_or(0) != 0 {
            return Err(format!("'{text}' is not a contiguous netmask"));
        }
        return u8::try_from(ones).map_err(|_| format!("'{text}' is not a netmask"));
    }
    match text.parse::<u8>() {
        Ok(len) if len <= 32 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(len),
        _ => Err(format!(
            "'{text}' is not a netmask or a prefix length from 0 to 32"
        )),
    }
}

/// `-M`: six colon-separated pairs of hex digits.
pub fn parse_mac(text: &str) -> Result<MacAddr, String> {
    let error = || format!("'{text}' is not a MAC address like 9a:55:9a:55:9a:55");
    let mut mac: MacAddr = [0; 6];
    let mut octets = text.split(':');
    for byte in mac.iter_mut() {
        let octet = octets.next().ok_or_else(error)?;
        if octet.len() != 2 {
            return Err(error());
        }
        *byte = u8::from_str_radix(octet, 16).map_err(|_| error())?;
    }
    if octets.next().is_some() {
        return Err(error());
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(format!("{text} is a multicast or all-zero MAC address"));
    }
    Ok(mac)
}

fn parse_interface_name(text: &str) -> Result<String, String> {
    if is_valid_interface_name(text) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "'{text}' is not an interface name (1 to 15 characters, no '/' or whitespace)"
        ))
    }
}

/// A DNS name: labels of 1 to 63 letters, digits, '-' or '_', 253 characters in all,
/// with an optional final dot.
fn parse_domain_name(text: &str) -> Result<String, String> {
    let body = text.strip_suffix('.').unwrap_or(text);
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if body.is_empty() || text.len() > MAX_DOMAIN_NAME_LEN || !body.split('.').all(valid_label) {
        return Err(format!("'{text}' is not a valid DNS name"));
    }
    Ok(text.to_owned())
}

fn parse_log_size(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(size) if size >= MIN_LOG_FILE_SIZE => Ok(size),
        _ => Err(format!(
            "'{text}' is not a size in bytes of at least {MIN_LOG_FILE_SIZE}"
        )),
    }
}

/// Parses and validates `args` (program name first). `--print-capabilities` skips the
/// validation, as the vhost-user convention asks that other options be ignored.
/// Errors carry clap's exit status: 0 for `--help`/`--version`, 2 for usage errors.
pub fn try_parse_args_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    if cli.print_capabilities {
        return Ok(cli);
    }
    cli.validate()
        .map_err(|error| Cli::command().error(ErrorKind::ArgumentConflict, error))?;
    Ok(cli)
}

/// The command line of this process, for `main`. Prints help, the version or the
/// capabilities and exits 0 when asked to; prints the error and a usage hint and
/// exits 2 on a usage error; otherwise returns the validated options.
pub fn parse_args() -> Cli {
    let cli = match try_parse_args_from(std::env::args_os()) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    if cli.print_capabilities {
        let status = match print_capabilities() {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("baton: cannot print capabilities: {error}");
                1
            }
        };
        std::process::exit(status);
    }
    cli
}

/// Writes [`CAPABILITIES_JSON`] to standard output.
pub fn print_capabilities() -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(CAPABILITIES_JSON.as_bytes())?;
    stdout.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        try_parse_args_from(std::iter::once("baton").chain(args.iter().copied()))
    }

    fn ok(args: &[&str]) -> Cli {
        parse(args).unwrap_or_else(|error| panic!("{args:?}: {error}"))
    }

    fn usage_error(args: &[&str]) -> String {
        let error = parse(args).expect_err("must be refused");
        assert_eq!(error.exit_code(), 2, "{args:?}: {error}");
        error.to_string()
    }

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_arguments_is_valid() {
        assert_eq!(ok(&[]), Cli::default());
    }

    #[test]
    fn libvirt_command_line_parses() {
        let cli = ok(&[
            "--one-off",
            "--socket",
            "/run/libvirt/qemu/passt/1-vm-net0.socket",
            "--mac-addr",
            "52:54:00:12:34:56",
            "--mtu",
            "1500",
            "--interface",
            "eth0",
            "--log-file",
            "/var/log/passt.log",
            "--address",
            "192.0.2.10",
            "--netmask",
            "24",
            "--address",
            "2001:db8::10",
            "--tcp-ports",
            "192.0.2.1%eth0/2222:22",
            "--udp-ports",
            "~53",
            "--vhost-user",
            "--pid",
            "/run/passt.pid",
        ]);
        assert!(cli.one_off && cli.vhost_user);
        assert_eq!(cli.mac_addr, Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(cli.mtu, Some(1500));
        assert_eq!(cli.netmask, Some(24));
        assert_eq!(
            cli.address_v4().map(|a| a.addr),
            Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)))
        );
        assert_eq!(cli.address_v6().and_then(|a| a.prefix_len), None);
        assert_eq!(cli.tcp_ports.len(), 1);
        assert_eq!(cli.udp_ports.len(), 1);
    }

    #[test]
    fn kubevirt_style_flags_parse() {
        let cli = ok(&[
            "--runas",
            "107",
            "-e",
            "-f",
            "--no-dhcpv6",
            "--no-ra",
            "--no-ndp",
            "--no-icmp",
            "--no-udp",
            "--no-tcp",
            "--no-dhcp",
            "--dns-forward",
            "10.0.2.3",
            "-t",
            "none",
        ]);
        assert_eq!(
            cli.runas,
            Some(RunAs {
                user: IdOrName::Id(107),
                group: None
            })
        );
        assert!(cli.stderr && cli.foreground && cli.no_dhcpv6 && cli.no_ra && cli.no_ndp);
        assert!(cli.no_icmp && cli.no_udp && cli.no_tcp && cli.no_dhcp);
        assert_eq!(
            cli.dns_forward,
            vec![IpAddr::V4(Ipv4Addr::new(10, 0, 2, 3))]
        );
    }

    #[test]
    fn short_options_match_passt() {
        let cli = ok(&[
            "-s",
            "/tmp/s",
            "-f",
            "-1",
            "-l",
            "/tmp/l",
            "-P",
            "/tmp/p",
            "-d",
            "-a",
            "10.0.0.2/24",
            "-g",
            "10.0.0.1",
            "-D",
            "1.1.1.1",
            "-S",
            "example.com",
            "-M",
            "02:00:00:00:00:01",
            "-m",
            "9000",
            "-i",
            "eth0",
            "-4",
            "-t",
            "22",
            "-u",
            "53",
            "-H",
            "vm",
            "-o",
            "10.0.0.5",
        ]);
        assert_eq!(cli.socket, Some(PathBuf::from("/tmp/s")));
        assert_eq!(cli.log_level(), LogLevel::Debug);
        assert_eq!(
            cli.search,
            vec![SearchList::Domains(vec!["example.com".into()])]
        );
        assert!(cli.ipv4_only);
        let cli = ok(&["-F", "3", "-q", "-6"]);
        assert_eq!(cli.fd, Some(3));
        assert_eq!(cli.log_level(), LogLevel::Warn);
    }

    #[test]
    fn socket_path_alias_is_accepted() {
        assert_eq!(
            ok(&["--socket-path", "/x"]).socket,
            Some(PathBuf::from("/x"))
        );
    }

    #[test]
    fn unknown_options_are_usage_errors() {
        for args in [
            &["--bogus"][..],
            &["--pcap", "/tmp/x"],
            &["--netns", "x"],
            &["-T", "22"],
            &["extra-positional"],
        ] {
            let error = parse(args).expect_err("unknown");
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
        let error = parse(&["--bogus"]).expect_err("unknown");
        assert_eq!(error.kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn help_and_version_exit_zero() {
        for flag in ["--help", "-h", "--version"] {
            let error = parse(&[flag]).expect_err("help is reported as an early exit");
            assert_eq!(error.exit_code(), 0, "{flag}");
        }
    }

    #[test]
    fn conflicting_flags_are_refused() {
        assert!(usage_error(&["-4", "-6"]).contains("-4/--ipv4-only and -6/--ipv6-only"));
        assert!(usage_error(&["-s", "/x", "--fd", "3"]).contains("-s/--socket and -F/--fd"));
        usage_error(&["-q", "-d"]);
        usage_error(&["-q", "--trace"]);
        usage_error(&["--linger", "5", "--migrate-no-linger"]);
        usage_error(&["-6", "-n", "24"]);
        usage_error(&["-6", "--outbound-if4", "eth0"]);
        usage_error(&["-4", "--outbound-if6", "eth0"]);
    }

    #[test]
    fn one_value_per_family() {
        let message = usage_error(&["-a", "10.0.0.1", "-a", "10.0.0.2"]);
        assert!(
            message.contains("one IPv4 value, got 10.0.0.1 and 10.0.0.2"),
            "{message}"
        );
        usage_error(&["-g", "2001:db8::1", "-g", "2001:db8::2"]);
        usage_error(&["--dns-forward", "10.0.0.3", "--dns-forward", "10.0.0.4"]);
        usage_error(&[
            "--map-host-loopback",
            "10.0.0.3",
            "--map-host-loopback",
            "10.0.0.4",
        ]);
        let cli = ok(&[
            "-a",
            "10.0.0.1",
            "-a",
            "2001:db8::1",
            "-g",
            "10.0.0.254",
            "-g",
            "fe80::1",
        ]);
        assert_eq!(cli.addresses.len(), 2);
        assert_eq!(cli.gateways.len(), 2);
    }

    #[test]
    fn values_of_a_disabled_family_are_refused() {
        let message = usage_error(&["-4", "-a", "2001:db8::1"]);
        assert!(
            message.contains("IPv6 is disabled by -4/--ipv4-only"),
            "{message}"
        );
        usage_error(&["-6", "-g", "10.0.0.1"]);
        usage_error(&["-6", "-D", "10.0.0.1"]);
        usage_error(&["-4", "--map-guest-addr", "2001:db8::9"]);
        ok(&["-4", "-a", "10.0.0.1", "-D", "1.1.1.1"]);
    }

    #[test]
    fn none_cannot_be_mixed() {
        usage_error(&["-D", "none", "-D", "1.1.1.1"]);
        usage_error(&["-S", "none", "-S", "example.com"]);
        usage_error(&[
            "--map-host-loopback",
            "none",
            "--map-host-loopback",
            "10.0.0.1",
        ]);
        usage_error(&["-t", "none", "-t", "22"]);
        assert_eq!(ok(&["-D", "none"]).dns, vec![AddrOrNone::None]);
    }

    #[test]
    fn netmask_forms() {
        assert_eq!(ok(&["-n", "255.255.254.0"]).netmask, Some(23));
        assert_eq!(ok(&["-n", "0.0.0.0"]).netmask, Some(0));
        assert_eq!(ok(&["-n", "32"]).netmask, Some(32));
        usage_error(&["-n", "255.0.255.0"]);
        usage_error(&["-n", "33"]);
        usage_error(&["-n", "-1"]);
        let message = usage_error(&["-a", "10.0.0.1/8", "-n", "16"]);
        assert!(
            message.contains("already carries a prefix length"),
            "{message}"
        );
        ok(&["-a", "2001:db8::1/64", "-n", "16"]);
    }

    #[test]
    fn address_values_are_checked() {
        assert_eq!(
            ok(&["-a", "2001:db8::5/56"]).address_v6(),
            Some(GuestAddress {
                addr: IpAddr::V6("2001:db8::5".parse().expect("addr")),
                prefix_len: Some(56)
            })
        );
        usage_error(&["-a", "127.0.0.1"]);
        usage_error(&["-a", "0.0.0.0"]);
        usage_error(&["-a", "224.0.0.1"]);
        usage_error(&["-a", "10.0.0.1/33"]);
        usage_error(&["-a", "2001:db8::1/129"]);
        usage_error(&["-a", "10.0.0"]);
        usage_error(&["-g", "127.0.0.1"]);
        usage_error(&["-g", "::"]);
        usage_error(&["--map-host-loopback", "127.0.0.1"]);
        usage_error(&["--dns-forward", "::1"]);
        usage_error(&["-o", "::ffff:10.0.0.1"]);
        assert_eq!(
            ok(&["--map-host-loopback", "none"]).map_host_loopback,
            vec![AddrOrNone::None]
        );
        assert_eq!(
            ok(&["-D", "127.0.0.1"]).dns,
            vec![AddrOrNone::Addr(IpAddr::V4(Ipv4Addr::LOCALHOST))]
        );
        assert_eq!(
            ok(&["-g", "[fe80::1]"]).gateways,
            vec![IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1))]
        );
    }

    #[test]
    fn mtu_range_is_68_to_65520() {
        assert_eq!(ok(&["-m", "68"]).mtu, Some(68));
        assert_eq!(ok(&["-m", "65520"]).mtu, Some(65520));
        usage_error(&["-m", "67"]);
        usage_error(&["-m", "65521"]);
        usage_error(&["-m", "0"]);
    }

    #[test]
    fn mac_addresses() {
        assert_eq!(
            parse_mac("9a:55:9a:55:9a:55"),
            Ok([0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55])
        );
        for bad in [
            "9a:55:9a:55:9a",
            "9a:55:9a:55:9a:55:00",
            "9a-55-9a-55-9a-55",
            "9a:55:9a:55:9a:5",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "zz:55:9a:55:9a:55",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn search_lists() {
        assert_eq!(
            ok(&["-S", "a.example b.example", "-S", "c.example."]).search,
            vec![
                SearchList::Domains(vec!["a.example".into(), "b.example".into()]),
                SearchList::Domains(vec!["c.example.".into()])
            ]
        );
        usage_error(&["-S", ""]);
        usage_error(&["-S", "bad..name"]);
        usage_error(&["-S", "bad/name"]);
    }

    #[test]
    fn port_specs_are_parsed_on_the_command_line() {
        let message = usage_error(&["-t", "22,0"]);
        assert!(message.contains("port 0 cannot be forwarded"), "{message}");
        let message = usage_error(&["-u", "auto"]);
        assert!(message.contains("only pasta supports it"), "{message}");
        assert_eq!(ok(&["-t", "22", "-t", "80:8080"]).tcp_ports.len(), 2);
    }

    #[test]
    fn repair_path_none_and_literal_none() {
        assert_eq!(
            ok(&["--repair-path", "none"]).repair_path,
            Some(RepairPathArg::None)
        );
        assert_eq!(
            ok(&["--repair-path", "./none"]).repair_path,
            Some(RepairPathArg::Path(PathBuf::from("./none")))
        );
    }

    #[test]
    fn runas_forms() {
        assert_eq!(
            "qemu:kvm".parse::<RunAs>(),
            Ok(RunAs {
                user: IdOrName::Name("qemu".into()),
                group: Some(IdOrName::Name("kvm".into()))
            })
        );
        assert_eq!(
            "107:107".parse::<RunAs>(),
            Ok(RunAs {
                user: IdOrName::Id(107),
                group: Some(IdOrName::Id(107))
            })
        );
        assert!("".parse::<RunAs>().is_err());
        assert!("qemu:".parse::<RunAs>().is_err());
        assert!(":kvm".parse::<RunAs>().is_err());
        let root = RunAs {
            user: IdOrName::Id(0),
            group: None,
        };
        let (uid, gid) = root.resolve().expect("root exists");
        assert_eq!((uid.as_raw(), gid.as_raw()), (0, 0));
        assert!(matches!(
            RunAs::from_str("no-such-user-baton").map(|r| r.resolve()),
            Ok(Err(RunAsError::UnknownUser(_)))
        ));
    }

    #[test]
    fn migration_options() {
        let cli = ok(&[
            "--helper",
            "/usr/libexec/baton-repair",
            "--linger",
            "5",
            "--migrate-drop-tcp",
        ]);
        assert_eq!(cli.linger, Some(5));
        assert!(cli.migrate_drop_tcp);
        assert_eq!(cli.helper, Some(PathBuf::from("/usr/libexec/baton-repair")));
    }

    #[test]
    fn print_capabilities_ignores_other_options() {
        let cli = ok(&["--print-capabilities", "-4", "-6"]);
        assert!(cli.print_capabilities);
        assert!(CAPABILITIES_JSON.contains("\"type\": \"net\""));
    }

    #[test]
    fn log_size_has_passts_minimum() {
        assert_eq!(ok(&["--log-size", "40960"]).log_size, Some(40960));
        usage_error(&["--log-size", "4096"]);
    }
}
