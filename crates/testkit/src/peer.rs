//! A peer *process* that holds the far ends of many TCP connections.
//!
//! Why a process: one process may hold at most `RLIMIT_NOFILE` descriptors, and on
//! baton's CI machines the hard limit is 20,000 and cannot be raised. A test with 10,000
//! connections therefore keeps its own ends and puts the peers' ends in a child.
//!
//! # The re-exec trick
//!
//! The parent starts *its own executable* ([`std::env::current_exe`]) with the
//! environment variable [`ENV_VAR`] carrying the parameters. Every executable that uses
//! [`PeerProcess`] must contain an entry point that calls [`run_if_peer`] first thing:
//!
//! * a libtest test binary (an integration test file): a test named exactly
//!   `peer_process_entry` at the top level of the crate, and [`LIBTEST_ENTRY_ARGS`] as
//!   `entry_args`. When the variable is absent (the normal test run) the test returns at
//!   once and passes:
//!
//!   ```ignore
//!   #[test]
//!   fn peer_process_entry() {
//!       baton_testkit::peer::run_if_peer();
//!   }
//!   ```
//!
//! * a `harness = false` bench or any other plain `main`: call [`run_if_peer`] at the top
//!   of `main` and pass no `entry_args`.
//!
//! The child is spawned from the calling thread, so it lives in that thread's network
//! namespace (see [`crate::netns`]): call [`PeerProcess::spawn`] from the thread that
//! entered the private namespace. It inherits the parent's `RLIMIT_NOFILE` and raises
//! its soft limit to what it needs.
//!
//! # Protocol
//!
//! Commands go to the child's stdin, one per line; the child answers on stdout with lines
//! that start with a marker (everything else on stdout, such as libtest's banner, is
//! ignored); its stderr is inherited. Every wait on either side has a deadline, so a
//! broken peer is an error, never a hang; the child also exits when its stdin closes
//! (the parent died) or no command arrives for ten minutes.
//!
//! ```text
//!  child, at start:  connect n times to the listener; on connection i send the 8-byte
//!                    little-endian header i, then k bytes of Pattern(seeds.peer ^ i);
//!                    wait until all of it is acknowledged (SIOCOUTQ 0); deafen every
//!                    connection (drop-all filter: whatever the parent sends from now on
//!                    stays unacknowledged)                             -> "ready"
//!  "hear"            undeafen every connection                        -> "hearing"
//!  "verify K2 EXTRA" on every connection, all at once: read exactly K2 + EXTRA bytes
//!                    and check them against Pattern(seeds.parent ^ i) from offset 0;
//!                    then send EXTRA more bytes of its own stream (stream offsets
//!                    k .. k + EXTRA after the header)                  -> "verified"
//!  "quit" / EOF      exit 0
//!  any failure       -> "error <detail>", exit 1
//! ```
//!
//! On the parent side, [`listen`] makes a listener with a backlog deep enough for
//! thousands of connects, [`accept_indexed`] accepts the `n` connections and puts each
//! at its index by *peeking* the header (nothing is consumed: the receive queue is what
//! the tests dump), and [`write_many`] / [`read_exact_many`] move data on thousands of
//! sockets at once with non-blocking calls and `poll`. [`verify_peer_stream`] checks
//! bytes of what the peer sent (header included) at any offset.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::netns::context;
use crate::pattern::Pattern;

/// The environment variable that turns an executable into a peer process. Its value is
/// the parameter list `addr=IP:PORT;n=N;k=K;peer=SEED;parent=SEED;step_ms=MS`.
pub const ENV_VAR: &str = "BATON_TESTKIT_PEER";

/// The name of the libtest entry point (a top-level test that calls [`run_if_peer`]).
pub const LIBTEST_ENTRY_NAME: &str = "peer_process_entry";

/// The arguments that make a libtest binary run only its `peer_process_entry` test, on
/// one thread, with its stdout not captured.
pub const LIBTEST_ENTRY_ARGS: [&str; 4] = [
    "--exact",
    LIBTEST_ENTRY_NAME,
    "--nocapture",
    "--test-threads=1",
];

