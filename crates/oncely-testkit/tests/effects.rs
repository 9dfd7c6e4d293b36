//! Side effects against the real broker and database and the fake payment
//! gateway over HTTP.

use std::time::Duration;

use anyhow::{Context, Result};
use oncely::effects::EffectOptions;
use oncely::envelope::CloudEventAttrs;
use oncely::store::effects as intents;
use oncely::Publisher;
use oncely_testkit::gateway::{Control, FakeGateway};
use oncely_testkit::process::TestConsumer;
use oncely_testkit::{self as kit, app};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(90);

/// A fresh database, fake gateway, topic and group.
struct Setup {
    db: kit::TestDb,
    gw: FakeGateway,
    topic: String,
    group: String,
}

async fn setup(partitions: i32) -> Result<Setup> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let gw = FakeGateway::start("127.0.0.1:0".parse()?).await?;
    let (topic, group) = (kit::unique("orders"), kit::unique("payments"));
    kit::create_topic(&topic, partitions).await?;
    Ok(Setup { db, gw, topic, group })
}

fn fast(mut o: EffectOptions) -> EffectOptions {
    o.backoff = (Duration::from_millis(20), Duration::from_millis(100));
    o
}

async fn statuses(db: &kit::TestDb) -> Result<Vec<(String, i64)>> {
    Ok(intents::count_by_status(&db.pool, app::CHARGE).await?)
}

