//! SQL of the transactional outbox (`oncely.outbox`, migrations 2 and 6):
//! enqueue, the relay's lane locks, claim and mark, rows set aside,
//! retention and status.
//!
//! Lane ownership is a session-level advisory lock with the two-`int4` key
//! `(namespace, lane)`; `pg_locks` shows it as `classid = namespace`,
//! `objid = lane`, `objsubid = 2`. Advisory locks are per database, so every
//! lookup in `pg_locks` is restricted to the current database.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgConnection;
use sqlx::{PgPool, Row};

use crate::error::{Error, Result};

/// A header as stored: its name's bytes and its value (`None`: a null value,
/// which Kafka distinguishes from an empty one).
pub type HeaderRef<'a> = (&'a [u8], Option<&'a [u8]>);

/// A row to insert into the outbox.
#[derive(Debug, Clone, Copy)]
pub struct NewOutboxRow<'a> {
    /// The lane (`crate::outbox::lane_of` the key).
    pub lane: i16,
    /// Destination topic.
    pub topic: &'a str,
    /// Kafka key.
    pub key: Option<&'a [u8]>,
    /// Payload.
    pub payload: Option<&'a [u8]>,
    /// Headers, in order, as bytes.
    pub headers: &'a [HeaderRef<'a>],
    /// The `ce_id`, when the record has one (not recorded if it holds NUL,
    /// which `text` cannot: the row's headers keep it).
    pub ce_id: Option<&'a str>,
}

/// Columns per row in [`insert`]; PostgreSQL allows 65,535 parameters per statement.
const INSERT_COLUMNS: usize = 7;
/// Rows per `INSERT` statement in [`insert`].
const INSERT_CHUNK: usize = 65_535 / INSERT_COLUMNS;

/// Inserts rows in the caller's transaction; returns their ids in input order.
/// One statement per 9,362 rows.
pub async fn insert(conn: &mut PgConnection, rows: &[NewOutboxRow<'_>]) -> Result<Vec<i64>> {
    let mut ids = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(INSERT_CHUNK) {
        let mut sql = String::from(
            "INSERT INTO oncely.outbox (lane, topic, key, payload, header_keys, header_values, ce_id) VALUES ",
        );
        for i in 0..chunk.len() {
            let b = i * INSERT_COLUMNS;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7
            ));
        }
        sql.push_str(" RETURNING id");
        let mut q = sqlx::query(&sql);
        for r in chunk {
            let keys: Vec<&[u8]> = r.headers.iter().map(|(k, _)| *k).collect();
            let values: Vec<Option<&[u8]>> = r.headers.iter().map(|(_, v)| *v).collect();
            q = q
                .bind(r.lane)
                .bind(r.topic)
                .bind(r.key)
                .bind(r.payload)
                .bind(keys)
                .bind(values)
                .bind(r.ce_id.filter(|id| !id.contains('\0')));
        }
        let mut chunk_ids: Vec<i64> = q
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<std::result::Result<_, _>>()?;
        // The ids are drawn from the sequence row by row, in VALUES order;
        // RETURNING's order is not promised, so sort.
        chunk_ids.sort_unstable();
        ids.extend(chunk_ids);
    }
    Ok(ids)
}

/// A row the relay publishes.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Row id (the publish order within a lane).
    pub id: i64,
    /// Destination topic.
    pub topic: String,
    /// Kafka key.
    pub key: Option<Vec<u8>>,
    /// Payload.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order: name and value (`None`: a null value), as bytes.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// When it was enqueued (the Kafka record timestamp).
    pub created_at: DateTime<Utc>,
}

