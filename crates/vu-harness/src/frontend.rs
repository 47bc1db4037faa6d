//! The vhost-user frontend: set-up in QEMU 10's order, frames in and out, dirty log.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestRam;
use crate::queue::{Desc, DriverQueue, VIRTQ_DESC_F_WRITE};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_NET_F_GUEST_ANNOUNCE: u64 = 1 << 21;
/// The device completes partial checksums of transmitted frames.
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// The driver accepts frames the device marks `DATA_VALID` (or leaves partial).
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// `virtio_net_hdr_v1.flags` bits.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VNET_HDR_LEN: usize = 12;
/// A frame from the device with its virtio-net header.
pub type ReceivedFrame = ([u8; VNET_HDR_LEN], Vec<u8>);
/// `SET_VRING_ENABLE` request number.
const SET_VRING_ENABLE: u32 = 18;

const RX: usize = 0;
const TX: usize = 1;
const TX_BUF_LEN: u64 = 68 << 10;
const TX_SLOTS: u16 = 64;

/// Something the harness could not do.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("set-up: {0}")]
    Setup(String),
    #[error("vhost-user {step}: {source}")]
    VhostUser {
        step: &'static str,
        source: vhost::Error,
    },
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("malformed frame from the backend: {0}")]
    BadFrame(String),
}

fn vu(step: &'static str) -> impl FnOnce(vhost::Error) -> HarnessError {
    move |source| HarnessError::VhostUser { step, source }
}

/// How to set the device up.
#[derive(Debug, Clone)]
pub struct FrontendOptions {
    pub queue_size: u16,
    pub ram_size: u64,
    /// Size of each receive buffer the driver posts.
    pub rx_buf_len: u32,
    pub mrg_rxbuf: bool,
    pub event_idx: bool,
    /// Send SET_VRING_ENABLE before SET_FEATURES, as QEMU 10 does.
    pub enable_before_features: bool,
    /// Negotiate `VIRTIO_NET_F_CSUM` (if offered): [`crate::smol::GuestNic`] then sends
    /// TCP and UDP with partial checksums.
    pub csum: bool,
    /// Negotiate `VIRTIO_NET_F_GUEST_CSUM` (if offered): [`crate::smol::GuestNic`] then
    /// verifies only frames not marked `DATA_VALID`.
    pub guest_csum: bool,
}

/// Environment variable that turns on both checksum offloads in
/// [`FrontendOptions::default`] (`1`), so that benches and tests built on the default
/// options can be measured with offloads as a Linux guest on QEMU negotiates them.
pub const CSUM_ENV: &str = "BATON_HARNESS_CSUM";

impl Default for FrontendOptions {
    /// No offloads, unless [`CSUM_ENV`] is `1`.
    fn default() -> Self {
        let csum = std::env::var(CSUM_ENV).is_ok_and(|v| v == "1");
        FrontendOptions {
            queue_size: 256,
            ram_size: 16 << 20,
            rx_buf_len: 4096,
            mrg_rxbuf: true,
            event_idx: true,
            enable_before_features: true,
            csum,
            guest_csum: csum,
        }
    }
}

/// QEMU's dirty log: one bit per 4 KiB guest page, in a memfd shared with the backend.
pub struct DirtyLog {
    file: File,
    map: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this struct and only read through atomic byte loads.
unsafe impl Send for DirtyLog {}

impl DirtyLog {
    fn new(ram_size: u64) -> Result<Self, HarnessError> {
        let pages = ram_size.div_ceil(4096);
        let len = (pages.div_ceil(8) as usize).next_multiple_of(4096);
        let fd = nix::sys::memfd::memfd_create(
            c"baton-dirty-log",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| HarnessError::Setup(format!("log memfd: {e}")))?;
        let file = File::from(fd);
        file.set_len(len as u64)
            .map_err(|e| HarnessError::Setup(format!("log size: {e}")))?;
        // SAFETY: mapping a file we own, shared, for its whole length.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(HarnessError::Setup(format!(
                "log mmap: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(DirtyLog {
            file,
            map: map.cast(),
            len,
        })
    }

    /// Guest-physical page numbers marked dirty; clears the log.
    pub fn take_dirty_pages(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for i in 0..self.len {
            // SAFETY: i < len, inside the mapping; the backend sets bits atomically.
            let byte = unsafe { &*(self.map.add(i) as *const std::sync::atomic::AtomicU8) };
            let bits = byte.swap(0, Ordering::SeqCst);
            for b in 0..8 {
                if bits & (1 << b) != 0 {
                    pages.push((i * 8 + b) as u64);
                }
            }
        }
        pages
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.map.cast(), self.len) };
    }
}

