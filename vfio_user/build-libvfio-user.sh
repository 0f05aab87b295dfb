#!/usr/bin/env bash
# build-libvfio-user.sh SOURCE - build (once, cached) nutanix/libvfio-user for the
# libvfio-user backend (vfio_user/libvfio/), from a source tarball or a source directory.
#
# The build is out of tree (the source is never written to), with -Dshadow-ioeventfd=true,
# into ${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}/libvfio-user/<key>, where <key> hashes the
# source (the tarball's bytes, or every file of the directory but .git/) and this script.
# A second call with the same source only prints the path. The newest build is linked as
# .../libvfio-user/current, which vfio_user/libvfio/library.py searches; prints the path of
# libvfio-user.so.0 on its last line of stdout.
#
# Needs meson, ninja, pkg-config, json-c and cmocka headers (./dev installs the Debian
# packages before calling this). Concurrent calls serialise on a lock file.
set -euo pipefail

die() { echo "build-libvfio-user: $*" >&2; exit 1; }
log() { echo "build-libvfio-user: $*" >&2; }

SRC="${1:?usage: build-libvfio-user.sh TARBALL|SOURCE_DIR}"
[ -e "$SRC" ] || die "$SRC does not exist"
SRC="$(cd "$(dirname "$SRC")" && pwd)/$(basename "$SRC")"
CACHE="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}/libvfio-user"
mkdir -p "$CACHE"

source_hash() {
    # What identifies the source: a tarball's bytes, or a directory's file names + contents.
    if [ -f "$SRC" ]; then
        sha256sum <"$SRC"
    elif [ -d "$SRC" ]; then
        [ -f "$SRC/meson.build" ] || die "$SRC has no meson.build: not a libvfio-user source tree"
        (cd "$SRC" && find . -path ./.git -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum
    else
        die "$SRC is neither a file nor a directory"
    fi
}

KEY="$( { source_hash; sha256sum <"$0"; } | sha256sum | cut -c1-16)"
OUT="$CACHE/$KEY"
LIB="$OUT/lib/libvfio-user.so.0"

publish() {
    # Point "current" at this build (atomic rename), then report the library's path.
    ln -sfn "$KEY" "$CACHE/.current.$$"
    mv -T "$CACHE/.current.$$" "$CACHE/current"
    echo "$LIB"
}

[ -f "$OUT/ok" ] && [ -f "$LIB" ] && { publish; exit 0; }

exec 9>"$CACHE/.lock"
flock 9
[ -f "$OUT/ok" ] && [ -f "$LIB" ] && { publish; exit 0; }

for tool in meson ninja pkg-config; do
    command -v "$tool" >/dev/null || die "$tool is missing (Debian: meson ninja-build pkg-config libjson-c-dev libcmocka-dev)"
done

W="$(mktemp -d "$CACHE/.work.XXXXXX")"
trap 'rm -rf "$W"' EXIT
LOGF="$CACHE/build-$KEY.log"
t0=$SECONDS
log "building libvfio-user from $SRC (key $KEY, log $LOGF)"
if [ -f "$SRC" ]; then
    mkdir "$W/src"
    tar -xf "$SRC" -C "$W/src" || die "cannot unpack $SRC"
    # A release tarball holds one top directory; accept a flat one too.
    top="$(find "$W/src" -mindepth 1 -maxdepth 2 -name meson.build -printf '%h\n' | sort | head -n1)"
    [ -n "$top" ] || die "$SRC holds no meson.build: not a libvfio-user source tarball"
else
    top="$SRC"
fi

rm -rf "$OUT"
{
    meson setup "$W/build" "$top" --prefix="$OUT" --libdir=lib --buildtype=release \
        -Dshadow-ioeventfd=true -Dtran-pipe=false -Dclient-server-test=false &&
        ninja -C "$W/build" &&
        meson install -C "$W/build" --no-rebuild
} >"$LOGF" 2>&1 || { tail -n 30 "$LOGF" >&2; die "build failed (full log: $LOGF)"; }
[ -f "$LIB" ] || die "the build installed no $LIB (see $LOGF)"
touch "$OUT/ok"
log "built $LIB in $((SECONDS - t0)) s"
publish
