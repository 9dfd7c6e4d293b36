//! `oncely dlq` and `oncely effects` run as the built binary against the real
//! broker and database.

use std::process::Output;
use std::time::Duration;

use anyhow::Result;
use oncely_testkit::{self as kit, app};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

fn oncely(db: &kit::TestDb, args: &[&str]) -> Result<Output> {
    Ok(std::process::Command::new(env!("CARGO_BIN_EXE_oncely"))
        .args(args)
        .env_remove("ONCELY_CONFIG")
        .env("ONCELY_BOOTSTRAP_SERVERS", kit::bootstrap())
        .env("ONCELY_DATABASE_URL", &db.url)
        .current_dir(std::env::temp_dir())
        .output()?)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn offsets(db: &kit::TestDb, group: &str) -> Result<i64> {
    kit::count(
        &db.pool,
        &format!("SELECT coalesce(sum(next_offset), 0)::bigint FROM oncely.offsets WHERE consumer = '{group}'"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fixed_dead_letter_redriven_is_applied_once_and_a_second_redrive_changes_nothing() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let published = app::publish_seq(&topic, 3, 1).await?;

    // A bug rejects k2: it is dead-lettered at once.
    let b = app::Behaviour::tagged("buggy");
    b.reject_keys.lock().map_err(|_| anyhow::anyhow!("lock"))?.insert("k2".into());
    let token = CancellationToken::new();
    let c = tokio::spawn(app::consumer(&group, &topic, db.pool.clone(), b).run(token.clone()));
    kit::wait_until(WAIT, "the batch to commit", || async { Ok(offsets(&db, &group).await? >= 3) }).await?;
    token.cancel();
    c.await??;
    let id: i64 = sqlx::query_scalar("SELECT id FROM oncely.dead_letters").fetch_one(&db.pool).await?;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k2'").await?, 0);

    // The fix is deployed.
    let token = CancellationToken::new();
    let c = tokio::spawn(
        app::consumer(&group, &topic, db.pool.clone(), app::Behaviour::tagged("fixed")).run(token.clone()),
    );

    // Dry run by default: nothing is published.
    let dry = oncely(&db, &["dlq", "redrive", "--id", &id.to_string()])?;
    assert!(dry.status.success(), "{dry:?}");
    assert!(stdout(&dry).contains("Dry run"), "{}", stdout(&dry));
    let list = oncely(&db, &["-o", "json", "dlq", "list"])?;
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    let run = oncely(&db, &["dlq", "redrive", "--id", &id.to_string(), "--execute"])?;
    assert!(run.status.success(), "{run:?}");
    kit::wait_until(WAIT, "the redriven event to be applied", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k2'").await? == 1)
    })
    .await?;
    let before = offsets(&db, &group).await?;
    // A second redrive of the same dead letter: consumed, and skipped as a duplicate.
    let again = oncely(&db, &["dlq", "redrive", "--id", &id.to_string(), "--execute"])?;
    assert!(again.status.success(), "{again:?}");
    kit::wait_until(WAIT, "the second redrive to be consumed", || async { Ok(offsets(&db, &group).await? > before) })
        .await?;
    token.cancel();
    c.await??;
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied WHERE key = 'k2'").await?, 1);
    assert_eq!(kit::count(&db.pool, "SELECT count(*) FROM applied").await?, published.len() as i64);
    assert_eq!(oncely::consumer::events::events_counted(&group, &topic, "duplicate"), 1);
    let redrives = kit::count(&db.pool, "SELECT count(*) FROM oncely.audit_log WHERE action = 'dlq.redrive'").await?;
    assert_eq!(redrives, 2, "both redrives are audited");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_effect_is_resolved_by_the_operator_and_audited() -> Result<()> {
    let db = kit::TestDb::new().await?;
    let key = "pay/charge-card//tests#1";
    sqlx::query(
        "INSERT INTO oncely.effects (key, consumer, effect, event_id, payload, semantics, status)
         VALUES ($1, 'pay', 'charge-card', '/tests#1', '{}', 'at_most_once', 'unknown')",
    )
    .bind(key)
    .execute(&db.pool)
    .await?;
    let listed = oncely(&db, &["-o", "json", "effects", "list", "--status", "unknown"])?;
    assert!(listed.status.success(), "{listed:?}");
    assert!(stdout(&listed).contains(key));
    let out = oncely(&db, &["effects", "resolve", key, "--as", "done", "--reason", "charge found at the gateway"])?;
    assert!(out.status.success(), "{out:?}");
    let status: String =
        sqlx::query_scalar("SELECT status FROM oncely.effects WHERE key = $1").bind(key).fetch_one(&db.pool).await?;
    assert_eq!(status, "done");
    // Resolving again is refused (it is not unknown any more): exit code 2.
    let again = oncely(&db, &["effects", "resolve", key, "--as", "done"])?;
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    let audited =
        kit::count(&db.pool, "SELECT count(*) FROM oncely.audit_log WHERE action = 'effects.resolve'").await?;
    assert_eq!(audited, 2, "the resolution and the refused attempt are both audited");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn effect_decisions_on_a_protected_environment_need_the_typed_confirmation() -> Result<()> {
    let db = kit::TestDb::new().await?;
    let key = "pay/charge-card//tests#2";
    sqlx::query(
        "INSERT INTO oncely.effects (key, consumer, effect, event_id, payload, semantics, status)
         VALUES ($1, 'pay', 'charge-card', '/tests#2', '{}', 'at_most_once', 'unknown')",
    )
    .bind(key)
    .execute(&db.pool)
    .await?;
    // Environment `prod`, protected; no terminal on stdin.
    let cluster = oncely::admin::KafkaAdmin::new(kit::bootstrap(), &[])?.describe_cluster().await?.cluster_id;
    let prod = |args: &[&str]| -> Result<Output> {
        Ok(kit::protected_cli(env!("CARGO_BIN_EXE_oncely"), &cluster, &db.url).args(args).output()?)
    };
    let status = || async {
        let s: String = sqlx::query_scalar("SELECT status FROM oncely.effects WHERE key = $1")
            .bind(key)
            .fetch_one(&db.pool)
            .await?;
        anyhow::Ok(s)
    };

    let r = prod(&["effects", "retry", key])?;
    let stderr = String::from_utf8_lossy(&r.stderr).into_owned();
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("protected") && stderr.contains(&format!("RETRY prod {key}")), "{stderr}");
    assert_eq!(status().await?, "unknown");
    // The text of another decision is refused too.
    let r = prod(&["effects", "retry", key, "--confirm", &format!("RESOLVE prod {key}")])?;
    assert_eq!(r.status.code(), Some(2), "{r:?}");
    assert_eq!(status().await?, "unknown");

    let r = prod(&["effects", "retry", key, "--confirm", &format!("RETRY prod {key}")])?;
    let stderr = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains("may have done it"), "an interrupted at-most-once call is flagged: {stderr}");
    assert!(stdout(&r).contains("unknown → pending"), "{}", stdout(&r));
    assert_eq!(status().await?, "pending");

    let rows: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT result, group_id, os_user FROM oncely.audit_log WHERE action = 'effects.retry' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?;
    let results: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(results, ["refused", "refused", "succeeded"]);
    assert!(rows.iter().all(|r| r.1.as_deref() == Some("pay") && !r.2.is_empty()), "{rows:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_binary_key_is_released_by_hex_and_a_key_not_held_is_a_refusal_that_is_audited() -> Result<()> {
    let db = kit::TestDb::new().await?;
    // Key `\xff\x00k` (not UTF-8, with a NUL) held behind its dead-lettered event.
    let key: &[u8] = b"\xff\x00k";
    for (offset, status) in [(1i64, "dead"), (2, "held"), (3, "held")] {
        sqlx::query(
            r#"INSERT INTO oncely.parked (consumer, topic, partition, "offset", entity_key, key, status)
               VALUES ('pay', 'orders', 0, $1, $2, $2, $3)"#,
        )
        .bind(offset)
        .bind(key)
        .bind(status)
        .execute(&db.pool)
        .await?;
    }
    let statuses = || async {
        let s: Vec<String> =
            sqlx::query_scalar(r#"SELECT status FROM oncely.parked ORDER BY "offset""#).fetch_all(&db.pool).await?;
        anyhow::Ok(s)
    };

    // A key that is not held: refused (exit 2), nothing changes.
    let r = oncely(&db, &["dlq", "release", "--consumer", "pay", "--key-hex", "ff00"])?;
    let stderr = String::from_utf8_lossy(&r.stderr).into_owned();
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no held events for key \\xff\\u{0} of consumer pay"), "{stderr}");
    assert_eq!(statuses().await?, ["dead", "held", "held"]);
    // Not hex: a usage error.
    let r = oncely(&db, &["dlq", "release", "--consumer", "pay", "--key-hex", "zz"])?;
    assert_eq!(r.status.code(), Some(2), "{r:?}");

    let r = oncely(&db, &["dlq", "release", "--consumer", "pay", "--key-hex", "0xff006b"])?;
    assert!(r.status.success(), "{r:?}");
    assert!(stdout(&r).contains("Released 3 held event(s) of key \\xff\\u{0}k"), "{}", stdout(&r));
    assert_eq!(statuses().await?, ["waiting", "waiting"], "the marker is gone, the held events are due");

    // Released already: a refusal, not "released 0".
    let r = oncely(&db, &["dlq", "release", "--consumer", "pay", "--key-hex", "ff006b"])?;
    assert_eq!(r.status.code(), Some(2), "{r:?}");

    let rows: Vec<(String, Option<String>, serde_json::Value)> = sqlx::query_as(
        "SELECT result, group_id, details FROM oncely.audit_log WHERE action = 'dlq.release' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?;
    let results: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(results, ["refused", "succeeded", "refused"]);
    assert!(rows.iter().all(|r| r.1.as_deref() == Some("pay")), "{rows:?}");
    assert_eq!(rows[1].2["key_hex"], "ff006b", "{:?}", rows[1].2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_on_a_protected_environment_needs_the_typed_confirmation_and_unknown_ids_are_refused() -> Result<()> {
    let db = kit::TestDb::new().await?;
    let cluster = oncely::admin::KafkaAdmin::new(kit::connection(), &[])?.describe_cluster().await?.cluster_id;
    let topic = kit::unique("orders");
    kit::create_topic(&topic, 1).await?;
    let id: i64 = sqlx::query_scalar(
        r#"INSERT INTO oncely.dead_letters (consumer, topic, partition, "offset", key, payload, reason, error, error_class, attempts)
           VALUES ('pay', $1, 0, 5, 'k', '{}', 'rejected', 'boom', 'test', 1) RETURNING id"#,
    )
    .bind(&topic)
    .fetch_one(&db.pool)
    .await?;
    let prod = |args: &[&str]| -> Result<Output> {
        Ok(kit::protected_cli(env!("CARGO_BIN_EXE_oncely"), &cluster, &db.url).args(args).output()?)
    };
    let id_s = id.to_string();
    let missing = (id + 1000).to_string();
    let r = prod(&["dlq", "redrive", "--id", &id_s, "--id", &missing])?;
    let stderr = String::from_utf8_lossy(&r.stderr).into_owned();
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("dead letter {missing} does not exist")), "{stderr}");

    let r = prod(&["dlq", "redrive", "--id", &id_s, "--execute"])?;
    let stderr = String::from_utf8_lossy(&r.stderr).into_owned();
    assert_eq!(r.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("REDRIVE prod"), "{stderr}");
    let r = prod(&["dlq", "redrive", "--id", &id_s, "--execute", "--confirm", "REDRIVE prod"])?;
    assert!(r.status.success(), "{r:?}");
    let count: i32 = sqlx::query_scalar("SELECT redrive_count FROM oncely.dead_letters WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await?;
    assert_eq!(count, 1);
    let results: Vec<String> =
        sqlx::query_scalar("SELECT result FROM oncely.audit_log WHERE action = 'dlq.redrive' ORDER BY id")
            .fetch_all(&db.pool)
            .await?;
    assert_eq!(results, ["refused", "succeeded"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redriven_record_keeps_its_null_and_empty_header_values_apart() -> Result<()> {
    use oncely::envelope::{CloudEventAttrs, Headers, Publisher};
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("g"));
    kit::create_topic(&topic, 1).await?;
    let mut headers: Headers = CloudEventAttrs::new_now("/tests/nulls", "test.seq")
        .to_headers()
        .into_iter()
        .map(|(k, v)| (k, Some(v)))
        .collect();
    headers.push(b"x-null", None);
    headers.push(b"x-empty", Some(b""));
    let payload = serde_json::to_vec(&app::SeqEvent { key: "k-null".into(), seq: 1 })?;
    let publisher = Publisher::new(kit::bootstrap(), "/tests/nulls")?;
    publisher.publish_record(&topic, Some(b"k-null"), Some(&payload), &headers).await?;

    let b = app::Behaviour::tagged("buggy");
    b.reject_keys.lock().map_err(|_| anyhow::anyhow!("lock"))?.insert("k-null".into());
    let token = CancellationToken::new();
    let c = tokio::spawn(app::consumer(&group, &topic, db.pool.clone(), b).run(token.clone()));
    kit::wait_until(WAIT, "the record to be dead-lettered", || async { Ok(offsets(&db, &group).await? >= 1) }).await?;
    token.cancel();
    c.await??;
    let id: i64 = sqlx::query_scalar("SELECT id FROM oncely.dead_letters").fetch_one(&db.pool).await?;

    let run = oncely(&db, &["dlq", "redrive", "--id", &id.to_string(), "--execute"])?;
    assert!(run.status.success(), "{run:?}");
    let recs = oncely_testkit::processor::visible(&topic, false).await?;
    let redriven = recs.iter().find(|r| r.offset == 1).ok_or_else(|| anyhow::anyhow!("no redriven record"))?;
    let value = |name: &[u8]| redriven.headers.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(value(b"x-null"), Some(None), "a null header value is redriven null");
    assert_eq!(value(b"x-empty"), Some(Some(Vec::new())), "an empty one is redriven empty");
    assert_eq!(value(b"oncely-redrive"), Some(Some(id.to_string().into_bytes())));
    Ok(())
}
