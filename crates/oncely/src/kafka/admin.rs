//! The Kafka Admin API calls the operator tools need, as a safe async API.
//!
//! `rdkafka` 0.39 does not wrap ListConsumerGroupOffsets,
//! AlterConsumerGroupOffsets, DeleteConsumerGroupOffsets,
//! DescribeConsumerGroups, ListOffsets, ListConsumerGroups or
//! DescribeCluster, so [`KafkaAdmin`] drives them
//! through `rdkafka-sys` (the unsafe part lives in the private `ffi`
//! submodule: every librdkafka object is owned by a guard that destroys it on
//! every path, and result memory is copied out before its event is
//! destroyed). Each request gets a private librdkafka queue and waits on it on
//! tokio's blocking pool, so an `await` never blocks a runtime worker.
//! Topic metadata and configs use `rdkafka`'s own client.
//!
//! Offsets are changed only through AlterConsumerGroupOffsets and
//! DeleteConsumerGroupOffsets, which the broker refuses while the group has
//! members: that refusal is [`AdminError::GroupActive`], never worked around.
//!
//! ```no_run
//! # async fn run() -> Result<(), oncely::kafka::admin::AdminError> {
//! use oncely::kafka::admin::{KafkaAdmin, OffsetSpec};
//!
//! let admin = KafkaAdmin::new("127.0.0.1:9092", &[])?;
//! let cluster = admin.describe_cluster().await?;
//! println!("cluster {}", cluster.cluster_id);
//! let ends = admin.list_offsets(&[("orders".to_owned(), 0)], OffsetSpec::Latest).await?;
//! println!("log end {:?}", ends[0].offset());
//! # Ok(()) }
//! ```

mod ffi;

/// The cached low and high watermarks of a partition for `client` (what its
/// last fetch response said; no request is sent): for lag gauges.
pub(crate) fn cached_watermarks<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    partition: i32,
) -> Option<(i64, i64)> {
    ffi::cached_watermarks(client.native_ptr(), topic, partition)
}

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::{Backoff, Retries};
use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

/// `Result` of this module.
pub type AdminResult<T> = std::result::Result<T, AdminError>;

/// A Kafka or librdkafka error code, as the plain number librdkafka reports:
/// broker codes are positive, librdkafka's own (local) codes negative.
///
/// Kept as an integer rather than `rdkafka`'s enum because a broker may send
/// a code that enum does not list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub i32);

impl ErrorCode {
    /// `UNKNOWN_TOPIC_OR_PARTITION` (3).
    pub const UNKNOWN_TOPIC_OR_PARTITION: ErrorCode = ErrorCode(3);
    /// `COORDINATOR_LOAD_IN_PROGRESS` (14): retriable.
    pub const COORDINATOR_LOAD_IN_PROGRESS: ErrorCode = ErrorCode(14);
    /// `NOT_COORDINATOR` (16): retriable.
    pub const NOT_COORDINATOR: ErrorCode = ErrorCode(16);
    /// `COORDINATOR_NOT_AVAILABLE` (15).
    pub const COORDINATOR_NOT_AVAILABLE: ErrorCode = ErrorCode(15);
    /// `ILLEGAL_GENERATION` (22).
    pub const ILLEGAL_GENERATION: ErrorCode = ErrorCode(22);
    /// `UNKNOWN_MEMBER_ID` (25): what a broker answers an offset commit
    /// without a member id for a group that has members.
    pub const UNKNOWN_MEMBER_ID: ErrorCode = ErrorCode(25);
    /// `REBALANCE_IN_PROGRESS` (27).
    pub const REBALANCE_IN_PROGRESS: ErrorCode = ErrorCode(27);
    /// `GROUP_AUTHORIZATION_FAILED` (30).
    pub const GROUP_AUTHORIZATION_FAILED: ErrorCode = ErrorCode(30);
    /// `NON_EMPTY_GROUP` (68, Kafka's `GROUP_NOT_EMPTY`).
    pub const NON_EMPTY_GROUP: ErrorCode = ErrorCode(68);
    /// `GROUP_ID_NOT_FOUND` (69).
    pub const GROUP_ID_NOT_FOUND: ErrorCode = ErrorCode(69);
    /// `GROUP_SUBSCRIBED_TO_TOPIC` (86): DeleteConsumerGroupOffsets of a
    /// topic an active member subscribes to.
    pub const GROUP_SUBSCRIBED_TO_TOPIC: ErrorCode = ErrorCode(86);
    /// `FENCED_MEMBER_EPOCH` (110, KIP-848 groups).
    pub const FENCED_MEMBER_EPOCH: ErrorCode = ErrorCode(110);
    /// `STALE_MEMBER_EPOCH` (113, KIP-848 groups).
    pub const STALE_MEMBER_EPOCH: ErrorCode = ErrorCode(113);
    /// librdkafka's local `_TIMED_OUT` (-185).
    pub const TIMED_OUT: ErrorCode = ErrorCode(-185);

    /// librdkafka's short name (`UNKNOWN_MEMBER_ID`; `ERR_<n>?` when unknown).
    pub fn name(self) -> String {
        ffi::err_name(self.0)
    }

    /// librdkafka's description (`Broker: Unknown member`).
    pub fn description(self) -> String {
        ffi::err_description(self.0)
    }

