//! One VM: building it from a [`VmConfig`], running it, and its power
//! states.
//!
//! ```text
//!            build + boot
//!   (start) -------------> Running <----resume---- Paused
//!                            |   \-----pause------>  |
//!         power button       |                       |
//!   ShuttingDown <-----------+                       |
//!        | guest S5 / timeout, stop                  |
//!        v                                           |
//!      Off (process exits 0) <------- stop ----------+
//!   Running --guest reset / Ctrl-Alt-Del reboot--> rebuilt, Running
//! ```

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{self, DiskStatus, Request, Response, RunState, Status};
use crate::arch::firmware;
use crate::arch::firmware::BootDevice;
use crate::arch::layout::*;
use crate::arch::{acpi, boot, cpuid, regs};
use crate::bus::{lock, Bus};
use crate::config::{Boot, BootOrder, DiskBus, DiskKind, SerialTarget, VmConfig};
use crate::devices::acpi_pm::{AcpiPm, ResetPort};
use crate::devices::ahci::ata::AtaDisk;
use crate::devices::ahci::atapi::Cdrom;
use crate::devices::ahci::{Ahci, AhciError, Drive};
use crate::devices::cmos::{self, Cmos};
use crate::devices::debugcon::{self, DebugCon};
use crate::devices::framebuffer::{Framebuffer, FramebufferError};
use crate::devices::fw_cfg::{self, FwCfg};
use crate::devices::i8042::{KeyStroke, I8042};
use crate::devices::pci::msix::MsiSender;
use crate::devices::pci::{piix, PciBus, PciConfigIo, PciWindow};
use crate::devices::serial::{Console, SerialDevice};
use crate::devices::vga::{self, DispiPorts, VgaError, VgaPci, VgaPorts, VgaState, VgaWindow};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::input::Tablet;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::net::{tap::Tap, Net};
use crate::devices::virtio::pci::VirtioPci;
use crate::devices::virtio::vhost_user_blk::VhostUserBlk;
use crate::devices::virtio::IntxLine;
use crate::devices::virtio::{VirtioDevice, VirtioTransport};
use crate::memory::{self, AnonMapping, GuestMemory};
use crate::rfb;
use crate::vcpu::{self, Control, Run, VcpuThread};