/// The pending rows of the lanes whose lock the session `lock_pid` holds, in
/// id order, at most `limit`. The ownership is read from `pg_locks` by the
/// same statement, so a relay that lost a lane (its lock connection died)
/// claims nothing of it any more.
///
/// Rows set aside (`failed_at`) are not claimed, and neither is a row with a
/// set-aside row of the same topic and key before it (a lower id) that was
/// not discarded: it is **held**, so that it never overtakes it. Rows
/// without a key hold nothing and are never held. The set-aside rows are
/// normally none, so the check is one probe of the empty `outbox_failed`
/// index per row.
///
/// The owned lanes are one array computed once (an InitPlan): as a join or
/// an `IN (subquery)` the planner expects one row from `pg_locks` and
/// prefers sorting every pending row to walking `outbox_pending` in id order
/// (47 ms against 0.6 ms for 2,000 of 100,000 pending rows).
pub async fn claim(pool: &PgPool, lane_ns: i32, lock_pid: i32, limit: i64) -> Result<Vec<OutboxRow>> {
    let rows = sqlx::query(
        "SELECT o.id, o.topic, o.key, o.payload, o.header_keys, o.header_values, o.created_at
           FROM oncely.outbox o
          WHERE o.published_at IS NULL AND o.failed_at IS NULL
            AND o.lane = ANY((SELECT array_agg(l.objid::integer)
                                FROM pg_locks l
                               WHERE l.locktype = 'advisory'
                                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                                 AND l.classid::bigint = $1 AND l.objsubid = 2
                                 AND l.pid = $2 AND l.granted)::integer[])
            AND NOT EXISTS (SELECT 1 FROM oncely.outbox f
                             WHERE f.failed_at IS NOT NULL AND f.discarded_at IS NULL AND f.published_at IS NULL
                               AND f.lane = o.lane AND f.id < o.id AND f.topic = o.topic AND f.key = o.key)
          ORDER BY o.id
          LIMIT $3",
    )
    .bind(i64::from(lane_ns))
    .bind(lock_pid)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let keys: Vec<Vec<u8>> = r.try_get(4)?;
            let values: Vec<Option<Vec<u8>>> = r.try_get(5)?;
            Ok(OutboxRow {
                id: r.try_get(0)?,
                topic: r.try_get(1)?,
                key: r.try_get(2)?,
                payload: r.try_get(3)?,
                headers: keys.into_iter().zip(values).collect(),
                created_at: r.try_get(6)?,
            })
        })
        .collect()
}

/// Marks rows published (after the broker acknowledged them). Returns how
/// many were still unpublished.
pub async fn mark_published(pool: &PgPool, ids: &[i64]) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE oncely.outbox SET published_at = now(), last_error = NULL
          WHERE id = ANY($1) AND published_at IS NULL",
    )
    .bind(ids)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Records a failed publish attempt of rows that stay pending.
pub async fn record_failure(pool: &PgPool, ids: &[i64], error: &str) -> Result<()> {
    sqlx::query(
        "UPDATE oncely.outbox SET attempts = attempts + 1, last_error = $2
          WHERE id = ANY($1) AND published_at IS NULL",
    )
    .bind(ids)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Sets rows aside, each with its reason: the broker refused them for
/// good. They are claimed no more, and the later rows of their keys are
/// held behind them. Returns how many were still pending.
pub async fn set_aside(pool: &PgPool, ids: &[i64], reasons: &[&str]) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE oncely.outbox o SET failed_at = now(), attempts = o.attempts + 1, last_error = r.reason
           FROM unnest($1::bigint[], $2::text[]) AS r(id, reason)
          WHERE o.id = r.id AND o.published_at IS NULL AND o.failed_at IS NULL",
    )
    .bind(ids)
    .bind(reasons)
    .execute(pool)
    .await?
    .rows_affected())
}

/// A row set aside by the relay, as `oncely outbox list --failed` shows it.
#[derive(Debug, Clone)]
pub struct FailedRow {
    /// Row id.
    pub id: i64,
    /// Lane.
    pub lane: i16,
    /// Destination topic.
    pub topic: String,
    /// Kafka key.
    pub key: Option<Vec<u8>>,
    /// The `ce_id`, when the record has one.
    pub ce_id: Option<String>,
    /// Size of the payload in bytes (`None`: a null payload).
    pub payload_bytes: Option<i64>,
    /// Size of the headers (names and values) in bytes.
    pub header_bytes: i64,
    /// Publish attempts.
    pub attempts: i32,
    /// Why it was set aside.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it was set aside.
    pub failed_at: DateTime<Utc>,
    /// When an operator discarded it (`None`: still holding its key).
    pub discarded_at: Option<DateTime<Utc>>,
    /// Pending rows of its key held behind it.
    pub held: i64,
}

