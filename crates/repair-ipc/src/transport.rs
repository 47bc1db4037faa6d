//! Frames over a UNIX stream socket, with file descriptors as `SCM_RIGHTS`.
//!
//! Theory of operation:
//!
//! ```text
//!  send:    sendmsg([header | body], SCM_RIGHTS fds)   -- fds ride on the first byte
//!           send(rest) ... send(rest)                    -- if the kernel took only part
//!  receive: recvmsg(12 header bytes)   -> parse, check  -- fds usually arrive here
//!           recvmsg(body, growing)     -> any fds on any chunk are collected too
//! ```
//!
//! * One frame = the 12-byte [`FrameHeader`] followed by `body_len` bytes of bincode body.
//!   The descriptors are attached to the first `sendmsg`; the kernel delivers them with
//!   the first byte of that write. The receiver nevertheless collects descriptors from
//!   every `recvmsg` of the frame, so a peer that attaches them to a later chunk cannot
//!   smuggle them past the count check: every descriptor is wrapped in an [`OwnedFd`] the
//!   moment it is received (so each one is closed whatever happens next), and
//!   [`ReceivedFrame::fd_count_matches`] compares what arrived with what the header
//!   announced. `MSG_CTRUNC` (descriptors dropped by the kernel because they did not fit)
//!   is reported, never ignored.
//! * The receiver reads exactly one frame and never a byte past it, so descriptors of a
//!   following frame stay queued in the kernel for the next call.
//! * The body buffer grows with the bytes that actually arrive (doubling, capped at the
//!   announced length): a peer that announces [`baton_proto::frame::MAX_BODY_LEN`] and
//!   sends nothing costs nothing.
//! * Every socket call uses `MSG_DONTWAIT` and waits with `poll`, so an optional deadline
//!   bounds each whole send or receive, whether the socket is blocking or not. `EINTR`
//!   is retried. Sends use `MSG_NOSIGNAL`: a vanished peer is an `EPIPE` error, not a
//!   signal.
//! * End of stream before the first header byte is a clean close (`Ok(None)`); so is
//!   `ECONNRESET` there (the peer closed with our last reply unread). End of stream in
//!   the middle of a frame is [`TransportError::Truncated`].

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use baton_proto::frame::{FrameError, FrameHeader, HEADER_LEN, MAX_FDS};
use baton_proto::EncodeError;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use serde::Serialize;

/// First read window for a frame body; the window then doubles with what was received.
const FIRST_BODY_WINDOW: usize = 64 << 10;

