//! The relay: publishes committed outbox rows to Kafka and marks them
//! published.
//!
//! ```no_run
//! # async fn run(pool: sqlx::PgPool) -> oncely::Result<()> {
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! oncely::outbox::Relay::builder(pool, "127.0.0.1:9092")
//!     .name("relay-a")
//!     .build()?
//!     .run(shutdown)
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! - **Lanes.** Rows carry a lane, a stable hash of their key
//!   ([`lane_of`](super::lane_of)). A relay publishes a lane only while it holds
//!   the session-level advisory lock `(LANE_LOCK_NS, lane)` on a dedicated
//!   connection. If the relay dies, PostgreSQL ends its session and the locks
//!   go with it. Every `lane_check_interval` each relay counts the running
//!   relays (each holds a presence lock), takes free lanes up to its fair share
//!   `ceil(LANES / relays)` and gives back lanes above it, so a second relay
//!   gets half the lanes and the survivor of two gets them all.
//! - **Claim.** One statement selects the pending rows (`published_at IS
//!   NULL`) of the lanes the relay's lock session holds *according to
//!   `pg_locks`* at that moment, in id order. There is no high-water mark: a row
//!   whose transaction committed late with a lower id is simply found by the
//!   next claim.
//! - **Publish.** Rows go to an idempotent producer (`enable.idempotence=true`,
//!   `acks=all`, and `enable.gapless.guarantee=true`, so a failed record can
//!   never be followed by a later record of the same partition that
//!   succeeded), with the row's `created_at` as the record timestamp. The relay
//!   waits for every delivery report of the batch.
//! - **Mark.** Acknowledged rows are marked published by a separate task
//!   while the next batch is claimed and published (the claim leaves rows
//!   still being marked aside). A crash before the mark publishes them again,
//!   with the same headers and so the same `ce_id`.
//! - **Wake-up.** `LISTEN oncely_outbox` (a statement trigger notifies at
//!   commit), with polling every `poll_interval` as a fallback. A full or
//!   non-empty batch is followed at once by the next claim, so batches grow
//!   with the load.
//! - **Transient failures.** A batch that did not fully publish because of a
//!   transient error (broker unreachable, not enough replicas, ...) is
//!   retried from its first unpublished row with exponential backoff
//!   ([`Backoff`], up to `max_backoff`). By default
//!   records never time out in the producer (`message.timeout.ms=0`): while
//!   the broker is down the batch waits and librdkafka reconnects with its own
//!   backoff; a timeout could let a later record overtake an earlier one of the
//!   same key. Database errors are retried the same way.
//! - **Rows refused for good.** The broker refuses a whole produce request
//!   when one record in it is too large (`MSG_SIZE_TOO_LARGE`) or invalid, and
//!   with the gapless guarantee that stops the producer, failing every record
//!   in flight. So a failed row is not judged by its batch: the failed rows
//!   are published again in halves, then alone, until the one the broker
//!   refuses on its own is found. That row is **set aside** (`failed_at`, its
//!   reason in `last_error`); so is a row whose topic does not exist (after
//!   librdkafka's `topic.metadata.propagation.max.ms`, checked against fresh
//!   metadata) or is not authorised. Setting aside costs no backoff: the
//!   other rows go on at once, and the next claims no longer see the row.
//!   The later rows of its topic and key are held behind it (see
//!   [`failed`](super::failed)).
//! - **Retention.** Rows published longer ago than `retention` are deleted in
//!   batches every `retention_interval`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::events;
use super::LANES;
use crate::backoff::{Backoff, Retries};
use crate::error::{Error, Result};
use crate::kafka::headers_with_nulls;
use crate::store::outbox::{self as store, OutboxRow};

/// Namespace (first `int4` key) of the lane locks: `(LANE_LOCK_NS, lane)`.
pub const LANE_LOCK_NS: i32 = 0x6f6e_6f78;
/// Namespace of the relays' presence locks: `(PRESENCE_LOCK_NS, backend pid)`.
pub const PRESENCE_LOCK_NS: i32 = 0x6f6e_6f79;
/// The `LISTEN`/`NOTIFY` channel the outbox trigger notifies.
pub const CHANNEL: &str = "oncely_outbox";

/// Settings of a relay; see each setter of [`RelayBuilder`].
#[derive(Debug, Clone)]
struct Settings {
    connection: crate::kafka::KafkaConnection,
    name: String,
    batch_size: usize,
    poll_interval: Duration,
    listen: bool,
    lane_check_interval: Duration,
    retention: Option<Duration>,
    retention_interval: Duration,
    retention_batch: i64,
    message_timeout: Duration,
    linger: Duration,
    max_backoff: Duration,
    producer_config: Vec<(String, String)>,
}

/// Builds a [`Relay`].
#[derive(Debug, Clone)]
pub struct RelayBuilder {
    pool: PgPool,
    s: Settings,
}

/// Publishes committed outbox rows; see the [module docs](self).
pub struct Relay {
    pool: PgPool,
    s: Arc<Settings>,
    producer: FutureProducer,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("settings", &self.s).finish_non_exhaustive()
    }
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "relay".into());
    format!("{host}-{}", std::process::id())
}

