//! `oncely offsets | lag | watch | audit`: the operator's offset tools.
//! Parsing and printing only; the logic is `oncely::admin`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{ArgGroup, Args, Subcommand};
use oncely::admin::audit::{self, AuditFilter};
use oncely::admin::lag::{GroupLag, LagHistory, LagOptions};
use oncely::admin::ops::{Origin, Preview};
use oncely::admin::parse::{
    format_duration, format_ms, parse_datetime, parse_duration, parse_offsets_csv, parse_topic_selection,
    TopicSelection,
};
use oncely::admin::plan::PlanOptions;
use oncely::admin::reset::{Action, Executed, OffsetChange, ResetRequest, Scope, Target};
use oncely::admin::session::Session;
use oncely::admin::snapshots::{self, Snapshot, SnapshotReason};
use serde::Serialize;

use crate::common::{self, json, opt, print_json, refused, Table};
use crate::Cli;

const RESET_HELP: &str = "\
Dry run by default: prints, per partition and in total, current -> new, the records that
will be re-delivered or skipped, the oldest record replayed, and whether the group is an
oncely consumer (whose inbox suppresses duplicates). --execute applies it, only if the group
has no active members; on a protected environment it asks for `RESET <ENV> <GROUP>` (no
terminal: pass it with --confirm). The audit record and a snapshot are written first; the
commit carries metadata oncely:reset:<audit id>. Undo with `oncely offsets undo -g GROUP`.
Exit codes: 0 done (or a dry run that could be executed), 2 refused (also a dry run whose
--execute would be refused, e.g. the group is active), 1 failed.

Examples:
  oncely offsets reset -g payments -t orders --to-earliest
  oncely offsets reset -g payments -t orders:0,2 --shift-by -100 --execute
  oncely offsets reset -g payments --all-topics --to-datetime 2026-03-21T02:44:00Z --max-replay 5000 --execute
  oncely offsets reset -g payments -t orders --by-duration PT1H
  oncely offsets reset -g payments --from-file plan.csv          # topic,partition,offset per line
  oncely offsets reset -g payments --all-topics --to-current --export > plan.csv   # Kafka's CSV
  oncely offsets reset -g payments --to-snapshot-at 2026-03-21T02:44:00+01:00
  oncely --env prod offsets reset -g payments -t orders --to-latest --execute --confirm 'RESET prod payments'";

const OFFSETS_HELP: &str = "\
Examples:
  oncely offsets show -g payments
  oncely offsets snapshot -g payments
  oncely offsets snapshots -g payments
  oncely offsets restore 42 --execute
  oncely offsets undo -g payments --execute";

/// `oncely offsets ...`
#[derive(Debug, Subcommand)]
#[command(after_help = OFFSETS_HELP)]
pub(crate) enum OffsetsCmd {
    /// Per partition: committed offset, oncely database offset, log start/end, lag, commit metadata;
    /// the group's state and members.
    #[command(after_help = "Example:\n  oncely offsets show -g payments\n  oncely -o json offsets show -g payments")]
    Show {
        /// Consumer group.
        #[arg(short = 'g', long)]
        group: String,
    },
    /// Move a group's committed offsets (a dry run unless --execute).
    #[command(after_help = RESET_HELP)]
    Reset(ResetArgs),
    /// Record groups' committed offsets now (oncely.offset_snapshots).
    #[command(after_help = "Examples:\n  oncely offsets snapshot -g payments\n  oncely offsets snapshot --all-groups")]
    Snapshot(SnapshotArgs),
    /// List snapshots, newest first.
    #[command(
        after_help = "Examples:\n  oncely offsets snapshots -g payments\n  oncely -o json offsets snapshots --limit 5"
    )]
    Snapshots {
        /// Only this group.
        #[arg(short = 'g', long)]
        group: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Move a group back to a snapshot (a dry run unless --execute).
    #[command(after_help = "Examples:\n  oncely offsets restore 42\n  oncely offsets restore 42 -t orders --execute")]
    Restore(RestoreArgs),
    /// Undo the last offset change oncely made to a group (a dry run unless --execute): restores the
    /// snapshot taken right before it, refusing if the group committed since (unless --force).
    #[command(
        after_help = "Examples:\n  oncely offsets undo -g payments\n  oncely offsets undo -g payments --execute"
    )]
    Undo(UndoArgs),
}

