//! The transactional outbox: write an event in the same PostgreSQL
//! transaction as the state it describes, and let a [relay] publish it.
//!
//! A service must never write its database and publish to Kafka as two steps
//! (an order row without its `OrderCreated`, or the event without the row).
//! [`enqueue`] inserts the event into `oncely.outbox` through any sqlx
//! connection or transaction, so it commits or rolls back with the caller's
//! writes. The relay then publishes committed rows with an idempotent producer
//! and marks them published.
//!
//! ```no_run
//! # async fn run(pool: sqlx::PgPool) -> oncely::Result<()> {
//! #[derive(serde::Serialize)]
//! struct OrderCreated { order_id: String, total_cents: i64 }
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id, total_cents) VALUES ($1, $2)")
//!     .bind("o-1").bind(4200_i64)
//!     .execute(&mut *tx).await?;
//! let ev = oncely::outbox::OutgoingEvent::json("com.example.order.created", &OrderCreated {
//!     order_id: "o-1".into(),
//!     total_cents: 4200,
//! })?
//! .source("/orders-service");
//! let enqueued = oncely::outbox::enqueue(&mut tx, "orders", "o-1", &ev).await?;
//! tx.commit().await?; // the row and the event, or neither
//! println!("event {} will be published", enqueued.ce_id);
//! # Ok(()) }
//! ```
//!
//! # What is guaranteed
//!
//! - **Atomicity**: an event exists exactly when the enqueueing transaction
//!   committed; a rolled-back transaction publishes nothing.
//! - **Nothing lost, nothing skipped**: every committed row is published at
//!   least once. A crash between the broker's acknowledgement and the mark
//!   publishes the row again, with the same headers (same `ce_id`), which
//!   oncely consumers drop as a duplicate.
//! - **Per-key order**: the rows of one key are published in id order by one
//!   relay at a time. Ids are drawn when a row is inserted, so for two rows of
//!   the same key, `a` is published (first) before `b` whenever `a` was
//!   committed before `b` was enqueued: rows of one transaction, in enqueue
//!   order, and rows of transactions that ran one after the other. Two
//!   *concurrent* transactions that enqueue the same key have no order between
//!   them (like two producers racing); a service that needs one serialises
//!   them, typically by locking the entity's row (`UPDATE orders ... WHERE id
//!   = $1`, `SELECT ... FOR UPDATE`) *before* it enqueues.
//!
//! - **A row the broker refuses for good** (larger than the topic's
//!   `max.message.bytes`, an invalid record, the topic missing or not
//!   authorised) is **set aside** by the relay with its reason; rows of other
//!   keys go on at full speed, and the later rows of its key are **held**
//!   behind it, so they never overtake it. An operator lists them
//!   ([`failed::list`], `oncely outbox list --failed`), sends them back once
//!   the cause is fixed ([`failed::retry`]) or gives them up
//!   ([`failed::discard`]), which releases the key.
//!
//! Keys, payloads and headers are bytes and are published as they were
//! enqueued: header names need not be UTF-8 and may hold NUL, a null payload
//! stays null and an empty one empty (see [`enqueue_raw`]).
//!
//! See [`relay`] for lanes, several relays, and failures.

use std::borrow::Cow;
use std::fmt;

use serde::Serialize;
use sqlx::PgConnection;

use crate::envelope::{CloudEventAttrs, RawRecord, H_CONTENT_TYPE, H_ID, H_TRACEPARENT};
use crate::error::Result;
use crate::store::outbox as store;

pub mod events;
pub mod failed;
pub mod relay;
mod status;

pub use relay::{Relay, RelayBuilder};
pub use status::{status, LaneOwner, LaneStatus, OutboxStatus};

/// Number of lanes. Rows are split into lanes by a hash of their key
/// ([`lane_of`], stored with the row at enqueue time); each lane is published
/// by one relay at a time, so at most this many relays share the work.
///
/// Part of the storage format: changing it while rows are pending would put
/// rows of one key in two lanes.
pub const LANES: i16 = 16;

/// `ce_source` of an [`OutgoingEvent`] built with [`OutgoingEvent::json`]
/// without an explicit [`source`](OutgoingEvent::source). The identity stays
/// unique (the `ce_id` is a fresh UUIDv7), but services should name
/// themselves.
pub const DEFAULT_SOURCE: &str = "/oncely/outbox";

/// The lane of a Kafka key: FNV-1a (64 bit) of the key's bytes, modulo
/// [`LANES`]. Stable across processes, versions and platforms. Records without
/// a key have no order to keep and go to a random lane.
pub fn lane_of(key: Option<&[u8]>) -> i16 {
    match key {
        Some(k) => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in k {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            (h % LANES as u64) as i16
        }
        None => fastrand::i16(0..LANES),
    }
}