/// A frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A system call failed.
    #[error("{step}: {errno}")]
    Sys { step: &'static str, errno: Errno },
    /// The deadline passed before the operation completed.
    #[error("{step}: timed out")]
    TimedOut { step: &'static str },
    /// The peer closed the connection in the middle of a frame.
    #[error("receive frame: connection closed mid-frame after {have} of {need} bytes")]
    Truncated { have: usize, need: usize },
    /// The received header is not acceptable; the stream is out of sync.
    #[error("receive frame: {0}")]
    BadHeader(FrameError),
    /// The frame we were asked to send breaks a frame limit.
    #[error("send frame: {0}")]
    OutgoingFrame(FrameError),
    /// The message we were asked to send could not be encoded.
    #[error("send frame: {0}")]
    Encode(EncodeError),
}

impl TransportError {
    /// Whether the error means that the peer has gone away (closed or reset).
    pub fn is_peer_gone(&self) -> bool {
        match self {
            TransportError::Truncated { .. } => true,
            TransportError::Sys { errno, .. } => {
                matches!(errno, Errno::EPIPE | Errno::ECONNRESET)
            }
            _ => false,
        }
    }
}

/// One frame as it arrived, with every descriptor that came along.
#[derive(Debug)]
pub struct ReceivedFrame {
    pub header: FrameHeader,
    pub body: Vec<u8>,
    /// Descriptors received during the frame, in arrival order (at most
    /// [`MAX_FDS`]; any beyond were closed at once and counted in `fds_discarded`).
    pub fds: Vec<OwnedFd>,
    /// Descriptors received beyond [`MAX_FDS`], closed on arrival.
    pub fds_discarded: usize,
    /// The kernel set `MSG_CTRUNC`: some descriptors did not fit and were lost.
    pub control_truncated: bool,
}

impl ReceivedFrame {
    /// How many descriptors arrived (kept or discarded).
    pub fn fds_received(&self) -> usize {
        self.fds.len() + self.fds_discarded
    }

    /// Whether exactly the announced descriptors arrived, and nothing was truncated.
    pub fn fd_count_matches(&self) -> bool {
        !self.control_truncated && self.fds_received() == usize::from(self.header.fd_count)
    }
}

/// Encode `message` and send it as one frame with `fds` attached.
pub fn send_message<T: Serialize>(
    sock: BorrowedFd<'_>,
    message: &T,
    fds: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
) -> Result<(), TransportError> {
    let body = baton_proto::encode(message).map_err(TransportError::Encode)?;
    send_frame(sock, &body, fds, deadline)
}

/// Send one frame: header and `body`, with `fds` attached as `SCM_RIGHTS` to its first
/// byte. Handles partial writes; gives up with [`TransportError::TimedOut`] at `deadline`.
pub fn send_frame(
    sock: BorrowedFd<'_>,
    body: &[u8],
    fds: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
) -> Result<(), TransportError> {
    let header = FrameHeader::new(body.len(), fds.len()).map_err(TransportError::OutgoingFrame)?;
    let head = header.to_bytes();
    let raw_fds: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let total = HEADER_LEN + body.len();
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;

    // The first write carries the descriptors; once it has moved at least one byte they
    // are in flight, and the rest of the frame goes without ancillary data.
    let mut sent = loop {
        let iov = [IoSlice::new(&head), IoSlice::new(body)];
        let rights = [ControlMessage::ScmRights(&raw_fds)];
        let cmsgs: &[ControlMessage<'_>] = if raw_fds.is_empty() { &[] } else { &rights };
        match sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, cmsgs, flags, None) {
            Ok(n) => break n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                wait_ready(sock, PollFlags::POLLOUT, deadline, "send frame: poll")?
            }
            Err(errno) => {
                return Err(TransportError::Sys {
                    step: "send frame: sendmsg",
                    errno,
                })
            }
        }
    };
    while sent < total {
        let head_rest = head.get(sent..).unwrap_or(&[]);
        let body_rest = body.get(sent.saturating_sub(HEADER_LEN)..).unwrap_or(&[]);
        let iov = [IoSlice::new(head_rest), IoSlice::new(body_rest)];
        match sendmsg::<UnixAddr>(sock.as_raw_fd(), &iov, &[], flags, None) {
            Ok(n) => sent += n,
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                wait_ready(sock, PollFlags::POLLOUT, deadline, "send frame: poll")?
            }
            Err(errno) => {
                return Err(TransportError::Sys {
                    step: "send frame: send",
                    errno,
                })
            }
        }
    }
    Ok(())
}

