//! The RFB (VNC) wire format of RFC 6143, as far as EnSpeed's server speaks
//! it: the version and security handshake, the init messages, every client
//! message of the core protocol and the framebuffer update's headers.
//!
//! Decoders take untrusted bytes: they return `Ok(None)` while a message is
//! incomplete, `Ok(Some((message, length)))` once it is whole, and an error
//! for bytes no conforming peer sends (or that we refuse to buffer); they
//! never panic. All integers are big endian.

/// Longest version string exchange: "RFB xxx.yyy\n".
pub const VERSION_LEN: usize = 12;
/// The security type "None".
pub const SECURITY_NONE: u8 = 1;
/// The Raw encoding: pixels as they are, line after line.
pub const ENCODING_RAW: i32 = 0;
/// The Zlib encoding: Raw pixels through one zlib stream that lasts as long
/// as the connection, each rectangle's part preceded by its length (u32).
pub const ENCODING_ZLIB: i32 = 6;
/// The DesktopSize pseudo-encoding (the server may change the size).
pub const ENCODING_DESKTOP_SIZE: i32 = -223;
/// The CompressLevel pseudo-encodings: -256 + the level (0 to 9) the client
/// asks for.
pub const ENCODING_COMPRESS_LEVEL_0: i32 = -256;
/// Most encodings a SetEncodings may list (real clients send a few dozen).
pub const MAX_ENCODINGS: u16 = 1024;
/// Longest ClientCutText accepted; its text is skipped, never buffered.
pub const MAX_CUT_TEXT: u32 = 1 << 20;
/// Longest desktop name a ServerInit may carry.
pub const MAX_NAME: u32 = 64 * 1024;

/// Bytes that are not RFB, or that we refuse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The version exchange is not "RFB 003.xxx\n" of a version we speak.
    #[error("not an RFB 3.3, 3.7 or 3.8 version string: {0:?}")]
    BadVersion(String),
    /// The client chose a security type we did not offer.
    #[error("security type {0} was not offered")]
    BadSecurityType(u8),
    /// A client message type outside the core protocol.
    #[error("unknown client message type {0}")]
    UnknownMessage(u8),
    /// A SetEncodings listing too many encodings.
    #[error("SetEncodings lists {0} encodings (at most {MAX_ENCODINGS} are accepted)")]
    TooManyEncodings(u16),
    /// A ClientCutText longer than we read.
    #[error("ClientCutText of {0} bytes (at most {MAX_CUT_TEXT} are accepted)")]
    CutTextTooLong(u32),
    /// A ServerInit whose name is too long.
    #[error("desktop name of {0} bytes (at most {MAX_NAME} are accepted)")]
    NameTooLong(u32),
    /// A colour-map (palette) pixel format.
    #[error("colour-map pixel formats are not supported, only true colour")]
    ColourMap,
    /// A true-colour pixel format we cannot produce.
    #[error("unsupported pixel format: {0}")]
    BadPixelFormat(String),
    /// A server message other than the ones this decoder knows.
    #[error("unexpected server message type {0}")]
    UnexpectedServerMessage(u8),
}

/// The protocol versions we speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    /// 3.3: the server picks the security type.
    V3_3,
    /// 3.7: the client picks; no SecurityResult after None.
    V3_7,
    /// 3.8: the client picks; a SecurityResult always follows.
    V3_8,
}

impl Version {
    /// The version string.
    pub fn encode(self) -> [u8; VERSION_LEN] {
        *match self {
            Version::V3_3 => b"RFB 003.003\n",
            Version::V3_7 => b"RFB 003.007\n",
            Version::V3_8 => b"RFB 003.008\n",
        }
    }

