//! A consumer process for tests that kill it: `test-consumer GROUP TOPIC` with
//! `DATABASE_URL`, `ONCELY_KAFKA_BOOTSTRAP` and optional settings in
//! variables: `HANG_AFTER=N`, `DELAY_MS=N`, `MAX_BATCH=N`, `TAG=…`,
//! `FAIL_KEYS=k1:3,k2:1`, `BACKOFF_MS=N`, `MAX_ATTEMPTS=N`, `GATEWAY_URL=…`
//! (charge every event), `EFFECT=at_most_once`, `EFFECT_LEASE_MS=N`,
//! `REWIND=skip|replay|halt`, `SWALLOW_KEYS=k1,k2`, `SLOW_KEYS=k1:ms,…`,
//! `SQL_SLEEP_KEYS=k1:ms,…`, `ZOMBIE_TIMEOUT_MS=N`, `DRAIN_TIMEOUT_MS=N`,
//! `SESSION_TIMEOUT_MS=N`, `MAX_POLL_INTERVAL_MS=N`.
//! Prints `READY` once running; stops on SIGTERM.

use std::time::Duration;

use oncely::RewindPolicy;
use oncely_testkit::app;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    oncely_testkit::init_tracing_stderr();
    let mut args = std::env::args().skip(1);
    let (Some(group), Some(topic)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: test-consumer GROUP TOPIC");
    };
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut b = app::Behaviour::tagged(&var("TAG").unwrap_or_else(|| std::process::id().to_string()));
    b.hang_after = var("HANG_AFTER").and_then(|v| v.parse().ok());
    b.fail_times = var("FAIL_KEYS").map(|v| app::parse_fail_keys(&v)).unwrap_or_default();
    b.delay = Duration::from_millis(var("DELAY_MS").and_then(|v| v.parse().ok()).unwrap_or(0));
    b.swallow_keys = var("SWALLOW_KEYS").map(|v| v.split(',').map(str::to_owned).collect()).unwrap_or_default();
    b.slow_keys = var("SLOW_KEYS")
        .map(|v| {
            app::parse_fail_keys(&v).into_iter().map(|(k, ms)| (k, Duration::from_millis(u64::from(ms)))).collect()
        })
        .unwrap_or_default();
    b.sql_sleep_keys = var("SQL_SLEEP_KEYS")
        .map(|v| {
            app::parse_fail_keys(&v).into_iter().map(|(k, ms)| (k, Duration::from_millis(u64::from(ms)))).collect()
        })
        .unwrap_or_default();
    let pool = oncely::store::connect(&oncely_testkit::database_url(), 10).await?;
    let mut c = match var("GATEWAY_URL") {
        Some(url) => {
            let mut opts = match var("EFFECT").as_deref() {
                Some("at_most_once") => oncely::effects::EffectOptions::at_most_once(),
                _ => oncely::effects::EffectOptions::default(),
            };
            opts.backoff = (Duration::from_millis(50), Duration::from_millis(500));
            app::consumer_with_gateway(&group, &topic, pool, b, &url, opts)?
        }
        None => app::consumer(&group, &topic, pool, b),
    }
    .handle_sigterm(true);
    if let Some(ms) = var("EFFECT_LEASE_MS").and_then(|v| v.parse::<u64>().ok()) {
        c = c.effect_lease(Duration::from_millis(ms));
    }
    if let Some(ms) = var("BACKOFF_MS").and_then(|v| v.parse::<u64>().ok()) {
        c = c.retry_backoff(Duration::from_millis(ms), Duration::from_millis(ms * 4));
    }
    if let Some(n) = var("MAX_ATTEMPTS").and_then(|v| v.parse().ok()) {
        c = c.max_attempts(n);
    }
    if let Some(n) = var("MAX_BATCH").and_then(|v| v.parse().ok()) {
        c = c.max_batch(n);
    }
    if let Some(ms) = var("ZOMBIE_TIMEOUT_MS").and_then(|v| v.parse::<u64>().ok()) {
        c = c.zombie_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = var("DRAIN_TIMEOUT_MS").and_then(|v| v.parse::<u64>().ok()) {
        c = c.drain_timeout(Duration::from_millis(ms));
    }
    if let Some(ms) = var("SESSION_TIMEOUT_MS") {
        c = c.kafka("session.timeout.ms", ms);
    }
    if let Some(ms) = var("MAX_POLL_INTERVAL_MS") {
        c = c.kafka("max.poll.interval.ms", ms);
    }
    c = c.rewind_policy(match var("REWIND").as_deref() {
        Some("replay") => RewindPolicy::Replay,
        Some("halt") => RewindPolicy::Halt,
        _ => RewindPolicy::Skip,
    });
    println!("READY");
    c.run(CancellationToken::new()).await?;
    Ok(())
}
