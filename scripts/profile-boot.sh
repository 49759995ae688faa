#!/usr/bin/env bash
# Profiles a real Debian kernel's boot to init inside the test host, EnSpeed's VMM beside QEMU
# (-M microvm), one boot each with "quiet initcall_debug" (tests/testhost/profile-boot.sh), and
# prints where the two differ: each VMM's time to init, the kernel's own clock at init, and the
# initcalls whose times differ most. The whole log stays in the file named at the end.
# Environment: PROFILE_TOP (initcalls listed, default 20).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="$(scripts/setup.sh)"
cargo build --release -p enspeed >&2
image/kit/build.sh >&2
image/testhost/build.sh >&2
log=$(mktemp /tmp/enspeed-profile-boot.XXXXXX)
image/testhost/run.sh --scenario tests/testhost/profile-boot.sh \
    --enspeed "$CARGO_TARGET_DIR/release/enspeed" --timeout 900 --silence 120 >"$log" 2>&1 ||
    { tail -20 "$log" >&2; echo "profile-boot.sh: the test host run failed; its log: $log" >&2; exit 1; }
PROFILE_TOP=${PROFILE_TOP:-20} python3 - "$log" <<'PY'
import os, re, sys
lines = open(sys.argv[1], errors="replace").read().splitlines()
names = {"E": "enspeed", "Q": "qemu"}
walls = {m.group(1): float(m.group(2)) for l in lines
         for m in [re.match(r"BENCH (\w+)-boot-to-init ([\d.]+)", l)] if m}
calls, init = {"E": {}, "Q": {}}, {}
for l in lines:
    m = re.match(r"([EQ])\| \[\s*([\d.]+)\] (.*)", l)
    if not m:
        continue
    tag, at, text = m.group(1), float(m.group(2)), m.group(3)
    c = re.search(r"initcall (\S+) returned \S+ after (\d+) usecs", text)
    if c:
        calls[tag][c.group(1)] = int(c.group(2)) / 1e6
    if text.startswith("Run /init"):
        init[tag] = at
print("| | enspeed | qemu |\n| --- | ---: | ---: |")
print(f"| process start to init, wall clock (s) | {walls.get('enspeed', 0):.2f} | {walls.get('qemu', 0):.2f} |")
print(f"| kernel's clock at init (s) | {init.get('E', 0):.2f} | {init.get('Q', 0):.2f} |")
print(f"| all initcalls (s) | {sum(calls['E'].values()):.2f} | {sum(calls['Q'].values()):.2f} |")
print("\n| initcall | enspeed (s) | qemu (s) | difference (s) |\n| --- | ---: | ---: | ---: |")
diff = sorted(((calls["E"].get(k, 0) - calls["Q"].get(k, 0), k) for k in set(calls["E"]) | set(calls["Q"])),
              key=lambda d: -abs(d[0]))
for d, k in diff[: int(os.environ["PROFILE_TOP"])]:
    print(f"| {k.split('+')[0]} | {calls['E'].get(k, 0):.3f} | {calls['Q'].get(k, 0):.3f} | {d:+.3f} |")
PY
echo "profile-boot.sh: the whole log: $log" >&2
