//! Swap and swap-back as operator actions, in the shape of every other one
//! ([`crate::admin::ops`]): a [`Preview`] of what will change, confirmed
//! (typed text on a protected environment), then executed with the audit
//! record written first.
//!
//! The refusals are decided by one pure function, [`swap_refusals`], once
//! for the preview and again inside the swap's transaction, under the locks
//! that fence both consumers: what the operator saw may have changed since.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use super::{lag_of, DiffReport, Lag, RebuildFrom};
use crate::admin::audit::{self, AuditEntry, AuditOutcome};
use crate::admin::ops::{Operation, Origin, Preview, Trail};
use crate::admin::session::Session;
use crate::error::{Error, Result};
use crate::store;
use crate::store::projection::{PartitionPositions, RebuildRow};

/// Swap a rebuild in, or swap the previous projection back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwapKind {
    /// The rebuilt projection replaces the live one.
    Swap,
    /// The previous projection (kept in the target schema) comes back.
    SwapBack,
}

/// What the operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapRequest {
    /// The rebuild target (schema).
    pub target: String,
    /// The most records the rebuild may lag behind the live consumer to
    /// start a swap. The swap pauses the live consumer until the rebuild
    /// has caught up exactly, so this bounds the pause. Default 1000.
    pub max_lag: i64,
    /// Swap even though diff has not been run since the last swap, or ran
    /// while the rebuild lagged more than `max_lag` behind live (recorded in
    /// the audit log as an override).
    pub allow_without_diff: bool,
    /// Swap even though one side dead-lettered records the other applied
    /// ([`Unsettled`]; recorded in the audit log as an override).
    pub allow_dead_letter_mismatch: bool,
    /// How long swap-back stays possible, in days. Default 7.
    pub keep_days: i32,
    /// How long the swap waits for a lock (an open batch). Default 30 s.
    pub lock_timeout: std::time::Duration,
    /// How long the paused live consumer waits for the rebuild to reach
    /// its position exactly. Default 20 s; the swap is refused after it.
    /// Keep it below the consumer's `zombie_timeout` plus the session
    /// timeout: a member taking a partition over meanwhile ends the swap's
    /// session after its `zombie_timeout`, which rolls the swap back.
    pub catch_up_timeout: std::time::Duration,
}

impl SwapRequest {
    /// A request with the defaults.
    pub fn new(target: impl Into<String>) -> Self {
        SwapRequest {
            target: target.into(),
            max_lag: 1000,
            allow_without_diff: false,
            allow_dead_letter_mismatch: false,
            keep_days: 7,
            lock_timeout: std::time::Duration::from_secs(30),
            catch_up_timeout: std::time::Duration::from_secs(20),
        }
    }
}

/// What one side has not settled, which a swap would lose: parked events of
/// both sides, and dead letters only one side has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Unsettled {
    /// Events the live consumer has parked.
    pub parked_live: i64,
    /// Events the rebuild has parked.
    pub parked_rebuild: i64,
    /// Records the live consumer dead-lettered (and nobody redrove) that the
    /// rebuild has passed without dead-lettering: it applied them, with their
    /// effects suppressed.
    pub dead_live_only: i64,
    /// Records the rebuild dead-lettered that the live consumer has passed
    /// without dead-lettering: it applied them; the rebuilt projection lacks
    /// them.
    pub dead_rebuild_only: i64,
}

impl Unsettled {
    async fn read(conn: &mut sqlx::PgConnection, row: &RebuildRow) -> Result<Self> {
        let (dead_live_only, dead_rebuild_only) =
            store::projection::dead_letter_mismatch(conn, &row.consumer, &row.rebuild_consumer).await?;
        Ok(Unsettled {
            parked_live: store::projection::parked_count(conn, &row.consumer).await?,
            parked_rebuild: store::projection::parked_count(conn, &row.rebuild_consumer).await?,
            dead_live_only,
            dead_rebuild_only,
        })
    }
}

