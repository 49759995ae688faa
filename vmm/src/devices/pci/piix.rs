//! The PIIX functions in slot 1, as on QEMU's PC and the i440FX boards it
//! models: the PCI-to-ISA bridge (00:01.0), under which firmware finds the
//! PC's legacy devices (OVMF's keyboard and serial console are children of
//! it), and the power-management function (00:01.3), whose registers tell
//! firmware where the ACPI fixed hardware is.
//!
//! The ACPI block does not move: the PM function reports it enabled at
//! [`PM1A_EVT_PORT`] (0x600) from power-on. SeaBIOS puts it there itself
//! when it finds ACPI tables in fw_cfg, and OVMF leaves an enabled block
//! where it is and reads its timer at the base the register gives, so both
//! firmwares' PM timer and the FADT agree. What the guest writes to the base
//! register is ignored.

use std::sync::{Arc, Mutex};

use super::config::{reg, Identity, PciConfig};
use super::{ChipsetFunction, PciBus, PciError};
use crate::arch::layout::PM1A_EVT_PORT;

/// The slot both functions are in.
const SLOT: u8 = 1;
/// The power-management function's number.
const PM_FUNCTION: u8 = 3;

/// Header type bit: the slot has more functions than 0.
const MULTI_FUNCTION: u8 = 0x80;
/// PIIX4 PM: the I/O base of the ACPI block (bit 0 reads as one: I/O space).
const PMBA: usize = 0x40;
/// PIIX4 PM: bit 0 enables the ACPI block's I/O space.
const PMREGMISC: usize = 0x80;
/// PIIX4 PM: the top byte of DEVACTB, whose bit 1 (APMC_EN) says SMIs on
/// port 0xB2 are set up. There is no SMM here: set, as QEMU sets it without
/// SMM, so SeaBIOS does not wait for an SMI handler that never runs.
const DEVACTB_TOP: usize = 0x5b;

/// Puts both functions in slot 1 of `bus`, which must be free.
pub fn install(bus: &mut PciBus) -> Result<(), PciError> {
    bus.add_function(SLOT, 0, Arc::new(Mutex::new(isa_bridge())))?;
    bus.add_function(SLOT, PM_FUNCTION, Arc::new(Mutex::new(power_management())))
}

/// The PIIX3 PCI-to-ISA bridge, function 0 of a multi-function slot.
fn isa_bridge() -> ChipsetFunction {
    let mut config = PciConfig::new(
        Identity {
            vendor: 0x8086,
            device: 0x7000,
            revision: 0,
            class: (0x06, 0x01, 0x00),
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        },
        0,
    );
    config.set_u8(reg::HEADER_TYPE, MULTI_FUNCTION);
    // PIRQ routing (0x60-0x63), top of memory and the APIC base: firmware
    // writes them; they are kept.
    config.make_writable(0x60..0x64);
    config.make_writable(0x69..0x6a);
    config.make_writable(0x80..0x81);
    ChipsetFunction::new(config)
}

/// The PIIX4 power-management function, its ACPI block enabled at
/// [`PM1A_EVT_PORT`].
fn power_management() -> ChipsetFunction {
    let mut config = PciConfig::new(
        Identity {
            vendor: 0x8086,
            device: 0x7113,
            revision: 3,
            class: (0x06, 0x80, 0x00),
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
        },
        0,
    );
    config.set_u32(PMBA, u32::from(PM1A_EVT_PORT) | 1);
    config.set_u8(PMREGMISC, 1);
    config.set_u8(DEVACTB_TOP, 0x02);
    // The SMBus base and enable (0x90-0x93, 0xd2): kept, unused.
    config.make_writable(0x90..0x94);
    config.make_writable(0xd2..0xd3);
    ChipsetFunction::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci::PciDevice;

    #[test]
    fn the_pm_function_reports_the_acpi_block_where_it_is_and_keeps_it_there() {
        let mut pm = power_management();
        let mut d = [0u8; 4];
        pm.config().read(PMBA, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::from(PM1A_EVT_PORT) | 1);
        pm.write_config(PMBA, &0xc001u32.to_le_bytes());
        pm.write_config(PMREGMISC, &[0]);
        pm.config().read(PMBA, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::from(PM1A_EVT_PORT) | 1);
        assert_eq!(pm.config().u16(reg::DEVICE_ID), 0x7113);
        let mut b = [0u8; 1];
        pm.config().read(PMREGMISC, &mut b);
        assert_eq!(b, [1]);
        let mut isa = isa_bridge();
        isa.config().read(reg::HEADER_TYPE, &mut b);
        assert_eq!(b, [MULTI_FUNCTION]);
        isa.write_config(0x60, &[10, 10, 11, 11]);
        isa.config().read(0x60, &mut d);
        assert_eq!(d, [10, 10, 11, 11]);
    }
}
