#!/usr/bin/env bash
# installer-iso.sh OUT.iso: Debian's own installer on an El Torito-only CD (no hybrid MBR),
# for the graphical console's test: the kernel and initrd of the graphical installer from
# Debian's debian-installer-12-netboot-amd64 package, booted by GRUB for BIOS in a VBE mode
# (1024x768, 16 bits a pixel) that Linux keeps as its framebuffer, where the installer draws.
# GRUB's menu shows on the screen and on COM1; the kernel's messages go to COM1 as well.
#
# Host tools, installed if missing: the installer package, grub-mkimage (grub-common) with
# grub-pc-bin's modules, xorriso.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/lib.sh"
out=$1
images=/usr/lib/debian-installer/images/12/amd64/gtk/debian-installer/amd64
ensure_file() { # ensure_file PATH DEBIAN-PACKAGE
    [ -e "$1" ] && return 0
    log "installing host package $2 (for $1)"
    apt-get install -y "$2" >&2 || { apt_update && apt-get install -y "$2" >&2; } ||
        die "cannot install $2"
}
ensure_file "$images/initrd.gz" debian-installer-12-netboot-amd64
ensure_file /usr/lib/grub/i386-pc/cdboot.img grub-pc-bin
ensure_tool grub-mkimage grub-common
ensure_tool xorriso xorriso
# Made once per version of its inputs.
stamp="$(stat -c '%s %Y' "$images/initrd.gz" "$images/linux" "$0" | tr '\n' ' ')"
if [ -s "$out" ] && [ "$(cat "$out.inputs" 2>/dev/null)" = "$stamp" ]; then
    echo "$out"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/iso/boot/grub"
cp "$images/linux" "$images/initrd.gz" "$work/iso/"
cat >"$work/iso/boot/grub/grub.cfg" <<'CFG'
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
set timeout=3
insmod vbe
insmod video_bochs
set gfxpayload=1024x768x16
menuentry "Graphical install" {
    echo "GRUB: loading Debian's installer"
    linux /linux console=tty0 --- quiet
    initrd /initrd.gz
}
CFG
modules="normal linux serial terminal echo configfile test sleep vbe video_bochs video gfxterm"
grub-mkimage -O i386-pc-eltorito -p /boot/grub -o "$work/iso/boot/grub/eltorito.img" \
    biosdisk iso9660 $modules
xorriso -as mkisofs -quiet -R -J -V DEBIAN_INSTALLER \
    -b boot/grub/eltorito.img -no-emul-boot -boot-load-size 4 -boot-info-table \
    -o "$out" "$work/iso" >&2
printf '%s' "$stamp" >"$out.inputs"
echo "$out"
