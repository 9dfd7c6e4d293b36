//! Dead letters and held keys as [`ops`](crate::admin::ops) operations.
//!
//! - **Redrive** ([`Session::preview_redrive`]): publish dead letters back to
//!   their original topics with the same identity, rate limited; the preview
//!   lists every record that would be sent (topic, key, the headers it
//!   carries, its size). A protected environment requires `REDRIVE <ENV>`.
//!   The execution is audited before the first record goes out and reports
//!   its progress ([`Redrive::progress`]) while it runs.
//! - **Release** ([`Session::preview_release`]): let the events held behind
//!   a dead-lettered event of a key (dead-key policy `hold`) go on. A key
//!   that is not held is a refusal (audited as refused), never "released 0".
//!   A protected environment requires `RELEASE <ENV> <CONSUMER> <KEY>`, with
//!   the key escaped as everywhere ([`escape_bytes`]).
//!
//! ```no_run
//! # async fn run(s: oncely::admin::session::Session) -> oncely::Result<()> {
//! use oncely::admin::dlq::{RedriveRequest, RedriveSelection};
//! use oncely::admin::ops::Origin;
//!
//! let req = RedriveRequest { selection: RedriveSelection::Ids(vec![17, 18]), rate_per_s: 10.0 };
//! let preview = s.preview_redrive(&req, Origin::cli()).await?; // the dry run
//! for d in &preview.dead_letters {
//!     println!("#{} → {} key {:?}", d.id, d.topic, d.key);
//! }
//! let done = preview.confirm(&s, None).await?.execute(&s).await?;
//! println!("redrove {} (audit #{})", done.redriven.len(), done.audit_id);
//! # Ok(()) }
//! ```

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use crate::admin::audit::{AuditEntry, AuditOutcome};
use crate::admin::ops::{Operation, Origin, Preview, Trail};
use crate::admin::session::Session;
use crate::envelope::{escape_bytes, Publisher};
use crate::error::Result;
use crate::failure::redrive::{self, Redriven};
use crate::store::failure::{self as store, DeadLetterRow};

/// Which dead letters to redrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveSelection {
    /// These ids (an id that does not exist is a refusal).
    Ids(Vec<i64>),
    /// Every dead letter not redriven yet, of one consumer or of all.
    All {
        /// Only this consumer's.
        consumer: Option<String>,
    },
}

/// A redrive to preview.
#[derive(Debug, Clone, PartialEq)]
pub struct RedriveRequest {
    /// Which dead letters.
    pub selection: RedriveSelection,
    /// Records per second at most (must be positive and finite: a redrive is
    /// always rate limited, so that it cannot flood a consumer that is only
    /// just fixed).
    pub rate_per_s: f64,
}

/// One record a redrive would send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedriveItem {
    /// The dead letter's id.
    pub id: i64,
    /// The consumer it was dead-lettered by.
    pub consumer: String,
    /// The topic it goes back to.
    pub topic: String,
    /// Where it was read from.
    pub partition: i32,
    /// Its original offset.
    pub offset: i64,
    /// The Kafka key, escaped ([`escape_bytes`]); `None` for a record without one.
    pub key: Option<String>,
    /// Its identity, when known.
    pub event_id: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// Times redriven before.
    pub redriven_before: i32,
    /// Payload size in bytes (`None`: a null payload).
    pub payload_bytes: Option<usize>,
    /// The names of the headers it is sent with, escaped: the original ones
    /// without the dead-letter headers, plus `oncely-redrive`.
    pub headers: Vec<String>,
}

impl From<&DeadLetterRow> for RedriveItem {
    fn from(l: &DeadLetterRow) -> Self {
        RedriveItem {
            id: l.id,
            consumer: l.consumer.clone(),
            topic: l.record.topic.to_string(),
            partition: l.record.partition,
            offset: l.record.offset,
            key: l.record.key.as_deref().map(escape_bytes),
            event_id: l.event_id.clone(),
            reason: l.reason.clone(),
            redriven_before: l.redrive_count,
            payload_bytes: l.record.payload.as_ref().map(Vec::len),
            headers: redrive::redrive_headers(l).iter().map(|(k, _)| escape_bytes(k)).collect(),
        }
    }
}

