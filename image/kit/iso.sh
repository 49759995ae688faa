#!/usr/bin/env bash
# iso.sh [--uefi] OUT.iso CMDLINE [PROOF]: an El Torito-only CD (no hybrid MBR) that boots the
# guest kit through GRUB: the kit's kernel and initrd, a grub.cfg booting them with CMDLINE at
# once (its menu on the console and COM1), /kit-cd-proof holding PROOF for the kit's cdrom
# task, and in /install what the kit's install task puts on a disk.
#
#   BIOS (default): GRUB's El Torito image from Debian's grub-pc-bin (made with grub-mkimage);
#     /install has GRUB's boot.img for the MBR and a core.img that reads its grub.cfg from the
#     disk's first MBR partition.
#   --uefi: only an EFI El Torito entry, a FAT image holding GRUB for UEFI (grub-efi-amd64-bin)
#     as EFI/BOOT/BOOTX64.EFI; /install has esp.img, an EFI system partition whose GRUB looks
#     for the installed system's grub.cfg on the partition holding /kit-proof.
#
# Builds the kit first. Host tools: grub-mkimage (grub-common), grub-pc-bin's or
# grub-efi-amd64-bin's modules, xorriso, mtools for the FAT images; installed if missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
firmware=bios
if [ "${1:-}" = --uefi ]; then
    firmware=uefi
    shift
fi
out=$1 cmdline=$2 proof=${3:-cd-proof}
ensure_tool grub-mkimage grub-common
ensure_file() { # ensure_file PATH DEBIAN-PACKAGE
    [ -e "$1" ] && return 0
    log "installing host package $2 (for $1)"
    apt-get install -y "$2" >&2 || { apt_update && apt-get install -y "$2" >&2; } ||
        die "cannot install $2"
}
if [ $firmware = bios ]; then
    ensure_file /usr/lib/grub/i386-pc/cdboot.img grub-pc-bin
else
    ensure_file /usr/lib/grub/x86_64-efi/linux.mod grub-efi-amd64-bin
    ensure_tool mformat mtools
fi
ensure_tool xorriso xorriso
"$here/build.sh" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/iso/boot/grub" "$work/iso/install"
cp "$CACHE/kit/vmlinuz" "$CACHE/kit/initrd.img" "$work/iso/"
printf '%s\n' "$proof" >"$work/iso/kit-cd-proof"
cat >"$work/iso/boot/grub/grub.cfg" <<CFG
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=1
menuentry "EnSpeed kit" {
    echo "GRUB: loading the kit"
    linux /vmlinuz $cmdline
    initrd /initrd.img
}
CFG
modules="normal linux serial terminal echo configfile test sleep"

# fat_image OUT EFI-BINARY: a FAT file system holding EFI-BINARY as EFI/BOOT/BOOTX64.EFI, the
# path UEFI firmware boots from removable media and from a disk with no boot entries.
fat_image() {
    local size_kib
    size_kib=$(( ($(stat -c %s "$2") / 1024 + 512) / 64 * 64 + 64 ))
    truncate -s "${size_kib}K" "$1"
    mformat -i "$1" -T $((size_kib * 2)) -h 2 -s 32 :: >&2
    mmd -i "$1" ::/EFI ::/EFI/BOOT
    mcopy -i "$1" "$2" ::/EFI/BOOT/BOOTX64.EFI
}

if [ $firmware = bios ]; then
    grub-mkimage -O i386-pc-eltorito -p /boot/grub -o "$work/iso/boot/grub/eltorito.img" \
        biosdisk iso9660 $modules
    cp /usr/lib/grub/i386-pc/boot.img "$work/iso/install/"
    grub-mkimage -O i386-pc -p '(hd0,msdos1)/boot/grub' -o "$work/iso/install/core.img" \
        biosdisk part_msdos ext2 $modules
    boot=(-b boot/grub/eltorito.img -no-emul-boot -boot-load-size 4 -boot-info-table)
else
    # GRUB for UEFI finds its files by a file only that medium has, whatever the firmware
    # numbers its devices.
    printf 'search --no-floppy --file --set=root /kit-cd-proof\nset prefix=($root)/boot/grub\n' \
        >"$work/cd.cfg"
    grub-mkimage -O x86_64-efi -c "$work/cd.cfg" -p /boot/grub -o "$work/cd.efi" \
        part_msdos iso9660 search search_fs_file efi_gop $modules
    fat_image "$work/iso/boot/efiboot.img" "$work/cd.efi"
    printf 'search --no-floppy --file --set=root /kit-proof\nset prefix=($root)/boot/grub\n' \
        >"$work/disk.cfg"
    grub-mkimage -O x86_64-efi -c "$work/disk.cfg" -p /boot/grub -o "$work/disk.efi" \
        part_msdos ext2 search search_fs_file efi_gop $modules
    fat_image "$work/iso/install/esp.img" "$work/disk.efi"
    boot=(-e boot/efiboot.img -no-emul-boot)
fi
xorriso -as mkisofs -quiet -R -J -V ENSPEED_KIT "${boot[@]}" -o "$out" "$work/iso" >&2
echo "$out"
