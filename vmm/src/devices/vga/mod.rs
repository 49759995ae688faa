//! The display of a firmware-booted VM: a standard VGA (the registers and
//! four memory planes of the PC's VGA, so the firmware's and boot loaders'
//! text screens work) with the Bochs "dispi" extension for linear
//! framebuffer modes (VBE), as QEMU's `-vga std` presents it: PCI 1234:1111,
//! the framebuffer in BAR 0, the DISPI and VGA registers also in BAR 2, and
//! Debian's VGA BIOS (`vgabios-stdvga.bin` from the seabios package) in the
//! expansion ROM.
//!
//! The framebuffer is memory KVM maps where the guest puts BAR 0, so the
//! guest draws without exits; the legacy window (0xA0000-0xBFFFF) and the
//! registers trap. [`render`] turns whichever mode is set into the RGB
//! picture the RFB server sends.

pub mod render;

use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;

use crate::bus::{lock, BusDevice};
use crate::devices::pci::config::{self, BarKind, ConfigError, Identity, PciConfig, ROM_BAR};
use crate::devices::pci::PciDevice;
use crate::memory::AnonMapping;

/// Framebuffer memory (BAR 0).
pub const VRAM_SIZE: usize = 16 << 20;
/// Size of the register BAR (BAR 2).
const MMIO_SIZE: u64 = 0x1000;
/// Where Debian's seabios package puts the VGA BIOS for this device.
pub const VGA_BIOS: &str = "/usr/share/seabios/vgabios-stdvga.bin";
/// One plane of the legacy VGA memory.
const PLANE_SIZE: usize = 64 << 10;
/// Largest DISPI resolution offered.
pub const MAX_XRES: u16 = 2560;
/// Largest DISPI resolution offered.
pub const MAX_YRES: u16 = 1600;

/// DISPI register indices.
pub mod dispi {
    #![allow(missing_docs)]
    pub const ID: usize = 0;
    pub const XRES: usize = 1;
    pub const YRES: usize = 2;
    pub const BPP: usize = 3;
    pub const ENABLE: usize = 4;
    pub const BANK: usize = 5;
    pub const VIRT_WIDTH: usize = 6;
    pub const VIRT_HEIGHT: usize = 7;
    pub const X_OFFSET: usize = 8;
    pub const Y_OFFSET: usize = 9;
    pub const VIDEO_MEMORY_64K: usize = 10;
    pub const COUNT: usize = 11;
    pub const ID5: u16 = 0xb0c5;
    pub const ENABLED: u16 = 0x01;
    pub const GETCAPS: u16 = 0x02;
    pub const LFB_ENABLED: u16 = 0x40;
    pub const NOCLEARMEM: u16 = 0x80;
}

/// The VGA's state: registers, planes and the framebuffer's memory.
pub struct VgaState {
    /// Framebuffer memory, also mapped into the guest at BAR 0.
    pub vram: AnonMapping,
    /// The four planes, interleaved: plane p of offset o at `o * 4 + p`.
    pub planes: Vec<u8>,
    latch: u32,
    /// Miscellaneous output register.
    pub misc: u8,
    seq_index: u8,
    /// Sequencer registers.
    pub seq: [u8; 8],
    gc_index: u8,
    /// Graphics controller registers.
    pub gc: [u8; 16],
    crtc_index: u8,
    /// CRT controller registers.
    pub crtc: [u8; 32],
    attr_index: u8,
    attr_flip: bool,
    /// Attribute controller registers.
    pub attr: [u8; 32],
    dac_read: u16,
    dac_write: u16,
    /// The palette: 256 entries of 6-bit red, green, blue.
    pub dac: [[u8; 3]; 256],
    dac_sub: u8,
    retrace: u8,
    dispi_index: u16,
    /// DISPI registers.
    pub dispi: [u16; dispi::COUNT],
}

/// The VGA's registers as a live migration carries them (the planes and the framebuffer go
/// as raw bytes beside).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VgaSnapshot {
    /// The read latch.
    pub latch: u32,
    /// Miscellaneous output.
    pub misc: u8,
    /// Sequencer index and registers.
    pub seq: (u8, [u8; 8]),
    /// Graphics controller index and registers.
    pub gc: (u8, [u8; 16]),
    /// CRT controller index and registers.
    pub crtc: (u8, Vec<u8>),
    /// Attribute controller index, flip-flop and registers.
    pub attr: (u8, bool, Vec<u8>),
    /// DAC read index, write index, sub-index.
    pub dac_index: (u16, u16, u8),
    /// The palette.
    pub dac: Vec<[u8; 3]>,
    /// Input status 1's toggle.
    pub retrace: u8,
    /// DISPI index and registers.
    pub dispi: (u16, [u16; dispi::COUNT]),
}

