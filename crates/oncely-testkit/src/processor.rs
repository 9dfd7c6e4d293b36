//! Fixtures for the processor's tests: a forwarding handler a test can
//! steer, the `test-processor` binary as a child process, and a reader that
//! shows what a `read_committed` or a `read_uncommitted` reader sees.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use oncely::kafka::message_headers;
use oncely::processor::{Out, Processor, ProcessorBuilder, RawHeader};
use oncely::{Event, HandlerError};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::app::SeqEvent;

/// How the test handler behaves.
#[derive(Debug, Default)]
pub struct Behaviour {
    /// Topics each input is forwarded to (one record per topic).
    pub outputs: Vec<String>,
    /// Written into every output (which process emitted it).
    pub tag: String,
    /// After this many handled events, print `HANGING` and block forever,
    /// with the outputs of the open transaction already sent.
    pub hang_after: Option<u64>,
    /// Block the same way on the first event of this key.
    pub hang_key: Option<String>,
    /// Time spent per event.
    pub delay: Duration,
    /// Keys that fail transiently this many times (per process), then succeed.
    pub fail_times: HashMap<String, u32>,
    /// Keys whose events are rejected.
    pub reject_keys: HashSet<String>,
    handled: AtomicU64,
    failures: Mutex<HashMap<String, u32>>,
}

impl Behaviour {
    /// Forwards to `outputs`, tagged `tag`.
    pub fn new(outputs: &[&str], tag: &str) -> Self {
        Behaviour { outputs: outputs.iter().map(|s| (*s).to_owned()).collect(), tag: tag.into(), ..Default::default() }
    }
}

/// What the test handler emits for each input.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Forwarded {
    /// The input event's identity.
    pub input: String,
    /// Its key.
    pub key: String,
    /// Its per-key sequence number.
    pub seq: i64,
    /// The emitting process's tag.
    pub tag: String,
}

/// The test handler: one [`Forwarded`] record per output topic, keyed like
/// the input. Told to hang, it prints `HANGING` and blocks at the start of
/// the event: the outputs of the events before it are then in the open
/// transaction (sent to the broker, not committed).
pub async fn forward(ev: Event<SeqEvent>, out: &mut Out) -> Result<(), HandlerError> {
    let b = out.state::<Behaviour>().ok_or_else(|| HandlerError::reject("no behaviour"))?;
    let key = ev.data.key.clone();
    let handled = b.handled.load(Ordering::SeqCst);
    if b.hang_after == Some(handled) || b.hang_key.as_deref() == Some(key.as_str()) {
        println!("HANGING");
        let _ = std::io::stdout().flush();
        std::future::pending::<()>().await;
    }
    if b.reject_keys.contains(&key) {
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
    if !b.delay.is_zero() {
        tokio::time::sleep(b.delay).await;
    }
    let fwd = Forwarded { input: ev.id.display(), key: key.clone(), seq: ev.data.seq, tag: b.tag.clone() };
    for topic in &b.outputs {
        out.send(topic, &key, "test.forwarded", &fwd)?;
    }
    b.handled.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// A processor `name` of `input` with the test handler, fast group
/// timeouts, and no SIGTERM handling (the test binary turns it on).
pub fn processor(name: &str, input: &str, instance: &str, behaviour: Behaviour) -> ProcessorBuilder {
    let mut b = Processor::builder(name)
        .bootstrap_servers(crate::bootstrap())
        .input(input)
        .instance_id(instance)
        .handle_sigterm(false)
        .consumer_kafka("session.timeout.ms", "6000")
        .consumer_kafka("heartbeat.interval.ms", "500");
    for o in &behaviour.outputs {
        b = b.output(o.clone());
    }
    b.handler(forward).state(behaviour)
}

// ------------------------------------------------------------- reading

/// A record as a reader sees it, headers byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Payload.
    pub payload: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<RawHeader>,
}

impl Rec {
    /// The last value of header `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().rev().find(|(k, _)| k == name.as_bytes()).and_then(|(_, v)| v.as_deref())
    }

    /// The payload as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        Ok(serde_json::from_slice(self.payload.as_deref().unwrap_or_default())?)
    }
}

/// Everything a reader with this isolation level sees in `topic` now, in
/// (partition, offset) order. The reader first takes each partition's end as
/// this isolation level sees it (the last stable offset for
/// `read_committed`: an open transaction's records are beyond it), then
/// reads from the beginning until every partition is past that end: a record
/// at or beyond it, or the end-of-partition event. The end of a partition
/// that keeps being written moves all the time; waiting only for the event
/// there can outlast any deadline (it comes only from a fetch that found
/// nothing new), so the snapshot is what "now" means.
pub async fn visible(topic: &str, read_committed: bool) -> Result<Vec<Rec>> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || read_visible(&topic, read_committed)).await?
}

