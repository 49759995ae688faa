# shellcheck shell=sh
# Helpers for test-host scenarios (tests/testhost/*.sh), installed in the test host as
# /usr/lib/testhost/guest.sh: `. /usr/lib/testhost/guest.sh`. Busybox ash, not bash.
#
# The test host runs under TCG, where every fork costs milliseconds, so the per-line console
# loop below uses only shell builtins.

FAILS=0
rm -f /tmp/testhost.fails
# A Debian kernel reaches the kit's init in 10 to 35 s here, through the firmware and GRUB
# included, and in under 60 s when it triple-faulted and was reset on the way; one that has
# not after this long has stalled (see finish).
BOOT_STALL_SECS=90
CR=$(printf '\r')

# now_cs: sets NOW_CS to the time since boot in centiseconds (/proc/uptime has two decimals;
# busybox date has no sub-second format). The leading 1 keeps "08" from reading as octal.
now_cs() {
    read -r _up _ </proc/uptime
    NOW_CS=$((${_up%.*} * 100 + 1${_up#*.} - 100))
}

# secs CS: centiseconds as seconds, "12.34".
secs() { printf '%d.%02d' $(($1 / 100)) $(($1 % 100)); }

fail() {
    echo "FAIL: $*"
    echo "$*" >>/tmp/testhost.fails
    FAILS=$((FAILS + 1))
}

# run_guest NAME LIMIT CMD...: runs CMD (a VMM whose guest console is on its stdout) for at
# most LIMIT seconds. Its output is streamed as "[NAME seconds] line", seconds counted from
# the start of CMD, and kept in /tmp/guest-NAME.log; the time of every "KIT: " line is kept in
# /tmp/NAME.marks for expect and bench. Five seconds before the limit, what the VMM's threads
# are doing is written to /tmp/guest-NAME.stuck (see stuck_report). A guest whose kernel has
# not reached the kit's init after BOOT_STALL_SECS is stopped there as stalled, and one that
# triple-faulted after its init is stopped at once as faulted (see finish): the VMM resets it,
# as a PC does, and the task it was running never comes back.
# Returns CMD's exit code (143 if the limit, the stall or the fault stopped it).
run_guest() {
    _name=$1 _limit=$2
    shift 2
    : >"/tmp/$_name.marks"
    : >"/tmp/guest-$_name.log"
    rm -f "/tmp/guest-$_name.stuck" "/tmp/guest-$_name.stalled" "/tmp/guest-$_name.faulted"
    echo "GUEST $_name: $*"
    now_cs
    _t0=$NOW_CS
    _inited=
    {
        timeout "$_limit" "$@" </dev/null 2>&1 &
        _pid=$!
        (
            _at=$((_t0 + (_limit - 5) * 100))
            _stall=$((_t0 + BOOT_STALL_SECS * 100))
            while kill -0 "$_pid"; do
                now_cs
                if [ "$NOW_CS" -ge "$_stall" ] && [ "$_limit" -gt "$BOOT_STALL_SECS" ] &&
                    ! grep -q " KIT: init reached" "/tmp/$_name.marks"; then
                    stuck_report "$_pid" >"/tmp/guest-$_name.stuck" 2>&1
                    : >"/tmp/guest-$_name.stalled"
                    kill "$_pid"
                    break
                fi
                if [ -f "/tmp/guest-$_name.faulted" ]; then
                    kill "$_pid"
                    break
                fi
                if [ "$NOW_CS" -ge "$_at" ]; then
                    stuck_report "$_pid" >"/tmp/guest-$_name.stuck" 2>&1
                    break
                fi
                sleep 1
            done
        ) >/dev/null 2>&1 &
        wait "$_pid"
        echo $? >"/tmp/$_name.rc"
    } | while IFS= read -r _line; do
        _line=${_line%"$CR"}
        now_cs
        _d=$((NOW_CS - _t0))
        printf '[%s %d.%02d] %s\n' "$_name" $((_d / 100)) $((_d % 100)) "$_line"
        printf '[%d.%02d] %s\n' $((_d / 100)) $((_d % 100)) "$_line" >>"/tmp/guest-$_name.log"
        # Marks: the kit's progress lines, and for firmware guests the firmware's banner, the
        # boot disk's lines and GRUB's, from their marker on (screen codes before it).
        case "$_line" in
        *"KIT: "*) printf '%d KIT: %s\n' "$_d" "${_line#*KIT: }" ;;
        *"bootdisk: "*) printf '%d bootdisk: %s\n' "$_d" "${_line#*bootdisk: }" ;;
        *"SeaBIOS ("*) printf '%d SeaBIOS (%s\n' "$_d" "${_line#*SeaBIOS (}" ;;
        *"GNU GRUB  version"*) printf '%d GRUB: menu\n' "$_d" ;;
        *"GRUB: "*) printf '%d GRUB: %s\n' "$_d" "${_line#*GRUB: }" ;;
        esac >>"/tmp/$_name.marks"
        # Whether this boot of the guest reached the kit's init (a reboot starts another).
        case "$_line" in
        *"KIT: init reached"*) _inited=1 ;;
        *"reboot: Restarting system"*) _inited= ;;
        *"guest triple-faulted"*) [ -n "$_inited" ] && : >"/tmp/guest-$_name.faulted" ;;
        esac
    done
    _rc=$(cat "/tmp/$_name.rc")
    if [ -f "/tmp/guest-$_name.stalled" ]; then
        echo "GUEST $_name: STALLED: its kernel did not reach the kit's init within ${BOOT_STALL_SECS}s; stopped"
    elif [ -f "/tmp/guest-$_name.faulted" ]; then
        echo "GUEST $_name: FAULTED: its kernel triple-faulted after the kit's init; stopped"
    elif [ "$_rc" = 143 ]; then
        echo "GUEST $_name: killed after ${_limit}s"
    fi
    return "$_rc"
}

