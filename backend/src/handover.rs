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
//!  freeze: drop-all socket filter on every flow
//!  HandoverOffer::lend(the flows' own sockets)
//!   └ abstract UNIX listener "\0baton-handover-…"
//!     + 32-byte random token  ── both in the stream's SourceRecord ──▶ take_over():
//!                                                   connect (abstract names are scoped
//!                                                   to the network namespace: reaching
//!                                                   it proves the namespace is shared)
//!   peer uid == ours?  ◀──────────── Hello { token }
//!   token right (once)?
//!   Sockets { flows } + fds ─────────────────────▶ every fd checked: TCP socket, same
//!   … (≤ MAX_FDS per frame)                        namespace, local and peer address
//!   Done { total } ──────────────────────────────▶ exactly as the record says
//!   ownership recorded ◀──────────── Taken { flows }
//!   Released ────────────────────────────────────▶ filters detached, flows rebuilt
//! ```
//!
//! * The source's sockets stay frozen (deaf) from SAVE until one of two things happens:
//!   the target takes them ([`OfferStatus::Taken`]: the source drops its descriptors,
//!   which closes nothing because the target holds the same open file descriptions, and
//!   never thaws them), or the source VM resumes ([`HandoverOffer::cancel`] succeeds: the
//!   source detaches its filters and carries on). Both decisions go through one mutex,
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
//!   helper (filter kept) frame by frame, right before sending each frame, so that the
//!   helper works on the next frame while the target checks this one; a cancel thaws
//!   them through it; a target never needs privilege.
//! * The target thaws (detaches the filters, thousands of them over two threads) only
//!   after `Released`: from then on the source has recorded that it no longer owns the
//!   sockets. Without `Released` the target closes its copies and fails: two owners
//!   would be worse than none.
//! * Everything from the peer is untrusted and bounded: the peer's uid must be ours
//!   (`SO_PEERCRED`), the token is compared in constant time and consumed by the first
//!   correct attempt, every step has a deadline ([`STEP_TIMEOUT`]), messages are
//!   bounds-checked ([`HandoverMessage::validate`]), descriptor counts must match, and
//!   every received descriptor is owned at once (closed on any error).
//! * Only system calls of the sandbox's allow-list are used: `socket(AF_UNIX,
//!   SOCK_STREAM)`, `bind`, `listen`, `accept4`, `connect`, `sendmsg`/`recvmsg`, `poll`,
//!   `getsockname`, `getsockopt` (`SO_PEERCRED`, `SO_PEERNAME` instead of `getpeername`,
//!   `SO_DOMAIN`/`SO_TYPE`/`SO_PROTOCOL`, `SO_NETNS_COOKIE`), `setsockopt`
//!   (`SO_ATTACH_FILTER`/`SO_DETACH_FILTER`), `getrandom`, `clone` (the offer thread;
//!   on the target a second thread that detaches half of the filters).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
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

/// `BPF_RET | BPF_K`: return the constant `k` (0 = drop the packet).
const BPF_RET_K: u16 = 0x06;

