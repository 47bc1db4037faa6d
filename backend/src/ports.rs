//! passt's port-forwarding syntax (`-t`/`-u`) and the forwarding table built from it.
//!
//! # Theory of operation
//!
//! Parsing happens in two steps, so that syntax errors surface while the command line is
//! read (exit status 2, with the offending token and its column) and everything that
//! depends on the host waits for [`crate::config`]:
//!
//! 1. [`parse_port_spec`] turns one option argument into a [`PortSpec`]: either `none` or
//!    an optional listening prefix ([`BindTo`]) followed by a comma-separated list of
//!    [`PortChunk`]s (`all`, include ranges with an optional target, `~` exclusions).
//! 2. [`PortForwards::from_specs`] combines every `-t` (or every `-u`) option of the
//!    command line into a list of [`ForwardRule`]s, exactly as passt's `fwd_rule.c`
//!    does: include ranges are split around the exclusions *of the same option*, and an
//!    option made only of exclusions (or containing `all`) forwards every port except
//!    the excluded ones, the host's ephemeral range and the ports that the same option
//!    maps explicitly. Such rules are *best effort*: a port that cannot be bound is
//!    skipped rather than fatal. Overlapping rules with overlapping listening
//!    addresses are an error, as in passt.
//!
//! Grammar (passt's, see `baton(1)`):
//!
//! ```text
//! spec   := "none" | [bind "/"] chunk ("," chunk)*
//! bind   := ADDR ["%" DEV] | "*" ["%" DEV] | "%" DEV | ""      (ADDR may be [bracketed])
//! chunk  := "all" [":" ADDR] | "~" range | range [":" target] | "auto" (rejected)
//! target := ADDR "/" range | range | ADDR
//! range  := PORT ["-" PORT]                                      (PORT in 1..=65535)
//! ```
//!
//! Deviations from passt, all towards clearer errors: port 0 is refused, `none` is
//! refused in combination with any other option of the same protocol (passt only
//! refuses it after one), `all` may be combined with explicit ranges (passt's current
//! code then silently ignores `all`), and `all` given twice in one option is refused.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;

use thiserror::Error;

/// The ephemeral range RFC 6335 recommends; passt's fallback when
/// `/proc/sys/net/ipv4/ip_local_port_range` cannot be read.
pub const RFC6335_EPHEMERAL_PORTS: PortRange = PortRange {
    first: 49152,
    last: 65535,
};

/// Longest interface name Linux accepts (`IFNAMSIZ` minus the terminating NUL).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

/// A non-empty, inclusive range of non-zero port numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// Every port that can be forwarded: 1 to 65535.
    pub const ALL: PortRange = PortRange {
        first: 1,
        last: u16::MAX,
    };

    /// `first..=last`; `None` if `first` is 0 or the range is reversed.
    pub const fn new(first: u16, last: u16) -> Option<PortRange> {
        if first == 0 || first > last {
            None
        } else {
            Some(PortRange { first, last })
        }
    }

    /// The single port `port`; `None` for port 0.
    pub const fn single(port: u16) -> Option<PortRange> {
        PortRange::new(port, port)
    }

    pub const fn first(self) -> u16 {
        self.first
    }

    pub const fn last(self) -> u16 {
        self.last
    }

    /// How many ports the range holds (1 to 65535).
    pub const fn port_count(self) -> u32 {
        (self.last - self.first) as u32 + 1
    }

    pub const fn contains(self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }

    pub const fn overlaps(self, other: PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// The ports, in ascending order.
    pub fn ports(self) -> RangeInclusive<u16> {
        self.first..=self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

const PORT_SET_WORDS: usize = 65536 / 64;

/// A set of port numbers (a 65536-bit bitmap).
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet {
    words: Vec<u64>,
}

impl Default for PortSet {
    fn default() -> Self {
        PortSet {
            words: vec![0; PORT_SET_WORDS],
        }
    }
}

impl PortSet {
    pub fn new() -> PortSet {
        PortSet::default()
    }

    pub fn insert(&mut self, port: u16) {
        self.words[usize::from(port) / 64] |= 1u64 << (port % 64);
    }

    pub fn insert_range(&mut self, range: PortRange) {
        for port in range.ports() {
            self.insert(port);
        }
    }

    /// Adds every port of `other`.
    pub fn insert_all(&mut self, other: &PortSet) {
        for (word, other_word) in self.words.iter_mut().zip(&other.words) {
            *word |= *other_word;
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.words[usize::from(port) / 64] & (1u64 << (port % 64)) != 0
    }

    /// Whether any port of `range` is in the set.
    pub fn contains_any(&self, range: PortRange) -> bool {
        range.ports().any(|port| self.contains(port))
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|word| *word == 0)
    }

    /// Number of ports in the set.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|word| word.count_ones()).sum()
    }

    /// The set as maximal runs of consecutive non-zero ports, ascending.
    pub fn ranges(&self) -> Vec<PortRange> {
        let mut runs = Vec::new();
        let mut run_start: Option<u16> = None;
        for port in 1..=u16::MAX {
            match (self.contains(port), run_start) {
                (true, None) => run_start = Some(port),
                (false, Some(start)) => {
                    runs.extend(PortRange::new(start, port - 1));
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run_start {
            runs.extend(PortRange::new(start, u16::MAX));
        }
        runs
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.ranges()).finish()
    }
}

/// Where forwarded ports listen on the host: the `ADDR%DEV/` prefix of a port spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct BindTo {
    /// Listening address. `None` (no address, or `*`) listens on every IPv4 and IPv6
    /// address; `0.0.0.0` on every IPv4 address only; `::` on every IPv6 address only.
    pub addr: Option<IpAddr>,
    /// Interface the listening sockets are bound to (`SO_BINDTODEVICE`).
    pub device: Option<String>,
}

impl BindTo {
    /// Whether a socket bound as `self` would receive traffic for local address `addr`.
    pub fn accepts(&self, addr: IpAddr) -> bool {
        match self.addr {
            None => true,
            Some(bound) if bound.is_unspecified() => bound.is_ipv4() == addr.is_ipv4(),
            Some(bound) => bound == addr,
        }
    }

    /// Whether two listeners could both claim some address (passt's `inany_matches`).
    /// Devices are not considered, as in passt.
    pub fn overlaps(&self, other: &BindTo) -> bool {
        match (self.addr, other.addr) {
            (None, _) | (_, None) => true,
            (Some(a), Some(b)) if a.is_unspecified() || b.is_unspecified() => {
                a.is_ipv4() == b.is_ipv4()
            }
            (Some(a), Some(b)) => a == b,
        }
    }

    fn is_default(&self) -> bool {
        self.addr.is_none() && self.device.is_none()
    }
}

impl fmt::Display for BindTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(IpAddr::V6(addr)) => write!(f, "[{addr}]")?,
            Some(IpAddr::V4(addr)) => write!(f, "{addr}")?,
            None => f.write_str("*")?,
        }
        if let Some(device) = &self.device {
            write!(f, "%{device}")?;
        }
        Ok(())
    }
}

