#!/usr/bin/env bash
# Installs the appliance ISO unattended on a blank disk and boots the installed disk, under
# QEMU TCG with an emulated AMD-V (as the test host: the installed server gets a real /dev/kvm).
#
#   tests/appliance/install.sh ISO WORKDIR [--install-firmware bios|uefi] [--boot-firmware bios|uefi]
#                                          [--usb]
#
# Defaults: the install boots the ISO as a CD by UEFI, the installed disk boots by BIOS; --usb
# gives the ISO as a USB stick (the same file, as `dd` writes it) instead of a CD.
# 1. The ISO (as a CD) with a blank 16 GiB disk and a small disk labelled ENSPEED holding
#    enspeed-install.toml: the installer must print "ENSPEED-INSTALL: DONE" and power off.
# 2. The disk alone: the server must answer https://ADDRESS/api/v1/summary after the Manager's
#    login, offer its memory to VMs, and show on its console the UI's address and its KVM.
# Prints "APPLIANCE install-s S", "APPLIANCE boot-to-api-s S", "APPLIANCE iso-mb M" and ends
# with "APPLIANCE: PASS" (exit 0) or "APPLIANCE: FAIL ..." (exit 1).
set -euo pipefail
iso=$1 work=$2
shift 2
install_fw=uefi boot_fw=bios medium=cd
while [ $# -gt 0 ]; do
    case $1 in
        --usb) medium=usb; shift ;;
        --install-firmware) install_fw=$2; shift 2 ;;
        --boot-firmware) boot_fw=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
fail() { echo "APPLIANCE: FAIL $*"; exit 1; }
[ -s "$iso" ] || fail "no ISO at $iso"
mkdir -p "$work"
work=$(cd "$work" && pwd)
password=$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')
cat >"$work/enspeed-install.toml" <<TOML
disk = "/dev/vda"
hostname = "vmserver1"
[network]
interface = "auto"
address = "dhcp"
gateway = ""
[cluster]
create = true
manager_password = "$password"
join = ""
token = ""
[after]
poweroff = true
TOML
rm -f "$work/answers.img" "$work/disk.img"
mkfs.vfat -n ENSPEED -C "$work/answers.img" 2048 >/dev/null
mcopy -i "$work/answers.img" "$work/enspeed-install.toml" ::enspeed-install.toml
truncate -s 16G "$work/disk.img"
echo "APPLIANCE iso-mb $(($(stat -c %s "$iso") / 1048576))"

firmware() {
    case $1 in
        bios) echo "" ;;
        uefi) echo "-bios /usr/share/ovmf/OVMF.fd" ;;
        *) fail "firmware $1 is neither bios nor uefi" ;;
    esac
}
# qemu FIRMWARE LOG TIMEOUT ARGS...: QEMU TCG with AMD-V, its serial port to LOG.
qemu() {
    local fw=$1 log=$2 t=$3
    shift 3
    # exec: the background job is QEMU's timeout itself, so killing the job stops QEMU (which
    # would otherwise live on, holding this script's output open).
    # shellcheck disable=SC2046 # the firmware's words
    exec timeout -k 10 "$t" qemu-system-x86_64 -accel tcg -cpu EPYC,+svm -smp 2 -m 3072 \
        $(firmware "$fw") -display none -no-reboot -serial "file:$log" \
        -monitor "unix:$work/monitor.sock,server=on,wait=off" \
        -drive "file=$work/disk.img,if=virtio,format=raw" "$@" \
        2> >(grep -v "TCG doesn't support requested feature" >&2)
}

# screen NAME: the VM's screen as NAME.ppm beside its console (through QEMU's monitor), for a
# person to look at after a failure.
screen() {
    python3 - "$work/monitor.sock" "$work/$1.ppm" <<'PY' >/dev/null 2>&1 || true
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.send(("screendump %s\n" % sys.argv[2]).encode())
time.sleep(2)
PY
}

t0=$(date +%s)
qemu "$install_fw" "$work/install.log" 1500 \
    -drive "file=$work/answers.img,if=virtio,format=raw,readonly=on" \
    $(case $medium in
        cd) echo "-drive file=$iso,media=cdrom,readonly=on -boot order=d" ;;
        usb) echo "-device qemu-xhci -drive if=none,id=stick,file=$iso,format=raw,readonly=on -device usb-storage,drive=stick" ;;
    esac) \
    -nic user,model=virtio-net-pci,restrict=on &
qpid=$!
# A failed install stays on its console for a person to read: stop it then, not at the timeout.
while kill -0 $qpid 2>/dev/null; do
    if grep -qas "ENSPEED-INSTALL: FAILED" "$work/install.log"; then
        screen install-failed
        kill $qpid
        break
    fi
    sleep 5
done
set +e
wait $qpid
rc=$?
set -e
t1=$(date +%s)
grep -a "enspeed install:" "$work/install.log" | tr -d '\r' | sed 's/^/  /'
grep -qa "ENSPEED-INSTALL: DONE" "$work/install.log" ||
    fail "the install did not finish (QEMU exit $rc; its console: $work/install.log)"
[ $rc = 0 ] || fail "QEMU exited $rc after the install (powered off? see $work/install.log)"
echo "APPLIANCE install-s $((t1 - t0)) ($install_fw from the $medium)"

port=$((20000 + RANDOM % 20000))
qemu "$boot_fw" "$work/boot.log" 1200 \
    -nic "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:$port-:443" &
qpid=$!
trap 'kill $qpid 2>/dev/null || true; wait $qpid 2>/dev/null || true' EXIT
jar=$work/cookies
api=https://127.0.0.1:$port/api/v1
n=0
until curl -ksf -c "$jar" -H 'Content-Type: application/json' \
    -d "{\"name\":\"admin\",\"password\":\"$password\"}" "$api/session" >"$work/session.json" 2>/dev/null; do
    kill -0 $qpid 2>/dev/null || fail "the installed server stopped before its API answered (see $work/boot.log)"
    n=$((n + 5))
    [ $n -lt 900 ] || { screen boot-failed; fail "no API on https port 443 after 900 s (see $work/boot.log, boot-failed.ppm)"; }
    sleep 5
done
t2=$(date +%s)
echo "APPLIANCE boot-to-api-s $((t2 - t1)) ($boot_fw)"
curl -ksf -b "$jar" "$api/summary" >"$work/summary.json" || fail "GET /api/v1/summary refused after the login"
echo "  summary: $(cat "$work/summary.json")"
curl -ksf -b "$jar" "$api/servers" >"$work/servers.json" || fail "GET /api/v1/servers refused"
echo "  servers: $(head -c 600 "$work/servers.json")"
grep -q '"memory_mib":[1-9]' "$work/servers.json" || fail "the server offers VMs no memory: $(cat "$work/servers.json")"
grep -qa "Web UI: https://10.0.2.15/" "$work/boot.log" || fail "the console does not show the web UI's address"
grep -qa "KVM: available (kvm_amd)" "$work/boot.log" || fail "the installed server has no KVM: $(grep -a "KVM:" "$work/boot.log")"
echo "APPLIANCE: PASS"