/// Things that happen to a VM, from its devices, vCPUs and control socket.
pub enum VmEvent {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (keyboard controller, reset register, triple fault).
    Reset,
    /// A vCPU halted with no way to wake.
    Halted(u8),
    /// A vCPU cannot go on.
    VcpuFailed(String),
    /// A control-socket request and where to answer it.
    Api(Request, crate::api::Reply),
    /// Keystrokes for the serial console.
    SerialInput(Vec<u8>),
    /// Key presses and releases for the keyboard (from the RFB console).
    Keys(Vec<KeyStroke>),
    /// The console's pointer: where it is on the screen and the RFB
    /// button mask (bit 0 left, 1 middle, 2 right, 3 and 4 the wheel).
    Pointer {
        /// Position.
        x: u16,
        /// Position.
        y: u16,
        /// Buttons held.
        buttons: u8,
        /// The screen's size, for an absolute pointer.
        width: u32,
        /// The screen's size.
        height: u32,
    },
}

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing or refused.
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM refused to {what}: {err}")]
    KvmCall {
        /// What we asked.
        what: &'static str,
        /// Why it failed.
        err: kvm_ioctls::Error,
    },
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// Kernel, initrd or boot data.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU register setup.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A disk.
    #[error(transparent)]
    Block(#[from] crate::devices::virtio::block::BlockError),
    /// A disk's vhost-user backend.
    #[error(transparent)]
    VhostUser(#[from] crate::devices::virtio::vhost_user_blk::VhostUserBlkError),
    /// A tap.
    #[error(transparent)]
    Tap(#[from] crate::devices::virtio::net::tap::TapError),
    /// The framebuffer.
    #[error(transparent)]
    Framebuffer(#[from] FramebufferError),
    /// The firmware.
    #[error(transparent)]
    Firmware(#[from] firmware::FirmwareError),
    /// The SATA controller or one of its drives.
    #[error(transparent)]
    Sata(#[from] AhciError),
    /// The VGA.
    #[error(transparent)]
    Vga(#[from] VgaError),
    /// Too many devices, a bad vCPU count, a bus clash.
    #[error("invalid VM configuration: {0}")]
    Config(String),
    /// An OS call (threads, eventfds, files) failed.
    #[error("{what}: {err}")]
    Io {
        /// What we were doing.
        what: String,
        /// Why it failed.
        err: std::io::Error,
    },
    /// A vCPU died.
    #[error("{0}")]
    Vcpu(String),
    /// A VM migrated in could not be taken.
    #[error("taking the migrated VM: {0}")]
    Migration(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let what = what.into();
    move |err| VmError::Io { what, err }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::KvmCall { what, err }
}

/// Most keystrokes waiting for the guest to read the keyboard (a paste of
/// the RFB server's largest clipboard text, each key pressed and released,
/// with Shift).
const MAX_KEY_BACKLOG: usize = 64 * 1024;

/// Why the VM ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest powered off.
    PowerOff,
    /// The host stopped it.
    Stopped,
    /// It moved, running, to the VMM that took it (live migration).
    Migrated,
}

/// A virtio device (behind either transport) with the index it has among its kind.
enum VirtioSlot {
    Disk(usize, Arc<Mutex<dyn VirtioTransport>>),
    Net(Arc<Mutex<dyn VirtioTransport>>),
    /// The console's absolute pointer (firmware boot with a display).
    Pointer(Arc<Mutex<dyn VirtioTransport>>),
}

impl VirtioSlot {
    /// Its transport.
    fn transport(&self) -> &Arc<Mutex<dyn VirtioTransport>> {
        let (VirtioSlot::Disk(_, t) | VirtioSlot::Net(t) | VirtioSlot::Pointer(t)) = self;
        t
    }

    /// How errors name it.
    fn name(&self) -> String {
        match self {
            VirtioSlot::Disk(i, _) => format!("disk {i}"),
            VirtioSlot::Net(_) => "a NIC".into(),
            VirtioSlot::Pointer(_) => "the tablet".into(),
        }
    }
}

/// Maps `image` read-only (where KVM can) ending at 4 GiB, as memory slot `slot`.
fn map_rom(
    kvm: &Kvm,
    vm: &VmFd,
    image: &firmware::Image,
    slot: u32,
) -> Result<AnonMapping, VmError> {
    let len = image.bytes().len();
    let rom = AnonMapping::new(len).map_err(io_err("map the firmware"))?;
    // SAFETY: the mapping is `len` bytes long and ours alone.
    unsafe { std::ptr::copy_nonoverlapping(image.bytes().as_ptr(), rom.as_ptr(), len) };
    let readonly = kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem);
    let r = kvm_bindings::kvm_userspace_memory_region {
        slot,
        guest_phys_addr: image.base(),
        memory_size: len as u64,
        userspace_addr: rom.as_ptr() as u64,
        flags: if readonly {
            kvm_bindings::KVM_MEM_READONLY
        } else {
            0
        },
    };
    // SAFETY: the mapping lives in the returned mapping, which the Vm keeps
    // until after its VM fd is closed.
    unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("map the firmware"))?;
    Ok(rom)
}

/// Opens NIC `n`'s tap. A VM migrating in (`later`) announces its MAC when it runs here, not
/// while it still runs at the source; any other at once (it may have run elsewhere a moment
/// ago: a failover).
fn open_announced(
    n: &crate::config::NetConfig,
    later: Option<&mut Vec<(Tap, [u8; 6])>>,
) -> Result<Tap, VmError> {
    let tap = Tap::open(&n.tap)?;
    let cannot =
        |e: std::io::Error| VmError::Config(format!("tap {}: cannot announce MAC: {e}", n.tap));
    match later {
        Some(later) => later.push((tap.try_clone().map_err(cannot)?, n.mac)),
        None => tap.announce(n.mac).map_err(cannot)?,
    }
    Ok(tap)
}

/// The VM's disks (first) and NICs as virtio-mmio transports on `mmio`.
fn mmio_virtio(
    cfg: &VmConfig,
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    mmio: &mut Bus,
    incoming: Option<&mut Vec<(Tap, [u8; 6])>>,
) -> Result<Vec<VirtioSlot>, VmError> {
    let deferred = incoming.is_some();
    let mut virtio = Vec::new();
    let mut slot = 0usize;
    let mut add = |dev: Box<dyn VirtioDevice>| -> Result<Arc<Mutex<MmioTransport>>, VmError> {
        let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&irq, VIRTIO_IRQS[slot])
            .map_err(kvm_err("wire a virtio IRQ"))?;
        let t = MmioTransport::new(dev, mem.clone(), irq).map_err(io_err("virtio transport"))?;
        for (i, e) in t.queue_evts().iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY);
            if let Err(err) = vm.register_ioevent(e, &addr, i as u32) {
                // The MMIO handler forwards notifies itself; only slower.
                tracing::warn!(error = %err, "no ioeventfd for a virtio queue");
            }
        }
        let t = Arc::new(Mutex::new(t));
        mmio.insert(t.clone(), base, VIRTIO_MMIO_SIZE)
            .map_err(|e| VmError::Config(e.to_string()))?;
        slot += 1;
        Ok(t)
    };
    for (i, d) in cfg.disks.iter().enumerate() {
        virtio.push(VirtioSlot::Disk(i, add(disk_device(d, deferred)?)?));
    }
    let mut announce = incoming;
    for n in &cfg.nets {
        let tap = open_announced(n, announce.as_deref_mut())?;
        virtio.push(VirtioSlot::Net(add(Box::new(Net::new(tap, n.mac)))?));
    }
    Ok(virtio)
}

/// Draws the VGA's screen into the RFB server's framebuffer, 25 times a
/// second, while the VM runs and an RFB client watches.
struct Display {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Display {
    const PERIOD: Duration = Duration::from_millis(40);
    /// Frames a blink phase lasts (about 0.5 s, as a VGA's text cursor).
    const BLINK_FRAMES: u32 = 12;

    fn start(state: Arc<Mutex<VgaState>>, fb: Arc<Framebuffer>) -> std::io::Result<Display> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("display".into())
            .spawn(move || {
                let mut pixels = Vec::new();
                let mut frame = 0u32;
                while !s.load(std::sync::atomic::Ordering::SeqCst) {
                    // Nobody watching, nothing to draw: an idle VM costs no rendering.
                    if fb.viewers() > 0 {
                        let blink = (frame / Self::BLINK_FRAMES) % 2 == 0;
                        let (w, h) = vga::render::render(&lock(&state), blink, &mut pixels);
                        fb.show(w, h, &pixels);
                    }
                    frame = frame.wrapping_add(1);
                    std::thread::sleep(Self::PERIOD);
                }
            })?;
        Ok(Display { stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

/// How a PCI function in the next free slot of `bus` interrupts the guest:
/// MSI messages (KVM_SIGNAL_MSI) and its INTx line (the GSI the DSDT routes
/// that slot's INTA to). Returns the slot too.
fn pci_interrupts(vm: &Arc<VmFd>, bus: &PciBus) -> (MsiSender, IntxLine, u8) {
    let slot = bus.next_slot().unwrap_or(0);
    let msi_vm = vm.clone();
    let send = Box::new(move |addr: u64, data: u32| {
        let msi = kvm_bindings::kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        if let Err(e) = msi_vm.signal_msi(msi) {
            tracing::warn!(error = %e, "cannot deliver an MSI");
        }
    });
    let gsi = acpi::pci_intx_gsi(slot, 0);
    let intx_vm = vm.clone();
    let intx = Box::new(move |level: bool| {
        if let Err(e) = intx_vm.set_irq_line(gsi, level) {
            tracing::warn!(error = %e, gsi, "cannot drive a PCI INTx line");
        }
    });
    (send, intx, slot)
}

/// The SATA controller and where its drives are.
struct SataDevices {
    ahci: Arc<Mutex<Ahci>>,
    slot: u8,
    /// Each SATA disk's index among the VM's disks, and its port.
    disks: Vec<(usize, usize)>,
    /// The CD-ROM drive's port.
    cdrom: Option<usize>,
}

/// The AHCI controller with the VM's SATA disks (first) and its CD-ROM
/// drive, on `bus`; none if the VM has neither.
fn sata_devices(
    cfg: &VmConfig,
    deferred: bool,
    cdrom: Option<&Option<std::path::PathBuf>>,
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    bus: &mut PciBus,
) -> Result<Option<SataDevices>, VmError> {
    let mut drives = Vec::new();
    let mut disks = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        if d.bus == DiskBus::Sata {
            disks.push((i, drives.len()));
            let disk = match d.kind {
                DiskKind::File => AtaDisk::open(&d.path, d.readonly),
                DiskKind::VhostUser => AtaDisk::vhost_user(&d.path, deferred),
            };
            drives.push(Drive::Disk(disk.map_err(AhciError::from)?));
        }
    }
    let cd_port = match cdrom {
        Some(media) => {
            drives.push(Drive::Cdrom(
                Cdrom::new(media.as_deref()).map_err(AhciError::from)?,
            ));
            Some(drives.len() - 1)
        }
        None => None,
    };
    if drives.is_empty() {
        return Ok(None);
    }
    let (send, intx, slot) = pci_interrupts(vm, bus);
    let ahci = Arc::new(Mutex::new(Ahci::new(mem.clone(), drives, send, intx)?));
    bus.add(ahci.clone())
        .map_err(|e| VmError::Config(e.to_string()))?;
    Ok(Some(SataDevices {
        ahci,
        slot,
        disks,
        cdrom: cd_port,
    }))
}

/// The firmware's boot order: the disks in their order and the CD-ROM, first or last.
fn boot_devices(
    cfg: &VmConfig,
    order: BootOrder,
    virtio: &[(usize, u8)],
    sata: Option<&SataDevices>,
) -> Vec<BootDevice> {
    let mut disks = Vec::new();
    for i in 0..cfg.disks.len() {
        if let Some((_, slot)) = virtio.iter().find(|(d, _)| *d == i) {
            disks.push(BootDevice::Virtio(*slot));
        } else if let Some(s) = sata {
            if let Some((_, port)) = s.disks.iter().find(|(d, _)| *d == i) {
                disks.push(BootDevice::Sata(s.slot, *port));
            }
        }
    }
    let cd = sata.and_then(|s| s.cdrom.map(|p| BootDevice::Sata(s.slot, p)));
    match (order, cd) {
        (BootOrder::CdromFirst, Some(cd)) => std::iter::once(cd).chain(disks).collect(),
        (_, Some(cd)) => disks.into_iter().chain(std::iter::once(cd)).collect(),
        (_, None) => disks,
    }
}

/// The device serving a disk. A `deferred` one (a VM migrating in) reaches its vhost-user
/// backend only once the source let it go.
fn disk_device(
    d: &crate::config::DiskConfig,
    deferred: bool,
) -> Result<Box<dyn VirtioDevice>, VmError> {
    Ok(match d.kind {
        DiskKind::File => Box::new(Block::new(&d.path, d.readonly)?),
        DiskKind::VhostUser if deferred => Box::new(VhostUserBlk::deferred(&d.path)),
        DiskKind::VhostUser => Box::new(VhostUserBlk::connect(&d.path)?),
    })
}

/// Puts `dev` on `bus` as a virtio-pci function in the next free slot;
/// returns the slot and the function.
fn add_virtio_pci(
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    bus: &mut PciBus,
    dev: Box<dyn VirtioDevice>,
) -> Result<(u8, Arc<Mutex<VirtioPci>>), VmError> {
    let (send, intx, slot) = pci_interrupts(vm, bus);
    let t = VirtioPci::new(dev, mem.clone(), send, intx, Some(vm.clone()))
        .map_err(|e| VmError::Config(e.to_string()))?;
    let t = Arc::new(Mutex::new(t));
    let at = bus
        .add(t.clone())
        .map_err(|e| VmError::Config(e.to_string()))?;
    debug_assert_eq!(at, slot);
    Ok((slot, t))
}

/// The VM's virtio disks (first) and NICs as virtio-pci functions on `bus`;
/// returns the devices and each virtio disk's index and slot. A VM migrating in
/// (`incoming`) reaches its vhost-user disks' backends only when its state comes, and
/// announces its MACs when it runs here; any other announces them at once.
fn pci_virtio(
    cfg: &VmConfig,
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    bus: &mut PciBus,
    incoming: Option<&mut Vec<(Tap, [u8; 6])>>,
) -> Result<(Vec<VirtioSlot>, Vec<(usize, u8)>), VmError> {
    let deferred = incoming.is_some();
    let mut virtio = Vec::new();
    let mut disk_slots = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        if d.bus != DiskBus::Virtio {
            continue;
        }
        let (slot, t) = add_virtio_pci(vm, mem, bus, disk_device(d, deferred)?)?;
        disk_slots.push((i, slot));
        virtio.push(VirtioSlot::Disk(i, t));
    }
    let mut announce = incoming;
    for n in &cfg.nets {
        let tap = open_announced(n, announce.as_deref_mut())?;
        let (_, t) = add_virtio_pci(vm, mem, bus, Box::new(Net::new(tap, n.mac)))?;
        virtio.push(VirtioSlot::Net(t));
    }
    Ok((virtio, disk_slots))
}

/// What a firmware-booted VM has beside a kernel-booted one, kept for a live migration.
struct Platform {
    pci: Arc<PciBus>,
    config_io: Arc<Mutex<PciConfigIo>>,
    cmos: Arc<Mutex<Cmos>>,
    fw_cfg: Arc<Mutex<FwCfg>>,
    vga: Option<Arc<Mutex<VgaState>>>,
}

impl Platform {
    /// Its state, every vCPU parked.
    fn save(&self, ahci: Option<&SataDevices>) -> crate::migration::PlatformState {
        crate::migration::PlatformState {
            pci: self.pci.save(),
            config_address: lock(&self.config_io).address(),
            cmos: lock(&self.cmos).snapshot(),
            fw_cfg: lock(&self.fw_cfg).snapshot(),
            vga: self.vga.as_ref().map(|v| lock(v).snapshot()),
            ahci: ahci.map(|a| lock(&a.ahci).snapshot()),
        }
    }

    /// Takes a migrated VM's chipset and display, before its virtio devices: the PCI
    /// functions' configuration first (BARs, MSI-X on), then what each device holds.
    fn restore(
        &self,
        st: &crate::migration::PlatformState,
        ahci: Option<&SataDevices>,
        planes: Option<&[u8]>,
        vram: &[(u64, Vec<u8>)],
    ) -> Result<(), String> {
        self.pci.restore(&st.pci)?;
        lock(&self.config_io).set_address(st.config_address);
        lock(&self.cmos)
            .restore(&st.cmos)
            .map_err(|e| format!("the RTC: {e}"))?;
        lock(&self.fw_cfg).restore(&st.fw_cfg);
        match (&self.vga, &st.vga, planes) {
            (Some(v), Some(regs), Some(planes)) => {
                let mut v = lock(v);
                v.restore(regs).map_err(|e| format!("the VGA: {e}"))?;
                v.set_planes(planes).map_err(|e| format!("the VGA: {e}"))?;
                // The framebuffer here is fresh, all zeros (the guest never ran here): only the
                // source's runs that are not zero are written.
                let mem = v.vram();
                for (at, run) in vram {
                    let at = *at as usize;
                    mem.get_mut(at..at + run.len())
                        .ok_or("the VGA's framebuffer: a run beyond its end")?
                        .copy_from_slice(run);
                }
            }
            (None, None, None) if vram.is_empty() => {}
            _ => return Err("a VGA on one side only, or its memory missing".into()),
        }
        match (ahci, &st.ahci) {
            (Some(a), Some(s)) => lock(&a.ahci)
                .restore(s)
                .map_err(|e| format!("the SATA controller: {e}"))?,
            (None, None) => {}
            _ => return Err("a SATA controller on one side only".into()),
        }
        Ok(())
    }
}

/// A built VM: memory, vCPUs and devices.
struct Vm {
    _vm: Arc<VmFd>,
    _mem: GuestMemory,
    _memfd: std::fs::File,
    /// The firmware's mapping, if it boots from firmware.
    _rom: Option<AnonMapping>,
    /// The SATA controller, if the VM has SATA disks or a CD-ROM drive.
    ahci: Option<SataDevices>,
    /// The chipset and display of a firmware-booted VM.
    platform: Option<Platform>,
    /// The thread drawing the VGA's screen into the framebuffer.
    display: Option<Display>,
    /// The absolute pointer, with a graphical console and firmware boot.
    tablet: Option<Tablet>,
    /// Mapped into the VM as a memory slot; told when the VM goes.
    fb: Option<Arc<Framebuffer>>,
    vcpus: Vec<VcpuThread>,
    control: Arc<Control>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    pm: Arc<Mutex<AcpiPm>>,
    virtio: Vec<VirtioSlot>,
    /// A VM migrating in: its NICs' taps and MACs, announced once it runs here.
    announce: Vec<(Tap, [u8; 6])>,
    /// What the control socket sees of a live migration from here.
    watch: Arc<crate::migration::MigrationWatch>,
    /// A live migration failed after its handover began: the devices stand stopped until a
    /// `resume` starts them again.
    devices_paused: std::sync::atomic::AtomicBool,
}

/// Appends the virtio-mmio device list to the command line, the form
/// Linux's `virtio_mmio.device=` parameter takes.
fn cmdline_with_devices(base: &str, count: usize) -> String {
    let mut s = base.trim().to_string();
    for i in 0..count {
        let addr = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE;
        s.push_str(&format!(
            " virtio_mmio.device=4K@{addr:#x}:{}",
            VIRTIO_IRQS[i]
        ));
    }
    s
}

impl Vm {
    fn build(
        cfg: &VmConfig,
        console: &Arc<Console>,
        events: &Sender<VmEvent>,
        fb: Option<&Arc<Framebuffer>>,
        parked: bool,
        watch: &Arc<crate::migration::MigrationWatch>,
    ) -> Result<Vm, VmError> {
        if cfg.vcpus == 0 || cfg.vcpus > 64 {
            return Err(VmError::Config(format!(
                "{} vCPUs requested; 1 to 64 are supported",
                cfg.vcpus
            )));
        }
        let device_count = cfg.disks.len() + cfg.nets.len();
        if device_count > VIRTIO_IRQS.len() {
            return Err(VmError::Config(format!(
                "{device_count} disks and NICs requested; at most {} are supported",
                VIRTIO_IRQS.len()
            )));
        }
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
        vm.set_tss_address(0xfffb_d000)
            .map_err(kvm_err("set the TSS address"))?;
        vm.set_identity_map_address(0xfffb_c000)
            .map_err(kvm_err("set the identity map address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("create the in-kernel PIT"))?;

        // With firmware boot the VGA's legacy window is the VGA's, not RAM.
        let vga = fb.is_some() && matches!(cfg.boot, Boot::Firmware { .. });
        let (mem, memfd) = memory::create_with(cfg.memory_mib, vga)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| VmError::Config(format!("guest RAM region: {e}")))?;
            let r = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region is mapped for as long as `mem` lives, which
            // outlives the VM fd (both are owned by this Vm, VM fd dropped first
            // only after vCPU threads are joined).
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("map guest RAM"))?;
        }
        let bus_err = |e: crate::bus::BusError| VmError::Config(e.to_string());
        let mut rom_keep = None;
        let mut ahci = None;
        let lfb = match fb {
            Some(fb) if !vga => Some(map_framebuffer(&vm, fb, mem.num_regions() as u32)?),
            _ => None,
        };
        let mut display = None;
        let mut tablet = None;
        let mut pointer = None;
        let mut vga_state = None;
        let mut chipset = None;
        let mut announce = Vec::new();

        // Legacy devices, on every PC.
        let mut pio = Bus::default();
        let mut mmio = Bus::default();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("wire the serial IRQ"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console.clone())));
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&kbd_irq, I8042_IRQ)
            .map_err(kvm_err("wire the keyboard IRQ"))?;
        let mouse_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        vm.register_irqfd(&mouse_irq, MOUSE_IRQ)
            .map_err(kvm_err("wire the mouse IRQ"))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            kbd_irq,
            Some(mouse_irq),
            events.clone(),
        )));
        let sci_vm = vm.clone();
        let pm = Arc::new(Mutex::new(AcpiPm::new(
            Box::new(move |level| {
                if let Err(e) = sci_vm.set_irq_line(SCI_IRQ, level) {
                    tracing::warn!(error = %e, "cannot drive the SCI");
                }
            }),
            events.clone(),
        )));
        let reset = Arc::new(Mutex::new(ResetPort::new(events.clone())));
        pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)
            .map_err(bus_err)?;
        pio.insert(i8042.clone(), u64::from(I8042_PORT), 5)
            .map_err(bus_err)?;
        pio.insert(pm.clone(), u64::from(PM1A_EVT_PORT), u64::from(ACPI_PM_LEN))
            .map_err(bus_err)?;

        // Boot, and the devices each way of booting has.
        let (entry, virtio) = match &cfg.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                if cfg.disks.iter().any(|d| d.bus == DiskBus::Sata) {
                    return Err(VmError::Config(
                        "SATA disks (bus=sata) need firmware boot; with --kernel disks are virtio"
                            .into(),
                    ));
                }
                pio.insert(reset, u64::from(RESET_PORT), 1)
                    .map_err(bus_err)?;
                let kernel = boot::load_kernel(&mem, kernel)?;
                let initrd = initrd
                    .as_deref()
                    .map(|p| boot::load_initrd(&mem, p))
                    .transpose()?;
                let mmio_devices: Vec<acpi::MmioDevice> = (0..device_count)
                    .map(|i| acpi::MmioDevice {
                        base: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
                        len: VIRTIO_MMIO_SIZE,
                        irq: VIRTIO_IRQS[i],
                    })
                    .collect();
                let rsdp = acpi::write_tables(&mem, cfg.vcpus, &mmio_devices)?;
                let cmdline = cmdline_with_devices(cmdline, device_count);
                boot::write_boot_data(&mem, &kernel, &cmdline, initrd, rsdp, lfb.as_ref())?;
                let virtio =
                    mmio_virtio(cfg, &vm, &mem, &mut mmio, parked.then_some(&mut announce))?;
                (Some(kernel.entry), virtio)
            }
            Boot::Firmware {
                firmware,
                image,
                cdrom,
                order,
            } => {
                let bios_image = firmware::Image::load(
                    image
                        .as_deref()
                        .unwrap_or(firmware::default_image(*firmware)),
                )?;
                let rom = map_rom(&kvm, &vm, &bios_image, mem.num_regions() as u32)?;
                bios_image.copy_low(&mem)?;
                let ram_bytes = cfg.memory_mib << 20;
                let below_4g = ram_bytes.min(MMIO_GAP_START);
                let window = (
                    firmware::pci_window_start(below_4g),
                    firmware::PCI_WINDOW_END,
                );
                let mut bus = PciBus::new();
                // Slot 1: the PIIX's ISA bridge and power management, where
                // both firmwares look for the chipset's legacy side.
                piix::install(&mut bus).map_err(|e| VmError::Config(e.to_string()))?;
                if let Some(fb) = fb {
                    // Memory slots: RAM, then the firmware, then the VGA's framebuffer.
                    let bios = image
                        .as_deref()
                        .and_then(|p| p.parent())
                        .map(|d| d.join("vgabios-stdvga.bin"))
                        .unwrap_or_else(|| vga::VGA_BIOS.into());
                    let dev = VgaPci::new(&bios, Some(vm.clone()), mem.num_regions() as u32 + 1)?;
                    let state = dev.state();
                    bus.add(Arc::new(Mutex::new(dev)))
                        .map_err(|e| VmError::Config(e.to_string()))?;
                    pio.insert(Arc::new(Mutex::new(VgaPorts(state.clone()))), 0x3b0, 0x30)
                        .map_err(bus_err)?;
                    pio.insert(Arc::new(Mutex::new(DispiPorts(state.clone()))), 0x1ce, 3)
                        .map_err(bus_err)?;
                    mmio.insert(
                        Arc::new(Mutex::new(VgaWindow(state.clone()))),
                        memory::VGA_WINDOW.0,
                        memory::VGA_WINDOW.1 - memory::VGA_WINDOW.0,
                    )
                    .map_err(bus_err)?;
                    vga_state = Some(state.clone());
                    display = Some(
                        Display::start(state, fb.clone()).map_err(io_err("start the display"))?,
                    );
                    // The console's pointer as an absolute tablet, beside the PS/2 mouse.
                    let t = Tablet::new();
                    let (_, transport) = add_virtio_pci(&vm, &mem, &mut bus, Box::new(t.clone()))?;
                    pointer = Some(transport);
                    tablet = Some(t);
                }
                let (mut virtio, virtio_slots) =
                    pci_virtio(cfg, &vm, &mem, &mut bus, parked.then_some(&mut announce))?;
                if let Some(p) = pointer {
                    virtio.push(VirtioSlot::Pointer(p));
                }
                let sata = sata_devices(cfg, parked, cdrom.as_ref(), &vm, &mem, &mut bus)?;
                let boot = boot_devices(cfg, *order, &virtio_slots, sata.as_ref());
                ahci = sata;
                let bus = Arc::new(bus);
                let config_io = Arc::new(Mutex::new(PciConfigIo::new(bus.clone(), reset)));
                pio.insert(config_io.clone(), u64::from(PCI_CONFIG_PORT), 8)
                    .map_err(bus_err)?;
                mmio.insert(
                    Arc::new(Mutex::new(PciWindow::new(bus.clone(), u64::from(window.0)))),
                    u64::from(window.0),
                    u64::from(window.1 - window.0) + 1,
                )
                .map_err(bus_err)?;
                let rtc_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
                vm.register_irqfd(&rtc_irq, RTC_IRQ)
                    .map_err(kvm_err("wire the RTC IRQ"))?;
                let mut fw = FwCfg::new(mem.clone(), cfg.vcpus);
                let platform = acpi::Platform {
                    vcpus: cfg.vcpus,
                    mmio: &[],
                    pci_window: Some(window),
                };
                firmware::describe(&mut fw, ram_bytes, &platform, &boot)?;
                let fw = Arc::new(Mutex::new(fw));
                pio.insert(fw.clone(), u64::from(fw_cfg::PORT), fw_cfg::PORT_LEN)
                    .map_err(bus_err)?;
                let cmos = Arc::new(Mutex::new(Cmos::new(
                    below_4g,
                    ram_bytes - below_4g,
                    cfg.vcpus,
                    Some(rtc_irq),
                )));
                pio.insert(cmos.clone(), u64::from(cmos::PORT), 2)
                    .map_err(bus_err)?;
                chipset = Some(Platform {
                    pci: bus,
                    config_io,
                    cmos,
                    fw_cfg: fw,
                    vga: vga_state.take(),
                });
                pio.insert(
                    Arc::new(Mutex::new(DebugCon::default())),
                    u64::from(debugcon::PORT),
                    1,
                )
                .map_err(bus_err)?;
                rom_keep = Some(rom);
                (None, virtio)
            }
        };

        // vCPUs.
        let pio = Arc::new(pio);
        let mmio = Arc::new(mmio);
        // A VM that takes a migrated state first starts with its vCPUs parked.
        let control = if parked {
            Control::parked_at_start()
        } else {
            Control::new()
        };
        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report CPUID"))?;
        let pv_clock = !matches!(cfg.boot, Boot::Firmware { .. });
        let mut fds = Vec::new();
        for id in 0..cfg.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create a vCPU"))?;
            let mut c = base_cpuid.clone();
            cpuid::patch(&mut c, id, cfg.vcpus, pv_clock);
            fd.set_cpuid2(&c).map_err(kvm_err("set CPUID"))?;
            regs::setup_msrs(&fd)?;
            // Firmware starts from the reset state KVM gives a new vCPU.
            if let Some(entry) = entry {
                regs::setup_regs(&fd, entry)?;
                regs::setup_sregs(&mem, &fd, entry)?;
                regs::setup_fpu(&fd)?;
            }
            regs::setup_lapic(&fd)?;
            fds.push(fd);
        }
        let mut vcpus = Vec::new();
        for (id, fd) in fds.into_iter().enumerate() {
            vcpus.push(
                VcpuThread::spawn(
                    id as u8,
                    fd,
                    pio.clone(),
                    mmio.clone(),
                    control.clone(),
                    events.clone(),
                )
                .map_err(io_err("start a vCPU thread"))?,
            );
        }
        tracing::info!(
            vcpus = cfg.vcpus,
            memory_mib = cfg.memory_mib,
            ?entry,
            "VM started"
        );
        Ok(Vm {
            _vm: vm,
            _mem: mem,
            _memfd: memfd,
            _rom: rom_keep,
            ahci,
            platform: chipset,
            display,
            tablet,
            fb: fb.cloned(),
            vcpus,
            control,
            serial,
            i8042,
            pm,
            virtio,
            announce,
            watch: watch.clone(),
            devices_paused: Default::default(),
        })
    }

    fn pause(&self) {
        self.control.set(Run::Pause);
        let n = self.vcpus.len();
        vcpu::kick_until(&self.vcpus, || self.control.parked() == n);
    }

    fn resume(&self) {
        self.control.set(Run::Go);
    }

    /// Moves this VM, running, to the VMM listening on `to` (`enspeed vmm --incoming`): guest
    /// RAM copied while it runs, then a pause for the last pages and the state. Fails safe:
    /// a failure before the whole state was sent leaves it running here; after that, without
    /// the target's word that it runs the VM, it stays paused here (the target may run it:
    /// never on both), and the failure says so.
    fn migrate_out(
        &self,
        cfg: &VmConfig,
        to: &std::path::Path,
        downtime: Duration,
        auto_converge: bool,
    ) -> Result<crate::api::Migrated, MigrateFailure> {
        use crate::migration::{self as mig, Message};
        use std::io::BufWriter;
        use vmm_api::migration::{read_reply, Reply};
        let refused = |why: String| MigrateFailure { why, paused: false };
        let started = Instant::now();
        let stream = std::os::unix::net::UnixStream::connect(to)
            .map_err(|e| refused(format!("reaching the target VMM at {}: {e}", to.display())))?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(60)));
        let mut reader = stream
            .try_clone()
            .map_err(|e| refused(format!("the migration stream: {e}")))?;
        let mut w = BufWriter::with_capacity(1 << 20, stream);
        let memory_bytes: u64 = self._mem.iter().map(|r| r.len()).sum();
        // Guest RAM changes besides the vCPUs' writes (KVM's log): this VMM's own devices
        // write it (the memory's bitmap), and so does each vhost-user backend (a log it
        // shares, which it marks from now until the migration ends).
        let vhost: Vec<&Arc<Mutex<dyn VirtioTransport>>> = self
            .virtio
            .iter()
            .filter_map(|v| match v {
                VirtioSlot::Disk(_, t) if as_vhost_user(lock(t).device_mut()).is_some() => Some(t),
                _ => None,
            })
            .collect();
        let shared = if vhost.is_empty() {
            None
        } else {
            Some(
                mig::SharedLog::new(&self._mem)
                    .map_err(|e| refused(format!("the vhost-user dirty log: {e}")))?,
            )
        };
        let log = VmDirtyLog {
            kvm: mig::KvmLog(&self._vm),
            mem: &self._mem,
            shared: shared.as_ref(),
        };
        let mut paused_at = None;
        let mut rounds = 0;
        let mut transferred = 0;
        let mut all_sent = false;
        let watch = &self.watch;
        let progress = |phase, p: &mig::Progress| vmm_api::MigrationProgress {
            phase,
            round: p.round,
            memory_bytes,
            transferred_bytes: p.transferred_bytes,
            covered_bytes: p.covered_bytes,
            remaining_bytes: p.remaining_bytes,
            dirty_rate_bytes_per_sec: p.dirty_rate_bytes_per_sec,
            expected_downtime_ms: p.expected_downtime_ms,
            elapsed_ms: started.elapsed().as_millis() as u64,
            throttle_pct: self.control.throttle(),
        };
        watch.reset(Some(progress(
            vmm_api::MigrationPhase::Copying,
            &mig::Progress::default(),
        )));
        let mut last = mig::Progress::default();
        let mut paused_devices: Vec<&Arc<Mutex<dyn VirtioTransport>>> = Vec::new();
        let mut target_refused = false;
        let result = (|| -> Result<(), String> {
            mig::write_message(
                &mut w,
                &Message::Hello {
                    memory_bytes,
                    vcpus: u32::from(cfg.vcpus),
                },
            )
            .map_err(|e| format!("the migration stream: {e}"))?;
            mig::log_dirty_pages(&self._vm, &self._mem, true).map_err(|e| e.to_string())?;
            if let Some(shared) = &shared {
                for t in &vhost {
                    if let Some(d) = as_vhost_user(lock(t).device_mut()) {
                        d.start_log(shared)?;
                    }
                }
            }
            // Auto-converge: while the vCPUs are held back, a kicker makes every one of them
            // leave KVM_RUN each period, where it sleeps its share (a guest that never exits
            // would otherwise run on unthrottled).
            let copying = AtomicBool::new(true);
            let precopied = std::thread::scope(|scope| {
                if auto_converge {
                    scope.spawn(|| {
                        while copying.load(Ordering::SeqCst) {
                            if self.control.throttle() > 0 {
                                for t in &self.vcpus {
                                    t.kick();
                                }
                            }
                            std::thread::sleep(vcpu::THROTTLE_PERIOD);
                        }
                    });
                }
                let r = mig::precopy(&mut w, &log, &self._mem, downtime, MIGRATION_ROUNDS, |p| {
                    last = *p;
                    if p.round_done {
                        rounds = p.round + 1;
                        transferred = p.transferred_bytes;
                        // Dirtying faster than half of what the stream takes: held back
                        // more (20%, then 10 points a round, up to 99%).
                        let held = self.control.throttle();
                        if auto_converge
                            && p.round >= 1
                            && p.dirty_rate_bytes_per_sec > p.rate_bytes_per_sec / 2
                        {
                            let more = if held == 0 {
                                20
                            } else {
                                held.saturating_add(10)
                            };
                            self.control.set_throttle(more);
                        }
                        tracing::info!(
                            round = p.round,
                            transferred = p.transferred_bytes,
                            remaining = p.remaining_bytes,
                            dirty_rate = p.dirty_rate_bytes_per_sec,
                            expected_downtime_ms = p.expected_downtime_ms,
                            throttle_pct = self.control.throttle(),
                            "migration round"
                        );
                    }
                    watch.update(progress(vmm_api::MigrationPhase::Copying, p))
                });
                copying.store(false, Ordering::SeqCst);
                r
            });
            // Whatever comes next (the pause, or running on here), the vCPUs run freely.
            let throttled = self.control.throttle();
            self.control.set_throttle(0);
            if throttled > 0 {
                tracing::info!(
                    throttle_pct = throttled,
                    "the guest was held back for the copy to converge"
                );
            }
            let (converged, unsent) = precopied.map_err(|e| match e {
                mig::MigrationError::Cancelled => "cancelled".to_string(),
                e => e.to_string(),
            })?;
            if converged == mig::Converged::No {
                return Err(format!(
                    "the guest writes its memory faster than the migration stream takes it: after {MIGRATION_ROUNDS} rounds the rest would still take more than {downtime:?}{}",
                    if auto_converge {
                        format!(", its vCPUs held back {throttled}% of the time")
                    } else {
                        " (auto-converge would slow the guest down until it fits)".to_string()
                    }
                ));
            }
            let msrs = {
                let kvm = Kvm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
                crate::snapshot::msr_list(&kvm).map_err(|e| e.to_string())?
            };
            // A cancel that came in time wins; from the pause on, none does.
            if !watch.update(progress(vmm_api::MigrationPhase::Paused, &last)) {
                return Err("cancelled".into());
            }
            paused_at = Some(Instant::now());
            self.pause();
            // The devices stop where they stand: nothing in flight, no more writes to RAM.
            let mut virtio = Vec::new();
            for v in &self.virtio {
                let t = v.transport();
                // Only a device that stopped where it stood starts again from there (one that
                // failed to stop is left as it is: its old ring position would replay requests).
                let state = lock(t).pause().map_err(|e| format!("{}: {e}", v.name()))?;
                paused_devices.push(t);
                let media = match v {
                    VirtioSlot::Disk(..) => disk_media(t),
                    VirtioSlot::Net(_) | VirtioSlot::Pointer(_) => None,
                };
                virtio.push(mig::VirtioDeviceState { media, state });
            }
            transferred +=
                mig::last_pages(&mut w, &log, &self._mem, unsent).map_err(|e| e.to_string())?;
            let vm_state = crate::snapshot::VmState::save(&self._vm).map_err(|e| e.to_string())?;
            mig::write_message(&mut w, &Message::Vm(Box::new(vm_state)))
                .map_err(|e| format!("the migration stream: {e}"))?;
            for (id, t) in self.vcpus.iter().enumerate() {
                let state = crate::snapshot::VcpuState::save(&lock(t.fd()), id, &msrs)
                    .map_err(|e| e.to_string())?;
                mig::write_message(
                    &mut w,
                    &Message::Vcpu {
                        id: id as u32,
                        state: Box::new(state),
                    },
                )
                .map_err(|e| format!("the migration stream: {e}"))?;
            }
            let devices = mig::DeviceStates {
                serial: lock(&self.serial).state(),
                i8042: lock(&self.i8042).state(),
                pm: lock(&self.pm).state(),
                virtio,
                platform: self.platform.as_ref().map(|p| p.save(self.ahci.as_ref())),
            };
            // SATA disks on vhost-user backends let them go for the target's VMM (their
            // commands ran to their end: nothing is in flight); should the move fail, the next
            // command here connects again.
            if let Some(s) = &self.ahci {
                lock(&s.ahci).hand_over();
            }
            mig::write_message(&mut w, &Message::Devices(Box::new(devices)))
                .map_err(|e| format!("the migration stream: {e}"))?;
            if let Some(vga) = self.platform.as_ref().and_then(|p| p.vga.as_ref()) {
                let mut v = lock(vga);
                let planes = v.planes().to_vec();
                transferred += mig::send_vga(&mut w, &planes, v.vram())
                    .map_err(|e| format!("the migration stream: {e}"))?;
            }
            if let Some(fb) = self.guest_framebuffer() {
                let bytes = fb.save();
                mig::write_message(
                    &mut w,
                    &Message::Framebuffer {
                        len: bytes.len() as u64,
                    },
                )
                .and_then(|()| std::io::Write::write_all(&mut w, &bytes))
                .map_err(|e| format!("the migration stream: {e}"))?;
                transferred += bytes.len() as u64;
            }
            mig::write_message(&mut w, &Message::Done)
                .map_err(|e| format!("the migration stream: {e}"))?;
            // From here the target may hold the whole VM: only its word that it will not run
            // it lets the VM run on here.
            all_sent = true;
            watch.update(progress(vmm_api::MigrationPhase::Handover, &last));
            std::io::Write::flush(&mut w).map_err(|e| format!("the migration stream: {e}"))?;
            match read_reply(&mut reader) {
                Ok(Reply::Ready) => {}
                Ok(Reply::Failed(why)) => {
                    target_refused = true;
                    return Err(format!("the target refused the VM: {why}"));
                }
                Ok(other) => return Err(format!("the target VMM answered {other:?} before Go")),
                Err(e) => return Err(format!("no answer from the target VMM: {e}")),
            }
            mig::write_message(&mut w, &Message::Go)
                .and_then(|()| std::io::Write::flush(&mut w))
                .map_err(|e| format!("the migration stream: {e}"))?;
            match read_reply(&mut reader) {
                Ok(Reply::Resumed) => Ok(()),
                Ok(other) => Err(format!("the target VMM answered {other:?} after Go")),
                Err(e) => Err(format!("no word from the target VMM after Go: {e}")),
            }
        })();
        watch.reset(None);
        match result {
            Ok(()) => {
                let downtime = paused_at.map(|t| t.elapsed()).unwrap_or_default();
                Ok(crate::api::Migrated {
                    downtime_ms: downtime.as_secs_f64() * 1e3,
                    total_ms: started.elapsed().as_secs_f64() * 1e3,
                    rounds,
                    transferred_bytes: transferred,
                })
            }
            Err(why) if !all_sent || target_refused => {
                // Still ours: it runs here as before, its devices from where they stopped.
                self.end_dirty_logs(&vhost);
                for t in paused_devices {
                    if let Err(e) = lock(t).unpause() {
                        tracing::error!(error = %e, "a device paused for the migration does not run again");
                    }
                }
                self.resume();
                tracing::warn!(why = %why, "live migration failed; the VM runs on here");
                Err(MigrateFailure { why, paused: false })
            }
            Err(why) => {
                tracing::error!(why = %why, "live migration: the target had the whole VM but did not say it runs it; the VM stays paused here");
                // Should it run here after all (whoever drives the VMM learnt the target never
                // will), `resume` starts its devices again first.
                self.end_dirty_logs(&vhost);
                self.devices_paused
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                Err(MigrateFailure {
                    why: format!(
                        "{why}; the target VMM may be running the VM, so it stays paused here"
                    ),
                    paused: true,
                })
            }
        }
    }

    /// A migration from here ended without the VM leaving: KVM's log off, and the vhost-user
    /// backends' log no longer the VMM's (`vhost`, the VM's vhost-user disks).
    fn end_dirty_logs(&self, vhost: &[&Arc<Mutex<dyn VirtioTransport>>]) {
        for t in vhost {
            if let Some(d) = as_vhost_user(lock(t).device_mut()) {
                d.stop_log();
            }
        }
        let _ = crate::migration::log_dirty_pages(&self._vm, &self._mem, false);
    }

    /// Takes a VM migrated from another VMM on `stream`, its vCPUs parked since it was built,
    /// and runs it.
    fn migrate_in(
        &self,
        cfg: &VmConfig,
        stream: std::os::unix::net::UnixStream,
    ) -> Result<(), String> {
        use crate::migration as mig;
        use vmm_api::migration::{write_reply, Reply};
        let mut writer = stream
            .try_clone()
            .map_err(|e| format!("the migration stream: {e}"))?;
        let mut r = std::io::BufReader::with_capacity(1 << 20, stream);
        let result = (|| -> Result<(), String> {
            let got = mig::receive(
                &mut r,
                &self._mem,
                u32::from(cfg.vcpus),
                self.guest_framebuffer().map(|f| f.size()),
            )
            .map_err(|e| e.to_string())?;
            let devices = got.devices.ok_or("no device state in the stream")?;
            got.vm
                .expect("receive checks it came")
                .restore(&self._vm)
                .map_err(|e| e.to_string())?;
            for (id, (t, state)) in self.vcpus.iter().zip(&got.vcpus).enumerate() {
                state
                    .as_ref()
                    .expect("receive checks every one came")
                    .restore(&lock(t.fd()), id)
                    .map_err(|e| e.to_string())?;
            }
            lock(&self.serial)
                .restore(&devices.serial)
                .map_err(|e| e.to_string())?;
            lock(&self.i8042).restore(&devices.i8042);
            lock(&self.pm).restore(&devices.pm);
            match (&self.platform, &devices.platform) {
                (Some(p), Some(st)) => {
                    p.restore(st, self.ahci.as_ref(), got.vga_planes.as_deref(), &got.vram)?
                }
                (None, None) => {}
                (Some(_), None) => {
                    return Err(
                        "the source's VM boots its kernel directly, this one its firmware".into(),
                    )
                }
                (None, Some(_)) => {
                    return Err(
                        "the source's VM boots its firmware, this one its kernel directly".into(),
                    )
                }
            }
            if let (Some(fb), Some(bytes)) = (self.guest_framebuffer(), &got.framebuffer) {
                if !fb.load(bytes) {
                    return Err("the framebuffer differs in size".into());
                }
            }
            if devices.virtio.len() != self.virtio.len() {
                return Err(format!(
                    "{} virtio devices at the source, {} here",
                    devices.virtio.len(),
                    self.virtio.len()
                ));
            }
            // All of RAM is here: the devices take their state; they start on the go.
            for (v, d) in self.virtio.iter().zip(&devices.virtio) {
                let t = v.transport();
                let mut t = lock(t);
                // A removable drive keeps this side's own media (the same image may lie elsewhere
                // here; a path from the stream is never opened): only an ejection follows the
                // source. Different media then show as a different device below.
                if let Some(b) = as_block(t.device_mut()) {
                    if b.readonly() && d.media.is_none() && b.media().is_some() {
                        b.change_media(None)
                            .map_err(|e| format!("{}: {e}", v.name()))?;
                    }
                }
                t.restore(&d.state)
                    .map_err(|e| format!("{}: {e}", v.name()))?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                // Ready, then it runs only on the source's Go (a relay between servers holds
                // Ready back until the VM's disks are this server's).
                write_reply(&mut writer, &Reply::Ready)
                    .map_err(|e| format!("telling the source VMM: {e}"))?;
                if let Ok(s) = r.get_ref().try_clone() {
                    self.watch.awaiting_go(s);
                }
                let went = mig::await_go(&mut r);
                match (went, self.watch.end_wait()) {
                    (Ok(()), _) => {}
                    (Err(e), true) => {
                        tracing::info!(stream = %e, "going on without the source's go, as the control socket said")
                    }
                    (Err(e), false) => return Err(format!("waiting for the source's go: {e}")),
                }
                // The VM is this side's now: its devices start taking requests off their rings
                // (none did before: the source could still have run the VM).
                self.start_devices();
                // The source hears it first: should it not, it stays paused and this one does
                // not run either (never on both).
                write_reply(&mut writer, &Reply::Resumed)
                    .map_err(|e| format!("telling the source VMM: {e}"))?;
                self.resume();
                for (tap, mac) in &self.announce {
                    if let Err(e) = tap.announce(*mac) {
                        tracing::warn!(tap = tap.name(), error = %e, "cannot announce the VM's MAC");
                    }
                }
                tracing::info!("the migrated VM runs here");
                Ok(())
            }
            Err(why) => {
                let _ = write_reply(&mut writer, &Reply::Failed(why.clone()));
                Err(why)
            }
        }
    }

    /// The framebuffer, where it is the guest's own memory (a kernel-booted VM's): what a
    /// live migration carries. A VGA's picture is drawn from the VGA's state, which travels.
    fn guest_framebuffer(&self) -> Option<&Arc<Framebuffer>> {
        let vga = self.platform.as_ref().is_some_and(|p| p.vga.is_some());
        self.fb.as_ref().filter(|_| !vga)
    }

    /// Runs every virtio device from where it stood: restored from a migration (the VM is this
    /// side's now), or stopped for one whose handover failed. One that cannot run has its
    /// driver told to reset it.
    fn start_devices(&self) {
        for v in &self.virtio {
            if let Err(e) = lock(v.transport()).unpause() {
                tracing::error!(device = %v.name(), error = %e, "a device stopped where it stood does not run; its driver is told to reset it");
            }
        }
    }

    /// Stops every vCPU thread and device worker.
    fn teardown(self) {
        if let Some(d) = self.display {
            d.stop();
        }
        if let Some(fb) = &self.fb {
            fb.untrack();
        }
        self.control.set(Run::Exit);
        vcpu::kick_until(&self.vcpus, || self.vcpus.iter().all(|t| t.finished()));
        for t in self.vcpus {
            t.join();
        }
        for v in &self.virtio {
            let t = v.transport();
            lock(t).device_mut().reset();
        }
    }

    /// Writes the media now in each removable drive into `cfg`.
    fn keep_media(&self, cfg: &mut VmConfig) {
        for (i, d) in cfg.disks.iter_mut().enumerate() {
            if d.readonly && d.kind == DiskKind::File && d.bus == DiskBus::Virtio {
                d.path = self.disk(i).and_then(disk_media).unwrap_or_default();
            }
        }
        if let (
            Boot::Firmware {
                cdrom: Some(media), ..
            },
            Some(s),
        ) = (&mut cfg.boot, &self.ahci)
        {
            *media = s.cdrom.and_then(|p| lock(&s.ahci).cdrom_media(p));
        }
    }

    fn disk(&self, index: usize) -> Option<&Arc<Mutex<dyn VirtioTransport>>> {
        self.virtio.iter().find_map(|v| match v {
            VirtioSlot::Disk(i, t) if *i == index => Some(t),
            _ => None,
        })
    }
}

