//! The state KVM holds for a paused VM, taken out and put back (issue 13, live migration: the
//! vCPUs' registers, MSRs, local APIC, FPU and XSAVE state, pending events; the in-kernel PIC,
//! IOAPIC and PIT; the guest's clock). Device models and guest RAM travel separately.
//!
//! Taken only while every vCPU is parked outside KVM_RUN; put back into vCPUs made from the
//! same configuration (CPUID first), before they first run. The order follows what KVM needs:
//! on the way out the MP state first (it may flush pending events into the other state), on
//! the way in the special registers before the MSRs and the local APIC, the events last.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// What failed, on which part of the state.
#[derive(Debug, thiserror::Error)]
#[error("{what} of {of}: {err}")]
pub struct SnapshotError {
    /// The operation ("reading the local APIC").
    pub what: &'static str,
    /// Whose ("vCPU 1", "the VM").
    pub of: String,
    /// KVM's answer.
    #[source]
    pub err: kvm_ioctls::Error,
}

fn failed<'a>(
    what: &'static str,
    of: &'a str,
) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError + 'a {
    move |err| SnapshotError {
        what,
        of: of.to_string(),
        err,
    }
}

/// One vCPU's state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// Running, halted, waiting for its start-up IPI.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the 4 KiB legacy XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lets the VMM read, by index (the TSC among them).
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs to carry: every one KVM lists as readable.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, SnapshotError> {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .map_err(failed("listing the MSRs", "KVM"))
}

/// Reads `indices` on `vcpu`: those KVM refuses (some listed MSRs exist only on some CPUs)
/// are left out.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32], of: &str) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut i = 0;
    while i < indices.len() {
        let batch = &indices[i..(i + 256).min(indices.len())];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).expect("at most 256 MSRs fit");
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(failed("reading the MSRs", of))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // KVM stops at the first it refuses: skip that one.
        i += if n < batch.len() { n + 1 } else { n };
    }
    Ok(out)
}

/// Writes `msrs` on `vcpu`; how many KVM refused.
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)], of: &str) -> Result<usize, SnapshotError> {
    let mut refused = 0;
    let mut i = 0;
    while i < msrs.len() {
        let batch = &msrs[i..(i + 256).min(msrs.len())];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = Msrs::from_entries(&entries).expect("at most 256 MSRs fit");
        let n = vcpu
            .set_msrs(&list)
            .map_err(failed("writing the MSRs", of))?;
        if n < batch.len() {
            refused += 1;
            tracing::debug!(
                vcpu = of,
                msr = format_args!("{:#x}", batch[n].0),
                "KVM refused an MSR"
            );
            i += n + 1;
        } else {
            i += n;
        }
    }
    Ok(refused)
}

impl VcpuState {
    /// Takes the state of `vcpu` (number `id`), parked outside KVM_RUN.
    pub fn save(vcpu: &VcpuFd, id: usize, msrs: &[u32]) -> Result<VcpuState, SnapshotError> {
        let of = format!("vCPU {id}");
        let of = of.as_str();
        Ok(VcpuState {
            mp_state: vcpu
                .get_mp_state()
                .map_err(failed("reading the MP state", of))?,
            regs: vcpu
                .get_regs()
                .map_err(failed("reading the registers", of))?,
            sregs: vcpu
                .get_sregs()
                .map_err(failed("reading the special registers", of))?,
            xsave: vcpu
                .get_xsave()
                .map_err(failed("reading the XSAVE area", of))?,
            xcrs: vcpu.get_xcrs().map_err(failed("reading the XCRs", of))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(failed("reading the debug registers", of))?,
            lapic: vcpu
                .get_lapic()
                .map_err(failed("reading the local APIC", of))?,
            msrs: read_msrs(vcpu, msrs, of)?,
            events: vcpu
                .get_vcpu_events()
                .map_err(failed("reading the pending events", of))?,
        })
    }

    /// Puts this state into `vcpu` (number `id`), made with the same CPUID, before it runs.
    /// MSRs the new vCPU's KVM refuses are counted in a warning, not an error: which ones KVM
    /// lists differs between kernels, and those it lists but refuses hold nothing a guest set.
    pub fn restore(&self, vcpu: &VcpuFd, id: usize) -> Result<(), SnapshotError> {
        let of = format!("vCPU {id}");
        let of = of.as_str();
        vcpu.set_mp_state(self.mp_state)
            .map_err(failed("writing the MP state", of))?;
        vcpu.set_regs(&self.regs)
            .map_err(failed("writing the registers", of))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(failed("writing the special registers", of))?;
        // SAFETY: the area was read by KVM_GET_XSAVE from a vCPU of the same CPUID and is the
        // legacy 4 KiB size, which KVM_SET_XSAVE reads whole.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(failed("writing the XSAVE area", of))?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(failed("writing the XCRs", of))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(failed("writing the debug registers", of))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(failed("writing the local APIC", of))?;
        let refused = write_msrs(vcpu, &self.msrs, of)?;
        if refused > 0 {
            tracing::warn!(
                vcpu = id,
                refused,
                "KVM refused some MSRs of the saved state"
            );
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(failed("writing the pending events", of))?;
        Ok(())
    }
}

/// The VM-wide state KVM holds: the in-kernel interrupt controllers, the PIT, the clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master PIC.
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT's three channels.
    pub pit: kvm_pit_state2,
    /// The guest's clock (kvmclock's base).
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn chip(vm: &VmFd, id: u32, what: &'static str) -> Result<kvm_irqchip, SnapshotError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(failed(what, "the VM"))?;
    Ok(c)
}

impl VmState {
    /// Takes the VM's state, every vCPU parked.
    pub fn save(vm: &VmFd) -> Result<VmState, SnapshotError> {
        Ok(VmState {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER, "reading the master PIC")?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE, "reading the slave PIC")?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC, "reading the IOAPIC")?,
            pit: vm.get_pit2().map_err(failed("reading the PIT", "the VM"))?,
            clock: vm
                .get_clock()
                .map_err(failed("reading the clock", "the VM"))?,
        })
    }

    /// Puts this state into `vm` (its irqchip and PIT made), before its vCPUs run.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        for (c, what) in [
            (&self.pic_master, "writing the master PIC"),
            (&self.pic_slave, "writing the slave PIC"),
            (&self.ioapic, "writing the IOAPIC"),
        ] {
            vm.set_irqchip(c).map_err(failed(what, "the VM"))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(failed("writing the PIT", "the VM"))?;
        // KVM takes only the clock's value back; the flags it reported describe its host.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(failed("writing the clock", "the VM"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
