//! SQL of side-effect intents (`oncely.effects`).

use std::time::Duration;

use sqlx::{PgConnection, PgPool, Row};

use crate::error::{Error, Result};

/// An intent to record.
#[derive(Debug, Clone)]
pub struct NewIntent {
    /// `<consumer>/<effect>/<event identity>[/<suffix>]`.
    pub key: String,
    /// Consumer name.
    pub consumer: String,
    /// Effect name (the registered executor).
    pub effect: String,
    /// Event identity.
    pub event_id: String,
    /// JSON payload for the executor.
    pub payload: serde_json::Value,
    /// `at_least_once` or `at_most_once`.
    pub semantics: &'static str,
    /// `pending`, or `suppressed` in replay mode.
    pub status: &'static str,
    /// Effect + entity when the caller asks for order.
    pub ordering_key: Option<String>,
}

/// Records intents; an intent whose key exists already is left as it is.
/// Returns how many were new.
pub async fn record(conn: &mut PgConnection, intents: &[NewIntent]) -> Result<u64> {
    let mut n = 0;
    for i in intents {
        n += sqlx::query(
            "INSERT INTO oncely.effects (key, consumer, effect, event_id, payload, semantics, status, ordering_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (key) DO NOTHING",
        )
        .bind(&i.key)
        .bind(&i.consumer)
        .bind(&i.effect)
        .bind(&i.event_id)
        .bind(&i.payload)
        .bind(i.semantics)
        .bind(i.status)
        .bind(&i.ordering_key)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    Ok(n)
}

/// An intent as stored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Intent {
    /// Its key (also the idempotency key to pass to the provider).
    pub key: String,
    /// Consumer.
    pub consumer: String,
    /// Effect name.
    pub effect: String,
    /// Event identity.
    pub event_id: String,
    /// Payload.
    pub payload: serde_json::Value,
    /// Semantics.
    pub semantics: String,
    /// Status.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// When due (pending).
    pub next_attempt_at: chrono::DateTime<chrono::Utc>,
    /// Result of the last successful call.
    pub result: Option<serde_json::Value>,
    /// Last error.
    pub last_error: Option<String>,
    /// Recorded at.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Last change.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

const COLUMNS: &str = "key, consumer, effect, event_id, payload, semantics, status, attempts, next_attempt_at, \
                       result, last_error, created_at, updated_at";

fn to_intent(r: &sqlx::postgres::PgRow) -> Result<Intent> {
    Ok(Intent {
        key: r.try_get("key")?,
        consumer: r.try_get("consumer")?,
        effect: r.try_get("effect")?,
        event_id: r.try_get("event_id")?,
        payload: r.try_get("payload")?,
        semantics: r.try_get("semantics")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        result: r.try_get("result")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

/// Claims up to `limit` due intents of the given effects: marks them
/// `running` with a lease, increments `attempts` and returns them. The
/// returned `attempts` is the attempt's fencing token: [`finish`],
/// [`retry_later`] and [`renew`] take it, and nothing ever lowers `attempts`,
/// so a later claim always has a higher token. An at-most-once intent is
/// claimed in its own commit before the call, so a crash mid-call leaves it
/// `running` (and then `unknown`), never silently retried. Intents with an
/// ordering key wait until every earlier intent of that key is finished.
pub async fn claim_due(pool: &PgPool, effects: &[String], limit: i64, lease: Duration) -> Result<Vec<Intent>> {
    let sql = format!(
        "UPDATE oncely.effects e
            SET status = 'running', lease_until = now() + make_interval(secs => $3::float8),
                attempts = e.attempts + 1, started_at = now(), updated_at = now()
          WHERE e.key IN (
                SELECT c.key FROM oncely.effects c
                 WHERE c.status = 'pending' AND c.next_attempt_at <= now() AND c.effect = ANY($1)
                   AND (c.ordering_key IS NULL OR NOT EXISTS (
                        SELECT 1 FROM oncely.effects p
                         WHERE p.ordering_key = c.ordering_key AND p.seq < c.seq
                           AND p.status IN ('pending', 'running', 'unknown')))
                 ORDER BY c.next_attempt_at, c.seq
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)
          RETURNING {COLUMNS}"
    );
    let rows = sqlx::query(&sql).bind(effects).bind(limit).bind(lease.as_secs_f64()).fetch_all(pool).await?;
    rows.iter().map(to_intent).collect()
}

/// Marks a running intent finished with `status` (`done`, `failed`, `dead`,
/// `unknown`), fenced by `attempt`, the attempt's token (the `attempts`
/// value its claim returned). Only if the intent is still `running` under
/// that attempt: an operator may have resolved it, or its lease expired and
/// it was reaped or claimed by another executor since. Returns whether it
/// was written.
pub async fn finish(
    pool: &PgPool,
    key: &str,
    attempt: i32,
    status: &str,
    result: Option<&serde_json::Value>,
    error: Option<&str>,
) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE oncely.effects SET status = $3, result = coalesce($4, result), last_error = coalesce($5, last_error),
                lease_until = NULL, finished_at = now(), updated_at = now()
          WHERE key = $1 AND attempts = $2 AND status = 'running'",
    )
    .bind(key)
    .bind(attempt)
    .bind(status)
    .bind(result)
    .bind(error.map(super::pg_text))
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Puts a running intent back to `pending`, due after `retry_in`; fenced by
/// `attempt` like [`finish`].
pub async fn retry_later(pool: &PgPool, key: &str, attempt: i32, retry_in: Duration, error: &str) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE oncely.effects SET status = 'pending', lease_until = NULL, last_error = $4,
                next_attempt_at = now() + make_interval(secs => $3::float8), updated_at = now()
          WHERE key = $1 AND attempts = $2 AND status = 'running'",
    )
    .bind(key)
    .bind(attempt)
    .bind(retry_in.as_secs_f64())
    .bind(super::pg_text(error))
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Extends the lease of a running intent to `lease` from now, fenced by
/// `attempt` like [`finish`]. False if the attempt no longer holds it.
pub async fn renew(pool: &PgPool, key: &str, attempt: i32, lease: Duration) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE oncely.effects SET lease_until = now() + make_interval(secs => $3::float8)
          WHERE key = $1 AND attempts = $2 AND status = 'running'",
    )
    .bind(key)
    .bind(attempt)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Intents whose lease expired (their executor died mid-call, or lost the
/// database for longer than the lease): by the semantics stored with each
/// intent, at-least-once ones go back to `pending` (the retry carries the
/// same idempotency key), at-most-once ones become `unknown`. Returns
/// `(requeued, unknown)`.
pub async fn reap_expired(pool: &PgPool) -> Result<(u64, u64)> {
    let requeued = sqlx::query(
        "UPDATE oncely.effects SET status = 'pending', lease_until = NULL, next_attempt_at = now(), updated_at = now(),
                last_error = coalesce(last_error, 'the executor stopped during the call')
          WHERE status = 'running' AND lease_until < now() AND semantics = 'at_least_once'",
    )
    .execute(pool)
    .await?
    .rows_affected();
    let unknown = sqlx::query(
        "UPDATE oncely.effects SET status = 'unknown', lease_until = NULL, updated_at = now(),
                last_error = 'interrupted during the call: the outcome is unknown; resolve it with `oncely effects resolve`'
          WHERE status = 'running' AND lease_until < now() AND semantics = 'at_most_once'",
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok((requeued, unknown))
}

/// Lists intents, newest first.
pub async fn list(pool: &PgPool, status: Option<&str>, consumer: Option<&str>, limit: i64) -> Result<Vec<Intent>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM oncely.effects
          WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR consumer = $2)
          ORDER BY created_at DESC, seq DESC LIMIT $3"
    );
    let rows = sqlx::query(&sql).bind(status).bind(consumer).bind(limit).fetch_all(pool).await?;
    rows.iter().map(to_intent).collect()
}

