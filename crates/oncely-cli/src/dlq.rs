//! `oncely dlq`: dead letters (list, inspect, redrive) and parked keys
//! (parked, release).

use std::process::ExitCode;

use clap::Subcommand;
use oncely::admin::audit::{self, AuditEntry, AuditOutcome};
use oncely::failure::redrive;
use oncely::store::failure as store;
use serde_json::json;

use crate::common::{self, Table};
use crate::Cli;

/// `oncely dlq ...`
#[derive(Debug, Subcommand)]
#[command(after_help = "Examples:
  oncely dlq list --consumer payment-service
  oncely dlq inspect 17
  oncely dlq redrive --id 17 --id 18             # dry run: what would be redriven
  oncely dlq redrive --all --consumer payment-service --rate 20 --execute
  oncely dlq parked --consumer payment-service
  oncely dlq release --consumer payment-service --key order-42")]
pub(crate) enum DlqCmd {
    /// Dead letters, oldest first.
    List {
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        /// Also those already redriven.
        #[arg(long)]
        all: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// One dead letter with its headers and payload.
    Inspect {
        /// Dead letter id.
        id: i64,
    },
    /// Publish dead letters back to their original topic with the same
    /// identity (the inbox lets each through once). Dry run unless --execute.
    Redrive {
        /// Dead letter ids.
        #[arg(long = "id")]
        ids: Vec<i64>,
        /// Every dead letter not redriven yet (of --consumer, if given).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// With --all: only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        /// Records per second at most.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Do it (otherwise only show what would be done).
        #[arg(long)]
        execute: bool,
        /// Typed confirmation on a protected environment: `REDRIVE <ENV>`.
        #[arg(long)]
        confirm: Option<String>,
    },
    /// Parked events (keys waiting behind a failing event), heads first.
    Parked {
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 200)]
        limit: i64,
    },
    /// Release a key held behind a dead-lettered event (dead-key policy `hold`).
    Release {
        /// Consumer.
        #[arg(long)]
        consumer: String,
        /// Entity key.
        #[arg(long)]
        key: String,
    },
}

