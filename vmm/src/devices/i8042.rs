//! The i8042 keyboard controller: enough of a PC's for a kernel to find a
//! keyboard, receive keys from the host (Ctrl-Alt-Del from the control
//! socket, a console's typing from the RFB server), and reset the machine
//! by pulsing the CPU reset line (command 0xFE).

use std::collections::VecDeque;

use std::sync::mpsc::Sender;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::vm::VmEvent;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

const SR_OBF: u8 = 0x01;
const SR_SYS: u8 = 0x04;
const SR_CMD: u8 = 0x08;
const SR_UNLOCKED: u8 = 0x10;

const CB_KBD_INT: u8 = 0x01;
const CB_SYS: u8 = 0x04;
const CB_KBD_DISABLE: u8 = 0x10;
const CB_AUX_DISABLE: u8 = 0x20;
const CB_XLATE: u8 = 0x40;

const CMD_READ_CB: u8 = 0x20;
const CMD_WRITE_CB: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;

/// Most answers to the guest's own commands queued toward it; a guest
/// flooding the controller with commands cannot grow the queue further.
const BUF_MAX: usize = 64;
/// Most bytes queued toward the guest when keys arrive: room for a few
/// hundred keystrokes typed (or pasted) faster than the guest reads them.
/// Beyond this, key events are dropped as a real keyboard's would be.
const KEY_BUF_MAX: usize = 1024;

/// A key as its scan code set 2 make code (the keyboard's native set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanCode {
    /// Sent after an E0 prefix (the keys a PC/AT keyboard added).
    pub extended: bool,
    /// The make code.
    pub code: u8,
}

impl ScanCode {
    /// A key without prefix.
    pub const fn plain(code: u8) -> ScanCode {
        ScanCode {
            extended: false,
            code,
        }
    }

    /// A key with the E0 prefix.
    pub const fn extended(code: u8) -> ScanCode {
        ScanCode {
            extended: true,
            code,
        }
    }
}

/// One press or release of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyStroke {
    /// Which key.
    pub key: ScanCode,
    /// Released rather than pressed.
    pub release: bool,
}

const KEY_CTRL: ScanCode = ScanCode::plain(0x14);
const KEY_ALT: ScanCode = ScanCode::plain(0x11);
const KEY_DEL: ScanCode = ScanCode::extended(0x71);

/// What a byte written to the data port means.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Pending {
    None,
    CommandByte,
    OutputPort,
    AuxByte,
    KbdArg,
}

/// The controller and its keyboard.
pub struct I8042 {
    status: u8,
    cb: u8,
    buf: VecDeque<u8>,
    pending: Pending,
    irq: EventFd,
    events: Sender<VmEvent>,
}

impl I8042 {
    /// A controller raising `irq` for keyboard data and sending
    /// [`VmEvent::Reset`] when the guest resets the CPU through it.
    pub fn new(irq: EventFd, events: Sender<VmEvent>) -> Self {
        I8042 {
            status: SR_SYS | SR_UNLOCKED,
            // What firmware leaves: interrupts on, translation to set 1 on.
            cb: CB_KBD_INT | CB_SYS | CB_XLATE,
            buf: VecDeque::new(),
            pending: Pending::None,
            irq,
            events,
        }
    }

    fn push(&mut self, b: u8) {
        if self.buf.len() < BUF_MAX {
            self.buf.push_back(b);
        }
    }

    fn push_key_byte(&mut self, b: u8) {
        if self.buf.len() < KEY_BUF_MAX {
            self.buf.push_back(b);
        }
    }

    /// Raises the keyboard IRQ if data waits and interrupts are enabled.
    fn kick(&mut self) {
        if !self.buf.is_empty() && self.cb & CB_KBD_INT != 0 {
            let _ = self.irq.write(1);
        }
    }

