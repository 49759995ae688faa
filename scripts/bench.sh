#!/usr/bin/env bash
# Benchmarks EnSpeed's VMM side by side with QEMU in one run, and prints Markdown for
# BENCHMARKS.md:
#   (a) boot of the test guest on this /dev/kvm, (b) virtio-blk IOPS and MB/s from the test
#   guest, (d) resident memory beyond guest RAM  -- tests/src/bin/vmm-bench.rs
#   (c) a real Debian kernel booted to init inside the test host -- tests/testhost/bench-boot.sh
# Environment: BENCH_RUNS (boot runs, default 10), BENCH_SCALE (multiplies I/O op counts).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release --workspace --bins >&2
image/testguest/build.sh >/dev/null

echo "## VMM: test guest on this machine's /dev/kvm ($(date -u +%Y-%m-%d), $(nproc) cores)"
echo
"$CARGO_TARGET_DIR/release/vmm-bench"
echo
echo "## VMM: real Debian kernel to init inside the test host (5 boots each, alternating)"
echo
log=$(mktemp)
image/testhost/run.sh --scenario tests/testhost/bench-boot.sh --enspeed "$CARGO_TARGET_DIR/release/enspeed" >"$log" 2>&1 ||
    { cat "$log" >&2; echo "bench-boot scenario failed" >&2; exit 1; }
# The test host's console ends its lines in CR, which makes awk take the times for text.
tr -d '\r' <"$log" | awk '/^BENCH (enspeed|qemu|qemu-rtc)-boot-to-init / { v[$2] = v[$2] " " $3 }
     function median(s,   a, n, i, j, t) {
         n = split(s, a, " ")
         for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
         return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
     }
     END {
         e = median(v["enspeed-boot-to-init"]); q = median(v["qemu-boot-to-init"])
         print "| measure | enspeed | qemu | enspeed / qemu |"
         print "| --- | ---: | ---: | ---: |"
         printf "| Debian 6.1 kernel, start to init (s, median) | %.2f | %.2f | %.2f |\n", e, q, e / q
         r = median(v["qemu-rtc-boot-to-init"])
         printf "| the same, QEMU with microvm,rtc=on (a floor beside) | %.2f | %.2f | %.2f |\n", e, r, e / r
         print ""
         print "All boots (s): enspeed" v["enspeed-boot-to-init"] "; qemu" v["qemu-boot-to-init"] "; qemu rtc=on" v["qemu-rtc-boot-to-init"]
     }'
rm -f "$log"
