//! A real KVM VM keeps counting and writing its count over a 64 KiB window of its memory while
//! its RAM is pre-copied to another VM's memory through a socket: the copy takes rounds, the
//! last pages and the state follow the pause, the two memories are then identical, and the
//! second VM counts on from where the first stopped.

use super::*;
use crate::snapshot::msr_list;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

const RAM: u64 = 16 << 20;
const CODE: u64 = 0x1000;
/// inc eax; mov [bx], eax (DS = 0x2000); add bx, 0x110; out 0x10, al; jmp back.
const DIRTYING_LOOP: [u8; 13] = [
    0x66, 0x40, 0x66, 0x89, 0x07, 0x81, 0xc3, 0x10, 0x01, 0xe6, 0x10, 0xeb, 0xf3,
];

fn vm(kvm: &Kvm) -> (VmFd, VcpuFd, GuestMemoryMmap<()>) {
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.create_irq_chip().unwrap();
    vm.create_pit2(Default::default()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let host = mem
        .iter()
        .next()
        .unwrap()
        .get_host_address(MemoryRegionAddress(0))
        .unwrap();
    // SAFETY: `mem` outlives the VM in every test below.
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: RAM,
            userspace_addr: host as u64,
            flags: 0,
        })
    }
    .unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    (vm, vcpu, mem)
}

/// Runs until the next count; the count's low byte.
fn next_count(vcpu: &mut VcpuFd) -> u8 {
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x10, data) => return data[0],
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) | VcpuExit::Intr => {}
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

#[test]
fn a_running_guest_s_ram_is_precopied_in_rounds_and_the_copy_goes_on_counting() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("\n!!!! SKIPPED: no /dev/kvm on this machine !!!!\n");
        return;
    }
    let kvm = Kvm::new().unwrap();
    let (src_vm, mut vcpu, src_mem) = vm(&kvm);
    src_mem
        .write_slice(&DIRTYING_LOOP, GuestAddress(CODE))
        .unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0x20000;
    sregs.ds.selector = 0x2000;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    log_dirty_pages(&src_vm, &src_mem, true).unwrap();

    // The guest runs on its own thread until told to park; the low byte of its last count.
    let park = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU32::new(0));
    let runner = {
        let (park, last) = (park.clone(), last.clone());
        std::thread::spawn(move || {
            while !park.load(Ordering::SeqCst) {
                last.store(u32::from(next_count(&mut vcpu)), Ordering::SeqCst);
            }
            vcpu
        })
    };
    // Let it write a while before the copy starts.
    while last.load(Ordering::SeqCst) < 50 {
        std::thread::yield_now();
    }

    let (mut tx, mut rx) = UnixStream::pair().unwrap();
    let (dst_vm, mut dst_vcpu, dst_mem) = vm(&kvm);
    let target = {
        let dst_mem = dst_mem.clone();
        std::thread::spawn(move || receive(&mut rx, &dst_mem, 1, None))
    };
    write_message(
        &mut tx,
        &Message::Hello {
            memory_bytes: RAM,
            vcpus: 1,
        },
    )
    .unwrap();
    let mut rounds = Vec::new();
    // A budget no round meets while the guest dirties memory; between rounds the guest is let
    // count on (20 counts: two pages or more), so each round after the first has pages to send.
    let (converged, unsent) = precopy(
        &mut tx,
        &KvmLog(&src_vm),
        &src_mem,
        Duration::ZERO,
        4,
        |p| {
            if !p.round_done {
                return true;
            }
            rounds.push(*p);
            let from = last.load(Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while last.load(Ordering::SeqCst).wrapping_sub(from) % 256 < 20 {
                assert!(Instant::now() < deadline, "the guest stopped counting");
                std::thread::yield_now();
            }
            true
        },
    )
    .unwrap();
    assert!(!rounds.is_empty() && rounds.len() <= 4, "{rounds:?}");
    assert!(rounds[0].transferred_bytes >= RAM, "{rounds:?}");
    assert!(
        rounds.iter().skip(1).all(|p| p.remaining_bytes > 0),
        "a round after the guest wrote found nothing dirty: {rounds:?}"
    );
    // It stops early only when a round left nothing to send (the guest not scheduled at all
    // during one: rare, but this machine may be busy).
    let left = rounds.last().unwrap().remaining_bytes;
    assert_eq!(
        converged == Converged::No,
        left > 0,
        "{converged:?} {rounds:?}"
    );
    if rounds.len() < 4 {
        eprintln!(
            "note: the pre-copy converged after {} rounds (the guest idle during one)",
            rounds.len()
        );
    }

    park.store(true, Ordering::SeqCst);
    let vcpu = runner.join().unwrap();
    let stopped_at = last.load(Ordering::SeqCst) as u8;
    last_pages(&mut tx, &KvmLog(&src_vm), &src_mem, unsent).unwrap();
    let msrs = msr_list(&kvm).unwrap();
    write_message(
        &mut tx,
        &Message::Vm(Box::new(VmState::save(&src_vm).unwrap())),
    )
    .unwrap();
    write_message(
        &mut tx,
        &Message::Vcpu {
            id: 0,
            state: Box::new(VcpuState::save(&vcpu, 0, &msrs).unwrap()),
        },
    )
    .unwrap();
    write_message(&mut tx, &Message::Done).unwrap();
    let got = target.join().unwrap().unwrap();
    assert_eq!(got.rounds as usize, rounds.len());
    assert!(got.ram_bytes >= RAM, "only {} bytes arrived", got.ram_bytes);

    let mut a = vec![0u8; RAM as usize];
    let mut b = vec![0u8; RAM as usize];
    src_mem.read_slice(&mut a, GuestAddress(0)).unwrap();
    dst_mem.read_slice(&mut b, GuestAddress(0)).unwrap();
    let differ = a
        .chunks(PAGE as usize)
        .zip(b.chunks(PAGE as usize))
        .filter(|(x, y)| x != y)
        .count();
    assert_eq!(
        differ, 0,
        "{differ} pages differ after the last pages were sent"
    );

    got.vm.unwrap().restore(&dst_vm).unwrap();
    got.vcpus[0]
        .as_ref()
        .unwrap()
        .restore(&dst_vcpu, 0)
        .unwrap();
    assert_eq!(next_count(&mut dst_vcpu), stopped_at.wrapping_add(1));
}

