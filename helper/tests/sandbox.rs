//! The helper's sandbox, observed from outside: what /proc says about a serving helper,
//! and what the seccomp filter does to a forbidden system call.

mod common;

use baton_repair::sandbox::seccomp;
use common::*;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {field} in /proc status:\n{status}"))
}

#[test]
fn serving_helper_holds_net_admin_only_under_seccomp_and_no_new_privs() {
    let mut helper = spawn_on_socketpair(&["--debug"]);
    hello(&helper.stream);

    // Every thread, not only the main one: credentials and Landlock are per thread, and
    // the worker thread runs repair operations too.
    let tasks = format!("/proc/{}/task", helper.child.id());
    let mut threads = 0;
    for task in std::fs::read_dir(&tasks).expect("read /proc/<pid>/task") {
        let path = task.expect("task entry").path().join("status");
        let status = std::fs::read_to_string(&path).expect("read task status");
        const NET_ADMIN_ONLY: &str = "0000000000001000";
        let name = status_field(&status, "Name:");
        assert_eq!(
            status_field(&status, "Seccomp:"),
            "2",
            "{name}: seccomp mode"
        );
        assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{name}");
        assert_eq!(status_field(&status, "CapEff:"), NET_ADMIN_ONLY, "{name}");
        assert_eq!(status_field(&status, "CapPrm:"), NET_ADMIN_ONLY, "{name}");
        assert_eq!(status_field(&status, "CapBnd:"), NET_ADMIN_ONLY, "{name}");
        assert_eq!(
            status_field(&status, "CapInh:"),
            "0000000000000000",
            "{name}"
        );
        assert_eq!(
            status_field(&status, "CapAmb:"),
            "0000000000000000",
            "{name}"
        );
        threads += 1;
    }
    assert_eq!(threads, 2, "the serve loop and its worker thread");

    // The exit path works under the filter too: peer gone => exit 0.
    drop(helper.stream);
    let (exit, stderr) = wait_exit(&mut helper.child);
    assert_eq!(exit.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("landlock"),
        "the Landlock level is logged:\n{stderr}"
    );
}

#[test]
fn single_thread_helper_serves_on_one_thread() {
    let mut helper = spawn_on_socketpair(&["--single-thread"]);
    hello(&helper.stream);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", helper.child.id()))
        .expect("read /proc/<pid>/task")
        .count();
    assert_eq!(tasks, 1);
    drop(helper.stream);
    let (exit, stderr) = wait_exit(&mut helper.child);
    assert_eq!(exit.code(), Some(0), "{stderr}");
}

/// A helper stopped and continued (SIGSTOP/SIGCONT, a debugger or a job-control shell)
/// while it waits for a request resumes its wait through `restart_syscall`, which the
/// filter must allow: it used to die of SIGSYS.
#[test]
fn a_stopped_and_continued_helper_keeps_serving() {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    let mut helper = spawn_on_socketpair(&[]);
    hello(&helper.stream);
    let pid = Pid::from_raw(helper.child.id() as i32);
    // Let it block in its wait for the next request.
    std::thread::sleep(std::time::Duration::from_millis(100));
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    std::thread::sleep(std::time::Duration::from_millis(100));
    kill(pid, Signal::SIGCONT).expect("SIGCONT");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(
        helper.child.try_wait().expect("try_wait").is_none(),
        "the helper died after SIGCONT"
    );
    // Still serving: the peer going away ends it with 0 (not SIGSYS).
    drop(helper.stream);
    let (exit, stderr) = wait_exit(&mut helper.child);
    assert_eq!(exit.code(), Some(0), "{stderr}");
}

/// Apply the helper's filter in a forked child, run `forbidden` there, and return how
/// the child ended.
fn run_under_filter(call: fn()) -> WaitStatus {
    let program = seccomp::build_filter().expect("build filter");
    // SAFETY: the child only installs the prebuilt filter (prctl + seccomp, no
    // allocation), makes the raw system call under test and _exits.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(3) };
            }
            call();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
    }
}

#[test]
fn seccomp_kills_forbidden_syscall() {
    fn create_a_socket() {
        // SAFETY: socket(2) takes only integers.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
    fn open_a_file() {
        // SAFETY: the path is a valid NUL-terminated string.
        unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/etc/passwd".as_ptr(), 0) };
    }
    fn terminal_ioctl_on_stdin() {
        let mut on: libc::c_int = 1;
        // SAFETY: FIONBIO reads one int through the pointer, which points to a live local.
        unsafe { libc::ioctl(0, libc::FIONBIO, &mut on as *mut libc::c_int) };
    }
    fn file_lock() {
        // SAFETY: F_GETLK on a zeroed flock struct owned by this frame.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        unsafe { libc::fcntl(0, libc::F_GETLK, &mut lock as *mut libc::flock) };
    }
    for forbidden in [
        create_a_socket as fn(),
        open_a_file,
        terminal_ioctl_on_stdin,
        file_lock,
    ] {
        match run_under_filter(forbidden) {
            WaitStatus::Signaled(_, Signal::SIGSYS, _) => {}
            other => panic!("expected death by SIGSYS, got {other:?}"),
        }
    }
}

#[test]
fn seccomp_lets_allowed_syscalls_through() {
    fn write_nothing() {
        // SAFETY: writing 0 bytes from a valid pointer.
        unsafe { libc::write(2, c"".as_ptr().cast(), 0) };
    }
    fn queue_length_ioctl() {
        let mut bytes: libc::c_int = 0;
        // SAFETY: SIOCINQ (FIONREAD) writes one int through a pointer to a live local.
        // Whatever fd 2 is, the call may fail, but it must not be killed.
        unsafe { libc::ioctl(2, libc::FIONREAD, &mut bytes as *mut libc::c_int) };
    }
    for allowed in [write_nothing as fn(), queue_length_ioctl] {
        assert!(matches!(
            run_under_filter(allowed),
            WaitStatus::Exited(_, 0)
        ));
    }
}

#[test]
fn landlock_denies_every_filesystem_access() {
    // SAFETY: the child only applies the ruleset (glibc keeps malloc usable after fork),
    // makes raw system calls and _exits.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = match baton_repair::sandbox::landlock::deny_filesystem() {
                Err(_) => 3,
                Ok(_) => {
                    // SAFETY: valid NUL-terminated paths; results are only compared.
                    let read = unsafe { libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY) };
                    let read_errno = std::io::Error::last_os_error().raw_os_error();
                    // SAFETY: as above.
                    let dir = unsafe { libc::mkdir(c"/tmp/baton-landlock-probe".as_ptr(), 0o700) };
                    let dir_errno = std::io::Error::last_os_error().raw_os_error();
                    if read == -1
                        && read_errno == Some(libc::EACCES)
                        && dir == -1
                        && dir_errno == Some(libc::EACCES)
                    {
                        0
                    } else {
                        1
                    }
                }
            };
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(code) };
        }
        ForkResult::Parent { child } => {
            assert_eq!(
                waitpid(child, None).expect("waitpid"),
                WaitStatus::Exited(child, 0)
            );
        }
    }
}
