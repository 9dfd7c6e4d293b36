//! A lane: the ordered processing of one assigned partition.

use std::any::Any;
use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::events::{self, count_events};
use super::handler::{Cx, FailureClass, HandlerError, PanicError};
use super::{Shared, StartDecision, COMMIT_METADATA};
use crate::envelope::{DecodeError, EventId, RawRecord};
use crate::error::Result;
use crate::store::{self, NewDeadLetter, Savepoint};

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
}

pub(crate) fn spawn(shared: Arc<Shared>, topic: String, partition: i32, start: StartDecision) -> LaneHandle {
    let stop = shared.shutdown.child_token();
    let position = Arc::new(AtomicI64::new(-1));
    let (tx, rx) = mpsc::channel(shared.settings.max_batch * 2);
    let paused = Arc::new(AtomicBool::new(false));
    let lane = Lane {
        shared: shared.clone(),
        topic: topic.clone(),
        partition,
        rx,
        paused: paused.clone(),
        stop: stop.clone(),
        db_next: start.db_next,
        next_read: start.seek,
        halted: start.halt,
        pending: VecDeque::new(),
        head_attempts: 0,
        retry_at: None,
        position: position.clone(),
    };
    let span = tracing::info_span!("lane", consumer = &*shared.name, topic = %topic, partition);
    let join = shared.rt.spawn(lane.run().instrument(span));
    LaneHandle { topic, partition, stop, join, position, tx, paused }
}

struct Lane {
    shared: Arc<Shared>,
    topic: String,
    partition: i32,
    rx: mpsc::Receiver<Arc<RawRecord>>,
    paused: Arc<AtomicBool>,
    stop: CancellationToken,
    /// The database offset the next batch must find (the fence).
    db_next: Option<i64>,
    /// The next offset expected from Kafka; records below it are leftovers.
    next_read: Option<i64>,
    halted: bool,
    /// Records received and not yet committed, in offset order.
    pending: VecDeque<Arc<RawRecord>>,
    /// Failed attempts of the record at the head of `pending`.
    head_attempts: u32,
    retry_at: Option<Instant>,
    position: Arc<AtomicI64>,
}

