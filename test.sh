#!/usr/bin/env bash
# Runs every test: unit tests; level 1, `enspeed vmm` booting the project's test guest on this
# machine's /dev/kvm; level 2, real Debian guests under `enspeed vmm` inside the test host, and
# the appliance ISO, installed and booted under QEMU.
# Installs what it needs first. Cargo's target directory is outside the clone (~/.cache).
set -euo pipefail
cd "$(dirname "$0")"
# How long each part took, told at the end (CI's budget is 30 minutes on 2 cores).
took=() t0=$SECONDS
part() { took+=("$(printf '%5d s  %s' $((SECONDS - t0)) "$1")"); t0=$SECONDS; }
report() { echo "test.sh: time by part"; printf "    %s\n" "${took[@]}"; }
trap report EXIT
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
part "set-up"
# The binaries and every test program in one build (cargo overlaps the tests' compiling with
# the binaries' linking), the test programs listed as "LEVEL<tab>DIRECTORY<tab>PROGRAM" lines:
# level 2 is tests/tests/testhost.rs and appliance.rs; each runs from its package's directory,
# as cargo runs it, and all of them run even when one fails.
programs="$CARGO_TARGET_DIR/release/test-programs"
cargo build --release --workspace --bins --tests --examples --message-format=json-render-diagnostics | python3 -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m["profile"]["test"] or not m.get("executable"):
        continue
    t = m["target"]
    level = 2 if t["name"] in ("testhost", "appliance") and "test" in t["kind"] else 1
    print(level, os.path.dirname(m["manifest_path"]), m["executable"], sep="\t")
' >"$programs"
part "build"
image/testguest/build.sh >/dev/null
image/testhost/build.sh
part "guest kits and test host"
# Level-2 scenarios that had to run again (their test host, or a nested guest's early boot,
# failed under the emulated AMD-V; see tests/tests/testhost.rs) are listed at the end.
retries="$CARGO_TARGET_DIR/release/testhost-retries.log"
times="$CARGO_TARGET_DIR/release/testhost-times.log"
rm -f "$retries" "$times"
grep -q "^2" "$programs" || { echo "test.sh: no level-2 programs in $programs" >&2; exit 1; }
# run_level LEVEL: runs that level's programs; fails if one did.
# Each program's time goes to $program_times, shown at the end.
program_times="$CARGO_TARGET_DIR/release/test-program-times.log"
: >"$program_times"
run_level() {
    local failed=0 level dir program start rc
    while IFS=$'\t' read -r level dir program; do
        [ "$level" = "$1" ] || continue
        echo "     Running $program"
        start=$SECONDS rc=0
        (cd "$dir" && "$program" </dev/null) || rc=$?
        [ "$rc" = 0 ] || failed=1
        printf '%5d s  level %s  %s  (exit %s)\n' $((SECONDS - start)) "$1" \
            "$(basename "$dir")/$(basename "$program" | sed 's/-[0-9a-f]*$//')" "$rc" >>"$program_times"
    done <"$programs"
    return "$failed"
}
# Unit tests and level 1, then level 2 (the test hosts and the appliance's machines: QEMU's
# emulator, which keeps both cores busy). Beside level 1, even niced, level 2's nested guests
# ran two to three times slower and missed their limits (tried: 2026-12-07).
# Meanwhile, as an idle-class process (SCHED_IDLE, the idle I/O class), on what level 1 leaves
# idle (its clusters wait on one another part of the time), never in its way: coverage-guided
# fuzzing of what takes untrusted bytes (mirror frames, RFB client messages, virtio-blk chains,
# the vhost-user-blk request path, the cluster's JSON, OVAs, the web API's request bodies),
# built with the quicker profile, then 5 s a target; the fuzz crate (fuzz/) builds outside the
# workspace. Its inputs a second are in its log (fewer than alone: it gets the idle time only).
# scripts/fuzz.sh alone runs longer, optimized.
fuzz_log="$CARGO_TARGET_DIR/release/fuzz.log"
FUZZ_PROFILE=quick setsid -w chrt --idle 0 ionice -c 3 scripts/fuzz.sh 5 >"$fuzz_log" 2>&1 &
fuzz=$!
# So is the appliance's installer ISO, for the appliance test in level 2 (which then finds it
# made: image/appliance/build.sh makes it again only when what goes into it changed).
iso_build_log="$CARGO_TARGET_DIR/release/appliance-iso-build.log"
setsid -w chrt --idle 0 ionice -c 3 image/appliance/build.sh "$CARGO_TARGET_DIR/release/enspeed" \
    >"$iso_build_log" 2>&1 &
iso_build=$!
# Stopped with test.sh (their own process groups: cargo and rustc too).
trap 'for p in $fuzz $iso_build; do kill -- -"$p" 2>/dev/null || true; done; report' EXIT
rest=0
run_level 1 || rest=$?
part "unit tests and level 1"
fuzzed=0
wait "$fuzz" || fuzzed=$?
fuzz=
grep -a "^fuzz.sh: .*\(fuzzing\|no crash\)\|DONE" "$fuzz_log" || true
# Not a failure of its own: the appliance test makes the ISO again, and fails if it cannot.
wait "$iso_build" || { echo "test.sh: the appliance ISO's build beside level 1 failed:"; tail -n 20 "$iso_build_log"; } >&2
iso_build=
part "fuzzing and the appliance ISO's build, finishing"
level2=0
run_level 2 || level2=$?
part "level 2"
if [ -s "$retries" ]; then
    echo "test.sh: level-2 scenarios run again in this run:"
    sed 's/^/    /' "$retries"
fi
echo "test.sh: each test program took:"
sed 's/^/    /' "$program_times"
if [ -s "$times" ]; then
    echo "test.sh: the scenarios that boot machines under QEMU took:"
    sed 's/^/    /' "$times"
fi
if [ "$fuzzed" -ne 0 ]; then
    tail -n 60 "$fuzz_log" >&2
fi
if [ "$rest" -ne 0 ] || [ "$level2" -ne 0 ] || [ "$fuzzed" -ne 0 ]; then
    echo "test.sh: FAILED: unit tests and level 1 exit $rest, level 2 exit $level2," \
        "fuzzing exit $fuzzed" >&2
    exit 1
fi
