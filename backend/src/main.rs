//! `baton`: the unprivileged vhost-user-net backend. See `baton --help` and baton(1).

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use baton::config::{NetConfig, RuntimeConfig};
use baton::hostinfo::HostInfo;
use baton::launcher::{Launcher, Spawner};
use baton::net::GuestNet;
use baton::repair_link::RepairLink;
use baton::runtime;
use baton::vu::serve::{serve_with, ServeOptions, Stopper};
use baton::vu::NetworkEngine;
use baton_repair_ipc::RepairListener;
use tracing::{error, info};

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
    runtime::block_stop_signals()?;
    let host = HostInfo::detect()?;
    let config = Arc::new(NetConfig::resolve(cli, &host)?);
    log_config(&config);
    let (mut listener, path) = runtime::open_listener(&rt.endpoint)?;
    if let Some(path) = &path {
        info!("vhost-user socket: {}", path.display());
    }
    // The repair socket exists before the sandbox (which allows no new files) and before
    // the parent returns (daemon mode) or the pid file appears, so that a management
    // layer that starts `baton-repair PATH` once baton is up finds it.
    let repair_path = rt.repair_socket.path_for(path.as_deref());
    let repair_listener = match &repair_path {
        Some(repair_path) => {
            let listener =
                RepairListener::bind(repair_path).map_err(|e| format!("repair socket: {e}"))?;
            info!("repair socket: {}", repair_path.display());
            Some(listener)
        }
        None => None,
    };
    if !rt.foreground {
        runtime::daemonize()?;
    }
    if let Some(pid_file) = &rt.pid_file {
        runtime::write_pid_file(pid_file)?;
    }
    // `--helper`: the launcher is forked now, while this is the only thread (it starts
    // the helper whenever a migration needs one; the sandbox forbids baton to).
    let launcher = match &rt.migration.helper {
        Some(helper) => {
            let identity = baton::sandbox::caps::target_identity_quiet(rt.runas.as_ref())?;
            let launcher = Launcher::start(helper, identity)?;
            info!(
                "helper launcher started (pid {}): {} is started when a migration needs it",
                launcher.pid(),
                launcher.helper_path().display()
            );
            Some(launcher)
        }
        None => None,
    };
    let stopper = Stopper::new()?;
    runtime::handle_signals(stopper.clone())?;
    runtime::raise_nofile(config.max_flows);
    let mut net = GuestNet::new(config)?;
    net.set_drop_unmigratable_tcp(rt.migration.drop_unmigratable_tcp);
    let link = RepairLink::start(repair_listener, None)?;
    if let Some(launcher) = launcher {
        Spawner::start(launcher, &link)?;
    }
    net.set_repair_link(link.clone());
    let net = Arc::new(Mutex::new(net));
    let engine: Arc<Mutex<dyn NetworkEngine>> = net.clone();
    // Hostname, boot id and namespace identity for the migration stream's Source record:
    // reading them opens files, which the sandbox forbids.
    baton::migrate::remember_host_identity();
    baton::sandbox::enter(rt, path.as_deref())?;
    let options = ServeOptions {
        one_off: rt.one_off,
        linger: rt.migration.linger,
        exit_after_migration: rt.migration.exit_after_source_migration,
        repair: link,
    };
    let served = serve_with(&mut listener, engine, &options, &stopper);
    // Whatever ended serving: frozen sockets must not send FIN or RST when the process
    // exit closes them (their connections may live on at a migration target).
    let closed = net
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .close_frozen_silently();
    if closed > 0 {
        info!("{closed} frozen TCP connection(s) closed silently at exit");
    }
    if let Some(repair_path) = &repair_path {
        remove_socket_file(repair_path, "repair socket");
    }
    if let Some(path) = &path {
        remove_socket_file(path, "vhost-user socket");
    }
    served?;
    info!("exiting");
    Ok(())
}

/// Remove a socket file baton created, at exit.
fn remove_socket_file(path: &std::path::Path, what: &str) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Started as root, baton now runs as nobody and may not remove the file it
        // created; the next start replaces a stale socket file.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::debug!("{what} {} left behind: {e}", path.display())
        }
        Err(e) => tracing::warn!("removing the {what} {}: {e}", path.display()),
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
