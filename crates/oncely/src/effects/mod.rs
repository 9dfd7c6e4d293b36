//! Side effects, exactly once in outcome.
//!
//! State is replayable; a card charge, a webhook or an email is not. A handler
//! records an **intent** with [`Cx::effect`](crate::Cx::effect) in its own
//! transaction, keyed `<consumer>/<effect>/<event identity>`: the key is the
//! same on every redelivery and replay, and recording it twice is a no-op.
//! After the commit an [`Executor`] runs due intents through the function
//! registered for the effect, passing the key, which must be given to the
//! provider as its idempotency key (as with Stripe's `Idempotency-Key`).
//!
//! - [`Semantics::AtLeastOnce`] (default): retried with backoff and jitter
//!   until it succeeds or reaches `max_attempts` (then `dead`). A crash
//!   mid-call repeats the call with the same key, and the provider answers
//!   with the first result.
//! - [`Semantics::AtMostOnce`]: for effects that cannot take an idempotency
//!   key. Marked started in its own commit before the call; an attempt that
//!   started and never finished becomes `unknown` and waits for
//!   `oncely effects resolve`, never retried blindly.
//! - In replay mode intents are recorded as `suppressed` and never run.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::store::effects as store;

/// How an effect may be repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Semantics {
    /// Retried until it succeeds; the provider deduplicates by key (default).
    #[default]
    AtLeastOnce,
    /// Never repeated; an interrupted call is `unknown` until an operator resolves it.
    AtMostOnce,
}

impl Semantics {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Semantics::AtLeastOnce => "at_least_once",
            Semantics::AtMostOnce => "at_most_once",
        }
    }
}

/// Why an effect call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EffectError {
    /// A transient failure: try again later (for at-most-once effects this
    /// must mean the request was certainly not acted upon, e.g. the
    /// connection was refused).
    #[error("transient: {0}")]
    Transient(String),
    /// The provider refused for good: no retry.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The call may or may not have taken effect (timeout after sending).
    /// At-least-once effects retry it (with the same key); at-most-once
    /// effects become `unknown`.
    #[error("ambiguous: {0}")]
    Ambiguous(String),
}

/// One call of an effect: what the executor function receives.
#[derive(Debug, Clone)]
pub struct EffectCall {
    /// The idempotency key: `<consumer>/<effect>/<event identity>`.
    pub key: String,
    /// The payload recorded by the handler.
    pub payload: serde_json::Value,
    /// Which attempt this is (1-based).
    pub attempt: i32,
}

/// Runs an effect. Implemented for every `Fn(EffectCall) -> impl Future<Output
/// = Result<serde_json::Value, EffectError>>`.
pub trait EffectFn: Send + Sync + 'static {
    /// Performs the call; the returned value is stored as the result.
    fn call(&self, call: EffectCall) -> BoxFuture<'static, Result<serde_json::Value, EffectError>>;
}

impl<F, Fut> EffectFn for F
where
    F: Fn(EffectCall) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, EffectError>> + Send + 'static,
{
    fn call(&self, call: EffectCall) -> BoxFuture<'static, Result<serde_json::Value, EffectError>> {
        Box::pin(self(call))
    }
}

/// Settings of one registered effect.
#[derive(Debug, Clone)]
pub struct EffectOptions {
    /// Default at-least-once.
    pub semantics: Semantics,
    /// Attempts before an at-least-once intent is `dead`. Default 8.
    pub max_attempts: i32,
    /// Backoff base and cap (exponential, full jitter). Defaults 500 ms and 5 min.
    pub backoff: (Duration, Duration),
}

impl Default for EffectOptions {
    fn default() -> Self {
        EffectOptions {
            semantics: Semantics::AtLeastOnce,
            max_attempts: 8,
            backoff: (Duration::from_millis(500), Duration::from_secs(300)),
        }
    }
}

impl EffectOptions {
    /// At-most-once options.
    pub fn at_most_once() -> Self {
        EffectOptions { semantics: Semantics::AtMostOnce, max_attempts: 1, ..Default::default() }
    }
}

#[derive(Clone)]
pub(crate) struct Registered {
    pub f: Arc<dyn EffectFn>,
    pub opts: EffectOptions,
}