async fn wait_status(db: &kit::TestDb, status: &str, n: i64) -> Result<()> {
    let sql = format!("SELECT count(*) FROM oncely.effects WHERE status = '{status}'");
    kit::wait_until(WAIT, &format!("{n} intents {status}"), || async { Ok(kit::count(&db.pool, &sql).await? >= n) })
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_delivered_twice_charges_once() -> Result<()> {
    let Setup { db, gw, topic, group } = setup(1).await?;
    let publisher = Publisher::new(kit::bootstrap(), "/tests/effects")?;
    let attrs = CloudEventAttrs::new_now("/tests/effects", "test.seq");
    let ev = app::SeqEvent { key: "order-1".into(), seq: 1 };
    publisher.publish_attrs(&topic, "order-1", &attrs, &ev).await?;
    publisher.publish_attrs(&topic, "order-1", &attrs, &ev).await?;

    let token = CancellationToken::new();
    let c = app::consumer_with_gateway(
        &group,
        &topic,
        db.pool.clone(),
        app::Behaviour::tagged("e"),
        &gw.url(),
        fast(EffectOptions::default()),
    )?;
    let run = tokio::spawn(c.run(token.clone()));
    wait_status(&db, "done", 1).await?;
    kit::wait_until(WAIT, "both deliveries consumed", || async {
        Ok(kit::count(&db.pool, "SELECT coalesce(sum(next_offset),0)::bigint FROM oncely.offsets").await? >= 2)
    })
    .await?;
    token.cancel();
    run.await??;
    let s = gw.stats();
    assert_eq!((s.distinct_charges, s.charge_calls), (1, 1), "{s:?}");
    assert_eq!(statuses(&db).await?, vec![("done".to_string(), 1)]);
    Ok(())
}

async fn spawn_process(db: &kit::TestDb, group: &str, topic: &str, envs: &[(&str, &str)]) -> Result<TestConsumer> {
    TestConsumer::spawn(std::path::Path::new(env!("CARGO_BIN_EXE_test-consumer")), &db.url, group, topic, envs).await
}

async fn wait_accepted(gw: &FakeGateway, n: u64) -> Result<()> {
    kit::wait_until(WAIT, "the gateway to accept the charge", || async { Ok(gw.stats().distinct_charges >= n) }).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_gateway_charged_repeats_the_call_with_the_same_key() -> Result<()> {
    let Setup { db, gw, topic, group } = setup(1).await?;
    app::publish_seq(&topic, 1, 1).await?;
    // The gateway charges, then never answers: the consumer dies before it
    // records the outcome.
    gw.control(Control { hang_after_accept_next: 1, ..Control::default() });
    let url = gw.url();
    let envs = [("GATEWAY_URL", url.as_str()), ("EFFECT_LEASE_MS", "1500")];
    let a = spawn_process(&db, &group, &topic, &envs).await?;
    wait_accepted(&gw, 1).await?;
    a.kill9().await?;
    assert_eq!(statuses(&db).await?, vec![("running".to_string(), 1)], "the outcome was never recorded");

    let b = spawn_process(&db, &group, &topic, &envs).await?;
    wait_status(&db, "done", 1).await?;
    b.kill9().await?;
    let s = gw.stats();
    assert_eq!(s.charge_calls, 2, "the call was repeated after the crash: {s:?}");
    assert_eq!(s.distinct_charges, 1, "with the same idempotency key: one charge: {s:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_at_most_once_effect_is_never_resent_and_waits_for_an_operator() -> Result<()> {
    let Setup { db, gw, topic, group } = setup(1).await?;
    app::publish_seq(&topic, 1, 1).await?;
    gw.control(Control { hang_after_accept_next: 1, ..Control::default() });
    let url = gw.url();
    let envs = [("GATEWAY_URL", url.as_str()), ("EFFECT", "at_most_once"), ("EFFECT_LEASE_MS", "1000")];
    let a = spawn_process(&db, &group, &topic, &envs).await?;
    wait_accepted(&gw, 1).await?;
    a.kill9().await?;
    let b = spawn_process(&db, &group, &topic, &envs).await?;
    wait_status(&db, "unknown", 1).await?;
    // `unknown` is never claimed again: the restarted executor took it up
    // (expired lease) and did not call.
    assert_eq!(gw.stats().charge_calls, 1);
    b.kill9().await?;
    let all = intents::list(&db.pool, Some("unknown"), None, 10).await?;
    assert_eq!(all.len(), 1);
    assert!(all[0].last_error.as_deref().unwrap_or("").contains("oncely effects resolve"), "{:?}", all[0]);

    // The operator checks with the provider and resolves it; it is never run.
    let old =
        oncely::effects::resolve(&db.pool, &all[0].key, oncely::effects::Resolution::Done, "confirmed at the gateway")
            .await?;
    assert_eq!(old, "unknown");
    let after = intents::get(&db.pool, &all[0].key).await?.context("intent")?;
    assert_eq!(after.status, "done");
    assert_eq!(gw.stats().charge_calls, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_gateway_is_retried_with_backoff_then_dead_after_max_attempts() -> Result<()> {
    let Setup { db, gw, topic, group } = setup(1).await?;
    gw.control(Control { fail_next: 3, ..Control::default() });
    let mut opts = fast(EffectOptions::default());
    opts.max_attempts = 5;
    let token = CancellationToken::new();
    let c = app::consumer_with_gateway(&group, &topic, db.pool.clone(), app::Behaviour::tagged("f"), &gw.url(), opts)?;
    let run = tokio::spawn(c.run(token.clone()));
    app::publish_seq(&topic, 1, 1).await?;
    wait_status(&db, "done", 1).await?;
    let done = intents::list(&db.pool, Some("done"), None, 10).await?;
    assert_eq!(done[0].attempts, 4, "three failures, then success");
    assert_eq!(gw.stats().charge_calls, 4);

    // Now the gateway keeps failing: after max_attempts the intent is dead and listed.
    gw.control(Control { fail_next: 1000, ..Control::default() });
    let more = app::publish_seq(&topic, 1, 2).await?;
    assert_eq!(more.len(), 2);
    wait_status(&db, "dead", 2).await?;
    token.cancel();
    run.await??;
    let dead = intents::list(&db.pool, Some("dead"), None, 10).await?;
    assert_eq!(dead.len(), 2);
    for d in &dead {
        assert_eq!(d.attempts, 5);
        assert!(d.last_error.as_deref().unwrap_or("").contains("503"), "{d:?}");
    }
    assert_eq!(gw.stats().charge_calls, 4 + 2 * 5);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_mode_rebuilds_state_without_calling_the_gateway() -> Result<()> {
    let Setup { db, gw, topic, group } = setup(2).await?;
    let published = app::publish_seq(&topic, 5, 4).await?;
    let token = CancellationToken::new();
    let c = app::consumer_with_gateway(
        &group,
        &topic,
        db.pool.clone(),
        app::Behaviour::tagged("r"),
        &gw.url(),
        fast(EffectOptions::default()),
    )?
    .replay_mode(true);
    let run = tokio::spawn(c.run(token.clone()));
    kit::wait_until(WAIT, "state rebuilt", || async {
        Ok(kit::count(&db.pool, "SELECT count(*) FROM applied").await? >= published.len() as i64)
    })
    .await?;
    token.cancel();
    run.await??;
    app::check_exactly_once_in_order(&db.pool, &published).await?;
    assert_eq!(statuses(&db).await?, vec![("suppressed".to_string(), published.len() as i64)]);
    assert_eq!(gw.stats().charge_calls, 0, "no call in replay mode");
    Ok(())
}

/// Records one intent per event, ordered per entity (the order key).
async fn ordered_handler(ev: oncely::Event<app::SeqEvent>, cx: &mut oncely::Cx) -> Result<(), oncely::HandlerError> {
    let payload = serde_json::json!({"order": ev.data.key, "seq": ev.data.seq});
    cx.effect_ordered(app::CHARGE, &ev.data.key, &payload)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ordered_intents_of_one_entity_run_one_at_a_time_in_order() -> Result<()> {
    let Setup { db, gw, topic, group } = setup(1).await?;
    app::publish_seq(&topic, 1, 3).await?;
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = calls.clone();
    let client = oncely_testkit::gateway::GatewayClient::new(&gw.url(), Duration::from_secs(5))?;
    let charge = move |call: oncely::effects::EffectCall| {
        let client = client.clone();
        let seen = seen.clone();
        async move {
            let label = call.payload["seq"].to_string();
            let r = client.charge(&call.key, &call.payload).await;
            if let Ok(mut s) = seen.lock() {
                s.push(label);
            }
            r
        }
    };
    // The gateway is slow: unordered intents would overlap.
    gw.control(Control { delay_ms: 50, ..Control::default() });
    let token = CancellationToken::new();
    let c = oncely::Consumer::builder(&group)
        .bootstrap_servers(kit::bootstrap())
        .pool(db.pool.clone())
        .topic(&topic)
        .handler(ordered_handler)
        .handle_sigterm(false)
        .force_inbox_retention(true)
        .effect_executor(app::CHARGE, charge, fast(EffectOptions::default()));
    let run = tokio::spawn(c.run(token.clone()));
    wait_status(&db, "done", 3).await?;
    token.cancel();
    run.await??;
    // Recorded in one batch, all due at once, yet each waited for the one before.
    let got = calls.lock().map(|c| c.clone()).unwrap_or_default();
    assert_eq!(got, vec!["1", "2", "3"]);
    Ok(())
}
