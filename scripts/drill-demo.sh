#!/usr/bin/env bash
# drill-demo.sh [RUNS]: ./run.sh as a newcomer runs it (a new cluster each time:
# ENSPEED_DEMO_DISK=0), RUNS times (default 3): each run waits until the demo VM has installed
# itself from the kit's CD and runs the installed system, then stops ./run.sh with SIGTERM.
# Prints each run's time from ./run.sh's start to the installed system, and counts runs in
# which the test host failed itself (its kernel's panic or lockup, ./run.sh's exit 126).
# Not in ./test.sh: one run takes 4 to 5 minutes on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
log=$(mktemp -d)/run.log
ok=0 failed=0 broken=0
for i in $(seq 1 "$runs"); do
    start=$(date +%s)
    ENSPEED_DEMO_DISK=0 setsid ./run.sh >"$log" 2>&1 &
    pid=$!
    verdict="timed out after 900 s"
    while [ $(($(date +%s) - start)) -lt 900 ]; do
        sleep 2
        if grep -q "runs the system installed on its disk" "$log"; then
            verdict="installed and running after $(($(date +%s) - start)) s"
            ok=$((ok + 1))
            break
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"
            rc=$?
            verdict="./run.sh ended with $rc: $(grep -E 'run.sh: |demo: ' "$log" | tail -n 2 | tr '\n' ' ')"
            [ "$rc" = 126 ] && broken=$((broken + 1))
            break
        fi
    done
    kill -TERM -- -"$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    case $verdict in
        installed*) ;;
        *)
            failed=$((failed + 1))
            # The test host's console (its kernel's messages) of a failed run, kept.
            kept="${ENSPEED_CACHE:-$HOME/.cache/enspeed}/demo/drill-demo-run$i-console.log"
            cp "${ENSPEED_CACHE:-$HOME/.cache/enspeed}/demo/testhost-console.log" "$kept" 2>/dev/null &&
                verdict="$verdict (the test host's console: $kept)"
            ;;
    esac
    echo "drill-demo: run $i: $verdict"
done
echo "drill-demo: $ok of $runs runs installed the demo VM and ran it; $broken ended in the test host's own failure"
[ "$ok" = "$runs" ]
