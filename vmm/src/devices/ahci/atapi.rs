//! The CD-ROM drive: SCSI multimedia commands (MMC) carried in ATAPI
//! packets, over an ISO image that can be changed, ejected by the host or by
//! the guest, and locked by the guest. What firmware (El Torito boot), boot
//! loaders and every installer's CD driver send is answered; anything else
//! ends in ILLEGAL REQUEST, never a panic.
//!
//! Media state, as the guest sees it:
//!
//! ```text
//!   empty --insert--> present (UNIT ATTENTION once, event "new media")
//!   present --eject (host, or START STOP UNIT unless locked)--> empty (event "removal")
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Block size of CD media.
pub const BLOCK: u64 = 2048;
/// Largest read in one command (what one AHCI command can carry is less).
const MAX_READ_BLOCKS: u64 = 65_535;

/// SCSI sense: key, additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Its qualifier.
    pub ascq: u8,
}

impl Sense {
    const NONE: Sense = Sense::new(0, 0, 0);
    const NOT_PRESENT: Sense = Sense::new(2, 0x3a, 0);
    const CHANGED: Sense = Sense::new(6, 0x28, 0);
    const BAD_OPCODE: Sense = Sense::new(5, 0x20, 0);
    const BAD_FIELD: Sense = Sense::new(5, 0x24, 0);
    const OUT_OF_RANGE: Sense = Sense::new(5, 0x21, 0);
    const REMOVAL_PREVENTED: Sense = Sense::new(5, 0x53, 2);
    const READ_ERROR: Sense = Sense::new(3, 0x11, 0);

    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }
}

mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const SEEK_10: u8 = 0x2b;
    pub const READ_SUBCHANNEL: u8 = 0x42;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS: u8 = 0x4a;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_12: u8 = 0xa8;
    pub const SET_CD_SPEED: u8 = 0xbb;
    pub const MECHANISM_STATUS: u8 = 0xbd;
}

/// A media event the guest has not polled yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MediaEvent {
    New,
    Removal,
}

struct Media {
    file: File,
    path: PathBuf,
    blocks: u64,
}

/// The drive's state as a live migration carries it (the media stays the target's own).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CdromSnapshot {
    /// Whether media was in the drive.
    pub media: bool,
    /// The sense data: key, additional sense code, qualifier.
    pub sense: [u8; 3],
    /// The guest is still to be told the media changed.
    pub unit_attention: bool,
    /// A media event not polled yet: 1 new media, 2 removal.
    pub event: u8,
    /// The guest locked the tray.
    pub locked: bool,
}

/// The drive.
pub struct Cdrom {
    media: Option<Media>,
    sense: Sense,
    /// The guest is told once that the media changed.
    unit_attention: bool,
    event: Option<MediaEvent>,
    locked: bool,
}

/// Errors inserting media.
#[derive(Debug, thiserror::Error)]
#[error("cannot open CD-ROM image {path}: {err}")]
pub struct MediaError {
    path: PathBuf,
    err: std::io::Error,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// An LBA as minutes, seconds, frames (75 frames a second, 2 s pregap).
fn msf(lba: u64) -> [u8; 4] {
    let f = lba + 150;
    [
        0,
        (f / (75 * 60)) as u8,
        (f / 75 % 60) as u8,
        (f % 75) as u8,
    ]
}

impl Cdrom {
    /// A drive with `path` in it, or empty.
    pub fn new(path: Option<&Path>) -> Result<Cdrom, MediaError> {
        let mut c = Cdrom {
            media: None,
            sense: Sense::NONE,
            unit_attention: false,
            event: None,
            locked: false,
        };
        if let Some(p) = path {
            c.media = Some(Self::open(p)?);
        }
        Ok(c)
    }

    fn open(path: &Path) -> Result<Media, MediaError> {
        let (file, len) = crate::devices::open_image(path, true).map_err(|err| MediaError {
            path: path.into(),
            err,
        })?;
        let blocks = len / BLOCK;
        Ok(Media {
            file,
            path: path.into(),
            blocks,
        })
    }

    /// The image in the drive.
    pub fn media(&self) -> Option<&Path> {
        self.media.as_ref().map(|m| m.path.as_path())
    }

    /// The host puts `path` in the drive, or ejects with `None`. The host
    /// overrides the guest's lock, as a VM's owner may always change media.
    pub fn change(&mut self, path: Option<&Path>) -> Result<(), MediaError> {
        match path {
            Some(p) => {
                self.media = Some(Self::open(p)?);
                self.unit_attention = true;
                self.event = Some(MediaEvent::New);
            }
            None => {
                self.media = None;
                self.event = Some(MediaEvent::Removal);
            }
        }
        Ok(())
    }

