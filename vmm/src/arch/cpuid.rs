//! The CPUID a vCPU reports: what KVM supports, with the topology of this VM.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// KVM's paravirtual clock: the old and the new MSRs, and its stable bit.
const EAX_KVM_CLOCK: u32 = 1 << 0 | 1 << 3 | 1 << 24;

/// Adjusts KVM's supported CPUID for vCPU `id` of `count`: APIC IDs, the
/// logical processor count and the hypervisor bit. Without `pv_clock` the
/// vCPU does not offer KVM's paravirtual clock (kvmclock).
///
/// A VM started in its firmware does not offer it: SeaBIOS turns kvmclock on
/// at an address of its own below 1 MiB to learn the TSC's rate and never
/// turns it off, and with that clock on, the host's kernel (Debian 12's
/// 6.1, under an emulated AMD-V) panicked with "corrupted stack end
/// detected inside scheduler" in the VMM's vCPU thread within seconds of
/// power-on, every time, on a host with other load (the demo cluster, the
/// appliance); with it hidden, never. An installed Linux then keeps time
/// with the TSC or the ACPI PM timer, as on a PC.
pub fn patch(cpuid: &mut CpuId, id: u8, count: u8, pv_clock: bool) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_KVM_FEATURES if !pv_clock => e.eax &= !EAX_KVM_CLOCK,
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                e.edx = u32::from(id);
                // Every vCPU is one core of one socket: SMT level has one
                // thread per core, core level holds all vCPUs.
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 0x100;
                    }
                    1 => {
                        // Shift wide enough to hold every APIC ID.
                        let shift = u32::BITS - u32::from(count.max(1) - 1).leading_zeros();
                        e.eax = shift;
                        e.ebx = u32::from(count);
                        e.ecx = 0x201;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_count_land_in_leaf_1_and_0xb() {
        let mut c = CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ])
        .unwrap();
        patch(&mut c, 3, 4, true);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 3);
        assert_eq!((s[0].ebx >> 16) & 0xff, 4);
        assert_eq!(s[0].ebx & 0xffff, 0x0800);
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!(s[1].edx, 3);
        assert_eq!(s[1].eax, 2);
        assert_eq!(s[1].ebx, 4);
    }

    #[test]
    fn kvmclock_is_offered_only_when_asked() {
        let leaf = kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            // kvmclock (old and new MSR), async page faults, stable bit.
            eax: 1 << 0 | 1 << 3 | 1 << 4 | 1 << 24,
            ..Default::default()
        };
        let mut with = CpuId::from_entries(&[leaf]).unwrap();
        patch(&mut with, 0, 1, true);
        assert_eq!(with.as_slice()[0].eax, leaf.eax);
        let mut without = CpuId::from_entries(&[leaf]).unwrap();
        patch(&mut without, 0, 1, false);
        assert_eq!(without.as_slice()[0].eax, 1 << 4, "only kvmclock's bits go");
    }
}
