#!/usr/bin/env bash
# Power-cut drills on three installed appliances (issue 12): not part of ./test.sh (it takes
# long); its figures go to BENCHMARKS.md.
#
#   DRILLS=10 scripts/drill-appliances.sh        (root: a network namespace, taps, QEMU)
#
# Three QEMU machines (TCG with an emulated AMD-V, as the test host) on one virtual network (a
# bridge in a network namespace of their own; this machine is 10.0.0.1 on it) are installed
# from the appliance ISO unattended: the first creates the cluster (10.0.0.11), the two others
# join it (10.0.0.12, .13) with the join information its API gives. A VM (a blank PC that boots
# the guest kit from a CD in the ISO library, kit.task=blocks) keeps writing numbered,
# self-describing 4 KiB blocks to its LiveSync disk, one at a time, each flushed, and
# acknowledges each on its serial console once the write returned. A watcher reads that console
# through the API of an appliance that is not the VM's primary. Each drill, once the disk is in
# sync and the acknowledgements advance: the QEMU process of the VM's primary appliance is
# killed (a power cut: its page cache is lost with it); the VM must run on its backup, and the
# guest booted there must find whole every block up to the last acknowledgement the watcher
# saw (the kit reads its ring of blocks before writing on). Then the killed appliance is
# powered on again and returns before the next drill.
# An appliance whose own kernel fails (a panic under the emulated AMD-V, which no real server
# has) is powered on again and its drill is run again; such failures are counted and printed.
# Prints "DRILL n: backup runs it after S s, data checked after S s, blocks lost 0" and, at the
# end, Markdown for BENCHMARKS.md; exits 1 on the first drill that loses data or times out.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
drills=${DRILLS:-10}
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed >&2
iso=$(image/appliance/build.sh "$CARGO_TARGET_DIR/release/enspeed" | tail -n 1)
work=$(mktemp -d /tmp/drill-appliances.XXXXXX)
ns=enspeed-drill-$$
log() { echo "drill: $*" >&2; }
die() { echo "drill: FAILED: $*" >&2; echo "drill: consoles and logs kept in $work" >&2; exit 1; }

kit=$work/kit-blocks.iso
image/kit/iso.sh "$kit" "console=ttyS0 quiet kit.task=blocks kit.dev=/dev/vda" enspeed-cd >/dev/null