    /// Whether a broker refusing an offset change with this code means the
    /// group has live members (or is rebalancing) that a commit without a
    /// member id cannot override.
    pub fn means_group_active(self) -> bool {
        [
            Self::UNKNOWN_MEMBER_ID,
            Self::NON_EMPTY_GROUP,
            Self::REBALANCE_IN_PROGRESS,
            Self::ILLEGAL_GENERATION,
            Self::GROUP_SUBSCRIBED_TO_TOPIC,
            Self::FENCED_MEMBER_EPOCH,
            Self::STALE_MEMBER_EPOCH,
        ]
        .contains(&self)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// One partition a request failed for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionError {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The error code the broker (or librdkafka) gave.
    pub code: ErrorCode,
}

impl fmt::Display for PartitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]: {}", self.topic, self.partition, self.code)
    }
}

fn join_failures(failures: &[PartitionError]) -> String {
    failures.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
}

/// Everything a [`KafkaAdmin`] call can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The client could not be created, or an `rdkafka` call failed.
    #[error("kafka client error: {0}")]
    Client(KafkaError),
    /// An argument was rejected before anything was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The whole request failed (broker unreachable, bad request, ...).
    #[error("{op} failed: {code}: {message}")]
    Request {
        /// The Admin API operation.
        op: &'static str,
        /// The error code.
        code: ErrorCode,
        /// librdkafka's message.
        message: String,
    },
    /// The request failed for one group or topic.
    #[error("{op} failed for {target}: {code}: {message}")]
    Target {
        /// The Admin API operation.
        op: &'static str,
        /// The group id or topic.
        target: String,
        /// The error code.
        code: ErrorCode,
        /// librdkafka's message.
        message: String,
    },
    /// The request failed for some partitions (and none of its results is
    /// returned).
    #[error("{op} failed for {} partition(s): {}", .failures.len(), join_failures(.failures))]
    Partitions {
        /// The Admin API operation.
        op: &'static str,
        /// The partitions that failed.
        failures: Vec<PartitionError>,
    },
    /// The broker refused to change the group's offsets because the group
    /// has active members (or is rebalancing). Stop its consumers first.
    #[error("group {group} is active: the broker refused to change its offsets: {code}")]
    GroupActive {
        /// The group.
        group: String,
        /// The broker's code, e.g. [`ErrorCode::UNKNOWN_MEMBER_ID`].
        code: ErrorCode,
        /// The partitions refused.
        failures: Vec<PartitionError>,
    },
    /// No answer in time (librdkafka's request timeout, or our wait for it).
    #[error("{op} timed out after {after:?}")]
    Timeout {
        /// The Admin API operation.
        op: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// librdkafka's result did not have the expected shape.
    #[error("{op}: unexpected result: {detail}")]
    UnexpectedResult {
        /// The Admin API operation.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The blocking task that ran the request panicked or was cancelled.
    #[error("{op}: the blocking task failed: {error}")]
    Task {
        /// The Admin API operation.
        op: &'static str,
        /// Why.
        error: tokio::task::JoinError,
    },
}

impl AdminError {
    /// Whether the request may succeed if sent again shortly: the group
    /// coordinator is loading, moving or not elected yet (a fresh or just
    /// restarted broker loads `__consumer_offsets` first).
    pub fn is_retriable(&self) -> bool {
        let retriable = |c: ErrorCode| {
            c == ErrorCode::COORDINATOR_LOAD_IN_PROGRESS
                || c == ErrorCode::COORDINATOR_NOT_AVAILABLE
                || c == ErrorCode::NOT_COORDINATOR
        };
        match self {
            AdminError::Request { code, .. } | AdminError::Target { code, .. } => retriable(*code),
            AdminError::Partitions { failures, .. } => {
                !failures.is_empty() && failures.iter().all(|f| retriable(f.code))
            }
            _ => false,
        }
    }

    /// Whether this is the broker refusing an offset change for an active group.
    pub fn is_group_active(&self) -> bool {
        matches!(self, AdminError::GroupActive { .. })
    }
}

impl From<KafkaError> for AdminError {
    fn from(e: KafkaError) -> Self {
        AdminError::Client(e)
    }
}

/// A broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Broker id.
    pub id: i32,
    /// Advertised host.
    pub host: String,
    /// Advertised port.
    pub port: u16,
    /// Rack, when configured.
    pub rack: Option<String>,
}

/// What DescribeCluster reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterInfo {
    /// The cluster id (what `kafka-cluster cluster-id` prints).
    pub cluster_id: String,
    /// The controller's broker id, when the broker names one (in KRaft,
    /// brokers report some live broker here, not the quorum controller).
    pub controller_id: Option<i32>,
    /// The brokers.
    pub nodes: Vec<Node>,
}

/// A group's committed offset for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The committed offset (the next record the group will read); `None`
    /// when the group has committed nothing for this partition.
    pub offset: Option<i64>,
    /// The metadata string committed with it (empty when none).
    pub metadata: String,
}

/// A group as ListConsumerGroups reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    /// Group id.
    pub group_id: String,
    /// State name, as in [`GroupDescription::state`].
    pub state: String,
    /// Whether it is a simple group (offsets only, no group protocol).
    pub is_simple: bool,
    /// `Classic`, `Consumer` (KIP-848) or `Unknown`.
    pub group_type: String,
}

