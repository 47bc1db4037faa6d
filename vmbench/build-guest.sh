#!/usr/bin/env bash
# Build the vmbench guest from Debian packages only:
#   OUTDIR/vmlinuz         copy of /boot/vmlinuz-<kver> (linux-image-cloud-amd64)
#   OUTDIR/initrd.gz       busybox-static + virtio-net modules + /init (cpio newc, gzip)
#   OUTDIR/manifest.txt    kernel version, busybox version, modules, sha256 sums
# Reproducible: same installed packages and vmbench sources => same bytes.
# Idempotent: re-running replaces the outputs atomically. Needs no root.
#
# Usage: build-guest.sh OUTDIR
# Env:   BATON_KVER           kernel version (default: installed cloud-amd64 kernel)
#        BATON_EXTRA_MODULES  extra kernel modules to include and load, space separated
#        BATON_GUEST_BINS     extra host programs to include with their shared libraries,
#                             space separated names or paths (e.g. "iperf3" for perf.sh)
#        SOURCE_DATE_EPOCH    timestamp for the archive entries (default 0)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

[[ $# -eq 1 && -n "$1" ]] || die "usage: ${0##*/} OUTDIR"
outdir="$1"

BUSYBOX=/bin/busybox
ROOT_MODULES=(virtio_pci virtio_net)
# shellcheck disable=SC2206
EXTRA_MODULES=(${BATON_EXTRA_MODULES:-})
epoch="${SOURCE_DATE_EPOCH:-0}"
[[ "$epoch" =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be an integer, got '$epoch'"

for tool in cpio gzip sha256sum awk; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found; run install-deps.sh"
done
[[ -x "$BUSYBOX" ]] || die "$BUSYBOX not found; run install-deps.sh (busybox-static)"
if ! file_out="$(LC_ALL=C file -b "$BUSYBOX" 2>/dev/null)"; then file_out=""; fi
if [[ -n "$file_out" && "$file_out" != *"statically linked"* ]]; then
    die "$BUSYBOX is not statically linked ($file_out); install busybox-static"
fi

kver="$(baton_kver)" || die "no linux-image-${BATON_KERNEL_FLAVOUR} kernel installed; run install-deps.sh"
moddir="/lib/modules/$kver"
kimage="/boot/vmlinuz-$kver"
[[ -r "$kimage" ]] || die "kernel image $kimage missing or unreadable"
[[ -r "$moddir/modules.dep" ]] || die "$moddir/modules.dep missing"

# --- resolve modules ---------------------------------------------------------
# Print the modules.dep paths for the given module names, dependencies first,
# each once. Built-in modules (modules.builtin) are skipped; unknown ones fail.
resolve_modules() {
    local builtin="$moddir/modules.builtin"
    [[ -r "$builtin" ]] || builtin=/dev/null
    awk -v want="$*" '
        function base(p,   b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.(xz|zst|gz))?$/, "", b); gsub(/-/, "_", b); return b }
        function visit(m,   i, n, d) {
            if (m in done) return
            done[m] = 1
            n = split(deps[m], d, " ")
            for (i = 1; i <= n; i++) visit(base(d[i]))
            print path[m]
        }
        FILENAME == ARGV[1] { isbuiltin[base($1)] = 1; next }
        {
            p = $1; sub(/:$/, "", p)
            m = base(p); path[m] = p
            d = $0; sub(/^[^:]*:[ ]*/, "", d); deps[m] = d
        }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                m = w[i]; gsub(/-/, "_", m)
                if (m in path) visit(m)
                else if (!(m in isbuiltin)) { print "unknown module " m > "/dev/stderr"; bad = 1 }
            }
            exit bad
        }
    ' "$builtin" "$moddir/modules.dep"
}
mapfile -t modules < <(resolve_modules "${ROOT_MODULES[@]}" "${EXTRA_MODULES[@]}") \
    || die "module resolution failed"
# mapfile hides the awk status; check the wanted ones are covered.
resolve_modules "${ROOT_MODULES[@]}" "${EXTRA_MODULES[@]}" >/dev/null \
    || die "some modules are neither in $moddir/modules.dep nor built in"

# --- staging tree ------------------------------------------------------------
umask 022
mkdir -p "$outdir"
outdir="$(cd "$outdir" && pwd)"
work="$(mktemp -d "$outdir/.build.XXXXXX")"
cleanup() { rm -rf -- "$work"; }
trap cleanup EXIT
root="$work/root"
mkdir -p "$root"

for d in bin sbin usr/bin usr/sbin etc etc/baton etc/udhcpc proc sys dev tmp run root mnt var \
    "lib/modules/$kver"; do
    mkdir -p "$root/$d"
done
ln -s ../run "$root/var/run"

