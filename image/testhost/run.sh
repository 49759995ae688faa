#!/usr/bin/env bash
# Boots the test host under QEMU TCG with an emulated AMD-V and runs one scenario in it:
#   image/testhost/run.sh --scenario FILE [--enspeed PATH] [--extra PATH]... [--timeout SECS] [--silence SECS] [--mem MIB] [--smp N] [--interactive] [--forward PORT]... [--kernel-log FILE] [--disk FILE]
# --forward gives the test host a NIC on QEMU's private user network (10.0.2.15; nothing leaves
# it) with 127.0.0.1:PORT here forwarded to the test host's PORT; without it, no NIC at all.
# --extra puts another program (a test tool, with its libraries) or a data file (a disk or CD
# image) in the test host's /usr/local/bin. --disk gives the test host FILE as its virtio disk
# /dev/vda (what it writes there outlives it: the demo keeps its cluster there).
# The scenario (and the enspeed binary with its shared libraries) travel in a second cpio
# archive appended to the cached initramfs. Streams the test host's console, exits with the
# scenario's code from its "TESTHOST-EXIT n" line, 124 on timeout, 125 when the test host
# stopped without that line, 126 when its own kernel locked up or panicked, or (--silence SECS)
# when its console printed nothing for SECS: the test host hung. Only for scenarios whose guests
# always print within that time (guest.sh's run_guest reports a stuck guest itself).
# --kernel-log FILE: the test host kernel's own lines ("[   1.234] ...") and its firmware's
# screen go only to FILE (the whole console is kept there), not to the terminal.
# SIGINT, SIGTERM or SIGHUP stop QEMU at once and exit 130, 143 or 129; so does the end of the
# process that started this script (checked every 5 s): no QEMU outlives its caller.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
. "$here/../kit/lib.sh"

usage() {
    sed -n '2,3s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

scenario='' enspeed='' timeout=900 silence=0 mem=3072 smp=2 interactive= forwards= kernel_log= extras=() disk=()
while [ $# -gt 0 ]; do
    case "$1" in
    --scenario) scenario=${2:?--scenario needs a file}; shift 2 ;;
    --enspeed) enspeed=${2:?--enspeed needs a path}; shift 2 ;;
    --extra) extras+=("${2:?--extra needs a path}"); shift 2 ;;
    --timeout) timeout=${2:?--timeout needs seconds}; shift 2 ;;
    --silence) silence=${2:?--silence needs seconds}; shift 2 ;;
    --mem) mem=${2:?--mem needs MiB}; shift 2 ;;
    --smp) smp=${2:?--smp needs a count}; shift 2 ;;
    --interactive) interactive=1; shift ;;
    --forward) forwards="$forwards,hostfwd=tcp:127.0.0.1:${2:?--forward needs a port}-:$2"; shift 2 ;;
    --kernel-log) kernel_log=${2:?--kernel-log needs a file}; shift 2 ;;
    --disk) disk=(-drive "file=${2:?--disk needs a file},format=raw,if=virtio"); shift 2 ;;
    -h|--help) usage ;;
    *) echo "run.sh: unknown argument $1" >&2; usage ;;
    esac
done
[ -n "$scenario" ] || usage
[ -f "$scenario" ] || die "scenario $scenario: no such file"
[ -z "$enspeed" ] || [ -x "$enspeed" ] || die "enspeed binary $enspeed: not an executable file"
for extra in ${extras[@]+"${extras[@]}"}; do
    [ -f "$extra" ] || die "extra file $extra: not a file"
done

ensure_tool qemu-system-x86_64 qemu-system-x86
ensure_tool cpio cpio
"$here/build.sh"
TH=$CACHE/testhost

