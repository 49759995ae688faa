//! EnSpeed level-1 test guest.
//!
//! A freestanding x86_64 program, loaded at physical 1 MiB, that a VMM
//! boots either with the Linux 64-bit boot protocol or with PVH. It talks
//! a line protocol on COM1 (`tg: ...`), drives virtio-mmio block and net
//! devices by polling, and ends with an ACPI power-off/reset, a keyboard
//! controller reset, a halt, or a network responder loop. See README.md
//! for the contract.

#![no_std]
#![no_main]

mod acpi;
mod blk;
mod boot;
mod cmdline;
mod fb;
mod io;
mod kbd;
mod mem;
mod net;
mod serial;
mod tick;
mod usermode;
mod virtio;

use io::Global;
use virtio::Mmio;

/// `hvm_start_info.magic`.
const PVH_MAGIC: u32 = 0x336e_c578;

/// Where the loader left the command line and RSDP.
struct BootInfo {
    proto: &'static str,
    cmdline: u64,
    rsdp: u64,
}

/// ACPI RSDP address from the loader (0 = scan for it).
static RSDP: Global<u64> = Global::new(0);
/// Linux `boot_params` from the loader (0 = entered through PVH).
pub static BOOT_PARAMS: Global<u64> = Global::new(0);

fn boot_info(kind: u64, info: u64) -> BootInfo {
    let readable = info != 0 && info < 0x1_0000_0000 - 0x1000;
    match kind {
        1 if readable => BootInfo {
            proto: "linux",
            // hdr.cmd_line_ptr plus ext_cmd_line_ptr for the high half.
            cmdline: io::peek32(info + 0x228) as u64 | (io::peek32(info + 0x0c8) as u64) << 32,
            rsdp: io::peek64(info + 0x070),
        },
        2 if readable && io::peek32(info) == PVH_MAGIC => BootInfo {
            proto: "pvh",
            cmdline: io::peek64(info + 24),
            rsdp: io::peek64(info + 32),
        },
        _ => {
            fail!("boot bad-info kind={} info=0x{:x}", kind, info);
            BootInfo { proto: "unknown", cmdline: 0, rsdp: 0 }
        }
    }
}

/// Probes and initialises every `virtio_mmio.device=` in command-line
/// order; the position is the device index printed in `tg: dev`.
fn probe_devices() {
    let mut index = 0;
    for w in cmdline::words() {
        let Some(v) = w.strip_prefix("virtio_mmio.device=") else { continue };
        let i = index;
        index += 1;
        let Some(d) = cmdline::parse_virtio_mmio(v) else {
            fail!("virtio-mmio bad-parameter {}", v);
            continue;
        };
        if d.base == 0 || d.base >= 0x1_0000_0000 || d.size > 0x1_0000_0000 - d.base || d.size < 0x100 {
            fail!("virtio-mmio 0x{:x} outside the identity map", d.base);
            continue;
        }
        let m = Mmio { base: d.base };
        let id = match m.probe() {
            Ok(id) => id,
            Err(e) => {
                fail!("virtio-mmio 0x{:x} {}", d.base, e);
                continue;
            }
        };
        let _ = d.irq; // we poll
        let r = match id {
            2 => {
                say!("dev {} blk base=0x{:x}", i, d.base);
                blk::init(i, m).map_err(|e| ("blk", e))
            }
            1 => {
                say!("dev {} net base=0x{:x}", i, d.base);
                net::init(i, m).map_err(|e| ("net", e))
            }
            // 0 is an empty slot (QEMU lists all transports); other device
            // types are not ours to drive.
            _ => Ok(()),
        };
        if let Err((what, e)) = r {
            m.set_failed();
            fail!("{} dev={} {}", what, i, e);
        }
    }
}

fn run_actions() {
    let Some(list) = cmdline::get("tg.run") else { return };
    for a in list.split(',').filter(|a| !a.is_empty()) {
        match a {
            "blk" => blk::act_blk(),
            "blkid" => blk::act_blkid(),
            "stamp" => blk::act_stamp(),
            "verify" => blk::act_verify(),
            "bench" => blk::act_bench(),
            "net" => net::act_net(),
            "kbd" => kbd::act_kbd(),
            "keys" => kbd::act_keys(),
            "fb" => fb::act_fb(),
            "fbfill" => fb::act_fbfill(),
            "echo" => serial::act_echo(),
            "flood" => serial::act_flood(),
            "tick" => tick::act_tick(),
            "fill" => tick::act_fill(),
            "sleep" => {
                let n = cmdline::num("tg.spin", 100_000_000);
                for _ in 0..n {
                    core::hint::spin_loop();
                }
                say!("sleep spins={}", n);
            }
            "panic-test" => panic!("panic-test"),
            _ => fail!("run {} unknown-action", a),
        }
    }
}

