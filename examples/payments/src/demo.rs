//! `payments-demo`: the guided demonstration (run by `scripts/demo`). Starts
//! the reference application (the `payments` binary next to this one) against
//! the services of `scripts/services`, each service its own process under the
//! test kit's [`supervisor`], and walks through four parts, checking every
//! expectation; the operator's steps run the `oncely` binary next to this one:
//!
//! 1. **The practical**: one order is charged once; the same `OrderCreated`
//!    published again is skipped; the payment-service killed (SIGKILL) after
//!    the gateway charged and before it recorded the answer does not charge
//!    twice; `OrderCreated` then `OrderConfirmed` are applied in that order.
//! 2. **The incident**: payments flow, then Kafka's own
//!    `kafka-consumer-groups --reset-offsets --to-earliest --execute` rewinds
//!    both webhook dispatchers; the fake merchants count the duplicates of the
//!    naive dispatcher and of oncely's.
//! 3. **The guard**: `oncely offsets reset` on a protected environment shows
//!    the preview and refuses without the typed confirmation; an executed
//!    reset is undone with `oncely offsets undo`.
//! 4. **The rebuild**: a tax bug fixed with `oncely projection rebuild`,
//!    `diff` and `swap` under load, with no card charged again.
//!
//! Everything it creates is fresh (a database, topics and groups named after a
//! random run id) and removed at the end, so it can run twice in a row.
//! Exits 1 if any expectation fails. With `--json` the last line is one JSON
//! object with the results.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use oncely::admin::KafkaAdmin;
use oncely::kafka::admin::OffsetSpec;
use oncely_testkit::supervisor::{self, create_topics, redact, with_database, Procs};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Partitions of the demo's topics.
const PARTITIONS: i32 = 4;
/// Orders created and confirmed to show per-key order.
const ORDERED_PAIRS: usize = 20;
/// Concurrent HTTP clients posting the incident's orders.
const CLIENTS: usize = 16;
/// How long a service may take to print `READY`.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a step that waits for the pipeline may take (plus per order).
const STEP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a stopped service may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// The tax rate the payment-service should record (part 4)...
const TAX_PERCENT: i64 = 20;
/// ...and the one its bug records until the fix is deployed.
const BUGGY_TAX_PERCENT: i64 = 2;
/// The schema part 4 rebuilds the payments projection into.
const REBUILD_TARGET: &str = "payments_v2";

/// `payments-demo`
#[derive(Debug, Parser)]
#[command(name = "payments-demo", about = "oncely's guided demonstration on the payments pipeline")]
pub struct DemoArgs {
    /// Print one JSON object with the results as the last line.
    #[arg(long)]
    pub json: bool,
    /// Orders (so payments and webhooks) in the incident.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub payments: u32,
    /// Kafka bootstrap servers.
    #[arg(long, env = "ONCELY_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// PostgreSQL URL of a database on the server to use; the demo creates its own database beside it.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://oncely:oncely@127.0.0.1:5432/oncely")]
    pub database_url: String,
    /// The reference application's binary (default: `payments` next to this binary).
    #[arg(long, env = "ONCELY_PAYMENTS_BIN", value_name = "FILE")]
    pub payments_bin: Option<PathBuf>,
    /// The operator command line (default: `oncely` next to this binary).
    #[arg(long, env = "ONCELY_BIN", value_name = "FILE")]
    pub oncely_bin: Option<PathBuf>,
    /// Runs Kafka's own tools (default: `ONCELY_KAFKA_TOOL`, else `scripts/kafka-tool` of this checkout).
    #[arg(long, env = "ONCELY_KAFKA_TOOL", value_name = "FILE")]
    pub kafka_tool: Option<PathBuf>,
    /// Keep the database, topics, groups and logs afterwards (to look at them).
    #[arg(long)]
    pub keep: bool,
}

/// One expectation and whether it held.
#[derive(Debug, Clone, Serialize)]
struct Check {
    part: u8,
    name: String,
    ok: bool,
    detail: String,
}

/// What the fake gateway / merchant counted (its `GET /stats`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
struct Stats {
    charge_calls: u64,
    distinct_charges: u64,
    webhook_calls: u64,
    distinct_webhooks: u64,
    duplicate_webhook_keys: u64,
}

impl Stats {
    /// Webhook deliveries beyond the first per key.
    fn duplicate_webhooks(&self) -> u64 {
        self.webhook_calls.saturating_sub(self.distinct_webhooks)
    }
}

/// The results, printed as the final table and as JSON.
#[derive(Debug, Default, Serialize)]
struct Report {
    ok: bool,
    run_id: String,
    orders: u64,
    payments: u64,
    gateway_calls: u64,
    distinct_charges: u64,
    duplicate_charges: u64,
    naive_webhooks: u64,
    naive_duplicate_webhooks: u64,
    oncely_webhooks: u64,
    oncely_duplicate_webhooks: u64,
    webhooks_before_rewind: u64,
    naive_redelivered: u64,
    oncely_redelivered: u64,
    oncely_rewinds_detected: u64,
    oncely_duplicates_dropped: u64,
    guard_preview_shown: bool,
    guard_refused: bool,
    guard_executed: bool,
    undo_restored: bool,
    /// Part 4: calls, publishes and effects that came from the rebuild (null: not reached).
    rebuild_side_effects: Option<u64>,
    /// Part 4: every payment has the correct tax after the swap.
    rebuild_corrected: bool,
    /// Part 4: orders without their payment after the swap (null: not reached).
    swap_lost: Option<u64>,
    /// Part 4: orders applied twice across the swap (null: not reached).
    swap_duplicates: Option<u64>,
    checks: Vec<Check>,
    seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Runs the demo.
/// Runs the demo; exits 1 if an expectation failed.
pub async fn run(args: &DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let out = Out;
    let mut report = Report::default();
    let mut demo = match Demo::setup(args, &out).await {
        Ok(d) => d,
        Err(e) => {
            out.line(&format!("\nThe demo could not start: {e:#}"));
            report.error = Some(format!("{e:#}"));
            report.seconds = started.elapsed().as_secs_f64();
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            }
            return Ok(ExitCode::FAILURE);
        }
    };
    report.run_id = demo.id.clone();
    let walked = tokio::select! {
        r = demo.walk(&out, &mut report) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(e) = &walked {
        out.line(&format!("\n  ✗ stopped: {e:#}"));
        report.error = Some(format!("{e:#}"));
        for (name, log) in demo.procs.logs() {
            out.line(&format!("    log of {name}: {}", log.display()));
        }
    }
    let failed = walked.is_err() || report.checks.iter().any(|c| !c.ok);
    demo.teardown(&out, failed).await;
    report.ok = !failed && !report.checks.is_empty();
    report.seconds = started.elapsed().as_secs_f64();
    print_summary(&out, &report);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Progress output: human lines on stdout, flushed so they show as they
/// happen (also with `--json`, whose object is the last line).
#[derive(Debug)]
struct Out;

impl Out {
    fn line(&self, s: &str) {
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    }

    fn check(&self, report: &mut Report, part: u8, name: &str, ok: bool, detail: String) {
        self.line(&format!("  {} {name}: {detail}", if ok { "✓" } else { "✗" }));
        report.checks.push(Check { part, name: name.into(), ok, detail });
    }
}

/// Names of everything the run creates.
#[derive(Debug, Clone)]
struct Names {
    database: String,
    orders: String,
    payments: String,
    payment_group: String,
    webhook_group: String,
    naive_group: String,
}

impl Names {
    fn new(id: &str) -> Self {
        let p = format!("oncely-demo-{id}");
        Names {
            database: format!("oncely_demo_{id}"),
            orders: format!("{p}-orders"),
            payments: format!("{p}-payments"),
            payment_group: format!("{p}-payment-service"),
            webhook_group: format!("{p}-webhook-dispatcher"),
            naive_group: format!("{p}-naive-dispatcher"),
        }
    }

    fn prefix(&self) -> String {
        self.orders.trim_end_matches("-orders").to_owned()
    }
}

/// The demo's state.
struct Demo {
    id: String,
    args: DemoArgsOwned,
    names: Names,
    dir: PathBuf,
    db_url: String,
    pool: PgPool,
    admin: KafkaAdmin,
    kafka: AdminClient<DefaultClientContext>,
    http: reqwest::Client,
    procs: Procs,
    created_topics: bool,
}

impl std::fmt::Debug for Demo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Demo").field("id", &self.id).field("names", &self.names).finish_non_exhaustive()
    }
}

