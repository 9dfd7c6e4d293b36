//! Snapshots of consumer group offsets (`oncely.offset_snapshots`): written
//! by `oncely watch` every 30 s, by `oncely offsets snapshot`, and before
//! every offset change, so that "where were we at 02:44?" always has an
//! answer and every change can be undone.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::admin::session::Session;
use crate::error::{Error, Result};
use crate::kafka::admin::{GroupOffset, OffsetSpec};
use crate::store;

// The rows live beside their queries, in the store.
pub use crate::store::admin::{NewSnapshot, PartitionOffset, Snapshot, SnapshotReason};

impl From<GroupOffset> for PartitionOffset {
    fn from(g: GroupOffset) -> Self {
        PartitionOffset {
            topic: g.topic,
            partition: g.partition,
            offset: g.offset,
            metadata: g.metadata,
            log_end: None,
        }
    }
}

/// Stores a snapshot; returns it as stored.
pub async fn insert(pool: &PgPool, s: &NewSnapshot<'_>) -> Result<Snapshot> {
    store::admin::insert_snapshot(pool, s).await
}

/// The snapshot with this id.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<Snapshot>> {
    store::admin::get_snapshot(pool, id).await
}

/// The last snapshot of `group` on `cluster_id` taken at or before `at`.
pub async fn last_at_or_before(
    pool: &PgPool,
    cluster_id: &str,
    group: &str,
    at: DateTime<Utc>,
) -> Result<Option<Snapshot>> {
    store::admin::snapshot_at_or_before(pool, cluster_id, group, at).await
}

/// Snapshots, newest first: of `group` if given, on `cluster_id` if given,
/// at most `limit`.
pub async fn list(pool: &PgPool, cluster_id: Option<&str>, group: Option<&str>, limit: i64) -> Result<Vec<Snapshot>> {
    store::admin::list_snapshots(pool, cluster_id, group, limit).await
}

/// The snapshot taken before the change recorded as audit `audit_id`.
pub async fn before_change(pool: &PgPool, audit_id: i64) -> Result<Option<Snapshot>> {
    store::admin::snapshot_for_audit(pool, audit_id).await
}

/// Deletes `watch` snapshots older than `before`; the others (manual, and
/// those taken before a change, which undo needs) are kept. Returns how many
/// were deleted.
pub async fn prune_watch(pool: &PgPool, before: DateTime<Utc>) -> Result<u64> {
    store::admin::delete_watch_snapshots(pool, before).await
}

/// What one round of snapshots did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SnapshotRound {
    /// The snapshots taken.
    pub taken: Vec<Snapshot>,
    /// Groups that could not be snapshotted, with why. One group failing (a
    /// deleted topic, a coordinator moving) does not stop the others.
    pub failed: Vec<(String, String)>,
    /// Groups skipped because they have no committed offset.
    pub empty: Vec<String>,
}

impl Session {
    /// The group's committed offsets with each partition's log end, as a
    /// snapshot stores them. The log ends are best effort (`None` when the
    /// topic cannot be asked, e.g. it was deleted).
    pub async fn current_offsets(&self, group: &str) -> Result<Vec<PartitionOffset>> {
        let committed = self.admin().list_consumer_group_offsets(group, None).await?;
        let mut offsets: Vec<PartitionOffset> = committed.into_iter().map(PartitionOffset::from).collect();
        let mut by_topic: BTreeMap<String, Vec<(String, i32)>> = BTreeMap::new();
        for o in &offsets {
            by_topic.entry(o.topic.clone()).or_default().push((o.topic.clone(), o.partition));
        }
        let mut ends = BTreeMap::new();
        for (topic, parts) in by_topic {
            match self.admin().list_offsets(&parts, OffsetSpec::Latest).await {
                Ok(listed) => {
                    for l in listed {
                        if let Some(o) = l.offset() {
                            ends.insert((l.topic, l.partition), o);
                        }
                    }
                }
                Err(e) => tracing::warn!(group, topic = %topic, error = %e, "Could not read the log end offsets."),
            }
        }
        for o in &mut offsets {
            o.log_end = ends.get(&(o.topic.clone(), o.partition)).copied();
        }
        Ok(offsets)
    }

    /// Snapshots the committed offsets of `groups` (every consumer group of
    /// the cluster when `None`), each as its own row.
    pub async fn snapshot_groups(&self, groups: Option<&[String]>, reason: SnapshotReason) -> Result<SnapshotRound> {
        let names: Vec<String> = match groups {
            Some(g) => g.to_vec(),
            None => self.admin().list_consumer_groups().await?.into_iter().map(|g| g.group_id).collect(),
        };
        let mut round = SnapshotRound::default();
        for group in names {
            match self.current_offsets(&group).await {
                Ok(offsets) if offsets.iter().all(|o| o.offset.is_none()) => round.empty.push(group),
                Ok(offsets) => {
                    let s = insert(
                        self.pool(),
                        &NewSnapshot {
                            environment: &self.env().name,
                            cluster_id: self.cluster_id(),
                            group: &group,
                            reason,
                            audit_id: None,
                            offsets: &offsets,
                        },
                    )
                    .await?;
                    round.taken.push(s);
                }
                Err(Error::Admin(e)) => {
                    tracing::warn!(group = %group, error = %e, "Could not snapshot the group.");
                    round.failed.push((group, e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_offsets_round_trip_through_json_compactly() {
        let o = PartitionOffset {
            topic: "t".into(),
            partition: 1,
            offset: Some(5),
            metadata: String::new(),
            log_end: None,
        };
        let v = serde_json::to_value(&o).expect("json");
        assert_eq!(v, serde_json::json!({"topic": "t", "partition": 1, "offset": 5}));
        let back: PartitionOffset = serde_json::from_value(v).expect("back");
        assert_eq!(back, o);
        let none: PartitionOffset =
            serde_json::from_value(serde_json::json!({"topic": "t", "partition": 0, "offset": null, "log_end": 9}))
                .expect("none");
        assert_eq!((none.offset, none.log_end), (None, Some(9)));
    }

    #[test]
    fn committed_leaves_out_partitions_without_a_commit() {
        let s = Snapshot {
            id: 1,
            taken_at: Utc::now(),
            environment: "e".into(),
            cluster_id: "c".into(),
            group: "g".into(),
            reason: "manual".into(),
            audit_id: None,
            offsets: vec![
                PartitionOffset {
                    topic: "t".into(),
                    partition: 0,
                    offset: Some(3),
                    metadata: String::new(),
                    log_end: None,
                },
                PartitionOffset {
                    topic: "t".into(),
                    partition: 1,
                    offset: None,
                    metadata: String::new(),
                    log_end: None,
                },
            ],
        };
        assert_eq!(s.committed().into_iter().collect::<Vec<_>>(), vec![(("t".to_owned(), 0), 3)]);
        assert_eq!(SnapshotReason::BeforeChange.as_str(), "before-change");
    }
}
