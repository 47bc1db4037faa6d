//! Pieces both helper benches use: their set-up (descriptors, the helper), the CPU
//! time a process or thread spent so far (from `/proc/.../schedstat`, which counts every
//! thread separately — the helper has a worker thread besides its main one) and the
//! median of a sample.

use std::process::Child;
use std::time::Duration;

use baton_repair_ipc::RepairClient;
use baton_testkit::netns;

/// The connection counts to measure: the numbers among the command-line arguments
/// (others, such as cargo's `--bench`, are ignored), else `default`.
pub fn sizes_from_args(default: &[usize]) -> Vec<usize> {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if sizes.is_empty() {
        default.to_vec()
    } else {
        sizes
    }
}

/// Raise `RLIMIT_NOFILE` as far as allowed; panics unless it leaves room for `n`
/// connections plus slack for the bench's other descriptors.
pub fn raise_nofile_for(n: usize) {
    let limit = netns::raise_nofile(1 << 20).expect("raise RLIMIT_NOFILE");
    assert!(
        limit >= n as u64 + 200,
        "RLIMIT_NOFILE {limit} is too low for {n} connections"
    );
}

/// The helper (`--quiet`), spawned by the client library, with `timeout` per request.
pub fn spawn_helper(timeout: Duration) -> (RepairClient, Child) {
    let (mut client, helper) = RepairClient::spawn(env!("CARGO_BIN_EXE_baton-repair"), ["--quiet"])
        .expect("spawn baton-repair");
    client.set_timeout(timeout);
    (client, helper)
}

/// Time on CPU so far of every thread of process `pid`, from their `schedstat` files.
pub fn process_cpu_time(pid: u32) -> Duration {
    let tasks = format!("/proc/{pid}/task");
    std::fs::read_dir(&tasks)
        .unwrap_or_else(|e| panic!("read {tasks}: {e}"))
        .map(|entry| {
            let entry = entry.unwrap_or_else(|e| panic!("read {tasks}: {e}"));
            cpu_time(&format!("{}/schedstat", entry.path().display()))
        })
        .sum()
}

/// Time on CPU so far of the calling thread.
pub fn thread_cpu_time() -> Duration {
    cpu_time("/proc/thread-self/schedstat")
}

/// Time on CPU so far, from the first field of a `schedstat` file (nanoseconds).
fn cpu_time(schedstat: &str) -> Duration {
    let text =
        std::fs::read_to_string(schedstat).unwrap_or_else(|e| panic!("read {schedstat}: {e}"));
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .unwrap_or_else(|| panic!("{schedstat}: unexpected content {text:?}"));
    Duration::from_nanos(ns)
}

/// The median of `v` (the mean of the middle two for an even count); NaN when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}
