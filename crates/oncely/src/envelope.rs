//! Event identity and the CloudEvents Kafka protocol binding (binary mode).
//!
//! A record carries its CloudEvents attributes as headers (`ce_specversion`,
//! `ce_id`, `ce_source`, `ce_type`, `ce_time`, optional `ce_subject`) and its
//! data as the payload. The Kafka key is the entity key: it fixes the partition
//! and so the order.
//!
//! The **identity** of an event decides what "the same event" means for the
//! inbox. By default it is `(ce_source, ce_id)`, which the CloudEvents spec
//! requires to be unique per distinct event. [`IdentitySource`] offers another
//! header, a JSON pointer into the payload, or a function of the record, and by
//! design nothing that depends on the delivery (offset, timestamp, partition):
//! a redelivered record must map to the identity it had the first time.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};

/// `ce_specversion` header.
pub const H_SPECVERSION: &str = "ce_specversion";
/// `ce_id` header: unique per distinct event within its source.
pub const H_ID: &str = "ce_id";
/// `ce_source` header: the context in which the event happened.
pub const H_SOURCE: &str = "ce_source";
/// `ce_type` header: the kind of event (`com.example.order.created`).
pub const H_TYPE: &str = "ce_type";
/// `ce_time` header: RFC 3339 time of the occurrence.
pub const H_TIME: &str = "ce_time";
/// `ce_subject` header (optional).
pub const H_SUBJECT: &str = "ce_subject";
/// `content-type` header: the payload's media type (binary mode).
pub const H_CONTENT_TYPE: &str = "content-type";
/// `ce_oncelyversion` header: optional entity version for the version guard.
pub const H_VERSION: &str = "ce_oncelyversion";
/// W3C trace context header, carried through the outbox.
pub const H_TRACEPARENT: &str = "traceparent";
/// The only CloudEvents spec version oncely reads and writes.
pub const SPEC_VERSION: &str = "1.0";

/// Why a record could not be turned into an event. Each variant names the
/// header or field that is wrong; [`DecodeError::reason`] gives the short code
/// stored with a dead letter.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// A required header is absent.
    #[error("header `{header}` is missing")]
    MissingHeader {
        /// The header's name.
        header: String,
    },
    /// The record has no identity under the consumer's identity rule.
    #[error("the record has no event identity: {detail}")]
    MissingIdentity {
        /// What was looked for and not found.
        detail: String,
    },
    /// A header's value is not valid UTF-8 (or is empty where a value is needed).
    #[error("header `{header}` is not valid UTF-8 text")]
    InvalidHeaderEncoding {
        /// The header's name.
        header: String,
    },
    /// A header's value does not parse.
    #[error("header `{header}` has an invalid value {value:?}: {detail}")]
    InvalidHeaderValue {
        /// The header's name.
        header: String,
        /// The value as received (lossy UTF-8).
        value: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The payload does not decode into the handler's event type.
    #[error("payload does not decode as {type_name}: {detail}")]
    UndecodablePayload {
        /// The Rust type the handler expects.
        type_name: &'static str,
        /// serde's message, with line and column.
        detail: String,
    },
    /// The record has no payload but the handler expects data.
    #[error("the record has no payload")]
    EmptyPayload,
    /// No route of the consumer takes this CloudEvents type (and the
    /// consumer dead-letters such events).
    #[error("no handler is routed for CloudEvents type {ty:?}")]
    UnroutedType {
        /// The event's `ce_type`.
        ty: String,
    },
    /// The record is larger than the consumer's size limit.
    #[error("record of {size} bytes exceeds the limit of {limit} bytes")]
    Oversized {
        /// Key + payload + headers, in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
}

impl DecodeError {
    /// The short, stable reason code stored with a dead letter (`oncely-reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::MissingHeader { .. } => "missing-header",
            DecodeError::MissingIdentity { .. } => "missing-event-id",
            DecodeError::InvalidHeaderEncoding { .. } => "invalid-header-encoding",
            DecodeError::InvalidHeaderValue { .. } => "invalid-header-value",
            DecodeError::UndecodablePayload { .. } => "undecodable-payload",
            DecodeError::EmptyPayload => "empty-payload",
            DecodeError::UnroutedType { .. } => "unrouted-type",
            DecodeError::Oversized { .. } => "oversized-record",
        }
    }
}

pub use crate::kafka::{escape_bytes, Headers, HeadersIter};

/// A Kafka record as oncely sees it: owned, independent of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    /// Topic the record was read from (shared: the records of a partition
    /// all point at one copy of the name).
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Record timestamp in milliseconds since the epoch, if any.
    pub timestamp_ms: Option<i64>,
    /// Kafka key (the entity key).
    pub key: Option<Vec<u8>>,
    /// Payload.
    pub payload: Option<Vec<u8>>,
    /// Headers in order: name and value as the producer sent them (bytes:
    /// Kafka does not require either to be UTF-8); a value may be null.
    pub headers: Headers,
}

