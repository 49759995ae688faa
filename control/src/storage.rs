//! The Raft log, its hard state and the applied state machine, in one RocksDB database.
//!
//! Keys (one column family):
//!
//! ```text
//!   log/<index, 8 bytes BE>   Entry (protobuf)            appended with sync=true
//!   raft/hard_state           HardState (protobuf)        term/vote changes synced
//!   raft/log_base             SnapshotMetadata: index and term of the last entry compacted away
//!   apply/index               u64 BE: the last applied entry
//!   apply/conf_state          ConfState as of apply/index
//!   sm/<record>               the state machine's records, as of apply/index
//! ```
//!
//! The applied index, the conf state and the records it describes change in one WriteBatch, so
//! a restart never sees one without the others. Ordering keeps `applied <= commit <= last index`
//! on disk: an entry is applied only after the hard state that commits it was written, and
//! RocksDB recovers its write-ahead log as a prefix, so a later write never survives an earlier
//! one. State-machine batches are not fsync'd: they can be replayed from the synced log.
//!
//! A snapshot is the applied state itself: `snapshot()` reads the records at the applied index
//! from one RocksDB snapshot, so there is no separate snapshot file to keep in step.

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use rocksdb::{Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};

const LOG_PREFIX: &[u8] = b"log/";
const KEY_HARD_STATE: &[u8] = b"raft/hard_state";
const KEY_LOG_BASE: &[u8] = b"raft/log_base";
const KEY_APPLIED: &[u8] = b"apply/index";
const KEY_CONF_STATE: &[u8] = b"apply/conf_state";
const STATE_PREFIX: &[u8] = b"sm/";
/// The key just above every `sm/` key.
const STATE_END: &[u8] = b"sm0";
/// The first bytes of a snapshot's data.
const SNAPSHOT_MAGIC: &[u8; 8] = b"ESSNAP1\0";

/// What went wrong in the control plane's storage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// RocksDB failed.
    #[error("RocksDB at {path}: {source}")]
    Db {
        /// The database directory.
        path: PathBuf,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// A stored record does not decode.
    #[error("corrupt record {key} in {path}: {what}")]
    Corrupt {
        /// The database directory.
        path: PathBuf,
        /// The record's key.
        key: String,
        /// What is wrong with it.
        what: String,
    },
    /// A snapshot's data does not decode.
    #[error("malformed snapshot data: {0}")]
    BadSnapshot(String),
    /// Bootstrapping a database that already holds a Raft state.
    #[error("{0} already holds a Raft state")]
    AlreadyInitialized(PathBuf),
    /// A request that contradicts the log (compacting past what was applied, say).
    #[error("{0}")]
    Invalid(String),
}

/// A state-machine record change: `sm/<key>` set to the value, or deleted when `None`.
pub type RecordWrite = (Vec<u8>, Option<Vec<u8>>);

/// A state-machine record: key (without `sm/`) and value.
pub type Record = (Vec<u8>, Vec<u8>);

/// raft-rs's `Storage` over RocksDB, plus the writes the node makes in the order raft-rs needs.
pub struct RaftStore {
    db: DB,
    path: PathBuf,
    hard_state: HardState,
    /// Index and term of the last entry compacted away (or installed by a snapshot).
    log_base: (u64, u64),
    last_index: u64,
    applied: u64,
    conf_state: ConfState,
}

