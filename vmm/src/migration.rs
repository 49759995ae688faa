//! Live migration's stream and its pre-copy of guest RAM (issue 13).
//!
//! The source keeps its VM running while it sends all of guest RAM, then, round after round,
//! the pages the guest wrote meanwhile (KVM's dirty log), until what is left would go within
//! the downtime budget at the rate measured so far. The caller then parks the vCPUs; the last
//! dirty pages and the paused VM's state ([`crate::snapshot`]) follow, and the target resumes.
//!
//! The stream is one [`Message`] after another, each a little-endian u32 length and that many
//! bytes of JSON, a [`Message::Pages`] followed by its raw bytes. Both ends use this one enum.
//! The target checks every message against its own memory: a page outside it, a length past
//! the limit or a message out of order ends the migration with an error, never a write
//! elsewhere.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::devices::acpi_pm::PmSnapshot;
use crate::devices::i8042::I8042Snapshot;
use crate::devices::serial::SerialSnapshot;
use crate::snapshot::{VcpuState, VmState};

/// What the control socket's threads see of a live migration under way (the VM's loop is busy
/// with it): where it stands, and a request to give up; on the target, a VM that waits for its
/// source's go, and a go given instead by whoever knows the source can no longer run it.
#[derive(Debug, Default)]
pub struct MigrationWatch {
    state: std::sync::Mutex<Watched>,
}

#[derive(Debug, Default)]
struct Watched {
    progress: Option<vmm_api::MigrationProgress>,
    cancelled: bool,
    /// The incoming stream, while the VM waits for the go on it.
    awaiting_go: Option<std::os::unix::net::UnixStream>,
    go: bool,
}

impl MigrationWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the migration under way stands, if one is.
    pub fn progress(&self) -> Option<vmm_api::MigrationProgress> {
        self.lock().progress.clone()
    }

    /// Asks the migration to give up; refused once the guest was paused for it (or when none
    /// is under way).
    pub fn cancel(&self) -> Result<(), String> {
        let mut st = self.lock();
        match st.progress.as_ref().map(|p| p.phase) {
            Some(vmm_api::MigrationPhase::Copying) => {
                st.cancelled = true;
                Ok(())
            }
            Some(_) => Err("too late: the guest is paused for the migration's last pages".into()),
            None => Err("no live migration is under way".into()),
        }
    }

    /// Notes where the migration stands; false, changing nothing, when it was cancelled (the
    /// caller gives up).
    pub fn update(&self, p: vmm_api::MigrationProgress) -> bool {
        let mut st = self.lock();
        if st.cancelled {
            return false;
        }
        st.progress = Some(p);
        true
    }

    /// A migration begins (nothing asked of an earlier one counts) or ended (`None`).
    pub fn reset(&self, p: Option<vmm_api::MigrationProgress>) {
        *self.lock() = Watched {
            progress: p,
            ..Default::default()
        };
    }

    /// The target holds the whole VM and waits for the go on `stream` (a clone of the incoming
    /// connection, which [`go`](Self::go) closes for reading to end the wait).
    pub fn awaiting_go(&self, stream: std::os::unix::net::UnixStream) {
        let mut st = self.lock();
        st.awaiting_go = Some(stream);
        st.go = false;
    }

    /// The go, given on the control socket: refused unless a VM waits for it.
    pub fn go(&self) -> Result<(), String> {
        let mut st = self.lock();
        let Some(s) = st.awaiting_go.take() else {
            return Err("no migrated VM waits for its go here".into());
        };
        st.go = true;
        let _ = s.shutdown(std::net::Shutdown::Read);
        Ok(())
    }

    /// The wait for the go ended: whether the control socket gave it.
    pub fn end_wait(&self) -> bool {
        let mut st = self.lock();
        st.awaiting_go = None;
        std::mem::take(&mut st.go)
    }
}

/// The device models' state.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The serial port.
    pub serial: SerialSnapshot,
    /// The keyboard controller and its mouse.
    pub i8042: I8042Snapshot,
    /// The ACPI PM block.
    pub pm: PmSnapshot,
    /// Each virtio device (disks, then NICs, in the VM's order).
    pub virtio: Vec<VirtioDeviceState>,
    /// A firmware-booted VM's chipset and PCI devices.
    #[serde(default)]
    pub platform: Option<PlatformState>,
}

