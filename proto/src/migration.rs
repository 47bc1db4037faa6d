//! The migration stream: the device state one baton hands to the next through QEMU
//! (`SET_DEVICE_STATE_FD` SAVE on the source, LOAD on the target).
//!
//! # Theory of operation
//!
//! The stream is untrusted input on the target. It is read completely, its framing walked,
//! its checksum verified, and every record decoded and validated into a
//! [`MigrationState`] before the caller sees anything ([`read_stream`]); a stream with any
//! defect yields a [`StreamError`] naming the record index and byte offset, and nothing
//! else. The writer ([`StreamWriter`]) runs the same per-record validation and the same
//! limits, so a source fails *before* producing a stream its peer would refuse.
//!
//! Both directions make one pass over the bytes, a record at a time, so that a stream of
//! tens of megabytes (10,000 flows with their socket queues) costs little more than
//! copying it once: the writer encodes each body into one reused buffer and checksums it
//! there, without building a [`Record`] (which would clone a flow's queues); the reader
//! (`reader`) takes each record from a small reused buffer (`source`), checksums it,
//! and decodes it while it is in the cache. The reader still reports errors as if it had
//! checked all the framing and the checksum first (see `reader` for the order).
//!
//! # Layout
//!
//! All integers are **little-endian**, everywhere — record framing, bodies, sequence
//! numbers, addresses' ports (the same convention as the helper protocol, see
//! [`crate::codec`]). IP addresses are byte arrays in network order, as they appear in a
//! packet.
//!
//! ```text
//!  header (16 bytes)
//!  0          8         10          12        16
//!  +----------+---------+-----------+---------+
//!  | BATONMIG | version | oldest    | flags   |
//!  | magic    | u16     | compatible| u32     |
//!  |          |         | u16       |         |
//!  +----------+---------+-----------+---------+
//!
//!  then records, each self-delimiting (8-byte record header + body):
//!  0         2         4          8
//!  +---------+---------+----------+-------------------+
//!  | type    | flags   | length   | body              |
//!  | u16     | u16     | u32      | `length` bytes    |
//!  +---------+---------+----------+-------------------+
//!   record flags: bit 0 = SKIPPABLE (a reader that does not know `type` may skip
//!   the record); bits 1..15 reserved, must be 0.
//!
//!  last, the end record (type 0xFFFF, flags 0, length 8):
//!  +--------+--------+----------+--------------+-------------+
//!  | ffff   | 0000   | 08000000 | record count | CRC-32      |
//!  |        |        |          | u32          | u32         |
//!  +--------+--------+----------+--------------+-------------+
//!   record count = number of records before the end record (skipped ones included);
//!   CRC-32 (IEEE 802.3, as `crc32fast`) over every byte of the stream before the CRC
//!   field itself: header, all records, the end record's header and count.
//!   Nothing may follow.
//! ```
//!
//! Record bodies are the bincode encoding of the record's type in this module with
//! [`crate::codec::config`] (fixed-width little-endian integers, `u64` lengths for
//! sequences and strings, `u32` enum tags, one byte for `bool` and the `Option` tag), and
//! must be used exactly (trailing bytes are an error). The end record is laid out by hand.
//!
//! | type   | record               | at most | body                           |
//! |--------|----------------------|---------|--------------------------------|
//! | 0x0001 | [`DeviceRecord`]     | once, required | acked features, our MAC, MTU |
//! | 0x0002 | [`SourceRecord`]     | once, required | where the source runs, handover |
//! | 0x0003 | [`GuestRecord`]      | once, required | what was learned about the guest |
//! | 0x0004 | [`ForwardsRecord`]   | once    | the `-t`/`-u` forwards in force |
//! | 0x0010 | [`TcpFlowRecord`]    | per flow | guest side, host ends, kernel |
//! | 0x0011 | [`UdpFlowRecord`]    | per flow | 4-tuple + idle time left      |
//! | 0x0012 | [`TcpOptionsRecord`] | per TCP flow, skippable | options negotiated with the guest |
//! | 0x0020 | padding              | any, skippable | zeros, ignored ([`StreamWriter::write_padding`]) |
//! | 0xFFFF | end                  | once, last | count + CRC                 |
//!
//! Records may come in any order; every flow record carries an explicit [`FlowId`],
//! unique across all flow types of the stream (never matched by position, unlike passt).
//! A [`TcpOptionsRecord`] names the TCP flow it belongs to by that id (at most one per
//! flow; one naming no TCP flow of the stream is an error).
//!
//! # Versions and compatibility
//!
//! The header carries the version the writer used and the oldest reader version that can
//! still read the stream. A reader accepts a stream when `oldest_compatible ≤` its own
//! [`FORMAT_VERSION`] and `version ≥` [`OLDEST_READABLE_VERSION`]. What may change without
//! raising `oldest_compatible`: new record types (marked SKIPPABLE if older readers may
//! ignore them, or not, if ignoring them would lose state), new informational header flags
//! (bits 16..31). Everything else — a new field in an existing body, a new required header
//! flag (bits 0..15), a new meaning — raises `oldest_compatible`. The golden vectors in
//! `tests/migration.rs` freeze version 1.
//!
//! Added to version 1 since, compatibly: the [`TcpOptionsRecord`] (0x0012), always written
//! SKIPPABLE. It carries guest-side TCP options the [`GuestTcpSide`] body has no field
//! for (a new field there would lock out every older reader), and is written only for a
//! flow whose options differ from the defaults, so a stream without such flows is
//! byte-identical to what older writers produce. An older reader skips it and loses
//! only the option: a flow without SACK retransmits go-back-N, which is still correct
//! TCP (the guest's SACK blocks are advisory).
//! Also the padding record (0x0020), SKIPPABLE: zeros a writer may put after the
//! stream's prefix so that QEMU passes the prefix on at once (a reader that does not
//! know it skips it; this one ignores it).
//!
//! # Limits
//!
//! [`Limits::DEFAULT`]: the whole stream ≤ 1 GiB, ≤ 262 144 records, a flow (or unknown)
//! record ≤ two full TCP queues ([`crate::tcp::MAX_QUEUE_BYTES`] each) plus 64 KiB, any
//! other known record ≤ 1 MiB; each TCP queue ≤ [`crate::tcp::MAX_QUEUE_BYTES`] (via
//! [`TcpConnState::validate`]). A length over a limit is refused from the record header,
//! before its body is read or allocated.

use std::collections::HashMap;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::tcp::{Endpoint, StateError, TcpConnState, MAX_QUEUE_BYTES, MAX_WSCALE};

/// The first eight bytes of every stream.
pub const MAGIC: [u8; 8] = *b"BATONMIG";
/// The format version this code writes, and the newest it reads.
pub const FORMAT_VERSION: u16 = 1;
/// The oldest reader version that can read what this code writes.
pub const OLDEST_COMPATIBLE_VERSION: u16 = 1;
/// The oldest stream version this code still reads.
pub const OLDEST_READABLE_VERSION: u16 = 1;
/// Size of the stream header.
pub const HEADER_LEN: usize = 16;
/// Size of a record header.
pub const RECORD_HEADER_LEN: usize = 8;
/// Body length of the end record.
pub const END_BODY_LEN: usize = 8;

