//! What a VM is made of, and the parsing of the command-line forms of its
//! devices (`--disk PATH[,readonly][,bus=virtio|sata]`, `--disk empty,readonly`,
//! `--disk vhost-user=SOCKET`, `--cdrom PATH|empty`, `--boot disk,cdrom|cdrom,disk`,
//! `--net tap=NAME[,mac=MAC]`, `--serial stdout|FILE`, `--framebuffer WxH`). These forms are a
//! stable interface: scripts and the node agent rely on them.

use std::path::PathBuf;

use crate::devices::virtio::net::parse_mac;

/// Who serves a disk's blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// The VMM itself, from a file.
    File,
    /// A vhost-user-blk backend (`enspeed blockd`) listening on a unix socket.
    VhostUser,
}

/// Which controller a disk hangs on, with firmware boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskBus {
    /// virtio-blk (virtio-pci with firmware boot, virtio-mmio with --kernel).
    Virtio,
    /// A SATA port of the AHCI controller, for guests without virtio drivers.
    Sata,
}

/// A disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// Backing file, or the backend's socket for a vhost-user disk.
    pub path: PathBuf,
    /// Read-only, removable media (ISO images). A vhost-user disk is never
    /// removable; its backend decides whether it is read-only.
    pub readonly: bool,
    /// Who serves the blocks.
    pub kind: DiskKind,
    /// Its controller.
    pub bus: DiskBus,
}

/// The order the firmware tries the boot devices in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootOrder {
    /// The disks, in order, then the CD-ROM (the default).
    DiskFirst,
    /// The CD-ROM, then the disks.
    CdromFirst,
}

/// Parses `disk,cdrom` or `cdrom,disk`.
pub fn parse_boot_order(s: &str) -> Result<BootOrder, String> {
    match s {
        "disk,cdrom" | "disk" => Ok(BootOrder::DiskFirst),
        "cdrom,disk" | "cdrom" => Ok(BootOrder::CdromFirst),
        other => Err(format!(
            "unknown boot order {other:?} (expected disk,cdrom or cdrom,disk)"
        )),
    }
}

/// What `--cdrom` puts in the drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CdromMedia {
    /// Nothing: an empty drive.
    Empty,
    /// An ISO image.
    Image(PathBuf),
}

impl CdromMedia {
    /// The image, if any.
    pub fn into_path(self) -> Option<PathBuf> {
        match self {
            CdromMedia::Empty => None,
            CdromMedia::Image(p) => Some(p),
        }
    }
}

/// Parses `--cdrom PATH|empty`: the image in the drive, or none.
pub fn parse_cdrom(s: &str) -> Result<CdromMedia, String> {
    match s {
        "" => Err("CD-ROM image path is empty (write empty for an empty drive)".into()),
        "empty" => Ok(CdromMedia::Empty),
        p => Ok(CdromMedia::Image(p.into())),
    }
}

/// A network card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Tap interface name.
    pub tap: String,
    /// MAC address.
    pub mac: [u8; 6],
}

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialTarget {
    /// The VMM's standard output (and input, when it is a terminal).
    Stdout,
    /// A file, appended to.
    File(PathBuf),
}

/// The graphical console: a framebuffer served over RFB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VncConfig {
    /// The RFB server's unix socket.
    pub socket: PathBuf,
    /// Framebuffer width in pixels.
    pub width: u32,
    /// Framebuffer height in pixels.
    pub height: u32,
}

/// Which firmware starts a VM that boots from its disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, from Debian's `seabios` package.
    Bios,
    /// OVMF, from Debian's `ovmf` package.
    Uefi,
}

/// Parses `bios` or `uefi`.
pub fn parse_firmware(s: &str) -> Result<Firmware, String> {
    match s {
        "bios" => Ok(Firmware::Bios),
        "uefi" => Ok(Firmware::Uefi),
        other => Err(format!(
            "unknown firmware {other:?} (expected bios or uefi)"
        )),
    }
}

/// How a VM starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// The VMM loads a Linux kernel and enters it directly; devices are
    /// virtio-mmio.
    Kernel {
        /// Kernel image (bzImage or ELF).
        kernel: PathBuf,
        /// Initial ramdisk.
        initrd: Option<PathBuf>,
        /// Kernel command line, before the VMM appends its device list.
        cmdline: String,
    },
    /// The firmware starts from the reset vector and boots from the disks,
    /// in order; devices are on PCI.
    Firmware {
        /// Which firmware.
        firmware: Firmware,
        /// The image, when not the distribution's.
        image: Option<PathBuf>,
        /// The CD-ROM drive (SATA), if the VM has one: the image in it, or empty.
        cdrom: Option<Option<PathBuf>>,
        /// What the firmware boots first.
        order: BootOrder,
    },
}

