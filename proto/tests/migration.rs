//! The migration stream as a specification: golden bytes freeze format version 1; every
//! truncation and every single-byte corruption is refused; unknown records are skipped
//! only when marked skippable; versions, limits and duplicates are checked; and any valid
//! state survives a round trip.

use baton_proto::migration::{
    decode_stream, decode_stream_with_limits, encode_stream, read_stream, record_type,
    DeviceRecord, FlowId, FlowOrigin, ForwardRuleRecord, ForwardsRecord, GuestRecord, GuestTcpSide,
    HandoverEndpoint, HostSocketEnds, IpAddress, Limits, MigrationState, NetnsIdentity, Record,
    RecordError, SkippedRecord, SourceRecord, StreamError, StreamHeader, StreamWriter,
    TcpFlowRecord, TcpOptionsRecord, UdpFlowRecord, FORMAT_VERSION, HEADER_FLAG_SNAPSHOT,
    RECORD_FLAG_SKIPPABLE,
};
use baton_proto::tcp::{Endpoint, MAX_QUEUE_BYTES};
use proptest::prelude::*;

mod common;
use common::{guest_side, host_ends, sample_state, small_state, v4};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn full_state() -> MigrationState {
    let mut state = small_state();
    state.tcp_flows = vec![
        TcpFlowRecord {
            id: FlowId(1),
            guest_side: guest_side(),
            host: host_ends(),
            kernel: Some(sample_state()),
        },
        TcpFlowRecord {
            id: FlowId(2),
            guest_side: GuestTcpSide {
                origin: FlowOrigin::Host,
                sack_permitted: true,
                ..guest_side()
            },
            host: host_ends(),
            kernel: None,
        },
    ];
    state.source.handover = Some(HandoverEndpoint {
        abstract_name: b"baton-handover-1".to_vec(),
        token: [0x5a; 32],
    });
    state.source.boot_id = Some([0x11; 16]);
    state
}

/// A stream with an explicit header, records written raw, and a valid end record.
fn raw_stream(header: StreamHeader, records: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
    let mut w = StreamWriter::with_header(Vec::new(), header, Limits::DEFAULT).expect("header");
    for (ty, flags, body) in records {
        w.write_raw_record(*ty, *flags, body).expect("raw record");
    }
    w.finish().expect("finish")
}

fn body(record: Record) -> Vec<u8> {
    record.encode_body().expect("encode body")
}

/// The three required records of `small_state`, raw.
fn required_records() -> Vec<(u16, u16, Vec<u8>)> {
    let s = small_state();
    vec![
        (record_type::DEVICE, 0, body(Record::Device(s.device))),
        (record_type::SOURCE, 0, body(Record::Source(s.source))),
        (record_type::GUEST, 0, body(Record::Guest(s.guest))),
    ]
}

// ----- golden vectors -------------------------------------------------------------------

#[test]
fn golden_small_stream_freezes_format_version_1() {
    let bytes = encode_stream(&small_state()).expect("encode");
    let golden = concat!(
        // header: "BATONMIG", version 1, oldest compatible 1, flags 0
        "4241544f4e4d4947",
        "0100",
        "0100",
        "00000000",
        // #0 Device (type 1, flags 0, 16 bytes): features, our MAC, MTU 65520
        "0100",
        "0000",
        "10000000",
        "0080206401000000",
        "9a559a559a55",
        "f0ff",
        // #1 Source (type 2, 28 bytes): hostname Some("h1"), boot_id None,
        // netns {cookie Some(1), dev None, inode None}, uid 1000, handover None
        "0200",
        "0000",
        "1c000000",
        "01",
        "0200000000000000",
        "6831",
        "00",
        "01",
        "0100000000000000",
        "00",
        "00",
        "e8030000",
        "00",
        // #2 Guest (type 3, 14 bytes): MAC Some, IPv4 Some(10.0.2.15), IPv6 None, LL None
        "0300",
        "0000",
        "0e000000",
        "01",
        "525400123456",
        "01",
        "0a00020f",
        "00",
        "00",
        // #3 Forwards (type 4, 27 bytes): one TCP rule *:8080 => 80, no UDP rule
        "0400",
        "0000",
        "1b000000",
        "0100000000000000",
        "00",
        "00",
        "901f",
        "901f",
        "5000",
        "5000",
        "00",
        "0000000000000000",
        // #4 UdpFlow (type 0x11, 33 bytes): id 7, origin Guest, guest 10.0.2.15:0x1234,
        // remote 192.0.2.1:53, host_local None, 30000 ms left
        "1100",
        "0000",
        "21000000",
        "07000000",
        "00000000",
        "00000000",
        "0a00020f",
        "3412",
        "00000000",
        "c0000201",
        "3500",
        "00",
        "30750000",
        // end (type 0xffff, 8 bytes): 5 records, CRC-32 of everything before the CRC
        "ffff",
        "0000",
        "08000000",
        "05000000",
        "258d930e",
    );
    assert_eq!(hex(&bytes), golden, "the version 1 stream layout changed");
    assert_eq!(decode_stream(&bytes).expect("decode golden"), small_state());
}