/// What a firmware-booted VM has beside a kernel-booted one: the PCI bus and the functions on
/// it, the RTC, fw_cfg, the display and the SATA controller.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlatformState {
    /// Every PCI function's configuration space.
    pub pci: Vec<crate::devices::pci::PciFunctionState>,
    /// The configuration address register (0xCF8).
    pub config_address: u32,
    /// The CMOS and RTC.
    pub cmos: crate::devices::cmos::CmosSnapshot,
    /// fw_cfg.
    pub fw_cfg: crate::devices::fw_cfg::FwCfgSnapshot,
    /// The VGA's registers (its planes and framebuffer follow as [`Message::VgaPlanes`] and
    /// [`Message::Vram`]).
    pub vga: Option<crate::devices::vga::VgaSnapshot>,
    /// The SATA controller.
    pub ahci: Option<crate::devices::ahci::AhciSnapshot>,
}

/// A virtio device's part of a migrated VM.
#[derive(Debug, Serialize, Deserialize)]
pub struct VirtioDeviceState {
    /// What a removable drive holds: the target's drive takes the same media.
    pub media: Option<std::path::PathBuf>,
    /// The transport's and the device's state.
    pub state: crate::devices::virtio::VirtioSnapshot,
}

/// The VGA's planes, bytes.
const VGA_PLANES_BYTES: u64 = 4 * 64 * 1024;
/// The VGA's framebuffer, bytes.
const VRAM_BYTES: u64 = crate::devices::vga::VRAM_SIZE as u64;

/// Sends the VGA's planes and the runs of its framebuffer that are not zero (most of it, in
/// text modes and small resolutions); the bytes sent.
pub fn send_vga(w: &mut impl Write, planes: &[u8], vram: &[u8]) -> Result<u64, MigrationError> {
    write_message(
        w,
        &Message::VgaPlanes {
            len: planes.len() as u64,
        },
    )?;
    w.write_all(planes)?;
    let mut sent = planes.len() as u64;
    let page = PAGE as usize;
    let mut at = 0;
    while at < vram.len() {
        if is_zero(&vram[at..(at + page).min(vram.len())]) {
            at += page;
            continue;
        }
        let start = at;
        while at < vram.len()
            && !is_zero(&vram[at..(at + page).min(vram.len())])
            && at - start < MAX_PAGES_BYTES as usize
        {
            at += page;
        }
        let run = &vram[start..at.min(vram.len())];
        write_message(
            w,
            &Message::Vram {
                offset: start as u64,
                len: run.len() as u64,
            },
        )?;
        w.write_all(run)?;
        sent += run.len() as u64;
    }
    Ok(sent)
}

/// The page size of the dirty log.
pub const PAGE: u64 = 4096;
/// The most bytes one [`Message::Pages`] carries.
pub const MAX_PAGES_BYTES: u64 = 1 << 20;
/// The most bytes of one message's JSON header.
const MAX_HEADER: u32 = 1 << 20;

/// One message of the migration stream, source to target.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// First: what the target's VM must match.
    Hello {
        /// Guest RAM, bytes.
        memory_bytes: u64,
        /// vCPUs.
        vcpus: u32,
    },
    /// Guest RAM from guest-physical `gpa`: `len` raw bytes follow (whole pages).
    Pages {
        /// Where.
        gpa: u64,
        /// How many bytes follow.
        len: u64,
    },
    /// Guest RAM from guest-physical `gpa`, `len` bytes (whole pages), all zero: nothing
    /// follows (most of a guest's memory, never touched, costs the link nothing).
    Zeros {
        /// Where.
        gpa: u64,
        /// How many bytes.
        len: u64,
    },
    /// A pre-copy round ended.
    RoundDone {
        /// Its number, from 0 (all of RAM).
        round: u32,
        /// Pages it sent.
        pages: u64,
    },
    /// The paused VM's KVM state.
    Vm(Box<VmState>),
    /// A paused vCPU's state.
    Vcpu {
        /// Its number.
        id: u32,
        /// Its state.
        state: Box<VcpuState>,
    },
    /// The device models' state.
    Devices(Box<DeviceStates>),
    /// The graphical console's framebuffer: `len` raw bytes follow.
    Framebuffer {
        /// How many bytes follow.
        len: u64,
    },
    /// The VGA's four planes: `len` raw bytes follow.
    VgaPlanes {
        /// How many bytes follow.
        len: u64,
    },
    /// A run of the VGA's framebuffer memory holding something other than zeros: `len` raw
    /// bytes follow, for `offset` on (the rest of it is zero).
    Vram {
        /// Where in the framebuffer.
        offset: u64,
        /// How many bytes follow.
        len: u64,
    },
    /// Everything was sent: the target restores it and answers `Ready`
    /// (`vmm_api::migration::Reply`).
    Done,
    /// After `Ready`: the target runs the VM; from here on the source never does.
    Go,
}

