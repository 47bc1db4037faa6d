#!/usr/bin/env bash
# QEMU option values contain commas, not array separators:
# shellcheck disable=SC2054
# Live-migrate a running VM between two QEMU 10 processes (TCG), each with its own baton
# backend. Exercises dirty logging (LOG_ALL), the
# device-state transfer (SET_DEVICE_STATE_FD SAVE/LOAD and CHECK_DEVICE_STATE) and QEMU's
# return path. Workload and check:
#   default  the guest pings its gateway every 50 ms; the pings go on after the
#            switch-over on the destination;
#   --tcp    the guest streams numbered lines over one TCP connection to a host server;
#            the server receives every line exactly once, in order, over that one
#            connection: its live socket was frozen by baton-repair on the source and
#            handed over to the destination baton.
#   --hosts  two simulated hosts: source and destination (each QEMU with its baton) run in
#            their own network namespace, each joined by a veth to a peer namespace where
#            the server runs. The guest streams numbered lines to the server over one TCP
#            connection; the source dumps its socket through baton-repair, the destination
#            restores it. The source's address moves to the destination only after the
#            destination VM runs (late, as real networks do): until then the peer's
#            segments still reach the source, which must neither acknowledge nor reset
#            them. The server checks every line and reports the longest gap between two
#            receives (the peer-visible gap), and how long after the address moved the
#            next data arrived (the part of the gap that is up to baton once the
#            network delivers the peer's answers to the destination; without a re-probe
#            of the restored connection it waits for its retransmission timer).
#            BATON_MOVE_DELAY (seconds, default 0.5): how long after the migration
#            completed the address moves.
# Without --tcp/--hosts: same host, same network namespace.
#
# Usage: migrate-smoke.sh [--tcp|--hosts] [BATON_BINARY] [GUEST_DIR]   (with --tcp or
#        --hosts, baton-repair is taken from the same directory as BATON_BINARY)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

tcp=""
hosts=""
if [[ "${1:-}" == --tcp ]]; then tcp=1; shift; fi
if [[ "${1:-}" == --hosts ]]; then tcp=1; hosts=1; shift; fi
baton="${1:-$here/../target/debug/baton}"
guest_dir="${2:-$here/out/guest}"
HOST_ADDR=10.77.0.2
GATEWAY=10.77.0.1
# --hosts: the server's address, the source host's address (moves), the destination's own.
PEER_ADDR=10.88.0.1
MOVING_ADDR=10.88.0.2
TARGET_ADDR=10.88.0.3
TICKS=600
LINES=1500

[[ "$(id -u)" == 0 ]] || die "run as root (creates a network namespace)"
[[ -x "$baton" ]] || die "baton binary $baton not found"
helper_args=()
if [[ -n "$tcp" ]]; then
    helper="$(dirname "$baton")/baton-repair"
    [[ -x "$helper" ]] || die "baton-repair not found next to $baton (cargo build -p baton-repair)"
    helper_args=(--helper "$helper")
fi
for tool in qemu-system-x86_64 socat timeout; do
    command -v "$tool" >/dev/null || die "$tool not found; run install-deps.sh"
done
[[ -r "$guest_dir/vmlinuz" ]] || "$here/build-guest.sh" "$guest_dir"

work="$(mktemp -d "${TMPDIR:-/tmp}/baton-migrate.XXXXXX")"
ns="baton-mig-$$"
extra_ns=()
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for f in "$work"/baton-*.pid; do if [[ -s "$f" ]]; then kill "$(cat "$f")" 2>/dev/null || true; fi; done
    wait 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    for n in "${extra_ns[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    if [[ -n "${BATON_KEEP_LOGS:-}" ]]; then cp -r "$work" "$BATON_KEEP_LOGS"; fi
    rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Network namespace of each side (QEMU and its baton).
declare -A side_ns
if [[ -n "$hosts" ]]; then
    baton_two_hosts "$ns" "$PEER_ADDR" "$MOVING_ADDR" "$TARGET_ADDR"
    extra_ns=("$ns-src" "$ns-dst")
    side_ns[src]="$ns-src"
    side_ns[dst]="$ns-dst"
    # The hosts have no default route to derive the guest's addresses from: say them.
    guest_args=(-a "$HOST_ADDR/24" -g "$GATEWAY")
else
    baton_host_netns "$ns" "$HOST_ADDR" "$GATEWAY"
    side_ns[src]="$ns"
    side_ns[dst]="$ns"
    guest_args=()
fi

for side in src dst; do
    ip netns exec "${side_ns[$side]}" "$baton" --socket "$work/vu-$side.sock" --pid "$work/baton-$side.pid" \
        --log-file "$work/baton-$side.log" --debug "${helper_args[@]}" "${guest_args[@]}"
done