/// The guest side of a TCP flow mirrors the backend's `GuestSide` (issue 5: same-host
/// handover); the host socket's ends let a target check a handed-over socket.
#[test]
fn golden_tcp_flow_record_body() {
    let record = Record::TcpFlow(Box::new(TcpFlowRecord {
        id: FlowId(0x0102_0304),
        guest_side: guest_side(),
        host: host_ends(),
        kernel: None,
    }));
    assert_eq!(
        hex(&body(record)),
        concat!(
            "04030201", // flow id
            "00000000", // origin Guest
            "00000000", "0a00020f", "3412", // guest 10.0.2.15:0x1234
            "00000000", "c0000201", "5000",     // remote 192.0.2.1:80
            "00ccbbaa", // isn
            "ddccbbaa", "ddccbbaa",
            "d0ccbbaa", // seq_to_guest, seq_max_to_guest, seq_acked_by_guest
            "04030201", // seq_from_guest
            "00", "00", // fin_to_guest: None, fin_from_guest
            "ffff0000", "00000200", // windows
            "07", "09",   // window scales
            "b405", // MSS 1460
            "00000000", "c0000264", "409c", // host local 192.0.2.100:40000
            "00000000", "c0000201", "5000", // host peer 192.0.2.1:80
            "00",   // kernel: None
        )
    );
}

/// SACK permitted travels in a TcpOptions record (type 0x12) right after its flow,
/// marked skippable so that readers from before it skip it; the flow's own body is
/// unchanged (it is the `golden_tcp_flow_record_body` above either way).
#[test]
fn golden_tcp_options_record() {
    let flow = TcpFlowRecord {
        id: FlowId(0x0102_0304),
        guest_side: GuestTcpSide {
            sack_permitted: true,
            ..guest_side()
        },
        host: host_ends(),
        kernel: None,
    };
    let without = TcpFlowRecord {
        guest_side: guest_side(),
        ..flow.clone()
    };
    assert_eq!(
        body(Record::TcpFlow(Box::new(flow.clone()))),
        body(Record::TcpFlow(Box::new(without.clone()))),
        "the TcpFlow body does not carry the option"
    );
    assert_eq!(TcpOptionsRecord::for_flow(&without), None);
    let options = TcpOptionsRecord::for_flow(&flow).expect("options needed");
    assert_eq!(
        hex(&body(Record::TcpOptions(options))),
        concat!("04030201", "01") // flow id, sack_permitted
    );

    let mut state = small_state();
    state.tcp_flows = vec![flow.clone()];
    let bytes = encode_stream(&state).expect("encode");
    let flow_record = body(Record::TcpFlow(Box::new(flow)));
    let expected = [
        hex(&flow_record),
        // type 0x12, flags SKIPPABLE, 5 bytes, the body
        "1200".into(),
        "0100".into(),
        "05000000".into(),
        "0403020101".into(),
    ]
    .concat();
    assert!(
        hex(&bytes).contains(&expected),
        "TcpOptions record right after its flow, skippable"
    );
    assert_eq!(decode_stream(&bytes).expect("decode"), state);

    // Without SACK no TcpOptions record is written: such streams are exactly what
    // writers from before the record produce.
    state.tcp_flows = vec![without];
    let bytes = encode_stream(&state).expect("encode");
    assert!(!hex(&bytes).contains("12000100"));
    assert_eq!(decode_stream(&bytes).expect("decode"), state);
}

