#!/usr/bin/env bash
# build-nested.sh - build (once, cached) the L1 guest of the nested KVM rig:
#   * the same Debian trixie kernel as build-guest.sh (linux-image-*-amd64,
#     `apt-get download` + `dpkg -x` inside the provide-qemu.sh chroot);
#   * a gzip initramfs: static busybox, the 9p-over-virtio modules, the STOCK
#     KVM modules (irqbypass, ccp, kvm, kvm-amd, kvm-intel; decompressed) and
#     qemu-configs/nested-init.sh as /init.
# The patched KVM modules (kvm-post-write/build-kvm.sh) are not in this image:
# nvme_emu.nested appends them per run in a small cpio under
# /lib/modules/patched, so the base image never depends on the kernel change.
# Prints two lines on stdout: the kernel (bzImage) path, then the initramfs path.
# Cache: ${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}/nested ; key: hash of this
# script, nested-init.sh and the chroot's stamp; concurrency: flock.
set -euo pipefail

die() { echo "build-nested.sh: error: $*" >&2; exit 1; }
log() { echo "build-nested.sh: $*" >&2; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}"
OUT="$CACHE/nested"
STAMP="$CACHE/nested.stamp"
INIT_SRC="$HERE/nested-init.sh"
[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"

CHROOT="$("$HERE/provide-qemu.sh" --chroot | tail -n1)" || die "provide-qemu.sh failed"
RUN="$CACHE/bin/chroot-run"
[ -x "$RUN" ] || die "missing $RUN (provide-qemu.sh did not finish?)"

KEY="$(cat "$0" "$INIT_SRC" "$CACHE/trixie-root.stamp" | sha256sum | cut -c1-16)"
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
inch() {
    if ! "$RUN" "$@" >>"$LOGF" 2>&1; then
        tail -n 30 "$LOGF" >&2
        die "command failed (log: $LOGF): $*"
    fi
}

# --- kernel package (the one build-guest.sh boots) ------------------------------
KVER="$("$HERE/kernel-version.sh")" || die "kernel-version.sh failed"
KPKG="linux-image-$KVER"
log "building nested L1 guest: $KPKG (log: $LOGF)"
mkdir -p "$W/dl"
if ! "$RUN" sh -c "cd '$W/dl' && apt-get download '$KPKG'" >>"$LOGF" 2>&1; then
    inch apt-get update
    inch sh -c "cd '$W/dl' && apt-get download '$KPKG'"
fi
inch sh -c "dpkg -x '$W'/dl/*.deb '$W/kpkg'"
[ -f "$W/kpkg/boot/vmlinuz-$KVER" ] || die "no /boot/vmlinuz-$KVER in $KPKG"
[ -e "$W/kpkg/lib" ] || ln -s usr/lib "$W/kpkg/lib"
inch depmod -b "$W/kpkg" "$KVER"

# --- initramfs tree ---------------------------------------------------------------
R="$W/root"
mkdir -p "$R"/{usr/bin,usr/sbin,usr/lib/modules/stock,proc,sys,dev,tmp,run,h,etc/nvme-emu}
for l in bin sbin lib; do ln -s "usr/$l" "$R/$l"; done

unpack_module() {   # $1 = module file in the package, $2 = destination .ko
    case "$1" in
        *.ko.xz)  xz -dc "$1" >"$2" ;;
        *.ko.zst) zstd -qdc "$1" >"$2" ;;
        *.ko.gz)  gzip -dc "$1" >"$2" ;;
        *.ko)     cp "$1" "$2" ;;
        *) die "unexpected module file $1" ;;
    esac
}
# Dependency-ordered 9p modules -> /etc/nvme-emu/modules (loaded first, in order).
: >"$R/etc/nvme-emu/modules"
for m in 9pnet_virtio 9p; do
    "$RUN" modprobe -d "$W/kpkg" -S "$KVER" --show-depends "$m" 2>>"$LOGF" \
        || die "modprobe --show-depends $m failed (log: $LOGF)"
done >"$W/deps"
while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    name="$(basename "$path")"; name="${name%.ko*}.ko"
    grep -qx "$name" "$R/etc/nvme-emu/modules" && continue
    unpack_module "$path" "$R/usr/lib/modules/$name"
    echo "$name" >>"$R/etc/nvme-emu/modules"
done <"$W/deps"
# KVM: the helpers both module sets share at the top, kvm/kvm-amd/kvm-intel under stock/.
KDIR="$W/kpkg/usr/lib/modules/$KVER/kernel"
for m in virt/lib/irqbypass drivers/crypto/ccp/ccp; do
    unpack_module "$(ls "$KDIR/$m".ko*)" "$R/usr/lib/modules/$(basename "$m").ko"
done
for m in kvm kvm-amd kvm-intel; do
    unpack_module "$(ls "$KDIR/arch/x86/kvm/$m".ko*)" "$R/usr/lib/modules/stock/$m.ko"
done

cp "$CHROOT/usr/bin/busybox" "$R/usr/bin/busybox"
"$RUN" /usr/bin/busybox --list-full | while read -r app; do
    app="${app#/}"
    case "$app" in bin/*|sbin/*) app="usr/$app" ;; esac
    mkdir -p "$(dirname "$R/$app")"
    [ -e "$R/$app" ] || [ -L "$R/$app" ] || ln -s /usr/bin/busybox "$R/$app"
done
install -m 0755 "$INIT_SRC" "$R/init"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$R/etc/passwd"
printf 'root:x:0:\n' >"$R/etc/group"

# --- pack (padded to 512 so per-run cpios can be appended) -----------------------
inch sh -c "cd '$R' && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6 >'$W/initramfs.img'"
sz=$(stat -c %s "$W/initramfs.img")
pad=$(( (512 - sz % 512) % 512 ))
[ "$pad" -eq 0 ] || head -c "$pad" /dev/zero >>"$W/initramfs.img"

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
