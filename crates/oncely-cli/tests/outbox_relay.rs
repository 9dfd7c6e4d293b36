//! `oncely outbox relay` as a separate process, killed with SIGKILL in the
//! middle of a burst and started again; `oncely outbox status`; and a row
//! the broker refuses, listed, refused a retry of, and discarded.

#[path = "../../oncely/tests/outbox_support/mod.rs"]
mod outbox_support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use oncely::outbox::{self, Batched, OutgoingEvent};
use oncely_testkit as kit;
use outbox_support::{read_to_end, wait_drained, WAIT};
use serde_json::json;
use tokio::process::{Child, Command};

/// Starts `oncely outbox relay` against the test database, configured by
/// environment variables only; its stderr goes to a log file.
fn spawn_relay(db: &kit::TestDb, name: &str, log: &PathBuf) -> Result<Child> {
    let stderr = std::fs::File::create(log)?;
    Ok(Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(["outbox", "relay", "--name", name, "--lane-check-interval", "100ms", "--batch-size", "200"])
        .current_dir(std::env::temp_dir())
        .env_remove("ONCELY_CONFIG")
        .env_remove("ONCELY_ENV")
        .env("ONCELY_BOOTSTRAP_SERVERS", kit::bootstrap())
        .env("ONCELY_DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn,oncely=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()?)
}

async fn published(db: &kit::TestDb) -> Result<i64> {
    kit::count(&db.pool, "SELECT count(*) FROM oncely.outbox WHERE published_at IS NOT NULL").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_killed_mid_burst_publishes_every_row_again_with_the_same_ce_id() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let topic = kit::unique("outbox-kill");
    kit::create_topic(&topic, 4).await?;
    let logs = std::env::temp_dir().join(kit::unique("outbox-relay-log"));
    std::fs::create_dir_all(&logs)?;

    let mut first = spawn_relay(&db, &kit::unique("relay-1"), &logs.join("relay-1.log"))?;

    // The burst: 60 transactions of 200 events, as fast as they commit.
    const TXS: usize = 60;
    const PER_TX: usize = 200;
    let writer = {
        let (pool, topic) = (db.pool.clone(), topic.clone());
        tokio::spawn(async move {
            for t in 0..TXS {
                let events: Vec<(String, OutgoingEvent)> = (0..PER_TX)
                    .map(|i| {
                        let key = format!("k{}", (t * PER_TX + i) % 97);
                        let ev = OutgoingEvent::json("test.burst", &json!({"t": t, "i": i}))?.source("/tests/kill");
                        anyhow::Ok((key, ev))
                    })
                    .collect::<Result<_>>()?;
                let batch: Vec<Batched<'_>> =
                    events.iter().map(|(k, e)| Batched { topic: &topic, key: k, event: e }).collect();
                let mut tx = pool.begin().await?;
                outbox::enqueue_many(&mut tx, &batch).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        })
    };

    let total = (TXS * PER_TX) as i64;
    kit::wait_until(WAIT, "the first relay to publish part of the burst", || async {
        Ok(published(&db).await? >= total / 5)
    })
    .await?;
    first.start_kill().context("SIGKILL")?;
    let status = first.wait().await?;
    assert!(!status.success(), "killed, not exited: {status}");
    let at_kill = published(&db).await?;
    tracing::info!(at_kill, total, "relay killed");

    // A crash between the broker's acknowledgement and the mark, for
    // certain: the last 100 published rows lose their mark (they are on the
    // topic), as if the relay had died just before marking them.
    let unmarked = sqlx::query(
        "UPDATE oncely.outbox SET published_at = NULL WHERE id IN (
             SELECT id FROM oncely.outbox WHERE published_at IS NOT NULL ORDER BY id DESC LIMIT 100)",
    )
    .execute(&db.pool)
    .await?
    .rows_affected();
    assert_eq!(unmarked, 100);

    let mut second = spawn_relay(&db, &kit::unique("relay-2"), &logs.join("relay-2.log"))?;
    writer.await??;
    let drained = wait_drained(&db.pool, total).await;
    if drained.is_err() {
        for f in ["relay-1.log", "relay-2.log"] {
            eprintln!("--- {f}\n{}", std::fs::read_to_string(logs.join(f)).unwrap_or_default());
        }
    }
    drained?;

    // A clean stop on SIGTERM.
    let pid = second.id().context("relay pid")?;
    let term = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    assert!(term.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), second.wait()).await.context("relay did not stop")??;
    assert!(exit.success(), "relay exited with {exit}");

    let rows = outbox_support::outbox_ce_ids(&db.pool).await?;
    let recs = read_to_end(&topic, 4)?;
    let mut copies: HashMap<String, Vec<&outbox_support::Rec>> = HashMap::new();
    for r in &recs {
        copies.entry(r.ce_id()).or_default().push(r);
    }
    let missing: Vec<_> = rows.iter().filter(|(_, c)| !copies.contains_key(c)).map(|(id, _)| *id).collect();
    assert!(
        missing.is_empty(),
        "{} rows never published, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(copies.len(), rows.len(), "no record without a row");
    let duplicates = recs.len() - copies.len();
    assert!(duplicates >= 100, "the unmarked rows were published again ({duplicates} duplicates)");
    for (ce_id, cs) in &copies {
        for c in &cs[1..] {
            assert_eq!((c.key.as_ref(), c.payload.as_ref()), (cs[0].key.as_ref(), cs[0].payload.as_ref()), "{ce_id}");
            assert_eq!(c.partition, cs[0].partition, "{ce_id}: a copy in another partition");
        }
    }
    tracing::info!(records = recs.len(), rows = rows.len(), duplicates, "relay kill done");
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_status_prints_pending_rows_and_lanes_as_json() -> Result<()> {
    let db = kit::TestDb::new().await?;
    let mut tx = db.pool.begin().await?;
    for i in 0..5 {
        outbox::enqueue(&mut tx, "nowhere", &format!("k{i}"), ("test.status", &json!({"i": i}))).await?;
    }
    tx.commit().await?;
    let out = Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(["outbox", "status", "-o", "json"])
        .current_dir(std::env::temp_dir())
        .env_remove("ONCELY_CONFIG")
        .env_remove("ONCELY_ENV")
        .env("ONCELY_BOOTSTRAP_SERVERS", kit::bootstrap())
        .env("ONCELY_DATABASE_URL", &db.url)
        .output()
        .await?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout)?;
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().context("no output")?)?;
    assert_eq!(v["pending"], 5);
    assert_eq!(v["relays"], 0);
    assert_eq!(v["lanes"].as_array().map(Vec::len), Some(outbox::LANES as usize));
    assert!(v["oldest_pending_age"].as_f64().is_some());
    Ok(())
}

/// Runs `oncely ARGS` against the test database; returns the exit code and stdout.
async fn oncely(db: &kit::TestDb, args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("ONCELY_CONFIG")
        .env_remove("ONCELY_ENV")
        .env("ONCELY_BOOTSTRAP_SERVERS", kit::bootstrap())
        .env("ONCELY_DATABASE_URL", &db.url)
        .output()
        .await?;
    Ok((out.status.code(), String::from_utf8(out.stdout)?, String::from_utf8_lossy(&out.stderr).into_owned()))
}

fn last_json(stdout: &str) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(stdout.lines().last().context("no output")?)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_the_broker_refuses_is_listed_and_discarding_it_releases_its_key() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let topic = kit::unique("outbox-refused");
    kit::create_topic_with(&topic, 1, &[("max.message.bytes", "20000")]).await?;
    let mut tx = db.pool.begin().await?;
    let big = outbox::enqueue(&mut tx, &topic, "big", ("test.big", &json!({"pad": "x".repeat(60_000)}))).await?;
    let behind = outbox::enqueue(&mut tx, &topic, "big", ("test.small", &json!({"n": 2}))).await?;
    for i in 0..20 {
        outbox::enqueue(&mut tx, &topic, &format!("k{i}"), ("test.small", &json!({"n": i}))).await?;
    }
    tx.commit().await?;
    let logs = std::env::temp_dir().join(kit::unique("outbox-refused-log"));
    std::fs::create_dir_all(&logs)?;
    let mut relay = spawn_relay(&db, &kit::unique("relay"), &logs.join("relay.log"))?;
    let set_aside = kit::wait_until(WAIT, "the other rows published and the big one set aside", || async {
        let failed = kit::count(&db.pool, "SELECT count(*) FROM oncely.outbox WHERE failed_at IS NOT NULL").await?;
        Ok(published(&db).await? == 20 && failed == 1)
    })
    .await;
    if set_aside.is_err() {
        eprintln!("--- relay.log\n{}", std::fs::read_to_string(logs.join("relay.log")).unwrap_or_default());
    }
    set_aside?;

    let (code, out, err) = oncely(&db, &["outbox", "status", "-o", "json"]).await?;
    assert_eq!(code, Some(0), "{err}");
    let s = last_json(&out)?;
    assert_eq!((s["failed"].as_i64(), s["held"].as_i64(), s["pending"].as_i64()), (Some(1), Some(1), Some(1)));

    let (code, out, err) = oncely(&db, &["-o", "json", "outbox", "list", "--failed"]).await?;
    assert_eq!(code, Some(0), "{err}");
    let listed = last_json(&out)?;
    let rows = listed.as_array().context("a list")?;
    assert_eq!(rows.len(), 1, "{listed}");
    assert_eq!(
        (rows[0]["id"].as_i64(), rows[0]["key"].as_str(), rows[0]["held"].as_i64()),
        (Some(big.id), Some("big"), Some(1))
    );
    let reason = rows[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("max.message.bytes"), "{reason}");
    let (code, out, _) = oncely(&db, &["outbox", "list", "--failed"]).await?;
    assert_eq!(code, Some(0));
    assert!(out.contains("1 row(s) set aside") && out.contains("big"), "{out}");

    // A retry of a row that is not set aside is refused (exit code 2).
    let (code, _, err) = oncely(&db, &["outbox", "retry", &behind.id.to_string()]).await?;
    assert_eq!(code, Some(2), "{err}");

    // On a protected environment the discard needs the typed confirmation
    // (refused and audited without it, nothing discarded).
    let cluster = oncely::admin::KafkaAdmin::new(kit::bootstrap(), &[])?.describe_cluster().await?.cluster_id;
    let discard =
        ["outbox", "discard", &big.id.to_string(), "--reason", "too big, re-sent in parts"].map(str::to_owned);
    let prod = |extra: &[&str]| {
        kit::protected_cli(env!("CARGO_BIN_EXE_oncely"), &cluster, &db.url).args(&discard).args(extra).output()
    };
    let refused = prod(&[])?;
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("OUTBOX-DISCARD prod"), "{refused:?}");
    let (_, out, _) = oncely(&db, &["-o", "json", "outbox", "list", "--failed"]).await?;
    assert_eq!(last_json(&out)?.as_array().map(Vec::len), Some(1), "nothing discarded without the confirmation");

    // The operator gives the big row up: the row held behind it goes out.
    let done = prod(&["--confirm", "OUTBOX-DISCARD prod"])?;
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    kit::wait_until(WAIT, "the held row published", || async { Ok(published(&db).await? == 21) }).await?;
    let (code, out, _) = oncely(&db, &["-o", "json", "outbox", "list", "--failed"]).await?;
    assert_eq!(code, Some(0));
    assert_eq!(last_json(&out)?.as_array().map(Vec::len), Some(0), "a discarded row is not listed by default");
    let (_, out, _) = oncely(&db, &["-o", "json", "outbox", "list", "--failed", "--discarded"]).await?;
    let discarded = last_json(&out)?;
    assert!(discarded[0]["discarded_at"].is_string(), "{discarded}");
    assert!(discarded[0]["reason"].as_str().unwrap_or_default().contains("too big, re-sent in parts"));
    let audited = kit::count(
        &db.pool,
        "SELECT count(*) FROM oncely.audit_log WHERE action IN ('outbox.retry', 'outbox.discard')",
    )
    .await?;
    assert_eq!(audited, 3, "the refused retry, the unconfirmed discard and the discard are all audited");
    let who = kit::count(
        &db.pool,
        "SELECT count(*) FROM oncely.audit_log WHERE action = 'outbox.discard' AND os_user <> '' AND command_line LIKE '%discard%'",
    )
    .await?;
    assert_eq!(who, 2, "who asked and with what command line is recorded");

    relay.start_kill()?;
    let _ = relay.wait().await;
    let recs = read_to_end(&topic, 1)?;
    assert_eq!(recs.len(), 21);
    assert!(recs.iter().all(|r| r.ce_id() != big.ce_id), "the discarded row was never published");
    assert_eq!(recs.iter().filter(|r| r.ce_id() == behind.ce_id).count(), 1);
    let _ = std::fs::remove_dir_all(&logs);
    Ok(())
}
