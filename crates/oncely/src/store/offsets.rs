//! SQL of the consumer offsets (`oncely.offsets`): where each consumer is, per
//! partition, and who owns the partition (the epoch).
//!
//! Kafka's committed offset is a copy for lag tools; this row is the truth. A
//! lane that takes a partition over increments `epoch` ([`take_over`]); every
//! batch then fences on `(epoch, next_offset)` before it writes anything, so a
//! zombie member (one Kafka has already replaced) can never commit a batch
//! after the new owner took over, and the new owner starts exactly where the
//! last committed batch ended.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{PgPool, Row};

use crate::error::{Error, Result};

/// The compare-and-set of one batch: from `expected` to `next`, only while the
/// row is at `epoch`.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    /// Consumer name.
    pub consumer: &'a str,
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// The owner epoch this lane took over with.
    pub epoch: i64,
    /// The `next_offset` the row must hold (`None`: no position yet).
    pub expected: Option<i64>,
    /// The `next_offset` to set.
    pub next: i64,
}

/// A partition's row as a lane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owned {
    /// The epoch of the current owner.
    pub epoch: i64,
    /// Where the next batch starts (`None`: never processed).
    pub next_offset: Option<i64>,
}

/// Takes the partition over: increments its epoch (creating the row, with no
/// position, if it has none) and returns the new epoch and the position.
///
/// It waits for the row lock of any batch still open on the partition (a
/// previous owner's), at most `lock_timeout`: on timeout it returns
/// `Ok(None)` and the caller decides (see [`lock_holder`]).
pub async fn take_over(
    pool: &PgPool,
    consumer: &str,
    topic: &str,
    partition: i32,
    lock_timeout: Duration,
) -> Result<Option<Owned>> {
    let mut tx = pool.begin_with(super::inbox::begin_with_lock_timeout(lock_timeout)).await?;
    let res = sqlx::query(
        "INSERT INTO oncely.offsets AS o (consumer, topic, partition, next_offset, epoch) VALUES ($1, $2, $3, NULL, 1)
         ON CONFLICT (consumer, topic, partition) DO UPDATE SET epoch = o.epoch + 1, updated_at = now()
         RETURNING epoch, next_offset",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .fetch_one(&mut *tx)
    .await;
    let row = match res {
        Ok(r) => r,
        Err(e) if super::is_lock_timeout(&e) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let owned = Owned { epoch: row.try_get(0)?, next_offset: row.try_get(1)? };
    tx.commit().await?;
    Ok(Some(owned))
}

/// The fence without a move, for transactions that do not advance the
/// offset (the parked-key path): locks the row if it is still at
/// `(epoch, expected)`; false if not.
pub async fn fence_in_place(
    conn: &mut PgConnection,
    consumer: &str,
    topic: &str,
    partition: i32,
    epoch: i64,
    expected: Option<i64>,
) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE oncely.offsets SET updated_at = now()
          WHERE consumer = $1 AND topic = $2 AND partition = $3 AND epoch = $4 AND next_offset IS NOT DISTINCT FROM $5",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .bind(epoch)
    .bind(expected)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// The partition's row now (after a failed fence: was it another owner, or
/// did someone move the offset?).
pub async fn read(pool: &PgPool, consumer: &str, topic: &str, partition: i32) -> Result<Option<Owned>> {
    let row = sqlx::query(
        "SELECT epoch, next_offset FROM oncely.offsets WHERE consumer = $1 AND topic = $2 AND partition = $3",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await?;
    row.map(|r| Ok(Owned { epoch: r.try_get(0)?, next_offset: r.try_get(1)? })).transpose()
}

/// A session holding the row lock of a partition's offsets (a batch in
/// progress, or a zombie's batch that never ended).
#[derive(Debug, Clone, PartialEq)]
pub struct LockHolder {
    /// Backend pid.
    pub pid: i32,
    /// `pg_stat_activity.state` (`active`, `idle in transaction`, ...).
    pub state: Option<String>,
    /// How long its transaction has been open.
    pub transaction_age: Duration,
    /// `application_name`.
    pub application: Option<String>,
}

/// Who holds the row lock of the partition's offsets row, if anyone: the
/// transaction in the row's `xmax`, found in `pg_locks`.
pub async fn lock_holder(pool: &PgPool, consumer: &str, topic: &str, partition: i32) -> Result<Option<LockHolder>> {
    let row = sqlx::query(
        "SELECT a.pid, a.state, extract(epoch FROM now() - a.xact_start)::float8, a.application_name
           FROM oncely.offsets o
           JOIN pg_locks l ON l.locktype = 'transactionid' AND l.transactionid = o.xmax
                          AND l.mode = 'ExclusiveLock' AND l.granted
           JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE o.consumer = $1 AND o.topic = $2 AND o.partition = $3 AND a.pid <> pg_backend_pid()",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(LockHolder {
            pid: r.try_get(0)?,
            state: r.try_get(1)?,
            transaction_age: Duration::from_secs_f64(r.try_get::<Option<f64>, _>(2)?.unwrap_or(0.0).max(0.0)),
            application: r.try_get(3)?,
        })
    })
    .transpose()
}

/// Ends a backend (`pg_terminate_backend`): its transaction rolls back.
/// Returns whether it was signalled (false without the privilege: members
/// must connect as the same role, or one with `pg_signal_backend`).
pub async fn terminate_backend(pool: &PgPool, pid: i32) -> Result<bool> {
    match sqlx::query_scalar::<_, bool>("SELECT pg_terminate_backend($1)").bind(pid).fetch_one(pool).await {
        Ok(b) => Ok(b),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42501") => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// All positions of a consumer: `(topic, partition) -> next_offset`.
pub async fn of_consumer(pool: &PgPool, consumer: &str) -> Result<HashMap<(String, i32), i64>> {
    let rows = sqlx::query(
        "SELECT topic, partition, next_offset FROM oncely.offsets WHERE consumer = $1 AND next_offset IS NOT NULL",
    )
    .bind(consumer)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| Ok(((r.try_get::<String, _>(0)?, r.try_get::<i32, _>(1)?), r.try_get::<i64, _>(2)?)))
        .collect::<Result<_>>()
        .map_err(|e: Error| e)
}
