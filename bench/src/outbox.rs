//! `bench outbox`: the transactional outbox's relay.
//!
//! - **Throughput**: `--events` rows are enqueued first (a backlog), then one
//!   relay drains it; relay events/s = rows / time from the relay's start to
//!   the broker's acknowledgement of the last row (and to the last mark).
//! - **Latency**: `--rate` events/s for `--latency-seconds`, one event per
//!   transaction from several writers; per event, the time from the commit
//!   returning to the row being marked published, which happens right after
//!   the broker's acknowledgement (so an upper bound of commit → ack); and
//!   from the relay's own histogram, enqueue → acknowledgement (bucket bounds,
//!   share within 50 ms). Once with LISTEN/NOTIFY, once polling only
//!   (`--poll-ms`), for contrast.
//!
//! Runs in a fresh database (dropped at the end) on the server of
//! `DATABASE_URL`, against the broker of `ONCELY_KAFKA_BOOTSTRAP`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

use crate::common::{bootstrap, create_topic, database_url};
use chrono::{DateTime, Utc};
use clap::Args;
use oncely::outbox::{self, Batched, OutgoingEvent, Relay};
use oncely::store::with_database;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// Options of `bench outbox`.
#[derive(Debug, Clone, Args)]
pub struct OutboxArgs {
    /// Rows in the backlog the relay drains (throughput run).
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// The relay's batch size.
    #[arg(long, default_value_t = 2000)]
    pub batch_size: usize,
    /// Events per second in the latency runs (one per transaction).
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Length of each latency run, in seconds.
    #[arg(long, default_value_t = 10)]
    pub latency_seconds: u64,
    /// The relay's poll interval (the only wake-up of the polling-only run).
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// Print one JSON object with the results as the last line.
    #[arg(long)]
    pub json: bool,
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{:010x}", fastrand::u64(..) & 0xff_ffff_ffff)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    crate::common::percentile(sorted, p).unwrap_or(f64::NAN)
}

/// Cumulative bucket counts `(le seconds, count)` of the relay's
/// enqueue-to-acknowledgement histogram, from the process's metrics.
fn ack_buckets() -> Vec<(f64, u64)> {
    let prefix = "oncely_outbox_publish_seconds_bucket{le=\"";
    oncely::metrics::render()
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// From the bucket counts before and after a run: the bucket bounds (ms)
/// holding the 50th and 99th percentiles, and the share acknowledged within 50 ms.
fn ack_summary(before: &[(f64, u64)], after: &[(f64, u64)]) -> (f64, f64, f64) {
    let delta: Vec<(f64, u64)> =
        after.iter().map(|(le, n)| (*le, n - before.iter().find(|(b, _)| b == le).map_or(0, |(_, m)| *m))).collect();
    let total = delta.iter().find(|(le, _)| le.is_infinite()).map_or(0, |(_, n)| *n);
    if total == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let bound =
        |p: f64| delta.iter().find(|(_, n)| *n as f64 >= p * total as f64).map_or(f64::INFINITY, |(le, _)| le * 1000.0);
    let within_50ms = delta.iter().find(|(le, _)| (*le - 0.05).abs() < 1e-9).map_or(0, |(_, n)| *n);
    (bound(0.5), bound(0.99), within_50ms as f64 / total as f64)
}

/// A fresh database, dropped by [`BenchDb::drop_db`].
struct BenchDb {
    pool: PgPool,
    name: String,
}

impl BenchDb {
    async fn new() -> Result<Self> {
        let name = unique("oncely_bench_outbox");
        let mut admin = PgConnection::connect(&database_url()).await.context("connecting to DATABASE_URL")?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await?;
        admin.close().await?;
        let pool = oncely::store::connect(&with_database(&database_url(), &name), 24).await?;
        oncely::store::migrate(&pool).await?;
        Ok(BenchDb { pool, name })
    }

    async fn drop_db(self) -> Result<()> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&database_url()).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name)).execute(&mut admin).await?;
        Ok(())
    }
}

struct RunningRelay {
    token: CancellationToken,
    join: tokio::task::JoinHandle<oncely::Result<()>>,
}

impl RunningRelay {
    async fn start(pool: &PgPool, name: &str, args: &OutboxArgs, listen: bool) -> Result<Self> {
        let relay = Relay::builder(pool.clone(), bootstrap())
            .name(name)
            .batch_size(args.batch_size)
            .listen(listen)
            .poll_interval(Duration::from_millis(args.poll_ms))
            .build()?;
        let token = CancellationToken::new();
        let join = tokio::spawn(relay.run(token.clone()));
        // Ready once it holds every lane.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = outbox::status(pool).await?;
            if s.lanes.iter().all(|l| l.owner.is_some()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the relay did not take the lanes within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(RunningRelay { token, join })
    }

    async fn stop(self) -> Result<()> {
        self.token.cancel();
        self.join.await??;
        Ok(())
    }
}

fn payload(seq: u64, keys: u64) -> serde_json::Value {
    json!({
        "order_id": format!("order-{}", seq % keys),
        "seq": seq,
        "amount_cents": (seq * 37) % 100_000,
        "currency": "EUR",
        "note": "benchmark event with a payload of typical size for an order event",
    })
}

async fn pending(pool: &PgPool) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM oncely.outbox WHERE published_at IS NULL").fetch_one(pool).await?)
}