/// Why a swap (or swap-back) may not go ahead, and the overrides it goes
/// ahead with. Pure: the preview and the transaction both call it.
pub fn swap_refusals(
    kind: SwapKind,
    row: &RebuildRow,
    lag: &Lag,
    unsettled: Unsettled,
    req: &SwapRequest,
    now: DateTime<Utc>,
) -> (Vec<String>, Vec<String>) {
    let mut refusals = Vec::new();
    let mut overrides = Vec::new();
    match kind {
        SwapKind::Swap => {
            if row.state != "rebuilding" {
                refusals.push(format!(
                    "rebuild {} is swapped in already (its schema holds the previous projection; swap-back restores it)",
                    row.target
                ));
            }
            // The last diff's lag (absent from diffs recorded before it was kept).
            let diff_lag = row.diff.as_ref().and_then(|d| d["lag_behind"].as_i64()).unwrap_or(0);
            if row.diffed_at.is_none() {
                if req.allow_without_diff {
                    overrides.push("swapped without a diff since the last swap".to_owned());
                } else {
                    refusals.push(format!(
                        "diff has not been run for {} (since the last swap): run `oncely projection diff {}`, or override",
                        row.target, row.target
                    ));
                }
            } else if diff_lag > req.max_lag {
                if req.allow_without_diff {
                    overrides.push(format!("swapped with a diff taken {diff_lag} records behind live"));
                } else {
                    refusals.push(format!(
                        "the last diff of {} ran while the rebuild lagged {diff_lag} records behind live (bound {}): \
                         it compared little of what the swap brings in; run `oncely projection diff {}` again, or override",
                        row.target, req.max_lag, row.target
                    ));
                }
            }
            if !lag.missing.is_empty() {
                refusals.push(format!(
                    "the rebuild has no position on {} partition(s) the live consumer has ({:?}): it has not started there",
                    lag.missing.len(),
                    lag.missing
                ));
            }
            if lag.behind > req.max_lag {
                refusals.push(format!(
                    "the rebuild lags {} records behind the live consumer (bound {}): wait for it to catch up",
                    lag.behind, req.max_lag
                ));
            }
            if lag.ahead > 0 {
                refusals.push(format!(
                    "the rebuild is {} records ahead of the live consumer (was the live consumer moved back?): \
                     swapping would skip their side effects",
                    lag.ahead
                ));
            }
            if unsettled.parked_rebuild > 0 {
                refusals.push(format!(
                    "the rebuild has {} parked event(s): they are not in the rebuilt projection yet",
                    unsettled.parked_rebuild
                ));
            }
            if unsettled.parked_live > 0 {
                refusals.push(format!(
                    "the live consumer has {} parked event(s): the rebuild applied them with effects suppressed, \
                     so after a swap their effects would never run; let them drain or resolve them first",
                    unsettled.parked_live
                ));
            }
            let dead = unsettled.dead_live_only + unsettled.dead_rebuild_only;
            if dead > 0 && req.allow_dead_letter_mismatch {
                overrides.push(format!(
                    "swapped with {} dead letter(s) of the live consumer the rebuild applied and {} of the rebuild \
                     the live consumer applied",
                    unsettled.dead_live_only, unsettled.dead_rebuild_only
                ));
            } else {
                if unsettled.dead_live_only > 0 {
                    refusals.push(format!(
                        "{} record(s) the live consumer dead-lettered were applied by the rebuild with effects \
                         suppressed: after a swap their effects would never run, and redriving them would be a \
                         duplicate; redrive them first where the live code applies them now (`oncely dlq redrive \
                         --all --consumer {}`), or override and run their effects yourself",
                        unsettled.dead_live_only, row.consumer
                    ));
                }
                if unsettled.dead_rebuild_only > 0 {
                    refusals.push(format!(
                        "{} record(s) the rebuild dead-lettered were applied by the live consumer: the rebuilt \
                         projection lacks them (`oncely dlq list --consumer {}`); fix and rebuild, or override",
                        unsettled.dead_rebuild_only, row.rebuild_consumer
                    ));
                }
            }
        }
        SwapKind::SwapBack => {
            if row.state != "swapped" {
                refusals.push(format!("rebuild {} is not swapped in: nothing to swap back", row.target));
            }
            if let Some(until) = row.keep_until {
                if now > until {
                    refusals.push(format!(
                        "the previous projection was kept until {until}: swap-back is no longer allowed"
                    ));
                }
            }
        }
    }
    (refusals, overrides)
}