impl Relay {
    /// A relay for the outbox in `pool`'s database, publishing to
    /// `bootstrap_servers`. The relay opens two more connections with the
    /// pool's options: the lock session and the `LISTEN` session (from the pool).
    pub fn builder(pool: PgPool, connection: impl Into<crate::kafka::KafkaConnection>) -> RelayBuilder {
        RelayBuilder {
            pool,
            s: Settings {
                connection: connection.into(),
                name: default_name(),
                batch_size: 1000,
                poll_interval: Duration::from_millis(500),
                listen: true,
                lane_check_interval: Duration::from_secs(2),
                retention: Some(Duration::from_secs(7 * 24 * 3600)),
                retention_interval: Duration::from_secs(60),
                retention_batch: 10_000,
                message_timeout: Duration::ZERO,
                linger: Duration::from_millis(5),
                max_backoff: Duration::from_secs(30),
                producer_config: Vec::new(),
            },
        }
    }

    /// The relay's name (its `application_name` in `pg_stat_activity`, shown
    /// as the lane owner by `oncely outbox status`).
    pub fn name(&self) -> &str {
        &self.s.name
    }
}

impl RelayBuilder {
    /// The relay's name, shown as lane owner and used as the `relay` metric
    /// label. Default `<hostname>-<pid>`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.s.name = name.into();
        self
    }

    /// Most rows claimed and published at once. Default 1000: large enough
    /// to amortise the claim and the mark under load; a batch is only as
    /// large as what is pending, so it adds no latency when idle.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.s.batch_size = n.max(1);
        self
    }

    /// How often to look for rows without a notification. Default 500 ms: the
    /// fallback for notifications lost while the `LISTEN` session reconnects,
    /// and the only wake-up with [`listen(false)`](Self::listen).
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.s.poll_interval = d.max(Duration::from_millis(1));
        self
    }

    /// Whether to `LISTEN` for enqueue notifications. Default true (commit to
    /// publish in milliseconds); false polls only.
    pub fn listen(mut self, on: bool) -> Self {
        self.s.listen = on;
        self
    }

    /// How often to check the lock session, take free lanes and give back
    /// lanes above the fair share. Default 2 s: how long lanes of a dead relay
    /// wait for a survivor, at most.
    pub fn lane_check_interval(mut self, d: Duration) -> Self {
        self.s.lane_check_interval = d.max(Duration::from_millis(10));
        self
    }

    /// Delete rows published longer ago than this; `None` keeps them.
    /// Default 7 days: long enough to answer "was event X published, and
    /// when?" after a weekend.
    pub fn retention(mut self, keep: Option<Duration>) -> Self {
        self.s.retention = keep;
        self
    }

    /// How often retention runs. Default 60 s.
    pub fn retention_interval(mut self, d: Duration) -> Self {
        self.s.retention_interval = d.max(Duration::from_millis(10));
        self
    }

    /// Rows deleted per retention statement. Default 10,000: short
    /// transactions, no long row locks.
    pub fn retention_batch(mut self, n: i64) -> Self {
        self.s.retention_batch = n.max(1);
        self
    }

    /// librdkafka's `message.timeout.ms`. Default zero, no timeout: while the
    /// broker is unreachable the batch waits and the producer keeps
    /// reconnecting. A finite timeout makes an outage visible as failed
    /// attempts (retried with backoff), but librdkafka may then let a later
    /// record of a partition succeed after an earlier one timed out, which
    /// breaks per-key order (librdkafka's "message timeout considerations").
    pub fn message_timeout(mut self, d: Duration) -> Self {
        self.s.message_timeout = d;
        self
    }

    /// librdkafka's `linger.ms`. Default 5 ms: batches records per partition
    /// at a small latency cost.
    pub fn linger(mut self, d: Duration) -> Self {
        self.s.linger = d;
        self
    }

    /// Longest wait between retries of a failing publish or database call
    /// (the first wait is at most 100 ms, then it doubles: [`Backoff`]).
    /// Default 30 s. Rows the broker refuses for good are set aside without
    /// waiting.
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.s.max_backoff = d.max(Duration::from_millis(1));
        self
    }

    /// Another producer setting (TLS, SASL, compression, ...). The settings
    /// the relay's guarantees depend on (`enable.idempotence`, `acks`,
    /// `enable.gapless.guarantee`) cannot be overridden.
    pub fn producer_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.s.producer_config.push((key.into(), value.into()));
        self
    }

    /// Creates the producer; fails on an invalid configuration.
    pub fn build(self) -> Result<Relay> {
        let producer = make_producer(&self.s)?;
        Ok(Relay { pool: self.pool, s: Arc::new(self.s), producer })
    }
}

fn make_producer(s: &Settings) -> Result<FutureProducer> {
    let mut c = s.connection.client_config()?;
    c.set("client.id", format!("oncely-relay-{}", s.name))
        .set("linger.ms", s.linger.as_millis().to_string())
        .set("message.timeout.ms", s.message_timeout.as_millis().to_string());
    let forced = crate::kafka::FORCED_RELAY_PRODUCER_SETTINGS;
    for (k, v) in &s.producer_config {
        if k == "request.required.acks" || forced.iter().any(|(f, _)| f == k) {
            return Err(Error::Config(format!(
                "the outbox relay sets `{k}` itself: its ordering and no-duplicate guarantees depend on it"
            )));
        }
        c.set(k, v);
    }
    for (k, v) in forced {
        c.set(*k, *v);
    }
    Ok(c.create()?)
}

/// The relay's retries: 100 ms doubling up to `max`.
fn retries(max: Duration) -> Retries {
    Retries::new(Backoff::new(Duration::from_millis(100), max))
}

/// The session that holds the relay's locks.
struct LockSession {
    conn: PgConnection,
    pid: i32,
}