    /// The drive's state, for a live migration.
    pub fn snapshot(&self) -> CdromSnapshot {
        CdromSnapshot {
            media: self.media.is_some(),
            sense: [self.sense.key, self.sense.asc, self.sense.ascq],
            unit_attention: self.unit_attention,
            event: match self.event {
                None => 0,
                Some(MediaEvent::New) => 1,
                Some(MediaEvent::Removal) => 2,
            },
            locked: self.locked,
        }
    }

    /// Takes a migrated drive's state; media the source's drive no longer held is ejected
    /// here too (media is never opened from a path in the stream). Media the source held and
    /// this side lacks (its server has no copy of the image yet) reads as removed: the guest is
    /// told, as when the host ejects it.
    pub fn restore(&mut self, snap: &CdromSnapshot) {
        if !snap.media {
            self.media = None;
        }
        let [key, asc, ascq] = snap.sense;
        self.sense = Sense::new(key, asc, ascq);
        self.unit_attention = snap.unit_attention;
        self.event = match snap.event {
            1 => Some(MediaEvent::New),
            2 => Some(MediaEvent::Removal),
            _ => None,
        };
        self.locked = snap.locked;
        if snap.media && self.media.is_none() {
            self.event = Some(MediaEvent::Removal);
        }
    }

    /// The sense key the ATA error register carries after a failed packet.
    pub fn sense_key(&self) -> u8 {
        self.sense.key
    }

    /// Runs the packet `cdb`; returns the data for the guest, or the sense
    /// of its failure (also kept for REQUEST SENSE).
    pub fn packet(&mut self, cdb: &[u8; 16]) -> Result<Vec<u8>, Sense> {
        let r = self.run(cdb);
        match &r {
            Ok(_) if cdb[0] != op::REQUEST_SENSE => self.sense = Sense::NONE,
            Ok(_) => {}
            Err(s) => self.sense = *s,
        }
        r
    }

    fn ready(&mut self) -> Result<&Media, Sense> {
        if self.unit_attention {
            self.unit_attention = false;
            return Err(Sense::CHANGED);
        }
        self.media.as_ref().ok_or(Sense::NOT_PRESENT)
    }

