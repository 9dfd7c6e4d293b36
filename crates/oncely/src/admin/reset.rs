//! Offset resets, restores and undo: always a [`Preview`] first (what moves
//! where, what is re-delivered or skipped, how old the oldest replayed record
//! is, whether an oncely inbox protects the group), then, only on request,
//! the guarded [`Session::execute`]: inactive group, offsets unchanged since
//! the preview, one operator at a time, the audit record and a snapshot
//! written before anything changes, commit metadata `oncely:reset:<audit id>`.
//!
//! ```no_run
//! # async fn run(env: oncely::config::Environment) -> oncely::Result<()> {
//! use oncely::admin::plan::PlanOptions;
//! use oncely::admin::reset::{Action, ResetRequest, Scope, Target};
//! use oncely::admin::session::Session;
//!
//! let session = Session::open(env).await?; // refuses a wrong cluster
//! let req = ResetRequest {
//!     group: "payment-service".into(),
//!     scope: Scope::AllTopics,
//!     target: Target::Earliest,
//!     options: PlanOptions { allow_clamp: false, max_replay: Some(10_000) },
//! };
//! let preview = session.preview_reset(&req, Action::Reset).await?;
//! println!("{} records would be re-delivered", preview.plan.totals.redelivered);
//! if preview.refusals.is_empty() {
//!     let done = session.execute(&preview).await?;
//!     println!("audit #{}, snapshot #{}", done.audit_id, done.snapshot_id);
//! }
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use crate::admin::audit::{self, AuditEntry, AuditOutcome};
use crate::admin::kafka::{AdminError, ErrorCode, GroupDescription, OffsetSpec};
use crate::admin::parse::{format_duration, FileOffset, TopicSelection};
use crate::admin::plan::{plan, PartitionState, Plan, PlanOptions, Requested};
use crate::admin::records::first_record_timestamps;
use crate::admin::session::{MemberInfo, Session};
use crate::admin::snapshots::{self, NewSnapshot, PartitionOffset, Snapshot, SnapshotReason};
use crate::consumer::RESET_METADATA_PREFIX;
use crate::error::{Error, Result};
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
    /// The offsets of a stored snapshot.
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

/// Everything an operator sees before an offset change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preview {
    /// Reset, restore or undo.
    pub action: Action,
    /// Environment.
    pub environment: String,
    /// Whether the environment is protected.
    pub protected: bool,
    /// Live cluster id (checked).
    pub cluster_id: String,
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
    /// The plan.
    pub plan: Plan,
    /// Timestamp (ms) of the oldest record that will be re-delivered, read
    /// from the records themselves.
    pub oldest_replayed_ms: Option<i64>,
    /// The oncely view of the group.
    pub oncely: OncelyInfo,
    /// Why `execute` would refuse (empty: it would go ahead, after the
    /// confirmation on a protected environment).
    pub refusals: Vec<String>,
    /// The confirmation text a protected environment requires.
    pub confirmation: Option<String>,
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
        Target::Datetime(at) => format!("first offset at or after {}", rfc3339(*at)),
        Target::ByDuration(d) => format!("first offset at or after {} ago", format_duration(*d)),
        Target::FromFile { path, offsets } => format!("{} offset(s) from file {path}", offsets.len()),
        Target::Snapshot(_) | Target::SnapshotAt(_) => match snapshot {
            Some(s) => format!("snapshot #{} ({}, taken {})", s.id, s.reason, rfc3339(s.taken_at)),
            None => "snapshot".into(),
        },
    }
}

