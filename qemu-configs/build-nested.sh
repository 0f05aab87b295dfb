#!/usr/bin/env bash
# build-nested.sh - build (once, cached) the L1 guest of the nested KVM rig:
#   * the same Debian trixie kernel as build-guest.sh (linux-image-*-amd64,
#     `apt-get download` + `dpkg -x` inside the provide-qemu.sh chroot);
#   * a gzip initramfs: static busybox, the 9p-over-virtio modules, virtio-blk
#     and ext4 (disks for the power-cut test, tests/reliability/test_power_cut.py), the STOCK
#     KVM modules (irqbypass, ccp, kvm, kvm-amd, kvm-intel; decompressed) and
#     qemu-configs/nested-init.sh as /init.
# The patched KVM modules (kvm-post-write/build-kvm.sh) are not in this image:
# nvme_emu.nested appends them per run in a small cpio under
# /lib/modules/patched, so the base image never depends on the kernel change.
# Prints two lines on stdout: the kernel (bzImage) path, then the initramfs path.
# Cache: ${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}/nested ; key: hash of this
# script, nested-init.sh and the chroot's stamp; concurrency: flock.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME=build-nested.sh
. "$HERE/build-common.sh"
CACHE="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}"
OUT="$CACHE/nested"
STAMP="$CACHE/nested.stamp"
INIT_SRC="$HERE/nested-init.sh"
[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"

CHROOT="$("$HERE/provide-qemu.sh" --chroot | tail -n1)" || die "provide-qemu.sh failed"
RUN="$CACHE/bin/chroot-run"
[ -x "$RUN" ] || die "missing $RUN (provide-qemu.sh did not finish?)"

KEY="$(cat "$0" "$HERE/build-common.sh" "$INIT_SRC" "$CACHE/trixie-root.stamp" | sha256sum | cut -c1-16)"
cached_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.img" ]
}
print_result() { echo "$OUT/vmlinuz"; echo "$OUT/initramfs.img"; }
if cached_ok; then print_result; exit 0; fi

exec 9>"$CACHE/.build-nested.lock"
flock 9
if cached_ok; then print_result; exit 0; fi

t0=$SECONDS
W="$(mktemp -d /tmp/nvme-emu-nested-build.XXXXXX)"
trap 'rm -rf "$W"' EXIT
LOGF="$CACHE/build-nested.log"
: >"$LOGF"

# --- kernel package (the one build-guest.sh boots) ------------------------------
KVER="$("$HERE/kernel-version.sh")" || die "kernel-version.sh failed"
KPKG="linux-image-$KVER"
log "building nested L1 guest: $KPKG (log: $LOGF)"
download_package "$W/dl" "$KPKG"
inch sh -c "dpkg -x '$W'/dl/*.deb '$W/kpkg'"
[ -f "$W/kpkg/boot/vmlinuz-$KVER" ] || die "no /boot/vmlinuz-$KVER in $KPKG"
[ -e "$W/kpkg/lib" ] || ln -s usr/lib "$W/kpkg/lib"
inch depmod -b "$W/kpkg" "$KVER"

# --- initramfs tree ---------------------------------------------------------------
R="$W/root"
mkdir -p "$R"/{usr/bin,usr/sbin,usr/lib/modules/stock,proc,sys,dev,tmp,run,h,etc/nvme-emu}
for l in bin sbin lib; do ln -s "usr/$l" "$R/$l"; done

# Dependency-ordered 9p, virtio-blk and ext4 modules -> /etc/nvme-emu/modules (loaded
# first, in order; whatever the kernel has built in is not listed by --show-depends).
: >"$R/etc/nvme-emu/modules"
pack_modules "$W/kpkg" "$KVER" "$R/usr/lib/modules" "$R/etc/nvme-emu/modules" 9pnet_virtio 9p virtio_blk ext4
# KVM: the helpers both module sets share at the top, kvm/kvm-amd/kvm-intel under stock/.
KDIR="$W/kpkg/usr/lib/modules/$KVER/kernel"
for m in virt/lib/irqbypass drivers/crypto/ccp/ccp; do
    unpack_module "$(ls "$KDIR/$m".ko*)" "$R/usr/lib/modules/$(basename "$m").ko"
done
for m in kvm kvm-amd kvm-intel; do
    unpack_module "$(ls "$KDIR/arch/x86/kvm/$m".ko*)" "$R/usr/lib/modules/stock/$m.ko"
done

install_busybox "$CHROOT" "$R"
install -m 0755 "$INIT_SRC" "$R/init"

# --- pack (padded to 512 so per-run cpios can be appended) -----------------------
pack_initramfs "$R" "$W/initramfs.img"

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
cp "$W/kpkg/boot/vmlinuz-$KVER" "$OUT.tmp/vmlinuz"
mv "$W/initramfs.img" "$OUT.tmp/initramfs.img"
echo "$KVER" >"$OUT.tmp/kernel-version"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "$KEY" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "done in $((SECONDS - t0)) s: kernel $KVER, initramfs $(du -h "$OUT/initramfs.img" | cut -f1)"
print_result
