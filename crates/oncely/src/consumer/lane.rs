//! A lane: the ordered processing of one assigned partition.
//!
//! Records come from the dispatcher in offset order. A lane runs batches (one
//! transaction each) and, between batches, the retries of its parked keys.
//! A transiently failing event is parked in the transaction that advances the
//! offset past it, and every later event of the same key is parked behind it:
//! per-key order holds, other keys go on.

use std::any::Any;
use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgConnection;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::events::{self, count_events};
use super::handler::{Cx, FailureClass, HandlerError, PanicError};
use super::{Shared, StartDecision, COMMIT_METADATA};
use crate::envelope::{DecodeError, EventId, RawRecord};
use crate::error::Result;
use crate::failure::{self, DeadKeyPolicy, DeadLetter};
use crate::store::failure as parked_store;
use crate::store::{self, Savepoint};

/// The rebalance callback's handle on a running lane.
pub(crate) struct LaneHandle {
    pub topic: String,
    pub partition: i32,
    pub stop: CancellationToken,
    pub join: JoinHandle<()>,
    /// The next offset to commit to Kafka (-1 before the first batch).
    pub position: Arc<AtomicI64>,
    /// The dispatcher's side of the lane's bounded channel.
    pub tx: mpsc::Sender<Arc<RawRecord>>,
    /// Set by the dispatcher when it paused the partition because the
    /// channel was full; the lane then asks to be refilled.
    pub paused: Arc<AtomicBool>,
    /// Set by the lane when it asked for a refill, cleared by the dispatcher.
    pub refill_asked: Arc<AtomicBool>,
}

/// How often a lane with held keys looks for keys an operator released.
const HELD_KEY_CHECK: Duration = Duration::from_secs(2);

/// Records a lane's channel holds. Large enough that a paused partition is
/// resumed only after thousands of records (a pause makes librdkafka drop its
/// prefetch for the partition: pausing for every few records halves
/// throughput), small enough to bound memory.
pub(crate) fn channel_capacity(max_batch: usize) -> usize {
    (max_batch * 20).max(10_000)
}

pub(crate) fn spawn(shared: Arc<Shared>, topic: String, partition: i32, start: StartDecision) -> LaneHandle {
    let stop = shared.shutdown.child_token();
    let position = Arc::new(AtomicI64::new(-1));
    let (tx, rx) = mpsc::channel(channel_capacity(shared.settings.max_batch));
    let paused = Arc::new(AtomicBool::new(false));
    let refill_asked = Arc::new(AtomicBool::new(false));
    let lane = Lane {
        shared: shared.clone(),
        topic: topic.clone(),
        partition,
        rx,
        paused: paused.clone(),
        refill_asked: refill_asked.clone(),
        stop: stop.clone(),
        db_next: start.db_next,
        next_read: start.seek,
        halted: start.halt,
        pending: VecDeque::new(),
        infra_failures: 0,
        retry_at: None,
        position: position.clone(),
        parked: HashSet::new(),
        parked_check: None,
    };
    let span = tracing::info_span!("lane", consumer = &*shared.name, topic = %topic, partition);
    let join = shared.rt.spawn(lane.run().instrument(span));
    LaneHandle { topic, partition, stop, join, position, tx, paused, refill_asked }
}

struct Lane {
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    rx: mpsc::Receiver<Arc<RawRecord>>,
    paused: Arc<AtomicBool>,
    refill_asked: Arc<AtomicBool>,
    stop: CancellationToken,
    /// The database offset the next batch must find (the fence).
    db_next: Option<i64>,
    /// The next offset expected from Kafka; records below it are leftovers.
    next_read: Option<i64>,
    halted: bool,
    /// Records received and not yet committed, in offset order.
    pending: VecDeque<Arc<RawRecord>>,
    /// Consecutive infrastructure failures (database down), for backoff.
    infra_failures: u32,
    retry_at: Option<Instant>,
    position: Arc<AtomicI64>,
    /// Keys with parked events in this partition.
    parked: HashSet<String>,
    /// When to look at the parked keys next.
    parked_check: Option<Instant>,
}

