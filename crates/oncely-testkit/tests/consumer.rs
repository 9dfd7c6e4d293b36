//! The consumer runtime against the real broker and database, with real faults.

use std::time::Duration;

use anyhow::Result;
use oncely::consumer::events;
use oncely::envelope::{CloudEventAttrs, VersionSource, H_ID, H_SOURCE, H_VERSION};
use oncely::{Cx, Event, HandlerError, Publisher, RewindPolicy};
use oncely_testkit::process::TestConsumer;
use oncely_testkit::run::{start, wait_offsets as wait_offsets_of, WAIT};
use oncely_testkit::{self as kit, app};

async fn wait_rows(db: &kit::TestDb, n: i64) -> Result<()> {
    kit::wait_until(WAIT, &format!("{n} applied rows"), || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM applied").await? >= n)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_published_twice_is_applied_once() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let publisher = Publisher::new(kit::bootstrap(), "/tests/dup")?;
    let ev = app::SeqEvent { key: "k1".into(), seq: 1 };
    let attrs = CloudEventAttrs::new_now("/tests/dup", "test.seq");
    let first = publisher.publish_attrs(&topic, "k1", &attrs, &ev).await?;
    // A producer retry at the application level: a second record, same identity.
    publisher.publish_attrs(&topic, "k1", &attrs, &ev).await?;
    let other = publisher.publish(&topic, "k2", "test.seq", &app::SeqEvent { key: "k2".into(), seq: 1 }).await?;

    let c = start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("a")));
    wait_offsets_of(&db.pool, &group, 3).await?;
    c.stop().await?;

    let rows = app::applied(&db.pool).await?;
    assert_eq!(rows.len(), 2, "two distinct events: {rows:?}");
    assert_eq!(rows.iter().filter(|r| r.1 == first.event_id.display()).count(), 1);
    assert!(rows.iter().any(|r| r.1 == other.event_id.display()));
    assert_eq!(events::events_counted(&group, &topic, "duplicate"), 1);
    Ok(())
}

async fn spawn_process(db: &kit::TestDb, group: &str, topic: &str, envs: &[(&str, &str)]) -> Result<TestConsumer> {
    TestConsumer::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_test-consumer")), &db.url, group, topic, envs).await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_batch_then_restart_applies_every_event_exactly_once() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 3).await?;
    let published = app::publish_seq(&topic, 20, 15).await?;

    // The handler writes its row for the 137th event, then blocks inside the
    // open batch transaction: killed there, after the write, before the commit.
    let mut child = spawn_process(&db, &group, &topic, &[("HANG_AFTER", "137"), ("MAX_BATCH", "50")]).await?;
    // Other partitions' lanes go on committing meanwhile: what must be
    // missing is the hanging event's own row.
    let hung = child.wait_prefix("HANGING ", WAIT).await?;
    child.kill9().await?;
    let committed = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM applied WHERE event_id = $1")
        .bind(&hung)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(committed, 0, "the hanging batch ({hung}) was not committed");

    let child2 = spawn_process(&db, &group, &topic, &[]).await?;
    wait_offsets_of(&db.pool, &group, published.len() as i64).await?;
    child2.kill9().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rebalances_during_load_keep_exactly_once_and_per_key_order() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 6).await?;
    let first = app::publish_seq(&topic, 30, 20).await?;

    let slow = [("DELAY_MS", "2"), ("MAX_BATCH", "20")];
    let a = spawn_process(&db, &group, &topic, &[slow[0], slow[1], ("TAG", "a")]).await?;
    wait_rows(&db, 100).await?;
    // B joins while A is busy: partitions move from A to B.
    let b = spawn_process(&db, &group, &topic, &[slow[0], slow[1], ("TAG", "b")]).await?;
    let admin = oncely::kafka::admin::KafkaAdmin::new(kit::bootstrap(), &[])?;
    kit::wait_until(WAIT, "both members to own partitions", || async {
        let g = admin.describe_consumer_groups(&[group.as_str()]).await?;
        Ok(g.first().is_some_and(|g| g.members.len() == 2 && g.members.iter().all(|m| !m.assignment.is_empty())))
    })
    .await?;
    // More load while both run: B applies its share. Then B leaves gracefully
    // (SIGTERM): its partitions move back to A.
    let publisher = Publisher::new(kit::bootstrap(), "/tests/seq")?;
    let mut second = Vec::new();
    for seq in 21..=30 {
        for k in 0..30 {
            let ev = app::SeqEvent { key: format!("k{k}"), seq };
            second.push(publisher.publish(&topic, &ev.key, "test.seq", &ev).await?);
        }
    }
    kit::wait_until(WAIT, "member b to apply events", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE tag = 'b'").await? > 0)
    })
    .await?;
    b.terminate(WAIT).await?;
    let all: Vec<_> = first.into_iter().chain(second).collect();
    wait_offsets_of(&db.pool, &group, all.len() as i64).await?;
    a.kill9().await?;
    app::check_exactly_once_in_order(&db.pool, &all).await?;
    let tags = kit::count(&db.pool, "SELECT count(DISTINCT tag) FROM applied").await?;
    assert_eq!(tags, 2, "both members applied events");
    Ok(())
}

