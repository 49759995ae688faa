#!/usr/bin/env bash
# Builds the EnSpeed appliance: an installer ISO (BIOS and UEFI, CD and USB stick alike) from
# Debian 12's packages and this project's `enspeed` binary, nothing else. Prints its path last.
#
#   image/appliance/build.sh [ENSPEED_BINARY]     (default: builds target/release/enspeed)
#
# Inside: a Debian system (kernel, systemd, iproute2, nftables, chrony, the VM firmware, GRUB for
# the disk it installs) that boots live from the ISO's squashfs (Debian's live-boot) into the
# installer (`enspeed install`) or a rescue shell; the installer copies the same squashfs onto
# the server's disk. Output and cache under $ENSPEED_CACHE/appliance (~/.cache/enspeed).
# Idempotent: the system's tree is rebuilt only when the package list or this script changes.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
. "$here/../kit/lib.sh"
OUT=$CACHE/appliance
mkdir -p "$OUT"

for t in "mmdebstrap mmdebstrap" "mksquashfs squashfs-tools" "xorriso xorriso" \
    "grub-mkrescue grub-common" "mformat mtools"; do
    # shellcheck disable=SC2086
    ensure_tool $t
done
# grub-mkrescue's two halves: the BIOS (El Torito and MBR) and the UEFI images.
[ -e /usr/lib/grub/i386-pc/cdboot.img ] || apt-get install -y -q grub-pc-bin >&2 || die "cannot install grub-pc-bin"
[ -e /usr/lib/grub/x86_64-efi/linux.mod ] || apt-get install -y -q grub-efi-amd64-bin >&2 ||
    die "cannot install grub-efi-amd64-bin"

bin=${1:-}
if [ -z "$bin" ]; then
    (cd "$root" && cargo build --release -p enspeed >&2)
    bin="${CARGO_TARGET_DIR:-$root/target}/release/enspeed"
fi
[ -x "$bin" ] || die "no enspeed binary at $bin"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/enspeed/Cargo.toml" | head -n1)

# What the appliance runs: systemd and udev; the kernel and live-boot (the ISO's initramfs finds
# its squashfs); iproute2 and nftables (VM networks); chrony (leases and certificates need a
# clock); SeaBIOS and OVMF (VM firmware); qemu-img (appliances' disk formats); GRUB for BIOS and UEFI, sfdisk, mkfs and unsquashfs
# (the installer; its text UI is enspeed's own).
# And the Debian packages of the libraries enspeed links (RocksDB's among them), as this
# machine's dpkg names them: the binary is built on Debian 12, as the image is.
libpkgs=$(for l in $(ldd "$bin" | awk '$3 ~ /^\// {print $3}'); do
    dpkg -S "$(readlink -f "$l")" 2>/dev/null || dpkg -S "$l"
done | cut -d: -f1 | sort -u | tr '\n' ' ')
[ -n "$libpkgs" ] || die "cannot tell which packages hold the libraries of $bin"
packages="$libpkgs systemd systemd-sysv systemd-resolved udev dbus linux-image-amd64 live-boot
    iproute2 nftables chrony seabios ovmf qemu-utils
    grub-pc-bin grub-efi-amd64-bin grub2-common fdisk e2fsprogs dosfstools squashfs-tools
    kmod procps util-linux less ca-certificates"
