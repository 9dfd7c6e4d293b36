//! The effectively-once consumer runtime.
//!
//! Per assigned partition, one ordered **lane**. A lane takes up to
//! `max_batch` records (or what arrived within `max_wait`) and runs one
//! PostgreSQL transaction: claim the identities in the inbox (one statement),
//! run the handler for each new event, advance the partition's offset in
//! `oncely.offsets` with a compare-and-set (the fence), commit; then commit the
//! offset to Kafka asynchronously. PostgreSQL is the source of truth.
//!
//! Each lane reads its partition's own queue, split from the consumer's in the
//! rebalance callback before the partition is assigned; the consumer's main
//! queue carries only rebalances and errors. A lane takes its partition over
//! in the database (a new owner epoch) and starts at the database offset. If
//! Kafka's committed offset is behind it (someone rewound the group, e.g. with
//! `kafka-consumer-groups --reset-offsets`) or ahead of it, the
//! [`RewindPolicy`] decides. On revoke, lanes drain within the drain timeout
//! and the final offsets are committed inside the rebalance callback.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::envelope::{IdentitySource, VersionSource};
use crate::error::{Error, Result};
use crate::kafka::KafkaConnection;
use crate::store;

mod decide;
pub mod events;
mod guard;
mod handler;
mod lane;

pub use guard::SpikeGuard;
use handler::ErasedHandler;
pub use handler::{
    BatchHandlerFn, Cx, FailureClass, HandlerError, HandlerFn, IntoBatchHandler, IntoHandler, State,
    StatefulBatchHandlerFn, StatefulHandlerFn, Unrouted, WithState, WithoutState,
};

pub use crate::kafka::{COMMIT_METADATA, RESET_METADATA_PREFIX};

/// What a lane does when Kafka's committed offset and the database's differ at
/// assignment (someone moved the group's offsets behind oncely's back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RewindPolicy {
    /// Follow the database offset: the move costs nothing (default).
    #[default]
    Skip,
    /// Follow Kafka: re-read (rewind) or skip ahead (skip-forward). On a
    /// rewind the inbox still suppresses every duplicate.
    Replay,
    /// Pause the partition until an operator acts (restart with another policy).
    Halt,
}

/// The version guard's settings: where the version is read, and the entity
/// type under which versions are kept (entities are keyed by the Kafka key).
#[derive(Debug, Clone)]
pub struct VersionGuard {
    /// Where the version is.
    pub source: VersionSource,
    /// Entity type (defaults to the topic name).
    pub entity_type: Option<String>,
}

/// Settings that every lane reads.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub max_batch: usize,
    pub max_batch_bytes: usize,
    pub max_wait: Duration,
    pub drain_timeout: Duration,
    pub zombie_timeout: Duration,
    pub rewind: RewindPolicy,
    pub skip_forward: RewindPolicy,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_record_bytes: usize,
    pub replay: bool,
    /// `search_path` set in every batch transaction (a projection rebuild's
    /// shadow schema).
    pub search_path: Option<String>,
    /// `cx.publish` writes nothing (a projection rebuild).
    pub suppress_publish: bool,
    /// The consumer whose database position this one never passes (a
    /// projection rebuild follows its live consumer).
    pub follow: Option<Arc<str>>,
    pub dead_key_policy: crate::failure::DeadKeyPolicy,
    /// Where a partition with no position at all starts (`auto.offset.reset`).
    pub initial: Offset,
}

/// A lane's partition queue.
pub(crate) type PartitionQueue = rdkafka::consumer::stream_consumer::StreamPartitionQueue<Ctx>;

/// State shared by the Kafka thread, the rebalance callback and the lanes.
pub(crate) struct Shared {
    pub name: Arc<str>,
    /// The consumer's number in `oncely.consumers` (its inbox rows carry it).
    pub consumer_id: i32,
    pub pool: PgPool,
    pub handler: Arc<dyn ErasedHandler>,
    pub identity: IdentitySource,
    pub version: Option<VersionGuard>,
    pub settings: Settings,
    pub backoff: crate::backoff::Backoff,
    pub rt: tokio::runtime::Handle,
    pub consumer: OnceLock<Weak<KafkaConsumer>>,
    pub lanes: Mutex<HashMap<PartitionKey, lane::LaneHandle>>,
    /// One queue per partition ever assigned, split once and kept for the
    /// consumer's life: librdkafka keeps a split queue split across
    /// re-assignments, and dropping a queue handle silences the reader of
    /// any newer handle of the same queue (its wake-up is per queue).
    pub queues: Mutex<HashMap<PartitionKey, Arc<PartitionQueue>>>,
    pub bucket: Option<guard::TokenBucket>,
    pub spike: Option<guard::SpikeState>,
    pub shutdown: CancellationToken,
    /// Effects this consumer may record (and run, when registered).
    pub registry: Arc<crate::effects::Registry>,
    /// Wakes the in-process effect executor after a commit.
    pub effects_wake: Arc<tokio::sync::Notify>,
    /// The error that stopped the consumer, if one did.
    pub fatal: Mutex<Option<Error>>,
}

impl Shared {
    /// Stops the consumer with `e` (a configuration error found while running).
    pub(crate) fn fail(&self, e: Error) {
        tracing::error!(consumer = &*self.name, error = %e, "Stopping the consumer.");
        if let Ok(mut f) = self.fatal.lock() {
            f.get_or_insert(e);
        }
        self.shutdown.cancel();
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.fatal.lock().map(|f| f.is_some()).unwrap_or(true)
    }