/// A group member as DescribeConsumerGroups reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member id the coordinator gave it.
    pub member_id: String,
    /// Static membership id (`group.instance.id`), when set.
    pub group_instance_id: Option<String>,
    /// The consumer's `client.id`.
    pub client_id: String,
    /// The host the consumer connects from, as the broker sees it.
    pub host: String,
    /// The partitions assigned to it.
    pub assignment: Vec<(String, i32)>,
}

/// A consumer group as DescribeConsumerGroups reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// Group id.
    pub group_id: String,
    /// The broker's state name: `Stable`, `Empty`, `Dead`,
    /// `PreparingRebalance`, `CompletingRebalance`, or `Unknown` (which is
    /// also how librdkafka reports KIP-848's `Assigning`/`Reconciling`).
    pub state: String,
    /// `Classic`, `Consumer` (KIP-848) or `Unknown`.
    pub group_type: String,
    /// `consumer`, or empty for a simple group. librdkafka describes only
    /// these two; any other protocol type is an error.
    pub protocol_type: String,
    /// Whether it is a simple group (offsets only, no group protocol).
    pub is_simple: bool,
    /// The assignor in use (`range`, `cooperative-sticky`, ...); empty when none.
    pub partition_assignor: String,
    /// The members.
    pub members: Vec<Member>,
    /// The group's coordinator.
    pub coordinator: Option<Node>,
}

impl GroupDescription {
    /// Whether the group has no members, so that its offsets may be changed.
    pub fn is_inactive(&self) -> bool {
        self.members.is_empty() && matches!(self.state.as_str(), "Empty" | "Dead")
    }
}

/// Which offset ListOffsets looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The log end offset (the high watermark; the last stable offset with
    /// [`KafkaAdmin::read_committed`]).
    Latest,
    /// The first offset whose record timestamp is at or after this many
    /// milliseconds since the Unix epoch.
    Timestamp(i64),
}

impl OffsetSpec {
    /// The value librdkafka expects in the request's offset field.
    fn to_raw(self) -> AdminResult<i64> {
        match self {
            OffsetSpec::Earliest => Ok(-2),
            OffsetSpec::Latest => Ok(-1),
            OffsetSpec::Timestamp(ts) if ts >= 0 => Ok(ts),
            OffsetSpec::Timestamp(ts) => Err(AdminError::InvalidArgument(format!("negative timestamp {ts}"))),
        }
    }
}

/// Where a ListOffsets lookup landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListedPosition {
    /// An offset. `timestamp` is the record's timestamp (ms) for a
    /// [`OffsetSpec::Timestamp`] lookup; `None` for earliest and latest,
    /// for which the broker reports none.
    Offset {
        /// The offset.
        offset: i64,
        /// The record's timestamp, when the broker reports one.
        timestamp: Option<i64>,
    },
    /// No record has a timestamp at or after the one asked for (the broker
    /// answers offset -1): the position is the log end. Ask with
    /// [`OffsetSpec::Latest`] for its number.
    LogEnd,
}

/// ListOffsets' answer for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Where the lookup landed.
    pub position: ListedPosition,
}

impl ListedOffset {
    /// The offset, or `None` for [`ListedPosition::LogEnd`].
    pub fn offset(&self) -> Option<i64> {
        match self.position {
            ListedPosition::Offset { offset, .. } => Some(offset),
            ListedPosition::LogEnd => None,
        }
    }

    /// The record timestamp the broker reported, if any.
    pub fn timestamp(&self) -> Option<i64> {
        match self.position {
            ListedPosition::Offset { timestamp, .. } => timestamp,
            ListedPosition::LogEnd => None,
        }
    }
}

/// A topic's configuration as DescribeConfigs reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    /// Topic.
    pub topic: String,
    /// Every entry that has a value (defaults included), by name.
    pub entries: BTreeMap<String, String>,
}

impl TopicConfig {
    /// `retention.ms`: `Some(-1)` means unlimited; `None` when the broker
    /// did not report a number.
    pub fn retention_ms(&self) -> Option<i64> {
        self.entries.get("retention.ms").and_then(|v| v.parse().ok())
    }

    /// `max.message.bytes`: the largest record batch the topic accepts (the
    /// topic's own value, else the broker's default).
    pub fn max_message_bytes(&self) -> Option<usize> {
        self.entries.get("max.message.bytes").and_then(|v| v.parse().ok())
    }

    /// The value of `name` as a number, if it has one.
    pub fn number(&self, name: &str) -> Option<i64> {
        self.entries.get(name).and_then(|v| v.parse().ok())
    }
}

/// Per-request settings, copied into each blocking task.
#[derive(Debug, Clone, Copy)]
struct Settings {
    timeout: Duration,
    read_committed: bool,
}

/// A Kafka Admin API client for the operator tools. Cheap to clone; every
/// method may run concurrently with others.
#[derive(Debug, Clone)]
pub struct KafkaAdmin {
    client: Arc<AdminClient<DefaultClientContext>>,
    settings: Settings,
}