    /// Parses a client's version string. Minor versions above 8 speak 3.8,
    /// and the odd ones between 3 and 7 (some viewers send 3.5 or 3.6)
    /// speak 3.3, as RFC 6143 says a server should treat them.
    pub fn decode(b: &[u8]) -> Result<Option<(Version, usize)>, WireError> {
        if b.len() < VERSION_LEN {
            // Refuse early what cannot become a version string.
            let prefix = b"RFB ";
            let n = b.len().min(prefix.len());
            if b[..n] != prefix[..n] {
                return Err(WireError::BadVersion(
                    String::from_utf8_lossy(b).into_owned(),
                ));
            }
            return Ok(None);
        }
        let s = &b[..VERSION_LEN];
        let bad = || WireError::BadVersion(String::from_utf8_lossy(s).into_owned());
        let digits = |r: &[u8]| -> Option<u32> {
            r.iter().try_fold(0u32, |acc, &c| {
                c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
            })
        };
        if &s[..4] != b"RFB " || s[7] != b'.' || s[11] != b'\n' {
            return Err(bad());
        }
        let major = digits(&s[4..7]).ok_or_else(bad)?;
        let minor = digits(&s[8..11]).ok_or_else(bad)?;
        let v = match (major, minor) {
            (3, 3..=6) => Version::V3_3,
            (3, 7) => Version::V3_7,
            (3, 8..) => Version::V3_8,
            _ => return Err(bad()),
        };
        Ok(Some((v, VERSION_LEN)))
    }
}

/// The server's list of security types (3.7 and later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityTypes(pub Vec<u8>);

impl SecurityTypes {
    /// Count, then the types.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.0.len().min(255) as u8);
        out.extend(self.0.iter().take(255));
    }

    /// Parses the list (a count of 0 is a failure with a reason, which
    /// this decoder does not read: it returns the empty list).
    pub fn decode(b: &[u8]) -> Result<Option<(SecurityTypes, usize)>, WireError> {
        let Some(&n) = b.first() else { return Ok(None) };
        let len = 1 + n as usize;
        if b.len() < len {
            return Ok(None);
        }
        Ok(Some((SecurityTypes(b[1..len].to_vec()), len)))
    }
}

/// The outcome of the security handshake (3.8 always, 3.7 not for None).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecurityResult {
    /// Go on to ClientInit.
    Ok,
    /// Refused, with the reason (3.8).
    Failed(String),
}

impl SecurityResult {
    /// u32 status, then for a failure the reason's length and text.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            SecurityResult::Ok => out.extend(0u32.to_be_bytes()),
            SecurityResult::Failed(why) => {
                out.extend(1u32.to_be_bytes());
                let why = &why.as_bytes()[..why.len().min(MAX_NAME as usize)];
                out.extend((why.len() as u32).to_be_bytes());
                out.extend(why);
            }
        }
    }

    /// Parses a 3.8 SecurityResult.
    pub fn decode(b: &[u8]) -> Result<Option<(SecurityResult, usize)>, WireError> {
        let mut r = Reader::new(b);
        let Some(status) = r.u32() else {
            return Ok(None);
        };
        if status == 0 {
            return Ok(Some((SecurityResult::Ok, 4)));
        }
        let Some(len) = r.u32() else { return Ok(None) };
        if len > MAX_NAME {
            return Err(WireError::NameTooLong(len));
        }
        let Some(why) = r.bytes(len as usize) else {
            return Ok(None);
        };
        let why = String::from_utf8_lossy(why).into_owned();
        Ok(Some((SecurityResult::Failed(why), r.pos)))
    }
}

/// How the client wants its pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelFormat {
    /// Bits a pixel takes on the wire: 8, 16 or 32.
    pub bits_per_pixel: u8,
    /// Useful bits (informational).
    pub depth: u8,
    /// Multi-byte pixels are big endian.
    pub big_endian: bool,
    /// True colour (else a colour map, which we refuse).
    pub true_colour: bool,
    /// Largest red value (2^n - 1).
    pub red_max: u16,
    /// Largest green value.
    pub green_max: u16,
    /// Largest blue value.
    pub blue_max: u16,
    /// Bit position of red in the pixel value.
    pub red_shift: u8,
    /// Bit position of green.
    pub green_shift: u8,
    /// Bit position of blue.
    pub blue_shift: u8,
}

/// Bytes a PixelFormat takes on the wire.
pub const PIXEL_FORMAT_LEN: usize = 16;

