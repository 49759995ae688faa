#!/usr/bin/env bash
# Installs what building and testing EnSpeed needs on a fresh Debian machine, and nothing by
# hand: host tools from Debian's packages. Images for guests are built from unpacked .debs by
# image/kit and image/testhost, never installed. Builds the web UI (which the enspeed binary
# embeds) and installs the browser tests' packages. Idempotent; quiet when all is there.
# Prints the Cargo target directory on stdout, and nothing else there.
set -euo pipefail

# command (or a file's path, globs allowed)  debian-package
needs=(
    "qemu-system-x86_64 qemu-system-x86"
    "qemu-img qemu-utils"
    "cpio cpio"
    "mkfs.ext4 e2fsprogs"
    "ip iproute2"
    "nft nftables"
    "busybox busybox"
    "ping iputils-ping"
    "curl curl"
    "python3 python3"
    "cc gcc"
    "as binutils"
    "/usr/share/seabios/bios-256k.bin seabios"
    "grub-mkimage grub-common"
    "/usr/lib/grub/i386-pc/cdboot.img grub-pc-bin"
    "/usr/lib/grub/x86_64-efi/linux.mod grub-efi-amd64-bin"
    "mformat mtools"
    "/usr/share/ovmf/OVMF.fd ovmf"
    "xorriso xorriso"
    "mmdebstrap mmdebstrap"
    "mksquashfs squashfs-tools"
    "mkfs.vfat dosfstools"
    "/usr/include/rocksdb/c.h librocksdb-dev"
    "/usr/lib/llvm-*/lib/libclang.so libclang-dev"
    "chromium chromium"
)
missing=()
for n in "${needs[@]}"; do
    set -- $n
    case "$1" in
        /*) compgen -G "$1" >/dev/null || missing+=("$2") ;;
        *) command -v "$1" >/dev/null 2>&1 || missing+=("$2") ;;
    esac
done
# The web UI's build and the browser tests run on Node; Debian's nodejs only if npm is missing.
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >&2 || { apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; }
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (the Rust toolchain) is missing" >&2; exit 1; }

here="$(cd "$(dirname "$0")" && pwd)"
"$here/build-ui.sh" >&2
"$here/npm-ci.sh" "$here/../tests/browser" >&2

# Cargo's target directory lives outside the clone so reruns are incremental.
echo "${CARGO_TARGET_DIR:-$HOME/.cache/enspeed/target}"
