//! The failure path: dead letters and their headers, the policy for events
//! parked behind a dead key, and redrive.
//!
//! A transiently failing event is parked per key by the lane (see
//! [`crate::consumer`]); after `max_attempts`, at once for a rejected event,
//! and for bad input, the record is dead-lettered: indexed in
//! `oncely.dead_letters` and published to `<topic>.<consumer>.dlt` through the
//! outbox, in the transaction that moves the offset past it.

use sqlx::PgConnection;

use crate::envelope::{EventId, RawRecord};
use crate::error::Result;
use crate::kafka::admin::KafkaAdmin;
use crate::store::{self, NewDeadLetter};

pub mod redrive;

// The failure tables as operators read them (the CLI, the console): the rows
// as stored, listed by the store's queries.
pub use crate::store::failure::{get_dead_letters, list_dead_letters, list_parked, DeadLetterRow, ParkedRow};

// Test hook: the failure tests release a held key without an operator
// session; operators release through `admin::dlq` (previewed, confirmed,
// audited). Not part of the API.
#[doc(hidden)]
pub use crate::store::failure::release_key;

/// What happens to the events parked behind an event that was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DeadKeyPolicy {
    /// The next event of the key becomes the head and is tried at once (default).
    #[default]
    Continue,
    /// The key's remaining events are held until an operator releases the key
    /// (`oncely dlq release`).
    Hold,
}

/// Header: original topic (Spring Kafka's name).
pub const H_DLT_TOPIC: &str = "kafka_dlt-original-topic";
/// Header: original partition, 4-byte big-endian integer (as Spring Kafka writes it).
pub const H_DLT_PARTITION: &str = "kafka_dlt-original-partition";
/// Header: original offset, 8-byte big-endian integer.
pub const H_DLT_OFFSET: &str = "kafka_dlt-original-offset";
/// Header: original timestamp (ms), 8-byte big-endian integer.
pub const H_DLT_TIMESTAMP: &str = "kafka_dlt-original-timestamp";
/// Header: original consumer group.
pub const H_DLT_GROUP: &str = "kafka_dlt-original-consumer-group";
/// Header: the error message.
pub const H_DLT_MESSAGE: &str = "kafka_dlt-exception-message";
/// Header: the error's class name.
pub const H_DLT_FQCN: &str = "kafka_dlt-exception-fqcn";
/// Header: attempts made, decimal text.
pub const H_ATTEMPTS: &str = "oncely-attempts";
/// Header: the short reason code, e.g. `undecodable-payload`.
pub const H_REASON: &str = "oncely-reason";

/// The dead-letter topic of a consumer for `topic`.
pub fn dlt_topic(topic: &str, consumer: &str) -> String {
    format!("{topic}.{consumer}.dlt")
}

/// Headroom of a dead-letter topic over its input topic's limit: a dead
/// letter is the input record plus the `kafka_dlt-*` and `oncely-*` headers
/// (the error message among them).
pub(crate) const DLT_HEADROOM: usize = 64 * 1024;

/// Kafka's default `max.message.bytes`, for an input topic whose
/// configuration cannot be read.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;

