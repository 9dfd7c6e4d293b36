//! SQL of the operator tools: the audit log (`oncely.audit_log`), the offset
//! snapshots (`oncely.offset_snapshots`) and the per-group lock that keeps
//! two operators from changing one group's offsets at once.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};

use crate::error::Result;

/// One partition's committed offset, as snapshots and the audit log keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The committed offset; `None` when the group had committed nothing.
    pub offset: Option<i64>,
    /// The commit metadata (empty when none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metadata: String,
    /// The log end offset at that moment, when known (for lag history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_end: Option<i64>,
}

/// Why a snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotReason {
    /// `oncely watch`.
    Watch,
    /// `oncely offsets snapshot`.
    Manual,
    /// Taken right before an offset change, linked to its audit record.
    BeforeChange,
}

impl SnapshotReason {
    /// The value stored in `reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotReason::Watch => "watch",
            SnapshotReason::Manual => "manual",
            SnapshotReason::BeforeChange => "before-change",
        }
    }
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// Its id (what `oncely offsets restore ID` takes).
    pub id: i64,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
    /// The environment it was taken in.
    pub environment: String,
    /// The Kafka cluster id it was taken from.
    pub cluster_id: String,
    /// The consumer group.
    pub group: String,
    /// `watch`, `manual` or `before-change`.
    pub reason: String,
    /// The audit record of the change it was taken before, if any.
    pub audit_id: Option<i64>,
    /// The offsets, sorted by topic and partition.
    pub offsets: Vec<PartitionOffset>,
}

impl Snapshot {
    /// The committed offsets by `(topic, partition)` (partitions without one left out).
    pub fn committed(&self) -> BTreeMap<(String, i32), i64> {
        self.offsets.iter().filter_map(|o| o.offset.map(|off| ((o.topic.clone(), o.partition), off))).collect()
    }
}

/// A snapshot to store.
#[derive(Debug, Clone)]
pub struct NewSnapshot<'a> {
    /// Environment name.
    pub environment: &'a str,
    /// Live cluster id.
    pub cluster_id: &'a str,
    /// Consumer group.
    pub group: &'a str,
    /// Why.
    pub reason: SnapshotReason,
    /// The audit record of the change it precedes.
    pub audit_id: Option<i64>,
    /// The offsets.
    pub offsets: &'a [PartitionOffset],
}

const SNAPSHOT_COLUMNS: &str = "id, taken_at, environment, cluster_id, group_id, reason, audit_id, offsets";

fn snapshot_row(r: &PgRow) -> Result<Snapshot> {
    let Json(offsets): Json<Vec<PartitionOffset>> = r.try_get("offsets")?;
    Ok(Snapshot {
        id: r.try_get("id")?,
        taken_at: r.try_get("taken_at")?,
        environment: r.try_get("environment")?,
        cluster_id: r.try_get("cluster_id")?,
        group: r.try_get("group_id")?,
        reason: r.try_get("reason")?,
        audit_id: r.try_get("audit_id")?,
        offsets,
    })
}

/// Inserts a snapshot (offsets sorted by topic and partition).
pub async fn insert_snapshot(pool: &PgPool, s: &NewSnapshot<'_>) -> Result<Snapshot> {
    let mut offsets = s.offsets.to_vec();
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    let row = sqlx::query(&format!(
        "INSERT INTO oncely.offset_snapshots (environment, cluster_id, group_id, reason, audit_id, offsets)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {SNAPSHOT_COLUMNS}"
    ))
    .bind(s.environment)
    .bind(s.cluster_id)
    .bind(s.group)
    .bind(s.reason.as_str())
    .bind(s.audit_id)
    .bind(Json(&offsets))
    .fetch_one(pool)
    .await?;
    snapshot_row(&row)
}

