//! SQL of projection rebuilds (`oncely.projection_rebuilds`): creating the
//! shadow schema, the diff's counts, checksums and samples, and the swap's
//! exchange of tables, positions, inbox and entity versions.
//!
//! Schema and table names are SQL identifiers that oncely checked
//! ([`valid_identifier`]) and always quotes (`format('%I')` or
//! [`quote_ident`]); the projection's own `CREATE` statements are the
//! application's SQL, run with `search_path` set to the shadow schema.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgConnection;
use sqlx::{PgPool, Row};

use crate::error::{Error, Result};

/// A rebuild's row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RebuildRow {
    /// The shadow schema (and the rebuild's name).
    pub target: String,
    /// The projection's name.
    pub projection: String,
    /// The live consumer.
    pub consumer: String,
    /// The consumer name the rebuild runs as (its inbox and offsets).
    pub rebuild_consumer: String,
    /// The schema of the live tables.
    pub live_schema: String,
    /// The projection's tables.
    pub tables: Vec<String>,
    /// Columns the diff leaves out.
    pub diff_ignore: Vec<String>,
    /// `earliest` or an RFC 3339 time.
    pub from_spec: String,
    /// `rebuilding` or `swapped`.
    pub state: String,
    /// When the rebuild was created.
    pub created_at: DateTime<Utc>,
    /// When diff last ran.
    pub diffed_at: Option<DateTime<Utc>>,
    /// The last diff's summary.
    pub diff: Option<Value>,
    /// When the last swap (or swap-back) ran.
    pub swapped_at: Option<DateTime<Utc>>,
    /// Until when swap-back is allowed (state `swapped`).
    pub keep_until: Option<DateTime<Utc>>,
    /// The audit record of the last swap.
    pub swap_audit_id: Option<i64>,
    /// Swaps and swap-backs so far.
    pub swaps: i32,
}

const COLUMNS: &str = "target, projection, consumer, rebuild_consumer, live_schema, tables, diff_ignore, from_spec, \
                       state, created_at, diffed_at, diff, swapped_at, keep_until, swap_audit_id, swaps";

fn row_of(r: &sqlx::postgres::PgRow) -> Result<RebuildRow> {
    Ok(RebuildRow {
        target: r.try_get(0)?,
        projection: r.try_get(1)?,
        consumer: r.try_get(2)?,
        rebuild_consumer: r.try_get(3)?,
        live_schema: r.try_get(4)?,
        tables: r.try_get(5)?,
        diff_ignore: r.try_get(6)?,
        from_spec: r.try_get(7)?,
        state: r.try_get(8)?,
        created_at: r.try_get(9)?,
        diffed_at: r.try_get(10)?,
        diff: r.try_get(11)?,
        swapped_at: r.try_get(12)?,
        keep_until: r.try_get(13)?,
        swap_audit_id: r.try_get(14)?,
        swaps: r.try_get(15)?,
    })
}

/// Whether `s` is an identifier oncely accepts for schemas and tables:
/// lower-case ASCII letters, digits and `_`, starting with a letter or `_`,
/// at most 48 bytes (PostgreSQL's limit is 63; the rest is kept for the
/// names oncely derives from it).
pub fn valid_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 48
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// `"s"`, with inner quotes doubled.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A rebuild to register.
#[derive(Debug, Clone)]
pub struct NewRebuild {
    /// Shadow schema.
    pub target: String,
    /// Projection name.
    pub projection: String,
    /// Live consumer.
    pub consumer: String,
    /// Rebuild consumer name.
    pub rebuild_consumer: String,
    /// Schema of the live tables.
    pub live_schema: String,
    /// Tables.
    pub tables: Vec<String>,
    /// Columns the diff leaves out.
    pub diff_ignore: Vec<String>,
    /// `earliest` or an RFC 3339 time.
    pub from_spec: String,
    /// The statements that create the tables empty (unqualified names).
    pub create_sql: String,
}