/// The preview of a swap or swap-back: what changes, and why it may not.
#[derive(Debug, Clone, Serialize)]
pub struct SwapPlan {
    /// Swap or swap-back.
    pub kind: SwapKind,
    /// The rebuild.
    pub rebuild: RebuildRow,
    /// The positions now (the live consumer's and the rebuild's).
    pub positions: Vec<PartitionPositions>,
    /// The rebuild's lag behind live.
    pub lag: Lag,
    /// Parked events and one-sided dead letters.
    pub unsettled: Unsettled,
    /// Why it would be refused (empty: it may go ahead).
    pub refusals: Vec<String>,
    /// The overrides it goes ahead with (audited).
    pub overrides: Vec<String>,
    /// The lag bound.
    pub max_lag: i64,
    /// Days the previous projection is kept for swap-back.
    pub keep_days: i32,
    #[serde(skip)]
    request: SwapRequest,
}

/// What an executed swap did.
#[derive(Debug, Clone, Serialize)]
pub struct SwapDone {
    /// The audit record.
    pub audit_id: i64,
    /// The positions after (the live consumer's are the rebuild's from before).
    pub positions: Vec<PartitionPositions>,
    /// Inbox rows exchanged.
    pub exchanged: store::projection::Exchanged,
}

async fn plan(session: &Session, kind: SwapKind, row: RebuildRow, req: SwapRequest) -> Result<SwapPlan> {
    let pool = session.pool();
    let positions = store::projection::positions(pool, &row.consumer, &row.rebuild_consumer).await?;
    let lag = lag_of(&positions);
    let mut conn = pool.acquire().await?;
    let unsettled = Unsettled::read(&mut conn, &row).await?;
    drop(conn);
    let (refusals, overrides) = swap_refusals(kind, &row, &lag, unsettled, &req, Utc::now());
    Ok(SwapPlan {
        kind,
        rebuild: row,
        positions,
        lag,
        unsettled,
        refusals,
        overrides,
        max_lag: req.max_lag,
        keep_days: req.keep_days,
        request: req,
    })
}

/// Previews swapping rebuild `req.target` in.
pub async fn preview_swap(session: &Session, req: &SwapRequest, origin: Origin) -> Result<Preview<SwapPlan>> {
    session.require_operator_schema().await?;
    let row = store::projection::get(session.pool(), &req.target)
        .await?
        .ok_or_else(|| Error::Refused(format!("no rebuild {}", req.target)))?;
    let op = plan(session, SwapKind::Swap, row, req.clone()).await?;
    Ok(Preview::new(session, op, origin))
}

/// Previews swapping back projection `projection` (its most recent swap).
pub async fn preview_swap_back(session: &Session, projection: &str, origin: Origin) -> Result<Preview<SwapPlan>> {
    session.require_operator_schema().await?;
    let row = store::projection::last_swapped(session.pool(), projection)
        .await?
        .ok_or_else(|| Error::Refused(format!("projection {projection} has no swap to take back")))?;
    let req = SwapRequest::new(row.target.clone());
    let op = plan(session, SwapKind::SwapBack, row, req).await?;
    Ok(Preview::new(session, op, origin))
}

fn positions_json(p: &[PartitionPositions]) -> serde_json::Value {
    serde_json::to_value(p).unwrap_or_default()
}

impl Operation for SwapPlan {
    type Output = SwapDone;

