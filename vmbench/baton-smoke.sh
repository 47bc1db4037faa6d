#!/usr/bin/env bash
# QEMU option values contain commas, not array separators:
# shellcheck disable=SC2054
# Boot the vmbench guest under QEMU 10 (TCG) with its network served by baton over
# vhost-user, and assert from the serial console that the guest
#   - got its DHCP lease from baton (the "host" address, gateway),
#   - pinged its gateway (baton answers through an unprivileged ping socket to the
#     host's loopback: the gateway is mapped to the host by default, as in passt),
#   - finished and powered off.
# baton runs in a private network namespace made here, whose only route goes to a
# veth pair inside it: no guest packet can leave this machine.
#
# Usage: baton-smoke.sh [BATON_BINARY] [GUEST_DIR]
# Env:   BATON_BOOT_TIMEOUT  seconds before QEMU is killed (default 60)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

baton="${1:-$here/../target/debug/baton}"
guest_dir="${2:-$here/out/guest}"
boot_timeout="${BATON_BOOT_TIMEOUT:-60}"
HOST_ADDR=10.77.0.2
GATEWAY=10.77.0.1

[[ "$(id -u)" == 0 ]] || die "run as root (creates a network namespace)"
[[ -x "$baton" ]] || die "baton binary $baton not found; build it first (cargo build -p baton)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found; run install-deps.sh"
if [[ ! -r "$guest_dir/vmlinuz" || ! -r "$guest_dir/initrd.gz" ]]; then
    log "no guest in $guest_dir; building it"
    "$here/build-guest.sh" "$guest_dir"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/baton-vm.XXXXXX")"
ns="baton-smoke-$$"
qemu_pid=""
cleanup() {
    # Only what this script started: QEMU by PID, baton by its pid file, our netns.
    if [[ -n "$qemu_pid" ]] && kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid" 2>/dev/null || true; fi
    if [[ -s "$work/baton.pid" ]]; then kill "$(cat "$work/baton.pid")" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf -- "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the "host": a network namespace with one veth pair and a default route --------
baton_host_netns "$ns" "$HOST_ADDR" "$GATEWAY"

# --- baton (in the background like passt: returns once the socket exists) ---------
ip netns exec "$ns" "$baton" --socket "$work/vu.sock" --pid "$work/baton.pid" \
    --log-file "$work/baton.log" --debug
[[ -S "$work/vu.sock" ]] || die "baton did not create its socket"

# --- QEMU ---------------------------------------------------------------------------
append="console=ttyS0 quiet panic=-1 baton.test=ping-gw baton.poweroff=1"
qemu=(
    qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 1 -m 256
    -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem
    -nodefaults -no-user-config -nographic -serial stdio -no-reboot
    -kernel "$guest_dir/vmlinuz" -initrd "$guest_dir/initrd.gz" -append "$append"
    -chardev "socket,id=c0,path=$work/vu.sock" -netdev vhost-user,id=n0,chardev=c0
    -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56
)
t0="$EPOCHREALTIME"
timeout -k 5 "$boot_timeout" "${qemu[@]}" </dev/null >"$work/console.log" 2>"$work/qemu.err" &
qemu_pid=$!
qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=""
total="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')"

markers="$(tr -d '\r' <"$work/console.log" | sed -n 's/.*\(BATON-GUEST: .*\)/\1/p')"
failures=()
expect() { grep -Eq -- "$1" <<<"$markers" || failures+=("$2"); }
[[ "$qemu_rc" == 0 ]] || failures+=("QEMU exited with status $qemu_rc")
expect "^BATON-GUEST: lease ${HOST_ADDR//./\\.}/24 gw ${GATEWAY//./\\.} " "DHCP lease $HOST_ADDR/24 via $GATEWAY from baton"
expect "^BATON-GUEST: ping-gw ok ${GATEWAY//./\\.}\$" "ping to the gateway $GATEWAY"
expect '^BATON-GUEST: done status=ok ' "guest finished with status=ok"
if ((${#failures[@]} > 0)); then
    {
        echo "=== baton-smoke FAILED ==="
        printf '  - %s\n' "${failures[@]}"
        echo "=== QEMU stderr ==="; cat "$work/qemu.err"
        echo "=== console ==="; tr -d '\r' <"$work/console.log"
        echo "=== baton log ==="; cat "$work/baton.log" 2>/dev/null
    } >&2
    exit 1
fi
printf '%s\n' "$markers"
echo "baton-smoke: PASS (guest on baton: DHCP lease and gateway ping) in ${total}s"