/// A live migration that did not happen.
#[derive(Debug)]
struct MigrateFailure {
    why: String,
    /// The VM stays paused here (the target may run it).
    paused: bool,
}

/// How long `--incoming` waits for its source to connect.
const INCOMING_ACCEPT: Duration = Duration::from_secs(120);
/// The most pre-copy rounds a live migration takes before it gives up.
const MIGRATION_ROUNDS: u32 = 30;

/// What the run loop decided.
enum Next {
    Exit(Exit),
    Reboot,
}

/// Runs the VM described by `cfg` until it powers off or is stopped; a
/// guest reset rebuilds it and boots again.
pub fn run(mut cfg: VmConfig) -> Result<Exit, VmError> {
    vcpu::install_kick_handler().map_err(io_err("install the vCPU kick signal handler"))?;
    let watch = Arc::new(crate::migration::MigrationWatch::default());
    let sink: Box<dyn Write + Send> = match &cfg.serial {
        SerialTarget::Stdout => Box::new(std::io::stdout()),
        SerialTarget::File(p) => Box::new(
            crate::devices::serial::BoundedLog::open(p, cfg.serial_max)
                .map_err(io_err(format!("open serial log {}", p.display())))?,
        ),
    };
    let console = Console::new(sink);
    let (tx, rx) = channel();
    if let Some(sock) = &cfg.api_socket {
        api::serve(sock, tx.clone(), console.clone(), watch.clone())
            .map_err(io_err(format!("serve {}", sock.display())))?;
    }
    if cfg.serial == SerialTarget::Stdout && unsafe_isatty_stdin() {
        forward_stdin(tx.clone());
    }
    let fb = match &cfg.vnc {
        Some(v) => {
            // With firmware boot the guest sets the VGA's mode: room for the largest.
            let fb = match cfg.boot {
                Boot::Firmware { .. } => {
                    let fb = Framebuffer::new(u32::from(vga::MAX_XRES), u32::from(vga::MAX_YRES))?;
                    fb.show(640, 480, &vec![0; 640 * 480]);
                    Arc::new(fb)
                }
                Boot::Kernel { .. } => Arc::new(Framebuffer::new(v.width, v.height)?),
            };
            rfb::serve(&v.socket, fb.clone(), cfg.name.clone(), tx.clone())
                .map_err(io_err(format!("serve {}", v.socket.display())))?;
            tracing::info!(vm = %cfg.name, socket = %v.socket.display(), width = v.width, height = v.height, "RFB console");
            Some(fb)
        }
        None => None,
    };
    // A VM migrated in: its state comes on the one connection to this socket.
    let mut incoming = match &cfg.incoming {
        Some(path) => Some(await_migration(path)?),
        None => None,
    };
    let mut boots = 0u64;
    loop {
        boots += 1;
        let vm = Vm::build(&cfg, &console, &tx, fb.as_ref(), incoming.is_some(), &watch)?;
        if let Some(stream) = incoming.take() {
            if let Err(why) = vm.migrate_in(&cfg, stream) {
                vm.teardown();
                return Err(VmError::Migration(why));
            }
        }
        let next = run_until_exit(&cfg, &vm, &rx, boots);
        // Removable media stays in its drive across a guest reset, as in a real one.
        vm.keep_media(&mut cfg);
        vm.teardown();
        // Device and vCPU events of the old VM are stale; requests are kept
        // for the next boot, so a stop sent during a reboot is not lost.
        let pending: Vec<VmEvent> = rx
            .try_iter()
            .filter(|ev| matches!(ev, VmEvent::Api(..) | VmEvent::SerialInput(_)))
            .collect();
        for ev in pending {
            let _ = tx.send(ev);
        }
        match next? {
            Next::Exit(e) => {
                if let Some(sock) = &cfg.api_socket {
                    let _ = std::fs::remove_file(sock);
                }
                if let Some(v) = &cfg.vnc {
                    let _ = std::fs::remove_file(&v.socket);
                }
                return Ok(e);
            }
            Next::Reboot => tracing::info!("guest reset; booting again"),
        }
    }
}