/// Header flag: a snapshot (`SAVE` without `LOG_ALL`, e.g. `savevm`). The source VM
/// carries on, so TCP connections were neither frozen nor moved; the stream then carries
/// no kernel TCP state.
pub const HEADER_FLAG_SNAPSHOT: u32 = 1 << 0;
/// Header flags a reader must understand (bits 0..15); an unknown one is refused.
pub const HEADER_FLAGS_REQUIRED_MASK: u32 = 0x0000_ffff;
/// Header flags this code knows.
pub const HEADER_FLAGS_KNOWN: u32 = HEADER_FLAG_SNAPSHOT;

/// Record flag: a reader that does not know the record type may skip the record.
pub const RECORD_FLAG_SKIPPABLE: u16 = 1 << 0;
/// Record flags this code knows; the others are reserved and must be 0.
pub const RECORD_FLAGS_KNOWN: u16 = RECORD_FLAG_SKIPPABLE;

/// Most bytes of a hostname ([`SourceRecord::hostname`], `HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;
/// Most bytes of an abstract UNIX socket name (`sun_path` without the leading NUL).
pub const MAX_HANDOVER_NAME: usize = 107;
/// Most bytes of an interface name (`IFNAMSIZ` without the NUL).
pub const MAX_DEVICE_NAME: usize = 15;
/// Most forwarding rules per protocol in a [`ForwardsRecord`].
pub const MAX_FORWARD_RULES: usize = 4096;
/// Smallest MTU a [`DeviceRecord`] may carry (the IPv4 minimum).
pub const MIN_MTU: u16 = 68;
/// Largest MTU a [`DeviceRecord`] may carry.
pub const MAX_MTU: u16 = 65520;
/// Smallest MSS a [`GuestTcpSide`] may carry.
pub const MIN_MSS: u16 = 64;
/// Largest window (and so distance between guest-side sequence numbers) a
/// [`GuestTcpSide`] may carry: 65535 scaled by the largest window scale.
pub const MAX_GUEST_WINDOW: u32 = 65535 << MAX_WSCALE;

/// Record type numbers.
pub mod record_type {
    pub const DEVICE: u16 = 0x0001;
    pub const SOURCE: u16 = 0x0002;
    pub const GUEST: u16 = 0x0003;
    pub const FORWARDS: u16 = 0x0004;
    pub const TCP_FLOW: u16 = 0x0010;
    pub const UDP_FLOW: u16 = 0x0011;
    pub const TCP_OPTIONS: u16 = 0x0012;
    pub const PADDING: u16 = 0x0020;
    pub const END: u16 = 0xffff;
}

/// A record type's name, for messages.
pub fn record_type_name(record_type: u16) -> &'static str {
    match record_type {
        record_type::DEVICE => "Device",
        record_type::SOURCE => "Source",
        record_type::GUEST => "Guest",
        record_type::FORWARDS => "Forwards",
        record_type::TCP_FLOW => "TcpFlow",
        record_type::UDP_FLOW => "UdpFlow",
        record_type::TCP_OPTIONS => "TcpOptions",
        record_type::PADDING => "Padding",
        record_type::END => "End",
        _ => "unknown",
    }
}

/// Size limits a reader (and writer) enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Whole stream, header and end record included.
    pub max_stream_bytes: u64,
    /// Records, the end record excluded.
    pub max_records: u32,
    /// Body of a flow record, or of a record of unknown type.
    pub max_record_bytes: u32,
    /// Body of any other known record.
    pub max_small_record_bytes: u32,
}

impl Limits {
    /// The limits baton uses.
    pub const DEFAULT: Limits = Limits {
        max_stream_bytes: 1 << 30,
        max_records: 1 << 18,
        max_record_bytes: (2 * MAX_QUEUE_BYTES + (64 << 10)) as u32,
        max_small_record_bytes: 1 << 20,
    };

    fn body_limit(&self, record_type: u16) -> u32 {
        match record_type {
            record_type::DEVICE
            | record_type::SOURCE
            | record_type::GUEST
            | record_type::FORWARDS
            | record_type::UDP_FLOW
            | record_type::TCP_OPTIONS => self.max_small_record_bytes,
            _ => self.max_record_bytes,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

// ---------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------

/// Identifies one flow within a stream (unique across TCP and UDP flows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FlowId(pub u32);

/// An IP address, bytes in network order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IpAddress {
    V4([u8; 4]),
    V6([u8; 16]),
}

impl From<std::net::IpAddr> for IpAddress {
    fn from(addr: std::net::IpAddr) -> Self {
        match addr {
            std::net::IpAddr::V4(a) => IpAddress::V4(a.octets()),
            std::net::IpAddr::V6(a) => IpAddress::V6(a.octets()),
        }
    }
}

impl From<IpAddress> for std::net::IpAddr {
    fn from(addr: IpAddress) -> Self {
        match addr {
            IpAddress::V4(a) => std::net::IpAddr::from(a),
            IpAddress::V6(a) => std::net::IpAddr::from(a),
        }
    }
}

/// The virtio device as the guest's driver knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Virtio and vhost-user feature bits the frontend acknowledged last (`LOG_ALL`
    /// included if it was set).
    pub acked_features: u64,
    /// The MAC baton uses towards the guest (the guest's router; it sits in the guest's
    /// neighbour caches).
    pub our_mac: [u8; 6],
    /// The MTU baton advertised to the guest (DHCP, router advertisements).
    pub mtu: u16,
}

/// What the source learned about the guest from its traffic (the wire form of the
/// backend's `ObservedGuest`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    pub mac: Option<[u8; 6]>,
    pub ipv4: Option<[u8; 4]>,
    /// Global-scope IPv6 source address.
    pub ipv6: Option<[u8; 16]>,
    /// Link-local (fe80::/10) IPv6 source address.
    pub ipv6_link_local: Option<[u8; 16]>,
}

/// The network namespace the source backend runs in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsIdentity {
    /// `SO_NETNS_COOKIE`: unique per namespace for the life of a boot.
    pub cookie: Option<u64>,
    /// Device and inode numbers of `/proc/self/ns/net`.
    pub dev: Option<u64>,
    pub inode: Option<u64>,
}

/// Where the target can ask the source to pass live sockets (same host and namespace).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverEndpoint {
    /// Abstract UNIX socket name (without the leading NUL). Abstract names are scoped to
    /// a network namespace: reaching it proves the namespace is shared.
    #[serde(with = "serde_bytes")]
    pub abstract_name: Vec<u8>,
    /// One-time token the target presents; the source accepts it once.
    pub token: [u8; 32],
}

/// Where the source is, so a target can tell "same host, same namespace" and take the
/// live sockets instead of restoring dumps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    pub hostname: Option<String>,
    /// `/proc/sys/kernel/random/boot_id` as 16 bytes.
    pub boot_id: Option<[u8; 16]>,
    pub netns: NetnsIdentity,
    /// Effective uid of the source backend (a handover peer must have the same).
    pub uid: u32,
    pub handover: Option<HandoverEndpoint>,
}