    pub(crate) fn rules(&self) -> decide::Rules {
        decide::Rules { max_attempts: self.settings.max_attempts, dead_key: self.settings.dead_key_policy }
    }
}

pub(crate) type KafkaConsumer = StreamConsumer<Ctx>;

/// `(topic, partition)`.
pub(crate) type PartitionKey = (String, i32);

/// The rdkafka context: runs oncely's rebalance logic.
pub(crate) struct Ctx(Arc<Shared>);

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

/// The consumer's pool: the one it was given, or a new one from its URL.
async fn pool_of(pool: Option<PgPool>, url: Option<&str>) -> Result<PgPool> {
    match (pool, url) {
        (Some(p), _) => Ok(p),
        (None, Some(url)) => store::connect(url, 20).await,
        (None, None) => Err(Error::Config("a pool or a database_url is required".into())),
    }
}

/// Kafka's committed offsets of the partitions of `tpl`, with their commit
/// metadata (partitions with no commit left out): to detect moves, and where
/// a partition starts fetching.
fn committed_positions<C: rdkafka::consumer::Consumer<Ctx>>(
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
fn spawn_lanes(
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
fn drain_lanes(s: &Shared, handles: Vec<lane::LaneHandle>) -> TopicPartitionList {
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

/// A configured consumer; build one with [`Consumer::builder`].
#[derive(Debug)]
pub struct Consumer {
    _private: (),
}

impl Consumer {
    /// Starts building a consumer named `name`. The name is the Kafka
    /// `group.id` and the namespace of its inbox and offsets.
    pub fn builder(name: impl Into<String>) -> ConsumerBuilder {
        ConsumerBuilder::new(name.into())
    }
}

/// Builder for a consumer. Every setter documents its default and why.
///
/// `S` is the handlers' state (see [`state`](Self::state)): a handler that
/// takes [`State<S>`](State) only compiles on a builder holding an `S`.
pub struct ConsumerBuilder<S = ()> {
    p: Parts,
    state: Arc<S>,
}

impl<S> std::ops::Deref for ConsumerBuilder<S> {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.p
    }
}

impl<S> std::ops::DerefMut for ConsumerBuilder<S> {
    fn deref_mut(&mut self) -> &mut Parts {
        &mut self.p
    }
}

/// Everything a builder holds but the state.
#[doc(hidden)]
pub struct Parts {
    name: String,
    connection: Option<KafkaConnection>,
    pool: Option<PgPool>,
    database_url: Option<String>,
    topics: Vec<String>,
    handler: Option<Arc<dyn ErasedHandler>>,
    routes: HashMap<String, Arc<dyn ErasedHandler>>,
    unrouted: Unrouted,
    identity: IdentitySource,
    version: Option<VersionGuard>,
    settings: Settings,
    rate: Option<f64>,
    spike: Option<SpikeGuard>,
    kafka: Vec<(String, String)>,
    inbox_retention: Duration,
    force_inbox_retention: bool,
    metrics_addr: Option<SocketAddr>,
    migrate: bool,
    handle_sigterm: bool,
    registry: crate::effects::Registry,
    effect_lease: Duration,
    create_dlt_topics: bool,
    /// Assign every partition of the topics instead of joining the group
    /// (a projection rebuild: the live group must not rebalance).
    manual_assignment: bool,
    /// Run the in-process effect executor (not in a projection rebuild:
    /// it would run the live consumer's intents).
    run_effect_executor: bool,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts").field("name", &self.name).finish_non_exhaustive()
    }
}

impl<S> std::fmt::Debug for ConsumerBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("name", &self.name)
            .field("topics", &self.topics)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Settings oncely forces, whatever [`ConsumerBuilder::kafka`] says.
pub const FORCED_KAFKA_SETTINGS: &[(&str, &str)] = &[
    // The database is the source of truth; Kafka offsets are committed by
    // oncely after each database commit, never by a timer.
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    // Incremental rebalances: partitions that stay keep their lanes.
    ("partition.assignment.strategy", "cooperative-sticky"),
    // Never process records of aborted transactions.
    ("isolation.level", "read_committed"),
];

impl ConsumerBuilder<()> {
    fn new(name: String) -> Self {
        ConsumerBuilder { p: Parts::new(name), state: Arc::new(()) }
    }
}

impl Parts {
    fn new(name: String) -> Self {
        Parts {
            name,
            connection: None,
            pool: None,
            database_url: None,
            topics: Vec::new(),
            handler: None,
            routes: HashMap::new(),
            unrouted: Unrouted::Skip,
            identity: IdentitySource::CloudEvents,
            version: None,
            settings: Settings {
                max_batch: 500,
                max_batch_bytes: 4 * 1024 * 1024,
                max_wait: Duration::from_millis(20),
                drain_timeout: Duration::from_secs(10),
                zombie_timeout: Duration::from_secs(10),
                rewind: RewindPolicy::Skip,
                skip_forward: RewindPolicy::Skip,
                max_attempts: 10,
                backoff_base: Duration::from_millis(200),
                backoff_max: Duration::from_secs(60),
                max_record_bytes: 8 * 1024 * 1024,
                replay: false,
                search_path: None,
                suppress_publish: false,
                follow: None,
                dead_key_policy: crate::failure::DeadKeyPolicy::Continue,
                initial: Offset::Beginning,
            },
            rate: None,
            spike: None,
            kafka: Vec::new(),
            inbox_retention: Duration::from_secs(15 * 24 * 3600),
            force_inbox_retention: false,
            metrics_addr: None,
            migrate: true,
            handle_sigterm: true,
            registry: crate::effects::Registry::default(),
            effect_lease: Duration::from_secs(60),
            create_dlt_topics: true,
            manual_assignment: false,
            run_effect_executor: true,
        }
    }
}

impl<S: Send + Sync + 'static> ConsumerBuilder<S> {
    /// Kafka `bootstrap.servers`. Required (no default: guessing a cluster is
    /// how production gets touched by mistake).
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        let servers = servers.into();
        self.connection = Some(match self.connection.take() {
            Some(c) => c.property("bootstrap.servers", servers),
            None => KafkaConnection::new(servers),
        });
        self
    }

    /// How to reach the cluster: bootstrap servers and client properties
    /// (SASL, TLS), used for every client the consumer creates (its consumer,
    /// admin and metadata clients). Replaces [`bootstrap_servers`](Self::bootstrap_servers).
    pub fn connection(mut self, connection: impl Into<KafkaConnection>) -> Self {
        self.connection = Some(connection.into());
        self
    }

    /// The PostgreSQL pool holding your tables and the `oncely` schema.
    /// Required unless [`database_url`](Self::database_url) is given. Size it
    /// for one connection per assigned partition plus a few.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Connect to this URL instead of passing a pool (20 connections).
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// Subscribes to `topic` (call again for more). At least one is required.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// The handler: `async fn(Event<T>, &mut Cx) -> Result<(), HandlerError>`,
    /// or `async fn(Event<T>, &mut Cx, State<S>) -> …` to take the builder's
    /// state. `T` is decoded from the JSON payload (or use
    /// [`RawPayload`](crate::envelope::RawPayload)); a payload that does not
    /// decode is dead-lettered with reason `undecodable-payload`. For several
    /// event types on one consumer, use [`route`](Self::route) instead.
    pub fn handler<T, M, H: IntoHandler<T, S, M>>(mut self, handler: H) -> Self {
        let h = handler.into_erased(self.state.clone());
        self.handler = Some(h.0);
        self
    }

    /// Routes events of CloudEvents type `ce_type` to `handler` (the same
    /// kinds of functions as [`handler`](Self::handler)); each route decodes
    /// its own event type. Events of a type no route takes follow
    /// [`unrouted`](Self::unrouted). Use either routes or one handler.
    pub fn route<T, M, H: IntoHandler<T, S, M>>(mut self, ce_type: impl Into<String>, handler: H) -> Self {
        let h = handler.into_erased(self.state.clone());
        self.routes.insert(ce_type.into(), h.0);
        self
    }

    /// What happens to an event whose type no [`route`](Self::route) takes.
    /// Default [`Unrouted::Skip`]: counted and skipped (topics often carry
    /// types a consumer does not handle); [`Unrouted::DeadLetter`] sends it to
    /// the dead-letter topic with reason `unrouted-type`.
    pub fn unrouted(mut self, policy: Unrouted) -> Self {
        self.unrouted = policy;
        self
    }

    /// The handlers' state (a client, settings), given to every handler that
    /// takes [`State<S>`](State). Call it before registering the handlers
    /// that take it: they are type-checked against it. Default: none (`()`).
    pub fn state<S2: Send + Sync + 'static>(self, state: S2) -> ConsumerBuilder<S2> {
        ConsumerBuilder { p: self.p, state: Arc::new(state) }
    }

    /// [`state`](Self::state) that the caller keeps a handle on too (to
    /// change settings while the consumer runs, or share a client).
    pub fn shared_state<S2: Send + Sync + 'static>(self, state: Arc<S2>) -> ConsumerBuilder<S2> {
        ConsumerBuilder { p: self.p, state }
    }

    /// Registers the function that runs effect `name` after commit (see
    /// [`crate::effects`]); the consumer runs an executor in-process.
    /// Handlers may only record effects that are registered or declared.
    pub fn effect_executor(
        mut self,
        name: impl Into<String>,
        f: impl crate::effects::EffectFn,
        opts: crate::effects::EffectOptions,
    ) -> Self {
        self.registry.register(name, f, opts);
        self
    }

    /// Declares an effect whose executor runs in another process, so
    /// handlers may record it with the right semantics.
    pub fn effect_semantics(mut self, name: impl Into<String>, semantics: crate::effects::Semantics) -> Self {
        self.registry.declare(name, semantics);
        self
    }

    /// Lease of a claimed effect intent: after it, an intent whose executor
    /// died is taken up again (at-least-once) or marked unknown (at-most-once).
    /// Default 60 s; keep it above the longest call.
    pub fn effect_lease(mut self, d: Duration) -> Self {
        self.effect_lease = d;
        self
    }

    /// A batch handler instead of a per-event one:
    /// `async fn(Vec<Event<T>>, &mut Cx) -> Result<(), HandlerError>` (or with
    /// a third argument `State<S>`) gets the new events of each batch at once
    /// (write them with one multi-row statement). Duplicates are already
    /// removed and the version guard applied. On failure the events are
    /// retried one at a time to isolate the failing one. Record effects with
    /// [`Cx::effect_for`].
    pub fn batch_handler<T, M, H: IntoBatchHandler<T, S, M>>(mut self, handler: H) -> Self {
        let h = handler.into_erased(self.state.clone());
        self.handler = Some(h.0);
        self
    }

    /// Where the event identity comes from. Default: `(ce_source, ce_id)`, as
    /// CloudEvents requires it to be unique per distinct event.
    pub fn identity(mut self, identity: IdentitySource) -> Self {
        self.identity = identity;
        self
    }

    /// Turns on the version guard: events whose entity version is not newer
    /// than the one applied for their key are skipped (counted as `stale`).
    /// Default: off (most handlers are naturally ordered by the partition).
    pub fn version_guard(mut self, source: VersionSource, entity_type: Option<String>) -> Self {
        self.version = Some(VersionGuard { source, entity_type });
        self
    }

    /// Records per batch transaction. Default 500: large enough to amortise
    /// the claim, fence and commit, small enough to keep transactions short.
    pub fn max_batch(mut self, n: usize) -> Self {
        self.settings.max_batch = n.max(1);
        self
    }

    /// The most bytes (key + payload + headers) a batch holds, and so about
    /// what a lane keeps in memory besides librdkafka's prefetch (bounded per
    /// partition by `queued.max.messages.kbytes`, default 8 MB here). Default
    /// 4 MiB: a batch stops at `max_batch` records or this, whichever comes
    /// first (a single larger record is a batch of its own).
    pub fn max_batch_bytes(mut self, n: usize) -> Self {
        self.settings.max_batch_bytes = n.max(1);
        self
    }

    /// How long the new owner of a partition waits for a previous owner's
    /// batch that still holds the partition (a member frozen or cut off past
    /// its session timeout: a zombie) before it ends that member's database
    /// session, which rolls the zombie's batch back. Default 10 s. All
    /// members must connect as the same PostgreSQL role (or one with
    /// `pg_signal_backend`); without the privilege the new owner waits.
    pub fn zombie_timeout(mut self, d: Duration) -> Self {
        self.settings.zombie_timeout = d;
        self
    }

    /// How long a lane waits for more records before running a partial batch.
    /// Default 20 ms: a small latency price for much larger batches under load.
    pub fn max_wait(mut self, d: Duration) -> Self {
        self.settings.max_wait = d;
        self
    }

    /// How long a revoke waits for in-flight batches before abandoning them
    /// (they roll back). Default 10 s; keep it below `session.timeout.ms` (45 s).
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.settings.drain_timeout = d;
        self
    }

    /// Policy when Kafka's committed offset is *behind* the database's at
    /// assignment. Default [`RewindPolicy::Skip`]: the rewind costs nothing.
    pub fn rewind_policy(mut self, p: RewindPolicy) -> Self {
        self.settings.rewind = p;
        self
    }

    /// Policy when Kafka's committed offset is *ahead* of the database's.
    /// Default [`RewindPolicy::Skip`]: follow the database, so nothing is
    /// skipped unseen.
    pub fn skip_forward_policy(mut self, p: RewindPolicy) -> Self {
        self.settings.skip_forward = p;
        self
    }

    /// Attempts before a transiently failing event is dead-lettered (its key
    /// stays parked, retried with backoff, meanwhile). Default 10.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n.max(1);
        self
    }

    /// What happens to the events parked behind an event that was
    /// dead-lettered. Default [`DeadKeyPolicy::Continue`](crate::failure::DeadKeyPolicy):
    /// the next event of the key is tried at once (order among the survivors holds).
    pub fn dead_key_policy(mut self, p: crate::failure::DeadKeyPolicy) -> Self {
        self.settings.dead_key_policy = p;
        self
    }

    /// Retry backoff: `base * 2^attempt`, capped at `max`, with full jitter.
    /// Defaults 200 ms and 60 s.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.settings.backoff_base = base;
        self.settings.backoff_max = max.max(base);
        self
    }

    /// Records larger than this (key + payload + headers) are dead-lettered
    /// with reason `oversized-record`. Default 8 MiB.
    pub fn max_record_bytes(mut self, n: usize) -> Self {
        self.settings.max_record_bytes = n;
        self
    }

    /// Token-bucket rate limit for the whole consumer, in events per second
    /// (burst of one second's worth). Default: unlimited.
    pub fn max_events_per_second(mut self, rate: f64) -> Self {
        self.rate = Some(rate);
        self
    }

    /// Turns on the spike guard. Default: off.
    pub fn spike_guard(mut self, g: SpikeGuard) -> Self {
        self.spike = Some(g);
        self
    }

    /// Kafka `session.timeout.ms`: how long a member that stopped answering
    /// (killed, frozen, cut off) keeps its partitions before the group moves
    /// them; heartbeats go every sixth of it. Default: the broker's (45 s).
    /// Keep [`drain_timeout`](Self::drain_timeout) below it.
    pub fn session_timeout(self, d: Duration) -> Self {
        let ms = d.as_millis().max(1000);
        self.kafka("session.timeout.ms", ms.to_string()).kafka("heartbeat.interval.ms", (ms / 6).max(100).to_string())
    }

    /// Applies every setting `config` has (from `oncely.toml` and `ONCELY_*`
    /// variables, see [`ConsumerConfig`](crate::config::ConsumerConfig));
    /// settings it leaves out keep their current value.
    pub fn config(mut self, config: &crate::config::ConsumerConfig) -> Self {
        use crate::config::{DeadKeyPolicyName, RewindPolicyName, UnroutedName};
        let rewind = |p: RewindPolicyName| match p {
            RewindPolicyName::Skip => RewindPolicy::Skip,
            RewindPolicyName::Replay => RewindPolicy::Replay,
            RewindPolicyName::Halt => RewindPolicy::Halt,
        };
        let ms = Duration::from_millis;
        let c = config.clone();
        for t in c.topics.unwrap_or_default() {
            self = self.topic(t);
        }
        if let Some(n) = c.max_batch {
            self = self.max_batch(n);
        }
        if let Some(n) = c.max_batch_bytes {
            self = self.max_batch_bytes(n);
        }
        if let Some(v) = c.max_wait_ms {
            self = self.max_wait(ms(v));
        }
        if let Some(v) = c.drain_timeout_ms {
            self = self.drain_timeout(ms(v));
        }
        if let Some(v) = c.zombie_timeout_ms {
            self = self.zombie_timeout(ms(v));
        }
        if let Some(v) = c.session_timeout_ms {
            self = self.session_timeout(ms(v));
        }
        if let Some(p) = c.rewind_policy {
            self = self.rewind_policy(rewind(p));
        }
        if let Some(p) = c.skip_forward_policy {
            self = self.skip_forward_policy(rewind(p));
        }
        if let Some(n) = c.max_attempts {
            self = self.max_attempts(n);
        }
        if let Some(p) = c.dead_key_policy {
            self = self.dead_key_policy(match p {
                DeadKeyPolicyName::Continue => crate::failure::DeadKeyPolicy::Continue,
                DeadKeyPolicyName::Hold => crate::failure::DeadKeyPolicy::Hold,
            });
        }
        if c.retry_backoff_base_ms.is_some() || c.retry_backoff_max_ms.is_some() {
            let base = c.retry_backoff_base_ms.map_or(self.settings.backoff_base, ms);
            let max = c.retry_backoff_max_ms.map_or(self.settings.backoff_max, ms);
            self = self.retry_backoff(base, max);
        }
        if let Some(n) = c.max_record_bytes {
            self = self.max_record_bytes(n);
        }
        if let Some(r) = c.max_events_per_second {
            self = self.max_events_per_second(r);
        }
        if let Some(d) = c.inbox_retention_days {
            self = self.inbox_retention(Duration::from_secs(d * 86_400));
        }
        if let Some(b) = c.force_inbox_retention {
            self = self.force_inbox_retention(b);
        }
        if let Some(a) = c.metrics_addr {
            self = self.metrics_addr(a);
        }
        if let Some(b) = c.migrate {
            self = self.migrate(b);
        }
        if let Some(b) = c.create_dlt_topics {
            self = self.create_dlt_topics(b);
        }
        if let Some(b) = c.handle_sigterm {
            self = self.handle_sigterm(b);
        }
        if let Some(b) = c.replay_mode {
            self = self.replay_mode(b);
        }
        if let Some(v) = c.effect_lease_ms {
            self = self.effect_lease(ms(v));
        }
        if let Some(u) = c.unrouted {
            self = self.unrouted(match u {
                UnroutedName::Skip => Unrouted::Skip,
                UnroutedName::DeadLetter => Unrouted::DeadLetter,
            });
        }
        for (k, v) in c.kafka {
            self = self.kafka(k, v);
        }
        self
    }

    /// Passes a librdkafka setting through (e.g. `session.timeout.ms`). The
    /// settings in [`FORCED_KAFKA_SETTINGS`] cannot be overridden.
    /// `auto.offset.reset` (`earliest`, default, or `latest`) says where a
    /// partition with no position in the database or in Kafka starts; a
    /// position outside the log halts the partition instead of jumping.
    pub fn kafka(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.push((key.into(), value.into()));
        self
    }

    /// How long inbox rows are kept. Default 15 days. Kafka deletes a segment
    /// only when its newest record expires, so a record stays readable for up
    /// to `retention.ms + segment.ms` (14 days with Kafka's defaults); the
    /// inbox must keep identities longer than that, or a duplicate could
    /// outlive its inbox row. `run` refuses a shorter retention unless forced.
    pub fn inbox_retention(mut self, d: Duration) -> Self {
        self.inbox_retention = d;
        self
    }

    /// Start even if the inbox retention is shorter than a topic's retention
    /// (logged as a warning). Default false.
    pub fn force_inbox_retention(mut self, force: bool) -> Self {
        self.force_inbox_retention = force;
        self
    }

    /// Serve Prometheus metrics on `GET /metrics` at this address. Default: none.
    pub fn metrics_addr(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Apply migrations at start. Default true (they are idempotent and locked).
    pub fn migrate(mut self, yes: bool) -> Self {
        self.migrate = yes;
        self
    }

    /// Create the dead-letter topics (`<topic>.<consumer>.dlt`, as many
    /// partitions as the topic, the broker's default replication) at start if
    /// they are missing. Default true; turn it off where topics are managed
    /// elsewhere (the relay then retries until the topic exists).
    pub fn create_dlt_topics(mut self, yes: bool) -> Self {
        self.create_dlt_topics = yes;
        self
    }

    /// Stop gracefully on SIGTERM. Default true.
    pub fn handle_sigterm(mut self, yes: bool) -> Self {
        self.handle_sigterm = yes;
        self
    }

    /// Replay mode: side effects are recorded as suppressed, never run.
    /// Default false.
    pub fn replay_mode(mut self, yes: bool) -> Self {
        self.settings.replay = yes;
        self
    }

    /// Runs the consumer until `shutdown` is cancelled (or SIGTERM), then
    /// drains its lanes and returns. The future is `Send`: spawn it.
    pub fn run(self, shutdown: CancellationToken) -> futures::future::BoxFuture<'static, Result<()>> {
        // Boxed here, where the future's type is concrete: proving `Send` for
        // sqlx futures inside a caller's generic `tokio::spawn` trips a known
        // compiler limitation ("implementation of Send is not general enough").
        Box::pin(self.p.run_inner(shutdown))
    }
}

