//! `connrate`: TCP connection setup rate, for `vmbench/perf.sh` (a benchmark tool, not a
//! test).
//!
//! Theory of operation. Two halves, one binary, so the same program runs on the host and
//! inside the vmbench guest (`build-guest.sh` copies it with its shared libraries):
//!
//! * `connrate serve PORT` (host): listens on 127.0.0.1:PORT, echoes whatever a
//!   connection sends and closes it at EOF. One thread drives every connection with
//!   poll(2), so a parallel client never waits on another connection's close. It prints
//!   `connrate: serving ADDR` once listening (perf.sh waits for that line) and runs until
//!   killed, or with `--exit-after N` until N connections have closed (the guest's
//!   server for the inbound direction, so the guest's script can carry on).
//! * `connrate connect ADDR PORT N [-P K]` (guest; or host, through a port forward): opens N connections to ADDR:PORT, K
//!   at a time (default 1: strictly sequential, which measures setup latency). Each
//!   connection is a nonblocking connect, then one byte each way — so it is established
//!   end to end (through the backend to the host's socket and back), not just accepted
//!   by a backend that answers the SYN itself — then close. It prints one line:
//!
//!   ```text
//!   connrate: addr=10.77.0.1:5202 connections=1000 parallel=1 secs=2.345 conn_per_s=426.4 \
//!     connect_p50_us=812 connect_p99_us=2301 total_p50_us=1980 total_p99_us=4410
//!   ```
//!
//!   `connect` is connect() until the socket is writable (the guest saw the SYN-ACK);
//!   `total` runs to the echoed byte. The rate is N over the wall time from the first
//!   connect to the last echo. Any failed or stalled (10 s) connection fails the run:
//!   a rate that hides errors is no figure.
//!
//! IPv4 only: the VM bench reaches the host through the gateway's IPv4 address.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

/// How long one connection may take, from connect() to the echoed byte.
const STALL: Duration = Duration::from_secs(10);
/// poll(2) wake-up period of the client, so stalls are noticed without a ready socket.
const POLL_TICK_MS: u16 = 200;

#[derive(Parser)]
#[command(about = "TCP connection setup rate (vmbench/perf.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Listen on BIND:PORT, echo what each connection sends, close it at EOF.
    Serve {
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value_t = Ipv4Addr::LOCALHOST)]
        bind: Ipv4Addr,
        /// Exit once this many connections have closed (default: serve until killed).
        #[arg(long)]
        exit_after: Option<NonZeroUsize>,
    },
    /// Open COUNT connections to ADDR:PORT (one byte each way, then close) and print the
    /// rate and connect times.
    Connect {
        addr: Ipv4Addr,
        port: u16,
        count: NonZeroUsize,
        /// Connections in flight at once (1: sequential).
        #[arg(short = 'P', long, default_value = "1")]
        parallel: NonZeroUsize,
    },
}

#[derive(Debug, thiserror::Error)]
enum ConnrateError {
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddrV4,
        source: io::Error,
    },
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        source: io::Error,
    },
    #[error("connection {index} to {addr}: {step}: {source}")]
    Connection {
        index: usize,
        addr: SocketAddrV4,
        step: &'static str,
        source: io::Error,
    },
    #[error("connection {index} to {addr}: closed by the server before the echo")]
    NoEcho { index: usize, addr: SocketAddrV4 },
    #[error("connection {index} to {addr}: no {waiting_for} after {STALL:?}")]
    Stalled {
        index: usize,
        addr: SocketAddrV4,
        waiting_for: &'static str,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            port,
            bind,
            exit_after,
        } => serve(
            SocketAddrV4::new(bind, port),
            exit_after.map(NonZeroUsize::get),
        ),
        Command::Connect {
            addr,
            port,
            count,
            parallel,
        } => connect_many(SocketAddrV4::new(addr, port), count.get(), parallel.get()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connrate: {e}");
            ExitCode::FAILURE
        }
    }
}

// --- server ---------------------------------------------------------------------------

