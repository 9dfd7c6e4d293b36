//! SQL of the inbox (`oncely.inbox`): the claim of a batch's identities, its
//! undo, and the day partitions' upkeep.
//!
//! A row is `(id uuid, consumer_id int, claimed_on date)`: the 16-byte key of
//! the identity ([`crate::envelope::inbox_key`]), the consumer's number and the
//! day it was claimed. The table is range-partitioned on the key; for the
//! time-ordered keys of UUIDv7 identities one partition holds one UTC day of
//! keys, so every copy of an event lands in the same partition and the
//! primary key alone finds a duplicate.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::postgres::PgConnection;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::{Error, Result};

/// The fence and the claim in one statement: every key goes to the insert,
/// whose `ON CONFLICT` finds the duplicates.
const FENCE_AND_CLAIM: &str = r#"WITH fence AS (
               UPDATE oncely.offsets SET next_offset = $6, updated_at = now()
                WHERE consumer = $1 AND topic = $2 AND partition = $3 AND epoch = $4
                  AND next_offset IS NOT DISTINCT FROM $5
               RETURNING 1
           ), claimed AS (
               INSERT INTO oncely.inbox (id, consumer_id)
               SELECT k, $7 FROM unnest($8::uuid[]) WITH ORDINALITY AS x(k, ord)
                WHERE EXISTS (SELECT 1 FROM fence)
                ORDER BY x.ord
               ON CONFLICT DO NOTHING
               RETURNING id
           )
           SELECT (SELECT count(*) FROM fence)::int8, coalesce((SELECT array_agg(id) FROM claimed), '{}')"#;

/// The fence alone (the first statement of a probing claim).
const FENCE: &str = "UPDATE oncely.offsets SET next_offset = $6, updated_at = now()
      WHERE consumer = $1 AND topic = $2 AND partition = $3 AND epoch = $4 AND next_offset IS NOT DISTINCT FROM $5";

/// The claim after [`FENCE`], in a statement of its own: keys already
/// claimed are filtered out by a plain index probe, and only the others reach
/// the insert. For a batch of duplicates that costs PostgreSQL about 0.8×
/// what the speculative insert of `ON CONFLICT` does (pgbench, 500 keys); for
/// a batch of new keys about 1.14× (one probe more per key). A key claimed
/// by another transaction after the statement's snapshot passes the probe and
/// is caught by `ON CONFLICT` as before.
///
/// Not in the fence's statement: a statement's snapshot is taken before the
/// fence waits for the offsets row's lock, and a projection swap holds that
/// lock while it exchanges the inbox rows. `ON CONFLICT` sees the exchanged
/// rows anyway; a probe in the same statement would see the old ones, and
/// skip as a duplicate a key the old inbox held and the swapped-in one does
/// not. The claim's own statement starts after the fence holds the lock, so
/// after the swap committed.
const CLAIM_PROBING: &str = "INSERT INTO oncely.inbox (id, consumer_id)
     SELECT k, $1 FROM unnest($2::uuid[]) WITH ORDINALITY AS x(k, ord)
      WHERE NOT EXISTS (SELECT 1 FROM oncely.inbox i WHERE i.id = x.k AND i.consumer_id = $1)
      ORDER BY x.ord
     ON CONFLICT DO NOTHING
     RETURNING id";

/// Inserts the keys of a batch into the inbox **after** the offset fence, in
/// the same transaction; returns `None` if the fence failed (nothing was
/// inserted), else the keys that were new (not yet claimed by this
/// consumer). A key given twice is returned once.
///
/// `expect_duplicates` (the lane's previous batch was all duplicates: a
/// replay) runs the fence, then [`CLAIM_PROBING`]; otherwise both are one
/// statement ([`FENCE_AND_CLAIM`]). The result is the same either way.
///
/// Fence first: the `UPDATE` of the partition's offsets row takes its row lock
/// before any inbox row is written, so two members racing on a partition are
/// serialised on that row; a zombie's open batch blocks the new owner's fence
/// (see [`super::offsets`] for how that wait is bounded), never its claims.
pub(crate) async fn fence_and_claim(
    conn: &mut PgConnection,
    fence: &super::offsets::Fence<'_>,
    consumer_id: i32,
    keys: &[Uuid],
    expect_duplicates: bool,
) -> Result<Option<HashSet<Uuid>>> {
    let sql = if expect_duplicates { FENCE } else { FENCE_AND_CLAIM };
    let query = sqlx::query(sql)
        .bind(fence.consumer)
        .bind(fence.topic)
        .bind(fence.partition)
        .bind(fence.epoch)
        .bind(fence.expected)
        .bind(fence.next);
    if expect_duplicates {
        if query.execute(&mut *conn).await?.rows_affected() != 1 {
            return Ok(None);
        }
        let rows = sqlx::query(CLAIM_PROBING).bind(consumer_id).bind(keys).fetch_all(&mut *conn).await?;
        return returned_ids(&rows).map(Some);
    }
    let row = query.bind(consumer_id).bind(keys).fetch_one(&mut *conn).await?;
    let fenced: i64 = row.try_get(0)?;
    if fenced != 1 {
        return Ok(None);
    }
    let claimed: Vec<Uuid> = row.try_get(1)?;
    Ok(Some(claimed.into_iter().collect()))
}

