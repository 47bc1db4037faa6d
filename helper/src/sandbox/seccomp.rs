//! The seccomp allow-list of the serve loop.
//!
//! Theory of operation: after [`super::enter`] the helper only receives frames, runs
//! repair operations on the sockets that came with them, sends replies, logs to stderr
//! and eventually exits. The list below is exactly what that needs, each entry with the
//! code that needs it; anything else (opening files, creating sockets, exec, ptrace, ...)
//! kills the whole process (`SECCOMP_RET_KILL_PROCESS`). The filter also checks the
//! architecture. Keep this list next to the code that makes the calls: a new system call
//! in the serve loop or in `baton-tcp-repair` must be added here, or the kernel tests of
//! the helper die with SIGSYS.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// One allowed system call, who needs it, and (optionally) the only values its second
/// argument may take.
#[derive(Debug, Clone, Copy)]
pub struct AllowedSyscall {
    pub number: i64,
    pub name: &'static str,
    pub needed_by: &'static str,
    /// When set, the call is allowed only with one of these values as argument 1 (the
    /// low 32 bits, which is all the kernel looks at for ioctl and fcntl commands).
    pub arg1_one_of: Option<&'static [u64]>,
}

macro_rules! allow {
    ($name:ident, $why:expr) => {
        AllowedSyscall {
            number: libc::$name,
            name: stringify!($name),
            needed_by: $why,
            arg1_one_of: None,
        }
    };
    ($name:ident, only $values:expr, $why:expr) => {
        AllowedSyscall {
            number: libc::$name,
            name: stringify!($name),
            needed_by: $why,
            arg1_one_of: Some($values),
        }
    };
}

/// `SIOCINQ` (= `FIONREAD`): bytes in the receive queue.
pub const SIOCINQ: u64 = 0x541B;
/// `SIOCOUTQ` (= `TIOCOUTQ`): bytes in the send queue.
pub const SIOCOUTQ: u64 = 0x5411;
/// `SIOCOUTQNSD`: bytes in the send queue not yet sent.
pub const SIOCOUTQNSD: u64 = 0x894B;
/// `SIOCATMARK`: whether urgent data is pending.
pub const SIOCATMARK: u64 = 0x8905;

/// The ioctls `baton-tcp-repair` makes, and nothing else (no terminal or device ioctl on
/// whatever descriptor a compromised backend might hand over).
const QUEUE_IOCTLS: &[u64] = &[SIOCINQ, SIOCOUTQ, SIOCOUTQNSD, SIOCATMARK];
/// Descriptor and status flags only (no locks, leases, owners or signals).
const FLAG_FCNTLS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
];