/// Errors of a migration stream.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Reading or writing the stream.
    #[error("the migration stream: {0}")]
    Io(#[from] io::Error),
    /// A message the target cannot take.
    #[error("the migration stream: {0}")]
    Bad(String),
    /// KVM refused an operation.
    #[error("{what}: {err}")]
    Kvm {
        /// What.
        what: String,
        /// KVM's answer.
        err: kvm_ioctls::Error,
    },
    /// Cancelled through the control socket.
    #[error("cancelled")]
    Cancelled,
    /// Guest memory could not be read or written.
    #[error("guest memory at {gpa:#x}: {why}")]
    Memory {
        /// Where.
        gpa: u64,
        /// Why.
        why: String,
    },
}

/// Writes `m` (and nothing else: a `Pages` message's bytes are the caller's to write).
pub fn write_message(w: &mut impl Write, m: &Message) -> io::Result<()> {
    let json = serde_json::to_vec(m).map_err(io::Error::other)?;
    w.write_all(&(json.len() as u32).to_le_bytes())?;
    w.write_all(&json)
}

/// Reads one message's header.
pub fn read_message(r: &mut impl Read) -> Result<Message, MigrationError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HEADER {
        return Err(MigrationError::Bad(format!(
            "a message of {len} bytes (at most {MAX_HEADER})"
        )));
    }
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json)?;
    serde_json::from_slice(&json).map_err(|e| MigrationError::Bad(format!("a bad message: {e}")))
}

/// Whether [`send_pages`] asks the memfd where its holes are first: worth it for all of RAM
/// (memory never touched is never read), never for pages the dirty log named (written, so no
/// hole; two system calls a run would only lengthen the pause).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holes {
    Skip,
    Written,
}

/// Sends pages `pages` (page numbers from `region`'s start) of `region` of `mem`, runs of
/// consecutive pages together; the bytes sent.
fn send_pages<B: Bitmap>(
    w: &mut impl Write,
    mem: &GuestMemoryMmap<B>,
    region: usize,
    pages: &[u64],
    buf: &mut Vec<u8>,
    holes: Holes,
) -> Result<u64, MigrationError> {
    let r = mem
        .iter()
        .nth(region)
        .ok_or_else(|| MigrationError::Bad(format!("no memory region {region}")))?;
    let base = r.start_addr().raw_value();
    let mut sent = 0;
    let mut i = 0;
    while i < pages.len() {
        let first = pages[i];
        let mut n = 1;
        while i + (n as usize) < pages.len()
            && pages[i + n as usize] == first + n
            && (n + 1) * PAGE <= MAX_PAGES_BYTES
        {
            n += 1;
        }
        let off = first * PAGE;
        let end = off + (n * PAGE).min(r.len() - off);
        // Holes in the memfd behind the region (memory never touched) are zero without a look
        // (reading them would give them pages); the rest is read, its zero pages named only.
        let mut at = off;
        while at < end {
            let (data, upto) = match holes {
                Holes::Skip => extent(r, at, end),
                Holes::Written => (true, end),
            };
            if data {
                sent += send_data(w, r, at, upto, buf)?;
            } else {
                write_message(
                    w,
                    &Message::Zeros {
                        gpa: base + at,
                        len: upto - at,
                    },
                )?;
            }
            at = upto;
        }
        i += n as usize;
    }
    Ok(sent)
}

/// Whether bytes `from..` of region `r` hold data in the memfd behind it (else they are a
/// hole: zero, never touched), and up to where that holds, before `to`. A region without a
/// file, or a file that cannot tell, is data.
fn extent<B: Bitmap>(r: &GuestRegionMmap<B>, from: u64, to: u64) -> (bool, u64) {
    use std::os::fd::AsRawFd;
    let Some(fo) = r.file_offset() else {
        return (true, to);
    };
    let (fd, start) = (fo.file().as_raw_fd(), fo.start());
    let seek = |whence| {
        // SAFETY: lseek on a descriptor the region owns; the result is checked.
        let at = unsafe { libc::lseek(fd, (start + from) as libc::off_t, whence) };
        if at < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(at as u64 - start)
        }
    };
    let aligned = |at: u64| at.is_multiple_of(PAGE).then_some(at.min(to));
    match seek(libc::SEEK_DATA) {
        // No data from here to the file's end.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => (false, to),
        Ok(d) if d > from => aligned(d).map_or((true, to), |d| (false, d)),
        Ok(_) => match seek(libc::SEEK_HOLE) {
            Ok(h) if h > from => aligned(h).map_or((true, to), |h| (true, h)),
            _ => (true, to),
        },
        Err(_) => (true, to),
    }
}