fn oncely_meaning(consumer: bool, group: &str, plan: &Plan) -> String {
    let (replay, skip) = (plan.totals.redelivered, plan.totals.skipped);
    let skipped = if skip > 0 {
        format!(" The {skip} skipped record(s) will never be processed by this group.")
    } else {
        String::new()
    };
    if consumer {
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

    /// Previews `req`: nothing is changed.
    pub async fn preview_reset(&self, req: &ResetRequest, action: Action) -> Result<Preview> {
        let group = req.group.as_str();
        let desc = self.describe_group(group).await?;

        // Offsets the target names itself (file, snapshot).
        let mut snapshot = None;
        let explicit: Option<BTreeMap<(String, i32), i64>> = match &req.target {
            Target::Snapshot(id) => {
                let s = snapshots::get(self.pool(), *id)
                    .await?
                    .ok_or_else(|| refused(format!("there is no snapshot #{id}")))?;
                if s.group != group {
                    return Err(refused(format!("snapshot #{id} is of group {}, not {group}", s.group)));
                }
                let m = s.committed();
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
                let m = s.committed();
                snapshot = Some(s);
                Some(m)
            }
            Target::FromFile { offsets, .. } => {
                Some(offsets.iter().map(|f| ((f.topic.clone(), f.partition), f.offset)).collect())
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
                (_, Some(m), _) => Requested::Offset(m[key]),
                (_, _, Some(t)) => match t.get(key).copied().flatten() {
                    Some(o) => Requested::Offset(o),
                    None => Requested::Latest,
                },
                (Target::Earliest, ..) => Requested::Earliest,
                (Target::Latest, ..) => Requested::Latest,
                (Target::Offset(o), ..) => Requested::Offset(*o),
                (Target::ShiftBy(n), ..) => Requested::ShiftBy(*n),
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
            .map(|p| (p.topic.clone(), p.partition, p.new))
            .collect();
        let ts =
            first_record_timestamps(&self.env().config.bootstrap_servers, &replayed, Duration::from_secs(10)).await?;
        for p in &mut plan.partitions {
            p.first_replayed_ms = ts.get(&(p.topic.clone(), p.partition)).copied();
        }

        let oncely = self.oncely_group(group).await?;
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
        Ok(Preview {
            action,
            environment: self.env().name.clone(),
            protected: self.env().config.protected,
            cluster_id: self.cluster_id().to_owned(),
            group: group.to_owned(),
            group_state: desc.state.clone(),
            members: desc.members.iter().map(MemberInfo::from).collect(),
            target: describe_target(&req.target, snapshot.as_ref()),
            source_snapshot: snapshot.map(|s| SnapshotRef { id: s.id, taken_at: s.taken_at, reason: s.reason }),
            undoes: None,
            oldest_replayed_ms: plan.oldest_replayed_ms(),
            oncely: OncelyInfo {
                consumer: oncely.consumer,
                meaning: oncely_meaning(oncely.consumer, group, &plan),
                db_offsets,
            },
            plan,
            refusals,
            confirmation: self.env().config.protected.then(|| confirmation_text(&self.env().name, group)),
            before,
            options: req.options,
        })
    }

    /// Previews restoring snapshot `id` (to its own group), optionally only
    /// some topics.
    pub async fn preview_restore(
        &self,
        id: i64,
        topics: Option<Vec<TopicSelection>>,
        options: PlanOptions,
    ) -> Result<Preview> {
        let s = snapshots::get(self.pool(), id).await?.ok_or_else(|| refused(format!("there is no snapshot #{id}")))?;
        let req = ResetRequest {
            group: s.group,
            scope: topics.map_or(Scope::FromTarget, Scope::Topics),
            target: Target::Snapshot(id),
            options,
        };
        self.preview_reset(&req, Action::Restore).await
    }

    /// Previews undoing the last offset change oncely made to `group` on
    /// this cluster: restoring, for the partitions it changed, the snapshot
    /// taken right before it. Refused (in [`Preview::refusals`]) when the
    /// group committed since, unless `force`.
    pub async fn preview_undo(&self, group: &str, force: bool, options: PlanOptions) -> Result<Preview> {
        let actions: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        let last = store::admin::last_succeeded_action(self.pool(), self.cluster_id(), group, &actions)
            .await?
            .ok_or_else(|| {
                refused(format!(
                    "oncely has not changed the offsets of group {group} on cluster {}: nothing to undo",
                    self.cluster_id()
                ))
            })?;
        let snap = snapshots::before_change(self.pool(), last.id)
            .await?
            .ok_or_else(|| refused(format!("the snapshot taken before audit #{} is missing", last.id)))?;
        let after: Vec<PartitionOffset> = serde_json::from_value(last.after.clone().unwrap_or(Value::Null))
            .map_err(|e| refused(format!("audit #{} has no usable `after` offsets: {e}", last.id)))?;
        let restorable = snap.committed();
        let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        let mut unrestorable = Vec::new();
        for a in &after {
            if restorable.contains_key(&(a.topic.clone(), a.partition)) {
                by_topic.entry(a.topic.clone()).or_default().push(a.partition);
            } else {
                unrestorable.push(format!("{}[{}]", a.topic, a.partition));
            }
        }
        if by_topic.is_empty() {
            return Err(refused(format!(
                "audit #{} changed only partitions that had no committed offset before: nothing to restore",
                last.id
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
        let mut p = self.preview_reset(&req, Action::Undo).await?;
        p.undoes = Some(last.id);
        p.target = format!(
            "undo audit #{} ({} by {}@{} at {}): {}",
            last.id,
            last.action,
            last.os_user,
            last.host,
            rfc3339(last.started_at),
            p.target
        );
        if !unrestorable.is_empty() {
            p.target.push_str(&format!("; left as they are (no committed offset before): {}", unrestorable.join(", ")));
        }
        let now: BTreeMap<(String, i32), Option<i64>> =
            p.before.iter().map(|o| ((o.topic.clone(), o.partition), o.offset)).collect();
        let moved: Vec<String> = after
            .iter()
            .filter_map(|a| {
                let n = now.get(&(a.topic.clone(), a.partition)).copied().flatten();
                (n != a.offset && now.contains_key(&(a.topic.clone(), a.partition))).then(|| {
                    format!(
                        "{}[{}] was set to {} and is now {}",
                        a.topic,
                        a.partition,
                        a.offset.map_or("-".into(), |o| o.to_string()),
                        n.map_or("-".into(), |o| o.to_string())
                    )
                })
            })
            .collect();
        if !moved.is_empty() && !force {
            p.refusals.push(format!(
                "group {group} committed since audit #{}: {} (--force restores the snapshot anyway)",
                last.id,
                moved.join(", ")
            ));
        }
        Ok(p)
    }

    fn audit_entry(&self, p: &Preview) -> AuditEntry {
        let plan: Vec<Value> = p
            .plan
            .partitions
            .iter()
            .map(|pp| json!({"topic": pp.topic, "partition": pp.partition, "current": pp.current, "new": pp.new}))
            .collect();
        AuditEntry::new(&self.env().name, p.action.as_str())
            .cluster_id(self.cluster_id())
            .group(&p.group)
            .before(offsets_json(&p.before))
            .details(json!({
                "target": p.target,
                "source_snapshot": p.source_snapshot.as_ref().map(|s| s.id),
                "undoes": p.undoes,
                "protected": p.protected,
                "oncely_consumer": p.oncely.consumer,
                "totals": p.plan.totals,
                "oldest_replayed_ms": p.oldest_replayed_ms,
                "max_replay": p.options.max_replay,
                "allow_clamp": p.options.allow_clamp,
                "plan": plan,
            }))
    }

    /// Records in the audit log that the change previewed in `p` was
    /// attempted and refused for `reason`; returns the audit id.
    pub async fn record_refusal(&self, p: &Preview, reason: &str) -> Result<i64> {
        audit::record_refused(self.pool(), &self.audit_entry(p), reason).await
    }

    /// Records the refusal (best effort: the refusal stands even if the
    /// database cannot record it) and returns it as the error.
    async fn refuse(&self, p: &Preview, reason: String) -> Error {
        if let Err(e) = self.record_refusal(p, &reason).await {
            tracing::warn!(error = %e, "Could not record the refusal in the audit log.");
        }
        Error::Refused(reason)
    }

    /// Executes a previewed change. Refuses (recording the refusal) when the
    /// preview has refusals, when another oncely command is changing the same
    /// group, when the group has members, or when its offsets moved since the
    /// preview. Then: audit record (`started`), snapshot of the group, the
    /// change with metadata `oncely:reset:<audit id>`, audit outcome.
    ///
    /// The typed confirmation of protected environments is the caller's
    /// (it needs a terminal); see [`confirmation_text`].
    pub async fn execute(&self, p: &Preview) -> Result<Executed> {
        if p.cluster_id != self.cluster_id() {
            return Err(refused("the preview was made on another cluster"));
        }
        if !p.refusals.is_empty() {
            return Err(self.refuse(p, p.refusals.join("; ")).await);
        }
        if p.plan.totals.changed == 0 {
            return Err(refused("nothing to change: every partition is already there"));
        }
        // One operator per group at a time: a session-level advisory lock on
        // a connection of our own, released by closing it (also on a crash).
        let mut conn = self.pool().acquire().await?.detach();
        if !store::admin::try_lock_group(&mut conn, &p.group).await? {
            let _ = sqlx::Connection::close(conn).await;
            return Err(self
                .refuse(p, format!("another oncely command is changing the offsets of group {} right now", p.group))
                .await);
        }
        let result = self.execute_locked(p).await;
        if let Err(e) = sqlx::Connection::close(conn).await {
            tracing::warn!(error = %e, "Closing the lock connection failed; the server releases the lock when it notices.");
        }
        result
    }

    async fn execute_locked(&self, p: &Preview) -> Result<Executed> {
        let desc = self.describe_group(&p.group).await?;
        if !desc.is_inactive() {
            return Err(self.refuse(p, group_active_reason(&desc)).await);
        }
        let parts: Vec<(String, i32)> = p.plan.partitions.iter().map(|pp| (pp.topic.clone(), pp.partition)).collect();
        let now = self.admin().list_consumer_group_offsets(&p.group, Some(&parts)).await?;
        let was: BTreeMap<(String, i32), Option<i64>> =
            p.before.iter().map(|o| ((o.topic.clone(), o.partition), o.offset)).collect();
        let moved: Vec<String> = now
            .iter()
            .filter(|n| was.get(&(n.topic.clone(), n.partition)).copied().flatten() != n.offset)
            .map(|n| format!("{}[{}]", n.topic, n.partition))
            .collect();
        if !moved.is_empty() {
            return Err(self
                .refuse(
                    p,
                    format!(
                        "the offsets of {} moved since the preview ({}): run the command again for a fresh preview",
                        p.group,
                        moved.join(", ")
                    ),
                )
                .await);
        }

        let entry = self.audit_entry(p);
        let audit_id = audit::record_start(self.pool(), &entry).await?;
        let fail = |e: &Error| AuditOutcome::failed(e.to_string());

        // The snapshot undo restores: every committed offset of the group,
        // plus the planned partitions without a commit (as `null`).
        let snapshot = async {
            let mut offsets = self.current_offsets(&p.group).await?;
            for o in &p.before {
                if !offsets.iter().any(|x| x.topic == o.topic && x.partition == o.partition) {
                    offsets.push(o.clone());
                }
            }
            snapshots::insert(
                self.pool(),
                &NewSnapshot {
                    environment: &self.env().name,
                    cluster_id: self.cluster_id(),
                    group: &p.group,
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
                let _ = audit::record_result(self.pool(), audit_id, &fail(&e)).await;
                return Err(e);
            }
        };

        let metadata = format!("{RESET_METADATA_PREFIX}{audit_id}");
        let changes: Vec<(String, i32, i64, String)> =
            p.plan.changes().into_iter().map(|(t, part, o)| (t, part, o, metadata.clone())).collect();
        let changed: Vec<(String, i32)> = changes.iter().map(|(t, part, _, _)| (t.clone(), *part)).collect();
        let details = json!({ "snapshot_id": snapshot.id, "metadata": metadata });
        if let Err(e) = self.admin().alter_consumer_group_offsets(&p.group, &changes).await {
            let after = self.admin().list_consumer_group_offsets(&p.group, Some(&changed)).await.ok();
            let after = after.map(|a| offsets_json(&a.into_iter().map(PartitionOffset::from).collect::<Vec<_>>()));
            let (outcome, err) = if e.is_group_active() {
                let reason = format!("{e}: stop its consumers first");
                (AuditOutcome::refused(reason.clone()), Error::Refused(reason))
            } else {
                let err = Error::from(e);
                (fail(&err), err)
            };
            let mut outcome = outcome.details(details);
            outcome.after = after;
            if let Err(db) = audit::record_result(self.pool(), audit_id, &outcome).await {
                tracing::warn!(error = %db, audit_id, "Could not record the outcome in the audit log.");
            }
            return Err(err);
        }
        let after: Vec<PartitionOffset> = match self.admin().list_consumer_group_offsets(&p.group, Some(&changed)).await
        {
            Ok(a) => a.into_iter().map(PartitionOffset::from).collect(),
            Err(e) => {
                // Changed, but we cannot read it back: say so rather than guess.
                let outcome =
                    AuditOutcome::failed(format!("offsets changed but could not be read back: {e}")).details(details);
                let _ = audit::record_result(self.pool(), audit_id, &outcome).await;
                return Err(e.into());
            }
        };
        audit::record_result(
            self.pool(),
            audit_id,
            &AuditOutcome::succeeded(Some(offsets_json(&after))).details(details),
        )
        .await?;
        Ok(Executed { audit_id, snapshot_id: snapshot.id, metadata, after })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::kafka::Member;

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

    #[test]
    fn the_meaning_says_whether_duplicates_are_suppressed() {
        let p = plan(
            &[(
                PartitionState { topic: "t".into(), partition: 0, current: Some(9), log_start: 0, log_end: 9 },
                Requested::Earliest,
            )],
            PlanOptions::default(),
        )
        .expect("plan");
        assert!(oncely_meaning(true, "g", &p).contains("9 re-delivered record(s) are dropped as duplicates"));
        assert!(oncely_meaning(false, "g", &p).contains("NOT an oncely consumer"));
    }
}