impl KafkaAdmin {
    /// Connects to `bootstrap_servers` with `client.id=oncely-admin`,
    /// `allow.auto.create.topics=false` and then the `extra` librdkafka
    /// properties (security settings, ...), which override those.
    pub fn new(connection: impl Into<crate::kafka::KafkaConnection>, extra: &[(&str, &str)]) -> AdminResult<Self> {
        let mut config = connection.into().client_config().map_err(|e| AdminError::InvalidArgument(e.to_string()))?;
        config.set("client.id", "oncely-admin");
        // The admin client is a producer-type handle, whose default lets a
        // metadata lookup of a mistyped topic create it.
        config.set("allow.auto.create.topics", "false");
        for (k, v) in extra {
            config.set(*k, *v);
        }
        Self::from_config(&config)
    }

    /// A client from a complete librdkafka configuration.
    pub fn from_config(config: &ClientConfig) -> AdminResult<Self> {
        let client: AdminClient<DefaultClientContext> = config.create()?;
        Ok(KafkaAdmin {
            client: Arc::new(client),
            settings: Settings { timeout: Duration::from_secs(30), read_committed: false },
        })
    }

    /// How long one request may take (librdkafka's request timeout).
    /// Default 30 s: long enough for a coordinator to finish loading.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// Whether [`OffsetSpec::Latest`] means the last stable offset (what a
    /// `read_committed` consumer can reach) instead of the high watermark.
    /// Default false, as Kafka's own tools.
    pub fn read_committed(mut self, yes: bool) -> Self {
        self.settings.read_committed = yes;
        self
    }