    fn run(&mut self, cdb: &[u8; 16]) -> Result<Vec<u8>, Sense> {
        let mut out = match cdb[0] {
            op::TEST_UNIT_READY => self.ready().map(|_| Vec::new())?,
            op::REQUEST_SENSE => {
                let s = std::mem::replace(&mut self.sense, Sense::NONE);
                let mut d = vec![0u8; 18];
                d[0] = 0x70;
                d[2] = s.key;
                d[7] = 10;
                d[12] = s.asc;
                d[13] = s.ascq;
                d.truncate(usize::from(cdb[4]));
                return Ok(d);
            }
            op::INQUIRY => {
                let mut d = vec![0u8; 36];
                d[0] = 0x05; // CD/DVD
                d[1] = 0x80; // removable
                d[2] = 0x05;
                d[3] = 0x32;
                d[4] = 31;
                d[8..16].copy_from_slice(b"EnSpeed ");
                d[16..32].copy_from_slice(b"CD-ROM          ");
                d[32..36].copy_from_slice(b"1.0 ");
                d.truncate(usize::from(be16(&cdb[3..5])));
                return Ok(d);
            }
            op::START_STOP_UNIT => {
                let (load_eject, start) = (cdb[4] & 2 != 0, cdb[4] & 1 != 0);
                if load_eject && !start {
                    if self.locked {
                        return Err(Sense::REMOVAL_PREVENTED);
                    }
                    if self.media.take().is_some() {
                        tracing::info!("the guest ejected the CD-ROM");
                        self.event = Some(MediaEvent::Removal);
                    }
                }
                Vec::new()
            }
            op::PREVENT_ALLOW => {
                self.locked = cdb[4] & 1 != 0;
                Vec::new()
            }
            op::READ_CAPACITY => {
                let m = self.ready()?;
                let last = m.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
                let mut d = last.to_be_bytes().to_vec();
                d.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                d
            }
            op::READ_10 | op::READ_12 => {
                let lba = u64::from(be32(&cdb[2..6]));
                let count = if cdb[0] == op::READ_10 {
                    u64::from(be16(&cdb[7..9]))
                } else {
                    u64::from(be32(&cdb[6..10]))
                };
                return self.read(lba, count);
            }
            op::SEEK_10 | op::SET_CD_SPEED => Vec::new(),
            op::READ_TOC => {
                let m = self.ready()?;
                let (time, format) = (cdb[1] & 2 != 0, cdb[2] & 0xf);
                let addr = |lba: u64| {
                    if time {
                        msf(lba)
                    } else {
                        (lba as u32).to_be_bytes()
                    }
                };
                let mut d = vec![0, 0, 1, 1];
                match format {
                    0 => {
                        d.extend_from_slice(&[0, 0x14, 1, 0]);
                        d.extend_from_slice(&addr(0));
                        d.extend_from_slice(&[0, 0x14, 0xaa, 0]);
                        d.extend_from_slice(&addr(m.blocks));
                    }
                    1 => {
                        d.extend_from_slice(&[0, 0x14, 1, 0]);
                        d.extend_from_slice(&addr(0));
                    }
                    _ => return Err(Sense::BAD_FIELD),
                }
                let len = (d.len() - 2) as u16;
                d[..2].copy_from_slice(&len.to_be_bytes());
                d.truncate(usize::from(be16(&cdb[7..9])));
                return Ok(d);
            }
            op::READ_SUBCHANNEL => vec![0, 0, 0, 0],
            op::GET_CONFIGURATION => {
                // Profiles: DVD-ROM for images larger than a CD, else CD-ROM.
                let current: u16 = match &self.media {
                    Some(m) if m.blocks * BLOCK > 900 << 20 => 0x0010,
                    Some(_) => 0x0008,
                    None => 0,
                };
                let mut d = vec![0u8; 8];
                d[6..8].copy_from_slice(&current.to_be_bytes());
                // Feature 0: the profile list.
                d.extend_from_slice(&[0, 0, 0x03, 8]);
                for p in [0x0010u16, 0x0008] {
                    d.extend_from_slice(&p.to_be_bytes());
                    d.extend_from_slice(&[u8::from(p == current), 0]);
                }
                let len = (d.len() - 4) as u32;
                d[..4].copy_from_slice(&len.to_be_bytes());
                d
            }
            op::GET_EVENT_STATUS => {
                if cdb[1] & 1 == 0 {
                    // Only the polled form exists.
                    return Err(Sense::BAD_FIELD);
                }
                let mut d = vec![0, 6, 0x04, 0x10];
                let code = match self.event.take() {
                    Some(MediaEvent::New) => 2,
                    Some(MediaEvent::Removal) => 3,
                    None => 0,
                };
                let present = u8::from(self.media.is_some()) << 1;
                d.extend_from_slice(&[code, present, 0, 0]);
                d
            }
            op::READ_DISC_INFORMATION => {
                self.ready()?;
                let mut d = vec![0u8; 34];
                d[1] = 32;
                d[2] = 0x0e; // complete disc, last session complete
                d[3] = 1;
                d[4] = 1;
                d[5] = 1;
                d[6] = 1;
                d
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => {
                let page = cdb[2] & 0x3f;
                if page != 0x2a && page != 0x3f {
                    return Err(Sense::BAD_FIELD);
                }
                // The CD capabilities page: reads CD-R/RW, can lock and eject.
                let caps = [
                    0x2a,
                    0x14,
                    0x3b,
                    0,
                    0x71,
                    0x5f,
                    0x29 | (u8::from(self.locked) << 1),
                    0,
                    0x02,
                    0xc2,
                    0,
                    2,
                    2,
                    0,
                    0x02,
                    0xc2,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ];
                let mut d = if cdb[0] == op::MODE_SENSE_10 {
                    let mut h = vec![0u8; 8];
                    h[..2].copy_from_slice(&((6 + caps.len()) as u16).to_be_bytes());
                    h
                } else {
                    vec![(3 + caps.len()) as u8, 0, 0, 0]
                };
                d.extend_from_slice(&caps);
                d
            }
            op::MECHANISM_STATUS => vec![0, 0, 0, 0, 0, 1, 0, 0],
            _ => return Err(Sense::BAD_OPCODE),
        };
        // Commands that carry an allocation length at bytes 7-8 (10-byte CDBs) or 4 (6-byte).
        let alloc = match cdb[0] {
            op::MODE_SENSE_6 => usize::from(cdb[4]),
            op::GET_CONFIGURATION
            | op::GET_EVENT_STATUS
            | op::MODE_SENSE_10
            | op::READ_DISC_INFORMATION
            | op::READ_SUBCHANNEL => usize::from(be16(&cdb[7..9])),
            op::MECHANISM_STATUS => usize::from(be16(&cdb[8..10])),
            _ => out.len(),
        };
        out.truncate(alloc);
        Ok(out)
    }

    fn read(&mut self, lba: u64, count: u64) -> Result<Vec<u8>, Sense> {
        let m = self.ready()?;
        if count > MAX_READ_BLOCKS || lba.checked_add(count).is_none_or(|e| e > m.blocks) {
            return Err(Sense::OUT_OF_RANGE);
        }
        let mut buf = vec![0u8; (count * BLOCK) as usize];
        m.file.read_exact_at(&mut buf, lba * BLOCK).map_err(|e| {
            tracing::warn!(image = %m.path.display(), lba, error = %e, "CD-ROM read failed");
            Sense::READ_ERROR
        })?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdb(b: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..b.len()].copy_from_slice(b);
        c
    }

    #[test]
    fn media_reads_changes_and_ejects_as_the_guest_expects() {
        let dir = std::env::temp_dir().join(format!("enspeed-cd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let iso = dir.join("a.iso");
        let mut img = vec![0u8; 20 * BLOCK as usize];
        img[16 * BLOCK as usize + 1..16 * BLOCK as usize + 6].copy_from_slice(b"CD001");
        std::fs::write(&iso, &img).unwrap();

        let mut cd = Cdrom::new(None).unwrap();
        assert_eq!(cd.packet(&cdb(&[0])), Err(Sense::NOT_PRESENT));
        let sense = cd.packet(&cdb(&[3, 0, 0, 0, 18])).unwrap();
        assert_eq!((sense[2], sense[12]), (2, 0x3a));
        cd.change(Some(&iso)).unwrap();
        assert_eq!(
            cd.packet(&cdb(&[0])),
            Err(Sense::CHANGED),
            "unit attention once"
        );
        assert_eq!(cd.packet(&cdb(&[0])), Ok(vec![]));
        let ev = cd.packet(&cdb(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])).unwrap();
        assert_eq!((ev[4], ev[5]), (2, 2), "new media, present");
        let cap = cd.packet(&cdb(&[0x25])).unwrap();
        assert_eq!(cap, [0, 0, 0, 19, 0, 0, 8, 0]);
        let d = cd.packet(&cdb(&[0x28, 0, 0, 0, 0, 16, 0, 0, 1])).unwrap();
        assert_eq!(&d[1..6], b"CD001");
        assert_eq!(
            cd.packet(&cdb(&[0x28, 0, 0, 0, 0, 19, 0, 0, 2])),
            Err(Sense::OUT_OF_RANGE)
        );
        let toc = cd.packet(&cdb(&[0x43, 0, 0, 0, 0, 0, 0, 0, 20])).unwrap();
        assert_eq!(toc.len(), 20);
        assert_eq!(&toc[16..20], &20u32.to_be_bytes(), "lead-out at the end");
        let inq = cd.packet(&cdb(&[0x12, 0, 0, 0, 36])).unwrap();
        assert_eq!(inq[0], 5);
        assert_eq!(cd.packet(&cdb(&[0xff])), Err(Sense::BAD_OPCODE));
        // Locked: the guest cannot eject; unlocked it can, and the drive reports removal.
        cd.packet(&cdb(&[0x1e, 0, 0, 0, 1])).unwrap();
        assert_eq!(
            cd.packet(&cdb(&[0x1b, 0, 0, 0, 2])),
            Err(Sense::REMOVAL_PREVENTED)
        );
        cd.packet(&cdb(&[0x1e, 0, 0, 0, 0])).unwrap();
        cd.packet(&cdb(&[0x1b, 0, 0, 0, 2])).unwrap();
        assert_eq!(cd.media(), None);
        let ev = cd.packet(&cdb(&[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])).unwrap();
        assert_eq!((ev[4], ev[5]), (3, 0));
        // Short allocation lengths cut the data.
        assert_eq!(cd.packet(&cdb(&[0x12, 0, 0, 0, 5])).unwrap().len(), 5);
        assert_eq!(
            cd.packet(&cdb(&[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 4]))
                .unwrap()
                .len(),
            4
        );
        assert!(cd.change(Some(&dir.join("missing.iso"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