/// A connected, running virtio-net device seen from the driver's side.
pub struct NetFrontend {
    pub fe: Frontend,
    raw: UnixStream,
    pub ram: GuestRam,
    pub rx: DriverQueue,
    pub tx: DriverQueue,
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    _err: EventFd,
    rx_bufs: u64,
    rx_buf_len: u32,
    tx_bufs: u64,
    tx_free: Vec<u16>,
    /// Completed receive chains not yet assembled into a frame.
    rx_pending: VecDeque<(u16, u32)>,
    pub acked_features: u64,
    pub options: FrontendOptions,
    pub log: Option<DirtyLog>,
}

impl NetFrontend {
    /// Connect to the backend at `path` and bring the device up.
    pub fn connect(path: &Path, options: FrontendOptions) -> Result<Self, HarnessError> {
        Self::connect_with(path, options, |_| Ok(()))
    }

    /// [`NetFrontend::connect`], running `before_start` where a migration target's QEMU
    /// loads the device state: after the initial messages, before `SET_FEATURES`, guest
    /// memory and ring set-up (reference rust-vmm.md §4.3).
    pub fn connect_with(
        path: &Path,
        options: FrontendOptions,
        before_start: impl FnOnce(&mut NetFrontend) -> Result<(), HarnessError>,
    ) -> Result<Self, HarnessError> {
        let stream = UnixStream::connect(path)
            .map_err(|e| HarnessError::Setup(format!("connect {}: {e}", path.display())))?;
        let raw = stream
            .try_clone()
            .map_err(|e| HarnessError::Setup(format!("dup socket: {e}")))?;
        let mut fe = Frontend::from_stream(stream, 2);
        let ram = GuestRam::new(options.ram_size)?;
        let q = options.queue_size;
        let rx = DriverQueue::new(0, q);
        let tx = DriverQueue::new(DriverQueue::footprint(q), q);
        let rx_bufs = 1 << 20;
        let tx_bufs = rx_bufs + u64::from(q) * u64::from(options.rx_buf_len);
        if tx_bufs + u64::from(TX_SLOTS) * TX_BUF_LEN > options.ram_size {
            return Err(HarnessError::Setup(
                "guest RAM too small for the buffers".into(),
            ));
        }
        let ev =
            || EventFd::new(EFD_NONBLOCK).map_err(|e| HarnessError::Setup(format!("eventfd: {e}")));
        let kicks = [ev()?, ev()?];
        let calls = [ev()?, ev()?];
        let err = ev()?;

        // QEMU 10's order (reference rust-vmm.md §4.3).
        let offered = fe.get_features().map_err(vu("GET_FEATURES"))?;
        let proto = fe
            .get_protocol_features()
            .map_err(vu("GET_PROTOCOL_FEATURES"))?;
        let want_proto = proto
            & (VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::LOG_SHMFD
                | VhostUserProtocolFeatures::DEVICE_STATE
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
        fe.set_protocol_features(want_proto)
            .map_err(vu("SET_PROTOCOL_FEATURES"))?;
        fe.get_queue_num().map_err(vu("GET_QUEUE_NUM"))?;
        fe.get_max_mem_slots().map_err(vu("GET_MAX_MEM_SLOTS"))?;
        fe.set_owner().map_err(vu("SET_OWNER"))?;
        fe.get_features().map_err(vu("GET_FEATURES"))?;
        for i in [RX, TX] {
            fe.set_vring_call(i, &calls[i])
                .map_err(vu("SET_VRING_CALL"))?;
            fe.set_vring_err(i, &err).map_err(vu("SET_VRING_ERR"))?;
        }
        let mut acked = VIRTIO_F_VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if options.mrg_rxbuf {
            acked |= VIRTIO_NET_F_MRG_RXBUF;
        }
        if options.event_idx {
            acked |= VIRTIO_RING_F_EVENT_IDX;
        }
        if options.csum {
            acked |= VIRTIO_NET_F_CSUM;
        }
        if options.guest_csum {
            acked |= VIRTIO_NET_F_GUEST_CSUM;
        }
        acked &= offered;
        let mut dev = NetFrontend {
            fe,
            raw,
            ram,
            rx,
            tx,
            kicks,
            calls,
            _err: err,
            rx_bufs,
            rx_buf_len: options.rx_buf_len,
            tx_bufs,
            tx_free: (0..TX_SLOTS.min(q)).rev().collect(),
            rx_pending: VecDeque::new(),
            acked_features: acked,
            options: options.clone(),
            log: None,
        };
        if options.enable_before_features {
            // The vhost crate's frontend refuses this order, so write the messages by hand.
            for i in [RX, TX] {
                dev.raw_request(
                    SET_VRING_ENABLE,
                    &[(i as u32).to_le_bytes(), 1u32.to_le_bytes()].concat(),
                )?;
            }
        }
        before_start(&mut dev)?;
        dev.fe.set_features(acked).map_err(vu("SET_FEATURES"))?;
        if !options.enable_before_features {
            for i in [RX, TX] {
                dev.fe
                    .set_vring_enable(i, true)
                    .map_err(vu("SET_VRING_ENABLE"))?;
            }
        }
        let region = dev
            .ram
            .mem
            .find_region(GuestAddress(0))
            .ok_or_else(|| HarnessError::Setup("no RAM region".into()))?;
        let info =
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(vu("region info"))?;
        dev.fe.add_mem_region(&info).map_err(vu("ADD_MEM_REG"))?;
        for i in [RX, TX] {
            dev.start_ring(i)?;
        }
        dev.post_all_rx_buffers()?;
        Ok(dev)
    }

    fn host_addr(&self, gpa: u64) -> Result<u64, HarnessError> {
        self.ram
            .mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|e| HarnessError::Setup(format!("host address of {gpa:#x}: {e}")))
    }