/// The incident's command: `kafka-consumer-groups --reset-offsets
/// --to-earliest --execute` for `topic`, with Kafka's own tool (the group
/// must be stopped). Returns the tool's output.
fn reset_to_earliest(group: &str, topic: &str) -> Result<String> {
    let bootstrap = kit::bootstrap();
    let reset = [
        "--bootstrap-server",
        &bootstrap,
        "--group",
        group,
        "--topic",
        topic,
        "--reset-offsets",
        "--to-earliest",
        "--execute",
    ];
    kit::kafka_tool("kafka-consumer-groups", &reset)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewind_with_kafkas_own_tool_reruns_nothing() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("payments"), kit::unique("webhooks"));
    kit::create_topic(&topic, 3).await?;
    let published = app::publish_seq(&topic, 10, 10).await?;
    let n = published.len() as i64;

    let c = start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("1")));
    wait_offsets_of(&db.pool, &group, n).await?;
    c.stop().await?;

    // The incident's command, with Kafka's own tool, while the group is stopped.
    let out = reset_to_earliest(&group, &topic)?;
    assert_eq!(out.lines().filter(|l| l.contains(&topic)).count(), 3, "the tool reset 3 partitions: {out}");

    // Policy skip (default): the rewind costs nothing.
    let c = start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("2")));
    kit::wait_until(WAIT, "rewinds to be detected", || async {
        Ok(events::rewinds_counted(&group, &topic, "skip") >= 3)
    })
    .await?;
    c.stop().await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied").await?, n, "no handler call re-ran");
    assert_eq!(events::events_counted(&group, &topic, "duplicate"), 0, "nothing was even re-read");

    // Policy replay: every record is re-read and skipped as a duplicate.
    reset_to_earliest(&group, &topic)?;
    let c = start(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("3")).rewind_policy(RewindPolicy::Replay),
    );
    kit::wait_until(WAIT, "every record re-read as a duplicate", || async {
        Ok(events::events_counted(&group, &topic, "duplicate") >= n as u64)
    })
    .await?;
    c.stop().await?;
    assert_eq!(events::rewinds_counted(&group, &topic, "replay"), 3);
    assert_eq!(events::events_counted(&group, &topic, "duplicate"), n as u64);
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied").await?, n);
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_event_is_skipped_by_the_version_guard() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("accounts"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let publisher = Publisher::new(kit::bootstrap(), "/tests/versions")?;
    for (seq, version) in [(1, 1), (2, 3), (3, 2), (4, 4)] {
        let attrs = CloudEventAttrs::new_now("/tests/versions", "test.seq");
        let mut headers = attrs.to_headers();
        headers.push((H_VERSION.into(), version.to_string().into_bytes()));
        let payload = serde_json::to_vec(&app::SeqEvent { key: "acct".into(), seq })?;
        publisher.publish_raw(&topic, Some(b"acct"), Some(&payload), &headers).await?;
    }
    let c = start(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("v"))
            .version_guard(VersionSource::Header(H_VERSION.into()), None),
    );
    wait_offsets_of(&db.pool, &group, 4).await?;
    c.stop().await?;
    let seqs: Vec<i64> = app::applied(&db.pool).await?.into_iter().map(|r| r.3).collect();
    assert_eq!(seqs, vec![1, 2, 4], "version 2 arrived after version 3 and was skipped");
    assert_eq!(events::events_counted(&group, &topic, "stale"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_or_panicking_handler_does_not_corrupt_the_batch() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let published = app::publish_seq(&topic, 5, 4).await?;
    let mut b = app::Behaviour::tagged("p");
    b.panic_keys.insert("k1".into());
    b.reject_keys.lock().expect("lock").insert("k2".into());
    b.fail_times.insert("k3".into(), 2);
    let c = start(
        app::consumer(&group, &topic, db.pool.clone(), b)
            .max_attempts(3)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50)),
    );
    wait_offsets_of(&db.pool, &group, published.len() as i64).await?;
    kit::wait_until(WAIT, "parked keys to drain or die", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM oncely.parked").await? == 0)
    })
    .await?;
    c.stop().await?;
    // k0, k3 (after two failures) and k4 applied, in order; k1 and k2 dead-lettered.
    let rows = app::applied(&db.pool).await?;
    let keys: std::collections::BTreeSet<_> = rows.iter().map(|r| r.2.clone()).collect();
    assert_eq!(keys, ["k0", "k3", "k4"].iter().map(|s| s.to_string()).collect());
    assert_eq!(rows.len(), 12);
    let mut per_key = std::collections::HashMap::<String, i64>::new();
    for (_, _, k, seq) in &rows {
        let prev = per_key.insert(k.clone(), *seq).unwrap_or(0);
        assert_eq!(*seq, prev + 1, "order held for {k}");
    }
    let dead: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT convert_from(key, 'UTF8'), reason, attempts FROM oncely.dead_letters ORDER BY id")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(dead.iter().filter(|d| d.0 == "k1" && d.1 == "max-attempts" && d.2 == 3).count(), 4, "{dead:?}");
    assert_eq!(dead.iter().filter(|d| d.0 == "k2" && d.1 == "rejected").count(), 4, "{dead:?}");
    let panic_msg: String =
        sqlx::query_scalar("SELECT error FROM oncely.dead_letters WHERE reason = 'max-attempts' LIMIT 1")
            .fetch_one(&db.pool)
            .await?;
    assert!(panic_msg.contains("panicked"), "{panic_msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_dead_lettered_and_the_partition_keeps_flowing() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let publisher = Publisher::new(kit::bootstrap(), "/tests/bad")?;
    let good = |seq| app::SeqEvent { key: "k".into(), seq };
    publisher.publish(&topic, "k", "test.seq", &good(1)).await?;
    // Undecodable payload.
    publisher.publish(&topic, "k", "test.seq", &serde_json::json!({"key": "k", "seq": "two"})).await?;
    // Missing identity: no ce_id.
    let no_id = [(H_SOURCE.to_string(), b"/tests/bad".to_vec())];
    publisher.publish_raw(&topic, Some(b"k"), Some(br#"{"key":"k","seq":9}"#), &no_id).await?;
    // A header that is not UTF-8.
    let bad_header = [(H_SOURCE.to_string(), b"/s".to_vec()), (H_ID.to_string(), vec![0xff, 0xfe])];
    publisher.publish_raw(&topic, Some(b"k"), Some(br#"{"key":"k","seq":9}"#), &bad_header).await?;
    // Oversized.
    let big = serde_json::to_vec(&serde_json::json!({"key": "k", "seq": 9, "pad": "x".repeat(5000)}))?;
    let attrs = CloudEventAttrs::new_now("/tests/bad", "test.seq");
    publisher.publish_raw(&topic, Some(b"k"), Some(&big), &attrs.to_headers()).await?;
    publisher.publish(&topic, "k", "test.seq", &good(2)).await?;

    let c = start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("b")).max_record_bytes(4096));
    wait_offsets_of(&db.pool, &group, 6).await?;
    c.stop().await?;
    let seqs: Vec<i64> = app::applied(&db.pool).await?.into_iter().map(|r| r.3).collect();
    assert_eq!(seqs, vec![1, 2], "the good events around the bad ones were applied");
    let reasons: Vec<(i64, String, String)> =
        sqlx::query_as(r#"SELECT "offset", reason, error FROM oncely.dead_letters ORDER BY "offset""#)
            .fetch_all(&db.pool)
            .await?;
    let r: Vec<(&str, &str)> = reasons.iter().map(|(_, r, e)| (r.as_str(), e.as_str())).collect();
    assert_eq!(r.len(), 4, "{r:?}");
    assert_eq!(r[0].0, "undecodable-payload");
    assert!(r[0].1.contains("SeqEvent"), "{}", r[0].1);
    assert_eq!(r[1].0, "missing-event-id");
    assert!(r[1].1.contains("ce_id"), "{}", r[1].1);
    assert_eq!(r[2].0, "invalid-header-encoding");
    assert!(r[2].1.contains("ce_id"), "{}", r[2].1);
    assert_eq!(r[3].0, "oversized-record");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_handler_applies_each_event_once_and_isolates_a_failing_one() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let published = app::publish_seq(&topic, 8, 6).await?;
    // A duplicate of one event.
    let publisher = Publisher::new(kit::bootstrap(), "/tests/seq")?;
    let first = published[0].clone();
    let attrs = CloudEventAttrs { id: first.ce_id.clone(), ..CloudEventAttrs::new_now("/tests/seq", "test.seq") };
    publisher.publish_attrs(&topic, "k0", &attrs, &app::SeqEvent { key: "k0".into(), seq: 1 }).await?;
    let mut b = app::Behaviour::tagged("batch");
    b.panic_keys.insert("k5".into());
    let c = start(
        app::consumer(&group, &topic, db.pool.clone(), b)
            .batch_handler(app::record_batch)
            .max_attempts(2)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(20)),
    );
    wait_offsets_of(&db.pool, &group, published.len() as i64 + 1).await?;
    kit::wait_until(WAIT, "k5 to be dead-lettered", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM oncely.parked").await? == 0
            && kit::count(&db.pool, "SELECT count(*) FROM oncely.dead_letters").await? == 6)
    })
    .await?;
    c.stop().await?;
    let k5: Vec<_> = published.iter().skip(5).step_by(8).map(|p| p.event_id.clone()).collect();
    assert_eq!(k5.len(), 6);
    let rest: Vec<_> = published.into_iter().filter(|p| !k5.contains(&p.event_id)).collect();
    app::check_exactly_once_in_order(&db.pool, &rest).await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied").await?, 42);
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k5'").await?, 0);
    Ok(())
}

