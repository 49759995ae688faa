#!/bin/sh
# Test-host scenario: a real Debian guest on a LiveSync disk. Two `enspeed blockd` servers
# on the test host's loopback hold the primary and the backup copy; `enspeed vmm` boots the
# unmodified Debian kernel with the disk over vhost-user-blk; the guest formats it, writes
# 4 MiB of random data, reads it back and powers off. Then the backup's copy must equal the
# primary's byte for byte and, mounted, hold the guest's file with the checksum it printed.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
proof=livesync-$$

ip link set lo up
# Their mirror link is mutual TLS, as between a cluster's servers: a CA and server a's
# certificate, then server b's under it.
"$ENSPEED" certs init /tmp/certs-a --id 1 || fail "make the CA"
"$ENSPEED" certs issue --ca /tmp/certs-a --id 2 /tmp/certs-b || fail "issue server b's certificate"
start_blockd() { # NAME PORT
    mkdir -p "/tmp/$1"
    ENSPEED_LOG=info "$ENSPEED" blockd --dir "/tmp/$1/disks" --listen "127.0.0.1:$2" \
        --control "/tmp/$1/control.sock" --tls "/tmp/certs-$1" >"/tmp/$1/blockd.log" 2>&1 &
    i=0
    until [ -S "/tmp/$1/control.sock" ]; do
        i=$((i + 1))
        [ $i -gt 100 ] && { fail "blockd $1 did not start: $(cat "/tmp/$1/blockd.log")"; finish enspeed-livesync; }
        sleep 0.1
    done
}
disk() { # SERVER ARGS...
    _s=$1; shift
    "$ENSPEED" disk --control "/tmp/$_s/control.sock" "$@"
}
start_blockd a 7400
start_blockd b 7401
disk a create d --size 64M || fail "create the primary"
disk b create d --size 64M --backup --peer-server 1 || fail "create the backup"
disk a attach d 127.0.0.1:7401 --peer-server 2 || fail "attach the backup"
i=0
until disk a status d | grep -q "link in-sync"; do
    i=$((i + 1))
    [ $i -gt 300 ] && { fail "no initial sync: $(disk a status d)"; finish enspeed-livesync; }
    sleep 0.1
done
echo "ok: primary and backup in sync: $(disk a status d)"

run_guest enspeed 300 "$ENSPEED" vmm --kernel "$KIT/vmlinuz" --initrd "$KIT/initrd.img" \
    --cmdline "console=ttyS0 quiet kit.task=fs,poweroff kit.proof=$proof" \
    --memory 256 --vcpus 1 --disk vhost-user=/tmp/a/disks/d/vhost.sock \
    --serial stdout ||
    fail "enspeed vmm exited with $? (expected 0 when the guest powers off)"

expect enspeed "KIT: init reached"
expect enspeed "KIT: fs ok"
expect enspeed "KIT: poweroff"
expect_not enspeed "KIT: FAIL"
sum=$(sed -n 's/.*KIT: fs ok sha256=\([0-9a-f]*\).*/\1/p' /tmp/enspeed.marks | head -n 1)
[ -n "$sum" ] || { fail "no checksum in the guest's output"; finish enspeed-livesync; }

cmp /tmp/a/disks/d/data /tmp/b/disks/d/data || fail "the backup's copy differs from the primary's"
echo "ok: the backup's copy equals the primary's byte for byte"
mkdir -p /tmp/backup-mnt
mount -t ext4 -o loop,ro /tmp/b/disks/d/data /tmp/backup-mnt ||
    { fail "cannot mount the backup's copy"; finish enspeed-livesync; }
got=$(sha256sum /tmp/backup-mnt/data | cut -d' ' -f1)
word=$(cat /tmp/backup-mnt/kit-proof)
umount /tmp/backup-mnt
[ "$got" = "$sum" ] || fail "the backup's /data has sha256 $got, the guest wrote $sum"
[ "$word" = "$proof" ] || fail "the backup's /kit-proof holds '$word', expected '$proof'"
echo "ok: the backup's filesystem holds the guest's data (sha256 $sum) and proof"

finish enspeed-livesync