/// Length of the index header the peer sends first on every connection.
pub const HEADER_LEN: usize = 8;

/// How long each step inside the child (connecting, waiting for ACKs, verifying) may
/// take.
pub const CHILD_STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the child waits for the next command before it gives up and exits.
const CHILD_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Every answer line of the child starts with this (libtest may print before it on the
/// same line, so the parent looks for it anywhere in a line).
const MARK: &str = "@@baton-peer@@ ";

/// How many stray stdout lines the parent keeps for error messages.
const NOISE_KEPT: usize = 8;

/// Longest single `poll` sleep in the loops below (they re-check their deadline after).
const POLL_SLICE: Duration = Duration::from_millis(50);

/// Seeds of the two directions of every connection. Connection `i` carries
/// `Pattern::new(peer ^ i)` from the peer (after the header) and
/// `Pattern::new(parent ^ i)` from the parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seeds {
    /// Seed of the peer → parent direction.
    pub peer: u64,
    /// Seed of the parent → peer direction.
    pub parent: u64,
}

impl Seeds {
    /// The stream the peer sends on connection `i` (after the header).
    pub fn peer_pattern(&self, i: usize) -> Pattern {
        Pattern::new(self.peer ^ i as u64)
    }

    /// The stream the parent sends on connection `i`.
    pub fn parent_pattern(&self, i: usize) -> Pattern {
        Pattern::new(self.parent ^ i as u64)
    }
}

/// The bytes the peer sends on connection `i` at offsets `[offset, offset + len)` of the
/// whole connection stream: the 8-byte header `i` (little-endian), then
/// `seeds.peer_pattern(i)` from its offset 0.
pub fn peer_stream_bytes(seeds: Seeds, i: usize, offset: u64, len: usize) -> Vec<u8> {
    let header = (i as u64).to_le_bytes();
    let mut out = Vec::with_capacity(len);
    let mut at = offset;
    while out.len() < len && at < HEADER_LEN as u64 {
        out.push(header[at as usize]);
        at += 1;
    }
    let rest = len - out.len();
    out.extend_from_slice(&seeds.peer_pattern(i).bytes(at - HEADER_LEN as u64, rest));
    out
}

/// Check bytes received on connection `i` that start at offset `offset` of the whole
/// peer stream (header included; see [`peer_stream_bytes`]). The error names the first
/// byte that differs.
pub fn verify_peer_stream(seeds: Seeds, i: usize, offset: u64, buf: &[u8]) -> Result<(), String> {
    let header = (i as u64).to_le_bytes();
    let mut at = offset;
    let mut rest = buf;
    while let Some((&got, tail)) = rest.split_first() {
        if at >= HEADER_LEN as u64 {
            break;
        }
        let expected = header[at as usize];
        if got != expected {
            return Err(format!(
                "connection {i}: header byte {at} is {got:#04x}, expected {expected:#04x}"
            ));
        }
        at += 1;
        rest = tail;
    }
    seeds
        .peer_pattern(i)
        .verify(at.saturating_sub(HEADER_LEN as u64), rest)
        .map_err(|m| format!("connection {i}: peer stream, after the header: {m}"))
}

/// A TCP listener on `ip`, port 0, with a backlog of 4096 (the per-namespace
/// `somaxconn` default), so that thousands of connects in a row do not overflow the
/// accept queue while the parent accepts.
pub fn listen(ip: IpAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))
        .map_err(|e| context(e, &format!("binding a listener at {ip} port 0")))?;
    // SAFETY: listen() on a socket we own; calling it again on a listening socket only
    // changes the backlog.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(context(io::Error::last_os_error(), "listen(backlog 4096)"));
    }
    Ok(listener)
}

