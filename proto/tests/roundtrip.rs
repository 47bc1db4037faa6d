//! Property tests: every message survives encode/decode unchanged, every truncation of
//! an encoded message is an error (never a panic, never a different message), and the
//! frame header rejects what it must.

use baton_proto::frame::{
    split_frame, FrameError, FrameHeader, SplitError, HEADER_LEN, MAX_BODY_LEN, MAX_FDS,
};
use baton_proto::repair::{
    FreezeCheck, Hello, PreDumped, ProgressMark, RepairMode, Reply, Request, RestoreReport,
    SocketError,
};
use baton_proto::tcp::{
    Endpoint, NegotiatedOptions, RepairWindow, SocketFamily, SocketOptions, TcpConnState, TcpState,
    WindowScale,
};
use baton_proto::{decode, encode, DecodeError};
use proptest::prelude::*;

fn endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(addr, port)| Endpoint::V4 { addr, port }),
        (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
            |(addr, port, flowinfo, scope_id)| Endpoint::V6 {
                addr,
                port,
                flowinfo,
                scope_id
            }
        ),
    ]
}

fn tcp_state() -> impl Strategy<Value = TcpState> {
    prop_oneof![
        Just(TcpState::Established),
        Just(TcpState::FinWait1),
        Just(TcpState::FinWait2),
        Just(TcpState::CloseWait),
        Just(TcpState::LastAck),
    ]
}

fn sockopts() -> impl Strategy<Value = SocketOptions> {
    (
        (
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            any::<bool>(),
            any::<bool>(),
            any::<i32>(),
        ),
        (
            any::<bool>(),
            any::<bool>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
        ),
        ("[a-z0-9]{0,15}", any::<u32>(), any::<u32>(), any::<u32>()),
        (
            any::<Option<u8>>(),
            any::<Option<u8>>(),
            any::<Option<i32>>(),
            any::<Option<i32>>(),
        ),
    )
        .prop_map(|(a, b, c, d)| SocketOptions {
            sndbuf: a.0,
            rcvbuf: a.1,
            buf_lock: a.2,
            reuseaddr: a.3,
            reuseport: a.4,
            peek_off: a.5,
            nodelay: b.0,
            keepalive: b.1,
            keepidle: b.2,
            keepintvl: b.3,
            keepcnt: b.4,
            user_timeout: b.5,
            congestion: c.0,
            notsent_lowat: c.1,
            mark: c.2,
            priority: c.3,
            ip_tos: d.0,
            ip_ttl: d.1,
            ipv6_tclass: d.2,
            ipv6_hops: d.3,
        })
}

fn conn_state() -> impl Strategy<Value = TcpConnState> {
    (
        (
            any::<bool>(),
            any::<bool>(),
            endpoint(),
            endpoint(),
            tcp_state(),
        ),
        (any::<u32>(), any::<u32>(), any::<u32>()),
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        ),
        (
            any::<u32>(),
            any::<bool>(),
            any::<Option<(u8, u8)>>(),
            any::<bool>(),
            any::<u32>(),
        ),
        any::<Option<(u32, u32, u32, u32, u32)>>(),
        sockopts(),
    )
        .prop_map(
            |(head, seqs, queues, opts, window, sockopts)| TcpConnState {
                family: if head.0 {
                    SocketFamily::Inet
                } else {
                    SocketFamily::Inet6
                },
                v6only: head.1,
                local: head.2,
                peer: head.3,
                state: head.4,
                snd_una: seqs.0,
                write_seq: seqs.1,
                rcv_nxt: seqs.2,
                send_queue: queues.0,
                send_unsent: queues.1,
                recv_queue: queues.2,
                options: NegotiatedOptions {
                    mss_clamp: opts.0,
                    sack: opts.1,
                    wscale: opts.2.map(|(snd, rcv)| WindowScale { snd, rcv }),
                    timestamps: opts.3,
                },
                timestamp: opts.4,
                window: window.map(|w| RepairWindow {
                    snd_wl1: w.0,
                    snd_wnd: w.1,
                    max_window: w.2,
                    rcv_wnd: w.3,
                    rcv_wup: w.4,
                }),
                sockopts,
            },
        )
}

fn socket_error() -> impl Strategy<Value = SocketError> {
    (".{0,40}", any::<Option<i32>>(), ".{0,40}").prop_map(|(step, errno, detail)| SocketError {
        step,
        errno,
        detail,
    })
}

fn progress_mark() -> impl Strategy<Value = ProgressMark> {
    (
        any::<u8>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(state, segs_in, segs_out, inq, outq)| ProgressMark {
            state,
            segs_in,
            segs_out,
            inq,
            outq,
        })
}

