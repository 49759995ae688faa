//! A linearizability checker for histories of a key-value store whose keys are registers with
//! get, put (answering the previous value) and compare-and-set: the search of Wing & Gong with
//! Lowe's memoization of (operations linearized, register state), run per key (a history is
//! linearizable if and only if each key's sub-history is, since keys are independent objects).
//!
//! An operation whose answer never came (timeout, lost connection, error) may or may not have
//! taken effect, at any time after it was invoked: it is pending forever and may be left out.
//!
//! ```text
//!   client 1   |--put x=1-----|
//!   client 2        |--get -> 1--|           linearizable: put, get
//!   client 3                       |--get -> None--|     not: the put completed before
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::time::Duration;

/// A register's content: `None` when the key is absent.
pub type Value = Option<String>;

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// Read the key.
    Get,
    /// Set the key.
    Put(String),
    /// Set the key to `new` only if it holds `expected`.
    Cas {
        /// The value it must hold.
        expected: Value,
        /// The value to set.
        new: Value,
    },
}

/// What the client was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// No answer: it may or may not have taken effect.
    Unknown,
    /// The value read.
    Get(Value),
    /// The value the put replaced.
    Put {
        /// The value before.
        previous: Value,
    },
    /// Whether the compare-and-set did it, and the value before.
    Cas {
        /// It set the value.
        set: bool,
        /// The value before.
        previous: Value,
    },
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// Who issued it (for reports).
    pub client: usize,
    /// The key.
    pub key: String,
    /// What was asked.
    pub call: Call,
    /// What came back.
    pub answer: Answer,
    /// When it was sent, from a common origin.
    pub invoked: Duration,
    /// When its answer came (or the client gave up, for `Answer::Unknown`).
    pub completed: Duration,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = |v: &Value| v.as_deref().unwrap_or("-").to_string();
        let call = match &self.call {
            Call::Get => "get".to_string(),
            Call::Put(x) => format!("put {x}"),
            Call::Cas { expected, new } => format!("cas {}->{}", v(expected), v(new)),
        };
        let answer = match &self.answer {
            Answer::Unknown => "?".to_string(),
            Answer::Get(x) => v(x),
            Answer::Put { previous } => format!("prev {}", v(previous)),
            Answer::Cas { set, previous } => format!("set {set} prev {}", v(previous)),
        };
        write!(
            f,
            "[{:>9.3}ms ..{:>9.3}ms] c{} {} {call} => {answer}",
            self.invoked.as_secs_f64() * 1e3,
            self.completed.as_secs_f64() * 1e3,
            self.client,
            self.key
        )
    }
}

/// Why a history was not shown linearizable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// No order of this key's operations explains what the clients saw.
    NotLinearizable {
        /// The key.
        key: String,
        /// Its operations, by invocation time.
        ops: Vec<Operation>,
        /// The most operations with a known answer any order could explain.
        explained: usize,
        /// Index in `ops` of the earliest-invoked answered operation that no order explained
        /// after the longest explained prefix: where to look.
        stuck: usize,
    },
    /// The search for this key gave up after visiting `states` states.
    Undecided {
        /// The key.
        key: String,
        /// States visited.
        states: usize,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::NotLinearizable {
                key,
                ops,
                explained,
                stuck,
            } => {
                let known = ops.iter().filter(|o| o.answer != Answer::Unknown).count();
                writeln!(
                    f,
                    "key {key}: not linearizable; at most {explained} of its {known} answered operations can be ordered; around the first that cannot (>>):"
                )?;
                let from = stuck.saturating_sub(12);
                for (i, o) in ops.iter().enumerate().skip(from).take(25) {
                    writeln!(f, "{} {o}", if i == *stuck { ">>" } else { "  " })?;
                }
                Ok(())
            }
            Violation::Undecided { key, states } => {
                write!(f, "key {key}: undecided after {states} search states")
            }
        }
    }
}