/// Attach the drop-all ("deaf") classic BPF filter: incoming segments are discarded
/// before TCP sees them — no ACK, no RST; the peer retransmits later. Unprivileged.
/// (The same primitive as `baton_tcp_repair::attach_deaf_filter`, which the backend does
/// not link.)
pub fn attach_deaf_filter(fd: BorrowedFd<'_>) -> io::Result<()> {
    let program = [libc::sock_filter {
        code: BPF_RET_K,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog` and the program it points to live across the call; the kernel
    // copies the program and only reads `size_of::<sock_fprog>()` bytes of `fprog`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Detach any socket filter; `ENOENT` (no filter) is not an error.
pub fn detach_filter(fd: BorrowedFd<'_>) -> io::Result<()> {
    let zero: libc::c_int = 0;
    // SAFETY: `zero` lives across the call and its size is passed; the kernel ignores it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DETACH_FILTER,
            (&zero as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(())
    } else {
        Err(err)
    }
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
    // getsockname tells the family (and fails the check for anything but IPv4/IPv6):
    // one `SO_DOMAIN` less per socket; a handover checks thousands.
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

/// Receive one message and its descriptors (each owned at once).
fn recv(sock: BorrowedFd<'_>) -> Result<(HandoverMessage, Vec<OwnedFd>), HandoverError> {
    let frame = transport::recv_frame(sock, deadline())?.ok_or(HandoverError::Closed)?;
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
}

#[derive(Debug)]
enum Phase {
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
/// mode at once (filter still attached): a socket closed in repair mode goes silently.
/// After a migration to another host the source closes its frozen copies sooner or
/// later (linger, backend exit); outside repair mode that close sends a FIN, or a RST
/// when data is queued, with sequence numbers the peer accepts — it would end the
/// connection the target has just restored. So repair mode is left only where the
/// source, or a same-host target, carries the connection on: right before the sockets
/// go to the target ([`serve_target`]; the unprivileged target then only detaches the
/// filter), and when the source VM resumes ([`HandoverOffer::cancel`] thaws them through
/// the helper).
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
    repaired: Arc<Mutex<Option<Repaired>>>,
    thread: JoinHandle<()>,
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
            })
            .collect();
        Self::start_inner(sockets, lifetime, None)
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
        let repaired = match repaired {
            Some((helper, flows)) if !flows.is_empty() => {
                let flows: HashSet<FlowId> = flows.into_iter().collect();
                // In the offer's order (`send_sockets` relies on it).
                let sockets = sockets
                    .iter()
                    .filter(|s| flows.contains(&s.flow))
                    .map(|s| Offered {
                        flow: s.flow,
                        socket: OfferFd::Lent(s.fd),
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
            })
            .collect();
        Self::start_inner(sockets, lifetime, repaired)
    }

    fn start_inner(
        sockets: Vec<Offered>,
        lifetime: Duration,
        repaired: Option<Repaired>,
    ) -> Result<Self, HandoverError> {
        if sockets.len() > MAX_HANDOVER_FLOWS {
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
        let phase = Arc::new(Mutex::new(Phase::Open(sockets)));
        let shared = Arc::clone(&phase);
        let shared_repaired = Arc::clone(&repaired);
        let thread = std::thread::Builder::new()
            .name("baton-handover".into())
            .spawn(move || serve(listener, token, shared, shared_repaired, lifetime))
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
            Phase::Open(_) => OfferStatus::Waiting,
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
        let mut phase = lock(&self.phase);
        if let Phase::Open(_) = &*phase {
            // Drops owned descriptors; lent ones stay with the flows.
            *phase = Phase::Closed;
        }
        drop(phase);
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
        let mut phase = lock(&self.phase);
        if let Phase::Open(_) = &*phase {
            *phase = Phase::Closed;
        }
        drop(phase);
        self.status()
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

    /// The source keeps its sockets: end repair mode (and detach the filter) on those
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
    phase: Arc<Mutex<Phase>>,
    repaired: Arc<Mutex<Option<Repaired>>>,
    lifetime: Duration,
) {
    let expires = Instant::now() + lifetime;
    loop {
        if !matches!(&*lock(&phase), Phase::Open(_)) {
            return;
        }
        if Instant::now() >= expires {
            tracing::warn!("TCP handover: no target came within {lifetime:?}; offer withdrawn");
            *lock(&phase) = Phase::Closed;
            return;
        }
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ACCEPT_POLL_MS)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(err) => {
                tracing::error!("TCP handover: poll: {err}; offer withdrawn");
                *lock(&phase) = Phase::Closed;
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
        match serve_target(conn.as_fd(), &token, &phase, &repaired) {
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
                *lock(&phase) = Phase::Closed;
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
    repaired: &Mutex<Option<Repaired>>,
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
        let mut phase = lock(phase);
        match std::mem::replace(&mut *phase, Phase::Sending) {
            Phase::Open(sockets) => sockets,
            other => {
                *phase = other;
                return Err(Served::Rejected(HandoverError::NotOpen));
            }
        }
    };
    // From here on the token is used up; owned descriptors in `sockets` close on return.
    let started = Instant::now();
    let result = send_sockets(conn, &sockets, repaired).and_then(|in_helper| {
        let (taken, _fds) = recv(conn)?;
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
    for batch in sockets.chunks(MAX_FDS) {
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
        send(conn, &HandoverMessage::Sockets { flows }, &fds)?;
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

/// End repair mode on `r.sockets[range]` through the helper, keeping the drop-all filter
/// (the target detaches it, which needs no privilege), without a window probe: the
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

/// Take the sockets of `expected` from the source at `endpoint`. On success every
/// socket was checked, the source has recorded that it gave them up, and their filters
/// are detached: the caller owns live connections. On error nothing was taken (the
/// received descriptors are closed; the source keeps its sockets).
pub fn take_over(
    endpoint: &HandoverEndpoint,
    expected: &[ExpectedSocket],
) -> Result<Vec<(FlowId, OwnedFd)>, HandoverError> {
    if expected.len() > MAX_HANDOVER_FLOWS {
        return Err(HandoverError::TooMany);
    }
    let conn = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(sys("handover: socket"))?;
    let addr =
        UnixAddr::new_abstract(&endpoint.abstract_name).map_err(sys("handover: socket name"))?;
    connect(conn.as_raw_fd(), &addr).map_err(sys(
        "handover: connect to the source (not on this host, or not in this network namespace?)",
    ))?;
    let result = take_over_on(conn.as_fd(), endpoint, expected);
    if let Err(err) = &result {
        if !matches!(err, HandoverError::Refused(_) | HandoverError::Closed) {
            refuse(conn.as_fd(), err);
        }
    }
    result
}

fn take_over_on(
    conn: BorrowedFd<'_>,
    endpoint: &HandoverEndpoint,
    expected: &[ExpectedSocket],
) -> Result<Vec<(FlowId, OwnedFd)>, HandoverError> {
    check_uid(conn)?;
    send(
        conn,
        &HandoverMessage::Hello {
            token: endpoint.token,
        },
        &[],
    )?;
    let wanted: HashMap<FlowId, &HostSocketEnds> =
        expected.iter().map(|e| (e.flow, &e.host)).collect();
    let mut seen: HashSet<FlowId> = HashSet::with_capacity(expected.len());
    let ours = netns_cookie_here().map_err(|source| HandoverError::Sys {
        step: "handover: SO_NETNS_COOKIE of this namespace",
        source,
    })?;
    let mut received: Vec<(FlowId, OwnedFd)> = Vec::with_capacity(expected.len());
    let started = Instant::now();
    loop {
        let (msg, fds) = recv(conn)?;
        match msg {
            HandoverMessage::Sockets { flows } => {
                if flows.len() != fds.len() {
                    return Err(HandoverError::FdCount {
                        announced: fds.len(),
                        flows: flows.len(),
                        received: fds.len(),
                    });
                }
                for (flow, fd) in flows.into_iter().zip(fds) {
                    let host = wanted
                        .get(&flow)
                        .ok_or(HandoverError::UnknownFlow(flow.0))?;
                    if !seen.insert(flow) {
                        return Err(HandoverError::UnknownFlow(flow.0));
                    }
                    check_socket_in(fd.as_fd(), host, ours).map_err(|reason| {
                        HandoverError::BadSocket {
                            flow: flow.0,
                            reason,
                        }
                    })?;
                    received.push((flow, fd));
                }
            }
            HandoverMessage::Done { total } => {
                if total as usize != received.len() || received.len() != expected.len() {
                    return Err(HandoverError::Incomplete {
                        got: received.len(),
                        want: expected.len(),
                    });
                }
                break;
            }
            _ => return Err(HandoverError::Unexpected("Sockets or Done")),
        }
    }
    let checked = started.elapsed();
    let flows = received.iter().map(|(f, _)| *f).collect();
    send(conn, &HandoverMessage::Taken { flows }, &[])?;
    let (released, _fds) = recv(conn)?;
    if released != HandoverMessage::Released {
        return Err(HandoverError::Unexpected("Released"));
    }
    let thawing = Instant::now();
    detach_all(&received)?;
    tracing::info!(
        "TCP handover: {} socket(s) taken over: received and checked in {:.1} ms (waiting \
         for the source included), released after {:.1} ms more, filters detached in \
         {:.1} ms",
        received.len(),
        checked.as_secs_f64() * 1e3,
        (thawing - started - checked).as_secs_f64() * 1e3,
        thawing.elapsed().as_secs_f64() * 1e3,
    );
    Ok(received)
}

/// From how many sockets [`detach_all`] splits the work over two threads.
const PARALLEL_DETACH_FROM: usize = 1024;

/// Detach the filters of all `received` sockets (after `Released`). Each is a system
/// call (about a microsecond) and the exchange is over at this point, so many sockets
/// are split over this thread and one more (8,000 sockets: 4–5 ms instead of 7.5 on an
/// otherwise idle core); without that thread, this one does all.
fn detach_all(received: &[(FlowId, OwnedFd)]) -> Result<(), HandoverError> {
    let detach = |part: &[(FlowId, OwnedFd)]| -> Result<(), HandoverError> {
        for (flow, fd) in part {
            detach_filter(fd.as_fd()).map_err(|e| HandoverError::BadSocket {
                flow: flow.0,
                reason: format!("detaching the filter: {e}"),
            })?;
        }
        Ok(())
    };
    if received.len() < PARALLEL_DETACH_FROM {
        return detach(received);
    }
    let (mine, theirs) = received.split_at(received.len() / 2);
    std::thread::scope(|scope| {
        let other = std::thread::Builder::new()
            .name("baton-handover-thaw".into())
            .spawn_scoped(scope, || detach(theirs));
        match other {
            Ok(thread) => {
                let here = detach(mine);
                let there = thread.join().unwrap_or_else(|_| {
                    Err(HandoverError::Sys {
                        step: "handover: detaching filters on a second thread",
                        source: io::Error::other("the thread ended abnormally"),
                    })
                });
                here.and(there)
            }
            Err(err) => {
                tracing::debug!("TCP handover: no second thread to detach filters ({err})");
                detach(received)
            }
        }
    })
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
        assert!(matches!(err, HandoverError::Sys { .. }), "{err}");
    }

    #[test]
    fn taken_lists_only_flows_sent_and_each_once() {
        let sent: Vec<Offered> = (1..=5)
            .map(|i| Offered {
                flow: FlowId(i),
                socket: OfferFd::Lent(-1),
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
