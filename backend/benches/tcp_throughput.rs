//! Device-harness TCP throughput: the real `baton` binary in a private network
//! namespace, the vhost-user test frontend and smoltcp as the guest TCP stack (the
//! helpers are trimmed copies of those in `tests/tcp.rs`). Measures
//!   - one guest -> host stream (guest connects to the gateway, mapped to 127.0.0.1),
//!   - one host -> guest stream through a `-t 5000:6000` forward,
//!   - the rate of sequential short guest -> host connections (connect, close, both
//!     FINs acknowledged).
//!
//! Run as root: `cargo bench -p baton --bench tcp_throughput`.
//! Env: `BATON_BENCH_MIB` (default 256) MiB per stream, `BATON_BENCH_CONNS` (default
//! 1000) short connections, `BATON_BENCH_DEBUG=1` runs baton with `--debug` (`=trace`:
//! `--trace`; default `--quiet`) and counts retransmission timeouts (each one a stall of
//! a second or more), `BATON_BENCH_LOG=FILE` keeps baton's log.
//!
//! The data is a periodic pattern (period 65521 bytes, a prime, so a lost, duplicated or
//! reordered segment shows) and every received byte is compared with it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use baton_testkit::pattern::Pattern;
use smoltcp::socket::tcp;

#[path = "../tests/common/mod.rs"]
mod common;
use common::guest::{Guest, GW_V4};
use common::{Baton, V4_ONLY};

const TIMEOUT: Duration = Duration::from_secs(300);
const STREAM_BUFFER: usize = 4 << 20;
const PERIOD: usize = 65521;
const CHUNK: usize = 65536;

/// Polling the common guest until a condition holds.
trait RunUntil {
    /// Poll until `done`, panicking after `TIMEOUT`.
    fn run_until(&mut self, what: &str, done: impl FnMut(&mut Guest) -> bool);
}

impl RunUntil for Guest {
    fn run_until(&mut self, what: &str, mut done: impl FnMut(&mut Guest) -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            self.poll();
            if done(self) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out: {what}");
            self.wait();
        }
    }
}

/// `PERIOD`-periodic data: byte i is `block[i % PERIOD]`.
struct Periodic {
    buf: Vec<u8>,
}

impl Periodic {
    fn new(seed: u64) -> Self {
        let base = Pattern::new(seed).bytes(0, PERIOD);
        // CHUNK < 2 * PERIOD: three periods hold every window of CHUNK bytes.
        let mut buf = base.repeat(3);
        buf.truncate(PERIOD + CHUNK);
        Periodic { buf }
    }

    /// Up to `CHUNK` bytes of the stream at `offset`.
    fn at(&self, offset: u64, len: usize) -> &[u8] {
        let start = (offset % PERIOD as u64) as usize;
        &self.buf[start..start + len.min(CHUNK)]
    }

    fn check(&self, mut offset: u64, mut data: &[u8]) {
        while !data.is_empty() {
            let expected = self.at(offset, data.len());
            assert!(
                data[..expected.len()] == *expected,
                "corrupt data near offset {offset}"
            );
            offset += expected.len() as u64;
            data = &data[expected.len()..];
        }
    }
}

/// Reports pauses of more than 100 ms in a stream's progress (a healthy stream here
/// moves every millisecond): they point at lost window updates or retransmissions.
struct Stall {
    what: &'static str,
    offset: u64,
    since: Instant,
    start: Instant,
}

impl Stall {
    fn new(what: &'static str) -> Self {
        let now = Instant::now();
        Stall {
            what,
            offset: 0,
            since: now,
            start: now,
        }
    }

    fn progress(&mut self, offset: u64, queued: usize) {
        let now = Instant::now();
        if offset != self.offset {
            let paused = now - self.since;
            if paused > Duration::from_millis(100) {
                println!(
                    "tcp_throughput: {} stalled {} ms at offset {} (t={:.3} s, guest socket queue {queued} B)",
                    self.what,
                    paused.as_millis(),
                    self.offset,
                    (self.since - self.start).as_secs_f64()
                );
            }
            self.offset = offset;
            self.since = now;
        }
    }
}

fn mib_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / t.as_secs_f64()
}

/// Guest -> host: returns the time from the guest's connect to the host's EOF.
fn guest_to_host(guest: &mut Guest, total: u64) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let host: JoinHandle<(u64, Instant)> = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let data = Periodic::new(1);
        let mut buf = vec![0u8; 1 << 20];
        let mut received = 0u64;
        loop {
            let n = stream.read(&mut buf).expect("host read");
            if n == 0 {
                break;
            }
            data.check(received, &buf[..n]);
            received += n as u64;
        }
        let end = Instant::now();
        stream.shutdown(Shutdown::Write).expect("shutdown");
        (received, end)
    });
    let data = Periodic::new(1);
    let handle = guest.socket(STREAM_BUFFER, STREAM_BUFFER);
    let start = Instant::now();
    guest.connect(handle, (GW_V4, port), 40000);
    let mut sent = 0u64;
    let mut closed = false;
    let mut stall = Stall::new("guest->host");
    guest.run_until("guest -> host stream", |g| {
        let socket = g.tcp(handle);
        stall.progress(sent, socket.send_queue());
        while socket.can_send() && sent < total {
            let chunk = data.at(sent, (total - sent).min(CHUNK as u64) as usize);
            match socket.send_slice(chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => sent += n as u64,
            }
        }
        if sent == total && !closed {
            socket.close();
            closed = true;
        }
        closed && host.is_finished()
    });
    let (received, end) = host.join().expect("host reader");
    assert_eq!(received, total, "host received");
    guest.sockets.remove(handle);
    end - start
}