/// Rows set aside, oldest first: the ones still holding their key, and the
/// discarded ones too with `include_discarded`.
pub async fn failed(pool: &PgPool, include_discarded: bool, limit: i64) -> Result<Vec<FailedRow>> {
    let rows = sqlx::query(
        "SELECT f.id, f.lane, f.topic, f.key, f.ce_id, octet_length(f.payload)::bigint,
                coalesce((SELECT sum(coalesce(octet_length(k), 0) + coalesce(octet_length(v), 0))
                            FROM unnest(f.header_keys, f.header_values) AS h(k, v)), 0)::bigint,
                f.attempts, f.last_error, f.created_at, f.failed_at, f.discarded_at,
                CASE WHEN f.discarded_at IS NULL AND f.key IS NOT NULL THEN
                    (SELECT count(*) FROM oncely.outbox o
                      WHERE o.published_at IS NULL AND o.failed_at IS NULL
                        AND o.lane = f.lane AND o.topic = f.topic AND o.key = f.key AND o.id > f.id)
                ELSE 0 END
           FROM oncely.outbox f
          WHERE f.failed_at IS NOT NULL AND f.published_at IS NULL AND ($1 OR f.discarded_at IS NULL)
          ORDER BY f.id
          LIMIT $2",
    )
    .bind(include_discarded)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(FailedRow {
                id: r.try_get(0)?,
                lane: r.try_get(1)?,
                topic: r.try_get(2)?,
                key: r.try_get(3)?,
                ce_id: r.try_get(4)?,
                payload_bytes: r.try_get(5)?,
                header_bytes: r.try_get(6)?,
                attempts: r.try_get(7)?,
                last_error: r.try_get(8)?,
                created_at: r.try_get(9)?,
                failed_at: r.try_get(10)?,
                discarded_at: r.try_get(11)?,
                held: r.try_get(12)?,
            })
        })
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(Error::from)
}

/// Operator: sends rows set aside (and not discarded) back to pending, due
/// at once; `None` sends every one back. Returns the ids sent back.
pub async fn retry_failed(pool: &PgPool, ids: Option<&[i64]>) -> Result<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "UPDATE oncely.outbox SET failed_at = NULL
          WHERE failed_at IS NOT NULL AND discarded_at IS NULL AND published_at IS NULL
            AND ($1::bigint[] IS NULL OR id = ANY($1))
          RETURNING id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?)
}

/// Operator: gives up rows set aside: they are never published, and the
/// rows held behind them go on. `note` is kept with the row's last error.
/// Returns the ids discarded.
pub async fn discard_failed(pool: &PgPool, ids: &[i64], note: &str) -> Result<Vec<i64>> {
    Ok(sqlx::query_scalar(
        "UPDATE oncely.outbox
            SET discarded_at = now(),
                last_error = 'discarded by an operator: ' || $2 || coalesce(' (was: ' || last_error || ')', '')
          WHERE failed_at IS NOT NULL AND discarded_at IS NULL AND published_at IS NULL AND id = ANY($1)
          RETURNING id",
    )
    .bind(ids)
    .bind(note)
    .fetch_all(pool)
    .await?)
}

/// This session's backend pid (the relay's identity in `pg_locks`).
pub async fn backend_pid(conn: &mut PgConnection) -> Result<i32> {
    Ok(sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut *conn).await?)
}

/// Tries to take the session-level advisory lock `(ns, id)`; true if this
/// session holds it now (taking it again while held nests, so callers check
/// [`held_locks`] first).
pub async fn try_lock(conn: &mut PgConnection, ns: i32, id: i32) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)").bind(ns).bind(id).fetch_one(&mut *conn).await?)
}

/// Releases the session-level advisory lock `(ns, id)` once.
pub async fn unlock(conn: &mut PgConnection, ns: i32, id: i32) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_advisory_unlock($1, $2)").bind(ns).bind(id).fetch_one(&mut *conn).await?)
}