enum BatchOutcome {
    /// The batch is resolved; `wait`: some rows failed transiently (or the
    /// producer failed for no reason found), so back off before the next.
    Done {
        wait: bool,
    },
    Cancelled,
}

/// What a failed publish says about its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The broker refused the produce request the record was in, because of
    /// what a record in it is (too large, invalid, a timestamp the topic does
    /// not accept): this one or another. Publishing it alone tells.
    Record,
    /// Refused before it was sent because of what the record itself is
    /// (larger than the producer's `message.max.bytes`): refused for good.
    Refused,
    /// Its topic does not exist (after librdkafka's propagation bound), to be
    /// checked against fresh metadata.
    MissingTopic,
    /// The relay may not write to its topic: refused for good.
    Unauthorised,
    /// Caught in another record's failure: the producer stopped (fatal error,
    /// purged queues). Published again at once.
    Collateral,
    /// Anything else (broker unreachable, not enough replicas, a timeout):
    /// retried with backoff, order kept.
    Transient,
}

impl Verdict {
    /// The verdict on an error reported for a record: `at_send` when
    /// `produce()` refused it, otherwise from its delivery report.
    fn of(code: Option<RDKafkaErrorCode>, at_send: bool) -> Verdict {
        use RDKafkaErrorCode as C;
        match code {
            Some(C::MessageSizeTooLarge | C::InvalidMessageSize) if at_send => Verdict::Refused,
            Some(C::UnknownTopic | C::UnknownTopicOrPartition) => Verdict::MissingTopic,
            Some(C::TopicAuthorizationFailed) => Verdict::Unauthorised,
            Some(
                C::MessageSizeTooLarge
                | C::MessageBatchTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::InvalidTimestamp
                | C::UnsupportedForMessageFormat
                | C::BadMessage,
            ) if !at_send => Verdict::Record,
            Some(C::Fatal | C::PurgeQueue | C::PurgeInflight | C::GaplessGuarantee) if !at_send => Verdict::Collateral,
            _ => Verdict::Transient,
        }
    }
}

/// One row's failed attempt.
#[derive(Debug, Clone)]
struct Failure {
    verdict: Verdict,
    error: String,
}

impl Failure {
    fn new(e: &KafkaError, at_send: bool) -> Self {
        Failure { verdict: Verdict::of(e.rdkafka_error_code(), at_send), error: e.to_string() }
    }
}

/// A row's result in a publish attempt.
#[derive(Debug, Clone)]
enum Sent {
    /// Not sent: an earlier row of its key failed at send time.
    Skipped,
    /// Acknowledged at this time.
    Acked(chrono::DateTime<Utc>),
    Failed(Failure),
}

/// Where each row of a batch ended, once every failure is resolved.
#[derive(Debug, Default)]
struct Resolution {
    /// Acknowledged.
    acked: Vec<(usize, chrono::DateTime<Utc>)>,
    /// Refused for good, with the reason.
    set_aside: Vec<(usize, String)>,
    /// Failed transiently: stay pending, retried after a backoff.
    transient: Vec<(usize, String)>,
    /// Rows that failed only because the producer stopped, with no row found
    /// that explains it: retried after a backoff, so that a producer that
    /// keeps failing does not spin.
    unexplained: bool,
    /// Topics looked up in fresh metadata during this batch: missing or not.
    missing_topics: HashMap<String, bool>,
}

/// The size of a record on the wire, near enough for an error message.
fn record_bytes(row: &OutboxRow) -> usize {
    row.key.as_ref().map_or(0, Vec::len)
        + row.payload.as_ref().map_or(0, Vec::len)
        + row.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum::<usize>()
}

/// The reason a row is set aside, for `last_error` and operators.
fn set_aside_reason(row: &OutboxRow, f: &Failure) -> String {
    let hint = match f.verdict {
        Verdict::Refused => format!(
            "the record ({} bytes with key and headers) is larger than the producer's `message.max.bytes`",
            record_bytes(row)
        ),
        Verdict::MissingTopic => format!("topic `{}` does not exist", row.topic),
        Verdict::Unauthorised => format!("the relay is not authorised to write to topic `{}`", row.topic),
        _ if f.error.contains("size") || f.error.contains("too large") => format!(
            "the record ({} bytes with key and headers) is larger than topic `{}` accepts \
             (its `max.message.bytes`, or the broker's `message.max.bytes`)",
            record_bytes(row),
            row.topic
        ),
        _ => format!("topic `{}` refuses the record", row.topic),
    };
    format!("refused by the broker for good, alone: {}: {hint}", f.error)
}

impl Relay {
    /// Runs until `shutdown` is cancelled. Database and broker failures are
    /// retried with backoff, never returned; an error means the relay could
    /// not start (its configuration).
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Relay { pool, s, producer } = self;
        // A wrong password or an untrusted certificate: an error naming the
        // cause now, not batches waiting forever on librdkafka's retries.
        s.connection.check_at_start().await?;
        let wake = Arc::new(Notify::new());
        let stop_helpers = CancellationToken::new();
        let listener = s.listen.then(|| {
            tokio::spawn(listen(pool.clone(), wake.clone(), stop_helpers.clone(), s.name.clone(), s.max_backoff))
        });
        let (mark_tx, mark_rx) = mpsc::channel::<Vec<i64>>(4);
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Vec<i64>>();
        let marker = tokio::spawn(marker(pool.clone(), mark_rx, done_tx, stop_helpers.clone(), s.max_backoff));
        let mut pump = Pump {
            pool,
            s: s.clone(),
            producer,
            lock: None,
            owned: Vec::new(),
            inflight: HashSet::new(),
            mark_tx: Some(mark_tx),
            done_rx,
            wake,
            backoff: retries(s.max_backoff),
            last_failure: None,
            stale_metadata: false,
        };
        let result = pump.run(&shutdown).await;

