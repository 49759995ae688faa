#!/bin/sh
# Test-host scenario (run with image/testhost/run.sh --scenario ... --enspeed PATH): the power
# life of a real Debian guest under EnSpeed's VMM, driven through its control socket with
# `enspeed vmm-api`: status, pause and resume,
# Ctrl-Alt-Del (the kernel reboots, the VMM boots it again), the ACPI power button (the guest
# shuts down by itself and the VMM exits 0), and a hard stop of a second VM. Two vCPUs.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
api() { "$ENSPEED" vmm-api --socket /tmp/vmm.sock "$1"; }

# wait_marks NAME TEXT COUNT: waits (up to 120 s) until guest NAME printed TEXT COUNT times.
wait_marks() {
    _i=0
    until [ "$(grep -cF " $2" "/tmp/$1.marks" 2>/dev/null)" -ge "$3" ]; do
        [ $_i -ge 1200 ] && { echo "FAIL: $1 never printed '$2' $3 time(s)"; return 1; }
        sleep 0.1
        _i=$((_i + 1))
    done
}

(
    wait_marks enspeed "KIT: waiting for the power button" 1 || exit 1
    api '{"cmd":"status"}' | grep -q '"state":"running"' && echo "ok: status running" || echo "FAIL: status"
    api '{"cmd":"pause"}' >/dev/null && echo "ok: paused"
    api '{"cmd":"status"}' | grep -q '"state":"paused"' && echo "ok: status paused" || echo "FAIL: not paused"
    sleep 3
    api '{"cmd":"resume"}' >/dev/null && echo "ok: resumed"
    api '{"cmd":"bogus"}' && echo "FAIL: bogus request accepted" || echo "ok: bogus request refused"
    echo "host: sending Ctrl-Alt-Del"
    api '{"cmd":"ctrl-alt-del"}' >/dev/null
    wait_marks enspeed "KIT: waiting for the power button" 2 || exit 1
    # Checked once the guest is gone, against the resets the VMM explains.
    api '{"cmd":"status"}' | sed -n 's/.*"boots":\([0-9]*\).*/\1/p' >/tmp/boots
    echo "host: pressing the power button"
    api '{"cmd":"shutdown","timeout_secs":60}'
) >/tmp/host.log 2>&1 &

{
    ENSPEED_LOG=info run_guest enspeed 300 "$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
        --cmdline "console=ttyS0 quiet kit.task=wait" --memory 256 --vcpus 2 \
        --serial stdout --api-socket /tmp/vmm.sock
    echo $? >/tmp/enspeed.vmmrc
} | tee /tmp/enspeed.out
rc=$(cat /tmp/enspeed.vmmrc)
[ "$rc" = 0 ] || fail "enspeed vmm exited with $rc (expected 0 when the guest powers off)"
wait
cat /tmp/host.log
grep -q FAIL /tmp/host.log && fail "the host side of the scenario failed"

[ "$(grep -cF " KIT: init reached" /tmp/enspeed.marks)" -eq 2 ] ||
    fail "expected two boots (Ctrl-Alt-Del reboots the guest)"
# A Debian kernel under nested KVM inside TCG now and then triple-faults early in its boot; the
# VMM resets it (and says so) and it boots again. Such a boot counts, and is reported; any
# other extra boot is a failure.
faults=$(grep -c "guest triple-faulted" /tmp/enspeed.out || true)
boots=$(cat /tmp/boots 2>/dev/null)
[ "$boots" = $((2 + faults)) ] && echo "ok: the VM booted twice (boots $boots, triple faults $faults)" ||
    fail "boots: $boots, expected 2 plus $faults triple-faulted boot(s)"
[ "$faults" = 0 ] || echo "NOTE: the guest triple-faulted $faults time(s) while booting; the VMM reset it and it booted again"
expect enspeed "KIT: power button"
expect_not enspeed "KIT: FAIL"

# A hard stop ends a running VM at once, with exit code 0.
(
    wait_marks stopped "KIT: waiting for the power button" 1 || exit 1
    api '{"cmd":"stop"}'
) >/tmp/host2.log 2>&1 &
run_guest stopped 300 "$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
    --cmdline "console=ttyS0 quiet kit.task=wait" --memory 256 --vcpus 1 \
    --serial stdout --api-socket /tmp/vmm.sock ||
    fail "enspeed vmm exited with $? after a hard stop (expected 0)"
wait
cat /tmp/host2.log
expect_not stopped "KIT: power button"

finish enspeed-lifecycle
