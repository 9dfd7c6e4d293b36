//! The failure path against the real broker and database: per-key parking,
//! retries, restarts and partition moves.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use oncely_testkit::{self as kit, app};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
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

type Lines = tokio::sync::mpsc::UnboundedReceiver<String>;

async fn spawn_process(db: &kit::TestDb, group: &str, topic: &str, envs: &[(&str, &str)]) -> Result<(Child, Lines)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_test-consumer"));
    cmd.arg(group).arg(topic).env("DATABASE_URL", &db.url).env("ONCELY_KAFKA_BOOTSTRAP", kit::bootstrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true).spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut r = BufReader::new(stdout).lines();
        while let Ok(Some(l)) = r.next_line().await {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let first = tokio::time::timeout(WAIT, lines.recv()).await.context("no READY")?;
    anyhow::ensure!(first.as_deref() == Some("READY"), "unexpected first line {first:?}");
    Ok((child, lines))
}

fn signal(child: &Child, sig: &str) -> Result<()> {
    let pid = child.id().context("pid")?;
    let st = std::process::Command::new("kill").args([sig, &pid.to_string()]).status()?;
    anyhow::ensure!(st.success(), "kill {sig} failed");
    Ok(())
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
    let (mut a, _la) =
        spawn_process(&db, &group, &topic, &[("FAIL_KEYS", "k2:1000"), ("BACKOFF_MS", "200"), ("TAG", "a")]).await?;
    wait_parked(&db, "k2").await?;
    signal(&a, "-KILL")?;
    a.wait().await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k2'").await?, 0);
    // The restarted process fails k2 twice more, then succeeds.
    let (mut b, _lb) =
        spawn_process(&db, &group, &topic, &[("FAIL_KEYS", "k2:2"), ("BACKOFF_MS", "50"), ("TAG", "b")]).await?;
    wait_drained(&db, &group, published.len() as i64).await?;
    signal(&b, "-TERM")?;
    b.wait().await?;
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
    let (mut a, _la) =
        spawn_process(&db, &group, &topic, &[("FAIL_KEYS", "k3:1000"), ("BACKOFF_MS", "200"), ("TAG", "a")]).await?;
    wait_parked(&db, "k3").await?;
    // B joins (never fails), then A leaves gracefully: B owns every partition,
    // takes over k3's parked queue and drains it.
    let (mut b, _lb) = spawn_process(&db, &group, &topic, &[("BACKOFF_MS", "50"), ("TAG", "b")]).await?;
    signal(&a, "-TERM")?;
    tokio::time::timeout(WAIT, a.wait()).await??;
    wait_drained(&db, &group, published.len() as i64).await?;
    signal(&b, "-TERM")?;
    b.wait().await?;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k3' AND tag = 'b'").await?, 6);
    Ok(())
}
