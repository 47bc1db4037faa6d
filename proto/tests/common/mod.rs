//! A sample state shared by the golden-vector and validation tests.

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
