#!/bin/sh
# Assembles the firmware tests' boot disk (a 1 MiB raw image: boot sector, second stage,
# zeros) with binutils, and prints its path as the last line.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
: "${CARGO_TARGET_DIR:=$HOME/.cache/enspeed/target}"
out="$CARGO_TARGET_DIR/bootdisk"
mkdir -p "$out"
as --32 -o "$out/bootdisk.o" "$here/bootdisk.S"
ld -m elf_i386 -Ttext=0x7c00 -e _start --oformat=binary -o "$out/bootdisk.bin" "$out/bootdisk.o"
cp "$out/bootdisk.bin" "$out/bootdisk.img"
truncate -s 1M "$out/bootdisk.img"
echo "$out/bootdisk.img"