/// One comma-separated item of a port spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortChunk {
    /// `all[:ADDR]`: every non-ephemeral port not excluded, each to the same port.
    All { guest_addr: Option<IpAddr> },
    /// `FIRST[-LAST][:[ADDR/]GFIRST[-GLAST]]` or `FIRST[-LAST]:ADDR`.
    Include {
        host_ports: PortRange,
        guest_ports: PortRange,
        guest_addr: Option<IpAddr>,
    },
    /// `~FIRST[-LAST]`: never forward these (for this option).
    Exclude(PortRange),
}

impl fmt::Display for PortChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortChunk::All { guest_addr: None } => f.write_str("all"),
            PortChunk::All {
                guest_addr: Some(addr),
            } => write!(f, "all:{}", bracketed(*addr)),
            PortChunk::Exclude(range) => write!(f, "~{range}"),
            PortChunk::Include {
                host_ports,
                guest_ports,
                guest_addr,
            } => {
                write!(f, "{host_ports}")?;
                match guest_addr {
                    Some(addr) => write!(f, ":{}/{guest_ports}", bracketed(*addr)),
                    None if guest_ports != host_ports => write!(f, ":{guest_ports}"),
                    None => Ok(()),
                }
            }
        }
    }
}

fn bracketed(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// One `-t`/`-u` option argument, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// `none`: forward nothing for this protocol.
    None,
    /// A listening prefix and its port chunks (at least one).
    Forward {
        bind_to: BindTo,
        chunks: Vec<PortChunk>,
    },
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::None => f.write_str("none"),
            PortSpec::Forward { bind_to, chunks } => {
                if !bind_to.is_default() {
                    write!(f, "{bind_to}/")?;
                }
                for (index, chunk) in chunks.iter().enumerate() {
                    if index > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{chunk}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        parse_port_spec(spec)
    }
}

/// What is wrong with a token of a port spec.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PortSpecProblem {
    #[error("the specification is empty")]
    EmptySpec,
    #[error("no ports after the listening address")]
    MissingPorts,
    #[error("empty item in the comma-separated list")]
    EmptyItem,
    #[error("port 0 cannot be forwarded")]
    PortZero,
    #[error("port number above 65535")]
    PortTooLarge,
    #[error("not a port number")]
    NotAPort,
    #[error("range ends before it starts")]
    ReversedRange,
    #[error("host range has {host} ports but target range has {guest}")]
    LengthMismatch { host: u32, guest: u32 },
    #[error("not an IPv4 or IPv6 address")]
    BadAddress,
    #[error("target address must be unicast, not loopback, unspecified or broadcast")]
    BadTargetAddress,
    #[error("target address family differs from the listening address family")]
    TargetFamilyMismatch,
    #[error(
        "a target address needs a listening address of the same family \
         (0.0.0.0/ or [::]/), not the dual-stack default"
    )]
    DualStackTarget,
    #[error("bad interface name (1 to 15 characters, no '/' or whitespace)")]
    BadDevice,
    #[error(
        "'auto' scans a namespace's listening sockets: only pasta supports it, \
         not passt or baton in vhost-user mode"
    )]
    AutoUnsupported,
    #[error("'none' must be the whole specification")]
    NoneNotAlone,
    #[error("'all' given more than once")]
    AllRepeated,
}

/// A port spec that cannot be parsed: the whole spec, the offending token and its
/// column (1-based, in characters).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid port specification '{spec}': {problem}: '{token}' at column {column}")]
pub struct PortSpecError {
    pub spec: String,
    pub token: String,
    pub column: usize,
    pub problem: PortSpecProblem,
}

/// A piece of the spec being parsed, remembering where it starts in the whole spec.
#[derive(Clone, Copy)]
struct Token<'a> {
    text: &'a str,
    offset: usize,
}

impl<'a> Token<'a> {
    fn sub(self, start: usize, end: usize) -> Token<'a> {
        Token {
            text: &self.text[start..end],
            offset: self.offset + start,
        }
    }

    fn tail(self, start: usize) -> Token<'a> {
        self.sub(start, self.text.len())
    }
}

struct SpecParser<'a> {
    spec: &'a str,
}

impl<'a> SpecParser<'a> {
    fn error(&self, token: Token<'_>, problem: PortSpecProblem) -> PortSpecError {
        PortSpecError {
            spec: self.spec.to_owned(),
            token: token.text.to_owned(),
            column: self.spec[..token.offset].chars().count() + 1,
            problem,
        }
    }

    fn parse(&self) -> Result<PortSpec, PortSpecError> {
        let whole = Token {
            text: self.spec,
            offset: 0,
        };
        if self.spec.is_empty() {
            return Err(self.error(whole, PortSpecProblem::EmptySpec));
        }
        if self.spec == "none" {
            return Ok(PortSpec::None);
        }
        let (bind_to, ports) = self.split_bind_prefix(whole)?;
        if ports.text.is_empty() {
            return Err(self.error(whole, PortSpecProblem::MissingPorts));
        }
        let mut chunks = Vec::new();
        let mut start = 0;
        for item in ports.text.split(',') {
            let token = ports.sub(start, start + item.len());
            start += item.len() + 1;
            let chunk = self.parse_chunk(token, &bind_to)?;
            if matches!(chunk, PortChunk::All { .. })
                && chunks.iter().any(|c| matches!(c, PortChunk::All { .. }))
            {
                return Err(self.error(token, PortSpecProblem::AllRepeated));
            }
            chunks.push(chunk);
        }
        Ok(PortSpec::Forward { bind_to, chunks })
    }

