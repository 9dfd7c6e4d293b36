//! `payments <service>`: runs one process of the reference application (see
//! the library docs). Thin: flags, logging, signals; the services live in the
//! library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use payments::{schema, Common, ConsumerOpts};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "payments", about = "oncely's reference application: orders, payments, webhooks")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Apply oncely's migrations and create the application's tables (idempotent).
    Migrate,
    /// HTTP API: POST /orders, POST /orders/{id}/confirm, GET /orders/{id}.
    OrderService {
        /// Address to listen on (port 0 picks a free port; see the LISTEN line).
        #[arg(long, env = "PAYMENTS_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// The outbox relay: publishes the services' events to Kafka.
    Relay {
        /// Relay name (lane owner in `oncely outbox status`); default host-pid.
        #[arg(long)]
        name: Option<String>,
    },
    /// oncely consumer of the orders topic: payment row, card charge, PaymentSucceeded.
    PaymentService {
        /// Consumer group (and oncely consumer name).
        #[arg(long, default_value = "payment-service")]
        group: String,
        /// Base URL of the payment gateway (POST /v1/charges).
        #[arg(long, env = "PAYMENTS_GATEWAY_URL", default_value = "http://127.0.0.1:8081")]
        gateway_url: String,
        /// The tax rate recorded on each payment, in percent (the demo's tax bug: 2).
        #[arg(long, default_value_t = payments::payment::TAX_PERCENT)]
        tax_percent: i64,
        #[command(flatten)]
        opts: ConsumerOpts,
    },
    /// oncely consumer of the payments topic: one merchant webhook per payment.
    WebhookDispatcher {
        /// Consumer group (and oncely consumer name).
        #[arg(long, default_value = "webhook-dispatcher")]
        group: String,
        /// Base URL of the merchant endpoint (POST /webhooks).
        #[arg(long, env = "PAYMENTS_MERCHANT_URL", default_value = "http://127.0.0.1:8081")]
        merchant_url: String,
        #[command(flatten)]
        opts: ConsumerOpts,
    },
    /// The usual dispatcher, for comparison: send, insert "processed", commit.
    NaiveDispatcher {
        /// Consumer group.
        #[arg(long, default_value = "naive-dispatcher")]
        group: String,
        /// Base URL of the merchant endpoint (POST /webhooks).
        #[arg(long, env = "PAYMENTS_NAIVE_MERCHANT_URL", default_value = "http://127.0.0.1:8081")]
        merchant_url: String,
        /// Kafka `session.timeout.ms`.
        #[arg(long, default_value_t = 10_000)]
        session_timeout_ms: u32,
        /// Timeout of one webhook call.
        #[arg(long, default_value_t = 10_000)]
        call_timeout_ms: u64,
    },
    /// A fake payment gateway and merchant endpoint (oncely-testkit's), counting calls.
    FakeGateway {
        /// Address to listen on (port 0 picks a free port; see the LISTEN line).
        #[arg(long, env = "PAYMENTS_GATEWAY_LISTEN", default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
}

/// Logs to stderr; with the `otlp` feature and `OTEL_EXPORTER_OTLP_ENDPOINT`
/// set, also exports spans over OTLP/HTTP (the returned provider flushes them
/// when dropped).
fn init_tracing() -> Option<Box<dyn std::any::Any>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,oncely=info,payments=info"));
    let registry =
        tracing_subscriber::registry().with(filter).with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    #[cfg(feature = "otlp")]
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        use opentelemetry::trace::TracerProvider as _;
        match opentelemetry_otlp::SpanExporter::builder().with_http().build() {
            Ok(exporter) => {
                let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(opentelemetry_sdk::Resource::builder().with_service_name("payments").build())
                    .build();
                let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("payments"));
                registry.with(layer).init();
                struct Flush(opentelemetry_sdk::trace::SdkTracerProvider);
                impl Drop for Flush {
                    fn drop(&mut self) {
                        let _ = self.0.shutdown();
                    }
                }
                return Some(Box::new(Flush(provider)));
            }
            Err(e) => eprintln!("payments: OTLP exporter not started: {e}"),
        }
    }
    registry.init();
    None
}

