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
/// FADT IA-PC boot architecture flag: there is no CMOS real-time clock (ACPI 5.0). Linux then
/// registers no `rtc_cmos` device; without the flag its driver probed ports 0x70-0x71, found
/// nothing, and gave up after 6 s of a direct kernel boot in the test host (QEMU's microvm
/// machine pays the same).
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

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

/// What the tables describe.
pub struct Platform<'a> {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// virtio-mmio transports (direct kernel boot).
    pub mmio: &'a [MmioDevice],
    /// The PCI root bridge's 32-bit memory window, first and last byte
    /// (firmware boot); `None` for a VM without PCI.
    pub pci_window: Option<(u32, u32)>,
}

/// GSI of a PCI slot's INTx pin (0 = INTA): 16-23, swizzled by slot, as the
/// DSDT's `_PRT` tells the guest.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    16 + (u32::from(slot) + u32::from(pin)) % 8
}

/// A device of `hid` with resources `crs`, named `name`.
fn device(name: &str, hid: &str, crs: &[&dyn Aml]) -> Vec<u8> {
    let id = aml::EISAName::new(hid);
    let rt = aml::ResourceTemplate::new(crs.to_vec());
    let (h, c) = (
        aml::Name::new("_HID".into(), &id),
        aml::Name::new("_CRS".into(), &rt),
    );
    bytes(&aml::Device::new(name.into(), vec![&h, &c]))
}

/// The PC's legacy devices, so firmware and OS find them through ACPI
/// (SeaBIOS initialises the keyboard only if the DSDT lists it).
fn isa_devices() -> Vec<u8> {
    let mut v = Vec::new();
    let edge = |irq: u32| aml::Interrupt::new(true, true, false, false, irq);
    v.extend(device(
        "KBD_",
        "PNP0303",
        &[
            &aml::IO::new(0x60, 0x60, 1, 1),
            &aml::IO::new(0x64, 0x64, 1, 1),
            &edge(I8042_IRQ),
        ],
    ));
    v.extend(device("MOU_", "PNP0F13", &[&edge(MOUSE_IRQ)]));
    v.extend(device(
        "COM1",
        "PNP0501",
        &[
            &aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8),
            &edge(SERIAL_IRQ),
        ],
    ));
    v.extend(device(
        "RTC_",
        "PNP0B00",
        &[&aml::IO::new(0x70, 0x70, 1, 2), &edge(RTC_IRQ)],
    ));
    v
}

/// The PCI root bridge: its bus, I/O and memory windows and the routing of
/// every slot's INTx pins to GSIs.
fn pci_root(window: (u32, u32)) -> Vec<u8> {
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0xff);
    let cfg = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::<u16>::new_io(0, 0xcf7, None);
    let io_high = aml::AddressSpace::<u16>::new_io(0xd00, 0xffff, None);
    let vga = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::Cacheable,
        true,
        0xa_0000,
        0xb_ffff,
        None,
    );
    let mem = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        window.0,
        window.1,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg, &io_low, &io_high, &vga, &mem]);
    let entries: Vec<(u32, u8, u32)> = (1..32u8)
        .flat_map(|slot| {
            (0..4u8).map(move |pin| (u32::from(slot) << 16 | 0xffff, pin, pci_intx_gsi(slot, pin)))
        })
        .collect();
    let packages: Vec<aml::Package> = entries
        .iter()
        .map(|(addr, pin, gsi)| aml::Package::new(vec![addr, pin, &0u8, gsi]))
        .collect();
    let prt = aml::Package::new(packages.iter().map(|p| p as &dyn Aml).collect());
    let hid = aml::EISAName::new("PNP0A03");
    let names = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_ADR".into(), &0u8),
        aml::Name::new("_UID".into(), &0u8),
        aml::Name::new("_CRS".into(), &crs),
        aml::Name::new("_PRT".into(), &prt),
    ];
    bytes(&aml::Device::new(
        "PCI0".into(),
        names.iter().map(|n| n as &dyn Aml).collect(),
    ))
}

