//! Guards, retention and observability against the real broker and database.

use std::time::Duration;

use anyhow::{Context, Result};
use oncely::consumer::{events, SpikeGuard};
use oncely_testkit::{self as kit, app};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn the_spike_guard_pauses_a_replayed_backlog_instead_of_racing_through_it() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("payments"), kit::unique("webhooks"));
    kit::create_topic(&topic, 1).await?;
    // The incident: a backlog of 1,200 events. The guard allows 500 per 90 s.
    app::publish_seq(&topic, 100, 12).await?;
    let token = CancellationToken::new();
    let guard = SpikeGuard {
        window: Duration::from_secs(90),
        max_events: Some(500),
        pause_for: Duration::from_secs(600),
        ..SpikeGuard::default()
    };
    let c = tokio::spawn(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("s"))
            .max_batch(100)
            .spike_guard(guard)
            .run(token.clone()),
    );
    kit::wait_until(WAIT, "the spike guard to trip", || async {
        Ok(events::guard_trips_counted(&group, "spike") >= 1)
    })
    .await?;
    // The lane pauses with the batches it committed to the database in the
    // last second still owed to Kafka: it pays them before it waits, or
    // Kafka's tools show the paused group further behind than it is.
    let sql = format!("SELECT coalesce(sum(next_offset), 0)::int8 FROM oncely.offsets WHERE consumer = '{group}'");
    let db_next = kit::count(&db.pool, &sql).await?;
    kit::wait_until(Duration::from_secs(15), "Kafka's committed offset to reach the paused lane's", || async {
        Ok(kit::kafka_committed_sum(&group).await?.0 == db_next)
    })
    .await?;
    token.cancel();
    c.await??;
    // It trips on the batch that crosses 500 and consumption stops there
    // (the pause outlasts the test; the rest waits for the operator or the pause).
    let applied = kit::count(&db.pool, "SELECT count(*) FROM applied").await?;
    assert!((501..=600).contains(&applied), "applied {applied} of 1200 before pausing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn segment_ms_counts_in_how_long_records_stay_readable() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    // retention.ms alone (7 days) is below the inbox's 15 days, but a segment
    // rolls only every 10 days and is deleted when its newest record expires:
    // a record can be read for 17 days, and its duplicate would outlive the inbox.
    let day = 86_400_000u64;
    kit::create_topic_with(
        &topic,
        1,
        &[("retention.ms", &(7 * day).to_string()), ("segment.ms", &(10 * day).to_string())],
    )
    .await?;
    let err = app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("r"))
        .force_inbox_retention(false)
        .run(CancellationToken::new())
        .await
        .expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, oncely::Error::Refused(_)), "{msg}");
    assert!(msg.contains("17.0 days") && msg.contains("segment.ms"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inbox_retention_shorter_than_the_topics_is_refused_unless_forced() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    // Kept for 30 days (+7 of segment.ms), while the inbox keeps identities for 15 (the default).
    kit::create_topic_with(&topic, 1, &[("retention.ms", &(30u64 * 86_400_000).to_string())]).await?;
    let err = app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("r"))
        .force_inbox_retention(false)
        .run(CancellationToken::new())
        .await
        .expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, oncely::Error::Refused(_)), "{msg}");
    assert!(msg.contains("37.0 days") && msg.contains("15.0 days"), "{msg}");
    // Long enough: accepted.
    let token = CancellationToken::new();
    let c = tokio::spawn(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("r"))
            .force_inbox_retention(false)
            .inbox_retention(Duration::from_secs(38 * 86_400))
            .run(token.clone()),
    );
    app::publish_seq(&topic, 1, 1).await?;
    kit::wait_until(WAIT, "the event to be applied", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM applied").await? == 1)
    })
    .await?;
    token.cancel();
    c.await??;
    Ok(())
}

