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
    // Round 0 named every page, and sent the ones with data: the code and the window, not the
    // rest of RAM, never written.
    assert!(
        (16 * PAGE..RAM / 4).contains(&rounds[0].transferred_bytes),
        "{rounds:?}"
    );
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

/// Guest RAM of `len` bytes in a memfd of its own, as the VMM's.
fn memfd_ram(len: u64) -> (GuestMemoryMmap<()>, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"migration-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: just created, owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    let offset = vm_memory::FileOffset::new(file.try_clone().unwrap(), 0);
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        len as usize,
        Some(offset),
    )])
    .unwrap();
    (mem, file)
}

/// Where the memfd's next data lies from byte `from`, if any.
fn next_data(file: &std::fs::File, from: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor; the result is checked.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    (at >= 0).then_some(at as u64)
}

/// Pages with data go whole; zero pages (never touched, or written with zeros) go as their
/// place alone. The target's memory ends equal to the source's, whatever it held before: pages
/// zero at the source are zero there too (given back to its memfd, or written over where its
/// memory has no file), and pages never touched on either side are never touched.
#[test]
fn zero_pages_go_as_their_place_alone_and_end_zero_at_the_target() {
    const LEN: u64 = 4 << 20;
    let (src, _src_file) = memfd_ram(LEN);
    // Pages 0-7 hold data; 8-15 were written with zeros; the rest was never touched.
    src.write_slice(&[0xab; 8 * PAGE as usize], GuestAddress(0))
        .unwrap();
    src.write_slice(&[0; 8 * PAGE as usize], GuestAddress(8 * PAGE))
        .unwrap();
    let pages: Vec<u64> = (0..LEN / PAGE).collect();
    let mut stream = Vec::new();
    let mut buf = Vec::new();
    let sent = send_pages(&mut stream, &src, 0, &pages, &mut buf, Holes::Skip).unwrap();
    assert_eq!(sent, 8 * PAGE, "only the pages with data went whole");
    assert!(
        stream.len() < (9 * PAGE) as usize,
        "{} bytes for 8 pages of data",
        stream.len()
    );

    let (dst, dst_file) = memfd_ram(LEN);
    let anon = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), LEN as usize)]).unwrap();
    for target in [&dst, &anon] {
        // What an earlier round (or a boot) left there.
        target
            .write_slice(&[0xcd; 8 * PAGE as usize], GuestAddress(4 * PAGE))
            .unwrap();
        target
            .write_slice(&[0xef; PAGE as usize], GuestAddress(200 * PAGE))
            .unwrap();
        let mut r = stream.as_slice();
        let mut covered = 0;
        while !r.is_empty() {
            let m = read_message(&mut r).unwrap();
            covered += take_ram(&mut r, target, &m, &mut buf).unwrap();
        }
        assert_eq!(covered, LEN, "every page of RAM was named");
        if std::ptr::eq(target, &dst) {
            // The memfd target holds data only where the source had some (looked at before
            // the comparison below reads, and so fills, the rest).
            assert_eq!(next_data(&dst_file, 0), Some(0));
            assert_eq!(
                next_data(&dst_file, 8 * PAGE),
                None,
                "zero pages still take memory at the target"
            );
        }
        let (mut a, mut b) = (vec![0u8; LEN as usize], vec![0u8; LEN as usize]);
        src.read_slice(&mut a, GuestAddress(0)).unwrap();
        target.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b, "the target's memory differs from the source's");
    }
    // A zero run that is not whole pages, or lies outside RAM, is refused.
    for m in [
        Message::Zeros {
            gpa: 0x800,
            len: PAGE,
        },
        Message::Zeros { gpa: 0, len: 100 },
        Message::Zeros {
            gpa: LEN - PAGE,
            len: 2 * PAGE,
        },
    ] {
        let e = take_ram(&mut [].as_slice(), &dst, &m, &mut buf).unwrap_err();
        assert!(e.to_string().contains("zero bytes at"), "{m:?}: {e}");
    }
}