/// Peek the 8-byte index header at the front of `sock`'s receive queue without consuming
/// it. `None` while fewer than 8 bytes are queued.
pub fn peek_index(sock: impl AsFd) -> io::Result<Option<u64>> {
    let mut header = [0u8; HEADER_LEN];
    match recv(
        sock.as_fd(),
        &mut header,
        libc::MSG_PEEK | libc::MSG_DONTWAIT,
    ) {
        Ok(HEADER_LEN) => Ok(Some(u64::from_le_bytes(header))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(context(e, "peeking the index header")),
    }
}

/// Accept `n` connections from a [`PeerProcess`] on `listener` and return them in index
/// order: element `i` is the connection whose peer sent header `i`. The header is only
/// peeked, so every accepted socket still has its whole receive queue. Fails on a
/// header out of range or seen twice, and with `TimedOut` if not all `n` have arrived
/// (with their headers) within `timeout`. The returned streams are in blocking mode; the
/// listener is left non-blocking.
pub fn accept_indexed(
    listener: &TcpListener,
    n: usize,
    timeout: Duration,
) -> io::Result<Vec<TcpStream>> {
    let deadline = Instant::now() + timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| context(e, "making the listener non-blocking"))?;
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut placed = 0;
    let mut waiting: Vec<TcpStream> = Vec::new();
    while placed < n {
        let mut progress = false;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    waiting.push(stream);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(context(e, "accepting a peer connection")),
            }
        }
        let mut still = Vec::with_capacity(waiting.len());
        for stream in waiting.drain(..) {
            match peek_index(&stream)? {
                Some(index) => {
                    let slot = usize::try_from(index)
                        .ok()
                        .and_then(|i| slots.get_mut(i))
                        .ok_or_else(|| {
                            io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("peer connection sent index {index}, expected < {n}"),
                            )
                        })?;
                    if slot.is_some() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("two peer connections sent index {index}"),
                        ));
                    }
                    *slot = Some(stream);
                    placed += 1;
                    progress = true;
                }
                None => still.push(stream),
            }
        }
        waiting = still;
        if placed == n {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "accepted {placed} of {n} peer connections with their headers \
                     ({} more without a header yet) within {timeout:?}",
                    waiting.len()
                ),
            ));
        }
        if !progress {
            let mut fds = Vec::with_capacity(waiting.len() + 1);
            fds.push(listener.as_fd());
            fds.extend(waiting.iter().map(|s| s.as_fd()));
            poll_some(&fds, libc::POLLIN, (deadline - now).min(POLL_SLICE))?;
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

/// Send `data(i)` completely on every socket `socks[i]`, all connections at once:
/// non-blocking sends (`MSG_DONTWAIT`, whatever the socket's mode), then `poll` for
/// the connections that did not take everything. `TimedOut` after `timeout`.
pub fn write_many<S: AsFd>(
    socks: &[S],
    timeout: Duration,
    mut data: impl FnMut(usize) -> Vec<u8>,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    // (connection, its data, bytes already sent)
    let mut pending: Vec<(usize, Vec<u8>, usize)> = Vec::new();
    for (i, sock) in socks.iter().enumerate() {
        let bytes = data(i);
        let sent = send_some(sock.as_fd(), &bytes).map_err(|e| conn_error(e, i, "send"))?;
        if sent < bytes.len() {
            pending.push((i, bytes, sent));
        }
    }
    while !pending.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            let (i, bytes, sent) = &pending[0];
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} connections still had data to send after {timeout:?} \
                     (e.g. connection {i}: {sent} of {} bytes)",
                    pending.len(),
                    bytes.len()
                ),
            ));
        }
        let fds: Vec<BorrowedFd<'_>> = pending.iter().map(|(i, ..)| socks[*i].as_fd()).collect();
        poll_some(&fds, libc::POLLOUT, (deadline - now).min(POLL_SLICE))?;
        for (i, bytes, sent) in pending.iter_mut() {
            *sent += send_some(socks[*i].as_fd(), &bytes[*sent..])
                .map_err(|e| conn_error(e, *i, "send"))?;
        }
        pending.retain(|(_, bytes, sent)| *sent < bytes.len());
    }
    Ok(())
}

