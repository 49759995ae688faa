#!/bin/sh
# Test-host benchmark (run by scripts/bench-firmware.sh through image/testhost/run.sh --extra
# kit-bench.iso): power-on of a VM whose blank virtio disk falls through to an El Torito CD in
# its SATA CD-ROM drive, GRUB from the CD loading the kit's kernel, to the boot loader's first
# output on the serial console (its menu, "GNU GRUB version") and to the kernel's init, by
# EnSpeed's VMM (SeaBIOS) and by QEMU (-M q35, SeaBIOS), alternating, 5 times each; same ISO,
# disk, memory and vCPUs, no display. Then an installed system: the kit installed once (from
# kit-install-bench.iso, by EnSpeed) onto a virtio disk, booted from that disk without a CD,
# to the installed kernel's init, alternating the same way.
# Prints "BENCH <vmm>-firmware-to-grub <s>", "BENCH <vmm>-firmware-to-init <s>" and
# "BENCH <vmm>-firmware-installed-to-init <s>" per boot.
# BENCH_FIRMWARE=uefi: both boot OVMF (Debian's OVMF.fd) and the ISOs are UEFI-only.
. /usr/lib/testhost/guest.sh

if [ "${BENCH_FIRMWARE:-bios}" = uefi ]; then
    efw="--firmware uefi" qfw="-bios /usr/share/ovmf/OVMF.fd"
else
    efw="" qfw=""
fi

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
iso=/usr/local/bin/kit-bench.iso
installer=/usr/local/bin/kit-install-bench.iso
for f in "$iso" "$installer"; do
    [ -f "$f" ] || { echo "FAIL: no $f: give run.sh --extra"; exit 2; }
done
n=${BENCH_BOOTS:-5}
truncate -s 64M /tmp/blank.img

i=0
while [ $i -lt "$n" ]; do
    run_guest enspeed 170 "$ENSPEED" vmm $efw --memory 512 --vcpus 2 --disk /tmp/blank.img \
        --cdrom "$iso" --serial stdout >/dev/null || fail "enspeed exited with $?"
    bench enspeed-firmware-to-grub enspeed "GRUB: menu"
    bench enspeed-firmware-to-init enspeed "KIT: init reached"
    run_guest qemu 170 qemu-system-x86_64 -accel kvm -cpu host -M q35 $qfw -m 512 -smp 2 \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -drive id=disk0,file=/tmp/blank.img,format=raw,if=none -device virtio-blk-pci,drive=disk0 \
        -drive id=cd0,file="$iso",media=cdrom,if=none -device ide-cd,drive=cd0,bus=ide.0 \
        >/dev/null || fail "qemu exited with $?"
    bench qemu-firmware-to-grub qemu "GRUB: menu"
    bench qemu-firmware-to-init qemu "KIT: init reached"
    i=$((i + 1))
done

truncate -s 96M /tmp/installed.img
run_guest install 170 "$ENSPEED" vmm $efw --memory 512 --vcpus 2 --disk /tmp/installed.img \
    --cdrom "$installer" --serial stdout >/dev/null || fail "the install exited with $?"
expect install "KIT: install ok onto"
i=0
while [ $i -lt "$n" ]; do
    run_guest enspeed 170 "$ENSPEED" vmm $efw --memory 512 --vcpus 2 --disk /tmp/installed.img \
        --serial stdout >/dev/null || fail "enspeed exited with $?"
    bench enspeed-firmware-installed-to-init enspeed "KIT: init reached"
    run_guest qemu 170 qemu-system-x86_64 -accel kvm -cpu host -M q35 $qfw -m 512 -smp 2 \
        -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -drive id=disk0,file=/tmp/installed.img,format=raw,if=none -device virtio-blk-pci,drive=disk0 \
        >/dev/null || fail "qemu exited with $?"
    bench qemu-firmware-installed-to-init qemu "KIT: init reached"
    i=$((i + 1))
done
finish bench-firmware
