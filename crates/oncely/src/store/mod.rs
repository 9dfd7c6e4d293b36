//! Every SQL statement oncely runs, in one place, with the migrations beside it
//! (`store/migrations/`), so the data model reads in one sitting.
//!
//! Queries are built at run time (`sqlx::query`), not checked at compile time:
//! the library builds without a database.

use std::collections::{HashMap, HashSet};

use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{Connection, PgPool, Row};

use crate::error::{Error, Result};

pub mod admin;
pub mod effects;
pub mod failure;
mod migrate;
pub mod outbox;
pub use migrate::{migrate, MIGRATIONS};

/// `url` (a `postgres://` URL) with its database replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let prefix = match base.rfind('/') {
        Some(i) if i > "postgres://".len() => &base[..i],
        _ => base,
    };
    match query {
        Some(q) => format!("{prefix}/{db}?{q}"),
        None => format!("{prefix}/{db}"),
    }
}

/// Opens a pool to `url` with `max` connections.
pub async fn connect(url: &str, max: u32) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(30))
        .connect(url)
        .await?)
}

/// Inserts the identities of a batch into the inbox, in offset order, and
/// returns those that were new. One statement for the whole batch.
///
/// The primary key contains the day partition, so `ON CONFLICT` alone catches
/// only a duplicate of the same day; `NOT EXISTS` also looks in every older
/// partition (today's is pruned at run time: `ON CONFLICT` covers it). The
/// `OFFSET 0` keeps the check a per-identity index probe: as a join, the
/// planner may choose to hash every identity the consumer ever claimed (the
/// row estimate of `unnest` is a guess). Two members racing on one partition
/// are serialised by the offset fence (see [`advance_offset`]), so the
/// check-then-insert cannot let both in.
pub async fn claim(
    conn: &mut PgConnection,
    consumer: &str,
    topic: &str,
    partition: i32,
    ids: &[String],
    offsets: &[i64],
) -> Result<HashSet<String>> {
    let rows = sqlx::query(
        r#"INSERT INTO oncely.inbox (consumer, event_id, topic, partition, "offset", received_on)
           SELECT $1, x.id, $2, $3, x.off, (now() AT TIME ZONE 'UTC')::date
             FROM unnest($4::text[], $5::int8[]) WITH ORDINALITY AS x(id, off, ord)
            WHERE NOT EXISTS (SELECT 1 FROM oncely.inbox i
                               WHERE i.consumer = $1 AND i.event_id = x.id
                                 AND i.received_on < (now() AT TIME ZONE 'UTC')::date
                              OFFSET 0)
            ORDER BY x.ord
           ON CONFLICT DO NOTHING
           RETURNING event_id"#,
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .bind(ids)
    .bind(offsets)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| r.try_get::<String, _>(0).map_err(Error::from)).collect()
}

