//! Demo: a live, streaming TCP connection is frozen, dumped by a real, sandboxed
//! `baton-repair`, closed, and rebuilt in a brand-new socket — while the peer keeps
//! streaming. Every byte in both directions is checked.
//!
//! Run as root (it makes a private network namespace): `cargo run --release -p
//! baton-repair --example live_handover` after building the helper
//! (`cargo build --release -p baton-repair`). `scripts/demo` does both.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_repair_ipc::client::RepairClient;
use baton_testkit::pattern::Pattern;

const SEED_UP: u64 = 0x5eed_0001; // client (the VM's side) -> peer
const SEED_DOWN: u64 = 0x5eed_0002; // peer -> client
const CHUNK: usize = 64 << 10;

fn helper_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/live_handover -> target/<profile>/baton-repair
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("baton-repair")
}

/// Stream in both directions on `sock` until `until` or until the other side ends its
/// stream (returns true then), verifying what arrives; `last_rx` records when data last
/// arrived.
fn pump(
    sock: &TcpStream,
    up: &mut (Pattern, u64),
    down: &mut (Pattern, u64),
    until: Instant,
    last_rx: &AtomicU64,
    t0: Instant,
) -> bool {
    sock.set_nonblocking(true).expect("nonblocking");
    let mut out = vec![0u8; CHUNK];
    let mut inb = vec![0u8; CHUNK];
    while Instant::now() < until {
        let mut progressed = false;
        up.0.fill(up.1, &mut out);
        match (&*sock).write(&out) {
            Ok(n) => {
                up.1 += n as u64;
                progressed = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("write: {e}"),
        }
        match (&*sock).read(&mut inb) {
            Ok(0) => return true,
            Ok(n) => {
                down.0
                    .verify(down.1, &inb[..n])
                    .expect("every byte arrives once, in order");
                down.1 += n as u64;
                last_rx.store(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                progressed = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("read: {e}"),
        }
        if !progressed {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    false
}

/// Drain `sock` to end-of-stream, verifying.
fn drain(mut sock: &TcpStream, down: &mut (Pattern, u64)) {
    sock.set_nonblocking(false).expect("blocking");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut inb = vec![0u8; CHUNK];
    loop {
        let n = sock.read(&mut inb).expect("read to end");
        if n == 0 {
            return;
        }
        down.0
            .verify(down.1, &inb[..n])
            .expect("every byte arrives once, in order");
        down.1 += n as u64;
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn main() {
    baton_testkit::netns::enter_private_netns().expect("private network namespace (run as root)");
    let helper = helper_binary();
    let (mut repair, mut child) = RepairClient::spawn(&helper, Vec::<String>::new())
        .unwrap_or_else(|e| panic!("spawning {}: {e}", helper.display()));
    println!(
        "{} running sandboxed (pid {})",
        repair.helper_software(),
        child.id()
    );

    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("addr");
    let a = TcpStream::connect(addr).expect("connect");
    let (p, _) = listener.accept().expect("accept");
    println!(
        "connection {} <-> {} established; streaming both ways",
        a.local_addr().unwrap(),
        addr
    );

    let t0 = Instant::now();
    let peer_last_rx = Arc::new(AtomicU64::new(0));
    let peer_rx = peer_last_rx.clone();
    let stream_end = t0 + Duration::from_secs(4);
    let peer = std::thread::spawn(move || {
        let mut up = (Pattern::new(SEED_DOWN), 0u64);
        let mut down = (Pattern::new(SEED_UP), 0u64);
        // Stream until the client ends its side, then end ours.
        let ended = pump(
            &p,
            &mut up,
            &mut down,
            stream_end + Duration::from_secs(20),
            &peer_rx,
            t0,
        );
        assert!(ended, "the client never finished its stream");
        p.shutdown(Shutdown::Write).expect("peer FIN");
        (up.1, down.1)
    });

    let client_last_rx = AtomicU64::new(0);
    let mut up = (Pattern::new(SEED_UP), 0u64);
    let mut down = (Pattern::new(SEED_DOWN), 0u64);
    assert!(!pump(
        &a,
        &mut up,
        &mut down,
        t0 + Duration::from_millis(1500),
        &client_last_rx,
        t0
    ));
    println!(
        "t=1.5s  sent {:.1} MiB, received {:.1} MiB; now migrating the connection",
        mib(up.1),
        mib(down.1)
    );

    let start = Instant::now();
    let mut dumped = repair.dump(&[a.as_fd()]).expect("dump request");
    let state = dumped.remove(0).expect("dump");
    let dump_took = start.elapsed();
    println!(
        "  dumped (frozen: the kernel acknowledges nothing more): send queue {} B ({} B never sent), receive queue {} B, {:?}, took {:?}",
        state.send_queue.len(),
        state.send_unsent,
        state.recv_queue.len(),
        state.state,
        dump_took
    );
    drop(a); // closed while frozen: no FIN, no RST
             // SAFETY: socket(2) returns a new descriptor (checked), owned from here on.
    let b = TcpStream::from(unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        OwnedFd::from_raw_fd(fd)
    });
    let start = Instant::now();
    let mut restored = repair
        .restore(&[(b.as_fd(), &state)])
        .expect("restore request");
    let report = restored.remove(0).expect("restore");
    let restore_took = start.elapsed();
    (&b).write_all(&state.send_queue[report.send_queue_written as usize..])
        .expect("rest of send queue");
    println!(
        "  restored into a new socket {} -> {} in {:?} ({} B of the send queue back in it: \
         the sent part as sent, the unsent part going out at once)",
        b.local_addr().unwrap(),
        b.peer_addr().unwrap(),
        restore_took,
        report.send_queue_written
    );

    let (up_at, down_at) = (up.1, down.1);
    assert!(
        !pump(&b, &mut up, &mut down, stream_end, &client_last_rx, t0),
        "peer ended early"
    );
    println!(
        "t=4.0s  after the handover: sent {:.1} MiB more, received {:.1} MiB more",
        mib(up.1 - up_at),
        mib(down.1 - down_at)
    );
    b.shutdown(Shutdown::Write).expect("client FIN");
    drain(&b, &mut down);
    let (peer_sent, peer_received) = peer.join().expect("peer thread");
    drop(repair);
    let _ = child.wait();

    println!("stream finished:");
    println!(
        "  client -> peer: {:.1} MiB sent, {:.1} MiB verified by the peer",
        mib(up.1),
        mib(peer_received)
    );
    println!(
        "  peer -> client: {:.1} MiB sent, {:.1} MiB verified by the client",
        mib(peer_sent),
        mib(down.1)
    );
    assert_eq!(
        up.1, peer_received,
        "every byte the client sent arrived exactly once"
    );
    assert_eq!(
        peer_sent, down.1,
        "every byte the peer sent arrived exactly once"
    );
    println!("OK: the connection survived the handover; no byte lost, duplicated or reordered, no reset.");
}
