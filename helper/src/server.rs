//! The serve loop: one request frame in, exactly one reply frame out.
//!
//! Theory of operation:
//!
//! ```text
//!  recv frame ──bad header──▶ Error(BadFrame), exit 1 (stream out of sync)
//!      │ ──EOF before a frame──▶ return Ok (exit 0);  EOF mid-frame ──▶ exit 1
//!      ▼
//!  descriptors received == header.fd_count ?  no ─▶ Error(FdCountMismatch)
//!  tag known ?                                no ─▶ Error(UnknownOperation)
//!  body decodes and validates ?               no ─▶ Error(Malformed / FdCountMismatch)
//!  Hello first, and only once ?               no ─▶ Error(OutOfOrder)
//!  Hello: versions overlap ?                  no ─▶ Error(IncompatibleVersion), exit 1
//!  request newer than the agreed version ?    yes ─▶ Error(Unsupported)
//!      ▼
//!  per socket: validate (TCP, not MPTCP, expected state, our netns) ─▶ operation
//!  close every received descriptor, then reply with one result per socket
//! ```
//!
//! State kept between frames: whether the hello has happened (and the version chosen),
//! and the network-namespace cookie of the connection to the backend, read once on first
//! use. Sockets handed over must live in that namespace unless `--any-netns` was given.
//!
//! Invariants: nothing the peer sends can make this loop panic; every refusal is a typed
//! [`Reply::Error`]; a per-socket failure costs only that socket's slot; a dump reply never
//! exceeds [`MAX_BATCH_QUEUE_BYTES`] of queue data (sockets beyond are thawed and reported
//! as failed, so the caller can retry them in a smaller batch).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use baton_proto::frame::FrameError;
use baton_proto::repair::{
    caps, request_tag, FreezeCheck, Hello, PreDumped, ProgressMark, ProtocolError,
    ProtocolErrorKind, Reply, Request, RequestError, RestoreReport, SocketError, SocketResult,
    REQUEST_NAMES,
};
use baton_proto::tcp::{SocketFamily, TcpConnState, MAX_BATCH_QUEUE_BYTES};
use baton_repair_ipc::transport::{self, ReceivedFrame, TransportError};
use baton_tcp_repair::Expect;

use crate::worker::Worker;

/// How the server checks sockets.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Require handed-over sockets to be in the network namespace of the connection.
    pub check_netns: bool,
}

/// Why serving stopped with an error (exit status 1).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("receive a request: {0}")]
    Receive(#[source] TransportError),
    #[error("send a reply: {0}")]
    Send(#[source] TransportError),
    #[error("bad frame from the backend, closing: {0}")]
    BadFrame(FrameError),
    #[error("no common protocol version with the backend: {0}")]
    IncompatibleVersion(ProtocolError),
}

/// What to do after a reply has been sent.
#[derive(Debug)]
enum Next {
    Continue,
    Stop(ServeError),
}

/// The network-namespace cookie the sockets must match.
#[derive(Debug, Clone)]
enum NetnsCheck {
    Disabled,
    NotReadYet,
    Cookie(u64),
    Unavailable(SocketError),
}

/// The state of one connection to a backend.
struct Session<'a> {
    sock: BorrowedFd<'a>,
    /// Takes half of each larger batch.
    worker: &'a Worker,
    /// The version agreed in the hello, once it happened.
    version: Option<u16>,
    netns: NetnsCheck,
}

/// Serve the backend on `sock` until it closes the connection (`Ok`) or something fatal
/// happens.
pub fn serve(
    sock: BorrowedFd<'_>,
    options: &ServeOptions,
    worker: &Worker,
) -> Result<(), ServeError> {
    let mut session = Session::new(sock, options, worker);
    loop {
        let mut frame = match transport::recv_frame(sock, None) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(TransportError::BadHeader(e)) => {
                let reply = Reply::Error(ProtocolError::new(
                    ProtocolErrorKind::BadFrame,
                    e.to_string(),
                ));
                if let Err(send) = session.send(&reply) {
                    tracing::debug!("could not report the bad frame: {send}");
                }
                return Err(ServeError::BadFrame(e));
            }
            Err(e) => return Err(ServeError::Receive(e)),
        };
        let (reply, next) = session.handle(&mut frame);
        // Close our copies of the request's descriptors before replying: once the backend
        // has the reply, its own descriptor must be the last reference, so that closing
        // a frozen socket really releases its 4-tuple (a restore of the same connection
        // right after would otherwise race us and fail with EADDRNOTAVAIL).
        drop(frame);
        session.send(&reply).map_err(ServeError::Send)?;
        if let Next::Stop(e) = next {
            return Err(e);
        }
    }
}

