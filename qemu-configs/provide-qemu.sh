#!/usr/bin/env bash
# provide-qemu.sh - make a QEMU >= 10.1 with the `vfio-user-pci` device available.
#
# Prints, as the LAST line on stdout, the absolute path of an executable that
# behaves like qemu-system-x86_64 (all arguments and the exit status are passed
# through).  Progress messages go to stderr, and only while building.
#
#   * If the host's own qemu-system-x86_64 is >= 10.1 and lists vfio-user-pci,
#     its path is printed and nothing is built.
#   * Otherwise a Debian trixie chroot is built once (debootstrap, QEMU from
#     trixie-backports with its rbd block driver (qemu-block-extra), plus
#     fio/nvme-cli/busybox/... used by build-guest.sh)
#     and cached under ${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}.  The printed
#     wrapper ($CACHE/bin/qemu-system-x86_64) runs QEMU inside that chroot in a
#     private mount namespace (unshare -m) in which /dev, /proc, /sys, /tmp,
#     /run and $CACHE are bind-mounted at the same paths, so nothing leaks into
#     the host's mount table and paths under those directories are identical
#     inside and outside.  Extra host directories can be made visible with
#     NVME_EMU_BIND=/dir1:/dir2 (set by nvme_emu.guest for image files).
#     $CACHE/bin/qemu-img and $CACHE/bin/chroot-run (any command) work alike.
#
# Options:  --chroot   print the chroot directory instead (builds it if needed;
#                      build-guest.sh uses this).  --no-system   ignore the host
#                      QEMU even if it is new enough.
# The Debian mirror is read from the host's apt configuration, never hard-coded.
# Safe to call concurrently (flock); the build goes to DIR.tmp and is renamed.
set -euo pipefail

die() { echo "provide-qemu.sh: error: $*" >&2; exit 1; }
log() { echo "provide-qemu.sh: $*" >&2; }

STAMP_KEY="v1 trixie qemu-from-backports tools=fio,nvme-cli,busybox-static,cpio,kmod,xz-utils,zstd,file"
CACHE="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}"
ROOT="$CACHE/trixie-root"
STAMP="$CACHE/trixie-root.stamp"
BIN="$CACHE/bin"

want_chroot=0
use_system=1
for a in "$@"; do
    case "$a" in
        --chroot) want_chroot=1 ;;
        --no-system) use_system=0 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) die "unknown argument: $a" ;;
    esac
done

# --- 1. the host's QEMU, if good enough -------------------------------------
system_qemu_ok() {
    local q v major minor
    q="$(command -v qemu-system-x86_64 2>/dev/null)" || return 1
    v="$("$q" --version 2>/dev/null | sed -n 's/.*version \([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2/p' | head -n1)"
    [ -n "$v" ] || return 1
    read -r major minor <<<"$v"
    if [ "$major" -lt 10 ] || { [ "$major" -eq 10 ] && [ "$minor" -lt 1 ]; }; then
        return 1
    fi
    "$q" -machine none -device help 2>/dev/null | grep -q '"vfio-user-pci"' || return 1
    echo "$q"
}

if [ "$want_chroot" -eq 0 ] && [ "$use_system" -eq 1 ] && q="$(system_qemu_ok)"; then
    echo "$q"
    exit 0
fi

# Run a command inside the chroot at $1, with /dev /proc /sys in a private mount
# namespace (nothing to clean up afterwards): the build's and the cached chroot's.
in_chroot() {
    unshare -m --propagation slave -- sh -ec '
        r="$1"; shift
        for d in dev proc sys; do mount --rbind "/$d" "$r/$d"; mount --make-rslave "$r/$d"; done
        exec chroot "$r" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
    ' sh "$@"
}

