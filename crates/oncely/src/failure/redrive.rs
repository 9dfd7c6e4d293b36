//! Redrive: dead letters back onto their original topic, with the same
//! identity, so the inbox lets each through exactly once (a second redrive of
//! the same event is a duplicate).

use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::envelope::{Headers, Publisher};
use crate::error::Result;
use crate::store::failure::{self as store, DeadLetterRow};

/// Header added to a redriven record: the dead letter's id.
pub const H_REDRIVE: &str = "oncely-redrive";

/// The headers a redriven record carries: the original ones (so `ce_id` and
/// `ce_source` keep the identity), without the dead-letter headers, plus
/// `oncely-redrive`. A null value stays null.
pub fn redrive_headers(dl: &DeadLetterRow) -> Headers {
    let mut h: Headers = dl
        .record
        .headers
        .iter()
        .filter(|(k, _)| !super::is_dead_letter_header(k) && *k != H_REDRIVE.as_bytes())
        .collect();
    h.push(H_REDRIVE.as_bytes(), Some(dl.id.to_string().as_bytes()));
    h
}

/// One redriven dead letter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Redriven {
    /// The dead letter's id.
    pub id: i64,
    /// Where the record went.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// Publishes `letters` back to their original topics, at most `rate_per_s`
/// per second, and marks each redriven. Stops at the first failure, returning
/// what was done so far with the error.
pub async fn redrive(
    pool: &PgPool,
    publisher: &Publisher,
    letters: &[DeadLetterRow],
    rate_per_s: f64,
    mut progress: impl FnMut(&Redriven),
) -> (Vec<Redriven>, Result<()>) {
    let gap = if rate_per_s > 0.0 { Duration::from_secs_f64(1.0 / rate_per_s) } else { Duration::ZERO };
    let mut done = Vec::new();
    let mut next = Instant::now();
    for dl in letters {
        let now = Instant::now();
        if next > now {
            tokio::time::sleep(next - now).await;
        }
        next = Instant::now() + gap;
        let sent = publisher
            .publish_record(
                &dl.record.topic,
                dl.record.key.as_deref(),
                dl.record.payload.as_deref(),
                &redrive_headers(dl),
            )
            .await;
        let (partition, offset) = match sent {
            Ok(p) => p,
            Err(e) => return (done, Err(e)),
        };
        if let Err(e) = store::mark_redriven(pool, dl.id).await {
            return (done, Err(e));
        }
        let r = Redriven { id: dl.id, topic: dl.record.topic.to_string(), partition, offset };
        progress(&r);
        done.push(r);
    }
    (done, Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::RawRecord;

    #[test]
    fn redriven_records_keep_their_identity_headers_and_drop_dlt_ones() {
        let dl = DeadLetterRow {
            id: 7,
            consumer: "c".into(),
            record: RawRecord {
                topic: "t".into(),
                partition: 0,
                offset: 1,
                timestamp_ms: None,
                key: None,
                payload: None,
                headers: vec![
                    (b"ce_id".to_vec(), Some(b"1".to_vec())),
                    (b"ce_source".to_vec(), Some(b"/s".to_vec())),
                    (b"x-null".to_vec(), None),
                    (b"kafka_dlt-original-topic".to_vec(), Some(b"t".to_vec())),
                    (b"oncely-reason".to_vec(), Some(b"x".to_vec())),
                ]
                .into(),
            },
            event_id: None,
            reason: "rejected".into(),
            error: "e".into(),
            error_class: "c".into(),
            attempts: 1,
            created_at: chrono::Utc::now(),
            redriven_at: None,
            redrive_count: 0,
        };
        let h = redrive_headers(&dl);
        let names: Vec<&[u8]> = h.iter().map(|(k, _)| k).collect();
        assert_eq!(names, vec![&b"ce_id"[..], b"ce_source", b"x-null", H_REDRIVE.as_bytes()]);
        assert_eq!(h.get(2), Some((&b"x-null"[..], None)), "a null value stays null");
        assert_eq!(h.get(3).and_then(|(_, v)| v), Some(&b"7"[..]));
    }
}
