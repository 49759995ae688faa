//! A conventional PCI bus 0, as firmware and every PC operating system find
//! it: configuration mechanism #1 on ports 0xCF8/0xCFC, an i440FX-compatible
//! host bridge at 00:00.0 (with the subsystem IDs SeaBIOS looks for to know
//! its platform), and devices in slots 1-31 whose memory BARs the firmware
//! places inside the 32-bit PCI window. A slot holds one function, or up to
//! eight when its function 0 says it is multi-function (the PIIX's slot 1).
//!
//! Guest accesses to the window are dispatched by the BARs as they stand at
//! the time of the access, so a guest that moves a BAR moves the device.

pub mod config;
pub mod msi;
pub mod msix;
pub mod piix;

use std::sync::{Arc, Mutex};

use crate::bus::{lock, BusDevice};
pub use config::{BarKind, Identity, PciConfig};

/// Devices on the bus: slot 0 is the host bridge.
pub const SLOTS: usize = 32;
/// Functions in a slot.
pub const FUNCTIONS: usize = 8;

/// A PCI function.
pub trait PciDevice: Send {
    /// Its configuration space.
    fn config(&self) -> &PciConfig;
    /// The guest writes configuration space: through [`PciConfig::write`],
    /// after which devices that react to writes (MSI-X enable, BAR moves) do so.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// The guest reads BAR `bar` at `offset`.
    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// The guest writes BAR `bar` at `offset`.
    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Takes a migrated function's configuration space ([`PciConfig::restore`]), then does
    /// what the guest's writes to it would have done (MSI-X turned on, BARs mapped where
    /// they now lie).
    fn restore_config(&mut self, regs: &[u8]) -> Result<(), String>;
}

/// One function's configuration space, as a live migration carries it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciFunctionState {
    /// Its slot.
    pub slot: u8,
    /// Its function.
    pub function: u8,
    /// The 256 bytes of its configuration space.
    pub regs: Vec<u8>,
}

/// A shared PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// Bus 0: the host bridge and up to 31 devices, indexed by slot and function.
pub struct PciBus {
    functions: Vec<Option<SharedPciDevice>>,
}

/// Errors while wiring the bus.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// Every slot is taken.
    #[error("no free PCI slot for another device (at most {} devices)", SLOTS - 1)]
    Full,
    /// A function's place is taken or out of range.
    #[error("PCI function {slot:02x}.{function} is taken or does not exist")]
    Taken {
        /// The slot.
        slot: u8,
        /// The function.
        function: u8,
    },
}