    /// Splits off an `ADDR%DEV/` prefix. The text before the first `/` is a prefix if
    /// it parses as one; text containing `,` or `:` that does not is left to the chunk
    /// parser (it is a chunk with a target address, as in `80:192.0.2.1/8080`).
    fn split_bind_prefix(&self, whole: Token<'a>) -> Result<(BindTo, Token<'a>), PortSpecError> {
        let Some(slash) = whole.text.find('/') else {
            return Ok((BindTo::default(), whole));
        };
        let candidate = whole.sub(0, slash);
        if candidate.text.contains(',') {
            return Ok((BindTo::default(), whole));
        }
        match self.parse_bind(candidate) {
            Ok(bind_to) => Ok((bind_to, whole.tail(slash + 1))),
            Err(_) if candidate.text.contains(':') && !candidate.text.starts_with('[') => {
                Ok((BindTo::default(), whole))
            }
            Err(error) => Err(error),
        }
    }

    fn parse_bind(&self, token: Token<'_>) -> Result<BindTo, PortSpecError> {
        let (addr_part, device) = match token.text.find('%') {
            Some(percent) => {
                let device = token.tail(percent + 1);
                if !is_valid_interface_name(device.text) {
                    return Err(self.error(device, PortSpecProblem::BadDevice));
                }
                (token.sub(0, percent), Some(device.text.to_owned()))
            }
            None => (token, None),
        };
        let addr = match addr_part.text {
            "" | "*" => None,
            _ => Some(self.parse_addr(addr_part)?),
        };
        Ok(BindTo { addr, device })
    }

    fn parse_addr(&self, token: Token<'_>) -> Result<IpAddr, PortSpecError> {
        let text = token
            .text
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .unwrap_or(token.text);
        IpAddr::from_str(text).map_err(|_| self.error(token, PortSpecProblem::BadAddress))
    }

    fn parse_target_addr(
        &self,
        token: Token<'_>,
        bind_to: &BindTo,
    ) -> Result<IpAddr, PortSpecError> {
        let addr = self.parse_addr(token)?;
        let is_broadcast = matches!(addr, IpAddr::V4(v4) if v4.is_broadcast());
        if addr.is_unspecified() || addr.is_multicast() || addr.is_loopback() || is_broadcast {
            return Err(self.error(token, PortSpecProblem::BadTargetAddress));
        }
        match bind_to.addr {
            None => Err(self.error(token, PortSpecProblem::DualStackTarget)),
            Some(bound) if bound.is_ipv4() != addr.is_ipv4() => {
                Err(self.error(token, PortSpecProblem::TargetFamilyMismatch))
            }
            Some(_) => Ok(addr),
        }
    }

    fn parse_chunk(&self, token: Token<'_>, bind_to: &BindTo) -> Result<PortChunk, PortSpecError> {
        let text = token.text;
        if text.is_empty() {
            return Err(self.error(token, PortSpecProblem::EmptyItem));
        }
        if text == "none" {
            return Err(self.error(token, PortSpecProblem::NoneNotAlone));
        }
        if text == "auto" {
            return Err(self.error(token, PortSpecProblem::AutoUnsupported));
        }
        if text == "all" {
            return Ok(PortChunk::All { guest_addr: None });
        }
        if let Some(addr) = text.strip_prefix("all:") {
            let addr_token = token.tail(text.len() - addr.len());
            return Ok(PortChunk::All {
                guest_addr: Some(self.parse_target_addr(addr_token, bind_to)?),
            });
        }
        if text.starts_with('~') {
            return Ok(PortChunk::Exclude(self.parse_range(token.tail(1))?));
        }
        let (host_token, target) = match text.find(':') {
            Some(colon) => (token.sub(0, colon), Some(token.tail(colon + 1))),
            None => (token, None),
        };
        let host_ports = self.parse_range(host_token)?;
        let (guest_ports, guest_addr) = match target {
            None => (host_ports, None),
            Some(target) => self.parse_target(target, host_ports, bind_to)?,
        };
        Ok(PortChunk::Include {
            host_ports,
            guest_ports,
            guest_addr,
        })
    }

    /// `ADDR/RANGE`, `RANGE` or `ADDR` after the `:` of an include chunk.
    fn parse_target(
        &self,
        target: Token<'_>,
        host_ports: PortRange,
        bind_to: &BindTo,
    ) -> Result<(PortRange, Option<IpAddr>), PortSpecError> {
        if target.text.is_empty() {
            return Err(self.error(target, PortSpecProblem::NotAPort));
        }
        let (addr, range_token) = match target.text.rfind('/') {
            Some(slash) => (
                Some(self.parse_target_addr(target.sub(0, slash), bind_to)?),
                Some(target.tail(slash + 1)),
            ),
            None if target.text.bytes().all(|b| b.is_ascii_digit() || b == b'-') => {
                (None, Some(target))
            }
            None => (Some(self.parse_target_addr(target, bind_to)?), None),
        };
        let guest_ports = match range_token {
            Some(range_token) => {
                let guest_ports = self.parse_range(range_token)?;
                if guest_ports.port_count() != host_ports.port_count() {
                    return Err(self.error(
                        target,
                        PortSpecProblem::LengthMismatch {
                            host: host_ports.port_count(),
                            guest: guest_ports.port_count(),
                        },
                    ));
                }
                guest_ports
            }
            None => host_ports,
        };
        Ok((guest_ports, addr))
    }

    fn parse_range(&self, token: Token<'_>) -> Result<PortRange, PortSpecError> {
        let (first, last) = match token.text.find('-') {
            Some(dash) => {
                let first = self.parse_port(token.sub(0, dash))?;
                let last = self.parse_port(token.tail(dash + 1))?;
                (first, last)
            }
            None => {
                let port = self.parse_port(token)?;
                (port, port)
            }
        };
        PortRange::new(first, last).ok_or_else(|| self.error(token, PortSpecProblem::ReversedRange))
    }

