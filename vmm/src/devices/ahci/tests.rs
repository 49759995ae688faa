//! The controller driven as a driver drives it: command lists, tables and
//! scatter lists built in guest memory, issued through PxCI.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::bus::lock;

const CLB: u64 = 0x10000;
const FB: u64 = 0x11000;
const CTBA: u64 = 0x12000;
const BUF: u64 = 0x20000;

struct Rig {
    ahci: Ahci,
    mem: GuestMemory,
    line: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<(u64, u32)>>>,
    dir: PathBuf,
    disk: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig() -> Rig {
    rig_with(1 << 20, |disk| AtaDisk::open(disk, false).unwrap())
}

/// A controller with the CD-ROM on port 0 and on port 1 the disk `open` makes of a file of
/// `size` bytes whose sector 1 starts with "SECT".
fn rig_with(size: usize, open: impl FnOnce(&Path) -> AtaDisk) -> Rig {
    let dir = std::env::temp_dir().join(format!(
        "enspeed-ahci-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    let mut d = vec![0u8; size];
    d[512..516].copy_from_slice(b"SECT");
    std::fs::write(&disk, &d).unwrap();
    let iso = dir.join("cd.iso");
    let mut i = vec![0u8; 64 << 11];
    i[(17 << 11)..(17 << 11) + 4].copy_from_slice(b"BOOT");
    std::fs::write(&iso, &i).unwrap();
    let (mem, _f) = crate::memory::create(16).unwrap();
    std::mem::forget(_f);
    let line = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(vec![]));
    let (l, s) = (line.clone(), sent.clone());
    let ahci = Ahci::new(
        mem.clone(),
        vec![
            Drive::Cdrom(Cdrom::new(Some(&iso)).unwrap()),
            Drive::Disk(open(&disk)),
        ],
        Box::new(move |a, d| lock(&s).push((a, d))),
        Box::new(move |up| l.store(up, Ordering::SeqCst)),
    )
    .unwrap();
    Rig {
        ahci,
        mem,
        line,
        sent,
        dir,
        disk,
    }
}

impl Rig {
    fn w(&mut self, off: u64, v: u32) {
        self.ahci.write_bar(ABAR, off, &v.to_le_bytes());
    }
    fn r(&mut self, off: u64) -> u32 {
        let mut d = [0u8; 4];
        self.ahci.read_bar(ABAR, off, &mut d);
        u32::from_le_bytes(d)
    }
    fn port(&self, p: usize, reg: u64) -> u64 {
        px::BASE + p as u64 * px::SIZE + reg
    }

    /// Starts port `p` with its lists in memory and its interrupts on.
    fn start(&mut self, p: usize) {
        let clb = CLB + p as u64 * 0x400;
        self.w(self.port(p, px::CLB), clb as u32);
        self.w(self.port(p, px::FB), (FB + p as u64 * 0x100) as u32);
        self.w(self.port(p, px::IE), 0xffff_ffff);
        self.w(self.port(p, px::CMD), px::CMD_FRE | px::CMD_ST);
    }

    /// Issues one command in slot 0 of port `p`: the FIS `cfis`, the packet
    /// `acmd`, buffers of `lens` at BUF; returns PxTFD and the byte count.
    fn issue(
        &mut self,
        p: usize,
        cfis: &[u8],
        acmd: &[u8],
        lens: &[u32],
        write: bool,
    ) -> (u32, u32) {
        let clb = CLB + p as u64 * 0x400;
        let dw0 = 5 | u32::from(write) << 6 | (lens.len() as u32) << 16;
        self.mem.write_obj(dw0, GuestAddress(clb)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(clb + 4)).unwrap();
        self.mem
            .write_obj(CTBA as u32, GuestAddress(clb + 8))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(clb + 12)).unwrap();
        let mut f = [0u8; 64];
        f[..cfis.len()].copy_from_slice(cfis);
        self.mem.write_slice(&f, GuestAddress(CTBA)).unwrap();
        let mut a = [0u8; 16];
        a[..acmd.len()].copy_from_slice(acmd);
        self.mem.write_slice(&a, GuestAddress(CTBA + 0x40)).unwrap();
        let mut at = BUF;
        for (i, &l) in lens.iter().enumerate() {
            let e = CTBA + 0x80 + i as u64 * 16;
            self.mem.write_obj(at as u32, GuestAddress(e)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(e + 4)).unwrap();
            self.mem.write_obj(l - 1, GuestAddress(e + 12)).unwrap();
            at += u64::from(l);
        }
        self.w(self.port(p, px::CI), 1);
        assert_eq!(self.r(self.port(p, px::CI)), 0, "commands complete at once");
        let tfd = self.r(self.port(p, px::TFD));
        (tfd, self.mem.read_obj(GuestAddress(clb + 4)).unwrap())
    }

    fn buf(&self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(BUF)).unwrap();
        v
    }
}