/// What a check looked at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Keys checked.
    pub keys: usize,
    /// Operations with an answer.
    pub answered: usize,
    /// Operations without one that were kept in the search.
    pub unknown: usize,
    /// Search states visited, all keys.
    pub states: usize,
}

/// Search states allowed per key before `Violation::Undecided`.
const MAX_STATES: usize = 2_000_000;

/// Checks `history`: Ok with what was checked if every key's operations can be ordered, each
/// between its invocation and its answer, so that a register explains every answer.
pub fn check(history: &[Operation]) -> Result<Summary, Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for op in history {
        by_key.entry(&op.key).or_default().push(op);
    }
    let mut sum = Summary::default();
    for (key, ops) in by_key {
        let k = KeyHistory::new(&ops);
        sum.keys += 1;
        sum.answered += k.known;
        sum.unknown += k.ops.len() - k.known;
        let mut search = Search {
            h: &k,
            seen: HashSet::new(),
            linearized: vec![0; k.ops.len().div_ceil(64)],
            depth_known: 0,
            best: 0,
            stuck: None,
        };
        let found = search.dfs(0, 0);
        sum.states += search.seen.len();
        if search.seen.len() >= MAX_STATES && !found {
            return Err(Violation::Undecided {
                key: key.to_string(),
                states: search.seen.len(),
            });
        }
        if !found {
            let mut ops: Vec<Operation> = ops.into_iter().cloned().collect();
            ops.sort_by_key(|o| o.invoked);
            let stuck = search
                .stuck
                .and_then(|at| {
                    ops.iter()
                        .position(|o| o.invoked == at && o.answer != Answer::Unknown)
                })
                .unwrap_or(0);
            return Err(Violation::NotLinearizable {
                key: key.to_string(),
                ops,
                explained: search.best,
                stuck,
            });
        }
    }
    Ok(sum)
}

/// The register state in the search: an interned value, 0 for absent.
type State = u32;

/// One operation as the search sees it.
struct Step {
    invoked: Duration,
    /// `Duration::MAX` when unknown: it never has to come before anything.
    completed: Duration,
    known: bool,
    kind: StepKind,
}

enum StepKind {
    Read(State),
    /// A put: the new value and, when answered, the value it replaced.
    Write(State, Option<State>),
    /// A compare-and-set: expected, new, and when answered whether it set and the value before.
    Cas(State, State, Option<(bool, State)>),
}

impl Step {
    /// The state after this operation from `s`, or None if its answer rules `s` out.
    fn apply(&self, s: State) -> Option<State> {
        match self.kind {
            StepKind::Read(v) => (v == s).then_some(s),
            StepKind::Write(v, None) => Some(v),
            StepKind::Write(v, Some(prev)) => (prev == s).then_some(v),
            StepKind::Cas(e, n, None) => Some(if s == e { n } else { s }),
            StepKind::Cas(e, n, Some((true, prev))) => (s == e && prev == s).then_some(n),
            StepKind::Cas(e, _, Some((false, prev))) => (s != e && prev == s).then_some(s),
        }
    }
}

/// One key's operations, interned and ordered by invocation.
struct KeyHistory {
    ops: Vec<Step>,
    known: usize,
}