/// Spins long enough for a VMM to act on a power-off/reset request.
fn grace() {
    let dl = io::Deadline::after_ms(3000);
    while !dl.expired() {
        core::hint::spin_loop();
    }
}

fn end() -> ! {
    let what = cmdline::get("tg.end").unwrap_or("halt");
    let rsdp = *RSDP.get();
    match what {
        "poweroff" => {
            say!("end poweroff");
            match acpi::poweroff(rsdp) {
                Ok(()) => {
                    grace();
                    fail!("end poweroff no-effect");
                }
                Err(e) => fail!("end poweroff {}", e),
            }
        }
        "reboot" => {
            say!("end reboot");
            match acpi::reset(rsdp) {
                Ok(()) => grace(),
                Err(e) => say!("reboot via ACPI impossible ({}), trying kbd-reset", e),
            }
            kbd::reset();
            grace();
            fail!("end reboot no-effect");
        }
        "kbd-reset" => {
            say!("end kbd-reset");
            kbd::reset();
            grace();
            fail!("end kbd-reset no-effect");
        }
        "wait" => {
            say!("end wait");
            net::serve_forever();
        }
        "halt" => say!("end halt"),
        other => fail!("end {} unknown", other),
    }
    io::halt_forever()
}

/// Rust entry, called by `common64` in boot.rs with the boot protocol
/// (1 = Linux boot_params in `info`, 2 = PVH hvm_start_info in `info`).
#[no_mangle]
extern "C" fn tg_main(kind: u64, info: u64) -> ! {
    // `tg: entry` was printed by common64 already.
    serial::init();
    idt_init();
    usermode::init();
    let bi = boot_info(kind, info);
    cmdline::load(bi.cmdline);
    *RSDP.get() = bi.rsdp;
    if bi.proto == "linux" {
        *BOOT_PARAMS.get() = info;
    }
    say!("cmdline {}", cmdline::text());
    say!("boot {} info=0x{:x} rsdp=0x{:x}", bi.proto, info, bi.rsdp);
    let (hz, src) = io::tsc_init();
    say!("tsc mhz={} src={}", hz / 1_000_000, src);
    *virtio::TIMEOUT_MS.get() = cmdline::num("tg.timeout", *virtio::TIMEOUT_MS.get()).max(1);
    probe_devices();
    say!("ready");
    run_actions();
    if serial::failed() {
        say!("done fail");
    } else {
        say!("done ok");
    }
    end()
}

/// Interrupt descriptor table: 32 exception gates to the stubs in boot.rs,
/// so a fault prints a FAIL line instead of silently triple-faulting.
#[repr(C, align(16))]
struct Idt([u64; 64]);

static IDT: Global<Idt> = Global::new(Idt([0; 64]));

extern "C" {
    static tg_isr_table: [u64; 32];
}

fn idt_init() {
    for v in 0..32 {
        // SAFETY: the table is static data emitted by boot.rs.
        idt_gate(v, unsafe { tg_isr_table[v] });
    }
    let idt = &IDT.get().0;
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let p = Ptr { limit: (64 * 8 - 1) as u16, base: idt.as_ptr() as u64 };
    // SAFETY: the IDT is static and its gates point at valid stubs.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags)) };
}

/// Points exception vector `v` (below 32) at handler `h`: 64-bit
/// interrupt gate, present, DPL 0, selector 0x08.
pub fn idt_gate(v: usize, h: u64) {
    let idt = &mut IDT.get().0;
    idt[2 * v] = (h & 0xffff) | 0x08 << 16 | 0x8e00 << 32 | ((h >> 16) & 0xffff) << 48;
    idt[2 * v + 1] = h >> 32;
}

/// Called by the exception stubs with a pointer to
/// [vector, error code, rip, cs, rflags, rsp, ss]. Never returns.
#[no_mangle]
extern "C" fn tg_exception(frame: *const u64) -> ! {
    // SAFETY: the stub passes its own stack frame.
    let f = unsafe { core::slice::from_raw_parts(frame, 7) };
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    fail!("exception vector={} err=0x{:x} rip=0x{:x} rsp=0x{:x} cr2=0x{:x}", f[0], f[1], f[2], f[5], cr2);
    say!("done fail");
    io::halt_forever()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // At CPL 3 this cannot print; it leaves user mode and `run` reports.
    usermode::panic_exit(info);
    match info.location() {
        Some(l) => fail!("panic {}:{} {}", l.file(), l.line(), info.message()),
        None => fail!("panic {}", info.message()),
    }
    say!("done fail");
    io::halt_forever()
}
