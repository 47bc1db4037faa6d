//! Test support for baton's test suites.
//!
//! What it is: small, documented helpers that tests across the workspace share —
//!
//! * [`netns`]: put the calling test thread into its own network namespace (loopback
//!   only, `lo` up) so tests can bind fixed ports, use TCP_REPAIR and filters without
//!   touching the host or each other; raise the open-file limit for big tests.
//! * [`tcp`]: connected loopback TCP pairs (IPv4, IPv6, v4-mapped), a "deaf" peer that
//!   never acknowledges anything, queue-length ioctls, the kernel TCP state and
//!   `TCP_INFO`, and polling helpers with timeouts.
//! * [`netstat`]: the namespace's TCP and device counters (what `nstat` shows), to say
//!   why traffic did not arrive.
//! * [`pattern`]: a deterministic byte stream whose every byte can be checked, plus
//!   writer/reader helpers that stream it over sockets and verify what arrives.
//!
//! What it is not: a TCP_REPAIR library (that is `baton-tcp-repair`) — the kernel-facts
//! suite in `tests/` deliberately talks to the kernel through `libc` directly.
//!
//! Library code here never panics on a failed system call: every fallible helper
//! returns `io::Result` with a message naming the step that failed.

pub mod hostflows;
pub mod netns;
pub mod netstat;
pub mod pattern;
pub mod peer;
pub mod tcp;
