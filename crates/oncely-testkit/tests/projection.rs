//! Projection rebuilds against the real broker and database: the tax bug of
//! the write-up, fixed by a rebuild with zero side effects, swapped in under
//! load; a swap refused while the rebuild lags; swap-back.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use oncely::admin::ops::Origin;
use oncely::admin::session::Session;
use oncely::config::{EnvConfig, Environment};
use oncely::projection::ops::{preview_swap, preview_swap_back, SwapRequest};
use oncely::projection::{self, rebuild_consumer_name};
use oncely_testkit::billing::{self, Billing, BUGGY_TAX_PERCENT, TAX_PERCENT};
use oncely_testkit::gateway::FakeGateway;
use oncely_testkit::{run, unique, wait_until, TestDb};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(120);

/// The audited diff an operator runs (the one a swap requires).
async fn diff(db: &TestDb, target: &str, sample: i64) -> Result<oncely::projection::DiffReport> {
    Ok(oncely::projection::ops::diff(&session(db).await?, target, sample, Origin::cli()).await?.0)
}

async fn session(db: &TestDb) -> Result<Session> {
    let env = Environment {
        name: "test".into(),
        config: EnvConfig {
            bootstrap_servers: oncely_testkit::bootstrap(),
            database_url: db.url.clone(),
            cluster_id: None,
            protected: false,
            kafka: Default::default(),
        },
        source: None,
    };
    Ok(Session::open(env).await?)
}

fn code(tax_percent: i64, tag: &str, invoiced: &str) -> Billing {
    Billing { tax_percent, tag: tag.into(), invoiced_topic: invoiced.into(), reject_orders: Vec::new() }
}

async fn count(pool: &PgPool, sql: &str) -> Result<i64> {
    oncely_testkit::count(pool, sql).await
}

/// Effects of `consumer` in `status`.
async fn effects(pool: &PgPool, consumer: &str, status: &str) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM oncely.effects WHERE consumer = $1 AND status = $2")
        .bind(consumer)
        .bind(status)
        .fetch_one(pool)
        .await?)
}

/// Runs a rebuild in this process until stopped.
struct RunningRebuild {
    token: CancellationToken,
    join: tokio::task::JoinHandle<oncely::Result<()>>,
}

impl RunningRebuild {
    fn start(r: projection::Rebuild<Billing>) -> Self {
        let token = CancellationToken::new();
        let run = r.run(token.clone());
        let join = tokio::spawn(async move {
            let r = run.await;
            if let Err(e) = &r {
                eprintln!("the rebuild stopped with an error: {e}");
            }
            r
        });
        RunningRebuild { token, join }
    }

    async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.join).await.context("rebuild did not stop")???;
        Ok(())
    }
}

/// Orders arriving all the time (10 every 50 ms from order `from` on), with
/// a burst of 300 on request, so that a swap meets a live consumer ahead of
/// the rebuild.
struct Load {
    stop: CancellationToken,
    burst: std::sync::Arc<std::sync::atomic::AtomicBool>,
    burst_done: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<Result<usize>>,
}