        // Let the marker finish what was acknowledged, so that a clean stop
        // does not publish those rows again, then give the lanes back.
        drop(pump.mark_tx.take());
        let mut marker = marker;
        if tokio::time::timeout(Duration::from_secs(10), &mut marker).await.is_err() {
            tracing::warn!(relay = %s.name, "Stopped before every published row was marked; those rows will be published again.");
            stop_helpers.cancel();
            let _ = marker.await;
        }
        stop_helpers.cancel();
        if let Some(l) = listener {
            let _ = l.await;
        }
        if let Some(lock) = pump.lock.take() {
            let _ = lock.conn.close().await;
        }
        events::LanesChanged { relay: &s.name, owned: &[], acquired: &[], released: &pump.owned, relays: 0 }.emit();
        result
    }
}

/// `LISTEN`s on [`CHANNEL`] and wakes the pump on every notification, and
/// after a reconnection (notifications sent meanwhile are lost).
async fn listen(pool: PgPool, wake: Arc<Notify>, stop: CancellationToken, relay: String, max_backoff: Duration) {
    let mut backoff = retries(max_backoff);
    loop {
        let attempt = async {
            let mut l = PgListener::connect_with(&pool).await?;
            l.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = tokio::select! {
            _ = stop.cancelled() => return,
            r = attempt => match r {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(relay = %relay, error = %e, "Cannot LISTEN for outbox notifications; polling meanwhile.");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => continue,
                    }
                }
            },
        };
        backoff.reset();
        wake.notify_one();
        loop {
            let r = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.try_recv() => r,
            };
            match r {
                Ok(_) => wake.notify_one(),
                Err(e) => {
                    tracing::warn!(relay = %relay, error = %e, "Lost the LISTEN session; reconnecting.");
                    break;
                }
            }
        }
    }
}

