//! The host side of the VMs' networks, on a VM server: each network's bridge (over its uplink
//! NIC, or that NIC's VLAN device), and each network card's tap, plugged into its network's
//! bridge before the VMM opens it and removed when the VM stops here. Done with iproute2's
//! `ip`, as the system's own network tools do; every failure names the interface and what
//! was asked of it.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::state_machine::{NetworkRecord, Nic};
use crate::vmnet::{CardService, Lease};

/// The tap of VM `vmid`'s card `index` on server `server`, in hexadecimal (15 bytes at most
/// for any 32-bit VMID): each server's own, since during a live migration the VM has a VMM on
/// two servers at once, which may share a machine.
pub fn tap_name(server: u64, vmid: u64, index: usize) -> String {
    format!("e{vmid:x}n{index}s{server:x}")
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether interface `name` exists here.
pub fn exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// The bridge interface `name` is a port of, if any.
fn master(name: &str) -> Option<String> {
    std::fs::read_link(format!("/sys/class/net/{name}/master"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Makes network `net`'s bridge here, up, with its uplink (or the uplink's VLAN device) as a
/// port. An uplink NIC that this server does not have is an error naming it.
pub fn ensure_bridge(net: &NetworkRecord) -> Result<(), String> {
    let br = net.bridge.as_str();
    let what = |e: String| format!("network {}: {e}", net.name);
    if !exists(br) {
        ip(&["link", "add", "name", br, "type", "bridge"]).map_err(what)?;
    }
    ip(&["link", "set", br, "up"]).map_err(what)?;
    let Some(uplink) = &net.uplink else {
        return Ok(());
    };
    if !exists(uplink) {
        return Err(what(format!(
            "its uplink NIC {uplink} is not on this server"
        )));
    }
    let port = match net.vlan {
        None => uplink.clone(),
        Some(vid) => {
            let dev = format!("{uplink}.{vid}");
            if dev.len() > 15 {
                return Err(what(format!(
                    "the VLAN device {dev} would be longer than 15 characters"
                )));
            }
            if !exists(&dev) {
                let id = vid.to_string();
                ip(&[
                    "link", "add", "link", uplink, "name", &dev, "type", "vlan", "id", &id,
                ])
                .map_err(what)?;
            }
            dev
        }
    };
    match master(&port) {
        Some(m) if m == br => {}
        Some(m) => {
            return Err(what(format!(
                "{port} is already a port of bridge {m}, not of {br}"
            )))
        }
        None => {
            ip(&["link", "set", &port, "master", br]).map_err(what)?;
        }
    }
    ip(&["link", "set", uplink, "up"]).map_err(what)?;
    ip(&["link", "set", &port, "up"]).map_err(what)?;
    Ok(())
}

/// Creates tap `tap` (persistent, for the VMM to open), a port of `bridge`, up. A tap left by
/// a VMM that died is taken again.
pub fn plug_tap(tap: &str, bridge: &str) -> Result<(), String> {
    if !exists(bridge) {
        return Err(format!(
            "tap {tap}: its bridge {bridge} is not on this server"
        ));
    }
    if !exists(tap) {
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
    }
    ip(&["link", "set", tap, "master", bridge])?;
    ip(&["link", "set", tap, "up"])?;
    Ok(())
}

/// Removes tap `tap`, if it is here and no VMM holds it (on one machine that runs several
/// servers, another one's VMM may have taken it since).
pub fn unplug_tap(tap: &str) {
    let held = std::fs::read_to_string(format!("/sys/class/net/{tap}/carrier"))
        .is_ok_and(|c| c.trim() == "1");
    if exists(tap) && !held {
        if let Err(e) = ip(&["link", "del", tap]) {
            tracing::warn!(tap, error = %e, "cannot remove a VM's tap");
        }
    }
}

/// Runs an nftables script (`nft -f -`): one transaction, all or nothing.
fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft (Debian's nftables, which filters VM traffic): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The nftables chain of the card on `tap`.
fn card_chain(tap: &str) -> String {
    format!("card-{tap}")
}

/// The bridge filter of a VM's card on `tap`, in one transaction: frames entering the bridge
/// from it must come from its MAC (ARP's sender too) and carry no VLAN tag; it serves no
/// DHCP; with a lease (a network with DHCP), its DHCP requests stay on the tap (this server
/// answers them there), and it sends IPv4 and ARP only from the leased address.
pub fn filter_tap(tap: &str, mac: &str, lease: Option<Ipv4Addr>) -> Result<(), String> {
    let chain = card_chain(tap);
    let mut rules = vec![
        format!("ether saddr != {mac} drop"),
        "ether type { 0x8100, 0x88a8 } drop".to_string(),
        format!("ether type arp arp saddr ether != {mac} drop"),
        "ether type ip udp sport 67 drop".to_string(),
    ];
    if let Some(ip) = lease {
        rules.push("ether type ip udp dport 67 drop".to_string());
        rules.push(format!(
            "ether type arp arp saddr ip != {{ 0.0.0.0, {ip} }} drop"
        ));
        rules.push(format!("ether type ip ip saddr != {ip} drop"));
    }
    let mut script = String::from(
        "add table bridge enspeed\n\
         add map bridge enspeed taps { type ifname : verdict ; }\n\
         add chain bridge enspeed prerouting { type filter hook prerouting priority -200 ; policy accept ; }\n\
         flush chain bridge enspeed prerouting\n\
         add rule bridge enspeed prerouting iifname vmap @taps\n",
    );
    script.push_str(&format!(
        "add chain bridge enspeed {chain}\nflush chain bridge enspeed {chain}\n"
    ));
    for r in rules {
        script.push_str(&format!("add rule bridge enspeed {chain} {r}\n"));
    }
    script.push_str(&format!(
        "add element bridge enspeed taps {{ \"{tap}\" : jump {chain} }}\n"
    ));
    nft(&script).map_err(|e| format!("tap {tap}'s filter: {e}"))
}

/// Removes the bridge filter of the card on `tap`, if there is one.
pub fn unfilter_tap(tap: &str) {
    let chain = card_chain(tap);
    // Each on its own: the element may be gone, or the chain never made.
    let _ = nft(&format!(
        "delete element bridge enspeed taps {{ \"{tap}\" }}\n"
    ));
    let _ = nft(&format!("delete chain bridge enspeed {chain}\n"));
}

/// One network card of a VM running here: its tap in its network's bridge, filtered, with
/// the DHCP service and address watch on it. Dropping it (once its VMM has ended) removes
/// them all.
pub struct Card {
    tap: String,
    mac: String,
    service: Option<CardService>,
}

impl Card {
    /// Plugs card `index` (`nic`) of VM `vmid` into network `net` here: its bridge made, its
    /// tap in it, filtered, and served.
    pub fn plug(
        server: u64,
        vmid: u64,
        index: usize,
        nic: &Nic,
        net: &NetworkRecord,
    ) -> Result<Card, String> {
        ensure_bridge(net)?;
        let tap = tap_name(server, vmid, index);
        let mac = crate::vmnet::parse_mac(&nic.mac)
            .ok_or_else(|| format!("card {index}: its MAC {:?} is not one", nic.mac))?;
        plug_tap(&tap, &net.bridge)?;
        // From here on, dropping the card undoes what was done.
        let mut card = Card {
            tap: tap.clone(),
            mac: nic.mac.clone(),
            service: None,
        };
        let lease = match (nic.ip, net.subnet(), net.router()) {
            (Some(ip), Some(subnet), Some(router)) => Some(Lease {
                mac,
                ip,
                mask: subnet.mask(),
                broadcast: subnet.broadcast(),
                router,
                dns: net.dns.clone(),
            }),
            _ => None,
        };
        filter_tap(&tap, &nic.mac, lease.as_ref().map(|l| l.ip))?;
        card.service = Some(
            CardService::start(&tap, mac, lease).map_err(|e| format!("its DHCP service: {e}"))?,
        );
        Ok(card)
    }

    /// Its tap.
    pub fn tap(&self) -> &str {
        &self.tap
    }

    /// Its MAC.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// The addresses its guest was seen to use, newest last.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        self.service
            .as_ref()
            .map(CardService::addresses)
            .unwrap_or_default()
    }
}

impl Drop for Card {
    fn drop(&mut self) {
        self.service = None;
        unplug_tap(&self.tap);
        // A tap another VMM holds (another server's, on one machine that runs several) keeps
        // the filter that server gave it.
        if !exists(&self.tap) {
            unfilter_tap(&self.tap);
        }
    }
}

impl std::fmt::Debug for Card {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "card {} ({})", self.tap, self.mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_an_interface_name() {
        assert_eq!(tap_name(2, 26, 3), "e1an3s2");
        assert!(tap_name(255, u64::from(u32::MAX), 3).len() <= 15);
    }
}