/// Registers a rebuild and creates its shadow schema and empty tables, in
/// one transaction; or finds the existing one (a restarted rebuild resumes).
/// Returns the row and whether it was created now. Refused when the target
/// belongs to another consumer or projection, when it was swapped (its
/// schema holds the previous live projection), when the schema exists
/// already outside oncely, or when a declared table is missing (live or
/// after the create statements).
pub fn prepare(pool: PgPool, new: NewRebuild) -> futures::future::BoxFuture<'static, Result<(RebuildRow, bool)>> {
    // Boxed, owning its arguments, so that callers can hold it in `Send`
    // futures (see ConsumerBuilder::run).
    Box::pin(async move { prepare_inner(&pool, &new).await })
}

async fn prepare_inner(pool: &PgPool, new: &NewRebuild) -> Result<(RebuildRow, bool)> {
    let mut tx = pool.begin().await?;
    // Two processes starting the same rebuild at once: one creates it.
    sqlx::query("SELECT pg_advisory_xact_lock(731058203, hashtext($1))").bind(&new.target).execute(&mut *tx).await?;
    let existing = sqlx::query(&format!("SELECT {COLUMNS} FROM oncely.projection_rebuilds WHERE target = $1"))
        .bind(&new.target)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(r) = existing {
        let row = row_of(&r)?;
        tx.commit().await?;
        if row.consumer != new.consumer || row.projection != new.projection {
            return Err(Error::Refused(format!(
                "target {} is the rebuild of projection {} for consumer {}, not of {} for {}",
                row.target, row.projection, row.consumer, new.projection, new.consumer
            )));
        }
        if row.state != "rebuilding" {
            return Err(Error::Refused(format!(
                "target {} was swapped: its schema holds the previous live projection (for swap-back); rebuild into another target",
                row.target
            )));
        }
        return Ok((row, false));
    }
    let missing_live = missing_tables(&mut tx, &new.live_schema, &new.tables).await?;
    if !missing_live.is_empty() {
        return Err(Error::Refused(format!(
            "the live schema {} has no table {} (declared in projection {})",
            new.live_schema,
            missing_live.join(", "),
            new.projection
        )));
    }
    if schema_exists(&mut *tx, &new.target).await? {
        return Err(Error::Refused(format!(
            "schema {} exists already and is not a rebuild oncely knows: choose another target",
            new.target
        )));
    }
    sqlx::query(&format!("CREATE SCHEMA {}", quote_ident(&new.target))).execute(&mut *tx).await?;
    super::set_local_search_path(&mut tx, &quote_ident(&new.target)).await?;
    sqlx::Executor::execute(&mut *tx, new.create_sql.as_str())
        .await
        .map_err(|e| Error::Config(format!("the create statements of projection {} failed: {e}", new.projection)))?;
    let missing = missing_tables(&mut tx, &new.target, &new.tables).await?;
    if !missing.is_empty() {
        return Err(Error::Config(format!(
            "the create statements of projection {} did not create {} in schema {}",
            new.projection,
            missing.join(", "),
            new.target
        )));
    }
    let r = sqlx::query(&format!(
        "INSERT INTO oncely.projection_rebuilds
             (target, projection, consumer, rebuild_consumer, live_schema, tables, diff_ignore, from_spec)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}"
    ))
    .bind(&new.target)
    .bind(&new.projection)
    .bind(&new.consumer)
    .bind(&new.rebuild_consumer)
    .bind(&new.live_schema)
    .bind(&new.tables)
    .bind(&new.diff_ignore)
    .bind(&new.from_spec)
    .fetch_one(&mut *tx)
    .await?;
    let row = row_of(&r)?;
    tx.commit().await?;
    Ok((row, true))
}

async fn missing_tables(conn: &mut PgConnection, schema: &str, tables: &[String]) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT t FROM unnest($2::text[]) AS x(t)
          WHERE NOT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = x.t)",
    )
    .bind(schema)
    .bind(tables)
    .fetch_all(&mut *conn)
    .await?)
}

/// The rebuild `target`, if registered.
pub async fn get(pool: &PgPool, target: &str) -> Result<Option<RebuildRow>> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM oncely.projection_rebuilds WHERE target = $1"))
        .bind(target)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(row_of)
        .transpose()
}

/// Every rebuild, newest first.
pub async fn list(pool: &PgPool) -> Result<Vec<RebuildRow>> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM oncely.projection_rebuilds ORDER BY created_at DESC"))
        .fetch_all(pool)
        .await?
        .iter()
        .map(row_of)
        .collect()
}