/// The ids of the advisory locks `(ns, _)` this session holds, ascending.
pub async fn held_locks(conn: &mut PgConnection, ns: i32) -> Result<Vec<i32>> {
    Ok(sqlx::query_scalar(
        "SELECT l.objid::integer FROM pg_locks l
          WHERE l.locktype = 'advisory'
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND l.classid::bigint = $1 AND l.objsubid = 2
            AND l.pid = pg_backend_pid() AND l.granted
          ORDER BY 1",
    )
    .bind(i64::from(ns))
    .fetch_all(&mut *conn)
    .await?)
}

/// How many sessions hold an advisory lock `(ns, _)` in this database.
pub async fn lock_holders(conn: &mut PgConnection, ns: i32) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(DISTINCT l.pid) FROM pg_locks l
          WHERE l.locktype = 'advisory'
            AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND l.classid::bigint = $1 AND l.objsubid = 2 AND l.granted",
    )
    .bind(i64::from(ns))
    .fetch_one(&mut *conn)
    .await?)
}

/// Numbers of rows waiting to be published (held ones included) and of rows
/// set aside and not discarded.
pub async fn pending_count(pool: &PgPool) -> Result<(i64, i64)> {
    let r = sqlx::query(
        "SELECT count(*) FILTER (WHERE failed_at IS NULL),
                count(*) FILTER (WHERE failed_at IS NOT NULL AND discarded_at IS NULL)
           FROM oncely.outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok((r.try_get(0)?, r.try_get(1)?))
}

/// Deletes up to `limit` rows published (or discarded by an operator) more
/// than `older_than_ms` ago; returns how many. Rows another session is
/// deleting are skipped, so several relays can run retention at once.
pub async fn delete_published(pool: &PgPool, older_than_ms: i64, limit: i64) -> Result<u64> {
    let published = sqlx::query(
        "DELETE FROM oncely.outbox WHERE id IN (
             SELECT id FROM oncely.outbox
              WHERE published_at IS NOT NULL
                AND published_at < now() - make_interval(secs => $1::bigint / 1000.0)
              ORDER BY published_at
              LIMIT $2
              FOR UPDATE SKIP LOCKED)",
    )
    .bind(older_than_ms)
    .bind(limit)
    .execute(pool)
    .await?
    .rows_affected();
    let room = limit - published as i64;
    if room <= 0 {
        return Ok(published);
    }
    let discarded = sqlx::query(
        "DELETE FROM oncely.outbox WHERE id IN (
             SELECT id FROM oncely.outbox
              WHERE discarded_at IS NOT NULL
                AND discarded_at < now() - make_interval(secs => $1::bigint / 1000.0)
              ORDER BY discarded_at
              LIMIT $2
              FOR UPDATE SKIP LOCKED)",
    )
    .bind(older_than_ms)
    .bind(room)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(published + discarded)
}

/// Totals for `oncely outbox status`.
#[derive(Debug, Clone)]
pub struct Totals {
    /// Rows waiting to be published (held ones included; set-aside ones not).
    pub pending: i64,
    /// Pending rows held behind a row set aside.
    pub held: i64,
    /// Rows set aside and not discarded.
    pub failed: i64,
    /// Creation time of the oldest pending row.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// Rows marked published in the last minute.
    pub published_last_minute: i64,
    /// Published rows kept (not yet removed by retention).
    pub published_kept: i64,
    /// Sessions holding the relay presence lock (running relays).
    pub relays: i64,
    /// The database's clock, to compute ages.
    pub now: DateTime<Utc>,
}

