//! Offset resets, restores and undo as [`ops`](crate::admin::ops)
//! operations: always a preview first ([`OffsetChange`]: what moves where,
//! what is re-delivered or skipped, how old the oldest replayed record is,
//! whether an oncely inbox protects the group), then, only once confirmed,
//! the guarded execution: inactive group, offsets unchanged since the
//! preview, one operator at a time, the audit record and a snapshot written
//! before anything changes, commit metadata `oncely:reset:<audit id>`.
//!
//! ```no_run
//! # async fn run(env: oncely::config::Environment) -> oncely::Result<()> {
//! use oncely::admin::ops::Origin;
//! use oncely::admin::plan::PlanOptions;
//! use oncely::admin::reset::{ResetRequest, Scope, Target};
//! use oncely::admin::session::Session;
//!
//! let session = Session::open(env).await?; // refuses a wrong cluster
//! let req = ResetRequest {
//!     group: "payment-service".into(),
//!     scope: Scope::AllTopics,
//!     target: Target::Earliest,
//!     options: PlanOptions { allow_clamp: false, max_replay: Some(10_000) },
//! };
//! let preview = session.preview_reset(&req, Origin::cli()).await?;
//! println!("{} records would be re-delivered", preview.plan.totals.redelivered);
//! // On a protected environment, the text the operator typed:
//! let typed = preview.asks_for().map(|_| "RESET prod payment-service");
//! let done = preview.confirm(&session, typed).await?.execute(&session).await?;
//! println!("audit #{}, snapshot #{}", done.audit_id, done.snapshot_id);
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::admin::audit::{AuditEntry, AuditOutcome, AuditRecord, AuditResult};
use crate::admin::ops::{Operation, Origin, Preview, Trail};
use crate::admin::parse::{format_duration, FileOffset, TopicSelection};
use crate::admin::plan::{plan, PartitionState, Plan, PlanOptions, Requested};
use crate::admin::records::first_record_timestamps;
use crate::admin::session::{MemberInfo, Session};
use crate::admin::snapshots::{self, NewSnapshot, PartitionOffset, Snapshot, SnapshotReason};
use crate::error::{Error, Result};
use crate::kafka::admin::{AdminError, ErrorCode, GroupDescription, GroupOffset, OffsetSpec};
use crate::kafka::RESET_METADATA_PREFIX;
use crate::store;

/// Where to move the group's offsets.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// The log start.
    Earliest,
    /// The log end.
    Latest,
    /// One offset for every selected partition.
    Offset(i64),
    /// The committed offset plus this (negative: back).
    ShiftBy(i64),
    /// The first offset whose record timestamp is at or after this time.
    Datetime(DateTime<Utc>),
    /// The first offset at or after now minus this.
    ByDuration(Duration),
    /// Offsets from a file (Kafka's CSV).
    FromFile {
        /// The file, for the audit log.
        path: String,
        /// Its lines.
        offsets: Vec<FileOffset>,
    },
    /// Where the group is: each committed offset as it is, the log end
    /// where it has none (Kafka's `--to-current`).
    Current,
    /// The offsets of a stored snapshot (a partition it records without a
    /// commit goes back to having none).
    Snapshot(i64),
    /// The last snapshot of the group taken at or before this time.
    SnapshotAt(DateTime<Utc>),
}

impl Target {
    /// Whether the target names its own partitions (a file, a snapshot), so
    /// that `-t`/`--all-topics` are optional filters.
    pub fn names_partitions(&self) -> bool {
        matches!(self, Target::FromFile { .. } | Target::Snapshot(_) | Target::SnapshotAt(_))
    }
}

/// Which partitions a reset covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// These topics (all or some of their partitions).
    Topics(Vec<TopicSelection>),
    /// Every topic the group has committed offsets for.
    AllTopics,
    /// The partitions the target names (file, snapshot).
    FromTarget,
}

/// The kind of offset change, as recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// `oncely offsets reset`.
    Reset,
    /// `oncely offsets restore ID`.
    Restore,
    /// `oncely offsets undo`.
    Undo,
}

impl Action {
    /// The audit action name.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Reset => "offsets.reset",
            Action::Restore => "offsets.restore",
            Action::Undo => "offsets.undo",
        }
    }

    /// Every offset-changing action (what undo looks back through).
    pub const ALL: [Action; 3] = [Action::Reset, Action::Restore, Action::Undo];
}

/// A reset to preview.
#[derive(Debug, Clone, PartialEq)]
pub struct ResetRequest {
    /// Consumer group.
    pub group: String,
    /// Partitions.
    pub scope: Scope,
    /// Where to.
    pub target: Target,
    /// Clamping and `--max-replay`.
    pub options: PlanOptions,
}

/// The text a protected environment requires typed (or passed with
/// `--confirm`) before an offset change: `RESET <ENV> <GROUP>`.
pub fn confirmation_text(environment: &str, group: &str) -> String {
    format!("RESET {environment} {group}")
}

/// A snapshot a preview moves to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotRef {
    /// Id.
    pub id: i64,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
    /// Why.
    pub reason: String,
}

/// What the oncely database knows about the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OncelyInfo {
    /// Whether the group is an oncely consumer (registered in
    /// `oncely.consumers` or with rows in `oncely.offsets`).
    pub consumer: bool,
    /// What that means for this change, in a sentence or two.
    pub meaning: String,
    /// Its database offsets for the planned partitions.
    pub db_offsets: Vec<DbOffset>,
}

