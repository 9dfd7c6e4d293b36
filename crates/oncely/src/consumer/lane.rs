//! A lane: the ordered processing of one assigned partition.
//!
//! A lane owns its partition's queue (split from the consumer's in the
//! rebalance callback), so backpressure is simply not reading it: librdkafka
//! stops fetching the partition when its queue holds `queued.max.messages.kbytes`.
//!
//! It starts by taking the partition over in `oncely.offsets` (a new owner
//! epoch, waiting for and if need be ending a previous owner's open batch),
//! decides where to start ([`super::rebalance::decide_start`]), seeks there, and then runs
//! batches (one transaction each) and, between batches, the retries of its
//! parked keys. What happens to each record is decided by
//! [`super::decide::Decider`]; this file does the I/O.

use std::any::Any;
use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::decide::{AfterFailure, Decider, Verdict};
use super::events::{self, count_events};
use super::handler::{Cx, Decoded, HandlerError, PanicError};
use super::{PartitionQueue, Shared, COMMIT_METADATA};
use crate::envelope::{DecodeError, EventId, RawRecord};
use crate::error::Result;
use crate::failure::DeadLetter;
use crate::store::failure::{self as parked_store, NewParked, ParkedStatus};
use crate::store::offsets::{self, Fence};
use crate::store::{self, inbox, Savepoint};

/// The rebalance callback's handle on a running lane.
pub(crate) struct LaneHandle {
    pub topic: String,
    pub partition: i32,
    pub stop: CancellationToken,
    pub join: JoinHandle<()>,
    /// The next offset to commit to Kafka (-1 before the lane knows it).
    pub position: Arc<AtomicI64>,
    /// Set when a record of this partition reached the consumer's main queue
    /// (its queue was not split in time): the lane seeks back to where it is,
    /// so that record is read again from the lane's own queue.
    pub reseek: Arc<AtomicBool>,
}

/// Where a lane's partition was assigned from, as the rebalance callback saw it.
#[derive(Debug, Clone)]
pub(crate) struct Assigned {
    /// Kafka's committed offset and its metadata (`None`: no commit, or it
    /// could not be read).
    pub kafka: Option<(i64, String)>,
    /// Where the fetcher was started (the lane seeks if it decides otherwise).
    pub fetch_from: Offset,
}

/// How often a projection rebuild that caught up with the live consumer
/// looks at the live position again.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// How often a lane with held keys looks for keys an operator released.
const HELD_KEY_CHECK: Duration = Duration::from_secs(2);

/// How long a lane waits on its queue before polling again. librdkafka wakes
/// a partition queue's reader only on the empty → non-empty edge, and rdkafka
/// has no fallback wake-up for partition queues: this bounds a lost wake-up.
const QUEUE_POLL: Duration = Duration::from_secs(1);

/// How long a lane waits for records before it looks whether its offsets
/// row changed under it ([`Lane::check_idle_position`]).
const IDLE_POSITION_CHECK: Duration = Duration::from_secs(2);

/// How often a lane reading a backlog copies its position to Kafka. The
/// database holds the position; Kafka's copy is for the group's tools and
/// lag, so it may trail: a commit per batch cost the broker more CPU than the
/// whole read (about 1.7 ms per 1,000 events in `bench consume`, for ~2,000
/// `OffsetCommit` requests a second). A lane commits after a batch unless it
/// did within this interval; the commit it owes then is paid when it falls
/// due, and a revoke or a stop commits every lane's position at once.
const KAFKA_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) fn spawn(
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    queue: Arc<PartitionQueue>,
    assigned: Assigned,
) -> LaneHandle {
    let stop = shared.shutdown.child_token();
    let position = Arc::new(AtomicI64::new(-1));
    let reseek = Arc::new(AtomicBool::new(false));
    let lane = Lane {
        shared: shared.clone(),
        topic: topic.as_str().into(),
        partition,
        queue,
        assigned,
        reseek: reseek.clone(),
        stop: stop.clone(),
        epoch: 0,
        db_next: None,
        committed_ts: None,
        next_read: None,
        pending: VecDeque::new(),
        pending_bytes: 0,
        infra_failures: 0,
        retry_at: None,
        position: position.clone(),
        parked: HashSet::new(),
        held: HashSet::new(),
        parked_check: None,
        idle_check_at: None,
        kafka_commit_at: None,
        kafka_commit_owed: false,
        replaying: AtomicBool::new(false),
    };
    let span = tracing::info_span!("lane", consumer = &*shared.name, topic = %topic, partition);
    let join = shared.rt.spawn(lane.run().instrument(span));
    LaneHandle { topic, partition, stop, join, position, reseek }
}

struct Lane {
    shared: Arc<Shared>,
    /// Shared with every record the lane reads ([`RawRecord::topic`]).
    topic: Arc<str>,
    partition: i32,
    queue: Arc<PartitionQueue>,
    assigned: Assigned,
    reseek: Arc<AtomicBool>,
    stop: CancellationToken,
    /// The owner epoch this lane took the partition over with.
    epoch: i64,
    /// The database offset the next batch must find (the fence).
    db_next: Option<i64>,
    /// When an idle lane looks at its offsets row next
    /// ([`IDLE_POSITION_CHECK`]).
    idle_check_at: Option<tokio::time::Instant>,
    /// When the lane may commit its position to Kafka again
    /// ([`KAFKA_COMMIT_INTERVAL`]).
    kafka_commit_at: Option<tokio::time::Instant>,
    /// A batch committed since the last Kafka commit: one is owed at
    /// `kafka_commit_at`.
    kafka_commit_owed: bool,
    /// The last claim found only duplicates (a replay): the next one probes
    /// the inbox before inserting ([`inbox::fence_and_claim`]).
    replaying: AtomicBool,
    /// The next offset expected from Kafka; records below it are leftovers.
    next_read: Option<i64>,
    /// Records received and not yet committed, in offset order.
    pending: VecDeque<Arc<RawRecord>>,
    /// Their size (key + payload + headers).
    pending_bytes: usize,
    /// Consecutive infrastructure failures (database down), for backoff.
    infra_failures: u32,
    retry_at: Option<Instant>,
    position: Arc<AtomicI64>,
    /// The timestamp (ms) of the newest record committed, for `oncely_lag_seconds`.
    committed_ts: Option<i64>,
    /// Keys with parked events in this partition.
    parked: HashSet<Vec<u8>>,
    /// Keys held (their head is a dead-lettered marker or held).
    held: HashSet<Vec<u8>>,
    /// When to look at the parked keys next.
    parked_check: Option<Instant>,
}

/// What became of a batch.
enum Outcome {
    /// The batch committed: the new database offset and the keys it parked
    /// and held.
    Committed { next: i64, parked: HashSet<Vec<u8>>, held: HashSet<Vec<u8>> },
    /// The fence failed: the row is not at `(epoch, db_next)` any more.
    Fenced,
    /// A handler failed without savepoints: run the batch again carefully.
    NeedCareful,
}

/// One record of a batch, prepared before the transaction: its identity and
/// version. The payload is decoded only for records that will be applied.
enum Prepared {
    Good { id: EventId, key: Uuid, version: Option<i64> },
    Bad { id: Option<EventId>, err: DecodeError },
}

impl Prepared {
    fn inbox_key(&self) -> Option<Uuid> {
        match self {
            Prepared::Good { key, .. } => Some(*key),
            Prepared::Bad { .. } => None,
        }
    }

