//! Offset-reset planning, pure: from each partition's current committed
//! offset, its log bounds and what the target asks for, compute the new
//! offset (or none: the commit is removed), what moving there re-delivers or
//! skips, and what would make the reset refused (out-of-range targets,
//! `--max-replay`).
//!
//! The new offsets are Kafka's own: `kafka-consumer-groups --reset-offsets
//! --dry-run` plans the same for every target both have. Where Kafka's tool
//! moves an out-of-range target into the log with a warning, the plan marks
//! it and refuses unless clamping is allowed.
//!
//! Counts are in offsets between positions that exist in the log. On a plain
//! topic that is the number of records; compaction and transaction markers
//! make it an upper bound.
//!
//! ```
//! use oncely::admin::plan::{plan, PartitionState, PlanOptions, Requested};
//!
//! let p0 = PartitionState { topic: "orders".into(), partition: 0, current: Some(120), log_start: 100, log_end: 130 };
//! let plan = plan(&[(p0, Requested::Earliest)], PlanOptions::default()).unwrap();
//! assert_eq!(plan.partitions[0].new, Some(100));
//! assert_eq!(plan.totals.redelivered, 20);
//! assert!(plan.refusals.is_empty());
//! ```

use std::fmt;

use serde::Serialize;

/// What a target asks for one partition, before it is checked against the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Requested {
    /// The log start offset.
    Earliest,
    /// The log end offset (also where a timestamp after the last record lands).
    Latest,
    /// This offset.
    Offset(i64),
    /// The current committed offset plus this (negative: back).
    ShiftBy(i64),
    /// Where the group is: its committed offset as it is (never clamped:
    /// nothing moves), or the log end where it has none (Kafka's
    /// `--to-current`).
    Current,
    /// No committed offset at all: the commit is removed, as before the
    /// group's first one (what undo restores for a partition the change
    /// found without a commit).
    NoCommit,
}

/// One partition as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionState {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The group's committed offset; `None` when it has committed nothing here.
    pub current: Option<i64>,
    /// The log start offset (oldest retained).
    pub log_start: i64,
    /// The log end offset (the next offset to be written).
    pub log_end: i64,
}

/// Checks a plan must pass to be executed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Move out-of-range targets to the nearest valid offset instead of
    /// refusing. Default false: an offset outside the log is usually a typo
    /// or a target from another cluster.
    pub allow_clamp: bool,
    /// Refuse when more than this many records in total would be re-delivered.
    /// Default none.
    pub max_replay: Option<u64>,
}

/// The plan for one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionPlan {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Committed offset now (`None`: nothing committed).
    pub current: Option<i64>,
    /// Log start offset.
    pub log_start: i64,
    /// Log end offset.
    pub log_end: i64,
    /// The offset the target asked for (`None`: no commit).
    pub requested: Option<i64>,
    /// The offset it will be set to: `requested` moved into
    /// `log_start..=log_end`. `None`: the committed offset is removed, and
    /// the group's consumers start where their `auto.offset.reset` says.
    pub new: Option<i64>,
    /// Whether `requested` was outside the log (so `new` differs from it).
    pub clamped: bool,
    /// Records between `new` and `current` that the group will read again
    /// (0 when `new` is `None`: that depends on the consumers'
    /// `auto.offset.reset`).
    pub redelivered: u64,
    /// Records between `current` and `new` that the group will never read
    /// (0 when `new` is `None`, as above).
    pub skipped: u64,
    /// Timestamp (ms since the epoch) of the first record that will be
    /// re-delivered, when the caller looked it up.
    pub first_replayed_ms: Option<i64>,
}

impl PartitionPlan {
    /// Whether the committed offset changes.
    pub fn changes(&self) -> bool {
        self.current != self.new
    }
}

/// Totals over a plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Partitions in the plan.
    pub partitions: usize,
    /// Partitions whose committed offset changes.
    pub changed: usize,
    /// Records re-delivered in total.
    pub redelivered: u64,
    /// Records skipped in total.
    pub skipped: u64,
    /// Partitions whose target was out of range.
    pub out_of_range: usize,
    /// Partitions without a committed offset (their counts are 0: the group
    /// never read them, so nothing is re-delivered or skipped).
    pub without_commit: usize,
    /// Partitions whose committed offset is removed (their counts are 0:
    /// where the group starts depends on its consumers' `auto.offset.reset`).
    pub uncommitted: usize,
}

