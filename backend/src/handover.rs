//! Same-host handover of live TCP sockets between two baton processes (issue 5).
//!
//! # Theory of operation
//!
//! When source and target backend run on the same host, in the same network namespace,
//! nothing needs to be dumped or restored: the target simply takes the source's live
//! sockets (`SCM_RIGHTS`). No privilege is involved, there is no gap, and the 4-tuple is
//! never free.
//!
//! ```text
//!  source (SAVE, VM stopped)                       target (LOAD, rings not started)
//!  HandoverOffer::listen: endpoint in the stream's prefix (written before freezing)
//!  freeze: every flow made deaf (TCP-MD5 key, see `attach_deaf_filter`)
//!  HandoverOffer::lend(the flows' own sockets)
//!   └ abstract UNIX listener "\0baton-handover-…"
//!     + 32-byte random token  ── both in the stream's SourceRecord ──▶ TakeOver::start
//!                                                   as soon as the stream's SOURCE record
//!                                                   is read (the rest still arriving):
//!                                                   connect (abstract names are scoped
//!                                                   to the network namespace: reaching
//!                                                   it proves the namespace is shared)
//!   peer uid == ours?  ◀──────────── Hello { token }
//!   token right (once)?
//!   Sockets { flows } + fds ─────────────────────▶ each fd on arrival: inspected (TCP
//!   … (≤ MAX_FDS per frame)                        socket, same namespace, addresses)
//!   Done { total } ──────────────────────────────▶ and thawed (receiving thread)
//!                                                   … stream read and validated …
//!                                                   TakeOver::finish: every record has
//!                                                   exactly its socket, addresses equal
//!   ownership recorded ◀──────────── Taken { flows }
//!   Released ────────────────────────────────────▶ flows rebuilt
//! ```
//!
//! * Nothing moves before the target has the whole stream validated: the sockets travel
//!   while it is read (that is the point: the exchange overlaps the stream instead of
//!   following it), but only `Taken` transfers ownership. A stream that fails, or any
//!   other failure of the LOAD, drops the [`TakeOver`], which refuses: the source keeps
//!   everything. The source therefore waits for `Taken` longer than for other steps
//!   ([`TAKEN_TIMEOUT`]).
//! * The source's sockets stay frozen (deaf) from SAVE until one of two things happens:
//!   the target takes them ([`OfferStatus::Taken`]: the source drops its descriptors,
//!   which closes nothing because the target holds the same open file descriptions, and
//!   never thaws them), or the source VM resumes ([`HandoverOffer::cancel`] succeeds: the
//!   source thaws them and carries on). Both decisions go through one mutex,
//!   so they exclude each other; while sockets are on their way
//!   ([`OfferStatus::Busy`]) the source must wait for the outcome before thawing.
//! * The engine *lends* its flows' own descriptors to the offer ([`LentSocket`]) rather
//!   than duplicating them: one descriptor per connection, not two, so a source with
//!   the usual hard limit of 20,000 descriptors can migrate 10,000 connections. The
//!   price is a rule the lender keeps: it closes none of those descriptors until the
//!   offer has settled ([`HandoverOffer::settle`], [`HandoverOffer::cancel`] returning
//!   anything but [`OfferStatus::Busy`], or dropping the offer, which waits for a
//!   transfer under way). A transfer is bounded by its step timeouts.
//! * Sockets `baton-repair` dumped at SAVE are also in repair mode (see [`Repaired`] for
//!   why the source keeps them so): the offer thread ends repair mode through the
//!   helper (still deaf) frame by frame, right before sending each frame, so that the
//!   helper works on the next frame while the target checks this one; a cancel thaws
//!   them through it; a target never needs privilege.
//! * The target *uses* the sockets only after `Released`: from then on the source has
//!   recorded that it no longer owns them. Without `Released` the target closes its
//!   copies and fails: two owners would be worse than none. It thaws each socket (the
//!   freeze undone: it hears the peer again) on arrival, though, off the critical path:
//!   deafness only keeps a socket equal to its dump for a target on another host, and
//!   the stream with that dump went to this target, which takes the live socket; the
//!   kernel queues whatever arrives meanwhile, for whichever side ends up owning the
//!   socket (a refused handover leaves the source owning hearing sockets, which its
//!   resume would thaw anyway).
//! * Everything from the peer is untrusted and bounded: the peer's uid must be ours
//!   (`SO_PEERCRED`), the token is compared in constant time and consumed by the first
//!   correct attempt, every step has a deadline ([`STEP_TIMEOUT`]), messages are
//!   bounds-checked ([`HandoverMessage::validate`]), descriptor counts must match, and
//!   every received descriptor is owned at once (closed on any error).
//! * Only system calls of the sandbox's allow-list are used: `socket(AF_UNIX,
//!   SOCK_STREAM)`, `bind`, `listen`, `accept4`, `connect`, `sendmsg`/`recvmsg`, `poll`,
//!   `getsockname`, `getsockopt` (`SO_PEERCRED`, `SO_PEERNAME` instead of `getpeername`,
//!   `SO_DOMAIN`/`SO_TYPE`/`SO_PROTOCOL`, `SO_NETNS_COOKIE`), `setsockopt`
//!   (`TCP_MD5SIG`; `SO_ATTACH_FILTER`/`SO_DETACH_FILTER` where the kernel has no
//!   TCP-MD5), `getpeername`, `getrandom`, `clone` (the offer thread;
//!   on the target the thread that receives the sockets).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_proto::frame::MAX_FDS;
use baton_proto::migration::{
    FlowId, HandoverEndpoint, HandoverMessage, HostSocketEnds, RecordError, MAX_HANDOVER_FLOWS,
    MAX_HANDOVER_REASON,
};
use baton_proto::repair::RepairMode;
use baton_proto::DecodeError;
use baton_repair_ipc::transport::{self, TransportError};
use baton_repair_ipc::RepairClient;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, UnixAddr,
};

/// Deadline of each step of the exchange (one frame sent or received).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the source waits for `Taken` once every socket is sent: a target connects
/// as soon as the stream's SOURCE record arrives and confirms only after the whole
/// stream has been read and validated ([`TakeOver`]), which takes as long as QEMU needs
/// to pass the rest on. A target that fails or dies closes the connection, which ends
/// the wait at once; meanwhile a resuming source waits for the outcome. Also how long a
/// target that came early waits for the first sockets (the source still freezing).
pub const TAKEN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a source keeps its offer open if neither a target nor a resume comes.
pub const OFFER_LIFETIME: Duration = Duration::from_secs(600);
/// How often the offer thread looks at the shared state while no target connects.
const ACCEPT_POLL_MS: u16 = 100;
/// Prefix of the abstract socket names.
const NAME_PREFIX: &str = "baton-handover-";

