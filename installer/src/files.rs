//! The files an install writes into the new system, made from the answers alone (no I/O here,
//! so each is tested for what it says).

use std::fmt::Write as _;

use crate::answers::{Addressing, Answers, ClusterChoice};

/// The name the management card gets on every server (a udev rule by MAC renames it).
pub const MGMT_IF: &str = "mgmt0";
/// The name the card for VM traffic gets on every server: networks name it as their host
/// interface, the same on every VM server.
pub const VM_IF: &str = "vmnet0";
/// The port other servers and the CLI reach this server's control plane on.
pub const CLUSTER_PORT: u16 = 7400;
/// The file with the server's settings, which `enspeed.service` reads.
pub const SERVER_ENV: &str = "etc/enspeed/server.env";
/// Where the Manager's first password waits for the server's first start.
pub const PASSWORD_FILE: &str = "var/lib/enspeed/manager-password";

/// Filesystem labels of the installed disk's partitions.
pub mod label {
    /// The system (read-only at run time).
    pub const ROOT: &str = "enspeed-root";
    /// /var: logs, the server's state and the storage pool for VM disks.
    pub const VAR: &str = "enspeed-var";
    /// The EFI system partition.
    pub const ESP: &str = "ENSPEED-ESP";
}

/// /etc/fstab: the root read-only, /var and the EFI partition by label, /tmp in memory.
pub fn fstab() -> String {
    format!(
        "# The system is read-only at run time; what changes lives in /var (written by the\n\
         # EnSpeed installer).\n\
         LABEL={root} / ext4 ro,errors=remount-ro 0 1\n\
         LABEL={var} /var ext4 defaults,nodev,nosuid 0 2\n\
         LABEL={esp} /boot/efi vfat umask=0077,noauto,x-systemd.automount 0 2\n\
         tmpfs /tmp tmpfs nodev,nosuid,mode=1777 0 0\n",
        root = label::ROOT,
        var = label::VAR,
        esp = label::ESP,
    )
}

/// systemd-networkd's files (name, contents): the management card renamed `mgmt0` (by MAC),
/// the VM card `vmnet0` when it is another card, the management address (and its VLAN).
pub fn networkd(a: &Answers, mgmt_mac: &str, vm_mac: Option<&str>) -> Vec<(String, String)> {
    let mut files = vec![(
        "10-enspeed-mgmt.link".to_string(),
        format!("[Match]\nMACAddress={mgmt_mac}\nType=ether\n\n[Link]\nName={MGMT_IF}\n"),
    )];
    if let Some(vm) = vm_mac.filter(|m| *m != mgmt_mac) {
        files.push((
            "10-enspeed-vm.link".into(),
            format!("[Match]\nMACAddress={vm}\nType=ether\n\n[Link]\nName={VM_IF}\n"),
        ));
        // Up, with no address: VM bridges are built over it.
        files.push((
            "20-enspeed-vm.network".into(),
            format!("[Match]\nName={VM_IF}\n\n[Link]\nRequiredForOnline=no\n\n[Network]\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"),
        ));
    }
    let address_section = |s: &mut String| match &a.network.addressing {
        Addressing::Dhcp => s.push_str("DHCP=ipv4\n"),
        Addressing::Static {
            address,
            prefix,
            gateway,
        } => {
            let _ = writeln!(s, "Address={address}/{prefix}");
            if let Some(g) = gateway {
                let _ = writeln!(s, "Gateway={g}");
            }
        }
    };
    let mut mgmt = format!("[Match]\nName={MGMT_IF}\n\n[Network]\nLinkLocalAddressing=no\n");
    match a.network.vlan {
        None => address_section(&mut mgmt),
        Some(tag) => {
            let vlan_if = management_interface(a);
            let _ = writeln!(mgmt, "VLAN={vlan_if}");
            files.push((
                "20-enspeed-mgmt-vlan.netdev".into(),
                format!("[NetDev]\nName={vlan_if}\nKind=vlan\n\n[VLAN]\nId={tag}\n"),
            ));
            let mut v = format!("[Match]\nName={vlan_if}\n\n[Network]\nLinkLocalAddressing=no\n");
            address_section(&mut v);
            files.push(("30-enspeed-mgmt-vlan.network".into(), v));
        }
    }
    files.push(("30-enspeed-mgmt.network".into(), mgmt));
    files
}

/// The interface that carries the management address: `mgmt0`, or its VLAN interface.
pub fn management_interface(a: &Answers) -> String {
    match a.network.vlan {
        None => MGMT_IF.into(),
        Some(tag) => format!("{MGMT_IF}.{tag}"),
    }
}