/// The effects a process can run, by name.
#[derive(Clone, Default)]
pub struct Registry {
    pub(crate) effects: HashMap<String, Registered>,
    pub(crate) declared: HashMap<String, Semantics>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("effects", &self.effects.keys().collect::<Vec<_>>()).finish()
    }
}

impl Registry {
    /// Registers `f` to run effect `name`.
    pub fn register(&mut self, name: impl Into<String>, f: impl EffectFn, opts: EffectOptions) {
        self.effects.insert(name.into(), Registered { f: Arc::new(f), opts });
    }

    /// The semantics of `name` (at-least-once for unknown names: another
    /// process may run them).
    pub fn semantics(&self, name: &str) -> Semantics {
        self.effects.get(name).map(|r| r.opts.semantics).unwrap_or_default()
    }

    /// The semantics of `name` if this process knows the effect (registered
    /// with an executor, or declared for an executor running elsewhere).
    pub fn semantics_of(&self, name: &str) -> Option<Semantics> {
        self.effects.get(name).map(|r| r.opts.semantics).or_else(|| self.declared.get(name).copied())
    }

    /// Declares an effect run by an executor in another process.
    pub fn declare(&mut self, name: impl Into<String>, semantics: Semantics) {
        self.declared.insert(name.into(), semantics);
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.effects.is_empty()
    }
}

/// Runs due intents after commit: in-process with a consumer (it is woken
/// after each batch that recorded intents) or on its own.
#[derive(Debug, Clone)]
pub struct Executor {
    pool: PgPool,
    registry: Registry,
    concurrency: usize,
    lease: Duration,
    poll: Duration,
    wake: Arc<Notify>,
}

impl Executor {
    /// An executor over `pool` for the effects in `registry`. Defaults:
    /// 16 concurrent calls, a 60 s lease (an intent whose executor died is
    /// taken up again after it), polling every second besides the wake-ups.
    pub fn new(pool: PgPool, registry: Registry) -> Self {
        Executor {
            pool,
            registry,
            concurrency: 16,
            lease: Duration::from_secs(60),
            poll: Duration::from_secs(1),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Calls in flight at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How long a claimed intent is held before another executor may take it
    /// (at-least-once) or it becomes `unknown` (at-most-once). Keep it above the
    /// longest call.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }

    /// Polling interval besides the wake-ups.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll = d;
        self
    }

    /// A handle that wakes the executor (the consumer calls it after commits).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let names: Vec<String> = self.registry.effects.keys().cloned().collect();
        if names.is_empty() {
            return Ok(());
        }
        let permits = Arc::new(Semaphore::new(self.concurrency));
        loop {
            match store::reap_expired(&self.pool).await {
                Ok((0, 0)) => {}
                Ok((requeued, unknown)) => {
                    tracing::warn!(requeued, unknown, "Took up intents whose executor stopped during the call.")
                }
                Err(e) => tracing::warn!(error = %e, "Reaping expired intents failed."),
            }
            let free = permits.available_permits();
            let claimed = if free > 0 {
                store::claim_due(&self.pool, &names, free as i64, self.lease).await.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "Claiming due intents failed.");
                    Vec::new()
                })
            } else {
                Vec::new()
            };
            let full = claimed.len() == free && free > 0;
            for intent in claimed {
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let Some(reg) = self.registry.effects.get(&intent.effect).cloned() else { continue };
                let pool = self.pool.clone();
                tokio::spawn(async move {
                    run_one(&pool, reg, intent).await;
                    drop(permit);
                });
            }
            if full {
                // More may be due: go again at once (once a permit frees up).
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = permits.acquire() => {}
                }
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
            }
        }
        // Let calls in flight finish (their outcome is recorded).
        let _ = tokio::time::timeout(Duration::from_secs(10), permits.acquire_many(self.concurrency as u32)).await;
        Ok(())
    }
}

fn backoff(opts: &EffectOptions, attempt: i32) -> Duration {
    let (base, max) = opts.backoff;
    let exp = base.saturating_mul(1u32 << (attempt.clamp(1, 20) - 1) as u32).min(max);
    let ms = exp.as_millis() as u64;
    Duration::from_millis(ms / 10 + fastrand::u64(0..=ms - ms / 10))
}

