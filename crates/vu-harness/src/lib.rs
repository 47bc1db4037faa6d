//! A vhost-user-net *frontend* for tests: it plays QEMU and the guest driver at once.
//!
//! * [`GuestRam`]: guest memory in a memfd, shared with the backend like QEMU's
//!   `memory-backend-memfd,share=on`.
//! * [`DriverQueue`]: the driver side of one split virtqueue living in that memory.
//! * [`NetFrontend`]: connects to a backend's socket, runs the vhost-user set-up in the
//!   order QEMU 10 uses (including `SET_VRING_ENABLE` before `SET_FEATURES`), posts
//!   receive buffers, sends and receives Ethernet frames, and can turn on QEMU-style
//!   dirty logging and read the log back.
//! * [`smol::GuestNic`]: a smoltcp `phy::Device` on top, so a user-space TCP/IP stack can
//!   be the guest.
//!
//! * [`csum`]: checksum offload as a driver does it (partial checksums on transmit,
//!   verification of frames not marked `DATA_VALID` on receive).
//!
//! What it is not: a complete virtio driver. It negotiates VERSION_1, MRG_RXBUF,
//! EVENT_IDX, LOG_ALL and, when [`FrontendOptions`] ask for them, the checksum offloads
//! (CSUM, GUEST_CSUM), and nothing else.

pub mod csum;
pub mod frontend;
pub mod memory;
pub mod queue;
pub mod smol;

pub use frontend::{
    migrate_device_state, migrate_device_state_early, FrontendOptions, HarnessError, NetFrontend,
    TransferTimes,
};
pub use memory::GuestRam;
pub use queue::DriverQueue;
