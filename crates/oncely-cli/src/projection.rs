//! `oncely projection`: rebuild a projection into a parallel copy, follow
//! it, compare it with the live one, swap it in, swap it back. The library
//! (`oncely::projection`) decides and audits every step; this renders.
//!
//! `rebuild` records a request: this command line cannot run the
//! application's handler, so the application serving the projection
//! (`Projection::serve`) runs it.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use oncely::admin::ops::{Operation, Origin, Preview};
use oncely::admin::session::Session;
use oncely::projection::ops::{self, SwapPlan, SwapRequest};
use oncely::projection::{self, RebuildFrom};
use serde::Serialize;
use serde_json::json;

use crate::common::{self, opt, refused, Table};
use crate::Cli;

/// `oncely projection ...`
#[derive(Debug, Subcommand)]
#[command(after_help = "Examples:
  oncely projection rebuild --consumer billing --from earliest --into billing_v2
  oncely projection status billing_v2
  oncely projection diff billing_v2
  oncely projection swap billing_v2              # preview
  oncely projection swap billing_v2 --execute
  oncely projection swap-back billing --execute
  oncely projection drop billing_v2 --execute    # after the swap-back window

The runbook: docs/projections.md.")]
pub(crate) enum ProjectionCmd {
    /// Ask the application to rebuild a consumer's projection into a new schema, with its current
    /// handler and side effects off (the application serving the projection runs it).
    Rebuild(RebuildArgs),
    /// A rebuild's progress: positions against live, events/s, ETA; every rebuild without TARGET.
    Status(StatusArgs),
    /// Compare the live projection with the rebuilt one: row counts, checksums, differing rows
    /// (recorded in the audit log; a swap requires it).
    Diff(DiffArgs),
    /// Swap the rebuilt projection in, in one transaction (a preview unless --execute).
    Swap(SwapArgs),
    /// Bring the previous projection back, within its retention (a preview unless --execute).
    SwapBack(SwapBackArgs),
    /// Remove a target: abandon a rebuild, drop the previous projection a swap kept once its
    /// retention has ended, or withdraw a request (a preview unless --execute).
    Drop(DropArgs),
}

/// `oncely projection drop`
#[derive(Debug, Args)]
pub(crate) struct DropArgs {
    /// The rebuild target.
    target: String,
    #[command(flatten)]
    exec: Exec,
}

/// `oncely projection rebuild`
#[derive(Debug, Args)]
pub(crate) struct RebuildArgs {
    /// The live consumer whose projection is rebuilt.
    #[arg(long)]
    consumer: String,
    /// The schema to rebuild into (lower-case letters, digits and _).
    #[arg(long, value_name = "TARGET")]
    into: String,
    /// `earliest`, an RFC 3339 time (2026-11-14T00:00:00Z), or an offset snapshot id
    /// (`oncely offsets snapshots`).
    #[arg(long, default_value = "earliest", value_parser = parse_from)]
    from: RebuildFrom,
    /// The typed confirmation of a protected environment, for when there is no terminal:
    /// exactly `REBUILD <ENV> <TARGET>`.
    #[arg(long, value_name = "TEXT")]
    confirm: Option<String>,
}

fn parse_from(s: &str) -> Result<RebuildFrom, String> {
    RebuildFrom::parse(s).map_err(|e| e.to_string())
}

/// `oncely projection status`
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The rebuild target; every rebuild when left out.
    target: Option<String>,
    /// Seconds between the two readings that give events/s and the ETA (0: one reading, no rate).
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    rate_window: f64,
}

/// `oncely projection diff`
#[derive(Debug, Args)]
pub(crate) struct DiffArgs {
    /// The rebuild target.
    target: String,
    /// At most this many differing rows shown each way, per table.
    #[arg(long, default_value_t = 5)]
    sample: i64,
}

