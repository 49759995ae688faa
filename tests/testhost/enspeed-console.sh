#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario ... --enspeed PATH
# --extra PATH/rfb-probe): the graphical console of a real Debian guest. EnSpeed's VMM gives it
# a framebuffer (--vnc); Linux finds it in boot_params.screen_info (vesafb) and its framebuffer
# console draws the kernel's messages (console=tty0) and the kit's bar of 16 reverse-video
# cells; rfb-probe sees both through the RFB socket, compares the screen's size Raw and Zlib
# encoded, then types a line there that the guest's own keyboard driver (atkbd on the i8042)
# must deliver to /dev/tty1.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
command -v rfb-probe >/dev/null || { echo "FAIL: no rfb-probe: give run.sh --extra PATH/rfb-probe"; exit 2; }

typed=hello-Console_42
(
    # The bar comes after the kernel's messages; polling stops as soon as it is on the screen.
    rfb-probe /tmp/vnc.sock bar 240 || exit 1
    rfb-probe /tmp/vnc.sock sizes
    rfb-probe /tmp/vnc.sock type "$typed"
) >/tmp/probe.log 2>&1 &
probe=$!

{
    run_guest enspeed 300 "$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
        --cmdline "console=tty0 console=ttyS0 kit.task=console,poweroff" \
        --memory 256 --vcpus 1 --serial stdout --vnc /tmp/vnc.sock --name console-test
    echo $? >/tmp/enspeed.vmmrc
} | tee /tmp/enspeed.out
rc=$(cat /tmp/enspeed.vmmrc)
[ "$rc" = 0 ] || fail "enspeed vmm exited with $rc (expected 0 when the guest powers off)"
# The probe is done once the guest has read its line; if the guest never got that far, the
# probe has nothing left to wait for.
i=0
while kill -0 "$probe" 2>/dev/null && [ $i -lt 10 ]; do sleep 1; i=$((i + 1)); done
kill "$probe" 2>/dev/null && killall rfb-probe 2>/dev/null
wait
cat /tmp/probe.log

expect enspeed "KIT: console drawn"
expect enspeed "KIT: console read $typed"
expect_not enspeed "KIT: FAIL"
for line in "vesafb: framebuffer at 0xc0000000" "Console: switching to colour frame buffer device 128x48"; do
    grep -qF "$line" /tmp/enspeed.out && echo "ok: the guest's kernel said '$line'" ||
        fail "the guest's kernel never said '$line'"
done
grep -q '^RFB: connected, 1024x768 "console-test"' /tmp/probe.log &&
    echo "ok: RFB screen 1024x768 named console-test" || fail "RFB handshake"
bar=$(sed -n 's/^RFB: bar at \([0-9]*,[0-9]*\) colour=\([0-9a-f]*\) text=\([0-9]*\)$/\1 \2 \3/p' /tmp/probe.log)
if [ -n "$bar" ]; then
    set -- $bar
    echo "ok: the kit's bar is on the screen at $1 in colour $2"
    # The kernel's messages above it: thousands of lit pixels (a line of text lights about
    # 2,000), not a lone cursor.
    [ "$3" -gt 20000 ] && echo "ok: the kernel's console text is on the screen ($3 lit pixels)" ||
        fail "only $3 lit pixels besides the bar: no kernel console text on the framebuffer"
else
    fail "rfb-probe found no bar on the screen"
fi
grep -q "^RFB: typed" /tmp/probe.log || fail "rfb-probe could not type"
# The kernel's text console, Zlib encoded, in a small part of its Raw size.
sizes=$(sed -n 's/^RFB: full screen raw=\([0-9]*\) zlib=\([0-9]*\) bytes.*$/\1 \2/p' /tmp/probe.log)
if [ -n "$sizes" ]; then
    set -- $sizes
    echo "BENCH console-full-screen-raw-bytes $1"
    echo "BENCH console-full-screen-zlib-bytes $2"
    [ $(($2 * 10)) -lt "$1" ] && echo "ok: the console's screen Zlib encoded: $2 bytes, Raw $1" ||
        fail "the console's screen Zlib encoded: $2 bytes, not under a tenth of Raw's $1"
else
    fail "rfb-probe could not compare Raw and Zlib of the same screen"
fi

finish enspeed-console
