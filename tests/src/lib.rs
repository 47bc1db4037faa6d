//! Workspace integration tests; this library is empty on purpose.
//!
//! The tests live in `tests/tests/*.rs` of this package:
//!
//! * `kernel_facts.rs` pins each kernel TCP_REPAIR behaviour baton relies on (one test
//!   per fact, named after it, citing the reference section and experiment). Run as root:
//!   `cargo test -p baton-tests --test kernel_facts`.
