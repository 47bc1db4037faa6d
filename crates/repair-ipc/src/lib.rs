//! Transport and client (filled in by the helper work).
