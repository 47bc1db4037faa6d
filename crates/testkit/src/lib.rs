//! Test support (filled in by the testkit work).
