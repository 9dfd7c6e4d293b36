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
pub fn events_counted(consumer: &str, topic: &str, outcome: &str) -> u64 {
    metrics::counter(EVENTS, &[("consumer", consumer), ("topic", topic), ("outcome", outcome)])
}

/// Duplicate deliveries were skipped because the inbox already holds their
/// identities: logged one by one (at debug), counted once per batch.
pub(crate) struct DuplicatesSkipped<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    /// `(offset, identity)` of each.
    pub records: &'a [(i64, &'a crate::envelope::EventId)],
}

impl DuplicatesSkipped<'_> {
    pub fn emit(self) {
        if self.records.is_empty() {
            return;
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            for (offset, id) in self.records {
                tracing::debug!(
                    consumer = self.consumer,
                    topic = self.topic,
                    partition = self.partition,
                    offset,
                    event_id = %id,
                    "Skipped a duplicate delivery: the inbox already holds this event."
                );
            }
        }
        count_events(self.consumer, self.topic, "duplicate", self.records.len() as u64);
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

/// An event of a CloudEvents type no route takes was skipped.
pub(crate) struct UnroutedSkipped<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub offset: i64,
    pub event_id: &'a crate::envelope::EventId,
    pub ty: &'a str,
}

impl UnroutedSkipped<'_> {
    pub fn emit(self) {
        tracing::debug!(
            consumer = self.consumer,
            topic = self.topic,
            offset = self.offset,
            event_id = %self.event_id,
            ce_type = self.ty,
            "Skipped an event of a type no route takes."
        );
        count_events(self.consumer, self.topic, "unrouted", 1);
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

/// A batch lost the offset fence: another member took the partition over
/// (`zombie`), or its position moved under the lane.
pub(crate) struct BatchFenced<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub expected: Option<i64>,
    pub found: Option<i64>,
    pub zombie: bool,
}

impl BatchFenced<'_> {
    pub fn emit(self) {
        if self.zombie {
            tracing::warn!(
                consumer = self.consumer,
                topic = self.topic,
                partition = self.partition,
                expected = self.expected,
                "Rolled back a batch: another member took the partition over."
            );
        } else {
            tracing::warn!(
                consumer = self.consumer,
                topic = self.topic,
                partition = self.partition,
                expected = self.expected,
                found = self.found,
                "Rolled back a batch: the partition's database offset moved under this lane; going on from the database's position."
            );
        }
        metrics::inc(
            "oncely_fenced_batches_total",
            "Batches rolled back by the offset fence (zombie member, or an offset moved under a lane).",
            &[
                ("consumer", self.consumer),
                ("topic", self.topic),
                ("reason", if self.zombie { "owner" } else { "moved" }),
            ],
            1,
        );
    }
}

/// The number of fenced batches of a consumer and topic (`reason`: `owner` or `moved`).
pub fn fenced_counted(consumer: &str, topic: &str, reason: &str) -> u64 {
    metrics::counter("oncely_fenced_batches_total", &[("consumer", consumer), ("topic", topic), ("reason", reason)])
}

/// A new owner ended the database session of a previous owner whose batch
/// held the partition past `zombie_timeout`.
pub(crate) struct ZombieSessionEnded<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub pid: i32,
    pub state: &'a str,
    pub held_for: std::time::Duration,
    /// False when PostgreSQL refused (no privilege to signal that backend).
    pub ended: bool,
}

impl ZombieSessionEnded<'_> {
    pub fn emit(self) {
        if self.ended {
            tracing::warn!(
                consumer = self.consumer,
                topic = self.topic,
                partition = self.partition,
                pid = self.pid,
                state = self.state,
                held_for = ?self.held_for,
                "Ended the database session of a previous owner of this partition (a zombie member): its open batch rolls back."
            );
        } else {
            tracing::error!(
                consumer = self.consumer,
                topic = self.topic,
                partition = self.partition,
                pid = self.pid,
                held_for = ?self.held_for,
                "A previous owner's batch holds this partition and its session cannot be ended (members must connect as the same role, or one with pg_signal_backend): waiting."
            );
        }
        metrics::inc(
            "oncely_zombie_sessions_ended_total",
            "Database sessions of zombie members ended by the new owner of a partition.",
            &[("consumer", self.consumer), ("topic", self.topic)],
            u64::from(self.ended),
        );
    }
}

/// The number of zombie sessions a consumer's lanes ended.
pub fn zombie_sessions_ended(consumer: &str, topic: &str) -> u64 {
    metrics::counter("oncely_zombie_sessions_ended_total", &[("consumer", consumer), ("topic", topic)])
}

/// The lane's position is outside the partition's log: it halts.
pub(crate) struct PartitionOutOfRange<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub position: Option<i64>,
    pub log_start: Option<i64>,
    pub log_end: Option<i64>,
    pub error: &'a dyn std::fmt::Display,
}

impl PartitionOutOfRange<'_> {
    pub fn emit(self) {
        let why = match (self.position, self.log_start, self.log_end) {
            (Some(p), Some(s), _) if p < s => {
                "records the consumer had not processed were deleted (retention or kafka-delete-records)"
            }
            (Some(p), _, Some(e)) if p > e => {
                "the log ends before the consumer's position (the topic was recreated or truncated)"
            }
            _ => "the position is outside the partition's log",
        };
        tracing::error!(
            consumer = self.consumer,
            topic = self.topic,
            partition = self.partition,
            position = self.position,
            log_start = self.log_start,
            log_end = self.log_end,
            error = %self.error,
            "Partition halted: {why}. Nothing is skipped silently: move the group with `oncely offsets reset` (the consumer follows it) once you know what to do."
        );
        metrics::inc(
            "oncely_partitions_out_of_range_total",
            "Partitions halted because the consumer's position is outside the log.",
            &[("consumer", self.consumer), ("topic", self.topic)],
            1,
        );
    }
}

/// The number of partitions a consumer halted as out of range.
pub fn out_of_range_counted(consumer: &str, topic: &str) -> u64 {
    metrics::counter("oncely_partitions_out_of_range_total", &[("consumer", consumer), ("topic", topic)])
}

/// A record was dead-lettered.
pub(crate) struct DeadLettered<'a> {
    pub consumer: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub event_id: &'a str,
    pub reason: &'a str,
    pub attempts: i32,
    pub error: &'a str,
}

impl DeadLettered<'_> {
    pub fn emit(self) {
        tracing::error!(
            consumer = self.consumer,
            topic = self.topic,
            partition = self.partition,
            offset = self.offset,
            event_id = self.event_id,
            reason = self.reason,
            attempts = self.attempts,
            error = self.error,
            "Dead-lettered an event."
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