/// TcpOptions may come before its flow (records come in any order); it must name a
/// TCP flow of the stream, once.
#[test]
fn tcp_options_must_name_one_tcp_flow_once() {
    let flow = TcpFlowRecord {
        id: FlowId(9),
        guest_side: guest_side(),
        host: host_ends(),
        kernel: None,
    };
    let options = |id| {
        (
            record_type::TCP_OPTIONS,
            RECORD_FLAG_SKIPPABLE,
            body(Record::TcpOptions(TcpOptionsRecord {
                flow: FlowId(id),
                sack_permitted: true,
            })),
        )
    };
    let flow_raw = (
        record_type::TCP_FLOW,
        0,
        body(Record::TcpFlow(Box::new(flow))),
    );

    let mut records = required_records();
    records.push(options(9));
    records.push(flow_raw.clone());
    let state = decode_stream(&raw_stream(StreamHeader::current(0), &records))
        .expect("options before the flow");
    assert!(state.tcp_flows[0].guest_side.sack_permitted);
    assert!(state.skipped.is_empty());

    let mut records = required_records();
    records.push(flow_raw.clone());
    records.push(options(8));
    let err = decode_stream(&raw_stream(StreamHeader::current(0), &records))
        .expect_err("options for no flow");
    assert!(
        matches!(
            err,
            StreamError::OptionsForUnknownFlow {
                index: 4,
                id: 8,
                ..
            }
        ),
        "{err}"
    );

    let mut records = required_records();
    records.push(flow_raw);
    records.push(options(9));
    records.push(options(9));
    let err =
        decode_stream(&raw_stream(StreamHeader::current(0), &records)).expect_err("options twice");
    assert!(
        matches!(
            err,
            StreamError::DuplicateOptions {
                index: 5,
                id: 9,
                first: 4,
                ..
            }
        ),
        "{err}"
    );
}

// ----- round trips ----------------------------------------------------------------------

#[test]
fn full_state_round_trips_through_a_reader() {
    let state = full_state();
    let bytes = encode_stream(&state).expect("encode");
    let back = read_stream(&bytes[..]).expect("read");
    assert_eq!(back, state);
}

#[test]
fn snapshot_flag_round_trips_and_refuses_kernel_state() {
    let mut state = small_state();
    state.snapshot = true;
    state.tcp_flows = vec![TcpFlowRecord {
        id: FlowId(1),
        guest_side: guest_side(),
        host: host_ends(),
        kernel: None,
    }];
    let bytes = encode_stream(&state).expect("encode snapshot");
    assert_eq!(bytes[12] & 1, 1, "snapshot header flag");
    assert_eq!(decode_stream(&bytes).expect("decode"), state);

    state.tcp_flows[0].kernel = Some(sample_state());
    let err = encode_stream(&state).expect_err("writer refuses kernel state in a snapshot");
    assert!(matches!(
        err,
        StreamError::Invalid {
            source: RecordError::KernelStateInSnapshot,
            ..
        }
    ));
    // And so does the reader, if a writer did it anyway.
    let mut records = required_records();
    records.push((
        record_type::TCP_FLOW,
        0,
        body(Record::TcpFlow(Box::new(state.tcp_flows[0].clone()))),
    ));
    let bytes = raw_stream(StreamHeader::current(HEADER_FLAG_SNAPSHOT), &records);
    let err = decode_stream(&bytes).expect_err("reader refuses");
    assert!(
        matches!(
            err,
            StreamError::Invalid {
                index: 3,
                source: RecordError::KernelStateInSnapshot,
                ..
            }
        ),
        "{err}"
    );
}

// ----- damage ---------------------------------------------------------------------------

#[test]
fn every_truncation_is_refused() {
    let bytes = encode_stream(&full_state()).expect("encode");
    for len in 0..bytes.len() {
        let result = decode_stream(&bytes[..len]);
        assert!(
            result.is_err(),
            "a stream cut at {len} of {} was accepted",
            bytes.len()
        );
    }
}

#[test]
fn every_single_byte_corruption_is_refused() {
    let bytes = encode_stream(&full_state()).expect("encode");
    let mut damaged = bytes.clone();
    for i in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            damaged[i] ^= flip;
            assert!(
                decode_stream(&damaged).is_err(),
                "byte {i} xor {flip:#04x} was accepted"
            );
            damaged[i] ^= flip;
        }
    }
}

#[test]
fn a_damaged_body_is_reported_as_a_checksum_mismatch() {
    let mut bytes = encode_stream(&small_state()).expect("encode");
    // A byte inside the Guest record's MAC (header 16 + Device 24 + Source 36 + 8 + 1).
    bytes[16 + 24 + 36 + 8 + 1] ^= 0x02;
    let err = decode_stream(&bytes).expect_err("damaged");
    assert!(matches!(err, StreamError::ChecksumMismatch { .. }), "{err}");
}

#[test]
fn trailing_garbage_and_bad_magic_are_refused() {
    let mut bytes = encode_stream(&small_state()).expect("encode");
    let len = bytes.len() as u64;
    bytes.push(0);
    let err = decode_stream(&bytes).expect_err("trailing byte");
    assert!(
        matches!(err, StreamError::TrailingGarbage { offset, len: 1 } if offset == len),
        "{err}"
    );
    let mut bytes = encode_stream(&small_state()).expect("encode");
    bytes[0] = b'X';
    let err = decode_stream(&bytes).expect_err("bad magic");
    assert!(matches!(err, StreamError::BadMagic { .. }), "{err}");
    let err = decode_stream(b"PASST...").expect_err("short");
    assert!(matches!(err, StreamError::Truncated { .. }), "{err}");
}

