//! `oncely dlq`: dead letters (list, inspect, redrive) and parked keys
//! (parked, release).

use std::process::ExitCode;

use clap::Subcommand;
use oncely::admin::dlq::{RedriveRequest, RedriveSelection};
use oncely::admin::ops::Origin;
use oncely::admin::parse::parse_hex;
use oncely::failure;
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
  oncely dlq release --consumer payment-service --key order-42
  oncely dlq release --consumer payment-service --key-hex 00ff41")]
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
    #[command(group(clap::ArgGroup::new("which_key").required(true).args(["key", "key_hex"])))]
    Release {
        /// Consumer.
        #[arg(long)]
        consumer: String,
        /// Entity key, as UTF-8 text.
        #[arg(long)]
        key: Option<String>,
        /// Entity key as hex bytes (`00ff41`, `0x00ff41`), for keys that are not UTF-8.
        #[arg(long, value_name = "HEX", value_parser = hex_key)]
        key_hex: Option<HexKey>,
        /// Typed confirmation on a protected environment: `RELEASE <ENV> <CONSUMER> <KEY>` (the key
        /// escaped as `oncely dlq parked` shows it).
        #[arg(long)]
        confirm: Option<String>,
    },
}

/// A key given in hex (a newtype: clap would take a `Vec<u8>` for many values).
#[derive(Debug, Clone)]
pub(crate) struct HexKey(Vec<u8>);

fn hex_key(s: &str) -> Result<HexKey, String> {
    parse_hex(s).map(HexKey)
}

fn text(b: Option<&[u8]>) -> String {
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
            let rows = failure::list_dead_letters(pool, consumer.as_deref(), !all, *limit).await?;
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
                        r.record.topic.to_string(),
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
            let Some(r) = failure::get_dead_letters(pool, &[*id]).await?.pop() else {
                return Err(common::refused(format!("dead letter {id} does not exist")));
            };
            let headers: Vec<_> =
                r.record.headers.iter().map(|(k, v)| json!({"key": text(Some(k)), "value": text(v)})).collect();
            let v = json!({
                "id": r.id, "consumer": r.consumer, "topic": r.record.topic, "partition": r.record.partition,
                "offset": r.record.offset, "timestamp_ms": r.record.timestamp_ms, "event_id": r.event_id,
                "key": text(r.record.key.as_deref()), "payload": text(r.record.payload.as_deref()), "headers": headers,
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
            let selection = if *all {
                RedriveSelection::All { consumer: consumer.clone() }
            } else if ids.is_empty() {
                return Err(common::refused("name dead letters with --id, or pass --all"));
            } else {
                RedriveSelection::Ids(ids.clone())
            };
            let req = RedriveRequest { selection, rate_per_s: *rate };
            let p = session.preview_redrive(&req, Origin::cli()).await?;
            if !execute {
                if !p.refusals().is_empty() {
                    return Err(common::refused(p.refusals().join("; ")));
                }
                if common::json(cli) {
                    common::print_json(&json!({"dry_run": true, "would_redrive": p.dead_letters}))?;
                } else {
                    println!(
                        "Dry run: {} dead letter(s) would be published back to their topics at {rate}/s:",
                        p.dead_letters.len()
                    );
                    for d in &p.dead_letters {
                        println!("  {}", serde_json::to_string(d)?);
                    }
                    println!("Each keeps its identity: an event already applied is skipped as a duplicate. Add --execute to do it.");
                }
                return Ok(ExitCode::SUCCESS);
            }
            if p.dead_letters.is_empty() && p.refusals().is_empty() {
                if common::json(cli) {
                    common::print_json(&json!({"dry_run": false, "redriven": []}))?;
                } else {
                    println!("Nothing to redrive.");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let total = p.dead_letters.len();
            let typed = common::typed_confirmation(p.environment(), p.asks_for(), confirm.as_deref())?;
            let confirmed = p.confirm(&session, typed.as_deref()).await?;
            // Each record as it goes out: a slow redrive shows where it is.
            let mut progress = p.progress();
            let printer = tokio::spawn(async move {
                let mut shown = 0;
                while progress.changed().await.is_ok() {
                    for r in progress.borrow_and_update().iter().skip(shown) {
                        eprintln!("redriven {} → {}[{}]@{}", r.id, r.topic, r.partition, r.offset);
                        shown += 1;
                    }
                }
            });
            let done = confirmed.execute(&session).await;
            drop(p);
            let _ = printer.await;
            let done = done?;
            if common::json(cli) {
                common::print_json(&json!({"dry_run": false, "audit_id": done.audit_id, "redriven": done.redriven}))?;
            } else {
                println!("Redrove {} of {total} dead letter(s) (audit record {}).", done.redriven.len(), done.audit_id);
            }
        }
        DlqCmd::Parked { consumer, limit } => {
            let rows = failure::list_parked(pool, consumer.as_deref(), *limit).await?;
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
                        r.record.topic.to_string(),
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
        DlqCmd::Release { consumer, key, key_hex, confirm } => {
            let key: Vec<u8> = match (key, key_hex) {
                (Some(k), _) => k.clone().into_bytes(),
                (None, Some(h)) => h.0.clone(),
                (None, None) => return Err(common::refused("name the key with --key or --key-hex")),
            };
            let p = session.preview_release(consumer, &key, Origin::cli()).await?;
            if p.refusals().is_empty() {
                eprintln!("{}", p.meaning);
            }
            let typed = common::typed_confirmation(p.environment(), p.asks_for(), confirm.as_deref())?;
            let done = p.confirm(&session, typed.as_deref()).await?.execute(&session).await?;
            if common::json(cli) {
                common::print_json(&done)?;
            } else {
                println!(
                    "Released {} held event(s) of key {}; the consumer retries them now (audit record {}).",
                    done.released, done.key, done.audit_id
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
