#!/usr/bin/env bash
# build.sh - build the LD_PRELOAD ioeventfd agent (ioeventfd_agent.c) with the host gcc.
#
# Prints, as the LAST line on stdout, the absolute path of libnvme-emu-agent.so:
#
#   ${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}/agent/<key>/libnvme-emu-agent.so
#
# <key> is the first 16 hex digits of sha256(source + compiler flags), so an edited source
# gets a new directory and an unchanged one is never rebuilt. Concurrent calls are
# serialised with flock; the .so is compiled to a temporary name and renamed into place.
# Compiler output goes to stderr. A .so built against the (older) bookworm glibc of the host
# also loads into the trixie chroot's QEMU (provide-qemu.sh): glibc is backward compatible.
#
# Usage: nvme_emu/agent/build.sh [--force]     (--force rebuilds even if cached)
set -euo pipefail

die() { echo "build.sh: error: $*" >&2; exit 1; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/ioeventfd_agent.c"
CC="${CC:-gcc}"
CFLAGS=(-O2 -g -fPIC -shared -pthread -fvisibility=hidden -Wall -Wextra -Werror=implicit-function-declaration)
LIBS=(-ldl)

force=0
for a in "$@"; do
    case "$a" in
        --force) force=1 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument: $a" ;;
    esac
done

[ -f "$src" ] || die "missing $src"
command -v "$CC" >/dev/null 2>&1 || die "$CC not found (install gcc)"

key="$( { cat "$src"; echo "${CFLAGS[*]} ${LIBS[*]}"; } | sha256sum | cut -c1-16)"
cache="${NVME_EMU_CACHE:-$HOME/.cache/nvme-emu}"
dir="$cache/agent/$key"
so="$dir/libnvme-emu-agent.so"

mkdir -p "$cache/agent"
exec 9>"$cache/agent/.lock"
flock 9

if [ "$force" -eq 1 ] || [ ! -s "$so" ]; then
    mkdir -p "$dir"
    tmp="$dir/.libnvme-emu-agent.so.$$"
    trap 'rm -f "$tmp"' EXIT
    "$CC" "${CFLAGS[@]}" -o "$tmp" "$src" "${LIBS[@]}" >&2 || die "compilation of $src failed"
    mv -f "$tmp" "$so"
    trap - EXIT
    echo "build.sh: built $so" >&2
fi

echo "$so"
