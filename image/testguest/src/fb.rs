//! Linear framebuffer: the `fb` action. Finds the framebuffer the way
//! Linux does, in `boot_params.screen_info`, and paints a known pattern.

use crate::io::{rd16, rd32, rd8, wr32, Global};
use crate::{fail, say, usermode};

/// `orig_video_isVGA` of a VESA linear framebuffer.
const VIDEO_TYPE_VLFB: u8 = 0x23;
/// `capabilities`: `ext_lfb_base` holds the base's high half.
const VIDEO_CAPABILITY_64BIT_BASE: u32 = 2;

/// Colour `fbfill` paints (XRGB8888).
pub const FILL: u32 = 0x336699;

/// The framebuffer `fb` found: base, width, height, stride (0 = none).
static FOUND: Global<(u64, u32, u32, u32)> = Global::new((0, 0, 0, 0));

/// The colour bars of the top half, left to right (XRGB8888).
const BARS: [u32; 8] = [0xffffff, 0xffff00, 0x00ffff, 0x00ff00, 0xff00ff, 0xff0000, 0x0000ff, 0x000000];

/// The pattern's pixel at (x, y) of a w x h screen: eight colour bars in
/// the top half, below them red = x, green = y, blue = x ^ y (low bytes).
pub fn pattern(x: u32, y: u32, w: u32, h: u32) -> u32 {
    if y < h / 2 {
        BARS[(x * 8 / w) as usize]
    } else {
        (x & 0xff) << 16 | (y & 0xff) << 8 | ((x ^ y) & 0xff)
    }
}

/// Action `fb`: `tg: fb <w>x<h> bpp=<d> stride=<s> base=0x<b> size=<bytes>`,
/// the pattern painted (at CPL 3, where stores run at full speed), then
/// `tg: fb painted`. Needs the Linux boot protocol (PVH has no
/// screen_info); the format must be XRGB8888 and lie below 4 GiB.
pub fn act_fb() {
    let bp = *crate::BOOT_PARAMS.get();
    if bp == 0 {
        fail!("fb no-boot-params (entered through PVH)");
        return;
    }
    // screen_info is the first member of boot_params.
    let kind = rd8(bp + 0x0f);
    if kind != VIDEO_TYPE_VLFB {
        fail!("fb no-framebuffer isVGA=0x{:x}", kind);
        return;
    }
    let w = u32::from(rd16(bp + 0x12));
    let h = u32::from(rd16(bp + 0x14));
    let depth = rd16(bp + 0x16);
    let mut base = u64::from(rd32(bp + 0x18));
    let size = u64::from(rd32(bp + 0x1c)) << 16;
    let stride = u32::from(rd16(bp + 0x24));
    let caps = rd32(bp + 0x36);
    if caps & VIDEO_CAPABILITY_64BIT_BASE != 0 {
        base |= u64::from(rd32(bp + 0x3a)) << 32;
    }
    let f = |o: u64| rd8(bp + o);
    say!("fb {}x{} bpp={} stride={} base=0x{:x} size={}", w, h, depth, stride, base, size);
    let layout = [f(0x26), f(0x27), f(0x28), f(0x29), f(0x2a), f(0x2b), f(0x2c), f(0x2d)];
    if depth != 32 || layout != [8, 16, 8, 8, 8, 0, 8, 24] {
        fail!("fb format depth={} rgbx={:?}", depth, layout);
        return;
    }
    let bytes = u64::from(stride) * u64::from(h);
    if w == 0 || h == 0 || stride < w * 4 || size < bytes || base + bytes > 0x1_0000_0000 {
        fail!("fb geometry w={} h={} stride={} size={} base=0x{:x}", w, h, stride, size, base);
        return;
    }
    *FOUND.get() = (base, w, h, stride);
    paint(|x, y| pattern(x, y, w, h));
    say!("fb painted");
}

/// Action `fbfill`: paints the framebuffer `fb` found in one colour,
/// 0x336699, then `tg: fb filled`.
pub fn act_fbfill() {
    if FOUND.get().0 == 0 {
        fail!("fb fill without a framebuffer (run fb first)");
        return;
    }
    paint(|_, _| FILL);
    say!("fb filled");
}

/// Sets every pixel to `f(x, y)`, at CPL 3 (where stores run at full speed).
fn paint(f: impl Fn(u32, u32) -> u32) {
    let (base, w, h, stride) = *FOUND.get();
    usermode::run(|| {
        for y in 0..h {
            let line = base + u64::from(y) * u64::from(stride);
            for x in 0..w {
                wr32(line + u64::from(x) * 4, f(x, y));
            }
        }
    });
}
