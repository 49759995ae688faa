#!/bin/sh
# Test-host scenario (run.sh --extra /usr/sbin/ip --extra /usr/sbin/nft): a VM on a tenant
# network, through a power cut of its server. Needs iproute2's ip (namespaces) and nft.
#
# Namespaces on the test host, wired like a small rack:
#   sw            the switch: bridge sw0 (VM traffic, a trunk: tagged frames pass) and bridge
#                 mg0 (the servers' management network, 10.99.0.0/24)
#   s1, s2        VM servers: eth1 (uplink, on sw0) and mgmt (10.99.0.1 and .2, on mg0)
#   s3            the witness: mgmt 10.99.0.3
#   rt            the tenant's router on VLAN 10: lan.10, 10.50.0.1/24
#   x0, x20       strangers on sw0: 10.50.0.98 untagged, 10.50.0.97 on VLAN 20
# The cluster defines network "lan": bridge br-lan over eth1 on VLAN 10, subnet 10.50.0.0/24
# (DHCP; router .1). The VM (the guest kit's Debian kernel, kit.task=net,spoof,wait) gets its
# address by DHCP from the server running it, pings the router, then tries to send from
# another address and another MAC, which its server's bridge filter must drop. The router
# reaches it; the strangers do not. Then every process of its server is killed (a power cut):
# the router pings the VM's address until the VM, restarted on its backup with the same MAC
# and lease, answers: "VMNET: failover first-ping SECONDS vmm SECONDS".
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
command -v nft >/dev/null || { echo "FAIL: no nft: give run.sh --extra /usr/sbin/nft"; exit 2; }
# Busybox's shell runs its own ip applet before any in PATH: iproute2's by its path.
[ -x /usr/local/bin/ip ] || { echo "FAIL: no iproute2 ip: give run.sh --extra /usr/sbin/ip"; exit 2; }
ip() { /usr/local/bin/ip "$@"; }
echo 5 >/proc/sys/kernel/printk
ip link set lo up

VM_IP=10.50.0.2
cmdline="console=ttyS0 quiet kit.task=net,spoof,wait kit.ip=dhcp kit.peer=10.50.0.1"

for ns in sw rt s1 s2 s3 x0 x20; do
    ip netns add $ns && ip -n $ns link set lo up || { echo "FAIL: netns $ns"; exit 2; }
done
for br in sw0 mg0; do
    ip -n sw link add $br type bridge && ip -n sw link set $br up || { echo "FAIL: bridge $br"; exit 2; }
done
# wire NS IF PORT BRIDGE: a cable from NS's IF to the switch's BRIDGE (port PORT).
wire() {
    ip link add "$3" type veth peer name "$2" &&
        ip link set "$3" netns sw && ip link set "$2" netns "$1" &&
        ip -n sw link set "$3" master "$4" && ip -n sw link set "$3" up &&
        ip -n "$1" link set "$2" up || { echo "FAIL: wiring $1 $2"; exit 2; }
}
for i in 1 2 3; do
    wire s$i mgmt s$i-mg mg0
    ip -n s$i addr add 10.99.0.$i/24 dev mgmt
done
wire s1 eth1 s1-up sw0
wire s2 eth1 s2-up sw0
wire rt lan rt-lan sw0
ip -n rt link add link lan name lan.10 type vlan id 10 && ip -n rt link set lan.10 up &&
    ip -n rt addr add 10.50.0.1/24 dev lan.10 || { echo "FAIL: the router's VLAN"; exit 2; }
wire x0 lan x0-lan sw0
ip -n x0 addr add 10.50.0.98/24 dev lan
wire x20 lan x20-lan sw0
ip -n x20 link add link lan name lan.20 type vlan id 20 && ip -n x20 link set lan.20 up &&
    ip -n x20 addr add 10.50.0.97/24 dev lan.20 || { echo "FAIL: the stranger's VLAN"; exit 2; }
