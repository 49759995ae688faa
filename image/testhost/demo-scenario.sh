#!/bin/sh
# The demo (./run.sh on a machine whose KVM cannot run Linux itself): inside the test host,
# EnSpeed's VMM boots the guest kit's Debian kernel with a disk and a NIC, and its serial
# console is this terminal. The guest's shell answers; `poweroff -f` in it ends the demo.
. /usr/lib/testhost/guest.sh

make_tap tap0 10.88.0.1/24
cp "$KIT/disk.ext4" /tmp/disk.ext4
cat <<MSG

==== EnSpeed demo: enspeed vmm is booting a Debian guest (2 vCPUs, 256 MiB, disk, NIC) ====
  The guest's serial console follows. In its shell, try: cat /proc/cpuinfo | grep processor,
  mount /dev/vda /mnt, ping 10.88.0.1.  'poweroff -f' ends the demo (QEMU: Ctrl-A X).
  Control socket: $ENSPEED vmm-api --socket /tmp/vmm.sock '{"cmd":"status"}'

MSG
"$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
    --cmdline "console=ttyS0 quiet kit.task=net,wait kit.ip=10.88.0.2 kit.peer=10.88.0.1" \
    --memory 256 --vcpus 2 --disk /tmp/disk.ext4 --net tap=tap0,mac=52:54:00:12:34:56 \
    --serial stdout --api-socket /tmp/vmm.sock
rc=$?
echo "==== enspeed vmm exited with $rc ===="
exit $rc