// ----- unknown records ------------------------------------------------------------------

#[test]
fn a_future_record_marked_skippable_is_skipped() {
    let mut records = required_records();
    records.insert(1, (0x7001, RECORD_FLAG_SKIPPABLE, vec![1, 2, 3]));
    let bytes = raw_stream(StreamHeader::current(0), &records);
    let state = decode_stream(&bytes).expect("skippable record");
    assert_eq!(
        state.skipped,
        vec![SkippedRecord {
            index: 1,
            offset: 16 + 24,
            record_type: 0x7001,
            len: 3
        }]
    );
    assert_eq!(state.guest, small_state().guest);
}

#[test]
fn a_future_record_without_the_skip_flag_is_refused() {
    let mut records = required_records();
    records.insert(1, (0x7001, 0, vec![1, 2, 3]));
    let bytes = raw_stream(StreamHeader::current(0), &records);
    let err = decode_stream(&bytes).expect_err("unknown record");
    assert!(
        matches!(
            err,
            StreamError::UnknownRecord {
                index: 1,
                offset: 40,
                record_type: 0x7001
            }
        ),
        "{err}"
    );
}

#[test]
fn reserved_record_flags_are_refused() {
    let mut records = required_records();
    records[0].1 = 0x0002;
    let bytes = raw_stream(StreamHeader::current(0), &records);
    let err = decode_stream(&bytes).expect_err("reserved flag");
    assert!(
        matches!(
            err,
            StreamError::ReservedRecordFlags {
                index: 0,
                flags: 2,
                ..
            }
        ),
        "{err}"
    );
}

// ----- versions -------------------------------------------------------------------------

#[test]
fn a_newer_stream_that_allows_this_reader_is_read() {
    let header = StreamHeader {
        version: FORMAT_VERSION + 2,
        oldest_compatible: FORMAT_VERSION,
        flags: 1 << 16, // an informational flag this reader does not know
    };
    let mut records = required_records();
    records.push((0x7002, RECORD_FLAG_SKIPPABLE, vec![0; 10]));
    let state = decode_stream(&raw_stream(header, &records)).expect("compatible stream");
    assert_eq!(state.device, small_state().device);
    assert_eq!(state.skipped.len(), 1);
}

