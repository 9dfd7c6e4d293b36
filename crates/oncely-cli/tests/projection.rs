//! `oncely projection` run as the built binary against the real broker and
//! database, with the application (the billing consumer of the test kit,
//! fixed, serving its projection) in this process: the operator asks for the
//! rebuild on the command line, the application runs it, the operator follows,
//! compares, swaps and swaps back.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result};
use oncely_testkit::billing::{self, Billing, BUGGY_TAX_PERCENT, TAX_PERCENT};
use oncely_testkit::gateway::FakeGateway;
use oncely_testkit::{self as kit, run};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(120);

fn oncely(db: &kit::TestDb, extra_env: &[(&str, &str)], args: &[&str]) -> Result<Output> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_oncely"));
    cmd.args(args)
        .env_remove("ONCELY_CONFIG")
        .env("ONCELY_BOOTSTRAP_SERVERS", kit::bootstrap())
        .env("ONCELY_DATABASE_URL", &db.url)
        .current_dir(std::env::temp_dir())
        .stdin(std::process::Stdio::null());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    Ok(cmd.output()?)
}

fn json(o: &Output) -> Result<Value> {
    serde_json::from_slice(&o.stdout).with_context(|| format!("not JSON: {o:?}"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn code(tax_percent: i64, tag: &str, invoiced: &str) -> Billing {
    Billing { tax_percent, tag: tag.into(), invoiced_topic: invoiced.into(), reject_orders: Vec::new() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_rebuilds_diffs_swaps_and_swaps_back_from_the_command_line_and_every_step_is_audited() -> Result<()>
{
    kit::init_tracing();
    let db = kit::TestDb::new().await?;
    let pool = db.pool.clone();
    billing::setup(&pool).await?;
    let (topic, invoiced, group) = (kit::unique("orders"), kit::unique("invoiced"), kit::unique("billing"));
    kit::create_topic(&topic, 2).await?;
    let gw = FakeGateway::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;

    // The bug's weeks.
    const N: usize = 200;
    billing::publish_orders(&topic, 0, N).await?;
    let buggy = run::start(billing::consumer(
        &group,
        &topic,
        pool.clone(),
        code(BUGGY_TAX_PERCENT, "v1", &invoiced),
        &gw.url(),
    )?);
    run::wait_count(&pool, "SELECT count(*) FROM public.invoice_log", N as i64).await?;
    // Every charge of the buggy weeks made (they run after the commit), so
    // that the gateway's count before the rebuild is final.
    run::wait_count(
        &pool,
        &format!("SELECT count(*) FROM oncely.effects WHERE consumer = '{group}' AND status = 'done'"),
        N as i64,
    )
    .await?;
    buggy.stop().await?;

    // Nothing to show or swap yet: refusals, exit code 2.
    let none = oncely(&db, &[], &["projection", "swap", "billing_v2"])?;
    assert_eq!(none.status.code(), Some(2), "{}", text(&none));
    let bad = oncely(&db, &[], &["projection", "rebuild", "--consumer", &group, "--into", "public"])?;
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("reserved or live schema"), "{}", text(&bad));
    let unknown = oncely(&db, &[], &["projection", "rebuild", "--consumer", "nobody", "--into", "billing_v2"])?;
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    assert!(text(&unknown).contains("never run"), "{}", text(&unknown));

    // On a protected environment the request needs the typed confirmation.
    let cluster = oncely::admin::KafkaAdmin::new(kit::bootstrap(), &[])?.describe_cluster().await?.cluster_id;
    let protected = [("ONCELY_PROTECTED", "true"), ("ONCELY_ENV", "prod"), ("ONCELY_CLUSTER_ID", cluster.as_str())];
    let args = ["projection", "rebuild", "--consumer", group.as_str(), "--into", "billing_v2", "--from", "earliest"];
    let unconfirmed = oncely(&db, &protected, &args)?;
    assert_eq!(unconfirmed.status.code(), Some(2), "{}", text(&unconfirmed));
    assert!(text(&unconfirmed).contains("REBUILD prod billing_v2"), "{}", text(&unconfirmed));

    // The request, before the application runs: recorded, waiting.
    let mut confirmed: Vec<&str> = vec!["-o", "json"];
    confirmed.extend(args);
    confirmed.extend(["--confirm", "REBUILD prod billing_v2"]);
    let requested = oncely(&db, &protected, &confirmed)?;
    assert!(requested.status.success(), "{}", text(&requested));
    assert!(json(&requested)?["audit_id"].as_i64().is_some());
    let waiting = oncely(&db, &[], &["projection", "status", "billing_v2"])?;
    assert!(waiting.status.success() && text(&waiting).contains("not started yet"), "{}", text(&waiting));
    let twice = oncely(&db, &protected, &confirmed)?;
    assert_eq!(twice.status.code(), Some(2), "a second request for the target is refused: {}", text(&twice));
    // A request nobody started yet can be withdrawn.
    let other = oncely(&db, &[], &["projection", "rebuild", "--consumer", &group, "--into", "billing_w"])?;
    assert!(other.status.success(), "{}", text(&other));
    let withdrawn = oncely(&db, &[], &["projection", "drop", "billing_w", "--execute"])?;
    assert!(withdrawn.status.success() && text(&withdrawn).contains("withdrawn"), "{}", text(&withdrawn));
    let gone = oncely(&db, &[], &["projection", "status", "billing_w"])?;
    assert_eq!(gone.status.code(), Some(2), "{}", text(&gone));

    // The fixed application is deployed: the live consumer, serving its projection.
    let app = CancellationToken::new();
    let live = {
        let c = billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "v2", &invoiced), &gw.url())?;
        tokio::spawn(c.run(app.clone()))
    };
    let serve = {
        let (group, topic, pool, invoiced, url) =
            (group.clone(), topic.clone(), pool.clone(), invoiced.clone(), gw.url());
        billing::projection().serve(
            move || {
                billing::consumer(&group, &topic, pool.clone(), code(TAX_PERCENT, "rebuild", &invoiced), &url)
                    .map_err(|e| oncely::Error::Config(e.to_string()))
            },
            app.clone(),
        )
    };
    let serve = tokio::spawn(serve);
    let calls_before = gw.stats().charge_calls;

    kit::wait_until(WAIT, "the served rebuild to catch up", || async {
        let o = oncely(&db, &[], &["-o", "json", "projection", "status", "billing_v2", "--rate-window", "0"])?;
        let v = json(&o).unwrap_or_default();
        Ok(v["status"]["lag"]["behind"] == 0 && v["progress"]["fraction"] == 1.0)
    })
    .await?;
    let status = oncely(&db, &[], &["projection", "status", "billing_v2", "--rate-window", "0.5"])?;
    assert!(status.status.success(), "{}", text(&status));
    assert!(text(&status).contains("100.0%") && text(&status).contains("suppressed"), "{}", text(&status));
    let st = json(&oncely(&db, &[], &["-o", "json", "projection", "status", "billing_v2", "--rate-window", "0"])?)?;
    let effects = st["status"]["effects"].as_array().context("effects")?;
    assert!(
        effects.iter().all(|e| e[0] == "suppressed") && !effects.is_empty(),
        "the rebuild's intents are all suppressed: {effects:?}"
    );

    // A swap before a diff is refused, in the preview and on --execute.
    let early = oncely(&db, &[], &["projection", "swap", "billing_v2", "--execute"])?;
    assert_eq!(early.status.code(), Some(2), "{}", text(&early));
    assert!(text(&early).contains("diff has not been run"), "{}", text(&early));

    let diff = oncely(&db, &[], &["-o", "json", "projection", "diff", "billing_v2", "--sample", "3"])?;
    assert!(diff.status.success(), "{}", text(&diff));
    let d = json(&diff)?;
    assert_eq!(d["diff"]["equal"], false, "the bug's rows differ: {d}");
    let only_live = d["diff"]["tables"][0]["only_live"].as_array().context("sample")?;
    assert_eq!(only_live.len(), 3);
    for row in only_live {
        let (amount, tax) = (row["amount"].as_i64().unwrap_or(-1), row["tax"].as_i64().unwrap_or(-1));
        assert_eq!(tax, billing::tax(amount, BUGGY_TAX_PERCENT), "a sampled live row is a buggy one: {row}");
    }

    let preview = oncely(&db, &[], &["projection", "swap", "billing_v2"])?;
    assert!(preview.status.success() && text(&preview).contains("PREVIEW"), "{}", text(&preview));
    assert_eq!(billing::invoices(&pool, "public").await?[0].2, billing::tax(1000, BUGGY_TAX_PERCENT), "unchanged");
    // On a protected environment the swap needs its typed confirmation:
    // none, or the text of another action, is refused and changes nothing.
    for wrong in [None, Some("REBUILD prod billing_v2")] {
        let mut args = vec!["projection", "swap", "billing_v2", "--execute"];
        args.extend(wrong.iter().flat_map(|w| ["--confirm", *w]));
        let refused = oncely(&db, &protected, &args)?;
        assert_eq!(refused.status.code(), Some(2), "{wrong:?}: {}", text(&refused));
        assert!(text(&refused).contains("SWAP prod billing_v2"), "{}", text(&refused));
        assert_eq!(billing::invoices(&pool, "public").await?[0].2, billing::tax(1000, BUGGY_TAX_PERCENT));
    }
    let swapped = oncely(
        &db,
        &protected,
        &["-o", "json", "projection", "swap", "billing_v2", "--execute", "--confirm", "SWAP prod billing_v2"],
    )?;
    assert!(swapped.status.success(), "{}", text(&swapped));
    billing::check_corrected(&pool, "public", N).await?;
    assert_eq!(gw.stats().charge_calls, calls_before, "the rebuild called nobody");

    // New orders after the swap: applied once by the fixed live consumer.
    billing::publish_orders(&topic, N, N + 20).await?;
    run::wait_offsets(&pool, &group, (N + 20) as i64).await?;
    billing::check_corrected(&pool, "public", N + 20).await?;

    // The previous projection is kept for swap-back: it cannot be dropped yet.
    let kept = oncely(&db, &[], &["projection", "drop", "billing_v2", "--execute"])?;
    assert_eq!(kept.status.code(), Some(2), "{}", text(&kept));
    assert!(text(&kept).contains("kept for swap-back"), "{}", text(&kept));

    // Back out: the previous projection and its position return (on a
    // protected environment, with the swap-back's own confirmation).
    let name = billing::projection().name().to_owned();
    let unconfirmed = oncely(&db, &protected, &["projection", "swap-back", &name, "--execute"])?;
    assert_eq!(unconfirmed.status.code(), Some(2), "{}", text(&unconfirmed));
    assert!(text(&unconfirmed).contains(&format!("SWAP-BACK prod {name}")), "{}", text(&unconfirmed));
    billing::check_corrected(&pool, "public", N + 20).await?;
    let back = oncely(&db, &[], &["projection", "swap-back", &name, "--execute"])?;
    assert!(back.status.success(), "{}", text(&back));
    let old = billing::invoices(&pool, "public").await?;
    let historical = |o: &str| o[1..].parse::<usize>().is_ok_and(|n| n < N);
    let back_rows: Vec<_> = old.iter().filter(|(o, _, _)| historical(o)).collect();
    assert_eq!(back_rows.len(), N);
    assert!(back_rows.iter().all(|(_, a, t)| *t == billing::tax(*a, BUGGY_TAX_PERCENT)), "the buggy rows are back");

    // The restored position is the one of the swap: the live consumer
    // applies the orders that came after it again, to the old projection.
    run::wait_offsets(&pool, &group, (N + 20) as i64).await?;

    // A swap-back clears the diff: swapping again needs a new one, or the
    // override, which the audit log records.
    let again = oncely(&db, &[], &["projection", "swap", "billing_v2", "--execute"])?;
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains("diff has not been run"), "{}", text(&again));
    let overridden =
        oncely(&db, &[], &["-o", "json", "projection", "swap", "billing_v2", "--execute", "--allow-without-diff"])?;
    assert!(overridden.status.success(), "{}", text(&overridden));
    billing::check_corrected(&pool, "public", N + 20).await?;
    let audit = json(&oncely(&db, &[], &["-o", "json", "audit"])?)?;
    let with_override = audit.as_array().context("audit rows")?.iter().any(|r| {
        r["action"] == "projection.swap"
            && r["result"] == "succeeded"
            && r.to_string().contains("swapped without a diff since the last swap")
    });
    assert!(with_override, "the override is in the audit log: {audit}");
    let back = oncely(&db, &[], &["projection", "swap-back", &name, "--execute"])?;
    assert!(back.status.success(), "{}", text(&back));

    // After the swap-back the target is a rebuild again (served again);
    // abandoning it drops its schema and namespace and stops it, and the
    // live consumer goes on untouched.
    let dropped = oncely(&db, &[], &["projection", "drop", "billing_v2", "--execute"])?;
    assert!(dropped.status.success(), "{}", text(&dropped));
    let schema: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'billing_v2')")
        .fetch_one(&pool)
        .await?;
    assert!(!schema, "the schema is dropped");
    let rebuild_consumer = oncely::projection::rebuild_consumer_name(&group, "billing_v2");
    for table in ["offsets", "entity_versions", "effects"] {
        let left =
            kit::count(&pool, &format!("SELECT count(*) FROM oncely.{table} WHERE consumer = '{rebuild_consumer}'"))
                .await?;
        assert_eq!(left, 0, "oncely.{table} rows of the rebuild are gone");
    }
    billing::publish_orders(&topic, N + 20, N + 30).await?;
    run::wait_offsets(&pool, &group, (N + 30) as i64).await?;
    assert_eq!(kit::count(&pool, "SELECT count(*) FROM public.invoice_log").await?, (N + 30) as i64);

    app.cancel();
    live.await??;
    serve.await??;

    let audit = json(&oncely(&db, &[], &["-o", "json", "audit"])?)?;
    let actions: Vec<(String, String)> = audit
        .as_array()
        .context("audit rows")?
        .iter()
        .map(|r| (r["action"].as_str().unwrap_or("").to_owned(), r["result"].as_str().unwrap_or("").to_owned()))
        .collect();
    for want in [
        ("projection.rebuild", "refused"),
        ("projection.rebuild", "succeeded"),
        ("projection.diff", "succeeded"),
        ("projection.swap", "refused"),
        ("projection.swap", "succeeded"),
        ("projection.swap-back", "succeeded"),
        ("projection.drop", "refused"),
        ("projection.drop", "succeeded"),
    ] {
        assert!(actions.iter().any(|(a, r)| a == want.0 && r == want.1), "audit has {want:?}: {actions:?}");
    }
    Ok(())
}
