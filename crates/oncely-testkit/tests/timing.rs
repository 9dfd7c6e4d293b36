//! Hostile timing against the real broker and database: a member frozen with
//! SIGSTOP past its session timeout, a replay killed midway, handlers that
//! outlive the session timeout and the drain timeout, positions outside the
//! log. Every test ends with each event applied exactly once, per-key order
//! intact and every partition read to its end, within a deadline.

use std::time::Duration;

use anyhow::Result;
use oncely::consumer::events;
use oncely_testkit::process::TestConsumer;
use oncely_testkit::run::{self, wait_count, wait_offsets};
use oncely_testkit::{self as kit, app};

async fn spawn_process(db: &kit::TestDb, group: &str, topic: &str, envs: &[(&str, &str)]) -> Result<TestConsumer> {
    TestConsumer::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_test-consumer")), &db.url, group, topic, envs).await
}

/// The member ids of `group` the coordinator lists (a member dropped and
/// rejoined gets a new id).
async fn member_ids(group: &str) -> Result<Vec<String>> {
    let admin = oncely::kafka::admin::KafkaAdmin::new(kit::bootstrap(), &[])?;
    Ok(admin
        .describe_consumer_groups(&[group])
        .await?
        .first()
        .map(|g| g.members.iter().map(|m| m.member_id.clone()).collect())
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_frozen_past_its_session_timeout_neither_duplicates_nor_stalls_a_partition() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let published = app::publish_seq(&topic, 10, 30).await?;
    // A is always inside a batch: 20 events of 50 ms each.
    let slow = [("DELAY_MS", "50"), ("MAX_BATCH", "20"), ("SESSION_TIMEOUT_MS", "6000"), ("ZOMBIE_TIMEOUT_MS", "3000")];
    let a = spawn_process(&db, &group, &topic, &[slow[0], slow[1], slow[2], slow[3], ("TAG", "a")]).await?;
    wait_count(&db.pool, "SELECT count(*) FROM applied", 40).await?;
    // Frozen mid-batch, its transactions open, its heartbeats stopped.
    a.signal("-STOP")?;
    let frozen_at = kit::count(&db.pool, "SELECT count(*) FROM applied").await?;
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_test-consumer"));
    let b_env = [slow[0], slow[1], slow[2], slow[3], ("TAG", "b")];
    let b = TestConsumer::spawn_logged(exe, &db.url, &[&group, &topic], &b_env, Some("b")).await?;
    // Past A's session timeout B owns both partitions; A's open batches hold
    // them until B ends A's database sessions.
    wait_count(&db.pool, "SELECT count(*) FROM applied WHERE tag = 'b'", 20).await?;
    // It got there by ending them (the zombie timeout), not by A's batches
    // finishing: A is frozen inside one, 20 events of 50 ms, nearly always.
    // (Its log is read from a pipe, so it may arrive a moment after the rows.)
    let ended = || b.stderr().iter().any(|l| l.contains("Ended the database session of a previous owner"));
    kit::wait_until(Duration::from_secs(10), "B to log that it ended a frozen owner's session", || async {
        Ok(ended())
    })
    .await?;
    assert_eq!(
        kit::count(&db.pool, "SELECT count(*) FROM applied WHERE tag = 'a'").await?,
        frozen_at,
        "nothing of A's committed while it was frozen"
    );
    // A wakes up: its late batches must not commit, and it rejoins.
    a.signal("-CONT")?;
    wait_offsets(&db.pool, &group, published.len() as i64).await?;
    b.kill9().await?;
    a.kill9().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_killed_midway_resumes_and_applies_the_rest_exactly_once() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let published = app::publish_seq(&topic, 10, 10).await?;
    let c = run::start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("first")));
    wait_offsets(&db.pool, &group, 100).await?;
    c.stop().await?;
    // The projection and its inbox are wiped (to be rebuilt from the topic),
    // and the group is rewound with Kafka's own tool.
    sqlx::query("DELETE FROM applied").execute(&db.pool).await?;
    sqlx::query("DELETE FROM oncely.inbox").execute(&db.pool).await?;
    let bootstrap = kit::bootstrap();
    let reset = [
        "--bootstrap-server",
        &bootstrap,
        "--group",
        &group,
        "--topic",
        &topic,
        "--reset-offsets",
        "--to-earliest",
        "--execute",
    ];
    kit::kafka_tool("kafka-consumer-groups", &reset)?;
    // The replay follows the rewind, slowly; it is killed a third of the way.
    let env = [("REWIND", "replay"), ("DELAY_MS", "20"), ("MAX_BATCH", "5")];
    let replay = spawn_process(&db, &group, &topic, &env).await?;
    wait_count(&db.pool, "SELECT count(*) FROM applied", 30).await?;
    replay.kill9().await?;
    let done = kit::count(&db.pool, "SELECT count(*) FROM applied").await?;
    assert!(done < 100, "killed midway ({done} applied)");
    // Restarted with the default policy: the replay's position is the
    // database's, so it goes on from there.
    let again = spawn_process(&db, &group, &topic, &[]).await?;
    wait_count(&db.pool, "SELECT count(*) FROM applied", 100).await?;
    wait_offsets(&db.pool, &group, 100).await?;
    again.kill9().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_longer_than_the_session_timeout_keeps_its_member_and_other_partitions_go_on() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let keys = 8;
    let published = app::publish_seq(&topic, keys, 2).await?;
    // publish_seq sends k0..k7 for seq 1, then for seq 2: record i is key i % keys.
    let slow_partition = published[0].partition;
    let other: Vec<String> =
        (0..keys).filter(|k| published[*k].partition != slow_partition).map(|k| format!("'k{k}'")).collect();
    anyhow::ensure!(!other.is_empty(), "every key landed on one partition");
    // k0's events take 8 s each (the write-up's reconciliation, scaled),
    // longer than the 6 s session timeout.
    // max.poll.interval.ms below the handler's time: the limit a long handler
    // really risks (the member is dropped if the application stops polling).
    let a = spawn_process(
        &db,
        &group,
        &topic,
        &[("SLOW_KEYS", "k0:8000"), ("MAX_BATCH", "1"), ("TAG", "a"), ("MAX_POLL_INTERVAL_MS", "6500")],
    )
    .await?;
    kit::wait_until(run::WAIT, "the member to join", || async { Ok(member_ids(&group).await?.len() == 1) }).await?;
    let joined = member_ids(&group).await?;
    let sql = format!("SELECT count(*) FROM applied WHERE key IN ({})", other.join(","));
    wait_count(&db.pool, &sql, 2 * other.len() as i64).await?;
    assert_eq!(
        kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k0'").await?,
        0,
        "the other partition finished while k0's first event still runs"
    );
    assert_eq!(member_ids(&group).await?, joined, "the same member, never dropped and rejoined");
    wait_offsets(&db.pool, &group, published.len() as i64).await?;
    assert_eq!(member_ids(&group).await?, joined, "the same member after the long handlers");
    a.kill9().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    Ok(())
}

