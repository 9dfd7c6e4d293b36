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
//! `LISTEN <url>` just before (and consumers given `--set metrics_addr=…`,
//! `METRICS <url>`). Consumer settings are oncely's `ConsumerConfig`
//! (`--oncely-config`, `ONCELY_*`, `--set name=value`). SIGTERM or SIGINT stops a process gracefully.
//! The demo (`payments-demo`, module [`demo`]) and the torture run of
//! `oncely-bench` drive them with the test kit's process supervisor.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use tokio_util::sync::CancellationToken;

pub mod demo;
pub mod events;
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
    /// A librdkafka client property for every Kafka client, `name=value`
    /// (repeatable): e.g. `--kafka security.protocol=SASL_SSL
    /// --kafka sasl.mechanism=SCRAM-SHA-512 --kafka ssl.ca.location=ca.pem`.
    #[arg(long = "kafka", value_name = "NAME=VALUE", global = true)]
    pub kafka: Vec<String>,
}

impl Common {
    /// The Kafka connection every client of the app is built from: the
    /// bootstrap servers and the `--kafka` properties.
    pub fn connection(&self) -> Result<oncely::kafka::KafkaConnection> {
        let mut c = oncely::kafka::KafkaConnection::new(&self.bootstrap_servers);
        for p in &self.kafka {
            let (k, v) = p.split_once('=').with_context(|| format!("--kafka {p:?}: expected NAME=VALUE"))?;
            c = c.property(k.trim(), v.trim());
        }
        Ok(c)
    }
}

/// Settings shared by the two oncely consumers. The consumer's own settings
/// are oncely's [`ConsumerConfig`](oncely::config::ConsumerConfig): the
/// `[consumer.<group>]` table of `--oncely-config` (or `ONCELY_CONFIG`), then
/// the `ONCELY_*` variables, then `--set name=value`; the app declares only
/// what is its own (the HTTP call timeout).
#[derive(Debug, Clone, Args)]
pub struct ConsumerOpts {
    /// An `oncely.toml` whose `[consumer.<group>]` table holds this consumer's settings.
    #[arg(long = "oncely-config", env = "ONCELY_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
    /// A consumer setting, `name=value`, over the file and the `ONCELY_*`
    /// variables (repeatable): e.g. `--set session_timeout_ms=6000`
    /// `--set rewind_policy=replay` `--set metrics_addr=127.0.0.1:0`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// Timeout of one HTTP call to the gateway or the merchant.
    #[arg(long, default_value_t = 10_000)]
    pub call_timeout_ms: u64,
}

/// The app's own defaults for its consumers: a killed member's partitions
/// move after 10 s (not the broker's 45 s), an effect call is taken up 30 s
/// after its process died.
const APP_DEFAULTS: &str = "session_timeout_ms = 10000\neffect_lease_ms = 30000\n";

impl ConsumerOpts {
    /// The consumer settings of `group`: the app's defaults, the file, the
    /// `ONCELY_*` variables, then `--set`.
    pub fn settings(&self, group: &str) -> Result<oncely::config::ConsumerConfig> {
        use oncely::config::{ConfigFile, ConsumerConfig, ProcessVars};
        let mut c: ConsumerConfig = toml::from_str(APP_DEFAULTS).context("the app's defaults")?;
        if let Some(path) = &self.config {
            let file = ConfigFile::load(path)?;
            let from_file = ConsumerConfig::load(Some(&file), group, &oncely::config::NoVars)?;
            c = merge(c, from_file)?;
        }
        c = c.apply_vars(&ProcessVars)?;
        if !self.set.is_empty() {
            let mut text = String::new();
            for kv in &self.set {
                let (k, v) = kv.split_once('=').with_context(|| format!("--set {kv}: expected name=value"))?;
                // Numbers and booleans as they are, anything else as a string.
                let value = if v.parse::<f64>().is_ok() || v == "true" || v == "false" || v.starts_with('[') {
                    v.to_owned()
                } else {
                    format!("{v:?}")
                };
                text.push_str(&format!("{} = {value}\n", k.trim()));
            }
            let set: ConsumerConfig =
                toml::from_str(&text).with_context(|| format!("--set: {}", self.set.join(" ")))?;
            c = merge(c, set)?;
        }
        Ok(c)
    }

    /// Checks the settings that depend on each other.
    pub fn validate(&self, settings: &oncely::config::ConsumerConfig) -> Result<()> {
        let lease = settings.effect_lease_ms.unwrap_or(60_000);
        anyhow::ensure!(
            lease > self.call_timeout_ms,
            "effect_lease_ms ({lease}) must exceed --call-timeout-ms ({}): a call still running when its lease \
             ends would be made a second time",
            self.call_timeout_ms
        );
        Ok(())
    }

    /// Applies the settings to a consumer builder (metrics are served by the
    /// process itself, see [`serve_metrics`](Self::serve_metrics)).
    pub fn apply<S: Send + Sync + 'static>(
        &self,
        b: oncely::ConsumerBuilder<S>,
        settings: &oncely::config::ConsumerConfig,
    ) -> oncely::ConsumerBuilder<S> {
        let mut c = settings.clone();
        c.metrics_addr = None;
        // Signals are handled by the process (SIGTERM and SIGINT alike).
        b.config(&c).handle_sigterm(false)
    }

    /// Serves the process's metrics if `metrics_addr` is set, and prints
    /// `METRICS <url>` (the bound address: port 0 picks a free one).
    pub async fn serve_metrics(
        &self,
        settings: &oncely::config::ConsumerConfig,
        shutdown: CancellationToken,
    ) -> Result<()> {
        if let Some(addr) = settings.metrics_addr {
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

/// `over`'s settings on top of `base`'s (both from TOML/variables).
fn merge(
    base: oncely::config::ConsumerConfig,
    over: oncely::config::ConsumerConfig,
) -> Result<oncely::config::ConsumerConfig> {
    let mut v = serde_json::to_value(&base)?;
    if let (Some(b), serde_json::Value::Object(o)) = (v.as_object_mut(), serde_json::to_value(&over)?) {
        for (k, val) in o {
            b.insert(k, val);
        }
    }
    Ok(serde_json::from_value(v)?)
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
pub async fn check_topics(connection: &oncely::kafka::KafkaConnection, topics: &[&str]) -> Result<()> {
    let consumer: BaseConsumer = connection
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

/// The README's "adding oncely to an axum + sqlx service" example, compiled as
/// a doc test (this crate has every dependency it uses).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use super::*;

    fn common(kafka: &[&str]) -> Common {
        Common {
            bootstrap_servers: "b:9092".into(),
            database_url: String::new(),
            orders_topic: String::new(),
            payments_topic: String::new(),
            kafka: kafka.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn kafka_properties_reach_every_client() -> Result<()> {
        let cfg =
            common(&["security.protocol=SASL_SSL", "sasl.mechanism = SCRAM-SHA-512"]).connection()?.client_config()?;
        assert_eq!(cfg.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(cfg.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cfg.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        let err = common(&["no-value"]).connection().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("expected NAME=VALUE"), "{err}");
        Ok(())
    }
}
