#!/usr/bin/env bash
# Benchmarks the control plane as the cluster grows (tests/src/bin/scale-bench.rs): five
# servers on loopback, 100, 1,000 and 10,000 VMs; each server's idle CPU, the VM list's and a
# power operation's latency through the leader and a follower. Prints Markdown for
# BENCHMARKS.md.
# Environment: BENCH_SIZES (100,1000,10000), BENCH_SECS (10), BENCH_DIR (/var/tmp),
# BENCH_AUDIT (0: audit entries to reach at the end, then the power operation again).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed -p enspeed-tests --bins >&2
"$CARGO_TARGET_DIR/release/scale-bench"