/// Listens on `path` for the one connection a source VMM migrates its VM on, and takes it.
fn await_migration(path: &std::path::Path) -> Result<std::os::unix::net::UnixStream, VmError> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io_err(format!(
        "listen for a migration on {}",
        path.display()
    )))?;
    // Owner-only: whoever connects hands this VMM a whole VM.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("restrict {}", path.display())))?;
    tracing::info!(socket = %path.display(), "waiting for a migrated VM");
    // Not for ever: a source that never comes leaves no VMM waiting behind.
    listener.set_nonblocking(true).map_err(io_err(format!(
        "listen for a migration on {}",
        path.display()
    )))?;
    let deadline = std::time::Instant::now() + INCOMING_ACCEPT;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = std::fs::remove_file(path);
                return Err(VmError::Config(format!(
                    "no migration came to {} in {} s",
                    path.display(),
                    INCOMING_ACCEPT.as_secs()
                )));
            }
            Err(e) => {
                return Err(io_err(format!("accept a migration on {}", path.display()))(
                    e,
                ))
            }
        }
    };
    let _ = std::fs::remove_file(path);
    stream
        .set_nonblocking(false)
        .map_err(io_err(format!("the migration on {}", path.display())))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(60)));
    Ok(stream)
}

/// Gives the framebuffer to the VM as memory slot `slot` at
/// [`FRAMEBUFFER_START`], black, with KVM logging the guest's writes to it,
/// and describes it for the boot data.
fn map_framebuffer(
    vm: &Arc<VmFd>,
    fb: &Framebuffer,
    slot: u32,
) -> Result<boot::LinearFramebuffer, VmError> {
    if fb.size() > FRAMEBUFFER_MAX_SIZE {
        return Err(VmError::Config(format!(
            "a framebuffer of {} bytes does not fit its window",
            fb.size()
        )));
    }
    fb.clear();
    let r = kvm_bindings::kvm_userspace_memory_region {
        slot,
        guest_phys_addr: FRAMEBUFFER_START,
        memory_size: fb.size(),
        userspace_addr: fb.host_address(),
        flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
    };
    // SAFETY: the mapping lives as long as the Framebuffer, which run()
    // creates once and keeps (with the RFB server and every Vm holding
    // clones) until the process ends, past every VM fd.
    unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("map the framebuffer"))?;
    fb.track(vm.clone(), slot);
    let side =
        |v: u32| u16::try_from(v).map_err(|_| VmError::Config("framebuffer too large".into()));
    Ok(boot::LinearFramebuffer {
        base: FRAMEBUFFER_START,
        size: fb.size(),
        width: side(fb.width())?,
        height: side(fb.height())?,
        stride: side(fb.stride())?,
    })
}

