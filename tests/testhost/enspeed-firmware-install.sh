#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario ... --enspeed PATH --extra
# install-virtio.iso --extra install-sata.iso): an install from CD, as a user does in a blank
# VM. SeaBIOS finds the blank disk unbootable and boots GRUB from the El Torito-only CD in the
# SATA CD-ROM drive; the unmodified Debian kernel's own drivers find everything on PCI
# (virtio-blk through virtio-pci with MSI-X, the AHCI controller with MSI and its CD-ROM, which
# the kit mounts, and with a graphical console the virtio tablet); the kit then installs itself
# onto the disk (partition table, GRUB in the MBR, ext2 with kernel, initrd and
# grub.cfg) and powers off. Then the VM boots what was installed: from the virtio disk with
# no CD-ROM drive at all; from the SATA disk with the CD still in its drive (the disks come
# first in the default boot order).
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
for iso in install-virtio.iso install-sata.iso; do
    [ -f "/usr/local/bin/$iso" ] || { echo "FAIL: no $iso: give run.sh --extra"; exit 2; }
done

vmm() { # vmm NAME DISK-OPTIONS [VMM-ARGUMENTS...]: one power-on, until the guest powers off
    name=$1 opts=$2
    shift 2
    run_guest "$name" 170 "$ENSPEED" vmm --memory 512 --vcpus 2 --disk "/tmp/disk-$bus.img$opts" \
        --serial stdout "$@" ||
        fail "$name: enspeed vmm exited with $? (expected 0 when the guest powers off)"
}

for bus in virtio sata; do
    rm -f "/tmp/disk-$bus.img"
    truncate -s 96M "/tmp/disk-$bus.img"
    opts=""
    [ $bus = sata ] && opts=",bus=sata"
    if [ $bus = virtio ]; then
        # With a graphical console: the VGA and the virtio tablet are there too.
        vmm "install-$bus" "$opts" --cdrom "/usr/local/bin/install-$bus.iso" --vnc /tmp/install.vnc
        log=/tmp/guest-install-virtio.log
        grep -q "KIT: pci virtio-msi=[1-9]" $log && echo "ok: virtio-blk interrupts through MSI-X" ||
            fail "virtio-blk has no MSI interrupts: $(grep 'KIT: pci' $log)"
        grep -q "KIT: pci .*ahci-msi=[1-9]" $log && echo "ok: the AHCI controller interrupts through MSI" ||
            fail "AHCI has no MSI interrupt: $(grep 'KIT: pci' $log)"
        grep -q "KIT: pci .*tablet=1" $log && echo "ok: Linux's virtio_input has the tablet" ||
            fail "no tablet in /proc/bus/input/devices: $(grep 'KIT: pci' $log)"
    else
        vmm "install-$bus" "$opts" --cdrom "/usr/local/bin/install-$bus.iso"
    fi
    expect "install-$bus" "GRUB: loading the kit"
    expect "install-$bus" "KIT: cdrom ok proof=enspeed-cd"
    expect "install-$bus" "KIT: install ok onto"
    expect "install-$bus" "KIT: poweroff"
    expect_not "install-$bus" "KIT: FAIL"

    if [ $bus = virtio ]; then
        vmm "installed-$bus" "$opts"
    else
        vmm "installed-$bus" "$opts" --cdrom "/usr/local/bin/install-$bus.iso"
        expect_not "installed-$bus" "GRUB: loading the kit"
    fi
    expect "installed-$bus" "GRUB: booting the installed system"
    expect "installed-$bus" "KIT: installed proof=installed-$bus"
    expect "installed-$bus" "KIT: poweroff"
    expect_not "installed-$bus" "KIT: FAIL"
done
bench enspeed-firmware-linux-to-init install-virtio "KIT: init reached"
bench enspeed-firmware-installed-to-init installed-virtio "KIT: init reached"

finish enspeed-firmware-install
