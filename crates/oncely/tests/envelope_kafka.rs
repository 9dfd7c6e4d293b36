//! The producer helper against the real broker: identities survive the trip.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use oncely::envelope::{CloudEventAttrs, IdentitySource, RawRecord};
use oncely::Publisher;
use oncely_testkit as kit;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
struct OrderCreated {
    order_id: String,
    total_cents: i64,
}

fn read_back(topic: &str, partitions: i32, n: usize) -> anyhow::Result<Vec<RawRecord>> {
    let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(kit::bootstrap())
        .client_config()?
        .set("group.id", kit::unique("readback"))
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < n {
        anyhow::ensure!(Instant::now() < deadline, "read {} of {n} records", out.len());
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            out.push(RawRecord::from_message(&m?));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn published_events_keep_their_identity_and_key() -> anyhow::Result<()> {
    kit::init_tracing();
    let topic = kit::unique("orders");
    kit::create_topic(&topic, 3).await?;
    let publisher = Publisher::new(kit::bootstrap(), "/tests/order-service")?;

    let mut sent = HashMap::new();
    for i in 0..30 {
        let key = format!("order-{}", i % 7);
        let ev = OrderCreated { order_id: key.clone(), total_cents: i };
        let p = publisher.publish(&topic, &key, "com.example.order.created", &ev).await?;
        sent.insert(p.event_id.clone(), (key, ev, p.partition, p.offset));
    }
    // Re-publish one event as a producer retry would: same ce_id, new record.
    let (first_id, (k, ev, _, _)) = sent.iter().next().map(|(a, b)| (a.clone(), b.clone())).expect("sent");
    let ce_id = first_id.display().rsplit('#').next().expect("ce_id").to_owned();
    let attrs =
        CloudEventAttrs { id: ce_id, ..CloudEventAttrs::new_now("/tests/order-service", "com.example.order.created") };
    publisher.publish_attrs(&topic, &k, &attrs, &ev).await?;

    let records = read_back(&topic, 3, 31)?;
    let mut seen: HashMap<_, usize> = HashMap::new();
    let mut partition_of_key: HashMap<String, i32> = HashMap::new();
    for r in &records {
        let id = IdentitySource::CloudEvents.extract(r)?;
        let (key, ev, _, _) = sent.get(&id).ok_or_else(|| anyhow::anyhow!("unknown identity {id}"))?;
        assert_eq!(&r.key_str(), key, "the entity key is the Kafka key");
        let decoded = oncely::envelope::decode_event::<OrderCreated>(id.clone(), std::sync::Arc::new(r.clone()))?;
        assert_eq!(&decoded.data, ev);
        assert_eq!(decoded.attrs.source, "/tests/order-service");
        let v = uuid::Uuid::parse_str(&decoded.attrs.id)?;
        assert_eq!(v.get_version_num(), 7, "ce_id is a UUIDv7");
        // Same key, same partition: the key fixes the order.
        let p = *partition_of_key.entry(key.clone()).or_insert(r.partition);
        assert_eq!(p, r.partition);
        *seen.entry(id).or_default() += 1;
    }
    assert_eq!(seen.len(), 30, "every identity came back");
    assert_eq!(seen.get(&first_id), Some(&2), "the re-published event carries the same identity");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn migrations_apply_once_even_when_run_concurrently() -> anyhow::Result<()> {
    let db = kit::TestDb::new().await?;
    let (a, b) = tokio::join!(oncely::store::migrate(&db.pool), oncely::store::migrate(&db.pool));
    assert!(a?.is_empty() && b?.is_empty(), "already applied by TestDb::new");
    let n = kit::count(&db.pool, "SELECT count(*) FROM oncely.schema_migrations").await?;
    assert_eq!(n as usize, oncely::store::MIGRATIONS.len());
    let days = oncely::store::inbox::days(&db.pool).await?;
    let today = chrono::Utc::now().date_naive();
    assert!(days.contains(&today), "today's inbox partition exists: {days:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn consumers_starting_together_create_inbox_partitions_without_racing() -> anyhow::Result<()> {
    let db = kit::TestDb::new().await?;
    // Four consumers start at once and each ensures partitions ten days ahead.
    let p = &db.pool;
    let before = oncely::store::inbox::days(p).await?;
    let (a, b, c, d) = tokio::join!(
        oncely::store::inbox::ensure_days(p, 10),
        oncely::store::inbox::ensure_days(p, 10),
        oncely::store::inbox::ensure_days(p, 10),
        oncely::store::inbox::ensure_days(p, 10)
    );
    let created = a? + b? + c? + d?;
    let after = oncely::store::inbox::days(p).await?;
    let today = chrono::Utc::now().date_naive();
    assert!(after.contains(&(today + chrono::Days::new(10))), "{after:?}");
    assert!(created > 0);
    assert_eq!(created as usize, after.len() - before.len(), "each day created exactly once between them");
    Ok(())
}
