//! The RFB server's side of a client connection (`vmm::rfb`) on untrusted bytes: the input is
//! all a client sends, read the way `rfb::server` reads it. The version, the chosen security
//! type and ClientInit, then client messages one after another, each decoded and the buffer
//! advanced by its length, until one is incomplete or refused. Messages are handled as the
//! server handles them: keys through its keyboard, pixel formats into a converter, encodings
//! chosen and update requests answered from a small framebuffer; the update the server writes
//! must read back with the wire's own decoders.
//!
//! Every message decoded also encodes back to one that decodes the same, and, separately, the
//! whole input goes through the client-side decoders (security types and result, ServerInit,
//! update and rectangle headers), whose output must round-trip too.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::devices::framebuffer::Framebuffer;
use vmm::rfb::keysym::Keyboard;
use vmm::rfb::update::{ClientFrame, Converter};
use vmm::rfb::wire::{
    ClientInit, ClientMessage, PixelFormat, Rect, RectHeader, SecurityResult, SecurityTypes,
    ServerInit, UpdateHeader, Version, WireError, ENCODING_RAW, ENCODING_ZLIB, SECURITY_NONE,
};

type Decoder<T> = fn(&[u8]) -> Result<Option<(T, usize)>, WireError>;

/// The screen update requests are answered from: not a multiple of the tile size either way,
/// so edge tiles are partial.
fn screen() -> &'static Framebuffer {
    static FB: OnceLock<Framebuffer> = OnceLock::new();
    FB.get_or_init(|| Framebuffer::new(100, 70).expect("a 100x70 framebuffer maps"))
}

fuzz_target!(|data: &[u8]| {
    client_side_decoders(data);
    serve(data);
});

/// A decoded message of `len` bytes encodes to bytes that decode to the same message, whole.
fn round_trips<T: PartialEq + std::fmt::Debug>(
    decode: Decoder<T>,
    encode: impl Fn(&T, &mut Vec<u8>),
    msg: &T,
    len: usize,
    input: &[u8],
) {
    assert!(
        len > 0 && len <= input.len(),
        "decoded length {len} of {} bytes",
        input.len()
    );
    let mut out = Vec::new();
    encode(msg, &mut out);
    match decode(&out) {
        Ok(Some((back, n))) => {
            assert_eq!(&back, msg, "re-encoded message decodes differently");
            assert_eq!(n, out.len(), "re-encoded message not consumed whole");
        }
        other => panic!("re-encoded {msg:?} does not decode: {other:?}"),
    }
}

fn check<T: PartialEq + std::fmt::Debug>(
    decode: Decoder<T>,
    encode: impl Fn(&T, &mut Vec<u8>),
    input: &[u8],
) {
    if let Ok(Some((msg, len))) = decode(input) {
        round_trips(decode, encode, &msg, len, input);
    }
}

fn client_side_decoders(data: &[u8]) {
    check(SecurityTypes::decode, SecurityTypes::encode, data);
    check(SecurityResult::decode, SecurityResult::encode, data);
    check(ServerInit::decode, ServerInit::encode, data);
    check(UpdateHeader::decode, UpdateHeader::encode, data);
    check(RectHeader::decode, RectHeader::encode, data);
}

/// Takes one message off the front of `buf`, as the server's handshake reads do.
fn take<T: PartialEq + std::fmt::Debug>(
    buf: &mut &[u8],
    decode: Decoder<T>,
    encode: impl Fn(&T, &mut Vec<u8>),
) -> Option<T> {
    let (msg, len) = decode(buf).ok()??;
    round_trips(decode, encode, &msg, len, buf);
    *buf = &buf[len..];
    Some(msg)
}

fn serve(data: &[u8]) {
    let mut buf = data;
    let Some(version) = take(&mut buf, Version::decode, |v, out| out.extend(v.encode())) else {
        return;
    };
    if version != Version::V3_3 {
        // 3.7 and 3.8: the client answers the list of types with the one it chose.
        let Some((&chosen, rest)) = buf.split_first() else {
            return;
        };
        if chosen != SECURITY_NONE {
            return;
        }
        buf = rest;
    }
    if take(&mut buf, ClientInit::decode, ClientInit::encode).is_none() {
        return;
    }

    let fb = screen();
    let mut keyboard = Keyboard::default();
    let mut converter = Converter::new(&PixelFormat::XRGB8888);
    let mut frame = ClientFrame::new(fb);
    let mut zlib = false;
    // Each message takes at least one byte, so this ends.
    while let Some(msg) = take(&mut buf, ClientMessage::decode, ClientMessage::encode) {
        match msg {
            ClientMessage::SetPixelFormat(f) => {
                assert_eq!(f.check(), Ok(()), "a refused pixel format was decoded");
                converter = Converter::new(&f);
            }
            ClientMessage::SetEncodings(list) => {
                zlib = frame.choose_encoding(&list) == "zlib";
            }
            ClientMessage::FramebufferUpdateRequest { incremental, rect } => {
                let rects = frame.changed(fb, rect, !incremental);
                let mut out = Vec::new();
                frame
                    .send(&rects, &converter, &mut out)
                    .expect("an update is written to memory");
                check_update(&out, &rects, &converter, zlib);
            }
            ClientMessage::KeyEvent { down, keysym } => {
                keyboard.event(keysym, down);
            }
            ClientMessage::PointerEvent { .. } => {}
            ClientMessage::ClientCutText { len } => {
                // The text follows; the server takes it out of the stream and types it.
                let here = (len as usize).min(buf.len());
                for &b in &buf[..here] {
                    let keysym = u32::from(b);
                    keyboard.event(keysym, true);
                    keyboard.event(keysym, false);
                }
                buf = &buf[here..];
            }
        }
    }
    keyboard.release_all();
}

/// An update the server wrote reads back with the wire's decoders: as many rectangles as it
/// chose, each in the connection's encoding with its whole pixel data.
fn check_update(out: &[u8], rects: &[Rect], conv: &Converter, zlib: bool) {
    let (header, mut at) = UpdateHeader::decode(out)
        .expect("update header decodes")
        .expect("update header complete");
    assert_eq!(usize::from(header.rects), rects.len());
    for r in rects {
        let (rh, n) = RectHeader::decode(&out[at..])
            .expect("rectangle header decodes")
            .expect("rectangle header complete");
        at += n;
        assert_eq!(rh.rect, *r);
        let len = if zlib {
            assert_eq!(rh.encoding, ENCODING_ZLIB);
            let len = u32::from_be_bytes(out[at..at + 4].try_into().unwrap());
            at += 4;
            len as usize
        } else {
            assert_eq!(rh.encoding, ENCODING_RAW);
            usize::from(r.w) * usize::from(r.h) * conv.bytes_per_pixel()
        };
        at += len;
        assert!(at <= out.len(), "rectangle data runs past the update");
    }
    assert_eq!(at, out.len(), "bytes after the update's last rectangle");
}
