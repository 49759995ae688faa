#!/usr/bin/env bash
# Benchmarks VM networking inside the test host and prints Markdown for BENCHMARKS.md:
#   - guest-to-guest TCP throughput and round-trip time across two VM servers (network
#     namespaces joined by a switch bridge), EnSpeed's virtio-net beside QEMU's virtio-net with
#     vhost-net on the same taps, rounds alternating (tests/testhost/bench-net.sh);
#   - the time from a power cut of a VM's server to the VM answering its router's pings on the
#     backup (tests/testhost/enspeed-vmnet.sh, BENCH_FAILOVERS runs).
# Environment: BENCH_ROUNDS (default 3), BENCH_MIB (MiB sent per round, default 64),
# BENCH_FAILOVERS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release --workspace --bins >&2
image/testhost/build.sh >&2
ipbin=$(command -v ip)
nftbin=$(command -v nft)
log=$(mktemp)
scenario=$(mktemp --suffix=.sh)
trap 'rm -f "$log" "$scenario"' EXIT
{ echo "BENCH_ROUNDS=${BENCH_ROUNDS:-3} BENCH_MIB=${BENCH_MIB:-64}"; cat tests/testhost/bench-net.sh; } >"$scenario"

# run SCENARIO EXTRAS...: the test host, again (at most three times) when it failed itself
# (125: stopped without a result, 126: its kernel locked up); its console appended to $log.
run() {
    local s=$1 rc attempt
    shift
    for attempt in 1 2 3; do
        rc=0
        from=$(($(wc -l <"$log") + 1))
        image/testhost/run.sh --scenario "$s" --enspeed "$CARGO_TARGET_DIR/release/enspeed" \
            "$@" --timeout 2400 >>"$log" 2>&1 || rc=$?
        case $rc in
        0) return 0 ;;
        125 | 126)
            echo "bench-net: the test host failed itself (exit $rc), attempt $attempt of 3" >&2
            retries=$((retries + 1))
            # What this attempt measured before failing is not counted.
            sed -i "$from,\$ s/^\(BENCH \|VMNET: \|RESETS \)/discarded: \1/" "$log"
            ;;
        *) tail -n 80 "$log" >&2; echo "bench-net: $s failed (exit $rc)" >&2; exit 1 ;;
        esac
    done
    tail -n 80 "$log" >&2
    echo "bench-net: the test host failed three times" >&2
    exit 1
}
retries=0
run "$scenario" --extra "$ipbin"
for _ in $(seq "${BENCH_FAILOVERS:-3}"); do
    run tests/testhost/enspeed-vmnet.sh --extra "$ipbin" --extra "$nftbin"
done

echo "## VM networking inside the test host ($(date -u +%Y-%m-%d), ${BENCH_ROUNDS:-3} rounds of ${BENCH_MIB:-64} MiB, alternating; ${BENCH_FAILOVERS:-3} power cuts)"
echo
awk '/^BENCH (enspeed|qemu)-(rtt-ms|tcp-mibps) / { v[$2] = v[$2] " " $3 }
     /^VMNET: failover first-ping / { f = f " " $4; m = m " " $6 }
     /^RESETS / { resets[$2] += $5; told[$2] = told[$2] " " $3 " of round " $4 }
     function median(s,   a, n, i, j, t) {
         n = split(s, a, " ")
         for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
         return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
     }
     END {
         print "| measure (median) | enspeed | qemu + vhost-net | enspeed / qemu | target |"
         print "| --- | ---: | ---: | ---: | --- |"
         e = median(v["enspeed-tcp-mibps"]); q = median(v["qemu-tcp-mibps"])
         printf "| guest-to-guest TCP, MiB/s | %.2f | %.2f | %.2f | at least 0.90: %s |\n", e, q, e / q, (e / q >= 0.9 ? "met" : "missed")
         e = median(v["enspeed-rtt-ms"]); q = median(v["qemu-rtt-ms"])
         printf "| guest-to-guest ping round trip, ms | %.3f | %.3f | %.2f | at most 1.10: %s |\n", e, q, e / q, (e / q <= 1.1 ? "met" : "missed")
         print ""
         print "All rounds: enspeed MiB/s" v["enspeed-tcp-mibps"] "; qemu MiB/s" v["qemu-tcp-mibps"] \
             "; enspeed ms" v["enspeed-rtt-ms"] "; qemu ms" v["qemu-rtt-ms"]
         print ""
         printf "Guests that reset during a round (triple fault; the VMM booted them again and the round measured again): enspeed %d (%s), qemu %d (%s)\n", \
             resets["enspeed"], told["enspeed"], resets["qemu"], told["qemu"]
         print ""
         printf "Power cut to the first answered ping on the backup (median of the runs): %.2f s, of which %.2f s until its VMM ran there; each run (s):%s\n", median(f), median(m), f
     }' "$log"
echo
echo "Test host runs that failed themselves (its kernel locked up or panicked under the emulated AMD-V) and were run again: $retries"