impl KeyHistory {
    fn new(ops: &[&Operation]) -> KeyHistory {
        let mut ids: HashMap<Value, State> = HashMap::new();
        ids.insert(None, 0);
        let mut id = |v: &Value| -> State {
            let n = ids.len() as State;
            *ids.entry(v.clone()).or_insert(n)
        };
        // Values some answer or condition depends on. An unanswered write of any other value
        // can be left out: while it would be the register's content nothing answered reads
        // the register, and no compare-and-set expects it.
        let mut observed: BTreeSet<Value> = BTreeSet::new();
        for o in ops {
            match (&o.call, &o.answer) {
                (Call::Cas { expected, .. }, a) => {
                    observed.insert(expected.clone());
                    if let Answer::Cas { previous, .. } = a {
                        observed.insert(previous.clone());
                    }
                }
                (_, Answer::Get(v)) | (_, Answer::Put { previous: v }) => {
                    observed.insert(v.clone());
                }
                _ => {}
            }
        }
        let mut steps = Vec::new();
        for o in ops {
            let known = o.answer != Answer::Unknown;
            let kind = match (&o.call, &o.answer) {
                (Call::Get, Answer::Get(v)) => StepKind::Read(id(v)),
                // An unanswered read changes nothing.
                (Call::Get, Answer::Unknown) => continue,
                (Call::Put(v), Answer::Put { previous }) => {
                    StepKind::Write(id(&Some(v.clone())), Some(id(previous)))
                }
                (Call::Put(v), Answer::Unknown) => {
                    if !observed.contains(&Some(v.clone())) {
                        continue;
                    }
                    StepKind::Write(id(&Some(v.clone())), None)
                }
                (Call::Cas { expected, new }, Answer::Cas { set, previous }) => {
                    StepKind::Cas(id(expected), id(new), Some((*set, id(previous))))
                }
                (Call::Cas { expected, new }, Answer::Unknown) => {
                    if !observed.contains(new) {
                        continue;
                    }
                    StepKind::Cas(id(expected), id(new), None)
                }
                (call, answer) => panic!("answer {answer:?} does not fit call {call:?}"),
            };
            steps.push(Step {
                invoked: o.invoked,
                completed: if known { o.completed } else { Duration::MAX },
                known,
                kind,
            });
        }
        steps.sort_by_key(|s| s.invoked);
        let known = steps.iter().filter(|s| s.known).count();
        KeyHistory { ops: steps, known }
    }
}

struct Search<'a> {
    h: &'a KeyHistory,
    /// (linearized set, state) pairs already explored.
    seen: HashSet<(Vec<u64>, State)>,
    linearized: Vec<u64>,
    depth_known: usize,
    best: usize,
    /// When the first answered operation left out of the longest explained prefix was invoked.
    stuck: Option<Duration>,
}

