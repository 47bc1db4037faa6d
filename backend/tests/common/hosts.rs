//! Two simulated hosts for the cross-host migration tests: each a network namespace
//! with a real `baton` in it, both joined by a veth to a peer namespace (the calling
//! thread's, where the test's servers run). The source's address moves to the target
//! when the test says so, as it would between real hosts.
//!
//! ```text
//!   source ns S            peer ns P                        target ns T
//!   10.88.0.2 (moves) vS ── pS   10.88.0.1 (lo), server   pT ── vT 10.88.0.3 (own)
//!   baton A + helper        route 10.88.0.2 → pS, later pT      baton B (+ helper)
//! ```
//!
//! Commands run in a namespace through `nsenter --net=/proc/<pid>/fd/<fd>`, so the
//! namespaces need no names and vanish with the test process.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;

use super::guest::helper_binary;
use super::{Baton, V4_ONLY};

/// The peer's address (on its loopback device).
pub const PEER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The source host's address: the connections' local address, moved to T late.
pub const MOVING: &str = "10.88.0.2";
/// The target host's own address.
pub const TARGET_OWN: &str = "10.88.0.3";

/// A network namespace, held open by a descriptor.
pub struct Netns {
    handle: File,
}

impl Netns {
    /// The calling thread's namespace.
    pub fn current() -> Self {
        Netns {
            handle: File::open("/proc/thread-self/ns/net").expect("open own netns"),
        }
    }

