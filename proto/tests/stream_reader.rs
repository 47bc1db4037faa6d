//! The one-pass stream reader: whatever way the bytes arrive (one at a time, in odd
//! pieces, interrupted, as one record larger than the read buffer), `read_stream` gives
//! exactly what `decode_stream` gives for the same bytes; and its errors are those of a
//! reader that checks all the framing and the checksum before it looks at a record body
//! (a stream over the limit first, then framing, then checksum, then record contents).

use std::io::{self, Read};

use baton_proto::migration::{
    decode_stream, decode_stream_with_limits, encode_stream, read_stream, read_stream_observed,
    read_stream_with_limits, record_type, FlowId, KernelStates, Limits, MigrationState,
    ReadObserver, Record, StreamError, StreamHeader, StreamWriter, TcpFlowRecord, HEADER_LEN,
    RECORD_HEADER_LEN,
};
use proptest::prelude::*;

mod common;
use common::{bulk_state, guest_side, host_ends, sample_state, small_state};

/// A reader that hands out `bytes` in pieces of the sizes given (cycled), fails with
/// `Interrupted` before every `interrupt_every`-th piece, and with a real error once
/// `fail_at` bytes have been delivered.
struct Pieces<'a> {
    bytes: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
    delivered: usize,
    interrupt_every: Option<usize>,
    calls: usize,
    fail_at: Option<usize>,
}

impl<'a> Pieces<'a> {
    fn new(bytes: &'a [u8], sizes: &[usize]) -> Self {
        Pieces {
            bytes,
            sizes: sizes.to_vec(),
            next: 0,
            delivered: 0,
            interrupt_every: None,
            calls: 0,
            fail_at: None,
        }
    }
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.interrupt_every.is_some_and(|n| self.calls % n == 0) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        if self.fail_at.is_some_and(|at| self.delivered >= at) {
            return Err(io::Error::other("the pipe broke"));
        }
        let size = self.sizes[self.next % self.sizes.len()].max(1);
        self.next += 1;
        let n = size.min(buf.len()).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        self.delivered += n;
        Ok(n)
    }
}

/// `read_stream_with_limits` over `Pieces` and `decode_stream_with_limits` agree: the
/// same state, or the same error.
fn assert_same(bytes: &[u8], sizes: &[usize], limits: &Limits) {
    let streamed = read_stream_with_limits(Pieces::new(bytes, sizes), limits);
    let whole = decode_stream_with_limits(bytes, limits);
    match (streamed, whole) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("read_stream gave {a:?}, decode_stream {b:?}"),
    }
}

/// A valid stream with a few flows of each kind and TcpOptions records.
fn some_stream() -> (MigrationState, Vec<u8>) {
    let state = bulk_state(3, 100);
    let bytes = encode_stream(&state).expect("encode");
    (state, bytes)
}

#[test]
fn a_stream_read_in_any_pieces_is_the_stream_decoded() {
    let (state, bytes) = some_stream();
    for sizes in [
        &[1][..],
        &[7, 1, 300],
        &[HEADER_LEN + RECORD_HEADER_LEN],
        &[1 << 20],
    ] {
        let read = read_stream(Pieces::new(&bytes, sizes)).expect("read");
        assert_eq!(read, state, "pieces of {sizes:?}");
    }
    let mut interrupted = Pieces::new(&bytes, &[5, 50]);
    interrupted.interrupt_every = Some(3);
    assert_eq!(read_stream(interrupted).expect("interrupted reads"), state);
}

#[test]
fn every_truncation_and_corruption_gives_the_same_error_from_a_reader() {
    let (_, bytes) = some_stream();
    for end in 0..bytes.len() {
        assert_same(&bytes[..end], &[1, 13], &Limits::DEFAULT);
    }
    let mut damaged = bytes.clone();
    for i in 0..damaged.len() {
        damaged[i] ^= 0x41;
        assert_same(&damaged, &[64, 3], &Limits::DEFAULT);
        damaged[i] ^= 0x41;
    }
}