/// `oncely projection swap`
#[derive(Debug, Args)]
pub(crate) struct SwapArgs {
    /// The rebuild target.
    target: String,
    #[command(flatten)]
    exec: Exec,
    /// Refuse when the rebuild lags more than N records behind live (it bounds the live pause).
    #[arg(long, default_value_t = 1000, value_name = "N")]
    max_lag: i64,
    /// Swap although diff has not been run since the last swap, or ran while the rebuild lagged beyond --max-lag (recorded in the audit log).
    #[arg(long)]
    allow_without_diff: bool,
    /// Swap although one side dead-lettered records the other applied (recorded in the audit log).
    #[arg(long)]
    allow_dead_letter_mismatch: bool,
    /// Days the previous projection is kept for swap-back.
    #[arg(long, default_value_t = 7, value_name = "DAYS")]
    keep_days: i32,
    /// Seconds the paused live consumer waits for the rebuild to reach it exactly.
    #[arg(long, default_value_t = 20, value_name = "SECONDS")]
    catch_up_timeout: u64,
}

/// `oncely projection swap-back`
#[derive(Debug, Args)]
pub(crate) struct SwapBackArgs {
    /// The projection (its most recent swap is taken back).
    projection: String,
    #[command(flatten)]
    exec: Exec,
}

/// --execute and --confirm.
#[derive(Debug, Args)]
pub(crate) struct Exec {
    /// Apply it. Without it nothing changes (a preview).
    #[arg(long)]
    execute: bool,
    /// The typed confirmation of a protected environment, for when there is no terminal:
    /// exactly `SWAP <ENV> <TARGET>`, `SWAP-BACK <ENV> <PROJECTION>` or `DROP <ENV> <TARGET>`.
    #[arg(long, value_name = "TEXT")]
    confirm: Option<String>,
}

pub(crate) async fn run(cli: &Cli, cmd: &ProjectionCmd) -> anyhow::Result<ExitCode> {
    let session = common::session(cli).await?;
    match cmd {
        ProjectionCmd::Rebuild(a) => rebuild(cli, &session, a).await,
        ProjectionCmd::Status(a) => status(cli, &session, a).await,
        ProjectionCmd::Diff(a) => diff(cli, &session, a).await,
        ProjectionCmd::Swap(a) => {
            let req = SwapRequest {
                max_lag: a.max_lag,
                allow_without_diff: a.allow_without_diff,
                allow_dead_letter_mismatch: a.allow_dead_letter_mismatch,
                keep_days: a.keep_days,
                catch_up_timeout: Duration::from_secs(a.catch_up_timeout),
                ..SwapRequest::new(&a.target)
            };
            let p = ops::preview_swap(&session, &req, Origin::cli()).await?;
            swap(cli, &session, p, &a.exec).await
        }
        ProjectionCmd::SwapBack(a) => {
            let p = ops::preview_swap_back(&session, &a.projection, Origin::cli()).await?;
            swap(cli, &session, p, &a.exec).await
        }
        ProjectionCmd::Drop(a) => drop_target(cli, &session, &a.target, &a.exec).await,
    }
}

