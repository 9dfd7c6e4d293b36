//! The Kafka → Kafka processor against the real broker (which enforces
//! transactions), with real faults: SIGKILL inside open transactions, a
//! second instance with the same `transactional.id`, a rolling restart under
//! load, poison records, hostile bytes, outputs over the topic's limit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use oncely::envelope::{CloudEventAttrs, RawPayload};
use oncely::failure::{H_ATTEMPTS, H_DLT_FQCN, H_DLT_GROUP, H_DLT_OFFSET, H_DLT_PARTITION, H_DLT_TOPIC, H_REASON};
use oncely::kafka::headers_with_nulls;
use oncely::processor::{events, FencedPolicy, Out};
use oncely::{Event, HandlerError, Publisher};
use oncely_testkit::app::{self, SeqEvent};
use oncely_testkit::processor::{self as proc, visible, Behaviour, Rec};
use oncely_testkit::{self as kit};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(120);

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_test-processor"))
}

fn dlt(input: &str, name: &str) -> String {
    oncely::failure::dlt_topic(input, name)
}

/// Waits until a reader with this isolation sees at least `n` records of `topic`; returns them.
async fn wait_visible(topic: &str, read_committed: bool, n: usize) -> Result<Vec<Rec>> {
    let what = format!("{n} {} records in {topic}", if read_committed { "committed" } else { "uncommitted" });
    kit::wait_until(WAIT, &what, || async { Ok(visible(topic, read_committed).await?.len() >= n) }).await?;
    visible(topic, read_committed).await
}

struct Running {
    token: CancellationToken,
    join: tokio::task::JoinHandle<oncely::Result<()>>,
}

impl Running {
    fn start(b: oncely::ProcessorBuilder) -> Self {
        let token = CancellationToken::new();
        let join = tokio::spawn(b.run(token.clone()));
        Running { token, join }
    }

    async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.join).await.context("processor did not stop")???;
        Ok(())
    }
}