/// A handover failed (the message is logged; LOAD fails with it).
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{step}: {source}")]
    Sys {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("handover transport: {0}")]
    Transport(#[from] TransportError),
    #[error("handover message: {0}")]
    Decode(#[from] DecodeError),
    #[error("handover message: {0}")]
    Bounds(#[from] RecordError),
    #[error("the peer closed the handover connection early")]
    Closed,
    #[error("the peer refused the handover: {0}")]
    Refused(String),
    #[error("the target's LOAD failed before it took the sockets")]
    Abandoned,
    #[error(
        "handover: connect to the source: {0} (not on this host, or not in this network \
         namespace?)"
    )]
    Unreachable(#[source] io::Error),
    #[error("unexpected handover message (wanted {0})")]
    Unexpected(&'static str),
    #[error("handover peer runs as uid {peer}, this backend as uid {ours}")]
    Uid { peer: u32, ours: u32 },
    #[error("wrong handover token")]
    Token,
    #[error("a frame announced {announced} descriptors for {flows} flows; {received} arrived")]
    FdCount {
        announced: usize,
        flows: usize,
        received: usize,
    },
    #[error("flow {0}: not in the stream, or sent twice")]
    UnknownFlow(u32),
    #[error("the source handed over {got} sockets, the stream lists {want}")]
    Incomplete { got: usize, want: usize },
    #[error("socket of flow {flow}: {reason}")]
    BadSocket { flow: u32, reason: String },
    #[error("more than {MAX_HANDOVER_FLOWS} flows")]
    TooMany,
    #[error("the offer is no longer open (taken, cancelled or expired)")]
    NotOpen,
    #[error("baton-repair: {0}")]
    Helper(String),
}

fn sys(step: &'static str) -> impl FnOnce(nix::errno::Errno) -> HandoverError {
    move |errno| HandoverError::Sys {
        step,
        source: io::Error::from(errno),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------
// Freezing
// ---------------------------------------------------------------------------------------

/// Make the socket deaf: every segment from its peer is dropped before TCP processes it —
/// no ACK, no queueing, no RST; the peer retransmits later. This is
/// `baton_tcp_repair::make_deaf`, the helper's own freeze: a TCP-MD5 key for the peer's
/// address that the peer does not have (unprivileged, so the backend freezes by itself
/// when there is no helper), or, where the kernel refuses keys, the drop-all socket filter
/// (which needs `CAP_NET_ADMIN` on recent kernels: EPERM here). The key disables GSO on
/// the socket for the rest of its life. (Named after the filter it used to be.)
pub fn attach_deaf_filter(fd: BorrowedFd<'_>) -> io::Result<()> {
    baton_tcp_repair::make_deaf(fd).map(drop).map_err(|e| {
        let kind = e.errno().map_or(io::ErrorKind::Other, |errno| {
            io::Error::from_raw_os_error(errno as i32).kind()
        });
        io::Error::new(kind, e)
    })
}

/// Make the socket hear again, however it was frozen (by [`attach_deaf_filter`], by the
/// helper, or by an older helper's filter): `baton_tcp_repair::make_hearing` removes the
/// key and detaches any filter; either one absent is fine. Unprivileged.
pub fn detach_filter(fd: BorrowedFd<'_>) -> io::Result<()> {
    baton_tcp_repair::make_hearing(fd).map_err(|e| {
        let kind = e.errno().map_or(io::ErrorKind::Other, |errno| {
            io::Error::from_raw_os_error(errno as i32).kind()
        });
        io::Error::new(kind, e)
    })
}

// ---------------------------------------------------------------------------------------
// Socket facts (getsockname, SO_PEERNAME, SO_DOMAIN, ...)
// ---------------------------------------------------------------------------------------

fn get_int(fd: BorrowedFd<'_>, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` live across the call; the kernel writes at most `len`
    // bytes into `value` and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A `sockaddr_storage` the kernel filled as an IPv4 or IPv6 address.
fn storage_to_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a `sockaddr_in`, the kernel wrote
            // at least its size, and `sockaddr_storage` is suitably aligned for it.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for `sockaddr_in6`.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                u32::from_be(sin6.sin6_flowinfo),
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The socket's local address (`getsockname`).
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    // SAFETY: an all-zero `sockaddr_storage` is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `storage` and `len` live across the call; the kernel writes at most `len`
    // bytes and updates `len`.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    storage_to_addr(&storage, len).ok_or_else(|| io::Error::other("not an IP socket"))
}

/// The socket's peer address, through `SO_PEERNAME` (the sandbox allows `getsockopt`,
/// not `getpeername`). The kernel refuses (`EINVAL`) a buffer longer than the address,
/// so the length comes from the socket's family.
pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    peer_addr_of(fd, get_int(fd, libc::SO_DOMAIN)?)
}

/// [`peer_addr`] of a socket whose address family (`SO_DOMAIN`) is known.
fn peer_addr_of(fd: BorrowedFd<'_>, domain: libc::c_int) -> io::Result<SocketAddr> {
    let want = match domain {
        libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
        libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
        _ => return Err(io::Error::other("not an IP socket")),
    };
    // SAFETY: an all-zero `sockaddr_storage` is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = want as libc::socklen_t;
    // SAFETY: `storage` and `len` live across the call; the kernel writes at most `len`
    // bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERNAME,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    storage_to_addr(&storage, len).ok_or_else(|| io::Error::other("not an IP socket"))
}

/// The host ends of a connected TCP socket, for its record.
pub fn socket_ends(fd: BorrowedFd<'_>) -> io::Result<HostSocketEnds> {
    use baton_proto::tcp::Endpoint;
    let local = local_addr(fd)?;
    // The local address tells the family: one `SO_DOMAIN` less per socket at SAVE.
    let domain = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    Ok(HostSocketEnds {
        local: Endpoint::from_socket_addr(local),
        peer: Endpoint::from_socket_addr(peer_addr_of(fd, domain)?),
    })
}

fn same_addr(a: SocketAddr, b: SocketAddr) -> bool {
    a.ip() == b.ip() && a.port() == b.port()
}

/// `SO_NETNS_COOKIE` of this thread's network namespace, through a throw-away socket.
fn netns_cookie_here() -> io::Result<u64> {
    let probe = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    crate::tcp::netns_cookie(probe.as_fd())
}

/// Check that a received descriptor is a connected TCP socket of this network namespace
/// whose addresses are exactly those of the record.
pub fn check_socket(fd: BorrowedFd<'_>, expected: &HostSocketEnds) -> Result<(), String> {
    let ours = netns_cookie_here().map_err(|e| format!("SO_NETNS_COOKIE here: {e}"))?;
    check_socket_in(fd, expected, ours)
}

/// [`check_socket`] with this namespace's cookie already known (a handover checks
/// thousands of sockets).
fn check_socket_in(fd: BorrowedFd<'_>, expected: &HostSocketEnds, ours: u64) -> Result<(), String> {
    let (local, peer) = inspect_socket(fd, ours)?;
    if !same_addr(local, expected.local.to_socket_addr())
        || !same_addr(peer, expected.peer.to_socket_addr())
    {
        return Err(format!(
            "addresses {local} -> {peer}, the record says {} -> {}",
            expected.local.to_socket_addr(),
            expected.peer.to_socket_addr()
        ));
    }
    Ok(())
}

/// The part of [`check_socket`] that needs no record: a connected TCP socket of the
/// network namespace whose cookie is `ours`. Returns its local and peer addresses.
fn inspect_socket(fd: BorrowedFd<'_>, ours: u64) -> Result<(SocketAddr, SocketAddr), String> {
    // getsockname tells the family (and fails the check for anything but IPv4/IPv6):
    // one `SO_DOMAIN` less per socket; a handover checks thousands. (`SO_TYPE` stays:
    // a raw socket of protocol `IPPROTO_TCP` can be connected too.)
    let local = local_addr(fd).map_err(|e| format!("getsockname: {e}"))?;
    let domain = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let kind = get_int(fd, libc::SO_TYPE).map_err(|e| format!("SO_TYPE: {e}"))?;
    let protocol = get_int(fd, libc::SO_PROTOCOL).map_err(|e| format!("SO_PROTOCOL: {e}"))?;
    if kind != libc::SOCK_STREAM || protocol != libc::IPPROTO_TCP {
        return Err(format!("type {kind}, protocol {protocol}: not TCP"));
    }
    let theirs = crate::tcp::netns_cookie(fd).map_err(|e| format!("SO_NETNS_COOKIE: {e}"))?;
    if theirs != ours {
        return Err("the socket belongs to another network namespace".into());
    }
    let peer =
        peer_addr_of(fd, domain).map_err(|e| format!("SO_PEERNAME (not connected?): {e}"))?;
    Ok((local, peer))
}

// ---------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------

fn deadline() -> Option<Instant> {
    transport::deadline_after(STEP_TIMEOUT)
}

fn send(
    sock: BorrowedFd<'_>,
    msg: &HandoverMessage,
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandoverError> {
    transport::send_message(sock, msg, fds, deadline())?;
    Ok(())
}

/// Receive one message and its descriptors (each owned at once), within [`STEP_TIMEOUT`].
fn recv(sock: BorrowedFd<'_>) -> Result<(HandoverMessage, Vec<OwnedFd>), HandoverError> {
    recv_within(sock, STEP_TIMEOUT)
}

/// [`recv`] with another timeout.
fn recv_within(
    sock: BorrowedFd<'_>,
    timeout: Duration,
) -> Result<(HandoverMessage, Vec<OwnedFd>), HandoverError> {
    let deadline = transport::deadline_after(timeout);
    let frame = transport::recv_frame(sock, deadline)?.ok_or(HandoverError::Closed)?;
    let msg: HandoverMessage = baton_proto::decode(&frame.body)?;
    msg.validate()?;
    if !frame.fd_count_matches() {
        return Err(HandoverError::FdCount {
            announced: usize::from(frame.header.fd_count),
            flows: 0,
            received: frame.fds_received(),
        });
    }
    if let HandoverMessage::Refused { reason } = msg {
        return Err(HandoverError::Refused(reason));
    }
    Ok((msg, frame.fds))
}

/// Tell the peer why, best effort.
fn refuse(sock: BorrowedFd<'_>, err: &HandoverError) {
    let mut reason = err.to_string();
    if reason.len() > MAX_HANDOVER_REASON {
        let mut cut = MAX_HANDOVER_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let reason = reason.replace('\0', " ");
    let _ = transport::send_message(sock, &HandoverMessage::Refused { reason }, &[], deadline());
}

fn peer_uid(sock: BorrowedFd<'_>) -> Result<u32, HandoverError> {
    let creds = getsockopt(&sock, sockopt::PeerCredentials).map_err(sys("SO_PEERCRED"))?;
    Ok(creds.uid())
}

fn check_uid(sock: BorrowedFd<'_>) -> Result<(), HandoverError> {
    let peer = peer_uid(sock)?;
    let ours = nix::unistd::geteuid().as_raw();
    if peer != ours {
        return Err(HandoverError::Uid { peer, ours });
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N], HandoverError> {
    let mut out = [0u8; N];
    let mut filled = 0;
    while filled < N {
        let rest = &mut out[filled..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes; the kernel writes at
        // most that many.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(HandoverError::Sys {
                step: "getrandom",
                source: err,
            });
        }
        filled += n as usize;
    }
    Ok(out)
}

fn tokens_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------
// Source side
// ---------------------------------------------------------------------------------------

/// One socket the source offers and owns through the offer (for a caller that has
/// nothing else to keep it in, e.g. a duplicate). The migration engine lends its
/// flows' own descriptors instead ([`LentSocket`]).
#[derive(Debug)]
pub struct OfferedSocket {
    pub flow: FlowId,
    pub socket: OwnedFd,
}

/// A flow's own socket, lent to an offer: the offer sends the very descriptor the flow
/// holds, so a migration needs one descriptor per connection, not two.
#[derive(Debug, Clone, Copy)]
pub struct LentSocket {
    pub flow: FlowId,
    fd: RawFd,
}

impl LentSocket {
    /// Lend `socket` for `flow`.
    ///
    /// # Safety
    ///
    /// The descriptor must stay open (not closed, not replaced) until the offer it goes
    /// into has settled: [`HandoverOffer::settle`] returned, [`HandoverOffer::cancel`] or
    /// [`HandoverOffer::withdraw`] returned something other than [`OfferStatus::Busy`], or
    /// the offer was dropped (its drop waits for a transfer under way).
    pub unsafe fn new(flow: FlowId, socket: BorrowedFd<'_>) -> Self {
        LentSocket {
            flow,
            fd: socket.as_raw_fd(),
        }
    }
}

/// A descriptor in an offer: owned by it, or lent by the engine.
#[derive(Debug)]
enum OfferFd {
    Owned(OwnedFd),
    Lent(RawFd),
}

impl OfferFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            OfferFd::Owned(fd) => fd.as_fd(),
            // SAFETY: `LentSocket::new`'s contract keeps the descriptor open until the
            // offer has settled, and an offer's descriptors are only used before that
            // (by the offer thread while it sends, by `cancel` while the source still
            // owns them).
            OfferFd::Lent(raw) => unsafe { BorrowedFd::borrow_raw(*raw) },
        }
    }
}

/// One socket of an offer.
#[derive(Debug)]
struct Offered {
    flow: FlowId,
    socket: OfferFd,
    /// Frozen (the target thaws it). Not so a socket SAVE left live because a target
    /// had already come for the stream (see [`HandoverOffer::provide`]).
    deaf: bool,
}

#[derive(Debug)]
enum Phase {
    /// The offer exists (its endpoint is in the stream) but its sockets do not yet: SAVE
    /// is still freezing them ([`HandoverOffer::listen`], [`HandoverOffer::provide`]).
    /// A target that presents the token now waits for them, and SAVE learns that one
    /// is there ([`HandoverOffer::target_waiting`]).
    Preparing,
    /// Waiting for a target (or a resume).
    Open(Vec<Offered>),
    /// A target presented the token; the sockets are on their way.
    Sending,
    /// The target took these flows; not yet collected by the engine.
    Taken(Vec<FlowId>),
    /// Over: collected, cancelled, failed or expired.
    Closed,
}

/// What became of an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferStatus {
    /// Still open: no target came.
    Waiting,
    /// Sockets are on their way to a target: wait for the outcome before thawing.
    Busy,
    /// The target owns these flows now (reported once): drop them, never thaw them.
    Taken(Vec<FlowId>),
    /// No handover happened and none will: the source still owns every socket.
    Closed,
}