fn refuse(kind: ProtocolErrorKind, message: impl Into<String>) -> (Reply, Next) {
    let error = ProtocolError::new(kind, message);
    tracing::warn!("refusing a request: {error}");
    (Reply::Error(error), Next::Continue)
}

impl<'a> Session<'a> {
    fn new(sock: BorrowedFd<'a>, options: &ServeOptions, worker: &'a Worker) -> Self {
        Session {
            sock,
            worker,
            version: None,
            netns: if options.check_netns {
                NetnsCheck::NotReadYet
            } else {
                NetnsCheck::Disabled
            },
        }
    }

    fn send(&self, reply: &Reply) -> Result<(), TransportError> {
        transport::send_message(self.sock, reply, &[], None)
    }

    /// Turn one well-framed request into its reply. The frame's descriptors are closed
    /// before this returns.
    fn handle(&mut self, frame: &mut ReceivedFrame) -> (Reply, Next) {
        if !frame.fd_count_matches() {
            return refuse(
                ProtocolErrorKind::FdCountMismatch,
                format!(
                    "header announces {} file descriptors, {} arrived{}",
                    frame.header.fd_count,
                    frame.fds_received(),
                    if frame.control_truncated {
                        " (some were truncated)"
                    } else {
                        ""
                    }
                ),
            );
        }
        let Some(tag) = request_tag(&frame.body) else {
            return refuse(
                ProtocolErrorKind::Malformed,
                format!("body of {} bytes has no request tag", frame.body.len()),
            );
        };
        if usize::try_from(tag).map_or(true, |t| t >= REQUEST_NAMES.len()) {
            return refuse(
                ProtocolErrorKind::UnknownOperation,
                format!("request tag {tag} is not one of {REQUEST_NAMES:?}"),
            );
        }
        let request: Request = match baton_proto::decode(&frame.body) {
            Ok(request) => request,
            Err(e) => return refuse(ProtocolErrorKind::Malformed, e.to_string()),
        };
        if let Err(e) = request.validate(frame.fds.len()) {
            let kind = match e {
                RequestError::StateCount { .. }
                | RequestError::MarkCount { .. }
                | RequestError::FdCount { .. }
                | RequestError::TooManyFds { .. } => ProtocolErrorKind::FdCountMismatch,
                _ => ProtocolErrorKind::Malformed,
            };
            return refuse(kind, e.to_string());
        }
        tracing::debug!(
            request = request.name(),
            sockets = frame.fds.len(),
            "request"
        );

        let fds = std::mem::take(&mut frame.fds);
        match (request, self.version) {
            (Request::Hello(hello), None) => self.hello(&hello),
            (Request::Hello(_), Some(_)) => refuse(ProtocolErrorKind::OutOfOrder, "a second Hello"),
            (request, None) => refuse(
                ProtocolErrorKind::OutOfOrder,
                format!("{} before Hello", request.name()),
            ),
            (request, Some(version)) if request.since_version() > version => refuse(
                ProtocolErrorKind::Unsupported,
                format!(
                    "{} needs protocol version {}, this connection agreed on {version}",
                    request.name(),
                    request.since_version()
                ),
            ),
            (Request::Dump, Some(_)) => (Reply::Dumped(self.dump(fds)), Next::Continue),
            (Request::Thaw, Some(_)) => {
                let results =
                    self.each_socket("thaw", fds, Expect::Connected, |fd, _, _, _: &()| {
                        Ok(baton_tcp_repair::thaw(fd)?)
                    });
                (Reply::Thawed(results), Next::Continue)
            }
            (Request::SetRepair(mode), Some(_)) => {
                let results = self.each_socket(
                    "set repair",
                    fds,
                    Expect::Connected,
                    move |fd, _, _, _: &()| Ok(baton_tcp_repair::set_repair(fd, mode)?),
                );
                (Reply::RepairSet(results), Next::Continue)
            }
            (Request::Freeze, Some(_)) => {
                let results =
                    self.each_socket("freeze", fds, Expect::Connected, |fd, _, _, _: &()| {
                        baton_tcp_repair::make_deaf(fd)?;
                        Ok(())
                    });
                (Reply::Frozen(results), Next::Continue)
            }
            (Request::Restore(states), Some(_)) => {
                (Reply::Restored(self.restore(fds, states)), Next::Continue)
            }
            (Request::PreDump, Some(_)) => (Reply::PreDumped(self.pre_dump(fds)), Next::Continue),
            (Request::FreezeCheck(marks), Some(_)) => (
                Reply::FreezeChecked(self.freeze_check(fds, marks)),
                Next::Continue,
            ),
        }
    }

