//! What one client is sent: which parts of the framebuffer changed since
//! its last update (compared tile by tile with the frame last sent to it,
//! looking only at tiles whose pages KVM saw written), and their pixels in
//! the client's pixel format, Raw encoded or, for a client that lists it,
//! through the connection's zlib stream (the Zlib encoding: a text console's
//! screen is mostly one colour and shrinks a hundredfold).

use std::io::Write;

use flate2::{Compress, Compression, FlushCompress};

use super::wire::{
    PixelFormat, Rect, RectHeader, UpdateHeader, ENCODING_COMPRESS_LEVEL_0, ENCODING_RAW,
    ENCODING_ZLIB,
};
use crate::devices::framebuffer::{Framebuffer, PAGE_SIZE};

/// Side of the square tiles compared between frames.
pub const TILE: u32 = 64;

/// Converts framebuffer pixels (XRGB8888) to a client's pixel format.
pub struct Converter {
    bytes: usize,
    big_endian: bool,
    red: [u32; 256],
    green: [u32; 256],
    blue: [u32; 256],
}

impl Converter {
    /// A converter to `f`, which must have passed [`PixelFormat::check`].
    /// Channels narrower than 8 bits keep their top bits.
    pub fn new(f: &PixelFormat) -> Converter {
        let table = |max: u16, shift: u8| {
            let bits = 16 - max.leading_zeros();
            let drop = 8u32.saturating_sub(bits);
            let mut t = [0u32; 256];
            for (v, e) in t.iter_mut().enumerate() {
                *e = ((v as u32) >> drop)
                    .checked_shl(u32::from(shift))
                    .unwrap_or(0);
            }
            t
        };
        Converter {
            bytes: usize::from(f.bits_per_pixel / 8).max(1),
            big_endian: f.big_endian,
            red: table(f.red_max, f.red_shift),
            green: table(f.green_max, f.green_shift),
            blue: table(f.blue_max, f.blue_shift),
        }
    }

    /// Bytes a converted pixel takes.
    pub fn bytes_per_pixel(&self) -> usize {
        self.bytes
    }

    /// Appends `pixels`, converted, to `out`.
    pub fn convert(&self, pixels: &[u32], out: &mut Vec<u8>) {
        out.reserve(pixels.len() * self.bytes);
        for &p in pixels {
            let v = self.red[(p >> 16 & 0xff) as usize]
                | self.green[(p >> 8 & 0xff) as usize]
                | self.blue[(p & 0xff) as usize];
            match (self.bytes, self.big_endian) {
                (4, false) => out.extend(v.to_le_bytes()),
                (4, true) => out.extend(v.to_be_bytes()),
                (2, false) => out.extend((v as u16).to_le_bytes()),
                (2, true) => out.extend((v as u16).to_be_bytes()),
                _ => out.push(v as u8),
            }
        }
    }
}

/// The frame last sent to one client.
pub struct ClientFrame {
    width: u32,
    height: u32,
    /// What the client was last sent, XRGB8888, line after line.
    last: Vec<u32>,
    /// Per tile: sent at least once (else it counts as changed).
    sent: Vec<bool>,
    /// Per tile: the framebuffer's change generation when it was last
    /// compared whole.
    seen: Vec<u64>,
    /// Per page: generation of its last change (from the framebuffer).
    pages: Vec<u64>,
    stride: u64,
    tiles_x: u32,
    scratch: Vec<u32>,
    out: Vec<u8>,
    /// A rectangle's converted pixels, before they go through `zlib`.
    pixels: Vec<u8>,
    /// The connection's zlib stream, once the client chose Zlib: it lasts
    /// as long as the connection, as the client's inflater does.
    zlib: Option<Compress>,
    /// Whether rectangles are sent Zlib encoded (else Raw).
    use_zlib: bool,
}

impl ClientFrame {
    /// A client that has been sent nothing yet, of a `fb`-sized screen.
    pub fn new(fb: &Framebuffer) -> ClientFrame {
        let (width, height) = (fb.width(), fb.height());
        let tiles_x = width.div_ceil(TILE);
        let tiles = tiles_x as usize * height.div_ceil(TILE) as usize;
        ClientFrame {
            width,
            height,
            last: vec![0; width as usize * height as usize],
            sent: vec![false; tiles],
            seen: vec![0; tiles],
            pages: Vec::new(),
            stride: u64::from(fb.stride()),
            tiles_x,
            scratch: vec![0; (TILE * TILE) as usize],
            out: Vec::new(),
            pixels: Vec::new(),
            zlib: None,
            use_zlib: false,
        }
    }

