#!/bin/bash
# Boots the test guest under QEMU in every way it is meant to be used and
# checks the `tg: ` lines. Prints "N passed, N failed" last; exit 1 on any
# failure. Needs qemu-system-x86_64; the net cases need root (a network
# namespace with a tap device, removed afterwards) and are skipped without.
#   TG_ACCEL=kvm|tcg   (default: kvm if /dev/kvm is usable)
#   TG_ELF=path        (default: build with ./build.sh)
set -u
cd "$(dirname "$0")"
ELF=${TG_ELF:-$(./build.sh 2>/dev/null | tail -n1)}
[ -f "$ELF" ] || { echo "smoke: no ELF (build failed?)"; echo "0 passed, 1 failed"; exit 1; }
command -v qemu-system-x86_64 >/dev/null || { echo "smoke: qemu-system-x86_64 missing"; echo "0 passed, 1 failed"; exit 1; }
if [ -z "${TG_ACCEL:-}" ]; then
    if [ -w /dev/kvm ]; then TG_ACCEL=kvm; else TG_ACCEL=tcg; fi
fi
if [ "$TG_ACCEL" = kvm ]; then ACCEL=(-accel kvm -cpu host,-arch-capabilities); else ACCEL=(-accel tcg); fi
WORK=$(mktemp -d /tmp/tgsmoke.XXXXXX)
NS=tgsmoke$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
pass=0
fail=0

# microvm with ACPI does not add virtio_mmio.device= itself (QEMU only does
# that with acpi=off), so pass the transport the first device lands on.
VDEV="virtio_mmio.device=512@0xfeb02e00:28"
MICROVM=(qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off -global virtio-mmio.force-legacy=false
         -m 256 -nodefaults -no-user-config -display none -no-reboot "${ACCEL[@]}" -kernel "$ELF")
PC=(qemu-system-x86_64 -m 256 -nodefaults -no-user-config -display none -no-reboot "${ACCEL[@]}" -kernel "$ELF")
truncate -s 64M "$WORK/disk.img"
DISK=(-drive "id=d0,file=$WORK/disk.img,format=raw,if=none" -device virtio-blk-device,drive=d0,serial=tg-smoke)

# check NAME LOG PATTERN...: every extended regex must match a line.
check() {
    local name=$1 log=$2 ok=1
    shift 2
    for pat in "$@"; do
        grep -Eq "$pat" "$log" || { echo "smoke: $name: missing /$pat/"; ok=0; }
    done
    if [ $ok = 1 ]; then
        echo "smoke: $name ok"; pass=$((pass + 1))
    else
        sed 's/^/    | /' "$log" | tail -n 25; fail=$((fail + 1))
    fi
}

# run NAME SECONDS CMD...: run to exit (QEMU must exit by itself).
run() {
    local name=$1 secs=$2
    shift 2
    timeout -k 5 "$secs" "$@" -serial "file:$WORK/$name.log" -monitor none </dev/null >"$WORK/$name.out" 2>&1
    local rc=$?
    [ $rc = 124 ] && echo "timeout: QEMU did not exit" >>"$WORK/$name.log"
    [ $rc = 0 ] && echo "qemu-exited-ok" >>"$WORK/$name.log"
    cat "$WORK/$name.out" >>"$WORK/$name.log"
}

run blk 120 "${MICROVM[@]}" "${DISK[@]}" -append "console=ttyS0 $VDEV tg.run=blk,blkid tg.end=poweroff"
check blk "$WORK/blk.log" '^tg: entry$' '^tg: boot pvh ' '^tg: dev 0 blk base=0xfeb02e00$' \
    '^tg: blk dev=0 sectors=131072 ro=0 flush=1$' '^tg: ready$' '^tg: blk ok blocks=64$' \
    '^tg: blk id=tg-smoke$' '^tg: done ok$' '^tg: end poweroff$' '^qemu-exited-ok$'

run stamp 120 "${MICROVM[@]}" "${DISK[@]}" -append "console=ttyS0 $VDEV tg.run=stamp,verify tg.ops=20 tg.blocks=8 tg.flushevery=4 tg.end=poweroff"
check stamp "$WORK/stamp.log" '^tg: ack blk=4 seq=20$' '^tg: flushed seq=20$' '^tg: verify blk=0 seq=16$' \
    '^tg: verify ok blocks=8 torn=0$' '^tg: done ok$'

printf 'X' | dd of="$WORK/disk.img" bs=1 seek=$((3 * 4096 + 100)) conv=notrunc 2>/dev/null
run torn 120 "${MICROVM[@]}" "${DISK[@]}" -append "console=ttyS0 $VDEV tg.run=verify tg.blocks=10 tg.end=poweroff"
check torn "$WORK/torn.log" '^tg: verify blk=3 torn$' '^tg: verify blk=9 empty$' '^tg: verify ok blocks=10 torn=1$'

run bench 120 "${MICROVM[@]}" "${DISK[@]}" -append "console=ttyS0 $VDEV tg.run=bench tg.mode=seqread tg.bs=1M tg.qd=4 tg.ops=64 tg.end=poweroff"
check bench "$WORK/bench.log" '^tg: bench start$' '^tg: bench done ops=64 bytes=67108864$' '^tg: done ok$'

run randbench 120 "${MICROVM[@]}" "${DISK[@]}" -append "console=ttyS0 $VDEV tg.run=bench tg.mode=randwrite tg.qd=16 tg.ops=500 tg.span=8M tg.end=poweroff"
check randbench "$WORK/randbench.log" '^tg: bench done ops=500 bytes=2048000$' '^tg: done ok$'

