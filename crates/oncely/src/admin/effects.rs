//! Operator decisions on side-effect intents as [`ops`](crate::admin::ops)
//! operations: send a `dead`, `failed` or `unknown` intent back to `pending`
//! ([`Session::preview_effect_retry`]), or decide its outcome
//! ([`Session::preview_effect_resolve`]). The preview shows the intent as it
//! is and what the decision means; a protected environment requires
//! `RETRY <ENV> <KEY>` / `RESOLVE <ENV> <KEY>` typed; the execution is
//! audited before it changes anything, and calls
//! [`crate::effects::retry`] / [`crate::effects::resolve`], which check the
//! status again in the same statement that changes it.

use serde::Serialize;
use serde_json::json;

use crate::admin::audit::{AuditEntry, AuditOutcome};
use crate::admin::ops::{Operation, Origin, Preview, Trail};
use crate::admin::session::Session;
use crate::effects::Resolution;
use crate::error::{Error, Result};
use crate::store::effects::Intent;

/// The statuses an operator may retry or resolve (what
/// [`crate::effects::retry`] and [`crate::effects::resolve`] accept): the
/// executor has given up on them, or cannot know their outcome.
const DECIDABLE: [&str; 3] = ["unknown", "dead", "failed"];

/// What the operator decides.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Retry,
    Resolve { to: Resolution, reason: String },
}

/// A decision on one intent, previewed.
#[derive(Debug, Clone, Serialize)]
pub struct EffectChange {
    /// `effects.retry` or `effects.resolve`.
    pub action: &'static str,
    /// The intent's key.
    pub key: String,
    /// The intent as it is now (`None`: there is none with this key).
    pub intent: Option<Intent>,
    /// The status it gets: `pending`, `done` or `failed`.
    pub to: &'static str,
    /// The operator's reason (resolve), stored with the intent.
    pub reason: Option<String>,
    /// What the decision means, in a sentence or two.
    pub meaning: String,
    /// Why execution would be refused (empty: it would go ahead).
    pub refusals: Vec<String>,
    #[serde(skip)]
    decision: Decision,
}

/// A done decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EffectChanged {
    /// The intent's key.
    pub key: String,
    /// The status it had.
    pub from: String,
    /// The status it has.
    pub to: String,
    /// The audit record.
    pub audit_id: i64,
}

fn meaning(decision: &Decision, intent: Option<&Intent>, key: &str) -> String {
    match decision {
        Decision::Retry => {
            let mut m = format!(
                "The intent goes back to pending: the executor calls it again, with the same idempotency key \
                 `{key}`."
            );
            if intent.is_some_and(|i| i.semantics == "at_most_once" && i.status == "unknown") {
                m.push_str(
                    " It is at-most-once and its last call was interrupted: the provider may have done it already. \
                     Retrying calls it again; check with the provider first, or resolve it as done.",
                );
            }
            m
        }
        Decision::Resolve { to: Resolution::Done, .. } => {
            "The intent is marked done (the effect happened, as checked with the provider): it is never called \
             again."
                .into()
        }
        Decision::Resolve { to: Resolution::Failed, .. } => {
            "The intent is marked failed (the effect did not happen and must not be tried again): it is never \
             called again."
                .into()
        }
    }
}

fn refusals(decision: &Decision, intent: Option<&Intent>, key: &str) -> Vec<String> {
    let verb = match decision {
        Decision::Retry => "retried",
        Decision::Resolve { .. } => "resolved",
    };
    match intent {
        None => vec![format!("intent {key} does not exist")],
        Some(i) if !DECIDABLE.contains(&i.status.as_str()) => vec![format!(
            "intent {key} is {}: only an unknown, dead or failed intent can be {verb} (a pending or running one is \
             the executor's)",
            i.status
        )],
        Some(_) => Vec::new(),
    }
}

impl Session {
    /// Previews sending the intent `key` back to `pending`.
    pub async fn preview_effect_retry(&self, key: &str, origin: Origin) -> Result<Preview<EffectChange>> {
        self.preview_effect(key, Decision::Retry, origin).await
    }

    /// Previews resolving the intent `key` as done or failed, with the
    /// operator's `reason` (stored with the intent and in the audit log).
    pub async fn preview_effect_resolve(
        &self,
        key: &str,
        to: Resolution,
        reason: &str,
        origin: Origin,
    ) -> Result<Preview<EffectChange>> {
        self.preview_effect(key, Decision::Resolve { to, reason: reason.to_owned() }, origin).await
    }

