#!/usr/bin/env bash
# build-rich-guest.sh - build (once, cached) the "rich" test guest: the test guest of
# build-guest.sh whose job runs in a full Debian trixie userland shared read-only over
# virtio-9p, for checks a busybox initramfs cannot run (bash, blkzone, mkfs.btrfs,
# mkfs.f2fs, python3, fio's t/zbd/test-zbd-support).
#
#   * the root tree $CACHE/rich-root: debootstrap --variant=minbase trixie, plus fio,
#     nvme-cli, btrfs-progs, f2fs-tools, zonefs-tools (mkzonefs), python3, gawk, kmod,
#     sg3-utils (the packages are RICH_PACKAGES below); the guest kernel's whole module tree (from the same
#     linux-image package build-guest.sh boots, depmod'd) so that `modprobe btrfs` works
#     in the guest.
#   * the initramfs: build-guest.sh's image (busybox, nvme modules, guest-init.sh as
#     /init) followed by a second cpio with the 9p and overlay modules, rich-root.sh,
#     which nvme_emu.guest's job runs (run_guest(rich_root=True)): it mounts the tree
#     over 9p (tag "richroot"), puts a tmpfs overlay on it and runs the job in there
#     with chroot; and fio's zoned test scripts (t/zbd, ~100 KB) with the fio they
#     belong to (the tree's, or one built from the same source: 1.7 MB), which
#     rich-root.sh copies to /opt/fio-zbd (see fio_source below).  They are not in
#     the tree so that bringing them rebuilds seconds of initramfs, not minutes of tree.
#
# Why a tree of its own and not the provide-qemu.sh chroot with a few more packages:
# that chroot is QEMU's (its stamp keys every other image; changing it rebuilds them
# for every checkout), QEMU runs inside it with the host's /dev, /proc, /tmp and the
# cache bound in (exporting its / would show the guest all of those), and it is
# rebuilt (rm -rf) whenever its key changes.  Measured on the 2-vCPU machine, loaded:
# see the table in README.md, "Tests".
#
# Prints three lines on stdout: the kernel, the initramfs, the root tree.
# Cache: ${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}/rich-guest, .../rich-root; the root's
# key is RICH_KEY below (packages, kernel), the initramfs's a hash of this script,
# rich-root.sh, build-common.sh, build-fio-zbd.sh, the base guest and the fio source's
# name; flock.
#
# fio's source (for t/zbd), in this order:
#   1. NVME_EMU_FIO_SRC: a fio source tarball or directory (its fio version must be the
#      tree's, checked against the FIO-VERSION-GEN file);
#   2. shared/vendor/fio-VERSION.tar.* beside the checkout (as for libvfio-user);
#   3. `apt-get source --download-only fio=DEBIAN_VERSION` from the host's Debian mirror
#      (a deb-src entry in a private apt state, nothing of the chroots changes);
#   4. otherwise (CI's mirror serves no trixie fio source: 404) build-fio-zbd.sh builds
#      bookworm's fio 3.33 from the mirror's source in the tree and /opt/fio-zbd gets
#      that fio with ITS OWN t/zbd (once per tree, ~2 min, cached with its own stamp).
# 1-3 link /opt/fio-zbd/fio to the tree's fio; /opt/fio-zbd/SOURCE says which it is.
# Without any, the guest has no /opt/fio-zbd and /opt/fio-zbd.missing says why (the
# tests that need it skip, printing that reason).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME=build-rich-guest.sh
. "$HERE/build-common.sh"
CACHE="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}"
OUT="$CACHE/rich-guest"
STAMP="$CACHE/rich-guest.stamp"
TREE="$CACHE/rich-root"
TREE_STAMP="$CACHE/rich-root.stamp"
STAGE2_SRC="$HERE/rich-root.sh"
[ -f "$STAGE2_SRC" ] || die "missing $STAGE2_SRC"

RICH_PACKAGES="fio nvme-cli btrfs-progs f2fs-tools zonefs-tools python3 gawk kmod sg3-utils procps"

