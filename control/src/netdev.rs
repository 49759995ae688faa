//! The host side of the VMs' networks, on a VM server: each network's bridge (over its uplink
//! NIC, or that NIC's VLAN device), and each network card's tap, plugged into its network's
//! bridge before the VMM opens it and removed when the VM stops here. Done with iproute2's
//! `ip`, as the system's own network tools do; every failure names the interface and what
//! was asked of it.

use std::process::Command;

use crate::state_machine::NetworkRecord;

/// The tap of VM `vmid`'s card `index` (the same name on every server: at most one of them
/// runs the VM).
pub fn tap_name(vmid: u64, index: usize) -> String {
    format!("es{vmid}n{index}")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_an_interface_name() {
        assert_eq!(tap_name(12, 3), "es12n3");
        assert!(tap_name(u64::from(u32::MAX), 3).len() <= 15);
    }
}
