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
//! - **Failures.** A batch that did not fully publish is retried from its
//!   first unpublished row with exponential backoff (with jitter, up to
//!   `max_backoff`). By default records never time out in the producer
//!   (`message.timeout.ms=0`): while the broker is down the batch waits and
//!   librdkafka reconnects with its own backoff; a timeout could let a later
//!   record overtake an earlier one of the same key. Database errors are
//!   retried the same way.
//! - **Retention.** Rows published longer ago than `retention` are deleted in
//!   batches every `retention_interval`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use sqlx::postgres::{PgConnectOptions, PgListener};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::events;
use super::LANES;
use crate::envelope::owned_headers;
use crate::error::{Error, Result};
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
    bootstrap_servers: String,
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
    pub fn builder(pool: PgPool, bootstrap_servers: impl Into<String>) -> RelayBuilder {
        RelayBuilder {
            pool,
            s: Settings {
                bootstrap_servers: bootstrap_servers.into(),
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

    /// Longest wait between retries of a failing publish or database call.
    /// Default 30 s.
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
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.bootstrap_servers)
        .set("client.id", format!("oncely-relay-{}", s.name))
        .set("linger.ms", s.linger.as_millis().to_string())
        .set("message.timeout.ms", s.message_timeout.as_millis().to_string());
    for (k, v) in &s.producer_config {
        match k.as_str() {
            "enable.idempotence" | "acks" | "request.required.acks" | "enable.gapless.guarantee" => {
                return Err(Error::Config(format!(
                    "the outbox relay sets `{k}` itself: its ordering and no-duplicate guarantees depend on it"
                )))
            }
            _ => {
                c.set(k, v);
            }
        }
    }
    c.set("enable.idempotence", "true").set("acks", "all").set("enable.gapless.guarantee", "true");
    Ok(c.create()?)
}

/// Exponential backoff with jitter: base·2ⁿ capped at `max`, then a random
/// point in its upper half.
#[derive(Debug, Clone)]
struct Backoff {
    n: u32,
    base: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff { n: 0, base: Duration::from_millis(100), max }
    }

    fn next(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.n.min(20));
        self.n = self.n.saturating_add(1);
        let d = exp.min(self.max);
        let half = d / 2;
        half + half.mul_f64(fastrand::f64())
    }

    fn reset(&mut self) {
        self.n = 0;
    }
}

/// The session that holds the relay's locks.
struct LockSession {
    conn: PgConnection,
    pid: i32,
}

enum BatchOutcome {
    Done { failed: usize },
    Cancelled,
}

