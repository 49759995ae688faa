# shellcheck shell=sh
# Helpers for test-host scenarios (tests/testhost/*.sh), installed in the test host as
# /usr/lib/testhost/guest.sh: `. /usr/lib/testhost/guest.sh`. Busybox ash, not bash.
#
# The test host runs under TCG, where every fork costs milliseconds, so the per-line console
# loop below uses only shell builtins.

FAILS=0
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
    FAILS=$((FAILS + 1))
}

# run_guest NAME LIMIT CMD...: runs CMD (a VMM whose guest console is on its stdout) for at
# most LIMIT seconds. Its output is streamed as "[NAME seconds] line", seconds counted from
# the start of CMD; the time of every "KIT: " line is kept in /tmp/NAME.marks for expect and
# bench. Returns CMD's exit code (143 if the limit killed it).
run_guest() {
    _name=$1 _limit=$2
    shift 2
    : >"/tmp/$_name.marks"
    echo "GUEST $_name: $*"
    now_cs
    _t0=$NOW_CS
    {
        timeout "$_limit" "$@" </dev/null 2>&1
        echo $? >"/tmp/$_name.rc"
    } | while IFS= read -r _line; do
        _line=${_line%"$CR"}
        now_cs
        _d=$((NOW_CS - _t0))
        printf '[%s %d.%02d] %s\n' "$_name" $((_d / 100)) $((_d % 100)) "$_line"
        case "$_line" in
        *"KIT: "*) printf '%d KIT: %s\n' "$_d" "${_line#*KIT: }" >>"/tmp/$_name.marks" ;;
        esac
    done
    _rc=$(cat "/tmp/$_name.rc")
    [ "$_rc" = 143 ] && echo "GUEST $_name: killed after ${_limit}s"
    return "$_rc"
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

# finish NAME: the scenario's verdict line and exit code.
finish() {
    if [ "$FAILS" = 0 ]; then
        echo "PASS $1"
        exit 0
    fi
    echo "FAIL $1 ($FAILS failed checks)"
    exit 1
}