/// Marks acknowledged rows published, in the background, and reports them back.
async fn marker(
    pool: PgPool,
    mut rx: mpsc::Receiver<Vec<i64>>,
    done: mpsc::UnboundedSender<Vec<i64>>,
    stop: CancellationToken,
    max_backoff: Duration,
) {
    while let Some(ids) = rx.recv().await {
        let mut backoff = retries(max_backoff);
        loop {
            match store::mark_published(&pool, &ids).await {
                Ok(_) => break,
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(rows = ids.len(), error = %e, retry_in = ?wait, "Could not mark outbox rows published; retrying.");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        if done.send(ids).is_err() {
            return;
        }
    }
}

struct Pump {
    pool: PgPool,
    s: Arc<Settings>,
    producer: FutureProducer,
    lock: Option<LockSession>,
    owned: Vec<i32>,
    /// Acknowledged rows whose mark has not committed yet: the claim skips them.
    inflight: HashSet<i64>,
    mark_tx: Option<mpsc::Sender<Vec<i64>>>,
    done_rx: mpsc::UnboundedReceiver<Vec<i64>>,
    wake: Arc<Notify>,
    backoff: Retries,
    /// The last failed attempt of a row, for the log.
    last_failure: Option<Failure>,
    /// librdkafka believes a topic missing that exists: replace the producer.
    stale_metadata: bool,
}

impl Pump {
    async fn run(&mut self, shutdown: &CancellationToken) -> Result<()> {
        let mut next_check = Instant::now();
        let mut next_retention = Instant::now();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            // Before the claim: a mark reported done here committed before
            // the claim's snapshot, so the claim sees the row as published.
            self.drain_done();
            let now = Instant::now();
            if now >= next_check {
                self.check_lanes().await;
                next_check = now + self.s.lane_check_interval;
            }
            if now >= next_retention {
                self.retention(shutdown).await;
                next_retention = now + self.s.retention_interval;
            }
            let Some(pid) = self.lock.as_ref().map(|l| l.pid) else {
                self.idle(shutdown, next_check).await;
                continue;
            };
            if self.owned.is_empty() {
                self.idle(shutdown, next_check.min(next_retention)).await;
                continue;
            }
            let limit = (self.s.batch_size + self.inflight.len()) as i64;
            let rows = match store::claim(&self.pool, LANE_LOCK_NS, pid, limit).await {
                Ok(rows) => rows,
                Err(e) => {
                    let wait = self.backoff.next_delay();
                    events::retry_wait(&self.s.name);
                    tracing::warn!(relay = %self.s.name, error = %e, retry_in = ?wait, "Could not claim outbox rows; retrying.");
                    if sleep_or_cancel(shutdown, wait).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            let rows: Vec<OutboxRow> =
                rows.into_iter().filter(|r| !self.inflight.contains(&r.id)).take(self.s.batch_size).collect();
            if rows.is_empty() {
                self.idle(shutdown, next_check.min(next_retention)).await;
                continue;
            }
            match self.publish(rows, shutdown).await? {
                BatchOutcome::Cancelled => return Ok(()),
                BatchOutcome::Done { wait: false } => self.backoff.reset(),
                BatchOutcome::Done { wait: true } => {
                    // The wait was announced by PublishFailed.
                    let wait = self.backoff.next_delay();
                    events::retry_wait(&self.s.name);
                    if sleep_or_cancel(shutdown, wait).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Waits for a notification, the poll interval, `until`, or shutdown.
    async fn idle(&mut self, shutdown: &CancellationToken, until: Instant) {
        let poll = Instant::now() + self.s.poll_interval;
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep_until(poll.min(until)) => {}
        }
    }

    fn drain_done(&mut self) {
        while let Ok(ids) = self.done_rx.try_recv() {
            for id in ids {
                self.inflight.remove(&id);
            }
        }
    }

    /// Waits (bounded) until every acknowledged row is marked.
    async fn flush_marks(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.inflight.is_empty() {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some(ids)) => {
                    for id in ids {
                        self.inflight.remove(&id);
                    }
                }
                _ => return,
            }
        }
    }

    /// Checks the lock session (reconnecting it if needed), takes free lanes
    /// up to the fair share and gives back lanes above it; updates the gauges.
    async fn check_lanes(&mut self) {
        match store::pending_count(&self.pool).await {
            Ok((n, failed)) => events::pending(n, failed),
            Err(e) => tracing::debug!(error = %e, "Could not count pending outbox rows."),
        }
        if self.lock.is_none() {
            match self.connect_lock().await {
                Ok(l) => self.lock = Some(l),
                Err(e) => {
                    events::LanesLost { relay: &self.s.name, error: &e.to_string() }.emit();
                    self.owned.clear();
                    return;
                }
            }
        }
        let Some(mut lock) = self.lock.take() else { return };
        match self.rebalance(&mut lock).await {
            Ok(()) => self.lock = Some(lock),
            Err(e) => {
                // Closing the socket ends the session and frees every lane at
                // once; the next check opens a new session.
                events::LanesLost { relay: &self.s.name, error: &e.to_string() }.emit();
                self.owned.clear();
                drop(lock);
            }
        }
    }

    async fn connect_lock(&self) -> Result<LockSession> {
        let app = format!("oncely-relay {}", self.s.name);
        let opts: PgConnectOptions = (*self.pool.connect_options()).clone().application_name(&app);
        let mut conn = PgConnection::connect_with(&opts).await?;
        let pid = store::backend_pid(&mut conn).await?;
        store::try_lock(&mut conn, PRESENCE_LOCK_NS, pid).await?;
        Ok(LockSession { conn, pid })
    }

    async fn rebalance(&mut self, lock: &mut LockSession) -> Result<()> {
        let mut held = store::held_locks(&mut lock.conn, LANE_LOCK_NS).await?;
        let relays = store::lock_holders(&mut lock.conn, PRESENCE_LOCK_NS).await?.max(1);
        let lanes = i64::from(LANES);
        let share = ((lanes + relays - 1) / relays) as usize;
        let (mut acquired, mut released) = (Vec::new(), Vec::new());
        if held.len() > share {
            // Give lanes back only when nothing of them is waiting for its
            // mark, so the next owner does not publish those rows again.
            self.flush_marks().await;
            while held.len() > share {
                let Some(lane) = held.pop() else { break };
                store::unlock(&mut lock.conn, LANE_LOCK_NS, lane).await?;
                released.push(lane);
            }
        } else if held.len() < share {
            // Start at a point that differs between relays, so that two
            // relays do not race for the same lanes.
            let start = lock.pid.rem_euclid(i32::from(LANES));
            for i in 0..i32::from(LANES) {
                if held.len() >= share {
                    break;
                }
                let lane = (start + i) % i32::from(LANES);
                if held.contains(&lane) {
                    continue;
                }
                if store::try_lock(&mut lock.conn, LANE_LOCK_NS, lane).await? {
                    held.push(lane);
                    acquired.push(lane);
                }
            }
            held.sort_unstable();
        }
        self.owned = held;
        events::LanesChanged {
            relay: &self.s.name,
            owned: &self.owned,
            acquired: &acquired,
            released: &released,
            relays,
        }
        .emit();
        Ok(())
    }

    async fn retention(&mut self, shutdown: &CancellationToken) {
        let Some(keep) = self.s.retention else { return };
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        let mut deleted = 0u64;
        loop {
            match store::delete_published(&self.pool, keep_ms, self.s.retention_batch).await {
                Ok(n) => {
                    deleted += n;
                    if (n as i64) < self.s.retention_batch || shutdown.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(relay = %self.s.name, error = %e, "Outbox retention failed; trying again later.");
                    break;
                }
            }
        }
        events::RetentionRan { relay: &self.s.name, deleted }.emit();
    }

    /// Publishes `rows` (in id order), waits for every delivery report, and
    /// resolves every failure: rows the broker refuses for good are set
    /// aside (committed before this returns, so the next claim holds their
    /// keys), the others stay pending.
    async fn publish(&mut self, rows: Vec<OutboxRow>, shutdown: &CancellationToken) -> Result<BatchOutcome> {
        let all: Vec<usize> = (0..rows.len()).collect();
        let Some(sent) = self.send_group(&rows, &all, shutdown).await? else { return Ok(BatchOutcome::Cancelled) };
        let mut res = Resolution::default();
        let mut blocked: HashSet<(&str, Option<&[u8]>)> = HashSet::new();
        let mut again = Vec::new();
        let alone = rows.len() == 1;
        for (&i, r) in all.iter().zip(sent) {
            self.sort(&rows, i, r, &mut res, &mut blocked, &mut again, alone).await;
        }
        if !again.is_empty() {
            let error = self.last_failure.as_ref().map(|f| f.error.clone()).unwrap_or_default();
            events::Isolating { relay: &self.s.name, rows: again.len(), error: &error }.emit();
            if !self.isolate(&rows, again, &mut res, &mut blocked, shutdown).await? {
                return Ok(BatchOutcome::Cancelled);
            }
        }
        self.restart_if_fatal()?;

        if !res.acked.is_empty() {
            let latencies: Vec<Duration> =
                res.acked.iter().map(|(i, at)| (*at - rows[*i].created_at).to_std().unwrap_or_default()).collect();
            let mut acked: Vec<i64> = res.acked.iter().map(|(i, _)| rows[*i].id).collect();
            acked.sort_unstable();
            events::BatchAcked { relay: &self.s.name, rows: acked.len(), latencies: &latencies }.emit();
            self.inflight.extend(acked.iter().copied());
            let Some(tx) = &self.mark_tx else {
                return Err(Error::Config("the outbox marker task stopped".into()));
            };
            // The marker may be stuck retrying (database down): shutdown
            // must not wait for it; unmarked rows are published again later.
            tokio::select! {
                r = tx.send(acked) => if r.is_err() {
                    return Err(Error::Config("the outbox marker task stopped".into()));
                },
                _ = shutdown.cancelled() => return Ok(BatchOutcome::Cancelled),
            }
        }
        if !res.set_aside.is_empty() && !self.set_aside(&rows, &res.set_aside, shutdown).await {
            return Ok(BatchOutcome::Cancelled);
        }
        let wait = !res.transient.is_empty() || res.unexplained;
        if let Some((first, error)) = res.transient.first() {
            // Record the attempt on the rows before announcing it: whoever
            // reads the failure counter then finds the rows' attempts too.
            // A database that is down too must not hold a shutdown here (the
            // pool waits up to its acquire timeout): the attempt is then not
            // recorded, which costs only its count.
            let ids: Vec<i64> = res.transient.iter().map(|(i, _)| rows[*i].id).collect();
            tokio::select! {
                r = store::record_failure(&self.pool, &ids, error) => if let Err(e) = r {
                    tracing::debug!(error = %e, "Could not record the failed attempt.");
                },
                _ = shutdown.cancelled() => return Ok(BatchOutcome::Cancelled),
            }
            let retry_in = self.backoff.peek();
            events::PublishFailed {
                relay: &self.s.name,
                rows: res.transient.len(),
                first_id: rows[*first].id,
                topic: &rows[*first].topic,
                error,
                retry_in,
            }
            .emit();
        } else if res.unexplained {
            tracing::warn!(relay = %self.s.name, "The producer failed and no outbox row explains it; retrying after a backoff.");
        }
        Ok(BatchOutcome::Done { wait })
    }

    /// Files row `i`'s result: acked, set aside, transient (key blocked), or
    /// `again` (to publish again, in smaller groups). `alone`: the row was
    /// the only one of its attempt, so a record-level refusal is its own.
    #[allow(clippy::too_many_arguments)]
    async fn sort<'r>(
        &mut self,
        rows: &'r [OutboxRow],
        i: usize,
        r: Sent,
        res: &mut Resolution,
        blocked: &mut HashSet<(&'r str, Option<&'r [u8]>)>,
        again: &mut Vec<usize>,
        alone: bool,
    ) {
        let row = &rows[i];
        let key = (row.topic.as_str(), row.key.as_deref());
        let f = match r {
            Sent::Skipped => {
                // Behind a row of its key that failed at send time: pending.
                blocked.insert(key);
                return;
            }
            Sent::Acked(at) => {
                res.acked.push((i, at));
                return;
            }
            Sent::Failed(f) => f,
        };
        self.last_failure = Some(f.clone());
        if blocked.contains(&key) {
            // An earlier row of its key is set aside or failed: this one
            // waits behind it, whatever its own error.
            return;
        }
        match f.verdict {
            Verdict::Refused | Verdict::Unauthorised => {
                blocked.insert(key);
                res.set_aside.push((i, set_aside_reason(row, &f)));
            }
            Verdict::MissingTopic => {
                blocked.insert(key);
                let missing = match res.missing_topics.get(&row.topic) {
                    Some(m) => *m,
                    None => {
                        let m = self.topic_missing(&row.topic).await;
                        res.missing_topics.insert(row.topic.clone(), m);
                        m
                    }
                };
                if missing {
                    res.set_aside.push((i, set_aside_reason(row, &f)));
                } else {
                    // librdkafka still believes the topic missing, but it
                    // exists now (created meanwhile): a new producer has
                    // fresh metadata.
                    self.stale_metadata = true;
                    res.transient.push((i, f.error));
                }
            }
            Verdict::Record if alone => {
                blocked.insert(key);
                res.set_aside.push((i, set_aside_reason(row, &f)));
            }
            Verdict::Collateral if alone => {
                blocked.insert(key);
                res.unexplained = true;
                res.transient.push((i, f.error));
            }
            Verdict::Record | Verdict::Collateral => again.push(i),
            Verdict::Transient => {
                blocked.insert(key);
                res.transient.push((i, f.error));
            }
        }
    }

    /// Publishes the rows `again` (failed with a record-level refusal or
    /// caught in the producer's stop) once more, in halves and then alone,
    /// in id order and depth first, so that no row is published before an
    /// unresolved earlier row of its key. Each attempt runs on a working
    /// producer (a new one after a fatal error). False if shut down.
    async fn isolate<'r>(
        &mut self,
        rows: &'r [OutboxRow],
        again: Vec<usize>,
        res: &mut Resolution,
        blocked: &mut HashSet<(&'r str, Option<&'r [u8]>)>,
        shutdown: &CancellationToken,
    ) -> Result<bool> {
        let mut stack = vec![again];
        while let Some(group) = stack.pop() {
            let group: Vec<usize> = group
                .into_iter()
                .filter(|&i| !blocked.contains(&(rows[i].topic.as_str(), rows[i].key.as_deref())))
                .collect();
            if group.is_empty() {
                continue;
            }
            self.restart_if_fatal()?;
            let Some(sent) = self.send_group(rows, &group, shutdown).await? else { return Ok(false) };
            let alone = group.len() == 1;
            let mut retry = Vec::new();
            for (&i, r) in group.iter().zip(sent) {
                self.sort(rows, i, r, res, blocked, &mut retry, alone).await;
            }
            match retry.len() {
                0 => {}
                1 => stack.push(retry),
                n => {
                    // Second half below the first: the first is resolved
                    // before anything of the second is sent.
                    let second = retry.split_off(n / 2);
                    stack.push(second);
                    stack.push(retry);
                }
            }
        }
        Ok(true)
    }

    /// Whether `topic` is missing according to fresh metadata (librdkafka
    /// caches a topic it found missing). A failed lookup counts as not
    /// missing: the row stays pending and is retried.
    async fn topic_missing(&self, topic: &str) -> bool {
        let producer = self.producer.clone();
        let t = topic.to_owned();
        let lookup = tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(Some(&t), Duration::from_secs(10)).map(|m| {
                m.topics().iter().any(|mt| {
                    mt.name() == t
                        && matches!(
                            mt.error().map(RDKafkaErrorCode::from),
                            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
                        )
                })
            })
        })
        .await;
        match lookup {
            Ok(Ok(missing)) => missing,
            Ok(Err(e)) => {
                tracing::warn!(relay = %self.s.name, topic, error = %e, "Could not check whether the topic exists.");
                false
            }
            Err(_) => false,
        }
    }

    /// Replaces the producer after a fatal error (with the gapless guarantee,
    /// any failure that could leave a gap stops it) or stale metadata; the
    /// new one starts from the first unpublished row.
    fn restart_if_fatal(&mut self) -> Result<()> {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::info!(relay = %self.s.name, code = ?code, reason = %reason, "The producer stopped on a fatal error; starting a new one.");
            self.producer = make_producer(&self.s)?;
        } else if self.stale_metadata {
            tracing::info!(relay = %self.s.name, "Starting a new producer: the old one believes an existing topic missing.");
            self.producer = make_producer(&self.s)?;
        }
        self.stale_metadata = false;
        Ok(())
    }

    /// Sets rows aside, retrying the write until it commits (the next claim
    /// must see it, or it would publish the rows held behind them). False if
    /// shut down first.
    async fn set_aside(&mut self, rows: &[OutboxRow], which: &[(usize, String)], shutdown: &CancellationToken) -> bool {
        let ids: Vec<i64> = which.iter().map(|(i, _)| rows[*i].id).collect();
        let reasons: Vec<&str> = which.iter().map(|(_, r)| r.as_str()).collect();
        let mut backoff = retries(self.s.max_backoff);
        loop {
            match store::set_aside(&self.pool, &ids, &reasons).await {
                Ok(_) => break,
                Err(e) => {
                    let wait = backoff.next_delay();
                    events::retry_wait(&self.s.name);
                    tracing::warn!(relay = %self.s.name, rows = ids.len(), error = %e, retry_in = ?wait, "Could not set outbox rows aside; retrying.");
                    if sleep_or_cancel(shutdown, wait).await {
                        return false;
                    }
                }
            }
        }
        for (i, reason) in which {
            let row = &rows[*i];
            events::RowSetAside {
                relay: &self.s.name,
                id: row.id,
                topic: &row.topic,
                key: row.key.as_deref(),
                error: reason,
            }
            .emit();
        }
        true
    }

    /// Sends rows `idx` (in id order) and waits for every delivery report.
    /// `None` if shut down meanwhile. A row refused at send time stops its
    /// key for the rest of the group (the rows behind it are `Skipped`).
    async fn send_group(
        &mut self,
        rows: &[OutboxRow],
        idx: &[usize],
        shutdown: &CancellationToken,
    ) -> Result<Option<Vec<Sent>>> {
        let mut results: Vec<Option<Sent>> = vec![None; idx.len()];
        let mut futures: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(idx.len());
        let mut awaited = 0usize;
        let mut blocked: HashSet<(&str, Option<&[u8]>)> = HashSet::new();
        // One `send` span per row, open until the group's deliveries are in.
        let mut spans = Vec::with_capacity(idx.len());
        for (slot, &i) in idx.iter().enumerate() {
            let row = &rows[i];
            let span = tracing::info_span!(
                "send",
                "otel.name" = %format_args!("send {}", row.topic),
                "otel.kind" = "producer",
                "messaging.system" = "kafka",
                "messaging.operation.type" = "send",
                "messaging.operation.name" = "send",
                "messaging.destination.name" = %row.topic,
                "messaging.message.id" = row
                    .headers
                    .iter()
                    .find(|(k, _)| k == crate::envelope::H_ID.as_bytes())
                    .and_then(|(_, v)| v.as_deref())
                    .map(String::from_utf8_lossy)
                    .as_deref()
                    .unwrap_or_default(),
                "messaging.kafka.message.key" = %crate::telemetry::key_attr(row.key.as_deref()),
                outbox_id = row.id,
            );
            crate::telemetry::set_parent(&span, row.headers.iter().map(|(k, v)| (k.as_slice(), v.as_deref())));
            spans.push(span);
            let key = (row.topic.as_str(), row.key.as_deref());
            if blocked.contains(&key) {
                results[slot] = Some(Sent::Skipped);
                continue;
            }
            let headers = match headers_with_nulls(&row.headers) {
                Ok(h) => h,
                Err(e) => {
                    results[slot] = Some(Sent::Failed(Failure { verdict: Verdict::Transient, error: e.to_string() }));
                    blocked.insert(key);
                    continue;
                }
            };
            let mut rec: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&row.topic).headers(headers).timestamp(row.created_at.timestamp_millis());
            if let Some(k) = &row.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(p) = &row.payload {
                rec = rec.payload(p.as_slice());
            }
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        futures.push((slot, f));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The producer's queue is full: wait for the oldest
                        // outstanding record, then try again.
                        rec = back;
                        if awaited < futures.len() {
                            let (j, f) = &mut futures[awaited];
                            let r = tokio::select! {
                                _ = shutdown.cancelled() => return Ok(None),
                                r = f => r,
                            };
                            results[*j] = Some(delivery(r));
                            awaited += 1;
                        } else {
                            tokio::task::yield_now().await;
                        }
                    }
                    Err((e, _)) => {
                        // Refused before it was sent (too large for the
                        // producer, topic known missing, ...): later rows of
                        // the key must wait.
                        results[slot] = Some(Sent::Failed(Failure::new(&e, true)));
                        blocked.insert(key);
                        break;
                    }
                }
            }
        }
        {
            let outstanding = futures.len() - awaited;
            let wait_all = async {
                for (j, f) in futures.iter_mut().skip(awaited) {
                    results[*j] = Some(delivery(f.await));
                }
            };
            tokio::pin!(wait_all);
            let started = Instant::now();
            let mut nag = tokio::time::interval_at(started + Duration::from_secs(10), Duration::from_secs(10));
            loop {
                tokio::select! {
                    _ = &mut wait_all => break,
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = nag.tick() => tracing::warn!(
                        relay = %self.s.name,
                        records = outstanding,
                        waited = ?started.elapsed(),
                        "Still waiting for the broker to acknowledge outbox records (is it reachable?)."
                    ),
                }
            }
        }
        Ok(Some(results.into_iter().map(|r| r.unwrap_or(Sent::Skipped)).collect()))
    }
}

