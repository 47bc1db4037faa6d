# shellcheck shell=bash
# Shared helpers for the vmbench scripts. Sourced, not executed.

# Debian flavour of the guest kernel (linux-image-<flavour> metapackage).
BATON_KERNEL_FLAVOUR="${BATON_KERNEL_FLAVOUR:-cloud-amd64}"

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# Print the kernel version (uname -r form, e.g. 6.1.0-35-cloud-amd64) of the
# installed Debian guest kernel. BATON_KVER overrides the detection.
baton_kver() {
    if [[ -n "${BATON_KVER:-}" ]]; then
        printf '%s\n' "$BATON_KVER"
        return 0
    fi
    local meta="linux-image-${BATON_KERNEL_FLAVOUR}" deps kver
    # The metapackage depends on exactly one versioned image package.
    if deps="$(dpkg-query -W -f='${Depends}' "$meta" 2>/dev/null)"; then
        kver="$(printf '%s\n' "$deps" | sed 's/[,|]/\n/g' \
            | sed -n "s/^ *linux-image-\([^ ]*-${BATON_KERNEL_FLAVOUR}\)\( .*\)\{0,1\}$/\1/p" \
            | sed -n 1p)"
        if [[ -n "$kver" && -d "/lib/modules/$kver" ]]; then
            printf '%s\n' "$kver"
            return 0
        fi
    fi
    # Fallback: newest installed kernel of that flavour.
    kver="$(find /lib/modules -mindepth 1 -maxdepth 1 -name "*-${BATON_KERNEL_FLAVOUR}" -printf '%f\n' 2>/dev/null \
        | sort -V | tail -n1)"
    [[ -n "$kver" ]] || return 1
    printf '%s\n' "$kver"
}

# True if module $2 (name, '-' or '_') is built into kernel $1 or exists as a
# loadable module.
baton_kmod_available() {
    local name="${2//-/_}" dir="/lib/modules/$1"
    local files=("$dir/modules.dep")
    [[ -r "$dir/modules.dep" ]] || return 1
    [[ -r "$dir/modules.builtin" ]] && files+=("$dir/modules.builtin")
    # awk (not grep -q) so that pipefail never sees an early-closed pipe.
    awk -v n="$name" '
        { f = $1; sub(/:$/, "", f); sub(/.*\//, "", f); gsub(/-/, "_", f)
          if (f == n ".ko" || f == n ".ko.xz" || f == n ".ko.zst" || f == n ".ko.gz") found = 1 }
        END { exit !found }
    ' "${files[@]}"
}

# The "host" of the VM tests: a network namespace NS whose only interface pair is a
# veth inside it, with HOST_ADDR/24 and a default route via GATEWAY, and ping sockets
# allowed (ping_group_range is per namespace). Nothing routed there leaves the machine.
# Usage: baton_host_netns NS HOST_ADDR GATEWAY
baton_host_netns() {
    local ns="$1" addr="$2" gw="$3"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add veth0 type veth peer name veth1
    ip -n "$ns" addr add "$addr/24" dev veth0
    ip -n "$ns" link set veth0 up
    ip -n "$ns" link set veth1 up
    ip -n "$ns" route add default via "$gw"
    ip netns exec "$ns" sh -c 'echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range'
}

# Two simulated hosts for migration tests: namespaces NS-src and NS-dst, each joined by
# a veth to the peer namespace NS (the server's side, PEER/32 on its loopback). NS-src
# owns MOVING/32, NS-dst its own TARGET/32; the peer routes MOVING to NS-src until
# baton_move_address. Reverse-path filtering is off everywhere (the peer sees MOVING
# arrive from the destination before the route changes). Nothing leaves the machine.
# Usage: baton_two_hosts NS PEER MOVING TARGET
baton_two_hosts() {
    local ns="$1" peer="$2" moving="$3" target="$4" side
    # shellcheck disable=SC2016 # the inner shell expands $f
    for side in "$ns" "$ns-src" "$ns-dst"; do
        ip netns add "$side"
        ip -n "$side" link set lo up
        ip netns exec "$side" sh -c 'for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > "$f"; done;
            echo "0 2147483647" > /proc/sys/net/ipv4/ping_group_range'
    done
    ip -n "$ns" addr add "$peer/32" dev lo
    ip -n "$ns" link add pS type veth peer name vS netns "$ns-src"
    ip -n "$ns" link add pT type veth peer name vT netns "$ns-dst"
    ip -n "$ns" link set pS up
    ip -n "$ns" link set pT up
    ip -n "$ns" route add "$moving/32" dev pS
    ip -n "$ns" route add "$target/32" dev pT
    ip -n "$ns-src" addr add "$moving/32" dev vS
    ip -n "$ns-src" link set vS up
    ip -n "$ns-src" route add "$peer/32" dev vS
    ip -n "$ns-dst" addr add "$target/32" dev vT
    ip -n "$ns-dst" link set vT up
    ip -n "$ns-dst" route add "$peer/32" dev vT
    # Per-device values for the veths created above (the effective one is the maximum).
    # shellcheck disable=SC2016 # the inner shell expands $f
    for side in "$ns" "$ns-src" "$ns-dst"; do
        ip netns exec "$side" sh -c 'for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > "$f"; done'
    done
}

# Move MOVING from NS-src to NS-dst and route it there from the peer NS.
# Usage: baton_move_address NS MOVING
baton_move_address() {
    local ns="$1" moving="$2"
    ip -n "$ns-src" addr del "$moving/32" dev vS
    ip -n "$ns-dst" addr add "$moving/32" dev vT
    ip -n "$ns" route replace "$moving/32" dev pT
}

# Tcp OutRsts of namespace NS (segments with RST sent).
baton_out_rsts() {
    # shellcheck disable=SC2016 # awk expands $i and $c
    ip netns exec "$1" awk '/^Tcp:/ { if (!n) { for (i = 1; i <= NF; i++) if ($i == "OutRsts") c = i; n = 1 } else print $c }' /proc/net/snmp
}
