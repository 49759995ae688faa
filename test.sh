#!/usr/bin/env bash
# Runs every test: unit tests; level 1, `enspeed vmm` booting the project's test guest on this
# machine's /dev/kvm; level 2, real Debian guests under `enspeed vmm` inside the test host; the
# appliance ISO, installed and booted under QEMU.
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
cargo test --release --workspace
part "cargo test (unit, level 1, level 2, appliance)"
if [ -s "$retries" ]; then
    echo "test.sh: level-2 scenarios run again in this run:"
    sed 's/^/    /' "$retries"
fi
if [ -s "$times" ]; then
    echo "test.sh: the scenarios that boot machines under QEMU took:"
    sed 's/^/    /' "$times"
fi
# Coverage-guided fuzzing of what takes untrusted bytes (mirror frames, RFB client messages,
# virtio-blk chains, the vhost-user-blk request path, the API's JSON), 5 s a target, built
# with the quicker profile; the fuzz crate (fuzz/) builds outside the workspace.
# scripts/fuzz.sh alone runs longer, optimized.
FUZZ_PROFILE=quick scripts/fuzz.sh 5
part "fuzzing"