/// The committed offset of `group` for each partition of `topic`, read
/// without waiting for pending transactions (`read_uncommitted`).
fn committed_offsets(group: &str, topic: &str, partitions: i32) -> Result<Vec<Option<i64>>> {
    let c: BaseConsumer = oncely::kafka::KafkaConnection::new(kit::bootstrap())
        .client_config()?
        .set("group.id", group)
        .set("isolation.level", "read_uncommitted")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(20))?;
    Ok((0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_inside_an_open_transaction_then_restart_emits_every_output_exactly_once_in_order() -> Result<()> {
    kit::init_tracing();
    let (input, out, audit, name) =
        (kit::unique("payments"), kit::unique("processed"), kit::unique("audit"), kit::unique("proc"));
    kit::create_topic(&input, 3).await?;
    kit::create_topic(&out, 3).await?;
    kit::create_topic(&audit, 2).await?;
    let published = app::publish_seq(&input, 20, 15).await?;
    assert_eq!(published.len(), 300);

    // Transactions of about 50 inputs; the process blocks at the start of
    // the 137th event, some transactions committed, the open one holding
    // records that are in the log but not committed.
    let envs = [("HANG_AFTER", "136"), ("COMMIT_EVERY", "50"), ("COMMIT_MS", "600000")];
    let mut first = proc::spawn_processor(exe(), &name, &input, &[&out, &audit], "i-0", &envs).await?;
    first.wait_line("HANGING", WAIT).await?;
    kit::wait_until(WAIT, "uncommitted outputs in the log", || async {
        Ok(visible(&out, false).await?.len() > visible(&out, true).await?.len())
    })
    .await?;
    // Nothing commits while the process hangs: what read_committed sees is fixed.
    let committed = visible(&out, true).await?.len();
    assert!((50..136).contains(&committed), "{committed} committed before the hang");
    first.kill9().await?;

    let second = proc::spawn_processor(exe(), &name, &input, &[&out, &audit], "i-0", &[]).await?;
    let outs = wait_visible(&out, true, 300).await?;
    let audits = wait_visible(&audit, true, 300).await?;
    second.terminate(WAIT).await?;
    proc::check_exactly_once_in_order(&outs, &published).context("payments-processed")?;
    proc::check_exactly_once_in_order(&audits, &published).context("audit-log")?;

    // The aborted copies are in the log, invisible to read_committed: the
    // test reads what it claims. They carry the same ce_id as the committed
    // copies (derived from the input), so a downstream inbox drops them too.
    let raw = visible(&out, false).await?;
    assert!(raw.len() > 300, "the aborted transaction's outputs are in the log ({} records)", raw.len());
    let mut ids: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for r in &raw {
        let f: proc::Forwarded = r.json()?;
        ids.entry(f.input).or_default().push(r.header("ce_id").context("ce_id")?.to_vec());
    }
    let twice = ids.values().filter(|v| v.len() == 2).count();
    assert_eq!(twice, raw.len() - 300, "an aborted copy and a committed one per input of the killed transaction");
    assert!(twice <= 136 - committed, "only inputs the first process had not committed were redone");
    assert!(ids.values().all(|v| v.iter().all(|id| id == &v[0])), "every copy of an output has the same ce_id");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_with_the_same_transactional_id_fences_the_first_which_stops_and_says_why() -> Result<()> {
    kit::init_tracing();
    let (input, out, name) = (kit::unique("payments"), kit::unique("processed"), kit::unique("proc"));
    kit::create_topic(&input, 4).await?;
    kit::create_topic(&out, 4).await?;
    let published = app::publish_seq(&input, 10, 400).await?;

    // The first instance is slow (5 ms per event, 20 s for the backlog), so
    // it is mid-stream, inside a transaction, when the second one starts
    // with its id.
    let slow = [("DELAY_MS", "5"), ("COMMIT_MS", "200")];
    let mut older = proc::spawn_processor(exe(), &name, &input, &[&out], "same", &slow).await?;
    wait_visible(&out, true, 100).await?;
    let newer = proc::spawn_processor(exe(), &name, &input, &[&out], "same", &[]).await?;

    let status = older.wait_exit(Duration::from_secs(60)).await.context("the fenced instance must stop, not loop")?;
    assert_eq!(status.code(), Some(3), "fenced is a non-zero exit: {status}");
    let logs = older.stderr();
    let fenced: Vec<&String> = logs.iter().filter(|l| l.contains("so this older one was fenced")).collect();
    assert_eq!(fenced.len(), 1, "one fencing, logged once, never retried: {fenced:#?}");
    assert!(
        fenced[0].contains("another instance started with the same transactional.id")
            && fenced[0].contains(&format!("{name}/same")),
        "the log names the cause and the id: {}",
        fenced[0]
    );

    let outs = wait_visible(&out, true, published.len()).await?;
    newer.terminate(WAIT).await?;
    proc::check_exactly_once_in_order(&outs, &published)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_instance_fenced_by_a_second_one_learns_it_within_the_liveness_check() -> Result<()> {
    kit::init_tracing();
    let (input, out, name) = (kit::unique("payments"), kit::unique("processed"), kit::unique("proc"));
    kit::create_topic(&input, 2).await?;
    kit::create_topic(&out, 2).await?;
    let published = app::publish_seq(&input, 4, 5).await?;
    let mut older = proc::spawn_processor(exe(), &name, &input, &[&out], "same", &[]).await?;
    // The backlog is done: the older instance has nothing left to commit.
    wait_visible(&out, true, published.len()).await?;
    let newer = proc::spawn_processor(exe(), &name, &input, &[&out], "same", &[]).await?;
    // No traffic reaches it, yet it stops: its liveness transaction (every
    // 5 s when idle) is refused with the fencing error.
    let status = older.wait_exit(Duration::from_secs(60)).await.context("an idle zombie must find out")?;
    assert_eq!(status.code(), Some(3), "{status}");
    assert_eq!(older.stderr().iter().filter(|l| l.contains("so this older one was fenced")).count(), 1);
    newer.terminate(WAIT).await?;
    proc::check_exactly_once_in_order(&visible(&out, true).await?, &published)?;
    Ok(())
}

/// Publishes `k0..k{keys}` events with increasing seq until stopped.
fn publish_until(
    topic: &str,
    keys: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<Vec<oncely::envelope::Published>>> {
    let topic = topic.to_owned();
    tokio::spawn(async move {
        let publisher = Publisher::new(kit::bootstrap(), "/tests/rolling")?;
        let mut out = Vec::new();
        let mut seq = 0;
        while !stop.load(Ordering::SeqCst) {
            seq += 1;
            let evs: Vec<SeqEvent> = (0..keys).map(|k| SeqEvent { key: format!("k{k}"), seq }).collect();
            let sends = evs.iter().map(|ev| publisher.publish(&topic, &ev.key, "test.seq", ev));
            for r in futures::future::join_all(sends).await {
                out.push(r?);
            }
            // A steady load of about 1,000 events/s, not a burst.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(out)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_three_instances_under_load_keeps_exactly_once_and_per_key_order() -> Result<()> {
    kit::init_tracing();
    let (input, out, name) = (kit::unique("payments"), kit::unique("processed"), kit::unique("proc"));
    kit::create_topic(&input, 6).await?;
    kit::create_topic(&out, 6).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = publish_until(&input, 20, stop.clone());

    let ids = ["a", "b", "c"];
    let mut running = Vec::new();
    for id in ids {
        running.push(proc::spawn_processor(exe(), &name, &input, &[&out], id, &[]).await?);
    }
    let admin = oncely::kafka::admin::KafkaAdmin::new(kit::bootstrap(), &[])?;
    let all_members = || async {
        let g = admin.describe_consumer_groups(&[name.as_str()]).await?;
        Ok(g.first().is_some_and(|g| g.members.len() == 3 && g.members.iter().all(|m| !m.assignment.is_empty())))
    };
    kit::wait_until(WAIT, "three members owning partitions", all_members).await?;
    // One instance after the other: SIGTERM (commit, leave the group), start
    // again under the same id, wait until it owns partitions and the output
    // moved on, while the load keeps coming.
    for (i, id) in ids.iter().enumerate() {
        let before = visible(&out, true).await?.len();
        running.remove(0).terminate(WAIT).await.with_context(|| format!("stopping {id}"))?;
        running.push(proc::spawn_processor(exe(), &name, &input, &[&out], id, &[]).await?);
        kit::wait_until(WAIT, "three members owning partitions", all_members).await?;
        wait_visible(&out, true, before + 200).await.with_context(|| format!("progress after restart {i}"))?;
    }
    stop.store(true, Ordering::SeqCst);
    let published = load.await??;
    assert!(published.len() > 1000, "the load ran throughout ({} events)", published.len());
    let outs = wait_visible(&out, true, published.len()).await?;
    for p in running {
        p.terminate(WAIT).await?;
    }
    proc::check_exactly_once_in_order(&outs, &published)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poison_record_is_dead_lettered_in_the_transaction_that_commits_its_offset() -> Result<()> {
    kit::init_tracing();
    let (input, out, name) = (kit::unique("payments"), kit::unique("processed"), kit::unique("proc"));
    kit::create_topic(&input, 2).await?;
    kit::create_topic(&out, 2).await?;
    let publisher = Publisher::new(kit::bootstrap(), "/tests/poison")?;
    let mut published = app::publish_seq(&input, 4, 3).await?;
    // The poison record: valid identity, a payload that is not JSON. Then a
    // good event of the same key (same partition), on which the first
    // process blocks, its transaction open with the dead letter in it.
    let attrs = CloudEventAttrs::new_now("/tests/poison", "test.seq");
    let (pp, po) = publisher.publish_raw(&input, Some(b"poison"), Some(b"{not json"), &attrs.to_headers()).await?;
    published.push(publisher.publish(&input, "poison", "test.seq", &SeqEvent { key: "poison".into(), seq: 1 }).await?);

    let envs = [("HANG_KEY", "poison"), ("COMMIT_MS", "600000"), ("COMMIT_EVERY", "100000")];
    let mut first = proc::spawn_processor(exe(), &name, &input, &[&out], "i-0", &envs).await?;
    first.wait_line("HANGING", WAIT).await?;
    let uncommitted = wait_visible(&dlt(&input, &name), false, 1).await?;
    assert_eq!(uncommitted[0].payload.as_deref(), Some(&b"{not json"[..]));
    assert!(visible(&dlt(&input, &name), true).await?.is_empty(), "the open transaction's dead letter is invisible");
    assert_eq!(committed_offsets(&name, &input, 2)?[pp as usize], None, "no offset committed past it either");
    first.kill9().await?;

    let second = proc::spawn_processor(exe(), &name, &input, &[&out], "i-0", &[]).await?;
    let outs = wait_visible(&out, true, published.len()).await?;
    let dead = wait_visible(&dlt(&input, &name), true, 1).await?;
    second.terminate(WAIT).await?;
    proc::check_exactly_once_in_order(&outs, &published)?;
    assert_eq!(dead.len(), 1, "one dead letter for read_committed: {dead:?}");
    assert_eq!(visible(&dlt(&input, &name), false).await?.len(), 2, "the aborted copy is there for read_uncommitted");
    let d = &dead[0];
    assert_eq!(d.payload.as_deref(), Some(&b"{not json"[..]));
    assert_eq!(d.key.as_deref(), Some(&b"poison"[..]));
    assert_eq!(d.header(H_REASON), Some(&b"undecodable-payload"[..]));
    assert_eq!(d.header(H_DLT_TOPIC), Some(input.as_bytes()));
    assert_eq!(d.header(H_DLT_PARTITION), Some(&pp.to_be_bytes()[..]));
    assert_eq!(d.header(H_DLT_OFFSET), Some(&po.to_be_bytes()[..]));
    assert_eq!(d.header(H_DLT_GROUP), Some(name.as_bytes()));
    assert_eq!(d.header(H_DLT_FQCN), Some(&b"oncely::DecodeError"[..]));
    assert_eq!(d.header(H_ATTEMPTS), Some(&b"1"[..]));
    assert_eq!(d.header("ce_id"), Some(attrs.id.as_bytes()), "the original headers are kept");
    let offsets = committed_offsets(&name, &input, 2)?;
    assert!(offsets[pp as usize].is_some_and(|o| o > po), "the offset moved past the poison record: {offsets:?}");
    Ok(())
}

/// Forwards every event byte for byte: key, payload and headers as received.
async fn forward_bytes(ev: Event<RawPayload>, out: &mut Out) -> Result<(), HandlerError> {
    let topic = out.state::<String>().ok_or_else(|| HandlerError::reject("no output"))?;
    let headers: Vec<(Vec<u8>, Vec<u8>)> =
        ev.record.headers.iter().map(|(k, v)| (k.to_vec(), v.unwrap_or_default().to_vec())).collect();
    out.send_raw(&topic, ev.record.key.as_deref(), Some(&ev.data.0), &headers)
}

/// Produces one record with headers whose names may be any bytes.
async fn produce_raw(topic: &str, key: &[u8], payload: &[u8], headers: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<()> {
    let p: FutureProducer = oncely::kafka::KafkaConnection::new(kit::bootstrap()).client_config()?.create()?;
    let rec = FutureRecord::to(topic).key(key).payload(payload).headers(headers_with_nulls(headers)?);
    p.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bytes_are_forwarded_byte_for_byte_or_dead_lettered_and_never_crash_the_processor() -> Result<()> {
    kit::init_tracing();
    let (input, out, name) = (kit::unique("raw"), kit::unique("copy"), kit::unique("proc"));
    kit::create_topic(&input, 1).await?;
    kit::create_topic(&out, 1).await?;
    let ce = |id: &str| -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let mut a = CloudEventAttrs::new_now("/tests/hostile", "test.raw");
        a.id = id.into();
        a.to_headers().into_iter().map(|(k, v)| (k.into_bytes(), Some(v))).collect()
    };
    // 1. plain; 2. a header name that is not UTF-8 (and NUL bytes in the key,
    // the payload and a header value); 3. NUL bytes and invalid UTF-8 in key
    // and payload; 4. no ce_id; 5. plain again: the partition keeps flowing.
    produce_raw(&input, b"k1", b"{\"n\":1}", &ce("e1")).await?;
    let mut bad_name = ce("e2");
    bad_name.push((vec![0xff, 0xfe, b'n'], Some(vec![0, 1, 0])));
    produce_raw(&input, b"k\0\xff", b"\0\xff\0payload", &bad_name).await?;
    let plain_bytes = ce("e3");
    produce_raw(&input, b"\0k3\0", b"\xc3\x28\0\0", &plain_bytes).await?;
    let no_id: Vec<_> = ce("e4").into_iter().filter(|(k, _)| k != b"ce_id").collect();
    produce_raw(&input, b"k4", b"{}", &no_id).await?;
    produce_raw(&input, b"k1", b"{\"n\":5}", &ce("e5")).await?;

    let p = Running::start(
        oncely::Processor::builder(&name)
            .bootstrap_servers(kit::bootstrap())
            .input(&input)
            .output(&out)
            .instance_id("i-0")
            .raw_handler(forward_bytes)
            .state(out.clone())
            .handle_sigterm(false),
    );
    let copies = wait_visible(&out, true, 3).await?;
    let dead = wait_visible(&dlt(&input, &name), true, 2).await?;
    p.stop().await?;

    let keys: Vec<&[u8]> = copies.iter().map(|r| r.key.as_deref().unwrap_or_default()).collect();
    assert_eq!(keys, vec![&b"k1"[..], b"\0k3\0", b"k1"]);
    assert_eq!(copies[1].payload.as_deref(), Some(&b"\xc3\x28\0\0"[..]), "NUL and invalid UTF-8 forwarded as they are");
    assert_eq!(copies[1].headers, plain_bytes);

    assert_eq!(dead[0].header(H_REASON), Some(&b"invalid-header-name"[..]));
    assert_eq!(dead[0].key.as_deref(), Some(&b"k\0\xff"[..]));
    assert_eq!(dead[0].payload.as_deref(), Some(&b"\0\xff\0payload"[..]));
    let original: Vec<_> = dead[0].headers.iter().take(bad_name.len()).cloned().collect();
    assert_eq!(original, bad_name, "the dead letter keeps the original headers byte for byte");
    let msg = dead[0].header(oncely::failure::H_DLT_MESSAGE).context("message")?;
    assert!(String::from_utf8_lossy(msg).contains("\\xff\\xfen"), "the message shows the name: {msg:?}");
    assert_eq!(dead[1].header(H_REASON), Some(&b"missing-event-id"[..]));
    assert_eq!(events::transactions_counted(&name, "aborted"), 0);
    Ok(())
}

#[derive(serde::Deserialize)]
struct Padded {
    key: String,
    pad: usize,
}

async fn pad_output(ev: Event<Padded>, out: &mut Out) -> Result<(), HandlerError> {
    let topic = out.state::<String>().ok_or_else(|| HandlerError::reject("no output"))?;
    out.send(&topic, &ev.data.key, "test.padded", &serde_json::json!({ "pad": "x".repeat(ev.data.pad) }))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_over_its_topics_max_message_bytes_dead_letters_its_input_instead_of_aborting_forever() -> Result<()>
{
    kit::init_tracing();
    let (input, out, name) = (kit::unique("sizes"), kit::unique("padded"), kit::unique("proc"));
    kit::create_topic(&input, 1).await?;
    kit::create_topic_with(&out, 1, &[("max.message.bytes", "20000")]).await?;
    let publisher = Publisher::new(kit::bootstrap(), "/tests/sizes")?;
    let send = |pad: usize| {
        let p = publisher.clone();
        let input = input.clone();
        async move { p.publish(&input, "k", "test.pad", &serde_json::json!({"key": "k", "pad": pad})).await }
    };
    send(100).await?;
    let too_big = send(50_000).await?;
    send(200).await?;

    let p = Running::start(
        oncely::Processor::builder(&name)
            .bootstrap_servers(kit::bootstrap())
            .input(&input)
            .output(&out)
            .instance_id("i-0")
            .handler(pad_output)
            .state(out.clone())
            .handle_sigterm(false),
    );
    let copies = wait_visible(&out, true, 2).await?;
    let dead = wait_visible(&dlt(&input, &name), true, 1).await?;
    assert_eq!(copies.len(), 2);
    assert_eq!(dead[0].header(H_REASON), Some(&b"oversized-output"[..]));
    assert_eq!(dead[0].header(H_DLT_OFFSET), Some(&too_big.offset.to_be_bytes()[..]));
    assert_eq!(events::transactions_counted(&name, "aborted"), 0, "caught before it reached the transaction");

    // The limit lowered while the processor runs (it read 20,000 at start):
    // the broker refuses the record, the transaction aborts, and the input
    // whose output was refused is dead-lettered when read again.
    kit::kafka_tool(
        "kafka-configs",
        &[
            "--bootstrap-server",
            &kit::bootstrap(),
            "--alter",
            "--entity-type",
            "topics",
            "--entity-name",
            &out,
            "--add-config",
            "max.message.bytes=5000",
        ],
    )?;
    let refused = send(10_000).await?;
    let dead = wait_visible(&dlt(&input, &name), true, 2).await?;
    send(300).await?;
    let copies = wait_visible(&out, true, 3).await?;
    p.stop().await?;
    assert_eq!(copies.len(), 3);
    assert_eq!(dead[1].header(H_REASON), Some(&b"oversized-output"[..]));
    assert_eq!(dead[1].header(H_DLT_OFFSET), Some(&refused.offset.to_be_bytes()[..]));
    // One abort for the refusal; librdkafka then bumps the producer epoch
    // over the sequence number the refused record used, which costs the
    // next transaction to that partition one more abort. Bounded, not a loop.
    let aborted = events::transactions_counted(&name, "aborted");
    assert!((1..=2).contains(&aborted), "{aborted} aborts");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_failure_retries_in_place_in_key_order_and_rejects_and_exhausted_retries_are_dead_lettered(
) -> Result<()> {
    kit::init_tracing();
    let (input, out, name) = (kit::unique("payments"), kit::unique("processed"), kit::unique("proc"));
    kit::create_topic(&input, 2).await?;
    kit::create_topic(&out, 2).await?;
    let published = app::publish_seq(&input, 6, 5).await?;
    let mut b = Behaviour::new(&[&out], "t");
    b.fail_times = app::parse_fail_keys("k1:2,k3:3");
    b.reject_keys.insert("k2".into());
    let p = Running::start(
        proc::processor(&name, &input, "i-0", b)
            .max_attempts(3)
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(100)),
    );
    // k1's first event fails twice, then succeeds. k3's first event fails
    // three times and is dead-lettered, then its partition goes on. k2's five
    // events are rejected.
    let dead = wait_visible(&dlt(&input, &name), true, 6).await?;
    let outs = wait_visible(&out, true, 24).await?;
    p.stop().await?;
    let reasons: Vec<String> =
        dead.iter().map(|d| String::from_utf8_lossy(d.header(H_REASON).unwrap_or_default()).into_owned()).collect();
    assert_eq!(reasons.iter().filter(|r| *r == "rejected").count(), 5, "{reasons:?}");
    assert_eq!(reasons.iter().filter(|r| *r == "max-attempts").count(), 1, "{reasons:?}");
    let exhausted = dead.iter().find(|d| d.header(H_REASON) == Some(&b"max-attempts"[..])).context("max-attempts")?;
    assert_eq!(exhausted.header(H_ATTEMPTS), Some(&b"3"[..]));
    let dead_ids: Vec<String> =
        dead.iter().map(|d| String::from_utf8_lossy(d.header("ce_id").unwrap_or_default()).into_owned()).collect();
    let survivors: Vec<_> = published.iter().filter(|p| !dead_ids.contains(&p.ce_id)).cloned().collect();
    assert_eq!(survivors.len(), 24);
    // Per key, order holds through the retries: k1's first event failed
    // twice and everything behind it waited. k3 lost its first event to the
    // dead-letter topic, so its survivors start at 2.
    let fwd: Vec<proc::Forwarded> = outs.iter().map(Rec::json).collect::<Result<_>>()?;
    let mut per_key: HashMap<&str, Vec<i64>> = HashMap::new();
    for f in &fwd {
        per_key.entry(f.key.as_str()).or_default().push(f.seq);
    }
    assert_eq!(per_key["k1"], vec![1, 2, 3, 4, 5]);
    assert_eq!(per_key["k3"], vec![2, 3, 4, 5]);
    assert!(!per_key.contains_key("k2"));
    assert_eq!(fwd.len(), survivors.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn under_the_rejoin_policy_a_fenced_instance_comes_back_once_the_other_holder_is_gone() -> Result<()> {
    kit::init_tracing();
    let (input, out, name) = (kit::unique("payments"), kit::unique("processed"), kit::unique("proc"));
    kit::create_topic(&input, 2).await?;
    kit::create_topic(&out, 2).await?;
    let first = app::publish_seq(&input, 4, 25).await?;
    let older = Running::start(
        proc::processor(&name, &input, "same", Behaviour::new(&[&out], "older"))
            .on_fenced(FencedPolicy::Rejoin(Duration::from_secs(5))),
    );
    wait_visible(&out, true, first.len()).await?;
    // A second holder of the id fences the first, then leaves.
    let newer = Running::start(proc::processor(&name, &input, "same", Behaviour::new(&[&out], "newer")));
    let publisher = Publisher::new(kit::bootstrap(), "/tests/seq")?;
    let all = Arc::new(Mutex::new(first));
    let mut seq = 25;
    let deadline = std::time::Instant::now() + WAIT;
    // Keep events coming: the older instance learns it is fenced at its next transaction.
    while events::fenced_counted(&name) == 0 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the older instance was never fenced");
        seq += 1;
        for k in 0..4 {
            let ev = SeqEvent { key: format!("k{k}"), seq };
            let p = publisher.publish(&input, &ev.key, "test.seq", &ev).await?;
            all.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(p);
        }
    }
    // The newer instance owns the partitions once the older one has left:
    // wait until it has emitted, then stop it.
    loop {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the newer instance never emitted");
        seq += 1;
        for k in 0..4 {
            let ev = SeqEvent { key: format!("k{k}"), seq };
            let p = publisher.publish(&input, &ev.key, "test.seq", &ev).await?;
            all.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(p);
        }
        let seen = visible(&out, true).await?;
        if seen.iter().filter_map(|r| r.json::<proc::Forwarded>().ok()).any(|f| f.tag == "newer") {
            break;
        }
    }
    newer.stop().await?;
    for k in 0..4 {
        let ev = SeqEvent { key: format!("k{k}"), seq: seq + 1 };
        let p = publisher.publish(&input, &ev.key, "test.seq", &ev).await?;
        all.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(p);
    }
    let all = all.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let outs = wait_visible(&out, true, all.len()).await?;
    older.stop().await?;
    proc::check_exactly_once_in_order(&outs, &all)?;
    assert_eq!(events::fenced_counted(&name), 1, "fenced once, then rejoined without being fenced again");
    let last: Vec<proc::Forwarded> = outs.iter().map(Rec::json).collect::<Result<_>>()?;
    assert!(
        last.iter().any(|f| f.tag == "older" && f.seq == seq + 1),
        "the older instance came back and emitted the last events"
    );
    Ok(())
}