#[test]
fn a_stream_needing_a_newer_reader_is_refused() {
    let header = StreamHeader {
        version: FORMAT_VERSION + 1,
        oldest_compatible: FORMAT_VERSION + 1,
        flags: 0,
    };
    let err = decode_stream(&raw_stream(header, &required_records())).expect_err("too new");
    assert!(
        matches!(
            err,
            StreamError::VersionTooNew {
                version: 2,
                oldest_compatible: 2,
                reader: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn inconsistent_versions_and_unknown_required_flags_are_refused() {
    for (version, oldest_compatible) in [(0, 0), (1, 0), (1, 2), (0, 1)] {
        let header = StreamHeader {
            version,
            oldest_compatible,
            flags: 0,
        };
        let err = decode_stream(&raw_stream(header, &required_records())).expect_err("bad");
        assert!(matches!(err, StreamError::BadVersion { .. }), "{err}");
    }
    let header = StreamHeader {
        flags: 1 << 3,
        ..StreamHeader::current(0)
    };
    let err = decode_stream(&raw_stream(header, &required_records())).expect_err("flag");
    assert!(
        matches!(err, StreamError::UnknownHeaderFlags { flags: 8 }),
        "{err}"
    );
}

// ----- structure ------------------------------------------------------------------------

#[test]
fn duplicate_flow_ids_are_refused_across_flow_types() {
    let state = full_state();
    let mut records = required_records();
    records.push((
        record_type::TCP_FLOW,
        0,
        body(Record::TcpFlow(Box::new(state.tcp_flows[1].clone()))),
    ));
    let udp = UdpFlowRecord {
        id: state.tcp_flows[1].id,
        ..state.udp_flows[0]
    };
    records.push((record_type::UDP_FLOW, 0, body(Record::UdpFlow(udp))));
    let err = decode_stream(&raw_stream(StreamHeader::current(0), &records)).expect_err("dup");
    assert!(
        matches!(
            err,
            StreamError::DuplicateFlowId {
                index: 4,
                id: 2,
                first: 3,
                ..
            }
        ),
        "{err}"
    );

    // The writer refuses it too.
    let mut w = StreamWriter::new(Vec::new(), 0).expect("writer");
    w.write_record(&Record::TcpFlow(Box::new(state.tcp_flows[1].clone())))
        .expect("first");
    let err = w
        .write_record(&Record::UdpFlow(udp))
        .expect_err("writer dup");
    assert!(matches!(err, StreamError::DuplicateFlowId { .. }), "{err}");
}

#[test]
fn duplicate_and_missing_singletons_are_refused() {
    let mut records = required_records();
    records.push(records[2].clone());
    let err = decode_stream(&raw_stream(StreamHeader::current(0), &records)).expect_err("dup");
    assert!(
        matches!(
            err,
            StreamError::DuplicateRecord {
                index: 3,
                kind: "Guest",
                first: 2,
                ..
            }
        ),
        "{err}"
    );

    let mut w = StreamWriter::new(Vec::new(), 0).expect("writer");
    let s = small_state();
    w.write_record(&Record::Device(s.device)).expect("device");
    w.write_record(&Record::Source(s.source)).expect("source");
    let err = w.finish().expect_err("no Guest record");
    assert!(
        matches!(err, StreamError::MissingRecord { kind: "Guest" }),
        "{err}"
    );
}

#[test]
fn invalid_record_contents_are_refused_with_their_index() {
    let mut records = required_records();
    let bad_guest = GuestRecord {
        mac: Some([0x01, 0, 0x5e, 0, 0, 1]), // multicast
        ..GuestRecord::default()
    };
    records[2] = (record_type::GUEST, 0, body(Record::Guest(bad_guest)));
    let err = decode_stream(&raw_stream(StreamHeader::current(0), &records)).expect_err("bad");
    assert!(
        matches!(
            err,
            StreamError::Invalid {
                index: 2,
                kind: "Guest",
                source: RecordError::BadMac { .. },
                ..
            }
        ),
        "{err}"
    );
    // A body with a byte too many is malformed, not silently accepted.
    let mut records = required_records();
    records[0].2.push(0);
    let err = decode_stream(&raw_stream(StreamHeader::current(0), &records)).expect_err("long");
    assert!(
        matches!(
            err,
            StreamError::Malformed {
                index: 0,
                kind: "Device",
                ..
            }
        ),
        "{err}"
    );
}

// ----- limits ---------------------------------------------------------------------------

#[test]
fn a_record_length_over_the_limit_is_refused_from_its_header() {
    // Header, then a record header claiming a 3 GiB body, and nothing else.
    let mut bytes = StreamHeader::current(0).to_bytes().to_vec();
    bytes.extend_from_slice(&record_type::TCP_FLOW.to_le_bytes());
    bytes.extend_from_slice(&0u16.to_le_bytes());
    bytes.extend_from_slice(&0xc000_0000u32.to_le_bytes());
    let err = decode_stream(&bytes).expect_err("huge record");
    assert!(
        matches!(
            err,
            StreamError::RecordTooLarge {
                index: 0,
                offset: 16,
                len: 0xc000_0000,
                ..
            }
        ),
        "{err}"
    );
    // Small records have a small limit.
    let mut records = required_records();
    records.push((record_type::FORWARDS, 0, vec![0; (1 << 20) + 1]));
    let mut w = StreamWriter::with_header(Vec::new(), StreamHeader::current(0), Limits::DEFAULT)
        .expect("writer");
    let err = w
        .write_raw_record(record_type::FORWARDS, 0, &records[3].2)
        .expect_err("writer limit");
    assert!(matches!(err, StreamError::RecordTooLarge { .. }), "{err}");
}

/// A record the writer refuses (a limit, or its validation) leaves no trace: the stream
/// finished afterwards is the one written without it, and the writer carries on.
#[test]
fn a_refused_record_leaves_nothing_behind() {
    let state = full_state();
    let expected = encode_stream(&state).expect("encode");
    let tight = Limits {
        max_small_record_bytes: 120,
        ..Limits::DEFAULT
    };
    let mut w =
        StreamWriter::with_header(Vec::new(), StreamHeader::current(0), tight).expect("writer");
    w.write_record(&Record::Device(state.device))
        .expect("device");
    let err = w
        .write_raw_record(record_type::FORWARDS, 0, &[0; 121])
        .expect_err("over the small-record limit");
    assert!(matches!(err, StreamError::RecordTooLarge { .. }), "{err}");
    let mut bad_flow = state.tcp_flows[0].clone();
    bad_flow.guest_side.mss_to_guest = 1;
    let err = w
        .write_record(&Record::TcpFlow(Box::new(bad_flow)))
        .expect_err("invalid flow");
    assert!(
        matches!(err, StreamError::Invalid { index: 1, .. }),
        "{err}"
    );
    w.write_record(&Record::Source(state.source.clone()))
        .expect("source");
    w.write_record(&Record::Guest(state.guest)).expect("guest");
    let forwards = state.forwards.clone().expect("forwards");
    w.write_record(&Record::Forwards(forwards))
        .expect("forwards");
    for flow in &state.tcp_flows {
        w.write_record(&Record::TcpFlow(Box::new(flow.clone())))
            .expect("flow");
        if let Some(options) = TcpOptionsRecord::for_flow(flow) {
            w.write_record(&Record::TcpOptions(options))
                .expect("options");
        }
    }
    for flow in &state.udp_flows {
        w.write_record(&Record::UdpFlow(*flow)).expect("udp flow");
    }
    assert_eq!(hex(&w.finish().expect("finish")), hex(&expected));
}

#[test]
fn record_count_and_stream_size_limits_hold() {
    let bytes = encode_stream(&full_state()).expect("encode");
    let few = Limits {
        max_records: 3,
        ..Limits::DEFAULT
    };
    let err = decode_stream_with_limits(&bytes, &few).expect_err("records");
    assert!(
        matches!(
            err,
            StreamError::TooManyRecords {
                index: 3,
                limit: 3,
                ..
            }
        ),
        "{err}"
    );
    let small = Limits {
        max_stream_bytes: bytes.len() as u64 - 1,
        ..Limits::DEFAULT
    };
    let err = decode_stream_with_limits(&bytes, &small).expect_err("size");
    assert!(matches!(err, StreamError::StreamTooLarge { .. }), "{err}");
    let err = baton_proto::migration::read_stream_with_limits(&bytes[..], &small)
        .expect_err("size through a reader");
    assert!(matches!(err, StreamError::StreamTooLarge { .. }), "{err}");
    let exact = Limits {
        max_stream_bytes: bytes.len() as u64,
        // Device, Source, Guest, Forwards, 2 TcpFlow, TcpOptions of flow 2, UdpFlow.
        max_records: 8,
        ..Limits::DEFAULT
    };
    decode_stream_with_limits(&bytes, &exact).expect("exactly at the limits");
}

#[test]
fn a_tcp_queue_over_the_limit_is_refused() {
    let mut kernel = sample_state();
    kernel.send_queue = vec![0; MAX_QUEUE_BYTES + 1];
    kernel.send_unsent = 0;
    kernel.write_seq = kernel.snd_una.wrapping_add(kernel.send_queue.len() as u32);
    let flow = TcpFlowRecord {
        id: FlowId(1),
        guest_side: guest_side(),
        host: host_ends(),
        kernel: Some(kernel),
    };
    let mut w = StreamWriter::new(Vec::new(), 0).expect("writer");
    let err = w
        .write_record(&Record::TcpFlow(Box::new(flow.clone())))
        .expect_err("writer");
    assert!(
        matches!(
            err,
            StreamError::Invalid {
                source: RecordError::Kernel(_),
                ..
            }
        ),
        "{err}"
    );
    let mut records = required_records();
    records.push((
        record_type::TCP_FLOW,
        0,
        body(Record::TcpFlow(Box::new(flow))),
    ));
    let err = decode_stream(&raw_stream(StreamHeader::current(0), &records)).expect_err("reader");
    assert!(
        matches!(
            err,
            StreamError::Invalid {
                index: 3,
                source: RecordError::Kernel(_),
                ..
            }
        ),
        "{err}"
    );
}

// ----- property: any valid state round-trips ---------------------------------------------

fn endpoint_pair() -> impl Strategy<Value = (Endpoint, Endpoint)> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            1..=u16::MAX,
            any::<[u8; 4]>(),
            1..=u16::MAX
        )
            .prop_map(|(a, p, b, q)| (v4(a, p), v4(b, q))),
        (
            any::<[u8; 16]>(),
            1..=u16::MAX,
            any::<[u8; 16]>(),
            1..=u16::MAX,
            any::<u32>()
        )
            .prop_map(|(a, p, b, q, scope_id)| (
                Endpoint::V6 {
                    addr: a,
                    port: p,
                    flowinfo: 0,
                    scope_id
                },
                Endpoint::V6 {
                    addr: b,
                    port: q,
                    flowinfo: 0,
                    scope_id
                }
            )),
    ]
}

fn origin() -> impl Strategy<Value = FlowOrigin> {
    prop_oneof![Just(FlowOrigin::Guest), Just(FlowOrigin::Host)]
}

fn tcp_flow(id: u32, snapshot: bool) -> impl Strategy<Value = TcpFlowRecord> {
    (
        origin(),
        endpoint_pair(),
        any::<[u32; 6]>(),
        (
            0..=14u8,
            0..=14u8,
            64..=u16::MAX,
            any::<[bool; 2]>(),
            any::<u32>(),
        ),
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::collection::vec(any::<u8>(), 0..200),
            any::<u32>(),
        ),
    )
        .prop_map(
            move |(origin, (guest, remote), n, (wsf, wst, mss, flags, ts), kernel)| {
                let (with_kernel, sendq, recvq, una) = kernel;
                let kernel = (with_kernel && !snapshot).then(|| {
                    let mut k = sample_state();
                    k.snd_una = una;
                    k.write_seq = una.wrapping_add(sendq.len() as u32);
                    k.send_unsent = (sendq.len() / 2) as u32;
                    k.send_queue = sendq;
                    k.recv_queue = recvq;
                    k
                });
                TcpFlowRecord {
                    id: FlowId(id),
                    guest_side: GuestTcpSide {
                        origin,
                        guest,
                        remote,
                        isn: ts,
                        seq_to_guest: n[1].wrapping_add(n[0] % 100_000),
                        seq_max_to_guest: n[1].wrapping_add(n[0] % 100_000 + n[3] % 100_000),
                        seq_acked_by_guest: n[1],
                        seq_from_guest: n[2],
                        fin_to_guest: None,
                        fin_from_guest: flags[0],
                        wnd_from_guest: n[4] % (65535 << 14),
                        wnd_to_guest: n[5] % (65535 << 14),
                        ws_from_guest: wsf,
                        ws_to_guest: wst,
                        mss_to_guest: mss,
                        sack_permitted: flags[1],
                    },
                    host: HostSocketEnds {
                        local: remote,
                        peer: guest,
                    },
                    kernel,
                }
            },
        )
}