if [[ -n "$hosts" ]]; then
    # Peer server: one connection; every chunk it receives is timestamped, so that the
    # longest silence (the peer-visible gap across the migration) can be reported, and
    # the wall-clock time of every receive is logged (compared with the address move).
    port=$((20000 + RANDOM % 20000))
    ip netns exec "$ns" python3 -u -c '
import os, socket, sys, time
addr, port, out, gaps = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
times = open(gaps + ".times", "w")
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port)); srv.listen(1)
conn, _ = srv.accept()
def report(text):
    with open(gaps + ".new", "w") as g:
        g.write(text + "\n")
    os.replace(gaps + ".new", gaps)
last, longest = None, 0.0
with open(out, "wb") as f:
    while True:
        try:
            data = conn.recv(65536)
        except OSError as e:
            report("error: %s" % e); sys.exit(1)
        now = time.monotonic()
        times.write("%.6f %d\n" % (time.time(), len(data))); times.flush()
        if data and last is not None and now - last > longest:
            longest = now - last
            report("longest %.0f ms, before byte %d" % (longest * 1e3, f.tell()))
        last = now
        if not data:
            break
        f.write(data); f.flush()
' "$PEER_ADDR" "$port" "$work/received.txt" "$work/gap.txt" &
    pids+=("$!")
    run="(i=0; while [ \$i -lt $LINES ]; do echo line \$i; i=\$((i+1)); sleep 0.01; done | nc $PEER_ADDR $port) & sleep 90"
    checks=none
elif [[ -n "$tcp" ]]; then
    # Host server: one connection, everything it receives saved to a file.
    port=$((20000 + RANDOM % 20000))
    ip netns exec "$ns" socat -u "TCP-LISTEN:$port,bind=127.0.0.1,reuseaddr" "OPEN:$work/received.txt,creat,trunc" &
    pids+=("$!")
    # The guest writes numbered lines, 10 ms apart, over one connection to the gateway
    # address, which baton maps to the host's loopback.
    # nc exits once both directions are closed; the line after it proves the orderly
    # close of the migrated connection reached the guest.
    run="((i=0; while [ \$i -lt $LINES ]; do echo line \$i; i=\$((i+1)); sleep 0.01; done | nc $GATEWAY $port); echo BATON-GUEST: nc closed) & sleep 90"
    checks=none
else
    # The guest pings its gateway every 50 ms and prints one console line per ping.
    run="i=0; while [ \$i -lt $TICKS ]; do if ping -c1 -W1 -q $GATEWAY >/dev/null 2>&1; then echo BATON-GUEST: tick ok \$i; else echo BATON-GUEST: tick fail \$i; fi; i=\$((i+1)); sleep 0.05; done"
    checks=ping-gw
fi
qemu_for() { # qemu_for SIDE [extra args...]
    local side="$1"; shift
    ip netns exec "${side_ns[$side]}" qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 1 -m 256 \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -nodefaults -no-user-config -display none -no-reboot \
        -serial "file:$work/console-$side.log" \
        -qmp "unix:$work/qmp-$side.sock,server=on,wait=off" \
        -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.gz" \
        -append "console=ttyS0 quiet panic=-1 baton.test=$checks baton.run=\"$run\" baton.poweroff=1" \
        -chardev "socket,id=c0,path=$work/vu-$side.sock" -netdev vhost-user,id=n0,chardev=c0 \
        -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 "$@" \
        </dev/null >"$work/qemu-$side.out" 2>&1 &
    pids+=("$!")
}
qmp() { # qmp SIDE JSON... -> replies on stdout
    local side="$1"; shift
    { echo '{"execute":"qmp_capabilities"}'; printf '%s\n' "$@"; sleep 0.3; } |
        socat -t 1 - "UNIX-CONNECT:$work/qmp-$side.sock"
}
wait_for() { # wait_for SECONDS FILE REGEX
    local deadline=$((SECONDS + $1))
    while ! grep -Eq -- "$3" "$2" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}
ticks_ok() { grep -c 'BATON-GUEST: tick ok' "$1" 2>/dev/null || true; }
fail_with_logs() {
    {
        echo "=== migrate-smoke FAILED: $* ==="
        for f in "$work"/console-*.log "$work"/qemu-*.out "$work"/baton-*.log; do
            echo "=== $f"; tr -d '\r' <"$f" | tail -n 40
        done
    } >&2
    exit 1
}

qemu_for src
if [[ -n "$tcp" ]]; then
    wait_for 90 "$work/received.txt" '^line 200$' || fail_with_logs "the guest's stream did not start on the source"
else
    wait_for 60 "$work/console-src.log" 'BATON-GUEST: tick ok 20[^0-9]' || fail_with_logs "the guest did not start pinging on the source"
