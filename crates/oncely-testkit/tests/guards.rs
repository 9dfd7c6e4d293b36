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
    token.cancel();
    c.await??;
    // It trips on the batch that crosses 500 and consumption stops there
    // (the pause outlasts the test; the rest waits for the operator or the pause).
    let applied = kit::count(&db.pool, "SELECT count(*) FROM applied").await?;
    assert!((501..=600).contains(&applied), "applied {applied} of 1200 before pausing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inbox_retention_shorter_than_the_topics_is_refused_unless_forced() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    // Kept for 30 days, while the inbox keeps identities for 8 (the default).
    kit::create_topic_with(&topic, 1, &[("retention.ms", &(30u64 * 86_400_000).to_string())]).await?;
    let err = app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("r"))
        .force_inbox_retention(false)
        .run(CancellationToken::new())
        .await
        .expect_err("refused");
    let msg = err.to_string();
    assert!(matches!(err, oncely::Error::Refused(_)), "{msg}");
    assert!(msg.contains("30.0 days") && msg.contains("8.0 days"), "{msg}");
    // Long enough: accepted.
    let token = CancellationToken::new();
    let c = tokio::spawn(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("r"))
            .force_inbox_retention(false)
            .inbox_retention(Duration::from_secs(31 * 86_400))
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

#[tokio::test(flavor = "multi_thread")]
async fn expired_inbox_partitions_are_dropped_only_after_every_consumers_retention() -> Result<()> {
    let db = kit::TestDb::new().await?;
    let today = chrono::Utc::now().date_naive();
    // Partitions for 20 and 10 days ago, with a row each.
    sqlx::query("SELECT oncely.ensure_inbox_partitions($1, 1), oncely.ensure_inbox_partitions($2, 1)")
        .bind(today - chrono::Days::new(20))
        .bind(today - chrono::Days::new(10))
        .execute(&db.pool)
        .await?;
    for days in [20u64, 10] {
        sqlx::query(r#"INSERT INTO oncely.inbox (consumer, event_id, topic, partition, "offset", received_on) VALUES ('a', $1, 't', 0, 0, $2)"#)
            .bind(format!("old-{days}"))
            .bind(today - chrono::Days::new(days))
            .execute(&db.pool)
            .await?;
    }
    oncely::store::register_consumer(&db.pool, "short", 8).await?;
    oncely::store::register_consumer(&db.pool, "long", 15).await?;
    let dropped = oncely::store::drop_expired_inbox_partitions(&db.pool).await?;
    let twenty = format!("inbox_p{}", (today - chrono::Days::new(20)).format("%Y%m%d"));
    assert_eq!(dropped, vec![twenty], "the 10-day-old partition is within the longest retention (15 days)");
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM oncely.inbox").await?, 1);
    // A duplicate of the surviving row is still caught by the claim, across days.
    let mut conn = db.pool.acquire().await?;
    let claimed = oncely::store::claim(&mut conn, "a", "t", 0, &["old-10".into(), "new".into()], &[1, 2]).await?;
    assert_eq!(claimed.into_iter().collect::<Vec<_>>(), vec!["new".to_string()]);
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
    assert!(body.lines().any(|l| l.starts_with("oncely_batch_seconds_count") && l.contains(&group)), "{body}");
    let _ = body.find("oncely_events_total").context("events")?;
    Ok(())
}
