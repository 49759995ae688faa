//! Initial vCPU state for the two entry protocols: the Linux 64-bit boot
//! protocol (long mode, paging on, RSI = zero page) and PVH (32-bit protected
//! mode, paging off, EBX = start info).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::memory::GuestMemory;

/// How the guest is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode at `entry`, RSI = boot_params.
    Linux64 {
        /// Guest-physical entry point.
        entry: u64,
    },
    /// 32-bit protected mode at `entry`, EBX = hvm_start_info.
    Pvh {
        /// Guest-physical entry point.
        entry: u64,
    },
}

/// Errors while setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM ioctl failed.
    #[error("cannot set vCPU {what}: {err}")]
    Kvm {
        /// Which piece of state.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {0} into guest memory")]
    Memory(&'static str),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NE: u64 = 0x20;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from flags, base and limit (Intel SDM vol. 3, 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = (((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000)) as u64;
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// Writes the GDT (and an empty IDT) and fills the segment part of `sregs`.
fn setup_segments(
    mem: &GuestMemory,
    sregs: &mut kvm_sregs,
    long_mode: bool,
) -> Result<(), RegsError> {
    let code = if long_mode {
        gdt_entry(0xa09b, 0, 0xfffff) // 64-bit code, present, ring 0
    } else {
        gdt_entry(0xc09b, 0, 0xfffff) // 32-bit code, 4 GiB flat
    };
    let gdt: [u64; BOOT_GDT_MAX] = [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data, 4 GiB flat
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(|_| RegsError::Memory("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::Memory("the IDT"))?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code_seg = segment_from_gdt(gdt[1], 1);
    let data_seg = segment_from_gdt(gdt[2], 2);
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = segment_from_gdt(gdt[3], 3);
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB pages, so the 64-bit entry can
/// reach the kernel, its boot data and the 32-bit MMIO hole.
fn setup_page_tables(mem: &GuestMemory) -> Result<u64, RegsError> {
    let err = |_| RegsError::Memory("the boot page tables");
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(err)?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | 0x03, GuestAddress(PDPTE_START + pd * 8))
            .map_err(err)?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            // Present, writable, 2 MiB page.
            mem.write_obj(phys | 0x83, GuestAddress(pd_addr + i * 8))
                .map_err(err)?;
        }
    }
    Ok(PML4_START)
}

/// Sets segment, control and paging registers for `mode`.
pub fn setup_sregs(mem: &GuestMemory, vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let kvm = |what| move |err| RegsError::Kvm { what, err };
    let mut sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    match mode {
        EntryMode::Linux64 { .. } => {
            setup_segments(mem, &mut sregs, true)?;
            sregs.cr3 = setup_page_tables(mem)?;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            setup_segments(mem, &mut sregs, false)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.cr3 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))
}

/// Sets general-purpose registers: entry point, stack and the boot-data pointer.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let regs = match mode {
        EntryMode::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryMode::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(|err| RegsError::Kvm {
        what: "registers",
        err,
    })
}

/// Sets the FPU to its power-on state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|err| RegsError::Kvm { what: "FPU", err })
}

/// Sets the model-specific registers a boot expects.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    const MSR_IA32_TSC: u32 = 0x10;
    let entries = [
        kvm_msr_entry {
            index: MSR_IA32_MISC_ENABLE,
            data: MISC_ENABLE_FAST_STRING,
            ..Default::default()
        },
        kvm_msr_entry {
            index: MSR_IA32_TSC,
            data: 0,
            ..Default::default()
        },
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Memory("the MSR list"))?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(|err| RegsError::Kvm { what: "MSRs", err })?;
    if n != entries.len() {
        tracing::warn!(
            set = n,
            wanted = entries.len(),
            "KVM accepted only some MSRs"
        );
    }
    Ok(())
}

/// Programs LINT0 as ExtINT and LINT1 as NMI, as firmware leaves a PC, so
/// the legacy PIC's interrupts reach the boot CPU.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let mut lapic = vcpu.get_lapic().map_err(|err| RegsError::Kvm {
        what: "local APIC",
        err,
    })?;
    let get = |regs: &[i8], off: usize| -> u32 {
        u32::from_le_bytes([
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ])
    };
    let set = |regs: &mut [i8], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as i8;
        }
    };
    let delivery = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let v0 = get(&lapic.regs, APIC_LVT0);
    set(&mut lapic.regs, APIC_LVT0, delivery(v0, APIC_MODE_EXTINT));
    let v1 = get(&lapic.regs, APIC_LVT1);
    set(&mut lapic.regs, APIC_LVT1, delivery(v1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(|err| RegsError::Kvm {
        what: "local APIC",
        err,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_back() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code64.l, code64.db, code64.g, code64.present),
            (1, 0, 1, 1)
        );
        assert_eq!(code64.selector, 8);
        assert_eq!(code64.type_, 0xb);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.limit, 0xffff_ffff);
        assert_eq!((data.db, data.l, data.type_), (1, 0, 3));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let (mem, _f) = crate::memory::create(64).unwrap();
        setup_page_tables(&mem).unwrap();
        let pdpte: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pdpte & !0xfff, PDPTE_START);
        let pd3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        let last: u64 = mem
            .read_obj(GuestAddress((pd3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
        assert_eq!(last & 0x83, 0x83);
    }
}
