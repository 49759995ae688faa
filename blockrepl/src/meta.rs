//! A replicated disk's durable metadata: identity, generation, role and
//! sync state.
//!
//! The metadata file holds two 4 KiB slots. An update goes to the slot the
//! current record is not in, carrying a sequence number one higher, and is
//! made durable (fdatasync) before the caller goes on. Reading takes the valid
//! slot with the highest sequence number; a slot whose magic or checksum is
//! wrong (a write cut by a crash) is ignored, so the record read after kill -9
//! is always one that was completely written: the newest, or the one before it
//! when the crash hit the newest mid-write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const SLOT: u64 = 4096;
const SLOT_MAGIC: &[u8; 8] = b"LSYMETA1";
/// magic(8) seq(8) len(4) crc(4)
const SLOT_HEADER: usize = 24;

/// What this copy of the disk does.
///
/// ```text
///   create -----------> Standalone ---- a backup connects and ----> Primary
///                        ^      ^       resync finishes               |
///               promote(g)      +--- raise(g): the backup is ---------+
///                        |           unreachable, go on alone
///   create --backup --> Backup <--------- demote (Primary or Standalone)
/// ```
///
/// Raising the generation (promotion, going on alone) is only done on a
/// caller's explicit request: the control plane makes it after a Raft commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serves the guest; every write is mirrored to the backup before it
    /// completes; writes stall while the backup is unreachable.
    Primary,
    /// Receives the primary's writes; serves no guest.
    Backup,
    /// Serves the guest alone, out of sync with any peer: changed regions are
    /// recorded in the bitmap, and resynced when a backup connects.
    Standalone,
}

impl Role {
    /// The role as the wire and the CLI name it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Standalone => "standalone",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the data on this copy is usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataState {
    /// Consistent: all of some generation's acknowledged writes.
    Consistent,
    /// A resync into this copy started and has not finished: its blocks mix
    /// two histories. `full` when that resync was a full sync.
    Inconsistent {
        /// Whether the interrupted resync was a full sync.
        full: bool,
    },
    /// A new backup that never received a sync.
    Empty,
}

impl std::fmt::Display for DataState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataState::Consistent => f.write_str("consistent"),
            DataState::Inconsistent { full: true } => f.write_str("inconsistent (full sync cut)"),
            DataState::Inconsistent { full: false } => f.write_str("inconsistent"),
            DataState::Empty => f.write_str("empty"),
        }
    }
}

/// The durable record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// The disk's name, the same on both servers.
    pub name: String,
    /// Identity (hex), the same on both copies; empty on a new backup.
    pub disk_id: String,
    /// Size in bytes.
    pub capacity: u64,
    /// Bytes per bitmap region.
    pub region_size: u64,
    /// Generation: raised by promotion and by going on alone.
    pub generation: u64,
    /// Role.
    pub role: Role,
    /// Data state.
    pub data: DataState,
    /// The generation since which the bitmap records changed regions (0: no
    /// peer was ever in sync with this copy).
    pub bitmap_base: u64,
    /// The backup's mirror address (host:port), on a primary.
    pub peer: Option<String>,
    /// The server at the other end, as its certificate names it: on a primary, its backup's;
    /// on a backup, the only primary it takes a link from. Any server of the cluster if none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_server: Option<u64>,
    /// The full sync under way (an id the primary drew when it began it): on a primary, the
    /// one its bitmap was set whole for, so that its clear bits are regions its backup holds;
    /// on a backup, the one it is being filled by. A cut full sync whose two sides name the
    /// same one resumes with the regions still owed instead of starting over.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fill: String,
    /// On a primary: its bitmap marks every region written since its data was all zeros (a
    /// new blank disk whose bits were never cleared), so a new backup, all zeros too, needs
    /// only those regions instead of a full sync. Cleared before any bit is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_zeros: bool,
}

/// Errors of the metadata file.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Reading or writing it failed.
    #[error("disk metadata {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Neither slot holds a complete record.
    #[error("disk metadata {0}: no valid record in either slot")]
    NoValidRecord(PathBuf),
    /// The record is too large for a slot.
    #[error("disk metadata record of {0} bytes does not fit a slot")]
    TooLarge(usize),
}

/// The metadata file and its current record.
pub struct MetaFile {
    path: PathBuf,
    file: File,
    seq: u64,
    meta: Meta,
}