fn read_visible(topic: &str, read_committed: bool) -> Result<Vec<Rec>> {
    let c: BaseConsumer = oncely::kafka::KafkaConnection::new(crate::bootstrap())
        .client_config()?
        .set("group.id", crate::unique("reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", if read_committed { "read_committed" } else { "read_uncommitted" })
        .create()?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if parts.is_empty() {
        // Not created yet (the processor creates its dead-letter topics at start).
        return Ok(Vec::new());
    }
    // The end each partition has now, for this isolation level (librdkafka
    // lists offsets with the consumer's own isolation level). An empty
    // partition is read already.
    let mut end: HashMap<i32, i64> = HashMap::new();
    let mut done: HashSet<i32> = HashSet::new();
    for p in &parts {
        let (low, high) = c
            .fetch_watermarks(topic, *p, Duration::from_secs(10))
            .with_context(|| format!("the end of {topic} [{p}]"))?;
        end.insert(*p, high);
        if high <= low {
            done.insert(*p);
        }
    }
    let mut tpl = TopicPartitionList::new();
    for p in &parts {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.len() < parts.len() {
        if Instant::now() > deadline {
            bail!("reading {topic}: only partitions {done:?} of {parts:?} reached their ends {end:?} in 60 s");
        }
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                // The last record before the end, or one written after it.
                // (When the end is a transaction marker, which a reader never
                // sees, the next record or the end-of-partition event says it.)
                if m.offset() + 1 >= end[&m.partition()] {
                    done.insert(m.partition());
                }
                out.push(Rec {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers: message_headers(&m).to_vec(),
                });
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                done.insert(p);
            }
            Some(Err(e)) if crate::is_transient_read_error(&e) => {}
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// Checks the [`Forwarded`] records one reader saw of one output topic:
/// every published identity exactly once, and per key the sequence 1, 2, 3…
/// in the order the topic holds them. Returns the first violation.
pub fn check_exactly_once_in_order(recs: &[Rec], published: &[oncely::envelope::Published]) -> Result<()> {
    let fwd: Vec<Forwarded> = recs.iter().map(Rec::json).collect::<Result<_>>()?;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for f in &fwd {
        *seen.entry(f.input.as_str()).or_default() += 1;
    }
    let dup: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).take(5).collect();
    anyhow::ensure!(dup.is_empty(), "inputs emitted more than once: {dup:?}");
    let missing: Vec<_> = published
        .iter()
        .filter(|p| !seen.contains_key(p.event_id.display().as_str()))
        .take(5)
        .map(|p| &p.event_id)
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "inputs never emitted: {missing:?} ({} records for {} published)",
        fwd.len(),
        published.len()
    );
    anyhow::ensure!(fwd.len() == published.len(), "{} records for {} published inputs", fwd.len(), published.len());
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (f, r) in fwd.iter().zip(recs) {
        let prev = last.insert(f.key.as_str(), f.seq).unwrap_or(0);
        anyhow::ensure!(
            f.seq == prev + 1,
            "key {}: seq {} after {prev} (partition {} offset {})",
            f.key,
            f.seq,
            r.partition,
            r.offset
        );
    }
    Ok(())
}

// ------------------------------------------------------------- process

/// A running `test-processor` (killed when dropped): its stdout lines
/// (`READY`, `HANGING`) and its stderr kept for the test to read.
pub type TestProcessor = crate::process::TestProcess;

/// Starts `exe NAME INPUT OUTPUTS` with `INSTANCE=instance` and extra
/// variables, and waits for `READY`. Its stderr is kept (and echoed, tagged
/// with the instance).
pub async fn spawn_processor(
    exe: &Path,
    name: &str,
    input: &str,
    outputs: &[&str],
    instance: &str,
    envs: &[(&str, &str)],
) -> Result<TestProcessor> {
    let mut cmd = Command::new(exe);
    cmd.arg(name)
        .arg(input)
        .arg(outputs.join(","))
        .env("INSTANCE", instance)
        .env("ONCELY_KAFKA_BOOTSTRAP", crate::bootstrap())
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,oncely=info".into()));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    crate::process::TestProcess::start(cmd, "test-processor", Some(instance)).await
}