/// The inbox key of a UUIDv7 identity stamped `days` days ago.
fn key_days_ago(days: u64) -> uuid::Uuid {
    let t = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
    let secs = t.duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs();
    let id = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, secs, 0));
    oncely::EventId::from_source_and_id("/tests/old", &id.to_string()).key()
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_inbox_partitions_are_dropped_only_after_every_consumers_retention() -> Result<()> {
    let db = kit::TestDb::new().await?;
    let today = chrono::Utc::now().date_naive();
    sqlx::query("SELECT oncely.ensure_inbox_days($1, 30)")
        .bind(today - chrono::Days::new(30))
        .execute(&db.pool)
        .await?;
    let c = oncely::store::register_consumer(&db.pool, "short", 8).await?;
    oncely::store::register_consumer(&db.pool, "long", 15).await?;
    // (key, claimed days ago): old events claimed when they were new, an
    // event of 25 days ago redriven 2 days ago, and keys without a time.
    let timeless = oncely::EventId::from("order-1").key();
    let recent_timeless = oncely::EventId::from("order-2").key();
    let (k20, k10, k25) = (key_days_ago(20), key_days_ago(10), key_days_ago(25));
    let rows = [(k20, 20u64), (k10, 10), (k25, 2), (timeless, 20), (recent_timeless, 10)];
    for (k, claimed) in rows {
        sqlx::query("INSERT INTO oncely.inbox (id, consumer_id, claimed_on) VALUES ($1, $2, $3)")
            .bind(k)
            .bind(c)
            .bind(today - chrono::Days::new(claimed))
            .execute(&db.pool)
            .await?;
    }
    let t = oncely::store::trim_inbox(&db.pool).await?;
    let day = |d: u64| format!("inbox_d{}", (today - chrono::Days::new(d)).format("%Y%m%d"));
    assert!(t.dropped.contains(&day(20)), "past the longest retention (15 days): {t:?}");
    assert!(!t.dropped.contains(&day(10)), "within the longest retention: {t:?}");
    assert_eq!(t.kept, vec![day(25)], "a partition with a recent claim (a redrive) is kept: {t:?}");
    assert_eq!(t.deleted, 1, "the timeless identity claimed 20 days ago goes: {t:?}");
    let left: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM oncely.inbox").fetch_all(&db.pool).await?;
    assert_eq!(left.len(), 3, "{left:?}");
    // A duplicate of every surviving identity is still caught, a new one claimed.
    let mut conn = db.pool.acquire().await?;
    let new = oncely::EventId::from("order-3").key();
    let probe = [k10, k25, recent_timeless, k20, new];
    let claimed = oncely::store::inbox::claim(&mut conn, c, &probe).await?;
    assert_eq!(claimed, [k20, new].into(), "only the dropped day's identity and the new one are new");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_in_prometheus_format() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    app::publish_seq(&topic, 3, 2).await?;
    let token = CancellationToken::new();
    let c =
        tokio::spawn(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("m")).run(token.clone()));
    kit::wait_until(WAIT, "events to be processed", || async {
        Ok(events::events_counted(&group, &topic, "processed") == 6)
    })
    .await?;
    let addr = oncely::metrics::serve("127.0.0.1:0".parse()?, token.clone()).await?;
    let mut sock = tokio::net::TcpStream::connect(addr).await?;
    sock.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await?;
    let mut body = String::new();
    sock.read_to_string(&mut body).await?;
    token.cancel();
    c.await??;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let line = format!(r#"oncely_events_total{{consumer="{group}",topic="{topic}",outcome="processed"}} 6"#);
    assert!(body.contains(&line), "{line} not in\n{body}");
    assert!(body.contains("# TYPE oncely_batch_seconds histogram"));
    let lag = format!(r#"oncely_lag_records{{consumer="{group}",topic="{topic}",partition="0"}} 0"#);
    assert!(body.contains(&lag), "{lag} not in\n{body}");
    let lag_s = format!(r#"oncely_lag_seconds{{consumer="{group}",topic="{topic}",partition="0"}} 0"#);
    assert!(body.contains(&lag_s), "{lag_s} not in\n{body}");
    assert!(body.contains("content-type: application/openmetrics-text"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    assert!(body.lines().any(|l| l.starts_with("oncely_batch_seconds_count") && l.contains(&group)), "{body}");
    let _ = body.find("oncely_events_total").context("events")?;
    Ok(())
}
