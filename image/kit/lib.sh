# shellcheck shell=bash
# Shared helpers for image/kit/build.sh, image/testhost/build.sh and image/testhost/run.sh.
# Sourced, not run. Everything Debian-specific (apt, dpkg-deb, newc cpio) lives here so the
# build scripts read as a list of what goes into each image.

CACHE=${ENSPEED_CACHE:-$HOME/.cache/enspeed}

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# Host tools are the one thing we may install on the host; everything that ends up inside an
# image comes from unpacked .debs instead.
ensure_tool() { # ensure_tool COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    log "installing host tool $2 (for $1)"
    apt-get install -y "$2" >&2 || { apt_update && apt-get install -y "$2" >&2; } ||
        die "cannot install host package $2 (needed for $1)"
    command -v "$1" >/dev/null 2>&1 || die "$2 installed but $1 is still not on PATH"
}

APT_UPDATED=
apt_update() {
    [ -n "$APT_UPDATED" ] && return 0
    log "apt-get update"
    apt-get update >&2 || die "apt-get update failed"
    APT_UPDATED=1
}

# deb_resolve PKG...: looks up the versions to unpack, all in one apt-cache call (each reads
# every package list, about 0.3 s), into DEB_VER: each package's newest version in Debian 12's
# own archives (bookworm and its security and point updates), never one from backports, even
# where this machine has installed a newer one from there (QEMU: scripts/setup.sh): the guests
# and the test host are Debian 12 as released. A fresh machine may have no package lists yet,
# so one apt-get update is tried before giving up.
declare -A DEB_VER=()
deb_resolve() {
    local pkg ver missing=()
    while read -r pkg ver; do
        if [ -n "$pkg" ]; then DEB_VER[$pkg]=$ver; fi
    done < <(apt-cache madison "$@" 2>/dev/null |
        awk -F'|' '$3 ~ / Packages$/ && $3 !~ /backports/ {
                       gsub(/ /, "", $1); gsub(/ /, "", $2)
                       if (!($1 in seen)) { seen[$1] = 1; print $1, $2 } }')
    for pkg in "$@"; do
        [ -n "${DEB_VER[$pkg]:-}" ] || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -z "$APT_UPDATED" ]; then
        apt_update
        deb_resolve "${missing[@]}"
        return
    fi
    die "no candidate version for Debian package(s) ${missing[*]} (check apt sources)"
}

# deb_version PKG: PKG's version to unpack (looked up unless deb_resolve already did).
deb_version() {
    [ -n "${DEB_VER[$1]:-}" ] || deb_resolve "$1"
    printf '%s\n' "${DEB_VER[$1]}"
}

# kernel_package: the unsigned image package that the linux-image-amd64 metapackage currently
# points at (e.g. linux-image-6.1.0-56-amd64-unsigned). Unsigned because we boot it directly,
# never through Secure Boot, and it holds the same bzImage and modules.
kernel_package() {
    local meta_ver dep
    meta_ver=$(deb_version linux-image-amd64)
    dep=$(apt-cache show "linux-image-amd64=$meta_ver" |
        sed -n 's/^Depends: .*\(linux-image-[0-9][^ ,]*-amd64\).*/\1/p' | head -n1)
    [ -n "$dep" ] || die "cannot find the kernel package that linux-image-amd64 $meta_ver depends on"
    printf '%s-unsigned\n' "$dep"
}

