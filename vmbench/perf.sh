#!/usr/bin/env bash
# QEMU option values contain commas, not array separators:
# shellcheck disable=SC2054
# TCP throughput benchmark: the same Linux guest (QEMU 10, TCG, one vCPU) on baton
# (vhost-user) and on passt (Debian's passt package: no vhost-user, so QEMU's
# `-netdev stream` over a UNIX socket), measured with iperf3 from Debian inside the guest
# against an iperf3 server on the host's loopback, reached through the gateway address
# (both backends map it to the host's 127.0.0.1):
#   up    guest -> host  (iperf3 -c GATEWAY)
#   down  host -> guest  (iperf3 -c GATEWAY -R)
# Figures are the receiver's Mbit/s as iperf3 reports them. Each backend runs in its own
# private network namespace (as in tcp-smoke.sh); nothing leaves the machine.
# A benchmark, not a test: CI does not run it.
#
# Usage: perf.sh [BATON_BINARY] [GUEST_DIR]
#   BATON_BINARY  default target/release/baton (cargo build --release -p baton)
#   GUEST_DIR     default out/guest-perf, built with BATON_GUEST_BINS=iperf3 if missing
# Env:   BATON_PERF_SECS      seconds per direction (default 10)
#        BATON_PERF_BACKENDS  which backends, in order (default "baton passt"); "base" is
#                             a second baton binary, BATON_PERF_BASE, for before/after
#                             comparisons within one run; "nocsum" is baton with QEMU's
#                             device set to csum=off,guest_csum=off (no checksum offload)
#        BATON_PERF_BASE      the "base" backend's binary
#        BATON_PERF_ROUNDS    runs per backend (default 1); every run is printed
#        BATON_BOOT_TIMEOUT   seconds before QEMU is killed (default 300)
#        BATON_SMOKE_LOG      directory to copy the logs to
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

baton="${1:-$here/../target/release/baton}"
guest_dir="${2:-$here/out/guest-perf}"
secs="${BATON_PERF_SECS:-10}"
backends="${BATON_PERF_BACKENDS:-baton passt}"
base_baton="${BATON_PERF_BASE:-}"
rounds="${BATON_PERF_ROUNDS:-1}"
boot_timeout="${BATON_BOOT_TIMEOUT:-300}"
HOST_ADDR=10.77.0.2
GATEWAY=10.77.0.1
IPERF_PORT=5201

[[ "$(id -u)" == 0 ]] || die "run as root (creates network namespaces)"
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || die "BATON_PERF_SECS must be a positive integer"
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "BATON_PERF_ROUNDS must be a positive integer"
for b in $backends; do
    case "$b" in
    baton) [[ -x "$baton" ]] || die "baton binary $baton not found; build it (cargo build --release -p baton)" ;;
    base) [[ -n "$base_baton" && -x "$base_baton" ]] || die "backend 'base' needs BATON_PERF_BASE, an executable baton binary" ;;
    nocsum) [[ -x "$baton" ]] || die "baton binary $baton not found; build it (cargo build --release -p baton)" ;;
    passt) command -v passt >/dev/null || die "passt not found; run install-deps.sh" ;;
    *) die "unknown backend '$b' in BATON_PERF_BACKENDS (baton, base, nocsum, passt)" ;;
    esac
done
for tool in qemu-system-x86_64 iperf3 timeout; do
    command -v "$tool" >/dev/null || die "$tool not found; run install-deps.sh"
done
if [[ ! -r "$guest_dir/initrd.gz" ]] || ! grep -q '^guest_program: iperf3' "$guest_dir/manifest.txt" 2>/dev/null; then
    log "no guest with iperf3 in $guest_dir; building it"
    BATON_GUEST_BINS=iperf3 "$here/build-guest.sh" "$guest_dir"
fi
guest_init="$(zcat "$guest_dir/initrd.gz" | cpio -i --to-stdout init 2>/dev/null)"
[[ "$guest_init" == *do_iperf3* ]] || die "the guest in $guest_dir predates the iperf3 mode; rebuild it (BATON_GUEST_BINS=iperf3 build-guest.sh)"