/// A redrive, previewed: every record it would send.
#[derive(Debug, Serialize)]
pub struct Redrive {
    /// What would be sent, oldest dead letter first.
    pub dead_letters: Vec<RedriveItem>,
    /// Records per second at most.
    pub rate_per_s: f64,
    /// The consumers whose dead letters these are.
    pub consumers: Vec<String>,
    /// What the redrive means, in a sentence or two.
    pub meaning: String,
    /// Why execution would be refused (empty: it would go ahead).
    pub refusals: Vec<String>,
    #[serde(skip)]
    letters: Vec<DeadLetterRow>,
    #[serde(skip)]
    progress: watch::Sender<Vec<Redriven>>,
}

impl Redrive {
    /// The records redriven so far by the execution, updated as each one is
    /// published (for a progress display; the execution's result has them too).
    pub fn progress(&self) -> watch::Receiver<Vec<Redriven>> {
        self.progress.subscribe()
    }
}

/// A done redrive.
#[derive(Debug, Clone, Serialize)]
pub struct RedriveDone {
    /// The audit record.
    pub audit_id: i64,
    /// Where each record went.
    pub redriven: Vec<Redriven>,
}

fn redrive_meaning(letters: &[DeadLetterRow], rate: f64) -> String {
    let mut m = format!(
        "{} dead letter(s) would be published back to their original topics at {rate}/s at most. Each keeps its \
         identity (ce_source, ce_id): a consumer whose inbox already applied the event skips it as a duplicate, \
         so redriving twice is harmless.",
        letters.len()
    );
    let anonymous = letters.iter().filter(|l| l.event_id.is_none()).count();
    if anonymous > 0 {
        m.push_str(&format!(
            " {anonymous} of them have no identity: they are dead-lettered again unless the consumer's identity rule \
             changed."
        ));
    }
    m
}

impl Session {
    /// Previews redriving dead letters: nothing is sent.
    pub async fn preview_redrive(&self, req: &RedriveRequest, origin: Origin) -> Result<Preview<Redrive>> {
        let mut refusals = Vec::new();
        let letters = match &req.selection {
            RedriveSelection::All { consumer } => {
                store::list_dead_letters(self.pool(), consumer.as_deref(), true, i64::MAX).await?
            }
            RedriveSelection::Ids(ids) => {
                if ids.is_empty() {
                    refusals.push("name the dead letters to redrive (or choose all of them)".to_owned());
                }
                let found = store::get_dead_letters(self.pool(), ids).await?;
                let missing: BTreeSet<i64> =
                    ids.iter().filter(|i| !found.iter().any(|f| f.id == **i)).copied().collect();
                for m in missing {
                    refusals.push(format!("dead letter {m} does not exist"));
                }
                found
            }
        };
        if !(req.rate_per_s.is_finite() && req.rate_per_s > 0.0) {
            refusals.push(format!(
                "the rate must be a positive number of records per second (got {}): a redrive is always rate limited",
                req.rate_per_s
            ));
        }
        let consumers: BTreeSet<String> = letters.iter().map(|l| l.consumer.clone()).collect();
        let op = Redrive {
            dead_letters: letters.iter().map(RedriveItem::from).collect(),
            rate_per_s: req.rate_per_s,
            consumers: consumers.into_iter().collect(),
            meaning: redrive_meaning(&letters, req.rate_per_s),
            refusals,
            letters,
            progress: watch::channel(Vec::new()).0,
        };
        Ok(Preview::new(self, op, origin))
    }