install -m 0755 "$BUSYBOX" "$root/bin/busybox"
while IFS= read -r applet; do
    [[ -n "$applet" && "$applet" != "bin/busybox" ]] || continue
    [[ -e "$root/$applet" || -L "$root/$applet" ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -s /bin/busybox "$root/$applet"
done < <("$BUSYBOX" --list-full | LC_ALL=C sort)
[[ -L "$root/bin/sh" ]] || die "busybox did not provide bin/sh"

install -m 0755 "$here/guest/init" "$root/init"
install -m 0755 "$here/guest/udhcpc.script" "$root/etc/udhcpc/default.script"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
printf 'baton-guest\n' >"$root/etc/hostname"
: >"$root/etc/resolv.conf"

# Modules: always stored uncompressed (busybox insmod then needs no xz/zstd
# support), with a matching modules.dep so busybox modprobe also works.
: >"$root/etc/baton/modules"
for rel in "${modules[@]}"; do
    src="$moddir/$rel"
    dst_rel="${rel%.xz}"; dst_rel="${dst_rel%.zst}"; dst_rel="${dst_rel%.gz}"
    dst="$root/lib/modules/$kver/$dst_rel"
    mkdir -p "$(dirname "$dst")"
    case "$rel" in
    *.ko.xz) xz -dc "$src" >"$dst" ;;
    *.ko.zst) zstd -q -dc "$src" >"$dst" ;;
    *.ko.gz) gzip -dc "$src" >"$dst" ;;
    *.ko) cp "$src" "$dst" ;;
    *) die "unexpected module file $rel" ;;
    esac
    chmod 0644 "$dst"
    printf '%s\n' "$dst_rel" >>"$root/etc/baton/modules"
done
awk -v list="$root/etc/baton/modules" '
    BEGIN { while ((getline l < list) > 0) keep[l] = 1 }
    {
        line = $0; gsub(/\.ko\.(xz|zst|gz)/, ".ko", line)
        p = line; sub(/:.*/, "", p)
        if (p in keep) print line
    }
' "$moddir/modules.dep" >"$root/lib/modules/$kver/modules.dep"
for f in modules.builtin modules.order; do
    [[ ! -r "$moddir/$f" ]] || install -m 0644 "$moddir/$f" "$root/lib/modules/$kver/$f"
done

# Extra programs: each binary at its host path plus every shared library ldd lists
# for it (and the dynamic loader), at their host paths, so the guest's loader finds
# them without configuration.
# shellcheck disable=SC2206
GUEST_BINS=(${BATON_GUEST_BINS:-})
copy_host_file() { # copy_host_file PATH: the file (symlinks resolved) at the same path
    local src="$1" dst="$root$1"
    [[ -r "$src" ]] || die "$src missing"
    mkdir -p "$(dirname "$dst")"
    [[ -e "$dst" ]] || install -m 0755 "$(readlink -f "$src")" "$dst"
}
for bin in "${GUEST_BINS[@]}"; do
    path="$(command -v "$bin")" || die "guest program $bin not found on the host"
    [[ "$path" == /* ]] || die "guest program $bin is not a file ($path)"
    copy_host_file "$path"
    ldd_out="$(ldd "$path" 2>&1)" || die "ldd $path: $ldd_out"
    # Lines: "libx.so => /path (addr)", "/lib64/ld-linux-x86-64.so.2 (addr)", vdso.
    while IFS= read -r lib; do
        copy_host_file "$lib"
    done < <(printf '%s\n' "$ldd_out" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
done

# --- archive -----------------------------------------------------------------
find "$root" -exec touch -h -d "@$epoch" {} +
(
    cd "$root"
    find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 --reproducible
) | gzip -9 -n >"$work/initrd.gz"
cp "$kimage" "$work/vmlinuz"
chmod 0644 "$work/vmlinuz" "$work/initrd.gz"

{
    echo "kernel_version: $kver"
    echo "kernel_package: $(dpkg-query -W -f='${Package} ${Version}' "linux-image-$kver" 2>/dev/null || echo unknown)"
    echo "busybox_package: $(dpkg-query -W -f='${Package} ${Version}' busybox-static 2>/dev/null || echo unknown)"
    for bin in "${GUEST_BINS[@]}"; do
        # A program from no package (e.g. perf.sh's connrate, built by cargo) has none.
        pkg="$(dpkg-query -S "$(command -v "$bin")" 2>/dev/null | sed -n '1s/:.*//p')" || pkg=""
        echo "guest_program: $bin ${pkg:+$(dpkg-query -W -f='${Package} ${Version}' "$pkg" 2>/dev/null)}"
    done
    echo "modules_load_order:"
    sed 's/^/  /' "$root/etc/baton/modules"
    echo "sha256:"
    (cd "$work" && sha256sum vmlinuz initrd.gz | sed 's/^/  /')
} >"$work/manifest.txt"

for f in vmlinuz initrd.gz manifest.txt; do
    mv -f "$work/$f" "$outdir/$f"
done
log "built $outdir: vmlinuz $(stat -c %s "$outdir/vmlinuz") B, initrd.gz $(stat -c %s "$outdir/initrd.gz") B (kernel $kver, ${#modules[@]} modules)"