/// The rebuild of projection `projection` whose target holds the previous
/// live projection (state `swapped`), the most recent first.
pub async fn last_swapped(pool: &PgPool, projection: &str) -> Result<Option<RebuildRow>> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM oncely.projection_rebuilds WHERE projection = $1 AND state = 'swapped'
          ORDER BY swapped_at DESC LIMIT 1"
    ))
    .bind(projection)
    .fetch_optional(pool)
    .await?
    .as_ref()
    .map(row_of)
    .transpose()
}

/// One partition's positions: the live consumer's and the rebuild's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionPositions {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The live consumer's next offset.
    pub live: Option<i64>,
    /// The rebuild's next offset.
    pub rebuild: Option<i64>,
}

const POSITIONS: &str =
    "SELECT coalesce(l.topic, r.topic), coalesce(l.partition, r.partition), l.next_offset, r.next_offset
       FROM (SELECT topic, partition, next_offset FROM oncely.offsets WHERE consumer = $1) l
       FULL JOIN (SELECT topic, partition, next_offset FROM oncely.offsets WHERE consumer = $2) r
         ON l.topic = r.topic AND l.partition = r.partition
      ORDER BY 1, 2";

fn positions_of(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<PartitionPositions>> {
    rows.iter()
        .map(|r| {
            Ok(PartitionPositions {
                topic: r.try_get(0)?,
                partition: r.try_get(1)?,
                live: r.try_get(2)?,
                rebuild: r.try_get(3)?,
            })
        })
        .collect()
}

/// The positions of `live` and `rebuild` per partition, as they are now.
pub async fn positions(pool: &PgPool, live: &str, rebuild: &str) -> Result<Vec<PartitionPositions>> {
    let rows = sqlx::query(POSITIONS).bind(live).bind(rebuild).fetch_all(pool).await?;
    positions_of(&rows)
}

/// Events of `consumer` parked or held (not applied, waiting for a retry or
/// an operator).
pub async fn parked_count(conn: &mut PgConnection, consumer: &str) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM oncely.parked WHERE consumer = $1")
        .bind(consumer)
        .fetch_one(&mut *conn)
        .await?)
}

/// Dead letters only one of two consumers of the same topics has: `(of
/// `a` only, of `b` only)`. A dead letter of one counts when the other has
/// passed its offset (its position is beyond it) without dead-lettering the
/// record, and it was not redriven (a redriven record came back as a new
/// one, which both sides see). Over-counts, never under-counts: the other
/// side may have started after the record (a rebuild from a time or a
/// snapshot).
pub async fn dead_letter_mismatch(conn: &mut PgConnection, a: &str, b: &str) -> Result<(i64, i64)> {
    let one_sided = |of: &str, other: &str| {
        sqlx::query_scalar::<_, i64>(
            r#"SELECT count(*) FROM oncely.dead_letters d
                WHERE d.consumer = $1 AND d.redriven_at IS NULL
                  AND EXISTS (SELECT 1 FROM oncely.offsets o
                               WHERE o.consumer = $2 AND o.topic = d.topic AND o.partition = d.partition
                                 AND o.next_offset > d."offset")
                  AND NOT EXISTS (SELECT 1 FROM oncely.dead_letters x
                                   WHERE x.consumer = $2 AND x.topic = d.topic AND x.partition = d.partition
                                     AND x."offset" = d."offset")"#,
        )
        .bind(of.to_owned())
        .bind(other.to_owned())
    };
    let a_only = one_sided(a, b).fetch_one(&mut *conn).await?;
    let b_only = one_sided(b, a).fetch_one(&mut *conn).await?;
    Ok((a_only, b_only))
}

/// Records of `consumer` dead-lettered.
pub async fn dead_letter_count(pool: &PgPool, consumer: &str) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM oncely.dead_letters WHERE consumer = $1")
        .bind(consumer)
        .fetch_one(pool)
        .await?)
}

/// Effect intents of `consumer` by status (a rebuild's are all `suppressed`).
pub async fn effect_counts(pool: &PgPool, consumer: &str) -> Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT status, count(*) FROM oncely.effects WHERE consumer = $1 GROUP BY status ORDER BY status",
    )
    .bind(consumer)
    .fetch_all(pool)
    .await?)
}

