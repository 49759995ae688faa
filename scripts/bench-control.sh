#!/usr/bin/env bash
# Benchmarks the Raft control plane (tests/src/bin/control-bench.rs: 3 servers on loopback,
# commit and read latency) and, with /dev/kvm and root, the failover drills of
# tests/tests/failover.rs (FAILOVER_DRILLS power cuts, default 10). Prints Markdown for
# BENCHMARKS.md, with other systems' published failover figures beside ours.
# Environment: BENCH_OPS (requests per measurement, default 2000), BENCH_DIR (/var/tmp),
# FAILOVER_DRILLS (10; 0 skips the drills).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed -p enspeed-tests --bins >&2
echo "## Control plane: Raft commits and failover ($(date -u +%Y-%m-%d), $(nproc) cores)"
echo
"$CARGO_TARGET_DIR/release/control-bench"
echo
drills="${FAILOVER_DRILLS:-10}"
if [ "$drills" -gt 0 ] && [ -e /dev/kvm ] && [ "$(id -u)" = 0 ]; then
    log="$(mktemp)"
    trap 'rm -f "$log"' EXIT
    FAILOVER_DRILLS="$drills" cargo test --release -p enspeed-tests --test failover \
        power_cut -- --nocapture >"$log" 2>&1 || { cat "$log" >&2; echo "failover drills failed" >&2; exit 1; }
    "$CARGO_TARGET_DIR/release/control-bench" failover "$log"
else
    echo "(failover drills skipped: they need root, /dev/kvm and FAILOVER_DRILLS > 0)"
fi
cat <<'TABLE'

| Other systems: their published or commonly reported figures, not measured here | from host failure to the VM restarted elsewhere |
|---|---|
| Proxmox VE HA (watchdog self-fencing, then restart on a quorate node) | about 2 to 3 minutes ([nakamas-it.com](https://nakamas-it.com/engine-room/proxmox/proxmox-ha); "expect 2–4 minutes", [racknotes.pro](https://racknotes.pro/?p=368)) |
| VMware vSphere HA | host declared failed after 15 s without heartbeats, then its VMs are restarted ([VMware docs](https://vdc-repo.vmware.com/vmwb-repository/dcr-public/97a70553-ab7e-47fb-b797-3f380c7577d7/d71b7555-424e-41bb-a4c2-c5b9b7d7cdef/GUID-8CB28754-837E-446F-94FD-26F2DC09D3EA.html)): 15 s plus the restart |
| Harvester (KubeVirt) | several minutes: Kubernetes marks the node NotReady after 40 s, `vm-force-reset-policy` then waits 5 minutes by default ([Harvester KB](https://harvesterhci.io/kb/tags/migration), [SUSE](https://www.suse.com/c/suse-virtualization-node-failure-strategy)) |
| Ganeti | no automatic failover: an operator runs `gnt-node failover` ([gnt-node(8)](https://manpages-ps7.admin.canonical.com/manpages/jammy/man8/gnt-node.8.html), [Tor's Ganeti notes](https://gitlab.torproject.org/cohosh/wiki-replica/-/commit/6ba5ccbbc41b854ede022d9e4295c1b1ba3e0e15)) |
TABLE
