//! `bench consume`: oncely's consumer against the consumers teams write
//! without it, on the same data, measured in one run.
//!
//! - **oncely**: the runtime with a handler that inserts one row per event.
//! - **baseline**: the best plain at-least-once consumer a good engineer writes
//!   without oncely: the same per-partition parallelism and batching, one
//!   multi-row insert per batch, no inbox, offsets committed to Kafka after
//!   the insert, into a table with no index.
//! - **baseline_pk**: the same into a table with a primary key on the event id
//!   and `ON CONFLICT DO NOTHING` (what a real table has).
//! - **baseline_per_event**: the same, one `INSERT` per event inside one
//!   transaction per batch (the work a per-event oncely handler does).
//! - **oncely duplicates-only**: the whole topic replayed into the batch
//!   handler's consumer after it applied it (a rewind with policy `replay`).
//! - **naive**: the per-event "check, then insert, then commit" pattern from
//!   the incident write-ups.
//!
//! Each variant runs in a child process of its own so its peak RSS is its own.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::common::{bootstrap, create_topic, database_url, percentile, CpuSample};
use clap::Args;
use oncely::envelope::{owned_headers, CloudEventAttrs};
use oncely::{Cx, Event, HandlerError};
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Options of `bench consume`.
#[derive(Debug, Clone, Args)]
pub struct ConsumeArgs {
    /// Events to produce and consume.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Events the naive consumer is given (it is slow; its rate is measured on these).
    #[arg(long, default_value_t = 20_000)]
    pub naive_events: u64,
    /// Also run oncely with this many rows already in its inbox (0: skip).
    #[arg(long, default_value_t = 0)]
    pub prefill_inbox: u64,
    /// Bytes of padding in each event's payload (record size ≈ 150 + this):
    /// random letters and digits, different in every record, which lz4
    /// compresses about as little as real data.
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
    /// Pad with one repeated letter instead (lz4 compresses 100 KB of it about
    /// 250 to 1; librdkafka's fetch limits count compressed bytes).
    #[arg(long)]
    pub compressible: bool,
    /// Variants to run (comma separated; default all): read-only, oncely,
    /// oncely-batch, oncely-dups, baseline, baseline-pk, baseline-per-event, naive.
    #[arg(long)]
    pub only: Option<String>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Internal: run one variant in this process (oncely, baseline, naive).
    #[arg(long, hide = true)]
    pub variant: Option<String>,
    /// Internal: the topic to consume.
    #[arg(long, hide = true)]
    pub topic: Option<String>,
    /// Internal: the consumer name / group for the variant.
    #[arg(long, hide = true)]
    pub group: Option<String>,
}

/// What one variant measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantResult {
    /// Variant name.
    pub variant: String,
    /// Events consumed.
    pub events: u64,
    /// Wall time from the first record to the last commit.
    pub seconds: f64,
    /// events / seconds.
    pub events_per_s: f64,
    /// Batch latency percentiles (ms), where the variant has batches.
    pub batch_p50_ms: Option<f64>,
    /// 99th percentile.
    pub batch_p99_ms: Option<f64>,
    /// Peak resident set size of the process (MB).
    pub peak_rss_mb: f64,
    /// CPU seconds over the variant's process life: its own, PostgreSQL's
    /// and the broker's (filled in by the parent; see [`CpuSample`]).
    #[serde(default)]
    pub cpu: Option<[f64; 3]>,
}