/// Row count and checksum of one table: each row's JSON (without the
/// `ignore` columns) hashed with MD5, and the hashes summed as two 60-bit
/// numbers (exact `numeric` sums: the same multiset of rows gives the same
/// checksum in any order). Constant memory whatever the table's size: the
/// concatenation of the row hashes this replaces is a `text`, which
/// PostgreSQL caps at 1 GB (about 33 million rows).
pub async fn table_checksum(pool: &PgPool, schema: &str, table: &str, ignore: &[String]) -> Result<(i64, String)> {
    let sql = format!(
        "SELECT count(*)::int8,
                coalesce(md5(sum(('x' || substr(h, 1, 15))::bit(60)::int8::numeric)::text || ':'
                          || sum(('x' || substr(h, 16, 15))::bit(60)::int8::numeric)::text), '')
           FROM (SELECT md5((to_jsonb(t) - $1::text[])::text) AS h FROM {}.{} t) x",
        quote_ident(schema),
        quote_ident(table)
    );
    let row = sqlx::query(&sql).bind(ignore).fetch_one(pool).await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Up to `limit` rows (as JSON, without the `ignore` columns) of `a` that
/// `b` does not have (counting copies).
pub async fn rows_only_in(
    pool: &PgPool,
    a: (&str, &str),
    b: (&str, &str),
    ignore: &[String],
    limit: i64,
) -> Result<Vec<Value>> {
    let sql = format!(
        "SELECT j FROM (SELECT to_jsonb(t) - $1::text[] AS j FROM {}.{} t
                        EXCEPT ALL
                        SELECT to_jsonb(t) - $1::text[] FROM {}.{} t) x
          ORDER BY j::text LIMIT $2",
        quote_ident(a.0),
        quote_ident(a.1),
        quote_ident(b.0),
        quote_ident(b.1)
    );
    Ok(sqlx::query_scalar(&sql).bind(ignore).bind(limit).fetch_all(pool).await?)
}

/// A rebuild's first position on a partition (a rebuild from a time); a
/// position it has already is kept.
pub async fn seed_position(pool: &PgPool, consumer: &str, topic: &str, partition: i32, offset: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO oncely.offsets (consumer, topic, partition, next_offset, epoch) VALUES ($1, $2, $3, $4, 0)
         ON CONFLICT (consumer, topic, partition) DO NOTHING",
    )
    .bind(consumer)
    .bind(topic)
    .bind(partition)
    .bind(offset)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a diff's summary.
pub async fn record_diff(pool: &PgPool, target: &str, summary: &Value) -> Result<()> {
    sqlx::query("UPDATE oncely.projection_rebuilds SET diffed_at = now(), diff = $2 WHERE target = $1")
        .bind(target)
        .bind(summary)
        .execute(pool)
        .await?;
    Ok(())
}

/// Opens the swap's transaction and locks the rebuild's row. Every lock
/// of the transaction waits at most `lock_timeout`.
pub async fn begin_swap(
    pool: &PgPool,
    target: &str,
    lock_timeout: std::time::Duration,
) -> Result<(sqlx::Transaction<'static, sqlx::Postgres>, RebuildRow)> {
    let mut tx = pool.begin_with(super::inbox::begin_with_lock_timeout(lock_timeout)).await?;
    let r = sqlx::query(&format!("SELECT {COLUMNS} FROM oncely.projection_rebuilds WHERE target = $1 FOR UPDATE"))
        .bind(target)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| Error::Refused(format!("no rebuild {target}")))?;
    let row = row_of(&r)?;
    Ok((tx, row))
}

/// Locks every offsets row of `consumer`, in the transaction: waits for the
/// batches open on them (a batch takes its partition's row lock with its
/// first statement) and keeps new ones from starting until the transaction
/// ends. That is how a swap pauses a consumer.
pub async fn lock_offsets(conn: &mut PgConnection, consumer: &str) -> Result<()> {
    sqlx::query("SELECT 1 FROM oncely.offsets WHERE consumer = $1 ORDER BY topic, partition FOR UPDATE")
        .bind(consumer)
        .fetch_all(&mut *conn)
        .await?;
    Ok(())
}

