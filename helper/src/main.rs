//! `baton-repair` entry point: parse the command line, set up logging, run, and turn the
//! outcome into the exit status (0 peer gone, 1 fatal, 2 usage).

use std::io::IsTerminal;
use std::process::ExitCode;

use baton_repair::{run, Cli, EXIT_PEER_GONE};
use clap::Parser;
use tracing::Level;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version print to stdout and exit 0; errors exit 2.
        Err(e) => e.exit(),
    };
    let level = if cli.debug {
        Level::DEBUG
    } else if cli.quiet {
        Level::WARN
    } else {
        Level::INFO
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .with_max_level(level)
        .init();

    match run(&cli) {
        Ok(()) => ExitCode::from(EXIT_PEER_GONE),
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_status())
        }
    }
}
