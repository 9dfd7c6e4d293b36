//! Consumer lag with Burrow's statuses (OK, WARN, STALL, STOP, REWIND),
//! evaluated over a sliding window of committed offsets: the snapshots
//! `oncely watch` records, then the live values.
//!
//! Burrow's rules (its `evaluator/caching.go`), per partition, with the
//! window oldest first:
//!
//! 1. if the lag is zero now or anywhere in the window: OK;
//! 2. REWIND if the committed offset ever went backwards;
//! 3. STOP if the consumer stopped committing;
//! 4. STALL if the committed offset never moved;
//! 5. WARN if the lag never decreased;
//! 6. otherwise OK.
//!
//! oncely departs from them on purpose in two places:
//!
//! - **A rewind is checked first and is never hidden by zero lag.** Burrow
//!   checks it only while there is lag, so a group rewound and caught up
//!   again, which is exactly an offset reset that re-delivered everything,
//!   shows OK. Here a decrease anywhere in the window is REWIND, and so is an
//!   oncely consumer whose Kafka offset is behind its database offset
//!   without its own commit metadata (someone moved it).
//! - **STOP is read from the group's membership**, because the Admin API
//!   does not tell when an offset was committed (Burrow reads every commit
//!   from `__consumer_offsets`): a lagging partition that no member of the
//!   group consumes, and whose offset did not move over the window, is STOP.
//!   A member that owns the partition but does not move it is STALL.
//!
//! Rules 4 and 5 need at least two samples; with only the live value the
//! evaluation is marked incomplete (run `oncely watch`).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt as _;
use serde::Serialize;

use crate::admin::records::first_record_timestamps;
use crate::admin::session::{moved_by, owners, Session};
use crate::error::Result;
use crate::kafka::COMMIT_METADATA;
use crate::store;

/// A partition's status. Ordered by severity: a group's status is its
/// worst partition's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Keeping up (or no lag).
    Ok,
    /// Moving, but the lag is not decreasing.
    Warn,
    /// Owned by a member, lagging, not moving.
    Stall,
    /// Lagging and nobody consumes it.
    Stop,
    /// The committed offset went backwards.
    Rewind,
}

impl Status {
    /// `OK`, `WARN`, `STALL`, `STOP` or `REWIND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Stall => "STALL",
            Status::Stop => "STOP",
            Status::Rewind => "REWIND",
        }
    }
}

/// One observation of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Sample {
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// The committed offset.
    pub committed: i64,
    /// The log end offset, when known.
    pub log_end: Option<i64>,
}

impl Sample {
    /// Log end minus committed, never negative; 0 when the log end is
    /// unknown (Burrow's rule for a missing broker offset).
    pub fn lag(&self) -> i64 {
        self.log_end.map_or(0, |e| (e - self.committed).max(0))
    }
}

/// What the evaluation of one partition needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionWindow {
    /// Samples, oldest first; the last is the live one.
    pub samples: Vec<Sample>,
    /// The oncely database offset, for an oncely consumer.
    pub db_offset: Option<i64>,
    /// The live commit's metadata.
    pub metadata: String,
    /// Whether a live member of the group has this partition assigned.
    pub owned: bool,
}

/// A partition's status and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evaluation {
    /// Status.
    pub status: Status,
    /// Why, in a sentence.
    pub reason: String,
    /// Whether the window had enough samples for every rule.
    pub complete: bool,
}

fn eval(status: Status, reason: impl Into<String>, complete: bool) -> Evaluation {
    Evaluation { status, reason: reason.into(), complete }
}

