#!/usr/bin/env bash
# Benchmarks firmware boot inside the test host, EnSpeed beside QEMU (-M q35, SeaBIOS) in one
# run, and prints Markdown for BENCHMARKS.md: a blank disk falling through to an El Torito CD,
# power-on to GRUB's first output and to the kernel's init; and power-on of a system installed
# on the disk (no CD) to its kernel's init (tests/testhost/bench-firmware.sh).
# Environment: BENCH_BOOTS (boots each, default 5); BENCH_FIRMWARE=uefi for OVMF on both
# sides (Debian's OVMF.fd; UEFI-only ISOs) instead of SeaBIOS.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed >&2
fw=${BENCH_FIRMWARE:-bios}
isoflag=()
[ "$fw" = uefi ] && isoflag=(--uefi)
iso="$CARGO_TARGET_DIR/release/kit-bench.iso"
image/kit/iso.sh "${isoflag[@]}" "$iso" "console=ttyS0 quiet kit.task=poweroff" >/dev/null
installer="$CARGO_TARGET_DIR/release/kit-install-bench.iso"
image/kit/iso.sh "${isoflag[@]}" "$installer" "console=ttyS0 quiet kit.task=install,poweroff kit.dev=/dev/vda" >/dev/null
image/testhost/build.sh >&2
log=$(mktemp)
scenario=$(mktemp --suffix=.sh)
{ echo "BENCH_BOOTS=${BENCH_BOOTS:-5} BENCH_FIRMWARE=$fw"; cat tests/testhost/bench-firmware.sh; } >"$scenario"
# The test host itself fails now and then under the emulated AMD-V (125: it stopped without a
# result, 126: its kernel locked up): run it again then, at most three times, and say so.
for attempt in 1 2 3; do
    rc=0
    image/testhost/run.sh --scenario "$scenario" --enspeed "$CARGO_TARGET_DIR/release/enspeed" \
        --extra "$iso" --extra "$installer" --timeout 3000 >"$log" 2>&1 || rc=$?
    case $rc in
    0) break ;;
    125 | 126) echo "bench-firmware: the test host failed itself (exit $rc), attempt $attempt of 3" >&2 ;;
    *) cat "$log" >&2; echo "bench-firmware scenario failed (exit $rc)" >&2; exit 1 ;;
    esac
done
[ "$rc" = 0 ] || { cat "$log" >&2; echo "bench-firmware: the test host failed three times" >&2; exit 1; }
echo "## Firmware boot ($fw) inside the test host ($(date -u +%Y-%m-%d), ${BENCH_BOOTS:-5} boots each, alternating)"
echo
# The test host's console ends its lines in CR, which makes awk take the times for text.
tr -d '\r' <"$log" | awk '/^BENCH (enspeed|qemu)-firmware-(to-grub|to-init|installed-to-init) / { v[$2] = v[$2] " " $3 }
     function median(s,   a, n, i, j, t) {
         n = split(s, a, " ")
         for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
         return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
     }
     END {
         print "| measure (s, median) | enspeed | qemu q35 | enspeed / qemu | target |"
         print "| --- | ---: | ---: | ---: | ---: |"
         split("to-grub to-init installed-to-init", ms, " ")
         what["to-grub"] = "power-on to the boot loader'"'"'s first output (CD)"
         what["to-init"] = "power-on to the kernel'"'"'s init (CD)"
         what["installed-to-init"] = "power-on to the installed system'"'"'s init (disk)"
         for (k = 1; k <= 3; k++) {
             e = median(v["enspeed-firmware-" ms[k]]); q = median(v["qemu-firmware-" ms[k]])
             printf "| %s | %.2f | %.2f | %.2f | 0.80 |\n", what[ms[k]], e, q, e / q
         }
         print ""
         print "All boots (s): enspeed to GRUB" v["enspeed-firmware-to-grub"] "; qemu to GRUB" v["qemu-firmware-to-grub"] \
             "; enspeed to init" v["enspeed-firmware-to-init"] "; qemu to init" v["qemu-firmware-to-init"] \
             "; enspeed installed to init" v["enspeed-firmware-installed-to-init"] "; qemu installed to init" v["qemu-firmware-installed-to-init"]
     }'
rm -f "$log" "$scenario"