impl Parts {
    /// The consumer's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Its pool, or a new one from its URL.
    pub(crate) async fn resolve_pool(&mut self) -> Result<PgPool> {
        let pool = pool_of(self.pool.take(), self.database_url.as_deref()).await?;
        self.pool = Some(pool.clone());
        Ok(pool)
    }

    /// The topics it consumes.
    pub(crate) fn topics(&self) -> &[String] {
        &self.topics
    }

    /// The Kafka connection.
    pub(crate) fn kafka_connection(&self) -> Option<&KafkaConnection> {
        self.connection.as_ref()
    }

    /// Turns the live consumer's configuration into a projection rebuild's:
    /// the same handler and settings under another name (its own inbox,
    /// offsets, versions and dead letters), the handler's SQL in the shadow
    /// schema `search_path`, never past the live consumer's position,
    /// effects recorded as suppressed, `cx.publish` writing nothing, every partition assigned without joining the group,
    /// and no effect executor.
    pub(crate) fn make_rebuild(&mut self, name: String, search_path: String) {
        self.settings.follow = Some(Arc::from(self.name.as_str()));
        self.name = name;
        self.settings.replay = true;
        self.settings.suppress_publish = true;
        self.settings.search_path = Some(search_path);
        self.manual_assignment = true;
        self.run_effect_executor = false;
        self.metrics_addr = None;
    }

