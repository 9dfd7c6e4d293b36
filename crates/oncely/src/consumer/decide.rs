//! The decisions about one record, as data.
//!
//! A lane asks [`Decider`] what to do with each record of a batch (and with
//! each parked event of a key it retries), and what to do after a handler
//! failure; it then carries the verdict out with SQL. The rules live here
//! once, for both paths, and are tested without a broker or a database:
//!
//! - a record whose key has parked events queues behind them (per-key order),
//!   whatever it holds;
//! - bad input (undecodable, no identity, oversized) is dead-lettered;
//! - an identity the inbox already holds, or a second copy in the batch, is a
//!   duplicate;
//! - anything else is applied;
//! - after a failure: a rejected event, or one out of attempts, is
//!   dead-lettered (and under [`DeadKeyPolicy::Hold`] its key's later events
//!   are held until an operator releases the key); otherwise it is parked
//!   with its key and retried after a backoff.

use std::collections::HashSet;

use uuid::Uuid;

use super::handler::FailureClass;
use crate::failure::DeadKeyPolicy;

/// What to do with one record, before any handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Bad input: dead-letter it (the caller knows the decode error).
    DeadLetter {
        /// Hold the key's later events (hold policy).
        hold_key: bool,
    },
    /// Its key has parked (or held) events: park it behind them.
    ParkBehind {
        /// Park it as held (its key is held).
        held: bool,
    },
    /// The inbox holds its identity already, or the batch had it earlier.
    Duplicate,
    /// Run the handler.
    Apply,
}

/// What to do after the handler failed for an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// Park it (its key's later events queue behind it); retry after a
    /// backoff for attempt `attempts`.
    Park {
        /// Attempts made so far (this one included).
        attempts: u32,
    },
    /// Dead-letter it.
    DeadLetter {
        /// `rejected` or `max-attempts`.
        reason: &'static str,
        /// Attempts made.
        attempts: u32,
        /// Hold the key's later events (hold policy).
        hold_key: bool,
    },
}

/// The failure rules of a consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rules {
    pub max_attempts: u32,
    pub dead_key: DeadKeyPolicy,
}

impl Rules {
    /// The verdict after attempt number `attempts` (1-based) failed with `class`.
    pub(crate) fn after_failure(&self, class: FailureClass, attempts: u32, keyed: bool) -> AfterFailure {
        let hold_key = keyed && self.dead_key == DeadKeyPolicy::Hold;
        if class == FailureClass::Reject {
            AfterFailure::DeadLetter { reason: "rejected", attempts, hold_key }
        } else if attempts >= self.max_attempts {
            AfterFailure::DeadLetter { reason: "max-attempts", attempts, hold_key }
        } else {
            AfterFailure::Park { attempts }
        }
    }

    /// Whether dead-lettering bad input holds the key (hold policy, keyed records).
    pub(crate) fn holds_after_bad_input(&self, keyed: bool) -> bool {
        keyed && self.dead_key == DeadKeyPolicy::Hold
    }
}

/// The decisions of one batch, in offset order. Keys are the records' entity
/// keys as bytes; the empty key (records without one) never holds others,
/// but still queues behind a parked keyless event.
#[derive(Debug)]
pub(crate) struct Decider<'a> {
    rules: Rules,
    /// Keys with parked events before the batch.
    parked: &'a HashSet<Vec<u8>>,
    /// Keys parked (or held) by earlier records of this batch.
    parked_now: HashSet<Vec<u8>>,
    /// Keys held by this batch (hold policy).
    held_now: HashSet<Vec<u8>>,
    /// Keys held before the batch.
    held: &'a HashSet<Vec<u8>>,
    /// Identities seen in this batch.
    seen: HashSet<Uuid>,
}

impl<'a> Decider<'a> {
    pub(crate) fn new(rules: Rules, parked: &'a HashSet<Vec<u8>>, held: &'a HashSet<Vec<u8>>) -> Self {
        Decider { rules, parked, held, parked_now: HashSet::new(), held_now: HashSet::new(), seen: HashSet::new() }
    }