fn log_key(index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(LOG_PREFIX);
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

fn state_key(key: &[u8]) -> Vec<u8> {
    [STATE_PREFIX, key].concat()
}

fn other(e: Error) -> raft::Error {
    raft::Error::Store(RaftStorageError::Other(Box::new(e)))
}

impl RaftStore {
    /// Opens (or creates) the database in `path`.
    pub fn open(path: &Path) -> Result<RaftStore, Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, path).map_err(|source| Error::Db {
            path: path.into(),
            source,
        })?;
        let mut store = RaftStore {
            db,
            path: path.into(),
            hard_state: HardState::default(),
            log_base: (0, 0),
            last_index: 0,
            applied: 0,
            conf_state: ConfState::default(),
        };
        if let Some(hs) = store.get_proto::<HardState>(KEY_HARD_STATE)? {
            store.hard_state = hs;
        }
        if let Some(m) = store.get_proto::<SnapshotMetadata>(KEY_LOG_BASE)? {
            store.log_base = (m.index, m.term);
        }
        if let Some(cs) = store.get_proto::<ConfState>(KEY_CONF_STATE)? {
            store.conf_state = cs;
        }
        if let Some(v) = store.get(KEY_APPLIED)? {
            store.applied =
                decode_u64(&v).ok_or_else(|| store.corrupt(KEY_APPLIED, "not 8 bytes"))?;
        }
        store.last_index = store.log_base.0;
        let mut it = store
            .db
            .iterator(IteratorMode::From(&log_key(u64::MAX), Direction::Reverse));
        if let Some(item) = it.next() {
            let (k, _) = item.map_err(|e| store.db_err(e))?;
            if k.starts_with(LOG_PREFIX) && k.len() == 12 {
                store.last_index = decode_u64(&k[4..]).expect("8 bytes").max(store.log_base.0);
            }
        }
        drop(it);
        // Applied entries were committed by definition; a lower commit on disk would only mean
        // a lost unsynced commit write, which the write order rules out, but never start below.
        if store.hard_state.commit < store.applied {
            tracing::warn!(
                commit = store.hard_state.commit,
                applied = store.applied,
                "stored commit index below the applied index; raising it"
            );
            store.hard_state.commit = store.applied;
        }
        Ok(store)
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this store holds a Raft state (bootstrapped, or received from a leader).
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || self.last_index > 0 || self.hard_state.term > 0
    }

    /// Makes an empty store the first member of a new cluster: one voter, `id`, as if a snapshot
    /// at index 1, term 1, holding `records`, had been installed.
    pub fn bootstrap(&mut self, id: u64, records: &[Record]) -> Result<(), Error> {
        if self.is_initialized() {
            return Err(Error::AlreadyInitialized(self.path.clone()));
        }
        let mut meta = SnapshotMetadata {
            index: 1,
            term: 1,
            ..Default::default()
        };
        meta.set_conf_state(ConfState::from((vec![id], vec![])));
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        snap.data = encode_records(records).into();
        self.apply_snapshot(&snap)
    }

    /// The hard state as last written.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The conf state as of the applied index.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// The last applied index.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// The index of the last entry compacted away or installed by a snapshot.
    pub fn log_base(&self) -> u64 {
        self.log_base.0
    }

    /// The last index in the log.
    pub fn last(&self) -> u64 {
        self.last_index
    }

    /// Appends `entries` (overwriting any conflicting suffix) and records `hs`, in one batch,
    /// fsync'd when `sync`. Called before any message that depends on them is sent.
    pub fn append(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        sync: bool,
    ) -> Result<(), Error> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let mut new_last = self.last_index;
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            if first.index <= self.log_base.0 {
                return Err(Error::Invalid(format!(
                    "append at {} overwrites the compacted log (base {})",
                    first.index, self.log_base.0
                )));
            }
            if first.index > self.last_index + 1 {
                return Err(Error::Invalid(format!(
                    "append at {} leaves a gap after {}",
                    first.index, self.last_index
                )));
            }
            for e in entries {
                batch.put(log_key(e.index), e.write_to_bytes().expect("entry encodes"));
            }
            if last.index < self.last_index {
                batch.delete_range(log_key(last.index + 1), log_key(self.last_index + 1));
            }
            new_last = last.index;
        }
        let mut new_hs = self.hard_state.clone();
        if let Some(hs) = hs {
            new_hs = hs.clone();
            batch.put(
                KEY_HARD_STATE,
                new_hs.write_to_bytes().expect("hard state encodes"),
            );
        }
        self.write(batch, sync)?;
        self.last_index = new_last;
        self.hard_state = new_hs;
        Ok(())
    }

    /// Records a new commit index (from a `LightReady`); not fsync'd, as raft-rs allows.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), Error> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.append(&[], Some(&hs), false)
    }

    /// Applies entries up to `applied`: their record changes, the applied index and, if a conf
    /// change was among them, the new conf state, all in one batch.
    pub fn apply(
        &mut self,
        writes: &[RecordWrite],
        applied: u64,
        conf_state: Option<&ConfState>,
    ) -> Result<(), Error> {
        if applied > self.hard_state.commit {
            return Err(Error::Invalid(format!(
                "applying {applied} beyond the commit index {}",
                self.hard_state.commit
            )));
        }
        let mut batch = WriteBatch::default();
        for (k, v) in writes {
            match v {
                Some(v) => batch.put(state_key(k), v),
                None => batch.delete(state_key(k)),
            }
        }
        batch.put(KEY_APPLIED, applied.to_be_bytes());
        if let Some(cs) = conf_state {
            batch.put(
                KEY_CONF_STATE,
                cs.write_to_bytes().expect("conf state encodes"),
            );
        }
        self.write(batch, false)?;
        self.applied = applied;
        if let Some(cs) = conf_state {
            self.conf_state = cs.clone();
        }
        Ok(())
    }

    /// Installs a snapshot from the leader atomically: the records replace the state machine's,
    /// the log is emptied and starts after the snapshot, the applied index and conf state become
    /// the snapshot's. fsync'd.
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), Error> {
        let meta = snap.get_metadata();
        if meta.index < self.applied {
            return Err(Error::Invalid(format!(
                "snapshot at {} is older than the applied index {}",
                meta.index, self.applied
            )));
        }
        let records = decode_records(&snap.data)?;
        let mut batch = WriteBatch::default();
        batch.delete_range(log_key(0), log_key(u64::MAX));
        batch.delete(log_key(u64::MAX));
        batch.delete_range(STATE_PREFIX, STATE_END);
        for (k, v) in &records {
            batch.put(state_key(k), v);
        }
        let base = SnapshotMetadata {
            index: meta.index,
            term: meta.term,
            ..Default::default()
        };
        batch.put(
            KEY_LOG_BASE,
            base.write_to_bytes().expect("metadata encodes"),
        );
        batch.put(KEY_APPLIED, meta.index.to_be_bytes());
        batch.put(
            KEY_CONF_STATE,
            meta.get_conf_state()
                .write_to_bytes()
                .expect("conf state encodes"),
        );
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        batch.put(
            KEY_HARD_STATE,
            hs.write_to_bytes().expect("hard state encodes"),
        );
        self.write(batch, true)?;
        self.hard_state = hs;
        self.log_base = (meta.index, meta.term);
        self.last_index = meta.index;
        self.applied = meta.index;
        self.conf_state = meta.get_conf_state().clone();
        Ok(())
    }

    /// Discards the log up to and including `index`, which must have been applied. fsync'd.
    pub fn compact(&mut self, index: u64) -> Result<(), Error> {
        if index <= self.log_base.0 {
            return Ok(());
        }
        if index > self.applied {
            return Err(Error::Invalid(format!(
                "compacting to {index} beyond the applied index {}",
                self.applied
            )));
        }
        let term = self.entry(index)?.term;
        let base = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        batch.delete_range(log_key(self.log_base.0), log_key(index + 1));
        batch.put(
            KEY_LOG_BASE,
            base.write_to_bytes().expect("metadata encodes"),
        );
        self.write(batch, true)?;
        self.log_base = (index, term);
        Ok(())
    }

    /// Every state-machine record as of the applied index, key without the `sm/` prefix.
    pub fn records(&self) -> Result<Vec<Record>, Error> {
        self.records_from(&self.db.snapshot())
    }

    /// At most `limit` state-machine records whose keys start with `prefix`, from `start` on
    /// (keys without the `sm/` prefix), in key order.
    pub fn state_range(
        &self,
        prefix: &[u8],
        start: &[u8],
        limit: usize,
    ) -> Result<Vec<Record>, Error> {
        let from = state_key(start.max(prefix));
        let within = state_key(prefix);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&from, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            if !k.starts_with(&within) || out.len() >= limit {
                break;
            }
            out.push((k[STATE_PREFIX.len()..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn records_from(&self, snap: &rocksdb::Snapshot<'_>) -> Result<Vec<Record>, Error> {
        let mut out = Vec::new();
        for item in snap.iterator(IteratorMode::From(STATE_PREFIX, Direction::Forward)) {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            if !k.starts_with(STATE_PREFIX) {
                break;
            }
            out.push((k[STATE_PREFIX.len()..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// One stored entry.
    fn entry(&self, index: u64) -> Result<Entry, Error> {
        let key = log_key(index);
        let v = self
            .get(&key)?
            .ok_or_else(|| self.corrupt(&key, "missing entry"))?;
        let e = Entry::parse_from_bytes(&v).map_err(|e| self.corrupt(&key, &e.to_string()))?;
        if e.index != index {
            return Err(self.corrupt(&key, &format!("holds entry {}", e.index)));
        }
        Ok(e)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo).map_err(|e| self.db_err(e))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.db.get(key).map_err(|e| self.db_err(e))
    }

    fn get_proto<M: protobuf::Message>(&self, key: &[u8]) -> Result<Option<M>, Error> {
        match self.get(key)? {
            None => Ok(None),
            Some(v) => M::parse_from_bytes(&v)
                .map(Some)
                .map_err(|e| self.corrupt(key, &e.to_string())),
        }
    }

    fn db_err(&self, source: rocksdb::Error) -> Error {
        Error::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, key: &[u8], what: &str) -> Error {
        Error::Corrupt {
            path: self.path.clone(),
            key: String::from_utf8_lossy(key).into_owned(),
            what: what.into(),
        }
    }
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.log_base.0 {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > self.last_index + 1 || low > high {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let max_size = max_size.into();
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        let it = self
            .db
            .iterator(IteratorMode::From(&log_key(low), Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(|e| other(self.db_err(e)))?;
            let expected = low + out.len() as u64;
            if expected >= high {
                break;
            }
            if *k != log_key(expected) {
                return Err(other(self.corrupt(&log_key(expected), "missing entry")));
            }
            let e =
                Entry::parse_from_bytes(&v).map_err(|e| other(self.corrupt(&k, &e.to_string())))?;
            size += u64::from(e.compute_size());
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(e);
        }
        if out.is_empty() && low < high {
            return Err(other(self.corrupt(&log_key(low), "missing entry")));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.log_base.0 {
            return Ok(self.log_base.1);
        }
        if idx < self.log_base.0 {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        self.entry(idx).map(|e| e.term).map_err(other)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.log_base.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let db_snap = self.db.snapshot();
        let applied = self.applied;
        if applied < request_index {
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let records = self.records_from(&db_snap).map_err(other)?;
        let mut meta = SnapshotMetadata {
            index: applied,
            term: self.term(applied)?,
            ..Default::default()
        };
        meta.set_conf_state(self.conf_state.clone());
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        snap.data = encode_records(&records).into();
        tracing::info!(
            index = applied,
            to,
            records = records.len(),
            bytes = snap.data.len(),
            "snapshot for a lagging server"
        );
        Ok(snap)
    }
}

fn decode_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Snapshot data: the magic, a record count, then (u32 BE length, key, u32 BE length, value)
/// per record.
pub fn encode_records(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        16 + records
            .iter()
            .map(|(k, v)| 8 + k.len() + v.len())
            .sum::<usize>(),
    );
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&(records.len() as u64).to_be_bytes());
    for (k, v) in records {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// Decodes snapshot data, rejecting anything malformed rather than installing part of it.
pub fn decode_records(data: &[u8]) -> Result<Vec<Record>, Error> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], Error> {
        if data.len() < n {
            return Err(Error::BadSnapshot(format!(
                "truncated: {n} bytes wanted, {} left",
                data.len()
            )));
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Ok(head)
    }
    let mut d = data;
    if take(&mut d, 8)? != SNAPSHOT_MAGIC {
        return Err(Error::BadSnapshot("bad magic".into()));
    }
    let count = decode_u64(take(&mut d, 8)?).expect("8 bytes");
    // Every record takes at least 8 bytes: a count beyond that is a lie, not an allocation.
    if count > (d.len() / 8) as u64 {
        return Err(Error::BadSnapshot(format!(
            "{count} records in {} bytes",
            d.len()
        )));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let klen = u32::from_be_bytes(take(&mut d, 4)?.try_into().expect("4 bytes")) as usize;
        let k = take(&mut d, klen)?.to_vec();
        let vlen = u32::from_be_bytes(take(&mut d, 4)?.try_into().expect("4 bytes")) as usize;
        let v = take(&mut d, vlen)?.to_vec();
        out.push((k, v));
    }
    if !d.is_empty() {
        return Err(Error::BadSnapshot(format!("{} trailing bytes", d.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p =
                std::env::temp_dir().join(format!("enspeed-control-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn entry(index: u64, term: u64, data: &str) -> Entry {
        Entry {
            index,
            term,
            data: data.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    fn invariant(s: &RaftStore) {
        assert!(
            s.applied() <= s.hard_state().commit,
            "applied {} > commit {}",
            s.applied(),
            s.hard_state().commit
        );
        assert!(
            s.hard_state().commit <= s.last(),
            "commit {} > last {}",
            s.hard_state().commit,
            s.last()
        );
    }

    #[test]
    fn a_range_of_records_is_read_in_key_order_within_its_prefix() {
        let dir = TempDir::new("range");
        let mut s = RaftStore::open(&dir.0).unwrap();
        s.bootstrap(1, &[(b"kv/a".to_vec(), b"1".to_vec())])
            .unwrap();
        s.append(&[entry(2, 2, "e2")], Some(&hs(2, 1, 2)), true)
            .unwrap();
        let writes: Vec<RecordWrite> = (1..=5u64)
            .map(|i| {
                (
                    format!("archive/audit/{i:020}").into_bytes(),
                    Some(vec![b'0' + i as u8]),
                )
            })
            .chain([(b"audit/x".to_vec(), Some(b"kept".to_vec()))])
            .collect();
        s.apply(&writes, 2, None).unwrap();
        let read = |start: &str, limit| {
            s.state_range(b"archive/audit/", start.as_bytes(), limit)
                .unwrap()
                .into_iter()
                .map(|(_, v)| v[0] - b'0')
                .collect::<Vec<_>>()
        };
        assert_eq!(read("", 100), [1, 2, 3, 4, 5]);
        assert_eq!(read(&format!("archive/audit/{:020}", 3), 2), [3, 4]);
        assert_eq!(
            read(&format!("archive/audit/{:020}", 9), 10),
            Vec::<u8>::new()
        );
        assert!(s
            .state_range(b"kv/", b"", 10)
            .unwrap()
            .iter()
            .all(|(k, _)| k.starts_with(b"kv/")));
    }

    #[test]
    fn entries_hard_state_and_applied_state_survive_a_restart() {
        let dir = TempDir::new("restart");
        {
            let mut s = RaftStore::open(&dir.0).unwrap();
            assert!(!s.is_initialized());
            s.bootstrap(1, &[(b"kv/a".to_vec(), b"1".to_vec())])
                .unwrap();
            assert!(s.bootstrap(1, &[]).is_err());
            let ents: Vec<_> = (2..=6).map(|i| entry(i, 2, &format!("e{i}"))).collect();
            s.append(&ents, Some(&hs(2, 1, 4)), true).unwrap();
            s.apply(
                &[
                    (b"kv/b".to_vec(), Some(b"2".to_vec())),
                    (b"kv/a".to_vec(), None),
                ],
                3,
                None,
            )
            .unwrap();
            assert!(
                s.apply(&[], 5, None).is_err(),
                "cannot apply past the commit index"
            );
            invariant(&s);
        }
        let s = RaftStore::open(&dir.0).unwrap();
        assert!(s.is_initialized());
        assert_eq!(
            (
                s.hard_state().term,
                s.hard_state().vote,
                s.hard_state().commit
            ),
            (2, 1, 4)
        );
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (2, 6));
        assert_eq!(s.applied(), 3);
        assert_eq!(s.conf_state().voters, vec![1]);
        assert_eq!(s.term(1).unwrap(), 1);
        assert_eq!(s.term(4).unwrap(), 2);
        assert_eq!(
            s.term(0),
            Err(raft::Error::Store(RaftStorageError::Compacted))
        );
        assert_eq!(
            s.term(7),
            Err(raft::Error::Store(RaftStorageError::Unavailable))
        );
        let got = s
            .entries(2, 7, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(
            got.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![2, 3, 4, 5, 6]
        );
        assert_eq!(&got[3].data[..], b"e5");
        assert_eq!(
            s.records().unwrap(),
            vec![(b"kv/b".to_vec(), b"2".to_vec())]
        );
        let rs = s.initial_state().unwrap();
        assert_eq!(rs.hard_state.commit, 4);
        assert_eq!(rs.conf_state.voters, vec![1]);
        invariant(&s);
    }

    #[test]
    fn a_conflicting_append_truncates_the_suffix() {
        let dir = TempDir::new("conflict");
        let mut s = RaftStore::open(&dir.0).unwrap();
        s.bootstrap(1, &[]).unwrap();
        s.append(
            &(2..=8).map(|i| entry(i, 2, "old")).collect::<Vec<_>>(),
            None,
            true,
        )
        .unwrap();
        s.append(&[entry(5, 3, "new"), entry(6, 3, "new")], None, true)
            .unwrap();
        assert_eq!(s.last(), 6);
        assert!(s.append(&[entry(9, 3, "gap")], None, true).is_err());
        drop(s);
        let s = RaftStore::open(&dir.0).unwrap();
        assert_eq!(s.last_index().unwrap(), 6);
        assert_eq!(s.term(5).unwrap(), 3);
        assert_eq!(s.term(4).unwrap(), 2);
        assert!(s
            .entries(7, 8, None, GetEntriesContext::empty(false))
            .is_err());
    }

    #[test]
    fn entries_honour_max_size_but_return_at_least_one() {
        let dir = TempDir::new("maxsize");
        let mut s = RaftStore::open(&dir.0).unwrap();
        s.bootstrap(1, &[]).unwrap();
        s.append(
            &(2..=11)
                .map(|i| entry(i, 1, "0123456789"))
                .collect::<Vec<_>>(),
            None,
            true,
        )
        .unwrap();
        assert_eq!(
            s.entries(2, 12, Some(0), GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            1
        );
        let one = u64::from(entry(2, 1, "0123456789").compute_size());
        assert_eq!(
            s.entries(2, 12, Some(3 * one), GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn compaction_and_snapshots_survive_a_restart() {
        let dir = TempDir::new("compact");
        let dir2 = TempDir::new("compact-follower");
        let snap;
        {
            let mut s = RaftStore::open(&dir.0).unwrap();
            s.bootstrap(7, &[]).unwrap();
            s.append(
                &(2..=10).map(|i| entry(i, 3, "x")).collect::<Vec<_>>(),
                Some(&hs(3, 7, 10)),
                true,
            )
            .unwrap();
            s.apply(&[(b"kv/k".to_vec(), Some(b"v".to_vec()))], 8, None)
                .unwrap();
            assert!(s.compact(9).is_err(), "cannot compact what is not applied");
            s.compact(8).unwrap();
            snap = s.snapshot(0, 2).unwrap();
            assert!(s.snapshot(9, 2).is_err());
        }
        let s = RaftStore::open(&dir.0).unwrap();
        assert_eq!(s.first_index().unwrap(), 9);
        assert_eq!(s.term(8).unwrap(), 3);
        assert_eq!(
            s.entries(8, 9, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(RaftStorageError::Compacted))
        );
        assert_eq!(
            s.entries(9, 11, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            2
        );
        invariant(&s);

        assert_eq!(snap.get_metadata().index, 8);
        assert_eq!(snap.get_metadata().term, 3);
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![7]);
        {
            let mut f = RaftStore::open(&dir2.0).unwrap();
            f.append(&[entry(1, 1, "stale")], Some(&hs(1, 0, 0)), true)
                .unwrap();
            f.apply_snapshot(&snap).unwrap();
        }
        let f = RaftStore::open(&dir2.0).unwrap();
        assert_eq!(
            (
                f.first_index().unwrap(),
                f.last_index().unwrap(),
                f.applied()
            ),
            (9, 8, 8)
        );
        assert_eq!(f.hard_state().commit, 8);
        assert_eq!(f.hard_state().term, 3);
        assert_eq!(f.term(8).unwrap(), 3);
        assert_eq!(f.conf_state().voters, vec![7]);
        assert_eq!(
            f.records().unwrap(),
            vec![(b"kv/k".to_vec(), b"v".to_vec())]
        );
        invariant(&f);
    }

    #[test]
    fn snapshot_data_round_trips_and_garbage_is_rejected() {
        let recs = vec![
            (b"a".to_vec(), b"".to_vec()),
            (b"server/1".to_vec(), b"{}".to_vec()),
        ];
        let data = encode_records(&recs);
        assert_eq!(decode_records(&data).unwrap(), recs);
        for cut in 0..data.len() {
            assert!(decode_records(&data[..cut]).is_err(), "truncated at {cut}");
        }
        let mut extra = data.clone();
        extra.push(0);
        assert!(decode_records(&extra).is_err());
        let mut huge = SNAPSHOT_MAGIC.to_vec();
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(decode_records(&huge).is_err());
        assert!(decode_records(b"not a snapshot at all").is_err());
    }
}