    fn path(&self) -> String {
        format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.handle.as_raw_fd()
        )
    }

    /// Run `cmd` (a program and its arguments) in this namespace; panics on failure.
    pub fn run(&self, cmd: &[&str]) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.path()))
            .args(cmd)
            .output()
            .expect("run nsenter");
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip` with `args` (split at white space) in this namespace.
    pub fn ip(&self, args: &str) {
        let mut cmd = vec!["ip"];
        cmd.extend(args.split_whitespace());
        self.run(&cmd);
    }

    /// Reverse-path filtering off: the peer sees the moving address on either link.
    fn no_rp_filter(&self, devices: &[&str]) {
        let mut script = String::from(
            "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter; \
             echo 0 > /proc/sys/net/ipv4/conf/default/rp_filter;",
        );
        for dev in devices {
            script.push_str(&format!(
                " echo 0 > /proc/sys/net/ipv4/conf/{dev}/rp_filter;"
            ));
        }
        self.run(&["sh", "-c", &script]);
    }

    /// `Tcp: OutRsts` of this namespace.
    pub fn out_rsts(&self) -> u64 {
        let snmp = self.run(&["cat", "/proc/net/snmp"]);
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let names: Vec<&str> = tcp.next().expect("Tcp names").split_whitespace().collect();
        let values: Vec<&str> = tcp.next().expect("Tcp values").split_whitespace().collect();
        let at = names.iter().position(|n| *n == "OutRsts").expect("OutRsts");
        values[at].parse().expect("OutRsts value")
    }

    /// How often this namespace's TCP had to fall back on a timer to recover data
    /// nobody acknowledged: `(TcpExtTCPLossProbes, TcpExtTCPTimeouts)` — tail-loss probes
    /// and retransmission timeouts.
    pub fn timer_recoveries(&self) -> (u64, u64) {
        let out = self.run(&["nstat", "-asz", "TcpExtTCPLossProbes", "TcpExtTCPTimeouts"]);
        let counter = |name: &str| -> u64 {
            out.lines()
                .find_map(|line| {
                    let mut fields = line.split_whitespace();
                    (fields.next() == Some(name)).then(|| fields.next())?
                })
                .unwrap_or_else(|| panic!("{name} missing from nstat: {out}"))
                .parse()
                .expect("counter value")
        };
        (counter("TcpExtTCPLossProbes"), counter("TcpExtTCPTimeouts"))
    }
}

/// Where the target backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// In T, with a helper.
    OtherHost,
    /// In T, without a helper.
    OtherHostNoHelper,
    /// In S, next to the source, with a helper (a same-host migration).
    SameNamespace,
}

/// Two hosts and the peer (the calling thread's new namespace), wired as in the module
/// comment; A (the source, with a helper) runs in S, B where [`Target`] says.
pub struct Hosts {
    pub peer: Netns,
    pub source: Netns,
    pub target: Netns,
    /// The source backend, until the test lets it go.
    pub a: Option<Baton>,
    pub b: Baton,
}

impl Hosts {
    /// Move the calling thread into a new namespace (the peer), create the hosts and
    /// wire them. `label` names the backends' scratch directories (`{label}-a`, …).
    pub fn build(label: &str, target: Target) -> Self {
        Self::build_logging(label, target, Logs::Debug)
    }

    /// [`Hosts::build`] with the backends' log level chosen: benches want
    /// [`Logs::Info`], as their same-host backends have, since thousands of
    /// per-connection debug lines would weigh on what they measure.
    pub fn build_logging(label: &str, target: Target, logs: Logs) -> Self {
        baton_testkit::netns::enter_private_netns().expect("peer netns (run as root)");
        let peer = Netns::current();
        let (source, a) = host_with_baton(&format!("{label}-a"), true, logs);
        let (target_ns, b) =
            host_with_baton(&format!("{label}-b"), target == Target::OtherHost, logs);
        let b = if target == Target::SameNamespace {
            drop(b);
            baton_in(&source, &format!("{label}-b-same"), logs)
        } else {
            b
        };
        let target = target_ns;
        peer.ip("link add pS type veth peer name vS");
        peer.ip(&format!("link set vS netns {}", source.path()));
        peer.ip("link add pT type veth peer name vT");
        peer.ip(&format!("link set vT netns {}", target.path()));
        peer.ip(&format!("addr add {PEER}/32 dev lo"));
        peer.ip("link set pS up");
        peer.ip("link set pT up");
        peer.ip(&format!("route add {MOVING}/32 dev pS"));
        peer.ip(&format!("route add {TARGET_OWN}/32 dev pT"));
        peer.no_rp_filter(&["pS", "pT", "lo"]);
        source.ip(&format!("addr add {MOVING}/32 dev vS"));
        source.ip("link set vS up");
        source.ip(&format!("route add {PEER}/32 dev vS"));
        source.no_rp_filter(&["vS"]);
        target.ip(&format!("addr add {TARGET_OWN}/32 dev vT"));
        target.ip("link set vT up");
        target.ip(&format!("route add {PEER}/32 dev vT"));
        target.no_rp_filter(&["vT"]);
        Hosts {
            peer,
            source,
            target,
            a: Some(a),
            b,
        }
    }

    /// The address moves from S to T; the peer routes it to T from now on.
    pub fn move_address(&self) {
        self.source.ip(&format!("addr del {MOVING}/32 dev vS"));
        self.target.ip(&format!("addr add {MOVING}/32 dev vT"));
        self.peer.ip(&format!("route replace {MOVING}/32 dev pT"));
    }

    /// The source backend (panics once the test dropped it).
    pub fn a(&self) -> &Baton {
        self.a.as_ref().expect("source baton")
    }
}

/// The backends' log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logs {
    /// `-d`, as the tests want it.
    Debug,
    /// baton's default.
    Info,
}

/// baton's options: IPv4 only, debug logs if `logs` says so, and `--helper` if `helper`.
fn baton_args(helper: bool, logs: Logs) -> Vec<String> {
    let mut args: Vec<String> = V4_ONLY.iter().copied().map(str::to_owned).collect();
    if logs == Logs::Debug {
        args.push("-d".to_owned());
    }
    if helper {
        args.extend(["--helper".to_owned(), helper_binary()]);
    }
    args
}

/// Start baton in the calling thread's namespace.
fn spawn_baton(label: &str, helper: bool, logs: Logs) -> Baton {
    let args = baton_args(helper, logs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Baton::spawn(label, &args)
}

/// A fresh namespace with baton started in it (by a thread that entered it).
fn host_with_baton(label: &str, helper: bool, logs: Logs) -> (Netns, Baton) {
    let label = label.to_owned();
    std::thread::spawn(move || {
        baton_testkit::netns::enter_private_netns().expect("netns (run as root)");
        (Netns::current(), spawn_baton(&label, helper, logs))
    })
    .join()
    .expect("host thread")
}

/// Start baton with a helper in `ns` (from a thread that joins it).
fn baton_in(ns: &Netns, label: &str, logs: Logs) -> Baton {
    let handle = ns.handle.try_clone().expect("dup netns");
    let label = label.to_owned();
    std::thread::spawn(move || {
        nix::sched::setns(&handle, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        spawn_baton(&label, true, logs)
    })
    .join()
    .expect("baton thread")
}
