#!/usr/bin/env bash
# Builds the appliance ISO and installs it twice under QEMU (TCG with an emulated AMD-V), as
# tests/appliance/install.sh does: from a CD by UEFI then the disk by BIOS, and from a USB stick
# by BIOS then the disk by UEFI. Prints Markdown for BENCHMARKS.md: the ISO's size, the install
# (power-on to powered off, installed) and the installed server's power-on to its API answering
# the Manager's login over HTTPS.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed >&2
t0=$SECONDS
iso=$(image/appliance/build.sh "$CARGO_TARGET_DIR/release/enspeed" | tail -n 1)
build_s=$((SECONDS - t0))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rows=""
for way in "--install-firmware uefi --boot-firmware bios" "--install-firmware bios --boot-firmware uefi --usb"; do
    # shellcheck disable=SC2086 # the options' words
    out=$(tests/appliance/install.sh "$iso" "$work/run" $way) || { echo "$out" >&2; exit 1; }
    echo "$out" >&2
    inst=$(echo "$out" | sed -n 's/^APPLIANCE install-s \([0-9]*\) (\(.*\))$/\1 s (\2)/p')
    boot=$(echo "$out" | sed -n 's/^APPLIANCE boot-to-api-s \([0-9]*\) (\(.*\))$/\1 s (\2)/p')
    mb=$(echo "$out" | sed -n 's/^APPLIANCE iso-mb //p')
    rows="$rows| $inst | $boot |
"
    rm -rf "$work/run"
done
echo "### The appliance ISO ($(date -u +%Y-%m-%d), 2 cores; QEMU TCG with an emulated AMD-V, 2 vCPUs, 3 GiB)"
echo
echo "ISO: $mb MB (target: under 700 MB), built in $build_s s (the Debian tree cached)."
echo
echo "| install: power-on to installed and powered off | installed server: power-on to the API's answer |"
echo "| --- | --- |"
printf '%s' "$rows"
