//! The rebalance callbacks: on assignment, each partition's queue is split
//! and a lane spawned for it; on revoke, the lanes drain and their final
//! offsets are committed to Kafka. The start-offset decision a lane takes
//! once it owns its partition is here too, as a pure function.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use super::{lane, PartitionKey, RewindPolicy, Shared, COMMIT_METADATA, RESET_METADATA_PREFIX};

/// The rdkafka context: runs oncely's rebalance logic.
pub(crate) struct Ctx(pub(super) Arc<Shared>);

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn rebalance(&self, base: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.on_assign(base, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.on_revoke(base, tpl),
            other => tracing::error!(consumer = &*self.0.name, error = ?other, "Rebalance failed."),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            // Kafka's offset is a copy for lag tools; the database has the truth.
            tracing::debug!(consumer = &*self.0.name, error = %e, "Kafka offset commit failed (the database offset is authoritative).");
        }
    }
}

impl Ctx {
    /// New partitions: their queues are split **before** they are assigned
    /// (librdkafka decides where a partition's records go when it starts
    /// fetching, inside `incremental_assign`), then each gets a lane. The
    /// database is not touched here: a lane takes its partition over itself,
    /// retrying while the database is unavailable.
    fn on_assign(&self, base: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let s = &self.0;
        let parts: Vec<PartitionKey> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        tracing::info!(consumer = &*s.name, partitions = ?parts, "Partitions assigned.");
        // Kafka's committed offsets and their metadata, to detect moves.
        let kafka = committed_positions(base, tpl).unwrap_or_else(|e| {
            tracing::warn!(consumer = &*s.name, error = %e, "Could not read Kafka's committed offsets; rewinds cannot be detected for this assignment.");
            HashMap::new()
        });
        if !spawn_lanes(s, &parts, tpl, &kafka) {
            return;
        }
        let res = if matches!(base.rebalance_protocol(), rdkafka::consumer::RebalanceProtocol::Cooperative) {
            base.incremental_assign(tpl)
        } else {
            base.assign(tpl)
        };
        if let Err(e) = res {
            tracing::error!(consumer = &*s.name, error = %e, "Assigning partitions failed.");
        }
    }

    fn on_revoke(&self, base: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let s = &self.0;
        let parts: Vec<PartitionKey> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        tracing::info!(consumer = &*s.name, partitions = ?parts, lost = base.assignment_lost(), "Partitions revoked; draining lanes.");
        let handles: Vec<lane::LaneHandle> = match s.lanes.lock() {
            Ok(mut lanes) => parts.iter().filter_map(|k| lanes.remove(k)).collect(),
            Err(_) => Vec::new(),
        };
        let commit = drain_lanes(s, handles);
        // With manual commits librdkafka does not commit on revoke: do it here,
        // before the partitions go to another member.
        if commit.count() > 0 && !base.assignment_lost() {
            if let Err(e) = base.commit(&commit, CommitMode::Sync) {
                tracing::debug!(consumer = &*s.name, error = %e, "Final Kafka commit on revoke failed (database offsets are authoritative).");
            }
        }
        let res = if matches!(base.rebalance_protocol(), rdkafka::consumer::RebalanceProtocol::Cooperative) {
            base.incremental_unassign(tpl)
        } else {
            base.unassign()
        };
        if let Err(e) = res {
            tracing::error!(consumer = &*s.name, error = %e, "Unassigning partitions failed.");
        }
    }
}

/// Kafka's committed offsets of the partitions of `tpl`, with their commit
/// metadata (partitions with no commit left out): to detect moves, and where
/// a partition starts fetching.
pub(super) fn committed_positions<C: rdkafka::consumer::Consumer<Ctx>>(
    consumer: &C,
    tpl: &TopicPartitionList,
) -> rdkafka::error::KafkaResult<HashMap<PartitionKey, (i64, String)>> {
    let c = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10))?;
    Ok(c.elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), (o, e.metadata().to_owned()))),
            _ => None,
        })
        .collect())
}

