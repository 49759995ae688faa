//! Emulated devices: legacy PC pieces on port I/O and virtio on MMIO.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;
pub mod virtio;