work=$(mktemp -d "${TMPDIR:-/tmp}/testhost-run.XXXXXX")
caller=$PPID qemu_pid='' watcher=''
# QEMU runs under `timeout`, in a process group of its own that a terminal's Ctrl-C does not
# reach: a signal here, or this script's end, stops that whole group.
stop_qemu() {
    if [ -n "$qemu_pid" ]; then
        kill -TERM -- "-$qemu_pid" 2>/dev/null || true
        # A signal just after the start may come before `timeout` made its group: it, and QEMU
        # by its name, directly too.
        kill -TERM "$qemu_pid" 2>/dev/null || true
        pkill -TERM -f "testhost-$$-qemu" 2>/dev/null || true
    fi
    [ -z "$watcher" ] || kill "$watcher" 2>/dev/null || true
}
on_signal() {
    # Ignored from here on, not reset: a second signal (the caller's own SIGTERM after the one
    # its process group got) would otherwise end this script before it stopped QEMU, which
    # `timeout` keeps in a process group of its own, left running.
    trap '' INT TERM HUP
    log "$1: stopping the test host"
    stop_qemu
    wait 2>/dev/null || true
    rm -rf "$work"
    exit "$2"
}
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM
trap 'on_signal SIGHUP 129' HUP
trap 'stop_qemu; rm -rf "$work"' EXIT

# Left uncompressed: it may carry a large debug build of enspeed, and under TCG copying is
# cheaper than decompressing.
mkdir "$work/extra"
install -m 0755 "$scenario" "$work/extra/scenario.sh"
[ -z "$enspeed" ] || stage_elf "$work/extra" "$enspeed" usr/local/bin/enspeed
for extra in ${extras[@]+"${extras[@]}"}; do
    if [ -x "$extra" ]; then
        stage_elf "$work/extra" "$extra" "usr/local/bin/$(basename "$extra")"
    else
        install -D -m 0644 "$extra" "$work/extra/usr/local/bin/$(basename "$extra")"
    fi
done
cpio_dir "$work/extra" >"$work/extra.cpio"
cpio_cat "$TH/initrd.img" "$work/extra.cpio" >"$work/initrd.img"

nic=(-nic none)
if [ -n "$forwards" ]; then
    # restrict=on: the test host reaches nothing outside; only the forwarded ports come in.
    nic=(-nic "user,model=virtio-net-pci,restrict=on$forwards")
fi
log "booting the test host (TCG, $smp vCPUs, $mem MiB) with scenario $scenario${enspeed:+ and $enspeed}"
start=$(date +%s.%N)
set +e
# No network device unless --forward, and then a restricted one: nothing the guests send
# can leave the test host. TCG lacks a few of the
# EPYC model's features (rdseed, sha-ni, ...) and warns about each once per vCPU; those
# warnings are dropped, any other QEMU message still shows.
if [ -n "$interactive" ]; then
    # The terminal talks to the test host's console, and through it to the scenario's
    # terminal; QEMU's escape is Ctrl-A X. --foreground lets QEMU read the terminal.
    timeout --foreground -k 10 "$timeout" qemu-system-x86_64 \
        -accel tcg -cpu EPYC,+svm -smp "$smp" -m "$mem" \
        -nographic -no-reboot "${nic[@]}" ${disk[@]+"${disk[@]}"} \
        -kernel "$TH/vmlinuz" -initrd "$work/initrd.img" \
        -append "console=ttyS0 panic=-1 quiet no_timer_check testhost.interactive" \
        2> >(grep -v "TCG doesn't support requested feature" >&2) | tee "$work/console.log"
    qemu_rc=${PIPESTATUS[0]}