    /// Runs a group request again, with backoff, while it fails with a
    /// retriable coordinator error, until the request timeout.
    async fn with_retry<T, F, Fut>(&self, mut f: F) -> AdminResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = AdminResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.settings.timeout;
        let mut retries = Retries::new(Backoff::new(Duration::from_millis(100), Duration::from_secs(1)));
        loop {
            let delay = retries.peek();
            match f().await {
                Err(e) if e.is_retriable() && tokio::time::Instant::now() + delay < deadline => {
                    tracing::debug!(error = %e, retry_in = ?delay, "Retrying an Admin API request.");
                    tokio::time::sleep(retries.next_delay()).await;
                }
                r => return r,
            }
        }
    }

    /// Runs `f` with the client on tokio's blocking pool.
    async fn blocking<T, F>(&self, op: &'static str, f: F) -> AdminResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&AdminClient<DefaultClientContext>, Settings) -> AdminResult<T> + Send + 'static,
    {
        let client = Arc::clone(&self.client);
        let settings = self.settings;
        tokio::task::spawn_blocking(move || f(&client, settings))
            .await
            .map_err(|error| AdminError::Task { op, error })?
    }

    /// The cluster id, controller and brokers (DescribeCluster).
    pub async fn describe_cluster(&self) -> AdminResult<ClusterInfo> {
        self.blocking("DescribeCluster", |c, s| ffi::describe_cluster(c.inner().native_ptr(), s)).await
    }

    /// Every consumer group and its state (ListConsumerGroups). Fails if any
    /// broker could not answer, rather than return a partial list.
    pub async fn list_consumer_groups(&self) -> AdminResult<Vec<GroupListing>> {
        self.with_retry(|| self.list_consumer_groups_once()).await
    }

    async fn list_consumer_groups_once(&self) -> AdminResult<Vec<GroupListing>> {
        let (mut groups, errors) =
            self.blocking("ListConsumerGroups", |c, s| ffi::list_groups(c.inner().native_ptr(), s)).await?;
        if let Some((code, message)) = errors.into_iter().next() {
            return Err(AdminError::Request { op: "ListConsumerGroups", code, message });
        }
        groups.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        Ok(groups)
    }

    /// Describes `groups` (DescribeConsumerGroups), in the order given. A group
    /// the broker does not know comes back in state `Dead` with no members.
    pub async fn describe_consumer_groups(&self, groups: &[impl AsRef<str>]) -> AdminResult<Vec<GroupDescription>> {
        let names: Vec<String> = groups.iter().map(|g| g.as_ref().to_owned()).collect();
        self.with_retry(|| self.describe_consumer_groups_once(&names)).await
    }

    async fn describe_consumer_groups_once(&self, groups: &[String]) -> AdminResult<Vec<GroupDescription>> {
        const OP: &str = "DescribeConsumerGroups";
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = groups.iter().map(|g| AsRef::<str>::as_ref(g).to_owned()).collect();
        let asked = names.clone();
        let results = self.blocking(OP, move |c, s| ffi::describe_groups(c.inner().native_ptr(), s, &names)).await?;
        let mut by_id = BTreeMap::new();
        for r in results {
            match r {
                Ok(d) => {
                    by_id.insert(d.group_id.clone(), d);
                }
                Err((group, code, _)) if code == ErrorCode::GROUP_ID_NOT_FOUND => {
                    by_id.insert(group.clone(), dead_group(group));
                }
                Err((target, code, message)) => return Err(AdminError::Target { op: OP, target, code, message }),
            }
        }
        asked
            .into_iter()
            .map(|g| {
                by_id
                    .remove(&g)
                    .ok_or_else(|| AdminError::UnexpectedResult { op: OP, detail: format!("no result for {g}") })
            })
            .collect()
    }

    /// The group's committed offsets (ListConsumerGroupOffsets) for
    /// `partitions`, or for every partition it has committed when `None`.
    /// A partition asked for without a commit has `offset: None`.
    pub async fn list_consumer_group_offsets(
        &self,
        group: &str,
        partitions: Option<&[(String, i32)]>,
    ) -> AdminResult<Vec<GroupOffset>> {
        self.with_retry(|| self.list_consumer_group_offsets_once(group, partitions)).await
    }

    async fn list_consumer_group_offsets_once(
        &self,
        group: &str,
        partitions: Option<&[(String, i32)]>,
    ) -> AdminResult<Vec<GroupOffset>> {
        const OP: &str = "ListConsumerGroupOffsets";
        if partitions.is_some_and(|p| p.is_empty()) {
            return Ok(Vec::new());
        }
        let group = group.to_owned();
        let partitions = partitions.map(<[_]>::to_vec);
        let raw = self
            .blocking(OP, move |c, s| ffi::list_group_offsets(c.inner().native_ptr(), s, &group, partitions.as_deref()))
            .await?;
        check_partitions(OP, &raw)?;
        let mut out: Vec<GroupOffset> = raw.into_iter().map(group_offset).collect();
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(out)
    }

    /// Sets the group's committed offsets (AlterConsumerGroupOffsets): each
    /// entry is `(topic, partition, offset, metadata)`. The broker applies
    /// the partitions independently; this fails if any failed, with
    /// [`AdminError::GroupActive`] when the group has members. On success,
    /// returns what the broker committed.
    pub async fn alter_consumer_group_offsets(
        &self,
        group: &str,
        offsets: &[(String, i32, i64, String)],
    ) -> AdminResult<Vec<GroupOffset>> {
        self.with_retry(|| self.alter_consumer_group_offsets_once(group, offsets)).await
    }

    async fn alter_consumer_group_offsets_once(
        &self,
        group: &str,
        offsets: &[(String, i32, i64, String)],
    ) -> AdminResult<Vec<GroupOffset>> {
        const OP: &str = "AlterConsumerGroupOffsets";
        validate_alter(offsets)?;
        let owned_group = group.to_owned();
        let offsets = offsets.to_vec();
        let raw = self
            .blocking(OP, move |c, s| ffi::alter_group_offsets(c.inner().native_ptr(), s, &owned_group, &offsets))
            .await
            .map_err(|e| group_level_active(group, e))?;
        check_alter(group, &raw)?;
        let mut out: Vec<GroupOffset> = raw.into_iter().map(group_offset).collect();
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(out)
    }

    /// Removes the group's committed offsets of `partitions`
    /// (DeleteConsumerGroupOffsets): afterwards the group has no commit there,
    /// as before its first one, and a consumer starts where its
    /// `auto.offset.reset` says. The broker refuses while a member subscribes
    /// to the topic ([`AdminError::GroupActive`]); a partition without a
    /// commit is not an error.
    pub async fn delete_consumer_group_offsets(&self, group: &str, partitions: &[(String, i32)]) -> AdminResult<()> {
        self.with_retry(|| self.delete_consumer_group_offsets_once(group, partitions)).await
    }

    async fn delete_consumer_group_offsets_once(&self, group: &str, partitions: &[(String, i32)]) -> AdminResult<()> {
        const OP: &str = "DeleteConsumerGroupOffsets";
        if partitions.is_empty() {
            return Err(AdminError::InvalidArgument("no partitions to delete offsets of".into()));
        }
        if let Some((t, p)) = partitions.iter().find(|(_, p)| *p < 0) {
            return Err(AdminError::InvalidArgument(format!("partition {p} of {t} is negative")));
        }
        let owned_group = group.to_owned();
        let partitions = partitions.to_vec();
        let raw = self
            .blocking(OP, move |c, s| ffi::delete_group_offsets(c.inner().native_ptr(), s, &owned_group, &partitions))
            .await
            .map_err(|e| group_level_active(group, e))?;
        check_changed(OP, group, &raw)
    }

    /// Looks up offsets by `spec` (ListOffsets), one answer per partition,
    /// sorted by topic and partition.
    pub async fn list_offsets(&self, partitions: &[(String, i32)], spec: OffsetSpec) -> AdminResult<Vec<ListedOffset>> {
        const OP: &str = "ListOffsets";
        spec.to_raw()?;
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let partitions = partitions.to_vec();
        let raw =
            self.blocking(OP, move |c, s| ffi::list_offsets(c.inner().native_ptr(), s, &partitions, spec)).await?;
        let failures: Vec<PartitionError> = raw
            .iter()
            .filter(|r| r.partition.err.0 != 0)
            .map(|r| PartitionError {
                topic: r.partition.topic.clone(),
                partition: r.partition.partition,
                code: r.partition.err,
            })
            .collect();
        if !failures.is_empty() {
            return Err(AdminError::Partitions { op: OP, failures });
        }
        let mut out: Vec<ListedOffset> = raw
            .into_iter()
            .map(|r| ListedOffset {
                position: listed_position(r.partition.offset, r.timestamp),
                topic: r.partition.topic,
                partition: r.partition.partition,
            })
            .collect();
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(out)
    }

    /// The topic's partition ids, sorted (from metadata). An unknown topic is
    /// an error, and is not created.
    pub async fn topic_partitions(&self, topic: &str) -> AdminResult<Vec<i32>> {
        const OP: &str = "Metadata";
        let topic = topic.to_owned();
        self.blocking(OP, move |c, s| {
            let md = c.inner().fetch_metadata(Some(&topic), s.timeout)?;
            let t = md.topics().iter().find(|t| t.name() == topic).ok_or_else(|| AdminError::UnexpectedResult {
                op: OP,
                detail: format!("no metadata for topic {topic}"),
            })?;
            if let Some(err) = t.error() {
                let code = ErrorCode(err as i32);
                return Err(AdminError::Target { op: OP, target: topic.clone(), code, message: code.description() });
            }
            let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
            ids.sort_unstable();
            Ok(ids)
        })
        .await
    }

    /// Creates topic `name` (CreateTopics, through `rdkafka`) with
    /// `partitions` partitions, the broker's default replication factor and
    /// the topic `configs`. `Ok(false)`: it exists already (and is left as
    /// it is).
    pub async fn create_topic(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) -> AdminResult<bool> {
        const OP: &str = "CreateTopics";
        let mut new = NewTopic::new(name, partitions, TopicReplication::Fixed(-1));
        for (k, v) in configs {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new()
            .operation_timeout(Some(self.settings.timeout))
            .request_timeout(Some(self.settings.timeout));
        match self.client.create_topics([&new], &opts).await?.into_iter().next() {
            Some(Ok(_)) => Ok(true),
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
            Some(Err((topic, code))) => {
                let code = ErrorCode(code as i32);
                Err(AdminError::Target { op: OP, target: topic, code, message: code.description() })
            }
            None => Err(AdminError::UnexpectedResult { op: OP, detail: "no result".into() }),
        }
    }

    /// Whether `topic` exists (from metadata; an unknown topic is not
    /// created).
    pub async fn topic_exists(&self, topic: &str) -> AdminResult<bool> {
        match self.topic_partitions(topic).await {
            Ok(p) => Ok(!p.is_empty()),
            Err(AdminError::Target { code: ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `max.message.bytes` of each topic, in the order given (the topic's
    /// own value, else the broker's default). A topic created a moment ago
    /// may not show its configuration yet: asked again, with backoff, for up
    /// to `wait`; then the last error.
    pub async fn max_message_bytes(&self, topics: &[impl AsRef<str>], wait: Duration) -> AdminResult<Vec<usize>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut retries = Retries::new(Backoff::new(Duration::from_millis(100), Duration::from_secs(1)));
        loop {
            let limits = self.describe_topic_configs(topics).await.and_then(|configs| {
                configs
                    .iter()
                    .map(|c| {
                        c.max_message_bytes().ok_or_else(|| AdminError::UnexpectedResult {
                            op: "DescribeConfigs",
                            detail: format!("topic {} has no readable max.message.bytes", c.topic),
                        })
                    })
                    .collect()
            });
            match limits {
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "Topic configuration not readable yet; asking again.");
                    tokio::time::sleep(retries.next_delay()).await;
                }
                r => return r,
            }
        }
    }

    /// The topics' configurations (DescribeConfigs, through `rdkafka`), in
    /// the order given. An unknown topic is an error.
    pub async fn describe_topic_configs(&self, topics: &[impl AsRef<str>]) -> AdminResult<Vec<TopicConfig>> {
        const OP: &str = "DescribeConfigs";
        if topics.is_empty() {
            return Ok(Vec::new());
        }
        let specs: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t.as_ref())).collect();
        let opts = AdminOptions::new().request_timeout(Some(self.settings.timeout));
        let results = self.client.describe_configs(&specs, &opts).await?;
        if results.len() != topics.len() {
            return Err(AdminError::UnexpectedResult {
                op: OP,
                detail: format!("{} results for {} topics", results.len(), topics.len()),
            });
        }
        let configs = topics
            .iter()
            .zip(results)
            .map(|(asked, r)| {
                let asked = asked.as_ref();
                let res = r.map_err(|code| {
                    let code = ErrorCode(code as i32);
                    AdminError::Target { op: OP, target: asked.to_owned(), code, message: code.description() }
                })?;
                let topic = match res.specifier {
                    OwnedResourceSpecifier::Topic(t) => t,
                    other => {
                        return Err(AdminError::UnexpectedResult { op: OP, detail: format!("a result for {other:?}") })
                    }
                };
                let entries = res.entries.into_iter().filter_map(|e| e.value.map(|v| (e.name, v))).collect();
                Ok(TopicConfig { topic, entries })
            })
            .collect::<AdminResult<Vec<_>>>()?;
        // rdkafka 0.39 drops the broker's per-resource error: a topic it
        // could not describe comes back with no entries (an existing topic
        // always has some, defaults included). Ask metadata why.
        for c in &configs {
            if c.entries.is_empty() {
                self.topic_partitions(&c.topic).await?;
                return Err(AdminError::UnexpectedResult {
                    op: OP,
                    detail: format!("no configuration entries for topic {}", c.topic),
                });
            }
        }
        Ok(configs)
    }
}

/// A description for a group the broker does not know, as Kafka's classic
/// DescribeGroups reports one.
fn dead_group(group_id: String) -> GroupDescription {
    GroupDescription {
        group_id,
        state: "Dead".into(),
        group_type: "Unknown".into(),
        protocol_type: String::new(),
        is_simple: false,
        partition_assignor: String::new(),
        members: Vec::new(),
        coordinator: None,
    }
}

fn group_offset(p: ffi::RawPartition) -> GroupOffset {
    GroupOffset { offset: committed_offset(p.offset), topic: p.topic, partition: p.partition, metadata: p.metadata }
}

/// A committed offset from an OffsetFetch answer: negative (-1 from the
/// broker, `RD_KAFKA_OFFSET_INVALID` from librdkafka) means none.
fn committed_offset(raw: i64) -> Option<i64> {
    (raw >= 0).then_some(raw)
}

/// A ListOffsets answer: offset -1 means no record at or after the
/// timestamp; a negative timestamp means the broker reported none.
fn listed_position(offset: i64, timestamp: i64) -> ListedPosition {
    if offset < 0 {
        ListedPosition::LogEnd
    } else {
        ListedPosition::Offset { offset, timestamp: (timestamp >= 0).then_some(timestamp) }
    }
}

fn failures(raw: &[ffi::RawPartition]) -> Vec<PartitionError> {
    raw.iter()
        .filter(|p| p.err.0 != 0)
        .map(|p| PartitionError { topic: p.topic.clone(), partition: p.partition, code: p.err })
        .collect()
}

fn check_partitions(op: &'static str, raw: &[ffi::RawPartition]) -> AdminResult<()> {
    let failures = failures(raw);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(AdminError::Partitions { op, failures })
    }
}