/// What became of a batch.
enum Outcome {
    /// The batch committed: the new database offset, the Kafka position, and
    /// the keys parked by this batch.
    Committed { next: i64, end: i64, newly_parked: HashSet<String> },
    /// The fence failed: another member owns the partition now.
    Fenced,
    /// A handler failed without savepoints: run the batch again carefully.
    NeedCareful,
}

/// One record of a batch, prepared before the transaction starts.
enum Prepared {
    Good { id: EventId, version: Option<i64>, ev: Option<Box<dyn Any + Send>> },
    Bad { id: Option<EventId>, err: DecodeError },
}

/// What applying one claimed event gave.
enum Applied {
    Done,
    Stale,
}

impl Lane {
    async fn run(mut self) {
        if self.halted {
            tracing::error!(
                "Partition halted by the rewind policy: it stays paused until an operator acts (restart with another policy, or move the offsets back with `oncely offsets`)."
            );
            self.stop.cancelled().await;
            return;
        }
        if let Some(o) = self.next_read.or(self.db_next) {
            self.position.store(o, Ordering::Release);
        }
        // A new owner takes over the partition's parked keys.
        loop {
            match parked_store::parked_keys(&self.shared.pool, &self.shared.name, &self.topic, self.partition).await {
                Ok(keys) => {
                    if !keys.is_empty() {
                        tracing::info!(keys = keys.len(), "Took over parked keys.");
                        self.parked_check = Some(Instant::now());
                    }
                    self.parked = keys.into_iter().collect();
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read the parked keys; retrying.");
                    if !self.sleep(Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        }
        loop {
            if self.stop.is_cancelled() {
                return;
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

    /// Runs one batch from `pending`. Returns false if the lane must stop.
    async fn run_batch(&mut self) -> bool {
        let n = self.pending.len().min(self.shared.settings.max_batch);
        if let Some(bucket) = &self.shared.bucket {
            bucket.take(n).await;
        }
        let batch: Vec<Arc<RawRecord>> = self.pending.iter().take(n).cloned().collect();
        let started = Instant::now();
        let span = tracing::info_span!(
            "batch",
            consumer = &*self.shared.name,
            topic = %self.topic,
            partition = self.partition,
            first_offset = batch.first().map(|r| r.offset),
            last_offset = batch.last().map(|r| r.offset),
            size = batch.len()
        );
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
            Ok(Outcome::Committed { next, end, newly_parked }) => {
                self.infra_failures = 0;
                self.db_next = Some(next);
                self.position.store(end, Ordering::Release);
                self.pending.drain(..n);
                self.commit_kafka();
                if !newly_parked.is_empty() {
                    self.parked.extend(newly_parked);
                    self.schedule_parked_check(None).await;
                }
                true
            }
            Ok(Outcome::Fenced) => {
                events::BatchFenced {
                    consumer: &self.shared.name,
                    topic: &self.topic,
                    partition: self.partition,
                    expected: self.db_next,
                }
                .emit();
                self.idle_until_revoked().await
            }
            Ok(Outcome::NeedCareful) => true,
            Err(e) => {
                // Infrastructure failure (database down, connection lost): the
                // transaction rolled back; try the same batch again.
                self.infra_failures += 1;
                let d = self.backoff(self.infra_failures.min(6));
                tracing::warn!(error = %e, retry_in = ?d, "Batch failed and rolled back; retrying.");
                self.retry_at = Some(Instant::now() + d);
                true
            }
        }
    }

    /// Sleeps unless stopped; false if stopped.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn accept(&mut self, rec: Arc<RawRecord>) {
        if let Some(n) = self.next_read {
            if rec.offset < n {
                return;
            }
        }
        self.next_read = Some(rec.offset + 1);
        self.pending.push_back(rec);
    }

    /// Receives records until the batch is full or `max_wait` passed since the
    /// first one, or a parked key is due. Returns false when the lane must stop.
    async fn fill(&mut self) -> bool {
        let max = self.shared.settings.max_batch;
        let mut deadline: Option<tokio::time::Instant> =
            (!self.pending.is_empty()).then(|| tokio::time::Instant::now() + self.shared.settings.max_wait);
        let parked_due = self.parked_check.map(tokio::time::Instant::from_std);
        while self.pending.len() < max {
            let received = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return false,
                m = self.rx.recv() => m,
                _ = sleep_until_opt(deadline) => break,
                _ = sleep_until_opt(parked_due), if self.pending.is_empty() => break,
            };
            let Some(rec) = received else {
                // The dispatcher dropped the channel: the partition is gone.
                self.stop.cancelled().await;
                return false;
            };
            self.accept(rec);
            // Ask for a refill once the channel is half empty, once per pause.
            if self.paused.load(Ordering::Acquire)
                && self.rx.len() <= channel_capacity(self.shared.settings.max_batch) / 2
                && !self.refill_asked.swap(true, Ordering::AcqRel)
            {
                self.shared.refill(&self.topic, self.partition);
            }
            if deadline.is_none() {
                deadline = Some(tokio::time::Instant::now() + self.shared.settings.max_wait);
            }
        }
        true
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let s = &self.shared.settings;
        let exp = s.backoff_base.saturating_mul(1u32 << attempt.min(20)).min(s.backoff_max);
        // Full jitter, never below a tenth of the exponential step.
        let ms = exp.as_millis() as u64;
        Duration::from_millis(ms / 10 + fastrand::u64(0..=ms - ms / 10))
    }

    fn retry_delay(&self, err: &HandlerError, attempts: u32) -> Duration {
        match err.class() {
            FailureClass::RetryAfter(d) => d,
            _ => self.backoff(attempts.saturating_sub(1)),
        }
    }

    fn prepare(&self, rec: &Arc<RawRecord>) -> Prepared {
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
        match self.shared.handler.decode(id.clone(), rec.clone()) {
            Ok(ev) => Prepared::Good { id, version, ev: Some(ev) },
            Err(err) => Prepared::Bad { id: Some(id), err },
        }
    }

    /// Dead-letters a record in the caller's transaction: indexed in
    /// `oncely.dead_letters` and published to the dead-letter topic through
    /// the outbox, so it is durable before the offset moves past it.
    async fn dead_letter(&self, conn: &mut PgConnection, dl: DeadLetter<'_>) -> Result<()> {
        failure::dead_letter(conn, &self.shared.name, &dl).await?;
        tracing::error!(
            offset = dl.record.offset,
            event_id = dl.event_id.unwrap_or(""),
            reason = dl.reason,
            attempts = dl.attempts,
            error = dl.error,
            "Dead-lettered an event."
        );
        Ok(())
    }

    /// Opens a transaction and the handler context around it.
    async fn begin(&self) -> Result<Cx> {
        let s = &self.shared;
        Ok(Cx {
            tx: s.pool.begin().await?,
            consumer: s.name.clone(),
            event_id: None,
            replay: s.settings.replay,
            state: s.state.clone(),
            effects: Vec::new(),
            registry: s.registry.clone(),
            record: None,
        })
    }

    /// Runs one batch transaction. `careful` runs each event in a savepoint, so
    /// one failing event does not undo the others.
    async fn process(&self, batch: &[Arc<RawRecord>], careful: bool) -> Result<Outcome> {
        let s = &self.shared;
        let consumer = &*s.name;
        let mut prepared: Vec<Prepared> = batch.iter().map(|r| self.prepare(r)).collect();
        let keys: Vec<String> = batch.iter().map(|r| r.key_str()).collect();
        // Events of already-parked keys are not claimed: they queue behind.
        let (ids, offsets): (Vec<String>, Vec<i64>) = prepared
            .iter()
            .zip(batch)
            .zip(&keys)
            .filter_map(|((p, r), key)| match p {
                Prepared::Good { id, .. } if !self.parked.contains(key) => Some((id.0.clone(), r.offset)),
                _ => None,
            })
            .unzip();

        let mut cx = self.begin().await?;
        let claimed = store::claim(cx.db(), consumer, &self.topic, self.partition, &ids, &offsets).await?;
        let mut first_seen: HashSet<String> = HashSet::new();
        let mut newly_parked: HashSet<String> = HashSet::new();
        let mut unclaim: Vec<String> = Vec::new();
        // Logged and counted only once the transaction commits.
        let mut skipped: Vec<(i64, EventId, Option<i64>, bool, String)> = Vec::new();
        let (mut processed, mut dead, mut parked) = (0u64, 0u64, 0u64);
        let mut batch_evs: Vec<Box<dyn Any + Send>> = Vec::new();

        for i in 0..batch.len() {
            let rec = &batch[i];
            let key = &keys[i];
            let (id, version, ev) = match &mut prepared[i] {
                Prepared::Bad { id, err } => {
                    let msg = err.to_string();
                    let dl = DeadLetter::decode(rec, id.as_ref(), err.reason(), &msg);
                    self.dead_letter(cx.db(), dl).await?;
                    dead += 1;
                    continue;
                }
                Prepared::Good { id, version, ev } => (id.clone(), *version, ev.take()),
            };
            if self.parked.contains(key) || newly_parked.contains(key) {
                if claimed.contains(id.as_str()) && first_seen.insert(id.0.clone()) {
                    unclaim.push(id.0.clone());
                }
                let p = parked_store::NewParked {
                    consumer,
                    record: rec,
                    entity_key: key,
                    event_id: Some(id.as_str()),
                    attempts: 0,
                    retry_in: None,
                    error: None,
                    error_class: None,
                };
                parked_store::park(cx.db(), &p).await?;
                parked += 1;
                continue;
            }
            if !claimed.contains(id.as_str()) || !first_seen.insert(id.0.clone()) {
                skipped.push((rec.offset, id, None, true, String::new()));
                continue;
            }
            if !careful && s.handler.is_batch() {
                // Batch handler: apply the version guard now, call once below.
                if !self.newer_version(&mut cx, version, key).await? {
                    skipped.push((rec.offset, id, version, false, key.clone()));
                    continue;
                }
                if let Some(ev) = ev {
                    batch_evs.push(ev);
                }
                continue;
            }
            if careful {
                store::savepoint(cx.db(), Savepoint::Begin).await?;
            }
            let span = tracing::debug_span!("event", event_id = %id, key = %key, offset = rec.offset);
            let outcome = match ev {
                Some(ev) => self.apply(&mut cx, &id, version, ev, rec, key).instrument(span).await,
                None => Err(HandlerError::reject("internal: event decoded twice")),
            };
            match outcome {
                Ok(applied) => {
                    if careful {
                        store::savepoint(cx.db(), Savepoint::Release).await?;
                    }
                    match applied {
                        Applied::Done => processed += 1,
                        Applied::Stale => skipped.push((rec.offset, id, version, false, key.clone())),
                    }
                }
                Err(_) if !careful => {
                    cx.tx.rollback().await?;
                    return Ok(Outcome::NeedCareful);
                }
                Err(err) => {
                    store::savepoint(cx.db(), Savepoint::Rollback).await?;
                    unclaim.push(id.0.clone());
                    let msg = err.to_string();
                    let class = err.class_name();
                    if err.class() == FailureClass::Reject || s.settings.max_attempts <= 1 {
                        let reason = if err.class() == FailureClass::Reject { "rejected" } else { "max-attempts" };
                        let dl = DeadLetter::handler(rec, &id, reason, &msg, &class, 1);
                        self.dead_letter(cx.db(), dl).await?;
                        dead += 1;
                        continue;
                    }
                    let retry_in = self.retry_delay(&err, 1);
                    tracing::warn!(offset = rec.offset, event_id = %id, key = %key, retry_in = ?retry_in, error = %msg, "Handler failed; parked the event and its key.");
                    let p = parked_store::NewParked {
                        consumer,
                        record: rec,
                        entity_key: key,
                        event_id: Some(id.as_str()),
                        attempts: 1,
                        retry_in: Some(retry_in),
                        error: Some(&msg),
                        error_class: Some(&class),
                    };
                    parked_store::park(cx.db(), &p).await?;
                    newly_parked.insert(key.clone());
                    parked += 1;
                }
            }
        }
        if !batch_evs.is_empty() {
            let n = batch_evs.len() as u64;
            match self.call_handler(&mut cx, None, batch_evs).await {
                Ok(()) => processed += n,
                Err(_) => {
                    cx.tx.rollback().await?;
                    return Ok(Outcome::NeedCareful);
                }
            }
        }
        if !unclaim.is_empty() {
            store::unclaim(cx.db(), consumer, &unclaim).await?;
        }

        let end = batch.last().map_or(0, |r| r.offset + 1);
        let next = self.db_next.map_or(end, |d| d.max(end));
        let Cx { mut tx, .. } = cx;
        if !store::advance_offset(&mut tx, consumer, &self.topic, self.partition, self.db_next, next).await? {
            tx.rollback().await?;
            return Ok(Outcome::Fenced);
        }
        tx.commit().await?;
        if processed > 0 && !s.registry.is_empty() {
            s.effects_wake.notify_one();
        }

        let mut duplicates = 0u64;
        for (offset, id, version, dup, key) in &skipped {
            if *dup {
                duplicates += 1;
                self.duplicate_skipped(*offset, id);
            } else {
                events::StaleSkipped {
                    consumer,
                    topic: &self.topic,
                    offset: *offset,
                    event_id: id.as_str(),
                    entity: key,
                    version: version.unwrap_or_default(),
                }
                .emit();
            }
        }
        count_events(consumer, &self.topic, "processed", processed);
        count_events(consumer, &self.topic, "dead", dead);
        count_events(consumer, &self.topic, "parked", parked);
        if let Some(spike) = &s.spike {
            if let Some(reason) = spike.record_at(batch.len() as u64, duplicates, Instant::now()) {
                events::GuardTripped { consumer, guard: "spike", detail: reason }.emit();
            }
        }
        Ok(Outcome::Committed { next, end, newly_parked })
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
        for key in due {
            if self.stop.is_cancelled() {
                return false;
            }
            match self.drain_key(&key).await {
                Ok(true) => {}
                Ok(false) => {
                    events::BatchFenced {
                        consumer: &s.name,
                        topic: &self.topic,
                        partition: self.partition,
                        expected: self.db_next,
                    }
                    .emit();
                    return self.idle_until_revoked().await;
                }
                Err(e) => tracing::warn!(key = %key, error = %e, "Retrying a parked key failed and rolled back."),
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
    /// order, in one transaction. Returns false if the lane lost the partition.
    async fn drain_key(&mut self, key: &str) -> Result<bool> {
        let s = self.shared.clone();
        let consumer = &*s.name;
        let Some(expected) = self.db_next else { return Ok(true) };
        let mut cx = self.begin().await?;
        if !parked_store::still_owner(cx.db(), consumer, &self.topic, self.partition, expected).await? {
            cx.tx.rollback().await?;
            return Ok(false);
        }
        let rows = parked_store::key_queue(cx.db(), consumer, &self.topic, self.partition, key).await?;
        let (mut processed, mut dead) = (0u64, 0u64);
        let mut duplicates: Vec<(i64, EventId)> = Vec::new();
        for row in rows {
            let rec = Arc::new(row.record.clone());
            let (id, version, ev) = match self.prepare(&rec) {
                Prepared::Bad { id, err } => {
                    let msg = err.to_string();
                    self.dead_letter(cx.db(), DeadLetter::decode(&rec, id.as_ref(), err.reason(), &msg)).await?;
                    parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                    dead += 1;
                    continue;
                }
                Prepared::Good { id, version, ev } => (id, version, ev),
            };
            let claimed = store::claim(
                cx.db(),
                consumer,
                &self.topic,
                self.partition,
                std::slice::from_ref(&id.0),
                &[rec.offset],
            )
            .await?;
            if !claimed.contains(id.as_str()) {
                parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                duplicates.push((rec.offset, id));
                continue;
            }
            store::savepoint(cx.db(), Savepoint::Begin).await?;
            let outcome = match ev {
                Some(ev) => self.apply(&mut cx, &id, version, ev, &rec, key).await,
                None => Err(HandlerError::reject("internal: event decoded twice")),
            };
            match outcome {
                Ok(_) => {
                    store::savepoint(cx.db(), Savepoint::Release).await?;
                    parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                    processed += 1;
                }
                Err(err) => {
                    store::savepoint(cx.db(), Savepoint::Rollback).await?;
                    store::unclaim(cx.db(), consumer, std::slice::from_ref(&id.0)).await?;
                    let attempts = (row.attempts.max(0) as u32) + 1;
                    let msg = err.to_string();
                    let class = err.class_name();
                    if err.class() == FailureClass::Reject || attempts >= s.settings.max_attempts {
                        let reason = if err.class() == FailureClass::Reject { "rejected" } else { "max-attempts" };
                        let dl = DeadLetter::handler(&rec, &id, reason, &msg, &class, attempts as i32);
                        self.dead_letter(cx.db(), dl).await?;
                        parked_store::unpark(cx.db(), consumer, &self.topic, self.partition, rec.offset).await?;
                        dead += 1;
                        match s.settings.dead_key_policy {
                            DeadKeyPolicy::Continue => continue,
                            DeadKeyPolicy::Hold => {
                                let held =
                                    parked_store::hold_key(cx.db(), consumer, &self.topic, self.partition, key).await?;
                                tracing::error!(key, held, "Holding the events behind a dead-lettered event until an operator releases the key (`oncely dlq release`).");
                                break;
                            }
                        }
                    }
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
                    tracing::warn!(key, offset = rec.offset, event_id = %id, attempts, retry_in = ?retry_in, error = %msg, "A parked key failed again.");
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
        let Cx { tx, .. } = cx;
        tx.commit().await?;
        if processed > 0 && !s.registry.is_empty() {
            s.effects_wake.notify_one();
        }
        for (offset, id) in &duplicates {
            self.duplicate_skipped(*offset, id);
        }
        count_events(consumer, &self.topic, "processed", processed);
        count_events(consumer, &self.topic, "dead", dead);
        if parked_store::key_queue_len(&s.pool, consumer, &self.topic, self.partition, key).await? == 0 {
            self.parked.remove(key);
            tracing::info!(key, "A parked key drained; its events flow again.");
        }
        Ok(true)
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
        key: &str,
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
    async fn newer_version(&self, cx: &mut Cx, version: Option<i64>, key: &str) -> Result<bool> {
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
        let fut = self.shared.handler.call(evs, cx);
        match AssertUnwindSafe(fut).catch_unwind().await {
            Ok(Ok(())) => {
                if !cx.effects.is_empty() {
                    let intents = std::mem::take(&mut cx.effects);
                    crate::store::effects::record(cx.db(), &intents).await?;
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e),
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

    fn duplicate_skipped(&self, offset: i64, id: &EventId) {
        events::DuplicateSkipped {
            consumer: &self.shared.name,
            topic: &self.topic,
            partition: self.partition,
            offset,
            event_id: id.as_str(),
        }
        .emit();
    }

    fn commit_kafka(&mut self) {
        let pos = self.position.load(Ordering::Acquire);
        if pos < 0 {
            return;
        }
        if let Some(c) = self.shared.consumer.get().and_then(std::sync::Weak::upgrade) {
            let mut tpl = TopicPartitionList::new();
            let mut e = tpl.add_partition(&self.topic, self.partition);
            if e.set_offset(Offset::Offset(pos)).is_ok() {
                e.set_metadata(COMMIT_METADATA);
                if let Err(err) = c.commit(&tpl, CommitMode::Async) {
                    tracing::debug!(error = %err, "Async Kafka commit failed (the database offset is authoritative).");
                }
                if let Some((_, high)) = crate::admin::kafka::cached_watermarks(c.client(), &self.topic, self.partition)
                {
                    crate::metrics::set(
                        "oncely_lag_records",
                        "Records between the lane's position and the partition's high watermark (as last fetched).",
                        &[
                            ("consumer", &self.shared.name),
                            ("topic", &self.topic),
                            ("partition", &self.partition.to_string()),
                        ],
                        (high - pos).max(0) as f64,
                    );
                }
            }
        }
    }

    /// After a lost fence another member owns the partition (this one is a
    /// zombie that has not noticed yet): stop processing and wait for the
    /// revoke. Returns false (the lane stops).
    async fn idle_until_revoked(&mut self) -> bool {
        tracing::error!(
            "The partition's database offset moved under this lane: another member owns it. Idling until the rebalance revokes it."
        );
        self.pending.clear();
        self.stop.cancelled().await;
        false
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
