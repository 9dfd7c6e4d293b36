//! Reads the timestamp of the record at given offsets: the oldest record a
//! reset re-delivers, and the time lag of a partition (how old the next
//! record the group will read is).
//!
//! ListOffsets can map a time to an offset but not an offset to a time, so
//! this reads the record itself: an assigned consumer that joins no group
//! and commits nothing, `read_committed` like oncely's
//! consumers, one record per partition. The first record delivered at or
//! after the offset is the one the group will see first (aborted records and
//! transaction markers are skipped, as they would be for it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::error::{Error, Result};

/// The timestamp (ms since the epoch) of the first record at or after each
/// `(topic, partition, offset)`, by `(topic, partition)`. Partitions whose
/// record could not be read within `timeout` (or that have none) are left
/// out.
pub async fn first_record_timestamps(
    connection: &crate::kafka::KafkaConnection,
    positions: &[(String, i32, i64)],
    timeout: Duration,
) -> Result<BTreeMap<(String, i32), i64>> {
    if positions.is_empty() {
        return Ok(BTreeMap::new());
    }
    let connection = connection.clone();
    let positions = positions.to_vec();
    tokio::task::spawn_blocking(move || read(&connection, &positions, timeout))
        .await
        .map_err(|e| Error::Io(std::io::Error::other(format!("reading record timestamps: {e}"))))?
}

fn read(
    connection: &crate::kafka::KafkaConnection,
    positions: &[(String, i32, i64)],
    timeout: Duration,
) -> Result<BTreeMap<(String, i32), i64>> {
    let consumer: BaseConsumer = connection
        .client_config()?
        .set("client.id", "oncely-admin-peek")
        // librdkafka wants a group id even for assign(); this one is never
        // joined (no subscribe) and never committed to (auto commit off).
        .set("group.id", format!("oncely-peek-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.max.bytes", "1048576")
        .set("max.partition.fetch.bytes", "65536")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (t, p, o) in positions {
        tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
    }
    consumer.assign(&tpl)?;
    let mut found = BTreeMap::new();
    let deadline = Instant::now() + timeout;
    while found.len() < positions.len() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let key = (m.topic().to_owned(), m.partition());
                if let (false, Some(ts)) = (found.contains_key(&key), m.timestamp().to_millis()) {
                    found.insert(key, ts);
                }
            }
            Some(Err(e)) => tracing::debug!(error = %e, "Reading a record for its timestamp failed."),
            None => {}
        }
    }
    Ok(found)
}
