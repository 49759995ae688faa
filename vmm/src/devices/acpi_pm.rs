//! ACPI fixed hardware: the PM1 event block (power button status and
//! enable), the PM1 control block (the guest enters S5 to power off), the PM
//! timer, and the reset register. The power button is how the host asks a
//! guest to shut down gracefully: the guest's ACPI driver sees the fixed
//! power-button event on the SCI and starts its orderly shutdown.

use std::sync::mpsc::Sender;
use std::time::Instant;

use crate::arch::acpi::{RESET_VALUE, S5_SLP_TYP};
use crate::bus::BusDevice;
use crate::vm::VmEvent;

const PM1_STS: u64 = 0;
const PM1_EN: u64 = 2;
const PM1_CNT: u64 = 4;
const PM_TMR: u64 = 8;

const PWRBTN: u16 = 1 << 8;
const WAK_STS: u16 = 1 << 15;
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;

/// PM timer frequency fixed by the ACPI specification.
const PM_TIMER_HZ: u128 = 3_579_545;

/// The PM block's state as a migration carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmSnapshot {
    /// PM1 status.
    pub sts: u16,
    /// PM1 enable.
    pub en: u16,
    /// PM1 control.
    pub cnt: u16,
    /// How long the PM timer had run, nanoseconds.
    pub timer_nanos: u64,
}

/// Drives the SCI line (level-triggered).
pub type SciLine = Box<dyn Fn(bool) + Send>;

/// The PM1 event/control blocks and the PM timer, at one I/O range.
pub struct AcpiPm {
    sts: u16,
    en: u16,
    cnt: u16,
    start: Instant,
    sci: SciLine,
    events: Sender<VmEvent>,
}

impl AcpiPm {
    /// A PM block raising `sci` and sending power events to `events`.
    pub fn new(sci: SciLine, events: Sender<VmEvent>) -> Self {
        AcpiPm {
            sts: 0,
            en: 0,
            cnt: SCI_EN,
            start: Instant::now(),
            sci,
            events,
        }
    }

    fn update_sci(&self) {
        (self.sci)(self.sts & self.en & PWRBTN != 0);
    }

    /// Presses the power button. Returns false if the guest has not enabled
    /// the power-button event, in which case nobody is listening.
    pub fn press_power_button(&mut self) -> bool {
        self.sts |= PWRBTN;
        self.update_sci();
        self.en & PWRBTN != 0
    }

    /// The registers and the PM timer's count, for a migration.
    pub fn state(&self) -> PmSnapshot {
        PmSnapshot {
            sts: self.sts,
            en: self.en,
            cnt: self.cnt,
            timer_nanos: self.start.elapsed().as_nanos() as u64,
        }
    }

    /// Takes `state` (from [`AcpiPm::state`] on another VM): the timer goes on from its count.
    pub fn restore(&mut self, state: &PmSnapshot) {
        self.sts = state.sts;
        self.en = state.en;
        self.cnt = state.cnt | SCI_EN;
        let now = Instant::now();
        self.start = now
            .checked_sub(std::time::Duration::from_nanos(state.timer_nanos))
            .unwrap_or(now);
        self.update_sci();
    }

