//! The complete kernel state of one TCP connection, as `baton-repair` dumps and restores it.
//!
//! This is a wire type: it is a snapshot with no behaviour, and the helper library reads
//! and writes it directly (the snapshot *is* the wire content; live flow state in the
//! backend has types of its own). The field list follows the state table in the project's
//! `reference/tcp-repair.md`; comments say how each field relates to kernel variables.
//!
//! Sequence numbers, kernel names in brackets:
//!
//! ```text
//!  send side:  snd_una ........ snd_nxt ........ write_seq
//!              |<- sent, unacked ->|<-- unsent -->|(+1 if our FIN is queued)
//!              send_queue = all data bytes from snd_una, without the FIN
//!  recv side:  copied_seq ....... rcv_nxt
//!              |<-- recv_queue -->|(+1 if the peer's FIN was received)
//! ```
//!
//! [`TcpConnState::validate`] checks every bound a hostile peer could violate; it is
//! called on every decoded state before the helper acts on it.

use serde::{Deserialize, Serialize};

/// Most bytes one queue (send or receive) of one connection may hold on the wire.
/// Linux autotunes buffers up to `tcp_wmem[2]`/`tcp_rmem[2]` (4 MiB and 6–32 MiB by
/// default); 64 MiB leaves room for hosts with raised limits.
pub const MAX_QUEUE_BYTES: usize = 64 << 20;
/// Most queue bytes one request or reply frame may carry in total. Callers batch their
/// sockets so that a batch stays under it (the backend can read queue sizes with
/// `SIOCINQ`/`SIOCOUTQ` before dumping, without privilege).
pub const MAX_BATCH_QUEUE_BYTES: usize = 128 << 20;
/// Longest congestion-control algorithm name (`TCP_CA_NAME_MAX` is 16 with the NUL).
pub const MAX_CONGESTION_NAME: usize = 15;
/// Largest window scale shift TCP allows (RFC 7323).
pub const MAX_WSCALE: u8 = 14;

/// Address family of the socket (not of the addresses: a v4-mapped flow lives in an
/// `Inet6` socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SocketFamily {
    Inet,
    Inet6,
}

/// One end of the connection, exactly as `getsockname`/`getpeername` returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    V4 {
        addr: [u8; 4],
        port: u16,
    },
    /// An IPv6 address; a v4-mapped address (`::ffff:a.b.c.d`) stays in this form.
    /// `scope_id` is the interface index for link-local addresses: it is only meaningful
    /// on the host that dumped it, so a restorer on another host translates it first.
    V6 {
        addr: [u8; 16],
        port: u16,
        flowinfo: u32,
        scope_id: u32,
    },
}

impl Endpoint {
    /// The port, in host order.
    pub fn port(&self) -> u16 {
        match *self {
            Endpoint::V4 { port, .. } | Endpoint::V6 { port, .. } => port,
        }
    }

    /// As a standard socket address.
    pub fn to_socket_addr(&self) -> std::net::SocketAddr {
        match *self {
            Endpoint::V4 { addr, port } => (std::net::Ipv4Addr::from(addr), port).into(),
            Endpoint::V6 {
                addr,
                port,
                flowinfo,
                scope_id,
            } => std::net::SocketAddrV6::new(addr.into(), port, flowinfo, scope_id).into(),
        }
    }

    /// From a standard socket address.
    pub fn from_socket_addr(sa: std::net::SocketAddr) -> Self {
        match sa {
            std::net::SocketAddr::V4(v4) => Endpoint::V4 {
                addr: v4.ip().octets(),
                port: v4.port(),
            },
            std::net::SocketAddr::V6(v6) => Endpoint::V6 {
                addr: v6.ip().octets(),
                port: v6.port(),
                flowinfo: v6.flowinfo(),
                scope_id: v6.scope_id(),
            },
        }
    }
}

/// The TCP states baton migrates. Everything else (LISTEN, SYN_SENT, SYN_RECV, CLOSING,
/// TIME_WAIT, CLOSE) is refused by the dumper with a clear error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TcpState {
    Established,
    /// Our FIN is queued or sent, not yet acknowledged.
    FinWait1,
    /// Our FIN is acknowledged; the peer may still send.
    FinWait2,
    /// The peer's FIN was received; we may still send.
    CloseWait,
    /// Both FINs, ours not yet acknowledged.
    LastAck,
}

