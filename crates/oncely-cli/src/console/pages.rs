//! The console's pages and actions. Each handler reads through the library
//! (the same calls as the CLI) and renders a template; each action builds
//! the library's preview from the form, then confirms it with the typed text
//! and executes it. No rule is decided here except what a stateless web form
//! needs: the execution re-plans, and is refused when the plan is not the
//! one the operator saw.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use askama::Template;
use axum::extract::{FromRequestParts, Path, Query};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use chrono::Utc;
use oncely::admin::audit::{self, Actor, AuditFilter, AuditRecord};
use oncely::admin::dlq::{RedriveRequest, RedriveSelection};
use oncely::admin::lag::{GroupLag, LagOptions};
use oncely::admin::ops::{Origin, Preview};
use oncely::admin::parse::{parse_datetime, parse_duration, parse_hex, parse_topic_selection};
use oncely::admin::plan::PlanOptions;
use oncely::admin::reset::{Action, OffsetChange, ResetRequest, Scope, Target};
use oncely::admin::snapshots::{self, SnapshotReason};
use oncely::effects::Resolution;
use oncely::failure as failures;
use serde::Deserialize;
use serde_json::json;

use super::guard::Operator;
use super::view::{self, Chrome, Shown};
use super::Console;

type Shared = Arc<Console>;

/// The routes, behind the guard.
pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(groups))
        .route("/fragments/groups", get(groups_fragment))
        .route("/groups/{group}", get(group))
        .route("/fragments/groups/{group}", get(group_fragment))
        .route("/groups/{group}/reset", get(reset_form).post(reset_execute))
        .route("/groups/{group}/reset/preview", get(reset_preview))
        .route("/groups/{group}/undo", get(undo_preview).post(undo_execute))
        .route("/groups/{group}/snapshot", post(snapshot_now))
        .route("/snapshots", get(snapshots_page))
        .route("/snapshots/{id}/restore", get(restore_preview).post(restore_execute))
        .route("/dlq", get(dlq_list))
        .route("/dlq/redrive", get(redrive_preview).post(redrive_execute))
        .route("/dlq/{id}", get(dlq_letter))
        .route("/jobs/{id}", get(job_page))
        .route("/fragments/jobs/{id}", get(job_fragment))
        .route("/parked", get(parked))
        .route("/parked/release", get(release_preview).post(release_execute))
        .route("/effects", get(effects))
        .route("/effects/retry", get(effect_retry_preview).post(effect_retry_execute))
        .route("/effects/resolve", get(effect_resolve_preview).post(effect_resolve_execute))
        .route("/outbox", get(outbox))
        .route("/projections", get(projections))
        .route("/audit", get(audit_page))
        .route("/assets/{name}", get(super::assets::asset))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), super::guard::check))
        .with_state(state)
}

/// What every handler has: the console, the operator, and the request (for
/// the audit log's command line).
pub(crate) struct Ctx {
    c: Shared,
    op: Operator,
    request: String,
}

impl FromRequestParts<Shared> for Ctx {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Response> {
        let op = parts
            .extensions
            .get::<Operator>()
            .cloned()
            .ok_or_else(|| (StatusCode::INTERNAL_SERVER_ERROR, "the guard did not run").into_response())?;
        Ok(Ctx { c: state.clone(), op, request: format!("console: {} {}", parts.method, parts.uri.path()) })
    }
}

impl Ctx {
    fn chrome(&self, title: impl Into<String>, nav: &'static str) -> Chrome {
        let env = self.c.session.env();
        Chrome {
            title: title.into(),
            nav,
            env: env.name.clone(),
            protected: env.config.protected,
            cluster_id: self.c.session.cluster_id().to_owned(),
            bootstrap: env.config.bootstrap_servers.clone(),
            read_only: self.c.read_only,
            operator: if self.op.signed_in { self.op.name.clone() } else { format!("{} (OS user)", self.op.name) },
            csrf: self.c.guard.csrf().to_owned(),
        }
    }

    /// Who asks, for the library's audit rows.
    fn origin(&self) -> Origin {
        Origin::new(Actor::named(&self.op.name, &self.op.host), self.request.clone())
    }

    fn session(&self) -> &oncely::admin::session::Session {
        &self.c.session
    }

    fn pool(&self) -> &sqlx::PgPool {
        self.c.session.pool()
    }

    /// A page with one message.
    fn message(&self, status: StatusCode, heading: &str, message: &str, kind: &'static str) -> Response {
        self.message_links(status, heading, message, kind, Vec::new())
    }

    fn message_links(
        &self,
        status: StatusCode,
        heading: &str,
        message: &str,
        kind: &'static str,
        links: Vec<(String, String)>,
    ) -> Response {
        render(
            status,
            &MessagePage {
                chrome: self.chrome(heading, ""),
                heading: heading.to_owned(),
                message: self.c.guard.scrub(message),
                kind,
                links,
            },
        )
    }

    /// The page for a failed call: a refusal or bad input (nothing changed)
    /// or a failure of Kafka or the database.
    fn failure(&self, e: &oncely::Error) -> Response {
        let (status, heading) = match e {
            oncely::Error::Refused(_) => (StatusCode::CONFLICT, "Refused"),
            oncely::Error::Config(_) => (StatusCode::BAD_REQUEST, "Not possible here"),
            _ => (StatusCode::BAD_GATEWAY, "Kafka or PostgreSQL failed"),
        };
        self.message(status, heading, &e.to_string(), "error")
    }

    /// A scrubbed message for a page.
    fn text(&self, e: &oncely::Error) -> String {
        self.c.guard.scrub(&e.to_string())
    }
}

