//! oncely's benchmark harness: `oncely-bench <benchmark> [options]`, run by
//! `scripts/bench`. Speed is measured here, never in timed tests; every
//! benchmark reports ratios against a baseline measured in the same run.

use clap::{Parser, Subcommand};

mod common;
mod consume;
mod forward;
mod outbox;
mod torture;

#[derive(Debug, Parser)]
#[command(name = "oncely-bench", about = "oncely's benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The consumer runtime against a plain at-least-once consumer and the naive pattern.
    Consume(consume::ConsumeArgs),
    /// The exactly-once processor against an at-least-once forwarder, and the commit interval's effect.
    Forward(forward::ForwardArgs),
    /// The transactional outbox's relay: throughput, and commit-to-publish latency with NOTIFY and polling only.
    Outbox(outbox::OutboxArgs),
    /// The whole payments pipeline under injected faults (kills, rebalances, rewinds, broker and database restarts), then its invariants.
    Torture(torture::TortureArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().bench {
        Bench::Consume(a) => consume::run(a).await,
        Bench::Forward(a) => forward::run(a).await,
        Bench::Outbox(a) => outbox::run(a).await,
        Bench::Torture(a) => torture::run(a).await,
    }
}
