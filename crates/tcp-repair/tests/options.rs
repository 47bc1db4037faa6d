//! Every carried option and negotiated parameter survives a dump and restore.

mod scenario;

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use scenario::{enter_private_netns, get_sockopt_int, listener, pair, sockopt_int, Family};

fn congestion(s: &impl AsRawFd) -> String {
    let mut buf = [0u8; 16];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt into a local buffer.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    String::from_utf8_lossy(buf.split(|&b| b == 0).next().unwrap()).into_owned()
}

fn tcp_info_head(s: &impl AsRawFd) -> [u8; 8] {
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt into a local buffer.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0);
    info
}

#[test]
fn options_and_negotiated_parameters_carry_over() {
    enter_private_netns();
    let l = listener(Family::V4);
    let (a, _p) = pair(Family::V4, &l, None);
    let (tcp, sol, ip) = (libc::IPPROTO_TCP, libc::SOL_SOCKET, libc::IPPROTO_IP);
    // IP_TOS also sets SO_PRIORITY (rt_tos2priority): TOS first, then an explicit
    // priority, which the restore must not let the TOS clobber.
    let settings = [
        (ip, libc::IP_TOS, 0x10),
        (tcp, libc::TCP_NODELAY, 1),
        (sol, libc::SO_KEEPALIVE, 1),
        (tcp, libc::TCP_KEEPIDLE, 33),
        (tcp, libc::TCP_KEEPINTVL, 7),
        (tcp, libc::TCP_KEEPCNT, 4),
        (tcp, libc::TCP_USER_TIMEOUT, 12345),
        (tcp, libc::TCP_NOTSENT_LOWAT, 16384),
        (sol, libc::SO_MARK, 0x42),
        (sol, libc::SO_PRIORITY, 5),
        (sol, libc::SO_REUSEADDR, 1),
        (sol, 42 /* SO_PEEK_OFF */, 0),
        (ip, libc::IP_TTL, 33),
    ];
    for &(level, name, v) in &settings {
        sockopt_int(a.as_fd(), level, name, v);
    }
    // SAFETY: setsockopt with a NUL-free name of its own length.
    let rc = unsafe {
        libc::setsockopt(
            a.as_raw_fd(),
            tcp,
            libc::TCP_CONGESTION,
            b"reno".as_ptr().cast(),
            4,
        )
    };
    assert_eq!(rc, 0);
    let ts_before = get_sockopt_int(a.as_fd(), tcp, 24 /* TCP_TIMESTAMP */);
    let info_before = tcp_info_head(&a);

    let state = baton_tcp_repair::dump(a.as_fd()).expect("dump");
    assert!(state.options.sack && state.options.timestamps && state.options.wscale.is_some());
    assert_eq!(
        state.options.mss_clamp, 65495,
        "loopback MSS clamp (MTU 65536 - 40)"
    );
    drop(a);
    // SAFETY: plain socket(2), owned at once.
    let b = TcpStream::from(unsafe {
        OwnedFd::from_raw_fd(libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))
    });
    baton_tcp_repair::restore(b.as_fd(), &state).expect("restore");

    for &(level, name, v) in &settings {
        assert_eq!(
            get_sockopt_int(b.as_fd(), level, name),
            v,
            "option ({level}, {name}) after restore"
        );
    }
    assert_eq!(congestion(&b), "reno");
    let info_after = tcp_info_head(&b);
    assert_eq!(info_after[0], 1, "ESTABLISHED");
    assert_eq!(
        info_after[5] & 7,
        info_before[5] & 7,
        "SACK, timestamps, window scaling"
    );
    assert_eq!(info_after[6], info_before[6], "both window scales");
    let ts_after = get_sockopt_int(b.as_fd(), tcp, 24);
    assert!(
        (ts_after.wrapping_sub(ts_before) as u32) < 5_000,
        "the timestamp clock continues from the dumped value ({ts_before} -> {ts_after})"
    );
    assert_eq!(
        get_sockopt_int(b.as_fd(), tcp, 19 /* TCP_REPAIR */),
        0,
        "out of repair mode"
    );
}
