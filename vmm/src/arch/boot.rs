//! Direct kernel boot: load a bzImage or an ELF (PVH or 64-bit entry), the
//! initrd and the command line, and write the boot data the entry expects.

use std::fs::File;
use std::path::Path;

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;
use super::regs::EntryMode;
use crate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Offset of the 64-bit entry point in a loaded bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors while loading the kernel and its boot data.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {err}")]
    OpenKernel {
        /// Kernel path.
        path: String,
        /// Cause.
        err: std::io::Error,
    },
    /// The kernel is neither a bzImage nor a loadable ELF.
    #[error("cannot load kernel {path}: not a bzImage ({bz}) nor an ELF ({elf})")]
    LoadKernel {
        /// Kernel path.
        path: String,
        /// Why the bzImage loader refused it.
        bz: linux_loader::loader::Error,
        /// Why the ELF loader refused it.
        elf: linux_loader::loader::Error,
    },
    /// The initrd could not be read or does not fit.
    #[error("cannot load initrd {path}: {why}")]
    Initrd {
        /// Initrd path.
        path: String,
        /// Cause.
        why: String,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot data failed.
    #[error("cannot write boot data: {0}")]
    BootData(String),
}

/// `screen_info.orig_video_isVGA` of a VESA linear framebuffer.
const VIDEO_TYPE_VLFB: u8 = 0x23;
/// `screen_info.capabilities`: `ext_lfb_base` holds the base's high half.
const VIDEO_CAPABILITY_64BIT_BASE: u32 = 1 << 1;

/// A linear framebuffer to tell the guest about: 32 bits a pixel, XRGB8888.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearFramebuffer {
    /// Guest-physical address.
    pub base: u64,
    /// Bytes mapped there, a multiple of 64 KiB.
    pub size: u64,
    /// Width in pixels.
    pub width: u16,
    /// Height in pixels.
    pub height: u16,
    /// Bytes from one line to the next.
    pub stride: u16,
}

/// Fills Linux's `screen_info` so that it finds a VESA linear framebuffer
/// (sysfb registers it for vesafb, or simplefb where configured).
fn screen_info(params: &mut boot_params, fb: &LinearFramebuffer) {
    let si = &mut params.screen_info;
    si.orig_video_isVGA = VIDEO_TYPE_VLFB;
    si.lfb_width = fb.width;
    si.lfb_height = fb.height;
    si.lfb_depth = 32;
    si.lfb_linelength = fb.stride;
    si.lfb_base = fb.base as u32;
    if fb.base >> 32 != 0 {
        si.ext_lfb_base = (fb.base >> 32) as u32;
        si.capabilities |= VIDEO_CAPABILITY_64BIT_BASE;
    }
    // In 64 KiB units for a VESA framebuffer.
    si.lfb_size = u32::try_from(fb.size >> 16).unwrap_or(u32::MAX);
    (si.red_size, si.red_pos) = (8, 16);
    (si.green_size, si.green_pos) = (8, 8);
    (si.blue_size, si.blue_pos) = (8, 0);
    (si.rsvd_size, si.rsvd_pos) = (8, 24);
}

/// What the loaders produced: where to enter and where the initrd is.
#[derive(Debug)]
pub struct LoadedKernel {
    /// How and where to enter the guest.
    pub entry: EntryMode,
    setup_header: Option<linux_loader::bootparam::setup_header>,
}

/// Loads the kernel image at its preferred address.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<LoadedKernel, BootError> {
    let open = || {
        File::open(path).map_err(|err| BootError::OpenKernel {
            path: path.display().to_string(),
            err,
        })
    };
    let bz = match BzImage::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: EntryMode::Linux64 {
                    entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                },
                setup_header: r.setup_header,
            })
        }
        Err(e) => e,
    };
    match Elf::load(mem, None, &mut open()?, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => EntryMode::Pvh {
                    entry: a.raw_value(),
                },
                _ => EntryMode::Linux64 {
                    entry: r.kernel_load.raw_value(),
                },
            };
            Ok(LoadedKernel {
                entry,
                setup_header: None,
            })
        }
        Err(elf) => Err(BootError::LoadKernel {
            path: path.display().to_string(),
            bz,
            elf,
        }),
    }
}

