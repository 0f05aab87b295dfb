#!/usr/bin/env bash
# build-fio-zbd.sh TREE MIRROR - build (once, cached) a fio together with its own
# t/zbd scripts from a fio source the Debian mirror serves, for the rich guest's
# test-zbd-support when the source of the tree's own fio is not at hand.
#
# Why: t/zbd/test-zbd-support runs $(dirname $0)/../../fio and its tests follow that
# fio's options and messages, so the scripts must come from the source of the fio
# they run.  The tree's fio is trixie's 3.39, and build-rich-guest.sh prefers its
# source (NVME_EMU_FIO_SRC, shared/vendor, `apt-get source` from trixie).  Our CI's
# mirror serves no trixie/sid fio source (404 for fio_3.39-1.dsc), but it serves
# bookworm's (fio 3.33-3), so this script builds that one and ships the pair.
#
#   * where: in TREE (the rich root, build-rich-guest.sh) under a throwaway overlay in
#     a private mount namespace, so the binary links against the very libraries the
#     guest runs it with, and the tree (and its stamp) stays untouched: the build
#     tools (gcc, make, dpkg-dev, libaio-dev, zlib1g-dev) exist only in the overlay.
#   * what: `apt-get source fio=$FIO_DEB` from a bookworm deb-src entry on MIRROR: apt
#     checks the .dsc against the signed Sources index (debian-archive-keyring) and
#     dpkg-source the files against the .dsc's sha256, then applies Debian's patches.
#     configure with every optional engine off (libaio, psync and io_uring are built
#     in; libaio is the one t/zbd uses), --disable-native because the guest runs under
#     TCG's `-cpu max`, not on this CPU; only the `fio` target, stripped (1.7 MB).
#   * checks: configure must report zoned block device support and libaio, and the
#     built fio's --version (run in the overlaid tree) must be its FIO-VERSION-GEN.
#
# Measured on the 2-CPU machine, four builds: 79-140 s in all while loaded (load average
# 4-5.5: other builds and guests running): apt-get update + build tools 25-36 s, source
# 0-1 s, configure 5-9 s, `make -j2 fio` 48-96 s; 37 s on the machine at rest (11, 1, 2,
# 23 s).  Once per tree (a fresh machine builds once), then cached: the next call prints
# the directory at once.
#
# Prints one line on stdout: a directory holding fio, t/zbd/, FIO-VERSION-GEN and
# SOURCE (one line: what it was built from and how).
# Cache: ${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}/fio-zbd, key FIO_KEY below (this
# script, the source version, the tree's stamp), flock.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAME=build-fio-zbd.sh
. "$HERE/build-common.sh"
[ $# -eq 2 ] || die "usage: $NAME TREE MIRROR"
TREE="$1"
MIRROR="$2"
CACHE="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}"
OUT="$CACHE/fio-zbd"
STAMP="$CACHE/fio-zbd.stamp"

# bookworm's fio: pinned, so that the key needs no network and a point release
# cannot change the binary under a cached key.
FIO_SUITE=bookworm
FIO_DEB=3.33-3
BUILD_DEPS="gcc make pkg-config libc6-dev libaio-dev zlib1g-dev dpkg-dev"
CONFIGURE_OPTS="--disable-native --disable-numa --disable-rdma --disable-rados --disable-rbd --disable-http
 --disable-gfapi --disable-pmem --disable-libzbc --disable-xnvme --disable-tcmalloc --disable-libnfs
 --disable-dfs --disable-lex"

[ -f "$CACHE/rich-root.stamp" ] || die "no $CACHE/rich-root.stamp: build the rich root first"
FIO_KEY="$(sha256sum "$0" | cut -c1-16) fio=$FIO_DEB/$FIO_SUITE tree=$(cat "$CACHE/rich-root.stamp")"

out_ok() { [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$FIO_KEY" ] && [ -x "$OUT/fio" ] && [ -f "$OUT/t/zbd/test-zbd-support" ]; }
if out_ok; then echo "$OUT"; exit 0; fi
[ "$(id -u)" -eq 0 ] || die "building fio in the rich root needs root (mount, chroot)"
mkdir -p "$CACHE"
exec 8>"$CACHE/.build-fio-zbd.lock"
flock 8
if out_ok; then echo "$OUT"; exit 0; fi

LOGF="$CACHE/build-fio-zbd.log"
: >"$LOGF"
W="$(mktemp -d /tmp/nvme-emu-fio-build.XXXXXX)"
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/upper" "$W/work" "$W/root"

# The job run in the overlaid tree (/bin/sh there is dash); prints its phases' times.
cat >"$W/inner.sh" <<EOF
set -eu
t=\$(date +%s)
phase() { n=\$(date +%s); echo "phase \$1: \$((n - t)) s"; t=\$n; }
printf 'Types: deb-src\nURIs: %s\nSuites: $FIO_SUITE\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \\
    '$MIRROR' >/etc/apt/sources.list.d/fio-src.sources
apt-get update
apt-get install -y $BUILD_DEPS
phase tools
mkdir -p /build && chown _apt /build && cd /build   # apt fetches as _apt
apt-get source fio=$FIO_DEB
cd fio-*/
phase source
./configure $(echo $CONFIGURE_OPTS) | tee /build/configure.out
grep -q '^Zoned block device support *yes' /build/configure.out || { echo "configure: no zoned block device support"; exit 1; }
grep -q '^Linux AIO support *yes' /build/configure.out || { echo "configure: no libaio"; exit 1; }
phase configure
make -j\$(nproc) fio
strip fio
phase make
v="\$(./fio --version)"
[ "\$v" = "\$(sed -n 's/^DEF_VER=//p' FIO-VERSION-GEN)" ] || { echo "the built fio says \$v, its source FIO-VERSION-GEN differs"; exit 1; }
echo "built \$v"
EOF

# Private mount namespace: the overlay and the binds vanish with it, even on failure.
# shellcheck disable=SC2016
build() {
    unshare -m --propagation private -- sh -ec '
        tree="$1" w="$2"
        mount -t overlay overlay -o "lowerdir=$tree,upperdir=$w/upper,workdir=$w/work" "$w/root"
        for d in dev proc sys; do mount --rbind "/$d" "$w/root/$d"; done
        mount -t tmpfs tmpfs "$w/root/tmp"
        cp -L /etc/resolv.conf "$w/root/etc/resolv.conf" 2>/dev/null || true
        cp "$w/inner.sh" "$w/root/tmp/inner.sh"
        chroot "$w/root" /usr/bin/env -i DEBIAN_FRONTEND=noninteractive LC_ALL=C \
            PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root /bin/sh /tmp/inner.sh
    ' sh "$TREE" "$W"
}

log "building fio $FIO_DEB ($FIO_SUITE source from $MIRROR) in the rich root, for t/zbd (log: $LOGF)"
t0=$SECONDS
if ! build >>"$LOGF" 2>&1; then
    tail -n 30 "$LOGF" >&2
    die "building fio $FIO_DEB failed (log: $LOGF)"
fi
src="$(ls -d "$W"/upper/build/fio-*/ | head -n1)"
want="$(sed -n 's/^DEF_VER=//p' "$src/FIO-VERSION-GEN")"
rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp/t"
cp "$src/fio" "$OUT.tmp/fio"
cp -a "$src/t/zbd" "$OUT.tmp/t/zbd"
cp "$src/FIO-VERSION-GEN" "$OUT.tmp/"
echo "Debian $FIO_SUITE fio $FIO_DEB source ($MIRROR), built in the rich root: configure $(echo $CONFIGURE_OPTS)" >"$OUT.tmp/SOURCE"
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "$FIO_KEY" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "fio $want built in $((SECONDS - t0)) s ($(grep '^phase ' "$LOGF" | tr '\n' ' '))"
echo "$OUT"
