//! Where things live in guest physical memory and I/O space.
//!
//! One small file so that the boot code, the ACPI tables and the device
//! wiring agree on every address.

/// Real-mode IVT and BIOS data area end here; nothing of ours goes below.
pub const BOOT_GDT_START: u64 = 0x500;
/// Maximum number of GDT entries we write.
pub const BOOT_GDT_MAX: usize = 4;
/// An empty IDT: the guest installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, after the module list.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 of the identity map used for the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Four page directories (2 MiB pages) identity-mapping the first 4 GiB.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (Linux's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: usable RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first, so a legacy scan of 0xE0000-0xFFFFF finds it).
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI table area.
pub const ACPI_END: u64 = 0x10_0000;
/// Kernels load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: RAM below 4 GiB stops here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The framebuffer's window at the start of the MMIO hole: its own KVM
/// memory slot (not guest RAM), reserved in the e820 map.
pub const FRAMEBUFFER_START: u64 = 0xc000_0000;
/// Largest framebuffer the window holds (4096x4096 at 32 bits per pixel).
pub const FRAMEBUFFER_MAX_SIZE: u64 = 0x400_0000;
/// First virtio-mmio transport window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of each virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The in-kernel IOAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC of every vCPU.
pub const APIC_START: u64 = 0xfee0_0000;

/// ISA IRQ of the first serial port.
pub const SERIAL_IRQ: u32 = 4;
/// ISA IRQ of the keyboard controller.
pub const I8042_IRQ: u32 = 1;
/// ISA IRQ of the real-time clock's periodic interrupt.
pub const RTC_IRQ: u32 = 8;
/// ISA IRQ of the PS/2 mouse (the keyboard controller's auxiliary port).
pub const MOUSE_IRQ: u32 = 12;
/// ACPI system control interrupt.
pub const SCI_IRQ: u32 = 9;
/// IRQs handed to virtio-mmio devices, in order. Kept below 16 so that every
/// guest finds them routed as ISA interrupts without further firmware help.
pub const VIRTIO_IRQS: [u32; 8] = [5, 6, 7, 10, 11, 14, 15, 3];

/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// i8042 data port; the command/status port is at +4.
pub const I8042_PORT: u16 = 0x60;
/// ACPI PM1a event block (status u16, enable u16).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// ACPI PM timer.
pub const PM_TMR_PORT: u16 = 0x608;
/// Length of our ACPI fixed-hardware I/O block.
pub const ACPI_PM_LEN: u16 = 0xc;
/// PCI configuration mechanism #1: address at 0xCF8, data at 0xCFC.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// PC reset control register, named as the FADT reset register.
pub const RESET_PORT: u16 = 0xcf9;