/// Options of every offset change.
#[derive(Debug, Args)]
pub(crate) struct ExecArgs {
    /// Apply the change. Without it nothing changes (dry run).
    #[arg(long, id = "execute")]
    execute: bool,
    /// The typed confirmation of a protected environment, for when there is no terminal:
    /// exactly `RESET <ENV> <GROUP>`.
    #[arg(long, value_name = "TEXT")]
    confirm: Option<String>,
    /// Refuse if more than N records in total would be re-delivered.
    #[arg(long, value_name = "N")]
    max_replay: Option<u64>,
    /// Move targets outside the log to the nearest valid offset instead of refusing.
    #[arg(long)]
    allow_clamp: bool,
}

impl ExecArgs {
    fn options(&self) -> PlanOptions {
        PlanOptions { allow_clamp: self.allow_clamp, max_replay: self.max_replay }
    }
}

/// `oncely offsets reset`
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args([
    "to_earliest", "to_latest", "to_current", "to_offset", "shift_by", "to_datetime", "by_duration", "from_file",
    "to_snapshot", "to_snapshot_at",
])))]
#[command(group(ArgGroup::new("scope").args(["topic", "all_topics"])))]
pub(crate) struct ResetArgs {
    /// Consumer group.
    #[arg(short = 'g', long)]
    group: String,
    /// Topic, optionally with partitions: `orders`, `orders:0,2`, `orders:0-3`. Repeatable.
    #[arg(short = 't', long = "topic", value_name = "TOPIC[:PARTITIONS]", value_parser = parse_topic_selection)]
    topic: Vec<TopicSelection>,
    /// Every topic the group has committed offsets for.
    #[arg(long)]
    all_topics: bool,
    /// To the log start.
    #[arg(long)]
    to_earliest: bool,
    /// To the log end.
    #[arg(long)]
    to_latest: bool,
    /// To where the group is: its committed offsets, the log end where it has none (as
    /// kafka-consumer-groups does; with --export, a plan file of where the group is now).
    #[arg(long)]
    to_current: bool,
    /// To this offset.
    #[arg(long, value_name = "N")]
    to_offset: Option<i64>,
    /// By N from the committed offset (negative: back).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    shift_by: Option<i64>,
    /// To the first record at or after this time; the zone is required (2026-03-21T02:44:00Z).
    #[arg(long, value_name = "TIME", value_parser = parse_datetime)]
    to_datetime: Option<DateTime<Utc>>,
    /// To the first record at or after now minus this (PT1H, 1h30m, 15m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    by_duration: Option<Duration>,
    /// To the offsets in a CSV file: topic,partition,offset per line (as kafka-consumer-groups exports).
    #[arg(long, value_name = "FILE")]
    from_file: Option<PathBuf>,
    /// To the offsets of a snapshot (`oncely offsets snapshots`).
    #[arg(long, value_name = "ID")]
    to_snapshot: Option<i64>,
    /// To the last snapshot taken at or before this time (zone required).
    #[arg(long, value_name = "TIME", value_parser = parse_datetime)]
    to_snapshot_at: Option<DateTime<Utc>>,
    /// Print the planned offsets as kafka-consumer-groups --export does (CSV: topic,partition,offset
    /// per line, which --from-file reads back) instead of the preview; a dry run.
    #[arg(long, conflicts_with = "execute")]
    export: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

/// `oncely offsets snapshot`
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["groups", "all_groups"])))]
pub(crate) struct SnapshotArgs {
    /// Consumer group. Repeatable.
    #[arg(short = 'g', long = "group")]
    groups: Vec<String>,
    /// Every consumer group of the cluster.
    #[arg(long)]
    all_groups: bool,
}