/// Offered sockets that `baton-repair` dumped, so they are in repair mode, which only
/// a privileged process can end: the helper connection that does it, and those sockets
/// (lent like the offer's, kept here as well as in the [`Phase`], so that an expired
/// offer can still thaw them).
///
/// Why the source keeps them in repair mode after the dump, instead of leaving repair
/// mode at once (still deaf): a socket closed in repair mode goes silently.
/// After a migration to another host the source closes its frozen copies sooner or
/// later (linger, backend exit); outside repair mode that close sends a FIN, or a RST
/// when data is queued, with sequence numbers the peer accepts — it would end the
/// connection the target has just restored. So repair mode is left only where the
/// source, or a same-host target, carries the connection on: right before the sockets
/// go to the target ([`serve_target`]; the unprivileged target then only thaws
/// them), and when the source VM resumes ([`HandoverOffer::cancel`] thaws them through
/// the helper). A same-host target that then refuses (its stream failed validation)
/// leaves the source owning them outside repair mode: it carries them on when its VM
/// resumes; should it never resume, closing them is right, since no copy lives anywhere
/// else.
#[derive(Debug)]
struct Repaired {
    helper: RepairClient,
    sockets: Vec<Offered>,
}

/// The source's side: an abstract listener, a token, the sockets, and the thread that
/// serves one target.
#[derive(Debug)]
pub struct HandoverOffer {
    endpoint: HandoverEndpoint,
    phase: Arc<Mutex<Phase>>,
    signal: Arc<Signal>,
    repaired: Arc<Mutex<Option<Repaired>>>,
    thread: JoinHandle<()>,
}

/// What the offer thread and the owner of an offer tell each other besides the phase.
#[derive(Debug, Default)]
struct Signal {
    /// Notified (with the phase's mutex) when the phase leaves [`Phase::Preparing`].
    changed: Condvar,
    /// A target presented the token: it runs on this host, in this namespace, and has
    /// the stream.
    claimed: AtomicBool,
}

impl HandoverOffer {
    /// Listen on a fresh abstract socket and serve the first target that presents the
    /// token, for at most `lifetime`. The offer owns `sockets`.
    pub fn start(sockets: Vec<OfferedSocket>, lifetime: Duration) -> Result<Self, HandoverError> {
        let sockets = sockets
            .into_iter()
            .map(|s| Offered {
                flow: s.flow,
                socket: OfferFd::Owned(s.socket),
                deaf: true,
            })
            .collect();
        Self::start_inner(Phase::Open(sockets), lifetime, None)
    }

    /// Listen before the sockets are ready (SAVE writes the endpoint into the stream
    /// first, then freezes): a target that comes meanwhile waits for
    /// [`HandoverOffer::provide`].
    pub fn listen(lifetime: Duration) -> Result<Self, HandoverError> {
        Self::start_inner(Phase::Preparing, lifetime, None)
    }

    /// Whether a target has presented the token (it waits for the sockets, or has them):
    /// a target on this host, in this namespace, that has read the stream — it takes
    /// the live sockets, so nothing needs to be dumped for it.
    pub fn target_waiting(&self) -> bool {
        self.signal.claimed.load(Ordering::Acquire)
    }

    /// [`HandoverOffer::start`] for sockets the caller keeps (see [`LentSocket`] for the
    /// rule that comes with them), of which those in `repaired.1` are in repair mode
    /// (dumped through the helper `repaired.0`): they leave repair mode through the
    /// helper right before they go to a target, or are thawed through it when the offer
    /// is cancelled (see [`Repaired`]).
    pub fn lend(
        sockets: Vec<LentSocket>,
        lifetime: Duration,
        repaired: Option<(RepairClient, Vec<FlowId>)>,
    ) -> Result<Self, HandoverError> {
        let offer = Self::listen(lifetime)?;
        offer.provide(sockets, repaired, true)?;
        Ok(offer)
    }