impl Load {
    fn start(topic: &str, from: usize) -> Load {
        let stop = CancellationToken::new();
        let burst = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let burst_done = std::sync::Arc::new(tokio::sync::Notify::new());
        let task = {
            let (topic, stop, burst, burst_done) = (topic.to_owned(), stop.clone(), burst.clone(), burst_done.clone());
            tokio::spawn(async move {
                let mut next = from;
                while !stop.is_cancelled() {
                    let k = if burst.swap(false, std::sync::atomic::Ordering::SeqCst) { 300 } else { 10 };
                    billing::publish_orders(&topic, next, next + k).await?;
                    next += k;
                    if k > 10 {
                        burst_done.notify_one();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                anyhow::Ok(next)
            })
        };
        Load { stop, burst, burst_done, task }
    }

    /// Publishes a burst and returns once it is published.
    async fn burst(&self) {
        self.burst.store(true, std::sync::atomic::Ordering::SeqCst);
        self.burst_done.notified().await;
    }

    /// Stops; returns how many orders there are in all.
    async fn stop(self) -> Result<usize> {
        self.stop.cancel();
        self.task.await?
    }
}

/// `test-billing MODE GROUP TOPIC` (the fixed code) as a process.
async fn billing_process(
    db: &TestDb,
    mode: &str,
    group: &str,
    topic: &str,
    envs: &[(&str, &str)],
) -> Result<oncely_testkit::process::TestConsumer> {
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_test-billing"));
    oncely_testkit::process::TestConsumer::spawn_args(exe, &db.url, &[mode, group, topic], envs).await
}

async fn wait_lag_at_most(pool: &PgPool, target: &str, lag: i64) -> Result<()> {
    wait_until(WAIT, &format!("rebuild {target} within {lag} of live"), || async {
        // Not registered yet: the rebuild is starting.
        let Ok(s) = projection::status(pool, target).await else { return Ok(false) };
        Ok(s.lag.behind <= lag && s.lag.missing.is_empty())
    })
    .await
}

/// A fresh database with the billing tables, a topic of `partitions`, names
/// for the invoiced topic and the group, and a fake gateway.
struct World {
    db: TestDb,
    pool: PgPool,
    topic: String,
    invoiced: String,
    group: String,
    gw: FakeGateway,
}

impl World {
    async fn new(partitions: i32) -> Result<World> {
        oncely_testkit::init_tracing();
        let db = TestDb::new().await?;
        let pool = db.pool.clone();
        billing::setup(&pool).await?;
        let topic = unique("orders");
        oncely_testkit::create_topic(&topic, partitions).await?;
        let gw = FakeGateway::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        Ok(World { db, pool, topic, invoiced: unique("invoiced"), group: unique("billing"), gw })
    }

    /// Publishes orders `0..n` and runs the buggy handler over them until
    /// each is invoiced; the consumer goes on running.
    async fn run_buggy(&self, n: usize) -> Result<run::Running> {
        billing::publish_orders(&self.topic, 0, n).await?;
        let c = self.start_buggy()?;
        run::wait_count(&self.pool, "SELECT count(*) FROM public.invoice_log", n as i64).await?;
        Ok(c)
    }

    /// Starts the buggy live consumer over what the topic holds.
    fn start_buggy(&self) -> Result<run::Running> {
        Ok(run::start(billing::consumer(
            &self.group,
            &self.topic,
            self.pool.clone(),
            code(BUGGY_TAX_PERCENT, "v1", &self.invoiced),
            &self.gw.url(),
        )?))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tax_bug_is_rebuilt_with_zero_side_effects_and_swapped_in_under_load_exactly_once() -> Result<()> {
    let w = World::new(3).await?;

    // Two weeks with the bug.
    const N: usize = 300;
    let buggy = w.run_buggy(N).await?;
    let World { db, pool, topic, invoiced, group, gw } = w;
    wait_until(WAIT, "the buggy charges", || async { Ok(effects(&pool, &group, "done").await? >= N as i64) }).await?;
    buggy.stop().await?;
    let wrong =
        count(&pool, &format!("SELECT count(*) FROM invoices WHERE tax = (amount * {BUGGY_TAX_PERCENT} / 100)"))
            .await?;
    assert_eq!(wrong, N as i64, "the bug taxed every order wrongly");

    // The fix is deployed: the live consumer runs the fixed code from now on.
    let live =
        run::start(billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "v2", &invoiced), &gw.url())?);
    // New orders keep arriving during the whole rebuild and the swap.
    let load = Load::start(&topic, N);
    let target = "billing_v2";
    let rebuild_name = rebuild_consumer_name(&group, target);
    let rebuild = RunningRebuild::start(billing::projection().rebuild(
        billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "rebuild", &invoiced), &gw.url())?,
        target,
    ));
    wait_until(WAIT, "the rebuild to apply the history", || async {
        Ok(count(&pool, "SELECT count(*) FROM billing_v2.invoice_log").await.unwrap_or(0) >= N as i64)
    })
    .await?;
    wait_lag_at_most(&pool, target, 100).await?;

    // Validate: the rebuilt projection has every historical order with the
    // right tax; the live one still has the wrong ones.
    let rebuilt = billing::invoices(&pool, target).await?;
    for (order, amount, t) in rebuilt.iter().filter(|(o, _, _)| o[1..].parse::<usize>().is_ok_and(|n| n < N)) {
        assert_eq!(*t, billing::tax(*amount, TAX_PERCENT), "rebuilt order {order}");
    }
    let report = diff(&db, target, 5).await?;
    let inv = report.tables.iter().find(|t| t.table == "invoices").context("invoices in the diff")?;
    assert!(!inv.equal && !inv.only_live.is_empty(), "the diff shows the wrong taxes: {inv:?}");
    for row in &inv.only_live {
        let (amount, tax) = (row["amount"].as_i64().unwrap_or(-1), row["tax"].as_i64().unwrap_or(-1));
        assert_eq!(tax, billing::tax(amount, BUGGY_TAX_PERCENT), "a sampled live row is a buggy one: {row}");
    }

