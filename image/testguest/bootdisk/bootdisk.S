/*
 * A disk the firmware boots, for the level-1 firmware tests: a master boot
 * record that the BIOS loads at 0x7c00, which reads its second stage from
 * the disk through the BIOS (int 13h extended read), or, booted from a CD
 * as an El Torito no-emulation image that the BIOS loaded whole, reads the
 * CD's volume descriptor (2048-byte sectors) instead; prints through the
 * BIOS (int 10h teletype, which SeaBIOS's serial console forwards to COM1),
 * waits 50 ms through the BIOS (int 15h AH=86h, the RTC's periodic interrupt),
 * then goes to 32-bit protected mode, finds the ACPI tables the firmware
 * placed (RSDP, XSDT or RSDT, FADT with checksums, the DSDT's _S5_ package)
 * and powers the machine off the way an OS does: SLP_TYP | SLP_EN into
 * PM1a_CNT. Every step says what it did on the serial console, so a test
 * reads where it got to.
 *
 * An install mode, booted from a CD, first writes the image it was loaded
 * from to the first hard disk (int 13h extended write), as an installer
 * would, in the mode that counts on the BIOS clock (below), then powers off:
 * booted again, the disk boots and keeps running.
 *
 * Two modes keep running instead, for the live-migration tests: one counts
 * in real mode on the BIOS clock (the PIT's interrupt), reading its disk
 * through the BIOS at each step and keeping the count on the VGA's text
 * screen; the other draws the colour bars and counts in protected mode on
 * the RTC's seconds.
 */
    .code16
    .section .text
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    sti
    movb %dl, drive
    movw $msg_hello, %si
    call print16
    /* From a CD the BIOS loaded the whole image: stage 2 is there. */
    cmpl $0x32544f42, stage2_magic
    je from_cd
    /* Stage 2: the sectors after this one, read to 0x7e00. */
    movw $dap, %si
    movb $0x42, %ah
    movb drive, %dl
    int $0x13
    jc read_failed
    cmpl $0x32544f42, stage2_magic
    jne bad_stage2
    movw $msg_disk, %si
    call print16
    jmp stage2

from_cd:
    movw $msg_cd, %si
    call print16
    /* The primary volume descriptor, sector 16, to 0x9000. */
    movw $cd_dap, %si
    movb $0x42, %ah
    movb drive, %dl
    int $0x13
    jc read_failed
    cmpl $0x30304443, 0x9001
    jne bad_pvd
    movw $msg_pvd, %si
    call print16
    jmp stage2

bad_pvd:
    movw $msg_badpvd, %si
    call print16
    jmp hang16
read_failed:
    movw $msg_readfail, %si
    call print16
    jmp hang16
bad_stage2:
    movw $msg_badstage2, %si
    call print16
hang16:
    hlt
    jmp hang16

/* Prints the NUL-terminated string at SI through the BIOS. */
print16:
    lodsb
    testb %al, %al
    jz 1f
    movb $0x0e, %ah
    movw $0x0007, %bx
    int $0x10
    jmp print16
1:  ret

drive: .byte 0
    .balign 4
dap:
    .byte 0x10, 0
    .word (stage2_end - stage2_magic + 511) / 512
    .word 0x7e00, 0x0000
    .quad 1
cd_dap:
    .byte 0x10, 0
    .word 1
    .word 0x9000, 0x0000
    .quad 16
msg_hello: .asciz "bootdisk: started by the firmware\r\n"
msg_disk: .asciz "bootdisk: stage 2 read through int 13h\r\n"
msg_cd: .asciz "bootdisk: loaded whole from a CD (El Torito)\r\n"
msg_pvd: .asciz "bootdisk: CD volume descriptor read through int 13h\r\n"
msg_badpvd: .asciz "bootdisk: FAIL no CD001 in sector 16\r\n"
msg_readfail: .asciz "bootdisk: FAIL int 13h could not read stage 2\r\n"
msg_badstage2: .asciz "bootdisk: FAIL stage 2 has the wrong signature\r\n"

    .org 510
    .word 0xaa55