#[derive(Debug, serde::Deserialize)]
struct Created {
    key: String,
    seq: i64,
}

#[derive(Debug, serde::Deserialize)]
struct Renamed {
    key: String,
    name: String,
}

async fn on_created(ev: Event<Created>, cx: &mut Cx) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO applied (event_id, key, seq, tag) VALUES ($1, $2, $3, 'created')")
        .bind(ev.id.display())
        .bind(&ev.data.key)
        .bind(ev.data.seq)
        .execute(cx.db())
        .await?;
    Ok(())
}

async fn on_renamed(ev: Event<Renamed>, cx: &mut Cx, tag: oncely::State<String>) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO applied (event_id, key, seq, tag) VALUES ($1, $2, 0, $3)")
        .bind(ev.id.display())
        .bind(&ev.data.key)
        .bind(format!("{}:{}", tag.as_str(), ev.data.name))
        .execute(cx.db())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_routed_by_type_to_typed_handlers() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group, group2) = (kit::unique("orders"), kit::unique("g"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let p = Publisher::new(kit::bootstrap(), "/tests/routes")?;
    p.publish(&topic, "a", "created", &serde_json::json!({"key": "a", "seq": 1})).await?;
    p.publish(&topic, "a", "renamed", &serde_json::json!({"key": "a", "name": "x"})).await?;
    p.publish(&topic, "a", "deleted", &serde_json::json!({"key": "a"})).await?;
    // A `created` whose payload is not a `Created`: that route's decode error.
    p.publish(&topic, "b", "created", &serde_json::json!({"key": "b", "name": "y"})).await?;
    let routed = |group: &str| {
        oncely::Consumer::builder(group)
            .bootstrap_servers(kit::bootstrap())
            .pool(db.pool.clone())
            .topic(&topic)
            .state("v1".to_owned())
            .route("created", on_created)
            .route("renamed", on_renamed)
            .handle_sigterm(false)
            .force_inbox_retention(true)
    };
    let c = start(routed(&group));
    wait_offsets_of(&db.pool, &group, 4).await?;
    c.stop().await?;
    let tags: Vec<String> = sqlx::query_scalar("SELECT tag FROM applied ORDER BY n").fetch_all(&db.pool).await?;
    assert_eq!(tags, ["created", "v1:x"]);
    assert_eq!(events::events_counted(&group, &topic, "unrouted"), 1, "`deleted` is counted and skipped");
    let dead: Vec<(i64, String, String)> =
        sqlx::query_as(r#"SELECT "offset", reason, error FROM oncely.dead_letters ORDER BY "offset""#)
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0].0, dead[0].1.as_str()), (3, "undecodable-payload"));
    assert!(dead[0].2.contains("Created"), "the serde error names the route's type: {}", dead[0].2);
    // The same topic with unrouted types dead-lettered instead.
    let c = start(routed(&group2).unrouted(oncely::Unrouted::DeadLetter));
    wait_offsets_of(&db.pool, &group2, 4).await?;
    c.stop().await?;
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT reason FROM oncely.dead_letters WHERE consumer = $1 ORDER BY \"offset\"")
            .bind(&group2)
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(reasons, ["unrouted-type", "undecodable-payload"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kafkas_copy_of_the_position_trails_a_backlog_and_catches_up_when_it_ends() -> Result<()> {
    // A lane reading a backlog commits its position to Kafka at most once a
    // second; the commit it owes when the backlog ends must still be paid
    // while the consumer keeps running (not only at a stop or revoke), or
    // Kafka's tools show lag that is not there.
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    // Several batches of 500 per partition, read within the commit interval.
    let published = app::publish_seq(&topic, 20, 150).await?;
    let n = published.len() as i64;

    let c = start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("a")));
    wait_offsets_of(&db.pool, &group, n).await?;
    kit::wait_until(Duration::from_secs(15), "Kafka's committed offsets to reach the database's", || async {
        Ok(kit::kafka_committed_sum(&group).await?.0 == n)
    })
    .await?;
    let (_, ours) = kit::kafka_committed_sum(&group).await?;
    assert!(ours, "every Kafka commit carries oncely's metadata");
    c.stop().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_a_trailing_kafka_commit_brings_kafka_up_to_date_without_a_replay() -> Result<()> {
    // After an unclean stop, Kafka's copy of the position can trail the
    // database's by up to a second of batches, committed with oncely's
    // metadata. A restarted member takes that for no move (nothing is
    // replayed) and brings Kafka's copy up to the database's at start, with
    // no record arriving to make it commit.
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let published = app::publish_seq(&topic, 10, 20).await?;
    let n = published.len() as i64;
    let c = start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("a")));
    wait_offsets_of(&db.pool, &group, n).await?;
    c.stop().await?;
    // What a SIGKILL within the commit interval leaves: Kafka's copy behind,
    // by the consumer's own commits.
    let admin = oncely::kafka::KafkaAdmin::new(kit::connection(), &[])?;
    let behind: Vec<(String, i32, i64, String)> = admin
        .list_consumer_group_offsets(&group, None)
        .await?
        .into_iter()
        .filter_map(|o| Some((o.topic, o.partition, o.offset? - 7, oncely::kafka::COMMIT_METADATA.to_owned())))
        .collect();
    assert_eq!(behind.len(), 2, "both partitions committed");
    admin.alter_consumer_group_offsets(&group, &behind).await?;
    assert_eq!(kit::kafka_committed_sum(&group).await?.0, n - 14);

    let c = start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("b")));
    kit::wait_until(Duration::from_secs(15), "Kafka's committed offsets to reach the database's", || async {
        Ok(kit::kafka_committed_sum(&group).await? == (n, true))
    })
    .await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE tag = 'b'").await?, 0, "nothing replayed");
    c.stop().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_that_runs_into_new_events_skips_the_old_and_applies_the_new_once() -> Result<()> {
    // A replay's batches of duplicates switch the lane's claim to probing
    // the inbox first; the batch where the replay meets new events, and
    // the ones after it, must still claim and apply every new event once.
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let mut published = app::publish_seq(&topic, 10, 60).await?;
    let old = published.len() as i64;
    let c = start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("1")));
    wait_offsets_of(&db.pool, &group, old).await?;
    c.stop().await?;

    // New events behind the old ones (seq 61..=120 for the same keys), then
    // the group rewound with Kafka's own tool and replayed.
    let publisher = Publisher::new(kit::bootstrap(), "/tests/seq")?;
    for seq in 61..=120 {
        for k in 0..10 {
            let ev = app::SeqEvent { key: format!("k{k}"), seq };
            published.push(publisher.publish(&topic, &ev.key, "test.seq", &ev).await?);
        }
    }
    let n = published.len() as i64;
    reset_to_earliest(&group, &topic)?;
    let c = start(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("2")).rewind_policy(RewindPolicy::Replay),
    );
    wait_offsets_of(&db.pool, &group, n).await?;
    c.stop().await?;
    assert_eq!(events::rewinds_counted(&group, &topic, "replay"), 1);
    assert_eq!(events::events_counted(&group, &topic, "duplicate"), old as u64, "every old event skipped");
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied").await?, n, "every new event applied");
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    Ok(())
}