impl PciBus {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let mut functions: Vec<Option<SharedPciDevice>> = vec![None; SLOTS * FUNCTIONS];
        functions[0] = Some(Arc::new(Mutex::new(ChipsetFunction::host_bridge())));
        PciBus { functions }
    }

    /// Puts `dev` as function 0 of the first free slot and returns the slot.
    pub fn add(&mut self, dev: SharedPciDevice) -> Result<u8, PciError> {
        let slot = self.next_slot().ok_or(PciError::Full)?;
        self.functions[usize::from(slot) * FUNCTIONS] = Some(dev);
        Ok(slot)
    }

    /// Puts `dev` at `slot`.`function`, which must be free.
    pub fn add_function(
        &mut self,
        slot: u8,
        function: u8,
        dev: SharedPciDevice,
    ) -> Result<(), PciError> {
        let taken = PciError::Taken { slot, function };
        if usize::from(function) >= FUNCTIONS {
            return Err(taken);
        }
        let place = self
            .functions
            .get_mut(usize::from(slot) * FUNCTIONS + usize::from(function))
            .ok_or(PciError::Taken { slot, function })?;
        if place.is_some() {
            return Err(taken);
        }
        *place = Some(dev);
        Ok(())
    }

    /// The slot the next device added goes in.
    pub fn next_slot(&self) -> Option<u8> {
        (0..SLOTS)
            .find(|s| {
                self.functions[s * FUNCTIONS..(s + 1) * FUNCTIONS]
                    .iter()
                    .all(Option::is_none)
            })
            .map(|s| s as u8)
    }

    fn device(&self, slot: usize, function: usize) -> Option<&SharedPciDevice> {
        self.functions
            .get(slot * FUNCTIONS + function)
            .and_then(Option::as_ref)
    }

    /// Every function's configuration space, for a live migration (the vCPUs parked).
    pub fn save(&self) -> Vec<PciFunctionState> {
        self.functions
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                f.as_ref().map(|dev| PciFunctionState {
                    slot: (i / FUNCTIONS) as u8,
                    function: (i % FUNCTIONS) as u8,
                    regs: lock(dev).config().snapshot(),
                })
            })
            .collect()
    }

    /// Takes a migrated bus's configuration spaces: the same functions in the same places
    /// as here (the target's VM is built from the same configuration), each checked.
    pub fn restore(&self, states: &[PciFunctionState]) -> Result<(), String> {
        let here = self.functions.iter().filter(|f| f.is_some()).count();
        if states.len() != here {
            return Err(format!(
                "{} PCI functions at the source, {here} here",
                states.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for st in states {
            let name = format!("PCI function {:02x}.{}", st.slot, st.function);
            if usize::from(st.function) >= FUNCTIONS || !seen.insert((st.slot, st.function)) {
                return Err(format!("{name} twice, or no such function"));
            }
            let dev = self
                .device(usize::from(st.slot), usize::from(st.function))
                .ok_or_else(|| format!("{name} of the source is not here"))?;
            lock(dev)
                .restore_config(&st.regs)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    }

    /// The device whose memory BAR holds `addr`, with the BAR and offset.
    fn decode(&self, addr: u64, len: usize) -> Option<(&SharedPciDevice, usize, u64)> {
        for dev in self.functions.iter().flatten() {
            let d = lock(dev);
            for bar in 0..=config::ROM_BAR {
                if let Some((base, size)) = d.config().bar_window(bar) {
                    if addr >= base && addr - base + len as u64 <= size {
                        return Some((dev, bar, addr - base));
                    }
                }
            }
        }
        None
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

/// Configuration mechanism #1: the address register at 0xCF8 and the data
/// window at 0xCFC-0xCFF. Insert at 0xCF8 with length 8.
/// A byte access at 0xCF9 is the PC's reset control register, not part of
/// the address: it goes to `reset`.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
    reset: crate::bus::SharedDevice,
}

impl PciConfigIo {
    /// The configuration ports of `bus`, with the reset register `reset`.
    pub fn new(bus: Arc<PciBus>, reset: crate::bus::SharedDevice) -> Self {
        PciConfigIo {
            bus,
            address: 0,
            reset,
        }
    }

    /// The address register, for a live migration (a guest paused between choosing a
    /// register and reading it reads the same one at the target).
    pub fn address(&self) -> u32 {
        self.address
    }

    /// Sets the address register of a migrated VM.
    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    /// The selected function and register, if the address is enabled and on bus 0.
    fn target(&self, offset: u64) -> Option<(&SharedPciDevice, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let slot = (self.address >> 11) & 0x1f;
        let function = (self.address >> 8) & 0x7;
        if bus != 0 {
            return None;
        }
        let reg = (self.address & 0xfc) as usize + (offset - 4) as usize;
        Some((self.bus.device(slot as usize, function as usize)?, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 1 && data.len() == 1 {
            lock(&self.reset).read(0, data);
            return;
        }
        if offset < 4 {
            // The address register, read whole or in part.
            let bytes = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        match self.target(offset) {
            Some((dev, reg)) => lock(dev).config().read(reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 1 && data.len() == 1 {
            lock(&self.reset).write(0, data);
            return;
        }
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                self.address = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            }
            return;
        }
        if let Some((dev, reg)) = self.target(offset) {
            lock(dev).write_config(reg, data);
        }
    }
}

/// The 32-bit PCI memory window: insert it on the MMIO bus over the range
/// the firmware places BARs in; accesses go to whichever BAR holds them.
pub struct PciWindow {
    bus: Arc<PciBus>,
    base: u64,
}

impl PciWindow {
    /// The window of `bus` starting at guest address `base`.
    pub fn new(bus: Arc<PciBus>, base: u64) -> Self {
        PciWindow { bus, base }
    }
}

impl BusDevice for PciWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.bus.decode(self.base + offset, data.len()) {
            Some((dev, bar, off)) => lock(dev).read_bar(bar, off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((dev, bar, off)) = self.bus.decode(self.base + offset, data.len()) {
            lock(dev).write_bar(bar, off, data);
        }
    }
}

/// A chipset function whose configuration space is all there is to it: the
/// host bridge here, the PIIX functions in [`piix`].
pub struct ChipsetFunction {
    config: PciConfig,
}

impl ChipsetFunction {
    /// A function with configuration space `config`, made by the caller.
    pub fn new(config: PciConfig) -> Self {
        ChipsetFunction { config }
    }

    /// The host bridge: Intel 440FX identity, so firmware knows the chipset,
    /// with QEMU's subsystem IDs, so SeaBIOS takes the paravirtual paths
    /// (fw_cfg) it takes on QEMU. Its PAM registers are plain storage: guest
    /// RAM below 1 MiB is always RAM here.
    fn host_bridge() -> Self {
        let mut config = PciConfig::new(
            Identity {
                vendor: 0x8086,
                device: 0x1237,
                revision: 2,
                class: (0x06, 0x00, 0x00),
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            },
            0,
        );
        // PAM0-6 (0x59-0x5f) and SMRAM (0x72): firmware writes them; they are kept.
        config.make_writable(0x59..0x60);
        config.make_writable(0x72..0x73);
        ChipsetFunction { config }
    }
}

impl PciDevice for ChipsetFunction {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn restore_config(&mut self, regs: &[u8]) -> Result<(), String> {
        self.config.restore(regs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev {
        config: PciConfig,
        last: Vec<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Dev {
        fn config(&self) -> &PciConfig {
            &self.config
        }
        fn write_config(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last.push((bar, offset, data.to_vec()));
        }
        fn restore_config(&mut self, regs: &[u8]) -> Result<(), String> {
            self.config.restore(regs)
        }
    }

    fn cfg_addr(slot: u32, reg: u32) -> [u8; 4] {
        (0x8000_0000 | slot << 11 | reg).to_le_bytes()
    }

    #[test]
    fn config_cycles_reach_the_slot_and_bars_route_the_window() {
        let mut bus = PciBus::new();
        let mut config = PciConfig::new(
            Identity {
                vendor: 0x1af4,
                device: 0x1042,
                revision: 1,
                class: (1, 0, 0),
                subsystem_vendor: 0x1af4,
                subsystem: 2,
            },
            1,
        );
        config.add_bar(0, 0x1000, BarKind::Memory32).unwrap();
        let dev = Arc::new(Mutex::new(Dev {
            config,
            last: vec![],
        }));
        assert_eq!(bus.add(dev.clone()).unwrap(), 1);
        let bus = Arc::new(bus);
        struct Reset(Vec<u8>);
        impl BusDevice for Reset {
            fn read(&mut self, _o: u64, d: &mut [u8]) {
                d.fill(0);
            }
            fn write(&mut self, _o: u64, d: &[u8]) {
                self.0.extend_from_slice(d);
            }
        }
        let reset = Arc::new(Mutex::new(Reset(vec![])));
        let mut io = PciConfigIo::new(bus.clone(), reset.clone());
        io.write(1, &[6]);
        assert_eq!(lock(&reset).0, vec![6], "0xCF9 is the reset register");
        let mut d = [0u8; 4];
        io.write(0, &cfg_addr(0, 0));
        io.read(4, &mut d);
        assert_eq!(d, [0x86, 0x80, 0x37, 0x12]);
        io.write(0, &cfg_addr(0, 0x2c));
        io.read(4, &mut d);
        assert_eq!(d, [0xf4, 0x1a, 0x00, 0x11]);
        io.write(0, &cfg_addr(2, 0));
        io.read(4, &mut d);
        assert_eq!(d, [0xff; 4], "an empty slot");
        // Byte access at 0xCFE reads the device ID's low byte.
        io.write(0, &cfg_addr(1, 0));
        let mut b = [0u8; 1];
        io.read(6, &mut b);
        assert_eq!(b, [0x42]);
        // Place BAR 0 and turn memory decoding on.
        io.write(0, &cfg_addr(1, 0x10));
        io.write(4, &0xc000_0000u32.to_le_bytes());
        let mut win = PciWindow::new(bus.clone(), 0xc000_0000);
        win.read(0x10, &mut d);
        assert_eq!(d, [0xff; 4], "decoding is off");
        io.write(0, &cfg_addr(1, 0x04));
        io.write(4, &[2, 0]);
        win.read(0x10, &mut d);
        assert_eq!(d, [0x10; 4]);
        win.write(0xffc, &[1, 2, 3, 4]);
        win.write(0xffe, &[1, 2, 3, 4]); // straddles the BAR's end: dropped
        assert_eq!(lock(&dev).last, vec![(0, 0xffc, vec![1, 2, 3, 4])]);
        // The PAM registers keep what firmware writes.
        io.write(0, &cfg_addr(0, 0x58));
        io.write(5, &[0x30]);
        io.read(4, &mut d);
        assert_eq!(d[1], 0x30);
    }
}
