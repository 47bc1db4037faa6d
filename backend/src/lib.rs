//! `baton`: an unprivileged vhost-user-net backend for QEMU.
//!
//! It terminates the guest's Ethernet traffic and maps every guest flow onto ordinary
//! host sockets (the passt model: no tap device, no bridge, no privilege), and it
//! implements vhost-user device-state migration.
//!
//! Modules:
//! * [`config`]: the resolved network configuration (addresses, gateway, DNS, MTU, MACs),
//!   with defaults taken from the host like passt does.
//! * [`cli`]: the command line, a drop-in for passt in vhost-user mode.
//! * [`ports`]: passt's port-forwarding spec syntax (`-t`/`-u`).
//! * [`hostinfo`]: the host's routes, addresses and resolver, for passt-like defaults.
//! * [`flow`]: the bounded flow table shared by the protocol modules.
//! * [`tcp`]: TCP connections mapped onto host sockets (no payload buffering).
//! * [`udp`]: UDP flows, `-u` forwards and DNS forwarding over host sockets.
//! * [`net`]: everything done with guest frames: one module per protocol.
//! * [`vu`]: the vhost-user device (virtqueues, features, dirty logging, lifecycle).
//! * [`migrate`]: device-state migration (`SET_DEVICE_STATE_FD`/`CHECK_DEVICE_STATE`).
//! * [`repair_link`]: the `baton-repair` helper: started, or attached at `--repair-path`.
//! * [`launcher`]: the process, forked before the sandbox, that starts `baton-repair`.
//! * [`restore`]: TCP connections to another host: dumped and restored through the helper.

pub mod cli;
pub mod config;
pub mod flow;
pub mod handover;
pub mod hostinfo;
pub mod launcher;
pub mod migrate;
pub mod net;
pub mod ports;
pub mod predump;
pub mod repair_link;
pub mod restore;
pub mod runtime;
pub mod sandbox;
pub mod tcp;
pub mod udp;
pub mod vu;
