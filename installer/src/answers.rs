//! What an install needs to know, whether a person answered it on the console or the answer
//! file `enspeed-install.toml` (on a filesystem labelled `ENSPEED`) said it. The file's format
//! is fixed: tests outside the project write it.
//!
//! ```toml
//! disk = "/dev/vda"              # or "largest"
//! hostname = "vmserver1"
//! wipe = false                   # install over a disk that holds a filesystem
//! [network]
//! interface = "auto"             # first NIC with a link, or a name
//! address = "dhcp"               # or "10.0.0.11/24"
//! gateway = ""                   # with a static address
//! vlan = 0                       # the management network's VLAN tag, 0 for none
//! vm_interface = "auto"          # the NIC that carries VM traffic ("auto": the management one)
//! [cluster]
//! create = true                  # a new cluster: this server is its first
//! manager_password = "..."       # with create = true
//! join = ""                      # or "10.0.0.11:7400" with token = "..." (the cluster's
//! token = ""                     #   join token: enspeed servers join-info); neither create
//!                                #   nor join: wait to be added by a Manager
//! [after]
//! poweroff = true                # power off when installed (else reboot)
//! ```

use std::net::{Ipv4Addr, SocketAddr};

use serde::Deserialize;

/// The file the unattended install reads, at the root of a filesystem labelled `ENSPEED`.
pub const ANSWER_FILE: &str = "enspeed-install.toml";
/// That filesystem's label.
pub const ANSWER_LABEL: &str = "ENSPEED";
/// The Manager's password is at least this long.
pub const MIN_PASSWORD: usize = 8;

/// Which disk to install on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskChoice {
    /// A device path, `/dev/...`.
    Path(String),
    /// The largest disk that is not the installer's own medium.
    Largest,
}

/// Which network card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicChoice {
    /// The first card with a link.
    Auto,
    /// A card by its kernel name (`enp1s0`) or MAC address.
    Named(String),
}

/// How the management network is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    /// By DHCP.
    Dhcp,
    /// A fixed address, its prefix length, and the router (if any).
    Static {
        /// The address.
        address: Ipv4Addr,
        /// Its prefix length.
        prefix: u8,
        /// The default router.
        gateway: Option<Ipv4Addr>,
    },
}

/// The management network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// Its card.
    pub interface: NicChoice,
    /// Its addressing.
    pub addressing: Addressing,
    /// Its VLAN tag, if tagged.
    pub vlan: Option<u16>,
    /// The card VM traffic goes out on.
    pub vm_interface: NicChoice,
}

/// Which cluster this server is in.
#[derive(Clone, PartialEq, Eq)]
pub enum ClusterChoice {
    /// A new cluster, this server its first member, with the Manager's password.
    Create {
        /// The password of the Manager `admin`.
        manager_password: String,
    },
    /// Nothing yet: wait for a Manager to add this server (VM Servers, Add server) with the
    /// address and token its console shows (`enspeed server --await-join`).
    Await,
    /// The cluster of the server at `address`, with that cluster's join token.
    Join {
        /// A member's cluster address (host:port).
        address: SocketAddr,
        /// The cluster's join token.
        token: String,
    },
}

impl std::fmt::Debug for ClusterChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of logs.
        match self {
            ClusterChoice::Create { .. } => write!(f, "Create"),
            ClusterChoice::Await => write!(f, "Await"),
            ClusterChoice::Join { address, .. } => write!(f, "Join({address})"),
        }
    }
}

/// What to do once installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Power off.
    Poweroff,
    /// Reboot into the installed system.
    Reboot,
}

/// Everything an install needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answers {
    /// The target disk.
    pub disk: DiskChoice,
    /// Install over a disk that holds a filesystem.
    pub wipe: bool,
    /// The server's host name.
    pub hostname: String,
    /// The management network.
    pub network: Network,
    /// The cluster.
    pub cluster: ClusterChoice,
    /// What then.
    pub after: After,
}

