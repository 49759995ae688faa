#!/bin/sh
# Test-host scenario: failover of a real Debian guest after a power cut of its primary server.
# Three `enspeed server`s on the test host's loopback form a cluster: 127.0.0.1:7201 and :7202
# run VMs (their node agents run blockd, mirroring on port + 100, and the VMMs), :7203 is the
# witness. A VM with a LiveSync disk boots the unmodified Debian kernel of the guest kit with
# kit.task=keep: on its first boot it formats the disk and writes 4 MiB of random data and a
# proof word naming the disk's generation, syncs, reads it back and prints the checksum.
# Then each drill (FAILOVER_DRILLS, default 1 in ./test.sh, whose budget is tight; the
# level-1 failover tests cut the primary again and again; scripts/bench-failover-linux.sh sets
# it at the top of a copy of this script, since the test host passes no environment):
#   - once the guest reported its data written and the backup is in sync, every process of the
#     primary server (server, blockd, VMM) is killed with SIGKILL, like a power cut;
#   - the time runs to the VMM running on the backup and to "KIT: init reached" on its serial
#     console: printed as "FAILOVER: vmm SECONDS init SECONDS resets N" (N: guest resets the
#     VMM saw meanwhile, so a boot that took two is told apart);
#   - the guest there must find the checksum and the proof word the previous boot wrote
#     ("KIT: fs found"), then writes new data; the disk's generation is one higher;
#   - the killed server is restarted, returns as the backup and is resynced: the next target.
# At the end the resynced copy must equal the primary's byte for byte.
. /usr/lib/testhost/guest.sh

[ -x "$ENSPEED" ] || { echo "FAIL: no $ENSPEED: give run.sh --enspeed PATH"; exit 2; }
drills=${FAILOVER_DRILLS:-1}
# The proof word each boot writes; {generation} is the disk's generation at that boot.
cmdline="console=ttyS0 quiet kit.task=keep kit.proof=failover-{generation}"

ip link set lo up
# Kernel warnings (a soft lockup's backtrace) reach the console too.
echo 5 >/proc/sys/kernel/printk

addr() { echo "127.0.0.1:720$1"; }
serial() { echo "/tmp/server$1/agent/vms/vm1/serial.log"; }

# start_server ID ARGS...: server ID on its own data directory, logging to /tmp/serverID.log.
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
    [ "$_id" = 3 ] && _cap=--witness
    # shellcheck disable=SC2086 # one argument per word
    ENSPEED_LOG=info "$ENSPEED" server --id "$_id" --data "/tmp/server$_id" --listen "$(addr "$_id")" \
        $TIMING $_cap "$@" </dev/null >/dev/null 2>>"/tmp/server$_id.log" &
}

# cluster ARGS...: `enspeed cluster` through the witness (never killed).
# As server 3 (its certificate, in its data directory).
cluster() { "$ENSPEED" cluster --server "$(addr 3)" --data /tmp/server3 "$@"; }

# disk_state: the VM's disk record, "backup:B backup_synced:true generation:G primary:P ..."
# (read linearizably; "disks" is the first record of the state, "kv" the next).
disk_state() {
    cluster state 2>/dev/null | awk '/"disks"/ { d = 1 } /"kv"/ { exit }
        d && /"(primary|backup|generation|backup_synced)":/ { gsub(/[",]/, ""); printf "%s%s ", $1, $2 }'
}

# vmm_running ID: a VMM of server ID runs (the pattern does not match grep's own arguments).
vmm_running() { ps -o args | grep -q " vm[m] .*/tmp/server$1/"; }

# server_pids ID: every process of server ID (its own arguments name its data directory, and so
# do those of the blockd and VMMs its agent started).
server_pids() {
    ps -o pid,args | while read -r _pid _args; do
        case "$_args" in *"/tmp/server$1"*) echo "$_pid" ;; esac
    done
}

# The clock after a power cut polls every 50 ms with shell builtins only (no fork, which costs
# milliseconds under TCG), so as to take little from the booting guest.
# vmm_started ID: like vmm_running (the shell's read drops the NULs of /proc/PID/cmdline).
vmm_started() {
    for _p in /proc/[0-9]*; do
        _c=
        read -r _c 2>/dev/null <"$_p/cmdline"
        case "$_c" in *"vmm--kernel"*"/tmp/server$1/"*) return 0 ;; esac
    done
    return 1
}

# read_serial: reads what the serial console open on descriptor 3 gained and adds its
# "KIT: init reached" lines to INITS (a line still being written waits in _part).
read_serial() {
    while :; do
        if IFS= read -r _l <&3; then
            _l="$_part$_l" _part=
            case "$_l" in *"KIT: init reached"*) INITS=$((INITS + 1)) ;; esac
        else
            _part="$_part$_l"
            return
        fi
    done
}

# since ID OFFSET: server ID's serial console from byte OFFSET on, without carriage returns.
since() { tail -c +$(($2 + 1)) "$(serial "$1")" 2>/dev/null | tr -d '\r'; }

size() { if [ -e "$1" ]; then wc -c <"$1"; else echo 0; fi; }

