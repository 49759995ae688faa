//! Firmware boot: the firmware image (SeaBIOS or OVMF) at the top of the
//! 32-bit address space (its last 128 KiB also below 1 MiB, where a PC's
//! CPU finds its first instructions after reset in real mode), and what the
//! firmware reads from fw_cfg: the memory map, the boot order, the ACPI
//! tables with their loader script, and its console settings.

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use super::acpi::{self, Platform};
use super::layout::SERIAL_PORT;
use crate::config::Firmware;
use crate::devices::fw_cfg::{FwCfg, FwCfgError};
use crate::memory::{ram_ranges, GuestMemory};

/// Where Debian's `seabios` package puts the BIOS QEMU's PC machines use.
pub const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
/// Where Debian's `ovmf` package puts UEFI firmware for x86-64 with its
/// variable store in the same image (QEMU's `-bios`): with no flash device
/// to write them to, OVMF keeps its variables in memory for the boot.
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// The image `firmware` boots from when none is named.
pub fn default_image(firmware: Firmware) -> &'static Path {
    Path::new(match firmware {
        Firmware::Bios => SEABIOS,
        Firmware::Uefi => OVMF,
    })
}
/// The part of the image also mapped below 1 MiB.
const LOW_ALIAS: u64 = 128 << 10;
/// Largest image accepted (16 MiB, the flash window below 4 GiB).
const MAX_IMAGE: u64 = 16 << 20;

/// Errors loading the firmware or describing the VM to it.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// The image cannot be read.
    #[error(
        "cannot read firmware {path}: {err} (Debian's seabios package provides {SEABIOS}, \
         its ovmf package {OVMF})"
    )]
    Read {
        /// The image.
        path: PathBuf,
        /// Why.
        err: std::io::Error,
    },
    /// The image's size is not a multiple of 64 KiB between 128 KiB and 16 MiB.
    #[error(
        "firmware {path} is {size} bytes; a BIOS image is a multiple of 64 KiB, 128 KiB to 16 MiB"
    )]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Guest memory refused the low copy.
    #[error("cannot copy the firmware below 1 MiB")]
    Memory,
    /// fw_cfg refused an item.
    #[error(transparent)]
    FwCfg(#[from] FwCfgError),
}

/// A firmware image, checked.
pub struct Image {
    bytes: Vec<u8>,
}

impl Image {
    /// Reads and checks the image at `path`.
    pub fn load(path: &Path) -> Result<Image, FirmwareError> {
        let bytes = std::fs::read(path).map_err(|err| FirmwareError::Read {
            path: path.into(),
            err,
        })?;
        let size = bytes.len() as u64;
        if size % (64 << 10) != 0 || !(LOW_ALIAS..=MAX_IMAGE).contains(&size) {
            return Err(FirmwareError::Size {
                path: path.into(),
                size,
            });
        }
        Ok(Image { bytes })
    }

    /// The image's bytes, to map ending at 4 GiB.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Guest address where the image starts (it ends at 4 GiB).
    pub fn base(&self) -> u64 {
        (1u64 << 32) - self.bytes.len() as u64
    }

    /// Copies the image's last 128 KiB to 0xE0000-0xFFFFF of guest RAM: the
    /// reset vector jumps there, and the firmware runs from that copy.
    pub fn copy_low(&self, mem: &GuestMemory) -> Result<(), FirmwareError> {
        let tail = &self.bytes[self.bytes.len() - LOW_ALIAS as usize..];
        mem.write_slice(tail, GuestAddress(0x10_0000 - LOW_ALIAS))
            .map_err(|_| FirmwareError::Memory)
    }
}

/// Start of the 32-bit PCI window SeaBIOS chooses for `below_4g` bytes of
/// RAM under 4 GiB (the DSDT must say the same).
pub fn pci_window_start(below_4g: u64) -> u32 {
    if below_4g <= 0x8000_0000 {
        0x8000_0000
    } else {
        0xc000_0000
    }
}

/// Last byte of the 32-bit PCI window: below the IOAPIC.
pub const PCI_WINDOW_END: u32 = 0xfebf_ffff;

/// The e820 map for fw_cfg: address, length, type (1 = RAM), 20 bytes each.
fn e820(ram_bytes: u64) -> Vec<u8> {
    let mut v = Vec::new();
    for (base, len) in ram_ranges(ram_bytes) {
        v.extend_from_slice(&base.0.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes());
    }
    v
}

