//! Networks: defined by Managers (a bridge of the same name on every VM server, over the same
//! uplink NIC, optionally on a VLAN), shared by every tenant or given to one company; and the
//! VMs' network cards on them, with the MACs the cluster hands out.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use serde_json::{json, Value};

use super::keys::{json_bytes, network_key};
use super::rights::Actor;
use super::{
    Acted, Action, NetworkRecord, RecordWrite, Refusal, StateMachine, VmRecord, MAX_VM_NICS,
};
use crate::access;

/// The first three bytes of every MAC the cluster hands out: locally administered (0x02),
/// unicast, then "ES".
pub const MAC_PREFIX: [u8; 3] = [0x02, 0x45, 0x53];

/// Whether `name` can be a Linux interface name: 1-15 bytes of letters, digits, `-`, `_`, `.`.
fn interface_name(what: &str, name: &str) -> Result<(), Refusal> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Refusal::conflict(format!(
            "{what} {name:?}: an interface name is 1 to 15 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// An IPv4 subnet, `A.B.C.D/N` with N from 8 to 30 and no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    /// Its network address.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub len: u32,
}

impl Subnet {
    /// Parses and checks `s`.
    pub fn parse(s: &str) -> Result<Subnet, Refusal> {
        let bad = |why: &str| Refusal::conflict(format!("subnet {s:?}: {why}"));
        let (addr, len) = s.split_once('/').ok_or_else(|| bad("not A.B.C.D/N"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let len: u32 = len
            .parse()
            .map_err(|_| bad("its prefix length is not a number"))?;
        if !(8..=30).contains(&len) {
            return Err(bad("its prefix length is not 8 to 30"));
        }
        if u32::from(addr) & (u32::MAX >> len) != 0 {
            return Err(bad("host bits are set"));
        }
        Ok(Subnet { addr, len })
    }

    /// Its netmask.
    pub fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.len))
    }

    /// Its broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | (u32::MAX >> self.len))
    }

    /// Whether `ip` is one of its host addresses (neither the network nor the broadcast
    /// address).
    pub fn holds(&self, ip: Ipv4Addr) -> bool {
        let (n, ip) = (u32::from(self.addr), u32::from(ip));
        ip & !(u32::MAX >> self.len) == n && ip != n && ip != u32::from(self.broadcast())
    }

    /// Its first host address (the router's, unless the network names another).
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + 1)
    }
}

impl NetworkRecord {
    /// Its subnet, if it has one (checked when the network was created).
    pub fn subnet(&self) -> Option<Subnet> {
        self.subnet.as_deref().and_then(|s| Subnet::parse(s).ok())
    }

    /// The router its DHCP service names: the one given, or the subnet's first address.
    pub fn router(&self) -> Option<Ipv4Addr> {
        self.gateway.or_else(|| self.subnet().map(|s| s.first()))
    }
}

impl StateMachine {
    /// The next MAC address: unique in the cluster, never handed out again.
    pub(super) fn next_mac(&mut self) -> String {
        self.counters.mac += 1;
        let n = self.counters.mac & 0xff_ffff;
        let [a, b, c] = MAC_PREFIX;
        format!(
            "{a:02x}:{b:02x}:{c:02x}:{:02x}:{:02x}:{:02x}",
            n >> 16,
            (n >> 8) & 0xff,
            n & 0xff
        )
    }

    /// Gives each of `vm`'s network cards on a network with a subnet the lowest address of it
    /// that no other card there holds (nor the router, the network or broadcast address).
    pub(super) fn lease_addresses(&self, vm: &mut VmRecord) -> Result<(), Refusal> {
        for i in 0..vm.nics.len() {
            let name = vm.nics[i].network.clone();
            let Some(net) = self.networks.get(&name) else {
                continue;
            };
            let Some(subnet) = net.subnet() else {
                vm.nics[i].ip = None;
                continue;
            };
            let mut taken: BTreeSet<Ipv4Addr> = self
                .vms
                .values()
                .flat_map(|v| v.nics.iter())
                .chain(vm.nics[..i].iter())
                .filter(|n| n.network == name)
                .filter_map(|n| n.ip)
                .collect();
            taken.extend(net.router());
            let free = (u32::from(subnet.addr) + 1..u32::from(subnet.broadcast()))
                .map(Ipv4Addr::from)
                .find(|ip| !taken.contains(ip))
                .ok_or_else(|| {
                    Refusal::conflict(format!(
                        "network {name}: every address of subnet {}/{} is taken",
                        subnet.addr, subnet.len
                    ))
                })?;
            vm.nics[i].ip = Some(free);
        }
        Ok(())
    }

