//! `validate` catches every inconsistency a hostile or buggy peer could send.

mod common;

use baton_proto::frame::MAX_FDS;
use baton_proto::repair::{Hello, Request, RequestError};
use baton_proto::tcp::{Endpoint, StateError, TcpState, WindowScale, MAX_QUEUE_BYTES};
use common::sample_state;

#[test]
fn the_sample_state_is_valid() {
    sample_state().validate().expect("valid");
}

#[test]
fn oversized_queues_are_rejected() {
    let mut s = sample_state();
    s.recv_queue = vec![0; MAX_QUEUE_BYTES + 1];
    assert!(matches!(
        s.validate(),
        Err(StateError::QueueTooLarge {
            which: "receive",
            ..
        })
    ));
}

#[test]
fn unsent_beyond_the_queue_is_rejected() {
    let mut s = sample_state();
    s.send_unsent = 4;
    assert!(matches!(
        s.validate(),
        Err(StateError::UnsentBeyondQueue { .. })
    ));
}

#[test]
fn endpoints_must_match_the_family() {
    let mut s = sample_state();
    s.peer = Endpoint::V6 {
        addr: [0; 16],
        port: 1,
        flowinfo: 0,
        scope_id: 0,
    };
    assert!(matches!(
        s.validate(),
        Err(StateError::EndpointFamily { which: "peer", .. })
    ));
}

#[test]
fn sequence_span_must_match_the_send_queue() {
    let mut s = sample_state();
    s.write_seq = s.write_seq.wrapping_add(1);
    assert!(matches!(s.validate(), Err(StateError::SendSpan { .. })));
    // With our FIN sent, the span counts the FIN too.
    s.state = TcpState::FinWait1;
    s.validate().expect("FIN_WAIT1: data + FIN");
    // FIN acknowledged: nothing left.
    s.state = TcpState::FinWait2;
    s.send_queue.clear();
    s.send_unsent = 0;
    s.snd_una = s.write_seq;
    s.validate().expect("FIN_WAIT2, empty");
    assert_eq!(
        s.send_queue_start(),
        s.write_seq.wrapping_sub(1),
        "FIN is resent from its own sequence number"
    );
}

#[test]
fn bad_options_are_rejected() {
    let mut s = sample_state();
    s.options.wscale = Some(WindowScale { snd: 15, rcv: 0 });
    assert_eq!(s.validate(), Err(StateError::WindowScale(15)));
    let mut s = sample_state();
    s.sockopts.congestion = "x".repeat(16);
    assert_eq!(s.validate(), Err(StateError::CongestionName(16)));
    s.sockopts.congestion = "cu\0bic".into();
    assert_eq!(s.validate(), Err(StateError::CongestionNul));
}

#[test]
fn requests_check_descriptor_counts() {
    let restore = Request::Restore(vec![sample_state(), sample_state()]);
    assert_eq!(
        restore.validate(1),
        Err(RequestError::StateCount { states: 2, fds: 1 })
    );
    restore.validate(2).expect("two states, two fds");
    assert!(matches!(
        Request::Dump.validate(MAX_FDS + 1),
        Err(RequestError::TooManyFds { .. })
    ));
    let hello = Request::Hello(Hello::ours(0));
    assert!(matches!(
        hello.validate(1),
        Err(RequestError::FdCount { .. })
    ));
    let long = Request::Hello(Hello {
        software: "x".repeat(65),
        ..Hello::ours(0)
    });
    assert_eq!(long.validate(0), Err(RequestError::SoftwareTooLong(65)));
}

#[test]
fn version_negotiation_picks_the_highest_common_version() {
    let ours = Hello::ours(0);
    assert_eq!(
        ours.negotiate().expect("compatible"),
        baton_proto::repair::PROTOCOL_VERSION_MAX
    );
    let future = Hello {
        min_version: 50,
        max_version: 60,
        ..Hello::ours(0)
    };
    let err = future.negotiate().expect_err("incompatible");
    assert!(err.message.contains("50..=60"), "{err}");
    let inverted = Hello {
        min_version: 2,
        max_version: 1,
        ..Hello::ours(0)
    };
    assert!(inverted.negotiate().is_err());
}

#[test]
fn freeze_check_needs_one_mark_per_socket_and_version_2() {
    use baton_proto::repair::ProgressMark;
    let mark = ProgressMark {
        state: 1,
        segs_in: 1,
        segs_out: 2,
        inq: 0,
        outq: 0,
    };
    let check = Request::FreezeCheck(vec![mark; 3]);
    check.validate(3).expect("three marks, three fds");
    assert_eq!(
        check.validate(2),
        Err(RequestError::MarkCount { marks: 3, fds: 2 })
    );
    assert!(matches!(
        Request::FreezeCheck(vec![mark; MAX_FDS + 1]).validate(MAX_FDS + 1),
        Err(RequestError::TooManyFds { .. })
    ));
    Request::PreDump.validate(MAX_FDS).expect("a full batch");
    assert_eq!(check.since_version(), 2);
    assert_eq!(Request::PreDump.since_version(), 2);
    assert_eq!(Request::Dump.since_version(), 1);
    assert_eq!(Request::Freeze.since_version(), 1);
}
