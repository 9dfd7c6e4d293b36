//! Side effects, exactly once in outcome.
//!
//! State is replayable; a card charge, a webhook or an email is not. A handler
//! records an **intent** with [`Cx::effect`](crate::Cx::effect) in its own
//! transaction, keyed `<consumer>/<effect>/<event identity>` ([`intent_key`]):
//! the key is the same on every redelivery and replay, and recording it twice
//! is a no-op. After the commit an [`Executor`] runs due intents through the
//! function registered for the effect, passing the key, which must be given to
//! the provider as its idempotency key (as with Stripe's `Idempotency-Key`).
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
//!
//! The semantics an intent runs with are the ones **stored with it** when it
//! was recorded, whatever the executor's registration says now: an intent
//! recorded at-most-once is never re-sent by an executor that registered the
//! effect at-least-once.
//!
//! # Leases and stale executors
//!
//! A claimed intent is `running` with a lease (`lease_until`). While the call
//! runs the executor renews the lease every third of it, so a long call is
//! not taken for a dead executor's; if the executor dies, the renewals stop
//! and the lease expires (at-least-once intents are then taken up again,
//! at-most-once ones become `unknown`).
//!
//! Every claim increments the intent's `attempts`, and the claimed value is
//! the attempt's **fencing token**: every renewal and every outcome write
//! names it, and a write whose token is no longer the intent's (another
//! executor claimed it since, after the lease expired) or whose intent is no
//! longer `running` (reaped, resolved by an operator) changes nothing and is
//! logged. An at-least-once call whose lease was taken over is abandoned; an
//! at-most-once call is left to finish, and its outcome is logged for the
//! operator who resolves the intent.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::error::Result;
use crate::store::effects as store;

// Intents as operators read them (the CLI, the console).
pub use crate::store::effects::{get, list, Intent};