# deb_unpack PKG: downloads PKG's candidate .deb (once) and unpacks it (once) under
# $CACHE/debs; prints the unpacked directory. Appends "PKG VERSION" to $MANIFEST_FILE if set.
deb_unpack() {
    local pkg=$1 ver dir tmp
    ver=$(deb_version "$pkg")
    dir="$CACHE/debs/${pkg}_${ver//:/%3a}"
    if [ ! -d "$dir/root" ]; then
        tmp=$(mktemp -d "$CACHE/debs/.tmp.XXXXXX")
        log "downloading $pkg $ver"
        # apt runs its download as user _apt when it can; a root-owned temp dir is fine either way.
        if ! (cd "$tmp" && apt-get -o APT::Sandbox::User=root download "$pkg=$ver" >&2); then
            apt_update
            (cd "$tmp" && apt-get -o APT::Sandbox::User=root download "$pkg=$ver" >&2) || { rm -rf "$tmp"; die "apt-get download $pkg=$ver failed"; }
        fi
        mkdir "$tmp/root"
        dpkg-deb -x "$tmp"/*.deb "$tmp/root" || { rm -rf "$tmp"; die "dpkg-deb -x failed for $pkg $ver"; }
        rm -f "$tmp"/*.deb
        rm -rf "$dir"
        mv "$tmp" "$dir"
    fi
    [ -z "${MANIFEST_FILE:-}" ] || printf '%s %s\n' "$pkg" "$ver" >>"$MANIFEST_FILE"
    printf '%s\n' "$dir/root"
}

# stage_busybox ROOT BUSYBOX_PKG_ROOT: busybox plus one symlink per applet, made at build
# time so /init does not spend boot time on `busybox --install`.
stage_busybox() {
    local root=$1 bb=$2/bin/busybox applet
    [ -x "$bb" ] || die "no bin/busybox in $2"
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    cp "$bb" "$root/bin/busybox"
    for applet in $("$bb" --list-full); do
        [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
    done
}

# stage_modules ROOT KERNEL_PKG_ROOT BUSYBOX MODULE...: copies MODULEs and everything they
# depend on into ROOT/lib/modules/KVER. Dependencies come from the modules.dep that busybox
# depmod writes for the unpacked kernel, since the .deb ships none. depmod is then run on
# the subset too, so busybox modprobe inside the image (and the kernel's request_module)
# resolve names and load order.
stage_modules() {
    local root=$1 kroot=$2 busybox=$3; shift 3
    local kver moddir dep m line closure=() seen=" "
    kver=$(ls "$kroot/lib/modules")
    [ "$(printf '%s\n' "$kver" | wc -l)" = 1 ] || die "expected one kernel version in $kroot/lib/modules, found: $kver"
    moddir="$kroot/lib/modules/$kver"
    # The marker tells a complete modules.dep from one a killed earlier run left half written.
    if [ ! -e "$moddir/.depmod-done" ]; then
        "$busybox" depmod -b "$kroot" "$kver" || die "busybox depmod failed on $kroot"
        touch "$moddir/.depmod-done"
    fi
    for m in "$@"; do
        # modules.dep keys are paths; module names treat - and _ alike.
        line=$(awk -v want="$m" '
            { name = $1; sub(/:$/, "", name); sub(/.*\//, "", name); sub(/\.ko$/, "", name)
              gsub(/-/, "_", name); w = want; gsub(/-/, "_", w)
              if (name == w) { print; exit } }' "$moddir/modules.dep")
        [ -n "$line" ] || die "kernel module $m not found in $moddir/modules.dep"
        for dep in $line; do
            dep=${dep%:}
            case "$seen" in *" $dep "*) continue ;; esac
            seen="$seen$dep "
            closure+=("$dep")
        done
    done
    for dep in "${closure[@]}"; do
        mkdir -p "$root/lib/modules/$kver/$(dirname "$dep")"
        cp "$moddir/$dep" "$root/lib/modules/$kver/$dep"
    done
    "$busybox" depmod -b "$root" "$kver" || die "busybox depmod failed on the staged modules"
}

# stage_elf ROOT FILE DEST: copies an executable to ROOT/DEST with every shared library ldd
# reports. Libraries keep their soname file name but land in the real (merged-/usr) directory,
# so archives appended later never try to replace the image's lib -> usr/lib symlinks.
stage_elf() {
    local root=$1 file=$2 dest=$3 out lib dir
    mkdir -p "$root/$(dirname "$dest")"
    cp -L "$file" "$root/$dest"
    if ! out=$(ldd "$file" 2>&1); then
        case "$out" in *"not a dynamic executable"*|*"statically linked"*) return 0 ;; esac
        die "ldd $file failed: $out"
    fi
    if grep -q 'not found' <<<"$out"; then
        die "ldd $file: missing libraries on this host: $(grep 'not found' <<<"$out" | tr -s ' \t\n' ' ')"
    fi
    for lib in $(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$out"); do
        dir=$(realpath "$(dirname "$lib")")
        mkdir -p "$root$dir"
        cp -L "$lib" "$root$dir/$(basename "$lib")"
    done
}

# cpio_dev_console: a tiny newc archive holding /dev/console, written by hand so that no root
# (mknod) is needed. The kernel opens /dev/console for /init before /init can mount devtmpfs;
# without this node /init would start with no stdout.
cpio_dev_console() {
    local ino=1 name entry
    for entry in "dev 040755 0 0" "dev/console 020600 5 1" "TRAILER!!! 0 0 0"; do
        set -- $entry
        name=$1
        # newc: magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        # rdevmajor, rdevminor, namesize, check; then the name, NUL, padded to 4 bytes.
        printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
            "$ino" "$((8#$2))" 0 0 1 0 0 0 0 "$3" "$4" "$(( ${#name} + 1 ))" 0
        printf '%s\0' "$name"
        # header is 110 bytes; pad header+name+NUL up to a multiple of 4
        head -c $(( (4 - (110 + ${#name} + 1) % 4) % 4 )) /dev/zero
        ino=$((ino + 1))
    done
}

# cpio_dir DIR: a newc archive of DIR's contents on stdout: owned by root, in a stable order,
# mtimes set to 0, so the same inputs give the same archive. (Changes DIR's mtimes.)
cpio_dir() {
    (cd "$1" && find . -mindepth 1 -exec touch -h -d @0 {} + &&
        find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) ||
        die "cpio failed on $1"
}

# cpio_cat FILE...: concatenates archives (plain or compressed), each padded with zeros to a
# 4-byte boundary: the kernel only recognises a following archive's header there.
cpio_cat() {
    local f size
    for f in "$@"; do
        cat "$f"
        size=$(stat -c %s "$f")
        head -c $(( (4 - size % 4) % 4 )) /dev/zero
    done
}

# inputs_hash FILE...: one hash over file contents and the extra text on stdin, used as the
# cache key of a build; rebuilding happens only when it changes.
inputs_hash() {
    { cat; cat "$@"; } | sha256sum | cut -d' ' -f1
}
