#!/bin/sh
# Builds the test guest (release) and prints the ELF's path as the last line.
set -eu
cd "$(dirname "$0")"
: "${CARGO_TARGET_DIR:=$HOME/.cache/enspeed/target-testguest}"
export CARGO_TARGET_DIR
cargo build --release >&2
echo "$CARGO_TARGET_DIR/release/testguest"