/// [`positions`] inside a transaction (each call sees what is committed now).
pub async fn positions_in(conn: &mut PgConnection, live: &str, rebuild: &str) -> Result<Vec<PartitionPositions>> {
    let rows = sqlx::query(POSITIONS).bind(live).bind(rebuild).fetch_all(&mut *conn).await?;
    positions_of(&rows)
}

/// What an exchange moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Exchanged {
    /// Inbox rows given to the live consumer (the rebuild's).
    pub inbox_to_live: u64,
    /// Inbox rows given to the rebuild namespace (the live consumer's).
    pub inbox_to_rebuild: u64,
}

/// The exchange, inside the transaction of [`begin_swap`] after both
/// consumers' offsets were locked ([`lock_offsets`]): the projection's
/// tables between the live schema and the target, and between the live
/// consumer and the rebuild their positions, inbox rows, entity versions
/// and dead letters. The live consumer keeps its epochs (its lanes see their
/// position moved, seek there and go on); the rebuild's epochs go up, so a
/// rebuild still running is fenced off (its batches roll back). `swapped`:
/// the row's new state (`true` after a swap, `false` after a swap-back).
pub async fn exchange(
    conn: &mut PgConnection,
    row: &RebuildRow,
    swapped: bool,
    keep_days: i32,
    audit_id: i64,
) -> Result<Exchanged> {
    let live_id = super::consumer_id_in(conn, &row.consumer)
        .await?
        .ok_or_else(|| Error::Refused(format!("consumer {} is not registered", row.consumer)))?;
    let rebuild_id = super::consumer_id_in(conn, &row.rebuild_consumer)
        .await?
        .ok_or_else(|| Error::Refused(format!("the rebuild {} never ran", row.rebuild_consumer)))?;
    // Tables, through a schema of the transaction's own.
    // Unique per swap: two swaps in one process (or two processes with the
    // same pid, in containers) never meet here.
    let tmp = format!("oncely_swap_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE SCHEMA {}", quote_ident(&tmp))).execute(&mut *conn).await?;
    for t in &row.tables {
        for (from, to) in [(&row.live_schema, &tmp), (&row.target, &row.live_schema), (&tmp, &row.target)] {
            sqlx::query(&format!(
                "ALTER TABLE {}.{} SET SCHEMA {}",
                quote_ident(from),
                quote_ident(t),
                quote_ident(to)
            ))
            .execute(&mut *conn)
            .await?;
        }
    }
    sqlx::query(&format!("DROP SCHEMA {}", quote_ident(&tmp))).execute(&mut *conn).await?;
    // Positions: every partition either side has gets a row on both sides,
    // then one statement exchanges them (it reads the rows as they were
    // before it).
    sqlx::query(
        "INSERT INTO oncely.offsets (consumer, topic, partition, next_offset, epoch)
         SELECT CASE o.consumer WHEN $1 THEN $2 ELSE $1 END, o.topic, o.partition, NULL, 0
           FROM oncely.offsets o WHERE o.consumer IN ($1, $2)
         ON CONFLICT (consumer, topic, partition) DO NOTHING",
    )
    .bind(&row.consumer)
    .bind(&row.rebuild_consumer)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE oncely.offsets o
            SET next_offset = other.next_offset,
                epoch = CASE WHEN o.consumer = $2 THEN o.epoch + 1 ELSE o.epoch END,
                updated_at = now()
           FROM oncely.offsets other
          WHERE o.consumer IN ($1, $2)
            AND other.consumer = CASE o.consumer WHEN $1 THEN $2 ELSE $1 END
            AND other.topic = o.topic AND other.partition = o.partition",
    )
    .bind(&row.consumer)
    .bind(&row.rebuild_consumer)
    .execute(&mut *conn)
    .await?;
    // Inbox rows: (id, consumer_id) is the key, and most identities are in
    // both inboxes, so the exchange goes through a number no consumer has.
    let parking = -live_id;
    let move_inbox = |from: i32, to: i32| {
        sqlx::query("UPDATE oncely.inbox SET consumer_id = $2 WHERE consumer_id = $1").bind(from).bind(to)
    };
    let inbox_to_rebuild = move_inbox(live_id, parking).execute(&mut *conn).await?.rows_affected();
    let inbox_to_live = move_inbox(rebuild_id, live_id).execute(&mut *conn).await?.rows_affected();
    move_inbox(parking, rebuild_id).execute(&mut *conn).await?;
    // Entity versions (the version guard) the same way, and dead letters:
    // the live consumer's list is then what the live tables lack (the
    // rebuild's), and a later rebuild is compared with the right history;
    // the previous ones go with the previous projection, and come back with
    // it on a swap-back.
    let parked_name = format!("oncely-swap:{}", row.consumer);
    for table in ["entity_versions", "dead_letters"] {
        let rename = format!("UPDATE oncely.{table} SET consumer = $2 WHERE consumer = $1");
        for (from, to) in [
            (&row.consumer, &parked_name),
            (&row.rebuild_consumer, &row.consumer),
            (&parked_name, &row.rebuild_consumer),
        ] {
            sqlx::query(&rename).bind(from).bind(to).execute(&mut *conn).await?;
        }
    }
    sqlx::query(
        "UPDATE oncely.projection_rebuilds
            SET state = CASE WHEN $2 THEN 'swapped' ELSE 'rebuilding' END,
                swapped_at = now(),
                keep_until = CASE WHEN $2 THEN now() + make_interval(days => $3) END,
                swap_audit_id = $4,
                swaps = swaps + 1,
                diffed_at = NULL
          WHERE target = $1",
    )
    .bind(&row.target)
    .bind(swapped)
    .bind(keep_days)
    .bind(audit_id)
    .execute(&mut *conn)
    .await?;
    // The live tables changed: a diff another rebuild of the same consumer
    // made against them says nothing about the new ones.
    sqlx::query("UPDATE oncely.projection_rebuilds SET diffed_at = NULL WHERE consumer = $1 AND target <> $2")
        .bind(&row.consumer)
        .bind(&row.target)
        .execute(&mut *conn)
        .await?;
    Ok(Exchanged { inbox_to_live, inbox_to_rebuild })
}