impl Relay {
    /// Runs until `shutdown` is cancelled. Database and broker failures are
    /// retried with backoff, never returned; an error means the relay could
    /// not start (its configuration).
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let Relay { pool, s, producer } = self;
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
            backoff: Backoff::new(s.max_backoff),
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
    let mut backoff = Backoff::new(max_backoff);
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
                        _ = tokio::time::sleep(backoff.next()) => continue,
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
        let mut backoff = Backoff::new(max_backoff);
        loop {
            match store::mark_published(&pool, &ids).await {
                Ok(_) => break,
                Err(e) => {
                    let wait = backoff.next();
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
    backoff: Backoff,
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
                    let wait = self.backoff.next();
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
                BatchOutcome::Done { failed: 0 } => self.backoff.reset(),
                BatchOutcome::Done { .. } => {
                    // The wait was announced by PublishFailed.
                    let wait = self.backoff.next();
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
            Ok(n) => events::pending(n),
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

    /// Publishes `rows` (in id order) and waits for every delivery report.
    async fn publish(&mut self, rows: Vec<OutboxRow>, shutdown: &CancellationToken) -> Result<BatchOutcome> {
        // Per row: None = not attempted (held back behind a failed row of
        // its key), Some(Ok(ack time)), Some(Err(message)).
        let mut results: Vec<Option<std::result::Result<chrono::DateTime<Utc>, String>>> = vec![None; rows.len()];
        let mut futures: Vec<(usize, DeliveryFuture)> = Vec::with_capacity(rows.len());
        let mut awaited = 0usize;
        let mut blocked: HashSet<(&str, Option<&[u8]>)> = HashSet::new();
        for (i, row) in rows.iter().enumerate() {
            let key = (row.topic.as_str(), row.key.as_deref());
            if blocked.contains(&key) {
                continue;
            }
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&row.topic)
                .headers(owned_headers(&row.headers))
                .timestamp(row.created_at.timestamp_millis());
            if let Some(k) = &row.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(p) = &row.payload {
                rec = rec.payload(p.as_slice());
            }
            loop {
                match self.producer.send_result(rec) {
                    Ok(f) => {
                        futures.push((i, f));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The producer's queue is full: wait for the oldest
                        // outstanding record, then try again.
                        rec = back;
                        if awaited < futures.len() {
                            let (j, f) = &mut futures[awaited];
                            let r = tokio::select! {
                                _ = shutdown.cancelled() => return Ok(BatchOutcome::Cancelled),
                                r = f => r,
                            };
                            results[*j] = Some(delivery(r));
                            awaited += 1;
                        } else {
                            tokio::task::yield_now().await;
                        }
                    }
                    Err((e, _)) => {
                        // Refused before it was sent (too large, unknown
                        // partition, ...): later rows of the key must wait.
                        results[i] = Some(Err(e.to_string()));
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
                    _ = shutdown.cancelled() => return Ok(BatchOutcome::Cancelled),
                    _ = nag.tick() => tracing::warn!(
                        relay = %self.s.name,
                        records = outstanding,
                        waited = ?started.elapsed(),
                        "Still waiting for the broker to acknowledge outbox records (is it reachable?)."
                    ),
                }
            }
        }

        let mut acked = Vec::with_capacity(rows.len());
        let mut latencies = Vec::with_capacity(rows.len());
        let mut failed: Vec<(usize, String)> = Vec::new();
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Some(Ok(at)) => {
                    acked.push(rows[i].id);
                    latencies.push((at - rows[i].created_at).to_std().unwrap_or_default());
                }
                Some(Err(e)) => failed.push((i, e)),
                None => {}
            }
        }
        if !acked.is_empty() {
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
        if let Some((first, error)) = failed.first() {
            let wait = self.backoff.clone().next();
            events::PublishFailed {
                relay: &self.s.name,
                rows: failed.len(),
                first_id: rows[*first].id,
                topic: &rows[*first].topic,
                error,
                retry_in: wait,
            }
            .emit();
            let ids: Vec<i64> = failed.iter().map(|(i, _)| rows[*i].id).collect();
            if let Err(e) = store::record_failure(&self.pool, &ids, error).await {
                tracing::debug!(error = %e, "Could not record the failed attempt.");
            }
            if let Some((code, reason)) = self.producer.client().fatal_error() {
                // With the gapless guarantee a failure that could leave a gap
                // stops the producer; a new one starts from the first
                // unpublished row.
                tracing::warn!(relay = %self.s.name, code = ?code, reason = %reason, "The producer hit a fatal error; starting a new one.");
                self.producer = make_producer(&self.s)?;
            }
        }
        Ok(BatchOutcome::Done { failed: failed.len() })
    }
}

fn delivery<E>(
    r: std::result::Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
) -> std::result::Result<chrono::DateTime<Utc>, String> {
    match r {
        Ok(Ok(_)) => Ok(Utc::now()),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("the producer was closed before the delivery report".into()),
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
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let first = b.next();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100), "{first:?}");
        for _ in 0..20 {
            let d = b.next();
            assert!(d <= Duration::from_secs(2), "{d:?}");
        }
        let capped = b.next();
        assert!(capped >= Duration::from_secs(1), "{capped:?}");
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
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
