//! Shared by the outbox tests: run a relay, wait for the outbox to drain, read
//! a topic back to its end.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use oncely::envelope::H_ID;
use oncely::outbox::RelayBuilder;
use oncely_testkit as kit;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(90);

/// A relay running in this process.
pub struct Running {
    pub name: String,
    token: CancellationToken,
    join: tokio::task::JoinHandle<oncely::Result<()>>,
}

impl Running {
    /// Stops the relay (cleanly) and waits for it.
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.join).await.context("relay did not stop")???;
        Ok(())
    }
}

/// A relay builder for the test database, quick to take over lanes.
pub fn relay(pool: &PgPool, name: &str) -> RelayBuilder {
    oncely::outbox::Relay::builder(pool.clone(), kit::bootstrap())
        .name(name)
        .lane_check_interval(Duration::from_millis(100))
        .max_backoff(Duration::from_secs(2))
}

/// Starts a relay.
pub fn start(builder: RelayBuilder) -> Result<Running> {
    let relay = builder.build()?;
    let name = relay.name().to_owned();
    let token = CancellationToken::new();
    let join = tokio::spawn(relay.run(token.clone()));
    Ok(Running { name, token, join })
}

/// Waits until the outbox holds `rows` rows and none is pending.
pub async fn wait_drained(pool: &PgPool, rows: i64) -> Result<()> {
    kit::wait_until(WAIT, &format!("{rows} outbox rows, all published"), || async {
        let n = kit::count(pool, "SELECT count(*) FROM oncely.outbox").await?;
        let pending = kit::count(pool, "SELECT count(*) FROM oncely.outbox WHERE published_at IS NULL").await?;
        Ok(n == rows && pending == 0)
    })
    .await
}

/// A record read back from the topic.
#[derive(Debug, Clone)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Rec {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_slice())
    }

    pub fn ce_id(&self) -> String {
        String::from_utf8_lossy(self.header(H_ID).unwrap_or_default()).into_owned()
    }

    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }

    pub fn json(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(self.payload.as_deref().context("no payload")?)?)
    }
}

/// Every record of `topic` up to the current high watermarks, per partition
/// in offset order (partitions one after the other).
pub fn read_to_end(topic: &str, partitions: i32) -> Result<Vec<Rec>> {
    let consumer: BaseConsumer = oncely::kafka::KafkaConnection::new(kit::bootstrap())
        .client_config()?
        .set("group.id", kit::unique("outbox-reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        ends.insert(p, high);
        if high > 0 {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    let total: i64 = ends.values().sum();
    let mut out = Vec::with_capacity(total as usize);
    if total == 0 {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let mut done: HashMap<i32, bool> = ends.iter().map(|(p, h)| (*p, *h == 0)).collect();
    let deadline = std::time::Instant::now() + WAIT;
    while done.values().any(|d| !d) {
        anyhow::ensure!(std::time::Instant::now() < deadline, "timed out reading {topic} to its end");
        let m = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(e)) if kit::is_transient_read_error(&e) => continue,
            Some(m) => m?,
        };
        let headers = m
            .headers()
            .map(|hs| hs.iter().map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec).unwrap_or_default())).collect())
            .unwrap_or_default();
        out.push(Rec {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
        });
        if m.offset() + 1 >= ends[&m.partition()] {
            done.insert(m.partition(), true);
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// The ce_ids of the outbox rows, by row id.
pub async fn outbox_ce_ids(pool: &PgPool) -> Result<Vec<(i64, String)>> {
    Ok(sqlx::query_as::<_, (i64, String)>("SELECT id, ce_id FROM oncely.outbox ORDER BY id").fetch_all(pool).await?)
}