/// An answer that cannot be installed with, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerError {
    /// The file is not TOML of the expected shape.
    #[error("{ANSWER_FILE}: {0}")]
    Syntax(String),
    /// A value is not acceptable.
    #[error("{ANSWER_FILE}: {key}: {why}")]
    Value {
        /// The key, as written in the file (`network.address`).
        key: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

impl AnswerError {
    /// What is wrong, without where: for a person answering on the console, not in a file.
    pub fn why(&self) -> &str {
        match self {
            AnswerError::Syntax(why) | AnswerError::Value { why, .. } => why,
        }
    }
}

fn bad(key: &'static str, why: impl Into<String>) -> AnswerError {
    AnswerError::Value {
        key,
        why: why.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    disk: String,
    hostname: String,
    #[serde(default)]
    wipe: bool,
    #[serde(default)]
    network: FileNetwork,
    cluster: FileCluster,
    #[serde(default)]
    after: FileAfter,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNetwork {
    #[serde(default = "auto")]
    interface: String,
    #[serde(default = "dhcp")]
    address: String,
    #[serde(default)]
    gateway: String,
    #[serde(default)]
    vlan: u16,
    #[serde(default = "auto")]
    vm_interface: String,
}

impl Default for FileNetwork {
    fn default() -> Self {
        FileNetwork {
            interface: auto(),
            address: dhcp(),
            gateway: String::new(),
            vlan: 0,
            vm_interface: auto(),
        }
    }
}

fn auto() -> String {
    "auto".into()
}

fn dhcp() -> String {
    "dhcp".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    #[serde(default)]
    create: bool,
    #[serde(default)]
    manager_password: String,
    #[serde(default)]
    join: String,
    #[serde(default)]
    token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAfter {
    #[serde(default = "yes")]
    poweroff: bool,
}

impl Default for FileAfter {
    fn default() -> Self {
        FileAfter { poweroff: true }
    }
}

fn yes() -> bool {
    true
}

/// Reads an answer file's text.
pub fn parse(text: &str) -> Result<Answers, AnswerError> {
    let f: File = toml::from_str(text).map_err(|e| AnswerError::Syntax(e.message().into()))?;
    let disk = disk_choice(&f.disk)?;
    let hostname = hostname(&f.hostname)?;
    let interface = nic_choice("network.interface", &f.network.interface)?;
    let vm_interface = nic_choice("network.vm_interface", &f.network.vm_interface)?;
    let addressing = addressing(&f.network.address, &f.network.gateway)?;
    let vlan = match f.network.vlan {
        0 => None,
        v @ 1..=4094 => Some(v),
        v => {
            return Err(bad(
                "network.vlan",
                format!("{v} is not a VLAN tag (1-4094, 0 for none)"),
            ))
        }
    };
    let cluster = match (f.cluster.create, f.cluster.join.trim()) {
        (true, "") => ClusterChoice::Create {
            manager_password: password(&f.cluster.manager_password)?,
        },
        (true, _) => return Err(bad("cluster", "create = true and join: choose one")),
        (false, "") => ClusterChoice::Await,
        (false, join) => join_choice(join, &f.cluster.token)?,
    };
    Ok(Answers {
        disk,
        wipe: f.wipe,
        hostname,
        network: Network {
            interface,
            addressing,
            vlan,
            vm_interface,
        },
        cluster,
        after: if f.after.poweroff {
            After::Poweroff
        } else {
            After::Reboot
        },
    })
}

/// A disk answer: a `/dev/` path or `largest`.
pub fn disk_choice(s: &str) -> Result<DiskChoice, AnswerError> {
    let s = s.trim();
    if s == "largest" {
        return Ok(DiskChoice::Largest);
    }
    let name = s.strip_prefix("/dev/").unwrap_or("");
    if name.is_empty()
        || name.contains("..")
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
    {
        return Err(bad(
            "disk",
            format!("{s:?} is neither a /dev/ path nor \"largest\""),
        ));
    }
    Ok(DiskChoice::Path(s.into()))
}

/// A host name: letters, digits and hyphens, 1 to 63 of them, not starting or ending with a
/// hyphen (one DNS label).
pub fn hostname(s: &str) -> Result<String, AnswerError> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(bad(
            "hostname",
            format!("{s:?} is not a host name (letters, digits, hyphens; up to 63)"),
        ))
    }
}

/// A network card answer: `auto`, a kernel interface name or a MAC address.
pub fn nic_choice(key: &'static str, s: &str) -> Result<NicChoice, AnswerError> {
    let s = s.trim();
    if s == "auto" || s.is_empty() {
        return Ok(NicChoice::Auto);
    }
    let name_ok = s.len() < 16
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let mac_ok = s.len() == 17
        && s.split(':').count() == 6
        && s.split(':')
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
    if name_ok || mac_ok {
        Ok(NicChoice::Named(s.to_ascii_lowercase()))
    } else {
        Err(bad(
            key,
            format!("{s:?} is neither \"auto\", an interface name nor a MAC address"),
        ))
    }
}

/// The management address: `dhcp`, or `A.B.C.D/N` with an optional gateway in that subnet.
pub fn addressing(address: &str, gateway: &str) -> Result<Addressing, AnswerError> {
    let address = address.trim();
    let gateway = gateway.trim();
    if address == "dhcp" {
        if !gateway.is_empty() {
            return Err(bad(
                "network.gateway",
                "a gateway is given with a static address only",
            ));
        }
        return Ok(Addressing::Dhcp);
    }
    let (a, p) = address.split_once('/').ok_or_else(|| {
        bad(
            "network.address",
            format!("{address:?} is neither \"dhcp\" nor ADDRESS/PREFIX"),
        )
    })?;
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| bad("network.address", format!("{a:?} is not an IPv4 address")))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (1..=32).contains(p))
        .ok_or_else(|| {
            bad(
                "network.address",
                format!("{p:?} is not a prefix length (1-32)"),
            )
        })?;
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || addr.is_broadcast() {
        return Err(bad(
            "network.address",
            format!("{addr} cannot be a server's address"),
        ));
    }
    let gw = if gateway.is_empty() {
        None
    } else {
        let g: Ipv4Addr = gateway.parse().map_err(|_| {
            bad(
                "network.gateway",
                format!("{gateway:?} is not an IPv4 address"),
            )
        })?;
        let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        if u32::from(g) & mask != u32::from(addr) & mask || g == addr {
            return Err(bad(
                "network.gateway",
                format!("{g} is not another address in {addr}/{prefix}"),
            ));
        }
        Some(g)
    };
    Ok(Addressing::Static {
        address: addr,
        prefix,
        gateway: gw,
    })
}