/// A database offset of an oncely consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DbOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// `oncely.offsets.next_offset`.
    pub offset: i64,
}

/// Everything an operator sees before an offset change: the operation of an
/// offsets reset, restore or undo (wrapped in an [`ops::Preview`](Preview)
/// with the environment and who asks).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffsetChange {
    /// Reset, restore or undo.
    pub action: Action,
    /// Group.
    pub group: String,
    /// Its state now.
    pub group_state: String,
    /// Its members now.
    pub members: Vec<MemberInfo>,
    /// The target, in words.
    pub target: String,
    /// The snapshot moved to (restore, undo, `--to-snapshot`).
    pub source_snapshot: Option<SnapshotRef>,
    /// The audit record an undo reverts.
    pub undoes: Option<i64>,
    /// How that record ended (`succeeded`; `failed` or `started` for a
    /// change that failed midway or whose command died).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub undoes_result: Option<String>,
    /// The plan.
    pub plan: Plan,
    /// Timestamp (ms) of the oldest record that will be re-delivered, read
    /// from the records themselves.
    pub oldest_replayed_ms: Option<i64>,
    /// The oncely view of the group.
    pub oncely: OncelyInfo,
    /// Why execution would be refused (empty: it would go ahead, after the
    /// confirmation on a protected environment).
    pub refusals: Vec<String>,
    /// The committed offsets (with metadata) of the planned partitions, as
    /// the preview saw them: execution refuses if they moved since.
    pub before: Vec<PartitionOffset>,
    /// The options the plan was made with.
    #[serde(skip)]
    pub options: PlanOptions,
}

/// A done offset change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Executed {
    /// Its audit record (also in the commit metadata `oncely:reset:<id>`).
    pub audit_id: i64,
    /// The snapshot taken before it (what `oncely offsets undo` restores).
    pub snapshot_id: i64,
    /// The commit metadata written.
    pub metadata: String,
    /// The committed offsets after it, as the broker reports them.
    pub after: Vec<PartitionOffset>,
}

fn refused(msg: impl Into<String>) -> Error {
    Error::Refused(msg.into())
}

/// Why an active group cannot be changed, naming its members.
pub fn group_active_reason(d: &GroupDescription) -> String {
    let members: Vec<String> =
        d.members.iter().map(|m| format!("{}@{}", m.client_id, m.host.trim_start_matches('/'))).collect();
    format!(
        "group {} is active (state {}, {} member(s){}{}): stop its consumers first; Kafka does not let anyone \
         move the offsets of a group with members",
        d.group_id,
        d.state,
        d.members.len(),
        if members.is_empty() { "" } else { ": " },
        members.join(", ")
    )
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn describe_target(t: &Target, snapshot: Option<&Snapshot>) -> String {
    match t {
        Target::Earliest => "earliest (log start)".into(),
        Target::Latest => "latest (log end)".into(),
        Target::Offset(o) => format!("offset {o}"),
        Target::ShiftBy(n) => format!("shift by {n:+}"),
        Target::Current => "current committed offsets (the log end where there is none)".into(),
        Target::Datetime(at) => format!("first offset at or after {}", rfc3339(*at)),
        Target::ByDuration(d) => format!("first offset at or after {} ago", format_duration(*d)),
        Target::FromFile { path, offsets } => format!("{} offset(s) from file {path}", offsets.len()),
        Target::Snapshot(_) | Target::SnapshotAt(_) => match snapshot {
            Some(s) => format!("snapshot #{} ({}, taken {})", s.id, s.reason, rfc3339(s.taken_at)),
            None => "snapshot".into(),
        },
    }
}

/// What the change means for `group`. `retention_days`: how long the inbox
/// keeps an identity; a replay reaching further back re-applies what it
/// forgot, and the meaning says so instead of promising that nothing runs twice.
fn oncely_meaning(consumer: bool, group: &str, plan: &Plan, retention_days: Option<i32>, now_ms: i64) -> String {
    let (replay, skip) = (plan.totals.redelivered, plan.totals.skipped);
    let skipped = if skip > 0 {
        format!(" The {skip} skipped record(s) will never be processed by this group.")
    } else {
        String::new()
    };
    let forgotten = match (plan.oldest_replayed_ms(), retention_days) {
        (Some(oldest), Some(days)) if replay > 0 && oldest < now_ms - i64::from(days) * 86_400_000 => Some((
            chrono::DateTime::from_timestamp_millis(oldest).map(|t| t.to_rfc3339()).unwrap_or_default(),
            days,
            chrono::DateTime::from_timestamp_millis(now_ms - i64::from(days) * 86_400_000)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default(),
        )),
        _ => None,
    };
    if let (true, Some((oldest, days, cutoff))) = (consumer, &forgotten) {
        format!(
            "{group} is an oncely consumer in this environment's database, but this change re-delivers records \
             older than its inbox keeps identities ({days} days): the oldest is from {oldest}. Events from before \
             {cutoff} may have had their inbox rows removed and WOULD BE APPLIED AGAIN, side effects included; \
             the newer ones are dropped as duplicates. To stay within what the inbox remembers, reset to a time \
             after {cutoff} (--to-datetime).{skipped}"
        )
    } else if consumer {
        format!(
            "{group} is an oncely consumer in this environment's database. Its inbox suppresses every event it \
             already applied, so the {replay} re-delivered record(s) are dropped as duplicates: no handler runs \
             twice, no side effect fires twice. It follows this change because the commit carries \
             `oncely:reset:<audit id>`; a raw rewind (e.g. kafka-consumer-groups --reset-offsets) would be \
             ignored by default (rewind policy `skip`).{skipped}"
        )
    } else if replay > 0 {
        format!(
            "{group} is NOT an oncely consumer in this environment's database: nothing here suppresses \
             duplicates. Its consumers will process the {replay} re-delivered record(s) again, with all their \
             side effects.{skipped}"
        )
    } else {
        format!("{group} is NOT an oncely consumer in this environment's database; nothing is re-delivered.{skipped}")
    }
}

fn offsets_json(o: &[PartitionOffset]) -> Value {
    serde_json::to_value(o).unwrap_or(Value::Null)
}

/// How many past offset changes undo looks back through for the last one
/// that left a trace (changes that failed before changing anything are
/// passed over).
const UNDO_LOOKBACK: i64 = 100;

/// One partition of a past change's plan, as its audit record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct PlannedPartition {
    topic: String,
    partition: i32,
    current: Option<i64>,
    new: Option<i64>,
}

