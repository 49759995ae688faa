//! Where each record is stored: its key (`<kind>/<name>`, under `sm/` in RocksDB, see
//! `storage`) and its JSON value.
//!
//! `StateMachine::load` reads them back by the same kinds.

use serde::Serialize;

/// A key/value entry's key.
pub(super) fn kv_key(key: &str) -> Vec<u8> {
    format!("kv/{key}").into_bytes()
}

/// A member's record.
pub(super) fn server_key(id: u64) -> Vec<u8> {
    format!("server/{id:020}").into_bytes()
}

/// What a server's node agent last reported.
pub(super) fn observed_key(id: u64) -> Vec<u8> {
    format!("observed/{id:020}").into_bytes()
}

/// A disk's record.
pub(super) fn disk_key(name: &str) -> Vec<u8> {
    format!("disk/{name}").into_bytes()
}

/// A VM's record.
pub(super) fn vm_key(name: &str) -> Vec<u8> {
    format!("vm/{name}").into_bytes()
}

/// An ISO image's record.
pub(super) fn iso_key(name: &str) -> Vec<u8> {
    format!("iso/{name}").into_bytes()
}

/// An appliance's record.
pub(super) fn appliance_key(name: &str) -> Vec<u8> {
    format!("appliance/{name}").into_bytes()
}

/// A task's record.
pub(super) fn task_key(id: u64) -> Vec<u8> {
    format!("task/{id:020}").into_bytes()
}

/// A network's record.
pub(super) fn network_key(name: &str) -> Vec<u8> {
    format!("network/{name}").into_bytes()
}

/// A removed server's certificate, by its fingerprint.
pub(super) fn revoked_key(cert: &str) -> Vec<u8> {
    format!("revoked/{cert}").into_bytes()
}

/// A user's record.
pub(super) fn user_key(id: u64) -> Vec<u8> {
    format!("user/{id:020}").into_bytes()
}

/// A session's record, by its token hash.
pub(super) fn session_key(hash: &str) -> Vec<u8> {
    format!("session/{hash}").into_bytes()
}

/// An audit entry, by its seq.
pub(super) fn audit_key(seq: u64) -> Vec<u8> {
    format!("audit/{seq:020}").into_bytes()
}

/// Where audit entries rotated out of the state go: kept in the store (and in snapshots, so
/// every server has them), never loaded into memory; read by `Query::ArchivedAudit`.
pub const ARCHIVED_AUDIT_PREFIX: &str = "archive/audit/";

/// An archived audit entry, by its seq.
pub fn archived_audit_key(seq: u64) -> Vec<u8> {
    format!("{ARCHIVED_AUDIT_PREFIX}{seq:020}").into_bytes()
}

/// The ids handed out so far (`Counters`).
pub(super) const COUNTERS_KEY: &[u8] = b"meta/counters";

/// A stored record's JSON, or why it does not parse.
pub(super) fn record<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, String> {
    serde_json::from_slice(v).map_err(|e| e.to_string())
}

/// A record's stored JSON.
pub(super) fn json_bytes<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}