impl VgaState {
    /// The registers, for a live migration.
    pub fn snapshot(&self) -> VgaSnapshot {
        VgaSnapshot {
            latch: self.latch,
            misc: self.misc,
            seq: (self.seq_index, self.seq),
            gc: (self.gc_index, self.gc),
            crtc: (self.crtc_index, self.crtc.to_vec()),
            attr: (self.attr_index, self.attr_flip, self.attr.to_vec()),
            dac_index: (self.dac_read, self.dac_write, self.dac_sub),
            dac: self.dac.to_vec(),
            retrace: self.retrace,
            dispi: (self.dispi_index, self.dispi),
        }
    }

    /// Takes a migrated VGA's registers, checked as the guest's writes are.
    pub fn restore(&mut self, s: &VgaSnapshot) -> Result<(), String> {
        let crtc: [u8; 32] = s
            .crtc
            .1
            .as_slice()
            .try_into()
            .map_err(|_| "CRTC registers")?;
        let attr: [u8; 32] = s
            .attr
            .2
            .as_slice()
            .try_into()
            .map_err(|_| "attribute registers")?;
        let dac: [[u8; 3]; 256] = s.dac.as_slice().try_into().map_err(|_| "the palette")?;
        let d = s.dispi.1;
        if d[dispi::VIDEO_MEMORY_64K] != self.dispi[dispi::VIDEO_MEMORY_64K]
            || d[dispi::XRES] > MAX_XRES
            || d[dispi::YRES] > MAX_YRES
            || d[dispi::VIRT_WIDTH] > MAX_XRES
            || !matches!(d[dispi::BPP], 0 | 4 | 8 | 15 | 16 | 24 | 32)
            || usize::from(d[dispi::BANK]) >= VRAM_SIZE >> 16
        {
            return Err(format!("DISPI registers this VGA cannot take: {d:?}"));
        }
        self.latch = s.latch;
        self.misc = s.misc;
        (self.seq_index, self.seq) = s.seq;
        (self.gc_index, self.gc) = s.gc;
        (self.crtc_index, self.crtc) = (s.crtc.0, crtc);
        (self.attr_index, self.attr_flip, self.attr) = (s.attr.0 & 0x3f, s.attr.1, attr);
        (self.dac_read, self.dac_write, self.dac_sub) = (
            s.dac_index.0 & 0xff,
            s.dac_index.1 & 0xff,
            s.dac_index.2 % 3,
        );
        self.dac = dac.map(|c| c.map(|v| v & 0x3f));
        self.retrace = s.retrace;
        (self.dispi_index, self.dispi) = s.dispi;
        Ok(())
    }

    /// The four planes, interleaved.
    pub fn planes(&self) -> &[u8] {
        &self.planes
    }

    /// Takes a migrated VGA's planes.
    pub fn set_planes(&mut self, planes: &[u8]) -> Result<(), String> {
        if planes.len() != self.planes.len() {
            return Err(format!("VGA planes of {} bytes", planes.len()));
        }
        self.planes.copy_from_slice(planes);
        Ok(())
    }

    /// The framebuffer's memory, as the guest last wrote it.
    pub fn vram(&mut self) -> &mut [u8] {
        self.vram_bytes()
    }

    fn new() -> std::io::Result<Self> {
        let mut d = [0u16; dispi::COUNT];
        d[dispi::ID] = dispi::ID5;
        d[dispi::VIDEO_MEMORY_64K] = (VRAM_SIZE >> 16) as u16;
        Ok(VgaState {
            vram: AnonMapping::new(VRAM_SIZE)?,
            planes: vec![0; PLANE_SIZE * 4],
            latch: 0,
            misc: 0x01,
            seq_index: 0,
            seq: [0; 8],
            gc_index: 0,
            gc: [0; 16],
            crtc_index: 0,
            crtc: [0; 32],
            attr_index: 0,
            attr_flip: false,
            attr: [0; 32],
            dac_read: 0,
            dac_write: 0,
            dac: [[0; 3]; 256],
            dac_sub: 0,
            retrace: 0,
            dispi_index: 0,
            dispi: d,
        })
    }

