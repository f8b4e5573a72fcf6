#!/bin/sh
# Install what the snapship VM harness needs and unpack a Debian kernel into the cache.
#
# Idempotent: every step is skipped when its result is already there.
# Cache dir: $SNAPSHIP_VM_CACHE, default /var/cache/snapship-vm.
# Prints the unpacked kernel version as the last line of stdout (KVER=<version>).
set -eu

CACHE="${SNAPSHIP_VM_CACHE:-/var/cache/snapship-vm}"
PKGS="qemu-system-x86 busybox-static lvm2 thin-provisioning-tools xfsprogs cpio kmod mdadm nbd-client"
export DEBIAN_FRONTEND=noninteractive

log() { echo "setup.sh: $*" >&2; }

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -n "$missing" ]; then
    log "installing:$missing"
    apt-get update -qq >&2 || log "apt-get update failed; trying with the current lists"
    # --no-install-recommends: qemu's recommends pull in a large graphics stack.
    apt-get install -y -qq --no-install-recommends $missing >&2
fi

mkdir -p "$CACHE"
cd "$CACHE"

# The kernel: the generic flavour (the -cloud one has no 9p) that linux-image-amd64 names.
if [ -n "${SNAPSHIP_VM_KERNEL_PKG:-}" ]; then
    kpkg="$SNAPSHIP_VM_KERNEL_PKG"
else
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1)
    if [ -z "$kpkg" ]; then
        # Offline or no lists: reuse whatever kernel is already unpacked.
        kpkg=$(ls -d kernel-linux-image-*-amd64 2>/dev/null | sed 's/^kernel-//' | sort -V | tail -n1)
    fi
fi
[ -n "$kpkg" ] || { log "cannot determine the kernel package (apt-cache depends linux-image-amd64)"; exit 1; }
kver="${kpkg#linux-image-}"
kdir="$CACHE/kernel-$kpkg"

if [ ! -f "$kdir/.unpacked" ]; then
    log "downloading $kpkg"
    tmp=$(mktemp -d "$CACHE/dl.XXXXXX")
    chmod 755 "$tmp"  # apt downloads as _apt when it can
    (cd "$tmp" && apt-get download "$kpkg" >&2)
    rm -rf "$kdir"
    dpkg -x "$tmp"/"$kpkg"_*.deb "$kdir"
    rm -rf "$tmp"
    touch "$kdir/.unpacked"
fi

if [ ! -f "$kdir/lib/modules/$kver/modules.dep" ] || [ ! -f "$kdir/.depmod" ]; then
    log "depmod for $kver"
    depmod -b "$kdir" "$kver"
    touch "$kdir/.depmod"
fi

echo "KVER=$kver"
echo "KDIR=$kdir"