impl Search<'_> {
    fn is_set(&self, i: usize) -> bool {
        self.linearized[i / 64] & (1 << (i % 64)) != 0
    }

    fn flip(&mut self, i: usize) {
        self.linearized[i / 64] ^= 1 << (i % 64);
    }

    /// Whether the operations not yet linearized, from `first` (every one before it is), can
    /// follow from `state`.
    fn dfs(&mut self, first: usize, state: State) -> bool {
        if self.depth_known > self.best || self.stuck.is_none() {
            self.best = self.depth_known;
            self.stuck = (first..self.h.ops.len())
                .find(|&i| !self.is_set(i) && self.h.ops[i].known)
                .map(|i| self.h.ops[i].invoked);
        }
        if self.depth_known == self.h.known {
            return true;
        }
        if self.seen.len() >= MAX_STATES {
            return false;
        }
        let ops = &self.h.ops;
        // The next operation may be any pending one invoked before every pending one completed.
        let horizon = (first..ops.len())
            .filter(|&i| !self.is_set(i))
            .map(|i| ops[i].completed)
            .min()
            .unwrap_or(Duration::MAX);
        for i in first..ops.len() {
            if ops[i].invoked > horizon {
                break;
            }
            if self.is_set(i) {
                continue;
            }
            let Some(next) = ops[i].apply(state) else {
                continue;
            };
            self.flip(i);
            if self.seen.insert((self.linearized.clone(), next)) {
                let mut first = first;
                while first < ops.len() && self.is_set(first) {
                    first += 1;
                }
                self.depth_known += usize::from(ops[i].known);
                let ok = self.dfs(first, next);
                self.depth_known -= usize::from(ops[i].known);
                if ok {
                    self.flip(i);
                    return true;
                }
            }
            self.flip(i);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, call: Call, answer: Answer, from_ms: u64, to_ms: u64) -> Operation {
        Operation {
            client,
            key: "k".into(),
            call,
            answer,
            invoked: Duration::from_millis(from_ms),
            completed: Duration::from_millis(to_ms),
        }
    }

    fn s(v: &str) -> Value {
        Some(v.to_string())
    }

    fn put(c: usize, v: &str, prev: Value, a: u64, b: u64) -> Operation {
        op(c, Call::Put(v.into()), Answer::Put { previous: prev }, a, b)
    }

    fn get(c: usize, v: Value, a: u64, b: u64) -> Operation {
        op(c, Call::Get, Answer::Get(v), a, b)
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_rejected() {
        let h = [
            put(1, "1", None, 0, 10),
            // Begins after the put completed, yet sees the key absent.
            get(2, None, 20, 30),
        ];
        let err = check(&h).unwrap_err();
        assert!(
            matches!(&err, Violation::NotLinearizable { key, explained: 1, stuck: 1, .. } if key == "k"),
            "{err}"
        );
        assert!(err.to_string().contains("c2 k get => -"), "{err}");
    }

    #[test]
    fn concurrent_reads_may_see_either_side_of_an_overlapping_write() {
        let h = [
            put(1, "1", None, 0, 100),
            get(2, None, 10, 20),
            get(3, s("1"), 30, 40),
            get(2, s("1"), 50, 60),
            put(3, "2", s("1"), 70, 120),
            get(1, s("1"), 105, 130),
            get(2, s("2"), 110, 140),
        ];
        let sum = check(&h).unwrap();
        assert_eq!((sum.keys, sum.answered, sum.unknown), (1, 7, 0));
    }

    #[test]
    fn reads_that_go_back_in_time_are_rejected() {
        // Both reads overlap the write, but once one reader saw the new value a later read
        // (that began after it ended) cannot see the old one.
        let h = [
            put(1, "1", None, 0, 100),
            get(2, s("1"), 10, 20),
            get(3, None, 30, 40),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn an_unanswered_write_may_take_effect_late_or_never() {
        let lost = op(1, Call::Put("1".into()), Answer::Unknown, 0, 5);
        // Seen long after the client gave up.
        let late = [
            lost.clone(),
            get(2, None, 10, 20),
            get(2, s("1"), 1000, 1010),
        ];
        check(&late).unwrap();
        // Never seen at all.
        let never = [lost.clone(), get(2, None, 1000, 1010)];
        check(&never).unwrap();
        // But not before it was sent.
        let early = [get(2, s("1"), 0, 1), {
            let mut l = lost;
            l.invoked = Duration::from_millis(2);
            l
        }];
        assert!(check(&early).is_err());
    }

    #[test]
    fn compare_and_set_answers_are_checked() {
        let cas = |c, e: Value, n: &str, set, prev, a, b| {
            op(
                c,
                Call::Cas {
                    expected: e,
                    new: s(n),
                },
                Answer::Cas {
                    set,
                    previous: prev,
                },
                a,
                b,
            )
        };
        // Two concurrent CAS from the same value: exactly one may win.
        let ok = [
            put(1, "a", None, 0, 10),
            cas(2, s("a"), "b", true, s("a"), 20, 40),
            cas(3, s("a"), "c", false, s("b"), 25, 45),
            get(1, s("b"), 50, 60),
        ];
        check(&ok).unwrap();
        let both_won = [
            put(1, "a", None, 0, 10),
            cas(2, s("a"), "b", true, s("a"), 20, 40),
            cas(3, s("a"), "c", true, s("a"), 25, 45),
        ];
        assert!(check(&both_won).is_err());
    }

    #[test]
    fn keys_are_checked_apart() {
        let mut other = get(2, None, 20, 30);
        other.key = "j".into();
        let h = [put(1, "1", None, 0, 10), other];
        assert_eq!(check(&h).unwrap().keys, 2);
    }
}
