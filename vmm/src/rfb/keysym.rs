//! From RFB KeyEvents (X11 keysyms, pressed or released) to the PC keys
//! the i8042's keyboard sends, as scan code set 2 make codes, for a US
//! keyboard layout in the guest.
//!
//! A keysym names a character, not a key: '!' is Shift and 1. The client
//! sends its own Shift presses too, so most of the time the guest's shift
//! state already matches; when it does not (a client that sends '!'
//! without Shift, or '1' with Shift held), [`Keyboard`] wraps the key in a
//! Shift press or release of its own, as other VNC servers do.

use crate::devices::i8042::{KeyStroke, ScanCode};

/// What a keysym needs of Shift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shift {
    /// Whatever the guest's shift state (modifiers, function keys).
    Any,
    /// Shift up (the unshifted character of its key).
    Up,
    /// Shift down (the shifted character of its key).
    Down,
}

/// The printable ASCII keys of a US layout: unshifted, shifted, set-2 code.
const PRINTABLE: &[(u8, u8, u8)] = &[
    (b'`', b'~', 0x0e),
    (b'1', b'!', 0x16),
    (b'2', b'@', 0x1e),
    (b'3', b'#', 0x26),
    (b'4', b'$', 0x25),
    (b'5', b'%', 0x2e),
    (b'6', b'^', 0x36),
    (b'7', b'&', 0x3d),
    (b'8', b'*', 0x3e),
    (b'9', b'(', 0x46),
    (b'0', b')', 0x45),
    (b'-', b'_', 0x4e),
    (b'=', b'+', 0x55),
    (b'q', b'Q', 0x15),
    (b'w', b'W', 0x1d),
    (b'e', b'E', 0x24),
    (b'r', b'R', 0x2d),
    (b't', b'T', 0x2c),
    (b'y', b'Y', 0x35),
    (b'u', b'U', 0x3c),
    (b'i', b'I', 0x43),
    (b'o', b'O', 0x44),
    (b'p', b'P', 0x4d),
    (b'[', b'{', 0x54),
    (b']', b'}', 0x5b),
    (b'\\', b'|', 0x5d),
    (b'a', b'A', 0x1c),
    (b's', b'S', 0x1b),
    (b'd', b'D', 0x23),
    (b'f', b'F', 0x2b),
    (b'g', b'G', 0x34),
    (b'h', b'H', 0x33),
    (b'j', b'J', 0x3b),
    (b'k', b'K', 0x42),
    (b'l', b'L', 0x4b),
    (b';', b':', 0x4c),
    (b'\'', b'"', 0x52),
    (b'z', b'Z', 0x1a),
    (b'x', b'X', 0x22),
    (b'c', b'C', 0x21),
    (b'v', b'V', 0x2a),
    (b'b', b'B', 0x32),
    (b'n', b'N', 0x31),
    (b'm', b'M', 0x3a),
    (b',', b'<', 0x41),
    (b'.', b'>', 0x49),
    (b'/', b'?', 0x4a),
];

