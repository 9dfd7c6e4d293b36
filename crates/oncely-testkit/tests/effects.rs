//! Side effects against the real broker and database and the fake payment
//! gateway over HTTP.

use std::time::Duration;

use anyhow::{Context, Result};
use oncely::effects::intents;
use oncely::effects::EffectOptions;
use oncely::envelope::CloudEventAttrs;
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

// --- Executors on their own: leases, renewals, stale attempts -------------

use std::sync::Arc;

use oncely::effects::intents::NewIntent;
use oncely::effects::{EffectCall, EffectError, Executor, Registry, Semantics};
use oncely_testkit::gateway::GatewayClient;

/// Records `n` pending intents of `effect` with `semantics`; returns their keys.
async fn record_intents(db: &kit::TestDb, effect: &str, semantics: Semantics, n: usize) -> Result<Vec<String>> {
    let intents: Vec<NewIntent> = (0..n)
        .map(|i| {
            let event_id = format!("/tests/lease#{}", uuid::Uuid::now_v7());
            NewIntent {
                key: oncely::effects::intent_key("lease-test", effect, &event_id, None),
                consumer: "lease-test".into(),
                effect: effect.into(),
                event_id,
                payload: serde_json::json!({"amount": 100 + i}),
                semantics: semantics.as_str(),
                status: "pending",
                ordering_key: None,
            }
        })
        .collect();
    let mut conn = db.pool.acquire().await?;
    intents::record(&mut conn, &intents).await?;
    Ok(intents.into_iter().map(|i| i.key).collect())
}

/// The gateway's charge call, answered only when `gate` gives a permit
/// (the test decides when a call ends).
fn gated_charge(
    gw: &FakeGateway,
    gate: Arc<tokio::sync::Semaphore>,
) -> Result<impl Fn(EffectCall) -> futures::future::BoxFuture<'static, Result<serde_json::Value, EffectError>>> {
    let client = GatewayClient::new(&gw.url(), Duration::from_secs(30))?;
    Ok(move |call: EffectCall| {
        let (client, gate) = (client.clone(), gate.clone());
        let fut: futures::future::BoxFuture<'static, _> = Box::pin(async move {
            let r = client.charge(&call.key, &call.payload).await;
            let _permit = gate.acquire().await.map_err(|e| EffectError::Transient(e.to_string()))?;
            r
        });
        fut
    })
}

fn plain_charge(
    gw: &FakeGateway,
    timeout: Duration,
) -> Result<impl Fn(EffectCall) -> futures::future::BoxFuture<'static, Result<serde_json::Value, EffectError>>> {
    let client = GatewayClient::new(&gw.url(), timeout)?;
    Ok(move |call: EffectCall| {
        let client = client.clone();
        let fut: futures::future::BoxFuture<'static, _> =
            Box::pin(async move { client.charge(&call.key, &call.payload).await });
        fut
    })
}

/// Starts an executor for one effect; stopped by the token.
fn executor(
    db: &kit::TestDb,
    effect: &str,
    f: impl oncely::effects::EffectFn,
    opts: EffectOptions,
    lease: Duration,
) -> Executor {
    let mut reg = Registry::default();
    reg.register(effect, f, opts);
    Executor::new(db.pool.clone(), reg).lease(lease).poll_interval(Duration::from_millis(50))
}

fn effects_counted(effect: &str, outcome: &str) -> u64 {
    oncely::metrics::counter("oncely_effects_total", &[("effect", effect), ("outcome", outcome)])
}

async fn wait_effect_status(db: &kit::TestDb, effect: &str, status: &str, n: i64) -> Result<()> {
    kit::wait_until(WAIT, &format!("{n} intents of {effect} {status}"), || async {
        let c: i64 = sqlx::query_scalar("SELECT count(*) FROM oncely.effects WHERE effect = $1 AND status = $2")
            .bind(effect)
            .bind(status)
            .fetch_one(&db.pool)
            .await?;
        Ok(c >= n)
    })
    .await
}

