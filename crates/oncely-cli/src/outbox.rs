//! `oncely outbox`: the transactional outbox's status, the relay, and the
//! rows the relay set aside (list, retry, discard).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use oncely::admin::ops::{Origin, Preview};
use oncely::admin::outbox::{OutboxChange, OutboxDone};
use oncely::admin::session::Session;
use oncely::outbox::{failed, OutboxStatus, Relay};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::common::{self, Table};
use crate::Cli;

/// `oncely outbox ...`
#[derive(Debug, Subcommand)]
#[command(after_help = "Examples:
  oncely outbox status
  oncely outbox list --failed
  oncely outbox retry 1042          # after raising the topic's max.message.bytes
  oncely outbox discard 1042 --reason 'payload of 40 MB, re-sent by the service in parts'")]
pub(crate) enum OutboxCmd {
    /// Pending, held and set-aside rows, oldest pending age, publish rate,
    /// and each lane's owner.
    Status,
    /// Rows the relay set aside (refused by the broker for good) with their
    /// reason and the rows of their key held behind them.
    List {
        /// Rows set aside (the only listing there is; required so that the
        /// command says what it shows).
        #[arg(long, required = true)]
        failed: bool,
        /// Include rows an operator discarded (until retention removes them).
        #[arg(long)]
        discarded: bool,
        /// At most this many, oldest first.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Send rows set aside back to pending once the cause is fixed: each is
    /// published first of its key, then the rows held behind it (audited).
    Retry {
        /// Row ids (from `list --failed`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every row set aside.
        #[arg(long)]
        all: bool,
        /// The typed confirmation of a protected environment, for when there is no terminal:
        /// exactly `OUTBOX-RETRY <ENV>`.
        #[arg(long, value_name = "TEXT")]
        confirm: Option<String>,
    },
    /// Give up rows set aside: never published; the rows held behind them
    /// go on (audited).
    Discard {
        /// Row ids (from `list --failed`).
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Why (stored with each row and in the audit log).
        #[arg(long)]
        reason: String,
        /// The typed confirmation of a protected environment, for when there is no terminal:
        /// exactly `OUTBOX-DISCARD <ENV>`.
        #[arg(long, value_name = "TEXT")]
        confirm: Option<String>,
    },
    /// Run a relay until SIGINT or SIGTERM: publish committed outbox rows.
    /// Several relays may run at once; they share the lanes.
    Relay(RelayArgs),
}

/// `oncely outbox relay` options.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// The relay's name (lane owner in `outbox status`); default `<host>-<pid>`.
    #[arg(long)]
    name: Option<String>,
    /// Most rows claimed and published at once.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Look for rows this often without a notification (e.g. 500ms, 2s).
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    poll_interval: Duration,
    /// Poll only: do not LISTEN for enqueue notifications.
    #[arg(long)]
    no_listen: bool,
    /// How often to take free lanes (a dead relay's) and rebalance.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    lane_check_interval: Duration,
    /// Delete rows published longer ago than this (e.g. 7d, 12h).
    #[arg(long, default_value = "7d", value_parser = parse_duration, conflicts_with = "keep_published")]
    retention: Duration,
    /// Keep published rows (no retention).
    #[arg(long)]
    keep_published: bool,
    /// Producer `message.timeout.ms` (0: wait for the broker as long as it takes).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    message_timeout: Duration,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Do not apply oncely's migrations at start.
    #[arg(long)]
    no_migrate: bool,
}

/// Parses `500ms`, `2s`, `5m`, `12h`, `7d` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration (try 500ms, 2s, 5m, 12h, 7d)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        other => return Err(format!("unknown duration unit `{other}` (ms, s, m, h, d)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

pub(crate) async fn run(cli: &Cli, cmd: &OutboxCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        OutboxCmd::Status => status(cli).await,
        OutboxCmd::List { failed: _, discarded, limit } => list(cli, *discarded, *limit).await,
        OutboxCmd::Retry { ids, all, confirm } => retry(cli, ids, *all, confirm.as_deref()).await,
        OutboxCmd::Discard { ids, reason, confirm } => discard(cli, ids, reason, confirm.as_deref()).await,
        OutboxCmd::Relay(a) => relay(cli, a).await,
    }
}

