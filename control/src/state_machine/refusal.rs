//! What applying a command answers: a value, or a refusal of a kind the API maps to its status.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The result of applying a command: a value, or why it was refused (the same on every server,
/// since applying is deterministic).
pub type Outcome = Result<Value, Refusal>;

/// What kind of refusal: the API answers 403, 404 or 409 by it, never by the text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// The actor may not do it.
    Forbidden,
    /// What it names does not exist.
    NotFound,
    /// It does not fit the state as it is.
    Conflict,
}

/// Why a command was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What kind.
    pub kind: RefusalKind,
    /// What it says, for people.
    pub reason: String,
}

impl Refusal {
    /// The actor may not do it.
    pub fn forbidden(reason: impl Into<String>) -> Refusal {
        Refusal {
            kind: RefusalKind::Forbidden,
            reason: reason.into(),
        }
    }

    /// What it names does not exist.
    pub fn not_found(reason: impl Into<String>) -> Refusal {
        Refusal {
            kind: RefusalKind::NotFound,
            reason: reason.into(),
        }
    }

    /// It does not fit the state.
    pub fn conflict(reason: impl Into<String>) -> Refusal {
        Refusal {
            kind: RefusalKind::Conflict,
            reason: reason.into(),
        }
    }
}

/// A check's reason: it does not fit the state.
impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal::conflict(reason)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}