    /// Whether a DISPI (VBE) mode is on.
    pub fn dispi_enabled(&self) -> bool {
        self.dispi[dispi::ENABLE] & dispi::ENABLED != 0
    }

    fn vram_bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is VRAM_SIZE bytes and lives as long as self;
        // the guest may write it concurrently through KVM, which makes a
        // torn pixel the worst outcome, as on real hardware.
        unsafe { std::slice::from_raw_parts_mut(self.vram.as_ptr(), self.vram.len()) }
    }

    /// The guest reads a legacy I/O port (0x3b0-0x3df, 0x1ce-0x1cf).
    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            0x3c0 => self.attr_index,
            0x3c1 => self.attr[usize::from(self.attr_index & 0x1f)],
            0x3c2 => 0x10, // input status 0: switch sense
            0x3c4 => self.seq_index,
            0x3c5 => self.seq[usize::from(self.seq_index & 7)],
            0x3c6 => 0xff,
            0x3c7 => 0x03,
            0x3c8 => self.dac_write as u8,
            0x3c9 => {
                let v = self.dac[usize::from(self.dac_read & 0xff)][usize::from(self.dac_sub)];
                self.dac_sub += 1;
                if self.dac_sub == 3 {
                    self.dac_sub = 0;
                    self.dac_read = (self.dac_read + 1) & 0xff;
                }
                v
            }
            0x3cc => self.misc,
            0x3ce => self.gc_index,
            0x3cf => self.gc[usize::from(self.gc_index & 0xf)],
            0x3b4 | 0x3d4 => self.crtc_index,
            0x3b5 | 0x3d5 => self.crtc[usize::from(self.crtc_index & 0x1f)],
            0x3ba | 0x3da => {
                // Input status 1: display and vertical retrace toggle, so
                // code waiting for a retrace sees one.
                self.attr_flip = false;
                self.retrace ^= 0x09;
                self.retrace
            }
            _ => 0xff,
        }
    }

    /// The guest writes a legacy I/O port.
    pub fn write_port(&mut self, port: u16, v: u8) {
        match port {
            0x3c0 => {
                if self.attr_flip {
                    self.attr[usize::from(self.attr_index & 0x1f)] = v;
                } else {
                    self.attr_index = v & 0x3f;
                }
                self.attr_flip = !self.attr_flip;
            }
            0x3c2 => self.misc = v,
            0x3c4 => self.seq_index = v,
            0x3c5 => self.seq[usize::from(self.seq_index & 7)] = v,
            0x3c7 => {
                self.dac_read = u16::from(v);
                self.dac_sub = 0;
            }
            0x3c8 => {
                self.dac_write = u16::from(v);
                self.dac_sub = 0;
            }
            0x3c9 => {
                self.dac[usize::from(self.dac_write & 0xff)][usize::from(self.dac_sub)] = v & 0x3f;
                self.dac_sub += 1;
                if self.dac_sub == 3 {
                    self.dac_sub = 0;
                    self.dac_write = (self.dac_write + 1) & 0xff;
                }
            }
            0x3ce => self.gc_index = v,
            0x3cf => self.gc[usize::from(self.gc_index & 0xf)] = v,
            0x3b4 | 0x3d4 => self.crtc_index = v,
            0x3b5 | 0x3d5 => self.crtc[usize::from(self.crtc_index & 0x1f)] = v,
            _ => {}
        }
    }

    /// The guest reads DISPI register `index`.
    pub fn read_dispi(&self, index: usize) -> u16 {
        let caps = self.dispi[dispi::ENABLE] & dispi::GETCAPS != 0;
        match index {
            dispi::XRES if caps => MAX_XRES,
            dispi::YRES if caps => MAX_YRES,
            dispi::BPP if caps => 32,
            _ => self.dispi.get(index).copied().unwrap_or(0),
        }
    }

    /// The guest writes DISPI register `index`.
    pub fn write_dispi(&mut self, index: usize, v: u16) {
        match index {
            dispi::ID => {
                if (0xb0c0..=dispi::ID5).contains(&v) {
                    self.dispi[dispi::ID] = v;
                }
            }
            dispi::XRES | dispi::VIRT_WIDTH => self.dispi[index] = v.min(MAX_XRES),
            dispi::YRES => self.dispi[index] = v.min(MAX_YRES),
            dispi::BPP => {
                if matches!(v, 4 | 8 | 15 | 16 | 24 | 32) {
                    self.dispi[index] = v;
                }
            }
            dispi::ENABLE => {
                let was = self.dispi_enabled();
                self.dispi[index] = v;
                if v & dispi::ENABLED != 0 && !was {
                    // Turning a mode on sets the virtual size and clears the screen.
                    self.dispi[dispi::VIRT_WIDTH] = self.dispi[dispi::XRES];
                    self.dispi[dispi::VIRT_HEIGHT] = self.dispi[dispi::YRES];
                    self.dispi[dispi::X_OFFSET] = 0;
                    self.dispi[dispi::Y_OFFSET] = 0;
                    if v & dispi::NOCLEARMEM == 0 {
                        let bytes = render::dispi_frame_bytes(self).min(VRAM_SIZE);
                        self.vram_bytes()[..bytes].fill(0);
                    }
                }
            }
            dispi::BANK => {
                let banks = (VRAM_SIZE >> 16) as u16;
                self.dispi[index] = v % banks;
            }
            dispi::VIRT_HEIGHT | dispi::X_OFFSET | dispi::Y_OFFSET => self.dispi[index] = v,
            _ => {}
        }
    }

    /// Where an access to the legacy window at `offset` from 0xA0000 lands
    /// in the planes, given the memory map the graphics controller selects;
    /// `None` outside it.
    fn window_offset(&self, offset: u64) -> Option<usize> {
        let (base, size) = match (self.gc[6] >> 2) & 3 {
            0 => (0, 0x2_0000),
            1 => (0, 0x1_0000),
            2 => (0x1_0000, 0x8000),
            _ => (0x1_8000, 0x8000),
        };
        let o = offset.checked_sub(base)?;
        (o < size).then_some(o as usize)
    }

    /// The guest reads a byte of the legacy window.
    pub fn read_window(&mut self, offset: u64) -> u8 {
        if self.dispi_enabled() {
            let at = usize::from(self.dispi[dispi::BANK]) * 0x1_0000 + (offset as usize & 0xffff);
            return self.vram_bytes().get(at).copied().unwrap_or(0xff);
        }
        let Some(a) = self.window_offset(offset) else {
            return 0xff;
        };
        if self.seq[4] & 0x08 != 0 {
            // Chain 4: the low two address bits pick the plane.
            return self.planes.get((a & !3) | (a & 3)).copied().unwrap_or(0xff);
        }
        if self.gc[5] & 0x10 != 0 {
            // Odd/even: A0 picks plane 0 or 1 (2 or 3 with the page bit).
            let plane = (usize::from(self.gc[4]) & 2) | (a & 1);
            return self
                .planes
                .get((a & !1) * 4 + plane)
                .copied()
                .unwrap_or(0xff);
        }
        let o = a & 0xffff;
        let l = u32::from_le_bytes([
            self.planes[o * 4],
            self.planes[o * 4 + 1],
            self.planes[o * 4 + 2],
            self.planes[o * 4 + 3],
        ]);
        self.latch = l;
        if self.gc[5] & 0x08 == 0 {
            // Read mode 0: the selected plane.
            (l >> (8 * u32::from(self.gc[4] & 3))) as u8
        } else {
            // Read mode 1: which pixels match the compare colour.
            let cc = u32::from(self.gc[2] & 0xf);
            let dc = u32::from(self.gc[7] & 0xf);
            let mut r = 0u8;
            for bit in 0..8 {
                let mut pixel = 0;
                for p in 0..4 {
                    pixel |= ((l >> (8 * p + bit)) & 1) << p;
                }
                if (pixel ^ cc) & dc == 0 {
                    r |= 1 << bit;
                }
            }
            r
        }
    }

    /// The guest writes a byte of the legacy window: the VGA's write modes
    /// (set/reset, rotate, logical operation, bit mask, map mask).
    pub fn write_window(&mut self, offset: u64, v: u8) {
        if self.dispi_enabled() {
            let at = usize::from(self.dispi[dispi::BANK]) * 0x1_0000 + (offset as usize & 0xffff);
            if let Some(b) = self.vram_bytes().get_mut(at) {
                *b = v;
            }
            return;
        }
        let Some(a) = self.window_offset(offset) else {
            return;
        };
        let map_mask = self.seq[2] & 0xf;
        if self.seq[4] & 0x08 != 0 {
            if map_mask & (1 << (a & 3)) != 0 {
                if let Some(b) = self.planes.get_mut(a) {
                    *b = v;
                }
            }
            return;
        }
        if self.gc[5] & 0x10 != 0 {
            let plane = (usize::from(self.gc[4]) & 2) | (a & 1);
            if map_mask & (1 << plane) != 0 {
                if let Some(b) = self.planes.get_mut((a & !1) * 4 + plane) {
                    *b = v;
                }
            }
            return;
        }
        let o = a & 0xffff;
        let expand = |b: u8| u32::from(b) * 0x0101_0101;
        let mask4 = |m: u8| {
            (0..4).fold(0u32, |acc, p| {
                acc | if m & (1 << p) != 0 {
                    0xff << (8 * p)
                } else {
                    0
                }
            })
        };
        let set_reset = mask4(self.gc[0]);
        let enable_sr = mask4(self.gc[1]);
        let mut bit_mask = self.gc[8];
        let data = match self.gc[5] & 3 {
            0 => {
                let rot = self.gc[3] & 7;
                let d = expand(v.rotate_right(u32::from(rot)));
                (d & !enable_sr) | (set_reset & enable_sr)
            }
            1 => self.latch,
            2 => mask4(v & 0xf),
            _ => {
                let rot = self.gc[3] & 7;
                bit_mask &= v.rotate_right(u32::from(rot));
                set_reset
            }
        };
        let data = if self.gc[5] & 3 == 1 {
            data
        } else {
            let d = match (self.gc[3] >> 3) & 3 {
                0 => data,
                1 => data & self.latch,
                2 => data | self.latch,
                _ => data ^ self.latch,
            };
            let m = expand(bit_mask);
            (d & m) | (self.latch & !m)
        };
        for p in 0..4 {
            if map_mask & (1 << p) != 0 {
                self.planes[o * 4 + p] = (data >> (8 * p)) as u8;
            }
        }
    }
}