/// The snapshot with this id.
pub async fn get_snapshot(pool: &PgPool, id: i64) -> Result<Option<Snapshot>> {
    let row = sqlx::query(&format!("SELECT {SNAPSHOT_COLUMNS} FROM oncely.offset_snapshots WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(snapshot_row).transpose()
}

/// The last snapshot of a group on a cluster taken at or before `at`.
pub async fn snapshot_at_or_before(
    pool: &PgPool,
    cluster_id: &str,
    group: &str,
    at: DateTime<Utc>,
) -> Result<Option<Snapshot>> {
    let row = sqlx::query(&format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM oncely.offset_snapshots
          WHERE cluster_id = $1 AND group_id = $2 AND taken_at <= $3
          ORDER BY taken_at DESC, id DESC LIMIT 1"
    ))
    .bind(cluster_id)
    .bind(group)
    .bind(at)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(snapshot_row).transpose()
}

/// Snapshots, newest first, optionally of one cluster and one group.
pub async fn list_snapshots(
    pool: &PgPool,
    cluster_id: Option<&str>,
    group: Option<&str>,
    limit: i64,
) -> Result<Vec<Snapshot>> {
    let rows = sqlx::query(&format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM oncely.offset_snapshots
          WHERE ($1::text IS NULL OR cluster_id = $1) AND ($2::text IS NULL OR group_id = $2)
          ORDER BY taken_at DESC, id DESC LIMIT $3"
    ))
    .bind(cluster_id)
    .bind(group)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(snapshot_row).collect()
}

/// The newest `limit` snapshots of a group taken since `since`, oldest first
/// (the window `oncely lag` evaluates).
pub async fn window_snapshots(
    pool: &PgPool,
    cluster_id: &str,
    group: &str,
    since: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Snapshot>> {
    let rows = sqlx::query(&format!(
        "SELECT * FROM (
           SELECT {SNAPSHOT_COLUMNS} FROM oncely.offset_snapshots
            WHERE cluster_id = $1 AND group_id = $2 AND taken_at >= $3
            ORDER BY taken_at DESC, id DESC LIMIT $4) w
         ORDER BY taken_at, id"
    ))
    .bind(cluster_id)
    .bind(group)
    .bind(since)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(snapshot_row).collect()
}

/// The snapshot taken before the change recorded as audit `audit_id`.
pub async fn snapshot_for_audit(pool: &PgPool, audit_id: i64) -> Result<Option<Snapshot>> {
    let row = sqlx::query(&format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM oncely.offset_snapshots
          WHERE audit_id = $1 AND reason = 'before-change' ORDER BY id LIMIT 1"
    ))
    .bind(audit_id)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(snapshot_row).transpose()
}

/// Deletes `watch` snapshots taken before `before`; returns how many.
pub async fn delete_watch_snapshots(pool: &PgPool, before: DateTime<Utc>) -> Result<u64> {
    Ok(sqlx::query("DELETE FROM oncely.offset_snapshots WHERE reason = 'watch' AND taken_at < $1")
        .bind(before)
        .execute(pool)
        .await?
        .rows_affected())
}

/// Who runs an action: for the CLI the OS user and the host; for a console
/// the operator's name (from its sign-in) and the host the request came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Actor {
    /// The user: the OS user name, or the operator's name (the audit log's
    /// `os_user` column).
    pub os_user: String,
    /// Host name (or the client address of a console request).
    pub host: String,
}

/// An action about to run, as recorded by [`record_start`](crate::admin::audit::record_start).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// Who.
    pub actor: Actor,
    /// The environment (from `oncely.toml`).
    pub environment: String,
    /// The live Kafka cluster id, when the action concerns Kafka.
    pub cluster_id: Option<String>,
    /// The command line.
    pub command_line: String,
    /// A dotted action name: `offsets.reset`, `offsets.undo`, `dlq.redrive`, ...
    pub action: String,
    /// The consumer group (oncely consumer name) it concerns, if any.
    pub group: Option<String>,
    /// The state before (offset actions: a list of partition offsets).
    pub before: Option<Value>,
    /// Anything else worth keeping (the target, the plan, ids, ...); an object.
    pub details: Value,
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditResult {
    /// Recorded, not finished (what a crash mid-action leaves).
    Started,
    /// Done.
    Succeeded,
    /// Tried and failed.
    Failed,
    /// A safety check refused it; nothing was changed.
    Refused,
}

