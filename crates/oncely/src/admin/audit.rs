//! The audit log of operator actions (`oncely.audit_log`): who (an
//! [`Actor`]: the OS user and host for the CLI, the signed-in operator for a
//! console), where (environment, cluster id), what (command line or request,
//! action, group, before and after), the result and when.
//!
//! Every command that changes something records its action **before**
//! executing it ([`record_start`]) and its outcome after ([`record_result`]),
//! so a crash in between still leaves a `started` row naming who did what.
//! Refusals of an attempted change are recorded too ([`record_refused`]).
//! The operations of [`crate::admin::ops`] do all of this themselves; these
//! functions are what they are built on.
//!
//! ```no_run
//! # async fn run(pool: sqlx::PgPool) -> oncely::Result<()> {
//! use oncely::admin::audit::{self, AuditEntry, AuditOutcome};
//! use serde_json::json;
//!
//! let entry = AuditEntry::new("prod", "dlq.redrive")
//!     .cluster_id("Zq0m3yJxQ8e2kq1uQm9L0A")
//!     .group("payment-service")
//!     .details(json!({ "dead_letters": [17, 18] }));
//! let id = audit::record_start(&pool, &entry).await?;
//! // ... do it ...
//! audit::record_result(&pool, id, &AuditOutcome::succeeded(Some(json!({ "redriven": 2 })))).await?;
//! # Ok(()) }
//! ```

use serde_json::Value;
use sqlx::PgPool;

use crate::error::Result;
use crate::store;

// The rows live beside their queries, in the store; their behaviour that
// needs this process (who runs it, its command line) is here.
pub use crate::store::admin::{Actor, AuditEntry, AuditFilter, AuditOutcome, AuditRecord, AuditResult};

impl Actor {
    /// The user and host this process runs as (`?` for what cannot be found).
    pub fn current() -> Self {
        let os_user = whoami::fallible::username()
            .ok()
            .or_else(|| std::env::var("USER").ok())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "?".into());
        let host = whoami::fallible::hostname().ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "?".into());
        Actor { os_user, host }
    }

    /// A named operator (a console's signed-in user) at `host`; empty
    /// values are recorded as `?`, so a row never names nobody silently.
    pub fn named(user: impl Into<String>, host: impl Into<String>) -> Self {
        let or_unknown = |s: String| if s.trim().is_empty() { "?".to_owned() } else { s };
        Actor { os_user: or_unknown(user.into()), host: or_unknown(host.into()) }
    }
}

/// This process's command line, each argument quoted when it needs to be, so
/// that it can be pasted back into a shell.
pub fn current_command_line() -> String {
    std::env::args_os()
        .map(|a| {
            let a = a.to_string_lossy().into_owned();
            let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
            if plain {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl AuditEntry {
    /// An entry for `action` in `environment`, by the current OS user on this
    /// host, with this process's command line; no cluster, group, before or
    /// details yet.
    pub fn new(environment: &str, action: &str) -> Self {
        AuditEntry {
            actor: Actor::current(),
            environment: environment.to_owned(),
            cluster_id: None,
            command_line: current_command_line(),
            action: action.to_owned(),
            group: None,
            before: None,
            details: Value::Object(Default::default()),
        }
    }

    /// Sets who runs it (default: [`Actor::current`]).
    pub fn actor(mut self, actor: Actor) -> Self {
        self.actor = actor;
        self
    }

    /// Sets the command line or request it came from (default: this
    /// process's command line).
    pub fn command_line(mut self, command_line: impl Into<String>) -> Self {
        self.command_line = command_line.into();
        self
    }

    /// Sets the cluster id.
    pub fn cluster_id(mut self, id: &str) -> Self {
        self.cluster_id = Some(id.to_owned());
        self
    }

    /// Sets the group.
    pub fn group(mut self, group: &str) -> Self {
        self.group = Some(group.to_owned());
        self
    }

    /// Sets the state before.
    pub fn before(mut self, before: Value) -> Self {
        self.before = Some(before);
        self
    }

    /// Sets the details (should be a JSON object: outcomes merge into it).
    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// Records `entry` as started, before the action runs; returns its id.
pub async fn record_start(pool: &PgPool, entry: &AuditEntry) -> Result<i64> {
    store::admin::insert_audit(pool, entry, AuditResult::Started, None).await
}

/// Records the outcome of the action recorded as `id`.
pub async fn record_result(pool: &PgPool, id: i64, outcome: &AuditOutcome) -> Result<()> {
    store::admin::finish_audit(pool, id, outcome).await
}

/// Records an attempted action that a safety check refused (nothing ran).
pub async fn record_refused(pool: &PgPool, entry: &AuditEntry, reason: &str) -> Result<i64> {
    store::admin::insert_audit(pool, entry, AuditResult::Refused, Some(reason)).await
}

/// Audit records, oldest first.
pub async fn list(pool: &PgPool, filter: &AuditFilter) -> Result<Vec<AuditRecord>> {
    store::admin::list_audit(pool, filter).await
}

/// The record with this id.
pub async fn get(pool: &PgPool, id: i64) -> Result<Option<AuditRecord>> {
    store::admin::get_audit(pool, id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_built_with_who_and_what() {
        let e = AuditEntry::new("prod", "offsets.reset").cluster_id("C").group("g").before(serde_json::json!([]));
        assert_eq!(e.environment, "prod");
        assert_eq!(e.action, "offsets.reset");
        assert_eq!((e.cluster_id.as_deref(), e.group.as_deref()), (Some("C"), Some("g")));
        assert!(!e.actor.os_user.is_empty() && !e.actor.host.is_empty());
        assert!(!e.command_line.is_empty());
        assert!(e.details.is_object());
        let e = e.actor(Actor::named("alice", "10.0.0.7")).command_line("console: POST /offsets/reset");
        assert_eq!((e.actor.os_user.as_str(), e.actor.host.as_str()), ("alice", "10.0.0.7"));
        assert_eq!(e.command_line, "console: POST /offsets/reset");
        assert_eq!(Actor::named(" ", ""), Actor { os_user: "?".into(), host: "?".into() });
    }

    #[test]
    fn outcomes() {
        let o = AuditOutcome::refused("group is active");
        assert_eq!((o.result, o.error.as_deref()), (AuditResult::Refused, Some("group is active")));
        let o = AuditOutcome::failed("boom").after(serde_json::json!([1]));
        assert_eq!(o.result.as_str(), "failed");
        assert!(o.after.is_some());
        assert_eq!(AuditResult::Succeeded.as_str(), "succeeded");
    }
}