/// Serve until killed, or until `exit_after` connections have closed.
fn serve(addr: SocketAddrV4, exit_after: Option<usize>) -> Result<(), ConnrateError> {
    let listener =
        TcpListener::bind(addr).map_err(|source| ConnrateError::Listen { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ConnrateError::Io {
            step: "make the listener nonblocking",
            source,
        })?;
    println!("connrate: serving {addr}");
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut closed = 0usize;
    loop {
        let ready = {
            let mut fds: Vec<PollFd<'_>> = std::iter::once(listener.as_fd())
                .chain(conns.iter().map(AsFd::as_fd))
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(ConnrateError::Io {
                        step: "poll the server's sockets",
                        source: e.into(),
                    })
                }
            }
            fds.iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect::<Vec<bool>>()
        };
        let mut index = 0;
        conns.retain_mut(|conn| {
            index += 1;
            let keep = !ready[index] || echo_until_eof(conn);
            closed += usize::from(!keep);
            keep
        });
        if exit_after.is_some_and(|n| closed >= n) {
            println!("connrate: served {closed} connections");
            return Ok(());
        }
        if ready[0] {
            accept_all(&listener, &mut conns)?;
        }
    }
}

/// Accept every pending connection. A connection reset before accept() is the client's
/// problem (it reports it); anything else (e.g. out of descriptors) stops the server.
fn accept_all(listener: &TcpListener, conns: &mut Vec<TcpStream>) -> Result<(), ConnrateError> {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(true)
                    .map_err(|source| ConnrateError::Io {
                        step: "make an accepted connection nonblocking",
                        source,
                    })?;
                // The one-byte echo must not wait for Nagle.
                conn.set_nodelay(true).map_err(|source| ConnrateError::Io {
                    step: "set TCP_NODELAY on an accepted connection",
                    source,
                })?;
                conns.push(conn);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(source) => {
                return Err(ConnrateError::Io {
                    step: "accept",
                    source,
                })
            }
        }
    }
}

/// Echo what is readable now; false once the connection is finished (EOF or an error,
/// which the client sees and reports) and should be closed.
fn echo_until_eof(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return false,
            // A few bytes into a fresh socket's empty send buffer: never a partial write.
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

// --- client ---------------------------------------------------------------------------

/// One connection in flight.
struct Attempt {
    index: usize,
    stream: TcpStream,
    started: Instant,
    /// When the socket became writable; `None` while connect() is in progress.
    connected: Option<Instant>,
}

/// Times of one finished connection.
struct Finished {
    connect: Duration,
    total: Duration,
}

fn connect_many(addr: SocketAddrV4, count: usize, parallel: usize) -> Result<(), ConnrateError> {
    let mut in_flight: Vec<Attempt> = Vec::with_capacity(parallel);
    let mut finished: Vec<Finished> = Vec::with_capacity(count);
    let mut next = 0;
    let start = Instant::now();
    while finished.len() < count {
        while next < count && in_flight.len() < parallel {
            in_flight.push(start_attempt(addr, next)?);
            next += 1;
        }
        let ready = {
            let mut fds: Vec<PollFd<'_>> = in_flight
                .iter()
                .map(|a| {
                    let events = if a.connected.is_none() {
                        PollFlags::POLLOUT
                    } else {
                        PollFlags::POLLIN
                    };
                    PollFd::new(a.stream.as_fd(), events)
                })
                .collect();
            match poll(&mut fds, PollTimeout::from(POLL_TICK_MS)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(ConnrateError::Io {
                        step: "poll the client's sockets",
                        source: e.into(),
                    })
                }
            }
            fds.iter()
                .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
                .collect::<Vec<bool>>()
        };
        let now = Instant::now();
        let mut still: Vec<Attempt> = Vec::with_capacity(parallel);
        for (attempt, is_ready) in in_flight.drain(..).zip(ready) {
            if is_ready {
                if let Some(attempt) = advance(attempt, addr, &mut finished)? {
                    still.push(attempt);
                }
            } else if now.duration_since(attempt.started) > STALL {
                return Err(ConnrateError::Stalled {
                    index: attempt.index,
                    addr,
                    waiting_for: if attempt.connected.is_none() {
                        "connection"
                    } else {
                        "echo"
                    },
                });
            } else {
                still.push(attempt);
            }
        }
        in_flight = still;
    }
    let secs = start.elapsed().as_secs_f64();
    report(addr, parallel, secs, &finished);
    Ok(())
}

