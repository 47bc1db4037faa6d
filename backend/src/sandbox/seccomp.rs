//! The seccomp allow-list of the serving backend.
//!
//! Theory of operation: after [`super::enter`] baton accepts vhost-user connections,
//! maps guest memory it receives as descriptors, moves frames between the virtqueues and
//! host sockets, logs through descriptors it already holds, and eventually exits. The
//! list below is what that needs — found by running baton under `strace -f` while it
//! served a booting Linux guest (vmbench/baton-smoke.sh) and the vhost-user test frontend
//! (dirty log included) — plus the socket calls the network code is about to need (TCP
//! and UDP flows, port forwarding, splicing) and the repair socket listener of the
//! migration code. Each entry names who needs it. Anything else — opening files, exec,
//! ptrace, namespaces, new processes, raw or netlink sockets, executable memory — kills
//! the whole process (`SECCOMP_RET_KILL_PROCESS`), in debug and release builds alike, so
//! that tests see exactly what production does. To find the culprit, look for the
//! `type=1326 ... syscall=N` audit line in the kernel log, or run baton under
//! `strace -f`. (A panic with `RUST_BACKTRACE` set, or `abort()`, also ends in SIGSYS:
//! symbolising opens the executable, abort() signals itself with tgkill.)
//!
//! Arguments are checked where the call alone would allow too much: the `ioctl` and
//! `fcntl` commands, the `prctl` option, the `socket` family and type (IPv4, IPv6, UNIX;
//! stream or datagram), no `PROT_EXEC` for `mmap`/`mprotect`, `clone` only for threads
//! (no new process, no new namespace), and the two signals whose handlers the Rust
//! runtime resets on a crash. Arguments are compared as 32-bit values, which is all the
//! kernel reads of them.
//!
//! `clone3(2)` passes its flags in memory, where a filter cannot see them. A second filter
//! answers it with `ENOSYS`, so glibc falls back to `clone(2)`, whose flags are checked.
//! The kernel applies the most restrictive answer of all filters, so the allow-list lists
//! `clone3` (or it would be killed) and the second filter turns it into `ENOSYS`.
//!
//! Keep this list next to the code that makes the calls: a new system call in the serve
//! path must be added here, or baton dies with SIGSYS in `cargo test -p baton --test
//! sandbox` and in the VM smoke test.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Which arguments an allowed system call may have.
#[derive(Debug, Clone, Copy)]
pub enum Args {
    /// Any.
    Any,
    /// Argument `.0` is one of `.1`.
    OneOf(u8, &'static [u64]),
    /// The bits `mask` of argument `arg` equal `value`.
    Masked { arg: u8, mask: u64, value: u64 },
    /// socket(2): the family (argument 0) is one of `domains` and the type (argument 1,
    /// without `SOCK_NONBLOCK`/`SOCK_CLOEXEC`) one of `types`.
    Socket {
        domains: &'static [u64],
        types: &'static [u64],
    },
}

/// One allowed system call, who needs it, and its argument constraints.
#[derive(Debug, Clone, Copy)]
pub struct AllowedSyscall {
    pub number: i64,
    pub name: &'static str,
    pub needed_by: &'static str,
    pub args: Args,
}

macro_rules! allow {
    ($name:ident, $why:expr) => {
        AllowedSyscall {
            number: libc::$name,
            name: stringify!($name),
            needed_by: $why,
            args: Args::Any,
        }
    };
    ($name:ident, only $args:expr, $why:expr) => {
        AllowedSyscall {
            number: libc::$name,
            name: stringify!($name),
            needed_by: $why,
            args: $args,
        }
    };
}

/// `SIOCINQ` (= `FIONREAD`): bytes in a socket's receive queue.
pub const SIOCINQ: u64 = 0x541B;
/// `SIOCOUTQ` (= `TIOCOUTQ`): bytes in a socket's send queue.
pub const SIOCOUTQ: u64 = 0x5411;
/// `FIONBIO`: set or clear non-blocking mode.
pub const FIONBIO: u64 = 0x5421;

/// ioctl commands: socket queue sizes (TCP windows, as passt computes them) and std's
/// `set_nonblocking`. No terminal, device or interface ioctl.
const IOCTLS: &[u64] = &[SIOCINQ, SIOCOUTQ, FIONBIO];
/// fcntl commands: descriptor and status flags, duplication, pipe size. No locks,
/// leases, owners, signals or seals.
const FCNTLS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
    libc::F_SETPIPE_SZ as u64,
];
/// Thread names only.
const PRCTLS: &[u64] = &[libc::PR_SET_NAME as u64];
/// The signals whose handlers the Rust runtime resets to the default on a crash.
const SIGACTIONS: &[u64] = &[libc::SIGSEGV as u64, libc::SIGBUS as u64];
/// Socket families: guest flows (IPv4, IPv6) and the repair socket (UNIX). Not netlink,
/// packet or anything else.
const SOCKET_DOMAINS: &[u64] = &[
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
    libc::AF_UNIX as u64,
];
/// Socket types: stream and datagram (ping sockets are datagram sockets). Not raw.
const SOCKET_TYPES: &[u64] = &[libc::SOCK_STREAM as u64, libc::SOCK_DGRAM as u64];
/// The socket type without the `SOCK_NONBLOCK`/`SOCK_CLOEXEC` flags.
const SOCK_TYPE_MASK: u64 = 0xf;
/// No executable mappings: argument 2 (`prot`) of mmap/mprotect without `PROT_EXEC`.
const NOT_EXECUTABLE: Args = Args::Masked {
    arg: 2,
    mask: libc::PROT_EXEC as u64,
    value: 0,
};
/// clone(2) flags that decide what is created.
const CLONE_KIND_MASK: u64 = (libc::CLONE_THREAD
    | libc::CLONE_VM
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;
/// A thread of this process, in no new namespace.
const THREAD_ONLY: Args = Args::Masked {
    arg: 0,
    mask: CLONE_KIND_MASK,
    value: (libc::CLONE_THREAD | libc::CLONE_VM) as u64,
};

/// The allow-list.
pub const ALLOWED_SYSCALLS: &[AllowedSyscall] = &[
    // --- vhost-user connections (vu::serve, vhost, vhost-user-backend) ---
    allow!(SYS_accept4, "serve: accept a frontend on the listener; repair socket and forwarded ports later"),
    allow!(SYS_recvmsg, "vhost: receive requests with their SCM_RIGHTS descriptors (memory, log, eventfds)"),
    allow!(SYS_sendmsg, "vhost: send replies; guest flows (UDP) later"),
    allow!(SYS_shutdown, "vhost: end a connection; TCP half-close later"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_poll, "serve: wait for a connection or the stop event; repair-ipc transport"),
    #[cfg(not(target_arch = "x86_64"))]
    allow!(SYS_ppoll, "serve: poll() where the libc implements it with ppoll"),
    allow!(SYS_epoll_create1, "vhost-user-backend: epoll of each new connection's worker"),
    allow!(SYS_epoll_ctl, "worker: vring kicks; net: ping (later TCP/UDP) sockets"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_epoll_wait, "worker: wait for kicks and host sockets; net: drain ready sockets"),
    #[cfg(not(target_arch = "x86_64"))]
    allow!(SYS_epoll_pwait, "worker: epoll_wait() where the libc implements it with epoll_pwait"),
    allow!(SYS_eventfd2, "vhost-user-backend: exit and kill events of each new connection"),
    allow!(SYS_read, "worker: consume kick and event eventfds"),
    allow!(SYS_write, "tracing: log lines to the log file or stderr; worker: call eventfds"),
    allow!(SYS_ftruncate, "runtime: empty the log file when --log-size is reached (opened before Landlock)"),
    allow!(SYS_lseek, "runtime: rewind the emptied log file"),
    allow!(SYS_close, "everywhere: descriptors of ended connections, flows and memory regions"),
    allow!(SYS_mmap, only NOT_EXECUTABLE, "vhost: map guest memory regions and the dirty log (shared memfds); malloc; thread stacks"),
    allow!(SYS_munmap, "vhost: unmap guest memory at reconnect/removal; malloc; thread exit"),
    allow!(SYS_fcntl, only Args::OneOf(1, FCNTLS), "std: F_GETFD check when closing (debug), F_DUPFD_CLOEXEC (EventFd::try_clone); O_NONBLOCK on sockets; pipe size for splice"),
    allow!(SYS_ioctl, only Args::OneOf(1, IOCTLS), "TCP flows (later): SIOCINQ/SIOCOUTQ queue sizes; std set_nonblocking (FIONBIO)"),
    // --- guest flows (net): ping sockets now; TCP, UDP, port forwarding next ---
    allow!(SYS_socket, only Args::Socket { domains: SOCKET_DOMAINS, types: SOCKET_TYPES }, "net: ping sockets (SOCK_DGRAM, IPPROTO_ICMP/ICMPV6); TCP/UDP flows; repair socket (AF_UNIX)"),
    allow!(SYS_sendto, "net/icmp: echo requests; UDP flows"),
    allow!(SYS_recvfrom, "net/icmp: echo replies; UDP flows"),
    allow!(SYS_sendmmsg, "UDP flows (later): batched sends"),
    allow!(SYS_recvmmsg, "UDP flows (later): batched receives"),
    allow!(SYS_connect, "TCP/UDP flows (later): connect to the guest's destination; repair socket liveness probe"),
    allow!(SYS_bind, "port forwarding and flows with a fixed source (later); repair socket"),
    allow!(SYS_listen, "port forwarding (later); repair socket"),
    allow!(SYS_setsockopt, "TCP/UDP flows (later): socket options; handover: TCP_MD5SIG (freeze key), SO_ATTACH/DETACH_FILTER (fallback)"),
    allow!(SYS_getsockopt, "TCP/UDP flows (later): SO_ERROR, TCP_INFO; repair socket: SO_PEERCRED"),
    allow!(SYS_getsockname, "port forwarding, UDP flows (later): the local port actually bound"),
    allow!(SYS_getpeername, "handover: the peer address of the freeze key (baton_tcp_repair::make_deaf/make_hearing)"),
    allow!(SYS_splice, "TCP flows (later): zero-copy between sockets through a pipe"),
    allow!(SYS_pipe2, "TCP flows (later): the pipes splice() needs"),
    allow!(SYS_getegid, "net/icmp: our group, for the ping_group_range warning"),
    // --- the repair socket listener (migration code, baton_repair_ipc::RepairListener) ---
    allow!(SYS_fchmod, "repair socket: mode 0600 before bind"),
    allow!(SYS_statx, "runtime: log file size before each entry (--log-size); repair socket: stale socket file? (symlink_metadata)"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_unlink, "repair socket: stale file and the file at drop; vhost-user listener at exit (Landlock decides)"),
    #[cfg(not(target_arch = "x86_64"))]
    allow!(SYS_unlinkat, "unlink() where the libc implements it with unlinkat"),
    allow!(SYS_geteuid, "repair socket: accept only peers with our uid or root"),
    // --- threads: one or two per vhost-user connection (std, glibc) ---
    allow!(SYS_clone, only THREAD_ONLY, "glibc pthread_create after clone3 answered ENOSYS: threads only, no namespace"),
    allow!(SYS_clone3, "glibc pthread_create; answered ENOSYS by the second filter (see above)"),
    allow!(SYS_openat, "glibc malloc heap trimming; answered ENOSYS by the second filter (never opens)"),
    allow!(SYS_mprotect, only NOT_EXECUTABLE, "glibc: thread stacks and guard pages, malloc arenas"),
    allow!(SYS_madvise, "glibc: thread exit (MADV_DONTNEED on the stack); malloc trimming"),
    allow!(SYS_rseq, "glibc: new thread registration"),
    allow!(SYS_set_robust_list, "glibc: new thread registration"),
    allow!(SYS_sched_getaffinity, "std: thread start (pthread_getattr_np for the stack guard)"),
    allow!(SYS_gettid, "std: thread start (stack overflow handler)"),
    allow!(SYS_sigaltstack, "std: stack overflow handler stack at thread start and exit"),
    allow!(SYS_prctl, only Args::OneOf(0, PRCTLS), "std: thread names (PR_SET_NAME)"),
    allow!(SYS_rt_sigprocmask, "glibc: signal mask around thread creation and exit"),
    allow!(SYS_rt_sigtimedwait, "runtime: the signal thread waits for SIGTERM/SIGINT/SIGHUP"),
    allow!(SYS_rt_sigaction, only Args::OneOf(0, SIGACTIONS), "std: a crash resets the SIGSEGV/SIGBUS handler so the process dies of that signal"),
    allow!(SYS_rt_sigreturn, "kernel: return from a signal handler"),
    allow!(SYS_restart_syscall, "kernel: resume a poll, epoll_wait or futex wait interrupted by SIGSTOP/SIGCONT (a stopped baton must survive SIGCONT)"),
    allow!(SYS_futex, "std: mutexes, condition variables, thread join"),
    allow!(SYS_exit, "std/glibc: thread exit"),
    allow!(SYS_exit_group, "main: exit after SIGTERM or the last connection (--one-off)"),
    // --- memory, time, randomness (glibc, std) ---
    allow!(SYS_brk, "glibc malloc: heap growth"),
    allow!(SYS_mremap, "glibc realloc of large buffers"),
    allow!(SYS_clock_gettime, "tracing timestamps, Instant::now (vDSO fallback)"),
    allow!(SYS_getrandom, "std: HashMap keys; dhcproto: rand::random() seeds its thread RNG when building answers; handover: the token and the freeze key"),
];

/// Answered `ENOSYS` by the second filter (and listed in [`ALLOWED_SYSCALLS`] so that
/// the first lets them through to it).
///
/// `openat`: baton opens no file once it serves, but glibc's malloc opens
/// `/proc/sys/vm/overcommit_memory` the first time it could shrink a thread's heap (seen
/// at shutdown after many connections); an error there just keeps the heap. So `openat`
/// fails cleanly instead of killing the process — it can never succeed.
pub const ENOSYS_SYSCALLS: &[i64] = &[libc::SYS_clone3, libc::SYS_openat];

/// A filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unsupported architecture {0}")]
    Arch(&'static str),
    #[error("build the filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("install the filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// Both filters, compiled for this architecture.
#[derive(Debug, Clone)]
pub struct Filters {
    /// Default allow; [`ENOSYS_SYSCALLS`] get `ENOSYS`.
    pub enosys: BpfProgram,
    /// Default kill the process; [`ALLOWED_SYSCALLS`] allowed.
    pub allow_list: BpfProgram,
}

impl Filters {
    /// Install both on the calling thread only (tests: in a forked child).
    pub fn apply_to_this_thread(&self) -> Result<(), SeccompError> {
        // The allow-list last: it does not allow seccomp(2).
        seccompiler::apply_filter(&self.enosys)?;
        seccompiler::apply_filter(&self.allow_list)?;
        Ok(())
    }

    /// Install both on every thread of the process (TSYNC; also sets no_new_privs).
    pub fn apply_to_all_threads(&self) -> Result<(), SeccompError> {
        seccompiler::apply_filter_all_threads(&self.enosys)?;
        seccompiler::apply_filter_all_threads(&self.allow_list)?;
        Ok(())
    }
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    Ok(SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )?)
}

/// The rules of one entry: alternatives, each a conjunction; none means any arguments.
fn rules(args: Args) -> Result<Vec<SeccompRule>, SeccompError> {
    let mut alternatives = Vec::new();
    match args {
        Args::Any => {}
        Args::OneOf(arg, values) => {
            for &value in values {
                alternatives.push(SeccompRule::new(vec![condition(
                    arg,
                    SeccompCmpOp::Eq,
                    value,
                )?])?);
            }
        }
        Args::Masked { arg, mask, value } => {
            alternatives.push(SeccompRule::new(vec![condition(
                arg,
                SeccompCmpOp::MaskedEq(mask),
                value,
            )?])?);
        }
        Args::Socket { domains, types } => {
            for &domain in domains {
                for &kind in types {
                    alternatives.push(SeccompRule::new(vec![
                        condition(0, SeccompCmpOp::Eq, domain)?,
                        condition(1, SeccompCmpOp::MaskedEq(SOCK_TYPE_MASK), kind)?,
                    ])?);
                }
            }
        }
    }
    Ok(alternatives)
}

/// Compile both filters for this architecture.
pub fn build_filters() -> Result<Filters, SeccompError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;

    let mut allowed: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for syscall in ALLOWED_SYSCALLS {
        allowed.insert(syscall.number, rules(syscall.args)?);
    }
    let allow_list = SeccompFilter::new(
        allowed,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;

    let enosys_rules: BTreeMap<i64, Vec<SeccompRule>> =
        ENOSYS_SYSCALLS.iter().map(|&n| (n, Vec::new())).collect();
    let enosys = SeccompFilter::new(
        enosys_rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;

    Ok(Filters {
        enosys: BpfProgram::try_from(enosys)?,
        allow_list: BpfProgram::try_from(allow_list)?,
    })
}

/// Build both filters and install them on every thread. Returns the number of allowed
/// system calls.
pub fn apply() -> Result<usize, SeccompError> {
    build_filters()?.apply_to_all_threads()?;
    tracing::debug!(
        syscalls = ALLOWED_SYSCALLS.len(),
        "seccomp: allow-list installed"
    );
    Ok(ALLOWED_SYSCALLS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_and_list_each_syscall_once() {
        let filters = build_filters().expect("build");
        assert!(!filters.allow_list.is_empty());
        assert!(!filters.enosys.is_empty());
        let mut numbers: Vec<i64> = ALLOWED_SYSCALLS.iter().map(|s| s.number).collect();
        numbers.sort_unstable();
        let before = numbers.len();
        numbers.dedup();
        assert_eq!(before, numbers.len(), "duplicate entry in the allow-list");
        for number in ENOSYS_SYSCALLS {
            assert!(
                numbers.contains(number),
                "{number} must be allowed by the first filter to reach the second"
            );
        }
    }

    #[test]
    fn every_entry_says_who_needs_it() {
        for syscall in ALLOWED_SYSCALLS {
            assert!(syscall.needed_by.len() > 10, "{}", syscall.name);
        }
    }

    #[test]
    fn nothing_that_opens_executes_or_escapes_is_allowed() {
        // openat passes the allow-list only to be answered ENOSYS by the second filter.
        assert!(ENOSYS_SYSCALLS.contains(&libc::SYS_openat));
        let forbidden = [
            libc::SYS_open,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_mount,
            libc::SYS_kill,
            libc::SYS_tgkill,
            libc::SYS_socketpair,
            libc::SYS_memfd_create,
            libc::SYS_chmod,
            libc::SYS_fchmodat,
            libc::SYS_chown,
            libc::SYS_seccomp,
            libc::SYS_bpf,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_capset,
        ];
        for number in forbidden {
            assert!(
                !ALLOWED_SYSCALLS.iter().any(|s| s.number == number),
                "syscall {number} must not be allowed"
            );
        }
    }

    #[test]
    fn argument_checks_are_where_the_call_alone_allows_too_much() {
        let checked: Vec<&str> = ALLOWED_SYSCALLS
            .iter()
            .filter(|s| !matches!(s.args, Args::Any))
            .map(|s| s.name)
            .collect();
        assert_eq!(
            checked,
            [
                "SYS_mmap",
                "SYS_fcntl",
                "SYS_ioctl",
                "SYS_socket",
                "SYS_clone",
                "SYS_mprotect",
                "SYS_prctl",
                "SYS_rt_sigaction"
            ]
        );
    }
}
