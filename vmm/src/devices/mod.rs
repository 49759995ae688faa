//! Emulated devices: legacy PC pieces on port I/O, the linear framebuffer,
//! and virtio on MMIO.

pub mod acpi_pm;
pub mod vga;
pub mod ahci;
pub mod cmos;
pub mod debugcon;
pub mod fw_cfg;
pub mod framebuffer;
pub mod i8042;
pub mod pci;
pub mod serial;
pub mod virtio;