/// A TCP flow whose body is larger than the reader's buffer (256 KiB), several times.
fn big_flow(id: u32, queue: usize) -> TcpFlowRecord {
    let mut kernel = sample_state();
    kernel.send_queue = (0..queue).map(|i| (i % 251) as u8).collect();
    kernel.send_unsent = 0;
    kernel.write_seq = kernel.snd_una.wrapping_add(queue as u32);
    kernel.recv_queue = (0..queue).map(|i| (i % 241) as u8).collect();
    TcpFlowRecord {
        id: FlowId(id),
        guest_side: guest_side(),
        host: host_ends(),
        kernel: Some(kernel),
    }
}

#[test]
fn records_larger_than_the_read_buffer_are_read_whole() {
    let mut state = small_state();
    state.tcp_flows = vec![
        big_flow(1, 3 << 20),
        big_flow(2, 10),
        big_flow(3, 700 << 10),
    ];
    let bytes = encode_stream(&state).expect("encode");
    for sizes in [&[64 << 10][..], &[4096, 1], &[8 << 20]] {
        assert_eq!(
            read_stream(Pieces::new(&bytes, sizes)).expect("read"),
            state
        );
    }
    // Cut inside the large body, and with its length claiming more than is there.
    for end in [bytes.len() / 2, bytes.len() - 5] {
        assert_same(&bytes[..end], &[64 << 10], &Limits::DEFAULT);
    }
}

#[test]
fn a_read_error_is_reported_as_such() {
    let (_, bytes) = some_stream();
    for at in [0, 10, bytes.len() / 2, bytes.len()] {
        let mut failing = Pieces::new(&bytes, &[100]);
        failing.fail_at = Some(at);
        let err = read_stream(failing).expect_err("read error");
        assert!(matches!(err, StreamError::Io(_)), "failing at {at}: {err}");
    }
}

/// The required records, then `extra` raw records, then a valid end record.
fn stream_with(extra: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
    let state = small_state();
    let mut w = StreamWriter::new(Vec::new(), 0).expect("writer");
    w.write_record(&Record::Device(state.device))
        .expect("device");
    w.write_record(&Record::Source(state.source))
        .expect("source");
    w.write_record(&Record::Guest(state.guest)).expect("guest");
    for (ty, flags, body) in extra {
        w.write_raw_record(*ty, *flags, body).expect("raw record");
    }
    w.finish().expect("finish")
}

/// A UDP flow body that decodes but does not validate (port 0).
fn invalid_udp_body() -> Vec<u8> {
    let mut flow = small_state().udp_flows[0];
    flow.remote = common::v4([192, 0, 2, 1], 0);
    Record::UdpFlow(flow).encode_body().expect("encode")
}

#[test]
fn a_bad_record_is_reported_only_if_the_framing_holds() {
    // On its own, the bad record is the error.
    let bad = (record_type::UDP_FLOW, 0, invalid_udp_body());
    let bytes = stream_with(std::slice::from_ref(&bad));
    let err = decode_stream(&bytes).expect_err("invalid record");
    assert!(
        matches!(err, StreamError::Invalid { index: 3, .. }),
        "{err}"
    );

    // A framing error after it wins: reserved flags on the next record ...
    let bytes = stream_with(&[bad.clone(), (0x7001, 0x8000, vec![0; 4])]);
    let err = decode_stream(&bytes).expect_err("reserved flags");
    assert!(
        matches!(err, StreamError::ReservedRecordFlags { index: 4, .. }),
        "{err}"
    );
    // ... a truncation, ...
    let bytes = stream_with(std::slice::from_ref(&bad));
    let err = decode_stream(&bytes[..bytes.len() - 1]).expect_err("truncated");
    assert!(matches!(err, StreamError::Truncated { .. }), "{err}");
    // ... and a checksum mismatch, even when the damage is what makes the record bad:
    // the bad body in place of a good one, the checksum left as it was.
    let good_body = Record::UdpFlow(small_state().udp_flows[0])
        .encode_body()
        .expect("encode");
    let mut bytes = stream_with(&[(record_type::UDP_FLOW, 0, good_body.clone())]);
    let body_at = bytes.len() - 2 * RECORD_HEADER_LEN - good_body.len();
    assert_eq!(&bytes[body_at..body_at + good_body.len()], &good_body[..]);
    bytes[body_at..body_at + good_body.len()].copy_from_slice(&bad.2);
    let err = decode_stream(&bytes).expect_err("damaged");
    assert!(matches!(err, StreamError::ChecksumMismatch { .. }), "{err}");
}

