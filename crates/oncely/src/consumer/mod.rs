//! The effectively-once consumer runtime.
//!
//! Per assigned partition, one ordered **lane**. A lane takes up to
//! `max_batch` records (or what arrived within `max_wait`) and runs one
//! PostgreSQL transaction: claim the identities in the inbox (one statement),
//! run the handler for each new event, advance the partition's offset in
//! `oncely.offsets` with a compare-and-set (the fence), commit; then commit the
//! offset to Kafka asynchronously. PostgreSQL is the source of truth.
//!
//! On assignment a lane starts at the database offset. If Kafka's committed
//! offset is behind it (someone rewound the group, e.g. with
//! `kafka-consumer-groups --reset-offsets`) or ahead of it, the
//! [`RewindPolicy`] decides. On revoke, lanes drain within the drain timeout and
//! the final offsets are committed inside the rebalance callback.

use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::envelope::{DecodePayload, IdentitySource, RawRecord, VersionSource};
use crate::error::{Error, Result};
use crate::store;

pub mod events;
mod guard;
mod handler;
mod lane;

pub use guard::SpikeGuard;
pub use handler::{BatchHandlerFn, Cx, FailureClass, HandlerError, HandlerFn};
use handler::{ErasedHandler, Typed, TypedBatch};

/// Commit metadata oncely's consumers write with their Kafka commits; an
/// offset committed with any other metadata was moved by someone else.
pub const COMMIT_METADATA: &str = "oncely:consumer";
/// Prefix of the commit metadata written by `oncely offsets reset`.
pub const RESET_METADATA_PREFIX: &str = "oncely:reset:";

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
    pub max_wait: Duration,
    pub drain_timeout: Duration,
    pub rewind: RewindPolicy,
    pub skip_forward: RewindPolicy,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_record_bytes: usize,
    pub replay: bool,
    pub dead_key_policy: crate::failure::DeadKeyPolicy,
}

/// State shared by the Kafka thread, the rebalance callback and the lanes.
pub(crate) struct Shared {
    pub name: Arc<str>,
    pub pool: PgPool,
    pub handler: Arc<dyn ErasedHandler>,
    pub identity: IdentitySource,
    pub version: Option<VersionGuard>,
    pub settings: Settings,
    pub rt: tokio::runtime::Handle,
    pub consumer: OnceLock<Weak<KafkaConsumer>>,
    pub lanes: Mutex<HashMap<(String, i32), lane::LaneHandle>>,
    pub bucket: Option<guard::TokenBucket>,
    pub spike: Option<guard::SpikeState>,
    pub shutdown: CancellationToken,
    pub state: Option<Arc<dyn std::any::Any + Send + Sync>>,
    /// Records of paused partitions waiting for room in their lane's channel.
    pub overflow: Mutex<HashMap<PartitionKey, VecDeque<Arc<RawRecord>>>>,
    /// Effects this consumer may record (and run, when registered).
    pub registry: Arc<crate::effects::Registry>,
    /// Wakes the in-process effect executor after a commit.
    pub effects_wake: Arc<tokio::sync::Notify>,
    /// Lanes ask the dispatcher to refill them here.
    pub wake: futures::channel::mpsc::UnboundedSender<(String, i32)>,
}

