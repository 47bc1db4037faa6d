//! The backend's side of the helper protocol.
//!
//! Theory of operation:
//!
//! * A [`RepairClient`] owns one UNIX stream connection to a `baton-repair` helper. It is
//!   obtained in one of two ways, and both end with the same hello exchange
//!   ([`RepairClient::from_stream`]):
//!   - [`RepairListener`]: the backend listens on a `*.repair` socket (mode 0600) and a
//!     helper started by someone else (a management daemon, KubeVirt-style) connects. The
//!     listener accepts only peers whose `SO_PEERCRED` uid is ours or root.
//!   - [`RepairClient::spawn`]: the backend starts the helper itself on a socketpair end
//!     passed as `--fd N`.
//! * Hello: we send our version range and the capabilities we want; the helper answers
//!   with the one version it chose and the capabilities it offers. Every read has a
//!   deadline, so a helper that says nothing is an error, never a hang.
//! * Each operation ([`RepairClient::dump`], [`RepairClient::thaw`],
//!   [`RepairClient::restore`], [`RepairClient::set_repair`]) takes any number of sockets,
//!   splits them into batches the protocol accepts (at most [`MAX_FDS`] descriptors and at
//!   most [`MAX_BATCH_QUEUE_BYTES`] of queue data per frame), sends one request per batch
//!   and concatenates the per-socket results in the caller's order. Dump and restore
//!   keep two requests in flight, so that the helper works on the next batch while we
//!   decode the last reply (`exchange_pipelined` says why that cannot deadlock).
//! * Pre-dump ([`RepairClient::pre_dump`], [`RepairClient::freeze_check`]) needs protocol
//!   version 2 and the helper's [`caps::PRE_DUMP`]; [`RepairClient::supports_pre_dump`]
//!   says whether the helper has them, and without them the two methods fail before
//!   sending anything ([`ClientError::NeedsVersion`] / [`ClientError::NotOffered`]), so
//!   a version-1 helper keeps working with plain dumps. Both batch and pipeline like
//!   dump.
//! * One request, one reply. A transport failure (timeout, closed, undecodable reply)
//!   leaves the stream in an unknown position, so the client then refuses further use
//!   ([`ClientError::Broken`]); a well-formed but wrong reply does not.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_proto::frame::MAX_FDS;
use baton_proto::repair::{
    caps, FreezeCheck, Hello, PreDumped, ProgressMark, ProtocolError, RepairMode, Reply,
    RestoreReport, SocketResult, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
};
use baton_proto::tcp::{StateError, TcpConnState, MAX_BATCH_QUEUE_BYTES};
use baton_proto::DecodeError;
use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    UnixAddr,
};
use nix::sys::stat::{fchmod, Mode};
use serde::Serialize;

use crate::transport::{self, deadline_after, TransportError};