/// Releases inbox claims made earlier in the same transaction (events of the
/// batch that were not applied and will be delivered again).
pub async fn unclaim(conn: &mut PgConnection, consumer: &str, ids: &[String]) -> Result<()> {
    sqlx::query("DELETE FROM oncely.inbox WHERE consumer = $1 AND event_id = ANY($2)")
        .bind(consumer)
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The fence: advances `next_offset` from `expected` to `next`. Returns false
/// when the row is not at `expected` any more (another member owns the
/// partition now, or an operator moved it): the caller must roll back.
/// `expected = None` means "no row yet": the row is created, and the fence
/// fails if someone else created it first.
pub async fn advance_offset(
    conn: &mut PgConnection,
    consumer: &str,
    topic: &str,
    partition: i32,
    expected: Option<i64>,
    next: i64,
) -> Result<bool> {
    let done = match expected {
        Some(start) => sqlx::query(
            "UPDATE oncely.offsets SET next_offset = $5, updated_at = now()
              WHERE consumer = $1 AND topic = $2 AND partition = $3 AND next_offset = $4",
        )
        .bind(consumer)
        .bind(topic)
        .bind(partition)
        .bind(start)
        .bind(next)
        .execute(&mut *conn)
        .await?
        .rows_affected(),
        None => sqlx::query(
            "INSERT INTO oncely.offsets (consumer, topic, partition, next_offset) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(topic)
        .bind(partition)
        .bind(next)
        .execute(&mut *conn)
        .await?
        .rows_affected(),
    };
    Ok(done == 1)
}

/// The database offsets of `consumer` for the given partitions of `topic`.
pub async fn load_offsets(pool: &PgPool, consumer: &str, topic: &str, partitions: &[i32]) -> Result<HashMap<i32, i64>> {
    let rows = sqlx::query(
        "SELECT partition, next_offset FROM oncely.offsets WHERE consumer = $1 AND topic = $2 AND partition = ANY($3)",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| Ok((r.try_get::<i32, _>(0)?, r.try_get::<i64, _>(1)?))).collect()
}

/// All database offsets of a consumer: `(topic, partition) -> next_offset`.
pub async fn consumer_offsets(pool: &PgPool, consumer: &str) -> Result<HashMap<(String, i32), i64>> {
    let rows = sqlx::query("SELECT topic, partition, next_offset FROM oncely.offsets WHERE consumer = $1")
        .bind(consumer)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|r| Ok(((r.try_get::<String, _>(0)?, r.try_get::<i32, _>(1)?), r.try_get::<i64, _>(2)?))).collect()
}

/// Version guard: records `version` for the entity if it is newer than the
/// stored one. Returns false for a stale (or equal) version.
pub async fn apply_version(
    conn: &mut PgConnection,
    consumer: &str,
    entity_type: &str,
    entity_id: &str,
    version: i64,
) -> Result<bool> {
    let n = sqlx::query(
        "INSERT INTO oncely.entity_versions AS v (consumer, entity_type, entity_id, version)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (consumer, entity_type, entity_id)
         DO UPDATE SET version = EXCLUDED.version, updated_at = now() WHERE v.version < EXCLUDED.version",
    )
    .bind(consumer)
    .bind(entity_type)
    .bind(entity_id)
    .bind(version)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// A dead letter to record.
#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    /// Consumer name.
    pub consumer: &'a str,
    /// The record.
    pub record: &'a crate::envelope::RawRecord,
    /// Its identity, when it has one.
    pub event_id: Option<&'a str>,
    /// Short reason code (`missing-event-id`, `undecodable-payload`, `rejected`, ...).
    pub reason: &'a str,
    /// The error message.
    pub error: &'a str,
    /// The error's class (Rust type name), for `kafka_dlt-exception-fqcn`.
    pub error_class: &'a str,
    /// Attempts made.
    pub attempts: i32,
}

/// Indexes a dead letter in `oncely.dead_letters`; returns its id. A second
/// insert for the same record position is a no-op returning the first id.
pub async fn insert_dead_letter(conn: &mut PgConnection, dl: &NewDeadLetter<'_>) -> Result<i64> {
    let (keys, values): (Vec<String>, Vec<Option<Vec<u8>>>) = dl.record.headers.iter().cloned().unzip();
    let row = sqlx::query(
        r#"INSERT INTO oncely.dead_letters
             (consumer, topic, partition, "offset", record_ts_ms, event_id, key, payload,
              header_keys, header_values, reason, error, error_class, attempts)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
           ON CONFLICT (consumer, topic, partition, "offset")
           DO UPDATE SET attempts = oncely.dead_letters.attempts
           RETURNING id"#,
    )
    .bind(dl.consumer)
    .bind(&dl.record.topic)
    .bind(dl.record.partition)
    .bind(dl.record.offset)
    .bind(dl.record.timestamp_ms)
    .bind(dl.event_id)
    .bind(dl.record.key.as_deref())
    .bind(dl.record.payload.as_deref())
    .bind(&keys)
    .bind(&values)
    .bind(dl.reason)
    .bind(dl.error)
    .bind(dl.error_class)
    .bind(dl.attempts)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.try_get(0)?)
}

/// Runs `SAVEPOINT`, `RELEASE SAVEPOINT` or `ROLLBACK TO SAVEPOINT` for the
/// per-event savepoint of a batch.
pub async fn savepoint(conn: &mut PgConnection, op: Savepoint) -> Result<()> {
    let sql = match op {
        Savepoint::Begin => "SAVEPOINT oncely_event",
        Savepoint::Release => "RELEASE SAVEPOINT oncely_event",
        Savepoint::Rollback => "ROLLBACK TO SAVEPOINT oncely_event",
    };
    sqlx::query(sql).execute(&mut *conn).await?;
    Ok(())
}