fn unsafe_isatty_stdin() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(std::io::stdin().as_raw_fd()) == 1 }
}

fn forward_stdin(tx: Sender<VmEvent>) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || tx.send(VmEvent::SerialInput(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        });
}

fn run_until_exit(
    cfg: &VmConfig,
    vm: &Vm,
    rx: &Receiver<VmEvent>,
    boots: u64,
) -> Result<Next, VmError> {
    let started = Instant::now();
    let mut paused = false;
    let mut shutdown_deadline: Option<Option<Instant>> = None;
    let mut serial_backlog: Vec<u8> = Vec::new();
    // Where the console's pointer was last: the mouse reports the moves.
    let mut pointer: Option<(i32, i32)> = None;
    let mut key_backlog: std::collections::VecDeque<KeyStroke> = Default::default();
    loop {
        if !key_backlog.is_empty() {
            let n = lock(&vm.i8042).key_strokes(key_backlog.make_contiguous());
            key_backlog.drain(..n);
        }
        if !serial_backlog.is_empty() {
            let n = lock(&vm.serial).input(&serial_backlog);
            serial_backlog.drain(..n);
        }
        if let Some(Some(deadline)) = shutdown_deadline {
            if Instant::now() >= deadline {
                tracing::info!("guest did not power off in time; stopping it");
                return Ok(Next::Exit(Exit::Stopped));
            }
        }
        let ev = match rx.recv_timeout(Duration::from_millis(
            if serial_backlog.is_empty() && key_backlog.is_empty() {
                200
            } else {
                5
            },
        )) {
            Ok(ev) => ev,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Ok(Next::Exit(Exit::Stopped)),
        };
        match ev {
            VmEvent::PowerOff => {
                tracing::info!("guest powered off");
                return Ok(Next::Exit(Exit::PowerOff));
            }
            VmEvent::Reset => return Ok(Next::Reboot),
            VmEvent::Halted(id) => tracing::info!(vcpu = id, "vCPU halted"),
            VmEvent::VcpuFailed(msg) => return Err(VmError::Vcpu(msg)),
            VmEvent::Keys(strokes) => {
                // Bounded: a paste goes in as the guest reads, up to a limit.
                let room = MAX_KEY_BACKLOG.saturating_sub(key_backlog.len());
                key_backlog.extend(strokes.into_iter().take(room));
            }
            VmEvent::Pointer {
                x,
                y,
                buttons,
                width,
                height,
            } => {
                let (dx, dy) = match pointer {
                    Some((px, py)) => (i32::from(x) - px, i32::from(y) - py),
                    None => (0, 0),
                };
                pointer = Some((i32::from(x), i32::from(y)));
                // The wheel is a press of button 4 (up) or 5 (down).
                let dz = match buttons & 0x18 {
                    0x08 => -1,
                    0x10 => 1,
                    _ => 0,
                };
                // RFB numbers left, middle, right; PS/2 left, right, middle.
                let ps2 = (buttons & 1) | (buttons & 4) >> 1 | (buttons & 2) << 1;
                lock(&vm.i8042).pointer(dx, dy, dz, ps2);
                if let Some(t) = &vm.tablet {
                    t.pointer(x, y, width, height, buttons & 7, dz);
                }
            }
            VmEvent::SerialInput(bytes) => {
                // Bounded: a client pasting megabytes must not grow us without limit.
                if serial_backlog.len() < 1 << 20 {
                    serial_backlog.extend_from_slice(&bytes);
                }
            }
            VmEvent::Api(req, reply) => {
                let (resp, next) = handle_api(
                    cfg,
                    vm,
                    req,
                    &mut paused,
                    &mut shutdown_deadline,
                    started,
                    boots,
                );
                let written = reply.send(resp);
                if let Some(n) = next {
                    if matches!(n, Next::Exit(_)) {
                        // The process ends after: its answer (a move's figures) leaves first.
                        written.wait(Duration::from_secs(2));
                    }
                    return Ok(n);
                }
            }
        }
    }
}

