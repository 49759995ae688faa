#!/usr/bin/env bash
# Benchmarks Virtual Appliances (tests/src/bin/appliance-bench.rs): an OVA imported through the
# API beside qemu-img convert of its disk; a guest's 4 KiB write latency while its backup copy
# is snapshotted (a live backup) beside without. Prints Markdown for BENCHMARKS.md.
# Environment: BENCH_DISK_MIB (2048), BENCH_BACKUP_MIB (4096), BENCH_OPS (20000),
# BENCH_ROUNDS (3), BENCH_DIR (/var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed -p enspeed-tests --bins >&2
"$CARGO_TARGET_DIR/release/appliance-bench"
