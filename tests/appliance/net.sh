# Sourced by the appliance scripts (tests/appliance/install.sh, scripts/drill-appliances.sh):
# the virtual network their QEMU machines share.
#
#   appliance_net NS TAP...   a network namespace NS holding a bridge br0 where this machine is
#                             10.0.0.1/24, and a tap per name, on the bridge, for QEMU's -netdev tap
appliance_net() {
    local ns=$1 tap
    shift
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" addr add 10.0.0.1/24 dev br0
    ip -n "$ns" link set br0 up
    for tap in "$@"; do
        ip -n "$ns" tuntap add dev "$tap" mode tap
        ip -n "$ns" link set "$tap" master br0 up
    done
}