/// A bootable device, as the firmware's boot order names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootDevice {
    /// A virtio-blk function in a PCI slot.
    Virtio(u8),
    /// A drive on a port of the AHCI controller in a PCI slot.
    Sata(u8, usize),
}

impl BootDevice {
    /// The OpenFirmware-style path both firmwares match their devices
    /// against: SeaBIOS by its own patterns (`/pci@i0cf8/*@5`) as prefixes,
    /// OVMF by translating it to a UEFI device path. OVMF knows SATA ports
    /// under the name of QEMU's AHCI controller, and a PCI function by any
    /// other name (its whole disk, whatever the partitions).
    fn path(&self) -> String {
        match self {
            BootDevice::Virtio(slot) => format!("/pci@i0cf8/virtio-blk@{slot:x}"),
            BootDevice::Sata(slot, port) => {
                format!("/pci@i0cf8/pci8086,2922@{slot:x}/drive@{port:x}/disk@0")
            }
        }
    }
}

/// The `bootorder` file: the devices' paths one per line, ended by a NUL, as
/// QEMU writes it. OVMF refuses a file without the NUL whole (it then
/// ignores the order and tries every device it finds); SeaBIOS takes both.
fn bootorder(boot: &[BootDevice]) -> Vec<u8> {
    let paths: Vec<String> = boot.iter().map(BootDevice::path).collect();
    let mut file = paths.join("\n").into_bytes();
    file.push(0);
    file
}

/// Fills `fw` for a VM of `ram_bytes` of RAM whose bootable devices are
/// `boot`, in boot order.
pub fn describe(
    fw: &mut FwCfg,
    ram_bytes: u64,
    platform: &Platform,
    boot: &[BootDevice],
) -> Result<(), FirmwareError> {
    fw.add_file("etc/e820", e820(ram_bytes))?;
    fw.add_file("bootorder", bootorder(boot))?;
    // No "Press ESC for boot menu" pause; the firmware's text also on COM1.
    fw.add_file("etc/show-boot-menu", 0u16.to_le_bytes().to_vec())?;
    fw.add_file("etc/sercon-port", SERIAL_PORT.to_le_bytes().to_vec())?;
    for (name, data) in acpi::loader_files(platform) {
        fw.add_file(name, data)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_order_is_qemu_s_lines_ended_by_a_nul() {
        let order = bootorder(&[BootDevice::Sata(5, 1), BootDevice::Virtio(0x1f)]);
        assert_eq!(
            order,
            b"/pci@i0cf8/pci8086,2922@5/drive@1/disk@0\n/pci@i0cf8/virtio-blk@1f\0"
        );
        assert_eq!(bootorder(&[]), b"\0");
    }

    #[test]
    fn images_are_checked_and_the_low_copy_is_the_tail() {
        let dir = std::env::temp_dir().join(format!("enspeed-fw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad.bin");
        std::fs::write(&bad, vec![0u8; 100_000]).unwrap();
        let e = Image::load(&bad).err().unwrap().to_string();
        assert!(e.contains("100000 bytes"), "{e}");
        assert!(Image::load(&dir.join("missing.bin"))
            .err()
            .unwrap()
            .to_string()
            .contains("seabios package provides"));
        let good = dir.join("bios.bin");
        let mut img = vec![0u8; 256 << 10];
        img[(256 << 10) - 16] = 0xea; // the reset vector's far jump
        img[128 << 10] = 0x55;
        std::fs::write(&good, &img).unwrap();
        let i = Image::load(&good).unwrap();
        assert_eq!(i.base(), 0xfffc_0000);
        let (mem, _f) = crate::memory::create(16).unwrap();
        i.copy_low(&mem).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xffff0)).unwrap(), 0xea);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xe0000)).unwrap(), 0x55);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(pci_window_start(1 << 30), 0x8000_0000);
        assert_eq!(pci_window_start(0xc000_0000), 0xc000_0000);
        assert_eq!(e820(5 << 30).len(), 40);
        assert_eq!(BootDevice::Virtio(0x1a).path(), "/pci@i0cf8/virtio-blk@1a");
        assert_eq!(
            BootDevice::Sata(3, 1).path(),
            "/pci@i0cf8/pci8086,2922@3/drive@1/disk@0"
        );
        assert!(Image::load(default_image(Firmware::Uefi)).is_ok() || !Path::new(OVMF).exists());
    }
}