/// An event to enqueue: CloudEvents attributes (a UUIDv7 `ce_id` assigned
/// when the value is built), the data, and extra headers.
#[derive(Clone)]
pub struct OutgoingEvent {
    attrs: CloudEventAttrs,
    data: Vec<u8>,
    content_type: String,
    extra: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for OutgoingEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutgoingEvent")
            .field("attrs", &self.attrs)
            .field("data_len", &self.data.len())
            .field("content_type", &self.content_type)
            .field("extra", &self.extra.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

impl OutgoingEvent {
    /// An event of type `ce_type` with `data` serialised as JSON, a fresh
    /// UUIDv7 `ce_id`, `ce_time` now and `ce_source` [`DEFAULT_SOURCE`].
    pub fn json<T: Serialize + ?Sized>(ce_type: &str, data: &T) -> Result<Self> {
        Ok(Self::with_attrs(CloudEventAttrs::new_now(DEFAULT_SOURCE, ce_type), serde_json::to_vec(data)?))
    }

    /// An event with explicit attributes and JSON `data` already serialised
    /// (to enqueue the *same* event again, keep its `ce_id`).
    pub fn with_attrs(attrs: CloudEventAttrs, data: Vec<u8>) -> Self {
        OutgoingEvent { attrs, data, content_type: "application/json".into(), extra: Vec::new() }
    }

    /// Sets `ce_source` (default [`DEFAULT_SOURCE`]).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.attrs.source = source.into();
        self
    }

    /// Sets `ce_subject`.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.attrs.subject = Some(subject.into());
        self
    }

    /// Replaces the data with raw bytes of media type `content_type`.
    pub fn raw_data(mut self, data: Vec<u8>, content_type: impl Into<String>) -> Self {
        self.data = data;
        self.content_type = content_type.into();
        self
    }

    /// Adds a header (after the CloudEvents ones).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.extra.push((name.into(), value.into()));
        self
    }

    /// Carries a W3C `traceparent` (the incoming event's, to continue its trace).
    pub fn traceparent(self, traceparent: impl Into<Vec<u8>>) -> Self {
        self.header(H_TRACEPARENT, traceparent)
    }

    /// Continues the trace of the record that caused this event: copies its
    /// `traceparent` (and `tracestate`) headers, if it has them.
    pub fn caused_by(mut self, record: &RawRecord) -> Self {
        for name in [H_TRACEPARENT, "tracestate"] {
            if let Some(Some(v)) = record.header(name) {
                self.extra.retain(|(k, _)| k != name);
                self.extra.push((name.to_owned(), v.to_vec()));
            }
        }
        self
    }

    /// The `ce_id`.
    pub fn ce_id(&self) -> &str {
        &self.attrs.id
    }

    /// The CloudEvents attributes.
    pub fn attrs(&self) -> &CloudEventAttrs {
        &self.attrs
    }

    /// The record headers: the CloudEvents binary-mode headers, the content
    /// type, then the extra headers. With the `otel` feature, an event with
    /// no `traceparent` of its own gets the current span's
    /// ([`crate::telemetry`]).
    pub fn headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut h = self.attrs.to_headers();
        for (k, v) in h.iter_mut() {
            if k == H_CONTENT_TYPE {
                *v = self.content_type.clone().into_bytes();
            }
        }
        h.extend(self.extra.iter().cloned());
        if !self.extra.iter().any(|(k, _)| k == H_TRACEPARENT) {
            if let Some((parent, state)) = crate::telemetry::current_traceparent() {
                h.push((H_TRACEPARENT.to_owned(), parent.into_bytes()));
                if !state.is_empty() {
                    h.push(("tracestate".to_owned(), state.into_bytes()));
                }
            }
        }
        h
    }

    /// The payload.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// Anything [`enqueue`] accepts as the event: an [`OutgoingEvent`] (or a
/// reference to one), or a pair `(ce_type, &data)` with JSON data and
/// `ce_source` [`DEFAULT_SOURCE`].
pub trait IntoOutgoing<'a> {
    /// The event to enqueue.
    fn into_outgoing(self) -> Result<Cow<'a, OutgoingEvent>>;
}

impl IntoOutgoing<'static> for OutgoingEvent {
    fn into_outgoing(self) -> Result<Cow<'static, OutgoingEvent>> {
        Ok(Cow::Owned(self))
    }
}

