#!/usr/bin/env bash
# QEMU option values contain commas, not array separators:
# shellcheck disable=SC2054
# TCP bulk transfer between a real Linux guest on baton (QEMU 10, TCG, vhost-user) and
# the host, in both directions, checked by size and sha256 and timed on the host:
#   guest -> host  the guest sends BATON_TCP_MIB MiB of a deterministic block pattern to
#                  GATEWAY:PORT, which baton maps to the host's 127.0.0.1:PORT (socat);
#   host -> guest  the host connects to 127.0.0.1:5000, a `-t 5000:6000` forward to the
#                  guest's busybox `nc -l -p 6000`, and sends the same pattern.
# Each direction is compared three ways: the host's own copy of the pattern, what the
# guest reports on the console (busybox sha256sum) and what the receiver got.
# baton runs in a private network namespace (as in baton-smoke.sh).
#
# Usage: tcp-smoke.sh [BATON_BINARY] [GUEST_DIR]
# Env:   BATON_TCP_MIB        MiB per direction (default 64)
#        BATON_BOOT_TIMEOUT   seconds before QEMU is killed (default 300)
#        BATON_SMOKE_LOG      directory to copy the logs to
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

baton="${1:-$here/../target/debug/baton}"
guest_dir="${2:-$here/out/guest}"
mib="${BATON_TCP_MIB:-64}"
boot_timeout="${BATON_BOOT_TIMEOUT:-300}"
HOST_ADDR=10.77.0.2
GATEWAY=10.77.0.1
HOST_PORT=5000
GUEST_PORT=6000

[[ "$(id -u)" == 0 ]] || die "run as root (creates a network namespace)"
[[ -x "$baton" ]] || die "baton binary $baton not found; build it first (cargo build -p baton)"
[[ "$mib" =~ ^[1-9][0-9]*$ ]] || die "BATON_TCP_MIB must be a positive integer"
for tool in qemu-system-x86_64 socat timeout sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found; run install-deps.sh"
done
if [[ ! -r "$guest_dir/vmlinuz" || ! -r "$guest_dir/initrd.gz" ]]; then
    log "no guest in $guest_dir; building it"
    "$here/build-guest.sh" "$guest_dir"
fi
guest_init="$(zcat "$guest_dir/initrd.gz" | cpio -i --to-stdout init 2>/dev/null)"
[[ "$guest_init" == *do_tcp_recv* ]] || die "the guest in $guest_dir predates the tcp-send/tcp-recv checks; rebuild it with build-guest.sh"