/// A whole VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The VM's name, as its console shows it.
    pub name: String,
    /// How it starts.
    pub boot: Boot,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Disks, in order.
    pub disks: Vec<DiskConfig>,
    /// NICs, in order.
    pub nets: Vec<NetConfig>,
    /// Serial console destination.
    pub serial: SerialTarget,
    /// The most a serial log file keeps, in bytes: `FILE` and `FILE.1` hold the newest output
    /// up to this much (a guest cannot fill the host's disk through its serial port).
    pub serial_max: u64,
    /// Control socket path.
    pub api_socket: Option<PathBuf>,
    /// Graphical console, if any.
    pub vnc: Option<VncConfig>,
    /// Take the VM from a source VMM migrating it to this socket, instead of booting it.
    pub incoming: Option<PathBuf>,
}

/// Parses `PATH[,readonly][,bus=virtio|sata]` or `vhost-user=SOCKET[,bus=virtio|sata]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    if let Some(socket) = s.strip_prefix("vhost-user=") {
        let mut parts = socket.split(',');
        let socket = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("vhost-user socket path is empty")?;
        let mut bus = DiskBus::Virtio;
        for opt in parts {
            match opt {
                "bus=virtio" => bus = DiskBus::Virtio,
                "bus=sata" => bus = DiskBus::Sata,
                other => {
                    return Err(format!(
                        "unknown vhost-user disk option {other:?} (expected bus=virtio or bus=sata; the backend decides read-only)"
                    ))
                }
            }
        }
        return Ok(DiskConfig {
            path: socket.into(),
            readonly: false,
            kind: DiskKind::VhostUser,
            bus,
        });
    }
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("disk path is empty")?;
    let mut readonly = false;
    let mut bus = DiskBus::Virtio;
    for opt in parts {
        match opt {
            "readonly" | "ro" => readonly = true,
            "bus=virtio" => bus = DiskBus::Virtio,
            "bus=sata" => bus = DiskBus::Sata,
            other => {
                return Err(format!(
                    "unknown disk option {other:?} (expected readonly, bus=virtio or bus=sata)"
                ))
            }
        }
    }
    // `empty,readonly`: a removable drive with no media yet (an empty path; a file named
    // "empty" is `./empty`).
    let path = match path {
        "empty" if readonly => PathBuf::new(),
        "empty" => return Err("an empty drive is removable media: write empty,readonly".into()),
        p => p.into(),
    };
    if bus == DiskBus::Sata && path.as_os_str().is_empty() {
        return Err("an empty drive is the CD-ROM: use --cdrom empty".into());
    }
    Ok(DiskConfig {
        path,
        readonly,
        kind: DiskKind::File,
        bus,
    })
}

/// A locally administered MAC derived from the tap name, so a VM keeps its
/// address across restarts without one being given.
fn default_mac(tap: &str) -> [u8; 6] {
    let h = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// Parses `tap=NAME[,mac=MAC]`.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for opt in s.split(',') {
        match opt.split_once('=') {
            Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
            Some(("mac", v)) => {
                mac = Some(parse_mac(v).ok_or_else(|| format!("invalid MAC address {v:?}"))?)
            }
            _ => {
                return Err(format!(
                    "unknown network option {opt:?} (expected tap=NAME or mac=MAC)"
                ))
            }
        }
    }
    let tap = tap.ok_or("network card needs tap=NAME")?;
    if tap.len() >= 16 {
        return Err(format!("tap name {tap:?} is longer than 15 bytes"));
    }
    let mac = mac.unwrap_or_else(|| default_mac(&tap));
    if mac[0] & 1 != 0 {
        return Err("MAC address is a multicast address".into());
    }
    Ok(NetConfig { tap, mac })
}

/// The default bound of a serial log file: 16 MiB of the newest output.
pub const SERIAL_MAX: u64 = 16 << 20;

/// Parses `stdout` or a file path.
pub fn parse_serial(s: &str) -> Result<SerialTarget, String> {
    match s {
        "" => Err("serial target is empty".into()),
        "stdout" => Ok(SerialTarget::Stdout),
        path => Ok(SerialTarget::File(path.into())),
    }
}