/// X11 keysyms of the keys that are not characters (and space), with
/// their key. Keypad keysyms with and without Num Lock name the same key.
const SPECIAL: &[(u32, ScanCode)] = &[
    (0x0020, ScanCode::plain(0x29)),    // space
    (0xff08, ScanCode::plain(0x66)),    // BackSpace
    (0xff09, ScanCode::plain(0x0d)),    // Tab
    (0xff0d, ScanCode::plain(0x5a)),    // Return
    (0xff1b, ScanCode::plain(0x76)),    // Escape
    (0xff14, ScanCode::plain(0x7e)),    // Scroll_Lock
    (0xff50, ScanCode::extended(0x6c)), // Home
    (0xff51, ScanCode::extended(0x6b)), // Left
    (0xff52, ScanCode::extended(0x75)), // Up
    (0xff53, ScanCode::extended(0x74)), // Right
    (0xff54, ScanCode::extended(0x72)), // Down
    (0xff55, ScanCode::extended(0x7d)), // Page_Up
    (0xff56, ScanCode::extended(0x7a)), // Page_Down
    (0xff57, ScanCode::extended(0x69)), // End
    (0xff63, ScanCode::extended(0x70)), // Insert
    (0xffff, ScanCode::extended(0x71)), // Delete
    (0xff67, ScanCode::extended(0x2f)), // Menu
    (0xff7f, ScanCode::plain(0x77)),    // Num_Lock
    (0xff8d, ScanCode::extended(0x5a)), // KP_Enter
    (0xffaa, ScanCode::plain(0x7c)),    // KP_Multiply
    (0xffab, ScanCode::plain(0x79)),    // KP_Add
    (0xffad, ScanCode::plain(0x7b)),    // KP_Subtract
    (0xffaf, ScanCode::extended(0x4a)), // KP_Divide
    (0xffae, ScanCode::plain(0x71)),    // KP_Decimal
    (0xff9f, ScanCode::plain(0x71)),    // KP_Delete
    (0xffb0, ScanCode::plain(0x70)),    // KP_0
    (0xff9e, ScanCode::plain(0x70)),    // KP_Insert
    (0xffb1, ScanCode::plain(0x69)),    // KP_1
    (0xff9c, ScanCode::plain(0x69)),    // KP_End
    (0xffb2, ScanCode::plain(0x72)),    // KP_2
    (0xff99, ScanCode::plain(0x72)),    // KP_Down
    (0xffb3, ScanCode::plain(0x7a)),    // KP_3
    (0xff9b, ScanCode::plain(0x7a)),    // KP_Next
    (0xffb4, ScanCode::plain(0x6b)),    // KP_4
    (0xff96, ScanCode::plain(0x6b)),    // KP_Left
    (0xffb5, ScanCode::plain(0x73)),    // KP_5
    (0xff9d, ScanCode::plain(0x73)),    // KP_Begin
    (0xffb6, ScanCode::plain(0x74)),    // KP_6
    (0xff98, ScanCode::plain(0x74)),    // KP_Right
    (0xffb7, ScanCode::plain(0x6c)),    // KP_7
    (0xff95, ScanCode::plain(0x6c)),    // KP_Home
    (0xffb8, ScanCode::plain(0x75)),    // KP_8
    (0xff97, ScanCode::plain(0x75)),    // KP_Up
    (0xffb9, ScanCode::plain(0x7d)),    // KP_9
    (0xff9a, ScanCode::plain(0x7d)),    // KP_Prior
    (0xffbe, ScanCode::plain(0x05)),    // F1
    (0xffbf, ScanCode::plain(0x06)),    // F2
    (0xffc0, ScanCode::plain(0x04)),    // F3
    (0xffc1, ScanCode::plain(0x0c)),    // F4
    (0xffc2, ScanCode::plain(0x03)),    // F5
    (0xffc3, ScanCode::plain(0x0b)),    // F6
    (0xffc4, ScanCode::plain(0x83)),    // F7
    (0xffc5, ScanCode::plain(0x0a)),    // F8
    (0xffc6, ScanCode::plain(0x01)),    // F9
    (0xffc7, ScanCode::plain(0x09)),    // F10
    (0xffc8, ScanCode::plain(0x78)),    // F11
    (0xffc9, ScanCode::plain(0x07)),    // F12
    (0xffe1, LEFT_SHIFT),               // Shift_L
    (0xffe2, RIGHT_SHIFT),              // Shift_R
    (0xffe3, ScanCode::plain(0x14)),    // Control_L
    (0xffe4, ScanCode::extended(0x14)), // Control_R
    (0xffe5, ScanCode::plain(0x58)),    // Caps_Lock
    (0xffe7, ScanCode::extended(0x1f)), // Meta_L
    (0xffe8, ScanCode::extended(0x27)), // Meta_R
    (0xffe9, ScanCode::plain(0x11)),    // Alt_L
    (0xffea, ScanCode::extended(0x11)), // Alt_R
    (0xfe03, ScanCode::extended(0x11)), // ISO_Level3_Shift (AltGr)
    (0xffeb, ScanCode::extended(0x1f)), // Super_L
    (0xffec, ScanCode::extended(0x27)), // Super_R
];

