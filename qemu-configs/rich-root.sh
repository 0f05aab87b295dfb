#!/bin/sh
# rich-root.sh SCRIPT - second stage of the rich test guest (busybox sh, in the
# initramfs at /usr/lib/nvme-emu/; installed by build-rich-guest.sh).  guest-init.sh has
# mounted proc/sys/dev, loaded the NVMe driver and waited for the controllers; the
# per-run job (nvme_emu.guest, rich_root=True) runs this instead of its script, which:
#
#  1. loads the 9p and overlay modules listed in /etc/nvme-emu/rich-modules;
#  2. mounts the Debian tree QEMU exports read-only (virtio-9p, tag "richroot") and a
#     tmpfs overlay on it, so the job may write anywhere (gone at power-off);
#  3. points the kernel's module requests at the tree's modprobe (it has the modules);
#  4. gives it this guest's /proc, /sys, /dev and fresh tmpfs on /tmp and /run, copies
#     /job and /opt/fio-zbd (fio's t/zbd scripts, if the build had them) in, and runs
#     SCRIPT there (chroot, /bin/sh).
# Its output and exit status are the job's: guest-init.sh prints them between the
# BEGIN/END markers.  A failure here exits 125 with the reason and the kernel's last
# words, so the host learns at once that the rig, not the job, broke.
set -u
S=/rich
fail() {
    echo "rich-root: $*"
    dmesg | tail -n 20
    exit 125
}

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/rich/$mod" || fail "insmod $mod failed"
done </etc/nvme-emu/rich-modules

mkdir -p "$S/lower" "$S/rw" "$S/root"
# msize 512000: 9p's default (8 KiB) makes every exec read its binary and libraries in
# 8 KiB round trips.  cache=loose: the tree does not change under a running guest.
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose richroot "$S/lower" \
    || fail "cannot mount the rich root (9p tag richroot): is QEMU's -virtfs there?"
mount -t tmpfs -o mode=0755 tmpfs "$S/rw" || fail "cannot mount the overlay's tmpfs"
mkdir -p "$S/rw/upper" "$S/rw/work"
mount -t overlay overlay -o "lowerdir=$S/lower,upperdir=$S/rw/upper,workdir=$S/rw/work" "$S/root" \
    || fail "cannot mount the overlay"
# devtmpfs has no /dev/fd (udev makes it on a full system): bash's process
# substitution, <(...), which fio's t/zbd scripts use, needs it.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
for n in 0:stdin 1:stdout 2:stderr; do
    [ -e "/dev/${n#*:}" ] || ln -s "/proc/self/fd/${n%%:*}" "/dev/${n#*:}"
done
for d in proc sys dev; do
    mount --rbind "/$d" "$S/root/$d" || fail "cannot bind /$d"
done
for d in tmp run; do
    mount -t tmpfs tmpfs "$S/root/$d" || fail "cannot mount tmpfs on /$d"
done
chmod 1777 "$S/root/tmp"
mkdir -p "$S/root/job"
cp -a /job/. "$S/root/job/" || fail "cannot copy /job"
# fio's t/zbd scripts travel in the initramfs (build-rich-guest.sh), or the reason why not.
for f in /opt/fio-zbd /opt/fio-zbd.missing; do
    [ -e "$f" ] && cp -a "$f" "$S/root/opt/"
done

# The kernel's own module requests (mount -t f2fs, a crypto algorithm) run
# /proc/sys/kernel/modprobe in the initramfs, which has no module tree: send them
# to the tree's modprobe, which has the guest kernel's.
printf '#!/bin/sh\nexec chroot %s /usr/sbin/modprobe "$@"\n' "$S/root" >/usr/sbin/rich-modprobe
chmod 0755 /usr/sbin/rich-modprobe
echo /usr/sbin/rich-modprobe >/proc/sys/kernel/modprobe

cd /
chroot "$S/root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=vt100 LC_ALL=C.UTF-8 \
    /bin/sh -c 'cd /job && exec /bin/sh "$0"' "$1"
