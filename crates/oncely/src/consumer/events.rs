//! Notable runtime events: each is one small struct that both logs and counts,
//! so a log line and its metric can never disagree.

use crate::metrics;

const EVENTS: &str = "oncely_events_total";
const EVENTS_HELP: &str = "Events by outcome: processed, duplicate, stale, parked, dead.";

/// Counts `n` events of `outcome` for a consumer.
pub(crate) fn count_events(consumer: &str, topic: &str, outcome: &'static str, n: u64) {
    if n > 0 {
        metrics::inc(EVENTS, EVENTS_HELP, &[("consumer", consumer), ("topic", topic), ("outcome", outcome)], n);
    }
}

/// The number of events of `outcome` counted for a consumer and topic so far.
pub fn events_counted(consumer: &str, topic: &str, outcome: &'static str) -> u64 {
    metrics::counter(EVENTS, &[("consumer", consumer), ("topic", topic), ("outcome", outcome)])
}

/// A duplicate delivery was skipped because the inbox already holds its identity.
pub(crate) struct DuplicateSkipped<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub event_id: &'a str,
}

impl DuplicateSkipped<'_> {
    pub fn emit(self) {
        tracing::debug!(
            consumer = self.consumer,
            topic = self.topic,
            partition = self.partition,
            offset = self.offset,
            event_id = self.event_id,
            "Skipped a duplicate delivery: the inbox already holds this event."
        );
        count_events(self.consumer, self.topic, "duplicate", 1);
    }
}

/// A stale event (older entity version than applied) was skipped by the version guard.
pub(crate) struct StaleSkipped<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub offset: i64,
    pub event_id: &'a str,
    pub entity: &'a str,
    pub version: i64,
}

impl StaleSkipped<'_> {
    pub fn emit(self) {
        tracing::debug!(
            consumer = self.consumer,
            topic = self.topic,
            offset = self.offset,
            event_id = self.event_id,
            entity = self.entity,
            version = self.version,
            "Skipped a stale event: a newer version of the entity is already applied."
        );
        count_events(self.consumer, self.topic, "stale", 1);
    }
}

/// Kafka's committed offset differs from the database's at assignment.
pub(crate) struct PartitionRewound<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub kafka_offset: i64,
    pub db_offset: i64,
    pub kind: &'static str,
    pub action: &'static str,
}

impl PartitionRewound<'_> {
    pub fn emit(self) {
        tracing::warn!(
            consumer = self.consumer,
            topic = self.topic,
            partition = self.partition,
            kafka_offset = self.kafka_offset,
            db_offset = self.db_offset,
            kind = self.kind,
            action = self.action,
            "Kafka's committed offset differs from oncely's: someone moved the group's offsets."
        );
        let name = if self.kind == "rewind" { "oncely_rewinds_total" } else { "oncely_skip_forwards_total" };
        metrics::inc(
            name,
            "Partitions found moved by someone else at assignment (Kafka vs. database offset).",
            &[("consumer", self.consumer), ("topic", self.topic), ("action", self.action)],
            1,
        );
    }
}

/// The number of rewinds detected for a consumer and topic so far.
pub fn rewinds_counted(consumer: &str, topic: &str, action: &str) -> u64 {
    metrics::counter("oncely_rewinds_total", &[("consumer", consumer), ("topic", topic), ("action", action)])
}

/// A batch lost the offset fence: another member owns the partition now.
pub(crate) struct BatchFenced<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub expected: Option<i64>,
}

impl BatchFenced<'_> {
    pub fn emit(self) {
        tracing::warn!(
            consumer = self.consumer,
            topic = self.topic,
            partition = self.partition,
            expected = self.expected,
            "Rolled back a batch: the partition's database offset moved (another member owns it now)."
        );
        metrics::inc(
            "oncely_fenced_batches_total",
            "Batches rolled back by the offset fence (zombie consumer).",
            &[("consumer", self.consumer), ("topic", self.topic)],
            1,
        );
    }
}

/// The spike guard or the rate limit intervened.
pub(crate) struct GuardTripped<'a> {
    pub consumer: &'a str,
    pub guard: &'static str,
    pub detail: String,
}

impl GuardTripped<'_> {
    pub fn emit(self) {
        tracing::error!(
            consumer = self.consumer,
            guard = self.guard,
            detail = %self.detail,
            "Guard tripped: consumption paused."
        );
        metrics::inc(
            "oncely_guard_trips_total",
            "Times a guard paused consumption.",
            &[("consumer", self.consumer), ("guard", self.guard)],
            1,
        );
    }
}

/// The number of guard trips of `guard` counted for a consumer.
pub fn guard_trips_counted(consumer: &str, guard: &'static str) -> u64 {
    metrics::counter("oncely_guard_trips_total", &[("consumer", consumer), ("guard", guard)])
}