    /// Whether a good record of `key` should be claimed in the batch's claim
    /// statement: not when its key is parked already (it will be claimed
    /// when it drains).
    pub(crate) fn wants_claim(&self, key: &[u8]) -> bool {
        !self.parked.contains(key)
    }

    fn is_parked(&self, key: &[u8]) -> bool {
        self.parked.contains(key) || self.parked_now.contains(key)
    }

    fn is_held(&self, key: &[u8]) -> bool {
        self.held.contains(key) || self.held_now.contains(key)
    }

    /// The verdict for the next record: `id` is its inbox key (`None` for bad
    /// input), `claimed` whether the claim returned it as new.
    pub(crate) fn next(&mut self, key: &[u8], id: Option<Uuid>, claimed: bool) -> Verdict {
        // Everything of a parked key queues behind it, bad input included (it
        // is dead-lettered in its turn): per-key order holds for dead letters too.
        if self.is_parked(key) {
            return Verdict::ParkBehind { held: self.is_held(key) };
        }
        let Some(id) = id else {
            let hold_key = self.rules.holds_after_bad_input(!key.is_empty());
            if hold_key {
                self.hold(key);
            }
            return Verdict::DeadLetter { hold_key };
        };
        if !claimed || !self.seen.insert(id) {
            return Verdict::Duplicate;
        }
        Verdict::Apply
    }

    /// A claimed event turned out to be bad input (its payload does not
    /// decode): it is dead-lettered; returns whether its key is now held.
    pub(crate) fn bad_after_claim(&mut self, key: &[u8]) -> bool {
        let hold_key = self.rules.holds_after_bad_input(!key.is_empty());
        if hold_key {
            self.hold(key);
        }
        hold_key
    }

    /// The handler failed for the event of `key` (attempt `attempts`).
    pub(crate) fn failed(&mut self, key: &[u8], class: FailureClass, attempts: u32) -> AfterFailure {
        let v = self.rules.after_failure(class, attempts, !key.is_empty());
        match v {
            AfterFailure::Park { .. } => {
                self.parked_now.insert(key.to_vec());
            }
            AfterFailure::DeadLetter { hold_key: true, .. } => self.hold(key),
            AfterFailure::DeadLetter { .. } => {}
        }
        v
    }

    fn hold(&mut self, key: &[u8]) {
        self.parked_now.insert(key.to_vec());
        self.held_now.insert(key.to_vec());
    }

    /// Keys this batch parked or held (the lane adds them to its parked set).
    pub(crate) fn into_parked(self) -> (HashSet<Vec<u8>>, HashSet<Vec<u8>>) {
        (self.parked_now, self.held_now)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, VecDeque};

    use proptest::prelude::*;

    use super::*;

    fn rules(max: u32, dead_key: DeadKeyPolicy) -> Rules {
        Rules { max_attempts: max, dead_key }
    }

    fn id(n: u8) -> Option<Uuid> {
        Some(Uuid::from_bytes([n; 16]))
    }

    #[test]
    fn duplicates_parked_keys_and_bad_input() {
        let parked: HashSet<Vec<u8>> = [b"p".to_vec()].into();
        let held = HashSet::new();
        let mut d = Decider::new(rules(3, DeadKeyPolicy::Continue), &parked, &held);
        assert!(!d.wants_claim(b"p"));
        assert!(d.wants_claim(b"a"));
        assert_eq!(d.next(b"a", id(1), true), Verdict::Apply);
        assert_eq!(d.next(b"a", id(1), true), Verdict::Duplicate, "second copy in the batch");
        assert_eq!(d.next(b"b", id(2), false), Verdict::Duplicate, "already in the inbox");
        assert_eq!(d.next(b"p", id(3), false), Verdict::ParkBehind { held: false });
        assert_eq!(d.next(b"p", None, false), Verdict::ParkBehind { held: false }, "bad input queues behind its key");
        assert_eq!(d.next(b"c", None, false), Verdict::DeadLetter { hold_key: false });
        assert_eq!(d.next(b"c", id(4), true), Verdict::Apply, "bad input does not park its key");
    }