impl AuditResult {
    /// The value stored in `result`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditResult::Started => "started",
            AuditResult::Succeeded => "succeeded",
            AuditResult::Failed => "failed",
            AuditResult::Refused => "refused",
        }
    }
}

/// The outcome of an action, for [`record_result`](crate::admin::audit::record_result).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditOutcome {
    /// Result.
    pub result: AuditResult,
    /// State after.
    pub after: Option<Value>,
    /// The error or the reason for a refusal.
    pub error: Option<String>,
    /// Merged (top-level keys) into the entry's details.
    pub details: Option<Value>,
}

impl AuditOutcome {
    /// Succeeded, with the state after.
    pub fn succeeded(after: Option<Value>) -> Self {
        AuditOutcome { result: AuditResult::Succeeded, after, error: None, details: None }
    }

    /// Failed with `error` (the state after, if known, can be added with
    /// [`AuditOutcome::after`]).
    pub fn failed(error: impl Into<String>) -> Self {
        AuditOutcome { result: AuditResult::Failed, after: None, error: Some(error.into()), details: None }
    }

    /// Refused for `reason`.
    pub fn refused(reason: impl Into<String>) -> Self {
        AuditOutcome { result: AuditResult::Refused, after: None, error: Some(reason.into()), details: None }
    }

    /// Sets the state after.
    pub fn after(mut self, after: Value) -> Self {
        self.after = Some(after);
        self
    }

    /// Details to merge into the entry's.
    pub fn details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// A row of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// Id (offset resets stamp `oncely:reset:<id>` as commit metadata).
    pub id: i64,
    /// When it was recorded (before it ran).
    pub started_at: DateTime<Utc>,
    /// When its outcome was recorded.
    pub finished_at: Option<DateTime<Utc>>,
    /// OS user.
    pub os_user: String,
    /// Host.
    pub host: String,
    /// Environment.
    pub environment: String,
    /// Cluster id.
    pub cluster_id: Option<String>,
    /// Command line.
    pub command_line: String,
    /// Action.
    pub action: String,
    /// Group.
    pub group: Option<String>,
    /// State before.
    pub before: Option<Value>,
    /// State after.
    pub after: Option<Value>,
    /// Details.
    pub details: Value,
    /// `started`, `succeeded`, `failed` or `refused`.
    pub result: String,
    /// Error or refusal reason.
    pub error: Option<String>,
}

/// Which audit records to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Started at or after.
    pub since: Option<DateTime<Utc>>,
    /// Of this group.
    pub group: Option<String>,
    /// Of this action, or of actions starting with it followed by a dot
    /// (`offsets` matches `offsets.reset`).
    pub action: Option<String>,
    /// At most this many (the newest). Default: no limit.
    pub limit: Option<i64>,
}

const AUDIT_COLUMNS: &str =
    "id, started_at, finished_at, os_user, host, environment, cluster_id, command_line, action, \
                             group_id, before, after, details, result, error";

fn audit_row(r: &PgRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: r.try_get("id")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        os_user: r.try_get("os_user")?,
        host: r.try_get("host")?,
        environment: r.try_get("environment")?,
        cluster_id: r.try_get("cluster_id")?,
        command_line: r.try_get("command_line")?,
        action: r.try_get("action")?,
        group: r.try_get("group_id")?,
        before: r.try_get::<Option<Json<Value>>, _>("before")?.map(|j| j.0),
        after: r.try_get::<Option<Json<Value>>, _>("after")?.map(|j| j.0),
        details: r.try_get::<Json<Value>, _>("details")?.0,
        result: r.try_get("result")?,
        error: r.try_get("error")?,
    })
}

/// Inserts an audit record with `result` (`started`, or `refused` with its
/// reason and finished now); returns its id.
pub async fn insert_audit(pool: &PgPool, e: &AuditEntry, result: AuditResult, error: Option<&str>) -> Result<i64> {
    let row = sqlx::query(
        "INSERT INTO oncely.audit_log
           (os_user, host, environment, cluster_id, command_line, action, group_id, before, details, result, error,
            finished_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, CASE WHEN $10 = 'started' THEN NULL ELSE now() END)
         RETURNING id",
    )
    .bind(&e.actor.os_user)
    .bind(&e.actor.host)
    .bind(&e.environment)
    .bind(e.cluster_id.as_deref())
    .bind(&e.command_line)
    .bind(&e.action)
    .bind(e.group.as_deref())
    .bind(e.before.as_ref().map(Json))
    .bind(Json(&e.details))
    .bind(result.as_str())
    .bind(error)
    .fetch_one(pool)
    .await?;
    Ok(row.try_get(0)?)
}