impl PixelFormat {
    /// The framebuffer's own format: 32 bits, XRGB8888, little endian.
    pub const XRGB8888: PixelFormat = PixelFormat {
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

    /// The 16 bytes of the format.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend([
            self.bits_per_pixel,
            self.depth,
            u8::from(self.big_endian),
            u8::from(self.true_colour),
        ]);
        out.extend(self.red_max.to_be_bytes());
        out.extend(self.green_max.to_be_bytes());
        out.extend(self.blue_max.to_be_bytes());
        out.extend([self.red_shift, self.green_shift, self.blue_shift, 0, 0, 0]);
    }

    /// Parses 16 bytes; any values are accepted here, see [`Self::check`].
    fn read(r: &mut Reader) -> Option<PixelFormat> {
        let b = r.bytes(PIXEL_FORMAT_LEN)?;
        let u16at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        Some(PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16at(4),
            green_max: u16at(6),
            blue_max: u16at(8),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        })
    }

    /// Whether the server can produce this format: true colour, 8, 16 or
    /// 32 bits a pixel, each channel's maximum a run of low bits (at most 8
    /// of them) that fits in the pixel at its shift.
    pub fn check(&self) -> Result<(), WireError> {
        if !self.true_colour {
            return Err(WireError::ColourMap);
        }
        let bpp = u32::from(self.bits_per_pixel);
        if ![8, 16, 32].contains(&bpp) {
            return Err(WireError::BadPixelFormat(format!(
                "{bpp} bits per pixel (8, 16 or 32 are supported)"
            )));
        }
        for (name, max, shift) in [
            ("red", self.red_max, self.red_shift),
            ("green", self.green_max, self.green_shift),
            ("blue", self.blue_max, self.blue_shift),
        ] {
            let bits = 16 - max.leading_zeros();
            if max == 0 || max > 255 || !(max as u32 + 1).is_power_of_two() {
                return Err(WireError::BadPixelFormat(format!(
                    "{name} maximum {max} (1 to 255, a power of two minus one)"
                )));
            }
            if u32::from(shift) + bits > bpp {
                return Err(WireError::BadPixelFormat(format!(
                    "{name} at bit {shift} does not fit in {bpp} bits"
                )));
            }
        }
        Ok(())
    }
}

/// The client's ClientInit: whether other clients may stay connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientInit {
    /// Share the desktop (we always do).
    pub shared: bool,
}

impl ClientInit {
    /// One byte.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.shared));
    }

    /// Parses the byte.
    pub fn decode(b: &[u8]) -> Result<Option<(ClientInit, usize)>, WireError> {
        Ok(b.first().map(|&s| (ClientInit { shared: s != 0 }, 1)))
    }
}

/// The server's ServerInit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerInit {
    /// Framebuffer width.
    pub width: u16,
    /// Framebuffer height.
    pub height: u16,
    /// The server's pixel format (the client's until it sets another).
    pub format: PixelFormat,
    /// Desktop name: the VM's.
    pub name: String,
}

impl ServerInit {
    /// Size, format, name.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend(self.width.to_be_bytes());
        out.extend(self.height.to_be_bytes());
        self.format.encode(out);
        let name = &self.name.as_bytes()[..self.name.len().min(MAX_NAME as usize)];
        out.extend((name.len() as u32).to_be_bytes());
        out.extend(name);
    }

    /// Parses a ServerInit.
    pub fn decode(b: &[u8]) -> Result<Option<(ServerInit, usize)>, WireError> {
        let mut r = Reader::new(b);
        let (Some(width), Some(height)) = (r.u16(), r.u16()) else {
            return Ok(None);
        };
        let Some(format) = PixelFormat::read(&mut r) else {
            return Ok(None);
        };
        let Some(len) = r.u32() else { return Ok(None) };
        if len > MAX_NAME {
            return Err(WireError::NameTooLong(len));
        }
        let Some(name) = r.bytes(len as usize) else {
            return Ok(None);
        };
        let name = String::from_utf8_lossy(name).into_owned();
        Ok(Some((
            ServerInit {
                width,
                height,
                format,
                name,
            },
            r.pos,
        )))
    }
}

/// A rectangle of the framebuffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rect {
    /// Left edge.
    pub x: u16,
    /// Top edge.
    pub y: u16,
    /// Width.
    pub w: u16,
    /// Height.
    pub h: u16,
}

