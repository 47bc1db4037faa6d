//! The frame that carries one helper-protocol message.
//!
//! ```text
//!  0        4            8          10         12
//!  +--------+------------+----------+----------+------------------------+
//!  | "BTRP" | body_len   | fd_count | reserved | body (bincode message) |
//!  | magic  | u32 LE     | u16 LE   | u16 = 0  | body_len bytes         |
//!  +--------+------------+----------+----------+------------------------+
//! ```
//!
//! The file descriptors of a frame travel as `SCM_RIGHTS` ancillary data attached to its
//! first byte. `fd_count` says how many the sender attached, so the receiver can tell a
//! lost or smuggled descriptor from a correct frame: the count received must equal the
//! count announced. At most [`MAX_FDS`] descriptors per frame (the kernel's `SCM_MAX_FD`).
//! The magic lets a peer that speaks something else entirely be told apart at once,
//! instead of being read as a huge length.

/// Magic bytes at the start of every frame.
pub const MAGIC: [u8; 4] = *b"BTRP";
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 12;
/// Most file descriptors one frame may carry (`SCM_MAX_FD` in the kernel).
pub const MAX_FDS: usize = 253;
/// Largest body a frame may have: room for a batch whose queues add up to
/// [`crate::tcp::MAX_BATCH_QUEUE_BYTES`] plus the fixed part of every state.
pub const MAX_BODY_LEN: u32 = 160 << 20;

/// The fixed header in front of every frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Length of the body that follows.
    pub body_len: u32,
    /// Number of file descriptors attached to the frame.
    pub fd_count: u16,
}

/// A frame header that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame: bad magic {0:02x?} (peer does not speak the baton-repair protocol)")]
    BadMagic([u8; 4]),
    #[error("frame: body of {0} bytes exceeds the limit of {MAX_BODY_LEN}")]
    TooLarge(u32),
    #[error("frame: {0} file descriptors exceed the limit of {MAX_FDS}")]
    TooManyFds(u16),
    #[error("frame: reserved field is {0:#06x}, must be 0")]
    Reserved(u16),
}

impl FrameHeader {
    /// A header for a body of `body_len` bytes carrying `fd_count` descriptors.
    pub fn new(body_len: usize, fd_count: usize) -> Result<Self, FrameError> {
        let body_len = u32::try_from(body_len).unwrap_or(u32::MAX);
        if body_len > MAX_BODY_LEN {
            return Err(FrameError::TooLarge(body_len));
        }
        let fd_count = u16::try_from(fd_count).unwrap_or(u16::MAX);
        if usize::from(fd_count) > MAX_FDS {
            return Err(FrameError::TooManyFds(fd_count));
        }
        Ok(Self { body_len, fd_count })
    }

    /// The header as it goes on the wire.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..8].copy_from_slice(&self.body_len.to_le_bytes());
        out[8..10].copy_from_slice(&self.fd_count.to_le_bytes());
        out
    }

    /// Parse and check a header received from a peer.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self, FrameError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let body_len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let fd_count = u16::from_le_bytes([bytes[8], bytes[9]]);
        let reserved = u16::from_le_bytes([bytes[10], bytes[11]]);
        if reserved != 0 {
            return Err(FrameError::Reserved(reserved));
        }
        if body_len > MAX_BODY_LEN {
            return Err(FrameError::TooLarge(body_len));
        }
        if usize::from(fd_count) > MAX_FDS {
            return Err(FrameError::TooManyFds(fd_count));
        }
        Ok(Self { body_len, fd_count })
    }
}

/// Split a complete frame held in memory into its header and body (used by the fuzzer
/// and by tests; the socket transport reads header and body separately).
pub fn split_frame(bytes: &[u8]) -> Result<(FrameHeader, &[u8]), SplitError> {
    let head: &[u8; HEADER_LEN] = bytes
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(SplitError::Truncated {
            have: bytes.len(),
            need: HEADER_LEN,
        })?;
    let header = FrameHeader::parse(head)?;
    let end = HEADER_LEN + header.body_len as usize;
    let body = bytes.get(HEADER_LEN..end).ok_or(SplitError::Truncated {
        have: bytes.len(),
        need: end,
    })?;
    if bytes.len() != end {
        return Err(SplitError::Trailing(bytes.len() - end));
    }
    Ok((header, body))
}

/// A byte buffer that is not exactly one frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error(transparent)]
    Header(#[from] FrameError),
    #[error("frame: truncated, {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    #[error("frame: {0} bytes after the end of the frame")]
    Trailing(usize),
}