/// The legacy I/O ports (insert at 0x3b0, length 0x30).
pub struct VgaPorts(pub Arc<Mutex<VgaState>>);

impl BusDevice for VgaPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut s = lock(&self.0);
        for (i, b) in data.iter_mut().enumerate() {
            *b = s.read_port(0x3b0 + offset as u16 + i as u16);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut s = lock(&self.0);
        for (i, &b) in data.iter().enumerate() {
            s.write_port(0x3b0 + offset as u16 + i as u16, b);
        }
    }
}

/// The DISPI ports (insert at 0x1ce, length 3): a 16-bit index at 0x1ce, the
/// data at 0x1cf (and 0x1d0, where some drivers write it).
pub struct DispiPorts(pub Arc<Mutex<VgaState>>);

impl BusDevice for DispiPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let s = lock(&self.0);
        let v = if offset == 0 {
            s.dispi_index
        } else {
            s.read_dispi(usize::from(s.dispi_index))
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut s = lock(&self.0);
        let v = match data {
            [lo] => u16::from(*lo),
            [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
            [] => return,
        };
        if offset == 0 {
            s.dispi_index = v;
        } else {
            let i = usize::from(s.dispi_index);
            s.write_dispi(i, v);
        }
    }
}

/// The legacy memory window (insert at 0xA0000, length 0x20000).
pub struct VgaWindow(pub Arc<Mutex<VgaState>>);