/// A message from the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientMessage {
    /// Type 0: send pixels in this format from now on.
    SetPixelFormat(PixelFormat),
    /// Type 2: the encodings the client understands, preferred first.
    SetEncodings(Vec<i32>),
    /// Type 3: send (the changed part of, if incremental) this rectangle.
    FramebufferUpdateRequest {
        /// Only what changed since the last update.
        incremental: bool,
        /// The area wanted.
        rect: Rect,
    },
    /// Type 4: a key pressed or released, as an X11 keysym.
    KeyEvent {
        /// Pressed (else released).
        down: bool,
        /// The keysym.
        keysym: u32,
    },
    /// Type 5: the pointer moved or a button changed.
    PointerEvent {
        /// Buttons held, bit 0 the left one.
        buttons: u8,
        /// Position.
        x: u16,
        /// Position.
        y: u16,
    },
    /// Type 6: the client's clipboard changed. Only the header: `len`
    /// bytes of text follow, which the reader skips.
    ClientCutText {
        /// Length of the text that follows.
        len: u32,
    },
}

impl ClientMessage {
    /// The message's bytes (for ClientCutText, its header only).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ClientMessage::SetPixelFormat(f) => {
                out.extend([0, 0, 0, 0]);
                f.encode(out);
            }
            ClientMessage::SetEncodings(list) => {
                let n = list.len().min(usize::from(u16::MAX));
                out.extend([2, 0]);
                out.extend((n as u16).to_be_bytes());
                for e in &list[..n] {
                    out.extend(e.to_be_bytes());
                }
            }
            ClientMessage::FramebufferUpdateRequest { incremental, rect } => {
                out.extend([3, u8::from(*incremental)]);
                for v in [rect.x, rect.y, rect.w, rect.h] {
                    out.extend(v.to_be_bytes());
                }
            }
            ClientMessage::KeyEvent { down, keysym } => {
                out.extend([4, u8::from(*down), 0, 0]);
                out.extend(keysym.to_be_bytes());
            }
            ClientMessage::PointerEvent { buttons, x, y } => {
                out.extend([5, *buttons]);
                out.extend(x.to_be_bytes());
                out.extend(y.to_be_bytes());
            }
            ClientMessage::ClientCutText { len } => {
                out.extend([6, 0, 0, 0]);
                out.extend(len.to_be_bytes());
            }
        }
    }

    /// Parses one message from the start of `b`. A SetPixelFormat must be
    /// one we can produce ([`PixelFormat::check`]).
    pub fn decode(b: &[u8]) -> Result<Option<(ClientMessage, usize)>, WireError> {
        let mut r = Reader::new(b);
        let Some(kind) = r.u8() else { return Ok(None) };
        let msg = match kind {
            0 => {
                if r.bytes(3).is_none() {
                    return Ok(None);
                }
                let Some(f) = PixelFormat::read(&mut r) else {
                    return Ok(None);
                };
                f.check()?;
                ClientMessage::SetPixelFormat(f)
            }
            2 => {
                let (Some(_), Some(n)) = (r.u8(), r.u16()) else {
                    return Ok(None);
                };
                if n > MAX_ENCODINGS {
                    return Err(WireError::TooManyEncodings(n));
                }
                let Some(raw) = r.bytes(4 * usize::from(n)) else {
                    return Ok(None);
                };
                let list = raw
                    .chunks_exact(4)
                    .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                ClientMessage::SetEncodings(list)
            }
            3 => {
                let Some(inc) = r.u8() else { return Ok(None) };
                let (Some(x), Some(y), Some(w), Some(h)) = (r.u16(), r.u16(), r.u16(), r.u16())
                else {
                    return Ok(None);
                };
                ClientMessage::FramebufferUpdateRequest {
                    incremental: inc != 0,
                    rect: Rect { x, y, w, h },
                }
            }
            4 => {
                let Some(down) = r.u8() else { return Ok(None) };
                let (Some(_), Some(keysym)) = (r.u16(), r.u32()) else {
                    return Ok(None);
                };
                ClientMessage::KeyEvent {
                    down: down != 0,
                    keysym,
                }
            }
            5 => {
                let (Some(buttons), Some(x), Some(y)) = (r.u8(), r.u16(), r.u16()) else {
                    return Ok(None);
                };
                ClientMessage::PointerEvent { buttons, x, y }
            }
            6 => {
                if r.bytes(3).is_none() {
                    return Ok(None);
                }
                let Some(len) = r.u32() else { return Ok(None) };
                // Negative lengths (as i32) belong to the extended clipboard,
                // which we never announce.
                if len > MAX_CUT_TEXT {
                    return Err(WireError::CutTextTooLong(len));
                }
                ClientMessage::ClientCutText { len }
            }
            other => return Err(WireError::UnknownMessage(other)),
        };
        Ok(Some((msg, r.pos)))
    }
}

