#!/usr/bin/env bash
# build-kvm.sh - build (once, cached) kvm.ko, kvm-amd.ko and kvm-intel.ko with
# post-write.patch (KVM_IOEVENTFD_FLAG_POST_WRITE) for the Debian trixie kernel
# that ../build-guest.sh boots, so they load into that stock kernel.
#
#   * The kernel release (KVER) comes from ../kernel-version.sh, the resolver
#     the guest builders share, so they agree.
#   * Everything comes from Debian packages, in the provide-qemu.sh chroot:
#     the toolchain (gcc, make, pahole, patch) is apt-get installed there;
#     linux-source-6.12, linux-headers-$KVER (+ -common, linux-kbuild) and
#     linux-image-$KVER of the same version are only downloaded and unpacked
#     (dpkg -x) into a private work dir, never installed.
#   * Only arch/x86/kvm, virt/kvm and include/uapi/linux/kvm.h are extracted
#     from the source tarball and patched; they are linked into the private
#     headers tree (which is the kbuild srctree), and the patched kvm.h
#     replaces the headers' copy there.  Then
#     make -C linux-headers-$KVER M=.../arch/x86/kvm modules.
#   * The result is checked against the stock modules of linux-image-$KVER
#     (same vermagic, same CRCs for every imported kernel symbol) and
#     stripped (strip --strip-debug).
# Prints, as the LAST line on stdout, the directory holding the .ko files:
#   ${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}/kvm-post-write/$KVER
# The cache key is a sha256 of post-write.patch, this script and KVER: editing
# either rebuilds; otherwise a second call returns at once.  Progress goes to
# stderr.  Concurrency: flock; the build goes to DIR.tmp and is renamed.
# NVME_EMU_KEEP_WORK=1 keeps the work dir (unstripped modules) for debugging.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME=build-kvm.sh
. "$HERE/../build-common.sh"
CACHE="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}"
PATCH="$HERE/post-write.patch"
[ -f "$PATCH" ] || die "missing $PATCH"
MODULES="kvm kvm-amd kvm-intel"

# The guests' kernel, from the resolver all guest builders share.
KVER="$("$HERE/../kernel-version.sh" | sed -n '$p')" || die "kernel-version.sh failed"
KPKG="linux-image-$KVER"
[ -n "${KPKG:-}" ] && [ -n "${KVER:-}" ] || die "cannot determine the guest kernel version"

RUN="$CACHE/bin/chroot-run"
[ -x "$RUN" ] || die "missing $RUN (provide-qemu.sh did not finish?)"

KEY="$( { sha256sum <"$PATCH"; sha256sum <"$0"; echo "$KVER"; } | sha256sum | cut -d' ' -f1)"
BASE="$CACHE/kvm-post-write"
OUT="$BASE/$KVER"

cached_ok() {
    [ -f "$OUT/build-key" ] && [ "$(cat "$OUT/build-key")" = "$KEY" ] || return 1
    local m
    for m in $MODULES; do [ -f "$OUT/$m.ko" ] || return 1; done
}
if cached_ok; then
    echo "$OUT"
    exit 0
fi

mkdir -p "$BASE"
exec 9>"$BASE/.lock"
flock 9
if cached_ok; then      # somebody else built it while we waited
    echo "$OUT"
    exit 0
fi

t0=$SECONDS
# Work dir under /tmp: chroot-run bind-mounts /tmp, so the same path works
# inside and outside the chroot.
W="$(mktemp -d /tmp/nvme-emu-kvm-build.XXXXXX)"
trap '[ -n "${NVME_EMU_KEEP_WORK:-}" ] && log "work dir kept: $W" || rm -rf "$W"' EXIT
LOGF="$CACHE/build-kvm.log"
: >"$LOGF"
log "building patched KVM modules for $KVER (log: $LOGF)"

# --- packages: versions pinned to the guest's kernel package ------------------
kver_of() {   # the candidate version of package $1 in the chroot
    "$RUN" apt-cache show --no-all-versions "$1" >"$W/show" 2>/dev/null || true
    sed -n 's/^Version: //p' "$W/show" | sed -n 1p
}
VER="$(kver_of "$KPKG")"
if [ -z "$VER" ]; then
    inch apt-get update
    VER="$(kver_of "$KPKG")"