    async fn run_inner(self, shutdown: CancellationToken) -> Result<()> {
        let connection =
            self.connection.ok_or_else(|| Error::Config("bootstrap_servers (or a connection) is required".into()))?;
        // A wrong password or an untrusted certificate fails here, naming the
        // cause, instead of librdkafka retrying it forever.
        let check = connection.clone();
        tokio::task::spawn_blocking(move || check.check(Duration::from_secs(15)))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??;
        if self.topics.is_empty() {
            return Err(Error::Config("at least one topic is required".into()));
        }
        let handler: Arc<dyn ErasedHandler> = match (self.handler, self.routes.is_empty()) {
            (Some(h), true) => h,
            (None, false) => Arc::new(handler::Router { routes: self.routes, unrouted: self.unrouted }),
            (Some(_), false) => {
                return Err(Error::Config("use either one handler or routes by CloudEvents type, not both".into()))
            }
            (None, true) => return Err(Error::Config("a handler (or a route) is required".into())),
        };
        let pool = pool_of(self.pool, self.database_url.as_deref()).await?;
        if self.migrate {
            store::migrate(&pool).await?;
        }
        let retention_days = self.inbox_retention.as_secs().div_ceil(86_400).max(1) as i32;
        check_retention(&connection, &self.topics, self.inbox_retention, self.force_inbox_retention, &self.name)
            .await?;
        if self.create_dlt_topics {
            ensure_dlt_topics(&connection, &self.topics, &self.name).await?;
        }
        let consumer_id = store::register_consumer(&pool, &self.name, retention_days).await?;
        store::inbox::ensure_days(&pool, 3).await?;

        let mut settings = self.settings;
        let mut cfg = connection.client_config()?;
        cfg.set("group.id", &self.name)
            // Each lane's partition queue is bounded by these (they apply per
            // partition to split queues): when a lane does not read, librdkafka
            // stops fetching its partition. That is oncely's backpressure.
            .set("queued.max.messages.kbytes", "8192")
            .set("queued.min.messages", (settings.max_batch * 4).max(1000).to_string());
        for (k, v) in &self.kafka {
            if k == "auto.offset.reset" {
                settings.initial = match v.as_str() {
                    "earliest" | "smallest" | "beginning" => Offset::Beginning,
                    "latest" | "largest" | "end" => Offset::End,
                    other => {
                        return Err(Error::Config(format!(
                            "auto.offset.reset = {other:?}: oncely takes earliest or latest (a position outside the log halts the partition)"
                        )))
                    }
                };
                continue;
            }
            cfg.set(k, v);
        }
        // A position outside the log is an error the lane reports and halts
        // on, never a silent jump (see `Lane::queue_error`).
        cfg.set("auto.offset.reset", "error");
        for (k, v) in FORCED_KAFKA_SETTINGS {
            if self.kafka.iter().any(|(kk, vv)| kk == k && vv != v) {
                tracing::warn!(setting = k, forced = v, "Ignoring a Kafka setting that oncely must force.");
            }
            cfg.set(*k, *v);
        }

        if let Some(addr) = self.metrics_addr {
            let bound = crate::metrics::serve(addr, shutdown.clone()).await?;
            tracing::info!(addr = %bound, "Serving metrics.");
        }

        let executor = crate::effects::Executor::new(pool.clone(), self.registry.clone()).lease(self.effect_lease);
        let effects_wake = executor.waker();
        let executor_task = self.run_effect_executor.then(|| tokio::spawn(executor.run(shutdown.clone())));
        // A manually assigned consumer takes every partition of its topics.
        let mut manual: Option<Vec<PartitionKey>> = None;
        if self.manual_assignment {
            let admin = crate::kafka::admin::KafkaAdmin::new(&connection, &[])?;
            let mut parts = Vec::new();
            for t in &self.topics {
                for p in admin.topic_partitions(t).await? {
                    parts.push((t.clone(), p));
                }
            }
            manual = Some(parts);
        }
        let shared = Arc::new(Shared {
            name: Arc::from(self.name.as_str()),
            consumer_id,
            pool: pool.clone(),
            handler,
            identity: self.identity,
            version: self.version,
            backoff: crate::backoff::Backoff::new(settings.backoff_base, settings.backoff_max),
            settings,
            rt: tokio::runtime::Handle::current(),
            consumer: OnceLock::new(),
            lanes: Mutex::new(HashMap::new()),
            queues: Mutex::new(HashMap::new()),
            bucket: self.rate.map(|r| guard::TokenBucket::new(r, r)),
            spike: self.spike.map(guard::SpikeState::new),
            shutdown: shutdown.clone(),
            registry: Arc::new(self.registry),
            effects_wake,
            fatal: Mutex::new(None),
        });
        let consumer: Arc<KafkaConsumer> = Arc::new(cfg.create_with_context(Ctx(shared.clone()))?);
        let _ = shared.consumer.set(Arc::downgrade(&consumer));
        if manual.is_none() {
            let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }

        if self.handle_sigterm {
            let token = shutdown.clone();
            tokio::spawn(async move {
                #[cfg(unix)]
                if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    tokio::select! {
                        _ = term.recv() => {
                            tracing::info!("SIGTERM: shutting down gracefully.");
                            token.cancel();
                        }
                        _ = token.cancelled() => {}
                    }
                }
            });
        }