    /// Starts over for a screen of `fb`'s new size: nothing sent yet. The
    /// encoding and its zlib stream go on, as the client's inflater does.
    pub fn resize(&mut self, fb: &Framebuffer) {
        let fresh = ClientFrame::new(fb);
        self.width = fresh.width;
        self.height = fresh.height;
        self.last = fresh.last;
        self.sent = fresh.sent;
        self.seen = fresh.seen;
        self.pages.clear();
        self.stride = fresh.stride;
        self.tiles_x = fresh.tiles_x;
    }

    /// Chooses the encoding from a SetEncodings list: Zlib if it is listed
    /// (compressing at the client's CompressLevel, else 1, the fastest),
    /// else Raw. The level is fixed when the stream starts, at the first
    /// list naming Zlib. Returns the encoding's name.
    pub fn choose_encoding(&mut self, list: &[i32]) -> &'static str {
        self.use_zlib = list.contains(&ENCODING_ZLIB);
        if self.use_zlib && self.zlib.is_none() {
            let level = list
                .iter()
                .find_map(|&e| {
                    let l = e.wrapping_sub(ENCODING_COMPRESS_LEVEL_0);
                    (0..=9).contains(&l).then_some(l as u32)
                })
                .unwrap_or(1);
            self.zlib = Some(Compress::new(Compression::new(level), true));
        }
        if self.use_zlib {
            "zlib"
        } else {
            "raw"
        }
    }

    /// The part of `area` inside the screen.
    fn clip(&self, area: Rect) -> Option<(u32, u32, u32, u32)> {
        let x0 = u32::from(area.x);
        let y0 = u32::from(area.y);
        let x1 = (x0 + u32::from(area.w)).min(self.width);
        let y1 = (y0 + u32::from(area.h)).min(self.height);
        (x0 < x1 && y0 < y1).then_some((x0, y0, x1, y1))
    }

    /// Reads the tiles of `area` from `fb` and returns the rectangles to
    /// send: the tiles whose pixels differ from what the client was last
    /// sent (every tile when `full`), adjacent ones in a row merged. The
    /// pixels read become the client's last frame. Tiles on pages the
    /// guest has not written since their last comparison are not read.
    pub fn changed(&mut self, fb: &Framebuffer, area: Rect, full: bool) -> Vec<Rect> {
        let mut rects: Vec<Rect> = Vec::new();
        let Some((x0, y0, x1, y1)) = self.clip(area) else {
            return rects;
        };
        let generation = fb.changes(&mut self.pages);
        for ty in y0 / TILE..=(y1 - 1) / TILE {
            let ry0 = (ty * TILE).max(y0);
            let ry1 = ((ty + 1) * TILE).min(y1);
            let mut run: Option<(u32, u32)> = None;
            for tx in x0 / TILE..=(x1 - 1) / TILE {
                let rx0 = (tx * TILE).max(x0);
                let rx1 = ((tx + 1) * TILE).min(x1);
                let (w, h) = (rx1 - rx0, ry1 - ry0);
                let tile = (ty * self.tiles_x + tx) as usize;
                let force = full || !self.sent[tile];
                let written = match generation {
                    Some(g) => {
                        let touched = self.written(rx0, ry0, rx1, ry1, self.seen[tile]);
                        let whole = rx0 == tx * TILE
                            && ry0 == ty * TILE
                            && rx1 == ((tx + 1) * TILE).min(self.width)
                            && ry1 == ((ty + 1) * TILE).min(self.height);
                        if whole {
                            self.seen[tile] = g;
                        }
                        touched
                    }
                    None => true,
                };
                let dirty = (force || written)
                    && fb.read_rect(rx0, ry0, w, h, &mut self.scratch)
                    && self.take(rx0, ry0, w, h, force);
                if dirty {
                    self.sent[tile] = true;
                    run = match run {
                        Some((a, b)) if b == rx0 => Some((a, rx1)),
                        Some((a, b)) => {
                            rects.push(rect(a, ry0, b - a, ry1 - ry0));
                            Some((rx0, rx1))
                        }
                        None => Some((rx0, rx1)),
                    };
                }
            }
            if let Some((a, b)) = run {
                rects.push(rect(a, ry0, b - a, ry1 - ry0));
            }
        }
        rects
    }

    /// Whether a page holding part of the rectangle [x0, x1) x [y0, y1)
    /// changed after generation `seen`.
    fn written(&self, x0: u32, y0: u32, x1: u32, y1: u32, seen: u64) -> bool {
        let first = (u64::from(y0) * self.stride + u64::from(x0) * 4) / PAGE_SIZE;
        let last = ((u64::from(y1) - 1) * self.stride + u64::from(x1) * 4 - 1) / PAGE_SIZE;
        let pages = self
            .pages
            .get(first as usize..=last as usize)
            .unwrap_or(&[]);
        // Outside what the log covers (cannot happen): look anyway.
        pages.is_empty() || pages.iter().any(|&g| g > seen)
    }

    /// Compares the scratch tile with the last frame; if it differs (or
    /// `force`), stores it there. Returns whether it was stored.
    fn take(&mut self, x: u32, y: u32, w: u32, h: u32, force: bool) -> bool {
        let mut differs = force;
        for row in 0..h as usize {
            let at = (y as usize + row) * self.width as usize + x as usize;
            let new = &self.scratch[row * w as usize..(row + 1) * w as usize];
            let old = &mut self.last[at..at + w as usize];
            if differs || old != new {
                differs = true;
                old.copy_from_slice(new);
            }
        }
        differs
    }

    /// Writes a FramebufferUpdate of `rects` (from [`Self::changed`]) in
    /// the chosen encoding, converted by `conv`.
    pub fn send(
        &mut self,
        rects: &[Rect],
        conv: &Converter,
        w: &mut impl Write,
    ) -> std::io::Result<()> {
        self.out.clear();
        let count = u16::try_from(rects.len()).unwrap_or(u16::MAX);
        UpdateHeader { rects: count }.encode(&mut self.out);
        let mut zlib = self.zlib.as_mut().filter(|_| self.use_zlib);
        let encoding = if zlib.is_some() {
            ENCODING_ZLIB
        } else {
            ENCODING_RAW
        };
        for r in &rects[..usize::from(count)] {
            RectHeader { rect: *r, encoding }.encode(&mut self.out);
            let pixels = if zlib.is_some() {
                self.pixels.clear();
                &mut self.pixels
            } else {
                &mut self.out
            };
            for row in 0..u32::from(r.h) {
                let at = (u32::from(r.y) + row) as usize * self.width as usize + usize::from(r.x);
                conv.convert(&self.last[at..at + usize::from(r.w)], pixels);
            }
            if let Some(z) = zlib.as_deref_mut() {
                let len_at = self.out.len();
                self.out.extend([0u8; 4]);
                deflate(z, &self.pixels, &mut self.out)?;
                let len = u32::try_from(self.out.len() - len_at - 4)
                    .map_err(|_| std::io::Error::other("compressed rectangle over 4 GiB"))?;
                self.out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
            }
            // Flush a rectangle at a time: memory stays bounded by one run
            // of tiles, whatever the screen size.
            w.write_all(&self.out)?;
            self.out.clear();
        }
        w.write_all(&self.out)
    }
}