/// What became of a batch.
enum Outcome {
    /// The first `n` records are done (committed); the rest stay pending.
    /// `advanced` is the new database offset and the Kafka position.
    Committed { n: usize, retry_after: Option<Duration>, advanced: Option<(i64, i64)> },
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
            if !self.fill().await {
                return;
            }
            if self.pending.is_empty() {
                continue;
            }
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
                Ok(Outcome::Committed { n, retry_after, advanced }) => {
                    if let Some((next, end)) = advanced {
                        self.db_next = Some(next);
                        self.position.store(end, Ordering::Release);
                    }
                    if n > 0 {
                        self.pending.drain(..n);
                        self.head_attempts = 0;
                        self.commit_kafka();
                    }
                    if let Some(d) = retry_after {
                        self.head_attempts += 1;
                        self.retry_at = Some(Instant::now() + d);
                    }
                }
                Ok(Outcome::Fenced) => {
                    events::BatchFenced {
                        consumer: &self.shared.name,
                        topic: &self.topic,
                        partition: self.partition,
                        expected: self.db_next,
                    }
                    .emit();
                    if !self.resync().await {
                        return;
                    }
                }
                Ok(Outcome::NeedCareful) => {}
                Err(e) => {
                    // Infrastructure failure (database down, connection lost):
                    // the transaction rolled back; try the same batch again.
                    let d = self.backoff(self.head_attempts.min(6));
                    tracing::warn!(error = %e, retry_in = ?d, "Batch failed and rolled back; retrying.");
                    self.retry_at = Some(Instant::now() + d);
                }
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
    /// first one. Returns false when the lane must stop.
    async fn fill(&mut self) -> bool {
        let max = self.shared.settings.max_batch;
        let mut deadline: Option<tokio::time::Instant> =
            (!self.pending.is_empty()).then(|| tokio::time::Instant::now() + self.shared.settings.max_wait);
        while self.pending.len() < max {
            let received = tokio::select! {
                biased;
                _ = self.stop.cancelled() => return false,
                m = self.rx.recv() => m,
                _ = sleep_until_opt(deadline) => break,
            };
            let Some(rec) = received else {
                // The dispatcher dropped the channel: the partition is gone.
                self.stop.cancelled().await;
                return false;
            };
            self.accept(rec);
            if self.paused.load(Ordering::Acquire) {
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

    /// Runs one batch transaction. `careful` runs each event in a savepoint, so
    /// one failing event does not undo the others.
    async fn process(&self, batch: &[Arc<RawRecord>], careful: bool) -> Result<Outcome> {
        let s = &self.shared;
        let consumer = &*s.name;
        let mut prepared: Vec<Prepared> = batch.iter().map(|r| self.prepare(r)).collect();
        let (ids, offsets): (Vec<String>, Vec<i64>) = prepared
            .iter()
            .zip(batch)
            .filter_map(|(p, r)| match p {
                Prepared::Good { id, .. } => Some((id.0.clone(), r.offset)),
                Prepared::Bad { .. } => None,
            })
            .unzip();

        let tx = s.pool.begin().await?;
        let mut cx =
            Cx { tx, consumer: s.name.clone(), event_id: None, replay: s.settings.replay, state: s.state.clone() };
        let claimed = store::claim(cx.db(), consumer, &self.topic, self.partition, &ids, &offsets).await?;
        let mut first_seen: HashSet<String> = HashSet::new();
        // Logged and counted only once the transaction commits.
        let mut skipped: Vec<(i64, EventId, Option<i64>, bool, String)> = Vec::new();
        let (mut processed, mut dead) = (0u64, 0u64);
        let mut done = batch.len();
        let mut retry_after = None;

        for i in 0..batch.len() {
            let rec = &batch[i];
            let (id, version, ev) = match &mut prepared[i] {
                Prepared::Bad { id, err } => {
                    tracing::warn!(offset = rec.offset, reason = err.reason(), error = %err, "Dead-lettering a record that cannot be processed.");
                    store::insert_dead_letter(
                        cx.db(),
                        &NewDeadLetter {
                            consumer,
                            record: rec,
                            event_id: id.as_ref().map(|i| i.as_str()),
                            reason: err.reason(),
                            error: &err.to_string(),
                            error_class: "oncely::DecodeError",
                            attempts: 1,
                        },
                    )
                    .await?;
                    dead += 1;
                    continue;
                }
                Prepared::Good { id, version, ev } => (id.clone(), *version, ev.take()),
            };
            if !claimed.contains(id.as_str()) || !first_seen.insert(id.0.clone()) {
                skipped.push((rec.offset, id, None, true, String::new()));
                continue;
            }
            if careful {
                store::savepoint(cx.db(), Savepoint::Begin).await?;
            }
            let span = tracing::debug_span!("event", event_id = %id, key = %rec.key_str(), offset = rec.offset);
            let outcome = match ev {
                Some(ev) => self.apply(&mut cx, &id, version, ev, rec).instrument(span).await,
                None => Err(HandlerError::reject("internal: event decoded twice")),
            };
            match outcome {
                Ok(true) => {
                    if careful {
                        store::savepoint(cx.db(), Savepoint::Release).await?;
                    }
                    processed += 1;
                }
                Ok(false) => {
                    if careful {
                        store::savepoint(cx.db(), Savepoint::Release).await?;
                    }
                    skipped.push((rec.offset, id, version, false, rec.key_str()));
                }
                Err(_) if !careful => {
                    cx.tx.rollback().await?;
                    return Ok(Outcome::NeedCareful);
                }
                Err(err) => {
                    store::savepoint(cx.db(), Savepoint::Rollback).await?;
                    let attempts = if i == 0 { self.head_attempts + 1 } else { 1 };
                    let permanent = err.class() == FailureClass::Reject;
                    if permanent || attempts >= s.settings.max_attempts {
                        tracing::error!(offset = rec.offset, event_id = %id, attempts, error = %err, "Dead-lettering an event whose handler failed.");
                        let reason = if permanent { "rejected" } else { "max-attempts" };
                        store::insert_dead_letter(
                            cx.db(),
                            &NewDeadLetter {
                                consumer,
                                record: rec,
                                event_id: Some(id.as_str()),
                                reason,
                                error: &err.to_string(),
                                error_class: &err.class_name(),
                                attempts: attempts as i32,
                            },
                        )
                        .await?;
                        dead += 1;
                        continue;
                    }
                    // Transient: stop the lane here, keep this event and every
                    // later one pending (order holds), try again after a backoff.
                    let later: Vec<String> = prepared[i..]
                        .iter()
                        .filter_map(|p| match p {
                            Prepared::Good { id, .. } if claimed.contains(id.as_str()) => Some(id.0.clone()),
                            _ => None,
                        })
                        .collect();
                    store::unclaim(cx.db(), consumer, &later).await?;
                    let wait = match err.class() {
                        FailureClass::RetryAfter(d) => d,
                        _ => self.backoff(attempts.saturating_sub(1)),
                    };
                    tracing::warn!(offset = rec.offset, event_id = %id, attempts, retry_in = ?wait, error = %err, "Handler failed; the partition waits and retries this event.");
                    done = i;
                    retry_after = Some(wait);
                    break;
                }
            }
        }

        let end = if done == 0 { batch[0].offset } else { batch[done - 1].offset + 1 };
        let next = self.db_next.map_or(end, |d| d.max(end));
        let Cx { mut tx, .. } = cx;
        let advance = done > 0 || self.db_next.is_none();
        if advance && !store::advance_offset(&mut tx, consumer, &self.topic, self.partition, self.db_next, next).await?
        {
            tx.rollback().await?;
            return Ok(Outcome::Fenced);
        }
        tx.commit().await?;

        let mut duplicates = 0u64;
        for (offset, id, version, dup, key) in &skipped {
            if *dup {
                duplicates += 1;
                events::DuplicateSkipped {
                    consumer,
                    topic: &self.topic,
                    partition: self.partition,
                    offset: *offset,
                    event_id: id.as_str(),
                }
                .emit();
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
        if let Some(spike) = &s.spike {
            if let Some(reason) = spike.record_at(batch.len() as u64, duplicates, Instant::now()) {
                events::GuardTripped { consumer, guard: "spike", detail: reason }.emit();
            }
        }
        Ok(Outcome::Committed { n: done, retry_after, advanced: advance.then_some((next, end)) })
    }

    /// Applies one claimed event: version guard, then the handler (panics are
    /// caught and become failures). Returns false for a stale event.
    async fn apply(
        &self,
        cx: &mut Cx,
        id: &EventId,
        version: Option<i64>,
        ev: Box<dyn Any + Send>,
        rec: &RawRecord,
    ) -> Result<bool, HandlerError> {
        let s = &self.shared;
        if let (Some(v), Some(g)) = (version, &s.version) {
            let et = g.entity_type.as_deref().unwrap_or(&self.topic);
            if !store::apply_version(cx.db(), &s.name, et, &rec.key_str(), v).await? {
                return Ok(false);
            }
        }
        cx.event_id = Some(id.clone());
        let fut = s.handler.call(ev, cx);
        match AssertUnwindSafe(fut).catch_unwind().await {
            Ok(r) => r.map(|()| true),
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
            }
        }
    }

    /// After a lost fence another member owns the partition (this one is a
    /// zombie that has not noticed yet): stop processing and wait for the
    /// revoke. Returns false (the lane stops).
    async fn resync(&mut self) -> bool {
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