/// Sends bytes `from..to` of region `r` (whole pages, read into `buf`): runs of pages with data
/// as [`Message::Pages`], runs of zero pages as [`Message::Zeros`]; the bytes of data sent.
fn send_data<B: Bitmap>(
    w: &mut impl Write,
    r: &GuestRegionMmap<B>,
    from: u64,
    to: u64,
    buf: &mut Vec<u8>,
) -> Result<u64, MigrationError> {
    let base = r.start_addr().raw_value();
    buf.resize((to - from) as usize, 0);
    r.read_slice(buf, MemoryRegionAddress(from))
        .map_err(|e| MigrationError::Memory {
            gpa: base + from,
            why: e.to_string(),
        })?;
    let mut sent = 0;
    let mut at = 0;
    while at < buf.len() {
        let zero = is_zero(&buf[at..(at + PAGE as usize).min(buf.len())]);
        let mut end = at;
        while end < buf.len() {
            let page = &buf[end..(end + PAGE as usize).min(buf.len())];
            if is_zero(page) != zero {
                break;
            }
            end += page.len();
        }
        let (gpa, len) = (base + from + at as u64, (end - at) as u64);
        if zero {
            write_message(w, &Message::Zeros { gpa, len })?;
        } else {
            write_message(w, &Message::Pages { gpa, len })?;
            w.write_all(&buf[at..end])?;
            sent += len;
        }
        at = end;
    }
    Ok(sent)
}

/// Takes a [`Message::Pages`] (its bytes read from `r` through `buf`) or [`Message::Zeros`]
/// into `mem`, checked: whole pages, within 1 MiB, inside one region of guest RAM. The bytes of
/// RAM it covered.
fn take_ram<B: Bitmap>(
    r: &mut impl Read,
    mem: &GuestMemoryMmap<B>,
    m: &Message,
    buf: &mut Vec<u8>,
) -> Result<u64, MigrationError> {
    let (gpa, len, zeros) = match *m {
        Message::Pages { gpa, len } => (gpa, len, false),
        Message::Zeros { gpa, len } => (gpa, len, true),
        _ => return Err(MigrationError::Bad(format!("{m:?} is not guest RAM"))),
    };
    let what = if zeros { "zero bytes" } else { "bytes" };
    if len == 0 || len > MAX_PAGES_BYTES || gpa % PAGE != 0 || len % PAGE != 0 {
        return Err(MigrationError::Bad(format!(
            "{len} {what} at {gpa:#x}: not whole pages within 1 MiB"
        )));
    }
    let fits = mem.iter().any(|r| {
        let s = r.start_addr().raw_value();
        gpa >= s && gpa.checked_add(len).is_some_and(|e| e <= s + r.len())
    });
    if !fits {
        return Err(MigrationError::Bad(format!(
            "{len} {what} at {gpa:#x}: outside guest RAM"
        )));
    }
    let memory = |gpa: u64| {
        move |e: vm_memory::GuestMemoryError| MigrationError::Memory {
            gpa,
            why: e.to_string(),
        }
    };
    if !zeros {
        buf.resize(len as usize, 0);
        r.read_exact(buf)?;
        mem.write_slice(buf, GuestAddress(gpa))
            .map_err(memory(gpa))?;
        return Ok(len);
    }
    // Given back to the memfd (its pages read as zero after, and memory never touched here
    // stays untouched); where that cannot be, zeros written over whatever page holds something.
    if zero_range(mem, gpa, len) {
        return Ok(len);
    }
    let mut page = vec![0u8; PAGE as usize];
    for p in (gpa..gpa + len).step_by(PAGE as usize) {
        mem.read_slice(&mut page, GuestAddress(p))
            .map_err(memory(p))?;
        if !is_zero(&page) {
            page.fill(0);
            mem.write_slice(&page, GuestAddress(p)).map_err(memory(p))?;
        }
    }
    Ok(len)
}

/// Makes guest RAM `gpa..gpa + len` (whole pages of one region, checked) read as zero by
/// removing its pages from the memfd behind it (`MADV_REMOVE`); false where that cannot be done.
fn zero_range<B: Bitmap>(mem: &GuestMemoryMmap<B>, gpa: u64, len: u64) -> bool {
    let Ok(host) = mem.get_host_address(GuestAddress(gpa)) else {
        return false;
    };
    let shared = mem
        .find_region(GuestAddress(gpa))
        .is_some_and(|r| r.file_offset().is_some());
    // SAFETY: the range lies within one region of guest RAM (the caller checked), a shared
    // mapping of the memfd that stays mapped while `mem` lives; its pages read as zero after.
    shared && unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_REMOVE) } == 0
}

