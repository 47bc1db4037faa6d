//! The helper protocol: what the backend asks `baton-repair`, and what it answers.
//!
//! Theory of operation:
//! * The backend owns a UNIX stream socket; the helper is the other end (it connected to
//!   the backend's `*.repair` socket, or was spawned with a socketpair end).
//! * Every exchange is one [`Request`] frame from the backend and exactly one [`Reply`]
//!   frame from the helper. Sockets travel with the request as `SCM_RIGHTS`; the helper
//!   closes its copies once it has replied.
//! * The first request must be [`Request::Hello`]. The helper answers with the version it
//!   will speak (the highest one both ranges contain) and its capabilities, or with a
//!   [`ProtocolError`] of kind [`ProtocolErrorKind::IncompatibleVersion`] and then closes.
//! * Batch operations answer with one result per socket, in the order the sockets were
//!   sent, so one bad socket costs only its own slot.
//! * A frame that cannot be understood gets a [`Reply::Error`]; the helper then carries on
//!   with the next frame when the stream is still in sync (a body that did not decode), or
//!   closes the connection when it is not (a bad header).
//! * Version 2 adds the pre-dump pair ([`Request::PreDump`], [`Request::FreezeCheck`]):
//!   read a live connection's state ahead of time, then at the freeze check with the
//!   kernel's own progress counters ([`ProgressMark`]) that nothing moved since. Their
//!   tags come after every version-1 tag, so version-1 messages encode as before; a
//!   client sends them only when version 2 was negotiated (a version-1 helper answers an
//!   unknown tag with [`ProtocolErrorKind::UnknownOperation`] and stays in sync).

use serde::{Deserialize, Serialize};

use crate::frame::MAX_FDS;
use crate::tcp::{StateError, TcpConnState, MAX_BATCH_QUEUE_BYTES};

/// Oldest protocol version this build speaks.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 2;
/// Longest software identification string in a hello.
pub const MAX_SOFTWARE_LEN: usize = 64;
/// Longest free-text detail in an error.
pub const MAX_DETAIL_LEN: usize = 512;

/// Capability bits a peer announces in its hello.
pub mod caps {
    /// Dump (freeze + read the complete state).
    pub const DUMP: u64 = 1 << 0;
    /// Thaw frozen sockets.
    pub const THAW: u64 = 1 << 1;
    /// Restore states into fresh sockets.
    pub const RESTORE: u64 = 1 << 2;
    /// Toggle repair mode on single sockets.
    pub const SET_REPAIR: u64 = 1 << 3;
    /// Freeze sockets without dumping them.
    pub const FREEZE: u64 = 1 << 4;
    /// Everything version 1 defines.
    pub const ALL_V1: u64 = DUMP | THAW | RESTORE | SET_REPAIR | FREEZE;
    /// Pre-dump live sockets and freeze-check them later (version 2).
    pub const PRE_DUMP: u64 = 1 << 5;
    /// Everything version 2 defines.
    pub const ALL_V2: u64 = ALL_V1 | PRE_DUMP;
}

/// A backend's request. Its wire tag is the variant index (u32, little-endian).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Must come first. No file descriptors.
    Hello(Hello),
    /// Freeze each attached socket (drop-all filter so the kernel stops acknowledging,
    /// then repair mode) and return its complete state. The sockets stay frozen.
    Dump,
    /// Undo a dump: detach the filter and leave repair mode with a window probe.
    Thaw,
    /// Rebuild one connection per attached fresh socket from the matching state.
    Restore(Vec<TcpConnState>),
    /// Set repair mode on each attached socket.
    SetRepair(RepairMode),
    /// Freeze each attached socket without dumping it: attach the drop-all filter only
    /// (no repair mode). For a same-host handover of live sockets: the receiver detaches
    /// the filter itself, which needs no privilege, while attaching one needs
    /// `CAP_NET_ADMIN` on some kernels.
    Freeze,
    /// Version 2. Read each attached *live* socket's complete state without freezing it
    /// (no filter; repair mode only while reading, left without a window probe), with
    /// the [`ProgressMark`] read before and after. The sockets stay live. The caller
    /// must do no I/O on them during the request.
    PreDump,
    /// Version 2. Freeze each attached socket exactly as [`Request::Dump`] does, then
    /// compare its [`ProgressMark`] with the one given (one mark per socket, same order):
    /// unchanged, only the fresh TCP timestamp clock and `SO_PEEK_OFF` are returned;
    /// changed, the full state. The sockets stay frozen either way.
    FreezeCheck(Vec<ProgressMark>),
}

/// Names of the request variants in tag order (for error messages).
pub const REQUEST_NAMES: [&str; 8] = [
    "Hello",
    "Dump",
    "Thaw",
    "Restore",
    "SetRepair",
    "Freeze",
    "PreDump",
    "FreezeCheck",
];

