//! `oncely effects`: side-effect intents (list, retry, resolve). Retry and
//! resolve are `oncely::admin::effects` operations: the library checks the
//! intent, the typed confirmation of a protected environment, and audits.

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use oncely::admin::effects::EffectChange;
use oncely::admin::ops::{Origin, Preview};
use oncely::admin::session::Session;
use oncely::effects::{self, Resolution};
use serde_json::json;

use crate::common::{self, Table};
use crate::Cli;

/// `oncely effects ...`
#[derive(Debug, Subcommand)]
#[command(after_help = "Examples:
  oncely effects list --status unknown
  oncely effects list --status dead --consumer payment-service
  oncely effects retry 'payment-service/charge-card/%2Forders#0192…'
  oncely effects resolve 'payment-service/charge-card/%2Forders#0192…' --as done --reason 'ch_123 at the gateway'")]
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
        /// The typed confirmation of a protected environment, for when there is no terminal:
        /// exactly `RETRY <ENV> <KEY>`.
        #[arg(long, value_name = "TEXT")]
        confirm: Option<String>,
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
        /// The typed confirmation of a protected environment, for when there is no terminal:
        /// exactly `RESOLVE <ENV> <KEY>`.
        #[arg(long, value_name = "TEXT")]
        confirm: Option<String>,
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
            let rows = effects::list(pool, status.as_deref(), consumer.as_deref(), *limit).await?;
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
        EffectsCmd::Retry { key, confirm } => {
            let p = session.preview_effect_retry(key, Origin::cli()).await?;
            let (old, id) = decide(&session, &p, confirm.as_deref()).await?;
            println!("{key}: {old} → pending (audit record {id})");
        }
        EffectsCmd::Resolve { key, to, reason, confirm } => {
            let (res, name) = match to {
                As::Done => (Resolution::Done, "done"),
                As::Failed => (Resolution::Failed, "failed"),
            };
            let p = session.preview_effect_resolve(key, res, reason, Origin::cli()).await?;
            let (old, id) = decide(&session, &p, confirm.as_deref()).await?;
            if common::json(cli) {
                common::print_json(&json!({"key": key, "from": old, "to": name, "audit_id": id}))?;
            } else {
                println!("{key}: {old} → {name} (audit record {id})");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Confirms (asking on a protected environment) and executes a decision;
/// returns the status the intent had and the audit id.
async fn decide(session: &Session, p: &Preview<EffectChange>, given: Option<&str>) -> anyhow::Result<(String, i64)> {
    if p.refusals().is_empty() {
        eprintln!("{}", p.meaning);
    }
    let typed = common::typed_confirmation(p.environment(), p.asks_for(), given)?;
    let done = p.confirm(session, typed.as_deref()).await?.execute(session).await?;
    Ok((done.from, done.audit_id))
}
