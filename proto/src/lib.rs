//! `baton-proto`: every type that crosses a baton process boundary.
//!
//! * [`repair`]: the protocol between the unprivileged backend and the privileged
//!   `baton-repair` helper (requests, replies, hello/version negotiation).
//! * [`frame`]: the length-prefixed frame that carries one protocol message (and the
//!   file descriptors that travel with it over `SCM_RIGHTS`).
//! * [`tcp`]: the complete state of one kernel TCP connection as the helper dumps and
//!   restores it. The migration stream will carry the same type.
//! * [`codec`]: the single bincode configuration every message uses, with size limits.
//! * [`migration`]: the migration stream (header, self-delimiting records, checksum) that
//!   carries the device state from the source backend to the target through QEMU.
//!
//! What this crate is not: it opens no sockets and makes no system calls. It is pure data
//! plus encode/decode, so that it can be fuzzed and frozen with golden byte vectors.
//! Everything here is untrusted on decode: [`codec::decode`] bounds allocations, rejects
//! trailing bytes, and every decoded message is checked with its `validate` method before
//! anyone acts on it.

pub mod codec;
pub mod frame;
pub mod migration;
pub mod repair;
pub mod tcp;

pub use codec::{decode, encode, DecodeError, EncodeError};