/// The kernel's own progress counters of one connection: if none of them moved between
/// two readings, nothing in the connection's dumpable state moved either, except the TCP
/// timestamp clock (which runs with time) and `SO_PEEK_OFF` (which peeks move). The
/// reasoning, checked against the kernel source, is in `baton_tcp_repair`'s `predump`
/// module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProgressMark {
    /// `tcpi_state`.
    pub state: u8,
    /// `tcpi_segs_in`: segments that reached TCP (after the socket filter).
    pub segs_in: u32,
    /// `tcpi_segs_out`: segments transmitted, retransmissions and ACKs included.
    pub segs_out: u32,
    /// `SIOCINQ`: bytes in the receive queue.
    pub inq: u32,
    /// `SIOCOUTQ`: bytes in the send queue (`write_seq - snd_una`).
    pub outq: u32,
}

/// One socket's pre-dump: its state as read while live, and the mark it was read at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreDumped {
    pub state: TcpConnState,
    pub mark: ProgressMark,
}

/// One socket's answer to a freeze check. The socket is frozen either way.
// Not boxed: `Reply::Dumped` carries states unboxed too, a batch's results are one
// allocation either way, and the agreed API matches on `Dumped(TcpConnState)`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FreezeCheck {
    /// The mark did not move: the pre-dumped state holds, with this fresh TCP timestamp
    /// clock (`TCP_TIMESTAMP`) and `SO_PEEK_OFF` in place of the pre-dumped ones (the
    /// other socket options are the pre-dump's: baton sets them at connect time).
    Unchanged { timestamp: u32, peek_off: i32 },
    /// The mark moved: the complete state, dumped now from the frozen socket.
    Dumped(TcpConnState),
}

/// Repair-mode values of `TCP_REPAIR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RepairMode {
    /// `TCP_REPAIR_ON` (1).
    On,
    /// `TCP_REPAIR_OFF` (0): leave repair mode and send a window probe.
    Off,
    /// `TCP_REPAIR_OFF_NO_WP` (−1): leave repair mode without a window probe.
    OffNoWindowProbe,
}

/// The opening message, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// [`caps`] bits the sender wants (request) or offers (reply).
    pub capabilities: u64,
    /// Free text naming the sender's program and version, for logs.
    pub software: String,
}

impl Hello {
    /// This build's hello.
    pub fn ours(capabilities: u64) -> Self {
        Hello {
            min_version: PROTOCOL_VERSION_MIN,
            max_version: PROTOCOL_VERSION_MAX,
            capabilities,
            software: concat!("baton ", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }

    /// The highest version both this build and `self` speak.
    pub fn negotiate(&self) -> Result<u16, ProtocolError> {
        let low = self.min_version.max(PROTOCOL_VERSION_MIN);
        let high = self.max_version.min(PROTOCOL_VERSION_MAX);
        if self.min_version > self.max_version || low > high {
            return Err(ProtocolError::new(
                ProtocolErrorKind::IncompatibleVersion,
                format!(
                    "peer speaks versions {}..={}, this build {}..={}",
                    self.min_version, self.max_version, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX
                ),
            ));
        }
        Ok(high)
    }
}

impl FreezeCheck {
    /// The state to restore: `pre_dumped` (the state of the matching [`PreDumped`]) with
    /// the fresh timestamp clock and peek offset, or the state dumped at the check.
    pub fn into_state(self, pre_dumped: TcpConnState) -> TcpConnState {
        match self {
            FreezeCheck::Unchanged {
                timestamp,
                peek_off,
            } => {
                let mut state = pre_dumped;
                state.timestamp = timestamp;
                state.sockopts.peek_off = peek_off;
                state
            }
            FreezeCheck::Dumped(state) => state,
        }
    }
}

/// The helper's reply. Its wire tag is the variant index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The version chosen (in both `min_version` and `max_version`) and the capabilities.
    Hello(Hello),
    Dumped(Vec<SocketResult<TcpConnState>>),
    Thawed(Vec<SocketResult<()>>),
    Restored(Vec<SocketResult<RestoreReport>>),
    RepairSet(Vec<SocketResult<()>>),
    /// The request as a whole was refused; nothing was done.
    Error(ProtocolError),
    /// Answer to [`Request::Freeze`] (after `Error` so that older tags keep their values).
    Frozen(Vec<SocketResult<()>>),
    /// Version 2: answer to [`Request::PreDump`]. `None`: the connection moved while it
    /// was being read (no state; try again later, or dump it at the freeze).
    PreDumped(Vec<SocketResult<Option<PreDumped>>>),
    /// Version 2: answer to [`Request::FreezeCheck`].
    FreezeChecked(Vec<SocketResult<FreezeCheck>>),
}

/// The outcome for one socket of a batch.
pub type SocketResult<T> = Result<T, SocketError>;

/// What a restore did beyond rebuilding the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Bytes of the send queue now in the restored socket: the sent-unacknowledged part
    /// (written in repair mode, marked sent) plus the unsent part written after repair
    /// mode was left. The caller still owns `send_queue[send_queue_written..]` and
    /// writes it when the socket is writable.
    pub send_queue_written: u64,
    /// Our FIN (for a state with `fin_sent()`) still has to be sent with
    /// `shutdown(SHUT_WR)` once the rest of the send queue is written.
    pub fin_pending: bool,
}