#[test]
fn any_damage_inside_a_record_body_is_a_checksum_mismatch() {
    let (_, bytes) = some_stream();
    // Walk the framing to find every body byte.
    let mut bodies = Vec::new();
    let mut at = HEADER_LEN;
    loop {
        let ty = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes")) as usize;
        if ty == record_type::END {
            break;
        }
        bodies.extend(at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + len);
        at += RECORD_HEADER_LEN + len;
    }
    let mut damaged = bytes.clone();
    for i in bodies {
        damaged[i] ^= 0x80;
        let err = read_stream(Pieces::new(&damaged, &[33])).expect_err("damaged body");
        assert!(
            matches!(err, StreamError::ChecksumMismatch { .. }),
            "byte {i}: {err}"
        );
        damaged[i] ^= 0x80;
    }
}

#[test]
fn a_stream_over_the_limit_is_reported_as_such_whatever_else_is_wrong() {
    let (_, bytes) = some_stream();
    let small = Limits {
        max_stream_bytes: bytes.len() as u64 - 1,
        ..Limits::DEFAULT
    };
    let mut bad_magic = bytes.clone();
    bad_magic[0] ^= 1;
    let bad_record = stream_with(&[(record_type::UDP_FLOW, 0, invalid_udp_body())]);
    let limit_of = |b: &[u8]| Limits {
        max_stream_bytes: b.len() as u64 - 1,
        ..Limits::DEFAULT
    };
    for (what, stream, limits) in [
        ("valid", &bytes, small),
        ("bad magic", &bad_magic, small),
        ("bad record", &bad_record, limit_of(&bad_record)),
    ] {
        for sizes in [&[1][..], &[1 << 20]] {
            let err = read_stream_with_limits(Pieces::new(stream, sizes), &limits).expect_err(what);
            assert!(
                matches!(err, StreamError::StreamTooLarge { .. }),
                "{what}: {err}"
            );
            assert_same(stream, sizes, &limits);
        }
    }
}

#[test]
fn a_reader_is_not_read_past_the_limit() {
    // An endless input: the reader stops one byte past the limit.
    let limits = Limits {
        max_stream_bytes: 1000,
        ..Limits::DEFAULT
    };
    let endless = io::repeat(0x42);
    let err = read_stream_with_limits(endless, &limits).expect_err("endless");
    assert!(matches!(err, StreamError::StreamTooLarge { .. }), "{err}");
}

