#!/usr/bin/env bash
# QEMU option values contain commas, not array separators:
# shellcheck disable=SC2054
# TCP throughput and connection setup benchmark: the same Linux guest (QEMU 10, TCG, one
# vCPU) on baton (vhost-user) and on passt (Debian's passt package: no vhost-user, so
# QEMU's `-netdev stream` over a UNIX socket), measured from inside the guest against
# servers on the host's loopback, reached through the gateway address (both backends map
# it to the host's 127.0.0.1):
#   up    guest -> host  (iperf3 -c GATEWAY)
#   down  host -> guest  (iperf3 -c GATEWAY -R)
#   setup guest -> host connections (connrate, crates/testkit/src/bin/connrate.rs: connect,
#         one byte each way, close), BATON_PERF_CONNS of them one at a time (conn/s and
#         the median/p99 connect() time), then as many BATON_PERF_CONN_PARALLEL at a time
#   in    host -> guest connections, the same two runs from the host through a `-t` port
#         forward to a connrate server in the guest (the host's connect() completes at
#         the backend's listener, so only the rate counts: each connection's byte is
#         echoed by the guest)
# Throughput figures are the receiver's Mbit/s as iperf3 reports them. Each backend runs in its own
# private network namespace (as in tcp-smoke.sh); nothing leaves the machine.
# A benchmark, not a test: CI does not run it.
#
# Usage: perf.sh [BATON_BINARY] [GUEST_DIR]
#   BATON_BINARY  default target/release/baton (cargo build --release -p baton)
#   GUEST_DIR     default out/guest-perf, built with BATON_GUEST_BINS="iperf3 CONNRATE" if
#                 it lacks either or predates the connrate binary
# Env:   BATON_PERF_SECS      seconds per direction (default 10)
#        BATON_PERF_BACKENDS  which backends, in order (default "baton passt"); "base" is
#                             a second baton binary, BATON_PERF_BASE, for before/after
#                             comparisons within one run; "nocsum" is baton with QEMU's
#                             device set to csum=off,guest_csum=off (no checksum offload)
#        BATON_PERF_BASE      the "base" backend's binary
#        BATON_PERF_ROUNDS    runs per backend (default 1); every run is printed
#        BATON_PERF_CONNS     connections per connrate run (default 1000)
#        BATON_PERF_CONN_PARALLEL  connections in flight in the parallel run (default 4)
#        BATON_PERF_CONNRATE  the connrate binary, default target/release/connrate
#                             (cargo build --release -p baton-testkit --bin connrate); the
#                             guest runs it at the same absolute path
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
conns="${BATON_PERF_CONNS:-1000}"
conn_parallel="${BATON_PERF_CONN_PARALLEL:-4}"
connrate="${BATON_PERF_CONNRATE:-$here/../target/release/connrate}"
boot_timeout="${BATON_BOOT_TIMEOUT:-300}"
HOST_ADDR=10.77.0.2
GATEWAY=10.77.0.1
IPERF_PORT=5201
CONN_PORT=5202
IN_PORT=5203

[[ "$(id -u)" == 0 ]] || die "run as root (creates network namespaces)"
[[ "$secs" =~ ^[1-9][0-9]*$ ]] || die "BATON_PERF_SECS must be a positive integer"
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || die "BATON_PERF_ROUNDS must be a positive integer"
[[ "$conns" =~ ^[1-9][0-9]*$ ]] || die "BATON_PERF_CONNS must be a positive integer"
[[ "$conn_parallel" =~ ^[1-9][0-9]*$ ]] || die "BATON_PERF_CONN_PARALLEL must be a positive integer"
[[ -x "$connrate" ]] || die "connrate binary $connrate not found; build it (cargo build --release -p baton-testkit --bin connrate)"
# The guest gets the binary at its host path (build-guest.sh), so the path must be absolute
# and free of blanks (it goes into the kernel command line).
connrate="$(readlink -f "$connrate")"
[[ "$connrate" != *[[:space:]\"]* ]] || die "the connrate path must not contain blanks or quotes: $connrate"
case "$connrate" in # the guest's /init mounts fresh file systems on these
/tmp/* | /run/* | /dev/* | /proc/* | /sys/*) die "the connrate binary must not live under /tmp, /run, /dev, /proc or /sys: $connrate" ;;
esac
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
if [[ ! -r "$guest_dir/initrd.gz" ]] || ! grep -q '^guest_program: iperf3' "$guest_dir/manifest.txt" 2>/dev/null \
    || ! grep -qF "guest_program: $connrate" "$guest_dir/manifest.txt" 2>/dev/null \
    || [[ "$connrate" -nt "$guest_dir/initrd.gz" ]]; then
    log "no guest with iperf3 and the current $connrate in $guest_dir; building it"
    BATON_GUEST_BINS="iperf3 $connrate" "$here/build-guest.sh" "$guest_dir"
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
# offload seq par p50 p99 in_seq in_par" (Mbit/s; offload: the checksum offloads baton
# negotiated, "-" for passt; guest -> host conn/s one at a time and conn_parallel at a
# time; connect() median and p99 in us, sequential run; host -> guest conn/s) to results. Runs in this shell (not a subshell) so that a failure still
# reaches the EXIT trap with every PID it started.
run_one() {
    local backend="$1" round="$2" tag="$1-$2" netdev qemu_pid i up down mtu offload=-
    local seq par p50 p99 in_seq in_par
    ns="baton-perf-$$-$tag"
    baton_host_netns "$ns" "$HOST_ADDR" "$GATEWAY"
    ip netns exec "$ns" iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT" >"$work/iperf3-$tag.log" 2>&1 &
    pids+=("$!")
    for i in $(seq 1 100); do
        ip netns exec "$ns" ss -Hltn "sport = :$IPERF_PORT" | grep -q . && break
        ((i < 100)) || die "the iperf3 server did not start: $(cat "$work/iperf3-$tag.log")"
        sleep 0.05
    done
    ip netns exec "$ns" "$connrate" serve "$CONN_PORT" >"$work/connrate-$tag.log" 2>&1 &
    pids+=("$!")
    for i in $(seq 1 100); do
        ip netns exec "$ns" ss -Hltn "sport = :$CONN_PORT" | grep -q . && break
        ((i < 100)) || die "the connrate server did not start: $(cat "$work/connrate-$tag.log")"
        sleep 0.05
    done

    local sock="$work/net.sock"
    case "$backend" in
    baton | base | nocsum)
        local binary="$baton"
        [[ "$backend" == base ]] && binary="$base_baton"
        rm -f "$sock"
        ip netns exec "$ns" "$binary" --socket "$sock" --pid "$work/baton.pid" \
            --log-file "$work/$backend-$tag.log" -t "$IN_PORT"
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
        ip netns exec "$ns" passt -f -q --socket "$sock" -t "$IN_PORT" >"$work/passt-$tag.log" 2>&1 &
        pids+=("$!")
        netdev="stream,id=n0,server=off,addr.type=unix,addr.path=$sock"
        ;;
    esac
    for i in $(seq 1 100); do
        [[ -S "$sock" ]] && break
        ((i < 100)) || die "$backend did not create its socket"
        sleep 0.05
    done

    # Outbound twice, then the guest's server for the inbound runs, which ends once the
    # host's 2 x conns connections are done.
    local run="$connrate connect $GATEWAY $CONN_PORT $conns && $connrate connect -P $conn_parallel $GATEWAY $CONN_PORT $conns"
    run+=" && timeout $boot_timeout $connrate serve --bind 0.0.0.0 --exit-after $((2 * conns)) $IN_PORT"
    local append="console=ttyS0 quiet panic=-1 baton.test=iperf3:$GATEWAY:$IPERF_PORT:$secs baton.run=\"$run\" baton.poweroff=1"
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
    # Inbound: once the guest's server is listening, connect from the host.
    while kill -0 "$qemu_pid" 2>/dev/null; do
        if grep -q "connrate: serving 0.0.0.0:$IN_PORT" "$work/console-$tag.log" 2>/dev/null; then
            {
                ip netns exec "$ns" timeout -k 5 "$boot_timeout" "$connrate" connect 127.0.0.1 "$IN_PORT" "$conns" \
                    && ip netns exec "$ns" timeout -k 5 "$boot_timeout" "$connrate" connect -P "$conn_parallel" \
                        127.0.0.1 "$IN_PORT" "$conns"
            } >"$work/connrate-in-$tag.log" 2>&1 \
                || die "$backend run $round: inbound connrate failed: $(cat "$work/connrate-in-$tag.log")"
            break
        fi
        sleep 0.2
    done
    local rc=0
    wait "$qemu_pid" || rc=$?
    local inbound
    inbound="$(cat "$work/connrate-in-$tag.log" 2>/dev/null || true)"
    in_seq="$(sed -n 's/^connrate: .* parallel=1 .* conn_per_s=\([0-9.]*\) .*/\1/p' <<<"$inbound" | tail -n 1)"
    in_par="$(sed -n "s/^connrate: .* parallel=$conn_parallel .* conn_per_s=\\([0-9.]*\\) .*/\\1/p" <<<"$inbound" | tail -n 1)"
    local console
    console="$(tr -d '\r' <"$work/console-$tag.log")"
    up="$(sed -n 's/^.*BATON-GUEST: iperf3 [^ ]* up mbps \([0-9.]*\) .*/\1/p' <<<"$console" | tail -n 1)"
    down="$(sed -n 's/^.*BATON-GUEST: iperf3 [^ ]* down mbps \([0-9.]*\) .*/\1/p' <<<"$console" | tail -n 1)"
    mtu="$(sed -n 's/^.*BATON-GUEST: iperf3 [^ ]* up mbps [0-9.]* mtu \([0-9]*\) .*/\1/p' <<<"$console" | tail -n 1)"
    # connrate: addr=A:P connections=N parallel=K secs=S conn_per_s=R connect_p50_us=... ...
    seq="$(sed -n 's/^connrate: .* parallel=1 .* conn_per_s=\([0-9.]*\) .*/\1/p' <<<"$console" | tail -n 1)"
    par="$(sed -n "s/^connrate: .* parallel=$conn_parallel .* conn_per_s=\\([0-9.]*\\) .*/\\1/p" <<<"$console" | tail -n 1)"
    p50="$(sed -n 's/^connrate: .* parallel=1 .* connect_p50_us=\([0-9]*\) .*/\1/p' <<<"$console" | tail -n 1)"
    p99="$(sed -n 's/^connrate: .* parallel=1 .* connect_p99_us=\([0-9]*\) .*/\1/p' <<<"$console" | tail -n 1)"
    if [[ -z "$up" || -z "$down" || -z "$seq" || -z "$par" || -z "$p50" || -z "$p99" || -z "$in_seq" || -z "$in_par" \
        || "$console" != *"BATON-GUEST: done status=ok"* ]]; then
        {
            echo "=== perf.sh: $backend run $round FAILED (QEMU exit $rc) ==="
            echo "=== QEMU stderr ==="; cat "$work/qemu-$tag.err"
            echo "=== console ==="; printf '%s\n' "$console"
            echo "=== inbound connrate ==="; printf '%s\n' "$inbound"
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
    results+=("$backend $round $up $down $mtu $offload $seq $par $p50 $p99 $in_seq $in_par")
}

results=()
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= rounds; r++)); do
    for b in $backends; do
        log "$b, run $r: ${secs} s each way, then $conns connections twice each way"
        run_one "$b" "$r"
    done
done

cpu="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)"
echo
echo "TCP throughput and setup rate, guest on QEMU $(qemu-system-x86_64 --version | sed -n '1s/^QEMU emulator version \([^ ]*\).*/\1/p') TCG (1 vCPU), iperf3 ${secs} s per direction,"
echo "connrate: $conns connections (connect, 1 byte each way, close) one at a time and $conn_parallel at a time,"
echo "  guest->host (connect() p50/p99 for the sequential run) and host->guest through a port forward"
echo "host: $(nproc) CPUs, $cpu; load average before $load_before, after $(cut -d' ' -f1-3 /proc/loadavg) (other load skews the figures)"
printf '%-7s %-4s %16s %16s %9s %11s %11s %16s %11s %11s  %s\n' backend run "guest->host" "host->guest" "guest MTU" \
    "g->h conn/s" "-P $conn_parallel" "connect p50/p99" "h->g conn/s" "-P $conn_parallel" "checksum offload"
for row in "${results[@]}"; do
    read -r b r up down mtu offload seq par p50 p99 in_seq in_par <<<"$row"
    printf '%-7s %-4s %11s Mb/s %11s Mb/s %9s %11s %11s %16s %11s %11s  %s\n' "$b" "$r" "$up" "$down" "$mtu" \
        "$seq" "$par" "$p50/$p99 us" "$in_seq" "$in_par" "$offload"
done