/// Evaluates one partition (see the module documentation for the rules).
pub fn evaluate(w: &PartitionWindow) -> Evaluation {
    let complete = w.samples.len() >= 2;
    let Some(live) = w.samples.last() else {
        return eval(Status::Ok, "no committed offset", false);
    };
    // REWIND first, whatever the lag.
    // The most recent decrease is the one the operator is looking for.
    if let Some(pair) = w.samples.windows(2).rev().find(|p| p[1].committed < p[0].committed) {
        let by = moved_by(&w.metadata).map(|b| format!(" (live commit by {b})")).unwrap_or_default();
        return eval(
            Status::Rewind,
            format!(
                "the committed offset went back from {} to {} between {} and {}{by}",
                pair[0].committed,
                pair[1].committed,
                crate::admin::parse::format_ms(pair[0].at_ms),
                crate::admin::parse::format_ms(pair[1].at_ms)
            ),
            complete,
        );
    }
    if let Some(db) = w.db_offset {
        if live.committed < db && w.metadata != COMMIT_METADATA {
            let by = moved_by(&w.metadata)
                .unwrap_or_else(|| "another client or tool (e.g. kafka-consumer-groups --reset-offsets)".into());
            return eval(
                Status::Rewind,
                format!(
                    "Kafka's committed offset {} is behind the oncely database offset {db}, moved by {by}",
                    live.committed
                ),
                complete,
            );
        }
    }
    let lag = live.lag();
    if lag == 0 || w.samples.iter().any(|s| s.lag() == 0) {
        return eval(Status::Ok, if lag == 0 { "no lag" } else { "the lag was zero within the window" }, complete);
    }
    let still = w.samples.windows(2).all(|p| p[1].committed == p[0].committed);
    if !w.owned && still {
        return eval(Status::Stop, format!("lag {lag} and no member of the group consumes this partition"), complete);
    }
    if !complete {
        return eval(Status::Ok, format!("lag {lag}; one sample only (run `oncely watch` for a window)"), false);
    }
    if still {
        return eval(
            Status::Stall,
            format!("the committed offset stayed at {} over the window while the lag is {lag}", live.committed),
            true,
        );
    }
    if w.samples.windows(2).all(|p| p[1].lag() >= p[0].lag()) {
        let first = w.samples.first().map_or(0, Sample::lag);
        return eval(Status::Warn, format!("moving, but the lag did not decrease ({first} -> {lag})"), true);
    }
    eval(Status::Ok, format!("lag {lag}, decreasing"), true)
}

/// How many groups [`Session::lag`] evaluates at once.
const LAG_CONCURRENCY: usize = 16;

/// How `oncely lag` builds its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagOptions {
    /// Only snapshots this recent. Default 15 minutes.
    pub window: Duration,
    /// At most this many snapshots. Default 10 (Burrow's `intervals`).
    pub samples: usize,
}

impl Default for LagOptions {
    fn default() -> Self {
        LagOptions { window: Duration::from_secs(15 * 60), samples: 10 }
    }
}

/// Live samples remembered between refreshes of `oncely lag --watch`, so its
/// window slides even when `oncely watch` is not running. Nothing is stored.
#[derive(Debug, Clone, Default)]
pub struct LagHistory {
    samples: BTreeMap<(String, String, i32), Vec<(Sample, String)>>,
}

/// One partition in `oncely lag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Committed offset.
    pub committed: i64,
    /// Log end offset.
    pub log_end: Option<i64>,
    /// Offset lag.
    pub lag: i64,
    /// Time lag (ms): how old the next record to read is; 0 without lag.
    pub time_lag_ms: Option<i64>,
    /// oncely database offset.
    pub db_offset: Option<i64>,
    /// Commit metadata.
    pub metadata: String,
    /// The member consuming it.
    pub owner: Option<String>,
    /// Samples in the window (live included).
    pub window: usize,
    /// Status and why.
    #[serde(flatten)]
    pub evaluation: Evaluation,
}

/// One group in `oncely lag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupLag {
    /// Group.
    pub group: String,
    /// State.
    pub state: String,
    /// Members.
    pub members: usize,
    /// Whether it is an oncely consumer here.
    pub oncely_consumer: bool,
    /// The worst partition status.
    pub status: Status,
    /// Total offset lag.
    pub total_lag: i64,
    /// Largest time lag (ms).
    pub max_time_lag_ms: Option<i64>,
    /// Whether every partition had a full window.
    pub complete: bool,
    /// Per partition.
    pub partitions: Vec<PartitionLag>,
}

