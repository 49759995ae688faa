#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario ... --enspeed PATH --extra
# bootdisk.img): EnSpeed's VMM starts a VM in SeaBIOS (the test host's, from Debian's seabios
# package) under real (emulated) AMD-V, with 2 vCPUs: the firmware boots the project's boot
# disk from a virtio-pci disk, the disk reads its second stage through the BIOS, checks the
# ACPI tables the firmware placed and powers off through them, which ends the VMM with 0.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
[ -f /usr/local/bin/bootdisk.img ] || { echo "FAIL: no bootdisk.img: give run.sh --extra"; exit 2; }
cp /usr/local/bin/bootdisk.img /tmp/boot.img

# Under the stall limit: a firmware guest never reaches the kit's init.
run_guest firmware 90 "$ENSPEED" vmm --memory 256 --vcpus 2 --disk /tmp/boot.img \
    --serial stdout --api-socket /tmp/vmm.sock ||
    fail "enspeed vmm exited with $? (expected 0 when the guest powers off)"

expect firmware "SeaBIOS (version"
expect firmware "bootdisk: started by the firmware"
expect firmware "bootdisk: stage 2 read through int 13h"
expect firmware "bootdisk: waited 50 ms through int 15h"
expect firmware "S5 sleep type 5; powering off"
expect_not firmware "bootdisk: FAIL"
bench enspeed-firmware-to-bootloader firmware "bootdisk: started by the firmware"

finish enspeed-firmware
