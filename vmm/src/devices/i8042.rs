//! The i8042 keyboard controller: enough of a PC's for a kernel to find a
//! keyboard, receive Ctrl-Alt-Del from the host, and reset the machine by
//! pulsing the CPU reset line (command 0xFE).

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

/// Most bytes queued toward the guest; beyond this, key events are dropped
/// as a real controller's buffer would overflow.
const BUF_MAX: usize = 64;

/// Keys as scan code set 2 make codes (the keyboard's native set).
const KEY_CTRL: &[u8] = &[0x14];
const KEY_ALT: &[u8] = &[0x11];
const KEY_DEL: &[u8] = &[0xe0, 0x71];

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

    /// Raises the keyboard IRQ if data waits and interrupts are enabled.
    fn kick(&mut self) {
        if !self.buf.is_empty() && self.cb & CB_KBD_INT != 0 {
            let _ = self.irq.write(1);
        }
    }

    /// Queues set-2 scan code bytes, translated to set 1 when the guest left
    /// translation on (as a PC's controller does).
    fn push_key(&mut self, code: &[u8], release: bool) {
        if self.cb & CB_KBD_DISABLE != 0 {
            return;
        }
        if self.cb & CB_XLATE != 0 {
            for &b in code {
                match b {
                    0xe0 => self.push(0xe0),
                    b => {
                        let s1 = translate(b);
                        self.push(if release { s1 | 0x80 } else { s1 });
                    }
                }
            }
        } else {
            let (last, prefix) = code.split_last().expect("key codes are not empty");
            for &b in prefix {
                self.push(b);
            }
            if release {
                self.push(0xf0);
            }
            self.push(*last);
        }
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

/// Set 2 to set 1 for the make codes we generate.
fn translate(code: u8) -> u8 {
    match code {
        0x14 => 0x1d,
        0x11 => 0x38,
        0x71 => 0x53,
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
    fn a_guest_flooding_the_keyboard_cannot_grow_the_buffer() {
        let (mut d, _rx) = dev();
        for _ in 0..10_000 {
            d.write(DATA, &[0xee]);
            d.write(DATA, &[0x12, 0x34]);
        }
        assert_eq!(drain(&mut d).len(), BUF_MAX);
    }
}