impl RawRecord {
    /// Copies a message received from rdkafka. Header names are read as raw
    /// bytes through librdkafka's C API ([`crate::kafka::message_headers`]):
    /// rdkafka's own header iterator panics on a name that is not UTF-8.
    pub fn from_message(m: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        Self::from_message_of(m, &Arc::from(m.topic()))
    }

    /// [`from_message`](Self::from_message) for a reader that knows the
    /// message's topic already, as `topic` (its name is not copied again).
    pub(crate) fn from_message_of(m: &rdkafka::message::BorrowedMessage<'_>, topic: &Arc<str>) -> Self {
        debug_assert_eq!(&**topic, m.topic());
        RawRecord {
            topic: topic.clone(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers: crate::kafka::message_headers(m),
        }
    }

    /// The last value of header `name` (Kafka allows repeats; the last wins,
    /// as in Spring Kafka's `lastHeader`). `None` if absent.
    pub fn header(&self, name: &str) -> Option<Option<&[u8]>> {
        self.headers.last(name.as_bytes())
    }

    /// Header `name` as UTF-8 text: `Ok(None)` if absent, an error if present
    /// but null, empty or not UTF-8.
    pub fn header_str(&self, name: &str) -> Result<Option<&str>, DecodeError> {
        match self.header(name) {
            None => Ok(None),
            Some(None) => Err(DecodeError::InvalidHeaderEncoding { header: name.into() }),
            Some(Some(bytes)) => match std::str::from_utf8(bytes) {
                Ok(s) if !s.is_empty() => Ok(Some(s)),
                _ => Err(DecodeError::InvalidHeaderEncoding { header: name.into() }),
            },
        }
    }

    /// The key as text for people to read (lossy: bytes that are not UTF-8
    /// become U+FFFD); the empty string if there is no key. Never use it to
    /// tell keys apart: use [`entity_key`](Self::entity_key).
    pub fn key_str(&self) -> String {
        self.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default()
    }

    /// The entity key as the bytes it is (the empty key for a record without
    /// one): what per-key order, parking and the version guard use.
    pub fn entity_key(&self) -> &[u8] {
        self.key.as_deref().unwrap_or_default()
    }

    /// Size counted against a consumer's record size limit: key + payload + headers.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.payload.as_ref().map_or(0, Vec::len) + self.headers.byte_len()
    }
}

/// The identity of an event: the bytes the inbox deduplicates on.
///
/// For the default rule it is `ce_source#ce_id`, with `#` and `%` in the source
/// percent-encoded so that two different pairs never give the same identity.
/// Other rules give the header's value, the JSON value or the function's bytes
/// as they are: an identity may hold any byte, NUL included (it is never
/// stored as PostgreSQL `text`; see [`EventId::key`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(Vec<u8>);

impl EventId {
    /// The identity of the CloudEvents pair `(source, id)`.
    pub fn from_source_and_id(source: &str, id: &str) -> Self {
        let mut s = String::with_capacity(source.len() + id.len() + 1);
        for c in source.chars() {
            match c {
                '%' => s.push_str("%25"),
                '#' => s.push_str("%23"),
                c => s.push(c),
            }
        }
        s.push('#');
        s.push_str(id);
        EventId(s.into_bytes())
    }

