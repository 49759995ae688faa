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

boot() { # boot NAME ISO DISK-OPTIONS [VMM-ARGUMENTS...]
    name=$1 iso=$2 opts=$3
    shift 3
    cp "$KIT/disk.ext4" "/tmp/$name.ext4"
    run_guest "$name" 170 "$ENSPEED" vmm --memory 512 --vcpus 2 --disk "/tmp/$name.ext4$opts" \
        --cdrom "/usr/local/bin/$iso" --serial stdout --api-socket "/tmp/$name.sock" "$@" ||
        fail "enspeed vmm exited with $? (expected 0 when the guest powers off)"
    expect "$name" "KIT: init reached"
    expect "$name" "KIT: cdrom ok proof=enspeed-cd"
    expect "$name" "KIT: disk ok"
    expect "$name" "KIT: poweroff"
    expect_not "$name" "KIT: FAIL"
    got=$(disk_proof "/tmp/$name.ext4") || fail "$name: cannot read /kit-proof from the disk image"
    [ "$got" = "$name" ] && echo "ok: $name's disk image holds the proof '$name'" ||
        fail "$name: the disk image holds '$got', expected '$name'"
}

# With a graphical console: the VGA and the virtio tablet are there too.
boot fwvirtio kit-virtio.iso "" --vnc /tmp/fwvirtio.vnc
grep -q "KIT: pci virtio-msi=[1-9]" /tmp/guest-fwvirtio.log &&
    echo "ok: virtio-blk interrupts through MSI-X" ||
    fail "fwvirtio: virtio-blk has no MSI interrupts: $(grep 'KIT: pci' /tmp/guest-fwvirtio.log)"
grep -q "KIT: pci .*ahci-msi=[1-9]" /tmp/guest-fwvirtio.log &&
    echo "ok: the AHCI controller interrupts through MSI" ||
    fail "fwvirtio: AHCI has no MSI interrupt: $(grep 'KIT: pci' /tmp/guest-fwvirtio.log)"
grep -q "KIT: pci .*tablet=1" /tmp/guest-fwvirtio.log &&
    echo "ok: Linux's virtio_input has the tablet" ||
    fail "fwvirtio: no tablet in /proc/bus/input/devices: $(grep 'KIT: pci' /tmp/guest-fwvirtio.log)"
bench enspeed-firmware-linux-to-init fwvirtio "KIT: init reached"

boot fwsata kit-sata.iso ",bus=sata"

finish enspeed-firmware-linux
