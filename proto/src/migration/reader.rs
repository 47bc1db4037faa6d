//! Reading and validating a stream in one pass over its bytes.
//!
//! # Theory of operation
//!
//! A stream is walked front to back, once, record by record ([`walk`]): the framing is
//! checked (record header, limits), the checksum is fed, and the body is decoded,
//! validated and added to the state being assembled ([`Assembler`]) while it is still
//! in the cache — nothing is copied twice and nothing of the stream is kept but the
//! decoded records. From a reader, this overlaps decoding with the writer producing the
//! rest of the stream.
//!
//! The errors are those of a reader that first walks all the framing and checks the
//! checksum, and only then decodes (so that a corrupted stream is reported as a checksum
//! mismatch, not as whatever a flipped bit turned a body into):
//!
//! 1. the stream longer than the limit, or an I/O error reading it — whatever the rest;
//! 2. the first framing error (header, record header, limits, truncation, end record,
//!    trailing bytes, checksum, record count);
//! 3. the first record that does not decode or validate, or repeats a singleton or flow
//!    id;
//! 4. what only the whole stream can tell (required records, options naming no flow).
//!
//! So once a record fails (3), decoding stops but the framing walk and the checksum go on
//! to the end; its error is returned only if the framing holds. And before any error is
//! returned, the input is read to its end (up to the limit), because (1) beats the rest.
//! No state is returned unless the whole stream passed.
//!
//! A [`ReadObserver`] hears of the SOURCE record as soon as the pass meets it, long
//! before the stream is complete (a target on the source's host starts taking the
//! live sockets over while the rest of the stream still arrives), and may tell the
//! pass to drop the dumped kernel state of the TCP flows after it: a target that takes
//! the live sockets has no use for it, and keeping 10,000 × 4 KiB of queue bytes it
//! will never read costs page faults (≈30 ms here). A dropped state is decoded and
//! validated like a kept one first, so a stream's errors do not depend on the observer.

use std::collections::HashMap;
use std::io::Read;

use super::source::{ReadSource, SliceSource, Source};
use serde::de::DeserializeOwned;

use super::{
    codec, record_type, record_type_name, FlowId, Limits, MigrationState, RecordBody,
    SkippedRecord, StreamError, StreamHeader, Tally, END_BODY_LEN, HEADER_FLAG_SNAPSHOT,
    HEADER_LEN, RECORD_FLAGS_KNOWN, RECORD_FLAG_SKIPPABLE, RECORD_HEADER_LEN,
};
use super::{DeviceRecord, ForwardsRecord, GuestRecord, SourceRecord, TcpFlowRecord};
use super::{TcpOptionsRecord, UdpFlowRecord};

/// What the pass does with the dumped kernel state ([`TcpFlowRecord::kernel`]) of the
/// TCP flows it meets after the SOURCE record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelStates {
    /// Keep them (the default without an observer).
    Keep,
    /// Validate them, then drop them (`kernel: None`): the reader takes the live sockets.
    Drop,
}

/// Told about records while the one pass meets them: before the stream is complete,
/// so nothing it learns has been validated as a whole yet (the stream may still turn
/// out truncated or corrupt, and the reader must then undo whatever it started).
pub trait ReadObserver {
    /// The SOURCE record decoded and validated on its own. The answer applies to the
    /// TCP flow records after it (writers put it before them).
    fn source(&mut self, source: &SourceRecord) -> KernelStates;
}

/// Read the whole stream from `input` (to EOF) and validate it with the default limits.
pub fn read_stream<R: Read>(input: R) -> Result<MigrationState, StreamError> {
    read_stream_with_limits(input, &Limits::DEFAULT)
}

/// [`read_stream`] with explicit limits.
pub fn read_stream_with_limits<R: Read>(
    input: R,
    limits: &Limits,
) -> Result<MigrationState, StreamError> {
    read_from(&mut ReadSource::new(input, limits), limits, None)
}

/// [`read_stream_with_limits`], telling `observer` about the SOURCE record as soon as it
/// is read (see [`ReadObserver`]).
pub fn read_stream_observed<R: Read>(
    input: R,
    limits: &Limits,
    observer: &mut dyn ReadObserver,
) -> Result<MigrationState, StreamError> {
    read_from(&mut ReadSource::new(input, limits), limits, Some(observer))
}

/// Validate a stream held in memory with the default limits.
pub fn decode_stream(bytes: &[u8]) -> Result<MigrationState, StreamError> {
    decode_stream_with_limits(bytes, &Limits::DEFAULT)
}

/// Validate a stream held in memory.
pub fn decode_stream_with_limits(
    bytes: &[u8],
    limits: &Limits,
) -> Result<MigrationState, StreamError> {
    if bytes.len() as u64 > limits.max_stream_bytes {
        return Err(StreamError::StreamTooLarge {
            limit: limits.max_stream_bytes,
        });
    }
    read_from(&mut SliceSource::new(bytes), limits, None)
}