fn h2d(command: u8, lba: u64, count: u16) -> Vec<u8> {
    let l = lba.to_le_bytes();
    let c = count.to_le_bytes();
    vec![
        0x27, 0x80, command, 0, l[0], l[1], l[2], 0x40, l[3], l[4], l[5], 0, c[0], c[1],
    ]
}

#[test]
fn a_driver_finds_both_drives_reads_writes_and_reads_the_cd() {
    let mut t = rig();
    assert_eq!(t.r(hba::PI), 0x3f);
    assert_eq!(t.r(t.port(0, px::SIG)), 0xeb14_0101, "ATAPI");
    assert_eq!(t.r(t.port(1, px::SIG)), 0x101, "disk");
    assert_eq!(t.r(t.port(2, px::SSTS)) & 0xf, 0, "nothing on port 2");
    assert_eq!(t.r(t.port(1, px::SSTS)) & 0xf, 3);
    t.w(hba::GHC, hba::GHC_IE);
    t.start(0);
    t.start(1);

    // IDENTIFY on the disk, a PIO command: data, PIO setup FIS, interrupt.
    let (tfd, n) = t.issue(1, &h2d(ata::cmd::IDENTIFY, 0, 0), &[], &[512], false);
    assert_eq!((tfd, n), (0x50, 512));
    let id = t.buf(512);
    assert_eq!(
        u16::from_le_bytes([id[200], id[201]]),
        2048,
        "sectors (LBA48 words)"
    );
    assert_ne!(t.r(t.port(1, px::IS)) & px::IS_PSS, 0);
    assert_eq!(t.r(hba::IS), 0b10);
    assert!(t.line.load(Ordering::SeqCst), "INTx while MSI is off");
    t.w(t.port(1, px::IS), 0xffff_ffff);
    t.w(hba::IS, 0b10);
    assert!(!t.line.load(Ordering::SeqCst));

    // READ DMA EXT of sector 1 over two scatter entries.
    let (tfd, n) = t.issue(
        1,
        &h2d(ata::cmd::READ_DMA_EXT, 1, 1),
        &[],
        &[256, 256],
        false,
    );
    assert_eq!((tfd, n), (0x50, 512));
    assert_eq!(&t.buf(4), b"SECT");
    // WRITE DMA EXT of sector 5 lands in the file.
    t.mem.write_slice(&[0xab; 512], GuestAddress(BUF)).unwrap();
    let (tfd, _) = t.issue(1, &h2d(ata::cmd::WRITE_DMA_EXT, 5, 1), &[], &[512], true);
    assert_eq!(tfd, 0x50);
    let (tfd, _) = t.issue(1, &h2d(ata::cmd::FLUSH_CACHE_EXT, 0, 0), &[], &[], false);
    assert_eq!(tfd, 0x50);
    assert_eq!(
        std::fs::read(&t.disk).unwrap()[5 * 512..6 * 512],
        [0xab; 512]
    );
    // Past the end, and an unknown command: aborted with the error in the task file.
    let (tfd, _) = t.issue(
        1,
        &h2d(ata::cmd::READ_DMA_EXT, 2047, 2),
        &[],
        &[1024],
        false,
    );
    assert_eq!(tfd & 0xff, 0x41);
    assert_ne!(t.r(t.port(1, px::IS)) & px::IS_TFES, 0);
    let (tfd, _) = t.issue(1, &h2d(0x99, 0, 0), &[], &[], false);
    assert_eq!(tfd, u32::from(ABRT) << 8 | 0x41);

    // The CD: IDENTIFY is aborted, IDENTIFY PACKET answers, READ(10) of block 17.
    let (tfd, _) = t.issue(0, &h2d(ata::cmd::IDENTIFY, 0, 0), &[], &[512], false);
    assert_eq!(tfd & 1, 1);
    let (tfd, _) = t.issue(0, &h2d(ata::cmd::IDENTIFY_PACKET, 0, 0), &[], &[512], false);
    assert_eq!(tfd, 0x50);
    let packet = h2d(ata::cmd::PACKET, 0, 0);
    let (tfd, n) = t.issue(0, &packet, &[0x28, 0, 0, 0, 0, 17, 0, 0, 1], &[2048], false);
    assert_eq!((tfd, n), (0x50, 2048));
    assert_eq!(&t.buf(4), b"BOOT");
    // The host ejects: the next TEST UNIT READY fails with NOT READY in the error register.
    match t.ahci.drive_mut(0) {
        Some(Drive::Cdrom(c)) => c.change(None).unwrap(),
        _ => panic!("port 0 is the CD-ROM"),
    }
    let (tfd, _) = t.issue(0, &packet, &[0], &[], false);
    assert_eq!(tfd, 0x20 << 8 | 0x41);
    assert_eq!(t.ahci.cdrom_media(0), None);
}

