//! A small RFB (VNC) client for tests: the 3.8 handshake with security
//! None, pixel formats, Raw framebuffer updates, key events. Written from
//! RFC 6143 apart from the VMM's server, so that the two check each other.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// X11 keysyms the tests type.
pub mod keysym {
    /// Left Shift.
    pub const SHIFT_L: u32 = 0xffe1;
    /// Left Control.
    pub const CONTROL_L: u32 = 0xffe3;
    /// Enter.
    pub const RETURN: u32 = 0xff0d;
    /// Backspace.
    pub const BACKSPACE: u32 = 0xff08;
    /// Up arrow.
    pub const UP: u32 = 0xff52;
    /// Down arrow.
    pub const DOWN: u32 = 0xff54;
    /// F1.
    pub const F1: u32 = 0xffbe;
}

/// A pixel format, as SetPixelFormat and ServerInit carry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelFormat {
    /// 8, 16 or 32.
    pub bits_per_pixel: u8,
    /// Useful bits.
    pub depth: u8,
    /// Multi-byte pixels are big endian.
    pub big_endian: bool,
    /// True colour (else a colour map).
    pub true_colour: bool,
    /// Largest red value.
    pub red_max: u16,
    /// Largest green value.
    pub green_max: u16,
    /// Largest blue value.
    pub blue_max: u16,
    /// Red's bit position.
    pub red_shift: u8,
    /// Green's bit position.
    pub green_shift: u8,
    /// Blue's bit position.
    pub blue_shift: u8,
}

impl PixelFormat {
    /// 32 bits, red at 16, green at 8, blue at 0, little endian.
    pub const XRGB32: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    /// 32 bits, blue at 16, red at 0, big endian.
    pub const BGR32_BE: PixelFormat = PixelFormat {
        big_endian: true,
        red_shift: 0,
        blue_shift: 16,
        ..PixelFormat::XRGB32
    };

    /// 16 bits, 5-6-5, little endian.
    pub const RGB565: PixelFormat = PixelFormat {
        bits_per_pixel: 16,
        depth: 16,
        big_endian: false,
        true_colour: true,
        red_max: 31,
        green_max: 63,
        blue_max: 31,
        red_shift: 11,
        green_shift: 5,
        blue_shift: 0,
    };

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = u8::from(self.true_colour);
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    fn from_bytes(b: &[u8]) -> PixelFormat {
        let u = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u(4),
            green_max: u(6),
            blue_max: u(8),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }

    /// Bytes per pixel.
    pub fn bytes(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// The (r, g, b) of one pixel's bytes, at the format's precision.
    pub fn decode(&self, b: &[u8]) -> (u16, u16, u16) {
        let mut v = 0u32;
        for i in 0..self.bytes() {
            let byte = if self.big_endian {
                b[i]
            } else {
                b[self.bytes() - 1 - i]
            };
            v = v << 8 | u32::from(byte);
        }
        let ch = |max: u16, shift: u8| ((v >> shift) & u32::from(max)) as u16;
        (
            ch(self.red_max, self.red_shift),
            ch(self.green_max, self.green_shift),
            ch(self.blue_max, self.blue_shift),
        )
    }

    /// What an XRGB8888 colour becomes at this format's precision: each
    /// channel's top bits.
    pub fn expect(&self, xrgb: u32) -> (u16, u16, u16) {
        let ch = |v: u32, max: u16| {
            let bits = 16 - max.leading_zeros();
            (v >> (8 - bits.min(8))) as u16
        };
        (
            ch(xrgb >> 16 & 0xff, self.red_max),
            ch(xrgb >> 8 & 0xff, self.green_max),
            ch(xrgb & 0xff, self.blue_max),
        )
    }
}

/// A connected client and its copy of the screen.
pub struct RfbClient {
    stream: UnixStream,
    /// Screen width.
    pub width: u16,
    /// Screen height.
    pub height: u16,
    /// Desktop name.
    pub name: String,
    /// The server's own pixel format, from ServerInit.
    pub server_format: PixelFormat,
    format: PixelFormat,
    /// The screen as received: raw pixel bytes in `format`.
    screen: Vec<u8>,
    /// The connection's zlib stream, for Zlib-encoded rectangles.
    inflate: flate2::Decompress,
    /// Bytes of FramebufferUpdates read so far.
    pub update_bytes: u64,
}

impl RfbClient {
    /// Connects to `path` (retrying until the socket exists, up to 10 s)
    /// and goes through the handshake.
    pub fn connect(path: &Path) -> std::io::Result<RfbClient> {
        let stream = connect_retrying(path)?;
        RfbClient::handshake(stream)
    }

