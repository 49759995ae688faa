#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario ... --enspeed PATH): EnSpeed's
# VMM boots the guest kit with virtio-net on a tap device whose other end is the test host
# (10.88.0.1/24); the kit configures 10.88.0.2, pings the host and powers off, which must end
# the VMM with exit code 0. Same checks and BENCH lines as qemu-net.sh.
# Nothing leaves the test host: run.sh gives it no network device.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }

make_tap tap0 10.88.0.1/24

run_guest enspeed 180 "$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
    --cmdline "console=ttyS0 quiet kit.task=net,poweroff kit.ip=10.88.0.2 kit.peer=10.88.0.1" \
    --memory 256 --vcpus 1 --net tap=tap0,mac=52:54:00:12:34:56 \
    --serial stdout --api-socket /tmp/vmm.sock ||
    fail "enspeed vmm exited with $? (expected 0 when the guest powers off)"

expect enspeed "KIT: init reached"
expect enspeed "KIT: net ok"
expect enspeed "KIT: poweroff"
expect_not enspeed "KIT: FAIL"
bench enspeed-net-boot-to-init enspeed "KIT: init reached"
bench enspeed-net-ok enspeed "KIT: net ok"

finish enspeed-net