/// A nonblocking socket with connect() under way (or already done, as on loopback).
fn start_attempt(addr: SocketAddrV4, index: usize) -> Result<Attempt, ConnrateError> {
    let err = |step, source| ConnrateError::Connection {
        index,
        addr,
        step,
        source,
    };
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| err("socket", e.into()))?;
    socket::setsockopt(&fd, sockopt::TcpNoDelay, &true)
        .map_err(|e| err("set TCP_NODELAY", e.into()))?;
    let started = Instant::now();
    match socket::connect(fd.as_raw_fd(), &SockaddrIn::from(addr)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(err("connect", e.into())),
    }
    Ok(Attempt {
        index,
        stream: TcpStream::from(fd),
        started,
        connected: None,
    })
}

/// Move a ready connection on: connected → send the byte; echo arrived → close and
/// record it (returns `None`).
fn advance(
    mut attempt: Attempt,
    addr: SocketAddrV4,
    finished: &mut Vec<Finished>,
) -> Result<Option<Attempt>, ConnrateError> {
    let index = attempt.index;
    let err = |step, source| ConnrateError::Connection {
        index,
        addr,
        step,
        source,
    };
    let now = Instant::now();
    match attempt.connected {
        None => {
            let so_error = socket::getsockopt(&attempt.stream, sockopt::SocketError)
                .map_err(|e| err("read SO_ERROR", e.into()))?;
            if so_error != 0 {
                return Err(err("connect", io::Error::from_raw_os_error(so_error)));
            }
            attempt.connected = Some(now);
            attempt
                .stream
                .write_all(b"c")
                .map_err(|e| err("send the byte", e))?;
            Ok(Some(attempt))
        }
        Some(connected) => {
            let mut byte = [0u8; 1];
            match attempt.stream.read(&mut byte) {
                Ok(0) => Err(ConnrateError::NoEcho { index, addr }),
                Ok(_) => {
                    finished.push(Finished {
                        connect: connected.duration_since(attempt.started),
                        total: now.duration_since(attempt.started),
                    });
                    // Dropping the stream closes it: the FIN goes out now.
                    Ok(None)
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    Ok(Some(attempt))
                }
                Err(e) => Err(err("receive the echo", e)),
            }
        }
    }
}

fn report(addr: SocketAddrV4, parallel: usize, secs: f64, finished: &[Finished]) {
    let count = finished.len();
    let mut connect: Vec<Duration> = finished.iter().map(|f| f.connect).collect();
    let mut total: Vec<Duration> = finished.iter().map(|f| f.total).collect();
    connect.sort_unstable();
    total.sort_unstable();
    let rate = if secs > 0.0 { count as f64 / secs } else { 0.0 };
    println!(
        "connrate: addr={addr} connections={count} parallel={parallel} secs={secs:.3} \
         conn_per_s={rate:.1} connect_p50_us={} connect_p99_us={} total_p50_us={} \
         total_p99_us={}",
        percentile_us(&connect, 50),
        percentile_us(&connect, 99),
        percentile_us(&total, 50),
        percentile_us(&total, 99),
    );
}

/// Nearest-rank percentile of sorted durations, in microseconds (0 if empty).
fn percentile_us(sorted: &[Duration], pct: usize) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted[rank - 1].as_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(list: &[u64]) -> Vec<Duration> {
        list.iter().copied().map(Duration::from_micros).collect()
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let sorted = micros(&(1..=100).collect::<Vec<u64>>());
        assert_eq!(percentile_us(&sorted, 50), 50);
        assert_eq!(percentile_us(&sorted, 99), 99);
        let three = micros(&[10, 20, 30]);
        assert_eq!(percentile_us(&three, 50), 20);
        assert_eq!(percentile_us(&three, 99), 30);
        assert_eq!(percentile_us(&micros(&[7]), 1), 7);
        assert_eq!(percentile_us(&[], 50), 0);
    }
}