fi
[ -n "$VER" ] || die "$KPKG is not known to apt in the chroot"
SERIES="$(echo "$KVER" | cut -d. -f1,2)"      # 6.12
SRCPKG="linux-source-$SERIES"
HPKG="linux-headers-$KVER"
"$RUN" apt-cache depends "$HPKG" >"$W/hdeps" 2>>"$LOGF" || die "$HPKG is not known to apt in the chroot"
HCOMMON="$(sed -n 's/^ *Depends: \(linux-headers-[^ ]*-common\)$/\1/p' "$W/hdeps" | sed -n 1p)"
KBUILD="$(sed -n 's/^ *Depends: \(linux-kbuild-[^ ]*\)$/\1/p' "$W/hdeps" | sed -n 1p)"
GCC="$(sed -n 's/^ *Depends: \(gcc-[0-9][0-9]*\)$/\1/p' "$W/hdeps" | sed -n 1p)"
[ -n "$HCOMMON" ] && [ -n "$KBUILD" ] && [ -n "$GCC" ] \
    || die "cannot read the dependencies of $HPKG: $(tr '\n' ' ' <"$W/hdeps")"

# Toolchain, installed in the chroot.  linux-kbuild wants pahole (module BTF),
# which needs libdw1t64: pin it to the installed libelf1t64's version (both come
# from elfutils; QEMU from trixie-backports pulled a newer libelf1t64).
TOOLS="make $GCC pahole patch"
ELFVER="$("$RUN" dpkg-query -W -f '${Version}' libelf1t64 2>/dev/null || true)"
[ -n "$ELFVER" ] && TOOLS="$TOOLS libdw1t64=$ELFVER"
# shellcheck disable=SC2086
if ! "$RUN" sh -c "command -v make && command -v x86_64-linux-gnu-$GCC && command -v pahole && command -v patch && command -v strip" >/dev/null 2>&1; then
    log "installing $TOOLS in the chroot"
    if ! "$RUN" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $TOOLS >>"$LOGF" 2>&1; then
        inch apt-get update
        inch env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $TOOLS
    fi
fi

log "downloading $SRCPKG, $HPKG, $HCOMMON, $KBUILD, $KPKG (version $VER)"
download_package "$W/dl" "$SRCPKG=$VER" "$HPKG=$VER" "$HCOMMON=$VER" "$KBUILD=$VER" "$KPKG=$VER"

# --- private headers tree -----------------------------------------------------
H="$W/h"
for p in "$HPKG" "$HCOMMON" "$KBUILD"; do
    inch sh -c "dpkg -x '$W'/dl/${p}_*.deb '$H'"
done
HDIR="$H/usr/src/$HPKG"
CDIR="$H/usr/src/$HCOMMON"
[ -f "$HDIR/Makefile" ] && [ -f "$CDIR/Makefile" ] || die "unexpected layout of $HPKG / $HCOMMON"
# The arch Makefile includes the common one by absolute path: make it ours.
sed -i "s|^include /usr/src/|include $H/usr/src/|" "$HDIR/Makefile"
grep -q "^include $H/" "$HDIR/Makefile" || die "unexpected $HDIR/Makefile: $(cat "$HDIR/Makefile")"

# --- sources ------------------------------------------------------------------
log "extracting arch/x86/kvm, virt/kvm and kvm.h from $SRCPKG"
S="$W/src"
mkdir -p "$S"
inch sh -c "dpkg-deb --fsys-tarfile '$W'/dl/${SRCPKG}_*.deb | tar -xO ./usr/src/$SRCPKG.tar.xz \
    | tar -xJf - -C '$S' $SRCPKG/arch/x86/kvm $SRCPKG/virt/kvm $SRCPKG/include/uapi/linux/kvm.h"
S="$S/$SRCPKG"
cp "$PATCH" "$W/post-write.patch"     # $HERE need not be visible in the chroot
inch sh -c "cd '$S' && patch -p1 --forward --fuzz=0 --no-backup-if-mismatch <'$W/post-write.patch'"

