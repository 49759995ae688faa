//! What the machine has: its disks (from `lsblk`) and network cards (from sysfs).

use std::path::Path;
use std::process::Command;

use serde::Deserialize;

/// A disk the installer could use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `/dev/vda`.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// The maker's model string, if any.
    pub model: String,
    /// Filesystems, partition tables or other signatures on it or its partitions.
    pub signatures: Vec<String>,
    /// It holds the installer's own medium (never a target).
    pub is_install_medium: bool,
}

impl Disk {
    /// `vda, 20.0 GiB, QEMU HARDDISK`.
    pub fn describe(&self) -> String {
        let gib = self.size as f64 / (1u64 << 30) as f64;
        let mut s = format!("{}, {gib:.1} GiB", self.path);
        if !self.model.is_empty() {
            s.push_str(", ");
            s.push_str(&self.model);
        }
        if self.is_install_medium {
            s.push_str(" (the installer's medium)");
        } else if !self.signatures.is_empty() {
            s.push_str(&format!(" (holds {})", self.signatures.join(", ")));
        }
        s
    }
}

#[derive(Deserialize)]
struct Lsblk {
    blockdevices: Vec<Dev>,
}

#[derive(Deserialize)]
struct Dev {
    path: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    fstype: Option<String>,
    #[serde(default)]
    pttype: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    mountpoints: Vec<Option<String>>,
    #[serde(default)]
    children: Vec<Dev>,
}

/// An error probing the machine.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// A tool could not run or failed.
    #[error("{tool}: {why}")]
    Tool {
        /// The command.
        tool: &'static str,
        /// What it said.
        why: String,
    },
}

/// The machine's disks, from `lsblk --json`.
pub fn disks() -> Result<Vec<Disk>, ProbeError> {
    let out = Command::new("lsblk")
        .args([
            "--json",
            "--bytes",
            "--output",
            "PATH,SIZE,TYPE,FSTYPE,PTTYPE,MODEL,LABEL,MOUNTPOINTS",
        ])
        .output()
        .map_err(|e| ProbeError::Tool {
            tool: "lsblk",
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ProbeError::Tool {
            tool: "lsblk",
            why: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    parse_lsblk(&String::from_utf8_lossy(&out.stdout))
}

/// Reads `lsblk --json` output: whole disks only, with what is on them.
pub fn parse_lsblk(json: &str) -> Result<Vec<Disk>, ProbeError> {
    let l: Lsblk = serde_json::from_str(json).map_err(|e| ProbeError::Tool {
        tool: "lsblk",
        why: format!("unexpected output: {e}"),
    })?;
    let mut disks = Vec::new();
    // Disks that can hold anything: not a CD drive, a floppy drive (a PC's /dev/fd0 is "disk"
    // to lsblk) or an empty card reader.
    let real =
        |d: &Dev| d.kind == "disk" && d.size.unwrap_or(0) > 0 && !d.path.starts_with("/dev/fd");
    for d in l.blockdevices.into_iter().filter(|d| real(d)) {
        let mut signatures = Vec::new();
        let mut medium = false;
        fn walk(d: &Dev, sig: &mut Vec<String>, medium: &mut bool) {
            if let Some(t) = &d.pttype {
                sig.push(format!("a {t} partition table"));
            }
            if let Some(f) = &d.fstype {
                sig.push(format!("{f} on {}", d.path));
            }
            if d.label.as_deref() == Some(crate::answers::ANSWER_LABEL) {
                // The answer file's own disk is no target either.
                *medium = true;
            }
            if d.mountpoints
                .iter()
                .flatten()
                .any(|m| m.starts_with("/run/live/medium") || m == "/")
            {
                *medium = true;
            }
            for c in &d.children {
                walk(c, sig, medium);
            }
        }
        walk(&d, &mut signatures, &mut medium);
        if d.fstype.as_deref() == Some("iso9660") {
            medium = true;
        }
        disks.push(Disk {
            path: d.path,
            size: d.size.unwrap_or(0),
            model: d.model.unwrap_or_default().trim().to_string(),
            signatures,
            is_install_medium: medium,
        });
    }
    Ok(disks)
}

/// A network card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The kernel's name for it.
    pub name: String,
    /// Its MAC address, lower case.
    pub mac: String,
    /// A cable is in and the other end is up.
    pub link: bool,
}

/// The machine's physical network cards (those with a device behind them), by name, after
/// bringing each up and giving links `settle` to come.
pub fn nics(settle: std::time::Duration) -> Vec<Nic> {
    let base = Path::new("/sys/class/net");
    let mut names: Vec<String> = std::fs::read_dir(base)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("device").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    for n in &names {
        let _ = Command::new("ip").args(["link", "set", n, "up"]).status();
    }
    if !names.is_empty() {
        std::thread::sleep(settle);
    }
    names
        .into_iter()
        .map(|name| {
            let read = |f: &str| {
                std::fs::read_to_string(base.join(&name).join(f))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default()
            };
            Nic {
                mac: read("address").to_ascii_lowercase(),
                link: read("carrier") == "1",
                name,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_told_with_what_is_on_them_and_the_medium_is_marked() {
        let json = r#"{"blockdevices": [
          {"path":"/dev/sr0","size":300000000,"type":"rom","fstype":"iso9660","pttype":null,"model":"QEMU DVD-ROM","label":"ENSPEED_INSTALL","mountpoints":["/run/live/medium"]},
          {"path":"/dev/fd0","size":4096,"type":"disk","fstype":null,"pttype":null,"model":null,"label":null,"mountpoints":[null]},
          {"path":"/dev/sdc","size":0,"type":"disk","fstype":null,"pttype":null,"model":"Card reader","label":null,"mountpoints":[null]},
          {"path":"/dev/vda","size":21474836480,"type":"disk","fstype":null,"pttype":null,"model":null,"label":null,"mountpoints":[null]},
          {"path":"/dev/vdb","size":10485760,"type":"disk","fstype":"vfat","pttype":null,"model":null,"label":"ENSPEED","mountpoints":[null]},
          {"path":"/dev/sda","size":1000204886016,"type":"disk","fstype":null,"pttype":"gpt","model":"  Samsung SSD  ","label":null,"mountpoints":[null],
           "children":[{"path":"/dev/sda1","size":1000,"type":"part","fstype":"ext4","pttype":"gpt","model":null,"label":"data","mountpoints":[null]}]},
          {"path":"/dev/sdb","size":16000000000,"type":"disk","fstype":"iso9660","pttype":"dos","model":"USB","label":"ENSPEED_INSTALL","mountpoints":[null],
           "children":[{"path":"/dev/sdb1","size":1000,"type":"part","fstype":"iso9660","pttype":"dos","label":"ENSPEED_INSTALL","mountpoints":["/run/live/medium"]}]}
        ]}"#;
        let d = parse_lsblk(json).unwrap();
        assert_eq!(
            d.len(),
            4,
            "the CD drive, the floppy drive and the empty reader are no disks"
        );
        assert_eq!(d[0].path, "/dev/vda");
        assert!(d[0].signatures.is_empty() && !d[0].is_install_medium);
        assert!(d[1].is_install_medium, "the answer file's disk");
        assert_eq!(d[2].model, "Samsung SSD");
        assert_eq!(
            d[2].signatures,
            [
                "a gpt partition table",
                "a gpt partition table",
                "ext4 on /dev/sda1"
            ]
        );
        assert!(d[2].describe().contains("holds"));
        assert!(d[3].is_install_medium, "a USB stick the ISO was written to");
        assert!(parse_lsblk("{").is_err());
    }
}
