//! Encode and decode speed of the migration stream, without sockets or the helper: the
//! part of a device-state SAVE and LOAD that is `baton-proto`'s own.
//!
//! For each flow count N (env `BATON_BENCH_FLOWS`, default `1000,10000`) it builds a valid
//! state of N established TCP flows with kernel state, 4 KiB in each queue
//! (`BATON_BENCH_QUEUE` bytes), and measures, `BATON_BENCH_RUNS` times (default 5):
//!
//! * `encode → Vec`: [`encode_stream`];
//! * `encode → pipe`: [`write_stream`] through a 64 KiB `BufWriter` into a pipe (as the
//!   backend's SAVE does), a second thread reading it to EOF (as QEMU does);
//! * `decode ← slice`: [`decode_stream`] of the stream held in memory;
//! * `read ← pipe`: [`read_stream`] from a pipe that a second thread fills in 64 KiB
//!   writes (as QEMU does on LOAD), until the state is validated.
//!
//! The pipe cases run with the kernel's default pipe size and with a 1 MiB pipe
//! (`F_SETPIPE_SZ`, what an unprivileged process may set by default). Times are from the
//! start to the last byte read (encode) or to the validated state (decode); freeing the
//! state is not counted. After each run the allocator gives its free memory back to the
//! kernel (`malloc_trim`), so every run starts cold, as in a backend that has just
//! started: the page faults of the decoded state's memory are part of the figures (they
//! are a large part of them). Printed: best and median wall-clock ms, MB/s of stream at
//! the best, and the CPU time of the thread running `baton-proto`'s code (best run; the
//! other thread plays QEMU and is not counted) — a figure less disturbed by other load.
//! Run: `cargo bench -p baton-proto --bench stream`; `BATON_BENCH_CASE=read` runs only the
//! cases whose name contains `read` (for a profile).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_proto::migration::{
    decode_stream, encode_stream, read_stream, write_stream, MigrationState,
};
use nix::fcntl::{fcntl, FcntlArg};
use nix::time::{clock_gettime, ClockId};

#[path = "../tests/common/mod.rs"]
mod common;

/// QEMU moves device state through the pipe in chunks of this size, and the backend's
/// `BufWriter` has this capacity.
const CHUNK: usize = 64 << 10;
/// The larger pipe size the pipe cases also try.
const BIG_PIPE: usize = 1 << 20;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn flow_counts() -> Vec<u32> {
    std::env::var("BATON_BENCH_FLOWS")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("BATON_BENCH_FLOWS: comma-separated counts")
        })
        .collect()
}

/// A pipe, optionally resized; (read end, write end).
fn pipe(size: Option<usize>) -> (File, File) {
    let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().expect("pipe");
    if let Some(size) = size {
        let size = i32::try_from(size).expect("pipe size fits an int");
        fcntl(w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size)).expect("F_SETPIPE_SZ");
    }
    (File::from(r), File::from(w))
}

/// Wall-clock and this thread's CPU time of one run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
}

/// Measures one run from its creation.
struct Timer {
    wall: Instant,
    cpu: Duration,
}

fn thread_cpu() -> Duration {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("thread CPU clock")
        .into()
}

impl Timer {
    fn start() -> Self {
        Timer {
            wall: Instant::now(),
            cpu: thread_cpu(),
        }
    }

    fn stop(&self) -> Sample {
        Sample {
            wall: self.wall.elapsed(),
            cpu: thread_cpu().saturating_sub(self.cpu),
        }
    }
}

/// Write `stream` into a pipe of `pipe_size` from a thread, in `CHUNK` writes, and time
/// `read_stream` on the other end.
fn read_from_pipe(stream: &Arc<Vec<u8>>, pipe_size: Option<usize>, flows: usize) -> Sample {
    let (r, mut w) = pipe(pipe_size);
    let bytes = Arc::clone(stream);
    let timer = Timer::start();
    let writer = std::thread::spawn(move || {
        for chunk in bytes.chunks(CHUNK) {
            w.write_all(chunk).expect("write to pipe");
        }
    });
    let state = read_stream(r).expect("read_stream");
    let elapsed = timer.stop();
    writer.join().expect("writer thread");
    assert_eq!(state.tcp_flows.len(), flows);
    elapsed
}

