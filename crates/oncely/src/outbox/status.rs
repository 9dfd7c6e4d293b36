//! What `oncely outbox status` shows.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::relay::{LANE_LOCK_NS, PRESENCE_LOCK_NS};
use super::LANES;
use crate::error::Result;
use crate::store::outbox as store;

/// The state of the outbox and its relays.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct OutboxStatus {
    /// Rows waiting to be published, held ones included (not the ones set aside).
    pub pending: i64,
    /// Pending rows held behind a row set aside (same topic and key).
    pub held: i64,
    /// Rows set aside because the broker refused them for good, not
    /// discarded (`oncely outbox list --failed`).
    pub failed: i64,
    /// Age of the oldest pending row (time since it was enqueued).
    #[serde(serialize_with = "secs_opt")]
    pub oldest_pending_age: Option<Duration>,
    /// Rows marked published in the last minute.
    pub published_last_minute: i64,
    /// Publish rate over the last minute, per second.
    pub publish_rate_per_s: f64,
    /// Published rows not yet removed by retention.
    pub published_kept: i64,
    /// Relays running against this database.
    pub relays: i64,
    /// Every lane, in order.
    pub lanes: Vec<LaneStatus>,
}

/// One lane.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct LaneStatus {
    /// Lane number.
    pub lane: i16,
    /// Its pending rows.
    pub pending: i64,
    /// Its rows set aside, not discarded.
    pub failed: i64,
    /// Age of its oldest pending row.
    #[serde(serialize_with = "secs_opt")]
    pub oldest_pending_age: Option<Duration>,
    /// The most failed attempts of one of its pending or set-aside rows (0: no failure).
    pub max_attempts: i32,
    /// The last publish error of its oldest failing row (pending or set aside).
    pub last_error: Option<String>,
    /// The relay holding it, if any.
    pub owner: Option<LaneOwner>,
}

/// The relay session that holds a lane's lock (from `pg_locks` and
/// `pg_stat_activity`).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct LaneOwner {
    /// Backend pid of the relay's lock session.
    pub pid: i32,
    /// The session's `application_name`: `oncely-relay <name>`.
    pub name: Option<String>,
    /// The relay's address as the server sees it.
    pub addr: Option<String>,
    /// When the session started.
    pub since: Option<DateTime<Utc>>,
}

fn secs_opt<S: serde::Serializer>(d: &Option<Duration>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

fn age(now: DateTime<Utc>, t: Option<DateTime<Utc>>) -> Option<Duration> {
    t.map(|t| (now - t).to_std().unwrap_or_default())
}

/// Reads the outbox's status: totals, rate, and every lane with its owner.
pub async fn status(pool: &PgPool) -> Result<OutboxStatus> {
    let t = store::totals(pool, PRESENCE_LOCK_NS).await?;
    let lanes = store::lanes(pool, LANE_LOCK_NS, LANES).await?;
    Ok(OutboxStatus {
        pending: t.pending,
        held: t.held,
        failed: t.failed,
        oldest_pending_age: age(t.now, t.oldest_pending),
        published_last_minute: t.published_last_minute,
        publish_rate_per_s: t.published_last_minute as f64 / 60.0,
        published_kept: t.published_kept,
        relays: t.relays,
        lanes: lanes
            .into_iter()
            .map(|l| LaneStatus {
                lane: l.lane,
                pending: l.pending,
                failed: l.failed,
                oldest_pending_age: age(t.now, l.oldest_pending),
                max_attempts: l.max_attempts,
                last_error: l.last_error,
                owner: l.owner_pid.map(|pid| LaneOwner {
                    pid,
                    name: l.owner_name,
                    addr: l.owner_addr,
                    since: l.owner_since,
                }),
            })
            .collect(),
    })
}