/// Two executors share the intents; every call takes four leases. With the
/// lease renewed during the call, no intent is taken for a dead executor's
/// and run a second time.
async fn long_calls_run_once(semantics: Semantics) -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let gw = FakeGateway::start("127.0.0.1:0".parse()?).await?;
    let effect = kit::unique("long-call");
    let lease = Duration::from_millis(600);
    gw.control(Control { delay_ms: 2400, ..Control::default() });
    let opts = match semantics {
        Semantics::AtMostOnce => EffectOptions::at_most_once(),
        _ => fast(EffectOptions::default()),
    };
    let keys = record_intents(&db, &effect, semantics, 4).await?;
    let token = CancellationToken::new();
    let runs: Vec<_> = (0..2)
        .map(|_| -> Result<_> {
            let ex = executor(&db, &effect, plain_charge(&gw, Duration::from_secs(30))?, opts.clone(), lease);
            Ok(tokio::spawn(ex.run(token.clone())))
        })
        .collect::<Result<_>>()?;
    wait_effect_status(&db, &effect, "done", keys.len() as i64).await?;
    token.cancel();
    for r in runs {
        r.await??;
    }
    let s = gw.stats();
    assert_eq!(s.charge_calls, keys.len() as u64, "one call per key: {s:?}");
    for key in &keys {
        let i = intents::get(&db.pool, key).await?.context("intent")?;
        assert_eq!((i.status.as_str(), i.attempts), ("done", 1), "{key}: claimed once, done");
    }
    assert_eq!(effects_counted(&effect, "stale"), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_at_least_once_call_renews_its_lease_and_is_not_run_twice() -> Result<()> {
    long_calls_run_once(Semantics::AtLeastOnce).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_at_most_once_call_renews_its_lease_is_called_once_and_its_outcome_recorded() -> Result<()> {
    long_calls_run_once(Semantics::AtMostOnce).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_intent_recorded_at_most_once_is_never_resent_by_an_at_least_once_registration() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let gw = FakeGateway::start("127.0.0.1:0".parse()?).await?;
    let effect = kit::unique("stored-semantics");
    let keys = record_intents(&db, &effect, Semantics::AtMostOnce, 1).await?;
    // The gateway takes the charge and never answers: the client gives up,
    // ambiguous. The process registers the effect at-least-once (changed
    // since the intent was recorded), with retries to spare.
    gw.control(Control { hang_after_accept_next: 1, ..Control::default() });
    let mut opts = fast(EffectOptions::default());
    opts.max_attempts = 5;
    let token = CancellationToken::new();
    let ex = executor(&db, &effect, plain_charge(&gw, Duration::from_millis(500))?, opts, Duration::from_secs(30));
    let run = tokio::spawn(ex.run(token.clone()));
    wait_effect_status(&db, &effect, "unknown", 1).await?;
    token.cancel();
    run.await??;
    let i = intents::get(&db.pool, &keys[0]).await?.context("intent")?;
    assert_eq!((i.status.as_str(), i.attempts, i.semantics.as_str()), ("unknown", 1, "at_most_once"));
    assert_eq!(gw.stats().charge_calls, 1, "never re-sent");
    Ok(())
}

/// What another executor does once this one's lease has run out, in one
/// statement so that the running executor cannot race it: the intent is
/// claimed again (attempt 2) with a lease of its own. (The steps in between,
/// reaping and for at-most-once an operator's retry, are walked through in
/// `fencing_tokens_follow_every_claim`.)
async fn take_over(db: &kit::TestDb, key: &str) -> Result<()> {
    let taken = sqlx::query(
        "UPDATE oncely.effects SET attempts = attempts + 1, lease_until = now() + interval '1 hour'
          WHERE key = $1 AND status = 'running' AND attempts = 1",
    )
    .bind(key)
    .execute(&db.pool)
    .await?
    .rows_affected();
    anyhow::ensure!(taken == 1, "the intent was not running its first attempt");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fencing_tokens_follow_every_claim() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let effect = kit::unique("fence");
    let names = [effect.clone()];
    let expire = |key: String| {
        let pool = db.pool.clone();
        async move {
            sqlx::query("UPDATE oncely.effects SET lease_until = now() - interval '1 second' WHERE key = $1")
                .bind(key)
                .execute(&pool)
                .await
        }
    };
    let lease = Duration::from_secs(3600);

    // At-most-once: claimed, lease expired, reaped to unknown, sent back by
    // an operator, claimed again.
    let key = record_intents(&db, &effect, Semantics::AtMostOnce, 1).await?.remove(0);
    let first = intents::claim_due(&db.pool, &names, 10, lease).await?;
    assert_eq!(first[0].attempts, 1);
    assert!(intents::renew(&db.pool, &key, 1, lease).await?);
    expire(key.clone()).await?;
    assert_eq!(intents::reap_expired(&db.pool).await?, (0, 1));
    assert!(!intents::finish(&db.pool, &key, 1, "done", None, None).await?, "unknown: not the attempt's to finish");
    assert!(!intents::renew(&db.pool, &key, 1, lease).await?);
    assert_eq!(oncely::effects::retry(&db.pool, &key).await?, "unknown");
    let second = intents::claim_due(&db.pool, &names, 10, lease).await?;
    assert_eq!(second[0].attempts, 2, "a claim always draws a higher token");
    assert!(!intents::finish(&db.pool, &key, 1, "done", None, None).await?, "the first attempt is stale");
    assert!(!intents::retry_later(&db.pool, &key, 1, Duration::ZERO, "late").await?);
    assert!(!intents::renew(&db.pool, &key, 1, lease).await?);
    assert!(intents::renew(&db.pool, &key, 2, lease).await?);
    assert!(intents::finish(&db.pool, &key, 2, "done", None, None).await?);

    // At-least-once: claimed, lease expired, reaped back to pending, claimed again.
    let key = record_intents(&db, &effect, Semantics::AtLeastOnce, 1).await?.remove(0);
    assert_eq!(intents::claim_due(&db.pool, &names, 10, lease).await?[0].attempts, 1);
    expire(key.clone()).await?;
    assert_eq!(intents::reap_expired(&db.pool).await?, (1, 0));
    assert!(!intents::finish(&db.pool, &key, 1, "done", None, None).await?, "pending: not the attempt's to finish");
    assert_eq!(intents::claim_due(&db.pool, &names, 10, lease).await?[0].attempts, 2);
    assert!(!intents::retry_later(&db.pool, &key, 1, Duration::ZERO, "late").await?);
    assert!(intents::retry_later(&db.pool, &key, 2, Duration::ZERO, "503").await?);
    let i = intents::get(&db.pool, &key).await?.context("intent")?;
    assert_eq!((i.status.as_str(), i.attempts), ("pending", 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_late_outcome_of_an_attempt_whose_lease_was_taken_over_is_refused() -> Result<()> {
    for semantics in [Semantics::AtMostOnce, Semantics::AtLeastOnce] {
        kit::init_tracing();
        let db = kit::TestDb::new().await?;
        app::setup(&db.pool).await?;
        let gw = FakeGateway::start("127.0.0.1:0".parse()?).await?;
        let effect = kit::unique("stale");
        let key = record_intents(&db, &effect, semantics, 1).await?.remove(0);
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let opts = match semantics {
            Semantics::AtMostOnce => EffectOptions::at_most_once(),
            _ => fast(EffectOptions::default()),
        };
        // A long lease: this executor's renewals play no part here, only the
        // fenced outcome write does.
        let token = CancellationToken::new();
        let ex = executor(&db, &effect, gated_charge(&gw, gate.clone())?, opts, Duration::from_secs(3600));
        let run = tokio::spawn(ex.run(token.clone()));
        kit::wait_until(WAIT, "the call to reach the gateway", || async { Ok(gw.stats().charge_calls == 1) }).await?;

        take_over(&db, &key).await?;
        // The first attempt's call ends now, successfully; its outcome must
        // not land on the second attempt's intent.
        gate.add_permits(1);
        kit::wait_until(WAIT, "the stale outcome to be refused", || async {
            Ok(effects_counted(&effect, "stale") == 1)
        })
        .await?;
        let i = intents::get(&db.pool, &key).await?.context("intent")?;
        assert_eq!(
            (i.status.as_str(), i.attempts, i.result.is_none()),
            ("running", 2, true),
            "{semantics:?}: the second attempt's intent is untouched"
        );
        // The second attempt's own outcome is taken; the first's never is.
        assert!(!intents::finish(&db.pool, &key, 1, "failed", None, Some("late")).await?);
        assert!(intents::finish(&db.pool, &key, 2, "done", Some(&serde_json::json!({"by": "b"})), None).await?);
        assert!(!intents::renew(&db.pool, &key, 2, Duration::from_secs(1)).await?, "finished: nothing to renew");
        token.cancel();
        run.await??;
        assert_eq!(effects_counted(&effect, "done"), 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_at_least_once_call_whose_lease_was_taken_over_is_abandoned() -> Result<()> {
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    app::setup(&db.pool).await?;
    let gw = FakeGateway::start("127.0.0.1:0".parse()?).await?;
    let effect = kit::unique("abandoned");
    let key = record_intents(&db, &effect, Semantics::AtLeastOnce, 1).await?.remove(0);
    // The call never ends by itself; the lease is short, so the executor's
    // renewals (every 200 ms) find the intent taken over soon.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let token = CancellationToken::new();
    let ex = executor(
        &db,
        &effect,
        gated_charge(&gw, gate.clone())?,
        fast(EffectOptions::default()),
        Duration::from_millis(600),
    );
    let run = tokio::spawn(ex.run(token.clone()));
    kit::wait_until(WAIT, "the call to reach the gateway", || async { Ok(gw.stats().charge_calls == 1) }).await?;
    // Taken over by "executor B", which holds it for an hour.
    take_over(&db, &key).await?;
    kit::wait_until(WAIT, "the call to be abandoned", || async { Ok(effects_counted(&effect, "abandoned") == 1) })
        .await?;
    // Released now, the abandoned call records nothing.
    gate.add_permits(10);
    token.cancel();
    run.await??;
    let i = intents::get(&db.pool, &key).await?.context("intent")?;
    assert_eq!((i.status.as_str(), i.attempts, i.result.is_none()), ("running", 2, true));
    assert_eq!(effects_counted(&effect, "stale") + effects_counted(&effect, "done"), 0);
    Ok(())
}
