//! [`ProcessorBuilder`]: inputs, outputs, the handler and the transaction
//! settings; [`transactional_id`], the rule that names an instance's producer.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::clients::{self, Connection};
use super::out::Out;
use super::runtime::{self, Settings, Shared};
use crate::consumer::HandlerError;
use crate::envelope::{
    decode_event, DecodeError, DecodePayload, Event, EventId, IdentitySource, RawPayload, RawRecord,
};
use crate::error::{Error, Result};
use crate::failure::DLT_HEADROOM;

/// What a fenced processor does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FencedPolicy {
    /// Stop: [`ProcessorBuilder::run`] returns [`Error::Fenced`] (a binary
    /// exits non-zero and its supervisor decides). Default: a fenced
    /// instance is a zombie or a duplicate, and the newer instance has its
    /// work.
    #[default]
    Stop,
    /// Drop the producer and the consumer, wait this long, then start again
    /// with a new producer under the same `transactional.id` (which fences
    /// the other holder in turn: two live instances configured with one id
    /// take turns, once per wait, each turn logged). For processors embedded
    /// in a service that must not stop.
    Rejoin(Duration),
}

/// The `transactional.id` of instance `instance` of processor `name`:
/// `<name>/<instance>`.
///
/// Stable for as long as the instance keeps its id (a StatefulSet pod's
/// name, a host name), so a restarted instance's `init_transactions` aborts
/// the transaction its previous run left open at once, instead of leaving it
/// to block `read_committed` readers until `transaction.timeout.ms`; unique
/// per instance, so two instances never fence each other. Grant ACLs with
/// the prefix `<name>/`.
pub fn transactional_id(name: &str, instance: &str) -> String {
    format!("{name}/{instance}")
}

/// The instance id used when none is given: `ONCELY_INSTANCE_ID`, else the
/// host name.
pub fn default_instance_id() -> Option<String> {
    std::env::var("ONCELY_INSTANCE_ID")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| whoami::fallible::hostname().ok().filter(|h| !h.is_empty()))
}

fn check_instance_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 200 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::Config(format!(
            "instance id {id:?} must be 1 to 200 characters without spaces or control characters"
        )));
    }
    Ok(())
}

