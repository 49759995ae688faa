#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario): the reference for
# enspeed-boot.sh. QEMU with KVM boots the unmodified Debian kernel of the guest kit, which
# writes a proof word to its virtio-blk disk and powers off; the test host then reads the word
# back from the disk image. Prints "BENCH qemu-boot-to-init <s>": QEMU start to the kit's /init.
. /usr/lib/testhost/guest.sh

proof=qemu-boot-$$
cp "$KIT/disk.ext4" /tmp/disk.ext4

run_guest qemu 180 qemu-system-x86_64 -accel kvm -cpu host -M microvm -m 256 -smp 1 \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel "$KIT/vmlinuz" -initrd "$KIT/initrd.img" \
    -append "console=ttyS0 quiet kit.task=disk,poweroff kit.proof=$proof" \
    -drive id=disk0,file=/tmp/disk.ext4,format=raw,if=none -device virtio-blk-device,drive=disk0 ||
    fail "qemu exited with $?"

expect qemu "KIT: init reached"
expect qemu "KIT: disk ok"
expect qemu "KIT: poweroff"
expect_not qemu "KIT: FAIL"
bench qemu-boot-to-init qemu "KIT: init reached"

got=$(disk_proof /tmp/disk.ext4) || fail "cannot read /kit-proof from the guest's disk image"
[ "$got" = "$proof" ] && echo "ok: the disk image holds the proof '$proof'" ||
    fail "the disk image holds '$got', expected '$proof'"

finish qemu-boot
