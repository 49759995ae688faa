//! A SATA controller (AHCI 1.3, as Intel's ICH9 presents it) with a CD-ROM
//! drive and SATA disks: what firmware boots CDs from (El Torito) and every
//! installer has a driver for, Windows setup's included.
//!
//! The guest builds commands in its memory (a command list per port, each
//! command a FIS and a scatter list) and issues them by setting PxCI; the
//! controller runs each at once, on the vCPU that issued it, copies the
//! data, posts the device's answer FIS into the port's receive area and
//! raises the port's interrupt. Everything read from guest memory is
//! checked: a bad address, FIS or length ends that command with an error.

pub mod ata;
pub mod atapi;
pub mod vhost;

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use crate::devices::pci::config::{BarKind, ConfigError, Identity, PciConfig};
use crate::devices::pci::msi::Msi;
use crate::devices::pci::msix::MsiSender;
use crate::devices::pci::PciDevice;
use crate::devices::virtio::IntxLine;
use crate::memory::GuestMemory;
use ata::{status, AtaDisk, ABRT};
use atapi::Cdrom;

/// Ports the controller has (ICH9 has six).
pub const PORTS: usize = 6;
/// Size of the register BAR (ABAR).
const ABAR_SIZE: u64 = 0x2000;
/// The ABAR is BAR 5.
const ABAR: usize = 5;
/// Most bytes one command moves (65536 sectors).
const MAX_TRANSFER: usize = 32 << 20;
/// Most scatter entries read for one command.
const MAX_PRD: usize = 65_535;

/// Host control registers.
mod hba {
    pub const CAP: u64 = 0x00;
    pub const GHC: u64 = 0x04;
    pub const IS: u64 = 0x08;
    pub const PI: u64 = 0x0c;
    pub const VS: u64 = 0x10;
    pub const CAP2: u64 = 0x24;
    pub const GHC_HR: u32 = 1;
    pub const GHC_IE: u32 = 1 << 1;
    pub const GHC_AE: u32 = 1 << 31;
}

/// Port registers, from the port's base.
mod px {
    pub const BASE: u64 = 0x100;
    pub const SIZE: u64 = 0x80;
    pub const CLB: u64 = 0x00;
    pub const CLBU: u64 = 0x04;
    pub const FB: u64 = 0x08;
    pub const FBU: u64 = 0x0c;
    pub const IS: u64 = 0x10;
    pub const IE: u64 = 0x14;
    pub const CMD: u64 = 0x18;
    pub const TFD: u64 = 0x20;
    pub const SIG: u64 = 0x24;
    pub const SSTS: u64 = 0x28;
    pub const SCTL: u64 = 0x2c;
    pub const SERR: u64 = 0x30;
    pub const SACT: u64 = 0x34;
    pub const CI: u64 = 0x38;
    pub const CMD_ST: u32 = 1;
    pub const CMD_CLO: u32 = 1 << 3;
    pub const CMD_FRE: u32 = 1 << 4;
    pub const CMD_FR: u32 = 1 << 14;
    pub const CMD_CR: u32 = 1 << 15;
    /// Bits the guest writes (ST, SUD, POD, FRE, ATAPI, DLAE, ALPE, ASP, ICC).
    pub const CMD_WRITABLE: u32 = 0xf700_0017;
    /// Interrupt: a device-to-host register FIS arrived.
    pub const IS_DHRS: u32 = 1;
    /// Interrupt: a PIO setup FIS arrived.
    pub const IS_PSS: u32 = 1 << 1;
    /// Interrupt: the task file has an error.
    pub const IS_TFES: u32 = 1 << 30;
}

/// What is attached to a port.
pub enum Drive {
    /// A SATA disk.
    Disk(AtaDisk),
    /// The CD-ROM drive.
    Cdrom(Cdrom),
}

impl Drive {
    fn signature(&self) -> u32 {
        match self {
            Drive::Disk(_) => 0x0000_0101,
            Drive::Cdrom(_) => 0xeb14_0101,
        }
    }
}

#[derive(Default)]
struct Port {
    clb: u64,
    fb: u64,
    is: u32,
    ie: u32,
    cmd: u32,
    tfd: u32,
    sctl: u32,
    serr: u32,
    ci: u32,
    drive: Option<Drive>,
}

