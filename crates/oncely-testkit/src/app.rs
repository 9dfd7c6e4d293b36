//! A small application used by the runtime's tests: a handler that records
//! every application in a table, with behaviour a test can steer (fail, panic,
//! hang), run in-process or as a separate process (`test-consumer`) that a
//! test can SIGKILL.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use oncely::{Consumer, ConsumerBuilder, Cx, Event, HandlerError, Publisher, State};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The event the tests publish: a per-key sequence number.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeqEvent {
    /// Entity key (also the Kafka key).
    pub key: String,
    /// 1, 2, 3… per key, in publish order.
    pub seq: i64,
}

/// How the test handler behaves.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Keys that fail transiently this many times in total (per process),
    /// then succeed.
    pub fail_times: HashMap<String, u32>,
    /// Keys whose events always panic.
    pub panic_keys: HashSet<String>,
    /// Keys whose events are rejected (permanent failure); a test may change
    /// it while the consumer runs ("the bug is fixed").
    pub reject_keys: Mutex<HashSet<String>>,
    /// After this many applied events, write the row, print `HANGING <event id>` and block forever.
    pub hang_after: Option<u64>,
    /// Time spent per event.
    pub delay: Duration,
    /// Tag written with each row (which process applied it).
    pub tag: String,
    /// Record a `charge-card` effect for every applied event.
    pub charge: bool,
    /// Keys whose events run a failing SQL statement, ignore its error and
    /// return Ok (which leaves the transaction aborted).
    pub swallow_keys: HashSet<String>,
    /// Keys whose events take this long (a ten-minute reconciliation, scaled down).
    pub slow_keys: HashMap<String, Duration>,
    /// Keys whose events run `pg_sleep` for this long inside the batch
    /// transaction: the statement keeps running in PostgreSQL even when the
    /// lane abandons the batch.
    pub sql_sleep_keys: HashMap<String, Duration>,
    applied: AtomicU64,
    failures: Mutex<HashMap<String, u32>>,
}

impl Behaviour {
    /// A plain behaviour with a tag.
    pub fn tagged(tag: &str) -> Self {
        Behaviour { tag: tag.into(), ..Default::default() }
    }
}