work="$(mktemp -d "${TMPDIR:-/tmp}/baton-perf.XXXXXX")"
ns=""
pids=()
# Stop what this script started for the current run: by PID (QEMU, iperf3, passt) and
# baton by its pid file; then the namespace.
stop_run() {
    local p
    for p in "${pids[@]}"; do
        if kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null || true; fi
    done
    if [[ -s "$work/baton.pid" ]]; then kill "$(cat "$work/baton.pid")" 2>/dev/null || true; fi
    rm -f "$work/baton.pid"
    wait 2>/dev/null || true
    pids=()
    if [[ -n "$ns" ]]; then ip netns del "$ns" 2>/dev/null || true; fi
    ns=""
}
cleanup() {
    stop_run
    if [[ -n "${BATON_SMOKE_LOG:-}" ]]; then
        mkdir -p "$BATON_SMOKE_LOG"
        cp "$work"/*.log "$work"/*.err "$BATON_SMOKE_LOG"/ 2>/dev/null || true
    fi
    rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# run_one BACKEND ROUND: boot the guest on BACKEND; append "BACKEND ROUND up down mtu
# offload" (Mbit/s; offload: the checksum offloads baton negotiated, "-" for passt) to
# results. Runs in this shell (not a subshell) so that a failure still
# reaches the EXIT trap with every PID it started.
run_one() {
    local backend="$1" round="$2" tag="$1-$2" netdev qemu_pid i up down mtu offload=-
    ns="baton-perf-$$-$tag"
    baton_host_netns "$ns" "$HOST_ADDR" "$GATEWAY"
    ip netns exec "$ns" iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >"$work/iperf3-$tag.log" 2>&1 &
    pids+=("$!")
    for i in $(seq 1 100); do
        ip netns exec "$ns" ss -Hltn "sport = :$IPERF_PORT" | grep -q . && break
        ((i < 100)) || die "the iperf3 server did not start: $(cat "$work/iperf3-$tag.log")"
        sleep 0.05
    done

    local sock="$work/net.sock"
    case "$backend" in
    baton | base | nocsum)
        local binary="$baton"
        [[ "$backend" == base ]] && binary="$base_baton"
        rm -f "$sock"
        ip netns exec "$ns" "$binary" --socket "$sock" --pid "$work/baton.pid" \
            --log-file "$work/$backend-$tag.log"
        netdev="vhost-user,id=n0,chardev=c0"
        ;;
    passt)
        # Foreground, so that its PID is ours to stop. Started as root it drops to
        # "nobody" before binding its socket, so it gets a directory of its own (and
        # reports success even when that bind fails: the wait below checks).
        sock="$work/passt-$tag/net.sock"
        mkdir -p "$work/passt-$tag"
        chmod 0711 "$work"
        chown nobody "$work/passt-$tag"
        ip netns exec "$ns" passt -f -q --socket "$sock" >"$work/passt-$tag.log" 2>&1 &
        pids+=("$!")
        netdev="stream,id=n0,server=off,addr.type=unix,addr.path=$sock"
        ;;
    esac
    for i in $(seq 1 100); do
        [[ -S "$sock" ]] && break
        ((i < 100)) || die "$backend did not create its socket"
        sleep 0.05
    done

    local append="console=ttyS0 quiet panic=-1 baton.test=iperf3:$GATEWAY:$IPERF_PORT:$secs baton.poweroff=1"
    local qemu=(
        qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 1 -m 512
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
        -nodefaults -no-user-config -display none -no-reboot
        -serial "file:$work/console-$tag.log"
        -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.gz" -append "$append"
    )
    if [[ "$backend" != passt ]]; then
        qemu+=(-chardev "socket,id=c0,path=$sock")
    fi
    local device=virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56
    [[ "$backend" == nocsum ]] && device+=,csum=off,guest_csum=off
    qemu+=(-netdev "$netdev" -device "$device")
    timeout -k 5 "$boot_timeout" "${qemu[@]}" </dev/null >"$work/qemu-$tag.out" 2>"$work/qemu-$tag.err" &
    qemu_pid=$!
    pids+=("$qemu_pid")
    local rc=0
    wait "$qemu_pid" || rc=$?
    local console
    console="$(tr -d '\r' <"$work/console-$tag.log")"
    up="$(sed -n 's/^.*BATON-GUEST: iperf3 [^ ]* up mbps \([0-9.]*\) .*/\1/p' <<<"$console" | tail -n 1)"
    down="$(sed -n 's/^.*BATON-GUEST: iperf3 [^ ]* down mbps \([0-9.]*\) .*/\1/p' <<<"$console" | tail -n 1)"
    mtu="$(sed -n 's/^.*BATON-GUEST: iperf3 [^ ]* up mbps [0-9.]* mtu \([0-9]*\) .*/\1/p' <<<"$console" | tail -n 1)"
    if [[ -z "$up" || -z "$down" || "$console" != *"BATON-GUEST: done status=ok"* ]]; then
        {
            echo "=== perf.sh: $backend run $round FAILED (QEMU exit $rc) ==="
            echo "=== QEMU stderr ==="; cat "$work/qemu-$tag.err"
            echo "=== console ==="; printf '%s\n' "$console"
            echo "=== $backend log (tail) ==="
            tail -n 40 "$work/$backend-$tag.log" 2>/dev/null
        } >&2
        die "$backend run $round failed"
    fi
    if [[ "$backend" != passt ]]; then
        # The last features QEMU set (baton logs them with the checksum offloads).
        local features
        features="$(grep 'virtio features negotiated' "$work/$backend-$tag.log" 2>/dev/null | tail -n 1 || true)"
        case "$features" in
        *"csum=true guest_csum=true"*) offload=csum,guest_csum ;;
        *"csum=true guest_csum=false"*) offload=csum ;;
        *"csum=false guest_csum=true"*) offload=guest_csum ;;
        *csum=false*) offload=none ;;
        *) offload="?" ;;
        esac
    fi
    stop_run
    results+=("$backend $round $up $down $mtu $offload")
}

results=()
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= rounds; r++)); do
    for b in $backends; do
        log "$b, run $r: ${secs} s each way"
        run_one "$b" "$r"
    done
done

cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
echo
echo "TCP throughput, guest on QEMU $(qemu-system-x86_64 --version | sed -n '1s/^QEMU emulator version \([^ ]*\).*/\1/p') TCG (1 vCPU), iperf3 ${secs} s per direction"
echo "host: $(nproc) CPUs, $cpu; load average before $load_before, after $(cut -d' ' -f1-3 /proc/loadavg) (other load skews the figures)"
printf '%-7s %-4s %16s %16s %9s  %s\n' backend run "guest->host" "host->guest" "guest MTU" "checksum offload"
for row in "${results[@]}"; do
    read -r b r up down mtu offload <<<"$row"
    printf '%-7s %-4s %11s Mb/s %11s Mb/s %9s  %s\n' "$b" "$r" "$up" "$down" "$mtu" "$offload"
done