/// Creates the dead-letter topic `dlt` of `input` if it is missing: as many
/// partitions as `input`, the broker's default replication, and room for
/// `input`'s largest record plus the dead-letter headers ([`DLT_HEADROOM`]),
/// so that a record at its topic's limit can still be dead-lettered. An
/// existing one is left as it is, with a warning when it is smaller than
/// that. The consumer and the processor both create theirs here; `owner`
/// names which one, for the log.
pub(crate) async fn ensure_dlt_topic(admin: &KafkaAdmin, input: &str, dlt: &str, owner: &str) -> Result<()> {
    let input_limit = max_message_bytes(admin, input, owner).await;
    let want = input_limit + DLT_HEADROOM;
    if admin.topic_exists(dlt).await? {
        let have = admin.describe_topic_configs(&[dlt]).await.ok().and_then(|c| c.first()?.max_message_bytes());
        if let Some(have) = have.filter(|h| *h < want) {
            tracing::warn!(
                owner, topic = dlt, max_message_bytes = have, input, input_max_message_bytes = input_limit,
                "The dead-letter topic accepts smaller records than its input plus the dead-letter headers: a record near the input's limit cannot be dead-lettered there. Raise it: kafka-configs --alter --entity-type topics --entity-name {dlt} --add-config max.message.bytes={want}"
            );
        }
        return Ok(());
    }
    let partitions = i32::try_from(admin.topic_partitions(input).await?.len()).unwrap_or(i32::MAX).max(1);
    let limit = want.to_string();
    if admin.create_topic(dlt, partitions, &[("max.message.bytes", &limit)]).await? {
        tracing::info!(owner, topic = dlt, max_message_bytes = %limit, "Created the dead-letter topic.");
    }
    Ok(())
}

/// `topic`'s `max.message.bytes` (asked for up to 15 s: a topic created a
/// moment ago may not show its configuration yet). When it cannot be read
/// (DescribeConfigs denied), Kafka's default, with a warning.
async fn max_message_bytes(admin: &KafkaAdmin, topic: &str, owner: &str) -> usize {
    match admin.max_message_bytes(&[topic], std::time::Duration::from_secs(15)).await {
        Ok(limits) => limits.first().copied().unwrap_or(DEFAULT_MAX_MESSAGE_BYTES),
        Err(e) => {
            tracing::warn!(owner, topic, error = %e, "Cannot read the topic's max.message.bytes; sizing its dead-letter topic for Kafka's default.");
            DEFAULT_MAX_MESSAGE_BYTES
        }
    }
}

/// A record to dead-letter and why.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// The record as received.
    pub record: &'a RawRecord,
    /// Its identity for people (escaped text, see [`EventId::display`]), when it has one.
    pub event_id: Option<String>,
    /// Short reason code.
    pub reason: &'a str,
    /// The error message.
    pub error: &'a str,
    /// The error's class name.
    pub error_class: &'a str,
    /// Attempts made.
    pub attempts: i32,
}

impl<'a> DeadLetter<'a> {
    /// Bad input: the record could not be decoded.
    pub fn decode(record: &'a RawRecord, id: Option<&'a EventId>, reason: &'a str, error: &'a str) -> Self {
        DeadLetter {
            record,
            event_id: id.map(EventId::display),
            reason,
            error,
            error_class: "oncely::DecodeError",
            attempts: 1,
        }
    }

    /// The handler failed permanently or too often.
    pub fn handler(
        record: &'a RawRecord,
        id: &'a EventId,
        reason: &'a str,
        error: &'a str,
        error_class: &'a str,
        attempts: i32,
    ) -> Self {
        DeadLetter { record, event_id: Some(id.display()), reason, error, error_class, attempts }
    }

    /// The dead-letter record's headers: the original ones, then Spring
    /// Kafka's `kafka_dlt-*` headers, then `oncely-attempts` and `oncely-reason`.
    /// (A null header value of the original stays null.)
    pub fn headers(&self, consumer: &str) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut h: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .record
            .headers
            .iter()
            .filter(|(k, _)| !is_dead_letter_header(k))
            .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
            .collect();
        h.push((H_DLT_TOPIC.as_bytes().to_vec(), Some(self.record.topic.as_bytes().to_vec())));
        h.push((H_DLT_PARTITION.as_bytes().to_vec(), Some(self.record.partition.to_be_bytes().to_vec())));
        h.push((H_DLT_OFFSET.as_bytes().to_vec(), Some(self.record.offset.to_be_bytes().to_vec())));
        h.push((
            H_DLT_TIMESTAMP.as_bytes().to_vec(),
            Some(self.record.timestamp_ms.unwrap_or(0).to_be_bytes().to_vec()),
        ));
        h.push((H_DLT_GROUP.as_bytes().to_vec(), Some(consumer.as_bytes().to_vec())));
        h.push((H_DLT_MESSAGE.as_bytes().to_vec(), Some(self.error.as_bytes().to_vec())));
        h.push((H_DLT_FQCN.as_bytes().to_vec(), Some(self.error_class.as_bytes().to_vec())));
        h.push((H_ATTEMPTS.as_bytes().to_vec(), Some(self.attempts.to_string().into_bytes())));
        h.push((H_REASON.as_bytes().to_vec(), Some(self.reason.as_bytes().to_vec())));
        h
    }
}

