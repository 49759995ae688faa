//! ACPI tables: how the guest finds its CPUs and interrupt controllers
//! (MADT), powers off and reboots (FADT fixed hardware, `_S5_`), and receives
//! the power button that asks it to shut down gracefully.
//!
//! We describe a classic (not hardware-reduced) PC: hardware-reduced ACPI
//! makes Linux drop the legacy PIC and PIT, and needs AML methods for the
//! power button, where the fixed-feature button needs none.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{Immutable, IntoBytes};

use super::layout::*;
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"ENSPED";
const OEM_TABLE: [u8; 8] = *b"ENSPEED ";

/// SLP_TYP value of the S5 (soft off) state; the PM1 control block device
/// powers the VM off when the guest enables sleep with it.
pub const S5_SLP_TYP: u16 = 5;

/// FADT IA-PC boot architecture flag: an 8042 keyboard controller exists.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;

/// MADT interrupt source override (ACPI 6.5, 5.2.12.5).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: u32,
    flags: u16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// Errors while writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in their reserved area.
    #[error("ACPI tables need {0} bytes, more than the reserved area")]
    TooLarge(u64),
    /// Guest memory refused the write.
    #[error("cannot write ACPI tables into guest memory")]
    Memory,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// A virtio-mmio transport as the DSDT describes it.
#[derive(Clone, Copy, Debug)]
pub struct MmioDevice {
    /// Register window base.
    pub base: u64,
    /// Register window length.
    pub len: u64,
    /// Its (ISA) interrupt.
    pub irq: u32,
}

/// The DSDT: the S5 sleep type, and one `LNRO0005` device per virtio-mmio
/// transport, which is how kernels without command-line virtio-mmio
/// support (Debian's) find them.
fn dsdt(devices: &[MmioDevice]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&(S5_SLP_TYP as u8), &(S5_SLP_TYP as u8), &0u8, &0u8]),
    );
    dsdt.append_slice(&bytes(&s5));
    let mems: Vec<aml::Memory32Fixed> = devices
        .iter()
        .map(|d| aml::Memory32Fixed::new(true, d.base as u32, d.len as u32))
        .collect();
    // Edge-triggered, active high: an irqfd delivers one pulse per signal.
    let irqs: Vec<aml::Interrupt> = devices
        .iter()
        .map(|d| aml::Interrupt::new(true, true, false, false, d.irq))
        .collect();
    let crs: Vec<aml::ResourceTemplate> = mems
        .iter()
        .zip(&irqs)
        .map(|(m, i)| aml::ResourceTemplate::new(vec![m, i]))
        .collect();
    let uids: Vec<u32> = (0..devices.len() as u32).collect();
    let fields: Vec<[aml::Name; 3]> = crs
        .iter()
        .zip(&uids)
        .map(|(c, u)| {
            [
                aml::Name::new("_HID".into(), &"LNRO0005"),
                aml::Name::new("_UID".into(), u),
                aml::Name::new("_CRS".into(), c),
            ]
        })
        .collect();
    let devs: Vec<aml::Device> = fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            aml::Device::new(
                format!("VR{i:02X}").as_str().into(),
                f.iter().map(|n| n as &dyn Aml).collect(),
            )
        })
        .collect();
    if !devs.is_empty() {
        let sb = aml::Scope::new(
            "\\_SB_".into(),
            devs.iter().map(|d| d as &dyn Aml).collect(),
        );
        dsdt.append_slice(&bytes(&sb));
    }
    dsdt
}

