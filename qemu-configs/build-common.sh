# build-common.sh - shell functions the guest builders share (sourced, not run):
# build-guest.sh, build-rich-guest.sh, build-nested.sh and kvm-post-write/build-kvm.sh.
# The sourcing script sets NAME (its name, for messages) first; RUN (the
# chroot-run wrapper) and LOGF (its build log) before calling inch.
# The image builders' cache keys include this file, so editing it rebuilds the
# images (build-kvm.sh's modules do not depend on it: its key is the patch).

die() { echo "$NAME: error: $*" >&2; exit 1; }
log() { echo "$NAME: $*" >&2; }

inch() {   # run a command in the chroot, log its output, fail loudly
    if ! "$RUN" "$@" >>"$LOGF" 2>&1; then
        tail -n 30 "$LOGF" >&2
        die "command failed (log: $LOGF): $*"
    fi
}

download_package() {   # $1 = directory, $2... = packages (apt-get download in the chroot)
    local dir="$1"; shift
    mkdir -p "$dir"
    if ! "$RUN" sh -c "cd '$dir' && apt-get download $*" >>"$LOGF" 2>&1; then
        inch apt-get update
        inch sh -c "cd '$dir' && apt-get download $*"
    fi
}

unpack_module() {   # $1 = module file of a kernel package (.ko[.xz|.zst|.gz]), $2 = destination .ko
    case "$1" in
        *.ko.xz)  xz -dc "$1" >"$2" ;;
        *.ko.zst) zstd -qdc "$1" >"$2" ;;
        *.ko.gz)  gzip -dc "$1" >"$2" ;;
        *.ko)     cp "$1" "$2" ;;
        *) die "unexpected module file $1" ;;
    esac
}

pack_modules() {   # $1 = depmod'd kernel package tree, $2 = its version, $3 = destination dir,
    # $4 = list file, $5... = modules: each module and what it depends on (modprobe
    # --show-depends; what the kernel has built in is not listed) unpacked once into $3, and
    # named in $4 in load order (appended: a module already listed is skipped).
    local kpkg="$1" kver="$2" dest="$3" list="$4" deps verb path name m
    shift 4
    deps="$(mktemp)"
    for m in "$@"; do
        "$RUN" modprobe -d "$kpkg" -S "$kver" --show-depends "$m" 2>>"$LOGF" \
            || die "modprobe --show-depends $m failed (log: $LOGF)"
    done >"$deps"
    while read -r verb path _; do
        [ "$verb" = insmod ] || continue
        name="$(basename "$path")"; name="${name%.ko*}.ko"
        grep -qx "$name" "$list" && continue
        unpack_module "$path" "$dest/$name"
        echo "$name" >>"$list"
    done <"$deps"
    rm -f "$deps"
}

install_busybox() {   # $1 = chroot dir, $2 = initramfs tree: static busybox + applet links
    local chroot="$1" r="$2" app
    cp "$chroot/usr/bin/busybox" "$r/usr/bin/busybox"
    "$RUN" /usr/bin/busybox --list-full | while read -r app; do
        app="${app#/}"
        case "$app" in bin/*|sbin/*) app="usr/$app" ;; esac
        mkdir -p "$(dirname "$r/$app")"
        [ -e "$r/$app" ] || [ -L "$r/$app" ] || ln -s /usr/bin/busybox "$r/$app"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
    printf 'root:x:0:\n' >"$r/etc/group"
}

pack_initramfs() {   # $1 = tree, $2 = output: newc cpio, owned by root, gzip
    # Padded to 512 bytes with zeros so that nvme_emu.guest / nvme_emu.nested can
    # append a second (uncompressed) cpio at an aligned offset.
    local sz pad
    inch sh -c "cd '$1' && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6 >'$2'"
    sz=$(stat -c %s "$2")
    pad=$(( (512 - sz % 512) % 512 ))
    [ "$pad" -eq 0 ] || head -c "$pad" /dev/zero >>"$2"
}
