#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario ... --enspeed PATH --extra
# PATH/rfb-probe --extra debian-installer.iso): Debian's own graphical installer in a blank VM's
# console, as a user meets it. SeaBIOS boots GRUB from the El Torito-only CD
# (image/kit/installer-iso.sh: the kernel and initrd of Debian's
# debian-installer-12-netboot-amd64 package) in the SATA CD-ROM drive; GRUB sets a VBE mode
# through the VGA BIOS that Linux keeps as its framebuffer; the installer draws its first
# screen (the list of languages) there. Through the RFB socket, rfb-probe sees that screen,
# moves the list's selection with Down and Up, and sees the pointer move when it moves it.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
command -v rfb-probe >/dev/null || { echo "FAIL: no rfb-probe: give run.sh --extra PATH/rfb-probe"; exit 2; }
iso=/usr/local/bin/debian-installer.iso
[ -f "$iso" ] || { echo "FAIL: no $iso: give run.sh --extra"; exit 2; }

truncate -s 2G /tmp/blank.img
"$ENSPEED" vmm --memory 1024 --vcpus 1 --disk /tmp/blank.img --cdrom "$iso" --serial stdout \
    --vnc /tmp/vnc.sock --api-socket /tmp/api.sock --name installer >/tmp/vmm.out 2>&1 &
vmm=$!
started=$(date +%s)
rfb-probe /tmp/vnc.sock installer 420 2>&1 | tee /tmp/probe.log
echo "the probe ended after $(( $(date +%s) - started )) s"
grep -q "^RFB: the installer's list, 1024x768" /tmp/probe.log &&
    echo "ok: the installer's first screen, in the VBE mode GRUB set" ||
    fail "no installer screen at 1024x768"
grep -q "^RFB: Down moved the selection" /tmp/probe.log &&
    echo "ok: keys typed over RFB move through the installer's list" ||
    fail "the keys did not move the list's selection"
grep -q "^RFB: the pointer moved" /tmp/probe.log &&
    echo "ok: the pointer moves on the installer's screen" || fail "the pointer did not move"
grep -q "GRUB: loading Debian's installer" /tmp/vmm.out &&
    echo "ok: GRUB booted the installer from the CD" || fail "GRUB never loaded the installer"
"$ENSPEED" vmm-api --socket /tmp/api.sock '{"cmd":"stop"}' >/dev/null || fail "the VMM did not take stop"
wait $vmm || fail "enspeed vmm exited with $? after stop"
grep -a "panicked\|ERROR" /tmp/vmm.out && fail "the VMM logged an error"
finish enspeed-installer
