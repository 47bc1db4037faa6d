//! `baton-repair-ipc`: how the backend and the `baton-repair` helper talk.
//!
//! * [`transport`]: one frame (header + bincode body) with its file descriptors as
//!   `SCM_RIGHTS`, sent and received over a UNIX stream socket, with deadlines. Both the
//!   helper and the backend use it.
//! * [`client`]: the backend's side: [`client::RepairListener`] (the `*.repair` socket a
//!   helper connects to), [`client::RepairClient::spawn`] (start a helper on a
//!   socketpair), and the batched operations (dump, thaw, restore, set repair).
//!
//! What it is not: it performs no repair operation itself and holds no privilege. The
//! message types and their limits live in `baton-proto`; the helper's server loop lives
//! in the `baton-repair` crate.

pub mod client;
pub mod transport;

pub use client::{ClientError, RepairClient, RepairListener};
pub use transport::{ReceivedFrame, TransportError};