/// Whether a header is one oncely writes on a dead letter (replaced, not
/// repeated, when a redriven record is dead-lettered again).
pub(crate) fn is_dead_letter_header(name: &[u8]) -> bool {
    name.starts_with(b"kafka_dlt-") || name == H_ATTEMPTS.as_bytes() || name == H_REASON.as_bytes()
}

/// Dead-letters a record inside the caller's transaction: the index row in
/// `oncely.dead_letters` and the dead-letter record in the outbox (published
/// to `<topic>.<consumer>.dlt` by the relay). Returns the dead letter's id.
pub async fn dead_letter(conn: &mut PgConnection, consumer: &str, dl: &DeadLetter<'_>) -> Result<i64> {
    let id = store::insert_dead_letter(
        conn,
        &NewDeadLetter {
            consumer,
            record: dl.record,
            event_id: dl.event_id.as_deref(),
            reason: dl.reason,
            error: dl.error,
            error_class: dl.error_class,
            attempts: dl.attempts,
        },
    )
    .await?;
    crate::outbox::enqueue_raw(
        conn,
        &dlt_topic(&dl.record.topic, consumer),
        dl.record.key.as_deref(),
        dl.record.payload.as_deref(),
        &dl.headers(consumer),
    )
    .await?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlt_headers_follow_spring_kafka() {
        let rec = RawRecord {
            topic: "orders".into(),
            partition: 3,
            offset: 42,
            timestamp_ms: Some(1_700_000_000_000),
            key: Some(b"k".to_vec()),
            payload: Some(b"{}".to_vec()),
            headers: vec![
                (b"ce_id".to_vec(), Some(b"abc".to_vec())),
                (H_REASON.as_bytes().to_vec(), Some(b"old".to_vec())),
            ]
            .into(),
        };
        let id = EventId::from("s#abc");
        let dl = DeadLetter::handler(&rec, &id, "max-attempts", "boom", "sqlx::Error", 10);
        let h = dl.headers("payments");
        let get = |k: &str| h.iter().find(|(n, _)| n.as_slice() == k.as_bytes()).and_then(|(_, v)| v.clone()).expect(k);
        assert_eq!(get("ce_id"), b"abc");
        assert_eq!(get(H_DLT_TOPIC), b"orders");
        assert_eq!(get(H_DLT_PARTITION), 3i32.to_be_bytes());
        assert_eq!(get(H_DLT_OFFSET), 42i64.to_be_bytes());
        assert_eq!(get(H_DLT_TIMESTAMP), 1_700_000_000_000i64.to_be_bytes());
        assert_eq!(get(H_DLT_GROUP), b"payments");
        assert_eq!(get(H_DLT_MESSAGE), b"boom");
        assert_eq!(get(H_DLT_FQCN), b"sqlx::Error");
        assert_eq!(get(H_ATTEMPTS), b"10");
        assert_eq!(get(H_REASON), b"max-attempts");
        assert_eq!(
            h.iter().filter(|(n, _)| n.as_slice() == H_REASON.as_bytes()).count(),
            1,
            "a redriven record's old reason is replaced"
        );
        assert_eq!(dlt_topic("orders", "payments"), "orders.payments.dlt");
    }
}