fn freeze_check() -> impl Strategy<Value = FreezeCheck> {
    prop_oneof![
        (any::<u32>(), any::<i32>()).prop_map(|(timestamp, peek_off)| FreezeCheck::Unchanged {
            timestamp,
            peek_off
        }),
        conn_state().prop_map(FreezeCheck::Dumped),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u16>(), any::<u16>(), any::<u64>(), ".{0,64}").prop_map(|(a, b, c, d)| {
            Request::Hello(Hello {
                min_version: a,
                max_version: b,
                capabilities: c,
                software: d,
            })
        }),
        Just(Request::Dump),
        Just(Request::Thaw),
        Just(Request::Freeze),
        Just(Request::PreDump),
        proptest::collection::vec(progress_mark(), 0..8).prop_map(Request::FreezeCheck),
        proptest::collection::vec(conn_state(), 0..4).prop_map(Request::Restore),
        prop_oneof![
            Just(RepairMode::On),
            Just(RepairMode::Off),
            Just(RepairMode::OffNoWindowProbe)
        ]
        .prop_map(Request::SetRepair),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        proptest::collection::vec(
            prop_oneof![conn_state().prop_map(Ok), socket_error().prop_map(Err)],
            0..4
        )
        .prop_map(Reply::Dumped),
        proptest::collection::vec(
            prop_oneof![
                (any::<u64>(), any::<bool>()).prop_map(|(w, f)| Ok(RestoreReport {
                    send_queue_written: w,
                    fin_pending: f
                })),
                socket_error().prop_map(Err)
            ],
            0..4
        )
        .prop_map(Reply::Restored),
        proptest::collection::vec(
            prop_oneof![Just(Ok(())), socket_error().prop_map(Err)],
            0..4
        )
        .prop_map(Reply::Thawed),
        proptest::collection::vec(
            prop_oneof![
                Just(Ok(None)),
                (conn_state(), progress_mark())
                    .prop_map(|(state, mark)| Ok(Some(PreDumped { state, mark }))),
                socket_error().prop_map(Err)
            ],
            0..4
        )
        .prop_map(Reply::PreDumped),
        proptest::collection::vec(
            prop_oneof![freeze_check().prop_map(Ok), socket_error().prop_map(Err)],
            0..4
        )
        .prop_map(Reply::FreezeChecked),
    ]
}

proptest! {
    #[test]
    fn requests_round_trip(req in request()) {
        let bytes = encode(&req).expect("encode");
        let back: Request = decode(&bytes).expect("decode");
        prop_assert_eq!(back, req);
    }

    #[test]
    fn replies_round_trip(rep in reply()) {
        let bytes = encode(&rep).expect("encode");
        let back: Reply = decode(&bytes).expect("decode");
        prop_assert_eq!(back, rep);
    }

    #[test]
    fn every_truncation_is_an_error(req in request(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&req).expect("encode");
        let cut = cut.index(bytes.len());
        prop_assert!(decode::<Request>(&bytes[..cut]).is_err());
    }

    #[test]
    fn every_reply_truncation_is_an_error(rep in reply(), cut in any::<prop::sample::Index>()) {
        let bytes = encode(&rep).expect("encode");
        let cut = cut.index(bytes.len());
        prop_assert!(decode::<Reply>(&bytes[..cut]).is_err());
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<Request>(&bytes);
        let _ = decode::<Reply>(&bytes);
        let _ = split_frame(&bytes);
    }
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = encode(&Request::Dump).expect("encode");
    bytes.push(0);
    assert_eq!(
        decode::<Request>(&bytes),
        Err(DecodeError::TrailingBytes {
            consumed: 4,
            trailing: 1
        })
    );
}

#[test]
fn huge_length_prefix_does_not_allocate_it() {
    // Restore with a claimed 2^60 states: must fail fast on the limit, not try to
    // reserve memory for them.
    let mut bytes = 3u32.to_le_bytes().to_vec();
    bytes.extend_from_slice(&(1u64 << 60).to_le_bytes());
    assert!(matches!(
        decode::<Request>(&bytes),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn unknown_request_tag_is_an_error() {
    let bytes = 17u32.to_le_bytes();
    assert!(decode::<Request>(&bytes).is_err());
    assert_eq!(baton_proto::repair::request_tag(&bytes), Some(17));
}

#[test]
fn frame_header_rejects_bad_input() {
    let good = FrameHeader::new(10, 1).expect("header").to_bytes();
    let mut bad_magic = good;
    bad_magic[0] = b'X';
    assert!(matches!(
        FrameHeader::parse(&bad_magic),
        Err(FrameError::BadMagic(_))
    ));
    let mut too_big = good;
    too_big[4..8].copy_from_slice(&(MAX_BODY_LEN + 1).to_le_bytes());
    assert_eq!(
        FrameHeader::parse(&too_big),
        Err(FrameError::TooLarge(MAX_BODY_LEN + 1))
    );
    let mut fds = good;
    fds[8..10].copy_from_slice(&(MAX_FDS as u16 + 1).to_le_bytes());
    assert_eq!(FrameHeader::parse(&fds), Err(FrameError::TooManyFds(254)));
    let mut reserved = good;
    reserved[10] = 1;
    assert_eq!(FrameHeader::parse(&reserved), Err(FrameError::Reserved(1)));
    assert!(FrameHeader::new(MAX_BODY_LEN as usize + 1, 0).is_err());
    assert!(FrameHeader::new(0, MAX_FDS + 1).is_err());
    assert_eq!(
        split_frame(&good[..HEADER_LEN - 1]),
        Err(SplitError::Truncated { have: 11, need: 12 })
    );
    assert_eq!(
        split_frame(&good),
        Err(SplitError::Truncated { have: 12, need: 22 })
    );
}
