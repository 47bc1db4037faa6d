//! Golden byte vectors: they freeze the wire format. If one of these fails, the format
//! changed: that needs a new protocol version (and a new vector), not an edited one.

use baton_proto::frame::{split_frame, FrameHeader};
use baton_proto::repair::{
    FreezeCheck, Hello, PreDumped, ProgressMark, RepairMode, Reply, Request, RestoreReport,
    SocketError,
};
use baton_proto::{decode, encode};

mod common;
use common::sample_state;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check<T>(value: &T, golden: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(value).expect("encode");
    assert_eq!(hex(&bytes), golden, "encoding of {value:?} changed");
    let back: T = decode(&bytes).expect("decode golden");
    assert_eq!(&back, value);
}

#[test]
fn frame_header_layout() {
    let header = FrameHeader::new(0x0102, 3).expect("header");
    assert_eq!(hex(&header.to_bytes()), "425452500201000003000000");
}

#[test]
fn hello_request() {
    let hello = Request::Hello(Hello {
        min_version: 1,
        max_version: 2,
        capabilities: 0xF,
        software: "baton".into(),
    });
    // tag 0 (u32), min 1 (u16), max 2 (u16), caps (u64), string length (u64), bytes.
    check(
        &hello,
        "00000000010002000f0000000000000005000000000000006261746f6e",
    );
}

#[test]
fn dump_thaw_and_set_repair_requests() {
    check(&Request::Dump, "01000000");
    check(&Request::Thaw, "02000000");
    check(
        &Request::SetRepair(RepairMode::OffNoWindowProbe),
        "0400000002000000",
    );
}

#[test]
fn restore_request_with_one_state() {
    let state = sample_state();
    state.validate().expect("sample state is valid");
    check(
        &Request::Restore(vec![state]),
        concat!(
            "03000000",         // Restore
            "0100000000000000", // one state
            "00000000",         // Inet
            "00",               // v6only
            "00000000",
            "0a00020f",
            "3412", // local V4 10.0.2.15:0x1234 (ports little-endian too)
            "00000000",
            "c0000201",
            "5000",     // peer V4 192.0.2.1:80
            "00000000", // Established
            "04030201",
            "07030201",
            "ddccbbaa", // snd_una, write_seq, rcv_nxt
            "0300000000000000",
            "616263",   // send_queue
            "01000000", // send_unsent
            "0200000000000000",
            "7879", // recv_queue
            "b4050000",
            "01",
            "01",
            "07",
            "09",
            "01",       // mss 1460, sack, Some(wscale 7/9), ts
            "01100000", // timestamp
            "01",
            "01000000",
            "02000000",
            "03000000",
            "04000000",
            "05000000", // window
            "00400000",
            "00000200",
            "00",
            "01",
            "00",
            "ffffffff", // bufs, lock, reuse*, peek_off
            "01",
            "00",
            "201c0000",
            "4b000000",
            "09000000",
            "00000000", // nodelay, keepalive...
            "0500000000000000",
            "6375626963", // congestion "cubic"
            "ffffffff",
            "00000000",
            "00000000", // notsent_lowat, mark, priority
            "0100",
            "0140",
            "00",
            "00", // ip_tos Some(0), ip_ttl Some(64), no IPv6 values
        ),
    );
}

#[test]
fn per_socket_results() {
    let reply = Reply::Restored(vec![
        Ok(RestoreReport {
            send_queue_written: 3,
            fin_pending: false,
        }),
        Err(SocketError {
            step: "restore: connect".into(),
            errno: Some(99),
            detail: "EADDRNOTAVAIL".into(),
        }),
    ]);
    check(
        &reply,
        concat!(
            "03000000",
            "0200000000000000", // Restored, two results
            "00000000",
            "0300000000000000",
            "00", // Ok: written 3, no FIN pending
            "01000000",
            "1000000000000000",
            "726573746f72653a20636f6e6e656374", // Err: step
            "0163000000",                       // errno Some(99)
            "0d00000000000000",
            "45414444524e4f54415641494c", // detail
        ),
    );
}

#[test]
fn a_frame_splits_into_header_and_body() {
    let body = encode(&Request::Dump).expect("encode");
    let mut frame = FrameHeader::new(body.len(), 2)
        .expect("header")
        .to_bytes()
        .to_vec();
    frame.extend_from_slice(&body);
    let (header, got) = split_frame(&frame).expect("split");
    assert_eq!(header.fd_count, 2);
    assert_eq!(got, &body[..]);
}

#[test]
fn freeze_request_and_reply() {
    check(&Request::Freeze, "05000000");
    check(
        &Reply::Frozen(vec![Ok(())]),
        concat!("06000000", "0100000000000000", "00000000"),
    );
}

/// Version 2: the pre-dump pair. Tags after every version-1 tag (requests 6 and 7,
/// replies 7 and 8), so that the version-1 vectors above stay valid.
#[test]
fn pre_dump_and_freeze_check_messages() {
    let mark = ProgressMark {
        state: 1,
        segs_in: 0x0102_0304,
        segs_out: 5,
        inq: 6,
        outq: 7,
    };
    check(&Request::PreDump, "06000000");
    check(
        &Request::FreezeCheck(vec![mark]),
        concat!(
            "07000000",
            "0100000000000000", // one mark
            "01",               // state ESTABLISHED
            "04030201",         // segs_in
            "05000000",         // segs_out
            "06000000",         // inq
            "07000000",         // outq
        ),
    );
    let state = sample_state();
    let state_hex = hex(&encode(&state).expect("encode state"));
    check(
        &Reply::PreDumped(vec![
            Ok(None),
            Ok(Some(PreDumped {
                state: state.clone(),
                mark,
            })),
        ]),
        &[
            "07000000",
            "0200000000000000", // two results
            "00000000",         // Ok
            "00",               // None
            "00000000",         // Ok
            "01",               // Some
            &state_hex,
            "01040302010500000006000000", // the mark
            "07000000",
        ]
        .concat(),
    );
    check(
        &Reply::FreezeChecked(vec![
            Ok(FreezeCheck::Unchanged {
                timestamp: 0x11223344,
                peek_off: -1,
            }),
            Ok(FreezeCheck::Dumped(state.clone())),
        ]),
        &[
            "08000000",
            "0200000000000000",
            "00000000", // Ok
            "00000000", // Unchanged
            "44332211",
            "ffffffff",
            "00000000", // Ok
            "01000000", // Dumped
            &state_hex,
        ]
        .concat(),
    );
}

#[test]
fn freeze_check_result_gives_the_state_to_restore() {
    let pre = sample_state();
    let unchanged = FreezeCheck::Unchanged {
        timestamp: pre.timestamp.wrapping_add(1234),
        peek_off: 17,
    }
    .into_state(pre.clone());
    assert_eq!(unchanged.timestamp, pre.timestamp.wrapping_add(1234));
    assert_eq!(unchanged.sockopts.peek_off, 17);
    let mut rest = unchanged.clone();
    rest.timestamp = pre.timestamp;
    rest.sockopts.peek_off = pre.sockopts.peek_off;
    assert_eq!(rest, pre, "nothing else changes");
    let mut other = sample_state();
    other.rcv_nxt = other.rcv_nxt.wrapping_add(9);
    assert_eq!(FreezeCheck::Dumped(other.clone()).into_state(pre), other);
}