/// `oncely offsets restore`
#[derive(Debug, Args)]
pub(crate) struct RestoreArgs {
    /// Snapshot id (`oncely offsets snapshots`).
    id: i64,
    /// Only these topics (`orders`, `orders:0,2`). Repeatable.
    #[arg(short = 't', long = "topic", value_name = "TOPIC[:PARTITIONS]", value_parser = parse_topic_selection)]
    topic: Vec<TopicSelection>,
    #[command(flatten)]
    exec: ExecArgs,
}

/// `oncely offsets undo`
#[derive(Debug, Args)]
pub(crate) struct UndoArgs {
    /// Consumer group.
    #[arg(short = 'g', long)]
    group: String,
    /// Restore even if the group committed since the change.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    exec: ExecArgs,
}

/// `oncely lag`
#[derive(Debug, Args)]
#[command(after_help = "\
Statuses (Burrow's rules over a window of `oncely watch` snapshots plus the live values):
  OK      keeping up          WARN   moving, lag not decreasing
  STALL   owned, not moving   STOP   lagging and nobody consumes it
  REWIND  the committed offset went backwards (shown even when the lag is 0 again)

Examples:
  oncely lag
  oncely lag -g payments
  oncely lag -g payments --watch --refresh 5s")]
pub(crate) struct LagArgs {
    /// Consumer group (default: every group). Repeatable.
    #[arg(short = 'g', long = "group")]
    groups: Vec<String>,
    /// Refresh until interrupted; live values are kept between refreshes.
    #[arg(long)]
    watch: bool,
    /// Refresh interval of --watch.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    refresh: Duration,
    /// Only snapshots this recent are in the window.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    window: Duration,
    /// At most this many snapshots in the window.
    #[arg(long, default_value_t = 10)]
    samples: usize,
}

/// `oncely watch`
#[derive(Debug, Args)]
#[command(after_help = "\
Records every group's committed offsets (and log ends) into oncely.offset_snapshots, so that
`oncely offsets reset --to-snapshot-at TIME` and `oncely lag` have history.

Examples:
  oncely watch
  oncely watch --interval 10s -g payments
  oncely watch --once")]
pub(crate) struct WatchArgs {
    /// Time between rounds.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    interval: Duration,
    /// One round, then exit.
    #[arg(long)]
    once: bool,
    /// Only these groups (default: every group). Repeatable.
    #[arg(short = 'g', long = "group")]
    groups: Vec<String>,
    /// Delete `watch` snapshots older than this (manual ones and those taken before changes stay).
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    retain: Duration,
}

/// `oncely audit`
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  oncely audit --since 24h
  oncely audit --since 2026-03-21T02:00:00Z -g payments
  oncely -o json audit --action offsets")]
pub(crate) struct AuditArgs {
    /// From this time (zone required) or this long ago (24h, PT30M).
    #[arg(long, value_name = "TIME|DURATION", value_parser = parse_since)]
    since: Option<DateTime<Utc>>,
    /// Only this group.
    #[arg(short = 'g', long)]
    group: Option<String>,
    /// Only this action (`offsets.reset`) or family (`offsets`).
    #[arg(long)]
    action: Option<String>,
    /// At most this many (the newest).
    #[arg(long, default_value_t = 100)]
    limit: i64,
}

pub(crate) fn parse_since(s: &str) -> Result<DateTime<Utc>, String> {
    match parse_datetime(s) {
        Ok(t) => Ok(t),
        Err(time_err) => match parse_duration(s) {
            Ok(d) => Ok(Utc::now() - chrono::Duration::from_std(d).map_err(|e| e.to_string())?),
            Err(_) => Err(time_err),
        },
    }
}

pub(crate) async fn run(cli: &Cli, cmd: &OffsetsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        OffsetsCmd::Show { group } => show(cli, group).await,
        OffsetsCmd::Reset(a) => reset(cli, a).await,
        OffsetsCmd::Snapshot(a) => snapshot(cli, a).await,
        OffsetsCmd::Snapshots { group, limit } => list_snapshots(cli, group.as_deref(), *limit).await,
        OffsetsCmd::Restore(a) => {
            let s = common::session(cli).await?;
            s.require_operator_schema().await?;
            let topics = (!a.topic.is_empty()).then(|| a.topic.clone());
            let p = s.preview_restore(a.id, topics, a.exec.options(), Origin::cli()).await?;
            change(cli, &s, p, &a.exec).await
        }
        OffsetsCmd::Undo(a) => {
            let s = common::session(cli).await?;
            s.require_operator_schema().await?;
            let p = s.preview_undo(&a.group, a.force, a.exec.options(), Origin::cli()).await?;
            change(cli, &s, p, &a.exec).await
        }
    }
}