    fn parse_port(&self, token: Token<'_>) -> Result<u16, PortSpecError> {
        let text = token.text;
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.error(token, PortSpecProblem::NotAPort));
        }
        let significant = text.trim_start_matches('0');
        if significant.len() > 5 {
            return Err(self.error(token, PortSpecProblem::PortTooLarge));
        }
        let value: u32 = significant.parse().unwrap_or(0);
        match u16::try_from(value) {
            Ok(0) => Err(self.error(token, PortSpecProblem::PortZero)),
            Ok(port) => Ok(port),
            Err(_) => Err(self.error(token, PortSpecProblem::PortTooLarge)),
        }
    }
}

/// Whether `name` is acceptable as a Linux interface name.
pub fn is_valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_INTERFACE_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == '%' || c.is_whitespace())
}

/// Parses one `-t`/`-u` option argument.
pub fn parse_port_spec(spec: &str) -> Result<PortSpec, PortSpecError> {
    SpecParser { spec }.parse()
}

/// One forwarding rule: host ports on a listener, mapped to guest ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRule {
    pub bind_to: BindTo,
    pub host_ports: PortRange,
    /// Same length as `host_ports`: `host_ports.first() + n` maps to
    /// `guest_ports.first() + n`.
    pub guest_ports: PortRange,
    /// Destination address in the guest; `None` means the guest's own address.
    pub guest_addr: Option<IpAddr>,
    /// From `all` or an exclusion-only spec: a port that cannot be bound is skipped
    /// silently (passt reports an error only if no port at all could be bound).
    pub best_effort: bool,
}

impl ForwardRule {
    /// The guest port that `host_port` maps to, if this rule covers it.
    pub fn guest_port_for(&self, host_port: u16) -> Option<u16> {
        if self.host_ports.contains(host_port) {
            Some(host_port - self.host_ports.first() + self.guest_ports.first())
        } else {
            None
        }
    }

    /// Whether the rule needs IPv4 (`Some(true)`), IPv6 (`Some(false)`), or listens
    /// on both (`None`).
    pub fn needs_ipv4(&self) -> Option<bool> {
        self.bind_to.addr.map(|addr| addr.is_ipv4())
    }
}

impl fmt::Display for ForwardRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} => ", self.bind_to, self.host_ports)?;
        if let Some(addr) = self.guest_addr {
            write!(f, "{}:", bracketed(addr))?;
        }
        write!(f, "{}", self.guest_ports)?;
        if self.best_effort {
            f.write_str(" (best effort)")?;
        }
        Ok(())
    }
}

/// Why a set of port specs cannot be combined.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PortForwardError {
    #[error("'none' conflicts with the other port specifications of the same protocol")]
    NoneWithOthers,
    #[error("forwarding rule {new} conflicts with {existing}")]
    Conflict { new: String, existing: String },
    #[error("forwarding rule {rule} needs {family}, which is disabled")]
    FamilyDisabled { rule: String, family: &'static str },
}

/// The forwarding table of one protocol (every `-t`, or every `-u`, option).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortForwards {
    rules: Vec<ForwardRule>,
    excluded: PortSet,
}

impl PortForwards {
    /// Forward nothing (passt's default in passt/vhost-user mode).
    pub fn none() -> PortForwards {
        PortForwards::default()
    }

    /// Builds the table from every option given for one protocol, in command-line
    /// order. `ephemeral_ports` is the host's ephemeral range, left out of `all`.
    pub fn from_specs(
        specs: &[PortSpec],
        ephemeral_ports: PortRange,
    ) -> Result<PortForwards, PortForwardError> {
        if specs.len() > 1 && specs.contains(&PortSpec::None) {
            return Err(PortForwardError::NoneWithOthers);
        }
        let mut table = PortForwards::default();
        let mut occupied: Vec<(BindTo, PortSet)> = Vec::new();
        for spec in specs {
            let PortSpec::Forward { bind_to, chunks } = spec else {
                continue;
            };
            for rule in expand_spec(bind_to, chunks, ephemeral_ports, &mut table.excluded) {
                table.add(rule, &mut occupied)?;
            }
        }
        Ok(table)
    }

    fn add(
        &mut self,
        rule: ForwardRule,
        occupied: &mut Vec<(BindTo, PortSet)>,
    ) -> Result<(), PortForwardError> {
        let clash = occupied.iter().any(|(bind_to, ports)| {
            bind_to.overlaps(&rule.bind_to) && ports.contains_any(rule.host_ports)
        });
        if clash {
            let existing = self
                .rules
                .iter()
                .find(|old| {
                    old.bind_to.overlaps(&rule.bind_to) && old.host_ports.overlaps(rule.host_ports)
                })
                .map(ToString::to_string)
                .unwrap_or_default();
            return Err(PortForwardError::Conflict {
                new: rule.to_string(),
                existing,
            });
        }
        match occupied
            .iter_mut()
            .find(|(bind_to, _)| *bind_to == rule.bind_to)
        {
            Some((_, ports)) => ports.insert_range(rule.host_ports),
            None => {
                let mut ports = PortSet::new();
                ports.insert_range(rule.host_ports);
                occupied.push((rule.bind_to.clone(), ports));
            }
        }
        self.rules.push(rule);
        Ok(())
    }

    /// The rules, in command-line order.
    pub fn rules(&self) -> &[ForwardRule] {
        &self.rules
    }