/// Records the outcome of audit record `id` (details merged into its own).
pub async fn finish_audit(pool: &PgPool, id: i64, o: &AuditOutcome) -> Result<()> {
    sqlx::query(
        "UPDATE oncely.audit_log
            SET result = $2, after = COALESCE($3, after), error = $4,
                details = details || COALESCE($5, '{}'::jsonb), finished_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .bind(o.result.as_str())
    .bind(o.after.as_ref().map(Json))
    .bind(o.error.as_deref())
    .bind(o.details.as_ref().map(Json))
    .execute(pool)
    .await?;
    Ok(())
}

/// The audit record with this id.
pub async fn get_audit(pool: &PgPool, id: i64) -> Result<Option<AuditRecord>> {
    let row = sqlx::query(&format!("SELECT {AUDIT_COLUMNS} FROM oncely.audit_log WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(audit_row).transpose()
}

/// Audit records matching `f`, oldest first (the newest `f.limit`).
pub async fn list_audit(pool: &PgPool, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
    let rows = sqlx::query(&format!(
        "SELECT * FROM (
           SELECT {AUDIT_COLUMNS} FROM oncely.audit_log
            WHERE ($1::timestamptz IS NULL OR started_at >= $1)
              AND ($2::text IS NULL OR group_id = $2)
              AND ($3::text IS NULL OR action = $3 OR starts_with(action, $3 || '.'))
            ORDER BY id DESC LIMIT $4) a
         ORDER BY id"
    ))
    .bind(f.since)
    .bind(f.group.as_deref())
    .bind(f.action.as_deref())
    .bind(f.limit.unwrap_or(i64::MAX))
    .fetch_all(pool)
    .await?;
    rows.iter().map(audit_row).collect()
}

/// The offset changes of a group on a cluster (one of `actions`) that may
/// have changed something: `succeeded`, and also `failed` and `started` (a
/// change that failed midway, or whose command died, may have moved some
/// partitions), never `refused`. Newest first, at most `limit`.
pub async fn offset_changes(
    pool: &PgPool,
    cluster_id: &str,
    group: &str,
    actions: &[&str],
    limit: i64,
) -> Result<Vec<AuditRecord>> {
    let rows = sqlx::query(&format!(
        "SELECT {AUDIT_COLUMNS} FROM oncely.audit_log
          WHERE cluster_id = $1 AND group_id = $2 AND action = ANY($3)
            AND result IN ('succeeded', 'failed', 'started')
          ORDER BY id DESC LIMIT $4"
    ))
    .bind(cluster_id)
    .bind(group)
    .bind(actions)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(audit_row).collect()
}

/// First key of the group lock (an arbitrary constant: "onc").
const GROUP_LOCK_SPACE: i32 = 0x006f_6e63;

/// Tries to take the session-level advisory lock of `group` on `conn`
/// (without waiting); false when another session holds it. Held until
/// the connection closes (a crashed CLI releases it).
pub async fn try_lock_group(conn: &mut PgConnection, group: &str) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(GROUP_LOCK_SPACE)
        .bind(group)
        .fetch_one(&mut *conn)
        .await?)
}

/// Whether the operator tables exist (migration 3 applied).
pub async fn operator_schema_present(pool: &PgPool) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT to_regclass('oncely.audit_log') IS NOT NULL AND to_regclass('oncely.offset_snapshots') IS NOT NULL",
    )
    .fetch_one(pool)
    .await?)
}

/// Whether the core tables exist (migration 1 applied).
pub async fn core_schema_present(pool: &PgPool) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT to_regclass('oncely.consumers') IS NOT NULL AND to_regclass('oncely.offsets') IS NOT NULL",
    )
    .fetch_one(pool)
    .await?)
}