/// The partitions a recorded offset change meant to change.
fn planned_changes(rec: &AuditRecord) -> Result<Vec<PlannedPartition>> {
    let plan: Vec<PlannedPartition> = serde_json::from_value(rec.details.get("plan").cloned().unwrap_or(Value::Null))
        .map_err(|e| refused(format!("audit #{} has no usable plan: {e}", rec.id)))?;
    Ok(plan.into_iter().filter(|p| p.current != p.new).collect())
}

/// What a past offset change left on one partition, judged from the
/// snapshot taken right before it and the live committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trace {
    /// The live offset is what the change wrote (its offset with its commit
    /// metadata, or no commit where it removed one).
    Changed,
    /// The live offset is where the change found it: the change did not
    /// reach this partition (it failed first), or it was put back.
    Untouched,
    /// Neither: the group (or someone) committed since.
    MovedSince,
}

/// Judges one partition. `before` is the snapshot's offset (`None`: no
/// commit), `planned` what the change set (`None`: it removed the commit),
/// `live` and `live_metadata` the committed offset now, `metadata` the
/// change's own `oncely:reset:<audit id>`.
fn trace(before: Option<i64>, planned: Option<i64>, live: Option<i64>, live_metadata: &str, metadata: &str) -> Trace {
    if live == planned && (live.is_none() || live_metadata == metadata) {
        Trace::Changed
    } else if live == before {
        Trace::Untouched
    } else {
        Trace::MovedSince
    }
}

fn opt_offset(o: Option<i64>) -> String {
    o.map_or_else(|| "none".into(), |o| o.to_string())
}

