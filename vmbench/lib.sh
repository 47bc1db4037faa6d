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