/// The DSDT: the S5 sleep type; with PCI, the root bridge and the legacy
/// devices; and one `LNRO0005` device per virtio-mmio transport, which is
/// how kernels without command-line virtio-mmio support (Debian's) find them.
fn dsdt(p: &Platform) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    let s5 = aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&(S5_SLP_TYP as u8), &(S5_SLP_TYP as u8), &0u8, &0u8]),
    );
    dsdt.append_slice(&bytes(&s5));
    let devices = p.mmio;
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
    let mut sb: Vec<u8> = Vec::new();
    for d in &devs {
        sb.extend(bytes(d));
    }
    if let Some(window) = p.pci_window {
        sb.extend(pci_root(window));
        sb.extend(isa_devices());
    }
    if !sb.is_empty() {
        let raw = RawAml(sb);
        let scope = aml::Scope::new("\\_SB_".into(), vec![&raw]);
        dsdt.append_slice(&bytes(&scope));
    }
    dsdt
}

/// AML bytes already encoded.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The tables (XSDT, FADT, DSDT, MADT) laid out from an address, and where
/// in them the pointers and the tables are, for firmware that moves them.
pub struct Tables {
    /// The RSDP, pointing at the XSDT.
    pub rsdp: Vec<u8>,
    /// The tables, back to back.
    pub blob: Vec<u8>,
    /// Offsets in `blob` of 8-byte pointers to other places in `blob`.
    pub pointers: Vec<u32>,
    /// Offset and length of each table in `blob`.
    pub tables: Vec<(u32, u32)>,
}

/// Offset of the XSDT pointer in the RSDP.
const RSDP_XSDT: u32 = 24;
/// Offset of the 64-bit DSDT pointer in the FADT.
const FADT_X_DSDT: u32 = 140;

/// Builds every table for `p`, the tables' blob starting at `base`.
pub fn build(p: &Platform, base: u64) -> Tables {
    let dsdt = dsdt(p);
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..p.vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(p.vcpus, IOAPIC_START as u32, 0));
    // The SCI is level-triggered, active high, as the PM1 device drives it.
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: SCI_IRQ as u8,
        gsi: SCI_IRQ,
        flags: 0b1101,
    });

    // Lay out: XSDT, FADT, DSDT, MADT; each 16-byte aligned.
    let align = |x: u64| (x + 15) & !15;
    let xsdt_at = 0u64;
    let xsdt_len = 36 + 8 * 2;
    let fadt_at = align(xsdt_at + xsdt_len);
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;
    let dsdt_at = align(fadt_at + fadt_len);
    let madt_at = align(dsdt_at + dsdt.len() as u64);
    let madt_bytes = bytes(&madt);

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE, 1).dsdt_64(base + dsdt_at);
    fadt.sci_int = (SCI_IRQ as u16).into();
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    fadt.pm_tmr_blk = u32::from(PM_TMR_PORT).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1_cnt_len = 2;
    fadt.pm_tmr_len = 4;
    // The legacy devices, the RTC among them, come with PCI (firmware boot).
    fadt.iapc_boot_arch = if p.pci_window.is_some() {
        IAPC_BOOT_ARCH_8042
    } else {
        IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_NO_CMOS_RTC
    }
    .into();
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
    xsdt.add_entry(base + fadt_at);
    xsdt.add_entry(base + madt_at);

    let mut blob = vec![0u8; (madt_at as usize) + madt_bytes.len()];
    let mut put = |data: &[u8], at: u64| {
        blob[at as usize..at as usize + data.len()].copy_from_slice(data);
        (at as u32, data.len() as u32)
    };
    let tables = vec![
        put(&bytes(&xsdt), xsdt_at),
        put(&bytes(&fadt), fadt_at),
        put(dsdt.as_slice(), dsdt_at),
        put(&madt_bytes, madt_at),
    ];
    Tables {
        rsdp: bytes(&Rsdp::new(OEM_ID, base + xsdt_at)),
        blob,
        pointers: vec![36, 44, fadt_at as u32 + FADT_X_DSDT],
        tables,
    }
}

/// Builds every table for a VM with `vcpus` CPUs and `devices`, and writes
/// them at [`ACPI_START`]. Returns the RSDP's guest address.
pub fn write_tables(
    mem: &GuestMemory,
    vcpus: u8,
    devices: &[MmioDevice],
) -> Result<GuestAddress, AcpiError> {
    let p = Platform {
        vcpus,
        mmio: devices,
        pci_window: None,
    };
    let rsdp_at = ACPI_START;
    let base = (rsdp_at + Rsdp::len() as u64 + 15) & !15;
    let t = build(&p, base);
    let end = base + t.blob.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }
    let write = |data: &[u8], at: u64| {
        mem.write_slice(data, GuestAddress(at))
            .map_err(|_| AcpiError::Memory)
    };
    write(&t.rsdp, rsdp_at)?;
    write(&t.blob, base)?;
    Ok(GuestAddress(rsdp_at))
}

