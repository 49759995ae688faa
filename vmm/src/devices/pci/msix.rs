//! MSI-X: a device's table of message addresses and data, and the pending
//! bits of vectors the guest has masked. A device signals a vector; the
//! message goes to the guest (KVM_SIGNAL_MSI) if the vector, the function and
//! MSI-X itself allow it, else the vector is marked pending and delivered
//! when the guest unmasks it.

use std::sync::Mutex;

use crate::bus::lock;

/// PCI capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
/// Size of one table entry.
const ENTRY_SIZE: u64 = 16;
/// Message control: the function's vectors are masked.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control: MSI-X is on.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Vector control: this vector is masked.
const VECTOR_MASKED: u32 = 1;

/// Sends a message (address, data) to the guest's interrupt controller.
pub type MsiSender = Box<dyn Fn(u64, u32) + Send + Sync>;

#[derive(Clone, Copy)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
}

/// A function's MSI-X table and pending bits, as a live migration carries them (whether
/// MSI-X is on, and the function's mask, are in its configuration space).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixSnapshot {
    /// Each vector: address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    /// Each vector's pending bit.
    pub pending: Vec<bool>,
}

/// The MSI-X state of one function.
pub struct Msix {
    state: Mutex<State>,
    send: MsiSender,
}

impl Msix {
    /// `vectors` vectors (1-2048), all masked, MSI-X off.
    pub fn new(vectors: u16, send: MsiSender) -> Self {
        let n = usize::from(vectors.clamp(1, 2048));
        Msix {
            state: Mutex::new(State {
                entries: vec![
                    Entry {
                        addr_lo: 0,
                        addr_hi: 0,
                        data: 0,
                        control: VECTOR_MASKED,
                    };
                    n
                ],
                pending: vec![false; n],
                enabled: false,
                function_masked: false,
            }),
            send,
        }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        lock(&self.state).entries.len() as u16
    }

