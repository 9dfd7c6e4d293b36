//! A [`Session`]: one environment, its Kafka cluster checked, its database
//! connected. Every operator command opens one first, so that a wrong
//! cluster is refused before anything that matters is read or changed.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use sqlx::PgPool;

use crate::config::Environment;
use crate::error::{Error, Result};
use crate::kafka::admin::{ClusterInfo, GroupDescription, KafkaAdmin, Member, OffsetSpec};
use crate::kafka::{COMMIT_METADATA, RESET_METADATA_PREFIX};
use crate::store;

/// An environment with its live cluster checked and its database connected.
#[derive(Debug, Clone)]
pub struct Session {
    env: Environment,
    admin: KafkaAdmin,
    cluster: ClusterInfo,
    pool: PgPool,
}

impl Session {
    /// Connects to the environment's Kafka cluster and checks its cluster id
    /// against the one the environment expects ([`Error::Refused`] naming
    /// both when they differ; nothing else is read), then connects to the
    /// environment's database.
    pub async fn open(env: Environment) -> Result<Self> {
        let connection = env.config.connection();
        // A wrong password or an untrusted certificate: a clear error now,
        // not a hang while librdkafka retries.
        connection.check_at_start().await?;
        let admin = KafkaAdmin::new(connection, &[])?;
        let cluster = admin.describe_cluster().await?;
        env.check_cluster_id(&cluster.cluster_id)?;
        let pool = store::connect(&env.config.database_url, 4).await?;
        Ok(Session { env, admin, cluster, pool })
    }

    /// Asks the cluster its id again and refuses if it changed (for long-running
    /// commands: the bootstrap address may now lead elsewhere).
    pub async fn recheck_cluster(&self) -> Result<()> {
        let live = self.admin.describe_cluster().await?;
        self.env.check_cluster_id(&live.cluster_id)?;
        if live.cluster_id != self.cluster.cluster_id {
            return Err(Error::Refused(format!(
                "the cluster behind {} changed from {} to {} while running",
                self.env.config.bootstrap_servers, self.cluster.cluster_id, live.cluster_id
            )));
        }
        Ok(())
    }

    /// The environment.
    pub fn env(&self) -> &Environment {
        &self.env
    }

    /// The Admin API client.
    pub fn admin(&self) -> &KafkaAdmin {
        &self.admin
    }

    /// The live cluster's description.
    pub fn cluster(&self) -> &ClusterInfo {
        &self.cluster
    }

    /// The live cluster id (checked against the environment's).
    pub fn cluster_id(&self) -> &str {
        &self.cluster.cluster_id
    }

    /// The environment's database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Refuses unless the operator tables exist (`oncely migrate` applied).
    pub async fn require_operator_schema(&self) -> Result<()> {
        if store::admin::operator_schema_present(&self.pool).await? {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "the database of environment `{}` has no oncely.audit_log / oncely.offset_snapshots: run `oncely migrate` first",
                self.env.name
            )))
        }
    }

    /// Describes one group (`Dead` with no members when unknown).
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        self.admin.describe_consumer_groups(&[group]).await?.into_iter().next().ok_or_else(|| {
            Error::Admin(crate::kafka::admin::AdminError::UnexpectedResult {
                op: "DescribeConsumerGroups",
                detail: format!("no description of {group}"),
            })
        })
    }

    /// Whether `group` is an oncely consumer in this environment's database,
    /// and its database offsets.
    pub async fn oncely_group(&self, group: &str) -> Result<OncelyGroup> {
        if !store::admin::core_schema_present(&self.pool).await? {
            return Ok(OncelyGroup::default());
        }
        let registered = store::is_consumer(&self.pool, group).await?;
        let offsets: BTreeMap<(String, i32), i64> =
            store::offsets::of_consumer(&self.pool, group).await?.into_iter().collect();
        Ok(OncelyGroup { consumer: registered || !offsets.is_empty(), db_offsets: offsets })
    }

    /// Log start and end offsets of the partitions, by `(topic, partition)`;
    /// partitions that could not be asked are left out.
    pub async fn log_bounds(&self, partitions: &[(String, i32)]) -> Result<BTreeMap<(String, i32), (i64, i64)>> {
        let starts = self.admin.list_offsets(partitions, OffsetSpec::Earliest).await?;
        let ends = self.admin.list_offsets(partitions, OffsetSpec::Latest).await?;
        let ends: BTreeMap<(String, i32), i64> =
            ends.into_iter().filter_map(|l| l.offset().map(|o| ((l.topic, l.partition), o))).collect();
        Ok(starts
            .into_iter()
            .filter_map(|l| {
                let start = l.offset().unwrap_or(0);
                let key = (l.topic, l.partition);
                let end = *ends.get(&key)?;
                Some((key, (start, end)))
            })
            .collect())
    }

    /// Per partition: committed offset, oncely database offset, log start
    /// and end, lag, commit metadata; with the group's state and members.
    pub async fn show(&self, group: &str) -> Result<GroupShow> {
        let desc = self.describe_group(group).await?;
        let committed = self.admin.list_consumer_group_offsets(group, None).await?;
        let oncely = self.oncely_group(group).await?;
        let mut topics: BTreeSet<String> = committed.iter().map(|c| c.topic.clone()).collect();
        topics.extend(oncely.db_offsets.keys().map(|(t, _)| t.clone()));
        topics.extend(desc.members.iter().flat_map(|m| m.assignment.iter().map(|(t, _)| t.clone())));
        let mut partitions = Vec::new();
        let mut missing_topics = Vec::new();
        for topic in &topics {
            match self.admin.topic_partitions(topic).await {
                Ok(ps) => partitions.extend(ps.into_iter().map(|p| (topic.clone(), p))),
                Err(e) => {
                    tracing::warn!(topic = %topic, error = %e, "Cannot read the topic's partitions.");
                    missing_topics.push(topic.clone());
                }
            }
        }
        let bounds = if partitions.is_empty() { BTreeMap::new() } else { self.log_bounds(&partitions).await? };
        let committed: BTreeMap<(String, i32), (Option<i64>, String)> =
            committed.into_iter().map(|c| ((c.topic, c.partition), (c.offset, c.metadata))).collect();
        let owners = owners(&desc.members);
        let mut keys: BTreeSet<(String, i32)> = partitions.into_iter().collect();
        keys.extend(committed.keys().cloned());
        keys.extend(oncely.db_offsets.keys().cloned());
        let rows = keys
            .into_iter()
            .map(|key| {
                let (offset, metadata) = committed.get(&key).cloned().unwrap_or((None, String::new()));
                let (log_start, log_end) = bounds.get(&key).map_or((None, None), |(s, e)| (Some(*s), Some(*e)));
                ShowPartition {
                    lag: match (offset, log_end) {
                        (Some(o), Some(e)) => Some((e - o).max(0)),
                        _ => None,
                    },
                    db_offset: oncely.db_offsets.get(&key).copied(),
                    owner: owners.get(&key).cloned(),
                    moved_by: moved_by(&metadata),
                    topic: key.0,
                    partition: key.1,
                    committed: offset,
                    metadata,
                    log_start,
                    log_end,
                }
            })
            .collect();
        Ok(GroupShow {
            environment: self.env.name.clone(),
            cluster_id: self.cluster.cluster_id.clone(),
            group: group.to_owned(),
            state: desc.state.clone(),
            group_type: desc.group_type.clone(),
            members: desc.members.iter().map(MemberInfo::from).collect(),
            oncely_consumer: oncely.consumer,
            partitions: rows,
            missing_topics,
        })
    }
}