/// Splits the queues of `parts` (before they are assigned: librdkafka decides
/// where a partition's records go when it starts fetching), sets where each
/// starts fetching in `tpl`, and spawns a lane per partition. Used by the
/// rebalance callback and by a manually assigned consumer (a projection
/// rebuild, which never joins the group).
pub(super) fn spawn_lanes(
    s: &Arc<Shared>,
    parts: &[PartitionKey],
    tpl: &mut TopicPartitionList,
    kafka: &HashMap<PartitionKey, (i64, String)>,
) -> bool {
    let Some(consumer) = s.consumer.get().and_then(Weak::upgrade) else {
        tracing::error!(consumer = &*s.name, "The consumer is gone; not assigning.");
        return false;
    };
    for key in parts {
        let queue = {
            let Ok(mut queues) = s.queues.lock() else { return false };
            match queues.get(key) {
                Some(q) => q.clone(),
                None => match consumer.split_partition_queue(&key.0, key.1) {
                    Some(q) => {
                        let q = Arc::new(q);
                        queues.insert(key.clone(), q.clone());
                        q
                    }
                    None => {
                        tracing::error!(consumer = &*s.name, topic = %key.0, partition = key.1, "Cannot split the partition's queue; not assigning it.");
                        continue;
                    }
                },
            }
        };
        // Start fetching where Kafka's commit says (usually where the
        // database is too); the lane seeks if it decides otherwise.
        let kafka_pos = kafka.get(key).cloned();
        let fetch_from = kafka_pos.as_ref().map_or(s.settings.initial, |(o, _)| Offset::Offset(*o));
        if let Some(mut e) = tpl.find_partition(&key.0, key.1) {
            if let Err(err) = e.set_offset(fetch_from) {
                tracing::error!(error = %err, "Cannot set the start offset.");
            }
        }
        let assigned = lane::Assigned { kafka: kafka_pos, fetch_from };
        let handle = lane::spawn(s.clone(), key.0.clone(), key.1, queue, assigned);
        if let Ok(mut lanes) = s.lanes.lock() {
            if let Some(old) = lanes.insert(key.clone(), handle) {
                old.stop.cancel();
            }
        }
    }
    true
}

/// Stops lanes, waits for each to finish its batch within the drain timeout
/// (then abandons it: its transaction rolls back, harmlessly), and returns the
/// offsets to commit to Kafka.
pub(super) fn drain_lanes(s: &Shared, handles: Vec<lane::LaneHandle>) -> TopicPartitionList {
    for h in &handles {
        h.stop.cancel();
    }
    let deadline = tokio::time::Instant::now() + s.settings.drain_timeout;
    let mut commit = TopicPartitionList::new();
    for h in handles {
        let lane::LaneHandle { topic, partition, join, position, .. } = h;
        let abort = join.abort_handle();
        let finished = s.rt.block_on(async { tokio::time::timeout_at(deadline, join).await.is_ok() });
        if !finished {
            abort.abort();
            tracing::warn!(consumer = &*s.name, topic = %topic, partition, "Abandoned a batch at the drain timeout; it rolls back and is delivered again.");
        }
        let pos = position.load(std::sync::atomic::Ordering::Acquire);
        if pos >= 0 {
            let mut e = commit.add_partition(&topic, partition);
            if e.set_offset(Offset::Offset(pos)).is_ok() {
                e.set_metadata(COMMIT_METADATA);
            }
        }
    }
    commit
}

/// Where a lane starts, decided at assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StartDecision {
    /// The offset to seek to (`None`: Kafka's committed offset or `auto.offset.reset`).
    pub seek: Option<i64>,
    /// The database offset the first batch must find (the fence); `None` = no row yet.
    pub db_next: Option<i64>,
    /// The lane must not consume (halt policy).
    pub halt: bool,
    /// `Some((kind, action))` when Kafka and the database disagreed.
    pub moved: Option<(&'static str, &'static str)>,
}

