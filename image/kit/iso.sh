#!/usr/bin/env bash
# iso.sh OUT.iso CMDLINE [PROOF]: an El Torito-only CD (no hybrid MBR, no EFI) that boots the
# guest kit through GRUB for BIOS: GRUB's El Torito image from Debian's grub-pc-bin (made
# with grub-mkimage), the kit's kernel and initrd, a grub.cfg booting them with CMDLINE at
# once (its menu on the console and COM1), /kit-cd-proof holding PROOF for the kit's
# cdrom task, and in /install what the kit's install task puts on a disk: GRUB's boot.img
# for the MBR, and a core.img that reads its grub.cfg from the disk's first MBR partition. Builds the kit first. Host tools: grub-mkimage (grub-common), grub-pc-bin's
# modules, xorriso; installed if missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
out=$1 cmdline=$2 proof=${3:-cd-proof}
ensure_tool grub-mkimage grub-common
if [ ! -e /usr/lib/grub/i386-pc/cdboot.img ]; then
    log "installing host package grub-pc-bin (GRUB's BIOS modules)"
    apt-get install -y grub-pc-bin >&2 || { apt_update && apt-get install -y grub-pc-bin >&2; } ||
        die "cannot install grub-pc-bin"
fi
ensure_tool xorriso xorriso
"$here/build.sh" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/iso/boot/grub"
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
grub-mkimage -O i386-pc-eltorito -p /boot/grub -o "$work/iso/boot/grub/eltorito.img" \
    biosdisk iso9660 normal linux serial terminal echo configfile test sleep
mkdir -p "$work/iso/install"
cp /usr/lib/grub/i386-pc/boot.img "$work/iso/install/"
grub-mkimage -O i386-pc -p '(hd0,msdos1)/boot/grub' -o "$work/iso/install/core.img" \
    biosdisk part_msdos ext2 normal linux serial terminal echo configfile test sleep
xorriso -as mkisofs -quiet -R -J -V ENSPEED_KIT -b boot/grub/eltorito.img -no-emul-boot \
    -boot-load-size 4 -boot-info-table -o "$out" "$work/iso" >&2
echo "$out"