/// One target partition outside its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutOfRange {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// What was asked.
    pub requested: i64,
    /// Log start.
    pub log_start: i64,
    /// Log end.
    pub log_end: i64,
}

/// Why a plan may not be executed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Refusal {
    /// Targets outside the log, and clamping was not allowed.
    OutOfRange {
        /// The partitions.
        partitions: Vec<OutOfRange>,
    },
    /// More records would be re-delivered than allowed.
    MaxReplay {
        /// Records re-delivered.
        redelivered: u64,
        /// The limit.
        max: u64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::OutOfRange { partitions } => {
                write!(f, "the target is outside the log for {} partition(s): ", partitions.len())?;
                for (i, p) in partitions.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    if i == 5 {
                        write!(f, "and {} more", partitions.len() - 5)?;
                        break;
                    }
                    write!(
                        f,
                        "{}[{}] asks {} but the log holds {}..{}",
                        p.topic, p.partition, p.requested, p.log_start, p.log_end
                    )?;
                }
                f.write_str(" (--allow-clamp moves them to the nearest valid offset)")
            }
            Refusal::MaxReplay { redelivered, max } => {
                write!(f, "{redelivered} records would be re-delivered, more than --max-replay {max}")
            }
        }
    }
}

/// A reset plan: per partition and in total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Per partition, sorted by topic and partition.
    pub partitions: Vec<PartitionPlan>,
    /// Totals.
    pub totals: Totals,
    /// Why it may not be executed; empty when it may.
    pub refusals: Vec<Refusal>,
}

impl Plan {
    /// The earliest [`PartitionPlan::first_replayed_ms`]: the oldest record
    /// that will be re-delivered.
    pub fn oldest_replayed_ms(&self) -> Option<i64> {
        self.partitions.iter().filter_map(|p| p.first_replayed_ms).min()
    }

    /// `(topic, partition, new)` of the partitions that change to an offset.
    pub fn changes(&self) -> Vec<(String, i32, i64)> {
        self.partitions
            .iter()
            .filter(|p| p.changes())
            .filter_map(|p| p.new.map(|n| (p.topic.clone(), p.partition, n)))
            .collect()
    }

    /// `(topic, partition)` of the partitions whose committed offset is removed.
    pub fn uncommits(&self) -> Vec<(String, i32)> {
        self.partitions
            .iter()
            .filter(|p| p.changes() && p.new.is_none())
            .map(|p| (p.topic.clone(), p.partition))
            .collect()
    }
}

/// A plan that cannot be computed at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// Nothing to plan.
    #[error("no partitions to reset")]
    Empty,
    /// The same partition twice.
    #[error("{topic}[{partition}] is listed twice")]
    Duplicate {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
    },
    /// `--shift-by` needs a committed offset to shift from.
    #[error("cannot shift {topic}[{partition}]: the group has no committed offset there")]
    NoCommittedOffset {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
    },
    /// Log bounds that make no sense (start after end).
    #[error("{topic}[{partition}]: log start {log_start} is after log end {log_end}")]
    BadLog {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Log start.
        log_start: i64,
        /// Log end.
        log_end: i64,
    },
}