#[test]
fn a_header_alone_is_a_truncated_stream() {
    let header = StreamHeader::current(0).to_bytes();
    let err = read_stream(&header[..]).expect_err("header only");
    assert!(
        matches!(
            err,
            StreamError::Truncated {
                offset: 16,
                what: "record header",
                need: 8,
                have: 0
            }
        ),
        "{err}"
    );
    assert_same(&header, &[3], &Limits::DEFAULT);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random pieces, random flows, random damage: a reader and a slice agree.
    #[test]
    fn read_and_decode_agree(
        flows in 0u32..6,
        queue in 0u32..2000,
        sizes in proptest::collection::vec(1usize..5000, 1..8),
        damage in proptest::option::of((any::<prop::sample::Index>(), 1u8..=255)),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = encode_stream(&bulk_state(flows, queue)).expect("encode");
        if let Some((at, flip)) = damage {
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        assert_same(&bytes, &sizes, &Limits::DEFAULT);
    }
}

/// Counts what it is told, and answers `answer`.
struct Observer {
    answer: KernelStates,
    sources: Vec<baton_proto::migration::SourceRecord>,
}

impl ReadObserver for Observer {
    fn source(&mut self, source: &baton_proto::migration::SourceRecord) -> KernelStates {
        self.sources.push(source.clone());
        self.answer
    }
}

fn observer(answer: KernelStates) -> Observer {
    Observer {
        answer,
        sources: Vec::new(),
    }
}

#[test]
fn an_observer_hears_the_source_record_and_may_drop_kernel_states() {
    let (state, bytes) = some_stream();
    assert!(state.tcp_flows.iter().any(|f| f.kernel.is_some()));
    let mut keep = observer(KernelStates::Keep);
    let read = read_stream_observed(Pieces::new(&bytes, &[7, 300]), &Limits::DEFAULT, &mut keep)
        .expect("read, keeping");
    assert_eq!(read, state);
    assert_eq!(keep.sources, vec![state.source.clone()]);

    let mut drop = observer(KernelStates::Drop);
    let read = read_stream_observed(Pieces::new(&bytes, &[7, 300]), &Limits::DEFAULT, &mut drop)
        .expect("read, dropping");
    assert_eq!(drop.sources, vec![state.source.clone()]);
    let mut expected = state.clone();
    for flow in &mut expected.tcp_flows {
        flow.kernel = None;
    }
    assert_eq!(read, expected);
}

/// Dropping kernel states changes no error: a dropped state is validated first.
#[test]
fn an_observer_that_drops_kernel_states_sees_the_same_errors() {
    let (_, bytes) = some_stream();
    let check = |bytes: &[u8]| {
        let plain = read_stream(Pieces::new(bytes, &[64, 3]));
        let mut drop = observer(KernelStates::Drop);
        let observed =
            read_stream_observed(Pieces::new(bytes, &[64, 3]), &Limits::DEFAULT, &mut drop);
        match (plain, observed) {
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (Ok(_), Ok(_)) => {}
            (a, b) => panic!("plain {a:?}, observed {b:?}"),
        }
    };
    let mut damaged = bytes.clone();
    for i in (0..damaged.len()).step_by(3) {
        damaged[i] ^= 0x41;
        check(&damaged);
        damaged[i] ^= 0x41;
    }
    for end in (0..bytes.len()).step_by(5) {
        check(&bytes[..end]);
    }
}

/// Written in two steps as baton's SAVE does (prefix, padding, flush; then the flows):
/// the prefix is out before the flows exist, and the whole reads as the same state.
#[test]
fn a_stream_written_in_steps_with_padding_reads_as_the_state() {
    let (state, plain) = some_stream();
    let mut w = StreamWriter::new(Vec::new(), 0).expect("writer");
    w.write_prefix(
        &state.device,
        &state.source,
        &state.guest,
        state.forwards.as_ref(),
    )
    .expect("prefix");
    w.write_padding(40 << 10).expect("padding");
    w.flush().expect("flush");
    for flow in &state.tcp_flows {
        w.write_tcp_flow(flow).expect("tcp flow");
    }
    for flow in &state.udp_flows {
        w.write_udp_flow(flow).expect("udp flow");
    }
    let bytes = w.finish().expect("finish");
    assert_eq!(bytes.len(), plain.len() + RECORD_HEADER_LEN + (40 << 10));
    assert_eq!(
        read_stream(Pieces::new(&bytes, &[4096])).expect("read"),
        state
    );
    assert_eq!(decode_stream(&bytes).expect("decode"), state);

    // What the flush wrote: a reader sees the Source record in it.
    let mut w = StreamWriter::new(Vec::new(), 0).expect("writer");
    w.write_prefix(&state.device, &state.source, &state.guest, None)
        .expect("prefix");
    w.flush().expect("flush");
    let mut seen = observer(KernelStates::Keep);
    let cut = w.finish().expect("finish");
    let _ = read_stream_observed(&cut[..], &Limits::DEFAULT, &mut seen);
    assert_eq!(seen.sources, vec![state.source.clone()]);
}
