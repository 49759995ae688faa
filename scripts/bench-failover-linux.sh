#!/usr/bin/env bash
# Benchmarks failover to a real Linux guest: tests/testhost/enspeed-failover.sh inside the test
# host (image/testhost/run.sh), FAILOVER_DRILLS power cuts of the VM's primary server in one
# test-host boot (three `enspeed server`s, a VM with a LiveSync disk booting the Debian kernel of
# the guest kit; every process of the primary killed with SIGKILL). Prints Markdown for
# BENCHMARKS.md: median, min and max of the time from the power cut to the VMM running on the
# backup and to the guest's "KIT: init reached" there. Inside the test host the guest runs
# under TCG-emulated nested AMD-V, so its kernel boots many times slower than on real KVM.
# Environment: FAILOVER_DRILLS (10); FAILOVER_TIMING, the servers' Raft and lease options
# (unset: the scenario's own, doubled from the defaults for the test host's emulated CPU; empty:
# the defaults, as on a server).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed --bins >&2
drills="${FAILOVER_DRILLS:-10}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The test host passes the scenario no environment: the drill count travels in the script.
{
    echo '#!/bin/sh'
    echo "FAILOVER_DRILLS=$drills"
    [ -z "${FAILOVER_TIMING+set}" ] || echo "TIMING=\"$FAILOVER_TIMING\""
    cat tests/testhost/enspeed-failover.sh
} >"$work/scenario.sh"
image/testhost/run.sh --scenario "$work/scenario.sh" --enspeed "$CARGO_TARGET_DIR/release/enspeed" \
    --timeout $((600 + drills * 300)) >"$work/log" 2>&1 ||
    { cat "$work/log" >&2; echo "failover scenario failed" >&2; exit 1; }
grep -q "PASS enspeed-failover" "$work/log" || { cat "$work/log" >&2; echo "no PASS line" >&2; exit 1; }
echo "## Failover to a real Debian guest inside the test host ($(date -u +%Y-%m-%d), $(nproc) cores)"
echo
tr -d '\r' <"$work/log" | awk '
    # drill N: server P (Raft leader: server L) killed; ...
    /^drill [0-9]+: server / { led += ($4 == $8 + 0) }
    # FAILOVER: vmm SECONDS init SECONDS resets N
    /^FAILOVER: vmm / {
        n++; vmm[n] = $3; init[n] = $5; boot[n] = $5 - $3; resets += $7; all = all " " $3 "/" $5
    }
    function sort(a, n,   i, j, t) {
        for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    }
    function row(what, a) {
        sort(a, n)
        printf "| %s | %d | %.2f s | %.2f s .. %.2f s |\n", what, n, \
            n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2, a[1], a[n]
    }
    END {
        if (n == 0) { print "no FAILOVER lines found"; exit 1 }
        print "| Failover of a real Debian guest, inside the test host (measured here) | drills | median | min .. max |"
        print "|---|---:|---:|---:|"
        row("kill -9 of every process of the primary -> VMM running on the backup", vmm)
        row("kill -9 of every process of the primary -> the Debian guest'"'"'s init on the backup", init)
        row("VMM running on the backup -> the guest'"'"'s init (its kernel'"'"'s boot, nested under TCG)", boot)
        print ""
        printf "All drills (VMM/init, s):%s. The killed server led Raft in %d of %d drills; guest resets while booting: %d.\n", all, led, n, resets
    }'