    fn action(&self) -> &'static str {
        match self.kind {
            SwapKind::Swap => "projection.swap",
            SwapKind::SwapBack => "projection.swap-back",
        }
    }

    fn confirmation_text(&self, environment: &str) -> String {
        match self.kind {
            SwapKind::Swap => format!("SWAP {environment} {}", self.rebuild.target),
            SwapKind::SwapBack => format!("SWAP-BACK {environment} {}", self.rebuild.projection),
        }
    }

    fn refusals(&self) -> &[String] {
        &self.refusals
    }

    fn audit_entry(&self, entry: AuditEntry) -> AuditEntry {
        entry.group(&self.rebuild.consumer).before(positions_json(&self.positions)).details(json!({
            "projection": self.rebuild.projection,
            "target": self.rebuild.target,
            "rebuild_consumer": self.rebuild.rebuild_consumer,
            "live_schema": self.rebuild.live_schema,
            "tables": self.rebuild.tables,
            "lag": self.lag,
            "max_lag": self.max_lag,
            "diffed_at": self.rebuild.diffed_at,
            "diff": self.rebuild.diff,
            "overrides": self.overrides,
        }))
    }

    async fn run(&self, session: &Session, trail: &mut Trail) -> Result<SwapDone> {
        let audit_id = trail.start().await?;
        let pool = session.pool();
        let req = &self.request;
        let (mut tx, row) = store::projection::begin_swap(pool, &self.rebuild.target, req.lock_timeout).await?;
        // Pause the live consumer: its batches wait on their offsets rows
        // until this transaction ends.
        store::projection::lock_offsets(&mut tx, &row.consumer).await?;
        if self.kind == SwapKind::Swap {
            // The rebuild follows the live consumer's committed position,
            // which stands still now: let it reach it exactly, so the live
            // consumer goes on with nothing to apply again (no effect
            // recorded again, nothing published twice).
            let deadline = tokio::time::Instant::now() + req.catch_up_timeout;
            loop {
                let positions = store::projection::positions_in(&mut tx, &row.consumer, &row.rebuild_consumer).await?;
                let lag = lag_of(&positions);
                if lag.behind == 0 || tokio::time::Instant::now() >= deadline || lag.behind > req.max_lag {
                    break;
                }
                tokio::time::sleep(CATCH_UP_POLL).await;
            }
        }
        store::projection::lock_offsets(&mut tx, &row.rebuild_consumer).await?;
        // Under the locks: what the preview saw may have changed.
        let positions = store::projection::positions_in(&mut tx, &row.consumer, &row.rebuild_consumer).await?;
        let lag = lag_of(&positions);
        let unsettled = Unsettled::read(&mut tx, &row).await?;
        let (mut refusals, overrides) = swap_refusals(self.kind, &row, &lag, unsettled, req, Utc::now());
        // The audit row holds the preview's overrides: the swap may not go
        // ahead on others (a dead letter the rebuild passed while the live
        // consumer was paused, say) that nobody saw.
        if refusals.is_empty() && overrides != self.overrides {
            refusals.push(format!(
                "what the swap overrides changed since the preview ({:?}, now {:?}): preview it again",
                self.overrides, overrides
            ));
        }
        if self.kind == SwapKind::Swap && lag.behind > 0 && refusals.is_empty() {
            refusals.push(format!(
                "the rebuild did not catch up with the paused live consumer within {:?} ({} records behind): is it running?",
                req.catch_up_timeout, lag.behind
            ));
        }
        if !refusals.is_empty() {
            tx.rollback().await?;
            return Err(trail.refuse(refusals.join("; ")).await);
        }
        let exchanged =
            store::projection::exchange(&mut tx, &row, self.kind == SwapKind::Swap, self.keep_days, audit_id).await?;
        tx.commit().await?;
        let after = store::projection::positions(pool, &row.consumer, &row.rebuild_consumer).await?;
        tracing::info!(
            target = %row.target, projection = %row.projection, consumer = %row.consumer, kind = ?self.kind,
            inbox_to_live = exchanged.inbox_to_live, audit_id, "Projection swapped."
        );
        trail
            .finish_quietly(&AuditOutcome::succeeded(Some(positions_json(&after))).details(json!({
                "positions_at_swap": positions_json(&positions),
                "exchanged": exchanged,
            })))
            .await;
        Ok(SwapDone { audit_id, positions: after, exchanged })
    }
}

/// The preview of asking for a rebuild (`oncely projection rebuild`): the
/// operator's command line cannot run the application's handler, so it
/// records a request that the application serving the projection
/// ([`Projection::serve`](super::Projection::serve)) runs.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildRequestPlan {
    /// The rebuild target (schema).
    pub target: String,
    /// The live consumer whose projection is rebuilt.
    pub consumer: String,
    /// Where it starts (`earliest`, a time, `snapshot:<id>`).
    pub from: String,
    /// The rebuild consumer's name (its inbox, offsets and dead letters).
    pub rebuild_consumer: String,
    /// The live consumer's positions now: what the rebuild catches up to.
    pub live_positions: Vec<PartitionPositions>,
    /// Why it would be refused (empty: it may go ahead).
    pub refusals: Vec<String>,
}

/// What a recorded request returns.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildRequested {
    /// The audit record.
    pub audit_id: i64,
    /// The target.
    pub target: String,
}