fn delivery<E>(r: std::result::Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>) -> Sent {
    match r {
        Ok(Ok(_)) => Sent::Acked(Utc::now()),
        Ok(Err((e, _))) => Sent::Failed(Failure::new(&e, false)),
        Err(_) => Sent::Failed(Failure {
            verdict: Verdict::Transient,
            error: "the producer was closed before the delivery report".into(),
        }),
    }
}

/// Sleeps `d`; true if `shutdown` was cancelled meanwhile.
async fn sleep_or_cancel(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_for_good_are_told_from_transient_failures() {
        use RDKafkaErrorCode as C;
        // A whole produce request refused: maybe another record's fault.
        assert_eq!(Verdict::of(Some(C::MessageSizeTooLarge), false), Verdict::Record);
        assert_eq!(Verdict::of(Some(C::InvalidRecord), false), Verdict::Record);
        assert_eq!(Verdict::of(Some(C::MessageBatchTooLarge), false), Verdict::Record);
        assert_eq!(Verdict::of(Some(C::InvalidTimestamp), false), Verdict::Record);
        // Refused by produce() itself: this record's own size.
        assert_eq!(Verdict::of(Some(C::MessageSizeTooLarge), true), Verdict::Refused);
        assert_eq!(Verdict::of(Some(C::UnknownTopic), true), Verdict::MissingTopic);
        assert_eq!(Verdict::of(Some(C::UnknownTopicOrPartition), false), Verdict::MissingTopic);
        assert_eq!(Verdict::of(Some(C::TopicAuthorizationFailed), false), Verdict::Unauthorised);
        // The producer stopped for another record.
        assert_eq!(Verdict::of(Some(C::Fatal), false), Verdict::Collateral);
        assert_eq!(Verdict::of(Some(C::PurgeQueue), false), Verdict::Collateral);
        // Broker trouble: retried with backoff, order kept.
        for c in [C::MessageTimedOut, C::AllBrokersDown, C::NotEnoughReplicas, C::RequestTimedOut, C::QueueFull] {
            assert_eq!(Verdict::of(Some(c), false), Verdict::Transient, "{c:?}");
        }
        assert_eq!(Verdict::of(Some(C::Fatal), true), Verdict::Transient);
        assert_eq!(Verdict::of(None, false), Verdict::Transient);
    }

    #[tokio::test]
    async fn guarantee_settings_cannot_be_overridden() {
        let mut s = Relay::builder(
            sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://x@127.0.0.1/x").expect("lazy pool"),
            "127.0.0.1:1",
        )
        .s;
        s.producer_config.push(("acks".into(), "1".into()));
        let Err(err) = make_producer(&s) else { panic!("acks is the relay's own setting") };
        assert!(err.to_string().contains("acks"), "{err}");
    }
}
