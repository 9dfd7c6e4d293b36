//! Notable relay events: each one small struct that both logs and counts.

use std::time::Duration;

use crate::metrics;

pub(crate) const PENDING: &str = "oncely_outbox_pending";
const PENDING_HELP: &str = "Outbox rows not yet published.";
pub(crate) const PUBLISH_SECONDS: &str = "oncely_outbox_publish_seconds";
const PUBLISH_SECONDS_HELP: &str = "Time from enqueue (the row's created_at) to the broker's acknowledgement.";
pub(crate) const PUBLISHED: &str = "oncely_outbox_published_total";
const PUBLISHED_HELP: &str = "Outbox rows acknowledged by the broker, by relay.";
pub(crate) const FAILURES: &str = "oncely_outbox_publish_failures_total";
const FAILURES_HELP: &str = "Outbox rows whose publish attempt failed (they stay pending), by relay.";
const LANES_OWNED: &str = "oncely_outbox_lanes_owned";
const LANES_OWNED_HELP: &str = "Outbox lanes this relay holds.";
const RETENTION_DELETED: &str = "oncely_outbox_retention_deleted_total";
const RETENTION_DELETED_HELP: &str = "Published outbox rows removed by retention.";

/// Rows acknowledged by the broker (before they are marked published).
pub(crate) struct BatchAcked<'a> {
    pub relay: &'a str,
    pub rows: usize,
    /// Enqueue-to-acknowledgement time of each row.
    pub latencies: &'a [Duration],
}

impl BatchAcked<'_> {
    pub fn emit(self) {
        tracing::debug!(relay = self.relay, rows = self.rows, "Published a batch of outbox rows.");
        metrics::inc(PUBLISHED, PUBLISHED_HELP, &[("relay", self.relay)], self.rows as u64);
        for l in self.latencies {
            metrics::observe(PUBLISH_SECONDS, PUBLISH_SECONDS_HELP, &[], l.as_secs_f64());
        }
    }
}

/// Rows that could not be published this time; they stay pending and are retried.
pub(crate) struct PublishFailed<'a> {
    pub relay: &'a str,
    pub rows: usize,
    pub first_id: i64,
    pub topic: &'a str,
    pub error: &'a str,
    pub retry_in: Duration,
}

impl PublishFailed<'_> {
    pub fn emit(self) {
        tracing::warn!(
            relay = self.relay,
            rows = self.rows,
            first_id = self.first_id,
            topic = self.topic,
            error = self.error,
            retry_in = ?self.retry_in,
            "Could not publish outbox rows; they stay pending and will be retried."
        );
        metrics::inc(FAILURES, FAILURES_HELP, &[("relay", self.relay)], self.rows as u64);
    }
}

/// The set of lanes this relay holds changed.
pub(crate) struct LanesChanged<'a> {
    pub relay: &'a str,
    pub owned: &'a [i32],
    pub acquired: &'a [i32],
    pub released: &'a [i32],
    pub relays: i64,
}

impl LanesChanged<'_> {
    pub fn emit(self) {
        if !self.acquired.is_empty() || !self.released.is_empty() {
            tracing::info!(
                relay = self.relay,
                owned = ?self.owned,
                acquired = ?self.acquired,
                released = ?self.released,
                relays = self.relays,
                "Outbox lanes changed hands."
            );
        }
        metrics::set(LANES_OWNED, LANES_OWNED_HELP, &[("relay", self.relay)], self.owned.len() as f64);
    }
}

/// The relay lost its lock connection, and with it every lane.
pub(crate) struct LanesLost<'a> {
    pub relay: &'a str,
    pub error: &'a str,
}

impl LanesLost<'_> {
    pub fn emit(self) {
        tracing::warn!(
            relay = self.relay,
            error = self.error,
            "Lost the outbox lock connection; the relay's lanes are free for other relays until it reconnects."
        );
        metrics::set(LANES_OWNED, LANES_OWNED_HELP, &[("relay", self.relay)], 0.0);
    }
}

/// Sets the pending gauge.
pub(crate) fn pending(n: i64) {
    metrics::set(PENDING, PENDING_HELP, &[], n as f64);
}

/// Retention removed published rows.
pub(crate) struct RetentionRan<'a> {
    pub relay: &'a str,
    pub deleted: u64,
}

impl RetentionRan<'_> {
    pub fn emit(self) {
        if self.deleted > 0 {
            tracing::info!(relay = self.relay, deleted = self.deleted, "Removed published outbox rows past retention.");
            metrics::inc(RETENTION_DELETED, RETENTION_DELETED_HELP, &[], self.deleted);
        }
    }
}

/// Rows acknowledged by the broker so far by relay `relay` in this process.
pub fn published_by(relay: &str) -> u64 {
    metrics::counter(PUBLISHED, &[("relay", relay)])
}

/// Failed publish attempts so far by relay `relay` in this process.
pub fn failures_of(relay: &str) -> u64 {
    metrics::counter(FAILURES, &[("relay", relay)])
}
