//! Operator decisions on outbox rows the relay set aside, as
//! [`ops`](crate::admin::ops) operations: send them back to pending after
//! the cause was fixed ([`preview_retry`]), or give them up
//! ([`preview_discard`]). The preview lists the rows as they are (a row that
//! is not set aside is a refusal); a protected environment requires
//! `OUTBOX-RETRY <ENV>` / `OUTBOX-DISCARD <ENV>` typed; the execution is
//! audited (who, from where, the rows) before it changes anything, and
//! [`crate::outbox::failed::retry`] / [`crate::outbox::failed::discard`]
//! check the rows again in the statement that changes them.

use serde::Serialize;
use serde_json::json;

use crate::admin::audit::{AuditEntry, AuditOutcome};
use crate::admin::ops::{Operation, Origin, Preview, Trail};
use crate::admin::session::Session;
use crate::error::Result;
use crate::outbox::failed::{self, FailedRow};

/// Retry or discard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboxDecision {
    /// Back to pending (the relay tries them again at once).
    Retry,
    /// Never published; the rows held behind them go on.
    Discard {
        /// Why (kept with each row and in the audit log).
        reason: String,
    },
}

/// A decision on rows set aside, previewed.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxChange {
    /// What is decided.
    pub decision: OutboxDecision,
    /// The ids asked for (`None`: every row set aside, for a retry).
    pub ids: Option<Vec<i64>>,
    /// The rows set aside it applies to, as they are now.
    pub rows: Vec<FailedRow>,
    /// Why it would be refused (empty: it may go ahead).
    pub refusals: Vec<String>,
}

/// What an executed decision did.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxDone {
    /// The audit record.
    pub audit_id: i64,
    /// The rows changed.
    pub ids: Vec<i64>,
}

/// How many rows set aside a preview reads at most.
const PREVIEW_LIMIT: i64 = 10_000;

async fn preview(
    session: &Session,
    decision: OutboxDecision,
    ids: Option<&[i64]>,
    origin: Origin,
) -> Result<Preview<OutboxChange>> {
    session.require_operator_schema().await?;
    let set_aside: Vec<FailedRow> = failed::list(session.pool(), false, PREVIEW_LIMIT).await?;
    let mut refusals = Vec::new();
    let rows: Vec<FailedRow> = match ids {
        None => set_aside,
        Some(ids) => {
            let missing: Vec<i64> = ids.iter().copied().filter(|id| !set_aside.iter().any(|r| r.id == *id)).collect();
            if !missing.is_empty() {
                refusals.push(format!("rows {missing:?} are not set aside (failed and not discarded)"));
            }
            set_aside.into_iter().filter(|r| ids.contains(&r.id)).collect()
        }
    };
    if rows.is_empty() && refusals.is_empty() {
        refusals.push("no row is set aside".into());
    }
    if let OutboxDecision::Discard { reason } = &decision {
        if reason.trim().is_empty() {
            refusals.push("a discard needs a reason (--reason): it is kept with each row".into());
        }
    }
    let op = OutboxChange { decision, ids: ids.map(<[i64]>::to_vec), rows, refusals };
    Ok(Preview::new(session, op, origin))
}

/// Previews sending rows `ids` (every row set aside with `None`) back to pending.
pub async fn preview_retry(session: &Session, ids: Option<&[i64]>, origin: Origin) -> Result<Preview<OutboxChange>> {
    preview(session, OutboxDecision::Retry, ids, origin).await
}

/// Previews giving up rows `ids`, for `reason`.
pub async fn preview_discard(
    session: &Session,
    ids: &[i64],
    reason: &str,
    origin: Origin,
) -> Result<Preview<OutboxChange>> {
    preview(session, OutboxDecision::Discard { reason: reason.to_owned() }, Some(ids), origin).await
}

impl Operation for OutboxChange {
    type Output = OutboxDone;

    fn action(&self) -> &'static str {
        match self.decision {
            OutboxDecision::Retry => "outbox.retry",
            OutboxDecision::Discard { .. } => "outbox.discard",
        }
    }

    fn confirmation_text(&self, environment: &str) -> String {
        match self.decision {
            OutboxDecision::Retry => format!("OUTBOX-RETRY {environment}"),
            OutboxDecision::Discard { .. } => format!("OUTBOX-DISCARD {environment}"),
        }
    }

    fn refusals(&self) -> &[String] {
        &self.refusals
    }

    fn audit_entry(&self, entry: AuditEntry) -> AuditEntry {
        let rows: Vec<_> = self
            .rows
            .iter()
            .map(|r| json!({"id": r.id, "topic": r.topic, "reason": r.reason, "held": r.held}))
            .collect();
        entry.before(json!(rows)).details(json!({"decision": self.decision, "ids": self.ids}))
    }

    async fn run(&self, session: &Session, trail: &mut Trail) -> Result<OutboxDone> {
        let audit_id = trail.start().await?;
        let pool = session.pool();
        let ids: Vec<i64> = self.rows.iter().map(|r| r.id).collect();
        let done = match &self.decision {
            // `None` (all) only when asked for all: rows set aside after
            // the preview are retried too, as the operator asked.
            OutboxDecision::Retry => failed::retry(pool, self.ids.as_ref().map(|_| ids.as_slice())).await?,
            OutboxDecision::Discard { reason } => failed::discard(pool, &ids, reason).await?,
        };
        trail.finish_quietly(&AuditOutcome::succeeded(Some(json!({"ids": done})))).await;
        Ok(OutboxDone { audit_id, ids: done })
    }
}