echo "ok: the switch, two VM servers, a witness, the router and two strangers"

addr() { echo "10.99.0.$1:720$1"; }
serial() { echo "/tmp/server$1/agent/vms/vm1/serial.log"; }
# The servers' Raft and lease timings, doubled from their defaults (ticks of 100 ms: a VM server
# stands for election 0.7 to 1.2 s after its leader fell silent, the witness 1.2 to 1.8 s; leases
# of 5 s, fencing after 3.5 s without a quorum). The test host's one emulated CPU, busy tearing
# down a killed VMM and its nested guest, delayed a vote by 0.5 s (2026-12-08); with the
# defaults, made for a server's CPU, the two survivors then split the vote and the VM server
# fenced itself before the second round ended.
# (A benchmark may set TIMING at the top of its copy: empty for the defaults.)
TIMING=${TIMING-"--tick-ms 100 --lease-ms 5000"}
start_server() {
    _id=$1
    shift
    _cap="--memory-mib 1024 --disk-gib 1"
    # The witness serves the API on its loopback, for the Manager's commands below.
    [ "$_id" = 3 ] && _cap="--witness --http 127.0.0.1:8080 --manager admin --manager-password-file /tmp/admin-pw"
    # shellcheck disable=SC2086 # one argument per word
    ENSPEED_LOG=info ip netns exec "s$_id" "$ENSPEED" server --id "$_id" --data "/tmp/server$_id" \
        --listen "$(addr "$_id")" $TIMING $_cap "$@" </dev/null >/dev/null 2>>"/tmp/server$_id.log" &
}
cluster() { ip netns exec s3 "$ENSPEED" cluster --server "$(addr 3)" --data /tmp/server3 "$@"; }
# api ARGS...: the enspeed command as the Manager, through the witness's API.
echo "manager-password-1" >/tmp/admin-pw
api() {
    ip netns exec s3 env ENSPEED_URL=http://127.0.0.1:8080 ENSPEED_USER=admin \
        ENSPEED_PASSWORD=manager-password-1 "$ENSPEED" "$@"
}
server_pids() {
    ps -o pid,args | while read -r _pid _args; do
        case "$_args" in *"/tmp/server$1"*) echo "$_pid" ;; esac
    done
}
vmm_running() { ps -o args | grep -q " vm[m] .*/tmp/server$1/"; }
disk_state() {
    cluster state 2>/dev/null | awk '/"disks"/ { d = 1 } /"kv"/ { exit }
        d && /"(primary|backup|generation|backup_synced)":/ { gsub(/[",]/, ""); printf "%s%s ", $1, $2 }'
}
dump() {
    for i in 1 2 3; do
        echo "---- server $i log (last lines) ----"
        tail -n 30 "/tmp/server$i.log"
        for f in agent/vms/vm1/vmm.log agent/vms/vm1/serial.log; do
            [ -e "/tmp/server$i/$f" ] || continue
            echo "---- server $i $f (last lines) ----"
            tail -n 30 "/tmp/server$i/$f" | tr -d '\r'
        done
        echo "---- server $i nft ----"
        ip netns exec "s$i" nft list ruleset 2>&1 | head -40
    done
    echo "---- disk: $(disk_state)"
}
# For the failure summary (guest.sh's finish), at the very end of a failed run's output.
scenario_summary() { cluster_summary; }
give_up() {
    fail "$1"
    dump
    finish enspeed-vmnet
}
wait_until() {
    _secs=$1 _what=$2
    shift 2
    now_cs
    _end=$((NOW_CS + _secs * 100))
    until "$@"; do
        now_cs
        [ "$NOW_CS" -lt "$_end" ] || give_up "timed out after ${_secs}s waiting for $_what"
        sleep 0.2
    done
}
leads() { cluster status 2>/dev/null | grep -q "\"leader\": $1,"; }
registered() { _s=$(cluster state 2>/dev/null) && case "$_s" in
    *'"mirror": "10.99.0.1:7301"'*'"mirror": "10.99.0.2:7302"'*) true ;; *) false ;; esac; }
synced() { case "$(disk_state)" in *"backup:$2 backup_synced:true "*"primary:$1 "*) true ;; *) false ;; esac; }
says() { tr -d '\r' <"$(serial "$1")" 2>/dev/null | tail -c +$(($2 + 1)) | grep -q "$3"; }
size() { if [ -e "$1" ]; then wc -c <"$1"; else echo 0; fi; }
reaches() { ip netns exec "$1" ping -c 1 -W 1 "$2" >/dev/null 2>&1; }