#[test]
fn a_stream_that_writes_outside_guest_ram_or_skips_its_hello_is_refused() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let refused = |msgs: &[Message], extra: &[u8]| {
        let mut s = Vec::new();
        for m in msgs {
            write_message(&mut s, m).unwrap();
        }
        s.extend_from_slice(extra);
        receive(&mut s.as_slice(), &mem, 1, None)
            .unwrap_err()
            .to_string()
    };
    let hello = Message::Hello {
        memory_bytes: 0x10000,
        vcpus: 1,
    };
    let e = refused(&[Message::Done], &[]);
    assert!(e.contains("before Hello"), "{e}");
    let e = refused(
        &[Message::Hello {
            memory_bytes: 0x20000,
            vcpus: 1,
        }],
        &[],
    );
    assert!(e.contains("RAM"), "{e}");
    let e = refused(
        &[
            hello,
            Message::Pages {
                gpa: 0xf000,
                len: 0x2000,
            },
        ],
        &[0u8; 0x2000],
    );
    assert!(e.contains("outside guest RAM"), "{e}");
    let e = refused(
        &[
            Message::Hello {
                memory_bytes: 0x10000,
                vcpus: 1,
            },
            Message::Pages {
                gpa: 0x1001,
                len: 0x1000,
            },
        ],
        &[0u8; 0x1000],
    );
    assert!(e.contains("not whole pages"), "{e}");
    let e = refused(
        &[
            Message::Hello {
                memory_bytes: 0x10000,
                vcpus: 1,
            },
            Message::Done,
        ],
        &[],
    );
    assert!(e.contains("before the VM's"), "{e}");
    // A header claiming more than the limit is refused before anything is read for it.
    let mut s = (u32::MAX).to_le_bytes().to_vec();
    s.extend_from_slice(b"{}");
    let e = receive(&mut s.as_slice(), &mem, 1, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most"), "{e}");
    // Nothing was written into guest RAM by any of them.
    let mut back = vec![1u8; 0x10000];
    mem.read_slice(&mut back, GuestAddress(0)).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}