    /// The sockets of an offer made with [`HandoverOffer::listen`] (the rules of
    /// [`HandoverOffer::lend`] apply), handed to a target waiting for them, if any.
    /// `frozen`: every socket is frozen; if not, only those in `repaired` are (SAVE
    /// froze none of the others, because a target had come for the stream, see
    /// [`HandoverOffer::target_waiting`]) and the others go as `SocketsLive`. Fails if
    /// the offer is no longer being prepared (cancelled, withdrawn, expired).
    pub fn provide(
        &self,
        sockets: Vec<LentSocket>,
        repaired: Option<(RepairClient, Vec<FlowId>)>,
        frozen: bool,
    ) -> Result<(), HandoverError> {
        if sockets.len() > MAX_HANDOVER_FLOWS {
            return Err(HandoverError::TooMany);
        }
        let in_repair: HashSet<FlowId> = repaired
            .as_ref()
            .map(|(_, flows)| flows.iter().copied().collect())
            .unwrap_or_default();
        let repaired = match repaired {
            Some((helper, _)) if !in_repair.is_empty() => {
                // In the offer's order (`send_sockets` relies on it).
                let sockets = sockets
                    .iter()
                    .filter(|s| in_repair.contains(&s.flow))
                    .map(|s| Offered {
                        flow: s.flow,
                        socket: OfferFd::Lent(s.fd),
                        deaf: true,
                    })
                    .collect();
                Some(Repaired { helper, sockets })
            }
            _ => None,
        };
        let sockets = sockets
            .into_iter()
            .map(|s| Offered {
                flow: s.flow,
                socket: OfferFd::Lent(s.fd),
                deaf: frozen || in_repair.contains(&s.flow),
            })
            .collect();
        let mut phase = lock(&self.phase);
        if !matches!(*phase, Phase::Preparing) {
            return Err(HandoverError::NotOpen);
        }
        // The repaired list first: the offer thread reads it once it sees the sockets.
        *lock(&self.repaired) = repaired;
        *phase = Phase::Open(sockets);
        drop(phase);
        self.signal.changed.notify_all();
        Ok(())
    }

