//! `bench torture`: the whole payments pipeline (`examples/payments`, each
//! service its own process) under injected faults, then its invariants.
//!
//! Orders are posted to the order-service at a steady rate (every
//! `--confirm-every`th one is confirmed too, to check per-key order), by
//! clients that retry until the service has the order (a `409` means an
//! earlier attempt went through). Meanwhile a fault injector, at random
//! intervals drawn from a seeded RNG, does one of:
//!
//! - `kill-payment-service`, `kill-webhook-dispatcher`, `kill-relay`: SIGKILL,
//!   then start it again;
//! - `add-member` / `remove-member`: a second payment-service or
//!   webhook-dispatcher process joins the group (a rebalance), and is later
//!   stopped with SIGTERM (another one);
//! - `rewind-webhook-dispatcher` / `rewind-payment-service`: stop every member
//!   of the group, Kafka's own `kafka-consumer-groups --reset-offsets
//!   --to-earliest --execute`, start them again (they run with
//!   `--set rewind_policy=replay`: they follow the rewind and re-read everything,
//!   the inbox drops the duplicates);
//! - `restart-kafka`, `restart-postgres`: `scripts/services restart-…`;
//! - `freeze-payment-service`, `freeze-webhook-dispatcher`: a zombie. With a
//!   second member of the group running (started if need be), the first is
//!   frozen with SIGSTOP for longer than its session timeout (its partitions
//!   move to the other member, possibly while its batch transaction is still
//!   open in PostgreSQL), then resumed with SIGCONT;
//! - `hostile-records`: records no handler can take, published into the
//!   orders topic (a header name that is not UTF-8, a NUL byte in `ce_id`, no
//!   `ce_id`, no payload, 600 kB that are not JSON; keys `hostile-…`, one with
//!   bytes that are not UTF-8): each must be dead-lettered with its reason,
//!   none may stop a partition;
//! - `resend-other-partition`: copies of already processed orders events (the
//!   same `ce_source` and `ce_id`) produced into another partition of the
//!   topic, as a producer that re-sends to a different partition would: the
//!   inbox must recognise them there.
//!
//! A process that exits on its own (e.g. when the database goes away) is
//! started again, as a supervisor would, and counted. Then the injector stops,
//! the harness waits for quiescence (every order paid, every payment notified,
//! the outbox drained, every effect done, nothing parked) and checks: one
//! payment row and one distinct charge per order, one merchant webhook (in
//! outcome: distinct keys) per payment, per-key order in `payments.history`,
//! nothing lost (orders = payments + dead letters, dead letters 0 apart from
//! the hostile records, every one of which is dead-lettered once with a reason).
//!
//! Everything is fresh (database `oncely_torture_<id>`, topics and groups
//! `oncely-torture-<id>-*`) and removed at the end; logs are kept on failure.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use oncely::admin::KafkaAdmin;
use oncely_testkit::supervisor::{self as harness, Procs};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

/// Partitions of the run's topics.
const PARTITIONS: i32 = 4;
/// Concurrent HTTP clients posting orders.
const CLIENTS: usize = 16;
/// How long one order may take to be accepted (retries included).
const REQUEST_DEADLINE: Duration = Duration::from_secs(300);
/// How long a frozen member stays frozen (its session timeout is 6 s).
const FREEZE: Duration = Duration::from_secs(10);
/// At most this many events of a partition are copied into another one.
const RESEND: i64 = 50;
/// The key prefix of the hostile records.
const HOSTILE_PREFIX: &[u8] = b"hostile-";
/// How long a crashed or killed service may take to come back.
const RESTART_DEADLINE: Duration = Duration::from_secs(180);

/// Options of `bench torture`.
#[derive(Debug, Clone, Args)]
pub struct TortureArgs {
    /// Orders to drive through the pipeline.
    #[arg(long, default_value_t = 5_000)]
    pub orders: u64,
    /// Seed of the fault injector's RNG (random if absent; printed to replay a run).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object with the results as the last line.
    #[arg(long)]
    pub json: bool,
    /// Orders posted per second.
    #[arg(long, default_value_t = 40.0)]
    pub rate: f64,
    /// Confirm every Nth order too (OrderCreated then OrderConfirmed: per-key order); 0: none.
    #[arg(long, default_value_t = 2)]
    pub confirm_every: u64,
    /// Inject every kind of fault at least this many times (the run goes on injecting until it has).
    #[arg(long, default_value_t = 0)]
    pub faults_min: u32,
    /// Inject at least this many faults in all.
    #[arg(long, default_value_t = 0)]
    pub faults_total_min: u32,
    /// Shortest pause between two faults, in milliseconds.
    #[arg(long, default_value_t = 2_000)]
    pub fault_interval_min_ms: u64,
    /// Longest pause between two faults, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub fault_interval_max_ms: u64,
    /// Fault kinds not to inject (comma separated names, e.g. `restart-kafka`).
    #[arg(long, value_delimiter = ',')]
    pub without: Vec<String>,
    /// How long to wait for quiescence after the last fault, in seconds.
    #[arg(long, default_value_t = 300)]
    pub quiesce_timeout_s: u64,
    /// Kafka bootstrap servers.
    #[arg(long, env = "ONCELY_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    pub bootstrap_servers: String,
    /// PostgreSQL URL of a database on the server; the run creates its own database beside it.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://oncely:oncely@127.0.0.1:5432/oncely")]
    pub database_url: String,
    /// The reference application's binary (default: `payments` next to this binary).
    #[arg(long, env = "ONCELY_PAYMENTS_BIN", value_name = "FILE")]
    pub payments_bin: Option<PathBuf>,
    /// Runs Kafka's own tools (default: `scripts/kafka-tool` of this checkout).
    #[arg(long, env = "ONCELY_KAFKA_TOOL", value_name = "FILE")]
    pub kafka_tool: Option<PathBuf>,
    /// Starts and restarts the services (default: `scripts/services` of this checkout).
    #[arg(long, env = "ONCELY_SERVICES_SCRIPT", value_name = "FILE")]
    pub services_script: Option<PathBuf>,
    /// Keep the database, topics, groups and logs afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillPaymentService,
    KillWebhookDispatcher,
    KillRelay,
    AddMember,
    RemoveMember,
    RewindWebhookDispatcher,
    RewindPaymentService,
    RestartKafka,
    RestartPostgres,
    FreezePaymentService,
    FreezeWebhookDispatcher,
    HostileRecords,
    ResendOtherPartition,
}

