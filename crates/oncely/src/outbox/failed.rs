//! Rows the relay set aside, and what an operator does with them.
//!
//! The relay sets a row aside when the broker refuses it for good, whatever
//! the batch around it: larger than the topic's `max.message.bytes`
//! (`MSG_SIZE_TOO_LARGE`), an invalid record, a timestamp the topic does not
//! accept, a topic that does not exist (after librdkafka's
//! `topic.metadata.propagation.max.ms`, 30 s by default) or that the relay is
//! not authorised to write. The reason is the row's `last_error`.
//!
//! **Order.** The later rows of the same topic and key are held behind a row
//! set aside: they are not published until it is published or discarded, so
//! a consumer never sees an event of an entity without the one before it.
//! This is the relay's side of "a failing key waits with everything behind
//! it, other keys go on": the event that cannot be published is the first
//! of its key's sequence that is missing, and publishing the ones after it
//! would turn a visible stop into a silent gap. Rows without a key have no
//! order and hold nothing.
//!
//! **Way out.** Fix the cause (raise the topic's `max.message.bytes`, create
//! the topic, grant the ACL), then [`retry`]: the row is pending again, first
//! of its key, and the held rows follow it in order. Or [`discard`] it: it is
//! never published, the held rows go on, and retention removes it like a
//! published row.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::error::{Error, Result};
use crate::store::outbox as store;

/// A row set aside, for operators (`oncely outbox list --failed`).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct FailedRow {
    /// The row id (what [`retry`] and [`discard`] take).
    pub id: i64,
    /// Its lane.
    pub lane: i16,
    /// Destination topic.
    pub topic: String,
    /// The Kafka key for reading: as it is when it is printable UTF-8,
    /// otherwise with every byte outside printable ASCII escaped (`\xNN`,
    /// `key_escaped` true). `None`: no key.
    pub key: Option<String>,
    /// Whether `key` was escaped.
    pub key_escaped: bool,
    /// The `ce_id`, when the record has one.
    pub ce_id: Option<String>,
    /// Payload size in bytes (`None`: a null payload).
    pub payload_bytes: Option<i64>,
    /// Header names and values, in bytes.
    pub header_bytes: i64,
    /// Publish attempts.
    pub attempts: i32,
    /// Why it was set aside (the broker's or librdkafka's error).
    pub reason: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it was set aside.
    pub failed_at: DateTime<Utc>,
    /// When an operator discarded it.
    pub discarded_at: Option<DateTime<Utc>>,
    /// Pending rows of its key held behind it.
    pub held: i64,
}

/// Bytes for a human: as they are when printable UTF-8, otherwise escaped
/// (printable ASCII kept, every other byte `\xNN`); the flag says which.
pub fn readable(bytes: &[u8]) -> (String, bool) {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.chars().any(char::is_control) && !s.contains('\\') => (s.to_owned(), false),
        _ => (bytes.escape_ascii().to_string(), true),
    }
}

/// The operator's view of a stored row.
fn from_row(r: store::FailedRow) -> FailedRow {
    let (key, key_escaped) = match r.key.as_deref().map(readable) {
        Some((k, e)) => (Some(k), e),
        None => (None, false),
    };
    FailedRow {
        id: r.id,
        lane: r.lane,
        topic: r.topic,
        key,
        key_escaped,
        ce_id: r.ce_id,
        payload_bytes: r.payload_bytes,
        header_bytes: r.header_bytes,
        attempts: r.attempts,
        reason: r.last_error,
        created_at: r.created_at,
        failed_at: r.failed_at,
        discarded_at: r.discarded_at,
        held: r.held,
    }
}

/// Rows set aside, oldest first, at most `limit`; discarded ones too with
/// `include_discarded` (until retention removes them).
pub async fn list(pool: &PgPool, include_discarded: bool, limit: i64) -> Result<Vec<FailedRow>> {
    Ok(store::failed(pool, include_discarded, limit).await?.into_iter().map(from_row).collect())
}

/// Sends rows set aside back to pending (`None`: all of them), after the
/// cause was fixed; the relay tries them again at once, each first of its
/// key. A row that is refused again is set aside again. Returns the ids
/// sent back; refuses ids none of which is set aside.
pub async fn retry(pool: &PgPool, ids: Option<&[i64]>) -> Result<Vec<i64>> {
    let done = store::retry_failed(pool, ids).await?;
    if done.is_empty() && ids.is_some_and(|i| !i.is_empty()) {
        return Err(Error::Refused(format!("none of the rows {ids:?} is set aside (failed and not discarded)")));
    }
    Ok(done)
}

/// Gives up rows set aside: they are never published, the rows held behind
/// them go on. `note` (why) is kept with each row. Returns the ids
/// discarded; refuses ids none of which is set aside.
pub async fn discard(pool: &PgPool, ids: &[i64], note: &str) -> Result<Vec<i64>> {
    let done = store::discard_failed(pool, ids, note).await?;
    if done.is_empty() {
        return Err(Error::Refused(format!("none of the rows {ids:?} is set aside (failed and not discarded)")));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_as_text_when_they_are_and_escaped_when_not() {
        assert_eq!(readable(b"order-1"), ("order-1".into(), false));
        assert_eq!(readable("commande-é".as_bytes()), ("commande-é".into(), false));
        assert_eq!(readable(b"a\0b"), ("a\\x00b".into(), true));
        assert_eq!(readable(&[0xff, b'k']), ("\\xffk".into(), true));
        // A backslash is escaped too, so an escaped key never reads like a plain one.
        assert_eq!(readable(b"a\\x00b"), ("a\\\\x00b".into(), true));
    }
}