fn main() -> ExitCode {
    let _telemetry = init_tracing();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("payments: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("payments: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let common = &cli.common;
    let shutdown = payments::shutdown_on_signals()?;
    match &cli.cmd {
        Cmd::Migrate => {
            let pool = schema::connect(&common.database_url, 2).await?;
            schema::migrate(&pool).await?;
            println!("migrated");
        }
        Cmd::OrderService { listen } => {
            let pool = schema::connect(&common.database_url, 16).await?;
            schema::migrate(&pool).await?;
            payments::orders::serve(pool, &common.orders_topic, *listen, shutdown).await?;
        }
        Cmd::Relay { name } => {
            let pool = schema::connect(&common.database_url, 8).await?;
            schema::migrate(&pool).await?;
            payments::relay::run(common, name.as_deref(), pool, shutdown).await?;
        }
        Cmd::PaymentService { group, gateway_url, tax_percent, opts } => {
            let pool = prepare(common, &[&common.orders_topic]).await?;
            let c = payments::payment::consumer(group, common, opts, pool.clone(), gateway_url, *tax_percent)?;
            opts.serve_metrics(&opts.settings(group)?, shutdown.clone()).await?;
            // Beside the live consumer, the rebuilds of its projection that
            // an operator asks for (`oncely projection rebuild`), with the
            // code this process runs.
            let rebuilds = {
                let (group, common, opts, gateway_url, tax) =
                    (group.clone(), common.clone(), opts.clone(), gateway_url.clone(), *tax_percent);
                payments::payment::projection().serve(
                    move || {
                        payments::payment::consumer(&group, &common, &opts, pool.clone(), &gateway_url, tax)
                            .map_err(|e| oncely::Error::Config(format!("{e:#}")))
                    },
                    shutdown.clone(),
                )
            };
            let rebuilds = tokio::spawn(rebuilds);
            run_consumer(c, shutdown).await?;
            rebuilds.await.context("the rebuild task")?.context("serving rebuilds")?;
        }
        Cmd::WebhookDispatcher { group, merchant_url, opts } => {
            let pool = prepare(common, &[&common.payments_topic]).await?;
            let c = payments::webhooks::consumer(group, common, opts, pool, merchant_url)?;
            opts.serve_metrics(&opts.settings(group)?, shutdown.clone()).await?;
            run_consumer(c, shutdown).await?;
        }
        Cmd::NaiveDispatcher { group, merchant_url, session_timeout_ms, call_timeout_ms } => {
            let pool = prepare(common, &[&common.payments_topic]).await?;
            let cfg = payments::naive::NaiveConfig {
                group: group.clone(),
                session_timeout_ms: *session_timeout_ms,
                merchant_url: merchant_url.clone(),
                call_timeout: Duration::from_millis(*call_timeout_ms),
            };
            payments::naive::run(common, &cfg, pool, shutdown).await?;
        }
        Cmd::FakeGateway { listen } => {
            let gw = oncely_testkit::gateway::FakeGateway::start(*listen)
                .await
                .with_context(|| format!("starting the fake gateway on {listen}"))?;
            tracing::info!(url = %gw.url(), "fake gateway listening.");
            payments::listening(&gw.url());
            payments::ready();
            shutdown.cancelled().await;
            let s = gw.stats();
            tracing::info!(?s, "fake gateway stopping.");
        }
    }
    Ok(())
}

/// Connects, migrates and checks the consumer's topics before it starts.
async fn prepare(common: &Common, topics: &[&str]) -> Result<sqlx::PgPool> {
    let pool = schema::connect(&common.database_url, 16).await?;
    schema::migrate(&pool).await?;
    payments::check_topics(&common.connection()?, topics).await?;
    Ok(pool)
}

/// Runs an oncely consumer until `shutdown`; prints `READY` once it starts.
async fn run_consumer<S: Send + Sync + 'static>(
    c: oncely::ConsumerBuilder<S>,
    shutdown: CancellationToken,
) -> Result<()> {
    let run = tokio::spawn(c.run(shutdown.clone()));
    payments::ready();
    run.await.context("the consumer task")?.context("running the consumer")
}