dump() {
    for i in 1 2 3; do
        echo "---- server $i log (last lines) ----"
        tail -n 40 "/tmp/server$i.log"
        for f in agent/blockd.log agent/vms/vm1/vmm.log agent/vms/vm1/serial.log; do
            [ -e "/tmp/server$i/$f" ] || continue
            echo "---- server $i $f (last lines) ----"
            tail -n 30 "/tmp/server$i/$f" | tr -d '\r'
        done
    done
    echo "---- disk: $(disk_state)"
}

# For the failure summary (guest.sh's finish), at the very end of a failed run's output.
scenario_summary() { cluster_summary; }

# give_up MSG: a failed check after which the scenario cannot go on.
give_up() {
    fail "$1"
    dump
    finish enspeed-failover
}

# wait_until SECS WHAT CMD...: polls CMD every 0.2 s until it succeeds, saying every 30 s what
# it waits for; gives up after SECS.
wait_until() {
    _secs=$1 _what=$2
    shift 2
    now_cs
    _end=$((NOW_CS + _secs * 100)) _say=$((NOW_CS + 3000))
    until "$@"; do
        now_cs
        [ "$NOW_CS" -lt "$_end" ] || give_up "timed out after ${_secs}s waiting for $_what"
        if [ "$NOW_CS" -ge "$_say" ]; then
            echo "still waiting for $_what (disk: $(disk_state))"
            _say=$((NOW_CS + 3000))
        fi
        sleep 0.2
    done
}

leads() { cluster status 2>/dev/null | grep -q "\"leader\": $1,"; }
has_mirrors() { _s=$(cluster state 2>/dev/null) && case "$_s" in
    *'"mirror": "127.0.0.1:7301"'*'"mirror": "127.0.0.1:7302"'*) true ;; *) false ;; esac; }

start_server 1 --init
wait_until 60 "server 1 to lead" eval '"$ENSPEED" cluster --server "$(addr 1)" --data /tmp/server1 status 2>/dev/null | grep -q "\"role\": \"Leader\""'
# The others join with the cluster's join token, made with its CA by server 1.
token=$(cat /tmp/server1/tls/cluster-token)
start_server 2 --join "$(addr 1)" --token "$token"
start_server 3 --join "$(addr 1)" --token "$token"
wait_until 60 "server 3 to know the leader" leads 1
wait_until 60 "both agents registered" has_mirrors
echo "ok: three servers, two with an agent, one witness"

# synced P B: the VM's disk is primary on server P and in sync on server B.
synced() {
    case "$(disk_state)" in
    *"backup:$2 backup_synced:true "*"primary:$1 "*) true ;;
    *) false ;;
    esac
}

# protected P B OFFSET: synced, the VM runs on P, and the guest's boot (from OFFSET of P's
# serial console) has written its data.
protected() {
    synced "$1" "$2" && since "$1" "$3" | grep -q "KIT: fs ok" && vmm_running "$1"
}

# Created stopped and started once its disk is in sync, so that the first boot does not share
# the test host's two emulated CPUs with the initial full sync.
placed=$(cluster propose "{\"cmd\":\"create_vm\",\"name\":\"vm1\",\"memory_mib\":256,\"vcpus\":1,\"disk_size\":67108864,\"kernel\":\"$KIT/vmlinuz\",\"initrd\":\"$KIT/initrd.img\",\"cmdline\":\"$cmdline\",\"running\":false}") ||
    give_up "create_vm refused: $placed"
echo "placed: $(echo "$placed" | tr -d ' \n')"
primary=$(echo "$placed" | sed -n 's/.*"primary": \([0-9]*\).*/\1/p')
backup=$((3 - primary))
[ "$primary" = 1 ] || [ "$primary" = 2 ] || give_up "no primary in the answer"
wait_until 120 "the new disk in sync" synced "$primary" "$backup"
vmm_running "$primary" && fail "the VM runs before it was started"
cluster propose '{"cmd":"set_vm_running","name":"vm1","running":true}' >/dev/null ||
    give_up "set_vm_running refused"
now_cs
started=$NOW_CS
# ready P B OFFSET: protected; on the guest's first boot, a kernel that stalled before its init
# is the emulated AMD-V's glitch (see guest.sh's finish).
ready() {
    protected "$@" && return 0
    [ "$drill" = 0 ] && vmm_running "$1" && cluster_stalled "vm1-on-server$1" "$(serial "$1")" 0 "$started" &&
        give_up "the guest on server $1 stalled before its init"
    return 1
}