/// Plans the move of every partition to its requested offset.
pub fn plan(inputs: &[(PartitionState, Requested)], opts: PlanOptions) -> Result<Plan, PlanError> {
    if inputs.is_empty() {
        return Err(PlanError::Empty);
    }
    let mut partitions = Vec::with_capacity(inputs.len());
    let mut out_of_range = Vec::new();
    for (s, req) in inputs {
        if s.log_start > s.log_end || s.log_start < 0 {
            return Err(PlanError::BadLog {
                topic: s.topic.clone(),
                partition: s.partition,
                log_start: s.log_start,
                log_end: s.log_end,
            });
        }
        let requested = match *req {
            Requested::Earliest => Some(s.log_start),
            Requested::Latest => Some(s.log_end),
            Requested::Offset(o) => Some(o),
            Requested::ShiftBy(n) => Some(
                s.current
                    .ok_or_else(|| PlanError::NoCommittedOffset { topic: s.topic.clone(), partition: s.partition })?
                    .saturating_add(n),
            ),
            Requested::Current => Some(s.current.unwrap_or(s.log_end)),
            Requested::NoCommit => None,
        };
        // Where the group already is is not a target: `--to-current` keeps
        // even an offset retention has passed, as Kafka's tool does.
        let keep = matches!(req, Requested::Current) && s.current.is_some();
        let new = requested.map(|r| if keep { r } else { r.clamp(s.log_start, s.log_end) });
        let clamped = new != requested;
        if let (true, Some(requested)) = (clamped, requested) {
            out_of_range.push(OutOfRange {
                topic: s.topic.clone(),
                partition: s.partition,
                requested,
                log_start: s.log_start,
                log_end: s.log_end,
            });
        }
        let (redelivered, skipped) = match (s.current, new) {
            // Count only offsets that exist: a committed offset outside the
            // log is where the consumer's auto.offset.reset would take over.
            (Some(c), Some(new)) => {
                let c = c.clamp(s.log_start, s.log_end);
                let new = new.clamp(s.log_start, s.log_end);
                (u64::try_from(c - new).unwrap_or(0), u64::try_from(new - c).unwrap_or(0))
            }
            _ => (0, 0),
        };
        partitions.push(PartitionPlan {
            topic: s.topic.clone(),
            partition: s.partition,
            current: s.current,
            log_start: s.log_start,
            log_end: s.log_end,
            requested,
            new,
            clamped,
            redelivered,
            skipped,
            first_replayed_ms: None,
        });
    }
    partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    if let Some(w) = partitions.windows(2).find(|w| w[0].topic == w[1].topic && w[0].partition == w[1].partition) {
        return Err(PlanError::Duplicate { topic: w[0].topic.clone(), partition: w[0].partition });
    }
    let totals = Totals {
        partitions: partitions.len(),
        changed: partitions.iter().filter(|p| p.changes()).count(),
        redelivered: partitions.iter().map(|p| p.redelivered).sum(),
        skipped: partitions.iter().map(|p| p.skipped).sum(),
        out_of_range: out_of_range.len(),
        without_commit: partitions.iter().filter(|p| p.current.is_none()).count(),
        uncommitted: partitions.iter().filter(|p| p.changes() && p.new.is_none()).count(),
    };
    let mut refusals = Vec::new();
    if !out_of_range.is_empty() && !opts.allow_clamp {
        refusals.push(Refusal::OutOfRange { partitions: out_of_range });
    }
    if let Some(max) = opts.max_replay {
        if totals.redelivered > max {
            refusals.push(Refusal::MaxReplay { redelivered: totals.redelivered, max });
        }
    }
    Ok(Plan { partitions, totals, refusals })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn st(p: i32, current: Option<i64>, log_start: i64, log_end: i64) -> PartitionState {
        PartitionState { topic: "t".into(), partition: p, current, log_start, log_end }
    }

    fn one(s: PartitionState, r: Requested, opts: PlanOptions) -> Plan {
        plan(&[(s, r)], opts).expect("plan")
    }

    #[test]
    fn earliest_counts_what_is_read_again() {
        let p = one(st(0, Some(1300), 0, 1300), Requested::Earliest, PlanOptions::default());
        let pp = &p.partitions[0];
        assert_eq!((pp.new, pp.redelivered, pp.skipped, pp.clamped), (Some(0), 1300, 0, false));
        assert_eq!(p.totals.redelivered, 1300);
        assert_eq!(p.totals.changed, 1);
        assert!(p.refusals.is_empty());
    }

    #[test]
    fn latest_counts_what_is_skipped() {
        let p = one(st(0, Some(40), 10, 100), Requested::Latest, PlanOptions::default());
        assert_eq!((p.partitions[0].new, p.partitions[0].redelivered, p.partitions[0].skipped), (Some(100), 0, 60));
    }

    #[test]
    fn shift_by_moves_from_the_committed_offset_and_needs_one() {
        let p = one(st(0, Some(50), 0, 100), Requested::ShiftBy(-20), PlanOptions::default());
        assert_eq!((p.partitions[0].new, p.partitions[0].redelivered), (Some(30), 20));
        let e = plan(&[(st(0, None, 0, 100), Requested::ShiftBy(-20))], PlanOptions::default());
        assert!(matches!(e, Err(PlanError::NoCommittedOffset { partition: 0, .. })), "{e:?}");
    }

    #[test]
    fn out_of_range_is_refused_unless_clamping_is_allowed() {
        let s = st(0, Some(50), 10, 100);
        let p = one(s.clone(), Requested::Offset(5), PlanOptions::default());
        assert_eq!(p.partitions[0].new, Some(10));
        assert!(p.partitions[0].clamped);
        assert!(matches!(&p.refusals[..], [Refusal::OutOfRange { partitions }] if partitions[0].requested == 5));
        assert!(p.refusals[0].to_string().contains("t[0] asks 5 but the log holds 10..100"), "{}", p.refusals[0]);
        let p = one(s.clone(), Requested::Offset(500), PlanOptions { allow_clamp: true, max_replay: None });
        assert_eq!(p.partitions[0].new, Some(100));
        assert!(p.refusals.is_empty());
        assert_eq!(p.totals.out_of_range, 1);
        let p = one(s, Requested::ShiftBy(-1000), PlanOptions { allow_clamp: true, max_replay: None });
        assert_eq!((p.partitions[0].new, p.partitions[0].redelivered), (Some(10), 40));
    }

    #[test]
    fn max_replay_counts_the_total() {
        let inputs = vec![(st(0, Some(10), 0, 10), Requested::Earliest), (st(1, Some(7), 0, 10), Requested::Earliest)];
        let p = plan(&inputs, PlanOptions { allow_clamp: false, max_replay: Some(16) }).expect("plan");
        assert_eq!(p.totals.redelivered, 17);
        assert_eq!(p.refusals, vec![Refusal::MaxReplay { redelivered: 17, max: 16 }]);
        let p = plan(&inputs, PlanOptions { allow_clamp: false, max_replay: Some(17) }).expect("plan");
        assert!(p.refusals.is_empty());
    }

    #[test]
    fn a_partition_without_a_commit_counts_nothing() {
        let p = one(st(0, None, 0, 10), Requested::Offset(3), PlanOptions::default());
        assert_eq!((p.partitions[0].redelivered, p.partitions[0].skipped), (0, 0));
        assert_eq!(p.totals.without_commit, 1);
        assert!(p.partitions[0].changes());
    }

    #[test]
    fn to_current_keeps_the_committed_offset_and_takes_the_log_end_without_one() {
        let inputs = vec![
            (st(0, Some(40), 10, 100), Requested::Current),
            // Retention passed the group: Kafka's tool keeps the offset, so do we.
            (st(1, Some(5), 10, 100), Requested::Current),
            (st(2, None, 10, 100), Requested::Current),
        ];
        let p = plan(&inputs, PlanOptions::default()).expect("plan");
        let got: Vec<_> = p.partitions.iter().map(|p| (p.new, p.clamped, p.changes())).collect();
        assert_eq!(got, vec![(Some(40), false, false), (Some(5), false, false), (Some(100), false, true)]);
        assert!(p.refusals.is_empty());
        assert_eq!((p.totals.changed, p.totals.redelivered, p.totals.skipped), (1, 0, 0));
    }

    #[test]
    fn no_commit_removes_the_offset_and_counts_nothing() {
        let inputs = vec![(st(0, Some(40), 10, 100), Requested::NoCommit), (st(1, None, 0, 9), Requested::NoCommit)];
        let p = plan(&inputs, PlanOptions { allow_clamp: false, max_replay: Some(0) }).expect("plan");
        let got: Vec<_> = p.partitions.iter().map(|p| (p.new, p.changes(), p.redelivered, p.skipped)).collect();
        assert_eq!(got, vec![(None, true, 0, 0), (None, false, 0, 0)]);
        assert_eq!((p.totals.changed, p.totals.uncommitted), (1, 1));
        assert_eq!(p.uncommits(), vec![("t".to_owned(), 0)]);
        assert!(p.changes().is_empty(), "nothing to alter, one commit to remove");
        assert!(p.refusals.is_empty());
    }

    #[test]
    fn a_committed_offset_before_the_log_start_counts_only_retained_records() {
        // Retention removed 0..100; the group sat at 40.
        let p = one(st(0, Some(40), 100, 150), Requested::Latest, PlanOptions::default());
        assert_eq!((p.partitions[0].redelivered, p.partitions[0].skipped), (0, 50));
    }

    #[test]
    fn duplicates_empty_and_bad_logs_are_errors() {
        assert_eq!(plan(&[], PlanOptions::default()), Err(PlanError::Empty));
        let d = vec![(st(0, Some(1), 0, 9), Requested::Earliest), (st(0, Some(1), 0, 9), Requested::Latest)];
        assert!(matches!(plan(&d, PlanOptions::default()), Err(PlanError::Duplicate { .. })));
        assert!(matches!(
            plan(&[(st(0, None, 9, 1), Requested::Earliest)], PlanOptions::default()),
            Err(PlanError::BadLog { .. })
        ));
    }

    #[test]
    fn partitions_come_out_sorted_and_oldest_replayed_is_the_minimum() {
        let inputs = vec![(st(2, Some(5), 0, 5), Requested::Earliest), (st(1, Some(5), 0, 5), Requested::Earliest)];
        let mut p = plan(&inputs, PlanOptions::default()).expect("plan");
        assert_eq!(p.partitions.iter().map(|p| p.partition).collect::<Vec<_>>(), vec![1, 2]);
        p.partitions[0].first_replayed_ms = Some(2000);
        p.partitions[1].first_replayed_ms = Some(1000);
        assert_eq!(p.oldest_replayed_ms(), Some(1000));
        assert_eq!(p.changes(), vec![("t".to_owned(), 1, 0), ("t".to_owned(), 2, 0)]);
    }

    fn requested() -> impl Strategy<Value = Requested> {
        prop_oneof![
            Just(Requested::Earliest),
            Just(Requested::Latest),
            (-50i64..250).prop_map(Requested::Offset),
            (-250i64..250).prop_map(Requested::ShiftBy),
        ]
    }

    proptest! {
        #[test]
        fn new_offsets_stay_in_the_log_and_counts_match_the_move(
            parts in proptest::collection::vec(
                (0i64..100, 0i64..100, proptest::option::of(0i64..200), requested()), 1..8),
            allow_clamp in any::<bool>(),
            max in proptest::option::of(0u64..400),
        ) {
            let inputs: Vec<_> = parts
                .iter()
                .enumerate()
                .map(|(i, (a, len, cur, r))| {
                    let r = match (r, cur) { (Requested::ShiftBy(_), None) => Requested::Earliest, (r, _) => *r };
                    (st(i as i32, *cur, *a, a + len), r)
                })
                .collect();
            let p = plan(&inputs, PlanOptions { allow_clamp, max_replay: max }).expect("plan");
            let mut re = 0;
            let mut sk = 0;
            for pp in &p.partitions {
                let new = pp.new.expect("these targets name an offset");
                prop_assert!(pp.log_start <= new && new <= pp.log_end);
                prop_assert_eq!(pp.clamped, pp.new != pp.requested);
                prop_assert!(pp.redelivered == 0 || pp.skipped == 0);
                if let Some(c) = pp.current {
                    let c = c.clamp(pp.log_start, pp.log_end);
                    prop_assert_eq!(pp.redelivered as i64 - pp.skipped as i64, c - new);
                }
                re += pp.redelivered;
                sk += pp.skipped;
            }
            prop_assert_eq!((p.totals.redelivered, p.totals.skipped), (re, sk));
            let has_range = p.refusals.iter().any(|r| matches!(r, Refusal::OutOfRange { .. }));
            prop_assert_eq!(has_range, !allow_clamp && p.totals.out_of_range > 0);
            let has_max = p.refusals.iter().any(|r| matches!(r, Refusal::MaxReplay { .. }));
            prop_assert_eq!(has_max, max.is_some_and(|m| re > m));
        }

        #[test]
        fn a_plan_to_the_current_offsets_changes_nothing(
            parts in proptest::collection::vec((0i64..100, 0i64..100, 0i64..100), 1..8),
        ) {
            let inputs: Vec<_> = parts
                .iter()
                .enumerate()
                .map(|(i, (a, len, off))| {
                    let cur = a + off % (len + 1);
                    (st(i as i32, Some(cur), *a, a + len), Requested::Offset(cur))
                })
                .collect();
            let p = plan(&inputs, PlanOptions::default()).expect("plan");
            prop_assert_eq!(p.totals.changed, 0);
            prop_assert_eq!((p.totals.redelivered, p.totals.skipped), (0, 0));
            prop_assert!(p.refusals.is_empty());
        }
    }
}
