//! One alarm clock for every TCP timer: an eventfd in the shared epoll that becomes
//! readable when the earliest armed deadline passes.
//!
//! Theory of operation: flows keep their own deadlines (see `TimerQueue` in the parent
//! module); only the earliest one is handed to the clock. A single helper thread waits
//! on a condition variable until that deadline and then makes the eventfd readable, so
//! the device's worker runs `handle_host_events`, which expires due timers. (A timerfd
//! would do the same without the thread, but `timerfd_settime` is not on the seccomp
//! allow-list of the sandboxed backend; the thread needs only futex, clock_gettime and
//! write.) The thread is started on first use, i.e. after the sandbox is entered, and
//! stops when the clock is dropped.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use nix::sys::eventfd::{EfdFlags, EventFd};

#[derive(Debug, Default)]
struct Shared {
    deadline: Option<Instant>,
    stop: bool,
}

#[derive(Debug)]
pub(crate) struct AlarmClock {
    event: Arc<EventFd>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    /// The deadline last handed to the thread (avoids the lock when not earlier).
    armed: Option<Instant>,
}

impl AlarmClock {
    pub(crate) fn new() -> io::Result<Self> {
        let event =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(io::Error::from)?;
        Ok(AlarmClock {
            event: Arc::new(event),
            shared: Arc::new((Mutex::new(Shared::default()), Condvar::new())),
            thread: None,
            armed: None,
        })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    /// Make sure the eventfd fires no later than `deadline`.
    pub(crate) fn arm(&mut self, deadline: Instant) {
        if self.armed.is_some_and(|armed| armed <= deadline) {
            return;
        }
        self.armed = Some(deadline);
        if self.thread.is_none() {
            let event = Arc::clone(&self.event);
            let shared = Arc::clone(&self.shared);
            match std::thread::Builder::new()
                .name("tcp-timers".into())
                .spawn(move || run(&event, &shared))
            {
                Ok(handle) => self.thread = Some(handle),
                Err(err) => {
                    tracing::error!("starting the TCP timer thread failed: {err}");
                    return;
                }
            }
        }
        let (lock, condvar) = &*self.shared;
        if let Ok(mut shared) = lock.lock() {
            shared.deadline = Some(deadline);
            condvar.notify_one();
        }
    }

    /// Make the eventfd readable now, without the thread: the device runs
    /// `handle_host_events` again as soon as it can (work left for another turn).
    pub(crate) fn ring_now(&self) {
        if let Err(err) = self.event.write(1) {
            // Only an overflowing counter fails, and that one is readable anyway.
            tracing::debug!("TCP alarm eventfd: {err}");
        }
    }

    /// The eventfd was readable: reset it. Deadlines must be re-armed by the caller.
    pub(crate) fn acknowledge(&mut self) {
        let _ = self.event.read();
        self.armed = None;
    }

    /// The armed deadline passed without an event having been seen yet (the caller
    /// checked its timers anyway): forget it so the next `arm` reaches the thread.
    pub(crate) fn expired(&mut self, now: Instant) {
        if self.armed.is_some_and(|armed| armed <= now) {
            self.armed = None;
        }
    }
}

fn run(event: &EventFd, shared: &(Mutex<Shared>, Condvar)) {
    let (lock, condvar) = shared;
    let Ok(mut state) = lock.lock() else {
        return;
    };
    loop {
        if state.stop {
            return;
        }
        match state.deadline {
            None => match condvar.wait(state) {
                Ok(guard) => state = guard,
                Err(_) => return,
            },
            Some(deadline) => {
                let now = Instant::now();
                if deadline <= now {
                    state.deadline = None;
                    let _ = event.write(1);
                    continue;
                }
                match condvar.wait_timeout(state, deadline - now) {
                    Ok((guard, _)) => state = guard,
                    Err(_) => return,
                }
            }
        }
    }
}

impl Drop for AlarmClock {
    fn drop(&mut self) {
        let (lock, condvar) = &*self.shared;
        if let Ok(mut shared) = lock.lock() {
            shared.stop = true;
            condvar.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn fires_at_the_earliest_deadline() {
        let mut clock = AlarmClock::new().expect("eventfd");
        let start = Instant::now();
        clock.arm(start + Duration::from_secs(10));
        clock.arm(start + Duration::from_millis(30));
        let mut fds = [nix::poll::PollFd::new(
            clock.fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(2000u16)).expect("poll");
        assert_eq!(ready, 1);
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(30) && elapsed < Duration::from_secs(2));
        clock.acknowledge();
    }
}
