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
        &[("ce_id".into(), b"raw-1".to_vec()), (H_TRACEPARENT.into(), b"00-aa-bb-01".to_vec())],
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