/// The intent protocol the [`Executor`] runs (record, claim with a fencing
/// token, renew, finish, retry later, reap expired leases).
// Test hook: `oncely-testkit/tests/effects.rs` drives it step by step against
// a real database to check the fencing; not part of the API.
#[doc(hidden)]
pub mod intents {
    pub use crate::store::effects::{
        claim_due, count_by_status, finish, get, list, reap_expired, record, renew, retry_later, NewIntent,
    };
}

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

    /// The semantics of a stored name; `None` for any other string.
    pub fn from_stored(s: &str) -> Option<Self> {
        match s {
            "at_least_once" => Some(Semantics::AtLeastOnce),
            "at_most_once" => Some(Semantics::AtMostOnce),
            _ => None,
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
    /// Backoff base and cap ([`Backoff`]: exponential, full jitter with a
    /// floor of a tenth). Defaults 500 ms and 5 min.
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

    /// How long a claimed intent is held without a sign of life from its
    /// executor before another executor may take it (at-least-once) or it
    /// becomes `unknown` (at-most-once). Default 60 s. The executor renews the
    /// lease every third of it while the call runs, so a call may take longer
    /// than the lease; the lease is how long the intent of an executor that
    /// died (or lost the database) waits.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d.max(Duration::from_millis(30));
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
                let lease = self.lease;
                tokio::spawn(async move {
                    run_one(&pool, reg, intent, lease).await;
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
    // `attempt` is 1-based: the wait after the first attempt is the base step.
    let n = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0);
    Backoff::new(opts.backoff.0, opts.backoff.1).delay(n)
}

/// How a call ended with respect to its lease.
enum Leased<T> {
    /// The call finished; `kept` is false if the lease was taken over meanwhile.
    Finished { result: T, kept: bool },
    /// The lease was taken over and the call abandoned.
    Abandoned,
}

/// Runs `call` while renewing the intent's lease every third of it, fenced by
/// the attempt's token. When a renewal finds the intent taken over, an
/// at-least-once call is abandoned (another executor runs it now, with the
/// same key); an at-most-once call is left to finish, so that its outcome can
/// be logged for the operator.
async fn with_lease<T>(
    pool: &PgPool,
    intent: &store::Intent,
    semantics: Semantics,
    lease: Duration,
    call: impl Future<Output = T>,
) -> Leased<T> {
    let every = lease / 3;
    let heartbeat = async {
        loop {
            tokio::time::sleep(every).await;
            match store::renew(pool, &intent.key, intent.attempts, lease).await {
                Ok(true) => {}
                Ok(false) => return,
                // The next renewal may still be in time; if not, it finds
                // the intent taken over.
                Err(e) => tracing::warn!(error = %e, "Renewing an effect's lease failed."),
            }
        }
    };
    let mut call = std::pin::pin!(call);
    tokio::select! {
        result = &mut call => return Leased::Finished { result, kept: true },
        () = heartbeat => {}
    }
    tracing::warn!(
        semantics = semantics.as_str(),
        "This executor's lease on the intent was taken over during the call (its renewals did not reach the database in time)."
    );
    match semantics {
        Semantics::AtLeastOnce => Leased::Abandoned,
        Semantics::AtMostOnce => Leased::Finished { result: call.await, kept: false },
    }
}

async fn run_one(pool: &PgPool, reg: Registered, intent: store::Intent, lease: Duration) {
    use tracing::Instrument as _;
    let span = tracing::info_span!("effect", key = %intent.key, effect = %intent.effect, attempt = intent.attempts);
    // Instrumented, not entered: a guard held across an await leaves the
    // span entered on the worker thread while the call waits, so other
    // tasks there (the executor's own loop) find a span that may close
    // under them, and tracing-subscriber panics ("tried to clone a span that
    // already closed"), taking the executor task down.
    run_one_in_span(pool, reg, intent, lease).instrument(span).await;
}

async fn run_one_in_span(pool: &PgPool, reg: Registered, intent: store::Intent, lease: Duration) {
    // The semantics the intent was recorded with, not the registration's: a
    // registration changed to at-least-once must not re-send an intent that
    // was recorded at-most-once. A value this version does not know is
    // treated as at-most-once, the one that never repeats a call.
    let semantics = Semantics::from_stored(&intent.semantics).unwrap_or_else(|| {
        tracing::error!(semantics = %intent.semantics, "Unknown stored semantics; running the intent at most once.");
        Semantics::AtMostOnce
    });
    let at_most_once = semantics == Semantics::AtMostOnce;
    let token = intent.attempts;
    let call = EffectCall { key: intent.key.clone(), payload: intent.payload.clone(), attempt: intent.attempts };
    let (result, kept) = match with_lease(pool, &intent, semantics, lease, reg.f.call(call)).await {
        Leased::Finished { result, kept } => (result, kept),
        Leased::Abandoned => {
            count(&intent.effect, "abandoned");
            return;
        }
    };
    let (outcome, recorded) = match &result {
        Ok(v) => ("done", store::finish(pool, &intent.key, token, "done", Some(v), None).await),
        Err(EffectError::Permanent(e)) => {
            ("failed", store::finish(pool, &intent.key, token, "failed", None, Some(e)).await)
        }
        Err(EffectError::Ambiguous(e)) if at_most_once => {
            ("unknown", store::finish(pool, &intent.key, token, "unknown", None, Some(e)).await)
        }
        Err(EffectError::Transient(e) | EffectError::Ambiguous(e)) => {
            if intent.attempts >= reg.opts.max_attempts {
                ("dead", store::finish(pool, &intent.key, token, "dead", None, Some(e)).await)
            } else {
                let d = backoff(&reg.opts, intent.attempts);
                ("retry", store::retry_later(pool, &intent.key, token, d, e).await)
            }
        }
    };
    if let Err(e) = &result {
        tracing::warn!(error = %e, outcome, "Effect call failed.");
    }
    match recorded {
        Ok(true) => count(&intent.effect, outcome),
        Ok(false) => {
            // Fenced off: another executor claimed the intent after this
            // one's lease expired, or it was reaped or resolved meanwhile.
            let now = store::get(pool, &intent.key).await.ok().flatten();
            let (status, attempts) = now.map(|i| (i.status, i.attempts)).unwrap_or_else(|| ("(gone)".into(), 0));
            let result = match &result {
                Ok(v) => v.to_string(),
                Err(e) => e.to_string(),
            };
            if at_most_once || !kept {
                tracing::error!(
                    outcome, result = %result, status = %status, current_attempt = attempts, lease_kept = kept,
                    "Refused the outcome of a stale effect attempt: the intent is no longer this attempt's. \
                     If it is `unknown`, this outcome is what happened: resolve it with `oncely effects resolve`."
                );
            } else {
                tracing::warn!(
                    outcome, result = %result, status = %status, current_attempt = attempts,
                    "Refused the outcome of a stale effect attempt: the intent is no longer this attempt's."
                );
            }
            count(&intent.effect, "stale");
        }
        // The outcome could not be recorded: the lease expires and the intent
        // is taken up again (same key) or becomes unknown (at-most-once).
        Err(e) => tracing::error!(error = %e, outcome, "Recording an effect's outcome failed."),
    }
}

fn count(effect: &str, outcome: &str) {
    crate::metrics::inc(
        "oncely_effects_total",
        "Effect calls by outcome: done, retry, failed, dead, unknown; stale (outcome refused: the intent was taken \
         over), abandoned (at-least-once call dropped when its lease was taken over).",
        &[("effect", effect), ("outcome", outcome)],
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

/// The key of an intent: `<consumer>/<effect>/<event identity>[/<suffix>]`,
/// with `%` and `/` percent-encoded in every component (`%25`, `%2F`), so two
/// different inputs never give the same key (without the encoding, `effect()`
/// for event `s#1/r` and `effect_keyed("r")` for event `s#1` collided). A
/// component without `%` or `/` is used as it is.
///
/// Keys are stored with their intents: an intent recorded by an older version
/// (components not encoded) keeps its key, and its idempotency key with it.
pub fn intent_key(consumer: &str, effect: &str, event_id: &str, suffix: Option<&str>) -> String {
    let mut key = String::with_capacity(consumer.len() + effect.len() + event_id.len() + 3);
    for (i, part) in [Some(consumer), Some(effect), Some(event_id), suffix].into_iter().flatten().enumerate() {
        if i > 0 {
            key.push('/');
        }
        encode_component(&mut key, part);
    }
    key
}

/// The ordering key of an effect for one entity: `<effect>/<entity>`, both
/// parts percent-encoded like the intent key's, so that effect `a/b` of
/// entity `c` and effect `a` of entity `b/c` never share an order.
pub fn ordering_key(effect: &str, entity: &str) -> String {
    let mut key = String::with_capacity(effect.len() + entity.len() + 1);
    encode_component(&mut key, effect);
    key.push('/');
    encode_component(&mut key, entity);
    key
}

fn encode_component(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    #[test]
    fn keys_are_stable_and_derived_from_identity_only() {
        assert_eq!(intent_key("pay", "charge-card", "orders#1", None), "pay/charge-card/orders#1");
        assert_eq!(intent_key("pay", "charge-card", "/orders#1", None), "pay/charge-card/%2Forders#1");
        assert_eq!(intent_key("pay", "email", "/orders#1", Some("receipt")), "pay/email/%2Forders#1/receipt");
        assert_eq!(intent_key("p%y", "a/b", "x", Some("")), "p%25y/a%2Fb/x/");
    }

    #[test]
    fn an_identity_with_a_slash_is_not_another_events_suffix() {
        // The collision the encoding removes: effect() of event `s#1/r`
        // against effect_keyed("r") of event `s#1`.
        assert_ne!(intent_key("c", "e", "s#1/r", None), intent_key("c", "e", "s#1", Some("r")));
        assert_ne!(intent_key("c", "e/x", "1", None), intent_key("c", "e", "x/1", None));
        assert_ne!(intent_key("c", "e", "%2F", None), intent_key("c", "e", "/", None));
        assert_ne!(intent_key("c", "e", "1", None), intent_key("c", "e", "1", Some("")));
    }

    /// Reverses `intent_key`: the components it was built from.
    fn decode(key: &str) -> Vec<String> {
        key.split('/').map(|p| p.replace("%2F", "/").replace("%25", "%")).collect()
    }

    /// Every way to cut `joined` at its slashes into 3 or 4 components.
    fn resplits(joined: &str) -> Vec<Vec<String>> {
        let cuts: Vec<usize> = joined.match_indices('/').map(|(i, _)| i).collect();
        let mut out = Vec::new();
        for n in [2, 3] {
            let mut chosen = Vec::new();
            choose(&cuts, n, &mut chosen, &mut |picked| {
                let mut parts = Vec::new();
                let mut start = 0;
                for &cut in picked {
                    parts.push(joined[start..cut].to_owned());
                    start = cut + 1;
                }
                parts.push(joined[start..].to_owned());
                out.push(parts);
            });
        }
        out
    }

    fn choose(from: &[usize], n: usize, chosen: &mut Vec<usize>, f: &mut impl FnMut(&[usize])) {
        if chosen.len() == n {
            f(chosen);
            return;
        }
        for (i, &c) in from.iter().enumerate() {
            chosen.push(c);
            choose(&from[i + 1..], n, chosen, f);
            chosen.pop();
        }
    }

    fn component() -> impl Strategy<Value = String> {
        // Mostly the characters that matter, so collisions would be found.
        prop_oneof!["[/%2F5a#]{0,6}", any::<String>(),]
    }

    proptest! {
        #[test]
        fn distinct_inputs_give_distinct_keys(
            a in (component(), component(), component(), proptest::option::of(component())),
            b in (component(), component(), component(), proptest::option::of(component())),
        ) {
            let ka = intent_key(&a.0, &a.1, &a.2, a.3.as_deref());
            let kb = intent_key(&b.0, &b.1, &b.2, b.3.as_deref());
            prop_assert_eq!(ka == kb, a == b, "{:?} -> {}, {:?} -> {}", a, ka, b, kb);
        }

        #[test]
        fn moving_a_slash_between_components_changes_the_key(
            c in "[/a%]{0,4}", e in "[/a%]{0,4}", id in "[/a%]{0,4}", suffix in proptest::option::of("[/a%]{0,4}"),
        ) {
            // Every other split of the plain `/`-joined components: all of
            // them collided before the components were encoded.
            let mut parts = vec![c.clone(), e.clone(), id.clone()];
            parts.extend(suffix.clone());
            let joined = parts.join("/");
            let key = intent_key(&c, &e, &id, suffix.as_deref());
            for other in resplits(&joined) {
                if other != parts {
                    let k = intent_key(&other[0], &other[1], &other[2], other.get(3).map(String::as_str));
                    prop_assert_ne!(&k, &key, "{:?} and {:?}", parts, other);
                }
            }
        }

        #[test]
        fn a_key_decodes_to_its_components(
            c in component(), e in component(), id in component(), suffix in proptest::option::of(component()),
        ) {
            let mut want = vec![c.clone(), e.clone(), id.clone()];
            want.extend(suffix.clone());
            prop_assert_eq!(decode(&intent_key(&c, &e, &id, suffix.as_deref())), want);
        }
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let o = EffectOptions { backoff: (Duration::from_millis(100), Duration::from_secs(1)), ..Default::default() };
        for _ in 0..50 {
            assert!(backoff(&o, 1) <= Duration::from_millis(100));
            assert!(backoff(&o, 1) >= Duration::from_millis(10));
            assert!(backoff(&o, 3) <= Duration::from_millis(400));
            assert!(backoff(&o, 3) >= Duration::from_millis(40));
            assert!(backoff(&o, 30) <= Duration::from_secs(1));
            assert!(backoff(&o, 30) >= Duration::from_millis(100));
        }
    }

    #[test]
    fn stored_semantics_round_trip() {
        for s in [Semantics::AtLeastOnce, Semantics::AtMostOnce] {
            assert_eq!(Semantics::from_stored(s.as_str()), Some(s));
        }
        assert_eq!(Semantics::from_stored("exactly_once"), None);
    }
}
