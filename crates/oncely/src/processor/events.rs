//! The processor's notable events: each is one small struct that both logs
//! and counts (as [`crate::consumer::events`] does for the consumer).
//!
//! Events are counted in `oncely_events_total{consumer=<processor>}` with the
//! consumer's outcomes (`processed`, `dead`) once their transaction commits;
//! transactions in `oncely_processor_transactions_total{outcome}`.

use crate::consumer::events::count_events;
use crate::metrics;

const TXNS: &str = "oncely_processor_transactions_total";
const TXNS_HELP: &str = "Processor transactions by outcome: committed, aborted.";
const FENCED: &str = "oncely_processor_fenced_total";

/// The number of processor transactions of `outcome` (`committed`, `aborted`).
pub fn transactions_counted(processor: &str, outcome: &'static str) -> u64 {
    metrics::counter(TXNS, &[("processor", processor), ("outcome", outcome)])
}

/// Times this processor's producer was fenced.
pub fn fenced_counted(processor: &str) -> u64 {
    metrics::counter(FENCED, &[("processor", processor)])
}

/// A transaction committed: its outputs are visible to `read_committed`
/// readers and its input offsets are committed, together.
pub(crate) struct TransactionCommitted<'a> {
    pub processor: &'a str,
    pub inputs: u64,
    pub outputs: u64,
    pub dead: u64,
    pub seconds: f64,
    /// `(topic, processed, dead)` per input topic.
    pub per_topic: &'a [(String, u64, u64)],
}

impl TransactionCommitted<'_> {
    pub fn emit(self) {
        tracing::debug!(
            processor = self.processor,
            inputs = self.inputs,
            outputs = self.outputs,
            dead = self.dead,
            commit_ms = self.seconds * 1000.0,
            "Committed a transaction: its outputs and input offsets are visible together."
        );
        metrics::inc(TXNS, TXNS_HELP, &[("processor", self.processor), ("outcome", "committed")], 1);
        metrics::observe(
            "oncely_processor_commit_seconds",
            "Time to commit a processor transaction (offsets sent, records flushed, commit).",
            &[("processor", self.processor)],
            self.seconds,
        );
        for (topic, processed, dead) in self.per_topic {
            count_events(self.processor, topic, "processed", *processed);
            count_events(self.processor, topic, "dead", *dead);
        }
    }
}

/// A transaction was aborted: none of its outputs or offsets count; its
/// inputs are read again from the last committed offsets.
pub(crate) struct TransactionAborted<'a> {
    pub processor: &'a str,
    pub transactional_id: &'a str,
    pub inputs: u64,
    pub reason: &'a str,
}

impl TransactionAborted<'_> {
    pub fn emit(self) {
        tracing::warn!(
            processor = self.processor,
            transactional_id = self.transactional_id,
            inputs = self.inputs,
            reason = self.reason,
            "Aborted a transaction; its input records are read again from the last committed offsets."
        );
        metrics::inc(TXNS, TXNS_HELP, &[("processor", self.processor), ("outcome", "aborted")], 1);
    }
}

/// The producer was fenced: another producer initialised the same
/// `transactional.id` (or the coordinator bumped its epoch). Logged once per
/// fencing; the producer is dropped and its transaction never retried.
pub(crate) struct ProducerFenced<'a> {
    pub processor: &'a str,
    pub transactional_id: &'a str,
    pub detail: &'a str,
    pub action: &'static str,
}

impl ProducerFenced<'_> {
    pub fn emit(self) {
        tracing::error!(
            processor = self.processor,
            transactional_id = self.transactional_id,
            detail = self.detail,
            action = self.action,
            "Producer fenced: another instance started with the same transactional.id, so this older one was fenced; \
             its open transaction is aborted by the broker and never retried here. Give every instance its own \
             instance id (ProcessorBuilder::instance_id or ONCELY_INSTANCE_ID)."
        );
        metrics::inc(FENCED, "Times a processor's producer was fenced.", &[("processor", self.processor)], 1);
    }
}

/// An input record was dead-lettered; logged once the transaction that
/// writes the dead letter and commits the record's offset has committed.
#[derive(Debug, Clone)]
pub(crate) struct DeadLettered {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: String,
    pub reason: String,
    pub attempts: i32,
    pub error: String,
}

impl DeadLettered {
    pub fn emit(&self, processor: &str) {
        tracing::error!(
            processor,
            topic = %self.topic,
            partition = self.partition,
            offset = self.offset,
            event_id = %self.event_id,
            reason = %self.reason,
            attempts = self.attempts,
            error = %self.error,
            "Dead-lettered an input record, in the transaction that committed its offset."
        );
    }
}