/// The header of a FramebufferUpdate (server message type 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateHeader {
    /// Rectangles that follow.
    pub rects: u16,
}

impl UpdateHeader {
    /// Type, padding, count.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend([0, 0]);
        out.extend(self.rects.to_be_bytes());
    }

    /// Parses the header; any other server message type is refused.
    pub fn decode(b: &[u8]) -> Result<Option<(UpdateHeader, usize)>, WireError> {
        let mut r = Reader::new(b);
        let Some(kind) = r.u8() else { return Ok(None) };
        if kind != 0 {
            return Err(WireError::UnexpectedServerMessage(kind));
        }
        let (Some(_), Some(rects)) = (r.u8(), r.u16()) else {
            return Ok(None);
        };
        Ok(Some((UpdateHeader { rects }, 4)))
    }
}

/// The header of one rectangle of an update; its pixels follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RectHeader {
    /// Where.
    pub rect: Rect,
    /// How the data is encoded.
    pub encoding: i32,
}

impl RectHeader {
    /// Bytes the header takes.
    pub const LEN: usize = 12;

    /// Position, size, encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.rect.x, self.rect.y, self.rect.w, self.rect.h] {
            out.extend(v.to_be_bytes());
        }
        out.extend(self.encoding.to_be_bytes());
    }

    /// Parses a header.
    pub fn decode(b: &[u8]) -> Result<Option<(RectHeader, usize)>, WireError> {
        let mut r = Reader::new(b);
        let (Some(x), Some(y), Some(w), Some(h), Some(e)) =
            (r.u16(), r.u16(), r.u16(), r.u16(), r.u32())
        else {
            return Ok(None);
        };
        Ok(Some((
            RectHeader {
                rect: Rect { x, y, w, h },
                encoding: e as i32,
            },
            Self::LEN,
        )))
    }
}