/// Why one socket of a batch failed. `step` names what was being done, `errno` is the
/// kernel's answer when there was one, `detail` says the rest (e.g. "EPERM").
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[error("{step}: {detail}")]
pub struct SocketError {
    pub step: String,
    pub errno: Option<i32>,
    pub detail: String,
}

/// Kinds of whole-request failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProtocolErrorKind {
    /// The frame header was wrong (magic, size, reserved bits); the stream is out of sync.
    BadFrame,
    /// No common protocol version.
    IncompatibleVersion,
    /// A request other than Hello came first, or Hello came twice.
    OutOfOrder,
    /// The request tag is not one this version knows.
    UnknownOperation,
    /// The body did not decode or did not validate.
    Malformed,
    /// The number of file descriptors received differs from the header or the request.
    FdCountMismatch,
    /// The operation is known but not offered by this helper.
    Unsupported,
}

/// A whole request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ProtocolError {
    pub kind: ProtocolErrorKind,
    pub message: String,
}

impl ProtocolError {
    pub fn new(kind: ProtocolErrorKind, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate_utf8(&mut message, MAX_DETAIL_LEN);
        ProtocolError { kind, message }
    }
}

/// Shorten `s` to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// A decoded request that breaks a rule of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("hello: software string of {0} bytes exceeds {MAX_SOFTWARE_LEN}")]
    SoftwareTooLong(usize),
    #[error("restore: {states} states for {fds} sockets")]
    StateCount { states: usize, fds: usize },
    #[error("restore: state {index}: {source}")]
    BadState { index: usize, source: StateError },
    #[error(
        "restore: queues add up to {0} bytes, over the batch limit of {MAX_BATCH_QUEUE_BYTES}"
    )]
    BatchTooLarge(usize),
    #[error("{op}: {fds} file descriptors, at most {MAX_FDS}")]
    TooManyFds { op: &'static str, fds: usize },
    #[error("freeze check: {marks} marks for {fds} sockets")]
    MarkCount { marks: usize, fds: usize },
    #[error("{op}: expects {expected} file descriptors, got {got}")]
    FdCount {
        op: &'static str,
        expected: usize,
        got: usize,
    },
}

impl Request {
    /// The variant's name.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello(_) => "Hello",
            Request::Dump => "Dump",
            Request::Thaw => "Thaw",
            Request::Restore(_) => "Restore",
            Request::SetRepair(_) => "SetRepair",
            Request::Freeze => "Freeze",
            Request::PreDump => "PreDump",
            Request::FreezeCheck(_) => "FreezeCheck",
        }
    }

    /// The protocol version that introduced this request: a peer that negotiated an
    /// older one must not send it (and the helper refuses it as unsupported).
    pub fn since_version(&self) -> u16 {
        match self {
            Request::PreDump | Request::FreezeCheck(_) => 2,
            _ => 1,
        }
    }

    /// Check the request against the number of descriptors that came with it.
    pub fn validate(&self, fds: usize) -> Result<(), RequestError> {
        let op = self.name();
        if fds > MAX_FDS {
            return Err(RequestError::TooManyFds { op, fds });
        }
        match self {
            Request::Hello(hello) => {
                if hello.software.len() > MAX_SOFTWARE_LEN {
                    return Err(RequestError::SoftwareTooLong(hello.software.len()));
                }
                if fds != 0 {
                    return Err(RequestError::FdCount {
                        op,
                        expected: 0,
                        got: fds,
                    });
                }
            }
            Request::Dump
            | Request::Thaw
            | Request::SetRepair(_)
            | Request::Freeze
            | Request::PreDump => {}
            Request::FreezeCheck(marks) => {
                if marks.len() != fds {
                    return Err(RequestError::MarkCount {
                        marks: marks.len(),
                        fds,
                    });
                }
            }
            Request::Restore(states) => {
                if states.len() != fds {
                    return Err(RequestError::StateCount {
                        states: states.len(),
                        fds,
                    });
                }
                let mut total = 0usize;
                for (index, state) in states.iter().enumerate() {
                    state
                        .validate()
                        .map_err(|source| RequestError::BadState { index, source })?;
                    total += state.send_queue.len() + state.recv_queue.len();
                }
                if total > MAX_BATCH_QUEUE_BYTES {
                    return Err(RequestError::BatchTooLarge(total));
                }
            }
        }
        Ok(())
    }
}

/// Read the request tag from an encoded body without decoding the rest, so an unknown
/// operation can be named as such rather than reported as garbage.
pub fn request_tag(body: &[u8]) -> Option<u32> {
    let tag: [u8; 4] = body.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(tag))
}