/// Parses a framebuffer size, `WIDTHxHEIGHT` (e.g. `1024x768`); the
/// limits are checked when the framebuffer is created.
pub fn parse_framebuffer(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("framebuffer size {s:?} is not WIDTHxHEIGHT"))?;
    let n = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("framebuffer size {s:?} is not WIDTHxHEIGHT"))
    };
    Ok((n(w)?, n(h)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        assert_eq!(
            parse_disk("/a.img").unwrap(),
            DiskConfig {
                path: "/a.img".into(),
                readonly: false,
                kind: DiskKind::File,
                bus: DiskBus::Virtio,
            }
        );
        assert!(parse_disk("/a.iso,readonly").unwrap().readonly);
        let empty = parse_disk("empty,readonly").unwrap();
        assert!(empty.readonly && empty.path.as_os_str().is_empty());
        assert!(parse_disk("empty").is_err());
        assert_eq!(
            parse_disk("./empty").unwrap().path,
            PathBuf::from("./empty")
        );
        assert!(parse_disk("").is_err());
        assert!(parse_disk("/a.img,fast").is_err());
        assert_eq!(
            parse_disk("vhost-user=/run/enspeed/vm1-disk0.sock").unwrap(),
            DiskConfig {
                path: "/run/enspeed/vm1-disk0.sock".into(),
                readonly: false,
                kind: DiskKind::VhostUser,
                bus: DiskBus::Virtio,
            }
        );
        assert!(parse_disk("vhost-user=").is_err());
        assert!(parse_disk("vhost-user=/s.sock,readonly").is_err());
        assert_eq!(parse_disk("/w.img,bus=sata").unwrap().bus, DiskBus::Sata);
        assert_eq!(
            parse_disk("/w.img,ro,bus=virtio").unwrap().bus,
            DiskBus::Virtio
        );
        assert!(parse_disk("/w.img,bus=scsi").is_err());
        assert!(parse_disk("empty,readonly,bus=sata").is_err());
        assert_eq!(
            parse_disk("vhost-user=/s.sock,bus=sata").unwrap().bus,
            DiskBus::Sata
        );
        assert!(parse_disk("vhost-user=/s.sock,bus=ide").is_err());
        // A file whose name merely contains the word stays a file.
        assert_eq!(parse_disk("./vhost-user=x").unwrap().kind, DiskKind::File);
    }

    #[test]
    fn nets() {
        let n = parse_net("tap=tap0,mac=52:54:00:12:34:56").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let d = parse_net("tap=tap0").unwrap();
        assert_eq!(d.mac, parse_net("tap=tap0").unwrap().mac);
        assert_ne!(d.mac, parse_net("tap=tap1").unwrap().mac);
        assert!(parse_net("mac=52:54:00:12:34:56").is_err());
        assert!(parse_net("tap=").is_err());
        assert!(parse_net("tap=x,mac=01:00:00:00:00:00").is_err());
        assert!(parse_net("tap=averyveryverylongname").is_err());
        assert!(parse_net("tap=t,speed=10").is_err());
    }

    #[test]
    fn framebuffer_sizes() {
        assert_eq!(parse_framebuffer("1024x768").unwrap(), (1024, 768));
        assert_eq!(parse_framebuffer("800X600").unwrap(), (800, 600));
        for bad in ["", "1024", "x768", "1024x", "-1x5", "1024x768x2", "1e3x5"] {
            assert!(parse_framebuffer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn boot_orders_and_cdroms() {
        assert_eq!(
            parse_boot_order("disk,cdrom").unwrap(),
            BootOrder::DiskFirst
        );
        assert_eq!(
            parse_boot_order("cdrom,disk").unwrap(),
            BootOrder::CdromFirst
        );
        assert!(parse_boot_order("net").is_err());
        assert_eq!(parse_cdrom("empty").unwrap(), CdromMedia::Empty);
        assert_eq!(
            parse_cdrom("/x.iso").unwrap().into_path(),
            Some(PathBuf::from("/x.iso"))
        );
        assert!(parse_cdrom("").is_err());
    }

    #[test]
    fn firmwares() {
        assert_eq!(parse_firmware("bios").unwrap(), Firmware::Bios);
        assert_eq!(parse_firmware("uefi").unwrap(), Firmware::Uefi);
        assert!(parse_firmware("BIOS").is_err());
    }

    #[test]
    fn serial() {
        assert_eq!(parse_serial("stdout").unwrap(), SerialTarget::Stdout);
        assert_eq!(
            parse_serial("/tmp/x").unwrap(),
            SerialTarget::File("/tmp/x".into())
        );
        assert!(parse_serial("").is_err());
    }
}