/// Whether `b` holds only zero bytes (64 at a time: the OR of a block vectorizes; the first
/// block with data ends the look).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Turns KVM's dirty log on (or off) for every RAM region of `mem`, registered as KVM slots
/// 0, 1, ... in order.
pub fn log_dirty_pages<B: Bitmap>(
    vm: &VmFd,
    mem: &GuestMemoryMmap<B>,
    on: bool,
) -> Result<(), MigrationError> {
    for (slot, r) in mem.iter().enumerate() {
        let host =
            r.get_host_address(MemoryRegionAddress(0))
                .map_err(|e| MigrationError::Memory {
                    gpa: r.start_addr().raw_value(),
                    why: e.to_string(),
                })?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: r.start_addr().raw_value(),
            memory_size: r.len(),
            userspace_addr: host as u64,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        };
        // SAFETY: the same mapping the slot already has, alive as long as `mem`; only the
        // dirty-log flag changes.
        unsafe { vm.set_user_memory_region(region) }.map_err(|err| MigrationError::Kvm {
            what: format!("switching the dirty log of memory slot {slot}"),
            err,
        })?;
    }
    Ok(())
}

/// Where a migration learns which pages of guest RAM were written since it last looked: KVM's
/// dirty log sees the vCPUs' writes; the VMM's own devices and a vhost-user backend write guest
/// memory too, and keep logs of their own ([`KvmLog`] is the first; the VM adds the others).
pub trait DirtyLog {
    /// The pages of RAM region `slot` (KVM's slot of that number, `len` bytes) written since
    /// the last call, as bitmap words (bit `i` of word `w`: page `64 w + i` of the region); the
    /// log cleared.
    fn take(&self, slot: usize, len: u64) -> Result<Vec<u64>, MigrationError>;
}

/// KVM's dirty log of a VM: what its vCPUs wrote.
pub struct KvmLog<'a>(pub &'a VmFd);

impl DirtyLog for KvmLog<'_> {
    fn take(&self, slot: usize, len: u64) -> Result<Vec<u64>, MigrationError> {
        self.0
            .get_dirty_log(slot as u32, len as usize)
            .map_err(|err| MigrationError::Kvm {
                what: format!("reading the dirty log of memory slot {slot}"),
                err,
            })
    }
}

/// A dirty log another process writes: one bit for each page of guest-physical memory from
/// address 0, in a memfd both map (a vhost-user backend's writes into guest memory, the
/// protocol's `SET_LOG_BASE`).
pub struct SharedLog {
    file: std::fs::File,
    ptr: *mut u64,
    words: usize,
    /// Each RAM region's guest-physical start, by slot.
    bases: Vec<u64>,
}

// SAFETY: the mapping is owned by this value until drop and only ever touched through atomic
// operations on its words.
unsafe impl Send for SharedLog {}
// SAFETY: as above.
unsafe impl Sync for SharedLog {}

impl SharedLog {
    /// A cleared log covering every page of `mem`.
    pub fn new<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> io::Result<SharedLog> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let end = mem
            .iter()
            .map(|r| r.start_addr().raw_value() + r.len())
            .max()
            .unwrap_or(0);
        let words = end.div_ceil(PAGE).div_ceil(64) as usize;
        let bytes = (words * 8).next_multiple_of(PAGE as usize);
        // SAFETY: a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"enspeed-dirty-log".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned by nobody else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(bytes as u64)?;
        // SAFETY: maps the whole file, shared, checked below; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(SharedLog {
            file,
            ptr: ptr.cast(),
            words,
            bases: mem.iter().map(|r| r.start_addr().raw_value()).collect(),
        })
    }

    /// The memfd to hand the other process.
    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    /// Bytes of the log's mapping.
    pub fn size(&self) -> u64 {
        (self.words as u64 * 8).next_multiple_of(PAGE)
    }

    fn word(&self, i: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(i < self.words, "dirty log word {i} of {}", self.words);
        // SAFETY: in bounds (checked), aligned (mmap's pages), and shared memory is only ever
        // accessed atomically here; the other process sets bits with atomic operations too.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.add(i)) }
    }
}

