#!/usr/bin/env bash
# build-guest.sh - build (once, cached) the nvme-emu test guest:
#   * a Debian trixie kernel (linux-image-*-amd64, fetched with apt-get download
#     inside the provide-qemu.sh chroot and unpacked with dpkg -x, not installed)
#   * a gzip initramfs: static busybox, fio and nvme-cli with their shared
#     libraries, the NVMe driver modules (decompressed, dependency order) and
#     qemu-configs/guest-init.sh as /init.
# Prints two lines on stdout: the kernel (bzImage) path, then the initramfs path.
# The cache key is a hash of this script, guest-init.sh and the chroot's stamp,
# so editing either rebuilds; otherwise a second call is instant.
# Cache: ${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}/guest ; concurrency: flock.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME=build-guest.sh
. "$HERE/build-common.sh"
CACHE="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}"
OUT="$CACHE/guest"
STAMP="$CACHE/guest.stamp"
INIT_SRC="$HERE/guest-init.sh"
[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"

# The chroot holds the tools (and apt) we build with.
CHROOT="$("$HERE/provide-qemu.sh" --chroot | tail -n1)" || die "provide-qemu.sh failed"
RUN="$CACHE/bin/chroot-run"
[ -x "$RUN" ] || die "missing $RUN (provide-qemu.sh did not finish?)"

KEY="$(cat "$0" "$HERE/build-common.sh" "$INIT_SRC" "$CACHE/trixie-root.stamp" | sha256sum | cut -c1-16)"

cached_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.img" ]
}
if cached_ok; then
    echo "$OUT/vmlinuz"
    echo "$OUT/initramfs.img"
    exit 0
fi

exec 9>"$CACHE/.build-guest.lock"
flock 9
if cached_ok; then
    echo "$OUT/vmlinuz"
    echo "$OUT/initramfs.img"
    exit 0
fi

t0=$SECONDS
# Work dir under /tmp: chroot-run bind-mounts /tmp, so the same path works
# inside and outside the chroot.
W="$(mktemp -d /tmp/nvme-emu-guest-build.XXXXXX)"
trap 'rm -rf "$W"' EXIT
LOGF="$CACHE/build-guest.log"
: >"$LOGF"

# --- kernel -------------------------------------------------------------------
KPKG="linux-image-$("$HERE/kernel-version.sh")" || die "kernel-version.sh failed"
log "building guest: kernel package $KPKG (log: $LOGF)"
download_package "$W/dl" "$KPKG"
inch sh -c "dpkg -x '$W'/dl/*.deb '$W/kpkg'"
MODBASE="$W/kpkg/usr/lib/modules"
[ -d "$MODBASE" ] || MODBASE="$W/kpkg/lib/modules"
KVER="$(ls "$MODBASE" | head -n1)"
[ -n "$KVER" ] || die "no modules directory in $KPKG"
[ -f "$W/kpkg/boot/vmlinuz-$KVER" ] || die "no /boot/vmlinuz-$KVER in $KPKG"

# depmod -b BASE looks for BASE/lib/modules: give the merged-/usr tree a lib link.
[ -e "$W/kpkg/lib" ] || ln -s usr/lib "$W/kpkg/lib"
inch depmod -b "$W/kpkg" "$KVER"
# Dependency-ordered module list for nvme (nvme-auth, nvme-keyring, nvme-core, ...).
"$RUN" modprobe -d "$W/kpkg" -S "$KVER" --show-depends nvme >"$W/deps" 2>>"$LOGF" \
    || die "modprobe --show-depends nvme failed (log: $LOGF)"
grep -q '^insmod ' "$W/deps" || die "no modules for nvme: $(cat "$W/deps")"

# --- initramfs tree -------------------------------------------------------------
R="$W/root"
mkdir -p "$R"/{usr/bin,usr/sbin,usr/lib,usr/lib64,proc,sys,dev,tmp,run,root,job,etc/nvme-emu,lib/modules}
for l in bin sbin; do ln -s "usr/$l" "$R/$l"; done
rmdir "$R/lib/modules" "$R/lib" 2>/dev/null || true
ln -s usr/lib "$R/lib"; ln -s usr/lib64 "$R/lib64"
mkdir -p "$R/usr/lib/modules"

: >"$R/etc/nvme-emu/modules"
while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    name="$(basename "$path")"
    name="${name%.ko*}.ko"
    unpack_module "$path" "$R/usr/lib/modules/$name"
    echo "$name" >>"$R/etc/nvme-emu/modules"
done <"$W/deps"

install_busybox "$CHROOT" "$R"

# fio, nvme-cli and their libraries (resolved inside the chroot)
copy_from_chroot() {   # $1 = absolute path as seen inside the chroot
    local p="$1" real dst
    real="$("$RUN" readlink -f "$p")"
    dst="$R$p"
    case "$p" in /lib/*|/lib64/*|/bin/*|/sbin/*) dst="$R/usr$p" ;; esac
    mkdir -p "$(dirname "$dst")"
    [ -e "$dst" ] || cp "$CHROOT$real" "$dst"
}
for prog in /usr/bin/fio /usr/sbin/nvme; do
    [ -e "$CHROOT$prog" ] || die "$prog missing in chroot"
    rm -f "$R$prog"
    copy_from_chroot "$prog"
    "$RUN" ldd "$prog" >"$W/ldd" 2>>"$LOGF" || die "ldd $prog failed"
    sed -n -e 's/.*=> \(\/[^ ]*\) (0x.*/\1/p' -e 's/^[[:space:]]*\(\/[^ ]*\) (0x.*/\1/p' "$W/ldd" \
        | while read -r lib; do copy_from_chroot "$lib"; done
done
grep -q 'not found' "$W/ldd" && die "unresolved libraries: $(grep 'not found' "$W/ldd")"

install -m 0755 "$INIT_SRC" "$R/init"

# --- pack -----------------------------------------------------------------------
pack_initramfs "$R" "$W/initramfs.img"

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
cp "$W/kpkg/boot/vmlinuz-$KVER" "$OUT.tmp/vmlinuz"
mv "$W/initramfs.img" "$OUT.tmp/initramfs.img"
echo "$KPKG $KVER" >"$OUT.tmp/kernel-version"
cp "$R/etc/nvme-emu/modules" "$OUT.tmp/modules"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "$KEY" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "done in $((SECONDS - t0)) s: kernel $KVER, initramfs $(du -h "$OUT/initramfs.img" | cut -f1), modules: $(tr '\n' ' ' <"$OUT/modules")"
echo "$OUT/vmlinuz"
echo "$OUT/initramfs.img"