# kbuild's srctree is the common headers dir: arch/x86/kvm/Makefile includes
# $(srctree)/virt/kvm/Makefile.kvm and adds -I $(srctree)/arch/x86/kvm, and
# trace.h is found as include/trace/../../arch/x86/kvm/trace.h.
if [ -e "$CDIR/virt" ] || [ -e "$CDIR/arch/x86/kvm" ]; then
    die "$HCOMMON unexpectedly has virt/ or arch/x86/kvm"
fi
ln -s "$S/virt" "$CDIR/virt"
ln -s "$S/arch/x86/kvm" "$CDIR/arch/x86/kvm"
cp "$S/include/uapi/linux/kvm.h" "$CDIR/include/uapi/linux/kvm.h"

# --- build --------------------------------------------------------------------
log "compiling (make -j2 modules)"
t1=$SECONDS
inch make -C "$HDIR" M="$S/arch/x86/kvm" -j2 modules
for m in $MODULES; do
    [ -f "$S/arch/x86/kvm/$m.ko" ] || die "$m.ko was not built (log: $LOGF)"
done
log "compiled in $((SECONDS - t1)) s"

# --- check against the stock modules ------------------------------------------
inch sh -c "dpkg-deb --fsys-tarfile '$W'/dl/${KPKG}_*.deb | tar -xf - -C '$W' --wildcards '*/modules/*/kernel/arch/x86/kvm/*'"
STOCK="$W/usr/lib/modules/$KVER/kernel/arch/x86/kvm"
[ -d "$STOCK" ] || STOCK="$W/lib/modules/$KVER/kernel/arch/x86/kvm"
for m in $MODULES; do
    ours="$S/arch/x86/kvm/$m.ko"
    stock="$(ls "$STOCK/$m.ko"* 2>/dev/null | sed -n 1p)"
    [ -n "$stock" ] || die "no stock $m.ko in $KPKG"
    case "$stock" in
        *.xz) xz -dc "$stock" >"$W/stock-$m.ko" ;;
        *.zst) zstd -qdc "$stock" >"$W/stock-$m.ko" ;;
        *) cp "$stock" "$W/stock-$m.ko" ;;
    esac
    v_ours="$("$RUN" modinfo -F vermagic "$ours")"
    v_stock="$("$RUN" modinfo -F vermagic "$W/stock-$m.ko")"
    [ "$v_ours" = "$v_stock" ] || die "$m.ko vermagic '$v_ours' differs from the stock '$v_stock'"
    # Every kernel symbol both import must have the same CRC.
    "$RUN" modprobe --dump-modversions "$ours" | sort -k2 >"$W/crc-ours"
    "$RUN" modprobe --dump-modversions "$W/stock-$m.ko" | sort -k2 >"$W/crc-stock"
    bad="$(join -1 2 -2 2 "$W/crc-ours" "$W/crc-stock" | awk '$2 != $3 && n++ < 5 { print $1 }')"
    [ -z "$bad" ] || die "$m.ko: symbol CRCs differ from the stock module: $bad"
done
# struct _ioeventfd's new member (in the debug info and BTF): the patch is in.
"$RUN" strings -a "$S/arch/x86/kvm/kvm.ko" | grep -x post_write >/dev/null \
    || die "kvm.ko does not know _ioeventfd.post_write: was the patch compiled in?"

# --- publish --------------------------------------------------------------------
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
for m in $MODULES; do
    inch strip --strip-debug -o "$OUT.tmp/$m.ko" "$S/arch/x86/kvm/$m.ko"
done
cp "$PATCH" "$OUT.tmp/post-write.patch"
cp "$S/include/uapi/linux/kvm.h" "$OUT.tmp/kvm.h"
{
    echo "kernel: $KVER ($KPKG $VER)"
    echo "source: $SRCPKG $VER + post-write.patch"
    echo "vermagic: $("$RUN" modinfo -F vermagic "$OUT.tmp/kvm.ko")"
    echo "load: rmmod kvm_amd kvm_intel kvm; insmod kvm.ko; insmod kvm-amd.ko (or kvm-intel.ko)"
} >"$OUT.tmp/BUILD-INFO"
echo "$KEY" >"$OUT.tmp/build-key"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
log "done in $((SECONDS - t0)) s: $(cd "$OUT" && du -h ./*.ko | awk '{printf "%s %s  ", $2, $1}')"
echo "$OUT"
