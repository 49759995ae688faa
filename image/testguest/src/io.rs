//! Port I/O, MMIO and small helpers shared by the drivers.

use core::arch::asm;
use core::cell::UnsafeCell;

/// Writes a byte to an I/O port.
#[inline]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
#[inline]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Writes a 16-bit word to an I/O port.
#[inline]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags)) }
}

/// Reads a 16-bit word from an I/O port.
#[inline]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for `outb`.
    unsafe { asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Writes bytes to an I/O port one after the other, in a four-instruction
/// loop (each instruction at CPL 0 is emulated under kvm-pvm, see
/// usermode.rs). Not `rep outsb`: KVM hands a string OUT to the VMM as one
/// write of all its bytes, and EnSpeed's serial port ignores writes longer
/// than a byte.
pub fn out_bytes(port: u16, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: reads `bytes` only; port I/O has no other memory effects.
    unsafe {
        asm!("2:", "lodsb", "out dx, al", "dec rcx", "jnz 2b",
             inout("rsi") bytes.as_ptr() => _, inout("rcx") bytes.len() => _, in("dx") port, out("al") _,
             options(nostack, readonly))
    }
}

/// Writes a 32-bit word to an I/O port.
#[inline]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) }
}


/// Volatile 8-bit read of a physical address (identity-mapped below 4 GiB).
#[inline]
pub fn rd8(addr: u64) -> u8 {
    // SAFETY: callers pass addresses inside our identity map.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Volatile 16-bit read of a physical address.
#[inline]
pub fn rd16(addr: u64) -> u16 {
    // SAFETY: as for `rd8`.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

/// Volatile 32-bit read of a physical address.
#[inline]
pub fn rd32(addr: u64) -> u32 {
    // SAFETY: as for `rd8`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}


/// Volatile 8-bit write to a physical address.
#[inline]
pub fn wr8(addr: u64, v: u8) {
    // SAFETY: as for `rd8`.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

/// Volatile 16-bit write to a physical address.
#[inline]
pub fn wr16(addr: u64, v: u16) {
    // SAFETY: as for `rd8`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}

/// Volatile 32-bit write to a physical address.
#[inline]
pub fn wr32(addr: u64, v: u32) {
    // SAFETY: as for `rd8`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// Volatile 64-bit write to a physical address.
#[inline]
pub fn wr64(addr: u64, v: u64) {
    // SAFETY: as for `rd8`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Unaligned plain read of a little-endian u32 from memory we own or that
/// firmware tables live in (not MMIO).
#[inline]
pub fn peek32(addr: u64) -> u32 {
    // SAFETY: as for `rd8`.
    unsafe { core::ptr::read_unaligned(addr as *const u32) }
}

/// Unaligned plain read of a u64 (see `peek32`).
#[inline]
pub fn peek64(addr: u64) -> u64 {
    // SAFETY: as for `rd8`.
    unsafe { core::ptr::read_unaligned(addr as *const u64) }
}

/// Full memory barrier. Used around ring indices shared with the device:
/// x86 is TSO, but the compiler must not reorder, and mfence is cheap
/// compared with the VM exits around it.
#[inline]
pub fn mb() {
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
}

/// Time-stamp counter, for informational timing lines only.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Stops the CPU for good (interrupts are never enabled).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt just stops this vCPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// A global for this single-threaded program. Interior mutability without
/// `static mut` references; there is one CPU and no interrupt handler that
/// returns, so a `&mut` from `get` is never aliased as long as callers do
/// not hold two at once.
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: single CPU, no preemption (see the type's docs).
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    /// Wraps an initial value.
    pub const fn new(v: T) -> Self {
        Global(UnsafeCell::new(v))
    }

    /// Mutable access; see the type's docs for why this is sound here.
    #[allow(clippy::mut_from_ref)]
    pub fn get(&self) -> &mut T {
        // SAFETY: see the type's docs.
        unsafe { &mut *self.0.get() }
    }

    /// Raw pointer to the value (for physical addresses of DMA memory).
    pub fn ptr(&self) -> *mut T {
        self.0.get()
    }
}

/// Xorshift64 PRNG: reproducible pseudo-random offsets and payloads.
#[derive(Clone, Copy)]
pub struct XorShift(pub u64);

impl XorShift {
    /// Seeds the generator (a zero seed would stick at zero).
    pub fn new(seed: u64) -> Self {
        XorShift(if seed == 0 { 0x9E37_79B9_7F4A_7C15 } else { seed })
    }

    /// Next 64-bit value.
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`). Bitwise: speed does
/// not matter for 4 KiB blocks and it avoids a table.
pub fn crc32_update(mut crc: u32, data: &[u8]) -> u32 {
    crc = !crc;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// TSC ticks per second (see `tsc_init`).
pub static TSC_HZ: Global<u64> = Global::new(3_000_000_000);

/// Works out the TSC frequency from CPUID: leaf 0x15 (crystal ratio), leaf
/// 0x16 (base MHz), the hypervisor leaf 0x40000010 (kHz), else a 3 GHz
/// guess. Waits are bounded in TSC time because poll-loop speed varies by
/// orders of magnitude between TCG, KVM and this machine's kvm-pvm (where
/// `pause` and port I/O are slow). Returns (Hz, source).
pub fn tsc_init() -> (u64, &'static str) {
    use core::arch::x86_64::__cpuid;
    let max = __cpuid(0).eax;
    let mut r = (0u64, "guess");
    if max >= 0x15 {
        let c = __cpuid(0x15);
        if c.eax != 0 && c.ebx != 0 && c.ecx != 0 {
            r = (c.ecx as u64 * c.ebx as u64 / c.eax as u64, "cpuid15");
        }
    }
    if r.0 == 0 && max >= 0x16 {
        let c = __cpuid(0x16);
        if c.eax & 0xffff != 0 {
            r = ((c.eax & 0xffff) as u64 * 1_000_000, "cpuid16");
        }
    }
    if r.0 == 0 {
        let hv = __cpuid(0x4000_0000).eax;
        if (0x4000_0010..0x4000_0100).contains(&hv) {
            let khz = __cpuid(0x4000_0010).eax;
            if khz != 0 {
                r = (khz as u64 * 1000, "hypervisor");
            }
        }
    }
    if r.0 < 100_000_000 {
        r = (3_000_000_000, "guess");
    }
    *TSC_HZ.get() = r.0;
    r
}

/// A point in TSC time after which a wait gives up.
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Deadline {
        let ticks = (*TSC_HZ.get() as u128 * ms as u128 / 1000).min(u64::MAX as u128 / 2) as u64;
        Deadline(rdtsc().saturating_add(ticks))
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        rdtsc() > self.0
    }
}
