#!/bin/sh
# /init of the nested KVM rig's L1 guest (busybox sh).  Installed by build-nested.sh.
#
#  1. mounts proc, sys, devtmpfs, tmpfs; loads the 9p, virtio-blk and ext4 modules
#     (/etc/nvme-emu/modules)
#  2. loads KVM: nvme_emu_kvm=stock|patched (kernel command line) picks
#     /lib/modules/stock or /lib/modules/patched (appended per run by
#     nvme_emu.nested); kvm-amd where the CPU offers svm, else kvm-intel;
#     nvme_emu_kvm=none loads no KVM at all (a job that needs no /dev/kvm is then
#     spared TCG's emulated SVM, which has frozen L1 now and then)
#  3. mounts the host's root (9p tag "host") on /h, with this guest's /proc, /sys,
#     /dev (so /dev/kvm is the L1 KVM) and fresh tmpfs on /h/tmp, /h/run, /h/dev/shm;
#     nvme_emu_share=/a:/b re-exposes those host directories where the tmpfs hides them
#     (the working directory, a checkout under /tmp, output directories)
#  4. runs /job/run.sh with `chroot /h`, printing its output between
#         =====NVME-EMU-BEGIN=====
#         =====NVME-EMU-END rc=N=====
#     (the markers guest-init.sh uses too), then syncs and powers off.
# Failures before the job still print the END marker, with rc=125, so the host side
# never waits for a timeout to learn that the rig itself broke.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=vt100

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo 1 >/proc/sys/kernel/printk

rig_fail() {
    echo "=====NVME-EMU-BEGIN====="
    echo "nested-init: $*"
    dmesg | tail -n 20
    echo "=====NVME-EMU-END rc=125====="
    poweroff -f
}

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod" || rig_fail "insmod $mod failed"
done </etc/nvme-emu/modules

if [ "${nvme_emu_kvm:-stock}" != none ]; then
    set_dir="/lib/modules/${nvme_emu_kvm:-stock}"
    [ -f "$set_dir/kvm.ko" ] || rig_fail "no KVM module set $set_dir"
    if grep -qw svm /proc/cpuinfo; then vendor=kvm-amd; else vendor=kvm-intel; fi
    insmod /lib/modules/irqbypass.ko || rig_fail "insmod irqbypass failed"
    [ "$vendor" = kvm-amd ] && { insmod /lib/modules/ccp.ko || rig_fail "insmod ccp failed"; }
    insmod "$set_dir/kvm.ko" || rig_fail "insmod $set_dir/kvm.ko failed"
    insmod "$set_dir/$vendor.ko" || rig_fail "insmod $set_dir/$vendor.ko failed"
    [ -c /dev/kvm ] || rig_fail "no /dev/kvm after loading $set_dir ($vendor)"
fi

mkdir -p /h /hraw
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose host /h \
    || rig_fail "cannot mount the host's root over 9p"
mount --bind /h /hraw
for d in proc sys dev; do mount --rbind "/$d" "/h/$d" || rig_fail "cannot bind /$d"; done
for d in tmp run dev/shm; do mount -t tmpfs tmpfs "/h/$d" || rig_fail "cannot mount tmpfs on /h/$d"; done
chmod 1777 /h/tmp /h/dev/shm
old_ifs="$IFS"; IFS=:
for d in ${nvme_emu_share:-}; do
    [ -n "$d" ] || continue
    mkdir -p "/h$d" && mount --bind "/hraw$d" "/h$d" || rig_fail "cannot expose host directory $d"
done
IFS="$old_ifs"

mkdir -p /h/run/nested
cp -r /job/. /h/run/nested/
echo "=====NVME-EMU-BEGIN====="
chroot /h /bin/sh /run/nested/run.sh </dev/null 2>&1
rc=$?
sync
echo "=====NVME-EMU-END rc=$rc====="
umount -l /h 2>/dev/null
poweroff -f
