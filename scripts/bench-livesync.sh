#!/usr/bin/env bash
# Benchmarks LiveSync beside the local disk in one run (tests/src/bin/livesync-bench.rs):
# local file, backup on loopback, backup in another network namespace with 0.2 ms RTT; first
# on the library's write path, then from inside the test guest (a real primary blockd serving
# the VMM over vhost-user-blk, mirrored to a real backup blockd). LIVESYNC_BENCH=library or
# guest runs one part only.
# Needs root (network namespace, tc netem). Prints Markdown for BENCHMARKS.md.
# Environment: BENCH_OPS (4 KiB writes per measurement, default 2000), BENCH_DIR (/var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed -p enspeed-tests --bins >&2
image/testguest/build.sh >/dev/null
part=${LIVESYNC_BENCH:-all}
if [ "$part" != guest ]; then
    echo "## LiveSync: synchronous writes, local disk vs mirrored ($(date -u +%Y-%m-%d), $(nproc) cores)"
    echo
    "$CARGO_TARGET_DIR/release/livesync-bench"
    echo
fi
if [ "$part" != library ]; then
    echo "## LiveSync from inside a guest ($(date -u +%Y-%m-%d), $(nproc) cores)"
    echo
    "$CARGO_TARGET_DIR/release/livesync-bench" guest
fi