/// The Manager's password: at least [`MIN_PASSWORD`] characters, one line.
pub fn password(s: &str) -> Result<String, AnswerError> {
    if s.chars().count() < MIN_PASSWORD {
        return Err(bad(
            "cluster.manager_password",
            format!("at least {MIN_PASSWORD} characters"),
        ));
    }
    if s.contains(['\n', '\r', '\0']) {
        return Err(bad("cluster.manager_password", "one line, no NUL"));
    }
    Ok(s.into())
}

/// Joining: a member's address and the cluster's join token.
pub fn join_choice(address: &str, token: &str) -> Result<ClusterChoice, AnswerError> {
    let address: SocketAddr = address.trim().parse().map_err(|_| {
        bad(
            "cluster.join",
            format!("{:?} is not ADDRESS:PORT", address.trim()),
        )
    })?;
    let token = token.trim();
    if token.is_empty() || token.len() > 4096 || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(bad(
            "cluster.token",
            "the cluster's join token, as a member shows it",
        ));
    }
    Ok(ClusterChoice::Join {
        address,
        token: token.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
disk = "/dev/vda"
hostname = "vmserver1"
[network]
interface = "auto"
address = "dhcp"
gateway = ""
[cluster]
create = true
manager_password = "correct horse"
join = ""
token = ""
[after]
poweroff = true
"#;

    #[test]
    fn the_documented_file_reads_as_written() {
        let a = parse(FULL).unwrap();
        assert_eq!(a.disk, DiskChoice::Path("/dev/vda".into()));
        assert_eq!(a.hostname, "vmserver1");
        assert!(!a.wipe);
        assert_eq!(a.network.interface, NicChoice::Auto);
        assert_eq!(a.network.addressing, Addressing::Dhcp);
        assert_eq!(a.network.vlan, None);
        assert_eq!(
            a.cluster,
            ClusterChoice::Create {
                manager_password: "correct horse".into()
            }
        );
        assert_eq!(a.after, After::Poweroff);
        assert!(!format!("{a:?}").contains("horse"), "no secret in Debug");
    }

    #[test]
    fn a_join_with_a_static_address_on_a_vlan() {
        let a = parse(
            r#"
disk = "largest"
hostname = "VM2"
wipe = true
[network]
interface = "52:54:00:AB:CD:EF"
address = "10.0.0.12/24"
gateway = "10.0.0.1"
vlan = 30
vm_interface = "enp2s0"
[cluster]
join = "10.0.0.11:7400"
token = "abc.def"
[after]
poweroff = false
"#,
        )
        .unwrap();
        assert_eq!(a.disk, DiskChoice::Largest);
        assert_eq!(a.hostname, "vm2");
        assert!(a.wipe);
        assert_eq!(
            a.network.interface,
            NicChoice::Named("52:54:00:ab:cd:ef".into())
        );
        assert_eq!(
            a.network.addressing,
            Addressing::Static {
                address: Ipv4Addr::new(10, 0, 0, 12),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1))
            }
        );
        assert_eq!(a.network.vlan, Some(30));
        assert_eq!(a.network.vm_interface, NicChoice::Named("enp2s0".into()));
        assert_eq!(
            a.cluster,
            ClusterChoice::Join {
                address: "10.0.0.11:7400".parse().unwrap(),
                token: "abc.def".into()
            }
        );
        assert_eq!(a.after, After::Reboot);
    }

    #[test]
    fn every_bad_answer_names_its_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("disk = \"/dev/vda\"", "disk = \"sda\"", "disk"),
            ("disk = \"/dev/vda\"", "disk = \"/dev/../etc\"", "disk"),
            ("hostname = \"vmserver1\"", "hostname = \"-x\"", "hostname"),
            ("hostname = \"vmserver1\"", "hostname = \"a b\"", "hostname"),
            (
                "address = \"dhcp\"",
                "address = \"10.0.0.5\"",
                "network.address",
            ),
            (
                "address = \"dhcp\"",
                "address = \"10.0.0.5/33\"",
                "network.address",
            ),
            (
                "address = \"dhcp\"",
                "address = \"127.0.0.1/8\"",
                "network.address",
            ),
            (
                "gateway = \"\"",
                "gateway = \"10.0.0.1\"",
                "network.gateway",
            ),
            (
                "interface = \"auto\"",
                "interface = \"a;b\"",
                "network.interface",
            ),
            (
                "manager_password = \"correct horse\"",
                "manager_password = \"short\"",
                "cluster.manager_password",
            ),
            ("join = \"\"", "join = \"10.0.0.1:7400\"", "cluster"),
            (
                "create = true\nmanager_password = \"correct horse\"\njoin = \"\"",
                "create = false\nmanager_password = \"\"\njoin = \"x\"",
                "cluster.join",
            ),
        ];
        for (from, to, key) in cases {
            let text = FULL.replace(from, to);
            assert_ne!(text, FULL, "{from}");
            match parse(&text) {
                Err(AnswerError::Value { key: k, .. }) => assert_eq!(&k, key, "{to}"),
                other => panic!("{to}: {other:?}"),
            }
        }
        let gw = addressing("10.0.0.5/24", "10.0.1.1").unwrap_err();
        assert!(
            gw.to_string()
                .contains("not another address in 10.0.0.5/24"),
            "{gw}"
        );
        assert!(join_choice("10.0.0.1:7400", "").is_err());
        assert!(join_choice("nowhere", "t").is_err());
        let waiting = parse(&FULL.replace("create = true", "create = false")).unwrap();
        assert_eq!(
            waiting.cluster,
            ClusterChoice::Await,
            "added by a Manager later"
        );
    }

    #[test]
    fn unknown_keys_and_missing_ones_are_refused_not_ignored() {
        assert!(matches!(
            parse(&format!("{FULL}\nsize = 3\n")),
            Err(AnswerError::Syntax(_))
        ));
        assert!(matches!(
            parse(&FULL.replace("disk = \"/dev/vda\"", "")),
            Err(AnswerError::Syntax(_))
        ));
        assert!(matches!(parse("disk = ["), Err(AnswerError::Syntax(_))));
        assert!(matches!(
            parse(
                &FULL
                    .replace("vlan", "x")
                    .replace("[network]", "[network]\nvlan = 4095")
            ),
            Err(AnswerError::Value {
                key: "network.vlan",
                ..
            })
        ));
    }
}