impl<'a> IntoOutgoing<'a> for &'a OutgoingEvent {
    fn into_outgoing(self) -> Result<Cow<'a, OutgoingEvent>> {
        Ok(Cow::Borrowed(self))
    }
}

impl<T: Serialize + ?Sized> IntoOutgoing<'static> for (&str, &T) {
    fn into_outgoing(self) -> Result<Cow<'static, OutgoingEvent>> {
        Ok(Cow::Owned(OutgoingEvent::json(self.0, self.1)?))
    }
}

/// An enqueued event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Enqueued {
    /// The outbox row's id.
    pub id: i64,
    /// The event's `ce_id` (UUIDv7, assigned when the event was built).
    pub ce_id: String,
    /// The lane the row was put in.
    pub lane: i16,
}

/// The headers of an event as the store takes them: name bytes and value.
fn header_refs(headers: &[(String, Vec<u8>)]) -> Vec<store::HeaderRef<'_>> {
    headers.iter().map(|(k, v)| (k.as_bytes(), Some(v.as_slice()))).collect()
}

/// Enqueues `event` for `topic` with entity key `key`, in the caller's
/// transaction (pass `&mut *tx`, or `&mut tx` for a `Transaction`). The
/// relay publishes it once the transaction commits; if it rolls back, the
/// event never existed.
///
/// Outside a transaction (a bare connection) the row commits at once, which
/// is a dual write again: use a transaction.
pub async fn enqueue<'a>(
    conn: &mut PgConnection,
    topic: &str,
    key: &str,
    event: impl IntoOutgoing<'a>,
) -> Result<Enqueued> {
    let ev = event.into_outgoing()?;
    let headers = ev.headers();
    let refs = header_refs(&headers);
    let lane = lane_of(Some(key.as_bytes()));
    let row = store::NewOutboxRow {
        lane,
        topic,
        key: Some(key.as_bytes()),
        payload: Some(&ev.data),
        headers: &refs,
        ce_id: Some(&ev.attrs.id),
    };
    let ids = store::insert(conn, &[row]).await?;
    let id = ids.first().copied().ok_or_else(|| crate::Error::Db(sqlx::Error::RowNotFound))?;
    Ok(Enqueued { id, ce_id: ev.attrs.id.clone(), lane })
}

/// One event of a batch for [`enqueue_many`].
#[derive(Debug, Clone)]
pub struct Batched<'a> {
    /// Destination topic.
    pub topic: &'a str,
    /// Entity key.
    pub key: &'a str,
    /// The event.
    pub event: &'a OutgoingEvent,
}

