#!/usr/bin/env bash
# drill-uefi.sh [RUNS]: the UEFI install test (tests/testhost/enspeed-firmware-uefi.sh) in the
# test host, up to RUNS times (default 5) until one run ends with the scenario's own verdict,
# counting the runs in which the test host's QEMU aborted itself. Not in ./test.sh, because
# those aborts are common (3 runs in 4 in one CI run; 1 OVMF boot in 10 in another count).
# QEMU 7.2's TCG (Debian 12's, which runs the test host) aborts with "tcg_handle_interrupt:
# assertion failed: (qemu_mutex_iothread_locked())" when a nested guest writes CR8 while a
# virtual interrupt is pending (helper_write_crN calls cpu_interrupt without the BQL), and
# OVMF writes CR8 on every interrupt return. QEMU itself booting OVMF in the test host aborts
# the same way.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed >&2
R=$CARGO_TARGET_DIR/release
image/kit/iso.sh --uefi "$R/uefi-virtio.iso" \
    "console=ttyS0 quiet kit.task=install,poweroff kit.dev=/dev/vda kit.proof=uefi-installed-virtio" \
    enspeed-cd >/dev/null
image/kit/iso.sh --uefi "$R/uefi-sata.iso" \
    "console=ttyS0 quiet kit.task=install,poweroff kit.dev=/dev/sda kit.proof=uefi-installed-sata" \
    enspeed-cd >/dev/null
image/testhost/build.sh
aborted=0
for i in $(seq 1 "$runs"); do
    set +e
    out=$(bash image/testhost/run.sh --scenario tests/testhost/enspeed-firmware-uefi.sh \
        --enspeed "$R/enspeed" --timeout 1400 --silence 300 \
        --extra "$R/uefi-virtio.iso" --extra "$R/uefi-sata.iso" 2>&1)
    rc=$?
    set -e
    if grep -q "qemu_mutex_iothread_locked" <<<"$out"; then
        aborted=$((aborted + 1))
        echo "drill-uefi: run $i: the test host's QEMU aborted (CR8 write with a pending interrupt)"
        continue
    fi
    echo "$out" | grep -E "^(ok|FAIL|BENCH|GUEST)" || true
    echo "drill-uefi: run $i ended with exit $rc; $aborted earlier run(s) aborted"
    exit $rc
done
echo "drill-uefi: all $runs runs aborted"
exit 125