/// One intent by key.
pub async fn get(pool: &PgPool, key: &str) -> Result<Option<Intent>> {
    let sql = format!("SELECT {COLUMNS} FROM oncely.effects WHERE key = $1");
    sqlx::query(&sql).bind(key).fetch_optional(pool).await?.as_ref().map(to_intent).transpose()
}

/// Operator: sets the status of an intent that is in one of `from`. Returns
/// the status it had, or `None` if it was not in one of them. `attempts` is
/// kept (it is the fencing token of the next claim).
pub async fn set_status(pool: &PgPool, key: &str, from: &[&str], to: &str, note: &str) -> Result<Option<String>> {
    let from: Vec<String> = from.iter().map(|s| (*s).to_owned()).collect();
    let row = sqlx::query(
        "UPDATE oncely.effects e SET status = $3, next_attempt_at = now(), lease_until = NULL, updated_at = now(),
                last_error = CASE WHEN $4 = '' THEN e.last_error ELSE $4 END,
                finished_at = CASE WHEN $3 IN ('done', 'failed') THEN now() ELSE e.finished_at END
           FROM (SELECT key, status AS old FROM oncely.effects WHERE key = $1 FOR UPDATE) o
          WHERE e.key = o.key AND o.old = ANY($2)
          RETURNING o.old",
    )
    .bind(key)
    .bind(&from)
    .bind(to)
    .bind(note)
    .fetch_optional(pool)
    .await?;
    row.map(|r| r.try_get(0).map_err(Error::from)).transpose()
}

/// Counts by status for one consumer's effect (tests and status views).
pub async fn count_by_status(pool: &PgPool, effect: &str) -> Result<Vec<(String, i64)>> {
    let rows = sqlx::query("SELECT status, count(*) FROM oncely.effects WHERE effect = $1 GROUP BY status ORDER BY 1")
        .bind(effect)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}
