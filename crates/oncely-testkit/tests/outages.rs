//! PostgreSQL or Kafka gone for 30 s under load: nothing lost, nothing twice,
//! every partition read to its end once the service is back. These stop the
//! shared services, so they are ignored by default and run on their own,
//! serially, at the end of `scripts/test`.

use std::time::Duration;

use anyhow::Result;
use oncely_testkit::process::TestConsumer;
use oncely_testkit::run::{wait_count, wait_offsets};
use oncely_testkit::{self as kit, app};

/// How long a service stays away: the fault, not a guess at a race.
const OUTAGE: Duration = Duration::from_secs(30);

async fn spawn_process(db: &kit::TestDb, group: &str, topic: &str, envs: &[(&str, &str)]) -> Result<TestConsumer> {
    TestConsumer::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_test-consumer")), &db.url, group, topic, envs).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops the shared PostgreSQL; run with --ignored --test-threads=1"]
async fn postgres_gone_for_30s_mid_batch_and_through_a_rebalance_loses_nothing_and_applies_once() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 4).await?;
    let published = app::publish_seq(&topic, 12, 40).await?;
    let env = [("DELAY_MS", "5"), ("MAX_BATCH", "20")];
    let a = spawn_process(&db, &group, &topic, &[env[0], env[1], ("TAG", "a")]).await?;
    let b = spawn_process(&db, &group, &topic, &[env[0], env[1], ("TAG", "b")]).await?;
    wait_count(&db.pool, "SELECT count(*) FROM applied WHERE tag = 'b'", 20).await?;
    // PostgreSQL goes away mid-batch; while it is away B leaves, so A is
    // assigned B's partitions and must take them over without a database.
    let down = kit::Stopped::stop("postgres")?;
    b.terminate(Duration::from_secs(60)).await?;
    tokio::time::sleep(OUTAGE).await;
    down.start()?;
    let pool = oncely::store::connect(&db.url, 4).await?;
    wait_offsets(&pool, &group, published.len() as i64).await?;
    a.kill9().await?;
    app::check_exactly_once_in_order(&pool, &published).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "stops the shared broker; run with --ignored --test-threads=1"]
async fn kafka_gone_for_30s_mid_batch_loses_nothing_and_applies_once() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 3).await?;
    let published = app::publish_seq(&topic, 9, 40).await?;
    let a = spawn_process(&db, &group, &topic, &[("DELAY_MS", "5"), ("MAX_BATCH", "20")]).await?;
    wait_count(&db.pool, "SELECT count(*) FROM applied", 40).await?;
    let down = kit::Stopped::stop("kafka")?;
    tokio::time::sleep(OUTAGE).await;
    down.start()?;
    wait_offsets(&db.pool, &group, published.len() as i64).await?;
    a.kill9().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    Ok(())
}