    fn start_ring(&mut self, i: usize) -> Result<(), HarnessError> {
        let q = if i == RX { &self.rx } else { &self.tx };
        let config = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.host_addr(q.desc_table)?,
            used_ring_addr: self.host_addr(q.used_ring)?,
            avail_ring_addr: self.host_addr(q.avail_ring)?,
            log_addr: None,
        };
        self.fe
            .set_vring_num(i, q.size)
            .map_err(vu("SET_VRING_NUM"))?;
        self.fe.set_vring_base(i, 0).map_err(vu("SET_VRING_BASE"))?;
        self.fe
            .set_vring_addr(i, &config)
            .map_err(vu("SET_VRING_ADDR"))?;
        self.fe
            .set_vring_kick(i, &self.kicks[i])
            .map_err(vu("SET_VRING_KICK"))?;
        self.fe
            .set_vring_call(i, &self.calls[i])
            .map_err(vu("SET_VRING_CALL"))?;
        Ok(())
    }

    /// Send a vhost-user request by hand (no reply requested).
    pub fn raw_request(&mut self, request: u32, body: &[u8]) -> Result<(), HarnessError> {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes()); // version 1, no NEED_REPLY
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        self.raw
            .write_all(&msg)
            .map_err(|e| HarnessError::Setup(format!("raw request {request}: {e}")))
    }

    fn rx_buf_addr(&self, id: u16) -> u64 {
        self.rx_bufs + u64::from(id) * u64::from(self.rx_buf_len)
    }

    fn post_rx_buffer(&mut self, id: u16) {
        let desc = Desc {
            addr: self.rx_buf_addr(id),
            len: self.rx_buf_len,
            flags: VIRTQ_DESC_F_WRITE,
            next: 0,
        };
        self.rx.write_desc(&self.ram.mem, id, desc);
        self.rx.push_avail(&self.ram.mem, id);
    }

    fn post_all_rx_buffers(&mut self) -> Result<(), HarnessError> {
        self.rx.set_used_event(&self.ram.mem);
        self.tx.set_used_event(&self.ram.mem);
        for id in 0..self.rx.size {
            self.post_rx_buffer(id);
        }
        self.kick(RX)
    }

    pub fn kick(&self, i: usize) -> Result<(), HarnessError> {
        self.kicks[i]
            .write(1)
            .map_err(|e| HarnessError::Setup(format!("kick: {e}")))
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.pop_used(&self.ram.mem) {
            self.tx_free.push(id);
        }
    }

    /// Transmit one Ethernet frame (a zero virtio-net header is prepended).
    pub fn send_frame(&mut self, frame: &[u8]) -> Result<(), HarnessError> {
        self.send_frame_with_header(&[0; VNET_HDR_LEN], frame)
    }

    /// Transmit one Ethernet frame after the virtio-net header `hdr` (taken as it is:
    /// tests may send headers a real driver would not).
    pub fn send_frame_with_header(
        &mut self,
        hdr: &[u8; VNET_HDR_LEN],
        frame: &[u8],
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let slot = loop {
            self.reclaim_tx();
            if let Some(slot) = self.tx_free.pop() {
                break slot;
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("a free transmit descriptor"));
            }
            wait_readable(&self.calls[TX], Duration::from_millis(10));
        };
        let addr = self.tx_bufs + u64::from(slot) * TX_BUF_LEN;
        let len = VNET_HDR_LEN + frame.len();
        if len as u64 > TX_BUF_LEN {
            return Err(HarnessError::Setup(format!(
                "frame of {} bytes too large",
                frame.len()
            )));
        }
        let mut buf = vec![0u8; len];
        buf[..VNET_HDR_LEN].copy_from_slice(hdr);
        buf[VNET_HDR_LEN..].copy_from_slice(frame);
        self.ram
            .mem
            .write_slice(&buf, GuestAddress(addr))
            .map_err(|e| HarnessError::Setup(format!("write frame: {e}")))?;
        self.send_chain(
            slot,
            &[Desc {
                addr,
                len: len as u32,
                flags: 0,
                next: 0,
            }],
        )
    }

    /// Put an arbitrary descriptor chain (head index `head`, using consecutive table
    /// entries from `head`) on the transmit queue: for malformed-descriptor tests.
    pub fn send_chain(&mut self, head: u16, descs: &[Desc]) -> Result<(), HarnessError> {
        for (k, d) in descs.iter().enumerate() {
            self.tx.write_desc(&self.ram.mem, head + k as u16, *d);
        }
        self.tx.push_avail(&self.ram.mem, head);
        self.kick(TX)
    }

    /// Wait until the backend returned every transmit buffer.
    pub fn wait_tx_done(&mut self, timeout: Duration) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reclaim_tx();
            if self.tx.last_used() == self.tx.avail_idx() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout("transmit buffers to come back"));
            }
            wait_readable(&self.calls[TX], Duration::from_millis(10));
        }
    }

    /// The next frame from the backend, without its virtio-net header, if one arrives
    /// within `timeout`.
    pub fn recv_frame(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>, HarnessError> {
        Ok(self
            .recv_frame_with_header(timeout)?
            .map(|(_, frame)| frame))
    }

    /// [`NetFrontend::recv_frame`] with the frame's virtio-net header.
    pub fn recv_frame_with_header(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ReceivedFrame>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.try_recv_frame_with_header()? {
                return Ok(Some(frame));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            wait_readable(
                &self.calls[RX],
                (deadline - now).min(Duration::from_millis(20)),
            );
        }
    }

    /// A frame if one is complete now.
    pub fn try_recv_frame(&mut self) -> Result<Option<Vec<u8>>, HarnessError> {
        Ok(self.try_recv_frame_with_header()?.map(|(_, frame)| frame))
    }

    /// [`NetFrontend::try_recv_frame`] with the frame's virtio-net header.
    pub fn try_recv_frame_with_header(&mut self) -> Result<Option<ReceivedFrame>, HarnessError> {
        while let Some(used) = self.rx.pop_used(&self.ram.mem) {
            self.rx_pending.push_back(used);
        }
        let Some(&(head, len)) = self.rx_pending.front() else {
            return Ok(None);
        };
        if (len as usize) < VNET_HDR_LEN {
            return Err(HarnessError::BadFrame(format!(
                "first buffer holds {len} bytes, less than the header"
            )));
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        self.ram
            .mem
            .read_slice(&mut hdr, GuestAddress(self.rx_buf_addr(head)))
            .map_err(|e| HarnessError::BadFrame(e.to_string()))?;
        let num_buffers = u16::from_le_bytes([hdr[10], hdr[11]]) as usize;
        if num_buffers == 0 || (!self.options.mrg_rxbuf && num_buffers != 1) {
            return Err(HarnessError::BadFrame(format!(
                "num_buffers = {num_buffers}"
            )));
        }
        if self.rx_pending.len() < num_buffers {
            return Ok(None);
        }
        let mut frame = Vec::new();
        for k in 0..num_buffers {
            let Some((id, len)) = self.rx_pending.pop_front() else {
                return Err(HarnessError::BadFrame("chain vanished".into()));
            };
            let mut data = vec![0u8; len as usize];
            self.ram
                .mem
                .read_slice(&mut data, GuestAddress(self.rx_buf_addr(id)))
                .map_err(|e| HarnessError::BadFrame(e.to_string()))?;
            frame.extend_from_slice(if k == 0 { &data[VNET_HDR_LEN..] } else { &data });
            self.post_rx_buffer(id);
        }
        self.kick(RX)?;
        Ok(Some((hdr, frame)))
    }

    /// Whether the device and this driver agreed on `feature` (a `VIRTIO_*_F_*` mask).
    pub fn negotiated(&self, feature: u64) -> bool {
        self.acked_features & feature == feature
    }

    /// Turn on QEMU-style dirty logging: SET_LOG_BASE with a shared log, then
    /// SET_FEATURES with LOG_ALL.
    pub fn start_dirty_log(&mut self) -> Result<(), HarnessError> {
        let log = DirtyLog::new(self.ram.size)?;
        let region = VhostUserDirtyLogRegion {
            mmap_size: log.len as u64,
            mmap_offset: 0,
            mmap_handle: log.file.as_raw_fd(),
        };
        self.fe
            .set_log_base(0, Some(region))
            .map_err(vu("SET_LOG_BASE"))?;
        self.acked_features |= VhostUserVirtioFeatures::LOG_ALL.bits();
        self.fe
            .set_features(self.acked_features)
            .map_err(vu("SET_FEATURES(LOG_ALL)"))?;
        self.log = Some(log);
        Ok(())
    }

    /// Guest-physical addresses of the receive buffers (to compare with dirty pages).
    pub fn rx_buffer_range(&self) -> std::ops::Range<u64> {
        self.rx_bufs..self.rx_bufs + u64::from(self.rx.size) * u64::from(self.rx_buf_len)
    }

    /// Stop both rings the way QEMU does before a SAVE: `GET_VRING_BASE` per ring.
    /// Returns the next available index of each ring (RX, TX).
    pub fn stop_rings(&mut self) -> Result<[u32; 2], HarnessError> {
        let rx = self.fe.get_vring_base(RX).map_err(vu("GET_VRING_BASE"))?;
        let tx = self.fe.get_vring_base(TX).map_err(vu("GET_VRING_BASE"))?;
        Ok([rx, tx])
    }

    /// SAVE the device state (QEMU's `vhost_save_backend_state`): hand the backend the
    /// write end of a pipe, read to EOF, then `CHECK_DEVICE_STATE`.
    pub fn save_state(&mut self) -> Result<Vec<u8>, HarnessError> {
        save_device_state(&self.fe)
    }

    /// LOAD a device state (QEMU's `vhost_load_backend_state`): hand the backend the
    /// read end of a pipe, write `state` and close, then `CHECK_DEVICE_STATE`.
    pub fn load_state(&mut self, state: &[u8]) -> Result<(), HarnessError> {
        load_device_state(&self.fe, state)
    }

    /// Send a vhost-user request by hand with one file descriptor attached (no reply
    /// requested): for requests the vhost crate's frontend refuses to build.
    pub fn raw_request_with_fd(
        &mut self,
        request: u32,
        body: &[u8],
        fd: BorrowedFd<'_>,
    ) -> Result<(), HarnessError> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&request.to_le_bytes());
        msg.extend_from_slice(&1u32.to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        let fds = [fd.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(&msg)];
        let sent = sendmsg::<()>(self.raw.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .map_err(|e| HarnessError::Setup(format!("raw request {request}: {e}")))?;
        if sent != msg.len() {
            return Err(HarnessError::Setup(format!(
                "raw request {request}: sent {sent} of {} bytes",
                msg.len()
            )));
        }
        Ok(())
    }

    pub fn call_fd(&self, i: usize) -> BorrowedFd<'_> {
        // SAFETY: the eventfd lives as long as self.
        unsafe { BorrowedFd::borrow_raw(self.calls[i].as_raw_fd()) }
    }
}

