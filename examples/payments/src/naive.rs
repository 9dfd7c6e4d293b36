//! naive-dispatcher: the webhook dispatcher the way most teams write it, kept
//! for comparison. A plain Kafka consumer with manual commits that, per record:
//!
//! 1. sends the webhook (retrying until the merchant answers),
//! 2. inserts the event into `naive_processed` (`ON CONFLICT DO NOTHING`),
//! 3. commits the record's offset.
//!
//! The "processed" row is written after the side effect, so it prevents
//! nothing: a crash between 1 and 3, a rebalance, or an operator rewinding
//! the group sends the webhook again. Its idempotency key is derived from the
//! delivery (topic, partition, offset), as home-grown delivery ids often are,
//! which says nothing about *which payment* it is: a producer retry at another
//! offset gets another key. No inbox, no check before the call.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use oncely::envelope::{CloudEventAttrs, RawRecord};
use oncely_testkit::gateway::GatewayClient;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Settings of the naive dispatcher.
#[derive(Debug, Clone)]
pub struct NaiveConfig {
    /// Kafka group id.
    pub group: String,
    /// Kafka `session.timeout.ms`.
    pub session_timeout_ms: u32,
    /// Base URL of the merchant endpoint (`POST /webhooks`).
    pub merchant_url: String,
    /// Timeout of one webhook call.
    pub call_timeout: Duration,
}

/// Runs the naive dispatcher until `shutdown`; prints `READY` once subscribed.
pub async fn run(common: &crate::Common, cfg: &NaiveConfig, pool: PgPool, shutdown: CancellationToken) -> Result<()> {
    let merchant = GatewayClient::new(&cfg.merchant_url, cfg.call_timeout)?;
    let session = cfg.session_timeout_ms.max(1000);
    let consumer: StreamConsumer = common
        .connection()?
        .client_config()?
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session.to_string())
        .set("heartbeat.interval.ms", (session / 6).max(100).to_string())
        .create()
        .context("creating the Kafka consumer")?;
    consumer.subscribe(&[&common.payments_topic]).context("subscribing")?;
    tracing::info!(group = %cfg.group, topic = %common.payments_topic, "naive-dispatcher running.");
    crate::ready();
    // Offsets processed so far, committed synchronously at a graceful stop.
    let mut done: HashMap<(String, i32), i64> = HashMap::new();
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "Kafka consumer error.");
                continue;
            }
        };
        let rec = RawRecord::from_message(&msg);
        // 1. Send the webhook.
        let delivery_key = format!("naive/{}/{}/{}", rec.topic, rec.partition, rec.offset);
        let body: Value = rec.payload.as_deref().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or(Value::Null);
        let webhook = serde_json::json!({ "type": "payment.succeeded", "payment": body });
        let mut attempt = 0u32;
        loop {
            match merchant.webhook(&delivery_key, &webhook).await {
                Ok(_) => break,
                Err(e) => {
                    attempt += 1;
                    let wait = Duration::from_millis(200u64.saturating_mul(1 << attempt.min(5)));
                    tracing::warn!(error = %e, key = %delivery_key, attempt, "Webhook failed; retrying.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return finish(&consumer, &done),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        // 2. Record it as processed: after the fact, so it guards nothing.
        let event_id = CloudEventAttrs::from_record(&rec).map(|a| a.id).unwrap_or_default();
        let event_id = if event_id.is_empty() { delivery_key.clone() } else { event_id };
        sqlx::query(
            "INSERT INTO naive_processed (event_id, topic, partition, kafka_offset) VALUES ($1, $2, $3, $4)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&event_id)
        .bind(&*rec.topic)
        .bind(rec.partition)
        .bind(rec.offset)
        .execute(&pool)
        .await
        .context("recording the processed event")?;
        // 3. Commit the offset.
        if let Err(e) = consumer.commit_message(&msg, CommitMode::Async) {
            tracing::warn!(error = %e, offset = rec.offset, "Offset commit failed.");
        }
        done.insert((rec.topic.to_string(), rec.partition), rec.offset + 1);
    }
    finish(&consumer, &done)
}

/// Commits what was processed (synchronously, so that nothing is in flight)
/// and leaves the group.
fn finish(consumer: &StreamConsumer, done: &HashMap<(String, i32), i64>) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in done {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)).context("building the final commit")?;
    }
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, CommitMode::Sync) {
            tracing::warn!(error = %e, "The final offset commit failed.");
        }
    }
    consumer.unsubscribe();
    tracing::info!("naive-dispatcher stopped.");
    Ok(())
}
