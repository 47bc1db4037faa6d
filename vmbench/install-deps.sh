#!/usr/bin/env bash
# Install what the vmbench guest test bench needs on a Debian 12 host:
# QEMU 10 (bookworm-backports), the Debian cloud guest kernel, busybox-static
# and host-side tools. Idempotent and non-interactive; run as root.
#
# The backports apt source is derived from the URIs of the existing
# /etc/apt/sources.list.d/debian.sources (no host name is written here).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

BASE_SOURCES="${BATON_BASE_SOURCES:-/etc/apt/sources.list.d/debian.sources}"
BPO_SOURCES="/etc/apt/sources.list.d/baton-backports.sources"
BPO_SUITE="bookworm-backports"
QEMU_MAJOR_WANTED=10

# Packages from the stable suite.
STABLE_PKGS=(
    "linux-image-${BATON_KERNEL_FLAVOUR}"
    busybox-static
    kmod
    iproute2
    cpio
    gzip
    xz-utils
    zstd
    socat
    iperf3
    passt
    procps
    coreutils
    shellcheck
)
# Packages taken from bookworm-backports.
BPO_PKGS=(qemu-system-x86)

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

[[ "$(id -u)" -eq 0 ]] || die "must run as root (needs apt-get install)"
# shellcheck disable=SC1091
. /etc/os-release
[[ "${VERSION_CODENAME:-}" == "bookworm" ]] \
    || die "expected Debian 12 (bookworm), found '${PRETTY_NAME:-unknown}'"
[[ -r "$BASE_SOURCES" ]] || die "cannot read $BASE_SOURCES (needed to derive the backports source)"

# --- 1. backports source, derived from the main bookworm stanza --------------
# Print "URIS<TAB>COMPONENTS<TAB>SIGNED_BY" of the first deb822 stanza whose
# Suites include plain "bookworm".
derive_base() {
    awk '
        function flush() {
            if (!done && types ~ /(^| )deb( |$)/ && (" " suites " ") ~ / bookworm /) {
                printf "%s\t%s\t%s\n", uris, comps, signed
                done = 1
            }
            types = uris = suites = comps = signed = ""
        }
        /^[[:space:]]*#/ { next }
        /^[[:space:]]*$/ { flush(); next }
        {
            key = $0; sub(/:.*/, "", key)
            val = $0; sub(/^[^:]*:[[:space:]]*/, "", val); sub(/[[:space:]]+$/, "", val)
            k = tolower(key)
            if (k == "types") types = val
            else if (k == "uris") uris = val
            else if (k == "suites") suites = val
            else if (k == "components") comps = val
            else if (k == "signed-by") signed = val
        }
        END { flush() }
    ' "$BASE_SOURCES"
}

base="$(derive_base)"
[[ -n "$base" ]] || die "no 'Types: deb' stanza with Suites: bookworm in $BASE_SOURCES"
IFS=$'\t' read -r base_uris base_comps base_signed <<<"$base"
[[ -n "$base_uris" ]] || die "the bookworm stanza of $BASE_SOURCES has no URIs: line"
[[ -n "$base_comps" ]] || base_comps="main"

want_sources="# Written by baton vmbench/install-deps.sh; derived from $BASE_SOURCES.
Types: deb
URIs: $base_uris
Suites: $BPO_SUITE
Components: $base_comps"
if [[ -n "$base_signed" ]]; then
    want_sources+=$'\n'"Signed-By: $base_signed"
fi

need_update=0
if [[ ! -f "$BPO_SOURCES" ]] || [[ "$(cat "$BPO_SOURCES")" != "$want_sources" ]]; then
    log "writing $BPO_SOURCES (URIs: $base_uris, Suites: $BPO_SUITE)"
    printf '%s\n' "$want_sources" >"$BPO_SOURCES.tmp"
    mv -f "$BPO_SOURCES.tmp" "$BPO_SOURCES"
    need_update=1
fi

# --- 2. what is missing? -----------------------------------------------------
pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == "ii " ]]
}
qemu_major() {
    local v
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    v="$(qemu-system-x86_64 --version | sed -n '1s/^QEMU emulator version \([0-9][0-9]*\)\..*/\1/p')"
    [[ -n "$v" ]] || return 1
    printf '%s\n' "$v"
}

missing_stable=()
for p in "${STABLE_PKGS[@]}"; do
    pkg_installed "$p" || missing_stable+=("$p")
done
missing_bpo=()
for p in "${BPO_PKGS[@]}"; do
    pkg_installed "$p" || missing_bpo+=("$p")
done
if [[ "$(qemu_major || echo 0)" != "$QEMU_MAJOR_WANTED" ]]; then
    missing_bpo=("${BPO_PKGS[@]}")
fi

if ((${#missing_stable[@]} + ${#missing_bpo[@]} > 0)); then
    need_update=1
fi

# --- 3. install --------------------------------------------------------------
if ((need_update)); then
    log "apt-get update"
    apt-get -q update
fi
if ((${#missing_stable[@]} > 0)); then
    log "installing: ${missing_stable[*]}"
    apt-get install "${APT_OPTS[@]}" "${missing_stable[@]}"
fi
if ((${#missing_bpo[@]} > 0)); then
    log "installing from $BPO_SUITE: ${missing_bpo[*]}"
    apt-get install "${APT_OPTS[@]}" -t "$BPO_SUITE" "${missing_bpo[@]}"
fi

# --- 4. verify ---------------------------------------------------------------
major="$(qemu_major)" || die "qemu-system-x86_64 not found or its --version is unreadable after install"
qemu_version="$(qemu-system-x86_64 --version | sed -n 1p)"
[[ "$major" == "$QEMU_MAJOR_WANTED" ]] \
    || die "need QEMU ${QEMU_MAJOR_WANTED}.x (vhost-user-net migration), got: $qemu_version; is $BPO_SUITE reachable?"

kver="$(baton_kver)" || die "no installed linux-image-${BATON_KERNEL_FLAVOUR} kernel found under /lib/modules"
[[ -r "/boot/vmlinuz-$kver" ]] || die "kernel image /boot/vmlinuz-$kver missing"
for m in virtio_net virtio_pci; do
    baton_kmod_available "$kver" "$m" \
        || die "kernel $kver has no $m (neither built in nor a module)"
done
[[ -x /bin/busybox ]] || die "/bin/busybox missing (busybox-static)"
if [[ "$(/bin/busybox --list | awk '$0 == "udhcpc" { n++ } END { print n + 0 }')" -eq 0 ]]; then
    die "/bin/busybox has no udhcpc applet"
fi

# perf.sh compares baton with passt (no vhost-user in bookworm's build: QEMU's
# -netdev stream talks to it) and runs iperf3 on both sides.
for tool in passt iperf3; do
    command -v "$tool" >/dev/null || die "$tool missing after install"
done

log "ok: $qemu_version; guest kernel $kver; $(/bin/busybox 2>&1 | sed -n 1p)"