fn pipe() -> Result<(File, File), HarnessError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| HarnessError::Setup(format!("pipe: {e}")))?;
    Ok((File::from(r), File::from(w)))
}

/// `SET_DEVICE_STATE_FD(SAVE)` on `fe` with the write end of a fresh pipe (a backend
/// that returns its own fd is refused); returns the read end.
fn start_save(fe: &Frontend) -> Result<File, HarnessError> {
    let (reader, writer) = pipe()?;
    let theirs = fe
        .set_device_state_fd(
            VhostTransferStateDirection::SAVE,
            VhostTransferStatePhase::STOPPED,
            writer.into(),
        )
        .map_err(vu("SET_DEVICE_STATE_FD(SAVE)"))?;
    if theirs.is_some() {
        return Err(HarnessError::Setup("backend returned its own fd".into()));
    }
    Ok(reader)
}

/// `SET_DEVICE_STATE_FD(LOAD)` on `fe` with the read end of a fresh pipe; returns the
/// write end.
fn start_load(fe: &Frontend) -> Result<File, HarnessError> {
    let (reader, writer) = pipe()?;
    let theirs = fe
        .set_device_state_fd(
            VhostTransferStateDirection::LOAD,
            VhostTransferStatePhase::STOPPED,
            reader.into(),
        )
        .map_err(vu("SET_DEVICE_STATE_FD(LOAD)"))?;
    if theirs.is_some() {
        return Err(HarnessError::Setup("backend returned its own fd".into()));
    }
    Ok(writer)
}