work="$(mktemp -d "${TMPDIR:-/tmp}/baton-tcp.XXXXXX")"
ns="baton-tcp-$$"
qemu_pid=""
sink_pid=""
cleanup() {
    # Only what this script started: QEMU and socat by PID, baton by its pid file.
    for p in "$qemu_pid" "$sink_pid"; do
        if [[ -n "$p" ]] && kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null || true; fi
    done
    if [[ -s "$work/baton.pid" ]]; then kill "$(cat "$work/baton.pid")" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    if [[ -n "${BATON_SMOKE_LOG:-}" ]]; then
        mkdir -p "$BATON_SMOKE_LOG"
        cp "$work"/*.log "$work"/*.err "$BATON_SMOKE_LOG"/ 2>/dev/null || true
    fi
    rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fail_with_logs() {
    {
        echo "=== tcp-smoke FAILED: $* ==="
        echo "=== QEMU stderr ==="; cat "$work/qemu.err" 2>/dev/null
        echo "=== socat ==="; cat "$work/sink.err" "$work/source.err" 2>/dev/null
        echo "=== console ==="; tr -d '\r' <"$work/console.log" 2>/dev/null
        echo "=== baton log (tail) ==="; tail -n 60 "$work/baton.log" 2>/dev/null
    } >&2
    exit 1
}
# wait_marker SECONDS REGEX: wait for a console marker (or QEMU's exit).
wait_marker() {
    local deadline=$((SECONDS + $1))
    while ! tr -d '\r' 2>/dev/null <"$work/console.log" | grep -Eq -- "$2"; do
        ((SECONDS < deadline)) || return 1
        kill -0 "$qemu_pid" 2>/dev/null || return 1
        sleep 0.05
    done
}
marker() { tr -d '\r' <"$work/console.log" | sed -n "s/^.*BATON-GUEST: $1/\\1/p" | tail -n 1; }
secs_between() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", (s > 0) ? n / 1048576 / s : 0 }'; }

# --- the pattern, made exactly as the guest's gen_pattern does ----------------------
seq 1 200000 >"$work/seq"   # no pipe into head: SIGPIPE would trip pipefail
head -c 1048561 "$work/seq" >"$work/base"
for ((i = 0; i < mib; i++)); do
    printf 'block %08d\n' "$i"
    cat "$work/base"
done >"$work/pattern"
rm -f "$work/seq" "$work/base"
bytes="$(stat -c %s "$work/pattern")"
want="$(sha256sum <"$work/pattern")"; want="${want%% *}"

# --- the "host": a network namespace with one veth pair and a default route --------
baton_host_netns "$ns" "$HOST_ADDR" "$GATEWAY"

ip netns exec "$ns" "$baton" --socket "$work/vu.sock" --pid "$work/baton.pid" \
    --log-file "$work/baton.log" -t "$HOST_PORT:$GUEST_PORT"
[[ -S "$work/vu.sock" ]] || die "baton did not create its socket"

# --- guest -> host sink: timestamps around the accepted stream ---------------------
sink_port=$((20000 + $$ % 10000))
ip netns exec "$ns" timeout -k 5 "$boot_timeout" socat -u \
    "TCP-LISTEN:$sink_port,bind=127.0.0.1,reuseaddr" \
    SYSTEM:"date +%s.%N >'$work/sink.t0'; cat >'$work/received'; date +%s.%N >'$work/sink.t1'" \
    2>"$work/sink.err" &
sink_pid=$!
for _ in $(seq 1 100); do
    ip netns exec "$ns" ss -Hltn "sport = :$sink_port" | grep -q . && break
    sleep 0.05
done

# --- QEMU ---------------------------------------------------------------------------
tests="ping-gw,tcp-send:$GATEWAY:$sink_port:$mib,tcp-recv:$GUEST_PORT:$boot_timeout"
append="console=ttyS0 quiet panic=-1 baton.test=$tests baton.poweroff=1"
qemu=(
    qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 1 -m 512
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
    -nodefaults -no-user-config -display none -no-reboot
    -serial "file:$work/console.log"
    -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.gz" -append "$append"
    -chardev "socket,id=c0,path=$work/vu.sock" -netdev vhost-user,id=n0,chardev=c0
    -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56
)
t_start="$EPOCHREALTIME"
timeout -k 5 "$boot_timeout" "${qemu[@]}" </dev/null >"$work/qemu.out" 2>"$work/qemu.err" &
qemu_pid=$!

# (a) guest -> host
wait_marker "$boot_timeout" "BATON-GUEST: (tcp-send $GATEWAY:$sink_port (ok|fail)|done status=)" \
    || fail_with_logs "no tcp-send result from the guest"
wait_marker 10 "BATON-GUEST: tcp-send $GATEWAY:$sink_port ok" || fail_with_logs "guest -> host send failed"
for _ in $(seq 1 200); do [[ -s "$work/sink.t1" ]] && break; sleep 0.05; done
[[ -s "$work/sink.t1" ]] || fail_with_logs "the host sink did not finish"
up_secs="$(secs_between "$(cat "$work/sink.t0")" "$(cat "$work/sink.t1")")"
up_bytes="$(stat -c %s "$work/received")"
up_sum="$(sha256sum <"$work/received")"; up_sum="${up_sum%% *}"
up_guest="$(marker "tcp-send $GATEWAY:$sink_port bytes \\([0-9]* sha256 [0-9a-f]*\\) .*")"
rm -f "$work/received"

# (b) host -> guest through the forward
wait_marker 60 "BATON-GUEST: tcp-recv listening $GUEST_PORT " || fail_with_logs "the guest did not listen on $GUEST_PORT"
t0="$EPOCHREALTIME"
# Bidirectional on purpose: socat exits only once the guest's nc has seen our FIN
# and closed its side, so the time covers every byte reaching the guest.
ip netns exec "$ns" timeout -k 5 "$boot_timeout" socat -t 60 STDIO "TCP:127.0.0.1:$HOST_PORT" \
    <"$work/pattern" >/dev/null 2>"$work/source.err" || fail_with_logs "host -> guest socat failed"
t1="$EPOCHREALTIME"
down_secs="$(secs_between "$t0" "$t1")"
wait_marker 120 "BATON-GUEST: (tcp-recv $GUEST_PORT (bytes|fail)|done status=)" \
    || fail_with_logs "no tcp-recv result from the guest"
down_guest="$(marker "tcp-recv $GUEST_PORT bytes \\([0-9]* sha256 [0-9a-f]*\\) .*")"

qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=""
total="$(secs_between "$t_start" "$EPOCHREALTIME")"

failures=()
[[ "$qemu_rc" == 0 ]] || failures+=("QEMU exited with status $qemu_rc")
[[ "$up_guest" == "$bytes sha256 $want" ]] \
    || failures+=("guest -> host: guest reports '$up_guest', expected '$bytes sha256 $want'")
[[ "$up_bytes $up_sum" == "$bytes $want" ]] \
    || failures+=("guest -> host: host received $up_bytes bytes sha256 $up_sum, expected $bytes $want")
[[ "$down_guest" == "$bytes sha256 $want" ]] \
    || failures+=("host -> guest: guest reports '$down_guest', expected '$bytes sha256 $want'")
grep -q 'BATON-GUEST: done status=ok ' <(tr -d '\r' <"$work/console.log") \
    || failures+=("guest finished with status=ok")
((${#failures[@]} == 0)) || fail_with_logs "$(printf '\n  - %s' "${failures[@]}")"

tr -d '\r' <"$work/console.log" | sed -n 's/.*\(BATON-GUEST: .*\)/\1/p'
echo "tcp-smoke: guest->host $bytes B in ${up_secs}s = $(rate "$bytes" "$up_secs") MiB/s (host-side, accept to EOF)"
echo "tcp-smoke: host->guest $bytes B in ${down_secs}s = $(rate "$bytes" "$down_secs") MiB/s (host-side, connect to guest close)"
echo "tcp-smoke: PASS ($mib MiB each way, sha256 $want) in ${total}s"