    /// Queues a key's set-2 bytes, translated to set 1 when the guest left
    /// translation on (as a PC's controller does). A key is queued whole or
    /// not at all, so a full queue never leaves half a scan code behind.
    fn push_key(&mut self, key: ScanCode, release: bool) {
        if self.cb & CB_KBD_DISABLE != 0 || self.buf.len() + 3 > KEY_BUF_MAX {
            return;
        }
        if key.extended {
            self.push_key_byte(0xe0);
        }
        if self.cb & CB_XLATE != 0 {
            let s1 = translate(key.code);
            self.push_key_byte(if release { s1 | 0x80 } else { s1 });
        } else {
            if release {
                self.push_key_byte(0xf0);
            }
            self.push_key_byte(key.code);
        }
    }

    /// Presses and releases keys, in order.
    pub fn key_strokes(&mut self, strokes: &[KeyStroke]) {
        for s in strokes {
            self.push_key(s.key, s.release);
        }
        self.kick();
    }

    /// Presses and releases Ctrl-Alt-Del.
    pub fn ctrl_alt_del(&mut self) {
        for k in [KEY_CTRL, KEY_ALT, KEY_DEL] {
            self.push_key(k, false);
        }
        for k in [KEY_DEL, KEY_ALT, KEY_CTRL] {
            self.push_key(k, true);
        }
        self.kick();
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CB => self.push(self.cb),
            CMD_WRITE_CB => self.pending = Pending::CommandByte,
            CMD_AUX_DISABLE => self.cb |= CB_AUX_DISABLE,
            CMD_AUX_ENABLE => self.cb &= !CB_AUX_DISABLE,
            // No mouse: its interface test fails with "clock line stuck low".
            CMD_AUX_TEST => self.push(0x01),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_KBD_DISABLE => self.cb |= CB_KBD_DISABLE,
            CMD_KBD_ENABLE => self.cb &= !CB_KBD_DISABLE,
            CMD_READ_OUTP => self.push(0x01),
            CMD_WRITE_OUTP => self.pending = Pending::OutputPort,
            CMD_WRITE_AUX => self.pending = Pending::AuxByte,
            CMD_RESET_CPU => {
                tracing::info!("guest reset through the keyboard controller");
                let _ = self.events.send(VmEvent::Reset);
            }
            _ => {}
        }
    }

    /// A byte sent to the keyboard itself.
    fn keyboard(&mut self, b: u8) {
        match b {
            // Set LEDs, typematic rate, scan code set: take an argument.
            0xed | 0xf3 | 0xf0 => {
                self.push(KBD_ACK);
                self.pending = Pending::KbdArg;
            }
            // Identify: an MF2 keyboard.
            0xf2 => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(0x83);
            }
            // Echo.
            0xee => self.push(0xee),
            // Reset: ack and report a passed self test.
            0xff => {
                self.push(KBD_ACK);
                self.push(0xaa);
            }
            0xf4 | 0xf5 | 0xf6 => self.push(KBD_ACK),
            _ => self.push(KBD_RESEND),
        }
    }
}