    fn hello(&mut self, hello: &Hello) -> (Reply, Next) {
        tracing::info!(
            software = %hello.software.escape_debug(),
            min = hello.min_version,
            max = hello.max_version,
            "hello from the backend"
        );
        match hello.negotiate() {
            Ok(version) => {
                self.version = Some(version);
                let ours = Hello {
                    min_version: version,
                    max_version: version,
                    capabilities: if version >= 2 {
                        caps::ALL_V2
                    } else {
                        caps::ALL_V1
                    },
                    software: concat!("baton-repair ", env!("CARGO_PKG_VERSION")).to_string(),
                };
                (Reply::Hello(ours), Next::Continue)
            }
            Err(e) => {
                tracing::error!("{e}");
                (
                    Reply::Error(e.clone()),
                    Next::Stop(ServeError::IncompatibleVersion(e)),
                )
            }
        }
    }

    /// The cookie handed-over sockets must match, read on first use.
    fn netns_cookie(&mut self) -> Result<Option<u64>, SocketError> {
        if let NetnsCheck::NotReadYet = self.netns {
            self.netns = match baton_tcp_repair::netns_cookie(self.sock) {
                Ok(cookie) => NetnsCheck::Cookie(cookie),
                Err(e) => {
                    tracing::error!("network namespace of the backend connection: {e}");
                    NetnsCheck::Unavailable(e.into())
                }
            };
        }
        match &self.netns {
            NetnsCheck::Disabled | NetnsCheck::NotReadYet => Ok(None),
            NetnsCheck::Cookie(cookie) => Ok(Some(*cookie)),
            NetnsCheck::Unavailable(e) => Err(e.clone()),
        }
    }