    /// An identity from its bytes (a custom rule's value).
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        EventId(bytes.into())
    }

    /// The identity's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The identity as text for people and logs: UTF-8 as it is, control
    /// characters and bytes that are not UTF-8 escaped (`\0`, `\xff`), so
    /// the text never holds a NUL and shows what was received.
    pub fn display(&self) -> String {
        escape_bytes(&self.0)
    }

    /// The inbox key: 16 bytes derived from the identity alone (never from
    /// the delivery), stored as a `uuid`. See [`inbox_key`].
    pub fn key(&self) -> uuid::Uuid {
        inbox_key(&self.0)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({:?})", self.display())
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

impl From<&str> for EventId {
    fn from(s: &str) -> Self {
        EventId(s.as_bytes().to_vec())
    }
}

/// The inbox key of an identity: 16 bytes, a pure function of the identity's
/// bytes, stored as a PostgreSQL `uuid` (and computed the same way in SQL by
/// `oncely.inbox_key(bytea)`, which migration 0007 uses to carry the old inbox
/// over; a unit test in the store keeps the two equal).
///
/// - If the identity ends with a UUIDv7 in its text form (the `ce_id` oncely's
///   publisher and outbox assign), the key starts with that UUID's 48-bit
///   millisecond timestamp, followed by 80 bits of SHA-256 of the whole
///   identity. Keys are then time-ordered: the inbox is partitioned by day on
///   the key itself, every copy of an event lands in the same partition, and a
///   duplicate costs one index probe.
/// - Otherwise the key is two zero bytes (the "timeless" region below every
///   real timestamp) followed by 112 bits of SHA-256 of the identity.
pub fn inbox_key(identity: &[u8]) -> uuid::Uuid {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(identity);
    let mut k = [0u8; 16];
    match uuid7_millis_suffix(identity) {
        Some(ms) => {
            k[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
            k[6..].copy_from_slice(&digest[..10]);
        }
        None => k[2..].copy_from_slice(&digest[..14]),
    }
    uuid::Uuid::from_bytes(k)
}

/// The millisecond timestamp of the UUIDv7 that ends `identity`, if it ends
/// with one in canonical text form (8-4-4-4-12 hex digits, version 7, variant
/// 10xx; either case).
fn uuid7_millis_suffix(identity: &[u8]) -> Option<u64> {
    let t = identity.len().checked_sub(36).map(|i| &identity[i..])?;
    for (i, b) in t.iter().enumerate() {
        let ok = match i {
            8 | 13 | 18 | 23 => *b == b'-',
            14 => *b == b'7',
            19 => matches!(b, b'8' | b'9' | b'a' | b'b' | b'A' | b'B'),
            _ => b.is_ascii_hexdigit(),
        };
        if !ok {
            return None;
        }
    }
    // The 48-bit timestamp: the first 12 hex digits (the dash at 8 skipped).
    let digit = |b: u8| char::from(b).to_digit(16).map(u64::from);
    t[..8].iter().chain(&t[9..13]).try_fold(0u64, |ms, b| Some(ms << 4 | digit(*b)?))
}

/// A user-supplied identity function: returns `None` when the record has no
/// identity; any bytes otherwise.
pub type IdentityFn = Arc<dyn Fn(&RawRecord) -> Option<Vec<u8>> + Send + Sync>;

/// Where a consumer takes an event's identity from. There is deliberately no
/// variant for the offset or the timestamp: those change on redelivery.
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum IdentitySource {
    /// `(ce_source, ce_id)`, the CloudEvents identity (default).
    #[default]
    CloudEvents,
    /// The value of another header, as bytes (any byte, NUL included).
    Header(String),
    /// A JSON pointer (RFC 6901) into the payload, e.g. `/orderId`; strings are
    /// taken as they are, numbers in their JSON form.
    JsonPointer(String),
    /// A function of the record.
    Function(IdentityFn),
}

impl fmt::Debug for IdentitySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentitySource::CloudEvents => f.write_str("CloudEvents(ce_source, ce_id)"),
            IdentitySource::Header(h) => write!(f, "Header({h})"),
            IdentitySource::JsonPointer(p) => write!(f, "JsonPointer({p})"),
            IdentitySource::Function(_) => f.write_str("Function(..)"),
        }
    }
}

impl IdentitySource {
    /// A JSON pointer into the payload. Panics never; an invalid pointer simply
    /// finds nothing, so records dead-letter with `missing-event-id`.
    pub fn json_pointer(pointer: impl Into<String>) -> Self {
        IdentitySource::JsonPointer(pointer.into())
    }

    /// A function of the record; it may return text or bytes.
    pub fn function<V: Into<Vec<u8>>>(f: impl Fn(&RawRecord) -> Option<V> + Send + Sync + 'static) -> Self {
        IdentitySource::Function(Arc::new(move |r| f(r).map(Into::into)))
    }

    /// Extracts the identity of `record`.
    pub fn extract(&self, record: &RawRecord) -> Result<EventId, DecodeError> {
        match self {
            IdentitySource::CloudEvents => {
                let id = record.header_str(H_ID)?;
                let source = record.header_str(H_SOURCE)?;
                match (source, id) {
                    (Some(s), Some(i)) => Ok(EventId::from_source_and_id(s, i)),
                    (None, _) => {
                        Err(DecodeError::MissingIdentity { detail: format!("header `{H_SOURCE}` is missing") })
                    }
                    (_, None) => Err(DecodeError::MissingIdentity { detail: format!("header `{H_ID}` is missing") }),
                }
            }
            IdentitySource::Header(name) => match record.header(name) {
                Some(Some(v)) if !v.is_empty() => Ok(EventId(v.to_vec())),
                Some(_) => Err(DecodeError::MissingIdentity { detail: format!("header `{name}` is null or empty") }),
                None => Err(DecodeError::MissingIdentity { detail: format!("header `{name}` is missing") }),
            },
            IdentitySource::JsonPointer(ptr) => {
                let payload = record.payload.as_deref().ok_or(DecodeError::EmptyPayload)?;
                let value: serde_json::Value = serde_json::from_slice(payload)
                    .map_err(|e| DecodeError::UndecodablePayload { type_name: "JSON", detail: e.to_string() })?;
                match value.pointer(ptr) {
                    Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(EventId(s.clone().into_bytes())),
                    Some(v @ serde_json::Value::Number(_)) => Ok(EventId(v.to_string().into_bytes())),
                    _ => Err(DecodeError::MissingIdentity {
                        detail: format!("JSON pointer `{ptr}` finds no string or number in the payload"),
                    }),
                }
            }
            IdentitySource::Function(f) => f(record)
                .filter(|b| !b.is_empty())
                .map(EventId)
                .ok_or_else(|| DecodeError::MissingIdentity { detail: "the identity function returned none".into() }),
        }
    }
}