impl DirtyLog for SharedLog {
    fn take(&self, slot: usize, len: u64) -> Result<Vec<u64>, MigrationError> {
        let base = *self
            .bases
            .get(slot)
            .ok_or_else(|| MigrationError::Bad(format!("no memory region {slot}")))?;
        let first = base / PAGE;
        let pages = len.div_ceil(PAGE);
        let mut out = vec![0u64; pages.div_ceil(64) as usize];
        if first.is_multiple_of(64) {
            for (w, o) in out.iter_mut().enumerate() {
                *o = self
                    .word(first as usize / 64 + w)
                    .swap(0, std::sync::atomic::Ordering::SeqCst);
            }
            // Bits past the region's end belong to whatever follows it: put them back.
            let tail = pages % 64;
            if tail != 0 {
                let last = out.last_mut().expect("a region has pages");
                let theirs = *last & !((1u64 << tail) - 1);
                *last &= (1u64 << tail) - 1;
                self.word(((first + pages) / 64) as usize)
                    .fetch_or(theirs, std::sync::atomic::Ordering::SeqCst);
            }
        } else {
            for p in 0..pages {
                let g = first + p;
                let bit = 1u64 << (g % 64);
                let was = self
                    .word((g / 64) as usize)
                    .fetch_and(!bit, std::sync::atomic::Ordering::SeqCst);
                if was & bit != 0 {
                    out[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
        }
        Ok(out)
    }
}

impl Drop for SharedLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, of that size, not used after this.
        unsafe { libc::munmap(self.ptr.cast(), self.size() as usize) };
    }
}

/// The page numbers set in bitmap words.
pub fn pages_of(words: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            pages.push(w as u64 * 64 + b);
            bits &= bits - 1;
        }
    }
    pages
}

/// The pages of slot `slot` (`len` bytes) written since the last call, and the log cleared.
fn dirty_pages(log: &dyn DirtyLog, slot: usize, len: u64) -> Result<Vec<u64>, MigrationError> {
    Ok(pages_of(&log.take(slot, len)?))
}

/// Where a pre-copy stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The round under way (0: all of RAM).
    pub round: u32,
    /// Bytes sent so far.
    pub transferred_bytes: u64,
    /// Bytes of guest RAM the round under way went through (sent, or named as zero).
    pub covered_bytes: u64,
    /// Bytes the guest dirtied in the last round: what the next one sends.
    pub remaining_bytes: u64,
    /// How fast the guest dirties memory, bytes a second.
    pub dirty_rate_bytes_per_sec: u64,
    /// How fast the stream took guest RAM since the copy began, bytes a second of sending.
    pub rate_bytes_per_sec: u64,
    /// The pause the remaining bytes would take at that rate, with a read of the dirty log,
    /// milliseconds.
    pub expected_downtime_ms: u64,
    /// The round ended (else: a step within round 0, which sends all of RAM).
    pub round_done: bool,
}

/// How a pre-copy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Converged {
    /// What is left fits the budget: pause, then [`last_pages`].
    Yes,
    /// The guest dirtied memory faster than the stream takes it for every round allowed.
    No,
}

/// Pages dirtied during the last round, read from the log (which that read cleared) and not
/// sent yet: [`last_pages`] sends them with what the log holds by then.
#[derive(Debug, Default)]
pub struct Unsent(Vec<(usize, Vec<u64>)>);