/* Stage 2, at 0x7e00. */
stage2_magic:
    .long 0x32544f42
/* At byte 0x204 of the image: 1 asks for the display test, 2 for the
 * mouse test, 3 for counting on the BIOS clock, 4 for the colour bars and
 * counting on the RTC, instead of the power-off; 5 for the install before
 * it (a test sets it). */
vbe_flag:
    .byte 0
    .balign 4
stage2:
    movw $msg_stage2, %si
    call print16
    /* How many hard disks the BIOS found (its data area, 0x475), in hex. */
    movw $msg_disks, %si
    call print16
    movb 0x475, %al
    call hex16
    movw $msg_crlf, %si
    call print16
    /* fw_cfg's signature, read as OVMF reads it: one string instruction
     * (rep insb) for four bytes of its data port. */
    movw $0x510, %dx
    xorw %ax, %ax
    outw %ax, %dx
    movw $0x511, %dx
    xorw %ax, %ax
    movw %ax, %es
    movw $fwcfg_sig, %di
    movw $4, %cx
    cld
    rep insb
    movw $msg_fwcfg, %si
    call print16
    movw $fwcfg_sig, %si
    call print16
    movw $msg_crlf, %si
    call print16
    /* 50 ms through the BIOS (int 15h, AH=86h), which counts the RTC's
     * periodic interrupt (IRQ 8). */
    movb $0x86, %ah
    xorw %cx, %cx
    movw $50000, %dx
    int $0x15
    jc 4f
    movw $msg_waited, %si
    call print16
4:
    cmpb $5, vbe_flag
    jne 1f
    call install
1:
    /* SeaBIOS's serial console sends text on its timer: wait for three
     * ticks of the BIOS clock (0x46c, 18.2 Hz from the PIT) so the line is
     * out before the BIOS is left. */
    movw $3, %cx
1:  movw 0x46c, %ax
2:  hlt
    cmpw 0x46c, %ax
    je 2b
    loop 1b
    cmpb $3, vbe_flag
    je tick_test
    cmpb $1, vbe_flag
    je 5f
    cmpb $4, vbe_flag
    jne 3f
5:  call vbe_setup
3:  cmpb $2, vbe_flag
    je mouse_test
    cli
    lgdt gdt_desc
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmp $0x08, $pm32

/* Mouse test, through the BIOS's pointing-device services (int 15h C2):
 * reset, 3-byte packets, a far handler, enable; then waits for a packet
 * that moved and prints its status and X bytes in hex. */
mouse_test:
    movw $0xc205, %ax
    movb $3, %bh
    int $0x15
    jc mouse_failed
    movw $0xc207, %ax
    movw $mouse_handler, %bx
    int $0x15
    jc mouse_failed
    movw $0xc200, %ax
    movb $1, %bh
    int $0x15
    jc mouse_failed
    movw $msg_mousewait, %si
    call print16
1:  sti
    hlt
    cmpb $0, mouse_got
    je 1b
    movw $msg_mouse, %si
    call print16
    movb mouse_status, %al
    call hex16
    movw $msg_mousex, %si
    call print16
    movb mouse_x, %al
    call hex16
    movw $msg_crlf, %si
    call print16
    jmp hang16
mouse_failed:
    movw $msg_mousefail, %si
    call print16
    jmp hang16

/* Counting on the BIOS clock: every 9 ticks (half a second) reads the
 * disk's second sector through the BIOS (int 13h) and checks it, counts,
 * prints the count on the serial console and on the text screen's first
 * line. */