/// Per-partition outcome of an alter: any partition refused because the
/// group is active makes the whole call [`AdminError::GroupActive`].
fn check_alter(group: &str, raw: &[ffi::RawPartition]) -> AdminResult<()> {
    check_changed("AlterConsumerGroupOffsets", group, raw)
}

/// Per-partition outcome of an offset change (alter or delete).
fn check_changed(op: &'static str, group: &str, raw: &[ffi::RawPartition]) -> AdminResult<()> {
    let failures = failures(raw);
    match failures.iter().find(|f| f.code.means_group_active()) {
        Some(f) => Err(AdminError::GroupActive { group: group.to_owned(), code: f.code, failures }),
        None if failures.is_empty() => Ok(()),
        None => Err(AdminError::Partitions { op, failures }),
    }
}

/// The same refusal, when the broker gives it for the whole group.
fn group_level_active(group: &str, e: AdminError) -> AdminError {
    match e {
        AdminError::Target { code, .. } | AdminError::Request { code, .. } if code.means_group_active() => {
            AdminError::GroupActive { group: group.to_owned(), code, failures: Vec::new() }
        }
        other => other,
    }
}

/// Rejects what librdkafka would silently drop or refuse: a negative offset
/// is skipped by its OffsetCommit writer, duplicates fail the whole request.
fn validate_alter(offsets: &[(String, i32, i64, String)]) -> AdminResult<()> {
    if offsets.is_empty() {
        return Err(AdminError::InvalidArgument("no offsets to alter".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (topic, partition, offset, _) in offsets {
        if *offset < 0 {
            return Err(AdminError::InvalidArgument(format!("offset {offset} for {topic}[{partition}] is negative")));
        }
        if *partition < 0 {
            return Err(AdminError::InvalidArgument(format!("partition {partition} of {topic} is negative")));
        }
        if !seen.insert((topic.as_str(), *partition)) {
            return Err(AdminError::InvalidArgument(format!("{topic}[{partition}] is listed twice")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka_sys::types::RDKafkaRespErr;

    fn raw(topic: &str, partition: i32, offset: i64, err: i32) -> ffi::RawPartition {
        ffi::RawPartition { topic: topic.into(), partition, offset, metadata: String::new(), err: ErrorCode(err) }
    }

    #[test]
    fn error_code_constants_match_librdkafka() {
        use RDKafkaRespErr as E;
        for (ours, theirs) in [
            (ErrorCode::UNKNOWN_TOPIC_OR_PARTITION, E::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART),
            (ErrorCode::COORDINATOR_NOT_AVAILABLE, E::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE),
            (ErrorCode::ILLEGAL_GENERATION, E::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION),
            (ErrorCode::UNKNOWN_MEMBER_ID, E::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID),
            (ErrorCode::REBALANCE_IN_PROGRESS, E::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS),
            (ErrorCode::GROUP_AUTHORIZATION_FAILED, E::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED),
            (ErrorCode::NON_EMPTY_GROUP, E::RD_KAFKA_RESP_ERR_NON_EMPTY_GROUP),
            (ErrorCode::GROUP_ID_NOT_FOUND, E::RD_KAFKA_RESP_ERR_GROUP_ID_NOT_FOUND),
            (ErrorCode::GROUP_SUBSCRIBED_TO_TOPIC, E::RD_KAFKA_RESP_ERR_GROUP_SUBSCRIBED_TO_TOPIC),
            (ErrorCode::FENCED_MEMBER_EPOCH, E::RD_KAFKA_RESP_ERR_FENCED_MEMBER_EPOCH),
            (ErrorCode::STALE_MEMBER_EPOCH, E::RD_KAFKA_RESP_ERR_STALE_MEMBER_EPOCH),
            (ErrorCode::TIMED_OUT, E::RD_KAFKA_RESP_ERR__TIMED_OUT),
        ] {
            assert_eq!(ours.0, theirs as i32, "{theirs:?}");
        }
        assert_eq!(ErrorCode::UNKNOWN_MEMBER_ID.to_string(), "UNKNOWN_MEMBER_ID (25)");
    }

    #[test]
    fn an_alter_refused_for_membership_is_group_active() {
        let refused = [raw("t", 0, 5, 0), raw("t", 1, 5, ErrorCode::UNKNOWN_MEMBER_ID.0)];
        match check_alter("g", &refused) {
            Err(AdminError::GroupActive { group, code, failures }) => {
                assert_eq!(group, "g");
                assert_eq!(code, ErrorCode::UNKNOWN_MEMBER_ID);
                assert_eq!(failures.len(), 1);
                assert_eq!(failures[0].partition, 1);
            }
            other => panic!("expected GroupActive, got {other:?}"),
        }
        for code in [ErrorCode::REBALANCE_IN_PROGRESS, ErrorCode::NON_EMPTY_GROUP, ErrorCode::ILLEGAL_GENERATION] {
            assert!(check_alter("g", &[raw("t", 0, 1, code.0)]).is_err_and(|e| e.is_group_active()));
        }
    }

    #[test]
    fn other_alter_failures_are_partition_errors_and_success_is_ok() {
        assert!(check_alter("g", &[raw("t", 0, 1, 0), raw("t", 1, 1, 0)]).is_ok());
        let e = check_alter("g", &[raw("t", 0, 1, ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0)]);
        assert!(matches!(e, Err(AdminError::Partitions { ref failures, .. }) if failures.len() == 1), "{e:?}");
        assert!(e.is_err_and(|e| e.to_string().contains("UNKNOWN_TOPIC_OR_PART")));
    }

    #[test]
    fn group_active_stays_distinct_in_the_crate_error() {
        let e: crate::Error =
            AdminError::GroupActive { group: "g".into(), code: ErrorCode::UNKNOWN_MEMBER_ID, failures: vec![] }.into();
        assert!(matches!(e, crate::Error::Admin(AdminError::GroupActive { .. })));
        assert!(e.to_string().starts_with("group g is active"), "{e}");
    }

    #[test]
    fn a_group_level_refusal_is_group_active_too() {
        let e = AdminError::Target {
            op: "AlterConsumerGroupOffsets",
            target: "g".into(),
            code: ErrorCode::REBALANCE_IN_PROGRESS,
            message: String::new(),
        };
        assert!(group_level_active("g", e).is_group_active());
        let e = AdminError::Target {
            op: "AlterConsumerGroupOffsets",
            target: "g".into(),
            code: ErrorCode::GROUP_AUTHORIZATION_FAILED,
            message: String::new(),
        };
        assert!(!group_level_active("g", e).is_group_active());
    }

    #[test]
    fn alter_input_is_validated_before_sending() {
        let ok = |t: &str, p, o| (t.to_owned(), p, o, String::new());
        assert!(validate_alter(&[ok("t", 0, 0), ok("t", 1, 9)]).is_ok());
        for bad in [vec![], vec![ok("t", 0, -1)], vec![ok("t", -1, 0)], vec![ok("t", 0, 1), ok("t", 0, 2)]] {
            assert!(matches!(validate_alter(&bad), Err(AdminError::InvalidArgument(_))), "{bad:?}");
        }
    }

    #[test]
    fn uncommitted_offsets_are_none() {
        assert_eq!(committed_offset(-1001), None);
        assert_eq!(committed_offset(-1), None);
        assert_eq!(committed_offset(0), Some(0));
        assert_eq!(committed_offset(17), Some(17));
    }

    #[test]
    fn a_timestamp_past_the_last_record_is_the_log_end() {
        assert_eq!(listed_position(-1, -1), ListedPosition::LogEnd);
        assert_eq!(
            listed_position(3, 1_700_000_000_000),
            ListedPosition::Offset { offset: 3, timestamp: Some(1_700_000_000_000) }
        );
        assert_eq!(listed_position(0, -1), ListedPosition::Offset { offset: 0, timestamp: None });
        let lo = ListedOffset { topic: "t".into(), partition: 0, position: ListedPosition::LogEnd };
        assert_eq!((lo.offset(), lo.timestamp()), (None, None));
    }

    #[test]
    fn offset_specs_map_to_librdkafka_values() {
        assert_eq!(OffsetSpec::Earliest.to_raw().ok(), Some(-2));
        assert_eq!(OffsetSpec::Latest.to_raw().ok(), Some(-1));
        assert_eq!(OffsetSpec::Timestamp(0).to_raw().ok(), Some(0));
        assert!(matches!(OffsetSpec::Timestamp(-5).to_raw(), Err(AdminError::InvalidArgument(_))));
    }

    #[test]
    fn retention_reads_the_number_or_unlimited() {
        let cfg =
            |v: &str| TopicConfig { topic: "t".into(), entries: [("retention.ms".to_owned(), v.to_owned())].into() };
        assert_eq!(cfg("604800000").retention_ms(), Some(604_800_000));
        assert_eq!(cfg("-1").retention_ms(), Some(-1));
        assert_eq!(cfg("soon").retention_ms(), None);
    }

    #[test]
    fn only_a_memberless_empty_or_dead_group_is_inactive() {
        let mut d = dead_group("g".into());
        assert!(d.is_inactive());
        d.state = "Stable".into();
        assert!(!d.is_inactive());
        d.state = "Empty".into();
        d.members.push(Member {
            member_id: "m".into(),
            group_instance_id: None,
            client_id: "c".into(),
            host: "/127.0.0.1".into(),
            assignment: vec![],
        });
        assert!(!d.is_inactive());
    }
}