/// One forwarding rule: host ports on a listener, mapped to guest ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardRuleRecord {
    /// Listening address; `None` = every IPv4 and IPv6 address.
    pub bind_addr: Option<IpAddress>,
    /// `SO_BINDTODEVICE` interface.
    pub bind_device: Option<String>,
    pub host_first: u16,
    pub host_last: u16,
    pub guest_first: u16,
    pub guest_last: u16,
    /// Destination in the guest; `None` = the guest's own address.
    pub guest_addr: Option<IpAddress>,
}

/// The forwards in force on the source (`-t`, `-u`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardsRecord {
    pub tcp: Vec<ForwardRuleRecord>,
    pub udp: Vec<ForwardRuleRecord>,
}

/// Who opened a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FlowOrigin {
    /// The guest connected out.
    Guest,
    /// A host peer connected to a forwarded port.
    Host,
}

/// The guest-facing half of a TCP flow: baton plays the guest's peer, and these are the
/// numbers it keeps for that role (the wire form of the backend's `tcp::conn::GuestSide`).
/// Sequence numbers are in the guest connection's space. Only connections past the
/// handshake are recorded (a handshake in progress is simply started again by the guest).
///
/// ```text
///  towards the guest:  seq_acked_by_guest ... seq_to_guest ... seq_max_to_guest
///                      |<-- sent, not yet acked -->|<- sent before a rewind ->|
///  from the guest:     everything before seq_from_guest is in the host socket
/// ```
///
/// baton holds no payload: the unacknowledged bytes towards the guest are the head of
/// the host socket's receive queue, and `SO_PEEK_OFF` = `seq_to_guest - seq_acked_by_guest`
/// (minus our FIN once sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GuestTcpSide {
    pub origin: FlowOrigin,
    /// The guest's address and port.
    pub guest: Endpoint,
    /// The address and port the guest talks to, as the guest sees it (before any
    /// mapping such as `--map-host-loopback`).
    pub remote: Endpoint,
    /// baton's initial sequence number towards the guest.
    pub isn: u32,
    /// SND.NXT: next sequence number baton sends to the guest.
    pub seq_to_guest: u32,
    /// SND.MAX: highest sequence number sent so far (above `seq_to_guest` after a
    /// retransmission rewind).
    pub seq_max_to_guest: u32,
    /// SND.UNA: highest acknowledgement received from the guest.
    pub seq_acked_by_guest: u32,
    /// RCV.NXT: next sequence number expected from the guest (baton always acknowledges
    /// up to here).
    pub seq_from_guest: u32,
    /// Sequence number of baton's FIN towards the guest, once sent.
    pub fin_to_guest: Option<u32>,
    /// The guest's FIN was received and passed on to the host socket.
    pub fin_from_guest: bool,
    /// Window the guest advertised last, in bytes (scaled).
    pub wnd_from_guest: u32,
    /// Window baton advertised last, in bytes (scaled).
    pub wnd_to_guest: u32,
    /// Window scale shifts: applied to the guest's windows / to ours.
    pub ws_from_guest: u8,
    pub ws_to_guest: u8,
    /// Largest payload per segment towards the guest (the guest's MSS, clamped).
    pub mss_to_guest: u16,
    /// SACK was negotiated with the guest (RFC 2018). Not part of this record's body:
    /// [`write_stream`] carries it in a [`TcpOptionsRecord`] next to the flow's
    /// [`TcpFlowRecord`] and the reader puts it back here (false when absent, as from
    /// older writers). See "Versions and compatibility" in the module documentation.
    #[serde(skip)]
    pub sack_permitted: bool,
}

/// The host socket of a TCP flow, as `getsockname`/`getpeername` report it. A target
/// that takes the live socket checks it against these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostSocketEnds {
    pub local: Endpoint,
    pub peer: Endpoint,
}

/// One TCP flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpFlowRecord {
    pub id: FlowId,
    pub guest_side: GuestTcpSide,
    /// The host socket's addresses.
    pub host: HostSocketEnds,
    /// The host socket as the helper dumped it. `None` when it was not transferred: a
    /// snapshot, or a same-host handover (the target takes the live socket).
    pub kernel: Option<TcpConnState>,
}

/// Guest-side TCP options of one TCP flow beyond what [`GuestTcpSide`]'s body holds;
/// written only when one differs from its default, and always SKIPPABLE.
///
/// The SACK scoreboard (which of baton's segments the guest reported holding out of
/// order) is not carried: it is advisory, the guest repeats its SACK blocks in every
/// ACK while a hole remains, and without it the target retransmits go-back-N.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpOptionsRecord {
    /// The [`TcpFlowRecord`] these options belong to.
    pub flow: FlowId,
    /// See [`GuestTcpSide::sack_permitted`].
    pub sack_permitted: bool,
}

impl TcpOptionsRecord {
    /// The record a flow needs, if its options are not all defaults.
    pub fn for_flow(flow: &TcpFlowRecord) -> Option<Self> {
        flow.guest_side.sack_permitted.then_some(TcpOptionsRecord {
            flow: flow.id,
            sack_permitted: true,
        })
    }
}

/// One UDP flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpFlowRecord {
    pub id: FlowId,
    pub origin: FlowOrigin,
    /// The guest's address and port.
    pub guest: Endpoint,
    /// The address and port the guest talks to, as the guest sees it.
    pub remote: Endpoint,
    /// The host socket's bound address, if the source port must be kept.
    pub host_local: Option<Endpoint>,
    /// Milliseconds left until the flow would expire idle, counted from the SAVE (a
    /// relative time: monotonic clocks do not travel between hosts).
    pub idle_left_ms: u32,
}

/// One record of any known type (the end record is written by [`StreamWriter::finish`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Device(DeviceRecord),
    Source(SourceRecord),
    Guest(GuestRecord),
    Forwards(ForwardsRecord),
    /// Boxed: by far the largest record (the kernel state), and rare next to the others.
    TcpFlow(Box<TcpFlowRecord>),
    UdpFlow(UdpFlowRecord),
    TcpOptions(TcpOptionsRecord),
}

impl Record {
    /// The type number on the wire.
    pub fn record_type(&self) -> u16 {
        match self {
            Record::Device(_) => record_type::DEVICE,
            Record::Source(_) => record_type::SOURCE,
            Record::Guest(_) => record_type::GUEST,
            Record::Forwards(_) => record_type::FORWARDS,
            Record::TcpFlow(_) => record_type::TCP_FLOW,
            Record::UdpFlow(_) => record_type::UDP_FLOW,
            Record::TcpOptions(_) => record_type::TCP_OPTIONS,
        }
    }

    /// Whether an older reader that does not know the type may skip the record (its
    /// record flags then carry [`RECORD_FLAG_SKIPPABLE`]).
    pub fn skippable(&self) -> bool {
        match self {
            Record::Device(_) => DeviceRecord::SKIPPABLE,
            Record::Source(_) => SourceRecord::SKIPPABLE,
            Record::Guest(_) => GuestRecord::SKIPPABLE,
            Record::Forwards(_) => ForwardsRecord::SKIPPABLE,
            Record::TcpFlow(_) => TcpFlowRecord::SKIPPABLE,
            Record::UdpFlow(_) => UdpFlowRecord::SKIPPABLE,
            Record::TcpOptions(_) => TcpOptionsRecord::SKIPPABLE,
        }
    }