impl Fault {
    const ALL: [Fault; 13] = [
        Fault::KillPaymentService,
        Fault::KillWebhookDispatcher,
        Fault::KillRelay,
        Fault::AddMember,
        Fault::RemoveMember,
        Fault::RewindWebhookDispatcher,
        Fault::RewindPaymentService,
        Fault::RestartKafka,
        Fault::RestartPostgres,
        Fault::FreezePaymentService,
        Fault::FreezeWebhookDispatcher,
        Fault::HostileRecords,
        Fault::ResendOtherPartition,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::KillPaymentService => "kill-payment-service",
            Fault::KillWebhookDispatcher => "kill-webhook-dispatcher",
            Fault::KillRelay => "kill-relay",
            Fault::AddMember => "add-member",
            Fault::RemoveMember => "remove-member",
            Fault::RewindWebhookDispatcher => "rewind-webhook-dispatcher",
            Fault::RewindPaymentService => "rewind-payment-service",
            Fault::RestartKafka => "restart-kafka",
            Fault::RestartPostgres => "restart-postgres",
            Fault::FreezePaymentService => "freeze-payment-service",
            Fault::FreezeWebhookDispatcher => "freeze-webhook-dispatcher",
            Fault::HostileRecords => "hostile-records",
            Fault::ResendOtherPartition => "resend-other-partition",
        }
    }
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

/// The results, printed as a table and as JSON.
#[derive(Debug, Default, Serialize)]
struct Report {
    ok: bool,
    seed: u64,
    run_id: String,
    orders: u64,
    confirmed_orders: u64,
    payments: u64,
    orders_without_payment: u64,
    distinct_charges: u64,
    duplicate_charges: u64,
    gateway_calls: u64,
    charge_intents: u64,
    webhooks: u64,
    duplicate_webhooks: u64,
    missing_webhooks: u64,
    merchant_calls: u64,
    webhook_keys_called_more_than_once: u64,
    webhook_intents: u64,
    order_violations: u64,
    dead_letters: u64,
    hostile_records: u64,
    hostile_dead_letters: u64,
    hostile_without_reason: u64,
    resent_copies: u64,
    lost: u64,
    faults: BTreeMap<String, u64>,
    faults_total: u64,
    fault_errors: u64,
    unexpected_exits: BTreeMap<String, u64>,
    client_retries: u64,
    quiesced: bool,
    load_seconds: f64,
    quiesce_seconds: f64,
    seconds: f64,
    problems: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A snapshot of the pipeline's progress.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    orders: i64,
    confirmed_orders: i64,
    payments: i64,
    confirmed_payments: i64,
    outbox_pending: i64,
    effects_open: i64,
    parked: i64,
    /// Dead letters apart from the hostile records'.
    dead_letters: i64,
    hostile_dead_letters: i64,
    gw: Stats,
}

impl Snapshot {
    /// What is still missing for quiescence (empty: quiet).
    fn missing(&self, posted: u64, hostile: u64) -> Vec<String> {
        let mut m = Vec::new();
        if self.hostile_dead_letters < hostile as i64 {
            m.push(format!("hostile records dead-lettered {}/{hostile}", self.hostile_dead_letters));
        }
        if self.orders < posted as i64 {
            m.push(format!("orders {}/{posted}", self.orders));
        }
        if self.payments + self.dead_letters < self.orders {
            m.push(format!("payments {}/{} ({} dead letters)", self.payments, self.orders, self.dead_letters));
        }
        if self.confirmed_payments < self.confirmed_orders {
            m.push(format!("confirmations applied {}/{}", self.confirmed_payments, self.confirmed_orders));
        }
        if self.outbox_pending > 0 {
            m.push(format!("outbox pending {}", self.outbox_pending));
        }
        if self.effects_open > 0 {
            m.push(format!("effects not done {}", self.effects_open));
        }
        if self.parked > 0 {
            m.push(format!("parked events {}", self.parked));
        }
        if (self.gw.distinct_charges as i64) < self.payments {
            m.push(format!("charges {}/{}", self.gw.distinct_charges, self.payments));
        }
        if (self.gw.distinct_webhooks as i64) < self.payments {
            m.push(format!("webhooks {}/{}", self.gw.distinct_webhooks, self.payments));
        }
        m
    }
}

/// The load's counters, shared with the clients.
#[derive(Debug, Default)]
struct Load {
    next: AtomicU64,
    created: AtomicU64,
    confirmed: AtomicU64,
    retries: AtomicU64,
    /// When the last client finished, in ms since the start.
    finished_ms: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Names of everything the run creates.
#[derive(Debug, Clone)]
struct Names {
    database: String,
    prefix: String,
    orders: String,
    payments: String,
    payment_group: String,
    webhook_group: String,
}

impl Names {
    fn new(id: &str) -> Self {
        let prefix = format!("oncely-torture-{id}");
        Names {
            database: format!("oncely_torture_{id}"),
            orders: format!("{prefix}-orders"),
            payments: format!("{prefix}-payments"),
            payment_group: format!("{prefix}-payment-service"),
            webhook_group: format!("{prefix}-webhook-dispatcher"),
            prefix,
        }
    }
}

/// The run's state.
struct Torture {
    args: TortureArgs,
    id: String,
    names: Names,
    dir: PathBuf,
    pool: PgPool,
    admin: KafkaAdmin,
    http: reqwest::Client,
    procs: Procs,
    kafka_tool: PathBuf,
    services: PathBuf,
    gateway: String,
    order_service: String,
    rng: fastrand::Rng,
    faults: BTreeMap<Fault, u64>,
    fault_errors: u64,
    unexpected_exits: BTreeMap<String, u64>,
    touched_services: bool,
    /// Hostile records published (each must end as one dead letter).
    hostile_sent: u64,
    /// Copies produced into another partition.
    resent: u64,
}

/// Progress lines on stdout, flushed (also with `--json`, whose object is the last line).
fn say(s: &str) {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}");
    let _ = o.flush();
}

