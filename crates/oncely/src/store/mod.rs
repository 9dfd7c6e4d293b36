//! Every SQL statement oncely runs, in one place, with the migrations beside it
//! (`store/migrations/`), so the data model reads in one sitting.
//!
//! Queries are built at run time (`sqlx::query`), not checked at compile time:
//! the library builds without a database.
//!
//! The store is the library's own: applications reach it through
//! [`connect`], [`migrate`] and [`MIGRATIONS`] (and [`inbox::ensure_days`],
//! to prepare the inbox before a first consumer starts); the rest is reached
//! through the public modules that own each table (dead letters and parked
//! events through [`crate::failure`], effect intents through
//! [`crate::effects`], projections through [`crate::projection`], the audit
//! log and snapshots through [`crate::admin`]). A few functions stay public
//! but hidden from the docs, each marked as a test hook with the reason.

use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::{PgPool, Row};

use crate::error::{Error, Result};

pub(crate) mod admin;
pub(crate) mod effects;
pub(crate) mod failure;
/// Public for [`inbox::ensure_days`] only; its other items are the library's
/// (or test hooks).
pub mod inbox;
mod migrate;
pub(crate) mod offsets;
pub(crate) mod outbox;
pub(crate) mod projection;
#[doc(hidden)]
pub use migrate::migrate_up_to;
pub use migrate::{migrate, MIGRATIONS};

/// `url` (a `postgres://` URL) with its database replaced by `db`.
// Test hook: the test kit and the benchmarks make a database per test or
// run with it; not part of the API.
#[doc(hidden)]
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

/// Opens a pool to `url` with `max` connections. A URL that does not parse
/// is a configuration error that says so (and never repeats the password).
pub async fn connect(url: &str, max: u32) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(30))
        .connect(url)
        .await
        .map_err(|e| match e {
            sqlx::Error::Configuration(c) => Error::Config(format!(
                "the database URL {} is not valid ({c}): expected postgres://user:password@host:port/database",
                redact_url(url)
            )),
            other => Error::Db(other),
        })
}

/// `url` with its password replaced by `***`, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Version guard: records `version` for the entity if it is newer than the
/// stored one. Returns false for a stale (or equal) version.
pub(crate) async fn apply_version(
    conn: &mut PgConnection,
    consumer: &str,
    entity_type: &str,
    entity_id: &[u8],
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
pub(crate) struct NewDeadLetter<'a> {
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
pub(crate) async fn insert_dead_letter(conn: &mut PgConnection, dl: &NewDeadLetter<'_>) -> Result<i64> {
    let (keys, values): (Vec<Vec<u8>>, Vec<Option<Vec<u8>>>) = dl.record.headers.to_vec().into_iter().unzip();
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
    .bind(&*dl.record.topic)
    .bind(dl.record.partition)
    .bind(dl.record.offset)
    .bind(dl.record.timestamp_ms)
    .bind(dl.event_id.map(pg_text))
    .bind(dl.record.key.as_deref())
    .bind(dl.record.payload.as_deref())
    .bind(&keys)
    .bind(&values)
    .bind(pg_text(dl.reason))
    .bind(pg_text(dl.error))
    .bind(pg_text(dl.error_class))
    .bind(dl.attempts)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row.try_get(0)?)
}