impl BusDevice for VgaWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut s = lock(&self.0);
        for (i, b) in data.iter_mut().enumerate() {
            *b = s.read_window(offset + i as u64);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut s = lock(&self.0);
        for (i, &b) in data.iter().enumerate() {
            s.write_window(offset + i as u64, b);
        }
    }
}

/// Errors building the VGA.
#[derive(Debug, thiserror::Error)]
pub enum VgaError {
    /// Its configuration space.
    #[error("VGA configuration space: {0}")]
    Config(#[from] ConfigError),
    /// Its memory.
    #[error("cannot map the VGA's memory: {0}")]
    Memory(std::io::Error),
    /// The VGA BIOS.
    #[error("cannot read the VGA BIOS {path}: {err} (Debian's seabios package provides it)")]
    Bios {
        /// The file.
        path: String,
        /// Why.
        err: std::io::Error,
    },
}

/// The VGA as a PCI function.
pub struct VgaPci {
    config: PciConfig,
    state: Arc<Mutex<VgaState>>,
    rom: Vec<u8>,
    vm: Option<Arc<VmFd>>,
    slot: u32,
    /// Where BAR 0 is mapped now.
    mapped: Option<u64>,
}

impl VgaPci {
    /// A VGA whose framebuffer KVM maps as memory slot `slot` of `vm`, with
    /// the VGA BIOS at `bios`.
    pub fn new(bios: &Path, vm: Option<Arc<VmFd>>, slot: u32) -> Result<VgaPci, VgaError> {
        let rom = std::fs::read(bios).map_err(|err| VgaError::Bios {
            path: bios.display().to_string(),
            err,
        })?;
        let mut config = PciConfig::new(
            Identity {
                vendor: 0x1234,
                device: 0x1111,
                revision: 2,
                class: (0x03, 0x00, 0x00),
                subsystem_vendor: 0x1af4,
                subsystem: 0x1100,
            },
            0,
        );
        config.add_bar(0, VRAM_SIZE as u64, BarKind::Prefetchable32)?;
        config.add_bar(2, MMIO_SIZE, BarKind::Memory32)?;
        config.add_rom((rom.len() as u64).next_power_of_two().max(2048))?;
        let state = Arc::new(Mutex::new(VgaState::new().map_err(VgaError::Memory)?));
        Ok(VgaPci {
            config,
            state,
            rom,
            vm,
            slot,
            mapped: None,
        })
    }