/// SAVE through `fe` (see [`NetFrontend::save_state`]); usable before the device is up.
pub fn save_device_state(fe: &Frontend) -> Result<Vec<u8>, HarnessError> {
    let mut reader = start_save(fe)?;
    let mut state = Vec::new();
    reader
        .read_to_end(&mut state)
        .map_err(|e| HarnessError::Setup(format!("read device state: {e}")))?;
    fe.check_device_state()
        .map_err(vu("CHECK_DEVICE_STATE(SAVE)"))?;
    Ok(state)
}

/// LOAD through `fe` (see [`NetFrontend::load_state`]); usable before the device is up,
/// as QEMU does on a migration target.
pub fn load_device_state(fe: &Frontend, state: &[u8]) -> Result<(), HarnessError> {
    let mut writer = start_load(fe)?;
    // The backend reads on its own thread, so a large state does not block here for long;
    // a backend that stopped reading makes this fail with EPIPE (then CHECK says why).
    let written = writer.write_all(state);
    drop(writer);
    let checked = fe
        .check_device_state()
        .map_err(vu("CHECK_DEVICE_STATE(LOAD)"));
    checked?;
    written.map_err(|e| HarnessError::Setup(format!("write device state: {e}")))
}

/// What [`migrate_device_state`] measured, each from its start.
#[derive(Debug, Clone, Copy)]
pub struct TransferTimes {
    /// The source's first bytes arrived: the target's LOAD starts here.
    pub first_bytes: Duration,
    /// The source's stream ended (EOF) and its `CHECK_DEVICE_STATE` succeeded.
    pub saved: Duration,
    /// The target's `CHECK_DEVICE_STATE` succeeded: the device state is in place.
    pub loaded: Duration,
    /// Stream length in bytes.
    pub bytes: u64,
}