/// Sends all of guest RAM, then the pages dirtied meanwhile, round after round, while the
/// vCPUs run, until what is left would take at most `budget` at the rate the stream reached
/// and a further round would no longer halve it (three more at most), or `max_rounds` rounds
/// passed. The dirty log
/// must be on ([`log_dirty_pages`]) before the guest may write anything not yet sent: call
/// that first. `progress` hears of each round, and of the copy's progress within round 0 (all
/// of RAM), every 16 MiB; when it answers false, the pre-copy gives up
/// ([`MigrationError::Cancelled`]).
pub fn precopy<B: Bitmap>(
    w: &mut impl Write,
    log: &dyn DirtyLog,
    mem: &GuestMemoryMmap<B>,
    budget: Duration,
    max_rounds: u32,
    mut progress: impl FnMut(&Progress) -> bool,
) -> Result<(Converged, Unsent), MigrationError> {
    let mut p = Progress::default();
    let mut buf = Vec::with_capacity(MAX_PAGES_BYTES as usize);
    let regions: Vec<(usize, u64)> = mem.iter().enumerate().map(|(i, r)| (i, r.len())).collect();
    // Round 0: every page; the log collects what changes meanwhile.
    for &(slot, len) in &regions {
        dirty_pages(log, slot, len)?;
    }
    let mut round_started = Instant::now();
    // Time spent sending pages (reading them and the stream taking them), over every round.
    let mut sending = Duration::ZERO;
    let mut sent = 0;
    let mut pages = 0;
    const CHUNK_PAGES: u64 = (16 << 20) / PAGE;
    for &(slot, len) in &regions {
        let all: Vec<u64> = (0..len.div_ceil(PAGE)).collect();
        pages += all.len() as u64;
        for chunk in all.chunks(CHUNK_PAGES as usize) {
            sent += timed(&mut sending, || {
                send_pages(w, mem, slot, chunk, &mut buf, Holes::Skip)
            })?;
            p.covered_bytes += chunk.len() as u64 * PAGE;
            p.transferred_bytes = sent;
            p.round_done = false;
            if !progress(&p) {
                return Err(MigrationError::Cancelled);
            }
        }
    }
    p.transferred_bytes = 0;
    // Rounds taken after one already fitted the budget, and whether one did.
    let (mut extra, mut fitted) = (0, false);
    loop {
        let took = round_started.elapsed().max(Duration::from_micros(1));
        // How fast the stream takes guest RAM: every byte sent since the copy began over the
        // time spent sending it. A round's own rate misleads both ways: a small one that fits
        // in the sockets' buffers looks fast, and its fixed cost (the log read, the flush, a
        // nested guest's scheduling) makes a small one look slow, round after round. The
        // pause pays the log's read once, measured below; a zero page counts its name only.
        p.transferred_bytes += sent;
        let busy = sending.max(Duration::from_micros(1));
        p.rate_bytes_per_sec = (p.transferred_bytes as f64 / busy.as_secs_f64()) as u64;
        write_message(
            w,
            &Message::RoundDone {
                round: p.round,
                pages,
            },
        )?;
        w.flush()?;
        // What the guest wrote while that round was sent.
        let reading = Instant::now();
        let mut dirty = Vec::new();
        for &(slot, len) in &regions {
            dirty.push((slot, dirty_pages(log, slot, len)?));
        }
        let read_log = reading.elapsed();
        let remaining: u64 = dirty.iter().map(|(_, d)| d.len() as u64).sum::<u64>() * PAGE;
        p.remaining_bytes = remaining;
        p.dirty_rate_bytes_per_sec = (remaining as f64 / took.as_secs_f64()) as u64;
        // The pause: a last read of the log, then what is left at the stream's rate.
        let expected =
            read_log.as_secs_f64() + remaining as f64 / p.rate_bytes_per_sec.max(1) as f64;
        p.expected_downtime_ms = (expected * 1000.0).ceil() as u64;
        p.round_done = true;
        if !progress(&p) {
            return Err(MigrationError::Cancelled);
        }
        // What is left fits the pause: it pauses now, unless another round is worth it (it
        // halved what is left, the pause would not already be a millisecond or less, and at
        // most three such rounds): a round whose set shrinks that fast costs little and
        // shortens the pause. Once a round fitted, the first that no longer does pauses too
        // (its estimate is then the rounds' own overhead more than the pages left).
        let fits = Duration::from_millis(p.expected_downtime_ms) <= budget;
        let shrinking = remaining * 2 <= pages * PAGE;
        let another = fits && shrinking && p.expected_downtime_ms > 1 && extra < 3;
        if (fits || fitted) && !another {
            return Ok((Converged::Yes, Unsent(dirty)));
        }
        if fits {
            fitted = true;
            extra += 1;
        }
        if p.round + 1 >= max_rounds {
            return Ok((Converged::No, Unsent(dirty)));
        }
        p.round += 1;
        round_started = Instant::now();
        sent = 0;
        pages = 0;
        for (slot, d) in &dirty {
            pages += d.len() as u64;
            sent += timed(&mut sending, || {
                send_pages(w, mem, *slot, d, &mut buf, Holes::Written)
            })?;
        }
        p.covered_bytes = pages * PAGE;
    }
}

/// Runs `f`, adding the time it took to `total`.
fn timed<T>(total: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    *total += t.elapsed();
    r
}

/// With every vCPU parked: the pages the pre-copy left unsent and those dirtied since; the
/// bytes sent.
pub fn last_pages<B: Bitmap>(
    w: &mut impl Write,
    log: &dyn DirtyLog,
    mem: &GuestMemoryMmap<B>,
    unsent: Unsent,
) -> Result<u64, MigrationError> {
    let mut buf = Vec::new();
    let mut sent = 0;
    for (slot, r) in mem.iter().enumerate() {
        let mut d = dirty_pages(log, slot, r.len())?;
        if let Some((_, before)) = unsent.0.iter().find(|(s, _)| *s == slot) {
            d.extend_from_slice(before);
            d.sort_unstable();
            d.dedup();
        }
        sent += send_pages(w, mem, slot, &d, &mut buf, Holes::Written)?;
    }
    Ok(sent)
}

/// The target's side, once it answered `Ready`: whether the source said `Go` (anything else,
/// or the stream's end, is a no).
pub fn await_go(r: &mut impl Read) -> Result<(), MigrationError> {
    match read_message(r)? {
        Message::Go => Ok(()),
        other => Err(MigrationError::Bad(format!("{other:?} instead of Go"))),
    }
}