async fn show(cli: &Cli, group: &str) -> anyhow::Result<ExitCode> {
    let s = common::session(cli).await?;
    let g = s.show(group).await?;
    if json(cli) {
        print_json(&g)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "group {}  state {}  type {}  oncely consumer: {}",
        g.group,
        g.state,
        g.group_type,
        if g.oncely_consumer { "yes" } else { "no" }
    );
    if g.members.is_empty() {
        println!("members: none");
    }
    for m in &g.members {
        let a: Vec<String> = m.assignment.iter().map(|(t, p)| format!("{t}[{p}]")).collect();
        println!("member {}@{} ({}): {}", m.client_id, m.host, m.member_id, a.join(" "));
    }
    let mut t = Table::new(&[
        "TOPIC",
        "PARTITION",
        "COMMITTED",
        "ONCELY-DB",
        "LOG-START",
        "LOG-END",
        "LAG",
        "MOVED-BY",
        "METADATA",
        "OWNER",
    ]);
    for p in &g.partitions {
        t.row(vec![
            p.topic.clone(),
            p.partition.to_string(),
            opt(p.committed),
            opt(p.db_offset),
            opt(p.log_start),
            opt(p.log_end),
            opt(p.lag),
            p.moved_by.clone().unwrap_or_else(|| if p.committed.is_some() { "other".into() } else { "-".into() }),
            if p.metadata.is_empty() { "-".into() } else { p.metadata.clone() },
            opt(p.owner.clone()),
        ]);
    }
    t.print();
    if !g.missing_topics.is_empty() {
        println!("topics not on this cluster any more: {}", g.missing_topics.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

fn reset_request(a: &ResetArgs) -> anyhow::Result<ResetRequest> {
    let target = if a.to_earliest {
        Target::Earliest
    } else if a.to_latest {
        Target::Latest
    } else if a.to_current {
        Target::Current
    } else if let Some(o) = a.to_offset {
        Target::Offset(o)
    } else if let Some(n) = a.shift_by {
        Target::ShiftBy(n)
    } else if let Some(t) = a.to_datetime {
        Target::Datetime(t)
    } else if let Some(d) = a.by_duration {
        Target::ByDuration(d)
    } else if let Some(path) = &a.from_file {
        let text =
            std::fs::read_to_string(path).map_err(|e| refused(format!("cannot read {}: {e}", path.display())))?;
        let offsets = parse_offsets_csv(&text, &a.group).map_err(|e| refused(format!("{}: {e}", path.display())))?;
        Target::FromFile { path: path.display().to_string(), offsets }
    } else if let Some(id) = a.to_snapshot {
        Target::Snapshot(id)
    } else if let Some(t) = a.to_snapshot_at {
        Target::SnapshotAt(t)
    } else {
        return Err(refused("choose a target (--to-earliest, --to-latest, --to-offset, ...)"));
    };
    let scope = if !a.topic.is_empty() {
        Scope::Topics(a.topic.clone())
    } else if a.all_topics {
        Scope::AllTopics
    } else if target.names_partitions() {
        Scope::FromTarget
    } else {
        return Err(refused("choose the partitions: -t TOPIC[:PARTITIONS] (repeatable) or --all-topics"));
    };
    Ok(ResetRequest { group: a.group.clone(), scope, target, options: a.exec.options() })
}

async fn reset(cli: &Cli, a: &ResetArgs) -> anyhow::Result<ExitCode> {
    if a.export && json(cli) {
        return Err(refused("--export prints Kafka's CSV: leave out -o json"));
    }
    let req = reset_request(a)?;
    let s = common::session(cli).await?;
    s.require_operator_schema().await?;
    let p = s.preview_reset(&req, Origin::cli()).await?;
    if a.export {
        return export(&p);
    }
    change(cli, &s, p, &a.exec).await
}

/// `--export`: the plan as Kafka's CSV on stdout, a summary on stderr. A plan
/// that would be refused is not exported: a file read back with --from-file
/// would lose what made it refused (a clamped target looks like any other).
fn export(p: &Preview<OffsetChange>) -> anyhow::Result<ExitCode> {
    if !p.refusals().is_empty() {
        return Err(refused(format!("the plan would be refused, so it is not exported: {}", p.refusals().join("; "))));
    }
    let csv = oncely::admin::parse::format_offsets_csv(&p.plan).map_err(refused)?;
    print!("{csv}");
    let t = &p.plan.totals;
    eprintln!(
        "Exported {} partition(s) of group {} ({} change; {} record(s) would be re-delivered, {} skipped). \
         Dry run: nothing was changed.",
        t.partitions, p.group, t.changed, t.redelivered, t.skipped
    );
    Ok(ExitCode::SUCCESS)
}

/// What `-o json` prints for an offset change.
#[derive(Debug, Serialize)]
struct ChangeReport<'a> {
    dry_run: bool,
    #[serde(flatten)]
    preview: &'a Preview<OffsetChange>,
    executed: Option<&'a Executed>,
    error: Option<String>,
}

/// Shows the preview, then (with --execute) confirms and executes. The
/// library decides every refusal and records it; this only renders.
async fn change(cli: &Cli, s: &Session, p: Preview<OffsetChange>, exec: &ExecArgs) -> anyhow::Result<ExitCode> {
    let report = |executed: Option<&Executed>, error: Option<String>| -> anyhow::Result<()> {
        if json(cli) {
            print_json(&ChangeReport { dry_run: !exec.execute, preview: &p, executed, error })?;
        }
        Ok(())
    };
    if !json(cli) {
        print_preview(&p, exec.execute);
    }
    if !exec.execute {
        report(None, None)?;
        if !p.refusals().is_empty() {
            return Err(refused(format!("--execute would be refused: {}", p.refusals().join("; "))));
        }
        if !json(cli) {
            println!("\nDry run: nothing was changed. Add --execute to apply.");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if p.plan.totals.changed == 0 && p.refusals().is_empty() {
        report(None, None)?;
        if !json(cli) {
            println!("\nNothing to change: every partition is already there.");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The library asks for nothing when the change is refused anyway, so
    // nobody types a confirmation for a change that cannot happen.
    let typed = common::typed_confirmation(p.environment(), p.asks_for(), exec.confirm.as_deref())?;
    let executed = match p.confirm(s, typed.as_deref()).await {
        Ok(confirmed) => confirmed.execute(s).await,
        Err(e) => Err(e),
    };
    match executed {
        Ok(done) => {
            report(Some(&done), None)?;
            if !json(cli) {
                let moved: Vec<String> =
                    done.after.iter().map(|o| format!("{}[{}]={}", o.topic, o.partition, opt(o.offset))).collect();
                println!(
                    "\nExecuted: audit #{}, snapshot #{} taken before, commit metadata {}.\nNow committed: {}",
                    done.audit_id,
                    done.snapshot_id,
                    done.metadata,
                    moved.join(" ")
                );
                println!("Undo with: oncely --env {} offsets undo -g {} --execute", p.environment(), p.group);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            report(None, Some(e.to_string()))?;
            Err(e.into())
        }
    }
}

fn print_preview(p: &Preview<OffsetChange>, execute: bool) {
    let what = match p.action {
        Action::Reset => "offsets reset",
        Action::Restore => "offsets restore",
        Action::Undo => "offsets undo",
    };
    println!("oncely {what} — {}", if execute { "EXECUTE" } else { "DRY RUN (nothing will be changed)" });
    println!(
        "environment  {} ({}), cluster {}",
        p.environment(),
        if p.protected() { "PROTECTED" } else { "unprotected" },
        p.cluster_id()
    );
    println!("group        {} (state {}, {} member(s))", p.group, p.group_state, p.members.len());
    println!("target       {}", p.target);
    println!();
    let mut t = Table::new(&[
        "TOPIC",
        "PARTITION",
        "CURRENT",
        "NEW",
        "LOG-START",
        "LOG-END",
        "RE-DELIVERED",
        "SKIPPED",
        "FIRST-REPLAYED",
    ]);
    for pp in &p.plan.partitions {
        let new = match (pp.new, pp.requested) {
            (None, _) => "no commit".to_owned(),
            (Some(n), Some(r)) if pp.clamped => format!("{n} (asked {r})"),
            (Some(n), _) => n.to_string(),
        };
        t.row(vec![
            pp.topic.clone(),
            pp.partition.to_string(),
            opt(pp.current),
            new,
            pp.log_start.to_string(),
            pp.log_end.to_string(),
            pp.redelivered.to_string(),
            pp.skipped.to_string(),
            pp.first_replayed_ms.map_or_else(|| "-".into(), format_ms),
        ]);
    }
    let tot = &p.plan.totals;
    t.row(vec![
        "TOTAL".into(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        tot.redelivered.to_string(),
        tot.skipped.to_string(),
        String::new(),
    ]);
    t.print();
    println!();
    println!(
        "{} of {} partition(s) change; {} record(s) will be re-delivered and {} skipped in total.",
        tot.changed, tot.partitions, tot.redelivered, tot.skipped
    );
    match p.oldest_replayed_ms {
        Some(ms) => {
            let age = Utc::now().timestamp_millis().saturating_sub(ms).max(0);
            println!(
                "Oldest record replayed: {} ({} ago; read from the record itself).",
                format_ms(ms),
                format_duration(Duration::from_millis(age as u64))
            );
        }
        None if tot.redelivered > 0 => println!("Oldest record replayed: unknown (the record could not be read)."),
        None => {}
    }
    if tot.without_commit > 0 {
        println!("{} partition(s) have no committed offset yet: their counts are 0.", tot.without_commit);
    }
    if tot.uncommitted > 0 {
        println!(
            "{} partition(s) go back to having no committed offset (they had none before the change undone): \
             their consumers start where auto.offset.reset says; their counts are 0.",
            tot.uncommitted
        );
    }
    println!("{}", p.oncely.meaning);
    if let Some(c) = p.confirmation() {
        println!("Protected environment: executing requires typing `{c}` (or --confirm '{c}').");
    }
    for r in p.refusals() {
        println!("REFUSED: {r}");
    }
}

async fn snapshot(cli: &Cli, a: &SnapshotArgs) -> anyhow::Result<ExitCode> {
    let s = common::session(cli).await?;
    s.require_operator_schema().await?;
    let groups = (!a.all_groups).then_some(a.groups.as_slice());
    let round = s.snapshot_groups(groups, SnapshotReason::Manual).await?;
    if json(cli) {
        print_json(&round)?;
    } else {
        for t in &round.taken {
            println!(
                "snapshot #{} of {}: {} partition(s) at {}",
                t.id,
                t.group,
                t.offsets.len(),
                t.taken_at.to_rfc3339()
            );
        }
        for g in &round.empty {
            println!("{g}: no committed offsets, nothing to snapshot");
        }
        for (g, e) in &round.failed {
            println!("{g}: failed: {e}");
        }
    }
    if !round.failed.is_empty() {
        anyhow::bail!("{} group(s) could not be snapshotted", round.failed.len());
    }
    Ok(ExitCode::SUCCESS)
}

fn snapshot_row(t: &mut Table, s: &Snapshot) {
    let sum: i64 = s.offsets.iter().filter_map(|o| o.offset).sum();
    t.row(vec![
        s.id.to_string(),
        s.taken_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        s.group.clone(),
        s.reason.clone(),
        opt(s.audit_id),
        s.offsets.len().to_string(),
        sum.to_string(),
    ]);
}

async fn list_snapshots(cli: &Cli, group: Option<&str>, limit: i64) -> anyhow::Result<ExitCode> {
    let s = common::session(cli).await?;
    s.require_operator_schema().await?;
    let list = snapshots::list(s.pool(), Some(s.cluster_id()), group, limit).await?;
    if json(cli) {
        print_json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["ID", "TAKEN-AT", "GROUP", "REASON", "AUDIT", "PARTITIONS", "OFFSET-SUM"]);
    for sn in &list {
        snapshot_row(&mut t, sn);
    }
    t.print();
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C or SIGTERM (or never, if they cannot be listened to).
pub(crate) async fn interrupted() {
    let term = async {
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    };
    tokio::select! {
        r = tokio::signal::ctrl_c() => { if r.is_err() { std::future::pending::<()>().await } }
        _ = term => {}
    }
}

pub(crate) async fn lag(cli: &Cli, a: &LagArgs) -> anyhow::Result<ExitCode> {
    let s = common::session(cli).await?;
    s.require_operator_schema().await?;
    let opts = LagOptions { window: a.window, samples: a.samples.max(1) };
    let groups = (!a.groups.is_empty()).then_some(a.groups.as_slice());
    let mut history = LagHistory::default();
    let stop = interrupted();
    tokio::pin!(stop);
    loop {
        let report = s.lag(groups, opts, &mut history).await?;
        if json(cli) {
            print_json(&report)?;
        } else {
            if a.watch {
                println!("— {} —", Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            }
            print_lag(&report, groups.is_some());
        }
        if !a.watch {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(a.refresh) => {}
        }
        s.recheck_cluster().await?;
    }
}

fn time_lag(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), |m| format_duration(Duration::from_millis(m.max(0) as u64)))
}

fn print_lag(report: &[GroupLag], detailed: bool) {
    if !detailed {
        let mut t = Table::new(&["GROUP", "STATE", "MEMBERS", "PARTITIONS", "LAG", "TIME-LAG", "STATUS", "ONCELY"]);
        for g in report {
            t.row(vec![
                g.group.clone(),
                g.state.clone(),
                g.members.to_string(),
                g.partitions.len().to_string(),
                g.total_lag.to_string(),
                time_lag(g.max_time_lag_ms),
                g.status.as_str().into(),
                if g.oncely_consumer { "yes".into() } else { "no".into() },
            ]);
        }
        t.print();
        return;
    }
    for g in report {
        println!(
            "group {}  status {}  state {}  members {}  total lag {}{}",
            g.group,
            g.status.as_str(),
            g.state,
            g.members,
            g.total_lag,
            if g.complete { "" } else { "  (window incomplete: run `oncely watch`)" }
        );
        let mut t = Table::new(&[
            "TOPIC",
            "PARTITION",
            "COMMITTED",
            "LOG-END",
            "LAG",
            "TIME-LAG",
            "ONCELY-DB",
            "STATUS",
            "WHY",
        ]);
        for p in &g.partitions {
            t.row(vec![
                p.topic.clone(),
                p.partition.to_string(),
                p.committed.to_string(),
                opt(p.log_end),
                p.lag.to_string(),
                time_lag(p.time_lag_ms),
                opt(p.db_offset),
                p.evaluation.status.as_str().into(),
                p.evaluation.reason.clone(),
            ]);
        }
        t.print();
    }
}

pub(crate) async fn watch(cli: &Cli, a: &WatchArgs) -> anyhow::Result<ExitCode> {
    let s = common::session(cli).await?;
    s.require_operator_schema().await?;
    let groups = (!a.groups.is_empty()).then_some(a.groups.as_slice());
    let retain = chrono::Duration::from_std(a.retain).context("--retain is too long")?;
    if !a.once && !json(cli) {
        eprintln!("Recording offsets every {} (Ctrl-C to stop).", format_duration(a.interval));
    }
    let stop = interrupted();
    tokio::pin!(stop);
    let mut ticks = tokio::time::interval(a.interval.max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
            _ = ticks.tick() => {}
        }
        // The bootstrap address may lead elsewhere by now: check every round.
        s.recheck_cluster().await?;
        let round = s.snapshot_groups(groups, SnapshotReason::Watch).await?;
        let pruned = snapshots::prune_watch(s.pool(), Utc::now() - retain).await?;
        if json(cli) {
            print_json(&serde_json::json!({
                "at": Utc::now(),
                "snapshots": round.taken.iter().map(|t| serde_json::json!({"id": t.id, "group": t.group, "partitions": t.offsets.len()})).collect::<Vec<_>>(),
                "empty": round.empty,
                "failed": round.failed,
                "pruned": pruned,
            }))?;
        } else {
            println!(
                "{} recorded {} group(s){}{}{}",
                Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                round.taken.len(),
                if round.empty.is_empty() { String::new() } else { format!(", {} without offsets", round.empty.len()) },
                if round.failed.is_empty() { String::new() } else { format!(", {} FAILED", round.failed.len()) },
                if pruned == 0 { String::new() } else { format!(", pruned {pruned} old snapshot(s)") },
            );
            for t in &round.taken {
                println!("  snapshot #{} {} ({} partitions)", t.id, t.group, t.offsets.len());
            }
            for (g, e) in &round.failed {
                println!("  {g}: {e}");
            }
        }
        if a.once {
            return Ok(if round.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
    }
}

pub(crate) async fn audit(cli: &Cli, a: &AuditArgs) -> anyhow::Result<ExitCode> {
    let env = crate::environment(cli)?;
    common::banner(&env);
    let url = env.config.database_url.clone();
    let name = env.name.clone();
    // The audit log is what one reads in an incident: if Kafka cannot be
    // reached it is still shown, but a wrong cluster is still refused.
    let pool = match Session::open(env).await {
        Ok(s) => s.pool().clone(),
        Err(e @ (oncely::Error::Refused(_) | oncely::Error::Config(_))) => return Err(e.into()),
        Err(oncely::Error::Admin(e)) => {
            eprintln!("oncely: warning: cannot reach Kafka to check the cluster id ({e}); showing the audit log of `{name}`'s database anyway");
            oncely::store::connect(&url, 2).await.with_context(|| format!("connecting to the database of `{name}`"))?
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("opening environment `{name}`"))),
    };
    let filter = AuditFilter { since: a.since, group: a.group.clone(), action: a.action.clone(), limit: Some(a.limit) };
    let records = audit::list(&pool, &filter).await?;
    if json(cli) {
        print_json(&records)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["ID", "STARTED", "WHO", "ENV", "ACTION", "GROUP", "RESULT", "BEFORE -> AFTER / ERROR"]);
    for r in &records {
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
            (None, true) => format!("{} -> {}", offsets(&r.before), offsets(&r.after)),
            (None, false) => r.details.to_string(),
        };
        t.row(vec![
            r.id.to_string(),
            r.started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            format!("{}@{}", r.os_user, r.host),
            r.environment.clone(),
            r.action.clone(),
            opt(r.group.clone()),
            r.result.clone(),
            summary,
        ]);
    }
    t.print();
    Ok(ExitCode::SUCCESS)
}
