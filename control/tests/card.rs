//! A VM's network card as a VM server serves it, with the real kernel parts: the card's port
//! in a Linux bridge, its nftables filter, the DHCP service and address watch on its packet
//! socket. A veth pair stands in for the tap: its far end, in a network namespace of its own,
//! is the guest, whose DHCP client is busybox's udhcpc. Needs root (as the VM servers do).
//! This thread runs in a network namespace of its own; the bridge's address is the router.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use control::netdev;
use control::vmnet::{parse_mac, CardService, Lease};

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn must(args: &[&str]) -> String {
    run(args).unwrap_or_else(|e| panic!("{e}"))
}

/// The guest's namespace; deleted when dropped.
struct Guest(String);

impl Guest {
    fn sh(&self, script: &str) -> Result<String, String> {
        run(&["ip", "netns", "exec", &self.0, "sh", "-c", script])
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.0]);
    }
}

fn missing(tool: &str) -> bool {
    let there = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !there {
        eprintln!("SKIPPED: {tool} is not installed (scripts/setup.sh installs it)");
    }
    !there
}

#[test]
fn a_card_gets_its_lease_by_dhcp_and_sends_from_nothing_else() {
    if missing("busybox") || missing("nft") || unsafe { libc::geteuid() } != 0 {
        return;
    }
    // SAFETY: this test's thread alone moves to a new network namespace; what it starts
    // (threads, commands) follows it.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
    must(&["ip", "link", "set", "lo", "up"]);
    let guest = Guest(format!("escard{}", std::process::id()));
    let _ = run(&["ip", "netns", "del", &guest.0]);
    must(&["ip", "netns", "add", &guest.0]);
    let (mac, other_mac) = ("02:45:53:00:00:07", "02:45:53:00:00:08");
    must(&[
        "ip", "link", "add", "vtap0", "type", "veth", "peer", "name", "eth0", "netns", &guest.0,
    ]);
    must(&["ip", "link", "add", "br-card", "type", "bridge"]);
    must(&["ip", "link", "set", "vtap0", "master", "br-card"]);
    must(&["ip", "addr", "add", "10.77.0.1/24", "dev", "br-card"]);
    for dev in ["br-card", "vtap0"] {
        must(&["ip", "link", "set", dev, "up"]);
    }
    guest
        .sh(&format!(
            "ip link set lo up && ip link set eth0 address {mac} && ip link set eth0 up"
        ))
        .unwrap();

    let lease = Lease {
        mac: parse_mac(mac).unwrap(),
        ip: Ipv4Addr::new(10, 77, 0, 5),
        mask: Ipv4Addr::new(255, 255, 255, 0),
        broadcast: Ipv4Addr::new(10, 77, 0, 255),
        router: Ipv4Addr::new(10, 77, 0, 1),
        dns: vec![Ipv4Addr::new(10, 77, 0, 53)],
    };
    netdev::filter_tap("vtap0", mac, Some(lease.ip)).unwrap();
    let service = CardService::start("vtap0", lease.mac, Some(lease.clone())).unwrap();

    // udhcpc's script prints what it was given and configures the address.
    let script = std::env::temp_dir().join(format!("escard{}.sh", std::process::id()));
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] || exit 0\necho \"LEASE ip=$ip mask=$mask router=$router dns=$dns\"\n\
         ip addr add \"$ip/$mask\" dev \"$interface\"\n",
    )
    .unwrap();
    must(&["chmod", "+x", script.to_str().unwrap()]);
    let got = guest
        .sh(&format!(
            "busybox udhcpc -i eth0 -n -q -f -t 4 -T 1 -s {}",
            script.display()
        ))
        .unwrap();
    assert!(
        got.contains("LEASE ip=10.77.0.5 mask=24 router=10.77.0.1 dns=10.77.0.53"),
        "udhcpc: {got}"
    );
    assert_eq!(service.addresses(), vec![lease.ip], "the lease is seen");
    guest
        .sh("ping -c 1 -W 2 10.77.0.1")
        .expect("the leased address reaches the router");

    // Another address of the guest's: its IPv4 and its ARP are dropped at the bridge.
    guest.sh("ip addr add 10.77.0.9/24 dev eth0").unwrap();
    must(&["ip", "neigh", "flush", "dev", "br-card"]);
    assert!(
        guest.sh("ping -c 2 -W 1 -I 10.77.0.9 10.77.0.1").is_err(),
        "a spoofed source address got through"
    );
    let neigh = must(&["ip", "neigh", "show", "dev", "br-card"]);
    assert!(
        !neigh.contains("10.77.0.9 ") || neigh.contains("FAILED") || neigh.contains("INCOMPLETE"),
        "the router learned the spoofed address: {neigh}"
    );
    guest
        .sh("ping -c 1 -W 2 10.77.0.1")
        .expect("its own address still works");

    // Another MAC: nothing gets through, not even from the leased address.
    guest
        .sh(&format!("ip link set eth0 address {other_mac}"))
        .unwrap();
    must(&["ip", "neigh", "flush", "dev", "br-card"]);
    assert!(
        guest.sh("ping -c 2 -W 1 10.77.0.1").is_err(),
        "a spoofed MAC got through"
    );
    // ... and asks the DHCP service in vain.
    let t = Instant::now();
    assert!(guest
        .sh(&format!(
            "busybox udhcpc -i eth0 -n -q -f -t 2 -T 1 -s {}",
            script.display()
        ))
        .is_err());
    assert!(t.elapsed() < Duration::from_secs(30));
    guest
        .sh(&format!("ip link set eth0 address {mac}"))
        .unwrap();
    guest
        .sh("ping -c 1 -W 2 10.77.0.1")
        .expect("its MAC back, it is heard again");

    // Unfiltered (the card unplugged), the filter is gone from the table.
    drop(service);
    netdev::unfilter_tap("vtap0");
    let table = must(&["nft", "list", "table", "bridge", "enspeed"]);
    assert!(!table.contains("vtap0"), "{table}");
    let _ = std::fs::remove_file(script);
}