    /// Every port named with `~` in any option (already applied to [`Self::rules`],
    /// per option, as passt does).
    pub fn excluded(&self) -> &PortSet {
        &self.excluded
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The guest port for a connection or datagram to `host_port`, from the first rule
    /// covering it, whatever its listening address.
    pub fn guest_port_for(&self, host_port: u16) -> Option<u16> {
        self.rules
            .iter()
            .find_map(|rule| rule.guest_port_for(host_port))
    }

    /// The rule that handles traffic to `local_addr`:`host_port`.
    pub fn rule_for(&self, local_addr: IpAddr, host_port: u16) -> Option<&ForwardRule> {
        self.rules
            .iter()
            .find(|rule| rule.host_ports.contains(host_port) && rule.bind_to.accepts(local_addr))
    }

    /// Fails if a rule listens on an address family that is disabled (`-4`/`-6`).
    pub fn check_families(&self, ipv4: bool, ipv6: bool) -> Result<(), PortForwardError> {
        for rule in &self.rules {
            let family = match rule.needs_ipv4() {
                Some(true) if !ipv4 => "IPv4",
                Some(false) if !ipv6 => "IPv6",
                _ => continue,
            };
            return Err(PortForwardError::FamilyDisabled {
                rule: rule.to_string(),
                family,
            });
        }
        Ok(())
    }
}

/// Rules for one option: includes split around the option's exclusions, then, for
/// `all` or an exclusion-only option, every other non-ephemeral port.
fn expand_spec(
    bind_to: &BindTo,
    chunks: &[PortChunk],
    ephemeral_ports: PortRange,
    all_excluded: &mut PortSet,
) -> Vec<ForwardRule> {
    let mut excluded = PortSet::new();
    for chunk in chunks {
        if let PortChunk::Exclude(range) = chunk {
            excluded.insert_range(*range);
        }
    }
    all_excluded.insert_all(&excluded);

    let mut rules = Vec::new();
    let mut explicit = PortSet::new();
    let mut all_target: Option<Option<IpAddr>> = None;
    for chunk in chunks {
        match chunk {
            PortChunk::Include {
                host_ports,
                guest_ports,
                guest_addr,
            } => {
                explicit.insert_range(*host_ports);
                for run in runs_outside(*host_ports, &excluded) {
                    let offset = run.first() - host_ports.first();
                    let guest_first = guest_ports.first() + offset;
                    let guest_last = guest_first + (run.last() - run.first());
                    rules.extend(PortRange::new(guest_first, guest_last).map(|guest_run| {
                        ForwardRule {
                            bind_to: bind_to.clone(),
                            host_ports: run,
                            guest_ports: guest_run,
                            guest_addr: *guest_addr,
                            best_effort: false,
                        }
                    }));
                }
            }
            PortChunk::All { guest_addr } => all_target = Some(*guest_addr),
            PortChunk::Exclude(_) => {}
        }
    }
    let exclusion_only = rules.is_empty() && explicit.is_empty();
    if all_target.is_some() || exclusion_only {
        let mut skipped = excluded;
        skipped.insert_range(ephemeral_ports);
        skipped.insert_all(&explicit);
        let guest_addr = all_target.flatten();
        rules.extend(
            runs_outside(PortRange::ALL, &skipped)
                .into_iter()
                .map(|run| ForwardRule {
                    bind_to: bind_to.clone(),
                    host_ports: run,
                    guest_ports: run,
                    guest_addr,
                    best_effort: true,
                }),
        );
    }
    rules
}

/// Maximal runs of `range` whose ports are not in `skipped`.
fn runs_outside(range: PortRange, skipped: &PortSet) -> Vec<PortRange> {
    let mut runs = Vec::new();
    let mut run_start: Option<u16> = None;
    for port in range.ports() {
        match (skipped.contains(port), run_start) {
            (false, None) => run_start = Some(port),
            (true, Some(start)) => {
                runs.extend(PortRange::new(start, port - 1));
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        runs.extend(PortRange::new(start, range.last()));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn range(first: u16, last: u16) -> PortRange {
        PortRange::new(first, last).expect("valid range")
    }

    fn parse(spec: &str) -> PortSpec {
        parse_port_spec(spec).unwrap_or_else(|error| panic!("{spec}: {error}"))
    }

    fn problem(spec: &str) -> (PortSpecProblem, String, usize) {
        let error = parse_port_spec(spec).expect_err(spec);
        (error.problem, error.token, error.column)
    }

    fn forwards(specs: &[&str]) -> PortForwards {
        let specs: Vec<PortSpec> = specs.iter().map(|spec| parse(spec)).collect();
        PortForwards::from_specs(&specs, RFC6335_EPHEMERAL_PORTS).expect("valid table")
    }

    fn include(host: PortRange, guest: PortRange, addr: Option<IpAddr>) -> PortChunk {
        PortChunk::Include {
            host_ports: host,
            guest_ports: guest,
            guest_addr: addr,
        }
    }

    #[test]
    fn none_is_its_own_spec() {
        assert_eq!(parse("none"), PortSpec::None);
        assert!(forwards(&["none"]).is_empty());
    }

    #[test]
    fn single_port_maps_to_itself() {
        assert_eq!(
            parse("22"),
            PortSpec::Forward {
                bind_to: BindTo::default(),
                chunks: vec![include(range(22, 22), range(22, 22), None)],
            }
        );
        let table = forwards(&["22"]);
        assert_eq!(table.guest_port_for(22), Some(22));
        assert_eq!(table.guest_port_for(23), None);
    }

    #[test]
    fn single_port_with_target_port() {
        let table = forwards(&["22:23"]);
        assert_eq!(table.guest_port_for(22), Some(23));
        assert_eq!(table.rules().len(), 1);
        assert!(!table.rules()[0].best_effort);
    }

    #[test]
    fn comma_separated_list() {
        let table = forwards(&["22,25"]);
        assert_eq!(table.guest_port_for(22), Some(22));
        assert_eq!(table.guest_port_for(25), Some(25));
        assert_eq!(table.guest_port_for(24), None);
    }

    #[test]
    fn range_maps_to_same_ports() {
        let table = forwards(&["22-80"]);
        assert_eq!(table.guest_port_for(21), None);
        assert_eq!(table.guest_port_for(22), Some(22));
        assert_eq!(table.guest_port_for(80), Some(80));
        assert_eq!(table.guest_port_for(81), None);
    }

    #[test]
    fn range_maps_to_shifted_range() {
        let table = forwards(&["22-80:32-90"]);
        assert_eq!(table.guest_port_for(22), Some(32));
        assert_eq!(table.guest_port_for(50), Some(60));
        assert_eq!(table.guest_port_for(80), Some(90));
        let table = forwards(&["1000-1010:2000-2010"]);
        assert_eq!(table.guest_port_for(1005), Some(2005));
    }

    #[test]
    fn mapping_lengths_must_match() {
        let (problem, token, column) = problem("1000-1010:2000-2009");
        assert_eq!(
            problem,
            PortSpecProblem::LengthMismatch {
                host: 11,
                guest: 10
            }
        );
        assert_eq!(token, "2000-2009");
        assert_eq!(column, 11);
        assert!(matches!(
            problem_of("22:30-31"),
            PortSpecProblem::LengthMismatch { host: 1, guest: 2 }
        ));
    }

    fn problem_of(spec: &str) -> PortSpecProblem {
        problem(spec).0
    }

    #[test]
    fn bind_address_prefix() {
        assert_eq!(
            parse("192.0.2.1/22"),
            PortSpec::Forward {
                bind_to: BindTo {
                    addr: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
                    device: None
                },
                chunks: vec![include(range(22, 22), range(22, 22), None)],
            }
        );
    }

    #[test]
    fn bind_address_and_device_prefix() {
        let PortSpec::Forward { bind_to, .. } = parse("192.0.2.1%eth0/22") else {
            panic!("not a forward");
        };
        assert_eq!(bind_to.addr, Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))));
        assert_eq!(bind_to.device.as_deref(), Some("eth0"));
    }

    #[test]
    fn device_only_prefix() {
        let PortSpec::Forward { bind_to, .. } = parse("%eth0/22") else {
            panic!("not a forward");
        };
        assert_eq!(bind_to.addr, None);
        assert_eq!(bind_to.device.as_deref(), Some("eth0"));
        let PortSpec::Forward { bind_to, .. } = parse("*%eth0/22") else {
            panic!("not a forward");
        };
        assert_eq!(bind_to.device.as_deref(), Some("eth0"));
        let PortSpec::Forward { bind_to, .. } = parse("*/22") else {
            panic!("not a forward");
        };
        assert_eq!(bind_to, BindTo::default());
    }

    #[test]
    fn ipv6_bind_prefix_with_and_without_brackets() {
        for spec in ["::1/all", "[::1]/all"] {
            let PortSpec::Forward { bind_to, chunks } = parse(spec) else {
                panic!("not a forward");
            };
            assert_eq!(bind_to.addr, Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
            assert_eq!(chunks, vec![PortChunk::All { guest_addr: None }]);
        }
        let PortSpec::Forward { bind_to, .. } = parse("[2001:db8::1]%eth0/22") else {
            panic!("not a forward");
        };
        assert_eq!(bind_to.device.as_deref(), Some("eth0"));
    }

    #[test]
    fn target_address_and_port() {
        let spec = parse("0.0.0.0/5000:192.0.2.5/6000");
        let target = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 5));
        let PortSpec::Forward { bind_to, chunks } = &spec else {
            panic!("not a forward");
        };
        assert_eq!(bind_to.addr, Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        assert_eq!(
            chunks,
            &vec![include(range(5000, 5000), range(6000, 6000), Some(target))]
        );
        let table = PortForwards::from_specs(&[spec], RFC6335_EPHEMERAL_PORTS).expect("valid");
        assert_eq!(table.guest_port_for(5000), Some(6000));
        assert_eq!(table.rules()[0].guest_addr, Some(target));
    }

    #[test]
    fn target_address_only_keeps_ports() {
        let PortSpec::Forward { chunks, .. } = parse("0.0.0.0/80-81:192.0.2.5") else {
            panic!("not a forward");
        };
        assert_eq!(
            chunks,
            vec![include(
                range(80, 81),
                range(80, 81),
                Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 5)))
            )]
        );
        let PortSpec::Forward { chunks, .. } = parse("[::]/80:[2001:db8::5]/8080") else {
            panic!("not a forward");
        };
        assert_eq!(
            chunks,
            vec![include(
                range(80, 80),
                range(8080, 8080),
                Some("2001:db8::5".parse().expect("addr"))
            )]
        );
    }

    #[test]
    fn all_with_target_address() {
        let PortSpec::Forward { chunks, .. } = parse("127.0.0.6/all:192.0.2.6") else {
            panic!("not a forward");
        };
        assert_eq!(
            chunks,
            vec![PortChunk::All {
                guest_addr: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 6)))
            }]
        );
    }

    #[test]
    fn target_address_rules() {
        assert_eq!(problem_of("80:192.0.2.5"), PortSpecProblem::DualStackTarget);
        assert_eq!(
            problem_of("0.0.0.0/80:[2001:db8::5]/80"),
            PortSpecProblem::TargetFamilyMismatch
        );
        assert_eq!(
            problem_of("0.0.0.0/80:224.0.0.1/80"),
            PortSpecProblem::BadTargetAddress
        );
        assert_eq!(
            problem_of("0.0.0.0/80:127.0.0.1"),
            PortSpecProblem::BadTargetAddress
        );
        assert_eq!(
            problem_of("0.0.0.0/all:0.0.0.0"),
            PortSpecProblem::BadTargetAddress
        );
        assert_eq!(problem_of("0.0.0.0/all:8080"), PortSpecProblem::BadAddress);
        assert_eq!(
            problem_of("0.0.0.0/80:1.2.3/80"),
            PortSpecProblem::BadAddress
        );
    }

    #[test]
    fn include_range_minus_exclusion() {
        let table = forwards(&["2000-5000,~3000-3010"]);
        assert_eq!(table.guest_port_for(2999), Some(2999));
        assert_eq!(table.guest_port_for(3000), None);
        assert_eq!(table.guest_port_for(3010), None);
        assert_eq!(table.guest_port_for(3011), Some(3011));
        assert_eq!(table.rules().len(), 2);
        assert!(table.excluded().contains(3005));
    }

    #[test]
    fn exclusion_splits_a_shifted_range_consistently() {
        let table = forwards(&["192.0.2.1/20-30:120-130,~25"]);
        assert_eq!(table.guest_port_for(24), Some(124));
        assert_eq!(table.guest_port_for(25), None);
        assert_eq!(table.guest_port_for(26), Some(126));
    }

    #[test]
    fn exclusion_only_means_all_non_ephemeral_others() {
        let table = forwards(&["~20000-20010"]);
        assert_eq!(table.guest_port_for(1), Some(1));
        assert_eq!(table.guest_port_for(19999), Some(19999));
        assert_eq!(table.guest_port_for(20005), None);
        assert_eq!(table.guest_port_for(20011), Some(20011));
        assert_eq!(table.guest_port_for(49151), Some(49151));
        assert_eq!(table.guest_port_for(49152), None);
        assert!(table.rules().iter().all(|rule| rule.best_effort));
    }

    #[test]
    fn all_forwards_every_non_ephemeral_port() {
        let table = forwards(&["all"]);
        assert_eq!(table.guest_port_for(1), Some(1));
        assert_eq!(table.guest_port_for(49151), Some(49151));
        assert_eq!(table.guest_port_for(65535), None);
        assert_eq!(table.rules().len(), 1);
    }

    #[test]
    fn all_respects_the_hosts_ephemeral_range() {
        let spec = parse("all");
        let table = PortForwards::from_specs(&[spec], range(32768, 60999)).expect("valid");
        assert_eq!(table.guest_port_for(32767), Some(32767));
        assert_eq!(table.guest_port_for(32768), None);
        assert_eq!(table.guest_port_for(61000), Some(61000));
    }

    #[test]
    fn all_combines_with_explicit_mappings() {
        let table = forwards(&["all,22:2222,~80"]);
        assert_eq!(table.guest_port_for(22), Some(2222));
        assert_eq!(table.guest_port_for(23), Some(23));
        assert_eq!(table.guest_port_for(80), None);
        assert!(
            !table
                .rule_for(IpAddr::V4(Ipv4Addr::LOCALHOST), 22)
                .expect("rule")
                .best_effort
        );
        let table = forwards(&["all,50000"]);
        assert_eq!(table.guest_port_for(50000), Some(50000));
        assert_eq!(table.guest_port_for(50001), None);
    }

    #[test]
    fn exclusions_apply_per_option_like_passt() {
        let table = forwards(&["2000-5000,~3000", "0.0.0.0/3000"]);
        assert_eq!(table.guest_port_for(3000), Some(3000));
        assert!(table.excluded().contains(3000));
    }

    #[test]
    fn rule_lookup_honours_listening_address() {
        let table = forwards(&["127.0.0.1/80:8080", "192.0.2.1/80:9090"]);
        let rule = table
            .rule_for(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 80)
            .expect("rule");
        assert_eq!(rule.guest_port_for(80), Some(9090));
        assert_eq!(
            table.rule_for(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), 80),
            None
        );
        let table = forwards(&["0.0.0.0/80"]);
        assert!(table
            .rule_for(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80)
            .is_some());
        assert!(table
            .rule_for(IpAddr::V6(Ipv6Addr::LOCALHOST), 80)
            .is_none());
    }

    #[test]
    fn overlapping_rules_conflict() {
        let conflict = |specs: &[&str]| {
            let specs: Vec<PortSpec> = specs.iter().map(|spec| parse(spec)).collect();
            PortForwards::from_specs(&specs, RFC6335_EPHEMERAL_PORTS)
        };
        assert!(matches!(
            conflict(&["22,22"]),
            Err(PortForwardError::Conflict { .. })
        ));
        assert!(matches!(
            conflict(&["20-30", "25"]),
            Err(PortForwardError::Conflict { .. })
        ));
        assert!(matches!(
            conflict(&["all", "22"]),
            Err(PortForwardError::Conflict { .. })
        ));
        assert!(matches!(
            conflict(&["0.0.0.0/22", "192.0.2.1/22"]),
            Err(PortForwardError::Conflict { .. })
        ));
        assert!(conflict(&["127.0.0.1/22", "192.0.2.1/22"]).is_ok());
        assert!(conflict(&["0.0.0.0/22", "[::]/22"]).is_ok());
        assert_eq!(
            conflict(&["none", "22"]),
            Err(PortForwardError::NoneWithOthers)
        );
        assert_eq!(
            conflict(&["22", "none"]),
            Err(PortForwardError::NoneWithOthers)
        );
    }

    #[test]
    fn families_are_checked_against_enabled_ip_versions() {
        let table = forwards(&["192.0.2.1/22", "[::1]/23"]);
        assert!(table.check_families(true, true).is_ok());
        assert!(matches!(
            table.check_families(false, true),
            Err(PortForwardError::FamilyDisabled { family: "IPv4", .. })
        ));
        assert!(matches!(
            table.check_families(true, false),
            Err(PortForwardError::FamilyDisabled { family: "IPv6", .. })
        ));
        assert!(forwards(&["22"]).check_families(true, false).is_ok());
    }

    #[test]
    fn port_zero_and_too_large_are_refused() {
        assert_eq!(problem("0"), (PortSpecProblem::PortZero, "0".into(), 1));
        assert_eq!(problem("22,0-5").0, PortSpecProblem::PortZero);
        assert_eq!(problem("22:0").0, PortSpecProblem::PortZero);
        assert_eq!(problem("~0").0, PortSpecProblem::PortZero);
        assert_eq!(
            problem("65536"),
            (PortSpecProblem::PortTooLarge, "65536".into(), 1)
        );
        assert_eq!(
            problem("1-99999999999999999999").0,
            PortSpecProblem::PortTooLarge
        );
        assert!(parse_port_spec("65535").is_ok());
        assert!(parse_port_spec("00022").is_ok());
    }

    #[test]
    fn reversed_ranges_are_refused() {
        assert_eq!(
            problem("80-22"),
            (PortSpecProblem::ReversedRange, "80-22".into(), 1)
        );
        assert_eq!(problem("~30-20").0, PortSpecProblem::ReversedRange);
        assert_eq!(problem("1-2:9-8").0, PortSpecProblem::ReversedRange);
    }

    #[test]
    fn empty_items_are_refused_with_their_column() {
        assert_eq!(problem(""), (PortSpecProblem::EmptySpec, String::new(), 1));
        assert_eq!(
            problem("22,,23"),
            (PortSpecProblem::EmptyItem, String::new(), 4)
        );
        assert_eq!(problem(",22").0, PortSpecProblem::EmptyItem);
        assert_eq!(problem("22,").0, PortSpecProblem::EmptyItem);
        assert_eq!(
            problem("192.0.2.1/"),
            (PortSpecProblem::MissingPorts, "192.0.2.1/".into(), 1)
        );
    }

    #[test]
    fn malformed_numbers_are_refused() {
        assert_eq!(problem("ssh"), (PortSpecProblem::NotAPort, "ssh".into(), 1));
        assert_eq!(
            problem("22,+23"),
            (PortSpecProblem::NotAPort, "+23".into(), 4)
        );
        assert_eq!(problem("-5").0, PortSpecProblem::NotAPort);
        assert_eq!(problem("5-").0, PortSpecProblem::NotAPort);
        assert_eq!(problem("22:").0, PortSpecProblem::NotAPort);
        assert_eq!(problem("~").0, PortSpecProblem::NotAPort);
        assert_eq!(problem("1-2-3").0, PortSpecProblem::NotAPort);
        assert_eq!(problem(" 22").0, PortSpecProblem::NotAPort);
    }

    #[test]
    fn bad_addresses_and_devices_are_refused() {
        assert_eq!(
            problem("1.2.3/22"),
            (PortSpecProblem::BadAddress, "1.2.3".into(), 1)
        );
        assert_eq!(problem("eth0/22").0, PortSpecProblem::BadAddress);
        assert_eq!(problem("[::1/22").0, PortSpecProblem::BadAddress);
        assert_eq!(problem("%/22").0, PortSpecProblem::BadDevice);
        assert_eq!(
            problem("%a-very-long-interface/22").0,
            PortSpecProblem::BadDevice
        );
        assert_eq!(problem("%../22").0, PortSpecProblem::BadDevice);
        assert_eq!(
            problem("192.0.2.1%eth 0/22"),
            (PortSpecProblem::BadDevice, "eth 0".into(), 11)
        );
    }

    #[test]
    fn auto_is_rejected_as_pasta_only() {
        assert_eq!(
            problem("auto"),
            (PortSpecProblem::AutoUnsupported, "auto".into(), 1)
        );
        assert_eq!(problem("8000-8010,auto").1, "auto");
        assert_eq!(problem("::1/auto").2, 5);
    }

    #[test]
    fn none_and_all_misuse() {
        assert_eq!(problem("22,none").0, PortSpecProblem::NoneNotAlone);
        assert_eq!(problem("127.0.0.1/none").0, PortSpecProblem::NoneNotAlone);
        assert_eq!(problem("all,all").0, PortSpecProblem::AllRepeated);
    }

    #[test]
    fn errors_name_the_spec_token_and_column() {
        let error = parse_port_spec("22,80-70").expect_err("reversed");
        assert_eq!(
            error.to_string(),
            "invalid port specification '22,80-70': range ends before it starts: \
             '80-70' at column 4"
        );
    }

    #[test]
    fn display_round_trips_documented_forms() {
        for spec in [
            "none",
            "22",
            "22:23",
            "22,25",
            "22-80:32-90",
            "192.0.2.1/22",
            "192.0.2.1%eth0/22",
            "%eth0/22",
            "0.0.0.0/5000:192.0.2.5/6000",
            "127.0.0.6/all:192.0.2.6",
            "2000-5000,~3000-3010",
            "~20000-20010",
            "[::1]/all",
            "[::]/80:[2001:db8::5]/8080",
        ] {
            let parsed = parse(spec);
            assert_eq!(parse(&parsed.to_string()), parsed, "{spec}");
        }
    }

    #[test]
    fn port_set_ranges_and_counts() {
        let mut set = PortSet::new();
        assert!(set.is_empty());
        set.insert_range(range(10, 12));
        set.insert(65535);
        set.insert(1);
        assert_eq!(set.count(), 5);
        assert_eq!(
            set.ranges(),
            vec![range(1, 1), range(10, 12), range(65535, 65535)]
        );
        assert!(set.contains_any(range(12, 20)));
        assert!(!set.contains_any(range(13, 20)));
    }

    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        fn exclusion() -> impl Strategy<Value = PortRange> {
            (1u16..=65535, 0u16..200).prop_map(|(first, extra)| {
                PortRange::new(first, first.saturating_add(extra)).unwrap_or(PortRange::ALL)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn all_minus_exclusions_forwards_exactly_the_rest(
                exclusions in vec(exclusion(), 0..8),
                ephemeral_first in 1024u16..=65535,
                with_all_keyword in any::<bool>(),
            ) {
                let ephemeral = PortRange::new(ephemeral_first, 65535).unwrap_or(PortRange::ALL);
                let mut text: Vec<String> = exclusions.iter().map(|r| format!("~{r}")).collect();
                if with_all_keyword || text.is_empty() {
                    text.insert(0, "all".to_owned());
                }
                let spec = parse_port_spec(&text.join(",")).expect("valid spec");
                let table = PortForwards::from_specs(&[spec], ephemeral).expect("valid table");
                for port in 1..=u16::MAX {
                    let excluded = exclusions.iter().any(|r| r.contains(port))
                        || ephemeral.contains(port);
                    prop_assert_eq!(table.guest_port_for(port), (!excluded).then_some(port));
                }
                for pair in table.rules().windows(2) {
                    prop_assert!(pair[0].host_ports.last() < pair[1].host_ports.first());
                }
            }

            #[test]
            fn shifted_range_keeps_offsets(first in 1u16..=60000, len in 0u16..1000, to in 1u16..=60000) {
                let last = first.saturating_add(len);
                let to_last = u32::from(to) + u32::from(last - first);
                prop_assume!(to_last <= 65535);
                let text = format!("{first}-{last}:{to}-{to_last}");
                let spec = parse_port_spec(&text).expect("valid spec");
                let table = PortForwards::from_specs(&[spec], RFC6335_EPHEMERAL_PORTS).expect("table");
                for port in first..=last {
                    prop_assert_eq!(table.guest_port_for(port), Some(to + (port - first)));
                }
            }

            #[test]
            fn parser_never_panics(text in "[0-9a-f:~,/%\\[\\]\\-.*]{0,24}") {
                let _ = parse_port_spec(&text);
            }
        }
    }
}
