//! SQL of the failure path: parked events (per-key retry queues).

use sqlx::{PgConnection, PgPool, Row};

use crate::envelope::RawRecord;
use crate::error::Result;

/// A parked event as stored.
#[derive(Debug, Clone)]
pub struct ParkedRow {
    /// The consumer it is parked for.
    pub consumer: String,
    /// The record as received.
    pub record: RawRecord,
    /// The entity key (the Kafka key's bytes; empty for a record without one).
    pub entity_key: Vec<u8>,
    /// Its identity, when known.
    pub event_id: Option<String>,
    /// `waiting` or `held`.
    pub status: String,
    /// Failed attempts so far (0 for events parked behind the head).
    pub attempts: i32,
    /// When the head is due (None behind the head).
    pub next_attempt_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The last error, for the head.
    pub last_error: Option<String>,
    /// When it was parked.
    pub parked_at: chrono::DateTime<chrono::Utc>,
}

/// How a parked event waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkedStatus {
    /// Retried (the head of its key) or drained in order (behind the head).
    Waiting,
    /// Behind a dead-lettered event of its key, under the `hold` policy:
    /// waits until an operator releases the key.
    Held,
    /// A dead-lettered event kept at the head of its key as the marker that
    /// holds it (`hold` policy); removed when the key is released.
    Dead,
}

impl ParkedStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ParkedStatus::Waiting => "waiting",
            ParkedStatus::Held => "held",
            ParkedStatus::Dead => "dead",
        }
    }
}

/// A parked event to insert.
#[derive(Debug, Clone)]
pub struct NewParked<'a> {
    /// Consumer name.
    pub consumer: &'a str,
    /// The record.
    pub record: &'a RawRecord,
    /// Entity key (bytes).
    pub entity_key: &'a [u8],
    /// Identity for people (escaped text), when known.
    pub event_id: Option<String>,
    /// How it waits.
    pub status: ParkedStatus,
    /// Attempts made (0 when parked behind another event).
    pub attempts: i32,
    /// Delay before the next attempt (for a head).
    pub retry_in: Option<std::time::Duration>,
    /// The error (for a head).
    pub error: Option<String>,
    /// The error's class.
    pub error_class: Option<String>,
}