/// Receive one frame. `Ok(None)` when the peer closed the connection cleanly before the
/// first byte of a frame. The header is checked ([`TransportError::BadHeader`]); the
/// descriptor count is not (see [`ReceivedFrame::fd_count_matches`]).
pub fn recv_frame(
    sock: BorrowedFd<'_>,
    deadline: Option<Instant>,
) -> Result<Option<ReceivedFrame>, TransportError> {
    let mut fds = FdCollector::default();

    let mut head = Vec::with_capacity(HEADER_LEN);
    while head.len() < HEADER_LEN {
        match recv_into_spare(sock, &mut head, HEADER_LEN, &mut fds, deadline) {
            Ok(0) if head.is_empty() => return Ok(None),
            Err(TransportError::Sys {
                errno: Errno::ECONNRESET,
                ..
            }) if head.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(TransportError::Truncated {
                    have: head.len(),
                    need: HEADER_LEN,
                })
            }
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
    let head: [u8; HEADER_LEN] =
        head.as_slice()
            .try_into()
            .map_err(|_| TransportError::Truncated {
                have: 0,
                need: HEADER_LEN,
            })?;
    let header = FrameHeader::parse(&head).map_err(TransportError::BadHeader)?;

    let body_len = header.body_len as usize;
    let mut body = Vec::new();
    while body.len() < body_len {
        let window = (body_len - body.len()).min(body.len().max(FIRST_BODY_WINDOW));
        body.reserve_exact(window);
        let target = body.len() + window;
        let n = recv_into_spare(sock, &mut body, target, &mut fds, deadline)?;
        if n == 0 {
            return Err(TransportError::Truncated {
                have: HEADER_LEN + body.len(),
                need: HEADER_LEN + body_len,
            });
        }
    }

    Ok(Some(ReceivedFrame {
        header,
        body,
        fds: fds.kept,
        fds_discarded: fds.discarded,
        control_truncated: fds.control_truncated,
    }))
}

/// Descriptors gathered over the `recvmsg` calls of one frame.
#[derive(Default)]
struct FdCollector {
    kept: Vec<OwnedFd>,
    discarded: usize,
    control_truncated: bool,
}

impl FdCollector {
    fn push(&mut self, fd: OwnedFd) {
        if self.kept.len() < MAX_FDS {
            self.kept.push(fd);
        } else {
            // Dropping closes it.
            self.discarded += 1;
        }
    }
}

/// Room for the largest `SCM_RIGHTS` message a frame may carry, as `u64`s so that the
/// buffer is aligned for `cmsghdr`.
const CONTROL_WORDS: usize = (MAX_FDS * 4 + 64) / 8;

/// One `recvmsg` into the spare capacity of `buf`, at most up to `target` bytes in
/// total, waiting (until `deadline`) for data. Returns the byte count, 0 at end of stream.
fn recv_into_spare(
    sock: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    target: usize,
    fds: &mut FdCollector,
    deadline: Option<Instant>,
) -> Result<usize, TransportError> {
    let filled = buf.len();
    let spare = buf.spare_capacity_mut();
    let want = spare.len().min(target.saturating_sub(filled));
    if want == 0 {
        return Ok(0);
    }
    loop {
        match recvmsg_with_fds(sock, &mut spare[..want], fds) {
            Ok(n) => {
                // SAFETY: recvmsg wrote `n` bytes (n <= want <= spare capacity) at the start
                // of the spare capacity, so the first `filled + n` elements are initialised.
                unsafe { buf.set_len(filled + n) };
                return Ok(n);
            }
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                wait_ready(sock, PollFlags::POLLIN, deadline, "receive frame: poll")?
            }
            Err(errno) => {
                return Err(TransportError::Sys {
                    step: "receive frame: recvmsg",
                    errno,
                })
            }
        }
    }
}

/// `recvmsg(MSG_DONTWAIT | MSG_CMSG_CLOEXEC)` into `dest`, wrapping every received
/// descriptor in an [`OwnedFd`] at once — also when the kernel set `MSG_CTRUNC` (nix's
/// control-message iterator refuses to walk a truncated buffer, which would leak the
/// descriptors that did arrive, hence the direct libc call).
fn recvmsg_with_fds(
    sock: BorrowedFd<'_>,
    dest: &mut [MaybeUninit<u8>],
    fds: &mut FdCollector,
) -> Result<usize, Errno> {
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: dest.as_mut_ptr().cast(),
        iov_len: dest.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;

    // SAFETY: `msg` points to one iovec covering `dest` (writable, `dest.len()` bytes) and
    // to `control` (writable, msg_controllen bytes, aligned for cmsghdr); both outlive the
    // call. No address buffer is passed.
    let received = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    let received = usize::try_from(received).map_err(|_| Errno::last())?;

    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        fds.control_truncated = true;
    }
    // SAFETY: the kernel filled `msg.msg_control`/`msg_controllen` with well-formed
    // control messages inside `control`; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // msg_controllen, and CMSG_DATA of an SCM_RIGHTS message holds
    // (cmsg_len - CMSG_LEN(0)) / 4 descriptors that this process now owns (installed with
    // O_CLOEXEC), each wrapped exactly once. Reads are unaligned-safe.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let hdr = &*cmsg;
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                let data_len = (hdr.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..data_len / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    if raw >= 0 {
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(received)
}

/// Wait until `sock` is ready for `events`, or fail at `deadline`.
fn wait_ready(
    sock: BorrowedFd<'_>,
    events: PollFlags,
    deadline: Option<Instant>,
    step: &'static str,
) -> Result<(), TransportError> {
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(TransportError::TimedOut { step });
                }
                // Round up so that a sub-millisecond remainder does not spin.
                let millis = left.as_millis().saturating_add(1);
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut pollfds = [PollFd::new(sock, events)];
        match poll(&mut pollfds, timeout) {
            // Readiness, or POLLHUP/POLLERR: the next socket call reports which.
            Ok(n) if n > 0 => return Ok(()),
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(errno) => return Err(TransportError::Sys { step, errno }),
        }
    }
}

