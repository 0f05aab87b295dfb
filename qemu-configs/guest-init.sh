#!/bin/sh
# /init of the nvme-emu test guest (busybox sh).  Installed by build-guest.sh.
#
#  1. mounts proc, sys, devtmpfs, tmpfs
#  2. loads the NVMe modules listed in /etc/nvme-emu/modules (dependency order)
#  3. waits (up to nvme_emu_wait=SECONDS from the kernel command line, default 60)
#     until every NVMe PCI function has a bound controller with a block device
#  4. if /job/run.sh exists (the per-run cpio appended by nvme_emu.guest), runs it
#     and prints its stdout+stderr between the markers
#         =====NVME-EMU-BEGIN=====
#         =====NVME-EMU-END rc=N=====
#     otherwise (or with nvme_emu_shell=1) starts an interactive shell
#  5. poweroff -f
# Unknown key=value kernel parameters reach this script as environment variables.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=vt100

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod" || echo "nvme-emu init: insmod $mod failed"
done </etc/nvme-emu/modules

# Count NVMe functions (class 01:08:02) and wait for their block devices.
want=0
for c in /sys/bus/pci/devices/*/class; do
    [ "$(cat "$c")" = "0x010802" ] && want=$((want + 1))
done
if [ "$want" -gt 0 ]; then
    limit=$(( ${nvme_emu_wait:-60} * 10 ))
    i=0
    while :; do
        ctrls=$(ls -d /sys/class/nvme/nvme[0-9]* 2>/dev/null | wc -l)
        live=0
        for s in /sys/class/nvme/nvme[0-9]*/state; do
            [ -f "$s" ] && [ "$(cat "$s")" = "live" ] && live=$((live + 1))
        done
        blks=$(ls -d /sys/block/nvme* 2>/dev/null | wc -l)
        [ "$ctrls" -ge "$want" ] && [ "$live" -ge "$want" ] && [ "$blks" -ge "$want" ] && break
        i=$((i + 1))
        if [ "$i" -ge "$limit" ]; then
            echo "nvme-emu init: timeout waiting for NVMe ($want pci, $ctrls ctrl, $live live, $blks blk)"
            break
        fi
        sleep 0.1
    done
fi

# Keep kernel messages out of the job output.
echo 1 >/proc/sys/kernel/printk

if [ -x /job/run.sh ] || [ -f /job/run.sh ]; then
    cd /job
    echo "=====NVME-EMU-BEGIN====="
    sh /job/run.sh </dev/null 2>&1
    rc=$?
    echo "=====NVME-EMU-END rc=$rc====="
    cd /
fi

if [ "${nvme_emu_shell:-0}" = 1 ] || [ ! -f /job/run.sh ]; then
    echo "nvme-emu init: starting shell; 'exit' powers off"
    setsid cttyhack sh
fi

sync
poweroff -f