impl MetaFile {
    /// Creates `path` (which must not exist) holding `meta`.
    pub fn create(path: &Path, meta: Meta) -> Result<MetaFile, MetaError> {
        let io_err = |source| MetaError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err)?;
        file.set_len(2 * SLOT).map_err(io_err)?;
        let mut mf = MetaFile {
            path: path.to_owned(),
            file,
            seq: 0,
            meta: meta.clone(),
        };
        mf.store(meta)?;
        Ok(mf)
    }

    /// Opens `path` and reads its newest complete record.
    pub fn open(path: &Path) -> Result<MetaFile, MetaError> {
        let io_err = |source| MetaError::Io {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        let mut best: Option<(u64, Meta)> = None;
        for slot in 0..2 {
            let mut buf = vec![0u8; SLOT as usize];
            match file.read_exact_at(&mut buf, slot * SLOT) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => continue,
                Err(e) => return Err(io_err(e)),
            }
            if let Some((seq, meta)) = decode_slot(&buf) {
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, meta));
                }
            }
        }
        let (seq, meta) = best.ok_or_else(|| MetaError::NoValidRecord(path.to_owned()))?;
        Ok(MetaFile {
            path: path.to_owned(),
            file,
            seq,
            meta,
        })
    }

    /// The current record.
    pub fn get(&self) -> &Meta {
        &self.meta
    }

    /// Makes `meta` the durable record; returns once it is on disk.
    pub fn store(&mut self, meta: Meta) -> Result<(), MetaError> {
        let seq = self.seq + 1;
        let slot = encode_slot(seq, &meta)?;
        let io_err = |source| MetaError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .write_all_at(&slot, (seq % 2) * SLOT)
            .map_err(io_err)?;
        self.file.sync_data().map_err(io_err)?;
        self.seq = seq;
        self.meta = meta;
        Ok(())
    }

    /// Changes the record with `f` and stores it.
    pub fn update(&mut self, f: impl FnOnce(&mut Meta)) -> Result<(), MetaError> {
        let mut m = self.meta.clone();
        f(&mut m);
        self.store(m)
    }
}

fn encode_slot(seq: u64, meta: &Meta) -> Result<Vec<u8>, MetaError> {
    let json = serde_json::to_vec(meta).expect("metadata serializes");
    if json.len() > SLOT as usize - SLOT_HEADER {
        return Err(MetaError::TooLarge(json.len()));
    }
    let mut slot = vec![0u8; SLOT as usize];
    slot[0..8].copy_from_slice(SLOT_MAGIC);
    slot[8..16].copy_from_slice(&seq.to_le_bytes());
    slot[16..20].copy_from_slice(&(json.len() as u32).to_le_bytes());
    slot[SLOT_HEADER..SLOT_HEADER + json.len()].copy_from_slice(&json);
    let crc = slot_crc(&slot, json.len());
    slot[20..24].copy_from_slice(&crc.to_le_bytes());
    Ok(slot)
}

fn slot_crc(slot: &[u8], len: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&slot[0..20]);
    h.update(&slot[SLOT_HEADER..SLOT_HEADER + len]);
    h.finalize()
}

fn decode_slot(slot: &[u8]) -> Option<(u64, Meta)> {
    if &slot[0..8] != SLOT_MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(slot[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(slot[16..20].try_into().ok()?) as usize;
    if len > slot.len() - SLOT_HEADER {
        return None;
    }
    let crc = u32::from_le_bytes(slot[20..24].try_into().ok()?);
    if slot_crc(slot, len) != crc {
        return None;
    }
    let meta = serde_json::from_slice(&slot[SLOT_HEADER..SLOT_HEADER + len]).ok()?;
    Some((seq, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(generation: u64) -> Meta {
        Meta {
            name: "d".into(),
            disk_id: "ab".into(),
            capacity: 1 << 20,
            region_size: 1 << 16,
            generation,
            role: Role::Primary,
            data: DataState::Consistent,
            bitmap_base: 0,
            peer: Some("10.0.0.2:7400".into()),
            peer_server: Some(2),
            fill: String::new(),
            from_zeros: false,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("blockrepl-meta-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("meta")
    }

    #[test]
    fn the_newest_record_survives_reopen() {
        let p = scratch("reopen");
        let mut mf = MetaFile::create(&p, sample(1)).unwrap();
        for g in 2..=5 {
            mf.update(|m| m.generation = g).unwrap();
        }
        assert_eq!(MetaFile::open(&p).unwrap().get().generation, 5);
    }

    #[test]
    fn a_torn_newest_slot_falls_back_to_the_previous_record() {
        let p = scratch("torn");
        let mut mf = MetaFile::create(&p, sample(1)).unwrap();
        mf.update(|m| m.generation = 2).unwrap();
        mf.update(|m| m.generation = 3).unwrap();
        // The record of generation 3 is in slot 1 (seq 3); tear it at every
        // length a crash could leave, and flip single bits.
        let good = std::fs::read(&p).unwrap();
        for cut in [0usize, 8, 20, 24, 40, 100] {
            let mut bytes = good.clone();
            let slot = 4096;
            let end = slot + 4096;
            for b in &mut bytes[slot + cut..end] {
                *b = 0;
            }
            if bytes == good {
                continue;
            }
            std::fs::write(&p, &bytes).unwrap();
            assert_eq!(
                MetaFile::open(&p).unwrap().get().generation,
                2,
                "cut at {cut}"
            );
        }
        for bit in [0usize, 70, 130, 190, 400] {
            let mut bytes = good.clone();
            bytes[4096 + bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&p, &bytes).unwrap();
            assert_eq!(MetaFile::open(&p).unwrap().get().generation, 2, "bit {bit}");
        }
    }

    #[test]
    fn no_valid_slot_is_an_error() {
        let p = scratch("empty");
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        assert!(matches!(
            MetaFile::open(&p),
            Err(MetaError::NoValidRecord(_))
        ));
    }
}