async fn run_one(pool: &PgPool, reg: Registered, intent: store::Intent) {
    let call = EffectCall { key: intent.key.clone(), payload: intent.payload.clone(), attempt: intent.attempts };
    let span = tracing::info_span!("effect", key = %intent.key, effect = %intent.effect, attempt = intent.attempts);
    let _g = span.enter();
    let result = reg.f.call(call).await;
    let at_most_once = reg.opts.semantics == Semantics::AtMostOnce;
    let (outcome, recorded) = match &result {
        Ok(v) => ("done", store::finish(pool, &intent.key, "done", Some(v), None).await),
        Err(EffectError::Permanent(e)) => ("failed", store::finish(pool, &intent.key, "failed", None, Some(e)).await),
        Err(EffectError::Ambiguous(e)) if at_most_once => {
            ("unknown", store::finish(pool, &intent.key, "unknown", None, Some(e)).await)
        }
        Err(EffectError::Transient(e) | EffectError::Ambiguous(e)) => {
            if intent.attempts >= reg.opts.max_attempts {
                ("dead", store::finish(pool, &intent.key, "dead", None, Some(e)).await)
            } else {
                let d = backoff(&reg.opts, intent.attempts);
                ("retry", store::retry_later(pool, &intent.key, d, e).await)
            }
        }
    };
    match recorded {
        Ok(_) => {}
        // The outcome could not be recorded: the lease expires and the intent
        // is taken up again (same key) or becomes unknown (at-most-once).
        Err(e) => tracing::error!(error = %e, outcome, "Recording an effect's outcome failed."),
    }
    if let Err(e) = &result {
        tracing::warn!(error = %e, outcome, "Effect call failed.");
    }
    crate::metrics::inc(
        "oncely_effects_total",
        "Effect calls by outcome: done, retry, failed, dead, unknown.",
        &[("effect", &intent.effect), ("outcome", outcome)],
        1,
    );
}

/// How an operator resolves an intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The effect happened (checked with the provider): mark it done.
    Done,
    /// The effect did not happen and must not be tried again: mark it failed.
    Failed,
}

/// Operator: resolves an `unknown`, `dead` or `failed` intent as done or
/// failed, with a note stored as its last error. Returns the status it had;
/// refuses other statuses (a pending or running intent is not the
/// operator's to decide).
pub async fn resolve(pool: &PgPool, key: &str, to: Resolution, note: &str) -> Result<String> {
    let to = match to {
        Resolution::Done => "done",
        Resolution::Failed => "failed",
    };
    let note = format!("resolved as {to} by an operator: {note}");
    store::set_status(pool, key, &["unknown", "dead", "failed"], to, &note)
        .await?
        .ok_or_else(|| crate::Error::Refused(format!("intent {key} does not exist or is not unknown, dead or failed")))
}

/// Operator: sends a `dead`, `failed` or `unknown` intent back to `pending`,
/// due now, with its attempts kept (the key, and so the idempotency key, is the
/// same). Returns the status it had.
pub async fn retry(pool: &PgPool, key: &str) -> Result<String> {
    store::set_status(pool, key, &["dead", "failed", "unknown"], "pending", "")
        .await?
        .ok_or_else(|| crate::Error::Refused(format!("intent {key} does not exist or is not dead, failed or unknown")))
}

/// The key of an intent.
pub fn intent_key(consumer: &str, effect: &str, event_id: &str, suffix: Option<&str>) -> String {
    match suffix {
        Some(s) => format!("{consumer}/{effect}/{event_id}/{s}"),
        None => format!("{consumer}/{effect}/{event_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_derived_from_identity_only() {
        assert_eq!(intent_key("pay", "charge-card", "/orders#1", None), "pay/charge-card//orders#1");
        assert_eq!(intent_key("pay", "email", "/orders#1", Some("receipt")), "pay/email//orders#1/receipt");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let o = EffectOptions { backoff: (Duration::from_millis(100), Duration::from_secs(1)), ..Default::default() };
        for _ in 0..50 {
            assert!(backoff(&o, 1) <= Duration::from_millis(100));
            assert!(backoff(&o, 3) <= Duration::from_millis(400));
            assert!(backoff(&o, 3) >= Duration::from_millis(40));
            assert!(backoff(&o, 30) <= Duration::from_secs(1));
        }
    }
}