start_server 1 --init
wait_until 60 "server 1 to lead" eval 'ip netns exec s1 "$ENSPEED" cluster --server "$(addr 1)" --data /tmp/server1 status 2>/dev/null | grep -q "\"role\": \"Leader\""'
token=$(cat /tmp/server1/tls/cluster-token)
start_server 2 --join "$(addr 1)" --token "$token"
start_server 3 --join "$(addr 1)" --token "$token"
wait_until 60 "server 3 to know the leader" leads 1
wait_until 60 "both agents registered" registered
echo "ok: the cluster formed over the management network"

wait_until 60 "the API" eval 'api network list >/dev/null 2>&1'
made=$(api network create lan --bridge br-lan --uplink eth1 --vlan 10 --subnet 10.50.0.0/24 2>&1) ||
    give_up "enspeed network create refused: $made"
echo "ok: the Manager defined network lan: $(echo "$made" | tail -n 1)"
placed=$(cluster propose "{\"cmd\":\"create_vm\",\"name\":\"vm1\",\"memory_mib\":256,\"vcpus\":1,\"disk_size\":16777216,\"kernel\":\"$KIT/vmlinuz\",\"initrd\":\"$KIT/initrd.img\",\"cmdline\":\"$cmdline\",\"running\":false,\"networks\":[\"lan\"]}") ||
    give_up "create_vm refused: $placed"
primary=$(echo "$placed" | sed -n 's/.*"primary": \([0-9]*\).*/\1/p')
backup=$((3 - primary))
[ "$primary" = 1 ] || [ "$primary" = 2 ] || give_up "no primary in the answer: $placed"
state=$(cluster state 2>/dev/null)
mac=$(echo "$state" | sed -n 's/.*"mac": "\([0-9a-f:]*\)".*/\1/p' | head -n 1)
echo "$state" | grep -q "\"ip\": \"$VM_IP\"" || give_up "the VM's card was not leased $VM_IP"
echo "ok: VM vm1 on server $primary (backup $backup), its card $mac leased $VM_IP"
wait_until 120 "the new disk in sync" synced "$primary" "$backup"
cluster propose '{"cmd":"set_vm_running","name":"vm1","running":true}' >/dev/null || give_up "set_vm_running refused"
now_cs
started=$NOW_CS
# The guest's first boot: its kit tries its spoofs; a kernel that stalled before its init is
# the emulated AMD-V's glitch (see guest.sh's finish).
spoofs_tried() {
    says "$primary" 0 "KIT: spoof ok\|KIT: FAIL" && return 0
    vmm_running "$primary" && cluster_stalled "vm1-on-server$primary" "$(serial "$primary")" 0 "$started" &&
        give_up "the guest on server $primary stalled before its init"
    return 1
}
wait_until 300 "the guest on server $primary to try its spoofs" spoofs_tried
says "$primary" 0 "KIT: dhcp lease $VM_IP/24 router 10.50.0.1" &&
    echo "ok: the guest was leased $VM_IP by server $primary" || fail "the guest was not leased $VM_IP"
says "$primary" 0 "KIT: net ok" && echo "ok: the guest reached its router" || fail "the guest did not reach its router"
says "$primary" 0 "KIT: spoof ip blocked" && echo "ok: another address of the guest's was dropped" ||
    fail "the guest's other address got through"
