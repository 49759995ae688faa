//! The key/value section: small settings and tests, set, deleted or compared and set.

use serde_json::json;

use super::keys::kv_key;
use super::{Outcome, RecordWrite, StateMachine};

impl StateMachine {
    /// Sets `key` (`Command::Put`). Answers the previous value.
    pub(super) fn put(&mut self, key: &str, value: &str, writes: &mut Vec<RecordWrite>) -> Outcome {
        let prev = self.kv.insert(key.to_string(), value.to_string());
        writes.push((kv_key(key), Some(value.as_bytes().to_vec())));
        Ok(json!({ "previous": prev }))
    }

    /// Deletes `key` (`Command::Delete`). Answers the previous value.
    pub(super) fn delete(&mut self, key: &str, writes: &mut Vec<RecordWrite>) -> Outcome {
        let prev = self.kv.remove(key);
        writes.push((kv_key(key), None));
        Ok(json!({ "previous": prev }))
    }

    /// Sets `key` to `value` (`None` deletes) only if it holds `expected` (`None`: absent)
    /// (`Command::CompareAndSet`). Answers whether it did, and the value before.
    pub(super) fn compare_and_set(
        &mut self,
        key: &str,
        expected: Option<&str>,
        value: Option<&str>,
        writes: &mut Vec<RecordWrite>,
    ) -> Outcome {
        let current = self.kv.get(key).cloned();
        if current.as_deref() != expected {
            return Ok(json!({ "set": false, "previous": current }));
        }
        match value {
            Some(v) => {
                self.kv.insert(key.to_string(), v.to_string());
                writes.push((kv_key(key), Some(v.as_bytes().to_vec())));
            }
            None => {
                self.kv.remove(key);
                writes.push((kv_key(key), None));
            }
        }
        Ok(json!({ "set": true, "previous": current }))
    }
}
