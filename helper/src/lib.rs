//! `baton-repair`: the privileged helper that dumps and restores TCP connections for the
//! unprivileged baton backend.
//!
//! Theory of operation, in the order [`run`] does it:
//!
//! 1. Check that `CAP_NET_ADMIN` is permitted at all (else say how to install).
//! 2. Get the one connection to the backend ([`connect`]): connect to its `*.repair`
//!    socket, wait in a directory for one to appear, or adopt an inherited `--fd`.
//! 3. Check the peer ([`peer`]): its `SO_PEERCRED` uid must be ours or allowed.
//! 4. Enter the sandbox ([`sandbox`]): own uid, `CAP_NET_ADMIN` only, no_new_privs, not
//!    dumpable, Landlock with no filesystem access; start the [`worker`] thread (unless
//!    `--single-thread`); then the seccomp allow-list, on every thread.
//! 5. Serve requests ([`server`]) until the backend closes the connection.
//!
//! Nothing is read from the peer before step 4 is complete.
//!
//! What it is not: the repair operations themselves live in `baton-tcp-repair`, the
//! framing in `baton-repair-ipc`, the message types in `baton-proto`.

pub mod cli;
pub mod connect;
pub mod peer;
pub mod sandbox;
pub mod server;
pub mod worker;

use std::os::fd::AsFd;
use std::time::Duration;

pub use cli::Cli;

/// Exit status when the peer went away cleanly.
pub const EXIT_PEER_GONE: u8 = 0;
/// Exit status for a fatal error.
pub const EXIT_FATAL: u8 = 1;
/// Exit status for a usage error (the same as clap's).
pub const EXIT_USAGE: u8 = 2;

/// Why the helper stopped before its peer went away.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    /// The command line asks for something that cannot be used (exit status 2).
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
    #[error(transparent)]
    Peer(#[from] peer::PeerError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Worker(#[from] worker::WorkerError),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
}

impl HelperError {
    /// The process exit status for this error.
    pub fn exit_status(&self) -> u8 {
        match self {
            HelperError::Usage(_) => EXIT_USAGE,
            HelperError::Connect(e) if e.is_usage() => EXIT_USAGE,
            _ => EXIT_FATAL,
        }
    }
}

/// Everything after argument parsing and logging set-up. `Ok` means that the peer closed
/// the connection cleanly.
pub fn run(cli: &Cli) -> Result<(), HelperError> {
    // While the process has one thread (see `worker` for why).
    let allocator_ready = worker::tune_allocator();
    sandbox::require_net_admin()?;

    let stream = match (&cli.path, cli.fd) {
        (_, Some(fd)) => connect::adopt_fd(fd)?,
        (Some(path), None) => connect::connect_path(path, cli.timeout.map(Duration::from_secs))?,
        (None, None) => {
            return Err(HelperError::Usage(
                "either PATH or --fd N is required".into(),
            ))
        }
    };

    let creds = peer::check_peer(stream.as_fd(), &cli.allow_uids)?;
    tracing::info!(uid = creds.uid, pid = creds.pid, "connected to the backend");

    sandbox::restrict()?;
    let worker = match (cli.single_thread, allocator_ready) {
        (true, _) => worker::Worker::none(),
        (false, true) => worker::Worker::spawn()?,
        (false, false) => {
            // A second thread would allocate in an arena that grows with mprotect, which
            // the filter forbids: work on one thread instead.
            tracing::warn!("the allocator refused a setting; serving on one thread");
            worker::Worker::none()
        }
    };
    sandbox::lock_syscalls()?;

    let options = server::ServeOptions {
        check_netns: !cli.any_netns,
    };
    server::serve(stream.as_fd(), &options, &worker)?;
    tracing::info!("backend closed the connection");
    Ok(())
}