/// Inserts keys without a fence (the parked-key path, whose transaction has
/// fenced already); returns the new ones.
// Test hook: `oncely/tests/inbox.rs` and the test kit's `guards.rs` claim
// keys directly to check what the inbox keeps; not part of the API.
#[doc(hidden)]
pub async fn claim(conn: &mut PgConnection, consumer_id: i32, keys: &[Uuid]) -> Result<HashSet<Uuid>> {
    let rows = sqlx::query(
        "INSERT INTO oncely.inbox (id, consumer_id) SELECT k, $1 FROM unnest($2::uuid[]) AS x(k)
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(consumer_id)
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?;
    returned_ids(&rows)
}

/// The ids an `INSERT … RETURNING id` gave.
fn returned_ids(rows: &[sqlx::postgres::PgRow]) -> Result<HashSet<Uuid>> {
    rows.iter().map(|r| r.try_get::<Uuid, _>(0).map_err(Error::from)).collect()
}

/// Deletes claims made earlier **in the same transaction** (events of the
/// batch that were parked or dead-lettered instead of applied). Callers pass
/// only keys the claim returned as new, so another lane's committed row is
/// never touched: `(id, consumer_id)` is one row, and it was inserted here.
pub(crate) async fn unclaim(conn: &mut PgConnection, consumer_id: i32, keys: &[Uuid]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM oncely.inbox WHERE consumer_id = $1 AND id = ANY($2)")
        .bind(consumer_id)
        .bind(keys)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Whether `consumer_id` has claimed `key` (operators: "was event X applied?").
// Test hook: `oncely/tests/inbox.rs` checks claims a migration carried
// over; not part of the API.
#[doc(hidden)]
pub async fn is_claimed(pool: &PgPool, consumer_id: i32, key: Uuid) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM oncely.inbox WHERE id = $1 AND consumer_id = $2")
        .bind(key)
        .bind(consumer_id)
        .fetch_optional(pool)
        .await?
        .is_some())
}

/// The inbox key computed by the database (`oncely.inbox_key`), for tests
/// that keep it equal to [`crate::envelope::inbox_key`] and for operators.
// Test hook: `oncely/tests/inbox.rs` keeps the SQL key equal to the
// Rust one; not part of the API.
#[doc(hidden)]
pub async fn key_in_sql(pool: &PgPool, identity: &[u8]) -> Result<Uuid> {
    Ok(sqlx::query_scalar("SELECT oncely.inbox_key($1)").bind(identity).fetch_one(pool).await?)
}