fi
qemu_for dst -incoming "unix:$work/migration.sock"
for _ in $(seq 1 100); do [[ -S "$work/qmp-dst.sock" ]] && break; sleep 0.1; done
caps='{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"return-path","state":true}]}}'
qmp dst "$caps" >/dev/null
qmp src "$caps" >/dev/null
[[ -z "$hosts" ]] || rsts_before="$(baton_out_rsts "$ns-src")"
t0="$EPOCHREALTIME"
qmp src "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:$work/migration.sock\"}}" >/dev/null
status=""
for _ in $(seq 1 600); do
    query="$(qmp src '{"execute":"query-migrate"}')"
    status="$(sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p' <<<"$query" | tail -n1)"
    [[ "$status" == completed || "$status" == failed || "$status" == cancelled ]] && break
    sleep 0.1
done
took="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')"
[[ "$status" == completed ]] || fail_with_logs "migration status '$status' after ${took}s"

if [[ -n "$hosts" ]]; then
    # The destination VM runs; only now does the address move (late, as real networks
    # do). Until here the server's segments went to the source, which must have stayed
    # silent.
    at_switch="$(wc -l <"$work/received.txt")"
    sleep "${BATON_MOVE_DELAY:-0.5}"
    rsts_frozen="$(baton_out_rsts "$ns-src")"
    baton_move_address "$ns" "$MOVING_ADDR"
    moved="$EPOCHREALTIME"
    for _ in $(seq 1 1200); do [[ "$(wc -l <"$work/received.txt")" -ge $LINES ]] && break; sleep 0.1; done
    if [[ "$(cat "$work/received.txt")" != "$(seq 0 $((LINES - 1)) | sed 's/^/line /')" ]]; then
        fail_with_logs "the server did not get lines 0..$((LINES - 1)) exactly once, in order ($(wc -l <"$work/received.txt") lines)"
    fi
    [[ "$rsts_frozen" == "$rsts_before" ]] || fail_with_logs "the source sent $((rsts_frozen - rsts_before)) RST(s) while its sockets were frozen"
    grep -q 'restored through baton-repair' "$work/baton-dst.log" || fail_with_logs "the destination did not restore the connection"
    grep -q '1 with kernel state' "$work/baton-src.log" || fail_with_logs "the source did not dump the connection"
    gap="$(cat "$work/gap.txt" 2>/dev/null || echo "none measured")"
    moved_after="$(awk -v a="$t0" -v b="$moved" 'BEGIN { printf "%.2f", b - a }')"
    # The first data the server received after the address moved, and the silence
    # before it (from the receive before).
    after_move="$(awk -v m="$moved" '$1 > m { printf "%.0f ms after the move (silent %.0f ms before it)", ($1 - m) * 1e3, ($1 - p) * 1e3; exit } { p = $1 }' "$work/gap.txt.times")"
    downtime="$(sed -n 's/.*"downtime": *\([0-9]*\).*/\1/p' <<<"$query" | tail -n1)"
    echo "migrate-smoke --hosts: PASS migration ${took}s, address moved ${moved_after}s after the start; one TCP connection carried $LINES lines ($at_switch before the switch-over) from one host to the other (dumped, restored), none lost, duplicated or reordered; QEMU downtime ${downtime:-?} ms; peer-visible gap: $gap; first data after the address move: ${after_move:-none}"
    exit 0
fi

if [[ -n "$tcp" ]]; then
    # The guest now runs on the destination; its connection must carry on there until
    # the host has every line, and then close in order at both ends.
    at_switch="$(wc -l <"$work/received.txt")"
    for _ in $(seq 1 1200); do [[ "$(wc -l <"$work/received.txt")" -ge $LINES ]] && break; sleep 0.1; done
    if [[ "$(cat "$work/received.txt")" != "$(seq 0 $((LINES - 1)) | sed 's/^/line /')" ]]; then
        fail_with_logs "the host did not get lines 0..$((LINES - 1)) exactly once, in order ($(wc -l <"$work/received.txt") lines)"
    fi
    grep -q 'taken over from the source' "$work/baton-dst.log" || fail_with_logs "the destination did not take the connection over"
    wait_for 30 "$work/console-dst.log" 'BATON-GUEST: nc closed' || fail_with_logs "the migrated connection did not close at the guest after the host closed it"
    echo "migrate-smoke --tcp: PASS migration ${took}s; one TCP connection carried $LINES lines ($at_switch before the switch-over) across it, none lost, duplicated or reordered, then closed in order"
    exit 0
fi
# The guest now runs on the destination: its pings must go on there.
before="$(ticks_ok "$work/console-dst.log")"
wait_for 60 "$work/console-dst.log" 'BATON-GUEST: done status=' || fail_with_logs "the guest did not finish on the destination"
after="$(ticks_ok "$work/console-dst.log")"
fails="$(grep -c 'BATON-GUEST: tick fail' "$work/console-dst.log" || true)"
((after >= 50)) || fail_with_logs "only $after pings answered on the destination"
grep -q 'BATON-GUEST: done status=ok' "$work/console-dst.log" || fail_with_logs "guest reported a failure"
echo "migrate-smoke: PASS migration ${took}s; on the destination $after pings answered ($before already at switch-over), $fails lost"
