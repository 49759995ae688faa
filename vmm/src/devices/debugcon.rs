//! The firmware's debug port (0x402, as QEMU's isa-debugcon): SeaBIOS and
//! OVMF write their log there byte by byte. Lines go to the VMM's log
//! (target `firmware`, debug level), bounded so a guest writing without
//! newlines cannot grow us.

use crate::bus::BusDevice;

/// The port.
pub const PORT: u16 = 0x402;
/// Longest line kept; the rest of a longer one is cut.
const MAX_LINE: usize = 512;

/// The debug port.
#[derive(Default)]
pub struct DebugCon {
    line: Vec<u8>,
    lines: u64,
}

impl DebugCon {
    /// Lines the firmware has written so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // QEMU's debugcon reads back 0xe9, which firmware uses to find it.
        data.fill(0xe9);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        for &b in data {
            match b {
                b'\n' => {
                    let text = String::from_utf8_lossy(&self.line);
                    tracing::debug!(target: "firmware", "{}", text.trim_end());
                    self.line.clear();
                    self.lines += 1;
                }
                _ if self.line.len() < MAX_LINE => self.line.push(b),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_and_counted() {
        let mut d = DebugCon::default();
        d.write(0, b"SeaBIOS (version x)\nhalf");
        assert_eq!(d.lines(), 1);
        d.write(0, &vec![b'a'; 10_000]);
        assert_eq!(d.line.len(), MAX_LINE);
        d.write(0, b"\n");
        assert_eq!(d.lines(), 2);
        assert!(d.line.is_empty());
        let mut b = [0u8];
        d.read(0, &mut b);
        assert_eq!(b, [0xe9]);
    }
}
