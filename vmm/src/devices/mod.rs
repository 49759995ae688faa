//! Emulated devices: legacy PC pieces on port I/O, the linear framebuffer,
//! and virtio on MMIO.

pub mod acpi_pm;
pub mod ahci;
pub mod cmos;
pub mod debugcon;
pub mod framebuffer;
pub mod fw_cfg;
pub mod i8042;
pub mod pci;
pub mod serial;
pub mod vga;
pub mod virtio;

/// Opens a disk or CD image, read-only or not, and returns it with its length in bytes: what
/// every device serving an image starts with.
pub fn open_image(path: &std::path::Path, readonly: bool) -> std::io::Result<(std::fs::File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!readonly)
        .open(path)?;
    let len = file.metadata()?.len();
    Ok((file, len))
}