/// Reads the database only, like `status`.
async fn list(cli: &Cli, discarded: bool, limit: i64) -> anyhow::Result<ExitCode> {
    let env = crate::environment(cli)?;
    common::banner(&env);
    let pool = oncely::store::connect(&env.config.database_url, 2)
        .await
        .with_context(|| format!("connecting to the database of environment `{}`", env.name))?;
    let rows = failed::list(&pool, discarded, limit).await.context("reading the outbox")?;
    if common::json(cli) {
        common::print_json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["ID", "TOPIC", "KEY", "PAYLOAD", "ATTEMPTS", "SET ASIDE", "HELD", "DISCARDED", "REASON"]);
    for r in &rows {
        t.row(vec![
            r.id.to_string(),
            r.topic.clone(),
            r.key.clone().unwrap_or_else(|| "(none)".into()),
            r.payload_bytes.map(|b| format!("{b} B")).unwrap_or_else(|| "null".into()),
            r.attempts.to_string(),
            r.failed_at.format("%Y-%m-%d %H:%M:%S").to_string(),
            r.held.to_string(),
            r.discarded_at.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "-".into()),
            r.reason.clone().unwrap_or_default(),
        ]);
    }
    t.print();
    println!("{} row(s) set aside", rows.len());
    if rows.iter().any(|r| r.key_escaped) {
        println!("keys that are not printable UTF-8 are shown escaped (\\xNN)");
    }
    Ok(ExitCode::SUCCESS)
}

async fn retry(cli: &Cli, ids: &[i64], all: bool, confirm: Option<&str>) -> anyhow::Result<ExitCode> {
    let session = common::session(cli).await?;
    let p = oncely::admin::outbox::preview_retry(&session, (!all).then_some(ids), Origin::cli()).await?;
    report(cli, &decide(&session, &p, confirm).await?, "pending", "back to pending")
}

async fn discard(cli: &Cli, ids: &[i64], reason: &str, confirm: Option<&str>) -> anyhow::Result<ExitCode> {
    let session = common::session(cli).await?;
    let p = oncely::admin::outbox::preview_discard(&session, ids, reason, Origin::cli()).await?;
    report(cli, &decide(&session, &p, confirm).await?, "discarded", "discarded")
}

/// Prints what a decision did: `{key: ids, audit_id}` in JSON, else a line.
fn report(cli: &Cli, done: &OutboxDone, key: &str, what: &str) -> anyhow::Result<ExitCode> {
    if common::json(cli) {
        common::print_json(&json!({key: done.ids, "audit_id": done.audit_id}))?;
    } else {
        println!("{} row(s) {what}: {:?} (audit record {})", done.ids.len(), done.ids, done.audit_id);
    }
    Ok(ExitCode::SUCCESS)
}

/// Confirms (asking on a protected environment) and executes a decision;
/// the library checks the rows and the typed text, and audits.
async fn decide(s: &Session, p: &Preview<OutboxChange>, given: Option<&str>) -> anyhow::Result<OutboxDone> {
    for r in &p.rows {
        eprintln!("  row {} ({}): {}", r.id, r.topic, r.reason.as_deref().unwrap_or(""));
    }
    let typed = common::typed_confirmation(p.environment(), p.asks_for(), given)?;
    Ok(p.confirm(s, typed.as_deref()).await?.execute(s).await?)
}

/// Reads the database only, so it answers while the broker is down.
async fn status(cli: &Cli) -> anyhow::Result<ExitCode> {
    let env = crate::environment(cli)?;
    common::banner(&env);
    let pool = oncely::store::connect(&env.config.database_url, 2)
        .await
        .with_context(|| format!("connecting to the database of environment `{}`", env.name))?;
    let s = oncely::outbox::status(&pool).await.context("reading the outbox")?;
    if common::json(cli) {
        common::print_json(&s)?;
    } else {
        print_status(&s);
    }
    Ok(ExitCode::SUCCESS)
}