    fn event_id(&self) -> Option<&EventId> {
        match self {
            Prepared::Good { id, .. } => Some(id),
            Prepared::Bad { id, .. } => id.as_ref(),
        }
    }
}

/// A record skipped without a handler call, logged and counted once its
/// batch commits: `(offset, identity, version, duplicate (else stale), key)`.
type Skipped<'a> = (i64, &'a EventId, Option<i64>, bool, &'a [u8]);

/// What applying one claimed event gave.
enum Applied {
    Done,
    Stale,
}

/// Writes of a batch that are sent together before the commit.
#[derive(Default)]
struct Tail<'a> {
    parks: Vec<NewParked<'a>>,
    unclaim: Vec<Uuid>,
}

impl Lane {
    async fn run(mut self) {
        let Some(owned) = self.take_over().await else { return };
        self.epoch = owned.epoch;
        if !self.start_at(owned.next_offset).await {
            return;
        }
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            if self.reseek.swap(false, Ordering::AcqRel) {
                let at = self.pending.front().map(|r| r.offset).or(self.next_read);
                if let Some(at) = at {
                    tracing::error!(offset = at, "A record of this partition reached the consumer's main queue; reading again from the lane's own queue.");
                    self.pending.clear();
                    self.pending_bytes = 0;
                    if !self.seek(at).await {
                        return;
                    }
                }
            }
            if let Some(spike) = &self.shared.spike {
                let left = spike.pause_left_at(Instant::now());
                if !left.is_zero() && !self.sleep(left).await {
                    return;
                }
            }
            if let Some(at) = self.retry_at.take() {
                let left = at.saturating_duration_since(Instant::now());
                if !left.is_zero() && !self.sleep(left).await {
                    return;
                }
            }
            if self.parked_check.is_some_and(|t| t <= Instant::now()) && !self.retry_parked().await {
                return;
            }
            if !self.fill().await {
                return;
            }
            if self.pending.is_empty() {
                continue;
            }
            if !self.run_batch().await {
                return;
            }
        }
    }

    /// Takes the partition over in the database, waiting for a previous
    /// owner's open batch; ends that owner's session if it holds the
    /// partition longer than `zombie_timeout` (Kafka has given the partition
    /// to this member: the other is a zombie, and its batch can only roll
    /// back). Retries while the database is down. `None`: the lane stopped.
    async fn take_over(&mut self) -> Option<offsets::Owned> {
        let s = self.shared.clone();
        let step = s.settings.zombie_timeout.min(Duration::from_secs(2)).max(Duration::from_millis(100));
        let mut waited = Duration::ZERO;
        let mut failures = 0u32;
        loop {
            if self.stop.is_cancelled() {
                return None;
            }
            match offsets::take_over(&s.pool, &s.name, &self.topic, self.partition, step).await {
                Ok(Some(owned)) => {
                    if waited > Duration::ZERO {
                        tracing::info!(waited = ?waited, "Took the partition over after waiting for a previous owner's batch.");
                    }
                    return Some(owned);
                }
                Ok(None) => {
                    waited += step;
                    match offsets::lock_holder(&s.pool, &s.name, &self.topic, self.partition).await {
                        Ok(Some(h)) if waited >= s.settings.zombie_timeout => {
                            let ended = offsets::terminate_backend(&s.pool, h.pid).await.unwrap_or(false);
                            events::ZombieSessionEnded {
                                consumer: &s.name,
                                topic: &self.topic,
                                partition: self.partition,
                                pid: h.pid,
                                state: h.state.as_deref().unwrap_or(""),
                                held_for: h.transaction_age,
                                ended,
                            }
                            .emit();
                            waited = Duration::ZERO;
                        }
                        Ok(Some(h)) => {
                            tracing::info!(pid = h.pid, state = ?h.state, waited = ?waited, "Waiting for a previous owner's open batch on this partition.")
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "Cannot see who holds the partition's offsets row."),
                    }
                }
                Err(e) => {
                    failures += 1;
                    let d = s.backoff.delay(failures.min(6));
                    tracing::warn!(error = %e, retry_in = ?d, "Taking the partition over failed (database unavailable?); retrying.");
                    if !self.sleep(d).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Decides where to start from the database position and Kafka's commit,
    /// seeks there and loads the parked keys. False if the lane must stop
    /// (stopped, or halted by policy: then it waits for the stop).
    async fn start_at(&mut self, db: Option<i64>) -> bool {
        let s = self.shared.clone();
        let (k_off, meta) = self.assigned.kafka.clone().map_or((None, String::new()), |(o, m)| (Some(o), m));
        let d = super::rebalance::decide_start(db, k_off, &meta, s.settings.rewind, s.settings.skip_forward);
        if let (Some((kind, action)), Some(k), Some(dbo)) = (d.moved, k_off, db) {
            events::PartitionRewound {
                consumer: &s.name,
                topic: &self.topic,
                partition: self.partition,
                kafka_offset: k,
                db_offset: dbo,
                kind,
                action,
            }
            .emit();
        }
        if d.halt {
            tracing::error!(
                "Partition halted by the rewind policy: it is not consumed until an operator acts (restart with another policy, or move the offsets with `oncely offsets reset`, which the consumer follows)."
            );
            self.stop.cancelled().await;
            return false;
        }
        self.db_next = d.db_next;
        let target = match d.seek {
            Some(o) => Offset::Offset(o),
            None => s.settings.initial,
        };
        if target != self.assigned.fetch_from {
            let at = match target {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            if !self.seek_to(target).await {
                return false;
            }
            self.next_read = at;
        } else if let Offset::Offset(o) = target {
            self.next_read = Some(o);
        }
        if let Some(o) = self.next_read.or(self.db_next) {
            self.position.store(o, Ordering::Release);
        }
        // Our own commit trailing the database (a crash or a lost assignment
        // within the commit interval): Kafka's copy catches up now rather
        // than at the next batch, which an idle partition may not have for
        // long, so the group's tools show no lag that is not there.
        if d.moved.is_none() && d.db_next.is_some() && k_off != d.db_next {
            self.commit_kafka();
        }
        // The new owner takes over the partition's parked keys.
        let mut failures = 0u32;
        loop {
            match parked_store::parked_keys(&s.pool, &s.name, &self.topic, self.partition).await {
                Ok(keys) => {
                    if !keys.is_empty() {
                        tracing::info!(keys = keys.len(), "Took over parked keys.");
                        self.parked_check = Some(Instant::now());
                    }
                    self.held = keys.iter().filter(|(_, h)| *h).map(|(k, _)| k.clone()).collect();
                    self.parked = keys.into_iter().map(|(k, _)| k).collect();
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read the parked keys; retrying.");
                    failures = failures.saturating_add(1);
                    if !self.sleep(s.backoff.delay(failures.min(6))).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Seeks the partition to `offset` and forgets what was received.
    async fn seek(&mut self, offset: i64) -> bool {
        self.reposition(Offset::Offset(offset)).await
    }

    /// Seeks the partition to `target` (an offset, or where a new lane
    /// starts) and forgets what was received.
    async fn reposition(&mut self, target: Offset) -> bool {
        if !self.seek_to(target).await {
            return false;
        }
        self.pending.clear();
        self.pending_bytes = 0;
        self.next_read = match target {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        true
    }

    /// Seeks the partition (retrying until it works or the lane stops).
    /// librdkafka drops what was fetched before the seek.
    async fn seek_to(&mut self, target: Offset) -> bool {
        let mut failures = 0u32;
        loop {
            let Some(c) = self.kafka_consumer() else { return false };
            let (topic, partition) = (self.topic.clone(), self.partition);
            let res = tokio::task::spawn_blocking(move || {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, partition, target)?;
                let out = c.seek_partitions(tpl, Duration::from_secs(10))?;
                match out.elements().first().map(|e| e.error()) {
                    Some(Err(e)) => Err(e),
                    _ => Ok(()),
                }
            })
            .await;
            match res {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => {
                    failures += 1;
                    tracing::warn!(error = %e, target = ?target, "Seeking the partition failed; retrying.");
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "Seeking the partition failed; retrying.");
                }
            }
            if !self.sleep(self.shared.backoff.delay(failures.min(5))).await {
                return false;
            }
        }
    }

    /// Runs one batch from `pending`. Returns false if the lane must stop.
    async fn run_batch(&mut self) -> bool {
        let mut n = self.batch_len();
        if let Some(live) = self.shared.settings.follow.clone() {
            match self.follow_cap(&live, n).await {
                Some(0) => return self.sleep(FOLLOW_POLL).await,
                Some(c) => n = c,
                None => return true,
            }
        }
        if let Some(bucket) = &self.shared.bucket {
            bucket.take(n).await;
        }
        let batch: Vec<Arc<RawRecord>> = self.pending.iter().take(n).cloned().collect();
        let started = Instant::now();
        // OpenTelemetry messaging conventions (see `crate::telemetry`).
        let span = tracing::info_span!(
            "batch",
            "otel.name" = %format_args!("process {}", self.topic),
            "otel.kind" = "consumer",
            "messaging.system" = "kafka",
            "messaging.operation.type" = "process",
            "messaging.operation.name" = "process",
            "messaging.consumer.group.name" = &*self.shared.name,
            "messaging.destination.name" = %self.topic,
            "messaging.destination.partition.id" = %self.partition,
            "messaging.batch.message_count" = batch.len() as i64,
            "messaging.kafka.offset" = batch.first().map(|r| r.offset),
            last_offset = batch.last().map(|r| r.offset),
        );
        for r in &batch {
            crate::telemetry::add_link(&span, r.headers.iter());
        }
        let mut result = self.process(&batch, false).instrument(span.clone()).await;
        if matches!(result, Ok(Outcome::NeedCareful)) {
            result = self.process(&batch, true).instrument(span).await;
        }
        crate::metrics::observe(
            "oncely_batch_seconds",
            "Duration of a batch transaction, claim to commit.",
            &[("consumer", &self.shared.name), ("topic", &self.topic)],
            started.elapsed().as_secs_f64(),
        );
        match result {
            Ok(Outcome::Committed { next, parked, held }) => {
                self.infra_failures = 0;
                self.db_next = Some(next);
                self.position.store(next, Ordering::Release);
                self.committed_ts = batch.last().and_then(|r| r.timestamp_ms).or(self.committed_ts);
                for r in self.pending.drain(..n) {
                    self.pending_bytes -= r.size();
                }
                self.commit_kafka_soon();
                if !parked.is_empty() {
                    self.parked.extend(parked);
                    self.held.extend(held);
                    self.schedule_parked_check(None).await;
                }
                true
            }
            Ok(Outcome::Fenced) => self.fenced().await,
            Ok(Outcome::NeedCareful) => true,
            Err(e) => {
                // Infrastructure failure (database down, connection lost): the
                // transaction rolled back; try the same batch again.
                self.infra_failures += 1;
                let d = self.shared.backoff.delay(self.infra_failures.min(6));
                tracing::warn!(error = %e, retry_in = ?d, "Batch failed and rolled back; retrying.");
                self.retry_at = Some(Instant::now() + d);
                true
            }
        }
    }

    /// A projection rebuild stays behind the live consumer it rebuilds for:
    /// it takes only records the live consumer has committed, so that a
    /// swap never moves the live position forward past events whose side
    /// effects the live consumer has not recorded yet (the rebuild's are
    /// suppressed). How many of the first `n` pending records the next
    /// batch may take; `None` when the live position could not be read (the
    /// lane retries later).
    async fn follow_cap(&mut self, live: &str, n: usize) -> Option<usize> {
        match offsets::read(&self.shared.pool, live, &self.topic, self.partition).await {
            Ok(row) => {
                let cap = row.and_then(|r| r.next_offset).unwrap_or(0);
                Some(self.pending.iter().take(n).take_while(|r| r.offset < cap).count())
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the live consumer's position; retrying.");
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                None
            }
        }
    }

    /// How many pending records the next batch takes: up to `max_batch`
    /// records and `max_batch_bytes` (at least one record).
    fn batch_len(&self) -> usize {
        let s = &self.shared.settings;
        let mut bytes = 0usize;
        let mut n = 0usize;
        for r in self.pending.iter().take(s.max_batch) {
            bytes += r.size();
            if n > 0 && bytes > s.max_batch_bytes {
                break;
            }
            n += 1;
        }
        n
    }

    /// The fence failed. If another member took the partition over (a newer
    /// epoch), this lane is a zombie: it stops processing until the revoke.
    /// If only the position moved (an operator edited `oncely.offsets`, or a
    /// previous owner's late batch committed), it re-reads it and goes on
    /// from there. Returns false if the lane must stop.
    async fn fenced(&mut self) -> bool {
        let s = self.shared.clone();
        let row = match offsets::read(&s.pool, &s.name, &self.topic, self.partition).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot re-read the partition's offsets after a failed fence; retrying.");
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                return true;
            }
        };
        events::BatchFenced {
            consumer: &s.name,
            topic: &self.topic,
            partition: self.partition,
            expected: self.db_next,
            found: row.and_then(|r| r.next_offset),
            zombie: row.is_none_or(|r| r.epoch != self.epoch),
        }
        .emit();
        self.follow_row(row).await
    }

    /// Goes on from the partition's offsets row as it is now: from its
    /// position if this lane still owns it (its epoch), else idles as a
    /// zombie until the revoke. False if the lane must stop.
    async fn follow_row(&mut self, row: Option<offsets::Owned>) -> bool {
        match row {
            Some(r) if r.epoch == self.epoch => {
                self.db_next = r.next_offset;
                // No position (a row a swap-back created for a partition the
                // restored side never read): from where a new lane starts.
                if !self.reposition(r.next_offset.map_or(self.shared.settings.initial, Offset::Offset)).await {
                    return false;
                }
                if let Some(at) = r.next_offset {
                    self.position.store(at, Ordering::Release);
                    // Kafka's copy follows, so that a restart does not find
                    // Kafka ahead of the database and take it for a skip.
                    self.commit_kafka();
                }
                true
            }
            _ => {
                tracing::error!(
                    epoch = self.epoch,
                    "Another member took this partition over (this member is a zombie that has not noticed yet): idling until the rebalance revokes it."
                );
                self.pending.clear();
                self.pending_bytes = 0;
                self.stop.cancelled().await;
                false
            }
        }
    }

    /// An idle lane looks at its offsets row every [`IDLE_POSITION_CHECK`]:
    /// the row can change with no record arriving to run into the fence (a
    /// projection swap-back gives the live consumer back the position it had
    /// at the swap; an operator can edit the row; another member can take
    /// the partition over). A moved position is followed at once instead of
    /// when the next record comes. False if the lane must stop.
    async fn check_idle_position(&mut self) -> bool {
        let s = self.shared.clone();
        let read = tokio::select! {
            _ = self.stop.cancelled() => return false,
            r = offsets::read(&s.pool, &s.name, &self.topic, self.partition) => r,
        };
        match read {
            Ok(Some(r)) if r.epoch == self.epoch && r.next_offset == self.db_next => true,
            Ok(row) => {
                tracing::warn!(
                    expected = ?self.db_next,
                    found = ?row.and_then(|r| r.next_offset),
                    zombie = row.is_none_or(|r| r.epoch != self.epoch),
                    "The partition's database offsets row changed while the lane was idle; following it."
                );
                self.follow_row(row).await
            }
            Err(e) => {
                tracing::debug!(error = %e, "Cannot read the partition's offsets row while idle; trying again later.");
                true
            }
        }
    }

    /// Sleeps unless stopped; false if stopped. A Kafka commit the lane
    /// owes is paid first: the interval spaces commits while batches run,
    /// and a lane that waits (a spike-guard pause, a retry's backoff, a
    /// rebuild held behind its live consumer) has no batch to pay it after.
    async fn sleep(&mut self, d: Duration) -> bool {
        self.pay_owed_kafka_commit();
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn accept(&mut self, rec: RawRecord) {
        if let Some(n) = self.next_read {
            if rec.offset < n {
                // Fetched before a seek and popped in the same instant (a race
                // librdkafka's version barrier leaves open): a leftover.
                // Counted, so that a steady stream of them (which no seek
                // explains) shows on the dashboard instead of in debug logs.
                tracing::debug!(offset = rec.offset, expected = n, "Dropped a record below the lane's position.");
                crate::metrics::inc(
                    "oncely_records_below_position_total",
                    "Records dropped because they were below the lane's position (leftovers of a seek).",
                    &[("consumer", &self.shared.name), ("topic", &self.topic)],
                    1,
                );
                return;
            }
        }
        self.next_read = Some(rec.offset + 1);
        self.pending_bytes += rec.size();
        self.pending.push_back(Arc::new(rec));
    }

    /// Receives records until the batch is full (records or bytes) or
    /// `max_wait` passed since the first one, or a parked key is due.
    /// Returns false when the lane must stop.
    async fn fill(&mut self) -> bool {
        let s = self.shared.clone();
        let max = s.settings.max_batch;
        let mut deadline: Option<tokio::time::Instant> =
            (!self.pending.is_empty()).then(|| tokio::time::Instant::now() + s.settings.max_wait);
        let parked_due = self.parked_check.map(tokio::time::Instant::from_std);
        // Kept across calls (a parked-key check that comes first must not
        // push it back); cleared when a record arrives.
        if self.pending.is_empty() && self.idle_check_at.is_none() {
            self.idle_check_at = Some(tokio::time::Instant::now() + IDLE_POSITION_CHECK);
        }
        let position_due = self.idle_check_at;
        let mut kafka_commit_due = self.kafka_commit_at.filter(|_| self.kafka_commit_owed);
        // One stream for the whole fill: each stream registers a wake-up slot
        // (under a mutex), which `queue.recv()` would do per record.
        let queue = self.queue.clone();
        let mut stream = queue.stream();
        while self.pending.len() < max && self.pending_bytes < s.settings.max_batch_bytes {
            // A record already in the queue is taken at once; only an empty
            // queue is waited on with the timers below, which would otherwise
            // be armed and dropped once per record. At most a batch is taken
            // this way, so a stop is seen within one batch.
            let ready = stream.next().now_or_never().flatten().map(Ok);
            let received = match ready {
                Some(r) => r,
                None => tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => return false,
                    _ = sleep_until_opt(kafka_commit_due) => {
                        kafka_commit_due = None;
                        self.commit_kafka();
                        continue;
                    }
                    m = tokio::time::timeout(QUEUE_POLL, stream.next()) => {
                        m.map(|m| m.expect("kafka streams never terminate"))
                    }
                    _ = sleep_until_opt(deadline) => break,
                    _ = sleep_until_opt(parked_due), if self.pending.is_empty() => break,
                    _ = sleep_until_opt(position_due), if self.pending.is_empty() => {
                        self.idle_check_at = None;
                        return self.check_idle_position().await;
                    }
                },
            };
            match received {
                Err(_elapsed) => {
                    if self.reseek.load(Ordering::Acquire) {
                        break;
                    }
                    continue;
                }
                Ok(Ok(m)) => {
                    let rec = RawRecord::from_message_of(&m, &self.topic);
                    drop(m);
                    self.accept(rec);
                }
                Ok(Err(KafkaError::PartitionEOF(_))) => continue,
                Ok(Err(e)) => {
                    if !self.queue_error(e).await {
                        return false;
                    }
                    break;
                }
            }
            if deadline.is_none() && !self.pending.is_empty() {
                deadline = Some(tokio::time::Instant::now() + s.settings.max_wait);
                // Not idle any more: the next idle spell waits its own interval.
                self.idle_check_at = None;
            }
        }
        true
    }

    /// An error on the partition's queue. The lane's position outside the
    /// partition's log (librdkafka's `auto.offset.reset` is `error` for
    /// oncely) halts it: records were deleted before they were processed, or
    /// the topic was recreated; skipping silently would lose or misapply
    /// data. False if the lane must stop.
    async fn queue_error(&mut self, e: KafkaError) -> bool {
        let out_of_range = matches!(
            &e,
            KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange)
        );
        if !out_of_range {
            tracing::warn!(error = %e, "Error on the partition's queue.");
            return true;
        }
        let s = self.shared.clone();
        let position = self.pending.front().map(|r| r.offset).or(self.next_read).or(self.db_next);
        let watermarks = match s.consumer.get().and_then(std::sync::Weak::upgrade) {
            Some(c) => {
                let (t, p) = (self.topic.clone(), self.partition);
                tokio::task::spawn_blocking(move || c.fetch_watermarks(&t, p, Duration::from_secs(10)).ok())
                    .await
                    .ok()
                    .flatten()
            }
            None => None,
        };
        events::PartitionOutOfRange {
            consumer: &s.name,
            topic: &self.topic,
            partition: self.partition,
            position,
            log_start: watermarks.map(|w| w.0),
            log_end: watermarks.map(|w| w.1),
            error: &e,
        }
        .emit();
        self.pay_owed_kafka_commit();
        self.stop.cancelled().await;
        false
    }

    fn retry_delay(&self, err: &HandlerError, attempts: u32) -> Duration {
        match err.class() {
            super::FailureClass::RetryAfter(d) => d,
            _ => self.shared.backoff.delay(attempts.saturating_sub(1)),
        }
    }

    /// Identity, version and size of a record: no payload decoding.
    fn prepare(&self, rec: &RawRecord) -> Prepared {
        let size = rec.size();
        if size > self.shared.settings.max_record_bytes {
            return Prepared::Bad {
                id: self.shared.identity.extract(rec).ok(),
                err: DecodeError::Oversized { size, limit: self.shared.settings.max_record_bytes },
            };
        }
        let id = match self.shared.identity.extract(rec) {
            Ok(id) => id,
            Err(err) => return Prepared::Bad { id: None, err },
        };
        let version = match &self.shared.version {
            None => None,
            Some(g) => match g.source.extract(rec) {
                Ok(v) => Some(v),
                Err(err) => return Prepared::Bad { id: Some(id), err },
            },
        };
        let key = id.key();
        Prepared::Good { id, key, version }
    }

    /// Dead-letters a record in the caller's transaction: indexed in
    /// `oncely.dead_letters` and published to the dead-letter topic through
    /// the outbox, so it is durable before the offset moves past it.
    async fn dead_letter(&self, cx: &mut Cx, dl: DeadLetter<'_>) -> Result<()> {
        crate::failure::dead_letter(cx.db(), &self.shared.name, &dl).await?;
        events::DeadLettered {
            consumer: &self.shared.name,
            topic: &self.topic,
            partition: self.partition,
            offset: dl.record.offset,
            event_id: dl.event_id.as_deref().unwrap_or(""),
            reason: dl.reason,
            attempts: dl.attempts,
            error: dl.error,
        }
        .emit();
        Ok(())
    }

    /// Opens a transaction and the handler context around it.
    async fn begin(&self) -> Result<Cx> {
        let s = &self.shared;
        let mut tx = s.pool.begin().await?;
        if let Some(path) = &s.settings.search_path {
            // A projection rebuild: the handler's unqualified SQL lands in the
            // shadow schema, for this transaction only (oncely's own SQL is
            // schema-qualified).
            store::set_local_search_path(&mut tx, path).await?;
        }
        Ok(Cx {
            tx,
            consumer: s.name.clone(),
            event_id: None,
            replay: s.settings.replay,
            publish: s.settings.publish.clone(),
            effects: Vec::new(),
            registry: s.registry.clone(),
            record: None,
            misconfigured: None,
        })
    }

    fn fence(&self, next: i64) -> Fence<'_> {
        Fence {
            consumer: &self.shared.name,
            topic: &self.topic,
            partition: self.partition,
            epoch: self.epoch,
            expected: self.db_next,
            next,
        }
    }

    /// Runs one batch transaction. `careful` runs each event in a savepoint, so
    /// one failing event does not undo the others.
    async fn process(&self, batch: &[Arc<RawRecord>], careful: bool) -> Result<Outcome> {
        let s = &self.shared;
        let consumer = &*s.name;
        let prepared: Vec<Prepared> = batch.iter().map(|r| self.prepare(r)).collect();
        let mut decider = Decider::new(s.rules(), &self.parked, &self.held);
        // Events of parked keys are not claimed: they queue behind.
        let to_claim: Vec<Uuid> = prepared
            .iter()
            .zip(batch)
            .filter(|(p, r)| p.inbox_key().is_some() && decider.wants_claim(r.entity_key()))
            .filter_map(|(p, _)| p.inbox_key())
            .collect();
        let end = batch.last().map_or(0, |r| r.offset + 1);

        let mut cx = self.begin().await?;
        // Fence first, then the claim (one statement, or two when probing).
        let replaying = self.replaying.load(Ordering::Relaxed);
        let Some(claimed) =
            inbox::fence_and_claim(cx.db(), &self.fence(end), s.consumer_id, &to_claim, replaying).await?
        else {
            cx.tx.rollback().await?;
            return Ok(Outcome::Fenced);
        };
        if !to_claim.is_empty() {
            self.replaying.store(claimed.is_empty(), Ordering::Relaxed);
        }
        let mut tail = Tail::default();
        let mut skipped: Vec<Skipped<'_>> = Vec::new();
        let mut unrouted: Vec<(i64, &EventId, String)> = Vec::new();
        let (mut processed, mut dead, mut parked) = (0u64, 0u64, 0u64);
        let mut batch_evs: Vec<Box<dyn Any + Send>> = Vec::new();
        // Whether the application's code ran in this transaction (only it can
        // leave the transaction aborted and say all is well).
        let mut handler_ran = false;

        for (rec, prep) in batch.iter().zip(&prepared) {
            let key = rec.entity_key();
            let claimed_now = prep.inbox_key().is_some_and(|k| claimed.contains(&k));
            let verdict = decider.next(key, prep.inbox_key(), claimed_now);
            let (id, inbox_key, version) = match (verdict, prep) {
                (Verdict::Apply, Prepared::Good { id, key: k, version }) => (id, *k, *version),
                (Verdict::Duplicate, Prepared::Good { id, .. }) => {
                    skipped.push((rec.offset, id, None, true, key));
                    continue;
                }
                (Verdict::DeadLetter { hold_key }, Prepared::Bad { id, err }) => {
                    let msg = err.to_string();
                    self.dead_letter(&mut cx, DeadLetter::decode(rec, id.as_ref(), err.reason(), &msg)).await?;
                    if hold_key {
                        tail.dead_marker(consumer, rec, id.as_ref());
                    }
                    dead += 1;
                    continue;
                }
                // ParkBehind, and (defensively: the decider never gives them)
                // any other pairing: parked, nothing lost, order kept.
                (v, _) => {
                    if claimed_now {
                        tail.unclaim.extend(prep.inbox_key());
                    }
                    let held = matches!(v, Verdict::ParkBehind { held: true });
                    let status = if held { ParkedStatus::Held } else { ParkedStatus::Waiting };
                    tail.park(consumer, rec, prep.event_id(), status, 0, None, None, None);
                    parked += 1;
                    continue;
                }
            };
            // Decode only what will be applied (a replayed backlog is not decoded).
            let ev = match s.handler.decode(id.clone(), rec.clone()) {
                Ok(Decoded::Event(ev)) => ev,
                Ok(Decoded::Unrouted(ty)) => {
                    // Claimed and skipped: a copy of it is a duplicate too.
                    unrouted.push((rec.offset, id, ty));
                    continue;
                }
                Err(err) => {
                    tail.unclaim.push(inbox_key);
                    let msg = err.to_string();
                    self.dead_letter(&mut cx, DeadLetter::decode(rec, Some(id), err.reason(), &msg)).await?;
                    if decider.bad_after_claim(key) {
                        tail.dead_marker(consumer, rec, Some(id));
                    }
                    dead += 1;
                    continue;
                }
            };
            if !careful && s.handler.is_batch() {
                // Batch handler: apply the version guard now, call once below.
                if !self.newer_version(&mut cx, version, key).await? {
                    skipped.push((rec.offset, id, version, false, key));
                    continue;
                }
                batch_evs.push(ev);
                continue;
            }
            if careful {
                store::savepoint(cx.db(), Savepoint::Begin).await?;
            }
            let span = tracing::info_span!(
                "event",
                "otel.name" = %format_args!("process {}", self.topic),
                "otel.kind" = "consumer",
                "messaging.system" = "kafka",
                "messaging.operation.type" = "process",
                "messaging.operation.name" = "process",
                "messaging.consumer.group.name" = &*s.name,
                "messaging.destination.name" = %self.topic,
                "messaging.destination.partition.id" = %self.partition,
                "messaging.message.id" = %id,
                "messaging.kafka.offset" = rec.offset,
                "messaging.kafka.message.key" = %crate::telemetry::key_attr(rec.key.as_deref()),
            );
            crate::telemetry::set_parent(&span, rec.headers.iter());
            handler_ran = true;
            let mut outcome = self.apply(&mut cx, id, version, ev, rec, key).instrument(span).await;
            if careful && outcome.is_ok() {
                // The handler may have swallowed an SQL error, which leaves the
                // transaction aborted: then RELEASE fails, and it is this
                // event's failure (rolled back to its savepoint), not the batch's.
                if let Err(e) = store::savepoint(cx.db(), Savepoint::Release).await {
                    if !e.is_aborted_transaction() {
                        return Err(e);
                    }
                    outcome = Err(HandlerError::retry(SwallowedSqlError(e.to_string())));
                }
            }
            match outcome {
                Ok(Applied::Done) => processed += 1,
                Ok(Applied::Stale) => skipped.push((rec.offset, id, version, false, key)),
                Err(_) if !careful => {
                    cx.tx.rollback().await?;
                    return Ok(Outcome::NeedCareful);
                }
                Err(err) => {
                    store::savepoint(cx.db(), Savepoint::Rollback).await?;
                    tail.unclaim.push(inbox_key);
                    let msg = err.to_string();
                    let class = err.class_name();
                    match decider.failed(key, err.class(), 1) {
                        AfterFailure::DeadLetter { reason, attempts, hold_key } => {
                            let dl = DeadLetter::handler(rec, id, reason, &msg, &class, attempts as i32);
                            self.dead_letter(&mut cx, dl).await?;
                            if hold_key {
                                tail.dead_marker(consumer, rec, Some(id));
                            }
                            dead += 1;
                        }
                        AfterFailure::Park { attempts } => {
                            let retry_in = self.retry_delay(&err, attempts);
                            tracing::warn!(offset = rec.offset, event_id = %id, retry_in = ?retry_in, error = %msg, "Handler failed; parked the event and its key.");
                            tail.park(
                                consumer,
                                rec,
                                Some(id),
                                ParkedStatus::Waiting,
                                attempts,
                                Some(retry_in),
                                Some(msg),
                                Some(class),
                            );
                            parked += 1;
                        }
                    }
                }
            }
        }
        if !batch_evs.is_empty() {
            let n = batch_evs.len() as u64;
            handler_ran = true;
            match self.call_handler(&mut cx, None, batch_evs).await {
                Ok(()) => processed += n,
                Err(_) => {
                    cx.tx.rollback().await?;
                    return Ok(Outcome::NeedCareful);
                }
            }
        }
        if s.has_failed() {
            // A configuration error stops the consumer: nothing of this batch commits.
            cx.tx.rollback().await?;
            return Err(crate::Error::Config("the consumer is stopping on a configuration error".into()));
        }
        // The tail also proves the transaction is not aborted: a handler that
        // swallowed an SQL error in the optimistic pass leaves it aborted, and
        // COMMIT would then silently roll back.
        if let Err(e) = self.write_tail(&mut cx, &tail, handler_ran).await {
            if careful || !e.is_aborted_transaction() {
                return Err(e);
            }
            cx.tx.rollback().await?;
            return Ok(Outcome::NeedCareful);
        }
        let Cx { tx, .. } = cx;
        tx.commit().await?;
        if processed > 0 && !s.registry.is_empty() {
            s.effects_wake.notify_one();
        }

        let dups: Vec<(i64, &EventId)> = skipped.iter().filter(|s| s.3).map(|s| (s.0, s.1)).collect();
        let duplicates = dups.len() as u64;
        self.duplicates_skipped(&dups);
        for (offset, id, version, dup, key) in &skipped {
            if !*dup {
                events::StaleSkipped {
                    consumer,
                    topic: &self.topic,
                    offset: *offset,
                    event_id: &id.display(),
                    entity: &crate::envelope::escape_bytes(key),
                    version: version.unwrap_or_default(),
                }
                .emit();
            }
        }
        for (offset, id, ty) in &unrouted {
            events::UnroutedSkipped { consumer, topic: &self.topic, offset: *offset, event_id: id, ty }.emit();
        }
        count_events(consumer, &self.topic, "processed", processed);
        count_events(consumer, &self.topic, "dead", dead);
        count_events(consumer, &self.topic, "parked", parked);
        if let Some(spike) = &s.spike {
            if let Some(reason) = spike.record_at(batch.len() as u64, duplicates, Instant::now()) {
                events::GuardTripped { consumer, guard: "spike", detail: reason }.emit();
            }
        }
        let (parked, held) = decider.into_parked();
        Ok(Outcome::Committed { next: end, parked, held })
    }

    /// The batch's parks and unclaims, sent together; when there are none
    /// and the handler ran, a `SELECT 1` (it is what tells a transaction the
    /// handler left aborted from a live one). A batch of duplicates runs only
    /// oncely's own statements, whose errors were seen: no round trip.
    async fn write_tail(&self, cx: &mut Cx, tail: &Tail<'_>, handler_ran: bool) -> Result<()> {
        let consumer_id = self.shared.consumer_id;
        if tail.parks.is_empty() && tail.unclaim.is_empty() {
            if handler_ran {
                store::ping_tx(cx.db()).await?;
            }
            return Ok(());
        }
        if !tail.parks.is_empty() {
            parked_store::park(cx.db(), &tail.parks).await?;
        }
        inbox::unclaim(cx.db(), consumer_id, &tail.unclaim).await?;
        Ok(())
    }

    /// Looks at the parked keys: retries the due heads and drains what they
    /// unblock. Returns false if the lane must stop.
    async fn retry_parked(&mut self) -> bool {
        let s = self.shared.clone();
        let due = match parked_store::due_keys(&s.pool, &s.name, &self.topic, self.partition).await {
            Ok((due, _)) => due,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the parked keys; retrying later.");
                self.parked_check = Some(Instant::now() + Duration::from_secs(1));
                return true;
            }
        };
        // A key an operator released is due again: it is not held any more.
        for key in &due {
            self.held.remove(key);
        }
        for key in due {
            if self.stop.is_cancelled() {
                return false;
            }
            match self.drain_key(&key).await {
                Ok(true) => {}
                Ok(false) => return self.fenced().await,
                Err(e) => {
                    tracing::warn!(key = %crate::envelope::escape_bytes(&key), error = %e, "Retrying a parked key failed and rolled back.")
                }
            }
        }
        self.schedule_parked_check(Some(Duration::from_secs(1))).await;
        true
    }

    /// Sets when to look at the parked keys next (`None` if none are left).
    async fn schedule_parked_check(&mut self, on_error: Option<Duration>) {
        let s = &self.shared;
        match parked_store::due_keys(&s.pool, &s.name, &self.topic, self.partition).await {
            Ok((due, next)) => {
                crate::metrics::set(
                    "oncely_parked_keys",
                    "Keys with parked events, per partition.",
                    &[("consumer", &s.name), ("topic", &self.topic), ("partition", &self.partition.to_string())],
                    self.parked.len() as f64,
                );
                // Held keys have no due time; look again now and then so a key
                // an operator released (`oncely dlq release`) is picked up.
                let idle = (!self.parked.is_empty()).then_some(HELD_KEY_CHECK);
                self.parked_check = if !due.is_empty() {
                    Some(Instant::now())
                } else {
                    next.map(|d| d.min(HELD_KEY_CHECK)).or(idle).map(|d| Instant::now() + d)
                };
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the parked keys' due times.");
                self.parked_check = on_error.map(|d| Instant::now() + d);
            }
        }
    }

    /// Retries the head of a parked key and drains the events behind it in
    /// order, in one transaction. Returns false if the fence failed.
    async fn drain_key(&mut self, key: &[u8]) -> Result<bool> {
        let s = self.shared.clone();
        let consumer = &*s.name;
        let mut cx = self.begin().await?;
        if !offsets::fence_in_place(cx.db(), consumer, &self.topic, self.partition, self.epoch, self.db_next).await? {
            cx.tx.rollback().await?;
            return Ok(false);
        }
        let rows = parked_store::key_queue(cx.db(), consumer, &self.topic, self.partition, key).await?;
        let (no_parked, no_held) = (HashSet::new(), HashSet::new());
        let mut decider = Decider::new(s.rules(), &no_parked, &no_held);
        let (mut processed, mut dead) = (0u64, 0u64);
        let mut duplicates: Vec<(i64, EventId)> = Vec::new();
        let mut held_key = false;
        let mut tail = Tail::default();
        for row in &rows {
            let rec = Arc::new(row.record.clone());
            let prep = self.prepare(&row.record);
            let claimed_now = match prep.inbox_key() {
                Some(k) => inbox::claim(cx.db(), s.consumer_id, &[k]).await?.contains(&k),
                None => false,
            };
            let verdict = decider.next(key, prep.inbox_key(), claimed_now);
            let (id, inbox_key, version) = match (verdict, &prep) {
                (Verdict::DeadLetter { hold_key }, Prepared::Bad { id, err }) => {
                    let msg = err.to_string();
                    self.dead_letter(&mut cx, DeadLetter::decode(&rec, id.as_ref(), err.reason(), &msg)).await?;
                    parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                    dead += 1;
                    if hold_key {
                        self.hold_rest(&mut cx, &mut tail, consumer, &row.record, id.as_ref(), key).await?;
                        held_key = true;
                        break;
                    }
                    continue;
                }
                (Verdict::Duplicate, Prepared::Good { id, .. }) => {
                    parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                    duplicates.push((rec.offset, id.clone()));
                    continue;
                }
                (Verdict::Apply, Prepared::Good { id, key: k, version }) => (id, *k, *version),
                // The decider of a drained key has no parked keys, so it never
                // says ParkBehind; if it did, the event stays parked.
                (v, _) => {
                    tracing::error!(verdict = ?v, offset = rec.offset, "Unexpected verdict for a parked event; it stays parked.");
                    break;
                }
            };
            let ev = match s.handler.decode(id.clone(), rec.clone()) {
                Ok(Decoded::Event(ev)) => ev,
                Ok(Decoded::Unrouted(ty)) => {
                    parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                    events::UnroutedSkipped { consumer, topic: &self.topic, offset: rec.offset, event_id: id, ty: &ty }
                        .emit();
                    continue;
                }
                Err(err) => {
                    inbox::unclaim(cx.db(), s.consumer_id, &[inbox_key]).await?;
                    let msg = err.to_string();
                    self.dead_letter(&mut cx, DeadLetter::decode(&rec, Some(id), err.reason(), &msg)).await?;
                    parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                    dead += 1;
                    if decider.bad_after_claim(key) {
                        self.hold_rest(&mut cx, &mut tail, consumer, &row.record, Some(id), key).await?;
                        held_key = true;
                        break;
                    }
                    continue;
                }
            };
            store::savepoint(cx.db(), Savepoint::Begin).await?;
            let mut outcome = self.apply(&mut cx, id, version, ev, &rec, key).await;
            if outcome.is_ok() {
                if let Err(e) = store::savepoint(cx.db(), Savepoint::Release).await {
                    if !e.is_aborted_transaction() {
                        return Err(e);
                    }
                    outcome = Err(HandlerError::retry(SwallowedSqlError(e.to_string())));
                }
            }
            match outcome {
                Ok(_) => {
                    parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                    processed += 1;
                }
                Err(err) => {
                    store::savepoint(cx.db(), Savepoint::Rollback).await?;
                    inbox::unclaim(cx.db(), s.consumer_id, &[inbox_key]).await?;
                    let attempts = (row.attempts.max(0) as u32) + 1;
                    let msg = err.to_string();
                    let class = err.class_name();
                    match decider.failed(key, err.class(), attempts) {
                        AfterFailure::DeadLetter { reason, attempts, hold_key } => {
                            let dl = DeadLetter::handler(&rec, id, reason, &msg, &class, attempts as i32);
                            self.dead_letter(&mut cx, dl).await?;
                            parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                            dead += 1;
                            if hold_key {
                                self.hold_rest(&mut cx, &mut tail, consumer, &row.record, Some(id), key).await?;
                                held_key = true;
                                break;
                            }
                        }
                        AfterFailure::Park { attempts } => {
                            let retry_in = self.retry_delay(&err, attempts);
                            parked_store::reschedule(
                                cx.db(),
                                consumer,
                                &self.topic,
                                self.partition,
                                rec.offset,
                                attempts as i32,
                                retry_in,
                                &msg,
                                &class,
                            )
                            .await?;
                            tracing::warn!(key = %crate::envelope::escape_bytes(key), offset = rec.offset, event_id = %id, attempts, retry_in = ?retry_in, error = %msg, "A parked key failed again.");
                            crate::metrics::inc(
                                "oncely_parked_retries_total",
                                "Failed retries of parked keys (poison detection).",
                                &[("consumer", consumer), ("topic", &self.topic)],
                                1,
                            );
                            break;
                        }
                    }
                }
            }
        }
        if !tail.parks.is_empty() {
            parked_store::park(cx.db(), &tail.parks).await?;
        }
        if s.has_failed() {
            cx.tx.rollback().await?;
            return Err(crate::Error::Config("the consumer is stopping on a configuration error".into()));
        }
        let Cx { tx, .. } = cx;
        tx.commit().await?;
        if processed > 0 && !s.registry.is_empty() {
            s.effects_wake.notify_one();
        }
        let dups: Vec<(i64, &EventId)> = duplicates.iter().map(|(o, id)| (*o, id)).collect();
        self.duplicates_skipped(&dups);
        count_events(consumer, &self.topic, "processed", processed);
        count_events(consumer, &self.topic, "dead", dead);
        if held_key {
            self.held.insert(key.to_vec());
            tracing::error!(key = %crate::envelope::escape_bytes(key), "Holding the events of a key behind a dead-lettered event until an operator releases the key (`oncely dlq release`).");
        } else if parked_store::key_queue_len(&s.pool, consumer, &self.topic, self.partition, key).await? == 0 {
            self.parked.remove(key);
            tracing::info!(key = %crate::envelope::escape_bytes(key), "A parked key drained; its events flow again.");
        }
        Ok(true)
    }

    /// Under the hold policy: the dead-lettered record becomes the marker at
    /// the head of its key, and the key's waiting events are held.
    #[allow(clippy::too_many_arguments)]
    async fn hold_rest<'r>(
        &self,
        cx: &mut Cx,
        tail: &mut Tail<'r>,
        consumer: &'r str,
        rec: &'r RawRecord,
        id: Option<&EventId>,
        key: &[u8],
    ) -> Result<()> {
        parked_store::hold_key(cx.db(), consumer, &self.topic, self.partition, key).await?;
        tail.dead_marker(consumer, rec, id);
        Ok(())
    }

    /// Applies one claimed event: version guard, then the handler (panics are
    /// caught and become failures).
    async fn apply(
        &self,
        cx: &mut Cx,
        id: &EventId,
        version: Option<i64>,
        ev: Box<dyn Any + Send>,
        rec: &Arc<RawRecord>,
        key: &[u8],
    ) -> Result<Applied, HandlerError> {
        if !self.newer_version(cx, version, key).await? {
            return Ok(Applied::Stale);
        }
        cx.record = Some(rec.clone());
        let r = self.call_handler(cx, Some(id), vec![ev]).await.map(|()| Applied::Done);
        cx.record = None;
        r
    }

    /// The version guard: records `version` for the entity `key` and says
    /// whether it is newer than the applied one (always true when the guard
    /// is off or the event has no version).
    async fn newer_version(&self, cx: &mut Cx, version: Option<i64>, key: &[u8]) -> Result<bool> {
        let s = &self.shared;
        match (version, &s.version) {
            (Some(v), Some(g)) => {
                let et = g.entity_type.as_deref().unwrap_or(&self.topic);
                store::apply_version(cx.db(), &s.name, et, key, v).await
            }
            _ => Ok(true),
        }
    }

    /// Calls the handler (panics are caught and become failures) and records
    /// the effects it asked for.
    async fn call_handler(
        &self,
        cx: &mut Cx,
        id: Option<&EventId>,
        evs: Vec<Box<dyn Any + Send>>,
    ) -> Result<(), HandlerError> {
        cx.event_id = id.cloned();
        cx.effects.clear();
        if let Some(msg) = cx.misconfigured.take() {
            self.shared.fail(crate::Error::Config(msg.clone()));
            return Err(HandlerError::retry(msg));
        }
        let fut = self.shared.handler.call(evs, cx);
        match AssertUnwindSafe(fut).catch_unwind().await {
            Ok(Ok(())) => {
                if !cx.effects.is_empty() {
                    let intents = std::mem::take(&mut cx.effects);
                    crate::store::effects::record(cx.db(), &intents).await?;
                }
                Ok(())
            }
            Ok(Err(e)) => {
                if let Some(msg) = cx.misconfigured.take() {
                    // Stop before this reaches the failure path of any event.
                    self.shared.fail(crate::Error::Config(msg));
                    return Err(HandlerError::retry(ConsumerStopping));
                }
                Err(e)
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".into());
                Err(HandlerError::retry(PanicError(msg)))
            }
        }
    }

    fn duplicates_skipped(&self, records: &[(i64, &EventId)]) {
        events::DuplicatesSkipped {
            consumer: &self.shared.name,
            topic: &self.topic,
            partition: self.partition,
            records,
        }
        .emit();
    }

    /// [`commit_kafka`](Self::commit_kafka) now, or owed until
    /// [`KAFKA_COMMIT_INTERVAL`] has passed since the last one.
    fn commit_kafka_soon(&mut self) {
        match self.kafka_commit_at {
            Some(at) if tokio::time::Instant::now() < at => {
                self.kafka_commit_owed = true;
                if let Some(c) = self.kafka_consumer() {
                    self.report_lag(&c, self.position.load(Ordering::Acquire));
                }
            }
            _ => self.commit_kafka(),
        }
    }

    /// The owed commit now, if one is owed.
    fn pay_owed_kafka_commit(&mut self) {
        if self.kafka_commit_owed {
            self.commit_kafka();
        }
    }

    fn commit_kafka(&mut self) {
        self.kafka_commit_at = Some(tokio::time::Instant::now() + KAFKA_COMMIT_INTERVAL);
        self.kafka_commit_owed = false;
        let pos = self.position.load(Ordering::Acquire);
        let Some(c) = self.kafka_consumer() else { return };
        let mut tpl = TopicPartitionList::new();
        let mut e = tpl.add_partition(&self.topic, self.partition);
        if pos < 0 || e.set_offset(Offset::Offset(pos)).is_err() {
            return;
        }
        e.set_metadata(COMMIT_METADATA);
        if let Err(err) = c.commit(&tpl, CommitMode::Async) {
            tracing::debug!(error = %err, "Async Kafka commit failed (the database offset is authoritative).");
        }
        self.report_lag(&c, pos);
    }

    fn kafka_consumer(&self) -> Option<Arc<super::KafkaConsumer>> {
        self.shared.consumer.get().and_then(std::sync::Weak::upgrade)
    }

    /// Sets `oncely_lag_records` and `oncely_lag_seconds` from the lane's
    /// (database) position `pos`, after every batch whether or not Kafka's
    /// copy was committed with it.
    fn report_lag(&self, c: &super::KafkaConsumer, pos: i64) {
        if pos < 0 {
            return;
        }
        if let Some((_, high)) = crate::kafka::admin::cached_watermarks(c.client(), &self.topic, self.partition) {
            let partition = self.partition.to_string();
            let labels = [("consumer", &*self.shared.name), ("topic", &self.topic), ("partition", &partition)];
            let behind = (high - pos).max(0);
            crate::metrics::set(
                "oncely_lag_records",
                "Records between the lane's position and the partition's high watermark (as last fetched).",
                &labels,
                behind as f64,
            );
            // Caught up: no lag. Behind: how old the newest committed
            // record is (the records after it are at least as new).
            let seconds = match (behind, self.committed_ts) {
                (0, _) | (_, None) => 0.0,
                (_, Some(ts)) => (chrono::Utc::now().timestamp_millis() - ts).max(0) as f64 / 1000.0,
            };
            crate::metrics::set(
                "oncely_lag_seconds",
                "Age of the newest committed record while the lane is behind the high watermark (0 when caught up).",
                &labels,
                seconds,
            );
        }
    }
}

impl<'a> Tail<'a> {
    #[allow(clippy::too_many_arguments)]
    fn park(
        &mut self,
        consumer: &'a str,
        rec: &'a RawRecord,
        id: Option<&EventId>,
        status: ParkedStatus,
        attempts: u32,
        retry_in: Option<Duration>,
        error: Option<String>,
        error_class: Option<String>,
    ) {
        self.parks.push(NewParked {
            consumer,
            record: rec,
            entity_key: rec.entity_key(),
            event_id: id.map(EventId::display),
            status,
            attempts: attempts as i32,
            retry_in,
            error,
            error_class,
        });
    }

    /// Under the hold policy, the dead-lettered record stays at the head of
    /// its key as the marker that holds the key's later events.
    fn dead_marker(&mut self, consumer: &'a str, rec: &'a RawRecord, id: Option<&EventId>) {
        self.parks.push(NewParked {
            consumer,
            record: rec,
            entity_key: rec.entity_key(),
            event_id: id.map(EventId::display),
            status: ParkedStatus::Dead,
            attempts: 0,
            retry_in: None,
            error: None,
            error_class: None,
        });
    }
}

/// The consumer is stopping on a configuration error (see `Shared::fail`).
#[derive(Debug)]
struct ConsumerStopping;

impl std::fmt::Display for ConsumerStopping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the consumer is stopping on a configuration error")
    }
}

impl std::error::Error for ConsumerStopping {}

/// A handler returned Ok but left its transaction aborted.
#[derive(Debug)]
struct SwallowedSqlError(String);

impl std::fmt::Display for SwallowedSqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the handler returned Ok but its transaction was aborted by an SQL error it did not pass on ({})",
            self.0
        )
    }
}

impl std::error::Error for SwallowedSqlError {}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
