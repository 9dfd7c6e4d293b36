//! # payments: oncely's reference application
//!
//! The pipeline of the incidents oncely exists for, as separate processes (one
//! binary, `payments <service>`), so that a test can SIGKILL any one of them:
//!
//! ```text
//!  POST /orders ─▶ order-service ──(orders row + OrderCreated, one transaction: the outbox)
//!                                         │
//!                                       relay ──▶ topic `orders` (key: order id)
//!                                                      │
//!                     payment-service (oncely consumer) ◀┘  payments row, `charge-card` intent,
//!                          │                                PaymentSucceeded through the outbox
//!                          ├──▶ fake gateway (POST /v1/charges, Idempotency-Key)
//!                        relay ──▶ topic `payments`
//!                                      │
//!          webhook-dispatcher (oncely) ◀┤  `merchant-webhook` intent ──▶ fake merchant
//!          naive-dispatcher (plain)    ◀┘  send, then insert "processed", then commit ──▶ fake merchant
//! ```
//!
//! Every process takes the same connection flags (`--bootstrap-servers`,
//! `--database-url`, `--orders-topic`, `--payments-topic`, or their variables),
//! logs to stderr, and prints `READY` on stdout once it is up; servers print
//! `LISTEN <url>` just before (and consumers given `--metrics-addr`,
//! `METRICS <url>`). SIGTERM or SIGINT stops a process gracefully.
//! `oncely demo` drives them; a torture harness can do the same.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use tokio_util::sync::CancellationToken;

pub mod events;
pub mod harness;
pub mod naive;
pub mod orders;
pub mod payment;
pub mod relay;
pub mod schema;
pub mod webhooks;

/// Connection settings every service takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Kafka bootstrap servers.
    #[arg(long, env = "ONCELY_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092", global = true)]
    pub bootstrap_servers: String,
    /// PostgreSQL URL of the application's database (which also holds schema `oncely`).
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://oncely:oncely@127.0.0.1:5432/oncely", global = true)]
    pub database_url: String,
    /// Topic of the order events.
    #[arg(long, env = "PAYMENTS_ORDERS_TOPIC", default_value = "orders", global = true)]
    pub orders_topic: String,
    /// Topic of the payment events.
    #[arg(long, env = "PAYMENTS_PAYMENTS_TOPIC", default_value = "payments", global = true)]
    pub payments_topic: String,
}

/// Settings shared by the two oncely consumers.
#[derive(Debug, Clone, Args)]
pub struct ConsumerOpts {
    /// Kafka `session.timeout.ms`: how long a killed member keeps its
    /// partitions before the group moves them (the broker's default is 45 s).
    #[arg(long, default_value_t = 10_000)]
    pub session_timeout_ms: u32,
    /// What the consumer does when someone rewound its group behind its back
    /// (e.g. with `kafka-consumer-groups --reset-offsets`): `skip` keeps the
    /// database offset (nothing is re-read), `replay` follows Kafka and the
    /// inbox drops every duplicate, `halt` pauses the partition.
    #[arg(long, value_enum, default_value_t = Rewind::Skip)]
    pub rewind_policy: Rewind,
    /// Lease of an effect call: an intent whose process died mid-call is taken
    /// up again (with the same idempotency key) after it. Must exceed `--call-timeout-ms`.
    #[arg(long, default_value_t = 30_000)]
    pub effect_lease_ms: u64,
    /// Timeout of one HTTP call to the gateway or the merchant.
    #[arg(long, default_value_t = 10_000)]
    pub call_timeout_ms: u64,
    /// Serve Prometheus metrics on this address (`GET /metrics`); port 0 picks
    /// a free one, printed as `METRICS <url>` before `READY`.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl ConsumerOpts {
    /// Checks the settings that depend on each other.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.effect_lease_ms > self.call_timeout_ms,
            "--effect-lease-ms ({}) must exceed --call-timeout-ms ({}): a call still running when its lease ends \
             would be made a second time",
            self.effect_lease_ms,
            self.call_timeout_ms
        );
        Ok(())
    }

    /// Applies the settings to a consumer builder.
    pub fn apply<S: Send + Sync + 'static>(&self, mut b: oncely::ConsumerBuilder<S>) -> oncely::ConsumerBuilder<S> {
        let session = self.session_timeout_ms.max(1000);
        b = b
            .kafka("session.timeout.ms", session.to_string())
            .kafka("heartbeat.interval.ms", (session / 6).max(100).to_string())
            .rewind_policy(self.rewind_policy.into())
            .effect_lease(Duration::from_millis(self.effect_lease_ms))
            // Signals are handled by the process (SIGTERM and SIGINT alike).
            .handle_sigterm(false);
        b
    }

    /// Serves the process's metrics if `--metrics-addr` was given, and prints
    /// `METRICS <url>` (the bound address: port 0 picks a free one).
    pub async fn serve_metrics(&self, shutdown: CancellationToken) -> Result<()> {
        if let Some(addr) = self.metrics_addr {
            let bound =
                oncely::metrics::serve(addr, shutdown).await.with_context(|| format!("serving metrics on {addr}"))?;
            tracing::info!(addr = %bound, "Serving metrics.");
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "METRICS http://{bound}/metrics");
            let _ = out.flush();
        }
        Ok(())
    }

    /// The call timeout.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
}

/// `--rewind-policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Rewind {
    /// Keep the database offset.
    Skip,
    /// Follow Kafka; the inbox drops the duplicates.
    Replay,
    /// Pause the partition until an operator acts.
    Halt,
}

impl From<Rewind> for oncely::RewindPolicy {
    fn from(r: Rewind) -> Self {
        match r {
            Rewind::Skip => oncely::RewindPolicy::Skip,
            Rewind::Replay => oncely::RewindPolicy::Replay,
            Rewind::Halt => oncely::RewindPolicy::Halt,
        }
    }
}

/// A token cancelled by the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping gracefully."),
            _ = int.recv() => tracing::info!("SIGINT: stopping gracefully."),
        }
        t.cancel();
    });
    Ok(token)
}

/// Prints `READY` on stdout (the line a supervisor waits for).
pub fn ready() {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY");
    let _ = out.flush();
}

/// Prints `LISTEN <url>` on stdout (before `READY`, for servers).
pub fn listening(url: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "LISTEN {url}");
    let _ = out.flush();
}

/// Fails unless every topic exists (the services do not create topics:
/// `auto.create.topics.enable=false`).
pub async fn check_topics(bootstrap: &str, topics: &[&str]) -> Result<()> {
    let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(bootstrap)
        .client_config()?
        .set("allow.auto.create.topics", "false")
        .create()
        .context("creating a Kafka client")?;
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || -> Result<()> {
        for t in &topics {
            let md = consumer
                .fetch_metadata(Some(t), Duration::from_secs(10))
                .with_context(|| format!("reading the metadata of topic {t}"))?;
            let ok = md.topics().first().is_some_and(|m| m.error().is_none() && !m.partitions().is_empty());
            anyhow::ensure!(
                ok,
                "topic {t} does not exist: create it first (scripts/kafka-tool kafka-topics --create ...)"
            );
        }
        Ok(())
    })
    .await
    .context("the metadata task")?
}