packages=$(echo $packages | tr ' ' ',')
# No documentation, manuals or translations: an appliance has no one to read them.
debstrap=(--variant=minbase --include="$packages"
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*'
    --aptopt='APT::Install-Recommends "false"'
    --customize-hook='rm -f "$1"/etc/machine-id "$1"/var/lib/dbus/machine-id; touch "$1"/etc/machine-id'
    --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/*'
    bookworm)
mirrors=("http://deb.debian.org/debian" "deb http://deb.debian.org/debian-security bookworm-security main")
# The Debian tree is rebuilt when what makes it changes (to take in Debian's later security
# updates, delete $OUT/tree.tar).
key=$(printf '%s\n' "${debstrap[@]}" "${mirrors[@]}" | sha256sum | cut -d' ' -f1)
tree=$OUT/tree.tar
if [ "$(cat "$OUT/.tree-inputs" 2>/dev/null)" != "$key" ] || [ ! -s "$tree" ]; then
    log "building the system from Debian 12's packages (mmdebstrap; a few minutes)"
    rm -rf "$tree" "$OUT/tree-new.tar"
    mmdebstrap "${debstrap[@]}" "$OUT/tree-new.tar" "${mirrors[@]}" >&2
    mv "$OUT/tree-new.tar" "$tree"
    rm -f "$OUT"/*.iso.inputs
    echo "$key" >"$OUT/.tree-inputs"
fi

iso=$OUT/enspeed-$version-amd64.iso
# The ISO is made again when what goes into it changes: the system's tree, the binary, the
# appliance's own files and this script (test.sh makes it beside the level-1 tests, and the
# appliance test then finds it made).
made=$({
    echo "$key"
    for f in "$bin" "$here/build.sh" "$here/grub.cfg"; do sha256sum <"$f"; done
    (cd "$here/rootfs" && find . -type f -exec sha256sum {} + && find . -printf '%m %p -> %l\n') |
        LC_ALL=C sort
    # The tools that make it (GRUB's images go into it).
    dpkg-query -W grub-common grub-pc-bin grub-efi-amd64-bin xorriso squashfs-tools mtools
} | sha256sum | cut -d' ' -f1)
if [ -s "$iso" ] && [ "$(cat "$iso.inputs" 2>/dev/null)" = "$made" ]; then
    log "up to date: $iso"
    echo "$iso"
    exit 0
fi
work=$(mktemp -d "$CACHE/.appliance.XXXXXX")
trap 'rm -rf "$work"' EXIT
sys=$work/sys
mkdir -p "$sys" "$work/iso/live" "$work/iso/boot/grub"
tar -C "$sys" -xf "$tree"
# The project's part: the binary, its units and the appliance's own files.
install -m 0755 "$bin" "$sys/usr/bin/enspeed"
strip --strip-debug "$sys/usr/bin/enspeed"
cp -a "$here/rootfs/." "$sys/"
echo "$version" >"$sys/etc/enspeed-release"
echo enspeed >"$sys/etc/hostname"
chroot "$sys" systemctl enable enspeed-installer.service enspeed.service enspeed-issue.service systemd-networkd.service \
    systemd-resolved.service chrony.service >&2
ln -sf /run/systemd/resolve/stub-resolv.conf "$sys/etc/resolv.conf"

kver=$(basename "$(ls -d "$sys"/lib/modules/* | head -n1)")
cp "$sys/boot/vmlinuz-$kver" "$work/iso/live/vmlinuz"
cp "$sys/boot/initrd.img-$kver" "$work/iso/live/initrd.img"
log "squashing the system"
mksquashfs "$sys" "$work/iso/live/filesystem.squashfs" -comp zstd -Xcompression-level 3 -noappend -no-progress -quiet >/dev/null
# The system's size, bytes: the installer's progress while it unpacks.
du -sb "$sys" | cut -f1 >"$work/iso/live/filesystem.size"
cp "$here/grub.cfg" "$work/iso/boot/grub/grub.cfg"
sed -i "s/@VERSION@/$version/g" "$work/iso/boot/grub/grub.cfg"

log "making $iso (BIOS and UEFI; CD and USB stick)"
grub-mkrescue -o "$iso.new" "$work/iso" -- -volid ENSPEED_INSTALL >/dev/null 2>&1 ||
    grub-mkrescue -o "$iso.new" "$work/iso" -- -volid ENSPEED_INSTALL >&2
mv "$iso.new" "$iso"
echo "$made" >"$iso.inputs"
log "$(du -m "$iso" | cut -f1) MB"
echo "$iso"