/// Where the version guard takes an entity's version from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum VersionSource {
    /// The `ce_oncelyversion` header (or another header), an integer.
    Header(String),
    /// A JSON pointer into the payload that finds an integer.
    JsonPointer(String),
}

impl VersionSource {
    /// The entity version of `record`.
    pub fn extract(&self, record: &RawRecord) -> Result<i64, DecodeError> {
        match self {
            VersionSource::Header(name) => {
                let v = record.header_str(name)?.ok_or_else(|| DecodeError::MissingHeader { header: name.clone() })?;
                v.trim().parse::<i64>().map_err(|e| DecodeError::InvalidHeaderValue {
                    header: name.clone(),
                    value: v.to_owned(),
                    detail: e.to_string(),
                })
            }
            VersionSource::JsonPointer(ptr) => {
                let payload = record.payload.as_deref().ok_or(DecodeError::EmptyPayload)?;
                let value: serde_json::Value = serde_json::from_slice(payload)
                    .map_err(|e| DecodeError::UndecodablePayload { type_name: "JSON", detail: e.to_string() })?;
                value
                    .pointer(ptr)
                    .and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
                    .ok_or_else(|| DecodeError::InvalidHeaderValue {
                        header: format!("payload{ptr}"),
                        value: value.pointer(ptr).map(|v| v.to_string()).unwrap_or_default(),
                        detail: "expected an integer version".into(),
                    })
            }
        }
    }
}

/// The CloudEvents attributes of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudEventAttrs {
    /// `ce_id`.
    pub id: String,
    /// `ce_source`.
    pub source: String,
    /// `ce_type`.
    pub ty: String,
    /// `ce_time`, if present.
    pub time: Option<DateTime<Utc>>,
    /// `ce_subject`, if present.
    pub subject: Option<String>,
}

impl CloudEventAttrs {
    /// Reads the attributes from the headers. `ce_specversion` must be `1.0`
    /// when present; `ce_type` defaults to the empty string when absent (a
    /// custom identity rule does not require CloudEvents headers).
    pub fn from_record(record: &RawRecord) -> Result<Self, DecodeError> {
        if let Some(v) = record.header_str(H_SPECVERSION)? {
            if v != SPEC_VERSION {
                return Err(DecodeError::InvalidHeaderValue {
                    header: H_SPECVERSION.into(),
                    value: v.into(),
                    detail: format!("only CloudEvents {SPEC_VERSION} is supported"),
                });
            }
        }
        let time = match record.header_str(H_TIME)? {
            None => None,
            Some(t) => Some(
                DateTime::parse_from_rfc3339(t)
                    .map_err(|e| DecodeError::InvalidHeaderValue {
                        header: H_TIME.into(),
                        value: t.into(),
                        detail: e.to_string(),
                    })?
                    .with_timezone(&Utc),
            ),
        };
        Ok(CloudEventAttrs {
            id: record.header_str(H_ID)?.unwrap_or_default().to_owned(),
            source: record.header_str(H_SOURCE)?.unwrap_or_default().to_owned(),
            ty: record.header_str(H_TYPE)?.unwrap_or_default().to_owned(),
            time,
            subject: record.header_str(H_SUBJECT)?.map(str::to_owned),
        })
    }

    /// The binary-mode headers for these attributes, JSON content type.
    pub fn to_headers(&self) -> Vec<(String, Vec<u8>)> {
        let mut h = vec![
            (H_SPECVERSION.to_owned(), SPEC_VERSION.as_bytes().to_vec()),
            (H_ID.to_owned(), self.id.clone().into_bytes()),
            (H_SOURCE.to_owned(), self.source.clone().into_bytes()),
            (H_TYPE.to_owned(), self.ty.clone().into_bytes()),
        ];
        if let Some(t) = self.time {
            h.push((H_TIME.to_owned(), t.to_rfc3339_opts(SecondsFormat::Micros, true).into_bytes()));
        }
        if let Some(s) = &self.subject {
            h.push((H_SUBJECT.to_owned(), s.clone().into_bytes()));
        }
        h.push((H_CONTENT_TYPE.to_owned(), b"application/json".to_vec()));
        h
    }