    // Swap under load, right after a burst the live consumer is applying.
    let s = session(&db).await?;
    load.burst().await;
    let preview = preview_swap(&s, &SwapRequest::new(target), Origin::cli()).await?;
    assert!(preview.refusals().is_empty(), "{:?}", preview.refusals());
    let done = preview.confirm(&s, None).await?.execute(&s).await?;
    assert!(done.exchanged.inbox_to_live >= N as u64);
    // The rebuild stops by itself once swapped in.
    tokio::time::timeout(Duration::from_secs(30), rebuild.join)
        .await
        .context("the swapped rebuild did not stop")???;

    // More orders after the swap, then the load stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = load.stop().await?;
    run::wait_count(&pool, "SELECT count(*) FROM public.invoice_log", total as i64).await?;
    wait_until(WAIT, "every charge", || async { Ok(effects(&pool, &group, "done").await? >= total as i64) }).await?;
    // Let anything that would be applied twice show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    live.stop().await?;

    // Every order exactly once, with the correct tax, in the live tables.
    billing::check_corrected(&pool, "public", total).await?;
    // The previous projection is kept for swap-back.
    assert_eq!(count(&pool, "SELECT count(*) FROM billing_v2.invoices WHERE applied_by = 'v1'").await?, N as i64);
    // Zero side effects from the rebuild: one charge call per order, all the
    // live consumer's, and the rebuild's intents all suppressed.
    let stats = gw.stats();
    assert_eq!((stats.charge_calls, stats.distinct_charges), (total as u64, total as u64), "{stats:?}");
    assert_eq!(effects(&pool, &group, "done").await?, total as i64);
    let suppressed = effects(&pool, &rebuild_name, "suppressed").await?;
    assert!(suppressed >= N as i64, "the rebuild recorded its effects as suppressed ({suppressed})");
    assert_eq!(
        count(
            &pool,
            &format!(
                "SELECT count(*) FROM oncely.effects WHERE consumer = '{rebuild_name}' AND status <> 'suppressed'"
            )
        )
        .await?,
        0
    );
    // Nothing published by the rebuild: one invoiced event per application by the live consumer.
    // (the buggy code published the first N, the fixed code each later one once).
    assert_eq!(count(&pool, "SELECT count(*) FROM oncely.outbox").await?, total as i64);
    // The swap is in the audit log.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM oncely.audit_log WHERE action = 'projection.swap' AND result = 'succeeded'")
            .await?,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_rebuild_is_refused_and_swap_back_restores_the_projection_and_position() -> Result<()> {
    let w = World::new(2).await?;

    let live = w.run_buggy(100).await?;
    let World { db, pool, topic, invoiced, group, gw } = w;
    let target = "billing_v3";
    let s = session(&db).await?;
    let rebuild = RunningRebuild::start(billing::projection().rebuild(
        billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "rebuild", &invoiced), &gw.url())?,
        target,
    ));
    wait_lag_at_most(&pool, target, 0).await?;
    rebuild.stop().await?;

    // The live consumer goes on; the stopped rebuild falls behind.
    billing::publish_orders(&topic, 100, 400).await?;
    run::wait_count(&pool, "SELECT count(*) FROM public.invoice_log", 400).await?;
    diff(&db, target, 3).await?;
    let req = SwapRequest { max_lag: 50, ..SwapRequest::new(target) };
    let preview = preview_swap(&s, &req, Origin::cli()).await?;
    assert!(preview.refusals().iter().any(|r| r.contains("lags 300 records")), "{:?}", preview.refusals());
    // And the diff, taken that far behind, compared little of it.
    assert!(
        preview
            .refusals()
            .iter()
            .any(|r| r.contains("ran while the rebuild lagged 300 records behind live (bound 50)")),
        "{:?}",
        preview.refusals()
    );
    let refused = preview.confirm(&s, None).await.expect_err("a lagging rebuild must not swap");
    assert!(matches!(refused, oncely::Error::Refused(_)), "{refused}");
    // Within the bound but not running: the paused live consumer waits for
    // it, then the swap is refused, and nothing changed.
    let req = SwapRequest { max_lag: 1000, catch_up_timeout: Duration::from_secs(2), ..SwapRequest::new(target) };
    let preview = preview_swap(&s, &req, Origin::cli()).await?;
    let err = preview.confirm(&s, None).await?.execute(&s).await.expect_err("refused after the catch-up timeout");
    assert!(err.to_string().contains("did not catch up"), "{err}");
    assert_eq!(count(&pool, "SELECT count(*) FROM public.invoices WHERE applied_by = 'v1'").await?, 400);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM oncely.audit_log WHERE action = 'projection.swap' AND result = 'refused'")
            .await?,
        2
    );

    // Run it again: it resumes, catches up, and swaps.
    let rebuild = RunningRebuild::start(billing::projection().rebuild(
        billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "rebuild", &invoiced), &gw.url())?,
        target,
    ));
    wait_lag_at_most(&pool, target, 0).await?;
    let live_before: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT topic, partition, next_offset FROM oncely.offsets WHERE consumer = $1 ORDER BY 1, 2")
            .bind(&group)
            .fetch_all(&pool)
            .await?;
    let old = billing::invoices(&pool, "public").await?;
    let preview = preview_swap(&s, &SwapRequest::new(target), Origin::cli()).await?;
    preview.confirm(&s, None).await?.execute(&s).await?;
    tokio::time::timeout(Duration::from_secs(30), rebuild.join)
        .await
        .context("the swapped rebuild did not stop")???;
    billing::check_corrected(&pool, "public", 400).await?;
    // The live consumer goes on after the swap.
    billing::publish_orders(&topic, 400, 450).await?;
    run::wait_count(&pool, "SELECT count(*) FROM public.invoice_log", 450).await?;

    // Swap back: the old projection and the position at the swap, exactly.
    live.stop().await?;
    let back = preview_swap_back(&s, "billing", Origin::cli()).await?;
    assert!(back.refusals().is_empty(), "{:?}", back.refusals());
    back.confirm(&s, None).await?.execute(&s).await?;
    assert_eq!(billing::invoices(&pool, "public").await?, old, "the old projection is back");
    let live_after: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT topic, partition, next_offset FROM oncely.offsets WHERE consumer = $1 ORDER BY 1, 2")
            .bind(&group)
            .fetch_all(&pool)
            .await?;
    assert_eq!(live_after, live_before, "the old position is back");
    // Restarted, the live consumer applies what came after the swap to the
    // old projection, once.
    let live =
        run::start(billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "v2", &invoiced), &gw.url())?);
    run::wait_count(&pool, "SELECT count(*) FROM public.invoice_log", 450).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    live.stop().await?;
    assert_eq!(count(&pool, "SELECT count(*) FROM public.invoice_log").await?, 450);
    assert_eq!(count(&pool, "SELECT count(DISTINCT order_id) FROM public.invoice_log").await?, 450);
    // And a second swap-back is refused: nothing is swapped in.
    assert!(preview_swap_back(&s, "billing", Origin::cli()).await.is_err());
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM oncely.audit_log WHERE action = 'projection.swap-back' AND result = 'succeeded'"
        )
        .await?,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_killed_with_sigkill_midway_resumes_to_the_same_result_as_an_uninterrupted_one() -> Result<()> {
    let w = World::new(2).await?;
    const N: usize = 600;
    let live = w.run_buggy(N).await?;
    let World { db, pool, topic, invoiced, group, gw } = w;
    live.stop().await?;

    // The rebuild in a process of its own, killed with SIGKILL midway.
    let envs = [("TARGET", "billing_k"), ("MAX_BATCH", "5")];
    let first = billing_process(&db, "rebuild", &group, &topic, &envs).await?;
    wait_until(WAIT, "the rebuild to be midway", || async {
        Ok(count(&pool, "SELECT count(*) FROM billing_k.invoice_log").await.unwrap_or(0) >= 100)
    })
    .await?;
    first.kill9().await?;
    let at_kill = count(&pool, "SELECT count(*) FROM billing_k.invoice_log").await?;
    assert!(at_kill < N as i64, "killed midway ({at_kill} of {N} applied)");
    // Restarted, it resumes.
    let second = billing_process(&db, "rebuild", &group, &topic, &envs).await?;
    wait_lag_at_most(&pool, "billing_k", 0).await?;
    second.terminate(Duration::from_secs(30)).await?;

    // The same rebuild, uninterrupted, in this process.
    let whole = RunningRebuild::start(billing::projection().rebuild(
        billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "rebuild", &invoiced), &gw.url())?,
        "billing_u",
    ));
    wait_lag_at_most(&pool, "billing_u", 0).await?;
    whole.stop().await?;

    billing::check_corrected(&pool, "billing_k", N).await?;
    billing::check_corrected(&pool, "billing_u", N).await?;
    assert_eq!(billing::invoices(&pool, "billing_k").await?, billing::invoices(&pool, "billing_u").await?);
    // The diff's checksum says so too: the same rows, written in another
    // order by another run, give the same checksum; the buggy live ones not.
    let invoices = |r: projection::DiffReport| r.tables.into_iter().find(|t| t.table == "invoices");
    let k = invoices(projection::compare(&pool, "billing_k", 0).await?).context("invoices")?;
    let u = invoices(projection::compare(&pool, "billing_u", 0).await?).context("invoices")?;
    assert_eq!((k.rebuilt_rows, &k.rebuilt_checksum), (u.rebuilt_rows, &u.rebuilt_checksum));
    assert_eq!((k.live_rows, &k.live_checksum), (u.live_rows, &u.live_checksum));
    assert!(!k.equal && k.live_checksum != k.rebuilt_checksum, "the buggy live taxes differ: {k:?}");
    let not_suppressed = count(
        &pool,
        &format!(
            "SELECT count(*) FROM oncely.effects WHERE consumer LIKE '{group}.rebuild.%' AND status <> 'suppressed'"
        ),
    )
    .await?;
    assert_eq!(not_suppressed, 0, "a rebuild's effects are all suppressed");
    Ok(())
}

