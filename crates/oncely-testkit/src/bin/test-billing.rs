//! The billing application of the projection tests, as a process they can
//! kill: `test-billing MODE GROUP TOPIC`, with `DATABASE_URL`,
//! `ONCELY_KAFKA_BOOTSTRAP`, `GATEWAY_URL`, optional `MAX_BATCH=N` and
//! `TARGET` (default `billing_v2`). Every mode runs the **fixed** code.
//!
//! - `rebuild`: rebuilds the billing projection of consumer GROUP into
//!   `TARGET` (a rebuild calls no gateway).
//! - `live`: the live consumer GROUP (charges through the gateway).
//! - `serve`: the live consumer and `Projection::serve` together, as the
//!   deployed application runs: it runs the rebuilds an operator requests
//!   with `oncely projection rebuild`.
//!
//! Prints `READY` once started; stops on SIGTERM.

use oncely_testkit::billing::{self, Billing, TAX_PERCENT};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    oncely_testkit::init_tracing_stderr();
    let mut args = std::env::args().skip(1);
    let (Some(mode), Some(group), Some(topic)) = (args.next(), args.next(), args.next()) else {
        anyhow::bail!("usage: test-billing rebuild|live|serve GROUP TOPIC");
    };
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let target = var("TARGET").unwrap_or_else(|| "billing_v2".into());
    let pool = oncely::store::connect(&oncely_testkit::database_url(), 10).await?;
    let gateway = var("GATEWAY_URL").unwrap_or_else(|| "http://127.0.0.1:9".into());
    let max_batch: Option<usize> = var("MAX_BATCH").and_then(|v| v.parse().ok());
    let make = {
        let (group, topic, pool, gateway) = (group.clone(), topic.clone(), pool.clone(), gateway.clone());
        move |tag: &str| fixed(&group, &topic, pool.clone(), &gateway, max_batch, tag)
    };
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            term.recv().await;
            t.cancel();
        }
    });
    println!("READY");
    match mode.as_str() {
        "rebuild" => billing::projection().rebuild(make("rebuild")?, target).run(token).await?,
        "live" => make("v2")?.run(token).await?,
        "serve" => {
            let rebuilds = make.clone();
            let served = billing::projection()
                .serve(move || rebuilds("rebuild").map_err(|e| oncely::Error::Config(format!("{e:#}"))), token.clone());
            let live = make("v2")?.run(token.clone());
            let (s, l) = tokio::join!(served, live);
            s?;
            l?;
        }
        other => anyhow::bail!("unknown mode {other:?}: rebuild, live or serve"),
    }
    Ok(())
}

/// The billing consumer `group` with the fixed code, its rows tagged `tag`.
fn fixed(
    group: &str,
    topic: &str,
    pool: sqlx::PgPool,
    gateway: &str,
    max_batch: Option<usize>,
    tag: &str,
) -> anyhow::Result<oncely::ConsumerBuilder<Billing>> {
    let code = Billing {
        tax_percent: TAX_PERCENT,
        tag: tag.into(),
        invoiced_topic: format!("{topic}.invoiced"),
        reject_orders: Vec::new(),
    };
    let c = billing::consumer(group, topic, pool, code, gateway)?;
    Ok(match max_batch {
        Some(n) => c.max_batch(n),
        None => c,
    })
}