    fn start_inner(
        initial: Phase,
        lifetime: Duration,
        repaired: Option<Repaired>,
    ) -> Result<Self, HandoverError> {
        if matches!(&initial, Phase::Open(sockets) if sockets.len() > MAX_HANDOVER_FLOWS) {
            return Err(HandoverError::TooMany);
        }
        let repaired = Arc::new(Mutex::new(repaired));
        let token = random_bytes::<32>()?;
        let tag = random_bytes::<8>()?;
        // Random, not derived from the pid: getpid is not on the sandbox's allow-list.
        let name = format!(
            "{NAME_PREFIX}{}",
            tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(sys("handover listener: socket"))?;
        let addr =
            UnixAddr::new_abstract(name.as_bytes()).map_err(sys("handover listener: name"))?;
        bind(listener.as_raw_fd(), &addr).map_err(sys("handover listener: bind"))?;
        let backlog = Backlog::new(4).map_err(sys("handover listener: backlog"))?;
        listen(&listener, backlog).map_err(sys("handover listener: listen"))?;
        let phase = Arc::new(Mutex::new(initial));
        let signal = Arc::new(Signal::default());
        let shared = Arc::clone(&phase);
        let shared_signal = Arc::clone(&signal);
        let shared_repaired = Arc::clone(&repaired);
        let thread = std::thread::Builder::new()
            .name("baton-handover".into())
            .spawn(move || {
                serve(
                    listener,
                    token,
                    &shared,
                    &shared_signal,
                    &shared_repaired,
                    lifetime,
                )
            })
            .map_err(|source| HandoverError::Sys {
                step: "handover thread",
                source,
            })?;
        Ok(HandoverOffer {
            endpoint: HandoverEndpoint {
                abstract_name: name.into_bytes(),
                token,
            },
            phase,
            signal,
            repaired,
            thread,
        })
    }

    /// Where and how a target reaches this offer (for the stream's `SourceRecord`).
    pub fn endpoint(&self) -> &HandoverEndpoint {
        &self.endpoint
    }

    /// What became of the offer; [`OfferStatus::Taken`] is reported once.
    pub fn status(&self) -> OfferStatus {
        let mut phase = lock(&self.phase);
        match &*phase {
            Phase::Preparing | Phase::Open(_) => OfferStatus::Waiting,
            Phase::Sending => OfferStatus::Busy,
            Phase::Closed => OfferStatus::Closed,
            Phase::Taken(_) => match std::mem::replace(&mut *phase, Phase::Closed) {
                Phase::Taken(flows) => OfferStatus::Taken(flows),
                _ => OfferStatus::Closed,
            },
        }
    }

    /// The source VM resumed: withdraw the offer if no target is taking it. Returns
    /// [`OfferStatus::Closed`] when the source still owns everything (thaw now),
    /// [`OfferStatus::Busy`] when a handover is under way (ask again), or
    /// [`OfferStatus::Taken`] when the target already owns those flows.
    pub fn cancel(&self) -> OfferStatus {
        self.close_if_waiting();
        let status = self.status();
        if status == OfferStatus::Closed {
            self.thaw_repaired();
        }
        status
    }

    /// Withdraw the offer without thawing anything: for the end of a migration (linger
    /// over, exit), when the remaining sockets are about to be closed silently — dumped
    /// ones stay in repair mode for that. Returns what [`HandoverOffer::cancel`] would.
    pub fn withdraw(&self) -> OfferStatus {
        self.close_if_waiting();
        self.status()
    }

    /// Close the offer unless sockets are on their way or taken, and tell a target
    /// waiting for sockets that none will come.
    fn close_if_waiting(&self) {
        let mut phase = lock(&self.phase);
        if let Phase::Open(_) | Phase::Preparing = &*phase {
            // Drops owned descriptors; lent ones stay with the flows.
            *phase = Phase::Closed;
        }
        drop(phase);
        self.signal.changed.notify_all();
    }

    /// Withdraw the offer without thawing anything, and wait while sockets are on their
    /// way to a target (bounded by the exchange's step timeouts), so that the outcome is
    /// final: [`OfferStatus::Taken`] (reported once, as by [`HandoverOffer::status`]) or
    /// [`OfferStatus::Closed`]. After it the lender may close its descriptors.
    pub fn settle(&self) -> OfferStatus {
        let mut waited = false;
        loop {
            match self.withdraw() {
                OfferStatus::Busy if self.thread.is_finished() => {
                    // The offer thread died mid-transfer (it cannot panic by design, but
                    // never wait for a dead thread): the target never got `Released`,
                    // so it uses none of the sockets; they stay ours.
                    *lock(&self.phase) = Phase::Closed;
                    return OfferStatus::Closed;
                }
                OfferStatus::Busy => {
                    if !waited {
                        tracing::info!("TCP handover: waiting for a transfer under way");
                        waited = true;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    /// The source keeps its sockets: end repair mode (and thaw) on those
    /// the helper dumped. A socket that cannot be thawed is logged; its flow fails on
    /// its next write (a socket in repair mode refuses data) and the guest gets a RST.
    fn thaw_repaired(&self) {
        let Some(mut repaired) = lock(&self.repaired).take() else {
            return;
        };
        let fds: Vec<BorrowedFd<'_>> = repaired.sockets.iter().map(|s| s.socket.as_fd()).collect();
        match repaired.helper.thaw(&fds) {
            Ok(results) => {
                let mut failed = 0usize;
                for (offered, result) in repaired.sockets.iter().zip(results) {
                    if let Err(err) = result {
                        failed += 1;
                        tracing::error!(
                            "migration flow {}: thawing through baton-repair: {err}",
                            offered.flow.0
                        );
                    }
                }
                tracing::info!(
                    "TCP: {} dumped socket(s) thawed through baton-repair ({failed} failed)",
                    fds.len()
                );
            }
            // Not final: when the source resumes, the engine gets a fresh helper
            // (through the launcher, or the next one attached) and thaws again.
            Err(err) => tracing::warn!(
                "TCP: thawing {} dumped socket(s) through baton-repair: {err}; they \
                 stay frozen until a working helper thaws them",
                fds.len()
            ),
        }
    }
}

impl Drop for HandoverOffer {
    fn drop(&mut self) {
        // Lent descriptors may be closed right after the drop: wait out a transfer
        // under way. The thread notices a closed offer within ACCEPT_POLL_MS and exits.
        let _ = self.settle();
    }
}

/// The offer thread: accept targets until one presents the token, the offer is
/// cancelled, or it expires.
fn serve(
    listener: OwnedFd,
    token: [u8; 32],
    phase: &Mutex<Phase>,
    signal: &Signal,
    repaired: &Mutex<Option<Repaired>>,
    lifetime: Duration,
) {
    let expires = Instant::now() + lifetime;
    loop {
        if !matches!(&*lock(phase), Phase::Open(_) | Phase::Preparing) {
            return;
        }
        if Instant::now() >= expires {
            tracing::warn!("TCP handover: no target came within {lifetime:?}; offer withdrawn");
            *lock(phase) = Phase::Closed;
            return;
        }
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ACCEPT_POLL_MS)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(err) => {
                tracing::error!("TCP handover: poll: {err}; offer withdrawn");
                *lock(phase) = Phase::Closed;
                return;
            }
        }
        let conn = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(raw) => unsafe { OwnedFd::from_raw_fd(raw) },
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(err) => {
                tracing::warn!("TCP handover: accept: {err}");
                continue;
            }
        };
        match serve_target(conn.as_fd(), &token, phase, signal, repaired, expires) {
            Ok(count) => {
                tracing::info!("TCP handover: the target took {count} connection(s)");
                return;
            }
            Err(Served::Rejected(err)) => {
                // A stranger or a wrong token: the offer stays open.
                tracing::warn!("TCP handover: refused a connection: {err}");
                refuse(conn.as_fd(), &err);
            }
            Err(Served::Failed(err)) => {
                tracing::error!("TCP handover failed, this backend keeps its connections: {err}");
                refuse(conn.as_fd(), &err);
                *lock(phase) = Phase::Closed;
                return;
            }
        }
    }
}

enum Served {
    /// Before the token was accepted: nothing changed.
    Rejected(HandoverError),
    /// After: the offer is consumed, the source keeps its sockets.
    Failed(HandoverError),
}

fn serve_target(
    conn: BorrowedFd<'_>,
    token: &[u8; 32],
    phase: &Mutex<Phase>,
    signal: &Signal,
    repaired: &Mutex<Option<Repaired>>,
    expires: Instant,
) -> Result<usize, Served> {
    check_uid(conn).map_err(Served::Rejected)?;
    let (hello, _fds) = recv(conn).map_err(Served::Rejected)?;
    let HandoverMessage::Hello { token: presented } = hello else {
        return Err(Served::Rejected(HandoverError::Unexpected("Hello")));
    };
    if !tokens_equal(&presented, token) {
        return Err(Served::Rejected(HandoverError::Token));
    }
    let sockets = {
        let mut guard = lock(phase);
        loop {
            match std::mem::replace(&mut *guard, Phase::Sending) {
                Phase::Open(sockets) => break sockets,
                Phase::Preparing => {
                    // SAVE is still freezing: from now on it knows that a target on
                    // this host takes the sockets live.
                    *guard = Phase::Preparing;
                    if !signal.claimed.swap(true, Ordering::AcqRel) {
                        tracing::info!(
                            "TCP handover: a target on this host presented the token \
                             while SAVE prepares the sockets"
                        );
                    }
                    if Instant::now() >= expires {
                        *guard = Phase::Closed;
                        return Err(Served::Failed(HandoverError::NotOpen));
                    }
                    guard = signal
                        .changed
                        .wait_timeout(guard, Duration::from_millis(u64::from(ACCEPT_POLL_MS)))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|poisoned| poisoned.into_inner().0);
                }
                other => {
                    let claimed = signal.claimed.load(Ordering::Acquire);
                    *guard = other;
                    // A target that waited for sockets that never came (SAVE failed)
                    // was told it had the offer: it is over for both.
                    return Err(if claimed {
                        Served::Failed(HandoverError::NotOpen)
                    } else {
                        Served::Rejected(HandoverError::NotOpen)
                    });
                }
            }
        }
    };
    signal.claimed.store(true, Ordering::Release);
    // From here on the token is used up; owned descriptors in `sockets` close on return.
    let started = Instant::now();
    let result = send_sockets(conn, &sockets, repaired).and_then(|in_helper| {
        let (taken, _fds) = recv_within(conn, TAKEN_TIMEOUT)?;
        let HandoverMessage::Taken { flows } = taken else {
            return Err(HandoverError::Unexpected("Taken"));
        };
        check_taken(&flows, &sockets)?;
        Ok((flows, in_helper))
    });
    let (flows, in_helper) = match result {
        Ok(done) => done,
        Err(err) => {
            *lock(phase) = Phase::Closed;
            return Err(Served::Failed(err));
        }
    };
    let count = flows.len();
    tracing::info!(
        "TCP handover: {count} socket(s) sent and confirmed in {:.1} ms, of which {:.1} ms \
         waiting for baton-repair to take the dumped ones out of repair mode (frame by \
         frame, while the target checks the previous frame)",
        started.elapsed().as_secs_f64() * 1e3,
        in_helper.as_secs_f64() * 1e3,
    );
    // Record the move before confirming it: once the target reads `Released` it thaws.
    *lock(phase) = Phase::Taken(flows);
    if let Err(err) = send(conn, &HandoverMessage::Released, &[]) {
        // The target will not use the sockets without `Released`; they are lost either
        // way now (this side has given them up).
        tracing::error!("TCP handover: confirming to the target: {err}");
    }
    Ok(count)
}

/// `Taken` may list only flows that were sent, each once. The target lists them in the
/// order they arrived, which is the order they were sent in: one linear pass then
/// suffices; any other order falls back to a set.
fn check_taken(taken: &[FlowId], sent: &[Offered]) -> Result<(), HandoverError> {
    let mut in_order = sent.iter().map(|s| s.flow);
    if taken.iter().all(|&flow| in_order.any(|f| f == flow)) {
        return Ok(());
    }
    let offered: HashSet<FlowId> = sent.iter().map(|s| s.flow).collect();
    let mut seen = HashSet::with_capacity(taken.len());
    match taken
        .iter()
        .find(|f| !offered.contains(f) || !seen.insert(**f))
    {
        Some(stranger) => Err(HandoverError::UnknownFlow(stranger.0)),
        None => Ok(()),
    }
}

/// Send the sockets, at most [`MAX_FDS`] per frame, then `Done`. The sockets of a frame
/// that `baton-repair` dumped leave repair mode through it (see [`leave_repair`]) right
/// before the frame goes, so that the helper works on frame k+1 while the target checks
/// frame k, instead of the target waiting for all of them first. Returns the time spent
/// waiting for the helper.
///
/// If the helper fails on any socket, nothing more is sent and it stays responsible for
/// all of them: a later cancel thaws them all (leaving repair mode twice is harmless).
fn send_sockets(
    conn: BorrowedFd<'_>,
    sockets: &[Offered],
    repaired: &Mutex<Option<Repaired>>,
) -> Result<Duration, HandoverError> {
    let mut guard = lock(repaired);
    let mut in_helper = Duration::ZERO;
    // `Repaired::sockets` is a subsequence of the offer's sockets, in the same order
    // (see `HandoverOffer::lend`): one cursor walks both.
    let mut next_repaired = 0usize;
    let mut fds: Vec<BorrowedFd<'_>> = Vec::with_capacity(MAX_FDS);
    for batch in frames(sockets) {
        if let Some(r) = guard.as_mut() {
            let from = next_repaired;
            for s in batch {
                if r.sockets.get(next_repaired).map(|d| d.flow) == Some(s.flow) {
                    next_repaired += 1;
                }
            }
            let waited = Instant::now();
            leave_repair(r, from..next_repaired)?;
            in_helper += waited.elapsed();
        }
        fds.clear();
        fds.extend(batch.iter().map(|s| s.socket.as_fd()));
        let flows = batch.iter().map(|s| s.flow).collect();
        let frame = if batch.first().is_some_and(|s| s.deaf) {
            HandoverMessage::Sockets { flows }
        } else {
            HandoverMessage::SocketsLive { flows }
        };
        send(conn, &frame, &fds)?;
    }
    if let Some(r) = guard.as_mut() {
        // A dumped socket the walk did not meet (none, by construction) leaves repair
        // mode too, as all of them always did.
        let waited = Instant::now();
        leave_repair(r, next_repaired..r.sockets.len())?;
        in_helper += waited.elapsed();
    }
    // Every dumped socket is out of repair mode: nothing left for the helper to thaw.
    *guard = None;
    let total = u32::try_from(sockets.len()).map_err(|_| HandoverError::TooMany)?;
    send(conn, &HandoverMessage::Done { total }, &[])?;
    Ok(in_helper)
}

/// The offer's sockets cut into frames, in order: at most [`MAX_FDS`] each, frozen and
/// live ones apart (`Sockets`, `SocketsLive`).
fn frames(sockets: &[Offered]) -> Vec<&[Offered]> {
    let mut frames = Vec::with_capacity(sockets.len() / MAX_FDS + 1);
    let mut rest = sockets;
    while let Some(first) = rest.first() {
        let run = rest
            .iter()
            .take(MAX_FDS)
            .take_while(|s| s.deaf == first.deaf)
            .count();
        let (frame, tail) = rest.split_at(run);
        frames.push(frame);
        rest = tail;
    }
    frames
}

/// End repair mode on `r.sockets[range]` through the helper, keeping them deaf
/// (the target thaws them, which needs no privilege), without a window probe: the
/// socket is still deaf, the probe's answer would be dropped. Only ever after the target
/// presented the token.
fn leave_repair(r: &mut Repaired, range: std::ops::Range<usize>) -> Result<(), HandoverError> {
    let part = r.sockets.get(range).unwrap_or(&[]);
    if part.is_empty() {
        return Ok(());
    }
    let fds: Vec<BorrowedFd<'_>> = part.iter().map(|s| s.socket.as_fd()).collect();
    let results = r
        .helper
        .set_repair(&fds, RepairMode::OffNoWindowProbe)
        .map_err(|e| HandoverError::Helper(format!("leaving repair mode: {e}")))?;
    if let Some((offered, Err(err))) = part.iter().zip(&results).find(|(_, r)| r.is_err()) {
        return Err(HandoverError::Helper(format!(
            "flow {}: leaving repair mode: {err}",
            offered.flow.0
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Target side
// ---------------------------------------------------------------------------------------

/// A flow the stream lists, whose socket the target expects.
#[derive(Debug, Clone, Copy)]
pub struct ExpectedSocket {
    pub flow: FlowId,
    pub host: HostSocketEnds,
}

/// Take the sockets of `expected` from the source at `endpoint`: [`TakeOver::start`]
/// and [`TakeOver::finish`] in one go. On success every socket was checked, the source
/// has recorded that it gave them up, and they are thawed: the caller owns
/// live connections. On error nothing was taken (the received descriptors are closed;
/// the source keeps its sockets).
pub fn take_over(
    endpoint: &HandoverEndpoint,
    expected: &[ExpectedSocket],
) -> Result<Vec<(FlowId, OwnedFd)>, HandoverError> {
    TakeOver::start(endpoint)?.finish(expected)
}

/// A socket that arrived, checked as far as it can be without its record: a TCP socket
/// of this network namespace, with these addresses.
#[derive(Debug)]
struct Arrived {
    flow: FlowId,
    socket: OwnedFd,
    local: SocketAddr,
    peer: SocketAddr,
}

/// A handover under way on the target: the sockets arrive on a thread of their own
/// while the caller still reads the stream that names them (a LOAD starts one as soon
/// as the stream's SOURCE record says the source runs in this namespace), and nothing
/// is taken before [`TakeOver::finish`] has checked them against the validated records
/// and the source has confirmed. Dropped unfinished, it refuses: the source keeps its
/// sockets.
#[derive(Debug)]
pub struct TakeOver {
    conn: Arc<OwnedFd>,
    receiver: Option<JoinHandle<Result<(), HandoverError>>>,
    inspection: Arc<Inspection>,
    started: Instant,
}

/// The sockets received and the inspection of each (the system calls of the check, and
/// the thaw), shared by the receiving thread, which inspects as frames arrive, and the
/// LOAD thread, which joins in once it has read the stream ([`TakeOver::finish`]): a
/// short stream (the target came early, no kernel state in it) leaves thousands of
/// sockets to inspect after it, which two threads do in half the time.
#[derive(Debug, Default)]
struct Inspection {
    state: Mutex<InspectionState>,
    /// This namespace's cookie, set by the receiving thread before the first frame.
    ours: std::sync::OnceLock<u64>,
}

/// One frame of sockets as received: its position, whether they are frozen (`Sockets`,
/// not `SocketsLive`), and the sockets.
type Received = (usize, bool, Vec<(FlowId, OwnedFd)>);

#[derive(Debug, Default)]
struct InspectionState {
    /// Frames received, not yet taken for inspection.
    queue: std::collections::VecDeque<Received>,
    /// Frames inspected, with their position.
    done: Vec<(usize, Vec<Arrived>)>,
    /// The first socket found wrong.
    failed: Option<HandoverError>,
}

impl Inspection {
    /// Inspect queued frames until none is left (or one fails).
    fn work(&self) {
        let Some(&ours) = self.ours.get() else {
            return;
        };
        loop {
            let Some((index, frozen, frame)) = lock(&self.state).queue.pop_front() else {
                return;
            };
            let result = inspect_frame(frame, frozen, ours);
            let mut state = lock(&self.state);
            match result {
                Ok(arrived) => state.done.push((index, arrived)),
                Err(err) => {
                    state.failed.get_or_insert(err);
                    return;
                }
            }
        }
    }

    fn failure(&self) -> Option<HandoverError> {
        lock(&self.state).failed.take()
    }

    /// Every socket, in the order received (all frames inspected by now).
    fn take_arrived(&self) -> Vec<Arrived> {
        let mut done = std::mem::take(&mut lock(&self.state).done);
        done.sort_unstable_by_key(|(index, _)| *index);
        done.into_iter().flat_map(|(_, arrived)| arrived).collect()
    }
}

/// Inspect the sockets of one frame, and thaw them if `frozen`.
fn inspect_frame(
    frame: Vec<(FlowId, OwnedFd)>,
    frozen: bool,
    ours: u64,
) -> Result<Vec<Arrived>, HandoverError> {
    frame
        .into_iter()
        .map(|(flow, socket)| {
            let (local, peer) = inspect_socket(socket.as_fd(), ours).map_err(|reason| {
                HandoverError::BadSocket {
                    flow: flow.0,
                    reason,
                }
            })?;
            // Hearing again already (see the module's notes): whichever side ends up
            // owning the socket reads what arrives from now on.
            if frozen {
                detach_filter(socket.as_fd()).map_err(|e| HandoverError::BadSocket {
                    flow: flow.0,
                    reason: format!("thawing: {e}"),
                })?;
            }
            Ok(Arrived {
                flow,
                socket,
                local,
                peer,
            })
        })
        .collect()
}

impl TakeOver {
    /// Connect to the source's offer (an error here means it is not reachable: another
    /// host or namespace, or no offer any more), present the token and start receiving.
    pub fn start(endpoint: &HandoverEndpoint) -> Result<Self, HandoverError> {
        let conn = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(sys("handover: socket"))?;
        let addr = UnixAddr::new_abstract(&endpoint.abstract_name)
            .map_err(sys("handover: socket name"))?;
        connect(conn.as_raw_fd(), &addr)
            .map_err(|errno| HandoverError::Unreachable(io::Error::from(errno)))?;
        let conn = Arc::new(conn);
        let shared = Arc::clone(&conn);
        let inspection = Arc::new(Inspection::default());
        let shared_inspection = Arc::clone(&inspection);
        let token = endpoint.token;
        let receiver = std::thread::Builder::new()
            .name("baton-handover-rx".into())
            .spawn(move || receive(shared.as_fd(), token, &shared_inspection))
            .map_err(|source| HandoverError::Sys {
                step: "handover: receiving thread",
                source,
            })?;
        Ok(TakeOver {
            conn,
            receiver: Some(receiver),
            inspection,
            started: Instant::now(),
        })
    }

    /// Wait for every socket, check each against its record in `expected` (the
    /// stream's TCP flows, validated), confirm with `Taken`, and wait for the source's
    /// `Released`. See [`take_over`].
    pub fn finish(
        mut self,
        expected: &[ExpectedSocket],
    ) -> Result<Vec<(FlowId, OwnedFd)>, HandoverError> {
        let result = self.finish_inner(expected);
        if let Err(err) = &result {
            if !matches!(err, HandoverError::Refused(_) | HandoverError::Closed) {
                refuse(self.conn.as_fd(), err);
            }
        }
        result
    }

    fn finish_inner(
        &mut self,
        expected: &[ExpectedSocket],
    ) -> Result<Vec<(FlowId, OwnedFd)>, HandoverError> {
        if expected.len() > MAX_HANDOVER_FLOWS {
            return Err(HandoverError::TooMany);
        }
        let waiting = Instant::now();
        // Help with the inspection while frames are queued, then wait for the rest.
        self.inspection.work();
        if let Some(err) = self.inspection.failure() {
            return Err(err);
        }
        self.join_receiver()?;
        self.inspection.work();
        if let Some(err) = self.inspection.failure() {
            return Err(err);
        }
        let arrived = self.inspection.take_arrived();
        let arrived_after = self.started.elapsed();
        let waited = waiting.elapsed();
        let received = match_records(arrived, expected)?;
        let conn = self.conn.as_fd();
        let flows = received.iter().map(|(f, _)| *f).collect();
        send(conn, &HandoverMessage::Taken { flows }, &[])?;
        let (released, _fds) = recv(conn)?;
        if released != HandoverMessage::Released {
            return Err(HandoverError::Unexpected("Released"));
        }
        tracing::info!(
            "TCP handover: {} socket(s) taken over: all received, inspected and thawed \
             {:.1} ms after connecting (while the stream was read), then {:.1} ms waiting \
             for them, checked against the records and released after {:.1} ms more",
            received.len(),
            arrived_after.as_secs_f64() * 1e3,
            waited.as_secs_f64() * 1e3,
            (waiting.elapsed() - waited).as_secs_f64() * 1e3,
        );
        Ok(received)
    }

    /// The receiving thread's result (the sockets are in `inspection`).
    fn join_receiver(&mut self) -> Result<(), HandoverError> {
        let Some(receiver) = self.receiver.take() else {
            return Err(HandoverError::Unexpected(
                "sockets (receiver already joined)",
            ));
        };
        receiver.join().unwrap_or_else(|_| {
            Err(HandoverError::Sys {
                step: "handover: receiving thread",
                source: io::Error::other("the thread ended abnormally"),
            })
        })
    }
}

impl Drop for TakeOver {
    fn drop(&mut self) {
        if self.receiver.is_none() {
            return;
        }
        // Abandoned (a LOAD that failed before its TCP part): tell the source, and cut
        // the connection so that the thread stops waiting for frames; what it received
        // closes with it.
        refuse(self.conn.as_fd(), &HandoverError::Abandoned);
        let _ = nix::sys::socket::shutdown(self.conn.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = self.join_receiver();
    }
}

/// The receiving thread: present the token, then take every frame of sockets up to
/// `Done` into `inspection`, inspecting a frame after each one received (the system
/// calls of the check, and the thaw; the comparison with its record waits for the
/// validated stream), and the rest after `Done`. Refuses the source on any error.
fn receive(
    conn: BorrowedFd<'_>,
    token: [u8; 32],
    inspection: &Inspection,
) -> Result<(), HandoverError> {
    let result = receive_inner(conn, token, inspection);
    if let Err(err) = &result {
        if !matches!(err, HandoverError::Refused(_) | HandoverError::Closed) {
            refuse(conn, err);
        }
    }
    result
}

fn receive_inner(
    conn: BorrowedFd<'_>,
    token: [u8; 32],
    inspection: &Inspection,
) -> Result<(), HandoverError> {
    check_uid(conn)?;
    send(conn, &HandoverMessage::Hello { token }, &[])?;
    let ours = netns_cookie_here().map_err(|source| HandoverError::Sys {
        step: "handover: SO_NETNS_COOKIE of this namespace",
        source,
    })?;
    let _ = inspection.ours.set(ours);
    let mut received = 0usize;
    let mut frames = 0usize;
    loop {
        // The first frame may wait for the source to finish freezing (a target that
        // comes early, see `Phase::Preparing`); the source is quick after that.
        let timeout = if received == 0 {
            TAKEN_TIMEOUT
        } else {
            STEP_TIMEOUT
        };
        let (msg, fds) = recv_within(conn, timeout)?;
        let (frozen, flows) = match msg {
            HandoverMessage::Sockets { flows } => (true, flows),
            HandoverMessage::SocketsLive { flows } => (false, flows),
            HandoverMessage::Done { total } => {
                if total as usize != received {
                    return Err(HandoverError::Incomplete {
                        got: received,
                        want: total as usize,
                    });
                }
                inspection.work();
                return match inspection.failure() {
                    Some(err) => Err(err),
                    None => Ok(()),
                };
            }
            _ => return Err(HandoverError::Unexpected("Sockets or Done")),
        };
        if flows.len() != fds.len() {
            return Err(HandoverError::FdCount {
                announced: fds.len(),
                flows: flows.len(),
                received: fds.len(),
            });
        }
        received += flows.len();
        if received > MAX_HANDOVER_FLOWS {
            return Err(HandoverError::TooMany);
        }
        let frame = flows.into_iter().zip(fds).collect();
        lock(&inspection.state)
            .queue
            .push_back((frames, frozen, frame));
        frames += 1;
        // One frame's inspection per frame received: the queue only grows while the
        // source sends faster, and the LOAD thread drains it too. (Popped first: the
        // guard must not live into the block, which locks again.)
        let next = lock(&inspection.state).queue.pop_front();
        if let Some((index, frozen, frame)) = next {
            let result = inspect_frame(frame, frozen, ours)?;
            lock(&inspection.state).done.push((index, result));
        }
        if let Some(err) = inspection.failure() {
            return Err(err);
        }
    }
}

/// Every record of `expected` has exactly one socket in `arrived`, with its addresses.
/// The source sends them in the stream's order: then one pass pairs them; any other
/// order goes through a map.
fn match_records(
    arrived: Vec<Arrived>,
    expected: &[ExpectedSocket],
) -> Result<Vec<(FlowId, OwnedFd)>, HandoverError> {
    let check = |a: &Arrived, host: &HostSocketEnds| -> Result<(), HandoverError> {
        if same_addr(a.local, host.local.to_socket_addr())
            && same_addr(a.peer, host.peer.to_socket_addr())
        {
            return Ok(());
        }
        Err(HandoverError::BadSocket {
            flow: a.flow.0,
            reason: format!(
                "addresses {} -> {}, the record says {} -> {}",
                a.local,
                a.peer,
                host.local.to_socket_addr(),
                host.peer.to_socket_addr()
            ),
        })
    };
    let in_order = arrived.len() == expected.len()
        && arrived.iter().zip(expected).all(|(a, e)| a.flow == e.flow);
    if in_order {
        for (a, e) in arrived.iter().zip(expected) {
            check(a, &e.host)?;
        }
    } else {
        let mut wanted: HashMap<FlowId, &HostSocketEnds> =
            expected.iter().map(|e| (e.flow, &e.host)).collect();
        for a in &arrived {
            // Removed once met: a flow sent twice is unknown the second time.
            let host = wanted
                .remove(&a.flow)
                .ok_or(HandoverError::UnknownFlow(a.flow.0))?;
            check(a, host)?;
        }
        if !wanted.is_empty() || arrived.len() != expected.len() {
            return Err(HandoverError::Incomplete {
                got: arrived.len(),
                want: expected.len(),
            });
        }
    }
    Ok(arrived.into_iter().map(|a| (a.flow, a.socket)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    fn expected(flow: u32, s: &TcpStream) -> ExpectedSocket {
        ExpectedSocket {
            flow: FlowId(flow),
            host: socket_ends(s.as_fd()).unwrap(),
        }
    }

    #[test]
    fn sockets_move_and_the_source_learns_it() {
        let (client, mut server) = pair();
        attach_deaf_filter(client.as_fd()).unwrap();
        let want = [expected(7, &client)];
        let offer = HandoverOffer::start(
            vec![OfferedSocket {
                flow: FlowId(7),
                socket: client.as_fd().try_clone_to_owned().unwrap(),
            }],
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(offer.status(), OfferStatus::Waiting);
        let taken = take_over(offer.endpoint(), &want).unwrap();
        assert_eq!(offer.status(), OfferStatus::Taken(vec![FlowId(7)]));
        assert_eq!(offer.cancel(), OfferStatus::Closed);
        drop(client);
        let (flow, fd) = taken.into_iter().next().unwrap();
        assert_eq!(flow, FlowId(7));
        let mut moved = TcpStream::from(fd);
        server.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        moved.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "waited in vain: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// An offer listens before its sockets exist: a target that presents the token
    /// then is noticed (SAVE then skips the dump) and gets the sockets once provided.
    #[test]
    fn a_target_that_comes_before_the_sockets_waits_for_them() {
        let (client, mut server) = pair();
        let want = [expected(3, &client)];
        let offer = HandoverOffer::listen(Duration::from_secs(30)).unwrap();
        assert!(!offer.target_waiting());
        assert_eq!(offer.status(), OfferStatus::Waiting);
        let early = TakeOver::start(offer.endpoint()).unwrap();
        wait_until("the target's token", || offer.target_waiting());
        assert_eq!(offer.status(), OfferStatus::Waiting);
        attach_deaf_filter(client.as_fd()).unwrap();
        // SAFETY: `client` outlives the offer's use of it (the offer settles below).
        let lent = unsafe { LentSocket::new(FlowId(3), client.as_fd()) };
        offer.provide(vec![lent], None, true).unwrap();
        let taken = early.finish(&want).unwrap();
        assert_eq!(offer.status(), OfferStatus::Taken(vec![FlowId(3)]));
        drop(offer);
        drop(client);
        let mut moved = TcpStream::from(taken.into_iter().next().unwrap().1);
        server.write_all(b"pong").unwrap();
        let mut buf = [0u8; 4];
        moved.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    /// Sockets SAVE did not freeze (the target had come) travel as `SocketsLive` and
    /// work on arrival (the frozen kind, `Sockets`, is thawed: the tests above).
    #[test]
    fn live_sockets_arrive_working() {
        let (client, mut server) = pair();
        let want = [expected(2, &client)];
        let offer = HandoverOffer::listen(Duration::from_secs(30)).unwrap();
        let early = TakeOver::start(offer.endpoint()).unwrap();
        wait_until("the target's token", || offer.target_waiting());
        // SAFETY: `client` outlives the offer's use of it (it settles below).
        let lent = unsafe { LentSocket::new(FlowId(2), client.as_fd()) };
        offer.provide(vec![lent], None, false).unwrap();
        let taken = early.finish(&want).unwrap();
        drop(offer);
        drop(client);
        let mut moved = TcpStream::from(taken.into_iter().next().unwrap().1);
        server.write_all(b"data").unwrap();
        moved
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4];
        moved.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"data");
    }

    /// SAVE fails after a target came early (the offer is dropped unprovided): the
    /// target is refused at once, not left waiting for sockets.
    #[test]
    fn a_target_waiting_for_an_offer_that_is_dropped_is_refused() {
        let (client, _server) = pair();
        let want = [expected(3, &client)];
        let offer = HandoverOffer::listen(Duration::from_secs(30)).unwrap();
        let early = TakeOver::start(offer.endpoint()).unwrap();
        wait_until("the target's token", || offer.target_waiting());
        let started = Instant::now();
        drop(offer);
        let err = early.finish(&want).unwrap_err();
        assert!(matches!(err, HandoverError::Refused(_)), "{err}");
        assert!(started.elapsed() < STEP_TIMEOUT, "refused late: {err}");
    }

    /// A resumed source cancels an offer still being prepared: closed, nothing to wait
    /// for, and sockets provided afterwards are refused.
    #[test]
    fn an_offer_cancelled_while_being_prepared_takes_no_sockets() {
        let (client, _server) = pair();
        let offer = HandoverOffer::listen(Duration::from_secs(30)).unwrap();
        assert_eq!(offer.cancel(), OfferStatus::Closed);
        // SAFETY: `client` outlives the call (refused: the offer keeps nothing).
        let lent = unsafe { LentSocket::new(FlowId(1), client.as_fd()) };
        assert!(matches!(
            offer.provide(vec![lent], None, true),
            Err(HandoverError::NotOpen)
        ));
        assert!(TakeOver::start(offer.endpoint())
            .and_then(|t| t.finish(&[expected(1, &client)]))
            .is_err());
    }

    #[test]
    fn a_wrong_token_is_refused_and_the_offer_stays_open() {
        let (client, _server) = pair();
        let want = [expected(1, &client)];
        let offer = HandoverOffer::start(
            vec![OfferedSocket {
                flow: FlowId(1),
                socket: client.as_fd().try_clone_to_owned().unwrap(),
            }],
            Duration::from_secs(30),
        )
        .unwrap();
        let mut wrong = offer.endpoint().clone();
        wrong.token[0] ^= 1;
        let err = take_over(&wrong, &want).unwrap_err();
        assert!(matches!(err, HandoverError::Refused(_)), "{err}");
        assert_eq!(offer.status(), OfferStatus::Waiting);
        assert_eq!(offer.cancel(), OfferStatus::Closed);
        // Withdrawn: refused, reset, or no listener at all — never the sockets.
        assert!(take_over(offer.endpoint(), &want).is_err());
    }

    #[test]
    fn a_socket_that_does_not_match_its_record_is_refused() {
        let (client, _server) = pair();
        let (other, _other_server) = pair();
        let want = [expected(1, &other)];
        let offer = HandoverOffer::start(
            vec![OfferedSocket {
                flow: FlowId(1),
                socket: client.as_fd().try_clone_to_owned().unwrap(),
            }],
            Duration::from_secs(30),
        )
        .unwrap();
        let err = take_over(offer.endpoint(), &want).unwrap_err();
        assert!(matches!(err, HandoverError::BadSocket { .. }), "{err}");
        // The source keeps its sockets (the offer is used up).
        for _ in 0..100 {
            if offer.status() == OfferStatus::Closed {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("offer not closed: {:?}", offer.status());
    }

    #[test]
    fn no_listener_means_not_this_host() {
        let endpoint = HandoverEndpoint {
            abstract_name: b"baton-handover-nobody-listens-here".to_vec(),
            token: [0; 32],
        };
        let err = take_over(&endpoint, &[]).unwrap_err();
        assert!(matches!(err, HandoverError::Unreachable(_)), "{err}");
    }

    /// Frames hold at most MAX_FDS sockets, of one kind each, in the offer's order.
    #[test]
    fn frames_keep_order_and_split_by_kind_and_size() {
        let deaf = |i: u32| i < 10 || (300..320).contains(&i);
        let sockets: Vec<Offered> = (0..700)
            .map(|i| Offered {
                flow: FlowId(i),
                socket: OfferFd::Lent(-1),
                deaf: deaf(i),
            })
            .collect();
        let cut = frames(&sockets);
        let sizes: Vec<(usize, bool)> = cut.iter().map(|f| (f.len(), f[0].deaf)).collect();
        assert_eq!(
            sizes,
            vec![
                (10, true),
                (MAX_FDS, false),
                (300 - 10 - MAX_FDS, false),
                (20, true),
                (MAX_FDS, false),
                (380 - MAX_FDS, false)
            ]
        );
        let flat: Vec<u32> = cut
            .iter()
            .flat_map(|f| f.iter().map(|s| s.flow.0))
            .collect();
        assert_eq!(flat, (0..700).collect::<Vec<_>>());
        assert!(cut.iter().all(|f| f.iter().all(|s| s.deaf == f[0].deaf)));
        assert!(frames(&[]).is_empty());
    }

    #[test]
    fn taken_lists_only_flows_sent_and_each_once() {
        let sent: Vec<Offered> = (1..=5)
            .map(|i| Offered {
                flow: FlowId(i),
                socket: OfferFd::Lent(-1),
                deaf: true,
            })
            .collect();
        let ids = |v: &[u32]| v.iter().copied().map(FlowId).collect::<Vec<_>>();
        assert!(check_taken(&ids(&[1, 2, 3, 4, 5]), &sent).is_ok());
        assert!(check_taken(&ids(&[2, 4]), &sent).is_ok());
        assert!(check_taken(&ids(&[]), &sent).is_ok());
        assert!(check_taken(&ids(&[5, 1, 3]), &sent).is_ok(), "any order");
        for bad in [&[1, 6][..], &[3, 3], &[4, 2, 4], &[9]] {
            let err = check_taken(&ids(bad), &sent).unwrap_err();
            assert!(
                matches!(err, HandoverError::UnknownFlow(_)),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn deaf_filter_attaches_and_detaches() {
        let (client, _server) = pair();
        attach_deaf_filter(client.as_fd()).unwrap();
        detach_filter(client.as_fd()).unwrap();
        detach_filter(client.as_fd()).unwrap();
    }
}