    async fn execute_redrive(&self, r: &Redrive, trail: &mut Trail) -> Result<RedriveDone> {
        if r.letters.is_empty() {
            return Err(trail.refuse("there is nothing to redrive").await);
        }
        // Last check: a dead letter may have been deleted since the preview.
        let ids: Vec<i64> = r.letters.iter().map(|l| l.id).collect();
        let letters = store::get_dead_letters(self.pool(), &ids).await?;
        if letters.len() != ids.len() {
            let gone: Vec<String> =
                ids.iter().filter(|i| !letters.iter().any(|l| l.id == **i)).map(|i| i.to_string()).collect();
            return Err(trail.refuse(format!("dead letter(s) {} no longer exist", gone.join(", "))).await);
        }
        let audit_id = trail.start().await?;
        let publisher = Publisher::new(self.env().config.connection(), "/oncely/redrive")?;
        let (done, result) = redrive::redrive(self.pool(), &publisher, &letters, r.rate_per_s, |one| {
            r.progress.send_modify(|v| v.push(one.clone()));
        })
        .await;
        let after = json!({ "redriven": done });
        match result {
            Ok(()) => {
                trail.finish(&AuditOutcome::succeeded(Some(after))).await?;
                Ok(RedriveDone { audit_id, redriven: done })
            }
            Err(e) => {
                trail.finish_quietly(&AuditOutcome::failed(e.to_string()).after(after)).await;
                Err(e)
            }
        }
    }
}

impl Operation for Redrive {
    type Output = RedriveDone;

    fn action(&self) -> &'static str {
        "dlq.redrive"
    }

    fn confirmation_text(&self, environment: &str) -> String {
        format!("REDRIVE {environment}")
    }

    fn refusals(&self) -> &[String] {
        &self.refusals
    }

    fn audit_entry(&self, entry: AuditEntry) -> AuditEntry {
        let entry = match self.consumers.as_slice() {
            [one] => entry.group(one),
            _ => entry,
        };
        entry.details(json!({
            "dead_letters": self.dead_letters.iter().map(|d| d.id).collect::<Vec<_>>(),
            "rate": self.rate_per_s,
            "consumers": self.consumers,
        }))
    }

    /// Refused (recorded) when there is nothing to send or a dead letter was
    /// deleted since the preview; then the audit record, then the records,
    /// one by one at the rate, each marked redriven; the outcome with where
    /// each went (also when it stopped at a failure).
    fn run<'a>(
        &'a self,
        session: &'a Session,
        trail: &'a mut Trail,
    ) -> impl std::future::Future<Output = Result<RedriveDone>> + Send + 'a {
        session.execute_redrive(self, trail)
    }
}

/// Releasing a held key, previewed.
#[derive(Debug, Clone, Serialize)]
pub struct KeyRelease {
    /// The consumer.
    pub consumer: String,
    /// The entity key, escaped ([`escape_bytes`]).
    pub key: String,
    /// The entity key's bytes in hex (what `--key-hex` takes).
    pub key_hex: String,
    /// Dead-lettered events kept as the markers that hold the key.
    pub dead_markers: i64,
    /// Events held behind them.
    pub held: i64,
    /// What releasing means.
    pub meaning: String,
    /// Why execution would be refused (empty: it would go ahead).
    pub refusals: Vec<String>,
    #[serde(skip)]
    key_bytes: Vec<u8>,
}

/// A done release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Released {
    /// The consumer.
    pub consumer: String,
    /// The key, escaped.
    pub key: String,
    /// Rows changed: markers removed and events released.
    pub released: u64,
    /// The audit record.
    pub audit_id: i64,
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn not_held(key: &str, consumer: &str) -> String {
    format!(
        "no held events for key {key} of consumer {consumer}: the key is not held (only a key whose event was \
         dead-lettered under dead-key policy `hold` is)"
    )
}

impl Session {
    /// Previews releasing `key` (bytes) of `consumer`: nothing changes.
    pub async fn preview_release(&self, consumer: &str, key: &[u8], origin: Origin) -> Result<Preview<KeyRelease>> {
        let (dead_markers, held) = store::key_hold(self.pool(), consumer, key).await?;
        let shown = escape_bytes(key);
        let refusals = if dead_markers + held == 0 { vec![not_held(&shown, consumer)] } else { Vec::new() };
        let op = KeyRelease {
            consumer: consumer.to_owned(),
            meaning: format!(
                "The {held} event(s) of key {shown} held behind {dead_markers} dead-lettered event(s) become due \
                 now and are processed in order; the dead-lettered event stays in the dead-letter topic (redrive it \
                 first if it must be applied before them)."
            ),
            key: shown,
            key_hex: hex(key),
            dead_markers,
            held,
            refusals,
            key_bytes: key.to_vec(),
        };
        Ok(Preview::new(self, op, origin))
    }

