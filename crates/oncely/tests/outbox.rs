//! The transactional outbox and its relay against the real broker and
//! database: atomicity with the caller's writes, per-key order with several
//! relays, rows committed out of id order, the handler's `cx.publish`,
//! retention and status.

mod outbox_support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use oncely::envelope::{H_CONTENT_TYPE, H_SOURCE, H_SPECVERSION, H_TRACEPARENT, H_TYPE};
use oncely::outbox::{self, OutgoingEvent};
use oncely::{Cx, Event, HandlerError, Publisher};
use oncely_testkit::{self as kit, app::SeqEvent};
use outbox_support::{read_to_end, relay, start, wait_drained, WAIT};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn order_row_and_event_commit_together_and_a_rollback_publishes_nothing() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    sqlx::query("CREATE TABLE orders (id text PRIMARY KEY, total_cents bigint NOT NULL)").execute(&db.pool).await?;
    let topic = kit::unique("outbox-orders");
    kit::create_topic(&topic, 3).await?;
    let r = start(relay(&db.pool, &kit::unique("relay")))?;

    // Rolled back first: its row takes the lower id, so a relay that
    // published it would publish it before the committed one.
    let mut tx = db.pool.begin().await?;
    sqlx::query("INSERT INTO orders VALUES ('o-rolled-back', 100)").execute(&mut *tx).await?;
    let lost =
        outbox::enqueue(&mut tx, &topic, "o-rolled-back", ("com.example.order.created", &json!({"id": "o-0"}))).await?;
    tx.rollback().await?;

    let mut tx = db.pool.begin().await?;
    sqlx::query("INSERT INTO orders VALUES ('o-1', 4200)").execute(&mut *tx).await?;
    let ev = OutgoingEvent::json("com.example.order.created", &json!({"id": "o-1", "total_cents": 4200}))?
        .source("/tests/orders")
        .subject("o-1");
    let sent = outbox::enqueue(&mut tx, &topic, "o-1", &ev).await?;
    tx.commit().await?;
    assert!(lost.id < sent.id);

    wait_drained(&db.pool, 1).await?;
    let created_ms: i64 = sqlx::query_scalar(
        "SELECT floor(extract(epoch FROM created_at) * 1000)::bigint FROM oncely.outbox WHERE id = $1",
    )
    .bind(sent.id)
    .fetch_one(&db.pool)
    .await?;
    r.stop().await?;

    let recs = read_to_end(&topic, 3)?;
    assert_eq!(recs.len(), 1, "only the committed event is published: {recs:?}");
    let rec = &recs[0];
    assert_eq!(rec.key_str(), "o-1");
    assert_eq!(rec.ce_id(), sent.ce_id);
    assert_ne!(rec.ce_id(), lost.ce_id);
    assert_eq!(rec.header(H_SPECVERSION), Some(&b"1.0"[..]));
    assert_eq!(rec.header(H_SOURCE), Some(&b"/tests/orders"[..]));
    assert_eq!(rec.header(H_TYPE), Some(&b"com.example.order.created"[..]));
    assert_eq!(rec.header("ce_subject"), Some(&b"o-1"[..]));
    assert_eq!(rec.header(H_CONTENT_TYPE), Some(&b"application/json"[..]));
    assert_eq!(rec.json()?, json!({"id": "o-1", "total_cents": 4200}));
    assert_eq!(rec.timestamp_ms, Some(created_ms), "the record timestamp is the row's created_at");
    assert_eq!(uuid::Uuid::parse_str(&sent.ce_id)?.get_version_num(), 7);
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM orders").await?, 1);
    Ok(())
}

