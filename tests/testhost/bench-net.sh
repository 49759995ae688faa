#!/bin/sh
# Test-host scenario for scripts/bench-net.sh (which sets BENCH_ROUNDS and BENCH_MIB at the top
# of a copy, and passes --extra /usr/sbin/ip): guest-to-guest TCP throughput and round-trip
# time across two VM servers, EnSpeed's virtio-net beside QEMU's virtio-net with vhost-net, on
# the same taps, rounds alternating. Servers s1 and s2 are network namespaces, each with a
# bridge br-lan over its uplink eth1 and the VM's tap0 in it; the uplinks meet in the switch
# namespace's bridge. On s1 a guest serves BENCH_MIB MiB with busybox's httpd
# (kit.task=netserve); on s2 a guest pings it 20 times, fetches them with busybox's wget
# (kit.task=netbench), and stops it.
# Prints "BENCH KIND-rtt-ms MS" and "BENCH KIND-tcp-mibps MIBPS" per round.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
IP=/usr/local/bin/ip
[ -x $IP ] || { echo "FAIL: no iproute2 ip: give run.sh --extra /usr/sbin/ip"; exit 2; }
ip() { $IP "$@"; }
rounds=${BENCH_ROUNDS:-3}
mib=${BENCH_MIB:-64}
echo 5 >/proc/sys/kernel/printk
[ -e /dev/vhost-net ] || { echo "FAIL: no /dev/vhost-net (module vhost_net)"; exit 2; }

for ns in sw s1 s2; do ip netns add $ns && ip -n $ns link set lo up || exit 2; done
ip -n sw link add sw0 type bridge && ip -n sw link set sw0 up || exit 2
for i in 1 2; do
    ip link add s$i-up type veth peer name eth1 &&
        ip link set s$i-up netns sw && ip link set eth1 netns s$i &&
        ip -n sw link set s$i-up master sw0 && ip -n sw link set s$i-up up &&
        ip -n s$i link add br-lan type bridge && ip -n s$i link set eth1 master br-lan &&
        ip -n s$i tuntap add dev tap0 mode tap && ip -n s$i link set tap0 master br-lan &&
        for d in eth1 br-lan tap0; do ip -n s$i link set $d up || exit 2; done || {
        echo "FAIL: wiring server $i"
        exit 2
    }
done

KERNEL="$KIT/vmlinuz" INITRD="$KIT/initrd.img"
SINK="console=ttyS0 quiet kit.task=net,netserve kit.ip=10.70.0.1 kit.peer=none kit.mib=$mib"
SEND="console=ttyS0 quiet kit.task=net,netbench,poweroff kit.ip=10.70.0.2 kit.peer=10.70.0.1 kit.mib=$mib"

# vmm KIND NS MAC CMDLINE: the command that runs a guest of KIND in server NS on its tap0.
vmm() {
    case $1 in
    enspeed)
        echo "$IP netns exec $2 $ENSPEED vmm --kernel $KERNEL --initrd $INITRD --memory 256 --vcpus 1
            --net tap=tap0,mac=$3 --serial stdout --cmdline"
        ;;
    qemu)
        echo "$IP netns exec $2 qemu-system-x86_64 -accel kvm -cpu host -M microvm -m 256 -smp 1
            -nodefaults -no-user-config -display none -serial stdio -no-reboot
            -kernel $KERNEL -initrd $INITRD
            -netdev tap,id=net0,ifname=tap0,script=no,downscript=no,vhost=on
            -device virtio-net-device,netdev=net0,mac=$3 -append"
        ;;
    esac
}

# round KIND R: one sink, one sender; their figures as BENCH lines.
round() {
    _k=$1 _r=$2
    # shellcheck disable=SC2046 # the command's words
    run_guest "$_k-sink-$_r" 300 $(vmm "$_k" s1 02:45:53:00:01:01) "$SINK" &
    _sink=$!
    _i=0
    until grep -q " KIT: netserve listening" "/tmp/$_k-sink-$_r.marks" 2>/dev/null; do
        [ $_i -ge 1200 ] && { fail "$_k round $_r: the server never listened"; kill $_sink; return; }
        sleep 0.1
        _i=$((_i + 1))
    done
    # shellcheck disable=SC2046
    run_guest "$_k-send-$_r" 300 $(vmm "$_k" s2 02:45:53:00:01:02) "$SEND" ||
        fail "$_k round $_r: the sender's VMM exited with $?"
    wait $_sink || fail "$_k round $_r: the sink's VMM exited with $?"
    _m="/tmp/$_k-send-$_r.marks"
    grep -q " KIT: FAIL" "$_m" "/tmp/$_k-sink-$_r.marks" && fail "$_k round $_r: $(grep -h " KIT: FAIL" "$_m" "/tmp/$_k-sink-$_r.marks")"
    # A guest that reset (the VMM boots it again) measures again: its last figures count, and
    # the resets are told.
    for _g in send sink; do
        _n=$(grep -c "triple-faulted\|guest reset" "/tmp/guest-$_k-$_g-$_r.log")
        [ "$_n" = 0 ] || echo "RESETS $_k $_g $_r $_n"
    done
    _rtt=$(sed -n 's/.* KIT: rtt avg \([0-9.]*\).*/\1/p' "$_m" | tail -n 1)
    set -- $(sed -n 's/.* KIT: tcp \([0-9]*\) bytes in \([0-9]*\) cs.*/\1 \2/p' "$_m" | tail -n 1)
    if [ -n "$_rtt" ] && [ -n "$2" ] && [ "$2" -gt 0 ]; then
        echo "BENCH $_k-rtt-ms $_rtt"
        # MiB/s with two decimals, in integer arithmetic.
        _x=$(($1 * 100 * 100 / 1048576 / $2))
        echo "BENCH $_k-tcp-mibps $((_x / 100)).$(printf '%02d' $((_x % 100)))"
    else
        fail "$_k round $_r: no figures (rtt '$_rtt', tcp '$*')"
    fi
}

r=1
while [ $r -le "$rounds" ]; do
    round enspeed $r
    round qemu $r
    r=$((r + 1))
done
finish bench-net