/// Previews asking the application to rebuild `consumer`'s projection into
/// schema `target`, starting `from`.
pub async fn preview_rebuild(
    session: &Session,
    consumer: &str,
    target: &str,
    from: RebuildFrom,
    origin: Origin,
) -> Result<Preview<RebuildRequestPlan>> {
    session.require_operator_schema().await?;
    let pool = session.pool();
    let mut refusals = Vec::new();
    if let Err(e) = super::check_target(target, None) {
        refusals.push(e.to_string());
    }
    if store::consumer_id(pool, consumer).await?.is_none() {
        refusals.push(format!("consumer {consumer} has never run here: nothing to rebuild"));
    }
    if let Some(r) = store::projection::get(pool, target).await? {
        refusals.push(format!(
            "target {target} is already the rebuild of projection {} for {} (state {}): `oncely projection status {target}`",
            r.projection, r.consumer, r.state
        ));
    } else if let Some(q) = store::projection::get_request(pool, target).await? {
        refusals.push(format!(
            "target {target} was requested already at {} for {}: waiting for the application to run it",
            q.requested_at, q.consumer
        ));
    } else if store::projection::schema_exists(pool, target).await? {
        refusals.push(format!("schema {target} exists already: choose another target"));
    }
    match from {
        RebuildFrom::Snapshot(id) => match crate::admin::snapshots::get(pool, id).await? {
            None => refusals.push(format!("no offset snapshot {id}")),
            Some(s) if s.group != consumer => {
                refusals.push(format!("offset snapshot {id} is of group {}, not {consumer}", s.group))
            }
            Some(_) => {}
        },
        RebuildFrom::Time(t) if t > Utc::now() => refusals.push(format!("{t} is in the future")),
        _ => {}
    }
    let rebuild_consumer = super::rebuild_consumer_name(consumer, target);
    let live_positions = store::projection::positions(pool, consumer, &rebuild_consumer).await?;
    let op = RebuildRequestPlan {
        target: target.to_owned(),
        consumer: consumer.to_owned(),
        from: from.spec(),
        rebuild_consumer,
        live_positions,
        refusals,
    };
    Ok(Preview::new(session, op, origin))
}

impl Operation for RebuildRequestPlan {
    type Output = RebuildRequested;

    fn action(&self) -> &'static str {
        "projection.rebuild"
    }

    fn confirmation_text(&self, environment: &str) -> String {
        format!("REBUILD {environment} {}", self.target)
    }

    fn refusals(&self) -> &[String] {
        &self.refusals
    }

    fn audit_entry(&self, entry: AuditEntry) -> AuditEntry {
        entry.group(&self.consumer).before(positions_json(&self.live_positions)).details(json!({
            "target": self.target,
            "from": self.from,
            "rebuild_consumer": self.rebuild_consumer,
        }))
    }

    async fn run(&self, session: &Session, trail: &mut Trail) -> Result<RebuildRequested> {
        let audit_id = trail.start().await?;
        let recorded =
            store::projection::insert_request(session.pool(), &self.target, &self.consumer, &self.from, audit_id)
                .await?;
        if !recorded {
            return Err(trail.refuse(format!("target {} was requested or created meanwhile", self.target)).await);
        }
        trail.finish_quietly(&AuditOutcome::succeeded(None)).await;
        Ok(RebuildRequested { audit_id, target: self.target.clone() })
    }
}

/// The preview of dropping a rebuild target (`oncely projection drop`):
/// abandoning a rebuild, or removing the previous projection a swap kept
/// once its retention has ended, or withdrawing a request no application
/// has started.
#[derive(Debug, Clone, Serialize)]
pub struct DropPlan {
    /// The target.
    pub target: String,
    /// The rebuild (None: only a request).
    pub rebuild: Option<RebuildRow>,
    /// What the drop removes, in words.
    pub meaning: String,
    /// Why it would be refused (empty: it may go ahead).
    pub refusals: Vec<String>,
}

/// What a drop did.
#[derive(Debug, Clone, Serialize)]
pub struct DropDone {
    /// The audit record.
    pub audit_id: i64,
    /// What it removed (None: a request was withdrawn).
    pub dropped: Option<store::projection::Dropped>,
}