/// Move the device state from `source` to `target` with a pause after the source's
/// first chunk, for tests of a target that comes early: the first chunk the source
/// writes (its pipe holds a page while it writes its prefix, see baton's `migrate::save`)
/// goes straight to the target's LOAD, then `paused` runs (a test waits there until the
/// source saw the target come — the source waits too, its prefix not read to the end),
/// then the rest passes on as it comes. Returns the whole stream.
pub fn migrate_device_state_early(
    source: &Frontend,
    target: &Frontend,
    paused: impl FnOnce(),
) -> Result<Vec<u8>, HarnessError> {
    let mut from_source = start_save(source)?;
    let mut to_target = start_load(target)?;
    let mut stream = Vec::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut written: Result<(), std::io::Error> = Ok(());
    let mut paused = Some(paused);
    loop {
        let len = match from_source.read(&mut chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HarnessError::Setup(format!("read device state: {e}"))),
            Ok(0) => break,
            Ok(len) => len,
        };
        stream.extend_from_slice(&chunk[..len]);
        if written.is_ok() {
            written = to_target.write_all(&chunk[..len]);
        }
        if let Some(paused) = paused.take() {
            paused();
        }
    }
    let saved_check = source
        .check_device_state()
        .map_err(vu("CHECK_DEVICE_STATE(SAVE)"));
    drop(to_target);
    let loaded_check = target
        .check_device_state()
        .map_err(vu("CHECK_DEVICE_STATE(LOAD)"));
    saved_check?;
    loaded_check?;
    written.map_err(|e| HarnessError::Setup(format!("write device state: {e}")))?;
    Ok(stream)
}