/// Read exactly `len` bytes from every socket `socks[i]`, all connections at once
/// (non-blocking reads with `MSG_DONTWAIT`, then `poll` for those not done), and hand
/// each piece to `check(i, offset, bytes)`, where `offset` counts from the first byte
/// read on that connection. Never reads past `len`. Fails with the check's message as
/// `InvalidData`, with `UnexpectedEof` if a connection ends early, and with `TimedOut`
/// after `timeout`.
pub fn read_exact_many<S: AsFd>(
    socks: &[S],
    len: usize,
    timeout: Duration,
    mut check: impl FnMut(usize, u64, &[u8]) -> Result<(), String>,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut scratch = vec![0u8; 64 << 10];
    let mut got = vec![0usize; socks.len()];
    let mut pending: Vec<usize> = (0..socks.len()).collect();
    loop {
        let mut still = Vec::with_capacity(pending.len());
        for &i in &pending {
            loop {
                let want = (len - got[i]).min(scratch.len());
                if want == 0 {
                    break;
                }
                match recv(socks[i].as_fd(), &mut scratch[..want], libc::MSG_DONTWAIT) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("connection {i} ended after {} of {len} bytes", got[i]),
                        ))
                    }
                    Ok(n) => {
                        check(i, got[i] as u64, &scratch[..n])
                            .map_err(|msg| io::Error::new(io::ErrorKind::InvalidData, msg))?;
                        got[i] += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(conn_error(e, i, "recv")),
                }
            }
            if got[i] < len {
                still.push(i);
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            let i = pending[0];
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} connections had not delivered their {len} bytes after {timeout:?} \
                     (e.g. connection {i}: {} bytes)",
                    pending.len(),
                    got[i]
                ),
            ));
        }
        let fds: Vec<BorrowedFd<'_>> = pending.iter().map(|&i| socks[i].as_fd()).collect();
        poll_some(&fds, libc::POLLIN, (deadline - now).min(POLL_SLICE))?;
    }
}

/// A running peer process; see the module documentation. Dropping it kills the child
/// (if it is still running) and reaps it.
#[derive(Debug)]
pub struct PeerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines the child printed on stdout, from a reader thread.
    lines: Receiver<String>,
    /// The last few stdout lines that were not protocol answers, for error messages.
    noise: VecDeque<String>,
    n: usize,
    k: usize,
}