/// [`walk`], and on an error, the rest of the input read first: a stream over the limit
/// (or one that cannot be read) is reported as such whatever else is wrong with it.
fn read_from<S: Source>(
    source: &mut S,
    limits: &Limits,
    observer: Option<&mut dyn ReadObserver>,
) -> Result<MigrationState, StreamError> {
    match walk(source, limits, observer) {
        Ok(state) => Ok(state),
        Err(e @ (StreamError::StreamTooLarge { .. } | StreamError::Io(_))) => Err(e),
        Err(e) => {
            source.rest_len()?;
            Err(e)
        }
    }
}

fn truncated(offset: u64, what: &'static str, need: usize, have: usize) -> StreamError {
    StreamError::Truncated {
        offset,
        what,
        need: need as u64,
        have: have as u64,
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The one pass: framing, limits, checksum, and every record to the [`Assembler`].
fn walk<S: Source>(
    source: &mut S,
    limits: &Limits,
    observer: Option<&mut dyn ReadObserver>,
) -> Result<MigrationState, StreamError> {
    let head = source.take(HEADER_LEN)?;
    let header = StreamHeader::parse(head)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(head);
    let mut assembler = Assembler::new(header, observer);
    // The first record that failed to decode or validate; reported once the framing and
    // the checksum have been found good.
    let mut content_error = None;
    let mut offset = HEADER_LEN as u64;
    let mut index: u32 = 0;
    loop {
        let head = source.take(RECORD_HEADER_LEN)?;
        if head.len() < RECORD_HEADER_LEN {
            return Err(truncated(
                offset,
                "record header",
                RECORD_HEADER_LEN,
                head.len(),
            ));
        }
        let record_type = le_u16(head, 0);
        let flags = le_u16(head, 2);
        let len = le_u32(head, 4);
        crc.update(head);
        let body_at = offset + RECORD_HEADER_LEN as u64;
        if record_type == record_type::END {
            if flags != 0 || len as usize != END_BODY_LEN {
                return Err(StreamError::BadEndRecord { offset, flags, len });
            }
            let body = source.take(END_BODY_LEN)?;
            if body.len() < END_BODY_LEN {
                return Err(truncated(body_at, "end record", END_BODY_LEN, body.len()));
            }
            let counted = le_u32(body, 0);
            let stored = le_u32(body, 4);
            crc.update(&body[..4]);
            let end = body_at + END_BODY_LEN as u64;
            let trailing = source.rest_len()?;
            if trailing > 0 {
                return Err(StreamError::TrailingGarbage {
                    offset: end,
                    len: trailing,
                });
            }
            let computed = crc.finalize();
            if computed != stored {
                return Err(StreamError::ChecksumMismatch {
                    stored,
                    computed,
                    covered: end - 4,
                });
            }
            if counted != index {
                return Err(StreamError::RecordCount {
                    offset,
                    counted,
                    found: index,
                });
            }
            return match content_error {
                Some(e) => Err(e),
                None => assembler.finish(),
            };
        }
        if index >= limits.max_records {
            return Err(StreamError::TooManyRecords {
                index,
                offset,
                limit: limits.max_records,
            });
        }
        if flags & !RECORD_FLAGS_KNOWN != 0 {
            return Err(StreamError::ReservedRecordFlags {
                index,
                offset,
                flags,
            });
        }
        let limit = limits.body_limit(record_type);
        if len > limit {
            return Err(StreamError::RecordTooLarge {
                index,
                offset,
                record_type,
                kind: record_type_name(record_type),
                len,
                limit,
            });
        }
        let body = source.take(len as usize)?;
        if body.len() < len as usize {
            return Err(truncated(body_at, "record body", len as usize, body.len()));
        }
        crc.update(body);
        if content_error.is_none() {
            let located = Located {
                index,
                offset,
                record_type,
                flags,
            };
            if let Err(e) = assembler.add(located, body) {
                content_error = Some(e);
            }
        }
        offset = body_at + u64::from(len);
        index += 1;
    }
}

/// Where a record sits in the stream, and its header.
#[derive(Debug, Clone, Copy)]
struct Located {
    index: u32,
    offset: u64,
    record_type: u16,
    flags: u16,
}

/// The state being put together from records that decoded and validated.
struct Assembler<'o> {
    observer: Option<&'o mut dyn ReadObserver>,
    /// What the observer said about kernel states (see [`KernelStates`]).
    kernel_states: KernelStates,
    snapshot: bool,
    tally: Tally,
    device: Option<DeviceRecord>,
    source: Option<SourceRecord>,
    guest: Option<GuestRecord>,
    forwards: Option<ForwardsRecord>,
    tcp_flows: Vec<TcpFlowRecord>,
    udp_flows: Vec<UdpFlowRecord>,
    /// With the index and offset of their record, for errors.
    tcp_options: Vec<(u32, u64, TcpOptionsRecord)>,
    skipped: Vec<SkippedRecord>,
}

impl<'o> Assembler<'o> {
    fn new(header: StreamHeader, observer: Option<&'o mut dyn ReadObserver>) -> Self {
        Assembler {
            observer,
            kernel_states: KernelStates::Keep,
            snapshot: header.flags & HEADER_FLAG_SNAPSHOT != 0,
            tally: Tally::default(),
            device: None,
            source: None,
            guest: None,
            forwards: None,
            tcp_flows: Vec::new(),
            udp_flows: Vec::new(),
            tcp_options: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Decode and validate one record body, and keep the record.
    fn add(&mut self, at: Located, body: &[u8]) -> Result<(), StreamError> {
        match at.record_type {
            record_type::DEVICE => self.keep(at, body, |s, r| s.device = Some(r)),
            record_type::SOURCE => self.keep(at, body, |s, r| {
                if let Some(observer) = s.observer.as_deref_mut() {
                    s.kernel_states = observer.source(&r);
                }
                s.source = Some(r);
            }),
            record_type::GUEST => self.keep(at, body, |s, r| s.guest = Some(r)),
            record_type::FORWARDS => self.keep(at, body, |s, r| s.forwards = Some(r)),
            record_type::TCP_FLOW => self.keep(at, body, |s, mut r: TcpFlowRecord| {
                if s.kernel_states == KernelStates::Drop {
                    // Freed at once: the next record's queues reuse the memory.
                    r.kernel = None;
                }
                s.tcp_flows.push(r);
            }),
            record_type::UDP_FLOW => self.keep(at, body, |s, r| s.udp_flows.push(r)),
            record_type::TCP_OPTIONS => self.keep(at, body, |s, r| {
                s.tcp_options.push((at.index, at.offset, r));
            }),
            // Nothing in it (see `StreamWriter::write_padding`).
            record_type::PADDING => Ok(()),
            record_type if at.flags & RECORD_FLAG_SKIPPABLE != 0 => {
                self.skipped.push(SkippedRecord {
                    index: at.index,
                    offset: at.offset,
                    record_type,
                    len: body.len() as u32,
                });
                Ok(())
            }
            record_type => Err(StreamError::UnknownRecord {
                index: at.index,
                offset: at.offset,
                record_type,
            }),
        }
    }

    /// Decode a body of type `T` (straight into its own type: no [`Record`](super::Record), no box),
    /// validate it, check it against the records before, and `store` it.
    fn keep<T: RecordBody + DeserializeOwned>(
        &mut self,
        at: Located,
        body: &[u8],
        store: impl FnOnce(&mut Self, T),
    ) -> Result<(), StreamError> {
        let Located { index, offset, .. } = at;
        let kind = record_type_name(T::TYPE);
        let record: T = codec::decode(body).map_err(|source| StreamError::Malformed {
            index,
            offset,
            kind,
            source,
        })?;
        self.tally.admit(&record, self.snapshot, index, offset)?;
        store(self, record);
        Ok(())
    }

    /// What only the whole stream can tell: required records present, options naming
    /// TCP flows of the stream (then merged into their flows).
    fn finish(self) -> Result<MigrationState, StreamError> {
        self.tally.check_required()?;
        let mut tcp_flows = self.tcp_flows;
        let by_id: HashMap<FlowId, usize> = tcp_flows
            .iter()
            .enumerate()
            .map(|(at, flow)| (flow.id, at))
            .collect();
        for (index, offset, options) in self.tcp_options {
            let flow = by_id
                .get(&options.flow)
                .and_then(|&at| tcp_flows.get_mut(at));
            let Some(flow) = flow else {
                return Err(StreamError::OptionsForUnknownFlow {
                    index,
                    offset,
                    id: options.flow.0,
                });
            };
            flow.guest_side.sack_permitted = options.sack_permitted;
        }
        let missing = |ty| StreamError::MissingRecord {
            kind: record_type_name(ty),
        };
        Ok(MigrationState {
            snapshot: self.snapshot,
            device: self.device.ok_or_else(|| missing(record_type::DEVICE))?,
            source: self.source.ok_or_else(|| missing(record_type::SOURCE))?,
            guest: self.guest.ok_or_else(|| missing(record_type::GUEST))?,
            forwards: self.forwards,
            tcp_flows,
            udp_flows: self.udp_flows,
            skipped: self.skipped,
        })
    }
}
