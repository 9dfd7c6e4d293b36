//! The consumer's builder: every setting, with its default and why, and the
//! configuration a projection rebuild derives from a live consumer's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::Offset;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::handler::ErasedHandler;
use super::{IntoBatchHandler, IntoHandler, RewindPolicy, Settings, SpikeGuard, Unrouted, VersionGuard};
use crate::envelope::{IdentitySource, VersionSource};
use crate::error::{Error, Result};
use crate::kafka::KafkaConnection;
use crate::store;

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
/// takes [`State<S>`](super::State) only compiles on a builder holding an `S`.
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
    pub(super) name: String,
    pub(super) connection: Option<KafkaConnection>,
    pub(super) pool: Option<PgPool>,
    pub(super) database_url: Option<String>,
    pub(super) topics: Vec<String>,
    pub(super) handler: Option<Arc<dyn ErasedHandler>>,
    pub(super) routes: HashMap<String, Arc<dyn ErasedHandler>>,
    pub(super) unrouted: Unrouted,
    pub(super) identity: IdentitySource,
    pub(super) version: Option<VersionGuard>,
    pub(super) settings: Settings,
    pub(super) rate: Option<f64>,
    pub(super) spike: Option<SpikeGuard>,
    pub(super) kafka: Vec<(String, String)>,
    pub(super) inbox_retention: Duration,
    pub(super) force_inbox_retention: bool,
    pub(super) metrics_addr: Option<SocketAddr>,
    pub(super) migrate: bool,
    pub(super) handle_sigterm: bool,
    pub(super) registry: crate::effects::Registry,
    pub(super) effect_lease: Duration,
    pub(super) create_dlt_topics: bool,
    /// Assign every partition of the topics instead of joining the group
    /// (a projection rebuild: the live group must not rebalance).
    pub(super) manual_assignment: bool,
    /// Run the in-process effect executor (not in a projection rebuild:
    /// it would run the live consumer's intents).
    pub(super) run_effect_executor: bool,
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

/// Settings oncely forces, whatever [`ConsumerBuilder::kafka`] says (the
/// Kafka floor's [`FORCED_CONSUMER_SETTINGS`](crate::kafka::FORCED_CONSUMER_SETTINGS)).
pub const FORCED_KAFKA_SETTINGS: &[(&str, &str)] = crate::kafka::FORCED_CONSUMER_SETTINGS;

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
                publish: super::handler::PublishTo::Outbox,
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
    /// takes [`State<S>`](super::State). Call it before registering the handlers
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
    /// [`Cx::effect_for`](super::Cx::effect_for).
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
    /// partition by `queued.max.messages.kbytes`, default 2 MB here). Default
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
    pub(crate) fn make_rebuild(&mut self, name: String, search_path: String, shadow_topic_suffix: Option<String>) {
        self.settings.follow = Some(Arc::from(self.name.as_str()));
        self.name = name;
        self.settings.replay = true;
        self.settings.publish = match shadow_topic_suffix {
            Some(suffix) => super::handler::PublishTo::Shadow(Arc::from(suffix)),
            None => super::handler::PublishTo::Nowhere,
        };
        self.settings.search_path = Some(search_path);
        self.manual_assignment = true;
        self.run_effect_executor = false;
        self.metrics_addr = None;
    }
}

/// The consumer's pool: the one it was given, or a new one from its URL.
pub(super) async fn pool_of(pool: Option<PgPool>, url: Option<&str>) -> Result<PgPool> {
    match (pool, url) {
        (Some(p), _) => Ok(p),
        (None, Some(url)) => store::connect(url, 20).await,
        (None, None) => Err(Error::Config("a pool or a database_url is required".into())),
    }
}