    /// Whether `vm`'s network cards fit: at most `MAX_VM_NICS`, each on a network that exists
    /// and that the VM's owner's company may use.
    pub(super) fn check_nics(&self, vm: &VmRecord) -> Result<(), Refusal> {
        if vm.nics.len() > MAX_VM_NICS {
            return Err(Refusal::conflict(format!(
                "VM {}: {} network cards asked, at most {MAX_VM_NICS}",
                vm.name,
                vm.nics.len()
            )));
        }
        let company = vm
            .owner
            .and_then(|o| self.users.get(&o))
            .and_then(access::company);
        for nic in &vm.nics {
            let net = self
                .networks
                .get(&nic.network)
                .ok_or_else(|| Refusal::not_found(format!("no network {}", nic.network)))?;
            if net.company.is_some() && net.company != company {
                // Another company's network: said as if it did not exist.
                return Err(Refusal::not_found(format!("no network {}", nic.network)));
            }
        }
        Ok(())
    }

    /// Applies an action on the networks for `by` (`act` routes them here).
    pub(super) fn act_on_network(
        &mut self,
        by: &Actor,
        action: &Action,
        writes: &mut Vec<RecordWrite>,
    ) -> Result<Acted<'static>, Refusal> {
        if !by.is_manager() {
            return Err(access::refuse("only a Manager changes the networks"));
        }
        let (verb, target, result) = match action {
            Action::CreateNetwork { network: n } => {
                access::check_name("network", &n.name)?;
                if self.networks.contains_key(&n.name) {
                    return Err(Refusal::conflict(format!(
                        "network {} exists: delete it first",
                        n.name
                    )));
                }
                interface_name("bridge", &n.bridge)?;
                if let Some(u) = &n.uplink {
                    interface_name("uplink", u)?;
                }
                if let Some(v) = n.vlan {
                    if !(1..=4094).contains(&v) {
                        return Err(Refusal::conflict(format!("VLAN {v}: 1 to 4094")));
                    }
                }
                let subnet = n.subnet.as_deref().map(Subnet::parse).transpose()?;
                if subnet.is_none() && (n.gateway.is_some() || !n.dns.is_empty()) {
                    return Err(Refusal::conflict(format!(
                        "network {}: a gateway and DNS servers are for its DHCP service, which needs a subnet",
                        n.name
                    )));
                }
                if let (Some(s), Some(g)) = (subnet, n.gateway) {
                    if !s.holds(g) {
                        return Err(Refusal::conflict(format!(
                            "gateway {g} is not a host address of subnet {}/{}",
                            s.addr, s.len
                        )));
                    }
                }
                if n.dns.len() > 4 {
                    return Err(Refusal::conflict("at most 4 DNS servers".to_string()));
                }
                if let Some(c) = n.company {
                    if self.users.get(&c).and_then(access::company) != Some(c) {
                        return Err(Refusal::not_found(format!("no Power User {c}")));
                    }
                }
                // One bridge is one network: two networks on it would see each other's
                // frames.
                if let Some(o) = self.networks.values().find(|o| o.bridge == n.bridge) {
                    return Err(Refusal::conflict(format!(
                        "bridge {} is network {}'s",
                        n.bridge, o.name
                    )));
                }
                writes.push((network_key(&n.name), Some(json_bytes(n))));
                self.networks.insert(n.name.clone(), n.clone());
                let target = format!("network {}", n.name);
                ("network.create", target, json!({ "name": n.name }))
            }
            Action::DeleteNetwork { name } => {
                if !self.networks.contains_key(name) {
                    return Err(Refusal::not_found(format!("no network {name}")));
                }
                if let Some(vm) = self
                    .vms
                    .values()
                    .find(|vm| vm.nics.iter().any(|n| &n.network == name))
                {
                    return Err(Refusal::conflict(format!(
                        "network {name} has VM {} ({}) on it: remove its network card first",
                        vm.id, vm.name
                    )));
                }
                self.networks.remove(name);
                writes.push((network_key(name), None));
                ("network.delete", format!("network {name}"), Value::Null)
            }
            _ => unreachable!("act routes only network actions here"),
        };
        Ok(Acted::Changed {
            verb,
            target,
            result,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{act, new_user, new_vm};
    use super::super::{Action, NetworkRecord, RefusalKind, StateMachine};
    use super::*;
    use crate::access::Role;

    fn net(name: &str, bridge: &str, company: Option<u64>) -> Action {
        Action::CreateNetwork {
            network: NetworkRecord {
                name: name.into(),
                bridge: bridge.into(),
                uplink: Some("eth1".into()),
                vlan: Some(10),
                subnet: Some("10.20.0.0/24".into()),
                gateway: None,
                dns: Vec::new(),
                company,
            },
        }
    }

    fn id(v: Result<Value, Refusal>) -> u64 {
        v.unwrap()["id"].as_u64().unwrap()
    }

    #[test]
    fn networks_are_the_managers_and_a_company_s_network_is_its_own() {
        let mut sm = StateMachine::default();
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        let quota = Some(crate::access::Quota {
            vms: 5,
            memory_mib: 1024,
            disk_gib: 10,
        });
        let p = id(act(&mut sm, 0, new_user("p", Role::PowerUser, None, quota)));
        let q = id(act(&mut sm, 0, new_user("q", Role::PowerUser, None, quota)));
        assert_eq!(
            act(&mut sm, p, net("lan", "br-lan", None))
                .unwrap_err()
                .kind,
            RefusalKind::Forbidden
        );
        act(&mut sm, m, net("lan", "br-lan", None)).unwrap();
        act(&mut sm, m, net("p-net", "br-p", Some(p))).unwrap();
        let refused = |sm: &mut StateMachine, a: Action| act(sm, m, a).unwrap_err().reason;
        assert!(refused(&mut sm, net("lan", "br-x", None)).contains("exists"));
        assert!(refused(&mut sm, net("lan2", "br-lan", None)).contains("network lan's"));
        assert!(refused(&mut sm, net("x", "br with space", None)).contains("interface name"));
        assert!(refused(&mut sm, net("x", "averyveryverylongbridge", None)).contains("interface"));
        assert!(refused(&mut sm, net("x", "br-x", Some(m))).contains("no Power User"));
        let mut bad = NetworkRecord {
            name: "x".into(),
            bridge: "br-x".into(),
            uplink: None,
            vlan: Some(4095),
            subnet: None,
            gateway: None,
            dns: Vec::new(),
            company: None,
        };
        let create = |n: &NetworkRecord| Action::CreateNetwork { network: n.clone() };
        assert!(refused(&mut sm, create(&bad)).contains("VLAN 4095"));
        bad.vlan = None;
        for (s, says) in [
            ("10.20.0.1/24", "host bits"),
            ("10.20.0.0", "A.B.C.D/N"),
            ("10.20.0.0/31", "8 to 30"),
            ("fe80::/64", "IPv4"),
        ] {
            bad.subnet = Some(s.into());
            assert!(refused(&mut sm, create(&bad)).contains(says), "{s}");
        }
        bad.subnet = None;
        bad.gateway = Some(Ipv4Addr::new(10, 20, 0, 1));
        assert!(refused(&mut sm, create(&bad)).contains("needs a subnet"));
        bad.subnet = Some("10.30.0.0/24".into());
        assert!(refused(&mut sm, create(&bad)).contains("not a host address"));
        bad.gateway = Some(Ipv4Addr::new(10, 30, 0, 255));
        assert!(refused(&mut sm, create(&bad)).contains("not a host address"));
        // VMs get MACs of their own, unique, on networks their company may use.
        let vm = new_vm;
        let mut sm2 = sm.clone();
        let q_on_p = act(
            &mut sm2,
            m,
            Action::CreateVm {
                owner: q,
                vm: vm("a", &["p-net"]),
            },
        );
        assert_eq!(
            q_on_p.unwrap_err().reason,
            "no network p-net",
            "another company's network"
        );
        let too_many = act(
            &mut sm2,
            m,
            Action::CreateVm {
                owner: p,
                vm: vm("a", &["lan"; 5]),
            },
        );
        assert!(too_many.unwrap_err().reason.contains("at most 4"));
        // (Placing VMs needs servers: what is checked before placement is all this covers.)
        assert!(sm.networks.contains_key("p-net"));
        assert_eq!(sm.next_mac(), "02:45:53:00:00:01");
        assert_eq!(sm.next_mac(), "02:45:53:00:00:02");
        // A network with a VM on it is not deleted.
        sm.vms.insert(
            "v".into(),
            VmRecord {
                moving: None,
                backup_schedule: None,
                last_backup_ms: 0,
                nics: vec![super::super::Nic {
                    network: "lan".into(),
                    mac: "02:45:53:00:00:01".into(),
                    ip: None,
                }],
                ..sm2
                    .vms
                    .get("none")
                    .cloned()
                    .unwrap_or_else(|| vm("v", &[]).record(None))
            },
        );
        let del = |n: &str| Action::DeleteNetwork { name: n.into() };
        assert!(refused(&mut sm, del("lan")).contains("has VM"));
        act(&mut sm, m, del("p-net")).unwrap();
        assert_eq!(
            act(&mut sm, m, del("p-net")).unwrap_err().kind,
            RefusalKind::NotFound
        );
    }

    #[test]
    fn each_card_on_a_subnet_is_leased_the_lowest_free_address() {
        let mut sm = StateMachine::default();
        let m = id(act(&mut sm, 0, new_user("m", Role::Manager, None, None)));
        let mut small = NetworkRecord {
            name: "small".into(),
            bridge: "br-s".into(),
            uplink: None,
            vlan: None,
            subnet: Some("10.9.0.0/30".into()),
            gateway: None,
            dns: Vec::new(),
            company: None,
        };
        act(
            &mut sm,
            m,
            Action::CreateNetwork {
                network: small.clone(),
            },
        )
        .unwrap();
        small.name = "wide".into();
        small.bridge = "br-w".into();
        small.subnet = Some("10.8.0.0/24".into());
        small.gateway = Some(Ipv4Addr::new(10, 8, 0, 2));
        act(&mut sm, m, Action::CreateNetwork { network: small }).unwrap();
        let vm = |networks: &[&str]| new_vm("a", networks).record(None);
        let mut first = vm(&["wide", "wide", "small"]);
        sm.lease_addresses(&mut first).unwrap();
        let ips: Vec<_> = first
            .nics
            .iter()
            .map(|n| n.ip.unwrap().to_string())
            .collect();
        // The router (.2 given; .1 by default on "small") is never leased.
        assert_eq!(ips, ["10.8.0.1", "10.8.0.3", "10.9.0.2"]);
        sm.vms.insert("a".into(), first);
        // A /30 has two host addresses: the router's and the one leased.
        let mut next = vm(&["wide", "small"]);
        let refused = sm.lease_addresses(&mut next).unwrap_err();
        assert!(
            refused
                .reason
                .contains("every address of subnet 10.9.0.0/30"),
            "{}",
            refused.reason
        );
        next.nics.pop();
        sm.lease_addresses(&mut next).unwrap();
        assert_eq!(next.nics[0].ip, Some(Ipv4Addr::new(10, 8, 0, 4)));
    }

    #[test]
    fn a_subnet_knows_its_hosts() {
        let s = Subnet::parse("192.168.4.0/22").unwrap();
        assert_eq!(s.mask(), Ipv4Addr::new(255, 255, 252, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(192, 168, 7, 255));
        assert!(s.holds(Ipv4Addr::new(192, 168, 5, 0)));
        assert!(!s.holds(Ipv4Addr::new(192, 168, 4, 0)));
        assert!(!s.holds(Ipv4Addr::new(192, 168, 7, 255)));
        assert!(!s.holds(Ipv4Addr::new(192, 168, 8, 1)));
    }
}