impl TcpState {
    /// Our FIN occupies the sequence number just before `write_seq`.
    pub fn fin_sent(self) -> bool {
        matches!(
            self,
            TcpState::FinWait1 | TcpState::FinWait2 | TcpState::LastAck
        )
    }
    /// The peer's FIN occupies the sequence number just before `rcv_nxt`.
    pub fn fin_received(self) -> bool {
        matches!(self, TcpState::CloseWait | TcpState::LastAck)
    }
}

/// Window scaling as negotiated on the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WindowScale {
    /// Shift applied to windows the peer advertises to us.
    pub snd: u8,
    /// Shift applied to windows we advertise to the peer.
    pub rcv: u8,
}

/// Options negotiated in the handshake (restored with `TCP_REPAIR_OPTIONS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NegotiatedOptions {
    /// `rx_opt.mss_clamp` (what `TCP_MAXSEG` reads while in repair mode).
    pub mss_clamp: u32,
    pub sack: bool,
    /// `None` when window scaling was not negotiated.
    pub wscale: Option<WindowScale>,
    pub timestamps: bool,
}

/// `struct tcp_repair_window` (20 bytes on Linux 4.8 … 6.18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RepairWindow {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// Socket-, IP- and TCP-level options carried across (those that mirror the owner's
/// intent or that the kernel would otherwise reset).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SocketOptions {
    /// `SO_SNDBUF` / `SO_RCVBUF` as read (the kernel's doubled values).
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// `SO_BUF_LOCK` bits: 1 = send buffer size set by the user, 2 = receive buffer.
    pub buf_lock: u8,
    pub reuseaddr: bool,
    pub reuseport: bool,
    /// `SO_PEEK_OFF` (−1 = disabled).
    pub peek_off: i32,
    pub nodelay: bool,
    pub keepalive: bool,
    pub keepidle: u32,
    pub keepintvl: u32,
    pub keepcnt: u32,
    pub user_timeout: u32,
    /// `TCP_CONGESTION` name.
    pub congestion: String,
    pub notsent_lowat: u32,
    pub mark: u32,
    pub priority: u32,
    /// `IP_TOS` / `IP_TTL` (IPv4 sockets and v4-mapped flows of dual-stack sockets).
    pub ip_tos: Option<u8>,
    pub ip_ttl: Option<u8>,
    /// `IPV6_TCLASS` / `IPV6_UNICAST_HOPS` (IPv6 sockets; −1 = route default).
    pub ipv6_tclass: Option<i32>,
    pub ipv6_hops: Option<i32>,
}

/// The complete state of one TCP connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TcpConnState {
    pub family: SocketFamily,
    /// `IPV6_V6ONLY` of an `Inet6` socket (always false for `Inet`).
    pub v6only: bool,
    pub local: Endpoint,
    pub peer: Endpoint,
    pub state: TcpState,
    /// `snd_una`: sequence number of the first byte of `send_queue` (or of our FIN when
    /// only the FIN is unacknowledged; `write_seq` when nothing is).
    pub snd_una: u32,
    /// `write_seq`: end of the send queue, our FIN included when `state.fin_sent()`.
    pub write_seq: u32,
    /// `rcv_nxt`: next sequence number expected from the peer, its FIN included when
    /// `state.fin_received()`.
    pub rcv_nxt: u32,
    /// Every data byte not yet acknowledged by the peer (sent-unacked, then unsent).
    #[serde(with = "serde_bytes")]
    pub send_queue: Vec<u8>,
    /// How many bytes at the tail of `send_queue` were never transmitted.
    pub send_unsent: u32,
    /// Data received in order and not yet read by the owner.
    #[serde(with = "serde_bytes")]
    pub recv_queue: Vec<u8>,
    pub options: NegotiatedOptions,
    /// `TCP_TIMESTAMP`: the current TSval; bit 0 set = microsecond clock (Linux 6.7+).
    pub timestamp: u32,
    /// `TCP_REPAIR_WINDOW`, when the kernel supports it.
    pub window: Option<RepairWindow>,
    pub sockopts: SocketOptions,
}