    fn timer(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        // 24-bit timer: the FADT does not claim TMR_VAL_EXT.
        (ticks & 0x00ff_ffff) as u32
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value: u32 = match offset {
            PM1_STS => u32::from(self.sts) | (u32::from(self.en) << 16),
            PM1_EN => u32::from(self.en),
            PM1_CNT => u32::from(self.cnt),
            PM_TMR => self.timer(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match (offset, n) {
            (PM1_STS, 4) => {
                self.sts &= !(v as u16);
                self.en = (v >> 16) as u16;
            }
            // Status bits are write-one-to-clear.
            (PM1_STS, _) => self.sts &= !(v as u16),
            (PM1_EN, _) => self.en = v as u16,
            (PM1_CNT, _) => {
                let v = v as u16;
                // SCI_EN stays set: there is no legacy (SMM) mode to go back to.
                self.cnt = (v & !SLP_EN) | SCI_EN;
                if v & SLP_EN != 0 {
                    let typ = (v >> SLP_TYP_SHIFT) & 7;
                    if typ == S5_SLP_TYP {
                        let _ = self.events.send(VmEvent::PowerOff);
                    } else {
                        // Sleep states other than S5 are not offered; wake at once.
                        tracing::info!(slp_typ = typ, "guest asked for an unsupported sleep state");
                        self.sts |= WAK_STS;
                    }
                }
            }
            _ => {}
        }
        self.update_sci();
    }
}

/// The PC reset control register (port 0xCF9), named in the FADT as the
/// ACPI reset register.
pub struct ResetPort {
    events: Sender<VmEvent>,
}

impl ResetPort {
    /// A reset port sending [`VmEvent::Reset`] to `events`.
    pub fn new(events: Sender<VmEvent>) -> Self {
        ResetPort { events }
    }
}

impl BusDevice for ResetPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Bit 2 starts the reset; the ACPI reset value sets it.
        if data.len() == 1 && data[0] & RESET_VALUE & 0x4 != 0 {
            tracing::info!("guest reset through the ACPI reset register");
            let _ = self.events.send(VmEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn pm() -> (AcpiPm, Arc<AtomicBool>, std::sync::mpsc::Receiver<VmEvent>) {
        let line = Arc::new(AtomicBool::new(false));
        let l = line.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        (
            AcpiPm::new(Box::new(move |v| l.store(v, Ordering::SeqCst)), tx),
            line,
            rx,
        )
    }

    #[test]
    fn a_pm_block_s_state_carried_to_another_keeps_its_pending_button_and_its_timer() {
        let (mut a, _, _rx) = pm();
        a.write(PM1_EN, &PWRBTN.to_le_bytes());
        a.press_power_button();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let state: PmSnapshot =
            serde_json::from_str(&serde_json::to_string(&a.state()).unwrap()).unwrap();
        let mut t = [0u8; 4];
        let at_state = (u128::from(state.timer_nanos) * PM_TIMER_HZ / 1_000_000_000) as u32;
        let (mut b, line, _rx2) = pm();
        b.restore(&state);
        // The pending, enabled button is on the new SCI at once.
        assert!(line.load(Ordering::SeqCst));
        // The timer goes on from about where it was (30 ms is about 107,000 ticks), not from 0.
        b.read(PM_TMR, &mut t);
        let after = u32::from_le_bytes(t);
        assert!(after >= 100_000, "the timer started over: {after}");
        assert!(
            after >= at_state && after - at_state < 3_579_545,
            "{at_state} in the state, then {after}"
        );
    }

    #[test]
    fn power_button_raises_sci_only_when_enabled_and_clears_on_ack() {
        let (mut p, line, _rx) = pm();
        assert!(!p.press_power_button());
        assert!(!line.load(Ordering::SeqCst));
        p.write(PM1_EN, &PWRBTN.to_le_bytes());
        assert!(
            line.load(Ordering::SeqCst),
            "pending event fires once enabled"
        );
        let mut s = [0u8; 2];
        p.read(PM1_STS, &mut s);
        assert_eq!(u16::from_le_bytes(s) & PWRBTN, PWRBTN);
        p.write(PM1_STS, &PWRBTN.to_le_bytes());
        assert!(!line.load(Ordering::SeqCst));
        assert!(p.press_power_button());
        assert!(line.load(Ordering::SeqCst));
    }

    #[test]
    fn s5_powers_off_and_other_states_do_not() {
        let (mut p, _line, rx) = pm();
        p.write(PM1_CNT, &((3 << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        assert!(rx.try_recv().is_err());
        p.write(
            PM1_CNT,
            &((S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes(),
        );
        assert!(matches!(rx.try_recv(), Ok(VmEvent::PowerOff)));
        let mut c = [0u8; 2];
        p.read(PM1_CNT, &mut c);
        assert_eq!(u16::from_le_bytes(c) & SCI_EN, SCI_EN);
    }

    #[test]
    fn pm_timer_advances_and_reset_port_resets() {
        let (mut p, _l, _rx) = pm();
        let mut a = [0u8; 4];
        p.read(PM_TMR, &mut a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut b = [0u8; 4];
        p.read(PM_TMR, &mut b);
        assert_ne!(a, b);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut r = ResetPort::new(tx);
        r.write(0, &[0x02]);
        assert!(rx.try_recv().is_err());
        r.write(0, &[RESET_VALUE]);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Reset)));
    }
}