/// A's statements outlive the test's deadline (240 s) while B's take 100 ms;
/// when B joins, a partition moves and A abandons its batch at the drain
/// timeout while the statement still runs in PostgreSQL; then A is
/// SIGKILLed (PostgreSQL keeps its other statement and transaction going).
/// The only way on is for B, the new owner, to end A's database sessions.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_abandoned_while_its_sql_outlives_the_test_is_ended_by_the_new_owner_and_applied_once() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let r = abandoned_batch_body(&db).await;
    // A's statements would run for minutes after the test: end the sessions
    // of this test's own database.
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        .execute(&db.pool)
        .await?;
    r
}

async fn abandoned_batch_body(db: &kit::TestDb) -> Result<()> {
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 2).await?;
    let published = app::publish_seq(&topic, 8, 1).await?;
    anyhow::ensure!(published.iter().any(|p| p.partition == 0) && published.iter().any(|p| p.partition == 1));
    let long = (0..8).map(|k| format!("k{k}:240000")).collect::<Vec<_>>().join(",");
    let short = (0..8).map(|k| format!("k{k}:100")).collect::<Vec<_>>().join(",");
    let common = [("MAX_BATCH", "1"), ("DRAIN_TIMEOUT_MS", "1000"), ("ZOMBIE_TIMEOUT_MS", "2000")];
    let a = spawn_process(
        db,
        &group,
        &topic,
        &[common[0], common[1], common[2], ("SQL_SLEEP_KEYS", long.as_str()), ("TAG", "a")],
    )
    .await?;
    kit::wait_until(run::WAIT, "both lanes inside a statement", || async {
        Ok(kit::count(
            &db.pool,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active' AND datname = current_database()",
        )
        .await?
            >= 2)
    })
    .await?;
    let b = spawn_process(
        db,
        &group,
        &topic,
        &[common[0], common[1], common[2], ("SQL_SLEEP_KEYS", short.as_str()), ("TAG", "b")],
    )
    .await?;
    // B gets one partition; A's abandoned batch there still sleeps in PostgreSQL.
    wait_count(&db.pool, "SELECT count(*) FROM applied WHERE tag = 'b'", 1).await?;
    // A dies; its other statement goes on in PostgreSQL, its transaction open.
    a.kill9().await?;
    wait_offsets(&db.pool, &group, published.len() as i64).await?;
    b.kill9().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE tag = 'b'").await?, 8, "A never committed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_position_past_the_log_end_halts_the_partition() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    app::publish_seq(&topic, 1, 5).await?;
    let c = run::start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("1")));
    wait_offsets(&db.pool, &group, 5).await?;
    c.stop().await?;
    // The topic is recreated (by mistake, or an unclean election lost its
    // tail): its log ends before where the consumer is.
    kit::delete_topic(&topic).await?;
    kit::create_topic(&topic, 1).await?;
    app::publish_seq(&topic, 1, 2).await?;
    let c = run::start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("2")));
    kit::wait_until(run::WAIT, "the partition to halt as out of range", || async {
        Ok(events::out_of_range_counted(&group, &topic) >= 1)
    })
    .await?;
    c.stop().await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied").await?, 5, "nothing applied, nothing skipped");
    assert_eq!(run::offsets_sum(&db.pool, &group).await?, 5, "the position is kept for the operator");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn records_deleted_before_they_were_processed_halt_the_partition() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    app::publish_seq(&topic, 1, 5).await?;
    let c = run::start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("1")));
    wait_offsets(&db.pool, &group, 5).await?;
    c.stop().await?;
    app::publish_seq(&topic, 1, 5).await?;
    // Records 5..8 go before the consumer read them (retention, or an operator).
    let spec = std::env::temp_dir().join(format!("{}.json", kit::unique("delete-records")));
    std::fs::write(
        &spec,
        serde_json::to_vec(
            &serde_json::json!({"partitions": [{"topic": topic, "partition": 0, "offset": 8}], "version": 1}),
        )?,
    )?;
    let bootstrap = kit::bootstrap();
    let spec_path = spec.to_string_lossy().into_owned();
    kit::kafka_tool("kafka-delete-records", &["--bootstrap-server", &bootstrap, "--offset-json-file", &spec_path])?;
    let c = run::start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("2")));
    kit::wait_until(run::WAIT, "the partition to halt as out of range", || async {
        Ok(events::out_of_range_counted(&group, &topic) >= 1)
    })
    .await?;
    c.stop().await?;
    let _ = std::fs::remove_file(&spec);
    assert_eq!(
        kit::count(&db.pool, "SELECT count(*) FROM applied").await?,
        5,
        "records 8 and 9 are not applied past the gap"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn offsets_moved_under_a_running_consumer_are_followed_not_idled_on() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let first = app::publish_seq(&topic, 2, 5).await?;
    let c = run::start(app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("m")));
    wait_offsets(&db.pool, &group, 10).await?;
    // Someone moves the running consumer's database position back (a wrong
    // manual fix): the lane's next fence fails, and it follows the database.
    sqlx::query("UPDATE oncely.offsets SET next_offset = 4 WHERE consumer = $1").bind(&group).execute(&db.pool).await?;
    let second = app::publish_seq(&topic, 2, 5).await?;
    kit::wait_until(run::WAIT, "the lane to go on past the move", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM applied").await? >= 20
            && run::offsets_sum(&db.pool, &group).await? >= 20)
    })
    .await?;
    c.stop().await?;
    assert!(events::fenced_counted(&group, &topic, "moved") >= 1);
    // Records 4..10 were read again: duplicates, applied once.
    assert_eq!(events::events_counted(&group, &topic, "duplicate"), 6);
    assert_eq!(first.len() + second.len(), 20);
    assert_eq!(kit::count(&db.pool, "SELECT count(DISTINCT event_id) FROM applied").await?, 20, "each applied once");
    Ok(())
}