/// Enqueues many events in one statement per ~9,000 events (bulk loads,
/// backfills, benchmarks); same semantics as [`enqueue`], ids in input order.
pub async fn enqueue_many(conn: &mut PgConnection, events: &[Batched<'_>]) -> Result<Vec<Enqueued>> {
    let headers: Vec<Vec<(String, Vec<u8>)>> = events.iter().map(|e| e.event.headers()).collect();
    let refs: Vec<Vec<store::HeaderRef<'_>>> = headers.iter().map(|h| header_refs(h)).collect();
    let rows: Vec<store::NewOutboxRow<'_>> = events
        .iter()
        .zip(&refs)
        .map(|(e, h)| store::NewOutboxRow {
            lane: lane_of(Some(e.key.as_bytes())),
            topic: e.topic,
            key: Some(e.key.as_bytes()),
            payload: Some(&e.event.data),
            headers: h,
            ce_id: Some(&e.event.attrs.id),
        })
        .collect();
    let ids = store::insert(conn, &rows).await?;
    Ok(ids
        .into_iter()
        .zip(&rows)
        .map(|(id, r)| Enqueued { id, ce_id: r.ce_id.unwrap_or_default().to_owned(), lane: r.lane })
        .collect())
}

/// A header value as [`enqueue_raw`] takes it: bytes, or `None` for a null
/// value (Kafka tells a null header value from an empty one).
pub trait HeaderValue {
    /// The value's bytes, `None` for null.
    fn header_value(&self) -> Option<&[u8]>;
}

impl HeaderValue for [u8] {
    fn header_value(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl HeaderValue for &[u8] {
    fn header_value(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl HeaderValue for Vec<u8> {
    fn header_value(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl<const N: usize> HeaderValue for [u8; N] {
    fn header_value(&self) -> Option<&[u8]> {
        Some(self)
    }
}

impl<T: AsRef<[u8]>> HeaderValue for Option<T> {
    fn header_value(&self) -> Option<&[u8]> {
        self.as_ref().map(AsRef::as_ref)
    }
}

/// Enqueues a raw record (key, payload and headers as they are, bytes
/// throughout), in the caller's transaction; returns the row id. Used by the
/// dead-letter path to publish to `<topic>.<consumer>.dlt` atomically with
/// the offset advance.
///
/// Header names are bytes (`Vec<u8>`, `&[u8]`, `String`, `&str`, ...): a
/// dead-letter copy carries the original record's names as they came, UTF-8
/// or not, NUL included. Values are bytes or `Option`s of bytes (`None`: a
/// null value). A `None` key or payload is published as null, an empty one
/// as empty. The `ce_id` header, if present and UTF-8, is recorded with the
/// row.
pub async fn enqueue_raw<K, V>(
    conn: &mut PgConnection,
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: &[(K, V)],
) -> Result<i64>
where
    K: AsRef<[u8]>,
    V: HeaderValue,
{
    let refs: Vec<store::HeaderRef<'_>> = headers.iter().map(|(k, v)| (k.as_ref(), v.header_value())).collect();
    let ce_id = refs
        .iter()
        .rev()
        .find(|(k, _)| *k == H_ID.as_bytes())
        .and_then(|(_, v)| v.and_then(|v| std::str::from_utf8(v).ok()))
        .map(str::to_owned);
    let row = store::NewOutboxRow { lane: lane_of(key), topic, key, payload, headers: &refs, ce_id: ce_id.as_deref() };
    let ids = store::insert(conn, &[row]).await?;
    ids.first().copied().ok_or_else(|| crate::Error::Db(sqlx::Error::RowNotFound))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Headers, H_SOURCE, H_SPECVERSION, H_TYPE};

    #[test]
    fn lanes_are_stable_and_in_range() {
        // Pinned to FNV-1a 64's published values, so that a change of the
        // hash (which would move pending rows of a key to another lane) fails here.
        assert_eq!(lane_of(Some(b"order-1")), lane_of(Some(b"order-1")));
        assert_eq!(lane_of(Some(b"")), (0xcbf2_9ce4_8422_2325u64 % 16) as i16);
        assert_eq!(lane_of(Some(b"a")), (0xaf63_dc4c_8601_ec8cu64 % 16) as i16);
        for i in 0..1000 {
            let l = lane_of(Some(format!("k{i}").as_bytes()));
            assert!((0..LANES).contains(&l));
        }
        for _ in 0..100 {
            assert!((0..LANES).contains(&lane_of(None)));
        }
    }

    #[test]
    fn keys_spread_over_all_lanes() {
        let mut seen = [0u32; LANES as usize];
        for i in 0..1600 {
            seen[lane_of(Some(format!("order-{i}").as_bytes())) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }

    #[test]
    fn outgoing_event_has_cloudevents_headers_and_extras() {
        let ev = OutgoingEvent::json("order.created", &serde_json::json!({"id": 1}))
            .expect("json")
            .source("/orders")
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let h = ev.headers();
        let get = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get(H_SPECVERSION).as_deref(), Some(&b"1.0"[..]));
        assert_eq!(get(H_ID).as_deref(), Some(ev.ce_id().as_bytes()));
        assert_eq!(get(H_SOURCE).as_deref(), Some(&b"/orders"[..]));
        assert_eq!(get(H_TYPE).as_deref(), Some(&b"order.created"[..]));
        assert_eq!(get(H_CONTENT_TYPE).as_deref(), Some(&b"application/json"[..]));
        assert!(get(H_TRACEPARENT).is_some());
        assert_eq!(ev.data(), br#"{"id":1}"#);
        let id = uuid::Uuid::parse_str(ev.ce_id()).expect("uuid");
        assert_eq!(id.get_version_num(), 7);
    }

    #[test]
    fn caused_by_continues_the_incoming_trace() {
        let incoming = RawRecord {
            topic: "orders".into(),
            partition: 0,
            offset: 1,
            timestamp_ms: None,
            key: None,
            payload: None,
            headers: vec![(H_TRACEPARENT.as_bytes().to_vec(), Some(b"00-abc-def-01".to_vec()))].into(),
        };
        let ev = OutgoingEvent::json("t", &1).expect("json").traceparent("old").caused_by(&incoming);
        let h = ev.headers();
        let tp: Vec<_> = h.iter().filter(|(k, _)| k == H_TRACEPARENT).map(|(_, v)| v.as_slice()).collect();
        assert_eq!(tp, vec![&b"00-abc-def-01"[..]]);
        let plain =
            OutgoingEvent::json("t", &1).expect("json").caused_by(&RawRecord { headers: Headers::new(), ..incoming });
        assert!(plain.headers().iter().all(|(k, _)| k != H_TRACEPARENT));
    }
}
