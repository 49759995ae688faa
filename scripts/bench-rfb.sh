#!/usr/bin/env bash
# Benchmarks the graphical console's updates (tests/src/bin/rfb-bench.rs): the test guest's
# 1024x768 screen read whole over the VMM's RFB socket, Raw beside Zlib at two levels,
# interleaved. Prints Markdown for BENCHMARKS.md. Environment: BENCH_RUNS (40).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed -p enspeed-tests --bins >&2
image/testguest/build.sh >/dev/null
"$CARGO_TARGET_DIR/release/rfb-bench"
