#!/bin/sh
# Test-host scenario (run.sh --extra /usr/sbin/ip): live migration of a real Debian guest between
# two `enspeed vmm`s of the test host. The guest (the kit's unmodified Debian kernel, 256 MiB)
# has a virtio disk and a NIC on a bridge where the host is 10.60.0.1 and it is 10.60.0.2; it
# pings the host, then keeps writing numbered blocks to its disk, each synced before it prints
# "KIT: blocks ack N" (kit.task=net,blocks). While the host pings it five times a second, its
# VMM moves it to a second VMM (started with --incoming, its NIC on another tap of the same
# bridge). Then:
#   - the second VMM runs the same guest: it acknowledges blocks past the first's last one and
#     never boots again (no second "KIT: init reached"); the first VMM exits 0;
#   - the ping loses at most one reply (the target announces the guest's MAC as it resumes);
#   - stopped, the disk holds every acknowledged block (the kit's own check of its ring, on a
#     third boot of the same disk: "KIT: blocks found last=M missing=0").
# Prints "MIGRATE: downtime MS total MS lost N" for the record.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
[ -x /usr/local/bin/ip ] || { echo "FAIL: no iproute2 ip: give run.sh --extra /usr/sbin/ip"; exit 2; }
ip() { /usr/local/bin/ip "$@"; }
MAC=52:54:00:60:00:02

ip link set lo up
ip link add brm type bridge || fail "make the bridge"
ip addr add 10.60.0.1/24 dev brm
ip link set brm up
for t in tm0 tm1; do
    ip tuntap add dev $t mode tap || fail "make tap $t"
    ip link set $t master brm || fail "put $t on the bridge"
    ip link set $t up
done
truncate -s 64M /tmp/disk.img
# The guest's command line (word splitting wanted: one word each).
GUEST="--kernel $KIT/vmlinuz --initrd $KIT/initrd.img --memory 256 --vcpus 1 --disk /tmp/disk.img --serial stdout"
CMDLINE="console=ttyS0 quiet kit.task=net,blocks kit.ip=10.60.0.2 kit.peer=10.60.0.1 kit.dev=/dev/vda"
acks() { # NAME: the highest block NAME's guest acknowledged
    sed -n 's/.*KIT: blocks ack \([0-9]*\).*/\1/p' "/tmp/guest-$1.log" | tail -n 1
}
wait_acks() { # NAME N: until NAME's guest acknowledged block N
    _i=0
    until [ "$(acks "$1")" -ge "$2" ] 2>/dev/null; do
        _i=$((_i + 1))
        [ $_i -gt 1800 ] && { fail "$1: no block $2 acknowledged"; return 1; }
        sleep 0.1
    done
}

# The source, in the background; once its guest writes, the target, which waits for it (its
# run is limited to BOOT_STALL_SECS: it never boots, so run_guest's boot-stall watch is off).
# shellcheck disable=SC2086
(run_guest source 600 "$ENSPEED" vmm $GUEST --cmdline "$CMDLINE" --net "tap=tm0,mac=$MAC" \
    --api-socket /tmp/source.sock; echo $? >/tmp/source.exit) &
wait_acks source 20 || finish enspeed-migrate
expect source "KIT: net ok"
# shellcheck disable=SC2086
(run_guest target "$BOOT_STALL_SECS" "$ENSPEED" vmm $GUEST --cmdline "$CMDLINE" --net "tap=tm1,mac=$MAC" \
    --api-socket /tmp/target.sock --incoming /tmp/incoming.sock; echo $? >/tmp/target.exit) &
i=0
until [ -S /tmp/incoming.sock ]; do
    i=$((i + 1))
    [ $i -gt 300 ] && { fail "the target VMM never listened"; finish enspeed-migrate; }
    sleep 0.1
done

ping -i 0.2 10.60.0.2 >/tmp/ping.log 2>&1 &
ping_pid=$!
sleep 3
before=$(acks source)
"$ENSPEED" vmm-api --socket /tmp/source.sock '{"cmd":"migrate","to":"/tmp/incoming.sock","downtime_ms":50}' \
    >/tmp/migrated.json 2>&1 || fail "migrate: $(cat /tmp/migrated.json)"
echo "host: $(cat /tmp/migrated.json)"
wait_acks target $((before + 20)) || finish enspeed-migrate
sleep 3
kill -INT $ping_pid
wait $ping_pid 2>/dev/null
tail -n 3 /tmp/ping.log
sent=$(sed -n 's/^\([0-9]*\) packets transmitted.*/\1/p' /tmp/ping.log)
got=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p; s/.*, \([0-9]*\) received.*/\1/p' /tmp/ping.log | head -n 1)
[ -n "$sent" ] && [ -n "$got" ] || fail "no ping summary"
lost=$((sent - got))
[ "$lost" -le 1 ] && echo "ok: the ping lost $lost of $sent replies" ||
    fail "the ping lost $lost of $sent replies (at most one may go)"
[ -f /tmp/source.exit ] && [ "$(cat /tmp/source.exit)" = 0 ] &&
    echo "ok: the source VMM ended (exit 0)" || fail "the source VMM did not end with 0"
last_source=$(acks source)
[ "$(acks target)" -gt "$last_source" ] && echo "ok: the target's guest acknowledged past block $last_source" ||
    fail "the target's guest did not go on past block $last_source"
grep -q "KIT: init reached" /tmp/guest-target.log && fail "the guest booted again on the target" ||
    echo "ok: the guest did not boot again"
expect_not source "KIT: FAIL"
expect_not target "KIT: FAIL"
downtime=$(sed -n 's/.*"downtime_ms":\([0-9.]*\).*/\1/p' /tmp/migrated.json)
total=$(sed -n 's/.*"total_ms":\([0-9.]*\).*/\1/p' /tmp/migrated.json)

# Stopped at the target, then the disk checked by the kit itself on a third boot.
last=$(acks target)
"$ENSPEED" vmm-api --socket /tmp/target.sock '{"cmd":"stop"}' >/dev/null || fail "stop the target"
wait
run_guest check 300 "$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
    --cmdline "console=ttyS0 quiet kit.task=blocks kit.dev=/dev/vda" --memory 256 --vcpus 1 \
    --disk /tmp/disk.img --serial stdout --api-socket /tmp/check.sock &
i=0
until grep -q "KIT: blocks found" /tmp/guest-check.log 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt 2400 ] && { fail "the check boot found no blocks"; break; }
    sleep 0.1
done
"$ENSPEED" vmm-api --socket /tmp/check.sock '{"cmd":"stop"}' >/dev/null 2>&1
wait
found=$(sed -n 's/.*KIT: blocks found last=\([0-9]*\) missing=\([0-9]*\).*/\1 \2/p' /tmp/guest-check.log | head -n 1)
set -- $found
[ "${1:-0}" -ge "$last" ] && [ "${2:-1}" = 0 ] &&
    echo "ok: the disk holds every acknowledged block (found up to $1, none missing; $last acknowledged)" ||
    fail "the disk: found '$found', $last acknowledged"
echo "MIGRATE: downtime $downtime total $total lost $lost"
finish enspeed-migrate
