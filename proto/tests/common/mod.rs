//! Sample states shared by the golden-vector, validation and migration-stream tests and by
//! the `stream` benchmark (each user compiles this module on its own and uses a part).
#![allow(dead_code)]

use baton_proto::migration::{
    DeviceRecord, FlowId, FlowOrigin, ForwardRuleRecord, ForwardsRecord, GuestRecord, GuestTcpSide,
    HostSocketEnds, MigrationState, NetnsIdentity, SourceRecord, TcpFlowRecord, UdpFlowRecord,
};
use baton_proto::tcp::{
    Endpoint, NegotiatedOptions, RepairWindow, SocketFamily, SocketOptions, TcpConnState, TcpState,
    WindowScale,
};

/// A valid ESTABLISHED IPv4 state with every optional part present.
pub fn sample_state() -> TcpConnState {
    TcpConnState {
        family: SocketFamily::Inet,
        v6only: false,
        local: Endpoint::V4 {
            addr: [10, 0, 2, 15],
            port: 0x1234,
        },
        peer: Endpoint::V4 {
            addr: [192, 0, 2, 1],
            port: 80,
        },
        state: TcpState::Established,
        snd_una: 0x0102_0304,
        write_seq: 0x0102_0307,
        rcv_nxt: 0xAABB_CCDD,
        send_queue: b"abc".to_vec(),
        send_unsent: 1,
        recv_queue: b"xy".to_vec(),
        options: NegotiatedOptions {
            mss_clamp: 1460,
            sack: true,
            wscale: Some(WindowScale { snd: 7, rcv: 9 }),
            timestamps: true,
        },
        timestamp: 0x0000_1001,
        window: Some(RepairWindow {
            snd_wl1: 1,
            snd_wnd: 2,
            max_window: 3,
            rcv_wnd: 4,
            rcv_wup: 5,
        }),
        sockopts: SocketOptions {
            sndbuf: 16384,
            rcvbuf: 131072,
            buf_lock: 0,
            reuseaddr: true,
            reuseport: false,
            peek_off: -1,
            nodelay: true,
            keepalive: false,
            keepidle: 7200,
            keepintvl: 75,
            keepcnt: 9,
            user_timeout: 0,
            congestion: "cubic".into(),
            notsent_lowat: u32::MAX,
            mark: 0,
            priority: 0,
            ip_tos: Some(0),
            ip_ttl: Some(64),
            ipv6_tclass: None,
            ipv6_hops: None,
        },
    }
}

pub fn v4(addr: [u8; 4], port: u16) -> Endpoint {
    Endpoint::V4 { addr, port }
}

pub fn small_state() -> MigrationState {
    MigrationState {
        snapshot: false,
        device: DeviceRecord {
            acked_features: 0x0000_0001_6420_8000,
            our_mac: [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55],
            mtu: 65520,
        },
        source: SourceRecord {
            hostname: Some("h1".into()),
            boot_id: None,
            netns: NetnsIdentity {
                cookie: Some(1),
                dev: None,
                inode: None,
            },
            uid: 1000,
            handover: None,
        },
        guest: GuestRecord {
            mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            ipv4: Some([10, 0, 2, 15]),
            ipv6: None,
            ipv6_link_local: None,
        },
        forwards: Some(ForwardsRecord {
            tcp: vec![ForwardRuleRecord {
                bind_addr: None,
                bind_device: None,
                host_first: 8080,
                host_last: 8080,
                guest_first: 80,
                guest_last: 80,
                guest_addr: None,
            }],
            udp: vec![],
        }),
        tcp_flows: vec![],
        udp_flows: vec![UdpFlowRecord {
            id: FlowId(7),
            origin: FlowOrigin::Guest,
            guest: v4([10, 0, 2, 15], 0x1234),
            remote: v4([192, 0, 2, 1], 53),
            host_local: None,
            idle_left_ms: 30_000,
        }],
        skipped: vec![],
    }
}

pub fn guest_side() -> GuestTcpSide {
    GuestTcpSide {
        origin: FlowOrigin::Guest,
        guest: v4([10, 0, 2, 15], 0x1234),
        remote: v4([192, 0, 2, 1], 80),
        isn: 0xaabb_cc00,
        seq_to_guest: 0xaabb_ccdd,
        seq_max_to_guest: 0xaabb_ccdd,
        seq_acked_by_guest: 0xaabb_ccd0,
        seq_from_guest: 0x0102_0304,
        fin_to_guest: None,
        fin_from_guest: false,
        wnd_from_guest: 65535,
        wnd_to_guest: 131072,
        ws_from_guest: 7,
        ws_to_guest: 9,
        mss_to_guest: 1460,
        sack_permitted: false,
    }
}

pub fn host_ends() -> HostSocketEnds {
    HostSocketEnds {
        local: v4([192, 0, 2, 100], 40000),
        peer: v4([192, 0, 2, 1], 80),
    }
}

/// A valid stream's worth of state for a scale test or benchmark: [`small_state`] plus
/// `flows` established IPv4 TCP flows with kernel state, each with `queue_bytes` in its
/// send queue and as many in its receive queue (the latter also counted as sent to the
/// guest and not yet acknowledged, as on a guest that stopped reading). Queue contents
/// differ per flow so that a mix-up between flows shows.
pub fn bulk_state(flows: u32, queue_bytes: u32) -> MigrationState {
    let mut state = small_state();
    state.tcp_flows = (0..flows).map(|i| bulk_flow(i, queue_bytes)).collect();
    state
}

fn bulk_flow(i: u32, queue_bytes: u32) -> TcpFlowRecord {
    // Ids from 1000 keep clear of the UDP flow of `small_state` (id 7).
    let id = FlowId(1000 + i);
    let port = 1 + (i % 65535) as u16;
    let guest_seq = 0x1000_0000u32.wrapping_mul(i);
    let guest_side = GuestTcpSide {
        guest: v4([10, 0, 2, 15], port),
        seq_acked_by_guest: guest_seq,
        seq_to_guest: guest_seq.wrapping_add(queue_bytes),
        seq_max_to_guest: guest_seq.wrapping_add(queue_bytes),
        sack_permitted: i % 2 == 0,
        ..guest_side()
    };
    let host = HostSocketEnds {
        local: v4([192, 0, 2, 100], port),
        peer: v4([192, 0, 2, 1], 80),
    };
    let fill = |salt: u32| -> Vec<u8> {
        (0..queue_bytes)
            .map(|j| (j.wrapping_mul(31) ^ i.wrapping_add(salt)) as u8)
            .collect()
    };
    let mut kernel = sample_state();
    kernel.local = host.local;
    kernel.peer = host.peer;
    kernel.snd_una = 0x2000_0000u32.wrapping_mul(i);
    kernel.write_seq = kernel.snd_una.wrapping_add(queue_bytes);
    kernel.send_queue = fill(0x55);
    kernel.send_unsent = queue_bytes / 2;
    kernel.recv_queue = fill(0xaa);
    kernel.rcv_nxt = guest_seq.wrapping_add(queue_bytes);
    TcpFlowRecord {
        id,
        guest_side,
        host,
        kernel: Some(kernel),
    }
}