says "$primary" 0 "KIT: spoof mac blocked" && echo "ok: another MAC of the guest's was dropped" ||
    fail "the guest's other MAC got through"
says "$primary" 0 "KIT: FAIL" && fail "the guest: $(tr -d '\r' <"$(serial "$primary")" | grep "KIT: FAIL")"
reaches rt $VM_IP && echo "ok: the router reaches the VM" || fail "the router does not reach the VM"
reaches x0 $VM_IP && fail "an untagged stranger reaches the VM" || echo "ok: an untagged stranger does not reach the VM"
reaches x20 $VM_IP && fail "a stranger on VLAN 20 reaches the VM" || echo "ok: a stranger on VLAN 20 does not reach the VM"
# The API shows the card: its MAC, its lease, and the address its guest took.
shows_ip() {
    _v=$(api vm show 1 2>/dev/null) && echo "$_v" | grep -q "\"mac\": \"$mac\"" &&
        echo "$_v" | grep -q "\"ip\": \"$VM_IP\"" && echo "$_v" | grep -A2 '"addresses"' | grep -q "\"$VM_IP\""
}
wait_until 30 "the API to show the VM's address" shows_ip
echo "ok: the API shows the card's MAC $mac and the address its guest uses, $VM_IP"
[ "$FAILS" = 0 ] || give_up "the VM's network failed before the power cut"

# The power cut: every process of the primary at once; the router pings the VM's address.
off=$(size "$(serial "$backup")")
# fenced ID: server ID fenced itself with something running since the power cut.
fences=$(fence_count "$backup")
fenced() { [ "$(fence_count "$1")" != "$fences" ]; }
now_cs
t0=$NOW_CS
# shellcheck disable=SC2046 # one pid per word
kill -9 $(server_pids "$primary")
# shellcheck disable=SC2046
kill -9 $(server_pids "$primary") 2>/dev/null
ip -n "s$primary" link set eth1 down
vmm_cs='' ping_cs=''
while :; do
    if [ -z "$vmm_cs" ] && vmm_running "$backup"; then
        now_cs
        vmm_cs=$((NOW_CS - t0))
    fi
    [ -n "$vmm_cs" ] && vmm_running "$backup" && ! fenced "$backup" &&
        cluster_stalled "vm1-on-server$backup" "$(serial "$backup")" "$off" $((t0 + vmm_cs)) &&
        give_up "the guest on server $backup stalled before its init"
    if reaches rt $VM_IP; then
        now_cs
        ping_cs=$((NOW_CS - t0))
        break
    fi
    now_cs
    [ $((NOW_CS - t0)) -lt 30000 ] || give_up "the VM did not answer its router within 300 s of the power cut"
done
[ -n "$vmm_cs" ] || vmm_cs=$ping_cs
echo "VMNET: failover first-ping $(secs "$ping_cs") vmm $(secs "$vmm_cs")"
says "$backup" "$off" "KIT: dhcp lease $VM_IP/24" && echo "ok: on server $backup the guest was leased $VM_IP again" ||
    fail "on server $backup the guest was not leased $VM_IP"
wait_until 120 "the guest on server $backup to try its spoofs" eval 'says "$backup" "$off" "KIT: spoof ok\|KIT: FAIL"'
says "$backup" "$off" "KIT: spoof ok" && echo "ok: on server $backup too, its other address and MAC were dropped" ||
    fail "on server $backup: $(tr -d '\r' <"$(serial "$backup")" | tail -c +$((off + 1)) | grep "KIT: FAIL")"
echo "$(cluster state 2>/dev/null)" | grep -q "\"mac\": \"$mac\"" && echo "ok: the card kept its MAC $mac" ||
    fail "the card's MAC changed"
[ "$FAILS" = 0 ] || dump
finish enspeed-vmnet