/// Per key, the payload's `seq` in the order the key's records first appear
/// on the topic (a later copy of a record is a duplicate, dropped by
/// consumers).
fn first_seen_order(recs: &[outbox_support::Rec]) -> Result<HashMap<String, Vec<i64>>> {
    let mut seen = HashSet::new();
    let mut order: HashMap<String, Vec<i64>> = HashMap::new();
    for r in recs {
        if seen.insert(r.ce_id()) {
            let seq = r.json()?["seq"].as_i64().context("seq")?;
            order.entry(r.key_str()).or_default().push(seq);
        }
    }
    Ok(order)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_relays_publish_every_key_in_commit_order() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let topic = kit::unique("outbox-seq");
    kit::create_topic(&topic, 4).await?;
    let (name_a, name_b) = (kit::unique("relay-a"), kit::unique("relay-b"));
    let a = start(relay(&db.pool, &name_a).batch_size(50))?;
    let b = start(relay(&db.pool, &name_b).batch_size(50))?;
    kit::wait_until(WAIT, "two relays sharing the lanes", || async {
        let s = outbox::status(&db.pool).await?;
        let owners: HashSet<i32> = s.lanes.iter().filter_map(|l| l.owner.as_ref().map(|o| o.pid)).collect();
        Ok(s.relays == 2 && owners.len() == 2 && s.lanes.iter().all(|l| l.owner.is_some()))
    })
    .await?;

    // Each key is written by one task, transaction after transaction (every
    // third transaction enqueues two events): its commit order is its seq.
    const KEYS: usize = 32;
    const PER_KEY: i64 = 150;
    let writers: Vec<_> = (0..KEYS)
        .map(|k| {
            let (pool, topic) = (db.pool.clone(), topic.clone());
            tokio::spawn(async move {
                let key = format!("key-{k}");
                let mut seq = 1;
                while seq <= PER_KEY {
                    let mut tx = pool.begin().await?;
                    let n = if seq % 3 == 0 && seq < PER_KEY { 2 } else { 1 };
                    for s in seq..seq + n {
                        outbox::enqueue(&mut tx, &topic, &key, ("test.seq", &SeqEvent { key: key.clone(), seq: s }))
                            .await?;
                    }
                    tx.commit().await?;
                    seq += n;
                }
                anyhow::Ok(())
            })
        })
        .collect();

    // Relay A stops part-way: B takes its lanes over; then a new relay
    // joins and takes half of them back.
    let total = (KEYS as i64) * PER_KEY;
    kit::wait_until(WAIT, "a third of the events published", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM oncely.outbox WHERE published_at IS NOT NULL").await?
            >= total / 3)
    })
    .await?;
    a.stop().await?;
    kit::wait_until(WAIT, "relay B to own every lane", || async {
        let s = outbox::status(&db.pool).await?;
        let owners: HashSet<i32> = s.lanes.iter().filter_map(|l| l.owner.as_ref().map(|o| o.pid)).collect();
        Ok(owners.len() == 1 && s.lanes.iter().all(|l| l.owner.is_some()))
    })
    .await?;
    kit::wait_until(WAIT, "two thirds of the events published", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM oncely.outbox WHERE published_at IS NOT NULL").await?
            >= 2 * total / 3)
    })
    .await?;
    let name_c = kit::unique("relay-c");
    let c = start(relay(&db.pool, &name_c).batch_size(50))?;
    for w in writers {
        w.await??;
    }
    wait_drained(&db.pool, total).await?;
    b.stop().await?;
    c.stop().await?;

    assert!(outbox::events::published_by(&name_a) > 0, "relay A published");
    assert!(outbox::events::published_by(&name_b) > 0, "relay B published");
    let recs = read_to_end(&topic, 4)?;
    let order = first_seen_order(&recs)?;
    assert_eq!(order.len(), KEYS);
    let expected: Vec<i64> = (1..=PER_KEY).collect();
    for (key, seqs) in &order {
        assert_eq!(seqs, &expected, "key {key}: first copies on the topic out of commit order");
    }
    let distinct: HashSet<String> = recs.iter().map(|r| r.ce_id()).collect();
    assert_eq!(distinct.len() as i64, total);
    tracing::info!(records = recs.len(), duplicates = recs.len() - distinct.len(), "two relays done");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_committed_out_of_id_order_are_never_skipped() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let topic = kit::unique("outbox-late");
    kit::create_topic(&topic, 3).await?;
    let r = start(relay(&db.pool, &kit::unique("relay")).batch_size(20))?;

    // Long transactions take low ids and stay open...
    let mut long = Vec::new();
    for i in 0..5 {
        let mut tx = db.pool.begin().await?;
        let key = format!("long-{i}");
        let e = outbox::enqueue(&mut tx, &topic, &key, ("test.seq", &SeqEvent { key: key.clone(), seq: 1 })).await?;
        long.push((tx, key, e));
    }
    // ...while short ones with higher ids commit and are published.
    let mut short_ids = Vec::new();
    for j in 0..100 {
        let mut tx = db.pool.begin().await?;
        let key = format!("short-{}", j % 10);
        let e = outbox::enqueue(&mut tx, &topic, &key, ("test.seq", &SeqEvent { key: key.clone(), seq: j })).await?;
        tx.commit().await?;
        short_ids.push(e.id);
    }
    wait_drained(&db.pool, 100).await?;
    let max_long = long.iter().map(|(_, _, e)| e.id).max().context("long")?;
    assert!(max_long < short_ids[0], "the long transactions hold lower ids than everything published so far");

    // Now the low ids commit, in reverse order, with short transactions in
    // between; and after each commit the same key enqueues again, which must
    // come after it on the topic.
    while let Some((tx, key, _)) = long.pop() {
        tx.commit().await?;
        let mut tx = db.pool.begin().await?;
        outbox::enqueue(&mut tx, &topic, &key, ("test.seq", &SeqEvent { key: key.clone(), seq: 2 })).await?;
        outbox::enqueue(&mut tx, &topic, "short-0", ("test.seq", &SeqEvent { key: "short-0".into(), seq: 1000 }))
            .await?;
        tx.commit().await?;
    }

    // And concurrent writers whose transactions stay open for different
    // times, so that commits keep arriving out of id order.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (pool, topic) = (db.pool.clone(), topic.clone());
            tokio::spawn(async move {
                for i in 0..25u64 {
                    let mut tx = pool.begin().await?;
                    let key = format!("mixed-{w}-{i}");
                    outbox::enqueue(&mut tx, &topic, &key, ("test.seq", &SeqEvent { key: key.clone(), seq: 1 }))
                        .await?;
                    // The workload itself: some transactions hold their id a while.
                    tokio::time::sleep(Duration::from_millis((w as u64 * 7 + i * 13) % 40)).await;
                    tx.commit().await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for w in writers {
        w.await??;
    }
    let total = 100 + 5 * 3 + 8 * 25;
    wait_drained(&db.pool, total).await?;
    r.stop().await?;

    let rows = outbox_support::outbox_ce_ids(&db.pool).await?;
    let recs = read_to_end(&topic, 3)?;
    let on_topic: HashSet<String> = recs.iter().map(|r| r.ce_id()).collect();
    let missing: Vec<_> = rows.iter().filter(|(_, c)| !on_topic.contains(c)).collect();
    assert!(missing.is_empty(), "rows never published: {missing:?}");
    let order = first_seen_order(&recs)?;
    for i in 0..5 {
        assert_eq!(order[&format!("long-{i}")], vec![1, 2], "a late row comes before what its key enqueued after it");
    }
    Ok(())
}

/// The output topic, given to the handler as consumer state.
struct Forward {
    out: String,
    failed_once: AtomicBool,
}

async fn forward(ev: Event<SeqEvent>, cx: &mut Cx, f: oncely::State<Forward>) -> Result<(), HandlerError> {
    cx.publish(&f.out, &ev.key(), "test.forwarded", &ev.data).await?;
    // The first event of key k0 fails after publishing: the savepoint rolls
    // its outbox row back with the rest, and the retry publishes once.
    if ev.data.key == "k0" && !f.failed_once.swap(true, Ordering::SeqCst) {
        return Err(HandlerError::retry("first attempt fails"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_publishes_through_the_outbox_in_its_transaction() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let (input, out, group) = (kit::unique("outbox-in"), kit::unique("outbox-out"), kit::unique("fwd"));
    kit::create_topic(&input, 2).await?;
    kit::create_topic(&out, 2).await?;
    let publisher = Publisher::new(kit::bootstrap(), "/tests/fwd")?;
    for k in 0..4 {
        for seq in 1..=5 {
            let key = format!("k{k}");
            publisher.publish(&input, &key, "test.seq", &SeqEvent { key: key.clone(), seq }).await?;
        }
    }
    let token = CancellationToken::new();
    let consumer = tokio::spawn(
        oncely::Consumer::builder(group.clone())
            .bootstrap_servers(kit::bootstrap())
            .pool(db.pool.clone())
            .topic(input.clone())
            .state(Forward { out: out.clone(), failed_once: AtomicBool::new(false) })
            .handler(forward)
            .retry_backoff(Duration::from_millis(50), Duration::from_millis(200))
            .handle_sigterm(false)
            .force_inbox_retention(true)
            .run(token.clone()),
    );
    let r = start(relay(&db.pool, &kit::unique("relay")))?;
    wait_drained(&db.pool, 20).await?;
    token.cancel();
    tokio::time::timeout(Duration::from_secs(60), consumer).await.context("consumer did not stop")???;
    r.stop().await?;

    let recs = read_to_end(&out, 2)?;
    assert_eq!(recs.len(), 20, "one event per input event, none from the failed attempt");
    let expected_source = format!("/oncely/{group}");
    assert!(recs.iter().all(|r| r.header(H_SOURCE) == Some(expected_source.as_bytes())));
    let order = first_seen_order(&recs)?;
    for k in 0..4 {
        assert_eq!(order[&format!("k{k}")], vec![1, 2, 3, 4, 5]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_removes_only_old_published_rows_and_status_shows_the_backlog() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let topic = kit::unique("outbox-ret");
    kit::create_topic(&topic, 1).await?;
    let mut tx = db.pool.begin().await?;
    for i in 0..30 {
        outbox::enqueue(&mut tx, &topic, &format!("k{i}"), ("test.seq", &json!({"seq": i}))).await?;
    }
    let raw = outbox::enqueue_raw(
        &mut tx,
        &topic,
        None,
        Some(b"raw"),
        &[("ce_id", b"raw-1".to_vec()), (H_TRACEPARENT, b"00-aa-bb-01".to_vec())],
    )
    .await?;
    tx.commit().await?;

    let s = outbox::status(&db.pool).await?;
    assert_eq!(s.pending, 31);
    assert!(s.oldest_pending_age.is_some());
    assert_eq!(s.lanes.len(), outbox::LANES as usize);
    assert_eq!(s.lanes.iter().map(|l| l.pending).sum::<i64>(), 31);
    assert!(s.lanes.iter().all(|l| l.owner.is_none()), "no relay yet");

    // Pretend half of them were published long ago, the rest just now.
    let old =
        sqlx::query("UPDATE oncely.outbox SET published_at = now() - interval '2 days' WHERE id % 2 = 0 AND id <> $1")
            .bind(raw)
            .execute(&db.pool)
            .await?
            .rows_affected() as i64;
    assert!(old > 10);
    let name = kit::unique("relay");
    let r = start(
        relay(&db.pool, &name)
            .retention(Some(Duration::from_secs(24 * 3600)))
            .retention_interval(Duration::from_millis(100))
            .retention_batch(4),
    )?;
    kit::wait_until(WAIT, "retention and publishing", || async {
        let left = kit::count(&db.pool, "SELECT count(*) FROM oncely.outbox").await?;
        let pending = kit::count(&db.pool, "SELECT count(*) FROM oncely.outbox WHERE published_at IS NULL").await?;
        let recent =
            kit::count(&db.pool, "SELECT count(*) FROM oncely.outbox WHERE published_at > now() - interval '1 hour'")
                .await?;
        Ok(pending == 0 && left == recent)
    })
    .await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM oncely.outbox").await?, 31 - old);
    let s = outbox::status(&db.pool).await?;
    assert_eq!(s.pending, 0);
    assert_eq!(s.relays, 1);
    assert!(s
        .lanes
        .iter()
        .all(|l| l.owner.as_ref().and_then(|o| o.name.clone()) == Some(format!("oncely-relay {name}"))));
    assert!(s.published_last_minute > 0 && s.publish_rate_per_s > 0.0);
    r.stop().await?;

    let recs = read_to_end(&topic, 1)?;
    let raw_rec = recs.iter().find(|r| r.ce_id() == "raw-1").context("the raw record is published")?;
    assert_eq!(raw_rec.payload.as_deref(), Some(&b"raw"[..]));
    assert_eq!(raw_rec.key, None);
    assert_eq!(raw_rec.header(H_TRACEPARENT), Some(&b"00-aa-bb-01"[..]));
    Ok(())
}

/// Outbox rows with `published_at`, `failed_at` and `discarded_at` counts.
async fn counts(pool: &sqlx::PgPool) -> Result<(i64, i64, i64)> {
    let (p, f, d): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE published_at IS NOT NULL),
                count(*) FILTER (WHERE failed_at IS NOT NULL AND discarded_at IS NULL),
                count(*) FILTER (WHERE discarded_at IS NOT NULL)
           FROM oncely.outbox",
    )
    .fetch_one(pool)
    .await?;
    Ok((p, f, d))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_over_the_topics_size_limit_is_set_aside_and_the_other_keys_flow_without_backoff() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let topic = kit::unique("outbox-poison");
    kit::create_topic_with(&topic, 3, &[("max.message.bytes", "20000")]).await?;

    // 400 rows of 40 keys; in the middle a row five times over the topic's
    // limit (a dead-letter copy of a big record, say), with two more rows of
    // its key behind it, one right after it and one at the very end.
    const NORMAL: i64 = 400;
    let seq = |key: &str, seq: i64| ("test.seq", SeqEvent { key: key.to_owned(), seq });
    let mut tx = db.pool.begin().await?;
    for i in 0..NORMAL / 2 {
        let key = format!("k{}", i % 40);
        let (t, ev) = seq(&key, i / 40 + 1);
        outbox::enqueue(&mut tx, &topic, &key, (t, &ev)).await?;
    }
    let big = OutgoingEvent::json("test.seq", &json!({"key": "big", "seq": 1, "pad": "x".repeat(100_000)}))?;
    let poison = outbox::enqueue(&mut tx, &topic, "big", &big).await?;
    let (t, ev) = seq("big", 2);
    outbox::enqueue(&mut tx, &topic, "big", (t, &ev)).await?;
    for i in NORMAL / 2..NORMAL {
        let key = format!("k{}", i % 40);
        let (t, ev) = seq(&key, i / 40 + 1);
        outbox::enqueue(&mut tx, &topic, &key, (t, &ev)).await?;
    }
    let (t, ev) = seq("big", 3);
    outbox::enqueue(&mut tx, &topic, "big", (t, &ev)).await?;
    tx.commit().await?;

    // Small batches: without setting the row aside every one of them would
    // contain it again and wait out a backoff.
    let name = kit::unique("relay");
    let r = start(relay(&db.pool, &name).batch_size(50))?;
    kit::wait_until(WAIT, "every other row published and the big one set aside", || async {
        let (published, failed, _) = counts(&db.pool).await?;
        Ok(published >= NORMAL && failed >= 1)
    })
    .await?;
    let big_published = kit::count(
        &db.pool,
        "SELECT count(*) FROM oncely.outbox WHERE key = 'big'::bytea AND published_at IS NOT NULL",
    )
    .await?;
    assert_eq!(big_published, 0, "a row of the key behind the one set aside was published: it overtook it");
    assert_eq!(outbox::events::retry_waits_of(&name), 0, "no backoff: nothing failed transiently");
    assert_eq!(outbox::events::set_aside_by(&name), 1);

    let s = outbox::status(&db.pool).await?;
    assert_eq!((s.failed, s.held, s.pending), (1, 2, 2), "the two later rows of its key wait behind it");
    let failed = outbox::failed::list(&db.pool, false, 10).await?;
    assert_eq!(failed.len(), 1);
    let f = &failed[0];
    assert_eq!((f.id, f.key.as_deref(), f.held), (poison.id, Some("big"), 2));
    let reason = f.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("Message size too large") && reason.contains("max.message.bytes"), "{reason}");
    assert!(s.lanes.iter().any(|l| l.failed == 1 && l.last_error.as_deref() == Some(reason)));

    // The operator raises the topic's limit and sends the row back: it is
    // published first of its key, then the rows held behind it.
    kit::alter_topic_config(&topic, &[("max.message.bytes", "200000")]).await?;
    assert_eq!(outbox::failed::retry(&db.pool, Some(&[poison.id])).await?, vec![poison.id]);
    wait_drained(&db.pool, NORMAL + 3).await?;
    r.stop().await?;

    let recs = read_to_end(&topic, 3)?;
    let order = first_seen_order(&recs)?;
    assert_eq!(order["big"], vec![1, 2, 3], "the held rows came after the big one");
    for k in 0..40 {
        assert_eq!(order[&format!("k{k}")], (1..=10).collect::<Vec<_>>(), "key k{k}");
    }
    let big_rec = recs.iter().find(|r| r.ce_id() == poison.ce_id).context("the big row on the topic")?;
    assert!(big_rec.payload.as_ref().is_some_and(|p| p.len() > 100_000));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_for_a_missing_topic_are_set_aside_then_published_once_it_exists() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let (present, missing) = (kit::unique("outbox-present"), kit::unique("outbox-missing"));
    kit::create_topic(&present, 2).await?;
    let mut tx = db.pool.begin().await?;
    let mut ids = Vec::new();
    for (i, key) in ["m1", "m2", "m1"].iter().enumerate() {
        let e = outbox::enqueue(&mut tx, &missing, key, ("test.seq", &SeqEvent { key: (*key).into(), seq: i as i64 }))
            .await?;
        ids.push(e.id);
    }
    for i in 0..50 {
        outbox::enqueue(&mut tx, &present, &format!("p{i}"), ("test.seq", &SeqEvent { key: format!("p{i}"), seq: 1 }))
            .await?;
    }
    tx.commit().await?;

    // librdkafka fails records of a topic it cannot find after
    // topic.metadata.propagation.max.ms (30 s by default; 1 s here).
    let name = kit::unique("relay");
    let r = start(relay(&db.pool, &name).producer_config("topic.metadata.propagation.max.ms", "1000"))?;
    kit::wait_until(WAIT, "the present topic's rows published, the missing topic's set aside", || async {
        let (published, failed, _) = counts(&db.pool).await?;
        Ok(published == 50 && failed >= 2)
    })
    .await?;
    let failed = outbox::failed::list(&db.pool, false, 10).await?;
    assert_eq!(failed.iter().map(|f| f.id).collect::<Vec<_>>(), vec![ids[0], ids[1]], "m1's second row is held");
    for f in &failed {
        let reason = f.reason.as_deref().unwrap_or_default();
        assert!(reason.contains(&format!("topic `{missing}` does not exist")), "{reason}");
    }
    assert_eq!(failed[0].held, 1);

    // The topic is created (the relay's producer still believes it missing)
    // and the rows are sent back.
    kit::create_topic(&missing, 1).await?;
    assert_eq!(outbox::failed::retry(&db.pool, None).await?.len(), 2);
    wait_drained(&db.pool, 53).await?;
    r.stop().await?;
    let recs = read_to_end(&missing, 1)?;
    let order: Vec<(String, i64)> =
        recs.iter().map(|r| Ok((r.key_str(), r.json()?["seq"].as_i64().context("seq")?))).collect::<Result<_>>()?;
    assert_eq!(order.iter().filter(|(k, _)| k == "m1").map(|(_, s)| *s).collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!(order.len(), 3);
    Ok(())
}

type Header = (Vec<u8>, Option<Vec<u8>>);
/// Key, payload and headers of a raw outbox row.
type RawRow = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<Header>);

#[tokio::test(flavor = "multi_thread")]
async fn keys_payloads_and_headers_are_published_byte_for_byte() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let topic = kit::unique("outbox-bytes");
    kit::create_topic(&topic, 1).await?;
    let h = |k: &[u8], v: Option<&[u8]>| -> Header { (k.to_vec(), v.map(<[u8]>::to_vec)) };
    // (key, payload, headers): bytes that are not UTF-8, NUL everywhere,
    // null and empty told apart, a nameless header, repeated names in order.
    let rows: Vec<RawRow> = vec![
        (
            Some(b"k\0ey\xff".to_vec()),
            Some(b"pay\0load\xfe\x00".to_vec()),
            vec![
                h(b"ce_id", Some(b"bytes-1")),
                h(b"\xff\xfe-not-utf8", Some(b"v\0al")),
                h(b"nul\0inside", Some(b"x")),
                h(b"\0", Some(b"\0")),
                h(b"", Some(b"nameless")),
                h(b"null-value", None),
                h(b"empty-value", Some(b"")),
            ],
        ),
        (None, None, vec![]),
        (Some(Vec::new()), Some(Vec::new()), vec![h(b"dup", Some(b"1")), h(b"dup", Some(b"2"))]),
        (Some(b"k".to_vec()), Some(vec![0u8; 1000]), vec![h(&[0u8; 300], Some(&[0xffu8; 300]))]),
    ];
    let mut tx = db.pool.begin().await?;
    for (key, payload, headers) in &rows {
        outbox::enqueue_raw(&mut tx, &topic, key.as_deref(), payload.as_deref(), headers).await?;
    }
    tx.commit().await?;
    let r = start(relay(&db.pool, &kit::unique("relay")))?;
    wait_drained(&db.pool, rows.len() as i64).await?;
    r.stop().await?;

    let bootstrap = kit::bootstrap();
    let t = topic.clone();
    let recs = tokio::task::spawn_blocking(move || kit::wire::fetch_all(&bootstrap, &t, 0)).await??;
    assert_eq!(recs.len(), rows.len());
    for (got, (key, payload, headers)) in recs.iter().zip(&rows) {
        assert_eq!(&got.key, key, "key at offset {}", got.offset);
        assert_eq!(&got.value, payload, "payload at offset {}", got.offset);
        assert_eq!(&got.headers, headers, "headers at offset {}", got.offset);
    }
    let ce_id: Option<String> =
        sqlx::query_scalar("SELECT ce_id FROM oncely.outbox ORDER BY id LIMIT 1").fetch_one(&db.pool).await?;
    assert_eq!(ce_id.as_deref(), Some("bytes-1"));
    Ok(())
}
