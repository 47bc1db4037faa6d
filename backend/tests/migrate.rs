//! Device-state migration end to end: two real `baton` processes in a private network
//! namespace, driven by the test frontend in QEMU's order. The source learns about the
//! guest from its frames; SAVE (after `GET_VRING_BASE` on both rings) produces a stream;
//! the target gets LOAD + CHECK before any ring set-up and must then act on what the
//! source had learned before the guest sends it anything. Bad streams fail CHECK and
//! change nothing.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use baton_proto::migration::{decode_stream, GuestRecord};
use baton_vu_harness::NetFrontend;
use etherparse::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, NetSlice, PacketBuilder};
use etherparse::{IpNumber, Ipv4Header, SlicedPacket};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

mod common;
use common::guest::connect_loading;
use common::{Baton, V4_ONLY};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
const GW_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// An address the guest uses although baton did not assign it (baton learns it).
const GUEST_OTHER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 99);
/// `VHOST_USER_F_LOG_ALL` (bit 26).
const LOG_ALL: u64 = 1 << 26;
/// `SET_DEVICE_STATE_FD` request number.
const SET_DEVICE_STATE_FD: u32 = 42;

fn private_netns() {
    baton_testkit::netns::enter_private_netns().expect("private network namespace (run as root)");
}

/// An ARP request from the guest. `sender` 0.0.0.0 makes it an RFC 5227 probe ("is
/// anyone using `target`?").
fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &GUEST_MAC,
        &sender.octets(),
        &[0; 6],
        &target.octets(),
    )
    .expect("arp");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(GUEST_MAC, [0xff; 6])
        .arp(arp)
        .write(&mut out)
        .expect("arp frame");
    out
}

/// An IPv4 packet of an experimental protocol (253) from `src`: baton notes the source
/// address and otherwise ignores it.
fn ipv4_from(src: Ipv4Addr) -> Vec<u8> {
    let payload = [0u8; 8];
    let mut ip = Ipv4Header::new(
        payload.len() as u16,
        64,
        IpNumber(253),
        src.octets(),
        GW_V4.octets(),
    )
    .expect("ipv4 header");
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = Vec::new();
    out.extend_from_slice(&OUR_MAC);
    out.extend_from_slice(&GUEST_MAC);
    out.extend_from_slice(&0x0800u16.to_be_bytes());
    ip.write(&mut out).expect("ipv4 bytes");
    out.extend_from_slice(&payload);
    out
}

/// Whether `frame` is an ARP reply from baton, to the guest's MAC, claiming `target`.
fn is_arp_reply(frame: &[u8], target: Ipv4Addr) -> bool {
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return false;
    };
    let to_guest = frame.get(..6) == Some(&GUEST_MAC[..]);
    to_guest
        && matches!(p.net, Some(NetSlice::Arp(ref a)) if a.operation() == ArpOperation::REPLY
            && a.sender_protocol_addr() == target.octets()
            && a.sender_hw_addr() == OUR_MAC
            && a.target_hw_addr() == GUEST_MAC)
}

/// Every frame arriving within `window`.
fn frames_within(dev: &mut NetFrontend, window: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + window;
    let mut frames = Vec::new();
    while Instant::now() < deadline {
        if let Some(frame) = dev.recv_frame(Duration::from_millis(20)).expect("receive") {
            frames.push(frame);
        }
    }
    frames
}

/// Ask for the gateway and for `GUEST_OTHER_V4` (a probe); report which got answered.
fn probe(dev: &mut NetFrontend) -> (bool, bool) {
    dev.send_frame(&arp_request(Ipv4Addr::UNSPECIFIED, GUEST_OTHER_V4))
        .expect("send probe");
    dev.send_frame(&arp_request(Ipv4Addr::UNSPECIFIED, GW_V4))
        .expect("send request");
    let frames = frames_within(dev, Duration::from_millis(500));
    let gateway = frames.iter().any(|f| is_arp_reply(f, GW_V4));
    let other = frames.iter().any(|f| is_arp_reply(f, GUEST_OTHER_V4));
    (gateway, other)
}

