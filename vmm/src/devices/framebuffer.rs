//! The linear framebuffer: memory the guest draws into, 32 bits a pixel in
//! XRGB8888 (a little-endian u32: blue in the low byte, then green, red,
//! and an unused byte), one line after the other.
//!
//! It is an anonymous mapping of its own, not guest RAM: the VM hands it
//! to KVM as a separate memory slot at
//! [`FRAMEBUFFER_START`](crate::arch::layout::FRAMEBUFFER_START), so the
//! guest's stores land in it without a VM exit, and the RFB server copies
//! pixels out of it from its own threads. It lives as long as the VMM
//! process, across guest reboots, so the RFB server keeps one for all boots.
//!
//! KVM logs which of its pages the guest wrote ([`Framebuffer::changes`]),
//! so a client watching an idle screen costs one small ioctl a poll rather
//! than a comparison of every pixel.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

use crate::arch::layout::FRAMEBUFFER_MAX_SIZE;
use crate::bus::lock;
use crate::memory::AnonMapping;

/// Bytes a pixel takes.
pub const BYTES_PER_PIXEL: u32 = 4;
/// The guest is told the framebuffer's size in 64 KiB units (VESA's), so
/// the mapping is a multiple of that.
const SIZE_GRANULE: u64 = 64 * 1024;
/// Smallest width or height accepted.
pub const MIN_SIDE: u32 = 16;
/// Largest width or height accepted (Linux's screen_info holds u16 sides
/// and a u16 line length).
pub const MAX_SIDE: u32 = 4096;
/// The unit KVM logs writes in.
pub const PAGE_SIZE: u64 = 4096;
/// KVM's dirty log is fetched at most this often, however many clients ask.
const DIRTY_POLL_MIN: Duration = Duration::from_millis(10);

/// Errors creating a framebuffer.
#[derive(Debug, thiserror::Error)]
pub enum FramebufferError {
    /// The requested size is out of range.
    #[error(
        "framebuffer {width}x{height} is out of range ({MIN_SIDE} to {MAX_SIDE} pixels a side)"
    )]
    BadSize {
        /// Requested width.
        width: u32,
        /// Requested height.
        height: u32,
    },
    /// mmap failed.
    #[error("cannot map a {0}-byte framebuffer: {1}")]
    Map(u64, std::io::Error),
}

/// A framebuffer's memory and shape.
pub struct Framebuffer {
    map: AnonMapping,
    width: AtomicU32,
    height: AtomicU32,
    /// Counts changes of size, so readers notice one.
    resizes: AtomicU64,
    /// RFB clients connected to it: a device drawing into it draws only for them.
    viewers: AtomicUsize,
    tracking: Mutex<Tracking>,
}

/// What is known of the guest's writes.
struct Tracking {
    /// The VM whose memory slot logs them, and the slot.
    vm: Option<(Arc<VmFd>, u32)>,
    /// Per page, the generation in which a write to it was last seen.
    pages: Vec<u64>,
    /// Counts dirty-log fetches (and host-side writes).
    generation: u64,
    polled: Option<Instant>,
}

impl Framebuffer {
    /// Maps a black framebuffer of `width` x `height` pixels.
    pub fn new(width: u32, height: u32) -> Result<Framebuffer, FramebufferError> {
        let bad = FramebufferError::BadSize { width, height };
        if !(MIN_SIDE..=MAX_SIDE).contains(&width) || !(MIN_SIDE..=MAX_SIDE).contains(&height) {
            return Err(bad);
        }
        let bytes = u64::from(width) * u64::from(height) * u64::from(BYTES_PER_PIXEL);
        let size = bytes.div_ceil(SIZE_GRANULE) * SIZE_GRANULE;
        if size > FRAMEBUFFER_MAX_SIZE {
            return Err(bad);
        }
        let len = usize::try_from(size).map_err(|_| bad)?;
        let map = AnonMapping::new(len).map_err(|e| FramebufferError::Map(size, e))?;
        Ok(Framebuffer {
            map,
            width: AtomicU32::new(width),
            height: AtomicU32::new(height),
            resizes: AtomicU64::new(0),
            viewers: AtomicUsize::new(0),
            tracking: Mutex::new(Tracking {
                vm: None,
                pages: vec![0; (size / PAGE_SIZE) as usize],
                generation: 0,
                polled: None,
            }),
        })
    }

    /// From now on learns of the guest's writes from `vm`'s dirty log of
    /// memory slot `slot`, which maps this framebuffer with
    /// `KVM_MEM_LOG_DIRTY_PAGES`.
    pub fn track(&self, vm: Arc<VmFd>, slot: u32) {
        let mut t = lock(&self.tracking);
        t.vm = Some((vm, slot));
        t.polled = None;
    }

