//! The i8042 keyboard controller: enough of a PC's for a kernel to find a
//! keyboard, receive keys from the host (Ctrl-Alt-Del from the control
//! socket, a console's typing from the RFB server), and reset the machine
//! by pulsing the CPU reset line (command 0xFE); and, on its auxiliary
//! port, a PS/2 mouse (an IntelliMouse, with a wheel, once the guest asks
//! for one) that moves as the console's pointer does.

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
/// The byte in the output buffer comes from the mouse.
const SR_AUX_OBF: u8 = 0x20;

const CB_KBD_INT: u8 = 0x01;
const CB_AUX_INT: u8 = 0x02;
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
const CMD_WRITE_AUX_OBUF: u8 = 0xd3;
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Pending {
    None,
    CommandByte,
    OutputPort,
    AuxByte,
    AuxOutput,
    KbdArg,
}

/// Bytes the mouse may have queued toward the guest (a few hundred packets).
const AUX_BUF_MAX: usize = 1024;

/// The PS/2 mouse on the auxiliary port.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Mouse {
    /// Data reporting (stream mode) is on.
    reporting: bool,
    /// The next byte is the argument of this command.
    arg_of: Option<u8>,
    /// The last three sample rates set: 200, 100, 80 asks for the wheel.
    rates: [u8; 3],
    /// The guest switched the IntelliMouse protocol (4-byte packets) on.
    wheel: bool,
    buttons: u8,
}

impl Mouse {
    /// The answer to a byte the guest sent the mouse.
    fn command(&mut self, b: u8, out: &mut Vec<u8>) {
        if let Some(cmd) = self.arg_of.take() {
            if cmd == 0xf3 {
                self.rates = [self.rates[1], self.rates[2], b];
                if self.rates == [200, 100, 80] {
                    self.wheel = true;
                }
            }
            out.push(KBD_ACK);
            return;
        }
        match b {
            // Set sample rate or resolution: an argument follows.
            0xf3 | 0xe8 => {
                self.arg_of = Some(b);
                out.push(KBD_ACK);
            }
            // Get ID: 3 once the wheel is on.
            0xf2 => out.extend([KBD_ACK, if self.wheel { 3 } else { 0 }]),
            // Status request: stream mode, reporting, buttons; resolution 2, rate 100.
            0xe9 => out.extend([
                KBD_ACK,
                u8::from(self.reporting) << 5 | self.buttons & 7,
                2,
                100,
            ]),
            0xf4 => {
                self.reporting = true;
                out.push(KBD_ACK);
            }
            0xf5 => {
                self.reporting = false;
                out.push(KBD_ACK);
            }
            0xf6 => {
                *self = Mouse::default();
                out.push(KBD_ACK);
            }
            0xff => {
                *self = Mouse::default();
                out.extend([KBD_ACK, 0xaa, 0x00]);
            }
            // Scaling, stream and remote mode, wrap mode off: acknowledged.
            0xe6 | 0xe7 | 0xea | 0xec | 0xf0 => out.push(KBD_ACK),
            // Read data (remote mode): an empty packet.
            0xeb => {
                out.push(KBD_ACK);
                out.extend(self.packet(0, 0, 0));
            }
            _ => out.push(KBD_RESEND),
        }
    }

    /// One movement packet: 3 bytes, 4 with the wheel. `dy` grows upward.
    fn packet(&self, dx: i32, dy: i32, dz: i32) -> Vec<u8> {
        let (x, y) = (dx.clamp(-255, 255), dy.clamp(-255, 255));
        let flags =
            0x08 | (self.buttons & 7) | if x < 0 { 0x10 } else { 0 } | if y < 0 { 0x20 } else { 0 };
        let mut p = vec![flags, x as u8, y as u8];
        if self.wheel {
            p.push(dz.clamp(-8, 7) as u8 & 0x0f);
        }
        p
    }
}

/// The controller and its keyboard.
pub struct I8042 {
    status: u8,
    cb: u8,
    buf: VecDeque<u8>,
    aux: VecDeque<u8>,
    mouse: Mouse,
    pending: Pending,
    irq: EventFd,
    aux_irq: Option<EventFd>,
    events: Sender<VmEvent>,
}

/// The controller's state as a migration carries it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Snapshot {
    status: u8,
    command_byte: u8,
    keyboard: Vec<u8>,
    aux: Vec<u8>,
    mouse: Mouse,
    pending: Pending,
}

impl I8042 {
    /// Its registers, queues and the mouse's mode, for a migration.
    pub fn state(&self) -> I8042Snapshot {
        I8042Snapshot {
            status: self.status,
            command_byte: self.cb,
            keyboard: self.buf.iter().copied().collect(),
            aux: self.aux.iter().copied().collect(),
            mouse: self.mouse.clone(),
            pending: self.pending,
        }
    }