impl PeerProcess {
    /// Start the current executable as a peer process that opens `n` connections to
    /// `listener_addr` and sends `k` pattern bytes on each (after the header). Pass
    /// [`LIBTEST_ENTRY_ARGS`] from a libtest test binary, nothing from a plain `main`.
    ///
    /// Returns as soon as the child is started: accept its connections next
    /// ([`accept_indexed`]), then wait for [`PeerProcess::wait_ready`].
    pub fn spawn(
        listener_addr: SocketAddr,
        n: usize,
        k: usize,
        seeds: Seeds,
        entry_args: &[&str],
    ) -> io::Result<Self> {
        let exe = std::env::current_exe().map_err(|e| context(e, "current_exe"))?;
        let params = Params {
            addr: listener_addr,
            n,
            k,
            seeds,
            step: CHILD_STEP_TIMEOUT,
        };
        let mut child = Command::new(&exe)
            .args(entry_args)
            .env(ENV_VAR, params.encode())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| context(e, &format!("spawning {} as a peer process", exe.display())))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("peer process has no stdout pipe"))?;
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("peer-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        let peer = PeerProcess {
            child,
            stdin,
            lines,
            noise: VecDeque::new(),
            n,
            k,
        };
        // On error `peer` is dropped here, which kills and reaps the child.
        reader.map_err(|e| context(e, "starting the peer's stdout reader thread"))?;
        Ok(peer)
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// How many connections the peer opens.
    pub fn connections(&self) -> usize {
        self.n
    }

    /// How many pattern bytes the peer sends on each connection after the header.
    pub fn bytes_per_connection(&self) -> usize {
        self.k
    }

    /// Wait until the peer has connected `n` times, had everything acknowledged and
    /// deafened every connection. Accept the connections meanwhile (the peer waits for
    /// its connects and ACKs, which need the accept queue to drain).
    pub fn wait_ready(&mut self, timeout: Duration) -> io::Result<()> {
        self.await_answer("ready", timeout)
    }

    /// Make every connection hear again; returns once the peer has done so.
    pub fn hear(&mut self, timeout: Duration) -> io::Result<()> {
        self.command("hear")?;
        self.await_answer("hearing", timeout)
    }

    /// Have the peer read and check `k2 + extra` bytes of the parent's stream on every
    /// connection, then send `extra` more bytes of its own. Returns once the peer has
    /// checked everything; an `InvalidData` error carries the peer's complaint.
    pub fn verify(&mut self, k2: usize, extra: usize, timeout: Duration) -> io::Result<()> {
        self.command(&format!("verify {k2} {extra}"))?;
        self.await_answer("verified", timeout)
    }

    /// Tell the peer to exit and wait for it (killing it after `timeout`).
    pub fn quit(mut self, timeout: Duration) -> io::Result<ExitStatus> {
        // A peer that already exited has closed its stdin: nothing to tell it then.
        let _ = self.command("quit");
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| context(e, "waitpid(peer)"))?
            {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let status = self.child.wait();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "peer process did not exit within {timeout:?} of quit (killed: {status:?})"
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn command(&mut self, line: &str) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::other("peer process stdin already closed"))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| context(e, &format!("sending {line:?} to the peer process")))
    }

    /// Wait for the answer `word`, skipping stdout lines that are not answers.
    fn await_answer(&mut self, word: &str, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "peer process did not answer {word:?} within {timeout:?}{}",
                            self.noise_note()
                        ),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Its stdout is closed: it exited or is about to.
                    let status = self.wait_briefly();
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "peer process closed its stdout while we waited for {word:?} \
                             (status {status}){}",
                            self.noise_note()
                        ),
                    ));
                }
            };
            let Some(at) = line.find(MARK) else {
                if self.noise.len() == NOISE_KEPT {
                    self.noise.pop_front();
                }
                self.noise.push_back(line);
                continue;
            };
            let answer = &line[at + MARK.len()..];
            if answer == word {
                return Ok(());
            }
            let detail = answer.strip_prefix("error ").unwrap_or(answer);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("peer process, waiting for {word:?}: {detail}"),
            ));
        }
    }

    fn wait_briefly(&mut self) -> String {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => return "still running".into(),
                Err(e) => return format!("unknown: {e}"),
            }
        }
    }

    fn noise_note(&self) -> String {
        if self.noise.is_empty() {
            String::new()
        } else {
            let lines: Vec<&str> = self.noise.iter().map(String::as_str).collect();
            format!("; its last other output: {lines:?}")
        }
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child's entry point: if [`ENV_VAR`] is set, run the peer protocol on stdin/stdout
/// and exit the process (status 0 after `quit`, 1 after an error, 2 for bad
/// parameters); otherwise return at once. Call it first thing in `main`, or from the
/// `peer_process_entry` test (see the module documentation).
pub fn run_if_peer() {
    let Some(raw) = std::env::var_os(ENV_VAR) else {
        return;
    };
    let params = match raw.to_str().map(Params::decode) {
        Some(Ok(params)) => params,
        Some(Err(e)) => {
            say(&format!("error bad {ENV_VAR}: {e}"));
            std::process::exit(2);
        }
        None => {
            say(&format!("error {ENV_VAR} is not UTF-8"));
            std::process::exit(2);
        }
    };
    match child_main(&params) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            say(&format!("error {}", e.replace('\n', " ")));
            std::process::exit(1);
        }
    }
}

/// The peer's parameters, as carried in [`ENV_VAR`].
#[derive(Debug, Clone, Copy)]
struct Params {
    addr: SocketAddr,
    n: usize,
    k: usize,
    seeds: Seeds,
    step: Duration,
}

impl Params {
    fn encode(&self) -> String {
        format!(
            "addr={};n={};k={};peer={};parent={};step_ms={}",
            self.addr,
            self.n,
            self.k,
            self.seeds.peer,
            self.seeds.parent,
            self.step.as_millis()
        )
    }