    /// The body bytes (bincode, [`crate::codec::config`]).
    pub fn encode_body(&self) -> Result<Vec<u8>, codec::EncodeError> {
        match self {
            Record::Device(r) => codec::encode(r),
            Record::Source(r) => codec::encode(r),
            Record::Guest(r) => codec::encode(r),
            Record::Forwards(r) => codec::encode(r),
            Record::TcpFlow(r) => codec::encode(r),
            Record::UdpFlow(r) => codec::encode(r),
            Record::TcpOptions(r) => codec::encode(r),
        }
    }

    /// Decode a body of a known type; `None` for a type this code does not know.
    pub fn decode_body(record_type: u16, body: &[u8]) -> Option<Result<Record, DecodeError>> {
        Some(match record_type {
            record_type::DEVICE => codec::decode(body).map(Record::Device),
            record_type::SOURCE => codec::decode(body).map(Record::Source),
            record_type::GUEST => codec::decode(body).map(Record::Guest),
            record_type::FORWARDS => codec::decode(body).map(Record::Forwards),
            record_type::TCP_FLOW => codec::decode(body).map(|r| Record::TcpFlow(Box::new(r))),
            record_type::UDP_FLOW => codec::decode(body).map(Record::UdpFlow),
            record_type::TCP_OPTIONS => codec::decode(body).map(Record::TcpOptions),
            _ => return None,
        })
    }

    /// The flow id of a flow record.
    pub fn flow_id(&self) -> Option<FlowId> {
        match self {
            Record::TcpFlow(r) => Some(r.id),
            Record::UdpFlow(r) => Some(r.id),
            _ => None,
        }
    }

    /// Check every bound and consistency rule of the record on its own.
    pub fn validate(&self, snapshot: bool) -> Result<(), RecordError> {
        match self {
            Record::Device(r) => r.check(snapshot),
            Record::Source(r) => r.check(snapshot),
            Record::Guest(r) => r.check(snapshot),
            Record::Forwards(r) => r.check(snapshot),
            Record::TcpFlow(r) => r.check(snapshot),
            Record::UdpFlow(r) => r.check(snapshot),
            Record::TcpOptions(r) => r.check(snapshot),
        }
    }
}