/// Time `write_stream` through a `CHUNK` `BufWriter` into a pipe of `pipe_size`, a thread
/// reading it to EOF; returns the time and the bytes the reader saw.
fn write_to_pipe(state: &MigrationState, pipe_size: Option<usize>) -> (Sample, usize) {
    let (mut r, w) = pipe(pipe_size);
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0;
        loop {
            match r.read(&mut buf).expect("read from pipe") {
                0 => return total,
                n => total += n,
            }
        }
    });
    let timer = Timer::start();
    let out = write_stream(BufWriter::with_capacity(CHUNK, w), state).expect("write_stream");
    drop(out.into_inner().expect("flush"));
    let total = reader.join().expect("reader thread");
    (timer.stop(), total)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Whether the case named `case` is selected by `BATON_BENCH_CASE`.
fn selected(case: &str) -> bool {
    std::env::var("BATON_BENCH_CASE").map_or(true, |want| case.contains(want.as_str()))
}

/// Give the allocator's free memory back to the kernel, so that the next run starts cold.
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory; no allocation is in use by it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Run `measure` `runs` times if the case is selected, each from a trimmed heap, and
/// print its line: best and median time, MB/s at the best, and the least CPU time.
fn run_case(
    case: &str,
    flows: u32,
    bytes: usize,
    runs: usize,
    mut measure: impl FnMut() -> Sample,
) {
    if !selected(case) {
        return;
    }
    let samples: Vec<Sample> = (0..runs)
        .map(|_| {
            trim_heap();
            measure()
        })
        .collect();
    let mut times: Vec<Duration> = samples.iter().map(|s| s.wall).collect();
    times.sort();
    let (best, median) = (times[0], times[times.len() / 2]);
    let cpu = samples.iter().map(|s| s.cpu).min().unwrap_or_default();
    println!(
        "{flows:>6}  {:>8.1}  {case:<28} {:>8.2} {:>9.2} {:>7.0} {:>7.2}",
        bytes as f64 / 1e6,
        ms(best),
        ms(median),
        bytes as f64 / 1e6 / best.as_secs_f64(),
        ms(cpu),
    );
}

fn main() {
    let runs: usize = env_or("BATON_BENCH_RUNS", 5).max(1);
    let queue: u32 = env_or("BATON_BENCH_QUEUE", 4096);
    println!("migration stream: {queue} B in each TCP queue, best and median of {runs} runs");
    println!(
        "{:>6}  {:>8}  {:<28} {:>8} {:>9} {:>7} {:>7}",
        "flows", "MB", "case", "best ms", "median ms", "MB/s", "cpu ms"
    );
    for flows in flow_counts() {
        let state = common::bulk_state(flows, queue);
        let stream = Arc::new(encode_stream(&state).expect("encode"));
        // Every case must produce or accept exactly this stream and this state.
        assert_eq!(decode_stream(&stream).expect("decode"), state);
        let len = stream.len();
        let count = state.tcp_flows.len();

        run_case("encode → Vec", flows, len, runs, || {
            let timer = Timer::start();
            let bytes = encode_stream(&state).expect("encode");
            let elapsed = timer.stop();
            assert_eq!(bytes.len(), len);
            elapsed
        });
        for (name, size) in [("default pipe", None), ("1 MiB pipe", Some(BIG_PIPE))] {
            run_case(
                &format!("encode → pipe, {name}"),
                flows,
                len,
                runs,
                || {
                    let (elapsed, total) = write_to_pipe(&state, size);
                    assert_eq!(total, len);
                    elapsed
                },
            );
        }
        run_case("decode ← slice", flows, len, runs, || {
            let timer = Timer::start();
            let decoded = decode_stream(&stream).expect("decode");
            let elapsed = timer.stop();
            assert_eq!(decoded.tcp_flows.len(), count);
            elapsed
        });
        for (name, size) in [("default pipe", None), ("1 MiB pipe", Some(BIG_PIPE))] {
            run_case(&format!("read ← pipe, {name}"), flows, len, runs, || {
                read_from_pipe(&stream, size, count)
            });
        }
    }
}