# --- 2. fast path: cached chroot --------------------------------------------
cached_ok() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ] \
        && [ -x "$BIN/qemu-system-x86_64" ] && [ -x "$ROOT/usr/bin/qemu-system-x86_64" ]
}
print_result() {
    if [ "$want_chroot" -eq 1 ]; then echo "$ROOT"; else echo "$BIN/qemu-system-x86_64"; fi
}
# QEMU's rbd block driver (block-rbd.so, Debian's qemu-block-extra: `-drive driver=rbd`, the
# peer of the rbd: namespaces in bench/netstore_fio.py) came after the chroot did: a cached
# chroot without it gets it added in place (same QEMU version, ~2 MB with librbd), not rebuilt.
# The build below installs it with QEMU, so a fresh machine and an old cache end up alike.
block_rbd_ok() { compgen -G "$ROOT/usr/lib/*/qemu/block-rbd.so" >/dev/null; }
add_block_rbd() {
    local ver logf="$CACHE/provide-qemu-block-extra.log"
    ver="$(chroot "$ROOT" dpkg-query -W -f='${Version}' qemu-system-x86)" || return 1
    : >"$logf"
    in_chroot "$ROOT" apt-get update >>"$logf" 2>&1 \
        && in_chroot "$ROOT" apt-get install -y --no-install-recommends "qemu-block-extra=$ver" >>"$logf" 2>&1 \
        && in_chroot "$ROOT" apt-get clean >>"$logf" 2>&1 \
        && block_rbd_ok \
        || { tail -n 20 "$logf" >&2; return 1; }
}
if cached_ok && ! block_rbd_ok; then
    if [ "$(id -u)" -eq 0 ]; then
        exec 9>"$CACHE/.provide-qemu.lock"
        flock 9
        if ! block_rbd_ok; then
            log "adding QEMU's rbd block driver (qemu-block-extra) to the cached chroot"
            add_block_rbd || log "warning: could not add qemu-block-extra (log: $CACHE/provide-qemu-block-extra.log); QEMU has no rbd driver"
        fi
        exec 9>&-
    else
        log "warning: the cached chroot has no QEMU rbd driver (qemu-block-extra); run once as root to add it"
    fi
fi
if cached_ok; then
    print_result
    exit 0
fi

# --- 3. build (serialised) ----------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "building the QEMU chroot needs root (debootstrap, chroot, mount)"
mkdir -p "$CACHE"
exec 9>"$CACHE/.provide-qemu.lock"
flock 9
if cached_ok; then      # somebody else built it while we waited
    print_result
    exit 0
fi

