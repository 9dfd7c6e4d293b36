//! OpenTelemetry spans (feature `otel`), captured in memory: the trace of the
//! request that wrote an event goes on through the outbox relay's `send` span
//! to the consumer's `process` span, with the messaging semantic-convention
//! attributes; a record whose `traceparent` is not one starts no foreign trace.
//!
//! Run with `cargo test -p oncely --features otel --test otel`.

mod outbox_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use oncely::outbox::{self, OutgoingEvent};
use oncely::{Cx, Event, HandlerError};
use oncely_testkit as kit;
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use outbox_support::{relay, start, wait_drained, WAIT};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

struct Seen(Arc<AtomicUsize>);

async fn handle(_ev: Event<serde_json::Value>, _cx: &mut Cx, seen: oncely::State<Seen>) -> Result<(), HandlerError> {
    seen.0 .0.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| &kv.value)
}

fn attr_str(span: &SpanData, key: &str) -> String {
    attr(span, key).map(|v| v.as_str().into_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trace_goes_from_the_request_through_the_relay_to_the_consumer() -> Result<()> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("oncely-test")))
        .with(tracing_subscriber::EnvFilter::new("info"));
    tracing::subscriber::set_global_default(subscriber)?;

    let db = kit::TestDb::new().await?;
    let (topic, group) = (kit::unique("otel-orders"), kit::unique("otel"));
    kit::create_topic(&topic, 1).await?;

    // The request: writes an event through the outbox inside its span.
    let request = tracing::info_span!("http.request", "otel.kind" = "server");
    let traced = async {
        let mut tx = db.pool.begin().await?;
        let e = outbox::enqueue(&mut tx, &topic, "order-1", ("com.example.order.created", &json!({"id": 1}))).await?;
        tx.commit().await?;
        anyhow::Ok(e)
    }
    .instrument(request.clone())
    .await?;
    drop(request);
    // Hostile: a traceparent that is not one (not UTF-8).
    let mut tx = db.pool.begin().await?;
    let bad = OutgoingEvent::json("com.example.order.created", &json!({"id": 2}))?.traceparent(&b"00-\xff\xfe-01"[..]);
    let hostile = outbox::enqueue(&mut tx, &topic, "order-\u{e9}", &bad).await?;
    tx.commit().await?;

    let r = start(relay(&db.pool, &kit::unique("relay")))?;
    wait_drained(&db.pool, 2).await?;
    r.stop().await?;

    let seen = Arc::new(AtomicUsize::new(0));
    let token = CancellationToken::new();
    let c = tokio::spawn(
        oncely::Consumer::builder(group.clone())
            .bootstrap_servers(kit::bootstrap())
            .pool(db.pool.clone())
            .topic(topic.clone())
            .state(Seen(seen.clone()))
            .handler(handle)
            .handle_sigterm(false)
            .force_inbox_retention(true)
            .run(token.clone()),
    );
    kit::wait_until(WAIT, "both events handled", || async { Ok(seen.load(Ordering::SeqCst) == 2) }).await?;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(60), c).await.context("consumer did not stop")???;
    provider.force_flush()?;
    let spans = exporter.get_finished_spans()?;

    let named = |name: String| spans.iter().filter(move |s| s.name == name.as_str());
    let request = named("http.request".to_owned()).next().context("the request span")?;
    let trace = request.span_context.trace_id();
    let send = named(format!("send {topic}"))
        .find(|s| attr_str(s, "messaging.message.id") == traced.ce_id)
        .context("the relay's send span of the traced event")?;
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(send.span_context.trace_id(), trace, "the send span is in the request's trace");
    assert_eq!(send.parent_span_id, request.span_context.span_id(), "and a child of the request");
    assert!(send.parent_span_is_remote);
    assert_eq!(attr_str(send, "messaging.system"), "kafka");
    assert_eq!(attr_str(send, "messaging.operation.type"), "send");
    assert_eq!(attr_str(send, "messaging.destination.name"), topic);
    assert_eq!(attr_str(send, "messaging.kafka.message.key"), "order-1");

    let processes: Vec<&SpanData> = named(format!("process {topic}")).collect();
    let event = processes
        .iter()
        .find(|s| attr_str(s, "messaging.message.id").ends_with(&traced.ce_id))
        .context("the consumer's process span of the traced event")?;
    assert_eq!(event.span_kind, SpanKind::Consumer);
    assert_eq!(event.span_context.trace_id(), trace, "the process span is in the request's trace");
    assert_eq!(event.parent_span_id, request.span_context.span_id(), "and a child of the context the record carries");
    assert_eq!(attr_str(event, "messaging.system"), "kafka");
    assert_eq!(attr_str(event, "messaging.operation.type"), "process");
    assert_eq!(attr_str(event, "messaging.destination.name"), topic);
    assert_eq!(attr_str(event, "messaging.destination.partition.id"), "0");
    assert_eq!(attr_str(event, "messaging.consumer.group.name"), group);
    assert_eq!(attr(event, "messaging.kafka.offset"), Some(&Value::I64(0)));
    assert_eq!(attr_str(event, "messaging.kafka.message.key"), "order-1");

    let batches: Vec<&&SpanData> =
        processes.iter().filter(|s| attr(s, "messaging.batch.message_count").is_some()).collect();
    let counted: i64 = batches
        .iter()
        .map(|b| match attr(b, "messaging.batch.message_count") {
            Some(Value::I64(n)) => *n,
            _ => 0,
        })
        .sum();
    assert_eq!(counted, 2, "the batch spans count both records: {batches:?}");
    assert!(batches.iter().all(|b| b.span_kind == SpanKind::Consumer));
    let links: Vec<_> = batches.iter().flat_map(|b| b.links.iter()).collect();
    assert_eq!(links.len(), 1, "one link, to the traced record's context; the hostile header links nothing");
    assert_eq!(links[0].span_context.span_id(), request.span_context.span_id());
    assert_eq!(links[0].span_context.trace_id(), trace);

    let odd = processes
        .iter()
        .find(|s| attr_str(s, "messaging.message.id").ends_with(&hostile.ce_id))
        .context("the process span of the hostile record")?;
    assert_ne!(odd.span_context.trace_id(), trace);
    assert!(
        batches.iter().any(|b| b.span_context.span_id() == odd.parent_span_id),
        "no traceparent: a child of its batch"
    );
    assert!(!odd.parent_span_is_remote);
    assert_eq!(attr_str(odd, "messaging.kafka.message.key"), "order-\u{e9}");
    Ok(())
}