tick_test:
1:  movw $9, %cx
2:  movw 0x46c, %ax
3:  sti
    hlt
    cmpw 0x46c, %ax
    je 3b
    loop 2b
    movw $tick_dap, %si
    movb $0x42, %ah
    movb drive, %dl
    int $0x13
    jc tick_failed
    cmpl $0x32544f42, 0x8800
    jne tick_failed
    incw tick_n
    movw $msg_tick, %si
    call print16
    movb tick_n+1, %al
    call hex16
    movb tick_n, %al
    call hex16
    movw $msg_crlf, %si
    call print16
    /* "TICK nnnn" at the screen's top left, white on blue. */
    pushw %es
    movw $0xb800, %ax
    movw %ax, %es
    xorw %di, %di
    movw $msg_screen, %si
4:  lodsb
    testb %al, %al
    jz 5f
    movb $0x1f, %ah
    stosw
    jmp 4b
5:  movw tick_n, %dx
    movw $4, %cx
6:  rolw $4, %dx
    movb %dl, %al
    andb $0x0f, %al
    addb $'0', %al
    cmpb $'9', %al
    jbe 7f
    addb $7, %al
7:  movb $0x1f, %ah
    stosw
    loop 6b
    popw %es
    jmp 1b
tick_failed:
    movw $msg_tickfail, %si
    call print16
    jmp hang16
    .balign 4
tick_dap:
    .byte 0x10, 0
    .word 1
    .word 0x8800, 0x0000
    .quad 1
tick_n: .word 0

/* Called by the BIOS for each packet: status, X, Y, 0 on the stack. */
mouse_handler:
    pushw %bp
    movw %sp, %bp
    pushw %ax
    pushw %ds
    xorw %ax, %ax
    movw %ax, %ds
    movw 10(%bp), %ax
    testb %al, %al
    jz 1f
    movb %al, mouse_x
    movw 12(%bp), %ax
    movb %al, mouse_status
    movb $1, mouse_got
1:  popw %ds
    popw %ax
    popw %bp
    lret

/* The install: this image, as loaded at 0x7c00, written to the first hard
 * disk's first sectors in the mode that counts on the BIOS clock; this boot
 * then powers off. */
install:
    movw $msg_installing, %si
    call print16
    movb $3, vbe_flag
    movw $install_dap, %si
    movw $0x4300, %ax
    movb $0x80, %dl
    int $0x13
    jc 1f
    movb $0, vbe_flag
    movw $msg_installed, %si
    call print16
    ret
1:  movw $msg_installfail, %si
    call print16
    jmp hang16
    .balign 4
install_dap:
    .byte 0x10, 0
    .word (stage2_end - _start + 511) / 512
    .word 0x7c00, 0x0000
    .quad 0

/* Prints AL as two hex digits through the BIOS. */
hex16:
    pushw %ax
    shrb $4, %al
    call 1f
    popw %ax
    andb $0x0f, %al
1:  addb $'0', %al
    cmpb $'9', %al
    jbe 2f
    addb $7, %al
2:  movb $0x0e, %ah
    movw $0x0007, %bx
    int $0x10
    ret

/* Display test, through the VGA BIOS: mode 0x144 (1024x768, 32 bits a
 * pixel) with its linear framebuffer; its address and pitch kept for
 * drawing from protected mode. */
vbe_setup:
    movw $0x4f01, %ax
    movw $0x144, %cx
    movw $0x9000, %di
    int $0x10
    cmpw $0x004f, %ax
    jne vbe_failed
    cmpw $1024, 0x9012
    jne vbe_failed
    cmpw $768, 0x9014
    jne vbe_failed
    cmpb $32, 0x9019
    jne vbe_failed
    movl 0x9028, %eax
    movl %eax, lfb
    movw 0x9010, %ax
    movw %ax, pitch
    movw $0x4f02, %ax
    movw $0x4144, %bx
    int $0x10
    cmpw $0x004f, %ax
    jne vbe_failed
    ret
vbe_failed:
    movw $msg_vbefail, %si
    call print16
    jmp hang16

    .code32
/* Four vertical bars, red, green, blue, white, 256 pixels each. */
draw_bars:
    movl lfb, %edi
    xorl %ebx, %ebx
