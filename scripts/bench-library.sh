#!/usr/bin/env bash
# Benchmarks the ISO library and the serial console relay (tests/src/bin/library-bench.rs):
# three servers on loopback; an ISO uploaded through the API and copied to the other VM server,
# beside cp + sync of the same file; a line typed on a VM's serial console until its echo,
# straight on the VMM's socket and through the API's WebSocket relays. Prints Markdown for
# BENCHMARKS.md. Environment: BENCH_ISO_MIB (512), BENCH_LINES (200), BENCH_DIR (/var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed -p enspeed-tests --bins >&2
"$CARGO_TARGET_DIR/release/library-bench"