/// A state that must not be acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("{which} queue of {len} bytes exceeds the limit of {MAX_QUEUE_BYTES}")]
    QueueTooLarge { which: &'static str, len: usize },
    #[error("send_unsent {unsent} exceeds the send queue length {len}")]
    UnsentBeyondQueue { unsent: u32, len: usize },
    #[error("{which} endpoint is {got}, but the socket family is {family:?}")]
    EndpointFamily {
        which: &'static str,
        got: &'static str,
        family: SocketFamily,
    },
    #[error("an Inet socket cannot be v6only")]
    V6OnlyOnInet,
    #[error("window scale {0} exceeds {MAX_WSCALE}")]
    WindowScale(u8),
    #[error("congestion control name of {0} bytes exceeds {MAX_CONGESTION_NAME}")]
    CongestionName(usize),
    #[error("congestion control name contains a NUL byte")]
    CongestionNul,
    #[error("sequence numbers disagree with the queues: write_seq - snd_una = {span}, but {data} data bytes{fin} are queued")]
    SendSpan {
        span: u32,
        data: usize,
        fin: &'static str,
    },
    #[error("port 0 in the {0} endpoint")]
    PortZero(&'static str),
}

impl TcpConnState {
    /// Check every bound and internal consistency rule.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.send_queue.len() > MAX_QUEUE_BYTES {
            return Err(StateError::QueueTooLarge {
                which: "send",
                len: self.send_queue.len(),
            });
        }
        if self.recv_queue.len() > MAX_QUEUE_BYTES {
            return Err(StateError::QueueTooLarge {
                which: "receive",
                len: self.recv_queue.len(),
            });
        }
        if self.send_unsent as usize > self.send_queue.len() {
            return Err(StateError::UnsentBeyondQueue {
                unsent: self.send_unsent,
                len: self.send_queue.len(),
            });
        }
        for (which, ep) in [("local", &self.local), ("peer", &self.peer)] {
            let got = match ep {
                Endpoint::V4 { .. } => "IPv4",
                Endpoint::V6 { .. } => "IPv6",
            };
            let fits = matches!(
                (self.family, ep),
                (SocketFamily::Inet, Endpoint::V4 { .. })
                    | (SocketFamily::Inet6, Endpoint::V6 { .. })
            );
            if !fits {
                return Err(StateError::EndpointFamily {
                    which,
                    got,
                    family: self.family,
                });
            }
            if ep.port() == 0 {
                return Err(StateError::PortZero(which));
            }
        }
        if self.family == SocketFamily::Inet && self.v6only {
            return Err(StateError::V6OnlyOnInet);
        }
        if let Some(ws) = self.options.wscale {
            for shift in [ws.snd, ws.rcv] {
                if shift > MAX_WSCALE {
                    return Err(StateError::WindowScale(shift));
                }
            }
        }
        let cc = &self.sockopts.congestion;
        if cc.len() > MAX_CONGESTION_NAME {
            return Err(StateError::CongestionName(cc.len()));
        }
        if cc.as_bytes().contains(&0) {
            return Err(StateError::CongestionNul);
        }
        // write_seq - snd_una counts every unacked data byte plus our FIN if it is still
        // unacknowledged. With our FIN acknowledged (snd_una == write_seq) no data is left.
        let span = self.write_seq.wrapping_sub(self.snd_una);
        let data = self.send_queue.len();
        let consistent = if self.state.fin_sent() {
            (span == 0 && data == 0) || span as usize == data + 1
        } else {
            span as usize == data
        };
        if !consistent {
            return Err(StateError::SendSpan {
                span,
                data,
                fin: if self.state.fin_sent() {
                    " plus our FIN"
                } else {
                    ""
                },
            });
        }
        Ok(())
    }

    /// Sequence number of the first data byte of `send_queue` (where a restorer points
    /// `TCP_QUEUE_SEQ` for the send queue).
    pub fn send_queue_start(&self) -> u32 {
        let fin = u32::from(self.state.fin_sent());
        self.write_seq
            .wrapping_sub(fin)
            .wrapping_sub(self.send_queue.len() as u32)
    }

    /// Sequence number of the first byte of `recv_queue` (`copied_seq`).
    pub fn recv_queue_start(&self) -> u32 {
        let fin = u32::from(self.state.fin_received());
        self.rcv_nxt
            .wrapping_sub(fin)
            .wrapping_sub(self.recv_queue.len() as u32)
    }
}
