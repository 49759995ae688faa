#!/usr/bin/env bash
# Runs the product on this machine: today, one VM under `enspeed vmm` with its serial console
# on this terminal (the cluster, its web UI and the demo accounts come with later issues).
# Installs what it needs, builds, and boots a real Debian guest from the guest kit. Where this
# machine's KVM cannot run an unmodified Linux (a nested software hypervisor, kvm_pvm), the
# guest runs inside the test host (QEMU with an emulated AMD-V), exactly as the tests do.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed
bin="$CARGO_TARGET_DIR/release/enspeed"
image/kit/build.sh
kit="${ENSPEED_CACHE:-$HOME/.cache/enspeed}/kit"

if [ -c /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then
    cp "$kit/disk.ext4" "${TMPDIR:-/tmp}/enspeed-demo-disk.ext4"
    echo "==== EnSpeed demo: a Debian guest under enspeed vmm; 'poweroff -f' in its shell ends it ===="
    exec "$bin" vmm --kernel "$kit/vmlinuz" --initrd "$kit/initrd.img" \
        --cmdline "console=ttyS0 quiet kit.task=wait" --memory 256 --vcpus 2 \
        --disk "${TMPDIR:-/tmp}/enspeed-demo-disk.ext4" --serial stdout \
        --api-socket "${TMPDIR:-/tmp}/enspeed-demo.sock"
fi
echo "run.sh: this machine's KVM cannot boot Linux itself; the demo runs inside the test host (slower)" >&2
interactive=()
[ -t 0 ] && interactive=(--interactive)
exec image/testhost/run.sh --scenario image/testhost/demo-scenario.sh --enspeed "$bin" \
    --timeout 86400 "${interactive[@]}"
