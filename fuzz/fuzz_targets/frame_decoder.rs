//! Fuzz the helper protocol's decoding path with arbitrary bytes: split a frame, then
//! decode its body as a request (and validate it against the announced descriptor
//! count) and as a reply (and validate any states in it). None of it may panic, and a
//! decoded message must encode back to the same bytes.

#![no_main]

use baton_proto::frame::split_frame;
use baton_proto::repair::{request_tag, Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((header, body)) = split_frame(data) else {
        return;
    };
    let _ = request_tag(body);
    if let Ok(request) = baton_proto::decode::<Request>(body) {
        let _ = request.validate(usize::from(header.fd_count));
        let _ = request.name();
        let again = baton_proto::encode(&request).expect("a decoded request encodes");
        assert_eq!(again, body, "request round trip");
    }
    if let Ok(reply) = baton_proto::decode::<Reply>(body) {
        if let Reply::Dumped(states) = &reply {
            for state in states.iter().flatten() {
                let _ = state.validate();
            }
        }
        let again = baton_proto::encode(&reply).expect("a decoded reply encodes");
        assert_eq!(again, body, "reply round trip");
    }
});