/// fw_cfg file names of the tables and of the script that places them.
pub mod files {
    /// The RSDP.
    pub const RSDP: &str = "etc/acpi/rsdp";
    /// The tables.
    pub const TABLES: &str = "etc/acpi/tables";
    /// The loader script.
    pub const LOADER: &str = "etc/table-loader";
}

/// The tables for firmware that places them itself (SeaBIOS, OVMF): the
/// RSDP, the tables built from address zero, and the loader script telling
/// the firmware to allocate both, add their addresses to every pointer and
/// fix the checksums. Returns (name, contents) for each fw_cfg file.
pub fn loader_files(p: &Platform) -> Vec<(&'static str, Vec<u8>)> {
    let mut t = build(p, 0);
    // The checksums start at zero: OVMF writes the range's checksum over the field (the
    // field counted in the sum), SeaBIOS subtracts the sum from it; both agree only then.
    for &(at, _) in &t.tables {
        t.blob[at as usize + 9] = 0;
    }
    t.rsdp[8] = 0;
    t.rsdp[32] = 0;
    let name = |n: &str| {
        let mut b = [0u8; 56];
        b[..n.len()].copy_from_slice(n.as_bytes());
        b
    };
    let mut script = Vec::new();
    let mut command = |words: Vec<u8>| {
        let mut c = words;
        c.resize(128, 0);
        script.extend_from_slice(&c);
    };
    const ALLOCATE: u32 = 1;
    const ADD_POINTER: u32 = 2;
    const ADD_CHECKSUM: u32 = 3;
    const ZONE_HIGH: u8 = 1;
    const ZONE_FSEG: u8 = 2;
    let allocate = |file: &str, align: u32, zone: u8| {
        let mut c = ALLOCATE.to_le_bytes().to_vec();
        c.extend_from_slice(&name(file));
        c.extend_from_slice(&align.to_le_bytes());
        c.push(zone);
        c
    };
    let pointer = |dest: &str, src: &str, offset: u32, size: u8| {
        let mut c = ADD_POINTER.to_le_bytes().to_vec();
        c.extend_from_slice(&name(dest));
        c.extend_from_slice(&name(src));
        c.extend_from_slice(&offset.to_le_bytes());
        c.push(size);
        c
    };
    let checksum = |file: &str, offset: u32, start: u32, len: u32| {
        let mut c = ADD_CHECKSUM.to_le_bytes().to_vec();
        c.extend_from_slice(&name(file));
        for v in [offset, start, len] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        c
    };
    command(allocate(files::RSDP, 16, ZONE_FSEG));
    command(allocate(files::TABLES, 64, ZONE_HIGH));
    command(pointer(files::RSDP, files::TABLES, RSDP_XSDT, 8));
    for &at in &t.pointers {
        command(pointer(files::TABLES, files::TABLES, at, 8));
    }
    for &(at, len) in &t.tables {
        command(checksum(files::TABLES, at + 9, at, len));
    }
    command(checksum(files::RSDP, 8, 0, 20));
    command(checksum(files::RSDP, 32, 0, t.rsdp.len() as u32));
    vec![
        (files::RSDP, t.rsdp),
        (files::TABLES, t.blob),
        (files::LOADER, script),
    ]
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
                // IA-PC boot flags: an 8042, and no CMOS RTC without the PC's legacy devices.
                assert_eq!(
                    u16::from_le_bytes(t[109..111].try_into().unwrap()),
                    IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_NO_CMOS_RTC
                );
            }
        }
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
    }

    /// How a firmware carries out ADD_CHECKSUM.
    #[derive(Clone, Copy)]
    enum Checksum {
        /// SeaBIOS: subtracts the range's sum from the field.
        Subtract,
        /// OVMF: writes the value that makes the range sum to zero, the field included.
        Overwrite,
    }

    /// Runs the loader script the way firmware does, with the RSDP placed at
    /// `rsdp_at` and the tables at `tables_at`.
    fn run_loader(
        files: &[(&str, Vec<u8>)],
        rsdp_at: u64,
        tables_at: u64,
        how: Checksum,
    ) -> (Vec<u8>, Vec<u8>) {
        let get = |n: &str| files.iter().find(|f| f.0 == n).unwrap().1.clone();
        let (mut rsdp, mut tables) = (get(files::RSDP), get(files::TABLES));
        let script = get(files::LOADER);
        let cname = |b: &[u8]| {
            String::from_utf8(b.iter().take_while(|c| **c != 0).copied().collect()).unwrap()
        };
        for c in script.chunks(128) {
            let cmd = u32::from_le_bytes(c[..4].try_into().unwrap());
            let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
            match cmd {
                1 => {}
                2 => {
                    let (dest, src) = (cname(&c[4..60]), cname(&c[60..116]));
                    let (off, size) = (u32_at(116) as usize, c[120] as usize);
                    assert_eq!(size, 8);
                    let base = if src == files::RSDP {
                        rsdp_at
                    } else {
                        tables_at
                    };
                    let buf = if dest == files::RSDP {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let v = u64::from_le_bytes(buf[off..off + 8].try_into().unwrap()) + base;
                    buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
                }
                3 => {
                    let file = cname(&c[4..60]);
                    let (off, start, len) = (
                        u32_at(60) as usize,
                        u32_at(64) as usize,
                        u32_at(68) as usize,
                    );
                    let buf = if file == files::RSDP {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let s = sum(&buf[start..start + len]);
                    buf[off] = match how {
                        Checksum::Subtract => buf[off].wrapping_sub(s),
                        Checksum::Overwrite => 0u8.wrapping_sub(s),
                    };
                }
                other => panic!("unknown loader command {other}"),
            }
        }
        (rsdp, tables)
    }

    #[test]
    fn firmware_places_the_tables_with_the_loader_script() {
        let p = Platform {
            vcpus: 2,
            mmio: &[],
            pci_window: Some((0xc000_0000, 0xfebf_ffff)),
        };
        let files = loader_files(&p);
        let tables_at = 0x7ffe_0000u64;
        // The checksums start at zero, so both firmwares' ways of filling them agree.
        let tables0 = &files.iter().find(|f| f.0 == files::TABLES).unwrap().1;
        assert_eq!(tables0[9], 0, "the XSDT's checksum before the loader");
        for how in [Checksum::Subtract, Checksum::Overwrite] {
            let (rsdp, tables) = run_loader(&files, 0xf5000, tables_at, how);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sum(&rsdp[..20]), 0);
            assert_eq!(sum(&rsdp), 0);
            let at = |addr: u64| (addr - tables_at) as usize;
            let table = |addr: u64| {
                let o = at(addr);
                let len = u32::from_le_bytes(tables[o + 4..o + 8].try_into().unwrap()) as usize;
                tables[o..o + len].to_vec()
            };
            let xsdt = table(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
            assert_eq!(&xsdt[..4], b"XSDT");
            assert_eq!(sum(&xsdt), 0);
            let fadt = table(u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
            assert_eq!(&fadt[..4], b"FACP");
            assert_eq!(sum(&fadt), 0);
            // The RTC is there (RTC_ below): the boot flags do not deny it.
            assert_eq!(
                u16::from_le_bytes(fadt[109..111].try_into().unwrap()),
                IAPC_BOOT_ARCH_8042
            );
            let madt = table(u64::from_le_bytes(xsdt[44..52].try_into().unwrap()));
            assert_eq!(&madt[..4], b"APIC");
            assert_eq!(sum(&madt), 0);
            let dsdt = table(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
            assert_eq!(&dsdt[..4], b"DSDT");
            assert_eq!(sum(&dsdt), 0);
            for name in [
                &b"PCI0"[..],
                b"_PRT",
                b"_CRS",
                b"KBD_",
                b"MOU_",
                b"COM1",
                b"RTC_",
                b"_S5_",
            ] {
                assert!(
                    dsdt.windows(name.len()).any(|w| w == name),
                    "{}",
                    String::from_utf8_lossy(name)
                );
            }
            // PNP0A03 as an EISA ID, and the window's first byte.
            assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x0a, 0x03]));
            assert!(dsdt.windows(4).any(|w| w == 0xc000_0000u32.to_le_bytes()));
        }
        // Slot 3's INTB is GSI 20.
        assert_eq!(pci_intx_gsi(3, 1), 20);
    }
}
