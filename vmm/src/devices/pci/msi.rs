//! MSI (one vector, 64-bit address): the capability a device without
//! MSI-X offers, as the AHCI controller does. The guest writes the message
//! into the capability; the device signals it on each event.

use super::config::ConfigError;
use super::config::PciConfig;
use super::msix::MsiSender;

/// PCI capability ID of MSI.
pub const CAP_ID: u8 = 0x05;
/// Message control: 64-bit address capable.
const CONTROL_64BIT: u16 = 1 << 7;
/// Message control: MSI is on.
const CONTROL_ENABLE: u16 = 1;

/// One function's MSI capability.
pub struct Msi {
    cap: usize,
    send: MsiSender,
}

impl Msi {
    /// Adds the capability to `config`.
    pub fn new(config: &mut PciConfig, send: MsiSender) -> Result<Self, ConfigError> {
        // Control, address low, address high, data.
        let mut body = vec![0u8; 12];
        body[..2].copy_from_slice(&CONTROL_64BIT.to_le_bytes());
        let mut writable = vec![0xffu8; 12];
        writable[..2].copy_from_slice(&CONTROL_ENABLE.to_le_bytes());
        writable[2] = 0xfc;
        let cap = config.add_capability(CAP_ID, &body, &writable)?;
        Ok(Msi { cap, send })
    }

    /// Whether the guest turned MSI on.
    pub fn enabled(&self, config: &PciConfig) -> bool {
        config.u16(self.cap + 2) & CONTROL_ENABLE != 0
    }

    /// Sends the message, if MSI is on; returns whether it was.
    pub fn signal(&self, config: &PciConfig) -> bool {
        if !self.enabled(config) {
            return false;
        }
        let addr = u64::from(config.u32(self.cap + 4)) | u64::from(config.u32(self.cap + 8)) << 32;
        let data = u32::from(config.u16(self.cap + 12));
        (self.send)(addr, data);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::lock;
    use crate::devices::pci::config::Identity;
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_message_goes_out_only_once_enabled() {
        let mut c = PciConfig::new(
            Identity {
                vendor: 0x8086,
                device: 0x2922,
                revision: 2,
                class: (1, 6, 1),
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            },
            1,
        );
        let sent = Arc::new(Mutex::new(vec![]));
        let s = sent.clone();
        let msi = Msi::new(&mut c, Box::new(move |a, d| lock(&s).push((a, d)))).unwrap();
        assert!(!msi.signal(&c));
        c.write(msi.cap + 4, &0xfee0_1003u32.to_le_bytes());
        c.write(msi.cap + 12, &0x4021u16.to_le_bytes());
        c.write(msi.cap + 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.u16(msi.cap + 2), CONTROL_64BIT | CONTROL_ENABLE);
        assert!(msi.signal(&c));
        assert_eq!(*lock(&sent), vec![(0xfee0_1000, 0x4021)]);
    }
}