/// A rebuild an operator asked for (`oncely projection rebuild`), for the
/// application to run (`Projection::serve`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RequestRow {
    /// The rebuild target (schema).
    pub target: String,
    /// The live consumer whose projection is rebuilt.
    pub consumer: String,
    /// `earliest`, an RFC 3339 time, or `snapshot:<id>`.
    pub from_spec: String,
    /// When it was asked for.
    pub requested_at: DateTime<Utc>,
    /// The audit record of the request.
    pub audit_id: Option<i64>,
}

const REQUEST_COLUMNS: &str = "target, consumer, from_spec, requested_at, audit_id";

fn request_of(r: &sqlx::postgres::PgRow) -> Result<RequestRow> {
    Ok(RequestRow {
        target: r.try_get(0)?,
        consumer: r.try_get(1)?,
        from_spec: r.try_get(2)?,
        requested_at: r.try_get(3)?,
        audit_id: r.try_get(4)?,
    })
}

/// Records a rebuild request. Returns `false` (and changes nothing) when
/// target already has a request or a rebuild.
pub async fn insert_request(
    pool: &PgPool,
    target: &str,
    consumer: &str,
    from_spec: &str,
    audit_id: i64,
) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO oncely.projection_requests (target, consumer, from_spec, audit_id)
         SELECT $1, $2, $3, $4
          WHERE NOT EXISTS (SELECT 1 FROM oncely.projection_rebuilds WHERE target = $1)
         ON CONFLICT (target) DO NOTHING",
    )
    .bind(target)
    .bind(consumer)
    .bind(from_spec)
    .bind(audit_id)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// The request for target, if any.
pub async fn get_request(pool: &PgPool, target: &str) -> Result<Option<RequestRow>> {
    sqlx::query(&format!("SELECT {REQUEST_COLUMNS} FROM oncely.projection_requests WHERE target = $1"))
        .bind(target)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(request_of)
        .transpose()
}