#[test]
fn msi_replaces_intx_and_bad_guest_addresses_only_fail_the_command() {
    let mut t = rig();
    let cap = {
        let mut p = t
            .ahci
            .config()
            .u16(crate::devices::pci::config::reg::CAPABILITIES) as usize
            & 0xff;
        loop {
            let mut c = [0u8; 2];
            t.ahci.config().read(p, &mut c);
            if c[0] == crate::devices::pci::msi::CAP_ID {
                break p;
            }
            p = c[1] as usize;
            assert_ne!(p, 0, "no MSI capability");
        }
    };
    t.ahci.write_config(cap + 4, &0xfee0_0000u32.to_le_bytes());
    t.ahci.write_config(cap + 12, &0x41u16.to_le_bytes());
    t.ahci.write_config(cap + 2, &1u16.to_le_bytes());
    t.w(hba::GHC, hba::GHC_IE);
    t.start(1);
    let (tfd, _) = t.issue(1, &h2d(ata::cmd::IDENTIFY, 0, 0), &[], &[512], false);
    assert_eq!(tfd, 0x50);
    assert_eq!(*lock(&t.sent), vec![(0xfee0_0000, 0x41)]);
    assert!(!t.line.load(Ordering::SeqCst));
    // A scatter entry beyond guest memory: the command fails, the controller goes on.
    let clb = CLB + 0x400;
    t.mem.write_obj(5u32 | 1 << 16, GuestAddress(clb)).unwrap();
    t.mem
        .write_obj(0xffff_0000u32, GuestAddress(CTBA + 0x80))
        .unwrap();
    t.w(t.port(1, px::CI), 1);
    assert_eq!(t.r(t.port(1, px::TFD)) & 1, 1);
    // A command table beyond guest memory, likewise.
    t.mem
        .write_obj(0xfff0_0000u32, GuestAddress(clb + 8))
        .unwrap();
    t.w(t.port(1, px::CI), 1);
    assert_eq!(t.r(t.port(1, px::TFD)) & 1, 1);
    assert_eq!(t.r(t.port(1, px::CI)), 0);
    // Stopping the engine drops issued commands; COMRESET brings the signature back.
    t.w(t.port(1, px::CMD), 0);
    t.w(t.port(1, px::CI), 1);
    assert_eq!(t.r(t.port(1, px::CI)), 1, "not run while stopped");
    t.w(t.port(1, px::CMD), px::CMD_FRE);
    t.w(t.port(1, px::SCTL), 1);
    assert_eq!(t.r(t.port(1, px::SSTS)) & 0xf, 0);
    t.w(t.port(1, px::SCTL), 0);
    assert_eq!(t.r(t.port(1, px::SSTS)) & 0xf, 3);
    assert_eq!(t.r(t.port(1, px::TFD)), 0x50);
    // Unaligned and narrow register accesses are ignored.
    t.ahci.write_bar(ABAR, 0x102, &[1, 2]);
    let mut b = [0u8; 2];
    t.ahci.read_bar(ABAR, 0, &mut b);
    assert_eq!(b, [0, 0]);
}