/// Shift_L's keysym.
const XK_SHIFT_L: u32 = 0xffe1;
/// Shift_R's keysym.
const XK_SHIFT_R: u32 = 0xffe2;
/// ISO_Left_Tab: what X sends for Shift+Tab.
const XK_ISO_LEFT_TAB: u32 = 0xfe20;
const LEFT_SHIFT: ScanCode = ScanCode::plain(0x12);
const RIGHT_SHIFT: ScanCode = ScanCode::plain(0x59);
const TAB: ScanCode = ScanCode::plain(0x0d);
/// Keys tracked as held per client, to release them when it leaves.
const MAX_HELD: usize = 32;

/// The key a keysym names and what it needs of Shift; none for keysyms
/// a US PC keyboard has no key for.
pub fn lookup(keysym: u32) -> Option<(ScanCode, Shift)> {
    if let Some(&(_, key)) = SPECIAL.iter().find(|(k, _)| *k == keysym) {
        return Some((key, Shift::Any));
    }
    if keysym == XK_ISO_LEFT_TAB {
        return Some((TAB, Shift::Down));
    }
    let c = u8::try_from(keysym).ok()?;
    PRINTABLE.iter().find_map(|&(plain, shifted, code)| {
        if c == plain {
            Some((ScanCode::plain(code), Shift::Up))
        } else if c == shifted {
            Some((ScanCode::plain(code), Shift::Down))
        } else {
            None
        }
    })
}

/// One client's view of the keyboard: which Shift keys and other keys it
/// holds down.
#[derive(Default)]
pub struct Keyboard {
    left_shift: bool,
    right_shift: bool,
    held: Vec<ScanCode>,
}

impl Keyboard {
    /// The key strokes for one KeyEvent; none for keysyms without a key.
    pub fn event(&mut self, keysym: u32, down: bool) -> Vec<KeyStroke> {
        let Some((key, shift)) = lookup(keysym) else {
            tracing::debug!(keysym, "RFB key without a PC key; ignored");
            return Vec::new();
        };
        let press = |key| KeyStroke {
            key,
            release: false,
        };
        let release = |key| KeyStroke { key, release: true };
        if !down {
            let Some(i) = self.held.iter().position(|k| *k == key) else {
                return Vec::new();
            };
            self.held.swap_remove(i);
            match keysym {
                XK_SHIFT_L => self.left_shift = false,
                XK_SHIFT_R => self.right_shift = false,
                _ => {}
            }
            return vec![release(key)];
        }
        if !self.held.contains(&key) {
            if self.held.len() >= MAX_HELD {
                return Vec::new();
            }
            self.held.push(key);
        }
        match keysym {
            XK_SHIFT_L => self.left_shift = true,
            XK_SHIFT_R => self.right_shift = true,
            _ => {}
        }
        let held_shifts: Vec<ScanCode> = [
            (self.left_shift, LEFT_SHIFT),
            (self.right_shift, RIGHT_SHIFT),
        ]
        .into_iter()
        .filter_map(|(on, k)| on.then_some(k))
        .collect();
        match shift {
            Shift::Down if held_shifts.is_empty() => {
                vec![press(LEFT_SHIFT), press(key), release(LEFT_SHIFT)]
            }
            Shift::Up if !held_shifts.is_empty() => {
                let mut v: Vec<KeyStroke> = held_shifts.iter().map(|&k| release(k)).collect();
                v.push(press(key));
                v.extend(held_shifts.iter().map(|&k| press(k)));
                v
            }
            _ => vec![press(key)],
        }
    }