/// The controller's translation of a set-2 make code to set 1, for the
/// keys of a 102-key PC keyboard (extended keys share their code's
/// translation: E0 75, Up, is E0 48 as 75, keypad 8, is 48). Codes no key
/// sends pass unchanged.
pub(crate) fn translate(code: u8) -> u8 {
    match code {
        0x76 => 0x01, // Esc
        0x16 => 0x02, // 1
        0x1e => 0x03,
        0x26 => 0x04,
        0x25 => 0x05,
        0x2e => 0x06,
        0x36 => 0x07,
        0x3d => 0x08,
        0x3e => 0x09,
        0x46 => 0x0a,
        0x45 => 0x0b, // 0
        0x4e => 0x0c, // -
        0x55 => 0x0d, // =
        0x66 => 0x0e, // Backspace
        0x0d => 0x0f, // Tab
        0x15 => 0x10, // Q
        0x1d => 0x11,
        0x24 => 0x12,
        0x2d => 0x13,
        0x2c => 0x14,
        0x35 => 0x15,
        0x3c => 0x16,
        0x43 => 0x17,
        0x44 => 0x18,
        0x4d => 0x19, // P
        0x54 => 0x1a, // [
        0x5b => 0x1b, // ]
        0x5a => 0x1c, // Enter
        0x14 => 0x1d, // Ctrl
        0x1c => 0x1e, // A
        0x1b => 0x1f,
        0x23 => 0x20,
        0x2b => 0x21,
        0x34 => 0x22,
        0x33 => 0x23,
        0x3b => 0x24,
        0x42 => 0x25,
        0x4b => 0x26, // L
        0x4c => 0x27, // ;
        0x52 => 0x28, // '
        0x0e => 0x29, // `
        0x12 => 0x2a, // left Shift
        0x5d => 0x2b, // backslash
        0x1a => 0x2c, // Z
        0x22 => 0x2d,
        0x21 => 0x2e,
        0x2a => 0x2f,
        0x32 => 0x30,
        0x31 => 0x31,
        0x3a => 0x32, // M
        0x41 => 0x33, // ,
        0x49 => 0x34, // .
        0x4a => 0x35, // /
        0x59 => 0x36, // right Shift
        0x7c => 0x37, // keypad *
        0x11 => 0x38, // Alt
        0x29 => 0x39, // Space
        0x58 => 0x3a, // Caps Lock
        0x05 => 0x3b, // F1
        0x06 => 0x3c,
        0x04 => 0x3d,
        0x0c => 0x3e,
        0x03 => 0x3f,
        0x0b => 0x40,
        0x83 => 0x41, // F7
        0x0a => 0x42,
        0x01 => 0x43,
        0x09 => 0x44, // F10
        0x77 => 0x45, // Num Lock
        0x7e => 0x46, // Scroll Lock
        0x6c => 0x47, // keypad 7, Home
        0x75 => 0x48, // keypad 8, Up
        0x7d => 0x49, // keypad 9, Page Up
        0x7b => 0x4a, // keypad -
        0x6b => 0x4b, // keypad 4, Left
        0x73 => 0x4c, // keypad 5
        0x74 => 0x4d, // keypad 6, Right
        0x79 => 0x4e, // keypad +
        0x69 => 0x4f, // keypad 1, End
        0x72 => 0x50, // keypad 2, Down
        0x7a => 0x51, // keypad 3, Page Down
        0x70 => 0x52, // keypad 0, Insert
        0x71 => 0x53, // keypad ., Delete
        0x61 => 0x56, // the 102nd key
        0x78 => 0x57, // F11
        0x07 => 0x58, // F12
        0x1f => 0x5b, // left Windows
        0x27 => 0x5c, // right Windows
        0x2f => 0x5d, // Menu
        other => other,
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 1 {
            return;
        }
        match offset {
            COMMAND => {
                let obf = if self.buf.is_empty() { 0 } else { SR_OBF };
                data[0] = self.status | obf;
            }
            DATA => {
                data[0] = self.buf.pop_front().unwrap_or(0);
                self.kick();
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        let b = data[0];
        match offset {
            COMMAND => {
                self.status |= SR_CMD;
                self.pending = Pending::None;
                self.command(b);
            }
            DATA => {
                self.status &= !SR_CMD;
                match std::mem::replace(&mut self.pending, Pending::None) {
                    Pending::CommandByte => self.cb = b,
                    // Bit 0 of the output port is the CPU reset line.
                    Pending::OutputPort if b & 1 == 0 => {
                        tracing::info!("guest reset through the keyboard controller's output port");
                        let _ = self.events.send(VmEvent::Reset);
                    }
                    Pending::OutputPort | Pending::AuxByte => {}
                    // The argument of a keyboard command (LEDs, rate, set).
                    Pending::KbdArg => self.push(KBD_ACK),
                    Pending::None => self.keyboard(b),
                }
            }
            _ => {}
        }
        self.kick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, std::sync::mpsc::Receiver<VmEvent>) {
        let (tx, rx) = std::sync::mpsc::channel();
        (
            I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), tx),
            rx,
        )
    }

    fn drain(d: &mut I8042) -> Vec<u8> {
        let mut out = vec![];
        loop {
            let mut s = [0u8];
            d.read(COMMAND, &mut s);
            if s[0] & SR_OBF == 0 {
                return out;
            }
            let mut b = [0u8];
            d.read(DATA, &mut b);
            out.push(b[0]);
        }
    }

    #[test]
    fn ctrl_alt_del_in_set_1_and_set_2() {
        let (mut d, _rx) = dev();
        d.ctrl_alt_del();
        assert_eq!(
            drain(&mut d),
            vec![0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
        assert!(d.irq.read().unwrap() >= 1);
        // The guest turns translation off: set 2 with F0 break prefixes.
        d.write(COMMAND, &[CMD_WRITE_CB]);
        d.write(DATA, &[CB_KBD_INT]);
        d.ctrl_alt_del();
        assert_eq!(
            drain(&mut d),
            vec![0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
    }

    #[test]
    fn reset_command_and_output_port_signal_reset() {
        let (mut d, rx) = dev();
        d.write(COMMAND, &[CMD_RESET_CPU]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset)));
        d.write(COMMAND, &[CMD_WRITE_OUTP]);
        d.write(DATA, &[0xff]);
        assert!(rx.try_recv().is_err());
        d.write(COMMAND, &[CMD_WRITE_OUTP]);
        d.write(DATA, &[0xfe]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset)));
    }

    #[test]
    fn probe_sequence_a_kernel_uses() {
        let (mut d, _rx) = dev();
        d.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(drain(&mut d), vec![0x55]);
        d.write(COMMAND, &[CMD_READ_CB]);
        assert_eq!(drain(&mut d), vec![CB_KBD_INT | CB_SYS | CB_XLATE]);
        d.write(DATA, &[0xff]);
        assert_eq!(drain(&mut d), vec![KBD_ACK, 0xaa]);
        d.write(DATA, &[0xed]);
        d.write(DATA, &[0x07]);
        assert_eq!(drain(&mut d), vec![KBD_ACK, KBD_ACK]);
    }

    #[test]
    fn key_strokes_queue_whole_keys_up_to_a_bound() {
        let (mut d, _rx) = dev();
        let a = |release| KeyStroke {
            key: ScanCode::plain(0x1c),
            release,
        };
        let up = |release| KeyStroke {
            key: ScanCode::extended(0x75),
            release,
        };
        d.key_strokes(&[a(false), a(true), up(false), up(true)]);
        assert_eq!(drain(&mut d), vec![0x1e, 0x9e, 0xe0, 0x48, 0xe0, 0xc8]);
        // Untranslated set 2.
        d.write(COMMAND, &[CMD_WRITE_CB]);
        d.write(DATA, &[CB_KBD_INT]);
        d.key_strokes(&[up(false), up(true)]);
        assert_eq!(drain(&mut d), vec![0xe0, 0x75, 0xe0, 0xf0, 0x75]);
        // A flood of keys stops at the bound, on a whole key.
        let many = vec![up(true); 10_000];
        d.key_strokes(&many);
        let got = drain(&mut d);
        assert!(got.len() <= KEY_BUF_MAX && got.len() > BUF_MAX);
        assert_eq!(got.len() % 3, 0);
        // A disabled keyboard sends nothing.
        d.write(COMMAND, &[CMD_KBD_DISABLE]);
        d.key_strokes(&[a(false)]);
        assert!(drain(&mut d).is_empty());
    }

    #[test]
    fn a_guest_flooding_the_keyboard_cannot_grow_the_buffer() {
        let (mut d, _rx) = dev();
        for _ in 0..10_000 {
            d.write(DATA, &[0xee]);
            d.write(DATA, &[0x12, 0x34]);
        }
        assert_eq!(drain(&mut d).len(), BUF_MAX);
    }
}