    /// The state the legacy ports, the window and the renderer share.
    pub fn state(&self) -> Arc<Mutex<VgaState>> {
        self.state.clone()
    }

    /// Maps the framebuffer where the guest put BAR 0 (or unmaps it).
    fn place_vram(&mut self) {
        let Some(vm) = &self.vm else {
            return;
        };
        let now = self.config.bar_window(0).map(|(a, _)| a);
        if now == self.mapped {
            return;
        }
        let host = lock(&self.state).vram.as_ptr() as u64;
        if self.mapped.take().is_some() {
            let r = kvm_bindings::kvm_userspace_memory_region {
                slot: self.slot,
                guest_phys_addr: 0,
                memory_size: 0,
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: deleting a slot (size 0) maps nothing.
            if let Err(e) = unsafe { vm.set_user_memory_region(r) } {
                tracing::warn!(error = %e, "cannot unmap the VGA framebuffer");
            }
        }
        if let Some(addr) = now {
            let r = kvm_bindings::kvm_userspace_memory_region {
                slot: self.slot,
                guest_phys_addr: addr,
                memory_size: VRAM_SIZE as u64,
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: the mapping belongs to the state this device keeps,
            // alive until after the VM (which holds the device) is gone.
            match unsafe { vm.set_user_memory_region(r) } {
                Ok(()) => self.mapped = Some(addr),
                Err(e) => tracing::warn!(error = %e, addr, "cannot map the VGA framebuffer"),
            }
        }
    }
}

impl PciDevice for VgaPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if (config::reg::COMMAND..config::reg::COMMAND + 2).contains(&offset)
            || (config::reg::BAR0..config::reg::BAR0 + 4).contains(&offset)
        {
            self.place_vram();
        }
    }

    fn restore_config(&mut self, regs: &[u8]) -> Result<(), String> {
        self.config.restore(regs)?;
        self.place_vram();
        Ok(())
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match bar {
            0 => {
                let mut s = lock(&self.state);
                let v = s.vram_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = v.get(offset as usize + i).copied().unwrap_or(0xff);
                }
            }
            2 => {
                let mut s = lock(&self.state);
                match offset {
                    0x400..=0x41f => {
                        for (i, b) in data.iter_mut().enumerate() {
                            *b = s.read_port(0x3c0 + (offset - 0x400) as u16 + i as u16);
                        }
                    }
                    0x500..=0x515 if data.len() == 2 => {
                        let v = s.read_dispi(((offset - 0x500) / 2) as usize);
                        data.copy_from_slice(&v.to_le_bytes());
                    }
                    _ => {}
                }
            }
            ROM_BAR => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = self.rom.get(offset as usize + i).copied().unwrap_or(0);
                }
            }
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let mut s = lock(&self.state);
        match (bar, offset) {
            (0, _) => {
                let v = s.vram_bytes();
                for (i, &b) in data.iter().enumerate() {
                    if let Some(d) = v.get_mut(offset as usize + i) {
                        *d = b;
                    }
                }
            }
            (2, 0x400..=0x41f) => {
                for (i, &b) in data.iter().enumerate() {
                    s.write_port(0x3c0 + (offset - 0x400) as u16 + i as u16, b);
                }
            }
            (2, 0x500..=0x515) if data.len() == 2 => {
                s.write_dispi(
                    ((offset - 0x500) / 2) as usize,
                    u16::from_le_bytes([data[0], data[1]]),
                );
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