CHROOT="$("$HERE/provide-qemu.sh" --chroot | tail -n1)" || die "provide-qemu.sh failed"
RUN="$CACHE/bin/chroot-run"
[ -x "$RUN" ] || die "missing $RUN (provide-qemu.sh did not finish?)"
mapfile -t BASE < <("$HERE/build-guest.sh") || die "build-guest.sh failed"
[ "${#BASE[@]}" -ge 2 ] || die "build-guest.sh printed ${BASE[*]}"
KERNEL="${BASE[-2]}"
BASE_INITRD="${BASE[-1]}"
KVER="$("$HERE/kernel-version.sh")" || die "kernel-version.sh failed"

fio_src_hint() {   # what the caller gave us, for the key: a changed hint rebuilds
    local v="${NVME_EMU_FIO_SRC:-}"
    [ -n "$v" ] || v="$(ls "$HERE"/../../shared/vendor/fio-*.tar.* 2>/dev/null | sort | tail -n1 || true)"
    echo "${v:-mirror}"
}
RICH_KEY="v1 trixie minbase +$RICH_PACKAGES kernel=$KVER"
INIT_KEY="$(cat "$0" "$HERE/build-common.sh" "$HERE/build-fio-zbd.sh" "$STAGE2_SRC" "$CACHE/guest.stamp" | sha256sum | cut -c1-16) $RICH_KEY fio-src=$(fio_src_hint)"

tree_ok() { [ -f "$TREE_STAMP" ] && [ "$(cat "$TREE_STAMP")" = "$RICH_KEY" ] && [ -x "$TREE/usr/bin/fio" ]; }
image_ok() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INIT_KEY" ] && [ -f "$OUT/initramfs.img" ] && tree_ok; }
print_result() { echo "$KERNEL"; echo "$OUT/initramfs.img"; echo "$TREE"; }
if image_ok; then print_result; exit 0; fi

[ "$(id -u)" -eq 0 ] || die "building the rich guest root needs root (debootstrap, chroot)"
exec 9>"$CACHE/.build-rich-guest.lock"
flock 9
if image_ok; then print_result; exit 0; fi

t0=$SECONDS
W="$(mktemp -d /tmp/nvme-emu-rich-build.XXXXXX)"
trap 'rm -rf "$W"' EXIT
LOGF="$CACHE/build-rich-guest.log"
: >"$LOGF"

if ! command -v debootstrap >/dev/null 2>&1; then   # provide-qemu.sh installs it, unless its chroot came cached
    log "installing debootstrap on the host"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; } >>"$LOGF" 2>&1 \
        || { tail -n 30 "$LOGF" >&2; die "cannot install debootstrap"; }
fi

# The mirror the QEMU chroot was built from (provide-qemu.sh read it from the host).
MIRROR="$(sed -n 's/^URIs:[[:space:]]*//p' "$CHROOT/etc/apt/sources.list.d/debian.sources" | head -n1)"
[ -n "$MIRROR" ] || die "no URIs: line in $CHROOT/etc/apt/sources.list.d/debian.sources"

in_tree() {   # run a command inside the tree being built ($1), private mount namespace
    local root="$1"; shift
    if ! unshare -m --propagation slave -- sh -ec '
        r="$1"; shift
        for d in dev proc sys; do mount --rbind "/$d" "$r/$d"; mount --make-rslave "$r/$d"; done
        exec chroot "$r" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
    ' sh "$root" "$@" >>"$LOGF" 2>&1; then
        tail -n 30 "$LOGF" >&2
        die "command failed in $root (log: $LOGF): $*"
    fi
}

# --- the kernel package (modules for the tree, 9p/overlay for the initramfs) --------
kernel_modules() {   # unpacks linux-image-$KVER into $W/kpkg and depmods it
    download_package "$W/dl" "linux-image-$KVER"
    inch sh -c "dpkg -x '$W'/dl/*.deb '$W/kpkg'"
    [ -e "$W/kpkg/lib" ] || ln -s usr/lib "$W/kpkg/lib"
    inch depmod -b "$W/kpkg" "$KVER"
}