        let maintenance = tokio::spawn(maintain_inbox(pool.clone(), shutdown.clone()));

        // The main queue (rebalances, errors) is served on a thread of its own:
        // the rebalance callback blocks on the database and on draining lanes,
        // which must not happen on a runtime worker.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let thread_shared = shared.clone();
        let thread_consumer = consumer.clone();
        drop(consumer);
        std::thread::Builder::new()
            .name(format!("oncely-{}", self.name))
            .spawn(move || {
                let r = kafka_thread(thread_shared, thread_consumer, manual);
                let _ = done_tx.send(r);
            })
            .map_err(Error::Io)?;
        let mut result = done_rx.await.unwrap_or_else(|_| Err(Error::Config("the consumer thread panicked".into())));
        if let Some(e) = shared.fatal.lock().ok().and_then(|mut f| f.take()) {
            result = Err(e);
        }
        maintenance.abort();
        if let Some(task) = executor_task {
            if let Ok(Err(e)) = task.await {
                tracing::warn!(error = %e, "The effect executor stopped with an error.");
            }
        }
        tracing::info!(consumer = %self.name, "Consumer stopped.");
        result
    }
}

/// The Kafka thread: serves the consumer's main queue, which carries the
/// rebalances (their callbacks run here) and errors; records go to the lanes'
/// own partition queues. A record arriving here means its partition's queue
/// was not split in time: its lane is told to read it again from its queue.
fn kafka_thread(shared: Arc<Shared>, consumer: Arc<KafkaConsumer>, manual: Option<Vec<PartitionKey>>) -> Result<()> {
    use futures::future::{select, Either};
    let token = shared.shutdown.clone();
    if let Some(parts) = manual {
        assign_manually(&shared, &consumer, &parts)?;
    }
    futures::executor::block_on(async {
        loop {
            let recv = consumer.recv();
            let stop = token.cancelled();
            futures::pin_mut!(recv);
            futures::pin_mut!(stop);
            match select(recv, stop).await {
                Either::Right(_) => break,
                Either::Left((Ok(m), _)) => {
                    use rdkafka::Message as _;
                    let key = (m.topic().to_owned(), m.partition());
                    tracing::error!(consumer = &*shared.name, topic = %key.0, partition = key.1, offset = m.offset(), "A record reached the consumer's main queue instead of its partition's queue.");
                    if let Ok(lanes) = shared.lanes.lock() {
                        if let Some(l) = lanes.get(&key) {
                            l.reseek.store(true, std::sync::atomic::Ordering::Release);
                        }
                    }
                }
                Either::Left((Err(KafkaError::PartitionEOF(_)), _)) => {}
                Either::Left((Err(e), _)) => {
                    tracing::warn!(consumer = &*shared.name, error = %e, "Kafka consumer error.");
                }
            }
        }
    });
    // Graceful stop: drain every lane, commit, then leave the group.
    let handles: Vec<lane::LaneHandle> = match shared.lanes.lock() {
        Ok(mut l) => l.drain().map(|(_, h)| h).collect(),
        Err(_) => Vec::new(),
    };
    let commit = drain_lanes(&shared, handles);
    if commit.count() > 0 {
        if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
            tracing::debug!(error = %e, "Final Kafka commit failed (database offsets are authoritative).");
        }
    }
    consumer.unsubscribe();
    // Serve the final revoke, then close when the last reference goes.
    futures::executor::block_on(async {
        let recv = consumer.recv();
        let t = futures_timer(Duration::from_millis(200));
        futures::pin_mut!(recv);
        futures::pin_mut!(t);
        futures::future::select(recv, t).await;
    });
    // The partition queues hold the consumer: let them go so it closes.
    if let Ok(mut q) = shared.queues.lock() {
        q.clear();
    }
    drop(consumer);
    Ok(())
}