cleanup() {
    for f in "$work"/qemu*.pid; do
        [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true
    done
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
. tests/appliance/net.sh
appliance_net "$ns" t1 t2 t3
for i in 1 2 3; do
    truncate -s 16G "$work/disk$i.img"
done
password=$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')

# qemu I LOG EXTRA...: appliance I's machine, in the background (its pid in qemuI.pid).
qemu() {
    local i=$1 log=$2
    shift 2
    ip netns exec "$ns" qemu-system-x86_64 -name "drill-$i" -accel tcg -cpu EPYC,+svm -smp 2 -m 2560 \
        -display none -no-reboot -serial "file:$log" \
        -drive "file=$work/disk$i.img,if=virtio,format=raw" \
        -netdev "tap,id=n0,ifname=t$i,script=no,downscript=no" \
        -device "virtio-net-pci,netdev=n0,mac=52:54:00:00:10:0$i" "$@" \
        2> >(grep -v "TCG doesn't support requested feature" >&2) &
    echo $! >"$work/qemu$i.pid"
}

# install I CLUSTER-TOML: installs appliance I (10.0.0.1I) and waits for it to power off.
install() {
    local i=$1
    cat >"$work/answers$i.toml" <<TOML
disk = "/dev/vda"
hostname = "drill$i"
[network]
interface = "auto"
address = "10.0.0.1$i/24"
[cluster]
$2
[after]
poweroff = true
TOML
    rm -f "$work/answers$i.img"
    mkfs.vfat -n ENSPEED -C "$work/answers$i.img" 2048 >/dev/null
    mcopy -i "$work/answers$i.img" "$work/answers$i.toml" ::enspeed-install.toml
    log "installing appliance $i"
    qemu "$i" "$work/install$i.log" -drive "file=$work/answers$i.img,if=virtio,format=raw,readonly=on" \
        -drive "file=$iso,media=cdrom,readonly=on" -boot order=d
    local pid
    pid=$(cat "$work/qemu$i.pid")
    wait "$pid" || true
    grep -qa "ENSPEED-INSTALL: DONE" "$work/install$i.log" || die "appliance $i did not install (see $work/install$i.log)"
}

# run I: powers appliance I on from its disk (the console of its last power-on kept aside).
run() {
    [ ! -f "$work/console$1.log" ] || mv "$work/console$1.log" "$work/console$1.$(date +%s).log"
    qemu "$1" "$work/console$1.log"
}

# panicked: the appliances whose own kernel failed since their last power-on.
panicked() {
    local i
    for i in 1 2 3; do
        grep -qaE "Kernel panic|corrupted stack end|general protection fault|BUG: unable" \
            "$work/console$i.log" 2>/dev/null && echo "$i"
    done
    return 0
}

# api I METHOD PATH [BODY]: the API of appliance I as the Manager (logged in by login I).
api() {
    local i=$1 method=$2 path=$3 body=${4:-}
    local args=(-ksS --max-time 30 -b "$work/jar$i" -X "$method" -H "X-CSRF-Token: $(cat "$work/csrf$i" 2>/dev/null)")
    [ -z "$body" ] || args+=(-H 'Content-Type: application/json' -d "$body")
    ip netns exec "$ns" curl "${args[@]}" "https://10.0.0.1$i/api/v1$path"
}

# login I: waits (up to 900 s) for appliance I's API and logs in.
login() {
    local i=$1 n=0
    until ip netns exec "$ns" curl -ksf --max-time 10 -c "$work/jar$i" -H 'Content-Type: application/json' \
        -d "{\"name\":\"admin\",\"password\":\"$password\"}" "https://10.0.0.1$i/api/v1/session" >"$work/session$i.json" 2>/dev/null; do
        n=$((n + 5))
        [ $n -lt 900 ] || die "appliance $i's API did not answer in 900 s (see $work/console$i.log)"
        sleep 5
    done
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["csrf_token"])' "$work/session$i.json" >"$work/csrf$i"
}

# json EXPR: evaluates a Python expression on the JSON read from stdin (as `v`).
json() { python3 -c "import json,sys; v = json.load(sys.stdin); print($1)" 2>/dev/null; }

# until_true SECONDS WHAT COMMAND...: polls COMMAND every 2 s; fails (exits) after SECONDS.
until_true() {
    local t=$1 what=$2 n=0
    shift 2
    until "$@"; do
        n=$((n + 2))
        [ $n -lt "$t" ] || die "$what: not within $t s"
        sleep 2
    done
}

# drill_wait SECONDS WHAT COMMAND...: as until_true, but returns 2 as soon as an appliance's
# kernel has failed (the drill is then run again), and fails (exits) after SECONDS.
drill_wait() {
    local t=$1 what=$2 n=0
    shift 2
    until "$@"; do
        [ -z "$(panicked)" ] || { log "$what: appliance $(panicked | tr '\n' ' ')kernel failed"; return 2; }
        n=$((n + 2))
        [ $n -lt "$t" ] || die "$what: not within $t s"
        sleep 2
    done
}

install 1 "create = true
manager_password = \"$password\""
run 1
login 1
join=$(api 1 GET /servers/join)
token=$(echo "$join" | json 'v["token"]' 2>/dev/null) || die "no join information: $join"
address=$(echo "$join" | json 'v["address"]')
log "the cluster's join address is $address"
for i in 2 3; do
    install "$i" "join = \"$address\"
token = \"$token\""
    run "$i"
done
three_up() { [ "$(api 1 GET /servers | json 'sum(1 for s in v if not s["down"])')" = 3 ]; }
until_true 900 "three servers up" three_up
for i in 2 3; do login "$i"; done
log "three appliances in one cluster"

log "uploading the guest kit's CD to the ISO library"
ip netns exec "$ns" curl -ksSf -b "$work/jar1" -H "X-CSRF-Token: $(cat "$work/csrf1")" \
    -H 'Content-Type: application/octet-stream' -X PUT --data-binary "@$kit" \
    "https://10.0.0.11/api/v1/isos/kit-blocks.iso" >/dev/null
iso_everywhere() { [ "$(api 1 GET /isos | json '[len(i.get("servers", [])) for i in v if i["name"] == "kit-blocks.iso"][0]')" = 3 ]; }
until_true 600 "the CD on every VM server" iso_everywhere
created=$(api 1 POST /vms '{"name":"drill","memory_mib":256,"vcpus":1,"disk_gib":1,"boot":"bios","iso":"kit-blocks.iso","start":true}')
vm=$(echo "$created" | json 'v["id"]' 2>/dev/null) || die "the VM was not created: $created"
log "VM $vm created"

# primary: the appliance (1-3) holding the VM's primary copy, asked through appliance $1.
primary() { api "$1" GET "/vms/$vm" | json 'v["primary"]["address"].split(":")[0].split(".")[-1][-1]'; }
# serial I PATTERN SECONDS: the VM's serial console, through appliance I, until PATTERN.
serial() { ip netns exec "$ns" python3 "$root/tests/appliance/serial.py" "10.0.0.1$1" "$work/jar$1" "$vm" "$2" "$3"; }
in_sync() { [ "$(api "$1" GET "/vms/$vm" | json 'v["replication"]["state"]')" = in-sync ]; }

# The watcher: the VM's console through appliance $1, every line appended to watch.log.
watch_start() {
    : >"$work/watch.log"
    ip netns exec "$ns" python3 "$root/tests/appliance/serial.py" --tee "$work/watch.log" "10.0.0.1$1" \
        "$work/jar$1" "$vm" "^NEVER$" 100000 >/dev/null 2>&1 &
    watcher=$!
}
watch_stop() { kill "$watcher" 2>/dev/null || true; wait "$watcher" 2>/dev/null || true; }
last_ack() { grep -a "KIT: blocks ack " "$work/watch.log" | tail -n 1 | awk '{print $4}'; }
up() { kill -0 "$(cat "$work/qemu$1.pid")" 2>/dev/null; }
# advancing: the guest's acknowledgements move on (two readings 3 s apart).
advancing() {
    local a b
    a=$(last_ack)
    sleep 3
    b=$(last_ack)
    [ -n "$a" ] && [ -n "$b" ] && [ "$b" -gt "$a" ]
}
# recover: powers on again every appliance whose kernel failed, and waits for the cluster.
recover() {
    local i
    for i in $(panicked); do
        log "appliance $i's own kernel failed (see $(ls "$work"/console$i.log)); powering it on again"
        kill -9 "$(cat "$work/qemu$i.pid")" 2>/dev/null || true
        sleep 1
        run "$i"
        kernel_failures=$((kernel_failures + 1))
        [ "$kernel_failures" -le 5 ] || die "appliance kernels failed $kernel_failures times"
    done
    until_true 900 "three servers up again" three_up
}

rows="" kernel_failures=0 d=1
while [ "$d" -le "$drills" ]; do
    until_true 900 "drill $d: three servers up" three_up
    for i in 1 2 3; do login "$i"; done
    p=$(primary 1 2>/dev/null || primary 2)
    [ -n "$p" ] || die "drill $d: no primary for the VM"
    via=$((p % 3 + 1))
    drill_wait 900 "drill $d: the VM's disk in sync" in_sync "$via" || { recover; continue; }
    watch_start "$via"
    drill_wait 300 "drill $d: the guest acknowledging writes" advancing || { watch_stop; recover; continue; }
    log "drill $d: power cut of appliance $p (the VM's primary) at block $(last_ack)"
    kill -9 "$(cat "$work/qemu$p.pid")"
    t0=$(date +%s.%N)
    # What reached the watcher after the cut was acknowledged before it: let it arrive.
    sleep 2
    watch_stop
    acked=$(last_ack)
    moved() { local q; q=$(primary "$via" 2>/dev/null) && [ -n "$q" ] && [ "$q" != "$p" ] &&
        [ "$(api "$via" GET "/vms/$vm" | json 'v["status"]')" = running ]; }
    rc=0
    drill_wait 300 "drill $d: the VM running on its backup" moved || rc=$?
    if [ $rc = 0 ]; then
        t1=$(date +%s.%N)
        found=""
        for _ in $(seq 60); do
            found=$(serial "$via" "KIT: (blocks found|FAIL)" 10) && break
            [ -z "$(panicked)" ] || { rc=2; break; }
        done
    fi
    if [ $rc != 0 ]; then
        log "drill $d is run again"
        run "$p"
        recover
        continue
    fi
    t2=$(date +%s.%N)
    case $found in
    *"blocks found last="*) ;;
    *) die "drill $d: the guest on the backup: '$found' (the last acknowledged block was $acked)" ;;
    esac
    last=${found#*last=}
    last=${last%% *}
    missing=${found#*missing=}
    missing=${missing%% *}
    lost=$missing
    [ "$last" -ge "$acked" ] || lost=$((lost + acked - last))
    run_s=$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }") check_s=$(awk "BEGIN { printf \"%.1f\", $t2 - $t0 }")
    echo "DRILL $d: backup runs it after $run_s s, data checked after $check_s s, last acknowledged block $acked, found $last, blocks lost $lost"
    [ "$lost" = 0 ] || die "drill $d: $lost acknowledged blocks lost ($found; the last acknowledged was $acked)"
    rows="$rows| $d | $run_s | $check_s | $acked | $last | $lost |
"
    log "drill $d: powering appliance $p on again"
    run "$p"
    d=$((d + 1))
done

echo "### Power cuts of three installed appliances ($(date -u +%Y-%m-%d), $drills drills)"
echo
echo "| drill | power cut to the VM running on its backup (s) | to the guest having checked its blocks (s) | last block acknowledged | last block found | blocks lost |"
echo "| ---: | ---: | ---: | ---: | ---: | ---: |"
printf '%s' "$rows"
echo
echo "Appliance kernel failures under the emulated AMD-V (drill run again): $kernel_failures"
