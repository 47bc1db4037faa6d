//! A second thread for the per-socket work of a batch (off with `--single-thread`).
//!
//! Theory of operation. Almost all of a request's cost is system calls on its sockets
//! (a dump is about 40 per socket, a restore about 25, plus the kernel's work behind
//! them), and the sockets of a batch are independent of each other. [`Worker::map`]
//! therefore hands the second half of a batch to one long-lived worker thread while the
//! serve loop does the first half, then joins the results in order. Why these rules:
//!
//! * One thread, spawned once, *inside* the sandbox: [`Worker::spawn`] runs after the
//!   capability, no_new_privs and Landlock steps (which act on the calling thread; a
//!   new thread inherits their result) and before the seccomp filter, which is installed
//!   on every thread at once and forbids `clone`. `spawn` returns only once the thread
//!   is running its loop, so that the thread's own start-up (stack guard, signal stack)
//!   is over before the filter arrives.
//! * Work moves by value (the descriptors and states of the half), never by reference:
//!   the worker outlives every request, and no `unsafe` is needed to lend it borrowed
//!   descriptors. The half comes back with its results, so the serve loop still closes
//!   every descriptor before it replies.
//! * Small batches stay on the serve loop: handing over costs a few microseconds of
//!   wake-up, more than the work of a few sockets.
//! * If the worker is gone (it never panics by design, but a bug might make it), its
//!   half fails with a per-socket error rather than taking the helper down.
//! * What it costs (`cargo bench -p baton-repair --bench repair` compares both on a
//!   2-core machine shared with other work): 3–5 µs more CPU per socket (a
//!   multi-threaded process takes a reference on every descriptor lookup, and the two
//!   threads share one allocator lock). It pays off when a second core is free — the
//!   usual case at a migration, where the guest is paused — and not when every core is
//!   busy, where `--single-thread` does as well.
//!
//! Memory: the helper allocates in one glibc arena only ([`tune_allocator`]): a second
//! arena would grow with `mprotect`, which seccomp forbids, and the queues of a batch
//! are allocated and freed in bulk, which the same call keeps from going back to the
//! kernel after every request (each fresh page costs a page fault, about as much as a
//! system call).

use std::sync::mpsc::{self, Sender};
use std::sync::Arc;

use baton_proto::repair::{SocketError, SocketResult};

/// Batches smaller than this are not split.
pub const SPLIT_MIN: usize = 8;

/// Freed memory below this stays in the helper's heap (glibc `M_TRIM_THRESHOLD`).
const KEEP_FREED: libc::c_int = 64 << 20;
/// Allocations up to this size come from the heap (glibc `M_MMAP_THRESHOLD`; 32 MiB is
/// glibc's maximum), so that a batch's queues reuse the previous batch's pages.
const HEAP_UP_TO: libc::c_int = 32 << 20;

/// A job for the worker thread.
type Job = Box<dyn FnOnce() + Send>;

/// The worker thread could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("start the worker thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("the worker thread ended during its start-up")]
    Startup,
}

/// Configure glibc's allocator for the helper: one arena, freed memory kept. Call before
/// any thread is started. Returns false where a setting was refused.
pub fn tune_allocator() -> bool {
    let settings = [
        (libc::M_ARENA_MAX, 1),
        (libc::M_TRIM_THRESHOLD, KEEP_FREED),
        (libc::M_MMAP_THRESHOLD, HEAP_UP_TO),
    ];
    settings.iter().all(|&(param, value)| {
        // SAFETY: mallopt only changes allocator parameters; it is called from the one
        // thread that exists at this point.
        unsafe { libc::mallopt(param, value) == 1 }
    })
}

/// Handle on the worker thread (or on none: see [`Worker::none`]). Dropping it ends the
/// thread once it is idle.
#[derive(Debug)]
pub struct Worker {
    jobs: Option<Sender<Job>>,
}

impl Worker {
    /// No worker thread: [`Worker::map`] does all the work on the calling thread. For
    /// when the allocator could not be set up for a second thread under the filter.
    pub fn none() -> Worker {
        Worker { jobs: None }
    }