    /// Takes `state` (from [`I8042::state`] on another VM's controller), its queues bounded
    /// as the controller's own.
    pub fn restore(&mut self, state: &I8042Snapshot) {
        self.status = state.status;
        self.cb = state.command_byte;
        self.buf = state.keyboard.iter().copied().take(KEY_BUF_MAX).collect();
        self.aux = state.aux.iter().copied().take(AUX_BUF_MAX).collect();
        self.mouse = state.mouse.clone();
        self.pending = state.pending;
    }

    /// A controller raising `irq` for keyboard data and sending
    /// [`VmEvent::Reset`] when the guest resets the CPU through it; with
    /// `aux_irq` (IRQ 12), it has a PS/2 mouse.
    pub fn new(irq: EventFd, aux_irq: Option<EventFd>, events: Sender<VmEvent>) -> Self {
        I8042 {
            status: SR_SYS | SR_UNLOCKED,
            // What firmware leaves: interrupts on, translation to set 1 on.
            cb: CB_KBD_INT | CB_SYS | CB_XLATE,
            buf: VecDeque::new(),
            aux: VecDeque::new(),
            mouse: Mouse::default(),
            pending: Pending::None,
            irq,
            aux_irq,
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

    /// Whether the next byte the guest reads is the mouse's.
    fn aux_next(&self) -> bool {
        self.buf.is_empty() && !self.aux.is_empty()
    }

    /// Raises the keyboard's or the mouse's IRQ if data waits and its
    /// interrupt is enabled.
    fn kick(&mut self) {
        if !self.buf.is_empty() && self.cb & CB_KBD_INT != 0 {
            let _ = self.irq.write(1);
        } else if self.aux_next() && self.cb & CB_AUX_INT != 0 {
            if let Some(irq) = &self.aux_irq {
                let _ = irq.write(1);
            }
        }
    }

    fn push_aux(&mut self, bytes: &[u8]) {
        if self.aux.len() + bytes.len() <= AUX_BUF_MAX {
            self.aux.extend(bytes);
        }
    }

    /// The console's pointer moved by (`dx`, `dy`) (`dy` grows downward, as
    /// on a screen) and turned the wheel by `dz` (negative: up), with
    /// `buttons` held (bit 0 left, 1 right, 2 middle): movement packets for
    /// the guest, if it turned the mouse's reporting on.
    pub fn pointer(&mut self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        if self.aux_irq.is_none() || !self.mouse.reporting || self.cb & CB_AUX_DISABLE != 0 {
            return;
        }
        self.mouse.buttons = buttons & 7;
        let (mut x, mut y) = (dx, -dy);
        let mut z = dz;
        // Large moves go as several packets, each within a packet's range.
        loop {
            let (px, py) = (x.clamp(-255, 255), y.clamp(-255, 255));
            let p = self.mouse.packet(px, py, z);
            self.push_aux(&p);
            x -= px;
            y -= py;
            z = 0;
            if x == 0 && y == 0 {
                break;
            }
        }
        self.kick();
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

    /// Presses and releases as many of `strokes` as the queue holds now, in
    /// order; returns how many. The rest waits with the caller (typed text
    /// longer than the queue goes in as the guest reads).
    pub fn key_strokes(&mut self, strokes: &[KeyStroke]) -> usize {
        if self.cb & CB_KBD_DISABLE != 0 {
            return 0;
        }
        let mut n = 0;
        for s in strokes {
            if self.buf.len() + 3 > KEY_BUF_MAX {
                break;
            }
            self.push_key(s.key, s.release);
            n += 1;
        }
        self.kick();
        n
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
            // Without a mouse its interface test fails ("clock line stuck low").
            CMD_AUX_TEST => self.push(if self.aux_irq.is_some() { 0x00 } else { 0x01 }),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_KBD_DISABLE => self.cb |= CB_KBD_DISABLE,
            CMD_KBD_ENABLE => self.cb &= !CB_KBD_DISABLE,
            CMD_READ_OUTP => self.push(0x01),
            CMD_WRITE_OUTP => self.pending = Pending::OutputPort,
            CMD_WRITE_AUX => self.pending = Pending::AuxByte,
            CMD_WRITE_AUX_OBUF => self.pending = Pending::AuxOutput,
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
                let obf = match (self.buf.is_empty(), self.aux_next()) {
                    (false, _) => SR_OBF,
                    (true, true) => SR_OBF | SR_AUX_OBF,
                    (true, false) => 0,
                };
                data[0] = self.status | obf;
            }
            DATA => {
                data[0] = match self.buf.pop_front() {
                    Some(b) => b,
                    None => self.aux.pop_front().unwrap_or(0),
                };
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
                    Pending::OutputPort => {}
                    Pending::AuxByte if self.aux_irq.is_some() => {
                        let mut out = Vec::new();
                        self.mouse.command(b, &mut out);
                        self.push_aux(&out);
                    }
                    Pending::AuxByte => {}
                    Pending::AuxOutput => self.push_aux(&[b]),
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
            I8042::new(
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                Some(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
                tx,
            ),
            rx,
        )
    }

    #[test]
    fn a_controller_s_state_carried_to_another_keeps_its_queues_and_modes() {
        let (mut a, _rx) = dev();
        // The guest turns the mouse's wheel on (rates 200, 100, 80) and reporting, leaves a
        // command-byte write half done, and two keys wait unread.
        for rate in [200u8, 100, 80] {
            a.write(COMMAND, &[0xd4]);
            a.write(DATA, &[0xf3]);
            a.write(COMMAND, &[0xd4]);
            a.write(DATA, &[rate]);
        }
        a.write(COMMAND, &[0xd4]);
        a.write(DATA, &[0xf4]);
        drain(&mut a);
        a.key_strokes(&[KeyStroke {
            key: ScanCode::plain(0x1c),
            release: false,
        }]);
        a.write(COMMAND, &[0x60]);
        let state: I8042Snapshot =
            serde_json::from_str(&serde_json::to_string(&a.state()).unwrap()).unwrap();
        let (mut b, _rx2) = dev();
        b.restore(&state);
        assert_eq!(b.state(), state);
        // The half-done command takes its byte on the new controller.
        b.write(DATA, &[0x47]);
        assert_eq!(b.state().command_byte, 0x47);
        // The waiting key is read there.
        assert!(!drain(&mut b).is_empty());
        // The mouse still has its wheel: Get ID answers 3.
        b.write(COMMAND, &[0xd4]);
        b.write(DATA, &[0xf2]);
        assert_eq!(drain(&mut b), vec![KBD_ACK, 3]);
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

    fn to_mouse(d: &mut I8042, b: u8) {
        d.write(COMMAND, &[CMD_WRITE_AUX]);
        d.write(DATA, &[b]);
    }

    #[test]
    fn the_mouse_answers_a_driver_and_reports_movement_with_the_wheel() {
        let (mut d, _rx) = dev();
        d.write(COMMAND, &[CMD_AUX_TEST]);
        assert_eq!(drain(&mut d), vec![0x00], "a mouse is there");
        to_mouse(&mut d, 0xff);
        assert_eq!(drain(&mut d), vec![0xfa, 0xaa, 0x00]);
        // Nothing is reported until the guest enables reporting.
        d.pointer(5, 5, 0, 0);
        assert!(drain(&mut d).is_empty());
        // The IntelliMouse knock: sample rates 200, 100, 80, then ID 3.
        for r in [200, 100, 80] {
            to_mouse(&mut d, 0xf3);
            to_mouse(&mut d, r);
        }
        to_mouse(&mut d, 0xf2);
        assert_eq!(
            drain(&mut d),
            vec![0xfa, 0xfa, 0xfa, 0xfa, 0xfa, 0xfa, 0xfa, 3]
        );
        to_mouse(&mut d, 0xf4);
        assert_eq!(drain(&mut d), vec![0xfa]);
        // The status register says which device a byte comes from.
        d.pointer(3, 4, -1, 1);
        let mut st = [0u8];
        d.read(COMMAND, &mut st);
        assert_eq!(st[0] & (SR_OBF | SR_AUX_OBF), SR_OBF | SR_AUX_OBF);
        // Left held, x +3, y -4 (screen down is mouse negative), wheel up.
        assert_eq!(drain(&mut d), vec![0x08 | 0x20 | 1, 3, 0xfc, 0x0f]);
        // A long move is cut into packets a packet can carry.
        d.pointer(600, 0, 0, 0);
        let p = drain(&mut d);
        assert_eq!(p.len(), 12);
        assert_eq!([p[1], p[5], p[9]], [255, 255, 90]);
        // Keyboard bytes go first; then the mouse's.
        d.pointer(1, 0, 0, 0);
        d.key_strokes(&[KeyStroke {
            key: ScanCode::plain(0x1c),
            release: false,
        }]);
        let mut b = [0u8];
        d.read(COMMAND, &mut st);
        assert_eq!(st[0] & SR_AUX_OBF, 0);
        d.read(DATA, &mut b);
        assert_eq!(b[0], 0x1e);
        d.read(COMMAND, &mut st);
        assert_ne!(st[0] & SR_AUX_OBF, 0);
    }
}