/// `Instant::now() + timeout`, or `None` (no deadline) when that would overflow.
pub fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().expect("socketpair")
    }

    fn soon() -> Option<Instant> {
        deadline_after(Duration::from_secs(5))
    }

    #[test]
    fn frame_with_fds_round_trips() {
        let (a, b) = pair();
        let (p1, p2) = UnixStream::pair().expect("pair");
        send_frame(a.as_fd(), b"hello body", &[p1.as_fd(), p2.as_fd()], soon()).expect("send");
        let frame = recv_frame(b.as_fd(), soon()).expect("recv").expect("frame");
        assert_eq!(frame.body, b"hello body");
        assert_eq!(frame.header.fd_count, 2);
        assert_eq!(frame.fds.len(), 2);
        assert!(frame.fd_count_matches());
    }

    #[test]
    fn empty_body_without_fds_round_trips() {
        let (a, b) = pair();
        send_frame(a.as_fd(), b"", &[], soon()).expect("send");
        let frame = recv_frame(b.as_fd(), soon()).expect("recv").expect("frame");
        assert!(frame.body.is_empty());
        assert!(frame.fds.is_empty());
        assert!(frame.fd_count_matches());
    }

    #[test]
    fn large_body_survives_partial_writes() {
        let (a, b) = pair();
        let body: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
        let expected = body.clone();
        let sender = std::thread::spawn(move || send_frame(a.as_fd(), &body, &[], soon()));
        let frame = recv_frame(b.as_fd(), soon()).expect("recv").expect("frame");
        sender.join().expect("join").expect("send");
        assert_eq!(frame.body, expected);
    }

    #[test]
    fn clean_eof_before_a_frame_is_none() {
        let (a, b) = pair();
        drop(a);
        assert!(recv_frame(b.as_fd(), soon()).expect("recv").is_none());
    }

    #[test]
    fn eof_inside_header_is_truncated() {
        let (mut a, b) = pair();
        a.write_all(&b"BTRP"[..]).expect("write");
        drop(a);
        let err = recv_frame(b.as_fd(), soon()).expect_err("must fail");
        assert!(
            matches!(err, TransportError::Truncated { have: 4, need: 12 }),
            "{err}"
        );
    }

    #[test]
    fn eof_inside_body_is_truncated() {
        let (mut a, b) = pair();
        let head = FrameHeader::new(100, 0).expect("header").to_bytes();
        a.write_all(&head).expect("write");
        a.write_all(&[7u8; 10]).expect("write");
        drop(a);
        let err = recv_frame(b.as_fd(), soon()).expect_err("must fail");
        assert!(
            matches!(
                err,
                TransportError::Truncated {
                    have: 22,
                    need: 112
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_magic_is_bad_header() {
        let (mut a, b) = pair();
        a.write_all(b"XXXX\0\0\0\0\0\0\0\0").expect("write");
        let err = recv_frame(b.as_fd(), soon()).expect_err("must fail");
        assert!(
            matches!(err, TransportError::BadHeader(FrameError::BadMagic(_))),
            "{err}"
        );
    }

    #[test]
    fn huge_announced_body_is_not_allocated_up_front() {
        let (mut a, b) = pair();
        let head = FrameHeader::new(baton_proto::frame::MAX_BODY_LEN as usize, 0)
            .expect("header")
            .to_bytes();
        a.write_all(&head).expect("write");
        a.write_all(&[1u8; 100]).expect("write");
        drop(a);
        // Truncated, and quickly: nothing near 160 MiB was touched.
        let err = recv_frame(b.as_fd(), soon()).expect_err("must fail");
        assert!(
            matches!(err, TransportError::Truncated { have: 112, .. }),
            "{err}"
        );
    }

    #[test]
    fn receive_times_out_at_the_deadline() {
        let (_a, b) = pair();
        let start = Instant::now();
        let err = recv_frame(b.as_fd(), deadline_after(Duration::from_millis(100)))
            .expect_err("must time out");
        assert!(matches!(err, TransportError::TimedOut { .. }), "{err}");
        assert!(start.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn send_times_out_when_the_peer_does_not_read() {
        let (a, _b) = pair();
        let body = vec![0u8; 16 << 20];
        let err = send_frame(
            a.as_fd(),
            &body,
            &[],
            deadline_after(Duration::from_millis(100)),
        )
        .expect_err("must time out");
        assert!(matches!(err, TransportError::TimedOut { .. }), "{err}");
    }

    #[test]
    fn fds_attached_to_a_body_chunk_are_collected_and_counted() {
        let (a, b) = pair();
        let (p1, _p2) = UnixStream::pair().expect("pair");
        // Header says 0 descriptors; one rides on the body.
        let head = FrameHeader::new(4, 0).expect("header").to_bytes();
        sendmsg::<UnixAddr>(
            a.as_raw_fd(),
            &[IoSlice::new(&head)],
            &[],
            MsgFlags::empty(),
            None,
        )
        .expect("send head");
        let raw = [p1.as_raw_fd()];
        sendmsg::<UnixAddr>(
            a.as_raw_fd(),
            &[IoSlice::new(b"body")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("send body");
        let frame = recv_frame(b.as_fd(), soon()).expect("recv").expect("frame");
        assert_eq!(frame.fds.len(), 1);
        assert!(!frame.fd_count_matches());
    }

    #[test]
    fn control_buffer_fits_the_largest_scm_rights_message() {
        // SAFETY: CMSG_SPACE is pure arithmetic.
        let needed = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
        assert!(CONTROL_WORDS * 8 >= needed);
    }

    #[test]
    fn fds_beyond_the_limit_are_closed_and_counted() {
        let (a, b) = pair();
        let (p1, _p2) = UnixStream::pair().expect("pair");
        let many: Vec<BorrowedFd<'_>> = (0..MAX_FDS).map(|_| p1.as_fd()).collect();
        // A 1-byte body on its own write with 10 more descriptors.
        let head = FrameHeader::new(1, MAX_FDS).expect("header").to_bytes();
        let raw: Vec<RawFd> = many.iter().map(|fd| fd.as_raw_fd()).collect();
        sendmsg::<UnixAddr>(
            a.as_raw_fd(),
            &[IoSlice::new(&head)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .expect("send head");
        sendmsg::<UnixAddr>(
            a.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &[ControlMessage::ScmRights(&raw[..10])],
            MsgFlags::empty(),
            None,
        )
        .expect("send body");
        let frame = recv_frame(b.as_fd(), soon()).expect("recv").expect("frame");
        assert_eq!(frame.fds.len(), MAX_FDS);
        assert_eq!(frame.fds_discarded, 10);
        assert!(!frame.fd_count_matches());
    }

    #[test]
    fn next_frame_and_its_fds_stay_queued() {
        let (a, b) = pair();
        let (p1, _p2) = UnixStream::pair().expect("pair");
        send_frame(a.as_fd(), b"one", &[], soon()).expect("send");
        send_frame(a.as_fd(), b"two", &[p1.as_fd()], soon()).expect("send");
        let first = recv_frame(b.as_fd(), soon()).expect("recv").expect("frame");
        assert_eq!(first.body, b"one");
        assert!(first.fds.is_empty());
        let second = recv_frame(b.as_fd(), soon()).expect("recv").expect("frame");
        assert_eq!(second.body, b"two");
        assert_eq!(second.fds.len(), 1);
    }

    #[test]
    fn received_fds_are_close_on_exec() {
        let (a, b) = pair();
        let (p1, _p2) = UnixStream::pair().expect("pair");
        send_frame(a.as_fd(), b"x", &[p1.as_fd()], soon()).expect("send");
        let frame = recv_frame(b.as_fd(), soon()).expect("recv").expect("frame");
        let flags = nix::fcntl::fcntl(frame.fds[0].as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD)
            .expect("F_GETFD");
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn send_to_a_closed_peer_is_epipe_not_sigpipe() {
        let (a, b) = pair();
        drop(b);
        let err = send_frame(a.as_fd(), b"x", &[], soon()).expect_err("must fail");
        assert!(err.is_peer_gone(), "{err}");
    }

    #[test]
    fn works_with_std_io_on_the_other_end() {
        let (mut a, b) = pair();
        let sender = std::thread::spawn(move || {
            send_frame(b.as_fd(), b"abc", &[], soon()).expect("send");
        });
        let mut raw = [0u8; HEADER_LEN + 3];
        a.read_exact(&mut raw).expect("read");
        sender.join().expect("join");
        let (header, body) = baton_proto::frame::split_frame(&raw).expect("split");
        assert_eq!(header.body_len, 3);
        assert_eq!(body, b"abc");
    }
}