#[derive(Debug, Serialize, Deserialize)]
struct BenchEvent {
    key: String,
    seq: u64,
    amount: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pad: String,
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Entry point of `bench consume`.
pub async fn run(args: ConsumeArgs) -> Result<()> {
    if let Some(v) = &args.variant {
        let topic = args.topic.clone().context("--topic")?;
        let group = args.group.clone().context("--group")?;
        let r = match v.as_str() {
            "oncely" => run_oncely(&topic, &group, args.events, false, "oncely").await?,
            "oncely-batch" => run_oncely(&topic, &group, args.events, true, "oncely-batch").await?,
            "oncely-dups" => run_oncely(&topic, &group, args.events, true, "oncely-dups").await?,
            "baseline" => run_baseline(&topic, &group, args.events, Baseline::NoIndex).await?,
            "baseline-pk" => run_baseline(&topic, &group, args.events, Baseline::PrimaryKey).await?,
            "baseline-per-event" => run_baseline(&topic, &group, args.events, Baseline::PerEvent).await?,
            "naive" => run_naive(&topic, &group, args.naive_events).await?,
            "read-only" => run_read_only(&topic, &group, args.events).await?,
            other => bail!("unknown variant {other}"),
        };
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }

    let pool = oncely::store::connect(&database_url(), 4).await?;
    oncely::store::migrate(&pool).await?;
    setup_tables(&pool).await?;
    let topic = format!("bench-consume-{:08x}", fastrand::u32(..));
    create_topic(&topic, args.partitions).await?;
    eprintln!(
        "producing {} events to {topic} ({} partitions, {} keys, {} bytes of padding)…",
        args.events, args.partitions, args.keys, args.pad
    );
    let t = Instant::now();
    produce(&topic, args.events, args.keys, args.pad, args.compressible).await?;
    eprintln!("produced in {:.1}s", t.elapsed().as_secs_f64());

    let all = [
        "read-only",
        "oncely",
        "oncely-batch",
        "oncely-dups",
        "baseline",
        "baseline-pk",
        "baseline-per-event",
        "naive",
    ];
    let wanted: Vec<&str> = match &args.only {
        Some(list) => all.iter().copied().filter(|v| list.split(',').any(|w| w.trim() == *v)).collect(),
        None => all.to_vec(),
    };
    let mut results: HashMap<String, VariantResult> = HashMap::new();
    let batch_group = format!("bench-oncely-batch-{:08x}", fastrand::u32(..));
    for v in &wanted {
        let group = match *v {
            // The replay runs as the batch handler's consumer, whose inbox
            // holds every identity: everything it reads is a duplicate.
            "oncely-batch" | "oncely-dups" => batch_group.clone(),
            _ => format!("bench-{v}-{:08x}", fastrand::u32(..)),
        };
        if *v == "oncely-dups" {
            if !results.contains_key("oncely-batch") {
                bail!("oncely-dups replays what oncely-batch applied: run both");
            }
            // Rewind the database position: the consumer reads the topic again.
            sqlx::query("UPDATE oncely.offsets SET next_offset = 0 WHERE consumer = $1")
                .bind(&group)
                .execute(&pool)
                .await?;
        }
        quiesce(&pool).await?;
        eprintln!("running {v}…");
        let r = child(&args, v, &topic, &group).await?;
        eprintln!(
            "  {v}: {:.0} events/s ({} events in {:.1}s), peak RSS {:.0} MB",
            r.events_per_s, r.events, r.seconds, r.peak_rss_mb
        );
        results.insert((*v).to_owned(), r);
    }
    let mut prefilled = None;
    if args.prefill_inbox > 0 {
        let group = format!("bench-oncely-prefilled-{:08x}", fastrand::u32(..));
        eprintln!("prefilling the inbox with {} rows for {group}…", args.prefill_inbox);
        prefill_inbox(&pool, &group, args.prefill_inbox).await?;
        quiesce(&pool).await?;
        // The batch handler: the claim's share of the work is largest there.
        let r = child(&args, "oncely-batch", &topic, &group).await?;
        eprintln!("  oncely (batch handler) with {} inbox rows: {:.0} events/s", args.prefill_inbox, r.events_per_s);
        prefilled = Some(r);
    }

    println!();
    println!("variant              events/s   p50 batch ms   p99 batch ms   peak RSS MB");
    for v in &wanted {
        let r = &results[*v];
        println!(
            "{:<19} {:>9.0}   {:>12}   {:>12}   {:>11.0}",
            r.variant,
            r.events_per_s,
            r.batch_p50_ms.map_or("-".into(), |v| format!("{v:.1}")),
            r.batch_p99_ms.map_or("-".into(), |v| format!("{v:.1}")),
            r.peak_rss_mb
        );
    }
    println!();
    println!("CPU ms per 1,000 events (the variant's process life): consumer  postgres  broker  total");
    for v in &wanted {
        let r = &results[*v];
        if let Some([c, p, b]) = r.cpu {
            let per = |x: f64| 1000.0 * x / r.events as f64 * 1000.0;
            println!("{:<19} {:>44.1} {:>9.1} {:>7.1} {:>6.1}", r.variant, per(c), per(p), per(b), per(c + p + b));
        }
    }
    let rate = |v: &str| results.get(v).map(|r| r.events_per_s);
    let ratio = |a: &str, b: &str| Some(rate(a)? / rate(b)?);
    let show = |label: &str, r: Option<f64>| {
        if let Some(r) = r {
            println!("{label:<48} {r:.2}x");
        }
    };
    show("duplicates-only replay / read-only (one task)", ratio("oncely-dups", "read-only"));
    show("batch handler / baseline_pk", ratio("oncely-batch", "baseline-pk"));
    show("batch handler / baseline (no index)", ratio("oncely-batch", "baseline"));
    show("per-event handler / baseline_per_event", ratio("oncely", "baseline-per-event"));
    show("per-event handler / baseline (no index)", ratio("oncely", "baseline"));
    show("per-event handler / naive", ratio("oncely", "naive"));
    if let (Some(p), Some(ob)) = (&prefilled, rate("oncely-batch")) {
        println!(
            "oncely (batch handler) with {} rows in the inbox: {:.0} events/s ({:.0}% of the empty-inbox run)",
            args.prefill_inbox,
            p.events_per_s,
            100.0 * p.events_per_s / ob
        );
    }
    if args.json {
        let get = |v: &str| results.get(v);
        println!(
            "{}",
            json!({
                "events": args.events,
                "partitions": args.partitions,
                "keys": args.keys,
                "pad_bytes": args.pad,
                "pad_compressible": args.compressible,
                "read_only_events_per_s": rate("read-only"),
                "oncely_events_per_s": rate("oncely"),
                "oncely_batch_handler_events_per_s": rate("oncely-batch"),
                "oncely_duplicates_events_per_s": rate("oncely-dups"),
                "baseline_events_per_s": rate("baseline"),
                "baseline_pk_events_per_s": rate("baseline-pk"),
                "baseline_per_event_events_per_s": rate("baseline-per-event"),
                "naive_events_per_s": rate("naive"),
                "naive_events": get("naive").map(|r| r.events),
                "batch_ratio_vs_baseline": ratio("oncely-batch", "baseline"),
                "batch_ratio_vs_baseline_pk": ratio("oncely-batch", "baseline-pk"),
                "ratio_vs_baseline": ratio("oncely", "baseline"),
                "ratio_vs_baseline_per_event": ratio("oncely", "baseline-per-event"),
                "ratio_vs_naive": ratio("oncely", "naive"),
                "oncely_batch_p50_ms": get("oncely").and_then(|r| r.batch_p50_ms),
                "oncely_batch_p99_ms": get("oncely").and_then(|r| r.batch_p99_ms),
                "baseline_batch_p50_ms": get("baseline").and_then(|r| r.batch_p50_ms),
                "baseline_batch_p99_ms": get("baseline").and_then(|r| r.batch_p99_ms),
                "peak_rss_mb": get("oncely").map(|r| r.peak_rss_mb),
                "oncely_batch_handler_peak_rss_mb": get("oncely-batch").map(|r| r.peak_rss_mb),
                "baseline_peak_rss_mb": get("baseline").map(|r| r.peak_rss_mb),
                "prefilled_inbox_rows": args.prefill_inbox,
                "prefilled_events_per_s": prefilled.as_ref().map(|p| p.events_per_s),
                "cpu_seconds": results.iter().map(|(v, r)| (v.clone(), r.cpu)).collect::<HashMap<_, _>>(),
            })
        );
    }
    Ok(())
}

/// Lets the database settle before a variant runs, so that no variant pays
/// for the one before it. A variant's million inserted rows make autovacuum
/// visit its tables within a minute, that is during the next variant: a
/// duplicates-only replay, which writes nothing, measured up to 8 ms of
/// PostgreSQL CPU per 1,000 events that way. So: wait (up to two minutes)
/// for running autovacuum workers, vacuum the tables the variants write
/// (which resets autovacuum's counters for them), then checkpoint, so every
/// variant starts with clean buffers and pays for its own full-page writes.
async fn quiesce(pool: &PgPool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")
                .fetch_one(pool)
                .await?;
        if running == 0 {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("  (autovacuum still running after 2 minutes; measuring anyway)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sqlx::query(
        "VACUUM (ANALYZE) bench_oncely, bench_baseline, bench_baseline_pk, bench_naive, oncely.inbox, oncely.offsets",
    )
    .execute(pool)
    .await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}

async fn child(args: &ConsumeArgs, variant: &str, topic: &str, group: &str) -> Result<VariantResult> {
    let exe = std::env::current_exe()?;
    let before = CpuSample::take();
    let out = tokio::process::Command::new(exe)
        .args(["consume", "--variant", variant, "--topic", topic, "--group", group])
        .args(["--events", &args.events.to_string(), "--naive-events", &args.naive_events.to_string()])
        .args(["--pad", &args.pad.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // spawn, not output(): output() pipes stderr too, and a child whose
        // logs fill an unread pipe blocks.
        .spawn()?
        .wait_with_output()
        .await?;
    if !out.status.success() {
        bail!("variant {variant} failed: {}", out.status);
    }
    let spent = CpuSample::take().since(before);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("no result line")?;
    let mut r: VariantResult = serde_json::from_str(line)?;
    r.cpu = Some([spent.children, spent.postgres, spent.broker]);
    Ok(r)
}

async fn setup_tables(pool: &PgPool) -> Result<()> {
    for t in ["bench_oncely", "bench_baseline", "bench_naive"] {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (id bigserial PRIMARY KEY, consumer text NOT NULL, event_id text NOT NULL,
                 key text NOT NULL, seq bigint NOT NULL, amount bigint NOT NULL)"
        ))
        .execute(pool)
        .await?;
    }
    // What a real table has: the event id as its primary key (no serial).
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_baseline_pk (event_id text PRIMARY KEY, consumer text NOT NULL,
             key text NOT NULL, seq bigint NOT NULL, amount bigint NOT NULL)",
    )
    .execute(pool)
    .await?;
    sqlx::query("CREATE UNIQUE INDEX IF NOT EXISTS bench_naive_event ON bench_naive (consumer, event_id)")
        .execute(pool)
        .await?;
    Ok(())
}

async fn produce(topic: &str, events: u64, keys: u64, pad: usize, compressible: bool) -> Result<()> {
    let producer: FutureProducer = oncely::kafka::KafkaConnection::new(bootstrap())
        .client_config()?
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("message.max.bytes", "10000000")
        .create()?;
    let padding = "x".repeat(pad);
    let window = if pad > 10_000 { 2_000 } else { 50_000 };
    let mut inflight = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    for seq in 0..events {
        let key = format!("key-{}", seq % keys);
        let attrs = CloudEventAttrs::new_now("/bench/producer", "bench.event");
        let payload = serde_json::to_vec(&BenchEvent {
            key: key.clone(),
            seq,
            amount: (seq % 1000) as i64,
            pad: if compressible || pad == 0 {
                padding.clone()
            } else {
                std::iter::repeat_with(fastrand::alphanumeric).take(pad).collect()
            },
        })?;
        let headers = owned_headers(&attrs.to_headers())?;
        let producer = producer.clone();
        let topic = topic.to_owned();
        inflight.push(async move {
            let rec = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
            producer.send(rec, Duration::from_secs(60)).await.map(|_| ()).map_err(|(e, _)| e)
        });
        if inflight.len() >= window {
            if let Some(r) = inflight.next().await {
                r?;
            }
        }
    }
    while let Some(r) = inflight.next().await {
        r?;
    }
    Ok(())
}

/// Waits until `done()` reaches `target`, returns the elapsed seconds from
/// the first progress.
async fn wait_for(target: u64, done: impl Fn() -> u64) -> Result<f64> {
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    let deadline = Duration::from_secs(3600);
    loop {
        let n = done();
        if n > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if n >= target {
            return Ok(first.map_or(0.0, |f| f.elapsed().as_secs_f64()));
        }
        if start.elapsed() > deadline {
            bail!("only {n} of {target} events after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn bench_handler(ev: Event<BenchEvent>, cx: &mut Cx) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO bench_oncely (consumer, event_id, key, seq, amount) VALUES ($1, $2, $3, $4, $5)")
        .bind(cx.consumer().to_owned())
        .bind(ev.id.display())
        .bind(&ev.data.key)
        .bind(ev.data.seq as i64)
        .bind(ev.data.amount)
        .execute(cx.db())
        .await?;
    Ok(())
}

async fn bench_batch_handler(evs: Vec<Event<BenchEvent>>, cx: &mut Cx) -> Result<(), HandlerError> {
    let mut ids = Vec::with_capacity(evs.len());
    let mut keys = Vec::with_capacity(evs.len());
    let mut seqs = Vec::with_capacity(evs.len());
    let mut amounts = Vec::with_capacity(evs.len());
    for ev in &evs {
        ids.push(ev.id.display());
        keys.push(ev.data.key.clone());
        seqs.push(ev.data.seq as i64);
        amounts.push(ev.data.amount);
    }
    sqlx::query(
        "INSERT INTO bench_oncely (consumer, event_id, key, seq, amount)
         SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[], $5::int8[])",
    )
    .bind(cx.consumer().to_owned())
    .bind(&ids)
    .bind(&keys)
    .bind(&seqs)
    .bind(&amounts)
    .execute(cx.db())
    .await?;
    Ok(())
}

async fn run_oncely(topic: &str, group: &str, events: u64, batch: bool, variant: &str) -> Result<VariantResult> {
    let pool = oncely::store::connect(&database_url(), 16).await?;
    let token = CancellationToken::new();
    let mut consumer = oncely::Consumer::builder(group)
        .bootstrap_servers(bootstrap())
        .pool(pool.clone())
        .topic(topic)
        .handle_sigterm(false)
        .force_inbox_retention(true);
    for (k, v) in extra_kafka() {
        consumer = consumer.kafka(&k, &v);
    }
    let consumer = if batch { consumer.batch_handler(bench_batch_handler) } else { consumer.handler(bench_handler) };
    let run = tokio::spawn(consumer.run(token.clone()));
    let g = group.to_owned();
    let t = topic.to_owned();
    let seconds = wait_for(events, move || {
        oncely::consumer::events::events_counted(&g, &t, "processed")
            + oncely::consumer::events::events_counted(&g, &t, "duplicate")
    })
    .await?;
    token.cancel();
    run.await??;
    let (p50, p99) = histogram_percentiles(&oncely::metrics::render(), group);
    Ok(VariantResult {
        variant: variant.into(),
        events,
        seconds,
        events_per_s: events as f64 / seconds,
        batch_p50_ms: p50,
        batch_p99_ms: p99,
        peak_rss_mb: peak_rss_mb(),
        cpu: None,
    })
}

/// p50 and p99 (upper bucket bounds, ms) of `oncely_batch_seconds` for a consumer.
fn histogram_percentiles(text: &str, consumer: &str) -> (Option<f64>, Option<f64>) {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        if !line.starts_with("oncely_batch_seconds_bucket") || !line.contains(&format!("consumer=\"{consumer}\"")) {
            continue;
        }
        let le = line.split("le=\"").nth(1).and_then(|s| s.split('"').next());
        let count = line.rsplit(' ').next().and_then(|c| c.parse::<f64>().ok());
        if let (Some(le), Some(count)) = (le, count) {
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
            buckets.push((le, count));
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    let q = |p: f64| buckets.iter().find(|(_, c)| *c >= p * total).map(|(le, _)| le * 1000.0);
    if total == 0.0 {
        (None, None)
    } else {
        (q(0.5), q(0.99))
    }
}

/// How a baseline writes a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Baseline {
    /// One multi-row insert into a table with no index.
    NoIndex,
    /// One multi-row insert into a table keyed by the event id, `ON CONFLICT DO NOTHING`.
    PrimaryKey,
    /// One insert per event (no index), in one transaction per batch.
    PerEvent,
}

impl Baseline {
    fn name(self) -> &'static str {
        match self {
            Baseline::NoIndex => "baseline",
            Baseline::PrimaryKey => "baseline-pk",
            Baseline::PerEvent => "baseline-per-event",
        }
    }
}

/// Kafka client properties for every measured consumer, oncely's and the
/// plain ones alike, from `BENCH_KAFKA="name=value,name=value"` (to compare
/// fetch and queue sizings in one run).
fn extra_kafka() -> Vec<(String, String)> {
    std::env::var("BENCH_KAFKA")
        .unwrap_or_default()
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A plain at-least-once consumer: per-partition tasks, batches of up to 500
/// or 20 ms, the batch written (see [`Baseline`]), then the Kafka commit.
async fn run_baseline(topic: &str, group: &str, events: u64, mode: Baseline) -> Result<VariantResult> {
    let pool = oncely::store::connect(&database_url(), 16).await?;
    let mut config = oncely::kafka::KafkaConnection::new(bootstrap()).client_config()?;
    config.set("group.id", group).set("enable.auto.commit", "false").set("auto.offset.reset", "earliest");
    for (k, v) in extra_kafka() {
        config.set(k, v);
    }
    let consumer: Arc<StreamConsumer> = Arc::new(config.create()?);
    consumer.subscribe(&[topic])?;
    let done = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let mut lanes: HashMap<i32, tokio::sync::mpsc::Sender<(i32, i64, String, BenchEvent)>> = HashMap::new();
    let token = CancellationToken::new();
    let start = Instant::now();
    let mut first: Option<Instant> = None;
    while done.load(Ordering::Relaxed) < events {
        let m = tokio::select! {
            m = consumer.recv() => m?,
            _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
        };
        first.get_or_insert_with(Instant::now);
        let p = m.partition();
        let ev: BenchEvent = serde_json::from_slice(m.payload().unwrap_or_default())?;
        let id = m
            .headers()
            .and_then(|h| {
                use rdkafka::message::Headers;
                h.iter()
                    .find(|h| h.key == "ce_id")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
            .unwrap_or_default();
        let tx = lanes.entry(p).or_insert_with(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(2000);
            tokio::spawn(baseline_lane(
                rx,
                pool.clone(),
                consumer.clone(),
                topic.to_owned(),
                group.to_owned(),
                done.clone(),
                latencies.clone(),
                token.clone(),
                mode,
            ));
            tx
        });
        tx.send((p, m.offset(), id, ev)).await?;
        if start.elapsed() > Duration::from_secs(3600) {
            bail!("baseline timed out");
        }
    }
    token.cancel();
    let seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    let mut l = latencies.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_by(f64::total_cmp);
    Ok(VariantResult {
        variant: mode.name().into(),
        events,
        seconds,
        events_per_s: events as f64 / seconds,
        batch_p50_ms: percentile(&l, 0.5),
        batch_p99_ms: percentile(&l, 0.99),
        peak_rss_mb: peak_rss_mb(),
        cpu: None,
    })
}

#[allow(clippy::too_many_arguments)]
async fn baseline_lane(
    mut rx: tokio::sync::mpsc::Receiver<(i32, i64, String, BenchEvent)>,
    pool: PgPool,
    consumer: Arc<StreamConsumer>,
    topic: String,
    group: String,
    done: Arc<AtomicU64>,
    latencies: Arc<std::sync::Mutex<Vec<f64>>>,
    token: CancellationToken,
    mode: Baseline,
) {
    let mut batch = Vec::with_capacity(500);
    loop {
        let Some(first) = (tokio::select! { m = rx.recv() => m, _ = token.cancelled() => None }) else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
        while batch.len() < 500 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => batch.push(m),
                _ => break,
            }
        }
        let t = Instant::now();
        let (ids, keys, seqs, amounts): (Vec<String>, Vec<String>, Vec<i64>, Vec<i64>) = batch.iter().fold(
            (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
            |(mut a, mut b, mut c, mut d), (_, _, id, ev)| {
                a.push(id.clone());
                b.push(ev.key.clone());
                c.push(ev.seq as i64);
                d.push(ev.amount);
                (a, b, c, d)
            },
        );
        let r = write_baseline_batch(&pool, mode, &group, &ids, &keys, &seqs, &amounts).await;
        if let Err(e) = r {
            eprintln!("baseline insert failed: {e}");
            return;
        }
        let (p, last) = batch.last().map(|(p, o, _, _)| (*p, *o)).unwrap_or_default();
        let mut tpl = TopicPartitionList::new();
        if tpl.add_partition_offset(&topic, p, Offset::Offset(last + 1)).is_ok() {
            let _ = consumer.commit(&tpl, CommitMode::Async);
        }
        if let Ok(mut l) = latencies.lock() {
            l.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        done.fetch_add(batch.len() as u64, Ordering::Relaxed);
        batch.clear();
    }
}

async fn write_baseline_batch(
    pool: &PgPool,
    mode: Baseline,
    group: &str,
    ids: &[String],
    keys: &[String],
    seqs: &[i64],
    amounts: &[i64],
) -> sqlx::Result<()> {
    match mode {
        Baseline::NoIndex | Baseline::PrimaryKey => {
            let sql = if mode == Baseline::NoIndex {
                "INSERT INTO bench_baseline (consumer, event_id, key, seq, amount)
                 SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[], $5::int8[])"
            } else {
                "INSERT INTO bench_baseline_pk (consumer, event_id, key, seq, amount)
                 SELECT $1, * FROM unnest($2::text[], $3::text[], $4::int8[], $5::int8[])
                 ON CONFLICT DO NOTHING"
            };
            sqlx::query(sql).bind(group).bind(ids).bind(keys).bind(seqs).bind(amounts).execute(pool).await?;
        }
        Baseline::PerEvent => {
            let mut tx = pool.begin().await?;
            for i in 0..ids.len() {
                sqlx::query(
                    "INSERT INTO bench_baseline (consumer, event_id, key, seq, amount) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(group)
                .bind(&ids[i])
                .bind(&keys[i])
                .bind(seqs[i])
                .bind(amounts[i])
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        }
    }
    Ok(())
}

/// Read every record and drop it (rdkafka's stream consumer, one task
/// awaiting `recv` per record, nothing copied, no database). Long called the
/// ceiling; it is not one: a consumer that drains twelve partition queues in
/// parallel, without a wake-up per record, passes it (the duplicates-only
/// replay did on 2026-12-03). It stays as the cost of reading alone.
async fn run_read_only(topic: &str, group: &str, events: u64) -> Result<VariantResult> {
    let consumer: StreamConsumer = oncely::kafka::KafkaConnection::new(bootstrap())
        .client_config()?
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut n = 0u64;
    let mut first: Option<Instant> = None;
    while n < events {
        let m = consumer.recv().await?;
        first.get_or_insert_with(Instant::now);
        std::hint::black_box(m.payload());
        n += 1;
    }
    let seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    Ok(VariantResult {
        variant: "read-only".into(),
        events: n,
        seconds,
        events_per_s: n as f64 / seconds,
        batch_p50_ms: None,
        batch_p99_ms: None,
        peak_rss_mb: peak_rss_mb(),
        cpu: None,
    })
}

/// The naive pattern: per event, check the processed table, insert, commit
/// the offset.
async fn run_naive(topic: &str, group: &str, events: u64) -> Result<VariantResult> {
    let pool = oncely::store::connect(&database_url(), 2).await?;
    let consumer: StreamConsumer = oncely::kafka::KafkaConnection::new(bootstrap())
        .client_config()?
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut n = 0u64;
    let mut first: Option<Instant> = None;
    while n < events {
        let m = consumer.recv().await?;
        first.get_or_insert_with(Instant::now);
        let ev: BenchEvent = serde_json::from_slice(m.payload().unwrap_or_default())?;
        let id = format!("{}-{}-{}", m.topic(), m.partition(), m.offset());
        let seen: Option<i64> = sqlx::query_scalar("SELECT id FROM bench_naive WHERE consumer = $1 AND event_id = $2")
            .bind(group)
            .bind(&id)
            .fetch_optional(&pool)
            .await?;
        if seen.is_none() {
            sqlx::query("INSERT INTO bench_naive (consumer, event_id, key, seq, amount) VALUES ($1, $2, $3, $4, $5)")
                .bind(group)
                .bind(&id)
                .bind(&ev.key)
                .bind(ev.seq as i64)
                .bind(ev.amount)
                .execute(&pool)
                .await?;
        }
        consumer.commit_message(&m, CommitMode::Sync)?;
        n += 1;
    }
    let seconds = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    Ok(VariantResult {
        variant: "naive".into(),
        events: n,
        seconds,
        events_per_s: n as f64 / seconds,
        batch_p50_ms: None,
        batch_p99_ms: None,
        peak_rss_mb: peak_rss_mb(),
        cpu: None,
    })
}

async fn prefill_inbox(pool: &PgPool, consumer: &str, rows: u64) -> Result<()> {
    // Keys like a week of UUIDv7 identities would give: time-ordered over the
    // last seven days (the inbox's day partitions), the rest random.
    let consumer_id = oncely::store::register_consumer(pool, consumer, 15).await?;
    oncely::store::inbox::ensure_days(pool, 3).await?;
    sqlx::query("SELECT oncely.ensure_inbox_days(((now() AT TIME ZONE 'UTC')::date) - 8, 9)").execute(pool).await?;
    let chunk = 1_000_000u64;
    let mut done = 0u64;
    while done < rows {
        let n = chunk.min(rows - done);
        sqlx::query(
            r#"INSERT INTO oncely.inbox (id, consumer_id)
               SELECT (lpad(to_hex((extract(epoch FROM now() - interval '7 days') * 1000)::bigint
                                   + (g * 604800000 / $3::bigint)), 12, '0')
                       || substr(md5(g::text || 'prefill'), 1, 20))::uuid, $1
                 FROM generate_series($2::bigint, $2::bigint + $4::bigint - 1) g
               ON CONFLICT DO NOTHING"#,
        )
        .bind(consumer_id)
        .bind(done as i64)
        .bind(rows as i64)
        .bind(n as i64)
        .execute(pool)
        .await?;
        done += n;
    }
    // A week-old inbox has been vacuumed and checkpointed long ago; a fresh
    // bulk load has not: without these the measured run would pay for the
    // load (hint bits set on first read, autovacuum's pass over 10 million
    // rows and the checkpoint of the load's writes, all during the run).
    sqlx::query("VACUUM (ANALYZE) oncely.inbox").execute(pool).await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}
