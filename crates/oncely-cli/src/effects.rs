//! `oncely effects`: side-effect intents (list, retry, resolve).

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use oncely::admin::audit::{self, AuditEntry, AuditOutcome};
use oncely::effects::Resolution;
use oncely::store::effects as store;
use serde_json::json;

use crate::common::{self, Table};
use crate::Cli;

/// `oncely effects ...`
#[derive(Debug, Subcommand)]
#[command(after_help = "Examples:
  oncely effects list --status unknown
  oncely effects list --status dead --consumer payment-service
  oncely effects retry 'payment-service/charge-card//orders#0192…'
  oncely effects resolve 'payment-service/charge-card//orders#0192…' --as done --reason 'ch_123 at the gateway'")]
pub(crate) enum EffectsCmd {
    /// Intents, newest first.
    List {
        /// pending, running, done, failed, dead, unknown, suppressed.
        #[arg(long)]
        status: Option<String>,
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Send a dead, failed or unknown intent back to pending (same key).
    Retry {
        /// The intent's key.
        key: String,
    },
    /// Decide the outcome of an unknown (or dead/failed) intent after checking with the provider.
    Resolve {
        /// The intent's key.
        key: String,
        /// What happened.
        #[arg(long = "as", value_enum)]
        to: As,
        /// Why (stored with the intent and in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum As {
    Done,
    Failed,
}

pub(crate) async fn run(cli: &Cli, cmd: &EffectsCmd) -> anyhow::Result<ExitCode> {
    let session = common::session(cli).await?;
    let pool = session.pool();
    match cmd {
        EffectsCmd::List { status, consumer, limit } => {
            let rows = store::list(pool, status.as_deref(), consumer.as_deref(), *limit).await?;
            if common::json(cli) {
                common::print_json(&rows)?;
            } else {
                let mut t = Table::new(&["key", "status", "semantics", "attempts", "updated", "last error"]);
                for r in &rows {
                    t.row(vec![
                        r.key.clone(),
                        r.status.clone(),
                        r.semantics.clone(),
                        r.attempts.to_string(),
                        r.updated_at.to_rfc3339(),
                        r.last_error.clone().unwrap_or_default().chars().take(60).collect(),
                    ]);
                }
                println!("{}", t.render());
                println!("{} intent(s)", rows.len());
            }
        }
        EffectsCmd::Retry { key } => {
            let entry = AuditEntry::new(&session.env().name, "effects.retry").details(json!({"key": key}));
            let id = audit::record_start(pool, &entry).await?;
            match oncely::effects::retry(pool, key).await {
                Ok(old) => {
                    audit::record_result(
                        pool,
                        id,
                        &AuditOutcome::succeeded(Some(json!({"from": old, "to": "pending"}))),
                    )
                    .await?;
                    println!("{key}: {old} → pending (audit record {id})");
                }
                Err(e) => {
                    audit::record_result(pool, id, &AuditOutcome::refused(e.to_string())).await?;
                    return Err(e.into());
                }
            }
        }
        EffectsCmd::Resolve { key, to, reason } => {
            let (res, name) = match to {
                As::Done => (Resolution::Done, "done"),
                As::Failed => (Resolution::Failed, "failed"),
            };
            let entry = AuditEntry::new(&session.env().name, "effects.resolve")
                .details(json!({"key": key, "as": name, "reason": reason}));
            let id = audit::record_start(pool, &entry).await?;
            match oncely::effects::resolve(pool, key, res, reason).await {
                Ok(old) => {
                    audit::record_result(pool, id, &AuditOutcome::succeeded(Some(json!({"from": old, "to": name}))))
                        .await?;
                    if common::json(cli) {
                        common::print_json(&json!({"key": key, "from": old, "to": name, "audit_id": id}))?;
                    } else {
                        println!("{key}: {old} → {name} (audit record {id})");
                    }
                }
                Err(e) => {
                    audit::record_result(pool, id, &AuditOutcome::refused(e.to_string())).await?;
                    return Err(e.into());
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