/// How long one exchange with the helper may take unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the helper.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("repair helper, {request}: {source}")]
    Transport {
        request: &'static str,
        #[source]
        source: TransportError,
    },
    #[error("repair helper closed the connection instead of answering {request}")]
    HelperClosed { request: &'static str },
    /// The helper refused the whole request.
    #[error("repair helper refused the request: {0}")]
    Refused(ProtocolError),
    #[error("repair helper answered {request} with a {got} reply")]
    UnexpectedReply {
        request: &'static str,
        got: &'static str,
    },
    #[error("repair helper answered {request} for {expected} sockets with {got} results")]
    ResultCount {
        request: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("repair helper's reply to {request} does not decode: {source}")]
    Decode {
        request: &'static str,
        #[source]
        source: DecodeError,
    },
    #[error("repair helper's reply to {request} carried {count} file descriptors (none expected)")]
    UnexpectedFds { request: &'static str, count: usize },
    #[error("repair helper's hello is not acceptable: {0}")]
    BadHello(String),
    #[error("repair helper does not offer {op} (offers capabilities {offered:#x})")]
    NotOffered { op: &'static str, offered: u64 },
    #[error("repair helper speaks protocol version {version}; {op} needs version {needs}")]
    NeedsVersion {
        op: &'static str,
        needs: u16,
        version: u16,
    },
    #[error("restore: state {index} is invalid: {source}")]
    InvalidState {
        index: usize,
        #[source]
        source: StateError,
    },
    #[error("an earlier exchange with the repair helper failed; the connection is out of sync")]
    Broken,
    #[error("{step} {path}: {source}", path = path.display())]
    Path {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{step}: {errno}")]
    Sys { step: &'static str, errno: Errno },
    #[error("no repair helper connected to {path} within {timeout:?}", path = path.display())]
    AcceptTimedOut { path: PathBuf, timeout: Duration },
}

/// A connection to a `baton-repair` helper after a successful hello.
///
/// [`RepairClient::share`] gives more handles onto the same connection (for another
/// thread, or for a part of the program that must act later, such as thawing sockets
/// when a migrated VM resumes): exchanges are serialised by a lock, so that one request
/// and its reply are never interleaved with another handle's.
#[derive(Debug)]
pub struct RepairClient {
    shared: Arc<Shared>,
    timeout: Duration,
    /// The protocol version the helper chose.
    version: u16,
    /// The helper's hello (its capabilities and software string).
    helper_hello: Hello,
}

/// What every handle of one helper connection shares.
#[derive(Debug)]
struct Shared {
    stream: UnixStream,
    /// Held for one request and its reply.
    exchange: Mutex<()>,
    /// Set once a transport error left the stream at an unknown position.
    broken: AtomicBool,
}

/// A request as it goes on the wire, borrowing the states instead of copying their
/// queues. Same variants in the same order as [`baton_proto::repair::Request`], so that it encodes to the same
/// bytes (a test below holds this).
#[derive(Serialize)]
enum RequestOnWire<'a> {
    Hello(&'a Hello),
    Dump,
    Thaw,
    Restore(Vec<&'a TcpConnState>),
    SetRepair(RepairMode),
    Freeze,
    PreDump,
    FreezeCheck(&'a [ProgressMark]),
}

impl RequestOnWire<'_> {
    fn name(&self) -> &'static str {
        match self {
            RequestOnWire::Hello(_) => "Hello",
            RequestOnWire::Dump => "Dump",
            RequestOnWire::Thaw => "Thaw",
            RequestOnWire::Restore(_) => "Restore",
            RequestOnWire::SetRepair(_) => "SetRepair",
            RequestOnWire::Freeze => "Freeze",
            RequestOnWire::PreDump => "PreDump",
            RequestOnWire::FreezeCheck(_) => "FreezeCheck",
        }
    }
}

fn reply_name(reply: &Reply) -> &'static str {
    match reply {
        Reply::Hello(_) => "Hello",
        Reply::Dumped(_) => "Dumped",
        Reply::Thawed(_) => "Thawed",
        Reply::Restored(_) => "Restored",
        Reply::RepairSet(_) => "RepairSet",
        Reply::Error(_) => "Error",
        Reply::Frozen(_) => "Frozen",
        Reply::PreDumped(_) => "PreDumped",
        Reply::FreezeChecked(_) => "FreezeChecked",
    }
}

impl RepairClient {
    /// Do the hello exchange on a connected stream. Every read and write is bounded by
    /// `timeout`, which also becomes the per-exchange timeout of later operations.
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> Result<Self, ClientError> {
        let mut client = RepairClient {
            shared: Arc::new(Shared {
                stream,
                exchange: Mutex::new(()),
                broken: AtomicBool::new(false),
            }),
            timeout,
            version: 0,
            helper_hello: Hello::ours(0),
        };
        let ours = Hello::ours(caps::ALL_V2);
        let reply = client.exchange(&RequestOnWire::Hello(&ours), &[])?;
        let theirs = match reply {
            Reply::Hello(theirs) => theirs,
            Reply::Error(e) => return Err(ClientError::Refused(e)),
            other => {
                return Err(ClientError::UnexpectedReply {
                    request: "Hello",
                    got: reply_name(&other),
                })
            }
        };
        if theirs.min_version != theirs.max_version {
            return Err(ClientError::BadHello(format!(
                "helper answered with a version range {}..={} instead of one version",
                theirs.min_version, theirs.max_version
            )));
        }
        let version = theirs.max_version;
        if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION_MAX).contains(&version) {
            return Err(ClientError::BadHello(format!(
                "helper chose version {version}, we speak {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}"
            )));
        }
        tracing::debug!(
            version,
            capabilities = format_args!("{:#x}", theirs.capabilities),
            software = %theirs.software.escape_debug(),
            "repair helper connected"
        );
        client.version = version;
        client.helper_hello = theirs;
        Ok(client)
    }

    /// Start the helper at `helper_path` with `extra_args` and `--fd N` (its end of a
    /// socketpair), then do the hello with [`DEFAULT_TIMEOUT`]. The caller owns the
    /// returned child (wait for it after dropping the client: the helper exits when its
    /// connection closes). If the hello fails, the child is killed and reaped.
    pub fn spawn<I, S>(
        helper_path: impl AsRef<Path>,
        extra_args: I,
    ) -> Result<(Self, Child), ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let helper_path = helper_path.as_ref();
        let (ours, theirs) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|errno| ClientError::Sys {
            step: "spawn repair helper: socketpair",
            errno,
        })?;
        let theirs_raw = theirs.as_raw_fd();
        let mut command = Command::new(helper_path);
        command
            .args(extra_args)
            .arg("--fd")
            .arg(theirs_raw.to_string())
            .stdin(Stdio::null());
        // SAFETY: the closure runs in the forked child between fork and exec. It only
        // calls fcntl(2), which is async-signal-safe, on a descriptor the child inherited
        // (the parent keeps `theirs` open until spawn returns), and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(theirs_raw, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| ClientError::Path {
            step: "spawn repair helper",
            path: helper_path.to_path_buf(),
            source,
        })?;
        drop(theirs);
        match RepairClient::from_stream(UnixStream::from(ours), DEFAULT_TIMEOUT) {
            Ok(client) => Ok((client, child)),
            Err(e) => {
                // Already exited (the usual case) or stuck: either way, do not leave it.
                let _ = child.kill();
                let status = child.wait();
                tracing::warn!(
                    ?status,
                    "repair helper {} failed to start: {e}",
                    helper_path.display()
                );
                Err(e)
            }
        }
    }

    /// The protocol version the helper chose.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The capabilities the helper offers ([`caps`] bits).
    pub fn helper_capabilities(&self) -> u64 {
        self.helper_hello.capabilities
    }

    /// The helper's software string (untrusted text, for logs).
    pub fn helper_software(&self) -> &str {
        &self.helper_hello.software
    }

    /// Change the per-exchange timeout (of this handle).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Another handle onto the same helper connection. Requests through either are
    /// serialised; a connection that broke is broken for every handle.
    pub fn share(&self) -> RepairClient {
        RepairClient {
            shared: Arc::clone(&self.shared),
            timeout: self.timeout,
            version: self.version,
            helper_hello: self.helper_hello.clone(),
        }
    }

    /// Freeze each socket and return its complete state (one result per socket, in order).
    /// The sockets stay frozen; undo with [`RepairClient::thaw`].
    pub fn dump(
        &mut self,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<Vec<SocketResult<TcpConnState>>, ClientError> {
        self.require(caps::DUMP, "Dump")?;
        let sizes: Vec<usize> = sockets.iter().map(|fd| queued_bytes(*fd)).collect();
        self.per_socket_pipelined(
            "Dump",
            sockets,
            &sizes,
            |_| RequestOnWire::Dump,
            |reply| match reply {
                Reply::Dumped(states) => Ok(states),
                other => Err(other),
            },
        )
    }

    /// Undo a dump on each socket: it becomes live again.
    pub fn thaw(
        &mut self,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<Vec<SocketResult<()>>, ClientError> {
        self.require(caps::THAW, "Thaw")?;
        let mut results = Vec::with_capacity(sockets.len());
        for fds in sockets.chunks(MAX_FDS) {
            match self.exchange(&RequestOnWire::Thaw, fds)? {
                Reply::Thawed(done) => {
                    check_count("Thaw", fds.len(), done.len())?;
                    results.extend(done);
                }
                other => return Err(wrong_reply("Thaw", other)),
            }
        }
        Ok(results)
    }

    /// Rebuild each state in its fresh socket. States are checked here first, so that a
    /// bad one is reported by index instead of making the helper refuse a whole batch.
    pub fn restore(
        &mut self,
        items: &[(BorrowedFd<'_>, &TcpConnState)],
    ) -> Result<Vec<SocketResult<RestoreReport>>, ClientError> {
        self.require(caps::RESTORE, "Restore")?;
        for (index, (_, state)) in items.iter().enumerate() {
            state
                .validate()
                .map_err(|source| ClientError::InvalidState { index, source })?;
        }
        let sizes: Vec<usize> = items
            .iter()
            .map(|(_, s)| s.send_queue.len() + s.recv_queue.len())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = items.iter().map(|(fd, _)| *fd).collect();
        self.per_socket_pipelined(
            "Restore",
            &fds,
            &sizes,
            |batch| RequestOnWire::Restore(items[batch].iter().map(|(_, s)| *s).collect()),
            |reply| match reply {
                Reply::Restored(reports) => Ok(reports),
                other => Err(other),
            },
        )
    }

    /// Set `TCP_REPAIR` to `mode` on each socket.
    pub fn set_repair(
        &mut self,
        sockets: &[BorrowedFd<'_>],
        mode: RepairMode,
    ) -> Result<Vec<SocketResult<()>>, ClientError> {
        self.require(caps::SET_REPAIR, "SetRepair")?;
        let mut results = Vec::with_capacity(sockets.len());
        for fds in sockets.chunks(MAX_FDS) {
            match self.exchange(&RequestOnWire::SetRepair(mode), fds)? {
                Reply::RepairSet(done) => {
                    check_count("SetRepair", fds.len(), done.len())?;
                    results.extend(done);
                }
                other => return Err(wrong_reply("SetRepair", other)),
            }
        }
        Ok(results)
    }

    /// Freeze each socket (deaf: `baton_tcp_repair::make_deaf`, no repair mode) for a
    /// same-host handover. Undo with `baton_tcp_repair::make_hearing`, which needs no
    /// privilege. (The freeze itself needs none either where the kernel has TCP-MD5; the
    /// helper's fallback, the socket filter, does.)
    pub fn freeze(
        &mut self,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<Vec<SocketResult<()>>, ClientError> {
        self.require(caps::FREEZE, "Freeze")?;
        let mut results = Vec::with_capacity(sockets.len());
        for fds in sockets.chunks(MAX_FDS) {
            match self.exchange(&RequestOnWire::Freeze, fds)? {
                Reply::Frozen(done) => {
                    check_count("Freeze", fds.len(), done.len())?;
                    results.extend(done);
                }
                other => return Err(wrong_reply("Freeze", other)),
            }
        }
        Ok(results)
    }

    /// Whether the helper takes [`RepairClient::pre_dump`] and
    /// [`RepairClient::freeze_check`]: protocol version 2 was negotiated and the helper
    /// offers [`caps::PRE_DUMP`]. Otherwise use [`RepairClient::dump`] at the freeze.
    pub fn supports_pre_dump(&self) -> bool {
        self.version >= 2 && self.helper_hello.capabilities & caps::PRE_DUMP != 0
    }

    /// Read each *live* socket's complete state without freezing it, for a later
    /// [`RepairClient::freeze_check`] (one result per socket, in order). `Ok(None)`: the
    /// connection moved while the helper read it; try again later or dump it at the
    /// freeze. The sockets stay live; the caller must do no I/O on them until this
    /// returns.
    pub fn pre_dump(
        &mut self,
        sockets: &[BorrowedFd<'_>],
    ) -> Result<Vec<SocketResult<Option<PreDumped>>>, ClientError> {
        self.require_pre_dump("PreDump")?;
        let sizes: Vec<usize> = sockets.iter().map(|fd| queued_bytes(*fd)).collect();
        self.per_socket_pipelined(
            "PreDump",
            sockets,
            &sizes,
            |_| RequestOnWire::PreDump,
            |reply| match reply {
                Reply::PreDumped(states) => Ok(states),
                other => Err(other),
            },
        )
    }

    /// Freeze each socket exactly as [`RepairClient::dump`] does and check it against
    /// the progress mark of its pre-dump: [`FreezeCheck::Unchanged`] (use the pre-dumped
    /// state with the fresh timestamp and peek offset, [`FreezeCheck::into_state`]) or
    /// [`FreezeCheck::Dumped`] (the complete state, read now). One result per socket, in
    /// order; the sockets stay frozen, undo with [`RepairClient::thaw`].
    pub fn freeze_check(
        &mut self,
        items: &[(BorrowedFd<'_>, ProgressMark)],
    ) -> Result<Vec<SocketResult<FreezeCheck>>, ClientError> {
        self.require_pre_dump("FreezeCheck")?;
        let sizes: Vec<usize> = items.iter().map(|(fd, _)| queued_bytes(*fd)).collect();
        let fds: Vec<BorrowedFd<'_>> = items.iter().map(|(fd, _)| *fd).collect();
        let marks: Vec<ProgressMark> = items.iter().map(|(_, mark)| *mark).collect();
        self.per_socket_pipelined(
            "FreezeCheck",
            &fds,
            &sizes,
            |batch| RequestOnWire::FreezeCheck(&marks[batch]),
            |reply| match reply {
                Reply::FreezeChecked(checks) => Ok(checks),
                other => Err(other),
            },
        )
    }

    /// `op` on every socket of `fds`: one request per batch planned from `sizes` (the
    /// bytes each socket's state carries), built by `request` for the batch's range,
    /// kept in flight as [`Self::exchange_pipelined`] does; `unpack` takes a reply's
    /// per-socket results, or gives back a reply of another kind.
    fn per_socket_pipelined<'w, T>(
        &mut self,
        op: &'static str,
        fds: &[BorrowedFd<'_>],
        sizes: &[usize],
        request: impl Fn(std::ops::Range<usize>) -> RequestOnWire<'w>,
        unpack: impl Fn(Reply) -> Result<Vec<SocketResult<T>>, Reply>,
    ) -> Result<Vec<SocketResult<T>>, ClientError> {
        let batches: Vec<(RequestOnWire<'w>, &[BorrowedFd<'_>])> = plan_batches(sizes)
            .into_iter()
            .map(|batch| (request(batch.clone()), &fds[batch]))
            .collect();
        let mut results = Vec::with_capacity(fds.len());
        self.exchange_pipelined(&batches, |count, reply| {
            let done = unpack(reply).map_err(|other| wrong_reply(op, other))?;
            check_count(op, count, done.len())?;
            results.extend(done);
            Ok(())
        })?;
        Ok(results)
    }

    fn require_pre_dump(&self, op: &'static str) -> Result<(), ClientError> {
        if self.supports_pre_dump() {
            Ok(())
        } else if self.version < 2 {
            Err(ClientError::NeedsVersion {
                op,
                needs: 2,
                version: self.version,
            })
        } else {
            self.require(caps::PRE_DUMP, op)
        }
    }

    fn require(&self, capability: u64, op: &'static str) -> Result<(), ClientError> {
        if self.helper_hello.capabilities & capability == capability {
            Ok(())
        } else {
            Err(ClientError::NotOffered {
                op,
                offered: self.helper_hello.capabilities,
            })
        }
    }

    /// Send one request with `fds`, read its one reply.
    fn exchange(
        &mut self,
        request: &RequestOnWire<'_>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<Reply, ClientError> {
        let mut reply = None;
        self.exchange_pipelined(&[(request, fds)], |_, r| {
            reply = Some(r);
            Ok(())
        })?;
        reply.ok_or(ClientError::HelperClosed {
            request: request.name(),
        })
    }

    /// Send `batches` (requests with their descriptors) and hand each reply, in order,
    /// to `on_reply` with the batch's descriptor count. Two requests are kept in flight:
    /// the helper starts on batch k+1 as soon as it has answered batch k, while we decode
    /// that answer. This cannot deadlock on full socket buffers because no request kind
    /// has both a large request and a large reply: dump and pre-dump requests are a few
    /// bytes and freeze-check requests a few KiB (17 bytes per mark), their replies
    /// large; restore requests large (and their replies a few KiB, far below a socket
    /// buffer), so whichever side writes the large message finds the
    /// other side's small one already buffered. After the first error (from `on_reply`
    /// or a refusal) nothing more is sent, the reply to the request still in flight is
    /// read (and dropped, like the results of earlier batches) so that the stream stays
    /// in sync, and the error is returned.
    fn exchange_pipelined<'w, R: std::borrow::Borrow<RequestOnWire<'w>>>(
        &mut self,
        batches: &[(R, &[BorrowedFd<'_>])],
        mut on_reply: impl FnMut(usize, Reply) -> Result<(), ClientError>,
    ) -> Result<(), ClientError> {
        // A poisoned lock only means another handle panicked between two frames; the
        // `broken` flag says whether the stream is still in sync.
        let shared = Arc::clone(&self.shared);
        let _turn = shared
            .exchange
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.shared.broken.load(Ordering::SeqCst) {
            return Err(ClientError::Broken);
        }
        let mut sent = 0;
        let mut received = 0;
        let mut failed: Option<ClientError> = None;
        let result = 'exchange: loop {
            while failed.is_none() && sent < batches.len() && sent < received + 2 {
                let (request, fds) = &batches[sent];
                if let Err(e) = self.send_request(request.borrow(), fds) {
                    break 'exchange Err(e);
                }
                sent += 1;
            }
            if received == sent {
                break failed.map_or(Ok(()), Err);
            }
            let (request, fds) = &batches[received];
            let reply = match self.recv_reply(request.borrow().name()) {
                Ok(reply) => reply,
                Err(e) => break Err(e),
            };
            received += 1;
            if failed.is_none() {
                failed = on_reply(fds.len(), reply).err();
            }
        };
        if let Err(e) = &result {
            if matches!(
                e,
                ClientError::Transport { .. }
                    | ClientError::HelperClosed { .. }
                    | ClientError::Decode { .. }
                    | ClientError::UnexpectedFds { .. }
            ) {
                self.shared.broken.store(true, Ordering::SeqCst);
            }
        }
        result
    }

    fn transport_error(request: &'static str) -> impl Fn(TransportError) -> ClientError {
        move |source: TransportError| {
            if source.is_peer_gone() {
                ClientError::HelperClosed { request }
            } else {
                ClientError::Transport { request, source }
            }
        }
    }

    fn send_request(
        &self,
        request: &RequestOnWire<'_>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let deadline = deadline_after(self.timeout);
        transport::send_message(self.shared.stream.as_fd(), request, fds, deadline)
            .map_err(Self::transport_error(request.name()))
    }

    fn recv_reply(&self, name: &'static str) -> Result<Reply, ClientError> {
        let deadline = deadline_after(self.timeout);
        let frame = transport::recv_frame(self.shared.stream.as_fd(), deadline)
            .map_err(Self::transport_error(name))?
            .ok_or(ClientError::HelperClosed { request: name })?;
        if frame.fds_received() != 0 || frame.header.fd_count != 0 || frame.control_truncated {
            return Err(ClientError::UnexpectedFds {
                request: name,
                count: frame.fds_received().max(usize::from(frame.header.fd_count)),
            });
        }
        let reply: Reply =
            baton_proto::decode(&frame.body).map_err(|source| ClientError::Decode {
                request: name,
                source,
            })?;
        Ok(reply)
    }
}

impl AsFd for RepairClient {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.stream.as_fd()
    }
}

fn check_count(request: &'static str, expected: usize, got: usize) -> Result<(), ClientError> {
    if expected == got {
        Ok(())
    } else {
        Err(ClientError::ResultCount {
            request,
            expected,
            got,
        })
    }
}

fn wrong_reply(request: &'static str, reply: Reply) -> ClientError {
    match reply {
        Reply::Error(e) => ClientError::Refused(e),
        other => ClientError::UnexpectedReply {
            request,
            got: reply_name(&other),
        },
    }
}

/// Bytes queued in a socket (`SIOCINQ` + `SIOCOUTQ`, both unprivileged), an estimate of
/// what its dumped state will carry. 0 when the socket does not answer (the helper will
/// report why it cannot dump it).
fn queued_bytes(fd: BorrowedFd<'_>) -> usize {
    let mut total = 0usize;
    // SIOCINQ == FIONREAD and SIOCOUTQ == TIOCOUTQ on Linux.
    for request in [libc::FIONREAD, libc::TIOCOUTQ] {
        let mut bytes: libc::c_int = 0;
        // SAFETY: both ioctls write one c_int through the pointer, which points to a live
        // local; `fd` is a valid descriptor for the duration of the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut bytes as *mut libc::c_int) };
        if rc == 0 {
            total = total.saturating_add(usize::try_from(bytes).unwrap_or(0));
        }
    }
    total
}

/// Split items with the given queue sizes into consecutive batches of at most
/// [`MAX_FDS`] items and at most [`MAX_BATCH_QUEUE_BYTES`] (an item larger than that on
/// its own gets a batch of its own).
pub fn plan_batches(queue_sizes: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut batches = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (index, &size) in queue_sizes.iter().enumerate() {
        let full = index - start == MAX_FDS || bytes.saturating_add(size) > MAX_BATCH_QUEUE_BYTES;
        if full && index > start {
            batches.push(start..index);
            start = index;
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
    }
    if start < queue_sizes.len() {
        batches.push(start..queue_sizes.len());
    }
    batches
}

/// The backend's `*.repair` socket, which a helper started by someone else connects to.
/// The socket file is removed when the listener is dropped.
#[derive(Debug)]
pub struct RepairListener {
    listener: OwnedFd,
    path: PathBuf,
}

impl RepairListener {
    /// Listen on `path` with file mode 0600. A stale socket file (nobody listening) is
    /// removed first; a live one, or a file that is not a socket, is an error.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let path_error = |step: &'static str| {
            move |source: io::Error| ClientError::Path {
                step,
                path: path.to_path_buf(),
                source,
            }
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(path_error("repair socket: already in use")(
                        io::Error::from(io::ErrorKind::AddrInUse),
                    ))
                }
                Err(_) => {
                    std::fs::remove_file(path).map_err(path_error("repair socket: remove stale"))?
                }
            },
            Ok(_) => {
                return Err(path_error("repair socket: exists and is not a socket")(
                    io::Error::from(io::ErrorKind::AlreadyExists),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(path_error("repair socket: stat")(e)),
        }

        let sys = |step: &'static str| move |errno: Errno| ClientError::Sys { step, errno };
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(sys("repair socket: socket"))?;
        // Linux creates the socket file with the socket inode's mode (minus umask), so
        // setting it before bind leaves no window in which others could connect, and no
        // chmod of a path is needed (the backend's sandbox does not allow one).
        fchmod(listener.as_raw_fd(), Mode::from_bits_truncate(0o600))
            .map_err(sys("repair socket: fchmod"))?;
        let addr = UnixAddr::new(path).map_err(|errno| ClientError::Path {
            step: "repair socket: address",
            path: path.to_path_buf(),
            source: errno.into(),
        })?;
        bind(listener.as_raw_fd(), &addr).map_err(|errno| ClientError::Path {
            step: "repair socket: bind",
            path: path.to_path_buf(),
            source: errno.into(),
        })?;
        let listener = RepairListener {
            listener,
            path: path.to_path_buf(),
        };
        listen(
            &listener.listener,
            Backlog::new(1).unwrap_or(Backlog::MAXCONN),
        )
        .map_err(sys("repair socket: listen"))?;
        Ok(listener)
    }

    /// The socket file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wait up to `timeout` for a helper whose uid is ours or root, then do the hello
    /// (with `timeout` again). Peers with any other uid are logged and closed, and the
    /// wait goes on.
    pub fn accept(&self, timeout: Duration) -> Result<RepairClient, ClientError> {
        let deadline = deadline_after(timeout);
        let our_uid = nix::unistd::geteuid().as_raw();
        loop {
            match accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(raw) => {
                    // SAFETY: accept4 returned a new descriptor that nothing else owns.
                    let conn = unsafe { OwnedFd::from_raw_fd(raw) };
                    let creds = getsockopt(&conn, sockopt::PeerCredentials).map_err(|errno| {
                        ClientError::Sys {
                            step: "repair socket: SO_PEERCRED",
                            errno,
                        }
                    })?;
                    if creds.uid() != our_uid && creds.uid() != 0 {
                        tracing::warn!(
                            uid = creds.uid(),
                            pid = creds.pid(),
                            "repair socket {}: refusing a peer that is neither uid {our_uid} nor root",
                            self.path.display()
                        );
                        continue;
                    }
                    tracing::info!(
                        uid = creds.uid(),
                        pid = creds.pid(),
                        "repair helper attached"
                    );
                    return RepairClient::from_stream(UnixStream::from(conn), timeout);
                }
                Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(Errno::EAGAIN) => {}
                Err(errno) => {
                    return Err(ClientError::Sys {
                        step: "repair socket: accept",
                        errno,
                    })
                }
            }
            let left = match deadline {
                Some(deadline) => deadline.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                return Err(ClientError::AcceptTimedOut {
                    path: self.path.clone(),
                    timeout,
                });
            }
            let millis = left.as_millis().saturating_add(1);
            let poll_timeout =
                nix::poll::PollTimeout::try_from(millis).unwrap_or(nix::poll::PollTimeout::MAX);
            let mut pollfds = [nix::poll::PollFd::new(
                self.listener.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut pollfds, poll_timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => {
                    return Err(ClientError::Sys {
                        step: "repair socket: poll",
                        errno,
                    })
                }
            }
        }
    }
}

impl AsFd for RepairListener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

impl Drop for RepairListener {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!("repair socket {}: remove: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proto::repair::{ProtocolErrorKind, Request, SocketError};
    use baton_proto::tcp::{
        Endpoint, NegotiatedOptions, SocketFamily, SocketOptions, TcpState, MAX_QUEUE_BYTES,
    };

    fn sample_state(queue: usize) -> TcpConnState {
        TcpConnState {
            family: SocketFamily::Inet,
            v6only: false,
            local: Endpoint::V4 {
                addr: [127, 0, 0, 1],
                port: 1000,
            },
            peer: Endpoint::V4 {
                addr: [127, 0, 0, 1],
                port: 2000,
            },
            state: TcpState::Established,
            snd_una: 100,
            write_seq: 100u32.wrapping_add(queue as u32),
            rcv_nxt: 5,
            send_queue: vec![0xab; queue],
            send_unsent: 0,
            recv_queue: vec![1, 2, 3],
            options: NegotiatedOptions {
                mss_clamp: 1460,
                sack: true,
                wscale: None,
                timestamps: true,
            },
            timestamp: 42,
            window: None,
            sockopts: SocketOptions {
                sndbuf: 1,
                rcvbuf: 2,
                buf_lock: 0,
                reuseaddr: false,
                reuseport: false,
                peek_off: -1,
                nodelay: true,
                keepalive: false,
                keepidle: 0,
                keepintvl: 0,
                keepcnt: 0,
                user_timeout: 0,
                congestion: "cubic".into(),
                notsent_lowat: 0,
                mark: 0,
                priority: 0,
                ip_tos: Some(0),
                ip_ttl: Some(64),
                ipv6_tclass: None,
                ipv6_hops: None,
            },
        }
    }

    #[test]
    fn borrowed_request_encodes_like_the_proto_request() {
        let hello = Hello::ours(caps::ALL_V2);
        let a = sample_state(10);
        let b = sample_state(0);
        let marks = [mark(1), mark(2)];
        let cases: Vec<(RequestOnWire<'_>, Request)> = vec![
            (RequestOnWire::Hello(&hello), Request::Hello(hello.clone())),
            (RequestOnWire::Dump, Request::Dump),
            (RequestOnWire::Thaw, Request::Thaw),
            (
                RequestOnWire::Restore(vec![&a, &b]),
                Request::Restore(vec![a.clone(), b.clone()]),
            ),
            (
                RequestOnWire::SetRepair(RepairMode::OffNoWindowProbe),
                Request::SetRepair(RepairMode::OffNoWindowProbe),
            ),
            (RequestOnWire::Freeze, Request::Freeze),
            (RequestOnWire::PreDump, Request::PreDump),
            (
                RequestOnWire::FreezeCheck(&marks),
                Request::FreezeCheck(marks.to_vec()),
            ),
        ];
        for (ours, theirs) in cases {
            assert_eq!(
                baton_proto::encode(&ours).expect("encode"),
                baton_proto::encode(&theirs).expect("encode"),
                "{}",
                ours.name()
            );
            assert_eq!(ours.name(), theirs.name());
        }
    }

    #[test]
    fn batches_respect_fd_and_byte_limits() {
        assert!(plan_batches(&[]).is_empty());
        assert_eq!(plan_batches(&[0; 3]), vec![0..3]);
        assert_eq!(plan_batches(&[0; 600]), vec![0..253, 253..506, 506..600]);
        let big = MAX_QUEUE_BYTES;
        // Two 64 MiB sockets fill a batch exactly; the third starts a new one.
        assert_eq!(plan_batches(&[big, big, big]), vec![0..2, 2..3]);
        // One socket over the limit on its own still gets a batch.
        assert_eq!(plan_batches(&[1, usize::MAX, 1]), vec![0..1, 1..2, 2..3]);
    }

    /// A fake helper on the other end of a socketpair: answers each request with the
    /// reply `answer` computes from the request and its descriptor count.
    fn fake_helper(
        answer: impl Fn(Request, usize) -> Reply + Send + 'static,
    ) -> (UnixStream, std::thread::JoinHandle<usize>) {
        let (ours, theirs) = UnixStream::pair().expect("pair");
        let handle = std::thread::spawn(move || {
            let mut requests = 0;
            while let Some(frame) = transport::recv_frame(theirs.as_fd(), None).expect("recv") {
                let request: Request = baton_proto::decode(&frame.body).expect("decode");
                let reply = answer(request, frame.fds.len());
                transport::send_message(theirs.as_fd(), &reply, &[], None).expect("send");
                requests += 1;
            }
            requests
        });
        (ours, handle)
    }

    fn hello_reply() -> Reply {
        let mut hello = Hello::ours(caps::ALL_V2);
        hello.min_version = PROTOCOL_VERSION_MAX;
        hello.max_version = PROTOCOL_VERSION_MAX;
        Reply::Hello(hello)
    }

    /// What a version-1 helper answers to a hello.
    fn v1_hello_reply() -> Reply {
        let mut hello = Hello::ours(caps::ALL_V1);
        hello.min_version = 1;
        hello.max_version = 1;
        Reply::Hello(hello)
    }

    fn mark(n: u32) -> ProgressMark {
        ProgressMark {
            state: 1,
            segs_in: n,
            segs_out: n + 1,
            inq: 0,
            outq: n,
        }
    }

    #[test]
    fn a_version_1_helper_gets_no_pre_dump_requests() {
        let (stream, helper) = fake_helper(|request, fds| match request {
            Request::Hello(_) => v1_hello_reply(),
            Request::Dump => Reply::Dumped(vec![Ok(sample_state(0)); fds]),
            _ => Reply::Error(ProtocolError::new(
                ProtocolErrorKind::UnknownOperation,
                "v1",
            )),
        });
        let mut client = RepairClient::from_stream(stream, Duration::from_secs(5)).expect("hello");
        assert_eq!(client.version(), 1);
        assert!(!client.supports_pre_dump());
        let (s, _t) = UnixStream::pair().expect("pair");
        let err = client.pre_dump(&[s.as_fd()]).expect_err("v1");
        assert!(
            matches!(
                err,
                ClientError::NeedsVersion {
                    op: "PreDump",
                    needs: 2,
                    version: 1
                }
            ),
            "{err}"
        );
        let err = client
            .freeze_check(&[(s.as_fd(), mark(1))])
            .expect_err("v1");
        assert!(matches!(err, ClientError::NeedsVersion { .. }), "{err}");
        // Plain dumps still work, and nothing else was sent.
        assert_eq!(client.dump(&[s.as_fd()]).expect("dump").len(), 1);
        drop(client);
        assert_eq!(helper.join().expect("join"), 2, "hello and one dump");
    }

    #[test]
    fn a_version_2_helper_without_the_capability_is_not_asked() {
        let (stream, _helper) = fake_helper(|request, _| match request {
            Request::Hello(_) => {
                let mut hello = Hello::ours(caps::ALL_V1);
                hello.min_version = 2;
                hello.max_version = 2;
                Reply::Hello(hello)
            }
            _ => Reply::Error(ProtocolError::new(ProtocolErrorKind::Unsupported, "no")),
        });
        let mut client = RepairClient::from_stream(stream, Duration::from_secs(5)).expect("hello");
        assert!(!client.supports_pre_dump());
        let (s, _t) = UnixStream::pair().expect("pair");
        let err = client.pre_dump(&[s.as_fd()]).expect_err("no capability");
        assert!(
            matches!(err, ClientError::NotOffered { op: "PreDump", .. }),
            "{err}"
        );
    }

    #[test]
    fn pre_dump_and_freeze_check_batch_in_order_with_their_marks() {
        // The fake helper answers a pre-dump with None for odd indices and a state whose
        // rcv_nxt is the batch size for even ones; a freeze check with Unchanged whose
        // timestamp echoes the mark's segs_in, so marks must travel with their sockets.
        let (stream, helper) = fake_helper(|request, fds| match request {
            Request::Hello(_) => hello_reply(),
            Request::PreDump => Reply::PreDumped(
                (0..fds)
                    .map(|i| {
                        Ok((i % 2 == 0).then(|| {
                            let mut state = sample_state(0);
                            state.rcv_nxt = fds as u32;
                            PreDumped {
                                state,
                                mark: mark(i as u32),
                            }
                        }))
                    })
                    .collect(),
            ),
            Request::FreezeCheck(marks) => Reply::FreezeChecked(
                marks
                    .iter()
                    .map(|m| {
                        Ok(FreezeCheck::Unchanged {
                            timestamp: m.segs_in,
                            peek_off: -1,
                        })
                    })
                    .collect(),
            ),
            _ => Reply::Error(ProtocolError::new(ProtocolErrorKind::Unsupported, "test")),
        });
        let mut client = RepairClient::from_stream(stream, Duration::from_secs(5)).expect("hello");
        assert!(client.supports_pre_dump());
        let sockets: Vec<UnixStream> = (0..600)
            .map(|_| UnixStream::pair().expect("pair").0)
            .collect();
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.as_fd()).collect();
        let pre = client.pre_dump(&fds).expect("pre-dump");
        assert_eq!(pre.len(), 600);
        for (i, result) in pre.iter().enumerate() {
            let (batch, index) = match i {
                0..253 => (253, i),
                253..506 => (253, i - 253),
                _ => (94, i - 506),
            };
            match result.as_ref().expect("ok") {
                Some(p) => {
                    assert_eq!(index % 2, 0, "{i}");
                    assert_eq!(p.state.rcv_nxt, batch);
                    assert_eq!(p.mark, mark(index as u32));
                }
                None => assert_eq!(index % 2, 1, "{i}"),
            }
        }
        let items: Vec<(BorrowedFd<'_>, ProgressMark)> = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| (*fd, mark(i as u32 * 7)))
            .collect();
        let checks = client.freeze_check(&items).expect("freeze check");
        assert_eq!(checks.len(), 600);
        for (i, check) in checks.into_iter().enumerate() {
            assert_eq!(
                check.expect("ok"),
                FreezeCheck::Unchanged {
                    timestamp: i as u32 * 7,
                    peek_off: -1
                }
            );
        }
        drop(client);
        assert_eq!(helper.join().expect("join"), 1 + 3 + 3);
    }

    #[test]
    fn operations_batch_and_concatenate_in_order() {
        let (stream, helper) = fake_helper(|request, fds| match request {
            Request::Hello(_) => hello_reply(),
            Request::Thaw => Reply::Thawed(
                (0..fds)
                    .map(|i| {
                        if i % 2 == 0 {
                            Ok(())
                        } else {
                            Err(SocketError {
                                step: "thaw".into(),
                                errno: Some(libc::EBADF),
                                detail: format!("batch of {fds}, index {i}"),
                            })
                        }
                    })
                    .collect(),
            ),
            _ => Reply::Error(ProtocolError::new(ProtocolErrorKind::Unsupported, "test")),
        });
        let mut client = RepairClient::from_stream(stream, Duration::from_secs(5)).expect("hello");
        assert_eq!(client.version(), PROTOCOL_VERSION_MAX);
        let sockets: Vec<UnixStream> = (0..300)
            .map(|_| UnixStream::pair().expect("pair").0)
            .collect();
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.as_fd()).collect();
        let results = client.thaw(&fds).expect("thaw");
        assert_eq!(results.len(), 300);
        // Second batch restarts its own indices: 253 then 47.
        let err = results[254].as_ref().expect_err("odd index of batch 2");
        assert_eq!(err.detail, "batch of 47, index 1");
        assert!(results[253].is_ok());
        let refused = client
            .set_repair(&fds[..1], RepairMode::On)
            .expect_err("refused");
        assert!(
            matches!(refused, ClientError::Refused(ref e) if e.kind == ProtocolErrorKind::Unsupported)
        );
        drop(client);
        assert_eq!(helper.join().expect("join"), 4);
    }

    #[test]
    fn shared_handles_never_interleave_and_share_a_broken_connection() {
        // The fake helper answers a Thaw with as many results as descriptors arrived: a
        // request of one handle interleaved with another's would get the wrong count.
        let (stream, helper) = fake_helper(|request, fds| match request {
            Request::Hello(_) => hello_reply(),
            Request::Thaw => Reply::Thawed(vec![Ok(()); fds]),
            _ => Reply::Error(ProtocolError::new(ProtocolErrorKind::Unsupported, "test")),
        });
        let client = RepairClient::from_stream(stream, Duration::from_secs(5)).expect("hello");
        let workers: Vec<_> = (1..=4usize)
            .map(|n| {
                let mut handle = client.share();
                std::thread::spawn(move || {
                    let sockets: Vec<UnixStream> = (0..n)
                        .map(|_| UnixStream::pair().expect("pair").0)
                        .collect();
                    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.as_fd()).collect();
                    for _ in 0..50 {
                        let results = handle.thaw(&fds).expect("thaw");
                        assert_eq!(results.len(), n);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker");
        }
        let mut other = client.share();
        drop(client);
        // The helper is still there for the remaining handle; then it goes away and
        // the connection is broken for every handle.
        let (s, _t) = UnixStream::pair().expect("pair");
        assert_eq!(other.thaw(&[s.as_fd()]).expect("thaw").len(), 1);
        let mut last = other.share();
        drop(other);
        drop(last.shared.stream.shutdown(std::net::Shutdown::Both));
        assert!(last.thaw(&[s.as_fd()]).is_err());
        assert!(matches!(last.thaw(&[s.as_fd()]), Err(ClientError::Broken)));
        assert_eq!(helper.join().expect("join"), 1 + 4 * 50 + 1);
    }

    #[test]
    fn pipelined_batches_stay_in_order_and_in_sync_after_a_refusal() {
        use std::sync::atomic::AtomicUsize;
        // Dump number k (from 0) is refused when k == 1, else each socket fails with a
        // detail naming the dump and the index, so that order and batching show.
        let dumps = AtomicUsize::new(0);
        let (stream, helper) = fake_helper(move |request, fds| match request {
            Request::Hello(_) => hello_reply(),
            Request::Dump => {
                let k = dumps.fetch_add(1, Ordering::SeqCst);
                if k == 1 {
                    return Reply::Error(ProtocolError::new(ProtocolErrorKind::Unsupported, "k1"));
                }
                Reply::Dumped(
                    (0..fds)
                        .map(|i| {
                            Err(SocketError {
                                step: "dump".into(),
                                errno: None,
                                detail: format!("{k}/{i}"),
                            })
                        })
                        .collect(),
                )
            }
            Request::Thaw => Reply::Thawed(vec![Ok(()); fds]),
            _ => Reply::Error(ProtocolError::new(ProtocolErrorKind::Unsupported, "test")),
        });
        let mut client = RepairClient::from_stream(stream, Duration::from_secs(5)).expect("hello");
        let sockets: Vec<UnixStream> = (0..600)
            .map(|_| UnixStream::pair().expect("pair").0)
            .collect();
        let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|s| s.as_fd()).collect();
        // Three batches (253, 253, 94): the second is refused. The third was already in
        // flight when that reply came (two requests are), so its reply must be read
        // before returning, or the next exchange would get it.
        let err = client.dump(&fds).expect_err("second batch refused");
        assert!(
            matches!(err, ClientError::Refused(ref e) if e.message == "k1"),
            "{err}"
        );
        // In sync: the next exchanges get their own replies.
        assert_eq!(client.thaw(&fds[..3]).expect("thaw").len(), 3);
        let results = client.dump(&fds[..300]).expect("dump");
        assert_eq!(results.len(), 300);
        for (i, r) in results.iter().enumerate() {
            let (k, index) = if i < 253 { (3, i) } else { (4, i - 253) };
            assert_eq!(
                r.as_ref().expect_err("fails").detail,
                format!("{k}/{index}")
            );
        }
        drop(client);
        // Hello, three dumps, thaw, two dumps.
        assert_eq!(helper.join().expect("join"), 7);
    }

    #[test]
    fn wrong_result_count_is_an_error() {
        let (stream, _helper) = fake_helper(|request, _| match request {
            Request::Hello(_) => hello_reply(),
            _ => Reply::Thawed(vec![]),
        });
        let mut client = RepairClient::from_stream(stream, Duration::from_secs(5)).expect("hello");
        let (s, _t) = UnixStream::pair().expect("pair");
        let err = client.thaw(&[s.as_fd()]).expect_err("count");
        assert!(
            matches!(
                err,
                ClientError::ResultCount {
                    expected: 1,
                    got: 0,
                    ..
                }
            ),
            "{err}"
        );
        let err = client.dump(&[s.as_fd()]).expect_err("variant");
        assert!(
            matches!(err, ClientError::UnexpectedReply { got: "Thawed", .. }),
            "{err}"
        );
    }

    #[test]
    fn refused_hello_is_refused() {
        let (stream, _helper) = fake_helper(|_, _| {
            Reply::Error(ProtocolError::new(
                ProtocolErrorKind::IncompatibleVersion,
                "no",
            ))
        });
        let err = RepairClient::from_stream(stream, Duration::from_secs(5)).expect_err("refused");
        assert!(
            matches!(err, ClientError::Refused(ref e) if e.kind == ProtocolErrorKind::IncompatibleVersion)
        );
    }

    #[test]
    fn hello_with_a_foreign_version_is_rejected() {
        let (stream, _helper) = fake_helper(|_, _| {
            let mut hello = Hello::ours(caps::ALL_V1);
            hello.min_version = 99;
            hello.max_version = 99;
            Reply::Hello(hello)
        });
        let err = RepairClient::from_stream(stream, Duration::from_secs(5)).expect_err("bad");
        assert!(matches!(err, ClientError::BadHello(_)), "{err}");
    }

    #[test]
    fn silent_helper_times_out_instead_of_hanging() {
        let (stream, _silent) = UnixStream::pair().expect("pair");
        let start = Instant::now();
        let err =
            RepairClient::from_stream(stream, Duration::from_millis(200)).expect_err("timeout");
        assert!(
            matches!(
                err,
                ClientError::Transport {
                    source: TransportError::TimedOut { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn vanished_helper_is_helper_closed() {
        let (stream, helper) = UnixStream::pair().expect("pair");
        drop(helper);
        let err = RepairClient::from_stream(stream, Duration::from_secs(1)).expect_err("closed");
        assert!(matches!(err, ClientError::HelperClosed { .. }), "{err}");
    }

    #[test]
    fn invalid_state_is_reported_by_index_before_sending() {
        let (stream, helper) = fake_helper(|request, _| match request {
            Request::Hello(_) => hello_reply(),
            _ => Reply::Restored(vec![]),
        });
        let mut client = RepairClient::from_stream(stream, Duration::from_secs(5)).expect("hello");
        let good = sample_state(4);
        let mut bad = sample_state(4);
        bad.send_unsent = 99;
        let (s1, _t1) = UnixStream::pair().expect("pair");
        let (s2, _t2) = UnixStream::pair().expect("pair");
        let err = client
            .restore(&[(s1.as_fd(), &good), (s2.as_fd(), &bad)])
            .expect_err("invalid");
        assert!(
            matches!(err, ClientError::InvalidState { index: 1, .. }),
            "{err}"
        );
        drop(client);
        assert_eq!(helper.join().expect("join"), 1, "only the hello was sent");
    }

    /// A socket path in a scratch directory that goes away with the returned guard.
    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-ipc-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        CLEANUP.with(|c| c.borrow_mut().push(dir.clone()));
        dir.join("x.repair")
    }

    /// Directories made by `temp_path` on this test's thread, removed when it ends.
    struct Cleanup(Vec<PathBuf>);

    impl Cleanup {
        fn push(&mut self, dir: PathBuf) {
            self.0.push(dir);
        }
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for dir in &self.0 {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    thread_local! {
        static CLEANUP: std::cell::RefCell<Cleanup> = const { std::cell::RefCell::new(Cleanup(Vec::new())) };
    }

    #[test]
    fn listener_is_0600_replaces_stale_and_refuses_live() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_path("listener");
        // A stale socket file: bound, then closed.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        let listener = RepairListener::bind(&path).expect("bind over stale");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = RepairListener::bind(&path).expect_err("live");
        assert!(matches!(err, ClientError::Path { .. }), "{err}");
        drop(listener);
        assert!(!path.exists(), "removed on drop");
        std::fs::write(&path, b"not a socket").expect("write");
        assert!(RepairListener::bind(&path).is_err());
    }

    #[test]
    fn listener_accepts_a_helper_and_does_the_hello() {
        let path = temp_path("accept");
        let listener = RepairListener::bind(&path).expect("bind");
        let connect_path = path.clone();
        let helper = std::thread::spawn(move || {
            let stream = UnixStream::connect(&connect_path).expect("connect");
            let frame = transport::recv_frame(stream.as_fd(), None)
                .expect("recv")
                .expect("frame");
            let request: Request = baton_proto::decode(&frame.body).expect("decode");
            assert!(matches!(request, Request::Hello(_)));
            transport::send_message(stream.as_fd(), &hello_reply(), &[], None).expect("send");
        });
        let client = listener.accept(Duration::from_secs(5)).expect("accept");
        assert_eq!(client.helper_capabilities(), caps::ALL_V2);
        helper.join().expect("join");
        let err = listener
            .accept(Duration::from_millis(50))
            .expect_err("nobody");
        assert!(matches!(err, ClientError::AcceptTimedOut { .. }), "{err}");
    }
}