    /// Stops asking the VM (it is being torn down); until the next
    /// [`Self::track`], every page counts as possibly changed.
    pub fn untrack(&self) {
        lock(&self.tracking).vm = None;
    }

    /// When each page last changed: fills `out` with a generation per page
    /// ([`PAGE_SIZE`] bytes from the start) and returns the current one;
    /// a page changed after a reader's last look when its generation is
    /// greater than the one returned then. `None` when no VM reports its
    /// writes: then any page may have changed.
    pub fn changes(&self, out: &mut Vec<u64>) -> Option<u64> {
        let mut t = lock(&self.tracking);
        let (vm, slot) = t.vm.clone()?;
        if t.polled.is_none_or(|p| p.elapsed() >= DIRTY_POLL_MIN) {
            match vm.get_dirty_log(slot, self.map.len()) {
                Ok(bitmap) => {
                    t.generation += 1;
                    let g = t.generation;
                    for (i, word) in bitmap.iter().enumerate() {
                        let mut bits = *word;
                        while bits != 0 {
                            let page = i * 64 + bits.trailing_zeros() as usize;
                            if let Some(p) = t.pages.get_mut(page) {
                                *p = g;
                            }
                            bits &= bits - 1;
                        }
                    }
                    t.polled = Some(Instant::now());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "KVM gives no dirty log of the framebuffer; comparing every pixel instead");
                    t.vm = None;
                    return None;
                }
            }
        }
        out.clear();
        out.extend_from_slice(&t.pages);
        Some(t.generation)
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width.load(Ordering::SeqCst)
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height.load(Ordering::SeqCst)
    }

    /// Bytes from one line to the next.
    pub fn stride(&self) -> u32 {
        self.width() * BYTES_PER_PIXEL
    }

    /// A viewer (an RFB client) comes; returns how many there were before.
    pub fn viewer_joined(&self) -> usize {
        self.viewers.fetch_add(1, Ordering::SeqCst)
    }

    /// A viewer leaves.
    pub fn viewer_left(&self) {
        self.viewers.fetch_sub(1, Ordering::SeqCst);
    }

    /// How many viewers it has.
    pub fn viewers(&self) -> usize {
        self.viewers.load(Ordering::SeqCst)
    }

    /// How many times the size changed; a reader that saw another count
    /// must read the size again.
    pub fn resizes(&self) -> u64 {
        self.resizes.load(Ordering::SeqCst)
    }

    /// Shows the `w` x `h` picture `pixels` (XRGB8888, line after line),
    /// changing the size first if it differs: what a display device that
    /// draws into this framebuffer itself (the VGA) does. Returns false,
    /// showing nothing, for a picture that does not fit the mapping.
    pub fn show(&self, w: u32, h: u32, pixels: &[u32]) -> bool {
        let n = w as usize * h as usize;
        if !(MIN_SIDE..=MAX_SIDE).contains(&w)
            || !(MIN_SIDE..=MAX_SIDE).contains(&h)
            || n * 4 > self.map.len()
            || pixels.len() < n
        {
            return false;
        }
        if (w, h) != (self.width(), self.height()) {
            self.width.store(w, Ordering::SeqCst);
            self.height.store(h, Ordering::SeqCst);
            self.resizes.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: n pixels fit the mapping (checked), which is ours and
        // 4-byte aligned; `pixels` does not overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(pixels.as_ptr(), self.map.as_ptr().cast::<u32>(), n)
        };
        true
    }

    /// Size of the mapping: what the guest sees, a multiple of 64 KiB.
    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    /// Host address of the mapping, for KVM's memory slot.
    pub fn host_address(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// Its whole memory, for a live migration (with the vCPUs paused).
    pub fn save(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.map.len()];
        // SAFETY: the mapping is `len` readable bytes, alive while self is; `out` is ours.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_ptr(), out.as_mut_ptr(), out.len()) };
        out
    }

    /// Takes a migrated framebuffer's memory; false, changing nothing, when its size differs.
    pub fn load(&self, bytes: &[u8]) -> bool {
        if bytes.len() != self.map.len() {
            return false;
        }
        // SAFETY: the mapping is `len` writable bytes, alive while self is; `bytes` is not it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.map.as_ptr(), bytes.len()) };
        // KVM logs only the guest's writes: this one marks every page.
        let mut t = lock(&self.tracking);
        t.generation += 1;
        let g = t.generation;
        t.pages.fill(g);
        true
    }

    /// Paints everything black, as firmware does before a boot.
    pub fn clear(&self) {
        // SAFETY: the mapping is `len` writable bytes, alive while self is.
        unsafe { std::ptr::write_bytes(self.map.as_ptr(), 0, self.map.len()) };
        // KVM logs only the guest's writes: this one marks every page.
        let mut t = lock(&self.tracking);
        t.generation += 1;
        let g = t.generation;
        t.pages.fill(g);
    }

    /// Copies the pixels of the rectangle at (`x`, `y`) of `w` x `h` into
    /// `dst`, line after line. Returns false, copying nothing, when the
    /// rectangle does not lie inside the framebuffer or `dst` is too small.
    pub fn read_rect(&self, x: u32, y: u32, w: u32, h: u32, dst: &mut [u32]) -> bool {
        let (width, height) = (self.width(), self.height());
        let inside = x.checked_add(w).is_some_and(|e| e <= width)
            && y.checked_add(h).is_some_and(|e| e <= height);
        let count = w as usize * h as usize;
        if !inside || dst.len() < count {
            return false;
        }
        for row in 0..h {
            let offset = ((y + row) as usize * width as usize + x as usize) * 4;
            let out = &mut dst[(row * w) as usize..((row + 1) * w) as usize];
            // SAFETY: the source line lies inside the mapping (checked
            // above), is 4-byte aligned (page-aligned base, whole pixels)
            // and does not overlap `out`, which is ours.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.map.as_ptr().add(offset).cast::<u32>(),
                    out.as_mut_ptr(),
                    w as usize,
                )
            };
        }
        true
    }

    /// Sets one pixel, as the guest would; for tests of the readers.
    #[cfg(test)]
    pub(crate) fn put(&self, x: u32, y: u32, xrgb: u32) {
        assert!(x < self.width() && y < self.height());
        let offset = (y as usize * self.width() as usize + x as usize) * 4;
        // SAFETY: inside the mapping (asserted), aligned to 4.
        unsafe { self.map.as_ptr().add(offset).cast::<u32>().write(xrgb) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_to_64k_and_absurd_ones_are_refused() {
        let fb = Framebuffer::new(1024, 768).unwrap();
        assert_eq!(fb.size(), 3 << 20);
        assert_eq!(fb.stride(), 4096);
        assert_eq!(Framebuffer::new(100, 100).unwrap().size(), 64 * 1024);
        assert!(Framebuffer::new(0, 768).is_err());
        assert!(Framebuffer::new(1024, 5000).is_err());
    }

    #[test]
    fn a_display_shows_pictures_of_any_size_that_fits() {
        let fb = Framebuffer::new(1024, 768).unwrap();
        assert_eq!(fb.resizes(), 0);
        let pic = vec![0x0011_2233u32; 720 * 400];
        assert!(fb.show(720, 400, &pic));
        assert_eq!((fb.width(), fb.height(), fb.resizes()), (720, 400, 1));
        assert!(fb.show(720, 400, &pic));
        assert_eq!(fb.resizes(), 1, "same size: no resize");
        let mut d = vec![0u32; 1];
        assert!(fb.read_rect(719, 399, 1, 1, &mut d));
        assert_eq!(d[0], 0x0011_2233);
        assert!(!fb.read_rect(720, 0, 1, 1, &mut d));
        assert!(!fb.show(2048, 2048, &pic), "larger than the mapping");
        assert!(!fb.show(720, 400, &pic[..10]), "too few pixels");
        assert!(!fb.show(8, 8, &pic));
    }

    #[test]
    fn rectangles_read_back_and_out_of_bounds_is_refused() {
        let fb = Framebuffer::new(64, 32).unwrap();
        fb.put(10, 5, 0x00ff_0000);
        fb.put(11, 6, 0x0000_ff00);
        let mut d = vec![0u32; 4];
        assert!(fb.read_rect(10, 5, 2, 2, &mut d));
        assert_eq!(d, vec![0x00ff_0000, 0, 0, 0x0000_ff00]);
        assert!(!fb.read_rect(63, 0, 2, 1, &mut d));
        assert!(!fb.read_rect(0, 31, 1, 2, &mut d));
        assert!(!fb.read_rect(u32::MAX, 0, 2, 1, &mut d));
        assert!(!fb.read_rect(0, 0, 5, 1, &mut d));
        fb.clear();
        assert!(fb.read_rect(10, 5, 2, 2, &mut d));
        assert_eq!(d, vec![0; 4]);
    }
}