    /// New attributes for an event published now: a fresh UUIDv7 `ce_id`.
    pub fn new_now(source: &str, ty: &str) -> Self {
        CloudEventAttrs {
            id: uuid::Uuid::now_v7().to_string(),
            source: source.to_owned(),
            ty: ty.to_owned(),
            time: Some(Utc::now()),
            subject: None,
        }
    }
}

/// A decoded event as a handler receives it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Event<T> {
    /// The identity the inbox deduplicated on.
    pub id: EventId,
    /// CloudEvents attributes (empty strings where a custom identity rule is
    /// used and the producer sent no CloudEvents headers).
    pub attrs: CloudEventAttrs,
    /// The decoded data.
    pub data: T,
    /// The record's position and raw form.
    pub record: Arc<RawRecord>,
}

impl<T> Event<T> {
    /// The Kafka key as text (the entity key).
    pub fn key(&self) -> String {
        self.record.key_str()
    }
    /// Topic of the record.
    pub fn topic(&self) -> &str {
        &self.record.topic
    }
    /// Partition of the record.
    pub fn partition(&self) -> i32 {
        self.record.partition
    }
    /// Offset of the record.
    pub fn offset(&self) -> i64 {
        self.record.offset
    }
}

/// How a handler's event type is decoded from a record's payload. Implemented
/// for every `DeserializeOwned` type (JSON) and for [`RawPayload`].
pub trait DecodePayload: Sized + Send + 'static {
    /// Decodes the payload.
    fn decode(payload: Option<&[u8]>) -> Result<Self, DecodeError>;
}

/// The payload bytes as they are, for handlers that decode themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPayload(pub Vec<u8>);

impl<T: DeserializeOwned + Send + 'static> DecodePayload for T {
    fn decode(payload: Option<&[u8]>) -> Result<Self, DecodeError> {
        let bytes = payload.ok_or(DecodeError::EmptyPayload)?;
        serde_json::from_slice(bytes).map_err(|e| DecodeError::UndecodablePayload {
            type_name: std::any::type_name::<T>(),
            detail: e.to_string(),
        })
    }
}

impl RawPayload {
    /// Decodes nothing: keeps the bytes (an absent payload is empty).
    pub fn from_payload(payload: Option<&[u8]>) -> Self {
        RawPayload(payload.map(<[u8]>::to_vec).unwrap_or_default())
    }
}

impl DecodePayload for RawPayload {
    /// Never fails: any bytes (and no payload, as empty) are a raw payload.
    fn decode(payload: Option<&[u8]>) -> Result<Self, DecodeError> {
        Ok(RawPayload::from_payload(payload))
    }
}

/// Decodes `record` into an [`Event<T>`] with the identity already extracted.
pub fn decode_event<T: DecodePayload>(id: EventId, record: Arc<RawRecord>) -> Result<Event<T>, DecodeError> {
    let attrs = CloudEventAttrs::from_record(&record)?;
    let data = T::decode(record.payload.as_deref())?;
    Ok(Event { id, attrs, data, record })
}

/// Builds rdkafka headers from name/value pairs (names may be any bytes).
pub use crate::kafka::owned_headers;

/// Where a published record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The `ce_id` assigned at publish time.
    pub ce_id: String,
    /// The identity consumers will deduplicate on (default rule).
    pub event_id: EventId,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A producer helper that publishes CloudEvents in binary mode: a UUIDv7