/// Previews dropping rebuild target `target`. Refused while a swap's
/// previous projection is still kept for swap-back.
pub async fn preview_drop(session: &Session, target: &str, origin: Origin) -> Result<Preview<DropPlan>> {
    session.require_operator_schema().await?;
    let pool = session.pool();
    let rebuild = store::projection::get(pool, target).await?;
    let request = store::projection::get_request(pool, target).await?;
    let mut refusals = Vec::new();
    let meaning = match (&rebuild, &request) {
        (None, None) => {
            refusals.push(format!("no rebuild or request {target}"));
            String::new()
        }
        (None, Some(q)) => format!("withdraws the request of {} (not started by any application)", q.requested_at),
        (Some(r), _) if r.state == "rebuilding" => format!(
            "abandons the rebuild of projection {} (consumer {}): drops schema {target} and the namespace {} \
             (positions, inbox, versions, suppressed intents); a running rebuild stops; the live projection is untouched",
            r.projection, r.consumer, r.rebuild_consumer
        ),
        (Some(r), _) => {
            if r.keep_until.is_some_and(|until| Utc::now() < until) {
                refusals.push(format!(
                    "schema {target} holds the previous projection of {}, kept for swap-back until {}: drop it after that",
                    r.projection,
                    r.keep_until.map(|u| u.to_rfc3339()).unwrap_or_default()
                ));
            }
            format!(
                "drops the previous projection of {} kept in schema {target} since the swap of {}: swap-back is no \
                 longer possible; the live projection is untouched",
                r.projection,
                r.swapped_at.map(|t| t.to_rfc3339()).unwrap_or_default()
            )
        }
    };
    Ok(Preview::new(session, DropPlan { target: target.to_owned(), rebuild, meaning, refusals }, origin))
}

impl Operation for DropPlan {
    type Output = DropDone;

    fn action(&self) -> &'static str {
        "projection.drop"
    }

    fn confirmation_text(&self, environment: &str) -> String {
        format!("DROP {environment} {}", self.target)
    }

    fn refusals(&self) -> &[String] {
        &self.refusals
    }

    fn audit_entry(&self, entry: AuditEntry) -> AuditEntry {
        let entry = match &self.rebuild {
            Some(r) => entry.group(&r.consumer),
            None => entry,
        };
        entry.details(json!({"target": self.target, "rebuild": self.rebuild, "meaning": self.meaning}))
    }

    async fn run(&self, session: &Session, trail: &mut Trail) -> Result<DropDone> {
        let audit_id = trail.start().await?;
        let pool = session.pool();
        let dropped = match &self.rebuild {
            None => {
                if !store::projection::delete_request(pool, &self.target).await? {
                    return Err(trail
                        .refuse(format!("the request for {} was started or withdrawn meanwhile", self.target))
                        .await);
                }
                None
            }
            Some(r) => {
                // Under the row's lock: the state the preview saw may have changed.
                let now = store::projection::get(pool, &self.target).await?;
                if now.as_ref().map(|n| (&n.state, n.swaps)) != Some((&r.state, r.swaps)) {
                    return Err(trail
                        .refuse(format!("rebuild {} changed since the preview: preview again", self.target))
                        .await);
                }
                Some(store::projection::drop_rebuild(pool, r, std::time::Duration::from_secs(30)).await?)
            }
        };
        trail.finish_quietly(&AuditOutcome::succeeded(dropped.as_ref().map(|d| json!(d)))).await;
        Ok(DropDone { audit_id, dropped })
    }
}

/// [`compare`](super::compare), recorded in the audit log
/// (`projection.diff`, with the summary as its outcome) and as the rebuild's
/// last diff: a swap requires one since the last swap, so who compared what,
/// when, shows in `oncely audit`. Changes nothing but that record, so no
/// confirmation is asked. The only way to satisfy the swap's diff check.
pub async fn diff(session: &Session, target: &str, sample: i64, origin: Origin) -> Result<(DiffReport, i64)> {
    session.require_operator_schema().await?;
    let pool = session.pool();
    let row =
        store::projection::get(pool, target).await?.ok_or_else(|| Error::Refused(format!("no rebuild {target}")))?;
    let entry = AuditEntry::new(&session.env().name, "projection.diff")
        .actor(origin.actor)
        .command_line(origin.command_line)
        .cluster_id(session.cluster_id())
        .group(&row.consumer)
        .details(json!({"target": target, "projection": row.projection, "state": row.state}));
    let audit_id = audit::record_start(pool, &entry).await?;
    let lag = super::lag_of(&store::projection::positions(pool, &row.consumer, &row.rebuild_consumer).await?).behind;
    let report = match super::compare(pool, target, sample).await {
        Ok(r) => store::projection::record_diff(pool, target, &super::diff_summary(&r, lag)).await.map(|()| r),
        Err(e) => Err(e),
    };
    let outcome = match &report {
        Ok(r) => AuditOutcome::succeeded(Some(super::diff_summary(r, lag))),
        Err(e) => AuditOutcome::failed(e.to_string()),
    };
    if let Err(e) = audit::record_result(pool, audit_id, &outcome).await {
        tracing::warn!(error = %e, audit_id, "Could not record the outcome in the audit log.");
    }
    Ok((report?, audit_id))
}