fn udp_flow(id: u32) -> impl Strategy<Value = UdpFlowRecord> {
    (origin(), endpoint_pair(), any::<bool>(), any::<u32>()).prop_map(
        move |(origin, (guest, remote), keep_port, idle_left_ms)| UdpFlowRecord {
            id: FlowId(id),
            origin,
            guest,
            remote,
            host_local: keep_port.then_some(remote),
            idle_left_ms,
        },
    )
}

fn guest_record() -> impl Strategy<Value = GuestRecord> {
    (
        any::<bool>(),
        any::<[u8; 5]>(),
        1..=223u8,
        any::<bool>(),
        any::<[u8; 8]>(),
    )
        .prop_map(|(has, mac_tail, v4_first, has_v6, iid)| {
            let mut ll = [0u8; 16];
            ll[0] = 0xfe;
            ll[1] = 0x80;
            ll[8..].copy_from_slice(&iid);
            let mut global = ll;
            global[0] = 0x20;
            global[1] = 0x01;
            GuestRecord {
                mac: has.then(|| {
                    let mut mac = [0x52; 6];
                    mac[1..].copy_from_slice(&mac_tail);
                    mac
                }),
                ipv4: has.then_some([v4_first, 0, 2, 15]),
                ipv6: has_v6.then_some(global),
                ipv6_link_local: has_v6.then_some(ll),
            }
        })
}