fn age(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_secs(1) => format!("{}ms", d.as_millis()),
        Some(d) if d < Duration::from_secs(120) => format!("{:.1}s", d.as_secs_f64()),
        Some(d) if d < Duration::from_secs(7200) => format!("{}m", d.as_secs() / 60),
        Some(d) => format!("{:.1}h", d.as_secs_f64() / 3600.0),
    }
}

fn print_status(s: &OutboxStatus) {
    println!(
        "pending {} (held {})  set aside {}  oldest {}  published last minute {} ({:.1}/s)  kept {}  relays {}",
        s.pending,
        s.held,
        s.failed,
        age(s.oldest_pending_age),
        s.published_last_minute,
        s.publish_rate_per_s,
        s.published_kept,
        s.relays
    );
    let mut t =
        Table::new(&["LANE", "PENDING", "SET ASIDE", "OLDEST", "ATTEMPTS", "OWNER", "PID", "SINCE", "LAST ERROR"]);
    for l in &s.lanes {
        let (owner, pid, since) = match &l.owner {
            Some(o) => (
                format!(
                    "{}{}",
                    o.name.as_deref().unwrap_or("?"),
                    o.addr.as_deref().map(|a| format!(" @{a}")).unwrap_or_default()
                ),
                o.pid.to_string(),
                o.since.map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string()).unwrap_or_else(|| "-".into()),
            ),
            None => ("(none)".into(), "-".into(), "-".into()),
        };
        t.row(vec![
            l.lane.to_string(),
            l.pending.to_string(),
            l.failed.to_string(),
            age(l.oldest_pending_age),
            l.max_attempts.to_string(),
            owner,
            pid,
            since,
            l.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.print();
    if s.failed > 0 {
        println!("{} row(s) set aside, {} held behind them: `oncely outbox list --failed`", s.failed, s.held);
    }
}

async fn relay(cli: &Cli, a: &RelayArgs) -> anyhow::Result<ExitCode> {
    // The session checks the live cluster id against the environment's
    // before anything is published.
    let session = common::session(cli).await?;
    let env = session.env().clone();
    // Claims, marks, LISTEN, retention and the pending gauge each use one.
    let pool = oncely::store::connect(&env.config.database_url, 8)
        .await
        .with_context(|| format!("connecting to the database of environment `{}`", env.name))?;
    if !a.no_migrate {
        oncely::store::migrate(&pool).await.context("applying migrations")?;
    }
    let shutdown = CancellationToken::new();
    if let Some(addr) = a.metrics_addr {
        let bound = oncely::metrics::serve(addr, shutdown.clone()).await?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    let mut b = Relay::builder(pool, env.config.connection())
        .batch_size(a.batch_size)
        .poll_interval(a.poll_interval)
        .listen(!a.no_listen)
        .lane_check_interval(a.lane_check_interval)
        .retention((!a.keep_published).then_some(a.retention))
        .message_timeout(a.message_timeout);
    if let Some(n) = &a.name {
        b = b.name(n);
    }
    let relay = b.build().context("configuring the relay")?;
    eprintln!(
        "relay {} publishing the outbox of environment `{}`; stop with Ctrl-C or SIGTERM",
        relay.name(),
        env.name
    );
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.cancel();
    });
    relay.run(shutdown).await.context("running the relay")?;
    eprintln!("relay stopped");
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn ages_read_well() {
        assert_eq!(age(None), "-");
        assert_eq!(age(Some(Duration::from_millis(250))), "250ms");
        assert_eq!(age(Some(Duration::from_secs(5))), "5.0s");
        assert_eq!(age(Some(Duration::from_secs(600))), "10m");
        assert_eq!(age(Some(Duration::from_secs(3 * 3600))), "3.0h");
    }
}