    /// Start the worker thread and wait until it runs its loop.
    pub fn spawn() -> Result<Worker, WorkerError> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("repair-worker".into())
            .spawn(move || {
                if ready_tx.send(()).is_err() {
                    return;
                }
                drop(ready_tx);
                while let Ok(job) = inbox.recv() {
                    job();
                }
            })
            .map_err(WorkerError::Spawn)?;
        ready_rx.recv().map_err(|_| WorkerError::Startup)?;
        Ok(Worker { jobs: Some(jobs) })
    }

    /// `operation` on every item, in order; for batches of at least [`SPLIT_MIN`] items
    /// the second half runs on the worker thread meanwhile. Returns the items (so that
    /// the caller decides when descriptors among them are closed) and one result each.
    pub fn map<T, R, F>(&self, mut items: Vec<T>, operation: F) -> (Vec<T>, Vec<SocketResult<R>>)
    where
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(usize, &T) -> SocketResult<R> + Send + Sync + 'static,
    {
        let run = |offset: usize, part: &[T], operation: &F| -> Vec<SocketResult<R>> {
            part.iter()
                .enumerate()
                .map(|(i, item)| operation(offset + i, item))
                .collect()
        };
        let Some(jobs) = self.jobs.as_ref().filter(|_| items.len() >= SPLIT_MIN) else {
            let results = run(0, &items, &operation);
            return (items, results);
        };
        let split = items.len().div_ceil(2);
        let second = items.split_off(split);
        let second_len = second.len();
        let operation = Arc::new(operation);
        let theirs = Arc::clone(&operation);
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let results = run(split, &second, &theirs);
            // The serve loop waits for this; if it is gone there is nobody to tell.
            let _ = done_tx.send((second, results));
        });
        let handed_over = jobs.send(job).is_ok();
        let mut results = run(0, &items, &operation);
        let back: Option<(Vec<T>, Vec<SocketResult<R>>)> = if handed_over {
            done_rx.recv().ok()
        } else {
            None
        };
        match back {
            Some((second, second_results)) => {
                items.extend(second);
                results.extend(second_results);
            }
            None => {
                tracing::error!("the worker thread is gone; its half of the batch failed");
                results.extend((0..second_len).map(|_| Err(worker_gone())));
            }
        }
        (items, results)
    }
}

fn worker_gone() -> SocketError {
    SocketError {
        step: "helper".into(),
        errno: None,
        detail: "the helper's worker thread is gone".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_for_every_size() {
        let worker = Worker::spawn().expect("spawn");
        for n in [0, 1, SPLIT_MIN - 1, SPLIT_MIN, SPLIT_MIN + 1, 253] {
            let items: Vec<usize> = (0..n).map(|i| i * 10).collect();
            let (back, results) = worker.map(items, |index, item: &usize| {
                if index % 3 == 0 {
                    Err(SocketError {
                        step: "test".into(),
                        errno: None,
                        detail: format!("{index}"),
                    })
                } else {
                    Ok((index, *item))
                }
            });
            assert_eq!(back, (0..n).map(|i| i * 10).collect::<Vec<_>>());
            assert_eq!(results.len(), n);
            for (i, r) in results.iter().enumerate() {
                match r {
                    Ok(pair) => assert_eq!(*pair, (i, i * 10)),
                    Err(e) => {
                        assert_eq!(i % 3, 0);
                        assert_eq!(e.detail, format!("{i}"));
                    }
                }
            }
        }
    }

    #[test]
    fn without_a_thread_everything_runs_on_the_caller() {
        let worker = Worker::none();
        let me = std::thread::current().id();
        let (back, results) = worker.map((0..20).collect::<Vec<u32>>(), move |i, item| {
            assert_eq!(i as u32, *item);
            Ok(std::thread::current().id() == me)
        });
        assert_eq!(back.len(), 20);
        assert!(results.into_iter().all(|r| r.expect("ok")));
    }

    #[test]
    fn the_second_half_runs_on_the_worker_thread() {
        let worker = Worker::spawn().expect("spawn");
        let me = std::thread::current().id();
        let (_, results) = worker.map((0..20).collect::<Vec<u32>>(), move |_, _| {
            Ok(std::thread::current().id() == me)
        });
        let on_caller: Vec<bool> = results.into_iter().map(|r| r.expect("ok")).collect();
        assert!(on_caller[..10].iter().all(|&here| here));
        assert!(on_caller[10..].iter().all(|&here| !here));
    }
}