/// Compresses `input` into `out` through the stream `z`, ending with a sync
/// flush so that the client can inflate all of it now.
fn deflate(z: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
    let start = z.total_in();
    loop {
        let done = usize::try_from(z.total_in() - start).unwrap_or(input.len());
        out.reserve(input.len() - done + 1024);
        z.compress_vec(&input[done..], out, FlushCompress::Sync)
            .map_err(std::io::Error::other)?;
        // Done once every byte went in and the flush did not fill the room.
        if z.total_in() - start == input.len() as u64 && out.len() < out.capacity() {
            return Ok(());
        }
    }
}

fn rect(x: u32, y: u32, w: u32, h: u32) -> Rect {
    // Every value is within the framebuffer, whose sides fit in u16.
    let c = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
    Rect {
        x: c(x),
        y: c(y),
        w: c(w),
        h: c(h),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(fb: &Framebuffer) -> Rect {
        rect(0, 0, fb.width(), fb.height())
    }

    #[test]
    fn first_update_sends_all_then_only_changed_tiles() {
        let fb = Framebuffer::new(200, 100).unwrap();
        let mut c = ClientFrame::new(&fb);
        // Never sent: even an incremental request gets everything, one
        // merged rectangle per tile row.
        let r = c.changed(&fb, whole(&fb), false);
        assert_eq!(r, vec![rect(0, 0, 200, 64), rect(0, 64, 200, 36)]);
        assert!(c.changed(&fb, whole(&fb), false).is_empty());
        fb.put(70, 10, 0x123456);
        fb.put(199, 99, 0xffffff);
        let r = c.changed(&fb, whole(&fb), false);
        assert_eq!(r, vec![rect(64, 0, 64, 64), rect(192, 64, 8, 36)]);
        // Two changed tiles side by side merge; a gap splits.
        fb.put(0, 0, 1);
        fb.put(64, 0, 1);
        fb.put(192, 0, 1);
        let r = c.changed(&fb, whole(&fb), false);
        assert_eq!(r, vec![rect(0, 0, 128, 64), rect(192, 0, 8, 64)]);
        // A full request resends the area, clipped to the screen.
        let r = c.changed(&fb, rect(150, 90, 1000, 1000), true);
        assert_eq!(r, vec![rect(150, 90, 50, 10)]);
        // Outside the screen: nothing.
        assert!(c.changed(&fb, rect(300, 0, 10, 10), true).is_empty());
        assert!(c.changed(&fb, rect(0, 0, 0, 10), true).is_empty());
    }

    #[test]
    fn only_tiles_on_written_pages_are_compared() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: no /dev/kvm for a dirty log");
            return;
        }
        let fb = Framebuffer::new(256, 64).unwrap();
        let vm = std::sync::Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: fb.size(),
            userspace_addr: fb.host_address(),
            flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
        };
        // SAFETY: fb outlives vm here (declared before it, dropped after).
        unsafe { vm.set_user_memory_region(r) }.unwrap();
        fb.track(vm.clone(), 0);
        let mut c = ClientFrame::new(&fb);
        assert_eq!(c.changed(&fb, whole(&fb), false).len(), 1);
        // A write KVM did not see (no guest ran) is not looked for...
        fb.put(10, 10, 0xffffff);
        assert!(c.changed(&fb, whole(&fb), false).is_empty());
        // ...but a full request reads everything, and the host's own
        // clear marks every page (only the tile that was not black differs).
        assert_eq!(
            c.changed(&fb, rect(0, 0, 64, 64), true),
            vec![rect(0, 0, 64, 64)]
        );
        fb.clear();
        assert_eq!(c.changed(&fb, whole(&fb), false), vec![rect(0, 0, 64, 64)]);
        // Without a VM, every tile is compared.
        fb.untrack();
        fb.put(100, 10, 0xffffff);
        assert_eq!(c.changed(&fb, whole(&fb), false), vec![rect(64, 0, 64, 64)]);
    }

    #[test]
    fn raw_update_carries_converted_pixels() {
        let fb = Framebuffer::new(16, 16).unwrap();
        fb.put(1, 0, 0x00ff_8040);
        let mut c = ClientFrame::new(&fb);
        let rects = c.changed(&fb, rect(0, 0, 2, 1), true);
        let bgr_be = PixelFormat {
            big_endian: true,
            red_shift: 0,
            blue_shift: 16,
            ..PixelFormat::XRGB8888
        };
        let mut out = Vec::new();
        c.send(&rects, &Converter::new(&bgr_be), &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                0, 0, 0, 1, // update, one rectangle
                0, 0, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0, // 2x1 at 0,0, Raw
                0, 0, 0, 0, // black
                0, 0x40, 0x80, 0xff, // BGR, big endian
            ]
        );
    }

    /// Splits an update into its rectangles' (header, payload) for one
    /// encoding; Zlib payloads are inflated through `inflate`, the client's
    /// stream.
    fn parse(
        out: &[u8],
        bpp: usize,
        inflate: &mut flate2::Decompress,
    ) -> Vec<(Rect, i32, Vec<u8>)> {
        assert_eq!(out[0], 0, "a FramebufferUpdate");
        let count = u16::from_be_bytes([out[2], out[3]]);
        let mut at = 4;
        let mut rects = Vec::new();
        for _ in 0..count {
            let h = &out[at..at + 12];
            let v = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
            let r = rect(v(0).into(), v(2).into(), v(4).into(), v(6).into());
            let enc = i32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            at += 12;
            let raw_len = usize::from(r.w) * usize::from(r.h) * bpp;
            let pixels = if enc == ENCODING_ZLIB {
                let len = u32::from_be_bytes(out[at..at + 4].try_into().unwrap()) as usize;
                at += 4;
                let mut raw = Vec::with_capacity(raw_len);
                inflate
                    .decompress_vec(&out[at..at + len], &mut raw, flate2::FlushDecompress::Sync)
                    .unwrap();
                at += len;
                raw
            } else {
                at += raw_len;
                out[at - raw_len..at].to_vec()
            };
            assert_eq!(pixels.len(), raw_len, "a whole rectangle of pixels");
            rects.push((r, enc, pixels));
        }
        assert_eq!(at, out.len(), "nothing after the last rectangle");
        rects
    }

    #[test]
    fn zlib_update_inflates_to_the_raw_pixels_through_one_stream() {
        let fb = Framebuffer::new(320, 200).unwrap();
        for x in 0..320 {
            fb.put(x, 70, 0x00aa_aaaa);
        }
        let conv = Converter::new(&PixelFormat::XRGB8888);
        let mut raw = ClientFrame::new(&fb);
        let mut zlib = ClientFrame::new(&fb);
        zlib.choose_encoding(&[
            7,
            ENCODING_ZLIB,
            ENCODING_RAW,
            ENCODING_COMPRESS_LEVEL_0 + 6,
        ]);
        let mut inflate = flate2::Decompress::new(true);
        let mut no_stream = flate2::Decompress::new(true);
        for round in 0..3 {
            // A change between rounds: the stream carries on from the last update.
            fb.put(round * 10, 150, 0x0012_3456);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let rects = raw.changed(&fb, whole(&fb), round == 0);
            raw.send(&rects, &conv, &mut a).unwrap();
            let rects = zlib.changed(&fb, whole(&fb), round == 0);
            zlib.send(&rects, &conv, &mut b).unwrap();
            let a = parse(&a, 4, &mut no_stream);
            let b = parse(&b, 4, &mut inflate);
            assert_eq!(a.len(), b.len());
            for ((ra, ea, pa), (rb, eb, pb)) in a.iter().zip(&b) {
                assert_eq!((ra, *ea, *eb), (rb, ENCODING_RAW, ENCODING_ZLIB));
                assert!(pa == pb, "round {round}: {ra:?} inflates to other pixels");
            }
        }
        // A mostly black screen: the whole of it in a small fraction of its raw size.
        let mut z = ClientFrame::new(&fb);
        z.choose_encoding(&[ENCODING_ZLIB]);
        let mut out = Vec::new();
        let rects = z.changed(&fb, whole(&fb), true);
        z.send(&rects, &conv, &mut out).unwrap();
        assert!(out.len() * 50 < 320 * 200 * 4, "{} bytes", out.len());
        // A client that drops Zlib gets Raw again.
        z.choose_encoding(&[ENCODING_RAW]);
        let mut out = Vec::new();
        let rects = z.changed(&fb, whole(&fb), true);
        z.send(&rects, &conv, &mut out).unwrap();
        assert!(parse(&out, 4, &mut no_stream)
            .iter()
            .all(|(_, e, _)| *e == ENCODING_RAW));
    }

    #[test]
    fn narrow_channels_keep_their_top_bits() {
        let rgb565 = PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
            ..PixelFormat::XRGB8888
        };
        let mut out = Vec::new();
        Converter::new(&rgb565).convert(&[0x00ff_8040, 0x00ff_ffff], &mut out);
        let v = u16::from_le_bytes([out[0], out[1]]);
        assert_eq!((v >> 11, v >> 5 & 63, v & 31), (31, 0x80 >> 2, 0x40 >> 3));
        assert_eq!(u16::from_le_bytes([out[2], out[3]]), 0xffff);
        let bgr233 = PixelFormat {
            bits_per_pixel: 8,
            depth: 8,
            red_max: 7,
            green_max: 7,
            blue_max: 3,
            red_shift: 0,
            green_shift: 3,
            blue_shift: 6,
            ..PixelFormat::XRGB8888
        };
        out.clear();
        Converter::new(&bgr233).convert(&[0x00ff_0000, 0x0000_00ff], &mut out);
        assert_eq!(out, vec![7, 3 << 6]);
    }
}
