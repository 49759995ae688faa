#!/usr/bin/env bash
# Benchmarks the orchestrator's REST API (tests/src/bin/api-bench.rs): three servers on
# loopback, 1,000 VMs created through the API, then the VM list and a power operation through
# the leader and a follower with 1 and 8 clients. Prints Markdown for BENCHMARKS.md.
# Environment: BENCH_VMS (1000), BENCH_SECS per measurement (5), BENCH_DIR (/var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed -p enspeed-tests --bins >&2
"$CARGO_TARGET_DIR/release/api-bench"