else
    # The test host's own kernel now and then locks up or panics under the emulated AMD-V
    # while a nested guest boots: stop QEMU then, rather than wait for the timeout, and say
    # so (exit 126), so a caller can tell the test host's failure from the scenario's.
    # Only the test host's own kernel lines count ("[   12.345678] ..." at the start of a
    # line): a nested guest's console, streamed by a scenario as "[NAME 1.23] ...", is the
    # scenario's to judge.
    console="$work/console.log"
    if [ -n "$kernel_log" ]; then
        console=$kernel_log
        log "the test host's console (its kernel's messages included): $console"
    fi
    : >"$console"
    own_failure='^\[ *[0-9]+\.[0-9]+\] (watchdog: BUG: soft lockup|Kernel panic - not syncing)'
    (
        size=0 quiet=0
        while sleep 5; do
            [ -d "$work" ] || exit 0
            if ! kill -0 "$caller" 2>/dev/null; then
                echo "the process that started the test host ($caller) ended" >"$work/orphaned"
                pkill -f "testhost-$$-qemu" || true
                exit 0
            fi
            if grep -qE "$own_failure" "$console" 2>/dev/null; then
                grep -m1 -E "$own_failure" "$console" >"$work/broken"
                pkill -f "testhost-$$-qemu" || true
                exit 0
            fi
            now=$(stat -c %s "$console" 2>/dev/null || echo 0)
            if [ "$now" = "$size" ]; then quiet=$((quiet + 5)); else size=$now quiet=0; fi
            if [ "$silence" -gt 0 ] && [ "$quiet" -ge "$silence" ]; then
                echo "the test host hung: nothing on its console for $quiet s" >"$work/broken"
                pkill -f "testhost-$$-qemu" || true
                exit 0
            fi
        done
    ) &
    watcher=$!
    # In the background, waited for: a signal's trap then runs at once, not after QEMU.
    timeout -k 10 "$timeout" qemu-system-x86_64 -name "testhost-$$-qemu" \
        -accel tcg -cpu EPYC,+svm -smp "$smp" -m "$mem" \
        -nographic -no-reboot "${nic[@]}" ${disk[@]+"${disk[@]}"} \
        -kernel "$TH/vmlinuz" -initrd "$work/initrd.img" \
        -append "console=ttyS0 panic=-1 quiet no_timer_check" \
        </dev/null >>"$console" 2> >(grep -v "TCG doesn't support requested feature" >&2) &
    qemu_pid=$!
    # The console, as it comes, on this script's output (without the kernel's own lines when
    # they go to --kernel-log).
    if [ -n "$kernel_log" ]; then
        # Nor the firmware's screen before the test host's init.
        # (sed -u and grep --line-buffered: each line as it comes, not a buffer's worth.)
        tail -n +1 -f --pid="$qemu_pid" "$console" | sed -u '0,/TESTHOST: init reached/d' |
            grep --line-buffered -vE '^\[ *[0-9]+\.[0-9]+\] ' &
    else
        tail -n +1 -f --pid="$qemu_pid" "$console" &
    fi
    shower=$!
    wait "$qemu_pid"
    qemu_rc=$?
    qemu_pid=''
    wait "$shower" 2>/dev/null || true
    kill "$watcher" 2>/dev/null || true
    # A panic reboots the test host at once (panic=-1, -no-reboot: QEMU exits) before the
    # watcher's next look: the console says what happened.
    if [ ! -s "$work/broken" ]; then
        grep -m1 -E "$own_failure" "$console" >"$work/broken" 2>/dev/null || true
    fi
    cp "$console" "$work/console.log" 2>/dev/null || true
fi
set -e
elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

if [ -s "$work/orphaned" ]; then
    log "$(cat "$work/orphaned"): QEMU stopped after $elapsed s"
    exit 129
fi
if [ -s "$work/broken" ]; then
    log "the test host failed itself ($(tr -d '\r' <"$work/broken")); QEMU stopped after $elapsed s"
    exit 126
fi
if [ "$qemu_rc" = 124 ]; then
    log "timed out after $timeout s (elapsed $elapsed s); QEMU killed"
    exit 124
fi
code=$(tr -d '\r' <"$work/console.log" | sed -n 's/^TESTHOST-EXIT \([0-9][0-9]*\)$/\1/p' | tail -n1)
if [ -z "$code" ]; then
    log "the test host stopped (QEMU exit $qemu_rc) without a TESTHOST-EXIT line; elapsed $elapsed s"
    exit 125
fi
log "scenario exit code $code; elapsed $elapsed s"
exit "$code"