fn handle_api(
    cfg: &VmConfig,
    vm: &Vm,
    req: Request,
    paused: &mut bool,
    shutdown: &mut Option<Option<Instant>>,
    started: Instant,
    boots: u64,
) -> (Response, Option<Next>) {
    match req {
        Request::Status {} => {
            let state = match (shutdown.is_some(), *paused) {
                (true, _) => RunState::ShuttingDown,
                (false, true) => RunState::Paused,
                (false, false) => RunState::Running,
            };
            let disks = cfg
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| DiskStatus {
                    path: if d.readonly {
                        vm.disk(i).and_then(|t| disk_media(t))
                    } else {
                        Some(d.path.clone())
                    },
                    readonly: d.readonly,
                })
                .chain(
                    vm.ahci
                        .as_ref()
                        .filter(|s| s.cdrom.is_some())
                        .map(|s| DiskStatus {
                            path: s.cdrom.and_then(|p| lock(&s.ahci).cdrom_media(p)),
                            readonly: true,
                        }),
                )
                .collect();
            let status = Status {
                state,
                vcpus: cfg.vcpus,
                memory_mib: cfg.memory_mib,
                boots,
                uptime_secs: started.elapsed().as_secs_f64(),
                disks,
                pid: std::process::id(),
            };
            (
                Response {
                    ok: true,
                    status: Some(status),
                    ..Default::default()
                },
                None,
            )
        }
        Request::Pause {} => {
            if !*paused {
                vm.pause();
                *paused = true;
            }
            (Response::ok(), None)
        }
        Request::Resume {} => {
            if *paused {
                // After a handover that failed, the devices first, from where they stopped.
                if vm
                    .devices_paused
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    vm.start_devices();
                }
                vm.resume();
                *paused = false;
            }
            (Response::ok(), None)
        }
        Request::Stop {} => (Response::ok(), Some(Next::Exit(Exit::Stopped))),
        Request::Shutdown { timeout_secs } => {
            if *paused {
                return (
                    Response::err("the VM is paused; resume it first or use stop"),
                    None,
                );
            }
            let listening = lock(&vm.pm).press_power_button();
            *shutdown = Some(timeout_secs.map(|s| Instant::now() + Duration::from_secs(s)));
            if listening {
                (Response::ok(), None)
            } else {
                (
                    Response {
                        ok: true,
                        error: Some("power button pressed, but the guest has not enabled ACPI power-button events".into()),
                        ..Default::default()
                    },
                    None,
                )
            }
        }
        Request::CtrlAltDel {} => {
            lock(&vm.i8042).ctrl_alt_del();
            (Response::ok(), None)
        }
        Request::Media { disk, path } => {
            // The CD-ROM drive comes after the disks.
            if let Some(s) = vm.ahci.as_ref() {
                if let (Some(port), true) = (s.cdrom, disk == cfg.disks.len()) {
                    let mut a = lock(&s.ahci);
                    let r = match a.drive_mut(port) {
                        Some(Drive::Cdrom(c)) => {
                            c.change(path.as_deref()).map_err(|e| e.to_string())
                        }
                        _ => Err("the CD-ROM drive is missing".to_string()),
                    };
                    return match r {
                        Ok(()) => (Response::ok(), None),
                        Err(e) => (Response::err(e), None),
                    };
                }
                if s.disks.iter().any(|(d, _)| *d == disk) {
                    return (
                        Response::err(format!("disk {disk} is a SATA disk, not removable media")),
                        None,
                    );
                }
            }
            let Some(t) = vm.disk(disk) else {
                return (
                    Response::err(format!("no disk {disk}; the VM has {}", cfg.disks.len())),
                    None,
                );
            };
            let mut t = lock(t);
            let dev = t.device_mut();
            let result = match as_block(dev) {
                Some(b) => b.change_media(path.as_deref()).map_err(|e| e.to_string()),
                None => Err(format!(
                    "disk {disk} is served by a vhost-user backend; it has no media to change"
                )),
            };
            match result {
                Ok(()) => {
                    t.config_changed();
                    (Response::ok(), None)
                }
                Err(e) => (Response::err(e), None),
            }
        }
        Request::Serial {} => (
            Response::err("serial is handled by the socket itself"),
            None,
        ),
        // Between migrations (the socket answers these itself while one runs).
        Request::MigrationStatus {} => (Response::ok(), None),
        Request::CancelMigration {} => (Response::err("no live migration is under way"), None),
        Request::MigrationGo {} => (Response::err("no migrated VM waits for its go here"), None),
        Request::Migrate {
            to,
            downtime_ms,
            auto_converge,
        } => {
            if *paused || shutdown.is_some() {
                return (
                    Response::err(
                        "only a running VM moves live; this one is paused or shutting down",
                    ),
                    None,
                );
            }
            let downtime = Duration::from_millis(downtime_ms.unwrap_or(50));
            match vm.migrate_out(cfg, &to, downtime, auto_converge) {
                Ok(m) => {
                    tracing::info!(
                        downtime_ms = m.downtime_ms,
                        total_ms = m.total_ms,
                        rounds = m.rounds,
                        bytes = m.transferred_bytes,
                        "migrated"
                    );
                    (
                        Response {
                            ok: true,
                            migrated: Some(m),
                            ..Default::default()
                        },
                        Some(Next::Exit(Exit::Migrated)),
                    )
                }
                Err(f) => {
                    *paused |= f.paused;
                    (Response::err(f.why), None)
                }
            }
        }
    }
}