fn forwards() -> impl Strategy<Value = Option<ForwardsRecord>> {
    proptest::option::of(
        proptest::collection::vec(
            (
                1..1000u16,
                0..100u16,
                1..1000u16,
                proptest::option::of("[a-z0-9]{1,15}"),
                any::<Option<[u8; 4]>>(),
            ),
            0..5,
        )
        .prop_map(|rules| {
            let rules: Vec<_> = rules
                .into_iter()
                .map(|(first, span, gfirst, dev, addr)| ForwardRuleRecord {
                    bind_addr: addr.map(IpAddress::V4),
                    bind_device: dev,
                    host_first: first,
                    host_last: first + span,
                    guest_first: gfirst,
                    guest_last: gfirst + span,
                    guest_addr: addr.map(|a| IpAddress::V6([a[0]; 16])),
                })
                .collect();
            ForwardsRecord {
                udp: rules.iter().rev().cloned().collect(),
                tcp: rules,
            }
        }),
    )
}

fn migration_state() -> impl Strategy<Value = MigrationState> {
    (any::<bool>(), 0..4usize, 0..4usize).prop_flat_map(|(snapshot, ntcp, nudp)| {
        let tcp: Vec<_> = (0..ntcp as u32)
            .map(|i| tcp_flow(i * 2, snapshot))
            .collect();
        let udp: Vec<_> = (0..nudp as u32).map(|i| udp_flow(i * 2 + 1)).collect();
        (
            (
                any::<u64>(),
                68..=65520u16,
                any::<u32>(),
                any::<Option<u64>>(),
            ),
            proptest::option::of("[a-z0-9.-]{0,64}"),
            guest_record(),
            forwards(),
            tcp,
            udp,
        )
            .prop_map(
                move |((features, mtu, uid, cookie), hostname, guest, forwards, tcp, udp)| {
                    MigrationState {
                        snapshot,
                        device: DeviceRecord {
                            acked_features: features,
                            our_mac: [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55],
                            mtu,
                        },
                        source: SourceRecord {
                            hostname,
                            boot_id: cookie.map(|c| [c as u8; 16]),
                            netns: NetnsIdentity {
                                cookie,
                                dev: cookie,
                                inode: None,
                            },
                            uid,
                            handover: cookie.map(|c| HandoverEndpoint {
                                abstract_name: format!("baton-{c}").into_bytes(),
                                token: [c as u8; 32],
                            }),
                        },
                        guest,
                        forwards,
                        tcp_flows: tcp,
                        udp_flows: udp,
                        skipped: vec![],
                    }
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_valid_state_round_trips(state in migration_state()) {
        let bytes = encode_stream(&state).expect("a valid state encodes");
        let back = read_stream(&bytes[..]).expect("and reads back");
        prop_assert_eq!(back, state);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(
        tail in proptest::collection::vec(any::<u8>(), 0..256)
    ) {
        let mut bytes = StreamHeader::current(0).to_bytes().to_vec();
        bytes.extend_from_slice(&tail);
        prop_assert!(decode_stream(&bytes).is_err());
    }
}

// ----- same-host handover messages ---------------------------------------------------------

#[test]
fn handover_messages_round_trip_and_are_bounded() {
    use baton_proto::migration::{HandoverMessage, MAX_HANDOVER_FLOWS, MAX_HANDOVER_REASON};
    let messages = [
        HandoverMessage::Hello { token: [7; 32] },
        HandoverMessage::Sockets {
            flows: vec![FlowId(1), FlowId(2)],
        },
        HandoverMessage::Done { total: 2 },
        HandoverMessage::Taken {
            flows: vec![FlowId(2)],
        },
        HandoverMessage::Released,
        HandoverMessage::Refused {
            reason: "wrong token".into(),
        },
        HandoverMessage::SocketsLive {
            flows: vec![FlowId(3)],
        },
    ];
    // SocketsLive was appended: the variants before it keep their numbers (an older
    // peer decodes them as before).
    for (index, msg) in messages.iter().enumerate() {
        let bytes = baton_proto::encode(msg).expect("encode");
        let tag = baton_proto::encode(&(index as u32)).expect("encode index");
        assert!(bytes.starts_with(&tag), "{msg:?} is variant {index}");
    }
    let too_many_live = HandoverMessage::SocketsLive {
        flows: (0..=baton_proto::frame::MAX_FDS as u32)
            .map(FlowId)
            .collect(),
    };
    assert!(too_many_live.validate().is_err());
    for msg in messages {
        msg.validate().expect("valid");
        let bytes = baton_proto::encode(&msg).expect("encode");
        let back: HandoverMessage = baton_proto::decode(&bytes).expect("decode");
        assert_eq!(back, msg);
    }
    let too_many_fds = HandoverMessage::Sockets {
        flows: (0..=baton_proto::frame::MAX_FDS as u32)
            .map(FlowId)
            .collect(),
    };
    assert!(too_many_fds.validate().is_err());
    let too_many_flows = HandoverMessage::Taken {
        flows: (0..=MAX_HANDOVER_FLOWS as u32).map(FlowId).collect(),
    };
    assert!(too_many_flows.validate().is_err());
    let long = HandoverMessage::Refused {
        reason: "x".repeat(MAX_HANDOVER_REASON + 1),
    };
    assert!(long.validate().is_err());
}

#[test]
fn guest_tcp_side_sequence_numbers_are_checked() {
    let mut side = guest_side();
    side.validate().expect("sample");
    // SND.NXT before SND.UNA.
    side.seq_to_guest = side.seq_acked_by_guest.wrapping_sub(1);
    assert!(side.validate().is_err());
    // A FIN that was sent and acknowledged is fine; one beyond SND.MAX is not.
    let mut side = guest_side();
    side.fin_to_guest = Some(side.seq_to_guest.wrapping_sub(1));
    side.seq_acked_by_guest = side.seq_to_guest;
    side.validate().expect("FIN acknowledged");
    side.fin_to_guest = Some(side.seq_max_to_guest);
    assert!(side.validate().is_err());
}