/// Outbox totals; `presence_ns` is the relays' presence lock namespace.
pub async fn totals(pool: &PgPool, presence_ns: i32) -> Result<Totals> {
    let r = sqlx::query(
        "SELECT (SELECT count(*) FROM oncely.outbox WHERE published_at IS NULL AND failed_at IS NULL),
                (SELECT min(created_at) FROM oncely.outbox WHERE published_at IS NULL AND failed_at IS NULL),
                (SELECT count(*) FROM oncely.outbox
                  WHERE published_at IS NOT NULL AND published_at > now() - interval '1 minute'),
                (SELECT count(*) FROM oncely.outbox WHERE published_at IS NOT NULL),
                (SELECT count(DISTINCT l.pid) FROM pg_locks l
                  WHERE l.locktype = 'advisory'
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND l.classid::bigint = $1 AND l.objsubid = 2 AND l.granted),
                now(),
                (SELECT count(*) FROM oncely.outbox
                  WHERE failed_at IS NOT NULL AND discarded_at IS NULL AND published_at IS NULL),
                (SELECT count(*) FROM oncely.outbox o
                  WHERE o.published_at IS NULL AND o.failed_at IS NULL
                    AND EXISTS (SELECT 1 FROM oncely.outbox f
                                 WHERE f.failed_at IS NOT NULL AND f.discarded_at IS NULL AND f.published_at IS NULL
                                   AND f.lane = o.lane AND f.id < o.id AND f.topic = o.topic AND f.key = o.key))",
    )
    .bind(i64::from(presence_ns))
    .fetch_one(pool)
    .await?;
    Ok(Totals {
        pending: r.try_get(0)?,
        oldest_pending: r.try_get(1)?,
        published_last_minute: r.try_get(2)?,
        published_kept: r.try_get(3)?,
        relays: r.try_get(4)?,
        now: r.try_get(5)?,
        failed: r.try_get(6)?,
        held: r.try_get(7)?,
    })
}

/// One lane as `oncely outbox status` shows it.
#[derive(Debug, Clone)]
pub struct LaneRow {
    /// Lane number.
    pub lane: i16,
    /// Rows of the lane waiting to be published (held ones included).
    pub pending: i64,
    /// Its rows set aside and not discarded.
    pub failed: i64,
    /// Creation time of its oldest pending row.
    pub oldest_pending: Option<DateTime<Utc>>,
    /// The largest failed-attempt count among its pending and set-aside rows.
    pub max_attempts: i32,
    /// The last error of its oldest failing row (set aside or pending).
    pub last_error: Option<String>,
    /// Backend pid of the session holding the lane's lock.
    pub owner_pid: Option<i32>,
    /// That session's `application_name` (the relay's name).
    pub owner_name: Option<String>,
    /// That session's client address.
    pub owner_addr: Option<String>,
    /// When that session started.
    pub owner_since: Option<DateTime<Utc>>,
}

/// Per-lane pending counts and owners (from `pg_locks`), lanes `0..lanes`.
pub async fn lanes(pool: &PgPool, lane_ns: i32, lanes: i16) -> Result<Vec<LaneRow>> {
    let rows = sqlx::query(
        "WITH owners AS (
             SELECT l.objid::integer AS lane, l.pid
               FROM pg_locks l
              WHERE l.locktype = 'advisory'
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND l.classid::bigint = $1 AND l.objsubid = 2 AND l.granted),
         pending AS (
             SELECT lane, count(*) FILTER (WHERE failed_at IS NULL) AS n,
                    count(*) FILTER (WHERE failed_at IS NOT NULL) AS failed,
                    min(created_at) FILTER (WHERE failed_at IS NULL) AS oldest, max(attempts) AS attempts,
                    (array_agg(last_error ORDER BY id) FILTER (WHERE last_error IS NOT NULL))[1] AS last_error
               FROM oncely.outbox WHERE published_at IS NULL AND discarded_at IS NULL GROUP BY lane)
         SELECT g.lane::smallint, coalesce(p.n, 0), p.oldest, coalesce(p.attempts, 0), p.last_error,
                o.pid, a.application_name, host(a.client_addr), a.backend_start, coalesce(p.failed, 0)
           FROM generate_series(0, $2 - 1) AS g(lane)
           LEFT JOIN pending p ON p.lane = g.lane
           LEFT JOIN owners o ON o.lane = g.lane
           LEFT JOIN pg_stat_activity a ON a.pid = o.pid
          ORDER BY g.lane",
    )
    .bind(i64::from(lane_ns))
    .bind(i32::from(lanes))
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(LaneRow {
                lane: r.try_get(0)?,
                pending: r.try_get(1)?,
                oldest_pending: r.try_get(2)?,
                max_attempts: r.try_get(3)?,
                last_error: r.try_get(4)?,
                owner_pid: r.try_get(5)?,
                owner_name: r.try_get(6)?,
                owner_addr: r.try_get(7)?,
                owner_since: r.try_get(8)?,
                failed: r.try_get(9)?,
            })
        })
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(Error::from)
}
