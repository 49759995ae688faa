#!/bin/sh
# Test-host benchmark (run by scripts/bench.sh through image/testhost/run.sh): a real Debian
# kernel from the guest kit booted to its init, by EnSpeed's VMM and by QEMU (-M microvm, and
# -M microvm,rtc=on) on the test host's KVM, in turn, 5 times each. Same kernel, initrd,
# memory, vCPU count and disk. Prints one "BENCH <vmm>-boot-to-init <s>" line per boot.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
n=5
cmd="console=ttyS0 quiet kit.task=poweroff"
cp "$KIT/disk.ext4" /tmp/disk.ext4

i=0
while [ $i -lt "$n" ]; do
    run_guest enspeed 180 "$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
        --cmdline "$cmd" --memory 256 --vcpus 1 --disk /tmp/disk.ext4 --serial stdout >/dev/null ||
        fail "enspeed exited with $?"
    bench enspeed-boot-to-init enspeed "KIT: init reached"
    run_guest qemu 180 qemu-system-x86_64 -accel kvm -cpu host -M microvm -m 256 -smp 1 \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$KIT/vmlinuz" -initrd "$KIT/initrd.img" -append "$cmd" \
        -drive id=disk0,file=/tmp/disk.ext4,format=raw,if=none -device virtio-blk-device,drive=disk0 >/dev/null ||
        fail "qemu exited with $?"
    bench qemu-boot-to-init qemu "KIT: init reached"
    # The same with microvm's RTC on: its kernel then finds a clock at 0x70 instead of probing
    # for one that is not there (several seconds here); a floor beside the reference.
    run_guest qemu-rtc 180 qemu-system-x86_64 -accel kvm -cpu host -M microvm,rtc=on -m 256 -smp 1 \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$KIT/vmlinuz" -initrd "$KIT/initrd.img" -append "$cmd" \
        -drive id=disk0,file=/tmp/disk.ext4,format=raw,if=none -device virtio-blk-device,drive=disk0 >/dev/null ||
        fail "qemu (rtc=on) exited with $?"
    bench qemu-rtc-boot-to-init qemu-rtc "KIT: init reached"
    i=$((i + 1))
done
finish bench-boot
