//! The failure path against the real broker and database: per-key parking,
//! retries, restarts and partition moves.

use std::time::Duration;

use anyhow::{Context, Result};
use oncely_testkit::process::TestConsumer;
use oncely_testkit::{self as kit, app};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

async fn parked_count(db: &kit::TestDb) -> Result<i64> {
    kit::count(&db.pool, "SELECT count(*) FROM oncely.parked").await
}

async fn wait_drained(db: &kit::TestDb, group: &str, total: i64) -> Result<()> {
    let sql = format!("SELECT coalesce(sum(next_offset), 0)::bigint FROM oncely.offsets WHERE consumer = '{group}'");
    kit::wait_until(WAIT, "offsets to reach the end and every parked key to drain", || async {
        Ok(kit::count(&db.pool, &sql).await? >= total && parked_count(db).await? == 0)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_key_waits_in_order_while_other_keys_go_on() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let published = app::publish_seq(&topic, 5, 5).await?;
    let mut b = app::Behaviour::tagged("t");
    b.fail_times.insert("k1".into(), 2);
    let token = CancellationToken::new();
    let c = tokio::spawn(
        app::consumer(&group, &topic, db.pool.clone(), b)
            .retry_backoff(Duration::from_millis(300), Duration::from_millis(600))
            .run(token.clone()),
    );
    // While k1 is parked, its later events wait behind it.
    kit::wait_until(WAIT, "k1 to be parked with its queue", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM oncely.parked WHERE entity_key = 'k1'").await? == 5)
    })
    .await?;
    wait_drained(&db, &group, published.len() as i64).await?;
    token.cancel();
    c.await??;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    // Every other key was applied before k1's first event: they did not wait.
    let (others_last, k1_first): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) = sqlx::query_as(
        "SELECT (SELECT max(applied_at) FROM applied WHERE key <> 'k1'), (SELECT min(applied_at) FROM applied WHERE key = 'k1')",
    )
    .fetch_one(&db.pool)
    .await?;
    assert!(others_last < k1_first, "other keys applied at {others_last}, k1 first at {k1_first}");
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM oncely.dead_letters").await?, 0);
    Ok(())
}

async fn spawn_process(db: &kit::TestDb, group: &str, topic: &str, envs: &[(&str, &str)]) -> Result<TestConsumer> {
    TestConsumer::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_test-consumer")), &db.url, group, topic, envs).await
}