/// Decides where a partition starts from the database offset, Kafka's
/// committed offset and its commit metadata. Pure, so it is unit-tested.
pub(crate) fn decide_start(
    db: Option<i64>,
    kafka: Option<i64>,
    kafka_metadata: &str,
    rewind: RewindPolicy,
    skip_forward: RewindPolicy,
) -> StartDecision {
    match (db, kafka) {
        (None, k) => StartDecision { seek: k, db_next: None, halt: false, moved: None },
        (Some(d), None) => StartDecision { seek: Some(d), db_next: Some(d), halt: false, moved: None },
        (Some(d), Some(k)) if k == d => StartDecision { seek: Some(d), db_next: Some(d), halt: false, moved: None },
        (Some(d), Some(k)) => {
            // Our own async commit lagging behind the database (a crash before
            // it reached Kafka) is not a move: it carries our metadata.
            if k < d && kafka_metadata == COMMIT_METADATA {
                return StartDecision { seek: Some(d), db_next: Some(d), halt: false, moved: None };
            }
            let kind = if k < d { "rewind" } else { "skip-forward" };
            // `oncely offsets reset` is the operator's deliberate, audited move:
            // follow it whatever the policy.
            let policy = if kafka_metadata.starts_with(RESET_METADATA_PREFIX) {
                RewindPolicy::Replay
            } else if k < d {
                rewind
            } else {
                skip_forward
            };
            match policy {
                RewindPolicy::Skip => {
                    StartDecision { seek: Some(d), db_next: Some(d), halt: false, moved: Some((kind, "skip")) }
                }
                RewindPolicy::Replay => {
                    StartDecision { seek: Some(k), db_next: Some(d), halt: false, moved: Some((kind, "replay")) }
                }
                RewindPolicy::Halt => {
                    StartDecision { seek: Some(d), db_next: Some(d), halt: true, moved: Some((kind, "halt")) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_offsets_start_at_the_database() {
        let d = decide_start(Some(10), Some(10), "", RewindPolicy::Skip, RewindPolicy::Skip);
        assert_eq!(d, StartDecision { seek: Some(10), db_next: Some(10), halt: false, moved: None });
    }

    #[test]
    fn our_own_lagging_commit_is_not_a_rewind() {
        let d = decide_start(Some(10), Some(7), COMMIT_METADATA, RewindPolicy::Halt, RewindPolicy::Halt);
        assert_eq!(d.moved, None);
        assert_eq!(d.seek, Some(10));
        assert!(!d.halt);
    }

    #[test]
    fn external_rewind_follows_the_policy() {
        let skip = decide_start(Some(10), Some(0), "", RewindPolicy::Skip, RewindPolicy::Skip);
        assert_eq!((skip.seek, skip.moved), (Some(10), Some(("rewind", "skip"))));
        let replay = decide_start(Some(10), Some(0), "", RewindPolicy::Replay, RewindPolicy::Skip);
        assert_eq!((replay.seek, replay.db_next, replay.moved), (Some(0), Some(10), Some(("rewind", "replay"))));
        let halt = decide_start(Some(10), Some(0), "", RewindPolicy::Halt, RewindPolicy::Skip);
        assert!(halt.halt);
    }

    #[test]
    fn skip_forward_defaults_to_the_database() {
        let d = decide_start(Some(10), Some(50), "", RewindPolicy::Replay, RewindPolicy::Skip);
        assert_eq!((d.seek, d.moved), (Some(10), Some(("skip-forward", "skip"))));
    }

    #[test]
    fn an_oncely_reset_is_followed() {
        let d = decide_start(Some(10), Some(3), "oncely:reset:42", RewindPolicy::Skip, RewindPolicy::Skip);
        assert_eq!((d.seek, d.db_next, d.moved), (Some(3), Some(10), Some(("rewind", "replay"))));
    }

    #[test]
    fn a_new_partition_adopts_kafkas_offset() {
        let d = decide_start(None, Some(5), "", RewindPolicy::Skip, RewindPolicy::Skip);
        assert_eq!(d, StartDecision { seek: Some(5), db_next: None, halt: false, moved: None });
        let d = decide_start(None, None, "", RewindPolicy::Skip, RewindPolicy::Skip);
        assert_eq!(d.seek, None);
    }
}