/// What an application serving `consumer`'s projection `projection` has to
/// run: the requests for the consumer, and the rebuilds of the projection
/// still in state `rebuilding` (to resume after a restart), oldest first.
pub async fn runnable(pool: &PgPool, consumer: &str, projection: &str) -> Result<Vec<RequestRow>> {
    sqlx::query(&format!(
        "SELECT {REQUEST_COLUMNS} FROM (
             SELECT q.target, q.consumer, q.from_spec, q.requested_at, q.audit_id
               FROM oncely.projection_requests q
               LEFT JOIN oncely.projection_rebuilds r ON r.target = q.target
              WHERE q.consumer = $1 AND (r.target IS NULL OR r.state = 'rebuilding')
             UNION
             SELECT r.target, r.consumer, r.from_spec, r.created_at, NULL
               FROM oncely.projection_rebuilds r
              WHERE r.consumer = $1 AND r.projection = $2 AND r.state = 'rebuilding'
                AND NOT EXISTS (SELECT 1 FROM oncely.projection_requests q WHERE q.target = r.target)
         ) x ORDER BY requested_at, target"
    ))
    .bind(consumer)
    .bind(projection)
    .fetch_all(pool)
    .await?
    .iter()
    .map(request_of)
    .collect()
}

/// Holds the lock that lets one process at a time run rebuild `target`:
/// a session-level advisory lock on a connection of its own, released
/// when the connection is dropped (it is taken out of the pool, so it closes)
/// or its process dies. `None` when another process holds it.
pub async fn try_lock_running(pool: &PgPool, target: &str) -> Result<Option<PgConnection>> {
    let mut conn = pool.acquire().await?.detach();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(731058204, hashtext($1))")
        .bind(target)
        .fetch_one(&mut conn)
        .await?;
    if locked {
        Ok(Some(conn))
    } else {
        Ok(None)
    }
}

/// Whether schema `name` exists.
pub async fn schema_exists<'e>(db: impl sqlx::PgExecutor<'e>, name: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(name)
        .fetch_one(db)
        .await?)
}

/// What a drop removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Dropped {
    /// Inbox rows of the rebuild namespace.
    pub inbox_rows: u64,
    /// Its positions.
    pub positions: u64,
    /// Its (suppressed, or kept previous) effect intents.
    pub effects: u64,
}

/// Drops rebuild `row` in one transaction: its schema (the rebuilt tables,
/// or after a swap the previous projection) and everything of its
/// namespace (positions, inbox rows, entity versions, effect intents), then
/// its row and its request. Dead letters are kept (they are history). A
/// rebuild still running is fenced first: its batches finish or wait, and
/// fail after, and it stops when it sees its row gone.
pub async fn drop_rebuild(pool: &PgPool, row: &RebuildRow, lock_timeout: std::time::Duration) -> Result<Dropped> {
    let mut tx = pool.begin_with(super::inbox::begin_with_lock_timeout(lock_timeout)).await?;
    sqlx::query("SELECT 1 FROM oncely.projection_rebuilds WHERE target = $1 FOR UPDATE")
        .bind(&row.target)
        .execute(&mut *tx)
        .await?;
    lock_offsets(&mut tx, &row.rebuild_consumer).await?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", quote_ident(&row.target))).execute(&mut *tx).await?;
    let mut dropped = Dropped::default();
    if let Some(id) = super::consumer_id_in(&mut tx, &row.rebuild_consumer).await? {
        dropped.inbox_rows = sqlx::query("DELETE FROM oncely.inbox WHERE consumer_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    let by_name = |sql: &'static str| sqlx::query(sql).bind(row.rebuild_consumer.clone());
    dropped.positions =
        by_name("DELETE FROM oncely.offsets WHERE consumer = $1").execute(&mut *tx).await?.rows_affected();
    by_name("DELETE FROM oncely.entity_versions WHERE consumer = $1").execute(&mut *tx).await?;
    dropped.effects =
        by_name("DELETE FROM oncely.effects WHERE consumer = $1").execute(&mut *tx).await?.rows_affected();
    sqlx::query("DELETE FROM oncely.projection_rebuilds WHERE target = $1").bind(&row.target).execute(&mut *tx).await?;
    sqlx::query("DELETE FROM oncely.projection_requests WHERE target = $1").bind(&row.target).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(dropped)
}

/// Withdraws the request for `target` that no application has started.
/// Returns whether there was one.
pub async fn delete_request(pool: &PgPool, target: &str) -> Result<bool> {
    let deleted = sqlx::query(
        "DELETE FROM oncely.projection_requests q WHERE q.target = $1
            AND NOT EXISTS (SELECT 1 FROM oncely.projection_rebuilds r WHERE r.target = q.target)",
    )
    .bind(target)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected() == 1)
}
