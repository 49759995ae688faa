#!/bin/sh
# Test-host profile (scripts/profile-boot.sh runs it through image/testhost/run.sh): the real
# Debian kernel of the guest kit booted once by EnSpeed's VMM and once by QEMU (-M microvm),
# with the benchmark's machine (tests/testhost/bench-boot.sh) and "quiet initcall_debug": the
# console stays silent while it boots, then the kit prints the kernel's log (kit.task=dmesg).
# Prints "BENCH <vmm>-boot-to-init <s>" for each and the log, lines marked "E|" (EnSpeed) and
# "Q|" (QEMU); scripts/profile-boot.sh compares them.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
# A log buffer large enough for every initcall's lines (the default 128 KiB is not).
cmd="console=ttyS0 quiet initcall_debug log_buf_len=4M kit.task=dmesg,poweroff"
cp "$KIT/disk.ext4" /tmp/disk.ext4
run_guest enspeed 300 "$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
    --cmdline "$cmd" --memory 256 --vcpus 1 --disk /tmp/disk.ext4 --serial stdout >/dev/null ||
    fail "enspeed exited with $?"
bench enspeed-boot-to-init enspeed "KIT: init reached"
run_guest qemu 300 qemu-system-x86_64 -accel kvm -cpu host -M microvm -m 256 -smp 1 \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel "$KIT/vmlinuz" -initrd "$KIT/initrd.img" -append "$cmd" \
    -drive id=disk0,file=/tmp/disk.ext4,format=raw,if=none -device virtio-blk-device,drive=disk0 >/dev/null ||
    fail "qemu exited with $?"
bench qemu-boot-to-init qemu "KIT: init reached"
grep -a 'KIT-DMESG ' /tmp/guest-enspeed.log | sed 's/^.*KIT-DMESG /E| /'
grep -a 'KIT-DMESG ' /tmp/guest-qemu.log | sed 's/^.*KIT-DMESG /Q| /'
finish profile-boot