    /// The capability's body (after ID and next pointer) for a table at
    /// `table_offset` and pending bits at `pba_offset`, both in BAR `bar`,
    /// and which of its bits the guest may write.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> (Vec<u8>, Vec<u8>) {
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&(self.vectors() - 1).to_le_bytes());
        body.extend_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body.extend_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        let writable = (CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
            .to_le_bytes()
            .to_vec();
        (body, writable)
    }

    /// The table and pending bits, for a live migration.
    pub fn snapshot(&self) -> MsixSnapshot {
        let s = lock(&self.state);
        MsixSnapshot {
            entries: s
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                .collect(),
            pending: s.pending.clone(),
        }
    }

    /// Takes a migrated table (checked as the guest's writes are); pending vectors the guest
    /// may now take are delivered.
    pub fn restore(&self, snap: &MsixSnapshot) -> Result<(), String> {
        let mut s = lock(&self.state);
        if snap.entries.len() != s.entries.len() || snap.pending.len() != s.pending.len() {
            return Err(format!(
                "an MSI-X table of {} vectors at the source, {} here",
                snap.entries.len(),
                s.entries.len()
            ));
        }
        for (e, &[addr_lo, addr_hi, data, control]) in s.entries.iter_mut().zip(&snap.entries) {
            *e = Entry {
                addr_lo: addr_lo & !3,
                addr_hi,
                data,
                control: control & VECTOR_MASKED,
            };
        }
        s.pending.clone_from(&snap.pending);
        self.deliver_pending(&mut s);
        Ok(())
    }

    /// The guest wrote the capability's message control register.
    pub fn set_control(&self, control: u16) {
        let mut s = lock(&self.state);
        s.enabled = control & CONTROL_ENABLE != 0;
        s.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.deliver_pending(&mut s);
    }

    /// Whether the guest turned MSI-X on.
    pub fn enabled(&self) -> bool {
        lock(&self.state).enabled
    }

    /// Signals `vector`; returns false when MSI-X is off (the caller uses INTx).
    pub fn signal(&self, vector: u16) -> bool {
        let mut s = lock(&self.state);
        if !s.enabled {
            return false;
        }
        let v = usize::from(vector);
        let Some(e) = s.entries.get(v).copied() else {
            return true;
        };
        if s.function_masked || e.control & VECTOR_MASKED != 0 {
            s.pending[v] = true;
        } else {
            (self.send)(u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo), e.data);
        }
        true
    }

    fn deliver_pending(&self, s: &mut State) {
        if !s.enabled || s.function_masked {
            return;
        }
        for v in 0..s.entries.len() {
            let e = s.entries[v];
            if s.pending[v] && e.control & VECTOR_MASKED == 0 {
                s.pending[v] = false;
                (self.send)(u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo), e.data);
            }
        }
    }

    /// The guest reads the table at `offset` (4- or 8-byte accesses).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let s = lock(&self.state);
        let Some(e) = s.entries.get((offset / ENTRY_SIZE) as usize) else {
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        let word = ((offset % ENTRY_SIZE) / 4) as usize;
        match data.len() {
            4 => data.copy_from_slice(&words[word].to_le_bytes()),
            8 if word % 2 == 0 => {
                data[..4].copy_from_slice(&words[word].to_le_bytes());
                data[4..].copy_from_slice(&words[word + 1].to_le_bytes());
            }
            _ => {}
        }
    }

    /// The guest writes the table at `offset` (4- or 8-byte accesses).
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        let mut s = lock(&self.state);
        let index = (offset / ENTRY_SIZE) as usize;
        if index >= s.entries.len() || offset % 4 != 0 {
            return;
        }
        let word = ((offset % ENTRY_SIZE) / 4) as usize;
        let values: Vec<u32> = match data.len() {
            4 => vec![u32::from_le_bytes(data.try_into().expect("4 bytes"))],
            8 if word % 2 == 0 => vec![
                u32::from_le_bytes(data[..4].try_into().expect("4 bytes")),
                u32::from_le_bytes(data[4..].try_into().expect("4 bytes")),
            ],
            _ => return,
        };
        for (i, v) in values.into_iter().enumerate() {
            let e = &mut s.entries[index];
            match word + i {
                0 => e.addr_lo = v & !3,
                1 => e.addr_hi = v,
                2 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
        }
        self.deliver_pending(&mut s);
    }

    /// The guest reads the pending bits at `offset`.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let s = lock(&self.state);
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *b = (0..8).fold(0u8, |acc, bit| {
                let set = s.pending.get(first + bit).copied().unwrap_or(false);
                acc | (u8::from(set) << bit)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn msix() -> (Msix, Arc<Mutex<Vec<(u64, u32)>>>) {
        let sent = Arc::new(Mutex::new(vec![]));
        let s = sent.clone();
        (
            Msix::new(3, Box::new(move |a, d| lock(&s).push((a, d)))),
            sent,
        )
    }

    #[test]
    fn a_vector_is_delivered_only_when_enabled_and_unmasked() {
        let (m, sent) = msix();
        assert!(!m.signal(0), "MSI-X is off: INTx");
        m.set_control(CONTROL_ENABLE);
        m.write_table(16, &0xfee0_0000u32.to_le_bytes());
        m.write_table(16 + 8, &0x4041u32.to_le_bytes());
        assert!(m.signal(1));
        assert!(lock(&sent).is_empty(), "vector 1 is still masked");
        let mut pba = [0u8; 1];
        m.read_pba(0, &mut pba);
        assert_eq!(pba, [0b010]);
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(
            *lock(&sent),
            vec![(0xfee0_0000, 0x4041)],
            "pending delivered on unmask"
        );
        m.read_pba(0, &mut pba);
        assert_eq!(pba, [0]);
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(m.signal(1));
        assert_eq!(lock(&sent).len(), 1);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(lock(&sent).len(), 2);
        assert!(m.signal(1));
        assert_eq!(lock(&sent).len(), 3);
        // Vectors beyond the table and odd accesses are ignored.
        assert!(m.signal(9));
        m.write_table(3 * 16, &[1, 2, 3, 4]);
        m.write_table(1, &[1, 2, 3, 4]);
        let mut d = [0u8; 8];
        m.read_table(16, &mut d);
        assert_eq!(u32::from_le_bytes(d[..4].try_into().unwrap()), 0xfee0_0000);
        let (body, w) = m.capability(0, 0x4000, 0x6000);
        assert_eq!(body[..2], [2, 0]);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(w, vec![0, 0xc0]);
    }
}
