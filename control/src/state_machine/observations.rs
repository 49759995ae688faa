//! What the servers' node agents report of the VMs and disk copies they run, and how a report
//! is taken in.

use std::collections::BTreeMap;

pub use blockrepl::meta::Role as CopyRole;
pub use blockrepl::replica::LinkState;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::keys::{disk_key, json_bytes, observed_key};
use super::{Outcome, RecordWrite, Refusal, StateMachine};

/// What a server's node agent saw of one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmObservation {
    /// Its VMM process runs here.
    pub running: bool,
    /// The VMM's process id.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The disk generation it booted on.
    #[serde(default)]
    pub generation: u64,
    /// Why it does not run here though it should (its VMM could not start, e.g. its network
    /// is missing on this server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<VmFault>,
    /// The addresses its guest uses, per network card, as its tap shows them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NicAddresses>,
    /// Where its live migration from here stands, as its VMM says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<vmm_api::MigrationProgress>,
}

/// Why a VM does not run on the server that should run it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFault {
    /// What failed.
    pub part: VmPart,
    /// What the server said of it (shown to Managers).
    pub detail: String,
}

/// The part of a VM that failed to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmPart {
    /// A network card: its bridge, tap, filter or DHCP service.
    Network,
    /// Its VMM process.
    Vmm,
}

impl std::fmt::Display for VmFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let part = match self.part {
            VmPart::Network => "its network",
            VmPart::Vmm => "its VMM",
        };
        write!(f, "{part}: {}", self.detail)
    }
}

/// The IPv4 addresses a VM's network card is seen to use: the one the DHCP service leased it
/// once the guest took it, or, on a network without DHCP, those its ARP traffic claims
/// (newest last, at most `MAX_SEEN_ADDRESSES`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAddresses {
    /// The card's MAC.
    pub mac: String,
    /// Its addresses.
    pub ips: Vec<std::net::Ipv4Addr>,
}

/// Addresses reported per network card at most.
pub const MAX_SEEN_ADDRESSES: usize = 4;

/// What a server's node agent saw of one disk copy (from its blockd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskObservation {
    /// The copy's role.
    pub role: CopyRole,
    /// The copy's generation.
    pub generation: u64,
    /// Its mirror link.
    pub link: LinkState,
    /// The backup it mirrors to (primary side).
    #[serde(default)]
    pub peer: Option<String>,
    /// Bytes marked out of sync.
    #[serde(default)]
    pub out_of_sync_bytes: u64,
    /// While a resync runs: how much of it is done, whole percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_percent: Option<u8>,
}

/// A server's report of what runs there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// VMs whose VMM runs (or ran) here, by name.
    #[serde(default)]
    pub vms: BTreeMap<String, VmObservation>,
    /// Disk copies in its blockd, by name.
    #[serde(default)]
    pub disks: BTreeMap<String, DiskObservation>,
    /// Its blockd answers.
    #[serde(default)]
    pub blockd_up: bool,
}

impl StateMachine {
    /// Server `id`'s node agent reports what runs there (`Command::Observe`). A primary's
    /// report of its link says whether its backup is in sync: set when the link is in sync with
    /// this backup at this generation, cleared only once a resync starts (a link merely down
    /// keeps the backup's data).
    pub(super) fn observe(
        &mut self,
        id: u64,
        observation: &Observation,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        if !self.servers.contains_key(&id) {
            return Err(Refusal::not_found(format!("no server {id}")));
        }
        let primaries: Vec<String> = (self.disks.values())
            .filter(|d| d.primary == id)
            .map(|d| d.name.clone())
            .collect();
        for name in &primaries {
            let Some(d) = self.disks.get_mut(name) else {
                continue;
            };
            let Some(o) = observation.disks.get(&d.name) else {
                continue;
            };
            if d.image.is_some() && o.role == CopyRole::Primary {
                // Its copy is made, from the appliance's image: the image is no longer needed.
                d.image = None;
                writes.push((disk_key(&d.name), Some(json_bytes(d))));
            }
            let backup_mirror = d
                .backup
                .and_then(|b| self.servers.get(&b))
                .map(|s| s.mirror.as_str());
            let synced = o.generation == d.generation
                && o.link == LinkState::InSync
                && backup_mirror.is_some()
                && o.peer.as_deref() == backup_mirror;
            if synced != d.backup_synced && (synced || o.link == LinkState::Resyncing) {
                d.backup_synced = synced;
                writes.push((disk_key(&d.name), Some(json_bytes(d))));
            }
        }
        writes.push((observed_key(id), Some(json_bytes(observation))));
        self.observed.insert(id, observation.clone());
        Ok(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state_machine::fixtures::server;
    use crate::state_machine::{Command, DiskRecord};

    #[test]
    fn the_primary_reports_its_backup_in_sync() {
        let mut sm = StateMachine::default();
        let mut w = Vec::new();
        for id in 1..=2 {
            let mut s = server(id, false);
            s.mirror = format!("10.0.0.{id}:7400");
            sm.add_server(&s, &mut w);
        }
        sm.disks.insert(
            "a".into(),
            DiskRecord {
                name: "a".into(),
                size: 1,
                primary: 1,
                backup: Some(2),
                generation: 2,
                pools: Default::default(),
                backup_synced: false,
                clone_of: None,
                uid: 0,
                image: None,
            },
        );
        let report = |link: LinkState, generation, peer: &str| Command::Observe {
            id: 1,
            observation: Observation {
                disks: [(
                    "a".to_string(),
                    DiskObservation {
                        role: CopyRole::Primary,
                        generation,
                        link,
                        peer: Some(peer.into()),
                        out_of_sync_bytes: 0,
                        resync_percent: None,
                    },
                )]
                .into(),
                ..Default::default()
            },
        };
        sm.apply(&report(LinkState::InSync, 1, "10.0.0.2:7400"), &mut w)
            .unwrap();
        assert!(!sm.disks["a"].backup_synced, "an older generation");
        sm.apply(&report(LinkState::InSync, 2, "10.0.0.9:7400"), &mut w)
            .unwrap();
        assert!(!sm.disks["a"].backup_synced, "another peer");
        sm.apply(&report(LinkState::InSync, 2, "10.0.0.2:7400"), &mut w)
            .unwrap();
        assert!(sm.disks["a"].backup_synced);
        sm.apply(&report(LinkState::Down, 2, "10.0.0.2:7400"), &mut w)
            .unwrap();
        assert!(
            sm.disks["a"].backup_synced,
            "a link down keeps the backup's data"
        );
        sm.apply(&report(LinkState::Resyncing, 2, "10.0.0.2:7400"), &mut w)
            .unwrap();
        assert!(!sm.disks["a"].backup_synced);
        assert!(sm.observed.contains_key(&1));
    }
}
