//! Hostile input against the real broker and database: bytes that are not
//! UTF-8 in header names, keys and identities, NUL bytes, empty and large
//! values, handlers that misbehave. Nothing crashes, nothing blocks a
//! partition, nothing is lost.

use std::time::Duration;

use anyhow::Result;
use oncely::envelope::{CloudEventAttrs, H_ID};
use oncely::failure::DeadKeyPolicy;
use oncely::Publisher;
use oncely_testkit::run::{self, wait_count, wait_offsets};
use oncely_testkit::{self as kit, app};

/// The CloudEvents headers of a fresh event, as bytes, plus `extra`.
fn headers(extra: &[(&[u8], &[u8])]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut h: Vec<(Vec<u8>, Vec<u8>)> = CloudEventAttrs::new_now("/tests/hostile", "test.seq")
        .to_headers()
        .into_iter()
        .map(|(k, v)| (k.into_bytes(), v))
        .collect();
    h.extend(extra.iter().map(|(k, v)| (k.to_vec(), v.to_vec())));
    h
}

fn payload(key: &str, seq: i64) -> Vec<u8> {
    serde_json::to_vec(&app::SeqEvent { key: key.into(), seq }).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_that_are_not_utf8_nul_bytes_and_odd_sizes_neither_crash_nor_block() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let p = Publisher::new(kit::bootstrap(), "/tests/hostile")?;
    let bad_name: &[u8] = &[0xff, 0xfe, b'x'];
    // 0: a header whose name is not UTF-8 (rdkafka's own iterator panics on it).
    p.publish_raw(&topic, Some(b"k"), Some(&payload("k", 1)), &headers(&[(bad_name, b"v")])).await?;
    // 1: NUL bytes in the event id (PostgreSQL text refuses NUL).
    let mut h = headers(&[]);
    for (k, v) in h.iter_mut() {
        if k.as_slice() == H_ID.as_bytes() {
            v.extend_from_slice(b"\0tail");
        }
    }
    p.publish_raw(&topic, Some(b"k"), Some(&payload("k", 2)), &h).await?;
    // 2: a Kafka key with NUL and bytes that are not UTF-8.
    p.publish_raw(&topic, Some(&[0, 0xff, 0]), Some(&payload("bin", 1)), &headers(&[])).await?;
    // 3: an empty payload, with the odd header (dead-lettered, header kept).
    p.publish_raw(&topic, Some(b"k"), Some(b""), &headers(&[(bad_name, b"\0\xff")])).await?;
    // 4: no payload at all.
    p.publish_raw(&topic, Some(b"k"), None, &headers(&[])).await?;
    // 5: a record larger than a whole batch may be (it is a batch of its own).
    let big = serde_json::to_vec(&serde_json::json!({"key": "k", "seq": 3, "pad": "x".repeat(600_000)}))?;
    p.publish_raw(&topic, Some(b"k"), Some(&big), &headers(&[])).await?;
    // 6: an ordinary event after all of them.
    p.publish(&topic, "k", "test.seq", &app::SeqEvent { key: "k".into(), seq: 4 }).await?;

    let c = run::start(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("h")).max_batch_bytes(256 * 1024),
    );
    wait_offsets(&db.pool, &group, 7).await?;
    assert!(!c.is_finished(), "the consumer is still running");
    c.stop().await?;

    let rows = app::applied(&db.pool).await?;
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.2.clone(), r.3)).collect();
    let want: Vec<(String, i64)> =
        [("k", 1), ("k", 2), ("bin", 1), ("k", 3), ("k", 4)].iter().map(|(k, s)| ((*k).to_owned(), *s)).collect();
    assert_eq!(got, want, "every good event applied, in order");
    // The NUL-bearing identity is stored escaped for people, applied once.
    assert!(rows[1].1.ends_with("\\u{0}tail"), "{}", rows[1].1);
    type DeadRow = (i64, String, Vec<Vec<u8>>, Vec<Option<Vec<u8>>>);
    let dead: Vec<DeadRow> = sqlx::query_as(
        r#"SELECT "offset", reason, header_keys, header_values FROM oncely.dead_letters ORDER BY "offset""#,
    )
    .fetch_all(&db.pool)
    .await?;
    assert_eq!(
        dead.iter().map(|d| (d.0, d.1.as_str())).collect::<Vec<_>>(),
        [(3, "undecodable-payload"), (4, "empty-payload")]
    );
    let i = dead[0].2.iter().position(|k| k.as_slice() == bad_name).expect("the odd header name is kept byte for byte");
    assert_eq!(dead[0].3[i].as_deref(), Some(&b"\0\xff"[..]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_that_differ_only_in_bytes_that_are_not_utf8_are_separate_keys() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let p = Publisher::new(kit::bootstrap(), "/tests/hostile")?;
    // Both keys read as "\u{fffd}" through a lossy conversion to text.
    for seq in 1..=3 {
        p.publish_raw(&topic, Some(&[0xff]), Some(&payload("a", seq)), &headers(&[])).await?;
        p.publish_raw(&topic, Some(&[0xfe]), Some(&payload("b", seq)), &headers(&[])).await?;
    }
    let mut b = app::Behaviour::tagged("k");
    b.fail_times.insert("a".into(), 1000);
    let c = run::start(
        app::consumer(&group, &topic, db.pool.clone(), b)
            .max_attempts(1000)
            .retry_backoff(Duration::from_secs(30), Duration::from_secs(60)),
    );
    // Key [0xff] is parked with its three events; key [0xfe] is not held behind it.
    wait_count(&db.pool, r"SELECT count(*) FROM oncely.parked WHERE entity_key = '\xff'::bytea", 3).await?;
    wait_count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'b'", 3).await?;
    assert_eq!(kit::count(&db.pool, r"SELECT count(*) FROM oncely.parked WHERE entity_key = '\xfe'::bytea").await?, 0);
    c.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_that_swallows_an_sql_error_fails_its_event_not_the_partition() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let published = app::publish_seq(&topic, 3, 3).await?;
    let mut b = app::Behaviour::tagged("s");
    b.swallow_keys.insert("k1".into());
    let c = run::start(
        app::consumer(&group, &topic, db.pool.clone(), b)
            .max_attempts(2)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(20)),
    );
    wait_offsets(&db.pool, &group, published.len() as i64).await?;
    wait_count(&db.pool, "SELECT count(*) FROM oncely.dead_letters", 3).await?;
    c.stop().await?;
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT reason, error FROM oncely.dead_letters ORDER BY id").fetch_all(&db.pool).await?;
    assert!(reasons.iter().all(|(r, e)| r == "max-attempts" && e.contains("aborted")), "{reasons:?}");
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key <> 'k1'").await?, 6);
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k1'").await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn under_the_hold_policy_a_rejected_event_holds_its_key_in_the_batch_path_too() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let published = app::publish_seq(&topic, 3, 3).await?;
    let b = std::sync::Arc::new(app::Behaviour::tagged("r"));
    b.reject_keys.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert("k1".into());
    let c = run::start(
        app::consumer(&group, &topic, db.pool.clone(), b.clone()).max_batch(100).dead_key_policy(DeadKeyPolicy::Hold),
    );
    wait_offsets(&db.pool, &group, published.len() as i64).await?;
    // k1's first event is dead; its other two wait for the operator, in one batch.
    wait_count(&db.pool, "SELECT count(*) FROM oncely.parked WHERE status = 'held'", 2).await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k1'").await?, 0);
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key <> 'k1'").await?, 6);
    // The bug is fixed, the operator releases the key: the rest applies in order.
    b.reject_keys.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clear();
    let released = oncely::failure::release_key(&db.pool, &group, b"k1").await?;
    assert_eq!(released, 3, "the dead marker and two held events");
    wait_count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k1'", 2).await?;
    c.stop().await?;
    let seqs: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM applied WHERE key = 'k1' ORDER BY n").fetch_all(&db.pool).await?;
    assert_eq!(seqs, vec![2, 3]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicates_across_batches_and_partitions_are_caught_by_the_inbox() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let p = Publisher::new(kit::bootstrap(), "/tests/dups")?;
    // Two Kafka keys on different partitions (a keyless producer's retry
    // lands on another partition with the same identity).
    let mut records = 1i64;
    let first = p.publish(&topic, "x", "test.seq", &app::SeqEvent { key: "probe".into(), seq: 1 }).await?;
    let mut other = None;
    for i in 0..100 {
        let k = format!("y{i}");
        records += 1;
        let r = p.publish(&topic, &k, "test.seq", &app::SeqEvent { key: format!("probe{i}"), seq: 1 }).await?;
        if r.partition != first.partition {
            other = Some(k);
            break;
        }
    }
    let other = other.ok_or_else(|| anyhow::anyhow!("no key lands on the other partition"))?;
    let c = run::start(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("d")).max_wait(Duration::from_millis(5)),
    );
    wait_offsets(&db.pool, &group, records).await?;
    let ev = app::SeqEvent { key: "dup".into(), seq: 1 };
    let attrs = CloudEventAttrs::new_now("/tests/dups", "test.seq");
    // The first copy, applied in a batch of its own.
    p.publish_attrs(&topic, "x", &attrs, &ev).await?;
    wait_count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'dup'", 1).await?;
    // A later copy on the same partition, and one on the other partition.
    p.publish_attrs(&topic, "x", &attrs, &ev).await?;
    p.publish_attrs(&topic, &other, &attrs, &ev).await?;
    // Two copies of a new event at once, one per partition: two lanes claim
    // the same identity concurrently.
    let attrs2 = CloudEventAttrs::new_now("/tests/dups", "test.seq");
    let ev2 = app::SeqEvent { key: "dup2".into(), seq: 1 };
    let (a, b) =
        tokio::join!(p.publish_attrs(&topic, "x", &attrs2, &ev2), p.publish_attrs(&topic, &other, &attrs2, &ev2));
    a?;
    b?;
    records += 5;
    wait_offsets(&db.pool, &group, records).await?;
    c.stop().await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'dup'").await?, 1);
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'dup2'").await?, 1);
    assert_eq!(oncely::consumer::events::events_counted(&group, &topic, "duplicate"), 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_effect_that_is_not_registered_stops_the_consumer_instead_of_dead_lettering_every_event() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    app::publish_seq(&topic, 3, 3).await?;
    // The handler records `charge-card`, which this consumer never registered.
    let mut b = app::Behaviour::tagged("e");
    b.charge = true;
    let run = app::consumer(&group, &topic, db.pool.clone(), b).run(tokio_util::sync::CancellationToken::new());
    let err = tokio::time::timeout(run::WAIT, run).await?.expect_err("the consumer stops");
    assert!(matches!(err, oncely::Error::Config(_)), "{err}");
    assert!(err.to_string().contains("charge-card"), "{err}");
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied").await?, 0, "nothing committed");
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM oncely.dead_letters").await?, 0, "nothing dead-lettered");
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM oncely.parked").await?, 0, "nothing parked");
    Ok(())
}

/// Stores each raw payload as it came.
async fn keep_raw(
    ev: oncely::Event<oncely::envelope::RawPayload>,
    cx: &mut oncely::Cx,
) -> Result<(), oncely::HandlerError> {
    sqlx::query("INSERT INTO raw_seen (off, data) VALUES ($1, $2)")
        .bind(ev.offset())
        .bind(&ev.data.0)
        .execute(cx.db())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_raw_payload_handler_gets_any_bytes_as_they_are() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    sqlx::query("CREATE TABLE raw_seen (off bigint PRIMARY KEY, data bytea NOT NULL)").execute(&db.pool).await?;
    let (topic, group) = (kit::unique("raw"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let p = Publisher::new(kit::bootstrap(), "/tests/hostile")?;
    let sent: [Option<&[u8]>; 3] = [Some(b"\xff\x00not json"), Some(b""), None];
    for body in sent {
        p.publish_raw(&topic, Some(b"k"), body, &headers(&[])).await?;
    }
    let c = run::start(
        oncely::Consumer::builder(group.clone())
            .bootstrap_servers(kit::bootstrap())
            .pool(db.pool.clone())
            .topic(topic.clone())
            .handler(keep_raw)
            .handle_sigterm(false)
            .force_inbox_retention(true),
    );
    wait_offsets(&db.pool, &group, 3).await?;
    c.stop().await?;
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT off, data FROM raw_seen ORDER BY off").fetch_all(&db.pool).await?;
    assert_eq!(
        rows,
        [(0, b"\xff\x00not json".to_vec()), (1, vec![]), (2, vec![])],
        "no dead letter: raw takes anything"
    );
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM oncely.dead_letters").await?, 0);
    Ok(())
}

/// Fails key `r` (retry) and key `x` (reject) with messages holding NUL;
/// records every other event.
async fn fail_with_nul(ev: oncely::Event<app::SeqEvent>, cx: &mut oncely::Cx) -> Result<(), oncely::HandlerError> {
    match ev.data.key.as_str() {
        "r" => Err(oncely::HandlerError::retry(format!("transient\0{}", ev.data.seq))),
        "x" => Err(oncely::HandlerError::reject("rejected\0here")),
        _ => {
            sqlx::query("INSERT INTO seen (off) VALUES ($1)").bind(ev.offset()).execute(cx.db()).await?;
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nul_bytes_on_the_failure_path_neither_block_the_partition_nor_get_lost() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    sqlx::query("CREATE TABLE seen (off bigint PRIMARY KEY)").execute(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let p = Publisher::new(kit::bootstrap(), "/tests/hostile")?;
    // 0: NUL in ce_id and a payload that is not JSON: dead-lettered, and its
    //    dead-letter copy goes through the outbox with that ce_id header.
    let mut h = headers(&[]);
    for (k, v) in h.iter_mut() {
        if k.as_slice() == H_ID.as_bytes() {
            v.extend_from_slice(b"\0tail");
        }
    }
    p.publish_raw(&topic, Some(b"n"), Some(b"\xff not json"), &h).await?;
    // 1: rejected with a message holding NUL; 2: retried with one, parked, then dead.
    p.publish_raw(&topic, Some(b"x"), Some(&payload("x", 1)), &headers(&[])).await?;
    p.publish_raw(&topic, Some(b"r"), Some(&payload("r", 1)), &headers(&[])).await?;
    // 3: an ordinary event behind them.
    p.publish_raw(&topic, Some(b"k"), Some(&payload("k", 1)), &headers(&[])).await?;
    let c = run::start(
        oncely::Consumer::builder(group.clone())
            .bootstrap_servers(kit::bootstrap())
            .pool(db.pool.clone())
            .topic(topic.clone())
            .handler(fail_with_nul)
            .max_attempts(2)
            .retry_backoff(Duration::from_millis(50), Duration::from_millis(100))
            .handle_sigterm(false)
            .force_inbox_retention(true),
    );
    wait_count(&db.pool, "SELECT count(*) FROM oncely.dead_letters", 3).await?;
    wait_offsets(&db.pool, &group, 4).await?;
    wait_count(&db.pool, "SELECT count(*) FROM oncely.parked", 0).await?;
    c.stop().await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM seen WHERE off = 3").await?, 1, "the event behind them");
    let dead: Vec<(i64, String, String)> =
        sqlx::query_as(r#"SELECT "offset", reason, error FROM oncely.dead_letters ORDER BY "offset""#)
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(dead.iter().map(|d| (d.0, d.1.as_str())).collect::<Vec<_>>()[0], (0, "undecodable-payload"));
    assert_eq!(dead[1].0, 1);
    assert!(dead[1].2.contains(r"rejected\0here"), "NUL shown escaped: {}", dead[1].2);
    assert_eq!(dead[2].0, 2);
    assert!(dead[2].2.contains(r"transient\0"), "{}", dead[2].2);
    // The dead-letter copies are in the outbox, the NUL-bearing ce_id kept in
    // the headers (bytes) but not as the row's text ce_id.
    type OutboxCopy = (Option<String>, Vec<Vec<u8>>, Vec<Option<Vec<u8>>>);
    let copies: Vec<OutboxCopy> =
        sqlx::query_as("SELECT ce_id, header_keys, header_values FROM oncely.outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(copies.len(), 3);
    assert_eq!(copies[0].0, None);
    let i = copies[0].1.iter().position(|k| k.as_slice() == H_ID.as_bytes()).expect("ce_id header");
    assert!(copies[0].2[i].as_deref().is_some_and(|v| v.ends_with(b"\0tail")));
    Ok(())
}