impl Port {
    fn ssts(&self) -> u32 {
        // Device present, Gen2 speed, active; nothing when empty or held in reset.
        if self.drive.is_some() && self.sctl & 0xf != 1 {
            0x123
        } else {
            0
        }
    }

    fn sig(&self) -> u32 {
        self.drive.as_ref().map_or(0xffff_ffff, Drive::signature)
    }
}

/// One port's registers as a live migration carries them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortSnapshot {
    /// PxCLB and PxCLBU.
    pub clb: u64,
    /// PxFB and PxFBU.
    pub fb: u64,
    /// PxIS.
    pub is: u32,
    /// PxIE.
    pub ie: u32,
    /// PxCMD.
    pub cmd: u32,
    /// PxTFD.
    pub tfd: u32,
    /// PxSCTL.
    pub sctl: u32,
    /// PxSERR.
    pub serr: u32,
    /// PxCI (a command runs as it is issued: set only while the port is stopped).
    pub ci: u32,
    /// The CD-ROM drive on it, if it is that one.
    pub cdrom: Option<atapi::CdromSnapshot>,
}

/// The controller's state as a live migration carries it; commands run on the vCPU that
/// issues them, so none is ever in flight while the vCPUs are parked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AhciSnapshot {
    /// GHC.
    pub ghc: u32,
    /// IS.
    pub is: u32,
    /// Each port.
    pub ports: Vec<PortSnapshot>,
}

/// How one command ended.
struct Done {
    status: u8,
    error: u8,
    /// Bytes moved to or from guest memory.
    bytes: usize,
    /// A PIO data-in command: the guest also expects a PIO setup FIS.
    pio: bool,
}

impl Done {
    fn ok(bytes: usize, pio: bool) -> Done {
        Done {
            status: status::OK,
            error: 0,
            bytes,
            pio,
        }
    }

    fn error(error: u8) -> Done {
        Done {
            status: status::DRDY | status::ERR,
            error,
            bytes: 0,
            pio: false,
        }
    }
}

/// A command header and table, read from guest memory.
struct Command {
    cfis: [u8; 64],
    acmd: [u8; 16],
    prdt: Vec<(u64, usize)>,
    write: bool,
}