    async fn preview_effect(&self, key: &str, decision: Decision, origin: Origin) -> Result<Preview<EffectChange>> {
        let intent = crate::store::effects::get(self.pool(), key).await?;
        let (action, to, reason) = match &decision {
            Decision::Retry => ("effects.retry", "pending", None),
            Decision::Resolve { to, reason } => (
                "effects.resolve",
                match to {
                    Resolution::Done => "done",
                    Resolution::Failed => "failed",
                },
                Some(reason.clone()),
            ),
        };
        let change = EffectChange {
            action,
            key: key.to_owned(),
            meaning: meaning(&decision, intent.as_ref(), key),
            refusals: refusals(&decision, intent.as_ref(), key),
            intent,
            to,
            reason,
            decision,
        };
        Ok(Preview::new(self, change, origin))
    }

    async fn execute_effect(&self, c: &EffectChange, trail: &mut Trail) -> Result<EffectChanged> {
        let audit_id = trail.start().await?;
        let done = match &c.decision {
            Decision::Retry => crate::effects::retry(self.pool(), &c.key).await,
            Decision::Resolve { to, reason } => crate::effects::resolve(self.pool(), &c.key, *to, reason).await,
        };
        match done {
            Ok(from) => {
                trail.finish(&AuditOutcome::succeeded(Some(json!({"from": from, "to": c.to})))).await?;
                Ok(EffectChanged { key: c.key.clone(), from, to: c.to.to_owned(), audit_id })
            }
            // Its status changed since the preview (the executor or another operator).
            Err(Error::Refused(reason)) => Err(trail.refuse(reason).await),
            Err(e) => {
                trail.finish_quietly(&AuditOutcome::failed(e.to_string())).await;
                Err(e)
            }
        }
    }
}

impl Operation for EffectChange {
    type Output = EffectChanged;

    fn action(&self) -> &'static str {
        self.action
    }

    fn confirmation_text(&self, environment: &str) -> String {
        let verb = match self.decision {
            Decision::Retry => "RETRY",
            Decision::Resolve { .. } => "RESOLVE",
        };
        format!("{verb} {environment} {}", self.key)
    }

    fn refusals(&self) -> &[String] {
        &self.refusals
    }

    fn audit_entry(&self, entry: AuditEntry) -> AuditEntry {
        let entry = match &self.intent {
            Some(i) => entry
                .group(&i.consumer)
                .before(json!({"status": i.status, "attempts": i.attempts, "semantics": i.semantics})),
            None => entry,
        };
        entry.details(match &self.decision {
            Decision::Retry => json!({"key": self.key}),
            Decision::Resolve { reason, .. } => json!({"key": self.key, "as": self.to, "reason": reason}),
        })
    }

    fn run<'a>(
        &'a self,
        session: &'a Session,
        trail: &'a mut Trail,
    ) -> impl std::future::Future<Output = Result<EffectChanged>> + Send + 'a {
        session.execute_effect(self, trail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(status: &str, semantics: &str) -> Intent {
        let now = chrono::Utc::now();
        Intent {
            key: "pay/charge-card//t#1".into(),
            consumer: "pay".into(),
            effect: "charge-card".into(),
            event_id: "/t#1".into(),
            payload: json!({}),
            semantics: semantics.into(),
            status: status.into(),
            attempts: 1,
            next_attempt_at: now,
            result: None,
            last_error: None,
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn only_unknown_dead_or_failed_intents_are_the_operators() {
        let k = "pay/charge-card//t#1";
        for s in ["unknown", "dead", "failed"] {
            assert!(refusals(&Decision::Retry, Some(&intent(s, "at_least_once")), k).is_empty(), "{s}");
        }
        for s in ["pending", "running", "done", "suppressed"] {
            let r = refusals(&Decision::Retry, Some(&intent(s, "at_least_once")), k);
            assert!(r.len() == 1 && r[0].contains(&format!("is {s}")), "{r:?}");
        }
        let r = refusals(&Decision::Resolve { to: Resolution::Done, reason: String::new() }, None, k);
        assert_eq!(r, vec![format!("intent {k} does not exist")]);
    }

    #[test]
    fn retrying_an_interrupted_at_most_once_call_warns_that_it_may_run_twice() {
        let k = "pay/charge-card//t#1";
        assert!(meaning(&Decision::Retry, Some(&intent("unknown", "at_most_once")), k).contains("may have done it"));
        assert!(!meaning(&Decision::Retry, Some(&intent("dead", "at_least_once")), k).contains("may have done it"));
    }
}
