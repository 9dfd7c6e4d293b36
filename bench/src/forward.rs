//! `bench forward`: the exactly-once processor against an at-least-once
//! forwarder, on the same topic, in one run.
//!
//! The job: read a payment (JSON, CloudEvents headers), write a processed
//! payment (JSON, a fee added) with the same key to an output topic.
//!
//! - **eos**: `oncely::Processor` with its defaults: one Kafka transaction
//!   per `commit_interval` (100 ms) or `commit_every` inputs, outputs and
//!   input offsets committed together (`send_offsets_to_transaction`).
//! - **alo**: the at-least-once forwarder a good engineer writes without
//!   transactions: the same decode and encode, an idempotent producer, and
//!   the offsets committed after the sends are acknowledged (flush, then an
//!   asynchronous commit, every 100 ms or 10,000 records, the processor's
//!   own cadence). A crash between the flush and the commit emits the
//!   records again.
//!
//! Throughput: each variant reads the whole backlog (`--events`) with a
//! group of its own: events / time from its first record to the commit of
//! the last. Latency: `--rate` events/s for `--latency-seconds` into a fresh
//! topic while the variant runs; per event, the time from the producer's
//! send (in the payload) to a `read_committed` reader receiving the output.
//! Then the processor again at each `--intervals` commit interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Args;
use oncely::envelope::{owned_headers, CloudEventAttrs};
use oncely::processor::{Out, Processor};
use oncely::{Event, HandlerError};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::common::{bootstrap, create_topic, percentile};