/// On `baton`: the guest resolves the gateway and uses `GUEST_OTHER_V4`; then the rings
/// stop as QEMU stops them and the device state is saved.
fn learn_and_save(baton: &Baton, migrating: bool) -> Vec<u8> {
    let mut dev = baton.connect();
    if migrating {
        dev.start_dirty_log().expect("LOG_ALL");
    }
    dev.send_frame(&arp_request(GUEST_OTHER_V4, GW_V4))
        .expect("send ARP");
    let frames = frames_within(&mut dev, Duration::from_millis(300));
    assert!(
        frames.iter().any(|f| is_arp_reply(f, GW_V4)),
        "no ARP reply from the source; log:\n{}",
        baton.log()
    );
    dev.send_frame(&ipv4_from(GUEST_OTHER_V4))
        .expect("send IPv4");
    dev.wait_tx_done(Duration::from_secs(5)).expect("tx done");
    dev.stop_rings().expect("GET_VRING_BASE");
    dev.save_state()
        .unwrap_or_else(|e| panic!("SAVE: {e}; log:\n{}", baton.log()))
}

fn learned() -> GuestRecord {
    GuestRecord {
        mac: Some(GUEST_MAC),
        ipv4: Some(GUEST_OTHER_V4.octets()),
        ipv6: None,
        ipv6_link_local: None,
    }
}

#[test]
fn the_target_acts_on_what_the_source_learned_before_the_guest_speaks() {
    private_netns();
    let a = spawn("learn-a");
    let b = spawn("learn-b");

    let stream = learn_and_save(&a, true);
    let state = decode_stream(&stream).expect("the source's stream is valid");
    assert!(
        !state.snapshot,
        "LOG_ALL was set: a migration, not a snapshot"
    );
    assert_eq!(state.guest, learned());
    assert_ne!(state.device.acked_features & LOG_ALL, 0);
    assert_eq!(state.device.our_mac, OUR_MAC);
    assert_eq!(state.device.mtu, 65520);
    assert!(state.source.netns.cookie.is_some(), "SO_NETNS_COOKIE");
    assert!(state.tcp_flows.is_empty() && state.udp_flows.is_empty());
    assert!(a.log().contains("device state SAVE: done"), "{}", a.log());

    // The target gets the state before its rings exist, as from QEMU.
    let (mut dev, loaded) = connect_loading(&b, &stream);
    loaded.unwrap_or_else(|e| panic!("LOAD: {e}; log:\n{}", b.log()));
    assert!(
        b.log()
            .contains("guest state restored: MAC 52:54:00:12:34:56, IPv4 Some(10.77.0.99)"),
        "{}",
        b.log()
    );

    // The guest's first frames on B: B already knows 10.77.0.99 is the guest's, so it
    // does not claim it for the router (a fresh backend would, see the test below), and
    // it knew the guest's MAC before any frame arrived.
    let (gateway, other) = probe(&mut dev);
    assert!(gateway, "B answers for the gateway; log:\n{}", b.log());
    assert!(!other, "B claimed the guest's own address 10.77.0.99");
    assert!(
        !b.log().contains("guest MAC address is"),
        "B learned the guest MAC again instead of migrating it:\n{}",
        b.log()
    );

    // What B would hand on now: the same guest, as a snapshot (no LOG_ALL on B).
    dev.stop_rings().expect("GET_VRING_BASE");
    let again = decode_stream(&dev.save_state().expect("SAVE from B")).expect("valid");
    assert_eq!(again.guest, learned());
    assert!(again.snapshot);
}

