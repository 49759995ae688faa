#!/usr/bin/env bash
# Runs the product on this machine: a local cluster of three EnSpeed servers (separate data
# directories and ports on loopback), each serving the web UI and API, a Manager account, and a
# demo VM, a blank PC that installs the guest kit (Debian) from a CD onto a disk mirrored
# between two of them and boots it. Installs what it needs, builds, prints the UI's address
# and the Manager's password, and runs until Ctrl-C or SIGTERM, which stop all of it within seconds: it returns 130 after Ctrl-C, 0 after
# SIGTERM, and leaves no process behind. Where this machine's KVM cannot run an unmodified
# Linux (a nested software hypervisor, kvm_pvm), the cluster runs inside the test host (QEMU
# with an emulated AMD-V) and its UI is forwarded here to https://127.0.0.1:8443.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
# The same build as ./test.sh's (the whole workspace's programs): one set of artifacts for both.
cargo build --release --workspace --bins
bin="$CARGO_TARGET_DIR/release/enspeed"
image/kit/build.sh
cache="${ENSPEED_CACHE:-$HOME/.cache/enspeed}"
kit="$cache/kit"
# The demo VM is a blank PC installed from a CD in the ISO library: the kit (Debian's kernel,
# from Debian's packages), which installs itself onto the VM's disk (GRUB, kernel, initrd),
# powers off, and once booted from the disk waits with a shell on its consoles. With
# ENSPEED_DEMO_INSTALL=0 it boots the cluster's guest kernel instead, with no install.
extra=()
if [ "${ENSPEED_DEMO_INSTALL:-1}" = 1 ]; then
    iso="$cache/demo-install.iso"
    image/kit/iso.sh "$iso" "console=tty0 console=ttyS0 quiet kit.task=install,poweroff kit.dev=/dev/vda kit.proof=demo kit.then=wait" >/dev/null
    export DEMO_ISO=$iso
    extra=(--extra "$iso")
fi

if [ -c /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ]; then
    exec scripts/demo-cluster.sh "$bin" "$kit/vmlinuz" "$kit/initrd.img" "$cache/demo"
fi
echo "run.sh: this machine's KVM cannot boot Linux itself; the cluster runs inside the test host (slower)" >&2
# The test host's kernel messages go to a file, named in the banner, not to this terminal.
mkdir -p "$cache/demo"
console="$cache/demo/testhost-console.log"
# The test host gets a disk (ext4, sparse) where the cluster's data directories live, so that
# the next ./run.sh starts the same cluster (the test host's stop is a power cut for the
# servers, which they survive). ENSPEED_DEMO_DISK=0 keeps the cluster in the test host's
# memory instead: a new cluster each time.
disk=()
if [ "${ENSPEED_DEMO_DISK:-1}" = 1 ]; then
    data="$cache/demo/testhost-data.img"
    if [ ! -s "$data" ]; then
        truncate -s 32G "$data.new"
        mkfs.ext4 -q -F -L enspeed-demo "$data.new"
        mv "$data.new" "$data"
    fi
    disk=(--disk "$data")
fi
printf 'TESTHOST_LOG=%s\n' "$console" >"$cache/demo/demo-host.env"
# Run as a child, stopped with SIGTERM whichever signal comes here (a background child of a
# script ignores SIGINT): it stops QEMU, the whole test host with it. One vCPU: with two, the
# test host's own kernel failed (a panic, or a silent reset) in 2 or 3 of 6 runs of the demo's
# install (scripts/drill-demo.sh), with one in none of 3; slower (the install 215-339 s).
image/testhost/run.sh --scenario scripts/demo-cluster.sh --enspeed "$bin" ${extra[@]+"${extra[@]}"} \
    --extra "$cache/demo/demo-host.env" --kernel-log "$console" ${disk[@]+"${disk[@]}"} \
    --smp 1 --timeout 86400 --forward 8443 --forward 8444 --forward 8445 &
child=$!
stop() {
    trap - INT TERM HUP
    kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
    exit "$1"
}
trap 'stop 130' INT
trap 'stop 0' TERM HUP
wait "$child"