    fn decode(s: &str) -> Result<Self, String> {
        let (mut addr, mut n, mut k, mut peer, mut parent, mut step) =
            (None, None, None, None, None, None);
        for field in s.split(';') {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| format!("field {field:?} has no '='"))?;
            let bad = |e: &dyn std::fmt::Display| format!("field {key}={value:?}: {e}");
            match key {
                "addr" => addr = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
                "n" => n = Some(value.parse::<usize>().map_err(|e| bad(&e))?),
                "k" => k = Some(value.parse::<usize>().map_err(|e| bad(&e))?),
                "peer" => peer = Some(value.parse::<u64>().map_err(|e| bad(&e))?),
                "parent" => parent = Some(value.parse::<u64>().map_err(|e| bad(&e))?),
                "step_ms" => step = Some(value.parse::<u64>().map_err(|e| bad(&e))?),
                _ => return Err(format!("unknown field {key:?}")),
            }
        }
        let missing = |name: &str| format!("field {name} missing");
        Ok(Params {
            addr: addr.ok_or_else(|| missing("addr"))?,
            n: n.ok_or_else(|| missing("n"))?,
            k: k.ok_or_else(|| missing("k"))?,
            seeds: Seeds {
                peer: peer.ok_or_else(|| missing("peer"))?,
                parent: parent.ok_or_else(|| missing("parent"))?,
            },
            step: Duration::from_millis(step.ok_or_else(|| missing("step_ms"))?),
        })
    }
}

/// Print one answer line (with the marker) on stdout and flush it.
fn say(answer: &str) {
    let mut out = io::stdout().lock();
    // A parent that went away is noticed through stdin; nothing to do about it here.
    let _ = writeln!(out, "{MARK}{answer}");
    let _ = out.flush();
}

fn child_main(p: &Params) -> Result<(), String> {
    let str_err = |e: io::Error| e.to_string();
    crate::netns::raise_nofile(p.n as u64 + 64).map_err(str_err)?;
    let socks = connect_all(p)?;
    write_many(&socks, p.step, |i| {
        peer_stream_bytes(p.seeds, i, 0, HEADER_LEN + p.k)
    })
    .map_err(|e| format!("sending header and data: {e}"))?;
    wait_all_acked(&socks, p.step)?;
    for (i, sock) in socks.iter().enumerate() {
        crate::tcp::deafen(sock).map_err(|e| format!("connection {i}: deafen: {e}"))?;
    }
    say("ready");

    // Commands arrive through a reader thread so that every wait has a deadline.
    let (tx, commands) = mpsc::channel();
    std::thread::Builder::new()
        .name("peer-stdin".into())
        .spawn(move || {
            for line in io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| format!("starting the stdin reader thread: {e}"))?;
    loop {
        let line = match commands.recv_timeout(CHILD_IDLE_TIMEOUT) {
            Ok(line) => line,
            // The parent closed our stdin (it exited): nothing left to do.
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!("no command for {CHILD_IDLE_TIMEOUT:?}"))
            }
        };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["hear"] => {
                for (i, sock) in socks.iter().enumerate() {
                    crate::tcp::undeafen(sock)
                        .map_err(|e| format!("connection {i}: undeafen: {e}"))?;
                }
                say("hearing");
            }
            ["verify", k2, extra] => {
                let k2: usize = k2.parse().map_err(|e| format!("verify: K2 {k2:?}: {e}"))?;
                let extra: usize = extra
                    .parse()
                    .map_err(|e| format!("verify: EXTRA {extra:?}: {e}"))?;
                let seeds = p.seeds;
                read_exact_many(&socks, k2 + extra, p.step, |i, offset, bytes| {
                    seeds
                        .parent_pattern(i)
                        .verify(offset, bytes)
                        .map_err(|m| format!("connection {i}: parent stream: {m}"))
                })
                .map_err(|e| format!("verify: {e}"))?;
                let from = (HEADER_LEN + p.k) as u64;
                write_many(&socks, p.step, |i| peer_stream_bytes(seeds, i, from, extra))
                    .map_err(|e| format!("verify: sending {extra} more bytes: {e}"))?;
                say("verified");
            }
            ["quit"] => return Ok(()),
            _ => return Err(format!("unknown command {line:?}")),
        }
    }
}