/// Runs `SAVEPOINT`, `RELEASE SAVEPOINT` or `ROLLBACK TO SAVEPOINT` for the
/// per-event savepoint of a batch.
pub(crate) async fn savepoint(conn: &mut PgConnection, op: Savepoint) -> Result<()> {
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
pub(crate) enum Savepoint {
    /// `SAVEPOINT`.
    Begin,
    /// `RELEASE SAVEPOINT`.
    Release,
    /// `ROLLBACK TO SAVEPOINT`.
    Rollback,
}

/// Sets `search_path` for the rest of the transaction (`set_config(...,
/// true)`, the function form of `SET LOCAL`, so the value is a bound
/// parameter, never SQL text).
pub(crate) async fn set_local_search_path(conn: &mut sqlx::PgConnection, path: &str) -> Result<()> {
    sqlx::query("SELECT set_config('search_path', $1, true)").bind(path).execute(&mut *conn).await?;
    Ok(())
}

/// Registers (or updates) a consumer and its inbox retention; returns the
/// consumer's number (its inbox rows carry it instead of the name).
// Test hook: the inbox tests (`oncely/tests/inbox.rs`, the test kit's
// `guards.rs`) and the claim benchmark register consumers without running
// one; not part of the API.
#[doc(hidden)]
pub async fn register_consumer(pool: &PgPool, name: &str, inbox_retention_days: i32) -> Result<i32> {
    Ok(sqlx::query_scalar(
        "INSERT INTO oncely.consumers (name, inbox_retention_days) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET inbox_retention_days = EXCLUDED.inbox_retention_days, started_at = now()
         RETURNING id",
    )
    .bind(name)
    .bind(inbox_retention_days)
    .fetch_one(pool)
    .await?)
}

/// The number of a registered consumer.
// Test hook: `oncely/tests/inbox.rs` checks the numbers a migration gave;
// not part of the API.
#[doc(hidden)]
pub async fn consumer_id(pool: &PgPool, name: &str) -> Result<Option<i32>> {
    Ok(sqlx::query_scalar("SELECT id FROM oncely.consumers WHERE name = $1").bind(name).fetch_optional(pool).await?)
}

/// [`consumer_id`] inside a transaction.
pub(crate) async fn consumer_id_in(conn: &mut sqlx::PgConnection, name: &str) -> Result<Option<i32>> {
    Ok(sqlx::query_scalar("SELECT id FROM oncely.consumers WHERE name = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?)
}

/// Whether `name` is a consumer registered in this database (an oncely group).
pub(crate) async fn is_consumer(pool: &PgPool, name: &str) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM oncely.consumers WHERE name = $1").bind(name).fetch_optional(pool).await?.is_some())
}

/// The longest inbox retention of the registered consumers, in days: how
/// long the shared inbox keeps a claimed identity (`None`: no consumer).
pub(crate) async fn longest_inbox_retention_days(pool: &PgPool) -> Result<Option<i32>> {
    Ok(sqlx::query_scalar("SELECT max(inbox_retention_days) FROM oncely.consumers").fetch_one(pool).await?)
}

/// Applies the inbox retention of every registered consumer (the longest
/// wins: the inbox is shared): see `inbox::trim`.
// Test hook: the retention tests run a pass now instead of waiting for the
// consumer's hourly one; not part of the API.
#[doc(hidden)]
pub async fn trim_inbox(pool: &PgPool) -> Result<inbox::Trimmed> {
    match longest_inbox_retention_days(pool).await? {
        Some(days) => inbox::trim(pool, days).await,
        None => Ok(inbox::Trimmed::default()),
    }
}

/// `s` as PostgreSQL `text` can hold it: NUL (which `text` refuses with
/// SQLSTATE 22021, failing the whole transaction) written as `\0`. For the
/// text columns that may receive what a record or a handler carries (error
/// messages, reasons, identities shown to people); the bytes themselves are
/// kept in `bytea` columns.
pub(crate) fn pg_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\\0"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// Whether `e` is PostgreSQL's `lock_not_available` (a `lock_timeout` ran out).
pub(crate) fn is_lock_timeout(e: &sqlx::Error) -> bool {
    has_sqlstate(e, "55P03")
}

/// Whether `e` is `in_failed_sql_transaction`: an earlier statement of the
/// transaction failed (and someone swallowed the error), so every later one
/// fails until a rollback.
pub(crate) fn is_aborted_transaction(e: &sqlx::Error) -> bool {
    has_sqlstate(e, "25P02")
}

fn has_sqlstate(e: &sqlx::Error, code: &str) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some(code))
}

/// A round trip in the caller's transaction that fails if the transaction is
/// aborted (PostgreSQL answers `COMMIT` of an aborted transaction with a
/// rollback, not an error).
pub(crate) async fn ping_tx(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT 1").execute(&mut *conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_in_messages() {
        assert_eq!(redact_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