# --- fio for t/zbd -> $W/fio-zbd: t/zbd/, FIO-VERSION-GEN, SOURCE and ./fio ----------
fio_source() {   # $1 = Debian version of fio in the tree; leaves $W/fio-zbd or a reason in $W/fio-missing
    local deb="$1" upstream="${1%-*}" src="${NVME_EMU_FIO_SRC:-}" from got
    [ -n "$src" ] || src="$(ls "$HERE"/../../shared/vendor/fio-"$upstream".tar.* 2>/dev/null | tail -n1 || true)"
    mkdir -p "$W/fio-src"
    if [ -n "$src" ]; then
        if [ -d "$src" ]; then cp -a "$src/." "$W/fio-src/"; else tar -xf "$src" -C "$W/fio-src" --strip-components=1; fi
        from="$src"
    elif fio_apt_source "$deb"; then
        from="Debian trixie fio $deb source ($MIRROR)"
    else
        fio_mirror_build "$deb"
        return 0
    fi
    got="$(sed -n 's/^DEF_VER=fio-//p' "$W/fio-src/FIO-VERSION-GEN" 2>/dev/null || true)"
    if [ "$got" != "$upstream" ]; then
        echo "fio source $from is fio ${got:-?}, the guest's fio is $upstream" >"$W/fio-missing"
    elif [ ! -f "$W/fio-src/t/zbd/test-zbd-support" ]; then
        echo "fio $upstream source has no t/zbd/test-zbd-support" >"$W/fio-missing"
    else
        mkdir -p "$W/fio-zbd/t"
        cp -a "$W/fio-src/t/zbd" "$W/fio-zbd/t/zbd"
        cp "$W/fio-src/FIO-VERSION-GEN" "$W/fio-zbd/"
        echo "$from, run with the tree's fio $deb" >"$W/fio-zbd/SOURCE"
        ln -s /usr/bin/fio "$W/fio-zbd/fio"   # test-zbd-support runs $(dirname $0)/../../fio
    fi
}

fio_apt_source() {   # $1 = Debian version; apt-get source into $W/fio-src, or 1 (logged)
    local a="$W/apt" opts
    mkdir -p "$a/lists/partial" "$a/cache/archives/partial" "$a/parts" "$W/fio-dl"
    printf 'Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$MIRROR" >"$a/src.sources"
    opts="-o Dir::Etc::SourceList=$a/src.sources -o Dir::Etc::SourceParts=$a/parts -o Dir::State::Lists=$a/lists -o Dir::Cache=$a/cache"
    inch apt-get $opts update
    if ! "$RUN" sh -c "cd '$W/fio-dl' && apt-get $opts source --download-only fio=$1" >>"$LOGF" 2>&1; then
        log "no fio $1 source from the mirror ($(grep -m1 '^E: ' "$LOGF" | cut -c1-160)); building fio from its bookworm source instead"
        return 1
    fi
    tar -xf "$(ls "$W"/fio-dl/fio_*.orig.tar.* | grep -v '\.asc$' | head -n1)" -C "$W/fio-src" --strip-components=1
}

fio_mirror_build() {   # $1 = the tree's fio version, which has no source here: a fio and its t/zbd from one the mirror serves
    local dir
    if dir="$("$HERE/build-fio-zbd.sh" "$TREE" "$MIRROR" | tail -n1)"; then
        cp -a "$dir" "$W/fio-zbd"
    else
        echo "no fio $1 source, and building fio from the mirror's bookworm source failed" \
            "(see $CACHE/build-fio-zbd.log)" >"$W/fio-missing"
    fi
}

install_fio_zbd() {   # $1 = initramfs tree: /opt/fio-zbd (t/zbd, and fio at ../../fio as the script expects)
    rm -rf "$1/opt/fio-zbd" "$1/opt/fio-zbd.missing"
    if [ -f "$W/fio-missing" ]; then
        cp "$W/fio-missing" "$1/opt/fio-zbd.missing"
    else
        cp -a "$W/fio-zbd" "$1/opt/fio-zbd"
    fi
}