/// Open `p.n` connections to `p.addr`, one after the other, each bounded by the step
/// deadline. Non-blocking sockets (so a lost SYN cannot block us past the deadline).
fn connect_all(p: &Params) -> Result<Vec<TcpStream>, String> {
    let deadline = Instant::now() + p.step;
    let domain = match p.addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let (storage, len) = sockaddr(p.addr);
    let mut socks = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let fd = crate::tcp::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK)
            .map_err(|e| format!("connection {i}: socket: {e}"))?;
        // SAFETY: connect() reads `len` bytes of the sockaddr we own; the fd is ours.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&storage as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(format!("connection {i}: connect to {}: {err}", p.addr));
            }
            loop {
                let now = Instant::now();
                if now >= deadline {
                    return Err(format!(
                        "connection {i}: connect to {} not complete within {:?}",
                        p.addr, p.step
                    ));
                }
                let ready = poll_some(
                    &[fd.as_fd()],
                    libc::POLLOUT,
                    (deadline - now).min(POLL_SLICE),
                )
                .map_err(|e| format!("connection {i}: {e}"))?;
                if ready > 0 {
                    break;
                }
            }
            let so_error = sock_error(fd.as_fd()).map_err(|e| format!("connection {i}: {e}"))?;
            if so_error != 0 {
                return Err(format!(
                    "connection {i}: connect to {}: {}",
                    p.addr,
                    io::Error::from_raw_os_error(so_error)
                ));
            }
        }
        socks.push(TcpStream::from(fd));
    }
    Ok(socks)
}

/// Wait until every connection has had everything acknowledged (`SIOCOUTQ` 0).
fn wait_all_acked(socks: &[TcpStream], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<usize> = (0..socks.len()).collect();
    loop {
        let mut still = Vec::new();
        for i in pending {
            let outq = crate::tcp::outq(&socks[i])
                .map_err(|e| format!("connection {i}: SIOCOUTQ: {e}"))?;
            if outq != 0 {
                still.push(i);
            }
        }
        pending = still;
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{} connections still had unacknowledged data after {timeout:?} (e.g. {})",
                pending.len(),
                pending[0]
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain bytes; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned for any
            // sockaddr type, and we write a complete sockaddr_in at its start.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// `SO_ERROR` (the result of a non-blocking connect).
fn sock_error(fd: BorrowedFd<'_>) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into the int we own.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(context(io::Error::last_os_error(), "getsockopt(SO_ERROR)"));
    }
    Ok(value)
}

/// `recv(2)`, retrying `EINTR`.
fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we
        // borrow mutably for the call; the fd is borrowed for the call.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Send as much of `data` as the socket takes now (`MSG_DONTWAIT | MSG_NOSIGNAL`).
fn send_some(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    let mut sent = 0;
    while sent < data.len() {
        let rest = &data[sent..];
        // SAFETY: the kernel reads at most `rest.len()` bytes from `rest`, borrowed for
        // the call; the fd is borrowed for the call.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            sent += n as usize;
            continue;
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "send took 0 bytes",
            ));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => break,
            _ => return Err(err),
        }
    }
    Ok(sent)
}

/// `poll(2)` for `events` on all `fds`, at most `timeout`; returns how many are ready.
fn poll_some(
    fds: &[BorrowedFd<'_>],
    events: libc::c_short,
    timeout: Duration,
) -> io::Result<usize> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events,
            revents: 0,
        })
        .collect();
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll() reads and writes `pollfds.len()` pollfd structs in the vector we
    // own; the descriptors are borrowed for the call.
    let rc = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(context(err, "poll"));
    }
    Ok(rc as usize)
}