async fn drop_target(cli: &Cli, s: &Session, target: &str, exec: &Exec) -> anyhow::Result<ExitCode> {
    let p = ops::preview_drop(s, target, Origin::cli()).await?;
    let Some(done) = preview_then_execute(cli, s, &p, exec, print_drop_preview).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    if !common::json(cli) {
        match &done.dropped {
            Some(d) => println!(
                "\nExecuted: audit record {}; dropped schema {target}, {} inbox row(s), {} position(s), {} effect intent(s).",
                done.audit_id, d.inbox_rows, d.positions, d.effects
            ),
            None => println!("\nExecuted: audit record {}; the request was withdrawn.", done.audit_id),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_drop_preview(p: &Preview<ops::DropPlan>, execute: bool) {
    println!("oncely projection drop — {}", if execute { "EXECUTE" } else { "PREVIEW (nothing will be changed)" });
    if !p.meaning.is_empty() {
        println!("  {}: {}", p.target, p.meaning);
    }
    for r in p.refusals() {
        println!("  REFUSED: {r}");
    }
}

async fn rebuild(cli: &Cli, s: &Session, a: &RebuildArgs) -> anyhow::Result<ExitCode> {
    let p = ops::preview_rebuild(s, &a.consumer, &a.into, a.from, Origin::cli()).await?;
    // Nothing live changes: the request is recorded at once (audited), with
    // the typed confirmation a protected environment asks for.
    let typed = common::typed_confirmation(p.environment(), p.asks_for(), a.confirm.as_deref())?;
    let done = p.confirm(s, typed.as_deref()).await?.execute(s).await?;
    if common::json(cli) {
        common::print_json(&json!({"requested": &*p, "audit_id": done.audit_id}))?;
    } else {
        println!(
            "Requested: rebuild of {}'s projection into schema {} from {} (audit record {}).",
            p.consumer, p.target, p.from, done.audit_id
        );
        println!(
            "The application serving the projection (oncely::projection::Projection::serve) starts it within seconds;\n\
             it runs as consumer {} with side effects off. Follow it with: oncely projection status {}",
            p.rebuild_consumer, p.target
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Progress of a rebuild from two readings.
#[derive(Debug, Serialize)]
struct Progress {
    /// Offsets the rebuild has passed, summed over partitions.
    done: i64,
    /// The live consumer's, likewise.
    live: i64,
    /// done / live, 0 to 1.
    fraction: f64,
    /// Events per second between the readings (None with one reading).
    events_per_second: Option<f64>,
    /// Seconds to reach live at that rate.
    eta_seconds: Option<f64>,
}

async fn status(cli: &Cli, s: &Session, a: &StatusArgs) -> anyhow::Result<ExitCode> {
    let pool = s.pool();
    let Some(target) = &a.target else {
        let rows = projection::list(pool).await?;
        if common::json(cli) {
            common::print_json(&rows)?;
        } else {
            let mut t =
                Table::new(&["target", "projection", "consumer", "state", "from", "diffed", "swaps", "kept until"]);
            for r in &rows {
                t.row(vec![
                    r.target.clone(),
                    r.projection.clone(),
                    r.consumer.clone(),
                    r.state.clone(),
                    r.from_spec.clone(),
                    opt(r.diffed_at.map(|d| d.to_rfc3339())),
                    r.swaps.to_string(),
                    opt(r.keep_until.map(|d| d.to_rfc3339())),
                ]);
            }
            t.print();
            println!("{} rebuild(s)", rows.len());
        }
        return Ok(ExitCode::SUCCESS);
    };
    let first = match projection::status(pool, target).await {
        Ok(st) => st,
        Err(e) => {
            let Some(q) = projection::request(pool, target).await? else { return Err(e.into()) };
            if common::json(cli) {
                common::print_json(&json!({"requested": q, "started": false}))?;
            } else {
                println!(
                    "{target}: requested at {} for consumer {} from {}; not started yet.\n\
                     It starts when the application serving the projection (Projection::serve) is running.",
                    q.requested_at, q.consumer, q.from_spec
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let started = tokio::time::Instant::now();
    let st = if a.rate_window > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(a.rate_window)).await;
        Some(projection::status(pool, target).await?)
    } else {
        None
    };
    let elapsed = started.elapsed().as_secs_f64();
    let (done0, _) = first.offsets();
    let last = st.as_ref().unwrap_or(&first);
    let (done, live) = last.offsets();
    let rate = st.as_ref().map(|_| (done - done0) as f64 / elapsed);
    let progress = Progress {
        done,
        live,
        fraction: if live > 0 { (done as f64 / live as f64).min(1.0) } else { 1.0 },
        events_per_second: rate,
        eta_seconds: rate.filter(|r| *r > 0.0).map(|r| last.lag.behind as f64 / r),
    };
    if common::json(cli) {
        common::print_json(&json!({"status": last, "progress": progress}))?;
        return Ok(ExitCode::SUCCESS);
    }
    let r = &last.rebuild;
    println!("rebuild {} of projection {} (consumer {} → {})", r.target, r.projection, r.consumer, r.rebuild_consumer);
    println!("  state {}, from {}, created {}, swaps {}", r.state, r.from_spec, r.created_at.to_rfc3339(), r.swaps);
    const WIDTH: usize = 40;
    let filled = (progress.fraction * WIDTH as f64).round() as usize;
    println!(
        "  [{}{}] {:.1}%  {} of {} offsets",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        progress.fraction * 100.0,
        done,
        live
    );
    let rate_text = match (progress.events_per_second, progress.eta_seconds) {
        (Some(r), Some(eta)) => format!("{r:.0} events/s, ETA {eta:.0} s"),
        (Some(r), None) => format!("{r:.0} events/s"),
        _ => "rate not measured (--rate-window 0)".into(),
    };
    println!(
        "  lag behind live {} record(s); {rate_text}; {} parked, {} dead letter(s)",
        last.lag.behind, last.parked, last.dead_letters
    );
    if last.lag.ahead > 0 || !last.lag.missing.is_empty() {
        println!("  ahead of live by {}; no position yet on {:?}", last.lag.ahead, last.lag.missing);
    }
    let effects: Vec<String> = last.effects.iter().map(|(k, n)| format!("{k} {n}")).collect();
    println!("  effect intents: {}", if effects.is_empty() { "none".into() } else { effects.join(", ") });
    let mut t = Table::new(&["topic", "partition", "live", "rebuild", "behind"]);
    for p in &last.partitions {
        let behind = match (p.live, p.rebuild) {
            (Some(l), Some(b)) => (l - b).to_string(),
            (Some(l), None) => l.to_string(),
            _ => "-".into(),
        };
        t.row(vec![p.topic.clone(), p.partition.to_string(), opt(p.live), opt(p.rebuild), behind]);
    }
    t.print();
    match &r.diffed_at {
        Some(d) => {
            println!("last diff {}: {}", d.to_rfc3339(), r.diff.as_ref().map(|v| v.to_string()).unwrap_or_default())
        }
        None => println!("no diff since the last swap: oncely projection diff {}", r.target),
    }
    Ok(ExitCode::SUCCESS)
}

async fn diff(cli: &Cli, s: &Session, a: &DiffArgs) -> anyhow::Result<ExitCode> {
    let (report, audit_id) = ops::diff(s, &a.target, a.sample, Origin::cli()).await?;
    if common::json(cli) {
        common::print_json(&json!({"diff": report, "audit_id": audit_id}))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["table", "live rows", "rebuilt rows", "equal", "live checksum", "rebuilt checksum"]);
    for d in &report.tables {
        t.row(vec![
            d.table.clone(),
            d.live_rows.to_string(),
            d.rebuilt_rows.to_string(),
            if d.equal { "yes" } else { "NO" }.into(),
            d.live_checksum.chars().take(12).collect(),
            d.rebuilt_checksum.chars().take(12).collect(),
        ]);
    }
    t.print();
    for d in report.tables.iter().filter(|d| !d.equal) {
        println!("\n{}: rows only in the live table (a sample):", d.table);
        for r in &d.only_live {
            println!("  - {r}");
        }
        println!("{}: rows only in the rebuilt table (a sample):", d.table);
        for r in &d.only_rebuilt {
            println!("  + {r}");
        }
    }
    println!(
        "\n{} (audit record {audit_id}). After a bug fix the tables are expected to differ: check that the live rows are the wrong ones.",
        if report.equal { "Equal" } else { "Different" }
    );
    Ok(ExitCode::SUCCESS)
}

async fn swap(cli: &Cli, s: &Session, p: Preview<SwapPlan>, exec: &Exec) -> anyhow::Result<ExitCode> {
    let Some(done) = preview_then_execute(cli, s, &p, exec, print_swap_preview).await? else {
        return Ok(ExitCode::SUCCESS);
    };
    if !common::json(cli) {
        println!(
            "\nExecuted: audit record {}; {} inbox row(s) to the live consumer, {} kept with the previous projection.",
            done.audit_id, done.exchanged.inbox_to_live, done.exchanged.inbox_to_rebuild
        );
        match p.kind {
            ops::SwapKind::Swap => println!(
                "Schema {} now holds the previous projection, kept {} day(s). Back out with: oncely --env {} projection swap-back {} --execute",
                p.rebuild.target,
                p.keep_days,
                p.environment(),
                p.rebuild.projection
            ),
            ops::SwapKind::SwapBack => println!("The previous projection of {} is live again.", p.rebuild.projection),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Shows the preview (`render`, or JSON), then with --execute confirms
/// (the typed text of a protected environment) and executes it. `None`
/// for a preview only. The library decides every refusal and records it.
async fn preview_then_execute<O>(
    cli: &Cli,
    s: &Session,
    p: &Preview<O>,
    exec: &Exec,
    render: fn(&Preview<O>, bool),
) -> anyhow::Result<Option<O::Output>>
where
    O: Operation + Serialize,
    O::Output: Serialize,
{
    if !common::json(cli) {
        render(p, exec.execute);
    }
    if !exec.execute {
        if common::json(cli) {
            common::print_json(&json!({"dry_run": true, "preview": p}))?;
        }
        if !p.refusals().is_empty() {
            return Err(refused(format!("--execute would be refused: {}", p.refusals().join("; "))));
        }
        if !common::json(cli) {
            println!("\nPreview: nothing was changed. Add --execute to apply.");
        }
        return Ok(None);
    }
    let typed = common::typed_confirmation(p.environment(), p.asks_for(), exec.confirm.as_deref())?;
    let done = p.confirm(s, typed.as_deref()).await?.execute(s).await?;
    if common::json(cli) {
        common::print_json(&json!({"dry_run": false, "preview": p, "executed": &done}))?;
    }
    Ok(Some(done))
}

fn print_swap_preview(p: &Preview<SwapPlan>, execute: bool) {
    let what = match p.kind {
        ops::SwapKind::Swap => "projection swap",
        ops::SwapKind::SwapBack => "projection swap-back",
    };
    println!("oncely {what} — {}", if execute { "EXECUTE" } else { "PREVIEW (nothing will be changed)" });
    let r = &p.rebuild;
    println!(
        "  projection {} (consumer {}): tables {} of schema {} ⇄ schema {}",
        r.projection,
        r.consumer,
        r.tables.join(", "),
        r.live_schema,
        r.target
    );
    println!(
        "  rebuild lag {} record(s) (bound {}), parked: live {}, rebuild {}; dead letters only one side has: live {}, rebuild {}",
        p.lag.behind, p.max_lag, p.unsettled.parked_live, p.unsettled.parked_rebuild, p.unsettled.dead_live_only, p.unsettled.dead_rebuild_only
    );
    println!("  last diff: {}", opt(r.diffed_at.map(|d| d.to_rfc3339())));
    let mut t = Table::new(&["topic", "partition", "live", "rebuild"]);
    for x in &p.positions {
        t.row(vec![x.topic.clone(), x.partition.to_string(), opt(x.live), opt(x.rebuild)]);
    }
    t.print();
    for o in &p.overrides {
        println!("  override: {o}");
    }
    for refusal in p.refusals() {
        println!("  REFUSED: {refusal}");
    }
    if let Some(c) = p.asks_for() {
        println!("  environment {} is protected: --execute asks for `{c}`", p.environment());
    }
}