/// How often a swap looks whether the rebuild reached the paused live
/// consumer.
const CATCH_UP_POLL: std::time::Duration = std::time::Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &str, diffed: bool) -> RebuildRow {
        let now = Utc::now();
        RebuildRow {
            target: "billing_v2".into(),
            projection: "billing".into(),
            consumer: "billing".into(),
            rebuild_consumer: "billing.rebuild.billing_v2".into(),
            live_schema: "public".into(),
            tables: vec!["invoices".into()],
            diff_ignore: vec![],
            from_spec: "earliest".into(),
            state: state.into(),
            created_at: now,
            diffed_at: diffed.then_some(now),
            diff: None,
            swapped_at: None,
            keep_until: (state == "swapped").then(|| now + chrono::Duration::days(7)),
            swap_audit_id: None,
            swaps: 0,
        }
    }

    fn lag(behind: i64, ahead: i64) -> Lag {
        Lag { behind, ahead, missing: vec![] }
    }

    #[test]
    fn a_caught_up_diffed_rebuild_may_swap() {
        let (r, o) = swap_refusals(
            SwapKind::Swap,
            &row("rebuilding", true),
            &lag(3, 0),
            Unsettled::default(),
            &SwapRequest::new("x"),
            Utc::now(),
        );
        assert!(r.is_empty() && o.is_empty(), "{r:?} {o:?}");
    }

    #[test]
    fn a_lagging_rebuild_is_refused_until_the_bound_allows_it() {
        let req = SwapRequest::new("x");
        let (r, _) = swap_refusals(
            SwapKind::Swap,
            &row("rebuilding", true),
            &lag(5000, 0),
            Unsettled::default(),
            &req,
            Utc::now(),
        );
        assert!(r.len() == 1 && r[0].contains("lags 5000 records"), "{r:?}");
        let wide = SwapRequest { max_lag: 10_000, ..req };
        assert!(swap_refusals(
            SwapKind::Swap,
            &row("rebuilding", true),
            &lag(5000, 0),
            Unsettled::default(),
            &wide,
            Utc::now()
        )
        .0
        .is_empty());
    }

    #[test]
    fn without_a_diff_the_swap_is_refused_unless_overridden_and_the_override_is_kept() {
        let req = SwapRequest::new("x");
        let (r, _) = swap_refusals(
            SwapKind::Swap,
            &row("rebuilding", false),
            &lag(0, 0),
            Unsettled::default(),
            &req,
            Utc::now(),
        );
        assert!(r.len() == 1 && r[0].contains("diff has not been run"), "{r:?}");
        let forced = SwapRequest { allow_without_diff: true, ..req };
        let (r, o) = swap_refusals(
            SwapKind::Swap,
            &row("rebuilding", false),
            &lag(0, 0),
            Unsettled::default(),
            &forced,
            Utc::now(),
        );
        assert!(r.is_empty());
        assert_eq!(o, vec!["swapped without a diff since the last swap".to_owned()]);
    }

    #[test]
    fn ahead_missing_parked_and_swapped_rebuilds_are_refused() {
        let req = SwapRequest::new("x");
        let now = Utc::now();
        assert!(swap_refusals(SwapKind::Swap, &row("rebuilding", true), &lag(0, 2), Unsettled::default(), &req, now).0
            [0]
        .contains("ahead"));
        assert!(swap_refusals(
            SwapKind::Swap,
            &row("rebuilding", true),
            &lag(0, 0),
            Unsettled { parked_rebuild: 1, ..Default::default() },
            &req,
            now
        )
        .0[0]
            .contains("rebuild has 1 parked"));
        assert!(swap_refusals(SwapKind::Swap, &row("swapped", true), &lag(0, 0), Unsettled::default(), &req, now).0[0]
            .contains("swapped in already"));
        let missing = Lag { behind: 0, ahead: 0, missing: vec![("t".into(), 1)] };
        assert!(swap_refusals(SwapKind::Swap, &row("rebuilding", true), &missing, Unsettled::default(), &req, now).0
            [0]
        .contains("no position"));
    }

    #[test]
    fn parked_live_events_refuse_the_swap_because_their_effects_would_never_run() {
        let r = swap_refusals(
            SwapKind::Swap,
            &row("rebuilding", true),
            &lag(0, 0),
            Unsettled { parked_live: 2, ..Default::default() },
            &SwapRequest::new("x"),
            Utc::now(),
        )
        .0;
        assert!(r.len() == 1 && r[0].contains("live consumer has 2 parked"), "{r:?}");
    }

    #[test]
    fn a_diff_taken_while_the_rebuild_lagged_beyond_the_bound_refuses_the_swap_unless_overridden() {
        let mut early = row("rebuilding", true);
        early.diff = Some(serde_json::json!({"equal": false, "lag_behind": 5000}));
        let req = SwapRequest::new("x");
        let (r, _) = swap_refusals(SwapKind::Swap, &early, &lag(0, 0), Unsettled::default(), &req, Utc::now());
        assert!(r.len() == 1 && r[0].contains("lagged 5000 records behind live (bound 1000)"), "{r:?}");
        let over = SwapRequest { allow_without_diff: true, ..SwapRequest::new("x") };
        let (r, o) = swap_refusals(SwapKind::Swap, &early, &lag(0, 0), Unsettled::default(), &over, Utc::now());
        assert!(r.is_empty() && o == ["swapped with a diff taken 5000 records behind live"], "{r:?} {o:?}");
        let mut close = row("rebuilding", true);
        close.diff = Some(serde_json::json!({"equal": false, "lag_behind": 1000}));
        assert!(swap_refusals(SwapKind::Swap, &close, &lag(0, 0), Unsettled::default(), &req, Utc::now()).0.is_empty());
    }

    #[test]
    fn dead_letters_only_one_side_has_refuse_the_swap_unless_overridden() {
        let unsettled = Unsettled { dead_live_only: 2, dead_rebuild_only: 1, ..Default::default() };
        let refuse = |req: &SwapRequest| {
            swap_refusals(SwapKind::Swap, &row("rebuilding", true), &lag(0, 0), unsettled, req, Utc::now())
        };
        let (r, o) = refuse(&SwapRequest::new("x"));
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].starts_with("2 record(s) the live consumer dead-lettered"), "{r:?}");
        assert!(r[1].starts_with("1 record(s) the rebuild dead-lettered"), "{r:?}");
        assert!(o.is_empty());
        let (r, o) = refuse(&SwapRequest { allow_dead_letter_mismatch: true, ..SwapRequest::new("x") });
        assert!(r.is_empty(), "{r:?}");
        assert!(o.len() == 1 && o[0].contains("2 dead letter(s) of the live consumer"), "{o:?}");
        // Nothing one-sided: nothing to override, no override recorded.
        let none = swap_refusals(
            SwapKind::Swap,
            &row("rebuilding", true),
            &lag(0, 0),
            Unsettled::default(),
            &SwapRequest { allow_dead_letter_mismatch: true, ..SwapRequest::new("x") },
            Utc::now(),
        );
        assert_eq!(none, (vec![], vec![]));
    }

    #[test]
    fn swap_back_needs_a_swap_within_its_retention() {
        let req = SwapRequest::new("x");
        let now = Utc::now();
        assert!(swap_refusals(
            SwapKind::SwapBack,
            &row("swapped", false),
            &lag(9999, 0),
            Unsettled::default(),
            &req,
            now
        )
        .0
        .is_empty());
        assert!(!swap_refusals(
            SwapKind::SwapBack,
            &row("rebuilding", true),
            &lag(0, 0),
            Unsettled::default(),
            &req,
            now
        )
        .0
        .is_empty());
        let late = now + chrono::Duration::days(8);
        assert!(swap_refusals(
            SwapKind::SwapBack,
            &row("swapped", false),
            &lag(0, 0),
            Unsettled::default(),
            &req,
            late
        )
        .0[0]
            .contains("no longer"));
    }
}