impl Session {
    /// The partitions of `topic`, or a refusal naming it when the cluster
    /// does not know it.
    async fn partitions_of(&self, topic: &str) -> Result<Vec<i32>> {
        match self.admin().topic_partitions(topic).await {
            Ok(p) => Ok(p),
            Err(AdminError::Target { code, .. }) if code == ErrorCode::UNKNOWN_TOPIC_OR_PARTITION => {
                Err(refused(format!(
                    "topic {topic} does not exist on cluster {} (environment `{}`)",
                    self.cluster_id(),
                    self.env().name
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn select(&self, sel: &TopicSelection) -> Result<Vec<(String, i32)>> {
        let all = self.partitions_of(&sel.topic).await?;
        match &sel.partitions {
            None => Ok(all.into_iter().map(|p| (sel.topic.clone(), p)).collect()),
            Some(ps) => {
                if let Some(bad) = ps.iter().find(|p| !all.contains(p)) {
                    return Err(refused(format!(
                        "topic {} has no partition {bad} (it has {} partitions)",
                        sel.topic,
                        all.len()
                    )));
                }
                Ok(ps.iter().map(|p| (sel.topic.clone(), *p)).collect())
            }
        }
    }

    /// Previews the reset `req` asked for by `origin`: nothing is changed.
    pub async fn preview_reset(&self, req: &ResetRequest, origin: Origin) -> Result<Preview<OffsetChange>> {
        let change = self.plan_change(req, Action::Reset).await?;
        Ok(Preview::new(self, change, origin))
    }

    /// Plans the change `req` describes.
    async fn plan_change(&self, req: &ResetRequest, action: Action) -> Result<OffsetChange> {
        let group = req.group.as_str();
        let desc = self.describe_group(group).await?;

        // Offsets the target names itself (file, snapshot); `None` is a
        // partition a snapshot records without a commit.
        let mut snapshot = None;
        let explicit: Option<BTreeMap<(String, i32), Option<i64>>> = match &req.target {
            Target::Snapshot(id) => {
                let s = snapshots::get(self.pool(), *id)
                    .await?
                    .ok_or_else(|| refused(format!("there is no snapshot #{id}")))?;
                if s.group != group {
                    return Err(refused(format!("snapshot #{id} is of group {}, not {group}", s.group)));
                }
                let m = s.offsets.iter().map(|o| ((o.topic.clone(), o.partition), o.offset)).collect();
                snapshot = Some(s);
                Some(m)
            }
            Target::SnapshotAt(at) => {
                let s = snapshots::last_at_or_before(self.pool(), self.cluster_id(), group, *at).await?.ok_or_else(
                    || {
                        refused(format!(
                        "there is no snapshot of group {group} on cluster {} taken at or before {} (`oncely watch` \
                         records them)",
                        self.cluster_id(),
                        rfc3339(*at)
                    ))
                    },
                )?;
                let m = s.offsets.iter().map(|o| ((o.topic.clone(), o.partition), o.offset)).collect();
                snapshot = Some(s);
                Some(m)
            }
            Target::FromFile { offsets, .. } => {
                Some(offsets.iter().map(|f| ((f.topic.clone(), f.partition), Some(f.offset))).collect())
            }
            _ => None,
        };
        if let Some(s) = &snapshot {
            if s.cluster_id != self.cluster_id() {
                return Err(refused(format!(
                    "snapshot #{} was taken on cluster {}, but environment `{}` is cluster {}: offsets do not carry \
                     over between clusters",
                    s.id,
                    s.cluster_id,
                    self.env().name,
                    self.cluster_id()
                )));
            }
        }

        // The partitions.
        let partitions: Vec<(String, i32)> = match (&explicit, &req.scope) {
            (Some(m), scope) => {
                let keep = |t: &str, p: i32| match scope {
                    Scope::Topics(sels) => {
                        sels.iter().any(|s| s.topic == t && s.partitions.as_ref().is_none_or(|ps| ps.contains(&p)))
                    }
                    Scope::AllTopics | Scope::FromTarget => true,
                };
                let chosen: Vec<(String, i32)> = m.keys().filter(|(t, p)| keep(t, *p)).cloned().collect();
                let topics: BTreeSet<&str> = chosen.iter().map(|(t, _)| t.as_str()).collect();
                for t in topics {
                    let exist = self.partitions_of(t).await?;
                    if let Some((_, p)) = chosen.iter().find(|(ct, p)| ct == t && !exist.contains(p)) {
                        return Err(refused(format!("topic {t} has no partition {p} (it has {})", exist.len())));
                    }
                }
                chosen
            }
            (None, Scope::Topics(sels)) => {
                let mut all = Vec::new();
                for s in sels {
                    all.extend(self.select(s).await?);
                }
                all
            }
            (None, Scope::AllTopics) => {
                let committed = self.admin().list_consumer_group_offsets(group, None).await?;
                let topics: BTreeSet<String> = committed.into_iter().map(|c| c.topic).collect();
                let mut all = Vec::new();
                for t in topics {
                    all.extend(self.partitions_of(&t).await?.into_iter().map(|p| (t.clone(), p)));
                }
                all
            }
            (None, Scope::FromTarget) => {
                return Err(refused("choose the partitions: -t TOPIC[:PARTITIONS] or --all-topics"));
            }
        };
        let partitions: Vec<(String, i32)> = partitions.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        if partitions.is_empty() {
            return Err(refused(match req.scope {
                Scope::AllTopics => format!("group {group} has no committed offsets: name the topics with -t"),
                _ => "no partitions selected".to_owned(),
            }));
        }

        // Where they are.
        let committed = self.admin().list_consumer_group_offsets(group, Some(&partitions)).await?;
        let before: Vec<PartitionOffset> = committed.into_iter().map(PartitionOffset::from).collect();
        let current: BTreeMap<(String, i32), Option<i64>> =
            before.iter().map(|o| ((o.topic.clone(), o.partition), o.offset)).collect();
        let bounds = self.log_bounds(&partitions).await?;

        // Where they go.
        let by_time: Option<BTreeMap<(String, i32), Option<i64>>> = match &req.target {
            Target::Datetime(_) | Target::ByDuration(_) => {
                let at = match &req.target {
                    Target::Datetime(t) => t.timestamp_millis(),
                    Target::ByDuration(d) => {
                        Utc::now().timestamp_millis() - i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
                    }
                    _ => unreachable!("matched above"),
                };
                let listed = self.admin().list_offsets(&partitions, OffsetSpec::Timestamp(at.max(0))).await?;
                Some(listed.into_iter().map(|l| ((l.topic.clone(), l.partition), l.offset())).collect())
            }
            _ => None,
        };
        let mut inputs = Vec::with_capacity(partitions.len());
        for key in &partitions {
            let (log_start, log_end) = *bounds
                .get(key)
                .ok_or_else(|| refused(format!("the log bounds of {}[{}] are unknown", key.0, key.1)))?;
            let requested = match (&req.target, &explicit, &by_time) {
                (_, Some(m), _) => match m.get(key) {
                    Some(Some(o)) => Requested::Offset(*o),
                    _ => Requested::NoCommit,
                },
                (_, _, Some(t)) => match t.get(key).copied().flatten() {
                    Some(o) => Requested::Offset(o),
                    None => Requested::Latest,
                },
                (Target::Earliest, ..) => Requested::Earliest,
                (Target::Latest, ..) => Requested::Latest,
                (Target::Offset(o), ..) => Requested::Offset(*o),
                (Target::ShiftBy(n), ..) => Requested::ShiftBy(*n),
                (Target::Current, ..) => Requested::Current,
                _ => unreachable!("explicit and timestamp targets are resolved above"),
            };
            let state = PartitionState {
                topic: key.0.clone(),
                partition: key.1,
                current: current.get(key).copied().flatten(),
                log_start,
                log_end,
            };
            inputs.push((state, requested));
        }
        let mut plan = plan(&inputs, req.options).map_err(|e| refused(e.to_string()))?;

        // How old the oldest re-delivered record is: read the records.
        let replayed: Vec<(String, i32, i64)> = plan
            .partitions
            .iter()
            .filter(|p| p.redelivered > 0)
            .filter_map(|p| p.new.map(|n| (p.topic.clone(), p.partition, n)))
            .collect();
        let ts = first_record_timestamps(&self.env().config.connection(), &replayed, Duration::from_secs(10)).await?;
        for p in &mut plan.partitions {
            p.first_replayed_ms = ts.get(&(p.topic.clone(), p.partition)).copied();
        }

        let oncely = self.oncely_group(group).await?;
        // How long the inbox remembers identities: only a replay needs it.
        let inbox_retention_days = if oncely.consumer && plan.totals.redelivered > 0 {
            store::longest_inbox_retention_days(self.pool()).await?
        } else {
            None
        };
        let mut refusals: Vec<String> = plan.refusals.iter().map(|r| r.to_string()).collect();
        if !desc.is_inactive() {
            refusals.push(group_active_reason(&desc));
        }
        let db_offsets = partitions
            .iter()
            .filter_map(|k| {
                oncely.db_offsets.get(k).map(|o| DbOffset { topic: k.0.clone(), partition: k.1, offset: *o })
            })
            .collect();
        Ok(OffsetChange {
            action,
            group: group.to_owned(),
            group_state: desc.state.clone(),
            members: desc.members.iter().map(MemberInfo::from).collect(),
            target: describe_target(&req.target, snapshot.as_ref()),
            source_snapshot: snapshot.map(|s| SnapshotRef { id: s.id, taken_at: s.taken_at, reason: s.reason }),
            undoes: None,
            undoes_result: None,
            oldest_replayed_ms: plan.oldest_replayed_ms(),
            oncely: OncelyInfo {
                consumer: oncely.consumer,
                meaning: oncely_meaning(
                    oncely.consumer,
                    group,
                    &plan,
                    inbox_retention_days,
                    chrono::Utc::now().timestamp_millis(),
                ),
                db_offsets,
            },
            plan,
            refusals,
            before,
            options: req.options,
        })
    }

    /// Previews restoring snapshot `id` (to its own group), optionally only
    /// some topics. A partition the snapshot records without a commit goes
    /// back to having none.
    pub async fn preview_restore(
        &self,
        id: i64,
        topics: Option<Vec<TopicSelection>>,
        options: PlanOptions,
        origin: Origin,
    ) -> Result<Preview<OffsetChange>> {
        let s = snapshots::get(self.pool(), id).await?.ok_or_else(|| refused(format!("there is no snapshot #{id}")))?;
        let req = ResetRequest {
            group: s.group,
            scope: topics.map_or(Scope::FromTarget, Scope::Topics),
            target: Target::Snapshot(id),
            options,
        };
        let change = self.plan_change(&req, Action::Restore).await?;
        Ok(Preview::new(self, change, origin))
    }

    /// Previews undoing the last offset change oncely made to `group` on
    /// this cluster: restoring, for the partitions it changed, the snapshot
    /// taken right before it (a partition that had no commit goes back to
    /// having none).
    ///
    /// The last change is the newest one that may have changed something:
    /// `succeeded`, but also `failed` (midway) and `started` (its command
    /// died), judged partition by partition against the live offsets; one
    /// of those that left no trace is passed over. Refused (in the
    /// preview's refusals) when the group committed since, unless `force`.
    pub async fn preview_undo(
        &self,
        group: &str,
        force: bool,
        options: PlanOptions,
        origin: Origin,
    ) -> Result<Preview<OffsetChange>> {
        let change = self.undo_change(group, force, options).await?;
        Ok(Preview::new(self, change, origin))
    }

    async fn undo_change(&self, group: &str, force: bool, options: PlanOptions) -> Result<OffsetChange> {
        let actions: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        let candidates =
            store::admin::offset_changes(self.pool(), self.cluster_id(), group, &actions, UNDO_LOOKBACK).await?;
        let mut found = None;
        for rec in candidates {
            let succeeded = rec.result == AuditResult::Succeeded.as_str();
            let Some(snap) = snapshots::before_change(self.pool(), rec.id).await? else {
                if succeeded {
                    return Err(refused(format!("the snapshot taken before audit #{} is missing", rec.id)));
                }
                // It failed or died before its snapshot, so before any change.
                continue;
            };
            let planned = planned_changes(&rec)?;
            if planned.is_empty() {
                continue;
            }
            let parts: Vec<(String, i32)> = planned.iter().map(|p| (p.topic.clone(), p.partition)).collect();
            let live: BTreeMap<(String, i32), GroupOffset> = self
                .admin()
                .list_consumer_group_offsets(group, Some(&parts))
                .await?
                .into_iter()
                .map(|o| ((o.topic.clone(), o.partition), o))
                .collect();
            let was: BTreeMap<(String, i32), Option<i64>> =
                snap.offsets.iter().map(|o| ((o.topic.clone(), o.partition), o.offset)).collect();
            let metadata = format!("{RESET_METADATA_PREFIX}{}", rec.id);
            let traces: Vec<(PlannedPartition, Option<i64>, Trace)> = planned
                .into_iter()
                .map(|p| {
                    let key = (p.topic.clone(), p.partition);
                    let (now, now_meta) = live.get(&key).map_or((None, ""), |o| (o.offset, o.metadata.as_str()));
                    let t = trace(was.get(&key).copied().flatten(), p.new, now, now_meta, &metadata);
                    (p, now, t)
                })
                .collect();
            if !succeeded && traces.iter().all(|(_, _, t)| *t == Trace::Untouched) {
                tracing::info!(
                    audit_id = rec.id,
                    result = %rec.result,
                    group,
                    "An offset change that did not succeed left no trace; undo looks further back."
                );
                continue;
            }
            found = Some((rec, snap, traces));
            break;
        }
        let (rec, snap, traces) = found.ok_or_else(|| {
            refused(format!(
                "oncely has not changed the offsets of group {group} on cluster {}: nothing to undo",
                self.cluster_id()
            ))
        })?;
        let succeeded = rec.result == AuditResult::Succeeded.as_str();
        let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        let mut untouched = Vec::new();
        let mut moved = Vec::new();
        for (p, now, t) in &traces {
            match t {
                Trace::Untouched => untouched.push(format!("{}[{}]", p.topic, p.partition)),
                Trace::Changed | Trace::MovedSince => by_topic.entry(p.topic.clone()).or_default().push(p.partition),
            }
            if *t == Trace::MovedSince {
                moved.push(format!(
                    "{}[{}] {} {} and is now {}",
                    p.topic,
                    p.partition,
                    if succeeded { "was set to" } else { "was to be set to" },
                    opt_offset(p.new),
                    opt_offset(*now)
                ));
            }
        }
        if by_topic.is_empty() {
            return Err(refused(format!(
                "the partitions audit #{} changed are back where it found them: nothing to undo",
                rec.id
            )));
        }
        let req = ResetRequest {
            group: group.to_owned(),
            scope: Scope::Topics(
                by_topic.into_iter().map(|(topic, ps)| TopicSelection { topic, partitions: Some(ps) }).collect(),
            ),
            target: Target::Snapshot(snap.id),
            options,
        };
        let mut c = self.plan_change(&req, Action::Undo).await?;
        c.undoes = Some(rec.id);
        c.undoes_result = Some(rec.result.clone());
        c.target = format!(
            "undo audit #{} ({} by {}@{} at {}{}): {}",
            rec.id,
            rec.action,
            rec.os_user,
            rec.host,
            rfc3339(rec.started_at),
            if succeeded {
                String::new()
            } else {
                format!(", which ended `{}`: the partitions it changed are restored", rec.result)
            },
            c.target
        );
        if !untouched.is_empty() {
            c.target.push_str(&format!(
                "; left as they are (audit #{} did not change them): {}",
                rec.id,
                untouched.join(", ")
            ));
        }
        if !moved.is_empty() && !force {
            c.refusals.push(format!(
                "group {group} committed since audit #{}: {} (--force restores the snapshot anyway)",
                rec.id,
                moved.join(", ")
            ));
        }
        Ok(c)
    }

    /// Executes a confirmed offset change (see [`OffsetChange`]'s
    /// [`Operation`] implementation).
    async fn execute_change(&self, c: &OffsetChange, trail: &mut Trail) -> Result<Executed> {
        if c.plan.totals.changed == 0 {
            return Err(refused("nothing to change: every partition is already there"));
        }
        // One operator per group at a time: a session-level advisory lock on
        // a connection of our own, released by closing it (also on a crash).
        let mut conn = self.pool().acquire().await?.detach();
        if !store::admin::try_lock_group(&mut conn, &c.group).await? {
            let _ = sqlx::Connection::close(conn).await;
            return Err(trail
                .refuse(format!("another oncely command is changing the offsets of group {} right now", c.group))
                .await);
        }
        let result = self.execute_locked(c, trail).await;
        if let Err(e) = sqlx::Connection::close(conn).await {
            tracing::warn!(error = %e, "Closing the lock connection failed; the server releases the lock when it notices.");
        }
        result
    }

    async fn execute_locked(&self, c: &OffsetChange, trail: &mut Trail) -> Result<Executed> {
        let desc = self.describe_group(&c.group).await?;
        if !desc.is_inactive() {
            return Err(trail.refuse(group_active_reason(&desc)).await);
        }
        let parts: Vec<(String, i32)> = c.plan.partitions.iter().map(|pp| (pp.topic.clone(), pp.partition)).collect();
        let now = self.admin().list_consumer_group_offsets(&c.group, Some(&parts)).await?;
        let was: BTreeMap<(String, i32), Option<i64>> =
            c.before.iter().map(|o| ((o.topic.clone(), o.partition), o.offset)).collect();
        let moved: Vec<String> = now
            .iter()
            .filter(|n| was.get(&(n.topic.clone(), n.partition)).copied().flatten() != n.offset)
            .map(|n| format!("{}[{}]", n.topic, n.partition))
            .collect();
        if !moved.is_empty() {
            return Err(trail
                .refuse(format!(
                    "the offsets of {} moved since the preview ({}): run the command again for a fresh preview",
                    c.group,
                    moved.join(", ")
                ))
                .await);
        }

        // Recorded before anything changes.
        let audit_id = trail.start().await?;

        // The snapshot undo restores: every committed offset of the group,
        // plus the planned partitions without a commit (as `null`).
        let snapshot = async {
            let mut offsets = self.current_offsets(&c.group).await?;
            for o in &c.before {
                if !offsets.iter().any(|x| x.topic == o.topic && x.partition == o.partition) {
                    offsets.push(o.clone());
                }
            }
            snapshots::insert(
                self.pool(),
                &NewSnapshot {
                    environment: &self.env().name,
                    cluster_id: self.cluster_id(),
                    group: &c.group,
                    reason: SnapshotReason::BeforeChange,
                    audit_id: Some(audit_id),
                    offsets: &offsets,
                },
            )
            .await
        }
        .await;
        let snapshot = match snapshot {
            Ok(s) => s,
            Err(e) => {
                trail.finish_quietly(&AuditOutcome::failed(e.to_string())).await;
                return Err(e);
            }
        };

        let metadata = format!("{RESET_METADATA_PREFIX}{audit_id}");
        let alters: Vec<(String, i32, i64, String)> =
            c.plan.changes().into_iter().map(|(t, part, o)| (t, part, o, metadata.clone())).collect();
        let uncommits = c.plan.uncommits();
        let changed: Vec<(String, i32)> =
            alters.iter().map(|(t, part, _, _)| (t.clone(), *part)).chain(uncommits.iter().cloned()).collect();
        let details = json!({ "snapshot_id": snapshot.id, "metadata": metadata });
        let applied = async {
            if !alters.is_empty() {
                self.admin().alter_consumer_group_offsets(&c.group, &alters).await?;
            }
            if !uncommits.is_empty() {
                self.admin().delete_consumer_group_offsets(&c.group, &uncommits).await?;
            }
            Ok::<_, AdminError>(())
        }
        .await;
        if let Err(e) = applied {
            // Some partitions may have changed: record what the broker says now.
            let after = self.admin().list_consumer_group_offsets(&c.group, Some(&changed)).await.ok();
            let after = after.map(|a| offsets_json(&a.into_iter().map(PartitionOffset::from).collect::<Vec<_>>()));
            let (outcome, err) = if e.is_group_active() {
                let reason = format!("{e}: stop its consumers first");
                (AuditOutcome::refused(reason.clone()), Error::Refused(reason))
            } else {
                let err = Error::from(e);
                (AuditOutcome::failed(err.to_string()), err)
            };
            let mut outcome = outcome.details(details);
            outcome.after = after;
            trail.finish_quietly(&outcome).await;
            return Err(err);
        }
        let after: Vec<PartitionOffset> = match self.admin().list_consumer_group_offsets(&c.group, Some(&changed)).await
        {
            Ok(a) => a.into_iter().map(PartitionOffset::from).collect(),
            Err(e) => {
                // Changed, but we cannot read it back: say so rather than guess.
                let outcome =
                    AuditOutcome::failed(format!("offsets changed but could not be read back: {e}")).details(details);
                trail.finish_quietly(&outcome).await;
                return Err(e.into());
            }
        };
        trail.finish(&AuditOutcome::succeeded(Some(offsets_json(&after))).details(details)).await?;
        Ok(Executed { audit_id, snapshot_id: snapshot.id, metadata, after })
    }
}

impl Operation for OffsetChange {
    type Output = Executed;

    fn action(&self) -> &'static str {
        self.action.as_str()
    }

    fn confirmation_text(&self, environment: &str) -> String {
        confirmation_text(environment, &self.group)
    }

    fn refusals(&self) -> &[String] {
        &self.refusals
    }

    fn audit_entry(&self, entry: AuditEntry) -> AuditEntry {
        let plan: Vec<Value> = self
            .plan
            .partitions
            .iter()
            .map(|pp| json!({"topic": pp.topic, "partition": pp.partition, "current": pp.current, "new": pp.new}))
            .collect();
        entry.group(&self.group).before(offsets_json(&self.before)).details(json!({
            "target": self.target,
            "source_snapshot": self.source_snapshot.as_ref().map(|s| s.id),
            "undoes": self.undoes,
            "oncely_consumer": self.oncely.consumer,
            "totals": self.plan.totals,
            "oldest_replayed_ms": self.oldest_replayed_ms,
            "max_replay": self.options.max_replay,
            "allow_clamp": self.options.allow_clamp,
            "plan": plan,
        }))
    }

    /// The execution: refused (recorded) when another oncely command is
    /// changing the same group, when the group has members, or when its
    /// offsets moved since the preview. Then: audit record (`started`),
    /// snapshot of the group, the change (AlterConsumerGroupOffsets with
    /// metadata `oncely:reset:<audit id>`, DeleteConsumerGroupOffsets for
    /// partitions that go back to no commit), audit outcome with the offsets
    /// after.
    fn run<'a>(
        &'a self,
        session: &'a Session,
        trail: &'a mut Trail,
    ) -> impl std::future::Future<Output = Result<Executed>> + Send + 'a {
        session.execute_change(self, trail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::admin::Member;

    #[test]
    fn a_past_change_is_judged_by_what_it_wrote_and_what_it_found() {
        let m = "oncely:reset:7";
        // It wrote 0 with its metadata: changed.
        assert_eq!(trace(Some(40), Some(0), Some(0), m, m), Trace::Changed);
        // It removed a commit (an undo of a partition that had none): changed.
        assert_eq!(trace(Some(3), None, None, "", m), Trace::Changed);
        // Still where the snapshot found it (it failed before this partition): untouched.
        assert_eq!(trace(Some(40), Some(0), Some(40), "oncely:consumer", m), Trace::Untouched);
        assert_eq!(trace(None, Some(0), None, "", m), Trace::Untouched);
        // Someone committed since: moved, even at the offset it wrote.
        assert_eq!(trace(Some(40), Some(0), Some(3), "", m), Trace::MovedSince);
        assert_eq!(trace(Some(40), Some(0), Some(0), "oncely:consumer", m), Trace::MovedSince);
        assert_eq!(trace(None, Some(0), Some(5), "", m), Trace::MovedSince);
    }

    #[test]
    fn a_recorded_plan_yields_only_the_partitions_it_meant_to_change() {
        let rec = AuditRecord {
            id: 7,
            started_at: Utc::now(),
            finished_at: None,
            os_user: "u".into(),
            host: "h".into(),
            environment: "e".into(),
            cluster_id: Some("c".into()),
            command_line: "oncely offsets reset".into(),
            action: "offsets.reset".into(),
            group: Some("g".into()),
            before: None,
            after: None,
            details: json!({"plan": [
                {"topic": "t", "partition": 0, "current": 5, "new": 0},
                {"topic": "t", "partition": 1, "current": 0, "new": 0},
                {"topic": "t", "partition": 2, "current": null, "new": 0},
                {"topic": "t", "partition": 3, "current": 4, "new": null},
            ]}),
            result: "started".into(),
            error: None,
        };
        let p: Vec<(i32, Option<i64>)> =
            planned_changes(&rec).expect("plan").into_iter().map(|p| (p.partition, p.new)).collect();
        assert_eq!(p, vec![(0, Some(0)), (2, Some(0)), (3, None)]);
        let bad = AuditRecord { details: json!({}), ..rec };
        assert!(matches!(planned_changes(&bad), Err(Error::Refused(m)) if m.contains("audit #7 has no usable plan")));
    }

    #[test]
    fn confirmation_names_environment_and_group() {
        assert_eq!(confirmation_text("prod", "payments-webhook-processor"), "RESET prod payments-webhook-processor");
    }

    #[test]
    fn an_active_group_refusal_names_its_members() {
        let d = GroupDescription {
            group_id: "g".into(),
            state: "Stable".into(),
            group_type: "Classic".into(),
            protocol_type: "consumer".into(),
            is_simple: false,
            partition_assignor: "range".into(),
            members: vec![Member {
                member_id: "m".into(),
                group_instance_id: None,
                client_id: "webhooks-1".into(),
                host: "/10.1.2.3".into(),
                assignment: vec![],
            }],
            coordinator: None,
        };
        let r = group_active_reason(&d);
        assert!(r.contains("group g is active (state Stable, 1 member(s): webhooks-1@10.1.2.3)"), "{r}");
    }

    #[test]
    fn targets_describe_themselves() {
        assert_eq!(describe_target(&Target::ShiftBy(-5), None), "shift by -5");
        assert_eq!(
            describe_target(&Target::ByDuration(Duration::from_secs(3600)), None),
            "first offset at or after 1h00m ago"
        );
        assert!(Target::Snapshot(1).names_partitions());
        assert!(!Target::Earliest.names_partitions());
        assert_eq!(Action::Undo.as_str(), "offsets.undo");
    }

    /// Partition `t`/0 from committed offset 9 back to the earliest, 0.
    fn rewind_of_nine() -> Plan {
        plan(
            &[(
                PartitionState { topic: "t".into(), partition: 0, current: Some(9), log_start: 0, log_end: 9 },
                Requested::Earliest,
            )],
            PlanOptions::default(),
        )
        .expect("plan")
    }

    #[test]
    fn the_meaning_says_whether_duplicates_are_suppressed() {
        let p = rewind_of_nine();
        let now = 1_800_000_000_000;
        assert!(
            oncely_meaning(true, "g", &p, Some(8), now).contains("9 re-delivered record(s) are dropped as duplicates")
        );
        assert!(oncely_meaning(false, "g", &p, Some(8), now).contains("NOT an oncely consumer"));
    }

    #[test]
    fn a_replay_older_than_the_inbox_retention_does_not_promise_that_nothing_runs_twice() {
        let mut p = rewind_of_nine();
        let now = 1_800_000_000_000;
        let day = 86_400_000;
        p.partitions[0].first_replayed_ms = Some(now - 10 * day);
        let m = oncely_meaning(true, "g", &p, Some(8), now);
        assert!(m.contains("WOULD BE APPLIED AGAIN"), "{m}");
        assert!(!m.contains("no handler runs twice"), "{m}");
        p.partitions[0].first_replayed_ms = Some(now - 7 * day);
        let m = oncely_meaning(true, "g", &p, Some(8), now);
        assert!(m.contains("no handler runs twice"), "{m}");
    }
}
