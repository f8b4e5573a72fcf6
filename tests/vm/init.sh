#!/bin/sh
# /init of the snapship test VM (busybox initramfs built by tests/vm/harness.py).
#
# Loads the modules listed in /modules.list, mounts the host's / (9p tag "hostroot", read-only)
# and the writable scratch folder (9p tag "scratch"), assembles a root at /newroot out of
# bind mounts of the host's top-level directories plus tmpfs on /tmp /run /etc/lvm, writes an
# lvm.conf that works without udev, then runs /scratch/.vm/script.sh with bash in a chroot.
# Its stdout/stderr go to /scratch/.vm/{stdout,stderr} and its exit code to /scratch/.vm/rc.
# Lines starting with "snapship-vm:" on the console are for the harness.

/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "snapship-vm: $* (uptime $(cut -d' ' -f1 /proc/uptime))"; }
fail() {
    echo "snapship-vm: FATAL: $*"
    [ -d /scratch/.vm ] && echo "$*" > /scratch/.vm/init-error
    sync
    poweroff -f
    sleep 60
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# What udev/systemd would add to /dev (bash process substitution needs /dev/fd).
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
say "init started"

load() { insmod "/modules/$1" 2>/dev/null || echo "snapship-vm: note: insmod $1 failed"; }
# Up to 9p.ko (what mounting the shares needs) now; the rest in the background while the root
# is assembled (xfs alone takes ~1 s under TCG), waited for before the script starts.
sed '/^9p\.ko$/q' /modules.list > /modules.early
sed '1,/^9p\.ko$/d' /modules.list > /modules.late
while read -r m; do [ -z "$m" ] || load "$m"; done < /modules.early
( while read -r m; do [ -z "$m" ] || load "$m"; done < /modules.late ) &
late=$!

mkdir -p /host /scratch /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /host \
    || fail "cannot mount the host root (9p tag hostroot)"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 scratch /scratch \
    || fail "cannot mount the scratch folder (9p tag scratch)"
[ -f /scratch/.vm/script.sh ] || fail "no /scratch/.vm/script.sh"

# A writable top level (so /scratch can exist) whose entries are the host's, bound read-only.
mount -t tmpfs -o mode=755 tmpfs /newroot
for p in /host/* /host/.[!.]*; do
    [ -e "$p" ] || [ -L "$p" ] || continue
    n=${p#/host/}
    case "$n" in proc|sys|dev|tmp|run|scratch) continue ;; esac
    if [ -L "$p" ]; then
        ln -s "$(readlink "$p")" "/newroot/$n"
    elif [ -d "$p" ]; then
        mkdir "/newroot/$n" && mount --bind "$p" "/newroot/$n"
    else
        touch "/newroot/$n" && mount --bind "$p" "/newroot/$n"
    fi
done
for d in proc sys dev tmp run scratch; do mkdir -p "/newroot/$d"; done
mount --bind /proc /newroot/proc
mount --bind /sys /newroot/sys
mount --bind /dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts 2>/dev/null
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mkdir -p /newroot/run/lock /newroot/run/lvm
mount --bind /scratch /newroot/scratch
# The checkout may live where the guest has tmpfs of its own (a CI clone under /tmp): bind it.
if [ -f /scratch/.vm/checkout ]; then
    co=$(cat /scratch/.vm/checkout)
    if [ ! -d "/newroot$co" ]; then
        mkdir -p "/newroot$co" && mount --bind "/host$co" "/newroot$co" \
            || fail "cannot make the checkout $co visible in the guest"
    fi
fi

# lvm2 without udev (and without lvmpolld/dmeventd, which are not running).
if [ -d /newroot/etc/lvm ]; then
    mkdir -p /tmp/etc-lvm
    cp -a /newroot/etc/lvm/. /tmp/etc-lvm/ 2>/dev/null
    mount -t tmpfs -o mode=755 tmpfs /newroot/etc/lvm
    cp -a /tmp/etc-lvm/. /newroot/etc/lvm/ 2>/dev/null
    cat > /newroot/etc/lvm/lvm.conf <<'LVMCONF'
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}
devices {
    obtain_device_list_from_udev = 0
}
backup {
    backup = 0
    archive = 0
}
global {
    use_lvmpolld = 0
}
LVMCONF
    rm -f /newroot/etc/lvm/lvmlocal.conf
fi

wait "$late"
say "starting script"
chroot /newroot /bin/sh -c '
    . /scratch/.vm/env.sh
    cd /scratch
    exec /bin/bash /scratch/.vm/script.sh
' > /scratch/.vm/stdout 2> /scratch/.vm/stderr < /dev/null
rc=$?
echo "$rc" > /scratch/.vm/rc.tmp && mv /scratch/.vm/rc.tmp /scratch/.vm/rc
say "script exited with $rc"
sync
poweroff -f
sleep 60