1:  xorl %ecx, %ecx
2:  movl %ecx, %eax
    shrl $8, %eax
    movl colours(,%eax,4), %eax
    movl %eax, (%edi,%ecx,4)
    incl %ecx
    cmpl $1024, %ecx
    jb 2b
    movzwl pitch, %eax
    addl %eax, %edi
    incl %ebx
    cmpl $768, %ebx
    jb 1b
    movl $msg_bars, %esi
    call print32
    cmpb $4, vbe_flag
    jne hang32
/* Counting on the RTC: each new second read from the CMOS, the count goes
 * out on the serial console. */
rtc_ticks:
    movb $0x00, %al
    outb %al, $0x70
    inb $0x71, %al
    cmpb rtc_last, %al
    je rtc_ticks
    movb %al, rtc_last
    incw tick_n
    movl $msg_tick, %esi
    call print32
    movw tick_n, %bp
    movl $4, %edi
1:  rolw $4, %bp
    movw %bp, %ax
    andb $0x0f, %al
    addb $'0', %al
    cmpb $'9', %al
    jbe 2f
    addb $7, %al
2:  movb %al, rtc_digit
    movl $rtc_digit, %esi
    call print32
    decl %edi
    jnz 1b
    movl $msg_crlf, %esi
    call print32
    jmp rtc_ticks

pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $0x7c00, %esp

    cmpb $1, vbe_flag
    je draw_bars
    cmpb $4, vbe_flag
    je draw_bars

    /* The RSDP: "RSD PTR " on a 16-byte boundary in 0xe0000-0xfffff. */
    movl $0xe0000, %esi
1:  cmpl $0x20445352, (%esi)
    jne 2f
    cmpl $0x20525450, 4(%esi)
    jne 2f
    movl %esi, %edi
    movl $20, %ecx
    call sum8
    testb %al, %al
    jz found_rsdp
2:  addl $16, %esi
    cmpl $0x100000, %esi
    jb 1b
    movl $msg_nordsp, %esi
    jmp fail32

found_rsdp:
    movl 24(%esi), %ebx
    movl $8, %ebp
    testl %ebx, %ebx
    jnz have_sdt
    movl 16(%esi), %ebx
    movl $4, %ebp
have_sdt:
    movl %ebx, %edi
    call table_ok
    leal 36(%ebx), %esi
    movl 4(%ebx), %edx
    addl %ebx, %edx
3:  cmpl %edx, %esi
    jae no_fadt
    movl (%esi), %edi
    cmpl $0x50434146, (%edi)
    je got_fadt
    addl %ebp, %esi
    jmp 3b
no_fadt:
    movl $msg_nofadt, %esi
    jmp fail32

got_fadt:
    call table_ok
    movl 64(%edi), %eax
    movw %ax, pm1a_cnt
    movl 140(%edi), %ebx
    testl %ebx, %ebx
    jnz 4f
    movl 40(%edi), %ebx
4:  movl %ebx, %edi
    call table_ok
    cmpl $0x54445344, (%ebx)
    jne no_s5
    leal 36(%ebx), %esi
    movl 4(%ebx), %edx
    addl %ebx, %edx
    subl $8, %edx
5:  cmpl %edx, %esi
    jae no_s5
    cmpl $0x5f35535f, (%esi)
    je got_s5
    incl %esi
    jmp 5b
no_s5:
    movl $msg_nos5, %esi
    jmp fail32

    /* _S5_: PackageOp, PkgLength, NumElements, then SLP_TYPa as a
     * BytePrefix constant or a Zero/One op. */
got_s5:
    addl $4, %esi
    cmpb $0x12, (%esi)
    jne no_s5
    incl %esi
    movzbl (%esi), %eax
    shrl $6, %eax
    leal 2(%esi,%eax), %esi
    movb (%esi), %al
    cmpb $0x0a, %al
    jne 6f
    movb 1(%esi), %al
