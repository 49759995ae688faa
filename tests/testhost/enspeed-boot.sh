#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario ... --enspeed PATH): EnSpeed's
# VMM boots the unmodified Debian kernel of the guest kit on the test host's (emulated AMD-V)
# KVM; the kit writes a proof word to its virtio-blk disk and powers off, which must end the
# VMM with exit code 0; the test host then reads the word back from the disk image.
# Same checks and BENCH line as qemu-boot.sh, to compare against it.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }

proof=enspeed-boot-$$
cp "$KIT/disk.ext4" /tmp/disk.ext4

run_guest enspeed 180 "$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
    --cmdline "console=ttyS0 quiet kit.task=disk,poweroff kit.proof=$proof" \
    --memory 256 --vcpus 1 --disk /tmp/disk.ext4 \
    --serial stdout --api-socket /tmp/vmm.sock ||
    fail "enspeed vmm exited with $? (expected 0 when the guest powers off)"

expect enspeed "KIT: init reached"
expect enspeed "KIT: disk ok"
expect enspeed "KIT: poweroff"
expect_not enspeed "KIT: FAIL"
bench enspeed-boot-to-init enspeed "KIT: init reached"

got=$(disk_proof /tmp/disk.ext4) || fail "cannot read /kit-proof from the guest's disk image"
[ "$got" = "$proof" ] && echo "ok: the disk image holds the proof '$proof'" ||
    fail "the disk image holds '$got', expected '$proof'"

finish enspeed-boot
