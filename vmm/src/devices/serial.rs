//! The 8250/16550 serial console (COM1) and where its output goes: the
//! chosen sink (stdout or a file), an in-memory log of recent output, and any
//! number of streaming clients of the control socket.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{lock, BusDevice};

/// How much recent console output is kept for clients that attach late.
const LOG_CAPACITY: usize = 256 * 1024;
/// Chunks queued per streaming client before it counts as too slow.
const CLIENT_QUEUE: usize = 1024;

/// Raises an edge-triggered IRQ through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A serial log file that keeps only the newest output: when `FILE` reaches half the bound it
/// becomes `FILE.1` (replacing the one before) and a new `FILE` begins, so the two hold at
/// most the bound, and always the newest output.
pub struct BoundedLog {
    path: std::path::PathBuf,
    file: std::fs::File,
    written: u64,
    half: u64,
}

impl BoundedLog {
    /// Opens (appends to) `path`, keeping at most `max` bytes in it and `path.1`.
    pub fn open(path: &std::path::Path, max: u64) -> std::io::Result<BoundedLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        let mut log = BoundedLog {
            path: path.to_path_buf(),
            file,
            written,
            half: (max / 2).max(1),
        };
        if log.written >= log.half {
            log.rotate()?;
        }
        Ok(log)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        std::fs::rename(&self.path, &old)?;
        self.file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

impl Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written >= self.half {
            self.rotate()?;
        }
        let room = (self.half - self.written).max(1) as usize;
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Console output fan-out, shared by the serial device and the control socket.
pub struct Console {
    sink: Mutex<Box<dyn Write + Send>>,
    log: Mutex<VecDeque<u8>>,
    clients: Mutex<Vec<SyncSender<Vec<u8>>>>,
}

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Arc<Self> {
        Arc::new(Console {
            sink: Mutex::new(sink),
            log: Mutex::new(VecDeque::with_capacity(4096)),
            clients: Mutex::new(Vec::new()),
        })
    }

    /// Records guest output and passes it on.
    pub fn output(&self, data: &[u8]) {
        {
            let mut s = lock(&self.sink);
            // A closed terminal must not stop the guest.
            let _ = s.write_all(data).and_then(|_| s.flush());
        }
        {
            let mut log = lock(&self.log);
            let len = log.len();
            let overflow = (len + data.len()).saturating_sub(LOG_CAPACITY);
            log.drain(..overflow.min(len));
            log.extend(data.iter().skip(data.len().saturating_sub(LOG_CAPACITY)));
        }
        // Slow or gone clients are dropped rather than allowed to stall the vCPU.
        lock(&self.clients).retain(|c| match c.try_send(data.to_vec()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
        });
    }

    /// The recent output still in the log.
    pub fn history(&self) -> Vec<u8> {
        lock(&self.log).iter().copied().collect()
    }

    /// Subscribes to future output; returns the history up to now and the stream.
    pub fn subscribe(&self) -> (Vec<u8>, Receiver<Vec<u8>>) {
        let (tx, rx) = sync_channel(CLIENT_QUEUE);
        // Hold the log lock while registering so no byte is lost or doubled.
        let log = lock(&self.log);
        lock(&self.clients).push(tx);
        (log.iter().copied().collect(), rx)
    }
}

/// Adapter giving vm-superio a `Write` that feeds the console.
pub struct ConsoleWriter(pub Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.output(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The serial port as a bus device.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `console`.
    pub fn new(irq: EventFd, console: Arc<Console>) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), ConsoleWriter(console)),
        }
    }

    /// Queues bytes for the guest to read; returns how many fit in the FIFO.
    pub fn input(&mut self, data: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(data).unwrap_or(0)
    }

    /// The UART's registers and receive FIFO, for a migration.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Takes `state` (from [`SerialDevice::state`] on another VM's UART), keeping this one's
    /// interrupt line and console; an interrupt the state had pending is raised again.
    pub fn restore(&mut self, state: &SerialSnapshot) -> std::io::Result<()> {
        let irq = self.serial.interrupt_evt().0.try_clone()?;
        let console = self.serial.writer().0.clone();
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor[0],
            baud_divisor_high: state.baud_divisor[1],
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        self.serial = Serial::from_state(&s, IrqTrigger(irq), NoEvents, ConsoleWriter(console))
            .map_err(|e| std::io::Error::other(format!("the serial port's state: {e:?}")))?;
        Ok(())
    }
}

/// A UART's state as a migration carries it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// The divisor latch, low then high byte.
    pub baud_divisor: [u8; 2],
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes received, not yet read by the guest (at most the FIFO's 64).
    pub in_buffer: Vec<u8>,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), 1) = (u8::try_from(offset), data.len()) {
            data[0] = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), 1) = (u8::try_from(offset), data.len()) {
            if let Err(e) = self.serial.write(off, data[0]) {
                tracing::warn!(error = ?e, "serial write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_reaches_log_and_subscribers_and_history_is_bounded() {
        let c = Console::new(Box::new(std::io::sink()));
        c.output(b"hello ");
        let (hist, rx) = c.subscribe();
        assert_eq!(hist, b"hello ");
        c.output(b"world");
        assert_eq!(rx.recv().unwrap(), b"world");
        c.output(&vec![b'x'; LOG_CAPACITY + 10]);
        let h = c.history();
        assert_eq!(h.len(), LOG_CAPACITY);
        assert!(h.iter().all(|b| *b == b'x'));
    }

    #[test]
    fn a_uart_s_state_carried_to_another_goes_on_as_it_was() {
        let c = Console::new(Box::new(std::io::sink()));
        let mut a = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), c.clone());
        // The guest sets 8N1 at 115200 (DLAB, divisor 1), enables the receive interrupt and
        // writes its scratch register; two bytes arrive, one is read.
        a.write(3, &[0x80]);
        a.write(0, &[1]);
        a.write(1, &[0]);
        a.write(3, &[0x03]);
        a.write(1, &[0x01]);
        a.write(7, &[0x5a]);
        assert_eq!(a.input(b"xy"), 2);
        let mut d = [0u8];
        a.read(0, &mut d);
        assert_eq!(d, [b'x']);
        let state: SerialSnapshot =
            serde_json::from_str(&serde_json::to_string(&a.state()).unwrap()).unwrap();
        let c2 = Console::new(Box::new(std::io::sink()));
        let mut b = SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), c2.clone());
        b.restore(&state).unwrap();
        assert_eq!(b.state(), state);
        // The byte not yet read is there to read: data ready in the line status.
        b.read(5, &mut d);
        assert_eq!(d[0] & 1, 1, "LSR {:#x}", d[0]);
        b.read(0, &mut d);
        assert_eq!(d, [b'y']);
        b.read(7, &mut d);
        assert_eq!(d, [0x5a]);
        b.read(3, &mut d);
        assert_eq!(d, [0x03]);
        // Output goes to the new VM's console.
        b.write(0, b"z");
        assert_eq!(c2.history(), b"z");
        assert!(!c.history().contains(&b'z'));
        // A state with more bytes than the FIFO holds is refused, the UART left as it was.
        let mut big = state.clone();
        big.in_buffer = vec![0; 65];
        assert!(b.restore(&big).is_err());
        assert_eq!(b.state().scratch, 0x5a);
    }

    #[test]
    fn uart_transmits_through_the_console() {
        let c = Console::new(Box::new(std::io::sink()));
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), c.clone());
        for b in b"ok\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(c.history(), b"ok\n");
        // Wide or out-of-range accesses are ignored, not a panic.
        s.write(0x1_0000, &[1]);
        let mut d = [9u8; 2];
        s.read(0, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