#[test]
fn a_damaged_or_truncated_stream_fails_check_and_leaves_the_target_unchanged() {
    private_netns();
    let a = spawn("bad-a");
    let b = spawn("bad-b");
    let stream = learn_and_save(&a, true);

    let mut flipped = stream.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    let mut trailing = stream.clone();
    trailing.push(0);
    let damaged: [(&str, Vec<u8>); 5] = [
        ("truncated by one byte", stream[..stream.len() - 1].to_vec()),
        ("cut after the header", stream[..16].to_vec()),
        ("one bit flipped", flipped),
        ("a trailing byte", trailing),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in &damaged {
        let (dev, loaded) = connect_loading(&b, bytes);
        assert!(loaded.is_err(), "B accepted a stream {what}");
        drop(dev);
    }
    let log = b.log();
    assert!(
        log.contains("device state LOAD failed: migration stream: checksum mismatch"),
        "{log}"
    );
    assert!(
        log.contains("device state LOAD failed: migration stream: truncated"),
        "{log}"
    );
    assert!(log.contains("trailing garbage"), "{log}");
    assert!(!log.contains("guest state restored"), "{log}");

    // B is as fresh as it started: it would hand on an empty guest record...
    let mut dev = b.connect();
    dev.stop_rings().expect("GET_VRING_BASE");
    let state = decode_stream(&dev.save_state().expect("SAVE from B")).expect("valid");
    assert_eq!(state.guest, GuestRecord::default());
    drop(dev);
    // ...and it claims 10.77.0.99 for the router, as a backend that never saw the guest
    // use it does.
    let mut dev = b.connect();
    let (gateway, other) = probe(&mut dev);
    assert!(gateway && other, "fresh B answers both; log:\n{}", b.log());
}

#[test]
fn save_without_log_all_is_a_snapshot() {
    private_netns();
    let a = spawn("snapshot");
    let stream = learn_and_save(&a, false);
    let state = decode_stream(&stream).expect("valid snapshot stream");
    assert!(state.snapshot, "no LOG_ALL: a snapshot");
    assert_eq!(state.device.acked_features & LOG_ALL, 0);
    assert_eq!(state.guest, learned());
    assert!(
        a.log().contains("device state SAVE started (Snapshot)"),
        "{}",
        a.log()
    );
}

#[test]
fn a_phase_other_than_stopped_is_refused() {
    private_netns();
    let a = spawn("phase");
    let mut dev = a.connect();
    let (mut reader, writer) = {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        (std::fs::File::from(r), std::fs::File::from(w))
    };
    // direction SAVE, phase 1 (no such phase).
    let body = [0u32.to_le_bytes(), 1u32.to_le_bytes()].concat();
    dev.raw_request_with_fd(SET_DEVICE_STATE_FD, &body, writer.as_fd())
        .expect("send");
    drop(writer);
    // The vhost crate refuses an unknown phase before it reaches the device and ends the
    // connection; nothing is written and baton carries on.
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut got).expect("read");
    assert!(got.is_empty(), "no state for an unknown phase");
    assert!(dev.fe.get_features().is_err(), "the connection was ended");
    drop(dev);
    let mut dev = a.connect();
    dev.stop_rings().expect("GET_VRING_BASE");
    dev.save_state().expect("a STOPPED SAVE still works");
}

#[test]
fn check_without_a_transfer_fails_and_the_connection_survives() {
    private_netns();
    let a = spawn("check");
    let mut dev = a.connect();
    assert!(dev.fe.check_device_state().is_err());
    assert!(
        a.log().contains("CHECK_DEVICE_STATE without a transfer"),
        "{}",
        a.log()
    );
    dev.stop_rings().expect("the connection still answers");
    dev.save_state().expect("SAVE");
}

/// Start baton (IPv4, debug logs) in the calling thread's namespace.
fn spawn(name: &str) -> Baton {
    let args: Vec<&str> = V4_ONLY.iter().copied().chain(["-d"]).collect();
    Baton::spawn(&format!("migrate-{name}"), &args)
}