/// Assigns `parts` without joining the group (a projection rebuild): the
/// lanes start as after a rebalance, from the database position or, for a
/// partition without one, where the consumer's own committed offset or
/// `auto.offset.reset` says.
fn assign_manually(shared: &Arc<Shared>, consumer: &KafkaConsumer, parts: &[PartitionKey]) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        tpl.add_partition(t, *p);
    }
    let kafka = committed_positions(consumer, &tpl).unwrap_or_else(|e| {
        tracing::warn!(consumer = &*shared.name, error = %e, "Could not read Kafka's committed offsets; starting from the database positions.");
        HashMap::new()
    });
    tracing::info!(consumer = &*shared.name, partitions = ?parts, "Assigning partitions manually (no group membership).");
    if !spawn_lanes(shared, parts, &mut tpl, &kafka) {
        return Err(Error::Config("the consumer is gone before its partitions were assigned".into()));
    }
    consumer.assign(&tpl)?;
    Ok(())
}

/// A timer future that needs no runtime (a thread sleeping then waking).
fn futures_timer(d: Duration) -> impl std::future::Future<Output = ()> {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    std::thread::spawn(move || {
        std::thread::sleep(d);
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

/// Keeps the inbox's day partitions ahead of time and applies its retention.
/// Partition DDL gives up quickly when it cannot get its lock (it must never
/// make every claim queue behind it), so a failed pass is tried again soon.
async fn maintain_inbox(pool: PgPool, shutdown: CancellationToken) {
    loop {
        let mut ok = true;
        match store::inbox::ensure_days(&pool, 3).await {
            Ok(n) if n > 0 => tracing::info!(created = n, "Created inbox partitions."),
            Ok(_) => {}
            Err(e) => {
                ok = false;
                tracing::warn!(error = %e, "Creating inbox partitions failed; trying again in a minute.");
            }
        }
        match store::trim_inbox(&pool).await {
            Ok(t) => {
                if !t.dropped.is_empty() || t.deleted > 0 {
                    tracing::info!(dropped = ?t.dropped, deleted = t.deleted, "Applied the inbox retention.");
                }
                if !t.kept.is_empty() {
                    tracing::info!(kept = ?t.kept, "Kept inbox partitions past retention: they hold identities claimed recently (redriven events).");
                }
            }
            Err(e) => {
                ok = false;
                tracing::warn!(error = %e, "Applying the inbox retention failed; trying again in a minute.");
            }
        }
        let next = if ok { Duration::from_secs(3600) } else { Duration::from_secs(60) };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Creates the missing dead-letter topics of `consumer` for `topics`.
fn ensure_dlt_topics<'a>(
    connection: &'a KafkaConnection,
    topics: &'a [String],
    consumer: &'a str,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        use rdkafka::admin::{NewTopic, TopicReplication};
        use rdkafka::types::RDKafkaErrorCode;
        let admin = crate::kafka::admin::KafkaAdmin::new(connection, &[])?;
        let client: AdminClient<DefaultClientContext> = connection.client_config()?.create()?;
        for topic in topics {
            let partitions = admin.topic_partitions(topic).await?.len() as i32;
            let dlt = crate::failure::dlt_topic(topic, consumer);
            let new = NewTopic::new(&dlt, partitions.max(1), TopicReplication::Fixed(-1));
            let res = client
                .create_topics([&new], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
                .await?;
            for r in res {
                match r {
                    Ok(t) => tracing::info!(consumer, topic = %t, "Created the dead-letter topic."),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, e)) => {
                        return Err(Error::Config(format!("cannot create the dead-letter topic {t}: {e}")));
                    }
                }
            }
        }
        Ok(())
    })
}

/// Refuses an inbox retention shorter than the time a topic's records stay
/// readable, `retention.ms + segment.ms` (Kafka deletes a segment only when
/// its newest record expires), or a topic kept forever / compacted, unless
/// forced.
fn check_retention<'a>(
    connection: &'a KafkaConnection,
    topics: &'a [String],
    inbox: Duration,
    force: bool,
    consumer: &'a str,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(check_retention_inner(connection, topics, inbox, force, consumer))
}