    /// The 3.8 handshake with security None on an open connection.
    pub fn handshake(mut stream: UnixStream) -> std::io::Result<RfbClient> {
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut version = [0u8; 12];
        stream.read_exact(&mut version)?;
        if &version[..4] != b"RFB " {
            return Err(std::io::Error::other(format!("server version {version:?}")));
        }
        stream.write_all(b"RFB 003.008\n")?;
        let n = read_u8(&mut stream)?;
        let mut types = vec![0u8; usize::from(n)];
        stream.read_exact(&mut types)?;
        if !types.contains(&1) {
            return Err(std::io::Error::other(format!("security types {types:?}")));
        }
        stream.write_all(&[1])?;
        if read_u32(&mut stream)? != 0 {
            return Err(std::io::Error::other("security result: failed"));
        }
        stream.write_all(&[1])?; // shared
        let mut init = [0u8; 24];
        stream.read_exact(&mut init)?;
        let width = u16::from_be_bytes([init[0], init[1]]);
        let height = u16::from_be_bytes([init[2], init[3]]);
        let server_format = PixelFormat::from_bytes(&init[4..20]);
        let len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
        if len > 4096 {
            return Err(std::io::Error::other(format!("name of {len} bytes")));
        }
        let mut name = vec![0u8; len as usize];
        stream.read_exact(&mut name)?;
        let bytes = usize::from(width) * usize::from(height) * server_format.bytes();
        Ok(RfbClient {
            stream,
            width,
            height,
            name: String::from_utf8_lossy(&name).into_owned(),
            server_format,
            format: server_format,
            screen: vec![0; bytes],
            inflate: flate2::Decompress::new(true),
            update_bytes: 0,
        })
    }

    /// The connection, for sending what a well-behaved client would not.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Asks for pixels in `f` from now on.
    pub fn set_pixel_format(&mut self, f: PixelFormat) -> std::io::Result<()> {
        let mut m = vec![0u8, 0, 0, 0];
        m.extend(f.to_bytes());
        self.stream.write_all(&m)?;
        self.format = f;
        self.screen = vec![0; usize::from(self.width) * usize::from(self.height) * f.bytes()];
        Ok(())
    }

    /// Lists the encodings this client accepts.
    pub fn set_encodings(&mut self, list: &[i32]) -> std::io::Result<()> {
        let mut m = vec![2u8, 0];
        m.extend((list.len() as u16).to_be_bytes());
        for e in list {
            m.extend(e.to_be_bytes());
        }
        self.stream.write_all(&m)
    }

    /// Sends a FramebufferUpdateRequest.
    pub fn request(
        &mut self,
        incremental: bool,
        x: u16,
        y: u16,
        w: u16,
        h: u16,
    ) -> std::io::Result<()> {
        let mut m = vec![3u8, u8::from(incremental)];
        for v in [x, y, w, h] {
            m.extend(v.to_be_bytes());
        }
        self.stream.write_all(&m)
    }

