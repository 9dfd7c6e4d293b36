//! A projection rebuild process for tests that kill it: `test-rebuild GROUP
//! TOPIC` rebuilds the billing projection of consumer GROUP into
//! `TARGET` (default `billing_v2`) with the fixed code, with
//! `DATABASE_URL`, `ONCELY_KAFKA_BOOTSTRAP`, optional `MAX_BATCH=N` and
//! `GATEWAY_URL` (never called: a rebuild runs no effect). Prints `READY`
//! once started; stops on SIGTERM.

use oncely_testkit::billing::{self, Billing, TAX_PERCENT};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    oncely_testkit::init_tracing_stderr();
    let mut args = std::env::args().skip(1);
    let (Some(group), Some(topic)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: test-rebuild GROUP TOPIC");
    };
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let target = var("TARGET").unwrap_or_else(|| "billing_v2".into());
    let pool = oncely::store::connect(&oncely_testkit::database_url(), 10).await?;
    let code = Billing { tax_percent: TAX_PERCENT, tag: "rebuild".into(), invoiced_topic: format!("{topic}.invoiced") };
    let gateway = var("GATEWAY_URL").unwrap_or_else(|| "http://127.0.0.1:9".into());
    let mut c = billing::consumer(&group, &topic, pool, code, &gateway)?;
    if let Some(n) = var("MAX_BATCH").and_then(|v| v.parse().ok()) {
        c = c.max_batch(n);
    }
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            term.recv().await;
            t.cancel();
        }
    });
    println!("READY");
    billing::projection().rebuild(c, target).run(token).await?;
    Ok(())
}