    #[test]
    fn a_failure_parks_the_rest_of_its_key() {
        let (parked, held) = (HashSet::new(), HashSet::new());
        let mut d = Decider::new(rules(3, DeadKeyPolicy::Continue), &parked, &held);
        assert_eq!(d.next(b"k", id(1), true), Verdict::Apply);
        assert_eq!(d.failed(b"k", FailureClass::Retry, 1), AfterFailure::Park { attempts: 1 });
        assert_eq!(d.next(b"k", id(2), true), Verdict::ParkBehind { held: false });
        assert_eq!(d.next(b"other", id(3), true), Verdict::Apply);
    }

    #[test]
    fn hold_policy_holds_the_key_in_the_batch_path_too() {
        let (parked, held) = (HashSet::new(), HashSet::new());
        let mut d = Decider::new(rules(1, DeadKeyPolicy::Hold), &parked, &held);
        assert_eq!(d.next(b"k", id(1), true), Verdict::Apply);
        assert_eq!(
            d.failed(b"k", FailureClass::Reject, 1),
            AfterFailure::DeadLetter { reason: "rejected", attempts: 1, hold_key: true }
        );
        assert_eq!(d.next(b"k", id(2), true), Verdict::ParkBehind { held: true });
        // max_attempts(1): a transient failure is dead at once, and holds too.
        assert_eq!(d.next(b"j", id(3), true), Verdict::Apply);
        assert_eq!(
            d.failed(b"j", FailureClass::Retry, 1),
            AfterFailure::DeadLetter { reason: "max-attempts", attempts: 1, hold_key: true }
        );
        assert_eq!(d.next(b"j", id(4), true), Verdict::ParkBehind { held: true });
        // Records without a key have no order to keep: nothing is held for them.
        assert_eq!(d.next(b"", id(5), true), Verdict::Apply);
        assert_eq!(
            d.failed(b"", FailureClass::Reject, 1),
            AfterFailure::DeadLetter { reason: "rejected", attempts: 1, hold_key: false }
        );
        assert_eq!(d.next(b"", id(6), true), Verdict::Apply);
        let (p, h) = d.into_parked();
        assert_eq!(h, [b"k".to_vec(), b"j".to_vec()].into());
        assert!(p.is_superset(&h));
    }

    #[test]
    fn continue_policy_lets_the_next_event_of_a_dead_key_through() {
        let (parked, held) = (HashSet::new(), HashSet::new());
        let mut d = Decider::new(rules(1, DeadKeyPolicy::Continue), &parked, &held);
        assert_eq!(d.next(b"k", id(1), true), Verdict::Apply);
        assert!(matches!(d.failed(b"k", FailureClass::Reject, 1), AfterFailure::DeadLetter { hold_key: false, .. }));
        assert_eq!(d.next(b"k", id(2), true), Verdict::Apply);
    }

