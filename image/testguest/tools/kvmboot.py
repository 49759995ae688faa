#!/usr/bin/env python3
"""Minimal KVM loader for the Linux x86 64-bit boot protocol entry.

QEMU's -kernel boots the test guest through PVH; this script exercises the
other entry (the one EnSpeed's VMM uses): ELF segments at p_paddr, a
boot_params "zero page" with cmd_line_ptr, 64-bit long mode with the
loader's own GDT and page tables, RSI = boot_params, jump to e_entry.
COM1 output goes to stdout; no devices other than the UART (MMIO reads
return 0, which the guest reports as bad magic).

Usage: kvmboot.py ELF "command line" [max_seconds]
Exit code 0 when the guest halted, 1 otherwise.

TG_FAKE=badid|idxjump|biglen|silent adds a misbehaving virtio-blk at
0xd0000000 (put virtio_mmio.device=512@0xd0000000:5 on the command line):
on every notify it completes with an out-of-range id, jumps the used index,
reports an oversized length, or never answers. The guest must print a
`tg: FAIL` line in each case, never hang.
"""
import ctypes
import fcntl
import mmap
import os
import struct
import sys
import time

KVMIO = 0xAE


def _ioc(d, nr, size):
    return (d << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_CREATE_VM = _ioc(0, 0x01, 0)
KVM_GET_VCPU_MMAP_SIZE = _ioc(0, 0x04, 0)
KVM_GET_SUPPORTED_CPUID = _ioc(3, 0x05, 8)
KVM_CREATE_VCPU = _ioc(0, 0x41, 0)
KVM_SET_USER_MEMORY_REGION = _ioc(1, 0x46, 32)
KVM_SET_TSS_ADDR = _ioc(0, 0x47, 0)
KVM_RUN = _ioc(0, 0x80, 0)
KVM_GET_REGS = _ioc(2, 0x81, 144)
KVM_SET_REGS = _ioc(1, 0x82, 144)
KVM_GET_SREGS = _ioc(2, 0x83, 312)
KVM_SET_SREGS = _ioc(1, 0x84, 312)
KVM_SET_CPUID2 = _ioc(1, 0x90, 8)

MEM = 64 << 20
BOOT_PARAMS = 0x7000
CMDLINE = 0x20000
LOADER_GDT = 0x500
LOADER_PML4 = 0x9000  # loader's tables: identity map of 1 GiB
LOADER_STACK = 0x8FF0


def load_elf(mem, path):
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not ELF64"
    entry, phoff = struct.unpack_from("<QQ", data, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _fl, off, vaddr, paddr, filesz, memsz, _al = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type != 1:
            continue
        assert paddr == vaddr, "p_paddr != p_vaddr"
        mem[paddr:paddr + filesz] = data[off:off + filesz]
        # Leave .bss as garbage on purpose: the guest must zero it itself.
        mem[paddr + filesz:paddr + memsz] = b"\xa5" * (memsz - filesz)
    return entry


def seg(base, limit, sel, typ, s=1, l=0, db=0, g=1):
    # struct kvm_segment: base, limit, selector, type, present, dpl, db, s,
    # l, g, avl, unusable, padding
    return struct.pack("<QIHBBBBBBBBBx", base, limit, sel, typ, 1, 0, db, s, l, g, 0, 0)


FAKE_BASE = 0xd0000000


class FakeBlk:
    """A virtio-mmio v2 block device that returns garbage (see TG_FAKE)."""

    def __init__(self, mode, mem):
        self.mode, self.mem = mode, mem
        self.status = self.fsel = self.used = self.avail = 0
        self.used_idx = 0

    def read(self, off):
        return {0x000: 0x74726976, 0x004: 2, 0x008: 2, 0x00c: 0x554d4551,
                0x010: 1 if self.fsel == 1 else 0,  # VERSION_1 only
                0x034: 256, 0x070: self.status, 0x100: 2048}.get(off, 0)

    def write(self, off, v):
        if off == 0x014:
            self.fsel = v
        elif off == 0x070:
            self.status = v
        elif off in (0x090, 0x094, 0x0a0, 0x0a4):
            name = "avail" if off < 0x0a0 else "used"
            cur = getattr(self, name)
            if off & 4:
                setattr(self, name, (cur & 0xffffffff) | v << 32)
            else:
                setattr(self, name, (cur & ~0xffffffff) | v)
        elif off == 0x050:
            self.notify()

    def notify(self):
        m = self.mem
        if self.mode == "silent":
            return
        aidx = struct.unpack_from("<H", m, self.avail + 2)[0]
        head = struct.unpack_from("<H", m, self.avail + 4 + 2 * ((aidx - 1) % 256))[0]
        ident, length, step = {"badid": (999, 1, 1), "idxjump": (head, 1, 1000),
                               "biglen": (head, 1 << 20, 1)}[self.mode]
        slot = self.used + 4 + 8 * (self.used_idx % 256)
        m[slot:slot + 8] = struct.pack("<II", ident, length)
        self.used_idx = (self.used_idx + step) & 0xffff
        m[self.used + 2:self.used + 4] = struct.pack("<H", self.used_idx)


def main():
    elf, cmdline = sys.argv[1], sys.argv[2].encode()
    limit = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    mem = mmap.mmap(-1, MEM, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fcntl.ioctl(vm, KVM_SET_TSS_ADDR, 0x7fffd000)  # unused GPA (Intel VMX needs it)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("<IIQQQ", 0, 0, 0, MEM, addr))

    entry = load_elf(mem, elf)
    mem[CMDLINE:CMDLINE + len(cmdline) + 1] = cmdline + b"\0"
    bp = bytearray(4096)
    struct.pack_into("<I", bp, 0x228, CMDLINE)     # hdr.cmd_line_ptr
    struct.pack_into("<I", bp, 0x0c8, 0)           # ext_cmd_line_ptr
    struct.pack_into("<Q", bp, 0x070, 0)           # acpi_rsdp_addr: none
    struct.pack_into("<I", bp, 0x202, 0x53726448)  # "HdrS"
    mem[BOOT_PARAMS:BOOT_PARAMS + 4096] = bytes(bp)
    # Loader GDT with *different* selectors than the guest's, to show the
    # guest does not depend on them: 0x10 code64, 0x18 data.
    gdt = struct.pack("<QQQQ", 0, 0, 0x00af9b000000ffff, 0x00cf93000000ffff)
    mem[LOADER_GDT:LOADER_GDT + len(gdt)] = gdt
    pdpt, pd = LOADER_PML4 + 0x1000, LOADER_PML4 + 0x2000
    mem[LOADER_PML4:LOADER_PML4 + 8] = struct.pack("<Q", pdpt | 3)
    mem[pdpt:pdpt + 8] = struct.pack("<Q", pd | 3)
    for i in range(512):
        mem[pd + 8 * i:pd + 8 * i + 8] = struct.pack("<Q", (i << 21) | 0x83)

    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    n = 128
    buf = bytearray(struct.pack("<II", n, 0) + bytes(40 * n))
    fcntl.ioctl(kvm, KVM_GET_SUPPORTED_CPUID, buf)
    nent = struct.unpack_from("<I", buf, 0)[0]
    fcntl.ioctl(vcpu, KVM_SET_CPUID2, buf)  # mutable: no 1024-byte limit

    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    code = seg(0, 0xffffffff, 0x10, 11, l=1)
    data = seg(0, 0xffffffff, 0x18, 3, db=1)
    for i, s in enumerate([code, data, data, data, data, data]):  # cs ds es fs gs ss
        sregs[i * 24:(i + 1) * 24] = s
    struct.pack_into("<QH", sregs, 192 + 0, LOADER_GDT, len(gdt) - 1)  # gdt
    cr0 = 0x80000000 | 0x10 | 0x1 | 0x20  # PG ET PE NE
    struct.pack_into("<QQQQQQ", sregs, 224, cr0, 0, LOADER_PML4, 0x20, 0, 0x500)
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(144)
    struct.pack_into("<Q", regs, 4 * 8, BOOT_PARAMS)  # rsi
    struct.pack_into("<Q", regs, 6 * 8, LOADER_STACK)  # rsp
    struct.pack_into("<QQ", regs, 16 * 8, entry, 2)  # rip, rflags
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))

    fake = FakeBlk(os.environ["TG_FAKE"], mem) if os.environ.get("TG_FAKE") else None
    size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    run = mmap.mmap(vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    out = sys.stdout.buffer
    deadline = time.time() + limit
    dlab = False  # with LCR.DLAB set, 0x3f8 is the divisor latch, not data
    while time.time() < deadline:
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        reason = struct.unpack_from("<I", run, 8)[0]
        if reason == 2:  # KVM_EXIT_IO
            direction, sz, port, count, off = struct.unpack_from("<BBHIQ", run, 32)
            if direction == 1 and port == 0x3fb:
                dlab = bool(run[off] & 0x80)
            elif direction == 1 and port == 0x3f8 and not dlab:
                out.write(bytes(run[off:off + sz * count]))
                out.flush()
            elif direction == 0:
                val = 0x60 if port == 0x3fd else 0  # LSR: THR empty
                run[off:off + sz * count] = bytes([val]) * (sz * count)
        elif reason == 6:  # KVM_EXIT_MMIO
            phys, data, length, is_write = struct.unpack_from("<Q8sIB", run, 32)
            off = phys - FAKE_BASE
            if fake and 0 <= off < 0x200:
                if is_write:
                    fake.write(off, int.from_bytes(data[:length], "little"))
                else:
                    run[40:48] = fake.read(off).to_bytes(8, "little")
            elif not is_write:
                run[40:48] = bytes(8)  # no device: reads see zeros
        elif reason == 5:  # KVM_EXIT_HLT
            print("kvmboot: guest halted", file=sys.stderr)
            return 0
        else:
            print("kvmboot: exit reason %d" % reason, file=sys.stderr)
            return 1
    print("kvmboot: timeout", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
