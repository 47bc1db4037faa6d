#!/usr/bin/env bash
# QEMU option values contain commas, not array separators:
# shellcheck disable=SC2054
# Boot the vmbench guest under QEMU (TCG) with QEMU user-mode networking and
# shared memfd guest RAM (as vhost-user needs), and assert from the serial
# console that the guest
#   - got a DHCP lease from slirp,
#   - pinged its gateway 10.0.2.2 (slirp answers echo requests to it itself),
#   - exchanged a line over TCP with a socat listener on host 127.0.0.1:PORT,
#     reached as 10.0.2.2:PORT through slirp,
#   - finished and powered off.
# Prints the boot-to-lease time. Exit 0 on success; otherwise non-zero with
# the console log.
#
# Usage: boot-smoke.sh [GUEST_DIR]   (default: vmbench/out/guest, built if missing)
# Env:   BATON_BOOT_TIMEOUT  seconds before QEMU is killed (default 60)
#        BATON_MEM_ATTACH    numa (default: -numa node,memdev=mem) or
#                            machine (-machine memory-backend=mem, rust-vmm.md 4.6)
#        BATON_SMOKE_LOG     keep the console log at this path
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

guest_dir="${1:-$here/out/guest}"
boot_timeout="${BATON_BOOT_TIMEOUT:-60}"
mem_attach="${BATON_MEM_ATTACH:-numa}"
GATEWAY=10.0.2.2 # slirp's host alias; guest traffic to it stays on this host

for tool in qemu-system-x86_64 socat ss timeout; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found; run install-deps.sh"
done
if [[ ! -r "$guest_dir/vmlinuz" || ! -r "$guest_dir/initrd.gz" ]]; then
    log "no guest in $guest_dir; building it"
    "$here/build-guest.sh" "$guest_dir"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/baton-smoke.XXXXXX")"
console="$work/console.log"
qemu_pid=""
socat_pid=""
cleanup() {
    # Only the processes this script started, by PID.
    if [[ -n "$qemu_pid" ]] && kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid" 2>/dev/null || true; fi
    if [[ -n "$socat_pid" ]] && kill -0 "$socat_pid" 2>/dev/null; then kill "$socat_pid" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    if [[ -n "${BATON_SMOKE_LOG:-}" && -f "$console" ]]; then cp "$console" "$BATON_SMOKE_LOG"; fi
    rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- host-side TCP peer on 127.0.0.1 -------------------------------------------
# Answers one line "X" with "baton-echo X" and closes.
cat >"$work/echo.sh" <<'ECHO'
#!/bin/sh
read -r l
printf 'baton-echo %s\n' "$l"
ECHO
chmod 0755 "$work/echo.sh"
port=""
for _ in $(seq 1 20); do
    cand=$((20000 + RANDOM % 40000))
    if [[ -n "$(ss -Htln "sport = :$cand")" ]]; then continue; fi
    socat -T 20 "TCP-LISTEN:$cand,bind=127.0.0.1,reuseaddr,fork" \
        "EXEC:$work/echo.sh" 2>"$work/socat.err" &
    socat_pid=$!
    for _ in $(seq 1 50); do
        [[ -z "$(ss -Htln "sport = :$cand")" ]] || break
        kill -0 "$socat_pid" 2>/dev/null || break
        sleep 0.05
    done
    if [[ -n "$(ss -Htln "sport = :$cand")" ]]; then port="$cand"; break; fi
    kill "$socat_pid" 2>/dev/null || true
    wait "$socat_pid" 2>/dev/null || true
    socat_pid=""
done
[[ -n "$port" ]] || die "could not start the socat listener on 127.0.0.1 ($(cat "$work/socat.err" 2>/dev/null))"

# --- QEMU ------------------------------------------------------------------------
case "$mem_attach" in
numa) machine=(-machine q35) mem_args=(-numa node,memdev=mem) ;;
machine) machine=(-machine q35,memory-backend=mem) mem_args=() ;;
*) die "BATON_MEM_ATTACH must be numa or machine, got '$mem_attach'" ;;
esac
append="console=ttyS0 quiet panic=-1 baton.test=ping-gw,tcp:$GATEWAY:$port baton.poweroff=1"
qemu=(
    qemu-system-x86_64 -accel tcg "${machine[@]}" -cpu max -smp 1 -m 256
    -object memory-backend-memfd,id=mem,size=256M,share=on "${mem_args[@]}"
    -nodefaults -no-user-config -nographic -serial stdio -no-reboot
    -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.gz" -append "$append"
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56
)
log "host peer 127.0.0.1:$port (socat pid $socat_pid); booting: ${qemu[*]}"

t0="$EPOCHREALTIME"
timeout -k 5 "$boot_timeout" "${qemu[@]}" </dev/null >"$console" 2>"$work/qemu.err" &
qemu_pid=$!

# Wall-clock time from QEMU start to the lease marker (polled every 50 ms).
lease_wall=""
while kill -0 "$qemu_pid" 2>/dev/null; do
    if [[ -z "$lease_wall" ]] && grep -q 'BATON-GUEST: lease ' "$console"; then
        lease_wall="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')"
    fi
    sleep 0.05
done
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=""
total_wall="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')"
if [[ -z "$lease_wall" ]] && grep -q 'BATON-GUEST: lease ' "$console"; then lease_wall="$total_wall"; fi

# --- assertions ----------------------------------------------------------------
markers="$(tr -d '\r' <"$console" | sed -n 's/.*\(BATON-GUEST: .*\)/\1/p')"
failures=()
expect() { # expect REGEX DESCRIPTION
    if ! grep -Eq -- "$1" <<<"$markers"; then failures+=("$2"); fi
}
if [[ "$qemu_rc" -eq 124 || "$qemu_rc" -eq 137 ]]; then
    failures+=("QEMU killed after ${boot_timeout}s timeout")
elif [[ "$qemu_rc" -ne 0 ]]; then
    failures+=("QEMU exited with status $qemu_rc")
fi
expect '^BATON-GUEST: lease [0-9.]+/[0-9]+ gw 10\.0\.2\.2 ' "DHCP lease with gateway $GATEWAY"
expect "^BATON-GUEST: ping-gw ok $GATEWAY\$" "ping to gateway $GATEWAY"
expect "^BATON-GUEST: tcp $GATEWAY:$port ok\$" "TCP exchange with host 127.0.0.1:$port via $GATEWAY:$port"
expect '^BATON-GUEST: done status=ok ' "guest finished with status=ok"

guest_lease_uptime="$(printf '%s\n' "$markers" | sed -n 's/^BATON-GUEST: lease .* uptime \([0-9.]*\)$/\1/p' | sed -n 1p)"
if ((${#failures[@]} > 0)); then
    {
        echo "=== boot-smoke FAILED ==="
        printf '  - %s\n' "${failures[@]}"
        echo "=== QEMU stderr ==="
        cat "$work/qemu.err"
        echo "=== console log ($console) ==="
        tr -d '\r' <"$console"
        echo "=== end ==="
    } >&2
    exit 1
fi
printf '%s\n' "$markers"
echo "boot-smoke: PASS mem=$mem_attach boot-to-lease ${lease_wall:-?}s wall (guest uptime ${guest_lease_uptime:-?}s), total ${total_wall}s"