async fn wait_parked(db: &kit::TestDb, key: &str) -> Result<()> {
    let sql = format!("SELECT count(*) FROM oncely.parked WHERE entity_key = '{key}' AND attempts > 0");
    kit::wait_until(WAIT, &format!("{key} to be parked"), || async { Ok(kit::count(&db.pool, &sql).await? > 0) }).await
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_keys_survive_a_sigkill_and_resume_in_order() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let published = app::publish_seq(&topic, 6, 6).await?;
    // k2 keeps failing in the first process (its backoff is long).
    let a =
        spawn_process(&db, &group, &topic, &[("FAIL_KEYS", "k2:1000"), ("BACKOFF_MS", "200"), ("TAG", "a")]).await?;
    wait_parked(&db, "k2").await?;
    a.kill9().await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k2'").await?, 0);
    // The restarted process fails k2 twice more, then succeeds.
    let b = spawn_process(&db, &group, &topic, &[("FAIL_KEYS", "k2:2"), ("BACKOFF_MS", "50"), ("TAG", "b")]).await?;
    wait_drained(&db, &group, published.len() as i64).await?;
    b.terminate(WAIT).await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k2' AND tag = 'b'").await?, 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_key_moves_with_its_partition_to_another_member() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let published = app::publish_seq(&topic, 6, 6).await?;
    let a =
        spawn_process(&db, &group, &topic, &[("FAIL_KEYS", "k3:1000"), ("BACKOFF_MS", "200"), ("TAG", "a")]).await?;
    wait_parked(&db, "k3").await?;
    // B joins (never fails), then A leaves gracefully: B owns every partition,
    // takes over k3's parked queue and drains it.
    let b = spawn_process(&db, &group, &topic, &[("BACKOFF_MS", "50"), ("TAG", "b")]).await?;
    a.terminate(WAIT).await?;
    wait_drained(&db, &group, published.len() as i64).await?;
    b.terminate(WAIT).await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k3' AND tag = 'b'").await?, 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_failing_past_max_attempts_reaches_the_dlt_with_every_header() -> Result<()> {
    use oncely::failure::*;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let published = app::publish_seq(&topic, 4, 3).await?;
    let mut b = app::Behaviour::tagged("d");
    b.fail_times.insert("k1".into(), 1000);
    let token = CancellationToken::new();
    let c = tokio::spawn(
        app::consumer(&group, &topic, db.pool.clone(), b)
            .max_attempts(2)
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(40))
            .run(token.clone()),
    );
    let relay = oncely::outbox::relay::Relay::builder(db.pool.clone(), kit::bootstrap()).build()?;
    let r = tokio::spawn(relay.run(token.clone()));
    wait_drained(&db, &group, published.len() as i64).await?;

    let dlt = dlt_topic(&topic, &group);
    let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(kit::bootstrap())
        .client_config()?
        .set("group.id", kit::unique("dlt-reader"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[&dlt])?;
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while records.len() < 3 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "read {} dead letters from {dlt}", records.len());
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            records.push(oncely::envelope::RawRecord::from_message(&m?));
        }
    }
    token.cancel();
    c.await??;
    r.await??;
    for rec in &records {
        assert_eq!(rec.key_str(), "k1");
        let h = |name: &str| rec.header(name).flatten().map(<[u8]>::to_vec).with_context(|| format!("header {name}"));
        assert_eq!(h(H_DLT_TOPIC)?, topic.as_bytes());
        assert_eq!(h(H_DLT_PARTITION)?.len(), 4);
        assert_eq!(h(H_DLT_OFFSET)?.len(), 8);
        assert_eq!(h(H_DLT_TIMESTAMP)?.len(), 8);
        assert_eq!(h(H_DLT_GROUP)?, group.as_bytes());
        assert!(String::from_utf8(h(H_DLT_MESSAGE)?)?.contains("k1 fails"));
        assert_eq!(h(H_DLT_FQCN)?, b"oncely::HandlerError::Retry");
        assert_eq!(h(H_ATTEMPTS)?, b"2");
        assert_eq!(h(H_REASON)?, b"max-attempts");
        assert!(h("ce_id").is_ok(), "the original headers are kept");
    }
    // Nothing lost: every produced event is applied or on the DLT (and indexed).
    let applied = kit::count(&db.pool, "SELECT count(*) FROM applied").await?;
    let indexed = kit::count(&db.pool, "SELECT count(*) FROM oncely.dead_letters").await?;
    assert_eq!(applied + records.len() as i64, published.len() as i64);
    assert_eq!(indexed, records.len() as i64);
    app::check_exactly_once_in_order(
        &db.pool,
        &published
            .iter()
            .filter(|p| !records.iter().any(|r| r.header("ce_id").flatten() == Some(p.ce_id.as_bytes())))
            .cloned()
            .collect::<Vec<_>>(),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn under_the_hold_policy_a_dead_keys_queue_waits_for_the_operator() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let published = app::publish_seq(&topic, 3, 4).await?;
    // k1's first event fails on both of its attempts (three handler calls:
    // the batch's optimistic run, its careful re-run, one retry), so with
    // max_attempts 2 it is dead-lettered; later events of k1 then succeed.
    let mut b = app::Behaviour::tagged("h");
    b.fail_times.insert("k1".into(), 3);
    let token = CancellationToken::new();
    let c = tokio::spawn(
        app::consumer(&group, &topic, db.pool.clone(), b)
            .max_attempts(2)
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(40))
            .dead_key_policy(oncely::failure::DeadKeyPolicy::Hold)
            .run(token.clone()),
    );
    kit::wait_until(WAIT, "k1's later events to be held", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM oncely.parked WHERE status = 'held'").await? == 3)
    })
    .await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k1'").await?, 0);
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key <> 'k1'").await?, 8, "other keys go on");
    // The operator releases the key: the held events apply, in order.
    let released = oncely::failure::release_key(&db.pool, &group, b"k1").await?;
    assert_eq!(released, 4, "the dead-lettered marker and the three held events");
    kit::wait_until(WAIT, "the released events to apply", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k1'").await? == 3)
    })
    .await?;
    token.cancel();
    c.await??;
    let seqs: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM applied WHERE key = 'k1' ORDER BY n").fetch_all(&db.pool).await?;
    assert_eq!(seqs, vec![2, 3, 4]);
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM oncely.dead_letters").await?, 1);
    assert_eq!(published.len(), 12);
    Ok(())
}