/// `ce_id` assigned once per event at publish time, the entity key as Kafka
/// key, JSON data. Idempotent producer (`enable.idempotence=true`, `acks=all`),
/// so the client's own retries do not duplicate records.
///
/// Outside a transaction this is a dual write; services that also change their
/// database should publish through [the outbox](crate::store) instead.
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    source: String,
    timeout: Duration,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher").field("source", &self.source).finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher for `ce_source = source` on `connection` (bootstrap
    /// servers, or a [`KafkaConnection`](crate::kafka::KafkaConnection) for a
    /// secured cluster).
    pub fn new(connection: impl Into<crate::kafka::KafkaConnection>, source: impl Into<String>) -> Result<Self> {
        let producer = connection
            .into()
            .client_config()?
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Publisher { producer, source: source.into(), timeout: Duration::from_secs(30) })
    }

    /// Publishes `data` as an event of type `ty` with entity key `key`.
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        key: &str,
        ty: &str,
        data: &T,
    ) -> Result<Published> {
        let attrs = CloudEventAttrs::new_now(&self.source, ty);
        self.publish_attrs(topic, key, &attrs, data).await
    }

    /// Publishes with explicit attributes: to re-publish the *same* event (same
    /// `ce_id`), as a producer retry or a replay would.
    pub async fn publish_attrs<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        key: &str,
        attrs: &CloudEventAttrs,
        data: &T,
    ) -> Result<Published> {
        let payload = serde_json::to_vec(data)?;
        self.publish_raw(topic, Some(key.as_bytes()), Some(&payload), &attrs.to_headers()).await.map(
            |(partition, offset)| Published {
                ce_id: attrs.id.clone(),
                event_id: EventId::from_source_and_id(&attrs.source, &attrs.id),
                partition,
                offset,
            },
        )
    }

    /// Publishes raw bytes with the given headers (used for dead letters,
    /// redrive and tests of bad input).
    pub async fn publish_raw(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(impl AsRef<[u8]>, impl AsRef<[u8]>)],
    ) -> Result<(i32, i64)> {
        self.send_bytes(topic, key, payload, owned_headers(headers)?).await
    }

    /// Publishes raw bytes with a record's [`Headers`], null values included
    /// (redrive sends a dead letter's original headers back as they were).
    pub async fn publish_record(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &Headers,
    ) -> Result<(i32, i64)> {
        self.send_bytes(topic, key, payload, crate::kafka::record_headers(headers)?).await
    }

    async fn send_bytes(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: rdkafka::message::OwnedHeaders,
    ) -> Result<(i32, i64)> {
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(p) = payload {
            rec = rec.payload(p);
        }
        self.producer.send(rec, self.timeout).await.map(|d| (d.partition, d.offset)).map_err(|(e, _)| Error::Kafka(e))
    }

    /// The underlying producer.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_payload_decodes_any_bytes() {
        assert_eq!(RawPayload::decode(Some(b"\xff\x00not json")).ok(), Some(RawPayload(b"\xff\x00not json".to_vec())));
        assert_eq!(RawPayload::decode(None).ok(), Some(RawPayload(Vec::new())));
        assert!(<serde_json::Value as DecodePayload>::decode(Some(b"\xff")).is_err());
    }
    use proptest::prelude::*;

    fn record(headers: Vec<(String, Vec<u8>)>, payload: &[u8]) -> RawRecord {
        RawRecord {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            timestamp_ms: Some(1),
            key: Some(b"k".to_vec()),
            payload: Some(payload.to_vec()),
            headers: headers.into_iter().map(|(k, v)| (k.into_bytes(), Some(v))).collect(),
        }
    }

    #[test]
    fn default_identity_is_source_and_id() {
        let attrs = CloudEventAttrs::new_now("/orders", "order.created");
        let r = record(attrs.to_headers(), b"{}");
        let id = IdentitySource::CloudEvents.extract(&r).expect("identity");
        assert_eq!(id.as_bytes(), format!("/orders#{}", attrs.id).as_bytes());
    }

    #[test]
    fn missing_ce_id_is_missing_event_id() {
        let r = record(vec![(H_SOURCE.into(), b"/s".to_vec())], b"{}");
        let err = IdentitySource::CloudEvents.extract(&r).expect_err("no id");
        assert_eq!(err.reason(), "missing-event-id");
        assert!(err.to_string().contains("ce_id"), "{err}");
    }

    #[test]
    fn non_utf8_header_names_the_header() {
        let r = record(vec![(H_SOURCE.into(), b"/s".to_vec()), (H_ID.into(), vec![0xff, 0xfe])], b"{}");
        let err = IdentitySource::CloudEvents.extract(&r).expect_err("bad header");
        assert_eq!(err, DecodeError::InvalidHeaderEncoding { header: H_ID.into() });
        assert_eq!(err.reason(), "invalid-header-encoding");
    }

    #[test]
    fn json_pointer_identity_reads_strings_and_numbers() {
        let r = record(vec![], br#"{"orderId":"o-1","n":{"seq":42}}"#);
        assert_eq!(IdentitySource::json_pointer("/orderId").extract(&r).expect("id").as_bytes(), b"o-1");
        assert_eq!(IdentitySource::json_pointer("/n/seq").extract(&r).expect("id").as_bytes(), b"42");
        let err = IdentitySource::json_pointer("/absent").extract(&r).expect_err("absent");
        assert_eq!(err.reason(), "missing-event-id");
    }

    #[test]
    fn header_and_function_identities() {
        let r = record(vec![("x-id".into(), b"abc".to_vec())], b"{}");
        assert_eq!(IdentitySource::Header("x-id".into()).extract(&r).expect("id").as_bytes(), b"abc");
        let f = IdentitySource::function(|r| Some(format!("{}-fn", r.key_str())));
        assert_eq!(f.extract(&r).expect("id").as_bytes(), b"k-fn");
        let none = IdentitySource::function(|_| None::<Vec<u8>>);
        assert_eq!(none.extract(&r).expect_err("none").reason(), "missing-event-id");
    }

    #[test]
    fn undecodable_payload_names_the_type() {
        #[derive(serde::Deserialize, Debug)]
        struct Order {
            #[allow(dead_code)]
            total: i64,
        }
        let attrs = CloudEventAttrs::new_now("/s", "t");
        let r = Arc::new(record(attrs.to_headers(), b"{\"total\": \"ten\"}"));
        let err = decode_event::<Order>(EventId::from("x"), r).expect_err("bad payload");
        assert_eq!(err.reason(), "undecodable-payload");
        assert!(err.to_string().contains("Order"), "{err}");
    }

    #[test]
    fn bad_time_and_specversion_are_rejected() {
        let mut h = CloudEventAttrs::new_now("/s", "t").to_headers();
        h.push((H_TIME.into(), b"yesterday".to_vec()));
        let err = CloudEventAttrs::from_record(&record(h, b"{}")).expect_err("bad time");
        assert_eq!(err.reason(), "invalid-header-value");
        let mut h = CloudEventAttrs::new_now("/s", "t").to_headers();
        h.push((H_SPECVERSION.into(), b"0.3".to_vec()));
        assert!(CloudEventAttrs::from_record(&record(h, b"{}")).is_err());
    }

    #[test]
    fn version_from_header_and_pointer() {
        let r = record(vec![(H_VERSION.into(), b"12".to_vec())], br#"{"v": 3}"#);
        assert_eq!(VersionSource::Header(H_VERSION.into()).extract(&r).expect("v"), 12);
        assert_eq!(VersionSource::JsonPointer("/v".into()).extract(&r).expect("v"), 3);
    }

    #[test]
    fn ce_ids_are_uuid_v7_and_ordered() {
        let a = CloudEventAttrs::new_now("/s", "t");
        let b = CloudEventAttrs::new_now("/s", "t");
        let ua = uuid::Uuid::parse_str(&a.id).expect("uuid");
        assert_eq!(ua.get_version_num(), 7);
        assert!(a.id < b.id);
    }

    #[test]
    fn a_header_identity_may_hold_any_bytes() {
        let mut r = record(vec![], b"{}");
        r.headers.push(b"x-id", Some(&[0, 0xff, b'a']));
        let id = IdentitySource::Header("x-id".into()).extract(&r).expect("id");
        assert_eq!(id.as_bytes(), &[0, 0xff, b'a']);
        assert_eq!(id.display(), "\\u{0}\\xffa");
        assert!(!id.display().contains('\0'));
        r.headers.push(b"x-id", None);
        assert_eq!(IdentitySource::Header("x-id".into()).extract(&r).expect_err("null").reason(), "missing-event-id");
    }

    #[test]
    fn header_names_are_compared_as_bytes() {
        let mut r = record(vec![], b"{}");
        r.headers.push(&[0xff, 0xfe], Some(b"junk"));
        r.headers.push(b"ce_id", Some(b"1"));
        assert_eq!(r.header("ce_id"), Some(Some(&b"1"[..])));
        assert_eq!(r.header("\u{fffd}\u{fffd}"), None, "no lossy match of a name that is not UTF-8");
    }

    #[test]
    fn headers_keep_every_name_and_value_in_order_null_apart_from_empty() {
        let pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> = vec![
            (b"ce_id".to_vec(), Some(b"1".to_vec())),
            (vec![0xff, 0], None),
            (Vec::new(), Some(Vec::new())),
            (b"ce_id".to_vec(), Some(vec![0, 0xfe])),
            (b"empty".to_vec(), Some(Vec::new())),
            (b"null".to_vec(), None),
        ];
        let h = Headers::from(pairs.clone());
        assert_eq!(h.len(), 6);
        assert_eq!(h.to_vec(), pairs, "round trip");
        let forward: Vec<_> = h.iter().collect();
        let mut backward: Vec<_> = h.iter().rev().collect();
        backward.reverse();
        assert_eq!(forward, backward);
        assert_eq!(h.iter().len(), 6);
        assert_eq!(h.get(1), Some((&[0xff, 0][..], None)));
        assert_eq!(h.get(2), Some((&b""[..], Some(&b""[..]))), "an empty value is not null");
        assert_eq!(h.get(6), None);
        assert_eq!(h.last(b"ce_id"), Some(Some(&[0, 0xfe][..])), "the last of a repeated name");
        assert_eq!(h.last(b"null"), Some(None));
        assert_eq!(h.last(b"absent"), None);
        assert_eq!(h.byte_len(), 5 + 1 + 2 + 5 + 2 + 5 + 4);
        assert_eq!(format!("{h:?}").matches("\\xff").count(), 1, "Debug escapes bytes: {h:?}");
        assert!(Headers::new().is_empty() && Headers::new().iter().next().is_none());
    }

    #[test]
    fn a_uuid7_identity_gives_a_time_ordered_key() {
        let a = CloudEventAttrs::new_now("/s", "t");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = CloudEventAttrs::new_now("/other-source", "t");
        let ka = EventId::from_source_and_id("/s", &a.id).key();
        let kb = EventId::from_source_and_id("/other-source", &b.id).key();
        assert!(ka < kb, "later ids give larger keys");
        let ms = uuid::Uuid::parse_str(&a.id).expect("uuid").get_timestamp().expect("v7").to_unix();
        let ms = ms.0 * 1000 + u64::from(ms.1) / 1_000_000;
        assert_eq!(&ka.as_bytes()[..6], &ms.to_be_bytes()[2..], "the key starts with the id's milliseconds");
        // The same ce_id from another source is another event.
        assert_ne!(EventId::from_source_and_id("/s", &a.id).key(), EventId::from_source_and_id("/t", &a.id).key());
        let upper = EventId::from_source_and_id("/s", &a.id.to_uppercase()).key();
        assert_eq!(&upper.as_bytes()[..6], &ka.as_bytes()[..6], "upper-case hex is read too");
    }

    #[test]
    fn other_identities_land_in_the_timeless_region() {
        for id in [&b"order-1"[..], b"", &[0u8, 0, 0], b"01900000-0000-4000-8000-000000000000"] {
            let k = inbox_key(id);
            assert_eq!(&k.as_bytes()[..2], &[0, 0], "{id:?}");
        }
        assert_ne!(inbox_key(b"a"), inbox_key(b"b"));
    }

    proptest! {
        #[test]
        fn headers_give_back_any_bytes_in_order(pairs in proptest::collection::vec(
            (proptest::collection::vec(any::<u8>(), 0..12), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))),
            0..12,
        )) {
            let h = Headers::from(pairs.clone());
            prop_assert_eq!(h.len(), pairs.len());
            prop_assert_eq!(h.to_vec(), pairs.clone());
            let back: Vec<_> = h.iter().rev().map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec))).collect();
            prop_assert_eq!(back, pairs.iter().rev().cloned().collect::<Vec<_>>());
            let bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
            prop_assert_eq!(h.byte_len(), bytes);
            if let Some((name, _)) = pairs.first() {
                let want = pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_deref());
                prop_assert_eq!(h.last(name), want);
            }
            prop_assert_eq!(h.get(pairs.len()), None);
            // Appended one by one, counted too few or too many: the same headers.
            let mut pushed = Headers::new();
            for (k, v) in &pairs {
                pushed.push(k, v.as_deref());
            }
            prop_assert_eq!(&pushed, &h);
            let refs = || pairs.iter().map(|(k, v)| (&k[..], v.as_deref()));
            for n in [0, pairs.len() / 2, pairs.len() + 3] {
                prop_assert_eq!(&Headers::from_counted(n, bytes, refs()), &h);
            }
        }

        #[test]
        fn distinct_identities_give_distinct_keys(a in proptest::collection::vec(any::<u8>(), 0..60),
                                                  b in proptest::collection::vec(any::<u8>(), 0..60)) {
            prop_assert_eq!(inbox_key(&a) == inbox_key(&b), a == b);
        }

        #[test]
        fn escaping_never_yields_nul_and_keeps_printable_text(b in proptest::collection::vec(any::<u8>(), 0..40),
                                                              t in "[ -~]{0,20}") {
            prop_assert!(!escape_bytes(&b).contains('\0'));
            prop_assert_eq!(escape_bytes(t.as_bytes()), t.replace('\\', "\\\\"));
        }

        #[test]
        fn headers_round_trip(source in "[ -~]{1,40}", ty in "[a-z.]{1,20}", subject in proptest::option::of("[ -~]{1,20}"),
                              data in proptest::collection::vec(any::<i64>(), 0..10)) {
            let mut attrs = CloudEventAttrs::new_now(&source, &ty);
            attrs.subject = subject;
            let payload = serde_json::to_vec(&data).expect("json");
            let r = Arc::new(record(attrs.to_headers(), &payload));
            let id = IdentitySource::CloudEvents.extract(&r).expect("identity");
            let ev = decode_event::<Vec<i64>>(id.clone(), r).expect("decode");
            prop_assert_eq!(&ev.attrs.id, &attrs.id);
            prop_assert_eq!(&ev.attrs.source, &attrs.source);
            prop_assert_eq!(&ev.attrs.subject, &attrs.subject);
            prop_assert_eq!(ev.attrs.time.map(|t| t.timestamp_micros()), attrs.time.map(|t| t.timestamp_micros()));
            prop_assert_eq!(ev.data, data);
            prop_assert_eq!(id, EventId::from_source_and_id(&source, &attrs.id));
        }

        #[test]
        fn distinct_pairs_give_distinct_identities(s1 in "[#%a-c]{0,6}", i1 in "[#%a-c]{0,6}", s2 in "[#%a-c]{0,6}", i2 in "[#%a-c]{0,6}") {
            let a = EventId::from_source_and_id(&s1, &i1);
            let b = EventId::from_source_and_id(&s2, &i2);
            prop_assert_eq!(a == b, s1 == s2 && i1 == i2);
        }
    }
}
