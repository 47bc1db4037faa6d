//! `baton`: the unprivileged vhost-user-net backend. See `baton --help` and baton(1).

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use baton::config::{NetConfig, RuntimeConfig};
use baton::hostinfo::HostInfo;
use baton::net::GuestNet;
use baton::runtime;
use baton::vu::serve::{serve, Stopper};
use baton::vu::NetworkEngine;
use tracing::{error, info, warn};

fn main() -> ExitCode {
    let cli = baton::cli::parse_args();
    let runtime_config = match RuntimeConfig::from_cli(&cli) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("baton: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = runtime::init_logging(&runtime_config.log) {
        eprintln!("baton: {e}");
        return ExitCode::from(1);
    }
    match run(&cli, &runtime_config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &baton::cli::Cli, rt: &RuntimeConfig) -> Result<(), Box<dyn std::error::Error>> {
    let host = HostInfo::detect()?;
    let config = Arc::new(NetConfig::resolve(cli, &host)?);
    log_config(&config);
    let (mut listener, path) = runtime::open_listener(&rt.endpoint)?;
    if let Some(path) = &path {
        info!("vhost-user socket: {}", path.display());
    }
    if !rt.foreground {
        runtime::daemonize()?;
    }
    if let Some(pid_file) = &rt.pid_file {
        runtime::write_pid_file(pid_file)?;
    }
    let stopper = Stopper::new()?;
    runtime::handle_signals(stopper.clone())?;
    warn_unimplemented_migration_options(rt);
    let mut net = GuestNet::new(config)?;
    net.set_drop_unmigratable_tcp(rt.migration.drop_unmigratable_tcp);
    if let Some(helper) = &rt.migration.helper {
        // Started now: once sandboxed, baton can no longer fork or exec. The helper
        // serves us until our end of its socketpair closes.
        let (client, child) = baton_repair_ipc::RepairClient::spawn(helper, Vec::<String>::new())
            .map_err(|e| format!("starting {}: {e}", helper.display()))?;
        info!("{} started (pid {})", client.helper_software(), child.id());
        net.set_repair_client(client);
    }
    let engine: Arc<Mutex<dyn NetworkEngine>> = Arc::new(Mutex::new(net));
    // Hostname, boot id and namespace identity for the migration stream's Source record:
    // reading them opens files, which the sandbox forbids.
    baton::migrate::remember_host_identity();
    baton::sandbox::enter(rt, path.as_deref())?;
    serve(&mut listener, engine, rt.one_off, &stopper)?;
    info!("exiting");
    Ok(())
}

/// Options accepted for compatibility whose behaviour is not built yet: say so at start
/// rather than ignore them silently.
fn warn_unimplemented_migration_options(rt: &RuntimeConfig) {
    let m = &rt.migration;
    if m.exit_after_source_migration {
        warn!("--migrate-exit: exiting after a completed migration is not implemented yet");
    }
}

fn log_config(config: &NetConfig) {
    if let Some(v4) = &config.v4 {
        info!(
            "IPv4: guest {}/{} via {}, DNS {:?}",
            v4.addr, v4.prefix_len, v4.gateway, v4.dns
        );
    }
    if let Some(v6) = &config.v6 {
        info!(
            "IPv6: guest {}/{} via {}, DNS {:?}",
            v6.addr, v6.prefix_len, v6.gateway, v6.dns
        );
    }
    info!("MTU {}", config.mtu);
}
