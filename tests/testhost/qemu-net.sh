#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario): the reference for
# enspeed-net.sh. QEMU with KVM boots the guest kit with virtio-net on a tap device whose
# other end is the test host (10.88.0.1/24); the kit configures 10.88.0.2 and pings the host.
# Nothing leaves the test host: run.sh gives it no network device.
. /usr/lib/testhost/guest.sh

make_tap tap0 10.88.0.1/24

run_guest qemu 180 qemu-system-x86_64 -accel kvm -cpu host -M microvm -m 256 -smp 1 \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel "$KIT/vmlinuz" -initrd "$KIT/initrd.img" \
    -append "console=ttyS0 quiet kit.task=net,poweroff kit.ip=10.88.0.2 kit.peer=10.88.0.1" \
    -netdev tap,id=net0,ifname=tap0,script=no,downscript=no \
    -device virtio-net-device,netdev=net0,mac=52:54:00:12:34:56 ||
    fail "qemu exited with $?"

expect qemu "KIT: init reached"
expect qemu "KIT: net ok"
expect qemu "KIT: poweroff"
expect_not qemu "KIT: FAIL"
bench qemu-net-boot-to-init qemu "KIT: init reached"
bench qemu-net-ok qemu "KIT: net ok"

finish qemu-net