/// A record that decoded but must not be acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{which} MAC {mac:02x?} is not a unicast address")]
    BadMac { which: &'static str, mac: [u8; 6] },
    #[error("MTU {0} outside {MIN_MTU}..={MAX_MTU}")]
    BadMtu(u16),
    #[error("{which} address {addr} cannot be a guest source address")]
    BadGuestAddress {
        which: &'static str,
        addr: std::net::IpAddr,
    },
    #[error("{what} of {len} bytes exceeds {limit}")]
    TooLong {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("{what} contains a NUL byte")]
    Nul { what: &'static str },
    #[error("forward rule {host_first}-{host_last} => {guest_first}-{guest_last}: ranges are reversed or of different lengths")]
    BadForwardRange {
        host_first: u16,
        host_last: u16,
        guest_first: u16,
        guest_last: u16,
    },
    #[error("{which} endpoints of a flow mix IPv4 and IPv6")]
    MixedFamilies { which: &'static str },
    #[error("port 0 in the {0} endpoint")]
    PortZero(&'static str),
    #[error("window scale {0} exceeds {MAX_WSCALE}")]
    WindowScale(u8),
    #[error("MSS {0} below {MIN_MSS}")]
    Mss(u16),
    #[error("guest-side sequence numbers: {0}")]
    GuestSequence(&'static str),
    #[error("kernel TCP state: {0}")]
    Kernel(#[from] StateError),
    #[error("a snapshot stream carries kernel TCP state (its sockets were not frozen)")]
    KernelStateInSnapshot,
}

fn check_unicast_mac(which: &'static str, mac: [u8; 6]) -> Result<(), RecordError> {
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(RecordError::BadMac { which, mac });
    }
    Ok(())
}

fn check_name(what: &'static str, name: &[u8], limit: usize) -> Result<(), RecordError> {
    if name.len() > limit {
        return Err(RecordError::TooLong {
            what,
            len: name.len(),
            limit,
        });
    }
    if name.contains(&0) {
        return Err(RecordError::Nul { what });
    }
    Ok(())
}

fn check_endpoints(
    which: &'static str,
    a: &Endpoint,
    b: &Endpoint,
    names: (&'static str, &'static str),
) -> Result<(), RecordError> {
    let same = matches!(
        (a, b),
        (Endpoint::V4 { .. }, Endpoint::V4 { .. }) | (Endpoint::V6 { .. }, Endpoint::V6 { .. })
    );
    if !same {
        return Err(RecordError::MixedFamilies { which });
    }
    if a.port() == 0 {
        return Err(RecordError::PortZero(names.0));
    }
    if b.port() == 0 {
        return Err(RecordError::PortZero(names.1));
    }
    Ok(())
}

impl DeviceRecord {
    pub fn validate(&self) -> Result<(), RecordError> {
        check_unicast_mac("our", self.our_mac)?;
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(RecordError::BadMtu(self.mtu));
        }
        Ok(())
    }
}

impl GuestRecord {
    /// The same rules the backend applies when it learns these from frames.
    pub fn validate(&self) -> Result<(), RecordError> {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        if let Some(mac) = self.mac {
            check_unicast_mac("guest", mac)?;
        }
        if let Some(v4) = self.ipv4.map(Ipv4Addr::from) {
            if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() {
                return Err(RecordError::BadGuestAddress {
                    which: "IPv4",
                    addr: IpAddr::V4(v4),
                });
            }
        }
        let bad_v6 = |a: Ipv6Addr| a.is_unspecified() || a.is_multicast() || a.is_loopback();
        if let Some(v6) = self.ipv6.map(Ipv6Addr::from) {
            if bad_v6(v6) || v6.is_unicast_link_local() {
                return Err(RecordError::BadGuestAddress {
                    which: "IPv6 global",
                    addr: IpAddr::V6(v6),
                });
            }
        }
        if let Some(ll) = self.ipv6_link_local.map(Ipv6Addr::from) {
            if bad_v6(ll) || !ll.is_unicast_link_local() {
                return Err(RecordError::BadGuestAddress {
                    which: "IPv6 link-local",
                    addr: IpAddr::V6(ll),
                });
            }
        }
        Ok(())
    }
}

impl SourceRecord {
    pub fn validate(&self) -> Result<(), RecordError> {
        if let Some(name) = &self.hostname {
            check_name("hostname", name.as_bytes(), MAX_HOSTNAME)?;
        }
        if let Some(h) = &self.handover {
            check_name("handover socket name", &h.abstract_name, MAX_HANDOVER_NAME)?;
            if h.abstract_name.is_empty() {
                return Err(RecordError::Nul {
                    what: "empty handover socket name",
                });
            }
        }
        Ok(())
    }
}

impl ForwardRuleRecord {
    fn validate(&self) -> Result<(), RecordError> {
        if let Some(dev) = &self.bind_device {
            check_name("bind device", dev.as_bytes(), MAX_DEVICE_NAME)?;
        }
        let ordered = self.host_first <= self.host_last && self.guest_first <= self.guest_last;
        if !ordered || self.host_last - self.host_first != self.guest_last - self.guest_first {
            return Err(RecordError::BadForwardRange {
                host_first: self.host_first,
                host_last: self.host_last,
                guest_first: self.guest_first,
                guest_last: self.guest_last,
            });
        }
        Ok(())
    }
}

impl ForwardsRecord {
    pub fn validate(&self) -> Result<(), RecordError> {
        for (what, rules) in [
            ("TCP forward rules", &self.tcp),
            ("UDP forward rules", &self.udp),
        ] {
            if rules.len() > MAX_FORWARD_RULES {
                return Err(RecordError::TooLong {
                    what,
                    len: rules.len(),
                    limit: MAX_FORWARD_RULES,
                });
            }
            rules.iter().try_for_each(ForwardRuleRecord::validate)?;
        }
        Ok(())
    }
}

impl GuestTcpSide {
    pub fn validate(&self) -> Result<(), RecordError> {
        check_endpoints("guest-side", &self.guest, &self.remote, ("guest", "remote"))?;
        for shift in [self.ws_from_guest, self.ws_to_guest] {
            if shift > MAX_WSCALE {
                return Err(RecordError::WindowScale(shift));
            }
        }
        if self.mss_to_guest < MIN_MSS {
            return Err(RecordError::Mss(self.mss_to_guest));
        }
        // SND.UNA <= SND.NXT <= SND.MAX, all within one window of each other.
        let in_flight = self.seq_to_guest.wrapping_sub(self.seq_acked_by_guest);
        let rewound = self.seq_max_to_guest.wrapping_sub(self.seq_to_guest);
        let window_limit = MAX_GUEST_WINDOW;
        if in_flight > window_limit || rewound > window_limit - in_flight.min(window_limit) {
            return Err(RecordError::GuestSequence(
                "SND.UNA <= SND.NXT <= SND.MAX within one window",
            ));
        }
        if let Some(fin) = self.fin_to_guest {
            // Our FIN is the last thing sent: SND.UNA <= FIN < SND.MAX.
            let max_since_fin = self.seq_max_to_guest.wrapping_sub(fin);
            if fin.wrapping_add(1).wrapping_sub(self.seq_acked_by_guest) > window_limit
                || max_since_fin == 0
                || max_since_fin > window_limit
            {
                return Err(RecordError::GuestSequence("FIN outside SND.UNA..SND.MAX"));
            }
        }
        for wnd in [self.wnd_from_guest, self.wnd_to_guest] {
            if wnd > MAX_GUEST_WINDOW {
                return Err(RecordError::GuestSequence("window above 65535 << 14"));
            }
        }
        Ok(())
    }
}

impl HostSocketEnds {
    pub fn validate(&self) -> Result<(), RecordError> {
        check_endpoints("host socket", &self.local, &self.peer, ("local", "peer"))
    }
}

impl TcpFlowRecord {
    /// `snapshot`: the stream is a snapshot, which must not carry kernel state.
    pub fn validate(&self, snapshot: bool) -> Result<(), RecordError> {
        self.guest_side.validate()?;
        self.host.validate()?;
        if let Some(kernel) = &self.kernel {
            if snapshot {
                return Err(RecordError::KernelStateInSnapshot);
            }
            kernel.validate()?;
        }
        Ok(())
    }
}

impl UdpFlowRecord {
    pub fn validate(&self) -> Result<(), RecordError> {
        check_endpoints("UDP", &self.guest, &self.remote, ("guest", "remote"))
    }
}

// ---------------------------------------------------------------------------------------
// Same-host socket handover
// ---------------------------------------------------------------------------------------

/// Most flows one handover moves (and one [`HandoverMessage::Taken`] lists).
pub const MAX_HANDOVER_FLOWS: usize = 1 << 16;
/// Most bytes of a [`HandoverMessage::Refused`] reason.
pub const MAX_HANDOVER_REASON: usize = 256;

/// The messages of the same-host handover, one per frame of the repair-ipc transport
/// (12-byte header, bincode body, descriptors as `SCM_RIGHTS`) over the abstract UNIX
/// socket named in [`SourceRecord::handover`]:
///
/// ```text
///  target                                   source
///  Hello { token } ───────────────────────▶ peer uid + token checked (once)
///            ◀─────── Sockets { flows } + fds  (≤ MAX_FDS per frame, repeated;
///                     or SocketsLive: the same, not frozen)
///            ◀─────── Done { total }
///  fds checked, frozen ones thawed
///  Taken { flows } ───────────────────────▶ flows dropped from the source's table
///            ◀─────── Released               (ownership moved: never thawed there)
///  flows rebuilt
/// ```
///
/// Either side may send `Refused` instead of its next message and close.
///
/// `SocketsLive` came later (appended, so the other messages keep their encoding): a
/// source sends it only to a target that presented the token while SAVE was still
/// freezing — which only targets that know it do (they connect as soon as they read
/// the stream's Source record) — for sockets it did not freeze because of that.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoverMessage {
    Hello {
        token: [u8; 32],
    },
    /// The frame carries one descriptor per flow, in this order.
    Sockets {
        flows: Vec<FlowId>,
    },
    Done {
        total: u32,
    },
    Taken {
        flows: Vec<FlowId>,
    },
    Released,
    Refused {
        reason: String,
    },
    /// As `Sockets`, for sockets that are not frozen (nothing to thaw).
    SocketsLive {
        flows: Vec<FlowId>,
    },
}

impl HandoverMessage {
    /// Check the bounds of a received message.
    pub fn validate(&self) -> Result<(), RecordError> {
        match self {
            HandoverMessage::Sockets { flows } | HandoverMessage::SocketsLive { flows }
                if flows.len() > crate::frame::MAX_FDS =>
            {
                Err(RecordError::TooLong {
                    what: "handover socket batch",
                    len: flows.len(),
                    limit: crate::frame::MAX_FDS,
                })
            }
            HandoverMessage::Taken { flows } if flows.len() > MAX_HANDOVER_FLOWS => {
                Err(RecordError::TooLong {
                    what: "handover taken list",
                    len: flows.len(),
                    limit: MAX_HANDOVER_FLOWS,
                })
            }
            HandoverMessage::Refused { reason } => check_name(
                "handover refusal reason",
                reason.as_bytes(),
                MAX_HANDOVER_REASON,
            ),
            _ => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The whole state
// ---------------------------------------------------------------------------------------

/// A record of an unknown type that its writer marked skippable, and this reader skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkippedRecord {
    pub index: u32,
    pub offset: u64,
    pub record_type: u16,
    pub len: u32,
}

/// Everything one stream carries, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationState {
    /// The stream is a snapshot ([`HEADER_FLAG_SNAPSHOT`]).
    pub snapshot: bool,
    pub device: DeviceRecord,
    pub source: SourceRecord,
    pub guest: GuestRecord,
    pub forwards: Option<ForwardsRecord>,
    pub tcp_flows: Vec<TcpFlowRecord>,
    pub udp_flows: Vec<UdpFlowRecord>,
    /// Records the reader did not know and skipped (ignored by the writer).
    pub skipped: Vec<SkippedRecord>,
}

/// The stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    pub version: u16,
    pub oldest_compatible: u16,
    pub flags: u32,
}

impl StreamHeader {
    /// The header this code writes.
    pub fn current(flags: u32) -> Self {
        StreamHeader {
            version: FORMAT_VERSION,
            oldest_compatible: OLDEST_COMPATIBLE_VERSION,
            flags,
        }
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&self.version.to_le_bytes());
        out[10..12].copy_from_slice(&self.oldest_compatible.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        out
    }

    /// Parse a header and decide whether this reader can read the stream.
    pub fn parse(bytes: &[u8]) -> Result<Self, StreamError> {
        let Some(head) = bytes.get(..HEADER_LEN) else {
            return Err(StreamError::Truncated {
                offset: bytes.len() as u64,
                what: "stream header",
                need: HEADER_LEN as u64,
                have: bytes.len() as u64,
            });
        };
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&head[0..8]);
        if magic != MAGIC {
            return Err(StreamError::BadMagic { found: magic });
        }
        let header = StreamHeader {
            version: u16::from_le_bytes([head[8], head[9]]),
            oldest_compatible: u16::from_le_bytes([head[10], head[11]]),
            flags: u32::from_le_bytes([head[12], head[13], head[14], head[15]]),
        };
        if header.version == 0
            || header.oldest_compatible == 0
            || header.oldest_compatible > header.version
        {
            return Err(StreamError::BadVersion {
                version: header.version,
                oldest_compatible: header.oldest_compatible,
            });
        }
        if header.oldest_compatible > FORMAT_VERSION {
            return Err(StreamError::VersionTooNew {
                version: header.version,
                oldest_compatible: header.oldest_compatible,
                reader: FORMAT_VERSION,
            });
        }
        if header.version < OLDEST_READABLE_VERSION {
            return Err(StreamError::VersionTooOld {
                version: header.version,
                oldest_readable: OLDEST_READABLE_VERSION,
            });
        }
        let unknown = header.flags & HEADER_FLAGS_REQUIRED_MASK & !HEADER_FLAGS_KNOWN;
        if unknown != 0 {
            return Err(StreamError::UnknownHeaderFlags { flags: unknown });
        }
        Ok(header)
    }
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Why a stream could not be written or was refused.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("migration stream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("migration stream: encoding {kind} record: {source}")]
    Encode {
        kind: &'static str,
        source: codec::EncodeError,
    },
    #[error("migration stream: bad magic {found:02x?} (not a baton migration stream)")]
    BadMagic { found: [u8; 8] },
    #[error("migration stream: invalid version fields: version {version}, oldest compatible {oldest_compatible}")]
    BadVersion {
        version: u16,
        oldest_compatible: u16,
    },
    #[error("migration stream: version {version} needs a reader of at least version {oldest_compatible}; this is version {reader}")]
    VersionTooNew {
        version: u16,
        oldest_compatible: u16,
        reader: u16,
    },
    #[error("migration stream: version {version} is older than the oldest this reader supports ({oldest_readable})")]
    VersionTooOld { version: u16, oldest_readable: u16 },
    #[error("migration stream: unknown required header flags {flags:#x}")]
    UnknownHeaderFlags { flags: u32 },
    #[error(
        "migration stream: truncated at offset {offset}: {what} needs {need} bytes, {have} left"
    )]
    Truncated {
        offset: u64,
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("migration stream: longer than the limit of {limit} bytes")]
    StreamTooLarge { limit: u64 },
    #[error("migration stream: record #{index} at offset {offset}: more than {limit} records")]
    TooManyRecords { index: u32, offset: u64, limit: u32 },
    #[error("migration stream: record #{index} at offset {offset} ({kind}, type {record_type:#06x}): body of {len} bytes exceeds the limit of {limit}")]
    RecordTooLarge {
        index: u32,
        offset: u64,
        record_type: u16,
        kind: &'static str,
        len: u32,
        limit: u32,
    },
    #[error("migration stream: record #{index} at offset {offset}: reserved record flags {flags:#06x} set")]
    ReservedRecordFlags { index: u32, offset: u64, flags: u16 },
    #[error("migration stream: record #{index} at offset {offset}: unknown record type {record_type:#06x} that may not be skipped (the stream needs a newer reader)")]
    UnknownRecord {
        index: u32,
        offset: u64,
        record_type: u16,
    },
    #[error("migration stream: end record at offset {offset} has flags {flags:#06x} and length {len} (want 0 and {END_BODY_LEN})")]
    BadEndRecord { offset: u64, flags: u16, len: u32 },
    #[error("migration stream: end record at offset {offset} counts {counted} records, the stream has {found}")]
    RecordCount {
        offset: u64,
        counted: u32,
        found: u32,
    },
    #[error("migration stream: checksum mismatch: stored {stored:#010x}, computed {computed:#010x} over {covered} bytes")]
    ChecksumMismatch {
        stored: u32,
        computed: u32,
        covered: u64,
    },
    #[error(
        "migration stream: {len} bytes of trailing garbage after the end record at offset {offset}"
    )]
    TrailingGarbage { offset: u64, len: u64 },
    #[error(
        "migration stream: record #{index} at offset {offset} ({kind}): malformed body: {source}"
    )]
    Malformed {
        index: u32,
        offset: u64,
        kind: &'static str,
        source: DecodeError,
    },
    #[error("migration stream: record #{index} at offset {offset} ({kind}): {source}")]
    Invalid {
        index: u32,
        offset: u64,
        kind: &'static str,
        source: RecordError,
    },
    #[error("migration stream: record #{index} at offset {offset}: a second {kind} record (first was #{first})")]
    DuplicateRecord {
        index: u32,
        offset: u64,
        kind: &'static str,
        first: u32,
    },
    #[error("migration stream: record #{index} at offset {offset}: flow id {id} already used by record #{first}")]
    DuplicateFlowId {
        index: u32,
        offset: u64,
        id: u32,
        first: u32,
    },
    #[error("migration stream: record #{index} at offset {offset}: a second TcpOptions record for flow {id} (first was #{first})")]
    DuplicateOptions {
        index: u32,
        offset: u64,
        id: u32,
        first: u32,
    },
    #[error("migration stream: record #{index} at offset {offset}: TcpOptions for flow {id}, which is no TCP flow of the stream")]
    OptionsForUnknownFlow { index: u32, offset: u64, id: u32 },
    #[error("migration stream: required {kind} record missing")]
    MissingRecord { kind: &'static str },
    #[error("migration stream writer: the end record is written by finish(), not as a raw record")]
    RawEndRecord,
}

