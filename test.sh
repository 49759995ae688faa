#!/usr/bin/env bash
# Runs every test: unit tests; level 1, `enspeed vmm` booting the project's test guest on this
# machine's /dev/kvm; level 2, real Debian guests under `enspeed vmm` inside the test host, and
# the appliance ISO, installed and booted under QEMU (beside the rest: see below).
# Installs what it needs first. Cargo's target directory is outside the clone (~/.cache).
set -euo pipefail
cd "$(dirname "$0")"
# How long each part took, told at the end (CI's budget is 30 minutes on 2 cores).
took=() t0=$SECONDS
part() { took+=("$(printf '%5d s  %s' $((SECONDS - t0)) "$1")"); t0=$SECONDS; }
trap 'echo "test.sh: time by part"; printf "    %s\n" "${took[@]}"' EXIT
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
part "set-up"
cargo build --release --workspace --bins
part "build"
image/testguest/build.sh >/dev/null
image/testhost/build.sh
part "guest kits and test host"
# Level-2 scenarios that had to run again (their test host, or a nested guest's early boot,
# failed under the emulated AMD-V; see tests/tests/testhost.rs) are listed at the end.
retries="$CARGO_TARGET_DIR/release/testhost-retries.log"
times="$CARGO_TARGET_DIR/release/testhost-times.log"
rm -f "$retries" "$times"
cargo test --release --workspace --no-run
part "building the tests"
# Level 2 (the test hosts and the appliance's machines: QEMU's emulator, bound by the CPU) runs
# beside the rest (unit tests and level 1: processes, sockets and guests on this machine's KVM,
# mostly waiting), niced so that the rest keeps its pace; its output follows the rest's.
level2=(--test testhost --test appliance) level1=()
for f in tests/tests/*.rs; do
    t=$(basename "$f" .rs)
    case "$t" in testhost | appliance) ;; *) level1+=(--test "$t") ;; esac
done
# Its test programs run directly (from tests/, as cargo runs them), not through a second cargo
# waiting for the first one's lock on the target directory.
mapfile -t level2_bins < <(cargo test --release -p enspeed-tests "${level2[@]}" --no-run \
    --message-format=json | grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
[ "${#level2_bins[@]}" -eq 2 ] || { echo "test.sh: level 2's programs: ${level2_bins[*]}" >&2; exit 1; }
level2_log="$CARGO_TARGET_DIR/release/level2.log"
(
    cd tests
    failed=0
    for bin in "${level2_bins[@]}"; do
        echo "     Running $bin"
        nice -n 10 "$bin" || failed=1
    done
    exit "$failed"
) >"$level2_log" 2>&1 &
level2_pid=$!
rest=0
cargo test --release --workspace --exclude enspeed-tests || rest=$?
[ "$rest" -ne 0 ] || cargo test --release -p enspeed-tests --lib --bins "${level1[@]}" || rest=$?
part "unit tests and level 1 (level 2 beside)"
level2=0
wait "$level2_pid" || level2=$?
echo "test.sh: level 2 (tests/tests/testhost.rs, tests/tests/appliance.rs):"
cat "$level2_log"
part "level 2, after the rest"
if [ -s "$retries" ]; then
    echo "test.sh: level-2 scenarios run again in this run:"
    sed 's/^/    /' "$retries"
fi
if [ -s "$times" ]; then
    echo "test.sh: the scenarios that boot machines under QEMU took:"
    sed 's/^/    /' "$times"
fi
if [ "$rest" -ne 0 ] || [ "$level2" -ne 0 ]; then
    echo "test.sh: FAILED: unit tests and level 1 exit $rest, level 2 exit $level2" >&2
    exit 1
fi
# Coverage-guided fuzzing of what takes untrusted bytes (mirror frames, RFB client messages,
# virtio-blk chains, the vhost-user-blk request path, the API's JSON), 5 s a target, built
# with the quicker profile; the fuzz crate (fuzz/) builds outside the workspace.
# scripts/fuzz.sh alone runs longer, optimized.
FUZZ_PROFILE=quick scripts/fuzz.sh 5
part "fuzzing"