/// A processor handler: implemented for every `async fn(Event<T>, &mut Out)
/// -> Result<(), HandlerError>`.
pub trait ProcessFn<'a, T>: Send + Sync + 'static {
    /// The handler's future.
    type Fut: Future<Output = Result<(), HandlerError>> + Send + 'a;
    /// Calls the handler.
    fn call(&self, ev: Event<T>, out: &'a mut Out) -> Self::Fut;
}

impl<'a, T, F, Fut> ProcessFn<'a, T> for F
where
    F: Fn(Event<T>, &'a mut Out) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'a,
    T: 'a,
{
    type Fut = Fut;
    fn call(&self, ev: Event<T>, out: &'a mut Out) -> Fut {
        (self)(ev, out)
    }
}

/// The runtime's view of a handler: decode, then call; not generic over
/// the event type.
pub(crate) trait ErasedProcess: Send + Sync + 'static {
    fn decode(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError>;
    fn call<'a>(&'a self, ev: Box<dyn Any + Send>, out: &'a mut Out) -> BoxFuture<'a, Result<(), HandlerError>>;
}

struct Typed<T, H> {
    handler: H,
    _t: PhantomData<fn() -> T>,
}

impl<T, H> ErasedProcess for Typed<T, H>
where
    T: DecodePayload,
    H: for<'a> ProcessFn<'a, T>,
{
    fn decode(&self, id: EventId, record: Arc<RawRecord>) -> Result<Box<dyn Any + Send>, DecodeError> {
        Ok(Box::new(decode_event::<T>(id, record)?))
    }

    fn call<'a>(&'a self, ev: Box<dyn Any + Send>, out: &'a mut Out) -> BoxFuture<'a, Result<(), HandlerError>> {
        match ev.downcast::<Event<T>>() {
            Ok(ev) => Box::pin(self.handler.call(*ev, out)),
            Err(_) => Box::pin(async { Err(HandlerError::reject("internal: event type mismatch")) }),
        }
    }
}

/// A Kafka → Kafka processor; build one with [`Processor::builder`].
#[derive(Debug)]
pub struct Processor {
    _private: (),
}

impl Processor {
    /// Starts building processor `name`. The name is the Kafka `group.id`,
    /// the first part of the `transactional.id` ([`transactional_id`]), the
    /// middle of the dead-letter topics' names (`<topic>.<name>.dlt`) and the
    /// `ce_source` of its outputs (`/oncely/<name>`).
    pub fn builder(name: impl Into<String>) -> ProcessorBuilder {
        ProcessorBuilder::new(name.into())
    }
}

/// Builder for a [`Processor`]. Every setter documents its default and why.
pub struct ProcessorBuilder {
    name: String,
    conn: Connection,
    inputs: Vec<String>,
    outputs: Vec<String>,
    handler: Option<Arc<dyn ErasedProcess>>,
    identity: IdentitySource,
    source: Option<String>,
    state: Option<Arc<dyn Any + Send + Sync>>,
    instance_id: Option<String>,
    settings: Settings,
    create_dlt_topics: bool,
    handle_sigterm: bool,
    metrics_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for ProcessorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorBuilder")
            .field("name", &self.name)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Default [`ProcessorBuilder::commit_interval`].
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(100);
/// Default [`ProcessorBuilder::commit_every`].
pub const DEFAULT_COMMIT_EVERY: usize = 10_000;

impl ProcessorBuilder {
    fn new(name: String) -> Self {
        ProcessorBuilder {
            name,
            conn: Connection::default(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            handler: None,
            identity: IdentitySource::CloudEvents,
            source: None,
            state: None,
            instance_id: None,
            settings: Settings {
                commit_every: DEFAULT_COMMIT_EVERY,
                commit_interval: DEFAULT_COMMIT_INTERVAL,
                max_attempts: 5,
                backoff_base: Duration::from_millis(200),
                backoff_max: Duration::from_secs(10),
                on_fenced: FencedPolicy::Stop,
                op_timeout: Duration::from_secs(30),
                liveness: Duration::from_secs(5),
            },
            create_dlt_topics: true,
            handle_sigterm: true,
            metrics_addr: None,
        }
    }

    /// Kafka `bootstrap.servers`. Required (no default: guessing a cluster is
    /// how production gets touched by mistake).
    pub fn bootstrap_servers(mut self, servers: impl Into<String>) -> Self {
        self.conn.kafka = std::mem::take(&mut self.conn.kafka).property("bootstrap.servers", servers.into());
        self
    }

    /// How to reach the cluster: bootstrap servers and client properties
    /// (SASL, TLS) for every client the processor creates. Replaces
    /// [`bootstrap_servers`](Self::bootstrap_servers) and earlier
    /// [`kafka`](Self::kafka) settings.
    pub fn connection(mut self, connection: impl Into<crate::kafka::KafkaConnection>) -> Self {
        self.conn.kafka = connection.into();
        self
    }

    /// Passes a librdkafka setting to every client the processor creates
    /// (consumer, producer, admin): security settings (`security.protocol`,
    /// `sasl.*`, `ssl.*`) go here. Default: none. The consumer settings in
    /// [`FORCED_CONSUMER_SETTINGS`](super::FORCED_CONSUMER_SETTINGS),
    /// `group.id`, `transactional.id` and `enable.idempotence` cannot be
    /// overridden.
    pub fn kafka(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.conn.kafka = std::mem::take(&mut self.conn.kafka).property(key.into(), value.into());
        self
    }

    /// Passes a librdkafka setting to the consumer only
    /// (`session.timeout.ms`, `max.poll.interval.ms`, `fetch.*`). Default: none.
    pub fn consumer_kafka(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.conn.consumer.push((key.into(), value.into()));
        self
    }

    /// Passes a librdkafka setting to the transactional producer only
    /// (`linger.ms`, `compression.type`, `transaction.timeout.ms`). Default: none.
    pub fn producer_kafka(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.conn.producer.push((key.into(), value.into()));
        self
    }

    /// Consumes `topic` (call again for more). At least one is required.
    pub fn input(mut self, topic: impl Into<String>) -> Self {
        self.inputs.push(topic.into());
        self
    }

    /// Declares `topic` as an output (call again for more). The handler may
    /// only emit to declared outputs: they are checked to exist at start,
    /// and their `max.message.bytes` is read so that an output too large for
    /// its topic dead-letters its input (`oversized-output`) instead of
    /// aborting the transaction again and again. Default: none.
    pub fn output(mut self, topic: impl Into<String>) -> Self {
        self.outputs.push(topic.into());
        self
    }

    /// The handler: `async fn(Event<T>, &mut Out) -> Result<(), HandlerError>`.
    /// `T` is decoded from the JSON payload (or use
    /// [`RawPayload`](crate::envelope::RawPayload)); a payload that does not
    /// decode is dead-lettered with reason `undecodable-payload`.
    pub fn handler<T, H>(mut self, handler: H) -> Self
    where
        T: DecodePayload,
        H: for<'a> ProcessFn<'a, T>,
    {
        self.handler = Some(Arc::new(Typed { handler, _t: PhantomData }));
        self
    }

    /// A handler of raw payloads: `async fn(Event<RawPayload>, &mut Out) ->
    /// Result<(), HandlerError>` gets the payload's bytes as they are (an
    /// absent payload is empty), for payloads that are not JSON. The
    /// identity and the CloudEvents headers are read as for
    /// [`handler`](Self::handler). The same as `handler::<RawPayload, _>`.
    pub fn raw_handler<H>(self, handler: H) -> Self
    where
        H: for<'a> ProcessFn<'a, RawPayload>,
    {
        self.handler::<RawPayload, H>(handler)
    }

    /// State the handler reaches with [`Out::state`]. Default: none.
    pub fn state<S: Send + Sync + 'static>(mut self, state: S) -> Self {
        self.state = Some(Arc::new(state));
        self
    }

    /// Where an input event's identity comes from (it names the event in
    /// logs and dead letters and seeds its outputs' `ce_id`s). Default:
    /// `(ce_source, ce_id)`; a record without one is dead-lettered
    /// (`missing-event-id`).
    pub fn identity(mut self, identity: IdentitySource) -> Self {
        self.identity = identity;
        self
    }

    /// `ce_source` of the events emitted with [`Out::send`]. Default
    /// `/oncely/<name>`, as the consumer's `cx.publish`.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// This instance's id, the second part of its `transactional.id`
    /// ([`transactional_id`]). Default: `ONCELY_INSTANCE_ID`, else the host
    /// name, which is stable and unique for a StatefulSet pod or a host; set
    /// it when several instances share a host.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Commit the transaction once it holds this many input records.
    /// Default 10,000: with the interval below it, a transaction's fixed
    /// cost (offsets to the group coordinator, commit markers) is spread
    /// over many records (see docs/benchmarks.md); the interval bounds it
    /// first under ordinary load.
    pub fn commit_every(mut self, records: usize) -> Self {
        self.settings.commit_every = records.max(1);
        self
    }

    /// Commit the transaction at the latest this long after it began.
    /// Default 100 ms: outputs become visible to `read_committed` readers
    /// only at the commit, so this bounds the latency it adds (p99
    /// end-to-end under 150 ms in the benchmark), while committing ten times
    /// a second keeps the transactions' cost small (docs/benchmarks.md).
    pub fn commit_interval(mut self, d: Duration) -> Self {
        self.settings.commit_interval = d;
        self
    }

    /// Attempts before a transiently failing event is dead-lettered
    /// (`max-attempts`). Default 5. The event is retried in place, its
    /// partition paused behind it (per-key order holds; other partitions go
    /// on), so keep attempts × backoff short.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.settings.max_attempts = n.max(1);
        self
    }

    /// Retry backoff: `base * 2^attempt`, capped at `max`, with full jitter.
    /// Defaults 200 ms and 10 s: a partition waits at most about 20 s for an
    /// event that keeps failing with the default 5 attempts.
    pub fn retry_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.settings.backoff_base = base;
        self.settings.backoff_max = max.max(base);
        self
    }

    /// What a fenced processor does. Default [`FencedPolicy::Stop`].
    pub fn on_fenced(mut self, policy: FencedPolicy) -> Self {
        self.settings.on_fenced = policy;
        self
    }

    /// Timeout of each transactional call (init, send offsets, commit,
    /// abort). Default 30 s, below `transaction.timeout.ms` (60 s) so a
    /// stuck commit is reported before the broker aborts the transaction.
    pub fn transaction_call_timeout(mut self, d: Duration) -> Self {
        self.settings.op_timeout = d;
        self
    }

    /// When the processor has had nothing to commit for this long, it
    /// commits a transaction that re-commits its last offsets (a no-op for
    /// the group) so the transaction coordinator checks its producer's
    /// epoch: an instance fenced while idle learns it within this interval
    /// instead of sitting on its partitions. Default 5 s.
    pub fn liveness_check(mut self, d: Duration) -> Self {
        self.settings.liveness = d;
        self
    }

    /// Create the dead-letter topics (`<topic>.<name>.dlt`, as many partitions
    /// as the input, `max.message.bytes` the input's plus 64 KiB for the
    /// dead-letter headers) at start if they are missing. Default true; turn
    /// it off where topics are managed elsewhere (start then fails if one is
    /// missing).
    pub fn create_dlt_topics(mut self, yes: bool) -> Self {
        self.create_dlt_topics = yes;
        self
    }

    /// Stop gracefully on SIGTERM (commit the open transaction, leave the
    /// group). Default true.
    pub fn handle_sigterm(mut self, yes: bool) -> Self {
        self.handle_sigterm = yes;
        self
    }

    /// Serve Prometheus metrics on `GET /metrics` at this address. Default: none.
    pub fn metrics_addr(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Runs the processor until `shutdown` is cancelled (or SIGTERM): then
    /// it commits its open transaction, leaves the group and returns `Ok`.
    /// Returns [`Error::Fenced`] when fenced under [`FencedPolicy::Stop`], and
    /// an error naming the cause on a fatal producer or configuration error.
    pub fn run(self, shutdown: CancellationToken) -> BoxFuture<'static, Result<()>> {
        Box::pin(self.run_inner(shutdown))
    }

    async fn run_inner(self, shutdown: CancellationToken) -> Result<()> {
        if self.conn.kafka.bootstrap_servers().is_empty() {
            return Err(Error::Config("bootstrap_servers is required".into()));
        }
        if self.inputs.is_empty() {
            return Err(Error::Config("at least one input topic is required".into()));
        }
        let handler = self.handler.ok_or_else(|| Error::Config("a handler is required".into()))?;
        let instance = match self.instance_id {
            Some(i) => i,
            None => default_instance_id().ok_or_else(|| {
                Error::Config("no instance id: set ProcessorBuilder::instance_id or ONCELY_INSTANCE_ID".into())
            })?,
        };
        check_instance_id(&instance)?;
        let txn_id = transactional_id(&self.name, &instance);
        // A wrong password or an untrusted certificate: an error naming the
        // cause now, not a transaction waiting on librdkafka's retries.
        self.conn.kafka.check_at_start().await?;

        let admin = clients::admin(&self.conn)?;
        for t in &self.inputs {
            if !admin.topic_exists(t).await? {
                return Err(Error::Config(format!("input topic `{t}` does not exist")));
            }
        }
        for t in &self.outputs {
            if !admin.topic_exists(t).await? {
                return Err(Error::Config(format!(
                    "output topic `{t}` does not exist (the processor does not create its outputs)"
                )));
            }
        }
        let outputs = clients::topic_limits(&admin, &self.outputs).await?;
        let dlts: Vec<String> = self.inputs.iter().map(|t| crate::failure::dlt_topic(t, &self.name)).collect();
        for (input, dlt) in self.inputs.iter().zip(&dlts) {
            if self.create_dlt_topics {
                crate::failure::ensure_dlt_topic(&admin, input, dlt, &self.name).await?;
            } else if !admin.topic_exists(dlt).await? {
                return Err(Error::Config(format!("dead-letter topic `{dlt}` does not exist")));
            }
        }
        let dlt_limits = clients::topic_limits(&admin, &dlts).await?;
        drop(admin);

        // The producer's batches must fit the smallest limit (a batch over a
        // topic's max.message.bytes is refused whole), and it must accept
        // locally a record as large as the largest limit.
        let all = outputs.values().chain(dlt_limits.values());
        let smallest = all.clone().min().copied().unwrap_or(1_000_000);
        let largest = all.max().copied().unwrap_or(1_000_000);
        let batch_size = smallest.saturating_sub(runtime::BATCH_MARGIN).clamp(1, 1_000_000);
        let message_max_bytes = (largest + DLT_HEADROOM).clamp(1000, 1_000_000_000);

        if let Some(addr) = self.metrics_addr {
            let bound = crate::metrics::serve(addr, shutdown.clone()).await?;
            tracing::info!(addr = %bound, "Serving metrics.");
        }
        if self.handle_sigterm {
            crate::signal::cancel_on_sigterm(
                shutdown.clone(),
                "SIGTERM: committing the open transaction and stopping.",
            );
        }

        let source = self.source.unwrap_or_else(|| format!("/oncely/{}", self.name));
        let shared = Arc::new(Shared {
            name: Arc::from(self.name.as_str()),
            transactional_id: txn_id,
            conn: self.conn,
            inputs: self.inputs,
            outputs: Arc::new(outputs),
            dlt_limits: dlt_limits.into_iter().collect::<HashMap<_, _>>(),
            batch_size,
            message_max_bytes,
            handler,
            identity: self.identity,
            source: Arc::from(source.as_str()),
            settings: self.settings,
            state: self.state,
            rt: tokio::runtime::Handle::current(),
            shutdown,
        });
        runtime::run(shared).await
    }
}