boot_off=0 # where the guest's current boot starts in its primary's serial console
drill=0
while [ "$drill" -lt "$drills" ]; do
    wait_until 300 "drill $drill: the guest's data written on server $primary, in sync on server $backup" \
        ready "$primary" "$backup" "$boot_off"
    vmm_running "$backup" && fail "drill $drill: the VM runs on its backup too"
    since "$primary" "$boot_off" | grep "KIT: FAIL" && fail "drill $drill: the guest on server $primary failed"
    sum=$(since "$primary" "$boot_off" | sed -n 's/.*KIT: fs ok sha256=\([0-9a-f]*\).*/\1/p' | tail -n 1)
    generation=$(disk_state | sed -n 's/.*generation:\([0-9]*\) .*/\1/p')
    leader=$(cluster status 2>/dev/null | sed -n 's/.*"leader": \([0-9]*\).*/\1/p')
    off=$(size "$(serial "$backup")")
    vmm_off=$(size "/tmp/server$backup/agent/vms/vm1/vmm.log")
    fences=$(fence_count "$backup")
    pids=$(server_pids "$primary")
    # The backup's serial console, read from where it ends now.
    console=$(serial "$backup") opened='' _part=''
    if [ -e "$console" ]; then
        exec 3<"$console"
        opened=1
        read_serial
    fi
    INITS=0

    # The power cut: every process of the primary at once (a second pass for any child
    # started meanwhile; they also die with their server).
    now_cs
    t0=$NOW_CS
    # shellcheck disable=SC2086 # one pid per word
    kill -9 $pids
    # shellcheck disable=SC2046
    kill -9 $(server_pids "$primary") 2>/dev/null
    vmm_cs='' init_cs=''
    while :; do
        if [ -z "$vmm_cs" ] && vmm_started "$backup"; then
            now_cs
            vmm_cs=$((NOW_CS - t0))
        fi
        if [ -n "$vmm_cs" ]; then
            [ -n "$opened" ] || { [ -e "$console" ] && exec 3<"$console" && opened=1; }
            [ -n "$opened" ] && read_serial
            if [ "$INITS" -gt 0 ]; then
                now_cs
                init_cs=$((NOW_CS - t0))
                break
            fi
            # A kernel that stalled before its init: the emulated AMD-V's glitch (see
            # guest.sh's finish).
            now_cs
            if [ $((NOW_CS - t0 - vmm_cs)) -ge $((BOOT_STALL_SECS * 100)) ]; then
                # A stall only if its VMM still runs there and its server did not fence.
                vmm_started "$backup" && [ "$(fence_count "$backup")" = "$fences" ] &&
                    cluster_stalled "vm1-on-server$backup" "$console" "$off" $((t0 + vmm_cs))
                give_up "drill $drill: the guest on server $backup did not reach its init within ${BOOT_STALL_SECS}s of its VMM's start"
            fi
        fi
        now_cs
        [ $((NOW_CS - t0)) -lt 30000 ] ||
            give_up "drill $drill: no VMM or no init on server $backup 300 s after the power cut"
        sleep 0.05
    done
    exec 3<&-
    # A guest that reset while booting (the VMM boots it again) reaches init later: say so.
    resets=$(tail -c +$((vmm_off + 1)) "/tmp/server$backup/agent/vms/vm1/vmm.log" | grep -c "guest reset; booting again")
    echo "drill $drill: server $primary (Raft leader: server $leader) killed; VMM on server $backup after $(secs "$vmm_cs") s, the guest's init after $(secs "$init_cs") s ($resets guest resets)"
    echo "FAILOVER: vmm $(secs "$vmm_cs") init $(secs "$init_cs") resets $resets"

    # The guest on the backup finds what the previous boot wrote, then writes anew.
    wait_until 300 "drill $drill: the guest on server $backup to write its data" \
        eval 'since "$backup" "$off" | grep -q "KIT: fs ok"'
    found=$(since "$backup" "$off" | sed -n 's/.*KIT: fs found sha256=\([0-9a-f]*\) proof=\([^ ]*\).*/\1 \2/p' | head -n 1)
    if [ "$found" = "$sum failover-$generation" ]; then
        echo "ok: drill $drill: the guest on server $backup found the data written before the power cut (sha256 $sum, proof failover-$generation)"
    else
        fail "drill $drill: the guest on server $backup found '$found', the previous boot wrote '$sum failover-$generation'"
    fi
    since "$backup" "$off" | grep "KIT: FAIL" && fail "drill $drill: the guest on server $backup failed"
    case "$(disk_state)" in
    *"generation:$((generation + 1)) primary:$backup "*) ;;
    *) fail "drill $drill: the disk is $(disk_state), expected primary $backup at generation $((generation + 1))" ;;
    esac
    [ "$(fence_count "$backup")" = "$fences" ] ||
        fail "drill $drill: server $backup fenced itself: $(grep "$FENCED" "/tmp/server$backup.log" | tail -n 1)"
    [ "$FAILS" = 0 ] || give_up "drill $drill failed"

    # The killed server returns (same data directory), as the backup: the next drill's target.
    start_server "$primary"
    boot_off=$off
    backup=$primary
    primary=$((3 - primary))
    drill=$((drill + 1))
done

# The returning server's resynced copy equals the primary's (the guest writes no more).
wait_until 300 "server $backup to return as the backup, in sync" protected "$primary" "$backup" "$boot_off"
vmm_running "$backup" && fail "the returned server $backup runs the VM too"
if cmp "/tmp/server$primary/disks/vm1-0/data" "/tmp/server$backup/disks/vm1-0/data"; then
    echo "ok: server $backup's resynced copy equals server $primary's byte for byte"
else
    fail "server $backup's resynced copy differs from server $primary's"
fi
[ "$FAILS" = 0 ] || dump
finish enspeed-failover
