//! A real KVM VM counts in a register and reports each count on an I/O port; its state is
//! taken, carried as JSON, and put into a second VM with a copy of its memory: the second goes
//! on counting from where the first stopped, with the MSR and local APIC register the test set.

use super::*;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VcpuExit;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion as _,
};

const CODE: u64 = 0x1000;
/// inc eax; out 0x10, al; jmp back (16-bit real mode).
const COUNT_LOOP: [u8; 6] = [0x66, 0x40, 0xe6, 0x10, 0xeb, 0xfa];
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const APIC_TPR: usize = 0x80;

struct TestVm {
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap<()>,
}

fn vm(kvm: &Kvm) -> TestVm {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(Default::default()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let host = mem
        .iter()
        .next()
        .unwrap()
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .unwrap();
    // SAFETY: `mem` lives as long as the VM in TestVm.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: 0x10000,
            userspace_addr: host as u64,
            flags: 0,
        })
    }
    .unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    TestVm { vm, vcpu, mem }
}

/// Runs until the next count; the count.
fn next_count(vcpu: &mut VcpuFd) -> u8 {
    for _ in 0..1000 {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x10, data) => return data[0],
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) | VcpuExit::Intr => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
    panic!("no count in 1000 exits")
}

#[test]
fn a_vcpu_s_state_carried_to_another_vm_goes_on_where_it_stopped() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("\n!!!! SKIPPED: no /dev/kvm on this machine !!!!\n");
        return;
    }
    let kvm = Kvm::new().unwrap();
    let mut a = vm(&kvm);
    a.mem.write_slice(&COUNT_LOOP, GuestAddress(CODE)).unwrap();
    let mut sregs = a.vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    a.vcpu.set_sregs(&sregs).unwrap();
    let mut regs = a.vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rax = 0;
    regs.rflags = 2;
    a.vcpu.set_regs(&regs).unwrap();
    write_msrs(&a.vcpu, &[(MSR_KERNEL_GS_BASE, 0x1234_5678_9abc)], "vCPU 0").unwrap();
    let mut lapic = a.vcpu.get_lapic().unwrap();
    lapic.regs[APIC_TPR] = 0x20;
    a.vcpu.set_lapic(&lapic).unwrap();
    for want in 1..=10u8 {
        assert_eq!(next_count(&mut a.vcpu), want);
    }

    let msrs = msr_list(&kvm).unwrap();
    let vcpu_state = VcpuState::save(&a.vcpu, 0, &msrs).unwrap();
    let vm_state = VmState::save(&a.vm).unwrap();
    assert!(
        vcpu_state.msrs.len() > 10,
        "only {} MSRs read of {} listed",
        vcpu_state.msrs.len(),
        msrs.len()
    );
    // Carried as the migration stream carries it.
    let vcpu_state: VcpuState =
        serde_json::from_slice(&serde_json::to_vec(&vcpu_state).unwrap()).unwrap();
    let vm_state: VmState =
        serde_json::from_slice(&serde_json::to_vec(&vm_state).unwrap()).unwrap();
    let mut ram = vec![0u8; 0x10000];
    a.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
    drop(a);

    let mut b = vm(&kvm);
    b.mem.write_slice(&ram, GuestAddress(0)).unwrap();
    vm_state.restore(&b.vm).unwrap();
    vcpu_state.restore(&b.vcpu, 0).unwrap();
    assert_eq!(
        next_count(&mut b.vcpu),
        11,
        "the count starts over in the new VM"
    );
    assert_eq!(next_count(&mut b.vcpu), 12);
    let got = read_msrs(&b.vcpu, &[MSR_KERNEL_GS_BASE], "vCPU 0").unwrap();
    assert_eq!(got, vec![(MSR_KERNEL_GS_BASE, 0x1234_5678_9abc)]);
    assert_eq!(b.vcpu.get_lapic().unwrap().regs[APIC_TPR], 0x20);
}