/// QEMU's `IO_BUF_SIZE`: a `QEMUFile` writes its buffer out when this much is in it.
const QEMU_FILE_BUFFER: u64 = 32 << 10;

/// Move the device state from `source` to `target` the way QEMU 10 does in a live
/// migration (`vhost_save_backend_state` on the source, `vhost_load_backend_state` on the
/// target, the migration channel in between): the source's pipe is read in chunks of
/// whatever it holds, at most 1 MiB, each put into the migration stream as a be32 length
/// and the bytes, and passed on to the target while the source still writes. QEMU's
/// target starts its LOAD when the device's section arrives, which is when the source
/// has produced its first bytes; here LOAD starts at the first chunk.
///
/// What reaches the target when follows QEMU's buffering: the source's `QEMUFile` sends
/// its 32 KiB buffer only when it is full (`qemu_put_buffer`, `add_buf_to_iovec`), and
/// the target writes a chunk into the backend's pipe only once the whole chunk has
/// arrived (`qemu_get_buffer` of its length). So a chunk reaches the target once the
/// stream has been filled up to the 32 KiB boundary after it (the section starting at a
/// boundary here), or at the end. The stream's transfer, reading and validation overlap
/// the source's writing of it, as they do between two QEMUs. Either side's failure is
/// returned (the source's first).
pub fn migrate_device_state(
    source: &Frontend,
    target: &Frontend,
) -> Result<TransferTimes, HarnessError> {
    const CHUNK: usize = 1 << 20;
    let started = Instant::now();
    let mut from_source = start_save(source)?;
    let mut chunk = vec![0u8; CHUNK];
    let read_chunk = |from: &mut File, chunk: &mut [u8]| loop {
        match from.read(chunk) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => {
                return other.map_err(|e| HarnessError::Setup(format!("read device state: {e}")))
            }
        }
    };
    let mut len = read_chunk(&mut from_source, &mut chunk)?;
    let first_bytes = started.elapsed();
    let mut to_target = start_load(target)?;
    let mut bytes = 0u64;
    // A target that stopped reading (it refused the stream) makes the write fail with
    // EPIPE; the source is still read to its end, and the target's CHECK says why.
    let mut written: Result<(), std::io::Error> = Ok(());
    // Chunks put into the migration stream but not yet complete at the target, with the
    // stream offset of their end; and how much of the stream has been put.
    let mut in_flight: std::collections::VecDeque<(u64, Vec<u8>)> = Default::default();
    let mut put = 0u64;
    let mut pass_on = |in_flight: &mut std::collections::VecDeque<(u64, Vec<u8>)>,
                       sent_up_to: u64| {
        while in_flight.front().is_some_and(|(end, _)| *end <= sent_up_to) {
            if let Some((_, data)) = in_flight.pop_front() {
                if written.is_ok() {
                    written = to_target.write_all(&data);
                }
            }
        }
    };
    while len > 0 {
        bytes += len as u64;
        put += 4 + len as u64;
        in_flight.push_back((put, chunk[..len].to_vec()));
        pass_on(&mut in_flight, put - put % QEMU_FILE_BUFFER);
        len = read_chunk(&mut from_source, &mut chunk)?;
    }
    // The end of the section flushes the rest.
    pass_on(&mut in_flight, u64::MAX);
    let saved_check = source
        .check_device_state()
        .map_err(vu("CHECK_DEVICE_STATE(SAVE)"));
    let saved = started.elapsed();
    drop(to_target);
    let loaded_check = target
        .check_device_state()
        .map_err(vu("CHECK_DEVICE_STATE(LOAD)"));
    let loaded = started.elapsed();
    saved_check?;
    loaded_check?;
    written.map_err(|e| HarnessError::Setup(format!("write device state: {e}")))?;
    Ok(TransferTimes {
        first_bytes,
        saved,
        loaded,
        bytes,
    })
}

fn wait_readable(ev: &EventFd, timeout: Duration) {
    // SAFETY: the eventfd outlives this call.
    let fd = unsafe { BorrowedFd::borrow_raw(ev.as_raw_fd()) };
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let _ = poll(&mut fds, PollTimeout::from(ms));
    let _ = ev.read();
}