# stuck_report PID: what the VMM started by `timeout` as PID is doing, for a guest about to be
# killed by run_guest's limit: each thread's state and CPU time used over one second, the
# vCPU threads' kernel stacks (a vCPU spinning in KVM_RUN and one blocked with a halted guest
# look different), and the test host's last kernel messages.
stuck_report() {
    # Busybox's timeout execs the command in its own process; another timeout forks it.
    _parent=$1 _vmm=
    [ "$(cat "/proc/$1/comm")" = timeout ] || _vmm=$1
    [ -n "$_vmm" ] || for _p in /proc/[0-9]*; do
        read -r _st 2>/dev/null <"$_p/stat" || continue
        set -- ${_st##*) }
        [ "$2" = "$_parent" ] && _vmm=${_p#/proc/} && break
    done
    [ -n "$_vmm" ] || { echo "no VMM process under $_parent"; return; }
    echo "VMM process $_vmm: $(tr '\0' ' ' <"/proc/$_vmm/cmdline" | cut -c1-120)"
    for _t in /proc/$_vmm/task/*; do
        read -r _s0 <"$_t/stat"
        echo "${_t##*/} $_s0" >>/tmp/stuck.before
    done
    sleep 1
    for _t in /proc/$_vmm/task/*; do
        read -r _s1 <"$_t/stat"
        _s0=$(grep "^${_t##*/} " /tmp/stuck.before | cut -d' ' -f2-)
        # /proc/PID/task/TID/stat after the ")" of the name: state is field 1, utime 12, stime 13.
        set -- ${_s1##*) }
        _state=$1 _cpu1=$((${12} + ${13}))
        set -- ${_s0##*) }
        _cpu0=$((${12:-0} + ${13:-0}))
        read -r _comm <"$_t/comm"
        echo "thread ${_t##*/} $_comm: state $_state, $((_cpu1 - _cpu0)) ticks of CPU in 1 s"
        case "$_comm" in
        vcpu*) head -n 5 "$_t/stack" 2>/dev/null | sed 's/^/    /' ;;
        esac
    done
    rm -f /tmp/stuck.before
    echo "the test host's last kernel messages:"
    dmesg | tail -n 4
}

# failure_summary NAME: for a failed scenario, at the end of its output: the failed checks and
# the last lines of each guest (and what its VMM was doing if the limit killed it).
failure_summary() {
    echo "=== why $1 failed ==="
    sed 's/^/failed: /' /tmp/testhost.fails 2>/dev/null
    for _log in /tmp/guest-*.log; do
        [ -f "$_log" ] || continue
        _g=${_log#/tmp/guest-}
        _g=${_g%.log}
        echo "--- guest $_g (exit code $(cat "/tmp/$_g.rc" 2>/dev/null)), its last lines:"
        tail -n 8 "$_log" | cut -c1-160
        [ -f "/tmp/guest-$_g.stuck" ] && cat "/tmp/guest-$_g.stuck"
    done
    # A scenario whose guests its cluster runs says what its servers did.
    if command -v scenario_summary >/dev/null; then scenario_summary; fi
    echo "=== end of why $1 failed ==="
}

# mark NAME TEXT: prints the centiseconds at which guest NAME first printed a line starting
# with TEXT (e.g. "KIT: init reached"); returns 1 if it never did.
mark() {
    _m=$(grep -F -m1 " $2" "/tmp/$1.marks") || return 1
    echo "${_m%% *}"
}

# expect NAME TEXT: a check that guest NAME printed TEXT.
expect() {
    if _cs=$(mark "$1" "$2"); then
        echo "ok: $1 printed '$2' after $(secs "$_cs") s"
    else
        fail "$1 never printed '$2'"
    fi
}

# expect_not NAME TEXT: a check that guest NAME never printed TEXT (e.g. "KIT: FAIL").
expect_not() {
    if _cs=$(mark "$1" "$2"); then
        fail "$1 printed '$2' after $(secs "$_cs") s: $(grep -F -m1 " $2" "/tmp/$1.marks")"
    fi
}

# bench LABEL NAME TEXT: prints "BENCH LABEL seconds" for when guest NAME printed TEXT.
bench() {
    if _cs=$(mark "$2" "$3"); then
        echo "BENCH $1 $(secs "$_cs")"
    else
        fail "no BENCH $1: $2 never printed '$3'"
    fi
}

# make_tap NAME ADDR/PREFIX: a persistent tap interface, up, with the test host's address.
make_tap() {
    tunctl -t "$1" >/dev/null && ip link set "$1" up && ip addr add "$2" dev "$1" ||
        fail "cannot create tap $1 with $2"
}

# disk_proof IMAGE: prints /kit-proof from an ext4 image (mounted read-only on a loop device).
disk_proof() {
    mkdir -p /tmp/proof-mnt
    mount -t ext4 -o loop,ro "$1" /tmp/proof-mnt || return 1
    cat /tmp/proof-mnt/kit-proof
    _rc=$?
    umount /tmp/proof-mnt
    return $_rc
}

# What a cluster's server logs when it fenced itself with something running.
FENCED="fenced: no quorum answer in time; VMMs and blockd killed"
# fence_count ID: how many times server ID's log (/tmp/serverID.log) says so.
fence_count() { grep -c "$FENCED" "/tmp/server$1.log"; }

# cluster_summary: for a scenario whose cluster of three runs its VM vm1 (the servers' logs in
# /tmp/serverN.log, their data in /tmp/serverN): what each server's log says of its role,
# fencing, disks, VMs and leases, and the end of each console of vm1.
cluster_summary() {
    for _i in 1 2 3; do
        echo "--- server $_i, its last events:"
        grep -E "WARN|ERROR|fenced|back in the quorum|role=Leader|blockd started|VMM started|DHCP" \
            "/tmp/server$_i.log" | tail -n 10 | cut -c1-220
        _c=/tmp/server$_i/agent/vms/vm1/serial.log
        [ -e "$_c" ] || continue
        echo "--- server $_i, the end of vm1's console:"
        tr -d '\r' <"$_c" | tail -n 6 | cut -c1-160
    done
}

# cluster_stalled NAME CONSOLE OFFSET STARTED_CS: for a guest that a scenario's cluster runs
# (its serial console in file CONSOLE, this boot from byte OFFSET on, its VMM started at
# STARTED_CS, a now_cs time): true, and the guest marked stalled for finish, if its kernel has
# not reached the kit's init BOOT_STALL_SECS after its VMM started, and nothing failed before.
# The caller checks first that the guest's VMM still runs where it started it (a VMM that
# ended, was never started or was fenced away is the product's failure, never a glitch).
cluster_stalled() {
    [ "$FAILS" = 0 ] || return 1
    now_cs
    [ $((NOW_CS - $4)) -ge $((BOOT_STALL_SECS * 100)) ] || return 1
    tail -c +$(($3 + 1)) "$2" 2>/dev/null | grep -q "KIT: init reached" && return 1
    echo "GUEST $1: STALLED: its kernel did not reach the kit's init within ${BOOT_STALL_SECS}s of its VMM's start"
    : >"/tmp/guest-$1.stalled"
}

# finish NAME: the scenario's verdict line and exit code: 0 if every check passed; else 1, 122
# if a guest stalled before its init, or 123 if one triple-faulted after it. Under the
# emulated AMD-V a nested Debian kernel now and then goes wrong at a random point of its early
# boot, the same glitch that at other times triple-faults it (the VMM then resets it and it
# boots again), and now and then triple-faults later, mid-task (twice in two runs of the CD
# install on 2026-12-07; never on this machine's own KVM): the caller may run such a scenario
# again, saying so, and counting.
finish() {
    if [ "$FAILS" = 0 ]; then
        echo "PASS $1"
        exit 0
    fi
    echo "FAIL $1 ($FAILS failed checks)"
    failure_summary "$1"
    glitch stalled STALLED 122 "never reached the kit's init"
    glitch faulted FAULTED 123 "triple-faulted after the kit's init"
    exit 1
}

# glitch KIND WORD CODE WHAT: if run_guest marked a guest KIND (/tmp/guest-NAME.KIND), says
# "WORD NAME: its kernel WHAT" and exits CODE.
glitch() {
    for _s in /tmp/guest-*."$1"; do
        [ -f "$_s" ] || continue
        _g=${_s#/tmp/guest-}
        echo "$2 ${_g%."$1"}: its kernel $4"
        exit "$3"
    done
}