/// Creates the table the test handler writes.
pub async fn setup(pool: &PgPool) -> Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS applied (
            n bigserial PRIMARY KEY,
            event_id text NOT NULL,
            key text NOT NULL,
            seq bigint NOT NULL,
            tag text NOT NULL DEFAULT '',
            applied_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The test handler: one row per applied event.
pub async fn record(ev: Event<SeqEvent>, cx: &mut Cx, b: State<Behaviour>) -> Result<(), HandlerError> {
    let key = ev.data.key.clone();
    if b.panic_keys.contains(&key) {
        panic!("test handler told to panic for key {key}");
    }
    if b.reject_keys.lock().map_err(|_| HandlerError::retry("poisoned"))?.contains(&key) {
        return Err(HandlerError::reject(format!("key {key} is rejected")));
    }
    if let Some(times) = b.fail_times.get(&key) {
        let mut f = b.failures.lock().map_err(|_| HandlerError::retry("poisoned"))?;
        let n = f.entry(key.clone()).or_default();
        if *n < *times {
            *n += 1;
            return Err(HandlerError::retry(format!("key {key} fails (attempt {n} of {times})")));
        }
    }
    if b.swallow_keys.contains(&key) {
        // A bug a handler can have: the error is dropped, the transaction is
        // left aborted, and the handler says all is well.
        let _ = sqlx::query("SELECT 1 / 0").execute(cx.db()).await;
        return Ok(());
    }
    if let Some(d) = b.sql_sleep_keys.get(&key) {
        sqlx::query("SELECT pg_sleep($1)").bind(d.as_secs_f64()).execute(cx.db()).await?;
    }
    let delay = b.slow_keys.get(&key).copied().unwrap_or(b.delay);
    let tag = b.tag.clone();
    let hang = b.hang_after;
    let count = b.applied.fetch_add(1, Ordering::SeqCst) + 1;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    sqlx::query("INSERT INTO applied (event_id, key, seq, tag) VALUES ($1, $2, $3, $4)")
        .bind(ev.id.display())
        .bind(&key)
        .bind(ev.data.seq)
        .bind(&tag)
        .execute(cx.db())
        .await?;
    if b.charge {
        cx.effect("charge-card", &serde_json::json!({"order": key, "seq": ev.data.seq, "amount": 1000}))?;
    }
    if hang == Some(count) {
        // The row is written inside the open batch transaction; the test kills
        // the process now, before the commit.
        println!("HANGING {}", ev.id.display());
        let _ = std::io::stdout().flush();
        std::future::pending::<()>().await;
    }
    Ok(())
}

/// The test handler as a batch handler: one multi-row insert per batch; a
/// panic key panics the whole call (so oncely isolates it event by event).
pub async fn record_batch(evs: Vec<Event<SeqEvent>>, cx: &mut Cx, b: State<Behaviour>) -> Result<(), HandlerError> {
    if let Some(ev) = evs.iter().find(|e| b.panic_keys.contains(&e.data.key)) {
        panic!("test batch handler told to panic for key {}", ev.data.key);
    }
    let ids: Vec<String> = evs.iter().map(|e| e.id.display()).collect();
    let keys: Vec<String> = evs.iter().map(|e| e.data.key.clone()).collect();
    let seqs: Vec<i64> = evs.iter().map(|e| e.data.seq).collect();
    sqlx::query(
        "INSERT INTO applied (event_id, key, seq, tag)
         SELECT i, k, s, $4 FROM unnest($1::text[], $2::text[], $3::int8[]) WITH ORDINALITY AS x(i, k, s, o) ORDER BY o",
    )
    .bind(&ids)
    .bind(&keys)
    .bind(&seqs)
    .bind(&b.tag)
    .execute(cx.db())
    .await?;
    Ok(())
}

/// A consumer of `topic` in group `group` with the test handler (pass an
/// `Arc<Behaviour>` to keep a handle on it while it runs).
pub fn consumer(
    group: &str,
    topic: &str,
    pool: PgPool,
    behaviour: impl Into<Arc<Behaviour>>,
) -> ConsumerBuilder<Behaviour> {
    Consumer::builder(group)
        .shared_state(behaviour.into())
        .bootstrap_servers(crate::bootstrap())
        .pool(pool)
        .topic(topic)
        .handler(record)
        .handle_sigterm(false)
        .kafka("session.timeout.ms", "6000")
        .kafka("heartbeat.interval.ms", "500")
        .force_inbox_retention(true)
}

/// The name of the test's effect.
pub const CHARGE: &str = "charge-card";

/// [`consumer`] with a `charge-card` effect run against the fake gateway at `gateway_url`.
pub fn consumer_with_gateway(
    group: &str,
    topic: &str,
    pool: PgPool,
    mut behaviour: Behaviour,
    gateway_url: &str,
    opts: oncely::effects::EffectOptions,
) -> Result<ConsumerBuilder<Behaviour>> {
    behaviour.charge = true;
    let client = crate::gateway::GatewayClient::new(gateway_url, Duration::from_secs(5))?;
    let charge = move |call: oncely::effects::EffectCall| {
        let client = client.clone();
        async move { client.charge(&call.key, &call.payload).await }
    };
    Ok(consumer(group, topic, pool, behaviour).effect_executor(CHARGE, charge, opts))
}

/// Publishes `per_key` events for each of `keys` keys (`k0`, `k1`, …), seq
/// 1..=per_key, interleaved; returns what was published.
pub async fn publish_seq(topic: &str, keys: usize, per_key: i64) -> Result<Vec<oncely::envelope::Published>> {
    let publisher = Publisher::new(crate::bootstrap(), "/tests/seq")?;
    let mut out = Vec::new();
    let mut batch = Vec::new();
    for seq in 1..=per_key {
        for k in 0..keys {
            let ev = SeqEvent { key: format!("k{k}"), seq };
            batch.push(ev);
        }
    }
    for chunk in batch.chunks(500) {
        let sends = chunk.iter().map(|ev| publisher.publish(topic, &ev.key, "test.seq", ev));
        // join_all polls in order, so records are enqueued in order (per-key order).
        for r in futures::future::join_all(sends).await {
            out.push(r?);
        }
    }
    Ok(out)
}

/// Parses `k1:3,k2:1` into per-key failure counts.
pub fn parse_fail_keys(spec: &str) -> HashMap<String, u32> {
    spec.split(',')
        .filter_map(|kv| kv.split_once(':'))
        .filter_map(|(k, n)| n.trim().parse().ok().map(|n| (k.trim().to_owned(), n)))
        .collect()
}

/// Rows of `applied`: `(n, event_id, key, seq)` in application order.
pub async fn applied(pool: &PgPool) -> Result<Vec<(i64, String, String, i64)>> {
    Ok(sqlx::query_as("SELECT n, event_id, key, seq FROM applied ORDER BY n").fetch_all(pool).await?)
}

/// Checks exactly-once and per-key order over `applied`: every published
/// identity applied exactly once, and per key the sequence is 1, 2, 3… in
/// application order. Returns a description of the first violation.
pub async fn check_exactly_once_in_order(pool: &PgPool, published: &[oncely::envelope::Published]) -> Result<()> {
    let rows = applied(pool).await?;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (_, id, _, _) in &rows {
        *seen.entry(id.as_str()).or_default() += 1;
    }
    let dup: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    anyhow::ensure!(dup.is_empty(), "events applied more than once: {dup:?}");
    let missing: Vec<_> = published
        .iter()
        .filter(|p| !seen.contains_key(p.event_id.display().as_str()))
        .take(5)
        .map(|p| p.event_id.clone())
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "events never applied: {missing:?} ({} rows for {} published)",
        rows.len(),
        published.len()
    );
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (n, _, key, seq) in &rows {
        let prev = last.insert(key.as_str(), *seq).unwrap_or(0);
        anyhow::ensure!(*seq == prev + 1, "key {key}: seq {seq} applied after {prev} (row {n})");
    }
    Ok(())
}