// ---------------------------------------------------------------------------------------
// What the writer and the reader share
// ---------------------------------------------------------------------------------------

/// What the duplicate checks need to know of a record.
#[derive(Debug, Clone, Copy)]
enum TallyKey {
    /// A record that may appear once (Device, Source, Guest, Forwards), by type.
    Singleton(u16),
    /// A flow record (TCP or UDP): flow ids are unique across both.
    Flow(FlowId),
    /// A TcpOptions record, by the flow it names.
    Options(FlowId),
}

/// Which singleton records were seen, and at which record index; flow ids in use.
#[derive(Debug, Default)]
struct Tally {
    singletons: HashMap<u16, u32>,
    flow_ids: HashMap<u32, u32>,
    /// Flow id → index of its TcpOptions record.
    options: HashMap<u32, u32>,
}

impl Tally {
    /// What every record gets on both sides of the stream, writer and reader alike: its
    /// own validation, then the checks against the records before it.
    fn admit<T: RecordBody>(
        &mut self,
        record: &T,
        snapshot: bool,
        index: u32,
        offset: u64,
    ) -> Result<(), StreamError> {
        record
            .check(snapshot)
            .map_err(|source| StreamError::Invalid {
                index,
                offset,
                kind: record_type_name(T::TYPE),
                source,
            })?;
        self.note(record.tally_key(), index, offset)
    }