fn disk_media(t: &Arc<Mutex<dyn VirtioTransport>>) -> Option<std::path::PathBuf> {
    as_block(lock(t).device_mut()).and_then(|b| b.media())
}

fn as_block(dev: &mut dyn crate::devices::virtio::VirtioDevice) -> Option<&mut Block> {
    dev.as_any_mut().downcast_mut::<Block>()
}

fn as_vhost_user(dev: &mut dyn crate::devices::virtio::VirtioDevice) -> Option<&mut VhostUserBlk> {
    dev.as_any_mut().downcast_mut::<VhostUserBlk>()
}

/// Where a live migration learns what changed in guest RAM: KVM's log (the vCPUs), the
/// memory's own bitmap (this VMM's devices) and the vhost-user backends' shared log.
struct VmDirtyLog<'a> {
    kvm: crate::migration::KvmLog<'a>,
    mem: &'a GuestMemory,
    shared: Option<&'a crate::migration::SharedLog>,
}

impl crate::migration::DirtyLog for VmDirtyLog<'_> {
    fn take(&self, slot: usize, len: u64) -> Result<Vec<u64>, crate::migration::MigrationError> {
        let mut words = self.kvm.take(slot, len)?;
        let mut or = |more: Vec<u64>| {
            for (w, m) in words.iter_mut().zip(more) {
                *w |= m;
            }
        };
        if let Some(r) = self.mem.iter().nth(slot) {
            or(std::ops::Deref::deref(r).bitmap().get_and_reset());
        }
        if let Some(shared) = self.shared {
            or(shared.take(slot, len)?);
        }
        Ok(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_list_is_appended_in_linux_form() {
        assert_eq!(
            cmdline_with_devices(" console=ttyS0 ", 2),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(cmdline_with_devices("quiet", 0), "quiet");
    }
}