/// Backends of this test's database waiting for a lock: a live batch held
/// back by the swap's fence.
async fn waiting_on_locks(pool: &PgPool) -> Result<i64> {
    count(pool, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_consumer_sigkilled_during_the_swap_loses_nothing_and_applies_nothing_twice() -> Result<()> {
    let w = World::new(2).await?;
    const N: usize = 300;
    let buggy = w.run_buggy(N).await?;
    let World { db, pool, topic, invoiced: _, group, gw } = w;
    wait_until(WAIT, "the buggy charges", || async { Ok(effects(&pool, &group, "done").await? >= N as i64) }).await?;
    buggy.stop().await?;

    // The fixed application as processes: the live consumer, and the
    // rebuild (which would charge through the same gateway if it called it).
    let gateway = gw.url();
    let envs = [("GATEWAY_URL", gateway.as_str()), ("TARGET", "billing_v2")];
    let live = billing_process(&db, "live", &group, &topic, &envs).await?;
    let load = Load::start(&topic, N);
    let rebuild = billing_process(&db, "rebuild", &group, &topic, &envs).await?;
    wait_lag_at_most(&pool, "billing_v2", 100).await?;
    diff(&db, "billing_v2", 5).await?;

    // Freeze the rebuild, so that the swap has to wait for it with the live
    // consumer paused behind its fence; a burst makes sure the live
    // consumer is ahead of it.
    rebuild.signal("-STOP")?;
    load.burst().await;
    wait_until(WAIT, "the live consumer ahead of the frozen rebuild", || async {
        Ok(projection::status(&pool, "billing_v2").await?.lag.behind > 0)
    })
    .await?;
    let s = session(&db).await?;
    let swap = tokio::spawn(async move {
        let req = SwapRequest { catch_up_timeout: Duration::from_secs(90), ..SwapRequest::new("billing_v2") };
        let preview = preview_swap(&s, &req, Origin::cli()).await?;
        anyhow::ensure!(preview.refusals().is_empty(), "{:?}", preview.refusals());
        Ok(preview.confirm(&s, None).await?.execute(&s).await?)
    });
    // The swap has started (its audit record is written first) and a live
    // batch waits behind its locks: now the live consumer dies.
    wait_until(WAIT, "a live batch waiting on the swap's fence", || async {
        let started =
            count(&pool, "SELECT count(*) FROM oncely.audit_log WHERE action = 'projection.swap'").await? == 1;
        Ok(started && waiting_on_locks(&pool).await? > 0)
    })
    .await?;
    assert!(!swap.is_finished(), "the swap waits for the frozen rebuild");
    live.kill9().await?;
    rebuild.signal("-CONT")?;
    let done = tokio::time::timeout(Duration::from_secs(120), swap).await.context("the swap did not finish")???;
    assert!(done.exchanged.inbox_to_live >= N as u64);

    // The fixed live consumer restarted; the orders go on, then stop.
    let live = billing_process(&db, "live", &group, &topic, &envs).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = load.stop().await?;
    // Every record of the topic behind the live position: nothing left
    // that could still be applied (once or twice).
    run::wait_offsets(&pool, &group, total as i64).await?;
    wait_until(WAIT, "every charge", || async { Ok(effects(&pool, &group, "done").await? >= total as i64) }).await?;
    live.terminate(Duration::from_secs(30)).await?;
    drop(rebuild);

    billing::check_corrected(&pool, "public", total).await?;
    // One charge per order, all the live consumer's: the rebuild called
    // nothing (its keys would be other keys), and the killed member's
    // in-flight calls were same-key retries at most.
    let stats = gw.stats();
    assert_eq!(stats.distinct_charges, total as u64, "{stats:?}");
    assert_eq!(effects(&pool, &group, "done").await?, total as i64);
    assert_eq!(count(&pool, "SELECT count(*) FROM oncely.outbox").await?, total as i64, "each invoice published once");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM oncely.audit_log WHERE action = 'projection.swap' AND result = 'succeeded'")
            .await?,
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuilds_from_a_time_and_from_an_offset_snapshot_start_there_and_leave_out_what_came_before() -> Result<()> {
    let w = World::new(2).await?;
    const HALF: usize = 100;
    // The first half, applied by the live consumer and committed to Kafka.
    let live = w.run_buggy(HALF).await?;
    let World { db, pool, topic, invoiced, group, gw } = w;
    let s = session(&db).await?;
    wait_until(WAIT, "the live group's offsets committed to Kafka", || async {
        let offs = s.current_offsets(&group).await?;
        Ok(offs.iter().filter_map(|o| o.offset).sum::<i64>() == HALF as i64)
    })
    .await?;
    let snap =
        s.snapshot_groups(Some(std::slice::from_ref(&group)), oncely::admin::snapshots::SnapshotReason::Manual).await?;
    let snapshot_id = snap.taken.first().context("a snapshot of the group")?.id;
    // A time after every record of the first half, before every one of the second.
    let t = chrono::Utc::now() + chrono::Duration::milliseconds(1);
    wait_until(WAIT, "the clock to pass the cut", || async { Ok(chrono::Utc::now() > t) }).await?;
    billing::publish_orders(&topic, HALF, 2 * HALF).await?;
    run::wait_count(&pool, "SELECT count(*) FROM public.invoice_log", 2 * HALF as i64).await?;

    let fixed = || billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "rebuild", &invoiced), &gw.url());
    let from_time = RunningRebuild::start(
        billing::projection().rebuild(fixed()?, "billing_t").from(projection::RebuildFrom::Time(t)),
    );
    let from_snapshot = RunningRebuild::start(
        billing::projection().rebuild(fixed()?, "billing_s").from(projection::RebuildFrom::Snapshot(snapshot_id)),
    );
    wait_lag_at_most(&pool, "billing_t", 0).await?;
    wait_lag_at_most(&pool, "billing_s", 0).await?;
    from_time.stop().await?;
    from_snapshot.stop().await?;
    live.stop().await?;

    // Both hold exactly the second half, with the fixed tax.
    let second: Vec<String> = {
        let mut v: Vec<String> = (HALF..2 * HALF).map(|n| format!("o{n}")).collect();
        v.sort();
        v
    };
    for target in ["billing_t", "billing_s"] {
        let rows = billing::invoices(&pool, target).await?;
        let ids: Vec<String> = rows.iter().map(|(o, _, _)| o.clone()).collect();
        assert_eq!(ids, second, "{target} holds the orders after the cut, and only those");
        for (order, amount, tax) in &rows {
            assert_eq!(*tax, billing::tax(*amount, TAX_PERCENT), "{target}: order {order}");
        }
        let row = projection::status(&pool, target).await?.rebuild;
        assert!(row.from_spec == t.to_rfc3339() || row.from_spec == format!("snapshot:{snapshot_id}"), "{row:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_records_in_the_history_are_dead_lettered_by_the_rebuild_without_blocking_it_or_the_swap() -> Result<()>
{
    use oncely::envelope::{CloudEventAttrs, H_ID};
    let w = World::new(2).await?;
    const N: usize = 100;
    billing::publish_orders(&w.topic, 0, N).await?;
    // Two good orders with odd headers, and three records no handler can take.
    let p = oncely::Publisher::new(oncely_testkit::bootstrap(), "/tests/orders")?;
    let headers = |extra: &[(&[u8], &[u8])], nul_id: bool| -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut h: Vec<(Vec<u8>, Vec<u8>)> = CloudEventAttrs::new_now("/tests/orders", "order")
            .to_headers()
            .into_iter()
            .map(|(k, mut v)| {
                if nul_id && k == H_ID {
                    v.extend_from_slice(b"\0tail");
                }
                (k.into_bytes(), v)
            })
            .collect();
        h.extend(extra.iter().map(|(k, v)| (k.to_vec(), v.to_vec())));
        h
    };
    let order = |n: usize| serde_json::to_vec(&billing::Order { order_id: format!("o{n}"), amount: 1000 + n as i64 });
    let bad_name: &[u8] = &[0xff, 0xfe, b'x'];
    let (a, b) = (format!("o{N}"), format!("o{}", N + 1));
    p.publish_raw(&w.topic, Some(a.as_bytes()), Some(&order(N)?), &headers(&[(bad_name, b"v")], false)).await?;
    p.publish_raw(&w.topic, Some(b.as_bytes()), Some(&order(N + 1)?), &headers(&[], true)).await?;
    p.publish_raw(&w.topic, Some(b"bad-1"), Some(b""), &headers(&[(bad_name, b"\0\xff")], false)).await?;
    p.publish_raw(&w.topic, Some(b"bad-2"), None, &headers(&[], false)).await?;
    p.publish_raw(&w.topic, Some(b"bad-3"), Some("x".repeat(600_000).as_bytes()), &headers(&[], false)).await?;
    const GOOD: usize = N + 2;
    let live = w.start_buggy()?;
    let World { db, pool, topic, invoiced, group, gw } = w;
    run::wait_offsets(&pool, &group, (GOOD + 3) as i64).await?;
    let live_dead =
        count(&pool, &format!("SELECT count(*) FROM oncely.dead_letters WHERE consumer = '{group}'")).await?;
    assert_eq!(live_dead, 3);

    let rebuild = RunningRebuild::start(billing::projection().rebuild(
        billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "rebuild", &invoiced), &gw.url())?,
        "billing_h",
    ));
    wait_lag_at_most(&pool, "billing_h", 0).await?;
    let st = projection::status(&pool, "billing_h").await?;
    assert_eq!(st.dead_letters, 3, "the rebuild dead-letters the same three records, in its own namespace");
    assert_eq!(st.parked, 0);
    diff(&db, "billing_h", 3).await?;
    let s = session(&db).await?;
    let preview = preview_swap(&s, &SwapRequest::new("billing_h"), Origin::cli()).await?;
    assert!(preview.refusals().is_empty(), "{:?}", preview.refusals());
    preview.confirm(&s, None).await?.execute(&s).await?;
    tokio::time::timeout(Duration::from_secs(30), rebuild.join)
        .await
        .context("the swapped rebuild did not stop")???;
    live.stop().await?;

    billing::check_corrected(&pool, "public", GOOD).await?;
    let nul = count(&pool, "SELECT count(*) FROM public.invoice_log WHERE event_id LIKE '%\\u{0}tail'").await?;
    assert_eq!(nul, 1, "the NUL-bearing identity is applied once, stored escaped");
    assert_eq!(
        count(&pool, &format!("SELECT count(*) FROM oncely.dead_letters WHERE consumer = '{group}'")).await?,
        live_dead,
        "the live consumer's dead letters are untouched"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_that_publishes_to_shadow_topics_writes_what_the_fixed_code_publishes_there_and_nothing_live(
) -> Result<()> {
    let w = World::new(2).await?;
    const N: usize = 80;
    let live = w.run_buggy(N).await?;
    let World { db: _db, pool, topic, invoiced, group, gw } = w;
    wait_until(WAIT, "the buggy charges", || async { Ok(effects(&pool, &group, "done").await? >= N as i64) }).await?;
    live.stop().await?;
    let rebuild = RunningRebuild::start(billing::projection().publish_to_shadow_topics().rebuild(
        billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "rebuild", &invoiced), &gw.url())?,
        "billing_sh",
    ));
    wait_lag_at_most(&pool, "billing_sh", 0).await?;
    rebuild.stop().await?;

    let rows = |t: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (Vec<u8>, Vec<u8>)>("SELECT key, payload FROM oncely.outbox WHERE topic = $1")
                .bind(t)
                .fetch_all(&pool)
                .await
        }
    };
    let shadow = rows(format!("{invoiced}.rebuild.billing_sh")).await?;
    let live_rows = rows(invoiced.clone()).await?;
    assert_eq!(live_rows.len(), N, "the live topic has the buggy run's events only");
    assert_eq!(shadow.len(), N, "one shadow event per order");
    for (key, payload) in &shadow {
        let v: serde_json::Value = serde_json::from_slice(payload)?;
        let n: i64 = String::from_utf8_lossy(key)[1..].parse()?;
        assert_eq!(v["tax"].as_i64(), Some(billing::tax(1000 + n, TAX_PERCENT)), "shadow event {v}");
    }
    // Effects stay suppressed: no charge from the rebuild.
    assert_eq!(gw.stats().charge_calls, N as u64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_run_of_a_running_target_is_refused_and_takes_over_once_the_first_process_dies() -> Result<()> {
    let w = World::new(1).await?;
    const N: usize = 50;
    let live = w.run_buggy(N).await?;
    let World { db, pool, topic, invoiced, group, gw } = w;
    // The first run, in a process of its own.
    let envs = [("TARGET", "billing_x"), ("MAX_BATCH", "5")];
    let first = billing_process(&db, "rebuild", &group, &topic, &envs).await?;
    wait_until(WAIT, "the first run to start", || async { Ok(projection::status(&pool, "billing_x").await.is_ok()) })
        .await?;
    // A second run of the same target, here: refused while the first holds it.
    let fixed = || billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "rebuild", &invoiced), &gw.url());
    let second = billing::projection().rebuild(fixed()?, "billing_x").run(CancellationToken::new()).await;
    match second {
        Err(oncely::Error::Refused(r)) => assert!(r.contains("another process"), "{r}"),
        other => anyhow::bail!("a second run of a running target was not refused: {other:?}"),
    }
    // The first dies; a new run takes the target over and finishes it.
    first.kill9().await?;
    wait_until(WAIT, "the dead process's lock released by PostgreSQL", || async {
        let held = count(
            &pool,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 731058204 AND objsubid = 2
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await?;
        Ok(held == 0)
    })
    .await?;
    let again = RunningRebuild::start(billing::projection().rebuild(fixed()?, "billing_x"));
    wait_lag_at_most(&pool, "billing_x", 0).await?;
    again.stop().await?;
    live.stop().await?;
    billing::check_corrected(&pool, "billing_x", N).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_only_one_side_has_refuse_the_swap_unless_overridden() -> Result<()> {
    let w = World::new(2).await?;
    const N: usize = 40;
    billing::publish_orders(&w.topic, 0, N).await?;
    // The live code dead-letters o3 (so o3 was never charged); the fixed
    // code has a bug of its own and dead-letters o5, which live applied.
    let live_code = Billing { reject_orders: vec!["o3".into()], ..code(BUGGY_TAX_PERCENT, "v1", &w.invoiced) };
    let live = run::start(billing::consumer(&w.group, &w.topic, w.pool.clone(), live_code, &w.gw.url())?);
    run::wait_offsets(&w.pool, &w.group, N as i64).await?;
    let World { db, pool, topic, invoiced, group, gw } = w;
    let fixed = Billing { reject_orders: vec!["o5".into()], ..code(TAX_PERCENT, "rebuild", &invoiced) };
    let rebuild = RunningRebuild::start(
        billing::projection().rebuild(billing::consumer(&group, &topic, pool.clone(), fixed, &gw.url())?, "billing_d"),
    );
    wait_lag_at_most(&pool, "billing_d", 0).await?;
    diff(&db, "billing_d", 1).await?;

    let s = session(&db).await?;
    let preview = preview_swap(&s, &SwapRequest::new("billing_d"), Origin::cli()).await?;
    assert_eq!((preview.unsettled.dead_live_only, preview.unsettled.dead_rebuild_only), (1, 1));
    let refusals = preview.refusals().join("; ");
    assert!(refusals.contains("1 record(s) the live consumer dead-lettered were applied by the rebuild"), "{refusals}");
    assert!(refusals.contains("1 record(s) the rebuild dead-lettered were applied by the live consumer"), "{refusals}");
    assert!(preview.confirm(&s, None).await.is_err(), "a refused swap cannot be confirmed");
    let live_rows = billing::invoices(&pool, "public").await?;
    assert!(live_rows.iter().all(|(o, _, _)| o != "o3") && live_rows.len() == N - 1, "nothing swapped");

    // With the override the swap goes ahead, and says what it overrode.
    let req = SwapRequest { allow_dead_letter_mismatch: true, ..SwapRequest::new("billing_d") };
    let preview = preview_swap(&s, &req, Origin::cli()).await?;
    assert!(preview.refusals().is_empty(), "{:?}", preview.refusals());
    assert!(
        preview.overrides.iter().any(|o| o.contains("1 dead letter(s) of the live consumer")),
        "{:?}",
        preview.overrides
    );
    preview.confirm(&s, None).await?.execute(&s).await?;
    tokio::time::timeout(Duration::from_secs(30), rebuild.join)
        .await
        .context("the swapped rebuild did not stop")???;
    live.stop().await?;
    let swapped: Vec<String> = billing::invoices(&pool, "public").await?.into_iter().map(|(o, _, _)| o).collect();
    assert!(swapped.contains(&"o3".to_owned()) && !swapped.contains(&"o5".to_owned()), "{swapped:?}");
    // The dead letters went with their tables: the live consumer's list is
    // what the live tables lack now.
    let dead_keys = |consumer: String| {
        let pool = pool.clone();
        async move {
            let keys: Vec<String> = sqlx::query_scalar(
                "SELECT convert_from(key, 'UTF8') FROM oncely.dead_letters WHERE consumer = $1 ORDER BY 1",
            )
            .bind(consumer)
            .fetch_all(&pool)
            .await?;
            Ok::<_, anyhow::Error>(keys)
        }
    };
    assert_eq!(dead_keys(group.clone()).await?, ["o5"]);
    assert_eq!(dead_keys(rebuild_consumer_name(&group, "billing_d")).await?, ["o3"]);
    Ok(())
}