impl Shared {
    /// A lane whose partition was paused has room again.
    pub(crate) fn refill(&self, topic: &str, partition: i32) {
        let _ = self.wake.unbounded_send((topic.to_owned(), partition));
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
    fn on_assign(&self, base: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let s = &self.0;
        let parts: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        tracing::info!(consumer = &*s.name, partitions = ?parts, "Partitions assigned.");
        // The database offsets: the source of truth. Blocking here is intended:
        // the assignment must not start before we know where to start.
        let mut db: HashMap<(String, i32), i64> = HashMap::new();
        let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
        for (t, p) in &parts {
            by_topic.entry(t.as_str()).or_default().push(*p);
        }
        for (topic, ps) in by_topic {
            let pool = s.pool.clone();
            let name = s.name.clone();
            let topic_owned = topic.to_owned();
            let res = s.rt.block_on(async move {
                let mut attempt = 0u32;
                loop {
                    match store::load_offsets(&pool, &name, &topic_owned, &ps).await {
                        Ok(m) => return Ok(m),
                        Err(e) if attempt < 20 => {
                            attempt += 1;
                            tracing::warn!(error = %e, "Reading the database offsets failed; retrying.");
                            tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(8)))).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
            });
            match res {
                Ok(m) => db.extend(m.into_iter().map(|(p, o)| ((topic.to_owned(), p), o))),
                Err(e) => {
                    // Without the database offsets no lane can start safely: halt
                    // them all (they resume at the next assignment).
                    tracing::error!(consumer = &*s.name, error = %e, "Cannot read the database offsets; the assigned partitions stay halted.");
                    for (t, p) in &parts {
                        db.insert((t.clone(), *p), -1);
                    }
                }
            }
        }
        // Kafka's committed offsets and their metadata, to detect moves.
        let committed = base.committed_offsets(tpl.clone(), Duration::from_secs(10));
        let mut kafka: HashMap<(String, i32), (Option<i64>, String)> = HashMap::new();
        match committed {
            Ok(c) => {
                for e in c.elements() {
                    let off = match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    };
                    kafka.insert((e.topic().to_owned(), e.partition()), (off, e.metadata().to_owned()));
                }
            }
            Err(e) => {
                tracing::warn!(consumer = &*s.name, error = %e, "Could not read Kafka's committed offsets; rewinds cannot be detected for this assignment.")
            }
        }

        let mut halted = TopicPartitionList::new();
        for (topic, partition) in &parts {
            let key = (topic.clone(), *partition);
            let db_off = db.get(&key).copied();
            let broken = db_off == Some(-1);
            let (k_off, meta) = kafka.get(&key).cloned().unwrap_or((None, String::new()));
            let mut d =
                decide_start(db_off.filter(|o| *o >= 0), k_off, &meta, s.settings.rewind, s.settings.skip_forward);
            if broken {
                d.halt = true;
            }
            if let (Some((kind, action)), Some(k), Some(dbo)) = (d.moved, k_off, db_off) {
                events::PartitionRewound {
                    consumer: &s.name,
                    topic,
                    partition: *partition,
                    kafka_offset: k,
                    db_offset: dbo,
                    kind,
                    action,
                }
                .emit();
            }
            if let Some(seek) = d.seek {
                if let Some(mut e) = tpl.find_partition(topic, *partition) {
                    if let Err(err) = e.set_offset(Offset::Offset(seek)) {
                        tracing::error!(error = %err, "Cannot set the start offset.");
                    }
                }
            }
            if d.halt {
                if let Err(e) = halted.add_partition(topic, *partition).set_offset(Offset::Stored) {
                    tracing::debug!(error = %e, "set_offset on the halt list");
                }
            }
            let handle = lane::spawn(self.0.clone(), topic.clone(), *partition, d);
            if let Ok(mut lanes) = s.lanes.lock() {
                if let Some(old) = lanes.insert(key, handle) {
                    old.stop.cancel();
                }
            }
        }
        let res = if matches!(base.rebalance_protocol(), rdkafka::consumer::RebalanceProtocol::Cooperative) {
            base.incremental_assign(tpl)
        } else {
            base.assign(tpl)
        };
        if let Err(e) = res {
            tracing::error!(consumer = &*s.name, error = %e, "Assigning partitions failed.");
        }
        if halted.count() > 0 {
            if let Err(e) = base.pause(&halted) {
                tracing::error!(error = %e, "Cannot pause halted partitions.");
            }
        }
    }