/// The server's settings (`/etc/enspeed/server.env`), read by `enspeed.service`'s start script.
/// The join token is a secret: the file is written mode 0600.
pub fn server_env(a: &Answers, id: u64) -> String {
    let mut s = String::from("# This server's EnSpeed settings, written by the installer.\n");
    let _ = writeln!(s, "ENSPEED_ID={id}");
    let _ = writeln!(s, "ENSPEED_MGMT_IF={}", management_interface(a));
    let _ = writeln!(s, "ENSPEED_CLUSTER_PORT={CLUSTER_PORT}");
    match &a.cluster {
        ClusterChoice::Create { .. } => s.push_str("ENSPEED_BOOT=init\n"),
        ClusterChoice::Await => s.push_str("ENSPEED_BOOT=await\n"),
        ClusterChoice::Join { address, token } => {
            s.push_str("ENSPEED_BOOT=join\n");
            let _ = writeln!(s, "ENSPEED_JOIN={address}");
            let _ = writeln!(s, "ENSPEED_CLUSTER_TOKEN={token}");
        }
    }
    s
}

/// /etc/hosts for `hostname`.
pub fn hosts(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
}

/// GRUB's settings on the installed disk: both consoles, a short menu, the root read-only.
pub fn grub_defaults() -> String {
    "GRUB_DEFAULT=0\nGRUB_TIMEOUT=2\nGRUB_DISTRIBUTOR=EnSpeed\n\
     GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n\
     GRUB_CMDLINE_LINUX=\"console=tty0 console=ttyS0,115200\"\n\
     GRUB_TERMINAL=\"console serial\"\n\
     GRUB_SERIAL_COMMAND=\"serial --unit=0 --speed=115200\"\n\
     GRUB_DISABLE_OS_PROBER=true\n"
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answers::parse;

    fn answers(extra_network: &str, cluster: &str) -> Answers {
        parse(&format!(
            "disk = \"/dev/vda\"\nhostname = \"s1\"\n[network]\n{extra_network}\n[cluster]\n{cluster}\n"
        ))
        .unwrap()
    }

    #[test]
    fn a_dhcp_server_on_one_card_creating_a_cluster() {
        let a = answers("", "create = true\nmanager_password = \"12345678\"");
        let files = networkd(&a, "52:54:00:00:00:01", Some("52:54:00:00:00:01"));
        let names: Vec<_> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(names, ["10-enspeed-mgmt.link", "30-enspeed-mgmt.network"]);
        assert!(
            files[0].1.contains("MACAddress=52:54:00:00:00:01")
                && files[0].1.contains("Name=mgmt0")
        );
        assert!(files[1].1.contains("DHCP=ipv4"));
        let env = server_env(&a, 42);
        assert!(env.contains("ENSPEED_ID=42\n") && env.contains("ENSPEED_BOOT=init\n"));
        assert!(env.contains("ENSPEED_MGMT_IF=mgmt0\n"));
        assert!(
            !env.contains("12345678"),
            "the password goes to its own file"
        );
    }

    #[test]
    fn a_static_server_on_a_vlan_with_a_vm_card_joining() {
        let a = answers(
            "address = \"10.0.0.12/24\"\ngateway = \"10.0.0.1\"\nvlan = 30",
            "join = \"10.0.0.11:7400\"\ntoken = \"tok\"",
        );
        let files = networkd(&a, "52:54:00:00:00:01", Some("52:54:00:00:00:02"));
        let get = |n: &str| &files.iter().find(|f| f.0 == n).unwrap().1;
        assert!(get("10-enspeed-vm.link").contains("Name=vmnet0"));
        assert!(get("30-enspeed-mgmt.network").contains("VLAN=mgmt0.30"));
        assert!(!get("30-enspeed-mgmt.network").contains("Address="));
        assert!(get("20-enspeed-mgmt-vlan.netdev").contains("Id=30"));
        let v = get("30-enspeed-mgmt-vlan.network");
        assert!(v.contains("Address=10.0.0.12/24") && v.contains("Gateway=10.0.0.1"));
        let env = server_env(&a, 7);
        assert!(env.contains(
            "ENSPEED_BOOT=join\nENSPEED_JOIN=10.0.0.11:7400\nENSPEED_CLUSTER_TOKEN=tok\n"
        ));
        assert!(env.contains("ENSPEED_MGMT_IF=mgmt0.30\n"));
    }

    #[test]
    fn the_root_is_read_only_and_var_writable() {
        let f = fstab();
        assert!(f.contains("LABEL=enspeed-root / ext4 ro,"));
        assert!(f.contains("LABEL=enspeed-var /var ext4 defaults"));
        assert!(grub_defaults().contains("console=ttyS0"));
    }
}