/// What the target received, for its VM to take before it resumes.
#[derive(Debug, Default)]
pub struct Received {
    /// The VM's KVM state.
    pub vm: Option<Box<VmState>>,
    /// Each vCPU's, by number.
    pub vcpus: Vec<Option<Box<VcpuState>>>,
    /// The device models'.
    pub devices: Option<Box<DeviceStates>>,
    /// The framebuffer's memory.
    pub framebuffer: Option<Vec<u8>>,
    /// The VGA's planes.
    pub vga_planes: Option<Vec<u8>>,
    /// The VGA framebuffer's runs that are not zero, by offset.
    pub vram: Vec<(u64, Vec<u8>)>,
    /// Their bytes in all.
    pub vram_bytes: u64,
    /// Pre-copy rounds seen.
    pub rounds: u32,
    /// Bytes of RAM written.
    pub ram_bytes: u64,
}

/// The target's side: takes the stream into `mem` (a VM of `vcpus` vCPUs, not running, with a
/// framebuffer of `framebuffer` bytes if any) until [`Message::Done`], checking every message;
/// what came besides RAM.
pub fn receive<B: Bitmap>(
    r: &mut impl Read,
    mem: &GuestMemoryMmap<B>,
    vcpus: u32,
    framebuffer: Option<u64>,
) -> Result<Received, MigrationError> {
    let bad = |s: String| Err(MigrationError::Bad(s));
    let memory_bytes: u64 = mem.iter().map(|r| r.len()).sum();
    match read_message(r)? {
        Message::Hello {
            memory_bytes: m,
            vcpus: v,
        } if m == memory_bytes && v == vcpus => {}
        Message::Hello {
            memory_bytes: m,
            vcpus: v,
        } => {
            return bad(format!(
                "the source's VM has {m} bytes of RAM and {v} vCPUs, this one {memory_bytes} and {vcpus}"
            ))
        }
        other => return bad(format!("{other:?} before Hello")),
    }
    let mut got = Received {
        vcpus: (0..vcpus).map(|_| None).collect(),
        ..Default::default()
    };
    let mut buf = Vec::new();
    loop {
        match read_message(r)? {
            m @ (Message::Pages { .. } | Message::Zeros { .. }) => {
                got.ram_bytes += take_ram(r, mem, &m, &mut buf)?
            }
            Message::RoundDone { round, .. } => {
                got.rounds = got.rounds.max(round.saturating_add(1))
            }
            Message::Vm(s) => got.vm = Some(s),
            Message::Devices(d) => got.devices = Some(d),
            Message::Framebuffer { len } => {
                if Some(len) != framebuffer {
                    return bad(format!(
                        "a framebuffer of {len} bytes for one of {}",
                        framebuffer.map_or("none".into(), |f| format!("{f} bytes"))
                    ));
                }
                let mut fb = vec![0u8; len as usize];
                r.read_exact(&mut fb)?;
                got.framebuffer = Some(fb);
            }
            Message::VgaPlanes { len } => {
                if len != VGA_PLANES_BYTES || got.vga_planes.is_some() {
                    return bad(format!("VGA planes of {len} bytes"));
                }
                let mut planes = vec![0u8; len as usize];
                r.read_exact(&mut planes)?;
                got.vga_planes = Some(planes);
            }
            Message::Vram { offset, len } => {
                // Whole pages, none empty, no more than the framebuffer holds in all.
                let had: u64 = got.vram_bytes;
                let fits = len > 0
                    && len.is_multiple_of(PAGE)
                    && offset.is_multiple_of(PAGE)
                    && offset
                        .checked_add(len)
                        .is_some_and(|end| end <= VRAM_BYTES && had + len <= VRAM_BYTES);
                if !fits {
                    return bad(format!(
                        "{len} bytes of the VGA framebuffer at {offset:#x} (of {VRAM_BYTES})"
                    ));
                }
                let mut run = vec![0u8; len as usize];
                r.read_exact(&mut run)?;
                got.vram_bytes += len;
                got.vram.push((offset, run));
            }
            Message::Vcpu { id, state } => match got.vcpus.get_mut(id as usize) {
                Some(slot) => *slot = Some(state),
                None => return bad(format!("vCPU {id} of a VM of {vcpus}")),
            },
            Message::Done => {
                if got.vm.is_none() || got.vcpus.iter().any(Option::is_none) {
                    return bad("Done before the VM's and every vCPU's state".into());
                }
                if framebuffer.is_some() && got.framebuffer.is_none() {
                    return bad("Done before the framebuffer".into());
                }
                return Ok(got);
            }
            Message::Hello { .. } => return bad("a second Hello".into()),
            Message::Go => return bad("Go before Done".into()),
        }
    }
}

#[cfg(test)]
mod tests;