fn text(b: &Option<Vec<u8>>) -> String {
    match b {
        None => "(null)".into(),
        Some(v) => match std::str::from_utf8(v) {
            Ok(s) => s.to_owned(),
            Err(_) => format!("0x{}", v.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        },
    }
}

pub(crate) async fn run(cli: &Cli, cmd: &DlqCmd) -> anyhow::Result<ExitCode> {
    let session = common::session(cli).await?;
    let pool = session.pool();
    match cmd {
        DlqCmd::List { consumer, all, limit } => {
            let rows = store::list_dead_letters(pool, consumer.as_deref(), !all, *limit).await?;
            if common::json(cli) {
                common::print_json(&rows)?;
            } else {
                let mut t = Table::new(&[
                    "id",
                    "consumer",
                    "topic",
                    "partition",
                    "offset",
                    "key",
                    "reason",
                    "attempts",
                    "redriven",
                    "error",
                ]);
                for r in &rows {
                    t.row(vec![
                        r.id.to_string(),
                        r.consumer.clone(),
                        r.record.topic.clone(),
                        r.record.partition.to_string(),
                        r.record.offset.to_string(),
                        r.record.key_str(),
                        r.reason.clone(),
                        r.attempts.to_string(),
                        r.redrive_count.to_string(),
                        r.error.chars().take(60).collect(),
                    ]);
                }
                println!("{}", t.render());
                println!("{} dead letter(s)", rows.len());
            }
        }
        DlqCmd::Inspect { id } => {
            let Some(r) = store::get_dead_letters(pool, &[*id]).await?.pop() else {
                return Err(common::refused(format!("dead letter {id} does not exist")));
            };
            let headers: Vec<_> = r.record.headers.iter().map(|(k, v)| json!({"key": k, "value": text(v)})).collect();
            let v = json!({
                "id": r.id, "consumer": r.consumer, "topic": r.record.topic, "partition": r.record.partition,
                "offset": r.record.offset, "timestamp_ms": r.record.timestamp_ms, "event_id": r.event_id,
                "key": text(&r.record.key), "payload": text(&r.record.payload), "headers": headers,
                "reason": r.reason, "error": r.error, "error_class": r.error_class, "attempts": r.attempts,
                "created_at": r.created_at, "redriven_at": r.redriven_at, "redrive_count": r.redrive_count,
            });
            if common::json(cli) {
                common::print_json(&v)?;
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        DlqCmd::Redrive { ids, all, consumer, rate, execute, confirm } => {
            let letters = if *all {
                store::list_dead_letters(pool, consumer.as_deref(), true, i64::MAX).await?
            } else if ids.is_empty() {
                return Err(common::refused("name dead letters with --id, or pass --all"));
            } else {
                let found = store::get_dead_letters(pool, ids).await?;
                if let Some(missing) = ids.iter().find(|i| !found.iter().any(|f| f.id == **i)) {
                    return Err(common::refused(format!("dead letter {missing} does not exist")));
                }
                found
            };
            let plan: Vec<_> = letters
                .iter()
                .map(|l| json!({"id": l.id, "topic": l.record.topic, "key": l.record.key_str(), "event_id": l.event_id, "reason": l.reason, "redriven_before": l.redrive_count}))
                .collect();
            if !execute {
                if common::json(cli) {
                    common::print_json(&json!({"dry_run": true, "would_redrive": plan}))?;
                } else {
                    println!(
                        "Dry run: {} dead letter(s) would be published back to their topics at {rate}/s:",
                        letters.len()
                    );
                    for p in &plan {
                        println!("  {p}");
                    }
                    println!("Each keeps its identity: an event already applied is skipped as a duplicate. Add --execute to do it.");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let env = session.env();
            let entry = AuditEntry::new(&env.name, "dlq.redrive")
                .cluster_id(session.cluster_id())
                .details(json!({"dead_letters": letters.iter().map(|l| l.id).collect::<Vec<_>>(), "rate": rate}));
            if env.config.protected {
                let expected = format!("REDRIVE {}", env.name);
                if let Some(reason) = common::confirm(&env.name, &expected, confirm.as_deref())? {
                    audit::record_refused(pool, &entry, &reason).await?;
                    return Err(common::refused(reason));
                }
            }
            let audit_id = audit::record_start(pool, &entry).await?;
            let publisher = oncely::Publisher::new(env.config.connection(), "/oncely/redrive")?;
            let total = letters.len();
            let (done, result) = redrive::redrive(pool, &publisher, &letters, *rate, |r| {
                eprintln!("redriven {} → {}[{}]@{}", r.id, r.topic, r.partition, r.offset);
            })
            .await;
            let after = json!({"redriven": done});
            match &result {
                Ok(()) => audit::record_result(pool, audit_id, &AuditOutcome::succeeded(Some(after.clone()))).await?,
                Err(e) => {
                    audit::record_result(pool, audit_id, &AuditOutcome::failed(e.to_string()).after(after.clone()))
                        .await?
                }
            }
            result?;
            if common::json(cli) {
                common::print_json(&json!({"dry_run": false, "audit_id": audit_id, "redriven": done}))?;
            } else {
                println!("Redrove {} of {total} dead letter(s) (audit record {audit_id}).", done.len());
            }
        }
        DlqCmd::Parked { consumer, limit } => {
            let rows = store::list_parked(pool, consumer.as_deref(), *limit).await?;
            if common::json(cli) {
                let v: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        json!({"topic": r.record.topic, "partition": r.record.partition, "offset": r.record.offset,
                        "key": r.entity_key, "event_id": r.event_id, "status": r.status, "attempts": r.attempts,
                        "next_attempt_at": r.next_attempt_at, "last_error": r.last_error, "parked_at": r.parked_at})
                    })
                    .collect();
                common::print_json(&v)?;
            } else {
                let mut t = Table::new(&[
                    "topic",
                    "partition",
                    "offset",
                    "key",
                    "status",
                    "attempts",
                    "next attempt",
                    "last error",
                ]);
                for r in &rows {
                    t.row(vec![
                        r.record.topic.clone(),
                        r.record.partition.to_string(),
                        r.record.offset.to_string(),
                        oncely::envelope::escape_bytes(&r.entity_key),
                        r.status.clone(),
                        r.attempts.to_string(),
                        common::opt(r.next_attempt_at.map(|t| t.to_rfc3339())),
                        r.last_error.clone().unwrap_or_default().chars().take(60).collect(),
                    ]);
                }
                println!("{}", t.render());
                println!("{} parked event(s)", rows.len());
            }
        }
        DlqCmd::Release { consumer, key } => {
            let entry =
                AuditEntry::new(&session.env().name, "dlq.release").group(consumer).details(json!({"key": key}));
            let audit_id = audit::record_start(pool, &entry).await?;
            let n = store::release_key(pool, consumer, key.as_bytes()).await?;
            audit::record_result(pool, audit_id, &AuditOutcome::succeeded(Some(json!({"released": n})))).await?;
            if n == 0 {
                return Err(common::refused(format!("no held events for key {key} of consumer {consumer}")));
            }
            println!("Released {n} held event(s) of key {key}; the consumer retries them now.");
        }
    }
    Ok(ExitCode::SUCCESS)
}
