#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario ... --enspeed PATH --extra
# kit-virtio.iso --extra kit-sata.iso): the unmodified Debian kernel, booted the way an
# installer is: SeaBIOS boots GRUB from an El Torito-only CD in the SATA CD-ROM drive, GRUB
# loads the kit from the CD, and Linux's own drivers then find everything on PCI: virtio-blk
# (virtio-pci with MSI-X), the AHCI controller (with MSI) and its CD-ROM, which the kit mounts.
# Twice: the kit's disk on virtio, then on SATA (bus=sata, /dev/sda).
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
for iso in kit-virtio.iso kit-sata.iso; do
    [ -f "/usr/local/bin/$iso" ] || { echo "FAIL: no $iso: give run.sh --extra"; exit 2; }
done

boot() { # boot NAME ISO DISK-OPTIONS
    cp "$KIT/disk.ext4" "/tmp/$1.ext4"
    run_guest "$1" 170 "$ENSPEED" vmm --memory 512 --vcpus 2 --disk "/tmp/$1.ext4$3" \
        --cdrom "/usr/local/bin/$2" --serial stdout --api-socket "/tmp/$1.sock" ||
        fail "enspeed vmm exited with $? (expected 0 when the guest powers off)"
    expect "$1" "KIT: init reached"
    expect "$1" "KIT: cdrom ok proof=enspeed-cd"
    expect "$1" "KIT: disk ok"
    expect "$1" "KIT: poweroff"
    expect_not "$1" "KIT: FAIL"
    got=$(disk_proof "/tmp/$1.ext4") || fail "$1: cannot read /kit-proof from the disk image"
    [ "$got" = "$1" ] && echo "ok: $1's disk image holds the proof '$1'" ||
        fail "$1: the disk image holds '$got', expected '$1'"
}

boot fwvirtio kit-virtio.iso ""
grep -q "KIT: pci virtio-msi=[1-9]" /tmp/guest-fwvirtio.log &&
    echo "ok: virtio-blk interrupts through MSI-X" ||
    fail "fwvirtio: virtio-blk has no MSI interrupts: $(grep 'KIT: pci' /tmp/guest-fwvirtio.log)"
grep -q "KIT: pci .*ahci-msi=[1-9]" /tmp/guest-fwvirtio.log &&
    echo "ok: the AHCI controller interrupts through MSI" ||
    fail "fwvirtio: AHCI has no MSI interrupt: $(grep 'KIT: pci' /tmp/guest-fwvirtio.log)"
bench enspeed-firmware-linux-to-init fwvirtio "KIT: init reached"

boot fwsata kit-sata.iso ",bus=sata"

finish enspeed-firmware-linux