/// Runs `bench torture`.
pub async fn run(args: TortureArgs) -> Result<()> {
    let started = Instant::now();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut report = Report { seed, ..Report::default() };
    say(&format!(
        "bench torture: {} orders at {}/s through the payments pipeline under faults; seed {seed} \
         (replay with --seed {seed})",
        args.orders, args.rate
    ));
    let mut t = match Torture::setup(args.clone(), seed).await {
        Ok(t) => t,
        Err(e) => {
            say(&format!("the torture run could not start: {e:#}"));
            report.error = Some(format!("{e:#}"));
            report.seconds = started.elapsed().as_secs_f64();
            if args.json {
                say(&serde_json::to_string(&report)?);
            }
            bail!("bench torture could not start");
        }
    };
    report.run_id = t.id.clone();
    let r = tokio::select! {
        r = t.drive(&mut report) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if let Err(e) = &r {
        say(&format!("\n  ✗ stopped: {e:#}"));
        report.error = Some(format!("{e:#}"));
    }
    report.faults = t.faults.iter().map(|(k, v)| (k.name().to_owned(), *v)).collect();
    report.faults_total = t.faults.values().sum();
    report.fault_errors = t.fault_errors;
    report.unexpected_exits = t.unexpected_exits.clone();
    report.ok = r.is_ok() && report.problems.is_empty() && report.quiesced;
    t.teardown(!report.ok).await;
    report.seconds = started.elapsed().as_secs_f64();
    print_table(&report);
    if args.json {
        say(&serde_json::to_string(&report)?);
    }
    if !report.ok {
        bail!("bench torture failed (seed {seed})");
    }
    Ok(())
}

impl Torture {
    async fn setup(args: TortureArgs, seed: u64) -> Result<Torture> {
        anyhow::ensure!(args.orders > 0, "--orders must be positive");
        anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
        anyhow::ensure!(
            args.fault_interval_min_ms <= args.fault_interval_max_ms,
            "--fault-interval-min-ms must not exceed --fault-interval-max-ms"
        );
        for w in &args.without {
            anyhow::ensure!(Fault::ALL.iter().any(|f| f.name() == w), "--without: unknown fault kind {w:?}");
        }
        let exe = std::env::current_exe().context("locating this binary")?;
        let bin = match &args.payments_bin {
            Some(p) => p.clone(),
            None => exe.parent().context("this binary has no directory")?.join("payments"),
        };
        anyhow::ensure!(
            bin.is_file(),
            "the reference application's binary {} does not exist: build it with `cargo build -p payments` \
             (same profile as oncely-bench), or pass --payments-bin",
            bin.display()
        );
        let kafka_tool = match &args.kafka_tool {
            Some(p) => p.clone(),
            None => harness::find_above(&exe, "scripts/kafka-tool").context("scripts/kafka-tool was not found")?,
        };
        let services = match &args.services_script {
            Some(p) => p.clone(),
            None => harness::find_above(&exe, "scripts/services").context("scripts/services was not found")?,
        };
        let admin = KafkaAdmin::new(&args.bootstrap_servers, &[])
            .map_err(anyhow::Error::from)?
            .request_timeout(Duration::from_secs(10));
        let cluster = admin.describe_cluster().await.with_context(|| {
            format!("Kafka at {} is not reachable (start it with scripts/services up)", args.bootstrap_servers)
        })?;

        let id = format!("{:08x}", fastrand::u32(..));
        let names = Names::new(&id);
        let dir = std::env::temp_dir().join(format!("oncely-torture-{id}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        harness::create_database(&args.database_url, &names.database).await?;
        let db_url = harness::with_database(&args.database_url, &names.database);
        let pool = match oncely::store::connect(&db_url, 4).await {
            Ok(p) => p,
            Err(e) => {
                let _ = harness::drop_database(&args.database_url, &names.database).await;
                return Err(e).context("connecting to the run's database");
            }
        };
        let common = vec![
            "--bootstrap-servers".into(),
            args.bootstrap_servers.clone(),
            "--database-url".into(),
            db_url,
            "--orders-topic".into(),
            names.orders.clone(),
            "--payments-topic".into(),
            names.payments.clone(),
        ];
        let log_filter =
            std::env::var("ONCELY_TORTURE_LOG").unwrap_or_else(|_| "warn,oncely=info,payments=info".into());
        let procs = Procs::new(bin, common, dir.clone(), &log_filter);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        say(&format!(
            "  services: Kafka {} (cluster {}), PostgreSQL {}",
            args.bootstrap_servers,
            cluster.cluster_id,
            payments::schema::redact(&args.database_url)
        ));
        let mut t = Torture {
            args,
            id,
            names,
            dir,
            pool,
            admin,
            http,
            procs,
            kafka_tool,
            services,
            gateway: String::new(),
            order_service: String::new(),
            rng: fastrand::Rng::with_seed(seed),
            faults: BTreeMap::new(),
            fault_errors: 0,
            unexpected_exits: BTreeMap::new(),
            touched_services: false,
            hostile_sent: 0,
            resent: 0,
        };
        if let Err(e) = t.start_app().await {
            t.teardown(true).await;
            return Err(e);
        }
        Ok(t)
    }

    /// Creates the topics, migrates, starts every service.
    async fn start_app(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let n = self.names.clone();
        harness::create_topics(&self.args.bootstrap_servers, &[&n.orders, &n.payments], PARTITIONS).await?;
        say(&format!(
            "  run {}: database {}, topics {} and {} ({PARTITIONS} partitions), logs in {}",
            self.id,
            n.database,
            n.orders,
            n.payments,
            self.dir.display()
        ));
        let bin = self.procs.bin().to_path_buf();
        let mut margs: Vec<&str> = self.procs.common().iter().map(String::as_str).collect();
        margs.push("migrate");
        harness::run_tool(&bin, &margs, harness::START_TIMEOUT).await.context("payments migrate")?;

        self.procs.start("fake-gateway", &["fake-gateway".into(), "--listen".into(), "127.0.0.1:0".into()]).await?;
        self.gateway = self.procs.url("fake-gateway")?;
        // A fixed port, so that a restarted order-service is where the clients look.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("picking a free port")?
            .port();
        self.procs
            .start("order-service", &["order-service".into(), "--listen".into(), format!("127.0.0.1:{port}")])
            .await?;
        self.order_service = self.procs.url("order-service")?;
        self.procs.start("relay", &["relay".into()]).await?;
        self.procs.start("payment-service", &self.consumer_args("payment-service")).await?;
        self.procs.start("webhook-dispatcher", &self.consumer_args("webhook-dispatcher")).await?;
        say(&format!(
            "  started: fake-gateway (gateway + merchant), order-service, relay, payment-service, webhook-dispatcher \
             ({:.1} s)",
            t0.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// The arguments of a payment-service or webhook-dispatcher member.
    fn consumer_args(&self, service: &str) -> Vec<String> {
        let (group, url_flag) = match service {
            "payment-service" => (&self.names.payment_group, "--gateway-url"),
            _ => (&self.names.webhook_group, "--merchant-url"),
        };
        [
            service,
            "--group",
            group,
            url_flag,
            &self.gateway,
            // A killed member's partitions move after 6 s, not the broker's 45 s.
            "--set",
            "session_timeout_ms=6000",
            // A call interrupted by a crash is taken up again 6 s later.
            "--set",
            "effect_lease_ms=6000",
            "--call-timeout-ms",
            "4000",
            // Follow a rewind: re-read everything, the inbox drops the duplicates.
            "--set",
            "rewind_policy=replay",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Posts the orders while injecting faults, waits for quiescence, checks.
    async fn drive(&mut self, report: &mut Report) -> Result<()> {
        let t0 = Instant::now();
        let load = Arc::new(Load::default());
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            let (http, base, load, id) = (self.http.clone(), self.order_service.clone(), load.clone(), self.id.clone());
            let (n, rate, confirm_every) = (self.args.orders, self.args.rate, self.args.confirm_every);
            clients.spawn(async move { client(http, base, load, id, n, rate, confirm_every, t0).await });
        }
        let kinds: Vec<Fault> =
            Fault::ALL.into_iter().filter(|f| !self.args.without.iter().any(|w| w == f.name())).collect();
        anyhow::ensure!(!kinds.is_empty(), "every fault kind is excluded");
        let mut required: Vec<Fault> =
            kinds.iter().flat_map(|f| std::iter::repeat_n(*f, self.args.faults_min as usize)).collect();
        self.rng.shuffle(&mut required);
        let mut next_fault = Instant::now() + self.interval();
        let mut last_progress = Instant::now();
        let mut load_done: Option<Duration> = None;
        say(&format!(
            "\n  injecting faults every {:.1}-{:.1} s: {}",
            self.args.fault_interval_min_ms as f64 / 1000.0,
            self.args.fault_interval_max_ms as f64 / 1000.0,
            kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
        ));
        loop {
            self.supervise().await?;
            if load_done.is_none() {
                while let Some(r) = clients.try_join_next() {
                    r.context("an order client")??;
                }
                if clients.is_empty() {
                    let d = Duration::from_millis(load.finished_ms.load(Ordering::Relaxed));
                    load_done = Some(d);
                    say(&format!(
                        "  all {} orders accepted by the order-service in {:.1} s ({} client retries)",
                        self.args.orders,
                        d.as_secs_f64(),
                        load.retries.load(Ordering::Relaxed)
                    ));
                }
            }
            let total: u64 = self.faults.values().sum();
            if load_done.is_some() && required.is_empty() && total >= u64::from(self.args.faults_total_min) {
                break;
            }
            if Instant::now() >= next_fault {
                let fault = match required.pop() {
                    Some(f) => f,
                    None => kinds[self.rng.usize(..kinds.len())],
                };
                let done = self.inject(fault).await;
                if done.is_none() && fault == Fault::ResendOtherPartition {
                    // Too early (nothing applied yet to copy): again later.
                    required.insert(0, fault);
                }
                if fault == Fault::AddMember && done == Some(Fault::RemoveMember) {
                    // Both extra members were running: one was removed; add one next time.
                    if required.len() < kinds.len() * self.args.faults_min as usize {
                        required.push(Fault::AddMember);
                    }
                }
                if fault == Fault::RemoveMember && done == Some(Fault::AddMember) {
                    // There was no member to remove: one was added; remove it next time.
                    if required.len() < kinds.len() * self.args.faults_min as usize {
                        required.push(Fault::RemoveMember);
                    }
                }
                next_fault = Instant::now() + self.interval();
            }
            if last_progress.elapsed() > Duration::from_secs(5) {
                self.progress(&load).await;
                last_progress = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        report.load_seconds = load_done.map(|d| d.as_secs_f64()).unwrap_or_default();
        report.client_retries = load.retries.load(Ordering::Relaxed);
        say(&format!(
            "\n  faults stopped after {:.1} s ({} injected); waiting for quiescence (at most {} s)",
            t0.elapsed().as_secs_f64(),
            self.faults.values().sum::<u64>(),
            self.args.quiesce_timeout_s
        ));

        // Quiescence.
        let q0 = Instant::now();
        let deadline = q0 + Duration::from_secs(self.args.quiesce_timeout_s);
        let posted = load.created.load(Ordering::Relaxed);
        let mut last = Snapshot::default();
        let mut last_print = Instant::now();
        loop {
            self.supervise().await?;
            match self.snapshot().await {
                Ok(s) => {
                    let missing = s.missing(posted, self.hostile_sent);
                    last = s;
                    if missing.is_empty() {
                        report.quiesced = true;
                        break;
                    }
                    if last_print.elapsed() > Duration::from_secs(5) {
                        say(&format!("    … still missing: {}", missing.join(", ")));
                        last_print = Instant::now();
                    }
                }
                Err(e) => tracing::debug!(error = %e, "Reading the progress failed."),
            }
            if Instant::now() > deadline {
                let missing = last.missing(posted, self.hostile_sent);
                report.problems.push(format!(
                    "not quiet after {} s: {}{}",
                    self.args.quiesce_timeout_s,
                    missing.join(", "),
                    self.effect_breakdown().await
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        report.quiesce_seconds = q0.elapsed().as_secs_f64();
        if report.quiesced {
            say(&format!("  quiet after {:.1} s", report.quiesce_seconds));
        }
        report.confirmed_orders = load.confirmed.load(Ordering::Relaxed);
        self.check(report, posted).await
    }

    /// A pause before the next fault, from the seeded RNG.
    fn interval(&mut self) -> Duration {
        Duration::from_millis(self.rng.u64(self.args.fault_interval_min_ms..=self.args.fault_interval_max_ms))
    }

    /// Starts again every service that exited on its own.
    async fn supervise(&mut self) -> Result<()> {
        for e in self.procs.reap() {
            if e.name == "fake-gateway" {
                bail!("the fake gateway exited ({:?}); its counts are lost:\n{}", e.status, harness::tail(&e.log, 10));
            }
            *self.unexpected_exits.entry(e.name.clone()).or_default() += 1;
            say(&format!(
                "    ! {} exited on its own ({}); starting it again. Its log ends:\n{}",
                e.name,
                e.status.map_or("?".into(), |s| s.to_string()),
                harness::tail(&e.log, 3)
            ));
            self.start_retry(&e.name, &e.args).await?;
        }
        Ok(())
    }

    /// Starts `name`, retrying while the services it needs come back.
    async fn start_retry(&mut self, name: &str, args: &[String]) -> Result<()> {
        let deadline = Instant::now() + RESTART_DEADLINE;
        loop {
            match self.procs.start(name, args).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::info!(service = name, error = %e, "Starting failed; retrying.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.context(format!("{name} did not come back within {RESTART_DEADLINE:?}"))),
            }
        }
    }

    /// Injects `fault` (or, for member changes that are not possible, the
    /// other one); returns what was injected, `None` if it failed.
    async fn inject(&mut self, fault: Fault) -> Option<Fault> {
        let t0 = Instant::now();
        let extras: Vec<&str> =
            ["payment-service+", "webhook-dispatcher+"].into_iter().filter(|n| self.procs.is_running(n)).collect();
        let fault = match fault {
            Fault::RemoveMember if extras.is_empty() => Fault::AddMember,
            Fault::AddMember if extras.len() == 2 => Fault::RemoveMember,
            f => f,
        };
        let r: Result<String> = match fault {
            Fault::KillPaymentService => self.kill_restart("payment-service").await,
            Fault::KillWebhookDispatcher => self.kill_restart("webhook-dispatcher").await,
            Fault::KillRelay => self.kill_restart("relay").await,
            Fault::AddMember => {
                let free: Vec<&str> = ["payment-service", "webhook-dispatcher"]
                    .into_iter()
                    .filter(|s| !self.procs.is_running(&format!("{s}+")))
                    .collect();
                let service = free[self.rng.usize(..free.len())];
                let args = self.consumer_args(service);
                let name = format!("{service}+");
                self.start_retry(&name, &args).await.map(|()| format!("{name} joined the group"))
            }
            Fault::RemoveMember => {
                let name = extras[self.rng.usize(..extras.len())].to_owned();
                self.procs.stop(&name, Duration::from_secs(30)).await.map(|_| format!("{name} left (SIGTERM)"))
            }
            Fault::RewindWebhookDispatcher => {
                let (g, t) = (self.names.webhook_group.clone(), self.names.payments.clone());
                self.rewind("webhook-dispatcher", &g, &t).await
            }
            Fault::RewindPaymentService => {
                let (g, t) = (self.names.payment_group.clone(), self.names.orders.clone());
                self.rewind("payment-service", &g, &t).await
            }
            Fault::RestartKafka => self.services_cmd("restart-kafka").await,
            Fault::RestartPostgres => self.services_cmd("restart-postgres").await,
            Fault::FreezePaymentService => self.freeze("payment-service").await,
            Fault::FreezeWebhookDispatcher => self.freeze("webhook-dispatcher").await,
            Fault::HostileRecords => self.hostile().await,
            Fault::ResendOtherPartition => self.resend().await,
        };
        let n = self.faults.values().sum::<u64>() + u64::from(r.is_ok());
        match r {
            Ok(detail) => {
                *self.faults.entry(fault).or_default() += 1;
                say(&format!("  fault {n:>3} {:<26} {detail} ({:.1} s)", fault.name(), t0.elapsed().as_secs_f64()));
                Some(fault)
            }
            Err(e) => {
                self.fault_errors += 1;
                say(&format!("  fault     {:<26} FAILED: {e:#}", fault.name()));
                None
            }
        }
    }

    async fn kill_restart(&mut self, name: &str) -> Result<String> {
        let args = self.procs.kill(name).await?;
        self.start_retry(name, &args).await?;
        Ok(format!("{name} killed (SIGKILL) and started again"))
    }

    /// A zombie: `service` frozen past its session timeout while another
    /// member of its group runs, then resumed.
    async fn freeze(&mut self, service: &str) -> Result<String> {
        let other = format!("{service}+");
        let mut started = "";
        if !self.procs.is_running(&other) {
            let args = self.consumer_args(service);
            self.start_retry(&other, &args).await?;
            started = ", started to take over,";
        }
        self.procs.signal(service, "STOP")?;
        // The fault's length, not a wait for something: the member must stay
        // frozen past its session timeout (6 s) for the group to move on.
        tokio::time::sleep(FREEZE).await;
        self.procs.signal(service, "CONT")?;
        if !started.is_empty() {
            // Leave the group's membership as it was (the member faults count on it).
            self.procs.stop(&other, Duration::from_secs(30)).await?;
            started = ", started to take over and stopped after,";
        }
        Ok(format!("{service} frozen (SIGSTOP) for {} s while {other}{started} ran; SIGCONT", FREEZE.as_secs()))
    }

    /// Publishes records no handler can take into the orders topic.
    async fn hostile(&mut self) -> Result<String> {
        let publisher = oncely::Publisher::new(self.args.bootstrap_servers.as_str(), "/torture/hostile")?;
        let records = hostile_records(self.hostile_sent);
        for (key, payload, headers) in &records {
            publisher.publish_raw(&self.names.orders, Some(key), payload.as_deref(), headers).await?;
            self.hostile_sent += 1;
        }
        Ok(format!(
            "{} records published (header name not UTF-8, NUL in ce_id, no ce_id, no payload, 600 kB not JSON)",
            records.len()
        ))
    }

    /// Copies already processed orders events into another partition.
    async fn resend(&mut self) -> Result<String> {
        let from = self.rng.i32(0..PARTITIONS);
        let to = (from + 1 + self.rng.i32(0..PARTITIONS - 1)) % PARTITIONS;
        let topic = self.names.orders.clone();
        // Only what the payment-service has applied: a copy of an event its
        // original has not reached yet would be the first delivery.
        let applied: Option<i64> = sqlx::query_scalar(
            "SELECT next_offset FROM oncely.offsets WHERE consumer = $1 AND topic = $2 AND partition = $3",
        )
        .bind(&self.names.payment_group)
        .bind(&topic)
        .bind(from)
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        let upto = applied.unwrap_or(0).min(RESEND);
        if upto == 0 {
            bail!("nothing applied yet in partition {from}: no copies (tried again later)");
        }
        let records = read_partition(&self.args.bootstrap_servers, &topic, from, upto).await?;
        let producer: rdkafka::producer::FutureProducer =
            oncely::kafka::KafkaConnection::new(self.args.bootstrap_servers.as_str()).client_config()?.create()?;
        let mut copies = 0u64;
        for r in records.iter().filter(|r| r.key.as_deref().is_some_and(|k| !k.starts_with(HOSTILE_PREFIX))) {
            let headers = oncely::kafka::record_headers(&r.headers)?;
            let mut rec = rdkafka::producer::FutureRecord::<[u8], [u8]>::to(&topic).partition(to).headers(headers);
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(p) = &r.payload {
                rec = rec.payload(p.as_slice());
            }
            producer.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
            copies += 1;
        }
        self.resent += copies;
        Ok(format!("{copies} events of partition {from} (offsets 0..{upto}) produced again into partition {to}"))
    }

    /// Stops every member of `group`, rewinds it with Kafka's tool, starts them again.
    async fn rewind(&mut self, service: &str, group: &str, topic: &str) -> Result<String> {
        let mut stopped = Vec::new();
        for name in [service.to_owned(), format!("{service}+")] {
            if let Ok(args) = self.procs.args_of(&name) {
                if let Err(e) = self.procs.stop(&name, Duration::from_secs(30)).await {
                    tracing::warn!(service = %name, error = %e, "Stopping for the rewind.");
                }
                stopped.push((name, args));
            }
        }
        let reset = async {
            let admin = &self.admin;
            harness::wait_for(
                &format!("group {group} to have no members"),
                Duration::from_secs(120),
                Duration::from_millis(250),
                || async move {
                    let d = admin.describe_consumer_groups(&[group]).await.map_err(anyhow::Error::from)?;
                    Ok(d.first().is_some_and(|g| g.is_inactive()).then_some(()))
                },
            )
            .await?;
            let args = [
                "kafka-consumer-groups",
                "--bootstrap-server",
                self.args.bootstrap_servers.as_str(),
                "--group",
                group,
                "--topic",
                topic,
                "--reset-offsets",
                "--to-earliest",
                "--execute",
            ];
            let out = harness::run_tool(&self.kafka_tool, &args, Duration::from_secs(120)).await?;
            // `GROUP TOPIC PARTITION NEW-OFFSET` rows: the new offsets.
            let offsets: Vec<String> = out
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() >= 4 && f[1] == topic).then(|| format!("[{}]={}", f[2], f[3]))
                })
                .collect();
            Ok::<String, anyhow::Error>(offsets.join(" "))
        }
        .await;
        for (name, args) in &stopped {
            self.start_retry(name, args).await?;
        }
        let offsets = reset?;
        Ok(format!(
            "{} stopped, kafka-consumer-groups --reset-offsets --to-earliest --execute ({offsets}), started again",
            stopped.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(" + ")
        ))
    }

    async fn services_cmd(&mut self, cmd: &str) -> Result<String> {
        self.touched_services = true;
        let log = self.dir.join("services.log");
        harness::run_logged(&self.services, &[cmd], Duration::from_secs(300), &log).await?;
        Ok(format!("scripts/services {cmd}"))
    }

    async fn stats(&self) -> Result<Stats> {
        Ok(self.http.get(format!("{}/stats", self.gateway)).send().await?.error_for_status()?.json().await?)
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let row: (i64, i64, i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "WITH dead AS (SELECT coalesce(substring(key FROM 1 FOR 8) = $1, false) AS hostile FROM oncely.dead_letters)
             SELECT (SELECT count(*) FROM public.orders),
                    (SELECT count(*) FROM public.orders WHERE status = 'confirmed'),
                    (SELECT count(*) FROM public.payments),
                    (SELECT count(*) FROM public.payments WHERE order_status = 'confirmed'),
                    (SELECT count(*) FROM oncely.outbox WHERE published_at IS NULL),
                    (SELECT count(*) FROM oncely.effects WHERE status <> 'done'),
                    (SELECT count(*) FROM oncely.parked),
                    (SELECT count(*) FILTER (WHERE NOT hostile) FROM dead),
                    (SELECT count(*) FILTER (WHERE hostile) FROM dead)",
        )
        .bind(HOSTILE_PREFIX)
        .fetch_one(&self.pool)
        .await?;
        let gw = self.stats().await?;
        Ok(Snapshot {
            orders: row.0,
            confirmed_orders: row.1,
            payments: row.2,
            confirmed_payments: row.3,
            outbox_pending: row.4,
            effects_open: row.5,
            parked: row.6,
            dead_letters: row.7,
            hostile_dead_letters: row.8,
            gw,
        })
    }

    async fn effect_breakdown(&self) -> String {
        let rows: Result<Vec<(String, String, i64)>, _> = sqlx::query_as(
            "SELECT effect, status, count(*) FROM oncely.effects WHERE status <> 'done' GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .fetch_all(&self.pool)
        .await;
        match rows {
            Ok(r) if !r.is_empty() => {
                format!(
                    " (open effects: {})",
                    r.iter().map(|(e, s, n)| format!("{e} {s} {n}")).collect::<Vec<_>>().join(", ")
                )
            }
            _ => String::new(),
        }
    }

    async fn progress(&self, load: &Load) {
        let posted = load.created.load(Ordering::Relaxed);
        let line =
            match self.snapshot().await {
                Ok(s) => format!(
                "    … posted {posted}/{}, payments {}, charges {}, webhooks {}, outbox pending {}, effects open {}",
                self.args.orders, s.payments, s.gw.distinct_charges, s.gw.distinct_webhooks, s.outbox_pending,
                s.effects_open
            ),
                Err(e) => format!("    … posted {posted}/{} (progress unavailable: {e})", self.args.orders),
            };
        let err = load.last_error.lock().ok().and_then(|mut e| e.take());
        say(&line);
        if let Some(e) = err {
            say(&format!("      (clients are retrying; last error: {e})"));
        }
    }

    /// The invariants.
    async fn check(&self, r: &mut Report, posted: u64) -> Result<()> {
        let one = |sql: &'static str| async move {
            let n: i64 = sqlx::query_scalar(sql).fetch_one(&self.pool).await.with_context(|| sql.to_owned())?;
            Ok::<u64, anyhow::Error>(n.max(0) as u64)
        };
        r.orders = one("SELECT count(*) FROM public.orders").await?;
        r.confirmed_orders = one("SELECT count(*) FROM public.orders WHERE status = 'confirmed'").await?;
        r.payments = one("SELECT count(*) FROM public.payments").await?;
        r.orders_without_payment = one(
            "SELECT count(*) FROM public.orders o WHERE NOT EXISTS (SELECT 1 FROM public.payments p WHERE p.order_id = o.id)",
        )
        .await?;
        let payments_without_order = one(
            "SELECT count(*) FROM public.payments p WHERE NOT EXISTS (SELECT 1 FROM public.orders o WHERE o.id = p.order_id)",
        )
        .await?;
        r.order_violations = one("SELECT count(*) FROM public.orders o JOIN public.payments p ON p.order_id = o.id
             WHERE p.history <> CASE WHEN o.status = 'confirmed' THEN ARRAY['OrderCreated', 'OrderConfirmed']
                                     ELSE ARRAY['OrderCreated'] END")
        .await?;
        r.charge_intents = one("SELECT count(*) FROM oncely.effects WHERE effect = 'charge-card'").await?;
        let charge_orders =
            one("SELECT count(DISTINCT payload->>'orderId') FROM oncely.effects WHERE effect = 'charge-card'").await?;
        r.webhook_intents = one("SELECT count(*) FROM oncely.effects WHERE effect = 'merchant-webhook'").await?;
        let webhook_orders =
            one("SELECT count(DISTINCT payload->>'orderId') FROM oncely.effects WHERE effect = 'merchant-webhook'")
                .await?;
        let dead: (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE NOT hostile), count(*) FILTER (WHERE hostile),
                    count(*) FILTER (WHERE hostile AND (reason = '' OR error = ''))
             FROM (SELECT *, coalesce(substring(key FROM 1 FOR 8) = $1, false) AS hostile FROM oncely.dead_letters) d",
        )
        .bind(HOSTILE_PREFIX)
        .fetch_one(&self.pool)
        .await?;
        r.dead_letters = dead.0.max(0) as u64;
        r.hostile_dead_letters = dead.1.max(0) as u64;
        r.hostile_without_reason = dead.2.max(0) as u64;
        r.hostile_records = self.hostile_sent;
        r.resent_copies = self.resent;
        let s = self.stats().await?;
        r.gateway_calls = s.charge_calls;
        r.distinct_charges = s.distinct_charges;
        r.duplicate_charges = s.distinct_charges.saturating_sub(r.payments);
        r.merchant_calls = s.webhook_calls;
        r.webhooks = s.distinct_webhooks;
        r.duplicate_webhooks = s.distinct_webhooks.saturating_sub(r.payments);
        r.missing_webhooks = r.payments.saturating_sub(s.distinct_webhooks);
        r.webhook_keys_called_more_than_once = s.duplicate_webhook_keys;
        r.lost = r.orders.saturating_sub(r.payments + r.dead_letters);

        let mut p = |ok: bool, what: String| {
            if !ok {
                r.problems.push(what);
            }
        };
        p(r.orders == posted, format!("{} orders in the database, {posted} accepted", r.orders));
        p(r.orders_without_payment == 0, format!("{} orders without a payment row", r.orders_without_payment));
        p(payments_without_order == 0, format!("{payments_without_order} payments without an order"));
        p(
            r.distinct_charges == r.orders,
            format!("{} distinct charges at the gateway for {} orders", r.distinct_charges, r.orders),
        );
        p(
            r.charge_intents == r.payments && charge_orders == r.payments,
            format!("{} charge intents for {charge_orders} orders, {} payments", r.charge_intents, r.payments),
        );
        p(
            r.webhooks == r.payments,
            format!("{} distinct webhooks at the merchant for {} payments", r.webhooks, r.payments),
        );
        p(
            r.webhook_intents == r.payments && webhook_orders == r.payments,
            format!("{} webhook intents for {webhook_orders} orders, {} payments", r.webhook_intents, r.payments),
        );
        p(r.order_violations == 0, format!("{} payments whose history is out of order", r.order_violations));
        p(r.dead_letters == 0, format!("{} dead letters of events that are not hostile", r.dead_letters));
        p(
            r.hostile_dead_letters == r.hostile_records,
            format!("{} dead letters for {} hostile records", r.hostile_dead_letters, r.hostile_records),
        );
        p(r.hostile_without_reason == 0, format!("{} hostile dead letters without a reason", r.hostile_without_reason));
        p(r.lost == 0, format!("{} orders lost (neither paid nor dead-lettered)", r.lost));
        Ok(())
    }

    /// Stops the services and removes what the run created (unless `--keep`).
    async fn teardown(&mut self, failed: bool) {
        self.procs
            .stop_all(|n| match n {
                "fake-gateway" => 3,
                "order-service" | "relay" => 2,
                _ => 1,
            })
            .await;
        if self.touched_services || failed {
            // Leave the shared services up, whatever happened.
            let log = self.dir.join("services.log");
            if let Err(e) = harness::run_logged(&self.services, &["up"], Duration::from_secs(300), &log).await {
                say(&format!("  cleanup problem: scripts/services up: {e:#}"));
            }
        }
        if self.args.keep {
            say(&format!(
                "\n  kept: database {}, topics {}-*, groups, logs in {}",
                self.names.database,
                self.names.prefix,
                self.dir.display()
            ));
            return;
        }
        let n = &self.names;
        let groups = [n.payment_group.as_str(), n.webhook_group.as_str()];
        if let Err(e) = harness::delete_kafka_objects(&self.args.bootstrap_servers, &n.prefix, &groups).await {
            say(&format!("  cleanup problem: topics and groups: {e:#}"));
        }
        self.pool.close().await;
        if let Err(e) = harness::drop_database(&self.args.database_url, &n.database).await {
            say(&format!("  cleanup problem: {e:#}"));
        }
        if failed {
            say(&format!("  logs kept in {}", self.dir.display()));
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            say(&format!("  cleanup problem: {}: {e}", self.dir.display()));
        }
    }
}

/// One order client: takes the next order number, waits for its slot (the
/// steady rate), posts it until the service has it, then confirms it if asked.
#[allow(clippy::too_many_arguments)]
async fn client(
    http: reqwest::Client,
    base: String,
    load: Arc<Load>,
    id: String,
    n: u64,
    rate: f64,
    confirm_every: u64,
    t0: Instant,
) -> Result<()> {
    loop {
        let i = load.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            load.finished_ms.fetch_max(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
            return Ok(());
        }
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let order_id = format!("t-{id}-{i:07}");
        let body = json!({
            "orderId": order_id,
            "customer": format!("customer-{}", i % 97),
            "amountCents": 100 + (i as i64 % 50) * 10,
        });
        // 409: an earlier attempt went through (its answer was lost).
        post_until(&http, &format!("{base}/orders"), &body, &[201, 409], &load).await?;
        load.created.fetch_add(1, Ordering::Relaxed);
        if confirm_every > 0 && i % confirm_every == 0 {
            // 409: already confirmed by an earlier attempt.
            post_until(&http, &format!("{base}/orders/{order_id}/confirm"), &json!({}), &[200, 409], &load).await?;
            load.confirmed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// POSTs `body` until the answer is one of `done`, retrying on errors, 5xx
/// (and 404 for a confirmation, which cannot lose to its creation), with
/// backoff, for at most [`REQUEST_DEADLINE`].
async fn post_until(
    http: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    done: &[u16],
    load: &Load,
) -> Result<()> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut backoff = Duration::from_millis(100);
    loop {
        let err = match http.post(url).json(body).send().await {
            Ok(r) if done.contains(&r.status().as_u16()) => return Ok(()),
            Ok(r) if r.status().is_client_error() && r.status().as_u16() != 404 => {
                let status = r.status();
                bail!("POST {url} answered {status}: {}", r.text().await.unwrap_or_default());
            }
            Ok(r) => format!("{}", r.status()),
            Err(e) => format!("{e}"),
        };
        load.retries.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = load.last_error.lock() {
            *l = Some(format!("POST {url}: {err}"));
        }
        if Instant::now() > deadline {
            bail!("POST {url} did not succeed within {REQUEST_DEADLINE:?}: {err}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Key, payload and headers of records the payment-service must dead-letter
/// (`n`: how many were published before, for unique keys).
type Hostile = (Vec<u8>, Option<Vec<u8>>, Headers);
type Headers = Vec<(Vec<u8>, Vec<u8>)>;
fn hostile_records(n: u64) -> Vec<Hostile> {
    let headers = |mutate: &dyn Fn(&mut Headers)| {
        let mut h: Headers =
            oncely::envelope::CloudEventAttrs::new_now("/torture/hostile", payments::events::ORDER_CREATED)
                .to_headers()
                .into_iter()
                .map(|(k, v)| (k.into_bytes(), v))
                .collect();
        mutate(&mut h);
        h
    };
    let key = |i: u64, tail: &[u8]| [HOSTILE_PREFIX, format!("{}-", n + i).as_bytes(), tail].concat();
    let id = oncely::envelope::H_ID.as_bytes();
    vec![
        (
            key(0, b""),
            Some(b"\xff\0 not json".to_vec()),
            headers(&|h| h.push((vec![0xff, 0xfe, b'x'], b"\0\xff".to_vec()))),
        ),
        (
            key(1, b""),
            Some(Vec::new()),
            headers(&|h| h.iter_mut().filter(|(k, _)| k == id).for_each(|(_, v)| v.extend_from_slice(b"\0tail"))),
        ),
        (key(2, &[0xff, 0x00]), Some(b"{}".to_vec()), headers(&|h| h.retain(|(k, _)| k != id))),
        (key(3, b""), None, headers(&|_| ())),
        (key(4, b""), Some(vec![b'x'; 600 * 1024]), headers(&|_| ())),
    ]
}

/// Records `0..upto` of one partition, read with a consumer of no group.
async fn read_partition(
    bootstrap: &str,
    topic: &str,
    partition: i32,
    upto: i64,
) -> Result<Vec<oncely::envelope::RawRecord>> {
    use rdkafka::consumer::Consumer as _;
    use rdkafka::Message as _;
    let consumer: rdkafka::consumer::StreamConsumer = oncely::kafka::KafkaConnection::new(bootstrap)
        .client_config()?
        .set("group.id", "oncely-torture-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < upto as usize {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .with_context(|| format!("reading {topic}[{partition}]: {} of {upto} records in 60 s", out.len()))??;
        if m.offset() >= upto {
            break;
        }
        out.push(oncely::envelope::RawRecord::from_message(&m));
    }
    Ok(out)
}

fn print_table(r: &Report) {
    let mut t = String::new();
    let _ = writeln!(t, "\nResults (run {}, seed {}, {:.0} s)", r.run_id, r.seed, r.seconds);
    let row = |t: &mut String, k: &str, v: String| {
        let _ = writeln!(t, "  {k:<44} {v:>12}");
    };
    row(&mut t, "orders (accepted by the order-service)", r.orders.to_string());
    row(&mut t, "  of which confirmed (OrderConfirmed)", r.confirmed_orders.to_string());
    row(&mut t, "payments (rows)", r.payments.to_string());
    row(&mut t, "orders without a payment", r.orders_without_payment.to_string());
    row(&mut t, "distinct charges at the gateway", r.distinct_charges.to_string());
    row(&mut t, "duplicate charges", r.duplicate_charges.to_string());
    row(&mut t, "gateway calls (raw, retries included)", r.gateway_calls.to_string());
    row(&mut t, "distinct webhooks at the merchant", r.webhooks.to_string());
    row(&mut t, "duplicate webhooks (in outcome)", r.duplicate_webhooks.to_string());
    row(&mut t, "missing webhooks", r.missing_webhooks.to_string());
    row(&mut t, "merchant calls (raw, same-key retries included)", r.merchant_calls.to_string());
    row(&mut t, "  keys called more than once", r.webhook_keys_called_more_than_once.to_string());
    row(&mut t, "per-key order violations (payments.history)", r.order_violations.to_string());
    row(&mut t, "dead letters (events that are not hostile)", r.dead_letters.to_string());
    row(&mut t, "hostile records published", r.hostile_records.to_string());
    row(
        &mut t,
        "  dead-lettered with a reason",
        (r.hostile_dead_letters - r.hostile_without_reason.min(r.hostile_dead_letters)).to_string(),
    );
    row(&mut t, "copies produced into another partition", r.resent_copies.to_string());
    row(&mut t, "lost (orders - payments - dead letters)", r.lost.to_string());
    row(&mut t, "client retries (POST /orders, /confirm)", r.client_retries.to_string());
    row(&mut t, "load / quiescence (s)", format!("{:.0} / {:.0}", r.load_seconds, r.quiesce_seconds));
    let _ = writeln!(t, "  faults injected: {} ({} attempts failed)", r.faults_total, r.fault_errors);
    for (k, v) in &r.faults {
        row(&mut t, &format!("  {k}"), v.to_string());
    }
    if !r.unexpected_exits.is_empty() {
        let _ = writeln!(t, "  services that exited on their own (restarted):");
        for (k, v) in &r.unexpected_exits {
            row(&mut t, &format!("  {k}"), v.to_string());
        }
    }
    if r.ok {
        let _ = write!(t, "  OK: every invariant held");
    } else {
        let _ = write!(t, "  FAILED");
        if let Some(e) = &r.error {
            let _ = write!(t, ": stopped: {e}");
        }
        for p in &r.problems {
            let _ = write!(t, "\n    ✗ {p}");
        }
    }
    say(&t);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_names_are_distinct() {
        let mut names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Fault::ALL.len());
    }

    #[test]
    fn a_quiet_snapshot_misses_nothing() {
        let s = Snapshot {
            orders: 10,
            confirmed_orders: 5,
            payments: 10,
            confirmed_payments: 5,
            gw: Stats { distinct_charges: 10, distinct_webhooks: 10, ..Stats::default() },
            ..Snapshot::default()
        };
        assert!(s.missing(10, 0).is_empty());
        let busy = Snapshot { outbox_pending: 3, payments: 9, ..s };
        assert_eq!(busy.missing(10, 0).len(), 2);
        assert_eq!(s.missing(10, 5).len(), 1, "hostile records not dead-lettered yet");
        assert!(Snapshot { hostile_dead_letters: 5, ..s }.missing(10, 5).is_empty());
    }
}