impl Session {
    /// Evaluates the lag of `groups` (every group of the cluster when
    /// `None`). Groups that cannot be read are skipped with a warning when
    /// listing all, and fail the call when named.
    pub async fn lag(
        &self,
        groups: Option<&[String]>,
        opts: LagOptions,
        history: &mut LagHistory,
    ) -> Result<Vec<GroupLag>> {
        let (names, named) = match groups {
            Some(g) => (g.to_vec(), true),
            None => (self.admin().list_consumer_groups().await?.into_iter().map(|g| g.group_id).collect(), false),
        };
        // Groups are evaluated a few at a time (a cluster may have hundreds;
        // each takes several round trips), in their listed order. The
        // history is only touched between awaits, under the lock.
        let shared = std::sync::Mutex::new(history);
        let results: Vec<(String, Result<Option<GroupLag>>)> = futures::stream::iter(names)
            .map(|g| {
                let shared = &shared;
                async move {
                    let r = self.group_lag(&g, opts, shared).await;
                    (g, r)
                }
            })
            .buffered(LAG_CONCURRENCY)
            .collect()
            .await;
        let mut out = Vec::new();
        for (g, r) in results {
            match r {
                Ok(Some(l)) => out.push(l),
                Ok(None) => {}
                Err(e) if !named => tracing::warn!(group = %g, error = %e, "Could not evaluate the group's lag."),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn group_lag(
        &self,
        group: &str,
        opts: LagOptions,
        history: &std::sync::Mutex<&mut LagHistory>,
    ) -> Result<Option<GroupLag>> {
        let now = Utc::now();
        let desc = self.describe_group(group).await?;
        let live = self.current_offsets(group).await?;
        let oncely = self.oncely_group(group).await?;
        if live.iter().all(|o| o.offset.is_none()) && oncely.db_offsets.is_empty() {
            return Ok(None);
        }
        let since = now - chrono::Duration::from_std(opts.window).unwrap_or(chrono::Duration::minutes(15));
        let snaps =
            store::admin::window_snapshots(self.pool(), self.cluster_id(), group, since, opts.samples as i64).await?;
        let owners = owners(&desc.members);
        let mut parts = Vec::new();
        // A poisoned lock only means another group's evaluation panicked: its
        // samples are still samples.
        {
            let mut guard = history.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for o in &live {
                let Some(committed) = o.offset else { continue };
                let key = (o.topic.clone(), o.partition);
                let mut samples: Vec<Sample> = snaps
                    .iter()
                    .filter_map(|s| {
                        s.offsets.iter().find(|x| x.topic == o.topic && x.partition == o.partition).and_then(|x| {
                            x.offset.map(|c| Sample {
                                at_ms: s.taken_at.timestamp_millis(),
                                committed: c,
                                log_end: x.log_end,
                            })
                        })
                    })
                    .collect();
                let remembered = guard.samples.entry((group.to_owned(), o.topic.clone(), o.partition)).or_default();
                let horizon = since.timestamp_millis();
                remembered.retain(|(s, _)| s.at_ms >= horizon);
                samples.extend(remembered.iter().map(|(s, _)| *s));
                samples.sort_by_key(|s| s.at_ms);
                let cut = samples.len().saturating_sub(opts.samples);
                samples.drain(..cut);
                let live_sample = Sample { at_ms: now.timestamp_millis(), committed, log_end: o.log_end };
                samples.push(live_sample);
                remembered.push((live_sample, o.metadata.clone()));
                let w = PartitionWindow {
                    db_offset: oncely.db_offsets.get(&key).copied(),
                    metadata: o.metadata.clone(),
                    owned: owners.contains_key(&key),
                    samples,
                };
                let evaluation = evaluate(&w);
                parts.push(PartitionLag {
                    topic: o.topic.clone(),
                    partition: o.partition,
                    committed,
                    log_end: o.log_end,
                    lag: live_sample.lag(),
                    time_lag_ms: (live_sample.lag() == 0).then_some(0),
                    db_offset: w.db_offset,
                    metadata: o.metadata.clone(),
                    owner: owners.get(&key).cloned(),
                    window: w.samples.len(),
                    evaluation,
                });
            }
        }
        // Time lag: the age of the next record to read, from the record.
        let lagging: Vec<(String, i32, i64)> =
            parts.iter().filter(|p| p.lag > 0).map(|p| (p.topic.clone(), p.partition, p.committed)).collect();
        let ts = first_record_timestamps(&self.env().config.connection(), &lagging, Duration::from_secs(10)).await?;
        for p in &mut parts {
            if let Some(t) = ts.get(&(p.topic.clone(), p.partition)) {
                p.time_lag_ms = Some((now.timestamp_millis() - t).max(0));
            }
        }
        Ok(Some(GroupLag {
            group: group.to_owned(),
            state: desc.state.clone(),
            members: desc.members.len(),
            oncely_consumer: oncely.consumer,
            status: parts.iter().map(|p| p.evaluation.status).max().unwrap_or(Status::Ok),
            total_lag: parts.iter().map(|p| p.lag).sum(),
            max_time_lag_ms: parts.iter().filter_map(|p| p.time_lag_ms).max(),
            complete: parts.iter().all(|p| p.evaluation.complete),
            partitions: parts,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(at: i64, committed: i64, log_end: i64) -> Sample {
        Sample { at_ms: at * 30_000, committed, log_end: Some(log_end) }
    }

    fn w(samples: Vec<Sample>) -> PartitionWindow {
        PartitionWindow { samples, db_offset: None, metadata: String::new(), owned: true }
    }

    #[test]
    fn zero_lag_is_ok() {
        assert_eq!(evaluate(&w(vec![s(0, 10, 10), s(1, 20, 20)])).status, Status::Ok);
        assert_eq!(evaluate(&w(vec![s(0, 10, 10), s(1, 15, 20)])).status, Status::Ok, "zero lag within the window");
    }

    #[test]
    fn a_rewind_is_never_hidden_by_zero_lag() {
        // Caught up, rewound to 0, caught up again: Burrow says OK here.
        let e = evaluate(&w(vec![s(0, 100, 100), s(1, 0, 100), s(2, 100, 100)]));
        assert_eq!(e.status, Status::Rewind);
        assert!(e.reason.contains("went back from 100 to 0"), "{}", e.reason);
        // Rewound and still lagging: REWIND, not STOP, even with nobody consuming.
        let mut x = w(vec![s(0, 100, 100), s(1, 0, 100)]);
        x.owned = false;
        assert_eq!(evaluate(&x).status, Status::Rewind);
    }

    #[test]
    fn an_oncely_consumer_behind_its_database_was_rewound_unless_it_is_our_own_lagging_commit() {
        let mut x = w(vec![s(0, 0, 100)]);
        x.db_offset = Some(100);
        let e = evaluate(&x);
        assert_eq!(e.status, Status::Rewind);
        assert!(e.reason.contains("kafka-consumer-groups"), "{}", e.reason);
        x.metadata = "oncely:reset:7".into();
        assert!(evaluate(&x).reason.contains("oncely reset #7"));
        x.metadata = COMMIT_METADATA.into();
        x.samples = vec![s(0, 95, 100)];
        assert_ne!(evaluate(&x).status, Status::Rewind);
    }

    #[test]
    fn stop_stall_warn() {
        let mut x = w(vec![s(0, 10, 50), s(1, 10, 60)]);
        x.owned = false;
        assert_eq!(evaluate(&x).status, Status::Stop);
        x.owned = true;
        assert_eq!(evaluate(&x).status, Status::Stall);
        assert_eq!(evaluate(&w(vec![s(0, 10, 50), s(1, 20, 60), s(2, 30, 75)])).status, Status::Warn);
        assert_eq!(evaluate(&w(vec![s(0, 10, 50), s(1, 30, 60), s(2, 50, 65)])).status, Status::Ok);
    }

    #[test]
    fn one_sample_is_incomplete_but_an_unconsumed_lagging_partition_is_stop() {
        let e = evaluate(&w(vec![s(0, 10, 50)]));
        assert_eq!((e.status, e.complete), (Status::Ok, false));
        let mut x = w(vec![s(0, 10, 50)]);
        x.owned = false;
        assert_eq!(evaluate(&x).status, Status::Stop);
        assert_eq!(evaluate(&w(vec![])).status, Status::Ok);
    }

    #[test]
    fn statuses_order_by_severity() {
        assert!(Status::Ok < Status::Warn && Status::Warn < Status::Stall);
        assert!(Status::Stall < Status::Stop && Status::Stop < Status::Rewind);
        assert_eq!(serde_json::to_value(Status::Rewind).ok(), Some(serde_json::json!("REWIND")));
    }

    proptest! {
        #[test]
        fn any_decrease_in_the_window_is_rewind_and_zero_lag_without_one_is_ok(
            offsets in proptest::collection::vec(0i64..=50, 1..10),
            owned in any::<bool>(),
        ) {
            let samples: Vec<Sample> = offsets.iter().enumerate().map(|(i, o)| s(i as i64, *o, 50)).collect();
            let mut x = w(samples);
            x.owned = owned;
            let e = evaluate(&x);
            let decreased = offsets.windows(2).any(|p| p[1] < p[0]);
            prop_assert_eq!(e.status == Status::Rewind, decreased);
            if !decreased && offsets.last() == Some(&50) {
                prop_assert_eq!(e.status, Status::Ok);
            }
        }
    }
}