/// Enqueues the backlog; returns events/s of the enqueue itself.
async fn fill(pool: &PgPool, topic: &str, args: &OutboxArgs) -> Result<f64> {
    let started = Instant::now();
    let mut seq = 0u64;
    while seq < args.events {
        let n = (args.events - seq).min(5000);
        let events: Vec<(String, OutgoingEvent)> = (seq..seq + n)
            .map(|s| {
                let ev = OutgoingEvent::json("bench.order.created", &payload(s, args.keys))?.source("/bench/outbox");
                Ok((format!("order-{}", s % args.keys), ev))
            })
            .collect::<Result<_>>()?;
        let batch: Vec<Batched<'_>> = events.iter().map(|(k, e)| Batched { topic, key: k, event: e }).collect();
        let mut tx = pool.begin().await?;
        outbox::enqueue_many(&mut tx, &batch).await?;
        tx.commit().await?;
        seq += n;
    }
    let rate = args.events as f64 / started.elapsed().as_secs_f64();
    sqlx::query("VACUUM ANALYZE oncely.outbox").execute(pool).await?;
    Ok(rate)
}

struct Throughput {
    acked_per_s: f64,
    marked_per_s: f64,
}

async fn throughput(pool: &PgPool, args: &OutboxArgs) -> Result<Throughput> {
    let name = unique("bench-throughput");
    let before = outbox::events::published_by(&name);
    let started = Instant::now();
    let relay = RunningRelay::start(pool, &name, args, true).await?;
    let deadline = started + Duration::from_secs(3600);
    while outbox::events::published_by(&name) - before < args.events {
        if Instant::now() > deadline {
            bail!("the relay did not publish the backlog within an hour");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let acked = started.elapsed().as_secs_f64();
    while pending(pool).await? > 0 {
        if Instant::now() > deadline {
            bail!("the relay did not mark the backlog within an hour");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let marked = started.elapsed().as_secs_f64();
    relay.stop().await?;
    Ok(Throughput { acked_per_s: args.events as f64 / acked, marked_per_s: args.events as f64 / marked })
}

struct Latency {
    events: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Enqueue to acknowledgement, from the relay's histogram: bucket bounds.
    ack_p50_ms_le: f64,
    ack_p99_ms_le: f64,
    ack_within_50ms: f64,
}

/// `rate` events/s, one per transaction, for `seconds`, with the relay
/// listening or polling only.
async fn latency(pool: &PgPool, topic: &str, args: &OutboxArgs, listen: bool) -> Result<Latency> {
    let relay = RunningRelay::start(pool, &unique("bench-latency"), args, listen).await?;
    let buckets_before = ack_buckets();
    const WRITERS: u64 = 8;
    let period = Duration::from_secs_f64(WRITERS as f64 / args.rate.max(1) as f64);
    let per_writer = args.rate * args.latency_seconds / WRITERS;
    let topic: Arc<str> = topic.into();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (pool, topic, keys) = (pool.clone(), topic.clone(), args.keys);
            tokio::spawn(async move {
                // Writers start spread over one period, so commits are even.
                tokio::time::sleep(period.mul_f64(w as f64 / WRITERS as f64)).await;
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut out = Vec::with_capacity(per_writer as usize);
                for i in 0..per_writer {
                    tick.tick().await;
                    let seq = w * 1_000_000 + i;
                    let mut tx = pool.begin().await?;
                    let e = outbox::enqueue(
                        &mut tx,
                        &topic,
                        &format!("order-{}", seq % keys),
                        ("bench.order.created", &payload(seq, keys)),
                    )
                    .await?;
                    tx.commit().await?;
                    out.push((e.id, SystemTime::now()));
                }
                anyhow::Ok(out)
            })
        })
        .collect();
    let mut committed: HashMap<i64, SystemTime> = HashMap::new();
    for w in writers {
        committed.extend(w.await??);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while pending(pool).await? > 0 {
        if Instant::now() > deadline {
            bail!("the latency run did not drain within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.stop().await?;
    let (ack_p50_ms_le, ack_p99_ms_le, ack_within_50ms) = ack_summary(&buckets_before, &ack_buckets());
    let ids: Vec<i64> = committed.keys().copied().collect();
    let rows: Vec<(i64, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, published_at FROM oncely.outbox WHERE id = ANY($1) AND published_at IS NOT NULL")
            .bind(&ids)
            .fetch_all(pool)
            .await?;
    if rows.len() != ids.len() {
        bail!("{} of {} rows were marked published", rows.len(), ids.len());
    }
    let mut ms: Vec<f64> = rows
        .iter()
        .map(|(id, published)| {
            let commit: DateTime<Utc> = committed[id].into();
            (*published - commit).num_microseconds().unwrap_or(0) as f64 / 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    Ok(Latency {
        events: ms.len(),
        p50_ms: percentile(&ms, 0.50),
        p99_ms: percentile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(f64::NAN),
        ack_p50_ms_le,
        ack_p99_ms_le,
        ack_within_50ms,
    })
}

/// Entry point of `bench outbox`.
pub async fn run(args: OutboxArgs) -> Result<()> {
    let db = BenchDb::new().await?;
    let result = measure(&db.pool, &args).await;
    if let Err(e) = db.drop_db().await {
        eprintln!("could not drop the benchmark database: {e:#}");
    }
    let r = result?;
    if args.json {
        println!("{r}");
    }
    Ok(())
}

async fn measure(pool: &PgPool, args: &OutboxArgs) -> Result<serde_json::Value> {
    let topic = unique("bench-outbox").replace('_', "-");
    create_topic(&topic, args.partitions).await?;
    eprintln!(
        "outbox: {} events, {} keys, {} partitions, relay batch {}",
        args.events, args.keys, args.partitions, args.batch_size
    );
    let enqueue_rate = fill(pool, &topic, args).await?;
    eprintln!("  backlog enqueued at {enqueue_rate:.0} events/s (enqueue_many, 5000 per transaction)");
    let t = throughput(pool, args).await?;
    eprintln!(
        "  relay throughput: {:.0} events/s acknowledged, {:.0} events/s marked published",
        t.acked_per_s, t.marked_per_s
    );
    let n = latency(pool, &topic, args, true).await?;
    eprintln!(
        "  latency at {}/s with NOTIFY: commit -> marked p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} events); \
         enqueue -> ack p50 <= {} ms, p99 <= {} ms, {:.1}% within 50 ms",
        args.rate,
        n.p50_ms,
        n.p99_ms,
        n.max_ms,
        n.events,
        n.ack_p50_ms_le,
        n.ack_p99_ms_le,
        n.ack_within_50ms * 100.0
    );
    let p = latency(pool, &topic, args, false).await?;
    eprintln!(
        "  latency at {}/s polling only (every {} ms): commit -> marked p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
         enqueue -> ack p50 <= {} ms, p99 <= {} ms, {:.1}% within 50 ms",
        args.rate,
        args.poll_ms,
        p.p50_ms,
        p.p99_ms,
        p.max_ms,
        p.ack_p50_ms_le,
        p.ack_p99_ms_le,
        p.ack_within_50ms * 100.0
    );
    Ok(json!({
        "bench": "outbox",
        "events": args.events,
        "partitions": args.partitions,
        "keys": args.keys,
        "batch_size": args.batch_size,
        "enqueue_events_per_s": enqueue_rate.round(),
        "relay_events_per_s": t.acked_per_s.round(),
        "relay_marked_events_per_s": t.marked_per_s.round(),
        "latency_rate_per_s": args.rate,
        "latency_events": n.events,
        "latency_p50_ms": n.p50_ms,
        "latency_p99_ms": n.p99_ms,
        "latency_max_ms": n.max_ms,
        "ack_p50_ms_le": n.ack_p50_ms_le,
        "ack_p99_ms_le": n.ack_p99_ms_le,
        "ack_within_50ms": n.ack_within_50ms,
        "poll_interval_ms": args.poll_ms,
        "latency_p50_ms_polling_only": p.p50_ms,
        "latency_p99_ms_polling_only": p.p99_ms,
        "latency_max_ms_polling_only": p.max_ms,
        "ack_p99_ms_le_polling_only": p.ack_p99_ms_le,
        "ack_within_50ms_polling_only": p.ack_within_50ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn ack_summary_reads_bucket_deltas() {
        let before = vec![(0.005, 1), (0.05, 1), (f64::INFINITY, 1)];
        let after = vec![(0.005, 51), (0.05, 100), (f64::INFINITY, 101)];
        let (p50, p99, within) = ack_summary(&before, &after);
        assert_eq!((p50, p99), (5.0, 50.0));
        assert!((within - 0.99).abs() < 1e-9);
    }

    #[test]
    fn database_names_replace_the_path() {
        assert_eq!(with_database("postgres://u:p@h:5432/oncely", "x"), "postgres://u:p@h:5432/x");
    }
}