    /// Validate each socket as `expect`, then run `operation(fd, index, family, &())` on
    /// it, half of a larger batch on the worker thread. The descriptors are closed on
    /// return.
    fn each_socket<X, T, F>(
        &mut self,
        op: &'static str,
        fds: Vec<OwnedFd>,
        expect: Expect,
        operation: F,
    ) -> Vec<SocketResult<T>>
    where
        X: Default + Send + 'static,
        T: Send + 'static,
        F: Fn(BorrowedFd<'_>, usize, SocketFamily, &X) -> Result<T, SocketError>
            + Send
            + Sync
            + 'static,
    {
        let items = fds.into_iter().map(|fd| (fd, X::default())).collect();
        self.each_socket_with(op, items, expect, operation).1
    }

    /// [`Self::each_socket`] with an `extra` per socket; returns the items, so that the
    /// caller can still act on the sockets, and the results.
    fn each_socket_with<X, T, F>(
        &mut self,
        op: &'static str,
        items: Vec<(OwnedFd, X)>,
        expect: Expect,
        operation: F,
    ) -> (Vec<(OwnedFd, X)>, Vec<SocketResult<T>>)
    where
        X: Send + 'static,
        T: Send + 'static,
        F: Fn(BorrowedFd<'_>, usize, SocketFamily, &X) -> Result<T, SocketError>
            + Send
            + Sync
            + 'static,
    {
        if items.is_empty() {
            return (items, Vec::new());
        }
        let cookie = self.netns_cookie();
        self.worker.map(items, move |index, (fd, extra)| {
            let result = cookie.clone().and_then(|cookie| {
                let family = baton_tcp_repair::validate_tcp_socket(fd.as_fd(), expect, cookie)
                    .map_err(SocketError::from)?;
                operation(fd.as_fd(), index, family, extra)
            });
            if let Err(e) = &result {
                tracing::warn!(op, index, "{e}");
            }
            result
        })
    }

    fn dump(&mut self, fds: Vec<OwnedFd>) -> Vec<SocketResult<TcpConnState>> {
        let items = fds.into_iter().map(|fd| (fd, ())).collect();
        let (items, mut results) =
            self.each_socket_with("dump", items, Expect::Connected, |fd, _, family, _: &()| {
                Ok(baton_tcp_repair::dump_as(fd, family)?)
            });
        fit_reply("dump", &items, &mut results, |state| Some(state), true);
        results
    }

    fn pre_dump(&mut self, fds: Vec<OwnedFd>) -> Vec<SocketResult<Option<PreDumped>>> {
        let items = fds.into_iter().map(|fd| (fd, ())).collect();
        let (items, mut results) = self.each_socket_with(
            "pre-dump",
            items,
            Expect::Connected,
            |fd, _, family, _: &()| Ok(baton_tcp_repair::pre_dump_as(fd, family)?),
        );
        // Pre-dumped sockets are live: nothing to undo for those left out.
        fit_reply(
            "pre-dump",
            &items,
            &mut results,
            |pre: &Option<PreDumped>| pre.as_ref().map(|p| &p.state),
            false,
        );
        results
    }

    fn freeze_check(
        &mut self,
        fds: Vec<OwnedFd>,
        marks: Vec<ProgressMark>,
    ) -> Vec<SocketResult<FreezeCheck>> {
        // `validate` guaranteed one mark per socket.
        let items = fds.into_iter().zip(marks).collect();
        let (items, mut results) = self.each_socket_with(
            "freeze check",
            items,
            Expect::Connected,
            |fd, _, family, mark: &ProgressMark| {
                Ok(baton_tcp_repair::freeze_check_as(fd, family, mark)?)
            },
        );
        fit_reply(
            "freeze check",
            &items,
            &mut results,
            |check: &FreezeCheck| match check {
                FreezeCheck::Dumped(state) => Some(state),
                FreezeCheck::Unchanged { .. } => None,
            },
            true,
        );
        results
    }

    fn restore(
        &mut self,
        fds: Vec<OwnedFd>,
        states: Vec<TcpConnState>,
    ) -> Vec<SocketResult<RestoreReport>> {
        // `validate` guaranteed one state per socket.
        let items = fds.into_iter().zip(states).collect();
        let (_, results) = self.each_socket_with(
            "restore",
            items,
            Expect::Fresh,
            |fd, _, family, state: &TcpConnState| {
                Ok(baton_tcp_repair::restore_as(fd, family, state)?)
            },
        );
        results
    }
}

/// The reply must fit in a frame: sockets whose queues would take it over the limit are
/// reported as failed, in order, as if the batch had been sent one by one, and — when
/// the operation left them frozen (`thaw`) — given back live first.
fn fit_reply<X, T>(
    op: &'static str,
    items: &[(OwnedFd, X)],
    results: &mut [SocketResult<T>],
    state_of: impl Fn(&T) -> Option<&TcpConnState>,
    thaw: bool,
) {
    let mut queue_bytes = 0usize;
    for ((fd, _), result) in items.iter().zip(results.iter_mut()) {
        let Some(state) = result.as_ref().ok().and_then(&state_of) else {
            continue;
        };
        let size = state.send_queue.len() + state.recv_queue.len();
        if queue_bytes.saturating_add(size) <= MAX_BATCH_QUEUE_BYTES {
            queue_bytes += size;
            continue;
        }
        if thaw {
            if let Err(e) = baton_tcp_repair::thaw(fd.as_fd()) {
                tracing::warn!("thaw after an oversized {op}: {e}");
            }
        }
        tracing::warn!("{op}: {size} queued bytes do not fit in this batch's reply");
        *result = Err(SocketError {
            step: format!("{op}: batch"),
            errno: None,
            detail: format!(
                "{size} queued bytes would take the reply over {MAX_BATCH_QUEUE_BYTES} \
                 bytes; socket left live, retry it in a smaller batch"
            ),
        });
    }
}
