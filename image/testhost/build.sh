#!/usr/bin/env bash
# Builds the test host into $ENSPEED_CACHE/testhost (default ~/.cache/enspeed/testhost): the
# Debian kernel and a busybox initramfs with KVM (kvm_amd), tun, loop, ext4, QEMU with its
# libraries and x86 firmware (for the reference benchmark), SeaBIOS and OVMF (for EnSpeed's
# firmware boots and QEMU's), the guest kit under /kit and the
# scenario helpers. run.sh boots it under QEMU TCG with an emulated AMD-V.
# Idempotent: rebuilds only when its inputs (scripts, package versions, the kit, the host
# libraries copied in) change.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
kitdir=$(cd "$here/../kit" && pwd)
. "$kitdir/lib.sh"

# kvm_amd for /dev/kvm; tun for the guests' tap devices; loop and ext4 (and the crc32c
# ext4 asks the crypto API for) to read a guest's disk image back; virtio_pci and virtio_net
# for the NIC the demo's forwarded ports come in on (run.sh --forward); veth, bridge, 8021q,
# nf_tables and nft_meta_bridge (meta keys, iifname among them, in the bridge family) for the
# VM servers' networks (tests/testhost/enspeed-vmnet.sh); vhost_net for QEMU's side of the
# network benchmark (scripts/bench-net.sh); virtio_blk for the disk ./run.sh gives it (--disk).
TESTHOST_MODULES="kvm_amd tun loop ext4 crc32c_generic virtio_pci virtio_net veth bridge 8021q nf_tables nft_meta_bridge vhost_net virtio_blk"

# QEMU's firmware search path on Debian is /usr/share/qemu then /usr/share/seabios; these
# are the x86 files that -M pc (SeaBIOS, linuxboot, kvmvapic, VGA BIOS) and -M microvm
# (qboot) need to boot a kernel.
QEMU_DATA="usr/share/qemu/bios-microvm.bin usr/share/qemu/qboot.rom usr/share/qemu/linuxboot.bin
usr/share/qemu/linuxboot_dma.bin usr/share/qemu/pvh.bin usr/share/qemu/multiboot.bin
usr/share/qemu/multiboot_dma.bin usr/share/qemu/kvmvapic.bin usr/share/qemu/sgabios.bin"

ensure_tool dpkg-deb dpkg
ensure_tool cpio cpio
# The unpacked qemu's libraries are copied from the host (ldd), and run.sh needs QEMU anyway.
ensure_tool qemu-system-x86_64 qemu-system-x86

"$kitdir/build.sh"
KIT=$CACHE/kit
OUT=$CACHE/testhost
mkdir -p "$CACHE/debs"

kpkg=$(kernel_package)
pkgs="$kpkg busybox-static qemu-system-x86 qemu-system-data seabios ovmf"
deb_resolve $pkgs
qemu_root=$(deb_unpack qemu-system-x86)
qemu_bin=$qemu_root/usr/bin/qemu-system-x86_64
qemu_libs=$(ldd "$qemu_bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
inputs=$(for p in $pkgs; do printf '%s %s\n' "$p" "$(deb_version "$p")"; done
    printf 'modules %s\nkit %s\n' "$TESTHOST_MODULES" "$(cat "$KIT/.inputs")")
# shellcheck disable=SC2086 # one file per word
key=$(inputs_hash "$here/build.sh" "$here/init" "$here/guest.sh" "$kitdir/lib.sh" $qemu_libs <<<"$inputs")
if [ "$(cat "$OUT/.inputs" 2>/dev/null)" = "$key" ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ]; then
    log "up to date: $OUT"
    exit 0
fi

work=$(mktemp -d "$CACHE/.testhost.XXXXXX")
trap 'rm -rf "$work"' EXIT
export MANIFEST_FILE=$work/out/MANIFEST
mkdir -p "$work/out"

kroot=$(deb_unpack "$kpkg")
bbroot=$(deb_unpack busybox-static)
deb_unpack qemu-system-x86 >/dev/null
dataroot=$(deb_unpack qemu-system-data)
seabiosroot=$(deb_unpack seabios)
ovmfroot=$(deb_unpack ovmf)
kver=$(ls "$kroot/lib/modules")
printf 'kernel-release %s\n' "$kver" >>"$MANIFEST_FILE"
sed 's/^/kit: /' "$KIT/MANIFEST" >>"$MANIFEST_FILE"

cp "$kroot/boot/vmlinuz-$kver" "$work/out/vmlinuz"

# Merged /usr like Debian 12, so ldd's /lib/... paths and the libraries run.sh appends for
# enspeed land in the same real directories.
root=$work/root
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,proc,sys,dev,tmp,run,etc,mnt,kit,usr/lib/testhost}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done
stage_busybox "$root" "$bbroot"
stage_modules "$root" "$kroot" "$bbroot/bin/busybox" $TESTHOST_MODULES
printf '%s\n' $TESTHOST_MODULES >"$root/etc/testhost-modules"

stage_elf "$root" "$qemu_bin" usr/bin/qemu-system-x86_64
mkdir -p "$root/usr/share/qemu" "$root/usr/share/seabios"
for f in $QEMU_DATA; do
    [ -e "$dataroot/$f" ] || [ -L "$dataroot/$f" ] || die "qemu-system-data has no $f"
    cp -P "$dataroot/$f" "$root/$f"
done
cp "$seabiosroot"/usr/share/seabios/*.bin "$root/usr/share/seabios/"
# OVMF with its variables in the same image, as `enspeed vmm --firmware uefi` and QEMU's
# -bios take it.
mkdir -p "$root/usr/share/ovmf"
cp "$ovmfroot/usr/share/ovmf/OVMF.fd" "$root/usr/share/ovmf/"

cp "$KIT/vmlinuz" "$KIT/initrd.img" "$KIT/disk.ext4" "$KIT/MANIFEST" "$root/kit/"
install -m 0644 "$here/guest.sh" "$root/usr/lib/testhost/guest.sh"
install -m 0755 "$here/init" "$root/init"

# Uncompressed (about 130 MiB, half of it the kit's blank disk): under TCG the kernel copies
# it faster than it inflates a gzip or zstd one (measured: /init 0.6 s sooner), and the
# build spends no minute compressing.
{ cpio_dev_console; cpio_dir "$root"; } >"$work/out/initrd.img"

printf '%s\n' "$key" >"$work/out/.inputs"
rm -rf "$OUT"
mv "$work/out" "$OUT"
log "built $OUT: $(cd "$OUT" && du -h vmlinuz initrd.img | tr -s '\t\n' ' ')"