fn render<T: Template>(status: StatusCode, t: &T) -> Response {
    match t.render() {
        Ok(s) => (status, Html(s)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot render the page: {e}")).into_response(),
    }
}

async fn not_found(cx: Ctx) -> Response {
    cx.message(StatusCode::NOT_FOUND, "Not found", "There is no such page.", "error")
}

#[derive(Template)]
#[template(path = "console/message.html")]
struct MessagePage {
    chrome: Chrome,
    heading: String,
    message: String,
    kind: &'static str,
    links: Vec<(String, String)>,
}

// ------------------------------------------------------------------ groups

struct GroupRow {
    group: String,
    status: &'static str,
    state: String,
    members: usize,
    partitions: usize,
    lag: i64,
    time_lag: String,
    oncely: bool,
}

impl From<&GroupLag> for GroupRow {
    fn from(g: &GroupLag) -> Self {
        GroupRow {
            group: g.group.clone(),
            status: g.status.as_str(),
            state: g.state.clone(),
            members: g.members,
            partitions: g.partitions.len(),
            lag: g.total_lag,
            time_lag: view::age_ms(g.max_time_lag_ms),
            oncely: g.oncely_consumer,
        }
    }
}

#[derive(Template)]
#[template(path = "console/groups.html")]
struct GroupsPage {
    chrome: Chrome,
    groups: Vec<GroupRow>,
    fetched_at: String,
    q: String,
}

#[derive(Template)]
#[template(path = "console/groups_table.html")]
struct GroupsTable {
    groups: Vec<GroupRow>,
    fetched_at: String,
    q: String,
}

async fn lag_of(cx: &Ctx, groups: Option<&[String]>) -> oncely::Result<Vec<GroupLag>> {
    let mut history = cx.c.group_history.lock().await;
    cx.session().lag(groups, LagOptions::default(), &mut history).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct GroupsQuery {
    /// Only groups whose name contains this.
    q: String,
}

/// The groups as the background refresh last evaluated them, worst first
/// (REWIND, STOP, STALL, WARN, then OK; the most lag first within each), so
/// that at 3 AM the group in trouble is the first line, however many
/// groups the cluster has.
async fn groups_now(cx: &Ctx, q: &str) -> (Vec<GroupRow>, String) {
    match cx.c.groups.read().await.as_ref() {
        Some(r) => {
            let mut groups: Vec<&GroupLag> = r.groups.iter().filter(|g| g.group.contains(q)).collect();
            groups.sort_by(|a, b| {
                b.status.cmp(&a.status).then(b.total_lag.cmp(&a.total_lag)).then(a.group.cmp(&b.group))
            });
            (
                groups.into_iter().map(GroupRow::from).collect(),
                match &r.error {
                    None => view::time(&r.at),
                    Some(e) => format!("{} — the last refresh failed: {e}", view::time(&r.at)),
                },
            )
        }
        None => (Vec::new(), "— reading every group's offsets (the first round takes a moment)".to_owned()),
    }
}

async fn groups(cx: Ctx, Query(q): Query<GroupsQuery>) -> Response {
    let (groups, fetched_at) = groups_now(&cx, &q.q).await;
    render(StatusCode::OK, &GroupsPage { chrome: cx.chrome("Groups", "groups"), groups, fetched_at, q: q.q })
}

async fn groups_fragment(cx: Ctx, Query(q): Query<GroupsQuery>) -> Response {
    let (groups, fetched_at) = groups_now(&cx, &q.q).await;
    render(StatusCode::OK, &GroupsTable { groups, fetched_at, q: q.q })
}

struct PartRow {
    topic: String,
    partition: i32,
    committed: String,
    db_offset: String,
    log_start: String,
    log_end: String,
    lag: String,
    time_lag: String,
    status: String,
    moved_by: String,
    metadata: String,
    owner: String,
}

#[derive(Template)]
#[template(path = "console/group_live.html")]
struct GroupLive {
    group: String,
    status: &'static str,
    state: String,
    members: Vec<String>,
    oncely: bool,
    total_lag: i64,
    reason: String,
    partitions: Vec<PartRow>,
    fetched_at: String,
}

struct SnapRow {
    id: i64,
    taken_at: String,
    group: String,
    reason: String,
    audit: String,
    partitions: usize,
    sum: i64,
}

impl From<&snapshots::Snapshot> for SnapRow {
    fn from(s: &snapshots::Snapshot) -> Self {
        SnapRow {
            id: s.id,
            taken_at: view::time(&s.taken_at),
            group: s.group.clone(),
            reason: s.reason.clone(),
            audit: s.audit_id.map_or_else(|| "-".into(), |a| format!("#{a}")),
            partitions: s.offsets.len(),
            sum: s.offsets.iter().filter_map(|o| o.offset).sum(),
        }
    }
}

struct AuditRow {
    id: i64,
    started_at: String,
    who: String,
    action: String,
    group: String,
    result: String,
    summary: String,
    command_line: String,
}

impl From<&AuditRecord> for AuditRow {
    fn from(r: &AuditRecord) -> Self {
        let offsets = |v: &Option<serde_json::Value>| -> String {
            let Some(serde_json::Value::Array(items)) = v else { return "-".into() };
            items
                .iter()
                .map(|i| {
                    format!(
                        "{}[{}]={}",
                        i["topic"].as_str().unwrap_or("?"),
                        i["partition"],
                        if i["offset"].is_null() { "-".to_owned() } else { i["offset"].to_string() }
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let summary = match (&r.error, r.action.starts_with("offsets.")) {
            (Some(e), _) => e.clone(),
            (None, true) => format!("{} → {}", offsets(&r.before), offsets(&r.after)),
            (None, false) => r.details.to_string(),
        };
        AuditRow {
            id: r.id,
            started_at: view::time(&r.started_at),
            who: format!("{}@{}", r.os_user, r.host),
            action: r.action.clone(),
            group: r.group.clone().unwrap_or_else(|| "-".into()),
            result: r.result.clone(),
            summary,
            command_line: r.command_line.clone(),
        }
    }
}

#[derive(Template)]
#[template(path = "console/group.html")]
struct GroupPage {
    chrome: Chrome,
    group: String,
    status: &'static str,
    state: String,
    members: Vec<String>,
    oncely: bool,
    total_lag: i64,
    reason: String,
    partitions: Vec<PartRow>,
    fetched_at: String,
    chart_json: String,
    snapshots: Vec<SnapRow>,
    audit: Vec<AuditRow>,
}

/// The live part of a group's page; `None` for a group the cluster and the
/// database do not know.
async fn group_live(cx: &Ctx, group: &str) -> oncely::Result<Option<GroupLive>> {
    let show = cx.session().show(group).await?;
    if show.state == "Dead" && !show.oncely_consumer && show.partitions.iter().all(|p| p.committed.is_none()) {
        return Ok(None);
    }
    let lag = lag_of(cx, Some(&[group.to_owned()])).await?.into_iter().next();
    let by_part: BTreeMap<(String, i32), &oncely::admin::lag::PartitionLag> =
        lag.iter().flat_map(|g| g.partitions.iter().map(|p| ((p.topic.clone(), p.partition), p))).collect();
    let partitions = show
        .partitions
        .iter()
        .map(|p| {
            let l = by_part.get(&(p.topic.clone(), p.partition));
            PartRow {
                topic: p.topic.clone(),
                partition: p.partition,
                committed: view::opt(&p.committed),
                db_offset: view::opt(&p.db_offset),
                log_start: view::opt(&p.log_start),
                log_end: view::opt(&p.log_end),
                lag: view::opt(&p.lag),
                time_lag: view::age_ms(l.and_then(|l| l.time_lag_ms)),
                status: l.map(|l| l.evaluation.status.as_str().to_owned()).unwrap_or_default(),
                moved_by: p.moved_by.clone().unwrap_or_else(|| {
                    if p.committed.is_some() {
                        "other".into()
                    } else {
                        "-".into()
                    }
                }),
                metadata: if p.metadata.is_empty() { "-".into() } else { p.metadata.clone() },
                owner: view::opt(&p.owner),
            }
        })
        .collect();
    let reasons: BTreeSet<String> = lag
        .iter()
        .flat_map(|g| g.partitions.iter())
        .filter(|p| p.evaluation.status != oncely::admin::lag::Status::Ok)
        .map(|p| format!("{}[{}]: {}", p.topic, p.partition, p.evaluation.reason))
        .collect();
    Ok(Some(GroupLive {
        group: group.to_owned(),
        status: lag.as_ref().map_or("-", |l| l.status.as_str()),
        state: show.state.clone(),
        members: show
            .members
            .iter()
            .map(|m| {
                let a: Vec<String> = m.assignment.iter().map(|(t, p)| format!("{t}[{p}]")).collect();
                format!("{}@{}: {}", m.client_id, m.host, a.join(" "))
            })
            .collect(),
        oncely: show.oncely_consumer,
        total_lag: lag.as_ref().map_or(0, |l| l.total_lag),
        reason: reasons.into_iter().collect::<Vec<_>>().join("; "),
        partitions,
        fetched_at: view::time(&Utc::now()),
    }))
}

fn unknown_group(cx: &Ctx, group: &str) -> Response {
    cx.message(
        StatusCode::NOT_FOUND,
        "Unknown group",
        &format!(
            "There is no group {group} on cluster {} (no members, no committed offsets, not an oncely consumer of this \
             environment's database).",
            cx.session().cluster_id()
        ),
        "error",
    )
}

/// The chart: committed offsets per partition over the snapshots, the live
/// value last, and the offset changes marked.
fn chart(snaps: &[snapshots::Snapshot], live: &GroupLive, changes: &[AuditRecord]) -> serde_json::Value {
    let mut series: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for s in snaps.iter().rev() {
        for o in &s.offsets {
            if let Some(off) = o.offset {
                series.entry(format!("{}[{}]", o.topic, o.partition)).or_default().push((s.taken_at.timestamp(), off));
            }
        }
    }
    let now = Utc::now().timestamp();
    for p in &live.partitions {
        if let Ok(off) = p.committed.parse::<i64>() {
            series.entry(format!("{}[{}]", p.topic, p.partition)).or_default().push((now, off));
        }
    }
    let marks: Vec<serde_json::Value> = changes
        .iter()
        .filter(|r| r.result == "succeeded" || r.result == "failed")
        .map(|r| {
            let kind = r.action.trim_start_matches("offsets.");
            json!({"t": r.started_at.timestamp(), "kind": kind, "label": format!("{kind} #{}", r.id)})
        })
        .collect();
    json!({
        "series": series.into_iter().map(|(label, points)| json!({"label": label, "points": points})).collect::<Vec<_>>(),
        "marks": marks,
    })
}

async fn group(cx: Ctx, Path(group): Path<String>) -> Response {
    let built = async {
        let Some(live) = group_live(&cx, &group).await? else { return Ok(None) };
        let snaps = snapshots::list(cx.pool(), Some(cx.session().cluster_id()), Some(&group), 500).await?;
        let trail =
            audit::list(cx.pool(), &AuditFilter { group: Some(group.clone()), limit: Some(100), ..Default::default() })
                .await?;
        let changes: Vec<AuditRecord> = trail.iter().filter(|r| r.action.starts_with("offsets.")).cloned().collect();
        let chart_json = view::script_json(&chart(&snaps, &live, &changes));
        Ok::<_, oncely::Error>(Some(GroupPage {
            chrome: cx.chrome(format!("Group {group}"), "groups"),
            group: live.group,
            status: live.status,
            state: live.state,
            members: live.members,
            oncely: live.oncely,
            total_lag: live.total_lag,
            reason: live.reason,
            partitions: live.partitions,
            fetched_at: live.fetched_at,
            chart_json,
            snapshots: snaps.iter().take(50).map(SnapRow::from).collect(),
            audit: trail.iter().rev().map(AuditRow::from).collect(),
        }))
    }
    .await;
    match built {
        Ok(Some(page)) => render(StatusCode::OK, &page),
        Ok(None) => unknown_group(&cx, &group),
        Err(e) => cx.failure(&e),
    }
}

async fn group_fragment(cx: Ctx, Path(group): Path<String>) -> Response {
    match group_live(&cx, &group).await {
        Ok(Some(live)) => render(StatusCode::OK, &live),
        Ok(None) => unknown_group(&cx, &group),
        Err(e) => cx.failure(&e),
    }
}

async fn snapshot_now(cx: Ctx, Path(group): Path<String>) -> Response {
    match cx.session().snapshot_groups(Some(std::slice::from_ref(&group)), SnapshotReason::Manual).await {
        Ok(round) if round.failed.is_empty() => {
            Redirect::to(&format!("/groups/{}", path_segment(&group))).into_response()
        }
        Ok(round) => cx.message(
            StatusCode::BAD_GATEWAY,
            "Snapshot failed",
            &round.failed.iter().map(|(g, e)| format!("{g}: {e}")).collect::<Vec<_>>().join("; "),
            "error",
        ),
        Err(e) => cx.failure(&e),
    }
}

/// A path segment, percent-encoded.
fn path_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ------------------------------------------------------------ offset changes

/// The fields of the reset, undo and restore forms (all text: bad input is
/// the page's message, never a bare rejection).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct OffsetForm {
    target: String,
    value: String,
    topics: String,
    max_replay: String,
    allow_clamp: Option<String>,
    force: Option<String>,
    /// The fingerprint of the plan the operator saw.
    plan: String,
    confirm: String,
}

impl OffsetForm {
    fn options(&self) -> Result<PlanOptions, String> {
        let max_replay = match self.max_replay.trim() {
            "" => None,
            n => Some(
                n.parse::<u64>().map_err(|_| format!("max replay must be a whole number of records (got `{n}`)"))?,
            ),
        };
        Ok(PlanOptions { allow_clamp: self.allow_clamp.is_some(), max_replay })
    }

    fn typed(&self) -> Option<&str> {
        let t = self.confirm.trim_end_matches(['\r', '\n']);
        (!t.is_empty()).then_some(t)
    }
}

const TARGETS: &[(&str, &str)] = &[
    ("earliest", "earliest (log start)"),
    ("latest", "latest (log end)"),
    ("current", "current committed offsets"),
    ("offset", "offset N"),
    ("shift", "shift by ±N"),
    ("datetime", "first record at or after a time (zone required)"),
    ("duration", "first record at or after a duration ago"),
    ("snapshot", "snapshot id"),
    ("snapshot_at", "last snapshot at or before a time"),
];

/// The library's request from the form; an error is a sentence for the page.
fn reset_request(group: &str, f: &OffsetForm) -> Result<ResetRequest, String> {
    let v = f.value.trim();
    let need = |what: &str| -> Result<&str, String> {
        if v.is_empty() {
            Err(format!("this target needs a value: {what}"))
        } else {
            Ok(v)
        }
    };
    let int = |what: &str| -> Result<i64, String> {
        let s = need(what)?;
        s.parse::<i64>().map_err(|_| format!("`{s}` is not a whole number ({what})"))
    };
    let target = match f.target.as_str() {
        "earliest" => Target::Earliest,
        "latest" => Target::Latest,
        "current" => Target::Current,
        "offset" => Target::Offset(int("the offset")?),
        "shift" => Target::ShiftBy(int("records to shift by, negative to go back")?),
        "datetime" => Target::Datetime(parse_datetime(need("a time with its zone, e.g. 2026-03-21T02:44:00Z")?)?),
        "duration" => Target::ByDuration(parse_duration(need("a duration, e.g. 1h30m or PT15M")?)?),
        "snapshot" => Target::Snapshot(int("the snapshot id")?),
        "snapshot_at" => Target::SnapshotAt(parse_datetime(need("a time with its zone")?)?),
        "" => return Err("choose a target".into()),
        other => return Err(format!("unknown target `{other}`")),
    };
    let sels = f.topics.split_whitespace().map(parse_topic_selection).collect::<Result<Vec<_>, _>>()?;
    let scope = if !sels.is_empty() {
        Scope::Topics(sels)
    } else if target.names_partitions() {
        Scope::FromTarget
    } else {
        Scope::AllTopics
    };
    Ok(ResetRequest { group: group.to_owned(), scope, target, options: f.options()? })
}

/// What the operator saw, as a short stable string: the group, the target
/// and every partition's current → new.
fn fingerprint(p: &Preview<OffsetChange>) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (p.action.as_str(), &p.group, &p.target).hash(&mut h);
    for pp in &p.plan.partitions {
        (&pp.topic, pp.partition, pp.current, pp.new).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

#[derive(Template)]
#[template(path = "console/reset_form.html")]
struct ResetFormPage {
    chrome: Chrome,
    group: String,
    message: String,
    targets: &'static [(&'static str, &'static str)],
    form: ResetFormValues,
    topics: Vec<String>,
}

struct ResetFormValues {
    target: String,
    value: String,
    topics: String,
    max_replay: String,
    allow_clamp: bool,
}

async fn reset_form_page(cx: &Ctx, group: &str, f: &OffsetForm, message: String, status: StatusCode) -> Response {
    let topics = match cx.session().show(group).await {
        Ok(s) => s.partitions.iter().map(|p| p.topic.clone()).collect::<BTreeSet<_>>().into_iter().collect(),
        Err(_) => Vec::new(),
    };
    render(
        status,
        &ResetFormPage {
            chrome: cx.chrome(format!("Reset {group}"), "groups"),
            group: group.to_owned(),
            message,
            targets: TARGETS,
            form: ResetFormValues {
                target: if f.target.is_empty() { "shift".into() } else { f.target.clone() },
                value: f.value.clone(),
                topics: f.topics.clone(),
                max_replay: f.max_replay.clone(),
                allow_clamp: f.allow_clamp.is_some(),
            },
            topics,
        },
    )
}

async fn reset_form(cx: Ctx, Path(group): Path<String>, Query(f): Query<OffsetForm>) -> Response {
    match group_live(&cx, &group).await {
        Ok(Some(_)) => reset_form_page(&cx, &group, &f, String::new(), StatusCode::OK).await,
        Ok(None) => unknown_group(&cx, &group),
        Err(e) => cx.failure(&e),
    }
}

struct PlanRow {
    topic: String,
    partition: i32,
    current: String,
    new: String,
    log_start: i64,
    log_end: i64,
    redelivered: u64,
    skipped: u64,
    first_replayed: String,
}

#[derive(Template)]
#[template(path = "console/offset_preview.html")]
struct OffsetPreviewPage<'a> {
    chrome: Chrome,
    heading: String,
    message: String,
    p: &'a Preview<OffsetChange>,
    rows: Vec<PlanRow>,
    oldest: String,
    refusals: Vec<String>,
    nothing_to_do: bool,
    action: String,
    hidden: Vec<(&'static str, String)>,
    fingerprint: String,
    max_replay: String,
    asks_for: Option<String>,
}

fn heading_of(p: &Preview<OffsetChange>) -> String {
    match p.action {
        Action::Reset => format!("Reset offsets of {}: preview", p.group),
        Action::Restore => format!("Restore {}: preview", p.group),
        Action::Undo => format!("Undo the last change to {}: preview", p.group),
    }
}

fn offset_preview_page(
    cx: &Ctx,
    p: &Preview<OffsetChange>,
    action: String,
    hidden: Vec<(&'static str, String)>,
    max_replay: String,
    message: String,
    status: StatusCode,
) -> Response {
    let rows = p
        .plan
        .partitions
        .iter()
        .map(|pp| PlanRow {
            topic: pp.topic.clone(),
            partition: pp.partition,
            current: view::opt(&pp.current),
            new: match (pp.new, pp.requested) {
                (None, _) => "no commit".to_owned(),
                (Some(n), Some(r)) if pp.clamped => format!("{n} (asked {r})"),
                (Some(n), _) => n.to_string(),
            },
            log_start: pp.log_start,
            log_end: pp.log_end,
            redelivered: pp.redelivered,
            skipped: pp.skipped,
            first_replayed: view::ms(pp.first_replayed_ms),
        })
        .collect();
    let oldest = match p.oldest_replayed_ms {
        Some(ms) => format!(
            "{} ({} ago; read from the record itself)",
            view::ms(Some(ms)),
            view::age_ms(Some(Utc::now().timestamp_millis().saturating_sub(ms)))
        ),
        None if p.plan.totals.redelivered > 0 => "unknown (the record could not be read)".into(),
        None => String::new(),
    };
    let max_replay = if max_replay.trim().is_empty() { p.plan.totals.redelivered.to_string() } else { max_replay };
    render(
        status,
        &OffsetPreviewPage {
            chrome: cx.chrome(heading_of(p), "groups"),
            heading: heading_of(p),
            message,
            p,
            rows,
            oldest,
            refusals: p.refusals().to_vec(),
            nothing_to_do: p.plan.totals.changed == 0 && p.refusals().is_empty(),
            action,
            hidden,
            fingerprint: fingerprint(p),
            max_replay,
            asks_for: p.asks_for().map(str::to_owned),
        },
    )
}

fn reset_hidden(f: &OffsetForm) -> Vec<(&'static str, String)> {
    let mut h = vec![("target", f.target.clone()), ("value", f.value.clone()), ("topics", f.topics.clone())];
    if f.allow_clamp.is_some() {
        h.push(("allow_clamp", "on".into()));
    }
    h
}

async fn reset_preview(cx: Ctx, Path(group): Path<String>, Query(f): Query<OffsetForm>) -> Response {
    let req = match reset_request(&group, &f) {
        Ok(r) => r,
        Err(msg) => return reset_form_page(&cx, &group, &f, msg, StatusCode::BAD_REQUEST).await,
    };
    match group_live(&cx, &group).await {
        Ok(Some(_)) => {}
        Ok(None) => return unknown_group(&cx, &group),
        Err(e) => return cx.failure(&e),
    }
    match cx.session().preview_reset(&req, cx.origin()).await {
        Ok(p) => offset_preview_page(
            &cx,
            &p,
            format!("/groups/{}/reset", path_segment(&group)),
            reset_hidden(&f),
            f.max_replay.clone(),
            String::new(),
            StatusCode::OK,
        ),
        Err(e @ oncely::Error::Refused(_)) => reset_form_page(&cx, &group, &f, cx.text(&e), StatusCode::CONFLICT).await,
        Err(e) => cx.failure(&e),
    }
}

#[derive(Template)]
#[template(path = "console/offset_done.html")]
struct OffsetDonePage {
    chrome: Chrome,
    heading: String,
    group: String,
    done: oncely::admin::reset::Executed,
    after: Vec<(String, i32, String)>,
}

/// Executes an offset change from its form: the plan must be the one shown,
/// a max replay must be given, then the library confirms (typed text) and
/// executes. Every refusal is shown on the preview page.
async fn execute_offsets(
    cx: &Ctx,
    p: Preview<OffsetChange>,
    f: &OffsetForm,
    action: String,
    hidden: Vec<(&'static str, String)>,
) -> Response {
    let again = |message: String, status: StatusCode| {
        offset_preview_page(cx, &p, action.clone(), hidden.clone(), f.max_replay.clone(), message, status)
    };
    if f.plan != fingerprint(&p) {
        return again(
            "The plan is not the one you confirmed (the offsets or the logs moved since your preview): nothing was \
             changed. Review this new preview and confirm again."
                .into(),
            StatusCode::CONFLICT,
        );
    }
    if f.max_replay.trim().is_empty() {
        return again(
            "Give the most records you accept to re-deliver (max replay): nothing was changed.".into(),
            StatusCode::BAD_REQUEST,
        );
    }
    let confirmed = match p.confirm(cx.session(), f.typed()).await {
        Ok(c) => c,
        Err(e) => return again(format!("Nothing was changed: {}", cx.text(&e)), StatusCode::CONFLICT),
    };
    match confirmed.execute(cx.session()).await {
        Ok(done) => render(
            StatusCode::OK,
            &OffsetDonePage {
                chrome: cx.chrome("Executed", "groups"),
                heading: format!("{} executed", heading_of(&p).trim_end_matches(": preview")),
                group: p.group.clone(),
                after: done.after.iter().map(|o| (o.topic.clone(), o.partition, view::opt(&o.offset))).collect(),
                done,
            },
        ),
        Err(e @ oncely::Error::Refused(_)) => {
            again(format!("Refused, nothing was changed: {}", cx.text(&e)), StatusCode::CONFLICT)
        }
        Err(e) => cx.message_links(
            StatusCode::BAD_GATEWAY,
            "The change failed",
            &format!(
                "{} — the audit log records what is known of the offsets after it; undo restores the snapshot taken \
                 before it.",
                e
            ),
            "error",
            vec![(format!("/groups/{}", path_segment(&p.group)), format!("Back to {}", p.group))],
        ),
    }
}

async fn reset_execute(cx: Ctx, Path(group): Path<String>, Form(f): Form<OffsetForm>) -> Response {
    let req = match reset_request(&group, &f) {
        Ok(r) => r,
        Err(msg) => return reset_form_page(&cx, &group, &f, msg, StatusCode::BAD_REQUEST).await,
    };
    match cx.session().preview_reset(&req, cx.origin()).await {
        Ok(p) => execute_offsets(&cx, p, &f, format!("/groups/{}/reset", path_segment(&group)), reset_hidden(&f)).await,
        Err(e @ oncely::Error::Refused(_)) => reset_form_page(&cx, &group, &f, cx.text(&e), StatusCode::CONFLICT).await,
        Err(e) => cx.failure(&e),
    }
}

fn undo_hidden(f: &OffsetForm) -> Vec<(&'static str, String)> {
    if f.force.is_some() {
        vec![("force", "on".into())]
    } else {
        Vec::new()
    }
}

async fn undo_preview(cx: Ctx, Path(group): Path<String>, Query(f): Query<OffsetForm>) -> Response {
    let options = match f.options() {
        Ok(o) => o,
        Err(m) => return cx.message(StatusCode::BAD_REQUEST, "Bad input", &m, "error"),
    };
    match cx.session().preview_undo(&group, f.force.is_some(), options, cx.origin()).await {
        Ok(p) => offset_preview_page(
            &cx,
            &p,
            format!("/groups/{}/undo", path_segment(&group)),
            undo_hidden(&f),
            f.max_replay.clone(),
            String::new(),
            StatusCode::OK,
        ),
        Err(e) => cx.failure(&e),
    }
}

async fn undo_execute(cx: Ctx, Path(group): Path<String>, Form(f): Form<OffsetForm>) -> Response {
    let options = match f.options() {
        Ok(o) => o,
        Err(m) => return cx.message(StatusCode::BAD_REQUEST, "Bad input", &m, "error"),
    };
    match cx.session().preview_undo(&group, f.force.is_some(), options, cx.origin()).await {
        Ok(p) => execute_offsets(&cx, p, &f, format!("/groups/{}/undo", path_segment(&group)), undo_hidden(&f)).await,
        Err(e) => cx.failure(&e),
    }
}

async fn restore_preview(cx: Ctx, Path(id): Path<i64>, Query(f): Query<OffsetForm>) -> Response {
    let options = match f.options() {
        Ok(o) => o,
        Err(m) => return cx.message(StatusCode::BAD_REQUEST, "Bad input", &m, "error"),
    };
    match cx.session().preview_restore(id, None, options, cx.origin()).await {
        Ok(p) => offset_preview_page(
            &cx,
            &p,
            format!("/snapshots/{id}/restore"),
            Vec::new(),
            f.max_replay.clone(),
            String::new(),
            StatusCode::OK,
        ),
        Err(e) => cx.failure(&e),
    }
}

async fn restore_execute(cx: Ctx, Path(id): Path<i64>, Form(f): Form<OffsetForm>) -> Response {
    let options = match f.options() {
        Ok(o) => o,
        Err(m) => return cx.message(StatusCode::BAD_REQUEST, "Bad input", &m, "error"),
    };
    match cx.session().preview_restore(id, None, options, cx.origin()).await {
        Ok(p) => execute_offsets(&cx, p, &f, format!("/snapshots/{id}/restore"), Vec::new()).await,
        Err(e) => cx.failure(&e),
    }
}

#[derive(Template)]
#[template(path = "console/snapshots.html")]
struct SnapshotsPage {
    chrome: Chrome,
    snapshots: Vec<SnapRow>,
}

async fn snapshots_page(cx: Ctx) -> Response {
    match snapshots::list(cx.pool(), Some(cx.session().cluster_id()), None, 200).await {
        Ok(list) => render(
            StatusCode::OK,
            &SnapshotsPage {
                chrome: cx.chrome("Snapshots", "snapshots"),
                snapshots: list.iter().map(SnapRow::from).collect(),
            },
        ),
        Err(e) => cx.failure(&e),
    }
}

// ------------------------------------------------------------ dead letters

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct DlqQuery {
    consumer: String,
    all: Option<String>,
}

struct LetterRow {
    id: i64,
    consumer: String,
    topic: String,
    partition: i32,
    offset: i64,
    key: String,
    reason: String,
    attempts: i32,
    redriven: i32,
    error: String,
}

#[derive(Template)]
#[template(path = "console/dlq.html")]
struct DlqPage {
    chrome: Chrome,
    consumer: String,
    all: bool,
    letters: Vec<LetterRow>,
}

async fn dlq_list(cx: Ctx, Query(q): Query<DlqQuery>) -> Response {
    let consumer = Some(q.consumer.trim()).filter(|c| !c.is_empty());
    match failures::list_dead_letters(cx.pool(), consumer, q.all.is_none(), 500).await {
        Ok(rows) => render(
            StatusCode::OK,
            &DlqPage {
                chrome: cx.chrome("Dead letters", "dlq"),
                consumer: q.consumer.clone(),
                all: q.all.is_some(),
                letters: rows
                    .iter()
                    .map(|r| LetterRow {
                        id: r.id,
                        consumer: r.consumer.clone(),
                        topic: r.record.topic.to_string(),
                        partition: r.record.partition,
                        offset: r.record.offset,
                        key: r.record.key.as_deref().map_or_else(|| "-".into(), oncely::envelope::escape_bytes),
                        reason: r.reason.clone(),
                        attempts: r.attempts,
                        redriven: r.redrive_count,
                        error: r.error.chars().take(120).collect(),
                    })
                    .collect(),
            },
        ),
        Err(e) => cx.failure(&e),
    }
}

#[derive(Template)]
#[template(path = "console/dlq_letter.html")]
struct LetterPage {
    chrome: Chrome,
    id: i64,
    consumer: String,
    topic: String,
    partition: i32,
    offset: i64,
    timestamp: String,
    event_id: String,
    reason: String,
    error: String,
    error_class: String,
    attempts: i32,
    created_at: String,
    redriven_at: String,
    redrive_count: i32,
    key: Option<Shown>,
    headers: Vec<(Shown, Option<Shown>)>,
    payload: Option<Shown>,
}

async fn dlq_letter(cx: Ctx, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<i64>() else {
        return cx.message(StatusCode::BAD_REQUEST, "Bad input", &format!("`{id}` is not a dead letter id"), "error");
    };
    match failures::get_dead_letters(cx.pool(), &[id]).await {
        Ok(mut rows) => match rows.pop() {
            Some(r) => render(
                StatusCode::OK,
                &LetterPage {
                    chrome: cx.chrome(format!("Dead letter #{id}"), "dlq"),
                    id: r.id,
                    consumer: r.consumer.clone(),
                    topic: r.record.topic.to_string(),
                    partition: r.record.partition,
                    offset: r.record.offset,
                    timestamp: view::ms(r.record.timestamp_ms),
                    event_id: r.event_id.clone().unwrap_or_else(|| "(none)".into()),
                    reason: r.reason.clone(),
                    error: r.error.clone(),
                    error_class: r.error_class.clone(),
                    attempts: r.attempts,
                    created_at: view::time(&r.created_at),
                    redriven_at: view::time_opt(&r.redriven_at),
                    redrive_count: r.redrive_count,
                    key: Shown::of_opt(r.record.key.as_deref()),
                    headers: r.record.headers.iter().map(|(k, v)| (Shown::of(k), Shown::of_opt(v))).collect(),
                    payload: Shown::of_opt(r.record.payload.as_deref()),
                },
            ),
            None => {
                cx.message(StatusCode::NOT_FOUND, "Not found", &format!("dead letter {id} does not exist"), "error")
            }
        },
        Err(e) => cx.failure(&e),
    }
}

#[derive(Template)]
#[template(path = "console/redrive_preview.html")]
struct RedrivePage<'a> {
    chrome: Chrome,
    message: String,
    p: &'a Preview<oncely::admin::dlq::Redrive>,
    ids: String,
    asks_for: Option<String>,
}

/// Dead letter ids from `id=1&id=2` (the list's check boxes) or `ids=1,2`
/// (the execute form).
fn redrive_request(fields: &[(String, String)]) -> Result<RedriveRequest, String> {
    let mut ids = Vec::new();
    let mut rate = 10.0;
    for (k, v) in fields {
        match k.as_str() {
            "id" | "ids" => {
                for part in v.split([',', ' ']).filter(|s| !s.trim().is_empty()) {
                    ids.push(part.trim().parse::<i64>().map_err(|_| format!("`{part}` is not a dead letter id"))?);
                }
            }
            "rate" if !v.trim().is_empty() => {
                rate = v.trim().parse::<f64>().map_err(|_| format!("`{v}` is not a rate (records per second)"))?;
            }
            _ => {}
        }
    }
    if ids.is_empty() {
        return Err("choose the dead letters to redrive (tick them in the list)".into());
    }
    Ok(RedriveRequest { selection: RedriveSelection::Ids(ids), rate_per_s: rate })
}

fn redrive_page(cx: &Ctx, p: &Preview<oncely::admin::dlq::Redrive>, message: String, status: StatusCode) -> Response {
    render(
        status,
        &RedrivePage {
            chrome: cx.chrome("Redrive: dry run", "dlq"),
            message,
            ids: p.dead_letters.iter().map(|d| d.id.to_string()).collect::<Vec<_>>().join(","),
            asks_for: p.asks_for().map(str::to_owned),
            p,
        },
    )
}

async fn redrive_preview(cx: Ctx, Query(fields): Query<Vec<(String, String)>>) -> Response {
    let req = match redrive_request(&fields) {
        Ok(r) => r,
        Err(m) => return cx.message(StatusCode::BAD_REQUEST, "Bad input", &m, "error"),
    };
    match cx.session().preview_redrive(&req, cx.origin()).await {
        Ok(p) => redrive_page(&cx, &p, String::new(), StatusCode::OK),
        Err(e) => cx.failure(&e),
    }
}

async fn redrive_execute(cx: Ctx, Form(fields): Form<Vec<(String, String)>>) -> Response {
    let req = match redrive_request(&fields) {
        Ok(r) => r,
        Err(m) => return cx.message(StatusCode::BAD_REQUEST, "Bad input", &m, "error"),
    };
    let typed = fields.iter().find(|(k, _)| k == "confirm").map(|(_, v)| v.clone()).filter(|v| !v.is_empty());
    let p = match cx.session().preview_redrive(&req, cx.origin()).await {
        Ok(p) => p,
        Err(e) => return cx.failure(&e),
    };
    // A redrive is rate limited (1 000 letters at 10/s take 100 s): it runs
    // in a task of the console, and the page follows its progress.
    let job = Arc::new(RedriveJob {
        total: p.dead_letters.len(),
        progress: p.progress(),
        outcome: std::sync::Mutex::new(None),
    });
    let (confirmed_tx, confirmed_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let (session, guard_job, c) = (cx.c.session.clone(), job.clone(), cx.c.clone());
    tokio::spawn(async move {
        let outcome = match p.confirm(&session, typed.as_deref()).await {
            Err(e) => {
                let _ = confirmed_tx.send(Err(c.guard.scrub(&e.to_string())));
                return;
            }
            Ok(confirmed) => {
                let _ = confirmed_tx.send(Ok(()));
                match confirmed.execute(&session).await {
                    Ok(done) => {
                        let sent: Vec<String> = done
                            .redriven
                            .iter()
                            .map(|r| format!("#{} → {}[{}]@{}", r.id, r.topic, r.partition, r.offset))
                            .collect();
                        Ok(format!(
                            "Redrove {} dead letter(s) (audit #{}): {}",
                            done.redriven.len(),
                            done.audit_id,
                            sent.join(", ")
                        ))
                    }
                    Err(e) => {
                        Err(c.guard.scrub(&format!("the redrive stopped: {e} (the audit record says how far it got)")))
                    }
                }
            }
        };
        if let Ok(mut o) = guard_job.outcome.lock() {
            *o = Some(outcome);
        }
    });
    match confirmed_rx.await {
        Ok(Ok(())) => {
            let id = cx.c.add_job(job);
            Redirect::to(&format!("/jobs/{id}")).into_response()
        }
        Ok(Err(refusal)) => match cx.session().preview_redrive(&req, cx.origin()).await {
            Ok(p) => redrive_page(&cx, &p, format!("Nothing was sent: {refusal}"), StatusCode::CONFLICT),
            Err(e) => cx.failure(&e),
        },
        Err(_) => cx.message(StatusCode::INTERNAL_SERVER_ERROR, "Failed", "the redrive task ended early", "error"),
    }
}

/// A redrive running in the console.
#[derive(Debug)]
pub(crate) struct RedriveJob {
    total: usize,
    progress: tokio::sync::watch::Receiver<Vec<oncely::failure::redrive::Redriven>>,
    /// `None` while it runs; then the message or the error.
    outcome: std::sync::Mutex<Option<Result<String, String>>>,
}

#[derive(Template)]
#[template(path = "console/job.html")]
struct JobPage {
    chrome: Chrome,
    job: JobView,
}

#[derive(Template)]
#[template(path = "console/job_live.html")]
struct JobFragment {
    job: JobView,
}

struct JobView {
    id: u64,
    done: usize,
    total: usize,
    sent: Vec<String>,
    finished: bool,
    ok: bool,
    message: String,
}

fn job_view(id: u64, j: &RedriveJob) -> JobView {
    let sent: Vec<String> =
        j.progress.borrow().iter().map(|r| format!("#{} → {}[{}]@{}", r.id, r.topic, r.partition, r.offset)).collect();
    let outcome = j.outcome.lock().ok().and_then(|o| o.clone());
    JobView {
        id,
        done: sent.len(),
        total: j.total,
        sent,
        finished: outcome.is_some(),
        ok: matches!(outcome, Some(Ok(_))),
        message: match outcome {
            Some(Ok(m)) | Some(Err(m)) => m,
            None => String::new(),
        },
    }
}

async fn job_page(cx: Ctx, Path(id): Path<u64>) -> Response {
    match cx.c.job(id) {
        Some(j) => render(StatusCode::OK, &JobPage { chrome: cx.chrome("Redrive", "dlq"), job: job_view(id, &j) }),
        None => cx.message(StatusCode::NOT_FOUND, "Not found", &format!("there is no job {id}"), "error"),
    }
}

async fn job_fragment(cx: Ctx, Path(id): Path<u64>) -> Response {
    match cx.c.job(id) {
        Some(j) => render(StatusCode::OK, &JobFragment { job: job_view(id, &j) }),
        None => cx.message(StatusCode::NOT_FOUND, "Not found", &format!("there is no job {id}"), "error"),
    }
}

// ------------------------------------------------------------ parked keys

struct ParkedRowView {
    consumer: String,
    topic: String,
    partition: i32,
    offset: i64,
    key: String,
    key_hex: String,
    status: String,
    attempts: i32,
    next_attempt: String,
    last_error: String,
}

#[derive(Template)]
#[template(path = "console/parked.html")]
struct ParkedPage {
    chrome: Chrome,
    rows: Vec<ParkedRowView>,
}

async fn parked(cx: Ctx) -> Response {
    match failures::list_parked(cx.pool(), None, 500).await {
        Ok(rows) => render(
            StatusCode::OK,
            &ParkedPage {
                chrome: cx.chrome("Parked keys", "parked"),
                rows: rows
                    .iter()
                    .map(|r| ParkedRowView {
                        consumer: r.consumer.clone(),
                        topic: r.record.topic.to_string(),
                        partition: r.record.partition,
                        offset: r.record.offset,
                        key: oncely::envelope::escape_bytes(&r.entity_key),
                        key_hex: oncely::admin::dlq::hex(&r.entity_key),
                        status: r.status.clone(),
                        attempts: r.attempts,
                        next_attempt: view::time_opt(&r.next_attempt_at),
                        last_error: r.last_error.clone().unwrap_or_default().chars().take(120).collect(),
                    })
                    .collect(),
            },
        ),
        Err(e) => cx.failure(&e),
    }
}

#[derive(Template)]
#[template(path = "console/op_preview.html")]
struct OpPreviewPage {
    chrome: Chrome,
    heading: String,
    message: String,
    facts: Vec<(String, String)>,
    meaning: String,
    refusals: Vec<String>,
    action: String,
    hidden: Vec<(&'static str, String)>,
    asks_for: Option<String>,
    button: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KeyForm {
    consumer: String,
    key_hex: String,
    key: String,
    confirm: String,
    #[serde(rename = "as")]
    to: String,
    reason: String,
}

impl KeyForm {
    fn typed(&self) -> Option<&str> {
        (!self.confirm.is_empty()).then_some(self.confirm.as_str())
    }
}

async fn release_preview_of(cx: &Ctx, f: &KeyForm) -> Result<Preview<oncely::admin::dlq::KeyRelease>, Response> {
    let key = parse_hex(&f.key_hex).map_err(|m| cx.message(StatusCode::BAD_REQUEST, "Bad input", &m, "error"))?;
    if f.consumer.trim().is_empty() {
        return Err(cx.message(StatusCode::BAD_REQUEST, "Bad input", "name the consumer", "error"));
    }
    cx.session().preview_release(&f.consumer, &key, cx.origin()).await.map_err(|e| cx.failure(&e))
}

fn release_page(
    cx: &Ctx,
    p: &Preview<oncely::admin::dlq::KeyRelease>,
    message: String,
    status: StatusCode,
) -> Response {
    render(
        status,
        &OpPreviewPage {
            chrome: cx.chrome("Release a held key", "parked"),
            heading: format!("Release key {} of {}", p.key, p.consumer),
            message,
            facts: vec![
                ("consumer".into(), p.consumer.clone()),
                ("key".into(), p.key.clone()),
                ("key (hex)".into(), p.key_hex.clone()),
                ("dead-lettered markers".into(), p.dead_markers.to_string()),
                ("held events".into(), p.held.to_string()),
            ],
            meaning: p.meaning.clone(),
            refusals: p.refusals().to_vec(),
            action: "/parked/release".into(),
            hidden: vec![("consumer", p.consumer.clone()), ("key_hex", p.key_hex.clone())],
            asks_for: p.asks_for().map(str::to_owned),
            button: "Release".into(),
        },
    )
}

async fn release_preview(cx: Ctx, Query(f): Query<KeyForm>) -> Response {
    match release_preview_of(&cx, &f).await {
        Ok(p) => release_page(&cx, &p, String::new(), StatusCode::OK),
        Err(r) => r,
    }
}

async fn release_execute(cx: Ctx, Form(f): Form<KeyForm>) -> Response {
    let p = match release_preview_of(&cx, &f).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let confirmed = match p.confirm(cx.session(), f.typed()).await {
        Ok(c) => c,
        Err(e) => return release_page(&cx, &p, format!("Nothing was changed: {}", cx.text(&e)), StatusCode::CONFLICT),
    };
    match confirmed.execute(cx.session()).await {
        Ok(done) => cx.message_links(
            StatusCode::OK,
            "Released",
            &format!(
                "Released {} held event(s) of key {} of {}; the consumer retries them now (audit #{}).",
                done.released, done.key, done.consumer, done.audit_id
            ),
            "notice",
            vec![("/parked".into(), "Parked keys".into())],
        ),
        Err(e @ oncely::Error::Refused(_)) => {
            release_page(&cx, &p, format!("Nothing was changed: {}", cx.text(&e)), StatusCode::CONFLICT)
        }
        Err(e) => cx.failure(&e),
    }
}

// ------------------------------------------------------------ effects

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EffectsQuery {
    status: String,
}

struct EffectRow {
    key: String,
    status: String,
    semantics: String,
    attempts: i32,
    updated: String,
    last_error: String,
}

#[derive(Template)]
#[template(path = "console/effects.html")]
struct EffectsPage {
    chrome: Chrome,
    statuses: Vec<(&'static str, bool)>,
    rows: Vec<EffectRow>,
}

const EFFECT_STATUSES: [&str; 7] = ["unknown", "dead", "failed", "pending", "running", "done", "suppressed"];

async fn effects(cx: Ctx, Query(q): Query<EffectsQuery>) -> Response {
    let status = if q.status.is_empty() { "unknown".to_owned() } else { q.status.clone() };
    if !EFFECT_STATUSES.contains(&status.as_str()) {
        return cx.message(StatusCode::BAD_REQUEST, "Bad input", &format!("unknown status `{status}`"), "error");
    }
    match oncely::effects::list(cx.pool(), Some(&status), None, 500).await {
        Ok(rows) => render(
            StatusCode::OK,
            &EffectsPage {
                chrome: cx.chrome("Effects", "effects"),
                statuses: EFFECT_STATUSES.iter().map(|s| (*s, *s == status)).collect(),
                rows: rows
                    .iter()
                    .map(|i| EffectRow {
                        key: i.key.clone(),
                        status: i.status.clone(),
                        semantics: i.semantics.clone(),
                        attempts: i.attempts,
                        updated: view::time(&i.updated_at),
                        last_error: i.last_error.clone().unwrap_or_default().chars().take(120).collect(),
                    })
                    .collect(),
            },
        ),
        Err(e) => cx.failure(&e),
    }
}

fn effect_page(
    cx: &Ctx,
    p: &Preview<oncely::admin::effects::EffectChange>,
    f: &KeyForm,
    message: String,
    status: StatusCode,
) -> Response {
    let retry = p.action == "effects.retry";
    let mut facts = vec![("key".to_owned(), p.key.clone()), ("to".to_owned(), p.to.to_owned())];
    if let Some(i) = &p.intent {
        facts.push(("status now".into(), i.status.clone()));
        facts.push(("semantics".into(), i.semantics.clone()));
        facts.push(("attempts".into(), i.attempts.to_string()));
        facts.push(("last error".into(), i.last_error.clone().unwrap_or_default()));
    }
    if let Some(r) = &p.reason {
        facts.push(("reason".into(), r.clone()));
    }
    let mut hidden = vec![("key", p.key.clone())];
    if !retry {
        hidden.push(("as", f.to.clone()));
        hidden.push(("reason", f.reason.clone()));
    }
    render(
        status,
        &OpPreviewPage {
            chrome: cx.chrome("Effect decision", "effects"),
            heading: if retry { format!("Retry {}", p.key) } else { format!("Resolve {} as {}", p.key, p.to) },
            message,
            facts,
            meaning: p.meaning.clone(),
            refusals: p.refusals().to_vec(),
            action: if retry { "/effects/retry".into() } else { "/effects/resolve".into() },
            hidden,
            asks_for: p.asks_for().map(str::to_owned),
            button: if retry { "Retry".into() } else { "Resolve".into() },
        },
    )
}

async fn effect_preview_of(
    cx: &Ctx,
    f: &KeyForm,
    retry: bool,
) -> Result<Preview<oncely::admin::effects::EffectChange>, Response> {
    let r = if retry {
        cx.session().preview_effect_retry(&f.key, cx.origin()).await
    } else {
        let to = match f.to.as_str() {
            "done" => Resolution::Done,
            "failed" => Resolution::Failed,
            other => {
                return Err(cx.message(
                    StatusCode::BAD_REQUEST,
                    "Bad input",
                    &format!("resolve as `done` or `failed`, not `{other}`"),
                    "error",
                ))
            }
        };
        cx.session().preview_effect_resolve(&f.key, to, &f.reason, cx.origin()).await
    };
    r.map_err(|e| cx.failure(&e))
}

async fn effect_decide(cx: Ctx, f: KeyForm, retry: bool) -> Response {
    let p = match effect_preview_of(&cx, &f, retry).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let confirmed = match p.confirm(cx.session(), f.typed()).await {
        Ok(c) => c,
        Err(e) => {
            return effect_page(&cx, &p, &f, format!("Nothing was changed: {}", cx.text(&e)), StatusCode::CONFLICT)
        }
    };
    match confirmed.execute(cx.session()).await {
        Ok(done) => cx.message_links(
            StatusCode::OK,
            "Decided",
            &format!("{}: {} → {} (audit #{})", done.key, done.from, done.to, done.audit_id),
            "notice",
            vec![("/effects".into(), "Effects".into())],
        ),
        Err(e @ oncely::Error::Refused(_)) => {
            effect_page(&cx, &p, &f, format!("Nothing was changed: {}", cx.text(&e)), StatusCode::CONFLICT)
        }
        Err(e) => cx.failure(&e),
    }
}

async fn effect_retry_preview(cx: Ctx, Query(f): Query<KeyForm>) -> Response {
    match effect_preview_of(&cx, &f, true).await {
        Ok(p) => effect_page(&cx, &p, &f, String::new(), StatusCode::OK),
        Err(r) => r,
    }
}

async fn effect_retry_execute(cx: Ctx, Form(f): Form<KeyForm>) -> Response {
    effect_decide(cx, f, true).await
}

async fn effect_resolve_preview(cx: Ctx, Query(f): Query<KeyForm>) -> Response {
    match effect_preview_of(&cx, &f, false).await {
        Ok(p) => effect_page(&cx, &p, &f, String::new(), StatusCode::OK),
        Err(r) => r,
    }
}

async fn effect_resolve_execute(cx: Ctx, Form(f): Form<KeyForm>) -> Response {
    effect_decide(cx, f, false).await
}

// ------------------------------------------------------------ projections

struct RebuildRowView {
    target: String,
    projection: String,
    consumer: String,
    state: String,
    from: String,
    permille: i64,
    progress: String,
    behind: i64,
    parked: i64,
    dead_letters: i64,
    suppressed: i64,
    diff: String,
    kept_until: String,
}

#[derive(Template)]
#[template(path = "console/projections.html")]
struct ProjectionsPage {
    chrome: Chrome,
    rows: Vec<RebuildRowView>,
}

/// Every rebuild with its progress (positions summed over partitions,
/// against the live consumer's).
async fn projections(cx: Ctx) -> Response {
    let pool = cx.pool();
    let list = match oncely::projection::list(pool).await {
        Ok(l) => l,
        Err(e) => return cx.failure(&e),
    };
    let mut rows = Vec::new();
    for r in list {
        let st = match oncely::projection::status(pool, &r.target).await {
            Ok(s) => s,
            Err(e) => return cx.failure(&e),
        };
        let (done, live) = st.offsets();
        let permille = if live > 0 { (done * 1000 / live).min(1000) } else { 1000 };
        rows.push(RebuildRowView {
            target: r.target.clone(),
            projection: r.projection.clone(),
            consumer: r.consumer.clone(),
            state: r.state.clone(),
            from: r.from_spec.clone(),
            permille,
            progress: format!("{:.1} % ({done} of {live})", permille as f64 / 10.0),
            behind: st.lag.behind,
            parked: st.parked,
            dead_letters: st.dead_letters,
            suppressed: st.effects.iter().filter(|(s, _)| s == "suppressed").map(|(_, n)| n).sum(),
            diff: match (&r.diffed_at, &r.diff) {
                (Some(at), Some(d)) => {
                    format!("{} ({})", view::time(at), if d["equal"] == true { "equal" } else { "different" })
                }
                _ => "not since the last swap".into(),
            },
            kept_until: view::time_opt(&r.keep_until),
        });
    }
    render(StatusCode::OK, &ProjectionsPage { chrome: cx.chrome("Projections", "projections"), rows })
}

// ------------------------------------------------------------ outbox, audit

struct LaneRowView {
    lane: i16,
    pending: i64,
    oldest: String,
    max_attempts: i32,
    last_error: String,
    owner: String,
}

#[derive(Template)]
#[template(path = "console/outbox.html")]
struct OutboxPage {
    chrome: Chrome,
    pending: i64,
    oldest: String,
    published_last_minute: i64,
    rate: String,
    kept: i64,
    relays: i64,
    lanes: Vec<LaneRowView>,
}

async fn outbox(cx: Ctx) -> Response {
    let age = |d: Option<std::time::Duration>| d.map_or_else(|| "-".into(), oncely::admin::parse::format_duration);
    match oncely::outbox::status(cx.pool()).await {
        Ok(s) => render(
            StatusCode::OK,
            &OutboxPage {
                chrome: cx.chrome("Outbox", "outbox"),
                pending: s.pending,
                oldest: age(s.oldest_pending_age),
                published_last_minute: s.published_last_minute,
                rate: format!("{:.1}", s.publish_rate_per_s),
                kept: s.published_kept,
                relays: s.relays,
                lanes: s
                    .lanes
                    .iter()
                    .map(|l| LaneRowView {
                        lane: l.lane,
                        pending: l.pending,
                        oldest: age(l.oldest_pending_age),
                        max_attempts: l.max_attempts,
                        last_error: l.last_error.clone().unwrap_or_default(),
                        owner: l.owner.as_ref().map_or_else(
                            || "-".into(),
                            |o| format!("{} (pid {})", o.name.clone().unwrap_or_default(), o.pid),
                        ),
                    })
                    .collect(),
            },
        ),
        Err(e) => cx.failure(&e),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AuditQuery {
    since: String,
    group: String,
    action: String,
    limit: String,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage {
    chrome: Chrome,
    message: String,
    since: String,
    group: String,
    action: String,
    limit: String,
    audit: Vec<AuditRow>,
}

async fn audit_page(cx: Ctx, Query(q): Query<AuditQuery>) -> Response {
    let mut message = String::new();
    let since = match q.since.trim() {
        "" => None,
        s => match crate::offsets::parse_since(s) {
            Ok(t) => Some(t),
            Err(e) => {
                message = format!("Since: {e}");
                None
            }
        },
    };
    let limit = match q.limit.trim() {
        "" => 200,
        l => l.parse::<i64>().ok().filter(|n| *n > 0).unwrap_or_else(|| {
            message = format!("Limit: `{l}` is not a positive number");
            200
        }),
    };
    if !message.is_empty() {
        return render(
            StatusCode::BAD_REQUEST,
            &AuditPage {
                chrome: cx.chrome("Audit log", "audit"),
                message,
                since: q.since.clone(),
                group: q.group.clone(),
                action: q.action.clone(),
                limit: q.limit.clone(),
                audit: Vec::new(),
            },
        );
    }
    let filter = AuditFilter {
        since,
        group: Some(q.group.trim().to_owned()).filter(|g| !g.is_empty()),
        action: Some(q.action.trim().to_owned()).filter(|a| !a.is_empty()),
        limit: Some(limit),
    };
    match audit::list(cx.pool(), &filter).await {
        Ok(records) => {
            let mut response = render(
                StatusCode::OK,
                &AuditPage {
                    chrome: cx.chrome("Audit log", "audit"),
                    message,
                    since: q.since.clone(),
                    group: q.group.clone(),
                    action: q.action.clone(),
                    limit: limit.to_string(),
                    audit: records.iter().rev().map(AuditRow::from).collect(),
                },
            );
            response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
            response
        }
        Err(e) => cx.failure(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(target: &str, value: &str, topics: &str) -> OffsetForm {
        OffsetForm { target: target.into(), value: value.into(), topics: topics.into(), ..Default::default() }
    }

    #[test]
    fn forms_become_the_librarys_requests() {
        let r = reset_request("g", &form("shift", "-5", "orders payments:0,2")).expect("ok");
        assert_eq!(r.target, Target::ShiftBy(-5));
        assert!(matches!(&r.scope, Scope::Topics(s) if s.len() == 2 && s[1].partitions == Some(vec![0, 2])));
        let r = reset_request("g", &form("earliest", "", "")).expect("ok");
        assert_eq!((r.target, r.scope), (Target::Earliest, Scope::AllTopics));
        assert_eq!(reset_request("g", &form("snapshot", "7", "")).expect("ok").scope, Scope::FromTarget);
    }

    #[test]
    fn bad_input_is_a_sentence() {
        let e = reset_request("g", &form("datetime", "2026-03-21T02:44:00", "")).expect_err("no zone");
        assert!(e.contains("zone"), "{e}");
        assert!(reset_request("g", &form("offset", "ten", ""))
            .expect_err("nan")
            .contains("`ten` is not a whole number"));
        assert!(reset_request("g", &form("offset", "", "")).expect_err("empty").contains("needs a value"));
        assert!(reset_request("g", &form("nowhere", "", "")).expect_err("target").contains("unknown target"));
        let f = OffsetForm { max_replay: "-3".into(), ..form("earliest", "", "") };
        assert!(reset_request("g", &f).expect_err("max").contains("max replay"));
    }

    #[test]
    fn redrive_ids_come_from_check_boxes_or_a_list() {
        let f = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        let r = redrive_request(&f(&[("id", "3"), ("id", "4"), ("rate", "2.5")])).expect("ok");
        assert_eq!((r.selection, r.rate_per_s), (RedriveSelection::Ids(vec![3, 4]), 2.5));
        let r = redrive_request(&f(&[("ids", "3,4"), ("csrf", "x")])).expect("ok");
        assert_eq!(r.selection, RedriveSelection::Ids(vec![3, 4]));
        assert!(redrive_request(&f(&[("rate", "1")])).is_err());
        assert!(redrive_request(&f(&[("id", "x")])).is_err());
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(path_segment("pay/ments g"), "pay%2Fments%20g");
        assert_eq!(path_segment("a-b_c.d~e"), "a-b_c.d~e");
    }
}
