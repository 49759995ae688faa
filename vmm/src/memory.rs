//! Guest RAM: one memfd, mapped shared, so that a vhost-user backend in
//! another process can map the very same pages later.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest memory as the rest of the VMM sees it. Every write the VMM itself makes into it (its
/// devices' data, used rings, status bytes) is marked in each region's bitmap, one bit a page:
/// what KVM's dirty log does not see, and a live migration must send again.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Errors while setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the memfd backing guest RAM: {0}")]
    Memfd(std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size guest RAM to {0} bytes: {1}")]
    Size(u64, std::io::Error),
    /// Mapping failed.
    #[error("cannot map guest RAM: {0}")]
    Map(vm_memory::mmap::FromRangesError),
    /// Size is zero or too large.
    #[error("guest RAM size {0} MiB is out of range (16 MiB to 1 TiB)")]
    BadSize(u64),
}

/// The guest-physical ranges holding `size` bytes of RAM: below the 32-bit
/// MMIO hole first, the rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

/// Where the legacy VGA window lies: with a VGA device, guest RAM leaves it
/// out so the device sees the accesses.
pub const VGA_WINDOW: (u64, u64) = (0xa_0000, 0xc_0000);

/// Creates guest RAM of `mib` MiB backed by one memfd.
pub fn create(mib: u64) -> Result<(GuestMemory, File), MemoryError> {
    create_with(mib, false)
}

/// Creates guest RAM of `mib` MiB backed by one memfd, leaving the legacy
/// VGA window out if `vga_hole`. A region's offset in the memfd is always
/// its guest address below 4 GiB, so a backend mapping the memfd finds the
/// same bytes.
pub fn create_with(mib: u64, vga_hole: bool) -> Result<(GuestMemory, File), MemoryError> {
    if !(16..=1 << 20).contains(&mib) {
        return Err(MemoryError::BadSize(mib));
    }
    create_bytes(mib << 20, vga_hole)
}

/// Memory of the VMM's own that a vhost-user backend maps like guest RAM (a SATA disk's ring
/// and buffer): `bytes` long, a whole number of pages, at addresses from 0.
pub fn private(bytes: u64) -> Result<(GuestMemory, File), MemoryError> {
    create_bytes(bytes.next_multiple_of(4096), false)
}

fn create_bytes(size: u64, vga_hole: bool) -> Result<(GuestMemory, File), MemoryError> {
    let name = CString::new("enspeed-guest-ram").expect("no NUL in literal");
    // SAFETY: name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| MemoryError::Size(size, e))?;

    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (base, len) in ram_ranges(size) {
        let mut pieces = vec![(base.0, len, offset)];
        if vga_hole && base.0 == 0 && len > VGA_WINDOW.1 {
            pieces = vec![
                (0, VGA_WINDOW.0, offset),
                (VGA_WINDOW.1, len - VGA_WINDOW.1, offset + VGA_WINDOW.1),
            ];
        }
        for (at, n, off) in pieces {
            let clone = file.try_clone().map_err(MemoryError::Memfd)?;
            let region = GuestRegionMmap::from_range(
                GuestAddress(at),
                n as usize,
                Some(FileOffset::new(clone, off)),
            )
            .map_err(MemoryError::Map)?;
            regions.push(region);
        }
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| MemoryError::Map(vm_memory::mmap::FromRangesError::Collection(e)))?;
    Ok((mem, file))
}

/// Anonymous private memory outside guest RAM (the framebuffer, the
/// firmware image), mapped at an address the kernel chooses and unmapped
/// when dropped.
pub struct AnonMapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value until drop; its
// users copy in and out through raw pointers, never handing out references.
unsafe impl Send for AnonMapping {}
// SAFETY: as for Send.
unsafe impl Sync for AnonMapping {}

impl AnonMapping {
    /// Maps `len` zeroed, writable bytes.
    pub fn new(len: usize) -> std::io::Result<AnonMapping> {
        // SAFETY: an anonymous private mapping at an address the kernel
        // chooses; the result is checked before use and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(AnonMapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Where it is mapped.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: ptr and len are what mmap returned in `new`; whoever gave
        // the mapping to a VM keeps it until that VM is gone.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn the_vga_window_is_left_out_at_its_own_offset() {
        let (mem, _f) = create_with(64, true).unwrap();
        assert_eq!(mem.num_regions(), 2);
        assert!(mem.read_obj::<u8>(GuestAddress(0xb_8000)).is_err());
        mem.write_obj(7u8, GuestAddress(0xc_0000)).unwrap();
        let r = mem.find_region(GuestAddress(0xc_0000)).unwrap();
        assert_eq!(r.file_offset().unwrap().start(), 0xc_0000);
    }

    #[test]
    fn small_ram_is_one_region() {
        let (mem, _f) = create(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(mem.read_obj::<u8>(GuestAddress(64 << 20)).is_err());
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            r[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(matches!(create(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(create(1 << 30), Err(MemoryError::BadSize(_))));
    }
}