fn conn_error(err: io::Error, i: usize, step: &str) -> io::Error {
    context(err, &format!("connection {i}: {step}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn params_round_trip() {
        let p = Params {
            addr: "127.0.0.1:4000".parse().expect("addr"),
            n: 3,
            k: 77,
            seeds: Seeds {
                peer: 1,
                parent: u64::MAX,
            },
            step: Duration::from_millis(1234),
        };
        let q = Params::decode(&p.encode()).expect("decode");
        assert_eq!(q.addr, p.addr);
        assert_eq!((q.n, q.k, q.seeds, q.step), (p.n, p.k, p.seeds, p.step));
        assert!(Params::decode("addr=1.2.3.4:5;n=1").is_err());
        assert!(Params::decode("bogus").is_err());
    }

    #[test]
    fn peer_stream_has_the_header_then_the_pattern() {
        let seeds = Seeds { peer: 5, parent: 6 };
        let all = peer_stream_bytes(seeds, 0x0102, 0, HEADER_LEN + 100);
        assert_eq!(&all[..HEADER_LEN], &0x0102u64.to_le_bytes());
        assert_eq!(
            &all[HEADER_LEN..],
            &seeds.peer_pattern(0x0102).bytes(0, 100)[..]
        );
        for start in [0usize, 3, 8, 50] {
            let part = peer_stream_bytes(seeds, 0x0102, start as u64, 20);
            assert_eq!(&part[..], &all[start..start + 20]);
            verify_peer_stream(seeds, 0x0102, start as u64, &part).expect("verifies");
            assert!(verify_peer_stream(seeds, 0x0103, start as u64, &part).is_err());
        }
    }

    /// The whole protocol end to end, with this test binary as the peer (the entry
    /// point is the test below).
    #[test]
    fn peer_process_round_trip() {
        crate::netns::enter_private_netns().expect("private netns (run the tests as root)");
        let seeds = Seeds {
            peer: 0xAB,
            parent: 0xCD,
        };
        let (n, k, k2, extra) = (40, 3000, 500, 700);
        let listener = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("listener");
        let addr = listener.local_addr().expect("addr");
        let args = [
            "--exact",
            "peer::tests::peer_process_entry",
            "--nocapture",
            "--test-threads=1",
        ];
        let mut peer = PeerProcess::spawn(addr, n, k, seeds, &args).expect("spawn");
        let t = Duration::from_secs(20);
        let socks = accept_indexed(&listener, n, t).expect("accept");
        peer.wait_ready(t).expect("ready");
        for (i, s) in socks.iter().enumerate() {
            assert_eq!(peek_index(s).expect("peek"), Some(i as u64));
            assert_eq!(crate::tcp::inq(s).expect("inq") as usize, HEADER_LEN + k);
        }
        write_many(&socks, t, |i| seeds.parent_pattern(i).bytes(0, k2)).expect("write");
        assert!(crate::tcp::holds_for(Duration::from_millis(100), || socks
            .iter()
            .all(|s| crate::tcp::outq(s).ok() == Some(k2 as u32))));
        peer.hear(t).expect("hear");
        write_many(&socks, t, |i| {
            seeds.parent_pattern(i).bytes(k2 as u64, extra)
        })
        .expect("extra");
        peer.verify(k2, extra, t).expect("verify");
        read_exact_many(&socks, HEADER_LEN + k + extra, t, |i, off, b| {
            verify_peer_stream(seeds, i, off, b)
        })
        .expect("read back");
        assert!(peer.quit(t).expect("quit").success());
    }

    #[test]
    fn peer_reports_corrupt_data() {
        crate::netns::enter_private_netns().expect("private netns (run the tests as root)");
        let seeds = Seeds { peer: 1, parent: 2 };
        let listener = listen(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("listener");
        let addr = listener.local_addr().expect("addr");
        let args = [
            "--exact",
            "peer::tests::peer_process_entry",
            "--nocapture",
            "--test-threads=1",
        ];
        let mut peer = PeerProcess::spawn(addr, 2, 10, seeds, &args).expect("spawn");
        let t = Duration::from_secs(20);
        let socks = accept_indexed(&listener, 2, t).expect("accept");
        peer.wait_ready(t).expect("ready");
        peer.hear(t).expect("hear");
        // Connection 1 gets connection 0's stream.
        write_many(&socks, t, |_| seeds.parent_pattern(0).bytes(0, 16)).expect("write");
        let err = peer.verify(16, 0, t).expect_err("corruption not reported");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("connection 1"), "{err}");
    }

    #[test]
    fn peer_process_entry() {
        run_if_peer();
    }
}
