//! oncely against a secured cluster: the test broker's SASL_SSL listener
//! (SCRAM-SHA-512, certificates from a local CA). Every client the consumer
//! and the relay create goes through the one connection; a wrong password
//! or an untrusted certificate fails the consumer, the relay and the
//! processor at start, naming the cause.

use std::time::{Duration, Instant};

use anyhow::Result;
use oncely::kafka::admin::KafkaAdmin;
use oncely::outbox::Relay;
use oncely::Publisher;
use oncely_testkit::run::{self, wait_count, wait_offsets};
use oncely_testkit::{self as kit, app};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

/// A topic made over the secure listener, with a retention the inbox covers.
async fn secure_topic(prefix: &str, partitions: i32) -> Result<String> {
    let topic = kit::unique(prefix);
    let conn = kit::secure_connection()?;
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = conn.client_config()?.create()?;
    let day = (86_400_000u64).to_string();
    let t = rdkafka::admin::NewTopic::new(&topic, partitions, rdkafka::admin::TopicReplication::Fixed(1))
        .set("retention.ms", &day)
        .set("segment.ms", &day);
    for r in admin.create_topics([&t], &rdkafka::admin::AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let a = KafkaAdmin::new(conn, &[])?;
    kit::wait_until(run::WAIT, "the topic's metadata", || async {
        Ok(a.topic_partitions(&topic).await.map(|p| p.len() as i32 == partitions).unwrap_or(false))
    })
    .await?;
    Ok(topic)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_and_the_relay_run_against_a_sasl_ssl_listener() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let topic = secure_topic("secure-orders", 2).await?;
    let group = kit::unique("g");
    let conn = kit::secure_connection()?;
    let published = {
        let p = Publisher::new(conn.clone(), "/tests/secure")?;
        let mut out = Vec::new();
        for seq in 1..=5 {
            out.push(p.publish(&topic, "k", "test.seq", &app::SeqEvent { key: "k".into(), seq }).await?);
        }
        // One undecodable record: its dead-letter copy goes through the relay.
        p.publish(&topic, "k", "test.seq", &serde_json::json!({"seq": "not a number"})).await?;
        out
    };
    // The retention check and the dead-letter topic's creation use the
    // connection too (no force_inbox_retention here).
    let c = run::start(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("s"))
            .connection(conn.clone())
            .force_inbox_retention(false),
    );
    wait_offsets(&db.pool, &group, 6).await?;
    c.stop().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    let dlt = oncely::failure::dlt_topic(&topic, &group);
    let admin = KafkaAdmin::new(conn.clone(), &[])?;
    assert_eq!(admin.topic_partitions(&dlt).await?.len(), 2, "the dead-letter topic was created");
    // With room for the input's largest record plus the dead-letter headers.
    let limit = |t: String| {
        let admin = admin.clone();
        async move { Ok::<_, anyhow::Error>(admin.describe_topic_configs(&[t]).await?[0].max_message_bytes()) }
    };
    let (input_limit, dlt_limit) = (limit(topic.clone()).await?, limit(dlt.clone()).await?);
    assert_eq!(dlt_limit, input_limit.map(|l| l + 64 * 1024), "the dead-letter topic's max.message.bytes");
    // The relay publishes the dead-letter copy over SASL_SSL.
    let token = tokio_util::sync::CancellationToken::new();
    let relay = Relay::builder(db.pool.clone(), conn.clone()).name(kit::unique("relay")).build()?;
    let r = tokio::spawn(relay.run(token.clone()));
    wait_count(&db.pool, "SELECT count(*) FROM oncely.outbox WHERE published_at IS NOT NULL", 1).await?;
    token.cancel();
    r.await??;
    let consumer: BaseConsumer = conn.client_config()?.set("group.id", kit::unique("read")).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(&dlt, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            got = Some(oncely::envelope::RawRecord::from_message(&m?));
        }
    }
    let rec = got.ok_or_else(|| anyhow::anyhow!("no dead letter on {dlt}"))?;
    assert_eq!(rec.header(oncely::failure::H_REASON), Some(Some(&b"undecodable-payload"[..])));
    Ok(())
}

/// What should fail at start with `conn`: a consumer, the relay and a
/// processor, each run to its error. Returns each one's error and how long it
/// took.
async fn each_start_fails(conn: oncely::kafka::KafkaConnection) -> Result<Vec<(&'static str, String, Duration)>> {
    let db = kit::TestDb::new().await?;
    let never = tokio_util::sync::CancellationToken::new;
    let consumer = app::consumer(&kit::unique("g"), "any-topic", db.pool.clone(), app::Behaviour::tagged("x"))
        .connection(conn.clone())
        .run(never());
    let relay = Relay::builder(db.pool.clone(), conn.clone()).name(kit::unique("relay")).build()?.run(never());
    let processor = oncely_testkit::processor::processor(
        &kit::unique("p"),
        "any-topic",
        "i1",
        oncely_testkit::processor::Behaviour::new(&["any-output"], "x"),
    )
    .connection(conn)
    .run(never());
    let runs: Vec<(&str, futures::future::BoxFuture<'static, oncely::Result<()>>)> =
        vec![("consumer", consumer), ("relay", Box::pin(relay)), ("processor", processor)];
    let mut out = Vec::new();
    for (what, run) in runs {
        let t = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .map_err(|_| anyhow::anyhow!("the {what} was still running after 60 s"))?
            .expect_err("it must not start");
        out.push((what, err.to_string(), t.elapsed()));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_fails_the_consumer_the_relay_and_the_processor_within_seconds_and_says_authentication(
) -> Result<()> {
    kit::init_tracing();
    let ca = std::env::var("ONCELY_KAFKA_SECURE_CA")?;
    for (what, msg, took) in each_start_fails(kit::secure_connection_with("not-the-password", &ca)?).await? {
        assert!(msg.contains("authentication"), "{what}: {msg}");
        assert!(!msg.contains("not-the-password"), "{what}: the password is never shown: {msg}");
        assert!(took < Duration::from_secs(20), "{what} failed after {took:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_certificate_fails_the_consumer_the_relay_and_the_processor_within_seconds_and_says_certificate(
) -> Result<()> {
    kit::init_tracing();
    let password = std::env::var("ONCELY_KAFKA_SECURE_PASSWORD")?;
    let untrusted = std::env::var("ONCELY_KAFKA_UNTRUSTED_CA")?;
    for (what, msg, took) in each_start_fails(kit::secure_connection_with(&password, &untrusted)?).await? {
        assert!(msg.contains("certificate"), "{what}: {msg}");
        assert!(took < Duration::from_secs(20), "{what} failed after {took:?}");
    }
    Ok(())
}