/// A cursor over bytes that may end early.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Reader { b, pos: 0 }
    }

    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.bytes(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, WireError>;

    /// Encodes, checks every strict prefix is "incomplete" and the whole
    /// decodes to the same value with its exact length, also with bytes of
    /// a next message behind it.
    fn round_trip<T: PartialEq + Clone + std::fmt::Debug>(
        v: &T,
        encode: impl Fn(&T, &mut Vec<u8>),
        decode: Decoder<T>,
    ) {
        let mut b = Vec::new();
        encode(v, &mut b);
        for n in 0..b.len() {
            assert_eq!(decode(&b[..n]), Ok(None), "prefix of {n} bytes of {v:?}");
        }
        assert_eq!(decode(&b), Ok(Some((v.clone(), b.len()))));
        b.extend([3, 0, 0]);
        assert_eq!(decode(&b), Ok(Some((v.clone(), b.len() - 3))));
    }

    fn bgr16() -> PixelFormat {
        PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian: true,
            true_colour: true,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 0,
            green_shift: 5,
            blue_shift: 11,
        }
    }

    #[test]
    fn versions() {
        for v in [Version::V3_3, Version::V3_7, Version::V3_8] {
            let b = v.encode();
            assert_eq!(Version::decode(&b), Ok(Some((v, 12))));
            for n in 0..12 {
                assert_eq!(Version::decode(&b[..n]), Ok(None));
            }
        }
        let d = |s: &[u8]| Version::decode(s);
        assert_eq!(d(b"RFB 003.889\n"), Ok(Some((Version::V3_8, 12))));
        assert_eq!(d(b"RFB 003.005\n"), Ok(Some((Version::V3_3, 12))));
        for bad in [
            &b"RFB 004.000\n"[..],
            b"RFB 003.002\n",
            b"RFB 003.00x\n",
            b"RFB 003-008\n",
            b"RFB 003.008\r",
            b"GET / HTTP/1.1\r\n",
            b"G",
        ] {
            assert!(matches!(d(bad), Err(WireError::BadVersion(_))), "{bad:?}");
        }
    }

    #[test]
    fn handshake_messages_round_trip() {
        round_trip(
            &SecurityTypes(vec![SECURITY_NONE]),
            SecurityTypes::encode,
            SecurityTypes::decode,
        );
        round_trip(
            &SecurityTypes(vec![]),
            SecurityTypes::encode,
            SecurityTypes::decode,
        );
        round_trip(
            &SecurityResult::Ok,
            SecurityResult::encode,
            SecurityResult::decode,
        );
        round_trip(
            &SecurityResult::Failed("no".into()),
            SecurityResult::encode,
            SecurityResult::decode,
        );
        round_trip(
            &ClientInit { shared: true },
            ClientInit::encode,
            ClientInit::decode,
        );
        round_trip(
            &ServerInit {
                width: 1024,
                height: 768,
                format: PixelFormat::XRGB8888,
                name: "vm-1".into(),
            },
            ServerInit::encode,
            ServerInit::decode,
        );
    }

    #[test]
    fn client_messages_round_trip() {
        let msgs = [
            ClientMessage::SetPixelFormat(PixelFormat::XRGB8888),
            ClientMessage::SetPixelFormat(bgr16()),
            ClientMessage::SetEncodings(vec![]),
            ClientMessage::SetEncodings(vec![ENCODING_RAW, ENCODING_DESKTOP_SIZE, 7, 16]),
            ClientMessage::FramebufferUpdateRequest {
                incremental: true,
                rect: Rect {
                    x: 1,
                    y: 2,
                    w: 300,
                    h: 65535,
                },
            },
            ClientMessage::KeyEvent {
                down: true,
                keysym: 0xffe1,
            },
            ClientMessage::KeyEvent {
                down: false,
                keysym: u32::MAX,
            },
            ClientMessage::PointerEvent {
                buttons: 5,
                x: 1023,
                y: 0,
            },
            ClientMessage::ClientCutText { len: 0 },
            ClientMessage::ClientCutText { len: MAX_CUT_TEXT },
        ];
        for m in &msgs {
            round_trip(m, ClientMessage::encode, ClientMessage::decode);
        }
    }

    #[test]
    fn update_headers_round_trip() {
        round_trip(
            &UpdateHeader { rects: 300 },
            UpdateHeader::encode,
            UpdateHeader::decode,
        );
        round_trip(
            &RectHeader {
                rect: Rect {
                    x: 64,
                    y: 128,
                    w: 64,
                    h: 32,
                },
                encoding: ENCODING_DESKTOP_SIZE,
            },
            RectHeader::encode,
            RectHeader::decode,
        );
        assert_eq!(
            UpdateHeader::decode(&[2]),
            Err(WireError::UnexpectedServerMessage(2))
        );
    }

    #[test]
    fn malformed_client_messages_are_refused() {
        let d = ClientMessage::decode;
        assert_eq!(d(&[7]), Err(WireError::UnknownMessage(7)));
        assert_eq!(d(&[255, 0, 0]), Err(WireError::UnknownMessage(255)));
        assert_eq!(
            d(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(WireError::CutTextTooLong(u32::MAX))
        );
        assert_eq!(
            d(&[2, 0, 0xff, 0xff]),
            Err(WireError::TooManyEncodings(65535))
        );
        let pf = |f: PixelFormat| {
            let mut b = Vec::new();
            ClientMessage::SetPixelFormat(f).encode(&mut b);
            d(&b)
        };
        let palette = PixelFormat {
            bits_per_pixel: 8,
            true_colour: false,
            ..PixelFormat::XRGB8888
        };
        assert_eq!(pf(palette), Err(WireError::ColourMap));
        for bad in [
            PixelFormat {
                bits_per_pixel: 24,
                ..PixelFormat::XRGB8888
            },
            PixelFormat {
                red_shift: 25,
                ..PixelFormat::XRGB8888
            },
            PixelFormat {
                green_max: 0,
                ..PixelFormat::XRGB8888
            },
            PixelFormat {
                blue_max: 100,
                ..PixelFormat::XRGB8888
            },
            PixelFormat {
                red_max: 1023,
                ..PixelFormat::XRGB8888
            },
            PixelFormat {
                bits_per_pixel: 16,
                ..PixelFormat::XRGB8888
            },
        ] {
            assert!(
                matches!(pf(bad), Err(WireError::BadPixelFormat(_))),
                "{bad:?}"
            );
        }
        let mut b = Vec::new();
        ServerInit {
            width: 1,
            height: 1,
            format: PixelFormat::XRGB8888,
            name: String::new(),
        }
        .encode(&mut b);
        b[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            ServerInit::decode(&b),
            Err(WireError::NameTooLong(u32::MAX))
        );
    }
}