    fn on_revoke(&self, base: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let s = &self.0;
        let parts: Vec<(String, i32)> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        tracing::info!(consumer = &*s.name, partitions = ?parts, lost = base.assignment_lost(), "Partitions revoked; draining lanes.");
        let handles: Vec<lane::LaneHandle> = match s.lanes.lock() {
            Ok(mut lanes) => parts.iter().filter_map(|k| lanes.remove(k)).collect(),
            Err(_) => Vec::new(),
        };
        let commit = drain_lanes(s, handles);
        if let Ok(mut o) = s.overflow.lock() {
            for k in &parts {
                o.remove(k);
            }
        }
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
pub struct ConsumerBuilder {
    name: String,
    bootstrap: Option<String>,
    pool: Option<PgPool>,
    database_url: Option<String>,
    topics: Vec<String>,
    handler: Option<Arc<dyn ErasedHandler>>,
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
    state: Option<Arc<dyn std::any::Any + Send + Sync>>,
    registry: crate::effects::Registry,
    effect_lease: Duration,
    create_dlt_topics: bool,
}

impl std::fmt::Debug for ConsumerBuilder {
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

impl ConsumerBuilder {
    fn new(name: String) -> Self {
        ConsumerBuilder {
            name,
            bootstrap: None,
            pool: None,
            database_url: None,
            topics: Vec::new(),
            handler: None,
            identity: IdentitySource::CloudEvents,
            version: None,
            settings: Settings {
                max_batch: 500,
                max_wait: Duration::from_millis(20),
                drain_timeout: Duration::from_secs(10),
                rewind: RewindPolicy::Skip,
                skip_forward: RewindPolicy::Skip,
                max_attempts: 10,
                backoff_base: Duration::from_millis(200),
                backoff_max: Duration::from_secs(60),
                max_record_bytes: 8 * 1024 * 1024,
                replay: false,
                dead_key_policy: crate::failure::DeadKeyPolicy::Continue,
            },
            rate: None,
            spike: None,
            kafka: Vec::new(),
            inbox_retention: Duration::from_secs(8 * 24 * 3600),
            force_inbox_retention: false,
            metrics_addr: None,
            migrate: true,
            handle_sigterm: true,
            state: None,
            registry: crate::effects::Registry::default(),
            effect_lease: Duration::from_secs(60),
            create_dlt_topics: true,
        }
    }

    /// Kafka `bootstrap.servers`. Required (no default: guessing a cluster is
    /// how production gets touched by mistake).
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.bootstrap = Some(servers.into());
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

    /// The handler: `async fn(Event<T>, &mut Cx) -> Result<(), HandlerError>`.
    /// `T` is decoded from the JSON payload (or use
    /// [`RawPayload`](crate::envelope::RawPayload)); a payload that does not
    /// decode is dead-lettered with reason `undecodable-payload`.
    pub fn handler<T, H>(mut self, handler: H) -> Self
    where
        T: DecodePayload,
        H: for<'a> HandlerFn<'a, T>,
    {
        self.handler = Some(Arc::new(Typed { handler, _t: PhantomData }));
        self
    }

    /// State the handler reaches with [`Cx::state`] (a client, settings):
    /// handlers are plain async fns, so this is how they get their
    /// dependencies. Default: none.
    pub fn state<S: Send + Sync + 'static>(mut self, state: S) -> Self {
        self.state = Some(Arc::new(state));
        self
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
    /// `async fn(Vec<Event<T>>, &mut Cx) -> Result<(), HandlerError>` gets the
    /// new events of each batch at once (write them with one multi-row
    /// statement). Duplicates are already removed and the version guard
    /// applied. On failure the events are retried one at a time to isolate
    /// the failing one. Record effects with [`Cx::effect_for`].
    pub fn batch_handler<T, H>(mut self, handler: H) -> Self
    where
        T: DecodePayload,
        H: for<'a> BatchHandlerFn<'a, T>,
    {
        self.handler = Some(Arc::new(TypedBatch { handler, _t: PhantomData }));
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

    /// Passes a librdkafka setting through (e.g. `session.timeout.ms`). The
    /// settings in [`FORCED_KAFKA_SETTINGS`] cannot be overridden.
    pub fn kafka(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.kafka.push((key.into(), value.into()));
        self
    }

    /// How long inbox rows are kept. Default 8 days (Kafka's default topic
    /// retention is 7). Must exceed every topic's `retention.ms`, or a
    /// duplicate could outlive its inbox row; `run` refuses otherwise.
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
        Box::pin(self.run_inner(shutdown))
    }

    async fn run_inner(self, shutdown: CancellationToken) -> Result<()> {
        let bootstrap = self.bootstrap.ok_or_else(|| Error::Config("bootstrap_servers is required".into()))?;
        if self.topics.is_empty() {
            return Err(Error::Config("at least one topic is required".into()));
        }
        let handler = self.handler.ok_or_else(|| Error::Config("a handler is required".into()))?;
        let pool = match (self.pool, &self.database_url) {
            (Some(p), _) => p,
            (None, Some(url)) => store::connect(url, 20).await?,
            (None, None) => return Err(Error::Config("a pool or a database_url is required".into())),
        };
        if self.migrate {
            store::migrate(&pool).await?;
        }
        let retention_days = self.inbox_retention.as_secs().div_ceil(86_400).max(1) as i32;
        check_retention(&bootstrap, &self.topics, self.inbox_retention, self.force_inbox_retention, &self.name).await?;
        if self.create_dlt_topics {
            ensure_dlt_topics(&bootstrap, &self.topics, &self.name).await?;
        }
        store::register_consumer(&pool, &self.name, retention_days).await?;
        store::ensure_inbox_partitions(&pool, 3).await?;

        let mut cfg = ClientConfig::new();
        cfg.set("bootstrap.servers", &bootstrap)
            .set("group.id", &self.name)
            .set("auto.offset.reset", "earliest")
            // Bounded prefetch per partition: librdkafka stops fetching when
            // its queue holds this much, which is oncely's backpressure.
            .set("queued.max.messages.kbytes", "16384")
            .set("queued.min.messages", "20000");
        for (k, v) in &self.kafka {
            cfg.set(k, v);
        }
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

        let (wake_tx, wake_rx) = futures::channel::mpsc::unbounded();
        let executor = crate::effects::Executor::new(pool.clone(), self.registry.clone()).lease(self.effect_lease);
        let effects_wake = executor.waker();
        let executor_task = tokio::spawn(executor.run(shutdown.clone()));
        let shared = Arc::new(Shared {
            name: Arc::from(self.name.as_str()),
            pool: pool.clone(),
            handler,
            identity: self.identity,
            version: self.version,
            settings: self.settings,
            rt: tokio::runtime::Handle::current(),
            consumer: OnceLock::new(),
            lanes: Mutex::new(HashMap::new()),
            bucket: self.rate.map(|r| guard::TokenBucket::new(r, r)),
            spike: self.spike.map(guard::SpikeState::new),
            shutdown: shutdown.clone(),
            state: self.state,
            overflow: Mutex::new(HashMap::new()),
            wake: wake_tx,
            registry: Arc::new(self.registry),
            effects_wake,
        });
        let consumer: Arc<KafkaConsumer> = Arc::new(cfg.create_with_context(Ctx(shared.clone()))?);
        let _ = shared.consumer.set(Arc::downgrade(&consumer));
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;

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
                let r = kafka_thread(thread_shared, thread_consumer, wake_rx);
                let _ = done_tx.send(r);
            })
            .map_err(Error::Io)?;
        let result = done_rx.await.unwrap_or_else(|_| Err(Error::Config("the consumer thread panicked".into())));
        maintenance.abort();
        if let Ok(Err(e)) = executor_task.await {
            tracing::warn!(error = %e, "The effect executor stopped with an error.");
        }
        tracing::info!(consumer = %self.name, "Consumer stopped.");
        result
    }
}

/// The Kafka thread: serves the consumer queue (records, rebalances, errors)
/// and dispatches records in order to their partition's lane. One ordered
/// source per partition means a lane can never see a record out of order.
fn kafka_thread(
    shared: Arc<Shared>,
    consumer: Arc<KafkaConsumer>,
    mut wake: futures::channel::mpsc::UnboundedReceiver<(String, i32)>,
) -> Result<()> {
    use futures::future::{select, Either};
    use futures::StreamExt;
    let token = shared.shutdown.clone();
    futures::executor::block_on(async {
        loop {
            let recv = consumer.recv();
            let stop = token.cancelled();
            let woken = wake.next();
            futures::pin_mut!(recv);
            futures::pin_mut!(stop);
            let first = select(recv, woken);
            match select(first, stop).await {
                Either::Right(_) => break,
                Either::Left((Either::Left((Ok(m), _)), _)) => {
                    dispatch(&shared, &consumer, Arc::new(RawRecord::from_message(&m)));
                }
                Either::Left((Either::Left((Err(KafkaError::PartitionEOF(_)), _)), _)) => {}
                Either::Left((Either::Left((Err(e), _)), _)) => {
                    tracing::warn!(consumer = &*shared.name, error = %e, "Kafka consumer error.");
                }
                Either::Left((Either::Right((Some((topic, partition)), _)), _)) => {
                    refill(&shared, &consumer, topic, partition);
                }
                Either::Left((Either::Right((None, _)), _)) => break,
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
    drop(consumer);
    Ok(())
}

/// Hands a record to its lane. When the lane's channel is full the partition
/// is paused (librdkafka stops fetching it: backpressure) and the record waits
/// in the overflow, behind which every later record of the partition queues.
fn dispatch(shared: &Shared, consumer: &KafkaConsumer, rec: Arc<RawRecord>) {
    let key = (rec.topic.clone(), rec.partition);
    let Ok(mut overflow) = shared.overflow.lock() else { return };
    if let Some(q) = overflow.get_mut(&key) {
        q.push_back(rec);
        return;
    }
    let Ok(lanes) = shared.lanes.lock() else { return };
    let Some(lane) = lanes.get(&key) else {
        tracing::debug!(topic = %key.0, partition = key.1, offset = rec.offset, "Dropped a record of a partition without a lane; it is read again from the database offset.");
        return;
    };
    match lane.tx.try_send(rec) {
        Ok(()) => {}
        Err(tokio::sync::mpsc::error::TrySendError::Full(rec)) => {
            lane.refill_asked.store(false, std::sync::atomic::Ordering::Release);
            lane.paused.store(true, std::sync::atomic::Ordering::Release);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&key.0, key.1);
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(error = %e, "Cannot pause a partition for backpressure.");
            }
            tracing::debug!(topic = %key.0, partition = key.1, "Paused a partition: its lane is full.");
            overflow.insert(key, VecDeque::from([rec]));
        }
        Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// Moves a paused partition's overflow into its lane; resumes the partition
/// once the overflow is empty.
fn refill(shared: &Shared, consumer: &KafkaConsumer, topic: String, partition: i32) {
    let key = (topic, partition);
    let Ok(mut overflow) = shared.overflow.lock() else { return };
    let Ok(lanes) = shared.lanes.lock() else { return };
    let Some(lane) = lanes.get(&key) else {
        overflow.remove(&key);
        return;
    };
    // Whatever happens below, the lane may ask again (a request that arrives
    // after the partition was resumed must not leave this set for the next pause).
    lane.refill_asked.store(false, std::sync::atomic::Ordering::Release);
    let Some(q) = overflow.get_mut(&key) else { return };
    while let Some(rec) = q.pop_front() {
        match lane.tx.try_send(rec) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(rec)) => {
                q.push_front(rec);
                tracing::debug!(topic = %key.0, partition = key.1, left = q.len(), "Refilled a full lane; it stays paused.");
                return;
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
        }
    }
    overflow.remove(&key);
    // Resume only with room for many records (hysteresis), else stay paused:
    // the lane asks again when its channel is half empty.
    if lane.tx.capacity() < lane.tx.max_capacity() / 2 {
        tracing::debug!(topic = %key.0, partition = key.1, free = lane.tx.capacity(), "Refilled a lane; it stays paused.");
        overflow.insert(key, VecDeque::new());
        return;
    }
    tracing::debug!(topic = %key.0, partition = key.1, "Resumed a partition.");
    lane.paused.store(false, std::sync::atomic::Ordering::Release);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&key.0, key.1);
    if let Err(e) = consumer.resume(&tpl) {
        tracing::warn!(error = %e, "Cannot resume a partition after backpressure.");
    }
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

/// Keeps the inbox's daily partitions ahead of time and drops expired ones.
async fn maintain_inbox(pool: PgPool, shutdown: CancellationToken) {
    loop {
        match store::ensure_inbox_partitions(&pool, 3).await {
            Ok(n) if n > 0 => tracing::info!(created = n, "Created inbox partitions."),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Creating inbox partitions failed."),
        }
        match store::drop_expired_inbox_partitions(&pool).await {
            Ok(d) if !d.is_empty() => tracing::info!(dropped = ?d, "Dropped expired inbox partitions."),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Dropping expired inbox partitions failed."),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// Creates the missing dead-letter topics of `consumer` for `topics`.
fn ensure_dlt_topics<'a>(
    bootstrap: &'a str,
    topics: &'a [String],
    consumer: &'a str,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(async move {
        use rdkafka::admin::{NewTopic, TopicReplication};
        use rdkafka::types::RDKafkaErrorCode;
        let admin = crate::admin::kafka::KafkaAdmin::new(bootstrap, &[])?;
        let client: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
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

/// Refuses an inbox retention shorter than a topic's `retention.ms` (or a
/// topic kept forever / compacted), unless forced.
fn check_retention<'a>(
    bootstrap: &'a str,
    topics: &'a [String],
    inbox: Duration,
    force: bool,
    consumer: &'a str,
) -> futures::future::BoxFuture<'a, Result<()>> {
    Box::pin(check_retention_inner(bootstrap, topics, inbox, force, consumer))
}

async fn check_retention_inner(
    bootstrap: &str,
    topics: &[String],
    inbox: Duration,
    force: bool,
    consumer: &str,
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let specs: Vec<ResourceSpecifier<'_>> = topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let results = admin
        .describe_configs(specs.iter(), &AdminOptions::new().request_timeout(Some(Duration::from_secs(30))))
        .await?;
    for (topic, r) in topics.iter().zip(results) {
        let res = r.map_err(|e| Error::Config(format!("cannot read the configuration of topic {topic}: {e}")))?;
        let retention_ms: i64 =
            res.get("retention.ms").and_then(|e| e.value.as_deref()).and_then(|v| v.parse().ok()).unwrap_or(-1);
        let compact = res.get("cleanup.policy").and_then(|e| e.value.as_deref()).is_some_and(|v| v.contains("compact"));
        let problem = if compact {
            Some(format!("topic {topic} is compacted: its records are kept indefinitely"))
        } else if retention_ms < 0 {
            Some(format!("topic {topic} keeps records forever (retention.ms = -1)"))
        } else if Duration::from_millis(retention_ms as u64) >= inbox {
            Some(format!(
                "topic {topic} keeps records for {:.1} days (retention.ms = {retention_ms}) but the inbox keeps identities for {:.1} days",
                retention_ms as f64 / 86_400_000.0,
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
                    "{p}. A duplicate that outlives its inbox row is processed again: raise inbox_retention above the topic's retention, or force it"
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