    /// What the handler does with an event at an attempt.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Outcome {
        Ok,
        Retry,
        Reject,
    }

    /// A record of the model: key, identity (several records may share one:
    /// producer duplicates), bad input, and the handler's outcome per attempt.
    #[derive(Debug, Clone)]
    struct Rec {
        key: u8,
        id: Option<u8>,
        outcomes: Vec<Outcome>,
    }

    fn rec_strategy() -> impl Strategy<Value = Rec> {
        let outcome = prop_oneof![6 => Just(Outcome::Ok), 3 => Just(Outcome::Retry), 1 => Just(Outcome::Reject)];
        (0u8..4, prop_oneof![9 => (0u8..40).prop_map(Some), 1 => Just(None)], prop::collection::vec(outcome, 1..4))
            .prop_map(|(key, id, outcomes)| Rec { key, id, outcomes })
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum State {
        Waiting,
        Held,
        /// A dead-lettered head kept as the marker that holds its key.
        Dead,
    }

    /// A model of the lane over an in-memory store, driven by the decider the
    /// way the lane drives it: batches, then the parked keys drained in order,
    /// until nothing is parked (an operator releases held keys).
    struct Model {
        rules: Rules,
        inbox: HashSet<u8>,
        parked: BTreeMap<u8, VecDeque<(usize, u32, State)>>, // key -> (record, attempts, state)
        applied: Vec<usize>,
        dead: Vec<usize>,
        dups: Vec<usize>,
        calls: HashMap<usize, usize>,
        /// Keys held since a dead letter, until released.
        held: HashSet<u8>,
        violations: Vec<String>,
    }

    fn class(o: Outcome) -> FailureClass {
        if o == Outcome::Reject {
            FailureClass::Reject
        } else {
            FailureClass::Retry
        }
    }

    impl Model {
        fn outcome(&mut self, recs: &[Rec], i: usize) -> Outcome {
            let n = self.calls.entry(i).or_default();
            let o = recs[i].outcomes.get(*n).copied().unwrap_or(Outcome::Ok);
            *n += 1;
            o
        }

        fn sets(&self) -> (HashSet<Vec<u8>>, HashSet<Vec<u8>>) {
            let parked = self.parked.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| vec![*k]).collect();
            let held = self
                .parked
                .iter()
                .filter(|(_, q)| q.front().is_some_and(|e| e.2 != State::Waiting))
                .map(|(k, _)| vec![*k])
                .collect();
            (parked, held)
        }

        fn apply_ok(&mut self, recs: &[Rec], i: usize, in_batch: bool) {
            if in_batch && self.held.contains(&recs[i].key) {
                self.violations.push(format!("record {i} of held key {} applied", recs[i].key));
            }
            self.inbox.insert(recs[i].id.unwrap_or_default());
            self.applied.push(i);
        }

        fn dead_letter(&mut self, key: u8, i: usize, attempts: u32, hold_key: bool) {
            self.dead.push(i);
            if hold_key {
                self.held.insert(key);
                let q = self.parked.entry(key).or_default();
                // The dead event is the key's lowest offset still queued: the
                // marker goes first, and only waiting events become held.
                q.push_front((i, attempts, State::Dead));
                for e in q.iter_mut().skip(1) {
                    if e.2 == State::Waiting {
                        e.2 = State::Held;
                    }
                }
            }
        }

        fn batch(&mut self, recs: &[Rec], range: std::ops::Range<usize>) {
            let (parked, held) = self.sets();
            let mut d = Decider::new(self.rules, &parked, &held);
            // The claim: identities of good records whose key is not parked.
            let mut claimed_now: HashSet<u8> = HashSet::new();
            for i in range.clone() {
                if let Some(x) = recs[i].id {
                    if d.wants_claim(&[recs[i].key]) && !self.inbox.contains(&x) {
                        claimed_now.insert(x);
                    }
                }
            }
            for i in range {
                let key = recs[i].key;
                let claimed = recs[i].id.is_some_and(|x| claimed_now.contains(&x));
                match d.next(&[key], recs[i].id.map(|x| Uuid::from_bytes([x; 16])), claimed) {
                    Verdict::DeadLetter { hold_key } => self.dead_letter(key, i, 1, hold_key),
                    Verdict::ParkBehind { held } => {
                        let st = if held { State::Held } else { State::Waiting };
                        self.parked.entry(key).or_default().push_back((i, 0, st))
                    }
                    Verdict::Duplicate => self.dups.push(i),
                    Verdict::Apply => match self.outcome(recs, i) {
                        Outcome::Ok => self.apply_ok(recs, i, true),
                        o => match d.failed(&[key], class(o), 1) {
                            AfterFailure::Park { attempts } => {
                                self.parked.entry(key).or_default().push_back((i, attempts, State::Waiting))
                            }
                            AfterFailure::DeadLetter { hold_key, attempts, .. } => {
                                // The batch's records of this key after it are
                                // parked behind by the decider; the model puts
                                // the marker in front of them.
                                self.dead_letter(key, i, attempts, hold_key)
                            }
                        },
                    },
                }
            }
        }

        /// An operator releases a held key: the marker goes, the rest waits.
        fn release(&mut self, key: u8) {
            if let Some(q) = self.parked.get_mut(&key) {
                q.retain(|e| e.2 != State::Dead);
                for e in q.iter_mut() {
                    e.2 = State::Waiting;
                }
            }
            self.held.remove(&key);
        }

        /// Drains one key's queue as the lane's parked-key retry does.
        fn drain(&mut self, recs: &[Rec], key: u8) {
            if self.parked.get(&key).and_then(|q| q.front()).is_some_and(|e| e.2 != State::Waiting) {
                return;
            }
            let Some(mut q) = self.parked.remove(&key) else { return };
            let empty = HashSet::new();
            let mut d = Decider::new(self.rules, &empty, &empty);
            while let Some((i, attempts, _)) = q.pop_front() {
                let claimed = recs[i].id.is_some_and(|x| !self.inbox.contains(&x));
                match d.next(&[key], recs[i].id.map(|x| Uuid::from_bytes([x; 16])), claimed) {
                    Verdict::DeadLetter { hold_key } => {
                        self.parked.insert(key, std::mem::take(&mut q));
                        self.dead_letter(key, i, attempts.max(1), hold_key);
                        if hold_key {
                            return;
                        }
                        q = self.parked.remove(&key).unwrap_or_default();
                    }
                    Verdict::Duplicate => self.dups.push(i),
                    Verdict::ParkBehind { .. } => unreachable!("a drained key is not parked in its own decider"),
                    Verdict::Apply => match self.outcome(recs, i) {
                        Outcome::Ok => self.apply_ok(recs, i, false),
                        o => match d.failed(&[key], class(o), attempts + 1) {
                            AfterFailure::Park { attempts } => {
                                q.push_front((i, attempts, State::Waiting));
                                break;
                            }
                            AfterFailure::DeadLetter { hold_key, attempts, .. } => {
                                self.parked.insert(key, std::mem::take(&mut q));
                                self.dead_letter(key, i, attempts, hold_key);
                                if hold_key {
                                    return;
                                }
                                q = self.parked.remove(&key).unwrap_or_default();
                            }
                        },
                    },
                }
            }
            if !q.is_empty() {
                self.parked.insert(key, q);
            }
        }
    }

    proptest! {
        /// Whatever the handler does, every record ends applied, duplicate or
        /// dead-lettered; no identity is applied twice; per key, events are
        /// applied in offset order; and under the hold policy nothing of a key
        /// is applied between its dead-lettered event and a release.
        #[test]
        fn per_key_order_exactly_once_and_nothing_lost(
            recs in prop::collection::vec(rec_strategy(), 1..60),
            batch in 1usize..9,
            max_attempts in 1u32..4,
            hold in any::<bool>(),
        ) {
            let dead_key = if hold { DeadKeyPolicy::Hold } else { DeadKeyPolicy::Continue };
            let mut m = Model {
                rules: rules(max_attempts, dead_key),
                inbox: HashSet::new(),
                parked: BTreeMap::new(),
                applied: Vec::new(),
                dead: Vec::new(),
                dups: Vec::new(),
                calls: HashMap::new(),
                held: HashSet::new(),
                violations: Vec::new(),
            };
            let mut start = 0;
            while start < recs.len() {
                let end = (start + batch).min(recs.len());
                m.batch(&recs, start..end);
                start = end;
                // Between batches the lane retries due keys.
                let keys: Vec<u8> = m.parked.keys().copied().collect();
                for k in keys {
                    m.drain(&recs, k);
                }
            }
            // Then until nothing is left; an operator releases held keys.
            for _ in 0..300 {
                let keys: Vec<u8> = m.parked.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
                if keys.is_empty() {
                    break;
                }
                for k in keys {
                    m.release(k);
                    m.drain(&recs, k);
                }
            }
            prop_assert!(m.violations.is_empty(), "{:?}", m.violations);
            prop_assert!(m.parked.values().all(VecDeque::is_empty), "left parked: {:?}", m.parked);
            // Nothing lost: each record in exactly one of the outcomes.
            let mut all: Vec<usize> = m.applied.iter().chain(&m.dead).chain(&m.dups).copied().collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..recs.len()).collect::<Vec<_>>());
            // Exactly once per identity.
            let mut ids = HashSet::new();
            for &i in &m.applied {
                prop_assert!(ids.insert(recs[i].id), "identity {:?} applied twice", recs[i].id);
            }
            // Per-key order: the applied events of a key in offset order.
            let mut last: HashMap<u8, usize> = HashMap::new();
            for &i in &m.applied {
                if let Some(prev) = last.insert(recs[i].key, i) {
                    prop_assert!(prev < i, "key {}: record {} applied after {}", recs[i].key, i, prev);
                }
            }
        }
    }
}