/// Builds every table for a VM with `vcpus` CPUs and `devices`, and writes
/// them at [`ACPI_START`]. Returns the RSDP's guest address.
pub fn write_tables(
    mem: &GuestMemory,
    vcpus: u8,
    devices: &[MmioDevice],
) -> Result<GuestAddress, AcpiError> {
    let dsdt = dsdt(devices);

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(vcpus, IOAPIC_START as u32, 0));
    // The SCI is level-triggered, active high, as the PM1 device drives it.
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: SCI_IRQ as u8,
        gsi: SCI_IRQ,
        flags: 0b1101,
    });

    // Lay out: RSDP, XSDT, FADT, DSDT, MADT; each 16-byte aligned.
    let align = |x: u64| (x + 15) & !15;
    let rsdp_at = ACPI_START;
    let xsdt_at = align(rsdp_at + Rsdp::len() as u64);
    let xsdt_len = 36 + 8 * 2;
    let fadt_at = align(xsdt_at + xsdt_len);
    let dsdt_at = align(fadt_at + acpi_tables::fadt::FADT::len() as u64);
    let madt_at = align(dsdt_at + dsdt.len() as u64);
    let madt_bytes = bytes(&madt);
    let end = madt_at + madt_bytes.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1).dsdt_64(dsdt_at);
    fadt.sci_int = (SCI_IRQ as u16).into();
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    fadt.pm_tmr_blk = u32::from(PM_TMR_PORT).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1_cnt_len = 2;
    fadt.pm_tmr_len = 4;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_8042.into();
    fadt.x_pm1a_evt_blk = GAS::new(
        AddressSpace::SystemIo,
        32,
        0,
        AccessSize::WordAccess,
        u64::from(PM1A_EVT_PORT),
    );
    fadt.x_pm1a_cnt_blk = GAS::new(
        AddressSpace::SystemIo,
        16,
        0,
        AccessSize::WordAccess,
        u64::from(PM1A_CNT_PORT),
    );
    fadt.x_pm_tmr_blk = GAS::new(
        AddressSpace::SystemIo,
        32,
        0,
        AccessSize::DwordAccess,
        u64::from(PM_TMR_PORT),
    );
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(RESET_PORT),
    );
    fadt.reset_value = RESET_VALUE;
    let fadt = fadt
        .flag(Flags::ResetRegSup)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .finalize();

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);

    let write = |data: &[u8], at: u64| {
        mem.write_slice(data, GuestAddress(at))
            .map_err(|_| AcpiError::Memory)
    };
    write(&bytes(&Rsdp::new(OEM_ID, xsdt_at)), rsdp_at)?;
    write(&bytes(&xsdt), xsdt_at)?;
    write(&bytes(&fadt), fadt_at)?;
    write(dsdt.as_slice(), dsdt_at)?;
    write(&madt_bytes, madt_at)?;
    Ok(GuestAddress(rsdp_at))
}

/// The value the guest writes to the reset register to reboot.
pub const RESET_VALUE: u8 = 0x6;

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn table(mem: &GuestMemory, at: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let (mem, _f) = crate::memory::create(64).unwrap();
        let devs = [
            MmioDevice {
                base: 0xd000_0000,
                len: 0x1000,
                irq: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let rsdp = write_tables(&mem, 4, &devs).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt_at = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table(&mem, xsdt_at);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(&xsdt), 0);
        let mut sigs = vec![];
        for e in xsdt[36..].chunks(8) {
            let t = table(&mem, u64::from_le_bytes(e.try_into().unwrap()));
            assert_eq!(sum(&t), 0, "checksum of {:?}", &t[..4]);
            sigs.push(t[..4].to_vec());
            if &t[..4] == b"APIC" {
                // 4 local APICs (8 bytes), one IOAPIC (12), one override (10).
                assert_eq!(t.len(), 44 + 4 * 8 + 12 + 10);
            }
            if &t[..4] == b"FACP" {
                let dsdt_at = u64::from_le_bytes(t[140..148].try_into().unwrap());
                let dsdt = table(&mem, dsdt_at);
                assert_eq!(&dsdt[..4], b"DSDT");
                assert_eq!(sum(&dsdt), 0);
                assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
                assert_eq!(dsdt.windows(8).filter(|w| w == b"LNRO0005").count(), 2);
                assert!(dsdt.windows(4).any(|w| w == b"VR01"));
                // Memory32Fixed of the second device carries its base.
                assert!(dsdt.windows(4).any(|w| w == 0xd000_1000u32.to_le_bytes()));
                assert_eq!(
                    u32::from_le_bytes(t[56..60].try_into().unwrap()),
                    PM1A_EVT_PORT as u32
                );
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }
}
