#!/usr/bin/env bash
# Builds the guest kit into $ENSPEED_CACHE/kit (default ~/.cache/enspeed/kit): Debian's own
# kernel, a busybox initramfs whose /init runs the kit.task= the command line asks for, and
# a blank ext4 disk. Every piece comes from .debs unpacked into the cache, never installed.
# Idempotent: rebuilds only when these scripts or the Debian package versions change.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"

# The drivers a guest of EnSpeed's VMM (or QEMU microvm) needs: virtio-mmio transport,
# disk, network, ext4 (its crc32c comes from the crypto API, so preload the generic one),
# the ACPI power button and evdev, through which acpid sees the button.
KIT_MODULES="virtio_mmio virtio_pci virtio_blk virtio_net virtio_input ahci sd_mod sr_mod isofs ext4 crc32c_generic button evdev"

ensure_tool dpkg-deb dpkg
ensure_tool cpio cpio
ensure_tool gzip gzip
ensure_tool mkfs.ext4 e2fsprogs

OUT=$CACHE/kit
mkdir -p "$CACHE/debs"

kpkg=$(kernel_package)
deb_resolve "$kpkg" busybox-static
inputs=$(printf '%s %s\n' "$kpkg" "$(deb_version "$kpkg")" busybox-static "$(deb_version busybox-static)" \
    e2fsprogs "$(dpkg-query -W -f='${Version}' e2fsprogs)" modules "$KIT_MODULES")
key=$(inputs_hash "$here/build.sh" "$here/lib.sh" "$here/init" "$here/acpi-power-button" <<<"$inputs")
if [ "$(cat "$OUT/.inputs" 2>/dev/null)" = "$key" ] &&
    [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ -s "$OUT/disk.ext4" ]; then
    log "up to date: $OUT"
    exit 0
fi

work=$(mktemp -d "$CACHE/.kit.XXXXXX")
trap 'rm -rf "$work"' EXIT
export MANIFEST_FILE=$work/out/MANIFEST
mkdir -p "$work/out" "$work/root"

kroot=$(deb_unpack "$kpkg")
bbroot=$(deb_unpack busybox-static)
kver=$(ls "$kroot/lib/modules")
printf 'kernel-release %s\n' "$kver" >>"$MANIFEST_FILE"
printf 'e2fsprogs(host) %s\n' "$(dpkg-query -W -f='${Version}' e2fsprogs)" >>"$MANIFEST_FILE"

cp "$kroot/boot/vmlinuz-$kver" "$work/out/vmlinuz"

root=$work/root
mkdir -p "$root"/{proc,sys,dev,mnt,tmp,etc/acpi/PWRF,var/run}
stage_busybox "$root" "$bbroot"
stage_modules "$root" "$kroot" "$bbroot/bin/busybox" $KIT_MODULES
printf '%s\n' $KIT_MODULES >"$root/etc/kit-modules"
install -m 0755 "$here/init" "$root/init"
install -m 0755 "$here/acpi-power-button" "$root/etc/acpi/PWRF/00000080"
{ cpio_dev_console; cpio_dir "$root"; } | gzip -n -9 >"$work/out/initrd.img"

# A blank filesystem for the disk task; mkfs on a plain file needs no root.
truncate -s 64M "$work/out/disk.ext4"
mkfs.ext4 -F -q -L kit "$work/out/disk.ext4" || die "mkfs.ext4 failed"

printf '%s\n' "$key" >"$work/out/.inputs"
rm -rf "$OUT"
mv "$work/out" "$OUT"
log "built $OUT: $(cd "$OUT" && du -h --apparent-size vmlinuz initrd.img disk.ext4 | tr -s '\t\n' ' ')"