run legacy 60 "${MICROVM[@]}" -global virtio-mmio.force-legacy=true "${DISK[@]}" -append "console=ttyS0 $VDEV tg.run=blk tg.end=reboot"
check legacy "$WORK/legacy.log" '^tg: FAIL virtio-mmio 0xfeb02e00 legacy$' '^tg: FAIL blk no-device$' \
    '^tg: done fail$' '^tg: end reboot$' '^qemu-exited-ok$'

run pc-poweroff 60 "${PC[@]}" -M pc -append "console=ttyS0 tg.end=poweroff"
check pc-poweroff "$WORK/pc-poweroff.log" '^tg: done ok$' '^tg: end poweroff$' '^qemu-exited-ok$'

run pc-reboot 60 "${PC[@]}" -M q35 -append "console=ttyS0 tg.end=reboot"
check q35-reboot "$WORK/pc-reboot.log" '^tg: end reboot$' '^qemu-exited-ok$'

# kbd: send Ctrl-Alt-Del through the monitor once the guest waits for it.
timeout -k 5 60 "${PC[@]}" -M pc -serial "file:$WORK/kbd.log" -monitor "unix:$WORK/mon.sock,server,nowait" \
    -append "console=ttyS0 tg.run=kbd tg.end=kbd-reset" </dev/null >"$WORK/kbd.out" 2>&1 &
qp=$!
PIDS+=("$qp")
for _ in $(seq 150); do grep -q 'kbd waiting' "$WORK/kbd.log" 2>/dev/null && break; sleep 0.2; done
python3 - "$WORK/mon.sock" <<'PY'
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(0.3)
s.send(b"sendkey ctrl-alt-delete\n"); time.sleep(0.5)
PY
wait "$qp" && echo qemu-exited-ok >>"$WORK/kbd.log"
check kbd "$WORK/kbd.log" '^tg: kbd scancodes=.*1d.*38.*e0,53' '^tg: kbd ctrl-alt-del$' '^tg: end kbd-reset$' '^qemu-exited-ok$'

if [ "$TG_ACCEL" = kvm ]; then
    timeout -k 5 60 python3 tools/kvmboot.py "$ELF" "console=ttyS0 tg.run=sleep tg.spin=1000 tg.end=halt" 30 >"$WORK/linux.log" 2>&1 \
        && echo guest-halted >>"$WORK/linux.log"
    check linux-entry "$WORK/linux.log" '^tg: entry$' '^tg: boot linux info=0x7000 rsdp=0x0$' \
        '^tg: cmdline console=ttyS0 tg.run=sleep' '^tg: done ok$' '^tg: end halt$' '^guest-halted$'
    # Misbehaving devices (tools/kvmboot.py TG_FAKE) must give FAIL lines.
    for mode in badid:'used-ring bad id 999' idxjump:'used-idx jumped by' biglen:'used-ring bad len' silent:timeout; do
        TG_FAKE=${mode%%:*} timeout -k 5 60 python3 tools/kvmboot.py "$ELF" \
            "virtio_mmio.device=512@0xd0000000:5 tg.run=blkid tg.timeout=1000 tg.end=halt" 30 >"$WORK/fake.log" 2>&1 \
            && echo guest-halted >>"$WORK/fake.log"
        check "fake-${mode%%:*}" "$WORK/fake.log" "^tg: FAIL blkid ${mode#*:}" '^tg: done fail$' '^guest-halted$'
    done
fi

if [ "$(id -u)" = 0 ] && [ -c /dev/net/tun ] && ip netns add "$NS" 2>/dev/null; then
    ip netns exec "$NS" sh -c 'ip link set lo up && ip tuntap add tgtap0 mode tap &&
        ip addr add 10.77.0.1/24 dev tgtap0 && ip link set tgtap0 up'
    NET=(-netdev tap,id=n0,ifname=tgtap0,script=no,downscript=no -device virtio-net-device,netdev=n0,mac=52:54:00:74:67:01)
    run net 60 ip netns exec "$NS" "${MICROVM[@]}" "${NET[@]}" \
        -append "console=ttyS0 $VDEV tg.run=net tg.ip=10.77.0.2 tg.peer=10.77.0.1 tg.end=poweroff"
    check net "$WORK/net.log" '^tg: dev 0 net base=0xfeb02e00$' '^tg: net dev=0 mac=52:54:00:74:67:01$' \
        '^tg: net ok peer_mac=([0-9a-f]{2}:){5}[0-9a-f]{2}$' '^tg: done ok$'
    ip netns exec "$NS" ip neigh flush dev tgtap0
    ip netns exec "$NS" timeout -k 5 60 "${MICROVM[@]}" "${NET[@]}" -serial "file:$WORK/wait.log" -monitor none \
        -append "console=ttyS0 $VDEV tg.ip=10.77.0.2 tg.end=wait" </dev/null >/dev/null 2>&1 &
    qp=$!
    PIDS+=("$qp")
    for _ in $(seq 150); do grep -q 'end wait' "$WORK/wait.log" 2>/dev/null && break; sleep 0.2; done
    if command -v ping >/dev/null; then
        ip netns exec "$NS" ping -c 3 -i 0.3 -W 5 10.77.0.2 >>"$WORK/wait.log" 2>&1 && echo ping-ok >>"$WORK/wait.log"
    else
        echo "ping-ok (no ping binary: skipped)" >>"$WORK/wait.log"
    fi
    kill "$qp" 2>/dev/null; wait "$qp" 2>/dev/null
    check wait "$WORK/wait.log" '^tg: end wait$' '^ping-ok'
else
    echo "smoke: net cases skipped (need root and /dev/net/tun)"
fi

echo "$pass passed, $fail failed"
[ $fail = 0 ]