    async fn execute_release(&self, r: &KeyRelease, trail: &mut Trail) -> Result<Released> {
        let (markers, held) = store::key_hold(self.pool(), &r.consumer, &r.key_bytes).await?;
        if markers + held == 0 {
            return Err(trail.refuse(not_held(&r.key, &r.consumer)).await);
        }
        let audit_id = trail.start().await?;
        let n = store::release_key(self.pool(), &r.consumer, &r.key_bytes).await?;
        if n == 0 {
            // Released by someone else between the check and now.
            return Err(trail.refuse(not_held(&r.key, &r.consumer)).await);
        }
        trail.finish(&AuditOutcome::succeeded(Some(json!({ "released": n })))).await?;
        Ok(Released { consumer: r.consumer.clone(), key: r.key.clone(), released: n, audit_id })
    }
}

impl Operation for KeyRelease {
    type Output = Released;

    fn action(&self) -> &'static str {
        "dlq.release"
    }

    fn confirmation_text(&self, environment: &str) -> String {
        format!("RELEASE {environment} {} {}", self.consumer, self.key)
    }

    fn refusals(&self) -> &[String] {
        &self.refusals
    }

    fn audit_entry(&self, entry: AuditEntry) -> AuditEntry {
        entry
            .group(&self.consumer)
            .before(json!({ "dead_markers": self.dead_markers, "held": self.held }))
            .details(json!({ "key": self.key, "key_hex": self.key_hex }))
    }

    /// Refused (recorded) when the key is not held (any more); then the
    /// audit record, the release, the outcome with the rows changed.
    fn run<'a>(
        &'a self,
        session: &'a Session,
        trail: &'a mut Trail,
    ) -> impl std::future::Future<Output = Result<Released>> + Send + 'a {
        session.execute_release(self, trail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::RawRecord;

    fn letter(id: i64, event_id: Option<&str>) -> DeadLetterRow {
        DeadLetterRow {
            id,
            consumer: "pay".into(),
            record: RawRecord {
                topic: "orders".into(),
                partition: 2,
                offset: 40,
                timestamp_ms: None,
                key: Some(b"k\xff\x00".to_vec()),
                payload: Some(b"<script>".to_vec()),
                headers: vec![
                    (b"ce_id".to_vec(), Some(b"1".to_vec())),
                    (b"bad\xfe".to_vec(), None),
                    (b"kafka_dlt-original-topic".to_vec(), Some(b"orders".to_vec())),
                ]
                .into(),
            },
            event_id: event_id.map(str::to_owned),
            reason: "rejected".into(),
            error: "e".into(),
            error_class: "c".into(),
            attempts: 1,
            created_at: chrono::Utc::now(),
            redriven_at: None,
            redrive_count: 0,
        }
    }

    #[test]
    fn a_redrive_preview_shows_what_is_sent_escaped() {
        let i = RedriveItem::from(&letter(7, Some("/s#1")));
        assert_eq!(i.key.as_deref(), Some("k\\xff\\u{0}"));
        assert_eq!(i.headers, vec!["ce_id", "bad\\xfe", "oncely-redrive"]);
        assert_eq!(i.payload_bytes, Some(8));
        assert_eq!((i.topic.as_str(), i.partition, i.offset), ("orders", 2, 40));
    }

    #[test]
    fn the_meaning_warns_about_letters_without_identity() {
        let m = redrive_meaning(&[letter(1, Some("/s#1")), letter(2, None)], 5.0);
        assert!(m.contains("2 dead letter(s)") && m.contains("5/s"), "{m}");
        assert!(m.contains("1 of them have no identity"), "{m}");
        assert!(!redrive_meaning(&[letter(1, Some("/s#1"))], 5.0).contains("no identity"));
    }

    #[test]
    fn hex_is_lower_case_pairs() {
        assert_eq!(hex(b"\x00\xffA"), "00ff41");
        assert_eq!(hex(b""), "");
    }
}
