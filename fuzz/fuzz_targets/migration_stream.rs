//! Fuzz the migration stream reader with arbitrary bytes. It must never panic, and a
//! stream it accepts must write back to exactly the same bytes once any skipped records
//! are accounted for (the writer is canonical: it emits records in a fixed order, so the
//! check is that re-encoding the accepted state reads back to the same state).

#![no_main]

use baton_proto::migration::{decode_stream, encode_stream, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits, so the fuzzer also reaches the limit checks.
    let limits = Limits {
        max_stream_bytes: 1 << 16,
        max_records: 64,
        max_record_bytes: 1 << 14,
        max_small_record_bytes: 1 << 12,
    };
    let _ = baton_proto::migration::decode_stream_with_limits(data, &limits);
    let Ok(state) = decode_stream(data) else {
        return;
    };
    let again = encode_stream(&state).expect("an accepted state encodes");
    let mut back = decode_stream(&again).expect("a re-encoded state reads back");
    back.skipped = state.skipped.clone();
    assert_eq!(back, state, "round trip of an accepted stream");
});