/// Loads the initrd at the top of low RAM, page aligned. Returns (address, size).
pub fn load_initrd(mem: &GuestMemory, path: &Path) -> Result<(GuestAddress, u64), BootError> {
    let err = |why: String| BootError::Initrd {
        path: path.display().to_string(),
        why,
    };
    let mut f = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.last_addr().raw_value() + 1)
        .ok_or_else(|| err("no guest RAM".into()))?;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= HIMEM_START)
        .ok_or_else(|| err(format!("{size} bytes do not fit in guest RAM")))?;
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| err(e.to_string()))?;
    Ok((GuestAddress(addr), size))
}

/// The memory map the guest is told about: [start, end) ranges and their
/// types, in address order.
fn memory_map(mem: &GuestMemory, fb: Option<&LinearFramebuffer>) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (ACPI_START, ACPI_END, E820_RESERVED),
    ];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.last_addr().raw_value() + 1;
        if start < end {
            map.push((start, end, E820_RAM));
        }
    }
    if let Some(fb) = fb {
        map.push((fb.base, fb.base.saturating_add(fb.size), E820_RESERVED));
    }
    map.sort_by_key(|e| e.0);
    map
}

/// Writes the command line and the boot data for `kernel`'s entry mode.
/// A framebuffer is reserved in the memory map either way, but only the
/// Linux boot protocol can describe it (PVH's start info has no place for
/// a screen).
pub fn write_boot_data(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: GuestAddress,
    fb: Option<&LinearFramebuffer>,
) -> Result<(), BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(format!("{e} (in {cmdline:?})")))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cl.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);
    let map = memory_map(mem, fb);

    match kernel.entry {
        EntryMode::Linux64 { .. } => {
            let mut params = boot_params::default();
            if let Some(hdr) = kernel.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = CMDLINE_START as u32;
            params.hdr.cmdline_size = cmdline_len as u32;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            if let Some((addr, size)) = initrd {
                params.hdr.ramdisk_image = addr.raw_value() as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            params.acpi_rsdp_addr = rsdp.raw_value();
            if let Some(fb) = fb {
                screen_info(&mut params, fb);
            }
            if map.len() > params.e820_table.len() {
                return Err(BootError::BootData("too many e820 entries".into()));
            }
            for (i, (start, end, kind)) in map.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry {
                    addr: *start,
                    size: end - start,
                    r#type: *kind,
                };
            }
            params.e820_entries = map.len() as u8;
            LinuxBootConfigurator::write_bootparams::<GuestMemory>(
                &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
            .map_err(|e| BootError::BootData(e.to_string()))
        }
        EntryMode::Pvh { .. } => {
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                rsdp_paddr: rsdp.raw_value(),
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: map.len() as u32,
                ..Default::default()
            };
            let entries: Vec<hvm_memmap_table_entry> = map
                .iter()
                .map(|(s, e, t)| hvm_memmap_table_entry {
                    addr: *s,
                    size: e - s,
                    type_: *t,
                    reserved: 0,
                })
                .collect();
            let mut params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
            if let Some((addr, size)) = initrd {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
                params = BootParams::new::<hvm_start_info>(&info, GuestAddress(PVH_INFO_START));
                let module = hvm_modlist_entry {
                    paddr: addr.raw_value(),
                    size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
            }
            params.set_sections(&entries, GuestAddress(PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
                .map_err(|e| BootError::BootData(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn e820_covers_low_and_high_ram_and_reserves_acpi() {
        let (mem, _f) = crate::memory::create(128).unwrap();
        let m = memory_map(&mem, None);
        assert_eq!(m[0], (0, EBDA_START, E820_RAM));
        assert_eq!(m[1], (ACPI_START, ACPI_END, E820_RESERVED));
        assert_eq!(m[2], (HIMEM_START, 128 << 20, E820_RAM));
        assert_eq!(m.len(), 3);
    }

    fn fb() -> LinearFramebuffer {
        LinearFramebuffer {
            base: FRAMEBUFFER_START,
            size: 3 << 20,
            width: 1024,
            height: 768,
            stride: 4096,
        }
    }

    #[test]
    fn framebuffer_is_reserved_and_described_in_screen_info() {
        let (mem, _f) = crate::memory::create(64).unwrap();
        let m = memory_map(&mem, Some(&fb()));
        assert_eq!(
            m.last(),
            Some(&(
                FRAMEBUFFER_START,
                FRAMEBUFFER_START + (3 << 20),
                E820_RESERVED
            ))
        );
        let k = LoadedKernel {
            entry: EntryMode::Linux64 { entry: 0x100000 },
            setup_header: None,
        };
        write_boot_data(&mem, &k, "", None, GuestAddress(ACPI_START), Some(&fb())).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let si = p.screen_info;
        assert_eq!(si.orig_video_isVGA, VIDEO_TYPE_VLFB);
        assert_eq!(
            ({ si.lfb_width }, { si.lfb_height }, { si.lfb_depth }, {
                si.lfb_linelength
            }),
            (1024, 768, 32, 4096)
        );
        assert_eq!(({ si.lfb_base }, { si.lfb_size }), (0xc000_0000, 48));
        assert_eq!(({ si.capabilities }, { si.ext_lfb_base }), (0, 0));
        assert_eq!(
            [si.red_size, si.red_pos, si.green_size, si.green_pos],
            [8, 16, 8, 8]
        );
        assert_eq!(
            [si.blue_size, si.blue_pos, si.rsvd_size, si.rsvd_pos],
            [8, 0, 8, 24]
        );
        // Byte offsets a guest reads (include/uapi/linux/screen_info.h).
        let mut raw = [0u8; 0x40];
        mem.read_slice(&mut raw, GuestAddress(ZERO_PAGE_START))
            .unwrap();
        assert_eq!(raw[0x0f], 0x23);
        assert_eq!(&raw[0x18..0x1c], &0xc000_0000u32.to_le_bytes());
        assert_eq!(&raw[0x24..0x26], &4096u16.to_le_bytes());
        // Above 4 GiB, the high half goes to ext_lfb_base.
        let high = LinearFramebuffer {
            base: 0x1_2000_0000,
            ..fb()
        };
        let mut p = boot_params::default();
        screen_info(&mut p, &high);
        assert_eq!(
            ({ p.screen_info.lfb_base }, { p.screen_info.ext_lfb_base }),
            (0x2000_0000, 1)
        );
        assert_eq!({ p.screen_info.capabilities }, VIDEO_CAPABILITY_64BIT_BASE);
    }

    #[test]
    fn garbage_kernel_is_refused_with_both_reasons() {
        let (mem, _f) = crate::memory::create(64).unwrap();
        let dir = std::env::temp_dir().join(format!("enspeed-boot-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5au8; 8192]).unwrap();
        let e = load_kernel(&mem, &dir).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(e, BootError::LoadKernel { .. }), "{e}");
    }

    #[test]
    fn linux_boot_params_carry_cmdline_initrd_and_rsdp() {
        let (mem, _f) = crate::memory::create(64).unwrap();
        let k = LoadedKernel {
            entry: EntryMode::Linux64 { entry: 0x100000 },
            setup_header: None,
        };
        write_boot_data(
            &mem,
            &k,
            "console=ttyS0 quiet",
            Some((GuestAddress(0x300_0000), 4096)),
            GuestAddress(ACPI_START),
            None,
        )
        .unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries, 3);
        let mut s = [0u8; 19];
        mem.read_slice(&mut s, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&s, b"console=ttyS0 quiet");
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let (mem, _f) = crate::memory::create(64).unwrap();
        let k = LoadedKernel {
            entry: EntryMode::Pvh { entry: 0x100000 },
            setup_header: None,
        };
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            write_boot_data(&mem, &k, &long, None, GuestAddress(ACPI_START), None),
            Err(BootError::Cmdline(_))
        ));
    }
}
