//! Helpers every benchmark uses: where the services are, topics, statistics.

use anyhow::Result;

/// Kafka bootstrap servers (`ONCELY_KAFKA_BOOTSTRAP`, as `scripts/services env` prints).
pub fn bootstrap() -> String {
    std::env::var("ONCELY_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// PostgreSQL URL (`DATABASE_URL`).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://oncely:oncely@127.0.0.1:5432/oncely".into())
}

/// Creates `topic` with `partitions` partitions, replication 1 (the test broker).
pub async fn create_topic(topic: &str, partitions: i32) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        oncely::kafka::KafkaConnection::new(bootstrap()).client_config()?.create()?;
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics([&t], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// The `p` quantile of sorted values (`None` when empty).
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}