/// The arguments the walk needs after setup.
#[derive(Debug, Clone)]
struct DemoArgsOwned {
    payments: u32,
    bootstrap: String,
    admin_db_url: String,
    kafka_tool: PathBuf,
    oncely_bin: PathBuf,
    keep: bool,
}

impl Demo {
    async fn setup(args: &DemoArgs, out: &Out) -> Result<Demo> {
        let id = format!("{:08x}", fastrand::u32(..));
        let names = Names::new(&id);
        out.line("oncely demo: effectively-once Kafka + PostgreSQL, shown on a payments pipeline");
        let bin = payments_bin(args)?;
        let kafka_tool = kafka_tool(args)?;
        let oncely_bin = oncely_bin(args)?;

        // The services.
        let admin = KafkaAdmin::new(&args.bootstrap_servers, &[])
            .map_err(anyhow::Error::from)?
            .request_timeout(Duration::from_secs(10));
        let cluster = admin.describe_cluster().await.with_context(|| {
            format!("Kafka at {} is not reachable (start it with scripts/services up)", args.bootstrap_servers)
        })?;
        let mut conn = tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&args.database_url))
            .await
            .map_err(|_| anyhow::anyhow!("connecting to PostgreSQL timed out"))?
            .with_context(|| {
                format!(
                    "PostgreSQL at {} is not reachable (start it with scripts/services up)",
                    redact(&args.database_url)
                )
            })?;
        out.line(&format!(
            "  services: Kafka {} (cluster {}), PostgreSQL {}",
            args.bootstrap_servers,
            cluster.cluster_id,
            redact(&args.database_url)
        ));

        let kafka: AdminClient<DefaultClientContext> =
            oncely::kafka::KafkaConnection::new(&args.bootstrap_servers).client_config()?.create()?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;

        // What the run creates: a directory for the logs, a database.
        let dir = std::env::temp_dir().join(format!("oncely-demo-{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let created = sqlx::query(&format!("CREATE DATABASE \"{}\"", names.database))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {}", names.database));
        let _ = conn.close().await;
        if let Err(e) = created {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let db_url = with_database(&args.database_url, &names.database);
        let owned = DemoArgsOwned {
            payments: args.payments,
            bootstrap: args.bootstrap_servers.clone(),
            admin_db_url: args.database_url.clone(),
            kafka_tool,
            oncely_bin,
            keep: args.keep,
        };
        let common = vec![
            "--bootstrap-servers".into(),
            args.bootstrap_servers.clone(),
            "--database-url".into(),
            db_url.clone(),
            "--orders-topic".into(),
            names.orders.clone(),
            "--payments-topic".into(),
            names.payments.clone(),
        ];
        let log_filter = std::env::var("ONCELY_DEMO_LOG").unwrap_or_else(|_| "warn,oncely=info,payments=info".into());
        let procs = Procs::new(bin, common, dir.clone(), &log_filter);
        let pool = match oncely::store::connect(&db_url, 4).await {
            Ok(p) => p,
            Err(e) => {
                let _ = supervisor::drop_database(&args.database_url, &names.database).await;
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).context("connecting to the demo's database");
            }
        };
        let mut demo =
            Demo { id, args: owned, names, dir, db_url, pool, admin, kafka, http, procs, created_topics: false };
        if let Err(e) = demo.start_app(out).await {
            demo.teardown(out, true).await;
            return Err(e);
        }
        Ok(demo)
    }

    /// Creates the topics and starts every service.
    async fn start_app(&mut self, out: &Out) -> Result<()> {
        let t0 = Instant::now();
        self.created_topics = true;
        create_topics(&self.args.bootstrap, &[&self.names.orders, &self.names.payments], PARTITIONS).await?;
        out.line(&format!(
            "  run {}: database {}, topics {} and {} ({PARTITIONS} partitions), logs in {}",
            self.id,
            self.names.database,
            self.names.orders,
            self.names.payments,
            self.dir.display()
        ));
        let migrate =
            Command::new(self.procs.bin()).args(self.procs.common()).arg("migrate").stdin(Stdio::null()).output();
        let m = tokio::time::timeout(START_TIMEOUT, migrate)
            .await
            .map_err(|_| anyhow::anyhow!("payments migrate did not finish in {START_TIMEOUT:?}"))?
            .context("running payments migrate")?;
        anyhow::ensure!(
            m.status.success(),
            "payments migrate failed ({}): {}",
            m.status,
            String::from_utf8_lossy(&m.stderr)
        );
        let n = &self.names;
        let consumer = |group: &str| -> Vec<String> {
            vec![
                "--group".into(),
                group.into(),
                // A killed member's partitions move after 6 s, not the broker's 45 s default.
                "--set".into(),
                "session_timeout_ms=6000".into(),
                // A call interrupted by a crash is taken up again 6 s later.
                "--set".into(),
                "effect_lease_ms=6000".into(),
                "--call-timeout-ms".into(),
                "4000".into(),
                "--set".into(),
                "metrics_addr=127.0.0.1:0".into(),
            ]
        };
        let any_port = "127.0.0.1:0".to_string();
        self.procs.start("fake-gateway", &["fake-gateway".into(), "--listen".into(), any_port.clone()]).await?;
        self.procs.start("naive-merchant", &["fake-gateway".into(), "--listen".into(), any_port.clone()]).await?;
        self.procs.start("order-service", &["order-service".into(), "--listen".into(), any_port]).await?;
        self.procs.start("relay", &["relay".into(), "--name".into(), format!("demo-{}", self.id)]).await?;
        let gateway = self.procs.url("fake-gateway")?;
        let naive_merchant = self.procs.url("naive-merchant")?;
        // With the tax bug of part 4 (2 % instead of 20 %) from the start.
        let mut a = vec![
            "payment-service".into(),
            "--gateway-url".into(),
            gateway.clone(),
            "--tax-percent".into(),
            BUGGY_TAX_PERCENT.to_string(),
        ];
        a.extend(consumer(&n.payment_group));
        self.procs.start("payment-service", &a).await?;
        // The oncely dispatcher follows a rewind (`replay`), so that it
        // re-reads exactly what the naive one re-reads; its inbox drops the
        // duplicates. (The default, `skip`, would not even re-read them.)
        let mut a = vec![
            "webhook-dispatcher".into(),
            "--merchant-url".into(),
            gateway,
            "--set".into(),
            "rewind_policy=replay".into(),
        ];
        a.extend(consumer(&n.webhook_group));
        self.procs.start("webhook-dispatcher", &a).await?;
        let a = vec![
            "naive-dispatcher".into(),
            "--group".into(),
            n.naive_group.clone(),
            "--merchant-url".into(),
            naive_merchant,
            "--session-timeout-ms".into(),
            "6000".into(),
        ];
        self.procs.start("naive-dispatcher", &a).await?;
        out.line(&format!(
            "  started: fake-gateway (gateway + merchant), naive-merchant, order-service, relay, payment-service, \
             webhook-dispatcher, naive-dispatcher ({:.1} s)",
            t0.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    async fn walk(&mut self, out: &Out, report: &mut Report) -> Result<()> {
        self.part1(out, report).await?;
        self.part2(out, report).await?;
        self.part3(out, report).await?;
        self.part4(out, report).await?;
        Ok(())
    }

    // ------------------------------------------------------------- part 1

    async fn part1(&mut self, out: &Out, report: &mut Report) -> Result<()> {
        out.line("\n1. The practical");
        let gw = self.procs.url("fake-gateway")?;
        let naive = self.procs.url("naive-merchant")?;

        // One order, one charge.
        let t0 = Instant::now();
        let first = format!("order-{}-first", self.id);
        self.create_order(&first, 4200).await?;
        let (this, gw_s, naive_s) = (&*self, gw.as_str(), naive.as_str());
        let s = wait_for("the first order to be charged and notified", STEP_TIMEOUT, || async move {
            let s = this.stats(gw_s).await?;
            let n = this.stats(naive_s).await?;
            Ok((s.distinct_charges >= 1 && s.distinct_webhooks >= 1 && n.distinct_webhooks >= 1).then_some(s))
        })
        .await?;
        let rows = self.count("SELECT count(*) FROM payments WHERE order_id = $1", &first).await?;
        out.check(
            report,
            1,
            "one order, one charge",
            rows == 1 && s.charge_calls == 1 && s.distinct_charges == 1 && s.distinct_webhooks == 1,
            format!(
                "POST /orders {first} → {rows} payment row, {} gateway call, {} charge, {} merchant webhook ({:.1} s)",
                s.charge_calls,
                s.distinct_charges,
                s.distinct_webhooks,
                t0.elapsed().as_secs_f64()
            ),
        );

        // The same OrderCreated published again.
        let (rec, ce_id) = self.find_record(&self.names.orders.clone(), &first).await?;
        let publisher = oncely::Publisher::new(&self.args.bootstrap, "/oncely/demo")?;
        let headers: Vec<(Vec<u8>, Vec<u8>)> =
            rec.headers.iter().filter_map(|(k, v)| v.map(|v| (k.to_vec(), v.to_vec()))).collect();
        let (partition, offset) = publisher
            .publish_raw(&self.names.orders, rec.key.as_deref(), rec.payload.as_deref(), &headers)
            .await
            .context("publishing the OrderCreated again")?;
        let group = self.names.payment_group.clone();
        let topic = self.names.orders.clone();
        let (this, group_s, topic_s) = (&*self, group.as_str(), topic.as_str());
        wait_for("payment-service to read the copy", STEP_TIMEOUT, || async move {
            let key = (topic_s.to_owned(), partition);
            let c = this.committed(group_s, std::slice::from_ref(&key)).await?;
            Ok((c.get(&key).copied().flatten().unwrap_or(0) > offset).then_some(()))
        })
        .await?;
        let s2 = self.stats(&gw).await?;
        let rows = self.count("SELECT count(*) FROM payments WHERE order_id = $1", &first).await?;
        let metrics = self.scrape(&self.procs.metrics_url("payment-service")?).await?;
        let skipped = counter(
            &metrics,
            "oncely_events_total",
            &[("consumer", &group), ("topic", &topic), ("outcome", "duplicate")],
        );
        out.check(
            report,
            1,
            "a duplicate is skipped",
            rows == 1 && skipped == 1 && s2.charge_calls == s.charge_calls && s2.distinct_charges == s.distinct_charges,
            format!(
                "the same OrderCreated (ce_id {ce_id}) published again at {topic}[{partition}]@{offset}: \
                 payment-service counted {skipped} duplicate (its inbox holds the identity); still {rows} payment \
                 row, {} charge, {} gateway call",
                s2.distinct_charges, s2.charge_calls
            ),
        );

        // Killed after the gateway charged, before the answer was recorded.
        let t0 = Instant::now();
        let crash = format!("order-{}-crash", self.id);
        self.control(&gw, json!({ "hang_after_accept_next": 1 })).await?;
        let before = self.stats(&gw).await?;
        self.create_order(&crash, 1999).await?;
        let (this, gw_s) = (&*self, gw.as_str());
        wait_for("the gateway to take the charge", STEP_TIMEOUT, || async move {
            Ok((this.stats(gw_s).await?.distinct_charges > before.distinct_charges).then_some(()))
        })
        .await?;
        let args = self.procs.kill("payment-service").await?;
        let status = self.charge_status(&crash).await?;
        out.line(&format!(
            "    the gateway charged {crash} and withheld its answer; payment-service killed with SIGKILL: \
             intent {status}"
        ));
        self.procs.start("payment-service", &args).await?;
        let (this, crash_s) = (&*self, crash.as_str());
        let done = wait_for("the restarted payment-service to finish the charge", STEP_TIMEOUT, || async move {
            let st = this.charge_status(crash_s).await?;
            Ok(st.starts_with("done").then_some(st))
        })
        .await?;
        let after = self.stats(&gw).await?;
        let rows = self.count("SELECT count(*) FROM payments WHERE order_id = $1", &crash).await?;
        let calls = after.charge_calls - before.charge_calls;
        let charges = after.distinct_charges - before.distinct_charges;
        out.check(
            report,
            1,
            "a crash mid-charge does not charge twice",
            rows == 1 && calls >= 2 && charges == 1,
            format!(
                "restarted, it called the gateway again with the same idempotency key: {calls} calls, \
                 {charges} charge, {rows} payment row, intent {done} ({:.1} s)",
                t0.elapsed().as_secs_f64()
            ),
        );

        // Per-key order.
        let t0 = Instant::now();
        let ids: Vec<String> = (0..ORDERED_PAIRS).map(|i| format!("order-{}-pair-{i:02}", self.id)).collect();
        let mut set = tokio::task::JoinSet::new();
        for id in ids.clone() {
            let http = self.http.clone();
            let base = self.procs.url("order-service")?;
            set.spawn(async move {
                post(
                    &http,
                    &format!("{base}/orders"),
                    &json!({ "orderId": id, "customer": "grace", "amountCents": 700 }),
                )
                .await?;
                post(&http, &format!("{base}/orders/{id}/confirm"), &json!({})).await
            });
        }
        while let Some(r) = set.join_next().await {
            r.context("an order task")??;
        }
        let like = format!("order-{}-pair-%", self.id);
        let (this, like_s) = (&*self, like.as_str());
        wait_for("the confirmations to be applied", STEP_TIMEOUT, || async move {
            let sql = "SELECT count(*) FROM payments WHERE order_id LIKE $1 AND order_status = 'confirmed'";
            Ok((this.count(sql, like_s).await? >= ORDERED_PAIRS as i64).then_some(()))
        })
        .await?;
        let histories: Vec<Vec<String>> = sqlx::query_scalar("SELECT history FROM payments WHERE order_id LIKE $1")
            .bind(&like)
            .fetch_all(&self.pool)
            .await?;
        let in_order = histories.iter().filter(|h| h.as_slice() == ["OrderCreated", "OrderConfirmed"]).count();
        out.check(
            report,
            1,
            "per-key order",
            in_order == ORDERED_PAIRS,
            format!(
                "OrderCreated then OrderConfirmed for {ORDERED_PAIRS} orders, written back to back: applied in that \
                 order for {in_order} of {ORDERED_PAIRS} ({:.1} s)",
                t0.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    // ------------------------------------------------------------- part 2

    async fn part2(&mut self, out: &Out, report: &mut Report) -> Result<()> {
        let n = self.args.payments as usize;
        out.line(&format!("\n2. The incident: {} payments, then Kafka's own offset reset", fmt_n(n as u64)));
        let gw = self.procs.url("fake-gateway")?;
        let naive = self.procs.url("naive-merchant")?;
        let base = self.procs.url("order-service")?;

        let t0 = Instant::now();
        let next = Arc::new(AtomicUsize::new(0));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS.min(n) {
            let (http, base, next, id) = (self.http.clone(), base.clone(), next.clone(), self.id.clone());
            set.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), anyhow::Error>(());
                    }
                    let body = json!({
                        "orderId": format!("order-{id}-{i:06}"),
                        "customer": format!("customer-{}", i % 97),
                        "amountCents": 100 + (i as i64 % 50) * 10,
                    });
                    post(&http, &format!("{base}/orders"), &body).await?;
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.context("an order client")??;
        }
        out.line(&format!(
            "  posted {} orders to order-service in {:.1} s",
            fmt_n(n as u64),
            t0.elapsed().as_secs_f64()
        ));

        let orders = self.count_all("SELECT count(*) FROM orders").await? as u64;
        let timeout = STEP_TIMEOUT + Duration::from_millis(100 * n as u64);
        let deadline = Instant::now() + timeout;
        let mut last_print = Instant::now();
        let (s, nv) = loop {
            let payments = self.count_all("SELECT count(*) FROM payments").await? as u64;
            let s = self.stats(&gw).await?;
            let nv = self.stats(&naive).await?;
            if payments == orders
                && s.distinct_charges == orders
                && s.distinct_webhooks == orders
                && nv.distinct_webhooks == orders
            {
                break (s, nv);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out after {timeout:?} waiting for every payment to be charged and notified \
                     (payments {payments}/{orders}, charges {}, webhooks oncely {} naive {})",
                    s.distinct_charges,
                    s.distinct_webhooks,
                    nv.distinct_webhooks
                );
            }
            if last_print.elapsed() > Duration::from_secs(3) {
                out.line(&format!(
                    "    … payments {}/{}, charges {}, webhooks: oncely {}, naive {}",
                    fmt_n(payments),
                    fmt_n(orders),
                    fmt_n(s.distinct_charges),
                    fmt_n(s.distinct_webhooks),
                    fmt_n(nv.distinct_webhooks)
                ));
                last_print = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        out.line(&format!(
            "  every order paid and notified ({} with those of part 1): {} payments, {} charges, \
             webhooks: naive {}, oncely {} ({:.1} s)",
            fmt_n(orders),
            fmt_n(orders),
            fmt_n(s.distinct_charges),
            fmt_n(nv.webhook_calls),
            fmt_n(s.webhook_calls),
            t0.elapsed().as_secs_f64()
        ));
        report.webhooks_before_rewind = orders;

        // The incident: both dispatchers stopped, their groups rewound with Kafka's tool.
        let payments_topic = self.names.payments.clone();
        let groups = [self.names.naive_group.clone(), self.names.webhook_group.clone()];
        let naive_args = self.procs.args_of("naive-dispatcher")?;
        let oncely_args = self.procs.args_of("webhook-dispatcher")?;
        self.procs.stop("naive-dispatcher", STOP_GRACE).await?;
        self.procs.stop("webhook-dispatcher", STOP_GRACE).await?;
        for g in &groups {
            self.wait_inactive(g).await?;
        }
        out.line("  both dispatchers stopped (SIGTERM); the operator's command, on each group:");
        for g in &groups {
            let args = [
                "--bootstrap-server",
                self.args.bootstrap.as_str(),
                "--group",
                g.as_str(),
                "--topic",
                payments_topic.as_str(),
                "--reset-offsets",
                "--to-earliest",
                "--execute",
            ];
            out.line(&format!("    $ kafka-consumer-groups {}", args.join(" ")));
            let text = self.kafka_tool("kafka-consumer-groups", &args).await?;
            for l in text.lines().filter(|l| !l.trim().is_empty()) {
                out.line(&format!("      {l}"));
            }
        }
        let parts: Vec<(String, i32)> = (0..PARTITIONS).map(|p| (payments_topic.clone(), p)).collect();
        let ends = self.end_offsets(&parts).await?;
        let total: i64 = ends.values().sum();
        for g in &groups {
            let c = self.committed(g, &parts).await?;
            anyhow::ensure!(c.values().all(|o| *o == Some(0)), "the reset did not move group {g} to the start: {c:?}");
        }
        self.procs.start("naive-dispatcher", &naive_args).await?;
        self.procs.start("webhook-dispatcher", &oncely_args).await?;
        out.line(&format!(
            "  both dispatchers restarted; each re-reads the {} records of {payments_topic}",
            fmt_n(total as u64)
        ));
        let t1 = Instant::now();
        for g in &groups {
            let (this, parts_r, ends_r) = (&*self, &parts, &ends);
            wait_for(&format!("group {g} to catch up again"), timeout, || async move {
                let c = this.committed(g, parts_r).await?;
                Ok(parts_r.iter().all(|k| c.get(k).copied().flatten() == ends_r.get(k).copied()).then_some(()))
            })
            .await?;
        }
        let s = self.stats(&gw).await?;
        let nv = self.stats(&naive).await?;
        let intents = self
            .count(
                "SELECT count(*) FROM oncely.effects WHERE consumer = $1 AND effect = 'merchant-webhook'",
                &self.names.webhook_group,
            )
            .await? as u64;
        out.line(&format!("  both caught up again ({:.1} s)", t1.elapsed().as_secs_f64()));
        let metrics = self.scrape(&self.procs.metrics_url("webhook-dispatcher")?).await?;
        let (g, t) = (self.names.webhook_group.as_str(), payments_topic.as_str());
        let rewinds = counter(&metrics, "oncely_rewinds_total", &[("consumer", g), ("topic", t)]);
        let dropped =
            counter(&metrics, "oncely_events_total", &[("consumer", g), ("topic", t), ("outcome", "duplicate")]);
        let reprocessed =
            counter(&metrics, "oncely_events_total", &[("consumer", g), ("topic", t), ("outcome", "processed")]);
        out.line(&format!(
            "  oncely's dispatcher noticed the rewind on {rewinds} of {PARTITIONS} partitions (oncely_rewinds_total) \
             and, with policy replay, re-read: {} records dropped as duplicates by the inbox, {reprocessed} handled",
            fmt_n(dropped)
        ));
        report.oncely_rewinds_detected = rewinds;
        report.oncely_duplicates_dropped = dropped;
        report.orders = orders;
        report.payments = self.count_all("SELECT count(*) FROM payments").await? as u64;
        report.gateway_calls = s.charge_calls;
        report.distinct_charges = s.distinct_charges;
        report.duplicate_charges = s.distinct_charges.saturating_sub(orders);
        report.naive_webhooks = nv.webhook_calls;
        report.naive_duplicate_webhooks = nv.duplicate_webhooks();
        report.oncely_webhooks = s.webhook_calls;
        report.oncely_duplicate_webhooks = s.duplicate_webhooks();
        report.naive_redelivered = total as u64;
        report.oncely_redelivered = total as u64;
        out.check(
            report,
            2,
            "the naive dispatcher re-sent webhooks",
            report.naive_duplicate_webhooks > 0,
            format!(
                "{} duplicate webhooks at its merchant ({} deliveries for {} payments): its \"processed\" row \
                 is written after the call, so it prevents nothing",
                fmt_n(report.naive_duplicate_webhooks),
                fmt_n(nv.webhook_calls),
                fmt_n(nv.distinct_webhooks)
            ),
        );
        out.check(
            report,
            2,
            "oncely's dispatcher sent no duplicate",
            report.oncely_duplicate_webhooks == 0
                && s.distinct_webhooks == orders
                && intents == orders
                && dropped == total as u64
                && reprocessed == 0,
            format!(
                "{} duplicate webhooks ({} deliveries for {} payments, {} intents): the {} re-read records were \
                 all dropped by the inbox",
                report.oncely_duplicate_webhooks,
                fmt_n(s.webhook_calls),
                fmt_n(s.distinct_webhooks),
                fmt_n(intents),
                fmt_n(dropped)
            ),
        );
        out.check(
            report,
            2,
            "every order charged exactly once",
            report.payments == orders && s.distinct_charges == orders && report.duplicate_charges == 0,
            format!(
                "{} orders, {} payment rows, {} distinct charges ({} gateway calls)",
                fmt_n(orders),
                fmt_n(report.payments),
                fmt_n(s.distinct_charges),
                fmt_n(s.charge_calls)
            ),
        );
        Ok(())
    }

    // ------------------------------------------------------------- part 3

    async fn part3(&mut self, out: &Out, report: &mut Report) -> Result<()> {
        out.line("\n3. The guard: the same reset with `oncely offsets` on a protected environment");
        let group = self.names.webhook_group.clone();
        let topic = self.names.payments.clone();
        self.procs.stop("webhook-dispatcher", STOP_GRACE).await?;
        self.wait_inactive(&group).await?;
        let cluster = self.admin.describe_cluster().await.map_err(anyhow::Error::from)?.cluster_id;
        let env = "demo-prod";
        let config = self.dir.join("oncely.toml");
        std::fs::write(
            &config,
            format!(
                "# Written by `oncely demo`: the live cluster, as a protected environment.\n\
                 default_env = \"{env}\"\n\n[env.{env}]\nbootstrap_servers = \"{}\"\ndatabase_url = \"{}\"\n\
                 cluster_id = \"{cluster}\"\nprotected = true\n",
                self.args.bootstrap, self.db_url
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        out.line(&format!(
            "  {} names the live cluster {cluster} as environment `{env}`, protected = true",
            config.display()
        ));
        let parts: Vec<(String, i32)> = (0..PARTITIONS).map(|p| (topic.clone(), p)).collect();
        let before = self.committed(&group, &parts).await?;
        let reset = ["offsets", "reset", "-g", group.as_str(), "-t", topic.as_str(), "--to-earliest"];

        // The preview.
        out.line(&format!("    $ oncely --env {env} {}", reset.join(" ")));
        let dry = self.oncely(&config, &reset).await?;
        show(out, &dry.stdout, 40);
        let preview_shown = dry.code == Some(0) && !dry.stdout.trim().is_empty();

        // --execute without the typed confirmation.
        let mut exec: Vec<&str> = reset.to_vec();
        exec.push("--execute");
        out.line(&format!("    $ oncely --env {env} {}      (no terminal, no --confirm)", exec.join(" ")));
        let refused = self.oncely(&config, &exec).await?;
        show(out, &refused.stderr, 4);
        let unchanged = self.committed(&group, &parts).await? == before;
        report.guard_preview_shown = preview_shown;
        report.guard_refused = refused.code == Some(2) && unchanged;
        out.check(
            report,
            3,
            "the guard refuses without confirmation",
            preview_shown && report.guard_refused,
            format!(
                "preview shown: {preview_shown}; --execute exited {} and the offsets are {}",
                refused.code.map_or("by a signal".into(), |c| c.to_string()),
                if unchanged { "unchanged" } else { "CHANGED" }
            ),
        );

        // Confirmed, then undone.
        let confirmation = format!("RESET {env} {group}");
        let mut confirmed = exec.clone();
        confirmed.extend(["--confirm", confirmation.as_str()]);
        out.line(&format!("    $ oncely --env {env} {} '{confirmation}'", exec.join(" ") + " --confirm"));
        let done = self.oncely(&config, &confirmed).await?;
        show_tail(out, &done.stdout, 3);
        let moved = self.committed(&group, &parts).await?;
        report.guard_executed = done.code == Some(0) && moved.values().all(|o| *o == Some(0));
        out.check(
            report,
            3,
            "a confirmed reset executes",
            report.guard_executed,
            format!("exit {}; committed offsets now {}", done.code.unwrap_or(-1), fmt_offsets(&moved)),
        );
        let undo = ["offsets", "undo", "-g", group.as_str(), "--execute", "--confirm", confirmation.as_str()];
        out.line(&format!("    $ oncely --env {env} offsets undo -g {group} --execute --confirm '{confirmation}'"));
        let undone = self.oncely(&config, &undo).await?;
        show_tail(out, &undone.stdout, 3);
        if undone.code != Some(0) {
            show(out, &undone.stderr, 4);
        }
        let after = self.committed(&group, &parts).await?;
        report.undo_restored = undone.code == Some(0) && after == before;
        out.check(
            report,
            3,
            "undo restores the offsets",
            report.undo_restored,
            format!("before {} → reset {} → undo {}", fmt_offsets(&before), fmt_offsets(&moved), fmt_offsets(&after)),
        );
        Ok(())
    }

    // ------------------------------------------------------------- part 4

    async fn part4(&mut self, out: &Out, report: &mut Report) -> Result<()> {
        out.line("\n4. The rebuild: a tax bug fixed without charging anyone again");
        let group = self.names.payment_group.clone();
        let env = "demo-prod";
        let config = self.dir.join("oncely.toml");
        let wrong_sql =
            format!("SELECT count(*) FROM public.payments WHERE tax_cents <> amount_cents * {TAX_PERCENT} / 100");
        let wrong = self.count_all(&wrong_sql).await?;
        let paid = self.count_all("SELECT count(*) FROM public.payments").await?;
        out.line(&format!(
            "  the payment-service has recorded tax at {BUGGY_TAX_PERCENT} % instead of {TAX_PERCENT} % from the start: \
             {wrong} of {paid} payments are wrong. Replaying into the live table would charge {paid} cards again."
        ));

        // The fix is deployed: the same service without the bug, which also
        // serves the rebuilds of its projection.
        let mut args = self.procs.args_of("payment-service")?;
        if let Some(i) = args.iter().position(|a| a == "--tax-percent") {
            args.drain(i..i + 2);
        }
        self.procs.stop("payment-service", STOP_GRACE).await?;
        self.procs.start("payment-service", &args).await?;
        out.line(
            "  deployed the fix: payment-service restarted with the correct rate (it serves its projection's rebuilds)",
        );

        // Orders keep arriving through the rebuild and the swap.
        let gw_url = self.procs.url("fake-gateway")?;
        let before = self.stats(&gw_url).await?;
        let outbox_sql =
            format!("SELECT count(*) FROM oncely.outbox WHERE topic = '{}'", self.names.payments.replace('\'', "''"));
        let outbox_before = self.count_all(&outbox_sql).await?;
        let dead_sql = "SELECT count(*) FROM oncely.dead_letters WHERE consumer = $1";
        let dead_before = self.count(dead_sql, &group).await?;
        let load = OrderLoad::start(self.http.clone(), self.procs.url("order-service")?, self.id.clone());

        let confirm = format!("REBUILD {env} {REBUILD_TARGET}");
        let rebuild =
            ["projection", "rebuild", "--consumer", group.as_str(), "--into", REBUILD_TARGET, "--from", "earliest"];
        out.line(&format!("    $ oncely --env {env} {} --confirm '{confirm}'", rebuild.join(" ")));
        let mut a = rebuild.to_vec();
        a.extend(["--confirm", confirm.as_str()]);
        let requested = self.oncely(&config, &a).await?;
        show(out, &requested.stdout, 6);
        anyhow::ensure!(requested.code == Some(0), "oncely projection rebuild failed: {}", requested.stderr);

        let t0 = Instant::now();
        let pool = self.pool.clone();
        wait_for("the rebuild to catch up with the live consumer", STEP_TIMEOUT, || {
            let pool = pool.clone();
            async move {
                let Ok(s) = oncely::projection::status(&pool, REBUILD_TARGET).await else { return Ok(None) };
                Ok((s.lag.behind <= 50 && s.lag.missing.is_empty() && s.rebuild.state == "rebuilding").then_some(()))
            }
        })
        .await?;
        out.line(&format!("  the application ran the rebuild; it caught up in {:.1} s", t0.elapsed().as_secs_f64()));
        out.line(&format!("    $ oncely --env {env} projection status {REBUILD_TARGET}"));
        let status = self.oncely(&config, &["projection", "status", REBUILD_TARGET, "--rate-window", "1"]).await?;
        show(out, &status.stdout, 6);

        out.line(&format!("    $ oncely --env {env} projection diff {REBUILD_TARGET} --sample 2"));
        let diff = self.oncely(&config, &["projection", "diff", REBUILD_TARGET, "--sample", "2"]).await?;
        show(out, &diff.stdout, 12);
        anyhow::ensure!(diff.code == Some(0), "oncely projection diff failed: {}", diff.stderr);

        let confirm = format!("SWAP {env} {REBUILD_TARGET}");
        out.line(&format!("    $ oncely --env {env} projection swap {REBUILD_TARGET} --execute --confirm '{confirm}'"));
        let swap = self
            .oncely(&config, &["projection", "swap", REBUILD_TARGET, "--execute", "--confirm", confirm.as_str()])
            .await?;
        show_tail(out, &swap.stdout, 3);
        if swap.code != Some(0) {
            show(out, &swap.stderr, 6);
        }
        let swapped = swap.code == Some(0);

        // A little more load after the swap, then everything settles.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let created = load.stop().await?;
        let settle_deadline = Instant::now() + STEP_TIMEOUT;
        let orders_sql = "SELECT count(*) FROM public.orders";
        loop {
            let orders = self.count_all(orders_sql).await?;
            let paid = self.count_all("SELECT count(*) FROM public.payments").await?;
            let open = self
                .count(
                    "SELECT count(*) FROM oncely.effects WHERE consumer = $1 AND status IN ('pending', 'running')",
                    &group,
                )
                .await?;
            if (paid >= orders && open == 0) || Instant::now() > settle_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let after = self.stats(&gw_url).await?;
        let outbox_after = self.count_all(&outbox_sql).await?;
        let rebuild_consumer = oncely::projection::rebuild_consumer_name(&group, REBUILD_TARGET);
        let unsuppressed = self
            .count(
                "SELECT count(*) FROM oncely.effects WHERE consumer = $1 AND status <> 'suppressed'",
                &rebuild_consumer,
            )
            .await?;
        let suppressed = self
            .count(
                "SELECT count(*) FROM oncely.effects WHERE consumer = $1 AND status = 'suppressed'",
                &rebuild_consumer,
            )
            .await?;
        let new = created as i64;
        let extra_calls = (after.charge_calls - before.charge_calls) as i64 - new;
        let extra_published = outbox_after - outbox_before - new;
        let side = extra_calls.max(0) + extra_published.max(0) + unsuppressed;
        report.rebuild_side_effects = Some(side as u64);
        out.check(
            report,
            4,
            "the rebuild fired no side effect",
            side == 0 && extra_calls == 0 && extra_published == 0,
            format!(
                "{} gateway calls and {} PaymentSucceeded published for {new} new orders; the rebuild's {suppressed} \
                 charges recorded as suppressed, {unsuppressed} not",
                after.charge_calls - before.charge_calls,
                outbox_after - outbox_before
            ),
        );
        let wrong_after = self.count_all(&wrong_sql).await?;
        let paid = self.count_all("SELECT count(*) FROM public.payments").await?;
        report.rebuild_corrected = swapped && wrong_after == 0 && paid > 0;
        out.check(
            report,
            4,
            "the swapped-in projection has the correct tax",
            report.rebuild_corrected,
            format!("{wrong_after} of {paid} payments with a wrong tax (before: {wrong})"),
        );
        let lost = self
            .count_all(
                "SELECT count(*) FROM public.orders o WHERE NOT EXISTS (SELECT 1 FROM public.payments p WHERE p.order_id = o.id)",
            )
            .await?;
        let twice = self
            .count_all(
                "SELECT count(*) FROM public.payments WHERE cardinality(array_positions(history, 'OrderCreated')) > 1",
            )
            .await?;
        let dead = self.count(dead_sql, &group).await? - dead_before;
        let charged_twice = (after.charge_calls - after.distinct_charges) as i64
            - (before.charge_calls - before.distinct_charges) as i64;
        let duplicates = twice + dead + charged_twice.max(0);
        report.swap_lost = Some(lost as u64);
        report.swap_duplicates = Some(duplicates as u64);
        out.check(
            report,
            4,
            "across the swap nothing is lost and nothing applied twice",
            swapped && lost == 0 && duplicates == 0,
            format!(
                "{new} orders during the rebuild and the swap; {lost} without a payment, {twice} applied twice, \
                 {dead} dead-lettered, {} charged again",
                charged_twice.max(0)
            ),
        );
        out.line(&format!(
            "  back out with: oncely --env {env} projection swap-back payments --execute (kept 7 days in schema {REBUILD_TARGET})"
        ));
        Ok(())
    }

    // ------------------------------------------------------------- helpers

    async fn create_order(&self, id: &str, amount_cents: i64) -> Result<()> {
        let base = self.procs.url("order-service")?;
        post(
            &self.http,
            &format!("{base}/orders"),
            &json!({ "orderId": id, "customer": "ada", "amountCents": amount_cents }),
        )
        .await
    }

    async fn stats(&self, base: &str) -> Result<Stats> {
        let r = self.http.get(format!("{base}/stats")).send().await.with_context(|| format!("GET {base}/stats"))?;
        Ok(r.error_for_status()?.json().await?)
    }

    async fn scrape(&self, url: &str) -> Result<String> {
        let r = self.http.get(url).send().await.with_context(|| format!("GET {url}"))?;
        Ok(r.error_for_status()?.text().await?)
    }

    async fn control(&self, base: &str, body: Value) -> Result<()> {
        self.http.post(format!("{base}/control")).json(&body).send().await?.error_for_status()?;
        Ok(())
    }

    async fn count(&self, sql: &str, arg: &str) -> Result<i64> {
        Ok(sqlx::query_scalar::<_, i64>(sql).bind(arg).fetch_one(&self.pool).await?)
    }

    async fn count_all(&self, sql: &str) -> Result<i64> {
        Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool).await?)
    }

    /// `status (attempt N)` of the charge intent of `order`.
    async fn charge_status(&self, order: &str) -> Result<String> {
        let row: Option<(String, i32)> = sqlx::query_as(
            "SELECT status, attempts FROM oncely.effects
             WHERE consumer = $1 AND effect = 'charge-card' AND payload->>'orderId' = $2",
        )
        .bind(&self.names.payment_group)
        .bind(order)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some((s, a)) => format!("{s} (attempt {a})"),
            None => "absent".into(),
        })
    }

    async fn wait_inactive(&self, group: &str) -> Result<()> {
        wait_for(&format!("group {group} to have no members"), STEP_TIMEOUT, || async move {
            let d = self.admin.describe_consumer_groups(&[group]).await.map_err(anyhow::Error::from)?;
            Ok(d.first().is_some_and(|g| g.is_inactive()).then_some(()))
        })
        .await
    }

    async fn committed(&self, group: &str, parts: &[(String, i32)]) -> Result<BTreeMap<(String, i32), Option<i64>>> {
        let offs = self.admin.list_consumer_group_offsets(group, Some(parts)).await.map_err(anyhow::Error::from)?;
        Ok(offs.into_iter().map(|o| ((o.topic, o.partition), o.offset)).collect())
    }

    async fn end_offsets(&self, parts: &[(String, i32)]) -> Result<BTreeMap<(String, i32), i64>> {
        let l = self.admin.list_offsets(parts, OffsetSpec::Latest).await.map_err(anyhow::Error::from)?;
        l.into_iter()
            .map(|o| o.offset().map(|off| ((o.topic.clone(), o.partition), off)).context("no log end offset"))
            .collect()
    }

    /// Finds the `OrderCreated` of `order` in `topic`; returns it and its `ce_id`.
    async fn find_record(&self, topic: &str, order: &str) -> Result<(oncely::envelope::RawRecord, String)> {
        let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(&self.args.bootstrap)
            .client_config()?
            .set("group.id", format!("oncely-demo-{}-reader", self.id))
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let order = order.to_owned();
        tokio::task::spawn_blocking(move || -> Result<(oncely::envelope::RawRecord, String)> {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
                let rec = oncely::envelope::RawRecord::from_message(&m?);
                let attrs = oncely::envelope::CloudEventAttrs::from_record(&rec)?;
                if rec.key_str() == order && attrs.ty == "com.example.order.created" {
                    return Ok((rec, attrs.id));
                }
            }
            bail!("the OrderCreated of {order} was not found in the topic")
        })
        .await
        .context("the reader task")?
    }

    async fn kafka_tool(&self, tool: &str, args: &[&str]) -> Result<String> {
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            Command::new(&self.args.kafka_tool).arg(tool).args(args).stdin(Stdio::null()).output(),
        )
        .await
        .map_err(|_| anyhow::anyhow!("{tool} did not finish in 120 s"))?
        .with_context(|| format!("running {} {tool}", self.args.kafka_tool.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{tool} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the `oncely` binary with `--config FILE` and `args`, stdin closed (no terminal).
    async fn oncely(&self, config: &Path, args: &[&str]) -> Result<Ran> {
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            Command::new(&self.args.oncely_bin)
                .arg("--config")
                .arg(config)
                .args(args)
                .env_remove("ONCELY_ENV")
                .env_remove("ONCELY_BOOTSTRAP_SERVERS")
                .env_remove("ONCELY_DATABASE_URL")
                .env_remove("ONCELY_CLUSTER_ID")
                .env_remove("ONCELY_PROTECTED")
                .stdin(Stdio::null())
                .output(),
        )
        .await
        .map_err(|_| anyhow::anyhow!("oncely {} did not finish in 120 s", args.join(" ")))?
        .context("running oncely")?;
        Ok(Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Stops the services and removes what the run created (unless `--keep`).
    async fn teardown(&mut self, out: &Out, failed: bool) {
        // Consumers first, then the relay and the servers.
        self.procs
            .stop_all(|n| match n {
                "fake-gateway" | "naive-merchant" => 3,
                "order-service" | "relay" => 2,
                _ => 1,
            })
            .await;
        if self.args.keep {
            out.line(&format!(
                "\n  kept: database {}, topics {}-*, groups, logs in {}",
                self.names.database,
                self.names.prefix(),
                self.dir.display()
            ));
            return;
        }
        let mut problems = Vec::new();
        if self.created_topics {
            if let Err(e) = self.delete_kafka_objects().await {
                problems.push(format!("topics and groups: {e:#}"));
            }
        }
        self.pool.close().await;
        if let Err(e) = supervisor::drop_database(&self.args.admin_db_url, &self.names.database).await {
            problems.push(format!("database: {e:#}"));
        }
        if failed {
            out.line(&format!("\n  logs kept in {}", self.dir.display()));
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            problems.push(format!("{}: {e}", self.dir.display()));
        }
        for p in problems {
            out.line(&format!("  cleanup problem: {p}"));
        }
    }

    async fn delete_kafka_objects(&self) -> Result<()> {
        let prefix = self.names.prefix();
        let kafka_md: BaseConsumer =
            oncely::kafka::KafkaConnection::new(&self.args.bootstrap).client_config()?.create()?;
        let topics: Vec<String> = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let md = kafka_md.fetch_metadata(None, Duration::from_secs(10))?;
            Ok(md.topics().iter().map(|t| t.name().to_owned()).filter(|t| t.starts_with(&prefix)).collect())
        })
        .await??;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        if !topics.is_empty() {
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            for r in self.kafka.delete_topics(&names, &opts).await? {
                if let Err((t, e)) = r {
                    bail!("deleting topic {t}: {e}");
                }
            }
        }
        let n = &self.names;
        let groups = [n.payment_group.as_str(), n.webhook_group.as_str(), n.naive_group.as_str()];
        for r in self.kafka.delete_groups(&groups, &opts).await? {
            if let Err((g, e)) = r {
                // A group that never committed does not exist: nothing to delete.
                if e != rdkafka::types::RDKafkaErrorCode::GroupIdNotFound {
                    bail!("deleting group {g}: {e}");
                }
            }
        }
        Ok(())
    }
}

/// Orders arriving at the order-service (one every 40 ms) until stopped.
struct OrderLoad {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<u64>>,
}

impl OrderLoad {
    fn start(http: reqwest::Client, order_service: String, run_id: String) -> Self {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !token.is_cancelled() {
                let body = json!({ "orderId": format!("order-{run_id}-r{n}"), "customer": "grace", "amountCents": 1000 + n as i64 });
                post(&http, &format!("{order_service}/orders"), &body).await?;
                n += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            Ok(n)
        });
        OrderLoad { stop, task }
    }

    /// Stops; returns how many orders it created.
    async fn stop(self) -> Result<u64> {
        self.stop.cancel();
        self.task.await.context("the order load")?
    }
}

/// Polls `f` every 100 ms until it returns `Some`, failing after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    supervisor::wait_for(what, timeout, Duration::from_millis(100), f).await
}

/// The outcome of a command.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Prints up to `max` lines of `text`, indented.
fn show(out: &Out, text: &str, max: usize) {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    for l in lines.iter().take(max) {
        out.line(&format!("      {l}"));
    }
    if lines.len() > max {
        out.line(&format!("      … ({} more lines)", lines.len() - max));
    }
}

/// The sum of Prometheus counter `name` over the series whose labels include
/// `labels`, in the text exposition format.
fn counter(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let Some((series, value)) = rest.rsplit_once(' ') else { continue };
        let series = series.trim();
        let set = match series.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(set) => set,
            None if series.is_empty() => "",
            None => continue, // another metric whose name starts with `name`
        };
        let has = |k: &str, v: &str| set.split(',').any(|kv| kv == format!("{k}=\"{v}\""));
        if labels.iter().all(|(k, v)| has(k, v)) {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum as u64
}

/// Prints the last `n` lines of `text`, indented.
fn show_tail(out: &Out, text: &str, n: usize) {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() > n {
        out.line(&format!("      … ({} lines)", lines.len() - n));
    }
    for l in &lines[lines.len().saturating_sub(n)..] {
        out.line(&format!("      {l}"));
    }
}

fn fmt_offsets(m: &BTreeMap<(String, i32), Option<i64>>) -> String {
    let v: Vec<String> =
        m.iter().map(|((_, p), o)| format!("[{p}]={}", o.map_or("-".into(), |o| o.to_string()))).collect();
    v.join(" ")
}

/// `1234567` → `1,234,567`.
fn fmt_n(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> Result<()> {
    let r = http.post(url).json(body).send().await.with_context(|| format!("POST {url}"))?;
    let status = r.status();
    if !status.is_success() {
        let text = r.text().await.unwrap_or_default();
        bail!("POST {url} answered {status}: {text}");
    }
    Ok(())
}

/// The `payments` binary: `--payments-bin`, else next to this binary.
fn payments_bin(args: &DemoArgs) -> Result<PathBuf> {
    beside_this_binary(args.payments_bin.as_deref(), "payments", "--payments-bin", "cargo build -p payments")
}

/// The operator command line: `--oncely-bin`, else `oncely` next to this binary.
fn oncely_bin(args: &DemoArgs) -> Result<PathBuf> {
    beside_this_binary(args.oncely_bin.as_deref(), "oncely", "--oncely-bin", "cargo build -p oncely-cli")
}

/// `given` if set (it must exist), else the binary `name` in this binary's
/// directory (the same cargo profile).
fn beside_this_binary(given: Option<&Path>, name: &str, flag: &str, build: &str) -> Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(p.is_file(), "{flag} {} does not exist", p.display());
        return Ok(p.to_owned());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe.parent().context("this binary has no directory")?;
    let p = dir.join(name);
    anyhow::ensure!(
        p.is_file(),
        "{} does not exist: build it with `{build}` (same profile as payments-demo), or pass {flag}",
        p.display()
    );
    Ok(p)
}

/// Kafka's tool runner: `--kafka-tool`, else `scripts/kafka-tool` above this binary.
fn kafka_tool(args: &DemoArgs) -> Result<PathBuf> {
    if let Some(p) = &args.kafka_tool {
        anyhow::ensure!(p.is_file(), "--kafka-tool {} does not exist", p.display());
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    for dir in exe.ancestors().skip(1) {
        let p = dir.join("scripts/kafka-tool");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("Kafka's tools were not found: set ONCELY_KAFKA_TOOL (scripts/services env prints it) or pass --kafka-tool")
}

/// The final table.
fn print_summary(out: &Out, r: &Report) {
    let mut t = String::new();
    let _ = writeln!(t, "\nResults (run {}, {:.0} s)", r.run_id, r.seconds);
    let _ = writeln!(t, "  {:<34} {:>16} {:>16}", "", "naive dispatcher", "oncely");
    let row = |t: &mut String, name: &str, a: String, b: String| {
        let _ = writeln!(t, "  {name:<34} {a:>16} {b:>16}");
    };
    row(&mut t, "payments", fmt_n(r.payments), fmt_n(r.payments));
    row(&mut t, "webhooks before the rewind", fmt_n(r.webhooks_before_rewind), fmt_n(r.webhooks_before_rewind));
    row(&mut t, "records re-read after the rewind", fmt_n(r.naive_redelivered), fmt_n(r.oncely_redelivered));
    row(&mut t, "webhooks delivered in all", fmt_n(r.naive_webhooks), fmt_n(r.oncely_webhooks));
    row(&mut t, "duplicate webhooks", fmt_n(r.naive_duplicate_webhooks), fmt_n(r.oncely_duplicate_webhooks));
    let _ = writeln!(
        t,
        "  card charges: {} orders, {} distinct charges, {} duplicate ({} gateway calls)",
        fmt_n(r.orders),
        fmt_n(r.distinct_charges),
        fmt_n(r.duplicate_charges),
        fmt_n(r.gateway_calls)
    );
    let _ = writeln!(
        t,
        "  offset guard: preview shown {}, refused without confirmation {}, undo restored {}",
        yes(r.guard_preview_shown),
        yes(r.guard_refused),
        yes(r.undo_restored)
    );
    let opt_n = |v: Option<u64>| v.map_or_else(|| "not reached".to_owned(), fmt_n);
    let _ = writeln!(
        t,
        "  projection rebuild: side effects {}, taxes corrected {}, lost across the swap {}, applied twice {}",
        opt_n(r.rebuild_side_effects),
        yes(r.rebuild_corrected),
        opt_n(r.swap_lost),
        opt_n(r.swap_duplicates)
    );
    let failed: Vec<&Check> = r.checks.iter().filter(|c| !c.ok).collect();
    if r.ok {
        let _ = write!(t, "  all {} checks passed", r.checks.len());
    } else {
        match &r.error {
            Some(e) => {
                let _ = write!(
                    t,
                    "  FAILED: stopped before the end: {e} ({} checks done, {} failed)",
                    r.checks.len(),
                    failed.len()
                );
            }
            None => {
                let _ = write!(t, "  FAILED: {} of {} checks", failed.len(), r.checks.len());
            }
        }
        for c in failed {
            let _ = write!(t, "\n    ✗ {} (part {}): {}", c.name, c.part, c.detail);
        }
    }
    out.line(&t);
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(fmt_n(0), "0");
        assert_eq!(fmt_n(999), "999");
        assert_eq!(fmt_n(1000), "1,000");
        assert_eq!(fmt_n(1_234_567), "1,234,567");
    }

    #[test]
    fn database_urls_are_rewritten_and_redacted() {
        assert_eq!(with_database("postgres://u:p@h:5432/oncely", "x"), "postgres://u:p@h:5432/x");
        assert_eq!(with_database("postgres://u@h/db?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
        assert_eq!(redact("postgres://u:p@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn counters_are_summed_over_matching_series() {
        let text = "# TYPE oncely_events_total counter\n\
            oncely_events_total{consumer=\"c\",topic=\"t\",outcome=\"duplicate\"} 12\n\
            oncely_events_total{consumer=\"c\",topic=\"t\",outcome=\"processed\"} 3\n\
            oncely_events_total{consumer=\"d\",topic=\"t\",outcome=\"duplicate\"} 5\n\
            oncely_events_totally{consumer=\"c\"} 7\n";
        assert_eq!(counter(text, "oncely_events_total", &[("consumer", "c"), ("outcome", "duplicate")]), 12);
        assert_eq!(counter(text, "oncely_events_total", &[("consumer", "c")]), 15);
        assert_eq!(counter(text, "oncely_events_total", &[("outcome", "duplicate")]), 17);
        assert_eq!(counter(text, "oncely_events_total", &[("consumer", "x")]), 0);
    }

    #[test]
    fn names_share_the_run_prefix() {
        let n = Names::new("abc");
        assert_eq!(n.prefix(), "oncely-demo-abc");
        for name in [&n.orders, &n.payments, &n.payment_group, &n.webhook_group, &n.naive_group] {
            assert!(name.starts_with(&n.prefix()), "{name}");
        }
        assert_eq!(n.database, "oncely_demo_abc");
    }
}