/// Options of `bench forward`.
#[derive(Debug, Clone, Args)]
pub struct ForwardArgs {
    /// Events in the backlog each variant forwards (throughput).
    #[arg(long, default_value_t = 400_000)]
    pub events: u64,
    /// Partitions of the topics.
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub keys: u64,
    /// Events per second in the latency runs.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Length of each latency run, in seconds.
    #[arg(long, default_value_t = 10)]
    pub latency_seconds: u64,
    /// Commit intervals (ms) of the processor's interval table; its
    /// throughput runs use a quarter of `--events`.
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100,250")]
    pub intervals: Vec<u64>,
    /// Print one JSON object with the results as the last line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Payment {
    key: String,
    seq: u64,
    amount: i64,
    /// Microseconds since the epoch at the producer's send (latency runs).
    sent_us: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Processed {
    key: String,
    seq: u64,
    amount: i64,
    fee: i64,
    sent_us: i64,
}

impl Processed {
    fn of(p: &Payment) -> Self {
        Processed { key: p.key.clone(), seq: p.seq, amount: p.amount, fee: p.amount / 100, sent_us: p.sent_us }
    }
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

fn unique(prefix: &str) -> String {
    format!("bench-{prefix}-{:08x}", fastrand::u32(..))
}

/// A throughput result.
#[derive(Debug, Clone, Copy)]
struct Rate {
    events: u64,
    seconds: f64,
}

impl Rate {
    fn per_s(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// A latency result (ms).
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    max: f64,
}

/// Entry point of `bench forward`.
pub async fn run(args: ForwardArgs) -> Result<()> {
    let backlog = unique("payments");
    create_topic(&backlog, args.partitions).await?;
    eprintln!("producing {} events to {backlog} ({} partitions, {} keys)…", args.events, args.partitions, args.keys);
    let t = Instant::now();
    produce_backlog(&backlog, args.events, args.keys).await?;
    eprintln!("produced in {:.1}s", t.elapsed().as_secs_f64());

    eprintln!("throughput: at-least-once forwarder…");
    let alo = alo_throughput(&backlog, args.partitions, args.events).await?;
    eprintln!("  alo: {:.0} events/s ({} in {:.1}s)", alo.per_s(), alo.events, alo.seconds);
    eprintln!("throughput: exactly-once processor (defaults)…");
    let eos = eos_throughput(&backlog, args.partitions, args.events, None).await?;
    eprintln!("  eos: {:.0} events/s ({} in {:.1}s)", eos.per_s(), eos.events, eos.seconds);

    eprintln!("latency at {} events/s for {} s: at-least-once forwarder…", args.rate, args.latency_seconds);
    let alo_lat = latency(&args, Variant::Alo).await?;
    eprintln!("  alo: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", alo_lat.p50, alo_lat.p99, alo_lat.max);
    eprintln!("latency: exactly-once processor (defaults)…");
    let eos_lat = latency(&args, Variant::Eos(None)).await?;
    eprintln!("  eos: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms", eos_lat.p50, eos_lat.p99, eos_lat.max);

    let mut table = Vec::new();
    for ms in &args.intervals {
        let d = Duration::from_millis(*ms);
        eprintln!("commit interval {ms} ms…");
        let r = eos_throughput(&backlog, args.partitions, (args.events / 4).max(1), Some(d)).await?;
        let l = latency(&args, Variant::Eos(Some(d))).await?;
        eprintln!("  {:.0} events/s, p99 {:.1} ms", r.per_s(), l.p99);
        table.push((*ms, r, l));
    }

    println!();
    println!("variant                      events/s   p50 ms   p99 ms   max ms");
    println!(
        "at-least-once forwarder     {:>9.0}  {:>7.1}  {:>7.1}  {:>7.1}",
        alo.per_s(),
        alo_lat.p50,
        alo_lat.p99,
        alo_lat.max
    );
    println!(
        "exactly-once processor      {:>9.0}  {:>7.1}  {:>7.1}  {:>7.1}",
        eos.per_s(),
        eos_lat.p50,
        eos_lat.p99,
        eos_lat.max
    );
    println!("eos / alo = {:.2}x", eos.per_s() / alo.per_s());
    println!();
    println!("commit interval   events/s   p50 ms   p99 ms   max ms   (throughput on {} events)", args.events / 4);
    for (ms, r, l) in &table {
        println!("{:>12} ms  {:>9.0}  {:>7.1}  {:>7.1}  {:>7.1}", ms, r.per_s(), l.p50, l.p99, l.max);
    }
    if args.json {
        let rows: Vec<_> = table
            .iter()
            .map(|(ms, r, l)| {
                json!({"commit_interval_ms": ms, "events_per_s": r.per_s(), "p50_ms": l.p50, "p99_ms": l.p99, "max_ms": l.max})
            })
            .collect();
        println!(
            "{}",
            json!({
                "events": args.events,
                "partitions": args.partitions,
                "keys": args.keys,
                "eos_events_per_s": eos.per_s(),
                "alo_events_per_s": alo.per_s(),
                "ratio": eos.per_s() / alo.per_s(),
                "eos_p50_ms": eos_lat.p50,
                "eos_p99_ms": eos_lat.p99,
                "eos_max_ms": eos_lat.max,
                "alo_p50_ms": alo_lat.p50,
                "alo_p99_ms": alo_lat.p99,
                "alo_max_ms": alo_lat.max,
                "latency_rate": args.rate,
                "latency_seconds": args.latency_seconds,
                "intervals": rows,
            })
        );
    }
    Ok(())
}

fn payment_headers() -> Result<rdkafka::message::OwnedHeaders> {
    Ok(owned_headers(&CloudEventAttrs::new_now("/bench/payments", "bench.payment").to_headers())?)
}

async fn produce_backlog(topic: &str, events: u64, keys: u64) -> Result<()> {
    use futures::StreamExt;
    let producer: FutureProducer = oncely::kafka::KafkaConnection::new(bootstrap())
        .client_config()?
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .create()?;
    let mut inflight = futures::stream::FuturesUnordered::new();
    for seq in 0..events {
        let key = format!("key-{}", seq % keys);
        let payload = serde_json::to_vec(&Payment { key: key.clone(), seq, amount: (seq % 1000) as i64, sent_us: 0 })?;
        let producer = producer.clone();
        let topic = topic.to_owned();
        let headers = payment_headers()?;
        inflight.push(async move {
            let rec = FutureRecord::to(&topic).key(&key).payload(&payload).headers(headers);
            producer.send(rec, Duration::from_secs(60)).await.map(|_| ()).map_err(|(e, _)| e)
        });
        if inflight.len() >= 50_000 {
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

// ------------------------------------------------------------------ eos

/// The processor's state: its output topic, and when its first record came.
struct EosState {
    output: String,
    first: std::sync::OnceLock<Instant>,
}

async fn eos_handler(ev: Event<Payment>, out: &mut Out) -> Result<(), HandlerError> {
    let s = out.state::<Arc<EosState>>().ok_or_else(|| HandlerError::reject("no state"))?;
    s.first.get_or_init(Instant::now);
    out.send(&s.output, &ev.data.key, "bench.payment.processed", &Processed::of(&ev.data))
}

fn processor(
    name: &str,
    input: &str,
    output: &str,
    interval: Option<Duration>,
    state: Arc<EosState>,
) -> oncely::ProcessorBuilder {
    let b = Processor::builder(name)
        .bootstrap_servers(bootstrap())
        .input(input)
        .output(output)
        .instance_id("bench")
        .handler(eos_handler)
        .state(state)
        .handle_sigterm(false);
    match interval {
        Some(d) => b.commit_interval(d),
        None => b,
    }
}

async fn eos_throughput(input: &str, partitions: i32, events: u64, interval: Option<Duration>) -> Result<Rate> {
    let (name, output) = (unique("eos"), unique("processed"));
    create_topic(&output, partitions).await?;
    let token = CancellationToken::new();
    let state = Arc::new(EosState { output: output.clone(), first: std::sync::OnceLock::new() });
    let run = tokio::spawn(processor(&name, input, &output, interval, state.clone()).run(token.clone()));
    let (n, t) = (name.clone(), input.to_owned());
    let done = wait_for(events, move || oncely::consumer::events::events_counted(&n, &t, "processed")).await;
    token.cancel();
    run.await??;
    let (first, last) = (state.first.get().copied().context("no record processed")?, done?);
    Ok(Rate { events, seconds: (last - first).as_secs_f64() })
}

/// Waits until `done()` reaches `target` (checked every 2 ms); when it did.
async fn wait_for(target: u64, done: impl Fn() -> u64) -> Result<Instant> {
    let start = Instant::now();
    loop {
        let n = done();
        if n >= target {
            return Ok(Instant::now());
        }
        if start.elapsed() > Duration::from_secs(3600) {
            bail!("only {n} of {target} events after an hour");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

// ------------------------------------------------------------------ alo

/// The at-least-once forwarder, on a thread of its own, until `stop` (or
/// `target` records committed). Counts committed records in `done`; the
/// time of the first record received in `first`.
fn alo_forward(
    input: &str,
    output: &str,
    group: &str,
    target: u64,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> Result<Option<Instant>> {
    let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(bootstrap())
        .client_config()?
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("queued.max.messages.kbytes", "16384")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()?;
    let producer: BaseProducer =
        oncely::kafka::KafkaConnection::new(bootstrap()).client_config()?.set("enable.idempotence", "true").create()?;
    consumer.subscribe(&[input])?;
    let mut first = None;
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut pending = 0u64;
    let mut since = Instant::now();
    while !stop.load(Ordering::Relaxed) && done.load(Ordering::Relaxed) < target {
        match consumer.poll(Duration::from_millis(20)) {
            Some(Ok(m)) => {
                first.get_or_insert_with(Instant::now);
                let p: Payment = serde_json::from_slice(m.payload().unwrap_or_default())?;
                let payload = serde_json::to_vec(&Processed::of(&p))?;
                let key = m.key().unwrap_or_default().to_vec();
                let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(output).key(&key[..]).payload(&payload[..]);
                if let Some(h) = m.headers() {
                    rec = rec.headers(rdkafka::message::BorrowedHeaders::detach(h));
                }
                loop {
                    match producer.send(rec) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                            rec = back;
                            producer.poll(Duration::from_millis(5));
                        }
                        Err((e, _)) => bail!("alo send: {e}"),
                    }
                }
                next.insert(m.partition(), m.offset() + 1);
                pending += 1;
            }
            Some(Err(e)) => bail!("alo consume: {e}"),
            None => {}
        }
        producer.poll(Duration::ZERO);
        if pending > 0 && (pending >= 10_000 || since.elapsed() >= Duration::from_millis(100)) {
            // Commit after send: every record acknowledged, then the offsets.
            // (Served in 1 ms steps: rdkafka's `flush` waits in steps of
            // 100 ms, the processor avoids it the same way.)
            let deadline = Instant::now() + Duration::from_secs(60);
            while producer.in_flight_count() > 0 {
                if Instant::now() > deadline {
                    bail!("alo: records not acknowledged within 60 s");
                }
                producer.poll(Duration::from_millis(1));
            }
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &next {
                tpl.add_partition_offset(input, *p, Offset::Offset(*o))?;
            }
            consumer.commit(&tpl, CommitMode::Async)?;
            done.fetch_add(pending, Ordering::Relaxed);
            pending = 0;
            since = Instant::now();
        }
    }
    Ok(first)
}

async fn alo_throughput(input: &str, partitions: i32, events: u64) -> Result<Rate> {
    let (group, output) = (unique("alo"), unique("forwarded"));
    create_topic(&output, partitions).await?;
    let input = input.to_owned();
    let (first, at) = tokio::task::spawn_blocking(move || {
        let (stop, done) = (AtomicBool::new(false), AtomicU64::new(0));
        let first = alo_forward(&input, &output, &group, events, &stop, &done);
        (first, Instant::now())
    })
    .await?;
    let first = first?.context("no record forwarded")?;
    Ok(Rate { events, seconds: (at - first).as_secs_f64() })
}

// -------------------------------------------------------------- latency

#[derive(Debug, Clone, Copy)]
enum Variant {
    Alo,
    Eos(Option<Duration>),
}

/// Runs `variant` on a fresh topic, produces `rate` events/s for
/// `latency_seconds`, and measures send → visible to a `read_committed` reader.
async fn latency(args: &ForwardArgs, variant: Variant) -> Result<Latency> {
    let (input, output) = (unique("lat-in"), unique("lat-out"));
    create_topic(&input, args.partitions).await?;
    create_topic(&output, args.partitions).await?;
    let total = args.rate * args.latency_seconds;

    let stop = Arc::new(AtomicBool::new(false));
    let token = CancellationToken::new();
    let runner: tokio::task::JoinHandle<Result<()>> = match variant {
        Variant::Alo => {
            let (i, o, s) = (input.clone(), output.clone(), stop.clone());
            tokio::task::spawn_blocking(move || {
                alo_forward(&i, &o, &unique("alo-lat"), u64::MAX, &s, &AtomicU64::new(0)).map(|_| ())
            })
        }
        Variant::Eos(interval) => {
            let state = Arc::new(EosState { output: output.clone(), first: std::sync::OnceLock::new() });
            let run = processor(&unique("eos-lat"), &input, &output, interval, state).run(token.clone());
            tokio::spawn(async move { run.await.map_err(anyhow::Error::from) })
        }
    };
    let out = output.clone();
    let parts = args.partitions;
    let live = Arc::new(AtomicBool::new(false));
    let seen = live.clone();
    let reader = tokio::task::spawn_blocking(move || read_latencies(&out, parts, total, &seen));

    // The clock starts once the pipeline is live: a warm-up event came through.
    let warm_payload = warm_up_payload()?;
    let warm = FutureRecord::to(&input).key("warm-up").payload(&warm_payload).headers(payment_headers()?);
    let p: FutureProducer = oncely::kafka::KafkaConnection::new(bootstrap()).client_config()?.create()?;
    p.send(warm, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    let t0 = Instant::now();
    while !live.load(Ordering::SeqCst) {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("the warm-up event never came through");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    produce_at_rate(&input, args.rate, args.latency_seconds, args.keys).await?;
    let mut lat = reader.await??;
    stop.store(true, Ordering::SeqCst);
    token.cancel();
    runner.await??;
    lat.sort_by(f64::total_cmp);
    Ok(Latency {
        p50: percentile(&lat, 0.5).unwrap_or(f64::NAN),
        p99: percentile(&lat, 0.99).unwrap_or(f64::NAN),
        max: lat.last().copied().unwrap_or(f64::NAN),
    })
}

async fn produce_at_rate(topic: &str, rate: u64, seconds: u64, keys: u64) -> Result<()> {
    let producer: FutureProducer = oncely::kafka::KafkaConnection::new(bootstrap())
        .client_config()?
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()?;
    // Every 10 ms, a hundredth of the second's events.
    let per_tick = (rate / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::new();
    let mut seq = 0u64;
    for _ in 0..seconds * 100 {
        tick.tick().await;
        for _ in 0..per_tick {
            let key = format!("key-{}", seq % keys);
            let payload = serde_json::to_vec(&Payment { key: key.clone(), seq, amount: 1, sent_us: now_us() })?;
            let rec = FutureRecord::to(topic).key(&key).payload(&payload).headers(payment_headers()?);
            sends.push(producer.send_result(rec).map_err(|(e, _)| e)?);
            seq += 1;
        }
    }
    for s in sends {
        s.await.context("delivery cancelled")?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Sequence number of the warm-up event.
const WARM_UP: u64 = u64::MAX;

fn warm_up_payload() -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&Payment { key: "warm-up".into(), seq: WARM_UP, amount: 0, sent_us: 0 })?)
}

/// Reads `total` records of `topic` as a `read_committed` reader (sets
/// `live` at the warm-up event, which it does not count); each one's
/// latency (ms) from its `sent_us` to now.
fn read_latencies(topic: &str, partitions: i32, total: u64, live: &AtomicBool) -> Result<Vec<f64>> {
    let c: BaseConsumer = oncely::kafka::KafkaConnection::new(bootstrap())
        .client_config()?
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        // The instrument should add as little as it can.
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut out = Vec::with_capacity(total as usize);
    let deadline = Instant::now() + Duration::from_secs(600);
    while (out.len() as u64) < total {
        if Instant::now() > deadline {
            bail!("only {} of {total} outputs seen in 10 minutes", out.len());
        }
        if let Some(m) = c.poll(Duration::from_millis(50)) {
            let m = m?;
            let p: Processed = serde_json::from_slice(m.payload().unwrap_or_default())?;
            if p.seq == WARM_UP {
                live.store(true, Ordering::SeqCst);
            } else {
                out.push((now_us() - p.sent_us) as f64 / 1000.0);
            }
        }
    }
    Ok(out)
}