/// `(topic, partition) -> "client-id@host"` of the members' assignments.
pub(crate) fn owners(members: &[Member]) -> BTreeMap<(String, i32), String> {
    members
        .iter()
        .flat_map(|m| {
            let who = format!("{}@{}", m.client_id, m.host.trim_start_matches('/'));
            m.assignment.iter().map(move |(t, p)| ((t.clone(), *p), who.clone()))
        })
        .collect()
}

/// Who committed an offset, read from its metadata: `oncely consumer`,
/// `oncely reset #<audit id>`, or `None` (another client or tool).
pub fn moved_by(metadata: &str) -> Option<String> {
    if metadata == COMMIT_METADATA {
        Some("oncely consumer".into())
    } else {
        metadata.strip_prefix(RESET_METADATA_PREFIX).map(|id| format!("oncely reset #{id}"))
    }
}

/// Whether a group is an oncely consumer, and its database offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OncelyGroup {
    /// Registered in `oncely.consumers` or has rows in `oncely.offsets`.
    pub consumer: bool,
    /// `oncely.offsets`: the source of truth for an oncely consumer.
    pub db_offsets: BTreeMap<(String, i32), i64>,
}

/// A group member, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberInfo {
    /// Member id.
    pub member_id: String,
    /// `client.id`.
    pub client_id: String,
    /// Host as the broker sees it.
    pub host: String,
    /// Assigned partitions.
    pub assignment: Vec<(String, i32)>,
}

impl From<&Member> for MemberInfo {
    fn from(m: &Member) -> Self {
        MemberInfo {
            member_id: m.member_id.clone(),
            client_id: m.client_id.clone(),
            host: m.host.trim_start_matches('/').to_owned(),
            assignment: m.assignment.clone(),
        }
    }
}

/// What `oncely offsets show` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupShow {
    /// Environment.
    pub environment: String,
    /// Live cluster id.
    pub cluster_id: String,
    /// Group.
    pub group: String,
    /// State (`Stable`, `Empty`, `Dead`, ...).
    pub state: String,
    /// `Classic` or `Consumer`.
    pub group_type: String,
    /// Members.
    pub members: Vec<MemberInfo>,
    /// Whether it is an oncely consumer in this environment's database.
    pub oncely_consumer: bool,
    /// Per partition.
    pub partitions: Vec<ShowPartition>,
    /// Topics the group has offsets for that the cluster does not know (deleted).
    pub missing_topics: Vec<String>,
}

/// One partition of `oncely offsets show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShowPartition {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Kafka committed offset.
    pub committed: Option<i64>,
    /// oncely database offset (`oncely.offsets`).
    pub db_offset: Option<i64>,
    /// Log start.
    pub log_start: Option<i64>,
    /// Log end.
    pub log_end: Option<i64>,
    /// Log end minus committed.
    pub lag: Option<i64>,
    /// Commit metadata.
    pub metadata: String,
    /// Who committed it, read from the metadata.
    pub moved_by: Option<String>,
    /// The member consuming it (`client-id@host`).
    pub owner: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_names_who_moved_an_offset() {
        assert_eq!(moved_by("oncely:consumer").as_deref(), Some("oncely consumer"));
        assert_eq!(moved_by("oncely:reset:42").as_deref(), Some("oncely reset #42"));
        assert_eq!(moved_by(""), None);
        assert_eq!(moved_by("something else"), None);
    }

    #[test]
    fn owners_map_assignments_to_members() {
        let m = Member {
            member_id: "m1".into(),
            group_instance_id: None,
            client_id: "c1".into(),
            host: "/10.0.0.1".into(),
            assignment: vec![("t".into(), 0), ("t".into(), 2)],
        };
        let o = owners(&[m]);
        assert_eq!(o.get(&("t".to_owned(), 2)).map(String::as_str), Some("c1@10.0.0.1"));
        assert_eq!(o.len(), 2);
    }
}