    fn note(&mut self, key: TallyKey, index: u32, offset: u64) -> Result<(), StreamError> {
        use std::collections::hash_map::Entry;
        let (seen, id) = match key {
            TallyKey::Options(FlowId(id)) => (&mut self.options, id),
            TallyKey::Flow(FlowId(id)) => (&mut self.flow_ids, id),
            TallyKey::Singleton(ty) => {
                return match self.singletons.entry(ty) {
                    Entry::Occupied(first) => Err(StreamError::DuplicateRecord {
                        index,
                        offset,
                        kind: record_type_name(ty),
                        first: *first.get(),
                    }),
                    Entry::Vacant(slot) => {
                        slot.insert(index);
                        Ok(())
                    }
                };
            }
        };
        match seen.entry(id) {
            Entry::Occupied(first) => {
                let first = *first.get();
                Err(match key {
                    TallyKey::Options(_) => StreamError::DuplicateOptions {
                        index,
                        offset,
                        id,
                        first,
                    },
                    _ => StreamError::DuplicateFlowId {
                        index,
                        offset,
                        id,
                        first,
                    },
                })
            }
            Entry::Vacant(slot) => {
                slot.insert(index);
                Ok(())
            }
        }
    }

    fn check_required(&self) -> Result<(), StreamError> {
        for ty in [record_type::DEVICE, record_type::SOURCE, record_type::GUEST] {
            if !self.singletons.contains_key(&ty) {
                return Err(StreamError::MissingRecord {
                    kind: record_type_name(ty),
                });
            }
        }
        Ok(())
    }
}

/// A record body type on its own, so that the writer checks and encodes one from a
/// reference (a [`Record`] owns its body: building one for a flow would copy its queues)
/// and the reader decodes one into its own type (no enum, no box).
trait RecordBody: Serialize {
    /// The record type number.
    const TYPE: u16;
    /// Written with [`RECORD_FLAG_SKIPPABLE`].
    const SKIPPABLE: bool = false;
    /// [`Record::validate`] of this body.
    fn check(&self, snapshot: bool) -> Result<(), RecordError>;
    fn tally_key(&self) -> TallyKey;
}

/// The records that may appear once and validate without context.
macro_rules! singleton_body {
    ($($body:ty => $type:expr),* $(,)?) => {$(
        impl RecordBody for $body {
            const TYPE: u16 = $type;
            fn check(&self, _snapshot: bool) -> Result<(), RecordError> {
                self.validate()
            }
            fn tally_key(&self) -> TallyKey {
                TallyKey::Singleton(Self::TYPE)
            }
        }
    )*};
}

singleton_body! {
    DeviceRecord => record_type::DEVICE,
    SourceRecord => record_type::SOURCE,
    GuestRecord => record_type::GUEST,
    ForwardsRecord => record_type::FORWARDS,
}

impl RecordBody for TcpFlowRecord {
    const TYPE: u16 = record_type::TCP_FLOW;
    fn check(&self, snapshot: bool) -> Result<(), RecordError> {
        self.validate(snapshot)
    }
    fn tally_key(&self) -> TallyKey {
        TallyKey::Flow(self.id)
    }
}

impl RecordBody for UdpFlowRecord {
    const TYPE: u16 = record_type::UDP_FLOW;
    fn check(&self, _snapshot: bool) -> Result<(), RecordError> {
        self.validate()
    }
    fn tally_key(&self) -> TallyKey {
        TallyKey::Flow(self.id)
    }
}

impl RecordBody for TcpOptionsRecord {
    const TYPE: u16 = record_type::TCP_OPTIONS;
    const SKIPPABLE: bool = true;
    /// A bool and a flow id; that the id names a TCP flow is checked once the whole
    /// stream is read.
    fn check(&self, _snapshot: bool) -> Result<(), RecordError> {
        Ok(())
    }
    fn tally_key(&self) -> TallyKey {
        TallyKey::Options(self.flow)
    }
}

// ---------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------

/// How many stream bytes a [`StreamWriter`] gathers before it writes them out: several
/// records per `write`, and enough that a caller's 64 KiB `BufWriter` passes them
/// straight through instead of copying them again.
const WRITE_CHUNK_BYTES: usize = 256 << 10;

/// Writes a stream record by record, checksumming as it goes.
///
/// Every record is validated as the reader would validate it, and the limits are the
/// reader's: what this writer accepts, a reader with the same limits accepts.
/// [`StreamWriter::finish`] writes the end record; a writer dropped without `finish`
/// leaves a stream every reader refuses.
///
/// Records are encoded straight into the buffer of bytes not yet written out, and
/// checksummed there: a body is copied once on its way from the caller's structures to
/// `out`. A record refused (by validation or a limit) leaves none of its bytes behind.
pub struct StreamWriter<W: Write> {
    out: W,
    /// Stream bytes not yet written to `out`.
    pending: Vec<u8>,
    crc: crc32fast::Hasher,
    /// Bytes of the stream so far, `pending` included.
    offset: u64,
    records: u32,
    snapshot: bool,
    limits: Limits,
    tally: Tally,
}

impl<W: Write> StreamWriter<W> {
    /// Start a stream of the current version with header `flags`
    /// ([`HEADER_FLAG_SNAPSHOT`]).
    pub fn new(out: W, flags: u32) -> Result<Self, StreamError> {
        Self::with_header(out, StreamHeader::current(flags), Limits::DEFAULT)
    }

    /// Start a stream with an explicit header and limits (tests, future versions).
    pub fn with_header(out: W, header: StreamHeader, limits: Limits) -> Result<Self, StreamError> {
        let mut writer = StreamWriter {
            out,
            pending: Vec::with_capacity(WRITE_CHUNK_BYTES),
            crc: crc32fast::Hasher::new(),
            offset: 0,
            records: 0,
            snapshot: header.flags & HEADER_FLAG_SNAPSHOT != 0,
            limits,
            tally: Tally::default(),
        };
        writer.put(&header.to_bytes())?;
        Ok(writer)
    }

    /// Refuse to grow the stream past the limit by `len` bytes.
    fn check_size(&self, len: usize) -> Result<(), StreamError> {
        if self.offset + len as u64 > self.limits.max_stream_bytes {
            return Err(StreamError::StreamTooLarge {
                limit: self.limits.max_stream_bytes,
            });
        }
        Ok(())
    }

