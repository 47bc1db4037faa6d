//! Guest memory backed by a memfd, as QEMU's `memory-backend-memfd,share=on`.

use std::fs::File;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::frontend::HarnessError;

/// Guest RAM: one region at guest-physical address 0.
pub struct GuestRam {
    pub mem: GuestMemoryMmap<()>,
    pub size: u64,
}

impl GuestRam {
    pub fn new(size: u64) -> Result<Self, HarnessError> {
        let fd = nix::sys::memfd::memfd_create(
            c"baton-guest-ram",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| HarnessError::Setup(format!("memfd_create: {e}")))?;
        let file = File::from(fd);
        file.set_len(size)
            .map_err(|e| HarnessError::Setup(format!("memfd set_len: {e}")))?;
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| HarnessError::Setup(format!("mmap guest memory: {e}")))?;
        Ok(GuestRam { mem, size })
    }
}