async fn check_retention_inner(
    connection: &KafkaConnection,
    topics: &[String],
    inbox: Duration,
    force: bool,
    consumer: &str,
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = connection.client_config()?.create()?;
    let specs: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let results = admin
        .describe_configs(specs.iter(), &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))))
        .await?;
    for (topic, r) in topics.iter().zip(results) {
        let res = r.map_err(|e| Error::Config(format!("cannot read the configuration of topic {topic}: {e}")))?;
        let retention_ms: i64 =
            res.get("retention.ms").and_then(|e| e.value.as_deref()).and_then(|v| v.parse().ok()).unwrap_or(-1);
        // Kafka's default segment.ms is 7 days; a topic config always reports
        // one, but assume the default if it does not parse.
        let segment_ms: i64 = res
            .get("segment.ms")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse().ok())
            .unwrap_or(7 * 86_400_000);
        let readable_ms = retention_ms.saturating_add(segment_ms.max(0));
        let compact = res.get("cleanup.policy").and_then(|e| e.value.as_deref()).is_some_and(|v| v.contains("compact"));
        let problem = if compact {
            Some(format!("topic {topic} is compacted: its records are kept indefinitely"))
        } else if retention_ms < 0 {
            Some(format!("topic {topic} keeps records forever (retention.ms = -1)"))
        } else if Duration::from_millis(readable_ms as u64) >= inbox {
            Some(format!(
                "records of topic {topic} stay readable for up to {:.1} days (retention.ms = {retention_ms} plus segment.ms = {segment_ms}: a segment is deleted only when its newest record expires) but the inbox keeps identities for {:.1} days",
                readable_ms as f64 / 86_400_000.0,
                inbox.as_secs_f64() / 86_400.0
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            if force {
                tracing::warn!(consumer, topic = %topic, "Inbox retention forced: {p}; a duplicate older than the inbox retention would be processed again.");
            } else {
                return Err(Error::Refused(format!(
                    "{p}. A duplicate that outlives its inbox row is processed again: raise inbox_retention above that, lower the topic's retention.ms or segment.ms, or force it"
                )));
            }
        }
    }
    Ok(())
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