/// The allow-list.
pub const ALLOWED_SYSCALLS: &[AllowedSyscall] = &[
    // --- frames (baton-repair-ipc transport, server loop) ---
    allow!(SYS_recvmsg, "transport: receive a request frame with its SCM_RIGHTS descriptors"),
    allow!(SYS_sendmsg, "transport: send a reply frame"),
    #[cfg(target_arch = "x86_64")]
    allow!(SYS_poll, "transport: wait until the connection is readable/writable"),
    allow!(SYS_ppoll, "transport: poll() where the libc implements it with ppoll"),
    allow!(SYS_close, "server: close the received descriptors before replying"),
    // --- repair operations (baton-tcp-repair) ---
    allow!(SYS_getsockopt, "tcp-repair: SO_TYPE/SO_PROTOCOL/SO_NETNS_COOKIE checks, TCP_INFO, TCP_REPAIR_* and option reads"),
    allow!(SYS_setsockopt, "tcp-repair: TCP_REPAIR*, TCP_QUEUE_SEQ, TCP_TIMESTAMP, TCP_MD5SIG (freeze key), SO_ATTACH/DETACH_FILTER, option writes"),
    allow!(SYS_ioctl, only QUEUE_IOCTLS, "tcp-repair: SIOCINQ/SIOCOUTQ/SIOCOUTQNSD/SIOCATMARK in dump"),
    allow!(SYS_recvfrom, "tcp-repair: recv(MSG_PEEK) of the queues in repair mode"),
    allow!(SYS_sendto, "tcp-repair: send() of the queues in repair mode and of the unsent tail after restore"),
    allow!(SYS_write, "tracing: log lines on stderr"),
    allow!(SYS_bind, "tcp-repair: restore binds the fresh socket (repair mode)"),
    allow!(SYS_connect, "tcp-repair: restore connects the fresh socket (repair mode, no handshake)"),
    allow!(SYS_shutdown, "tcp-repair: restore of a state whose FIN was sent"),
    allow!(SYS_getsockname, "tcp-repair: local endpoint in dump; a fresh socket must be unbound"),
    allow!(SYS_getpeername, "tcp-repair: peer endpoint in dump; the freeze key's address; a fresh socket must be unconnected"),
    allow!(SYS_statx, "std: descriptor metadata"),
    allow!(SYS_fcntl, only FLAG_FCNTLS, "std: F_GETFD check when closing an OwnedFd (debug builds); O_NONBLOCK"),
    // --- process, memory, runtime (std, glibc, tracing) ---
    allow!(SYS_exit, "std/glibc: thread exit"),
    allow!(SYS_exit_group, "main: exit when the backend closes the connection"),
    allow!(SYS_restart_syscall, "kernel: resume a poll interrupted by SIGSTOP/SIGCONT (a stopped helper must survive SIGCONT)"),
    allow!(SYS_futex, "std: stderr and tracing locks; glibc exit path"),
    allow!(SYS_brk, "glibc malloc: heap growth"),
    allow!(SYS_mmap, "glibc malloc: large allocations (queues of up to 64 MiB)"),
    allow!(SYS_munmap, "glibc malloc: freeing large allocations; std: stack guard teardown at exit"),
    allow!(SYS_mremap, "glibc realloc of large allocations (growing frame bodies and queues)"),
    allow!(SYS_madvise, "glibc malloc: returning freed memory"),
    allow!(SYS_rt_sigreturn, "kernel: return from a signal handler"),
    allow!(SYS_rt_sigprocmask, "glibc/std: signal masks around exit"),
    allow!(SYS_sigaltstack, "std: main-thread stack-overflow handler teardown at exit"),
    allow!(SYS_clock_gettime, "tracing: timestamps; transport: deadlines (vDSO fallback)"),
    allow!(SYS_getrandom, "std: HashMap random keys; tcp-repair: the freeze key (once per process)"),
];

/// The filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unsupported architecture {0}")]
    Arch(&'static str),
    #[error("build the filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("install the filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// Compile [`ALLOWED_SYSCALLS`] for this architecture: allow the listed calls, kill the
/// process on anything else.
pub fn build_filter() -> Result<BpfProgram, SeccompError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::Arch(std::env::consts::ARCH))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for allowed in ALLOWED_SYSCALLS {
        let mut alternatives = Vec::new();
        for &value in allowed.arg1_one_of.unwrap_or(&[]) {
            let condition =
                SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)?;
            alternatives.push(SeccompRule::new(vec![condition])?);
        }
        // No alternatives: allowed with any arguments.
        rules.insert(allowed.number, alternatives);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    Ok(BpfProgram::try_from(filter)?)
}

/// Build the filter and install it on every thread of the process (also sets
/// `PR_SET_NO_NEW_PRIVS`).
pub fn apply() -> Result<(), SeccompError> {
    let program = build_filter()?;
    seccompiler::apply_filter_all_threads(&program)?;
    tracing::debug!(
        syscalls = ALLOWED_SYSCALLS.len(),
        "seccomp: allow-list installed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds_and_lists_each_syscall_once() {
        let program = build_filter().expect("build");
        assert!(!program.is_empty());
        let mut numbers: Vec<i64> = ALLOWED_SYSCALLS.iter().map(|s| s.number).collect();
        numbers.sort_unstable();
        let before = numbers.len();
        numbers.dedup();
        assert_eq!(before, numbers.len(), "duplicate entry in the allow-list");
    }

    #[test]
    fn ioctl_and_fcntl_are_limited_to_their_commands() {
        let limited: Vec<&str> = ALLOWED_SYSCALLS
            .iter()
            .filter(|s| s.arg1_one_of.is_some())
            .map(|s| s.name)
            .collect();
        assert_eq!(limited, ["SYS_ioctl", "SYS_fcntl"]);
    }

    #[test]
    fn nothing_that_opens_creates_or_executes_is_allowed() {
        let forbidden = [
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_mprotect,
            libc::SYS_setns,
            libc::SYS_unshare,
            libc::SYS_accept4,
            libc::SYS_read,
            libc::SYS_open,
        ];
        for number in forbidden {
            assert!(
                !ALLOWED_SYSCALLS.iter().any(|s| s.number == number),
                "syscall {number} must not be allowed"
            );
        }
    }
}