6:  movzbl %al, %eax
    movl %eax, %ebp
    addb $'0', %al
    movb %al, msg_acpi_typ
    movl $msg_acpi, %esi
    call print32
    movl %ebp, %eax
    shll $10, %eax
    orl $0x2000, %eax
    movw pm1a_cnt, %dx
    outw %ax, %dx
    /* The VMM stops the VM from another thread: give it time before
     * calling the power-off failed. */
    movl $0x20000000, %ecx
7:  pause
    loop 7b
    movl $msg_alive, %esi
fail32:
    call print32
hang32:
    hlt
    jmp hang32

/* Checks the checksum of the table at EDI (length at +4); fails if bad. */
table_ok:
    pushl %edi
    movl 4(%edi), %ecx
    call sum8
    popl %edi
    testb %al, %al
    jnz 1f
    ret
1:  movl $msg_badsum, %esi
    jmp fail32

/* AL = sum of ECX bytes at EDI. */
sum8:
    xorl %eax, %eax
1:  addb (%edi), %al
    incl %edi
    loop 1b
    ret

/* Prints the NUL-terminated string at ESI on COM1, straight to the UART;
 * uses EAX, EBX, EDX. */
print32:
    movb (%esi), %bl
    testb %bl, %bl
    jz 2f
    movw $0x3fd, %dx
1:  inb %dx, %al
    testb $0x20, %al
    jz 1b
    movw $0x3f8, %dx
    movb %bl, %al
    outb %al, %dx
    incl %esi
    jmp print32
2:  ret

    .balign 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt
pm1a_cnt: .word 0
lfb: .long 0
pitch: .word 0
    .balign 4
colours: .long 0x00ff0000, 0x0000ff00, 0x000000ff, 0x00ffffff
mouse_got: .byte 0
mouse_status: .byte 0
mouse_x: .byte 0
msg_mousewait: .asciz "bootdisk: waiting for the mouse\r\n"
msg_mouse: .asciz "bootdisk: mouse status="
msg_mousex: .asciz " x="
msg_disks: .asciz "bootdisk: hard disks "
msg_fwcfg: .asciz "bootdisk: fw_cfg signature "
fwcfg_sig: .asciz "????"
msg_crlf: .asciz "\r\n"
msg_tick: .asciz "bootdisk: tick n="
msg_screen: .asciz "TICK "
msg_tickfail: .asciz "bootdisk: FAIL int 13h could not read the disk while counting\r\n"
rtc_last: .byte 0xff
rtc_digit: .asciz "?"
msg_mousefail: .asciz "bootdisk: FAIL the BIOS has no mouse\r\n"
msg_vbefail: .asciz "bootdisk: FAIL VBE mode 0x144 (1024x768x32) refused\r\n"
msg_bars: .asciz "bootdisk: drew colour bars in 1024x768x32\r\n"
msg_stage2: .asciz "bootdisk: stage 2 running\r\n"
msg_installing: .asciz "bootdisk: installing onto the first hard disk\r\n"
msg_installed: .asciz "bootdisk: installed; the hard disk boots now\r\n"
msg_installfail: .asciz "bootdisk: FAIL int 13h could not write the hard disk\r\n"
msg_waited: .asciz "bootdisk: waited 50 ms through int 15h\r\n"
msg_nordsp: .asciz "bootdisk: FAIL no ACPI RSDP in 0xe0000-0xfffff\r\n"
msg_nofadt: .asciz "bootdisk: FAIL no FADT in the XSDT\r\n"
msg_nos5: .asciz "bootdisk: FAIL no _S5_ package in the DSDT\r\n"
msg_badsum: .asciz "bootdisk: FAIL an ACPI table's checksum is wrong\r\n"
msg_acpi: .ascii "bootdisk: ACPI tables valid, S5 sleep type "
msg_acpi_typ: .asciz "?; powering off\r\n"
msg_alive: .asciz "bootdisk: FAIL still running after the S5 write\r\n"
    .balign 512
stage2_end:
