#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario ... --enspeed PATH --extra
# uefi-virtio.iso --extra uefi-sata.iso): the install from CD of enspeed-firmware-install.sh,
# through UEFI. OVMF (Debian's OVMF.fd) finds no boot loader on the blank disk and boots the
# UEFI-only CD (on the SATA CD-ROM drive): its El Torito EFI image, GRUB for UEFI; the kit on
# the CD installs itself onto the disk (an EFI system partition with GRUB, ext2 with kernel,
# initrd and grub.cfg) and powers off. Then OVMF boots the installed disk, with no CD-ROM
# drive. Onto a virtio disk, then onto a bus=sata disk. One vCPU: with two, the test host's
# QEMU 7.2 aborts far more often under OVMF. Run by scripts/drill-uefi.sh, not by ./test.sh
# (see there why).
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
for iso in uefi-virtio.iso uefi-sata.iso; do
    [ -f "/usr/local/bin/$iso" ] || { echo "FAIL: no $iso: give run.sh --extra"; exit 2; }
done

vmm() { # vmm NAME DISK-OPTIONS [VMM-ARGUMENTS...]: one power-on, until the guest powers off
    name=$1 opts=$2
    shift 2
    run_guest "$name" 280 "$ENSPEED" vmm --firmware uefi --memory 512 --vcpus 1 \
        --disk "/tmp/disk-$bus.img$opts" --serial stdout "$@" ||
        fail "$name: enspeed vmm exited with $? (expected 0 when the guest powers off)"
}

for bus in virtio sata; do
    opts=""
    [ $bus = sata ] && opts=",bus=sata"
    rm -f "/tmp/disk-$bus.img"
    truncate -s 96M "/tmp/disk-$bus.img"
    vmm "uefi-install-$bus" "$opts" --cdrom "/usr/local/bin/uefi-$bus.iso"
    expect "uefi-install-$bus" "GRUB: loading the kit"
    expect "uefi-install-$bus" "KIT: install ok onto"
    expect "uefi-install-$bus" "KIT: poweroff"
    expect_not "uefi-install-$bus" "KIT: FAIL"

    vmm "uefi-installed-$bus" "$opts"
    expect "uefi-installed-$bus" "GRUB: booting the installed system"
    expect "uefi-installed-$bus" "KIT: installed proof=uefi-installed-$bus"
    expect "uefi-installed-$bus" "KIT: poweroff"
    expect_not "uefi-installed-$bus" "KIT: FAIL"
    bench "enspeed-uefi-installed-to-init-$bus" "uefi-installed-$bus" "KIT: init reached"
done

finish enspeed-firmware-uefi