/// Host -> guest through the forward: time from the host's connect until the guest has
/// every byte and the host's FIN.
fn host_to_guest(guest: &mut Guest, total: u64) -> Duration {
    let handle = guest.socket(STREAM_BUFFER, STREAM_BUFFER);
    // smoltcp delays ACKs by 10 ms by default; a Linux guest acknowledges a bulk stream
    // at once (quick ACKs). With the delay: 256-837 MiB/s in three runs, without it
    // 880-1130 MiB/s (2 cores, release).
    guest.tcp(handle).set_ack_delay(None);
    guest.tcp(handle).listen(6000).expect("listen");
    let start = Instant::now();
    let host = std::thread::spawn(move || {
        let mut stream = TcpStream::connect("127.0.0.1:5000").expect("connect to the forward");
        let data = Periodic::new(2);
        let mut sent = 0u64;
        while sent < total {
            let chunk = data.at(sent, (total - sent).min(CHUNK as u64) as usize);
            stream.write_all(chunk).expect("host write");
            sent += chunk.len() as u64;
        }
        stream.shutdown(Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("host read");
    });
    let data = Periodic::new(2);
    let mut received = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut stall = Stall::new("host->guest");
    guest.run_until("host -> guest stream", |g| {
        let socket = g.tcp(handle);
        stall.progress(received, socket.recv_queue());
        while socket.can_recv() {
            match socket.recv_slice(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    data.check(received, &buf[..n]);
                    received += n as u64;
                }
            }
        }
        received >= total && !socket.may_recv()
    });
    let took = start.elapsed();
    assert_eq!(received, total, "guest received");
    guest.tcp(handle).close();
    guest.run_until("host side", |_| host.is_finished());
    host.join().expect("host writer");
    guest.sockets.remove(handle);
    took
}

/// Sequential short guest -> host connections: connect, the guest closes, the host reads
/// EOF and closes; the next one starts once the guest socket is in TIME-WAIT or closed.
fn connection_rate(guest: &mut Guest, count: u16) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let port = listener.local_addr().expect("addr").port();
    let host = std::thread::spawn(move || {
        for _ in 0..count {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut rest = Vec::new();
            stream.read_to_end(&mut rest).expect("read");
        }
    });
    let start = Instant::now();
    for i in 0..count {
        let handle = guest.socket(4096, 4096);
        guest.connect(handle, (GW_V4, port), 20000 + i);
        guest.run_until("establishment", |g| g.tcp(handle).may_send());
        guest.tcp(handle).close();
        guest.run_until("close", |g| {
            matches!(
                g.tcp(handle).state(),
                tcp::State::TimeWait | tcp::State::Closed
            )
        });
        guest.sockets.remove(handle);
    }
    let took = start.elapsed();
    guest.run_until("host acceptor", |_| host.is_finished());
    host.join().expect("host acceptor");
    took
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` run passes nothing
    // and only wants to know that the target builds.
    if !std::env::args().any(|a| a == "--bench") {
        println!("tcp_throughput: run with `cargo bench -p baton --bench tcp_throughput`");
        return;
    }
    let mib = env_or("BATON_BENCH_MIB", 256);
    let conns = env_or("BATON_BENCH_CONNS", 1000).min(40000) as u16;
    let total = mib << 20;
    let _ = baton_testkit::netns::raise_nofile(8192);
    let baton = start_baton(&["-t", "5000:6000"]);
    let mut guest = Guest::new(baton.connect());

    let t = guest_to_host(&mut guest, total);
    println!(
        "tcp_throughput: guest->host {mib} MiB in {:.3} s = {:.1} MiB/s",
        t.as_secs_f64(),
        mib_per_s(total, t)
    );
    let t = host_to_guest(&mut guest, total);
    println!(
        "tcp_throughput: host->guest {mib} MiB in {:.3} s = {:.1} MiB/s",
        t.as_secs_f64(),
        mib_per_s(total, t)
    );
    let t = connection_rate(&mut guest, conns);
    println!(
        "tcp_throughput: {conns} sequential guest->host connections in {:.3} s = {:.0} connections/s ({:.0} us each)",
        t.as_secs_f64(),
        f64::from(conns) / t.as_secs_f64(),
        t.as_secs_f64() * 1e6 / f64::from(conns)
    );
    let log = baton.log();
    if std::env::var_os("BATON_BENCH_DEBUG").is_some() {
        // Each one is a stall of at least the retransmission timeout (1 s at first).
        println!(
            "tcp_throughput: {} retransmission timeout(s) towards the guest",
            log.matches("retransmission timeout").count()
        );
    }
    if let Some(path) = std::env::var_os("BATON_BENCH_LOG") {
        if let Err(err) = std::fs::write(&path, log) {
            eprintln!("tcp_throughput: writing the log: {err}");
        }
    }
}

/// Baton in a private network namespace (this thread), IPv4, quiet unless
/// `BATON_BENCH_DEBUG` is set.
fn start_baton(extra: &[&str]) -> Baton {
    baton_testkit::netns::enter_private_netns().expect("private network namespace (run as root)");
    let level = match std::env::var("BATON_BENCH_DEBUG").as_deref() {
        Ok("trace") => "--trace",
        Ok(_) => "--debug",
        Err(_) => "--quiet",
    };
    let args: Vec<&str> = V4_ONLY
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .chain([level])
        .collect();
    Baton::spawn("bench", &args)
}
