#!/bin/sh
# The demo cluster: three `enspeed server`s on this machine (separate data directories and
# ports on loopback), each serving the web UI and API, a Manager account, and a demo VM whose
# disk is mirrored between two of them. Prints the URL and the credentials, then runs until
# interrupted (Ctrl-C), stopping the servers and their VMs. Run again, it restarts the same
# cluster from DIR.
#
#   scripts/demo-cluster.sh ENSPEED KERNEL INITRD DIR [HTTPS_ADDRESS]
#
# With DEMO_ISO (./run.sh's default), the demo VM is a blank PC installed from that CD
# (image/kit/iso.sh's, whose kit installs itself onto the disk and powers off): uploaded to the
# ISO library, in the VM's CD-ROM drive at its first power-on; once installed, the CD is
# ejected and the VM boots its disk. Without it (ENSPEED_DEMO_INSTALL=0 ./run.sh), the VM boots
# KERNEL (and INITRD), the cluster's guest kernel.
#
# ./run.sh calls it, here or inside the test host. POSIX sh: it runs under busybox too.
# HTTPS_ADDRESS is where server 1's HTTPS listens (default 127.0.0.1; servers 2 and 3 use the
# next ports); plain HTTP is on 127.0.0.1:8080-8082.
set -eu
# As a test-host scenario (image/testhost/run.sh --forward 8443 ...; KIT and ENSPEED set, no
# arguments): the kit's kernel, the NIC on QEMU's user network up, HTTPS on every address so
# the forwarded ports reach it.
if [ $# -eq 0 ] && [ -n "${KIT:-}" ] && [ -n "${ENSPEED:-}" ]; then
    ip link set lo up
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 ||
        { echo "demo: the test host has no NIC (run.sh --forward PORT)" >&2; exit 1; }
    IN_TESTHOST=1
    # ./run.sh gives the test host a disk (ext4, made there): the cluster lives on it, so the
    # next ./run.sh starts the same one. Without one, in the test host's memory.
    data=/tmp/demo
    if [ -b /dev/vda ]; then
        mkdir -p /var/lib/enspeed-demo
        mount -t ext4 /dev/vda /var/lib/enspeed-demo ||
            { echo "demo: cannot mount the test host's data disk (/dev/vda)" >&2; exit 1; }
        data=/var/lib/enspeed-demo/cluster
        KEPT=1
    fi
    set -- "$ENSPEED" "$KIT/vmlinuz" "$KIT/initrd.img" "$data" 0.0.0.0
    [ ! -f /usr/local/bin/demo-install.iso ] || DEMO_ISO=/usr/local/bin/demo-install.iso
    # Where ./run.sh keeps the test host's console (TESTHOST_LOG), to name it in the banner.
    # shellcheck disable=SC1091
    [ ! -f /usr/local/bin/demo-host.env ] || . /usr/local/bin/demo-host.env
fi
[ $# -ge 4 ] || { echo "usage: $0 ENSPEED KERNEL INITRD DIR [HTTPS_ADDRESS]" >&2; exit 2; }
ENSPEED=$1 KERNEL=$2 INITRD=$3 DIR=$4 HTTPS_IP=${5:-127.0.0.1}
# Kernel messages on the screen (tty0) and the serial port; ttyS0, last, is /dev/console.
CMDLINE=${DEMO_CMDLINE:-console=tty0 console=ttyS0 quiet kit.task=wait}
mkdir -p "$DIR"
pw="$DIR/admin-password"
if [ ! -s "$pw" ]; then
    # Whole or not at all, even across a power cut (the test host's stop is one).
    (umask 077; tr -dc 'A-Za-z0-9' </dev/urandom | head -c 16 >"$pw.new"; echo >>"$pw.new")
    sync
    mv "$pw.new" "$pw"
    sync
fi
PASSWORD=$(head -n1 "$pw")

# Ctrl-C (SIGINT), SIGTERM or SIGHUP: the servers stop (their VMMs and blockd die with them;
# RocksDB and the disk copies are left as after a power cut, which they survive), then the
# script ends: 130 after Ctrl-C, 0 when asked to stop otherwise.
pids="" helpers=""
stop() {
    trap - INT TERM HUP EXIT
    echo
    echo "demo: stopping the servers (their VMs and disks stop with them)"
    for p in $helpers $pids; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "demo: stopped"
}
trap 'stop; exit 130' INT
trap 'stop; exit 0' TERM HUP
trap stop EXIT

for i in 1 2 3; do
    if [ "$i" = 1 ]; then
        boot="--init"
    else
        # The others join with the cluster's join token, made by server 1 with the cluster's CA
        # (on a restart their data directories hold a state, and --join and --token are
        # ignored).
        n=0
        until [ -s "$DIR/server1/tls/cluster-token" ]; do
            n=$((n + 1))
            [ $n -lt 300 ] || { echo "demo: server 1 made no cluster token; see $DIR/server1.log" >&2; exit 1; }
            sleep 0.1
        done
        boot="--join 127.0.0.1:7401 --token $(cat "$DIR/server1/tls/cluster-token")"
    fi
    # shellcheck disable=SC2086 # $boot is several words
    ENSPEED_LOG=${ENSPEED_LOG:-info} "$ENSPEED" server --id "$i" --data "$DIR/server$i" \
        --listen "127.0.0.1:740$i" $boot \
        --memory-mib 1024 --disk-gib 16 --vcpus 4 \
        --blockd-listen "127.0.0.1:750$i" \
        --http "127.0.0.1:808$((i - 1))" --https "$HTTPS_IP:844$((i + 2))" \
        --manager admin --manager-password-file "$pw" \
        --guest-kernel "$KERNEL" --guest-initrd "$INITRD" --guest-cmdline "$CMDLINE" \
        >>"$DIR/server$i.log" 2>&1 &
    pids="$pids $!"
done

export ENSPEED_URL=http://127.0.0.1:8080 ENSPEED_USER=admin ENSPEED_PASSWORD="$PASSWORD"
echo "demo: waiting for the cluster (logs: $DIR/server1.log ...)"
# Each try bounded (a server that takes the connection but does not answer is not waited for
# a minute), the whole wait too; then what each server said last.
began=$(date +%s)
until timeout 10 "$ENSPEED" servers >/dev/null 2>&1; do
    waited=$(($(date +%s) - began))
    if [ "$waited" -ge 180 ]; then
        echo "demo: the cluster did not come up in $waited s; the servers' last lines:" >&2
        for i in 1 2 3; do tail -n 5 "$DIR/server$i.log" | sed "s/^/demo: server $i: /" >&2; done
        exit 1
    fi
    sleep 1
done
ISO_NAME=enspeed-kit-installer.iso
installing=""
if ! "$ENSPEED" vm list | grep -q ' demo '; then
    if [ -n "${DEMO_ISO:-}" ]; then
        echo "demo: uploading $DEMO_ISO to the ISO library as $ISO_NAME"
        "$ENSPEED" iso upload "$DEMO_ISO" --name "$ISO_NAME" >/dev/null
        "$ENSPEED" vm create demo --memory 256 --vcpus 1 --disk 2 --blank --iso "$ISO_NAME" >/dev/null
        installing=1
    else
        "$ENSPEED" vm create demo --memory 256 --vcpus 1 --disk 2 --start >/dev/null
    fi
fi

# The demo VM's install: powered on once every VM server holds the CD (its drive is filled
# from the server it runs on); when the installer has powered it off, the CD is ejected and the
# VM boots what was installed.
install_demo() {
    id=$("$ENSPEED" vm list | awk '$2 == "demo" { print $1 }')
    n=0
    until "$ENSPEED" iso list | awk -v n="$ISO_NAME" '$1 == n { split($3, r, "/"); ok = r[1] == r[2] } END { exit !ok }'; do
        n=$((n + 1))
        [ $n -lt 300 ] || { echo "demo: the VM servers never all held $ISO_NAME" >&2; return 1; }
        sleep 1
    done
    echo "demo: VM $id (demo) powers on: its BIOS boots the installer CD (watch its console)"
    "$ENSPEED" vm start "$id" >/dev/null
    until "$ENSPEED" vm list | awk '$2 == "demo" && $6 == "running" { f = 1 } END { exit !f }'; do sleep 2; done
    until "$ENSPEED" vm list | awk '$2 == "demo" && $6 == "stopped" { f = 1 } END { exit !f }'; do sleep 2; done
    echo "demo: VM $id (demo) installed and powered off; ejecting the CD and booting its disk"
    "$ENSPEED" vm cdrom "$id" >/dev/null
    "$ENSPEED" vm start "$id" >/dev/null
    # The installed system says so on its serial console (logged on the VM's primary server).
    n=0
    until cat "$DIR"/server*/agent/vms/demo/serial.log 2>/dev/null | grep -qa "KIT: installed proof=demo"; do
        n=$((n + 1))
        [ $n -lt 300 ] || { echo "demo: the installed system did not start in 600 s" >&2; return 1; }
        sleep 2
    done
    echo "demo: VM $id (demo) runs the system installed on its disk: its console shows a shell"
}

serial=$(ls "$DIR"/server*/agent/vms/demo/serial.log 2>/dev/null | head -n1 || true)
if [ -n "${IN_TESTHOST:-}" ]; then
    WEB="  Web UI:    https://127.0.0.1:8443 on the machine that runs the test host (self-signed
             certificate, made on first start; also :8444, :8445: every server serves it)
             Inside the test host: http://127.0.0.1:8080"
else
    WEB="  Web UI:    http://127.0.0.1:8080   (also :8081, :8082: every server serves it)
             https://$HTTPS_IP:8443  (self-signed certificate, made on first start)"
fi
cat <<BANNER

==== EnSpeed demo cluster: three servers on this machine ====

$WEB
  Manager:   admin / $PASSWORD   (kept in $pw)

$(if [ -n "$installing" ]; then
    echo "  The demo VM is a blank PC that installs the guest kit (Debian's kernel) from a CD in the"
    echo "  ISO library onto its disk, then boots it: open its console in the web UI to watch."
else
    echo "  The demo VM runs the guest kit (Debian's kernel)."
fi)
  Its disk is mirrored between two servers.
  From a shell:  ENSPEED_URL=$ENSPEED_URL ENSPEED_PASSWORD=$PASSWORD $ENSPEED vm list
  Its serial console is logged on its primary server: $DIR/server*/agent/vms/demo/serial.log
  Servers' logs: $DIR/server*.log$(if [ -n "${TESTHOST_LOG:-}" ]; then
    echo
    echo "  The test host's console and kernel messages: $TESTHOST_LOG"
fi)

  Ctrl-C stops the cluster; $(if [ -n "${IN_TESTHOST:-}" ] && [ -z "${KEPT:-}" ]; then
    echo "its data lives in the test host's memory: ./run.sh again starts a new one."
else
    echo "./run.sh again starts the same one."
fi)

BANNER
"$ENSPEED" servers || true
"$ENSPEED" vm list || true
[ -z "$serial" ] || echo "serial console: $serial"
if [ -n "$installing" ]; then
    install_demo &
    helpers=$!
fi
# Keep running until interrupted; show the VM list now and then. The sleep is waited for in
# the background so that a signal is taken at once.
while :; do
    sleep 30 &
    wait $! || true
    "$ENSPEED" vm list 2>/dev/null | tail -n +2 || true
done
