//! Running pure computation at CPL 3.
//!
//! This machine's KVM (kvm-pvm) runs a guest that is not PVM-aware
//! natively only in user mode: every instruction at CPL 0 goes through its
//! instruction emulator, about 2000 TSC cycles each. Stamping a 4 KiB
//! block (~200k instructions of xorshift and bitwise CRC-32) costs about
//! 115 ms at CPL 0 and under 0.1 ms at CPL 3, switches included. So the
//! block actions hand their loops over the data, and serial.rs the
//! formatting of its lines, to `run`, which executes a closure at CPL 3 on
//! the current stack and comes back when it returns (a round trip costs
//! about 70 us under kvm-pvm).
//!
//! The way back is `ud2` at a fixed address (`tg_user_exit`): kvm-pvm
//! answers `int n` from user mode with #UD, and after `syscall` its CPL 0
//! faults on port I/O and segment loads, while an exception is delivered
//! the ordinary way everywhere (kvm-pvm, KVM, TCG, hardware). The #UD gate
//! (`tg_user_ud`) recognises that address and resumes the caller of `run`;
//! any other #UD is reported as an exception like before.
//!
//! Code at CPL 3 must not touch ports, control registers or `hlt` (port
//! I/O would fault: no I/O bitmap, IOPL 0). A panic there is caught and
//! reported from CPL 0 (`panic_exit`); a CPU exception goes to the usual
//! handler through the TSS stack.

use crate::io::Global;
use core::fmt::{self, Write};

/// User-mode selectors (boot.rs GDT: 0x20 data, 0x28 code64; RPL 3).
const USER_DS: u64 = 0x23;
const USER_CS: u64 = 0x2b;
/// TSS selector (boot.rs GDT, descriptor filled in by `init`).
const TSS_SEL: u16 = 0x30;

core::arch::global_asm!(
    r#"
    .section .text.usermode, "ax"
    # tg_user_call(entry, ctx): calls entry(ctx) at CPL 3 on this stack,
    # below the caller's frames; returns when entry returns (via
    # tg_user_exit and the #UD gate). Interrupts stay disabled.
    .global tg_user_call
tg_user_call:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, tg_user_saved_rsp(%rip)
    lea -64(%rsp), %rax
    and $-16, %rax
    push ${user_ds}             # SS
    push %rax                   # RSP
    push $0x2                   # RFLAGS: IF = 0, IOPL = 0
    push ${user_cs}             # CS
    lea tg_user_entry(%rip), %rax
    push %rax
    iretq
tg_user_entry:
    mov %rdi, %rax
    mov %rsi, %rdi
    call *%rax                  # the stack is 16-byte aligned here
    .global tg_user_exit
tg_user_exit:
    ud2

    # #UD gate: from tg_user_exit at CPL 3 it is the way back, otherwise
    # an ordinary exception (boot.rs).
    .global tg_user_ud
tg_user_ud:
    cmpq $tg_user_exit, (%rsp)  # frame: rip, cs, rflags, rsp, ss
    jne 1f
    testb $3, 8(%rsp)
    jz 1f
    mov tg_user_saved_rsp(%rip), %rsp
    mov $0x10, %eax             # the CPL change left null selectors
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret
1:
    jmp isr_6

    .section .bss.usermode, "aw", @nobits
    .balign 8
tg_user_saved_rsp:
    .skip 8
    "#,
    user_ds = const USER_DS,
    user_cs = const USER_CS,
    options(att_syntax)
);

extern "C" {
    fn tg_user_call(entry: extern "C" fn(*mut u8), ctx: *mut u8);
    fn tg_user_exit();
    fn tg_user_ud();
    /// The TSS descriptor slot of boot.rs's GDT (16 bytes).
    static mut tg_gdt_tss: [u64; 2];
}

/// 64-bit TSS: only RSP0 (the stack for exceptions from CPL 3) and the I/O
/// bitmap offset (past the limit: no port access from CPL 3) matter.
#[repr(C, align(16))]
struct Tss([u8; 104]);

static TSS: Global<Tss> = Global::new(Tss([0; 104]));