    /// Append bytes laid out by hand (stream header, end record).
    fn put(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        self.check_size(bytes.len())?;
        self.pending.extend_from_slice(bytes);
        self.crc.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Validate and write one record.
    pub fn write_record(&mut self, record: &Record) -> Result<(), StreamError> {
        match record {
            Record::Device(r) => self.write_body(r),
            Record::Source(r) => self.write_body(r),
            Record::Guest(r) => self.write_body(r),
            Record::Forwards(r) => self.write_body(r),
            Record::TcpFlow(r) => self.write_body(&**r),
            Record::UdpFlow(r) => self.write_body(r),
            Record::TcpOptions(r) => self.write_body(r),
        }
    }

    /// Validate and write one record body of a known type.
    fn write_body<T: RecordBody>(&mut self, record: &T) -> Result<(), StreamError> {
        let (index, offset) = (self.records, self.offset);
        self.tally.admit(record, self.snapshot, index, offset)?;
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0; RECORD_HEADER_LEN]);
        if let Err(source) = codec::encode_into(record, &mut self.pending) {
            self.pending.truncate(start);
            return Err(StreamError::Encode {
                kind: record_type_name(T::TYPE),
                source,
            });
        }
        let flags = if T::SKIPPABLE {
            RECORD_FLAG_SKIPPABLE
        } else {
            0
        };
        self.seal_record(start, T::TYPE, flags)
    }

    /// Write a record as given (no validation of the body): for record types this code
    /// does not know, and for tests that need a bad stream. Limits still apply.
    pub fn write_raw_record(
        &mut self,
        record_type: u16,
        flags: u16,
        body: &[u8],
    ) -> Result<(), StreamError> {
        if record_type == record_type::END {
            return Err(StreamError::RawEndRecord);
        }
        let index = self.records;
        let start = self.pending.len();
        self.pending.extend_from_slice(&[0; RECORD_HEADER_LEN]);
        self.pending.extend_from_slice(body);
        self.seal_record(start, record_type, flags)?;
        if matches!(
            record_type,
            record_type::DEVICE | record_type::SOURCE | record_type::GUEST | record_type::FORWARDS
        ) {
            self.tally.singletons.entry(record_type).or_insert(index);
        }
        Ok(())
    }

    /// The record whose body was just appended at `start + RECORD_HEADER_LEN`: check the
    /// limits (dropping it if one is passed), fill in its header, checksum it, and write
    /// out what has gathered.
    fn seal_record(
        &mut self,
        start: usize,
        record_type: u16,
        flags: u16,
    ) -> Result<(), StreamError> {
        let (index, offset) = (self.records, self.offset);
        let body_len = self.pending.len() - start - RECORD_HEADER_LEN;
        let limit = self.limits.body_limit(record_type);
        let len = u32::try_from(body_len).unwrap_or(u32::MAX);
        let refused = if index >= self.limits.max_records {
            Some(StreamError::TooManyRecords {
                index,
                offset,
                limit: self.limits.max_records,
            })
        } else if len > limit {
            Some(StreamError::RecordTooLarge {
                index,
                offset,
                record_type,
                kind: record_type_name(record_type),
                len,
                limit,
            })
        } else {
            self.check_size(RECORD_HEADER_LEN + body_len).err()
        };
        if let Some(e) = refused {
            self.pending.truncate(start);
            return Err(e);
        }
        let head = &mut self.pending[start..start + RECORD_HEADER_LEN];
        head[0..2].copy_from_slice(&record_type.to_le_bytes());
        head[2..4].copy_from_slice(&flags.to_le_bytes());
        head[4..8].copy_from_slice(&len.to_le_bytes());
        self.crc.update(&self.pending[start..]);
        self.offset += (RECORD_HEADER_LEN + body_len) as u64;
        self.records += 1;
        if self.pending.len() >= WRITE_CHUNK_BYTES {
            self.out.write_all(&self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Validate and write the Device, Source, Guest and (if any) Forwards records: the
    /// stream's prefix, before its flows.
    pub fn write_prefix(
        &mut self,
        device: &DeviceRecord,
        source: &SourceRecord,
        guest: &GuestRecord,
        forwards: Option<&ForwardsRecord>,
    ) -> Result<(), StreamError> {
        self.write_body(device)?;
        self.write_body(source)?;
        self.write_body(guest)?;
        if let Some(forwards) = forwards {
            self.write_body(forwards)?;
        }
        Ok(())
    }

    /// Validate and write one TCP flow, followed by its [`TcpOptionsRecord`] when it
    /// needs one (as [`write_stream`] does).
    pub fn write_tcp_flow(&mut self, flow: &TcpFlowRecord) -> Result<(), StreamError> {
        self.write_body(flow)?;
        if let Some(options) = TcpOptionsRecord::for_flow(flow) {
            self.write_body(&options)?;
        }
        Ok(())
    }

    /// Validate and write one UDP flow.
    pub fn write_udp_flow(&mut self, flow: &UdpFlowRecord) -> Result<(), StreamError> {
        self.write_body(flow)
    }

    /// A padding record: `len` zero bytes that every reader skips (SKIPPABLE; this
    /// reader knows and ignores it). For a writer whose first records must reach the
    /// reader before the rest of the stream exists: QEMU passes device state on in
    /// chunks of its own buffer's size, so records are only seen at the other end once
    /// enough bytes follow them.
    pub fn write_padding(&mut self, len: u32) -> Result<(), StreamError> {
        let zeros = vec![0u8; len as usize];
        self.write_raw_record(record_type::PADDING, RECORD_FLAG_SKIPPABLE, &zeros)
    }

    /// Write out every record so far and flush the output: the reader can have them
    /// now. The stream goes on.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        self.out.write_all(&self.pending)?;
        self.pending.clear();
        self.out.flush()?;
        Ok(())
    }

    /// Write the end record (count and checksum), flush, and return the output. Fails if
    /// a required record (Device, Source, Guest) was not written.
    pub fn finish(mut self) -> Result<W, StreamError> {
        self.tally.check_required()?;
        let mut end = [0u8; RECORD_HEADER_LEN + 4];
        end[0..2].copy_from_slice(&record_type::END.to_le_bytes());
        end[4..8].copy_from_slice(&(END_BODY_LEN as u32).to_le_bytes());
        end[8..12].copy_from_slice(&self.records.to_le_bytes());
        self.put(&end)?;
        let crc = self.crc.clone().finalize();
        self.put(&crc.to_le_bytes())?;
        self.out.write_all(&self.pending)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Write `state` as a complete stream (in the canonical order: Device, Source, Guest,
/// Forwards, TCP flows each followed by its TcpOptions record if it needs one, UDP
/// flows, end). `state.skipped` is ignored.
pub fn write_stream<W: Write>(out: W, state: &MigrationState) -> Result<W, StreamError> {
    let flags = if state.snapshot {
        HEADER_FLAG_SNAPSHOT
    } else {
        0
    };
    let mut w = StreamWriter::new(out, flags)?;
    w.write_prefix(
        &state.device,
        &state.source,
        &state.guest,
        state.forwards.as_ref(),
    )?;
    for flow in &state.tcp_flows {
        w.write_tcp_flow(flow)?;
    }
    for flow in &state.udp_flows {
        w.write_udp_flow(flow)?;
    }
    w.finish()
}

/// [`write_stream`] into memory.
pub fn encode_stream(state: &MigrationState) -> Result<Vec<u8>, StreamError> {
    write_stream(Vec::new(), state)
}

// ---------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------

mod reader;
mod source;

pub use reader::{
    decode_stream, decode_stream_with_limits, read_stream, read_stream_observed,
    read_stream_with_limits, KernelStates, ReadObserver,
};