#[test]
fn a_sata_disk_on_a_vhost_user_backend_reads_writes_flushes_and_survives_a_handover() {
    use blockrepl::store::FileStore;
    let sock = std::env::temp_dir().join(format!("enspeed-ahci-vhost-{}.sock", std::process::id()));
    let mut server = None;
    let mut t = rig_with(4 << 20, |disk| {
        let store = Arc::new(FileStore::open(disk, false).unwrap());
        let s = blockrepl::vhost_blk::spawn(&sock, store).unwrap();
        let d = AtaDisk::vhost_user(s.socket(), false).unwrap();
        server = Some(s);
        d
    });
    t.w(hba::GHC, hba::GHC_IE);
    t.start(1);
    let (tfd, n) = t.issue(1, &h2d(ata::cmd::IDENTIFY, 0, 0), &[], &[512], false);
    assert_eq!((tfd, n), (0x50, 512));
    let id = t.buf(512);
    assert_eq!(
        u16::from_le_bytes([id[200], id[201]]),
        8192,
        "the backend's size"
    );
    let (tfd, n) = t.issue(1, &h2d(ata::cmd::READ_DMA_EXT, 1, 1), &[], &[512], false);
    assert_eq!((tfd, n), (0x50, 512));
    assert_eq!(&t.buf(4), b"SECT");

    // 2 MiB and a sector: more than one request to the backend takes.
    let len = (2 << 20) + 512;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    t.mem.write_slice(&data, GuestAddress(BUF)).unwrap();
    let count = (len / 512) as u16;
    let (tfd, n) = t.issue(
        1,
        &h2d(ata::cmd::WRITE_DMA_EXT, 10, count),
        &[],
        &[len as u32],
        true,
    );
    assert_eq!((tfd, n as usize), (0x50, len));
    let (tfd, _) = t.issue(1, &h2d(ata::cmd::FLUSH_CACHE_EXT, 0, 0), &[], &[], false);
    assert_eq!(tfd, 0x50);
    assert_eq!(
        std::fs::read(&t.disk).unwrap()[10 * 512..10 * 512 + len],
        data[..]
    );
    t.mem
        .write_slice(&vec![0u8; len], GuestAddress(BUF))
        .unwrap();
    let (tfd, n) = t.issue(
        1,
        &h2d(ata::cmd::READ_DMA_EXT, 10, count),
        &[],
        &[len as u32],
        false,
    );
    assert_eq!((tfd, n as usize), (0x50, len));
    assert_eq!(t.buf(len), data);

    // A live migration's handover lets the backend go; the next command connects again.
    t.ahci.hand_over();
    let (tfd, _) = t.issue(1, &h2d(ata::cmd::READ_DMA_EXT, 1, 1), &[], &[512], false);
    assert_eq!(tfd, 0x50);
    assert_eq!(&t.buf(4), b"SECT");

    // The backend gone: the command fails with an error in the task file; nothing panics.
    drop(server.take());
    let (tfd, _) = t.issue(1, &h2d(ata::cmd::READ_DMA_EXT, 1, 1), &[], &[512], false);
    assert_eq!(tfd & 0x41, 0x41, "error status: {tfd:#x}");
}
