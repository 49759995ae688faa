//! Entry points, GDT, page tables and exception stubs (assembly).
//!
//! Two ways in, one way on:
//! * `_start` (ELF `e_entry`): Linux x86 64-bit boot protocol. Long mode,
//!   RSI = `boot_params`. We do not trust the loader's GDT or page tables
//!   (or its stack), so we switch to ours before touching memory.
//! * `pvh_start` (Xen `PHYS32_ENTRY` note): 32-bit protected mode, paging
//!   off, EBX = `hvm_start_info`. Enables long mode with our tables.
//!
//! Both end in `common64`, which sets segments and the stack, zeroes .bss,
//! enables SSE (Rust on this target emits SSE) and calls
//! `tg_main(kind, info)` with kind 1 = Linux boot_params, 2 = PVH.
//!
//! The page tables are fully initialised data (not built at run time):
//! identity map of 0..4 GiB with 2 MiB pages, RW, user-accessible (for the
//! CPL 3 code of usermode.rs), cacheable (MMIO exits to the VMM regardless
//! of the memory type the guest uses). CR4.SMEP/SMAP are cleared so that
//! CPL 0 may use these user pages whatever the loader left in CR4.

core::arch::global_asm!(
    r#"
    .section .text.boot, "ax"
    .code64
    .global _start
_start:
    cli
    cld
    mov %rsi, %r15              # boot_params (kept in a register we never clobber)
    mov $1, %r14d               # boot kind 1: Linux 64-bit boot protocol
    mov $pml4, %eax             # our identity map also covers this code
    mov %rax, %cr3
    lgdt gdt_desc
    mov $__stack_top, %rsp      # the loader's stack may be anywhere
    push $0x08                  # reload CS from our GDT
    mov $common64, %eax
    push %rax
    lretq

    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi              # hvm_start_info; nothing below touches %esi
    lgdt gdt_desc               # 32-bit lgdt reads limit + 32-bit base
    ljmp $0x18, $1f             # our 32-bit code segment
1:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov %cr4, %eax
    or $0x620, %eax             # PAE | OSFXSR | OSXMMEXCPT
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx       # EFER
    rdmsr
    or $0x100, %eax             # LME
    wrmsr
    mov %cr0, %eax
    and $0xfffffffb, %eax       # clear EM
    or $0x80000023, %eax        # PG | NE | MP | PE
    mov %eax, %cr0
    ljmp $0x08, $pvh64

    .code64
pvh64:
    mov %esi, %r15d             # zero-extends
    mov $2, %r14d               # boot kind 2: PVH
    # fall through

common64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    # "tg: entry" goes out before anything else (clearing .bss touches
    # megabytes), so a host can time process start to guest entry. The
    # transmitter is polled like the Rust driver does; no UART setup needed.
    lea entry_msg(%rip), %rsi
1:
    movb (%rsi), %bl
    test %bl, %bl
    jz 3f
    mov $0x3fd, %dx
2:
    inb %dx, %al
    test $0x20, %al
    jz 2b
    mov $0x3f8, %dx
    mov %bl, %al
    outb %al, %dx
    inc %rsi
    jmp 1b
3:
    mov $__stack_top, %rsp
    mov $__bss_start, %edi      # .bss (stack included) is not live yet
    mov $__bss_end, %ecx
    sub %rdi, %rcx
    shr $3, %rcx                # both ends are 16-byte aligned (link.ld);
    xor %eax, %eax              # 8 bytes a step: kvm-pvm emulates every
    rep stosq                   # step at CPL 0 (see usermode.rs)
    mov %cr0, %rax
    and $0xfffffffffffffffb, %rax   # EM = 0: no FPU emulation
    or $0x22, %rax                  # MP | NE
    mov %rax, %cr0
    mov %cr4, %rax
    and $~0x300000, %rax            # no SMEP/SMAP: all pages are user pages
    or $0x600, %rax                 # OSFXSR | OSXMMEXCPT: SSE usable
    mov %rax, %cr4
    mov %r14, %rdi
    mov %r15, %rsi
    call tg_main                # 16-byte aligned before the call, as the ABI wants
2:
    cli
    hlt
    jmp 2b

entry_msg:
    .asciz "tg: entry\n"

    # ---- exception stubs: print and stop instead of triple-faulting ----
    .macro isr_noerr v
isr_\v:
    push $0
    push $\v
    jmp isr_common
    .endm
    .macro isr_err v
isr_\v:
    push $\v
    jmp isr_common
    .endm
    # isr_6 (#UD) is reached through usermode.rs's tg_user_ud.
    .global isr_6
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    isr_noerr \v
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    isr_err \v
    .endr
isr_common:
    mov %rsp, %rdi              # -> [vector, error, rip, cs, rflags, rsp, ss]
    and $-16, %rsp
    call tg_exception
3:
    cli
    hlt
    jmp 3b

    .section .rodata.isr_table, "a"
    .balign 8
    .global tg_isr_table
tg_isr_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr_\v
    .endr

    # ---- PVH entry note (name "Xen", type 18 = XEN_ELFNOTE_PHYS32_ENTRY) ----
    # The descriptor is 8 bytes like Linux's (_ASM_PTR): QEMU reads a
    # size_t from it; the value is the 32-bit physical entry, zero-extended.
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start
    .balign 4

    # ---- GDT: null, 64-bit code (0x08), data (0x10), 32-bit code (0x18),
    # user data (0x20) and 64-bit code (0x28) at DPL 3, TSS (0x30) ----
    .section .data.gdt, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cf9a000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
    .global tg_gdt_tss
tg_gdt_tss:
    .quad 0, 0                  # filled in by usermode::init
gdt_end:
    .balign 8
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt

    # ---- page tables: identity map of the first 4 GiB with 2 MiB pages ----
    .section .data.pagetables, "aw"
    .balign 4096
pml4:
    .quad pdpt + 0x7            # present | writable | user
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0007
    .quad pd + 0x1007
    .quad pd + 0x2007
    .quad pd + 0x3007
    .fill 508, 8, 0
pd:
    .set pg, 0
    .rept 2048
    .quad (pg << 21) | 0x87     # present | writable | user | 2 MiB page
    .set pg, pg + 1
    .endr

    # ---- boot stack ----
    .section .bss.stack, "aw", @nobits
    .balign 16
    .skip 262144
    .global __stack_top
__stack_top:
    "#,
    options(att_syntax)
);
