//! The real `baton` binary for integration tests and benches: started in the calling
//! thread's network namespace with explicit addresses (so nothing depends on the host's
//! own configuration and nothing leaves the machine), reached through the test frontend,
//! and stopped with SIGTERM — a clean exit status is asserted.
#![allow(dead_code)] // every test binary uses a different part of this module

pub mod guest;
pub mod hosts;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use baton_vu_harness::{FrontendOptions, NetFrontend};

/// Guest 10.77.0.2/24 via 10.77.0.1 and 2001:db8:77::2/64 via fe80::1, with DNS servers.
pub const DUAL_STACK: &[&str] = &[
    "-a",
    "10.77.0.2/24",
    "-g",
    "10.77.0.1",
    "-D",
    "10.77.0.53",
    "-a",
    "2001:db8:77::2/64",
    "-g",
    "fe80::1",
    "-D",
    "2001:db8:77::53",
];

/// IPv4 only: 10.77.0.2/24 via 10.77.0.1.
pub const V4_ONLY: &[&str] = &["-a", "10.77.0.2/24", "-g", "10.77.0.1", "-D", "10.77.0.53"];

/// A running `baton -f` with its socket and log in a scratch directory.
pub struct Baton {
    child: Child,
    dir: PathBuf,
}

impl Baton {
    /// Enter a private network namespace for this thread (ping sockets allowed there),
    /// then start baton dual-stack with debug logs and the `extra` options.
    pub fn start(name: &str, extra: &[&str]) -> Self {
        baton_testkit::netns::enter_private_netns()
            .expect("private network namespace (run as root)");
        std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
            .expect("ping_group_range");
        let args: Vec<&str> = DUAL_STACK
            .iter()
            .copied()
            .chain(["-d"])
            .chain(extra.iter().copied())
            .collect();
        Self::spawn(name, &args)
    }

    /// Start baton in the calling thread's namespace with exactly `args` (besides
    /// `-f --stderr --socket`); wait until its socket exists.
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        Self::spawn_limited(name, args, None)
    }

    /// As [`Baton::start`], with baton's `RLIMIT_NOFILE` (soft and hard: baton raises
    /// its soft limit to the hard one) set to `nofile` in the child only.
    pub fn start_with_nofile(name: &str, extra: &[&str], nofile: u64) -> Self {
        baton_testkit::netns::enter_private_netns()
            .expect("private network namespace (run as root)");
        let args: Vec<&str> = DUAL_STACK
            .iter()
            .copied()
            .chain(["-d"])
            .chain(extra.iter().copied())
            .collect();
        Self::spawn_limited(name, &args, Some(nofile))
    }

    fn spawn_limited(name: &str, args: &[&str], nofile: Option<u64>) -> Self {
        use std::os::unix::process::CommandExt;
        let dir = std::env::temp_dir().join(format!("baton-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut command = Command::new(env!("CARGO_BIN_EXE_baton"));
        command
            .args(["-f", "--stderr", "--socket"])
            .arg(dir.join("vu.sock"))
            .args(args)
            .stderr(std::fs::File::create(dir.join("baton.log")).expect("log"));
        if let Some(limit) = nofile {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: between fork and exec only setrlimit runs (async-signal-safe),
            // on a struct copied into the closure.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command.spawn().expect("start baton");
        let b = Baton { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !b.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "baton did not create its socket: {}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        b
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("vu.sock")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("baton.log")).unwrap_or_default()
    }

    /// Wait (up to 10 s) until the log contains every one of `texts`, for what another
    /// thread of baton logs in its own time; panics with the log if it never does.
    #[allow(dead_code)]
    pub fn wait_for_log(&self, texts: &[&str]) -> String {
        self.wait_for_log_where(&format!("{texts:?}"), |log| {
            texts.iter().all(|t| log.contains(t))
        })
    }

    /// [`Baton::wait_for_log`] for any condition on the log, described by `what`.
    #[allow(dead_code)]
    pub fn wait_for_log_where(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if done(&log) {
                return log;
            }
            assert!(Instant::now() < deadline, "waited for {what} in:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A test frontend connected and set up like QEMU does.
    pub fn connect(&self) -> NetFrontend {
        NetFrontend::connect(&self.socket(), FrontendOptions::default())
            .unwrap_or_else(|e| panic!("frontend: {e}; log:\n{}", self.log()))
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        // SAFETY: signalling the child we started, by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait for baton");
        if !std::thread::panicking() {
            assert!(
                status.success(),
                "baton exit status {status:?}; log:\n{}",
                self.log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The processes below `pid` (children, grandchildren …) whose name is `comm`.
pub fn descendants_named(pid: u32, comm: &str) -> Vec<i32> {
    let mut found = Vec::new();
    let mut queue = vec![pid as i32];
    while let Some(parent) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                let name =
                    std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                let stat =
                    std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                let zombie = stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z'));
                if name.trim_end() == comm && !zombie {
                    found.push(child);
                }
                queue.push(child);
            }
        }
    }
    found
}