build_tree() {
    local tmp="$TREE.tmp"
    if grep -q " $tmp[/ ]" /proc/mounts || grep -q " $TREE[/ ]" /proc/mounts; then
        die "something is mounted under $tmp or $TREE; unmount it first"
    fi
    rm -rf "$tmp"
    log "debootstrap trixie into $tmp (log: $LOGF)"
    local t=$SECONDS
    debootstrap --variant=minbase trixie "$tmp" "$MIRROR" >>"$LOGF" 2>&1 \
        || { tail -n 30 "$LOGF" >&2; die "debootstrap failed (log: $LOGF)"; }
    log "debootstrap: $((SECONDS - t)) s"
    cp "$CHROOT/etc/apt/sources.list.d/debian.sources" "$tmp/etc/apt/sources.list.d/debian.sources"
    rm -f "$tmp/etc/apt/sources.list"
    cp "$CHROOT/etc/apt/apt.conf.d/99nvme-emu" "$tmp/etc/apt/apt.conf.d/99nvme-emu"
    printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
    chmod +x "$tmp/usr/sbin/policy-rc.d"
    cp -L /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
    t=$SECONDS
    in_tree "$tmp" apt-get update
    # shellcheck disable=SC2086
    in_tree "$tmp" apt-get install -y $RICH_PACKAGES
    in_tree "$tmp" apt-get clean
    rm -rf "$tmp"/var/lib/apt/lists/*_Packages "$tmp"/var/lib/apt/lists/*_Translation-*
    log "packages: $((SECONDS - t)) s"
    # The guest kernel's modules, so that modprobe works in the guest (uname -r = $KVER).
    mkdir -p "$tmp/usr/lib/modules"
    cp -a "$W/kpkg/usr/lib/modules/$KVER" "$tmp/usr/lib/modules/"
    printf 'nvme-emu-rich\n' >"$tmp/etc/hostname"
    rm -rf "$TREE"
    mv "$tmp" "$TREE"
    echo "$RICH_KEY" >"$TREE_STAMP.tmp"
    mv "$TREE_STAMP.tmp" "$TREE_STAMP"
}

in_tree_out() {   # like in_tree, but prints the command's stdout
    local root="$1"; shift
    chroot "$root" /usr/bin/env LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

# --- the initramfs: base image + 9p/overlay modules + rich-root.sh -----------------
build_initramfs() {
    local r="$W/stage2"
    mkdir -p "$r/usr/lib/modules/rich" "$r/usr/lib/nvme-emu" "$r/etc/nvme-emu"
    : >"$r/etc/nvme-emu/rich-modules"
    pack_modules "$W/kpkg" "$KVER" "$r/usr/lib/modules/rich" "$r/etc/nvme-emu/rich-modules" 9pnet_virtio 9p overlay
    install -m 0755 "$STAGE2_SRC" "$r/usr/lib/nvme-emu/rich-root.sh"
    mkdir -p "$r/opt"
    fio_source "$(in_tree_out "$TREE" dpkg-query -W -f '${Version}' fio)"
    install_fio_zbd "$r"
    pack_initramfs "$r" "$W/stage2.img"
    rm -rf "$OUT.tmp"
    mkdir -p "$OUT.tmp"
    cat "$BASE_INITRD" "$W/stage2.img" >"$OUT.tmp/initramfs.img"
    cp "$r/etc/nvme-emu/rich-modules" "$OUT.tmp/modules"
    if [ -f "$r/opt/fio-zbd.missing" ]; then cp "$r/opt/fio-zbd.missing" "$OUT.tmp/fio-zbd"
    else echo "$(sed -n 's/^DEF_VER=//p' "$r/opt/fio-zbd/FIO-VERSION-GEN") from $(cat "$r/opt/fio-zbd/SOURCE")" >"$OUT.tmp/fio-zbd"; fi
    rm -rf "$OUT"
    mv "$OUT.tmp" "$OUT"
}

log "building the rich guest for kernel $KVER (log: $LOGF)"
kernel_modules
tree_ok || build_tree
build_initramfs
echo "$INIT_KEY" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "done in $((SECONDS - t0)) s: tree $(du -sh "$TREE" | cut -f1), initramfs $(du -h "$OUT/initramfs.img" | cut -f1)," \
    "modules: $(tr '\n' ' ' <"$OUT/modules"), t/zbd: $(cat "$OUT/fio-zbd")"
print_result