/// How long partition DDL may wait for its lock. `CREATE`/`ATTACH` wait only
/// for claims on the default partition, but dropping a day needs the inbox's
/// ACCESS EXCLUSIVE lock, and while it waits every new claim queues behind it:
/// behind one long handler transaction that would freeze every consumer of
/// the database. So it gives up quickly and tries again later.
pub(crate) const DDL_LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// Creates the day partitions from yesterday to `days_ahead` days ahead
/// (UTC); returns how many were created. Gives up after one second (`DDL_LOCK_TIMEOUT`)
/// if the default partition is busy (an error: try again later).
pub async fn ensure_days(pool: &PgPool, days_ahead: i32) -> Result<i32> {
    let mut tx = pool.begin_with(begin_with_lock_timeout(DDL_LOCK_TIMEOUT)).await?;
    let created: i32 =
        sqlx::query_scalar("SELECT oncely.ensure_inbox_days(((now() AT TIME ZONE 'UTC')::date) - 1, $1 + 2)")
            .bind(days_ahead)
            .fetch_one(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(created)
}

/// `BEGIN` with a `lock_timeout` for the transaction, in one round trip.
pub(crate) fn begin_with_lock_timeout(d: Duration) -> String {
    format!("BEGIN; SET LOCAL lock_timeout = {}", d.as_millis().max(1))
}

/// The days that have a partition, oldest first.
// Test hook: `oncely/tests/envelope_kafka.rs` checks the day partitions;
// not part of the API.
#[doc(hidden)]
pub async fn days(pool: &PgPool) -> Result<Vec<chrono::NaiveDate>> {
    let rows = sqlx::query(
        r#"SELECT to_date(substr(c.relname, 8), 'YYYYMMDD')
             FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             JOIN pg_namespace n ON n.oid = p.relnamespace
            WHERE n.nspname = 'oncely' AND p.relname = 'inbox' AND c.relname ~ '^inbox_d[0-9]{8}$'
            ORDER BY 1"#,
    )
    .fetch_all(pool)
    .await?;
    rows.iter().map(|r| r.try_get(0).map_err(Error::from)).collect()
}

/// What one retention pass did.
// Public (hidden) as what the `trim_inbox` test hook returns.
#[doc(hidden)]
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Trimmed {
    /// Day partitions dropped.
    pub dropped: Vec<String>,
    /// Day partitions past retention kept because they hold rows claimed
    /// within it (an event redriven with its old identity).
    pub kept: Vec<String>,
    /// Rows deleted from the timeless and default partitions.
    pub deleted: u64,
}

/// Applies `retention_days` to the inbox: drops each day partition whose keys
/// and claims are all older than the retention (detached under a short
/// `lock_timeout`, then dropped), and deletes older claims from the timeless
/// and default partitions. A day whose detach cannot get its lock in time is
/// left for the next pass (reported in neither list).
pub(crate) async fn trim(pool: &PgPool, retention_days: i32) -> Result<Trimmed> {
    let mut out = Trimmed::default();
    let rows = sqlx::query(
        r#"SELECT c.relname
             FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             JOIN pg_namespace n ON n.oid = p.relnamespace
            WHERE n.nspname = 'oncely' AND p.relname = 'inbox' AND c.relname ~ '^inbox_d[0-9]{8}$'
              AND to_date(substr(c.relname, 8), 'YYYYMMDD') + 1 <= ((now() AT TIME ZONE 'UTC')::date) - $1
            ORDER BY c.relname"#,
    )
    .bind(retention_days)
    .fetch_all(pool)
    .await?;
    for r in rows {
        let name: String = r.try_get(0)?;
        // The name matched ^inbox_d[0-9]{8}$, so it needs no quoting; quote anyway.
        let recent: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM oncely.\"{name}\"
                             WHERE claimed_on > ((now() AT TIME ZONE 'UTC')::date) - $1)"
        ))
        .bind(retention_days)
        .fetch_one(pool)
        .await?;
        if recent {
            out.kept.push(name);
            continue;
        }
        let mut tx = pool.begin_with(begin_with_lock_timeout(DDL_LOCK_TIMEOUT)).await?;
        match sqlx::query(&format!("ALTER TABLE oncely.inbox DETACH PARTITION oncely.\"{name}\""))
            .execute(&mut *tx)
            .await
        {
            Ok(_) => {}
            Err(e) if super::is_lock_timeout(&e) => {
                tracing::info!(partition = %name, "Dropping an inbox partition waited too long for its lock; trying again later.");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        sqlx::query(&format!("DROP TABLE oncely.\"{name}\"")).execute(&mut *tx).await?;
        tx.commit().await?;
        out.dropped.push(name);
    }
    for part in ["inbox_timeless", "inbox_default"] {
        let n = sqlx::query(&format!(
            "DELETE FROM oncely.{part} WHERE claimed_on <= ((now() AT TIME ZONE 'UTC')::date) - $1 - 1"
        ))
        .bind(retention_days)
        .execute(pool)
        .await?
        .rows_affected();
        out.deleted += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_sets_the_lock_timeout_in_milliseconds() {
        assert_eq!(begin_with_lock_timeout(Duration::from_millis(1500)), "BEGIN; SET LOCAL lock_timeout = 1500");
        assert_eq!(begin_with_lock_timeout(Duration::ZERO), "BEGIN; SET LOCAL lock_timeout = 1");
    }
}