/// Errors building the controller.
#[derive(Debug, thiserror::Error)]
pub enum AhciError {
    /// Its configuration space.
    #[error("AHCI configuration space: {0}")]
    Config(#[from] ConfigError),
    /// A disk.
    #[error(transparent)]
    Disk(#[from] ata::AtaError),
    /// The CD-ROM's image.
    #[error(transparent)]
    Media(#[from] atapi::MediaError),
    /// More drives than ports.
    #[error("{0} SATA drives requested; the controller has {PORTS} ports")]
    TooMany(usize),
}

/// The controller.
pub struct Ahci {
    config: PciConfig,
    mem: GuestMemory,
    msi: Msi,
    intx: IntxLine,
    ghc: u32,
    is: u32,
    ports: Vec<Port>,
}

impl Ahci {
    /// A controller with `drives` on ports 0, 1, ... Messages go out through
    /// `send`, the INTx line through `intx`.
    pub fn new(
        mem: GuestMemory,
        drives: Vec<Drive>,
        send: MsiSender,
        intx: IntxLine,
    ) -> Result<Ahci, AhciError> {
        if drives.len() > PORTS {
            return Err(AhciError::TooMany(drives.len()));
        }
        let mut config = PciConfig::new(
            Identity {
                vendor: 0x8086,
                device: 0x2922,
                revision: 2,
                class: (0x01, 0x06, 0x01),
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            },
            1,
        );
        config.add_bar(ABAR, ABAR_SIZE, BarKind::Memory32)?;
        let msi = Msi::new(&mut config, send)?;
        let mut ports: Vec<Port> = (0..PORTS).map(|_| Port::default()).collect();
        for (p, d) in ports.iter_mut().zip(drives) {
            p.drive = Some(d);
        }
        let mut a = Ahci {
            config,
            mem,
            msi,
            intx,
            ghc: hba::GHC_AE,
            is: 0,
            ports,
        };
        for i in 0..PORTS {
            a.reset_port(i);
        }
        Ok(a)
    }

    /// The drive on `port`.
    pub fn drive_mut(&mut self, port: usize) -> Option<&mut Drive> {
        self.ports.get_mut(port).and_then(|p| p.drive.as_mut())
    }

    /// A live migration's handover: every SATA disk on a vhost-user backend lets it go.
    pub fn hand_over(&mut self) {
        for p in &mut self.ports {
            if let Some(Drive::Disk(d)) = &mut p.drive {
                d.hand_over();
            }
        }
    }

    /// The CD-ROM's image, if the drive on `port` is the CD-ROM.
    pub fn cdrom_media(&self, port: usize) -> Option<PathBuf> {
        match self.ports.get(port).and_then(|p| p.drive.as_ref()) {
            Some(Drive::Cdrom(c)) => c.media().map(Path::to_path_buf),
            _ => None,
        }
    }

    /// The controller's state, for a live migration.
    pub fn snapshot(&self) -> AhciSnapshot {
        AhciSnapshot {
            ghc: self.ghc,
            is: self.is,
            ports: self
                .ports
                .iter()
                .map(|p| PortSnapshot {
                    clb: p.clb,
                    fb: p.fb,
                    is: p.is,
                    ie: p.ie,
                    cmd: p.cmd,
                    tfd: p.tfd,
                    sctl: p.sctl,
                    serr: p.serr,
                    ci: p.ci,
                    cdrom: match &p.drive {
                        Some(Drive::Cdrom(c)) => Some(c.snapshot()),
                        _ => None,
                    },
                })
                .collect(),
        }
    }

    /// Takes a migrated controller's state, after its configuration space: the same drives
    /// on the same ports (the target's VM is built from the same configuration).
    pub fn restore(&mut self, snap: &AhciSnapshot) -> Result<(), String> {
        if snap.ports.len() != self.ports.len() {
            return Err(format!(
                "{} SATA ports at the source, {} here",
                snap.ports.len(),
                self.ports.len()
            ));
        }
        for (i, (p, s)) in self.ports.iter().zip(&snap.ports).enumerate() {
            let here = match &p.drive {
                None => "nothing",
                Some(Drive::Disk(_)) => "a disk",
                Some(Drive::Cdrom(_)) => "the CD-ROM drive",
            };
            if matches!(p.drive, Some(Drive::Cdrom(_))) != s.cdrom.is_some() {
                return Err(format!(
                    "SATA port {i} holds {here} here, not at the source"
                ));
            }
        }
        self.ghc = hba::GHC_AE | (snap.ghc & hba::GHC_IE);
        self.is = snap.is & ((1 << PORTS) - 1);
        for (p, s) in self.ports.iter_mut().zip(&snap.ports) {
            p.clb = s.clb;
            p.fb = s.fb;
            p.is = s.is;
            p.ie = s.ie;
            p.cmd = s.cmd;
            p.tfd = s.tfd;
            p.sctl = s.sctl;
            p.serr = s.serr;
            p.ci = s.ci;
            if let (Some(Drive::Cdrom(c)), Some(cs)) = (&mut p.drive, &s.cdrom) {
                c.restore(cs);
            }
        }
        self.update_irq(false);
        Ok(())
    }

    fn reset_port(&mut self, i: usize) {
        let p = &mut self.ports[i];
        p.is = 0;
        p.ci = 0;
        p.serr = 0;
        p.cmd &= !(px::CMD_ST | px::CMD_CR);
        p.tfd = if p.drive.is_some() {
            u32::from(status::OK)
        } else {
            0x7f
        };
        self.post_signature(i);
    }

    /// After a reset the device sends its signature in a register FIS.
    fn post_signature(&mut self, i: usize) {
        let p = &self.ports[i];
        if p.drive.is_none() || p.cmd & px::CMD_FRE == 0 {
            return;
        }
        let sig = p.sig();
        let mut fis = [0u8; 20];
        fis[0] = 0x34;
        fis[2] = p.tfd as u8;
        fis[3] = 1;
        fis[4] = sig as u8;
        fis[5] = (sig >> 16) as u8;
        fis[6] = (sig >> 24) as u8;
        fis[12] = (sig >> 8) as u8;
        let _ = self
            .mem
            .write_slice(&fis, GuestAddress(p.fb.wrapping_add(0x40)));
    }

    /// Recomputes the controller's interrupt from the ports'.
    fn update_irq(&mut self, new_event: bool) {
        for (i, p) in self.ports.iter().enumerate() {
            if p.is & p.ie != 0 {
                self.is |= 1 << i;
            }
        }
        let pending = self.ghc & hba::GHC_IE != 0 && self.is != 0;
        if self.msi.enabled(&self.config) {
            (self.intx)(false);
            if pending && new_event {
                self.msi.signal(&self.config);
            }
        } else {
            let disabled =
                self.config.command() & crate::devices::pci::config::command::INTX_DISABLE != 0;
            (self.intx)(pending && !disabled);
        }
    }

    fn read_command(&self, p: &Port, slot: usize) -> Option<Command> {
        let hdr = GuestAddress(p.clb.checked_add(slot as u64 * 32)?);
        let dw0: u32 = self.mem.read_obj(hdr).ok()?;
        let ctba_lo: u32 = self
            .mem
            .read_obj(GuestAddress(hdr.0.checked_add(8)?))
            .ok()?;
        let ctba_hi: u32 = self
            .mem
            .read_obj(GuestAddress(hdr.0.checked_add(12)?))
            .ok()?;
        let ctba = u64::from(ctba_hi) << 32 | u64::from(ctba_lo & !0x7f);
        let mut cfis = [0u8; 64];
        self.mem.read_slice(&mut cfis, GuestAddress(ctba)).ok()?;
        let mut acmd = [0u8; 16];
        self.mem
            .read_slice(&mut acmd, GuestAddress(ctba.checked_add(0x40)?))
            .ok()?;
        let n = ((dw0 >> 16) as usize).min(MAX_PRD);
        let mut prdt = Vec::with_capacity(n.min(256));
        let mut total = 0usize;
        for i in 0..n {
            let e = GuestAddress(ctba.checked_add(0x80 + i as u64 * 16)?);
            let lo: u32 = self.mem.read_obj(e).ok()?;
            let hi: u32 = self.mem.read_obj(GuestAddress(e.0.checked_add(4)?)).ok()?;
            let dbc: u32 = self.mem.read_obj(GuestAddress(e.0.checked_add(12)?)).ok()?;
            let len = (dbc & 0x3f_ffff) as usize + 1;
            prdt.push((u64::from(hi) << 32 | u64::from(lo & !1), len));
            total += len;
            if total >= MAX_TRANSFER {
                break;
            }
        }
        Some(Command {
            cfis,
            acmd,
            prdt,
            write: dw0 & (1 << 6) != 0,
        })
    }

    /// Copies `data` into the command's buffers; returns the bytes copied,
    /// or `None` if a buffer lies outside guest memory.
    fn to_guest(&self, c: &Command, data: &[u8]) -> Option<usize> {
        let mut done = 0;
        for &(addr, len) in &c.prdt {
            if done == data.len() {
                break;
            }
            let n = len.min(data.len() - done);
            self.mem
                .write_slice(&data[done..done + n], GuestAddress(addr))
                .ok()?;
            done += n;
        }
        Some(done)
    }

    /// Gathers `len` bytes from the command's buffers.
    fn from_guest(&self, c: &Command, len: usize) -> Option<Vec<u8>> {
        let mut out = vec![0u8; len];
        let mut done = 0;
        for &(addr, n) in &c.prdt {
            if done == len {
                break;
            }
            let n = n.min(len - done);
            self.mem
                .read_slice(&mut out[done..done + n], GuestAddress(addr))
                .ok()?;
            done += n;
        }
        (done == len).then_some(out)
    }

    fn execute(&mut self, port: usize, c: &Command) -> Done {
        let f = &c.cfis;
        let command = f[2];
        let lba48 = u64::from(f[4])
            | u64::from(f[5]) << 8
            | u64::from(f[6]) << 16
            | u64::from(f[8]) << 24
            | u64::from(f[9]) << 32
            | u64::from(f[10]) << 40;
        let count48 = u64::from(u16::from_le_bytes([f[12], f[13]]));
        let lba28 = lba48 & 0xff_ffff | u64::from(f[7] & 0xf) << 24;
        let count28 = u64::from(f[12]);
        tracing::trace!(target: "ahci", port, command, lba48, count48, "ATA command");
        let Some(drive) = self.ports[port].drive.as_mut() else {
            return Done::error(ABRT);
        };
        match (drive, command) {
            (Drive::Disk(d), ata::cmd::IDENTIFY) => match d.identify() {
                Ok(id) => self.answer(c, &id, true),
                Err(e) => {
                    tracing::warn!(disk = %d.path().display(), error = %e, "SATA disk cannot say its size");
                    Done::error(ABRT)
                }
            },
            (Drive::Cdrom(_), ata::cmd::IDENTIFY) => {
                // An ATAPI device aborts IDENTIFY DEVICE; its signature says what it is.
                Done::error(ABRT)
            }
            (Drive::Cdrom(_), ata::cmd::IDENTIFY_PACKET) => {
                let id = ata::identify("ENSPEED-CD", "EnSpeed CD-ROM", None);
                self.answer(c, &id, true)
            }
            (Drive::Cdrom(cd), ata::cmd::PACKET) => match cd.packet(&c.acmd) {
                Ok(data) => self.answer(c, &data, false),
                Err(s) => {
                    tracing::debug!(op = c.acmd[0], ?s, "CD-ROM command refused");
                    Done::error(s.key << 4)
                }
            },
            (Drive::Disk(_), read @ (ata::cmd::READ_DMA_EXT | ata::cmd::READ_DMA)) => {
                let (lba, count) = if read == ata::cmd::READ_DMA_EXT {
                    (lba48, if count48 == 0 { 65_536 } else { count48 })
                } else {
                    (lba28, if count28 == 0 { 256 } else { count28 })
                };
                self.disk_read(port, c, lba, count)
            }
            (Drive::Disk(_), write @ (ata::cmd::WRITE_DMA_EXT | ata::cmd::WRITE_DMA)) => {
                let (lba, count) = if write == ata::cmd::WRITE_DMA_EXT {
                    (lba48, if count48 == 0 { 65_536 } else { count48 })
                } else {
                    (lba28, if count28 == 0 { 256 } else { count28 })
                };
                self.disk_write(port, c, lba, count)
            }
            (Drive::Disk(d), ata::cmd::FLUSH_CACHE | ata::cmd::FLUSH_CACHE_EXT) => {
                match d.flush() {
                    Ok(()) => Done::ok(0, false),
                    Err(e) => {
                        tracing::warn!(disk = %d.path().display(), error = %e, "SATA flush failed");
                        Done::error(ABRT)
                    }
                }
            }
            (
                _,
                ata::cmd::SET_FEATURES
                | ata::cmd::SET_MULTIPLE
                | ata::cmd::IDLE_IMMEDIATE
                | ata::cmd::STANDBY_IMMEDIATE
                | ata::cmd::CHECK_POWER_MODE
                | ata::cmd::INITIALIZE_PARAMS
                | ata::cmd::READ_VERIFY
                | ata::cmd::READ_VERIFY_EXT
                | ata::cmd::DEVICE_RESET,
            ) => Done::ok(0, false),
            (_, other) => {
                tracing::debug!(command = other, port, "unsupported ATA command aborted");
                Done::error(ABRT)
            }
        }
    }

    /// Sends `data` to the guest as a command's answer.
    fn answer(&self, c: &Command, data: &[u8], pio: bool) -> Done {
        match self.to_guest(c, data) {
            Some(n) => Done::ok(n, pio),
            None => Done::error(ABRT),
        }
    }

    /// How a transfer of `count` sectors from `lba` on `port`'s disk ends before it starts:
    /// none if it lies on the disk, fits `MAX_TRANSFER` and its direction is `right`.
    fn refuse_transfer(&mut self, port: usize, lba: u64, count: u64, right: bool) -> Option<Done> {
        let Some(Drive::Disk(d)) = &mut self.ports[port].drive else {
            return Some(Done::error(ABRT));
        };
        match d.in_range(lba, count) {
            Ok(true) if (count * ata::SECTOR) as usize <= MAX_TRANSFER && right => None,
            Ok(_) => Some(Done::error(ABRT | 0x10)),
            Err(e) => {
                tracing::warn!(disk = %d.path().display(), error = %e, "SATA disk cannot say its size");
                Some(Done::error(ABRT))
            }
        }
    }

    fn disk_read(&mut self, port: usize, c: &Command, lba: u64, count: u64) -> Done {
        if let Some(refused) = self.refuse_transfer(port, lba, count, true) {
            return refused;
        }
        let Some(Drive::Disk(d)) = &mut self.ports[port].drive else {
            return Done::error(ABRT);
        };
        match d.read(lba, count) {
            Ok(data) => self.answer(c, &data, false),
            Err(e) => {
                tracing::warn!(disk = %d.path().display(), lba, error = %e, "SATA read failed");
                Done::error(0x40)
            }
        }
    }

    fn disk_write(&mut self, port: usize, c: &Command, lba: u64, count: u64) -> Done {
        let len = (count * ata::SECTOR) as usize;
        if let Some(refused) = self.refuse_transfer(port, lba, count, c.write) {
            return refused;
        }
        let Some(data) = self.from_guest(c, len) else {
            return Done::error(ABRT);
        };
        let Some(Drive::Disk(d)) = &mut self.ports[port].drive else {
            return Done::error(ABRT);
        };
        match d.write(lba, &data) {
            Ok(()) => Done::ok(len, false),
            Err(e) => {
                tracing::warn!(disk = %d.path().display(), lba, error = %e, "SATA write failed");
                Done::error(ABRT)
            }
        }
    }

    /// Runs every issued command of `port`, if its engine runs.
    fn run_port(&mut self, port: usize) {
        let mut posted = false;
        loop {
            let p = &self.ports[port];
            if p.cmd & px::CMD_ST == 0 || p.ci == 0 {
                break;
            }
            let slot = p.ci.trailing_zeros() as usize;
            let done = match self.read_command(p, slot) {
                None => Done::error(ABRT),
                Some(c) if c.cfis[0] != 0x27 => Done::error(ABRT),
                // A control FIS (soft reset): the device answers with its signature.
                Some(c) if c.cfis[1] & 0x80 == 0 => {
                    if c.cfis[15] & 0x04 == 0 {
                        self.post_signature(port);
                    }
                    Done::ok(0, false)
                }
                Some(c) => self.execute(port, &c),
            };
            self.complete(port, slot, &done);
            posted = true;
        }
        if posted {
            self.update_irq(true);
        }
    }

    /// Ends command `slot` of `port`: byte count, answer FISes, task file,
    /// interrupt status.
    fn complete(&mut self, port: usize, slot: usize, d: &Done) {
        let p = &mut self.ports[port];
        let hdr = GuestAddress(p.clb.wrapping_add(slot as u64 * 32 + 4));
        let _ = self.mem.write_obj(d.bytes as u32, hdr);
        p.tfd = u32::from(d.error) << 8 | u32::from(d.status);
        p.ci &= !(1 << slot);
        if p.cmd & px::CMD_FRE != 0 {
            if d.pio {
                let mut pio = [0u8; 20];
                pio[0] = 0x5f;
                pio[1] = 0x60;
                pio[2] = d.status;
                pio[3] = d.error;
                pio[15] = d.status;
                pio[16..18].copy_from_slice(&(d.bytes as u16).to_le_bytes());
                let _ = self
                    .mem
                    .write_slice(&pio, GuestAddress(p.fb.wrapping_add(0x20)));
            }
            let mut reg = [0u8; 20];
            reg[0] = 0x34;
            reg[1] = 0x40;
            reg[2] = d.status;
            reg[3] = d.error;
            let _ = self
                .mem
                .write_slice(&reg, GuestAddress(p.fb.wrapping_add(0x40)));
        }
        p.is |= px::IS_DHRS;
        if d.pio {
            p.is |= px::IS_PSS;
        }
        if d.status & status::ERR != 0 {
            p.is |= px::IS_TFES;
        }
    }

    fn read_port(&self, i: usize, reg: u64) -> u32 {
        let p = &self.ports[i];
        match reg {
            px::CLB => p.clb as u32,
            px::CLBU => (p.clb >> 32) as u32,
            px::FB => p.fb as u32,
            px::FBU => (p.fb >> 32) as u32,
            px::IS => p.is,
            px::IE => p.ie,
            px::CMD => {
                let mut v = p.cmd;
                if v & px::CMD_ST != 0 {
                    v |= px::CMD_CR;
                }
                if v & px::CMD_FRE != 0 {
                    v |= px::CMD_FR;
                }
                v
            }
            px::TFD => p.tfd,
            px::SIG => p.sig(),
            px::SSTS => p.ssts(),
            px::SCTL => p.sctl,
            px::SERR => p.serr,
            px::SACT => 0,
            px::CI => p.ci,
            _ => 0,
        }
    }

    fn write_port(&mut self, i: usize, reg: u64, v: u32) {
        let p = &mut self.ports[i];
        match reg {
            px::CLB => p.clb = p.clb & !0xffff_ffff | u64::from(v & !0x3ff),
            px::CLBU => p.clb = p.clb & 0xffff_ffff | u64::from(v) << 32,
            px::FB => p.fb = p.fb & !0xffff_ffff | u64::from(v & !0xff),
            px::FBU => p.fb = p.fb & 0xffff_ffff | u64::from(v) << 32,
            px::IS => p.is &= !v,
            px::IE => p.ie = v & 0xfdc0_00ff,
            px::CMD => {
                let was = p.cmd;
                p.cmd = v & px::CMD_WRITABLE;
                if was & px::CMD_ST != 0 && p.cmd & px::CMD_ST == 0 {
                    // Stopping the engine drops whatever was issued.
                    p.ci = 0;
                }
                if v & px::CMD_CLO != 0 {
                    p.tfd &= !u32::from(status::BSY | 0x08);
                }
                if was & px::CMD_FRE == 0 && p.cmd & px::CMD_FRE != 0 {
                    self.post_signature(i);
                }
                self.run_port(i);
            }
            px::SCTL => {
                let was = p.sctl;
                p.sctl = v & 0xfff;
                // DET 1 then 0: a COMRESET; the device comes back with its signature.
                if was & 0xf == 1 && v & 0xf == 0 {
                    self.reset_port(i);
                    let p = &mut self.ports[i];
                    if p.drive.is_some() {
                        p.is |= px::IS_DHRS;
                        self.update_irq(true);
                    }
                }
            }
            px::SERR => p.serr &= !v,
            px::CI => {
                p.ci |= v;
                self.run_port(i);
            }
            _ => {}
        }
        self.update_irq(false);
    }
}

impl PciDevice for Ahci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        self.update_irq(false);
    }

    fn restore_config(&mut self, regs: &[u8]) -> Result<(), String> {
        self.config.restore(regs)
    }

    fn read_bar(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let v = if offset < px::BASE {
            match offset {
                hba::CAP => {
                    // 64-bit addressing, 6 Gb/s, AHCI only, 32 command slots, the ports.
                    1 << 31 | 3 << 20 | 1 << 18 | 31 << 8 | (PORTS as u32 - 1)
                }
                hba::GHC => self.ghc,
                hba::IS => self.is,
                hba::PI => (1 << PORTS) - 1,
                hba::VS => 0x0001_0300,
                hba::CAP2 => 0,
                _ => 0,
            }
        } else {
            let i = ((offset - px::BASE) / px::SIZE) as usize;
            if i < PORTS {
                self.read_port(i, (offset - px::BASE) % px::SIZE)
            } else {
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write_bar(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        let Ok(b) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        let v = u32::from_le_bytes(b);
        if offset < px::BASE {
            match offset {
                hba::GHC => {
                    if v & hba::GHC_HR != 0 {
                        self.is = 0;
                        for i in 0..PORTS {
                            self.ports[i].cmd = 0;
                            self.reset_port(i);
                        }
                        self.ghc = hba::GHC_AE;
                    } else {
                        self.ghc = hba::GHC_AE | (v & hba::GHC_IE);
                    }
                    self.update_irq(false);
                }
                hba::IS => {
                    self.is &= !v;
                    self.update_irq(false);
                }
                _ => {}
            }
            return;
        }
        let i = ((offset - px::BASE) / px::SIZE) as usize;
        if i < PORTS {
            self.write_port(i, (offset - px::BASE) % px::SIZE, v);
        }
    }
}

#[cfg(test)]
mod tests;
