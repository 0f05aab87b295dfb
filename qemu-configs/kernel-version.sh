#!/usr/bin/env bash
# kernel-version.sh - print the version (e.g. 6.12.117+deb13-amd64) of the Debian
# trixie kernel every guest of this project boots: the package that trixie's
# linux-image-amd64 depends on, resolved in the provide-qemu.sh chroot.
# build-guest.sh, build-nested.sh and kvm-post-write/build-kvm.sh all use it, so
# the guest kernel, the nested L1 kernel and the rebuilt KVM modules match.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}"
"$HERE/provide-qemu.sh" --chroot >/dev/null || { echo "kernel-version.sh: provide-qemu.sh failed" >&2; exit 1; }
RUN="$CACHE/bin/chroot-run"
resolve() {
    "$RUN" apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: linux-image-\([^ ]*\)$/\1/p' | head -n1
}
KVER="$(resolve)"
if [ -z "$KVER" ]; then
    "$RUN" apt-get update >/dev/null 2>&1 || true
    KVER="$(resolve)"
fi
[ -n "$KVER" ] || { echo "kernel-version.sh: cannot resolve linux-image-amd64 in the chroot" >&2; exit 1; }
echo "$KVER"