# The mirror: first non-security URI of the host's apt sources.
find_mirror() {
    local f u
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        u="$(sed -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n' | grep -v -- '-security' | grep -E '^https?://' | head -n1 || true)"
        [ -n "$u" ] && { echo "$u"; return 0; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        u="$(sed -n 's/^[[:space:]]*deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\(https\?:\/\/[^[:space:]]*\).*/\2/p' "$f" \
             | grep -v -- '-security' | head -n1 || true)"
        [ -n "$u" ] && { echo "$u"; return 0; }
    done
    return 1
}
MIRROR="$(find_mirror)" || die "no Debian mirror found in /etc/apt/sources.list{,.d/*}"
MIRROR="${MIRROR%/}"

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap on the host"
    apt-get update -qq >"$CACHE/apt-host.log" 2>&1 || { cat "$CACHE/apt-host.log" >&2; die "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >>"$CACHE/apt-host.log" 2>&1 \
        || { tail -n 30 "$CACHE/apt-host.log" >&2; die "cannot install debootstrap"; }
fi

TMP="$ROOT.tmp"
# Never rm -rf a tree with something mounted inside.
if grep -q " $TMP[/ ]" /proc/mounts || grep -q " $ROOT[/ ]" /proc/mounts; then
    die "something is mounted under $TMP or $ROOT; unmount it first"
fi
rm -rf "$TMP"

LOGF="$CACHE/provide-qemu.log"
: >"$LOGF"
run_logged() {
    if ! "$@" >>"$LOGF" 2>&1; then
        tail -n 30 "$LOGF" >&2
        die "command failed (full log: $LOGF): $*"
    fi
}

t0=$SECONDS
log "debootstrap trixie from $MIRROR into $TMP (log: $LOGF)"
run_logged debootstrap --variant=minbase trixie "$TMP" "$MIRROR"

cat >"$TMP/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: trixie trixie-updates trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
rm -f "$TMP/etc/apt/sources.list"
cat >"$TMP/etc/apt/apt.conf.d/99nvme-emu" <<'EOF'
Acquire::Check-Valid-Until "false";
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
printf '#!/bin/sh\nexit 101\n' >"$TMP/usr/sbin/policy-rc.d"
chmod +x "$TMP/usr/sbin/policy-rc.d"
cp -L /etc/resolv.conf "$TMP/etc/resolv.conf" 2>/dev/null || true

# Run a command inside the chroot being built.
in_tmp_chroot() { in_chroot "$TMP" "$@"; }

log "installing QEMU (trixie-backports) and guest-build tools"
run_logged in_tmp_chroot apt-get update
run_logged in_tmp_chroot apt-get install -y -t trixie-backports qemu-system-x86 qemu-utils qemu-block-extra
run_logged in_tmp_chroot apt-get install -y fio nvme-cli busybox-static cpio kmod xz-utils zstd file
run_logged in_tmp_chroot apt-get clean

[ -x "$TMP/usr/bin/qemu-system-x86_64" ] || die "qemu-system-x86_64 missing after install"

# Publish the tree.
rm -rf "$ROOT"
mv "$TMP" "$ROOT"

# Wrappers.  chroot-run: run any command of the chroot with the host's
# /dev /proc /sys /tmp /run (+ $CACHE, + $NVME_EMU_BIND) at identical paths.
mkdir -p "$BIN"
cat >"$BIN/chroot-run.tmp" <<EOF
#!/bin/sh
# Generated by nvme-emu qemu-configs/provide-qemu.sh: run a program of the
# trixie chroot $ROOT in a private mount namespace.
ROOT='$ROOT'
CACHE='$CACHE'
EOF
cat >>"$BIN/chroot-run.tmp" <<'EOF'
[ $# -ge 1 ] || { echo "usage: $0 PROGRAM [ARGS...]" >&2; exit 2; }
exec unshare -m --propagation slave -- /bin/sh -c '
    set -e
    root="$1"; cache="$2"; shift 2
    for d in /dev /proc /sys /tmp /run; do
        [ -d "$d" ] || continue
        mkdir -p "$root$d"
        mount --rbind "$d" "$root$d"
        mount --make-rslave "$root$d"
    done
    old_ifs="$IFS"; IFS=:
    for d in $cache $NVME_EMU_BIND; do
        IFS="$old_ifs"
        [ -n "$d" ] && [ -d "$d" ] || continue
        case "$d" in /|/dev|/proc|/sys|/tmp|/run|/usr|/usr/*|/bin|/bin/*|/lib*|/etc|/etc/*|/var|/sbin) continue ;; esac
        mkdir -p "$root$d"
        mount --rbind "$d" "$root$d"
        mount --make-rslave "$root$d"
    done
    IFS="$old_ifs"
    wd="$(pwd)"
    exec chroot "$root" /bin/sh -c "cd \"\$0\" 2>/dev/null || cd /; exec \"\$@\"" "$wd" "$@"
' chroot-run "$ROOT" "$CACHE" "$@"
EOF
chmod +x "$BIN/chroot-run.tmp"
mv "$BIN/chroot-run.tmp" "$BIN/chroot-run"
for prog in qemu-system-x86_64 qemu-img; do
    printf '#!/bin/sh\nexec "%s" /usr/bin/%s "$@"\n' "$BIN/chroot-run" "$prog" >"$BIN/$prog.tmp"
    chmod +x "$BIN/$prog.tmp"
    mv "$BIN/$prog.tmp" "$BIN/$prog"
done

"$BIN/qemu-system-x86_64" -machine none -device help 2>/dev/null | grep -q '"vfio-user-pci"' \
    || die "chroot QEMU does not list vfio-user-pci"
echo "$STAMP_KEY" >"$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
log "done in $((SECONDS - t0)) s: $("$BIN/qemu-system-x86_64" --version | head -n1)"
print_result