/// Parks events, in one statement (rows whose record position is parked
/// already are left as they are).
pub async fn park(conn: &mut PgConnection, rows: &[NewParked<'_>]) -> Result<()> {
    // 16 parameters a row; PostgreSQL takes at most 65535 per statement.
    for chunk in rows.chunks(2000) {
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            r#"INSERT INTO oncely.parked
                 (consumer, topic, partition, "offset", entity_key, event_id, record_ts_ms, key, payload,
                  header_keys, header_values, status, attempts, next_attempt_at, last_error, error_class) "#,
        );
        q.push_values(chunk, |mut b, p| {
            let (keys, values): (Vec<Vec<u8>>, Vec<Option<Vec<u8>>>) = p.record.headers.to_vec().into_iter().unzip();
            b.push_bind(p.consumer)
                .push_bind(&*p.record.topic)
                .push_bind(p.record.partition)
                .push_bind(p.record.offset)
                .push_bind(p.entity_key)
                .push_bind(p.event_id.as_deref().map(super::pg_text))
                .push_bind(p.record.timestamp_ms)
                .push_bind(p.record.key.as_deref())
                .push_bind(p.record.payload.as_deref())
                .push_bind(keys)
                .push_bind(values)
                .push_bind(p.status.as_str())
                .push_bind(p.attempts)
                .push("now() + make_interval(secs => ")
                .push_bind_unseparated(p.retry_in.map(|d| d.as_secs_f64()))
                .push_unseparated("::float8)")
                .push_bind(p.error.as_deref().map(super::pg_text))
                .push_bind(p.error_class.as_deref().map(super::pg_text));
        });
        q.push(" ON CONFLICT DO NOTHING");
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Keys with parked events in a partition, and whether each is held (its
/// head is a dead-lettered marker or held): the new owner of a partition
/// loads them when it takes the partition over.
pub async fn parked_keys(pool: &PgPool, consumer: &str, topic: &str, partition: i32) -> Result<Vec<(Vec<u8>, bool)>> {
    let rows = sqlx::query(
        r#"SELECT DISTINCT ON (entity_key) entity_key, status <> 'waiting'
             FROM oncely.parked WHERE consumer = $1 AND topic = $2 AND partition = $3
            ORDER BY entity_key, "offset""#,
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// Keys whose head is due now, and the earliest due time of the others.
pub async fn due_keys(
    pool: &PgPool,
    consumer: &str,
    topic: &str,
    partition: i32,
) -> Result<(Vec<Vec<u8>>, Option<std::time::Duration>)> {
    // A key is due when its lowest waiting offset is due (or has no due time:
    // a queue whose head was just dead-lettered drains at once).
    let rows = sqlx::query(
        r#"SELECT entity_key, EXTRACT(EPOCH FROM (coalesce(next_attempt_at, now()) - now()))::float8
             FROM (SELECT DISTINCT ON (entity_key) entity_key, next_attempt_at, status
                     FROM oncely.parked
                    WHERE consumer = $1 AND topic = $2 AND partition = $3
                    ORDER BY entity_key, "offset") heads
            WHERE status = 'waiting'"#,
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .fetch_all(pool)
    .await?;
    let mut due = Vec::new();
    let mut next: Option<f64> = None;
    for r in rows {
        let key: Vec<u8> = r.try_get(0)?;
        let secs: f64 = r.try_get(1)?;
        if secs <= 0.0 {
            due.push(key);
        } else {
            next = Some(next.map_or(secs, |n| n.min(secs)));
        }
    }
    Ok((due, next.map(std::time::Duration::from_secs_f64)))
}

/// The waiting events of one key, in offset order, locked for this transaction.
pub async fn key_queue(
    conn: &mut PgConnection,
    consumer: &str,
    topic: &str,
    partition: i32,
    entity_key: &[u8],
) -> Result<Vec<ParkedRow>> {
    let rows = sqlx::query(
        r#"SELECT consumer, "offset", record_ts_ms, key, payload, header_keys, header_values, entity_key, event_id,
                  status, attempts, next_attempt_at, last_error, parked_at
             FROM oncely.parked
            WHERE consumer = $1 AND topic = $2 AND partition = $3 AND entity_key = $4 AND status = 'waiting'
            ORDER BY "offset"
            FOR UPDATE"#,
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .bind(entity_key)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| row_to_parked(r, topic, partition)).collect()
}

fn row_to_parked(r: &sqlx::postgres::PgRow, topic: &str, partition: i32) -> Result<ParkedRow> {
    let keys: Vec<Vec<u8>> = r.try_get("header_keys")?;
    let values: Vec<Option<Vec<u8>>> = r.try_get("header_values")?;
    Ok(ParkedRow {
        consumer: r.try_get("consumer")?,
        record: RawRecord {
            topic: topic.into(),
            partition,
            offset: r.try_get("offset")?,
            timestamp_ms: r.try_get("record_ts_ms")?,
            key: r.try_get("key")?,
            payload: r.try_get("payload")?,
            headers: keys.into_iter().zip(values).collect(),
        },
        entity_key: r.try_get("entity_key")?,
        event_id: r.try_get("event_id")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        last_error: r.try_get("last_error")?,
        parked_at: r.try_get("parked_at")?,
    })
}

/// Removes a parked event (applied, duplicate or dead-lettered).
pub async fn unpark(conn: &mut PgConnection, consumer: &str, topic: &str, partition: i32, offset: i64) -> Result<()> {
    sqlx::query(r#"DELETE FROM oncely.parked WHERE consumer = $1 AND topic = $2 AND partition = $3 AND "offset" = $4"#)
        .bind(consumer)
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records a failed attempt of a head and when to try again.
pub async fn reschedule(
    conn: &mut PgConnection,
    consumer: &str,
    topic: &str,
    partition: i32,
    offset: i64,
    attempts: i32,
    retry_in: std::time::Duration,
    error: &str,
    error_class: &str,
) -> Result<()> {
    sqlx::query(
        r#"UPDATE oncely.parked
              SET attempts = $5, next_attempt_at = now() + make_interval(secs => $6::float8),
                  last_error = $7, error_class = $8, updated_at = now()
            WHERE consumer = $1 AND topic = $2 AND partition = $3 AND "offset" = $4"#,
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .bind(attempts)
    .bind(retry_in.as_secs_f64())
    .bind(super::pg_text(error))
    .bind(super::pg_text(error_class))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Holds every waiting event of a key (the `hold` policy after an event of
/// the key was dead-lettered; the caller parks that event as the `dead`
/// marker). Returns how many were held.
pub async fn hold_key(
    conn: &mut PgConnection,
    consumer: &str,
    topic: &str,
    partition: i32,
    entity_key: &[u8],
) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE oncely.parked SET status = 'held', updated_at = now()
          WHERE consumer = $1 AND topic = $2 AND partition = $3 AND entity_key = $4 AND status = 'waiting'",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .bind(entity_key)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Releases a held key: its dead-lettered marker goes, its held events become
/// waiting and due now. Returns how many rows changed (markers removed and
/// events released): 0 means the key was not held.
pub async fn release_key(pool: &PgPool, consumer: &str, entity_key: &[u8]) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let markers = sqlx::query("DELETE FROM oncely.parked WHERE consumer = $1 AND entity_key = $2 AND status = 'dead'")
        .bind(consumer)
        .bind(entity_key)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let n = sqlx::query(
        "UPDATE oncely.parked SET status = 'waiting', next_attempt_at = now(), updated_at = now()
          WHERE consumer = $1 AND entity_key = $2 AND status = 'held'",
    )
    .bind(consumer)
    .bind(entity_key)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(markers + n)
}

/// How a key of a consumer is held: its dead-lettered markers and its held
/// events (both 0: the key is not held).
pub async fn key_hold(pool: &PgPool, consumer: &str, entity_key: &[u8]) -> Result<(i64, i64)> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE status = 'dead'), count(*) FILTER (WHERE status = 'held')
           FROM oncely.parked WHERE consumer = $1 AND entity_key = $2",
    )
    .bind(consumer)
    .bind(entity_key)
    .fetch_one(pool)
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Parked events of a consumer (all consumers when `None`), heads first.
pub async fn list_parked(pool: &PgPool, consumer: Option<&str>, limit: i64) -> Result<Vec<ParkedRow>> {
    let rows = sqlx::query(
        r#"SELECT consumer, topic, partition, "offset", record_ts_ms, key, payload, header_keys, header_values, entity_key,
                  event_id, status, attempts, next_attempt_at, last_error, parked_at
             FROM oncely.parked
            WHERE $1::text IS NULL OR consumer = $1
            ORDER BY consumer, topic, partition, entity_key, "offset"
            LIMIT $2"#,
    )
    .bind(consumer)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let topic: String = r.try_get("topic")?;
            let partition: i32 = r.try_get("partition")?;
            row_to_parked(r, &topic, partition)
        })
        .collect()
}

/// How many events of a key are still parked (waiting or held).
pub async fn key_queue_len(
    pool: &PgPool,
    consumer: &str,
    topic: &str,
    partition: i32,
    entity_key: &[u8],
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM oncely.parked WHERE consumer = $1 AND topic = $2 AND partition = $3 AND entity_key = $4",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .bind(entity_key)
    .fetch_one(pool)
    .await?)
}

/// A dead letter as indexed in `oncely.dead_letters`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetterRow {
    /// Its id.
    pub id: i64,
    /// Consumer.
    pub consumer: String,
    /// The original record.
    #[serde(skip)]
    pub record: RawRecord,
    /// Identity, when known.
    pub event_id: Option<String>,
    /// Reason code.
    pub reason: String,
    /// Error message.
    pub error: String,
    /// Error class.
    pub error_class: String,
    /// Attempts made.
    pub attempts: i32,
    /// When it was dead-lettered.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Last redrive.
    pub redriven_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Times redriven.
    pub redrive_count: i32,
}

const DL_COLUMNS: &str = r#"id, consumer, topic, partition, "offset", record_ts_ms, event_id, key, payload,
    header_keys, header_values, reason, error, error_class, attempts, created_at, redriven_at, redrive_count"#;

fn to_dead_letter(r: &sqlx::postgres::PgRow) -> Result<DeadLetterRow> {
    let keys: Vec<Vec<u8>> = r.try_get("header_keys")?;
    let values: Vec<Option<Vec<u8>>> = r.try_get("header_values")?;
    Ok(DeadLetterRow {
        id: r.try_get("id")?,
        consumer: r.try_get("consumer")?,
        record: RawRecord {
            topic: r.try_get::<String, _>("topic")?.into(),
            partition: r.try_get("partition")?,
            offset: r.try_get("offset")?,
            timestamp_ms: r.try_get("record_ts_ms")?,
            key: r.try_get("key")?,
            payload: r.try_get("payload")?,
            headers: keys.into_iter().zip(values).collect(),
        },
        event_id: r.try_get("event_id")?,
        reason: r.try_get("reason")?,
        error: r.try_get("error")?,
        error_class: r.try_get("error_class")?,
        attempts: r.try_get("attempts")?,
        created_at: r.try_get("created_at")?,
        redriven_at: r.try_get("redriven_at")?,
        redrive_count: r.try_get("redrive_count")?,
    })
}

/// Dead letters, oldest first, optionally of one consumer and only those
/// never redriven.
pub async fn list_dead_letters(
    pool: &PgPool,
    consumer: Option<&str>,
    only_not_redriven: bool,
    limit: i64,
) -> Result<Vec<DeadLetterRow>> {
    let sql = format!(
        "SELECT {DL_COLUMNS} FROM oncely.dead_letters
          WHERE ($1::text IS NULL OR consumer = $1) AND (NOT $2 OR redriven_at IS NULL)
          ORDER BY id LIMIT $3"
    );
    let rows = sqlx::query(&sql).bind(consumer).bind(only_not_redriven).bind(limit).fetch_all(pool).await?;
    rows.iter().map(to_dead_letter).collect()
}

/// Dead letters by id (missing ids are left out).
pub async fn get_dead_letters(pool: &PgPool, ids: &[i64]) -> Result<Vec<DeadLetterRow>> {
    let sql = format!("SELECT {DL_COLUMNS} FROM oncely.dead_letters WHERE id = ANY($1) ORDER BY id");
    let rows = sqlx::query(&sql).bind(ids).fetch_all(pool).await?;
    rows.iter().map(to_dead_letter).collect()
}

/// Records that a dead letter was redriven.
pub async fn mark_redriven(pool: &PgPool, id: i64) -> Result<()> {
    sqlx::query("UPDATE oncely.dead_letters SET redriven_at = now(), redrive_count = redrive_count + 1 WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}