/// A savepoint operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Savepoint {
    /// `SAVEPOINT`.
    Begin,
    /// `RELEASE SAVEPOINT`.
    Release,
    /// `ROLLBACK TO SAVEPOINT`.
    Rollback,
}

/// Creates the inbox's daily partitions from yesterday to `days_ahead` days
/// ahead (UTC); returns how many were created.
pub async fn ensure_inbox_partitions(pool: &PgPool, days_ahead: i32) -> Result<i32> {
    let row = sqlx::query("SELECT oncely.ensure_inbox_partitions(((now() AT TIME ZONE 'UTC')::date) - 1, $1 + 2)")
        .bind(days_ahead)
        .fetch_one(pool)
        .await?;
    Ok(row.try_get(0)?)
}

/// Drops inbox partitions whose whole day is older than `retention_days`
/// (UTC). Returns the dropped partitions' names.
pub async fn drop_inbox_partitions(pool: &PgPool, retention_days: i32) -> Result<Vec<String>> {
    let rows = sqlx::query(
        r#"SELECT c.relname
             FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             JOIN pg_namespace n ON n.oid = p.relnamespace
            WHERE n.nspname = 'oncely' AND p.relname = 'inbox'
              AND c.relname ~ '^inbox_p[0-9]{8}$'
              AND to_date(substr(c.relname, 8), 'YYYYMMDD') + 1
                  <= ((now() AT TIME ZONE 'UTC')::date) - $1
            ORDER BY c.relname"#,
    )
    .bind(retention_days)
    .fetch_all(pool)
    .await?;
    let mut dropped = Vec::new();
    for r in rows {
        let name: String = r.try_get(0)?;
        // The name matched ^inbox_p[0-9]{8}$ above, so quoting is not needed;
        // quote anyway.
        sqlx::query(&format!("DROP TABLE IF EXISTS oncely.\"{name}\"")).execute(pool).await?;
        dropped.push(name);
    }
    Ok(dropped)
}

/// Registers (or updates) a consumer and its inbox retention.
pub async fn register_consumer(pool: &PgPool, name: &str, inbox_retention_days: i32) -> Result<()> {
    sqlx::query(
        "INSERT INTO oncely.consumers (name, inbox_retention_days) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET inbox_retention_days = EXCLUDED.inbox_retention_days, started_at = now()",
    )
    .bind(name)
    .bind(inbox_retention_days)
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether `name` is a consumer registered in this database (an oncely group).
pub async fn is_consumer(pool: &PgPool, name: &str) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM oncely.consumers WHERE name = $1").bind(name).fetch_optional(pool).await?.is_some())
}

/// Drops the inbox partitions that every registered consumer's retention has
/// passed (the longest retention wins: the inbox is shared).
pub async fn drop_expired_inbox_partitions(pool: &PgPool) -> Result<Vec<String>> {
    let longest: Option<i32> =
        sqlx::query_scalar("SELECT max(inbox_retention_days) FROM oncely.consumers").fetch_one(pool).await?;
    match longest {
        Some(days) => drop_inbox_partitions(pool, days).await,
        None => Ok(Vec::new()),
    }
}

/// The days covered by the inbox's partitions, oldest first.
pub async fn inbox_partition_days(pool: &PgPool) -> Result<Vec<chrono::NaiveDate>> {
    let rows = sqlx::query(
        r#"SELECT to_date(substr(c.relname, 8), 'YYYYMMDD')
             FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             JOIN pg_namespace n ON n.oid = p.relnamespace
            WHERE n.nspname = 'oncely' AND p.relname = 'inbox' AND c.relname ~ '^inbox_p[0-9]{8}$'
            ORDER BY 1"#,
    )
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| r.try_get(0).map_err(Error::from)).collect()
}

/// Checks that the database answers (used by readiness checks).
pub async fn ping(pool: &PgPool) -> Result<()> {
    let mut c = pool.acquire().await?;
    c.ping().await?;
    Ok(())
}
