#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario): the graceful-shutdown path.
# The kit waits (kit.task=wait) until the host presses the ACPI power button, here QEMU's
# system_powerdown sent through a monitor on a pair of fifos (busybox has no unix-socket
# client); the kit must answer with "KIT: power button" and power off by itself.
. /usr/lib/testhost/guest.sh

mkfifo /tmp/mon.in /tmp/mon.out
# Drain the monitor's output so QEMU never blocks writing to it.
cat /tmp/mon.out >/dev/null &

# Presses the button once the kit is waiting for it; gives up with the guest's time limit.
(
    i=0
    until grep -q "KIT: waiting for the power button" /tmp/qemu.marks 2>/dev/null; do
        [ $i -ge 1800 ] && exit 1
        sleep 0.1
        i=$((i + 1))
    done
    echo "host: pressing the power button"
    echo system_powerdown >/tmp/mon.in
) &

run_guest qemu 180 qemu-system-x86_64 -accel kvm -cpu host -M microvm -m 256 -smp 1 \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -monitor pipe:/tmp/mon \
    -kernel "$KIT/vmlinuz" -initrd "$KIT/initrd.img" \
    -append "console=ttyS0 quiet kit.task=wait" ||
    fail "qemu exited with $?"

expect qemu "KIT: init reached"
expect qemu "KIT: waiting for the power button"
expect qemu "KIT: power button"
expect_not qemu "KIT: FAIL"

finish qemu-powerbutton