/// Stack for exceptions taken at CPL 3 (their handler prints and halts).
#[repr(C, align(16))]
struct TrapStack([u8; TRAP_STACK]);
const TRAP_STACK: usize = 16 * 1024;
#[link_section = ".noinit"]
static TRAP_STACK_MEM: Global<TrapStack> = Global::new(TrapStack([0; TRAP_STACK]));

/// `init` has run.
static READY: Global<bool> = Global::new(false);
/// A closure is running at CPL 3 (`run` does not nest).
static ACTIVE: Global<bool> = Global::new(false);
/// Set by a panic at CPL 3: its message, reported by `run` at CPL 0.
static PANIC: Global<PanicMsg> = Global::new(PanicMsg { buf: [0; 256], len: 0, set: false });

struct PanicMsg {
    buf: [u8; 256],
    len: usize,
    set: bool,
}

impl Write for PanicMsg {
    /// Keeps what fits, cut at a character boundary.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut n = s.len().min(self.buf.len() - self.len);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Loads the TSS and takes over the #UD gate. Call once at CPL 0, after
/// the IDT is loaded.
pub fn init() {
    let tss = &mut TSS.get().0;
    let size = tss.len();
    let rsp0 = TRAP_STACK_MEM.ptr() as u64 + TRAP_STACK as u64;
    tss[4..12].copy_from_slice(&rsp0.to_le_bytes());
    tss[102..104].copy_from_slice(&(size as u16).to_le_bytes());
    let base = tss.as_ptr() as u64;
    let limit = size as u64 - 1;
    // Available 64-bit TSS (type 9), present, DPL 0.
    let lo = limit | (base & 0xff_ffff) << 16 | 0x89 << 40 | (base >> 24 & 0xff) << 56;
    // SAFETY: the descriptor slot is ours and not loaded yet; ltr then
    // reads it (and marks it busy).
    unsafe {
        core::ptr::addr_of_mut!(tg_gdt_tss).write_volatile([lo, base >> 32]);
        core::arch::asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack, preserves_flags));
    }
    crate::idt_gate(6, tg_user_ud as *const () as u64);
    *READY.get() = true;
}

/// Runs `f` at CPL 3 and returns its result. `f` must do pure computation
/// on memory (no port I/O, no privileged instructions). Falls back to a
/// plain call before `init` and when already at CPL 3.
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    if !*READY.get() || *ACTIVE.get() {
        return f();
    }
    let mut f = Some(f);
    let mut out = None;
    let mut call = || out = f.take().map(|f| f());
    let mut dynf: &mut dyn FnMut() = &mut call;
    *ACTIVE.get() = true;
    // SAFETY: the closure and everything it borrows stay alive across the
    // call; tg_user_call preserves the callee-saved registers and the
    // stack above its own frame, like any extern "C" function.
    unsafe { tg_user_call(user_entry, &mut dynf as *mut &mut dyn FnMut() as *mut u8) };
    *ACTIVE.get() = false;
    let p = PANIC.get();
    if p.set {
        p.set = false; // printing runs `run` again
        let msg = core::str::from_utf8(&p.buf[..p.len]).unwrap_or("?");
        crate::fail!("panic {}", msg);
        crate::say!("done fail");
        crate::io::halt_forever();
    }
    match out {
        Some(r) => r,
        None => unreachable!("user-mode closure did not run"),
    }
}

extern "C" fn user_entry(ctx: *mut u8) {
    // SAFETY: `run` passes a pointer to its `&mut dyn FnMut()`.
    let f = unsafe { &mut *(ctx as *mut &mut dyn FnMut()) };
    f();
}

/// Called first by the panic handler: at CPL 3 (where printing would
/// fault) it keeps the message and leaves user mode, and `run` reports
/// it; otherwise it returns.
pub fn panic_exit(info: &core::panic::PanicInfo) {
    if !*ACTIVE.get() {
        return;
    }
    let p = PANIC.get();
    p.set = true;
    let _ = match info.location() {
        Some(l) => write!(p, "{}:{} {}", l.file(), l.line(), info.message()),
        None => write!(p, "{}", info.message()),
    };
    // SAFETY: tg_user_exit is the way back to `run`; this stack is
    // abandoned.
    unsafe { core::arch::asm!("jmp {}", sym tg_user_exit, options(noreturn)) }
}