    /// Reads one FramebufferUpdate (Raw or Zlib rectangles) into the screen
    /// copy; returns its rectangles as (x, y, w, h).
    pub fn read_update(&mut self) -> std::io::Result<Vec<(u16, u16, u16, u16)>> {
        let kind = read_u8(&mut self.stream)?;
        if kind != 0 {
            return Err(std::io::Error::other(format!("server message type {kind}")));
        }
        let mut h = [0u8; 3];
        self.stream.read_exact(&mut h)?;
        self.update_bytes += 4;
        let count = u16::from_be_bytes([h[1], h[2]]);
        let bpp = self.format.bytes();
        let mut rects = Vec::new();
        for _ in 0..count {
            let mut r = [0u8; 12];
            self.stream.read_exact(&mut r)?;
            self.update_bytes += 12;
            let v = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
            let (x, y, w, hh) = (v(0), v(2), v(4), v(6));
            let enc = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
            if enc == -223 {
                // DesktopSize: the screen is now w x hh; its pixels follow in later rectangles.
                self.width = w;
                self.height = hh;
                self.screen = vec![0; usize::from(w) * usize::from(hh) * bpp];
                rects.push((x, y, w, hh));
                continue;
            }
            if u32::from(x) + u32::from(w) > u32::from(self.width)
                || u32::from(y) + u32::from(hh) > u32::from(self.height)
            {
                return Err(std::io::Error::other(format!(
                    "rectangle {x},{y} {w}x{hh} outside the screen"
                )));
            }
            let size = usize::from(w) * usize::from(hh) * bpp;
            let pixels = match enc {
                0 => {
                    let mut raw = vec![0u8; size];
                    self.stream.read_exact(&mut raw)?;
                    self.update_bytes += size as u64;
                    raw
                }
                6 => {
                    let len = read_u32(&mut self.stream)? as usize;
                    let mut packed = vec![0u8; len];
                    self.stream.read_exact(&mut packed)?;
                    self.update_bytes += 4 + len as u64;
                    // One byte of room more than the rectangle: a stream that
                    // inflates to too much shows as a wrong length.
                    let mut raw = Vec::with_capacity(size + 1);
                    self.inflate
                        .decompress_vec(&packed, &mut raw, flate2::FlushDecompress::Sync)
                        .map_err(|e| std::io::Error::other(format!("zlib: {e}")))?;
                    if raw.len() != size {
                        return Err(std::io::Error::other(format!(
                            "Zlib rectangle {x},{y} {w}x{hh} inflates to {} bytes, not {size}",
                            raw.len()
                        )));
                    }
                    raw
                }
                _ => return Err(std::io::Error::other(format!("encoding {enc}"))),
            };
            let line = usize::from(w) * bpp;
            for row in 0..usize::from(hh) {
                let at = ((usize::from(y) + row) * usize::from(self.width) + usize::from(x)) * bpp;
                self.screen[at..at + line].copy_from_slice(&pixels[row * line..(row + 1) * line]);
            }
            rects.push((x, y, w, hh));
        }
        Ok(rects)
    }

    /// Moves the pointer to (`x`, `y`) with `buttons` held (bit 0 left).
    pub fn pointer(&mut self, x: u16, y: u16, buttons: u8) -> std::io::Result<()> {
        let mut m = vec![5u8, buttons];
        m.extend(x.to_be_bytes());
        m.extend(y.to_be_bytes());
        self.stream.write_all(&m)
    }

    /// Sends clipboard text (ISO 8859-1).
    pub fn cut_text(&mut self, text: &[u8]) -> std::io::Result<()> {
        let mut m = vec![6u8, 0, 0, 0];
        m.extend((text.len() as u32).to_be_bytes());
        m.extend(text);
        self.stream.write_all(&m)
    }

    /// The screen as a binary PPM image, to look at when a test fails.
    pub fn ppm(&self) -> Vec<u8> {
        let mut out = format!("P6\n{} {}\n255\n", self.width, self.height).into_bytes();
        for y in 0..self.height {
            for x in 0..self.width {
                let (r, g, b) = self.pixel(x, y);
                let f = self.format;
                let scale = |v: u16, max: u16| (u32::from(v) * 255 / u32::from(max.max(1))) as u8;
                out.extend([
                    scale(r, f.red_max),
                    scale(g, f.green_max),
                    scale(b, f.blue_max),
                ]);
            }
        }
        out
    }

    /// Whether a message arrives within `wait`, without reading it.
    pub fn pending(&mut self, wait: Duration) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n > 0)
    }

    /// The pixel at (x, y) as (r, g, b) at the current format's precision.
    pub fn pixel(&self, x: u16, y: u16) -> (u16, u16, u16) {
        let bpp = self.format.bytes();
        let at = (usize::from(y) * usize::from(self.width) + usize::from(x)) * bpp;
        self.format.decode(&self.screen[at..at + bpp])
    }

    /// The current pixel format.
    pub fn format(&self) -> PixelFormat {
        self.format
    }

    /// Presses or releases a key.
    pub fn key(&mut self, keysym: u32, down: bool) -> std::io::Result<()> {
        let mut m = vec![4u8, u8::from(down), 0, 0];
        m.extend(keysym.to_be_bytes());
        self.stream.write_all(&m)
    }

    /// Presses and releases a key.
    pub fn tap(&mut self, keysym: u32) -> std::io::Result<()> {
        self.key(keysym, true)?;
        self.key(keysym, false)
    }
}

/// Connects to a unix socket that may not exist yet (up to 10 s).
pub fn connect_retrying(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e),
        }
    }
}

/// Whether the peer closed `s` (reads everything until then, up to 20 s).
pub fn closed_by_peer(s: &mut UnixStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn read_u8(s: &mut UnixStream) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(s: &mut UnixStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
