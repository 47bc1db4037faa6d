//! The command line.

use std::path::PathBuf;

use clap::Parser;

/// baton-repair: dump and restore TCP connections for the baton backend.
///
/// Holds CAP_NET_ADMIN and nothing else. Install it with
/// `setcap cap_net_admin+ep baton-repair` (or setuid root), or run it as root.
/// Exit status: 0 when the backend closes the connection, 1 on a fatal error,
/// 2 on a usage error.
#[derive(Debug, Clone, Parser)]
#[command(name = "baton-repair", version)]
pub struct Cli {
    /// The backend's repair socket, or a directory in which to wait for a `*.repair`
    /// socket to appear.
    #[arg(
        value_name = "PATH",
        required_unless_present = "fd",
        conflicts_with = "fd"
    )]
    pub path: Option<PathBuf>,

    /// Serve an inherited, connected UNIX stream socket instead of connecting.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..))]
    pub fd: Option<i32>,

    /// Also accept a backend running as UID (repeatable). The helper's own real uid is
    /// always accepted.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,

    /// Give up waiting in a directory after SECS seconds (default: wait forever).
    #[arg(long, value_name = "SECS", conflicts_with = "fd")]
    pub timeout: Option<u64>,

    /// Log every request.
    #[arg(short, long, conflicts_with = "quiet")]
    pub debug: bool,

    /// Log warnings and errors only.
    #[arg(short, long)]
    pub quiet: bool,

    /// Accept sockets from any network namespace (default: only the namespace of the
    /// connection to the backend).
    #[arg(long)]
    pub any_netns: bool,

    /// Do all the work on one thread. By default the sockets of larger batches are split
    /// over two threads, which shortens a migration when a second core is free but costs
    /// about 10% more CPU per socket (every descriptor lookup of a multi-threaded process
    /// takes a reference); on a host whose cores are all busy one thread does as well.
    #[arg(long)]
    pub single_thread: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn path_and_fd_are_exclusive_and_one_is_required() {
        assert!(Cli::try_parse_from(["baton-repair"]).is_err());
        assert!(Cli::try_parse_from(["baton-repair", "/x", "--fd", "3"]).is_err());
        assert!(Cli::try_parse_from(["baton-repair", "--fd", "-1"]).is_err());
        let cli = Cli::try_parse_from([
            "baton-repair",
            "--allow-uid",
            "7",
            "--allow-uid",
            "8",
            "-d",
            "/run/x.repair",
        ])
        .expect("valid");
        assert_eq!(cli.allow_uids, vec![7, 8]);
        assert!(cli.debug);
    }
}
