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
const FAILURES_HELP: &str = "Outbox rows whose publish attempt failed (they stay pending, or are set aside), by relay.";
const FAILED: &str = "oncely_outbox_failed";
const FAILED_HELP: &str = "Outbox rows set aside (refused by the broker for good) and not discarded.";
const SET_ASIDE: &str = "oncely_outbox_set_aside_total";
const SET_ASIDE_HELP: &str = "Outbox rows set aside because the broker refused them for good, by relay.";
const RETRY_WAITS: &str = "oncely_outbox_retry_waits_total";
const RETRY_WAITS_HELP: &str =
    "Backoff waits of the relay before retrying a failed publish or database call, by relay.";
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

/// A row the broker refuses for good was set aside; later rows of its key wait behind it.
pub(crate) struct RowSetAside<'a> {
    pub relay: &'a str,
    pub id: i64,
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub error: &'a str,
}

impl RowSetAside<'_> {
    pub fn emit(self) {
        let key = self.key.map(|k| super::failed::readable(k).0);
        tracing::error!(
            relay = self.relay,
            id = self.id,
            topic = self.topic,
            key = key.as_deref().unwrap_or("(none)"),
            error = self.error,
            "The broker refuses this outbox row for good; set it aside. Later rows of its key wait behind it; \
             see `oncely outbox list --failed`, then `oncely outbox retry` once fixed or `oncely outbox discard`."
        );
        metrics::inc(SET_ASIDE, SET_ASIDE_HELP, &[("relay", self.relay)], 1);
    }
}

/// A batch had rows refused by the broker in a way that may be another
/// record's fault (a whole produce request refused): its failed rows are
/// published again in smaller groups to find the one it refuses.
pub(crate) struct Isolating<'a> {
    pub relay: &'a str,
    pub rows: usize,
    pub error: &'a str,
}

impl Isolating<'_> {
    pub fn emit(self) {
        tracing::info!(
            relay = self.relay,
            rows = self.rows,
            error = self.error,
            "The broker refused a group of outbox rows; publishing them in smaller groups to find the record it refuses."
        );
    }
}

/// The relay waits before retrying.
pub(crate) fn retry_wait(relay: &str) {
    metrics::inc(RETRY_WAITS, RETRY_WAITS_HELP, &[("relay", relay)], 1);
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

/// Sets the pending and failed gauges.
pub(crate) fn pending(n: i64, failed: i64) {
    metrics::set(PENDING, PENDING_HELP, &[], n as f64);
    metrics::set(FAILED, FAILED_HELP, &[], failed as f64);
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

/// Rows set aside so far by relay `relay` in this process.
pub fn set_aside_by(relay: &str) -> u64 {
    metrics::counter(SET_ASIDE, &[("relay", relay)])
}

/// Backoff waits so far of relay `relay` in this process (a row set aside
/// costs none: only transient failures wait).
pub fn retry_waits_of(relay: &str) -> u64 {
    metrics::counter(RETRY_WAITS, &[("relay", relay)])
}
