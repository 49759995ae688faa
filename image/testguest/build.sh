#!/bin/sh
# Builds the test guest (release) and prints the ELF's path as the last line.
set -eu
cd "$(dirname "$0")"
: "${CARGO_TARGET_DIR:=$HOME/.cache/enspeed/target-testguest}"
export CARGO_TARGET_DIR
cargo build --release >&2
elf="$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/testguest"
# The guest must stay free of SSE (see .cargo/config.toml for why).
if command -v objdump >/dev/null 2>&1 && objdump -d "$elf" | grep -q '%[xy]mm'; then
    echo "build.sh: $elf contains SSE instructions" >&2
    exit 1
fi
echo "$elf"
