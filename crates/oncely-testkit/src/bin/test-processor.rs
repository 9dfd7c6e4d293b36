//! A processor process for tests that kill it: `test-processor NAME INPUT
//! OUTPUT[,OUTPUT…]` with `INSTANCE` (its instance id),
//! `ONCELY_KAFKA_BOOTSTRAP` and optional settings in variables:
//! `HANG_AFTER=N` (block at the start of the event after N handled ones),
//! `HANG_KEY=k` (block on the first event of key k), `DELAY_MS=N`,
//! `COMMIT_MS=N`, `COMMIT_EVERY=N`, `TAG=…`. Prints `READY` once running;
//! commits and stops on SIGTERM. Exit code 3 when fenced, 1 on another error.

use std::process::ExitCode;
use std::time::Duration;

use oncely_testkit::processor::{self as proc, Behaviour};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    oncely_testkit::init_tracing_stderr();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("test-processor: {e:#}");
            let fenced = e.downcast_ref::<oncely::Error>().is_some_and(|e| matches!(e, oncely::Error::Fenced { .. }));
            ExitCode::from(if fenced { 3 } else { 1 })
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(name), Some(input), Some(outputs)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: test-processor NAME INPUT OUTPUT[,OUTPUT…]");
    };
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let instance = var("INSTANCE").ok_or_else(|| anyhow::anyhow!("INSTANCE is required"))?;
    let outputs: Vec<&str> = outputs.split(',').filter(|s| !s.is_empty()).collect();
    let mut b = Behaviour::new(&outputs, &var("TAG").unwrap_or_else(|| instance.clone()));
    b.hang_after = var("HANG_AFTER").and_then(|v| v.parse().ok());
    b.hang_key = var("HANG_KEY");
    b.delay = Duration::from_millis(var("DELAY_MS").and_then(|v| v.parse().ok()).unwrap_or(0));
    let mut p = proc::processor(&name, &input, &instance, b).handle_sigterm(true);
    if let Some(ms) = var("COMMIT_MS").and_then(|v| v.parse::<u64>().ok()) {
        p = p.commit_interval(Duration::from_millis(ms));
    }
    if let Some(n) = var("COMMIT_EVERY").and_then(|v| v.parse().ok()) {
        p = p.commit_every(n);
    }
    println!("READY");
    p.run(CancellationToken::new()).await?;
    Ok(())
}