    /// Releases everything still held (the client left).
    pub fn release_all(&mut self) -> Vec<KeyStroke> {
        self.left_shift = false;
        self.right_shift = false;
        self.held
            .drain(..)
            .map(|key| KeyStroke { key, release: true })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::i8042::translate;

    fn p(code: u8) -> KeyStroke {
        KeyStroke {
            key: ScanCode::plain(code),
            release: false,
        }
    }

    fn r(code: u8) -> KeyStroke {
        KeyStroke {
            key: ScanCode::plain(code),
            release: true,
        }
    }

    #[test]
    fn every_key_has_its_own_set_1_code() {
        let mut keys: Vec<ScanCode> = SPECIAL.iter().map(|(_, k)| *k).collect();
        keys.extend(PRINTABLE.iter().map(|&(_, _, c)| ScanCode::plain(c)));
        keys.sort_by_key(|k| (k.extended, k.code));
        keys.dedup();
        let mut set1: Vec<(bool, u8)> = keys
            .iter()
            .map(|k| (k.extended, translate(k.code)))
            .collect();
        assert!(set1.iter().all(|(_, c)| *c < 0x80), "{set1:x?}");
        let n = set1.len();
        set1.sort();
        set1.dedup();
        assert_eq!(set1.len(), n, "two keys translate to one set-1 code");
        // Keysyms are unique in the tables.
        let mut syms: Vec<u32> = SPECIAL.iter().map(|(k, _)| *k).collect();
        for &(a, b, _) in PRINTABLE {
            syms.extend([u32::from(a), u32::from(b)]);
        }
        let n = syms.len();
        syms.sort();
        syms.dedup();
        assert_eq!(syms.len(), n);
    }

    #[test]
    fn letters_digits_and_keys() {
        assert_eq!(
            lookup(u32::from(b'a')),
            Some((ScanCode::plain(0x1c), Shift::Up))
        );
        assert_eq!(
            lookup(u32::from(b'A')),
            Some((ScanCode::plain(0x1c), Shift::Down))
        );
        assert_eq!(
            lookup(u32::from(b'!')),
            Some((ScanCode::plain(0x16), Shift::Down))
        );
        assert_eq!(lookup(0xff52), Some((ScanCode::extended(0x75), Shift::Any)));
        assert_eq!(lookup(0xffc4), Some((ScanCode::plain(0x83), Shift::Any)));
        assert_eq!(lookup(0x20ac), None); // EuroSign
        assert_eq!(lookup(0x100), None);
        assert_eq!(lookup(u32::MAX), None);
    }

    #[test]
    fn shift_is_added_or_lifted_when_the_client_state_disagrees() {
        let mut k = Keyboard::default();
        // '!' without Shift held: Shift wraps the key press.
        assert_eq!(
            k.event(u32::from(b'!'), true),
            vec![p(0x12), p(0x16), r(0x12)]
        );
        assert_eq!(k.event(u32::from(b'!'), false), vec![r(0x16)]);
        // Shift held by the client, 'H': as is.
        assert_eq!(k.event(XK_SHIFT_L, true), vec![p(0x12)]);
        assert_eq!(k.event(u32::from(b'H'), true), vec![p(0x33)]);
        // Released under another keysym of the same key.
        assert_eq!(k.event(u32::from(b'h'), false), vec![r(0x33)]);
        // '1' with Shift held: Shift lifted around it.
        assert_eq!(
            k.event(u32::from(b'1'), true),
            vec![r(0x12), p(0x16), p(0x12)]
        );
        assert_eq!(k.event(XK_SHIFT_L, false), vec![r(0x12)]);
        // A release of a key never pressed is dropped.
        assert_eq!(k.event(u32::from(b'x'), false), vec![]);
        // What is still held is released when the client leaves.
        assert_eq!(k.release_all(), vec![r(0x16)]);
        assert_eq!(k.release_all(), vec![]);
    }

    #[test]
    fn a_client_cannot_hold_unbounded_keys() {
        let mut k = Keyboard::default();
        for &(c, _, _) in PRINTABLE {
            k.event(u32::from(c), true);
        }
        assert_eq!(k.held.len(), MAX_HELD);
        assert_eq!(k.release_all().len(), MAX_HELD);
    }
}
